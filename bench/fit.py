"""Zero-shot fit: relative error against steps and seconds for the mean and svd starts, beside the SVD bound.

    .venv/bin/python bench/fit.py                                   # Qwen3-30B-A3B gate shape 768×2048, E=16
    .venv/bin/python bench/fit.py --steps 200 --rank 32             # quicker on a 2-core CPU
    .venv/bin/python bench/fit.py --model runs/toy/teacher --layer 1 --proj gate   # real trained experts

Without --model the experts are synthetic but shaped like trained ones: power-law singular spectra and a
relative distance of ~0.93 from their mean (the figure measured on a trained MoE in FINDINGS.md), since no
Qwen3 weights can be downloaded here. The bound column is the rank-2r truncated SVD of W_e − C for the
fitted C (Eckart–Young–Mirsky): the best any per-expert correction with the wrappers' parameter count can do.
"""

import argparse
import time

import torch
from common import print_header

from moe_ds.fit import FitConfig, eckart_young_error, fit_projection


def synthetic_experts(e: int, d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """[E, d_out, d_in] with power-law spectra (σ_j ∝ j^-0.6) and ~0.93 relative distance from the mean."""
    g = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in)
    spectrum = torch.arange(1, n + 1, dtype=torch.float32) ** -0.6

    def random_matrix():
        u, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g))
        v, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g))
        return (u * spectrum) @ v.T

    shared = random_matrix()
    w = torch.stack([0.38 * shared + random_matrix() for _ in range(e)])
    return w / w.std()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--d-out", type=int, default=768)
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=0, help="table rows every N steps (default steps/10)")
    ap.add_argument("--model", help="read real experts from this model directory instead")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--proj", default="gate", choices=["gate", "up", "down"])
    args = ap.parse_args()
    print_header("zero-shot fit: relative error vs steps for the mean and svd starts, beside the SVD bound")
    if args.model:
        from transformers import AutoConfig

        from moe_ds.compress import ExpertReader

        reader = ExpertReader(args.model, AutoConfig.from_pretrained(args.model))
        w = reader.read_layer(args.layer)[args.proj].float()
        source = f"{args.model} layer {args.layer} {args.proj}"
    else:
        w = synthetic_experts(args.experts, args.d_out, args.d_in)
        source = "synthetic (power-law spectra)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = w.to(device)
    e, d_out, d_in = w.shape
    every = args.every or max(args.steps // 10, 1)
    mean_err = (torch.linalg.vector_norm(w - w.mean(0)) / torch.linalg.vector_norm(w)).item()
    print(f"# experts: {source}, E={e}, {d_out}×{d_in}, rank {args.rank}, Adam lr {args.lr}, device {device}, "
          f"threads {torch.get_num_threads()}; every expert = mean: rel. error {mean_err:.4f}")
    results = {}
    for init in ("mean", "svd"):
        t0 = time.perf_counter()
        res = fit_projection(w, args.rank, FitConfig(init=init, steps=args.steps, lr=args.lr, check_every=every))
        results[init] = res
        print(f"# {init}: {res.steps} steps in {time.perf_counter() - t0:.1f} s "
              f"({res.seconds / max(res.steps, 1) * 1e3:.1f} ms/step incl. init)")
    bound_mean = eckart_young_error(w, w.mean(0), 2 * args.rank)
    print("| step | mean: rel. error | svd: rel. error |")
    print("|---|---|---|")
    for (step, a), (_, b) in zip(results["mean"].history, results["svd"].history):
        print(f"| {step} | {a:.4f} | {b:.4f} |")
    for init, res in results.items():
        bound = eckart_young_error(w, res.factors["core"], 2 * args.rank)
        print(f"# {init}: final {res.rel_error:.4f} after {res.seconds:.1f} s; rank-2r SVD bound for its core "
              f"{bound:.4f}")
    print(f"# rank-2r SVD bound with C = mean: {bound_mean:.4f}")


if __name__ == "__main__":
    main()

"""Shared-core experts vs the stock transformers experts at Qwen3-30B-A3B layer shape, side by side.

    .venv/bin/python bench/experts_forward.py                       # full table (E=128, d=2048, I=768, top-8)
    .venv/bin/python bench/experts_forward.py --tokens 512 --ranks 64 --dtypes float32   # quick look

For each token count T, dtype and pass (forward, forward+backward) it times the stock
``Qwen3MoeExperts`` (transformers' default kernel, and the eager loop) and ``SharedCoreExperts`` at each rank,
with its per-expert loop and its batched (grouped GEMM) path, on the same inputs and routing, and prints the
wall-time ratio next to the MAC ratio from ``moe_ds.stats`` and the compute ops of one call counted by
torch.profiler (``moe_ds.stats.compute_ops``: on a CPU, a proxy for the kernel launches on a GPU; a forward in
the fwd rows, forward + backward in the fwd+bwd rows). Goal (issue #11): the batched path at most 60 ops per
layer forward whatever E is. Routing is drawn from a skewed, real-looking expert popularity (log-normal expert
preferences, Gumbel top-k), so some experts see several times the mean load.
Goal (issue #2): at T = 8192 and r = 64 at least 2× faster than the original; at r = 207 no slower.
"""

import argparse
import statistics
import time
from functools import partial

import torch
import transformers as T
from common import print_header

from moe_ds.checkpoint import shared_core_config
from moe_ds.shared_core import SharedCoreExperts
from moe_ds.stats import compression_statistics, compute_ops


def skewed_routing(tokens: int, num_experts: int, top_k: int, seed: int = 0):
    """top-k expert ids [T, k] and normalised weights [T, k] with skewed expert popularity."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.randn(num_experts, generator=g) * 0.5  # log-normal expert preference
    logits = popularity + torch.randn(tokens, num_experts, generator=g)
    gumbel = -torch.log(-torch.log(torch.rand(tokens, num_experts, generator=g)))
    idx = torch.topk(logits + gumbel, top_k, dim=-1).indices
    w = torch.softmax(torch.gather(logits, 1, idx), dim=-1)
    return idx, w


def run_pass(module, pass_name: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
    """One forward ("fwd") or forward + backward of ``module`` on tokens x [T, d], routing idx and w [T, k]."""
    if pass_name == "fwd":
        with torch.no_grad():
            module(x, idx, w)
    else:
        xg = x.detach().requires_grad_()
        module(xg, idx, w).float().square().mean().backward()
        module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 207])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--stock-kernels", nargs="+", default=["grouped_mm"],
                    help="transformers experts kernels to time (add 'eager' for its per-expert loop)")
    ap.add_argument("--implementations", nargs="+", default=["loop", "grouped"], choices=["loop", "grouped"],
                    help="shared-core experts kernels to time (per-expert loop, batched grouped GEMMs)")
    args = ap.parse_args()
    print_header("shared-core experts vs stock transformers experts, Qwen3-30B-A3B layer shape")
    if args.threads:
        torch.set_num_threads(args.threads)
    e, d, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    cfg = T.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                           num_hidden_layers=1, vocab_size=16, num_attention_heads=16, num_key_value_heads=4,
                           head_dim=128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={T.__version__}")
    print(f"# shape: E={e} d={d} I={i} top-{k}; median of {args.repeats} after one warm-up")
    print("| T | dtype | pass | module | rank | ms | time vs stock | MACs vs stock | compute ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        stock = Qwen3MoeExperts(cfg).to(device=device, dtype=dtype)
        with torch.no_grad():
            stock.gate_up_proj.normal_(0, d ** -0.5)
            stock.down_proj.normal_(0, i ** -0.5)
        ours = {}
        for r in args.ranks:
            gen = torch.Generator().manual_seed(r)
            m = SharedCoreExperts.from_dense(stock.gate_up_proj.detach().float().cpu(), stock.down_proj.detach().float().cpu(),
                                             {"gate": r, "up": r, "down": r}, cfg.hidden_act, init_std=0.02,
                                             generator=gen)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "_u_" in name:
                        p.normal_(0, 0.02)
            ours[r] = m.to(device=device, dtype=dtype)
        for tokens in args.tokens:
            x = torch.randn(tokens, d, device=device, dtype=dtype)
            idx, w = skewed_routing(tokens, e, k)
            idx, w = idx.to(device), w.to(device=device, dtype=dtype)
            load = torch.bincount(idx.flatten(), minlength=e).float()
            print(f"# T={tokens} {dtype_name}: expert load max/mean = {(load.max() / load.mean()).item():.2f}")
            for pass_name in args.passes:
                baseline = None
                for impl in args.stock_kernels:
                    cfg._experts_implementation = impl
                    call = partial(run_pass, stock, pass_name, x, idx, w)
                    try:
                        t = time_call(call, args.repeats)
                    except RuntimeError as err:  # a kernel that does not support this dtype/device
                        print(f"| {tokens} | {dtype_name} | {pass_name} | stock ({impl}) | - | n/a: {str(err)[:60]} "
                              "| | | |")
                        continue
                    baseline = t if baseline is None else min(baseline, t)
                    print(f"| {tokens} | {dtype_name} | {pass_name} | stock ({impl}) | - | {t * 1e3:.0f} | | 1.00 | "
                          f"{compute_ops(call)} |")
                for r, m in ours.items():
                    stats = compression_statistics(
                        shared_core_config(cfg, {"gate": r, "up": r, "down": r}), tokens_per_forward=tokens)
                    macs = stats["expert_macs_per_token"]["ratio"]
                    for impl in args.implementations:
                        m.implementation = impl
                        call = partial(run_pass, m, pass_name, x, idx, w)
                        try:
                            t = time_call(call, args.repeats)
                        except RuntimeError as err:  # grouped GEMMs need 16-byte strides and a supported dtype
                            print(f"| {tokens} | {dtype_name} | {pass_name} | shared-core ({impl}) | {r} | "
                                  f"n/a: {str(err)[:60]} | | {macs:.2f} | |")
                            continue
                        print(f"| {tokens} | {dtype_name} | {pass_name} | shared-core ({impl}) | {r} | {t * 1e3:.0f} | "
                              f"{t / baseline:.2f} | {macs:.2f} | {compute_ops(call)} |", flush=True)
    print("# 'time vs stock' divides by the fastest stock kernel timed; 'compute ops' counts the aten ops of one "
          "call (forward, or forward + backward) that do work: a CPU proxy for GPU kernel launches.")


if __name__ == "__main__":
    main()

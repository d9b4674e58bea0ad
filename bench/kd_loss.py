"""Peak memory and time of the chunked top-k KD loss against a dense full-vocabulary KL, side by side.

    .venv/bin/python bench/kd_loss.py                       # V = 151,936 (Qwen3), 4096 positions, k = 64, bf16 logits
    .venv/bin/python bench/kd_loss.py --positions 1024 --dtype float32 --k 16

Each method runs forward + backward in its own process (so peaks do not mix). "extra peak" is the process's
peak resident memory minus its resident memory once the student logits (and, for top-k, the cached top-k
arrays) exist: for the dense KL it includes the teacher's full [positions, V] float32 logits, which is exactly
what the top-k cache avoids holding. On a CUDA machine (``--device cuda``) peaks come from
``torch.cuda.max_memory_allocated`` instead. Times are the median of ``--repeats`` runs after one warm-up.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_ds.kd_loss import chunked_kd_loss, full_vocab_kd_loss  # noqa: E402

GIB = 1024 ** 3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _fill_randn(t: torch.Tensor, scale: float, gen: torch.Generator, rows: int = 256) -> None:
    """Random fill a few rows at a time, so no full-size float32 temporary raises the baseline peak."""
    for s in range(0, t.shape[0], rows):
        t[s:s + rows] = torch.randn(t[s:s + rows].shape, generator=gen) * scale


def worker(a) -> dict:
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    n, v = a.positions, a.vocab
    logits = torch.empty(n, v, dtype=dtype)
    _fill_randn(logits, 2.0, gen)
    logits = logits.to(dev).view(1, n, v).requires_grad_(True)
    labels = torch.randint(0, v, (1, n), generator=gen).to(dev)
    if a.method != "dense":
        # What the cache holds: top-k ids and logits plus the log-partition, [n, k] and [n].
        topk_ids = torch.stack([torch.randperm(v, generator=gen)[:a.k] for _ in range(8)]).repeat(n // 8 + 1, 1)[:n]
        topk_ids = topk_ids.to(dev).view(1, n, a.k)
        topk_logits = (torch.randn(1, n, a.k, generator=gen) * 3 + 5).sort(-1, descending=True).values.to(dev)
        lse = (topk_logits[..., 0] + 2.0).contiguous()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    if a.method == "dense":
        # The teacher's full logits: created after the baseline (their memory is the method's), before the clock.
        teacher = torch.empty(n, v, dtype=torch.float32)
        _fill_randn(teacher, 3.0, gen)
        teacher = teacher.to(dev).view(1, n, v)

    def step():
        logits.grad = None
        if a.method == "dense":
            r = full_vocab_kd_loss(logits, labels, teacher, alpha=0.9, temperature=2.0)
        else:
            r = chunked_kd_loss(logits, labels, topk_ids, topk_logits, lse, alpha=0.9, temperature=2.0,
                                tail=a.method, chunk_size=a.chunk)
        r.loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(a.repeats + 1):  # noqa: B007
        t0 = time.perf_counter()
        step()
        if i:  # the first run is a warm-up (page faults, allocator)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _maxrss()
    return {"method": a.method, "time_s": statistics.median(times), "extra_peak_gib": (peak - base) / GIB,
            "logits_gib": logits.numel() * logits.element_size() / GIB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="positions per chunk of the top-k loss")
    p.add_argument("--dtype", default="bfloat16", help="student logits dtype (bfloat16 | float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.method:
        print(json.dumps(worker(a)))
        return 0
    print(f"KD loss, {a.positions} positions x vocabulary {a.vocab:,}, student logits {a.dtype}, top-k {a.k}, "
          f"chunk {a.chunk}, {a.device}, {a.threads} threads; forward + backward, T = 2, alpha = 0.9")
    results = {}
    for method in ("tail", "renormalize", "dense"):
        cmd = [sys.executable, __file__, "--method", method] + [f"--{k}={v}" for k, v in vars(a).items()
                                                                 if k != "method"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})")
            continue
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    if not results:
        return 1
    logits_gib = next(iter(results.values()))["logits_gib"]
    print(f"(student logits themselves: {logits_gib:.2f} GiB, not counted)")
    names = {"tail": "top-k KD, tail category (ours)", "renormalize": "top-k KD, renormalised (ours)",
             "dense": "dense full-vocabulary KL"}
    dense = results.get("dense")
    print(f"{'method':34s} {'extra peak GiB':>15s} {'time s':>8s} {'peak / dense':>13s} {'time / dense':>13s}")
    for m, r in results.items():
        ratio = (f"{r['extra_peak_gib'] / dense['extra_peak_gib']:13.3f} {r['time_s'] / dense['time_s']:13.3f}"
                 if dense else "")
        print(f"{names[m]:34s} {r['extra_peak_gib']:15.2f} {r['time_s']:8.2f} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

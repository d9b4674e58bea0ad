"""Peak memory and time of the top-k KD loss chunked and unchunked, and of a dense full-vocabulary KL, side by side.

    .venv/bin/python bench/kd_loss.py                       # V = 151,936 (Qwen3), 4096 positions, k = 64, bf16 logits
    .venv/bin/python bench/kd_loss.py --positions 1024 --dtype float32 --k 16

Three methods, each for every tail mode of ``moe_ds.kd_loss.TAIL_MODES`` where it has one:

- chunked: ``chunked_kd_loss`` with ``--chunk`` positions at a time (what distillation runs);
- unchunked: the same function and maths in one chunk (``chunk_size`` = all positions), the baseline for what
  chunking saves;
- dense: ``full_vocab_kd_loss`` with the teacher's full float32 logits, the baseline for what caching only the
  top-k saves.

Two ratios separate the claims: chunked / unchunked (chunking) and unchunked / dense (the top-k cache).
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

import torch
from common import print_header

from moe_ds.kd_loss import TAIL_MODES, chunked_kd_loss, full_vocab_kd_loss

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
    """One method (``a.method``: "dense" or "topk" with ``a.tail`` and ``a.chunk``) in this process."""
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    n, v = a.positions, a.vocab
    logits = torch.empty(n, v, dtype=dtype)
    _fill_randn(logits, 2.0, gen)
    logits = logits.to(dev).view(1, n, v).requires_grad_(True)
    labels = torch.randint(0, v, (1, n), generator=gen).to(dev)
    if a.method == "topk":
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
                                tail=a.tail, chunk_size=a.chunk)
        r.loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return r.loss.item()

    times = []
    for i in range(a.repeats + 1):
        t0 = time.perf_counter()
        loss = step()
        if i:  # the first run is a warm-up (page faults, allocator)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _maxrss()
    return {"time_s": statistics.median(times), "extra_peak_gib": (peak - base) / GIB, "loss": loss,
            "logits_gib": logits.numel() * logits.element_size() / GIB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="positions per chunk of the chunked top-k loss")
    p.add_argument("--dtype", default="bfloat16", help="student logits dtype (bfloat16 | float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--method", choices=["topk", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--tail", choices=TAIL_MODES, default=TAIL_MODES[0], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.method:
        print(json.dumps(worker(a)))
        return 0
    print_header("KD loss: chunked top-k vs unchunked top-k vs dense full-vocabulary KL")
    if a.chunk >= a.positions:
        print(f"warning: --chunk {a.chunk} >= --positions {a.positions}: the chunked rows run in one chunk too")
    print(f"KD loss, {a.positions} positions x vocabulary {a.vocab:,}, student logits {a.dtype}, top-k {a.k}, "
          f"{a.device}, {a.threads} threads; forward + backward, T = 2, alpha = 0.9")
    common = ["--vocab", a.vocab, "--positions", a.positions, "--k", a.k, "--dtype", a.dtype, "--device", a.device,
              "--threads", a.threads, "--repeats", a.repeats]
    runs = {}  # row label -> extra arguments of its worker
    for tail in TAIL_MODES:
        runs[("chunked", tail)] = ["--method", "topk", "--tail", tail, "--chunk", a.chunk]
        runs[("unchunked", tail)] = ["--method", "topk", "--tail", tail, "--chunk", a.positions]
    runs[("dense", None)] = ["--method", "dense"]
    results = {}
    for key, extra in runs.items():
        cmd = [sys.executable, __file__, *map(str, common + extra)]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{key}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})")
            continue
        results[key] = json.loads(out.stdout.strip().splitlines()[-1])
    if not results:
        return 1
    print(f"(student logits themselves: {next(iter(results.values()))['logits_gib']:.2f} GiB, not counted)")

    def label(key):
        how, tail = key
        if how == "dense":
            return "dense full-vocabulary KL (teacher fp32 logits)"
        return f"top-k KD, tail={tail}, " + (f"chunked ({a.chunk} positions)" if how == "chunked" else
                                             f"unchunked (1 chunk of {a.positions})")

    print(f"{'method':58s} {'extra peak GiB':>15s} {'time s':>8s} {'loss':>10s}")
    for key, r in results.items():
        print(f"{label(key):58s} {r['extra_peak_gib']:15.3f} {r['time_s']:8.3f} {r['loss']:10.5f}")
    print(f"{'ratio':58s} {'peak':>15s} {'time':>8s}")
    for tail in TAIL_MODES:
        for num, den, claim in (("chunked", "unchunked", "chunking"), ("unchunked", "dense", "top-k cache")):
            x, y = results.get((num, tail)), results.get((den, None if den == "dense" else tail))
            name = f"tail={tail}: {num} / {den} ({claim})"
            if x is None or y is None:
                print(f"{name:58s} {'n/a':>15s} {'n/a':>8s}")
                continue
            print(f"{name:58s} {x['extra_peak_gib'] / y['extra_peak_gib']:15.3f} {x['time_s'] / y['time_s']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

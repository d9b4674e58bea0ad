"""Teacher-cache format at Qwen3's vocabulary: bytes per token, write throughput, and read throughput as
distillation reads it, from the page cache and cold, beside what one GPU of distillation consumes (estimate).

    .venv/bin/python bench/teacher_cache.py                      # a few minutes on 2 CPU cores
    .venv/bin/python bench/teacher_cache.py --sequences 512 --dir /fast/disk

For each compression setting (none/lzf/gzip, all with byte shuffle where compressed and a Fletcher-32
checksum) and each id distribution, writes a one-shard cache with ``moe_ds.teacher_cache.ShardWriter`` and
reads all of it back the way the distillation stage does: ``DistillDataset`` over ``TeacherCacheDataset`` (its
seeded random order, ``shuffle=True``), a ``SequentialSampler``, ``DistillConfig``'s default batch size and
``default_data_collator``, with 0 workers (the rank reads) and the stage's default worker count. Timing starts
before the DataLoader starts its workers (once per stage in distillation) and ends after the last batch.

"warm" reads find the file in the page cache (it was just written: they measure decoding). "cold" reads first
drop the files from the page cache (fsync, then ``posix_fadvise(POSIX_FADV_DONTNEED)``); the share of the
files' pages still resident is checked with ``mincore(2)`` and printed, so a drop that did not happen (tmpfs,
another reader) shows. The logits are SYNTHETIC (no teacher forward): top-k ids drawn Zipf-distributed over
the vocabulary (frequent BPE tokens have low ids; optimistic for compression) and uniformly (the worst
case), descending logits with exponential gaps below a N(18, 2) maximum, logsumexp with 0-30% of the mass
outside the top-k. Dense fp16 logits (V * 2 bytes per token) are computed, not written.
"""

import argparse
import ctypes
import dataclasses
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import print_header
from transformers import default_data_collator

from moe_ds import teacher_cache as tc
from moe_ds.distill_config import DistillConfig
from moe_ds.distill_trainer import DistillDataset

QWEN3_VOCAB = 151_936
STAGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistillConfig)}


def synthetic_rows(n: int, seq_len: int, k: int, vocab: int, ids: str,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n sequences of synthetic teacher top-k (see the module docstring); ``ids`` is "zipf" or "uniform"."""
    pos = n * seq_len
    if ids == "zipf":
        draws = np.minimum(rng.zipf(1.2, (pos, 4 * k)) - 1, vocab - 1)
    else:
        draws = rng.integers(0, vocab, (pos, 4 * k))
    draws.sort(axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
    draws[dup] = vocab  # push duplicates to the end
    draws.sort(axis=1)
    ids = draws[:, :k]
    short = ids >= vocab  # rare rows with fewer than k distinct draws: fill with uniform ids
    ids[short] = rng.integers(0, vocab, short.sum())
    ids = np.take_along_axis(ids, rng.random(ids.shape).argsort(1), 1)  # order follows logits, not id
    top = rng.normal(18.0, 2.0, (pos, 1))
    logits = top - np.cumsum(rng.exponential(0.35, (pos, k)), axis=1) + 0.35
    tail = rng.beta(2, 5, pos) * 0.3
    lse = np.log(np.exp(logits).sum(1)) - np.log1p(-tail)
    return {"input_ids": rng.integers(0, vocab, (n, seq_len)).astype(np.int32),
            "topk_ids": ids.reshape(n, seq_len, k).astype(np.int32),
            "topk_logits": logits.reshape(n, seq_len, k).astype(np.float16),
            "logsumexp": lse.reshape(n, seq_len).astype(np.float32)}


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to evict the files' pages (dirty pages are written first: DONTNEED skips them)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages in the page cache, by ``mincore(2)`` on a fresh mapping; None if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)  # the mapping keeps the file
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(addr), size, vec)
        libc.munmap(ctypes.c_void_p(addr), size)
        if rc != 0:
            return None
        resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
        total += pages
    return resident / total if total else None


def write_cache(compression: str, rows: dict, meta: tc.CacheMeta, folder: Path, batch: int) -> tuple[Path, dict]:
    """Write ``rows`` as a one-shard cache; its index path and the format row of the table."""
    meta = tc.CacheMeta(**{**meta.to_attrs(), "compression": compression})
    out = folder / f"{compression}.h5"
    n = rows["input_ids"].shape[0]
    t0 = time.perf_counter()
    w = tc.ShardWriter(tc.shard_path(out, 0, 1), meta)
    for s in range(0, n, batch):
        w.append(*(rows[name][s:s + batch] for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    w.finish()
    tc.write_index(out, 1)
    write_s = time.perf_counter() - t0
    size = out.stat().st_size + tc.shard_path(out, 0, 1).stat().st_size
    tokens = n * meta.seq_len
    return out, {"bytes/token": size / tokens, "write tok/s": tokens / write_s, "size MB": size / 1e6}


def read_tok_s(index: Path, workers: int, batch: int, seed: int) -> float:
    """Tokens per second reading the whole cache once as the distillation stage's DataLoader does."""
    cache = tc.TeacherCacheDataset(index)  # validates index and shards (the stage does this once, untimed)
    dataset = DistillDataset(cache, len(cache), seed, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=torch.utils.data.SequentialSampler(dataset),
                                         collate_fn=default_data_collator, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    t0 = time.perf_counter()
    got = sum(b["input_ids"].numel() for b in loader)
    seconds = time.perf_counter() - t0
    cache.close()
    assert got == len(cache) * cache.meta.seq_len
    return got / seconds


def gpu_tokens_per_s(active_params: float, peak_tflops: float, mfu: float) -> float:
    """Tokens/s one GPU trains at ``6 * active_params`` FLOP per token (forward + backward)."""
    return mfu * peak_tflops * 1e12 / (6 * active_params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--write-batch", type=int, default=8, help="sequences per append (one teacher batch)")
    p.add_argument("--read-batch", type=int, default=STAGE_DEFAULTS["batch_size"],
                   help="sequences per read batch (default: DistillConfig.batch_size)")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({0, STAGE_DEFAULTS["dataloader_num_workers"]}),
                   help="DataLoader worker counts to read with (default: 0 and DistillConfig's default)")
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    p.add_argument("--active-params", type=float, default=3.35e9,
                   help="active parameters per token of the student, for the GPU estimate (Qwen3-30B-A3B)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: ~989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the estimate")
    a = p.parse_args()
    print_header("teacher cache: bytes/token, write and read throughput (warm and cold page cache)")
    torch.set_num_threads(1)
    meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name="synthetic", teacher_config_hash="-",
                        tokenizer_name="synthetic", tokenizer_hash="-", tokenizer_size=a.vocab, vocab_size=a.vocab,
                        k=a.top_k, seq_len=a.seq_len, dataset="synthetic top-k (bench/teacher_cache.py)",
                        logits_dtype="float16", teacher_dtype="synthetic", compression="none", world_size=1)
    tokens = a.sequences * a.seq_len
    dense = a.vocab * 2
    need = gpu_tokens_per_s(a.active_params, a.gpu_tflops, a.mfu)
    print(f"{tokens} tokens ({a.sequences} x {a.seq_len}), V = {a.vocab}, k = {a.top_k}, SYNTHETIC logits; "
          f"1 writer process; reads as distillation: DistillDataset order (seeded, shuffle), SequentialSampler, "
          f"batch {a.read_batch}, default_data_collator, DataLoader workers {a.workers}")
    print(f"ESTIMATE (not measured) of what one GPU of distillation consumes: {need:,.0f} tok/s = "
          f"{a.mfu:.0%} MFU x {a.gpu_tflops:g} TFLOP/s dense bf16 peak / (6 x {a.active_params:.3g} FLOP per token).")
    print("  Assumes: the student has Qwen3-30B-A3B's active parameters (3.35e9 incl. embeddings), every one "
          "trained; the teacher is not run (its top-k is cached); attention-score FLOPs ignored (~+12% at 2,048 "
          "tokens). Frozen weights skip their weight gradients (down to ~4N FLOP/token: up to 1.5x more tok/s).")
    results = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        print(f"\nformat ({folder}):")
        print(f"{'ids':<9}{'setting':<14}{'bytes/token':>12}{'vs dense':>10}{'size MB':>10}{'write tok/s':>14}")
        print(f"{'-':<9}{'dense fp16':<14}{dense:>12,.0f}{1:>9.0f}x{dense * tokens / 1e6:>10.0f}{'(computed)':>14}")
        for ids in ("zipf", "uniform"):
            rows = synthetic_rows(a.sequences, a.seq_len, a.top_k, a.vocab, ids, np.random.default_rng(0))
            for compression in tc.COMPRESSIONS:
                index, r = write_cache(compression, rows, meta, Path(folder) / ids, a.write_batch)
                print(f"{ids:<9}{compression:<14}{r['bytes/token']:>12,.1f}{dense / r['bytes/token']:>9.0f}x"
                      f"{r['size MB']:>10.1f}{r['write tok/s']:>14,.0f}", flush=True)
                files = [index, tc.shard_path(index, 0, 1)]
                for cache in ("warm", "cold"):
                    for w in a.workers:
                        if cache == "cold":
                            drop_from_page_cache(files)
                        resident = resident_fraction(files)
                        results[ids, compression, cache, w] = (read_tok_s(index, w, a.read_batch, 0), resident)
            del rows

        print(f"\nread, whole cache once ('resident': share of the files in the page cache just before the read, "
              f"by mincore; 'x GPU': read tok/s / the GPU estimate {need:,.0f} tok/s):")
        head = f"{'ids':<9}{'setting':<9}{'page cache':<12}"
        for w in a.workers:
            head += f"{f'{w} workers: resident':>22}{'tok/s':>12}{'x GPU':>8}"
        print(head)
        unverified, not_dropped = False, []
        for ids in ("zipf", "uniform"):
            for compression in tc.COMPRESSIONS:
                for cache in ("warm", "cold"):
                    line = f"{ids:<9}{compression:<9}{cache:<12}"
                    for w in a.workers:
                        tok_s, resident = results[ids, compression, cache, w]
                        if resident is None:
                            unverified = True
                        elif cache == "cold" and resident > 0.05:
                            not_dropped.append(f"{ids}/{compression}/{w} workers ({resident:.0%} resident)")
                        shown = "unknown" if resident is None else f"{resident:.0%}"
                        line += f"{shown:>22}{tok_s:>12,.0f}{tok_s / need:>7.1f}x"
                    print(line)
    if unverified:
        print("cold cache NOT VERIFIED: mincore was unavailable; compare the cold rows' times with the warm ones")
    elif not_dropped:
        print("cold cache NOT ACHIEVED for: " + "; ".join(not_dropped) + " (the file system kept the pages)")
    else:
        print("cold cache verified: <= 5% of each file's pages resident before every cold read")
    print("With 0 workers the rank reads between steps (not overlapped with compute): reading adds 1 / (x GPU) "
          "to the step time. With workers the read overlaps compute; a node's ranks each need their own share.")
    print("goal: <= 400 bytes/token, and reads well above what a GPU consumes (x GPU >> 1)")


if __name__ == "__main__":
    main()

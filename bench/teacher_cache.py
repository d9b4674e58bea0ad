"""Teacher-cache format at Qwen3's vocabulary: bytes per token, write and random-read throughput.

    .venv/bin/python bench/teacher_cache.py                      # ~1 min on 2 CPU cores
    .venv/bin/python bench/teacher_cache.py --sequences 512 --dir /fast/disk

For each compression setting (none/lzf/gzip, all with byte shuffle where compressed and a Fletcher-32
checksum) and each id distribution, writes a one-shard cache with ``moe_ds.teacher_cache.ShardWriter`` and
reads it back in random order through ``TeacherCacheDataset`` with 2 DataLoader workers (the file sits in the
page cache, so reads measure decoding, not the disk). The logits are SYNTHETIC (no teacher forward): top-k ids
drawn Zipf-distributed over the vocabulary (frequent BPE tokens have low ids; optimistic for compression) and
uniformly (the worst case), descending logits with exponential gaps below a N(18, 2) maximum, logsumexp with
0-30% of the mass outside the top-k. Dense fp16 logits (V * 2 bytes per token) are computed, not written.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_ds import teacher_cache as tc

QWEN3_VOCAB = 151_936


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


def bench(compression: str, rows: dict, meta: tc.CacheMeta, folder: Path, batch: int) -> dict:
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

    ds = tc.TeacherCacheDataset(out)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    got = sum(b["input_ids"].numel() for b in loader)
    read_s = time.perf_counter() - t0
    tokens = n * meta.seq_len
    assert got == tokens
    return {"compression": compression, "bytes/token": size / tokens, "write tok/s": tokens / write_s,
            "read tok/s": tokens / read_s, "size MB": size / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--write-batch", type=int, default=8, help="sequences per append (one teacher batch)")
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(1)
    meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name="synthetic", teacher_config_hash="-",
                        tokenizer_name="synthetic", tokenizer_hash="-", tokenizer_size=a.vocab, vocab_size=a.vocab,
                        k=a.top_k, seq_len=a.seq_len, dataset="synthetic top-k (bench/teacher_cache.py)",
                        logits_dtype="float16", teacher_dtype="synthetic", compression="none", world_size=1)
    tokens = a.sequences * a.seq_len
    dense = a.vocab * 2
    print(f"teacher cache bench: {tokens} tokens ({a.sequences} x {a.seq_len}), V = {a.vocab}, k = {a.top_k}, "
          "SYNTHETIC logits; 1 writer process, reads in random order with 2 DataLoader workers (file in page cache)")
    print(f"{'ids':<9}{'setting':<14}{'bytes/token':>12}{'vs dense':>10}{'size MB':>10}{'write tok/s':>14}"
          f"{'read tok/s':>13}")
    print(f"{'-':<9}{'dense fp16':<14}{dense:>12,.0f}{1:>9.0f}x{dense * tokens / 1e6:>10.0f}{'(computed)':>14}"
          f"{'-':>13}")
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        for ids in ("zipf", "uniform"):
            rows = synthetic_rows(a.sequences, a.seq_len, a.top_k, a.vocab, ids, np.random.default_rng(0))
            for compression in tc.COMPRESSIONS:
                r = bench(compression, rows, meta, Path(folder) / ids, a.write_batch)
                print(f"{ids:<9}{compression:<14}{r['bytes/token']:>12,.1f}{dense / r['bytes/token']:>9.0f}x"
                      f"{r['size MB']:>10.1f}{r['write tok/s']:>14,.0f}{r['read tok/s']:>13,.0f}")
    # What a distillation rank consumes: a 30B-A3B student (~3.3e9 active parameters, ~6 * 3.3e9 FLOP per
    # token for forward + backward, plus the frozen parts' forward) at 40% of an H100's ~990 dense bf16
    # TFLOP/s is ~2e4 tokens/s per GPU; a CPU rank of the toy pipeline consumes a few hundred.
    print("goal: <= 400 bytes/token; a distillation rank consumes roughly 2e4 tok/s "
          "(30B-A3B student, H100, 40% MFU; estimate)")


if __name__ == "__main__":
    main()

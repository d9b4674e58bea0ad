"""Teacher top-k cache: format round trip, validation of bad input, and the real 2-rank caching pass."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models

from conftest import REPO, SHARED_DATA, launcher_env, load_launcher, tiny_model
from moe_ds import teacher_cache as tc
from moe_ds.cache_teacher import (RUN_CONFIG, STOP_AFTER_ENV, CacheTeacherConfig, CacheTeacherError, cache_teacher,
                                  check_teacher_vocab, load_teacher, teacher_topk)
from moe_ds.cli import run
from moe_ds.corpus import CorpusError, load_corpus, pack_sequences

WIKITEXT = SHARED_DATA / "wikitext2_raw_test_docs.jsonl"


def _meta(**kw) -> tc.CacheMeta:
    base = {"format_version": tc.FORMAT_VERSION, "teacher_name": "t", "teacher_config_hash": "c",
            "tokenizer_name": "tok", "tokenizer_hash": "h", "tokenizer_size": 50, "vocab_size": 64, "k": 4,
            "seq_len": 8, "dataset": "d", "logits_dtype": "float16", "teacher_dtype": "float32@cpu",
            "compression": "lzf", "world_size": 2}
    base.update(kw)
    return tc.CacheMeta(**base)


def _random_rows(n: int, meta: tc.CacheMeta, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    t, k, v = meta.seq_len, meta.k, meta.vocab_size
    logits = g.normal(0, 3, (n, t, v)).astype(np.float32)
    ids = np.argsort(-logits, axis=-1)[..., :k]
    return {"input_ids": g.integers(0, meta.tokenizer_size, (n, t)).astype(np.int32),
            "topk_ids": ids.astype(np.int32),
            "topk_logits": np.take_along_axis(logits, ids, -1).astype(np.float16),
            "logsumexp": np.log(np.exp(logits).sum(-1)).astype(np.float32)}


def _write_cache(out: Path, meta: tc.CacheMeta, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``n`` random sequences as a 2-shard cache the way the ranks do; returns them in global order."""
    rows = _random_rows(n, meta, seed)
    for r in range(meta.world_size):
        w = tc.ShardWriter(tc.shard_path(out, r, meta.world_size), meta, overwrite=True)
        sel = slice(r, n, meta.world_size)
        part = {name: a[sel] for name, a in rows.items()}
        w.append(part["input_ids"][:2], part["topk_ids"][:2], part["topk_logits"][:2], part["logsumexp"][:2])
        w.append(part["input_ids"][2:], part["topk_ids"][2:], part["topk_logits"][2:], part["logsumexp"][2:])
        w.finish()
    tc.write_index(out, meta.world_size)
    return rows


# ----------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("compression", tc.COMPRESSIONS)
def test_roundtrip_exact_through_reader_vds_and_workers(tmp_path, compression):
    meta = _meta(compression=compression)
    out = tmp_path / "c.h5"
    rows = _write_cache(out, meta, n=7)
    ds = tc.TeacherCacheDataset(out)
    assert len(ds) == 7 and ds.meta.num_tokens == 56 and ds.meta.compression == compression
    for i in range(7):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (8,)
        assert item["topk_ids"].dtype == torch.int64 and item["topk_ids"].shape == (8, 4)
        assert item["topk_logits"].dtype == torch.float32 and item["logsumexp"].dtype == torch.float32
        for name in rows:
            np.testing.assert_array_equal(item[name].numpy(), rows[name][i].astype(item[name].numpy().dtype))
    with h5py.File(out) as f:  # the index's virtual datasets present the shards in global order
        for name in rows:
            np.testing.assert_array_equal(f[name][:], rows[name])
    # Lazy per-worker handles: 2 forked workers read everything exactly once.
    seen = torch.cat([b["input_ids"] for b in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)])
    np.testing.assert_array_equal(seen.numpy(), rows["input_ids"])


def test_index_survives_moving_the_folder(tmp_path):
    rows = _write_cache(tmp_path / "a" / "c.h5", _meta(), n=5)
    (tmp_path / "a").rename(tmp_path / "b")
    with h5py.File(tmp_path / "b" / "c.h5") as f:
        np.testing.assert_array_equal(f["topk_ids"][:], rows["topk_ids"])
    assert len(tc.TeacherCacheDataset(tmp_path / "b" / "c.h5")) == 5


def test_logprobs_and_tail_mass_match_full_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 100, generator=g) * 4
    ids, vals, lse = teacher_topk(logits, k=10, chunk=2)
    full = logits.log_softmax(-1)
    torch.testing.assert_close(tc.topk_logprobs(vals, lse), full.gather(-1, ids.long()), rtol=0, atol=1e-5)
    outside = full.exp().sum(-1) - full.exp().gather(-1, ids.long()).sum(-1)
    torch.testing.assert_close(tc.tail_mass(vals, lse), outside, rtol=0, atol=1e-5)
    assert ids.dtype == torch.int32 and lse.dtype == torch.float32
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ids.numpy(), logits.topk(10, -1).indices.numpy())


def test_teacher_topk_refuses_nonfinite_logits():
    logits = torch.zeros(1, 4, 10)
    logits[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        teacher_topk(logits, 2)


def test_writer_resumes_after_unflushed_rows_and_refuses_another_run(tmp_path):
    meta = _meta(world_size=1)
    path = tc.shard_path(tmp_path / "c.h5", 0, 1)
    rows = _random_rows(5, meta, 1)
    w = tc.ShardWriter(path, meta)
    w.append(*(rows[n][:2] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    # Rows written but not yet counted (a kill between the data write and the count update).
    w._f["input_ids"].resize(4, axis=0)
    w._f.flush()
    w._f.close()
    with pytest.raises(tc.CacheFormatError, match="incomplete"):
        tc.read_meta(path)
    w = tc.ShardWriter(path, meta)
    assert w.num_done == 2 and not w.complete
    w.append(*(rows[n][2:] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    assert w.finish().num_sequences == 5
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["topk_logits"][:], rows["topk_logits"])
    with pytest.raises(tc.CacheFormatError, match=r"different run \(k: existing 4 != requested 5"):
        tc.ShardWriter(path, _meta(world_size=1, k=5))
    w = tc.ShardWriter(path, _meta(world_size=1, k=5), overwrite=True)
    assert w.num_done == 0 and not path.exists()


def test_writer_refuses_bad_rows(tmp_path):
    meta = _meta(world_size=1)
    w = tc.ShardWriter(tmp_path / "s.h5", meta)
    rows = _random_rows(1, meta, 0)
    bad = dict(rows, topk_logits=np.full_like(rows["topk_logits"], np.inf))
    with pytest.raises(ValueError, match="float16"):
        w.append(*(bad[n] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    bad = dict(rows, topk_ids=rows["topk_ids"] + 64)
    with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
        w.append(*(bad[n] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    with pytest.raises(ValueError, match="shape"):
        w.append(rows["input_ids"][:, :4], rows["topk_ids"], rows["topk_logits"], rows["logsumexp"])
    assert not (tmp_path / "s.h5").exists()  # nothing written for refused rows


def _stopped_shard(path: Path, meta: tc.CacheMeta, n: int = 3) -> dict[str, np.ndarray]:
    """A shard with ``n`` flushed rows that was never finished (a stopped run)."""
    rows = _random_rows(n, meta, 2)
    w = tc.ShardWriter(path, meta)
    w.append(*(rows[n] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    w.close()
    return rows


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "no attributes"])
def test_writer_moves_an_unreadable_shard_aside_and_restarts(tmp_path, caplog, damage):
    """A full disk or a kill can leave a shard HDF5 cannot open (its "truncated file ... sblock" message once
    read as a lock, so every rerun refused): it is renamed, never deleted, and its sequences recomputed."""
    meta = _meta(world_size=1)
    path = tc.shard_path(tmp_path / "c.h5", 0, 1)
    _stopped_shard(path, meta)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    else:  # killed between creating the file and writing its attributes
        with h5py.File(path, "w") as f:
            f.create_dataset("input_ids", shape=(0, 8), maxshape=(None, 8), dtype=np.int32)
    damaged = path.read_bytes()
    w = tc.ShardWriter(path, meta)
    assert w.num_done == 0 and not w.complete and not path.exists()
    aside = path.with_name(path.name + ".broken")
    assert aside.read_bytes() == damaged
    assert f"{path} cannot be resumed" in caplog.text and f"moved it to {aside}" in caplog.text
    assert "recomputing its sequences" in caplog.text
    rows = _random_rows(2, meta, 3)
    w.append(*(rows[n] for n in ("input_ids", "topk_ids", "topk_logits", "logsumexp")))
    assert w.finish().num_sequences == 2
    path.write_bytes(b"")  # damaged again: the first copy set aside stays
    tc.ShardWriter(path, meta)
    assert aside.read_bytes() == damaged and path.with_name(path.name + ".broken-2").read_bytes() == b""


def test_writer_refuses_a_shard_open_in_another_process(tmp_path):
    meta = _meta(world_size=1)
    path = tc.shard_path(tmp_path / "c.h5", 0, 1)
    _stopped_shard(path, meta)
    holder = subprocess.Popen([sys.executable, "-c", (f"import h5py, sys, time; f = h5py.File({str(path)!r}, 'a'); "
                               "print('open', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = path.read_bytes()
        with pytest.raises(tc.CacheFormatError, match="is open in another process"):
            tc.ShardWriter(path, meta)
        assert path.read_bytes() == before and not path.with_name(path.name + ".broken").exists()
    finally:
        holder.kill()
        holder.wait()


_FULL_DISK_WRITER = """
import resource, sys
import numpy as np
from moe_ds import teacher_cache as tc
meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name="t", teacher_config_hash="c", tokenizer_name="tok",
                    tokenizer_hash="h", tokenizer_size=50, vocab_size=64, k=8, seq_len=64, dataset="d",
                    logits_dtype="float16", teacher_dtype="float32@cpu", compression="lzf", world_size=1)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
w, g = tc.ShardWriter(sys.argv[1], meta), np.random.default_rng(0)
try:
    for i in range(40):
        w.append(g.integers(0, 50, (1, 64)), g.integers(0, 64, (1, 64, 8)), g.normal(size=(1, 64, 8)),
                 g.normal(size=(1, 64)))
    w.finish()
except Exception as e:  # OSError or RuntimeError, errno 27 (EFBIG) in either
    print("EFBIG", getattr(e, "errno", None) == 27 or "errno = 27" in str(e))
    w.close()  # what the caching pass does after any error: a no-op now
"""


@pytest.mark.parametrize("limit", [3000, 20_000, 61_000])
def test_writer_full_disk_is_one_exception_and_a_clean_exit(tmp_path, limit):
    """HDF5 cannot flush or close a file after a failed write: its chunk cache reported the failure only while
    freeing handles (as 'Exception ignored' noise) and the next flush crashed the process (SIGSEGV)."""
    path = tmp_path / "s.h5"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(path), str(limit)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout, proc.stderr) == ("EFBIG True\n", ""), proc.stdout + proc.stderr[-3000:]
    w = tc.ShardWriter(path, _meta(world_size=1, k=8, seq_len=64, tokenizer_size=50, vocab_size=64))
    assert w.num_done == 0 or w._f is not None  # set aside, or resumed from its last flushed batch
    w.close()


def test_writer_leaves_a_complete_shard_closed(tmp_path):
    """A complete shard is not held open: the index can be written from it in the same or another process."""
    meta = _meta(world_size=1)
    path = tc.shard_path(tmp_path / "c.h5", 0, 1)
    _write_cache(tmp_path / "c.h5", meta, n=4)
    before = path.read_bytes()
    w = tc.ShardWriter(path, meta)
    assert w.complete and w.num_done == 4 and w._f is None
    assert path.read_bytes() == before
    with h5py.File(path, "r+"):  # no handle of ours keeps it open
        pass


# ----------------------------------------------------------------------------------------------- bad files

def test_truncated_file_is_named(tmp_path):
    out = tmp_path / "c.h5"
    _write_cache(out, _meta(), n=5)
    shard = tc.shard_path(out, 1, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(tc.CacheFormatError, match=r"rank-00001-of-00002.h5: cannot open as HDF5 \(truncated"):
        tc.TeacherCacheDataset(out)
    index = out.read_bytes()
    out.write_bytes(index[:100])
    with pytest.raises(tc.CacheFormatError, match=r"c.h5: cannot open as HDF5 \(truncated"):
        tc.TeacherCacheDataset(out)


_FULL_DISK_SWEEP = """
import resource, sys
import numpy as np
from moe_ds import teacher_cache as tc
meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name="t", teacher_config_hash="c", tokenizer_name="tok",
                    tokenizer_hash="h", tokenizer_size=50, vocab_size=64, k=8, seq_len=64, dataset="d",
                    logits_dtype="float16", teacher_dtype="float32@cpu", compression="lzf", world_size=1)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for limit in range(2000, 64000, 1000):
    path = f"{sys.argv[1]}/s{limit}.h5"
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    w, g = tc.ShardWriter(path, meta), np.random.default_rng(0)
    try:
        for i in range(40):
            w.append(g.integers(0, 50, (1, 64)), g.integers(0, 64, (1, 64, 8)), g.normal(size=(1, 64, 8)),
                     g.normal(size=(1, 64)))
        w.finish()
    except Exception:
        w.close()
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        tc.read_meta(path)
    except tc.CacheFormatError:
        pass
    except Exception as e:
        print(limit, type(e).__name__, e)
"""


def test_shard_stopped_by_a_full_disk_anywhere_is_a_cache_format_error(tmp_path):
    """A full disk can stop a shard's write inside its attribute storage: HDF5 opens the file, and reading an
    attribute raised a bare OSError ("address of object past end of allocation") instead of a cache error
    (found by tests/test_faults_cache.py at 40% of a shard). Here every 1000th byte up to the whole shard."""
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_SWEEP, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout[-3000:] + proc.stderr[-3000:]


def test_corrupted_chunk_is_caught_by_checksum(tmp_path):
    meta = _meta(compression="none", world_size=1)
    out = tmp_path / "c.h5"
    _write_cache(out, meta, n=3)
    shard = tc.shard_path(out, 0, 1)
    with h5py.File(shard) as f:
        offset = f["topk_logits"].id.get_chunk_info(1).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ds = tc.TeacherCacheDataset(out)
    ds[0]  # other chunks still read
    with pytest.raises(tc.CacheFormatError, match="cannot read sequence 1 .* corrupted"):
        ds[1]


def test_missing_attribute_unknown_version_and_incomplete(tmp_path):
    out = tmp_path / "c.h5"
    _write_cache(out, _meta(), n=4)
    with h5py.File(out, "a") as f:
        del f.attrs["tokenizer_hash"]
    with pytest.raises(tc.CacheFormatError, match="missing attribute.*tokenizer_hash"):
        tc.TeacherCacheDataset(out)
    _write_cache(out, _meta(), n=4)
    with h5py.File(out, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(tc.CacheFormatError, match="unknown format version 99"):
        tc.TeacherCacheDataset(out)
    _write_cache(out, _meta(), n=4)
    with h5py.File(tc.shard_path(out, 0, 2), "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(tc.CacheFormatError, match="rank-00000-of-00002.h5: incomplete"):
        tc.TeacherCacheDataset(out)
    with pytest.raises(tc.CacheFormatError, match="incomplete"):
        tc.write_index(out, 2)
    tc.shard_path(out, 0, 2).unlink()
    with pytest.raises(tc.CacheFormatError, match="no such cache file"):
        tc.TeacherCacheDataset(out)
    with pytest.raises(tc.CacheFormatError, match="no such cache file"):
        tc.TeacherCacheDataset(tmp_path / "absent.h5")


def test_tokenizer_and_vocab_checks(tmp_path, tiny_tokenizer):
    _, digest, size = tc.tokenizer_fingerprint(tiny_tokenizer)
    meta = _meta(tokenizer_hash=digest, tokenizer_size=size, vocab_size=size + 16, world_size=1)
    out = tmp_path / "c.h5"
    _write_cache(out, meta, n=2)
    tc.TeacherCacheDataset(out, tokenizer=tiny_tokenizer, vocab_size=size + 16)  # same tokenizer: fine
    other = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str()),
                                      eos_token="<|endoftext|>")
    other.add_tokens(["<extra>"])
    with pytest.raises(tc.TokenizerMismatchError, match=f"has {size + 1} tokens.*{size} tokens"):
        tc.TeacherCacheDataset(out, tokenizer=other)
    vocab = dict(tiny_tokenizer.get_vocab())
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    swapped = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")))
    with pytest.raises(tc.TokenizerMismatchError, match="maps tokens to ids differently"):
        tc.check_tokenizer_compatible(meta, swapped)
    with pytest.raises(tc.TokenizerMismatchError, match=f"student logits have {size} entries"):
        tc.TeacherCacheDataset(out, vocab_size=size)


def test_teacher_vocab_checks():
    check_teacher_vocab(vocab_size=336, tokenizer_size=320, k=64)  # padded teacher vocabulary is fine
    with pytest.raises(CacheTeacherError, match="tokenizer has 320 tokens but the teacher's vocabulary has only 300"):
        check_teacher_vocab(vocab_size=300, tokenizer_size=320, k=8)
    with pytest.raises(CacheTeacherError, match="--top-k 400 is larger than the teacher's vocabulary of 320"):
        check_teacher_vocab(vocab_size=320, tokenizer_size=320, k=400)


def test_config_range_checks(tmp_path):
    ok = {"teacher": "t", "data": "d", "output": str(tmp_path / "c.h5")}
    for bad, match in [({"top_k": 0}, "top_k"), ({"seq_len": 0}, "seq_len"), ({"compression": "zstd"}, "zstd"),
                       ({"quantize": "3bit"}, "3bit"), ({"dtype": "fp8"}, "fp8"), ({"output": "c.hdf"}, ".h5"),
                       ({"max_sequences": 0}, "max_sequences"), ({"gzip_level": 12}, "gzip_level")]:
        with pytest.raises(CacheTeacherError, match=match):
            CacheTeacherConfig(**{**ok, **bad})


# ----------------------------------------------------------------------------------------------- corpus

def _reference_pack(texts, tokenizer, seq_len):
    stream = []
    for t in texts:
        if t:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def test_pack_matches_reference_and_is_independent_of_batching(tiny_tokenizer, stdlib_text):
    texts = [stdlib_text[i:i + 700] for i in range(0, 20_000, 700)] + [""]
    ref = _reference_pack(texts, tiny_tokenizer, 50)
    for batch_docs in (1, 7, 1000):
        got = list(pack_sequences(texts, tiny_tokenizer, 50, batch_docs=batch_docs))
        assert [g.tolist() for g in got] == ref and all(g.dtype == np.int32 for g in got)
    assert [g.tolist() for g in pack_sequences(texts, tiny_tokenizer, 50, max_sequences=3, batch_docs=2)] == ref[:3]


def test_empty_and_short_corpora(tiny_tokenizer):
    with pytest.raises(CorpusError, match="empty"):
        list(pack_sequences(["", ""], tiny_tokenizer, 16))
    with pytest.raises(CorpusError, match=r"only \d+ tokens \(1 documents\), fewer than one sequence of 4096"):
        list(pack_sequences(["def f(): pass"], tiny_tokenizer, 4096))


def test_local_formats_and_text_field(tmp_path):
    rows = [{"id": 1, "body": "alpha beta"}, {"id": 2, "body": "gamma"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(load_corpus(str(tmp_path / "a.jsonl")).documents) == ["alpha beta", "gamma"]  # only string field
    import datasets
    datasets.Dataset.from_list([{"text": "one", "x": "y"}, {"text": "two", "x": "z"}]).to_parquet(
        str(tmp_path / "p.parquet"))
    corpus = load_corpus(str(tmp_path / "p.parquet"))
    assert list(corpus.documents) == ["one", "two"] and "field=text" in corpus.description
    assert list(load_corpus(str(tmp_path / "p.parquet"), text_field="x").documents) == ["y", "z"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text("second\nfile\n")
    (tmp_path / "t" / "a.txt").write_text("first file\n")
    assert list(load_corpus(str(tmp_path / "t")).documents) == ["first file\n", "second\nfile\n"]
    with pytest.raises(CorpusError, match="no field 'nope'"):
        list(load_corpus(str(tmp_path / "p.parquet"), text_field="nope").documents)
    (tmp_path / "two.jsonl").write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(CorpusError, match="pass --text-field"):
        list(load_corpus(str(tmp_path / "two.jsonl")).documents)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    # Hub names stream from the network; offline (as in CI) the error says what was tried.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        with pytest.raises(CorpusError, match="neither a local file nor a loadable hub dataset"):
            list(load_corpus("no-such-owner/no-such-dataset").documents)


def test_jsonl_zero_bytes_is_an_empty_corpus(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    name = str(tmp_path / "empty.jsonl")
    with pytest.raises(CorpusError, match=f"^{name} is empty: it holds no non-empty text$"):
        list(pack_sequences(load_corpus(name).documents, tiny_tokenizer, 16, name=name))


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    good = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5000))
    (tmp_path / "bad.jsonl").write_text(good + '{"text": "x"\n' + good)
    with pytest.raises(CorpusError, match=r"bad.jsonl: line 5001 is not valid JSON \(Expecting ',' delimiter at "
                                          r"column 13\)$"):
        list(load_corpus(str(tmp_path / "bad.jsonl")).documents)
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(CorpusError, match=r"list.jsonl: line 2 holds a JSON list, not an object"):
        list(load_corpus(str(tmp_path / "list.jsonl")).documents)
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.jsonl").write_text(good)
    (folder / "b.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"two/b.jsonl: line 3 is not valid JSON"):
        list(load_corpus(str(folder)).documents)


def test_jsonl_documents_equal_the_datasets_reader(tmp_path):
    """The JSONL reader yields what ``datasets``' json builder does (a cache's contents do not change)."""
    import datasets

    rows = [{"text": "plain"}, {"text": "tab\tquote\" unicode é 中文 \u2028 emoji 😀"}, {"text": ""},
            {"text": "last", "meta": {"n": 1}}]
    body = "\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n\n"
    (tmp_path / "a.jsonl").write_text(body)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(body)
    for name in ("a.jsonl", "b.jsonl.gz"):
        ref = [r["text"] for r in datasets.load_dataset("json", data_files=str(tmp_path / name), split="train",
                                                         streaming=True)]
        corpus = load_corpus(str(tmp_path / name))
        assert list(corpus.documents) == ref
        assert corpus.description == f"json:{(tmp_path / name).resolve()} field=text"


# ----------------------------------------------------------------------------------------------- the pass, in process

def _jsonl(path: Path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.mark.parametrize("texts, match", [([""] * 3, "empty"), (["tiny text"], "fewer than one sequence")])
def test_pass_refuses_empty_or_short_corpus_and_writes_nothing(tmp_path, tiny_lm_dir, texts, match):
    cfg = CacheTeacherConfig(teacher=str(tiny_lm_dir), data=_jsonl(tmp_path / "c.jsonl", texts),
                             output=str(tmp_path / "out" / "c.h5"), top_k=4, seq_len=64)
    with pytest.raises(CorpusError, match=match):
        cache_teacher(cfg)
    assert not (tmp_path / "out").exists()


def test_pass_refuses_teacher_smaller_than_tokenizer(tmp_path, tiny_tokenizer, stdlib_text):
    teacher = tmp_path / "teacher"
    tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer) - 20).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    cfg = CacheTeacherConfig(teacher=str(teacher), data=_jsonl(tmp_path / "c.jsonl", [stdlib_text[:3000]]),
                             output=str(tmp_path / "out" / "c.h5"), top_k=4, seq_len=32)
    with pytest.raises(CacheTeacherError, match="tokenizer has 320 tokens but the teacher's vocabulary has only 300"):
        cache_teacher(cfg)
    assert not (tmp_path / "out").exists()


def test_pass_single_process_and_quantized_teacher(tmp_path, tiny_lm_dir, stdlib_text):
    """One plain process (world size 1). An 8-bit MoE teacher is refused before anything is written: bitsandbytes
    would leave its fused experts fp32 (tests/test_cache_loading.py: the refusal, and a dense 8-bit teacher)."""
    data = _jsonl(tmp_path / "c.jsonl", [stdlib_text[i:i + 2000] for i in range(0, 20_000, 2000)])
    base = {"teacher": str(tiny_lm_dir), "data": data, "top_k": 8, "seq_len": 32, "max_sequences": 6, "batch_size": 4}
    fp32 = cache_teacher(CacheTeacherConfig(**base, output=str(tmp_path / "fp32.h5")))
    assert fp32.num_sequences == 6 and fp32.world_size == 1 and fp32.teacher_dtype == "float32@cpu"
    resolved = json.loads((tc.shard_dir(tmp_path / "fp32.h5") / RUN_CONFIG).read_text())
    assert resolved == asdict(CacheTeacherConfig(**base, output=str(tmp_path / "fp32.h5")))
    with pytest.raises(CacheTeacherError, match="holds its experts as 4 fused 3-D weights"):
        cache_teacher(CacheTeacherConfig(**base, output=str(tmp_path / "q8.h5"), quantize="8bit"))
    assert not (tmp_path / "q8.h5").exists() and not tc.shard_dir(tmp_path / "q8.h5").exists()


def test_pass_refuses_missing_teacher_and_writes_nothing(tmp_path):
    cfg = CacheTeacherConfig(teacher=str(tmp_path / "no-teacher"), data=_jsonl(tmp_path / "c.jsonl", ["text"]),
                             output=str(tmp_path / "out" / "c.h5"))
    with pytest.raises(CacheTeacherError, match="no-teacher' is not a local folder and not a Hub id of the form"):
        cache_teacher(cfg)
    assert not (tmp_path / "out").exists()


def test_quantize_without_bitsandbytes_says_so(monkeypatch, tiny_lm_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cfg = CacheTeacherConfig(teacher=str(tiny_lm_dir), data="d.jsonl", output=str(tmp_path / "c.h5"), quantize="4bit")
    with pytest.raises(CacheTeacherError, match="--quantize 4bit needs bitsandbytes"):
        load_teacher(cfg, torch.device("cpu"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def small_pass(tmp_path, tiny_lm_dir, stdlib_text) -> CacheTeacherConfig:
    data = _jsonl(tmp_path / "c.jsonl", [stdlib_text[i:i + 2000] for i in range(0, 20_000, 2000)])
    return CacheTeacherConfig(teacher=str(tiny_lm_dir), data=data, output=str(tmp_path / "out" / "c.h5"), top_k=8,
                              seq_len=32, max_sequences=6, batch_size=4)


def test_rerun_of_a_finished_cache_returns_at_once_and_changes_nothing(tmp_path, small_pass, capsys):
    first = cache_teacher(small_pass)
    before = _snapshot(tmp_path / "out")
    capsys.readouterr()
    t0 = time.time()
    again = cache_teacher(small_pass)
    assert time.time() - t0 < 10
    assert again == first
    assert _snapshot(tmp_path / "out") == before  # byte-identical: index, shard and cache_config.json
    assert f"{small_pass.output} is already a finished cache of this configuration; nothing to do" in \
        capsys.readouterr().err


def test_refused_rerun_changes_nothing(tmp_path, small_pass):
    """Checked first, written after: a refused command neither deletes the index nor rewrites the config."""
    cache_teacher(small_pass)
    before = _snapshot(tmp_path / "out")
    with pytest.raises(tc.CacheFormatError, match=r"c.h5 is a finished cache of a different run \(k: existing 8 != "
                                                  r"requested 4\); pass --overwrite to replace it, or choose another "
                                                  r"--output$"):
        cache_teacher(replace(small_pass, top_k=4))
    assert _snapshot(tmp_path / "out") == before
    # A stopped run (no index, an unfinished shard) refuses another configuration the same way.
    Path(small_pass.output).unlink()
    shard = tc.shard_path(small_pass.output, 0, 1)
    with h5py.File(shard, "a") as f:
        f.attrs["complete"] = False
    before = _snapshot(tmp_path / "out")
    with pytest.raises(tc.CacheFormatError, match=r"rank-00000-of-00001.h5 was written by a different run "
                                                  r"\(k: existing 8 != requested 4.*\); pass --overwrite"):
        cache_teacher(replace(small_pass, top_k=4))
    assert _snapshot(tmp_path / "out") == before


def test_rerun_rebuilds_a_missing_index_and_resumes_a_damaged_shard(tmp_path, small_pass, capsys):
    first = cache_teacher(small_pass)
    shard = tc.shard_path(small_pass.output, 0, 1)
    reference = {name: tc.TeacherCacheDataset(small_pass.output)[0][name] for name in ("topk_ids", "logsumexp")}
    shard_bytes = shard.read_bytes()
    Path(small_pass.output).unlink()  # killed while writing the index
    assert cache_teacher(small_pass).identity() == first.identity()
    assert shard.read_bytes() == shard_bytes  # the complete shard is reused as it is
    shard.write_bytes(shard_bytes[: len(shard_bytes) // 3])  # a full disk cut it short; the index is now stale
    capsys.readouterr()
    assert cache_teacher(small_pass).num_sequences == 6
    assert "moved it to" in capsys.readouterr().err
    assert shard.with_name(shard.name + ".broken").stat().st_size == len(shard_bytes) // 3
    item = tc.TeacherCacheDataset(small_pass.output)[0]
    for name, value in reference.items():
        assert torch.equal(item[name], value)


def test_pass_refuses_seq_len_beyond_the_teachers_positions(tmp_path, small_pass):
    with pytest.raises(CacheTeacherError, match="^--seq-len 300 exceeds the teacher's max_position_embeddings of 256"):
        cache_teacher(replace(small_pass, seq_len=300))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the real script

def _corpus_file(tmp_path: Path, stdlib_text: str) -> Path:
    """Real text: wikitext-2 test documents when the shared data is present, else stdlib source as JSONL."""
    if WIKITEXT.is_file():
        return WIKITEXT
    return Path(_jsonl(tmp_path / "stdlib.jsonl", [stdlib_text[i:i + 3000] for i in range(0, 60_000, 3000)]))


def _run_script(teacher, data, out, *extra, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """``bash launch/cache_teacher.sh`` with 2 ranks in its own process group; a run still going after ``timeout``
    seconds is killed with every rank and fails the test (a hang must not block the suite)."""
    cmd = ["bash", str(REPO / "launch" / "cache_teacher.sh"), "--teacher", str(teacher), "--data", str(data),
           "--output", str(out), "--top-k", "8", "--seq-len", "48", "--nproc", "2", "--max-sequences", "11",
           "--batch-size", "2", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out_, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out_, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s (hung?): {(out_ + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out_, err)


@pytest.fixture(scope="module")
def two_rank_cache(tmp_path_factory, tiny_lm_dir, stdlib_text) -> tuple[Path, Path, str]:
    """(corpus, cache, log) of one uninterrupted 2-rank run of the script; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("two_rank_cache")
    data = _corpus_file(root, stdlib_text)
    out = root / "full" / "cache.h5"
    proc = _run_script(tiny_lm_dir, data, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_script_two_ranks_matches_direct_forward_and_resumes(tmp_path, tiny_lm_dir, two_rank_cache):
    data, out, log = two_rank_cache
    assert "cached 11 sequences x 48 = 528 tokens from 2 rank(s)" in log and "bytes/token" in log
    assert "tok/s" in log

    tokenizer = T.AutoTokenizer.from_pretrained(tiny_lm_dir)
    ds = tc.TeacherCacheDataset(out, tokenizer=tokenizer, vocab_size=len(tokenizer))
    assert (len(ds), ds.meta.k, ds.meta.seq_len, ds.meta.world_size) == (11, 8, 48, 2)
    # Rank r packs records r, r + 2, ... on its own (6 and 5 of the 11 sequences); the cache interleaves them.
    texts = [json.loads(line)[("page" if data == WIKITEXT else "text")] for line in data.read_text().splitlines()]
    ref = [_reference_pack(texts[r:80:2], tokenizer, 48)[:6 - r] for r in range(2)]
    assert [ds[i]["input_ids"].tolist() for i in range(11)] == [ref[i % 2][i // 2] for i in range(11)]
    # Top-k and logsumexp agree with a direct forward of the teacher on the same sequences.
    model = T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.stack([ds[i]["input_ids"] for i in range(11)])).logits
    ids = torch.stack([ds[i]["topk_ids"] for i in range(11)])
    vals = torch.stack([ds[i]["topk_logits"] for i in range(11)])
    lse = torch.stack([ds[i]["logsumexp"] for i in range(11)])
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=0, atol=1e-4)
    direct = logits.gather(-1, ids)
    torch.testing.assert_close(vals, direct, rtol=1e-3, atol=1e-3)  # float16 storage of the logits
    others = logits.scatter(-1, ids, float("-inf")).amax(-1)
    assert (direct.amin(-1) >= others - 1e-5).all()  # the cached ids are the k largest
    assert (vals[..., :-1] >= vals[..., 1:]).all()  # largest first

    # A run stopped after 2 sequences per rank leaves no index and incomplete shards; the rerun completes
    # it and yields the same file contents as the uninterrupted run.
    resumed = tmp_path / "resumed" / "cache.h5"
    proc = _run_script(tiny_lm_dir, data, resumed, **{STOP_AFTER_ENV: 2})
    assert proc.returncode != 0
    assert not resumed.exists()
    with pytest.raises(tc.CacheFormatError):
        tc.TeacherCacheDataset(resumed)
    shards = [tc.shard_path(resumed, r, 2) for r in range(2)]
    written = [s for s in shards if s.exists()]
    assert written, "the stopped run wrote nothing"
    counts = []
    for s in written:  # the rank that stopped wrote 2; the other may have been stopped by the launcher sooner
        with h5py.File(s) as f:
            assert not f.attrs["complete"]
            counts.append(int(f.attrs["num_sequences"]))
    assert max(counts) == 2
    proc = _run_script(tiny_lm_dir, data, resumed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout + proc.stderr
    with h5py.File(out) as a, h5py.File(resumed) as b:
        for name in ("input_ids", "topk_ids", "topk_logits", "logsumexp"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        skip = {"created"}
        assert {k: v for k, v in a.attrs.items() if k not in skip} == {k: v for k, v in b.attrs.items()
                                                                        if k not in skip}


@pytest.mark.slow
def test_script_rerun_of_a_finished_cache_returns_at_once_and_changes_nothing(tmp_path, tiny_lm_dir, two_rank_cache):
    """Two ranks (#17 item 1: rank 0 deleted the index, kept its finished shard open and waited for it forever)."""
    data, finished, _ = two_rank_cache
    shutil.copytree(finished.parent, tmp_path / "run")  # the index names its shards by relative path
    out = tmp_path / "run" / finished.name
    before = _snapshot(out.parent)
    proc = _run_script(tiny_lm_dir, data, out, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{out} is already a finished cache of this configuration; nothing to do" in proc.stdout + proc.stderr
    assert _snapshot(out.parent) == before
    # Refused (another k): nothing changes, on every rank.
    proc = _run_script(tiny_lm_dir, data, out, "--top-k", "4", timeout=60)
    assert proc.returncode == 2 and "k: existing 8 != requested 4" in proc.stderr
    assert _snapshot(out.parent) == before
    # Killed while writing the index: both shards are finished; the rerun rebuilds the index from them.
    out.unlink()
    proc = _run_script(tiny_lm_dir, data, out, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = _snapshot(out.parent)
    rewritten = {out.name, f"{tc.shard_dir(out).name}/{RUN_CONFIG}"}  # the index; the config names this --output
    assert {k: v for k, v in after.items() if k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}
    assert len(tc.TeacherCacheDataset(out)) == 11


# ----------------------------------------------------------------------------------------------- bad input, one line

def _launcher():
    return load_launcher("cache_teacher")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_lm_dir, tiny_tokenizer, stdlib_text) -> Path:
    """Teacher folders, corpora and outputs that the cache stage must refuse."""
    root = tmp_path_factory.mktemp("bad_cache_inputs")
    ok = tiny_lm_dir
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    for name, keep in (("no_tokenizer", ("config.json", "model.safetensors")),
                       ("no_weights", ("config.json", "tokenizer.json", "tokenizer_config.json")),
                       ("truncated", ("config.json", "tokenizer.json", "tokenizer_config.json")),
                       ("unknown_type", ("tokenizer.json", "tokenizer_config.json", "model.safetensors"))):
        (root / name).mkdir()
        for file in keep:
            shutil.copy(ok / file, root / name / file)
    weights = (ok / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "unknown_type" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    T.T5ForConditionalGeneration(T.T5Config(vocab_size=len(tiny_tokenizer), d_model=16, d_ff=32, num_layers=1,
                                            num_heads=2, d_kv=8)).save_pretrained(root / "t5")
    tiny_tokenizer.save_pretrained(root / "t5")
    tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer) - 20).save_pretrained(root / "small_vocab")
    tiny_tokenizer.save_pretrained(root / "small_vocab")
    _jsonl(root / "data.jsonl", [stdlib_text[:5000]])
    _jsonl(root / "short.jsonl", ["def f(): pass"])
    (root / "empty.jsonl").write_bytes(b"")
    (root / "empty.parquet").write_bytes(b"")
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n')
    (root / "dir.h5").mkdir()
    (root / "not_a_cache.h5").write_text("some other file")
    (root / "shards_file").mkdir()
    (root / "shards_file" / "c.shards").write_text("a file where the shard folder goes")
    return root


# case -> (arguments replacing the defaults, the one-line message after "cache_teacher: error: "); {m}: bad_inputs,
# {t}: the teacher that works
CACHE_BAD_INPUTS = {
    "missing teacher folder": (["--teacher", "{m}/nope"],
                               "teacher '{m}/nope' is not a local folder and not a Hub id of the form org/name"),
    "teacher is a file": (["--teacher", "{m}/a_file"], "teacher {m}/a_file is a file, not a model folder"),
    "empty teacher folder": (["--teacher", "{m}/empty"], "teacher {m}/empty has no config.json: not a model folder"),
    "unparsable teacher config": (["--teacher", "{m}/bad_config"], ("{m}/bad_config/config.json is not valid JSON "
                                  "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")),
    "no tokenizer files": (["--teacher", "{m}/no_tokenizer"], ("teacher {m}/no_tokenizer has no tokenizer files "
                           "(tokenizer.json, tokenizer_config.json, vocab.json, ...): save the teacher's tokenizer "
                           "into it")),
    "no weights": (["--teacher", "{m}/no_weights"], ("teacher {m}/no_weights holds no weights (model.safetensors, "
                   "model.safetensors.index.json or pytorch_model.bin)")),
    "truncated weights": (["--teacher", "{m}/truncated"], ("{m}/truncated/model.safetensors is not a readable "
                          "safetensors file (Error while deserializing header: incomplete metadata, file not fully "
                          "covered); it may be truncated or corrupted: re-download or re-save it")),
    "unknown model type": (["--teacher", "{m}/unknown_type"], ("teacher {m}/unknown_type: model type 'no_such_arch' "
                           f"is unknown to transformers {T.__version__}; update transformers, or pass "
                           "--trust-remote-code for a model that ships its own code")),
    "not a causal LM": (["--teacher", "{m}/t5"], ("teacher {m}/t5 is a 't5' model, which AutoModelForCausalLM cannot "
                        "load: the cache needs a causal LM's next-token logits")),
    "tokenizer beyond the vocabulary": (["--teacher", "{m}/small_vocab"], ("the tokenizer has 320 tokens but the "
                                        "teacher's vocabulary has only 300: ids >= 300 cannot be scored (wrong "
                                        "tokenizer for this teacher?)")),
    "top-k beyond the vocabulary": (["--top-k", "400"], "--top-k 400 is larger than the teacher's vocabulary of 320"),
    "seq-len beyond the positions": (["--seq-len", "300"], ("--seq-len 300 exceeds the teacher's "
                                     "max_position_embeddings of 256: its logits past that position are unreliable; "
                                     "lower --seq-len")),
    "top-k below 1": (["--top-k", "0"], "top_k must be >= 1, got 0"),
    "output not .h5": (["--output", "{o}/c.hdf"], "output must be an .h5 path, got '{o}/c.hdf'"),
    "missing data": (["--data", "{m}/nope.jsonl"], "data path {m}/nope.jsonl does not exist"),
    "zero-byte JSONL": (["--data", "{m}/empty.jsonl"], "{m}/empty.jsonl is empty: it holds no non-empty text"),
    "malformed JSONL line": (["--data", "{m}/bad.jsonl"], ("{m}/bad.jsonl: line 3 is not valid JSON (Expecting ',' "
                             "delimiter at column 14)")),
    "zero-byte parquet": (["--data", "{m}/empty.parquet"], ("{m}/empty.parquet cannot be read as parquet "
                          "(ArrowInvalid: Parquet file size is 0 bytes)")),
    "data folder without text files": (["--data", "{m}/empty"], ("{m}/empty: no .jsonl/.json/.parquet/.txt files in "
                                       "this folder")),
    "corpus shorter than one sequence": (["--data", "{m}/short.jsonl"], ("{m}/short.jsonl has only 12 tokens (1 "
                                         "documents), fewer than one sequence of 32; lower --seq-len or add text")),
    "output is a folder": (["--output", "{m}/dir.h5"], "output {m}/dir.h5 is a folder, not an .h5 file"),
    "output below a file": (["--output", "{m}/a_file/c.h5"], "output {m}/a_file is a file, not a folder"),
    "shard folder is a file": (["--output", "{m}/shards_file/c.h5"],
                               "cache shard {m}/shards_file/c.shards is a file, not a folder"),
    "output is not a cache": (["--output", "{m}/not_a_cache.h5"], ("{m}/not_a_cache.h5: cannot open as HDF5 "
                              "(truncated or corrupted file): Unable to synchronously open file (file signature not "
                              "found); pass --overwrite to replace it, or choose another --output")),
}


def _run_launcher(args: list[str], capsys) -> tuple[int, list[str]]:
    launcher = _launcher()
    code = run("cache_teacher", lambda: launcher.main(args), errors=launcher.ERRORS)
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("case", sorted(CACHE_BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tiny_lm_dir, tmp_path, capsys):
    overrides, message = CACHE_BAD_INPUTS[case]
    settings = {"--teacher": str(tiny_lm_dir), "--data": str(bad_inputs / "data.jsonl"),
                "--output": str(tmp_path / "out" / "c.h5"), "--top-k": "4", "--seq-len": "32"}
    fill = {"m": bad_inputs, "o": tmp_path / "out"}
    settings.update(zip(overrides[::2], [v.format(**fill) for v in overrides[1::2]]))
    before = _snapshot(bad_inputs)
    code, err = _run_launcher([x for kv in settings.items() for x in kv], capsys)
    assert (code, err) == (2, [f"cache_teacher: error: {message.format(**fill)}"])
    assert not (tmp_path / "out").exists() and _snapshot(bad_inputs) == before  # refused before any write


def test_read_only_output_is_one_line(tmp_path, bad_inputs, tiny_lm_dir, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    as_root = os.geteuid() == 0  # root writes through permission bits; an immutable folder stops it
    if as_root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root without chattr: no way to make a folder read-only")
    try:
        code, err = _run_launcher(["--teacher", str(tiny_lm_dir), "--data", str(bad_inputs / "data.jsonl"),
                                   "--output", str(folder / "c.h5"), "--top-k", "4", "--seq-len", "32"], capsys)
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)
    reason = "Operation not permitted" if as_root else "Permission denied"
    assert (code, err) == (2, [f"cache_teacher: error: cannot write output folder {folder}: {reason} ({folder})"])
    assert list(folder.iterdir()) == []

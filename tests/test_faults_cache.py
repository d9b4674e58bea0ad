"""Fault injection for the cache stage: a caching run killed (SIGKILL to its process group) or stopped by a full
disk (a file-size limit, RLIMIT_FSIZE, set in the child) at several points resumes on a plain rerun to a cache
whose datasets and attributes equal an uninterrupted run's, and nothing partial is ever read as complete."""

import glob
import resource
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, launcher_env, run_killable, single_process_env
from moe_ds import teacher_cache as tc
from moe_ds.cli import run

pytestmark = pytest.mark.slow

# 32 sequences, one per batch: 32 flushes to interrupt, ~100 kB of shard for the file-size limits to cut.
ARGS = ["--top-k", "8", "--seq-len", "64", "--max-sequences", "32", "--batch-size", "1"]
FULL_DISK = "cache_teacher: error: File too large writing "  # then the file, then the advice below
RESUME = "; free space and rerun the same command to resume"


def launch(args, ranks: int = 1, fsize: int | None = None, kill_when=None, timeout: float = 300):
    """The cache stage in its own process group: ``python launch/cache_teacher.py`` (1 rank) or
    ``bash launch/cache_teacher.sh --nproc 2``; optionally under a file-size limit of ``fsize`` bytes, or
    SIGKILLed with every child as soon as ``kill_when()`` is true (polled every 5 ms).

    Returns (exit code, stderr, killed).
    """
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    if ranks == 1:
        cmd, env = [sys.executable, str(REPO / "launch" / "cache_teacher.py")], single_process_env()
    else:
        cmd, env = ["bash", str(REPO / "launch" / "cache_teacher.sh"), "--nproc", str(ranks)], launcher_env()
    return run_killable([*cmd, *args], env, kill_when=kill_when, timeout=timeout, preexec_fn=limit,
                        what="the cache stage")


def rerun(args, capsys) -> tuple[int, str]:
    """The same command once more, in this process (as ``python launch/cache_teacher.py`` runs it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_cache_teacher", REPO / "launch" / "cache_teacher.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched runs (OMP_NUM_THREADS=1): the same float sums, bit for bit
    try:
        code = run("cache_teacher", lambda: launcher.main([str(a) for a in args]), errors=launcher.ERRORS)
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def contents(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Datasets (in global order, read through the index) and the attributes that describe them."""
    with h5py.File(path) as f:
        data = {name: f[name][:] for name in f}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return data, {k: v for k, v in attrs.items() if k not in ("created", "world_size")}


def assert_same(out: Path, reference: Path) -> None:
    got, want = contents(out), contents(reference)
    assert sorted(got[0]) == sorted(want[0]) and got[1] == want[1]
    for name in want[0]:
        np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=name)
    ds = tc.TeacherCacheDataset(out)  # the reader's own validation, and every row read from the shards
    for i in range(len(ds)):
        for name, value in ds[i].items():
            np.testing.assert_array_equal(value.numpy(), want[0][name][i].astype(value.numpy().dtype))


def assert_nothing_read_as_complete(out: Path, reference: Path, world_size: int) -> None:
    """No index yet; every shard the format accepts as complete holds exactly the reference's rows."""
    assert not out.exists()
    with pytest.raises(tc.CacheFormatError):
        tc.TeacherCacheDataset(out)
    rows = contents(reference)[0]
    for r in range(world_size):
        shard = tc.shard_path(out, r, world_size)
        try:
            tc.read_meta(shard)
        except tc.CacheFormatError:
            continue  # absent, unreadable or incomplete: refused, as it must be
        with h5py.File(shard) as f:
            for name, value in rows.items():
                np.testing.assert_array_equal(f[name][:], value[r::world_size], err_msg=f"{shard}: {name}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm_dir, stdlib_text) -> tuple[list, Path, int]:
    """(arguments without --output, the uninterrupted single-process cache, its shard's size in bytes)."""
    import json

    root = tmp_path_factory.mktemp("cache_faults")
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 90_000, 3000)))
    args = ["--teacher", tiny_lm_dir, "--data", data, *ARGS]
    out = root / "reference" / "c.h5"
    code, err, _ = launch([*args, "--output", out])
    assert code == 0, err[-3000:]
    return args, out, tc.shard_path(out, 0, 1).stat().st_size


@pytest.fixture(scope="module")
def reference_two_ranks(reference, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank cache of the same command: each rank packs its own records, so its sequences
    are not the single process's."""
    out = tmp_path_factory.mktemp("cache_faults_2") / "reference" / "c.h5"
    code, err, _ = launch([*reference[0], "--output", out], ranks=2)
    assert code == 0, err[-3000:]
    return out


def _size_over(path: Path, size: float):
    return lambda: path.exists() and path.stat().st_size > size


@pytest.mark.parametrize("fault", ["fsize=300", "fsize=0.05", "fsize=0.4", "fsize=0.85", "kill:shard created",
                                   "kill:mid-shard", "kill:index"])
def test_cache_resumes_identically(reference, tmp_path, capsys, fault):
    base, ref, shard_size = reference
    out = tmp_path / "out" / "c.h5"
    args = [*base, "--output", out]
    shard = tc.shard_path(out, 0, 1)
    if fault.startswith("fsize="):
        share = float(fault.split("=")[1])
        limit = int(share if share >= 1 else share * shard_size)  # 300 bytes: even cache_config.json fails
        code, err, _ = launch(args, fsize=limit)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith(FULL_DISK) and last.endswith(RESUME), err[-3000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    else:
        when = {"kill:shard created": shard.exists, "kill:mid-shard": _size_over(shard, 0.4 * shard_size),
                "kill:index": lambda: bool(glob.glob(str(out.parent / f".{out.name}.*.tmp")))}[fault]
        code, err, killed = launch(args, kill_when=when)
        if not killed:  # the index exists for milliseconds: leave what a kill there leaves
            assert fault == "kill:index" and code == 0, err[-3000:]
            out.unlink()
            (out.parent / f".{out.name}.12345-0123abcd.tmp").write_bytes(b"partial")
    assert_nothing_read_as_complete(out, ref, world_size=1)

    code, err = rerun(args, capsys)
    assert code == 0, err[-3000:]
    assert_same(out, ref)
    assert not glob.glob(str(out.parent / ".*.tmp")) and not glob.glob(str(tc.shard_dir(out) / ".*.tmp"))
    for aside in tc.shard_dir(out).glob("*.broken*"):  # set aside, never deleted, and said so
        assert f"moved it to {aside}" in err
    code, err = rerun(args, capsys)  # and once finished, a rerun changes nothing
    assert code == 0 and "nothing to do" in err


def test_two_ranks_killed_mid_shard_resume_identically(reference, reference_two_ranks, tmp_path):
    base, _, shard_size = reference
    ref = reference_two_ranks
    out = tmp_path / "out" / "c.h5"
    args = [*base, "--output", out]
    code, err, killed = launch(args, ranks=2, kill_when=_size_over(tc.shard_path(out, 1, 2), 0.2 * shard_size))
    assert killed, err[-3000:]
    assert_nothing_read_as_complete(out, ref, world_size=2)
    code, err, _ = launch(args, ranks=2)
    assert code == 0, err[-3000:]
    assert_same(out, ref)  # the uninterrupted 2-rank run's sequences in the same order
    with h5py.File(out) as f:
        assert int(f.attrs["world_size"]) == 2

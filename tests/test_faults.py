"""Fault injection: a stage killed (SIGKILL to its process group) or stopped by a full disk (a file-size limit,
RLIMIT_FSIZE, set in the child) resumes on a plain rerun to outputs identical to an uninterrupted run, and no
partial output is ever read as complete."""

import glob
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, single_process_env

pytestmark = pytest.mark.slow

COMPRESS = ["--rank", "2", "--steps", "150", "--init", "svd"]


def launch(script: str, *args, fsize: int | None = None, kill_when: str | None = None, cwd=REPO):
    """Run ``launch/SCRIPT`` in its own process group; optionally under a file-size limit of ``fsize`` bytes, or
    SIGKILLed (with every child) as soon as a path matching the glob ``kill_when`` exists.

    Returns (exit code, stderr, killed: whether the kill happened).
    """
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / script), *map(str, args)], cwd=cwd,
                            env=single_process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit, start_new_session=True)
    killed = False
    if kill_when is not None:
        while proc.poll() is None:
            if glob.glob(kill_when):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err, killed


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path; timings (seconds) dropped from the statistics."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "compress_config.json":
            data = path.read_bytes()
            if path.name == "compression_statistics.yaml":
                stats = yaml.safe_load(data)
                for layer in stats.get("reconstruction_error", {}).values():
                    for proj in layer.values():
                        proj.pop("seconds", None)
                data = yaml.safe_dump(stats).encode()
            files[str(path.relative_to(folder))] = data
    return files


@pytest.fixture(scope="module")
def compress_reference(tmp_path_factory):
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("faults")
    tiny_model("qwen3_moe").save_pretrained(root / "teacher")
    code, err, _ = launch("compress.py", "--model", root / "teacher", "--output", root / "reference", *COMPRESS)
    assert code == 0, err
    return root


@pytest.mark.parametrize("fault", ["fsize=2000", "fsize=60000", "kill:first layer file",
                                   "kill:assembly"])
def test_compress_resumes_identically(compress_reference, tmp_path, fault):
    root, out = compress_reference, tmp_path / "out"
    args = ["--model", root / "teacher", "--output", out, *COMPRESS]
    if fault.startswith("fsize="):
        code, err, _ = launch("compress.py", *args, fsize=int(fault.split("=")[1]))
        assert code == 2, err
        assert err.strip().splitlines()[-1] == ("compress: error: File too large writing the output; free space "
                                                "and rerun the same command to resume")
    else:
        pattern = str(out / ".factors" / "layer-00000.safetensors") if "layer" in fault else str(out / ".assembly-*")
        code, err, killed = launch("compress.py", *args, kill_when=pattern)
        if not killed:  # the assembly folder lives a few ms: leave behind what a kill there would
            (out / ".assembly-x" / "sub").mkdir(parents=True)
            (out / ".assembly-x" / "model-00001-of-00003.safetensors").write_bytes(b"partial")
            (out / "config.json").unlink()
    assert not (out / "config.json").exists()  # an interrupted run never looks finished
    code, err, _ = launch("compress.py", *args)
    assert code == 0, err
    assert snapshot(out) == snapshot(root / "reference")
    assert not list(out.glob(".assembly-*")) and not (out / ".factors").exists()


def test_compress_ignores_partial_and_foreign_factor_files(compress_reference, tmp_path):
    root, out = compress_reference, tmp_path / "out"
    (out / ".factors").mkdir(parents=True)
    (out / ".factors" / "layer-00000.safetensors").write_bytes(b"\x00" * 100)  # half-written by some other tool
    (out / ".factors" / ".layer-00001.safetensors.123-abcdef01.tmp").write_bytes(b"\x00" * 100)  # a killed write
    code, err, _ = launch("compress.py", "--model", root / "teacher", "--output", out, *COMPRESS, "--overwrite")
    assert code == 0, err
    assert snapshot(out) == snapshot(root / "reference")

"""The header every benchmark prints first: what ran, where, when, with which libraries (issue #18).

A figure copied out of a benchmark's output carries its own provenance: the UTC date, the machine (CPU model,
cores, RAM, GPU), the library versions, the git commit and the exact command line that produced it.
"""

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "deepspeed", "h5py")
REPO = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 ** 2  # kB
    except OSError:
        pass
    return None


def _gpus() -> str:
    # Only when torch is already imported: the header must not be what initialises CUDA or slows a small run.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))


def _version(name: str) -> str:
    try:
        return metadata.version(name)  # read from the installed metadata: no import (deepspeed's is slow)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + (" (uncommitted changes in the working tree)" if dirty else "")


def print_header(title: str) -> None:
    """Print the benchmark's title and provenance as ``# key: value`` lines.

    Args:
        title: one line naming what the benchmark measures.
    """
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = _ram_gib()
    print(f"# bench: {title}")
    print(f"# date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(f"# machine: {_cpu_model()}, {usable} of {cores} cores usable, "
          f"{f'{ram:.0f} GiB RAM' if ram is not None else 'RAM unknown'}, GPU: {_gpus()}; "
          f"{platform.system()} {platform.release()}")
    print(f"# versions: python {platform.python_version()}, "
          + ", ".join(f"{name} {_version(name)}" for name in LIBRARIES))
    print(f"# git: {_git_commit()}")
    print(f"# command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}", flush=True)

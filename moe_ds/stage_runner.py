"""Run the pipeline's launchers as child processes: what recipes of several stages (the progressive cascade, the
comparison sweep, the benchmarks) use to chain compress → cache → distill → evaluate exactly as a user would.

A stage is one launcher command (``launch/<script>``) on ``nproc`` ranks: ``deepspeed --include localhost:0,..``
for more than one, a plain process (given the rank variables itself) for one. On a machine without GPUs the ranks
are CPU processes with one thread each (``stage_env``), as in ``launch/demo.sh``.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A launcher command exited with a non-zero status; the message holds the tail of its log."""


def launcher(script: str, nproc: int, include: str | None = None) -> list[str]:
    """The command prefix that starts ``launch/<script>`` on ``nproc`` ranks.

    Args:
        script: file name under ``launch/`` (e.g. ``"distill.py"``).
        nproc: ranks; 1 runs a plain ``python`` process.
        include: DeepSpeed ``--include`` value (default ``localhost:0,1,..,nproc-1``; comma lists, never ranges).
    """
    path = str(REPO / "launch" / script)
    if nproc == 1 and include is None:
        return [sys.executable, path]
    from .dist import free_port

    include = include or "localhost:" + ",".join(map(str, range(nproc)))
    return [str(Path(sys.executable).parent / "deepspeed"), "--include", include, "--master_port", str(free_port()),
            path]


def stage_env(nproc: int, **extra: str) -> dict:
    """The environment of a launcher command: offline hubs, wandb disabled unless set, unbuffered output; without a
    GPU also CPU ranks with one thread each (``DS_ACCELERATOR=cpu``, ``LOCAL_SIZE``). A single plain process gets
    the rank variables (``RANK=0``, ``WORLD_SIZE=1``, a free ``MASTER_PORT``) itself."""
    import torch

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "disabled")
    if not torch.cuda.is_available():
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", LOCAL_SIZE=str(nproc))
    if nproc == 1:
        from .dist import free_port

        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def cache_command(teacher, data, output, top_k: int, seq_len: int, nproc: int, max_sequences: int | None = None,
                  batch_size: int | None = None) -> list[str]:
    """The ``launch/cache_teacher.sh`` command that caches ``teacher``'s top-``top_k`` logits over ``data`` into
    ``output`` (an .h5 path) on ``nproc`` ranks; None leaves a setting at the stage's default."""
    return ["bash", str(REPO / "launch" / "cache_teacher.sh"), "--teacher", str(teacher), "--data", str(data),
            "--output", str(output), "--top-k", str(top_k), "--seq-len", str(seq_len), "--nproc", str(nproc),
            *(["--max-sequences", str(max_sequences)] if max_sequences else []),
            *(["--batch-size", str(batch_size)] if batch_size else [])]


def run_stage(name: str, cmd: list[str], nproc: int, log_dir: str | Path, env: dict | None = None) -> float:
    """Run one launcher command with its output appended to ``log_dir/<name>.log``.

    Args:
        name: the log's name (also in the error).
        cmd: the full command (``launcher(...) + arguments``).
        nproc: ranks (for ``stage_env``).
        log_dir: created if missing.
        env: extra environment variables.

    Returns:
        Wall-clock seconds, process start included.

    Raises:
        StageFailed: the command exited with a non-zero status (the message quotes the last 20 lines of its log).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], check=False, stdout=f, stderr=subprocess.STDOUT,
                            env=stage_env(nproc, **(env or {})), cwd=REPO).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise StageFailed(f"{name} failed (exit {rc}); last lines of {log}:\n{tail}")
    return seconds

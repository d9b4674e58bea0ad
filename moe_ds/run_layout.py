"""Names of files and folders that the stages agree on (distillation writes them, the evaluator reads them).

A distillation run directory holds ``checkpoint-<step>/`` folders. A checkpoint is complete only once
``CHECKPOINT_COMPLETE`` exists inside it (written last, atomically); watchers ignore folders without it.
The evaluator writes ``eval/results.json`` inside a checkpoint, then ``eval/EVALUATED``.
Every file or folder another process may read is written atomically through ``atomic_file``/``write_atomic``
(one file) or ``atomic_output_dir`` (a whole folder).
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "CHECKPOINT_COMPLETE"  # marker file, written last by the distillation stage
EVAL_DIR = "eval"
EVAL_RESULTS = "results.json"
EVALUATED = "EVALUATED"  # marker file inside EVAL_DIR, written after EVAL_RESULTS

_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """Training step of a ``checkpoint-<step>`` folder, or None for any other name."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | Path) -> bool:
    """True once the distillation stage has written the completion marker."""
    return (Path(path) / CHECKPOINT_COMPLETE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders of a run, oldest step first."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if checkpoint_step(p) is not None and is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is fsynced and ``os.replace``d onto ``path``.

    For writers that need a file name (``safetensors.torch.save_file``, ``h5py.File``). On any error the
    temporary file is removed and ``path`` is left as it was, so readers never see half a file.
    """
    path = Path(path)
    # Not created here, so the writer creates it with the usual permissions (mkstemp's would be 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


write_text_atomic = write_atomic  # the earlier name, still used by the distillation and evaluation stages


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) atomically, see ``write_atomic``."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder that replaces ``out_dir`` only if the block completes.

    On any error the temporary folder is removed and ``out_dir`` is left as it was.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Names of files and folders that the stages agree on (distillation writes them, the evaluator reads them).

A distillation run directory holds ``checkpoint-<step>/`` folders. A checkpoint is complete only once
``CHECKPOINT_COMPLETE`` exists inside it (written last, atomically); watchers ignore folders without it.
The evaluator writes ``eval/results.json`` inside a checkpoint, then ``eval/EVALUATED``.
"""

import json
import os
import re
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


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as JSON through a temp file in the same folder and ``os.replace`` (readers never see half)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

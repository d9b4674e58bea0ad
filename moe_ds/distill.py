"""Stage 3: distil the compressed student against the cached teacher top-k with the Hugging Face Trainer.

One ``DistillTrainer`` (a ``transformers.Trainer``) per training stage. Its ``compute_loss`` is the chunked
top-k KD loss of ``moe_ds.kd_loss`` (Hinton et al. 2015): (1 - alpha) * CE + alpha * tau^2 * KL. The teacher is
never loaded: its top-k logits come from the HDF5 cache of stage 2 (``moe_ds.teacher_cache``).

Stages. ``DistillConfig.stages`` is a list of ``StageConfig`` (steps, parameter groups by regular expression,
each with a learning-rate multiplier and weight decay; multiplier 0 freezes with ``requires_grad=False``).
Because ZeRO builds its optimizer partitions from the parameters that require gradients when the engine is
created, each stage gets a fresh model, Trainer, DeepSpeed engine, optimizer and warmup + cosine schedule:
the model of stage i + 1 is loaded from the consolidated checkpoint written at the end of stage i (in the
training dtype, so a bf16 run rounds its fp32 master weights to bf16 once per stage boundary). Step numbers
are global over the stages: stage i runs steps (start_i, end_i], checkpoints are ``checkpoint-<global step>``.

Data. The cache's sequences are visited in a fixed order (a seeded permutation per pass over the cache) and
read sequentially, so the batch of every global step is a function of the step alone; a resumed run skips the
batches already trained (the Trainer's own fast-forward) and reproduces the uninterrupted loss curve.

Checkpoints. Every save writes, in ``<output>/checkpoint-<step>/``: the DeepSpeed state (``global_step*/``,
per-rank shards, optimizer and scheduler), ``trainer_state.json`` and RNG states (for ``--resume``); a
consolidated 16-bit (training-dtype) copy of the student as ``model.safetensors`` + ``config.json`` (with
``stage3_gather_16bit_weights_on_model_save``), the shipped modeling files, compression_statistics.yaml and the
tokenizer, i.e. the compressed checkpoint format that ``moe_ds.checkpoint.load_compressed`` and
``from_pretrained(..., trust_remote_code=True)`` read; and last, after a barrier, the completion marker
``CHECKPOINT_COMPLETE`` (``moe_ds.run_layout``) written atomically, which the evaluator waits for.

Logs. The Trainer's tqdm bar and wandb (project ``moe-compression``, offline unless WANDB_MODE says otherwise,
``report_to="none"`` disables it), and ``<output>/train_log.jsonl``: one line per logging step with step, stage,
loss, ce, kl, lr (the base rate times the stage's schedule), grad_norm and tokens_per_s (global). The resolved
config is written to ``<output>/distill_config.json`` before training starts (a resume refuses other stages,
batch sizes or seeds).

CPU (no GPU): the workarounds of ../shared/CPU_DEEPSPEED.md are applied in ``_cpu_shims``.
"""

import gc
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .checkpoint import (CheckpointError, finish_checkpoint, is_compressed_checkpoint, load_model,
                         validate_compressed_checkpoint)
from .dist import barrier, dist_info, disable_deepspeed_shm_op, log_main, setup_logging
from .kd_loss import TAIL_MODES, chunked_kd_loss
from .run_layout import (CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, checkpoint_step, complete_checkpoints,
                         write_text_atomic)
from .teacher_cache import TeacherCacheDataset

logger = logging.getLogger("moe_ds")

CONFIG_FILE = "distill_config.json"  # resolved config, written into the output directory
LOG_FILE = "train_log.jsonl"  # one JSON object per logging step
DEFAULT_DEEPSPEED = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json")
# Test-only: after saving the checkpoint of this step every rank runs the student on the input ids stored in
# <output>/probe_input.pt and rank 0 writes the logits to <output>/probe-<step>.pt (compared in a fresh process).
PROBE_ENV = "MOE_DS_DISTILL_PROBE"


class DistillConfigError(ValueError):
    """A distillation setting, stage list, parameter group or DeepSpeed config is unusable."""


# ------------------------------------------------------------------------------------------------ config

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
    groups: list = field(default_factory=list)  # GroupConfig (or dicts), matched in order
    default_lr_mult: float = 1.0  # multiplier of parameters no pattern matches (0: frozen)
    warmup_ratio: float | None = None  # share of this stage's steps spent warming up; None: the run's
    name: str = ""  # shown in logs

    def __post_init__(self):
        self.groups = [g if isinstance(g, GroupConfig) else _from_dict(GroupConfig, g, "group") for g in self.groups]
        if not isinstance(self.steps, int) or self.steps < 1:
            raise DistillConfigError(f"stage {self.name!r}: steps must be an integer >= 1, got {self.steps!r}")
        if not self.default_lr_mult >= 0:
            raise DistillConfigError(f"stage {self.name!r}: default_lr_mult must be >= 0, got {self.default_lr_mult}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise DistillConfigError(f"stage {self.name!r}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.default_lr_mult == 0 and all(g.lr_mult == 0 for g in self.groups):
            raise DistillConfigError(f"stage {self.name!r} freezes every parameter (all multipliers are 0)")


@dataclass
class DistillConfig:
    student: str  # compressed checkpoint (stage 1) or any HF causal LM directory
    teacher_cache: str  # OUT.h5 written by stage 2
    output: str  # run directory: checkpoint-<step>/, train_log.jsonl, distill_config.json
    deepspeed: str | None = DEFAULT_DEEPSPEED  # DeepSpeed JSON (ZeRO-3 by default); None: plain Trainer
    tokenizer: str | None = None  # tokenizer directory (default: the student's)
    max_steps: int | None = None  # total steps; must equal the sum of stage steps when stages are given
    save_steps: int = 100  # checkpoint every N global steps (and at the end of every stage)
    alpha: float = 0.9  # weight of the KL term
    temperature: float = 1.0  # KD temperature tau; 1 keeps the tail category exact (see moe_ds.kd_loss)
    kd_tail: str = "tail"  # "tail" (k + 1 categories) | "renormalize" (teacher renormalised on its top-k)
    kd_chunk_size: int = 512  # positions per chunk of the KD loss (bounds its extra memory)
    learning_rate: float = 1e-4  # fine-tuning rate: 1e-3 wrecks the compressed init (../shared/FINDINGS.md)
    weight_decay: float = 0.0  # default weight decay of every group
    warmup_ratio: float = 0.05  # per stage, share of steps with linear warmup
    lr_scheduler: str = "cosine"  # transformers scheduler name, restarted in every stage
    batch_size: int = 4  # sequences per device per micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    bf16: bool = False  # bf16 training (DeepSpeed bf16 section "auto" follows this)
    gradient_checkpointing: bool = False
    seed: int = 0  # model-side RNG and the data order
    shuffle: bool = True  # visit cached sequences in a seeded random order (a new one per pass)
    logging_steps: int = 10  # steps between log lines (tqdm, wandb, train_log.jsonl)
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all; the evaluator reads them)
    report_to: str = "wandb"  # "wandb" | "none" | any Trainer integration name
    wandb_project: str = "moe-compression"
    run_name: str | None = None  # default: the output directory's name
    resume: bool = False  # continue from the newest complete checkpoint in output
    trust_remote_code: bool = False  # for plain HF students with their own modeling code
    stages: list = field(default_factory=list)  # StageConfig (or dicts); empty: one stage training everything

    def __post_init__(self):
        self.stages = [s if isinstance(s, StageConfig) else _from_dict(StageConfig, s, "stage") for s in self.stages]
        if self.max_steps is not None and self.max_steps < 1:
            raise DistillConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.stages:
            if self.max_steps is None:
                raise DistillConfigError("give max_steps or a list of stages")
            self.stages = [StageConfig(steps=self.max_steps, name="all")]
        total = sum(s.steps for s in self.stages)
        if self.max_steps is None:
            self.max_steps = total
        elif total != self.max_steps:
            raise DistillConfigError(f"the stages' steps add up to {total} "
                                     f"({' + '.join(str(s.steps) for s in self.stages)}) but max_steps is "
                                     f"{self.max_steps}; make them agree or leave max_steps out")
        for name, lo in (("save_steps", 1), ("kd_chunk_size", 1), ("batch_size", 1),
                         ("gradient_accumulation_steps", 1), ("logging_steps", 1)):
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
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise DistillConfigError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")

    def stage_bounds(self) -> list[tuple[int, int]]:
        """(start, end) global steps of every stage: stage i trains steps start + 1 .. end."""
        bounds, start = [], 0
        for s in self.stages:
            bounds.append((start, start + s.steps))
            start += s.steps
        return bounds

    def to_dict(self) -> dict:
        return asdict(self)


def _from_dict(cls, d, what: str):
    if not isinstance(d, dict):
        raise DistillConfigError(f"a {what} must be a mapping, got {d!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DistillConfigError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise DistillConfigError(f"bad {what} {d!r}: {e}") from e


def load_config_file(path: str | Path) -> dict:
    """Settings from a JSON or YAML file (keys are ``DistillConfig`` fields; see launch/distill_stages.example.json).

    Raises:
        DistillConfigError: missing file, unparsable, not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise DistillConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                                 f"{e}") from e
    if not isinstance(data, dict):
        raise DistillConfigError(f"config file {path} must hold a mapping of settings")
    unknown = sorted(set(data) - {f.name for f in fields(DistillConfig)})
    if unknown:
        raise DistillConfigError(f"config file {path}: unknown setting(s) {unknown}")
    return data


def build_config(file_settings: dict | None = None, cli_settings: dict | None = None) -> DistillConfig:
    """Defaults < config file < command-line flags (flags given as None do not override)."""
    merged = dict(file_settings or {})
    merged.update({k: v for k, v in (cli_settings or {}).items() if v is not None})
    return _from_dict(DistillConfig, merged, "distillation")


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


def _offloads_optimizer(ds_cfg: dict | None) -> bool:
    off = (ds_cfg or {}).get("zero_optimization", {}).get("offload_optimizer", {})
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)


# ------------------------------------------------------------------------------------- parameter groups

@dataclass
class ResolvedGroup:
    pattern: str  # regex, or "(default)" for parameters no pattern matched
    lr_mult: float
    lr: float
    weight_decay: float
    names: list  # parameter names in this group
    numel: int  # parameters (elements) in this group

    @property
    def frozen(self) -> bool:
        return self.lr_mult == 0


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave numel() == 0 locally


def resolve_groups(named_numels: list[tuple[str, int]], stage: StageConfig, learning_rate: float,
                   weight_decay: float) -> list[ResolvedGroup]:
    """Assign every parameter to the first group whose pattern ``re.search``-es its name.

    Args:
        named_numels: (parameter name, element count) for every parameter of the model.
        stage: the stage whose groups apply.
        learning_rate, weight_decay: the run's base values.

    Returns:
        One ResolvedGroup per pattern, then "(default)" for the unmatched parameters (if any).

    Raises:
        DistillConfigError: a pattern matches no parameter (naming the earlier patterns that may shadow it).
    """
    compiled = [re.compile(g.pattern) for g in stage.groups]
    members = [[] for _ in stage.groups]
    rest = []
    for name, n in named_numels:
        for i, rx in enumerate(compiled):
            if rx.search(name):
                members[i].append((name, n))
                break
        else:
            rest.append((name, n))
    out = []
    for i, (g, m) in enumerate(zip(stage.groups, members)):
        if not m:
            alone = [name for name, _ in named_numels if compiled[i].search(name)]
            why = (f"its parameters are all taken by earlier patterns {[x.pattern for x in stage.groups[:i]]}"
                   if alone else f"no parameter name matches it (e.g. {named_numels[0][0]!r})")
            raise DistillConfigError(f"stage {stage.name!r}: parameter group pattern {g.pattern!r} matches nothing: "
                                     f"{why}")
        wd = weight_decay if g.weight_decay is None else g.weight_decay
        out.append(ResolvedGroup(g.pattern, g.lr_mult, learning_rate * g.lr_mult, wd, [x for x, _ in m],
                                 sum(n for _, n in m)))
    if rest:
        out.append(ResolvedGroup("(default)", stage.default_lr_mult, learning_rate * stage.default_lr_mult,
                                 weight_decay, [x for x, _ in rest], sum(n for _, n in rest)))
    if all(g.frozen for g in out):
        raise DistillConfigError(f"stage {stage.name!r} freezes every parameter of the model")
    return out


def apply_groups(model: torch.nn.Module, groups: list[ResolvedGroup]) -> list[dict]:
    """Set ``requires_grad`` (off for multiplier 0) and return optimizer parameter groups for the trained ones."""
    params = dict(model.named_parameters())
    param_groups = []
    for g in groups:
        for name in g.names:
            params[name].requires_grad_(not g.frozen)
        if not g.frozen:
            param_groups.append({"params": [params[n] for n in g.names], "lr": g.lr, "weight_decay": g.weight_decay,
                                 "name": g.pattern})
    return param_groups


def log_groups(stage_index: int, stage: StageConfig, groups: list[ResolvedGroup]) -> None:
    log_main("stage %d%s: %d steps, parameter groups:", stage_index + 1, f" ({stage.name})" if stage.name else "",
             stage.steps)
    log_main("  %-48s %8s %12s %10s %6s", "pattern", "tensors", "parameters", "lr", "wd")
    for g in groups:
        log_main("  %-48s %8d %12d %10s %6g", g.pattern[:48], len(g.names), g.numel,
                 "frozen" if g.frozen else f"{g.lr:.3g}", g.weight_decay)


# ---------------------------------------------------------------------------------------------- data

class DistillDataset(torch.utils.data.Dataset):
    """``num_samples`` cache sequences in a fixed order: pass e over the cache uses permutation(seed + e).

    Read sequentially, sample i of the run is a function of i alone, which is what makes a resumed run (that
    skips the samples already trained) see the same batches as an uninterrupted one.
    """

    def __init__(self, cache: TeacherCacheDataset, num_samples: int, seed: int, shuffle: bool, offset: int = 0):
        """Samples ``offset .. offset + num_samples - 1`` of the run's order (a stage's share of the run)."""
        self.cache, self.num_samples, self.seed, self.shuffle, self.offset = cache, num_samples, seed, shuffle, offset
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def index(self, i: int) -> int:
        n = len(self.cache)
        epoch, j = divmod(i, n)
        if not self.shuffle:
            return j
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._perms[epoch][j])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return self.cache[self.index(self.offset + i)]


# ------------------------------------------------------------------------------------------- trainer

def distill_loss(model, inputs: dict, cfg: DistillConfig):
    """The student's forward and its KD loss on one batch of the cache.

    Args:
        model: the student (or its DeepSpeed engine).
        inputs: a collated ``TeacherCacheDataset`` batch: input_ids [B, T] int64, topk_ids [B, T, k] int64,
            topk_logits [B, T, k] float32, logsumexp [B, T] float32, optionally attention_mask [B, T].
        cfg: alpha, temperature, kd_tail and kd_chunk_size are used.

    Returns:
        (KDLoss, model outputs). Labels are the input ids (shifted inside the loss); padding is ignored.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    outputs = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
    r = chunked_kd_loss(outputs.logits, labels, inputs["topk_ids"], inputs["topk_logits"], inputs["logsumexp"],
                        alpha=cfg.alpha, temperature=cfg.temperature, tail=cfg.kd_tail, attention_mask=mask,
                        chunk_size=cfg.kd_chunk_size)
    return r, outputs


def _trainer_base():
    from transformers import Trainer

    return Trainer


class _DistillTrainerMixin:
    """The parts of the Trainer this stage changes (kept in a mixin so importing moe_ds.distill stays light)."""

    def setup_stage(self, cfg: DistillConfig, stage_index: int, groups: list[ResolvedGroup], ds_cfg: dict | None):
        self.distill_cfg, self.stage_index, self.groups, self.ds_cfg = cfg, stage_index, groups, ds_cfg
        self.stage = cfg.stages[stage_index]
        self.stage_start, self.stage_end = cfg.stage_bounds()[stage_index]
        self._kd_sums = torch.zeros(3, dtype=torch.float64)  # ce sum, kl sum, micro-batches since the last log
        self._tokens = 0
        self._last_log_time = time.time()

    # -- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r, outputs = distill_loss(model, inputs, self.distill_cfg)
        if model.training:
            self._kd_sums += torch.tensor([float(r.ce), float(r.kl), 1.0], dtype=torch.float64)
            self._tokens += inputs["input_ids"].numel()
        return (r.loss, outputs) if return_outputs else r.loss

    def _prepare_inputs(self, inputs):
        # The Trainer casts floating inputs to the DeepSpeed dtype; the teacher's logsumexp (~10-20 nats) would
        # lose ~0.05 in bf16, so the cached teacher values stay float32 and are only moved to the device.
        return {k: v.to(self.args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    # -- optimizer and schedule, rebuilt per stage
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = apply_groups(self.model, self.groups)
            betas = (self.args.adam_beta1, self.args.adam_beta2)
            if _offloads_optimizer(self.ds_cfg):
                # ZeRO-Offload keeps fp32 states on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once).
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                self.optimizer = DeepSpeedCPUAdam(groups, lr=self.args.learning_rate, betas=betas,
                                                  eps=self.args.adam_epsilon, adamw_mode=True)
            else:
                self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=betas,
                                                   eps=self.args.adam_epsilon)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        from transformers import get_scheduler

        if self.lr_scheduler is None:
            ratio = self.distill_cfg.warmup_ratio if self.stage.warmup_ratio is None else self.stage.warmup_ratio
            self.lr_scheduler = get_scheduler(self.distill_cfg.lr_scheduler, optimizer=optimizer or self.optimizer,
                                              num_warmup_steps=int(round(ratio * self.stage.steps)),
                                              num_training_steps=self.stage.steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- data order: sequential over DistillDataset (its order is already seeded)
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        # The stage's dataset holds exactly its own samples (one "epoch" = the stage), while step numbers stay
        # global: a fresh stage starts at its first global step, a resumed one skips the batches it trained.
        super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                                     trial)
        if resume_from_checkpoint is None:
            self.state.global_step = self.stage_start
        return 0, (self.state.global_step - self.stage_start) * self.args.gradient_accumulation_steps

    # -- logging: CE and KL separately, global tokens/s
    def log(self, logs: dict, start_time=None):
        if "loss" in logs:
            sums = torch.cat([self._kd_sums, torch.tensor([float(self._tokens)], dtype=torch.float64)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            now = time.time()
            if sums[2] > 0:
                logs["ce"] = round(float(sums[0] / sums[2]), 5)
                logs["kl"] = round(float(sums[1] / sums[2]), 5)
            logs["tokens_per_s"] = round(float(sums[3]) / max(now - self._last_log_time, 1e-9), 1)
            # The Trainer's learning_rate is its first optimizer group's; "lr" is the run's base rate times the
            # stage's schedule, the same whatever the groups' multipliers.
            trained = [g for g in self.groups if not g.frozen]
            if "learning_rate" in logs and trained:
                factor = float(logs["learning_rate"]) / trained[0].lr
                logs["lr"] = factor * self.distill_cfg.learning_rate
            logs["stage"] = self.stage_index + 1
            self._kd_sums.zero_()
            self._tokens, self._last_log_time = 0, now
        super().log(logs, start_time)


def make_trainer_class():
    """``DistillTrainer``: the Trainer with the KD loss, per-stage groups and schedule, and fixed data order."""
    return type("DistillTrainer", (_DistillTrainerMixin, _trainer_base()), {})


# ----------------------------------------------------------------------------------------- callbacks

def _callbacks(cfg: DistillConfig, stage_index: int):
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """Saves at the end of the stage; completes every checkpoint folder and marks it complete, last."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == cfg.stage_bounds()[stage_index][1]:
                control.should_save = True
            return control

        def on_save(self, args, state, control, model=None, **kw):
            ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            barrier()  # every rank's DeepSpeed shards are on disk
            if dist_info().is_main:
                # The Trainer wrote model.safetensors + config.json (rank 0) and the tokenizer; a shared-core
                # student also needs its modeling files (trust_remote_code) and statistics, like save_compressed.
                finish_checkpoint(ckpt, model.config)
                marker = {"step": state.global_step, "stage": stage_index + 1,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                write_text_atomic(ckpt / CHECKPOINT_COMPLETE, json.dumps(marker) + "\n")
            if os.environ.get(PROBE_ENV):
                _probe(model, Path(args.output_dir), state.global_step)
            barrier()  # the next stage (all ranks) may load this checkpoint
            log_main("checkpoint %s complete", ckpt)
            return control

    class JsonlLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                row = {"step": state.global_step, "stage": logs.get("stage"), "loss": logs.get("loss"),
                       "ce": logs.get("ce"), "kl": logs.get("kl"), "lr": logs.get("lr", logs.get("learning_rate")),
                       "grad_norm": logs.get("grad_norm"), "tokens_per_s": logs.get("tokens_per_s"),
                       "time": round(time.time(), 3)}
                with open(Path(args.output_dir) / LOG_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
            return control

    return [CheckpointCallback(), JsonlLogCallback()]


def _probe(model, output: Path, step: int) -> None:
    """Test hook (PROBE_ENV): the in-training model's logits on fixed input ids, next to the checkpoint."""
    ids = torch.load(output / "probe_input.pt")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    model.train(was_training)
    if dist_info().is_main:
        torch.save(logits, output / f"probe-{step}.pt")


# ----------------------------------------------------------------------------------- preflight checks

def _student_config(cfg: DistillConfig):
    """The student's config, validated without loading weights.

    Raises:
        CheckpointError: not a model directory, or a compressed checkpoint whose weights do not match.
    """
    from transformers import AutoConfig

    path = Path(cfg.student)
    if not path.is_dir():
        raise CheckpointError(f"student {path} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"student {path} has no config.json: not a model directory")
    if is_compressed_checkpoint(path):
        return validate_compressed_checkpoint(path)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.index.json"))
    if not has_weights:
        raise CheckpointError(f"student {path} holds a config.json but no weights (*.safetensors / *.bin)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"student {path}: cannot read its config: {e}") from e


def _param_names(config, trust_remote_code: bool) -> list[tuple[str, int]]:
    """(name, numel) of every parameter, from a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from .modeling_shared_core import shared_core_classes

    with torch.device("meta"):
        if isinstance(getattr(config, "shared_core", None), dict):
            model = shared_core_classes(config.model_type)[1](config)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [(n, p.numel()) for n, p in model.named_parameters()]


@dataclass
class Prepared:
    """Everything checked before training: what ``run_distill`` needs to start or resume."""

    ds_cfg: dict | None
    tokenizer: object
    cache: TeacherCacheDataset
    groups: list  # per stage, list[ResolvedGroup]
    start_step: int  # global step of the newest complete checkpoint (0 for a fresh run)
    resume_from: Path | None  # that checkpoint


def prepare(cfg: DistillConfig) -> Prepared:
    """Every check that can refuse a run, before DeepSpeed or the student's weights are touched.

    Raises:
        DistillConfigError: bad DeepSpeed config, group pattern matching nothing, output with checkpoints but no
            ``resume``, no tokenizer.
        CheckpointError: the student is not a model directory / a broken compressed checkpoint.
        moe_ds.teacher_cache.CacheFormatError: missing, incomplete or corrupted cache.
        moe_ds.teacher_cache.TokenizerMismatchError: the cache was written with another tokenizer/vocabulary.
    """
    from transformers import AutoTokenizer

    ds_cfg = check_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None
    config = _student_config(cfg)
    tok_path = cfg.tokenizer or cfg.student
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"no tokenizer in {tok_path} ({e}); pass --tokenizer DIR") from e
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cache = TeacherCacheDataset(cfg.teacher_cache, tokenizer=tokenizer, vocab_size=int(text_config.vocab_size))
    names = _param_names(config, cfg.trust_remote_code)
    groups = [resolve_groups(names, s, cfg.learning_rate, cfg.weight_decay) for s in cfg.stages]

    output = Path(cfg.output)
    done = complete_checkpoints(output) if output.is_dir() else []
    if done and not cfg.resume:
        raise DistillConfigError(f"{output} already holds checkpoints (newest {done[-1].name}); pass --resume to "
                                 "continue that run or choose another --output")
    start = checkpoint_step(done[-1]) if done else 0
    previous = output / CONFIG_FILE
    if done and previous.is_file():
        # The data order and the stage boundaries are functions of these; a resume that changes them would
        # silently train on other batches or rebuild the optimizer at another step.
        old, new = json.loads(previous.read_text()), cfg.to_dict()
        changed = [k for k in ("stages", "batch_size", "gradient_accumulation_steps", "seed", "shuffle")
                   if old.get(k) != new[k]]
        if changed:
            raise DistillConfigError(f"{output} was started with other {', '.join(changed)} (see {previous}); "
                                     "resume with the same settings or choose another --output")
    if start > cfg.max_steps:
        raise DistillConfigError(f"{output}: newest checkpoint is step {start}, beyond max_steps {cfg.max_steps}")
    return Prepared(ds_cfg, tokenizer, cache, groups, start, done[-1] if done else None)


# ------------------------------------------------------------------------------------------- running

def _cpu_shims(bf16: bool, use_deepspeed: bool) -> dict:
    """Workarounds for the Trainer + DeepSpeed on a GPU-less machine (../shared/CPU_DEEPSPEED.md, measured).

    Returns extra TrainingArguments keyword arguments.
    """
    if torch.cuda.is_available():
        return {}
    import accelerate
    import transformers.training_args as ta

    if bf16:  # the bf16 check only knows GPUs; CPUs with avx512_bf16 train bf16
        ta.is_torch_bf16_gpu_available = lambda *a, **k: True
    if not use_deepspeed:
        return {}
    disable_deepspeed_shm_op()
    # accelerate picks no backend without a GPU, so the Trainer would think the world size is 1.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        accelerate.PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}


def _training_arguments(cfg: DistillConfig):
    from transformers import TrainingArguments

    extra = _cpu_shims(cfg.bf16, use_deepspeed=bool(cfg.deepspeed))
    report = [] if cfg.report_to in ("none", "") else [cfg.report_to]
    return TrainingArguments(
        output_dir=cfg.output, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=cfg.seed, data_seed=cfg.seed, deepspeed=cfg.deepspeed, report_to=report or "none",
        run_name=cfg.run_name or Path(cfg.output).resolve().name, remove_unused_columns=False,
        dataloader_num_workers=0, **extra)


def _clean_after(output: Path, step: int) -> None:
    """Drop what a stopped run left past ``step``: incomplete checkpoint folders and later log lines."""
    for p in output.glob(f"{CHECKPOINT_PREFIX}*"):
        s = checkpoint_step(p)
        if s is not None and s > step and not (p / CHECKPOINT_COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
    log = output / LOG_FILE
    if log.is_file():
        keep = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(log, "".join(line + "\n" for line in keep))


def _load_student(path: str | Path, cfg: DistillConfig):
    """Load on every rank (under an active HfDeepSpeedConfig ZeRO-3 partitions at construction)."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    try:
        if is_compressed_checkpoint(path):
            return load_model(path, dtype=dtype)
        return load_model(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise CheckpointError(f"cannot load the student from {path}: {e}") from e


def run_distill(cfg: DistillConfig) -> Path | None:
    """Distil on this rank (call on every rank of the launcher); returns the last checkpoint (None: nothing to do).

    Raises:
        See ``prepare``: every refusal happens before the first step.
    """
    info = dist_info()
    setup_logging(info)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    prep = prepare(cfg)
    output = Path(cfg.output)
    bounds = cfg.stage_bounds()
    if prep.start_step >= cfg.max_steps:
        log_main("%s is complete (step %d of %d); nothing to do", output, prep.start_step, cfg.max_steps)
        return prep.resume_from

    os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(output))
    # TrainingArguments first: they make the HfDeepSpeedConfig that ZeRO-3 construction (zero.Init) needs.
    args = _training_arguments(cfg)
    world = args.world_size
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world
    num_samples = cfg.max_steps * global_batch
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _clean_after(output, prep.start_step)
        resolved = {**cfg.to_dict(), "world_size": world, "global_batch": global_batch}
        for key in ("student", "teacher_cache", "output", "deepspeed", "tokenizer"):
            resolved[key] = str(Path(resolved[key]).resolve()) if resolved[key] else None
        write_text_atomic(output / CONFIG_FILE, json.dumps(resolved, indent=2) + "\n")
    barrier()
    meta = prep.cache.meta
    log_main("student %s, cache %s (%d sequences x %d tokens, k=%d, teacher %s), %d ranks, global batch %d "
             "sequences = %d tokens/step; %d steps read %.2f passes over the cache", cfg.student, cfg.teacher_cache,
             len(prep.cache), meta.seq_len, meta.k, meta.teacher_name, world, global_batch,
             global_batch * meta.seq_len, cfg.max_steps, num_samples / len(prep.cache))
    log_main("loss = (1 - %g) * CE + %g * %g^2 * KL (tail: %s)", cfg.alpha, cfg.alpha, cfg.temperature, cfg.kd_tail)

    from transformers import default_data_collator

    trainer_cls = make_trainer_class()
    step, last = prep.start_step, prep.resume_from
    first = next(i for i, (_, end) in enumerate(bounds) if end > step)
    for i in range(first, len(cfg.stages)):
        start, end = bounds[i]
        resume = last if (last is not None and step > start) else None  # mid-stage: DeepSpeed state too
        source = last if last is not None else cfg.student
        log_main("stage %d/%d: steps %d..%d, model from %s%s", i + 1, len(cfg.stages), start + 1, end, source,
                 ", resuming optimizer and data position" if resume is not None else "")
        model = _load_student(source, cfg)
        model.config.use_cache = False
        log_groups(i, cfg.stages[i], prep.groups[i])
        if any(g.frozen for g in prep.groups[i]):
            # ZeRO-3 re-gathers a module's parameters before its backward through hooks on tensors that require
            # grad; with frozen embeddings nothing below the first trainable weight does, and a released
            # (numel 0) parameter meets its gradient. Making the embedding output require grad keeps the
            # hooks firing (measured: "size of tensor a (0) must match ..." in AccumulateGrad without it).
            model.enable_input_require_grads()
        args.max_steps = end
        dataset = DistillDataset(prep.cache, (end - start) * global_batch, cfg.seed, cfg.shuffle,
                                 offset=start * global_batch)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                              processing_class=prep.tokenizer, callbacks=_callbacks(cfg, i))
        trainer.setup_stage(cfg, i, prep.groups[i], prep.ds_cfg)
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        step, last = end, output / f"{CHECKPOINT_PREFIX}{end}"
        engine = getattr(trainer, "model_wrapped", None)
        if hasattr(engine, "destroy"):  # drop ZeRO-3 hooks and buffers before the next stage's engine
            engine.destroy()
        del trainer, model, engine
        gc.collect()
        # accelerate refuses a second Accelerator with a DeepSpeed plugin in one process; the next stage's
        # Trainer gets a fresh AcceleratorState (the process group, held by PartialState, stays).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        barrier()
    log_main("distillation done: %s", last)
    return last

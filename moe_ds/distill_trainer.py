"""The distillation Trainer: KD loss on cached teacher top-k, per-stage optimizer and schedule, data order, callbacks.

``DistillTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is ``distill_loss``: the chunked KD loss of
``moe_ds.kd_loss`` against the cached top-k or a live teacher (``moe_ds.online_teacher``), plus the feature term of
``moe_ds.features`` when layers are chosen; it reads a ``DistillDataset`` in order (the order is a seeded function of the sample index, so a resumed run sees
the batches of an uninterrupted one) and logs CE, KL, the feature term, the scheduled rate and global tokens/s. Every checkpoint
is completed in the compressed format and marked ``CHECKPOINT_COMPLETE`` last, after a barrier.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .checkpoint import finish_checkpoint
from .dist import all_reduce_sum, barrier, disable_deepspeed_shm_op, dist_info, log_main
from .distill_config import DistillConfig, offloads_optimizer
from .distill_params import ResolvedGroup, apply_groups
from .features import feature_loss
from .kd_loss import chunked_full_kd_loss, chunked_kd_loss
from .qat import QUANTIZED_PREFIX, FakeQuantization, fake_quantize_checkpoint, write_quantized
from .run_layout import CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, prune_training_state, write_atomic, write_json_atomic
from .sparsity import USAGE_FILE, ExpertUsage, MaskedGradients, dense_expert_parameters
from .teacher_cache import TeacherCacheDataset

LOG_FILE = "train_log.jsonl"  # one JSON object per logging step, in the output directory
# Test-only: after saving the checkpoint of this step every rank runs the student on the input ids stored in
# <output>/probe_input.pt and rank 0 writes the logits to <output>/probe-<step>.pt (compared in a fresh process).
PROBE_ENV = "MOE_DS_DISTILL_PROBE"


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
        """The cache sequence read as sample ``i`` of the run."""
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


@dataclass
class LossTerms:
    """One batch's distillation loss: ``loss`` carries the gradient; the terms are detached, for logging."""

    loss: torch.Tensor  # scalar float32: (1 - alpha) CE + alpha tau^2 KL + beta * feature
    ce: torch.Tensor  # scalar float32, mean next-token cross-entropy, nats
    kl: torch.Tensor  # scalar float32, mean KL at temperature tau, nats (before tau^2)
    feature: torch.Tensor | None = None  # scalar float32, sum over layers of the normalised feature distance


def distill_loss(model, inputs: dict, cfg: DistillConfig, teacher=None, student_features=None) -> tuple[LossTerms,
                                                                                                         object]:
    """The student's forward and its distillation loss on one batch.

    Args:
        model: the student (or its DeepSpeed engine).
        inputs: a collated batch: input_ids [B, T] int64, optionally attention_mask [B, T]; from the cache also
            topk_ids [B, T, k] int64, topk_logits [B, T, k] float32, logsumexp [B, T] float32 and, when the cache
            holds features, teacher_features [B, L, T, H].
        cfg: alpha, temperature, kd_tail, kd_chunk_size, feature_weight and feature_loss are used.
        teacher: a live ``moe_ds.online_teacher.OnlineTeacher`` (None: the targets are in ``inputs``); run first,
            under no_grad, on the same input ids.
        student_features: ``moe_ds.features.FeatureHooks`` on the student (None: no feature term).

    Returns:
        (LossTerms, model outputs). Labels are the input ids (shifted inside the loss); padding is ignored. The KL
        is ``chunked_kd_loss`` on a top-k (cached, or the live teacher's ``teacher_top_k``) or
        ``chunked_full_kd_loss`` on the live teacher's full logits: the same loss code.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    targets = teacher(input_ids, mask) if teacher is not None else inputs
    if student_features is not None:
        student_features.clear()
    outputs = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
    if "teacher_logits" in targets:
        r = chunked_full_kd_loss(outputs.logits, labels, targets["teacher_logits"], alpha=cfg.alpha,
                                 temperature=cfg.temperature, attention_mask=mask, chunk_size=cfg.kd_chunk_size)
    else:
        r = chunked_kd_loss(outputs.logits, labels, targets["topk_ids"], targets["topk_logits"], targets["logsumexp"],
                            alpha=cfg.alpha, temperature=cfg.temperature, tail=cfg.kd_tail, attention_mask=mask,
                            chunk_size=cfg.kd_chunk_size)
    if student_features is None:
        return LossTerms(r.loss, r.ce, r.kl), outputs
    feats = targets["teacher_features"]
    if isinstance(feats, torch.Tensor):  # cached: [B, L, T, H]
        feats = list(feats.unbind(1))
    feature, _ = feature_loss(student_features.take(), feats, cfg.feature_loss, mask)
    return LossTerms(r.loss + cfg.feature_weight * feature, r.ce, r.kl, feature.detach()), outputs


class DistillTrainer(Trainer):
    """The Trainer for one stage: KD loss, the stage's parameter groups and schedule, fixed data order."""

    def __init__(self, *, distill_cfg: DistillConfig, stage_index: int, groups: list[ResolvedGroup],
                 ds_cfg: dict | None = None, sparsity: dict | None = None, usage: ExpertUsage | None = None,
                 qat: FakeQuantization | None = None, teacher=None, student_features=None, **kwargs):
        """``kwargs`` go to ``Trainer``; the stage's checkpoint and log callbacks are added to its ``callbacks``.

        Args:
            sparsity: the student's ``moe_ds_sparsity`` section when its pruned expert weights must stay zero
                (``keep_masks``): their gradients are masked (``moe_ds.sparsity.MaskedGradients``) and the number
                held at zero is logged as ``zeros_held``.
            usage: router usage counters (``moe_ds.sparsity.ExpertUsage``) fed by the training forwards and saved
                as ``expert_usage.json`` in every checkpoint.
            qat: the stage's fake quantization (``moe_ds.qat.FakeQuantization``, already installed on the model):
                its relative error is logged as ``fq_error`` (experts) and ``fq_error_router``; the stage's last
                checkpoint is written quantized (``CheckpointCallback``).
            teacher: the live teacher (``moe_ds.online_teacher.OnlineTeacher``); None: targets from the cache.
            student_features: feature hooks on the student (``moe_ds.features.FeatureHooks``); its term is logged
                as ``feature``.
        """
        start, end = distill_cfg.stage_bounds()[stage_index]
        callbacks = [*(kwargs.pop("callbacks", None) or []),
                     CheckpointCallback(end, stage_index, distill_cfg.keep_training_state, usage, start,
                                        distill_cfg.stages[stage_index].quantization if qat is not None else None),
                     JsonlLogCallback()]
        super().__init__(callbacks=callbacks, **kwargs)
        self.distill_cfg, self.stage_index, self.groups, self.ds_cfg = distill_cfg, stage_index, groups, ds_cfg
        self.sparsity, self.usage, self.masks, self.qat = sparsity, usage, None, qat
        self.stage, self.stage_start = distill_cfg.stages[stage_index], start
        self.teacher, self.student_features = teacher, student_features
        # ce sum, kl sum, feature sum, micro-batches since the last log
        self._kd_sums = torch.zeros(4, dtype=torch.float64)
        self._tokens = 0
        self._last_log_time = time.time()

    # -- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Usage counts the training forward only: not gradient checkpointing's recomputation in the backward.
        counting = self.usage.counting() if self.usage is not None and model.training else contextlib.nullcontext()
        with counting:
            r, outputs = distill_loss(model, inputs, self.distill_cfg, self.teacher, self.student_features)
        if model.training:
            feature = float(r.feature) if r.feature is not None else 0.0
            self._kd_sums += torch.tensor([float(r.ce), float(r.kl), feature, 1.0], dtype=torch.float64)
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
            if offloads_optimizer(self.ds_cfg):
                # ZeRO-Offload keeps fp32 states on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once).
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                self.optimizer = DeepSpeedCPUAdam(groups, lr=self.args.learning_rate, betas=betas,
                                                  eps=self.args.adam_epsilon, adamw_mode=True)
            else:
                self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=betas,
                                                   eps=self.args.adam_epsilon)
            if self.sparsity is not None and self.masks is None:
                # After apply_groups: only parameters that require grad take hooks (frozen ones cannot move).
                dense = dense_expert_parameters(self.model)
                if dense:
                    self.masks = MaskedGradients(dense)
                    zeros, total = self.masks.zeros()
                    log_main("holding %d of %d expert weights (%.2f%%) at zero: their gradients are masked "
                             "(moe_ds_sparsity: %s, density %.4g)", zeros, total, 100 * zeros / max(total, 1),
                             self.sparsity["method"], self.sparsity["density"])
                else:
                    log_main("moe_ds_sparsity is set but the student holds no dense expert weights (%s): nothing "
                             "is masked", self.model.config.model_type)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        from transformers import get_scheduler

        if self.lr_scheduler is None:
            ratio = self.distill_cfg.warmup_ratio if self.stage.warmup_ratio is None else self.stage.warmup_ratio
            self.lr_scheduler = get_scheduler(self.distill_cfg.lr_scheduler, optimizer=optimizer or self.optimizer,
                                              num_warmup_steps=round(ratio * self.stage.steps),
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
            sums = all_reduce_sum(sums)  # on the rank's GPU under NCCL, which has no CPU tensors
            now = time.time()
            if sums[3] > 0:
                # significant digits, not decimals: a KL of 3e-6 (an almost untrained toy) must not read as 0
                logs["ce"] = float(f"{float(sums[0] / sums[3]):.6g}")
                logs["kl"] = float(f"{float(sums[1] / sums[3]):.6g}")
                if self.student_features is not None:
                    logs["feature"] = float(f"{float(sums[2] / sums[3]):.6g}")
            logs["tokens_per_s"] = round(float(sums[4]) / max(now - self._last_log_time, 1e-9), 1)
            # The Trainer's learning_rate is its first optimizer group's; "lr" is the run's base rate times the
            # stage's schedule, the same whatever the groups' multipliers.
            trained = [g for g in self.groups if not g.frozen]
            if "learning_rate" in logs and trained:
                factor = float(logs["learning_rate"]) / trained[0].lr
                logs["lr"] = factor * self.distill_cfg.learning_rate
            logs["stage"] = self.stage_index + 1
            if self.masks is not None:
                logs["zeros_held"] = self.masks.zeros()[0]
            if self.qat is not None:
                errors = self.qat.error()
                if "experts" in errors:
                    logs["fq_error"] = float(f"{errors['experts']:.6g}")
                if "router" in errors:
                    logs["fq_error_router"] = float(f"{errors['router']:.6g}")
            self._kd_sums.zero_()
            self._tokens, self._last_log_time = 0, now
        super().log(logs, start_time)


    def remove_hooks(self) -> None:
        """Drop the gradient masks, usage and feature hooks and fake quantization from the model (the stage is
        over)."""
        for hooks in (self.masks, self.usage, self.qat, self.student_features):
            if hooks is not None:
                hooks.remove()


class CheckpointCallback(TrainerCallback):
    """Saves at the end of the stage; completes every checkpoint folder (and writes the routers' usage since the
    stage started, ``expert_usage.json``) and marks it complete, last; then drops the optimizer/DeepSpeed state of
    all but the newest ``keep_training_state`` complete checkpoints (at Qwen3-30B-A3B scale that state is ~80 GB per
    checkpoint; the evaluator reads only the weights)."""

    def __init__(self, stage_end: int, stage_index: int, keep_training_state: int | None = 1,
                 usage: ExpertUsage | None = None, stage_start: int = 0, quantization: dict | None = None):
        self.stage_end, self.stage_index, self.keep = stage_end, stage_index, keep_training_state
        self.usage, self.stage_start, self.quantization = usage, stage_start, quantization

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.stage_end:
            control.should_save = True
        return control

    def on_save(self, args, state, control, model=None, **kw):
        ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        totals = self.usage.totals() if self.usage is not None else None  # every rank: one all-reduce
        barrier()  # every rank's DeepSpeed shards are on disk
        if dist_info().is_main:
            if totals is not None:
                write_json_atomic(ckpt / USAGE_FILE, self.usage.to_dict(totals, step=state.global_step,
                                                                        stage=self.stage_index + 1,
                                                                        since_step=self.stage_start))
            # The Trainer wrote model.safetensors + config.json (rank 0) and the tokenizer; a shared-core
            # student also needs its modeling files (trust_remote_code) and statistics, like save_compressed.
            finish_checkpoint(ckpt, model.config)
            if self.quantization is not None and state.global_step == self.stage_end:
                # QAT stage end: the packed model from the latent weights, then the checkpoint's own weights become
                # their fake-quantized values (what the next stage and the evaluator start from); both before the
                # completion marker, so a stop in between redoes them.
                dst = write_quantized(ckpt, Path(args.output_dir) / f"{QUANTIZED_PREFIX}{state.global_step}",
                                      self.quantization)
                n = fake_quantize_checkpoint(ckpt, self.quantization, model.config.model_type)
                log_main("QAT stage end: quantized model %s; %s holds its %d fake-quantized tensors", dst, ckpt.name, n)
            marker = {"step": state.global_step, "stage": self.stage_index + 1,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_atomic(ckpt / CHECKPOINT_COMPLETE, json.dumps(marker) + "\n")
            for old in prune_training_state(args.output_dir, self.keep):
                log_main("dropped the training state of %s (weights kept; --keep-training-state %s)", old.name,
                         self.keep)
        if os.environ.get(PROBE_ENV):
            _probe(model, Path(args.output_dir), state.global_step)
        barrier()  # the next stage (all ranks) may load this checkpoint
        log_main("checkpoint %s complete", ckpt)
        return control


class JsonlLogCallback(TrainerCallback):
    """Rank 0 appends one line per logging step to ``<output>/train_log.jsonl``."""

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            row = {"step": state.global_step, "stage": logs.get("stage"), "loss": logs.get("loss"),
                   "ce": logs.get("ce"), "kl": logs.get("kl"), "lr": logs.get("lr", logs.get("learning_rate")),
                   "grad_norm": logs.get("grad_norm"), "tokens_per_s": logs.get("tokens_per_s"),
                   "time": round(time.time(), 3)}
            for key in ("feature", "zeros_held", "fq_error", "fq_error_router"):
                if key in logs:
                    row[key] = logs[key]
            with open(Path(args.output_dir) / LOG_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
        return control


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


# ------------------------------------------------------------------------------------- training arguments

def _cpu_shims(bf16: bool, use_deepspeed: bool) -> dict:
    """Workarounds for the Trainer + DeepSpeed on a GPU-less machine (measured); extra TrainingArguments kwargs."""
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


def training_arguments(cfg: DistillConfig) -> TrainingArguments:
    """The run's TrainingArguments: ``cfg.training_arguments()`` plus what this stage fixes (saving, logging, data).

    Build them before the model: with a DeepSpeed config they make the HfDeepSpeedConfig that ZeRO-3
    construction (``zero.Init``) needs.
    """
    extra = _cpu_shims(cfg.bf16, use_deepspeed=cfg.deepspeed is not None)
    report = [] if cfg.report_to in ("none", "") else [cfg.report_to]
    return TrainingArguments(
        output_dir=cfg.output, **cfg.training_arguments(), data_seed=cfg.seed,
        logging_first_step=True, save_strategy="steps", deepspeed=cfg.deepspeed, report_to=report or "none",
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        run_name=cfg.run_name or Path(cfg.output).resolve().name, remove_unused_columns=False, **extra)

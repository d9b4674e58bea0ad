"""Stage 3: distil the compressed student against the cached teacher top-k, one Trainer per training stage.

Each stage gets a fresh model, Trainer, DeepSpeed engine, optimizer and schedule, because ZeRO partitions the
optimizer over the parameters that require gradients when the engine is built; stage i + 1 loads the
consolidated checkpoint that ends stage i. Step numbers are global: checkpoints are ``checkpoint-<step>``.
Every refusal happens in ``prepare``, before DeepSpeed or the weights are touched. Settings live in
``moe_ds.distill_config``, parameter groups in ``moe_ds.distill_params``, the Trainer in
``moe_ds.distill_trainer``; their public names are re-exported here.
"""

import gc
import importlib.util
import json
import logging
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, is_compressed_checkpoint, load_model, read_weight_shapes,
                         validate_compressed_checkpoint)
from .dist import barrier, dist_info, log_main, setup_logging
from .distill_config import (CONFIG_FILE, DEFAULT_DEEPSPEED, DistillConfig, DistillConfigError, GroupConfig,
                             StageConfig, check_deepspeed_config, parse_group, stage_from_groups)
from .distill_params import ResolvedGroup, apply_groups, log_groups, resolve_groups
from .distill_trainer import LOG_FILE, PROBE_ENV, DistillDataset, DistillTrainer, distill_loss, training_arguments
from .run_layout import (CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, check_output_dir, checkpoint_step,
                         complete_checkpoints, has_training_state, write_atomic)
from .teacher_cache import CacheFormatError, TeacherCacheDataset

__all__ = ["CONFIG_FILE", "DEFAULT_DEEPSPEED", "LOG_FILE", "PROBE_ENV", "CheckpointWriteError", "DistillConfig",
           "DistillConfigError", "DistillDataset", "DistillTrainer", "GroupConfig", "Prepared", "ResolvedGroup",
           "StageConfig", "apply_groups", "check_deepspeed_config", "distill_loss", "log_groups", "parse_group",
           "prepare", "resolve_groups", "run_distill", "stage_from_groups", "training_arguments"]

# A resume must keep these: the data order and the stage boundaries are functions of them.
_RESUME_KEYS = ("stages", "batch_size", "gradient_accumulation_steps", "seed", "shuffle")


# ----------------------------------------------------------------------------------- preflight checks

def _student_config(cfg: DistillConfig):
    """The student's config, validated without loading weights.

    Raises:
        CheckpointError: not a model directory, unreadable safetensors headers, or a compressed checkpoint whose
            weights do not match.
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
    if any(path.glob("*.safetensors")):
        read_weight_shapes(path)  # headers only: a truncated or corrupted file is refused before training starts
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


def _check_positions(cfg: DistillConfig, seq_len: int, text_config) -> None:
    """Refuse cached sequences longer than the student's context (its logits degrade past the trained positions).

    Raises:
        DistillConfigError: ``seq_len`` exceeds the student config's ``max_position_embeddings``.
    """
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DistillConfigError(f"teacher cache {cfg.teacher_cache} holds sequences of {seq_len} tokens, beyond the "
                                 f"student's max_position_embeddings {limit} ({Path(cfg.student) / 'config.json'}): "
                                 f"positions past {limit} were never trained; rebuild the cache with --seq-len "
                                 f"{limit} or less")


@dataclass
class Prepared:
    """Everything checked before training: what ``run_distill`` needs to start or resume."""

    ds_cfg: dict | None  # the parsed DeepSpeed config (None: plain Trainer)
    tokenizer: object  # the student's (or --tokenizer's) tokenizer
    cache: TeacherCacheDataset  # the teacher cache, checked against the tokenizer and vocabulary
    groups: list[list[ResolvedGroup]]  # per stage, its resolved parameter groups
    start_step: int  # global step of the newest complete checkpoint (0 for a fresh run)
    resume_from: Path | None  # that checkpoint


def prepare(cfg: DistillConfig) -> Prepared:
    """Every check that can refuse a run, before DeepSpeed or the student's weights are touched.

    Raises:
        DistillConfigError: bad DeepSpeed config, group pattern matching nothing, output with checkpoints but no
            ``resume`` (or a resume with other stages, batch sizes or seed), no tokenizer, cached sequences longer
            than the student's ``max_position_embeddings``.
        moe_ds.run_layout.OutputError: the output is a file (or below one) or cannot be written.
        CheckpointError: the student is not a model directory / a broken compressed checkpoint.
        moe_ds.teacher_cache.CacheFormatError: missing, incomplete or corrupted cache, or a folder in its place.
        moe_ds.teacher_cache.TokenizerMismatchError: the cache was written with another tokenizer/vocabulary.
    """
    from transformers import AutoTokenizer

    ds_cfg = check_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None
    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:  # the Trainer fails after loading
        raise DistillConfigError("report_to is wandb but wandb is not installed: install it (requirements.txt) or "
                                 "pass --report-to none")
    check_output_dir(cfg.output)
    config = _student_config(cfg)
    tok_path = cfg.tokenizer or cfg.student
    # The student's own config, when the tokenizer is the student's: AutoTokenizer would otherwise reread it and
    # warn that a shared-core model type is not one it knows.
    tok_config = {"config": config} if cfg.tokenizer is None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code, **tok_config)
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"no tokenizer in {tok_path} ({e}); pass --tokenizer DIR") from e
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if Path(cfg.teacher_cache).is_dir():  # HDF5 would say so in a multi-line message
        raise CacheFormatError(f"teacher cache {cfg.teacher_cache} is a folder; give the .h5 file that stage 2 wrote")
    cache = TeacherCacheDataset(cfg.teacher_cache, tokenizer=tokenizer, vocab_size=int(text_config.vocab_size))
    _check_positions(cfg, cache.meta.seq_len, text_config)
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
        old, new = json.loads(previous.read_text()), cfg.to_dict()
        changed = [k for k in _RESUME_KEYS if old.get(k) != new[k]]
        if changed:
            raise DistillConfigError(f"{output} was started with other {', '.join(changed)} (see {previous}); "
                                     "resume with the same settings or choose another --output")
    if start > cfg.max_steps:
        raise DistillConfigError(f"{output}: newest checkpoint is step {start}, beyond max_steps {cfg.max_steps}")
    mid_stage = done and start < cfg.max_steps and start not in {s for s, _ in cfg.stage_bounds()}
    if mid_stage and not has_training_state(done[-1]):
        raise DistillConfigError(f"{done[-1]} has no optimizer/DeepSpeed state to resume from mid-stage (only the "
                                 "newest --keep-training-state checkpoints keep it); its weights can start a new run "
                                 "as --student")
    return Prepared(ds_cfg, tokenizer, cache, groups, start, done[-1] if done else None)


# ------------------------------------------------------------------------------------------- running

def _clean_after(output: Path, step: int) -> None:
    """Drop what a stopped run left past ``step``: incomplete checkpoint folders and later log lines."""
    for p in output.glob(f"{CHECKPOINT_PREFIX}*"):
        s = checkpoint_step(p)
        if s is not None and s > step and not (p / CHECKPOINT_COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
    log = output / LOG_FILE
    if log.is_file():
        keep = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(log, "".join(line + "\n" for line in keep))


def _load_student(path: str | Path, cfg: DistillConfig):
    """Load on every rank (under an active HfDeepSpeedConfig ZeRO-3 partitions at construction)."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    try:
        if is_compressed_checkpoint(path):
            return load_model(path, dtype=dtype)
        return load_model(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise CheckpointError(f"cannot load the student from {path}: {e}") from e


class CheckpointWriteError(RuntimeError):
    """torch.save could not write a checkpoint (its C++ writer reports no errno; usually a full disk)."""


def _torch_save_failure(error: BaseException) -> str | None:
    """The first line of the innermost RuntimeError raised inside ``torch.save`` in ``error``'s chain, else None."""
    found = None
    while error is not None:
        if isinstance(error, RuntimeError) and any(
                f.filename.endswith(os.path.join("torch", "serialization.py"))
                for f in traceback.extract_tb(error.__traceback__)):
            found = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        error = error.__cause__ or error.__context__
    return found


def _close_progress_bars(trainer) -> None:
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None


def run_distill(cfg: DistillConfig) -> Path | None:
    """Distil on this rank (call on every rank of the launcher); returns the last checkpoint (None: nothing to do).

    Writes ``<output>/distill_config.json`` (the resolved config) before the first step, ``checkpoint-<step>/``
    folders and ``train_log.jsonl``. Wandb runs offline unless WANDB_MODE says otherwise.

    Raises:
        See ``prepare``: every refusal happens before the first step.
        CheckpointWriteError: torch.save failed while writing a checkpoint (full disk); ``--resume`` continues.
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
    args = training_arguments(cfg)
    world = args.world_size
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world
    num_samples = cfg.max_steps * global_batch
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _clean_after(output, prep.start_step)
        resolved = {**cfg.to_dict(), "world_size": world, "global_batch": global_batch}
        for key in ("student", "teacher_cache", "output", "deepspeed", "tokenizer"):
            resolved[key] = str(Path(resolved[key]).resolve()) if resolved[key] else None
        write_atomic(output / CONFIG_FILE, json.dumps(resolved, indent=2) + "\n")
    barrier()
    meta = prep.cache.meta
    log_main("student %s, cache %s (%d sequences x %d tokens, k=%d, teacher %s), %d ranks, global batch %d "
             "sequences = %d tokens/step; %d steps read %.2f passes over the cache", cfg.student, cfg.teacher_cache,
             len(prep.cache), meta.seq_len, meta.k, meta.teacher_name, world, global_batch,
             global_batch * meta.seq_len, cfg.max_steps, num_samples / len(prep.cache))
    log_main("loss = (1 - %g) * CE + %g * %g^2 * KL (kd_tail: %s)", cfg.alpha, cfg.alpha, cfg.temperature,
             cfg.kd_tail)

    from accelerate.state import AcceleratorState, GradientState
    from transformers import default_data_collator

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
        trainer = DistillTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                                 processing_class=prep.tokenizer, distill_cfg=cfg, stage_index=i,
                                 groups=prep.groups[i], ds_cfg=prep.ds_cfg)
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        except BaseException as e:
            _close_progress_bars(trainer)  # or tqdm redraws them after the one-line error, at exit
            reason = _torch_save_failure(e)
            if reason is not None:
                raise CheckpointWriteError(f"could not write a checkpoint in {output}: torch.save failed ({reason}); "
                                           "the disk may be full or a file-size limit reached: free space and rerun "
                                           "with --resume") from e
            raise
        step, last = end, output / f"{CHECKPOINT_PREFIX}{end}"
        engine = getattr(trainer, "model_wrapped", None)
        if hasattr(engine, "destroy"):  # drop ZeRO-3 hooks and buffers before the next stage's engine
            engine.destroy()
        del trainer, model, engine
        gc.collect()
        # accelerate refuses a second Accelerator with a DeepSpeed plugin in one process; the next stage's
        # Trainer gets a fresh AcceleratorState (the process group, held by PartialState, stays).
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        barrier()
    log_main("distillation done: %s", last)
    return last

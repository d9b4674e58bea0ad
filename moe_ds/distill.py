"""Stage 3: distil the compressed student against the cached teacher top-k, one Trainer per training stage.

Each stage gets a fresh model, Trainer, DeepSpeed engine, optimizer and schedule, because ZeRO partitions the
optimizer over the parameters that require gradients when the engine is built; stage i + 1 loads the
consolidated checkpoint that ends stage i. Step numbers are global: checkpoints are ``checkpoint-<step>``.
A stage with ``prune_to`` (progressive expert pruning) starts instead from ``<output>/pruned-<step>/``: the model
that ended the previous stage with only the experts its routers used most during that stage (``expert_usage.json``,
which every checkpoint holds), chosen by rank 0 (``prune_at_boundary``) and recorded in ``pruning_history.json``.
A student whose config has ``moe_ds_sparsity`` with ``keep_masks`` keeps its pruned expert weights at exactly zero
(``moe_ds.sparsity.MaskedGradients``).
A stage with ``quantization`` trains with fake-quantized expert and router weights (``moe_ds.qat``, straight-through
gradients to the latent weights); its last checkpoint is also written quantized to ``<output>/quantized-<step>/``
and then holds the fake-quantized (dequantized) weights itself, which the next stage trains.
Every refusal happens in ``prepare``, before DeepSpeed or the weights are touched. Settings live in
``moe_ds.distill_config``, parameter groups in ``moe_ds.distill_params``, the Trainer in
``moe_ds.distill_trainer``; their public names are re-exported here.
"""

import copy
import gc
import importlib.util
import json
import logging
import os
import shutil
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoint import (CheckpointError, is_compressed_checkpoint, load_model, read_weight_shapes,
                         validate_compressed_checkpoint)
from .dist import all_reduce_sum, barrier, device_for, dist_info, log_main, setup_logging
from .arch import UnsupportedModelError
from .distill_config import (CONFIG_FILE, DEFAULT_DEEPSPEED, DistillConfig, DistillConfigError, GroupConfig,
                             PruneConfigError, QATConfigError, StageConfig, check_deepspeed_config, parse_group, stage_from_groups)
from .distill_params import ResolvedGroup, apply_groups, log_groups, resolve_groups
from .distill_trainer import LOG_FILE, PROBE_ENV, DistillDataset, DistillTrainer, distill_loss, training_arguments
from .qat import QUANTIZED_PREFIX, FakeQuantization, check_shapes
from .run_layout import (CHECKPOINT_COMPLETE, CHECKPOINT_PREFIX, check_output_dir, checkpoint_step,
                         complete_checkpoints, has_training_state, write_atomic, write_json_atomic)
from .sparsity import USAGE_FILE, ExpertUsage, SparsityError, load_usage, read_sparsity_section
from .corpus import CorpusError
from .features import FeatureHooks, check_layers
from .online_teacher import (OnlineTeacher, TextDataset, check_teacher_compatible, describe, load_replicated,
                             load_zero3, resolve_placement, teacher_parameters)
from .teacher_cache import CacheFormatError, TeacherCacheDataset

__all__ = ["CONFIG_FILE", "DEFAULT_DEEPSPEED", "HISTORY_FILE", "LOG_FILE", "PROBE_ENV", "PRUNED_PREFIX",
           "PRUNING_RECORD", "QUANTIZED_PREFIX", "CheckpointWriteError", "DistillConfig", "DistillConfigError", "DistillDataset",
           "DistillTrainer", "GroupConfig", "Prepared", "PruneConfigError", "QATConfigError", "ResolvedGroup", "StageConfig",
           "apply_groups", "check_deepspeed_config", "distill_loss", "experts_per_stage", "log_groups", "parse_group",
           "prepare", "prune_at_boundary", "resolve_groups", "run_distill", "stage_from_groups", "training_arguments"]

# A resume must keep these: the data order and the stage boundaries are functions of them (the stages also hold
# prune_to / prune_score, so a resume cannot change which experts a later stage keeps).
_RESUME_KEYS = ("stages", "batch_size", "gradient_accumulation_steps", "seed", "shuffle")
_LIVE_RESUME_KEYS = ("seq_len", "max_sequences", "text_field")  # a live teacher's --data packing: the sequences
PRUNED_PREFIX = "pruned-"  # <output>/pruned-<step>/: the model a stage with prune_to starts from
PRUNING_RECORD = "pruning.json"  # inside pruned-<step>/, written before the folder appears: what was kept and why
HISTORY_FILE = "pruning_history.json"  # <output>/: one entry per pruning boundary, in step order


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


def _param_shapes(config, trust_remote_code: bool, num_experts: int | None = None) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every parameter, from a model built on the meta device (no memory, no weights);
    ``num_experts``: as if every MoE layer held that many experts (a stage after ``prune_to``)."""
    from transformers import AutoModelForCausalLM

    from .arch import get_architecture
    from .modeling_shared_core import shared_core_classes

    if num_experts is not None:
        config = copy.deepcopy(config)
        setattr(config, get_architecture(config.model_type).num_experts_key, num_experts)
    with torch.device("meta"):
        if isinstance(getattr(config, "shared_core", None), dict):
            model = shared_core_classes(config.model_type)[1](config)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [(n, p.shape) for n, p in model.named_parameters()]


def _check_positions(cfg: DistillConfig, seq_len: int, text_config) -> None:
    """Refuse cached sequences longer than the student's context (its logits degrade past the trained positions).

    Raises:
        DistillConfigError: ``seq_len`` exceeds the student config's ``max_position_embeddings``.
    """
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        source = (f"teacher cache {cfg.teacher_cache} holds" if cfg.teacher_cache else "--seq-len asks for")
        fix = "rebuild the cache with" if cfg.teacher_cache else "pass"
        raise DistillConfigError(f"{source} sequences of {seq_len} tokens, beyond the "
                                 f"student's max_position_embeddings {limit} ({Path(cfg.student) / 'config.json'}): "
                                 f"positions past {limit} were never trained; {fix} --seq-len "
                                 f"{limit} or less")


def _stage_label(cfg: DistillConfig, i: int) -> str:
    name = cfg.stages[i].name
    return f"stage {i + 1}" + (f" ({name})" if name else "")


def experts_per_stage(cfg: DistillConfig, config) -> list[int] | None:
    """The experts per MoE layer each stage trains with, after its ``prune_to``; None when no stage prunes.

    A first stage with ``prune_to`` is refused: the experts are chosen from the usage the student's routers show
    while training the stage before (``ExpertUsage``), and before the first stage there is none. Prune the
    student beforehand (``launch/compress.py --method prune`` with a calibration) instead.

    Raises:
        PruneConfigError: prune_to on the first stage or on a student that is not a supported MoE, not below the
            experts the stage starts with, or a count the router cannot route over (below top_k; DeepSeek-V3's
            routing groups: ``moe_ds.expert_pruning.expert_count_problem``).
    """
    if all(s.prune_to is None for s in cfg.stages):
        return None
    from .arch import UnsupportedModelError, get_architecture
    from .expert_pruning import expert_count_problem, routing_groups

    try:
        arch = get_architecture(config.model_type)
    except UnsupportedModelError as e:
        raise PruneConfigError(f"prune_to needs a MoE student of a supported family: {e}") from e
    count, top_k = int(getattr(config, arch.num_experts_key)), int(getattr(config, arch.top_k_key))
    counts = []
    for i, stage in enumerate(cfg.stages):
        if stage.prune_to is not None:
            label = f"{_stage_label(cfg, i)}: prune_to {stage.prune_to}"
            if i == 0:
                raise PruneConfigError(f"{label}: the experts are chosen from the usage the routers show while "
                                       "training the previous stage, and the first stage has none; add a stage "
                                       "before it, or prune the student first (launch/compress.py --method prune)")
            if stage.prune_to >= count:
                raise PruneConfigError(f"{label} must be below the {count} experts per layer the stage starts with")
            problem = expert_count_problem(stage.prune_to, top_k, *routing_groups(config))
            if problem is not None:
                raise PruneConfigError(f"{label}: {problem}")
            count = stage.prune_to
        counts.append(count)
    return counts


def _same_stages(old: list, new: list) -> bool:
    """Stage lists equal once the old one (read from an earlier run's config file) gets today's defaults: a run
    written before a stage setting existed resumes as long as it did not need it."""
    try:
        old = [asdict(StageConfig(**s)) for s in old]
    except (TypeError, ValueError):
        pass
    return old == new


@dataclass
class Prepared:
    """Everything checked before training: what ``run_distill`` needs to start or resume."""

    ds_cfg: dict | None  # the parsed DeepSpeed config (None: plain Trainer)
    tokenizer: object  # the student's (or --tokenizer's) tokenizer
    cache: TeacherCacheDataset | TextDataset  # the teacher cache (checked against the tokenizer and vocabulary),
    # or the packed --data text of a live teacher
    groups: list[list[ResolvedGroup]]  # per stage, its resolved parameter groups
    start_step: int  # global step of the newest complete checkpoint (0 for a fresh run)
    resume_from: Path | None  # that checkpoint
    student_config: object = None  # the student's config (validated, no weights read)


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
    try:
        read_sparsity_section(config)
    except SparsityError as e:
        raise DistillConfigError(f"student {cfg.student}: {e}") from e
    tok_path = cfg.tokenizer or cfg.student
    # The student's own config, when the tokenizer is the student's: AutoTokenizer would otherwise reread it and
    # warn that a shared-core model type is not one it knows.
    tok_config = {"config": config} if cfg.tokenizer is None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.trust_remote_code, **tok_config)
    except (OSError, ValueError) as e:
        raise DistillConfigError(f"no tokenizer in {tok_path} ({e}); pass --tokenizer DIR") from e
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    feature_layers = cfg.feature_layer_list
    if feature_layers:
        check_layers(feature_layers, int(text_config.num_hidden_layers), f"student {cfg.student}")
    if cfg.live_teacher:
        check_teacher_compatible(cfg.teacher, tokenizer, config, feature_layers)
        resolve_placement(cfg.teacher_placement, ds_cfg)
        _check_positions(cfg, cfg.seq_len, text_config)
        try:
            cache = TextDataset(cfg.data, tokenizer, cfg.seq_len, cfg.max_sequences, cfg.text_field)
        except CorpusError as e:
            raise DistillConfigError(f"--data {cfg.data}: {e}") from e
    else:
        if Path(cfg.teacher_cache).is_dir():  # HDF5 would say so in a multi-line message
            raise CacheFormatError(f"teacher cache {cfg.teacher_cache} is a folder; give the .h5 file that stage 2 "
                                   "wrote")
        cache = TeacherCacheDataset(cfg.teacher_cache, tokenizer=tokenizer, vocab_size=int(text_config.vocab_size))
        _check_positions(cfg, cache.meta.seq_len, text_config)
        if feature_layers:
            cached = list(cache.meta.feature_layers)
            missing = [layer for layer in feature_layers if layer not in cached]
            if missing:
                raise DistillConfigError(f"teacher cache {cfg.teacher_cache} holds the teacher's features of layers "
                                         f"{cached or 'none'}, not {missing}: rebuild it with --cache-features "
                                         f"{cfg.feature_layers} (--feature-target {cfg.feature_target}) or distil "
                                         "from a live teacher (--teacher DIR --data TEXT)")
            if cache.meta.feature_target != cfg.feature_target:
                raise DistillConfigError(f"teacher cache {cfg.teacher_cache} holds {cache.meta.feature_target!r} "
                                         f"features, --feature-target is {cfg.feature_target!r}")
            cache.select_features(feature_layers)
    counts = experts_per_stage(cfg, config)
    names = {}  # parameter names and sizes per expert count: later stages resolve against the pruned model
    groups = []
    for i, s in enumerate(cfg.stages):
        n = None if counts is None else counts[i]
        if n not in names:
            names[n] = _param_shapes(config, cfg.trust_remote_code, n)
        groups.append(resolve_groups([(k, v.numel()) for k, v in names[n]], s, cfg.learning_rate, cfg.weight_decay))
        if s.quantization is not None:
            try:
                check_shapes(names[n], s.quantization, config.model_type, f"{_stage_label(cfg, i)}: ")
            except UnsupportedModelError as e:
                raise QATConfigError(f"{_stage_label(cfg, i)}: quantization needs a MoE student of a supported "
                                     f"family: {e}") from e

    output = Path(cfg.output)
    done = complete_checkpoints(output) if output.is_dir() else []
    if done and not cfg.resume:
        raise DistillConfigError(f"{output} already holds checkpoints (newest {done[-1].name}); pass --resume to "
                                 "continue that run or choose another --output")
    start = checkpoint_step(done[-1]) if done else 0
    previous = output / CONFIG_FILE
    if done and previous.is_file():
        old, new = json.loads(previous.read_text()), cfg.to_dict()
        keys = _RESUME_KEYS + (_LIVE_RESUME_KEYS if cfg.live_teacher else ())
        changed = [k for k in keys if (not _same_stages(old.get(k), new[k]) if k == "stages"
                                               else old.get(k) != new[k])]
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
    boundary = {s: i for i, (s, _) in enumerate(cfg.stage_bounds())}
    if done and start in boundary and cfg.stages[boundary[start]].prune_to is not None:
        if not (output / f"{PRUNED_PREFIX}{start}" / PRUNING_RECORD).is_file() and \
                not (done[-1] / USAGE_FILE).is_file():
            raise PruneConfigError(f"{done[-1]} holds no {USAGE_FILE}: the experts that "
                                   f"{_stage_label(cfg, boundary[start])} keeps cannot be chosen")
    return Prepared(ds_cfg, tokenizer, cache, groups, start, done[-1] if done else None, config)


# ------------------------------------------------------------------------------------------- running

def _clean_after(output: Path, step: int) -> None:
    """Drop what a stopped run left past ``step``: incomplete checkpoint folders, pruned models and pruning history
    of later boundaries, half-written pruned models, and later log lines."""
    for p in output.glob(f"{CHECKPOINT_PREFIX}*"):
        s = checkpoint_step(p)
        if s is not None and s > step and not (p / CHECKPOINT_COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
    for p in output.glob(f"{PRUNED_PREFIX}*"):
        s = p.name[len(PRUNED_PREFIX):]
        if p.is_dir() and s.isdigit() and int(s) > step:
            shutil.rmtree(p, ignore_errors=True)
    for p in output.glob(f".{PRUNED_PREFIX}*"):  # a pruned model being written when the run stopped
        shutil.rmtree(p, ignore_errors=True)
    for p in output.glob(f"{QUANTIZED_PREFIX}*"):  # the quantized end of a QAT stage past the resume point
        s = p.name[len(QUANTIZED_PREFIX):]
        if p.is_dir() and s.isdigit() and int(s) > step:
            shutil.rmtree(p, ignore_errors=True)
    history = output / HISTORY_FILE
    if history.is_file():
        write_json_atomic(history, [h for h in json.loads(history.read_text()) if h["step"] <= step])
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


def prune_at_boundary(cfg: DistillConfig, stage_index: int, step: int, source: str | Path) -> Path:
    """Progressive expert pruning at the start of a stage with ``prune_to`` (call on every rank).

    Rank 0 scores each MoE layer's experts from ``source/expert_usage.json`` (the usage the student's routers showed
    while training the previous stage, all ranks summed; ``prune_score`` "frequency": tokens routed, "router_weight":
    routing weight, both per token of the layer, ``moe_ds.expert_pruning.expert_scores``), keeps the ``prune_to``
    best of every layer (``choose_experts``; ties: the lower id), writes the model with only those experts
    (``select_experts_on_disk``) to ``<output>/pruned-<step>/`` with ``pruning.json`` inside, and records the same
    entry in ``<output>/pruning_history.json``: {step, stage, before, after, score, kept ids and scores per layer}.
    A ``pruned-<step>/`` that is already complete (a resumed run) is reused as it is.

    Returns:
        ``<output>/pruned-<step>``, once it is complete (after a barrier).

    Raises:
        PruneConfigError: (every rank) rank 0 could not prune: no or unreadable usage, or a selection the router
            cannot use; rank 0 raises the reason.
    """
    from .expert_pruning import choose_experts, expert_scores, routing_groups, select_experts_on_disk

    output, stage = Path(cfg.output), cfg.stages[stage_index]
    dst = output / f"{PRUNED_PREFIX}{step}"
    error = None
    if dist_info().is_main:
        try:
            if not (dst / PRUNING_RECORD).is_file():
                source = Path(source)
                usage = load_usage(source / USAGE_FILE)
                layers = {layer: {"tokens": usage["tokens"][layer],
                                  "router_weight_sum": usage["router_weight_sum"][layer]} for layer in usage["layers"]}
                scores = {layer: expert_scores(sums, stage.prune_score, top_k=usage["top_k"])
                          for layer, sums in layers.items()}
                raw = json.loads((source / "config.json").read_text())
                n_group, topk_group = routing_groups(SimpleNamespace(**raw))
                kept = choose_experts(scores, num_keep=stage.prune_to, top_k=usage["top_k"], n_group=n_group,
                                      topk_group=topk_group)
                record = {"step": step, "stage": stage_index + 1, "stage_name": stage.name, "source": str(source),
                          "usage_steps": [usage.get("since_step"), usage.get("step")], "score": stage.prune_score,
                          "before": usage["num_experts"], "after": stage.prune_to,
                          "kept": {str(layer): ids.tolist() for layer, ids in kept.items()},
                          "scores": {str(layer): sc.tolist() for layer, sc in scores.items()},
                          "tokens": {str(layer): sums["tokens"].tolist() for layer, sums in layers.items()}}
                partial = output / f".{PRUNED_PREFIX}{step}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                select_experts_on_disk(source, partial, kept,
                                       statistics={"progressive_pruning": {k: record[k] for k in
                                                                           ("step", "stage", "score", "before",
                                                                            "after")}})
                write_json_atomic(partial / PRUNING_RECORD, record)
                shutil.rmtree(dst, ignore_errors=True)  # a folder without the record is not ours to trust
                os.replace(partial, dst)
            record = json.loads((dst / PRUNING_RECORD).read_text())
            history_file = output / HISTORY_FILE
            history = json.loads(history_file.read_text()) if history_file.is_file() else []
            history = sorted([h for h in history if h["step"] != step] + [record], key=lambda h: h["step"])
            write_json_atomic(history_file, history)
            log_main("%s: pruned %d -> %d experts per MoE layer by %s, from the usage of steps %s..%s in %s; "
                     "model %s", _stage_label(cfg, stage_index), record["before"], record["after"], record["score"],
                     (record["usage_steps"][0] or 0) + 1, record["usage_steps"][1], record["source"], dst)
            for layer, ids in record["kept"].items():
                log_main("  layer %s keeps experts %s", layer, ids)
        except (ValueError, OSError) as e:  # SparsityError, ExpertPruningError, CheckpointError, a broken file
            error = e
    failed = float(all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0])
    if error is not None:
        raise PruneConfigError(f"{_stage_label(cfg, stage_index)}: cannot prune to {stage.prune_to} experts: "
                               f"{error}") from error
    if failed:
        raise PruneConfigError(f"{_stage_label(cfg, stage_index)}: rank 0 could not prune the experts (its error "
                               "says why)")
    barrier()
    return dst


def _expert_usage(model, resume: Path | None, stage_start: int) -> ExpertUsage | None:
    """Router usage counters for a MoE student (None for any other model); a mid-stage resume continues the counts
    saved in the checkpoint it resumes from, so the stage's usage equals an uninterrupted run's."""
    from .arch import UnsupportedModelError

    base = None
    if resume is not None:
        saved = resume / USAGE_FILE
        base = load_usage(saved) if saved.is_file() else None
        if base is None or base.get("since_step") != stage_start:
            log_main("%s holds no expert usage of this stage: its usage counts from step %s on", resume,
                     checkpoint_step(resume))
            base = None
    try:
        return ExpertUsage(model, base=base)
    except UnsupportedModelError:
        return None


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
    placement = resolve_placement(cfg.teacher_placement, prep.ds_cfg) if cfg.live_teacher else None
    teacher_dtype = _teacher_dtype(cfg)
    teacher = None
    if placement == "replicate":  # before the TrainingArguments: under their ZeRO-3 config zero.Init would partition it
        model, precision = load_replicated(cfg.teacher, teacher_dtype, device_for(info), cfg.teacher_quantize,
                                           cfg.trust_remote_code)
        teacher = OnlineTeacher(model, cfg.teacher_top_k, cfg.feature_layer_list, cfg.feature_target,
                                placement=placement, precision=precision)
    # TrainingArguments first: they make the HfDeepSpeedConfig that ZeRO-3 construction (zero.Init) needs.
    args = training_arguments(cfg)
    if placement == "zero3":
        hidden = int(prep.student_config.get_text_config().hidden_size)
        engine, model = load_zero3(cfg.teacher, teacher_dtype, prep.ds_cfg, cfg.batch_size, hidden,
                                   cfg.trust_remote_code)
        teacher = OnlineTeacher(model, cfg.teacher_top_k, cfg.feature_layer_list, cfg.feature_target, engine=engine,
                                placement=placement, precision=str(teacher_dtype).removeprefix("torch."))
    world = args.world_size
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world
    num_samples = cfg.max_steps * global_batch
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _clean_after(output, prep.start_step)
        resolved = {**cfg.to_dict(), "world_size": world, "global_batch": global_batch}
        for key in ("student", "teacher_cache", "teacher", "data", "output", "deepspeed", "tokenizer"):
            resolved[key] = str(Path(resolved[key]).resolve()) if resolved[key] else None
        write_atomic(output / CONFIG_FILE, json.dumps(resolved, indent=2) + "\n")
    barrier()
    if teacher is not None:
        seq_len = cfg.seq_len
        log_main("student %s, %s from %s; text %s (%d sequences x %d tokens), %d ranks, global batch %d sequences = "
                 "%d tokens/step; %d steps read %.2f passes over the text", cfg.student,
                 describe(teacher, teacher_parameters(teacher)), cfg.teacher, cfg.data, len(prep.cache), seq_len,
                 world, global_batch, global_batch * seq_len, cfg.max_steps, num_samples / len(prep.cache))
    else:
        meta = prep.cache.meta
        log_main("student %s, cache %s (%d sequences x %d tokens, k=%d, teacher %s), %d ranks, global batch %d "
                 "sequences = %d tokens/step; %d steps read %.2f passes over the cache", cfg.student,
                 cfg.teacher_cache, len(prep.cache), meta.seq_len, meta.k, meta.teacher_name, world, global_batch,
                 global_batch * meta.seq_len, cfg.max_steps, num_samples / len(prep.cache))
    kl_over = ("the live teacher's full vocabulary" if teacher is not None and cfg.teacher_top_k is None
               else f"kd_tail: {cfg.kd_tail}")
    log_main("loss = (1 - %g) * CE + %g * %g^2 * KL (%s)%s", cfg.alpha, cfg.alpha, cfg.temperature, kl_over,
             f" + {cfg.feature_weight:g} * sum over layers {cfg.feature_layers} of the {cfg.feature_loss} feature "
             f"distance ({cfg.feature_target})" if cfg.feature_layers else "")

    from accelerate.state import AcceleratorState, GradientState
    from transformers import default_data_collator

    step, last = prep.start_step, prep.resume_from
    first = next(i for i, (_, end) in enumerate(bounds) if end > step)
    for i in range(first, len(cfg.stages)):
        start, end = bounds[i]
        resume = last if (last is not None and step > start) else None  # mid-stage: DeepSpeed state too
        source = last if last is not None else cfg.student
        if cfg.stages[i].prune_to is not None and resume is None:  # at the boundary (a mid-stage resume is pruned)
            source = prune_at_boundary(cfg, i, start, source)
        log_main("stage %d/%d: steps %d..%d, model from %s%s", i + 1, len(cfg.stages), start + 1, end, source,
                 ", resuming optimizer and data position" if resume is not None else "")
        model = _load_student(source, cfg)
        model.config.use_cache = False
        sparsity = read_sparsity_section(model.config)
        usage = _expert_usage(model, resume, start)
        quantization = cfg.stages[i].quantization
        qat = None
        if quantization is not None:
            # Before the engine: the wrapped forwards run inside ZeRO-3's gather/release hooks of each module.
            qat = FakeQuantization(model, quantization["experts"], quantization["router"])
            log_main("quantization-aware training: %d expert/router tensors fake-quantized in the forward "
                     "(experts %s, router %s); the stage's last checkpoint is written quantized to %s%d/",
                     qat.num_tensors, quantization["experts"], quantization["router"], QUANTIZED_PREFIX, end)
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
        # Hooks on the module, before the engine wraps it (they fire inside ZeRO-3's gather/release of each module).
        features = FeatureHooks(model, cfg.feature_layer_list, cfg.feature_target) if cfg.feature_layers else None
        trainer = DistillTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                                 processing_class=prep.tokenizer, distill_cfg=cfg, stage_index=i,
                                 groups=prep.groups[i], ds_cfg=prep.ds_cfg,
                                 sparsity=sparsity if sparsity is not None and sparsity["keep_masks"] else None,
                                 usage=usage, qat=qat, teacher=teacher, student_features=features)
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
        trainer.remove_hooks()
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
    if teacher is not None:
        teacher.close()
    log_main("distillation done: %s", last)
    return last


def _teacher_dtype(cfg: DistillConfig) -> torch.dtype:
    """The live teacher's dtype: ``teacher_dtype``, or with ``auto`` the student's training dtype."""
    name = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bf16" if cfg.bf16 else "fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

"""Distillation from a live, frozen teacher inside the training job (``launch/distill.py --teacher DIR --data D``).

The alternative to the offline top-k cache: the teacher runs on every batch, so any top-k (or the full vocabulary)
and its hidden states are available, at the price of a teacher forward per step. Two placements:

- ``replicate``: a whole copy per rank, loaded straight onto the rank's device in the teacher's dtype (or 8/4-bit
  through bitsandbytes for teachers whose weights are nn.Linear; fused 3-D experts are refused, see
  ``moe_ds.cache_teacher.teacher_precision``). Memory per rank: P_teacher x bytes per parameter.
- ``zero3``: the teacher is built under ``zero.Init`` (each rank holds 1/N of every parameter) and wrapped in a
  DeepSpeed ZeRO-3 inference engine that gathers one module's parameters at a time, as TRL's
  ``prepare_deepspeed`` does for its reference and teacher models. Memory per rank: P_teacher x bytes / N plus the
  gathered working set (``stage3_max_live_parameters``); the cost is the all-gathers of every forward.

``auto`` picks ``zero3`` when the student trains under ZeRO-3 and ``replicate`` otherwise.
The teacher never enters the optimizer: its parameters do not require grad and it is not part of the Trainer's
model; it stays in eval mode (no dropout) and runs under ``torch.no_grad``.
"""

import copy
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from .features import FeatureHooks, FeatureTarget, check_layers, decoder_layers
from .teacher_cache import TokenizerMismatchError, tokenizer_fingerprint

Placement = Literal["auto", "replicate", "zero3"]
PLACEMENTS = get_args(Placement)


class OnlineTeacherError(ValueError):
    """The live teacher cannot be used: not a model folder, unloadable, or a placement this job cannot give it."""


class TextDataset(torch.utils.data.Dataset):
    """Packed token sequences of a training text, every rank holding the same list (the run's order is
    ``DistillDataset``'s seeded permutation over it, as over a cache).

    Item ``i``: ``{"input_ids": [T] int64}``. Packing is the cache stage's (``moe_ds.corpus.pack_sequences``): the
    same text and settings give the same sequences as ``launch/cache_teacher.sh`` would cache.
    """

    def __init__(self, data: str, tokenizer, seq_len: int, max_sequences: int | None = None,
                 text_field: str | None = None, split: str = "train", dataset_config: str | None = None):
        """Tokenise and pack ``data`` (a file, folder or hub dataset; see ``moe_ds.corpus.load_corpus``).

        Raises:
            moe_ds.corpus.CorpusError: no text, or fewer tokens than one sequence.
        """
        from .corpus import load_corpus, pack_sequences

        corpus = load_corpus(data, text_field=text_field, split=split, dataset_config=dataset_config)
        seqs = list(pack_sequences(corpus.documents, tokenizer, seq_len, max_sequences, name=str(data)))
        self.sequences = np.stack(seqs)  # [N, T] int32
        self.seq_len, self.description = seq_len, corpus.description

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.sequences[i].astype(np.int64))}


def check_teacher_folder(path: str | Path) -> Path:
    """Raises OnlineTeacherError when ``path`` is not a folder with a config.json (Hub ids are not fetched here)."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise OnlineTeacherError(f"teacher {path} is not a model folder (no config.json); download a Hub model "
                                 "first (huggingface-cli download ...) and pass its folder")
    return path


def check_teacher_compatible(teacher_dir: str | Path, tokenizer, student_config, feature_layers: list[int]) -> dict:
    """Refuse a teacher whose tokenizer, vocabulary or feature layers do not fit the student, before loading it.

    Args:
        teacher_dir: the teacher's folder (its tokenizer files, or none: then it must share the student's).
        tokenizer: the student's tokenizer.
        student_config: the student's config (``vocab_size``, ``num_hidden_layers``, ``hidden_size``).
        feature_layers: decoder layers whose features are matched (must exist in both models).

    Returns:
        The teacher's config.json as a dict.

    Raises:
        OnlineTeacherError: not a model folder.
        TokenizerMismatchError: another tokenizer (size or token -> id map) or another vocabulary width.
        moe_ds.features.FeatureConfigError: a feature layer outside either model, or different hidden sizes.
    """
    import json

    from transformers import AutoTokenizer

    from .features import FeatureConfigError

    path = check_teacher_folder(teacher_dir)
    raw = json.loads((path / "config.json").read_text())
    raw = raw.get("text_config", raw)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                       "tokenizer.model"))
    if has_tokenizer:
        try:
            teacher_tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise OnlineTeacherError(f"teacher {path}: cannot read its tokenizer: {e}") from e
        t_name, t_hash, t_size = tokenizer_fingerprint(teacher_tok)
        s_name, s_hash, s_size = tokenizer_fingerprint(tokenizer)
        if t_size != s_size or t_hash != s_hash:
            raise TokenizerMismatchError(f"teacher {path} has another tokenizer than the student's '{s_name}' "
                                         f"({t_size} vs {s_size} tokens, vocabulary hash {t_hash[:12]} vs "
                                         f"{s_hash[:12]}): its logits would score other tokens")
    text = student_config.get_text_config() if hasattr(student_config, "get_text_config") else student_config
    if int(raw.get("vocab_size", -1)) != int(text.vocab_size):
        raise TokenizerMismatchError(f"teacher {path} has {raw.get('vocab_size')} logits per position, the student "
                                     f"{text.vocab_size}: the KL needs one vocabulary")
    if feature_layers:
        check_layers(feature_layers, int(raw["num_hidden_layers"]), f"teacher {path}")
        check_layers(feature_layers, int(text.num_hidden_layers), "student")
        if int(raw["hidden_size"]) != int(text.hidden_size):
            raise FeatureConfigError(f"teacher hidden size {raw['hidden_size']} != student's {text.hidden_size}: "
                                     "feature distillation compares hidden states of equal width")
    return raw


def resolve_placement(placement: Placement, ds_cfg: dict | None) -> str:
    """``auto``: ``zero3`` when the student's DeepSpeed config is ZeRO-3, else ``replicate``.

    Raises:
        OnlineTeacherError: ``zero3`` asked without a ZeRO-3 DeepSpeed config, or an unknown placement.
    """
    if placement not in PLACEMENTS:
        raise OnlineTeacherError(f"teacher_placement must be one of {PLACEMENTS}, got {placement!r}")
    stage3 = ds_cfg is not None and (ds_cfg.get("zero_optimization") or {}).get("stage") == 3
    if placement == "auto":
        return "zero3" if stage3 else "replicate"
    if placement == "zero3" and not stage3:
        raise OnlineTeacherError("teacher_placement zero3 partitions the teacher like a ZeRO-3 student: it needs a "
                                 "ZeRO-3 DeepSpeed config (--deepspeed ds_configs/zero3.json)")
    return placement


def load_replicated(path: str | Path, dtype: torch.dtype, device: torch.device, quantize: str = "none",
                    trust_remote_code: bool = False) -> tuple[torch.nn.Module, str]:
    """A whole teacher on this rank's device, in eval mode without gradients (call before any ZeRO-3 construction
    context exists: ``zero.Init`` would partition it).

    Plain HF teachers load through ``moe_ds.cache_teacher.load_teacher`` (``device_map``, dtype, bitsandbytes);
    moe-ds compressed or quantized checkpoints (a cascade's previous student) through ``moe_ds.checkpoint.load_model``.

    Returns:
        (model, its precision as text).

    Raises:
        OnlineTeacherError: a quantisation asked for a compressed checkpoint.
        moe_ds.cache_teacher.CacheTeacherError: bitsandbytes missing, failing, or fused experts it would leave alone.
    """
    from .cache_teacher import CacheTeacherConfig, load_teacher
    from .checkpoint import is_compressed_checkpoint, is_quantized_checkpoint, load_model

    path = Path(path)
    if is_compressed_checkpoint(path) or is_quantized_checkpoint(path):
        if quantize != "none":
            raise OnlineTeacherError(f"teacher {path} is a moe-ds compressed checkpoint: --teacher-quantize applies "
                                     "to plain HF teachers only")
        model = load_model(path, dtype=dtype, device_map={"": device})
        model.eval().requires_grad_(False)
        return model, str(dtype).removeprefix("torch.")
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    cfg = CacheTeacherConfig(teacher=str(path), data="-", output="unused.h5", dtype=name, quantize=quantize,
                             trust_remote_code=trust_remote_code)
    return load_teacher(cfg, device)


def load_zero3(path: str | Path, dtype: torch.dtype, ds_cfg: dict, batch_size: int, hidden_size: int,
               trust_remote_code: bool = False):
    """The teacher partitioned over the ranks in a ZeRO-3 inference engine (call on every rank, after the
    TrainingArguments made the HfDeepSpeedConfig that makes ``from_pretrained`` build under ``zero.Init``).

    The engine's config keeps the student's ZeRO-3 parameter offload (if any) and sets no optimizer; bucket sizes
    follow TRL's ``prepare_deepspeed`` (hidden-size based).

    Returns:
        (the DeepSpeed engine in eval mode, the wrapped module).
    """
    import deepspeed

    from .checkpoint import load_model

    model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size), "reduce_bucket_size": hidden_size ** 2}
    offload = (ds_cfg.get("zero_optimization") or {}).get("offload_param")
    if isinstance(offload, dict) and offload.get("device", "none") != "none":
        zero["offload_param"] = copy.deepcopy(offload)
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "zero_optimization": zero, "bf16": {"enabled": dtype == torch.bfloat16},
              "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine, model


class OnlineTeacher:
    """The frozen teacher's targets for a batch: its top-k (or full) logits and, optionally, chosen layers' features.

    ``__call__`` returns the keys ``distill_loss`` reads: with ``top_k`` None ``teacher_logits`` [B, T, V] (float, as
    computed); else ``topk_ids`` [B, T, k] int64, ``topk_logits`` [B, T, k] float32 and ``logsumexp`` [B, T] float32 —
    exactly what the cache stage stores (``moe_ds.cache_teacher.teacher_topk``); with feature layers also
    ``teacher_features``: a list of [B, T, H] tensors.
    """

    def __init__(self, model, top_k: int | None, feature_layers: list[int] | None = None,
                 feature_target: FeatureTarget = "hidden", engine=None, placement: str = "replicate",
                 precision: str = ""):
        self.model, self.engine, self.top_k = model, engine, top_k
        self.placement, self.precision = placement, precision
        self.hooks = FeatureHooks(model, feature_layers, feature_target) if feature_layers else None
        self.num_layers = len(decoder_layers(model))

    def parameters(self):
        return self.model.parameters()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        from .cache_teacher import teacher_topk

        runner = self.engine if self.engine is not None else self.model
        if self.hooks is not None:
            self.hooks.clear()
        logits = runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        out = {}
        if self.top_k is None:
            out["teacher_logits"] = logits
        else:
            ids, vals, lse = teacher_topk(logits, self.top_k)
            out.update(topk_ids=ids.long(), topk_logits=vals, logsumexp=lse)
        if self.hooks is not None:
            out["teacher_features"] = [f.detach() for f in self.hooks.take()]
        return out

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()


def describe(teacher: OnlineTeacher, num_params: int) -> str:
    """One log line: placement, precision, parameters, the teacher bytes this rank holds, and the KL's support."""
    k = "full vocabulary" if teacher.top_k is None else f"top-{teacher.top_k}"
    return (f"live teacher ({teacher.placement}, {teacher.precision}, {num_params / 1e6:.1f}M parameters, "
            f"{teacher_bytes_on_rank(teacher) / 2**20:.1f} MiB on this rank), KL over its {k}")


def teacher_bytes_on_rank(teacher: OnlineTeacher) -> int:
    """Bytes of teacher weights this rank holds: its ZeRO-3 partitions (``ds_tensor``), or every tensor when
    replicated."""
    total = 0
    for p in teacher.parameters():
        local = getattr(p, "ds_tensor", p)
        total += local.numel() * local.element_size()
    return total


def teacher_parameters(teacher: OnlineTeacher) -> int:
    """Parameters of the teacher (ZeRO-3 partitioned ones counted at full size, ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in teacher.parameters())


__all__ = ["OnlineTeacher", "OnlineTeacherError", "PLACEMENTS", "TextDataset", "check_teacher_compatible",
           "check_teacher_folder", "describe", "load_replicated", "load_zero3", "resolve_placement",
           "teacher_bytes_on_rank", "teacher_parameters"]

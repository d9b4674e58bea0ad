"""Stage 2: run the teacher once over the training text and cache its top-k logits (format: teacher_cache).

Rank r of W tokenises and packs only the records i with ``i % W == r`` (``moe_ds.corpus.rank_documents``; it
still reads every record), at most its share ``shard_rows(max_sequences, r, W)`` of the sequences, runs the
teacher in inference mode on them and appends them to its own shard; its j-th sequence is the cache's sequence
``j * W + r``. So tokenising time shrinks with the rank count, and the sequences depend on it: the rule is
recorded in the cache's ``dataset`` attribute and W in ``world_size``. When every rank is done, rank 0 joins the
shards into the index file, which presents the largest N that every shard covers (``teacher_cache.index_rows``:
with a whole corpus the ranks' counts differ by a few sequences, and a rank's surplus is left out).

Every rank checks everything that can be refused (teacher, corpus, output, an existing cache or shard of
another run) before any rank writes a byte, so a refused command changes nothing. A rerun with the same
arguments returns at once on a finished cache (writing nothing), resumes each shard after its last flushed
batch, skips finished shards, and sets aside (renames) a shard it cannot read, recomputing its sequences.
"""

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import teacher_cache as tc
from .corpus import load_corpus, pack_sequences, packing_rule, rank_documents
from .dist import barrier, device_for, init_distributed, log_main, setup_logging
from .run_layout import check_output_dir, remove_stale_temporaries, write_json_atomic

logger = logging.getLogger("moe_ds")

RUN_CONFIG = "cache_config.json"  # the resolved config, written to OUT.shards/ before work starts
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Quantize = Literal["none", "8bit", "4bit"]
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE = get_args(Quantize)
# Test-only: a rank exits (status 75, no clean-up, like a kill) once it has written this many sequences.
STOP_AFTER_ENV = "MOE_DS_CACHE_STOP_AFTER"


class CacheTeacherError(ValueError):
    """Bad input to the caching stage (the message names the setting, the teacher or the sizes)."""


@dataclass
class CacheTeacherConfig:
    teacher: str  # teacher model folder or hub id (its tokenizer is used for the corpus)
    data: str  # .jsonl/.json/.parquet/.txt file or folder, or a hub dataset name
    output: str  # cache index path OUT.h5; shards go to OUT.shards/
    top_k: int = 64  # logits kept per position
    seq_len: int = 2048  # tokens per packed sequence
    batch_size: int = 4  # sequences per teacher forward
    text_field: str | None = None  # text column (None: "text", or the only string column)
    split: str = "train"  # hub dataset split
    dataset_config: str | None = None  # hub dataset config, e.g. sample-10BT
    max_sequences: int | None = None  # cap on packed sequences over all ranks (None: whole corpus)
    dtype: Dtype = "auto"  # teacher precision: auto is bf16 on GPU, fp32 on CPU
    quantize: Quantize = "none"  # bitsandbytes on nn.Linear only; teachers with fused 3-D experts are refused
    compression: tc.Compression = "lzf"  # HDF5 filter of the cached datasets (bench/teacher_cache.py: the cost)
    gzip_level: int = 4  # 0-9, with compression=gzip
    logits_chunk: int = 512  # positions converted to fp32 at once for top-k/logsumexp (bounds memory)
    overwrite: bool = False  # discard existing shards instead of resuming them
    trust_remote_code: bool = False  # for teachers with their own modeling code
    cache_features: str | None = None  # "8,16,24": also store these decoder layers' outputs (float16, 2*L*H B/token)
    feature_target: str = "hidden"  # hidden: decoder layer output; moe: its MLP/MoE block output

    def __post_init__(self):
        """Raises CacheTeacherError naming the offending setting."""
        if self.top_k < 1:
            raise CacheTeacherError(f"top_k must be >= 1, got {self.top_k}")
        if self.seq_len < 1:
            raise CacheTeacherError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise CacheTeacherError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise CacheTeacherError(f"max_sequences must be >= 1 or None, got {self.max_sequences}")
        for name, choices in (("dtype", get_args(Dtype)), ("quantize", QUANTIZE), ("compression", tc.COMPRESSIONS)):
            if getattr(self, name) not in choices:
                raise CacheTeacherError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not 0 <= self.gzip_level <= 9:
            raise CacheTeacherError(f"gzip_level must be in 0..9, got {self.gzip_level}")
        if self.logits_chunk < 1:
            raise CacheTeacherError(f"logits_chunk must be >= 1, got {self.logits_chunk}")
        if not self.output.endswith(".h5"):
            raise CacheTeacherError(f"output must be an .h5 path, got {self.output!r}")
        from .features import FEATURE_TARGETS, FeatureConfigError, parse_layers

        try:
            layers = parse_layers(self.cache_features)
        except FeatureConfigError as e:
            raise CacheTeacherError(f"cache_features: {e}") from None
        self.cache_features = ",".join(map(str, layers)) if layers else None
        if self.feature_target not in FEATURE_TARGETS:
            raise CacheTeacherError(f"feature_target must be one of {FEATURE_TARGETS}, got {self.feature_target!r}")


def teacher_topk(logits: torch.Tensor, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k and log-partition of teacher logits, in fp32, a chunk of positions at a time.

    Args:
        logits: [B, T, V] any float dtype.
        k: entries kept per position (<= V).
        chunk: positions converted to fp32 at once (memory B * chunk * V * 4 bytes).

    Returns:
        topk_ids [B, T, k] int32 (largest first), topk_logits [B, T, k] float32, logsumexp [B, T] float32.

    Raises:
        ValueError: the logits hold NaN or infinity.
    """
    ids, vals, lses = [], [], []
    for s in range(0, logits.shape[1], chunk):
        x = logits[:, s:s + chunk].float()
        lse = torch.logsumexp(x, dim=-1)
        if not torch.isfinite(lse).all():
            raise ValueError("the teacher produced non-finite logits (NaN/inf); try --dtype fp32")
        v, i = x.topk(k, dim=-1)
        ids.append(i.to(torch.int32))
        vals.append(v)
        lses.append(lse)
    return torch.cat(ids, 1), torch.cat(vals, 1), torch.cat(lses, 1)


def _vocab_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def check_teacher_vocab(vocab_size: int, tokenizer_size: int, k: int) -> None:
    """The teacher must score every token id the tokenizer can produce, and k must fit its vocabulary.

    A teacher vocabulary larger than the tokenizer (padded embedding rows) is fine: those ids simply get
    low logits. A tokenizer with more ids than the teacher has rows means the teacher cannot read its text.

    Raises:
        CacheTeacherError: naming the sizes.
    """
    if tokenizer_size > vocab_size:
        raise CacheTeacherError(f"the tokenizer has {tokenizer_size} tokens but the teacher's vocabulary has only "
                                f"{vocab_size}: ids >= {vocab_size} cannot be scored (wrong tokenizer for this "
                                "teacher?)")
    if k > vocab_size:
        raise CacheTeacherError(f"--top-k {k} is larger than the teacher's vocabulary of {vocab_size}")


def check_teacher_positions(config, seq_len: int) -> None:
    """Positions past the teacher's ``max_position_embeddings`` are outside what it was trained on.

    Raises:
        CacheTeacherError: ``seq_len`` exceeds the limit (configs without one are not checked).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise CacheTeacherError(f"--seq-len {seq_len} exceeds the teacher's max_position_embeddings of {limit}: "
                                "its logits past that position are unreliable; lower --seq-len")


def _looks_like_path(name: str) -> bool:
    """A name the Hub cannot hold (ids are ``name`` or ``org/name``), so a missing folder is the user's typo."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_teacher_folder(folder: Path) -> None:
    """A local teacher folder holds a config, tokenizer files and readable weights (headers only are read).

    Raises:
        CacheTeacherError: naming what is missing or unreadable.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .checkpoint import CheckpointError, open_safetensors, read_weight_map

    if not folder.is_dir():
        raise CacheTeacherError(f"teacher {folder} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise CacheTeacherError(f"teacher {folder} has no config.json: not a model folder")
    try:
        settings = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CacheTeacherError(f"{folder / 'config.json'} is not valid JSON ({e})") from e
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    if model_type not in CONFIG_MAPPING and "auto_map" not in settings:  # else its own code names the type
        raise CacheTeacherError(f"teacher {folder}: model type {model_type!r} is unknown to transformers "
                                f"{transformers.__version__}; update transformers, or pass --trust-remote-code for "
                                "a model that ships its own code")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.startswith(("tokenizer", "vocab")) or n.endswith((".model", ".tiktoken")) for n in names):
        raise CacheTeacherError(f"teacher {folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                "vocab.json, ...): save the teacher's tokenizer into it")
    try:
        if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
            for name in sorted(set(read_weight_map(folder).values())):
                with open_safetensors(folder / name):
                    pass
        elif not any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")) for n in names):
            raise CacheTeacherError(f"teacher {folder} holds no weights (model.safetensors, "
                                    "model.safetensors.index.json or pytorch_model.bin)")
    except CheckpointError as e:
        raise CacheTeacherError(str(e)) from e


def load_teacher_files(cfg: "CacheTeacherConfig"):
    """The teacher's tokenizer and config, checked before anything is loaded or written.

    Returns:
        (tokenizer, config).

    Raises:
        CacheTeacherError: a missing, empty or incomplete folder (no config.json, tokenizer files or weights),
            unreadable weights, an unknown model type, a model that is not a causal LM, or a Hub id that
            cannot be loaded.
    """
    import transformers as T

    folder = Path(cfg.teacher).expanduser()
    if folder.exists():
        _check_teacher_folder(folder)
    elif _looks_like_path(cfg.teacher):
        raise CacheTeacherError(f"teacher {cfg.teacher!r} is not a local folder and not a Hub id of the form "
                                "org/name")
    try:
        tokenizer = T.AutoTokenizer.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        config = T.AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        where = "cannot be loaded" if folder.exists() else "is not a local folder and not loadable from the Hub"
        raise CacheTeacherError(f"teacher {cfg.teacher!r} {where}: {' '.join(str(e).split())}") from e
    causal = type(config) in T.MODEL_FOR_CAUSAL_LM_MAPPING or (
        cfg.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))
    if not causal:
        raise CacheTeacherError(f"teacher {cfg.teacher} is a {config.model_type!r} model, which "
                                "AutoModelForCausalLM cannot load: the cache needs a causal LM's next-token logits")
    return tokenizer, config


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU and fp32 on CPU (where bf16 matmuls are slow without AMX)."""
    return DTYPES[name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _bitsandbytes_targets(config, trust_remote_code: bool) -> tuple[int, list[tuple[str, tuple[int, ...]]], float]:
    """What bitsandbytes would do to this model, seen on a copy built from ``config`` on the meta device (no
    weights read, no memory used).

    Returns:
        (nn.Linear layers it replaces: all but the output layer, [(name, shape)] of the 3-D weights it leaves
        alone (fused experts; convolutions excluded), the share of all weights those hold).
    """
    import transformers as T
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    linear = sum(1 for m in model.modules() if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and m is not head)
    fused, total, skipped = [], 0, 0
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            total += p.numel()
            if p.ndim >= 3 and not isinstance(module, torch.nn.modules.conv._ConvNd):
                fused.append((f"{module_name}.{name}", tuple(p.shape)))
                skipped += p.numel()
    return linear, fused, skipped / max(total, 1)


def teacher_precision(config, quantize: str, dtype: torch.dtype, trust_remote_code: bool = False) -> str:
    """The teacher's precision as the cache records it; refuses a quantisation that would leave the experts alone.

    bitsandbytes replaces ``nn.Linear`` layers only, and transformers 5 holds the experts of every MoE family
    as fused 3-D parameters (``mlp.experts.gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``), which it
    leaves in ``dtype``: most of the weights, while the cache would say "4bit". No nn.Linear-based quantizer
    (bitsandbytes, compressed-tensors, torchao's module swap) handles them. Checked from the config alone,
    before any weight is loaded or anything written; bitsandbytes need not be importable.

    Args:
        config: the teacher's transformers config.
        quantize: "none", "8bit" or "4bit".
        dtype: the precision of everything bitsandbytes does not replace (its compute dtype for 4-bit).
        trust_remote_code: to build a model that ships its own code.

    Returns:
        ``"bfloat16"`` for ``quantize="none"``; else e.g. ``"8bit(bitsandbytes: 14 nn.Linear; the rest float32)"``.

    Raises:
        CacheTeacherError: the teacher holds fused 3-D expert weights (the message names them and says to use
            ``--quantize none --dtype bf16``), or cannot be built from its config to check.
    """
    name = str(dtype).removeprefix("torch.")
    if quantize == "none":
        return name
    try:
        linear, fused, share = _bitsandbytes_targets(config, trust_remote_code)
    except Exception as e:  # remote code may not build on the meta device
        raise CacheTeacherError(f"--quantize {quantize}: cannot build the teacher from its config on the meta device "
                                f"to check what bitsandbytes would quantize ({type(e).__name__}: {e}); use "
                                "--quantize none") from e
    if fused:
        first, shape = fused[0]
        raise CacheTeacherError(
            f"--quantize {quantize}: bitsandbytes quantizes only nn.Linear layers, and this {config.model_type} "
            f"teacher holds its experts as {len(fused)} fused 3-D weights ({first} {list(shape)}, ...; {share:.0%} "
            f"of its weights) that would stay {name} while the cache said {quantize}; no nn.Linear-based "
            "quantizer (bitsandbytes, compressed-tensors, torchao) handles fused experts, so use --quantize none "
            "with --dtype bf16")
    return f"{quantize}(bitsandbytes: {linear} nn.Linear; the rest {name})"


def load_teacher(cfg: CacheTeacherConfig, device: torch.device):
    """The teacher in eval mode without gradients, in ``cfg.dtype`` or quantised by bitsandbytes.

    The weights are read straight onto ``device`` (``from_pretrained(device_map={"": device})``: the model is
    built on the meta device and each tensor placed where it belongs), never built on the host and then moved,
    so 8 ranks do not hold 8 host copies of the teacher at once.

    Returns:
        (model, its precision as ``teacher_precision`` states it).

    Raises:
        CacheTeacherError: quantisation was requested and bitsandbytes is missing, the teacher holds fused
            experts it would leave unquantised (``teacher_precision``), it fails on this backend, or it
            quantised another number of layers than stated.
    """
    import transformers as T

    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "device_map": {"": device}}
    if cfg.quantize == "none":
        model = T.AutoModelForCausalLM.from_pretrained(cfg.teacher, **kwargs)
        precision = str(dtype).removeprefix("torch.")
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise CacheTeacherError(f"--quantize {cfg.quantize} needs bitsandbytes (pip install bitsandbytes), "
                                    f"which cannot be imported here: {e}") from e
        config = T.AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        precision = teacher_precision(config, cfg.quantize, dtype, cfg.trust_remote_code)
        qc = (T.BitsAndBytesConfig(load_in_8bit=True) if cfg.quantize == "8bit"
              else T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
        try:
            model = T.AutoModelForCausalLM.from_pretrained(cfg.teacher, quantization_config=qc, **kwargs)
        except Exception as e:  # bitsandbytes' errors differ per backend; say which backend refused
            raise CacheTeacherError(f"loading the teacher in {cfg.quantize} through bitsandbytes failed on "
                                    f"{device.type}: {e}. This backend may not support it; use --quantize none "
                                    "with --dtype bf16") from e
        done = sum(1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
        if f"bitsandbytes: {done} nn.Linear;" not in precision:
            raise CacheTeacherError(f"bitsandbytes quantised {done} layers of the teacher, not as stated in "
                                    f"{precision!r}; use --quantize none")
    model.eval().requires_grad_(False)
    return model, precision


def _bytes_on_disk(output: Path, world_size: int) -> int:
    return output.stat().st_size + sum(tc.shard_path(output, r, world_size).stat().st_size
                                       for r in range(world_size))


def cache_teacher(cfg: CacheTeacherConfig) -> tc.CacheMeta | None:
    """Run the caching pass on this rank (call on every rank of the launcher).

    Returns:
        The index attributes on rank 0, None on other ranks.

    Raises:
        CacheTeacherError: the teacher folder is missing or incomplete, is not a causal LM, cannot score its
            tokenizer's ids, has fewer positions than ``seq_len`` or cannot be loaded as requested.
        moe_ds.corpus.CorpusError: missing, empty, malformed or too short corpus.
        moe_ds.run_layout.OutputError: the output's folder is a file or cannot be written.
        moe_ds.teacher_cache.CacheFormatError: the output, or a shard, holds a cache of another run (or
            something else) and ``overwrite`` is off, or a shard is open in another process.
    """
    info = init_distributed()
    setup_logging(info)
    device = device_for(info)
    output = Path(cfg.output)
    t0 = time.time()

    # Every rank checks everything that can be refused, alike, before any rank writes a byte.
    tokenizer, config = load_teacher_files(cfg)
    vocab_size = _vocab_size(config)
    tok_name, tok_hash, tok_size = tc.tokenizer_fingerprint(tokenizer)
    check_teacher_vocab(vocab_size, tok_size, cfg.top_k)
    check_teacher_positions(config, cfg.seq_len)
    precision = teacher_precision(config, cfg.quantize, resolve_dtype(cfg.dtype, device), cfg.trust_remote_code)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if cfg.cache_features:
        from .features import FeatureConfigError, check_layers, parse_layers

        try:
            check_layers(parse_layers(cfg.cache_features), int(text_config.num_hidden_layers), f"teacher {cfg.teacher}")
        except FeatureConfigError as e:
            raise CacheTeacherError(f"--cache-features: {e}") from None
    if output.is_dir():
        raise CacheTeacherError(f"output {output} is a folder, not an .h5 file")
    corpus = load_corpus(cfg.data, cfg.text_field, cfg.split, cfg.dataset_config)
    sequences = _rank_sequences(cfg, corpus, tokenizer, info.rank, info.world_size)

    dataset = (f"{corpus.description}; packing: record i goes to rank i % world_size, which packs only its own "
               f"records ({packing_rule(tokenizer, cfg.seq_len)}) into at most shard_rows(max_sequences, rank, "
               f"world_size) sequences; sequence g is row g // world_size of rank g % world_size; "
               f"max_sequences={cfg.max_sequences}")
    meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name=cfg.teacher,
                        teacher_config_hash=tc.config_hash(config), tokenizer_name=tok_name,
                        tokenizer_hash=tok_hash, tokenizer_size=tok_size, vocab_size=vocab_size, k=cfg.top_k,
                        seq_len=cfg.seq_len, dataset=dataset, logits_dtype="float16",
                        teacher_dtype=f"{precision}@{device.type}", compression=cfg.compression,
                        world_size=info.world_size, feature_layers=cfg.cache_features or "",
                        feature_target=cfg.feature_target if cfg.cache_features else "",
                        hidden_size=int(text_config.hidden_size) if cfg.cache_features else 0)
    finished = _finished_cache(output, meta, cfg.overwrite)
    if finished is not None:
        log_main("%s is already a finished cache of this configuration; nothing to do", output)
        if finished.world_size != info.world_size:
            log_main("(its %d rank(s) packed their own records: its sequences are not the ones %d would pack)",
                     finished.world_size, info.world_size)
        return finished if info.is_main else None
    check_output_dir(output.parent, "output")
    check_output_dir(tc.shard_dir(output), "cache shard")
    if not cfg.overwrite:  # raises for a shard of another run or one open elsewhere; unreadable ones go aside
        for r in range(info.world_size):
            tc.inspect_shard(tc.shard_path(output, r, info.world_size), meta)
    barrier()  # every rank has checked before any rank writes

    if info.is_main:
        # A stale index (its shards changed, or --overwrite) must not present shards that are about to change.
        output.unlink(missing_ok=True)
        left = remove_stale_temporaries(tc.shard_dir(output))  # of a killed cache_config.json write
        for path in output.parent.glob(f".{output.name}.*-*.tmp"):  # of a killed index write
            path.unlink(missing_ok=True)
            left.append(path)
        for path in left:
            logger.info("removed %s, left behind by an interrupted run", path)
        tc.shard_dir(output).mkdir(parents=True, exist_ok=True)
        write_json_atomic(tc.shard_dir(output) / RUN_CONFIG, asdict(cfg))
        current = {tc.shard_path(output, r, info.world_size).name for r in range(info.world_size)}
        stale = sorted(p.name for p in tc.shard_dir(output).glob("rank-*.h5") if p.name not in current)
        if stale:
            logger.warning("ignoring shards of a run with another rank count in %s: %s", tc.shard_dir(output),
                           ", ".join(stale))
    barrier()

    writer = tc.ShardWriter(tc.shard_path(output, info.rank, info.world_size), meta, cfg.overwrite,
                            cfg.gzip_level)
    resumed = writer.num_done
    if writer.complete:
        logger.info("shard %s is complete (%d sequences); nothing to do", writer.path, writer.num_done)
    else:
        if resumed:
            logger.info("resuming %s after %d sequences", writer.path, resumed)
        try:
            model, precision = load_teacher(cfg, device)
            log_main("teacher %s (%s) on %s, vocabulary %d, tokenizer %d, k=%d, T=%d, %d rank(s)", cfg.teacher,
                     precision, device, vocab_size, tok_size, cfg.top_k, cfg.seq_len, info.world_size)
            _run_shard(cfg, model, writer, islice(sequences, resumed, None), device, info.rank, info.world_size)
        finally:
            writer.close()  # after an error: what was flushed stays resumable, never marked complete

    if not info.is_main:
        return None
    # Wait on the shard files, not a collective: ranks may finish far apart (e.g. one resumed, one not),
    # beyond a process-group timeout. A rank that fails makes the launcher stop this one too.
    _wait_for_shards(output, info.world_size)
    index = tc.write_index(output, info.world_size)
    size = _bytes_on_disk(output, info.world_size)
    wall = time.time() - t0
    packed = sum(tc.read_meta(tc.shard_path(output, r, info.world_size)).num_sequences for r in range(info.world_size))
    if packed > index.num_sequences:
        log_main("%d sequence(s) packed past the shortest rank's share are in the shards but not in the index",
                 packed - index.num_sequences)
    log_main("cached %d sequences x %d = %d tokens from %d rank(s) into %s: %d bytes on disk, %.1f bytes/token "
             "(compression %s), %.1f s wall", index.num_sequences, index.seq_len, index.num_tokens,
             info.world_size, output, size, size / index.num_tokens, index.compression, wall)
    if index.feature_layers:
        log_main("the features of layers %s (%s, H=%d) take %d of those bytes per token before compression "
                 "(2 x %d layers x %d)", index.feature_layers, index.feature_target, index.hidden_size,
                 index.feature_bytes_per_token, len(index.feature_layer_list), index.hidden_size)
    return index


def _rank_sequences(cfg: CacheTeacherConfig, corpus, tokenizer, rank: int, world_size: int) -> Iterator[np.ndarray]:
    """This rank's packed sequences, the first already made (so a bad corpus is refused before any write).

    Raises:
        CorpusError: this rank's share of the corpus is empty or shorter than one sequence.
    """
    cap = None if cfg.max_sequences is None else tc.shard_rows(cfg.max_sequences, rank, world_size)
    documents = rank_documents(corpus.documents, rank, world_size)
    if cap == 0:  # max_sequences < world_size: no share; one record read fixes the text field as on other ranks
        next(documents, None)
        return iter(())
    name = cfg.data if world_size == 1 else f"{cfg.data} (records i % {world_size} == {rank}, rank {rank}'s share)"
    sequences = pack_sequences(documents, tokenizer, cfg.seq_len, cap, name=name)
    first = next(sequences)  # raises CorpusError for an empty or too short corpus
    return chain([first], sequences)


def _finished_cache(output: Path, meta: tc.CacheMeta, overwrite: bool) -> tc.CacheMeta | None:
    """The attributes of the finished cache of this configuration at ``output``, or None when there is work.

    Reads only. A finished cache written with another rank count counts as this configuration's: the same
    teacher over the same records with the same packing rule and max_sequences, though each rank packed its
    own records, so its sequences differ from what this rank count would pack (``world_size`` says which).
    An index whose shards have since gone missing or been damaged is stale: None.

    Raises:
        CacheFormatError: ``output`` is not a readable cache, or a finished cache of another configuration,
            and ``overwrite`` is off.
    """
    if overwrite or not output.exists():
        return None
    again = "pass --overwrite to replace it, or choose another --output"
    try:
        existing = tc.read_meta(output)
    except tc.CacheFormatError as e:
        raise tc.CacheFormatError(f"{e}; {again}") from e
    what = tc.identity_diff(existing, meta, skip=("world_size",))
    if what:
        raise tc.CacheFormatError(f"{output} is a finished cache of a different run ({what}); {again}")
    try:
        return tc.read_cache(output)[0]
    except tc.CacheFormatError as e:
        log_main("%s is stale (%s); recomputing what is missing and rebuilding it", output, e)
        return None


def _shard_done(path: Path) -> bool:
    """True once a shard is complete and closed by its writer.

    The first look takes no file lock, so that it can never make a writer's open (which locks) fail; a
    locked read follows only once ``complete`` is set, when the writer opens the file no more.
    """
    try:
        with h5py.File(path, "r", locking=False) as f:
            if not bool(f.attrs.get("complete", False)):
                return False
        tc.read_meta(path)
        return True
    except (OSError, tc.CacheFormatError):
        return False


def _wait_for_shards(output: Path, world_size: int, poll_s: float = 1.0) -> None:
    pending, last_log = set(range(world_size)), time.time()
    while pending:
        pending = {r for r in pending if not _shard_done(tc.shard_path(output, r, world_size))}
        if pending:
            if time.time() - last_log > 60:
                logger.info("waiting for shard(s) %s to complete", sorted(pending))
                last_log = time.time()
            time.sleep(poll_s)


def _run_shard(cfg, model, writer: tc.ShardWriter, sequences, device, rank: int, world_size: int) -> None:
    """Forward this rank's sequences through the teacher in batches and append them to its shard."""
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0"))
    expected = None
    if cfg.max_sequences is not None:
        expected = tc.shard_rows(cfg.max_sequences, rank, world_size) * cfg.seq_len
    bar = tqdm(total=expected, initial=writer.num_done * cfg.seq_len, unit="tok", unit_scale=True,
               desc=f"rank {rank}", position=rank, mininterval=2.0)
    written, t0 = 0, time.time()
    hooks = None
    if writer.meta.feature_layers:
        from .features import FeatureHooks

        hooks = FeatureHooks(model, writer.meta.feature_layer_list, writer.meta.feature_target)
    try:
        while True:
            batch = list(islice(sequences, cfg.batch_size))
            if not batch:
                break
            input_ids = torch.from_numpy(np.stack(batch)).to(device=device, dtype=torch.long)
            with torch.inference_mode():
                logits = model(input_ids=input_ids, use_cache=False).logits
            if logits.shape[-1] != writer.meta.vocab_size:
                raise ValueError(f"the teacher's logits have {logits.shape[-1]} entries, its config says "
                                 f"{writer.meta.vocab_size}")
            ids, vals, lse = teacher_topk(logits, cfg.top_k, cfg.logits_chunk)
            features = torch.stack(hooks.take(), dim=1) if hooks is not None else None  # [B, L, T, H]
            writer.append(input_ids, ids, vals, lse, features)
            written += len(batch)
            bar.update(len(batch) * cfg.seq_len)
            if stop_after and written >= stop_after:
                bar.close()
                logger.info("%s=%d: stopping after %d sequences (simulated kill)", STOP_AFTER_ENV, stop_after,
                            written)
                logging.shutdown()
                os._exit(75)
    finally:
        bar.close()  # before any error message, which must stand on its own line
        if hooks is not None:
            hooks.remove()
    final = writer.finish()
    dt = time.time() - t0
    logger.info("shard %s complete: %d sequences (%d written now in %.1f s, %.0f tok/s)", writer.path,
                final.num_sequences, written, dt, written * cfg.seq_len / max(dt, 1e-9))

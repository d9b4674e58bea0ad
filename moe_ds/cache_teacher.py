"""Stage 2: run the teacher once over the training text and cache its top-k logits (format: teacher_cache).

Every rank reads and packs the whole corpus in the same deterministic order (``moe_ds.corpus``) and runs
the teacher in inference mode on the sequences g with ``g % world_size == rank``, appending them to its own
shard. When every rank is done, rank 0 joins the shards into the index file. A rerun with the same
arguments resumes each shard after its last flushed batch; a finished shard is skipped.
"""

import logging
import os
import time
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import teacher_cache as tc
from .corpus import load_corpus, pack_sequences
from .dist import barrier, device_for, init_distributed, log_main, setup_logging
from .run_layout import write_json_atomic

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
    quantize: Quantize = "none"  # load the teacher quantised by bitsandbytes
    compression: tc.Compression = "lzf"  # HDF5 filter of the cached datasets (bench/teacher_cache.py: the cost)
    gzip_level: int = 4  # 0-9, with compression=gzip
    logits_chunk: int = 512  # positions converted to fp32 at once for top-k/logsumexp (bounds memory)
    overwrite: bool = False  # discard existing shards instead of resuming them
    trust_remote_code: bool = False  # for teachers with their own modeling code

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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU and fp32 on CPU (where bf16 matmuls are slow without AMX)."""
    return DTYPES[name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_teacher(cfg: CacheTeacherConfig, device: torch.device):
    """The teacher in eval mode without gradients, in ``cfg.dtype`` or quantised by bitsandbytes.

    Returns:
        (model, description of its precision).

    Raises:
        CacheTeacherError: quantisation was requested and bitsandbytes is missing or fails on this backend.
    """
    import transformers as T

    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantize == "none":
        model = T.AutoModelForCausalLM.from_pretrained(cfg.teacher, **kwargs).to(device)
        precision = str(dtype).removeprefix("torch.")
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise CacheTeacherError(f"--quantize {cfg.quantize} needs bitsandbytes (pip install bitsandbytes), "
                                    f"which cannot be imported here: {e}") from e
        qc = (T.BitsAndBytesConfig(load_in_8bit=True) if cfg.quantize == "8bit"
              else T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
        try:
            model = T.AutoModelForCausalLM.from_pretrained(cfg.teacher, quantization_config=qc,
                                                           device_map={"": device}, **kwargs)
        except Exception as e:  # bitsandbytes' errors differ per backend; say which backend refused
            raise CacheTeacherError(f"loading the teacher in {cfg.quantize} through bitsandbytes failed on "
                                    f"{device.type}: {e}. This backend may not support it; use --quantize none "
                                    "with --dtype bf16") from e
        precision = f"{cfg.quantize}(bitsandbytes)/{str(dtype).removeprefix('torch.')}"
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
        CacheTeacherError: the teacher cannot be loaded, its vocabulary is smaller than its tokenizer's or
            than k, or the requested quantisation is unavailable.
        moe_ds.corpus.CorpusError: missing, empty or too short corpus.
        moe_ds.teacher_cache.CacheFormatError: an existing shard belongs to another run.
    """
    import transformers as T

    info = init_distributed()
    setup_logging(info)
    device = device_for(info)
    output = Path(cfg.output)
    t0 = time.time()

    # Everything that can be refused is checked before the teacher is loaded or a byte is written.
    try:
        tokenizer = T.AutoTokenizer.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        config = T.AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        where = "a folder without a loadable tokenizer and config" if Path(cfg.teacher).is_dir() else (
            "not a local folder and not loadable from the Hub")
        raise CacheTeacherError(f"teacher {cfg.teacher!r} is {where}: {' '.join(str(e).split())}") from e
    vocab_size = _vocab_size(config)
    tok_name, tok_hash, tok_size = tc.tokenizer_fingerprint(tokenizer)
    check_teacher_vocab(vocab_size, tok_size, cfg.top_k)
    corpus = load_corpus(cfg.data, cfg.text_field, cfg.split, cfg.dataset_config)
    sequences = pack_sequences(corpus.documents, tokenizer, cfg.seq_len, cfg.max_sequences, name=cfg.data)
    first = next(sequences)  # raises CorpusError for an empty or too short corpus
    sequences = chain([first], sequences)

    dataset = (f"{corpus.description}; packing: documents + eos={tokenizer.eos_token_id}, concatenated, cut "
               f"into {cfg.seq_len}-token sequences, tail dropped; max_sequences={cfg.max_sequences}")
    precision = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    precision = precision if cfg.quantize == "none" else f"{cfg.quantize}/{precision}"
    meta = tc.CacheMeta(format_version=tc.FORMAT_VERSION, teacher_name=cfg.teacher,
                        teacher_config_hash=tc.config_hash(config), tokenizer_name=tok_name,
                        tokenizer_hash=tok_hash, tokenizer_size=tok_size, vocab_size=vocab_size, k=cfg.top_k,
                        seq_len=cfg.seq_len, dataset=dataset, logits_dtype="float16",
                        teacher_dtype=f"{precision}@{device.type}", compression=cfg.compression,
                        world_size=info.world_size)
    if info.is_main:
        # A stale index must not present shards that are about to change.
        output.unlink(missing_ok=True)
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
        model, precision = load_teacher(cfg, device)
        log_main("teacher %s (%s) on %s, vocabulary %d, tokenizer %d, k=%d, T=%d, %d rank(s)", cfg.teacher,
                 precision, device, vocab_size, tok_size, cfg.top_k, cfg.seq_len, info.world_size)
        mine = islice(sequences, info.rank, None, info.world_size)
        try:
            _run_shard(cfg, model, writer, islice(mine, resumed, None), device, info.rank, info.world_size)
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
    log_main("cached %d sequences x %d = %d tokens from %d rank(s) into %s: %d bytes on disk, %.1f bytes/token "
             "(compression %s), %.1f s wall", index.num_sequences, index.seq_len, index.num_tokens,
             info.world_size, output, size, size / index.num_tokens, index.compression, wall)
    return index


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
        writer.append(input_ids, ids, vals, lse)
        written += len(batch)
        bar.update(len(batch) * cfg.seq_len)
        if stop_after and written >= stop_after:
            bar.close()
            logger.info("%s=%d: stopping after %d sequences (simulated kill)", STOP_AFTER_ENV, stop_after, written)
            logging.shutdown()
            os._exit(75)
    bar.close()
    final = writer.finish()
    dt = time.time() - t0
    logger.info("shard %s complete: %d sequences (%d written now in %.1f s, %.0f tok/s)", writer.path,
                final.num_sequences, written, dt, written * cfg.seq_len / max(dt, 1e-9))

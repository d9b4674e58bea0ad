"""The teacher top-k logit cache: one HDF5 layout, written and read only here (rationale: docs/design.md).

A cache ``OUT.h5`` is an index file of HDF5 virtual datasets over one shard per rank,
``OUT.shards/rank-RRRRR-of-WWWWW.h5``; sequence g lives in shard g % W, row g // W. A shard may hold rows past
its share of the index's N sequences (ranks pack their own documents, so their counts differ); the index
presents the largest N for which every shard holds its share (``index_rows``). Each file holds the
datasets of ``_DATASETS``, one row per packed sequence, chunked one sequence per chunk, optionally compressed
and Fletcher-32 checksummed. ``log p_v = logit_v - logsumexp`` for the cached ids (``topk_logprobs``); the
mass outside the top-k is ``tail_mass``. A shard's ``complete`` attribute is set only after its last row is
flushed and the index is renamed into place once every shard is complete, so an ``OUT.h5`` that exists
presents a finished cache.
"""

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch

from .run_layout import atomic_file

logger = logging.getLogger("moe_ds")

FORMAT_VERSION = 1
Compression = Literal["none", "lzf", "gzip"]  # HDF5 filters (with byte shuffle unless none)
COMPRESSIONS = get_args(Compression)
SHARDS_SUFFIX = ".shards"  # OUT.h5 -> OUT.shards/
# A bf16 teacher's logits fit float16 exactly for |x| in [6.1e-5, 65504] (float16 has more mantissa bits);
# logits beyond float16's range are refused rather than stored as infinities.
FLOAT16_MAX = 65504.0

# Every file's datasets, N rows (sequences) of T positions and k entries: name -> (dtype, trailing shape of (T, k)).
_DATASETS = {
    "input_ids": (np.int32, lambda t, k: (t,)),  # [N, T] token ids the teacher read (the student's input)
    "topk_ids": (np.int32, lambda t, k: (t, k)),  # [N, T, k] ids of the k largest logits, largest first
    "topk_logits": (np.float16, lambda t, k: (t, k)),  # [N, T, k] those raw logits at temperature 1
    "logsumexp": (np.float32, lambda t, k: (t,)),  # [N, T] log sum_v exp(logit_v) over the FULL vocabulary
}


# Attributes a cache written before they existed lacks (read as their defaults: no features).
_OPTIONAL_ATTRS = ("feature_layers", "feature_target", "hidden_size")


def datasets_of(meta: "CacheMeta") -> dict:
    """``_DATASETS`` plus, for a cache with features, ``features``: [N, L, T, H] float16, the teacher's outputs of
    ``meta.feature_layer_list`` (in that order) at every position."""
    if not meta.feature_layers:
        return _DATASETS
    n, h = len(meta.feature_layer_list), meta.hidden_size
    return {**_DATASETS, "features": (np.float16, lambda t, k: (n, t, h))}


class CacheFormatError(ValueError):
    """A cache file is missing, truncated, corrupted, incomplete, of another version or inconsistent."""


class TokenizerMismatchError(ValueError):
    """The student's tokenizer or vocabulary differs from the one the cache was written with."""


@dataclass(frozen=True)
class CacheMeta:
    """Attributes of a cache (index file) or of one shard.

    Fields from ``format_version`` to ``world_size`` identify a run: every shard of a cache, and a resumed
    shard, must agree on them. ``num_sequences`` is the row count of the file it was read from.
    """

    format_version: int  # FORMAT_VERSION of the writer
    teacher_name: str  # path or hub id the teacher was loaded from
    teacher_config_hash: str  # sha256 of the teacher's config (see config_hash)
    tokenizer_name: str  # path or hub id of the tokenizer
    tokenizer_hash: str  # sha256 of the token -> id map (see tokenizer_fingerprint)
    tokenizer_size: int  # len(tokenizer): ids 0..tokenizer_size-1 are real tokens
    vocab_size: int  # width V of the teacher's logits (>= tokenizer_size; padded embeddings allowed)
    k: int  # entries per position in topk_ids / topk_logits
    seq_len: int  # T, tokens per packed sequence
    dataset: str  # corpus and packing description (source, field, separator, limits)
    logits_dtype: str  # on-disk dtype of topk_logits ("float16")
    teacher_dtype: str  # precision the teacher ran in ("float32", "bfloat16", "8bit", ...)
    compression: str  # "none" | "lzf" | "gzip"
    world_size: int  # number of shards; sequence g lives in shard g % world_size, row g // world_size
    feature_layers: str = ""  # "8,16,24": decoder layers whose outputs the "features" dataset holds ("": none)
    feature_target: str = ""  # "hidden" (decoder layer output) or "moe" (its MLP/MoE block output); "": none
    hidden_size: int = 0  # H of the stored features (0: none)
    num_sequences: int = 0  # N, rows in this file
    complete: bool = False  # True only once every row is written (set last)
    created: str = ""  # ISO time the file was (last) created

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    @property
    def feature_layer_list(self) -> list[int]:
        return [int(x) for x in self.feature_layers.split(",") if x]

    @property
    def feature_bytes_per_token(self) -> int:
        """Uncompressed bytes of the cached features per token: 2 (float16) x layers x hidden size."""
        return 2 * len(self.feature_layer_list) * self.hidden_size

    def identity(self) -> dict:
        """The fields that must agree between the shards of one cache and across a resume."""
        skip = {"num_sequences", "complete", "created"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs, path: str | Path) -> "CacheMeta":
        """Read from an h5py attribute mapping.

        Raises:
            CacheFormatError: an attribute is missing or the format version is not FORMAT_VERSION.
        """
        if "format_version" not in attrs:
            raise CacheFormatError(f"{path}: no 'format_version' attribute; not a moe_ds teacher cache")
        version = int(attrs["format_version"])
        if version != FORMAT_VERSION:
            raise CacheFormatError(f"{path}: unknown format version {version} (this code reads version "
                                   f"{FORMAT_VERSION}); re-create the cache or update moe_ds")
        missing = [f.name for f in fields(cls) if f.name not in attrs and f.name not in _OPTIONAL_ATTRS]
        if missing:
            raise CacheFormatError(f"{path}: missing attribute(s) {', '.join(missing)}; the file is damaged or "
                                   "was not written by moe_ds.teacher_cache")
        values = {}
        for f in fields(cls):
            if f.name not in attrs:  # an optional attribute of a cache written before it existed: its default
                continue
            v = attrs[f.name]
            v = v.decode() if isinstance(v, bytes) else v
            values[f.name] = bool(v) if f.type in (bool, "bool") else (int(v) if f.type in (int, "int") else str(v))
        return cls(**values)


def shard_dir(output: str | Path) -> Path:
    """``OUT.shards`` beside ``OUT.h5``."""
    output = Path(output)
    return output.with_name(output.stem + SHARDS_SUFFIX)


def shard_path(output: str | Path, rank: int, world_size: int) -> Path:
    """Path of rank ``rank``'s shard of the cache ``output``."""
    return shard_dir(output) / f"rank-{rank:05d}-of-{world_size:05d}.h5"


def shard_rows(num_sequences: int, rank: int, world_size: int) -> int:
    """Rows of shard ``rank``: global sequences rank, rank + W, rank + 2W, ... below ``num_sequences``."""
    return len(range(rank, num_sequences, world_size))


def index_rows(counts: list[int]) -> int:
    """The most sequences N that shards holding ``counts[r]`` rows present in the strided order.

    Shard r holds sequences r, r + W, ...: it covers N when ``counts[r] >= shard_rows(N, r, W)``, i.e. when
    ``N <= counts[r] * W + r``. Counts already split strided from some N give back that N.
    """
    world_size = len(counts)
    return min(n * world_size + r for r, n in enumerate(counts))


def tokenizer_fingerprint(tokenizer) -> tuple[str, str, int]:
    """(name, sha256 of the token -> id map including added tokens, len(tokenizer)).

    Only the id mapping matters downstream: the cache stores token ids, so two tokenizers that split text
    differently but map ids to the same strings give the student the same targets.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return str(getattr(tokenizer, "name_or_path", "") or ""), digest, len(tokenizer)


def config_hash(config) -> str:
    """sha256 of a transformers config, without fields that do not change the function it computes."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                "_attn_implementation_autoset", "architectures"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def topk_logprobs(topk_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Teacher log-probabilities of the cached ids at temperature 1.

    Args:
        topk_logits: [..., k] raw logits (any float dtype).
        logsumexp: [...] float32, log-partition over the full vocabulary.

    Returns:
        [..., k] float32, ``topk_logits - logsumexp``.
    """
    return topk_logits.float() - logsumexp.float().unsqueeze(-1)


def tail_mass(topk_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Teacher probability mass outside the top-k at temperature 1.

    Args:
        topk_logits: [..., k]; logsumexp: [...].

    Returns:
        [...] float32 in [0, 1]; clamped at 0 against float16 rounding of the stored logits.
    """
    return (1.0 - topk_logprobs(topk_logits, logsumexp).exp().sum(-1)).clamp_min(0.0)


def _open(path: Path, mode: str = "r") -> h5py.File:
    """h5py.File with errors that name the problem."""
    if not path.exists():
        raise CacheFormatError(f"{path}: no such cache file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        raise CacheFormatError(f"{path}: cannot open as HDF5 (truncated or corrupted file): {e}") from e


def _check_datasets(f: h5py.File, meta: CacheMeta, path: Path) -> None:
    for name, (dtype, trailing) in datasets_of(meta).items():
        if name not in f:
            raise CacheFormatError(f"{path}: dataset '{name}' is missing")
        d = f[name]
        want = (meta.num_sequences, *trailing(meta.seq_len, meta.k))
        if d.shape != want or d.dtype != dtype:
            raise CacheFormatError(f"{path}: dataset '{name}' is {d.shape} {d.dtype}, attributes say {want} "
                                   f"{np.dtype(dtype)}")


def read_meta(path: str | Path) -> CacheMeta:
    """Attributes of a cache index or shard file, validated.

    Raises:
        CacheFormatError: the file is missing, truncated/corrupted, lacks an attribute, has another format
            version, is not marked complete, or its datasets disagree with its attributes.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            meta = CacheMeta.from_attrs(f.attrs, path)
        except (OSError, KeyError, RuntimeError) as e:  # a file cut short inside its attribute storage
            raise CacheFormatError(f"{path}: its attributes cannot be read (truncated or corrupted file): {e}") from e
        if not meta.complete:
            raise CacheFormatError(f"{path}: incomplete (the writing run stopped before its last write); "
                                   "rerun the caching pass with the same arguments to resume it")
        _check_datasets(f, meta, path)
    return meta


def check_tokenizer_compatible(meta: CacheMeta, tokenizer=None, vocab_size: int | None = None) -> None:
    """Refuse to distil from a cache written with another tokenizer or vocabulary.

    Call before training starts. Token ids in the cache index the teacher's vocabulary; a student whose
    tokenizer maps ids to other strings, or whose logits have another width, would learn wrong targets.

    Args:
        meta: the cache's attributes (``TeacherCacheDataset.meta`` or ``read_meta``).
        tokenizer: the student's tokenizer; its size and token -> id map must equal the teacher's.
        vocab_size: width of the student's logits; must equal ``meta.vocab_size``.

    Raises:
        TokenizerMismatchError: naming what differs.
    """
    if tokenizer is not None:
        name, digest, size = tokenizer_fingerprint(tokenizer)
        if size != meta.tokenizer_size:
            raise TokenizerMismatchError(f"student tokenizer '{name}' has {size} tokens, the cache was written "
                                         f"with '{meta.tokenizer_name}' of {meta.tokenizer_size} tokens")
        if digest != meta.tokenizer_hash:
            raise TokenizerMismatchError(f"student tokenizer '{name}' maps tokens to ids differently from the "
                                         f"cache's '{meta.tokenizer_name}' (vocabulary hash {digest[:12]} != "
                                         f"{meta.tokenizer_hash[:12]})")
    if vocab_size is not None and vocab_size != meta.vocab_size:
        raise TokenizerMismatchError(f"student logits have {vocab_size} entries, the cached teacher's have "
                                     f"{meta.vocab_size}; top-k ids and logsumexp would not line up")


def identity_diff(existing: CacheMeta, requested: CacheMeta, skip: tuple[str, ...] = ()) -> str:
    """``"k: existing 8 != requested 4; ..."`` for the identity fields that differ (empty when none do)."""
    theirs, mine = existing.identity(), requested.identity()
    return "; ".join(f"{k}: existing {theirs[k]!r} != requested {mine[k]!r}" for k in mine
                     if k not in skip and mine[k] != theirs[k])


def _is_lock_error(error: OSError) -> bool:
    """HDF5's own refusal to lock a file another process holds open; not any message containing "lock" (the
    message of a truncated file names ``sblock->base_addr``)."""
    return "unable to lock file" in str(error)


def inspect_shard(path: str | Path, meta: CacheMeta) -> tuple[CacheMeta | None, str | None]:
    """What a rerun of the run ``meta`` can do with the shard at ``path``; reads only, writes nothing.

    Returns:
        ``(None, None)``: there is no shard. ``(attributes, None)``: it can be resumed (or is complete); its
        rows up to ``num_sequences`` are present and the last of them reads back. ``(None, why)``: it cannot be
        read as a shard (truncated, zero bytes, killed before its attributes were written, rows missing) and
        must be set aside and recomputed.

    Raises:
        CacheFormatError: another process holds it open, it was written by another format version, or by a
            run with other attributes (other teacher, tokenizer, k, T, data, dtype, compression or world size).
    """
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if _is_lock_error(e):
            raise CacheFormatError(f"{path} is open in another process (another caching run on the same output?): "
                                   f"{e}") from e
        return None, f"not readable as HDF5: {e}"
    with f:
        version = None
        try:
            version = f.attrs.get("format_version")
            old = CacheMeta.from_attrs(f.attrs, path)
        except CacheFormatError as e:
            if version is not None and int(version) != FORMAT_VERSION:
                raise  # another moe_ds version's shard: not ours to set aside
            return None, str(e)  # killed before its attributes were all written
        except (OSError, KeyError, ValueError, RuntimeError) as e:  # damaged metadata
            return None, f"its attributes cannot be read: {e}"
        what = identity_diff(old, meta)
        if what:
            raise CacheFormatError(f"{path} was written by a different run ({what}); pass --overwrite or choose "
                                   "another --output")
        n = old.num_sequences
        try:
            for name, (dtype, trailing) in _DATASETS.items():
                if name not in f:
                    return None, f"dataset '{name}' is missing"
                d, tail = f[name], trailing(meta.seq_len, meta.k)
                if d.shape[1:] != tail or d.dtype != dtype or d.shape[0] < n or (old.complete and d.shape[0] != n):
                    return None, f"dataset '{name}' is {d.shape} {d.dtype} for {n} sequences"
                if n:
                    d[n - 1]  # the last counted row reads back (its Fletcher-32 checksum holds)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            return None, f"its rows cannot be read: {e}"
    return old, None


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``PATH.broken`` (``.broken-2``, ... when taken); returns the new path. Never deletes."""
    aside, n = path.with_name(path.name + ".broken"), 2
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.broken-{n}"), n + 1
    os.replace(path, aside)
    return aside


def _close_after_failure(f: h5py.File, error: BaseException) -> None:
    """Close ``f`` after a write to it failed (e.g. a full disk or a file-size limit).

    HDF5 cannot flush such a file: each close attempt fails again while handles into it remain, and a handle
    left for interpreter exit crashes the process (SIGSEGV). So the handles held by the failed call's frames
    are dropped first (their finalisers, which would each print the same write error, are silenced) and the
    close is retried until it succeeds. The file on disk may be unreadable; a rerun sets it aside.
    """
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        for _ in range(8):  # each failed attempt releases part of what HDF5 still holds
            with contextlib.suppress(OSError, RuntimeError):
                f.close()
                return
    finally:
        sys.unraisablehook = hook


class ShardWriter:
    """Appends packed sequences and their teacher top-k to one rank's shard; resumes a stopped shard.

    Rows are appended in batches; after each batch the row count attribute ``num_sequences`` is updated and
    the file flushed, so a killed run loses at most the batch in flight. ``finish`` sets ``complete`` last.
    The file is created on the first ``append``/``finish``, so a run that fails before writing leaves none.
    A complete shard is only read, never held open.
    """

    def __init__(self, path: str | Path, meta: CacheMeta, overwrite: bool = False, gzip_level: int = 4):
        """Open (resume) or prepare a shard.

        A shard that cannot be read (see ``inspect_shard``) is renamed to ``PATH.broken`` and started afresh.

        Args:
            path: shard file path (see ``shard_path``).
            meta: attributes of this run; ``num_sequences``/``complete``/``created`` are managed here.
            overwrite: delete an existing shard instead of resuming it.
            gzip_level: 0-9, used when ``meta.compression == "gzip"``.

        Raises:
            CacheFormatError: see ``inspect_shard``: open in another process, another format version, or
                written by a run with other attributes.
        """
        if meta.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {meta.compression!r}")
        self.path, self.gzip_level = Path(path), gzip_level
        self.meta = replace(meta, num_sequences=0, complete=False, created=_now())
        self._f: h5py.File | None = None
        self._failed = False  # a write failed: the handle is gone and the file must not be written again
        if self.path.exists() and overwrite:
            self.path.unlink()
        old, why = inspect_shard(self.path, self.meta)
        if why is not None:  # kept for inspection, never deleted
            aside = set_aside(self.path)
            logger.warning("%s cannot be resumed (%s); moved it to %s and recomputing its sequences", self.path, why,
                           aside)
        elif old is not None:
            self.meta = replace(self.meta, num_sequences=old.num_sequences, complete=old.complete,
                                created=old.created)
            if not old.complete:
                with self._guard():
                    self._resume()

    @property
    def num_done(self) -> int:
        return self.meta.num_sequences

    @property
    def complete(self) -> bool:
        return self.meta.complete

    @contextlib.contextmanager
    def _guard(self):
        """HDF5 writes: when one fails, the file is closed (see ``_close_after_failure``) and never written again
        by this writer, so a later call cannot mistake the damaged file for a fresh one."""
        if self._failed:
            raise RuntimeError(f"an earlier write to {self.path} failed; rerun to resume the shard")
        try:
            yield
        except BaseException as e:
            f, self._f, self._failed = self._f, None, True
            if f is not None:
                _close_after_failure(f, e)
            raise

    def _resume(self) -> None:
        try:
            self._f = h5py.File(self.path, "r+", rdcc_nbytes=0)  # see _create
        except OSError as e:
            if _is_lock_error(e):
                raise CacheFormatError(f"{self.path} is open in another process (another caching run on the same "
                                       f"output?): {e}") from e
            raise
        # Rows past the last flushed count belong to a batch that was in flight when the run stopped.
        for name in datasets_of(self.meta):
            self._f[name].resize(self.num_done, axis=0)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No chunk cache (rows are written whole, once): a failed write then raises from the write itself,
        # instead of later, while a handle is freed, where h5py can only print it and HDF5 is left inconsistent.
        self._f = h5py.File(self.path, "w", rdcc_nbytes=0)
        filters = {}
        if self.meta.compression != "none":
            filters = {"compression": self.meta.compression, "shuffle": True}
            if self.meta.compression == "gzip":
                filters["compression_opts"] = self.gzip_level
        for name, (dtype, trailing) in datasets_of(self.meta).items():
            tail = trailing(self.meta.seq_len, self.meta.k)
            self._f.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=(1, *tail), dtype=dtype,
                                   fletcher32=True, **filters)
        self._write_attrs()

    def _write_rows(self, n: int, arrays: dict[str, np.ndarray]) -> None:
        for name, (dtype, _) in datasets_of(self.meta).items():
            d = self._f[name]
            d.resize(n + len(arrays[name]), axis=0)
            d[n:] = arrays[name].astype(dtype)

    def _write_attrs(self) -> None:
        for key, value in self.meta.to_attrs().items():
            self._f.attrs[key] = value
        self._f.flush()

    def append(self, input_ids, topk_ids, topk_logits, logsumexp, features=None) -> None:
        """Append B sequences.

        Args:
            input_ids: [B, T] integer token ids.
            topk_ids: [B, T, k] integer ids in [0, vocab_size).
            topk_logits: [B, T, k] float, finite and within float16 range.
            logsumexp: [B, T] float.
            features: [B, L, T, H] float, finite and within float16 range: required when the cache holds features
                (``meta.feature_layers``), refused otherwise.

        Raises:
            ValueError: shapes disagree with (T, k) (or (L, T, H)), ids/logits/features are out of range, or
                features are missing or unexpected.
            RuntimeError: the shard is already complete.
        """
        if self.complete:
            raise RuntimeError(f"{self.path} is complete; nothing may be appended")
        if (features is None) != (not self.meta.feature_layers):
            raise ValueError("features must be given exactly when the cache holds features "
                             f"(feature_layers={self.meta.feature_layers!r})")
        arrays = {"input_ids": input_ids, "topk_ids": topk_ids, "topk_logits": topk_logits, "logsumexp": logsumexp}
        if features is not None:
            arrays["features"] = features
        arrays = {k: (v.float().cpu().numpy() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16
                      else v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()}
        b = arrays["input_ids"].shape[0]
        if features is not None:
            f32 = arrays["features"].astype(np.float32)
            if not np.isfinite(f32).all() or np.abs(f32).max(initial=0) > FLOAT16_MAX:
                raise ValueError("features are non-finite or beyond float16's range (|x| > 65504)")
        for name, (dtype, trailing) in datasets_of(self.meta).items():
            want = (b, *trailing(self.meta.seq_len, self.meta.k))
            if arrays[name].shape != want:
                raise ValueError(f"{name}: shape {arrays[name].shape}, expected {want}")
        ids = arrays["topk_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= self.meta.vocab_size):
            raise ValueError(f"topk_ids outside [0, {self.meta.vocab_size})")
        logits = arrays["topk_logits"].astype(np.float32)
        if not np.isfinite(logits).all() or np.abs(logits).max(initial=0) > FLOAT16_MAX:
            raise ValueError("topk_logits are non-finite or beyond float16's range (|x| > 65504)")
        with self._guard():
            if self._f is None:
                self._create()
            self._write_rows(self.num_done, arrays)
            self.meta = replace(self.meta, num_sequences=self.num_done + b)
            self._write_attrs()  # the row count is flushed after the rows it counts

    def finish(self) -> CacheMeta:
        """Mark the shard complete (the last write) and close it. Returns its final attributes."""
        with self._guard():
            if self._f is None:
                self._create()
            self.meta = replace(self.meta, complete=True)
            self._write_attrs()
        self.close()
        return self.meta

    def close(self) -> None:
        """Close the file (a no-op when closed, or when a write failed and it was closed then)."""
        if self._f is not None:
            with self._guard():
                self._f.close()
            self._f = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _shard_metas(output: Path, meta: CacheMeta) -> tuple[list[Path], list[CacheMeta]]:
    """Validate every shard of a cache against the index attributes ``meta``."""
    paths = [shard_path(output, r, meta.world_size) for r in range(meta.world_size)]
    metas = []
    for r, p in enumerate(paths):
        m = read_meta(p)
        diff = [k for k, v in meta.identity().items() if m.identity()[k] != v]
        if diff:
            raise CacheFormatError(f"{p}: attributes {', '.join(diff)} differ from the index {output}")
        want = shard_rows(meta.num_sequences, r, meta.world_size)
        if m.num_sequences < want:  # more is fine: rows past the shard's share are not presented
            raise CacheFormatError(f"{p}: {m.num_sequences} sequences, expected at least {want} of "
                                   f"{meta.num_sequences}")
        metas.append(m)
    return paths, metas


def write_index(output: str | Path, world_size: int) -> CacheMeta:
    """Join the complete shards of ``output`` into the index file ``output`` (atomically).

    Args:
        output: the cache path ``OUT.h5``; shards are read from ``OUT.shards/``.
        world_size: number of shards.

    Returns:
        The index attributes (``num_sequences`` = N = ``index_rows`` of the shards' row counts; the rows
        past a shard's share of N are left out).

    Raises:
        CacheFormatError: a shard is missing, incomplete, corrupted or from another run.
    """
    output = Path(output)
    first = read_meta(shard_path(output, 0, world_size))
    total = index_rows([read_meta(shard_path(output, r, world_size)).num_sequences for r in range(world_size)])
    meta = replace(first, num_sequences=total, complete=True, created=_now())
    paths, metas = _shard_metas(output, meta)
    with atomic_file(output) as tmp:
        f = h5py.File(tmp, "w")
        try:
            _write_index_file(f, output, meta, paths, metas)
            f.close()
        except BaseException as e:
            _close_after_failure(f, e)
            raise
    return meta


def _write_index_file(f: h5py.File, output: Path, meta: CacheMeta, paths: list[Path], metas: list[CacheMeta]):
    total = meta.num_sequences
    for name, (dtype, trailing) in datasets_of(meta).items():
        tail = trailing(meta.seq_len, meta.k)
        layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
        for r, (p, m) in enumerate(zip(paths, metas)):
            share = shard_rows(total, r, meta.world_size)
            if share:
                # Source paths relative to the index: the folder can be moved.
                src = h5py.VirtualSource(str(p.relative_to(output.parent)), name, shape=(m.num_sequences, *tail))
                layout[r:total:meta.world_size] = src[:share]
        f.create_virtual_dataset(name, layout, fillvalue=0)
    for key, value in meta.to_attrs().items():
        if key != "complete":
            f.attrs[key] = value
    f.attrs["complete"] = True  # set last


def read_cache(path: str | Path) -> tuple[CacheMeta, list[Path]]:
    """The attributes of a finished cache and its shard paths, the index and every shard validated.

    Raises:
        CacheFormatError: the index or a shard is missing, truncated, corrupted, incomplete, of an unknown
            version or inconsistent with the index.
    """
    path = Path(path)
    meta = read_meta(path)
    paths, _ = _shard_metas(path, meta)
    return meta, paths


class TeacherCacheDataset(torch.utils.data.Dataset):
    """Packed sequences with their teacher top-k, in the cache's global order.

    Item ``i`` is a dict of tensors:

        input_ids    [T]     int64
        topk_ids     [T, k]  int64
        topk_logits  [T, k]  float32   raw teacher logits at temperature 1
        logsumexp    [T]     float32   over the teacher's full vocabulary

    The index and every shard are validated on construction (and closed again), and items are read from the
    shards, not through the index: a virtual dataset silently returns fill values for a missing source. Shard
    files are opened lazily in the process that reads, because h5py handles do not survive a fork into
    DataLoader workers.

    Attributes:
        meta: the cache's ``CacheMeta`` (k, seq_len, vocab_size, tokenizer name/hash/size, teacher, ...).
    """

    def __init__(self, path: str | Path, tokenizer=None, vocab_size: int | None = None):
        """Open a cache.

        Args:
            path: the index file ``OUT.h5``.
            tokenizer: the student's tokenizer, checked with ``check_tokenizer_compatible``.
            vocab_size: width of the student's logits, checked likewise.

        Raises:
            CacheFormatError: the index or a shard is missing, truncated, corrupted, incomplete, of an unknown
                version or inconsistent.
            TokenizerMismatchError: the student's tokenizer or vocabulary differs from the cache's.
        """
        self.path = Path(path)
        self.meta, self.shard_paths = read_cache(self.path)
        check_tokenizer_compatible(self.meta, tokenizer, vocab_size)
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        self._features: list[int] | None = None  # positions in meta.feature_layer_list read as teacher_features

    def __len__(self) -> int:
        return self.meta.num_sequences

    def select_features(self, layers: list[int]) -> None:
        """Also read the teacher's features of ``layers`` (item key ``teacher_features``: [L, T, H] float32).

        Raises:
            CacheFormatError: a layer the cache holds no features of.
        """
        cached = self.meta.feature_layer_list
        missing = [layer for layer in layers if layer not in cached]
        if missing:
            raise CacheFormatError(f"{self.path} holds no features of layer(s) {missing} (it has {cached or 'none'})")
        self._features = [cached.index(layer) for layer in layers]

    def _shard(self, r: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._files, self._pid = {}, os.getpid()
        if r not in self._files:
            self._files[r] = _open(self.shard_paths[r])
        return self._files[r]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        r, row = i % self.meta.world_size, i // self.meta.world_size
        f = self._shard(r)
        try:
            arrays = {name: f[name][row] for name in _DATASETS}
        except OSError as e:
            raise CacheFormatError(f"{self.shard_paths[r]}: cannot read sequence {i} (row {row}); the file is "
                                   f"corrupted: {e}") from e
        item = {"input_ids": torch.from_numpy(arrays["input_ids"].astype(np.int64)),
                "topk_ids": torch.from_numpy(arrays["topk_ids"].astype(np.int64)),
                "topk_logits": torch.from_numpy(arrays["topk_logits"].astype(np.float32)),
                "logsumexp": torch.from_numpy(arrays["logsumexp"])}
        if self._features is not None:
            try:
                feats = f["features"][row, self._features] if self._features else f["features"][row, :0]
            except OSError as e:
                raise CacheFormatError(f"{self.shard_paths[r]}: cannot read the features of sequence {i}; the file "
                                       f"is corrupted: {e}") from e
            item["teacher_features"] = torch.from_numpy(feats.astype(np.float32))
        return item

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # handles are per process
        return state

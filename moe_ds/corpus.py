"""Training text: load documents from local files or a Hugging Face dataset, tokenise, pack.

Loading goes through ``datasets.load_dataset(..., streaming=True)`` for every source, so a local JSONL file
and a multi-terabyte hub dataset (``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``) are read the same
way, document by document, in the source's order (JSON-lines files are read line by line here, so that a
malformed line is reported by file and line number). Packing is deterministic: each document is tokenised
without special tokens, preceded by the tokenizer's BOS id when the tokenizer adds one by default (Llama,
Mixtral; not Qwen or GPT-2) and followed by its EOS id (when it has one); the documents are concatenated and
cut into consecutive sequences of exactly ``seq_len`` tokens; the tail shorter than one sequence is dropped.
Several ranks split the records first (``rank_documents``: record i goes to rank i % world_size) and each
packs only its own, so the sequences depend on the number of ranks; one rank packs the whole corpus in order.
"""

import contextlib
import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

logger = logging.getLogger("moe_ds")

# file suffix -> datasets builder
_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
            ".txt": "text", ".text": "text", ".md": "text"}
_JSON_LINES = (".jsonl", ".jsonl.gz")  # read by _jsonl_rows; .json may hold one array, so datasets reads it


class CorpusError(ValueError):
    """The corpus is missing, empty, too short, or its text field cannot be found."""


class Corpus:
    """Documents (str, in source order) and a description of the source recorded in the cache."""

    def __init__(self, rows: Iterable[dict], source: str, text_field: str | None, name: str):
        self.rows, self.source, self.text_field, self.name = rows, source, text_field, name

    @property
    def description(self) -> str:
        """Source and text field (the field is known once the first document has been read)."""
        return f"{self.source} field={self.text_field or 'auto'}"

    @property
    def documents(self) -> Iterator[str]:
        for row in self.rows:
            if self.text_field is None:
                self.text_field = _pick_field(row, self.name)
            if self.text_field not in row:
                raise CorpusError(f"{self.name}: a record has no field '{self.text_field}' (fields: "
                                  f"{sorted(row)}); pass --text-field")
            text = row[self.text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{self.name}: field '{self.text_field}' holds {type(text).__name__}, not text")
            yield text


def _suffix_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in sorted(_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.iterdir() if p.is_file() and _suffix_format(p)) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path}: no .jsonl/.json/.parquet/.txt files in this folder")
    formats = {_suffix_format(p) for p in files}
    if None in formats:
        raise CorpusError(f"{path}: unknown file type; expected one of {', '.join(sorted(_FORMATS))}")
    if len(formats) > 1:
        raise CorpusError(f"{path}: mixes file types {sorted(formats)}; use one type per corpus")
    return formats.pop(), [str(p) for p in files]


def _looks_local(data: str) -> bool:
    return data.startswith(("/", "./", "../", "~")) or _suffix_format(Path(data)) is not None


def load_corpus(data: str, text_field: str | None = None, split: str = "train",
                dataset_config: str | None = None) -> Corpus:
    """Documents from a local file/folder or a Hugging Face dataset name, streamed in order.

    Args:
        data: a .jsonl/.json(.gz)/.parquet/.txt file, a folder of such files (read in sorted name order),
            or a hub dataset name (needs network; ``HF_DATASETS_OFFLINE=1`` makes that an error).
        text_field: column holding the text; default "text", or the only string column when there is no
            "text". Plain-text files are one document per file.
        split: dataset split (hub datasets; local files are "train").
        dataset_config: hub dataset configuration, e.g. "sample-10BT" for fineweb-edu.

    Raises:
        CorpusError: a local path does not exist or has an unknown type, a local file cannot be parsed (a
            JSON-lines error names the file and its 1-based line), a hub dataset cannot be loaded, or the text
            field cannot be found. Errors inside a file may only surface while ``documents`` is iterated.
    """
    import datasets

    path = Path(data).expanduser()
    if path.exists() or _looks_local(data):
        if not path.exists():
            raise CorpusError(f"data path {data} does not exist")
        fmt, files = _local_files(path)
        source = f"{fmt}:{path.resolve()}"
        if all(f.lower().endswith(_JSON_LINES) for f in files):
            return Corpus(_jsonl_rows(files), source, text_field, data)
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        try:
            with _quiet_datasets():  # it logs a parse error before raising it; the CorpusError says it once
                ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **kwargs)
        except StopIteration as e:  # the builder found not one record to infer a schema from
            raise CorpusError(f"{data} is empty: it holds no non-empty text") from e
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            raise _unreadable(data, fmt, e) from e
        return Corpus(_reported_rows(ds, data, fmt), source, text_field, data)
    else:
        try:
            ds = datasets.load_dataset(data, dataset_config, split=split, streaming=True)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            raise CorpusError(f"{data} is neither a local file nor a loadable hub dataset (offline, or a "
                              f"misspelt name/config?): {type(e).__name__}: {e}") from e
        source = f"hub:{data}" + (f"/{dataset_config}" if dataset_config else "") + f":{split}"
    return Corpus(ds, source, text_field, data)


def _jsonl_rows(files: list[str]) -> Iterator[dict]:
    """The records of JSON-lines files in order, one per non-blank line.

    Raises:
        CorpusError: a line is not valid JSON, not an object, or not UTF-8 (naming the file and 1-based line).
    """
    for file in files:
        opener = gzip.open if file.lower().endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as f:
            n = 0
            try:
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{file}: line {n} is not valid JSON ({e.msg} at column {e.pos + 1})") from e
                    if not isinstance(row, dict):
                        raise CorpusError(f"{file}: line {n} holds a JSON {_json_kind(row)}, not an object")
                    yield row
            except UnicodeDecodeError as e:
                raise CorpusError(f"{file}: line {n + 1} is not UTF-8 text ({e.reason})") from e
            except (EOFError, gzip.BadGzipFile) as e:
                raise CorpusError(f"{file}: not a readable gzip file after line {n} ({e})") from e


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _unreadable(data: str, fmt: str, error: Exception) -> CorpusError:
    return CorpusError(f"{data} cannot be read as {fmt} ({type(error).__name__}: {' '.join(str(error).split())})")


@contextlib.contextmanager
def _quiet_datasets():
    """Silence the ``datasets`` library's own log lines for a while (restored after)."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _reported_rows(rows: Iterable[dict], data: str, fmt: str) -> Iterator[dict]:
    """``rows`` of local files, a parse error met while streaming them reported once, as a CorpusError."""
    import datasets

    try:
        with _quiet_datasets():
            yield from rows
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise _unreadable(data, fmt, e) from e


def _pick_field(row: dict, data: str) -> str:
    if "text" in row:
        return "text"
    strings = [k for k, v in row.items() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    raise CorpusError(f"{data}: no 'text' field and {len(strings)} string fields {strings}; pass --text-field")


def rank_documents(documents: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """The documents of one rank: record i (0-based, counting empty ones) goes to rank ``i % world_size``.

    Every rank still reads, and so validates, every record; only its own are handed on to be tokenised.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return islice(documents, rank, None, world_size)


def document_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text by default (Llama, Mixtral), or None (Qwen, GPT-2).

    Detected by tokenising "a" with and without special tokens, so a tokenizer that has a BOS token but does
    not add it (GPT-2's ``<|endoftext|>``) gets none, as in its own training.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if full[:1] == [bos] and plain[:1] != [bos] else None


def packing_rule(tokenizer, seq_len: int) -> str:
    """How ``pack_sequences`` builds sequences with this tokenizer, for a cache's description (ids named)."""
    bos, eos = document_bos(tokenizer), tokenizer.eos_token_id
    document = (f"bos={bos} + " if bos is not None else "") + "text" + (f" + eos={eos}" if eos is not None else "")
    return (f"each document tokenised without special tokens as {document}, concatenated, cut into {seq_len}-token "
            "sequences, tail dropped")


def pack_sequences(documents: Iterable[str], tokenizer, seq_len: int, max_sequences: int | None = None,
                   batch_docs: int = 256, name: str = "corpus") -> Iterator[np.ndarray]:
    """Tokenise documents and cut the BOS/EOS-delimited token stream into fixed-length sequences.

    Each document contributes ``[bos] + ids + [eos]``: ``ids`` tokenised without special tokens, ``bos`` only
    when the tokenizer adds one by default (``document_bos``) and the text does not already start with it,
    ``eos`` when the tokenizer has one. A tokenizer without a default BOS (Qwen, GPT-2) packs ``ids + [eos]``.

    Args:
        documents: texts in corpus order (one rank's share: ``rank_documents``); empty ones are skipped.
        tokenizer: a transformers tokenizer (fast ones tokenise a batch in parallel).
        seq_len: T, tokens per sequence (>= 1).
        max_sequences: stop after this many sequences (None: until the corpus ends; 0: read nothing).
        batch_docs: documents tokenised per call.
        name: corpus name for error messages.

    Yields:
        [T] int32 arrays, in a deterministic order.

    Raises:
        CorpusError: the corpus holds no text, or fewer tokens than one sequence (raised on exhaustion,
            before anything would be yielded).
    """
    if max_sequences == 0:
        return
    bos, eos = document_bos(tokenizer), tokenizer.eos_token_id
    buf: list[int] = []
    n_docs = n_tokens = n_seqs = 0
    batch: list[str] = []

    def flush_batch() -> Iterator[np.ndarray]:
        nonlocal n_tokens, n_seqs, buf
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            start = len(buf)
            if bos is not None and ids[:1] != [bos]:  # a text that spells out BOS itself keeps just that one
                buf.append(bos)
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
            n_tokens += len(buf) - start
        start = 0
        while len(buf) - start >= seq_len and (max_sequences is None or n_seqs < max_sequences):
            yield np.asarray(buf[start:start + seq_len], dtype=np.int32)
            start += seq_len
            n_seqs += 1
        buf = buf[start:]

    for text in documents:
        if not text:
            continue
        n_docs += 1
        batch.append(text)
        if len(batch) >= batch_docs:
            yield from flush_batch()
            batch = []
            if max_sequences is not None and n_seqs >= max_sequences:
                return
    if batch:
        yield from flush_batch()
    if n_docs == 0:
        raise CorpusError(f"{name} is empty: it holds no non-empty text")
    if n_seqs == 0:
        raise CorpusError(f"{name} has only {n_tokens} tokens ({n_docs} documents), fewer than one sequence of "
                          f"{seq_len}; lower --seq-len or add text")

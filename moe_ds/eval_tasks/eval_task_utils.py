"""Functions the local task YAMLs name with ``!function`` (lm-eval loads this file from beside the YAML).

WikiText uses lm-eval's own detokenizer and ``process_results`` so its perplexities are defined exactly
as the built-in ``wikitext`` task defines them.
"""

import re

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

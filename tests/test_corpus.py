"""Packing rules of ``moe_ds.corpus`` (#11 items 9 and 10): a tokenizer that adds BOS by default gets one BOS
per document (never two), one that adds none packs exactly as before, and ranks split the records before any
tokenising."""

import numpy as np
import pytest
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from moe_ds.corpus import document_bos, pack_sequences, packing_rule, rank_documents

WORDS = ["<unk>", "<s>", "</s>", "the", "river", "rose", "after", "rain", "she", "wrote", "it", "down"]


def _word_tokenizer(template: str | None) -> T.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with ``<s>`` (1) and ``</s>`` (2); ``template`` is its post-processor for
    one text, e.g. "<s> $A" (Llama, Mixtral), or None for none (GPT-2 style: BOS known but never added)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


DOCS = ["the river rose", "", "after rain", "<s> she wrote it down", "the rain"]


def test_a_tokenizer_that_adds_bos_gets_it_before_every_document_once():
    tok = _word_tokenizer("<s> $A")
    assert document_bos(tok) == 1 and tok("the")["input_ids"] == [1, 3]
    stream = [1, 3, 4, 5, 2, 1, 6, 7, 2, 1, 8, 9, 10, 11, 2, 1, 3, 7, 2]  # the text that spells out <s> keeps one
    for batch_docs in (1, 2, 256):
        got = [s.tolist() for s in pack_sequences(DOCS, tok, 4, batch_docs=batch_docs)]
        assert got == [stream[i:i + 4] for i in range(0, 16, 4)]
    assert packing_rule(tok, 4) == ("each document tokenised without special tokens as bos=1 + text + eos=2, "
                                    "concatenated, cut into 4-token sequences, tail dropped")


def test_a_tokenizer_that_adds_no_bos_packs_as_before(tiny_tokenizer, stdlib_text):
    """Qwen/GPT-2 style (the test tokenizer, and a word tokenizer whose <s> is known but never added): each
    document is its ids + EOS, exactly the stream of the packing before BOS was considered."""
    gpt2_style = _word_tokenizer(None)
    assert document_bos(gpt2_style) is None and gpt2_style.bos_token_id == 1
    stream = [3, 4, 5, 2, 6, 7, 2, 1, 8, 9, 10, 11, 2, 3, 7, 2]
    assert [s.tolist() for s in pack_sequences(DOCS, gpt2_style, 4)] == [stream[i:i + 4] for i in range(0, 16, 4)]
    assert document_bos(tiny_tokenizer) is None
    texts = [stdlib_text[i:i + 700] for i in range(0, 14_000, 700)]
    flat = []
    for t in texts:
        flat += tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    got = np.concatenate(list(pack_sequences(texts, tiny_tokenizer, 64)))
    assert got.tolist() == flat[:len(got)] and len(flat) - len(got) < 64
    assert packing_rule(tiny_tokenizer, 64).startswith(f"each document tokenised without special tokens as text + "
                                                       f"eos={tiny_tokenizer.eos_token_id}, ")


def test_max_sequences_zero_reads_nothing(tiny_tokenizer):
    def documents():
        raise AssertionError("read")
        yield "never"

    assert list(pack_sequences(documents(), tiny_tokenizer, 8, max_sequences=0)) == []


def test_ranks_split_the_records_before_tokenising():
    records = [f"document {i}" if i % 7 else "" for i in range(23)]  # empty records count too
    shares = [list(rank_documents(iter(records), r, 3)) for r in range(3)]
    assert shares == [records[r::3] for r in range(3)]
    assert sorted(d for s in shares for d in s) == sorted(records)
    assert list(rank_documents(records, 0, 1)) == records
    with pytest.raises(ValueError, match=r"rank 2 outside \[0, 2\)"):
        rank_documents(records, 2, 2)

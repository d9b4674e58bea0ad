"""The fixtures build what the other tests rely on."""

import torch

from conftest import FAMILIES, tiny_model


def test_every_family_builds_and_runs(family):
    model = tiny_model(family)
    out = model(torch.randint(0, 100, (2, 5))).logits
    assert out.shape == (2, 5, model.config.vocab_size)
    assert torch.isfinite(out).all()


def test_tiny_lm_dir_round_trips(tiny_lm_dir, tiny_tokenizer):
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = T.AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert len(tok) == len(tiny_tokenizer) == model.config.vocab_size
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "def f(x):\n    return x"
    assert len(FAMILIES) == 5

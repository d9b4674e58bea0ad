"""Magnitude pruning of expert weights: exact masks, honest bitmap storage, the config section, and pruned weights
held at exactly zero by the gradient masks (one process here; under the 2-rank ZeRO-3 launcher, across two stages
and an expert-pruning boundary: tests/test_progressive_pruning.py)."""

import json
import math

import pytest
import torch
import transformers as T

from conftest import tiny_model
from moe_ds.sparsity import (SPARSITY_KEY, MaskedGradients, SparsityError, count_zeros, density_for_byte_ratio,
                             expert_parameters, magnitude_masks, nnz_for_bytes, prune_experts_by_magnitude,
                             read_sparsity_section, sparse_bytes, sparsity_section)


# ------------------------------------------------------------------------------------------------ masks

def test_sparsity_prunes_exactly_the_smallest_magnitudes():
    w = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    for sparsity, pruned in ((0.0, 0), (0.3, 36), (0.5, 60), (0.999, 120), (1.0, 120)):
        keep = magnitude_masks(w, sparsity=sparsity)
        assert keep.shape == w.shape and keep.dtype == torch.bool and int((~keep).sum()) == pruned
        if 0 < pruned < w.numel():  # every kept magnitude is at least every pruned one
            assert w.abs()[keep].min() >= w.abs()[~keep].max()
    # round(sparsity * numel), halves up: 0.25 of 10 is 2.5 -> 3
    assert int((~magnitude_masks(torch.arange(1.0, 11.0), sparsity=0.25)).sum()) == 3


def test_ties_at_the_cut_are_broken_by_flat_index():
    w = torch.tensor([[3.0, -1.0, 1.0, 2.0], [1.0, -1.0, 5.0, 0.5]])  # five weights of magnitude 1
    keep = magnitude_masks(w, sparsity=0.5)  # prune 4: the 0.5, then the first three 1s in flat order
    assert keep.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert torch.equal(magnitude_masks(w, sparsity=0.5), keep)
    bf16 = torch.randn(3, 64, 64).bfloat16()  # bf16 has many exact ties: the count is still exact
    assert int((~magnitude_masks(bf16, sparsity=0.37)).sum()) == math.floor(0.37 * bf16.numel() + 0.5)


def test_threshold_prunes_below_it_and_bad_settings_are_refused():
    w = torch.tensor([0.1, -0.2, 0.3, -0.05, 0.0])
    assert magnitude_masks(w, threshold=0.2).tolist() == [False, True, True, False, False]
    for kwargs, match in (({}, "exactly one"), ({"sparsity": 0.5, "threshold": 0.1}, "exactly one"),
                          ({"sparsity": 1.5}, "in \\[0, 1\\]"), ({"sparsity": -0.1}, "in \\[0, 1\\]"),
                          ({"threshold": -1.0}, ">= 0"), ({"threshold": float("nan")}, ">= 0")):
        with pytest.raises(SparsityError, match=match):
            magnitude_masks(w, **kwargs)
    with pytest.raises(SparsityError, match="NaN or infinite"):
        magnitude_masks(torch.tensor([1.0, float("nan")]), sparsity=0.5)


def test_pruning_a_model_per_layer_and_projection():
    model = tiny_model("qwen3_moe")
    stats = prune_experts_by_magnitude(model, sparsity=0.5)
    inter = model.config.moe_intermediate_size
    for layer in range(model.config.num_hidden_layers):
        experts = model.model.layers[layer].mlp.experts
        for w in (experts.gate_up_proj[:, :inter], experts.gate_up_proj[:, inter:], experts.down_proj):
            assert int((w == 0).sum()) == w.numel() // 2  # each (layer, projection) exactly half, not the pool
    assert stats["nnz"] * 2 == stats["numel"] == sum(p.numel() for _, p in expert_parameters(model))
    assert count_zeros([p for _, p in expert_parameters(model)]) == (stats["numel"] // 2, stats["numel"])


# ------------------------------------------------------------------------------------------------ storage

def test_bitmap_bytes_and_the_density_for_a_byte_budget():
    assert sparse_bytes(numel=1000, nnz=400, dtype_bytes=2) == 800 + 125
    assert sparse_bytes(numel=1001, nnz=0, dtype_bytes=2) == 126  # the bitmap rounds up to whole bytes
    # bf16: the bitmap is 1/16 of the dense bytes, so a 25 % budget leaves 18.75 % of the values
    assert density_for_byte_ratio(0.25, 2) == pytest.approx(0.1875)
    assert density_for_byte_ratio(0.5, 4) == pytest.approx(0.5 - 1 / 32)
    numel = 2048 * 768
    nnz = round(density_for_byte_ratio(0.25, 2) * numel)
    assert sparse_bytes(numel, nnz, 2) == 0.25 * numel * 2  # exact here: numel is a multiple of 8
    budget = 1000
    assert sparse_bytes(999, nnz_for_bytes(999, budget, 2), 2) <= budget < sparse_bytes(999, nnz_for_bytes(
        999, budget, 2) + 1, 2)
    for ratio, match in ((1 / 16, "bitmap alone takes 0.0625"), (0.01, "leaves nothing"), (1.2, "<= 1")):
        with pytest.raises(SparsityError, match=match):
            density_for_byte_ratio(ratio, 2)
    with pytest.raises(SparsityError, match="nnz"):
        sparse_bytes(10, 11, 2)


def test_the_config_section_survives_save_and_plain_from_pretrained(tmp_path):
    model = tiny_model("qwen3_moe")
    stats = prune_experts_by_magnitude(model, sparsity=0.5)
    section = sparsity_section(stats["nnz"] / stats["numel"], numel=stats["numel"], nnz=stats["nnz"], dtype_bytes=4,
                               sparsity=0.5)
    assert section["format"] == "bitmap" and section["keep_masks"] is True and section["density"] == 0.5
    assert section["bytes"] == stats["nnz"] * 4 + math.ceil(stats["numel"] / 8)
    assert section["byte_ratio"] == pytest.approx(0.5 + 1 / 32)
    setattr(model.config, SPARSITY_KEY, section)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[SPARSITY_KEY] == section
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)  # a stock checkpoint: loads anywhere
    assert read_sparsity_section(loaded.config) == section
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)
    assert read_sparsity_section(tiny_model("qwen3_moe").config) is None
    for bad, match in (({**section, "format": "csr"}, "format 'csr'"), ({**section, "density": 2}, "density 2"),
                       ({**section, "keep_masks": "yes"}, "keep_masks 'yes'"), ("magnitude", "must be an object")):
        with pytest.raises(SparsityError, match=match):
            read_sparsity_section({SPARSITY_KEY: bad})
    with pytest.raises(SparsityError, match="unknown sparsity method"):
        sparsity_section(0.5, method="random")


# ---------------------------------------------------------------------------------- masks in training

def _adamw_steps(model, masked: bool, steps: int = 3) -> None:
    """A few AdamW steps (decoupled weight decay on) on random tokens, with or without the gradient masks."""
    model.train()
    masks = MaskedGradients(expert_parameters(model)) if masked else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if masks is not None:
        masks.remove()


def test_masked_gradients_hold_the_zeros_and_the_rest_moves():
    pruned = tiny_model("qwen3_moe")
    prune_experts_by_magnitude(pruned, sparsity=0.5)
    before = {n: p.detach().clone() for n, p in expert_parameters(pruned)}
    masked, unmasked = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    for m in (masked, unmasked):
        m.load_state_dict(pruned.state_dict())
    _adamw_steps(masked, masked=True)
    _adamw_steps(unmasked, masked=False)
    for name, p in expert_parameters(masked):
        zero = before[name] == 0
        assert torch.all(p[zero] == 0), name  # exactly zero, after Adam and weight decay
        assert (p[~zero] != before[name][~zero]).double().mean() > 0.99, name  # the kept weights trained
    moved = sum(int((p[before[n] == 0] != 0).sum()) for n, p in expert_parameters(unmasked))
    total = sum(int((b == 0).sum()) for b in before.values())
    assert moved > 0.99 * total  # without the masks the pruned weights come back


def test_only_dense_expert_weights_are_masked():
    from moe_ds.checkpoint import compress_model
    from moe_ds.sparsity import dense_expert_parameters

    stock = tiny_model("qwen3_moe")
    assert [n.rsplit(".", 1)[1] for n, _ in dense_expert_parameters(stock)] == ["gate_up_proj", "down_proj"] * 2
    # a shared-core student's zeros (its U = 0 wrapper start) are not pruned weights: nothing of it is masked
    shared = compress_model(stock, {"gate": 2, "up": 2, "down": 2})
    assert dense_expert_parameters(shared) == [] and len(expert_parameters(shared)) == 2 * 15


def test_a_mask_hook_refuses_a_partitioned_weight():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    masks = MaskedGradients([("w", p)])
    loss = (p * 2).sum()
    p.data = torch.empty(0)  # what a ZeRO-3 partition outside its module's forward looks like
    with pytest.raises(RuntimeError, match="cannot be masked"):
        loss.backward()
    masks.remove()

"""Expert pruning and merging (moe_ds.expert_pruning): scores, selection, merge maths, routing, and the stock /
shared-core checkpoints with fewer experts, each compared with an in-memory reference surgery."""

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, tiny_config, tiny_model
from moe_ds import expert_pruning as xp
from moe_ds.arch import get_architecture
from moe_ds.calibrate import StatisticsHooks, new_sums
from moe_ds.checkpoint import compress_model, load_model, save_compressed
from moe_ds.model_files import ExpertReader
from moe_ds.modeling_shared_core import find_experts
from moe_ds.lowrank import LowRankExperts
from moe_ds.shared_core import SharedCoreExperts

TOKENS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, ids=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_layer(model, layer: int) -> tuple[dict, dict]:
    """({"gate", "up", "down"}, {"weight", "bias"?}) of one MoE layer of a stock model in memory."""
    name = find_experts(model)[layer]
    experts, router = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0]).gate
    i = experts.down_proj.shape[-1]
    weights = {"gate": experts.gate_up_proj[:, :i].detach(), "up": experts.gate_up_proj[:, i:].detach(),
               "down": experts.down_proj.detach()}
    r = {"weight": router.weight.detach()}
    if getattr(router, "e_score_correction_bias", None) is not None:
        r["bias"] = router.e_score_correction_bias
    return weights, r


def install(model, layers: dict[int, tuple[dict, dict]]):
    """The in-memory reference surgery: give each MoE layer the given experts and router rows, in place."""
    for layer, name in find_experts(model).items():
        weights, router = layers[layer]
        experts, gate = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0]).gate
        e = router["weight"].shape[0]
        if isinstance(experts, (SharedCoreExperts, LowRankExperts)):
            for key, value in weights.items():
                setattr(experts, key, nn.Parameter(value.clone()))
        else:
            experts.gate_up_proj = nn.Parameter(torch.cat([weights["gate"], weights["up"]], 1).clone())
            experts.down_proj = nn.Parameter(weights["down"].clone())
        experts.num_experts = gate.num_experts = e
        gate.weight = nn.Parameter(router["weight"].clone())
        if "bias" in router:
            gate.e_score_correction_bias = router["bias"].clone()
    return model


def calibrate_in_memory(model, ids=TOKENS, heldout: int = 8) -> dict[int, dict]:
    """Calibration sums (moe_ds.calibrate's own hooks) of ``model`` over ``ids``; the first ``heldout`` positions
    are held out."""
    cfg, arch = model.config, get_architecture(model.config.model_type)
    experts = find_experts(model)
    some = model.get_submodule(next(iter(experts.values())))
    sums = {layer: new_sums(some.num_experts, cfg.hidden_size, some.down_proj.shape[-1],
                            getattr(cfg, arch.top_k_key), heldout, "shared_diag", torch.device("cpu"), torch.float64)
            for layer in experts}
    hooks = StatisticsHooks(model, arch, experts, sums)
    rows = torch.full((ids.numel(),), -1, dtype=torch.long)
    rows[:heldout] = torch.arange(heldout)
    hooks.heldout_rows = rows
    try:
        logits(model, ids)
    finally:
        hooks.remove()
    return sums


def kept_ids(family: str) -> list[int]:
    """4 kept experts; DeepSeek-V3's tiny config has 2 routing groups of 4: two from each."""
    return [0, 2, 5, 7] if family == "deepseek_v3" else [1, 2, 4, 5]


# ----------------------------------------------------------------------------------------------- scores and choice

def test_scores_on_hand_made_calibration():
    layer = {"tokens": torch.tensor([6.0, 0.0, 2.0, 4.0], dtype=torch.float64),  # k = 2: 6 tokens
             "router_weight_sum": torch.tensor([3.0, 0.0, 0.5, 2.5], dtype=torch.float64),
             "reap_sum": torch.tensor([3.0, 0.0, 2.0, 1.0], dtype=torch.float64),
             "heldout_topk_ids": torch.zeros(0, 2, dtype=torch.long)}
    freq = xp.expert_scores(layer, "frequency")
    assert freq.dtype == torch.float64
    torch.testing.assert_close(freq, torch.tensor([1.0, 0.0, 1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(xp.expert_scores(layer, "router_weight"),
                               torch.tensor([0.5, 0.0, 0.5 / 6, 2.5 / 6], dtype=torch.float64))
    # REAP: reap_sum / tokens, 0 for the unused expert (no division by zero)
    torch.testing.assert_close(xp.expert_scores(layer, "reap"), torch.tensor([0.5, 0.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(xp.expert_scores(layer, "frequency", top_k=1), freq / 2)
    with pytest.raises(xp.ExpertPruningError, match="score must be one of"):
        xp.expert_scores(layer, "magnitude")
    with pytest.raises(xp.ExpertPruningError, match="no 'reap_sum'"):
        xp.expert_scores({"tokens": layer["tokens"]}, "reap")


def test_threshold_keeps_the_largest_count_over_layers():
    shares = {0: torch.tensor([0.5, 0.01, 0.3, 0.04, 0.2, 0.6]),  # 4 experts at/above 5 %
              1: torch.tensor([0.1, 0.1, 0.06, 0.07, 0.7, 0.03])}  # 5 experts
    scores = {0: torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.5])}
    kept = xp.choose_experts(scores, threshold=0.05, shares=shares, top_k=2)
    assert {k: v.tolist() for k, v in kept.items()} == {0: [0, 2, 3, 4, 5], 1: [0, 1, 2, 3, 4]}
    assert all(v.dtype == torch.int64 for v in kept.values())
    # never fewer than top_k, even when no expert reaches the threshold
    kept = xp.choose_experts(scores, threshold=0.95, shares=shares, top_k=3)
    assert {k: v.tolist() for k, v in kept.items()} == {0: [0, 2, 4], 1: [2, 3, 4]}
    # num_keep, ties to the lower id
    kept = xp.choose_experts({0: torch.tensor([1.0, 2.0, 2.0, 0.0])}, num_keep=2, top_k=2)
    assert kept[0].tolist() == [1, 2]
    # routing groups: each of the 2 groups keeps its own best; the count per group is the largest over groups
    shares = {0: torch.tensor([0.5, 0.3, 0.2, 0.0, 0.01, 0.02, 0.9, 0.0])}
    kept = xp.choose_experts(shares, threshold=0.1, shares=shares, top_k=2, n_group=2, topk_group=1)
    assert kept[0].tolist() == [0, 1, 2, 4, 5, 6]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_keep": 2, "threshold": 0.1}, "exactly one of"),
    ({}, "exactly one of"),
    ({"num_keep": 1}, "fewer than top_k"),
    ({"num_keep": 9}, "only 8"),
    ({"threshold": 0.1}, "needs shares"),
    ({"threshold": 1.5, "shares": {0: torch.ones(8)}}, r"in \[0, 1\]"),
    ({"num_keep": 3, "n_group": 2}, "n_group = 2 equal routing groups"),
    ({"num_keep": 2, "n_group": 2}, "at least 4"),
])
def test_choose_experts_refuses_bad_input(kwargs, match):
    with pytest.raises(xp.ExpertPruningError, match=match):
        xp.choose_experts({0: torch.arange(8.0)}, top_k=2, **kwargs)


def test_choose_experts_refuses_nan_and_ragged_scores():
    with pytest.raises(xp.ExpertPruningError, match="NaN"):
        xp.choose_experts({0: torch.tensor([1.0, float("nan"), 2.0])}, num_keep=2, top_k=1)
    with pytest.raises(xp.ExpertPruningError, match="different expert counts"):
        xp.choose_experts({0: torch.ones(3), 1: torch.ones(4)}, num_keep=2, top_k=1)


# ----------------------------------------------------------------------------------------------- routing

@pytest.mark.parametrize("family", FAMILIES)
def test_route_is_the_stock_routers_choice(family):
    model = tiny_model(family)
    layer = next(iter(find_experts(model)))
    weights, router = dense_layer(model, layer)
    gate = model.model.layers[layer].mlp.gate
    x = torch.randn(64, model.config.hidden_size)
    stock = gate(x)[2].sort(-1).values
    ours = xp.route(x, router, gate.top_k, xp.router_score(family), *xp.routing_groups(model.config))
    assert torch.equal(ours.sort(-1).values, stock)


def test_routing_agreement_by_hand():
    # 3 experts in 2-d, top-1; experts 0 and 1 merged with equal usage: the group's row is [0.5, 0.5]
    router = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])}
    groups = [[0, 1], [2]]
    _, merged = xp.merge_experts({"w": torch.zeros(3, 1)}, router, groups, torch.tensor([1.0, 1.0, 5.0]))
    torch.testing.assert_close(merged["weight"], torch.tensor([[0.5, 0.5], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [-1.0, 2.0]])
    original = xp.route(x, router, 1)
    assert original.flatten().tolist() == [0, 1, 2, 1]
    # the last token's expert 1 (logit 2) lost to expert 2 (logit 1) once its row was averaged with expert 0's
    assert xp.routing_agreement(x, original, merged, groups) == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------- pruning

def test_pruning_removes_a_planted_unused_expert(tmp_path):
    """Qwen2-MoE (softmax without top-k renormalisation, so the pruned expert's softmax mass would show): hidden
    component 0 is made positive in every token (embedding column 0 = 0.1, against N(0, 0.02²) elsewhere), only
    expert 3's router row reads it, with weight -100, so no token picks expert 3 and its softmax probability is
    below e^-100 (the calibration measures < 1e-60). Removing it moves the logits by float rounding only: bound 1e-5
    (the logits are O(0.1))."""
    family, dead = "qwen2_moe", 3
    model = tiny_model(family)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        for layer in find_experts(model):
            gate = model.model.layers[layer].mlp.gate
            gate.weight[:, 0] = 0.0
            gate.weight[dead] = 0.0
            gate.weight[dead, 0] = -100.0
    cal = calibrate_in_memory(model)
    for sums in cal.values():
        assert sums["tokens"][dead] == 0 and (sums["tokens"] > 0).sum() == 5  # the other 5 experts are all used
        assert (sums["router_prob_sum"][dead] < 1e-60).item()
    scores = {layer: xp.expert_scores(sums, "frequency") for layer, sums in cal.items()}
    kept = xp.choose_experts(scores, num_keep=5, top_k=2)
    assert all(ids.tolist() == [0, 1, 2, 4, 5] for ids in kept.values())
    # REAP and router weight rank the dead expert last as well
    for score in ("reap", "router_weight"):
        assert all(xp.expert_scores(sums, score)[dead] == 0 for sums in cal.values())

    src = tmp_path / "src"
    model.save_pretrained(src)
    reader = ExpertReader(src, model.config)

    def layer_of(layer):
        weights, router = xp.prune_layer(reader.read_layer(layer), dense_layer(model, layer)[1], kept[layer])
        return {**weights, "router_weight": router["weight"]}

    xp.write_expert_checkpoint(src, tmp_path / "pruned", get_architecture(family), model.config, layer_of,
                               statistics={"method": "prune"})
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert pruned.config.num_experts == 5
    assert (logits(pruned) - logits(model)).abs().max() < 1e-5
    stats = yaml.safe_load((tmp_path / "pruned" / "compression_statistics.yaml").read_text())
    assert stats["num_experts"] == {"original": 6, "kept": 5} and stats["method"] == "prune"
    assert stats["expert_params"]["ratio"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_writes_a_stock_checkpoint_with_fewer_experts(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    arch = get_architecture(family)
    ids = torch.tensor(kept_ids(family))
    pruned = {layer: xp.prune_layer(*dense_layer(model, layer), ids) for layer in find_experts(model)}
    layers = {layer: {**w, "router_weight": r["weight"], **({"router_bias": r["bias"]} if "bias" in r else {})}
              for layer, (w, r) in pruned.items()}
    xp.write_expert_checkpoint(tmp_path / "src", tmp_path / "dst", arch, model.config, layers)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert getattr(loaded.config, arch.num_experts_key) == 4
    for layer, name in find_experts(loaded).items():
        assert loaded.get_submodule(name).gate_up_proj.shape[0] == 4
    reference = install(tiny_model(family), pruned)
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=0, atol=1e-5)
    assert (logits(loaded) - logits(model)).abs().max() > 1e-3  # pruning did change the model
    # select_experts_on_disk on the stock source gives the same checkpoint (mixtral: block_sparse_moe keys)
    xp.select_experts_on_disk(tmp_path / "src", tmp_path / "selected", {layer: ids for layer in pruned})
    selected = AutoModelForCausalLM.from_pretrained(tmp_path / "selected").eval()
    torch.testing.assert_close(logits(selected), logits(loaded), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- merging

def test_merging_identical_experts_is_exact_at_top_1(tmp_path):
    """Experts 0 and 3 are copies (weights and router row); top_k = 1 with renormalised weights: every token keeps
    its group and weight 1, so the merged model's output equals the original's (float rounding: 1e-5)."""
    config = tiny_config("qwen3_moe")
    config.num_experts_per_tok = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer, name in find_experts(model).items():
            experts, gate = model.get_submodule(name), model.model.layers[layer].mlp.gate
            gate.weight.normal_(0.0, 0.5)
            gate.weight[3] = gate.weight[0]
            experts.gate_up_proj[3] = experts.gate_up_proj[0]
            experts.down_proj[3] = experts.down_proj[0]
    cal = calibrate_in_memory(model, heldout=16)
    merged, groups = {}, {}
    for layer, sums in cal.items():
        weights, router = dense_layer(model, layer)
        for similarity in xp.SIMILARITIES:  # both see the copies at distance 0
            assert xp.merge_groups(sums, weights, router["weight"], 5, similarity) == [[0, 3], [1], [2], [4], [5]]
        groups[layer] = xp.merge_groups(sums, weights, router["weight"], 5, "expert_outputs")
        usage = torch.tensor([3.0, 1.0, 1.0, 7.0, 1.0, 1.0])
        merged[layer] = xp.merge_experts(weights, router, groups[layer], usage)
        new_w, new_r = merged[layer]
        for p in weights:
            torch.testing.assert_close(new_w[p][0], weights[p][0], rtol=1e-7, atol=0)
            assert all(torch.equal(new_w[p][g], weights[p][groups[layer][g][0]]) for g in range(1, 5))
        torch.testing.assert_close(new_r["weight"][0], router["weight"][0], rtol=1e-7, atol=0)
        agreement = xp.routing_agreement(sums["heldout_inputs"], sums["heldout_topk_ids"], new_r, groups[layer])
        assert agreement == 1.0

    model.save_pretrained(tmp_path / "src")
    layers = {layer: {**w, "router_weight": r["weight"]} for layer, (w, r) in merged.items()}
    xp.write_expert_checkpoint(tmp_path / "src", tmp_path / "merged", get_architecture("qwen3_moe"), model.config,
                               layers)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.config.num_experts == 5
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5


def test_merge_groups_respects_routing_groups_and_counts():
    e, d = 8, 16
    x = torch.randn(32, d)
    router = torch.randn(e, d)
    router[4] = router[0]  # closest pair crosses the two routing groups: must not be merged with n_group = 2
    groups = xp.merge_groups({"heldout_inputs": x}, {}, router, 4, "router_logits", n_group=2)
    assert len(groups) == 4 and sorted(sum(groups, [])) == list(range(e))
    assert all(max(g) < 4 or min(g) >= 4 for g in groups)
    assert [0, 4] in xp.merge_groups({"heldout_inputs": x}, {}, router, 7, "router_logits")  # without groups
    with pytest.raises(xp.ExpertPruningError, match="multiples of 2"):
        xp.merge_groups({"heldout_inputs": x}, {}, router, 3, "router_logits", n_group=2)
    with pytest.raises(xp.ExpertPruningError, match="held-out inputs"):
        xp.merge_groups({"heldout_inputs": x[:1]}, {}, router, 4, "router_logits")
    with pytest.raises(xp.ExpertPruningError, match="partition"):
        xp.merge_experts({"w": torch.zeros(e, 2)}, {"weight": router}, [[0, 1], [1, 2]], torch.ones(e))


# ----------------------------------------------------------------------------------------------- shared-core

@pytest.mark.parametrize("family,form", [("qwen3_moe", "shared_core"), ("deepseek_v3", "shared_core"),
                                         ("qwen3_moe", "delta")])
def test_select_experts_on_disk_of_a_shared_core_checkpoint(family, form, tmp_path, tiny_tokenizer):
    """Experts' factors are selected, the layer's shared tensors (cores; delta's bases) kept."""
    model = compress_model(tiny_model(family), {"gate": 2, "up": 2, "down": 2}, form=form)
    with torch.no_grad():  # distinct experts (the mean start makes them all equal to the core)
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    save_compressed(model, tmp_path / "sc", tokenizer=tiny_tokenizer)
    original = load_model(tmp_path / "sc")
    ids = torch.tensor(kept_ids(family))
    xp.select_experts_on_disk(tmp_path / "sc", tmp_path / "sel", {layer: ids for layer in find_experts(original)})
    selected = load_model(tmp_path / "sel")
    arch = get_architecture(family)
    assert getattr(selected.config, arch.num_experts_key) == 4
    assert (tmp_path / "sel" / "tokenizer.json").is_file() and (tmp_path / "sel" / "modeling_shared_core.py").is_file()
    layers = {}
    for layer, name in find_experts(original).items():
        experts = original.get_submodule(name)
        router = {"weight": original.model.layers[layer].mlp.gate.weight.detach()}
        if family == "deepseek_v3":
            router["bias"] = original.model.layers[layer].mlp.gate.e_score_correction_bias
        factors = {key: value.detach() for key, value in experts.named_parameters() if value.dim() == 3}
        layers[layer] = xp.prune_layer(factors, router, ids)
    reference = install(original, layers)
    torch.testing.assert_close(logits(selected), logits(reference), rtol=0, atol=1e-5)
    stats = yaml.safe_load((tmp_path / "sel" / "compression_statistics.yaml").read_text())
    assert stats["shape"]["num_experts"] == 4 and stats["expert_selection"][min(layers)] == ids.tolist()


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    model = tiny_model("deepseek_v3")  # 8 experts in 2 routing groups, top-2 from topk_group = 1 group
    model.save_pretrained(tmp_path / "src")
    arch = get_architecture("deepseek_v3")
    moe = list(find_experts(model))
    with pytest.raises(xp.ExpertPruningError, match="outside"):
        xp.prune_layer(*dense_layer(model, moe[0]), torch.tensor([0, 8]))
    with pytest.raises(xp.ExpertPruningError, match=r"outside \[0, 8\)"):
        xp.select_experts_on_disk(tmp_path / "src", tmp_path / "out", {layer: [0, 1, 4, 9] for layer in moe})
    with pytest.raises(xp.ExpertPruningError, match="keep \\[3, 1\\] experts"):  # DeepSeek-V3 group violation
        xp.select_experts_on_disk(tmp_path / "src", tmp_path / "out", {layer: [0, 1, 2, 5] for layer in moe})
    with pytest.raises(xp.ExpertPruningError, match="MoE layers"):
        xp.select_experts_on_disk(tmp_path / "src", tmp_path / "out", {moe[0]: [0, 1, 4, 5]})

    def layers_of(ids):
        out = {}
        for layer in moe:
            w, r = xp.prune_layer(*dense_layer(model, layer), torch.tensor(ids))
            out[layer] = {**w, "router_weight": r["weight"], "router_bias": r["bias"]}
        return out

    with pytest.raises(xp.ExpertPruningError, match="equal routing groups"):  # 7 experts, 2 groups
        xp.write_expert_checkpoint(tmp_path / "src", tmp_path / "out", arch, model.config, layers_of(range(7)))
    with pytest.raises(xp.ExpertPruningError, match="at least 4"):  # 1 expert per group
        xp.write_expert_checkpoint(tmp_path / "src", tmp_path / "out", arch, model.config, layers_of([0, 4]))
    qwen = tiny_model("qwen3_moe")
    qwen.save_pretrained(tmp_path / "qwen")
    one = {layer: {**w, "router_weight": r["weight"]} for layer in find_experts(qwen)
           for w, r in [xp.prune_layer(*dense_layer(qwen, layer), torch.tensor([2]))]}
    with pytest.raises(xp.ExpertPruningError, match="fewer than top_k = 2"):
        xp.write_expert_checkpoint(tmp_path / "qwen", tmp_path / "out", get_architecture("qwen3_moe"), qwen.config, one)
    no_bias = {layer: {k: v for k, v in spec.items() if k != "router_bias"} for layer, spec in layers_of([0, 1, 4, 5]).items()}
    with pytest.raises(xp.ExpertPruningError, match="router_bias"):
        xp.write_expert_checkpoint(tmp_path / "src", tmp_path / "out", arch, model.config, no_bias)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left

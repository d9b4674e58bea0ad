"""The lowrank and delta expert forms (#13): closed-form fits against their optima, the experts module against the
dense reference, and their checkpoints (format version 2) beside the shared core's (version 1)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, tiny_model
from moe_ds.arch import PROJECTIONS
from moe_ds.checkpoint import (CheckpointError, compress_model, export_dense, load_compressed, save_compressed,
                               shared_core_config, to_dense_model, validate_compressed_checkpoint)
from moe_ds.fit import (eckart_young_error, experts_output, output_error, relative_error, weighted_core,
                        whitening)
from moe_ds.budget import BudgetError, ExpertPlan, rank_for_budget
from moe_ds.lowrank import LowRankError, LowRankExperts, fit_lowrank, lowrank_params


def rank_for_lowrank_ratio(ratio, e, d, i, base):
    """budget.rank_for_budget, the one rank rule, for the low-rank forms (bytes of one value: parameters)."""
    return rank_for_budget(ratio, ExpertPlan(e, d, i, e, "delta" if base else "lowrank", value_bytes=1))
from moe_ds.modeling_shared_core import find_experts, replace_experts
from moe_ds.stats import compression_statistics, expert_params

RANKS = {"gate": 3, "up": 5, "down": 2}  # unaligned to 16 bytes: the grouped path pads A


def related_experts(e, d_out, d_in, g, spread=0.5):
    base = torch.randn(d_out, d_in, generator=g)
    return torch.stack([base + spread * torch.randn(d_out, d_in, generator=g) for _ in range(e)]) / d_in ** 0.5


def whitening_of_random_inputs(e, d_in, g):
    """S_e of anisotropic, per-expert inputs (different counts), and usage weights summing to 1."""
    mix = torch.randn(d_in, d_in, generator=g) * torch.linspace(1.0, 0.05, d_in)
    xs = [torch.randn(n, d_in, generator=g) @ mix.T for n in (40, 9, 70, 25, 33, 50)[:e]]
    tokens = torch.tensor([len(x) for x in xs], dtype=torch.float64)
    s = whitening(torch.stack([x.T @ x for x in xs]), tokens, damping=0.01)
    return s, (tokens / tokens.sum()).float()


def random_lowrank(e=6, d=32, i=24, ranks=RANKS, base=True, seed=0):
    torch.manual_seed(seed)
    m = LowRankExperts(e, d, i, ranks, base=base)
    with torch.no_grad():
        for p in PROJECTIONS:
            for t in m.factors(p).values():
                t.normal_(0.0, 0.4)
    return m


def routing(t, e, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------------- the fit

@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_is_exact_for_both_objectives(base, shape):
    g = torch.Generator().manual_seed(1)
    w = related_experts(5, *shape, g)
    s, weights = whitening_of_random_inputs(5, shape[1], g)
    full = min(shape)
    plain = fit_lowrank(w, full, base)
    whitened = fit_lowrank(w, full, base, whiten=s, weights=weights)
    assert plain.rel_error < 1e-5 and plain.act_error is None
    assert whitened.rel_error < 1e-4 and whitened.act_error < 1e-5
    assert plain.factors["a"].shape == (5, shape[0], full) and plain.factors["b"].shape == (5, full, shape[1])
    assert ("base" in plain.factors) == base and plain.factors["a"].dtype == torch.float32


def test_delta_at_rank_zero_is_the_weighted_mean():
    g = torch.Generator().manual_seed(2)
    w = related_experts(6, 10, 14, g)
    s, weights = whitening_of_random_inputs(6, 14, g)
    plain = fit_lowrank(w, 0, base=True)
    torch.testing.assert_close(plain.factors["base"], w.mean(0))
    assert plain.factors["a"].shape == (6, 10, 0) and plain.factors["b"].shape == (6, 0, 14)
    assert plain.rel_error == pytest.approx(relative_error(w, w.mean(0).expand_as(w)), rel=1e-6)
    whitened = fit_lowrank(w, 0, base=True, whiten=s, weights=weights)
    core = weighted_core(w, s, weights)
    torch.testing.assert_close(whitened.factors["base"], core)
    assert not torch.allclose(core, w.mean(0), atol=1e-3)  # the weighting and whitening do move the base
    assert whitened.act_error == pytest.approx(relative_error(w, core.expand_as(w), s, weights), rel=1e-5)
    assert fit_lowrank(w, 0, base=False).rel_error == pytest.approx(1.0)  # lowrank at rank 0: zero experts


@pytest.mark.parametrize("base", [False, True])
def test_the_fit_is_the_eckart_young_optimum_in_either_norm(base):
    """The error equals the SVD tail of W_e − C (weight norm) and of (W_e − C) S_e (whitened norm); the factors are
    balanced (AᵀA = BBᵀ = Σ); each objective's fit is the best of the two in its own norm."""
    g = torch.Generator().manual_seed(3)
    e, d_out, d_in, r = 6, 16, 20, 4
    w = related_experts(e, d_out, d_in, g)
    s, weights = whitening_of_random_inputs(e, d_in, g)
    plain = fit_lowrank(w, r, base)
    whitened = fit_lowrank(w, r, base, whiten=s, weights=weights)
    core_plain = w.mean(0) if base else torch.zeros(d_out, d_in)
    core_white = weighted_core(w, s, weights) if base else torch.zeros(d_out, d_in)
    assert plain.rel_error == pytest.approx(eckart_young_error(w, core_plain, r), rel=1e-4)
    assert whitened.act_error == pytest.approx(eckart_young_error(w, core_white, r, s, weights), rel=1e-4)
    a, b = plain.factors["a"], plain.factors["b"]
    sigma = torch.linalg.svdvals(w - core_plain)[:, :r]
    torch.testing.assert_close(a.mT @ a, torch.diag_embed(sigma), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b @ b.mT, torch.diag_embed(sigma), atol=1e-4, rtol=1e-4)

    def reconstructed(fit):
        return fit.factors["a"] @ fit.factors["b"] + fit.factors.get("base", 0.0)

    assert whitened.rel_error == pytest.approx(relative_error(w, reconstructed(whitened)), rel=1e-6)
    plain_in_act_norm = relative_error(w, reconstructed(plain), s, weights)
    assert whitened.act_error < plain_in_act_norm
    if not base:  # with the same (zero) base, each fit is optimal in its own norm
        assert plain.rel_error < whitened.rel_error


def test_bad_fit_arguments():
    w = torch.randn(3, 4, 5)
    with pytest.raises(LowRankError, match="rank 5 is out of range"):
        fit_lowrank(w, 5, base=False)
    with pytest.raises(LowRankError, match="give whiten too"):
        fit_lowrank(w, 1, base=True, weights=torch.ones(3))
    assert issubclass(LowRankError, ValueError)


# ---------------------------------------------------------------------------------------------- budget and stats

def test_parameter_formula_and_the_rank_for_a_ratio():
    for base in (False, True):
        m = LowRankExperts(6, 32, 24, RANKS, base=base)
        assert lowrank_params(6, 32, 24, RANKS, base) == sum(p.numel() for p in m.parameters())
        assert expert_params(6, 32, 24, RANKS, "delta" if base else "lowrank") == lowrank_params(6, 32, 24, RANKS, base)
    dense = 128 * 3 * 2048 * 768  # Qwen3-30B-A3B's layer
    for ratio in (0.05, 0.237, 0.5):
        for base in (False, True):
            r = rank_for_lowrank_ratio(ratio, 128, 2048, 768, base)
            assert lowrank_params(128, 2048, 768, r, base) <= ratio * dense < lowrank_params(128, 2048, 768, r + 1, base)
    assert rank_for_lowrank_ratio(0.237, 128, 2048, 768, False) == 132
    assert rank_for_lowrank_ratio(0.237, 128, 2048, 768, True) == 128
    assert rank_for_lowrank_ratio(1 / 128, 128, 2048, 768, True) == 0  # the bases alone: exactly 1/E
    assert rank_for_lowrank_ratio(5.0, 6, 32, 24, False) == 24  # capped at full rank
    with pytest.raises(BudgetError, match="below the base's own share 0.0078"):
        rank_for_lowrank_ratio(0.007, 128, 2048, 768, True)
    with pytest.raises(BudgetError, match="smallest lowrank: rank 1"):
        rank_for_lowrank_ratio(0.001, 128, 2048, 768, False)


@pytest.mark.parametrize("form, r", [("lowrank", 132), ("delta", 128)])
def test_statistics_at_qwen3_30b_a3b_by_hand(form, r):
    cfg = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
               num_experts_per_tok=8, tie_word_embeddings=False, dtype="bfloat16")
    s = compression_statistics(shared_core_config(T.Qwen3MoeConfig(**cfg), {p: r for p in PROJECTIONS}, form=form),
                               tokens_per_forward=1)
    L, E, k, d, I = 48, 128, 8, 2048, 768
    own = 3 * r * (d + I)  # one expert's A and B
    base = 3 * d * I if form == "delta" else 0
    layer = E * own + base
    assert s["form"] == form
    assert s["expert_params"] == {"original": L * E * 3 * d * I, "compressed": L * layer, "ratio": layer / (E * 3 * d * I)}
    assert s["total_params"]["original"] - s["total_params"]["compressed"] == L * (E * 3 * d * I - layer)
    assert s["active_params_per_token"]["compressed"] == s["total_params"]["compressed"] - L * (E - k) * own
    macs = L * (base + k * own)  # no per-forward precomputation: T = 1 changes nothing
    assert s["expert_macs_per_token"]["compressed"] == s["expert_macs_per_token"]["compressed_without_precompute"] == macs
    assert s["bytes"]["experts_compressed"] == 2 * L * layer
    assert round(s["expert_macs_per_token"]["ratio"], 3) == {"lowrank": 0.236, "delta": 0.354}[form]


# -------------------------------------------------------------------------------------------------- the module

@pytest.mark.parametrize("ranks, base", [(RANKS, False), (RANKS, True), ({"gate": 8, "up": 0, "down": 4}, True)])
def test_forward_equals_the_dense_reference_on_both_kernels(ranks, base):
    """Loop and grouped (CPU grouped_mm, unaligned ranks zero-padded; rank 0 = the base) == experts_output of Ŵ in
    fp32, dropped slots included; their gradients agree."""
    m = random_lowrank(ranks=ranks, base=base)
    x = torch.randn(40, 32)
    idx, w = routing(40, 6, 3)
    idx[0, 1], idx[5, 0], idx[7] = -1, 6, 6
    dense = {p: m.reconstruct(p).detach() for p in PROJECTIONS}
    keep = (idx >= 0) & (idx < 6)
    ref = experts_output(dense, x, torch.where(keep, idx, 0), w * keep)
    assert ref.abs().max() > 0.1 and ref[7].abs().max() == 0
    results = {}
    for impl in ("loop", "grouped"):
        m.implementation = impl
        xg = x.clone().requires_grad_()
        out = m(xg, idx, w)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        params = [t for t in m.parameters() if t.numel()]
        results[impl] = torch.autograd.grad(out.square().sum(), [xg, *params])
    for g, g_ref in zip(results["grouped"], results["loop"]):
        assert (g - g_ref).norm() <= 1e-5 * g_ref.norm()


def test_module_replaces_the_stock_experts_of_every_family():
    """For every family: our forward == the stock module loaded with to_dense(), and replace_experts + the dense
    export reproduce the whole model's logits."""
    for fam in FAMILIES:
        model = tiny_model(fam)
        stock = model.get_submodule(next(iter(find_experts(model).values())))
        for base in (False, True):
            ours = random_lowrank(stock.num_experts, stock.hidden_dim, stock.intermediate_dim, base=base)
            gate_up, down = ours.to_dense()
            with torch.no_grad():
                stock.gate_up_proj.copy_(gate_up)
                stock.down_proj.copy_(down)
            x = torch.randn(30, stock.hidden_dim)
            idx, w = routing(30, stock.num_experts, 2)
            torch.testing.assert_close(ours(x, idx, w), stock(x, idx, w), rtol=1e-5, atol=1e-5, msg=fam)
        replace_experts(model, RANKS, "delta")
        assert all(isinstance(model.get_submodule(n), LowRankExperts) and model.get_submodule(n).has_base
                   for n in find_experts(model).values())
        ids = torch.randint(0, model.config.vocab_size, (2, 7))
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 3 and p.shape[-1] in RANKS.values():
                    p.normal_(0.0, 0.2)
            torch.testing.assert_close(to_dense_model(_as_compressed(model, "delta"))(ids).logits, model(ids).logits,
                                       msg=fam)


def _as_compressed(model, form):
    """The replaced model as a SharedCore*ForCausalLM of ``form`` (what to_dense_model takes)."""
    experts = {layer: model.get_submodule(name) for layer, name in find_experts(model).items()}
    return compress_model(model, RANKS, experts, method="svd", form=form)


def test_to_dense_round_trip_and_from_factors():
    m = random_lowrank()
    gate_up, down = m.to_dense()
    assert gate_up.shape == (6, 48, 32) and down.shape == (6, 32, 24)
    torch.testing.assert_close(gate_up[2, :24], m.gate_a[2] @ m.gate_b[2] + m.gate_base)
    torch.testing.assert_close(m.reconstruct("down", [4, 1]), down[[4, 1]])
    # dense -> fit at full rank -> dense
    back = LowRankExperts.from_dense(gate_up.detach(), down.detach(), {p: 24 for p in PROJECTIONS}, base=False)
    for t, t_ref in zip(back.to_dense(), (gate_up, down)):
        torch.testing.assert_close(t, t_ref.detach(), rtol=1e-4, atol=1e-5)
    factors = {p: {k: v.detach().clone() for k, v in m.factors(p).items()} for p in PROJECTIONS}
    torch.testing.assert_close(LowRankExperts.from_factors(factors).to_dense()[1], down)
    factors["up"]["b"] = factors["up"]["b"][:, :-1]
    with pytest.raises(LowRankError, match=r"up.b: expected shape \(6, 5, 32\), got \(6, 4, 32\)"):
        LowRankExperts.from_factors(factors)
    del factors["down"]["base"]
    with pytest.raises(LowRankError, match="for every projection"):
        LowRankExperts.from_factors(factors)
    with pytest.raises(LowRankError, match="rank of 'down'"):
        LowRankExperts(6, 32, 24, {"gate": 1, "up": 1, "down": 25})
    assert "base=True" in repr(m)


def test_zero3_safety_own_parameters_and_no_stale_state():
    """ZeRO-3 gathers a module's own parameters around its forward: all are owned directly, and nothing computed
    from them survives a call (an in-place edit shows in the next no-grad forward)."""
    m = random_lowrank()
    assert len(dict(m.named_parameters(recurse=False))) == 9 == len(dict(m.named_parameters()))
    assert all(not list(child.parameters()) for child in m.children()) and not list(m.buffers())
    x = torch.randn(9, 32)
    idx, w = routing(9, 6, 2)
    for impl in ("loop", "grouped"):
        m.implementation = impl
        with torch.no_grad():
            before = m(x, idx, w)
            m.up_b.mul_(2.0)
            after = m(x, idx, w)
            m.up_b.mul_(0.5)
        assert (after - before).abs().max() > 1e-3


def test_rank_zero_factors_are_buffers_not_parameters():
    """ZeRO-3 cannot gather an empty parameter (the delta form at 1/8 of expert bytes is rank 0: its bases alone):
    rank-0 factors are empty persistent buffers, the state dict keeps every key and shape, the forward works."""
    m = LowRankExperts(6, 32, 24, {"gate": 0, "up": 3, "down": 0}, base=True)
    params = dict(m.named_parameters())
    assert set(params) == {"gate_base", "up_a", "up_b", "up_base", "down_base"}
    assert all(p.numel() > 0 for p in params.values())
    state = m.state_dict()
    assert len(state) == 9 and state["gate_a"].shape == (6, 24, 0) and state["down_b"].shape == (6, 0, 24)
    m.load_state_dict({k: torch.randn_like(v) for k, v in state.items()})  # a saved checkpoint loads back
    x = torch.randn(5, 32)
    idx, w = routing(5, 6, 2)
    for impl in ("loop", "grouped"):
        m.implementation = impl
        assert torch.isfinite(m(x, idx, w)).all()


def test_output_error_takes_low_rank_factors():
    g = torch.Generator().manual_seed(8)
    e, d, i, k, t = 6, 16, 12, 2, 40
    dense = {"gate": related_experts(e, i, d, g), "up": related_experts(e, i, d, g), "down": related_experts(e, d, i, g)}
    x = torch.randn(t, d, generator=g)
    ids, gates = routing(t, e, k)
    for base in (False, True):
        factors = {p: fit_lowrank(dense[p], 3, base).factors for p in PROJECTIONS}
        approx = {p: f["a"] @ f["b"] + f.get("base", 0.0) for p, f in factors.items()}
        y, y_hat = experts_output(dense, x, ids, gates), experts_output(approx, x, ids, gates)
        expected = (torch.linalg.vector_norm(y_hat - y) / torch.linalg.vector_norm(y)).item()
        assert 0.01 < output_error(dense, factors, x, ids, gates) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------- the checkpoints

FRESH_PROCESS = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
root = Path(sys.argv[1])
for form in sys.argv[2:]:
    ref = load_file(root / f"{form}_expected.safetensors")
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(root / form, trust_remote_code=True)
        err = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
    experts = model.model.layers[0].mlp.experts
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(experts).__name__ == "LowRankExperts" and experts.has_base == (form == "delta"), experts
    print(form, err)
    assert err < 1e-5, (form, err)
print("OK")
"""


def test_lowrank_and_delta_checkpoints_load_everywhere_and_count_right(tmp_path):
    """Saved with format_version 2 and their form; load_compressed, trust_remote_code in a fresh process and the
    dense export give the in-memory logits; compression_statistics.yaml counts the real parameters."""
    import yaml

    forms = ("lowrank", "delta")
    for form in forms:
        model = compress_model(tiny_model("qwen3_moe"), RANKS, method="svd", form=form)
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"ids": ids, "logits": logits.contiguous()}, tmp_path / f"{form}_expected.safetensors")
        save_compressed(model, tmp_path / form)
        section = json.loads((tmp_path / form / "config.json").read_text())["shared_core"]
        assert section == {"format_version": 2, "form": form, "base_model_type": "qwen3_moe", "ranks": RANKS,
                           "method": "svd"}
        assert (tmp_path / form / "lowrank.py").is_file()
        weights = load_file(tmp_path / form / "model.safetensors")
        assert weights["model.layers.1.mlp.experts.down_a"].shape == (6, 32, 2)
        assert ("model.layers.1.mlp.experts.up_base" in weights) == (form == "delta")
        with torch.no_grad():
            torch.testing.assert_close(load_compressed(tmp_path / form)(ids).logits, logits)
            export_dense(tmp_path / form, tmp_path / f"{form}_dense")
            dense = T.AutoModelForCausalLM.from_pretrained(tmp_path / f"{form}_dense")
            torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-5, atol=1e-5)
        stats = yaml.safe_load((tmp_path / form / "compression_statistics.yaml").read_text())
        assert stats["form"] == form
        assert stats["total_params"]["compressed"] == sum(p.numel() for p in model.parameters())
        experts = [model.get_submodule(n) for n in find_experts(model).values()]
        assert stats["expert_params"]["compressed"] == sum(p.numel() for m in experts for p in m.parameters())
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path), *forms], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK") and [line.split()[0] for line in out.stdout.splitlines()[:2]] == list(forms)


def test_shared_core_checkpoints_stay_version_1_and_bad_sections_are_refused(tmp_path):
    model = compress_model(tiny_model("qwen3_moe"), RANKS)
    save_compressed(model, tmp_path / "c")
    path = tmp_path / "c"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["shared_core"]["format_version"] == 1 and "form" not in cfg["shared_core"]
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(load_compressed(path)(ids).logits, ref)
        cfg["shared_core"].update(format_version=2, form="shared_core")  # a version-2 writer naming the form
        (path / "config.json").write_text(json.dumps(cfg))
        torch.testing.assert_close(load_compressed(path)(ids).logits, ref)
    for edit, match in (({"format_version": 1, "form": "lowrank"}, "form 'lowrank' needs format_version 2, got 1"),
                        ({"format_version": 2, "form": "tucker"}, "unknown shared_core form 'tucker'"),
                        ({"format_version": 2, "form": "delta"}, r"form delta.*missing weights")):
        cfg["shared_core"].update(edit)
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            validate_compressed_checkpoint(path)
    with pytest.raises(CheckpointError, match="unknown expert form 'tucker'"):
        shared_core_config(model.config, RANKS, form="tucker")

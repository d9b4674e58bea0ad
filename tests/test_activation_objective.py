"""The activation objective (#12 parts 2-4, compress side): Σ_e w_e ||(W_e − Ŵ_e) S_e||² against the empirical output
error, the whitened svd start, a real comparison with the weight objective on anisotropic inputs, the per-layer
output error and routing statistics of a compress run, its fingerprint, and bad settings.

Calibration folders are built here directly from the format (docs/design.md section 12): a tiny model's forward
with hooks on its experts modules, summed in float64 as a plain reference. Only the end-to-end tests need
``moe_ds.calibrate`` (its reader and the model fingerprint)."""

import importlib.util
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, tiny_model
from moe_ds.cli import run
from moe_ds.fit import (FitConfig, eckart_young_error, expert_weights, experts_output, fit_projection, output_error,
                        projection_moments, relative_error, svd_init, weighted_core, weighted_sq_error,
                        whitened_svd_init, whitening)
from moe_ds.shared_core import reconstruct
from moe_ds.stats import routing_statistics


def anisotropic_inputs(n: int, d_in: int, g: torch.Generator, decay: float = 2.0, dtype=torch.float32,
                       rotation: torch.Tensor | None = None):
    """n inputs with covariance Q diag(1/(1+k)^decay) Qᵀ, Q a random rotation (drawn unless given): a decaying
    spectrum, as the hidden states of trained transformers have."""
    q = rotation if rotation is not None else random_rotation(d_in, g)
    spectrum = torch.tensor([(1.0 + k) ** -decay for k in range(d_in)], dtype=torch.float64)
    return ((torch.randn(n, d_in, generator=g, dtype=torch.float64) * spectrum.sqrt()) @ q.T).to(dtype)


def random_rotation(d: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def related_experts(e: int, d_out: int, d_in: int, g: torch.Generator, spread: float = 0.5, dtype=torch.float32):
    base = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    w = torch.stack([base + spread * torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(e)])
    return (w / d_in ** 0.5).to(dtype)


# ------------------------------------------------------------------------------------------------ the objective

def test_activation_objective_equals_the_empirical_output_error():
    """Σ_e w_e ||(W_e − Ŵ_e) S_e||² = Σ_e w_e Σ_x ||(W_e − Ŵ_e) x||² / N_e with S_e from the inputs' second moment
    (damping 0), each expert with its own inputs and count."""
    g = torch.Generator().manual_seed(0)
    e, d_out, d_in = 5, 12, 16
    w = related_experts(e, d_out, d_in, g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    xs = [anisotropic_inputs(n, d_in, g, dtype=torch.float64) for n in (40, 17, 100, 25, 64)]
    sums = torch.stack([x.T @ x for x in xs])
    tokens = torch.tensor([float(len(x)) for x in xs], dtype=torch.float64)
    s = whitening(sums, tokens, damping=0.0)
    assert torch.equal(s, s.tril())  # lower-triangular Cholesky factors
    weights = torch.rand(e, generator=g, dtype=torch.float64)
    empirical = sum(weights[i] * ((w[i] - w_hat[i]) @ x.T).square().sum() / len(x) for i, x in enumerate(xs))
    assert weighted_sq_error(w, w_hat, s, weights).item() == pytest.approx(empirical.item(), rel=1e-5)
    norm = sum(weights[i] * (w[i] @ x.T).square().sum() / len(x) for i, x in enumerate(xs))
    assert relative_error(w, w_hat, s, weights) == pytest.approx(math.sqrt(empirical / norm), rel=1e-5)
    # Damping adds λ · mean(diag Σ_e) · ||W_e − Ŵ_e||² per expert, nothing else.
    damped = whitening(sums, tokens, damping=0.1)
    extra = sum(weights[i] * 0.1 * (x.T @ x / len(x)).diagonal().mean() * (w[i] - w_hat[i]).square().sum()
                for i, x in enumerate(xs))
    assert weighted_sq_error(w, w_hat, damped, weights).item() == pytest.approx((empirical + extra).item(), rel=1e-5)


def test_whitening_of_experts_without_tokens_and_of_singular_moments():
    g = torch.Generator().manual_seed(1)
    x = anisotropic_inputs(50, 8, g, dtype=torch.float64)
    sums = torch.stack([x.T @ x, torch.zeros(8, 8, dtype=torch.float64), x[:3].T @ x[:3]])
    tokens = torch.tensor([50.0, 0.0, 3.0], dtype=torch.float64)
    s = whitening(sums, tokens, damping=1e-2)
    layer_average = (sums.sum(0) / 53) + 1e-2 * (sums.sum(0) / 53).diagonal().mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(s[1] @ s[1].T, layer_average)  # an unrouted expert: the layer's average moment
    assert torch.isfinite(s).all()  # 3 tokens in 8 dimensions: singular without the damping, fine with it
    eye = whitening(torch.zeros(2, 4, 4), torch.zeros(2), damping=1e-2)  # a layer that saw nothing
    torch.testing.assert_close(eye, (1 + 1e-2) ** 0.5 * torch.eye(4).expand(2, 4, 4))
    # all-zero inputs at damping 0: not positive definite; the retry's jitter (1e-6 relative) makes it so
    torch.testing.assert_close(whitening(torch.zeros(2, 3, 3), torch.tensor([5.0, 5.0]), damping=0.0),
                               1e-3 * torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        whitening(sums, tokens, -1.0)


def test_expert_weights_are_routing_shares():
    layer = {"tokens": torch.tensor([30.0, 10.0, 0.0, 60.0], dtype=torch.float64),
             "router_weight_sum": torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)}
    torch.testing.assert_close(expert_weights(layer, "tokens"), torch.tensor([0.3, 0.1, 0.0, 0.6]))
    torch.testing.assert_close(expert_weights(layer, "router"), torch.tensor([0.25, 0.25, 0.0, 0.5]))
    torch.testing.assert_close(expert_weights(layer, "uniform"), torch.full((4,), 0.25))
    empty = {"tokens": torch.zeros(4, dtype=torch.float64), "router_weight_sum": torch.zeros(4, dtype=torch.float64)}
    torch.testing.assert_close(expert_weights(empty, "tokens"), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="weighting must be one of"):
        expert_weights(layer, "reap")


def test_shared_diag_moments_keep_each_experts_diagonal():
    g = torch.Generator().manual_seed(2)
    xs = [anisotropic_inputs(n, 6, g, dtype=torch.float64) for n in (20, 30, 10)]
    shared = sum(x.T @ x for x in xs)
    diag = torch.stack([x.square().sum(0) for x in xs])
    layer = {"tokens": torch.tensor([20.0, 30.0, 10.0], dtype=torch.float64), "gate_up_shared": shared.float(),
             "gate_up_diag": diag.float(), "down_shared": shared.float(), "down_diag": diag.float()}
    sums, tokens = projection_moments(layer, "up")
    assert sums.shape == (3, 6, 6) and sums.dtype == torch.float32 and torch.equal(tokens, layer["tokens"])
    torch.testing.assert_close(sums.diagonal(dim1=-2, dim2=-1), diag.float())
    corr = shared / shared.diagonal().sqrt().outer(shared.diagonal().sqrt())
    torch.testing.assert_close(sums[1].double(), diag[1].sqrt().outer(diag[1].sqrt()) * corr, rtol=1e-5, atol=1e-6)
    half, _ = projection_moments(layer, "down", shrinkage=0.5)  # (1 − s) D^½ R D^½ + s D: the diagonal stays
    torch.testing.assert_close(half, 0.5 * sums + 0.5 * torch.diag_embed(diag.float()))
    torch.testing.assert_close(projection_moments(layer, "gate", shrinkage=1.0)[0], torch.diag_embed(diag.float()))
    with pytest.raises(ValueError, match="shrinkage must be in"):
        projection_moments(layer, "gate", shrinkage=2.0)
    full = {"tokens": layer["tokens"], "gate_up_moment": torch.stack([x.T @ x for x in xs]).float(),
            "down_moment": torch.zeros(3, 2, 2)}
    assert torch.equal(projection_moments(full, "gate")[0], full["gate_up_moment"])
    assert projection_moments(full, "down")[0].shape == (3, 2, 2)


# ------------------------------------------------------------------------------------------------ the start

def test_weighted_core_is_the_least_squares_core():
    """C minimising Σ_e w_e ||(W_e − C) S_e||², against a plain least-squares solve of the stacked system."""
    g = torch.Generator().manual_seed(3)
    e, d_out, d_in = 4, 10, 12
    w = related_experts(e, d_out, d_in, g, dtype=torch.float64)
    s = whitening(torch.stack([(x := anisotropic_inputs(40, d_in, g, dtype=torch.float64)).T @ x
                               for _ in range(e)]), torch.full((e,), 40.0, dtype=torch.float64), 1e-3)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # (W_e − C) S_e ≈ 0  <=>  √w_e S_eᵀ Cᵀ ≈ √w_e (W_e S_e)ᵀ, stacked over e.
    a = torch.cat([weights[i].sqrt() * s[i].T for i in range(e)])
    b = torch.cat([weights[i].sqrt() * (w[i] @ s[i]).T for i in range(e)])
    reference = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(weighted_core(w, s, weights), reference, rtol=1e-8, atol=1e-10)
    eye = torch.eye(d_in, dtype=torch.float64).expand(e, d_in, d_in)
    torch.testing.assert_close(weighted_core(w, eye), w.mean(0))  # identity whitening, uniform: the mean expert


@pytest.mark.parametrize("d_out, d_in", [(12, 16), (16, 12)])  # gate/up-like and down-like shapes
def test_whitened_init_at_full_rank_is_exact(d_out, d_in):
    g = torch.Generator().manual_seed(4)
    e = 5
    w = related_experts(e, d_out, d_in, g, dtype=torch.float64)
    sums = torch.stack([(x := anisotropic_inputs(60, d_in, g, dtype=torch.float64)).T @ x for _ in range(e)])
    s = whitening(sums, torch.full((e,), 60.0, dtype=torch.float64), 1e-3)
    weights = torch.rand(e, generator=g, dtype=torch.float64)
    start = whitened_svd_init(w, min(d_out, d_in), 1e-12, s, weights)
    assert relative_error(w, reconstruct(**start)) < 1e-5
    assert relative_error(w, reconstruct(**start), s, weights) < 1e-5


def test_whitened_init_with_identity_whitening_is_the_svd_init():
    g = torch.Generator().manual_seed(5)
    for d_out, d_in in ((12, 16), (16, 12)):
        w = related_experts(6, d_out, d_in, g, dtype=torch.float64)
        eye = torch.eye(d_in, dtype=torch.float64).expand(6, d_in, d_in).contiguous()
        torch.testing.assert_close(reconstruct(**whitened_svd_init(w, 3, 1e-2, eye)),
                                   reconstruct(**svd_init(w, 3, 1e-2)), rtol=1e-10, atol=1e-12)
        assert eckart_young_error(w, w.mean(0), 6, eye) == pytest.approx(eckart_young_error(w, w.mean(0), 6),
                                                                          rel=1e-10)


def test_whitened_bound_is_the_best_rank_2r_correction_in_the_whitened_norm():
    g = torch.Generator().manual_seed(6)
    e, d_out, d_in, r = 6, 16, 24, 2
    w = related_experts(e, d_out, d_in, g)
    sums = torch.stack([(x := anisotropic_inputs(200, d_in, g)).T @ x for _ in range(e)])
    s = whitening(sums, torch.full((e,), 200.0), 1e-2)
    weights = torch.rand(e, generator=g)
    start = whitened_svd_init(w, r, 1e-2, s, weights)
    bound = eckart_young_error(w, start["core"], 2 * r, s, weights)
    # by hand: the tail of each (W_e − C) S_e's singular values, weighted, over the weighted whitened norm of W
    tails = torch.linalg.svdvals(((w - start["core"]) @ s).double())[:, 2 * r:].square().sum(-1)
    norm = weighted_sq_error(w.double(), 0.0, s.double(), weights.double())
    assert bound == pytest.approx(math.sqrt((tails * weights).sum() / norm), rel=1e-5)
    assert bound <= relative_error(w, reconstruct(**start), s, weights) <= 1.3 * bound


# ------------------------------------------------------------------------------------------------ what it buys

def test_activation_objective_beats_the_weight_objective_on_held_out_inputs():
    """Equal rank, equal steps, same start kind, experts fed anisotropic inputs (a decaying spectrum): the fit of the
    activation objective makes a smaller output error on held-out inputs, while the weight objective keeps the
    smaller weight-space error (each objective wins on its own measure: nothing here is rigged)."""
    g = torch.Generator().manual_seed(7)
    e, d_out, d_in, r, n = 8, 48, 64, 4, 2000
    w = related_experts(e, d_out, d_in, g)
    rotations = [random_rotation(d_in, g) for _ in range(e)]  # each expert's inputs have their own directions
    fit_inputs = [anisotropic_inputs(n, d_in, g, rotation=q) for q in rotations]
    held_out = [anisotropic_inputs(n, d_in, g, rotation=q) for q in rotations]  # new draws, same distributions
    s = whitening(torch.stack([x.T @ x for x in fit_inputs]), torch.full((e,), float(n)), 1e-2)

    def held_out_error(factors) -> float:
        w_hat = reconstruct(**factors)
        num = sum(((w[i] - w_hat[i]) @ x.T).square().sum() for i, x in enumerate(held_out))
        return math.sqrt(num / sum((w[i] @ x.T).square().sum() for i, x in enumerate(held_out)))

    for cfg in (FitConfig(init="svd", steps=100, lr=1e-3), FitConfig(init="mean", steps=300, lr=1e-2)):
        weight = fit_projection(w, r, cfg)
        activation = fit_projection(w, r, cfg, whiten=s)
        out_w, out_a = held_out_error(weight.factors), held_out_error(activation.factors)
        print(f"init {cfg.init}: held-out output error weight objective {out_w:.4f}, activation {out_a:.4f}; "
              f"weight-space error {weight.rel_error:.4f} vs {activation.weight_rel_error:.4f}")
        assert out_a < 0.5 * out_w
        assert weight.rel_error < activation.weight_rel_error
        assert activation.rel_error <= activation.init_rel_error
        assert activation.rel_error == pytest.approx(relative_error(w, reconstruct(**activation.factors), s),
                                                     rel=1e-4)


def test_weights_without_a_whitening_are_refused():
    w = related_experts(3, 4, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="give whiten too"):
        fit_projection(w, 1, FitConfig(steps=0), weights=torch.ones(3))


def test_output_error_is_that_of_the_reconstructed_experts():
    g = torch.Generator().manual_seed(8)
    e, d, i, k, t = 6, 16, 12, 2, 40
    dense = {"gate": related_experts(e, i, d, g), "up": related_experts(e, i, d, g), "down": related_experts(e, d, i, g)}
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    gates = torch.rand(t, k, generator=g)
    # the reference forward against transformers' own experts module
    import transformers as T
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts = Qwen3MoeExperts(T.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=i, num_experts=e))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([dense["gate"], dense["up"]], 1))
        experts.down_proj.copy_(dense["down"])
        torch.testing.assert_close(experts_output(dense, x, ids, gates), experts(x, ids, gates))
    ids[0, 1] = -1  # a dropped slot (which transformers' eager experts do not take)
    factors = {p: svd_init(dense[p], 2, 1e-2) for p in dense}
    y = experts_output(dense, x, ids, gates)
    y_hat = experts_output({p: reconstruct(**f) for p, f in factors.items()}, x, ids, gates)
    assert output_error(dense, factors, x, ids, gates) == pytest.approx(
        (torch.linalg.vector_norm(y_hat - y) / torch.linalg.vector_norm(y)).item(), rel=1e-4)


def test_routing_statistics():
    uniform = routing_statistics([25, 25, 25, 25], total_tokens=50)  # top-2 of 4 experts, 50 tokens
    assert uniform["normalized_entropy"] == pytest.approx(1.0) and uniform["rare_experts"] == 0
    assert uniform["routing_entropy"] == pytest.approx(math.log(4))
    skewed = routing_statistics([1000, 990, 5, 5], total_tokens=1000)
    assert skewed["rare_experts"] == 2 and skewed["rare_expert_share"] == 0.5  # 5 < 1 % of 1000 tokens
    assert 0 < skewed["normalized_entropy"] < 0.6


# ------------------------------------------------------------------------------------------------ compress runs

def collect_layers(model, input_ids: torch.Tensor, heldout: int, structure: str = "full") -> dict[int, dict]:
    """Every MoE layer's calibration tensors (docs/design.md section 12) from one forward: float64 sums over all but
    the last ``heldout`` positions, which are stored as they are."""
    config = model.config
    e, act = config.num_experts, F.silu
    seen, hooks = {}, []
    for index, layer in enumerate(model.model.layers):
        def capture(module, args, index=index):
            seen[index] = [a.detach() for a in args[:3]]
        hooks.append(layer.mlp.experts.register_forward_pre_hook(capture))
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    layers = {}
    for index, (x, ids, gates) in seen.items():
        experts = model.model.layers[index].mlp.experts
        i = experts.down_proj.shape[-1]
        keep = slice(0, x.shape[0] - heldout)
        xk, idk, gk = x[keep].double(), ids[keep], gates[keep].double()
        logits = xk @ model.model.layers[index].mlp.gate.weight.double().T
        t = {"tokens": torch.zeros(e, dtype=torch.float64), "router_weight_sum": torch.zeros(e, dtype=torch.float64),
             "reap_sum": torch.zeros(e, dtype=torch.float64), "router_prob_sum": logits.softmax(-1).sum(0)}
        xx, hh, xd, hd = [], [], [], []
        for expert in range(e):
            token, slot = torch.where(idk == expert)
            xe = xk[token]
            gate, up = (xe @ experts.gate_up_proj[expert].double().T).split(i, -1)
            h = act(gate) * up
            f = h @ experts.down_proj[expert].double().T
            t["tokens"][expert] = len(token)
            t["router_weight_sum"][expert] = gk[token, slot].sum()
            t["reap_sum"][expert] = (gk[token, slot] * f.norm(dim=-1)).sum()
            xx.append(xe.T @ xe)
            hh.append(h.T @ h)
            xd.append(xe.square().sum(0))
            hd.append(h.square().sum(0))
        if structure == "full":
            t.update(gate_up_moment=torch.stack(xx).float(), down_moment=torch.stack(hh).float())
        else:
            t.update(gate_up_shared=sum(xx).float(), gate_up_diag=torch.stack(xd).float(),
                     down_shared=sum(hh).float(), down_diag=torch.stack(hd).float())
        t.update(heldout_inputs=x[-heldout:].float(), heldout_topk_ids=ids[-heldout:].long(),
                 heldout_topk_weights=gates[-heldout:].float())
        layers[index] = t
    return layers


def write_calibration(out: Path, model_dir: Path, seed: int = 0, sequences: int = 8, seq_len: int = 32,
                      heldout: int = 32, structure: str = "full") -> Path:
    """A calibration folder of the model in ``model_dir`` over random token ids, written per the format."""
    import transformers as T

    from moe_ds.calibrate import model_fingerprint, weights_sample

    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))
    layers = collect_layers(model, ids, heldout, structure)
    out.mkdir(parents=True)
    for index, tensors in layers.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"layer-{index:05d}.safetensors")
    c = model.config
    manifest = {"format_version": 1, "model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
                "weights_sample": weights_sample(model_dir), "model_type": c.model_type, "num_experts": c.num_experts,
                "top_k": c.num_experts_per_tok, "hidden_size": c.hidden_size,
                "intermediate_size": c.moe_intermediate_size, "layers": sorted(layers), "structure": structure,
                "sequences": sequences, "seq_len": seq_len, "tokens": sequences * seq_len - heldout,
                "heldout_tokens": heldout, "data": f"random ids, seed {seed}", "world_size": 1,
                "created": datetime.now(timezone.utc).isoformat(), "moe_ds_version": "test"}
    (out / "calibration.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny Qwen3-MoE models (seeds 0 and 1: same config and file sizes, other weights) and two calibrations
    of the first (other token ids)."""
    pytest.importorskip("moe_ds.calibrate")  # the reader; only while the calibration stage is not there
    root = tmp_path_factory.mktemp("activation")
    tiny_model("qwen3_moe", seed=0).save_pretrained(root / "model")
    tiny_model("qwen3_moe", seed=1).save_pretrained(root / "other_model")
    write_calibration(root / "cal", root / "model", seed=0)
    write_calibration(root / "cal2", root / "model", seed=1)
    return root


def factors_of(out: Path) -> dict:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(out / name, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".experts." in k})
    return tensors


def test_compress_with_a_calibration_reports_both_errors_and_the_routing(setup, tmp_path):
    from moe_ds.compress import CompressConfig, compress

    common = {"model": str(setup / "model"), "rank": 3, "init": "svd", "steps": 30}
    runs = {"none": {}, "weight": {"calibration": str(setup / "cal"), "objective": "weight"},
            "activation": {"calibration": str(setup / "cal")}}  # objective auto: activation with a calibration
    stats = {}
    for name, extra in runs.items():
        compress(CompressConfig(output=str(tmp_path / name), **common, **extra))
        stats[name] = yaml.safe_load((tmp_path / name / "compression_statistics.yaml").read_text())
    # The weight objective's factors do not depend on the calibration, which only adds to its report.
    plain, weight = factors_of(tmp_path / "none"), factors_of(tmp_path / "weight")
    assert plain.keys() == weight.keys() and all(torch.equal(plain[k], weight[k]) for k in plain)
    assert "routing" not in stats["none"] and "output_error" not in stats["none"]
    assert "objective" not in stats["none"]["fit"]
    for name in ("weight", "activation"):
        for layer in (0, 1):
            assert 0 < stats[name]["output_error"][layer] < 1
            # reconstruction_error keeps one entry per projection (moe_ds.report and tests/test_faults read it so)
            assert sorted(stats[name]["reconstruction_error"][layer]) == ["down", "gate", "up"]
            routing = stats[name]["routing"][layer]
            assert 0 < routing["normalized_entropy"] <= 1 and 0 <= routing["rare_expert_share"] <= 1
            assert routing["max_entropy"] == pytest.approx(math.log(6))
    act = stats["activation"]
    assert act["fit"]["objective"] == "activation" and act["fit"]["weighting"] == "tokens"
    assert act["fit"]["damping"] == 0.01 and stats["weight"]["fit"]["objective"] == "weight"
    for layer in (0, 1):
        for p in ("gate", "up", "down"):
            entry = act["reconstruction_error"][layer][p]
            assert {"rel_error", "act_error", "init_act_error", "eckart_young_2r"} <= set(entry)
            assert entry["act_error"] <= entry["init_act_error"]
    table = (tmp_path / "activation" / "reconstruction_errors.md").read_text()
    assert "| gate err | gate act err | gate act SVD-2r |" in table and "output err |" in table
    assert "output err |" in (tmp_path / "weight" / "reconstruction_errors.md").read_text()
    assert "output err" not in (tmp_path / "none" / "reconstruction_errors.md").read_text()
    out_w = [stats["weight"]["output_error"][layer] for layer in (0, 1)]
    out_a = [act["output_error"][layer] for layer in (0, 1)]
    print(f"tiny Qwen3-MoE, rank 3, svd + 30 steps: output error per layer, weight objective {out_w}, "
          f"activation objective {out_a}")
    run_config = json.loads((tmp_path / "activation" / "compress_config.json").read_text())
    assert run_config["calibration"] == str(setup / "cal") and run_config["objective"] == "auto"


def test_shared_diag_calibration_compresses(setup, tmp_path):
    from moe_ds.compress import CompressConfig, compress

    write_calibration(tmp_path / "cal", setup / "model", structure="shared_diag")
    compress(CompressConfig(model=str(setup / "model"), output=str(tmp_path / "c"), rank=2, steps=5,
                            calibration=str(tmp_path / "cal"), weighting="router"))
    stats = yaml.safe_load((tmp_path / "c" / "compression_statistics.yaml").read_text())
    assert all(0 < stats["output_error"][layer] < 1 for layer in (0, 1))


def test_fingerprint_tells_calibrations_and_settings_apart(setup, tmp_path):
    """A rerun with another calibration, objective, damping or weighting is not mistaken for a resume; without a
    calibration the fingerprint is the one compress used before calibrations existed."""
    import hashlib
    from dataclasses import asdict

    import transformers as T

    from moe_ds.calibrate import load_calibration
    from moe_ds.compress import CompressConfig, CompressError, _fingerprint, compress

    model_config = T.AutoConfig.from_pretrained(setup / "model")
    base = CompressConfig(model=str(setup / "model"), output=str(tmp_path / "c"), rank=2, steps=3)
    before = {"model_config": model_config.to_json_string(use_diff=False), "rank": 2, "seed": 0,
              **asdict(base.fit_config())}
    assert _fingerprint(base, model_config, 2) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    cal, cal2 = (load_calibration(setup / name, model_config, setup / "model") for name in ("cal", "cal2"))
    with_cal = CompressConfig(**{**asdict(base), "calibration": str(setup / "cal")})
    prints = {_fingerprint(base, model_config, 2), _fingerprint(with_cal, model_config, 2, cal),
              _fingerprint(with_cal, model_config, 2, cal2)}
    for change in ({"objective": "weight"}, {"damping": 0.1}, {"weighting": "uniform"}, {"shrinkage": 0.0}):
        prints.add(_fingerprint(CompressConfig(**{**asdict(with_cal), **change}), model_config, 2, cal))
    assert len(prints) == 7
    assert _fingerprint(with_cal, model_config, 2, cal) == _fingerprint(
        CompressConfig(**{**asdict(with_cal), "objective": "activation"}), model_config, 2, cal)  # auto resolved
    compress(with_cal)
    compress(with_cal)  # same command: nothing to do
    with pytest.raises(CompressError, match="holds results of a different configuration"):
        compress(CompressConfig(**{**asdict(with_cal), "calibration": str(setup / "cal2")}))


def test_a_calibration_from_the_calibration_stage_drives_compress(tmp_path, tiny_tokenizer, stdlib_text):
    """The writer and the reader of the format agree: launch/calibrate.py's stage, then compress with it."""
    calibrate = pytest.importorskip("moe_ds.calibrate")
    from conftest import save_tiny_lm
    from moe_ds.compress import CompressConfig, compress

    model = save_tiny_lm(tmp_path / "model", tiny_tokenizer)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n"
                                                   for i in range(0, 30_000, 3000)))
    manifest = calibrate.calibrate(calibrate.CalibrateConfig(
        model=str(model), data=str(tmp_path / "corpus.jsonl"), output=str(tmp_path / "cal"), num_sequences=6,
        seq_len=32, batch_size=3, heldout_tokens=16))
    compress(CompressConfig(model=str(model), output=str(tmp_path / "c"), rank=2, init="svd", steps=5,
                            calibration=str(tmp_path / "cal")))
    stats = yaml.safe_load((tmp_path / "c" / "compression_statistics.yaml").read_text())
    assert stats["fit"]["objective"] == "activation"
    for layer in manifest["layers"]:
        assert 0 < stats["output_error"][layer] < 1.5
        assert stats["routing"][layer]["routing_entropy"] == pytest.approx(
            manifest["routing"][str(layer)]["routing_entropy"])


def launcher_main():
    spec = importlib.util.spec_from_file_location("launch_compress", REPO / "launch" / "compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (arguments after --model, the one-line message after "compress: error: "); {m} is the setup folder
BAD = {
    "activation without a calibration": (["{m}/model", "--objective", "activation"],
                                         "objective 'activation' needs --calibration (a folder written by "
                                         "launch/calibrate.py)"),
    "zero damping": (["{m}/model", "--calibration", "{m}/cal", "--damping", "0"], "damping must be > 0, got 0.0"),
    "negative damping": (["{m}/model", "--calibration", "{m}/cal", "--damping=-1e-3"],
                         "damping must be > 0, got -0.001"),
    "shrinkage above 1": (["{m}/model", "--calibration", "{m}/cal", "--shrinkage", "1.5"],
                          "shrinkage must be in [0, 1], got 1.5"),
    "calibration of another model": (["{m}/other_model", "--calibration", "{m}/cal"],
                                     "{m}/cal/calibration.json is a calibration of a different model ({m}/model): "
                                     "{m}/other_model has the same config and file sizes but other weights"),
    "not a calibration": (["{m}/model", "--calibration", "{m}/model"],
                          "{m}/model holds no complete calibration: calibration.json is missing (an unfinished run "
                          "resumes when its command is run again)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_are_one_line_exit_2_and_write_nothing(case, setup, tmp_path, capsys):
    args, message = BAD[case]
    args = [a.format(m=setup) for a in args] + ["--output", str(tmp_path / "out"), "--rank", "2", "--steps", "2"]
    module = launcher_main()
    code = run("compress", lambda: module.main(["--model", *args]), errors=module.ERRORS)
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"compress: error: {message.format(m=setup)}"])
    assert not (tmp_path / "out").exists()

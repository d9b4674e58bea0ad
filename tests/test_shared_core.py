"""SharedCoreExperts: the decomposition, its forward against stock transformers experts, its errors."""

import pytest
import torch

from conftest import tiny_model
from moe_ds.arch import PROJECTIONS
from moe_ds.checkpoint import compress_model
from moe_ds.modeling_shared_core import find_experts
from moe_ds.shared_core import SharedCoreExperts
from moe_ds.stats import compute_ops

RANKS = {"gate": 4, "up": 8, "down": 4}


def random_shared_core(e=6, d=32, i=24, ranks=RANKS, seed=0, scale=0.3) -> SharedCoreExperts:
    """A module with non-trivial wrappers (U ≠ 0) at a scale that keeps activations O(1)."""
    torch.manual_seed(seed)
    m = SharedCoreExperts(e, d, i, ranks)
    with torch.no_grad():
        for p in PROJECTIONS:
            f = m.factors(p)
            for name in ("u_in", "v_in", "u_out", "v_out"):
                f[name].normal_(0.0, scale)
    return m


def routing(t, e, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def test_reconstruct_follows_the_definition():
    m = random_shared_core()
    for p in PROJECTIONS:
        f = m.factors(p)
        d_out, d_in = m.projection_shape(p)
        w = m.reconstruct(p)
        assert w.shape == (6, d_out, d_in)
        for e in (0, 5):
            ref = ((torch.eye(d_out) + f["u_out"][e] @ f["v_out"][e].T) @ f["core"]
                   @ (torch.eye(d_in) + f["u_in"][e] @ f["v_in"][e].T))
            torch.testing.assert_close(w[e], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.reconstruct(p, [5, 0]), w[[5, 0]])


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_forward_equals_stock_experts_with_reconstructed_weights(family, impl):
    """For every family and both transformers expert kernels: ours == stock module loaded with Ŵ."""
    model = tiny_model(family)
    model.config._experts_implementation = impl
    stock = model.get_submodule(next(iter(find_experts(model).values())))
    ours = random_shared_core(stock.num_experts, stock.hidden_dim, stock.intermediate_dim)
    gate_up, down = ours.to_dense()
    with torch.no_grad():
        stock.gate_up_proj.copy_(gate_up)
        stock.down_proj.copy_(down)
    x = torch.randn(40, stock.hidden_dim)
    idx, w = routing(40, stock.num_experts, 2)
    ref = stock(x, idx, w)
    out = ours(x, idx, w)
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_identical_experts_compress_exactly_and_the_whole_model_is_unchanged(family):
    """With all experts equal, the zero-shot init (C = mean = W, U = 0) reproduces W exactly."""
    model = tiny_model(family)
    with torch.no_grad():
        for name in find_experts(model).values():
            ex = model.get_submodule(name)
            ex.gate_up_proj.copy_(ex.gate_up_proj[:1].expand_as(ex.gate_up_proj))
            ex.down_proj.copy_(ex.down_proj[:1].expand_as(ex.down_proj))
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        out = compress_model(model, {"gate": 2, "up": 2, "down": 2})(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_forward_and_backward_match_dense_reference_in_float64():
    m = random_shared_core().double()
    x = torch.randn(30, 32, dtype=torch.float64, requires_grad=True)
    idx, w = routing(30, 6, 3)
    w = w.double()
    out = m(x, idx, w)
    # Dense reference straight from the definition, expert by expert.
    ws = {p: m.reconstruct(p) for p in PROJECTIONS}
    ref = torch.zeros_like(out)
    for t in range(30):
        for j in range(3):
            e = idx[t, j]
            h = torch.nn.functional.silu(ws["gate"][e] @ x[t]) * (ws["up"][e] @ x[t])
            ref[t] = ref[t] + w[t, j] * (ws["down"][e] @ h)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), [x, m.gate_u_in, m.down_v_out, m.up_core])
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, m.gate_u_in, m.down_v_out, m.up_core])
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)


def test_dropped_slots_and_unvisited_experts():
    m = random_shared_core()
    x = torch.randn(5, 32)
    idx = torch.tensor([[0, 6], [6, 6], [1, 0], [0, 1], [6, 1]])  # id 6 == E: a dropped slot
    w = torch.rand(5, 2)
    out = m(x, idx, w)
    keep = idx < 6
    ref = m(x, torch.where(keep, idx, 0), w * keep)  # same routing with dropped slots weighted 0
    torch.testing.assert_close(out, ref)
    assert out[1].abs().max() == 0


def test_rank_zero_keeps_only_the_core():
    m = random_shared_core(ranks={"gate": 0, "up": 4, "down": 0})
    assert m.gate_u_in.shape == (6, 32, 0)
    torch.testing.assert_close(m.reconstruct("gate"), m.gate_core.expand(6, -1, -1))
    stock_like = random_shared_core(ranks={"gate": 0, "up": 4, "down": 0})
    x = torch.randn(7, 32)
    idx, w = routing(7, 6, 2)
    assert torch.isfinite(stock_like(x, idx, w)).all()
    # ZeRO-3 cannot gather an empty parameter: rank-0 factors are (persistent) buffers, not parameters, and the
    # state dict keeps every key with its shape
    params = dict(m.named_parameters())
    assert all(p.numel() > 0 for p in params.values())
    assert "gate_u_in" not in params and "up_u_in" in params and len(params) == 7
    assert m.state_dict()["down_v_out"].shape == (6, 32, 0) and len(m.state_dict()) == 15


def test_parameters_are_owned_by_the_module_itself():
    """ZeRO-3 gathers a module's own parameters around its forward: no child module may hold any."""
    m = random_shared_core()
    own = dict(m.named_parameters(recurse=False))
    assert len(own) == 15 and len(dict(m.named_parameters())) == 15
    assert all(sum(1 for _ in child.parameters()) == 0 for child in m.children())


def test_bfloat16_forward_is_close_to_float32():
    m = random_shared_core()
    x = torch.randn(20, 32)
    idx, w = routing(20, 6, 2)
    ref = m(x, idx, w)
    out = m.to(torch.bfloat16)(x.bfloat16(), idx, w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_from_factors_round_trip_and_shape_errors():
    m = random_shared_core()
    factors = {p: {k: v.detach().clone() for k, v in m.factors(p).items()} for p in PROJECTIONS}
    m2 = SharedCoreExperts.from_factors(factors)
    for p in PROJECTIONS:
        torch.testing.assert_close(m2.reconstruct(p), m.reconstruct(p))
    factors["down"]["u_out"] = factors["down"]["u_out"][:, :-1]
    with pytest.raises(ValueError, match="down.u_out"):
        SharedCoreExperts.from_factors(factors)


@pytest.mark.parametrize("ranks, match", [({"gate": 4, "up": 4, "down": 99}, "rank of 'down'"),
                                          ({"gate": -1, "up": 4, "down": 4}, "rank of 'gate'"),
                                          ({"gate": 4, "up": 4}, "exactly")])
def test_bad_ranks_are_rejected(ranks, match):
    with pytest.raises(ValueError, match=match):
        SharedCoreExperts(6, 32, 24, ranks)


def test_from_dense_is_the_zero_shot_init():
    stock = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(3)
    m = SharedCoreExperts.from_dense(stock.gate_up_proj.detach(), stock.down_proj.detach(), RANKS, init_std=0.5,
                                     generator=g)
    torch.testing.assert_close(m.gate_core, stock.gate_up_proj[:, :24].mean(0))
    torch.testing.assert_close(m.up_core, stock.gate_up_proj[:, 24:].mean(0))
    torch.testing.assert_close(m.down_core, stock.down_proj.mean(0))
    assert m.gate_u_in.abs().max() == 0 and m.down_u_out.abs().max() == 0
    assert 0.4 < m.up_v_in.std().item() < 0.6


@pytest.mark.parametrize("ranks", [RANKS, {"gate": 7, "up": 0, "down": 5}, {"gate": 0, "up": 0, "down": 0}])
def test_grouped_forward_and_backward_equal_the_loop(ranks):
    """The batched path (grouped GEMMs over rows sorted by expert) == the per-expert loop, in fp32 to 1e-5,
    with ranks that need padding to the kernel's 16-byte strides and dropped slots (ids -1 and E)."""
    m = random_shared_core(ranks=ranks)
    x = torch.randn(40, 32)
    idx, w = routing(40, 6, 3)
    idx[0, 1], idx[5, 0], idx[7] = -1, 6, 6
    results = {}
    for impl in ("loop", "grouped"):
        m.implementation = impl
        xg = x.clone().requires_grad_()
        out = m(xg, idx, w)
        params = [t for t in m.parameters() if t.numel()]
        grads = torch.autograd.grad(out.square().sum(), [xg, *params], allow_unused=True)
        results[impl] = (out, grads)
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], rtol=1e-5, atol=1e-5)
    assert results["loop"][0].abs().max() > 0.1 and results["loop"][0][7].abs().max() == 0
    for g, g_ref in zip(results["grouped"][1], results["loop"][1]):
        if g_ref is None:
            assert g is None or g.abs().max() == 0
        else:  # summation orders differ: compare the whole gradient, relative to its norm
            assert (g - g_ref).norm() <= 1e-5 * g_ref.norm()
    m.implementation = "auto"
    with pytest.raises(RuntimeError, match="grouped experts need"):
        m.implementation = "grouped"
        m.double()(x.double(), idx, w.double())  # the kernel has no float64


def test_grouped_forward_launches_a_fixed_number_of_ops_whatever_the_expert_count():
    counts = {}
    for e in (8, 64):
        m = random_shared_core(e=e, d=64, i=32, ranks={"gate": 8, "up": 8, "down": 8})
        x = torch.randn(128, 64)
        idx, w = routing(128, e, 4)
        for impl in ("loop", "grouped"):
            m.implementation = impl
            with torch.no_grad():
                m(x, idx, w)  # caches the core products, as in evaluation
                counts[impl, e, "eval"] = compute_ops(m, x, idx, w)
            counts[impl, e, "train"] = compute_ops(m, x, idx, w)
    assert counts["grouped", 8, "eval"] == counts["grouped", 64, "eval"] <= 60
    assert counts["grouped", 8, "train"] == counts["grouped", 64, "train"] <= 60
    assert counts["loop", 64, "train"] > 8 * counts["loop", 8, "train"] / 2  # the loop grows with E


def test_core_products_are_cached_without_grad_and_recomputed_after_any_update():
    m = random_shared_core()
    x = torch.randn(9, 32)
    idx, w = routing(9, 6, 2)
    with torch.no_grad():
        first = m(x, idx, w)
        cached = m.core_products()
        assert m.core_products() is cached  # decoding step after step reuses them
        m.gate_core.mul_(0.5)  # an optimizer step or a load writes in place: the version counter moves
        assert m.core_products() is not cached
        second = m(x, idx, w)
    fresh = SharedCoreExperts.from_factors({p: m.factors(p) for p in PROJECTIONS})
    with torch.no_grad():
        torch.testing.assert_close(second, fresh(x, idx, w))
    assert not torch.allclose(first, second)
    out = m(x, idx, w)  # with gradients the products are part of the graph, never cached
    assert m._products is None and out.requires_grad
    torch.autograd.grad(out.sum(), m.gate_u_in)


@pytest.mark.gpu
def test_cuda_bfloat16_uses_the_grouped_kernel_and_matches_the_loop():
    """Only a GPU can show this: the CUDA grouped_mm kernel (bf16, SM80+) picked by "auto", against the loop."""
    m = random_shared_core(e=16, d=64, i=32, ranks={"gate": 8, "up": 7, "down": 8}).cuda().bfloat16()
    x = torch.randn(200, 64, device="cuda", dtype=torch.bfloat16)
    idx, w = routing(200, 16, 4)
    idx, w = idx.cuda(), w.cuda().bfloat16()
    assert m._use_grouped(x)
    out = m(x, idx, w)
    m.implementation = "loop"
    ref = m(x, idx, w)
    assert (out.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()
    m.implementation = "auto"
    assert compute_ops(m, x, idx, w) <= 60


@pytest.mark.gpu
def test_mean_start_on_cuda_draws_the_same_values_as_on_cpu():
    """Only a GPU can show this: a CPU generator with CUDA weights (from_dense, compress_model) neither fails nor
    changes the drawn V."""
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    ranks = {"gate": 2, "up": 2, "down": 2}
    cpu = SharedCoreExperts.from_dense(gate_up, down, ranks, generator=torch.Generator().manual_seed(3))
    gpu = SharedCoreExperts.from_dense(gate_up.cuda(), down.cuda(), ranks, generator=torch.Generator().manual_seed(3))
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), msg=name)


def test_grouped_eval_pads_unaligned_factors_once_and_follows_edits():
    """At a rank that is no multiple of 16 bytes the grouped path zero-pads every expert's factors; in evaluation
    it did so on every forward (bench at E=128, r=207, T=1: 1 s against 20 ms for the loop). The padded copies are
    now cached while no gradient is needed and follow in-place edits of the parameters."""
    from torch.profiler import ProfilerActivity, profile

    m = random_shared_core(e=8, d=64, i=32, ranks={"gate": 5, "up": 6, "down": 7})
    x = torch.randn(16, 64)
    idx, w = routing(16, 8, 2)

    def pads(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        return out, sum(1 for e in prof.events() if e.name in ("aten::constant_pad_nd", "aten::pad"))

    m.implementation = "grouped"
    with torch.no_grad():
        _, first = pads(lambda: m(x, idx, w))
        out, second = pads(lambda: m(x, idx, w))
        m.implementation = "loop"
        torch.testing.assert_close(out, m(x, idx, w), rtol=1e-5, atol=1e-5)
        m.gate_v_in.mul_(2)
        m.down_u_out.add_(0.1)
        reference = m(x, idx, w)
        m.implementation = "grouped"
        edited = m(x, idx, w)
    # summation orders differ and the edit doubled some activations; a stale copy would be off by O(1)
    torch.testing.assert_close(edited, reference, rtol=1e-4, atol=1e-4)
    assert (edited - out).abs().max() > 0.1
    assert first > 0 and second == 0
    _, training = pads(lambda: m(x, idx, w).sum().backward())
    assert training > 0  # with gradients the padding is part of the graph, never cached

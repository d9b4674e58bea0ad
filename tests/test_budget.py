"""Expert-storage byte budgets (moe_ds.budget, issue #13) by hand: what every method stores, the rank / experts /
density --target-ratio buys, and that the next step up would not fit, so all methods at one flag are the same size up
to one step. Shapes: Qwen3-30B-A3B's MoE layer (E=128, d=2048, I=768, top-8, bf16) and the tiny test model's
(E=6, d=32, I=24, top-2, fp32)."""

import itertools
import math

import pytest

from moe_ds.budget import (BudgetError, ExpertPlan, canonical_method, density_for_budget, kept_experts_for_ratio,
                           method_statistics, parse_method, rank_for_budget)

QWEN = dict(num_experts=128, hidden_size=2048, intermediate_size=768, value_bytes=2)  # Qwen3-30B-A3B, bf16
QWEN_K = 8
DI = 2048 * 768  # one projection of one expert
QWEN_LAYER = 128 * 3 * DI * 2  # original bytes of one layer's routed experts: 1,207,959,552
TINY = dict(num_experts=6, hidden_size=32, intermediate_size=24, value_bytes=4)
TINY_K = 2
TINY_LAYER = 6 * 3 * 32 * 24 * 4  # 55,296

# Hand-solved budgets at Qwen3-30B-A3B. Σ_p (d_out + d_in) = 3·(d + I) = 8448 values per unit of rank.
#   shared_core: 3dI + E·2r·8448 ≤ t·E·3dI  →  r ≤ (t·128 − 1)·4,718,592 / 2,162,688
#   lowrank:     E·r·8448         ≤ t·E·3dI  →  r ≤ t·603,979,776 / 1,081,344
#   delta:       3dI + E·r·8448   ≤ t·E·3dI  →  r ≤ (t·128 − 1)·4,718,592 / 1,081,344
#   prune/merge: E' = ⌊t·128⌋;  magnitude: density = t − 1/(8·2) (the bitmap's share), here exact
QWEN_BUDGETS = {
    0.5: {"shared_core": 137, "lowrank": 279, "delta": 274, "prune": 64, "merge": 64, "magnitude": 0.4375},
    0.25: {"shared_core": 67, "lowrank": 139, "delta": 135, "prune": 32, "merge": 32, "magnitude": 0.1875},
    0.125: {"shared_core": 32, "lowrank": 69, "delta": 65, "prune": 16, "merge": 16, "magnitude": 0.0625},
}


def plan_for(method: str, ratio: float, shape: dict, top_k: int, kept: int | None = None) -> ExpertPlan:
    """The plan --method M --target-ratio ratio resolves to (as compress.plan_method: E' first, then the weight
    step's rank or density at the whole ratio)."""
    structural, weight = parse_method(method)
    e = shape["num_experts"]
    if kept is None:
        kept = kept_experts_for_ratio(ratio, e, top_k) if structural else e
    plan = ExpertPlan(kept_experts=kept, weight_step=weight, **shape)
    if weight in ("shared_core", "lowrank", "delta"):
        return ExpertPlan(kept_experts=kept, weight_step=weight, rank=rank_for_budget(ratio, plan), **shape)
    if weight == "magnitude":
        return ExpertPlan(kept_experts=kept, weight_step=weight, density=density_for_budget(ratio, plan), **shape)
    return plan


def next_step(plan: ExpertPlan) -> int:
    """Bytes of the next larger setting: rank + 1, one more expert, or one more kept value in every projection."""
    if plan.weight_step in ("shared_core", "lowrank", "delta"):
        return ExpertPlan(**{**plan.__dict__, "rank": plan.rank + 1}).bytes()
    if plan.weight_step == "magnitude":
        return plan.bytes() + 3 * plan.value_bytes
    return ExpertPlan(**{**plan.__dict__, "kept_experts": plan.kept_experts + 1}).bytes()


# ------------------------------------------------------------------------------------------ bytes by hand

def test_bytes_of_every_method_by_hand_at_qwen3_30b_a3b():
    b, e = 2, 128
    assert ExpertPlan(kept_experts=e, **QWEN).bytes() == QWEN_LAYER == 1_207_959_552
    r = 64
    # shared core: the three cores 3dI plus per expert u/v factors 2r(d_out + d_in) per projection
    assert ExpertPlan(kept_experts=e, weight_step="shared_core", rank=r, **QWEN).bytes() == \
        (3 * DI + e * 2 * r * 8448) * b == 286_261_248
    assert ExpertPlan(kept_experts=e, weight_step="lowrank", rank=r, **QWEN).bytes() == e * r * 8448 * b == 138_412_032
    assert ExpertPlan(kept_experts=e, weight_step="delta", rank=r, **QWEN).bytes() == \
        (3 * DI + e * r * 8448) * b == 147_849_216
    assert ExpertPlan(kept_experts=64, **QWEN).bytes() == QWEN_LAYER // 2  # prune/merge: dense E' experts
    # magnitude: kept values ⌊numel·density⌋ per projection, plus one bit per weight position
    plan = ExpertPlan(kept_experts=e, weight_step="magnitude", density=0.3, **QWEN)
    kept = math.floor(e * DI * 0.3)
    assert plan.stored_values() == 3 * kept
    assert plan.bytes() == 3 * kept * b + 3 * e * DI // 8 == 437_885_334
    # compositions count the kept experts only, against the ORIGINAL E's bytes
    assert ExpertPlan(kept_experts=64, weight_step="shared_core", rank=r, **QWEN).ratio() == \
        (3 * DI + 64 * 2 * r * 8448) / (e * 3 * DI)
    assert ExpertPlan(kept_experts=32, weight_step="magnitude", density=0.5, **QWEN).ratio() == \
        (3 * 32 * DI // 2 * b + 3 * 32 * DI // 8) / QWEN_LAYER == 0.140625


def test_bytes_by_hand_at_the_tiny_shape_and_the_bitmap_rounding():
    assert ExpertPlan(kept_experts=6, weight_step="lowrank", rank=6, **TINY).bytes() == 6 * 6 * 168 * 4 == 24_192
    assert ExpertPlan(kept_experts=6, weight_step="delta", rank=4, **TINY).bytes() == (2304 + 6 * 4 * 168) * 4
    assert ExpertPlan(kept_experts=6, weight_step="shared_core", rank=2, **TINY).bytes() == (2304 + 6 * 2 * 2 * 168) * 4
    assert ExpertPlan(kept_experts=4, weight_step="shared_core", rank=3, **TINY).ratio() == pytest.approx(0.458333333)
    # 45 weights per projection: the bitmap takes ⌈45/8⌉ = 6 bytes each; ⌊22.5⌋ = 22 values kept each
    odd = ExpertPlan(num_experts=3, hidden_size=5, intermediate_size=3, kept_experts=3, weight_step="magnitude",
                     density=0.5, value_bytes=2)
    assert odd.stored_values() == 66 and odd.bytes() == 66 * 2 + 3 * 6 == 150
    assert odd.original_bytes() == 270


# ------------------------------------------------------------------------------------------ budgets by hand

@pytest.mark.parametrize("ratio", sorted(QWEN_BUDGETS))
def test_every_method_at_a_target_ratio_fits_and_the_next_step_does_not(ratio):
    limit = ratio * QWEN_LAYER
    sizes = {}
    for method, expected in QWEN_BUDGETS[ratio].items():
        plan = plan_for(method, ratio, QWEN, QWEN_K)
        got = {"shared_core": plan.rank, "lowrank": plan.rank, "delta": plan.rank, "prune": plan.kept_experts,
               "merge": plan.kept_experts, "magnitude": plan.density}[method]
        assert got == expected, (method, ratio)
        assert plan.bytes() <= limit < next_step(plan), (method, ratio, plan.bytes(), next_step(plan))
        assert plan.ratio() <= ratio
        sizes[method] = (plan.bytes(), next_step(plan) - plan.bytes())
    # so any two methods at the same flag differ by at most the larger one step
    for (a, (bytes_a, step_a)), (b, (bytes_b, step_b)) in itertools.combinations(sizes.items(), 2):
        assert abs(bytes_a - bytes_b) <= max(step_a, step_b), (a, b)
    # magnitude meets the budget exactly here: every count divides evenly
    assert plan_for("magnitude", ratio, QWEN, QWEN_K).bytes() == limit


@pytest.mark.parametrize("method, kept, ratio, expected", [
    ("prune,shared_core", 64, 0.25, 135),  # 3dI + 64·2r·8448 ≤ QWEN_LAYER/4 / 2
    ("merge,lowrank", 64, 0.25, 279),  # 64·r·8448 ≤ 150,994,944
    ("prune,delta", 64, 0.25, 270),  # 3dI + 64·r·8448
    ("prune,magnitude", 64, 0.25, 0.4375),  # 0.25 / (64/128) − 1/16
    ("merge,magnitude", 32, 0.125, 0.4375),
])
def test_compositions_spend_the_whole_ratio_on_the_kept_experts(method, kept, ratio, expected):
    plan = plan_for(method, ratio, QWEN, QWEN_K, kept=kept)
    assert plan.kept_experts == kept
    assert (plan.density if plan.weight_step == "magnitude" else plan.rank) == expected
    assert plan.bytes() <= ratio * QWEN_LAYER < next_step(plan)


@pytest.mark.parametrize("method, ratio, kept, setting", [
    ("shared_core", 0.5, 6, 2), ("lowrank", 0.5, 6, 6), ("delta", 0.5, 6, 4), ("prune", 0.5, 3, None),
    ("merge", 0.5, 3, None), ("magnitude", 0.5, 6, 0.46875), ("lowrank", 0.25, 6, 3), ("delta", 0.25, 6, 1),
    ("magnitude", 0.125, 6, 0.09375), ("prune", 1 / 3, 2, None),
])
def test_budgets_at_the_tiny_shape(method, ratio, kept, setting):
    """The tiny model's numbers (test_methods.py compresses at these): lowrank r ≤ t·13,824 / 1008, delta r ≤
    (t·6 − 1)·2304 / 1008, shared core r ≤ (t·6 − 1)·2304 / 2016, magnitude density = t − 1/32 (fp32)."""
    plan = plan_for(method, ratio, TINY, TINY_K)
    assert plan.kept_experts == kept
    if setting is not None:
        assert (plan.density if method == "magnitude" else plan.rank) == setting
    assert plan.bytes() <= ratio * TINY_LAYER + 1e-6 < next_step(plan)


# ------------------------------------------------------------------------------------------ refusals

def test_budgets_no_setting_of_the_method_meets_are_refused():
    with pytest.raises(BudgetError, match=r"keeps 7 of 128 experts, fewer than top-k = 8; the smallest ratio pruning "
                                          r"or merging can reach is 0\.0625"):
        kept_experts_for_ratio(0.06, 128, 8)
    assert kept_experts_for_ratio(0.0625, 128, 8) == 8  # exactly top-k is allowed
    assert kept_experts_for_ratio(0.29, 100, 2) == 29  # 0.29·100 = 28.999999999999996 in floating point
    with pytest.raises(BudgetError, match=r"target ratio 0\.005 is below the cores' own share 0\.0078"):
        rank_for_budget(0.005, ExpertPlan(kept_experts=128, weight_step="shared_core", **QWEN))
    with pytest.raises(BudgetError, match=r"below the base's own share with 64 of 128 experts 0\.0078"):
        rank_for_budget(0.007, ExpertPlan(kept_experts=64, weight_step="delta", **QWEN))
    assert rank_for_budget(1 / 128, ExpertPlan(kept_experts=128, weight_step="delta", **QWEN)) == 0  # the base alone
    # lowrank at rank 0 would store nothing at all (every expert outputs zero): rank 1 is its smallest setting
    with pytest.raises(BudgetError, match=r"target ratio 0\.05 is below the smallest lowrank: rank 1 stores 0\.0729 of "
                                          r"the original expert bytes \(rank 0 would store no experts at all\)"):
        rank_for_budget(0.05, ExpertPlan(kept_experts=6, weight_step="lowrank", **TINY))
    # magnitude: the bitmap alone is 1/(8b) of the dense bytes; at or below it no value fits
    for ratio in (1 / 16, 0.05):
        with pytest.raises(BudgetError, match=r"leaves no room for values: the bitmap index alone is 0\.0625"):
            density_for_budget(ratio, ExpertPlan(kept_experts=128, weight_step="magnitude", **QWEN))
    assert 0 < density_for_budget(0.0626, ExpertPlan(kept_experts=128, weight_step="magnitude", **QWEN)) < 1e-3
    assert rank_for_budget(1.0, ExpertPlan(kept_experts=6, weight_step="lowrank", **TINY)) == 13  # 13·1008 ≤ 13,824
    # rank and density are capped: full rank min(d, I), or every weight kept
    assert rank_for_budget(5.0, ExpertPlan(kept_experts=6, weight_step="lowrank", **TINY)) == 24
    assert density_for_budget(1.0, ExpertPlan(kept_experts=3, weight_step="magnitude", **TINY)) == 1.0


@pytest.mark.parametrize("method, parsed", [
    ("shared_core", (None, "shared_core")), ("merge", ("merge", None)), ("prune,shared_core", ("prune", "shared_core")),
    (" merge , lowrank ", ("merge", "lowrank")), ("prune,magnitude", ("prune", "magnitude")),
])
def test_method_chains(method, parsed):
    assert parse_method(method) == parsed
    assert canonical_method(method) == ",".join(p for p in parsed if p)


@pytest.mark.parametrize("method, match", [
    ("svd", r"unknown \['svd'\]"), ("", "unknown empty"), ("prune,merge", "at most one of"),
    ("lowrank,magnitude", "at most one of"), ("prune,prune", "at most one of"),
    ("shared_core,prune", r"the structural step \(prune\) comes first, e\.g\. prune,shared_core"),
])
def test_bad_method_chains(method, match):
    with pytest.raises(BudgetError, match=match):
        parse_method(method)


# ------------------------------------------------------------------------------------------ statistics

def test_method_statistics_by_hand_at_qwen3_30b_a3b():
    """48 MoE layers, 30,532,122,624 parameters (the real model's count); routers have d values per expert."""
    n, total, k = 48, 30_532_122_624, QWEN_K
    expert_layer = 128 * 3 * DI
    non_expert = total - n * expert_layer
    dense_active = non_expert + n * 3 * k * DI

    merged = method_statistics(ExpertPlan(kept_experts=64, **QWEN), "merge", k, n, total, 2048)
    assert merged["kept_experts"] == 64 and merged["rank"] is None and merged["density"] is None
    assert merged["expert_bytes"]["ratio"] == 0.5 and merged["expert_bytes"]["compressed"] == n * QWEN_LAYER // 2
    assert merged["expert_params"]["compressed"] == n * 64 * 3 * DI
    dropped_router = n * 64 * 2048  # the router rows leave with the experts
    assert merged["total_params"]["compressed"] == total - n * 64 * 3 * DI - dropped_router
    assert merged["active_params_per_token"] == {"original": dense_active, "compressed": dense_active - dropped_router,
                                                 "ratio": (dense_active - dropped_router) / dense_active}
    assert merged["expert_macs_per_token"]["ratio"] == 1.0  # still k dense experts per token

    r = 139
    low = method_statistics(ExpertPlan(kept_experts=128, weight_step="lowrank", rank=r, **QWEN), "lowrank", k, n,
                            total, 2048)
    assert low["rank"] == r and low["expert_params"]["compressed"] == n * 128 * r * 8448
    assert low["active_params_per_token"]["compressed"] == non_expert + n * k * r * 8448
    assert low["expert_macs_per_token"]["compressed"] == n * k * r * 8448

    plan = ExpertPlan(kept_experts=128, weight_step="magnitude", density=0.1875, **QWEN)
    sparse = method_statistics(plan, "magnitude", k, n, total, 2048)
    assert sparse["density"] == 0.1875 and sparse["expert_bytes"]["index"].startswith("bitmap")
    assert sparse["expert_bytes"]["compressed"] == n * QWEN_LAYER // 4
    assert sparse["expert_params"]["compressed"] == n * 3 * 128 * DI * 3 // 16  # 3/16 of the weights kept
    assert sparse["expert_macs_per_token"]["compressed"] == round(n * 3 * k * DI * 0.1875)
    assert sparse["expert_macs_per_token"]["compressed_dense_kernels"] == n * 3 * k * DI

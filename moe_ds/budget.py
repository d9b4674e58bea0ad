"""Expert-storage budgets in bytes for every compression method (issue #13), so that two methods at the same
``--target-ratio`` have the same size.

A method is a chain of at most one *structural* step (``prune``: keep E' of the E experts; ``merge``: E' groups
of experts) and at most one *weight* step (``shared_core``, ``lowrank``, ``delta``: factorised experts;
``magnitude``: unstructured sparsity), e.g. ``prune,shared_core``. Storage of one MoE layer's routed experts,
with b bytes per value and (d_out, d_in) ∈ {(I, d), (I, d), (d, I)} the three SwiGLU projections:

    dense                  E'·3·d·I·b
    shared_core (rank r)   (3·d·I + E'·Σ_p 2·r·(d_out + d_in))·b        cores + wrappers (``stats.expert_params``)
    lowrank (rank r)       E'·Σ_p r·(d_out + d_in)·b                   A_e [d_out, r], B_e [r, d_in]
    delta (rank r)         (3·d·I + E'·Σ_p r·(d_out + d_in))·b         base C + per-expert A_e B_e (D²-MoE)
    magnitude (nnz kept)   nnz·b + ⌈numel/8⌉ per projection             values + a bitmap of the kept positions

With ``quant`` (``--quantize``, a ``moe_ds.quantize`` spec such as "int4-g128") every stored expert tensor counts
its packed bytes exactly (``quantize.packed_bytes``: values, scales and zero points), in the orientation
``moe_ds.quantized_checkpoint`` stores it (groups along d or I: factors whose last axis is the rank are counted as
their transpose), so the rank, experts kept or density is chosen at the quantized size (int4 shared-core factors
take a ~4x larger rank than bf16 at the same bytes). The ratio stays against the original in its own dtype.

The router's rows (E'·d) are not expert storage: they are counted in the total parameters instead. The ratio is
always against the original E·3·d·I·b, so pruning to half the experts is ratio 0.5 whatever comes after it.
"""

import bisect
import math
from dataclasses import dataclass

from .quantize import QuantizationError, QuantSpec, packed_bytes
from .stats import expert_params, projection_shapes

STRUCTURAL = ("prune", "merge")
FACTORISED = ("shared_core", "lowrank", "delta")
WEIGHT_STEPS = (*FACTORISED, "magnitude")
METHODS = ("shared_core", "lowrank", "delta", "merge", "prune", "magnitude")


class BudgetError(ValueError):
    """A method chain or budget that cannot be met (names the method and the numbers)."""


def parse_method(method: str) -> tuple[str | None, str | None]:
    """``"prune,shared_core"`` → ("prune", "shared_core"); ``"merge"`` → ("merge", None); ``"lowrank"`` →
    (None, "lowrank").

    Raises:
        BudgetError: an unknown name, two structural or two weight steps, or an empty chain.
    """
    names = [n.strip() for n in str(method).split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise BudgetError(f"method {method!r}: unknown {unknown or 'empty'}; choose from {', '.join(METHODS)}, "
                          f"optionally a structural one first (e.g. prune,shared_core)")
    structural = [n for n in names if n in STRUCTURAL]
    weight = [n for n in names if n in WEIGHT_STEPS]
    if len(structural) > 1 or len(weight) > 1 or len(names) != len(set(names)):
        raise BudgetError(f"method {method!r}: at most one of {STRUCTURAL} and one of {WEIGHT_STEPS}")
    if structural and weight and names.index(structural[0]) > names.index(weight[0]):
        raise BudgetError(f"method {method!r}: the structural step ({structural[0]}) comes first, "
                          f"e.g. {structural[0]},{weight[0]}")
    return (structural[0] if structural else None), (weight[0] if weight else None)


def canonical_method(method: str) -> str:
    """The chain as ``structural,weight`` (or one name)."""
    return ",".join(n for n in parse_method(method) if n)


@dataclass(frozen=True)
class ExpertPlan:
    """What one MoE layer's routed experts become: E' experts stored as ``form`` at ``rank`` or ``density``."""

    num_experts: int  # E of the original model
    hidden_size: int  # d
    intermediate_size: int  # I of one expert
    kept_experts: int  # E' after prune/merge (E without a structural step)
    weight_step: str | None = None  # shared_core / lowrank / delta / magnitude, or None (dense experts)
    rank: int = 0  # factorised forms: r of every projection
    density: float = 1.0  # magnitude: share of the weights kept
    value_bytes: int = 2  # bytes per stored value (the checkpoint's dtype)
    quant: str | None = None  # experts' quantization spec ("int4-g128"): bytes are packed bytes; None: value_bytes

    def __post_init__(self):
        if self.quant is not None:
            if self.weight_step == "magnitude":
                raise BudgetError("magnitude pruning keeps a bitmap of float values; it cannot be combined with "
                                  f"quantized experts ({self.quant})")
            try:
                spec = QuantSpec.parse(self.quant)
                for k in {self.hidden_size, self.intermediate_size}:
                    spec.group(k)
            except QuantizationError as err:
                g = spec.group_size if "spec" in locals() and spec.group_size else 0
                both = math.gcd(self.hidden_size, self.intermediate_size)
                near = sorted(sorted((x for x in range(1, both + 1) if both % x == 0), key=lambda x: abs(x - g))[:3])
                hint = f"; nearest valid group sizes: {near}" if g else ""
                raise BudgetError(f"--quantize {self.quant}: {err} (the experts' groups run along d="
                                  f"{self.hidden_size} and I={self.intermediate_size}{hint})") from err

    def quantized_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the stored expert tensors as they are quantized ([..., rows, group axis]; module docstring)."""
        e, r = self.kept_experts, self.rank
        out = []
        for o, n in projection_shapes(self.hidden_size, self.intermediate_size).values():
            if self.weight_step == "shared_core":
                out += [(o, n), (e, r, n), (e, r, n), (e, r, o), (e, r, o)]  # core, U_in, V_in, U_out, V_out
            elif self.weight_step in ("lowrank", "delta"):
                out += [(e, r, o), (e, r, n)] + ([(o, n)] if self.weight_step == "delta" else [])  # A_eᵀ, B_e, C
            else:
                out.append((e, o, n))
        return out

    def original_bytes(self) -> int:
        """E·3·d·I·b: the original layer's routed experts."""
        return self.num_experts * 3 * self.hidden_size * self.intermediate_size * self.value_bytes

    def stored_values(self) -> int:
        """Values stored for the layer's routed experts (parameters; kept weights under magnitude)."""
        e, d, i, r = self.kept_experts, self.hidden_size, self.intermediate_size, self.rank
        if self.weight_step in FACTORISED:
            return expert_params(e, d, i, r, form=self.weight_step)
        if self.weight_step == "magnitude":
            return sum(kept_values(e * o * n, self.density) for o, n in projection_shapes(d, i).values())
        return e * 3 * d * i

    def bytes(self) -> int:
        """Stored bytes of the layer's routed experts: values, plus the bitmap index under magnitude; with ``quant``
        the exact packed bytes of every tensor."""
        if self.quant is not None:
            return sum(packed_bytes(shape, self.quant) for shape in self.quantized_shapes())
        index = 0
        if self.weight_step == "magnitude":
            index = sum(math.ceil(self.kept_experts * o * n / 8)
                        for o, n in projection_shapes(self.hidden_size, self.intermediate_size).values())
        return self.stored_values() * self.value_bytes + index

    def ratio(self) -> float:
        """bytes() / original_bytes()."""
        return self.bytes() / self.original_bytes()


def kept_values(numel: int, density: float) -> int:
    """Weights magnitude pruning keeps of ``numel`` at ``density`` (rounded down, the rule of ``moe_ds.sparsity``)."""
    return int(math.floor(numel * density))


def kept_experts_for_ratio(ratio: float, num_experts: int, top_k: int) -> int:
    """The most experts E' with E'/E ≤ ratio, at least top_k.

    Raises:
        BudgetError: fewer than top_k experts would remain.
    """
    kept = int(math.floor(ratio * num_experts + 1e-9))
    if kept < top_k:
        raise BudgetError(f"target ratio {ratio} keeps {kept} of {num_experts} experts, fewer than top-k = {top_k}; "
                          f"the smallest ratio pruning or merging can reach is {top_k / num_experts:.4f}")
    return kept


def kept_experts_for_budget(ratio: float, plan: ExpertPlan, top_k: int) -> int:
    """The most experts E' ≤ E whose stored bytes (``plan`` with E' experts, e.g. quantized) stay within
    ratio · original bytes, at least top_k; without ``plan.quant`` and a weight step this is
    ``kept_experts_for_ratio``.

    Raises:
        BudgetError: fewer than top_k experts would fit.
    """
    limit = ratio * plan.original_bytes() + 1e-9
    kept = max((n for n in range(plan.num_experts + 1)
                if ExpertPlan(**{**plan.__dict__, "kept_experts": n}).bytes() <= limit), default=0)
    if kept < top_k:
        raise BudgetError(f"target ratio {ratio} keeps {kept} of {plan.num_experts} experts"
                          f"{' quantized ' + plan.quant if plan.quant else ''}, fewer than top-k = {top_k}")
    return kept


def rank_for_budget(ratio: float, plan: ExpertPlan) -> int:
    """The largest rank r ∈ [r_min, min(d, I)] whose layer stays within ratio · original bytes (``plan.rank``
    ignored). r_min is 0 for the shared core and delta (the cores or the base alone) and 1 for lowrank, whose rank 0
    would store no experts at all.

    Raises:
        BudgetError: even r_min exceeds the budget (the shared core or base alone is too big; lowrank's rank 1).
    """
    limit = ratio * plan.original_bytes()
    cost = lambda r: ExpertPlan(**{**plan.__dict__, "rank": r}).bytes()  # noqa: E731 (grows with r)
    lowest = 1 if plan.weight_step == "lowrank" else 0
    if cost(lowest) > limit + 1e-9:
        share = cost(lowest) / plan.original_bytes()
        kept = f" with {plan.kept_experts} of {plan.num_experts} experts" if plan.kept_experts != plan.num_experts else ""
        if plan.weight_step == "lowrank":
            raise BudgetError(f"target ratio {ratio} is below the smallest lowrank{kept}: rank 1 stores {share:.4f} "
                              f"of the original expert bytes (rank 0 would store no experts at all)")
        what = {"shared_core": "the cores' own share", "delta": "the base's own share"}.get(
            plan.weight_step, f"what {plan.weight_step} stores at rank 0")
        raise BudgetError(f"target ratio {ratio} is below {what}{kept} {share:.4f}")
    ranks = range(min(plan.hidden_size, plan.intermediate_size) + 1)
    return bisect.bisect_right(ranks, limit + 1e-9, key=cost) - 1


def density_for_budget(ratio: float, plan: ExpertPlan) -> float:
    """The largest density (share of weights kept) whose values plus bitmap stay within ratio · original bytes.

    Solved per layer: nnz·b + Σ_p ⌈numel_p/8⌉ ≤ ratio·E·3·d·I·b; kept counts round down per projection.

    Raises:
        BudgetError: the bitmap alone exceeds the budget (ratio ≤ 1/(8·b) of the kept experts' dense bytes).
    """
    numel = plan.kept_experts * 3 * plan.hidden_size * plan.intermediate_size
    index = sum(math.ceil(plan.kept_experts * o * n / 8)
                for o, n in projection_shapes(plan.hidden_size, plan.intermediate_size).values())
    room = ratio * plan.original_bytes() - index
    if room <= 0:
        raise BudgetError(f"target ratio {ratio} leaves no room for values: the bitmap index alone is "
                          f"{index / plan.original_bytes():.4f} of the original bytes")
    return min(1.0, room / plan.value_bytes / numel)


def layer_costs(plan: ExpertPlan, top_k: int, tokens_per_forward: int = 8192) -> dict:
    """Per MoE layer and token: the active routed-expert parameters and multiply-accumulates of ``plan``.

    k experts are visited per token. Dense, pruned and merged experts: 3·k·d·I. Shared core: the cores once per
    token plus k experts' wrappers (``stats.compression_statistics``' cost model, the core products amortised over
    T tokens). Low-rank: k·Σ_p r·(d_out + d_in). Delta: the base once per token (C·x is shared by the k experts,
    and the down base applies once to the routing-weighted sum) plus the low-rank terms. Magnitude: the kept
    share of the dense cost, which sparse kernels realise and dense kernels do not.

    Returns:
        {"active_params": int, "macs": float, "macs_dense_kernels": float}.
    """
    d, i, r = plan.hidden_size, plan.intermediate_size, plan.rank
    shapes = projection_shapes(d, i)
    dense = 3 * top_k * d * i
    if plan.weight_step == "shared_core":
        per_expert = sum(2 * r * (o + n) for o, n in shapes.values())
        macs = 3 * d * i + top_k * 3 * r * (d + 3 * i) + plan.kept_experts * d * i * 3 * r / tokens_per_forward
        return {"active_params": 3 * d * i + top_k * per_expert, "macs": macs, "macs_dense_kernels": macs}
    if plan.weight_step in ("lowrank", "delta"):
        base = 3 * d * i if plan.weight_step == "delta" else 0
        per_expert = sum(r * (o + n) for o, n in shapes.values())
        return {"active_params": base + top_k * per_expert, "macs": base + top_k * per_expert,
                "macs_dense_kernels": base + top_k * per_expert}
    if plan.weight_step == "magnitude":
        kept = plan.stored_values() / plan.kept_experts  # per expert, on average
        return {"active_params": round(top_k * kept), "macs": top_k * kept, "macs_dense_kernels": dense}
    return {"active_params": dense, "macs": dense, "macs_dense_kernels": dense}


def method_statistics(plan: ExpertPlan, method: str, top_k: int, moe_layers: int, total_params: int,
                      router_params_per_expert: int, tokens_per_forward: int = 8192) -> dict:
    """compression_statistics.yaml's accounting of any method against the original model (YAML-ready).

    Args:
        plan: the layer plan (the same for every MoE layer).
        method: the canonical method chain (``canonical_method``).
        top_k: k; moe_layers: number of MoE layers; total_params: the original model's parameters;
        router_params_per_expert: router values per expert and layer (d, plus 1 for a correction bias), which
            leave with pruned or merged experts.

    Returns:
        {"method", "kept_experts", "rank", "density", "expert_params", "expert_bytes", "total_params",
        "active_params_per_token", "expert_macs_per_token"}, each with "original", "compressed", "ratio".
    """
    original = ExpertPlan(plan.num_experts, plan.hidden_size, plan.intermediate_size, plan.num_experts,
                          value_bytes=plan.value_bytes)
    n = moe_layers
    dropped_router = n * (plan.num_experts - plan.kept_experts) * router_params_per_expert
    non_expert = total_params - n * original.stored_values()
    total_comp = non_expert - dropped_router + n * plan.stored_values()
    cost_orig, cost_comp = layer_costs(original, top_k, tokens_per_forward), layer_costs(plan, top_k, tokens_per_forward)
    active_orig = non_expert + n * cost_orig["active_params"]
    active_comp = non_expert - dropped_router + n * cost_comp["active_params"]

    def entry(orig, comp):
        return {"original": orig, "compressed": comp, "ratio": comp / orig}

    return {
        "method": method, "kept_experts": plan.kept_experts, "rank": plan.rank if plan.weight_step in FACTORISED
        else None, "density": plan.density if plan.weight_step == "magnitude" else None,
        "expert_params": entry(n * original.stored_values(), n * plan.stored_values()),
        "expert_bytes": {**entry(n * original.bytes(), n * plan.bytes()), "value_bytes": plan.value_bytes,
                         "quantization": plan.quant,
                         "index": "bitmap, 1 bit per weight position" if plan.weight_step == "magnitude" else None},
        "total_params": entry(total_params, total_comp),
        "active_params_per_token": entry(active_orig, active_comp),
        "expert_macs_per_token": {**entry(n * cost_orig["macs"], round(n * cost_comp["macs"])),
                                  "compressed_dense_kernels": round(n * cost_comp["macs_dense_kernels"]),
                                  "tokens_per_forward": tokens_per_forward},
    }

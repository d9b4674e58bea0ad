"""Low-rank experts: each expert as a truncated SVD ("lowrank") or a shared base plus a low-rank delta ("delta").

For each projection p in {gate, up, down} of a SwiGLU expert e,
    lowrank:  W_e ≈ Ŵ_e = A_e B_e         (per-expert truncated SVD, optimal by Eckart–Young)
    delta:    W_e ≈ Ŵ_e = C + A_e B_e     (D²-MoE, Gu et al. 2025, without its base pruning)
with A_e [d_out, r], B_e [r, d_in] and C [d_out, d_in] shared by the layer's E experts. ``fit_lowrank`` gives the
factors in closed form for the weight objective Σ_e ||W_e − Ŵ_e||²_F or the activation objective
Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F (SVD-LLM, Wang et al. 2024: truncate the SVD of (W_e − C) S_e, not of W_e − C).
``LowRankExperts`` replaces a transformers >= 5 fused experts module (same call contract).

Shipped verbatim beside every compressed checkpoint (``trust_remote_code``): at import it needs only torch,
transformers and the sibling ``arch`` module; ``fit_lowrank`` imports ``moe_ds.fit`` (not shipped) when called.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .arch import PROJECTIONS
from .shared_core import (check_ranks, grouped_kernel_available, register_factor, require_grouped_kernel,
                          rows_by_expert)


class LowRankError(ValueError):
    """A rank or a byte budget that low-rank experts cannot take (the message names the value)."""


def _projection_shape(proj: str, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
    return (hidden_size, intermediate_size) if proj == "down" else (intermediate_size, hidden_size)


def _uniform_ranks(ranks: int | dict) -> dict[str, int]:
    return {p: int(ranks if isinstance(ranks, int) else ranks[p]) for p in PROJECTIONS}


def lowrank_params(num_experts: int, hidden_size: int, intermediate_size: int, ranks: int | dict,
                   base: bool) -> int:
    """Routed-expert parameters of one MoE layer in the low-rank forms.

    E · Σ_p r_p · (d + I) (every expert's A_e and B_e), plus 3·d·I for the delta form's three bases.

    Args:
        num_experts: E; hidden_size: d; intermediate_size: I.
        ranks: one r for all projections or {"gate": r, "up": r, "down": r}.
        base: True for the "delta" form (a shared base per projection), False for "lowrank".
    """
    d, i = hidden_size, intermediate_size
    r = _uniform_ranks(ranks)
    return num_experts * sum(r.values()) * (d + i) + (3 * d * i if base else 0)


class LowRankExperts(nn.Module):
    """A layer's E SwiGLU experts as per-expert low-rank factors, optionally around a shared base.

    Parameters (all owned by this module, so ZeRO-3 gathers them around its forward), for p in {gate, up, down}
    with (d_out, d_in) = (I, d) for gate/up and (d, I) for down:
        ``{p}_a`` [E, d_out, r_p], ``{p}_b`` [E, r_p, d_in], and with ``base`` ``{p}_base`` [d_out, d_in];
    Ŵ_e = A_e B_e (+ C).

    Forward cost per token (multiply-accumulates, k = top-k):
        per visited expert: (r_g + r_u + r_d) · (d + I)  (B_e x then A_e (·), for each projection);
        with ``base``, once per token: 3·d·I (C x for gate and up is shared by the k experts the token visits;
            the down base is applied once to the routing-weighted sum of the experts' activations).
    Nothing is precomputed per forward (no per-T term). The original experts cost 3·k·d·I. Example,
    Qwen3-30B-A3B (d=2048, I=768, k=8, E=128) at the 0.237 expert-parameter ratio of the shared core at r=64:
    lowrank r=132, 8.92M MACs, and delta r=128, 4.72M + 8.65M = 13.37M MACs, vs 37.7M (0.24× and 0.35×).
    Elementwise work (activation, routing weights) is not counted.

    Args:
        num_experts: E.
        hidden_size: d.
        intermediate_size: I of one expert.
        ranks: {"gate": r_g, "up": r_u, "down": r_d}; 0 leaves that projection's experts zero ("lowrank") or
            equal to the base ("delta").
        hidden_act: activation name from ``transformers.activations.ACT2FN`` (SwiGLU gate).
        base: hold a shared base C per projection (the "delta" form).
        dtype, device: of the parameters.

    Raises:
        LowRankError: a rank is negative or larger than min(d, I), or a projection is missing.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ranks: dict,
        hidden_act: str = "silu",
        base: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.ranks = check_ranks(ranks, hidden_size, intermediate_size, LowRankError)
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.has_base = bool(base)
        self.implementation = "auto"  # experts kernel: "auto", "grouped" or "loop" (see forward)
        kw = {"dtype": dtype, "device": device}
        for p in PROJECTIONS:
            d_out, d_in = self.projection_shape(p)
            r = self.ranks[p]
            register_factor(self, f"{p}_a", torch.empty(num_experts, d_out, r, **kw))  # rank 0: a buffer
            register_factor(self, f"{p}_b", torch.empty(num_experts, r, d_in, **kw))
            if self.has_base:
                setattr(self, f"{p}_base", nn.Parameter(torch.empty(d_out, d_in, **kw)))
        self.reset_parameters()

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(d_out, d_in) of projection ``proj``."""
        return _projection_shape(proj, self.hidden_dim, self.intermediate_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A = 0, B and the bases ~ N(0, 1/d_in): every expert starts as its base (zero without one)."""
        for p in PROJECTIONS:
            a, b = getattr(self, f"{p}_a"), getattr(self, f"{p}_b")
            if a.device.type == "meta":
                continue
            a.zero_()
            b.normal_(0.0, 1.0 / math.sqrt(b.shape[-1]))
            if self.has_base:
                getattr(self, f"{p}_base").normal_(0.0, 1.0 / math.sqrt(b.shape[-1]))

    def factors(self, proj: str) -> dict[str, torch.Tensor]:
        """The tensors of one projection: {"a", "b"} and, with a base, "base"."""
        names = ("a", "b", "base") if self.has_base else ("a", "b")
        return {name: getattr(self, f"{proj}_{name}") for name in names}

    @classmethod
    def from_factors(cls, factors: dict, hidden_act: str = "silu") -> "LowRankExperts":
        """Build a module holding copies of given factors (``LowRankFit.factors`` of each projection).

        Args:
            factors: {proj: {"a": [E, d_out, r], "b": [E, r, d_in][, "base": [d_out, d_in]]}} for proj in
                {gate, up, down}, all with or all without "base"; dtype and device taken from the gate's A.
            hidden_act: activation of the SwiGLU gate.

        Raises:
            LowRankError: "base" given for some projections only, or shapes that disagree between projections or
                with the (d_out, d_in) layout.
        """
        gate_a = factors["gate"]["a"]
        base = "base" in factors["gate"]
        if any(("base" in factors[p]) != base for p in PROJECTIONS):
            raise LowRankError("give a base for every projection (the delta form) or for none (lowrank)")
        e, i = gate_a.shape[:2]
        d = factors["gate"]["b"].shape[-1]
        module = cls(e, d, i, {p: factors[p]["a"].shape[-1] for p in PROJECTIONS}, hidden_act, base,
                     dtype=gate_a.dtype, device=gate_a.device)
        with torch.no_grad():
            for p in PROJECTIONS:
                for name, tensor in module.factors(p).items():
                    if tuple(factors[p][name].shape) != tuple(tensor.shape):
                        raise LowRankError(f"{p}.{name}: expected shape {tuple(tensor.shape)}, "
                                           f"got {tuple(factors[p][name].shape)}")
                    tensor.copy_(factors[p][name])
        return module

    @classmethod
    def from_dense(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, ranks: dict, base: bool,
                   hidden_act: str = "silu") -> "LowRankExperts":
        """Fit dense experts in closed form for the weight objective (``fit_lowrank`` per projection).

        Args:
            gate_up_proj: [E, 2I, d] fused gate (rows :I) and up (rows I:) weights, transformers >= 5 layout.
            down_proj: [E, d, I].
            ranks: {"gate": r, "up": r, "down": r}.
            base: the "delta" form (shared base C = mean expert) instead of "lowrank".

        Returns:
            The module in gate_up_proj's dtype and device (the fit itself runs in float32).
        """
        i = gate_up_proj.shape[1] // 2
        dense = {"gate": gate_up_proj[:, :i], "up": gate_up_proj[:, i:], "down": down_proj}
        factors = {p: fit_lowrank(dense[p], int(ranks[p]), base).factors for p in PROJECTIONS}
        return cls.from_factors(factors, hidden_act).to(gate_up_proj.dtype)

    def reconstruct(self, proj: str, experts: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Dense Ŵ_e = A_e B_e (+ C) for the given experts.

        Args:
            proj: "gate", "up" or "down".
            experts: expert indices (default: all E).

        Returns:
            [len(experts), d_out, d_in] in the parameters' dtype.
        """
        f = self.factors(proj)
        idx = slice(None) if experts is None else torch.as_tensor(experts, device=f["a"].device)
        w = f["a"][idx] @ f["b"][idx]
        return w + f["base"] if self.has_base else w

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused dense weights in the transformers >= 5 layout: gate_up_proj [E, 2I, d], down_proj [E, d, I]."""
        return torch.cat([self.reconstruct("gate"), self.reconstruct("up")], dim=1), self.reconstruct("down")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Same contract as the transformers experts modules.

        Args:
            hidden_states: [T, d].
            top_k_index: [T, k] int64 expert ids; ids outside [0, E) (dropped slots) are ignored.
            top_k_weights: [T, k] routing weights.

        Returns:
            [T, d] = Σ_j w_tj · Ŵ_down,e (act(Ŵ_gate,e x_t) ⊙ Ŵ_up,e x_t), e = top_k_index[t, j].

        ``self.implementation`` picks the kernel: "grouped" (``torch.nn.functional.grouped_mm`` over the rows sorted
        by expert: a fixed number of ops whatever E is), "loop" (one Python iteration per visited expert, any dtype
        and device) or "auto": grouped on accelerators whose kernel supports the dtype and layout, except where it
        would copy more than it computes (see ``_use_grouped``); the loop on CPUs, where it is faster.
        """
        x = hidden_states.to(self.gate_a.dtype)
        if self._use_grouped(x, top_k_index.numel()):
            out = self._forward_grouped(x, top_k_index, top_k_weights)
        else:
            out = self._forward_loop(x, top_k_index, top_k_weights)
        return out.to(hidden_states.dtype)

    def _use_grouped(self, x: torch.Tensor, rows: int) -> bool:
        if self.implementation == "loop":
            return False
        if self.implementation == "grouped":
            require_grouped_kernel(x, self.hidden_dim, self.intermediate_dim)
            return True
        ok = grouped_kernel_available(x, self.hidden_dim, self.intermediate_dim)
        # An unaligned rank makes every call copy all E experts' factors zero-padded (nothing is cached, so ZeRO-3's
        # gathered parameters are never stale): with fewer routed rows than experts (decoding) the copy costs more
        # than the products, and the loop touches the visited experts only.
        align = 16 // x.element_size()
        padded = any(r % align for r in self.ranks.values())
        return ok and x.device.type != "cpu" and (not padded or rows >= self.num_experts)

    def _forward_grouped(self, x: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """All experts at once: the T·k (token, slot) rows sorted by expert, each factor product one grouped GEMM.
        Dropped slots go to expert 0 with weight 0 (exact, and no row is left to the kernel's unwritten tail); the
        rows are summed per token in a fixed order (``rows_by_expert``)."""
        offs, token, weight, per_token = rows_by_expert(top_k_index, top_k_weights, self.num_experts, x.dtype)
        align = 16 // x.element_size()

        def low_rank(rows, proj, scale=None):  # rows [N, d_in] -> rows B_eᵀ A_eᵀ [N, d_out], expert e per group
            a, b = getattr(self, f"{proj}_a"), getattr(self, f"{proj}_b")
            pad = -self.ranks[proj] % align
            if pad:  # the rank is a leading dimension of A.mT and of h and its gradient: zero-pad it to 16 bytes
                a, b = F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))
            h = F.grouped_mm(rows, b.mT, offs=offs)  # [N, r]
            return F.grouped_mm(h if scale is None else h * scale, a.mT, offs=offs)

        x_rows = x[token]
        z = {}
        for p in ("gate", "up"):
            y = F.linear(x, getattr(self, f"{p}_base"))[token] if self.has_base else None  # C x once per token
            if self.ranks[p] > 0:
                y = low_rank(x_rows, p) if y is None else y + low_rank(x_rows, p)
            z[p] = x_rows.new_zeros(x_rows.shape[0], self.intermediate_dim) if y is None else y
        g = self.act_fn(z["gate"]) * z["up"]  # [N, I]
        out = x.new_zeros(top_k_index.shape[0], self.hidden_dim)
        if self.ranks["down"] > 0:
            out = out + per_token(low_rank(g, "down", weight))
        if self.has_base:  # the down base once per token on Σ_j w_j g_j
            out = out + F.linear(per_token(g * weight), self.down_base)
        return out

    def _forward_loop(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One Python iteration per visited expert (the reference; any dtype and device)."""
        num_tokens, top_k = top_k_index.shape
        # Group the T·k (token, slot) pairs by expert; dropped ids sort last.
        flat_expert = top_k_index.reshape(-1)
        flat_expert = torch.where((flat_expert >= 0) & (flat_expert < self.num_experts), flat_expert,
                                  self.num_experts)
        counts = torch.bincount(flat_expert, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        order = torch.argsort(flat_expert, stable=True)[: sum(counts)]
        token = order // top_k
        weight = top_k_weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)  # [N, 1]
        rows = {"token": token.split(counts), "weight": weight.split(counts), "x": x[token].split(counts)}
        if self.has_base:  # C x once per token [T, I], then one gather (per-expert gathers cost a zero-fill each)
            for p in ("gate", "up"):
                rows[p] = F.linear(x, getattr(self, f"{p}_base"))[token].split(counts)

        # Per-expert views via unbind: indexing a parameter as p[e] would cost a full [E, ...] zero-fill per
        # expert in the backward pass, unbind's backward stacks the E gradients once.
        factors = {p: (getattr(self, f"{p}_b").mT.unbind(0), getattr(self, f"{p}_a").mT.unbind(0))
                   for p in PROJECTIONS if self.ranks[p] > 0}
        out = x.new_zeros(num_tokens, self.hidden_dim)
        mixed = x.new_zeros(num_tokens, self.intermediate_dim) if self.has_base else None  # Σ_j w_j g_j
        for e in range(self.num_experts):
            if counts[e] == 0:
                continue
            token_e, w, x_e = rows["token"][e], rows["weight"][e], rows["x"][e]
            z = {}
            for p in ("gate", "up"):
                y = rows[p][e] if self.has_base else x_e.new_zeros(counts[e], self.intermediate_dim)
                if p in factors:
                    b_t, a_t = factors[p]
                    y = y + (x_e @ b_t[e]) @ a_t[e]  # A_e (B_e x)
                z[p] = y
            g = self.act_fn(z["gate"]) * z["up"]  # [n_e, I]
            if "down" in factors:
                b_t, a_t = factors["down"]
                out.index_add_(0, token_e, ((g @ b_t[e]) * w) @ a_t[e])
            if mixed is not None:
                mixed.index_add_(0, token_e, g * w)
        if mixed is not None:
            out = out + F.linear(mixed, self.down_base)
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"ranks={self.ranks}, base={self.has_base}, act={self.hidden_act}")


@dataclass
class LowRankFit:
    factors: dict  # {"a": [E, d_out, r], "b": [E, r, d_in]} and, for the delta form, "base" [d_out, d_in]; fp32
    rel_error: float  # ||W − Ŵ||_F / ||W||_F over all experts (weight space)
    act_error: float | None  # the activation objective's relative error (its norm); None without whiten
    seconds: float


def fit_lowrank(w: torch.Tensor, rank: int, base: bool, whiten: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> LowRankFit:
    """Closed-form fit of one (layer, projection) in the "lowrank" (Ŵ_e = A_e B_e) or "delta" (C + A_e B_e) form.

    Weight objective (no ``whiten``): minimise Σ_e ||W_e − Ŵ_e||²_F. C = mean expert (delta), then the rank-r
    truncated SVD of each R_e = W_e − C (R_e = W_e for lowrank), optimal by Eckart–Young–Mirsky given C.
    Activation objective (``whiten`` S_e, ``weights`` w_e): minimise Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F. C =
    ``moe_ds.fit.weighted_core`` (the objective's best base at rank 0), then R_e S_e ≈ U Σ Vᵀ truncated and
    B_e S_e = Σ^½ Vᵀ solved for B_e against the triangular S_e (never an explicit inverse): the error
    ||(R_e − A_e B_e) S_e|| is the whitened SVD's tail, optimal given C (SVD-LLM, Wang et al. 2024; D²-MoE,
    Gu et al. 2025). The weights enter through C only: given C each expert is its own problem.
    The split A = U Σ^½, B = Σ^½ Vᵀ balances the factors for training.

    Args:
        w: [E, d_out, d_in] dense expert weights (any float dtype and device; the fit runs in float32 there).
        rank: r in [0, min(d_out, d_in)]; 0 gives the base alone (delta) or zero experts (lowrank).
        base: True for the delta form.
        whiten: S [E, d_in, d_in] lower-triangular (``moe_ds.fit.whitening``), or None for the weight objective.
        weights: [E] w_e of the activation objective (default uniform); only with ``whiten``.

    Returns:
        LowRankFit with float32 factors on w's device.

    Raises:
        LowRankError: rank out of range, or weights without whiten.
    """
    # fit.py is not shipped beside checkpoints: imported here, as "from . import", which transformers' scan of a
    # shipped file's relative imports (``from .name import``, a regex) does not take for a file it must find.
    from . import fit

    t0 = time.perf_counter()
    e, d_out, d_in = w.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise LowRankError(f"rank {rank} is out of range for a {d_out}×{d_in} projection (0 to {min(d_out, d_in)})")
    if weights is not None and whiten is None:
        raise LowRankError("expert weights belong to the activation objective: give whiten too")
    w = w.to(torch.float32)
    if whiten is not None:
        whiten = whiten.to(device=w.device, dtype=torch.float32)
        weights = None if weights is None else weights.to(device=w.device, dtype=torch.float32)
    factors = {}
    residual = w
    if base:
        factors["base"] = w.mean(0) if whiten is None else fit.weighted_core(w, whiten, weights)
        residual = w - factors["base"]
    if rank == 0:
        factors["a"], factors["b"] = w.new_zeros(e, d_out, 0), w.new_zeros(e, 0, d_in)
    else:
        u, s, vh = torch.linalg.svd(residual if whiten is None else residual @ whiten, full_matrices=False)
        root = s[:, :rank].sqrt()
        factors["a"] = (u[..., :rank] * root[:, None, :]).contiguous()  # U Σ^½
        b = root[..., None] * vh[:, :rank]  # Σ^½ Vᵀ (of R_e S_e when whitened)
        del u, s, vh
        if whiten is not None:
            b = torch.linalg.solve_triangular(whiten, b, upper=False, left=False)  # B_e S_e = Σ^½ Vᵀ
        factors["b"] = b.contiguous()
    w_hat = factors["a"] @ factors["b"]
    if base:
        w_hat += factors["base"]
    rel = fit.relative_error(w, w_hat)
    act = None if whiten is None else fit.relative_error(w, w_hat, whiten, weights)
    factors = {k: factors[k] for k in (("a", "b", "base") if base else ("a", "b"))}
    return LowRankFit(factors, rel, act, time.perf_counter() - t0)

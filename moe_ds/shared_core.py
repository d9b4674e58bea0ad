"""Shared-core experts: every expert of a layer as one shared core plus low-rank wrappers.

For each projection p in {gate, up, down} of a SwiGLU expert e,
    W_e ≈ Ŵ_e = (I + U_out,e V_out,eᵀ) · C · (I + U_in,e V_in,eᵀ)
with C [d_out, d_in] shared by the layer's E experts and U_in, V_in [E, d_in, r], U_out, V_out [E, d_out, r].
``SharedCoreExperts`` replaces a transformers >= 5 fused experts module (same call contract) without ever
materialising the E dense matrices in its forward. Shipped verbatim beside every compressed checkpoint
(``trust_remote_code``): imports only torch, transformers and the sibling ``arch`` module.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .arch import PROJECTIONS

_FACTORS = ("core", "u_in", "v_in", "u_out", "v_out")


def register_factor(module: nn.Module, name: str, factor: torch.Tensor) -> None:
    """Register a wrapper factor on ``module``: a parameter, or, when it is empty (rank 0), a persistent buffer.

    A rank-0 factor has nothing to train, and ZeRO-3 cannot partition or gather an empty parameter (torch.cat of no
    partitions in its fetch); the buffer keeps the checkpoint's keys and shapes.
    """
    if factor.numel() == 0:
        module.register_buffer(name, factor)
    else:
        setattr(module, name, nn.Parameter(factor))


def check_ranks(ranks: dict, hidden_size: int, intermediate_size: int, error: type = ValueError) -> dict[str, int]:
    """{"gate": r, "up": r, "down": r} as ints, each in [0, min(d, I)] (shared by every low-rank experts module).

    Raises:
        ``error``: a projection missing or extra, or a rank out of range.
    """
    if set(ranks) != set(PROJECTIONS):
        raise error(f"ranks must name exactly {PROJECTIONS}, got {sorted(ranks)}")
    max_rank = min(hidden_size, intermediate_size)
    for p, r in ranks.items():
        if not 0 <= int(r) <= max_rank:
            raise error(f"rank of {p!r} must be in [0, {max_rank}] (min of d={hidden_size}, I={intermediate_size}), "
                        f"got {r}")
    return {p: int(ranks[p]) for p in PROJECTIONS}


def grouped_kernel_available(x: torch.Tensor, hidden_size: int, intermediate_size: int) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes ``x``'s dtype and device with rows of d and I values: CUDA
    kernels need bf16 and compute capability 8.0 or newer, and every stride a multiple of 16 bytes (the modules pad
    their factors to that along the rank; d and I are not padded)."""
    ok = hasattr(F, "grouped_mm") and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if ok and x.device.type == "cuda":
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return ok and all(n * x.element_size() % 16 == 0 for n in (hidden_size, intermediate_size))


def require_grouped_kernel(x: torch.Tensor, hidden_size: int, intermediate_size: int) -> None:
    """Raises RuntimeError where ``grouped_kernel_available`` is False (implementation="grouped" was asked for)."""
    if not grouped_kernel_available(x, hidden_size, intermediate_size):
        raise RuntimeError(f"grouped experts need torch.nn.functional.grouped_mm for {x.dtype} on {x.device.type} "
                           f"with d, I multiples of 16 bytes; use implementation='loop'")


def rows_by_expert(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, dtype: torch.dtype):
    """The T·k (token, slot) rows of a routing, sorted by expert, for the grouped kernels.

    Dropped slots (ids outside [0, E)) go to expert 0 with weight 0: exact, and no row is left to the kernel's
    unwritten tail.

    Args:
        top_k_index: [T, k] int64; top_k_weights: [T, k]; dtype: of the returned weights.

    Returns:
        (offs [E] int32 cumulative row counts, token [N] int64 the token of each sorted row, weight [N, 1] its
        routing weight, per_token) with N = T·k and ``per_token(rows [N, n]) -> [T, n]`` summing the rows of each
        token in a fixed order: index_add on the CPU (deterministic there, each row read once), a gather back to
        (token, slot) order and a sum elsewhere (CUDA's index_add uses atomics: run-to-run noise).
    """
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    sorted_ids, order = torch.sort(torch.where(valid, flat, 0), stable=True)
    offs = torch.bincount(sorted_ids, minlength=num_experts).cumsum(0).to(torch.int32)
    token = order // top_k
    weight = (top_k_weights.reshape(-1) * valid)[order].unsqueeze(1).to(dtype)
    if top_k_index.device.type == "cpu":
        def per_token(rows):
            return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, token, rows)
    else:
        unsort = torch.argsort(order)

        def per_token(rows):
            return rows[unsort].view(num_tokens, top_k, -1).sum(1)
    return offs, token, weight, per_token


def reconstruct(core: torch.Tensor, u_in: torch.Tensor, v_in: torch.Tensor, u_out: torch.Tensor,
                v_out: torch.Tensor) -> torch.Tensor:
    """Dense Ŵ_e = (I + U_out V_outᵀ) C (I + U_in V_inᵀ) of every expert given (the one implementation).

    Args:
        core: [d_out, d_in]; u_in, v_in: [E, d_in, r]; u_out, v_out: [E, d_out, r] (any float dtype).

    Returns:
        [E, d_out, d_in] in the factors' dtype.
    """
    w = core + (core @ u_in) @ v_in.transpose(1, 2)  # C (I + U_in V_inᵀ)
    return w + u_out @ (v_out.transpose(1, 2) @ w)  # (I + U_out V_outᵀ) · that


def mean_init(w: torch.Tensor, rank: int, init_std: float = 1.0,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The "mean" zero-shot start of one projection: C = mean expert, U = 0, V ~ N(0, init_std²), so Ŵ_e = C.

    Args:
        w: [E, d_out, d_in] dense expert weights.
        rank: wrapper rank r.
        init_std: standard deviation of V_in and V_out.
        generator: CPU RNG for V (V_in drawn first, then V_out, in float32 on the CPU so the values do not
            depend on the device); None uses the global CPU RNG.

    Returns:
        {"core": [d_out, d_in], "u_in", "v_in": [E, d_in, r], "u_out", "v_out": [E, d_out, r]} in w's dtype
        and device.
    """
    e, d_out, d_in = w.shape

    def normal(*shape):
        v = torch.randn(*shape, generator=generator, dtype=torch.float32) * init_std
        return v.to(device=w.device, dtype=w.dtype)

    return {"core": w.mean(0), "u_in": w.new_zeros(e, d_in, rank), "v_in": normal(e, d_in, rank),
            "u_out": w.new_zeros(e, d_out, rank), "v_out": normal(e, d_out, rank)}


class SharedCoreExperts(nn.Module):
    """A layer's E SwiGLU experts as shared cores plus per-expert low-rank wrappers.

    Parameters (all owned by this module, so ZeRO-3 gathers them around its forward), for
    p in {gate, up, down} with (d_out, d_in) = (I, d) for gate/up and (d, I) for down:
        ``{p}_core`` [d_out, d_in]; ``{p}_u_in``, ``{p}_v_in`` [E, d_in, r_p];
        ``{p}_u_out``, ``{p}_v_out`` [E, d_out, r_p].

    Forward cost per token (multiply-accumulates, k = top-k, r_g/r_u/r_d the ranks):
        cores, once per token (C·x is shared by the k experts a token visits; the down core is
        applied once to the routing-weighted sum of the experts' wrapped activations): 3·d·I;
        per visited expert: r_g·(d + 3I) + r_u·(d + 3I) + r_d·(3I + d)
            (V_inᵀx: d·r, (C U_in)·a: I·r, V_outᵀy: I·r, U_out·b: I·r for gate/up;
             V_inᵀh: I·r, U_in·a: I·r, (V_outᵀC)·g: I·r, U_out·c: d·r for down);
        once per forward, amortised over the T tokens of the call: C·U_in for gate and up and
            V_outᵀ·C for down, E·d·I·(r_g + r_u + r_d) / T.
    The original experts cost 3·k·d·I per token. Example, Qwen3-30B-A3B (d=2048, I=768, k=8,
    E=128) at r=64 and T=8192: 4.72M + 6.68M + 4.72M ≈ 16.1M vs 37.7M MACs (0.43×).
    Elementwise work (activation, residual adds, routing weights) is not counted.

    Args:
        num_experts: E.
        hidden_size: d.
        intermediate_size: I of one expert.
        ranks: {"gate": r_g, "up": r_u, "down": r_d}; 0 keeps only the core for that projection.
        hidden_act: activation name from ``transformers.activations.ACT2FN`` (SwiGLU gate).
        init_std: standard deviation of V at construction (U starts at 0, so Ŵ_e = C).

    Raises:
        ValueError: a rank is negative or larger than min(d, I), or a projection is missing.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ranks: dict,
        hidden_act: str = "silu",
        init_std: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.ranks = check_ranks(ranks, hidden_size, intermediate_size)
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.init_std = init_std
        self.implementation = "auto"  # experts kernel: "auto", "grouped" or "loop" (see forward)
        self._products, self._products_key = None, None  # cached core_products (no-grad forwards only)
        self._padded_cache = {}  # zero-padded factors of the grouped path (no-grad forwards only), see _padded
        kw = {"dtype": dtype, "device": device}
        for p in PROJECTIONS:
            d_out, d_in = self.projection_shape(p)
            r = self.ranks[p]
            setattr(self, f"{p}_core", nn.Parameter(torch.empty(d_out, d_in, **kw)))
            for name, dim in (("u_in", d_in), ("v_in", d_in), ("u_out", d_out), ("v_out", d_out)):
                register_factor(self, f"{p}_{name}", torch.empty(num_experts, dim, r, **kw))
        self.reset_parameters()

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(d_out, d_in) of projection ``proj``."""
        d, i = self.hidden_dim, self.intermediate_dim
        return (d, i) if proj == "down" else (i, d)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Cores ~ N(0, 1/d_in), U = 0, V ~ N(0, init_std²): every wrapper starts as the identity."""
        for p in PROJECTIONS:
            core = getattr(self, f"{p}_core")
            if core.device.type == "meta":
                continue
            core.normal_(0.0, 1.0 / math.sqrt(core.shape[1]))
            getattr(self, f"{p}_u_in").zero_()
            getattr(self, f"{p}_u_out").zero_()
            getattr(self, f"{p}_v_in").normal_(0.0, self.init_std)
            getattr(self, f"{p}_v_out").normal_(0.0, self.init_std)

    def factors(self, proj: str) -> dict[str, torch.Tensor]:
        """The five tensors of one projection: core, u_in, v_in, u_out, v_out."""
        return {name: getattr(self, f"{proj}_{name}") for name in _FACTORS}

    @classmethod
    def from_factors(cls, factors: dict, hidden_act: str = "silu") -> "SharedCoreExperts":
        """Build a module holding copies of given factors.

        Args:
            factors: {proj: {"core": [d_out, d_in], "u_in": [E, d_in, r], "v_in": ..., "u_out": [E, d_out, r],
                "v_out": ...}} for proj in {gate, up, down}; dtype and device taken from the gate core.
            hidden_act: activation of the SwiGLU gate.

        Raises:
            ValueError: shapes disagree between projections or with the (d_out, d_in) layout.
        """
        gate_core = factors["gate"]["core"]
        e = factors["gate"]["u_in"].shape[0]
        i, d = gate_core.shape
        module = cls(e, d, i, {p: factors[p]["u_in"].shape[-1] for p in PROJECTIONS}, hidden_act,
                     dtype=gate_core.dtype, device=gate_core.device)
        with torch.no_grad():
            for p in PROJECTIONS:
                for name, tensor in module.factors(p).items():
                    if tuple(factors[p][name].shape) != tuple(tensor.shape):
                        raise ValueError(f"{p}.{name}: expected shape {tuple(tensor.shape)}, "
                                         f"got {tuple(factors[p][name].shape)}")
                    tensor.copy_(factors[p][name])
        return module

    @classmethod
    def from_dense(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, ranks: dict,
                   hidden_act: str = "silu", init_std: float = 1.0,
                   generator: torch.Generator | None = None) -> "SharedCoreExperts":
        """The "mean" zero-shot start from dense experts (``mean_init`` per projection).

        Args:
            gate_up_proj: [E, 2I, d] fused gate (rows :I) and up (rows I:) weights, transformers >= 5 layout.
            down_proj: [E, d, I].
            ranks: {"gate": r, "up": r, "down": r}.
            generator: optional CPU RNG for V (see ``mean_init``).
        """
        e, two_i, d = gate_up_proj.shape
        i = two_i // 2
        dense = {"gate": gate_up_proj[:, :i], "up": gate_up_proj[:, i:], "down": down_proj}
        module = cls(e, d, i, ranks, hidden_act, init_std, dtype=gate_up_proj.dtype, device=gate_up_proj.device)
        with torch.no_grad():
            for p in PROJECTIONS:
                start = mean_init(dense[p], module.ranks[p], init_std, generator)
                for name, tensor in module.factors(p).items():
                    tensor.copy_(start[name])
        return module

    def reconstruct(self, proj: str, experts: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Dense Ŵ_e = (I + U_out V_outᵀ) C (I + U_in V_inᵀ) for the given experts.

        Args:
            proj: "gate", "up" or "down".
            experts: expert indices (default: all E).

        Returns:
            [len(experts), d_out, d_in] in the parameters' dtype.
        """
        f = self.factors(proj)
        idx = slice(None) if experts is None else torch.as_tensor(experts, device=f["core"].device)
        return reconstruct(f["core"], f["u_in"][idx], f["v_in"][idx], f["u_out"][idx], f["v_out"][idx])

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused dense weights in the transformers >= 5 layout: gate_up_proj [E, 2I, d], down_proj [E, d, I]."""
        return torch.cat([self.reconstruct("gate"), self.reconstruct("up")], dim=1), self.reconstruct("down")

    def core_products(self) -> dict[str, torch.Tensor]:
        """The per-forward products every routed row reuses: (C U_in)ᵀ [E, r, I] for gate and up, (V_outᵀ C)ᵀ
        [E, I, r] for down (absent where the rank is 0). E·d·I·Σr MACs, so at T = 1 (decoding) they would cost
        far more than the tokens: while no gradient is needed they are cached, keyed to the parameters'
        storage and version counters, so any load, optimizer step or in-place edit recomputes them."""
        params = [getattr(self, f"{p}_{n}") for p in PROJECTIONS for n in ("core", "u_in", "v_out")]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in params)
        if not needs_grad and self._products_key == key:
            return self._products
        self._padded_cache.clear()
        products = {p: torch.matmul(getattr(self, f"{p}_u_in").mT, getattr(self, f"{p}_core").t())
                    for p in ("gate", "up") if self.ranks[p] > 0}
        if self.ranks["down"] > 0:
            products["down"] = torch.matmul(self.down_core.t(), self.down_v_out)
        if needs_grad:
            self._products, self._products_key = None, None
        else:
            self._products, self._products_key = {p: t.detach() for p, t in products.items()}, key
        return products

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Same contract as the transformers experts modules.

        Args:
            hidden_states: [T, d].
            top_k_index: [T, k] int64 expert ids; ids outside [0, E) (dropped slots) are ignored.
            top_k_weights: [T, k] routing weights.

        Returns:
            [T, d] = Σ_j w_tj · Ŵ_down,e (act(Ŵ_gate,e x_t) ⊙ Ŵ_up,e x_t), e = top_k_index[t, j].

        ``self.implementation`` picks the kernel: "grouped" (``torch.nn.functional.grouped_mm`` over the rows
        sorted by expert: a fixed number of ops whatever E is), "loop" (one Python iteration per expert, any
        dtype and device) or "auto" (grouped on accelerators whose kernel supports the dtype and layout, the
        loop on CPUs, where it is faster).
        """
        x = hidden_states.to(self.gate_core.dtype)
        if self._use_grouped(x):
            out = self._forward_grouped(x, top_k_index, top_k_weights)
        else:
            out = self._forward_loop(x, top_k_index, top_k_weights)
        return out.to(hidden_states.dtype)

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.implementation == "loop":
            return False
        if self.implementation == "grouped":
            require_grouped_kernel(x, self.hidden_dim, self.intermediate_dim)
            return True
        # auto: on a CPU the loop is faster (each expert's rows stay in cache; measured in bench/experts_forward.py),
        # on an accelerator the fixed op count wins (one kernel launch per product instead of E)
        return x.device.type != "cpu" and grouped_kernel_available(x, self.hidden_dim, self.intermediate_dim)

    def _forward_grouped(self, x: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """All experts at once: the T·k (token, slot) rows sorted by expert, each low-rank product one grouped
        GEMM (``rows_by_expert``: dropped slots exact, rows summed per token in a fixed order)."""
        offs, token, weight, per_token = rows_by_expert(top_k_index, top_k_weights, self.num_experts, x.dtype)
        align = 16 // x.element_size()
        pad = {p: -self.ranks[p] % align for p in PROJECTIONS}

        def gmm(a, b, proj, pad_dim):  # a [N, K] @ b[e] for its group; the rank dimension of b padded with zeros
            if pad[proj]:
                b = self._padded(b, pad[proj], pad_dim)
            return F.grouped_mm(a, b, offs=offs)

        products = self.core_products()
        x_rows = x[token]
        z = {}
        for p in ("gate", "up"):
            y = F.linear(x, getattr(self, f"{p}_core"))[token]  # C x once per token, then per row
            if self.ranks[p] > 0:
                y = y + gmm(gmm(x_rows, getattr(self, f"{p}_v_in"), p, -1), products[p], p, -2)
                y = y + gmm(gmm(y, getattr(self, f"{p}_v_out"), p, -1), getattr(self, f"{p}_u_out").mT, p, -2)
            z[p] = y
        g = self.act_fn(z["gate"]) * z["up"]  # [N, I]
        if self.ranks["down"] > 0:
            g = g + gmm(gmm(g, self.down_v_in, "down", -1), self.down_u_in.mT, "down", -2)
        out = F.linear(per_token(g * weight), self.down_core)  # the down core once per token on Σ_j w_j g_j
        if self.ranks["down"] > 0:
            correction = gmm(gmm(g, products["down"], "down", -1) * weight, self.down_u_out.mT, "down", -2)
            out = out + per_token(correction)
        return out

    def _padded(self, b: torch.Tensor, pad: int, pad_dim: int) -> torch.Tensor:
        """``b`` [E, K, N] with its rank dimension (``pad_dim`` -1 or -2) zero-padded by ``pad``. Padding copies all
        E experts' factors, which at T = 1 costs more than the product itself: while no gradient is needed the
        copy is cached, keyed like ``core_products`` to the source's storage, version, shape and strides, and
        dropped whenever ``core_products`` recomputes (the parameters changed), so it never holds stale copies."""
        spec = (0, pad) if pad_dim == -1 else (0, 0, 0, pad)
        if torch.is_grad_enabled() and b.requires_grad:
            return F.pad(b, spec)
        slot = (b.data_ptr(), b.dtype, b.device, tuple(b.shape), b.stride(), pad, pad_dim)
        hit = self._padded_cache.get(slot)
        if hit is not None and hit[0] == b._version:
            return hit[1]
        padded = F.pad(b.detach(), spec)
        self._padded_cache[slot] = (b._version, padded)
        return padded

    def _forward_loop(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One Python iteration per expert (the reference; any dtype and device)."""
        num_tokens, top_k = top_k_index.shape
        dtype = x.dtype
        r_down = self.ranks["down"]
        products = self.core_products()
        cx = {p: F.linear(x, getattr(self, f"{p}_core")) for p in ("gate", "up")}  # C x, once per token [T, I]

        # Group the T·k (token, slot) pairs by expert; dropped ids sort last. One gather each for x and C x
        # (per-expert gathers would each cost a [T, d] zero-fill in the backward pass).
        flat_expert = top_k_index.reshape(-1)
        flat_expert = torch.where((flat_expert >= 0) & (flat_expert < self.num_experts), flat_expert,
                                  self.num_experts)
        counts = torch.bincount(flat_expert, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        order = torch.argsort(flat_expert, stable=True)[: sum(counts)]
        token = order // top_k
        weight = top_k_weights.reshape(-1)[order].to(dtype).unsqueeze(1)  # [N, 1]
        chunks = zip(token.split(counts), weight.split(counts), x[token].split(counts),
                     cx["gate"][token].split(counts), cx["up"][token].split(counts))

        # Per-expert views via unbind: indexing a parameter as p[e] would cost a full [E, ...] zero-fill per
        # expert in the backward pass, unbind's backward stacks the E gradients once.
        wraps = {p: {"v_in": getattr(self, f"{p}_v_in").unbind(0), "core_u_in_t": products[p].unbind(0),
                     "v_out": getattr(self, f"{p}_v_out").unbind(0), "u_out_t": getattr(self, f"{p}_u_out").mT.unbind(0)}
                 for p in ("gate", "up") if self.ranks[p] > 0}
        if r_down > 0:
            down = {"v_in": self.down_v_in.unbind(0), "u_in_t": self.down_u_in.mT.unbind(0),
                    "v_out_core_t": products["down"].unbind(0), "u_out_t": self.down_u_out.mT.unbind(0)}

        mixed = x.new_zeros(num_tokens, self.intermediate_dim)  # Σ_j w_j g_j, the down core's input
        correction = x.new_zeros(num_tokens, self.hidden_dim)  # Σ_j w_j U_out (V_outᵀ C g_j)
        for e, (token_e, w, x_e, cx_gate, cx_up) in enumerate(chunks):
            if token_e.numel() == 0:
                continue
            z = {}
            for p, y in (("gate", cx_gate), ("up", cx_up)):
                if p in wraps:
                    f = wraps[p]
                    y = y + (x_e @ f["v_in"][e]) @ f["core_u_in_t"][e]  # C (I + U_in V_inᵀ) x
                    y = y + (y @ f["v_out"][e]) @ f["u_out_t"][e]  # (I + U_out V_outᵀ) that
                z[p] = y
            g = self.act_fn(z["gate"]) * z["up"]  # [n_e, I]
            if r_down > 0:
                g = g + (g @ down["v_in"][e]) @ down["u_in_t"][e]  # (I + U_in V_inᵀ) h
                correction.index_add_(0, token_e, ((g @ down["v_out_core_t"][e]) * w) @ down["u_out_t"][e])
            mixed.index_add_(0, token_e, g * w)
        return F.linear(mixed, self.down_core) + correction

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"ranks={self.ranks}, act={self.hidden_act}")

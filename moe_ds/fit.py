"""Zero-shot fit of one (layer, projection): a shared core C and per-expert low-rank wrappers.

Minimises Σ_e ||W_e − Ŵ_e||²_F, Ŵ_e = (I + U_out,e V_out,eᵀ) C (I + U_in,e V_in,eᵀ), by Adam on C and all
wrappers in fp32, from the "mean" start (C = mean expert, U = 0, V ~ N(0, σ²); ``shared_core.mean_init``)
or the "svd" start (closed-form wrappers from truncated SVDs with ridge-regularised solves; ``svd_init``).
``eckart_young_error`` gives the best any rank-2r correction of the same core can do, for comparison.

The "activation" objective (given a whitening S_e per expert and weights w_e) minimises instead
Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F with S_e S_eᵀ = Σ_e, the damped second moment of the projection's inputs that
were routed to expert e: the expected squared output error E_x ||(W_e − Ŵ_e) x||² (plus the damping term),
weighted by how much each expert is used. ``projection_moments``, ``whitening`` and ``expert_weights`` build
S_e and w_e from a calibration folder's layer (format: ``moe_ds.calibrate``); ``weighted_core`` and
``whitened_svd_init`` are the start in the whitened space (SVD-LLM, Wang et al. 2024, truncation-aware data
whitening; D²-MoE, Gu et al. 2025, per-expert whitening); ``output_error`` measures the MoE experts' combined
output error on held-out tokens.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from .lowrank import LowRankExperts
from .shared_core import SharedCoreExperts, mean_init, reconstruct

Init = Literal["mean", "svd"]
Optimizer = Literal["adam", "adamw"]
Weighting = Literal["tokens", "router", "uniform"]
INITS = get_args(Init)
OPTIMIZERS = get_args(Optimizer)
WEIGHTINGS = get_args(Weighting)


@dataclass
class FitConfig:
    init: Init = "mean"  # zero-shot start: "mean" (C = mean expert, U = 0, V ~ N(0, σ²)) or "svd" (closed form)
    steps: int = 1000  # Adam steps (upper bound when tol > 0)
    lr: float = 1e-3  # Adam learning rate
    tol: float = 0.0  # stop when the relative loss improvement over `check_every` steps falls below this
    check_every: int = 50  # steps between convergence checks (and history records)
    init_std: float = 1.0  # σ of V at the mean start
    optimizer: Optimizer = "adam"  # Adam or AdamW
    weight_decay: float = 0.0  # only for adamw
    svd_ridge: float = 1e-2  # λ relative to the mean Gram eigenvalue for the svd init

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.tol < 0 or self.check_every < 1:
            raise ValueError(f"need tol >= 0 and check_every >= 1, got {self.tol}, {self.check_every}")
        if not self.init_std > 0 or not self.svd_ridge > 0:
            raise ValueError(f"init_std and svd_ridge must be > 0, got {self.init_std}, {self.svd_ridge}")


@dataclass
class FitResult:
    factors: dict  # core [d_out, d_in], u_in/v_in [E, d_in, r], u_out/v_out [E, d_out, r], fp32
    rel_error: float  # sqrt(Σ_e ||W_e − Ŵ_e||²) / sqrt(Σ_e ||W_e||²) after the fit
    init_rel_error: float  # the same at the starting point
    steps: int  # Adam steps taken
    seconds: float
    history: list = field(default_factory=list)  # [(step, rel_error)] every check_every steps
    # ||W − Ŵ||_F / ||W||_F (weight space) after the fit; equals rel_error under the weight objective, while
    # rel_error, init_rel_error and history are in the objective's own (whitened, weighted) norm
    weight_rel_error: float | None = None


def weighted_sq_error(w: torch.Tensor, w_hat: torch.Tensor | float = 0.0, whiten: torch.Tensor | None = None,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F, the activation objective (S_e = I and w_e = 1 where not given).

    With S_e S_eᵀ = (1/N_e) Σ_x x xᵀ over N_e inputs this is Σ_e w_e (1/N_e) Σ_x ||(W_e − Ŵ_e) x||², since
    ||A S||²_F = tr(A S Sᵀ Aᵀ).

    Args:
        w, w_hat: [E, d_out, d_in] (w_hat may be 0 for the objective's norm of W); whiten: S [E, d_in, d_in];
            weights: [E].

    Returns:
        A 0-dim tensor in w's dtype.
    """
    diff = w - w_hat
    if whiten is not None:
        diff = diff @ whiten
    per_expert = diff.square().sum((-2, -1))
    return per_expert.sum() if weights is None else (per_expert * weights.to(per_expert.dtype)).sum()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, whiten: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> float:
    """||W − Ŵ||_F / ||W||_F over all experts (one number for the stacked [E, d_out, d_in]); with ``whiten`` S
    [E, d_in, d_in] and/or ``weights`` [E], the same in the activation objective's norm,
    sqrt(Σ_e w_e ||(W_e − Ŵ_e) S_e||² / Σ_e w_e ||W_e S_e||²)."""
    if whiten is None and weights is None:
        return (torch.linalg.vector_norm(w - w_hat) / torch.linalg.vector_norm(w)).item()
    return math.sqrt(weighted_sq_error(w, w_hat, whiten, weights).item()
                     / weighted_sq_error(w, 0.0, whiten, weights).item())


def eckart_young_error(w: torch.Tensor, core: torch.Tensor, rank: int, whiten: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> float:
    """Relative error of the best rank-``rank`` correction of C per expert (truncated SVD of W_e − C).

    With ``whiten`` and/or ``weights``, in the activation objective's norm (``relative_error``): the best
    rank-``rank`` correction X_e of (W_e − C) S_e is its truncated SVD (Eckart–Young–Mirsky), and every
    Ŵ_e S_e − C S_e the wrappers of rank r can reach has rank <= 2r, so this bounds the fit from below.

    Args:
        w: [E, d_out, d_in]; core: [d_out, d_in]; rank: the correction's rank (2r for wrappers of rank r);
        whiten: S [E, d_in, d_in]; weights: [E].
    """
    if whiten is None and weights is None:
        s = torch.linalg.svdvals((w - core).double())  # [E, min(d_out, d_in)]
        tail = s[:, rank:].square().sum()
        return math.sqrt(tail.item()) / torch.linalg.vector_norm(w.double()).item()
    diff = w - core
    s = torch.linalg.svdvals((diff if whiten is None else diff @ whiten).double())
    tail = s[:, rank:].square().sum(-1)
    if weights is not None:
        tail = tail * weights.double()
    return math.sqrt(tail.sum().item() / weighted_sq_error(w, 0.0, whiten, weights).item())


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """(G + λI)⁻¹ rhs by Cholesky, no explicit inverse.

    Args:
        gram: [n, n] (one factorisation shared by every batch of ``rhs``) or [E, n, n].
        rhs: [E, n, m]; lam: λ > 0, a float or [E, 1, 1].
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + lam * eye))


def _ridge_left_solve(a: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(A Aᵀ + λ I)⁻¹ A X for A [E, m, n] and X [E, n, r], with λ = ``ridge`` × the mean eigenvalue of A Aᵀ.

    Through the push-through identity (A Aᵀ + λ I_m)⁻¹ A = A (Aᵀ A + λ I_n)⁻¹ the Gram matrix is built on the
    smaller side: [E, min(m, n)²] instead of [E, m²] (for the down projection of Qwen3-30B-A3B, m = 2048 and
    n = 768: 7× less memory and ~19× fewer Cholesky flops). Same λ in both forms (trace / m), so the result is
    the same up to rounding.
    """
    m, n = a.shape[-2:]
    if m <= n:
        gram = a @ a.transpose(-1, -2)
        lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[:, None, None] / m
        return _ridge_solve(gram, a @ rhs, lam)
    gram = a.transpose(-1, -2) @ a
    lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[:, None, None] / m  # tr(AᵀA) = tr(AAᵀ)
    return a @ _ridge_solve(gram, rhs, lam)


def svd_init(w: torch.Tensor, rank: int, ridge: float) -> dict:
    """The "svd" start: closed-form wrappers from truncated SVDs of the residuals, with C = mean expert.

    1. R_e = W_e − C ≈ P S Qᵀ (rank r); V_in = Q, U_in = Cᵀ (C Cᵀ + λ I)⁻¹ P S (ridge solve, no C⁺; one
       Cholesky factorisation shared by all experts).
    2. W¹_e = C (I + U_in V_inᵀ), W_e − W¹_e ≈ P' S' Q'ᵀ; U_out = P' S'^½,
       V_out = (W¹_e W¹_eᵀ + λ I)⁻¹ W¹_e Q' S'^½ (Gram on the smaller side of W¹_e, see ``_ridge_left_solve``).
    λ = ``ridge`` × the mean eigenvalue of the Gram matrix (Tikhonov).

    Peak memory beside w: about five [E, d_out, d_in] fp32 tensors (``plan.fit_peak_bytes`` models it).

    Args:
        w: [E, d_out, d_in] fp32; rank: r; ridge: relative λ.

    Returns:
        The five factors (see ``FitResult.factors``), fp32 on w.device.
    """
    core = w.mean(0)
    if rank == 0:
        e, d_out, d_in = w.shape
        z = w.new_zeros
        return {"core": core, "u_in": z(e, d_in, 0), "v_in": z(e, d_in, 0), "u_out": z(e, d_out, 0),
                "v_out": z(e, d_out, 0)}
    # 1. input wrapper from the top-r SVD of W_e − C.
    p, s, qh = torch.linalg.svd(w - core, full_matrices=False)
    target = p[..., :rank] * s[:, None, :rank]  # P S [E, d_out, r]
    v_in = qh[:, :rank].transpose(1, 2).contiguous()  # Q [E, d_in, r]
    del p, s, qh
    gram = core @ core.T  # [d_out, d_out], shared by all experts
    lam = ridge * torch.diagonal(gram).mean()
    u_in = core.T @ _ridge_solve(gram, target, lam)  # [E, d_in, r]
    # 2. output wrapper from the top-r SVD of what is left.
    w1 = core + (core @ u_in) @ v_in.transpose(1, 2)
    p2, s2, qh2 = torch.linalg.svd(w - w1, full_matrices=False)
    root = s2[:, :rank].sqrt()
    u_out = (p2[..., :rank] * root[:, None]).contiguous()  # P' S'^½
    x = (qh2[:, :rank].transpose(1, 2) * root[:, None]).contiguous()  # Q' S'^½ [E, d_in, r]
    del p2, s2, qh2
    v_out = _ridge_left_solve(w1, x, ridge)  # (W¹W¹ᵀ + λI)⁻¹ W¹ Q' S'^½ [E, d_out, r]
    return {"core": core, "u_in": u_in, "v_in": v_in, "u_out": u_out, "v_out": v_out}


def projection_moments(layer: dict[str, torch.Tensor], proj: str,
                       shrinkage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert sums M_e = Σ x xᵀ of one projection's inputs, and the tokens behind them, from a calibration layer.

    Gate and up share their input x (the experts module's input); down reads h = act(gate_e x) ⊙ (up_e x).
    Structure "full" stores M_e as is (``gate_up_moment`` / ``down_moment``). Structure "shared_diag" stores one
    sum over all routed (token, expert) pairs and each expert's diagonal; expert e's moment is modelled as

        M_e = D_e^½ ((1 − s) R + s I) D_e^½ = (1 − s) D_e^½ R D_e^½ + s D_e,

    R the correlation matrix of the shared sum, D_e = diag_e and s = ``shrinkage``, so diag(M_e) = diag_e exactly
    for every s (a unit no token ever excited has R's row 0). s = 0 is the format's model: it lends every expert
    the layer's correlations, which on a trained model are not the expert's own (toy teacher: the modelled M_e
    were 27-82 % off the exact ones in Frobenius norm), and the fit trusts them fully. Shrinking R towards the
    identity (Ledoit–Wolf-style, towards each expert's own diagonal) trusts them less: on the toy teacher
    (8 experts, rank 7) the experts' held-out output error was 0.266 at s = 0, 0.141 at 0.25, 0.130 at 0.5, 0.128
    at 0.75, 0.146 at 1 (diagonal only), against 0.223 for the weight objective and 0.059 with the exact
    per-expert moments (structure "full").

    Args:
        layer: the tensors of one calibration layer (``moe_ds.calibrate.load_calibration(...).layer(i)``).
        proj: "gate", "up" or "down".
        shrinkage: s in [0, 1], used for "shared_diag" only.

    Returns:
        (sums [E, n, n] float32, tokens [E] float64) with n = d for gate/up and I for down, on the layer's device.

    Raises:
        KeyError: the layer holds neither structure's tensors.
        ValueError: shrinkage outside [0, 1].
    """
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    prefix = "down" if proj == "down" else "gate_up"
    tokens = layer["tokens"].double()
    if f"{prefix}_moment" in layer:
        return layer[f"{prefix}_moment"].float(), tokens
    shared = layer[f"{prefix}_shared"].double()
    scale = shared.diagonal().clamp_min(0).sqrt()
    corr = shared / (scale[:, None] * scale[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    corr = ((1 - shrinkage) * corr + shrinkage * torch.eye(len(corr), dtype=corr.dtype, device=corr.device)).float()
    root = layer[f"{prefix}_diag"].float().clamp_min(0).sqrt()  # D_e^½ [E, n]
    return root[:, :, None] * corr * root[:, None, :], tokens


def whitening(sums: torch.Tensor, tokens: torch.Tensor, damping: float) -> torch.Tensor:
    """The activation objective's S_e: lower Cholesky factor of the damped second moment of expert e's inputs.

        Σ_e = M_e / n_e + λ · mean(diag(M_e / n_e)) · I,   S_e S_eᵀ = Σ_e,

    so ||A S_e||²_F = E_x ||A x||² + λ · mean(diag) · ||A||²_F for inputs x routed to e. The damping keeps
    Σ_e invertible where the calibration saw fewer tokens than dimensions (and in directions no input used),
    and relative to the mean diagonal it does not depend on the activations' scale. An expert no token was
    routed to uses the layer's average moment Σ_e M_e / Σ_e n_e (the identity when the layer saw no tokens).
    Batched over experts (one ``torch.linalg.cholesky_ex`` call); an expert whose float32 factorisation still
    fails (a singular moment at tiny damping) is retried with extra damping max(λ, 1e-6), raised tenfold at each
    of at most eight retries.

    Args:
        sums: [E, n, n] Σ x xᵀ per expert (float32); tokens: [E] n_e; damping: λ >= 0.

    Returns:
        S [E, n, n] lower-triangular, sums' dtype and device.

    Raises:
        ValueError: damping < 0.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    n = sums.shape[-1]
    count = tokens.to(device=sums.device, dtype=sums.dtype)
    sigma = sums / count.clamp_min(1)[:, None, None]
    unseen = count <= 0
    if unseen.any():
        eye = torch.eye(n, dtype=sums.dtype, device=sums.device)
        sigma[unseen] = sums.sum(0) / count.sum() if count.sum() > 0 else eye
    scale = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero inputs: damping relative to 1
    sigma.diagonal(dim1=-2, dim2=-1).add_((damping * scale)[:, None])
    chol, info = torch.linalg.cholesky_ex(sigma)
    extra = max(damping, 1e-6)
    for _ in range(8):
        bad = info > 0
        if not bad.any():
            break
        sigma.diagonal(dim1=-2, dim2=-1)[bad] += (extra * scale[bad])[:, None]
        extra *= 10
        chol[bad], info[bad] = torch.linalg.cholesky_ex(sigma[bad])
    return chol


def expert_weights(layer: dict[str, torch.Tensor], weighting: Weighting) -> torch.Tensor:
    """The activation objective's w_e: each expert's routing share in a calibration layer, summing to 1.

    Args:
        layer: the tensors of one calibration layer (``tokens`` [E], ``router_weight_sum`` [E]).
        weighting: "tokens" (share of the routed tokens), "router" (share of the routing weight the experts
            received) or "uniform" (1/E). A layer whose counts are all zero falls back to uniform.

    Returns:
        [E] float32.

    Raises:
        ValueError: an unknown weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    counts = layer["tokens"].double()
    if weighting == "router":
        counts = layer["router_weight_sum"].double()
    counts = counts.clamp_min(0)
    if weighting == "uniform" or not counts.sum() > 0:
        counts = torch.ones_like(counts)
    return (counts / counts.sum()).float()


def _weighted_core(w: torch.Tensor, whiten: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    sigma = whiten @ whiten.mT  # Σ_e [E, n, n]
    a = torch.einsum("e,eij->ij", weights, sigma)  # Σ_e w_e Σ_e
    b = torch.einsum("e,eoj->oj", weights, w @ sigma)  # Σ_e w_e W_e Σ_e
    del sigma
    return torch.cholesky_solve(b.T, torch.linalg.cholesky(a)).T  # Σ is symmetric: C A = B  <=>  A Cᵀ = Bᵀ


def weighted_core(w: torch.Tensor, whiten: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The core minimising Σ_e w_e ||(W_e − C) S_e||²_F: the activation objective's "mean expert".

    Setting the gradient 2 Σ_e w_e (C − W_e) Σ_e to zero (Σ_e = S_e S_eᵀ) gives C (Σ_e w_e Σ_e) = Σ_e w_e W_e Σ_e:
    one [n, n] symmetric positive definite system, solved by Cholesky (no inverse). With S_e = I and uniform
    weights it is the mean expert.

    Args:
        w: [E, d_out, n]; whiten: S [E, n, n]; weights: [E] (default uniform), not all zero.

    Returns:
        C [d_out, n] in w's dtype.
    """
    weights = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if weights is None else weights.to(w)
    return _weighted_core(w, whiten, weights)


def whitened_svd_init(w: torch.Tensor, rank: int, ridge: float, whiten: torch.Tensor,
                      weights: torch.Tensor | None = None) -> dict:
    """The "svd" start for the activation objective Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F: ``svd_init`` in the
    whitened space (SVD-LLM, Wang et al. 2024: truncate the SVD of W S, not of W; D²-MoE, Gu et al. 2025: one
    whitening per expert).

    0. C = ``weighted_core`` (the objective's best core with U = 0).
    1. Input wrapper. (W_e − C) S_e ≈ P Σ Qᵀ (rank r); Ŵ¹_e S_e = C S_e + C U_in V_inᵀ S_e reaches it with
       V_inᵀ S_e = Qᵀ, i.e. V_in = S_e⁻ᵀ Q by one triangular solve S_eᵀ V_in = Q, and C U_in ≈ P Σ, whose error in
       the whitened norm is ||C U_in − P Σ||_F (Q has orthonormal columns): the ridge solve of ``svd_init``,
       U_in = Cᵀ (C Cᵀ + λ I)⁻¹ P Σ.
    2. Output wrapper. With A_e = W¹_e S_e = C S_e + C U_in Qᵀ, (W_e − W¹_e) S_e ≈ P' Σ' Q'ᵀ (rank r), and
       U_out V_outᵀ A_e ≈ P' Σ' Q'ᵀ by U_out = P' Σ'^½, V_out = (A_e A_eᵀ + λ I)⁻¹ A_e Q' Σ'^½.
    Nothing is inverted explicitly (Cholesky and triangular solves); with S_e = I it is ``svd_init`` (up to
    rounding). The weights enter through C only: given C each expert's wrappers are its own problem.

    Memory: the start peaks below ``fit_projection``'s Adam loop (see there).

    Args:
        w: [E, d_out, n] fp32; rank: r; ridge: relative λ (``svd_init``); whiten: S [E, n, n] lower-triangular;
        weights: [E] (default uniform).

    Returns:
        The five factors (see ``FitResult.factors``), in w's dtype and device.
    """
    e, d_out, d_in = w.shape
    weights = torch.ones(e, dtype=w.dtype, device=w.device) if weights is None else weights.to(w)
    core = _weighted_core(w, whiten, weights)
    if rank == 0:
        z = w.new_zeros
        return {"core": core, "u_in": z(e, d_in, 0), "v_in": z(e, d_in, 0), "u_out": z(e, d_out, 0),
                "v_out": z(e, d_out, 0)}
    target = w @ whiten  # W_e S_e
    cs = core @ whiten  # C S_e
    # 1. input wrapper from the top-r SVD of (W_e − C) S_e.
    p, s, qh = torch.linalg.svd(target - cs, full_matrices=False)
    lead = p[..., :rank] * s[:, None, :rank]  # P Σ [E, d_out, r]
    q = qh[:, :rank].mT.contiguous()  # Q [E, n, r]
    del p, s, qh
    v_in = torch.linalg.solve_triangular(whiten.mT, q, upper=True)  # S_eᵀ V_in = Q
    gram = core @ core.T
    u_in = core.T @ _ridge_solve(gram, lead, ridge * torch.diagonal(gram).mean())
    del lead
    # 2. output wrapper from the top-r SVD of what is left, in the whitened space.
    cs += (core @ u_in) @ q.mT  # W¹_e S_e
    p2, s2, qh2 = torch.linalg.svd(target - cs, full_matrices=False)
    del target
    root = s2[:, :rank].sqrt()
    u_out = (p2[..., :rank] * root[:, None]).contiguous()  # P' Σ'^½
    x = (qh2[:, :rank].mT * root[:, None]).contiguous()  # Q' Σ'^½ [E, n, r]
    del p2, s2, qh2
    v_out = _ridge_left_solve(cs, x, ridge)
    return {"core": core, "u_in": u_in, "v_in": v_in, "u_out": u_out, "v_out": v_out}


def experts_output(dense: dict[str, torch.Tensor], x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, hidden_act: str = "silu") -> torch.Tensor:
    """The reference forward of a layer's dense SwiGLU experts (as transformers' experts modules compute it).

    Args:
        dense: {"gate": [E, I, d], "up": [E, I, d], "down": [E, d, I]} in any float dtype and device (each
            visited expert's matrices are moved to x's device and dtype in turn).
        x: [T, d]; top_k_index: [T, k] int64 (ids outside [0, E) are dropped slots); top_k_weights: [T, k].
        hidden_act: the gate's activation (``transformers.activations.ACT2FN``).

    Returns:
        [T, d] = Σ_j g_tj · W_down,e (act(W_gate,e x_t) ⊙ W_up,e x_t), e = top_k_index[t, j].
    """
    from transformers.activations import ACT2FN

    act = ACT2FN[hidden_act]
    out = torch.zeros_like(x)
    for e in torch.unique(top_k_index).tolist():  # one iteration per visited expert: a report, not the fit
        if not 0 <= e < dense["gate"].shape[0]:
            continue
        token, slot = torch.where(top_k_index == e)
        xe = x[token]
        mats = {p: dense[p][e].to(device=x.device, dtype=x.dtype) for p in ("gate", "up", "down")}
        h = act(xe @ mats["gate"].T) * (xe @ mats["up"].T)
        out.index_add_(0, token, (h @ mats["down"].T) * top_k_weights[token, slot, None].to(x.dtype))
    return out


def output_error(dense: dict[str, torch.Tensor], factors: dict[str, dict], x: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor, hidden_act: str = "silu") -> float:
    """Relative error of the MoE experts' combined output Σ_j g_j f_{e_j}(x), fitted vs original, on given tokens.

    The fitted side runs the compressed experts module itself (``SharedCoreExperts.forward``, or
    ``LowRankExperts.forward`` for the lowrank and delta forms), so this is the error the compressed model's experts
    make on those tokens (the routing is the original model's).

    Args:
        dense: the original weights (see ``experts_output``).
        factors: per projection, either the shared core's {"core", "u_in", "v_in", "u_out", "v_out"}
            (``FitResult.factors``) or the low-rank forms' {"a", "b"[, "base"]} (``lowrank.LowRankFit.factors``).
        x: [T, d] float32 (the calibration's ``heldout_inputs``); top_k_index: [T, k] int64;
            top_k_weights: [T, k]; hidden_act: the gate's activation.

    Returns:
        ||Ŷ − Y||_F / ||Y||_F (float).

    Raises:
        ValueError: no tokens (T = 0).
    """
    if x.shape[0] == 0:
        raise ValueError("output_error needs at least one token")
    module_cls = SharedCoreExperts if "core" in factors["gate"] else LowRankExperts
    device = next(iter(factors["gate"].values())).device
    x, top_k_index = x.to(device=device, dtype=torch.float32), top_k_index.to(device)
    top_k_weights = top_k_weights.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        y = experts_output(dense, x, top_k_index, top_k_weights, hidden_act)
        module = module_cls.from_factors({p: {k: t.float() for k, t in f.items()} for p, f in factors.items()},
                                         hidden_act)
        y_hat = module(x, top_k_index, top_k_weights)
    return (torch.linalg.vector_norm(y_hat - y) / torch.linalg.vector_norm(y).clamp_min(1e-30)).item()


def fit_projection(w: torch.Tensor, rank: int, cfg: FitConfig, seed: int = 0, progress=None,
                   whiten: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> FitResult:
    """Fit one (layer, projection).

    Without ``whiten`` the weight objective Σ_e ||W_e − Ŵ_e||²_F; with it the activation objective
    Σ_e w_e ||(W_e − Ŵ_e) S_e||²_F: the core of both starts is then ``weighted_core`` (the objective's own mean
    expert), the "svd" start is ``whitened_svd_init``, and Adam minimises that objective divided by
    Σ_e w_e ||W_e S_e||²_F (so its steps do not depend on the scale of the weights or of the inputs). An expert
    of weight 0 (no calibration token routed to it) keeps the wrappers of its start. Peak memory of the activation
    objective: ``plan.fit_peak_bytes`` + 4 · (E·d_out·d_in + E·d_in²) bytes, i.e. one more weight-sized tensor
    (the target W S) and S itself (torch.profiler on CPU: 10.2 against 7.2 weight-sized tensors at E = 16,
    256×512, r = 16, S being 2 of them; 8.6 against 7.1 at 512×256).

    Args:
        w: [E, d_out, d_in] dense expert weights of any float dtype/device; the fit runs in fp32 on w.device.
        rank: wrapper rank r (0 keeps only the core).
        cfg: the fit settings.
        seed: seeds the mean start's V (a CPU generator, so the result does not depend on the device count).
        progress: optional callable(steps_done: int) called every check_every steps (for tqdm).
        whiten: S [E, d_in, d_in] lower-triangular (``whitening``), or None for the weight objective.
        weights: [E] w_e of the activation objective (default uniform); only with ``whiten``.

    Returns:
        FitResult with fp32 factors on w.device; rel_error, init_rel_error and history in the objective's
        norm, weight_rel_error in weight space.

    Raises:
        ValueError: rank outside [0, min(d_out, d_in)], or weights without whiten.
    """
    e, d_out, d_in = w.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} is too large for a {d_out}×{d_in} projection (max {min(d_out, d_in)})")
    if weights is not None and whiten is None:
        raise ValueError("expert weights belong to the activation objective: give whiten too")
    t0 = time.perf_counter()
    w = w.to(torch.float32)
    if whiten is None:
        norm_sq = w.square().sum()
        if cfg.init == "svd":
            start = svd_init(w, rank, cfg.svd_ridge)
        else:
            start = mean_init(w, rank, cfg.init_std, torch.Generator().manual_seed(seed))
        init_err = relative_error(w, reconstruct(**start))
    else:
        whiten = whiten.to(device=w.device, dtype=torch.float32)
        weights = (torch.ones(e, device=w.device) if weights is None else weights.to(w.device, torch.float32))
        if cfg.init == "svd":
            start = whitened_svd_init(w, rank, cfg.svd_ridge, whiten, weights)
        else:
            start = mean_init(w, rank, cfg.init_std, torch.Generator().manual_seed(seed))
            start["core"] = _weighted_core(w, whiten, weights)
        target = w @ whiten  # W_e S_e, the Adam loop's target
        norm_sq = (target.square().sum((-2, -1)) * weights).sum()
        with torch.no_grad():
            init_err = math.sqrt(((target - reconstruct(**start) @ whiten).square().sum((-2, -1)) * weights).sum()
                                 .item() / norm_sq.item())
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    history = [(0, init_err)]
    steps = 0
    if rank > 0 and cfg.steps > 0:
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        kwargs = {"weight_decay": cfg.weight_decay} if cfg.optimizer == "adamw" else {}
        opt = opt_cls(params.values(), lr=cfg.lr, **kwargs)
        last = init_err ** 2
        for steps in range(1, cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            # Normalised so the loss is the squared relative error (Adam's steps do not depend on scale).
            if whiten is None:
                loss = (w - reconstruct(**params)).square().sum() / norm_sq
            else:
                loss = ((target - reconstruct(**params) @ whiten).square().sum((-2, -1)) * weights).sum() / norm_sq
            loss.backward()
            opt.step()
            if steps % cfg.check_every == 0 or steps == cfg.steps:
                current = loss.item()
                history.append((steps, math.sqrt(current)))
                if progress is not None:
                    progress(steps)
                if cfg.tol > 0 and last - current < cfg.tol * last:
                    break
                last = current
    factors = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        w_hat = reconstruct(**factors)
        weight_err = relative_error(w, w_hat)
        if whiten is None:
            err = weight_err
        else:
            err = math.sqrt(((target - w_hat @ whiten).square().sum((-2, -1)) * weights).sum().item()
                            / norm_sq.item())
    return FitResult(factors, err, init_err, steps, time.perf_counter() - t0, history, weight_err)

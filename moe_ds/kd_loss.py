"""Knowledge-distillation loss against a cached teacher top-k, computed in chunks of positions.

    L = (1 - alpha) * CE(student, next tokens) + alpha * tau^2 * KL(p_teacher^tau || p_student^tau)

(Hinton, Vinyals & Dean 2015). The teacher is known only on its top-k ids; ``TAIL_MODES`` names what happens
to its mass outside them (see ``chunked_kd_loss``). No [batch, seq, vocab] teacher tensor is built: one chunk
of student logits is upcast at a time and the analytic gradient is written into one logits-sized buffer.
``full_vocab_kd_loss`` is the textbook loss with the teacher's full logits (tests, bench/kd_loss.py).
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

# "bucket": k + 1 categories, the top-k ids and one bucket for the rest; "renormalize": the teacher on its top-k.
# ("full", the teacher's full logits, is chunked_full_kd_loss's internal mode, not a cache setting.)
TailMode = Literal["bucket", "renormalize"]
TAIL_MODES = get_args(TailMode)
IGNORE_INDEX = -100


@dataclass
class KDLoss:
    """Result of a KD loss: ``loss`` carries the gradient; ``ce`` and ``kl`` are detached, for logging."""

    loss: torch.Tensor  # scalar float32, (1 - alpha) * ce + alpha * tau^2 * kl
    ce: torch.Tensor  # scalar float32, mean next-token cross-entropy (tau = 1), nats
    kl: torch.Tensor  # scalar float32, mean per-position KL at temperature tau, nats (before tau^2)
    num_ce: int  # positions with a CE target
    num_kl: int  # positions with a KL term


def _check(logits, labels, topk_ids, topk_logits, logsumexp, alpha, temperature, tail, attention_mask):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    b, t, v = logits.shape
    if labels.shape != (b, t):
        raise ValueError(f"labels must be {(b, t)}, got {tuple(labels.shape)}")
    k = topk_ids.shape[-1]
    if topk_ids.shape != (b, t, k) or topk_logits.shape != (b, t, k):
        raise ValueError(f"topk_ids/topk_logits must be {(b, t, k)}, got {tuple(topk_ids.shape)} and "
                         f"{tuple(topk_logits.shape)}")
    if logsumexp.shape != (b, t):
        raise ValueError(f"logsumexp must be {(b, t)}, got {tuple(logsumexp.shape)}")
    if attention_mask is not None and attention_mask.shape != (b, t):
        raise ValueError(f"attention_mask must be {(b, t)}, got {tuple(attention_mask.shape)}")
    if not 1 <= k <= v:
        raise ValueError(f"top-k width {k} must be in [1, vocab size {v}]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")


def _targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted CE targets [B*T] (IGNORE_INDEX where none) and the KL position mask [B*T] bool."""
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        valid = attention_mask.bool()
        # A padding position predicts nothing, and nothing is scored against a padding token.
        target = target.masked_fill(~valid, IGNORE_INDEX)
        target[:, :-1] = target[:, :-1].masked_fill(~valid[:, 1:], IGNORE_INDEX)
    else:
        valid = torch.ones_like(labels, dtype=torch.bool)
    return target.reshape(-1), valid.reshape(-1)


def _teacher_coarse_logprobs(topk_logits: torch.Tensor, logsumexp: torch.Tensor, full: bool) -> torch.Tensor:
    """[n, k + 1] float32 teacher log-probabilities at tau = 1 of the k ids and the bucket category.

    ``full`` (k = V): the bucket is empty by definition; float16 rounding of the stored logits would otherwise
    leave a spurious ~1e-4 bucket mass that the student (whose bucket is exactly empty) could never match.
    """
    logp = topk_logits.float() - logsumexp.float().unsqueeze(-1)
    if full:
        bucket = torch.full_like(logp[:, :1], float("-inf"))
    else:
        # log1p(-sum p) keeps precision when the bucket is small; clamp guards float16 rounding (sum p > 1).
        s = logp.exp().sum(-1, keepdim=True).clamp_max(1.0)
        bucket = torch.log1p(-s)
    return torch.cat([logp, bucket], dim=-1)


class _ChunkedKD(torch.autograd.Function):
    """Loss and its gradient w.r.t. the logits in one chunked pass; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, target, kl_mask, topk_ids, topk_logits, logsumexp, alpha, temperature, tail,
                chunk_size):
        n, v = logits.shape
        k = topk_ids.shape[-1] if topk_ids is not None else v
        tau = float(temperature)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        ce_valid = target != IGNORE_INDEX
        num_ce, num_kl = int(ce_valid.sum()), int(kl_mask.sum())
        # Weights of each position's term in the total loss (0 for ignored positions).
        w_ce = (1.0 - alpha) / max(num_ce, 1)
        w_kl = alpha * tau * tau / max(num_kl, 1)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = logits[s:e].float()
            ids = topk_ids[s:e] if topk_ids is not None else None
            tgt, valid, kmask = target[s:e], ce_valid[s:e], kl_mask[s:e]
            # --- cross-entropy at tau = 1: -log softmax(z)_y; d/dz = softmax(z) - onehot(y)
            lse1 = torch.logsumexp(z, dim=-1)
            safe_tgt = tgt.clamp_min(0)
            ce_rows = (lse1 - z.gather(1, safe_tgt[:, None]).squeeze(1)) * valid
            ce_sum += ce_rows.sum(dtype=torch.float64)
            # --- KL at temperature tau
            if tail == "full":  # the teacher's full logits [n, V] arrive in topk_logits (online teacher)
                logq = torch.log_softmax(z / tau, dim=-1)
                logpi = torch.log_softmax(topk_logits[s:e].float() / tau, dim=-1)
                pi = logpi.exp()
                kl_rows = (pi * (logpi - logq)).sum(-1) * kmask
                if need_grad:
                    # d KL / dz = (softmax(z / tau) - softmax(t / tau)) / tau
                    g_kl = logq.exp_().sub_(pi).div_(tau)
            elif tail == "renormalize":
                logq = z / tau
                logq -= torch.logsumexp(logq, dim=-1, keepdim=True)
                logpi = torch.log_softmax(topk_logits[s:e].float() / tau, dim=-1)
                pi = logpi.exp()
                kl_rows = (pi * (logpi - logq.gather(1, ids))).sum(-1) * kmask
                if need_grad:
                    # d KL / dz = (softmax(z / tau) - p_scattered) / tau
                    g_kl = logq.exp_()
                    g_kl.scatter_add_(1, ids, -pi)
            else:
                full = k == v
                logpi = torch.log_softmax(_teacher_coarse_logprobs(topk_logits[s:e], logsumexp[s:e], full) / tau, -1)
                pi = logpi.exp()
                zc = z.scatter(1, ids, float("-inf"))  # student logits outside S
                z_bucket = torch.logsumexp(zc, dim=-1, keepdim=True)  # -inf when S covers the vocabulary
                logr = torch.log_softmax(torch.cat([z.gather(1, ids), z_bucket], dim=-1) / tau, dim=-1)
                kl_rows = torch.where(pi > 0, pi * (logpi - logr), torch.zeros_like(pi)).sum(-1) * kmask
                if need_grad:
                    # d KL / d coarse logit c = (r_c - pi_c) / tau; the bucket's coarse logit is logsumexp over the
                    # complement, whose gradient w.r.t. z_v (v outside S) is softmax over the complement.
                    dc = (logr.exp() - pi) / tau
                    finite = torch.isfinite(z_bucket)
                    g_kl = zc.sub_(torch.where(finite, z_bucket, torch.zeros_like(z_bucket))).exp_()
                    g_kl.mul_(dc[:, k:])
                    g_kl.scatter_(1, ids, dc[:, :k])
            kl_sum += kl_rows.sum(dtype=torch.float64)
            if need_grad:
                if tail == "renormalize":
                    g_kl.div_(tau)
                g = g_kl.mul_((w_kl * kmask)[:, None])
                # CE gradient added in place: softmax(z) * w - w at the target
                p1 = (z - lse1[:, None]).exp_().mul_((w_ce * valid)[:, None])
                g.add_(p1)
                g.scatter_add_(1, safe_tgt[:, None], -(w_ce * valid.float())[:, None])
                grad[s:e] = g
        ce = (ce_sum / max(num_ce, 1)).float()
        kl = (kl_sum / max(num_kl, 1)).float()
        loss = (1.0 - alpha) * ce + alpha * tau * tau * kl  # float32 whatever the logits' dtype
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None, None, None


def chunked_full_kd_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                         alpha: float = 0.5, temperature: float = 1.0, attention_mask: torch.Tensor | None = None,
                         chunk_size: int = 512) -> KDLoss:
    """(1 - alpha) * CE + alpha * tau^2 * KL(softmax(t / tau) || softmax(z / tau)) against the teacher's full
    logits (a live teacher, ``moe_ds.online_teacher``), in the chunked pass of ``chunked_kd_loss``.

    The same loss code as the cached top-k: CE, masks, averaging and the analytic gradient written into one
    logits-sized buffer are shared; only the KL rows differ (the teacher is known on every id, so no tail).
    Equal to ``full_vocab_kd_loss`` and to ``chunked_kd_loss`` with k = V.

    Args:
        logits: [B, T, V] student logits, any float dtype (upcast one chunk at a time).
        labels: [B, T] int64, as in ``chunked_kd_loss``.
        teacher_logits: [B, T, V] teacher logits, any float dtype, no gradient.
        alpha, temperature, attention_mask, chunk_size: as in ``chunked_kd_loss``.

    Returns:
        KDLoss, as ``chunked_kd_loss``.

    Raises:
        ValueError: shapes disagree, alpha outside [0, 1], tau <= 0 or chunk_size < 1.
    """
    if logits.dim() == 3:  # _check: one stand-in top-1 column, only its shape is read
        _check(logits, labels, labels[..., None], logits[..., :1], labels.float(), alpha, temperature, "bucket",
               attention_mask)
    else:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits must have the student logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)} (teacher and student need one vocabulary)")
    b, t, v = logits.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    target, kl_mask = _targets(labels, attention_mask)
    loss, ce, kl = _ChunkedKD.apply(logits.reshape(b * t, v), target, kl_mask, None,
                                    teacher_logits.detach().reshape(b * t, v), None, float(alpha),
                                    float(temperature), "full", int(chunk_size))
    return KDLoss(loss, ce, kl, int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))


def chunked_kd_loss(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                    logsumexp: torch.Tensor, alpha: float = 0.5, temperature: float = 1.0, tail: TailMode = "bucket",
                    attention_mask: torch.Tensor | None = None, chunk_size: int = 512) -> KDLoss:
    """(1 - alpha) * CE + alpha * tau^2 * KL against a cached teacher top-k, chunked over positions.

    CE is the next-token cross-entropy at tau = 1 (position t predicts ``labels[t + 1]``, -100 ignored), averaged
    over its targets; KL is averaged over the positions whose attention mask is 1 (the last one included: the
    teacher's distribution there is about the next token too). The teacher mass outside its top-k ids S:

    - ``"bucket"``: both distributions are coarse-grained to k + 1 categories, the k ids of S and one bucket for
      the rest of the mass. At tau = 1 the teacher's categories are exact (``p_bucket = 1 - sum_S p_i`` from the
      cached logsumexp); for tau != 1 the teacher's bucket at tau is unknowable from the cache, so tau is applied
      to the coarse (k + 1)-category distributions of both models (the bucket treated as one token).
    - ``"renormalize"``: the teacher is ``softmax(t_S / tau)`` on S and 0 elsewhere; the student keeps its full
      distribution, so its mass outside S is penalised through its normaliser.

    With k = V both equal ``full_vocab_kd_loss`` at any tau.

    Args:
        logits: [B, T, V] student logits, any float dtype (upcast to float32 one chunk at a time).
        labels: [B, T] int64 token ids (unshifted: position t is scored against ``labels[t + 1]``); ``-100``
            marks positions without a CE target.
        topk_ids: [B, T, k] int64 teacher top-k ids per position (k <= V).
        topk_logits: [B, T, k] float raw teacher logits at temperature 1.
        logsumexp: [B, T] float32 teacher log-partition over its full vocabulary (used by ``tail="bucket"``).
        alpha: weight of the KL term in [0, 1].
        temperature: tau > 0, applied to both distributions in the KL (CE stays at tau = 1).
        tail: "bucket" or "renormalize", see above.
        attention_mask: [B, T] 1 for real tokens, 0 for padding (no CE and no KL there); None: all real.
        chunk_size: positions processed at once; extra peak memory beyond the [B*T, V] gradient buffer (the
            logits' dtype) ~ 4 * chunk_size * V * 4 bytes.

    Returns:
        KDLoss: ``loss`` (float32 scalar, differentiable w.r.t. ``logits``), ``ce`` and ``kl`` (float32,
        detached), and the counts of CE and KL positions.

    Raises:
        ValueError: shapes disagree, k > V, alpha outside [0, 1], tau <= 0 or an unknown tail mode.
    """
    _check(logits, labels, topk_ids, topk_logits, logsumexp, alpha, temperature, tail, attention_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, v = logits.shape
    target, kl_mask = _targets(labels, attention_mask)
    loss, ce, kl = _ChunkedKD.apply(logits.reshape(b * t, v), target, kl_mask, topk_ids.reshape(b * t, -1),
                                    topk_logits.reshape(b * t, -1), logsumexp.reshape(b * t), float(alpha),
                                    float(temperature), tail, int(chunk_size))
    return KDLoss(loss, ce, kl, int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))


def full_vocab_kd_loss(logits, labels, teacher_logits, alpha=0.5, temperature=1.0, attention_mask=None) -> KDLoss:
    """Classic dense KD with the teacher's full logits: the textbook formula, for tests and the benchmark.

    Args:
        logits: [B, T, V] student logits, any float dtype (computed in float32).
        labels: [B, T] int64, as in ``chunked_kd_loss``.
        teacher_logits: [B, T, V] teacher logits.
        alpha, temperature, attention_mask: as in ``chunked_kd_loss``.

    Returns:
        KDLoss with ``loss = (1 - alpha) * CE + alpha * tau^2 * KL(softmax(t / tau) || softmax(z / tau))``
        (float32 scalars; ``loss`` differentiable through plain autograd).
    """
    b, t, v = logits.shape
    tau = temperature
    target, kl_mask = _targets(labels, attention_mask)
    z = logits.reshape(b * t, v).float()
    logq = torch.log_softmax(z / tau, -1)
    logp = torch.log_softmax(teacher_logits.reshape(b * t, v).float() / tau, -1)
    kl_rows = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    kl = (kl_rows * kl_mask).sum() / kl_mask.sum().clamp_min(1)
    ce = torch.nan_to_num(F.cross_entropy(z, target, ignore_index=IGNORE_INDEX))  # nan: every target ignored
    loss = (1 - alpha) * ce + alpha * tau * tau * kl
    return KDLoss(loss, ce.detach(), kl.detach(), int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))

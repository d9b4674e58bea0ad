"""Knowledge-distillation loss against a cached teacher top-k, computed in chunks of positions.

The loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network") is

    L = (1 - alpha) * CE(student, next tokens) + alpha * tau^2 * KL(p_teacher^tau || p_student^tau)

CE is the next-token cross-entropy at temperature 1 (position t predicts ``labels[t + 1]``, the Hugging Face
convention; ``-100`` is ignored), averaged over its valid targets. KL is averaged over the positions whose
``attention_mask`` is 1: the teacher's distribution at position t is about token t + 1 as well, so the last
position of a packed sequence has a KL term although it has no CE target.

The teacher is known only on its top-k ids S (raw logits t_S and the full-vocabulary log-partition, see
``moe_ds.teacher_cache``). Where the teacher mass outside S goes is the ``tail`` option:

- ``"renormalize"``: the teacher is ``softmax(t_S / tau)`` on S and 0 elsewhere; the student keeps its full
  vocabulary distribution ``softmax(z / tau)``, so student mass outside S is penalised (through the student's
  normaliser) and the KL is an exact KL between two distributions over the vocabulary.
- ``"tail"``: both distributions are coarse-grained to k + 1 categories, the k ids of S and one "tail" category
  holding everything else. At tau = 1 the teacher's categories are exact: ``log p_i = t_i - logsumexp`` and
  ``p_tail = 1 - sum_S p_i`` (from the cached logsumexp); the student's are ``log q_i`` and
  ``log q_tail = logsumexp_{v not in S} z_v - logsumexp_v z_v``. For tau != 1 the cache cannot give the
  teacher's tail at temperature tau (the logits of the ids outside S are unknown), so the temperature is
  applied to the coarse (k + 1)-category distribution of both models: ``softmax(log p_c / tau)`` over the
  categories c. This is exact at tau = 1 and an approximation (the tail treated as a single token) otherwise.
  With k = V the tail is empty for both and the loss is the full-vocabulary loss at any tau.

With k equal to the vocabulary size both options equal the full-vocabulary reference ``full_vocab_kd_loss``
(tested to 1e-5).

Memory: no [batch, seq, vocab] teacher tensor is built. ``chunked_kd_loss`` walks the flattened positions in
chunks of ``chunk_size``, upcasts one chunk of student logits to float32 at a time and writes the analytic
gradient of the loss into one buffer the shape and dtype of the logits (the gradient any loss must hand to
the LM head), so the extra peak memory beyond that buffer is a few ``chunk_size x V`` float32 temporaries
(see bench/kd_loss.py for measured figures).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TAIL_MODES = ("tail", "renormalize")
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
    """[n, k + 1] float32 teacher log-probabilities at tau = 1 of the k ids and the tail category.

    ``full`` (k = V): the tail is empty by definition; float16 rounding of the stored logits would otherwise
    leave a spurious ~1e-4 tail mass that the student (whose tail is exactly empty) could never match.
    """
    logp = topk_logits.float() - logsumexp.float().unsqueeze(-1)
    if full:
        tail = torch.full_like(logp[:, :1], float("-inf"))
    else:
        # log1p(-sum p) keeps precision when the tail is small; clamp guards float16 rounding (sum p > 1).
        s = logp.exp().sum(-1, keepdim=True).clamp_max(1.0)
        tail = torch.log1p(-s)
    return torch.cat([logp, tail], dim=-1)


class _ChunkedKD(torch.autograd.Function):
    """Loss and its gradient w.r.t. the logits in one chunked pass; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, target, kl_mask, topk_ids, topk_logits, logsumexp, alpha, temperature, tail,
                chunk_size):
        n, v = logits.shape
        k = topk_ids.shape[-1]
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
            ids, tgt, valid, kmask = topk_ids[s:e], target[s:e], ce_valid[s:e], kl_mask[s:e]
            # --- cross-entropy at tau = 1: -log softmax(z)_y; d/dz = softmax(z) - onehot(y)
            lse1 = torch.logsumexp(z, dim=-1)
            safe_tgt = tgt.clamp_min(0)
            ce_rows = (lse1 - z.gather(1, safe_tgt[:, None]).squeeze(1)) * valid
            ce_sum += ce_rows.sum(dtype=torch.float64)
            # --- KL at temperature tau
            if tail == "renormalize":
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
                b_tail = torch.logsumexp(zc, dim=-1, keepdim=True)  # -inf when S covers the vocabulary
                logr = torch.log_softmax(torch.cat([z.gather(1, ids), b_tail], dim=-1) / tau, dim=-1)
                kl_rows = torch.where(pi > 0, pi * (logpi - logr), torch.zeros_like(pi)).sum(-1) * kmask
                if need_grad:
                    # d KL / d coarse logit c = (r_c - pi_c) / tau; the tail's coarse logit is logsumexp over the
                    # complement, whose gradient w.r.t. z_v (v outside S) is softmax over the complement.
                    dc = (logr.exp() - pi) / tau
                    finite = torch.isfinite(b_tail)
                    g_kl = zc.sub_(torch.where(finite, b_tail, torch.zeros_like(b_tail))).exp_()
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
        ctx.counts = (num_ce, num_kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None, None, None


def chunked_kd_loss(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                    logsumexp: torch.Tensor, alpha: float = 0.5, temperature: float = 1.0, tail: str = "tail",
                    attention_mask: torch.Tensor | None = None, chunk_size: int = 512) -> KDLoss:
    """(1 - alpha) * CE + alpha * tau^2 * KL against a cached teacher top-k, chunked over positions.

    Args:
        logits: [B, T, V] student logits, any float dtype (upcast to float32 one chunk at a time).
        labels: [B, T] int64 token ids (unshifted: position t is scored against ``labels[t + 1]``); ``-100``
            marks positions without a CE target.
        topk_ids: [B, T, k] int64 teacher top-k ids per position (k <= V).
        topk_logits: [B, T, k] float raw teacher logits at temperature 1.
        logsumexp: [B, T] float32 teacher log-partition over its full vocabulary (used by ``tail="tail"``).
        alpha: weight of the KL term in [0, 1].
        temperature: tau > 0, applied to both distributions in the KL (CE stays at tau = 1).
        tail: "tail" or "renormalize", see the module docstring.
        attention_mask: [B, T] 1 for real tokens, 0 for padding (no CE and no KL there); None: all real.
        chunk_size: positions processed at once; extra peak memory ~ 4 * chunk_size * V * 4 bytes.

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


# ------------------------------------------------------------------------------------------ references

def _ce_reference(logits, labels, attention_mask):
    target, _ = _targets(labels, attention_mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE_INDEX)


def kd_loss_reference(logits, labels, topk_ids, topk_logits, logsumexp, alpha=0.5, temperature=1.0, tail="tail",
                      attention_mask=None) -> KDLoss:
    """Naive dense implementation of ``chunked_kd_loss`` (same arguments and semantics), for tests.

    Builds [B*T, V] float32 tensors with plain autograd; not for production sizes.
    """
    _check(logits, labels, topk_ids, topk_logits, logsumexp, alpha, temperature, tail, attention_mask)
    b, t, v = logits.shape
    tau = temperature
    z = logits.reshape(b * t, v).float()
    ids = topk_ids.reshape(b * t, -1)
    tl = topk_logits.reshape(b * t, -1).float()
    lse = logsumexp.reshape(b * t).float()
    _, kl_mask = _targets(labels, attention_mask)
    in_s = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)
    if tail == "renormalize":
        p = torch.zeros_like(z).scatter(1, ids, torch.softmax(tl / tau, -1))
        logq = torch.log_softmax(z / tau, -1)
        kl_rows = torch.where(p > 0, p * (p.log() - logq), torch.zeros_like(p)).sum(-1)
    else:
        # Coarse categories computed densely: log q over the vocabulary, then the tail by masking.
        logq1 = torch.log_softmax(z, -1)
        q_tail = torch.logsumexp(logq1.masked_fill(in_s, float("-inf")), -1, keepdim=True)
        logp1 = tl - lse[:, None]
        p_tail = (1 - logp1.exp().sum(-1, keepdim=True)).clamp_min(0)
        if ids.shape[-1] == v:
            p_tail = torch.zeros_like(p_tail)
        cp = torch.log_softmax(torch.cat([logp1, p_tail.log()], -1) / tau, -1)
        cq = torch.log_softmax(torch.cat([logq1.gather(1, ids), q_tail], -1) / tau, -1)
        kl_rows = torch.where(cp.exp() > 0, cp.exp() * (cp - cq), torch.zeros_like(cp)).sum(-1)
    kl = (kl_rows * kl_mask).sum() / kl_mask.sum().clamp_min(1)
    ce = _ce_reference(logits, labels, attention_mask)
    ce = torch.nan_to_num(ce)  # all targets ignored
    loss = (1 - alpha) * ce + alpha * tau * tau * kl
    target, _ = _targets(labels, attention_mask)
    return KDLoss(loss, ce.detach(), kl.detach(), int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))


def full_vocab_kd_loss(logits, labels, teacher_logits, alpha=0.5, temperature=1.0, attention_mask=None) -> KDLoss:
    """Classic dense KD with the teacher's full logits: the textbook formula, for tests and the benchmark.

    Args:
        logits: [B, T, V] student logits; teacher_logits: [B, T, V] teacher logits; labels, alpha, temperature,
            attention_mask as in ``chunked_kd_loss``.

    Returns:
        KDLoss with ``loss = (1 - alpha) * CE + alpha * tau^2 * KL(softmax(t / tau) || softmax(z / tau))``.
    """
    b, t, v = logits.shape
    tau = temperature
    _, kl_mask = _targets(labels, attention_mask)
    logq = torch.log_softmax(logits.reshape(b * t, v).float() / tau, -1)
    logp = torch.log_softmax(teacher_logits.reshape(b * t, v).float() / tau, -1)
    kl_rows = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    kl = (kl_rows * kl_mask).sum() / kl_mask.sum().clamp_min(1)
    ce = torch.nan_to_num(_ce_reference(logits, labels, attention_mask))
    loss = (1 - alpha) * ce + alpha * tau * tau * kl
    target, _ = _targets(labels, attention_mask)
    return KDLoss(loss, ce.detach(), kl.detach(), int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))

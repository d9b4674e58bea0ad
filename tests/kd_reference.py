"""Test oracle for ``moe_ds.kd_loss.chunked_kd_loss``: the same loss written densely with plain autograd."""

import torch
import torch.nn.functional as F

from moe_ds.kd_loss import IGNORE_INDEX, KDLoss, _check, _targets


def _ce_reference(logits, labels, attention_mask):
    target, _ = _targets(labels, attention_mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE_INDEX)


def kd_loss_reference(logits, labels, topk_ids, topk_logits, logsumexp, alpha=0.5, temperature=1.0, tail="bucket",
                      attention_mask=None) -> KDLoss:
    """Naive dense implementation of ``chunked_kd_loss`` (same arguments and semantics).

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
        # Coarse categories computed densely: log q over the vocabulary, then the bucket by masking.
        logq1 = torch.log_softmax(z, -1)
        q_bucket = torch.logsumexp(logq1.masked_fill(in_s, float("-inf")), -1, keepdim=True)
        logp1 = tl - lse[:, None]
        p_bucket = (1 - logp1.exp().sum(-1, keepdim=True)).clamp_min(0)
        if ids.shape[-1] == v:
            p_bucket = torch.zeros_like(p_bucket)
        cp = torch.log_softmax(torch.cat([logp1, p_bucket.log()], -1) / tau, -1)
        cq = torch.log_softmax(torch.cat([logq1.gather(1, ids), q_bucket], -1) / tau, -1)
        kl_rows = torch.where(cp.exp() > 0, cp.exp() * (cp - cq), torch.zeros_like(cp)).sum(-1)
    kl = (kl_rows * kl_mask).sum() / kl_mask.sum().clamp_min(1)
    ce = _ce_reference(logits, labels, attention_mask)
    ce = torch.nan_to_num(ce)  # all targets ignored
    loss = (1 - alpha) * ce + alpha * tau * tau * kl
    target, _ = _targets(labels, attention_mask)
    return KDLoss(loss, ce.detach(), kl.detach(), int((target != IGNORE_INDEX).sum()), int(kl_mask.sum()))

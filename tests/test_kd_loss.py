"""Chunked top-k KD loss: equal to the full-vocabulary formula at k = V, to a naive dense reference at k < V,
label shift and padding, gradients, dtypes and argument checks."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from kd_reference import kd_loss_reference
from moe_ds.kd_loss import TAIL_MODES, chunked_kd_loss, full_vocab_kd_loss


def _case(b=2, t=9, v=37, k=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    teacher = torch.randn(b, t, v, generator=g) * 3
    k = v if k is None else k
    vals, ids = teacher.topk(k, dim=-1)
    lse = torch.logsumexp(teacher, -1)
    labels = torch.randint(0, v, (b, t), generator=g)
    return z, teacher, ids, vals, lse, labels


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    out.loss.backward()
    return out, z.grad


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_full_support_equals_full_vocabulary_kd(tail, tau):
    z, teacher, ids, vals, lse, labels = _case()
    mask = torch.ones_like(labels)
    mask[1, -3:] = 0  # right padding
    ours, g_ours = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, alpha=0.7, temperature=tau, tail=tail,
                                                   attention_mask=mask, chunk_size=5), z)
    ref, g_ref = _grad(lambda x: full_vocab_kd_loss(x, labels, teacher, alpha=0.7, temperature=tau,
                                                    attention_mask=mask), z)
    assert ours.kl > 0.5 and ours.ce > 1.0  # a non-trivial case
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.ce, ref.ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.kl, ref.kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)
    assert (ours.num_ce, ours.num_kl) == (2 * 8 - 3, 2 * 9 - 3)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_topk_matches_dense_reference(tail, tau, chunk):
    z, _, ids, vals, lse, labels = _case(k=5, seed=1)
    vals = vals.half().float()  # as stored in the cache
    mask = torch.ones_like(labels)
    mask[0, :2] = 0  # left padding
    labels[1, 4] = -100
    ours, g_ours = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, alpha=0.4, temperature=tau, tail=tail,
                                                   attention_mask=mask, chunk_size=chunk), z)
    ref, g_ref = _grad(lambda x: kd_loss_reference(x, labels, ids, vals, lse, alpha=0.4, temperature=tau, tail=tail,
                                                   attention_mask=mask), z)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.kl, ref.kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)


def test_bucket_category_at_tau_1_is_the_exact_coarse_kl():
    """Independent of the cache's logsumexp path: coarse distributions from the full teacher logits."""
    z, teacher, ids, vals, lse, labels = _case(k=6, seed=2)
    ours = chunked_kd_loss(z, labels, ids, vals, lse, alpha=1.0, temperature=1.0, tail="bucket")
    p, q = teacher.softmax(-1), z.softmax(-1)
    in_s = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    cp = torch.cat([p.gather(-1, ids), (p * ~in_s).sum(-1, keepdim=True)], -1)
    cq = torch.cat([q.gather(-1, ids), (q * ~in_s).sum(-1, keepdim=True)], -1)
    kl = (cp * (cp.log() - cq.log())).sum(-1).mean()
    torch.testing.assert_close(ours.kl, kl, atol=1e-5, rtol=1e-5)
    # Renormalising instead drops the bucket: a different number on the same data.
    ren = chunked_kd_loss(z, labels, ids, vals, lse, alpha=1.0, temperature=1.0, tail="renormalize")
    assert abs(float(ren.kl) - float(ours.kl)) > 1e-2


def test_ce_term_matches_the_models_own_shifted_loss():
    """alpha = 0 leaves the next-token CE, with the same label shift as transformers' loss."""
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    k = 4
    dummy_ids = torch.zeros(2, 12, k, dtype=torch.long) + torch.arange(k)
    ours = chunked_kd_loss(out.logits, ids, dummy_ids, torch.zeros(2, 12, k), torch.zeros(2, 12), alpha=0.0)
    torch.testing.assert_close(ours.loss, out.loss.float(), atol=1e-5, rtol=1e-5)
    assert ours.num_ce == 2 * 11


def test_padding_positions_do_not_count_and_get_no_gradient():
    z, _, ids, vals, lse, labels = _case(k=5, seed=3)
    mask = torch.ones_like(labels)
    mask[0, -4:] = 0
    base, g = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, alpha=0.5, temperature=2.0,
                                              attention_mask=mask, chunk_size=3), z)
    z2, vals2, labels2 = z.clone(), vals.clone(), labels.clone()
    z2[0, -4:] = torch.randn(4, z.shape[-1]) * 5
    vals2[0, -4:] += 3.0
    labels2[0, -4:] = 0  # targets of padded positions (and the one predicting them) are ignored
    other = chunked_kd_loss(z2, labels2, ids, vals2, lse, alpha=0.5, temperature=2.0, attention_mask=mask)
    torch.testing.assert_close(base.loss, other.loss, atol=1e-6, rtol=1e-6)
    assert torch.all(g[0, -4:] == 0) and g[0, :-4].abs().sum() > 0
    # Without the mask the same change does move the loss.
    assert abs(float(chunked_kd_loss(z2, labels2, ids, vals2, lse).loss)
               - float(chunked_kd_loss(z, labels, ids, vals, lse).loss)) > 1e-3


def test_bf16_logits_give_bf16_gradient_close_to_fp32():
    z, _, ids, vals, lse, labels = _case(k=8, seed=4)
    o32, g32 = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, temperature=2.0), z)
    o16, g16 = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, temperature=2.0), z.bfloat16())
    assert g16.dtype == torch.bfloat16 and o16.loss.dtype == torch.float32
    torch.testing.assert_close(o16.loss, o32.loss, atol=0.05, rtol=0.02)
    assert F.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0) > 0.999


def test_no_grad_path_and_loss_scaling():
    z, _, ids, vals, lse, labels = _case(k=5, seed=5)
    with torch.no_grad():
        a = chunked_kd_loss(z, labels, ids, vals, lse, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(a.loss, 0.7 * a.ce + 0.3 * 4.0 * a.kl)
    zr = z.clone().requires_grad_(True)
    (3.0 * chunked_kd_loss(zr, labels, ids, vals, lse, alpha=0.3, temperature=2.0).loss).backward()
    _, g1 = _grad(lambda x: chunked_kd_loss(x, labels, ids, vals, lse, alpha=0.3, temperature=2.0), z)
    torch.testing.assert_close(zr.grad, 3.0 * g1)


def test_tail_modes_are_named_bucket_and_renormalize():
    assert TAIL_MODES == ("bucket", "renormalize")


@pytest.mark.parametrize("kw, match", [
    ({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature"), ({"tail": "drop"}, "tail"),
    ({"tail": "tail"}, "tail"), ({"chunk_size": 0}, "chunk_size")])  # "tail" is the old name of "bucket"
def test_bad_arguments(kw, match):
    z, _, ids, vals, lse, labels = _case(k=5)
    with pytest.raises(ValueError, match=match):
        chunked_kd_loss(z, labels, ids, vals, lse, **kw)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(z, labels[:, :-1], ids, vals, lse)

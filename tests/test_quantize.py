"""moe_ds.quantize: group-wise INT4 / per-channel INT8 values against a plain reference, error bounds, clipping
searches, straight-through fake quantization, and the packed layout against compressed-tensors' own code."""

import math

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from moe_ds.quantize import (QuantizationError, QuantSpec, dequantize, error_bound, fake_quantize, pack, packed_bytes,
                             quantize, unpack)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(w: torch.Tensor, q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain per-group quantization with q's own scales and zero points: (integers, inside-the-range mask, ŵ),
    all [..., N, K], written independently of the module (loops over nothing, broadcasts via repeat_interleave)."""
    k = w.shape[-1]
    g = k // q.scale.shape[-1]
    s = q.scale.float().repeat_interleave(g, -1)
    z = 0.0 if q.zero_point is None else q.zero_point.float().repeat_interleave(g, -1)
    raw = torch.round(w.float() / s) + z
    inside = (raw >= q.spec.qmin) & (raw <= q.spec.qmax)
    ints = raw.clamp(q.spec.qmin, q.spec.qmax)
    return ints, inside, (ints - z) * s


def group_error(w: torch.Tensor, q, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over each group of c_k (w − ŵ)², [..., N, K/g]."""
    err = (dequantize(q, torch.float32) - w.float()).square()
    if weights is not None:
        err = err * weights
    return err.reshape(*w.shape[:-1], q.scale.shape[-1], -1).sum(-1)


# --------------------------------------------------------------------------------------------------- spec

def test_spec_strings_and_named_errors():
    s = QuantSpec.parse("int4-g128")
    assert (s.bits, s.group_size, s.symmetric, s.range, s.scale_dtype) == (4, 128, True, "max", torch.bfloat16)
    assert (s.qmin, s.qmax, s.format) == (-8, 7, "pack-quantized")
    t = QuantSpec.parse("INT8-asymmetric-mse-fp16")
    assert (t.bits, t.group_size, t.symmetric, t.range, t.scale_dtype) == (8, None, False, "mse", torch.float16)
    assert (t.qmin, t.qmax, t.format) == (-128, 127, "int-quantized")
    for text in ("int4-g128", "int8", "int4-g64-asym-mse", "int8-g32-fp32"):
        assert str(QuantSpec.parse(text)) == text and QuantSpec.parse(str(QuantSpec.parse(text))) == QuantSpec.parse(text)
    assert issubclass(QuantizationError, ValueError)
    for bad in ("int3", "fp8-g128", "nf4", "", "int4-g0", "int4-x7", "int4-g128-absmax"):
        with pytest.raises(QuantizationError):
            QuantSpec.parse(bad)
    with pytest.raises(QuantizationError, match="unsupported quantized dtype int2"):
        QuantSpec(bits=2)
    with pytest.raises(QuantizationError, match="does not divide the input dimension K=100"):
        quantize(torch.randn(4, 100), "int4-g128")
    with pytest.raises(QuantizationError, match="does not divide"):
        packed_bytes((128, 1536, 2048), "int4-g48")
    with pytest.raises(QuantizationError, match="floating-point"):
        quantize(torch.ones(4, 8, dtype=torch.int32), "int8")
    with pytest.raises(QuantizationError, match="inf or NaN"):
        quantize(torch.tensor([[0.1, float("nan")]]), "int8")
    with pytest.raises(QuantizationError, match="range 'mse'"):
        quantize(torch.randn(4, 8), "int8", input_scale=torch.ones(8))
    with pytest.raises(QuantizationError, match="input_scale must be"):
        quantize(torch.randn(2, 4, 8), "int8-mse", input_scale=torch.ones(3, 8))
    # the args compressed-tensors' own schema accepts, per group and per channel
    assert QuantizationArgs(**QuantSpec.parse("int4-g128-mse").quantization_args(2048)).group_size == 128
    assert QuantizationArgs(**QuantSpec.parse("int8-asym").quantization_args(2048)).strategy == "channel"


# ------------------------------------------------------------------------------------------ values, bounds

@pytest.mark.parametrize("spec", ["int4-g32", "int4-g64-asym", "int8", "int8-asym", "int4-g32-mse", "int8-g16-fp16"])
@pytest.mark.parametrize("shape", [(24, 128), (3, 24, 128)])
def test_values_match_reference_and_error_within_bound(spec, shape):
    w = torch.randn(shape) * 0.02
    w[..., 0, 5] = 0.3  # an outlier, so "mse" clips somewhere
    q = quantize(w, spec)
    g = QuantSpec.parse(spec).group(128)
    assert q.values.dtype == torch.int8 and q.values.shape == w.shape
    assert q.scale.shape == (*shape[:-1], 128 // g) and q.scale.dtype == QuantSpec.parse(spec).scale_dtype
    assert (q.zero_point is None) == QuantSpec.parse(spec).symmetric
    ints, inside, w_hat = reference(w, q)
    assert torch.equal(q.values.float(), ints)
    assert torch.equal(dequantize(q), w_hat)  # float32 in, float32 out: the same formula exactly
    bound = error_bound(spec, q.scale).repeat_interleave(g, -1)
    err = (w - dequantize(q)).abs()
    assert (err[inside] <= bound[inside] * (1 + 1e-6)).all()
    if q.spec.range == "max" and q.spec.symmetric:
        # scales rounded up to their dtype: nothing clips, every weight within s/2, and s·qmax covers max|w|
        assert inside.all()
        amax = w.reshape(*shape[:-1], -1, g).abs().amax(-1)
        assert (q.scale.float() * q.spec.qmax >= amax).all()
    if q.spec.range == "max":
        assert inside.float().mean() > 0.999
    # int4: per-weight error at most half a step, a step at most max|w|/7 (symmetric) per group
    if q.spec.bits == 4 and q.spec.range == "max" and q.spec.symmetric:
        assert err.max() <= w.abs().max() / 14 * (1 + 1e-2)


def test_mse_never_worse_than_max():
    w = torch.distributions.StudentT(3.0).sample((5, 16, 256)) * 0.01  # heavy tails: clipping pays
    c = torch.rand(256) * 3
    for spec, gain in (("int4-g64", 0.9), ("int4-g128-asym", 0.95), ("int8", 1.0)):  # measured 0.80, 0.91, 1.0
        e_max = group_error(w, quantize(w, spec))
        e_mse = group_error(w, quantize(w, spec + "-mse"))
        assert (e_mse <= e_max).all()
        assert e_mse.sum() <= gain * e_max.sum()
        # the activation-weighted search, on its own objective
        e_max_c = group_error(w, quantize(w, spec), c.square())
        e_mse_c = group_error(w, quantize(w, spec + "-mse", input_scale=c), c.square())
        assert (e_mse_c <= e_max_c).all()


def test_activation_weighted_search_keeps_an_outlier_on_a_busy_channel():
    # Each group: 63 small weights and one large one whose input channel carries 10x the activation RMS.
    # Clipping the large weight lowers the plain squared error but costs 100x in the output error.
    n, k, g = 16, 128, 64
    w = (torch.rand(n, k) * 2 - 1) * 0.3
    w[:, 5], w[:, 70] = 1.0, -1.0
    s = torch.ones(k)
    s[5] = s[70] = 10.0
    plain = quantize(w, f"int4-g{g}-mse")
    aware = quantize(w, f"int4-g{g}-mse", input_scale=s)
    max_scale = quantize(w, f"int4-g{g}").scale
    assert (plain.scale < max_scale).all()  # the plain search clipped every group
    assert torch.equal(aware.scale, max_scale)  # the weighted one kept every outlier
    c = s.square()
    assert (group_error(w, aware, c) <= group_error(w, plain, c)).all()
    assert group_error(w, aware, c).sum() < 0.5 * group_error(w, plain, c).sum()
    assert (group_error(w, plain) <= group_error(w, aware)).all()  # each search wins on its own objective
    # per-expert input scales [E, K] of a 3-D stack: each expert searched with its own
    w3 = torch.stack([w, w])
    s3 = torch.stack([s, torch.ones(k)])
    q3 = quantize(w3, f"int4-g{g}-mse", input_scale=s3)
    assert torch.equal(q3.scale[0], aware.scale) and torch.equal(q3.scale[1], plain.scale)


# ----------------------------------------------------------------------------------- fake quantization, STE

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_forward_equals_real_dequantized_forward(dtype):
    w = (torch.randn(3, 24, 128) * 0.02).to(dtype)
    s = torch.rand(128) + 0.5
    x = torch.randn(7, 128, dtype=dtype)
    for spec, inp in (("int4-g32", None), ("int4-g64-asym-mse", s), ("int8", None), ("int8-asym-mse", None)):
        fq = fake_quantize(w, spec, input_scale=inp)
        dq = dequantize(quantize(w, spec, input_scale=inp))
        assert fq.dtype == dtype and torch.equal(fq, dq)
        assert torch.equal(x @ fq[1].T, x @ dq[1].T)


def test_ste_gradient_is_identity_inside_the_clip_range():
    w = (torch.randn(2, 16, 128) * 0.02).requires_grad_(True)
    r = torch.randn(2, 16, 128)
    (fake_quantize(w, "int4-g32") * r).sum().backward()
    assert torch.equal(w.grad, r)  # range "max" clips nothing: the gradient passes unchanged
    heavy = (torch.distributions.StudentT(2.0).sample((2, 16, 128)) * 0.02).requires_grad_(True)
    (fake_quantize(heavy, "int4-g32-asym-mse") * r).sum().backward()
    _, inside, _ = reference(heavy.detach(), quantize(heavy.detach(), "int4-g32-asym-mse"))
    assert 0 < (~inside).sum() < inside.numel() // 10  # the search clipped some weights
    assert torch.equal(heavy.grad, torch.where(inside, r, 0.0))


# ------------------------------------------------------------------------------------------------- storage

SHAPES = [(13, 64), (3, 13, 64), (5, 9, 36)]  # odd N, odd E, K = 36 not a multiple of 8


@pytest.mark.parametrize("spec", ["int4-g4", "int4-g4-asym", "int4-asym", "int8", "int8-g4-asym"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_round_trip_bit_exact_and_compressed_tensors_layout(spec, shape):
    w = torch.randn(shape) * 0.02
    q = quantize(w, spec)
    d = pack(q)
    for u in (unpack(d, q.shape), unpack(d)):
        assert torch.equal(u.values, q.values) and torch.equal(u.scale, q.scale)
        assert (u.zero_point is None and q.zero_point is None) or torch.equal(u.zero_point, q.zero_point)
        assert (u.spec.bits, u.spec.symmetric, u.spec.scale_dtype) == (q.spec.bits, q.spec.symmetric, q.spec.scale_dtype)
        assert torch.equal(dequantize(u, torch.float32), dequantize(q, torch.float32))
    n, k = shape[-2:]
    if q.spec.bits == 4:
        assert d["weight_packed"].dtype == torch.int32 and d["weight_packed"].shape == (*shape[:-1], math.ceil(k / 8))
        assert torch.equal(d["weight_packed"], pack_to_int32(q.values, 4))  # compressed-tensors' own packer
        assert torch.equal(unpack_from_int32(d["weight_packed"], 4, q.shape), q.values)
        assert d["weight_shape"].tolist() == list(shape)
        if q.zero_point is not None:
            assert torch.equal(d["weight_zero_point"], pack_to_int32(q.zero_point, 4, packed_dim=0))
    else:
        assert d["weight"].dtype == torch.int8 and "weight_packed" not in d
    stored = sum(t.numel() * t.element_size() for name, t in d.items() if name != "weight_shape")
    assert packed_bytes(shape, spec) == stored
    if len(shape) == 3:  # a stack's entries sliced per expert are that expert's own 2-D entries
        e = shape[0] - 1
        per = {name: t[e] for name, t in d.items() if name != "weight_shape"}
        ue = unpack(per, shape[1:])
        assert torch.equal(ue.values, q.values[e]) and torch.equal(ue.scale, q.scale[e])
        assert ue.zero_point is None or torch.equal(ue.zero_point, q.zero_point[e])


@pytest.mark.parametrize("spec", ["int4-g32", "int4-g32-asym", "int4-asym", "int8", "int8-asym", "int8-g64-asym"])
def test_compressed_tensors_decompresses_our_entries(spec):
    w = torch.randn(13, 128) * 0.02
    q = quantize(w, spec)
    s = QuantSpec.parse(spec)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**s.quantization_args(128)))
    compressor = PackedQuantizationCompressor if s.bits == 4 else IntQuantizationCompressor
    out = compressor.decompress(dict(pack(q)), scheme)
    assert torch.equal(out["weight"], dequantize(q, s.scale_dtype))


def test_packed_bytes_by_hand():
    # Qwen3-30B-A3B, one MoE layer: E = 128, d = 2048, I = 768; int4 group 128 with bf16 scales
    e, d, i = 128, 2048, 768
    gate_up = packed_bytes((e, 2 * i, d), "int4-g128")
    down = packed_bytes((e, d, i), "int4-g128")
    assert gate_up == e * 2 * i * d // 2 + e * 2 * i * (d // 128) * 2 == 207_618_048
    assert down == e * d * i // 2 + e * d * (i // 128) * 2 == 103_809_024
    assert gate_up + down == e * 3 * d * i * (0.5 + 2 / 128)  # 0.515625 bytes per weight, 3.88x below bf16
    # asymmetric: 8 zero points per int32 word, packed along N: + 0.5 byte per group of 128
    assert packed_bytes((e, d, i), "int4-g128-asym") == down + e * (d // 8) * (i // 128) * 4
    # the router [E, d] in int8 per output channel: one byte per weight + one bf16 scale per row
    assert packed_bytes((e, d), "int8") == e * d + e * 2 == 262_400
    assert packed_bytes((e, d), "int8-asym-fp32") == e * d + e * 4 + e

"""Quantized expert weights (issue #14): group-wise INT4 / per-channel INT8 values, ranges from max|w|, MSE-optimal
clipping or activation-weighted clipping, straight-through fake quantization for QAT, and compressed-tensors'
packed safetensors layout.

A weight w [..., N, K] (N output rows, K the input dimension; a 3-D stack [E, N, K] is E matrices) is cut along K
into groups of g consecutive weights (g = K: one group per output channel). Each group has a scale s (and, when
asymmetric, an integer zero point z) and stores integers q in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]:

    q = clamp(round(w / s) + z, qmin, qmax)         w ≈ (q - z) · s                   (round half to even)

symmetric (z = 0):   s = α · max|w| / qmax
asymmetric:          lo = α · min(min w, 0), hi = α · max(max w, 0), s = (hi - lo) / (qmax - qmin),
                     z = clamp(round(qmin - lo / s), qmin, qmax)          (compressed-tensors' calculate_qparams)

with α = 1 for range "max" and, for range "mse", the α of {1, 1 - 1/n, ..., 1 - (⌊m·n⌋ - 1)/n} (n = clip_grid,
m = max_shrink; AWQ's auto_clip grid, n = 20, m = 0.5: Lin et al. 2024, llm-awq ``auto_clip_layer``) that
minimises the group's error Σ_k c_k (w_k - (q_k - z)·s)², c_k = 1 or, given the calibration RMS of the input
channels (``input_scale`` s_k = sqrt(E[x_k²])), c_k = s_k²: the output error E[((w - ŵ)·x)²] under a diagonal
second-moment approximation (AWQ-like ranges from activations). α = 1 is tried first and only a strictly lower
error replaces it, so "mse" never does worse than "max" on its own objective. Scales are rounded UP to their
storage dtype (bf16 by default) before the integers are computed, so "max" never clips and dequantize(stored)
reproduces exactly what quantize computed.

Storage (``pack``), in compressed-tensors' formats (the names and layout vLLM loads):
    int4 "pack-quantized": weight_packed int32 [..., N, ⌈K/8⌉] (q + 8 as 4-bit nibbles, element 8j + i in bits
        4i..4i+3 of word j), weight_scale [..., N, K/g] (scale dtype), weight_shape int64 [ndim], and when
        asymmetric weight_zero_point int32 [..., ⌈N/8⌉, K/g] (z + 8 packed the same way along N).
    int8 "int-quantized": weight int8 [..., N, K], weight_scale [..., N, K/g], asymmetric: weight_zero_point int8.
A 3-D stack packs as E independent matrices: ``{name: t[e]}`` is expert e's per-expert 2-D entry.

Library choice (measured November 2026 on this project's 2-core CPU machine, torch 2.13.0+cpu; candidates
installed into the venv with constraints.txt and torch held, ``pip check`` clean):
- torchao 0.18.0 (QAT ``IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=128,
  is_symmetric=True))``): runs on CPU, but on a [128·768, 2048] fp32 tensor forward 6.5 s + backward 4.6 s
  against 2.7 s + 1.6 s for a hand-written straight-through function (bf16: 5.6 + 3.4 s vs 3.6 + 0.8 s); it asserts
  2-D input, computes its own scales (max|w| / 7.5) and takes given scales (MSE or activation-searched) only
  through private functions (``_fake_quantize_affine``); its gradient is g · s · (1/s), exactly g for only 84 %
  of the fp32 weights. Its import also prints failures to load its CUDA extensions. Not added. (``fake_quantize``
  below, chunked over rows, as committed: 3.9 s + 0.9 s fp32, 4.3 s + 1.6 s bf16; ``quantize`` "int4-g128" 3.5 s,
  "int4-g128-mse" 37 s (10 clip ratios), ``pack`` 2.2 s, ``unpack`` 1.4 s, all on the same tensor.)
- torch's own ``torch.fake_quantize_per_channel_affine`` (on [rows·K/g, g]): takes scales, has a mask STE, and on
  CPU equals round(w·(1/s)) exactly (fp32, bf16, fp16), 2.3 + 1.9 s; but its CUDA kernel computes
  nearbyint(w·(1/s) + z) (zero point added before rounding, FMA-contractible), so with zero points it is not
  equal to the stored integers by construction on a GPU. Not used.
- compressed-tensors 0.20.1 (vLLM project; ``pack_to_int32`` / ``unpack_from_int32``, the pack-quantized layout):
  its packers round-trip exactly (int4, 2-D and 3-D, zero points along dim 0) and ``pack`` below is bit-identical
  to them (tests/test_quantize.py checks it, and that its ``PackedQuantizationCompressor.decompress`` reads our
  packed entries back to ``dequantize``'s values); its fake quantization runs under ``torch.no_grad`` (no QAT).
  Packing a [128, 768, 2048] int4 stack took 3.8 s there (a loop over experts) vs 2.2 s here. It is in
  requirements.txt as the format's reference, but this module does not import it: like ``shared_core``, it
  imports only torch and the standard library so it can ship beside a checkpoint for ``trust_remote_code``.
So the values, scales, straight-through function and packer are written here (about 200 lines), and the
compressed-tensors packers and decompressors are the tests' oracle.
"""

import math
import re
from dataclasses import dataclass

import torch

BITS = {"int4": 4, "int8": 8}  # supported value dtypes -> bits
RANGES = ("max", "mse")
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = {4: "pack-quantized", 8: "int-quantized"}  # compressed-tensors' format of each bit width
_CHUNK = 1 << 24  # weights handled per step (bounds each temporary to 64 MB in float32)


class QuantizationError(ValueError):
    """A quantization spec, weight or packed entry that cannot be used (names the value and what is allowed)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized; ``QuantSpec.parse("int4-g128")``.

    String form: the value dtype (``int4`` | ``int8``), then any of ``g<N>`` (group size N along the input dim;
    absent: one group per output channel), ``sym``/``symmetric`` | ``asym``/``asymmetric``, ``max`` | ``mse``
    (range), ``bf16`` | ``fp16`` | ``fp32`` (scale dtype), joined by "-": "int4-g128", "int8",
    "int4-g64-asym-mse". ``str(spec)`` gives the canonical form (defaults omitted); clip_grid and max_shrink are
    not part of it.

    Raises:
        QuantizationError: an unsupported value dtype, an unknown token, a group size below 1, an unknown range
            or scale dtype, clip_grid < 1 or max_shrink outside [0, 1).
    """

    bits: int = 4  # bits per stored value: 4 or 8
    group_size: int | None = None  # weights per scale along the input dim K; None = K (per output channel)
    symmetric: bool = True  # False: integer zero point per group
    range: str = "max"  # "max": s from max|w|; "mse": clip ratio searched per group
    scale_dtype: torch.dtype = torch.bfloat16  # storage dtype of the scales
    clip_grid: int = 20  # mse: clip ratios 1 - i/clip_grid ...
    max_shrink: float = 0.5  # ... for i < floor(max_shrink·clip_grid) (AWQ auto_clip's defaults)

    def __post_init__(self):
        if self.bits not in BITS.values():
            raise QuantizationError(f"unsupported quantized dtype int{self.bits}; supported: {', '.join(BITS)}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantizationError(f"group size must be a positive integer or None, got {self.group_size!r}")
        if self.range not in RANGES:
            raise QuantizationError(f"range must be one of {RANGES}, got {self.range!r}")
        if self.scale_dtype not in SCALE_DTYPES.values():
            raise QuantizationError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype}")
        if self.clip_grid < 1 or not 0 <= self.max_shrink < 1:
            raise QuantizationError(f"clip_grid must be >= 1 and max_shrink in [0, 1), got {self.clip_grid}, "
                                    f"{self.max_shrink}")

    @classmethod
    def parse(cls, text: "str | QuantSpec") -> "QuantSpec":
        """``"int4-g128"`` → QuantSpec(bits=4, group_size=128); a QuantSpec is returned as it is.

        Raises:
            QuantizationError: see the class.
        """
        if isinstance(text, QuantSpec):
            return text
        tokens = [t for t in str(text).strip().lower().split("-") if t]
        if not tokens or tokens[0] not in BITS:
            raise QuantizationError(f"unsupported quantized dtype {tokens[0] if tokens else text!r} in {text!r}; "
                                    f"supported: {', '.join(BITS)} (e.g. int4-g128, int8)")
        fields = {"bits": BITS[tokens[0]]}
        for t in tokens[1:]:
            if re.fullmatch(r"g\d+", t):
                fields["group_size"] = int(t[1:])
            elif t in ("sym", "symmetric", "asym", "asymmetric"):
                fields["symmetric"] = t.startswith("sym")
            elif t in RANGES:
                fields["range"] = t
            elif t in SCALE_DTYPES:
                fields["scale_dtype"] = SCALE_DTYPES[t]
            else:
                raise QuantizationError(f"unknown option {t!r} in quantization spec {text!r}; options: g<N>, "
                                        f"sym|asym, {'|'.join(RANGES)}, {'|'.join(SCALE_DTYPES)}")
        return cls(**fields)

    def __str__(self) -> str:
        parts = [f"int{self.bits}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        if self.range != "max":
            parts.append(self.range)
        if self.scale_dtype != torch.bfloat16:
            parts.append(next(k for k, v in SCALE_DTYPES.items() if v == self.scale_dtype))
        return "-".join(parts)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def format(self) -> str:
        """compressed-tensors' format name of the packed entries: "pack-quantized" (int4), "int-quantized" (int8)."""
        return FORMATS[self.bits]

    def group(self, k: int) -> int:
        """The group size for input dimension ``k`` (k itself when per channel).

        Raises:
            QuantizationError: the group size does not divide k.
        """
        g = k if self.group_size is None else self.group_size
        if k % g:
            raise QuantizationError(f"group size {g} does not divide the input dimension K={k} ({self}); "
                                    f"choose a divisor of {k}")
        return g

    def quantization_args(self, k: int | None = None) -> dict:
        """compressed-tensors' ``QuantizationArgs`` fields of this spec, for a config.json quantization_config
        (``range`` is recorded as the observer: "minmax" or "mse")."""
        per_group = self.group_size is not None and self.group_size != k
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "group" if per_group else "channel", "group_size": self.group_size if per_group else None,
                "observer": "minmax" if self.range == "max" else "mse", "dynamic": False}


@dataclass
class QuantizedTensor:
    """Integer values of a weight [..., N, K] and their group scales (and zero points).

    values:     int8 [..., N, K], in [spec.qmin, spec.qmax]
    scale:      spec.scale_dtype [..., N, K/g]
    zero_point: int8 [..., N, K/g] when asymmetric, else None
    dtype:      the original weight's dtype (what ``dequantize`` returns by default)
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


# ------------------------------------------------------------------------------------------- values and ranges

def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales → ``dtype``, rounded up (never below s; at least the dtype's smallest normal)."""
    s = s.clamp_min(torch.finfo(dtype).tiny)
    r = s.to(dtype)
    return torch.where(r.float() < s, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale (float32 holding scale_dtype values) and zero point (float32 integers or None) of groups whose clip
    range is [lo, hi] (symmetric: hi = max|w|, lo unused)."""
    if spec.symmetric:
        return _round_up(hi / spec.qmax, spec.scale_dtype).float(), None
    s = _round_up((hi - lo) / (spec.qmax - spec.qmin), spec.scale_dtype).float()
    return s, torch.clamp(torch.round(spec.qmin - lo / s), spec.qmin, spec.qmax)


def _quantize_values(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec,
                     mask: bool = False):
    """x float32 [R, G, g], s and z [R, G] → (q float32 integers, clamped; with ``mask`` the bool mask of
    round(x/s) + z inside [qmin, qmax], else None)."""
    q = torch.round(x / s.unsqueeze(-1))
    if z is not None:
        q += z.unsqueeze(-1)
    inside = ((q >= spec.qmin) & (q <= spec.qmax)) if mask else None
    return q.clamp_(spec.qmin, spec.qmax), inside


def _dequantize_values(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """(q - z) · s in float32; q [R, G, g], s and z [R, G]."""
    if z is not None:
        q = q - z.unsqueeze(-1)
    return q * s.unsqueeze(-1)


def _search_qparams(x: torch.Tensor, c: torch.Tensor | None, spec: QuantSpec):
    """Scale and zero point of every group of x float32 [R, G, g] (weights c [R or 1, G, g] in the error)."""
    if spec.symmetric:
        lo, hi = None, x.abs().amax(-1)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    if not torch.isfinite(hi).all() or (lo is not None and not torch.isfinite(lo).all()):
        raise QuantizationError("the weight holds inf or NaN values; they have no quantized form")
    steps = max(1, int(spec.max_shrink * spec.clip_grid)) if spec.range == "mse" else 1
    best = None
    for i in range(steps):
        alpha = 1.0 - i / spec.clip_grid
        s, z = _qparams(None if lo is None else lo * alpha, hi * alpha, spec)
        if steps == 1:
            return s, z
        err = (_dequantize_values(_quantize_values(x, s, z, spec)[0], s, z) - x).square_()
        err = (err if c is None else err.mul_(c)).sum(-1)
        if best is None:
            best, bs, bz = err, s, z
            continue
        better = err < best
        best = torch.where(better, err, best)
        bs = torch.where(better, s, bs)
        bz = None if z is None else torch.where(better, z, bz)
    return bs, bz


def _rows(w: torch.Tensor, spec: QuantSpec, input_scale: torch.Tensor | None):
    """Validate; give (w as [R, K], g, G = K/g, row slice (a, b) → error weights [b − a or 1, G, g] or None,
    the parsed spec)."""
    if not torch.is_tensor(w) or not w.is_floating_point() or w.dim() < 2:
        raise QuantizationError(f"quantize needs a floating-point weight [..., N, K], got "
                                f"{getattr(w, 'dtype', type(w))} of shape {tuple(getattr(w, 'shape', ()))}")
    spec = QuantSpec.parse(spec)
    n, k = w.shape[-2:]
    g = spec.group(k)
    c = None
    if input_scale is not None:
        if spec.range != "mse":
            raise QuantizationError(f"input_scale weights the clipping search of range 'mse'; {spec} has range "
                                    f"{spec.range!r} (add -mse)")
        lead = tuple(w.shape[:-2])
        if input_scale.shape[-1:] != (k,) or tuple(input_scale.shape[:-1]) not in ((), lead):
            raise QuantizationError(f"input_scale must be [K] or [*lead, K] = {[*lead, k]} for a weight of shape "
                                    f"{list(w.shape)}, got {list(input_scale.shape)}")
        s2 = input_scale.detach().to(device=w.device, dtype=torch.float32).square().reshape(-1, k // g, g)
        if not torch.isfinite(s2).all():
            raise QuantizationError("input_scale holds non-finite values")
        c = (lambda a, b: s2) if s2.shape[0] == 1 else (lambda a, b: s2[torch.arange(a, b, device=w.device) // n])
    return w.reshape(-1, k), g, k // g, c, spec


def _chunks(rows: int, k: int):
    step = max(1, _CHUNK // k)
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


@torch.no_grad()
def quantize(w: torch.Tensor, spec: "QuantSpec | str", input_scale: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize a weight (2-D, or a stack [E, N, K] of E matrices) group-wise along its input dim K.

    Args:
        w: float [..., N, K], any device; not modified. Work runs in float32, chunked over rows.
        spec: a QuantSpec or its string ("int4-g128", "int8", "int4-g64-asym-mse", ...).
        input_scale: optional float [K] (or [*w.shape[:-2], K], e.g. [E, I] for per-expert down-projection
            inputs): RMS of each input channel over calibration tokens, sqrt(diag E[xxᵀ]). With range "mse" the
            clip ratio of each group minimises Σ_k s_k²(w_k − ŵ_k)² instead of Σ_k (w_k − ŵ_k)².

    Returns:
        QuantizedTensor (values int8 [..., N, K], scale [..., N, K/g], zero_point int8 or None) on w's device.

    Raises:
        QuantizationError: w is not a float tensor of at least 2 dims or holds inf/NaN; the spec is invalid; the
            group size does not divide K; input_scale has the wrong shape, non-finite values, or comes with range
            "max".

    Formulas: see the module docstring (compressed-tensors' min/max parameters; AWQ's clip grid).
    """
    w2, g, groups, c, spec = _rows(w, spec, input_scale)
    rows = w2.shape[0]
    values = torch.empty(w2.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows, groups, dtype=spec.scale_dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty(rows, groups, dtype=torch.int8, device=w.device)
    for a, b in _chunks(rows, w2.shape[1]):
        x = w2[a:b].float().view(b - a, groups, g)
        s, z = _search_qparams(x, None if c is None else c(a, b), spec)
        values[a:b] = _quantize_values(x, s, z, spec)[0].view(b - a, -1).to(torch.int8)
        scale[a:b] = s.to(spec.scale_dtype)
        if zero is not None:
            zero[a:b] = z.to(torch.int8)
    lead = w.shape[:-1]
    return QuantizedTensor(values.view(w.shape), scale.view(*lead, groups),
                           None if zero is None else zero.view(*lead, groups), spec, w.dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ŵ = (values − zero_point) · scale, computed in float32 and cast once.

    Args:
        q: a QuantizedTensor. dtype: output dtype (default q.dtype, the original weight's).

    Returns:
        [..., N, K] in ``dtype`` on q's device.
    """
    k = q.values.shape[-1]
    groups = q.scale.shape[-1]
    x = q.values.reshape(-1, groups, k // groups).float()
    z = None if q.zero_point is None else q.zero_point.reshape(-1, groups).float()
    out = _dequantize_values(x, q.scale.reshape(-1, groups).float(), z)
    return out.to(dtype or q.dtype).view(q.values.shape)


class _FakeQuantize(torch.autograd.Function):
    """Forward: dequantize(quantize(w)) by the same functions; backward: straight-through, g · [inside the clip
    range] (the round's derivative taken as 1, the clamp's as its mask; Bengio et al. 2013, as in
    torch.fake_quantize_per_channel_affine). The mask (1 byte per weight) is the only tensor kept."""

    @staticmethod
    def forward(ctx, w, spec, input_scale):
        w2, g, groups, c, spec = _rows(w, spec, input_scale)
        out = torch.empty(w2.shape, dtype=w.dtype, device=w.device)
        mask = torch.empty(w2.shape, dtype=torch.bool, device=w.device)
        for a, b in _chunks(w2.shape[0], w2.shape[1]):
            x = w2[a:b].detach().float().view(b - a, groups, g)
            s, z = _search_qparams(x, None if c is None else c(a, b), spec)
            q, inside = _quantize_values(x, s, z, spec, mask=True)
            out[a:b] = _dequantize_values(q, s, z).view(b - a, -1).to(w.dtype)
            mask[a:b] = inside.view(b - a, -1)
        ctx.save_for_backward(mask.view(w.shape))
        return out.view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None


def fake_quantize(w: torch.Tensor, spec: "QuantSpec | str", input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize in the forward, straight-through gradient in the backward (quantization-aware training).

    The forward equals ``dequantize(quantize(w, spec, input_scale))`` exactly (same functions, ranges recomputed
    from the current w at every call, no gradient through the scales); the gradient to w is the incoming
    gradient where round(w/s) + z lies in [qmin, qmax] and 0 where the weight was clipped (all weights under
    range "max").

    Args:
        w: float [..., N, K] (a parameter or any tensor requiring grad). spec, input_scale: as ``quantize``.

    Returns:
        [..., N, K] in w's dtype and device. Keeps a bool mask [..., N, K] for the backward.

    Raises:
        QuantizationError: as ``quantize``.
    """
    return _FakeQuantize.apply(w, QuantSpec.parse(spec), input_scale)


def error_bound(spec: "QuantSpec | str", scale: torch.Tensor) -> torch.Tensor:
    """Largest |w − ŵ| of a weight inside its group's clip range: s/2 (round to nearest; symmetric or not), plus
    the rounding of the output dtype when ŵ is not float32.

    Args:
        spec: the spec the scales came from (validated). scale: [..., N, K/g] from ``quantize``.

    Returns:
        float32 [..., N, K/g]: the bound of each group's weights.
    """
    QuantSpec.parse(spec)
    return scale.float() / 2


# ---------------------------------------------------------------------------------------------------- storage

def _pack_int4(v: torch.Tensor, dim: int) -> torch.Tensor:
    """int8 values in [-8, 7] → int32, 8 per word along ``dim`` (-1 or -2), low nibble first, stored as v + 8."""
    v = v.transpose(-1, -2) if dim == -2 else v
    n = v.shape[-1]
    u = torch.nn.functional.pad(v.to(torch.int32) + 8, (0, (-n) % 8)).view(*v.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=v.device)
    words = (u << shifts).sum(-1, dtype=torch.int32)  # disjoint nibbles: the sum is a bitwise or
    return (words.transpose(-1, -2) if dim == -2 else words).contiguous()


def _unpack_int4(p: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Inverse of _pack_int4: int32 words → int8 [..., n] along ``dim``."""
    p = p.transpose(-1, -2) if dim == -2 else p
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=p.device)
    v = ((p.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)[..., :n].to(torch.int8) - 8
    return (v.transpose(-1, -2) if dim == -2 else v).contiguous()


def pack(q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Storage entries of one quantized weight in compressed-tensors' layout (see the module docstring).

    Args:
        q: a QuantizedTensor of shape [..., N, K].

    Returns:
        int4: {"weight_packed": int32 [..., N, ⌈K/8⌉], "weight_scale": [..., N, K/g], "weight_shape": int64 [ndim]}
        plus "weight_zero_point": int32 [..., ⌈N/8⌉, K/g] when asymmetric;
        int8: {"weight": int8 [..., N, K], "weight_scale": [..., N, K/g]} plus "weight_zero_point": int8
        [..., N, K/g] when asymmetric. Contiguous, on q's device.
    """
    if q.spec.bits == 4:
        out = {"weight_packed": _pack_int4(q.values, -1), "weight_scale": q.scale.contiguous(),
               "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        if q.zero_point is not None:
            out["weight_zero_point"] = _pack_int4(q.zero_point, -2)
        return out
    out = {"weight": q.values.contiguous(), "weight_scale": q.scale.contiguous()}
    if q.zero_point is not None:
        out["weight_zero_point"] = q.zero_point.contiguous()
    return out


def unpack(d: dict, shape=None, dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Read ``pack``'s entries (or compressed-tensors' of one weight) back into a QuantizedTensor.

    The spec is rebuilt from the entries: bits from the key (weight_packed: int4, weight: int8), group size
    K / scale.shape[-1] (None when one group per row), symmetric unless a zero point is present, scale dtype from
    the scale; range is not stored ("max").

    Args:
        d: the entries. shape: [..., N, K] of the weight (default: weight_shape, or the int8 weight's shape).
        dtype: the QuantizedTensor's dtype (dequantize's default output), default the scale's dtype.

    Raises:
        QuantizationError: neither weight_packed nor int8 weight present, or shapes that do not fit each other.
    """
    scale, zp = d.get("weight_scale"), d.get("weight_zero_point")
    if scale is None or ("weight_packed" in d) == ("weight" in d):
        raise QuantizationError(f"packed entries need weight_scale and one of weight_packed / weight, got {sorted(d)}")
    if shape is None:
        shape = d["weight_shape"].tolist() if "weight_packed" in d else d["weight"].shape
    shape = torch.Size([int(x) for x in shape])
    n, k = shape[-2:]
    groups = scale.shape[-1]
    if tuple(scale.shape) != (*shape[:-1], groups) or groups < 1 or k % groups:
        raise QuantizationError(f"weight_scale {list(scale.shape)} does not fit a weight of shape {list(shape)}")
    if "weight_packed" in d:
        values = _unpack_int4(d["weight_packed"], k, -1)
        zero = None if zp is None else _unpack_int4(zp, n, -2)
        bits = 4
    else:
        values, zero, bits = d["weight"], zp, 8
    if values.shape != shape or values.dtype != torch.int8:
        raise QuantizationError(f"packed values give {values.dtype} {list(values.shape)}, expected int8 {list(shape)}")
    spec = QuantSpec(bits=bits, group_size=None if groups == 1 else k // groups, symmetric=zero is None,
                     scale_dtype=scale.dtype)
    return QuantizedTensor(values, scale, zero, spec, dtype or scale.dtype)


def packed_bytes(shape, spec: "QuantSpec | str") -> int:
    """Exact bytes of ``pack``'s values, scales and zero points for a weight of ``shape`` (weight_shape, 8 bytes
    per dim of each stored tensor, is metadata and not counted).

    Per matrix [N, K] with G = K/g groups per row and b_s bytes per scale:
        int4: N·⌈K/8⌉·4 + N·G·b_s (+ ⌈N/8⌉·G·4 asymmetric)   — 0.5 + b_s/g bytes per weight when 8 | K
        int8: N·K + N·G·b_s (+ N·G asymmetric)
    times the number of matrices, prod(shape[:-2]).

    Raises:
        QuantizationError: an invalid spec or a group size that does not divide K.
    """
    spec = QuantSpec.parse(spec)
    *lead, n, k = (int(x) for x in shape)
    groups = k // spec.group(k)
    scale_bytes = torch.finfo(spec.scale_dtype).bits // 8
    if spec.bits == 4:
        per = n * math.ceil(k / 8) * 4 + n * groups * scale_bytes
        per += 0 if spec.symmetric else math.ceil(n / 8) * groups * 4
    else:
        per = n * k + n * groups * scale_bytes + (0 if spec.symmetric else n * groups)
    return math.prod(lead) * per


"""Quantization-aware training (issue #14): fake quantization of the experts and routers inside their forwards.

A distillation stage with ``"quantization": {"experts": "int4-g128", "router": "int8"}`` trains the student with
every expert weight and router weight replaced, in the forward, by ``moe_ds.quantize.fake_quantize`` of it: the
forward sees dequantize(quantize(w)), the backward passes the gradient straight through to the latent
full-precision weight w (Bengio et al. 2013; Jacob et al. 2018 for fake quantization in training), which the
optimizer updates.

Which tensors (``target_kind``, one rule for in-memory parameter names and on-disk keys):
- experts: every parameter of each MoE block's experts module: stock fused ``gate_up_proj [E, 2I, d]`` and
  ``down_proj [E, d, I]`` (on disk per expert ``gate_proj`` / ``up_proj [I, d]``, ``down_proj [d, I]``),
  shared-core ``*_core``, ``*_u_in``, ``*_v_in``, ``*_u_out``, ``*_v_out``, low-rank ``*_a``, ``*_b``, ``*_base``;
- router: the MoE block's ``gate.weight [E, d]`` (not DeepSeek-V3's ``e_score_correction_bias``, not Qwen2-MoE's
  ``shared_expert_gate``).
Each is quantized with groups along a model dimension, exactly as ``moe_ds.quantized_checkpoint`` stores it: along
the last dimension (``moe_ds.quantize``: [..., N, K], groups along K), except the factors whose last axis is the
rank (shared-core ``*_u_in``/``*_v_in``/``*_u_out``/``*_v_out``, low-rank ``*_a``:
``quantized_checkpoint.is_transposed``), quantized as their transpose [E, r, d_x]
(``quantized_checkpoint.fake_quantize_as_stored``). Rows are independent, so the fused ``gate_up_proj`` rows give exactly the
values of its gate and up halves quantized as [E, I, d] each, and the per-expert on-disk matrices exactly the
values of the fused stack's slices.

Why a wrapped forward (measured under the 2-rank ZeRO-3 launcher, tests/test_qat.py): ZeRO-3 holds a module's
parameters whole only between its pre- and post-forward hooks, so the quantization must run inside the module's
forward, where the full gathered weight is there to take group ranges from. ``FakeQuantization`` replaces the
module's ``forward`` (an instance attribute, under the hooks ``Module.__call__`` runs) by one that swaps each
target parameter for its fake-quantized tensor in ``module._parameters`` for the duration of the original forward
and restores it after. torch.nn.utils.parametrize is not used: it moves the parameter into a child module
(ZeRO-3 would gather it around that child's forward, which is never called) and evaluates the parametrization
at registration, when the parameter is an empty partition. When gradients are on, the experts' forward runs under
non-reentrant activation checkpointing: otherwise autograd would keep every layer's fake-quantized expert stack
(and its clip mask) until the backward, a full unpartitioned copy of all experts; recomputed, it lives only
inside the module's forward and its backward (where ZeRO-3 has gathered the parameters again).

At the end of a QAT stage (``moe_ds.distill_trainer.CheckpointCallback``) the final checkpoint is written twice:
``<output>/quantized-<step>/`` by ``quantize_checkpoint`` from the latent weights (packed int4/int8, the same
values as the training forward), then ``checkpoint-<step>``'s own weights are replaced by their fake-quantized
values (``fake_quantize_checkpoint``), so the next stage (pruning, plain distillation) and the evaluator start from
the quantized model's weights in full precision. Checkpoints inside the stage hold the latent weights.
"""

import contextlib
import math
import os
import re
from pathlib import Path

import torch

from .distill_config import QATConfigError
from .quantize import QuantizationError, QuantSpec, dequantize, quantize
from .modeling_shared_core import base_model_type
from .quantized_checkpoint import fake_quantize_as_stored, is_transposed

QUANTIZED_PREFIX = "quantized-"  # <output>/quantized-<step>/: the really quantized end of a QAT stage
KINDS = ("experts", "router")


def _patterns(model_type: str) -> dict[str, re.Pattern]:
    from .arch import get_architecture

    arch = get_architecture(base_model_type(model_type))
    block = re.escape(arch.moe_block)
    return {"experts": re.compile(rf"\.{block}\.{re.escape(arch.experts)}\.[^.]+(\.weight)?$|"
                                  rf"\.{block}\.{re.escape(arch.experts)}\.\d+\.[^.]+\.weight$"),
            "router": re.compile(rf"\.{block}\.{re.escape(arch.router)}\.weight$")}


def target_kind(name: str, model_type: str) -> str | None:
    """"experts", "router" or None for a parameter name or an on-disk key (``arch.disk_to_memory`` applied);
    ``model_type`` may be stock, ``shared_core_<family>`` or ``quantized_<family>``.

    Raises:
        moe_ds.arch.UnsupportedModelError: model_type is not a supported MoE family.
    """
    from .arch import get_architecture

    name = get_architecture(base_model_type(model_type)).disk_to_memory(name)
    for kind, rx in _patterns(model_type).items():
        if rx.search(name):
            return kind
    return None


def parse_quantization(value, where: str = "") -> dict[str, str | None] | None:
    """A stage's ``quantization`` setting as {"experts": spec or None, "router": spec or None} (canonical specs).

    Args:
        value: None, or a mapping with keys among "experts" and "router", each a ``QuantSpec`` string or None.
        where: prefix of error messages (e.g. "stage 'qat'").

    Raises:
        QATConfigError: not a mapping, an unknown key, a spec ``QuantSpec.parse`` refuses, or nothing quantized.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise QATConfigError(f"{where}quantization must be a mapping like {{\"experts\": \"int4-g128\", \"router\": "
                             f"\"int8\"}}, got {value!r}")
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise QATConfigError(f"{where}quantization has unknown keys {unknown}; allowed: {list(KINDS)}")
    out = {}
    for kind in KINDS:
        spec = value.get(kind)
        if spec in (None, "none", ""):
            out[kind] = None
            continue
        try:
            out[kind] = str(QuantSpec.parse(spec))
        except QuantizationError as e:
            raise QATConfigError(f"{where}quantization.{kind}: {e}") from None
    if out["experts"] is None and out["router"] is None:
        raise QATConfigError(f"{where}quantization quantizes nothing (experts and router are both none)")
    return out


def parse_quantization_flag(text: str) -> dict[str, str | None]:
    """``--quantization``: "SPEC" (experts SPEC, router int8) or "experts=SPEC,router=SPEC|none", as
    ``parse_quantization``'s result.

    Raises:
        QATConfigError: an item without "=" after the first, a repeated or unknown key, or a bad spec.
    """
    text = str(text).strip()
    if "=" not in text:
        return parse_quantization({"experts": text, "router": "int8"}, "--quantization: ")
    value = {}
    for item in text.split(","):
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or key in value:
            raise QATConfigError(f"--quantization is SPEC or experts=SPEC,router=SPEC|none, got {text!r}")
        value[key] = spec.strip()
    return parse_quantization(value, "--quantization: ")


def check_shapes(named_shapes, quantization: dict, model_type: str, where: str = "") -> int:
    """Refuse a group size that does not divide the last dimension of a tensor it would quantize.

    Args:
        named_shapes: (parameter name, shape) pairs of the student (e.g. from a meta-device model).
        quantization: ``parse_quantization``'s result.

    Returns:
        The number of tensors the stage fake-quantizes.

    Raises:
        QATConfigError: names the tensor, its shape and the spec; or no tensor matches (not a MoE student).
    """
    count = 0
    for name, shape in named_shapes:
        kind = target_kind(name, model_type)
        spec = quantization.get(kind) if kind is not None else None
        if spec is None or len(shape) < 2:
            continue
        try:
            QuantSpec.parse(spec).group(int(shape[-2] if is_transposed(name) else shape[-1]))
        except QuantizationError as e:
            raise QATConfigError(f"{where}{kind} {spec} cannot quantize {name} {list(shape)}: {e}") from None
        count += 1
    if count == 0:
        raise QATConfigError(f"{where}quantization {quantization} matches no expert or router weight of the student")
    return count


@contextlib.contextmanager
def _swapped(module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    saved = {n: module._parameters[n] for n in tensors}
    try:
        module._parameters.update(tensors)
        yield
    finally:
        module._parameters.update(saved)


class FakeQuantization:
    """Fake quantization of a model's expert and router weights inside their modules' forwards (see the module).

    Args:
        model: a supported MoE causal LM (stock, shared-core or low-rank experts); ZeRO-3 partitioned or not.
        experts, router: ``QuantSpec`` strings (None: not quantized).
        recompute: when gradients are on, run the experts' forward under non-reentrant activation checkpointing
            (the fake-quantized stacks are not kept for the backward).

    ``error()`` gives ||w − q(w)|| / ||w|| over all fake-quantized expert (and router) weights of the latest
    forward of each module; ``remove()`` restores the original forwards.

    Raises:
        QATConfigError: nothing to quantize in the model.
        moe_ds.quantize.QuantizationError: (in the forward) a group size that does not divide a weight's last dim.
    """

    def __init__(self, model: torch.nn.Module, experts: str | None = "int4-g128", router: str | None = "int8",
                 recompute: bool = True):
        specs = {"experts": None if experts is None else QuantSpec.parse(experts),
                 "router": None if router is None else QuantSpec.parse(router)}
        model_type = model.config.model_type
        owners: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # module -> (kind, [(attribute, name)])
        for name, p in model.named_parameters():
            kind = target_kind(name, model_type)
            if kind is None or specs[kind] is None or len(getattr(p, "ds_shape", p.shape)) < 2:
                continue
            owner, _, attr = name.rpartition(".")
            owners.setdefault(owner, (kind, []))[1].append((attr, name))
        if not owners:
            raise QATConfigError(f"{model_type}: no expert or router weight to fake-quantize")
        self.specs, self.recompute = specs, recompute
        self._stats: dict[str, tuple[str, torch.Tensor]] = {}  # owner -> (kind, [err², w²] of its last forward)
        self._installed = []
        for owner, (kind, names) in owners.items():
            module = model.get_submodule(owner)
            original = module.forward
            module.forward = self._wrap(owner, module, original, kind, names)
            self._installed.append((module, original))
        self.num_tensors = sum(len(n) for _, n in owners.values())

    def _wrap(self, owner: str, module, original, kind: str, targets: list[tuple[str, str]]):
        """``targets``: (attribute, full parameter name: what decides the stored orientation)."""
        spec = self.specs[kind]
        names = [n for n, _ in targets]

        def run(*args, **kwargs):
            ws = {n: module._parameters[n] for n in names}
            fq = {n: fake_quantize_as_stored(full, ws[n], spec) for n, full in targets}
            with torch.no_grad():
                sums = torch.zeros(2, dtype=torch.float64, device=next(iter(ws.values())).device)
                for n, w in ws.items():
                    sums[0] += (w.detach().float() - fq[n].detach().float()).pow(2).sum().double()
                    sums[1] += w.detach().float().pow(2).sum().double()
                self._stats[owner] = (kind, sums)
            with _swapped(module, fq):
                return original(*args, **kwargs)

        def forward(*args, **kwargs):
            grads = torch.is_grad_enabled() and any(module._parameters[n].requires_grad for n in names)
            if kind == "experts" and self.recompute and grads:
                from torch.utils.checkpoint import checkpoint

                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return forward

    def error(self) -> dict[str, float]:
        """{"experts": ||w − q(w)|| / ||w||, "router": ...} over the latest forward of each fake-quantized module
        (kinds that are not quantized or not run yet are left out). No communication: under ZeRO-3 every rank saw
        the same gathered weights."""
        out = {}
        for kind in KINDS:
            sums = [s for k, s in self._stats.values() if k == kind]
            if sums:
                total = torch.stack(sums).sum(0).cpu()
                out[kind] = math.sqrt(float(total[0])) / max(math.sqrt(float(total[1])), 1e-30)
        return out

    def remove(self) -> None:
        """Restore every wrapped module's own forward."""
        for module, original in self._installed:
            if module.__dict__.get("forward") is not None:
                del module.forward
            if module.forward != original:  # a forward that was itself an instance attribute
                module.forward = original
        self._installed = []


@torch.no_grad()
def fake_quantize_tensor(w: torch.Tensor, spec: str, transpose: bool = False) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype: the forward of ``fake_quantize``, without autograd; ``transpose``:
    groups along the second-to-last dimension (w quantized as its transpose).

    Raises:
        moe_ds.quantize.QuantizationError: see ``moe_ds.quantize.quantize``.
    """
    if transpose:
        return dequantize(quantize(w.mT, spec), w.dtype).mT.contiguous()
    return dequantize(quantize(w, spec), w.dtype)


def fake_quantize_checkpoint(path: str | Path, quantization: dict, model_type: str) -> int:
    """Replace, in place, every expert/router weight of a checkpoint folder's safetensors by its fake-quantized value.

    The same tensors and rule as ``FakeQuantization`` (on-disk keys through ``target_kind``); each file is written
    to a temporary name and renamed over the original (metadata kept).

    Args:
        path: a checkpoint folder (``*.safetensors``, with an index or not).
        quantization: ``parse_quantization``'s result.
        model_type: the checkpoint's ``config.model_type``.

    Returns:
        The number of tensors replaced.

    Raises:
        QATConfigError: no tensor of the checkpoint is an expert or router weight.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    count = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        changed = False
        for key, t in state.items():
            kind = target_kind(key, model_type)
            spec = quantization.get(kind) if kind is not None else None
            if spec is not None and t.ndim >= 2 and t.is_floating_point():
                state[key] = fake_quantize_tensor(t, spec, is_transposed(key))
                changed, count = True, count + 1
        if changed:
            tmp = file.with_name(f".{file.name}.tmp")
            save_file(state, tmp, metadata=metadata)
            os.replace(tmp, file)
    if count == 0:
        raise QATConfigError(f"{path}: no expert or router weight to quantize in its safetensors")
    return count


def write_quantized(ckpt: str | Path, dst: str | Path, quantization: dict) -> Path:
    """``moe_ds.quantized_checkpoint.quantize_checkpoint(ckpt, dst, experts=..., router=...)``: the packed model of a
    QAT stage's end, from the latent weights; an earlier ``dst`` (a stopped run's) is replaced.

    Raises:
        moe_ds.quantized_checkpoint.QuantizedCheckpointError: see ``quantize_checkpoint``.
    """
    from .quantized_checkpoint import quantize_checkpoint

    return Path(quantize_checkpoint(ckpt, dst, experts=quantization["experts"], router=quantization["router"],
                                    overwrite=True))

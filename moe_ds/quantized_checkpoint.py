"""Quantized checkpoints (issue #14): any moe-ds or stock MoE checkpoint folder in, a folder with its experts (and
router, optionally attention) stored packed out, loadable by ``moe_ds.checkpoint.load_model``, by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and the stock ``lm_eval`` CLI.

Format (``format_version`` 1):
- Each quantized tensor ``key`` of the source's safetensors is replaced by ``quantize.pack``'s entries stored as
  ``{key}.{entry}`` (compressed-tensors' pack-quantized int4 / int-quantized int8 layout per tensor: e.g.
  ``model.layers.0.mlp.experts.3.gate_proj.weight.weight_packed`` int32, ``....weight_scale`` bf16,
  ``....weight_shape`` int64, ``....weight_zero_point`` when asymmetric). Every other tensor is copied as stored.
- config.json gets ``moe_ds_quantization``: {format_version, experts, router, attention (spec strings or None),
  calibration (bool), transposed (a regex of the keys stored transposed), tensors: {key: spec}}. There is no
  ``quantization_config`` key: transformers would hand the model to its own HfQuantizer, which maps only
  ``nn.Linear`` and skips the fused 3-D experts.
- A stock source becomes ``model_type = "quantized_<family>"`` with ``auto_map`` naming
  ``modeling_shared_core.Quantized*`` classes, shipped beside it: plain ``AutoModelForCausalLM.from_pretrained``
  refuses it (it asks for ``trust_remote_code``) instead of initialising the missing weights at random. A
  shared-core-format source (shared_core, lowrank, delta) keeps its model_type and classes, which dequantize too.
- Loading (``modeling_shared_core.load_quantized``) dequantizes at load, on the target device, into the load
  dtype; the model then runs its ordinary bf16/fp32 forward: this is weight-only STORAGE quantization, there are
  no int4 kernels.

Which tensors and along which axis. Groups of g weights always run along a model dimension (d or I), never along
a rank:
- experts: stock per-expert projections [I, d] / [d, I] (or fused [E, 2I, d] / [E, d, I]) along their input dim;
  shared-core cores ``{p}_core`` [d_out, d_in] and delta's bases ``{p}_base`` along d_in; low-rank ``{p}_b``
  [E, r, d_in] along d_in; the factors whose LAST axis is the rank (shared-core ``{p}_u_in``/``{p}_v_in``
  [E, d_in, r], ``{p}_u_out``/``{p}_v_out`` [E, d_out, r], low-rank ``{p}_a`` [E, d_out, r]) are quantized as their
  transpose [E, r, d_x] (groups along d_x; stored transposed, named by ``transposed``). So any rank works, and the
  group size must divide d and I (as for the stock experts). Shared experts are not routed experts: kept.
- router: ``{moe_block}.gate.weight`` [E, d], int8 per output channel by default (DeepSeek-V3's
  ``e_score_correction_bias`` stays float32).
- attention (optional): every 2-D ``*.self_attn.*.weight``.
A group size that does not divide a tensor's group axis raises ``QuantizedCheckpointError`` naming the tensor and
the nearest valid group sizes, before anything is written; there is no silent fallback.

Calibration (optional): {MoE layer: {"gate": [E, d] or [d], "up": ..., "down": [E, I] or [I]}} input RMS of each
projection's input channels (``quantize``'s ``input_scale``, sqrt of the second-moment diagonal), used for the
dense experts' ranges when the experts' spec has range "mse" (activation-weighted clipping).
"""

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from . import quantize as qz
from .arch import get_architecture
from .checkpoint import (STATISTICS_FILE, TOKENIZER_FILES, open_safetensors, read_weight_map, read_weight_shapes,
                         write_modeling_files, write_shards)
from .modeling_shared_core import QUANTIZATION_KEY, base_model_type, quantized_classes
from .run_layout import atomic_output_dir

FORMAT_VERSION = 1
TRANSPOSED = r"\.(gate|up|down)_(u_in|v_in|u_out|v_out|a)$"  # factors whose last axis is the rank
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class QuantizedCheckpointError(ValueError):
    """A checkpoint or quantization setting that cannot be written (names the tensor, spec or folder)."""


def _divisors_near(k: int, g: int, count: int = 3) -> list[int]:
    divs = [x for x in range(1, k + 1) if k % x == 0]
    return sorted(sorted(divs, key=lambda x: (abs(x - g), x))[:count])


def _spec(text, what: str) -> "qz.QuantSpec | None":
    if text is None or str(text).lower() == "none":
        return None
    try:
        return qz.QuantSpec.parse(text)
    except qz.QuantizationError as err:
        raise QuantizedCheckpointError(f"--quantize{'' if what == 'experts' else '-' + what}: {err}") from err


def tensor_roles(keys, model_type: str, shared_core: bool) -> dict[str, str]:
    """{stored key: "experts" | "router" | "attention"} for the keys a quantized checkpoint may pack.

    Args:
        keys: the source's safetensors keys (on-disk names). model_type: the source's config.model_type.
        shared_core: the source is a shared-core-format checkpoint (its experts' parameters live on the experts
            module: ``...experts.{p}_core`` etc.).
    """
    arch = get_architecture(base_model_type(model_type))
    disk_block = arch.disk_expert_key.split(".{layer}.")[1].split(".")[0]  # "mlp" or Mixtral's "block_sparse_moe"
    block = f"(?:{re.escape(disk_block)}|{re.escape(arch.moe_block)})"  # stock on-disk or in-memory names
    expert = re.compile(rf"^model\.layers\.\d+\.{block}\.{arch.experts}\.")
    router = re.compile(rf"^model\.layers\.\d+\.{block}\.{arch.router}\.weight$")
    attention = re.compile(r"^model\.layers\.\d+\.self_attn\..*\.weight$")
    del shared_core
    roles = {}
    for key in keys:
        if expert.match(key):
            roles[key] = "experts"
        elif router.match(key):
            roles[key] = "router"
        elif attention.match(key):
            roles[key] = "attention"
    return roles


def is_transposed(name: str) -> bool:
    """True for the tensors stored (and quantized) as their transpose: the factors whose last axis is the rank
    (shared-core ``{p}_u_in``, ``{p}_v_in``, ``{p}_u_out``, ``{p}_v_out``; low-rank ``{p}_a``). ``name`` is a
    parameter or stored key (``model.layers.0.mlp.experts.gate_u_in``)."""
    return re.search(TRANSPOSED, name) is not None


def fake_quantize_as_stored(name: str, w: torch.Tensor, spec: "qz.QuantSpec | str",
                            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize.fake_quantize`` in the orientation ``quantize_checkpoint`` stores the tensor ``name`` in, for
    quantization-aware training: its forward equals exactly what loading the written checkpoint gives for it.

    Args:
        name: the parameter's name (decides the orientation, ``is_transposed``). w: float [..., N, K].
        spec, input_scale: as ``quantize.fake_quantize`` (input_scale along the group axis).

    Returns:
        [..., N, K] like w, straight-through gradient.

    Raises:
        QuantizationError: see ``quantize.fake_quantize`` (a group size that does not divide the group axis).
    """
    if is_transposed(name):
        return qz.fake_quantize(w.transpose(-1, -2), spec, input_scale).transpose(-1, -2)
    return qz.fake_quantize(w, spec, input_scale)


def _group_axis_len(key: str, shape: tuple) -> int:
    return shape[-2] if re.search(TRANSPOSED, key) else shape[-1]


def plan_quantization(src_dir: str | Path, experts="int4-g128", router="int8", attention=None) -> dict[str, str]:
    """{stored key: spec string} of every tensor ``quantize_checkpoint`` would pack, validated against the shapes
    in the source's safetensors headers (nothing is read or written).

    Raises:
        QuantizedCheckpointError: an unsupported spec, the source already quantized, or a group size that does not
            divide a tensor's group axis (names the tensor and the nearest valid group sizes).
        CheckpointError: the source holds no readable safetensors.
    """
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise QuantizedCheckpointError(f"{src} has no config.json: not a model directory")
    raw = json.loads((src / "config.json").read_text())
    if QUANTIZATION_KEY in raw or raw.get("quantization_config"):
        raise QuantizedCheckpointError(f"{src} is already quantized; quantize its unquantized source instead")
    specs = {"experts": _spec(experts, "experts"), "router": _spec(router, "router"),
             "attention": _spec(attention, "attention")}
    shapes = read_weight_shapes(src)
    roles = tensor_roles(shapes, raw.get("model_type", ""), "shared_core" in raw)
    plan = {}
    for key, role in sorted(roles.items()):
        spec, shape = specs[role], shapes[key]
        if spec is None or len(shape) < 2:
            continue
        k = _group_axis_len(key, shape)
        if spec.group_size is not None and k % spec.group_size:
            raise QuantizedCheckpointError(
                f"group size {spec.group_size} does not divide {key} {list(shape)} along its group axis (length "
                f"{k}); nearest valid group sizes: {_divisors_near(k, spec.group_size)}")
        plan[key] = str(spec)
    if specs["experts"] is not None and not any(roles.get(k) == "experts" for k in plan):
        raise QuantizedCheckpointError(f"{src}: no expert tensors found to quantize")
    return plan


def _quantize_one(key: str, w: torch.Tensor, spec: str, input_scale=None) -> dict[str, torch.Tensor]:
    transposed = re.search(TRANSPOSED, key) is not None
    x = w.transpose(-1, -2) if transposed else w
    s = qz.QuantSpec.parse(spec)
    if input_scale is not None and s.range != "mse":
        input_scale = None
    q = qz.quantize(x, s, input_scale)
    return {f"{key}.{name}": t.contiguous() for name, t in qz.pack(q).items()}


def _calibration_scale(calibration, key: str, arch) -> torch.Tensor | None:
    """input_scale of a stock per-expert key from ``calibration`` ({layer: {proj: [E, K] or [K]}}), or None."""
    if calibration is None:
        return None
    pattern = re.escape(arch.disk_expert_key).replace(r"\{layer\}", r"(\d+)").replace(r"\{expert\}", r"(\d+)")
    pattern = pattern.replace(r"\{proj\}", r"(\w+)")
    m = re.fullmatch(pattern, key)
    if m is None:
        return None
    layer, e, disk_proj = int(m.group(1)), int(m.group(2)), m.group(3)
    proj = {v: k for k, v in arch.disk_proj_names.items()}.get(disk_proj)
    scales = calibration(layer) if callable(calibration) else calibration.get(layer)
    if not scales or proj not in scales:
        return None
    s = scales[proj]
    return s[e] if s.dim() == 2 else s


def quantize_checkpoint(src_dir: str | Path, dst_dir: str | Path, experts: str | None = "int4-g128",
                        router: str | None = "int8", attention: str | None = None,
                        calibration: Mapping | Callable | None = None, overwrite: bool = False,
                        statistics: dict | None = None) -> Path:
    """Write a quantized copy of a checkpoint folder (see the module docstring for the format).

    Streams one safetensors shard of the source at a time: each shard's tensors are read, the planned ones packed,
    and written as one output shard; the folder appears atomically (``run_layout.atomic_output_dir``).

    Args:
        src_dir: a stock MoE checkpoint or a shared-core-format one (shared_core, lowrank, delta), unquantized.
        dst_dir: the folder to create.
        experts, router, attention: ``QuantSpec`` strings ("int4-g128", "int8", "int4-g64-asym-mse", ...) or None /
            "none" to keep those tensors as stored.
        calibration: optional {MoE layer: {"gate"|"up"|"down": input RMS [E, K] or [K]}} (or a callable
            layer -> that dict) for activation-weighted ranges of stock experts (spec range "mse").
        overwrite: replace an existing ``dst_dir``.
        statistics: extra entries of compression_statistics.yaml.

    Returns:
        ``Path(dst_dir)``.

    Raises:
        QuantizedCheckpointError: see ``plan_quantization``.
        CheckpointError: unreadable source weights.
        FileExistsError: ``dst_dir`` exists and ``overwrite`` is False.
    """
    src = Path(src_dir)
    plan = plan_quantization(src, experts, router, attention)
    raw = json.loads((src / "config.json").read_text())
    arch = get_architecture(base_model_type(raw["model_type"]))
    weight_map = read_weight_map(src)
    shards = sorted(set(weight_map.values()))
    with atomic_output_dir(dst_dir, overwrite) as tmp:
        def state_of(shard: str) -> dict:
            state = {}
            with open_safetensors(src / shard) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if key in plan:
                        state.update(_quantize_one(key, t, plan[key], _calibration_scale(calibration, key, arch)))
                    else:
                        state[key] = t
            return state

        write_shards(tmp, shards, state_of)
        given = {"experts": experts, "router": router, "attention": attention}
        section = {"format_version": FORMAT_VERSION,
                   **{role: None if (s := _spec(text, role)) is None else str(s) for role, text in given.items()},
                   "calibration": calibration is not None, "storage": "compressed-tensors pack-quantized (int4) / "
                   "int-quantized (int8) entries under {key}.{entry}", "transposed": TRANSPOSED, "tensors": plan}
        config = dict(raw)
        if "shared_core" not in raw:
            config_cls, model_cls = quantized_classes(raw["model_type"])
            config["model_type"] = config_cls.model_type
            config["architectures"] = [model_cls.__name__]
            config["auto_map"] = {"AutoConfig": f"modeling_shared_core.{config_cls.__name__}",
                                  "AutoModelForCausalLM": f"modeling_shared_core.{model_cls.__name__}"}
        config[QUANTIZATION_KEY] = section
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_modeling_files(tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                (tmp / name).write_bytes((src / name).read_bytes())
        stats = yaml.safe_load((src / STATISTICS_FILE).read_text()) if (src / STATISTICS_FILE).is_file() else {}
        stats = stats if isinstance(stats, dict) else {}
        stats["quantization"] = quantization_statistics(src, plan, section)
        stats.update(statistics or {})
        (tmp / STATISTICS_FILE).write_text(yaml.safe_dump(stats, sort_keys=False))
    return Path(dst_dir)


def quantization_statistics(src_dir: str | Path, plan: Mapping[str, str], section: dict | None = None) -> dict:
    """Exact stored bytes of the quantized tensors (values + scales + zero points, ``quantize.packed_bytes``)
    against their source bytes, by role, from the source's headers.

    Returns:
        {"experts"|"router"|"attention": spec, ..., "bytes": {role: {"original", "quantized", "ratio"}}}
    """
    src = Path(src_dir)
    raw = json.loads((src / "config.json").read_text())
    shapes = read_weight_shapes(src)
    dtypes = {}
    weight_map = read_weight_map(src)
    for shard in sorted(set(weight_map.values())):
        with open_safetensors(src / shard) as f:
            for key in f.keys():
                if key in plan:
                    dtypes[key] = f.get_slice(key).get_dtype()
    elem = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
    roles = tensor_roles(shapes, raw.get("model_type", ""), "shared_core" in raw)
    out = {k: (section or {}).get(k) for k in ("experts", "router", "attention")}
    by_role: dict[str, dict] = {}
    for key, spec in plan.items():
        shape = list(shapes[key])
        if re.search(TRANSPOSED, key):
            shape[-2:] = shape[-1], shape[-2]
        b = by_role.setdefault(roles[key], {"original": 0, "quantized": 0, "tensors": 0})
        b["original"] += int(torch.Size(shapes[key]).numel()) * elem.get(dtypes[key], 4)
        b["quantized"] += qz.packed_bytes(shape, spec)
        b["tensors"] += 1
    for b in by_role.values():
        b["ratio"] = b["quantized"] / b["original"] if b["original"] else None
    out["bytes"] = by_role
    return out

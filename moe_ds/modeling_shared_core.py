"""transformers model classes whose MoE layers hold compressed experts, and the surgery that installs them.

Each supported family gets a config class (``model_type = "shared_core_<family>"``) and a causal-LM class
that builds the stock model and swaps every layer's fused experts for compressed experts of the form in
``config.shared_core["form"]`` and the ranks in ``config.shared_core["ranks"]``: ``SharedCoreExperts`` ("shared_core",
the form when the key is absent) or ``LowRankExperts`` ("lowrank", and "delta" with a shared base). Routers, shared
experts, attention and norms are the stock modules.

Format versions of the ``shared_core`` section: 1 holds the shared core only (no "form" key); 2 adds "form". The
shared core is still written as version 1, so older readers keep loading it; the low-rank forms are written as
version 2, which a version-1 reader refuses instead of installing shared-core experts and misloading the weights.

This file is shipped verbatim (with ``arch.py``, ``shared_core.py`` and ``lowrank.py``) beside every compressed
checkpoint,
and ``config.json`` names these classes in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and
``lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True`` load it without moe-ds.
"""

import importlib
import re

from torch import nn
from transformers import (
    CONFIG_MAPPING,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .arch import UnsupportedModelError, get_architecture
from .lowrank import LowRankExperts
from .shared_core import SharedCoreExperts

FORMS = ("shared_core", "lowrank", "delta")  # expert forms of a compressed checkpoint
FORMAT_VERSIONS = {"shared_core": 1, "lowrank": 2, "delta": 2}  # the format_version each form is written with
READ_FORMAT_VERSIONS = (1, 2)


def checkpoint_form(section: dict) -> str:
    """The expert form of a ``config.shared_core`` section, after checking its format version.

    Raises:
        ValueError: an unknown format_version or form, or a form that its format_version cannot hold.
    """
    version = section.get("format_version")
    if version not in READ_FORMAT_VERSIONS:
        raise ValueError(f"unknown shared_core format_version {version!r}; this code reads versions "
                         f"{', '.join(map(str, READ_FORMAT_VERSIONS))}")
    form = section.get("form", "shared_core")
    if form not in FORMS:
        raise ValueError(f"unknown shared_core form {form!r}; this code reads {', '.join(FORMS)}")
    if version < FORMAT_VERSIONS[form]:
        raise ValueError(f"shared_core form {form!r} needs format_version {FORMAT_VERSIONS[form]}, got {version}")
    return form


def find_experts(model: nn.Module) -> dict[int, str]:
    """Module names of every MoE layer's experts module, by layer index.

    Raises:
        UnsupportedModelError: the model type is not in the table, or no layer holds an experts module.
    """
    arch = get_architecture(model.config.model_type)
    pattern = re.compile(rf"^model\.layers\.(\d+)\.{arch.moe_block}\.{arch.experts}$")
    found = {int(m.group(1)): name for name, _ in model.named_modules() if (m := pattern.match(name))}
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layers (no module matches {pattern.pattern})")
    return dict(sorted(found.items()))


def replace_experts(model: nn.Module, ranks: dict, form: str = "shared_core") -> nn.Module:
    """Swap every MoE layer's fused experts module for fresh compressed experts (peft-style surgery).

    The new modules start from their constructors' values (shared core: random cores, identity wrappers;
    lowrank/delta: A = 0); their values come from the checkpoint being loaded (or from
    ``moe_ds.checkpoint.compress_model``, which fills them from dense experts).

    Args:
        model: a transformers MoE causal LM of a supported family (may live on the meta device).
        ranks: {"gate": r, "up": r, "down": r}.
        form: "shared_core" (``SharedCoreExperts``), "lowrank" or "delta" (``LowRankExperts`` without or with
            a shared base).

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: an unknown form.
    """
    if form not in FORMS:
        raise ValueError(f"unknown expert form {form!r}; expected one of {', '.join(FORMS)}")
    for name in find_experts(model).values():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if form == "shared_core" and isinstance(old, SharedCoreExperts):
            continue
        if form != "shared_core" and isinstance(old, LowRankExperts) and old.has_base == (form == "delta"):
            continue
        ref = next(old.parameters())
        # Under ZeRO-3 the old parameters are partitioned placeholders: let zero.Init place the new ones.
        kw = {"dtype": ref.dtype, "device": None if hasattr(ref, "ds_id") else ref.device}
        dims = (old.num_experts, old.hidden_dim, old.intermediate_dim, ranks, model.config.hidden_act)
        new = (SharedCoreExperts(*dims, **kw) if form == "shared_core"
               else LowRankExperts(*dims, base=form == "delta", **kw))
        setattr(parent, child, new)
    return model


# ------------------------------------------------------------------------------------- quantized checkpoints (#14)
#
# A quantized checkpoint (``moe_ds.quantized_checkpoint``) stores some tensors packed (``quantize.pack``: int4
# values 8 per int32 word or int8 values, plus scales and zero points) under ``{key}.{entry}`` (e.g.
# ``model.layers.0.mlp.experts.3.gate_proj.weight.weight_packed``) and records how in config.json's
# ``moe_ds_quantization`` section (never ``quantization_config``, which would hand the model to a transformers
# HfQuantizer that skips fused 3-D experts). Its classes' ``from_pretrained`` dequantize each tensor at load, on the
# target device, straight into the load dtype, and return the plain model: a stock checkpoint loads as the
# family's stock class, a shared-core one as its ``SharedCore*ForCausalLM`` without the quantization section. The
# runtime compute is then the ordinary bf16/fp32 forward (weight-only storage quantization; no int4 kernels).

QUANTIZATION_KEY = "moe_ds_quantization"  # config.json section of a quantized checkpoint
QUANT_FORMAT_VERSIONS = (1,)
ENTRY_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight")  # quantize.pack's
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_IGNORED_LOAD_KWARGS = ("trust_remote_code", "revision", "subfolder", "cache_dir", "local_files_only", "token",
                        "low_cpu_mem_usage", "use_safetensors", "force_download", "proxies", "gguf_file",
                        "quantization_config", "code_revision", "_from_auto", "_commit_hash", "offload_folder",
                        "offload_state_dict", "adapter_kwargs", "weights_only", "variant", "key_mapping",
                        "max_memory", "tp_plan", "tp_size", "device_mesh")


class QuantizedLoadError(ValueError):
    """A quantized checkpoint that cannot be loaded as asked (names the tensor, section or option)."""


def quantization_section(config) -> dict | None:
    """The ``moe_ds_quantization`` section of a config (object or dict), or None when not quantized."""
    section = config.get(QUANTIZATION_KEY) if isinstance(config, dict) else getattr(config, QUANTIZATION_KEY, None)
    return section if isinstance(section, dict) else None


def _weight_map(path) -> dict[str, str]:
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    if not (path / "model.safetensors").is_file():
        raise QuantizedLoadError(f"{path} holds no model.safetensors or model.safetensors.index.json")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def _load_device(device_map):
    """(device every tensor is read to, device map to dispatch with afterwards or None)."""
    import torch

    if device_map is None:
        return torch.device("cpu"), None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) == 1:
            d = devices.pop()
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d), None
        return torch.device("cpu"), device_map
    if isinstance(device_map, str) and device_map in _DEVICE_MAP_STRATEGIES:
        n = torch.cuda.device_count()
        if n <= 1:
            return torch.device("cuda:0" if n else "cpu"), None
        return torch.device("cpu"), device_map
    if isinstance(device_map, int):
        return torch.device(f"cuda:{device_map}"), None
    try:
        return torch.device(device_map), None
    except (RuntimeError, TypeError) as err:
        raise QuantizedLoadError(f"device_map {device_map!r} is not understood: give a device, {{'': device}}, "
                                 f"a per-module dict or one of {_DEVICE_MAP_STRATEGIES}") from err


def _resolve_dtype(dtype, config):
    import torch

    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizedLoadError(f"dtype must be a floating torch dtype, 'auto' or None, got {dtype!r}")
    return dtype


def _dequantized(entries: dict, dtype, device, transposed: bool):
    """One packed tensor → its dequantized values in ``dtype`` on ``device``, one matrix at a time in float32."""
    import torch

    from .quantize import dequantize, unpack

    q = unpack({k: v.to(device) for k, v in entries.items()}, dtype=dtype)
    shape = q.values.shape
    out = torch.empty(shape, dtype=dtype, device=device)
    flat_v, flat_s = q.values.reshape(-1, *shape[-2:]), q.scale.reshape(-1, *q.scale.shape[-2:])
    flat_z = None if q.zero_point is None else q.zero_point.reshape(-1, *q.zero_point.shape[-2:])
    flat_o = out.view(-1, *shape[-2:])
    for i in range(flat_v.shape[0]):
        one = type(q)(flat_v[i], flat_s[i], None if flat_z is None else flat_z[i], q.spec, dtype)
        flat_o[i] = dequantize(one, dtype)
    return out.transpose(-1, -2).contiguous() if transposed else out


def _set_tensor(model, name: str, tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise QuantizedLoadError(f"the checkpoint holds {name!r}, which {type(model).__name__} does not have")


class _Sink:
    """Puts loaded tensors into the model: assigned in place of meta tensors, or under ZeRO-3 copied into the
    partitioned parameters (gathered on every rank, written by rank 0, re-partitioned), one tensor at a time."""

    def __init__(self, model, zero3: bool):
        self.model, self.zero3, self.loaded = model, zero3, set()

    def put(self, name: str, tensor) -> None:
        self.loaded.add(name)
        if not self.zero3:
            _set_tensor(self.model, name, tensor)
            return
        import torch

        deepspeed = importlib.import_module("deepspeed")  # not an import statement: transformers' scan of shipped
        # files imports every module named in one to check that it is installed, and deepspeed is optional
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if attr in module._buffers:
            module._buffers[attr] = tensor.to(module._buffers[attr].device)
            return
        if attr not in module._parameters:
            raise QuantizedLoadError(f"the checkpoint holds {name!r}, which {type(self.model).__name__} does not have")
        param = module._parameters[attr]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    param.copy_(tensor.to(device=param.device, dtype=param.dtype))


class _StockExperts:
    """Collects a stock checkpoint's per-expert keys and puts each MoE layer's fused in-memory tensors
    (``gate_up_proj`` [E, 2I, d], gate rows first; ``down_proj`` [E, d, I]) once all its experts are read."""

    def __init__(self, model, arch, sink: _Sink):
        self.model, self.arch, self.sink = model, arch, sink
        key = re.escape(arch.disk_expert_key).replace(r"\{layer\}", r"(?P<layer>\d+)")
        key = key.replace(r"\{expert\}", r"(?P<expert>\d+)").replace(r"\{proj\}", r"(?P<proj>\w+)")
        self.pattern = re.compile(f"^{key}$")
        self.proj = {v: k for k, v in arch.disk_proj_names.items()}
        self.pending: dict = {}

    def take(self, key: str, tensor) -> bool:
        import torch

        m = self.pattern.match(key)
        if m is None or m.group("proj") not in self.proj:
            return False
        layer, e, proj = int(m.group("layer")), int(m.group("expert")), self.proj[m.group("proj")]
        name = f"model.layers.{layer}.{self.arch.moe_block}.{self.arch.experts}"
        experts = self.model.get_submodule(name)
        num = int(getattr(experts.down_proj, "ds_shape", experts.down_proj.shape)[0])
        got = self.pending.setdefault(layer, {})
        got[(proj, e)] = tensor
        if len(got) == 3 * num:
            gate_up = torch.stack([torch.cat([got[("gate", j)], got[("up", j)]]) for j in range(num)])
            self.sink.put(f"{name}.gate_up_proj", gate_up)
            self.sink.put(f"{name}.down_proj", torch.stack([got[("down", j)] for j in range(num)]))
            del self.pending[layer]
        return True


def load_quantized(model_cls, path, config, dtype=None, device_map=None, **kwargs):
    """Load a quantized checkpoint (see the comment above): the model of ``model_cls``'s base (stock or shared-core)
    with every packed tensor dequantized into ``dtype`` on the target device.

    Shards are read one at a time (``safe_open``); each packed tensor is moved to the target device packed, unpacked
    there and dequantized one matrix at a time in float32 into a ``dtype`` tensor, so no full float32 (or host)
    copy of the model is made. Other floating tensors are cast to ``dtype`` (``_keep_in_fp32_modules_strict``, e.g.
    DeepSeek-V3's ``e_score_correction_bias``, stay float32). Under an active ZeRO-3 ``HfDeepSpeedConfig`` (every
    rank loads, as distillation does) the model is built partitioned inside ``deepspeed.zero.Init`` in the DeepSpeed
    config's dtype, and each tensor (a stock layer's fused experts once all its experts are read) is dequantized on
    the CPU and copied into its gathered parameter by rank 0; every rank reads the files.

    Args:
        model_cls: the quantized checkpoint's class (``Quantized*ForCausalLM`` or ``SharedCore*ForCausalLM``).
        path: the checkpoint folder. config: its config (with the ``moe_ds_quantization`` section).
        dtype: torch dtype, its name, "auto" or None (both: the stored ``config.dtype``).
        device_map: None (CPU), a device, ``{"": device}``, or "auto"/"balanced"/"sequential"/a per-module dict
            (loaded on CPU, then dispatched with accelerate when more than one GPU is visible).
        **kwargs: ``attn_implementation``; hub/loader options without meaning for a local folder are ignored.

    Returns:
        The stock ``*ForCausalLM`` (quantized stock checkpoint) or ``SharedCore*ForCausalLM`` in eval mode, its
        config without the quantization section.

    Raises:
        QuantizedLoadError: an unknown format version, option, dtype or device_map, or weights that do not cover
            the model (names them).
    """
    import copy

    import torch
    from safetensors import safe_open

    section = quantization_section(config)
    if section is None or section.get("format_version") not in QUANT_FORMAT_VERSIONS:
        raise QuantizedLoadError(f"{path}: {QUANTIZATION_KEY} section missing or of an unknown format_version "
                                 f"({None if section is None else section.get('format_version')}); this code reads "
                                 f"{QUANT_FORMAT_VERSIONS}")
    attn = kwargs.pop("attn_implementation", None)
    dtype = _resolve_dtype(kwargs.pop("torch_dtype", None) if dtype is None else dtype, config)
    unknown = {k: v for k, v in kwargs.items() if k not in _IGNORED_LOAD_KWARGS and v is not None}
    if unknown:
        raise QuantizedLoadError(f"options {sorted(unknown)} are not supported when loading a quantized "
                                 f"checkpoint (supported: dtype, device_map, attn_implementation)")
    device, dispatch = _load_device(device_map)
    transposed = re.compile(section.get("transposed", r"$^"))
    config = copy.deepcopy(config)
    delattr(config, QUANTIZATION_KEY)
    arch = get_architecture(base_model_type(config.model_type))
    if "shared_core" in config.to_dict() and isinstance(getattr(config, "shared_core", None), dict):
        target_cls, target_config = model_cls, config
    else:
        target_config, target_cls = base_model_class(config)
        target_config.architectures = [target_cls.__name__]
    if attn is not None:
        target_config._attn_implementation = attn
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if zero3:  # partitioned at construction (zero.Init), filled tensor by tensor; read on the CPU
        from transformers.integrations.deepspeed import deepspeed_config

        deepspeed = importlib.import_module("deepspeed")

        if dispatch is not None:
            raise QuantizedLoadError("device_map cannot dispatch a model partitioned by DeepSpeed ZeRO-3")
        device = torch.device("cpu")
        # the DeepSpeed config's dtype (bf16/fp16 sections) rules here, as in transformers' own ZeRO-3 loading;
        # zero.Init's dtype argument is not used (deepspeed 0.19 ignores it on accelerators without fp16)
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
            model = target_cls(target_config)
    else:
        with torch.device("meta"):
            model = target_cls(target_config)
    sink = _Sink(model, zero3)
    keep_fp32 = tuple(getattr(target_cls, "_keep_in_fp32_modules_strict", None) or ()) + tuple(
        getattr(target_cls, "_keep_in_fp32_modules", None) or ())
    stock = None if target_cls is model_cls else _StockExperts(model, arch, sink)
    weight_map = _weight_map(path)
    packed = {}  # parameter key -> {entry: stored key}
    for key in weight_map:
        base, _, entry = key.rpartition(".")
        if entry in ENTRY_NAMES and base in section.get("tensors", {}):
            packed.setdefault(base, {})[entry] = key
    for shard in sorted(set(weight_map.values())):
        with safe_open(f"{path}/{shard}", framework="pt") as f:
            names = set(f.keys())
            done = set()
            for base, entries in packed.items():
                if not set(entries.values()) <= names:
                    continue
                t = _dequantized({e: f.get_tensor(k) for e, k in entries.items()}, dtype, device,
                                 bool(transposed.search(base)))
                done |= set(entries.values())
                if stock is None or not stock.take(base, t):
                    sink.put(arch.disk_to_memory(base), t)
            for key in sorted(names - done):
                t = f.get_tensor(key)
                name = arch.disk_to_memory(key)
                if t.is_floating_point():
                    t = t.to(torch.float32 if any(s in name for s in keep_fp32) else dtype)
                t = t.to(device)
                if stock is None or not stock.take(key, t):
                    sink.put(name, t)
    model.tie_weights()
    for name, module in model.named_modules():  # non-persistent buffers (rotary inv_freq) are rebuilt
        if any(b is not None and b.device.type == "meta" for b in module._buffers.values()):
            if not hasattr(module, "config"):
                raise QuantizedLoadError(f"cannot rebuild the buffers of {name} ({type(module).__name__})")
            with torch.device(device):
                fresh = type(module)(module.config)
            for b, value in fresh._buffers.items():
                module._buffers[b] = value
    if zero3:
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        persistent = {n for n, _ in model.named_buffers()} - {n for n, _ in model.named_non_persistent_buffers()}
        missing = sorted(({n for n, _ in model.named_parameters()} | persistent) - sink.loaded - tied)
    else:
        missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                   if p.device.type == "meta"]
    if missing:
        raise QuantizedLoadError(f"{path}: {len(missing)} tensors of {target_cls.__name__} are not in the checkpoint "
                                 f"(e.g. {', '.join(missing[:5])})")
    model.config.dtype = dtype
    if dispatch is not None:
        accelerate = importlib.import_module("accelerate")
        dispatch_model, infer_auto_device_map = accelerate.dispatch_model, accelerate.infer_auto_device_map

        device_map = dispatch if isinstance(dispatch, dict) else infer_auto_device_map(
            model, no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


class _QuantizedLoadMixin:
    """``from_pretrained`` of a local folder whose config has a ``moe_ds_quantization`` section dequantizes it
    (``load_quantized``); anything else goes to transformers' ``from_pretrained`` untouched."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        import json
        from pathlib import Path

        path = Path(str(pretrained_model_name_or_path))
        if config is None or not hasattr(config, "to_dict"):
            raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            if QUANTIZATION_KEY in raw:
                config = cls.config_class.from_pretrained(path)
        if config is None or not hasattr(config, "to_dict") or quantization_section(config) is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        if args:
            raise QuantizedLoadError(f"positional model arguments {args!r} are not supported for quantized loading")
        return load_quantized(cls, path, config, kwargs.pop("dtype", None), kwargs.pop("device_map", None), **kwargs)


class _SharedCoreMixin:
    """Builds the stock model, then installs compressed experts of ``config.shared_core``'s form and ranks."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        section = getattr(config, "shared_core", None)
        if not isinstance(section, dict) or "ranks" not in section:
            raise ValueError("config has no shared_core section with ranks: not a moe-ds compressed model")
        replace_experts(self, section["ranks"], checkpoint_form(section))


class SharedCoreQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "shared_core_qwen3_moe"


class SharedCoreQwen3MoeForCausalLM(_QuantizedLoadMixin, _SharedCoreMixin, Qwen3MoeForCausalLM):
    config_class = SharedCoreQwen3MoeConfig


class QuantizedQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "quantized_qwen3_moe"


class QuantizedQwen3MoeForCausalLM(_QuantizedLoadMixin, Qwen3MoeForCausalLM):
    config_class = QuantizedQwen3MoeConfig


class SharedCoreQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "shared_core_qwen2_moe"


class SharedCoreQwen2MoeForCausalLM(_QuantizedLoadMixin, _SharedCoreMixin, Qwen2MoeForCausalLM):
    config_class = SharedCoreQwen2MoeConfig


class QuantizedQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "quantized_qwen2_moe"


class QuantizedQwen2MoeForCausalLM(_QuantizedLoadMixin, Qwen2MoeForCausalLM):
    config_class = QuantizedQwen2MoeConfig


class SharedCoreMixtralConfig(MixtralConfig):
    model_type = "shared_core_mixtral"


class SharedCoreMixtralForCausalLM(_QuantizedLoadMixin, _SharedCoreMixin, MixtralForCausalLM):
    config_class = SharedCoreMixtralConfig


class QuantizedMixtralConfig(MixtralConfig):
    model_type = "quantized_mixtral"


class QuantizedMixtralForCausalLM(_QuantizedLoadMixin, MixtralForCausalLM):
    config_class = QuantizedMixtralConfig


class SharedCoreOlmoeConfig(OlmoeConfig):
    model_type = "shared_core_olmoe"


class SharedCoreOlmoeForCausalLM(_QuantizedLoadMixin, _SharedCoreMixin, OlmoeForCausalLM):
    config_class = SharedCoreOlmoeConfig


class QuantizedOlmoeConfig(OlmoeConfig):
    model_type = "quantized_olmoe"


class QuantizedOlmoeForCausalLM(_QuantizedLoadMixin, OlmoeForCausalLM):
    config_class = QuantizedOlmoeConfig


class SharedCoreDeepseekV3Config(DeepseekV3Config):
    model_type = "shared_core_deepseek_v3"


class SharedCoreDeepseekV3ForCausalLM(_QuantizedLoadMixin, _SharedCoreMixin, DeepseekV3ForCausalLM):
    config_class = SharedCoreDeepseekV3Config


class QuantizedDeepseekV3Config(DeepseekV3Config):
    model_type = "quantized_deepseek_v3"


class QuantizedDeepseekV3ForCausalLM(_QuantizedLoadMixin, DeepseekV3ForCausalLM):
    config_class = QuantizedDeepseekV3Config


# base model_type -> (config class, causal-LM class), for the families in arch.ARCHITECTURES.
SHARED_CORE_CLASSES = {
    "qwen3_moe": (SharedCoreQwen3MoeConfig, SharedCoreQwen3MoeForCausalLM),
    "qwen2_moe": (SharedCoreQwen2MoeConfig, SharedCoreQwen2MoeForCausalLM),
    "mixtral": (SharedCoreMixtralConfig, SharedCoreMixtralForCausalLM),
    "olmoe": (SharedCoreOlmoeConfig, SharedCoreOlmoeForCausalLM),
    "deepseek_v3": (SharedCoreDeepseekV3Config, SharedCoreDeepseekV3ForCausalLM),
}
# base model_type -> (config class, causal-LM class) of quantized stock checkpoints (model_type "quantized_<family>")
QUANTIZED_CLASSES = {
    "qwen3_moe": (QuantizedQwen3MoeConfig, QuantizedQwen3MoeForCausalLM),
    "qwen2_moe": (QuantizedQwen2MoeConfig, QuantizedQwen2MoeForCausalLM),
    "mixtral": (QuantizedMixtralConfig, QuantizedMixtralForCausalLM),
    "olmoe": (QuantizedOlmoeConfig, QuantizedOlmoeForCausalLM),
    "deepseek_v3": (QuantizedDeepseekV3Config, QuantizedDeepseekV3ForCausalLM),
}


def base_model_type(model_type: str) -> str:
    """The family of a stock, ``shared_core_`` or ``quantized_`` model type ("quantized_qwen3_moe" → "qwen3_moe").

    Raises:
        UnsupportedModelError: unknown model type.
    """
    return get_architecture(model_type.removeprefix("quantized_")).model_type


def quantized_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a quantized stock checkpoint of this family.

    Raises:
        UnsupportedModelError: unknown model type.
    """
    return QUANTIZED_CLASSES[base_model_type(model_type)]


def shared_core_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) for a base or ``shared_core_`` model type.

    Raises:
        UnsupportedModelError: unknown model type (the message lists the supported ones).
    """
    return SHARED_CORE_CLASSES[base_model_type(model_type)]


def base_config_dict(config) -> dict:
    """A config's settings without the keys that name its class or compression (model_type, auto_map, ...)."""
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "shared_core", "transformers_version", QUANTIZATION_KEY):
        d.pop(key, None)
    return d


def base_model_class(config) -> tuple:
    """(stock transformers config, stock causal-LM class) of a shared-core or original MoE config."""
    base_config = CONFIG_MAPPING[base_model_type(config.model_type)](**base_config_dict(config))
    return base_config, MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]


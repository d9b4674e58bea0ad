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


class SharedCoreQwen3MoeForCausalLM(_SharedCoreMixin, Qwen3MoeForCausalLM):
    config_class = SharedCoreQwen3MoeConfig


class SharedCoreQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "shared_core_qwen2_moe"


class SharedCoreQwen2MoeForCausalLM(_SharedCoreMixin, Qwen2MoeForCausalLM):
    config_class = SharedCoreQwen2MoeConfig


class SharedCoreMixtralConfig(MixtralConfig):
    model_type = "shared_core_mixtral"


class SharedCoreMixtralForCausalLM(_SharedCoreMixin, MixtralForCausalLM):
    config_class = SharedCoreMixtralConfig


class SharedCoreOlmoeConfig(OlmoeConfig):
    model_type = "shared_core_olmoe"


class SharedCoreOlmoeForCausalLM(_SharedCoreMixin, OlmoeForCausalLM):
    config_class = SharedCoreOlmoeConfig


class SharedCoreDeepseekV3Config(DeepseekV3Config):
    model_type = "shared_core_deepseek_v3"


class SharedCoreDeepseekV3ForCausalLM(_SharedCoreMixin, DeepseekV3ForCausalLM):
    config_class = SharedCoreDeepseekV3Config


# base model_type -> (config class, causal-LM class), for the families in arch.ARCHITECTURES.
SHARED_CORE_CLASSES = {
    "qwen3_moe": (SharedCoreQwen3MoeConfig, SharedCoreQwen3MoeForCausalLM),
    "qwen2_moe": (SharedCoreQwen2MoeConfig, SharedCoreQwen2MoeForCausalLM),
    "mixtral": (SharedCoreMixtralConfig, SharedCoreMixtralForCausalLM),
    "olmoe": (SharedCoreOlmoeConfig, SharedCoreOlmoeForCausalLM),
    "deepseek_v3": (SharedCoreDeepseekV3Config, SharedCoreDeepseekV3ForCausalLM),
}


def shared_core_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) for a base or ``shared_core_`` model type.

    Raises:
        UnsupportedModelError: unknown model type (the message lists the supported ones).
    """
    return SHARED_CORE_CLASSES[get_architecture(model_type).model_type]


def base_config_dict(config) -> dict:
    """A config's settings without the keys that name its class or compression (model_type, auto_map, ...)."""
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "shared_core", "transformers_version"):
        d.pop(key, None)
    return d


def base_model_class(config) -> tuple:
    """(stock transformers config, stock causal-LM class) of a shared-core or original MoE config."""
    base_config = CONFIG_MAPPING[get_architecture(config.model_type).model_type](**base_config_dict(config))
    return base_config, MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]

"""transformers model classes whose MoE layers hold ``SharedCoreExperts``, and the surgery that installs them.

Each supported family gets a config class (``model_type = "shared_core_<family>"``) and a causal-LM class
that builds the stock model and swaps every layer's fused experts for shared-core experts of the ranks in
``config.shared_core["ranks"]``. Routers, shared experts, attention and norms are the stock modules.

This file is shipped verbatim (with ``arch.py`` and ``shared_core.py``) beside every compressed checkpoint,
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
from .shared_core import SharedCoreExperts

SHARED_CORE_FORMAT_VERSION = 1


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


def replace_experts(model: nn.Module, ranks: dict) -> nn.Module:
    """Swap every MoE layer's fused experts module for a fresh ``SharedCoreExperts`` (peft-style surgery).

    The new modules start with random cores and identity wrappers; their values come from the checkpoint
    being loaded (or from ``moe_ds.checkpoint.compress_model``, which fills them from dense experts).

    Args:
        model: a transformers MoE causal LM of a supported family (may live on the meta device).
        ranks: {"gate": r, "up": r, "down": r}.

    Returns:
        ``model``, modified in place.
    """
    for name in find_experts(model).values():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, SharedCoreExperts):
            continue
        ref = old.gate_up_proj
        # Under ZeRO-3 the old parameters are partitioned placeholders: let zero.Init place the new ones.
        device = None if hasattr(ref, "ds_id") else ref.device
        setattr(parent, child, SharedCoreExperts(old.num_experts, old.hidden_dim, old.intermediate_dim, ranks,
                                                 model.config.hidden_act, dtype=ref.dtype, device=device))
    return model


class _SharedCoreMixin:
    """Builds the stock model, then installs shared-core experts of ``config.shared_core["ranks"]``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        section = getattr(config, "shared_core", None)
        if not isinstance(section, dict) or "ranks" not in section:
            raise ValueError("config has no shared_core section with ranks: not a moe-ds compressed model")
        if section.get("format_version") != SHARED_CORE_FORMAT_VERSION:
            raise ValueError(f"unknown shared_core format_version {section.get('format_version')!r}; "
                             f"this code reads version {SHARED_CORE_FORMAT_VERSION}")
        replace_experts(self, section["ranks"])


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

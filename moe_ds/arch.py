"""Per-architecture table: where each supported MoE family keeps its experts, in memory and on disk.

transformers >= 5 holds a layer's experts fused in memory (``mlp.experts.gate_up_proj [E, 2I, d]``,
``mlp.experts.down_proj [E, d, I]``, gate rows first) but ``save_pretrained`` writes one key per expert
and projection (``experts.N.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.N.w1.weight``).
Code that reads checkpoints lazily with ``safe_open`` must use the on-disk names below.

This file is shipped verbatim beside every compressed checkpoint (``trust_remote_code``), so it imports
nothing outside the standard library.
"""

from dataclasses import dataclass, field

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class MoEArchitecture:
    model_type: str  # config.model_type of the original model
    moe_block: str  # attribute of a decoder layer holding the MoE block (router + experts)
    router: str  # attribute of the MoE block holding the router (left untouched)
    experts: str  # attribute of the MoE block holding the fused experts module (replaced)
    shared_experts: tuple[str, ...]  # attributes of the MoE block for always-on experts (left untouched)
    disk_expert_key: str  # on-disk key of one expert's projection; {layer}, {expert}, {proj}
    disk_proj_names: dict = field(default_factory=dict)  # our projection name -> on-disk name
    disk_renames: tuple[tuple[str, str], ...] = ()  # on-disk -> in-memory substring renames
    num_experts_key: str = "num_experts"  # config key for E
    top_k_key: str = "num_experts_per_tok"  # config key for k
    intermediate_size_key: str = "moe_intermediate_size"  # config key for an expert's I

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        """On-disk safetensors key of ``proj`` in {"gate", "up", "down"} of one expert."""
        return self.disk_expert_key.format(layer=layer, expert=expert, proj=self.disk_proj_names[proj])

    def disk_to_memory(self, key: str) -> str:
        """Map an on-disk (non-expert) key to the in-memory parameter name."""
        for old, new in self.disk_renames:
            key = key.replace(old, new)
        return key


_HF_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

ARCHITECTURES: dict[str, MoEArchitecture] = {
    "qwen3_moe": MoEArchitecture(
        model_type="qwen3_moe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        shared_experts=(),
        disk_expert_key="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        disk_proj_names=_HF_PROJ,
    ),
    "qwen2_moe": MoEArchitecture(
        model_type="qwen2_moe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        shared_experts=("shared_expert", "shared_expert_gate"),
        disk_expert_key="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        disk_proj_names=_HF_PROJ,
    ),
    "mixtral": MoEArchitecture(
        model_type="mixtral",
        moe_block="mlp",
        router="gate",
        experts="experts",
        shared_experts=(),
        disk_expert_key="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
        disk_proj_names={"gate": "w1", "up": "w3", "down": "w2"},
        disk_renames=((".block_sparse_moe.", ".mlp."),),
        num_experts_key="num_local_experts",
        intermediate_size_key="intermediate_size",
    ),
    "olmoe": MoEArchitecture(
        model_type="olmoe",
        moe_block="mlp",
        router="gate",
        experts="experts",
        shared_experts=(),
        disk_expert_key="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        disk_proj_names=_HF_PROJ,
        intermediate_size_key="intermediate_size",
    ),
    "deepseek_v3": MoEArchitecture(
        model_type="deepseek_v3",
        moe_block="mlp",
        router="gate",  # holds weight [E, d] and e_score_correction_bias [E]
        experts="experts",
        shared_experts=("shared_experts",),
        disk_expert_key="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        disk_proj_names=_HF_PROJ,
        num_experts_key="n_routed_experts",
    ),
}


class UnsupportedModelError(ValueError):
    """Raised for a model type missing from ARCHITECTURES or a model without MoE layers."""


def get_architecture(model_type: str) -> MoEArchitecture:
    """Look up the table row for ``config.model_type``.

    Raises:
        UnsupportedModelError: ``model_type`` is not in the table; the message lists the supported types.
    """
    base = model_type.removeprefix("shared_core_")
    if base not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by moe-ds; supported MoE types: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[base]

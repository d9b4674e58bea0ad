"""The per-layer steps of ``launch/compress.py --method`` other than the shared-core fit itself (issue #13).

A layer goes through at most one structural step (``prune``: keep E' experts; ``merge``: E' groups of experts,
``moe_ds.expert_pruning``) and at most one weight step (``shared_core`` / ``lowrank`` / ``delta``: factorised
experts, ``moe_ds.fit`` / ``moe_ds.lowrank``; ``magnitude``: unstructured sparsity, ``moe_ds.sparsity``). This
module holds the glue the compressor needs between them: the router of a layer as read from disk, the calibration
statistics of the experts that remain (the moments of a merged group are the sums of its members'), the routing of
the compressed layer on held-out tokens (the stock MoE block's own router code, so every family routes as it
does at inference), and the experts' output error under that routing.
"""

import torch
from torch import nn

from .arch import PROJECTIONS, MoEArchitecture
from .fit import experts_output

# Calibration tensors of one layer that hold one entry (or one matrix) per expert along dim 0.
PER_EXPERT_KEYS = ("tokens", "router_prob_sum", "router_weight_sum", "reap_sum", "gate_up_moment", "down_moment",
                   "gate_up_diag", "down_diag")


def router_prefix(arch: MoEArchitecture, layer: int) -> str:
    """In-memory name prefix of a layer's router module, e.g. ``model.layers.3.mlp.gate.``."""
    return f"model.layers.{layer}.{arch.moe_block}.{arch.router}."


def read_router(reader, layer: int) -> dict[str, torch.Tensor]:
    """The router tensors of one layer by their name inside the router module: ``{"weight": [E, d]}`` plus
    DeepSeek-V3's ``{"e_score_correction_bias": [E]}``, read lazily (``ExpertReader.read``)."""
    prefix = router_prefix(reader.arch, layer)
    keys = [k for k in reader.non_expert_groups().get(layer, []) if reader.arch.disk_to_memory(k).startswith(prefix)]
    return {name.removeprefix(prefix): t for name, t in reader.read(keys).items()}


def group_calibration(cal: dict[str, torch.Tensor], groups: list[list[int]]) -> dict[str, torch.Tensor]:
    """A calibration layer re-expressed for the experts that remain after pruning or merging.

    Per-expert sums (tokens, router sums, REAP sums, second moments Σ x xᵀ and their diagonals) of a group are
    the sums over its members: a merged expert receives the inputs its members received. That is exact for the
    inputs of gate and up (the hidden states) and an approximation for down's, h = act(gate x) ⊙ (up x), which the
    merged expert computes with its averaged gate and up. Shared (per-layer) tensors and the held-out tokens are
    kept; the held-out routing still names the original experts.

    Args:
        cal: ``Calibration.layer(i)``; groups: for each new expert, the original expert ids it stands for
            (one id each under pruning).

    Returns:
        The same keys, per-expert ones with G = len(groups) rows.
    """
    out = dict(cal)
    for key in PER_EXPERT_KEYS:
        if key in cal:
            out[key] = torch.stack([cal[key][list(g)].sum(0) for g in groups])
    return out


def moe_block_class(model_config) -> type:
    """The stock MoE block class of a model (built on the meta device from its config, never allocated)."""
    import transformers as T

    from .modeling_shared_core import find_experts

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(model_config)
    layer = next(iter(find_experts(model)))
    from .arch import get_architecture

    return type(model.get_submodule(f"model.layers.{layer}.{get_architecture(model_config.model_type).moe_block}"))


class _CaptureRouting(nn.Module):
    """Stands in for a block's experts: records the routing the block hands them and returns zeros."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.top_k_index, self.top_k_weights = top_k_index, top_k_weights
        return torch.zeros_like(hidden_states)


def block_routing(model_config, arch: MoEArchitecture, router: dict[str, torch.Tensor], x: torch.Tensor,
                  block_cls: type | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of held-out tokens by a layer's router, computed by the family's own MoE block.

    The block is built for ``model_config`` on the meta device, its experts are replaced by a module that records
    (top_k_index, top_k_weights), and only the router's tensors are materialised; so softmax or sigmoid scores,
    normalised top-k, DeepSeek-V3's correction bias and group-limited routing are exactly the model's.

    Args:
        model_config: the config of the model the router belongs to (its expert count equal to the router's rows).
        router: the router module's tensors by name (``read_router``).
        x: [T, d] float32 MoE-block inputs (a calibration's ``heldout_inputs``).

    Returns:
        (top_k_index [T, k] int64, top_k_weights [T, k] float32).
    """
    block_cls = block_cls or moe_block_class(model_config)
    with torch.device("meta"):
        block = block_cls(model_config)
    setattr(block, arch.experts, _CaptureRouting())
    for name in arch.shared_experts:  # their output is discarded; keep them from running on empty tensors
        if hasattr(block, name):
            setattr(block, name, _Zero())
    gate = block.get_submodule(arch.router)
    gate.to_empty(device=x.device)
    gate.load_state_dict({k: v.to(device=x.device, dtype=torch.float32) for k, v in router.items()}, strict=True)
    gate.float()
    capture = getattr(block, arch.experts)
    with torch.no_grad():
        block(x[None].float())
    return capture.top_k_index.long(), capture.top_k_weights.float()


class _Zero(nn.Module):
    """A shared expert (or its gate) that contributes nothing: routing only is wanted."""

    def forward(self, x):
        return torch.zeros_like(x[..., :1]) if x.dim() else x


def routed_output_error(original: dict[str, torch.Tensor], cal: dict[str, torch.Tensor], experts: nn.Module,
                        top_k_index: torch.Tensor, top_k_weights: torch.Tensor, hidden_act: str = "silu") -> float:
    """||Ŷ − Y|| / ||Y|| of a layer's routed experts on the calibration's held-out tokens, each side under its own
    router: Y = Σ_j g_j f_{e_j}(x) with the original experts and routing (``heldout_topk_*``), Ŷ the compressed
    experts module (any form, or dense) under the compressed layer's routing (``block_routing``).

    Args:
        original: {"gate", "up", "down"} original dense weights [E, ...]; cal: the ORIGINAL calibration layer;
        experts: the compressed layer's experts module (forward(x, top_k_index, top_k_weights));
        top_k_index, top_k_weights: [T, k] the compressed layer's routing of ``cal["heldout_inputs"]``.

    Raises:
        ValueError: the calibration holds no held-out tokens.
    """
    x = cal["heldout_inputs"].float()
    if x.shape[0] == 0:
        raise ValueError("the calibration holds no held-out tokens")
    with torch.no_grad():
        y = experts_output(original, x, cal["heldout_topk_ids"].long(), cal["heldout_topk_weights"].float(),
                           hidden_act)
        y_hat = experts(x, top_k_index, top_k_weights.to(x.dtype))
    return (torch.linalg.vector_norm(y_hat - y) / torch.linalg.vector_norm(y).clamp_min(1e-30)).item()


class DenseExperts(nn.Module):
    """A layer's dense SwiGLU experts {"gate", "up", "down"} [E, ...] as an experts module (reference forward)."""

    def __init__(self, weights: dict[str, torch.Tensor], hidden_act: str = "silu"):
        super().__init__()
        self.weights, self.hidden_act = {p: weights[p].float() for p in PROJECTIONS}, hidden_act

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_output(self.weights, hidden_states, top_k_index, top_k_weights, self.hidden_act)

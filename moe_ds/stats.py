"""Parameter and compute accounting of a shared-core model against its original (compression_statistics.yaml).

Everything is computed from the config alone (models are built on the meta device, no weights), so it
works for Qwen3-30B-A3B-sized models on a laptop.

Conventions:
    * expert parameters: the routed experts of the MoE layers (shared experts and routers are not experts);
      a compressed layer holds, per projection p with shape (d_out, d_in), one core d_out·d_in plus
      E·2·r_p·(d_in + d_out) wrapper parameters.
    * active parameters per token: every parameter except the routed experts a token does not visit; the
      core is active once per token (it is used by all k visited experts).
    * expert MACs per token: multiply-accumulates of the routed experts for one token. Original: 3·k·d·I.
      Compressed: see ``SharedCoreExperts`` — 3·d·I + k·Σ_p r_p·c_p + E·d·I·Σ_p r_p / T, with
      c_gate = c_up = d + 3I and c_down = 3I + d, and T the tokens in one forward call (``tokens_per_forward``).
"""

import torch

from .arch import PROJECTIONS, get_architecture
from .modeling_shared_core import base_model_class, find_experts

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied tensors


def expert_shapes(config) -> dict:
    """E, k, d, I and the MoE layer indices of a (base or shared-core) config, via a meta-device build."""
    arch = get_architecture(config.model_type)
    base_config, base_cls = base_model_class(config)
    with torch.device("meta"):
        base = base_cls(base_config)
    layers = list(find_experts(base))
    return {
        "num_experts": int(getattr(config, arch.num_experts_key)),
        "top_k": int(getattr(config, arch.top_k_key)),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(getattr(config, arch.intermediate_size_key)),
        "moe_layers": layers,
        "total_params": _num_params(base),
    }


def compression_statistics(config, tokens_per_forward: int = 8192) -> dict:
    """Original vs compressed parameter counts, active parameters, expert MACs per token and bytes.

    Args:
        config: a shared-core config (with a ``shared_core`` section holding ``ranks``).
        tokens_per_forward: T over which the once-per-forward precomputation is amortised.

    Returns:
        A nested dict of plain ints/floats (YAML-ready); ratios are compressed / original.
    """
    ranks = {p: int(config.shared_core["ranks"][p]) for p in PROJECTIONS}
    s = expert_shapes(config)
    e, k, d, i, n_layers = s["num_experts"], s["top_k"], s["hidden_size"], s["intermediate_size"], len(s["moe_layers"])
    shapes = {"gate": (i, d), "up": (i, d), "down": (d, i)}

    orig_expert = 3 * d * i  # one dense expert
    wrapper = sum(2 * ranks[p] * (shapes[p][0] + shapes[p][1]) for p in PROJECTIONS)  # one expert's wrappers
    cores = 3 * d * i  # the three cores of one layer
    orig_layer = e * orig_expert
    comp_layer = cores + e * wrapper

    total_orig = s["total_params"]
    non_expert = total_orig - n_layers * orig_layer
    total_comp = non_expert + n_layers * comp_layer
    active_orig = total_orig - n_layers * (e - k) * orig_expert
    active_comp = total_comp - n_layers * (e - k) * wrapper

    per_expert_macs = sum(ranks[p] * c for p, c in (("gate", d + 3 * i), ("up", d + 3 * i), ("down", 3 * i + d)))
    macs_orig = n_layers * 3 * k * d * i
    macs_comp_inf = n_layers * (3 * d * i + k * per_expert_macs)
    macs_comp = macs_comp_inf + n_layers * e * d * i * sum(ranks.values()) / tokens_per_forward

    dtype = str(getattr(config, "dtype", None) or "float32")
    nbytes = DTYPE_BYTES.get(dtype.replace("torch.", ""), 4)
    return {
        "model_type": get_architecture(config.model_type).model_type,
        "ranks": ranks,
        "shape": {"moe_layers": n_layers, "num_experts": e, "top_k": k, "hidden_size": d, "intermediate_size": i},
        "expert_params": {"original": n_layers * orig_layer, "compressed": n_layers * comp_layer,
                          "ratio": comp_layer / orig_layer},
        "total_params": {"original": total_orig, "compressed": total_comp, "ratio": total_comp / total_orig},
        "active_params_per_token": {"original": active_orig, "compressed": active_comp,
                                    "ratio": active_comp / active_orig},
        "expert_macs_per_token": {"original": macs_orig, "compressed": round(macs_comp),
                                  "compressed_without_precompute": macs_comp_inf, "ratio": macs_comp / macs_orig,
                                  "tokens_per_forward": tokens_per_forward},
        "bytes": {"dtype": dtype.replace("torch.", ""), "original": total_orig * nbytes,
                  "compressed": total_comp * nbytes, "ratio": total_comp / total_orig},
    }

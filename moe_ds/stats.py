"""Expert-storage and compute accounting of compressed models (compression_statistics.yaml).

``expert_params``/``expert_bytes`` are the one formula for a MoE layer's routed-expert storage, dense or in a
compressed form (shared core, lowrank, delta); the rank choice (``moe_ds.compress``) and ``compression_statistics`` both use it. Statistics
come from the config alone (meta-device builds, no weights), so they run for 30B-parameter models anywhere;
``routing_statistics`` adds, per layer, what a calibration measured of the router.
"""

import math

import torch

from .arch import PROJECTIONS, get_architecture
from .lowrank import lowrank_params
from .modeling_shared_core import FORMS, base_model_class, checkpoint_form, find_experts

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def projection_shapes(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each SwiGLU projection: gate and up (I, d), down (d, I)."""
    d, i = hidden_size, intermediate_size
    return {"gate": (i, d), "up": (i, d), "down": (d, i)}


def _ranks(ranks: int | dict) -> dict[str, int]:
    return {p: int(ranks if isinstance(ranks, int) else ranks[p]) for p in PROJECTIONS}


def wrapper_params(hidden_size: int, intermediate_size: int, ranks: int | dict) -> int:
    """Parameters of one expert's wrappers (U_in, V_in, U_out, V_out of the three projections).

    Σ_p 2·r_p·(d_in + d_out); ``ranks`` is one r for all projections or {"gate": r, "up": r, "down": r}.
    """
    shapes, r = projection_shapes(hidden_size, intermediate_size), _ranks(ranks)
    return sum(2 * r[p] * (d_out + d_in) for p, (d_out, d_in) in shapes.items())


def expert_params(num_experts: int, hidden_size: int, intermediate_size: int, ranks: int | dict | None = None,
                  form: str = "shared_core") -> int:
    """Routed-expert parameters of one MoE layer: dense E·3·d·I (``ranks=None``); with ranks, by ``form``:
    "shared_core" 3·d·I (the three cores, once per layer) + E·``wrapper_params``; "lowrank" E·Σ_p r_p·(d + I);
    "delta" that + 3·d·I (the three bases) (``lowrank.lowrank_params``).

    Raises:
        ValueError: an unknown form.
    """
    d, i = hidden_size, intermediate_size
    if ranks is None:
        return num_experts * 3 * d * i
    if form not in FORMS:
        raise ValueError(f"unknown expert form {form!r}; expected one of {', '.join(FORMS)}")
    if form != "shared_core":
        return lowrank_params(num_experts, d, i, ranks, base=form == "delta")
    return 3 * d * i + num_experts * wrapper_params(d, i, ranks)


def dtype_bytes(dtype: str | torch.dtype | None) -> int:
    """Bytes per element of a floating dtype given as "bfloat16", "torch.bfloat16" or ``torch.bfloat16``
    (None and unknown names: 4, float32)."""
    return DTYPE_BYTES.get(str(dtype or "float32").replace("torch.", ""), 4)


def expert_bytes(num_experts: int, hidden_size: int, intermediate_size: int, ranks: int | dict | None = None,
                 dtype: str | torch.dtype | None = "float32", form: str = "shared_core") -> int:
    """Routed-expert storage of one MoE layer in bytes: ``expert_params`` × ``dtype_bytes(dtype)``."""
    return expert_params(num_experts, hidden_size, intermediate_size, ranks, form) * dtype_bytes(dtype)


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

    Expert MACs per token follow the experts modules' cost models (original 3·k·d·I):
    shared core (``SharedCoreExperts``) 3·d·I + k·Σ_p r_p·c_p + E·d·I·Σ_p r_p / T with c_gate = c_up = c_down = d + 3I;
    lowrank (``LowRankExperts``) k·Σ_p r_p·(d + I); delta 3·d·I + k·Σ_p r_p·(d + I) (no per-forward term).
    Active parameters per token: everything but the (E − k) unvisited experts' own parameters (wrappers, or A and B).

    Args:
        config: a compressed config (with a ``shared_core`` section holding ``ranks`` and, optionally, ``form``).
        tokens_per_forward: T over which the shared core's once-per-forward precomputation is amortised.

    Returns:
        A nested dict of plain ints/floats (YAML-ready); ratios are compressed / original.

    Raises:
        ValueError: the section's format version or form is unknown (``modeling_shared_core.checkpoint_form``).
    """
    form = checkpoint_form(config.shared_core)
    ranks = _ranks(config.shared_core["ranks"])
    s = expert_shapes(config)
    e, k, d, i, n_layers = s["num_experts"], s["top_k"], s["hidden_size"], s["intermediate_size"], len(s["moe_layers"])
    orig_layer = expert_params(e, d, i)
    comp_layer = expert_params(e, d, i, ranks, form)
    if form == "shared_core":
        own = wrapper_params(d, i, ranks)  # one expert's wrappers
        per_expert_macs = sum(ranks[p] * c for p, c in (("gate", d + 3 * i), ("up", d + 3 * i), ("down", 3 * i + d)))
        per_token_macs = 3 * d * i  # the cores
        precompute_macs = e * d * i * sum(ranks.values())  # per forward
    else:
        own = lowrank_params(1, d, i, ranks, base=False)  # one expert's A and B
        per_expert_macs = own
        per_token_macs = 3 * d * i if form == "delta" else 0  # the bases
        precompute_macs = 0

    total_orig = s["total_params"]
    non_expert = total_orig - n_layers * orig_layer
    total_comp = non_expert + n_layers * comp_layer
    active_orig = total_orig - n_layers * (e - k) * expert_params(1, d, i)
    active_comp = total_comp - n_layers * (e - k) * own

    macs_orig = n_layers * 3 * k * d * i
    macs_comp_inf = n_layers * (per_token_macs + k * per_expert_macs)
    macs_comp = macs_comp_inf + n_layers * precompute_macs / tokens_per_forward

    dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    nbytes = dtype_bytes(dtype)
    return {
        "model_type": get_architecture(config.model_type).model_type,
        "form": form,
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
        "bytes": {"dtype": dtype, "original": total_orig * nbytes, "compressed": total_comp * nbytes,
                  "ratio": total_comp / total_orig, "experts_original": n_layers * expert_bytes(e, d, i, None, dtype),
                  "experts_compressed": n_layers * expert_bytes(e, d, i, ranks, dtype, form)},
    }


RARE_EXPERT_SHARE = 0.01  # an expert visited by fewer than this share of a layer's tokens counts as rarely used


def routing_statistics(tokens, total_tokens: int, rare_share: float = RARE_EXPERT_SHARE) -> dict:
    """How evenly one MoE layer's router spreads tokens over its experts (from a calibration's ``tokens``).

    Args:
        tokens: [E] tokens routed to each expert (top-k slots; a tensor or a sequence of numbers).
        total_tokens: the tokens the layer saw, each counted once whatever k is (the calibration's ``tokens``).
        rare_share: expert e is rarely used when tokens_e < rare_share · total_tokens, i.e. fewer than 1 % of the
            tokens visit it (at k = 8 of E = 128, uniform routing sends each expert 6.25 % of the tokens).

    Returns:
        {"routing_entropy": H(p) in nats of p_e = tokens_e / Σ tokens, "max_entropy": log E (uniform routing),
        "normalized_entropy": H / log E, "rare_experts": how many experts are rarely used, "rare_expert_share":
        that count / E, "rare_threshold": rare_share}, plain floats and ints (YAML-ready).
    """
    counts = torch.as_tensor(tokens, dtype=torch.float64).clamp_min(0)
    e = counts.numel()
    p = counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / e)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    rare = int((counts < rare_share * total_tokens).sum().item())
    return {"routing_entropy": entropy, "max_entropy": math.log(e),
            "normalized_entropy": entropy / math.log(e) if e > 1 else 1.0, "rare_experts": rare,
            "rare_expert_share": rare / e, "rare_threshold": rare_share}


# Top-level aten ops that launch no kernel: views, allocations and no-op casts.
_NO_KERNEL_OPS = {"view", "reshape", "_reshape_alias", "as_strided", "transpose", "t", "unsqueeze", "squeeze",
                  "slice", "select", "expand", "permute", "alias", "detach", "unbind", "split", "split_with_sizes",
                  "numpy_T", "mT", "lift_fresh", "empty", "empty_like", "empty_strided", "resolve_conj",
                  "resolve_neg", "_unsafe_view", "narrow", "contiguous", "to"}


def compute_ops(fn, *args, **kwargs) -> int:
    """Count the top-level aten ops that do work in one call ``fn(*args, **kwargs)`` (torch.profiler, CPU events).

    Views, allocations and no-op casts are left out, and ops called from inside another aten op are counted once
    (as their caller). On a CPU this is a proxy for the kernel launches the same call makes on a GPU (issue #11:
    the per-expert loop made ~4,700 per layer forward at E = 128). Autograd's backward ops run as top-level
    aten ops of the call too, so a forward+backward counts both.

    Returns:
        The number of ops (int).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name[6:] not in _NO_KERNEL_OPS
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

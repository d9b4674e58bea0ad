"""Plan a run before it starts: memory per rank and disk of every stage, from the model's config alone.

Nothing is loaded: the original and compressed models are built on the meta device; the distillation's GPU
memory comes from DeepSpeed's own ZeRO-3 estimator. Activations are not modelled (they depend on the batch and
on gradient checkpointing); the logits, the largest activation of each stage, are.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import AutoConfig

from .arch import get_architecture
from .checkpoint import shared_core_config
from .modeling_shared_core import shared_core_classes
from .stats import compression_statistics, dtype_bytes, expert_params, projection_shapes
from .teacher_cache import _DATASETS

logger = logging.getLogger("moe_ds")

GB = 1e9
# Bytes per cached token relative to compression "none", measured by bench/teacher_cache.py (V = 151,936,
# k = 64, Zipf-like logits): 392 / 187 / 157 bytes per token. Real logits compress differently: an estimate.
CACHE_FILTER_RATIO = {"none": 1.0, "lzf": 187 / 392, "gzip": 157 / 392}


class PlanError(ValueError):
    """A model or setting the planner cannot plan for (the message names it)."""


@dataclass
class PlanConfig:
    model: str  # original MoE model: local directory or Hub id (only config.json is read)
    rank: int | None = None  # wrapper rank r (give this or target_ratio)
    target_ratio: float | None = None  # the largest r whose expert-parameter ratio is <= this
    gpus: int = 8  # GPUs per node
    nodes: int = 1  # nodes
    distill_gpus: int = 6  # GPUs per node that train; the others evaluate
    top_k: int = 64  # teacher logits cached per position
    seq_len: int = 2048  # tokens per packed sequence
    tokens: int = 491_520_000  # tokens cached and trained on (one pass)
    batch_size: int = 4  # sequences per GPU per micro-step, distillation
    cache_batch_size: int = 8  # sequences per teacher forward, cache
    compression: Literal["none", "lzf", "gzip"] = "lzf"  # HDF5 filter of the cache
    trainable: Literal["experts", "all"] = "experts"  # what distillation trains: compressed experts + routers, or all
    objective: Literal["weight", "activation"] = "weight"  # the compress fit's objective (activation: with --calibration)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # training and storage dtype

    def __post_init__(self):
        if (self.rank is None) == (self.target_ratio is None):
            raise PlanError("give exactly one of rank and target_ratio")
        for name in ("gpus", "nodes", "distill_gpus", "top_k", "seq_len", "tokens", "batch_size", "cache_batch_size"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_gpus > self.gpus:
            raise PlanError(f"distill_gpus={self.distill_gpus} exceeds gpus={self.gpus}")


def load_config(model: str):
    """The config of a local model folder, or of a Hub id (config.json only, from the cache when offline).

    Raises:
        PlanError: neither a folder with config.json nor a resolvable Hub id.
    """
    path = Path(model)
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        from huggingface_hub import hf_hub_download

        return AutoConfig.from_pretrained(Path(hf_hub_download(model, "config.json")).parent)
    except Exception as err:  # offline and uncached, unknown id, unreadable config
        raise PlanError(f"cannot read the config of {model!r} ({type(err).__name__}: {err})") from err


def _largest_module_params(model: torch.nn.Module) -> int:
    """DeepSpeed's "largest layer": the most parameters one module holds itself (``model_to_params``, which
    cannot be called on the meta device: it de-duplicates by data pointer)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def fit_peak_bytes(num_experts: int, d_out: int, d_in: int, rank: int, objective: str = "weight") -> int:
    """Peak device memory of ``moe_ds.fit.fit_projection`` on one [E, d_out, d_in] projection, in bytes.

    The fit runs in fp32. Its peak is in the Adam loop: the weights W, plus the autograd graph of
    ||W − Ŵ||² (C(I + U_in V_inᵀ), the output wrapper's update, Ŵ, W − Ŵ and the square's gradient: five
    [E, d_out, d_in] tensors), plus the core and the wrappers four or five times over (parameters, gradients,
    two Adam moments, and the start kept for the initial error). The "svd" start peaks lower (the Gram matrix of
    its ridge solve is built on the smaller side). Measured against torch.profiler's memory timeline on CPU
    (``tests/test_plan.py``) and ``torch.cuda.max_memory_allocated`` on a GPU (the ``gpu`` test).

    The activation objective (``--calibration``) also holds the whitened target W·S and the whitening S itself,
    one [E, d_in, d_in] tensor: + 4·(E·d_out·d_in + E·d_in²) (``fit_projection``'s docstring; torch.profiler).

    Args:
        num_experts, d_out, d_in: E and the projection's shape; rank: r; objective: "weight" or "activation".

    Returns:
        Bytes: 4·(6·E·d_out·d_in + 4·d_out·d_in + 5·2·E·r·(d_out + d_in)), plus the activation term.
    """
    weights = num_experts * d_out * d_in
    wrappers = num_experts * 2 * rank * (d_out + d_in)
    extra = weights + num_experts * d_in * d_in if objective == "activation" else 0
    return 4 * (6 * weights + 4 * d_out * d_in + 5 * wrappers + extra)


def plan(cfg: PlanConfig, config=None) -> dict:
    """Memory and disk of the four stages for ``cfg`` (bytes; see the module docstring for what is modelled).

    Args:
        cfg: the run to plan.
        config: the original model's config (default: read from ``cfg.model``).

    Raises:
        PlanError: bad settings, unreadable config, or a rank too large for the shape.
        UnsupportedModelError: not a supported MoE family.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from .compress import rank_for_ratio

    config = config if config is not None else load_config(cfg.model)
    arch = get_architecture(config.model_type)
    e, d = int(getattr(config, arch.num_experts_key)), int(config.hidden_size)
    i, vocab = int(getattr(config, arch.intermediate_size_key)), int(config.vocab_size)
    rank = cfg.rank if cfg.rank is not None else rank_for_ratio(cfg.target_ratio, e, d, i)
    if rank > min(d, i):
        raise PlanError(f"rank {rank} is too large for the layer shape (d={d}, I={i})")
    ranks = {"gate": rank, "up": rank, "down": rank}
    compressed_config = shared_core_config(config, ranks, method="svd")
    stats = compression_statistics(compressed_config, tokens_per_forward=cfg.batch_size * cfg.seq_len)
    stored = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    b_stored, b = dtype_bytes(stored), dtype_bytes(cfg.dtype)
    total_orig, total_comp = stats["total_params"]["original"], stats["total_params"]["compressed"]
    n_layers = stats["shape"]["moe_layers"]
    expert_comp = stats["expert_params"]["compressed"]
    _, model_cls = shared_core_classes(compressed_config.model_type)
    with torch.device("meta"):
        largest = _largest_module_params(model_cls(compressed_config))

    # Stage 1: one layer's experts read in the stored dtype (host); the fit of one projection in fp32 (device).
    fit_device = max(fit_peak_bytes(e, do, di, rank, cfg.objective) for do, di in projection_shapes(d, i).values())
    compress = {"host_per_rank": 3 * e * d * i * b_stored, "device_per_rank": fit_device,
                "disk_model": total_comp * b_stored, "disk_factors": n_layers * expert_params(e, d, i, ranks) * 4}

    # Stage 2: the whole teacher on every GPU (loaded straight onto it), its fp32 logits for one batch.
    per_token = sum(np.dtype(dt).itemsize * math.prod(shape(1, cfg.top_k)) for dt, shape in _DATASETS.values())
    cache = {"device_per_rank": total_orig * b + cfg.cache_batch_size * cfg.seq_len * vocab * 4,
             "bytes_per_token": per_token * CACHE_FILTER_RATIO[cfg.compression],
             "disk": cfg.tokens * per_token * CACHE_FILTER_RATIO[cfg.compression]}

    # Stage 3: DeepSpeed's ZeRO-3 estimate (every parameter trainable: an upper bound), and the same count for
    # what is really trained; plus the logits and the KD loss's gradient buffer, both in the training dtype.
    _, ds_device, _ = estimate_zero3_model_states_mem_needs(total_comp, largest, num_gpus_per_node=cfg.distill_gpus,
                                                            num_nodes=cfg.nodes, cpu_offload=False)
    world = cfg.distill_gpus * cfg.nodes
    trainable = expert_comp + n_layers * e * d if cfg.trainable == "experts" else total_comp  # + routers
    states = (total_comp * b + trainable * (b + 12)) / world + 4 * largest  # params, grads, fp32 master + Adam
    logits = 2 * cfg.batch_size * cfg.seq_len * vocab * b
    steps = cfg.tokens // (world * cfg.batch_size * cfg.seq_len)
    distill = {"device_per_rank_deepspeed": ds_device + logits, "device_per_rank": states + logits,
               "trainable_params": trainable, "steps": steps,
               "disk_per_checkpoint": total_comp * b + trainable * 12, "disk_weights_only": total_comp * b,
               "disk_training_state": trainable * 12}  # fp32 master + Adam m, v: only in the newest checkpoint(s)

    # Stage 4: the compressed model spread over the evaluation GPUs, one batch of logits.
    eval_gpus = max(cfg.gpus - cfg.distill_gpus, 1)
    evaluate = {"device_per_gpu": total_comp * b / eval_gpus + cfg.batch_size * cfg.seq_len * vocab * 4}
    return {"model": cfg.model, "shape": stats["shape"], "rank": rank, "params": stats["total_params"],
            "expert_ratio": stats["expert_params"]["ratio"], "compress": compress, "cache": cache,
            "distill": distill, "evaluate": evaluate}


def plan_table(p: dict, cfg: PlanConfig) -> str:
    """The plan as a markdown table, GB = 1e9 bytes."""
    def gb(x):
        return f"{x / GB:,.1f} GB"

    c, t, s, v = p["compress"], p["cache"], p["distill"], p["evaluate"]
    world = cfg.distill_gpus * cfg.nodes
    rows = [
        ("1 compress", f"{cfg.gpus * cfg.nodes} ranks", f"{gb(c['device_per_rank'])} per GPU (fit of one projection)",
         f"{gb(c['host_per_rank'])} per rank (one layer's experts)",
         f"{gb(c['disk_model'])} model + {gb(c['disk_factors'])} factors while running"),
        ("2 cache", f"{cfg.gpus * cfg.nodes} ranks", f"{gb(t['device_per_rank'])} per GPU (teacher + logits)",
         "small (loaded onto the GPU)", f"{gb(t['disk'])} ({t['bytes_per_token']:.0f} B/token, {cfg.compression})"),
        ("3 distill", f"{world} ranks, ZeRO-3",
         f"{gb(s['device_per_rank'])} per GPU ({gb(s['device_per_rank_deepspeed'])} by DeepSpeed's estimator, all "
         f"trainable)", "small", f"{gb(s['disk_weights_only'])} weights per checkpoint, + "
         f"{gb(s['disk_training_state'])} resume state in the newest (--keep-training-state 1)"),
        ("4 evaluate", f"{max(cfg.gpus - cfg.distill_gpus, 1)} GPUs", f"{gb(v['device_per_gpu'])} per GPU", "small",
         "results only"),
    ]
    head = (f"# {p['model']}: E={p['shape']['num_experts']}, {p['shape']['moe_layers']} MoE layers, "
            f"d={p['shape']['hidden_size']}, I={p['shape']['intermediate_size']}; rank {p['rank']} keeps "
            f"{p['expert_ratio']:.1%} of the expert parameters; {p['params']['original'] / 1e9:.2f} B -> "
            f"{p['params']['compressed'] / 1e9:.2f} B parameters; {cfg.tokens / 1e6:,.1f} M tokens = "
            f"{s['steps']:,} steps of {world} x {cfg.batch_size} x {cfg.seq_len}; activations not included")
    lines = [head, "| stage | ranks | GPU memory | host memory | disk |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)

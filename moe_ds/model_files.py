"""Reading the model a stage starts from: a local folder or a Hub id, and its experts' weights by layer.

Shared by compression (``moe_ds.compress``), calibration (``moe_ds.calibrate``) and the evaluator's baseline, so
that none of them imports another stage. ``ExpertReader`` reads only the safetensors entries of the layers asked
for (``safe_open``), never the whole model.
"""

import re
from pathlib import Path

import torch

from .arch import PROJECTIONS, get_architecture
from .checkpoint import read_tensors, read_weight_map

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class CompressError(ValueError):
    """Bad input to the compression (or calibration) stage: the model cannot be found or read (the message names
    the problem)."""


def is_hub_id(name: str) -> bool:
    """``name`` is no existing path and reads as a Hub id ``org/name`` (``./x``, ``/x`` and ``~/x`` stay paths)."""
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a Hub id resolved with huggingface_hub (config, weights, tokenizer).

    Raises:
        CompressError: not a directory and not downloadable (offline and not cached, or unknown id).
    """
    path = Path(model)
    if path.is_dir():
        return path
    if not is_hub_id(model):
        raise CompressError(f"model {model!r} is not a directory (and not a Hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                             "*.jinja"]))
    except Exception as err:  # offline and not cached, unknown repo, no network
        raise CompressError(f"cannot resolve {model!r}: not a local directory, and the Hub lookup failed "
                            f"({type(err).__name__}: {err}). Offline? Pass a local directory or pre-download.") from err


class ExpertReader:
    """Reads one layer's expert weights at a time from a model directory's safetensors, never the whole model.

    Raises (at construction):
        CheckpointError: no safetensors weights, or a missing shard (``checkpoint.read_weight_map``).
        CompressError: no MoE expert weights, or some experts' weights missing.
        UnsupportedModelError: the model type is not in ``arch.ARCHITECTURES``.
    """

    def __init__(self, model_dir: Path, config):
        self.model_dir = Path(model_dir)
        self.arch = get_architecture(config.model_type)
        self.num_experts = int(getattr(config, self.arch.num_experts_key))
        self.weight_map = read_weight_map(self.model_dir)
        quantized = getattr(config, "quantization_config", None) or {}
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method",
                                                                                         None)
        scales = [key for key in self.weight_map if key.endswith("weight_scale_inv")]
        if method or scales:  # e.g. DeepSeek-V3's block-wise FP8 checkpoints
            raise CompressError(f"{self.model_dir} stores quantized weights (quant_method={method!r}, "
                                f"{len(scales)} *weight_scale_inv tensors); the fit needs the experts in "
                                f"bf16/fp16/fp32: dequantize the checkpoint first")
        self.layers = sorted(layer for layer in range(int(config.num_hidden_layers))
                             if self.arch.expert_key(layer, 0, "gate") in self.weight_map)
        if not self.layers:
            raise CompressError(f"{self.model_dir}: no MoE expert weights found (looked for keys like "
                                f"{self.arch.expert_key(0, 0, 'gate')!r})")
        self.expert_keys = {self.arch.expert_key(layer, e, p) for layer in self.layers
                            for e in range(self.num_experts) for p in PROJECTIONS}
        absent = sorted(self.expert_keys - set(self.weight_map))
        if absent:
            raise CompressError(f"{self.model_dir}: {len(absent)} expert weights missing, e.g. {absent[:3]}")

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """{proj: [E, d_out, d_in]} in the stored dtype, read lazily with ``safe_open``."""
        keys = {p: [self.arch.expert_key(layer, e, p) for e in range(self.num_experts)] for p in PROJECTIONS}
        tensors = read_tensors(self.model_dir, self.weight_map, [k for ks in keys.values() for k in ks])
        return {p: torch.stack([tensors.pop(k) for k in ks]) for p, ks in keys.items()}

    def non_expert_groups(self) -> dict[int, list[str]]:
        """On-disk keys of every other tensor (embeddings, attention, norms, routers, shared experts), grouped
        by decoder layer (-1: outside the layers)."""
        groups: dict[int, list[str]] = {}
        for key in self.weight_map:
            if key not in self.expert_keys:
                m = _LAYER_KEY.match(key)
                groups.setdefault(int(m.group(1)) if m else -1, []).append(key)
        return groups

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The given on-disk keys, returned under their in-memory names."""
        tensors = read_tensors(self.model_dir, self.weight_map, keys)
        return {self.arch.disk_to_memory(key): tensor for key, tensor in tensors.items()}

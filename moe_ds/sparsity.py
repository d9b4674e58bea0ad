"""Magnitude pruning of expert weights, its honest storage cost, the masks kept during distillation, and the
expert usage that progressive expert pruning reads.

Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections"; the background notes'
``MagnitudePruner``: prune |w| < threshold, then retrain with the mask held) zeroes the smallest weights of each
(layer, projection) — one threshold over the E experts of a layer's gate, up or down projection. The pruned
model is a stock checkpoint with zeros in place of the pruned weights (it loads anywhere) whose config.json holds
``SPARSITY_KEY``: ``sparsity_section``.

Storage is counted as a bitmap format: the nnz kept values in the weight dtype plus one bit per weight
(``sparse_bytes``). That is the index of compressed-tensors' "sparse-bitmask" format (``BitmaskConfig``, used by
llm-compressor/vLLM), which packs the bitmap row by row and adds one int64 row offset per row: at
d_in = 768, bf16, that is 8 / (768 · 2) ≈ 0.5 % of the dense bytes more than counted here.

During distillation (``MaskedGradients``) a pruned weight stays exactly 0: the gradient of each dense expert weight
(``gate_up_proj``, ``down_proj``) is multiplied by (w != 0) in a tensor hook, so Adam's moments stay 0 there, the update m̂/(√v̂ + ε) is 0 and the
decoupled weight decay w·(1 − lr·λ) keeps 0 at 0. The mask is the weights' own zero pattern, read from the
parameter while the hook runs: no mask is stored (a boolean mask of Qwen3-30B-A3B's 28.99 B expert weights would
take 29 GB per rank). Under ZeRO-3 the hook runs inside the experts module's backward, while DeepSpeed holds the
parameter gathered (its AccumulateGrad node runs before the module's post-backward release; checked under the
2-rank ZeRO-3 launcher by ``tests/test_sparsity.py``); a hook that ever sees a partitioned parameter raises
instead of leaving the gradient unmasked.

``ExpertUsage`` counts, per MoE layer and expert, the tokens the student's routers send to each expert and the
routing weight they give it, with forward hooks on the router modules during training forwards only.
"""

import contextlib
import json
import math
from pathlib import Path

import torch

from .arch import get_architecture
from .dist import all_reduce_sum, dist_info

SPARSITY_KEY = "moe_ds_sparsity"  # config.json key of a magnitude-pruned model
SPARSITY_FORMAT = "bitmap"  # values of the kept weights + one bit per weight (see sparse_bytes)
SPARSITY_METHODS = ("magnitude",)
USAGE_FILE = "expert_usage.json"  # in every distillation checkpoint: usage since its stage started
USAGE_FORMAT_VERSION = 1
USAGE_SCORES = {"frequency": "tokens", "router_weight": "router_weight_sum"}  # prune_score -> usage tensor
DENSE_EXPERT_WEIGHTS = (".gate_up_proj", ".down_proj")  # the fused experts' weights (transformers >= 5)
_CHUNK = 1 << 24  # elements compared per step of a gradient mask (bounds its temporary boolean to 16 MB)


class SparsityError(ValueError):
    """A sparsity, threshold, byte ratio or ``moe_ds_sparsity`` section that cannot be used."""


# ----------------------------------------------------------------------------------------- magnitude masks

def magnitude_masks(w: torch.Tensor, sparsity: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Keep-mask of the weights whose magnitude survives magnitude pruning over the whole tensor.

    Give exactly one of ``sparsity`` (prune the round(sparsity · numel) smallest |w|: the per-tensor quantile,
    exact in count; equal magnitudes at the cut are pruned in flat-index order, so ties are broken
    deterministically) or ``threshold`` (prune |w| < threshold, the notes' MagnitudePruner rule).
    Pass one (layer, projection) at a time, e.g. the gate rows of ``gate_up_proj`` for all E experts.

    Args:
        w: [E, d_out, d_in] (any shape works) floating weights.
        sparsity: share of weights to prune, in [0, 1].
        threshold: magnitude below which weights are pruned, >= 0.

    Returns:
        BoolTensor of w's shape and device: True where the weight is kept.

    Raises:
        SparsityError: neither or both of sparsity/threshold, a value out of range, or non-finite weights.
    """
    if (sparsity is None) == (threshold is None):
        raise SparsityError("give exactly one of sparsity and threshold")
    a = w.detach().abs()
    if not torch.isfinite(a).all():
        raise SparsityError(f"weights of shape {list(w.shape)} hold NaN or infinite values: cannot rank magnitudes")
    if threshold is not None:
        if not (math.isfinite(threshold) and threshold >= 0):
            raise SparsityError(f"threshold must be a finite number >= 0, got {threshold}")
        return a >= threshold
    if not 0 <= sparsity <= 1:
        raise SparsityError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = a.reshape(-1)
    n = flat.numel()
    k = math.floor(sparsity * n + 0.5)  # weights to prune
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    if k == n:
        return torch.zeros_like(w, dtype=torch.bool)
    cut = flat.kthvalue(k).values  # the k-th smallest magnitude (selection, no full sort)
    keep = flat >= cut
    need = k - (n - int(keep.sum()))  # magnitudes equal to the cut that must still go
    if need > 0:
        ties = (flat == cut).nonzero().squeeze(1)  # ascending flat indices
        keep[ties[:need]] = False
    return keep.reshape(w.shape)


def expert_projections(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fused experts module's projections as views: {"gate": [E, I, d], "up": [E, I, d], "down": [E, d, I]}
    (transformers >= 5 layout, gate rows of ``gate_up_proj`` first)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    inter = down.shape[-1]
    return {"gate": gate_up[:, :inter], "up": gate_up[:, inter:], "down": down}


@torch.no_grad()
def prune_experts_by_magnitude(model: torch.nn.Module, sparsity: float | None = None,
                               threshold: float | None = None) -> dict:
    """Zero the smallest-magnitude weights of every MoE layer's experts in place, per (layer, projection).

    Records nothing in the config: store ``sparsity_section(...)`` under ``SPARSITY_KEY`` when saving.

    Args:
        model: a stock transformers MoE causal LM of a supported family (fused experts, see ``moe_ds.arch``).
        sparsity, threshold: as in ``magnitude_masks``.

    Returns:
        {"numel": expert weights, "nnz": weights kept, "layers": {layer: {proj: nnz}}}.

    Raises:
        SparsityError: see ``magnitude_masks``.
        UnsupportedModelError: not a supported MoE model.
    """
    from .modeling_shared_core import find_experts

    numel, nnz, layers = 0, 0, {}
    for layer, name in find_experts(model).items():
        layers[layer] = {}
        for proj, w in expert_projections(model.get_submodule(name)).items():
            keep = magnitude_masks(w, sparsity=sparsity, threshold=threshold)
            w.masked_fill_(~keep, 0)
            kept = int(keep.sum())
            layers[layer][proj] = kept
            numel, nnz = numel + w.numel(), nnz + kept
    return {"numel": numel, "nnz": nnz, "layers": layers}


# -------------------------------------------------------------------------------------------- storage

def sparse_bytes(numel: int, nnz: int, dtype_bytes: int) -> int:
    """Bytes of a tensor stored as a bitmap sparse format: nnz · dtype_bytes values + ceil(numel / 8) bitmap bytes.

    Raises:
        SparsityError: nnz outside [0, numel] or dtype_bytes < 1.
    """
    if not 0 <= nnz <= numel:
        raise SparsityError(f"nnz must be in [0, numel={numel}], got {nnz}")
    if dtype_bytes < 1:
        raise SparsityError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    return nnz * dtype_bytes + -(-numel // 8)


def density_for_byte_ratio(ratio: float, dtype_bytes: int) -> float:
    """The density nnz / numel at which ``sparse_bytes`` equals ``ratio`` times the dense bytes.

    ratio · numel · b = density · numel · b + numel / 8, so density = ratio − 1 / (8 b) (up to the bitmap's
    rounding to whole bytes: ``nnz_for_bytes`` gives the exact count for one tensor).

    Args:
        ratio: target bytes relative to the dense tensor, in (1 / (8 · dtype_bytes), 1].
        dtype_bytes: bytes per stored value (2 for bf16).

    Raises:
        SparsityError: ratio ≤ the bitmap's own share 1 / (8 · dtype_bytes) (no room for any value), or > 1.
    """
    if dtype_bytes < 1:
        raise SparsityError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    share = 1 / (8 * dtype_bytes)
    if not ratio > share:
        raise SparsityError(f"byte ratio {ratio} leaves nothing for the values: the bitmap alone takes {share:.4g} of "
                            f"the dense bytes at {dtype_bytes} bytes per weight")
    if ratio > 1:
        raise SparsityError(f"byte ratio must be <= 1 (no compression above), got {ratio}")
    return ratio - share


def nnz_for_bytes(numel: int, budget_bytes: int, dtype_bytes: int) -> int:
    """The most values a ``numel``-element tensor may keep so that ``sparse_bytes`` ≤ ``budget_bytes``.

    Raises:
        SparsityError: the budget does not even hold the bitmap.
    """
    room = budget_bytes - -(-numel // 8)
    if room < 0:
        raise SparsityError(f"{budget_bytes} bytes do not hold the bitmap of {numel} weights ({-(-numel // 8)} bytes)")
    return min(numel, room // dtype_bytes)


def sparsity_section(density: float, *, method: str = "magnitude", keep_masks: bool = True,
                     numel: int | None = None, nnz: int | None = None, dtype_bytes: int | None = None,
                     sparsity: float | None = None, threshold: float | None = None) -> dict:
    """The ``SPARSITY_KEY`` entry of a pruned model's config.json.

    Args:
        density: share of expert weights kept (nnz / numel), in [0, 1].
        method: how they were chosen ("magnitude").
        keep_masks: distillation holds the pruned weights at zero (``MaskedGradients``).
        numel, nnz, dtype_bytes: when given, the honest storage figures are added (``sparse_bytes``).
        sparsity, threshold: the setting that produced the pruning, recorded as given.

    Returns:
        {"method", "format": "bitmap", "density", "keep_masks", "scope": "layer_projection"} plus "numel", "nnz",
        "bytes", "dense_bytes", "byte_ratio" and the setting when given.

    Raises:
        SparsityError: unknown method, density outside [0, 1].
    """
    if method not in SPARSITY_METHODS:
        raise SparsityError(f"unknown sparsity method {method!r} (known: {', '.join(SPARSITY_METHODS)})")
    if not 0 <= density <= 1:
        raise SparsityError(f"density must be in [0, 1], got {density}")
    section = {"method": method, "format": SPARSITY_FORMAT, "density": float(density), "keep_masks": bool(keep_masks),
               "scope": "layer_projection"}
    if sparsity is not None:
        section["sparsity"] = float(sparsity)
    if threshold is not None:
        section["threshold"] = float(threshold)
    if numel is not None and nnz is not None and dtype_bytes is not None:
        stored = sparse_bytes(numel, nnz, dtype_bytes)
        section.update({"numel": int(numel), "nnz": int(nnz), "bytes": stored, "dense_bytes": numel * dtype_bytes,
                        "byte_ratio": stored / (numel * dtype_bytes)})
    return section


def read_sparsity_section(config) -> dict | None:
    """The ``SPARSITY_KEY`` section of a config (a ``PretrainedConfig`` or its dict), checked; None when absent.

    Raises:
        SparsityError: a section that is not an object, or lacks / has unusable method, format, density, keep_masks.
    """
    section = config.get(SPARSITY_KEY) if isinstance(config, dict) else getattr(config, SPARSITY_KEY, None)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise SparsityError(f"config {SPARSITY_KEY} must be an object, got {section!r}")
    problems = []
    if section.get("method") not in SPARSITY_METHODS:
        problems.append(f"method {section.get('method')!r}")
    if section.get("format") != SPARSITY_FORMAT:
        problems.append(f"format {section.get('format')!r}")
    density = section.get("density")
    if not (isinstance(density, (int, float)) and 0 <= density <= 1):
        problems.append(f"density {density!r}")
    if not isinstance(section.get("keep_masks"), bool):
        problems.append(f"keep_masks {section.get('keep_masks')!r}")
    if problems:
        raise SparsityError(f"config {SPARSITY_KEY} has unusable {', '.join(problems)} (expected method in "
                            f"{SPARSITY_METHODS}, format {SPARSITY_FORMAT!r}, density in [0, 1], keep_masks a bool)")
    return section


# ------------------------------------------------------------------------------ masks during distillation

def expert_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every MoE layer's experts module (the fused ``gate_up_proj``/``down_proj``, or a
    shared-core module's factors), in layer order.

    Raises:
        UnsupportedModelError: not a supported MoE model.
    """
    from .modeling_shared_core import find_experts

    return [(f"{name}.{p_name}", p) for name in find_experts(model).values()
            for p_name, p in model.get_submodule(name).named_parameters()]


def dense_expert_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The stock fused expert weights (``gate_up_proj``, ``down_proj``) among ``expert_parameters``: what magnitude
    pruning zeroes and ``MaskedGradients`` holds. A shared-core or low-rank student has none (its zeros, e.g. the
    U = 0 start of its wrappers, are not pruned weights and must train).
    """
    return [(n, p) for n, p in expert_parameters(model) if n.endswith(DENSE_EXPERT_WEIGHTS)]


def _local_values(p: torch.Tensor) -> torch.Tensor | None:
    """The flat elements of ``p`` this rank accounts for: its ZeRO-3 partition without the padding of the last
    one; the whole tensor on rank 0 when not partitioned (every rank holds it); None on the other ranks."""
    if hasattr(p, "ds_tensor"):  # ZeRO-3: partition r holds flat elements [r·n, (r+1)·n), padded at the end
        part = p.ds_tensor.data.reshape(-1)
        start = dist_info().rank * part.numel()
        return part[:max(0, min(part.numel(), p.ds_numel - start))]
    return p.data.reshape(-1) if dist_info().is_main else None


def count_zeros(params) -> tuple[int, int]:
    """(weights exactly 0, weights) over ``params`` summed across ranks; ZeRO-3 partitions are counted where they
    live, never gathered. Call on every rank (one all-reduce).
    """
    counts = torch.zeros(2, dtype=torch.float64)
    for p in params:
        values = _local_values(p)
        if values is not None and values.numel():
            counts += torch.tensor([float((values == 0).sum()), float(values.numel())], dtype=torch.float64)
    total = all_reduce_sum(counts)
    return int(total[0]), int(total[1])


def _mask_hook(p: torch.nn.Parameter, name: str):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        w = p.data
        if w.shape != grad.shape:
            raise RuntimeError(f"moe_ds.sparsity: the gradient of {name} {list(grad.shape)} arrived while the weight "
                               f"is {list(w.shape)} (a ZeRO-3 partition?): the pruned weights cannot be masked")
        out = torch.empty_like(grad)  # the hook must not change its argument (it may be shared)
        g, o, w = grad.reshape(-1), out.reshape(-1), w.reshape(-1)
        for s in range(0, g.numel(), _CHUNK):
            torch.where(w[s:s + _CHUNK] == 0, torch.zeros((), dtype=g.dtype, device=g.device), g[s:s + _CHUNK],
                        out=o[s:s + _CHUNK])
        return out
    return hook


class MaskedGradients:
    """Holds every currently-zero expert weight at zero through training by masking its gradient.

    Memory: nothing persistent; while a hook runs, one gradient-sized output (the masked gradient, which replaces
    the incoming one) plus a boolean of at most 2^24 elements.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]):
        """Install a gradient hook on each parameter of ``named_params`` that requires grad (frozen ones cannot
        change anyway)."""
        self.params = [p for _, p in named_params]
        self.handles = [p.register_hook(_mask_hook(p, name)) for name, p in named_params if p.requires_grad]

    def zeros(self) -> tuple[int, int]:
        """(expert weights held at zero, expert weights), across ranks; see ``count_zeros``."""
        return count_zeros(self.params)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------- expert usage

def _num_experts(config) -> int:
    return int(getattr(config, get_architecture(config.model_type).num_experts_key))


class ExpertUsage:
    """Per MoE layer and expert: tokens routed (top-k slots) and the sum of their routing weights, counted by a
    forward hook on each router while ``counting()`` is active (the training forward only: not the recomputation
    of gradient checkpointing, nor evaluation). Every transformers >= 5 router returns (logits, top-k weights
    [N, k], top-k ids [N, k]); padded positions are counted like the others.

    Sums stay on the router's device (float64, exact token counts below 2^53) until ``totals`` all-reduces them.
    """

    def __init__(self, model: torch.nn.Module, base: dict | None = None):
        """Hook the routers of ``model``; ``base``: a ``load_usage`` result whose sums the counts continue (a run
        resumed mid-stage).

        Raises:
            UnsupportedModelError: not a supported MoE model.
            SparsityError: ``base`` is for another number of layers or experts.
        """
        from .modeling_shared_core import find_experts

        arch = get_architecture(model.config.model_type)
        experts = find_experts(model)
        self.layers = sorted(experts)
        self.num_experts = _num_experts(model.config)
        self.top_k = int(getattr(model.config, arch.top_k_key))
        self._sums = {layer: None for layer in self.layers}  # [2, E] float64: tokens, router weight
        self._counting = False
        self.base = torch.zeros(len(self.layers), 2, self.num_experts, dtype=torch.float64)
        if base is not None:
            if base["layers"] != self.layers or base["num_experts"] != self.num_experts:
                raise SparsityError(f"saved expert usage is for layers {base['layers']} with {base['num_experts']} "
                                    f"experts, the model has layers {self.layers} with {self.num_experts}")
            self.base = torch.stack([torch.stack([base["tokens"][layer], base["router_weight_sum"][layer]])
                                     for layer in self.layers])
        self.handles = []
        for layer, name in experts.items():
            router = model.get_submodule(f"{name.rpartition('.')[0]}.{arch.router}")
            self.handles.append(router.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not self._counting:
                return
            weights, index = output[1].detach(), output[2].detach()
            index, weights = index.reshape(-1).long(), weights.reshape(-1).double()
            valid = (index >= 0) & (index < self.num_experts)
            index, weights = index[valid], weights[valid]
            add = torch.zeros(2, self.num_experts, dtype=torch.float64, device=index.device)
            add[0].index_add_(0, index, torch.ones_like(weights))
            add[1].index_add_(0, index, weights)
            self._sums[layer] = add if self._sums[layer] is None else self._sums[layer] + add
        return hook

    @contextlib.contextmanager
    def counting(self):
        """Count the router outputs of the forwards run inside this block."""
        self._counting = True
        try:
            yield
        finally:
            self._counting = False

    def local(self) -> torch.Tensor:
        """This rank's counts since construction: [L, 2, E] float64 on the CPU (tokens, router weight)."""
        rows = [s.cpu() if s is not None else torch.zeros(2, self.num_experts, dtype=torch.float64)
                for s in (self._sums[layer] for layer in self.layers)]
        return torch.stack(rows)

    def totals(self) -> torch.Tensor:
        """The base plus every rank's counts, [L, 2, E] float64 (call on every rank: one all-reduce)."""
        return self.base + all_reduce_sum(self.local())

    def to_dict(self, totals: torch.Tensor, **meta) -> dict:
        """The ``USAGE_FILE`` content for ``totals`` (from ``totals()``), with ``meta`` (step, stage, since_step)."""
        return {"format_version": USAGE_FORMAT_VERSION, **meta, "num_experts": self.num_experts, "top_k": self.top_k,
                "layers": {str(layer): {"tokens": [int(x) for x in totals[i, 0].round().tolist()],
                                        "router_weight_sum": totals[i, 1].tolist()}
                           for i, layer in enumerate(self.layers)}}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def load_usage(path: str | Path) -> dict:
    """Read a ``USAGE_FILE``.

    Returns:
        The file's fields, with "layers" a sorted list of layer indices and "tokens" / "router_weight_sum" as
        {layer: [E] float64 tensor}.

    Raises:
        SparsityError: missing, unreadable or malformed file.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        layers = {int(k): v for k, v in raw["layers"].items()}
        out = {**raw, "layers": sorted(layers), "num_experts": int(raw["num_experts"]),
               "tokens": {k: torch.tensor(v["tokens"], dtype=torch.float64) for k, v in layers.items()},
               "router_weight_sum": {k: torch.tensor(v["router_weight_sum"], dtype=torch.float64)
                                     for k, v in layers.items()}}
    except FileNotFoundError:
        raise SparsityError(f"{path} is missing: no expert usage was recorded there") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SparsityError(f"{path} is not a readable expert-usage file ({type(err).__name__}: {err})") from err
    if raw.get("format_version") != USAGE_FORMAT_VERSION:
        raise SparsityError(f"{path}: expert-usage format version {raw.get('format_version')!r} is not known to "
                            f"this moe-ds (it reads version {USAGE_FORMAT_VERSION})")
    for name in ("tokens", "router_weight_sum"):
        bad = [k for k, v in out[name].items() if tuple(v.shape) != (out["num_experts"],)]
        if bad:
            raise SparsityError(f"{path}: {name} of layer(s) {bad} do not hold {out['num_experts']} values")
    return out


__all__ = ["SPARSITY_FORMAT", "SPARSITY_KEY", "USAGE_FILE", "USAGE_SCORES", "ExpertUsage",
           "MaskedGradients", "SparsityError", "count_zeros", "dense_expert_parameters", "density_for_byte_ratio",
           "expert_parameters",
           "expert_projections", "load_usage", "magnitude_masks", "nnz_for_bytes", "prune_experts_by_magnitude",
           "read_sparsity_section", "sparse_bytes", "sparsity_section"]

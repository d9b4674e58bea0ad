"""Feature (hidden-state) distillation: forward hooks that capture chosen layers' outputs, and the per-layer loss.

    L_feature = sum_l d(h_s^l, h_t^l),   d = ||h_s - h_t||^2 / ||h_t||^2  ("mse", normalised per layer)
                                          or 1 - cos(h_s, h_t)         ("cosine", per position, averaged)

over the real (attention-mask 1) positions; the distillation loss adds ``feature_weight * L_feature`` (beta ~ 0.1)
to (1 - alpha) CE + alpha tau^2 KL. Matching intermediate representations is FitNets' hint loss (Romero et al.
2015) and TinyBERT's hidden-state loss (Jiao et al. 2020); layer-wise output matching is how MoE pruning and
low-rank papers recover compressed layers (e.g. the layer-wise reconstruction of NAEE, Lu et al. 2024). Normalising
by the teacher's energy makes every layer's term a relative error (the residual stream grows with depth), so one
beta fits any layer choice.

``target="hidden"`` taps a decoder layer's output (the residual stream after layer l); ``"moe"`` taps its MLP/MoE
block's output (what compression changed). Hooks sit on the modules, so they work unchanged inside a DeepSpeed
(ZeRO-3) engine, whose parameters are gathered while the module runs.
"""

from typing import Literal, get_args

import torch

FeatureTarget = Literal["hidden", "moe"]
FEATURE_TARGETS = get_args(FeatureTarget)
FeatureLoss = Literal["mse", "cosine"]
FEATURE_LOSSES = get_args(FeatureLoss)


class FeatureConfigError(ValueError):
    """Feature distillation cannot be set up: a layer out of range, an unknown target or loss, or student and teacher
    features of different widths."""


def parse_layers(spec) -> list[int]:
    """``"0,1,2"``, ``[0, 1, 2]`` or ``"all"``-free lists as sorted unique ints (None or "" or "none": [])."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "none"):
            return []
        try:
            spec = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise FeatureConfigError(f"feature layers must be comma-separated integers, got {spec!r}") from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        raise FeatureConfigError(f"feature layers must be integers, got {spec!r}")
    return sorted(set(spec))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` in every supported family)."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "config") else model  # a DeepSpeed engine
    base = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", inner)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise FeatureConfigError(f"{type(inner).__name__} has no decoder layer list (model.layers) to take features "
                                 "from")
    return layers


def check_layers(layers: list[int], num_layers: int, what: str = "model") -> None:
    """Raises FeatureConfigError when a layer index is outside 0 .. num_layers - 1."""
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise FeatureConfigError(f"feature layer(s) {bad} out of range: the {what} has {num_layers} decoder layers "
                                 f"(0..{num_layers - 1})")


class FeatureHooks:
    """Forward hooks capturing the outputs of chosen decoder layers (or their MLP/MoE blocks).

    After a forward, ``take()`` returns the captured [B, T, H] tensors in layer order and forgets them. Gradient
    checkpointing re-runs the forward in the backward pass; those recomputed outputs are captured too and dropped
    by the next ``take()`` (call ``clear()`` before a forward when that matters).
    """

    def __init__(self, model: torch.nn.Module, layers: list[int], target: FeatureTarget = "hidden"):
        """Raises FeatureConfigError for an unknown target or a layer out of range."""
        if target not in FEATURE_TARGETS:
            raise FeatureConfigError(f"feature target must be one of {FEATURE_TARGETS}, got {target!r}")
        blocks = decoder_layers(model)
        check_layers(layers, len(blocks))
        self.layers, self.target = list(layers), target
        self._out: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer in self.layers:
            module = blocks[layer] if target == "hidden" else blocks[layer].mlp
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def capture(module, args, output):
            self._out[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    def take(self) -> list[torch.Tensor]:
        """The captured outputs, [B, T, H] each, in ``layers`` order.

        Raises:
            RuntimeError: a hooked layer did not run since the last ``take``.
        """
        missing = [layer for layer in self.layers if layer not in self._out]
        if missing:
            raise RuntimeError(f"no features captured for layer(s) {missing}: run the model's forward first")
        out = [self._out[layer] for layer in self.layers]
        self._out = {}
        return out

    def clear(self) -> None:
        self._out = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._out = [], {}


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: FeatureLoss = "mse",
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Sum over layers of the per-layer normalised distance between student and teacher features.

    Args:
        student: per layer [B, T, H] student features (carry the gradient).
        teacher: per layer [B, T, H] teacher features (detached here; any float dtype).
        kind: "mse": sum ||h_s - h_t||^2 / sum ||h_t||^2 over real positions (a relative squared error per
            layer); "cosine": mean over real positions of 1 - cos(h_s, h_t).
        attention_mask: [B, T], 1 for real tokens; None: all real.

    Returns:
        (float32 scalar sum over layers, differentiable w.r.t. the student features; per-layer float values).

    Raises:
        FeatureConfigError: an unknown kind, different numbers of layers, or features of different shapes (a
            student whose hidden size differs from the teacher's needs a projection, which this loss has not).
    """
    if kind not in FEATURE_LOSSES:
        raise FeatureConfigError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")
    if len(student) != len(teacher):
        raise FeatureConfigError(f"{len(student)} student feature layers against {len(teacher)} teacher ones")
    total = torch.zeros((), dtype=torch.float32, device=student[0].device if student else None)
    per_layer = []
    for hs, ht in zip(student, teacher):
        if hs.shape != ht.shape:
            raise FeatureConfigError(f"student features {tuple(hs.shape)} and teacher features {tuple(ht.shape)} "
                                     "differ in shape: feature distillation needs equal hidden sizes")
        hs, ht = hs.float(), ht.detach().to(hs.device).float()
        w = (torch.ones(hs.shape[:2], device=hs.device) if attention_mask is None
             else attention_mask.to(hs.device).float())
        if kind == "mse":
            num = ((hs - ht).pow(2).sum(-1) * w).sum()
            den = (ht.pow(2).sum(-1) * w).sum().clamp_min(torch.finfo(torch.float32).tiny)
            term = num / den
        else:
            cos = torch.nn.functional.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
            term = ((1 - cos) * w).sum() / w.sum().clamp_min(1)
        total = total + term
        per_layer.append(float(term.detach()))
    return total, per_layer

"""Parameter groups of a distillation stage: regular expressions resolved to parameter names, then applied.

Every parameter belongs to the first group whose pattern ``re.search``-es its name, or to "(default)"; a group
with learning-rate multiplier 0 is frozen (``requires_grad=False``) and left out of the optimizer.
"""

import re
from dataclasses import dataclass

import torch

from .dist import log_main
from .distill_config import DistillConfigError, StageConfig


@dataclass
class ResolvedGroup:
    pattern: str  # regex, or "(default)" for parameters no pattern matched
    lr_mult: float  # multiplier of the run's learning rate (0: frozen)
    lr: float  # the group's learning rate
    weight_decay: float  # the group's weight decay
    names: list[str]  # parameter names in this group
    numel: int  # parameters (elements) in this group

    @property
    def frozen(self) -> bool:
        return self.lr_mult == 0


def resolve_groups(named_numels: list[tuple[str, int]], stage: StageConfig, learning_rate: float,
                   weight_decay: float) -> list[ResolvedGroup]:
    """Assign every parameter to the first group whose pattern ``re.search``-es its name.

    Args:
        named_numels: (parameter name, element count) for every parameter of the model.
        stage: the stage whose groups apply.
        learning_rate, weight_decay: the run's base values.

    Returns:
        One ResolvedGroup per pattern, then "(default)" for the unmatched parameters (if any).

    Raises:
        DistillConfigError: a pattern matches no parameter (naming the earlier patterns that may shadow it), or
            every parameter ends up frozen.
    """
    compiled = [re.compile(g.pattern) for g in stage.groups]
    members = [[] for _ in stage.groups]
    rest = []
    for name, n in named_numels:
        for i, rx in enumerate(compiled):
            if rx.search(name):
                members[i].append((name, n))
                break
        else:
            rest.append((name, n))
    out = []
    for i, (g, m) in enumerate(zip(stage.groups, members)):
        if not m:
            alone = [name for name, _ in named_numels if compiled[i].search(name)]
            why = (f"its parameters are all taken by earlier patterns {[x.pattern for x in stage.groups[:i]]}"
                   if alone else f"no parameter name matches it (e.g. {named_numels[0][0]!r})")
            raise DistillConfigError(f"stage {stage.name!r}: parameter group pattern {g.pattern!r} matches nothing: "
                                     f"{why}")
        wd = weight_decay if g.weight_decay is None else g.weight_decay
        out.append(ResolvedGroup(g.pattern, g.lr_mult, learning_rate * g.lr_mult, wd, [x for x, _ in m],
                                 sum(n for _, n in m)))
    if rest:
        out.append(ResolvedGroup("(default)", stage.default_lr_mult, learning_rate * stage.default_lr_mult,
                                 weight_decay, [x for x, _ in rest], sum(n for _, n in rest)))
    if all(g.frozen for g in out):
        raise DistillConfigError(f"stage {stage.name!r} freezes every parameter of the model")
    return out


def apply_groups(model: torch.nn.Module, groups: list[ResolvedGroup]) -> list[dict]:
    """Set ``requires_grad`` (off for multiplier 0) and return optimizer parameter groups for the trained ones."""
    params = dict(model.named_parameters())
    param_groups = []
    for g in groups:
        for name in g.names:
            params[name].requires_grad_(not g.frozen)
        if not g.frozen:
            param_groups.append({"params": [params[n] for n in g.names], "lr": g.lr, "weight_decay": g.weight_decay,
                                 "name": g.pattern})
    return param_groups


def log_groups(stage_index: int, stage: StageConfig, groups: list[ResolvedGroup]) -> None:
    """Rank 0 logs the stage's resolved groups: pattern, tensors, parameters, learning rate, weight decay."""
    log_main("stage %d%s: %d steps, parameter groups:", stage_index + 1, f" ({stage.name})" if stage.name else "",
             stage.steps)
    log_main("  %-48s %8s %12s %10s %6s", "pattern", "tensors", "parameters", "lr", "wd")
    for g in groups:
        log_main("  %-48s %8d %12d %10s %6g", g.pattern[:48], len(g.names), g.numel,
                 "frozen" if g.frozen else f"{g.lr:.3g}", g.weight_decay)

"""Expert pruning and expert merging: scores, selection, merge maths, and the on-disk surgery that writes
stock-architecture checkpoints with fewer experts (or selects experts of a shared-core checkpoint).

Pruning keeps, per MoE layer, the E' best experts by a calibration score (``expert_scores``: token share, router
weight, or REAP's S_j = (1/N_j) Σ g_j(x)·‖f_j(x)‖₂, Lasby et al. 2025) and drops the router rows of the others.
Merging (HC-SMoE, Chen et al. 2024, "Retraining-free merging of sparse MoE via hierarchical clustering") groups a
layer's experts by hierarchical clustering of their router logits or outputs on the calibration's held-out inputs
and replaces each group by the usage-weighted average of its members. Either way every MoE layer ends with the same
expert count E' (stock configs hold one count), so the result is a stock checkpoint that loads with plain
``from_pretrained``.

Routing stays what the family's stock router does with E' rows: a softmax router without top-k renormalisation
(Qwen2-MoE, OLMoE by default) spreads its probability over fewer experts, so the kept experts' weights grow a little
(by the pruned experts' softmax mass). DeepSeek-V3's group-limited routing (``n_group`` contiguous groups of
experts, ``topk_group`` of them picked per token by the sum of their two best scores) stays the same routing only if
every group keeps the same number of experts, E'/n_group >= 2 (the stock router ranks groups by their top-2 scores)
and topk_group·E'/n_group >= top_k: ``choose_experts`` and ``merge_groups`` take ``n_group`` and work within the
groups, and the writers refuse anything else with ``ExpertPruningError`` (never a silent switch to n_group = 1,
which would route differently).
"""

import copy
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from .arch import MoEArchitecture, get_architecture
from .checkpoint import (STATISTICS_FILE, finish_checkpoint, is_compressed_checkpoint, open_safetensors, read_tensors,
                         read_weight_map, validate_compressed_checkpoint, write_shards)
from .model_files import ExpertReader
from .run_layout import atomic_output_dir
from .stats import dtype_bytes, expert_params

SCORES = ("frequency", "router_weight", "reap")
SIMILARITIES = ("router_logits", "expert_outputs")
LINKAGES = ("average", "complete", "single")  # defined for any distance (ward/centroid/median assume Euclidean)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ExpertPruningError(ValueError):
    """Bad input to expert pruning or merging (ids, counts, shapes, routing groups); the message names it."""


# ----------------------------------------------------------------------------------------------- scores and choice

def expert_scores(layer: dict, score: str, top_k: int | None = None) -> torch.Tensor:
    """One MoE layer's expert scores from its calibration sums (``moe_ds.calibrate``); higher means keep.

    Args:
        layer: a calibration layer (``load_calibration(...).layer(i)``, or a dict with the same keys): ``tokens``
            [E] (top-k slots routed to each expert), ``router_weight_sum`` [E], ``reap_sum`` [E] and, for k,
            ``heldout_topk_ids`` [h, k] (h may be 0).
        score: "frequency": the share of the layer's tokens that visit expert e, k·tokens_e / Σ tokens (each token
            counted once; the shares sum to k); "router_weight": router_weight_sum_e / (Σ tokens / k), the mean
            top-k routing weight per token; "reap": REAP S_e = reap_sum_e / tokens_e, 0 for an expert no token
            visited (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning";
            CerebrasResearch/reap ``pruning_metrics.py``).
        top_k: k; None reads it from ``heldout_topk_ids``.

    Returns:
        [E] float64 on the CPU.

    Raises:
        ExpertPruningError: unknown score, a missing sum, no k, or a calibration with no tokens.
    """
    if score not in SCORES:
        raise ExpertPruningError(f"score must be one of {SCORES}, got {score!r}")
    need = {"frequency": "tokens", "router_weight": "router_weight_sum", "reap": "reap_sum"}[score]
    for name in ("tokens", need):
        if name not in layer:
            raise ExpertPruningError(f"the calibration layer has no {name!r} (keys: {sorted(layer)})")
    tokens = layer["tokens"].detach().double().cpu()
    if score == "reap":
        return torch.where(tokens > 0, layer["reap_sum"].detach().double().cpu() / tokens.clamp_min(1), 0.0)
    if top_k is None:
        if "heldout_topk_ids" not in layer:
            raise ExpertPruningError("pass top_k: the calibration layer has no heldout_topk_ids to read k from")
        top_k = int(layer["heldout_topk_ids"].shape[1])
    if tokens.sum() <= 0:
        raise ExpertPruningError("the calibration layer counted no tokens: nothing to score the experts by")
    per_token = tokens.sum() / top_k  # tokens that reached the layer
    if score == "frequency":
        return tokens / per_token
    return layer["router_weight_sum"].detach().double().cpu() / per_token


def routing_groups(model_config) -> tuple[int, int]:
    """(n_group, topk_group) of DeepSeek-V3's group-limited routing; (1, 1) for routers without groups."""
    return int(getattr(model_config, "n_group", None) or 1), int(getattr(model_config, "topk_group", None) or 1)


def expert_count_problem(count: int, top_k: int, n_group: int = 1, topk_group: int = 1) -> str | None:
    """Why a stock router of this family cannot route over ``count`` experts, or None when it can.

    ``count`` >= top_k; with n_group > 1 also count divisible by n_group, count / n_group >= 2 and
    topk_group · count / n_group >= top_k (see the module docstring).
    """
    if count < top_k:
        return f"{count} experts are fewer than top_k = {top_k} (the router picks top_k experts per token)"
    if n_group > 1:
        if count % n_group:
            return (f"{count} experts do not split into n_group = {n_group} equal routing groups (DeepSeek-V3's "
                    f"group-limited routing); keep a multiple of {n_group}")
        per_group = count // n_group
        if per_group < 2:
            return (f"{count} experts leave {per_group} per routing group; the router ranks groups by their two best "
                    f"scores, so keep at least {2 * n_group}")
        if topk_group * per_group < top_k:
            return (f"{count} experts leave {per_group} per routing group, and topk_group = {topk_group} groups then "
                    f"hold fewer than top_k = {top_k} experts")
    return None


def _min_per_group(top_k: int, n_group: int, topk_group: int) -> int:
    """The fewest experts per routing group (n_group > 1) or in total (n_group = 1) a valid count has."""
    if n_group == 1:
        return top_k
    return max(2, math.ceil(top_k / topk_group))


def choose_experts(scores: Mapping[int, torch.Tensor], num_keep: int | None = None, threshold: float | None = None,
                   shares: Mapping[int, torch.Tensor] | None = None, *, top_k: int, n_group: int = 1,
                   topk_group: int = 1) -> dict[int, torch.Tensor]:
    """The experts each MoE layer keeps: the same count N in every layer (stock configs hold one expert count).

    Give exactly one of ``num_keep`` (N itself) and ``threshold``: then N is the largest number, over the layers,
    of experts whose token share is at least ``threshold`` (e.g. 0.05: experts visited by fewer than 5 % of the
    tokens go, unless another layer needs that many), raised to the fewest the router accepts (top_k; see
    ``expert_count_problem``). Each layer keeps its N best experts by ``scores`` (ties: the lower id).
    With routing groups (n_group > 1, DeepSeek-V3) each of a layer's n_group contiguous groups keeps its N / n_group
    best experts; in threshold mode N / n_group is the largest count of experts at/above the threshold in any group
    of any layer, so no such expert is dropped.

    Args:
        scores: {layer: [E]} (``expert_scores``), the same E in every layer.
        num_keep: N.
        threshold: a token share in [0, 1] (``expert_scores(layer, "frequency")`` is one: the share of the tokens
            that visit each expert).
        shares: {layer: [E]} token shares compared with ``threshold`` (threshold mode only).
        top_k: the router's k.
        n_group, topk_group: DeepSeek-V3's routing groups (``routing_groups``).

    Returns:
        {layer: int64 [N] kept expert ids in increasing order}.

    Raises:
        ExpertPruningError: both or neither of num_keep and threshold, threshold without shares (or for other
            layers), a threshold outside [0, 1], scores of different lengths or with NaN, num_keep above E or one
            the router cannot route over (``expert_count_problem``).
    """
    if (num_keep is None) == (threshold is None):
        raise ExpertPruningError(f"give exactly one of num_keep and threshold (got num_keep={num_keep}, "
                                 f"threshold={threshold})")
    if not scores:
        raise ExpertPruningError("no layers to choose experts for (scores is empty)")
    scores = {int(layer): torch.as_tensor(s, dtype=torch.float64).flatten() for layer, s in scores.items()}
    sizes = {s.numel() for s in scores.values()}
    if len(sizes) != 1:
        raise ExpertPruningError(f"the layers' scores have different expert counts {sorted(sizes)}")
    e = sizes.pop()
    if any(torch.isnan(s).any() for s in scores.values()):
        raise ExpertPruningError("the scores hold NaN")
    if n_group < 1 or e % n_group:
        raise ExpertPruningError(f"{e} experts do not split into n_group = {n_group} routing groups")
    size = e // n_group
    if num_keep is not None:
        problem = expert_count_problem(int(num_keep), top_k, n_group, topk_group)
        if num_keep > e or problem is not None:
            raise ExpertPruningError(f"cannot keep {num_keep} of {e} experts: "
                                     f"{problem or 'there are only ' + str(e)}")
        per_group = int(num_keep) // n_group
    else:
        if shares is None:
            raise ExpertPruningError("threshold mode needs shares: {layer: [E] token shares} to compare it with")
        if not 0 <= threshold <= 1:
            raise ExpertPruningError(f"threshold is a token share and must be in [0, 1], got {threshold}")
        shares = {int(layer): torch.as_tensor(s, dtype=torch.float64).flatten() for layer, s in shares.items()}
        if set(shares) != set(scores) or any(s.numel() != e for s in shares.values()):
            raise ExpertPruningError(f"shares must hold [{e}] for the layers {sorted(scores)}, got "
                                     f"{ {k: s.numel() for k, s in shares.items()} }")
        above = max(int((s.view(n_group, size) >= threshold).sum(1).max()) for s in shares.values())
        per_group = min(size, max(above, _min_per_group(top_k, n_group, topk_group)))
        problem = expert_count_problem(per_group * n_group, top_k, n_group, topk_group)
        if problem is not None:
            raise ExpertPruningError(f"the layers have too few experts to prune: {problem}")
    kept = {}
    for layer, s in sorted(scores.items()):
        ids = [g * size + torch.argsort(s[g * size:(g + 1) * size], descending=True, stable=True)[:per_group]
               for g in range(n_group)]
        kept[layer] = torch.cat(ids).sort().values
    return kept


def check_kept(kept: Mapping[int, torch.Tensor], num_experts: int, top_k: int, n_group: int = 1,
               topk_group: int = 1, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Validate kept expert ids per layer for a stock router; returns them as int64 CPU tensors.

    Raises:
        ExpertPruningError: a layer missing from or not in ``layers``, ids not a 1-D list, out of [0, E), repeated
            or not increasing, different counts in different layers, a count the router cannot route over, or
            (n_group > 1) a routing group that keeps a different number of experts than the others.
    """
    out = {int(layer): torch.as_tensor(ids).long().cpu() for layer, ids in kept.items()}
    if layers is not None and set(out) != set(layers):
        raise ExpertPruningError(f"kept experts are given for layers {sorted(out)}, but the MoE layers are "
                                 f"{sorted(layers)}")
    counts = set()
    for layer, ids in out.items():
        if ids.dim() != 1 or ids.numel() == 0:
            raise ExpertPruningError(f"layer {layer}: kept ids must be a non-empty 1-D list, got shape "
                                     f"{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= num_experts:
            raise ExpertPruningError(f"layer {layer}: kept ids {ids.tolist()} fall outside [0, {num_experts})")
        if (ids[1:] <= ids[:-1]).any():
            raise ExpertPruningError(f"layer {layer}: kept ids {ids.tolist()} must be distinct and increasing")
        counts.add(ids.numel())
        if n_group > 1:
            per = torch.bincount(ids // (num_experts // n_group), minlength=n_group)
            if len(set(per.tolist())) != 1:
                raise ExpertPruningError(f"layer {layer}: the routing groups keep {per.tolist()} experts; "
                                         f"DeepSeek-V3's group-limited routing needs the same count in each of its "
                                         f"{n_group} groups")
    if len(counts) != 1:
        raise ExpertPruningError(f"the layers keep different expert counts {sorted(counts)}; a stock config holds "
                                 "one count for every layer")
    problem = expert_count_problem(counts.pop(), top_k, n_group, topk_group)
    if problem is not None:
        raise ExpertPruningError(problem)
    return out


# ----------------------------------------------------------------------------------------------- in memory

def prune_layer(weights: Mapping[str, torch.Tensor], router: Mapping[str, torch.Tensor],
                kept: torch.Tensor) -> tuple[dict, dict]:
    """Keep the experts ``kept`` of one layer (new expert i is old expert kept[i]).

    Args:
        weights: {name: [E, ...]} e.g. {"gate": [E, I, d], "up": [E, I, d], "down": [E, d, I]}.
        router: {"weight": [E, d], optional "bias": [E]} (DeepSeek-V3's ``e_score_correction_bias``).
        kept: int64 [E'] distinct ids in [0, E).

    Returns:
        (weights' {name: [E', ...]}, router' {"weight": [E', d], "bias": [E']}) in the inputs' dtypes and devices.

    Raises:
        ExpertPruningError: ids out of range or repeated, or tensors whose first dimension is not E.
    """
    e = router["weight"].shape[0]
    kept = torch.as_tensor(kept).long().flatten()
    if kept.numel() == 0:
        raise ExpertPruningError("no experts to keep (kept is empty)")
    if kept.min() < 0 or kept.max() >= e:
        raise ExpertPruningError(f"kept ids {kept.tolist()} fall outside [0, {e})")
    if kept.unique().numel() != kept.numel():
        raise ExpertPruningError(f"kept ids {kept.tolist()} repeat an expert")
    bad = {name: list(t.shape) for name, t in {**weights, **router}.items() if t.shape[0] != e}
    if bad:
        raise ExpertPruningError(f"tensors without a leading expert dimension of {e}: {bad}")
    return ({name: t.index_select(0, kept.to(t.device)) for name, t in weights.items()},
            {name: t.index_select(0, kept.to(t.device)) for name, t in router.items()})


def route(hidden: torch.Tensor, router: Mapping[str, torch.Tensor], top_k: int, score: str = "softmax",
          n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """The experts the family's stock router picks for each row (transformers 5's ``*TopKRouter``).

    Softmax routers (Qwen, Mixtral, OLMoE) pick the top_k logits; DeepSeek-V3 ("sigmoid") picks the top_k of
    sigmoid(logits) + bias among the topk_group groups with the largest sum of their two best such scores.

    Args:
        hidden: [N, d] the MoE block's inputs.
        router: {"weight": [E, d], optional "bias": [E]}.

    Returns:
        int64 [N, top_k] expert ids (in no particular order).
    """
    logits = hidden.float() @ router["weight"].float().T
    if score == "softmax":
        return logits.topk(top_k, dim=-1).indices
    choice = logits.sigmoid()
    if router.get("bias") is not None:
        choice = choice + router["bias"].float()
    n, e = choice.shape
    if n_group > 1:
        group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
        groups = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        choice = choice.masked_fill(~mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    return choice.topk(top_k, dim=-1).indices


def router_score(model_type: str) -> str:
    """"softmax" or "sigmoid" (DeepSeek-V3): how the family's router turns logits into scores."""
    from .calibrate import ROUTER_SCORES

    return ROUTER_SCORES.get(get_architecture(model_type).model_type, "softmax")


def _expert_outputs(weights: Mapping[str, torch.Tensor], x: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """[E, d] mean over the rows of x [h, d] of every expert's output f_e(x) = W_down (act(W_gate x) ⊙ W_up x)."""
    from transformers.activations import ACT2FN

    act = ACT2FN[hidden_act]
    out = []
    for gate, up, down in zip(weights["gate"], weights["up"], weights["down"]):
        h = act(x @ gate.to(x.dtype).T) * (x @ up.to(x.dtype).T)
        out.append((h @ down.to(x.dtype).T).mean(0))
    return torch.stack(out)


def _cluster(features: torch.Tensor, num_groups: int, linkage: str) -> list[list[int]]:
    """Agglomerative clustering of the rows of ``features`` [n, m] by cosine distance into exactly num_groups."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    n = features.shape[0]
    if num_groups == n:
        return [[i] for i in range(n)]
    f = features.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)  # a zero row is at distance 1 from every other row
    dist = (1 - f @ f.T).clamp_min(0)
    dist.fill_diagonal_(0)
    tree = scipy_linkage(squareform(((dist + dist.T) / 2).numpy(), checks=False), method=linkage)
    # Apply the first n - num_groups merges (scipy's fcluster "maxclust" can stop short on tied heights).
    parent = list(range(2 * n - 1))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step, (a, b, _, _) in enumerate(tree[: n - num_groups]):
        parent[root(int(a))] = parent[root(int(b))] = n + step
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(root(i), []).append(i)
    return sorted(clusters.values())


def merge_groups(layer_cal: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                 router_weight: torch.Tensor, num_groups: int, similarity: str = "expert_outputs",
                 hidden_act: str = "silu", linkage: str = "average", n_group: int = 1) -> list[list[int]]:
    """HC-SMoE's grouping of one layer's experts: hierarchical clustering by cosine similarity (Chen et al. 2024,
    "Retraining-free merging of sparse MoE via hierarchical clustering", average linkage by default).

    Each expert is described, over the calibration's held-out inputs X [h, d], by either its router logits
    (``router_logits``: the column X w_eᵀ [h]) or its average output on every input, routed to it or not
    (``expert_outputs``: mean_x f_e(x) [d], HC-SMoE's representation); the distance between experts is 1 − cosine
    similarity, and the tree is cut at exactly ``num_groups`` clusters. With routing groups (n_group > 1) each
    routing group is clustered on its own into num_groups / n_group clusters, so merged experts stay in their
    group.

    Args:
        layer_cal: the layer's calibration (``heldout_inputs`` [h, d], h >= 2).
        weights: {"gate": [E, I, d], "up": [E, I, d], "down": [E, d, I]} (``ExpertReader.read_layer``).
        router_weight: [E, d].
        num_groups: G, in [1, E].
        similarity: "router_logits" or "expert_outputs".
        hidden_act: the experts' activation (``config.hidden_act``).
        linkage: "average", "complete" or "single" (scipy.cluster.hierarchy.linkage).
        n_group: DeepSeek-V3's routing groups (``routing_groups``).

    Returns:
        G lists of expert ids: each sorted, the lists ordered by their first id; they partition range(E).

    Raises:
        ExpertPruningError: unknown similarity or linkage, G outside [1, E] or not a multiple of n_group, fewer
            than 2 held-out inputs.
    """
    if similarity not in SIMILARITIES:
        raise ExpertPruningError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if linkage not in LINKAGES:
        raise ExpertPruningError(f"linkage must be one of {LINKAGES} (cosine distances), got {linkage!r}")
    e = router_weight.shape[0]
    if not 1 <= num_groups <= e or num_groups % n_group or e % n_group:
        raise ExpertPruningError(f"cannot merge {e} experts into {num_groups} groups with n_group = {n_group} "
                                 f"routing groups: need 1 <= groups <= {e}, both multiples of {n_group}")
    x = layer_cal.get("heldout_inputs")
    if x is None or x.shape[0] < 2:
        raise ExpertPruningError("merging needs the calibration's held-out inputs (at least 2): recompute the "
                                 "calibration with --heldout-tokens > 1")
    x = x.to(device=router_weight.device, dtype=torch.float32)
    with torch.no_grad():
        if similarity == "router_logits":
            features = (x @ router_weight.float().T).T
        else:
            features = _expert_outputs(weights, x, hidden_act)
    features = features.cpu()
    size, groups = e // n_group, []
    for g in range(n_group):
        groups += [[g * size + i for i in c] for c in _cluster(features[g * size:(g + 1) * size],
                                                               num_groups // n_group, linkage)]
    return sorted(groups)


def _check_groups(groups: list[list[int]], e: int) -> None:
    flat = sorted(i for group in groups for i in group)
    if flat != list(range(e)) or any(not group for group in groups):
        raise ExpertPruningError(f"groups {groups} must partition the experts 0..{e - 1} (each in exactly one "
                                 "non-empty group)")


def merge_experts(weights: Mapping[str, torch.Tensor], router: Mapping[str, torch.Tensor], groups: list[list[int]],
                  usage: torch.Tensor) -> tuple[dict, dict]:
    """Merge each group of experts into one: the usage-weighted average of its members (HC-SMoE's merge).

    With α_e = usage_e / Σ_{group} usage (uniform when the group's usage is 0), every weight tensor becomes
    W_g = Σ_{e in g} α_e W_e, and so does the router row: w_g = Σ α_e w_e (DeepSeek-V3's bias b_g = Σ α_e b_e).
    The router rule: a linear router cannot give a group the logit log Σ_e exp(w_e x) that would send it every
    token routed to any member, so the group gets the usage-weighted mean of the members' logits, the linear map
    closest (in the usage-weighted least-squares sense, for every x) to the members' logits. Members with identical
    rows keep their logits exactly; otherwise a token whose top member was a lesser-used one may go elsewhere
    (``routing_agreement`` measures it), and an un-normalised softmax router (Qwen2-MoE, OLMoE) gives the group
    at most its best member's probability, not their sum.

    Exact case: members with identical weights and router rows (and bias), with top_k = 1 and normalised top-k
    weights, give the same output for every token (the token's group and weight 1 are unchanged). With top_k > 1
    identical rows tie, so a token takes both members and the merged model one of them plus another expert.

    Args:
        weights: {name: [E, ...]} (gate, up, down).
        router: {"weight": [E, d], optional "bias": [E]}.
        groups: G lists of expert ids partitioning range(E) (``merge_groups``); merged expert g is groups[g].
        usage: [E] non-negative (e.g. the calibration's ``tokens``).

    Returns:
        (weights' {name: [G, ...]}, router' {"weight": [G, d], "bias": [G]}) in the inputs' dtypes; computed in
        float64, and a one-member group is its member unchanged.

    Raises:
        ExpertPruningError: groups that do not partition the experts, usage of the wrong length or negative.
    """
    e = router["weight"].shape[0]
    _check_groups(groups, e)
    usage = torch.as_tensor(usage, dtype=torch.float64).flatten().cpu()
    if usage.numel() != e or (usage < 0).any() or torch.isnan(usage).any():
        raise ExpertPruningError(f"usage must be {e} non-negative numbers, got {usage.tolist()}")

    def merge(t: torch.Tensor) -> torch.Tensor:
        out = []
        for group in groups:
            if len(group) == 1:
                out.append(t[group[0]])
                continue
            u = usage[group]
            alpha = u / u.sum() if u.sum() > 0 else torch.full_like(u, 1 / len(group))
            idx = torch.tensor(group, device=t.device)
            mixed = torch.tensordot(alpha.to(t.device), t.index_select(0, idx).double(), dims=1)
            out.append(mixed.to(t.dtype))
        return torch.stack(out)

    return ({name: merge(t) for name, t in weights.items()},
            {name: merge(t) for name, t in router.items() if t is not None})


def routing_agreement(inputs: torch.Tensor, topk_ids: torch.Tensor, router: Mapping[str, torch.Tensor],
                      groups: list[list[int]], score: str = "softmax", n_group: int = 1,
                      topk_group: int = 1) -> float:
    """Share of held-out tokens that the merged router sends to the groups of their original experts.

    A token agrees when every group holding one of its original top-k experts is among its new top-k groups (when
    its k experts lie in k different groups: the two sets are equal; when two of them share a group, the new
    top-k also holds some other group, which does not count against it).

    Args:
        inputs: [h, d] the calibration's ``heldout_inputs``.
        topk_ids: [h, k] its ``heldout_topk_ids`` (the original router's choice).
        router: the merged router {"weight": [G, d], optional "bias": [G]} (``merge_experts``).
        groups: the G groups (``merge_groups``).
        score, n_group, topk_group: the family's routing (``router_score``, ``routing_groups``).

    Returns:
        A share in [0, 1].

    Raises:
        ExpertPruningError: no held-out tokens, or ids/groups that do not match.
    """
    if inputs.shape[0] == 0 or inputs.shape[0] != topk_ids.shape[0]:
        raise ExpertPruningError(f"routing agreement needs held-out tokens: inputs {list(inputs.shape)}, top-k ids "
                                 f"{list(topk_ids.shape)}")
    e = sum(len(group) for group in groups)
    _check_groups(groups, e)
    group_of = torch.empty(e, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    ids = topk_ids.long().cpu()
    if ids.min() < 0 or ids.max() >= e:
        raise ExpertPruningError(f"top-k ids fall outside the {e} grouped experts")
    k = ids.shape[1]
    new = route(inputs, router, min(k, len(groups)), score, n_group, topk_group).cpu()
    hit = torch.zeros(len(ids), len(groups), dtype=torch.bool).scatter_(1, new, True)
    return hit.gather(1, group_of[ids]).all(1).double().mean().item()


# ----------------------------------------------------------------------------------------------- on disk

def _stored_dtype(src: Path, weight_map: dict, key: str) -> torch.dtype:
    with open_safetensors(src / weight_map[key]) as f:
        return _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)


def _router_keys(keys: list[str], arch: MoEArchitecture, layer: int) -> dict[str, str]:
    """{"weight": disk key, "bias": disk key} of one layer's router among ``keys`` (in-memory names compared)."""
    prefix = f"model.layers.{layer}.{arch.moe_block}.{arch.router}."
    found = {}
    for key in keys:
        name = arch.disk_to_memory(key)
        if name == prefix + "weight":
            found["weight"] = key
        elif name == prefix + "e_score_correction_bias":
            found["bias"] = key
    return found


def _read_config(path: Path):
    """The config of a stock or shared-core checkpoint, as its own config class reads it (attribute maps such as
    Qwen3-MoE's num_experts -> num_local_experts applied).

    Raises:
        CheckpointError: no config.json.
        UnsupportedModelError: a model type moe-ds does not know.
    """
    from transformers import CONFIG_MAPPING

    from .checkpoint import CheckpointError
    from .modeling_shared_core import shared_core_classes

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a model directory")
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type", "")
    if isinstance(raw.get("shared_core"), dict):
        return shared_core_classes(model_type)[0].from_pretrained(path)
    return CONFIG_MAPPING[get_architecture(model_type).model_type].from_pretrained(path)


def _stock_statistics(model_type: str, layers: int, original: int, kept: int, d: int, i: int, dtype,
                      extra: dict | None) -> dict:
    """compression_statistics.yaml of a stock checkpoint with fewer experts (ratios relative to the source)."""
    dtype = str(dtype or "float32").replace("torch.", "")
    orig, comp = expert_params(original, d, i), expert_params(kept, d, i)
    stats = {"model_type": model_type,
             "shape": {"moe_layers": layers, "num_experts": kept, "hidden_size": d, "intermediate_size": i},
             "num_experts": {"original": original, "kept": kept},
             "expert_params": {"original": layers * orig, "compressed": layers * comp, "ratio": comp / orig},
             "bytes": {"dtype": dtype, "experts_original": layers * orig * dtype_bytes(dtype),
                       "experts_compressed": layers * comp * dtype_bytes(dtype)}}
    stats.update(extra or {})
    return stats


def write_expert_checkpoint(src_dir: str | Path, dst_dir: str | Path, arch: MoEArchitecture, model_config,
                            layers: Mapping[int, dict] | Callable[[int], dict], tokenizer=None,
                            statistics: dict | None = None, overwrite: bool = False) -> Path:
    """Write a stock checkpoint whose MoE layers hold the given experts and routers (pruned or merged).

    Streams one decoder layer at a time: each layer's non-expert tensors are copied from ``src_dir`` (its router's
    replaced), its experts written under the family's on-disk per-expert keys (``arch.expert_key``), in the
    source's stored dtypes. The config is ``model_config`` with the expert count (``arch.num_experts_key``) set to
    E'; it loads with ``AutoModelForCausalLM.from_pretrained(dst_dir)``. The folder appears atomically
    (``run_layout.atomic_output_dir``); compression_statistics.yaml holds the expert counts and parameters
    (relative to the source) and ``statistics``.

    Args:
        src_dir: the stock source checkpoint (per-expert keys, as ``save_pretrained`` writes them).
        dst_dir: the folder to create.
        arch: the family's table row (``arch.get_architecture(model_config.model_type)``).
        model_config: the source's config.
        layers: for every MoE layer of the source, {"gate": [E', I, d], "up": [E', I, d], "down": [E', d, I],
            "router_weight": [E', d], "router_bias": [E'] (exactly when the source router has
            ``e_score_correction_bias``)}: a mapping, or a callable ``layers(layer) -> dict`` called once per MoE
            layer in increasing order, so the caller can compute one layer at a time.
        tokenizer: a tokenizer or a folder to copy tokenizer files from (default ``src_dir``).
        statistics: extra entries of compression_statistics.yaml (e.g. the method, routing agreement).
        overwrite: replace an existing ``dst_dir``.

    Raises:
        ExpertPruningError: a MoE layer missing, tensors of the wrong shape, different E' in different layers,
            router bias given or missing, or an E' the router cannot route over (``expert_count_problem``:
            E' < top_k, DeepSeek-V3 routing groups).
        CompressError, CheckpointError: the source is not a readable stock MoE checkpoint (``ExpertReader``).
        FileExistsError: ``dst_dir`` exists and ``overwrite`` is False.
    """
    src = Path(src_dir)
    if get_architecture(model_config.model_type).model_type != arch.model_type or is_compressed_checkpoint(src):
        raise ExpertPruningError(f"write_expert_checkpoint writes stock {arch.model_type} checkpoints from a stock "
                                 f"source; got a {model_config.model_type} config for {src}")
    reader = ExpertReader(src, model_config)
    d, i = int(model_config.hidden_size), int(getattr(model_config, arch.intermediate_size_key))
    top_k = int(getattr(model_config, arch.top_k_key))
    n_group, topk_group = routing_groups(model_config)
    groups = reader.non_expert_groups()
    get = layers if callable(layers) else None
    if get is None:
        missing, extra = sorted(set(reader.layers) - set(layers)), sorted(set(layers) - set(reader.layers))
        if missing or extra:
            raise ExpertPruningError(f"experts must be given for exactly the MoE layers {reader.layers}: missing "
                                     f"{missing}, not MoE layers {extra}")
    count: list[int] = []

    def state_of(layer: int) -> dict:
        keys = groups.get(layer, [])
        state = read_tensors(src, reader.weight_map, keys)
        if layer not in reader.layers:
            return state
        new = get(layer) if get is not None else layers[layer]
        e = int(new["router_weight"].shape[0])
        if not count:
            problem = expert_count_problem(e, top_k, n_group, topk_group)
            if problem is not None:
                raise ExpertPruningError(f"cannot write {e} experts per layer: {problem}")
            count.append(e)
        if e != count[0]:
            raise ExpertPruningError(f"layer {layer} holds {e} experts, an earlier layer {count[0]}; a stock config "
                                     "holds one count for every layer")
        shapes = {"gate": (e, i, d), "up": (e, i, d), "down": (e, d, i), "router_weight": (e, d)}
        router = _router_keys(keys, arch, layer)
        if "bias" in router:
            shapes["router_bias"] = (e,)
        given = {name: tuple(new[name].shape) for name in shapes if name in new}
        wrong = {name: (given.get(name), shape) for name, shape in shapes.items() if given.get(name) != shape}
        extra = sorted(set(new) - set(shapes))
        if wrong or extra:
            raise ExpertPruningError(f"layer {layer}: tensors (given, expected) {wrong} and unexpected {extra}")
        if "weight" not in router:
            raise ExpertPruningError(f"{src}: layer {layer} has no router weight among {keys[:5]}...")
        expert_dtype = _stored_dtype(src, reader.weight_map, arch.expert_key(layer, 0, "gate"))
        for name, key in router.items():
            state[key] = new[f"router_{name}"].detach().to(device="cpu", dtype=state[key].dtype)
        for p in ("gate", "up", "down"):
            for j, w in enumerate(new[p].detach().to(device="cpu", dtype=expert_dtype)):
                state[arch.expert_key(layer, j, p)] = w
        return state

    with atomic_output_dir(dst_dir, overwrite) as tmp:
        write_shards(tmp, sorted(set(groups) | set(reader.layers)), state_of)
        config = copy.deepcopy(model_config)
        setattr(config, arch.num_experts_key, count[0])
        config.save_pretrained(tmp)
        finish_checkpoint(tmp, config, tokenizer=src if tokenizer is None else tokenizer)
        stats = _stock_statistics(arch.model_type, len(reader.layers), reader.num_experts, count[0], d, i,
                                  getattr(config, "dtype", None), statistics)
        (tmp / STATISTICS_FILE).write_text(yaml.safe_dump(stats, sort_keys=False))
    return Path(dst_dir)


def select_experts_on_disk(src_dir: str | Path, dst_dir: str | Path, kept: Mapping[int, torch.Tensor], *,
                           overwrite: bool = False, statistics: dict | None = None) -> Path:
    """Copy any moe-ds checkpoint keeping only the experts ``kept`` of each MoE layer (new expert i = kept[i]).

    Works on stock checkpoints (per-expert keys ``experts.N.`` renumbered; fused ``gate_up_proj``/``down_proj``
    index-selected) and on shared-core checkpoints (``config.shared_core``: every ``{p}_u_in``, ``{p}_v_in``,
    ``{p}_u_out``, ``{p}_v_out`` [E, ...] and the low-rank forms' ``{p}_a``, ``{p}_b`` index-selected, the cores
    ``{p}_core`` and delta's bases ``{p}_base`` kept), plus the router rows
    (``gate.weight`` [E, d], DeepSeek-V3's ``e_score_correction_bias`` [E]). The config's expert count
    (``arch.num_experts_key``) becomes E'; everything else is copied as stored, one decoder layer in memory at a
    time, into a folder that appears atomically. The result loads with ``moe_ds.checkpoint.load_model`` (a
    shared-core one is validated against its config first). This is what progressive pruning calls between
    distillation stages.

    Args:
        src_dir: a stock or shared-core checkpoint folder.
        dst_dir: the folder to create.
        kept: {MoE layer: int64 [E'] increasing expert ids}, every MoE layer, the same E' everywhere
            (``choose_experts``; ``check_kept`` says what is accepted).
        overwrite: replace an existing ``dst_dir``.
        statistics: extra entries of compression_statistics.yaml; ``expert_selection`` ({layer: kept ids}) is
            always added.

    Raises:
        ExpertPruningError: see ``check_kept`` (including DeepSeek-V3 routing groups that keep different counts),
            or an expert tensor without a leading expert dimension.
        CheckpointError: the source has no readable weights (or the shared-core result does not validate).
        FileExistsError: ``dst_dir`` exists and ``overwrite`` is False.
    """
    src = Path(src_dir)
    config = _read_config(src)
    arch = get_architecture(config.model_type)
    e = int(getattr(config, arch.num_experts_key))
    top_k = int(getattr(config, arch.top_k_key))
    n_group, topk_group = routing_groups(config)
    weight_map = read_weight_map(src)
    by_layer: dict[int, list[str]] = {}
    for key in weight_map:
        m = _LAYER_KEY.match(key)
        by_layer.setdefault(int(m.group(1)) if m else -1, []).append(key)
    moe_layers = sorted(layer for layer, keys in by_layer.items() if "weight" in _router_keys(keys, arch, layer))
    kept = check_kept(kept, e, top_k, n_group, topk_group, layers=moe_layers)
    new_e = next(iter(kept.values())).numel()
    per_expert = re.compile(r"^(\d+)\.(.+)$")

    def state_of(layer: int) -> dict:
        keys = by_layer.get(layer, [])
        state = read_tensors(src, weight_map, keys)
        if layer not in kept:
            return state
        ids, renumber = kept[layer], {int(old): new for new, old in enumerate(kept[layer].tolist())}
        router = _router_keys(keys, arch, layer)
        experts_prefix = f"model.layers.{layer}.{arch.moe_block}.{arch.experts}."
        out = {}
        for key, tensor in state.items():
            name = arch.disk_to_memory(key)
            if key in router.values():
                out[key] = tensor.index_select(0, ids)
            elif name.startswith(experts_prefix):
                rest = name[len(experts_prefix):]
                m = per_expert.match(rest)
                if m is not None:  # stock on-disk key of one expert: renumbered, or dropped
                    if int(m.group(1)) in renumber:
                        out[re.sub(rf"\.{arch.experts}\.{m.group(1)}\.", f".{arch.experts}.{renumber[int(m.group(1))]}.",
                                   key, count=1)] = tensor
                elif rest.endswith(("_core", "_base")):  # shared by the layer's experts (shared core, delta's base)
                    out[key] = tensor
                elif tensor.dim() >= 1 and tensor.shape[0] == e:
                    out[key] = tensor.index_select(0, ids)
                else:
                    raise ExpertPruningError(f"{src}: {key} {list(tensor.shape)} has no leading expert dimension "
                                             f"of {e}; cannot select experts from it")
            else:
                out[key] = tensor
        return out

    layers = sorted(by_layer)
    with atomic_output_dir(dst_dir, overwrite) as tmp:
        write_shards(tmp, layers, state_of)
        config = copy.deepcopy(config)
        setattr(config, arch.num_experts_key, new_e)
        config.save_pretrained(tmp)
        selection = {"expert_selection": {layer: ids.tolist() for layer, ids in kept.items()}}
        previous = {}
        if (src / STATISTICS_FILE).is_file():
            previous = yaml.safe_load((src / STATISTICS_FILE).read_text()) or {}
        if isinstance(getattr(config, "shared_core", None), dict):
            config = validate_compressed_checkpoint(tmp)
            from .stats import compression_statistics

            base = compression_statistics(config)
            carried = {k: v for k, v in previous.items() if k not in base}
            finish_checkpoint(tmp, config, tokenizer=src,
                              statistics={**carried, "num_experts": {"original": e, "kept": new_e},
                                          **(statistics or {}), **selection})
        else:
            finish_checkpoint(tmp, config, tokenizer=src)
            d, i = int(config.hidden_size), int(getattr(config, arch.intermediate_size_key))
            stats = _stock_statistics(arch.model_type, len(moe_layers), e, new_e, d, i, getattr(config, "dtype", None),
                                      {**(statistics or {}), **selection})
            carried = {k: v for k, v in previous.items() if k not in stats}
            (tmp / STATISTICS_FILE).write_text(yaml.safe_dump({**stats, **carried}, sort_keys=False))
    return Path(dst_dir)

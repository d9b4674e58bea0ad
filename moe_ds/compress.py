"""Stage 1: zero-shot shared-core compression, one slice of layers per rank.

Each rank owns the MoE layers ``layers_for_rank(rank, world_size, layers)``, reads only their expert weights
from the safetensors shards (``ExpertReader``), fits every projection (``moe_ds.fit``) in fp32 on its device,
and writes each layer's factors atomically to ``OUTPUT/.factors/layer-NNNNN.safetensors``; a rerun skips
layers whose file carries this run's fingerprint. After the final barrier rank 0 assembles the loadable
compressed model (``moe_ds.checkpoint`` format) in OUTPUT, ``config.json`` last.

With a calibration folder (``moe_ds.calibrate``) the fit can minimise the activation objective
Σ_e w_e ||(W_e − Ŵ_e) S_e||² instead of the weight objective (``moe_ds.fit``), and every layer's report adds the
error of the experts' combined output on the calibration's held-out tokens, whichever objective was fitted, and
the router's entropy and rarely used experts (``stats.routing_statistics``).
"""

import bisect
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from .arch import PROJECTIONS, get_architecture
from .budget import (FACTORISED, BudgetError, ExpertPlan, canonical_method, density_for_budget,
                     kept_experts_for_budget, kept_experts_for_ratio, method_statistics, parse_method,
                     rank_for_budget)
from .checkpoint import (STATISTICS_FILE, finish_checkpoint, shared_core_config,
                         validate_compressed_checkpoint, write_shards)
from .dist import barrier, device_for, init_distributed, log_main
from .model_files import CompressError, ExpertReader, resolve_model_dir  # re-exported: the stage's API
from .modeling_shared_core import QUANTIZATION_KEY
from .fit import (FitConfig, Init, Optimizer, Weighting, eckart_young_error, expert_weights, fit_projection,
                  output_error, projection_moments, relative_error, whitening)
from .run_layout import atomic_file, check_output_dir, remove_stale_temporaries, write_atomic
from .stats import dtype_bytes, expert_params, routing_statistics

logger = logging.getLogger("moe_ds")

FACTORS_DIR = ".factors"
RUN_CONFIG = "compress_config.json"
ASSEMBLY = ".assembly-"
ROUTER_BIAS = "e_score_correction_bias"  # DeepSeek-V3's router tensor beside its weight  # rank 0 builds the model files in OUTPUT/.assembly-XXXX/ and moves them into OUTPUT


SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]
ReportTo = Literal["none", "wandb"]
Objective = Literal["auto", "weight", "activation"]
PruneScore = Literal["reap", "frequency", "router_weight"]
MergeSimilarity = Literal["router_logits", "expert_outputs"]


@dataclass
class CompressConfig:
    model: str  # original MoE model: local directory or Hugging Face Hub id
    output: str  # the compressed model directory to create (rerunning the same command resumes)
    method: str = "shared_core"  # shared_core, lowrank, delta, prune, merge or magnitude; a structural step may come first: prune,shared_core
    rank: int | None = None  # shared_core/lowrank/delta: rank r of every projection (or give target_ratio)
    target_ratio: float | None = None  # expert-storage bytes / the original's: picks the rank, the experts kept (prune, merge) or the density (magnitude)
    num_experts: int | None = None  # prune/merge: experts kept per layer (needed when a weight step follows: prune,shared_core)
    prune_score: PruneScore = "reap"  # prune: REAP's router-weighted output norm per routed token, tokens routed, or routing weight received
    prune_threshold: float | None = None  # prune: drop experts below this share of a layer's tokens (every layer keeps the largest survivor count)
    merge_similarity: MergeSimilarity = "expert_outputs"  # merge: cluster experts by their mean outputs (HC-SMoE's choice) or their router logits on the calibration's held-out tokens
    sparsity: float | None = None  # magnitude: share of each projection's expert weights set to zero (or give target_ratio)
    init: Init = "mean"  # zero-shot start: mean (C = mean expert, U = 0, V ~ N(0, σ²)) or svd (closed form)
    steps: int = 1000  # Adam steps per (layer, projection)
    lr: float = 1e-3  # Adam learning rate
    tol: float = 0.0  # stop early below this relative improvement per 50 steps (0: run all steps)
    init_std: float = 1.0  # σ of V at the mean start
    optimizer: Optimizer = "adam"  # Adam or AdamW
    seed: int = 0  # seeds the mean start's V per (layer, projection), whatever the number of ranks
    save_dtype: SaveDtype = "auto"  # dtype of the stored model: auto keeps the original's
    overwrite: bool = False  # replace results of a different configuration in OUTPUT
    allow_larger: bool = False  # accept a rank whose compressed experts hold more parameters than the original
    keep_factors: bool = False  # keep OUTPUT/.factors after assembly
    report_to: ReportTo = "none"  # wandb logs the per-layer error table (offline unless WANDB_MODE says otherwise)
    calibration: str | None = None  # calibration folder (launch/calibrate.py): enables the activation objective and the output-error report
    objective: Objective = "auto"  # weight: Σ_e ||W_e − Ŵ_e||²; activation: Σ_e w_e ||(W_e − Ŵ_e) S_e||² on the calibration's inputs; auto: activation when --calibration is given, else weight
    damping: float = 1e-2  # activation objective: Σ_e = M_e / n_e + damping · mean(diag) · I (relative, > 0)
    weighting: Weighting = "tokens"  # activation objective's w_e: tokens routed to e, router weight e received, or uniform
    shrinkage: float = 0.5  # shared_diag calibrations: expert e's moment D_e^½ ((1 − s) R + s I) D_e^½, s in [0, 1] (0: the shared correlations as they are)
    quantize: str | None = None  # store the experts quantized (moe_ds.quantize spec: int4-g128, int8, int4-g64-asym-mse, ...); --target-ratio then counts packed bytes
    quantize_router: str | None = None  # with --quantize: the router's spec (default int8 per output channel; none keeps it)
    quantize_attention: str | None = None  # with --quantize: the attention projections' spec (default none)

    def __post_init__(self):
        """Raises CompressError naming the offending setting."""
        try:
            structural, weight = parse_method(self.method)
        except BudgetError as err:
            raise CompressError(str(err)) from err
        self._check_quantization(weight)
        self._check_budget(structural, weight)
        for name, choices in (("save_dtype", get_args(SaveDtype)), ("report_to", get_args(ReportTo)),
                              ("objective", get_args(Objective)), ("weighting", get_args(Weighting)),
                              ("prune_score", get_args(PruneScore)), ("merge_similarity", get_args(MergeSimilarity))):
            if getattr(self, name) not in choices:
                raise CompressError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.damping > 0:
            raise CompressError(f"damping must be > 0, got {self.damping}")
        if not 0 <= self.shrinkage <= 1:
            raise CompressError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.objective == "activation" and self.calibration is None:
            raise CompressError("objective 'activation' needs --calibration (a folder written by "
                                "launch/calibrate.py)")
        if structural is not None and self.calibration is None:
            raise CompressError(f"method {self.method!r} chooses experts from calibration statistics: give "
                                f"--calibration (a folder written by launch/calibrate.py)")
        try:
            self.fit_config()
        except ValueError as err:
            raise CompressError(str(err)) from err

    def _check_quantization(self, weight: str | None) -> None:
        """Parse the --quantize* specs (the router defaults to int8 once --quantize is given)."""
        from .quantize import QuantizationError, QuantSpec

        if self.quantize is None or str(self.quantize).lower() == "none":
            self.quantize = None
            if {self.quantize_router, self.quantize_attention} - {None, "none"}:
                raise CompressError("--quantize-router and --quantize-attention need --quantize (the experts' spec)")
            return
        if self.quantize_router is None:
            self.quantize_router = "int8"
        for flag, text in (("quantize", self.quantize), ("quantize-router", self.quantize_router),
                           ("quantize-attention", self.quantize_attention)):
            if text is not None and str(text).lower() != "none":
                try:
                    QuantSpec.parse(text)
                except QuantizationError as err:
                    raise CompressError(f"--{flag} {text}: {err}") from err
        if weight == "magnitude":
            raise CompressError("method magnitude keeps float values and a bitmap; it cannot be combined with "
                                f"--quantize {self.quantize}")

    def _check_budget(self, structural: str | None, weight: str | None) -> None:
        """Which of rank / target_ratio / num_experts / prune_threshold / sparsity each method takes."""
        given = {k: getattr(self, k) for k in ("rank", "target_ratio", "num_experts", "prune_threshold", "sparsity")
                 if getattr(self, k) is not None}
        experts = [k for k in ("num_experts", "prune_threshold") if k in given]
        if weight in FACTORISED:
            size = [k for k in ("rank", "target_ratio") if k in given]
        elif weight == "magnitude":
            size = [k for k in ("target_ratio", "sparsity") if k in given]
        else:  # prune or merge alone: the ratio is the share of experts kept
            size = [k for k in ("target_ratio", "num_experts", "prune_threshold") if k in given]
            experts = []
        allowed = set(size) | set(experts)
        if len(size) != 1:
            names = {None: ("target_ratio", "num_experts", "prune_threshold"), "magnitude": ("target_ratio", "sparsity")}
            names = names.get(weight, ("rank", "target_ratio"))
            where = "" if self.method == "shared_core" else f"method {self.method!r}: "
            raise CompressError(f"{where}give exactly one of {', '.join(names[:-1])} and {names[-1]} (got "
                                + ", ".join(f"{k}={getattr(self, k)}" for k in names) + ")")
        if structural is not None and weight is not None and len(experts) != 1:
            raise CompressError(f"method {self.method!r}: give the experts kept per layer (num_experts, or "
                                f"prune_threshold for prune) as well as the {weight} budget")
        if "prune_threshold" in given and structural != "prune":
            raise CompressError("prune_threshold applies to method prune only")
        extra = sorted(set(given) - allowed)
        if extra:
            raise CompressError(f"method {self.method!r} does not take {', '.join(extra)}")
        if self.rank is not None and self.rank < 0:
            raise CompressError(f"rank must be >= 0, got {self.rank}")
        if self.rank == 0 and weight == "lowrank":
            raise CompressError(f"method {self.method!r} at rank 0 stores no experts at all (every expert would "
                                f"output zero); give --rank >= 1")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise CompressError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        if self.num_experts is not None and self.num_experts < 1:
            raise CompressError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.prune_threshold is not None and not 0 < self.prune_threshold < 1:
            raise CompressError(f"prune_threshold must be in (0, 1), got {self.prune_threshold}")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise CompressError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def fit_config(self) -> FitConfig:
        return FitConfig(init=self.init, steps=self.steps, lr=self.lr, tol=self.tol, init_std=self.init_std,
                         optimizer=self.optimizer)

    def resolved_objective(self) -> str:
        """"weight" or "activation" ("auto": activation exactly when a calibration is given)."""
        if self.objective == "auto":
            return "weight" if self.calibration is None else "activation"
        return self.objective


def layers_for_rank(rank: int, world_size: int, layers: list[int]) -> list[int]:
    """The MoE layers a rank owns: every world_size-th layer starting at its rank (balanced, disjoint).

    Raises:
        ValueError: rank outside [0, world_size).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return sorted(layers)[rank::world_size]


def expert_ratio(rank: int, e: int, d: int, i: int) -> float:
    """Expert-parameter ratio compressed/original at wrapper rank r (``stats.expert_params``)."""
    return expert_params(e, d, i, rank) / expert_params(e, d, i)


def rank_for_ratio(ratio: float, e: int, d: int, i: int) -> int:
    """The largest rank in [0, min(d, I)] whose expert-parameter ratio is <= ratio.

    Raises:
        CompressError: even rank 0 (the cores alone) exceeds the ratio.
    """
    if expert_ratio(0, e, d, i) > ratio:
        raise CompressError(f"target ratio {ratio} is below the cores' own share {expert_ratio(0, e, d, i):.4f}")
    ranks = range(min(d, i) + 1)  # the ratio grows with r
    return bisect.bisect_right(ranks, ratio, key=lambda r: expert_ratio(r, e, d, i)) - 1


def _fingerprint(cfg: CompressConfig, model_config, rank: int, calibration=None, setup=None) -> str:
    """What a layer's factors depend on; a rerun resumes only layers written under the same fingerprint. A run
    without a calibration keeps the fingerprint it had before calibrations existed, and the shared core the one it
    had before other methods existed."""
    fit = asdict(cfg.fit_config())
    payload = {"model_config": model_config.to_json_string(use_diff=False), "rank": rank, "seed": cfg.seed, **fit}
    if setup is not None and setup.method != "shared_core":
        plan = {k: v for k, v in asdict(setup.plan).items() if k != "quant" or v is not None}
        payload.update(method=setup.method, plan=plan, prune_score=cfg.prune_score,
                       merge_similarity=cfg.merge_similarity, save_dtype=cfg.save_dtype,
                       kept={str(k): v.tolist() for k, v in (setup.kept or {}).items()})
    if calibration is not None:
        payload.update(calibration=calibration_fingerprint(calibration), objective=cfg.resolved_objective(),
                       damping=cfg.damping, weighting=cfg.weighting, shrinkage=cfg.shrinkage)
    if cfg.quantize is not None:
        payload.update(quantize=[cfg.quantize, cfg.quantize_router, cfg.quantize_attention])
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def calibration_fingerprint(calibration) -> str:
    """SHA-256 of the calibration's manifest (canonical JSON): it names the model's fingerprint, the data, the
    token counts and when it was made, and it is written last, so any recomputed calibration differs."""
    return hashlib.sha256(json.dumps(calibration.manifest, sort_keys=True).encode()).hexdigest()[:16]


def open_calibration(cfg: CompressConfig, model_dir: Path, model_config, reader: "ExpertReader"):
    """The calibration of ``cfg.calibration`` for this model (``moe_ds.calibrate.load_calibration``), or None.

    Raises:
        CompressError: the folder is not a complete calibration, or one of another model (``load_calibration``
            compares the model's fingerprint, weights sample and shape; here its MoE layers too).
    """
    if cfg.calibration is None:
        return None
    from .calibrate import CalibrationError, load_calibration  # only runs with a calibration need it

    try:
        calibration = load_calibration(cfg.calibration, model_config, model_dir)
    except CalibrationError as err:
        raise CompressError(str(err)) from err
    layers = [int(layer) for layer in calibration.manifest["layers"]]
    if layers != reader.layers:
        raise CompressError(f"calibration {cfg.calibration} holds MoE layers {layers}, but {model_dir} has "
                            f"{reader.layers}: it was made for another model; run launch/calibrate.py on {model_dir}")
    return calibration


def _factor_path(out: Path, layer: int) -> Path:
    return out / FACTORS_DIR / f"layer-{layer:05d}.safetensors"


def _read_factor_meta(path: Path) -> dict | None:
    """Metadata of a finished layer file, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["moe_ds"])
    except Exception:  # not written by atomic_file (e.g. a foreign or damaged file): treat as absent
        logger.warning("ignoring unreadable factor file %s", path)
        return None


@dataclass
class MethodSetup:
    """What ``--method`` does to every layer, decided once before any layer is read (the same on every rank)."""

    method: str  # canonical chain, e.g. "prune,shared_core"
    structural: str | None  # "prune", "merge" or None
    weight_step: str | None  # "shared_core", "lowrank", "delta", "magnitude" or None (dense experts)
    plan: ExpertPlan  # the layer's storage: experts kept, rank, density, bytes per value
    top_k: int
    kept: dict | None = None  # prune: {layer: int64 ids kept}
    routing_config: object = None  # the model config with E' experts (the compressed layer's router)
    n_group: int = 1  # DeepSeek-V3 routing groups
    topk_group: int = 1
    dtype: str = "float32"  # the stored values' dtype

    @property
    def stock(self) -> bool:
        """True when the result is a stock-architecture checkpoint (no factorised experts)."""
        return self.weight_step not in FACTORISED

    def steps_per_projection(self, cfg: CompressConfig) -> int:
        return cfg.steps if self.weight_step == "shared_core" else 1

    def describe(self) -> str:
        parts = []
        if self.structural:
            parts.append(f"{self.plan.kept_experts} of {self.plan.num_experts} experts kept per layer "
                         f"({self.structural})")
        if self.weight_step in FACTORISED:
            parts.append(f"{self.weight_step} at rank {self.plan.rank}")
        if self.weight_step == "magnitude":
            parts.append(f"density {self.plan.density:.4f} (sparsity {1 - self.plan.density:.4f})")
        return ", ".join(parts) or "dense experts"


def _kept_for_ratio(cfg: CompressConfig, e: int, d: int, i: int, k: int, weight_step: str | None, save: str) -> int:
    """Experts kept by prune/merge at --target-ratio: E'/E ≤ ratio, or alone under --quantize the most E' whose
    quantized bytes fit (``budget.kept_experts_for_budget``)."""
    if cfg.quantize is None or weight_step is not None:
        return kept_experts_for_ratio(cfg.target_ratio, e, k)
    return kept_experts_for_budget(cfg.target_ratio, ExpertPlan(e, d, i, e, None, value_bytes=dtype_bytes(save),
                                                                quant=cfg.quantize), k)


def plan_method(cfg: CompressConfig, model_config, reader: ExpertReader, calibration=None) -> MethodSetup:
    """Decide the experts kept, the rank or the density of ``cfg.method`` at its byte budget (``moe_ds.budget``).

    Raises:
        CompressError: a budget no setting of the method meets, a rank too large for the layer, more bytes than
            the original without ``--allow-larger``, pruning below top-k or against DeepSeek-V3's routing groups,
            or a stock method asked for another save dtype.
    """
    from .expert_pruning import ExpertPruningError, choose_experts, expert_scores, routing_groups

    arch = get_architecture(model_config.model_type)
    structural, weight_step = parse_method(cfg.method)
    e, k = reader.num_experts, int(getattr(model_config, arch.top_k_key))
    d, i = int(model_config.hidden_size), int(getattr(model_config, arch.intermediate_size_key))
    stored = getattr(model_config, "dtype", None) or torch.float32
    save = str(stored).replace("torch.", "") if cfg.save_dtype == "auto" else cfg.save_dtype
    if weight_step not in FACTORISED and cfg.save_dtype != "auto":
        raise CompressError(f"method {cfg.method!r} writes a stock checkpoint in the original's dtype; "
                            f"--save-dtype {cfg.save_dtype} applies to factorised methods only")
    n_group, topk_group = routing_groups(model_config)
    kept_count, kept = e, None
    try:
        if structural == "prune":
            scores = {layer: expert_scores(calibration.layer(layer), cfg.prune_score, top_k=k)
                      for layer in reader.layers}
            shares = {layer: expert_scores(calibration.layer(layer), "frequency", top_k=k) / k
                      for layer in reader.layers}
            num_keep = cfg.num_experts
            if num_keep is None and cfg.prune_threshold is None:
                num_keep = _kept_for_ratio(cfg, e, d, i, k, weight_step, save)
            kept = choose_experts(scores, num_keep=num_keep, threshold=cfg.prune_threshold, shares=shares,
                                  top_k=k, n_group=n_group, topk_group=topk_group)
            kept_count = len(next(iter(kept.values())))
        elif structural == "merge":
            kept_count = cfg.num_experts or _kept_for_ratio(cfg, e, d, i, k, weight_step, save)
            if not k <= kept_count <= e:
                raise CompressError(f"merge to {kept_count} expert(s): needs top-k ({k}) <= experts <= {e}")
        plan = ExpertPlan(e, d, i, kept_count, weight_step, value_bytes=dtype_bytes(save), quant=cfg.quantize)
        if weight_step in FACTORISED:
            rank = cfg.rank if cfg.rank is not None else rank_for_budget(cfg.target_ratio, plan)
            if rank > min(d, i):
                raise CompressError(f"rank {rank} is too large for the layer shape (d={d}, I={i}): at most {min(d, i)}")
            plan = replace(plan, rank=rank)
        elif weight_step == "magnitude":
            if cfg.sparsity is not None:
                density = 1 - cfg.sparsity
            else:
                density = density_for_budget(cfg.target_ratio, plan)
            plan = replace(plan, density=density)
    except (BudgetError, ExpertPruningError) as err:
        raise CompressError(str(err)) from err
    if cfg.quantize is not None:  # the router's and attention's group sizes, against the source's shapes
        from .quantized_checkpoint import QuantizedCheckpointError, plan_quantization

        try:
            plan_quantization(reader.model_dir, None, cfg.quantize_router, cfg.quantize_attention)
        except QuantizedCheckpointError as err:
            raise CompressError(str(err)) from err
    if plan.ratio() > 1 and not cfg.allow_larger:
        what = f"rank {plan.rank}" if weight_step in FACTORISED else cfg.method
        unit = "parameters" if weight_step in FACTORISED else "bytes"  # the same ratio at the original's dtype
        raise CompressError(f"{what} stores {plan.ratio():.2f}x the original expert {unit} "
                            f"(E={e}, d={d}, I={i}); pick a smaller --rank or a --target-ratio, or pass "
                            f"--allow-larger")
    routing_config = None
    if structural:
        routing_config = copy.deepcopy(model_config)
        setattr(routing_config, arch.num_experts_key, kept_count)
    return MethodSetup(canonical_method(cfg.method), structural, weight_step, plan, k, kept, routing_config,
                       n_group, topk_group, save)


def fit_factors(weights: dict, cal: dict | None, layer: int, setup: MethodSetup, cfg: CompressConfig,
                device: torch.device, bar: tqdm) -> tuple[dict, dict, dict]:
    """Fit the three projections of one layer in the setup's factorised form (shared core, lowrank or delta).

    Args:
        weights: {proj: [E', d_out, d_in]} the layer's experts (after any structural step); cal: its calibration
            layer (per-expert entries for the same E' experts), or None.

    Returns:
        (tensors to save {f"{proj}_{factor}"}, statistics per projection, factors {proj: {factor: tensor}}). Per
        projection: "rel_error" (weight space) and, under the activation objective, "act_error" (its whitened,
        weighted norm); the shared core adds "init_rel_error"/"init_act_error", "eckart_young_2r", "steps" and
        "seconds" (``moe_ds.fit``), the low-rank forms "seconds" (their closed form is the Eckart–Young optimum
        given the base, ``moe_ds.lowrank.fit_lowrank``).
    """
    from .lowrank import fit_lowrank

    rank = setup.plan.rank
    activation = cfg.resolved_objective() == "activation"
    expert_w = expert_weights(cal, cfg.weighting).to(device) if activation else None
    tensors, stats, factors, whitened = {}, {}, {}, {}
    for p_idx, p in enumerate(PROJECTIONS):
        w = weights[p].to(device=device, dtype=torch.float32)
        seed = cfg.seed * 1_000_003 + layer * 3 + p_idx  # per (layer, projection): independent of rank count
        bar.set_postfix_str(f"layer {layer} {p}")
        done = [0]

        def progress(step, done=done):
            bar.update(step - done[0])
            done[0] = step

        whiten = None
        if activation:
            key = "down" if p == "down" else "gate_up"  # gate and up read the same inputs: one factorisation
            if key not in whitened:
                whitened.clear()  # down's replaces gate/up's: one S in memory at a time
                sums, tokens = projection_moments(cal, p, cfg.shrinkage)
                whitened[key] = whitening(sums.to(device), tokens, cfg.damping)
                del sums
            whiten = whitened[key]
        if setup.weight_step == "shared_core":
            res = fit_projection(w, rank, cfg.fit_config(), seed=seed, progress=progress, whiten=whiten,
                                 weights=expert_w)
            bar.update(cfg.steps - done[0])
            stats[p] = {"rel_error": res.weight_rel_error, "init_rel_error": res.init_rel_error,
                        "eckart_young_2r": eckart_young_error(w, res.factors["core"], 2 * rank, whiten, expert_w),
                        "steps": res.steps, "seconds": round(res.seconds, 3)}
            if activation:
                stats[p]["act_error"] = res.rel_error
                stats[p]["init_act_error"] = stats[p].pop("init_rel_error")
        else:
            res = fit_lowrank(w, rank, base=setup.weight_step == "delta", whiten=whiten, weights=expert_w)
            bar.update(1)
            stats[p] = {"rel_error": res.rel_error, "seconds": round(res.seconds, 3)}
            if activation:
                stats[p]["act_error"] = res.act_error
        for name, t in res.factors.items():
            tensors[f"{p}_{name}"] = t.contiguous().cpu()
        factors[p] = res.factors
        del w, whiten
    whitened.clear()
    return tensors, stats, factors


def _router_parts(router: dict) -> dict:
    """The module-named router tensors (``methods.read_router``) as expert_pruning's {"weight", "bias"}."""
    return {"weight": router["weight"], **({"bias": router[ROUTER_BIAS]} if ROUTER_BIAS in router else {})}


def compress_layer(reader: ExpertReader, layer: int, setup: MethodSetup, cfg: CompressConfig, device: torch.device,
                   bar: tqdm, calibration=None, hidden_act: str = "silu") -> tuple[dict, dict, dict]:
    """Compress one layer by the setup's method: the structural step, then the weight step, then the report.

    Returns:
        (tensors to save, statistics per projection, layer statistics). Tensors: the factors
        ``{proj}_{factor}`` of a factorised form, or the dense experts ``gate``/``up``/``down`` [E', ...] of a
        stock method; after a structural step also the new router ``router.weight`` [E', d] (and
        ``router.e_score_correction_bias``). Statistics per projection: see ``fit_factors``; under magnitude
        "rel_error" and "density". The layer statistics, with a calibration: "output_error" (the experts' combined
        output on its held-out tokens, each side under its own router when the router changed: ``methods``),
        "routing" (``stats.routing_statistics`` of the original router); after a structural step "experts" (the
        original ids behind each new expert) and "routing_agreement" (``expert_pruning.routing_agreement``).
    """
    from .expert_pruning import merge_experts, merge_groups, prune_layer, routing_agreement, router_score
    from .methods import DenseExperts, block_routing, group_calibration, read_router, routed_output_error
    from .sparsity import magnitude_masks

    original = reader.read_layer(layer)
    weights = original
    cal_orig = calibration.layer(layer) if calibration is not None else None
    cal, router, layer_stats, groups = cal_orig, None, {}, None
    if setup.structural is not None:
        router = read_router(reader, layer)
        if setup.structural == "prune":
            groups = [[int(j)] for j in setup.kept[layer]]
            weights, new_router = prune_layer(weights, _router_parts(router), setup.kept[layer])
        else:
            parts = _router_parts(router)
            groups = merge_groups(cal_orig, {p: w.float() for p, w in weights.items()}, parts["weight"].float(),
                                  setup.plan.kept_experts, cfg.merge_similarity, hidden_act, n_group=setup.n_group)
            weights, new_router = merge_experts(weights, parts, groups, cal_orig["tokens"])
        layer_stats["experts"] = groups
        if cal_orig["heldout_inputs"].shape[0] > 0:
            if setup.structural == "merge":  # tokens the merged router sends to their original experts' groups
                layer_stats["routing_agreement"] = routing_agreement(
                    cal_orig["heldout_inputs"], cal_orig["heldout_topk_ids"], new_router, groups,
                    router_score(reader.arch.model_type), setup.n_group, setup.topk_group)
            else:  # tokens whose original top-k experts were all kept
                kept_ids = setup.kept[layer].to(cal_orig["heldout_topk_ids"].device)
                layer_stats["routing_agreement"] = torch.isin(cal_orig["heldout_topk_ids"], kept_ids).all(-1) \
                    .float().mean().item()
        router = {"weight": new_router["weight"],
                  **({ROUTER_BIAS: new_router["bias"]} if "bias" in new_router else {})}
        cal = group_calibration(cal_orig, groups)
    if setup.weight_step in FACTORISED:
        tensors, stats, factors = fit_factors(weights, cal, layer, setup, cfg, device, bar)
        module = None
    else:
        stats, tensors = {}, {}
        for p in PROJECTIONS:
            w = weights[p]
            if setup.weight_step == "magnitude":
                numel = w.numel()
                kept = int(numel * setup.plan.density)  # budget.kept_values: rounded down
                mask = magnitude_masks(w.float(), sparsity=(numel - kept) / numel)
                dense = w.float()
                w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
                stats[p] = {"rel_error": relative_error(dense, w.float()), "density": mask.sum().item() / numel}
            bar.update(1)
            tensors[p] = w.contiguous()
        factors = None
        module = DenseExperts(tensors, hidden_act)
    if router is not None:
        tensors.update({f"router.{name}": t.contiguous() for name, t in router.items()})
    if cal_orig is not None:
        if cal_orig["heldout_inputs"].shape[0] > 0:  # a calibration made with --heldout-tokens 0 has none
            if setup.structural is None and module is None:
                layer_stats["output_error"] = output_error(original, factors, cal_orig["heldout_inputs"],
                                                           cal_orig["heldout_topk_ids"],
                                                           cal_orig["heldout_topk_weights"], hidden_act)
            else:
                if module is None:
                    module = _factor_module(factors, setup.weight_step, hidden_act)
                x = cal_orig["heldout_inputs"].float()
                if router is not None:
                    top_k_index, top_k_weights = block_routing(setup.routing_config, reader.arch, router, x)
                else:
                    top_k_index, top_k_weights = cal_orig["heldout_topk_ids"], cal_orig["heldout_topk_weights"]
                layer_stats["output_error"] = routed_output_error(original, cal_orig, module, top_k_index,
                                                                  top_k_weights, hidden_act)
        layer_stats["routing"] = routing_statistics(cal_orig["tokens"], int(calibration.manifest["tokens"]))
    return tensors, stats, layer_stats


def _factor_module(factors: dict, form: str, hidden_act: str):
    """The experts module of fitted factors {proj: {factor: tensor}} (float32)."""
    from .lowrank import LowRankExperts
    from .shared_core import SharedCoreExperts

    cls = SharedCoreExperts if form == "shared_core" else LowRankExperts
    return cls.from_factors({p: {k: t.float() for k, t in f.items()} for p, f in factors.items()}, hidden_act)


def _layer_summary(stats: dict, layer_stats: dict) -> str:
    """One log line of a layer's errors under any method."""
    parts = []
    for key, name in (("rel_error", "weight-space error"), ("act_error", "activation-objective error"),
                      ("density", "density")):
        if stats and key in stats.get("gate", {}):
            parts.append(f"{name} " + " ".join(f"{p} {stats[p][key]:.4f}" for p in PROJECTIONS))
    if "experts" in layer_stats:
        parts.append(f"{len(layer_stats['experts'])} experts kept")
    if layer_stats.get("routing_agreement") is not None:
        parts.append(f"routing agreement {layer_stats['routing_agreement']:.3f}")
    if "output_error" in layer_stats:
        parts.append(f"experts' output error {layer_stats['output_error']:.4f} on the calibration's held-out tokens")
    return "; ".join(parts)


def _check_output(out: Path, fingerprint: str, cfg: CompressConfig) -> bool:
    """True when ``out`` already holds this configuration's finished model.

    Raises:
        CompressError: ``out`` holds another configuration's results, or unrelated files, and overwrite is off.
    """
    run_cfg = out / RUN_CONFIG
    if not run_cfg.is_file():
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise CompressError(f"{out} exists, is not empty and is not a moe-ds compression output; "
                                f"pass --overwrite to write into it")
        return False
    previous = json.loads(run_cfg.read_text()).get("fingerprint")
    if previous != fingerprint:
        if not cfg.overwrite:
            raise CompressError(f"{out} holds results of a different configuration (fingerprint {previous} != "
                                f"{fingerprint}); pass --overwrite to replace them")
        return False
    return (out / "config.json").is_file()


def compress(cfg: CompressConfig) -> Path:
    """Run stage 1 on this rank (all layers when not launched with several ranks). Returns the output dir.

    Raises:
        CompressError / CheckpointError / UnsupportedModelError: bad input, before any file is written.
    """
    info = init_distributed()
    device = device_for(info)
    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise CompressError(f"{model_dir} has no config.json: not a model directory")
    try:
        if QUANTIZATION_KEY in json.loads((model_dir / "config.json").read_text()):
            raise CompressError(f"{model_dir} is a quantized checkpoint ({QUANTIZATION_KEY}); compress its "
                                f"unquantized source, or write a dequantized copy first (moe_ds.checkpoint.export_dense)")
        model_config = AutoConfig.from_pretrained(model_dir)
    except json.JSONDecodeError as err:
        raise CompressError(f"{model_dir / 'config.json'} is not valid JSON ({err})") from err
    except (OSError, ValueError) as err:  # e.g. a model_type this transformers does not know
        raise CompressError(f"{model_dir / 'config.json'}: {err}") from err
    arch = get_architecture(model_config.model_type)
    reader = ExpertReader(model_dir, model_config)
    e = reader.num_experts
    d, i = int(model_config.hidden_size), int(getattr(model_config, arch.intermediate_size_key))
    calibration = open_calibration(cfg, model_dir, model_config, reader)
    setup = plan_method(cfg, model_config, reader, calibration)
    rank = setup.plan.rank
    out = check_output_dir(cfg.output)
    fingerprint = _fingerprint(cfg, model_config, rank, calibration, setup)
    if _check_output(out, fingerprint, cfg):
        log_main("%s already holds this configuration's compressed model; nothing to do", out)
        return out
    mine = layers_for_rank(info.rank, info.world_size, reader.layers)
    if setup.method == "shared_core":
        log_main("compressing %s (%s, %d MoE layers, E=%d, d=%d, I=%d) at rank %d (expert-parameter ratio %.4f) "
                 "with %d rank(s), init=%s, %d steps, lr %g, %s objective", model_dir, arch.model_type,
                 len(reader.layers), e, d, i, rank, expert_ratio(rank, e, d, i), info.world_size, cfg.init,
                 cfg.steps, cfg.lr, cfg.resolved_objective())
    else:
        log_main("compressing %s (%s, %d MoE layers, E=%d, d=%d, I=%d) by %s: %s; expert bytes %.4f of the original, "
                 "%d rank(s), %s objective", model_dir, arch.model_type, len(reader.layers), e, d, i, setup.method,
                 setup.describe(), setup.plan.ratio(), info.world_size, cfg.resolved_objective())

    if info.is_main:  # what a killed run left behind (temporary files, an assembly folder), before anyone writes
        for path in (remove_stale_temporaries(out / FACTORS_DIR) + remove_stale_temporaries(out, (ASSEMBLY,))):
            logger.info("removed %s, left behind by an interrupted run", path)
    barrier()  # every rank has checked the output before any rank writes into it
    (out / FACTORS_DIR).mkdir(parents=True, exist_ok=True)
    if info.is_main:
        if (out / "config.json").exists() and cfg.overwrite:
            (out / "config.json").unlink()  # the directory is no longer a finished model
        # The resolved rank replaces the requested one (None under --target-ratio) in place.
        resolved = {"fingerprint": fingerprint, **asdict(cfg), "rank": rank, "model_dir": str(model_dir),
                    "world_size": info.world_size}
        write_atomic(out / RUN_CONFIG, json.dumps(resolved, indent=2))

    todo = []
    for layer in mine:
        meta = _read_factor_meta(_factor_path(out, layer))
        if meta is not None and meta.get("fingerprint") == fingerprint:
            logger.info("layer %d already done, skipping", layer)
        else:
            todo.append(layer)
    stop_after = int(os.environ.get("MOE_DS_COMPRESS_STOP_AFTER", "0"))  # test hook: simulate a killed rank
    with tqdm(total=len(todo) * 3 * setup.steps_per_projection(cfg), desc=f"[rank {info.rank}] fit", unit="step",
              position=info.local_rank, dynamic_ncols=True, mininterval=1.0) as bar:
        for n, layer in enumerate(todo, 1):
            tensors, stats, layer_stats = compress_layer(reader, layer, setup, cfg, device, bar, calibration,
                                                         getattr(model_config, "hidden_act", "silu"))
            meta = {"fingerprint": fingerprint, "layer": layer, "rank": rank, "stats": stats, **layer_stats}
            with atomic_file(_factor_path(out, layer)) as tmp:
                save_file(tensors, tmp, metadata={"moe_ds": json.dumps(meta)})
            if setup.method != "shared_core":
                logger.info("layer %d: %s", layer, _layer_summary(stats, layer_stats))
            elif "act_error" in stats["gate"]:
                logger.info("layer %d: activation-objective error gate %.4f up %.4f down %.4f (rank-2r SVD bound "
                            "%.4f %.4f %.4f); weight-space error %.4f %.4f %.4f", layer,
                            *(stats[p]["act_error"] for p in PROJECTIONS),
                            *(stats[p]["eckart_young_2r"] for p in PROJECTIONS),
                            *(stats[p]["rel_error"] for p in PROJECTIONS))
            else:
                logger.info("layer %d: rel. error gate %.4f up %.4f down %.4f (rank-2r SVD bound %.4f %.4f %.4f)",
                            layer, *(stats[p]["rel_error"] for p in PROJECTIONS),
                            *(stats[p]["eckart_young_2r"] for p in PROJECTIONS))
            if "output_error" in layer_stats and setup.method == "shared_core":
                logger.info("layer %d: experts' output error %.4f on the calibration's held-out tokens", layer,
                            layer_stats["output_error"])
            if stop_after and n >= stop_after:
                raise SystemExit(f"MOE_DS_COMPRESS_STOP_AFTER={stop_after}: stopping after {n} layer(s)")
    barrier()
    if info.is_main:
        if setup.stock:
            assemble_stock(cfg, model_dir, model_config, reader, setup, fingerprint)
        else:
            assemble(cfg, model_dir, model_config, reader, rank, fingerprint, setup)
    barrier()
    return out


def error_table(per_layer: dict, output_errors: dict | None = None) -> str:
    """Markdown table of relative reconstruction errors per layer and projection, with the rank-2r SVD bound.

    Weight objective: "err" (weight space) and "SVD-2r" per projection. Activation objective: "err" (weight
    space), "act err" (the objective's whitened, weighted norm) and "act SVD-2r" (the bound in that norm).
    With ``output_errors`` ({layer: error}), a last column "output err": the experts' combined output on a
    calibration's held-out tokens.
    """
    first = next(iter(per_layer.values())).get("gate", {})
    keys = [k for k in ("rel_error", "act_error", "eckart_young_2r", "density") if k in first]
    names = {"rel_error": "err", "act_error": "act err", "density": "density",
             "eckart_young_2r": "act SVD-2r" if "act_error" in keys else "SVD-2r"}
    columns = [(p, k) for p in PROJECTIONS for k in keys]
    output = bool(output_errors)
    header = [f"{p} {names[k]}" for p, k in columns] + (["output err"] if output else [])
    lines = ["| layer | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    rows = {layer: [s[p][k] for p, k in columns] + ([output_errors[layer]] if output else [])
            for layer, s in sorted(per_layer.items())}
    for layer, row in rows.items():
        lines.append(f"| {layer} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    mean = [sum(col) / len(rows) for col in zip(*rows.values())]
    lines.append("| mean | " + " | ".join(f"{v:.4f}" for v in mean) + " |")
    return "\n".join(lines)


def _layer_metas(out: Path, reader: ExpertReader, fingerprint: str) -> tuple[dict, dict, dict, dict]:
    """(statistics per layer, output errors, routing statistics, method entries) of the finished layer files.

    Raises:
        CompressError: a layer without a finished file of this configuration.
    """
    per_layer, output_errors, routing, method = {}, {}, {}, {}
    for layer in reader.layers:
        meta = _read_factor_meta(_factor_path(out, layer))
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise CompressError(f"layer {layer} has no finished factors; rerun the same command to resume")
        per_layer[layer] = meta["stats"]
        if "output_error" in meta:
            output_errors[layer] = meta["output_error"]
        if "routing" in meta:
            routing[layer] = meta["routing"]
        entries = {k: meta[k] for k in ("experts", "routing_agreement") if meta.get(k) is not None}
        if entries:
            method[layer] = entries
    return per_layer, output_errors, routing, method


def _method_statistics(cfg: CompressConfig, model_config, reader: ExpertReader, setup: MethodSetup,
                       method_layers: dict) -> dict:
    """compression_statistics.yaml entries of a method other than the plain shared core (``budget``)."""
    from .stats import expert_shapes

    shapes = expert_shapes(model_config)
    router_per_expert = int(model_config.hidden_size) + (1 if reader.arch.model_type == "deepseek_v3" else 0)
    stats = method_statistics(setup.plan, setup.method, setup.top_k, len(reader.layers), shapes["total_params"],
                              router_per_expert)
    n, b = len(reader.layers), setup.plan.value_bytes
    total = stats["total_params"]  # every tensor at the stored dtype; the experts as the method stores them
    original = total["original"] * b
    compressed = (total["compressed"] - n * setup.plan.stored_values()) * b + n * setup.plan.bytes()
    stats["bytes"] = {"dtype": setup.dtype, "original": original, "compressed": compressed,
                      "ratio": compressed / original, "experts_original": n * setup.plan.original_bytes(),
                      "experts_compressed": n * setup.plan.bytes()}
    stats["method_settings"] = {k: getattr(cfg, k) for k in ("target_ratio", "rank", "num_experts", "prune_score",
                                                            "prune_threshold", "merge_similarity", "sparsity")}
    if method_layers:
        stats["layers"] = {int(layer): entry for layer, entry in method_layers.items()}
    return stats


def assemble(cfg: CompressConfig, model_dir: Path, model_config, reader: ExpertReader, rank: int,
             fingerprint: str, setup: MethodSetup | None = None) -> None:
    """Rank 0: build the loadable compressed model directory from the factor files (config.json last)."""
    out = Path(cfg.output)
    per_layer, output_errors, routing, method_layers = _layer_metas(out, reader, fingerprint)
    stored = getattr(model_config, "dtype", None) or torch.float32
    stored = getattr(torch, str(stored).replace("torch.", "")) if not isinstance(stored, torch.dtype) else stored
    save_dtype = stored if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
    # Not run_layout.atomic_output_dir: OUTPUT also holds the resumable factors (and whatever --overwrite
    # kept), so the finished files are moved in one by one, config.json last, instead of swapping the folder.
    with tempfile.TemporaryDirectory(prefix=ASSEMBLY, dir=out) as tmp:
        tmp = Path(tmp)
        _write_shards(tmp, reader, out, save_dtype)
        form = setup.weight_step if setup is not None else "shared_core"
        base_config = setup.routing_config if setup is not None and setup.routing_config is not None else model_config
        config = shared_core_config(base_config, {p: rank for p in PROJECTIONS},
                                    method=cfg.init if form == "shared_core" else "svd", form=form)
        config.dtype = save_dtype
        config.save_pretrained(tmp)
        fit = {**asdict(cfg.fit_config()), "seed": cfg.seed}
        if form != "shared_core":  # no Adam: the closed form is the optimum given the base
            fit = {"closed_form": "per-expert truncated SVD (moe_ds.lowrank.fit_lowrank)"}
        if cfg.calibration is not None:
            fit.update(objective=cfg.resolved_objective(), calibration=str(cfg.calibration), damping=cfg.damping,
                       weighting=cfg.weighting, shrinkage=cfg.shrinkage)
        extra = {"fit": fit, "reconstruction_error": {int(layer): s for layer, s in per_layer.items()}}
        if output_errors:  # beside reconstruction_error, whose layers hold one entry per projection
            extra["output_error"] = output_errors
        if routing:
            extra["routing"] = routing
        if setup is not None and setup.method != "shared_core":
            extra.update(_method_statistics(cfg, model_config, reader, setup, method_layers))
        finish_checkpoint(tmp, config, tokenizer=model_dir, statistics=extra)
        stats = yaml.safe_load((tmp / STATISTICS_FILE).read_text())
        table = error_table(per_layer, output_errors)
        (tmp / "reconstruction_errors.md").write_text(_error_text(cfg, rank, bool(output_errors), setup)
                                                      + f"\n\n{table}\n")
        written = tmp
        if cfg.quantize is not None and setup is not None:
            written = _quantize_assembled(cfg, tmp, tmp / "quantized", setup, reader)
            stats = yaml.safe_load((written / STATISTICS_FILE).read_text())
        for path in sorted(written.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            if path.is_file():
                os.replace(path, out / path.name)
    if cfg.quantize is None:
        validate_compressed_checkpoint(out)
    if not cfg.keep_factors:
        shutil.rmtree(out / FACTORS_DIR)
    logger.info("wrote %s: expert parameters %s -> %s (ratio %.4f)\n%s", out, f"{stats['expert_params']['original']:,}",
                f"{stats['expert_params']['compressed']:,}", stats["expert_params"]["ratio"], table)
    if cfg.report_to == "wandb":
        _log_wandb(cfg, per_layer, stats, output_errors)


def assemble_stock(cfg: CompressConfig, model_dir: Path, model_config, reader: ExpertReader, setup: MethodSetup,
                   fingerprint: str) -> None:
    """Rank 0: write the stock-architecture checkpoint of prune, merge or magnitude from the layer files
    (``expert_pruning.write_expert_checkpoint``: one layer in memory at a time), then move it into OUTPUT,
    config.json last. A magnitude-pruned model's config carries ``sparsity.SPARSITY_KEY``, which tells distillation
    to hold the pruned weights at zero."""
    from .expert_pruning import write_expert_checkpoint
    from .methods import read_router
    from .sparsity import SPARSITY_KEY, sparsity_section

    out = Path(cfg.output)
    per_layer, output_errors, routing, method_layers = _layer_metas(out, reader, fingerprint)

    def layer_tensors(layer: int) -> dict:
        with safe_open(_factor_path(out, layer), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        router = {k.removeprefix("router."): tensors.pop(k) for k in list(tensors) if k.startswith("router.")}
        router = router or read_router(reader, layer)
        entry = {p: tensors[p] for p in PROJECTIONS}
        entry["router_weight"] = router["weight"]
        if ROUTER_BIAS in router:
            entry["router_bias"] = router[ROUTER_BIAS]
        return entry

    config = copy.deepcopy(model_config)
    if setup.weight_step == "magnitude":
        n = len(reader.layers)
        numel = n * setup.plan.kept_experts * 3 * setup.plan.hidden_size * setup.plan.intermediate_size
        setattr(config, SPARSITY_KEY, sparsity_section(setup.plan.density, numel=numel,
                                                       nnz=n * setup.plan.stored_values(),
                                                       dtype_bytes=setup.plan.value_bytes, sparsity=cfg.sparsity))
    extra = {"fit": {"objective": cfg.resolved_objective(), "calibration": cfg.calibration},
             **_method_statistics(cfg, model_config, reader, setup, method_layers)}
    if any(per_layer.values()):
        extra["reconstruction_error"] = {int(layer): s for layer, s in per_layer.items()}
    if output_errors:
        extra["output_error"] = output_errors
    if routing:
        extra["routing"] = routing
    with tempfile.TemporaryDirectory(prefix=ASSEMBLY, dir=out) as tmp:
        written = write_expert_checkpoint(model_dir, Path(tmp) / "model", reader.arch, config, layer_tensors,
                                          tokenizer=model_dir, statistics=extra)
        table = error_table(per_layer, output_errors) if any(per_layer.values()) or output_errors else ""
        (written / "reconstruction_errors.md").write_text(_error_text(cfg, 0, bool(output_errors), setup)
                                                          + f"\n\n{table}\n")
        if cfg.quantize is not None:
            written = _quantize_assembled(cfg, written, Path(tmp) / "quantized", setup, reader)
        for path in sorted(written.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(path, out / path.name)
    if not cfg.keep_factors:
        shutil.rmtree(out / FACTORS_DIR)
    stats = yaml.safe_load((out / STATISTICS_FILE).read_text())
    logger.info("wrote %s (stock %s, %d experts per layer): expert bytes %s -> %s (ratio %.4f)", out,
                reader.arch.model_type, setup.plan.kept_experts, f"{stats['expert_bytes']['original']:,}",
                f"{stats['expert_bytes']['compressed']:,}", stats["expert_bytes"]["ratio"])


def _input_scales(cfg: CompressConfig, setup: MethodSetup, reader: ExpertReader):
    """quantize_checkpoint's calibration for activation-weighted ranges of dense (stock) experts: layer ->
    {"gate"|"up": [E', d], "down": [E', I]}, the RMS sqrt(E[x_k²]) of each expert's input channels (the
    calibration's second-moment diagonals over the tokens routed to it). Pruned experts keep their own rows; merged
    experts get the layer's pooled RMS [K] (a merged expert serves all its members' tokens). None without a
    calibration, for factorised forms, or when the experts' spec has range "max"."""
    from .calibrate import load_calibration
    from .quantize import QuantSpec

    if cfg.calibration is None or not setup.stock or QuantSpec.parse(cfg.quantize).range != "mse":
        return None
    calibration = load_calibration(cfg.calibration, AutoConfig.from_pretrained(reader.model_dir), reader.model_dir)

    def layer_scales(layer: int) -> dict:
        sums = calibration.layer(layer)
        tokens = sums["tokens"].float().clamp_min(1)[:, None]
        scales = {}
        for name, projections in (("gate_up", ("gate", "up")), ("down", ("down",))):
            moment = sums.get(f"{name}_diag")
            if moment is None:
                moment = torch.diagonal(sums[f"{name}_moment"], dim1=-2, dim2=-1)
            if setup.structural == "merge":
                rms = (moment.float().sum(0) / tokens.sum()).clamp_min(0).sqrt()
            else:
                rms = (moment.float() / tokens).clamp_min(0).sqrt()
                if setup.kept is not None:
                    rms = rms[setup.kept[layer]]
            scales.update({p: rms for p in projections})
        return scales

    return layer_scales


def _quantize_assembled(cfg: CompressConfig, src: Path, dst: Path, setup: MethodSetup, reader: ExpertReader) -> Path:
    """--quantize: the assembled checkpoint in ``src`` packed into ``dst`` (``quantized_checkpoint``), its
    statistics extended with the experts' exact quantized bytes against the original's (and the budget's figure,
    which the same formula gives)."""
    from .quantized_checkpoint import QuantizedCheckpointError, quantize_checkpoint

    try:
        written = quantize_checkpoint(src, dst, cfg.quantize, cfg.quantize_router, cfg.quantize_attention,
                                      calibration=_input_scales(cfg, setup, reader))
    except QuantizedCheckpointError as err:
        raise CompressError(str(err)) from err
    for name in ("reconstruction_errors.md",):
        if (src / name).is_file():
            shutil.copyfile(src / name, written / name)
    stats = yaml.safe_load((written / STATISTICS_FILE).read_text())
    n = len(reader.layers)
    exact = stats["quantization"]["bytes"]["experts"]["quantized"]
    original = n * setup.plan.original_bytes()
    stats["quantization"]["expert_bytes"] = {"original": original, "compressed": exact, "ratio": exact / original,
                                             "budget": n * setup.plan.bytes()}
    (written / STATISTICS_FILE).write_text(yaml.safe_dump(stats, sort_keys=False))
    return written


def _error_text(cfg: CompressConfig, rank: int, output: bool, setup: MethodSetup | None = None) -> str:
    """What reconstruction_errors.md's table shows."""
    objective = f", {cfg.resolved_objective()} objective" if cfg.calibration is not None else ""
    if setup is not None and setup.method != "shared_core":
        text = (f"Method {setup.method}: {setup.describe()}; expert bytes {setup.plan.ratio():.4f} of the original"
                f"{objective}. err is the relative weight-space error ||W − Ŵ||_F / ||W||_F of the experts kept")
        if cfg.resolved_objective() == "activation" and setup.weight_step in FACTORISED:
            text += "; act err the fitted objective's relative error sqrt(Σ_e w_e ||(W_e − Ŵ_e) S_e||² / Σ_e w_e ||W_e S_e||²)"
        if output:
            text += ("; output err is ||Ŷ − Y|| / ||Y|| of the experts' routing-weighted output on the held-out tokens "
                     f"of the calibration {cfg.calibration}, Y under the original router and experts, Ŷ under the "
                     f"compressed layer's router and experts")
        return text + ":"
    text = (f"Relative reconstruction error ||W − Ŵ||_F / ||W||_F per layer and projection (rank {rank}, init "
            f"{cfg.init}, {cfg.steps} steps{objective})")
    if cfg.resolved_objective() == "activation":
        text += (f"; act err is the fitted objective's relative error sqrt(Σ_e w_e ||(W_e − Ŵ_e) S_e||² / "
                 f"Σ_e w_e ||W_e S_e||²) (S_e S_eᵀ the damped second moment of expert e's inputs, damping "
                 f"{cfg.damping}, w_e by {cfg.weighting}), beside the rank-2r truncated-SVD bound for the same core "
                 f"in that norm")
    else:
        text += ", beside the rank-2r truncated-SVD bound for the same core"
    if output:
        text += ("; output err is ||Ŷ − Y|| / ||Y|| of the experts' routing-weighted output Σ_k g_k f_k(x) on the "
                 f"held-out tokens of the calibration {cfg.calibration}")
    return text + ":"


def _write_shards(tmp: Path, reader: ExpertReader, out: Path, save_dtype: torch.dtype) -> None:
    """One safetensors shard per decoder layer (+ one for the rest) and the index, one layer in memory at a time,
    so rank 0's peak memory does not grow with the layer count."""
    groups = reader.non_expert_groups()
    layers = sorted(set(groups) | set(reader.layers))
    experts_name = f"{reader.arch.moe_block}.{reader.arch.experts}"

    def state_of(layer: int) -> dict:
        state = reader.read(groups.get(layer, []))
        if layer in reader.layers:
            router_name = f"model.layers.{layer}.{reader.arch.moe_block}.{reader.arch.router}"
            with safe_open(_factor_path(out, layer), framework="pt") as f:
                for key in f.keys():  # a structural step's router replaces the original's rows
                    name = f"{router_name}.{key.removeprefix('router.')}" if key.startswith("router.") \
                        else f"model.layers.{layer}.{experts_name}.{key}"
                    state[name] = f.get_tensor(key)
        return {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state.items()}

    write_shards(tmp, layers, state_of)


def _log_wandb(cfg: CompressConfig, per_layer: dict, stats: dict, output_errors: dict | None = None) -> None:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="moe-compression", name=f"compress-{Path(cfg.output).name}", job_type="compress",
                     config=asdict(cfg), dir=cfg.output)
    first = next(iter(per_layer.values()))
    keys = [k for k in ("rel_error", "act_error", "eckart_young_2r") if k in first["gate"]]
    extra = ["output_error"] if output_errors else []
    columns = ["layer"] + [f"{p}_{k}" for p in PROJECTIONS for k in keys] + extra
    rows = [[layer] + [s[p][k] for p in PROJECTIONS for k in keys] + ([output_errors[layer]] if extra else [])
            for layer, s in sorted(per_layer.items())]
    run.log({"reconstruction_error": wandb.Table(columns=columns, data=rows),
             "expert_param_ratio": stats["expert_params"]["ratio"]})
    run.finish()

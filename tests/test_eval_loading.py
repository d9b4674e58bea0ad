"""How the evaluator finds and loads a model (#11 items 2 and 3).

- A baseline given as a Hub id (``--baseline Qwen/Qwen3-30B-A3B``, the README's command) resolves to its cached
  snapshot as ``launch/compress.py`` resolves ``--model``; offline and not cached it is one line, exit 2, and
  nothing is written. The Hub cache here is a fake one in ``tmp_path`` (``models--org--name/snapshots/<hash>``
  and ``refs/main``) holding a tiny model.
- ``--dtype auto`` loads in the checkpoint's own dtype (a bf16 checkpoint comes back bf16, every parameter),
  and the weights go to the GPUs through ``from_pretrained(device_map=...)``, never built on the host and then
  moved. No GPU here: the device map is checked on the arguments ``from_pretrained`` receives.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from conftest import REPO, save_tiny_lm, spy_on_loading, tiny_model
from moe_ds.checkpoint import compress_model, save_compressed
from moe_ds.cli import run
from moe_ds.evaluate import BASELINE_DIR, EvalConfig, load_for_eval, read_results

HUB_ID = "tiny-org/tiny-moe"
SNAPSHOT_HASH = "0123456789abcdef0123456789abcdef01234567"
RANKS = {"gate": 4, "up": 4, "down": 4}


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A plain HF and a compressed (shared-core) tiny checkpoint, both saved in bfloat16."""
    root = tmp_path_factory.mktemp("bf16")
    plain = save_tiny_lm(root / "plain", tiny_tokenizer, torch.bfloat16)
    compressed = compress_model(tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer)), RANKS).to(torch.bfloat16)
    save_compressed(compressed, root / "compressed", tokenizer=tiny_tokenizer)
    return {"plain": plain, "compressed": root / "compressed"}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "heldout.jsonl"
    docs = ["The river rose after three days of rain.", "She wrote the numbers down twice."]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, bf16_dirs) -> Path:
    """A Hugging Face cache holding ``HUB_ID`` (the bf16 plain tiny model) at refs/main; the Hub is offline."""
    cache = tmp_path / "hf_cache"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(bf16_dirs["plain"], repo / "snapshots" / SNAPSHOT_HASH)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT_HASH)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read both variables when it was imported: set what snapshot_download reads at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _launch_main(argv: list[str]):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return run("evaluate", lambda: launch.main(argv), launch.ERRORS)


# ------------------------------------------------------------------------------------------ Hub ids (item 2)


def test_baseline_hub_id_resolves_to_the_cached_snapshot(hub_cache, tmp_path, text_file):
    cfg = EvalConfig(watch=str(tmp_path / "run"), baseline=HUB_ID, tasks=("perplexity",), ppl_file=str(text_file))
    assert Path(cfg.baseline) == hub_cache / f"models--tiny-org--tiny-moe/snapshots/{SNAPSHOT_HASH}"


def test_readme_baseline_command_evaluates_a_cached_hub_id(hub_cache, tmp_path, text_file, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = _launch_main(["--watch", str(run_dir), "--baseline", HUB_ID, "--once", "--tasks", "perplexity",
                         "--ppl-file", str(text_file), "--limit", "2", "--wandb-mode", "disabled"])
    assert code == 0, capfd.readouterr().err
    record = read_results(run_dir / BASELINE_DIR)
    assert record["status"] == "ok" and record["role"] == "baseline"
    assert Path(record["model"]) == (hub_cache / f"models--tiny-org--tiny-moe/snapshots/{SNAPSHOT_HASH}").resolve()
    assert record["dtype"] == "auto" and record["loaded_dtype"] == "bfloat16"
    assert record["tasks"]["perplexity"]["metrics"]["word_perplexity"] > 1


def test_uncached_hub_id_offline_is_one_line_exit_2_and_writes_nothing(hub_cache, tmp_path, text_file, capfd):
    before = _files(tmp_path)
    capfd.readouterr()
    code = _launch_main(["--watch", str(tmp_path / "run"), "--baseline", "tiny-org/not-cached", "--tasks",
                         "perplexity", "--ppl-file", str(text_file), "--wandb-mode", "disabled"])
    err = capfd.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("evaluate: error: baseline: cannot resolve 'tiny-org/not-cached': "
                                               "not a local directory"), err
    assert "HF_HUB_OFFLINE" in err[0]  # says why: the Hub is offline
    assert _files(tmp_path) == before


def test_uncached_hub_id_from_the_command_line(tmp_path, text_file):
    """The README's own command, as a user types it, offline with an empty cache: one line, exit 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_cache"), WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "launch/evaluate.py", "--watch", str(tmp_path / "run"), "--baseline",
                          "Qwen/Qwen3-30B-A3B", "--tasks", "perplexity", "--ppl-file", str(text_file)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: baseline: cannot resolve 'Qwen/Qwen3-30B-A3B'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty_cache").exists()


def test_missing_local_baseline_is_still_does_not_exist(tmp_path, text_file):
    with pytest.raises(ValueError, match="baseline='.*/nope' does not exist"):
        EvalConfig(watch=str(tmp_path), baseline=str(tmp_path / "nope"), tasks=("perplexity",),
                   ppl_file=str(text_file))


# ---------------------------------------------------------------------------------------------- dtype (item 3)


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_auto_dtype_keeps_a_bf16_checkpoint_bf16(bf16_dirs, kind):
    model, _ = load_for_eval(bf16_dirs[kind], "auto")
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if kind == "compressed":
        assert type(model).__name__.startswith("SharedCore")


def test_auto_dtype_without_a_dtype_in_config_follows_the_weights(bf16_dirs, tmp_path):
    path = shutil.copytree(bf16_dirs["plain"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load_for_eval(path, "auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["plain", "compressed"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_explicit_dtype_is_followed(bf16_dirs, kind, dtype):
    model, _ = load_for_eval(bf16_dirs[kind], dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


@pytest.mark.parametrize("kind", ["plain", "compressed"])
@pytest.mark.parametrize("n_gpu, device_map", [(0, None), (1, {"": 0}), (2, "balanced")])
def test_weights_go_to_the_gpus_through_from_pretrained(bf16_dirs, monkeypatch, kind, n_gpu, device_map):
    """from_pretrained gets the device map and dtype "auto"; the built model is never moved or dispatched."""
    import accelerate

    spy = spy_on_loading(monkeypatch)  # no GPU on this machine: loads on CPU, where the map would have
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpu)
    monkeypatch.setattr(accelerate, "dispatch_model", spy.recorder("dispatch_model"))
    model, _ = load_for_eval(bf16_dirs[kind], "auto")
    assert len(spy.calls) == 1
    assert spy.calls[0].get("device_map") == device_map and spy.calls[0]["dtype"] == "auto"
    assert spy.moved == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_dtype_name_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_for_eval("unused", "int8")

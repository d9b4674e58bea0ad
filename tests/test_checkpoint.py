"""The compressed checkpoint format: round trips in a fresh process, shipped code, bad directories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, tiny_model
from moe_ds import arch, lowrank, modeling_shared_core, shared_core
from moe_ds.checkpoint import (CheckpointError, compress_model, export_dense, load_compressed, read_tensors,
                               read_weight_map, save_compressed, validate_compressed_checkpoint)

RANKS = {"gate": 3, "up": 4, "down": 5}

FRESH_PROCESS = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from moe_ds.checkpoint import load_compressed
root = Path(sys.argv[1])
for fam in sys.argv[2:]:
    d = root / fam
    ref = load_file(d.parent / f"{fam}_expected.safetensors")
    ids = ref["ids"]
    with torch.no_grad():
        ours = load_compressed(d / "compressed")(ids).logits
        remote_model = AutoModelForCausalLM.from_pretrained(d / "compressed", trust_remote_code=True)
        remote = remote_model(ids).logits
        dense_model = AutoModelForCausalLM.from_pretrained(d / "dense")
        dense = dense_model(ids).logits
    # trust_remote_code gave the shipped classes, not moe_ds's; the export is the stock class.
    assert type(remote_model).__module__.startswith("transformers_modules"), type(remote_model).__module__
    assert type(dense_model).__module__.startswith("transformers.models"), type(dense_model).__module__
    for name, got in (("ours", ours), ("remote", remote), ("dense", dense)):
        err = (got - ref["logits"]).abs().max().item()
        print(fam, name, err)
        assert err < 1e-5, (fam, name, err)
print("OK")
"""


def test_round_trip_in_a_fresh_process_for_every_family(tmp_path):
    """Our loader, trust_remote_code and the dense export all give the in-memory model's logits."""
    for fam in FAMILIES:
        model = compress_model(tiny_model(fam), RANKS, method="mean")
        with torch.no_grad():
            for p in model.parameters():  # non-trivial wrappers so a dropped factor would show
                if p.ndim == 3:
                    p.normal_(0.0, 0.2)
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"ids": ids, "logits": logits.contiguous()}, tmp_path / f"{fam}_expected.safetensors")
        save_compressed(model, tmp_path / fam / "compressed")
        export_dense(tmp_path / fam / "compressed", tmp_path / fam / "dense")
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path), *FAMILIES], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")
    assert out.stdout.count(" ours ") == len(FAMILIES)


def test_directory_layout_and_shipped_code_agree_with_the_package(tmp_path):
    model = compress_model(tiny_model("qwen3_moe"), RANKS)
    save_compressed(model, tmp_path / "c")
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"config.json", "model.safetensors", "compression_statistics.yaml", "arch.py", "shared_core.py",
            "lowrank.py", "modeling_shared_core.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # never pickled
    for module in (arch, shared_core, lowrank, modeling_shared_core):
        shipped = (tmp_path / "c" / Path(module.__file__).name).read_bytes()
        assert shipped == Path(module.__file__).read_bytes()
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == "shared_core_qwen3_moe"
    assert cfg["shared_core"] == {"format_version": 1, "base_model_type": "qwen3_moe", "ranks": RANKS,
                                  "method": "mean"}
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_shared_core.SharedCoreQwen3MoeForCausalLM"
    weights = load_file(tmp_path / "c" / "model.safetensors")
    assert weights["model.layers.1.mlp.experts.down_u_out"].shape == (6, 32, 5)
    assert not any(k.endswith("gate_up_proj") for k in weights)
    assert not list(tmp_path.glob(".c.tmp-*"))


def test_sharded_save_loads_back(tmp_path):
    model = compress_model(tiny_model("mixtral"), RANKS)
    save_compressed(model, tmp_path / "c", max_shard_size="20KB")
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "c").glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "c")(ids).logits, model(ids).logits)


def test_one_index_reader_for_single_and_sharded_weights(tmp_path):
    model = compress_model(tiny_model("mixtral"), RANKS)
    save_compressed(model, tmp_path / "one")
    save_compressed(model, tmp_path / "sharded", max_shard_size="20KB")
    single, sharded = read_weight_map(tmp_path / "one"), read_weight_map(tmp_path / "sharded")
    assert set(single) == set(sharded) and set(single.values()) == {"model.safetensors"}
    key = "model.layers.1.mlp.experts.down_u_out"
    torch.testing.assert_close(read_tensors(tmp_path / "sharded", sharded, [key])[key],
                               model.get_parameter(key).detach())
    shard = sharded[key]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{shard}'\\]"):
        validate_compressed_checkpoint(tmp_path / "sharded")


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = compress_model(tiny_model("olmoe"), RANKS)
    save_compressed(model, tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_compressed(model, tmp_path / "c")
    save_compressed(model, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture
def saved(tmp_path):
    model = compress_model(tiny_model("qwen3_moe"), RANKS)
    save_compressed(model, tmp_path / "c")
    return tmp_path / "c"


def _edit_weights(path, fn):
    weights = load_file(path / "model.safetensors")
    fn(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda w: w.pop("model.layers.0.mlp.experts.up_v_in"), r"1 missing weights \(e.g. model.layers.0.mlp.experts.up_v_in"),
    (lambda w: w.update(extra=torch.zeros(2)), r"1 unexpected weights \(e.g. extra"),
    (lambda w: w.update({"model.layers.1.mlp.experts.gate_core": torch.zeros(24, 31)}),
     r"wrong shapes \(e.g. model.layers.1.mlp.experts.gate_core: expected \(24, 32\), found \(24, 31\)"),
])
def test_weights_that_do_not_match_the_config_are_named(saved, edit, match):
    _edit_weights(saved, edit)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(saved)


def test_ranks_in_config_disagreeing_with_weights(saved):
    _edit_config(saved, lambda c: c["shared_core"]["ranks"].update(down=6))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        validate_compressed_checkpoint(saved)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["shared_core"].update(format_version=99), "unknown shared_core format_version 99"),
    (lambda c: c.pop("shared_core"), "no shared_core section"),
    (lambda c: c["shared_core"].update(ranks={"gate": 1}), "must name"),
])
def test_bad_config_sections(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(saved)


def test_missing_config_or_weights(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        validate_compressed_checkpoint(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        validate_compressed_checkpoint(saved)


def test_trust_remote_code_rejects_unknown_format_version(saved):
    from transformers import AutoModelForCausalLM

    _edit_config(saved, lambda c: c["shared_core"].update(format_version=3))
    with pytest.raises(ValueError, match="unknown shared_core format_version 3"):
        AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)


@pytest.mark.slow
def test_stock_lm_eval_cli_evaluates_a_compressed_checkpoint(tmp_path, tiny_tokenizer, stdlib_text):
    """`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True` runs unchanged and agrees
    with our Python-API evaluation through moe-ds's own loader."""
    import os

    from moe_ds.eval_tasks import render_local_tasks
    from moe_ds.evaluate import perplexity

    model = compress_model(tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer)), RANKS)
    save_compressed(model, tmp_path / "c", tokenizer=tiny_tokenizer)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": stdlib_text[i * 400:(i + 1) * 400]}) + "\n" for i in range(3)))
    ours = perplexity(tmp_path / "c", docs)
    tasks = render_local_tasks(tmp_path / "tasks", text_file=docs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'c'},trust_remote_code=True", "--tasks", tasks["perplexity"],
                          "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
                          "--output_path", str(tmp_path / "cli")], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"][tasks["perplexity"]]
    assert cli["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-5)
    assert cli["word_perplexity,none"] > 1


def test_export_dense_copies_the_tokenizer_without_asking_to_trust_remote_code(tmp_path, tiny_tokenizer, monkeypatch):
    model = compress_model(tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer)), RANKS)
    save_compressed(model, tmp_path / "c", tokenizer=tiny_tokenizer)
    tok_cfg = tmp_path / "c" / "tokenizer_config.json"  # as many Hub tokenizers: the class comes from config.json
    tok_cfg.write_text(json.dumps({k: v for k, v in json.loads(tok_cfg.read_text()).items() if k != "tokenizer_class"}))

    def no_prompt(*args):
        raise AssertionError("export_dense asked a question")

    monkeypatch.setattr("builtins.input", no_prompt)
    export_dense(tmp_path / "c", tmp_path / "dense")
    assert (tmp_path / "dense" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()
    assert T.AutoTokenizer.from_pretrained(tmp_path / "dense").encode("def f(x):") == tiny_tokenizer.encode("def f(x):")

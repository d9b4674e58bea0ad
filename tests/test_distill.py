"""Stage 3 distillation: configs and DeepSpeed JSONs, parameter groups, bad input refused before the first step,
the KD loss on a real student, and the real 2-rank ZeRO-3 launcher run (two stages, checkpoints, fresh-process
reload, resume)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, launcher_env, tiny_model
from moe_ds import teacher_cache as tc
from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher
from moe_ds.checkpoint import CheckpointError, compress_model, load_compressed, save_compressed
from moe_ds.cli import ConfigError, run
from moe_ds.distill import (CONFIG_FILE, LOG_FILE, PROBE_ENV, DistillConfig, DistillConfigError, DistillDataset,
                            DistillTrainer, GroupConfig, StageConfig, apply_groups, check_deepspeed_config,
                            distill_loss, parse_group, prepare, resolve_groups, run_distill, training_arguments)
from moe_ds.run_layout import CHECKPOINT_COMPLETE

WRAPPERS = r"experts\.\w+_(u|v)_(in|out)$"
CORES = r"experts\.\w+_core$"
ROUTERS = r"mlp\.gate\.weight$"


def _with_peaked_head(model, tok):
    """Random tiny models have near-uniform logits (KL ~ 0); a scaled LM head gives a real KD signal."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.config.bos_token_id = None
    return model


def write_teacher_student_and_text(root: Path, tok, stdlib_text: str) -> Path:
    """``root/teacher`` (a tiny Qwen3-MoE with a peaked head), ``root/student`` (another one, compressed) and
    ``root/data.jsonl`` (standard-library text); returns the text's path."""
    teacher = _with_peaked_head(tiny_model("qwen3_moe", seed=0, vocab_size=len(tok)), tok)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = compress_model(_with_peaked_head(tiny_model("qwen3_moe", seed=1, vocab_size=len(tok)), tok),
                             {"gate": 2, "up": 2, "down": 2})
    save_compressed(student, root / "student", tokenizer=tok)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 60_000, 3000)))
    return data


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, stdlib_text):
    """A teacher, a cache written by stage 2 from it, and a compressed student (another random model)."""
    root = tmp_path_factory.mktemp("distill")
    data = write_teacher_student_and_text(root, tiny_tokenizer, stdlib_text)
    cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), data=str(data), output=str(root / "cache.h5"),
                                      top_k=8, seq_len=32, max_sequences=24))
    return root


def _cfg(root: Path, **kw) -> DistillConfig:
    base = {"student": str(root / "student"), "teacher_cache": str(root / "cache.h5"), "output": str(root / "out"),
            "max_steps": 4, "report_to": "none"}
    base.update(kw)
    return DistillConfig(**base)


def _launcher():
    """launch/distill.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_distill", REPO / "launch" / "distill.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return launch


EXAMPLE = REPO / "launch" / "distill_stages.example.json"


# ------------------------------------------------------------------------------------ configuration files

def test_every_deepspeed_json_is_valid():
    files = sorted((REPO / "ds_configs").glob("*.json"))
    assert {"zero3.json", "zero3_offload.json", "zero2.json"} <= {f.name for f in files}
    for f in files:
        cfg = check_deepspeed_config(f)
        assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    assert check_deepspeed_config(REPO / "ds_configs" / "zero2.json")["zero_optimization"]["stage"] == 2


def test_bad_deepspeed_json_is_refused(tmp_path):
    z3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cases = {"missing.json": None, "broken.json": "{not json", "list.json": "[]",
             "optim.json": json.dumps({**z3, "optimizer": {"type": "AdamW"}}),
             "nogather.json": json.dumps({**z3, "zero_optimization": {"stage": 3}}),
             "typo.json": json.dumps({**z3, "zero_optimization": {**z3["zero_optimization"], "overlap_com": True}})}
    messages = {"missing.json": "does not exist", "broken.json": "not valid JSON", "list.json": "JSON object",
                "optim.json": "defines a 'optimizer'", "nogather.json": "stage3_gather_16bit_weights_on_model_save",
                "typo.json": "rejected by DeepSpeed"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(DistillConfigError, match=messages[name]):
            check_deepspeed_config(tmp_path / name)


def test_config_checks_and_precedence(tmp_path):
    base = {"student": "s", "teacher_cache": "c.h5", "output": "o"}
    with pytest.raises(DistillConfigError, match=r"add up to 5 \(2 \+ 3\) but max_steps is 4"):
        DistillConfig(**base, max_steps=4, stages=[{"steps": 2}, {"steps": 3}])
    assert DistillConfig(**base, stages=[{"steps": 2}, {"steps": 3}]).stage_bounds() == [(0, 2), (2, 5)]
    with pytest.raises(DistillConfigError, match="give max_steps or a list of stages"):
        DistillConfig(**base)
    with pytest.raises(DistillConfigError, match="lr_mult must be"):
        GroupConfig("x", lr_mult=-1)
    with pytest.raises(DistillConfigError, match="not a regular expression"):
        GroupConfig("(")
    with pytest.raises(DistillConfigError, match="freezes every parameter"):
        StageConfig(steps=2, default_lr_mult=0, groups=[{"pattern": "a", "lr_mult": 0}])
    with pytest.raises(DistillConfigError, match="unknown stage setting"):
        DistillConfig(**base, stages=[{"steps": 2, "lr": 3}])
    with pytest.raises(DistillConfigError, match="alpha"):
        DistillConfig(**base, max_steps=2, alpha=1.5)
    for tail in ("drop", "tail"):  # "tail" is the old name of "bucket"
        with pytest.raises(DistillConfigError, match="kd_tail"):
            DistillConfig(**base, max_steps=2, kd_tail=tail)
    with pytest.raises(DistillConfigError, match="dataloader_num_workers"):
        DistillConfig(**base, max_steps=2, dataloader_num_workers=-1)
    # defaults < file < flags
    f = tmp_path / "c.yaml"
    f.write_text("alpha: 0.5\ntemperature: 2.0\nmax_steps: 7\n")
    args = ["--student", "s", "--teacher-cache", "c.h5", "--output", "o", "--config", str(f)]
    cfg = _launcher().config_from_args(args + ["--temperature", "3"])
    assert (cfg.alpha, cfg.temperature, cfg.max_steps, cfg.learning_rate) == (0.5, 3.0, 7, 1e-4)
    (tmp_path / "bad.json").write_text(json.dumps({"alpha": 0.5, "alhpa": 1}))
    with pytest.raises(ConfigError, match="unknown setting"):
        _launcher().config_from_args(args[:-1] + [str(tmp_path / "bad.json")])


def test_training_arguments_come_from_the_config_fields(tmp_path):
    from transformers import TrainingArguments

    cfg = DistillConfig(student="s", teacher_cache="c.h5", output=str(tmp_path / "o"), max_steps=3, batch_size=5,
                        lr_scheduler="linear", dataloader_num_workers=1, save_total_limit=2, deepspeed="none",
                        report_to="none")
    passed = cfg.training_arguments()
    assert passed["per_device_train_batch_size"] == 5 and passed["lr_scheduler_type"] == "linear"
    assert passed["dataloader_num_workers"] == 1 and passed["max_steps"] == 3 and passed["save_total_limit"] == 2
    assert len(passed) >= 14 and set(passed) <= set(TrainingArguments.__dataclass_fields__)
    args = training_arguments(cfg)
    assert (args.per_device_train_batch_size, args.dataloader_num_workers, args.max_steps, args.deepspeed) == \
        (5, 1, 3, None)
    assert issubclass(DistillTrainer, __import__("transformers").Trainer)


def test_example_stage_config_resolves_on_a_compressed_model():
    cfg = _launcher().config_from_args(["--student", "s", "--teacher-cache", "c.h5", "--output", "o",
                                        "--config", str(EXAMPLE)])
    model = compress_model(tiny_model("qwen3_moe"), {"gate": 2, "up": 2, "down": 2})
    names = [(n, p.numel()) for n, p in model.named_parameters()]
    first, second = (resolve_groups(names, s, cfg.learning_rate, cfg.weight_decay) for s in cfg.stages)
    layers = model.config.num_hidden_layers
    assert [len(g.names) for g in first] == [12 * layers, len(names) - 12 * layers]
    assert first[-1].frozen and not first[0].frozen
    assert [len(g.names) for g in second[:3]] == [12 * layers, 3 * layers, layers]
    assert second[1].lr == pytest.approx(0.5 * cfg.learning_rate)


def test_launch_flags_build_the_config(capsys):
    launch = _launcher()
    base = ["--student", "s", "--teacher-cache", "c.h5", "--output", "o", "--local_rank=1"]
    cfg = launch.config_from_args(base + ["--max-steps", "5", "--groups", f"{WRAPPERS}=2:0.1", f"{CORES}=0",
                                          "--default-lr-mult", "0.5", "--deepspeed", "none", "--alpha", "0.3"])
    assert cfg.deepspeed is None and cfg.alpha == 0.3 and cfg.max_steps == 5 and len(cfg.stages) == 1
    g = cfg.stages[0].groups
    assert (g[0].pattern, g[0].lr_mult, g[0].weight_decay, g[1].lr_mult) == (WRAPPERS, 2.0, 0.1, 0.0)
    assert cfg.stages[0].default_lr_mult == 0.5
    # the groups are folded into the stage: the resolved config rebuilds the same run
    assert cfg.groups == [] and cfg.default_lr_mult is None and DistillConfig(**cfg.to_dict()) == cfg
    cfg = launch.config_from_args(base + ["--config", str(EXAMPLE), "--learning-rate", "3e-5"])
    assert cfg.max_steps == 300 and cfg.learning_rate == 3e-5 and cfg.deepspeed.endswith("ds_configs/zero3.json")
    assert launch.config_from_args(base + ["--config", str(EXAMPLE), "--deepspeed", "none"]).deepspeed is None
    with pytest.raises(DistillConfigError, match="already has stages"):
        launch.config_from_args(base + ["--config", str(EXAMPLE), "--groups", "x=1"])
    with pytest.raises(DistillConfigError, match="need --max-steps"):
        launch.config_from_args(base + ["--groups", "x=1"])
    capsys.readouterr()
    assert run("distill", lambda: launch.main(base + ["--max-steps", "2", "--alpha", "2"]), launch.ERRORS) == 2
    assert capsys.readouterr().err == "distill: error: alpha must be in [0, 1], got 2.0\n"  # one line


def test_group_syntax():
    assert parse_group("a=b=0.5:0.1") == GroupConfig("a=b", 0.5, 0.1)  # the last "=" separates the multiplier
    assert parse_group(f"{CORES}=0") == GroupConfig(CORES, 0.0, None)
    for bad, match in (("x", "PATTERN=LR_MULT"), ("=1", "PATTERN=LR_MULT"), ("x=fast", "must be numbers"),
                       ("x=1:y", "must be numbers"), ("(=1", "not a regular expression"), ("x=-1", "lr_mult")):
        with pytest.raises(DistillConfigError, match=match):
            parse_group(bad)


def test_help_is_generated_from_the_config(capsys):
    with pytest.raises(SystemExit):
        _launcher().config_from_args(["--help"])
    out = capsys.readouterr().out
    assert "processes reading the HDF5 cache per rank" in out and "{bucket,renormalize}" in out
    assert "--groups" in out and "--no-shuffle" in out and "--stages" not in out


# ------------------------------------------------------------------------------------------ groups

def test_groups_first_match_wins_and_freeze_means_requires_grad_off():
    model = compress_model(tiny_model("qwen3_moe"), {"gate": 2, "up": 2, "down": 2})
    names = [(n, p.numel()) for n, p in model.named_parameters()]
    stage = StageConfig(steps=1, default_lr_mult=0.0, groups=[{"pattern": WRAPPERS, "lr_mult": 2.0},
                                                              {"pattern": r"experts\.", "lr_mult": 0.5,
                                                               "weight_decay": 0.1}])
    groups = resolve_groups(names, stage, 1e-4, 0.0)
    assert groups[0].lr == pytest.approx(2e-4) and all(n.endswith(("_in", "_out")) for n in groups[0].names)
    assert all(n.endswith("_core") for n in groups[1].names) and groups[1].weight_decay == 0.1
    assert groups[0].numel + groups[1].numel + groups[2].numel == sum(n for _, n in names)
    opt_groups = apply_groups(model, groups)
    assert [len(g["params"]) for g in opt_groups] == [len(groups[0].names), len(groups[1].names)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups[0].names) | set(groups[1].names)
    # A pattern shadowed by an earlier one, and one that matches nothing at all.
    shadowed = StageConfig(steps=1, groups=[{"pattern": r"experts\."}, {"pattern": CORES}])
    with pytest.raises(DistillConfigError, match=r"matches nothing: its parameters are all taken by earlier"):
        resolve_groups(names, shadowed, 1e-4, 0.0)
    with pytest.raises(DistillConfigError, match=r"'no_such_param' matches nothing"):
        resolve_groups(names, StageConfig(steps=1, groups=[{"pattern": "no_such_param"}]), 1e-4, 0.0)


def test_data_order_is_a_function_of_the_sample_index(setup):
    cache = tc.TeacherCacheDataset(setup / "cache.h5")
    run = DistillDataset(cache, 60, seed=3, shuffle=True)
    order = [run.index(i) for i in range(60)]
    assert sorted(order[:24]) == list(range(24)) and order[:24] != list(range(24))  # pass 1: a permutation
    assert order[24:48] != order[:24] and sorted(order[24:48]) == list(range(24))  # pass 2: another one
    stage2 = DistillDataset(cache, 20, seed=3, shuffle=True, offset=40)
    assert torch.equal(stage2[0]["input_ids"], run[40]["input_ids"]) and len(stage2) == 20
    assert [DistillDataset(cache, 5, 3, False).index(i) for i in range(5)] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ refused before step 1

def test_prepare_accepts_good_input_and_refuses_bad(setup, tmp_path):
    prep = prepare(_cfg(setup))
    assert prep.start_step == 0 and prep.resume_from is None and len(prep.cache) == 24
    plain = prepare(_cfg(setup, student=str(setup / "teacher")))  # any HF causal LM is a valid student too
    assert plain.groups[0][0].numel == sum(p.numel() for p in tiny_model("qwen3_moe").parameters())

    # a cache written with another tokenizer
    other = tmp_path / "other_tok"
    shutil.copytree(setup / "student", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(tc.TokenizerMismatchError, match="maps tokens to ids differently"):
        prepare(_cfg(setup, tokenizer=str(other)))

    # an incomplete cache (a shard not marked complete)
    broken = tmp_path / "cache"
    shutil.copytree(setup / "cache.shards", broken.with_suffix(".shards"))
    shutil.copy(setup / "cache.h5", broken.with_suffix(".h5"))
    import h5py

    with h5py.File(next(broken.with_suffix(".shards").glob("*.h5")), "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(tc.CacheFormatError, match="incomplete"):
        prepare(_cfg(setup, teacher_cache=str(broken.with_suffix(".h5"))))
    with pytest.raises(tc.CacheFormatError, match="no such cache file"):
        prepare(_cfg(setup, teacher_cache=str(tmp_path / "none.h5")))

    # a student directory that is not a model
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json: not a model directory"):
        prepare(_cfg(setup, student=str(tmp_path / "empty")))
    # wandb asked for but not installed (the Trainer would fail only after loading the model; seen on a GPU node)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
        with pytest.raises(DistillConfigError, match="wandb is not installed.*--report-to none"):
            prepare(_cfg(setup, report_to="wandb"))
    # a malformed DeepSpeed config
    (tmp_path / "ds.json").write_text("{")
    with pytest.raises(DistillConfigError, match="not valid JSON"):
        prepare(_cfg(setup, deepspeed=str(tmp_path / "ds.json")))
    # a regex that matches nothing, in a later stage
    stages = [{"steps": 2}, {"steps": 2, "groups": [{"pattern": r"experts\.gate_kernel"}]}]
    with pytest.raises(DistillConfigError, match=r"gate_kernel' matches nothing"):
        prepare(_cfg(setup, max_steps=None, stages=stages))
    # an output that already holds a run, without --resume
    done = Path(_cfg(setup).output) / "checkpoint-2"
    done.mkdir(parents=True)
    (done / CHECKPOINT_COMPLETE).write_text("{}")
    with pytest.raises(DistillConfigError, match="pass --resume"):
        prepare(_cfg(setup))
    # step 2 of 4 is mid-stage: a resume needs the optimizer state, which only the newest checkpoints keep
    with pytest.raises(DistillConfigError, match="no optimizer/DeepSpeed state to resume from mid-stage"):
        prepare(_cfg(setup, resume=True))
    (done / "optimizer.pt").write_bytes(b"")
    assert prepare(_cfg(setup, resume=True)).start_step == 2
    # at a stage boundary a new stage starts from the weights alone
    (done / "optimizer.pt").unlink()
    assert prepare(_cfg(setup, resume=True, max_steps=None, stages=[{"steps": 2}, {"steps": 2}])).start_step == 2
    (done.parent / CONFIG_FILE).write_text(json.dumps(_cfg(setup, batch_size=3).to_dict()))
    with pytest.raises(DistillConfigError, match="started with other batch_size"):
        prepare(_cfg(setup, resume=True))
    shutil.rmtree(done.parent)


@pytest.fixture(scope="module")
def broken(setup, tmp_path_factory) -> Path:
    """Bad inputs beside the good ones: damaged students and caches, a file, a student with a short context."""
    root = tmp_path_factory.mktemp("broken")
    weights = (setup / "student" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("corrupted", b"\xff" * 8 + weights[8:])):
        shutil.copytree(setup / "student", root / name)
        (root / name / "model.safetensors").write_bytes(data)
    shutil.copytree(setup / "teacher", root / "plain_truncated")  # a plain HF student is read by transformers
    plain = (root / "plain_truncated" / "model.safetensors").read_bytes()
    (root / "plain_truncated" / "model.safetensors").write_bytes(plain[: len(plain) // 2])
    shutil.copytree(setup / "student", root / "short")  # positions 0..15 only; the cache holds 32-token sequences
    config = json.loads((root / "short" / "config.json").read_text())
    (root / "short" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    index, shard = (setup / "cache.h5").read_bytes(), next((setup / "cache.shards").glob("*.h5")).read_bytes()
    for name, index_data, shard_data in (("cut_index", index[: len(index) // 2], shard),
                                         ("cut_shard", index, shard[: len(shard) // 2]),
                                         ("garbage", b"not hdf5" * 100, shard)):
        (root / f"{name}.shards").mkdir()
        (root / f"{name}.h5").write_bytes(index_data)
        (root / f"{name}.shards" / next((setup / "cache.shards").glob("*.h5")).name).write_bytes(shard_data)
    return root


# flag -> (value, the one-line message after "distill: error: "); {b}: the broken-inputs folder, {r}: setup's;
# {i}, {s}: the cache index's and shard's sizes in bytes ({i2}, {s2}: the halves kept by the truncated copies)
SHARD = "rank-00000-of-00001.h5"
BAD_INPUTS = {
    "missing student": ("--student", "{b}/nope", "student {b}/nope is not a directory"),
    "empty student folder": ("--student", "{b}/empty", "student {b}/empty has no config.json: not a model directory"),
    "truncated student": ("--student", "{b}/truncated", "{b}/truncated/model.safetensors is not a readable "
                          "safetensors file (Error while deserializing header: incomplete metadata, file not fully "
                          "covered); it may be truncated or corrupted: re-download or re-save it"),
    "corrupted student": ("--student", "{b}/corrupted", "{b}/corrupted/model.safetensors is not a readable safetensors "
                          "file (Error while deserializing header: header too large); it may be truncated or "
                          "corrupted: re-download or re-save it"),
    "truncated plain HF student": ("--student", "{b}/plain_truncated", "{b}/plain_truncated/model.safetensors is not a "
                                   "readable safetensors file (Error while deserializing header: incomplete metadata, "
                                   "file not fully covered); it may be truncated or corrupted: re-download or re-save "
                                   "it"),
    "sequences beyond the student's positions": (
        "--student", "{b}/short", "teacher cache {r}/cache.h5 holds sequences of 32 tokens, beyond the student's "
        "max_position_embeddings 16 ({b}/short/config.json): positions past 16 were never trained; rebuild the cache "
        "with --seq-len 16 or less"),
    "missing cache": ("--teacher-cache", "{b}/none.h5", "{b}/none.h5: no such cache file"),
    "cache is a folder": ("--teacher-cache", "{b}/empty", "teacher cache {b}/empty is a folder; give the .h5 file "
                          "that stage 2 wrote"),
    "truncated cache index": ("--teacher-cache", "{b}/cut_index.h5", "{b}/cut_index.h5: cannot open as HDF5 "
                              "(truncated or corrupted file): Unable to synchronously open file (truncated file: "
                              "eof = {i2}, sblock->base_addr = 0, stored_eof = {i})"),
    "truncated cache shard": ("--teacher-cache", "{b}/cut_shard.h5", "{b}/cut_shard.shards/" + SHARD + ": cannot open "
                              "as HDF5 (truncated or corrupted file): Unable to synchronously open file (truncated "
                              "file: eof = {s2}, sblock->base_addr = 0, stored_eof = {s})"),
    "corrupted cache": ("--teacher-cache", "{b}/garbage.h5", "{b}/garbage.h5: cannot open as HDF5 (truncated or "
                        "corrupted file): Unable to synchronously open file (file signature not found)"),
    "output is a file": ("--output", "{b}/a_file", "output {b}/a_file is a file, not a folder"),
    "output below a file": ("--output", "{b}/a_file/run", "cannot create output folder {b}/a_file/run: {b}/a_file is a "
                            "file"),
    "bad alpha": ("--alpha", "2", "alpha must be in [0, 1], got 2.0"),
}


def _main_stderr(capfd, argv: list[str]) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``launch/distill.py ARGV`` run in this process through ``moe_ds.cli.run``."""
    launch = _launcher()
    capfd.readouterr()
    code = run("distill", lambda: launch.main(argv), launch.ERRORS)
    return code, capfd.readouterr().err.splitlines()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, setup, broken, tmp_path, capfd):
    flag, value, message = BAD_INPUTS[case]
    index, shard = (setup / "cache.h5").stat().st_size, (setup / "cache.shards" / SHARD).stat().st_size
    names = {"b": broken, "r": setup, "i": index, "i2": index // 2, "s": shard, "s2": shard // 2}
    args = {"--student": str(setup / "student"), "--teacher-cache": str(setup / "cache.h5"),
            "--output": str(tmp_path / "out"), flag: value.format(**names)}
    argv = [a for kv in args.items() for a in kv] + ["--deepspeed", "none", "--max-steps", "2", "--report-to", "none"]
    code, err = _main_stderr(capfd, argv)
    assert (code, err) == (2, [f"distill: error: {message.format(**names)}"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_refusal_is_the_only_line_a_real_process_prints(setup, broken, tmp_path):
    """In a fresh process too: nothing (e.g. a transformers warning about the student's model type) precedes it."""
    p = subprocess.run([sys.executable, "launch/distill.py", "--student", str(broken / "short"), "--teacher-cache",
                        str(setup / "cache.h5"), "--output", str(tmp_path / "out"), "--deepspeed", "none",
                        "--max-steps", "2"], cwd=REPO, env=launcher_env(WANDB_MODE="disabled"), capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.splitlines() == [f"distill: error: teacher cache {setup}/cache.h5 holds "
                                                           "sequences of 32 tokens, beyond the student's "
                                                           f"max_position_embeddings 16 ({broken}/short/config.json): "
                                                           "positions past 16 were never trained; rebuild the cache "
                                                           "with --seq-len 16 or less"], p.stderr
    assert not (tmp_path / "out").exists()


def test_read_only_output_is_one_line(setup, tmp_path, capfd):
    # Root writes into a chmod 500 folder; sysfs refuses new files even to root.
    read_only = Path("/sys") if os.geteuid() == 0 else tmp_path / "ro"
    if read_only != Path("/sys"):
        read_only.mkdir()
        read_only.chmod(0o500)
    out = read_only / "out"
    code, err = _main_stderr(capfd, ["--student", str(setup / "student"), "--teacher-cache", str(setup / "cache.h5"),
                                     "--output", str(out), "--deepspeed", "none", "--max-steps", "2"])
    read_only.chmod(0o700) if read_only != Path("/sys") else None
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"distill: error: cannot write output folder {out}: Permission denied"), err


def test_kd_loss_falls_when_the_student_overfits_a_fixed_batch(setup):
    cfg = _cfg(setup, alpha=0.9, temperature=1.0)
    model = load_compressed(setup / "student").train()
    cache = tc.TeacherCacheDataset(setup / "cache.h5")
    batch = {k: torch.stack([cache[i][k] for i in range(2)]) for k in cache[0]}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        r, _ = distill_loss(model, batch, cfg)
        first = first or (float(r.loss.detach()), float(r.kl), float(r.ce))
        opt.zero_grad()
        r.loss.backward()
        opt.step()
    r, _ = distill_loss(model, batch, cfg)
    assert first[1] > 1.0  # a real gap to close
    assert float(r.kl) < 0.5 * first[1] and float(r.loss.detach()) < 0.5 * first[0] and float(r.ce) < first[2]


def test_two_dataloader_workers_give_the_same_loss_curve_as_none(setup, tmp_path):
    """Workers open the cache themselves; the batches, and so every logged number and the weights, are the same."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        cfg = _cfg(setup, output=str(out), deepspeed="none", max_steps=None, batch_size=2, save_steps=2,
                   logging_steps=1, learning_rate=1e-3, dataloader_num_workers=workers,
                   stages=[{"steps": 2, "default_lr_mult": 0.0, "groups": [{"pattern": WRAPPERS}]}, {"steps": 2}])
        assert run_distill(cfg) == out / "checkpoint-4"
        rows = _rows(out / LOG_FILE)
        runs[workers] = ({s: {k: r[k] for k in ("loss", "ce", "kl", "lr", "grad_norm")} for s, r in rows.items()},
                         load_file(out / "checkpoint-4" / "model.safetensors"))
        # only the newest checkpoint keeps the state a resume needs (keep_training_state=1); every one keeps weights
        assert sorted(p.name for p in (out / "checkpoint-2").iterdir() if "optimizer" in p.name or "rng" in p.name
                      or "scheduler" in p.name) == []
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in (out / "checkpoint-4").iterdir()}
        assert (out / "checkpoint-2" / "model.safetensors").is_file()
    (curve0, weights0), (curve2, weights2) = runs[0], runs[2]
    assert sorted(curve0) == [1, 2, 3, 4] and curve2 == curve0
    assert weights2.keys() == weights0.keys() and all(torch.equal(weights2[k], weights0[k]) for k in weights0)


# --------------------------------------------------------------------------- the real 2-rank launcher

def _launch(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    stages = root / "stages.json"
    stages.write_text(json.dumps({"stages": [
        {"name": "wrappers", "steps": 3, "default_lr_mult": 0.0, "groups": [{"pattern": WRAPPERS}]},
        {"name": "all", "steps": 3, "groups": [{"pattern": CORES, "lr_mult": 0.5}]}]}))
    from moe_ds.dist import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"),
           "--include", "localhost:0,1", "--master_port", str(free_port()), "launch/distill.py",
           "--deepspeed", "ds_configs/zero3.json", "--student", str(root / "student"),
           "--teacher-cache", str(root / "cache.h5"), "--output", str(out), "--config", str(stages),
           "--save-steps", "2", "--logging-steps", "1", "--batch-size", "2", "--learning-rate", "1e-3",
           "--report-to", "none", *extra]
    env = launcher_env(**{PROBE_ENV: "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)


_FRESH = """
import sys, torch, transformers as T
from moe_ds.checkpoint import load_compressed
ckpt, ids = sys.argv[1], torch.load(sys.argv[2])
with torch.no_grad():
    a = load_compressed(ckpt)(input_ids=ids).logits
    b = T.AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()(input_ids=ids).logits
torch.save({"ours": a, "remote": b}, sys.argv[3])
"""


def _rows(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_two_rank_zero3_two_stages_checkpoints_reload_and_resume(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(torch.randint(0, 320, (2, 16)), out / "probe_input.pt")
    p = _launch(setup, out, "--keep-training-state", "2")  # checkpoint-4 must keep its state: resumed below
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    logs = p.stdout + p.stderr
    assert "experts\\.\\w+_(u|v)_(in|out)$" in logs and "frozen" in logs  # resolved groups logged

    # checkpoints every 2 steps and at the stage end (3), each complete and in the compressed format
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    for c in ckpts:
        names = {f.name for f in c.iterdir()}
        assert {CHECKPOINT_COMPLETE, "model.safetensors", "config.json", "modeling_shared_core.py", "shared_core.py",
                "arch.py", "compression_statistics.yaml", "tokenizer.json", "trainer_state.json"} <= names
        # DeepSpeed's state for --resume only in the newest two; the older ones keep what the evaluator reads
        state = {n for n in names if n.startswith(("global_step", "rng_state", "zero_to_")) or n in {"latest",
                                                                                                 "scheduler.pt"}}
        if c.name in ("checkpoint-4", "checkpoint-6"):
            # (DeepSpeed names the folder by its engine's step count, which restarts with each stage's engine)
            assert {"latest", "scheduler.pt"} <= state and any(n.startswith("global_step") for n in state)
        else:
            assert state == set(), (c.name, state)
        assert json.loads((c / CHECKPOINT_COMPLETE).read_text())["step"] == int(c.name.split("-")[1])

    # stage 1 trained the wrappers only; stage 2 everything
    s0 = load_file(setup / "student" / "model.safetensors")
    s3 = load_file(out / "checkpoint-3" / "model.safetensors")
    s6 = load_file(out / "checkpoint-6" / "model.safetensors")
    core, wrap, router = ("model.layers.0.mlp.experts.gate_core", "model.layers.0.mlp.experts.up_u_in",
                          "model.layers.1.mlp.gate.weight")
    assert torch.equal(s3[core], s0[core]) and torch.equal(s3[router], s0[router])
    assert torch.equal(s3["model.embed_tokens.weight"], s0["model.embed_tokens.weight"])
    assert not torch.equal(s3[wrap], s0[wrap])
    assert not torch.equal(s6[core], s3[core]) and not torch.equal(s6[router], s3[router])

    # JSONL log: every step, CE and KL separately, lr, throughput; the resolved config beside it
    rows = _rows(out / LOG_FILE)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and [rows[s]["stage"] for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    for r in rows.values():
        assert r["kl"] > 0.5 and r["ce"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + 0.9 * r["kl"], rel=1e-3)
    # each stage has its own warmup + cosine schedule: stage 1 decays, stage 2 restarts at the base rate
    assert rows[1]["lr"] == pytest.approx(1e-3) and rows[3]["lr"] == pytest.approx(2.5e-4)
    assert rows[4]["lr"] == pytest.approx(1e-3) and rows[6]["lr"] < rows[5]["lr"] < rows[4]["lr"]
    assert rows[4]["ce"] != rows[1]["ce"]  # stage 2 reads new batches, not the first ones again
    assert json.loads((out / CONFIG_FILE).read_text())["stages"][0]["name"] == "wrappers"

    # a fresh process loads the checkpoint (our loader and trust_remote_code): logits equal the in-training model's
    res = tmp_path / "fresh.pt"
    q = subprocess.run([sys.executable, "-c", _FRESH, str(out / "checkpoint-6"), str(out / "probe_input.pt"), str(res)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert q.returncode == 0, q.stderr[-3000:]
    fresh, trained = torch.load(res), torch.load(out / "probe-6.pt")
    torch.testing.assert_close(fresh["ours"], trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh["remote"], trained, atol=1e-5, rtol=1e-5)

    # Resume: a copy of the run stopped after checkpoint-4 (mid stage 2), with a half-written checkpoint-5
    # (no marker) and log lines past step 4 left behind, continues to the same curve and the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("checkpoint-6", "probe-*"))
    (resumed / "checkpoint-5").mkdir()
    (resumed / "checkpoint-5" / "model.safetensors").write_bytes(b"partial")
    p2 = _launch(setup, resumed, "--resume")
    assert p2.returncode == 0, p2.stdout[-4000:] + p2.stderr[-4000:]
    rows2 = _rows(resumed / LOG_FILE)
    assert sorted(rows2) == [1, 2, 3, 4, 5, 6]
    for s in (5, 6):
        for key in ("loss", "ce", "kl", "lr"):
            assert rows2[s][key] == pytest.approx(rows[s][key], rel=1e-6, abs=1e-7), (s, key)
    assert not (resumed / "checkpoint-5").exists()
    r6 = load_file(resumed / "checkpoint-6" / "model.safetensors")
    for k in s6:
        torch.testing.assert_close(r6[k], s6[k], atol=1e-6, rtol=1e-6)

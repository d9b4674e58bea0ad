"""The toy-teacher builder: corpus split, a tiny training run, the saved teacher and its cache."""

import json
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import transformers as T
from conftest import REPO, load_launcher, tiny_model

from moe_ds.toy_teacher import (HELDOUT_FILE, PRESET_OUTPUTS, PRESETS, RECORD, TRAIN_FILE, BuildTeacherConfig,
                                TeacherConfig, ToyTeacherError, build_teacher, cache_key, control_config,
                                load_documents, mean_experts, split_documents, stdlib_dir, stdlib_files)

TINY = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
        "num_experts": 4, "top_k": 2, "moe_intermediate_size": 32, "seq_len": 32, "batch_size": 8, "steps": 25,
        "lr": 1e-2, "heldout_chars": 6_000}


@pytest.fixture(scope="module")
def small_stdlib(tmp_path_factory):
    """A stand-in stdlib folder: the 40 smallest top-level modules plus one package and one test folder."""
    src, root = stdlib_dir(), tmp_path_factory.mktemp("stdlib")
    for path in sorted(src.glob("*.py"), key=lambda p: (p.stat().st_size, p.name))[:40]:
        shutil.copy(path, root / path.name)
    shutil.copytree(src / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("assert True\n")
    return root


def test_split_is_deterministic_disjoint_and_by_unit():
    docs = load_documents()
    assert not any(d.source.split("/")[0] in ("test", "site-packages") for d in docs)
    train, held = split_documents(docs, 400_000)
    train2, held2 = split_documents(load_documents(), 400_000)
    assert [d.source for d in held] == [d.source for d in held2] and len(train) == len(train2)
    assert not {d.unit for d in train} & {d.unit for d in held}  # a package never straddles the split
    assert not {d.source for d in train} & {d.source for d in held}
    assert len(train) + len(held) == len(docs)
    assert sum(len(d.text) for d in held) >= 400_000
    assert any(d.source.startswith("pydoc_data/topics:") for d in train)
    assert sorted(split_documents(docs, 100_000)[1], key=lambda d: d.source) != sorted(held, key=lambda d: d.source)


def test_config_checks():
    with pytest.raises(ValueError, match="exactly one"):
        TeacherConfig(steps=None)
    with pytest.raises(ValueError, match="top_k"):
        TeacherConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TeacherConfig(num_heads=6, num_kv_heads=4)
    assert TeacherConfig(steps=None, minutes=1.0).minutes == 1.0


def test_tiny_build_trains_saves_and_caches(tmp_path, small_stdlib):
    out = tmp_path / "toy" / "teacher"
    cfg = TeacherConfig(**TINY)
    rec = build_teacher(cfg, out, stdlib_root=small_stdlib)
    assert not rec["cached"] and rec["steps"] == TINY["steps"]
    assert rec["loss_last"] < rec["loss_first"] - 0.5
    assert rec["heldout_ppl"] < rec["heldout_ppl_before"]
    assert json.loads((out / RECORD).read_text())["heldout_ppl"] == rec["heldout_ppl"]
    assert rec["corpus"]["stdlib_files"] == len(stdlib_files(small_stdlib))
    assert "test/test_x.py" not in stdlib_files(small_stdlib)

    # corpus files the later stages read: JSONL with a text field, beside the teacher
    data = tmp_path / "toy" / "data"
    train = [json.loads(line) for line in (data / TRAIN_FILE).read_text().splitlines()]
    held = [json.loads(line) for line in (data / HELDOUT_FILE).read_text().splitlines()]
    assert train and held and all(isinstance(r["text"], str) and r["text"] for r in train + held)
    assert not {r["source"] for r in train} & {r["source"] for r in held}

    # the folder loads like any Hub model
    model = T.AutoModelForCausalLM.from_pretrained(out)
    tok = T.AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and tok.eos_token_id is not None
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id

    # same config: reused without training; a changed config rebuilds
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = build_teacher(TeacherConfig(**TINY), out, stdlib_root=small_stdlib)
    assert again["cached"] and again["heldout_ppl"] == rec["heldout_ppl"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    changed = build_teacher(TeacherConfig(**{**TINY, "steps": 5}), out, stdlib_root=small_stdlib)
    assert not changed["cached"] and changed["steps"] == 5 and changed["cache_key"] != rec["cache_key"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["data", "teacher"]  # no temporary or old folder left

    # a forced rebuild with the same config and seed is the same teacher, on the same corpus files
    held_bytes = (data / HELDOUT_FILE).read_bytes()
    forced = build_teacher(TeacherConfig(**{**TINY, "steps": 5}), out, force=True, stdlib_root=small_stdlib)
    assert not forced["cached"] and forced["heldout_ppl"] == changed["heldout_ppl"]
    assert (data / HELDOUT_FILE).read_bytes() == held_bytes


# ------------------------------------------------------------------ presets, the control run and mean experts (#16)

def test_default_cache_key_is_pinned(monkeypatch):
    """The demo's teacher and every test fixture built from TeacherConfig() are found by this key: a new field or
    default that changes it would silently rebuild them all."""
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.7")
    files = ["json/__init__.py", "os.py"]
    assert cache_key(TeacherConfig(), files) == "5abd1cb49158120e7219d8ff01a9a5d52aeeeb52d549e4e48bda6196e509062c"
    assert cache_key(TeacherConfig.preset("demo"), files) == cache_key(TeacherConfig(), files)


def test_strong_preset_is_its_own_teacher_in_its_own_folder():
    strong, files = TeacherConfig.preset("strong"), ["os.py"]
    assert asdict(strong) != asdict(TeacherConfig()) and strong.steps > TeacherConfig().steps
    assert cache_key(strong, files) != cache_key(TeacherConfig(), files)
    assert {k for k, v in asdict(strong).items() if v != asdict(TeacherConfig())[k]} == set(PRESETS["strong"])
    build = BuildTeacherConfig.preset("strong")
    assert build.output == PRESET_OUTPUTS["strong"] != BuildTeacherConfig().output  # never over the demo's teacher
    assert asdict(build.teacher_config()) == asdict(strong)
    timed = BuildTeacherConfig.preset("strong", minutes=2.0, output="x/teacher")  # minutes replace the steps
    assert timed.steps is None and timed.minutes == 2.0 and timed.output == "x/teacher"
    assert TeacherConfig.preset("strong", seed=3).seed == 3
    with pytest.raises(ToyTeacherError, match="unknown teacher preset 'huge'"):
        TeacherConfig.preset("huge")


def test_builder_command_line_applies_the_preset_under_the_flags(monkeypatch, capsys):
    launch = load_launcher("build_toy_teacher")
    built = []

    def fake_build(cfg, output, force=False):
        built.append((cfg, output))
        return {"cached": True, "heldout_ppl": 1.0, "heldout_ppl_before": 2.0, "params": {"total": 1}, "steps": 1,
                "seconds": 0}

    monkeypatch.setattr(launch, "build_teacher", fake_build)
    launch.main(["--preset", "strong", "--seed", "5"])
    launch.main([])
    (strong, out_strong), (demo, out_demo) = built
    assert asdict(strong) == asdict(TeacherConfig.preset("strong", seed=5)) and out_strong == PRESET_OUTPUTS["strong"]
    assert asdict(demo) == asdict(TeacherConfig()) and out_demo == "runs/toy/teacher"


def test_control_config_is_the_demo_distillation_budget():
    cfg = TeacherConfig.preset("strong")
    ctrl = control_config(cfg)
    assert (ctrl.steps, ctrl.batch_size, ctrl.lr, ctrl.final_lr_frac, ctrl.weight_decay) == (300, 8, 1e-4, 0.0, 0.0)
    assert ctrl.steps * ctrl.batch_size * ctrl.seq_len == 300 * 2 * 4 * 256  # the demo's 2 ranks x 4 sequences
    assert (ctrl.hidden_size, ctrl.num_experts, ctrl.seq_len, ctrl.seed) == (cfg.hidden_size, cfg.num_experts,
                                                                              cfg.seq_len, cfg.seed + 1)
    assert control_config(TeacherConfig(steps=None, minutes=1.0)).minutes is None  # a step budget, not a time one


def test_mean_experts_makes_every_expert_the_mean(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert mean_experts(model) is model
    changed = set()
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            old = before[name]
            assert not torch.allclose(old[0], old[1])  # the test would pass trivially on equal experts
            torch.testing.assert_close(p, old.mean(0, keepdim=True).expand_as(old), rtol=0, atol=1e-6)
            changed.add(name)
        else:
            assert torch.equal(p, before[name]), name  # router, shared experts, attention untouched
    assert changed and len(changed) % 2 == 0
    x = torch.randint(0, 50, (2, 8))
    assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.slow
def test_testbed_benchmark_measures_and_judges_the_criteria(tmp_path, small_stdlib):
    """bench/testbed.py on a tiny built teacher (1 rank, weight-objective lowrank only, a 3-step control): every
    criterion is measured, judged against its threshold, and a failed one makes the exit status 1."""
    out = tmp_path / "toy" / "teacher"
    build_teacher(TeacherConfig(**{**TINY, "steps": 5}), out, stdlib_root=small_stdlib)
    result = tmp_path / "testbed.json"
    args = ["--teacher", str(out), "--methods", "lowrank", "--no-activation", "--control-steps", "3",
            "--control-batch", "2", "--nproc", "1", "--json", str(result), "--workdir", str(tmp_path / "work")]
    run = subprocess.run([sys.executable, str(REPO / "bench" / "testbed.py"), *args], check=False, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    r = json.loads(result.read_text())
    assert run.returncode == (0 if all(r["verdicts"].values()) else 1), run.stdout[-2000:] + run.stderr[-2000:]
    assert "# date: " in run.stdout and set(r["verdicts"]) == {"(i) mean experts", "(ii) best zero-shot",
                                                                 "(iii) control"}
    # the verdicts are the thresholds applied to the measured perplexities
    assert r["verdicts"]["(i) mean experts"] == (r["mean_ppl"] >= 5 * r["teacher_ppl"])
    assert r["verdicts"]["(ii) best zero-shot"] == (r["zero_shot"]["lowrank (weight)"] >= 1.05 * r["teacher_ppl"])
    assert r["verdicts"]["(iii) control"] == (r["control_ppl"] > 0.99 * r["teacher_ppl"])
    assert r["mean_ppl"] != r["teacher_ppl"] and r["control_ppl"] != r["teacher_ppl"]  # both changed the model
    assert (tmp_path / "work" / "r0.25_lowrank_weight" / "compression_statistics.yaml").is_file()
    assert run.stdout.count("PASS") + run.stdout.count("FAIL") == 3

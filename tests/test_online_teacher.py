"""Live-teacher and feature distillation (issue #15): the loss terms, the teacher's isolation, bad input, cached
features, and a 2-rank ZeRO-3 run through the launcher with the teacher partitioned."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, launcher_env, tiny_model
from moe_ds import teacher_cache as tc
from moe_ds.cache_teacher import CacheTeacherConfig, CacheTeacherError, cache_teacher
from moe_ds.checkpoint import load_compressed
from moe_ds.distill import DistillConfig, DistillConfigError, distill_loss, prepare, run_distill
from moe_ds.features import FeatureConfigError, FeatureHooks, feature_loss
from moe_ds.online_teacher import OnlineTeacher, OnlineTeacherError, load_replicated
from moe_ds.teacher_cache import TokenizerMismatchError
from test_distill import write_teacher_student_and_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, stdlib_text):
    """A teacher, a compressed student, training text, and a cache of the teacher at k = V with the features of
    layers 0 and 1."""
    root = tmp_path_factory.mktemp("online")
    data = write_teacher_student_and_text(root, tiny_tokenizer, stdlib_text)
    cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), data=str(data), output=str(root / "cache.h5"),
                                     top_k=len(tiny_tokenizer), seq_len=32, max_sequences=8, cache_features="0,1"))
    return root


def _cfg(root: Path, **kw) -> DistillConfig:
    base = {"student": str(root / "student"), "teacher": str(root / "teacher"), "data": str(root / "data.jsonl"),
            "output": str(root / "out"), "max_steps": 2, "report_to": "none", "deepspeed": None, "seq_len": 32,
            "max_sequences": 8, "dataloader_num_workers": 0}
    base.update(kw)
    return DistillConfig(**base)


def test_feature_loss_is_zero_for_the_teacher_itself_and_its_gradient_reaches_only_the_student(setup):
    teacher, _ = load_replicated(setup / "teacher", torch.float32, torch.device("cpu"))
    student, _ = load_replicated(setup / "teacher", torch.float32, torch.device("cpu"))
    student.requires_grad_(True).train()
    ids = torch.randint(0, 320, (2, 16))
    live = OnlineTeacher(teacher, top_k=None, feature_layers=[0, 1])
    hooks = FeatureHooks(student, [0, 1])
    for kind in ("mse", "cosine"):
        student(input_ids=ids)
        total, per_layer = feature_loss(hooks.take(), live(ids)["teacher_features"], kind)
        assert float(total) == pytest.approx(0.0, abs=1e-6) and len(per_layer) == 2

    with torch.no_grad():  # a different student: a positive loss whose gradient reaches it, never the teacher
        student.model.layers[0].mlp.gate.weight.add_(torch.randn_like(student.model.layers[0].mlp.gate.weight))
    cfg = _cfg(setup, feature_layers="0,1", feature_weight=1.0, alpha=0.5)
    r, _ = distill_loss(student, {"input_ids": ids}, cfg, live, hooks)
    assert float(r.feature) > 1e-4 and float(r.loss) == pytest.approx(
        0.5 * float(r.ce) + 0.5 * float(r.kl) + float(r.feature), rel=1e-5)
    r.loss.backward()
    assert student.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    hooks.remove()
    live.close()


def test_live_teacher_kl_equals_the_cached_kl_at_k_equal_v(setup):
    """The same batch, scored against the cache (k = V, float16 logits) and against the live teacher's full
    logits and its top-V: one loss code, equal numbers."""
    cache = tc.TeacherCacheDataset(setup / "cache.h5")
    cache.select_features([0, 1])
    batch = {k: torch.stack([cache[i][k] for i in range(2)]) for k in cache[0]}
    student = load_compressed(setup / "student")
    teacher, _ = load_replicated(setup / "teacher", torch.float32, torch.device("cpu"))
    cfg = _cfg(setup, feature_layers="0,1", temperature=2.0)
    hooks = FeatureHooks(student, [0, 1])
    cached, _ = distill_loss(student, batch, cfg, None, hooks)
    for top_k in (None, 320):
        live = OnlineTeacher(teacher, top_k=top_k, feature_layers=[0, 1])
        online, _ = distill_loss(student, {"input_ids": batch["input_ids"]}, cfg, live, hooks)
        assert float(online.kl) > 0.5  # a real KL to compare
        assert float(online.kl) == pytest.approx(float(cached.kl), rel=2e-3)
        assert float(online.ce) == pytest.approx(float(cached.ce), rel=1e-6)
        # the cached features are the teacher's in float16
        assert float(online.feature) == pytest.approx(float(cached.feature), rel=2e-3)
        live.close()
    hooks.remove()


def test_the_teacher_never_changes_and_never_enters_the_optimizer(setup, tmp_path, monkeypatch):
    import moe_ds.distill as distill_module
    from moe_ds.distill_trainer import DistillTrainer

    seen = {}

    class Spy(OnlineTeacher):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            seen["teacher"] = self
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    original = DistillTrainer.create_optimizer

    def create_optimizer(self, model=None):
        opt = original(self, model)
        seen["optimized"] = {id(p) for g in opt.param_groups for p in g["params"]}
        return opt

    monkeypatch.setattr(distill_module, "OnlineTeacher", Spy)
    monkeypatch.setattr(DistillTrainer, "create_optimizer", create_optimizer)
    last = run_distill(_cfg(setup, output=str(tmp_path / "out"), max_steps=3, learning_rate=1e-2,
                            feature_layers="1", logging_steps=1))
    teacher = seen["teacher"].model
    assert not seen["optimized"] & {id(p) for p in teacher.parameters()}
    assert len(seen["optimized"]) > 0
    for n, p in teacher.named_parameters():
        assert torch.equal(p, seen["before"][n]) and not p.requires_grad, n
    assert not teacher.training
    rows = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["feature"] > 0 and r["kl"] > 0 and r["ce"] > 0 for r in rows)
    # the student moved
    assert not torch.equal(load_compressed(last).model.layers[1].mlp.gate.weight,
                           load_compressed(setup / "student").model.layers[1].mlp.gate.weight)


def test_bad_teacher_input_is_refused_by_name(setup, tmp_path, tiny_tokenizer):
    with pytest.raises(DistillConfigError, match="exactly one teacher"):
        DistillConfig(student="s", output="o", max_steps=1)
    with pytest.raises(DistillConfigError, match="both were given"):
        DistillConfig(student="s", output="o", max_steps=1, teacher="t", data="d", teacher_cache="c.h5")
    with pytest.raises(DistillConfigError, match="needs --data"):
        DistillConfig(student="s", output="o", max_steps=1, teacher="t")
    with pytest.raises(DistillConfigError, match="comma-separated"):
        DistillConfig(student="s", output="o", max_steps=1, teacher="t", data="d", feature_layers="a,b")
    with pytest.raises(FeatureConfigError, match=r"out of range.*0\.\.1"):
        prepare(_cfg(setup, output=str(tmp_path / "o1"), feature_layers="0,5"))
    with pytest.raises(OnlineTeacherError, match="not a model folder"):
        prepare(_cfg(setup, output=str(tmp_path / "o2"), teacher=str(tmp_path)))
    # a teacher with another tokenizer: same vocabulary size, other token -> id map
    other = tmp_path / "other"
    model = tiny_model("qwen3_moe", seed=0, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(other)
    vocab = json.loads((setup / "teacher" / "tokenizer.json").read_text())
    items = sorted(vocab["model"]["vocab"].items(), key=lambda kv: kv[1])
    (a, ia), (b, ib) = items[200], items[201]
    vocab["model"]["vocab"][a], vocab["model"]["vocab"][b] = ib, ia
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    for f in ("tokenizer_config.json",):
        (other / f).write_text((setup / "teacher" / f).read_text())
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        prepare(_cfg(setup, output=str(tmp_path / "o3"), teacher=str(other)))
    # cached features: the layers must be in the cache
    cache_teacher(CacheTeacherConfig(teacher=str(setup / "teacher"), data=str(setup / "data.jsonl"),
                                     output=str(tmp_path / "plain.h5"), top_k=4, seq_len=32, max_sequences=2))
    with pytest.raises(DistillConfigError, match=r"features of layers none, not \[1\].*--cache-features 1"):
        prepare(DistillConfig(student=str(setup / "student"), teacher_cache=str(tmp_path / "plain.h5"),
                              output=str(tmp_path / "o4"), max_steps=1, deepspeed=None, report_to="none",
                              feature_layers="1"))
    with pytest.raises(CacheTeacherError, match="out of range"):
        cache_teacher(CacheTeacherConfig(teacher=str(setup / "teacher"), data=str(setup / "data.jsonl"),
                                         output=str(tmp_path / "c.h5"), top_k=4, seq_len=32, max_sequences=2,
                                         cache_features="7"))
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.shards").exists()


def test_cache_stores_the_teachers_features_and_quotes_their_bytes(setup):
    meta = tc.read_meta(setup / "cache.h5")
    assert meta.feature_layer_list == [0, 1] and meta.feature_target == "hidden" and meta.hidden_size == 32
    assert meta.feature_bytes_per_token == 2 * 2 * 32
    cache = tc.TeacherCacheDataset(setup / "cache.h5")
    assert "teacher_features" not in cache[0]
    cache.select_features([1])
    item = cache[3]
    assert item["teacher_features"].shape == (1, 32, 32) and item["teacher_features"].dtype == torch.float32
    teacher, _ = load_replicated(setup / "teacher", torch.float32, torch.device("cpu"))
    hooks = FeatureHooks(teacher, [1])
    with torch.no_grad():
        teacher(input_ids=item["input_ids"][None])
    torch.testing.assert_close(item["teacher_features"], hooks.take()[0].half().float())


def _launch(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from moe_ds.dist import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--include", "localhost:0,1", "--master_port",
           str(free_port()), "launch/distill.py", "--deepspeed", "ds_configs/zero3.json", "--student",
           str(root / "student"), "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"),
           "--seq-len", "32", "--max-sequences", "8", "--output", str(out), "--save-steps", "2", "--logging-steps", "1",
           "--batch-size", "2", "--report-to", "none", "--dataloader-num-workers", "0", *extra]
    env = launcher_env(WANDB_MODE="disabled")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)


@pytest.mark.slow
def test_two_rank_zero3_with_a_partitioned_live_teacher_and_features_matches_one_process(setup, tmp_path):
    """2 ranks x 2 sequences under ZeRO-3 with the teacher in a ZeRO-3 inference engine log the same losses as one
    process with a replicated teacher and 4 sequences (the same global batch)."""
    p = _launch(setup, tmp_path / "zero3", "--max-steps", "4", "--feature-layers", "0,1", "--teacher-placement",
                "zero3", "--teacher-top-k", "16")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    logs = p.stdout + p.stderr
    assert "live teacher (zero3" in logs
    # each rank holds about half the teacher's float32 weights (ZeRO-3 partitions, padded to the world size)
    import re
    from moe_ds.online_teacher import OnlineTeacher, teacher_bytes_on_rank
    whole, _ = load_replicated(setup / "teacher", torch.float32, torch.device("cpu"))
    full = teacher_bytes_on_rank(OnlineTeacher(whole, top_k=None)) / 2**20
    held = [float(x) for x in re.findall(r"([0-9.]+) MiB on this rank", logs)]
    assert held and all(0.45 * full < h < 0.56 * full for h in held), (held, full)
    zero3 = [json.loads(x) for x in (tmp_path / "zero3" / "train_log.jsonl").read_text().splitlines()]
    run_distill(_cfg(setup, output=str(tmp_path / "one"), max_steps=4, batch_size=4, feature_layers="0,1",
                     teacher_top_k=16, logging_steps=1, save_steps=2))
    one = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in zero3] == [1, 2, 3, 4]
    for a, b in zip(zero3, one):
        for key in ("ce", "kl", "feature", "loss"):
            assert a[key] == pytest.approx(b[key], rel=2e-3), (key, a, b)

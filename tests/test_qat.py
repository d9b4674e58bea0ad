"""Quantization-aware training in distillation (issue #14): stage settings refused by name, the fake-quantized
forward equal to the dequantized model's, straight-through gradients that the optimizer applies to the latent
weights, the end of a QAT stage (fake-quantized checkpoint, quantized-<step>/), the shipped QAT -> prune_to ->
plain stages, and one 2-rank ZeRO-3 launcher run."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from conftest import FAMILIES, REPO, launcher_env, load_launcher, tiny_model
from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher
from moe_ds.checkpoint import compress_model, load_model
from moe_ds.distill import (LOG_FILE, DistillConfig, QATConfigError, StageConfig, experts_per_stage, prepare,
                            run_distill)
from moe_ds.qat import (FakeQuantization, check_shapes, fake_quantize_checkpoint, fake_quantize_tensor,
                        parse_quantization, target_kind)
from moe_ds.quantized_checkpoint import is_transposed
from moe_ds.quantize import QuantSpec, quantize

SEQ = 32
Q = {"experts": "int4-g8", "router": "int8"}  # g8 divides the tiny models' 32 / 24 / rank-8 input dims


def _targets(model) -> dict[str, str]:
    return {n: k for n, _ in model.named_parameters() if (k := target_kind(n, model.config.model_type)) is not None}


def _dequantized_copy(model, q=Q):
    """A copy of ``model`` whose expert and router weights are dequantize(quantize(w)): the really quantized model."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, kind in _targets(ref).items():
            p = ref.get_parameter(name)
            p.copy_(fake_quantize_tensor(p, q[kind], is_transposed(name)))
    return ref


# ------------------------------------------------------------------------------------------ settings

def test_quantization_settings_are_named_errors():
    assert StageConfig(steps=1, quantization={"experts": "int4-g128", "router": "INT8"}).quantization == \
        {"experts": "int4-g128", "router": "int8"}
    assert StageConfig(steps=1, quantization={"experts": "int4-g64-asym"}).quantization == \
        {"experts": "int4-g64-asym", "router": None}
    assert StageConfig(steps=1).quantization is None
    for bad, match in (("int4", "must be a mapping"), ({"experts": "int3"}, r"quantization.experts: unsupported"),
                       ({"router": "int8-g0"}, "quantization.router: group size"),
                       ({"attention": "int8"}, r"unknown keys \['attention'\]"),
                       ({"experts": None, "router": "none"}, "quantizes nothing")):
        with pytest.raises(QATConfigError, match=match):
            StageConfig(steps=1, name="q", quantization=bad)
    assert issubclass(QATConfigError, ValueError)
    shapes = [(n, p.shape) for n, p in tiny_model("qwen3_moe").named_parameters()]
    # 2 layers x (gate_up_proj, down_proj, router)
    assert check_shapes(shapes, parse_quantization(Q), "qwen3_moe") == 6
    with pytest.raises(QATConfigError, match=r"experts int4-g16 cannot quantize model.layers.0.mlp.experts.down_proj "
                                             r"\[6, 32, 24\]: group size 16 does not divide"):
        check_shapes(shapes, {"experts": "int4-g16", "router": None}, "qwen3_moe")
    with pytest.raises(QATConfigError, match="matches no expert or router weight"):
        check_shapes([(n, p.shape) for n, p in T.LlamaForCausalLM(T.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=64)).named_parameters()], parse_quantization(Q), "qwen3_moe")


@pytest.mark.parametrize("family", FAMILIES)
def test_target_tensors_in_memory_and_on_disk(family, tmp_path):
    model = tiny_model(family)
    found = _targets(model)
    moe_layers = {"deepseek_v3": 2}.get(family, 2)
    assert sorted(found.values()) == ["experts"] * 2 * moe_layers + ["router"] * moe_layers
    assert all(n.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")) for n in found)
    model.save_pretrained(tmp_path)
    disk = [k for k in load_file(tmp_path / "model.safetensors") if target_kind(k, family) is not None]
    E = model.config.num_local_experts if family == "mixtral" else (
        model.config.n_routed_experts if family == "deepseek_v3" else model.config.num_experts)
    assert len(disk) == moe_layers * (3 * E + 1)  # per expert gate, up, down; one router per layer
    for prefix in ("shared_core_", "quantized_"):  # the compressed and quantized forms of the family
        assert target_kind(next(iter(found)), prefix + family) == found[next(iter(found))]


def test_quantization_flag_sets_the_single_stage():
    launcher = load_launcher("distill")
    base = ["--student", "s", "--teacher-cache", "c.h5", "--output", "o", "--max-steps", "3"]
    cfg = launcher.config_from_args([*base, "--quantization", "int4-g64"])
    assert [s.quantization for s in cfg.stages] == [{"experts": "int4-g64", "router": "int8"}]
    assert cfg.quantization is None and cfg.to_dict()["stages"][0]["quantization"]["experts"] == "int4-g64"
    cfg = launcher.config_from_args([*base, "--quantization", "experts=int4-g32-asym,router=none", "--groups",
                                     r"mlp\.gate\.=0"])
    assert cfg.stages[0].quantization == {"experts": "int4-g32-asym", "router": None}
    assert cfg.stages[0].groups[0].lr_mult == 0
    for bad, match in (("experts=int4,experts=int8", "is SPEC or experts=SPEC"), ("int4-g8,router=int8", "is SPEC or"),
                       ("int2", "unsupported quantized dtype"), ("router=int8,attention=int8", "unknown keys")):
        with pytest.raises(QATConfigError, match=match):
            DistillConfig(student="s", teacher_cache="c", output="o", max_steps=1, quantization=bad)
    with pytest.raises(QATConfigError, match="the config file has stages"):
        DistillConfig(student="s", teacher_cache="c", output="o", quantization="int4", stages=[{"steps": 1}])


def test_shipped_qat_stages_validate():
    cfg = load_launcher("distill").config_from_args(["--student", "s", "--teacher-cache", "c.h5", "--output", "o",
                                                     "--config", str(REPO / "launch" / "distill_stages.qat.json")])
    assert [s.quantization for s in cfg.stages] == [{"experts": "int4-g128", "router": "int8"}, None, None]
    assert experts_per_stage(cfg, T.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2)) == [8, 6, 6]


# ------------------------------------------------------------------------------------- fake quantization

@pytest.mark.parametrize("family", FAMILIES)
def test_fake_quant_forward_equals_the_dequantized_model(family):
    model = tiny_model(family).train()
    ref = _dequantized_copy(model).train()
    ids = torch.randint(0, 300, (2, 12))
    qat = FakeQuantization(model, **Q)
    loss = model(input_ids=ids, labels=ids).loss  # grad on: the experts run under activation checkpointing
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6)
    # the straight-through gradient of each latent weight is the dequantized model's gradient of its weight
    # (range "max" clips nothing, so the mask is all ones)
    loss.backward()
    ref_loss.backward()
    for name in _targets(model):
        torch.testing.assert_close(model.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-6, rtol=1e-5)
    # ||w - q(w)|| / ||w|| over the expert weights, by hand
    num = den = 0.0
    for name, kind in _targets(model).items():
        if kind == "experts":
            w = model.get_parameter(name).detach()
            num += float((w - fake_quantize_tensor(w, Q["experts"])).pow(2).sum())
            den += float(w.pow(2).sum())
    assert qat.error()["experts"] == pytest.approx((num / den) ** 0.5, rel=1e-6)
    assert 0 < qat.error()["router"] < qat.error()["experts"]
    qat.remove()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("form", ["shared_core", "lowrank", "delta"])
def test_factorised_students_fake_quantize_every_factor(form):
    model = compress_model(tiny_model("qwen3_moe"), {"gate": 8, "up": 8, "down": 8}, method="svd", form=form).train()
    factors = {"shared_core": ("core", "u_in", "v_in", "u_out", "v_out"), "lowrank": ("a", "b"),
               "delta": ("a", "b", "base")}[form]
    experts = sorted(n.rsplit(".", 1)[1] for n, k in _targets(model).items() if k == "experts" and ".layers.0." in n)
    assert experts == sorted(f"{p}_{f}" for p in ("gate", "up", "down") for f in factors)
    ref = _dequantized_copy(model).train()
    FakeQuantization(model, **Q)
    ids = torch.randint(0, 300, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    ref_loss = ref(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6)
    loss.backward()
    ref_loss.backward()
    for name in _targets(model):
        torch.testing.assert_close(model.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", ["stock", "shared_core", "lowrank", "delta"])
def test_fake_quant_forward_equals_the_written_quantized_checkpoint(form, tmp_path, tiny_tokenizer):
    """The training forward's values are the ones quantize_checkpoint stores: same tensors, same group axis."""
    from moe_ds.checkpoint import save_compressed
    from moe_ds.quantized_checkpoint import quantize_checkpoint

    model = tiny_model("qwen3_moe")
    if form == "stock":
        model.save_pretrained(tmp_path / "src")
    else:
        model = compress_model(model, {"gate": 8, "up": 8, "down": 8}, method="svd", form=form)
        with torch.no_grad():  # the shared core starts with U = 0: give every factor values to quantize
            for name, kind in _targets(model).items():
                if kind == "experts" and name.endswith(("_u_in", "_u_out")):
                    model.get_parameter(name).normal_(0, 0.1)
        save_compressed(model, tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    quantized = load_model(quantize_checkpoint(tmp_path / "src", tmp_path / "q", experts=Q["experts"],
                                               router=Q["router"]))
    FakeQuantization(model, **Q)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, quantized(input_ids=ids).logits, atol=1e-6,
                                   rtol=1e-6)


def test_the_optimizer_moves_the_latent_weights():
    model = tiny_model("qwen3_moe").train()
    FakeQuantization(model, **Q)
    w = model.model.layers[0].mlp.experts.down_proj
    before = w.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert w.grad is not None and int((w.grad != 0).sum()) > 0.5 * w.numel()
    opt.step()
    moved = w.detach() != before
    assert int(moved.sum()) > 0.5 * w.numel()
    # a step of 1e-4 is far below the int4 steps: most latent moves leave the quantized value where it was
    q0, q1 = quantize(before, Q["experts"]), quantize(w.detach(), Q["experts"])
    assert int((q0.values != q1.values).sum()) < 0.05 * w.numel()
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, torch.nn.Parameter)  # restored after forward


def test_gradient_checkpointing_gives_the_same_straight_through_gradients():
    ids = torch.randint(0, 300, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("qwen3_moe").train()
        if checkpointing:  # HF's per-layer recompute around the experts' own (nested, non-reentrant)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        FakeQuantization(model, **Q)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: model.get_parameter(n).grad for n in _targets(model)})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-7, rtol=1e-6)


def test_fake_quantized_checkpoint_loads_as_the_fake_quantized_model(tmp_path):
    model = tiny_model("mixtral")  # on-disk names differ from the in-memory ones (block_sparse_moe, w1/w2/w3)
    model.save_pretrained(tmp_path)
    assert fake_quantize_checkpoint(tmp_path, Q, "mixtral") == 2 * (3 * 6 + 1)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    FakeQuantization(model, **Q)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # quantizing the fake-quantized weights again changes nothing (scales rounded up to bf16: max|q(w)| = 7s)
    w = loaded.model.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(fake_quantize_tensor(w, Q["experts"]), w)
    assert QuantSpec.parse(Q["experts"]).group(w.shape[-1]) == 8


# ------------------------------------------------------------------------------------------ distillation

@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_lm_dir, stdlib_text) -> Path:
    root = tmp_path_factory.mktemp("qat")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 60_000, 3000)))
    cache_teacher(CacheTeacherConfig(teacher=str(tiny_lm_dir), data=str(data), output=str(root / "cache.h5"),
                                      top_k=8, seq_len=SEQ, max_sequences=24))
    return root


PIPELINE = [{"name": "qat", "steps": 2, "quantization": Q},
            {"name": "pruned", "steps": 1, "prune_to": 4},
            {"name": "plain", "steps": 1}]


def _cfg(root: Path, student: Path, stages: list, **kw) -> DistillConfig:
    base = {"student": str(student), "teacher_cache": str(root / "cache.h5"), "output": str(root / "out"),
            "report_to": "none", "stages": stages}
    base.update(kw)
    return DistillConfig(**base)


def test_prepare_refuses_a_group_size_the_student_cannot_take(run_root, tiny_lm_dir):
    with pytest.raises(QATConfigError, match=r"stage 1 \(qat\): experts int4-g128 cannot quantize "
                                             r"model.layers.0.mlp.experts.gate_up_proj \[6, 48, 32\]"):
        prepare(_cfg(run_root, tiny_lm_dir, [{"name": "qat", "steps": 1,
                                              "quantization": {"experts": "int4-g128"}}]))


def test_qat_then_pruning_then_plain_distillation_in_one_run(run_root, tiny_lm_dir, tmp_path, monkeypatch):
    from moe_ds.distill_trainer import PROBE_ENV

    out = tmp_path / "run"
    out.mkdir()
    ids = torch.randint(0, 300, (2, 16))
    torch.save(ids, out / "probe_input.pt")
    monkeypatch.setenv(PROBE_ENV, "1")  # the in-training model's logits at every checkpoint
    last = run_distill(_cfg(run_root, tiny_lm_dir, PIPELINE, output=str(out), deepspeed="none", batch_size=2,
                            save_steps=1, logging_steps=1, learning_rate=1e-3, dataloader_num_workers=0))
    assert last == out / "checkpoint-4"
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 1, 2, 3]
    assert all(0 < r["fq_error"] < 0.2 and 0 < r["fq_error_router"] < r["fq_error"] for r in rows[:2])
    assert all("fq_error" not in r for r in rows[2:])
    # inside the stage the latent weights; at its end the fake-quantized ones, which stage 2 pruned and trained
    mid, end = (load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (1, 2))
    key = "model.layers.0.mlp.experts.0.down_proj.weight"
    assert not torch.equal(fake_quantize_tensor(mid[key], Q["experts"]), mid[key])
    for k, t in end.items():  # int4 with bf16 scales rounded up is idempotent (int8 not always: 127 may become 126)
        if target_kind(k, "qwen3_moe") == "experts":
            assert torch.equal(fake_quantize_tensor(t, Q["experts"]), t), k
    with torch.no_grad():  # the QAT model at its last step (fake quantization in the forward) is the checkpoint's
        at_end = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")(input_ids=ids).logits
    torch.testing.assert_close(at_end, torch.load(out / "probe-2.pt"), atol=1e-5, rtol=1e-5)
    latent = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    with torch.no_grad():
        assert not torch.allclose(latent(input_ids=ids).logits, torch.load(out / "probe-1.pt"), atol=1e-4)
        FakeQuantization(latent, **Q)
        torch.testing.assert_close(latent(input_ids=ids).logits, torch.load(out / "probe-1.pt"), atol=1e-5, rtol=1e-5)
    pruned = {k: v for f in sorted((out / "pruned-2").glob("*.safetensors")) for k, v in load_file(f).items()}
    kept = json.loads((out / "pruned-2" / "pruning.json").read_text())["kept"]["0"]
    assert torch.equal(pruned[key], end[f"model.layers.0.mlp.experts.{kept[0]}.down_proj.weight"])
    final = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    assert final.config.num_experts == 4
    quantized = out / "quantized-2"  # the packed int4/int8 model of the QAT stage's end
    assert json.loads((quantized / "config.json").read_text())["moe_ds_quantization"]["experts"] == Q["experts"]
    assert not (out / "quantized-1").exists() and not (out / "quantized-3").exists()
    with torch.no_grad():
        a = load_model(quantized)(input_ids=ids).logits
    torch.testing.assert_close(a, at_end, atol=1e-5, rtol=1e-5)


def test_a_shared_core_student_trains_with_qat_and_ends_quantized(run_root, tiny_tokenizer, tmp_path, monkeypatch):
    from moe_ds.checkpoint import save_compressed
    from moe_ds.distill_trainer import PROBE_ENV

    model = compress_model(tiny_model("qwen3_moe"), {"gate": 8, "up": 8, "down": 8}, method="svd")
    with torch.no_grad():
        for name in _targets(model):
            if name.endswith(("_u_in", "_u_out")):
                model.get_parameter(name).normal_(0, 0.1)
    save_compressed(model, tmp_path / "student", tokenizer=tiny_tokenizer)
    out = tmp_path / "run"
    out.mkdir()
    ids = torch.randint(0, 300, (2, 16))
    torch.save(ids, out / "probe_input.pt")
    monkeypatch.setenv(PROBE_ENV, "1")
    run_distill(_cfg(run_root, tmp_path / "student", [{"name": "qat", "steps": 1, "quantization": Q}],
                     output=str(out), deepspeed="none", batch_size=2, learning_rate=1e-3, dataloader_num_workers=0))
    probe = torch.load(out / "probe-1.pt")
    with torch.no_grad():
        for path in (out / "checkpoint-1", out / "quantized-1"):  # fake-quantized weights; packed factors
            torch.testing.assert_close(load_model(path)(input_ids=ids).logits, probe, atol=1e-5, rtol=1e-5)


def test_resume_inside_and_at_the_end_of_a_qat_stage(run_root, tiny_lm_dir, tmp_path):
    stages = [{"name": "qat", "steps": 2, "quantization": Q}, {"name": "plain", "steps": 1}]

    def run(out: Path, **kw) -> Path:
        return run_distill(_cfg(run_root, tiny_lm_dir, stages, output=str(out), deepspeed="none", batch_size=2,
                                save_steps=1, logging_steps=1, learning_rate=1e-3, dataloader_num_workers=0,
                                keep_training_state=None, **kw))

    first = tmp_path / "first"
    assert run(first) == first / "checkpoint-3"
    weights = {s: load_file(first / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3)}
    # stopped after checkpoint-1 (latent weights, optimizer state): the stage continues with fake quantization
    # and its end is written quantized again; stopped at the boundary: the next stage starts from checkpoint-2
    for name, drop in (("mid", ("checkpoint-2", "checkpoint-3", "quantized-2")), ("boundary", ("checkpoint-3",))):
        out = tmp_path / name
        shutil.copytree(first, out, ignore=shutil.ignore_patterns(*drop))
        assert run(out, resume=True) == out / "checkpoint-3"
        assert (out / "quantized-2" / "config.json").is_file()
        for s in ((2, 3) if name == "mid" else (3,)):
            again = load_file(out / f"checkpoint-{s}" / "model.safetensors")
            for k, t in weights[s].items():
                torch.testing.assert_close(again[k], t, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- the 2-rank ZeRO-3 launcher

@pytest.mark.slow
def test_zero3_two_ranks_qat_stage_matches_the_quantized_model(run_root, tiny_lm_dir):
    """Under ZeRO-3 on 2 CPU ranks the QAT stage trains (the latent weights move), the in-training model's logits at
    its end (fake quantization inside each module's forward, on the gathered weights) equal those of its final
    checkpoint (fake-quantized weights) and of quantized-<step>/ loaded in this process; a prune_to stage follows."""
    from moe_ds.dist import free_port
    from moe_ds.distill_trainer import PROBE_ENV

    out = run_root / "launcher"
    out.mkdir()
    ids = torch.randint(0, 300, (2, 16))
    torch.save(ids, out / "probe_input.pt")
    # ZeRO-3 releasing every parameter right after its module's forward (no reuse window, no prefetch): the
    # experts' recomputed forward in the backward must see them gathered again
    strict = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    strict["zero_optimization"].update({"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0,
                                        "stage3_prefetch_bucket_size": 0})
    (run_root / "zero3_strict.json").write_text(json.dumps(strict))
    stages = run_root / "qat_stages.json"
    stages.write_text(json.dumps({"stages": [{"name": "qat", "steps": 2, "quantization": Q},
                                             {"name": "pruned", "steps": 1, "prune_to": 4}]}))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--include", "localhost:0,1", "--master_port",
           str(free_port()), "launch/distill.py", "--deepspeed", str(run_root / "zero3_strict.json"), "--student",
           str(tiny_lm_dir), "--teacher-cache", str(run_root / "cache.h5"), "--output", str(out),
           "--config", str(stages), "--save-steps", "1", "--logging-steps", "1", "--batch-size", "2",
           "--learning-rate", "1e-2", "--report-to", "none", "--dataloader-num-workers", "0"]
    env = launcher_env(**{PROBE_ENV: "1"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    logs = p.stdout + p.stderr
    assert p.returncode == 0, logs[-6000:]
    assert "quantization-aware training: 6 expert/router tensors fake-quantized" in logs
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["fq_error"] > 0 for r in rows[:2])
    assert "fq_error" not in rows[2] and "pruned 6 -> 4 experts per MoE layer" in logs
    assert T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-3").config.num_experts == 4
    start = load_file(tiny_lm_dir / "model.safetensors")
    mid = load_file(out / "checkpoint-1" / "model.safetensors")
    key = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert float((mid[key] - start[key]).abs().max()) > 1e-4  # the latent weights trained under ZeRO-3
    probe = torch.load(out / "probe-2.pt")
    with torch.no_grad():
        ckpt = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")(input_ids=ids).logits
    torch.testing.assert_close(ckpt, probe, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "quantized-2")(input_ids=ids).logits, probe, atol=1e-5, rtol=1e-5)

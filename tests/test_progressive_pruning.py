"""Progressive expert pruning across distillation stages: stage settings refused before training, router usage
counted during training (checked against a hand count), the pruning boundary with its history, resume across it,
and one 2-rank ZeRO-3 launcher run that also holds a magnitude-pruned student's zeros through both stages."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from conftest import REPO, launcher_env, tiny_config, tiny_model
from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher
from moe_ds.distill import (CONFIG_FILE, HISTORY_FILE, LOG_FILE, PRUNING_RECORD, DistillConfig, DistillConfigError,
                            PruneConfigError, StageConfig, experts_per_stage, prepare, prune_at_boundary, run_distill)
from moe_ds.expert_pruning import expert_scores
from moe_ds.run_layout import CHECKPOINT_COMPLETE
from moe_ds.sparsity import (SPARSITY_KEY, USAGE_FILE, ExpertUsage, SparsityError, load_usage,
                             prune_experts_by_magnitude, sparsity_section)

SEQ, K, E = 32, 2, 6  # cached sequence length; the tiny Qwen3-MoE's top-k and experts


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_lm_dir, tiny_tokenizer, stdlib_text) -> Path:
    """A cache from the tiny teacher; students: the teacher itself, and the teacher with half its expert weights
    zeroed by magnitude (with the moe_ds_sparsity section)."""
    root = tmp_path_factory.mktemp("progressive")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 60_000, 3000)))
    cache_teacher(CacheTeacherConfig(teacher=str(tiny_lm_dir), data=str(data), output=str(root / "cache.h5"),
                                      top_k=8, seq_len=SEQ, max_sequences=24))
    sparse = T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    stats = prune_experts_by_magnitude(sparse, sparsity=0.5)
    setattr(sparse.config, SPARSITY_KEY, sparsity_section(0.5, numel=stats["numel"], nnz=stats["nnz"], dtype_bytes=4))
    sparse.save_pretrained(root / "sparse_student")
    tiny_tokenizer.save_pretrained(root / "sparse_student")
    return root


def _cfg(root: Path, tiny_lm_dir: Path, stages: list, **kw) -> DistillConfig:
    base = {"student": str(tiny_lm_dir), "teacher_cache": str(root / "cache.h5"), "output": str(root / "out"),
            "report_to": "none", "stages": stages}
    base.update(kw)
    return DistillConfig(**base)


TWO_STAGES = [{"name": "all", "steps": 2}, {"name": "pruned", "steps": 2, "prune_to": 4}]


# ------------------------------------------------------------------------------------------ settings

def test_stage_settings_are_checked():
    with pytest.raises(PruneConfigError, match="prune_to must be an integer >= 1"):
        StageConfig(steps=1, prune_to=0)
    with pytest.raises(PruneConfigError, match="prune_to must be an integer >= 1"):
        StageConfig(steps=1, prune_to=2.5)
    with pytest.raises(PruneConfigError, match="prune_score must be one of"):
        StageConfig(steps=1, prune_to=4, prune_score="reap")
    def cfg(*prunes):
        return DistillConfig(student="s", teacher_cache="c", output="o", stages=[
            {"steps": 1, "name": f"s{i}", **({"prune_to": p} if p is not None else {})} for i, p in enumerate(prunes)])

    qwen = tiny_config("qwen3_moe")  # 6 experts, top-2
    assert experts_per_stage(cfg(None, None), qwen) is None
    assert experts_per_stage(cfg(None, 4, None, 2), qwen) == [6, 4, 4, 2]
    for prunes, match in (((4, None), r"stage 1 \(s0\): prune_to 4: the experts are chosen from the usage"),
                          ((None, 6), "must be below the 6 experts per layer the stage starts with"),
                          ((None, 4, 4), r"stage 3 \(s2\): prune_to 4 must be below the 4 experts"),
                          ((None, 1), "1 experts are fewer than top_k = 2")):
        with pytest.raises(PruneConfigError, match=match):
            experts_per_stage(cfg(*prunes), qwen)
    deepseek = tiny_config("deepseek_v3")  # 8 experts in 2 routing groups
    with pytest.raises(PruneConfigError, match="do not split into n_group = 2"):
        experts_per_stage(cfg(None, 5), deepseek)
    assert experts_per_stage(cfg(None, 4), deepseek) == [8, 4]
    with pytest.raises(PruneConfigError, match="supported family"):
        experts_per_stage(cfg(None, 4), T.LlamaConfig())


def test_the_shipped_pruning_stages_validate():
    from conftest import load_launcher

    cfg = load_launcher("distill").config_from_args(["--student", "s", "--teacher-cache", "c.h5", "--output", "o",
                                                     "--config", str(REPO / "launch" / "distill_stages.prune.json")])
    toy = T.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2)  # the demo's toy teacher: 8 experts, top-2
    assert experts_per_stage(cfg, toy) == [8, 6, 4] and cfg.max_steps == 300
    assert [s.prune_score for s in cfg.stages[1:]] == ["frequency", "frequency"]


def test_prepare_resolves_later_groups_against_the_pruned_model_and_guards_resume(run_root, tiny_lm_dir, tmp_path):
    experts = [{"pattern": r"mlp\.experts\."}]
    stages = [{"steps": 2, "groups": experts}, {"steps": 2, "prune_to": 4, "groups": experts}]
    prep = prepare(_cfg(run_root, tiny_lm_dir, stages))
    full = 2 * E * (3 * 24 * 32)  # 2 layers x E experts x (gate, up, down) of 24 x 32
    assert prep.groups[0][0].numel == full
    assert prep.groups[1][0].numel == full * 4 // E  # stage 2 resolves against 4 experts per layer
    assert prep.groups[1][1].numel == prep.groups[0][1].numel - E * 2 * 32 + 4 * 2 * 32  # router rows too
    # a resume may not change which experts a later stage keeps (prune_to lives in the stages)
    out = run_root / "out"
    done = out / "checkpoint-2"
    done.mkdir(parents=True)
    (done / CHECKPOINT_COMPLETE).write_text("{}")
    (out / CONFIG_FILE).write_text(json.dumps(_cfg(run_root, tiny_lm_dir, stages).to_dict()))
    changed = [stages[0], {**stages[1], "prune_to": 3}]
    with pytest.raises(DistillConfigError, match="started with other stages"):
        prepare(_cfg(run_root, tiny_lm_dir, changed, resume=True))
    # at the boundary, without the usage the experts are chosen from: refused before loading anything
    with pytest.raises(PruneConfigError, match="checkpoint-2 holds no expert_usage.json"):
        prepare(_cfg(run_root, tiny_lm_dir, stages, resume=True))
    # a config written before prune_to existed (no such keys in its stages) still resumes
    old = _cfg(run_root, tiny_lm_dir, [{"steps": 2}, {"steps": 2}]).to_dict()
    for s in old["stages"]:
        del s["prune_to"], s["prune_score"]
    (out / CONFIG_FILE).write_text(json.dumps(old))
    assert prepare(_cfg(run_root, tiny_lm_dir, [{"steps": 2}, {"steps": 2}], resume=True)).start_step == 2
    shutil.rmtree(out)
    # a student with an unusable moe_ds_sparsity section is refused before anything is loaded
    bad = tmp_path / "bad_section"
    shutil.copytree(tiny_lm_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, SPARSITY_KEY: {"method": "magnitude"}}))
    with pytest.raises(DistillConfigError, match="moe_ds_sparsity has unusable format None"):
        prepare(_cfg(run_root, tiny_lm_dir, [{"steps": 2}], student=str(bad)))


# ------------------------------------------------------------------------------------------ usage

def _hand_count(model, ids: torch.Tensor) -> dict[int, tuple[list[int], list[float]]]:
    """Tokens and routing weight per expert from each layer's router weights, token by token in plain Python."""
    inputs = {}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).detach()))
        for i in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for layer, x in inputs.items():
        w = model.model.layers[layer].mlp.gate.weight.detach()
        tokens, weight = [0] * E, [0.0] * E
        for row in x:
            probs = torch.softmax(w @ row, dim=-1).tolist()
            top = sorted(range(E), key=lambda e: -probs[e])[:K]
            norm = sum(probs[e] for e in top)  # norm_topk_prob
            for e in top:
                tokens[e] += 1
                weight[e] += probs[e] / norm
        out[layer] = (tokens, weight)
    return out


def test_usage_counts_equal_a_hand_count_and_only_training_forwards_count(tmp_path):
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    expected = _hand_count(model, ids)
    usage = ExpertUsage(model)
    model(input_ids=ids)  # outside counting(): not counted
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with usage.counting():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # recomputes the forward (checkpointing): not counted again
    totals = usage.totals()
    for i, layer in enumerate(usage.layers):
        tokens, weight = expected[layer]
        assert totals[i, 0].tolist() == tokens and sum(tokens) == ids.numel() * K
        torch.testing.assert_close(totals[i, 1], torch.tensor(weight, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # saved, read back, and continued by a resumed run: the counts add up
    path = tmp_path / USAGE_FILE
    path.write_text(json.dumps(usage.to_dict(totals, step=3, stage=2, since_step=1)))
    saved = load_usage(path)
    assert saved["layers"] == [0, 1] and saved["since_step"] == 1 and saved["top_k"] == K
    again = ExpertUsage(model, base=saved)
    model.eval()
    with again.counting():
        model(input_ids=ids)
    assert torch.equal(again.totals()[:, 0], 2 * totals[:, 0])
    usage.remove(), again.remove()
    with pytest.raises(SparsityError, match="is missing"):
        load_usage(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads(path.read_text()), "num_experts": 5}))
    with pytest.raises(SparsityError, match="do not hold 5 values"):
        load_usage(tmp_path / "bad.json")


def test_usage_hooks_read_every_family_s_router(family):
    model = tiny_model(family)
    usage = ExpertUsage(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with usage.counting(), torch.no_grad():
        model(input_ids=ids)
    totals = usage.totals()
    k = model.config.num_experts_per_tok
    assert totals.shape == (len(usage.layers), 2, usage.num_experts)
    assert torch.all(totals[:, 0].sum(-1) == ids.numel() * k)  # every token routed to k experts, in every layer
    assert torch.all(totals[:, 1] >= 0) and torch.all((totals[:, 1] > 0) == (totals[:, 0] > 0))
    usage.remove()


# ------------------------------------------------------------------------------------------ the boundary

def test_the_boundary_keeps_the_most_used_experts_and_is_reused(run_root, tiny_lm_dir, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(tiny_lm_dir, ckpt)
    tokens = {0: [5, 50, 7, 40, 30, 0], 1: [9, 8, 70, 6, 60, 1]}
    weight = {0: [9.0, 1, 1, 1, 1, 1], 1: [1.0, 1, 1, 1, 1, 9]}  # router_weight ranks otherwise
    (ckpt / USAGE_FILE).write_text(json.dumps({
        "format_version": 1, "step": 2, "stage": 1, "since_step": 0, "num_experts": E, "top_k": K,
        "layers": {str(k): {"tokens": tokens[k], "router_weight_sum": weight[k]} for k in tokens}}))
    cfg = _cfg(run_root, tiny_lm_dir, TWO_STAGES, output=str(tmp_path / "run"))
    pruned = prune_at_boundary(cfg, 1, 2, ckpt)
    assert pruned == tmp_path / "run" / "pruned-2"
    history = json.loads((tmp_path / "run" / HISTORY_FILE).read_text())
    assert len(history) == 1 and history[0]["kept"] == {"0": [1, 2, 3, 4], "1": [0, 1, 2, 4]}  # most tokens
    assert (history[0]["step"], history[0]["stage"], history[0]["before"], history[0]["after"]) == (2, 2, E, 4)
    assert history[0]["scores"]["0"] == pytest.approx([t / (sum(tokens[0]) / K) for t in tokens[0]])
    model = T.AutoModelForCausalLM.from_pretrained(pruned)  # a stock model with 4 experts
    teacher = T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert model.config.num_experts == 4
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj, teacher.model.layers[1].mlp.experts.down_proj[
        torch.tensor([0, 1, 2, 4])])
    assert torch.equal(model.model.layers[0].mlp.gate.weight, teacher.model.layers[0].mlp.gate.weight[[1, 2, 3, 4]])
    # a resumed run reuses the folder as it is (not recomputed), and the history keeps one entry per boundary
    record = pruned / PRUNING_RECORD
    stamp = record.stat().st_mtime_ns
    (ckpt / USAGE_FILE).write_text("{}")  # would fail if it were read again
    assert prune_at_boundary(cfg, 1, 2, ckpt) == pruned and record.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "run" / HISTORY_FILE).read_text()) == history
    # the other score
    cfg_w = _cfg(run_root, tiny_lm_dir, [TWO_STAGES[0], {**TWO_STAGES[1], "prune_score": "router_weight"}],
                 output=str(tmp_path / "run_w"))
    shutil.copytree(ckpt.parent, tmp_path / "run_w", ignore=shutil.ignore_patterns("pruned-*", HISTORY_FILE))
    (tmp_path / "run_w" / "checkpoint-2" / USAGE_FILE).write_text(json.dumps({
        "format_version": 1, "step": 2, "stage": 1, "since_step": 0, "num_experts": E, "top_k": K,
        "layers": {str(k): {"tokens": tokens[k], "router_weight_sum": weight[k]} for k in tokens}}))
    prune_at_boundary(cfg_w, 1, 2, tmp_path / "run_w" / "checkpoint-2")
    kept = json.loads((tmp_path / "run_w" / HISTORY_FILE).read_text())[0]["kept"]
    assert kept == {"0": [0, 1, 2, 3], "1": [0, 1, 2, 5]}  # the heavy one, then the lower ids among the ties


# ------------------------------------------------------------------------------------------ resume (one process)

def _tokens(ckpt: Path) -> dict:
    usage = json.loads((ckpt / USAGE_FILE).read_text())
    return {layer: sum(v["tokens"]) for layer, v in usage["layers"].items()} | {"since": usage["since_step"],
                                                                               "E": usage["num_experts"]}


def test_resume_mid_stage_and_at_the_pruning_boundary(run_root, tiny_lm_dir, tmp_path):
    def run(out: Path, **kw) -> Path:
        return run_distill(_cfg(run_root, tiny_lm_dir, TWO_STAGES, output=str(out), deepspeed="none", batch_size=2,
                                save_steps=1, logging_steps=1, learning_rate=1e-3, dataloader_num_workers=0,
                                keep_training_state=None, **kw))

    first = tmp_path / "first"
    assert run(first) == first / "checkpoint-4"
    per_step = 2 * SEQ * K  # routed slots per step and layer: 2 sequences of 32 tokens, top-2
    assert _tokens(first / "checkpoint-1") == {"0": per_step, "1": per_step, "since": 0, "E": E}
    assert _tokens(first / "checkpoint-2") == {"0": 2 * per_step, "1": 2 * per_step, "since": 0, "E": E}
    assert _tokens(first / "checkpoint-4") == {"0": 2 * per_step, "1": 2 * per_step, "since": 2, "E": 4}
    usage = load_usage(first / "checkpoint-2" / USAGE_FILE)
    (entry,) = json.loads((first / HISTORY_FILE).read_text())
    for layer in usage["layers"]:  # the 4 experts with the most tokens in stage 1 (ties: the lower id)
        score = expert_scores({"tokens": usage["tokens"][layer]}, "frequency", top_k=K)
        assert entry["kept"][str(layer)] == sorted(torch.argsort(score, descending=True, stable=True)[:4].tolist())
    final = T.AutoModelForCausalLM.from_pretrained(first / "checkpoint-4")
    assert final.config.num_experts == 4 and final.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    weights = load_file(first / "checkpoint-4" / "model.safetensors")

    # stopped mid stage 2 (after checkpoint-3): the pruned model and its usage so far continue
    mid = tmp_path / "mid"
    shutil.copytree(first, mid, ignore=shutil.ignore_patterns("checkpoint-4"))
    (mid / LOG_FILE).write_text("".join(line + "\n" for line in (first / LOG_FILE).read_text().splitlines()[:3]))
    assert run(mid, resume=True) == mid / "checkpoint-4"
    assert json.loads((mid / "checkpoint-4" / USAGE_FILE).read_text()) == \
        json.loads((first / "checkpoint-4" / USAGE_FILE).read_text())
    # stopped at the boundary, the pruned model already written: reused as it is, history not repeated
    boundary = tmp_path / "boundary"
    shutil.copytree(first, boundary, ignore=shutil.ignore_patterns("checkpoint-3", "checkpoint-4"))
    stamp = (boundary / "pruned-2" / PRUNING_RECORD).stat().st_mtime_ns
    assert run(boundary, resume=True) == boundary / "checkpoint-4"
    assert (boundary / "pruned-2" / PRUNING_RECORD).stat().st_mtime_ns == stamp
    assert json.loads((boundary / HISTORY_FILE).read_text()) == [entry]
    for out in (mid, boundary):
        again = load_file(out / "checkpoint-4" / "model.safetensors")
        assert again.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(again[k], weights[k], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- the 2-rank ZeRO-3 launcher

def _expert(state: dict, layer: int, expert: int) -> dict:
    return {p: state[f"model.layers.{layer}.mlp.experts.{expert}.{p}_proj.weight"] for p in ("gate", "up", "down")}


@pytest.mark.slow
def test_zero3_two_ranks_hold_pruned_weights_and_prune_experts_between_stages(run_root):
    """The magnitude-pruned student keeps every zero through both stages under ZeRO-3 (2 CPU ranks) while its other
    weights train; at the boundary the 4 experts per layer its routers used most survive; the result loads."""
    from moe_ds.dist import free_port

    out = run_root / "launcher"
    stages = run_root / "stages.json"
    stages.write_text(json.dumps({"stages": TWO_STAGES}))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--include", "localhost:0,1", "--master_port",
           str(free_port()), "launch/distill.py", "--deepspeed", "ds_configs/zero3.json", "--student",
           str(run_root / "sparse_student"), "--teacher-cache", str(run_root / "cache.h5"), "--output", str(out),
           "--config", str(stages), "--save-steps", "2", "--logging-steps", "1", "--batch-size", "2",
           "--learning-rate", "1e-2", "--weight-decay", "0.1", "--report-to", "none"]
    env = launcher_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    logs = p.stdout + p.stderr
    assert p.returncode == 0, logs[-6000:]

    # usage of stage 1, summed over both ranks: 2 steps x 2 ranks x 2 sequences x 32 tokens x top-2 per layer
    usage = load_usage(out / "checkpoint-2" / USAGE_FILE)
    assert all(int(usage["tokens"][layer].sum()) == 2 * 2 * 2 * SEQ * K for layer in usage["layers"])
    (entry,) = json.loads((out / HISTORY_FILE).read_text())
    assert (entry["step"], entry["stage"], entry["before"], entry["after"], entry["score"]) == (2, 2, E, 4,
                                                                                               "frequency")
    kept = {int(layer): ids for layer, ids in entry["kept"].items()}
    for layer in usage["layers"]:
        order = torch.argsort(usage["tokens"][layer], descending=True, stable=True)[:4]
        assert kept[layer] == sorted(order.tolist())
    assert "pruned 6 -> 4 experts per MoE layer by frequency" in logs

    # every zero of the student stays exactly 0 in the kept experts (renumbered), the other weights trained
    student = load_file(run_root / "sparse_student" / "model.safetensors")
    mid = load_file(out / "checkpoint-2" / "model.safetensors")
    final = load_file(out / "checkpoint-4" / "model.safetensors")
    zeros_all = zeros_kept = moved = nonzero = 0
    for layer in (0, 1):
        for e in range(E):
            for proj, w in _expert(student, layer, e).items():
                zero = w == 0
                zeros_all += int(zero.sum())
                assert torch.all(_expert(mid, layer, e)[proj][zero] == 0)
                if e in kept[layer]:
                    after = _expert(final, layer, kept[layer].index(e))[proj]
                    assert torch.all(after[zero] == 0), (layer, e, proj)
                    zeros_kept += int(zero.sum())
                    moved += int((after != w)[~zero].sum())
                    nonzero += int((~zero).sum())
    assert zeros_all == 2 * E * 3 * 24 * 32 // 2 and moved > 0.99 * nonzero
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [(r["step"], r["stage"], r["zeros_held"]) for r in rows] == [
        (1, 1, zeros_all), (2, 1, zeros_all), (3, 2, zeros_kept), (4, 2, zeros_kept)]
    assert f"holding {zeros_all} of {2 * 2 * E * 3 * 24 * 32 // 2} expert weights (50.00%) at zero" in logs

    # the final checkpoint is a stock model with 4 experts per layer (and the sparsity section): plain loading
    model = T.AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    assert model.config.num_experts == 4 and model.model.layers[1].mlp.gate.weight.shape[0] == 4
    assert getattr(model.config, SPARSITY_KEY)["keep_masks"] is True
    assert load_usage(out / "checkpoint-4" / USAGE_FILE)["num_experts"] == 4
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(12)[None]).logits).all()

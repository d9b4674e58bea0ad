"""``launch/compress.py --method`` end to end (issue #13): every method and two compositions compress the tiny
Qwen3-MoE with a calibration at half the expert bytes, load (stock ones with plain ``from_pretrained``, factorised
ones with ``moe_ds.checkpoint.load_model``), store what ``moe_ds.budget`` says and evaluate; known answers on
planted models (full-rank low-rank forms, a never-routed expert, identical experts at top-1, magnitude's exact zero
count); a killed run resumes; bad settings are one line and exit 2; and (slow) 2 ranks equal 1 and the results
distil under ZeRO-3. The byte arithmetic itself is tests/test_budget.py's; the pieces' maths are tested in
test_expert_pruning.py, test_lowrank.py and test_sparsity.py."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, launcher_env, load_launcher, tiny_config, tiny_model
from test_activation_objective import write_calibration
from test_budget import next_step
from moe_ds.budget import ExpertPlan
from moe_ds.checkpoint import is_compressed_checkpoint, load_model
from moe_ds.cli import run
from moe_ds.compress import FACTORS_DIR, CompressConfig, compress
from moe_ds.evaluate import TaskResolver, evaluate_model

E, D, I = 6, 32, 24  # the tiny Qwen3-MoE (conftest.tiny_config, top-2): experts, hidden, expert intermediate
LAYER_BYTES = E * 3 * D * I * 4  # one layer's routed experts in fp32

# --method at --target-ratio 0.5: (extra settings, experts kept, rank or density) solved by hand
# (tests/test_budget.py::test_budgets_at_the_tiny_shape; compositions with 4 experts: shared core
# 2304 + 4·2r·168 ≤ 6912 → r = 3, lowrank 4·r·168 ≤ 6912 → r = 10).
AT_HALF = {
    "shared_core": ({"steps": 10}, 6, 2),
    "lowrank": ({}, 6, 6),
    "delta": ({}, 6, 4),
    "prune": ({}, 3, None),
    "merge": ({}, 3, None),
    "magnitude": ({}, 6, 0.46875),  # 0.5 − 1/32: the bitmap takes 1 bit of every 32
    "prune,shared_core": ({"num_experts": 4, "steps": 10}, 4, 3),
    "merge,lowrank": ({"num_experts": 4}, 4, 10),
}
STOCK = ("prune", "merge", "magnitude")
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))


def folder(method: str) -> str:
    return method.replace(",", "+")


def plan_of(method: str) -> ExpertPlan:
    """The hand-solved plan of AT_HALF[method] (the budget the checkpoint must report)."""
    _, kept, setting = AT_HALF[method]
    weight = method.split(",")[-1] if method not in ("prune", "merge") else None
    if weight == "magnitude":
        return ExpertPlan(E, D, I, kept, weight, density=setting, value_bytes=4)
    return ExpertPlan(E, D, I, kept, weight, rank=setting or 0, value_bytes=4)


def stats_of(path: Path) -> dict:
    return yaml.safe_load((path / "compression_statistics.yaml").read_text())


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, sharded or in one model.safetensors."""
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(path / name, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def timeless(stats):
    """compression_statistics.yaml without the fit's wall-clock seconds."""
    if isinstance(stats, dict):
        return {k: timeless(v) for k, v in stats.items() if k != "seconds"}
    return stats


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(path: Path):
    """A stock checkpoint by plain from_pretrained (no moe-ds code), a factorised one by moe-ds's loader."""
    if is_compressed_checkpoint(path):
        return load_model(path)
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def compress_with(root: Path, model: Path, method: str, out: Path | None = None, **kw) -> Path:
    out = out or root / folder(method)
    extra, _, _ = AT_HALF.get(method, ({}, None, None))
    compress(CompressConfig(model=str(model), output=str(out), method=method, calibration=str(root / "cal"),
                            **{"target_ratio": 0.5, **extra, **kw}))
    return out


FULL_RANK = ("lowrank", "delta")  # also compressed at rank min(d, I) = 24 into "<form>-full"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_lm_dir, stdlib_text) -> Path:
    """A calibration of the tiny teacher (random ids), every AT_HALF method compressed at 0.5, the low-rank forms at
    full rank, and two short held-out documents."""
    root = tmp_path_factory.mktemp("methods")
    write_calibration(root / "cal", tiny_lm_dir)
    for method in AT_HALF:
        compress_with(root, tiny_lm_dir, method)
    for form in FULL_RANK:
        compress_with(root, tiny_lm_dir, form, root / f"{form}-full", target_ratio=None, rank=24, allow_larger=True)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": stdlib_text[-i - 400:-i]}) + "\n"
                                                for i in (1, 401)))
    return root


def byte_perplexities(models: dict[str, Path], text: Path) -> dict[str, float]:
    """moe_ds.evaluate's perplexity task (lm-eval's rolling log-likelihood) of each model on ``text``."""
    resolver = TaskResolver(("perplexity",), ppl_file=str(text))
    try:
        records = {name: evaluate_model(path, resolver, batch_size="2") for name, path in models.items()}
    finally:
        resolver.close()
    assert all(r["status"] == "ok" for r in records.values()), {n: r["error"] for n, r in records.items()}
    return {name: r["tasks"]["perplexity"]["metrics"]["byte_perplexity"] for name, r in records.items()}


# ------------------------------------------------------------------------------- every method, in one process

@pytest.mark.parametrize("method", list(AT_HALF))
def test_every_method_writes_a_loadable_checkpoint_at_its_byte_budget(method, runs, tiny_lm_dir):
    out, plan = runs / folder(method), plan_of(method)
    _, kept, setting = AT_HALF[method]
    stats = stats_of(out)
    # the bytes the statistics report are the budget's, within the target
    if method == "shared_core":  # the plain shared core keeps its own statistics layout
        ratio = stats["bytes"]["experts_compressed"] / stats["bytes"]["experts_original"]
        assert stats["bytes"]["experts_original"] == 2 * LAYER_BYTES
    else:
        ratio = stats["expert_bytes"]["ratio"]
        assert stats["expert_bytes"]["original"] == 2 * LAYER_BYTES
        assert stats["expert_bytes"]["compressed"] == 2 * plan.bytes()
        assert stats["method"] == method and stats["kept_experts"] == kept
        assert (stats["density"] if method == "magnitude" else stats["rank"]) == setting
    assert ratio == pytest.approx(plan.ratio(), rel=1e-12) and ratio <= 0.5
    assert next_step(plan) > LAYER_BYTES // 2  # rank + 1, one more expert or more kept weights would not fit

    # stock methods load with plain transformers; factorised ones with moe-ds's loader, in their form
    assert is_compressed_checkpoint(out) == (method not in STOCK)
    model = load(out)
    assert model.config.num_experts == kept
    experts = model.model.layers[1].mlp.experts
    assert model.model.layers[1].mlp.gate.weight.shape == (kept, D)
    if method in STOCK:
        assert experts.gate_up_proj.shape == (kept, 2 * I, D) and experts.down_proj.shape == (kept, D, I)
    else:
        # (the shared core is written as format version 1, whose section has no form)
        assert model.config.shared_core.get("form", "shared_core") == method.split(",")[-1]
        assert model.config.shared_core["ranks"] == {p: setting for p in ("gate", "up", "down")}
    assert torch.isfinite(logits(model)).all()

    # per layer: the experts' output error on the calibration's held-out tokens, and for a structural step the
    # experts behind each new one and how many held-out tokens keep their experts
    for layer in (0, 1):
        assert math.isfinite(stats["output_error"][layer]) and stats["output_error"][layer] > 0
        assert 0 < stats["routing"][layer]["normalized_entropy"] <= 1
    if method.split(",")[0] in ("prune", "merge"):
        for layer in (0, 1):
            entry = stats["layers"][layer]
            assert 0 <= entry["routing_agreement"] <= 1
            groups = entry["experts"]
            assert len(groups) == kept
            members = sorted(sum(groups, []))
            if method.startswith("merge"):
                assert members == list(range(E))  # a partition of the original experts
            else:
                assert len(members) == kept == len(set(members)) and all(len(g) == 1 for g in groups)
        if method == "prune":  # the kept experts and router rows, unchanged, in the order the statistics name
            teacher = T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).model.layers
            for layer in (0, 1):
                ids = [g[0] for g in stats["layers"][layer]["experts"]]
                old, new = teacher[layer].mlp, model.model.layers[layer].mlp
                assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[ids])
                assert torch.equal(new.experts.down_proj, old.experts.down_proj[ids])
                assert torch.equal(new.gate.weight, old.gate.weight[ids])
    else:
        assert "layers" not in stats
    assert (out / "tokenizer.json").is_file() and not (out / FACTORS_DIR).exists()


def test_every_checkpoint_evaluates(runs, tiny_lm_dir):
    """The evaluator (moe_ds.evaluate, lm-eval perplexity) reads every method's checkpoint; the full-rank low-rank
    forms score the teacher's perplexity, the half-size ones another."""
    models = {"teacher": tiny_lm_dir, **{m: runs / folder(m) for m in AT_HALF},
              **{f"{f}-full": runs / f"{f}-full" for f in FULL_RANK}}
    ppl = byte_perplexities(models, runs / "heldout.jsonl")
    assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    for form in FULL_RANK:
        assert ppl[f"{form}-full"] == pytest.approx(ppl["teacher"], rel=1e-5)
    assert all(ppl[m] != ppl["teacher"] for m in AT_HALF), ppl


# ------------------------------------------------------------------------------- known answers

@pytest.mark.parametrize("form", FULL_RANK)
def test_a_low_rank_form_at_full_rank_reproduces_the_teacher(form, runs, tiny_lm_dir):
    """Rank min(d, I) = 24: the truncated (whitened) SVD is exact, so the logits are the teacher's (fp32 rounding)."""
    out = runs / f"{form}-full"
    student, teacher = load(out), T.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    assert student.config.shared_core["form"] == form
    assert (logits(student) - logits(teacher)).abs().max() < 1e-4
    stats = stats_of(out)
    # E·24·168 values (+ the base 3dI) against E·3dI: 1.75 (1.92 with the base), allowed by allow_larger
    assert stats["expert_bytes"]["ratio"] == pytest.approx((3 * D * I if form == "delta" else 0) / (E * 3 * D * I)
                                                           + 24 * 168 / (3 * D * I))
    assert all(stats["output_error"][layer] < 1e-5 for layer in (0, 1))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Two planted tiny Qwen3-MoE models, each with its calibration (random ids):

    dead/: expert 3 is never routed: hidden component 0 is positive in every token (embedding column 0 = 0.1
    against N(0, 0.02²) elsewhere), only expert 3's router row reads it, with weight −100;
    twins/: top-1 routing; experts 0 and 3 are copies (weights and router row)."""
    root = tmp_path_factory.mktemp("planted")
    dead = tiny_model("qwen3_moe")
    with torch.no_grad():
        dead.model.embed_tokens.weight[:, 0] = 0.1
        for layer in dead.model.layers:
            gate = layer.mlp.gate
            gate.weight[:, 0] = 0.0
            gate.weight[3] = 0.0
            gate.weight[3, 0] = -100.0
    dead.save_pretrained(root / "dead")
    config = tiny_config("qwen3_moe")
    config.num_experts_per_tok = 1
    twins = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in twins.model.layers:
            gate, experts = layer.mlp.gate, layer.mlp.experts
            gate.weight.normal_(0.0, 0.5)
            gate.weight[3] = gate.weight[0]
            experts.gate_up_proj[3] = experts.gate_up_proj[0]
            experts.down_proj[3] = experts.down_proj[0]
    twins.save_pretrained(root / "twins")
    for name in ("dead", "twins"):
        write_calibration(root / name / "cal", root / name)
    return root


def test_pruning_a_never_routed_expert_leaves_the_logits(planted, tmp_path):
    src = planted / "dead"
    for layer in (0, 1):
        with safe_open(src / "cal" / f"layer-{layer:05d}.safetensors", framework="pt") as f:
            tokens = f.get_tensor("tokens")
        assert tokens[3] == 0 and (tokens > 0).sum() == 5  # the premise: expert 3 unused, the others used
    out = tmp_path / "pruned"
    compress(CompressConfig(model=str(src), output=str(out), method="prune", target_ratio=5 / 6,
                            calibration=str(src / "cal")))
    pruned, original = load(out), T.AutoModelForCausalLM.from_pretrained(src).eval()
    assert pruned.config.num_experts == 5
    assert (logits(pruned) - logits(original)).abs().max() < 1e-4
    stats = stats_of(out)
    for layer in (0, 1):
        assert stats["layers"][layer] == {"experts": [[0], [1], [2], [4], [5]], "routing_agreement": 1.0}
        assert stats["output_error"][layer] < 1e-5
    assert stats["expert_bytes"]["ratio"] == pytest.approx(5 / 6)


def test_merging_identical_experts_at_top_1_is_exact(planted, tmp_path):
    src = planted / "twins"
    out = tmp_path / "merged"
    compress(CompressConfig(model=str(src), output=str(out), method="merge", target_ratio=5 / 6,
                            calibration=str(src / "cal")))
    merged, original = load(out), T.AutoModelForCausalLM.from_pretrained(src).eval()
    assert merged.config.num_experts == 5 and merged.config.num_experts_per_tok == 1
    assert (logits(merged) - logits(original)).abs().max() < 1e-5
    stats = stats_of(out)
    for layer in (0, 1):
        assert [0, 3] in stats["layers"][layer]["experts"] and len(stats["layers"][layer]["experts"]) == 5
        assert stats["layers"][layer]["routing_agreement"] == 1.0
        assert stats["output_error"][layer] < 1e-5


def test_magnitude_zeros_exactly_the_budgeted_weights(runs, tiny_lm_dir):
    """Every (layer, projection) keeps ⌊4608 · 0.46875⌋ = 2160 of its 4608 weights, the largest |w|; the bitmap
    storage of that is exactly half the original bytes; the config tells distillation to keep the zeros."""
    out = runs / "magnitude"
    numel, kept = E * D * I, 2160
    assert kept == math.floor(numel * AT_HALF["magnitude"][2])
    assert 3 * kept * 4 + 3 * numel // 8 == LAYER_BYTES // 2
    original, pruned = load(tiny_lm_dir), load(out)
    for layer in (0, 1):
        w0, w1 = original.model.layers[layer].mlp.experts, pruned.model.layers[layer].mlp.experts
        for before, after in ((w0.gate_up_proj[:, :I], w1.gate_up_proj[:, :I]),
                              (w0.gate_up_proj[:, I:], w1.gate_up_proj[:, I:]), (w0.down_proj, w1.down_proj)):
            zero = after == 0
            assert int(zero.sum()) == numel - kept
            assert torch.equal(after[~zero], before[~zero])  # the kept weights are untouched
            assert before[zero].abs().max() <= before[~zero].abs().min()  # and they are the largest
    section = json.loads((out / "config.json").read_text())["moe_ds_sparsity"]
    assert section["keep_masks"] is True and section["nnz"] == 2 * 3 * kept and section["numel"] == 2 * 3 * numel
    assert section["bytes"] == LAYER_BYTES == 2 * LAYER_BYTES // 2


# ------------------------------------------------------------------------------- resume and refusals

@pytest.mark.parametrize("method", ["merge", "prune"])
def test_a_killed_structural_run_resumes_to_the_same_result(method, runs, tiny_lm_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "resumed"
    monkeypatch.setenv("MOE_DS_COMPRESS_STOP_AFTER", "1")
    with pytest.raises(SystemExit, match="stopping after 1 layer"):
        compress_with(runs, tiny_lm_dir, method, out)
    assert not (out / "config.json").exists()  # not a loadable model yet
    assert [p.name for p in (out / FACTORS_DIR).glob("layer-*.safetensors")] == ["layer-00000.safetensors"]
    monkeypatch.delenv("MOE_DS_COMPRESS_STOP_AFTER")
    with caplog.at_level(logging.INFO, logger="moe_ds"):
        compress_with(runs, tiny_lm_dir, method, out)
    assert "layer 0 already done, skipping" in caplog.text
    full, resumed = read_all(runs / folder(method)), read_all(out)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert timeless(stats_of(out)) == timeless(stats_of(runs / folder(method)))


# (arguments after --model and --output, the one-line message after "compress: error: "); {c}: the calibration
BAD = {
    "prune without a calibration": (["--method", "prune", "--target-ratio", "0.5"],
                                    "method 'prune' chooses experts from calibration statistics: give --calibration "
                                    "(a folder written by launch/calibrate.py)"),
    "merge,lowrank without a calibration": (["--method", "merge,lowrank", "--num-experts", "4", "--rank", "2"],
                                            "method 'merge,lowrank' chooses experts from calibration statistics: "
                                            "give --calibration (a folder written by launch/calibrate.py)"),
    "prune below top-k": (["--method", "prune", "--target-ratio", "0.25", "--calibration", "{c}"],
                          "target ratio 0.25 keeps 1 of 6 experts, fewer than top-k = 2; the smallest ratio pruning "
                          "or merging can reach is 0.3333"),
    "merge below top-k": (["--method", "merge", "--num-experts", "1", "--calibration", "{c}"],
                          "merge to 1 expert(s): needs top-k (2) <= experts <= 6"),
    "magnitude below the bitmap": (["--method", "magnitude", "--target-ratio", "0.03125"],
                                   "target ratio 0.03125 leaves no room for values: the bitmap index alone is 0.0312 "
                                   "of the original bytes"),
    "magnitude above the original": (["--method", "magnitude", "--sparsity", "0"],
                                     "magnitude stores 1.03x the original expert bytes (E=6, d=32, I=24); pick a "
                                     "smaller --rank or a --target-ratio, or pass --allow-larger"),
    "lowrank below rank 1": (["--method", "lowrank", "--target-ratio", "0.05"],
                             "target ratio 0.05 is below the smallest lowrank: rank 1 stores 0.0729 of the original "
                             "expert bytes (rank 0 would store no experts at all)"),
    "lowrank at rank 0": (["--method", "lowrank", "--rank", "0"],
                          "method 'lowrank' at rank 0 stores no experts at all (every expert would output zero); "
                          "give --rank >= 1"),
    "prune_threshold with merge": (["--method", "merge", "--prune-threshold", "0.1", "--calibration", "{c}"],
                                   "prune_threshold applies to method prune only"),
    "save dtype of a stock method": (["--method", "prune", "--target-ratio", "0.5", "--save-dtype", "bfloat16",
                                      "--calibration", "{c}"],
                                     "method 'prune' writes a stock checkpoint in the original's dtype; --save-dtype "
                                     "bfloat16 applies to factorised methods only"),
    "save dtype of magnitude": (["--method", "magnitude", "--target-ratio", "0.5", "--save-dtype", "float16"],
                                "method 'magnitude' writes a stock checkpoint in the original's dtype; --save-dtype "
                                "float16 applies to factorised methods only"),
    "composition without the experts kept": (["--method", "prune,shared_core", "--target-ratio", "0.5",
                                              "--calibration", "{c}"],
                                             "method 'prune,shared_core': give the experts kept per layer "
                                             "(num_experts, or prune_threshold for prune) as well as the shared_core "
                                             "budget"),
    "weight step first": (["--method", "lowrank,merge", "--num-experts", "4", "--rank", "2"],
                          "method 'lowrank,merge': the structural step (merge) comes first, e.g. merge,lowrank"),
    "two budgets for magnitude": (["--method", "magnitude", "--target-ratio", "0.5", "--sparsity", "0.5"],
                                  "method 'magnitude': give exactly one of target_ratio and sparsity (got "
                                  "target_ratio=0.5, sparsity=0.5)"),
    "a rank for prune": (["--method", "prune", "--target-ratio", "0.5", "--rank", "4", "--calibration", "{c}"],
                         "method 'prune' does not take rank"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_method_settings_are_one_line_exit_2_and_write_nothing(case, runs, tiny_lm_dir, tmp_path, capsys):
    args, message = BAD[case]
    args = [a.format(c=runs / "cal") for a in args]
    module = load_launcher("compress")
    argv = ["--model", str(tiny_lm_dir), "--output", str(tmp_path / "out"), *args]
    code = run("compress", lambda: module.main(argv), errors=module.ERRORS)
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"compress: error: {message}"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- launchers (slow)

def deepspeed_cmd(script: str, *args) -> list[str]:
    from moe_ds.dist import free_port

    return [str(Path(sys.executable).parent / "deepspeed"), "--include", "localhost:0,1", "--master_port",
            str(free_port()), str(REPO / "launch" / script), *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["merge", "lowrank"])
def test_two_ranks_write_the_same_checkpoint_as_one_process(method, runs, tiny_lm_dir, tmp_path):
    out = tmp_path / "two"
    cmd = deepspeed_cmd("compress.py", "--model", tiny_lm_dir, "--output", out, "--method", method,
                        "--target-ratio", 0.5, "--calibration", runs / "cal")
    p = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[rank 1]" in p.stdout + p.stderr
    one, two = read_all(runs / folder(method)), read_all(out)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert timeless(stats_of(out)) == timeless(stats_of(runs / folder(method)))


@pytest.mark.slow
def test_stock_and_factorised_checkpoints_distil_under_zero3(runs, tiny_lm_dir, tmp_path):
    """A merged (stock) and a delta (factorised) student, 2 steps each of 2-rank ZeRO-3 distillation from a cache of
    the teacher; each result keeps its experts and form, trained, and evaluates."""
    from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher

    data = tmp_path / "data.jsonl"
    data.write_text((runs / "heldout.jsonl").read_text() * 4)
    cache_teacher(CacheTeacherConfig(teacher=str(tiny_lm_dir), data=str(data), output=str(tmp_path / "cache.h5"),
                                     top_k=8, seq_len=32, max_sequences=8))
    env = launcher_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for method, kept in (("merge", 3), ("delta", 6)):
        student, out = runs / folder(method), tmp_path / method
        cmd = deepspeed_cmd("distill.py", "--deepspeed", REPO / "ds_configs" / "zero3.json", "--student", student,
                            "--teacher-cache", tmp_path / "cache.h5", "--output", out, "--max-steps", 2,
                            "--save-steps", 2, "--logging-steps", 1, "--batch-size", 2, "--learning-rate", 1e-2,
                            "--report-to", "none")
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, method + p.stdout[-3000:] + p.stderr[-3000:]
        final = out / "checkpoint-2"
        assert is_compressed_checkpoint(final) == (method == "delta")
        model = load(final)
        assert model.config.num_experts == kept
        if method == "delta":
            assert model.config.shared_core["form"] == "delta"
        before, after = read_all(student), read_all(final)
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before if ".experts." in k), method  # trained
        assert torch.isfinite(logits(model)).all()
        ppl = byte_perplexities({method: final}, runs / "heldout.jsonl")[method]
        assert math.isfinite(ppl) and ppl > 1

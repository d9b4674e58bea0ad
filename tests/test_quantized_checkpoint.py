"""Quantized checkpoints (#14): writing, loading everywhere (our loader, trust_remote_code in a fresh process, the
lm_eval CLI), dense export, byte accounting and refusals."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from conftest import FAMILIES, tiny_model
from moe_ds import quantize as qz
from moe_ds.arch import get_architecture
from moe_ds.checkpoint import (CheckpointError, compress_model, export_dense, export_dequantized,
                               is_compressed_checkpoint, is_quantized_checkpoint, load_model, read_tensors,
                               read_weight_map, save_compressed)
from moe_ds.expert_pruning import select_experts_on_disk
from moe_ds.modeling_shared_core import ENTRY_NAMES, QuantizedLoadError
from moe_ds.quantized_checkpoint import TRANSPOSED, QuantizedCheckpointError, quantize_checkpoint

RANKS = {"gate": 3, "up": 5, "down": 4}
SPEC = "int4-g8"  # the tiny models' d = 32 and I = 24: g8 divides both


def stored(qdir: Path) -> dict[str, torch.Tensor]:
    """{key: dequantize(unpack(entries)) in float32, in the parameter's own orientation} for every packed key."""
    section = json.loads((qdir / "config.json").read_text())["moe_ds_quantization"]
    weight_map = read_weight_map(qdir)
    out = {}
    for key in section["tensors"]:
        names = [f"{key}.{e}" for e in ENTRY_NAMES if f"{key}.{e}" in weight_map]
        t = read_tensors(qdir, weight_map, names)
        w = qz.dequantize(qz.unpack({n.rpartition(".")[2]: v for n, v in t.items()}), torch.float32)
        out[key] = w.transpose(-1, -2) if re.search(TRANSPOSED, key) else w
    return out


def in_memory(model, key: str) -> torch.Tensor:
    """The loaded model's tensor for a stored key (a stock per-expert key is its slice of the fused experts)."""
    arch = get_architecture(model.config.model_type)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", key)
    if m is None:
        return model.state_dict()[arch.disk_to_memory(key)]
    layer, e = int(m.group(1)), int(m.group(2))
    proj = {v: k for k, v in arch.disk_proj_names.items()}[m.group(3)]
    experts = model.get_submodule(f"model.layers.{layer}.{arch.moe_block}.{arch.experts}")
    i = experts.gate_up_proj.shape[1] // 2
    return {"gate": experts.gate_up_proj[e, :i], "up": experts.gate_up_proj[e, i:],
            "down": experts.down_proj[e]}[proj]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Unquantized sources: a shared-core, a lowrank and a pruned stock checkpoint of the tiny Qwen3-MoE."""
    root = tmp_path_factory.mktemp("q")
    teacher = tiny_model("qwen3_moe")
    teacher.save_pretrained(root / "stock")
    model = compress_model(teacher, RANKS, method="mean")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3:
                p.normal_(0.0, 0.2)
    save_compressed(model, root / "shared_core")
    save_compressed(compress_model(teacher, RANKS, form="lowrank"), root / "lowrank")
    select_experts_on_disk(root / "stock", root / "pruned", {0: torch.tensor([0, 2, 3, 5]), 1: torch.tensor([1, 2, 3, 4])})
    return root


@pytest.mark.parametrize("kind", ["shared_core", "lowrank", "pruned"])
def test_loaded_tensors_are_exactly_the_dequantized_packed_ones(sources, tmp_path, kind):
    q = quantize_checkpoint(sources / kind, tmp_path / "q", experts=SPEC, router="int8")
    section = json.loads((q / "config.json").read_text())["moe_ds_quantization"]
    assert (section["experts"], section["router"], section["attention"]) == ("int4-g8", "int8", None)
    assert "quantization_config" not in json.loads((q / "config.json").read_text())
    packed = stored(q)
    roles = {"experts": 0, "router": 0}
    for key in packed:
        roles["router" if key.endswith("mlp.gate.weight") else "experts"] += 1
    assert roles["router"] == 2 and roles["experts"] >= 6
    source = read_tensors(sources / kind, read_weight_map(sources / kind), list(packed))
    model = load_model(q)
    for key, w in packed.items():
        assert torch.equal(in_memory(model, key), w), key
        assert not torch.equal(w, source[key]), key  # really quantized ...
        bound = source[key].abs().max() / 7 * 0.5 * 1.01  # s/2, s = max|w|/7 rounded up to bf16 (int8: /127)
        assert (w - source[key]).abs().max() <= bound, key
    # every tensor not packed is the source's, unchanged
    plain = read_tensors(sources / kind, read_weight_map(sources / kind),
                         [k for k in read_weight_map(sources / kind) if k not in packed])
    for key, t in plain.items():
        assert torch.equal(in_memory(model, key), t), key
    assert "moe_ds_quantization" not in model.config.to_dict()  # the model in memory is dequantized
    # bf16 load: each parameter is dequantize(..., bf16) of the same entries, no float32 left
    bf = load_model(q, dtype=torch.bfloat16, device_map={"": "cpu"} if kind != "pruned" else "auto")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    for key, w in packed.items():
        assert torch.equal(in_memory(bf, key), w.to(torch.bfloat16)), key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_stock_checkpoint_with_attention_round_trips(family, tmp_path):
    """Stock per-expert keys (Mixtral's block_sparse_moe.*.w1/w2/w3 too), routers and attention (int8 per channel)
    load as exactly the dequantized entries; DeepSeek-V3's e_score_correction_bias stays float32 in bf16."""
    tiny_model(family).save_pretrained(tmp_path / "src")
    q = quantize_checkpoint(tmp_path / "src", tmp_path / "q", experts=SPEC, router="int8", attention="int8")
    packed = stored(q)
    model = load_model(q)
    roles = json.loads((q / "config.json").read_text())["moe_ds_quantization"]["tensors"]
    assert any("self_attn" in k for k in roles) and any(k.endswith("gate.weight") for k in roles)
    for key, w in packed.items():
        assert torch.equal(in_memory(model, key), w), key
    bias = [b for n, b in load_model(q, dtype=torch.bfloat16).named_buffers() if n.endswith("e_score_correction_bias")]
    assert all(b.dtype == torch.float32 for b in bias) and len(bias) == (2 if family == "deepseek_v3" else 0)


def test_fake_quantization_as_stored_equals_the_loaded_checkpoint(sources, tmp_path):
    """What QAT trains through (fake_quantize_as_stored, per parameter name) is what the written checkpoint loads."""
    from moe_ds.quantized_checkpoint import fake_quantize_as_stored

    model = load_model(sources / "shared_core")
    loaded = load_model(quantize_checkpoint(sources / "shared_core", tmp_path / "q", experts=SPEC, router=None))
    experts = dict(loaded.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            w = p.detach().clone().requires_grad_(True)
            fq = fake_quantize_as_stored(name, w, SPEC)
            assert torch.equal(fq, experts[name]), name
            fq.sum().backward()
            assert torch.equal(w.grad, torch.ones_like(w))  # range max: nothing clipped, gradient passes whole
            checked += 1
    assert checked == 2 * 3 * 5


def test_stock_result_is_its_own_model_type_and_plain_auto_refuses_it(sources, tmp_path):
    q = quantize_checkpoint(sources / "pruned", tmp_path / "q", experts=SPEC, router=None)
    config = json.loads((q / "config.json").read_text())
    assert config["model_type"] == "quantized_qwen3_moe"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_shared_core.QuantizedQwen3MoeForCausalLM"
    assert (q / "quantize.py").read_bytes() == Path(qz.__file__).read_bytes()
    with pytest.raises(ValueError, match="trust_remote_code"):
        T.AutoModelForCausalLM.from_pretrained(q, trust_remote_code=False)
    model = load_model(q)
    assert type(model) is T.Qwen3MoeForCausalLM and model.config.num_experts == 4
    assert model.get_submodule("model.layers.0.mlp.gate").weight.dtype == torch.float32  # router kept


FRESH = r"""
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
root = Path(sys.argv[1])
ref = load_file(root / "expected.safetensors")
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(root / name, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith(("transformers_modules", "transformers.models")), type(model)
    with torch.no_grad():
        err = (model(ref["ids"]).logits - ref[name]).abs().max().item()
    print(name, type(model).__name__, err)
    assert err == 0, (name, err)
assert "moe_ds" not in sys.modules and "deepspeed" not in sys.modules  # the shipped files need neither
print("OK")
"""


def test_trust_remote_code_in_a_fresh_process_and_dense_export(sources, tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(0, 300, (2, 7))
    expected = {"ids": ids}
    for kind in ("shared_core", "pruned"):
        q = quantize_checkpoint(sources / kind, tmp_path / kind, experts=SPEC, router="int8")
        with torch.no_grad():
            expected[kind] = load_model(q)(ids).logits.contiguous()
        export_dense(q, tmp_path / f"{kind}_dense")  # dequantized, stock, plain from_pretrained
        dense = T.AutoModelForCausalLM.from_pretrained(tmp_path / f"{kind}_dense", dtype=torch.float32)
        assert type(dense).__module__.startswith("transformers.models")
        with torch.no_grad():
            err = (dense(ids).logits - expected[kind]).abs().max().item()
        assert err == 0 if kind == "pruned" else err < 1e-5, (kind, err)  # the shared core's Ŵ = products
    save_file(expected, tmp_path / "expected.safetensors")
    out = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), "shared_core", "pruned"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_dequantized_twin_keeps_the_form_and_the_quantized_values(sources, tmp_path):
    """The QAT student of a quantized checkpoint: same form (factors stay factors), unpacked, exactly its logits."""
    ids = torch.randint(0, 300, (2, 7))
    for kind, compressed in (("shared_core", True), ("pruned", False)):
        q = quantize_checkpoint(sources / kind, tmp_path / kind, experts=SPEC, router="int8")
        twin = export_dequantized(q, tmp_path / f"{kind}_twin")
        assert not is_quantized_checkpoint(twin) and is_compressed_checkpoint(twin) == compressed
        with torch.no_grad():
            err = (load_model(twin)(ids).logits - load_model(q)(ids).logits).abs().max().item()
        assert err == 0, (kind, err)
        if compressed:  # the factor shapes are the source's, not a dense reconstruction
            shapes = {k: v.shape for k, v in load_model(twin).state_dict().items()}
            assert shapes == {k: v.shape for k, v in load_model(sources / kind).state_dict().items()}
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        export_dequantized(sources / "shared_core", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_statistics_count_the_packed_bytes_exactly(sources, tmp_path):
    q = quantize_checkpoint(sources / "stock", tmp_path / "q", experts=SPEC, router="int8")
    stats = yaml.safe_load((q / "compression_statistics.yaml").read_text())["quantization"]
    # by hand: 2 layers x 6 experts; gate/up [24, 32], down [32, 24]; int4-g8 with bf16 scales
    gate = 24 * (32 // 8) * 4 + 24 * (32 // 8) * 2  # 4-bit words + scales = 576
    down = 32 * (24 // 8) * 4 + 32 * (24 // 8) * 2  # 576
    assert stats["bytes"]["experts"] == {"original": 2 * 6 * 3 * 24 * 32 * 4, "quantized": 2 * 6 * (2 * gate + down),
                                         "tensors": 36, "ratio": 2 * 6 * (2 * gate + down) / (2 * 6 * 3 * 24 * 32 * 4)}
    assert stats["bytes"]["router"]["quantized"] == 2 * (6 * 32 + 6 * 2)  # int8 values + one bf16 scale per row
    assert stats["experts"] == "int4-g8" and stats["router"] == "int8"
    # and these are the bytes the files hold (weight_shape, 8 bytes per dim, is metadata)
    weight_map = read_weight_map(q)
    on_disk = {"experts": 0, "router": 0}
    for name, t in read_tensors(q, weight_map, list(weight_map)).items():
        base, _, entry = name.rpartition(".")
        if entry in ENTRY_NAMES and entry != "weight_shape" and base.endswith(".weight"):
            on_disk["router" if base.endswith("mlp.gate.weight") else "experts"] += t.numel() * t.element_size()
    assert on_disk == {"experts": stats["bytes"]["experts"]["quantized"],
                       "router": stats["bytes"]["router"]["quantized"]}


def test_bad_inputs_name_the_problem_and_write_nothing(sources, tmp_path):
    with pytest.raises(QuantizedCheckpointError, match=r"group size 16 does not divide .*experts\.0\.(gate|up|down)"
                                                       r"_proj\.weight .*\[8, 12, 24\]"):
        quantize_checkpoint(sources / "stock", tmp_path / "q", experts="int4-g16")
    with pytest.raises(QuantizedCheckpointError, match="unsupported quantized dtype 'int3'"):
        quantize_checkpoint(sources / "stock", tmp_path / "q", experts="int3-g8")
    with pytest.raises(QuantizedCheckpointError, match="already quantized"):
        quantize_checkpoint(quantize_checkpoint(sources / "stock", tmp_path / "q1", experts=SPEC), tmp_path / "q2")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q2").exists()
    with pytest.raises(QuantizedLoadError, match="not supported when loading a quantized"):
        load_model(tmp_path / "q1", load_in_8bit=True)


@pytest.mark.slow
def test_stock_lm_eval_cli_evaluates_a_quantized_checkpoint(tmp_path, tiny_tokenizer, stdlib_text):
    """`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True` on a quantized shared-core
    checkpoint agrees with our Python-API evaluation through moe-ds's loader."""
    import os

    from moe_ds.eval_tasks import render_local_tasks
    from moe_ds.evaluate import perplexity

    model = compress_model(tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer)), RANKS)
    save_compressed(model, tmp_path / "c", tokenizer=tiny_tokenizer)
    quantize_checkpoint(tmp_path / "c", tmp_path / "q", experts=SPEC)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": stdlib_text[i * 400:(i + 1) * 400]}) + "\n" for i in range(3)))
    ours = perplexity(tmp_path / "q", docs)
    tasks = render_local_tasks(tmp_path / "tasks", text_file=docs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'q'},trust_remote_code=True", "--tasks", tasks["perplexity"],
                          "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
                          "--output_path", str(tmp_path / "cli")], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"][tasks["perplexity"]]
    assert cli["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-5)
    assert cli["word_perplexity,none"] > 1


# ------------------------------------------------------------------------------------ launch/compress.py --quantize

E, D, I = 6, 32, 24  # the tiny Qwen3-MoE (fp32): experts, hidden, expert intermediate
ORIGINAL = 2 * E * 3 * D * I * 4  # both MoE layers' routed experts in fp32


def test_compress_quantize_buys_a_larger_shared_core_rank_at_the_same_bytes(tiny_lm_dir, tmp_path):
    """int4-g8 (0.75 bytes per value against 4): at 0.25 of the bytes the fp32 shared core affords rank 0
    (2304 + 6·336·r ≤ 3456 values), the quantized one rank 8 (0.75·(2304 + 6·336·r) ≤ 3456 bytes·4)."""
    from moe_ds.compress import CompressConfig, compress

    plain = compress(CompressConfig(model=str(tiny_lm_dir), output=str(tmp_path / "plain"), target_ratio=0.25,
                                    steps=2))
    quant = compress(CompressConfig(model=str(tiny_lm_dir), output=str(tmp_path / "q"), target_ratio=0.25, steps=2,
                                    quantize=SPEC))
    ranks = [json.loads((p / "config.json").read_text())["shared_core"]["ranks"]["gate"] for p in (plain, quant)]
    assert ranks == [0, 8]
    stats = yaml.safe_load((quant / "compression_statistics.yaml").read_text())["quantization"]
    assert (stats["experts"], stats["router"]) == ("int4-g8", "int8")  # the router defaults to int8
    expected = 2 * (3 * (24 * 4 * 4 + 24 * 4 * 2) + 3 * 2 * 6 * 8 * (4 * 4 + 4 * 2) + 3 * 2 * 6 * 8 * (3 * 4 + 3 * 2))
    # cores [24, 32] x2 and [32, 24]: 576 bytes each; U_in/V_in stored [6, 8, d_in], U_out/V_out [6, 8, d_out]
    assert stats["expert_bytes"] == {"original": ORIGINAL, "compressed": expected, "ratio": expected / ORIGINAL,
                                     "budget": expected}
    assert expected <= 0.25 * ORIGINAL
    model = load_model(quant)
    assert model.config.shared_core["ranks"] == {"gate": 8, "up": 8, "down": 8}
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 8))).logits).all()


def test_compress_prune_quantized_with_calibration_ranges(tiny_lm_dir, tmp_path):
    """prune alone under --quantize: the experts kept are the most whose packed bytes fit (3 of 6 at 0.1: 1728 bytes
    per int4-g8 expert, 5529.6 allowed per layer); -mse with a calibration weights the ranges by the inputs' RMS."""
    from test_activation_objective import write_calibration

    from moe_ds.compress import CompressConfig, compress

    cal = write_calibration(tmp_path / "cal", tiny_lm_dir)
    out = compress(CompressConfig(model=str(tiny_lm_dir), output=str(tmp_path / "p"), method="prune",
                                  target_ratio=0.1, calibration=str(cal), quantize=SPEC + "-mse",
                                  quantize_router="none"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "quantized_qwen3_moe" and config["moe_ds_quantization"]["calibration"] is True
    assert config["moe_ds_quantization"]["router"] is None
    stats = yaml.safe_load((out / "compression_statistics.yaml").read_text())
    assert stats["quantization"]["expert_bytes"]["compressed"] == 2 * 3 * 1728 <= 0.1 * ORIGINAL
    model = load_model(out)
    assert model.config.num_experts == 3
    # the weighted ranges differ from the unweighted ones on some group (same kept experts, same values otherwise)
    plain = compress(CompressConfig(model=str(tiny_lm_dir), output=str(tmp_path / "p2"), method="prune",
                                    target_ratio=0.1, calibration=str(cal), quantize=SPEC, quantize_router="none"))
    a, b = stored(out), stored(plain)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--model", "{q}"], "is a quantized checkpoint (moe_ds_quantization); compress its unquantized source"),
    (["--quantize", "int4-g16"], "--quantize int4-g16: group size 16 does not divide the input dimension K=24"),
    (["--quantize", "int3"], "--quantize int3: unsupported quantized dtype 'int3'"),
    (["--quantize-router", "int8"], "--quantize-router and --quantize-attention need --quantize"),
    (["--quantize", "int4-g8", "--quantize-router", "int8-g5"], "group size 5 does not divide"),
])
def test_compress_bad_quantization_is_one_line_exit_2_and_writes_nothing(args, message, tiny_lm_dir, tmp_path,
                                                                         capsys):
    from conftest import load_launcher

    from moe_ds.cli import run

    if "{q}" in args:
        q = quantize_checkpoint(tiny_lm_dir, tmp_path / "q", experts=SPEC)
        args = [a.format(q=q) for a in args]
    module = load_launcher("compress")
    argv = ["--model", str(tiny_lm_dir), "--output", str(tmp_path / "out"), "--target-ratio", "0.25", *args]
    code = run("compress", lambda: module.main(argv), errors=module.ERRORS)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_zero3_loading_partitions_and_holds_the_dequantized_values(sources, tmp_path, monkeypatch):
    """Under an active HfDeepSpeedConfig (ZeRO-3, one gloo rank in-process) the quantized stock and shared-core
    checkpoints load partitioned at construction, and gathered they equal our plain load."""
    import deepspeed.comm.torch

    from moe_ds.dist import free_port

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)  # CPU_DEEPSPEED.md
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    expected = {kind: load_model(quantize_checkpoint(sources / kind, tmp_path / kind, experts=SPEC))
                for kind in ("pruned", "shared_core")}
    ds_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                                   "train_batch_size": 1})
    try:
        for kind, ref in expected.items():
            model = load_model(tmp_path / kind)
            params = dict(model.named_parameters())
            assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # partitioned
            with deepspeed.zero.GatheredParameters(list(params.values())):
                for name, p in ref.named_parameters():
                    assert torch.equal(params[name].data, p.data), (kind, name)
    finally:
        del ds_config

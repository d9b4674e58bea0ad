"""The calibration stage (#12 part 1): statistics against a direct computation, the folder's reader and its named
errors, bad input, the structure choice at Qwen3-30B-A3B's shape, 2 ranks against 1, and a killed run's resume."""

import glob
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import REPO, launcher_env, load_launcher, run_killable, single_process_env, spy_on_loading, tiny_model
from moe_ds import calibrate as cal
from moe_ds.calibrate import CalibrateConfig, CalibrationError, calibrate, load_calibration
from moe_ds.cli import run
from moe_ds.corpus import load_corpus, pack_sequences

SMALL = {"num_sequences": 6, "seq_len": 32, "batch_size": 4, "heldout_tokens": 16, "save_every": 4}


def save_model(path: Path, family: str, tokenizer, seed: int = 0) -> Path:
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = tokenizer.eos_token_id, None, None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer, stdlib_text) -> Path:
    """corpus.jsonl and tiny models with their tokenizer: qwen3_moe, mixtral, deepseek_v3, and qwen3_moe of seed 1."""
    root = tmp_path_factory.mktemp("calibrate")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n"
                                               for i in range(0, 60_000, 3000)))
    for family in ("qwen3_moe", "mixtral", "deepseek_v3"):
        save_model(root / family, family, tiny_tokenizer)
    save_model(root / "qwen3_moe_seed1", "qwen3_moe", tiny_tokenizer, seed=1)
    return root


def config_for(root: Path, output: Path, family: str = "qwen3_moe", **kw) -> CalibrateConfig:
    return CalibrateConfig(model=str(root / family), data=str(root / "corpus.jsonl"), output=str(output),
                           **{**SMALL, **kw})


@pytest.fixture(scope="module")
def finished(root) -> Path:
    """A finished calibration of the tiny Qwen3-MoE (structure full), not to be changed by tests."""
    calibrate(config_for(root, root / "cal", structure="full"))
    return root / "cal"


# ----------------------------------------------------------------------------------------------- the maths

def naive_sums(x, ids, w, gate_up, down, act, structure: str) -> dict:
    """Token by token, slot by slot, in float64: the reference for ``add_experts``."""
    e_count, i = down.shape[0], down.shape[-1]
    d = x.shape[1]
    s = {"tokens": torch.zeros(e_count, dtype=torch.float64), "router_weight_sum": torch.zeros(e_count, dtype=torch.float64),
         "reap_sum": torch.zeros(e_count, dtype=torch.float64), "xx": torch.zeros(e_count, d, d, dtype=torch.float64),
         "hh": torch.zeros(e_count, i, i, dtype=torch.float64)}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < e_count:
                continue
            xt = x[t].double()
            h = act(gate_up[e, :i].double() @ xt) * (gate_up[e, i:].double() @ xt)
            f = down[e].double() @ h
            s["tokens"][e] += 1
            s["router_weight_sum"][e] += float(w[t, j])
            s["reap_sum"][e] += float(w[t, j]) * f.norm()
            s["xx"][e] += torch.outer(xt, xt)
            s["hh"][e] += torch.outer(h, h)
    out = {k: s[k] for k in ("tokens", "router_weight_sum", "reap_sum")}
    if structure == "full":
        out.update(gate_up_moment=s["xx"], down_moment=s["hh"])
    else:
        out.update(gate_up_shared=s["xx"].sum(0), down_shared=s["hh"].sum(0),
                   gate_up_diag=s["xx"].diagonal(dim1=1, dim2=2), down_diag=s["hh"].diagonal(dim1=1, dim2=2))
    return out


@pytest.mark.parametrize("structure", ["full", "shared_diag"])
def test_add_experts_equals_a_token_by_token_reference_and_ignores_dropped_slots(structure):
    e, d, i, k, n = 5, 6, 4, 2, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    ids = torch.randint(0, e, (n, k), generator=g)
    ids[::7, 1] = -1  # dropped slots
    w = torch.rand(n, k, generator=g)
    gate_up, down = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    rows = torch.full((n,), -1, dtype=torch.int64)
    rows[-3:] = torch.tensor([0, 1, 2])  # the last 3 tokens are held out
    sums = cal.new_sums(e, d, i, k, 3, structure, torch.device("cpu"), torch.float64)
    cal.add_experts(sums, x, ids, w, gate_up, down, F.silu, rows)
    want = naive_sums(x[:-3], ids[:-3], w[:-3], gate_up, down, F.silu, structure)
    for name, value in want.items():
        torch.testing.assert_close(sums[name], value, rtol=1e-10, atol=1e-10, msg=name)
    assert sums["tokens"].sum() == (ids[:-3] >= 0).sum()
    torch.testing.assert_close(sums["heldout_inputs"], x[-3:])
    assert torch.equal(sums["heldout_topk_ids"], ids[-3:])


def test_router_probabilities_are_softmax_or_normalised_sigmoid():
    logits = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(cal.router_probabilities(logits), logits.softmax(-1))
    p = cal.router_probabilities(logits, "sigmoid")
    torch.testing.assert_close(p, logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True))
    torch.testing.assert_close(p.sum(-1), torch.ones(7, dtype=torch.float64))


def test_heldout_rows_are_the_last_tokens_of_the_calibration_in_flattened_order():
    rows = cal.heldout_rows([2, 5], seq_len=4, total_tokens=24, heldout=6)  # positions 8..11 and 20..23
    assert rows.tolist() == [-1, -1, -1, -1, 2, 3, 4, 5]
    assert cal.heldout_rows([0], 4, 24, 0).tolist() == [-1] * 4


def test_routing_summary():
    s = cal.routing_summary(torch.tensor([50.0, 50.0, 0.0, 0.0]), 1)
    assert s == {"routing_entropy": pytest.approx(math.log(2)), "max_entropy": pytest.approx(math.log(4)),
                 "rare_expert_share": 0.5}
    assert cal.routing_summary(torch.ones(8), 2)["routing_entropy"] == pytest.approx(math.log(8))


def test_structure_sizes_at_qwen3_30b_a3b_shape():
    """E = 128, d = 2048, I = 768, 48 layers; the bf16 model holds 30,532,122,624 parameters (tests/test_stats.py)."""
    full = cal.structure_bytes(128, 2048, 768, 48, "full")
    shared = cal.structure_bytes(128, 2048, 768, 48, "shared_diag")
    model = 30_532_122_624 * 2
    assert full == 117_574_729_728 and round(full / 1e9, 1) == 117.6  # 19x the 10 % budget
    assert shared == 987_758_592 and shared < 0.1 * model / 6  # ~1 GB: 1.6 % of the model
    structure, why = cal.choose_structure("auto", 128, 2048, 768, 48, model)
    assert structure == "shared_diag"
    assert why == ("auto: full would exceed 10 % of the model's bytes; full moments 117.6 GB, shared_diag 987.8 MB, "
                   "model 61.1 GB (10 %: 6.1 GB)")
    assert cal.choose_structure("auto", 2, 16, 8, 1, 1_000_000)[0] == "full"  # 2,560 bytes of moments
    # Per SwiGLU expert full holds d² + I² >= 2/3 of its 3·d·I weights, in float32: never 10 % of an MoE's bytes.
    assert cal.structure_bytes(128, 2048, 768, 48, "full") > 1.3 * 48 * 128 * 3 * 2048 * 768 * 2
    assert cal.choose_structure("full", 128, 2048, 768, 48, model)[0] == "full"  # asked for: kept


# ----------------------------------------------------------------------------------------------- end to end

def reference_sums(model_dir: Path, corpus: str, cfg: CalibrateConfig) -> dict[int, dict]:
    """The statistics from the MoE blocks' inputs captured by plain forward hooks, the routers re-run on them, and
    ``naive_sums`` over the tokens not held out; the experts' outputs check f = Σ g·f_e on the way."""
    from moe_ds.modeling_shared_core import find_experts

    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    seqs = np.stack(list(pack_sequences(load_corpus(corpus).documents, tokenizer, cfg.seq_len, cfg.num_sequences)))
    experts = find_experts(model)
    seen = {layer: {"x": [], "out": []} for layer in experts}
    handles = []
    for layer, name in experts.items():
        block = model.get_submodule(name.rpartition(".")[0])
        handles.append(block.register_forward_hook(lambda m, a, o, layer=layer: seen[layer]["x"].append(a[0])))
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, o, layer=layer: seen[layer]["out"].append(o)))
    with torch.no_grad():
        for s in range(0, len(seqs), cfg.batch_size):  # the stage's batches: bit-identical hidden states
            model(torch.from_numpy(seqs[s:s + cfg.batch_size]).long())
        for h in handles:
            h.remove()
        result = {}
        n_keep = len(seqs) * cfg.seq_len - cfg.heldout_tokens
        for layer, name in experts.items():
            block, module = model.get_submodule(name.rpartition(".")[0]), model.get_submodule(name)
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[layer]["x"]])
            logits, weights, ids = block.gate(x)
            out = naive_sums(x[:n_keep], ids[:n_keep], weights[:n_keep], module.gate_up_proj, module.down_proj,
                             module.act_fn, cfg.structure)
            score = "sigmoid" if model.config.model_type == "deepseek_v3" else "softmax"
            probs = logits.double().softmax(-1) if score == "softmax" else logits.double().sigmoid()
            out["router_prob_sum"] = (probs / probs.sum(-1, keepdim=True))[:n_keep].sum(0)
            out["heldout_inputs"], out["heldout_topk_ids"] = x[n_keep:], ids[n_keep:]
            out["heldout_topk_weights"] = weights[n_keep:]
            # Σ_slots g·f_e(x) is what the experts module returned: the f behind reap_sum is the model's.
            y = torch.zeros_like(x)
            for t in range(len(x)):
                for j in range(ids.shape[1]):
                    e, i = int(ids[t, j]), module.intermediate_dim
                    h = module.act_fn(module.gate_up_proj[e, :i] @ x[t]) * (module.gate_up_proj[e, i:] @ x[t])
                    y[t] += weights[t, j] * (module.down_proj[e] @ h)
            torch.testing.assert_close(y, torch.cat(seen[layer]["out"]), rtol=1e-4, atol=1e-5)
            result[layer] = out
    return result


@pytest.mark.parametrize("family,structure", [("qwen3_moe", "full"), ("mixtral", "shared_diag"),
                                              ("deepseek_v3", "full")])
def test_statistics_equal_a_direct_computation(root, tmp_path, family, structure):
    cfg = config_for(root, tmp_path / "cal", family, structure=structure)
    manifest = calibrate(cfg)
    calibration = load_calibration(tmp_path / "cal", T.AutoConfig.from_pretrained(root / family), root / family)
    want = reference_sums(root / family, cfg.data, cfg)
    assert calibration.layers == sorted(want) == manifest["layers"]
    assert manifest["tokens"] == 6 * 32 - 16 and manifest["heldout_tokens"] == 16 and manifest["sequences"] == 6
    for layer, reference in want.items():
        got = calibration.layer(layer)
        assert torch.equal(got["tokens"], reference["tokens"])  # whole counts, exactly
        assert got["tokens"].sum() == manifest["tokens"] * manifest["top_k"]
        for name, value in reference.items():
            tol = {"rtol": 1e-5, "atol": 1e-6} if got[name].dtype != torch.int64 else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(got[name].double(), value.double(), **tol, msg=f"layer {layer} {name}")
        summary = manifest["routing"][str(layer)]
        assert summary == pytest.approx(cal.routing_summary(reference["tokens"], manifest["top_k"]))
    assert (tmp_path / "cal" / "expert_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cal" / cal.PARTIAL_DIR).exists()
    assert manifest["router_scores"] == ("sigmoid" if family == "deepseek_v3" else "softmax")


def test_model_is_read_onto_the_ranks_device(monkeypatch, root):
    spy = spy_on_loading(monkeypatch, {"": "cpu"})  # no GPU here: load where the map would have put it
    cfg = config_for(root, root / "unused")
    model = cal.load_model(cfg, root / "qwen3_moe", torch.device("cuda", 3))
    assert len(spy.calls) == 1 and spy.calls[0]["device_map"] == {"": torch.device("cuda", 3)}
    assert spy.calls[0]["dtype"] == torch.bfloat16 and model is spy.built[0]  # --dtype auto on a GPU
    assert spy.moved == []
    assert not (root / "unused").exists()


def test_rerun_of_a_finished_calibration_returns_at_once_and_changes_nothing(root, finished, caplog):
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    caplog.set_level("INFO", logger="moe_ds")
    t0 = time.time()
    manifest = calibrate(config_for(root, finished, structure="full"))
    assert time.time() - t0 < 10 and manifest == json.loads((finished / "calibration.json").read_text())
    assert f"{finished} is already a finished calibration of this configuration; nothing to do" in caplog.text
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before
    assert sorted(before) == ["calibrate_config.json", "calibration.json", "expert_usage.png",
                              "layer-00000.safetensors", "layer-00001.safetensors"]


# ----------------------------------------------------------------------------------------------- the reader

def _manifest(folder: Path, **changes) -> None:
    path = folder / "calibration.json"
    m = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            m.pop(key)
        else:
            m[key] = value
    path.write_text(json.dumps(m))


def _rewrite_layer(folder: Path, layer: int, **tensors) -> None:
    """Replace tensors of a layer file and record the new file in the manifest, so only its contents are wrong."""
    path = cal.layer_file(folder, layer)
    data = {**load_file(path), **tensors}
    save_file(data, path)
    m = json.loads((folder / "calibration.json").read_text())
    m["files"][path.name] = {"bytes": path.stat().st_size, "sha256": cal._sha256_file(path)}
    (folder / "calibration.json").write_text(json.dumps(m))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# damage -> (what it does to a copy of the finished folder, the one-line message; {c} is the copy, {r} the root)
DAMAGE = {
    "no manifest": (lambda c: (c / "calibration.json").unlink(),
                    "{c} holds no complete calibration: calibration.json is missing (an unfinished run resumes when "
                    "its command is run again)"),
    "manifest not JSON": (lambda c: (c / "calibration.json").write_text("{"),
                          "{c}/calibration.json is not a readable calibration manifest (Expecting property name "
                          "enclosed in double quotes: line 1 column 2 (char 1))"),
    "incomplete manifest": (lambda c: _manifest(c, layers=None, tokens=None),
                            "{c}/calibration.json is not a complete calibration manifest: it lacks layers, tokens"),
    "unknown format version": (lambda c: _manifest(c, format_version=2),
                               "{c}/calibration.json: calibration format version 2 is not known to this moe-ds (it "
                               "reads version 1)"),
    "missing layer file": (lambda c: (c / "layer-00001.safetensors").unlink(),
                           "{c}/layer-00001.safetensors is missing: the calibration of layer 1 is gone; recompute it"),
    "truncated layer file": (lambda c: os.truncate(c / "layer-00001.safetensors", 1000),
                             "{c}/layer-00001.safetensors holds 1000 bytes, not the {size} calibration.json "
                             "recorded: truncated or replaced; recompute the calibration"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_reader_names_each_damage(root, finished, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    size = (copy / "layer-00001.safetensors").stat().st_size
    act, message = DAMAGE[damage]
    act(copy)
    with pytest.raises(CalibrationError) as e:
        load_calibration(copy, T.AutoConfig.from_pretrained(root / "qwen3_moe"), root / "qwen3_moe")
    assert str(e.value) == message.format(c=copy, size=size)


def test_reader_names_damage_found_when_a_layer_is_read(root, finished, tmp_path):
    config = T.AutoConfig.from_pretrained(root / "qwen3_moe")
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    _flip_last_byte(copy / "layer-00001.safetensors")
    calibration = load_calibration(copy, config)  # sizes still match: found by the checksum when read
    assert calibration.layer(0)["tokens"].sum() > 0
    with pytest.raises(CalibrationError, match=rf"^{copy}/layer-00001.safetensors is corrupted: its sha256 \w{{16}}"
                                               r"\.\.\. differs from the one calibration.json recorded"):
        calibration.layer(1)
    with pytest.raises(CalibrationError, match=rf"^{copy}/calibration.json: the calibration holds no MoE layer 7 "
                                               r"\(it holds layers \[0, 1\]\)$"):
        calibration.layer(7)

    shutil.rmtree(copy)
    shutil.copytree(finished, copy)
    _rewrite_layer(copy, 1, gate_up_moment=torch.zeros(6, 32, 31))
    with pytest.raises(CalibrationError) as e:
        load_calibration(copy, config).layer(1)
    assert str(e.value) == (f"{copy}/layer-00001.safetensors: tensor 'gate_up_moment' is torch.float32 [6, 32, 31], "
                            "expected torch.float32 [6, 32, 32] for this model and structure full")

    _manifest(copy, files=None)  # a folder without checksums: an unreadable file is still named
    (copy / "layer-00000.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CalibrationError, match=rf"^{copy}/layer-00000.safetensors is not a readable safetensors file "
                                               r"\(.*\); it may be truncated or corrupted: recompute the calibration$"):
        load_calibration(copy, config).layer(0)


def test_reader_refuses_a_calibration_of_a_different_model(root, finished, tmp_path):
    mixtral = T.AutoConfig.from_pretrained(root / "mixtral")
    with pytest.raises(CalibrationError) as e:
        load_calibration(finished, mixtral)
    assert str(e.value) == (f"{finished}/calibration.json is a calibration of a different model ({root}/qwen3_moe: "
                            "model_type 'qwen3_moe' != 'mixtral')")
    qwen = T.AutoConfig.from_pretrained(root / "qwen3_moe")
    other = tmp_path / "other"  # same weights, another config.json: another fingerprint
    shutil.copytree(root / "qwen3_moe", other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "rope_theta": 1234.0}))
    with pytest.raises(CalibrationError) as e:
        load_calibration(finished, qwen, other)
    assert str(e.value) == (f"{finished}/calibration.json is a calibration of a different model ({root}/qwen3_moe): "
                            f"the fingerprint of {other} (config.json, weight file names and sizes) differs")
    with pytest.raises(CalibrationError) as e:  # same config and sizes, other weights
        load_calibration(finished, qwen, root / "qwen3_moe_seed1")
    assert str(e.value) == (f"{finished}/calibration.json is a calibration of a different model ({root}/qwen3_moe): "
                            f"{root}/qwen3_moe_seed1 has the same config and file sizes but other weights")
    assert load_calibration(finished, qwen, root / "qwen3_moe").structure == "full"


# ----------------------------------------------------------------------------------------------- bad input

def launcher():
    return load_launcher("calibrate")


@pytest.fixture(scope="module")
def bad_models(root) -> Path:
    """A dense (non-MoE) model, and the tiny Qwen3-MoE without its tokenizer."""
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(root / "dense")
    tiny_model("qwen3_moe").save_pretrained(root / "no_tokenizer")
    (root / "a_file").write_text("not a folder")
    return root


# (arguments replacing the defaults, the one-line message after "calibrate: error: "); {r} is the root folder
BAD = {
    "missing model": (["--model", "{r}/nope"], "model '{r}/nope' is not a directory (and not a Hub id of the form "
                      "org/name)"),
    "non-MoE model": (["--model", "{r}/dense"], "model type 'llama' is not supported by moe-ds; supported MoE types: "
                      "deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe"),
    "missing data": (["--data", "{r}/nope.jsonl"], "data path {r}/nope.jsonl does not exist"),
    "no sequences": (["--num-sequences", "0"], "num_sequences must be >= 1, got 0"),
    "negative held-out tokens": (["--heldout-tokens", "-1"], "heldout_tokens must be >= 0, got -1"),
    "held-out beyond half": (["--heldout-tokens", "200"], "--heldout-tokens 200 would hold out more than half of the "
                             "192 calibration tokens (6 sequences of 32); lower it"),
    "seq_len beyond positions": (["--seq-len", "512"], "--seq-len 512 exceeds the model's max_position_embeddings of "
                                 "256; lower --seq-len"),
    "output is a file": (["--output", "{r}/a_file"], "output {r}/a_file is a file, not a folder"),
    "output below a file": (["--output", "{r}/a_file/cal"], "cannot create output folder {r}/a_file/cal: {r}/a_file "
                            "is a file"),
    "unrelated output folder": (["--output", "{r}/qwen3_moe"], "{r}/qwen3_moe exists, is not empty and is not a "
                                "moe-ds calibration folder; pass --overwrite to replace it, or choose another --output"),
    "another configuration": (["--output", "{r}/cal", "--structure", "shared_diag"], "{r}/cal holds a calibration of "
                              "another configuration (different structure); pass --overwrite to replace it, or choose "
                              "another --output"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(root, finished, bad_models, tmp_path, capsys, case):
    args, message = BAD[case]
    defaults = {"--model": str(root / "qwen3_moe"), "--data": str(root / "corpus.jsonl"), "--output": str(tmp_path / "o"),
                "--num-sequences": "6", "--seq-len": "32", "--heldout-tokens": "16"}
    given = dict(zip(args[::2], [a.format(r=root) for a in args[1::2]]))
    argv = [x for kv in {**defaults, **given}.items() for x in kv]
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    code = run("calibrate", lambda: launcher().main(argv), errors=launcher().ERRORS)
    err = capsys.readouterr().err
    assert (code, err.splitlines()) == (2, [f"calibrate: error: {message.format(r=root)}"])
    assert not (tmp_path / "o").exists()
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_model_without_tokenizer_is_refused(bad_models, tmp_path, capsys):
    argv = ["--model", str(bad_models / "no_tokenizer"), "--data", str(bad_models / "corpus.jsonl"), "--output",
            str(tmp_path / "o")]
    code = run("calibrate", lambda: launcher().main(argv), errors=launcher().ERRORS)
    assert (code, capsys.readouterr().err.splitlines()) == (2, [
        f"calibrate: error: model {bad_models}/no_tokenizer has no tokenizer files (tokenizer.json, "
        "tokenizer_config.json, vocab.json, ...): save the model's tokenizer into its folder"])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- processes

def launch(args, ranks: int = 1, kill_when=None, env_extra=None, timeout: float = 300):
    """``python launch/calibrate.py`` (1 rank) or the DeepSpeed launcher with 2 CPU ranks, in its own process
    group; SIGKILLed with every child as soon as ``kill_when()`` is true (polled every 5 ms).

    Returns (exit code, stdout + stderr, killed).
    """
    if ranks == 1:
        cmd, env = [sys.executable, str(REPO / "launch" / "calibrate.py")], single_process_env(**(env_extra or {}))
    else:
        cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--include", "localhost:0,1", "--master_port",
               str(single_process_env()["MASTER_PORT"]), str(REPO / "launch" / "calibrate.py")]
        env = launcher_env(**(env_extra or {}))
    return run_killable([*cmd, *args], env, kill_when=kill_when, timeout=timeout, capture="both",
                        what="the calibration")


def layer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}:{k}": v for p in sorted(folder.glob("layer-*.safetensors")) for k, v in load_file(p).items()}


# 7 sequences (rank 0 gets 4, rank 1 gets 3); the 48 held-out tokens span the last two sequences, one per rank.
PROCESS_ARGS = ["--num-sequences", "7", "--seq-len", "32", "--heldout-tokens", "48", "--structure", "shared_diag"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank(root, tmp_path):
    base = ["--model", root / "qwen3_moe", "--data", root / "corpus.jsonl", *PROCESS_ARGS, "--batch-size", "2"]
    code, out, _ = launch([*base, "--output", tmp_path / "one"])
    assert code == 0, out[-3000:]
    code, out, _ = launch([*base, "--output", tmp_path / "two"], ranks=2)
    assert code == 0, out[-3000:]
    assert "[rank 1]" in out
    one, two = layer_tensors(tmp_path / "one"), layer_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        if name.endswith((":tokens", ":heldout_topk_ids")):
            assert torch.equal(one[name], two[name]), name
        else:
            torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6, msg=name)
    m1, m2 = (json.loads((tmp_path / f / "calibration.json").read_text()) for f in ("one", "two"))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    skip = ("world_size", "created", "files", "calibration_bytes", "routing")
    assert {k: v for k, v in m1.items() if k not in skip} == {k: v for k, v in m2.items() if k not in skip}
    assert not (tmp_path / "two" / cal.PARTIAL_DIR).exists()


@pytest.mark.slow
def test_killed_calibration_resumes_to_identical_statistics(root, tmp_path):
    base = ["--model", root / "qwen3_moe", "--data", root / "corpus.jsonl", *PROCESS_ARGS, "--batch-size", "1",
            "--save-every", "1"]
    code, out, _ = launch([*base, "--output", tmp_path / "reference"])
    assert code == 0, out[-3000:]
    reference = layer_tensors(tmp_path / "reference")

    target = tmp_path / "killed"
    partial = cal.partial_path(target, 0, 1)
    code, out, killed = launch([*base, "--output", target], kill_when=partial.exists)
    assert killed, out[-3000:]
    config = T.AutoConfig.from_pretrained(root / "qwen3_moe")
    with pytest.raises(CalibrationError, match="holds no complete calibration"):
        load_calibration(target, config)  # nothing partial reads as complete
    code, out, _ = launch([*base, "--output", target])
    assert code == 0, out[-3000:]
    assert "resuming from" in out
    resumed = layer_tensors(target)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name

    # A rank stopped after two saves (deterministically mid-run), a stray temporary file, then the rerun.
    target = tmp_path / "stopped"
    code, out, _ = launch([*base, "--output", target], env_extra={cal.STOP_AFTER_ENV: 2})
    assert code == 75, out[-3000:]
    (target / cal.PARTIAL_DIR / ".rank-0-of-1.safetensors.123-0123abcd.tmp").write_bytes(b"partial")
    code, out, _ = launch([*base, "--output", target])
    assert code == 0 and "resuming from" in out and "after 2 of this rank's 7 sequences" in out, out[-3000:]
    assert not glob.glob(str(target / "**" / ".*.tmp"), recursive=True)
    resumed = layer_tensors(target)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    load_calibration(target, config, root / "qwen3_moe").layer(0)


def test_help_shows_the_config_field_comments():
    from moe_ds.cli import build_parser

    text = " ".join(build_parser(CalibrateConfig, description=launcher().__doc__).format_help().split())
    assert "--structure {auto,full,shared_diag}" in text and "--num-sequences" in text
    assert "last tokens of the calibration kept out of the sums" in text
    assert "deepspeed --include localhost:0,1 launch/calibrate.py" in text

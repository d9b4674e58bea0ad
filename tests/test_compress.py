"""Stage 1: layer partition, rank choice, the fit, lazy per-layer reading, resume, bad input, 2-rank launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from conftest import REPO, launcher_env, single_process_env, tiny_model
from moe_ds.checkpoint import load_compressed
from moe_ds.compress import (CompressConfig, CompressError, compress, expert_ratio, layers_for_rank,
                             rank_for_ratio)
from moe_ds.fit import FitConfig, eckart_young_error, fit_projection, relative_error
from moe_ds.shared_core import SharedCoreExperts, mean_init, reconstruct
from moe_ds.stats import expert_params


def test_layers_for_rank_partitions_disjointly_and_evenly():
    layers = [1, 2, 3, 5, 8, 13, 21]
    for world in (1, 2, 3, 8):
        parts = [layers_for_rank(r, world, layers) for r in range(world)]
        assert sorted(sum(parts, [])) == layers
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert layers_for_rank(1, 2, [5, 3, 1]) == [3]
    assert layers_for_rank(3, 8, [0, 1]) == []
    with pytest.raises(ValueError, match="outside"):
        layers_for_rank(2, 2, layers)


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.3, 0.75])
def test_rank_for_ratio_is_the_largest_rank_within_the_target(ratio):
    e, d, i = 128, 2048, 768
    r = rank_for_ratio(ratio, e, d, i)
    assert expert_ratio(r, e, d, i) <= ratio < expert_ratio(r + 1, e, d, i)
    assert rank_for_ratio(0.25, 128, 2048, 768) == 67  # (0.25·128 − 1)·3dI / (6·128·(d + I)) = 67.6
    assert expert_ratio(r, e, d, i) == expert_params(e, d, i, r) / expert_params(e, d, i)  # the one formula
    assert rank_for_ratio(1.0, 4, 64, 32) == 8  # (4 − 1)·3·64·32 / (4·6·(64 + 32)) = 8 exactly: ratio 1.0 is kept


def test_ratio_below_the_cores_share_is_an_error():
    with pytest.raises(CompressError, match="cores' own share"):
        rank_for_ratio(0.1, 4, 64, 32)


def synthetic_experts(e=8, d_out=48, d_in=64, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g)
    return torch.stack([base + spread * torch.randn(d_out, d_in, generator=g) for _ in range(e)]) / d_in ** 0.5


def test_mean_start_is_exactly_the_users_specification():
    w = synthetic_experts()
    res = fit_projection(w, 4, FitConfig(steps=0, init_std=0.7), seed=3)
    f = res.factors
    torch.testing.assert_close(f["core"], w.mean(0))
    assert f["u_in"].abs().max() == 0 and f["u_out"].abs().max() == 0
    assert 0.6 < f["v_in"].std().item() < 0.8
    assert res.init_rel_error == pytest.approx(relative_error(w, w.mean(0).expand_as(w)), rel=1e-6)
    again = fit_projection(w, 4, FitConfig(steps=0, init_std=0.7), seed=3)
    assert torch.equal(again.factors["v_out"], f["v_out"])  # seeded per call


def test_fit_and_module_share_the_mean_start_and_the_reconstruction():
    """fit_projection(init="mean") and SharedCoreExperts.from_dense draw the same start from the same seed."""
    e, d, i, r = 4, 16, 8, 3
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    module = SharedCoreExperts.from_dense(gate_up, down, {"gate": r, "up": r, "down": r}, init_std=0.5,
                                          generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for p, w in (("gate", gate_up[:, :i]), ("up", gate_up[:, i:]), ("down", down)):
        fresh = mean_init(w, r, 0.5, gen)  # the module drew gate, up, down in this order from one generator
        for name, tensor in module.factors(p).items():
            assert torch.equal(tensor, fresh[name]), (p, name)
        torch.testing.assert_close(module.reconstruct(p), reconstruct(**fresh))
    res = fit_projection(down, r, FitConfig(steps=0, init_std=0.5), seed=5)
    start = mean_init(down, r, 0.5, torch.Generator().manual_seed(5))
    assert all(torch.equal(res.factors[name], start[name]) for name in start)


def test_adam_refinement_lowers_the_error_and_both_inits_approach_the_svd_bound():
    w = synthetic_experts()
    mean = fit_projection(w, 6, FitConfig(steps=150, lr=1e-2))
    svd = fit_projection(w, 6, FitConfig(init="svd", steps=150, lr=1e-3))
    bound = eckart_young_error(w, w.mean(0), 12)
    assert mean.rel_error < mean.init_rel_error
    assert svd.init_rel_error < mean.init_rel_error  # the closed-form start is better than the mean
    assert svd.init_rel_error < 1.15 * bound  # and close to the best rank-2r correction of the same core
    assert svd.rel_error <= svd.init_rel_error
    assert [h[0] for h in mean.history][:3] == [0, 50, 100]
    err = relative_error(w, reconstruct(**svd.factors))
    assert err == pytest.approx(svd.rel_error, rel=1e-5)


def test_tolerance_stops_early_and_bad_settings_are_rejected():
    w = synthetic_experts()
    res = fit_projection(w, 4, FitConfig(init="svd", steps=5000, tol=1e-2, lr=1e-3))
    assert res.steps < 5000
    with pytest.raises(ValueError, match="too large"):
        fit_projection(w, 49, FitConfig())
    with pytest.raises(ValueError, match="init"):
        FitConfig(init="pca")
    with pytest.raises(CompressError, match="exactly one of rank and target_ratio"):
        CompressConfig(model="m", output="o")
    with pytest.raises(CompressError, match="lr must be > 0"):
        CompressConfig(model="m", output="o", rank=2, lr=0)
    with pytest.raises(CompressError, match="save_dtype must be one of"):
        CompressConfig(model="m", output="o", rank=2, save_dtype="int8")


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "teacher"
    model = tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def run_compress(*args, env=None, check=True):
    cmd = [sys.executable, str(REPO / "launch" / "compress.py"), *map(str, args)]
    out = subprocess.run(cmd, env=env or single_process_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_all(path: Path) -> dict:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(path / name, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_launcher_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    missing = tmp_path / "missing"
    out = run_compress("--model", missing, "--output", tmp_path / "o", "--rank", 2, check=False)
    assert out.returncode == 2
    assert out.stderr == f"compress: error: model '{missing}' is not a directory (and not a Hub id of the form " \
                         "org/name)\n"
    out = run_compress("--model", missing, "--output", tmp_path / "o", "--rank", 2, "--target-ratio", 0.3,
                       check=False)
    assert out.returncode == 2
    assert out.stderr == "compress: error: give exactly one of rank and target_ratio (got rank=2, " \
                         "target_ratio=0.3)\n"
    assert not (tmp_path / "o").exists()


def test_launcher_help_shows_the_config_field_comments():
    out = run_compress("--help")
    assert "--target-ratio" in out.stdout and "{mean,svd}" in out.stdout
    assert "expert-storage bytes / the original's: picks the rank" in " ".join(out.stdout.split())
    assert "--method" in out.stdout and "prune,shared_core" in " ".join(out.stdout.split())


def test_high_rank_svd_fit_reproduces_the_teachers_logits(teacher_dir, tmp_path):
    cfg = CompressConfig(model=str(teacher_dir), output=str(tmp_path / "c"), rank=24, init="svd", steps=50, lr=1e-4,
                         allow_larger=True)  # near-full rank: the wrappers alone hold more than the experts
    compress(cfg)
    student = load_compressed(tmp_path / "c")
    teacher = T.AutoModelForCausalLM.from_pretrained(teacher_dir)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ls, lt = student(ids).logits, teacher(ids).logits
    assert torch.isfinite(ls).all()
    assert (ls - lt).abs().max() < 0.05 * lt.abs().max()
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    assert not (tmp_path / "c" / ".factors").exists()
    errors = (tmp_path / "c" / "reconstruction_errors.md").read_text()
    assert "| mean |" in errors and "SVD-2r" in errors


def test_killed_run_resumes_to_the_same_result(teacher_dir, tmp_path):
    args = ["--model", teacher_dir, "--rank", 3, "--steps", 20]
    run_compress(*args, "--output", tmp_path / "full")
    killed = run_compress(*args, "--output", tmp_path / "resumed", env=single_process_env(MOE_DS_COMPRESS_STOP_AFTER=1),
                          check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "config.json").exists()  # not a loadable model yet
    assert len(list((tmp_path / "resumed" / ".factors").glob("layer-*.safetensors"))) == 1
    (tmp_path / "resumed" / ".factors" / "layer-00001.safetensors").write_bytes(b"half-written garbage")
    resumed = run_compress(*args, "--output", tmp_path / "resumed")
    assert "layer 0 already done, skipping" in resumed.stderr
    full, res = read_all(tmp_path / "full"), read_all(tmp_path / "resumed")
    assert full.keys() == res.keys()
    for k in full:
        assert torch.equal(full[k], res[k]), k
    again = run_compress(*args, "--output", tmp_path / "resumed")
    assert "nothing to do" in again.stderr


def test_bad_input_is_refused_before_anything_is_written(teacher_dir, tmp_path):
    out = tmp_path / "out"

    def refused(match, **kw):
        kw = {"model": str(teacher_dir), "output": str(out), "rank": 2, "steps": 2, **kw}
        before = (out / "config.json").read_text() if (out / "config.json").exists() else None
        with pytest.raises((CompressError, ValueError), match=match):
            compress(CompressConfig(**kw))
        after = (out / "config.json").read_text() if (out / "config.json").exists() else None
        assert after == before  # nothing written (a finished model from before stays as it was)

    refused("is not a directory", model=str(tmp_path / "missing"))
    refused(r"(?s)cannot resolve 'no-such-org/no-such-moe'.*Offline\?", model="no-such-org/no-such-moe")
    refused("too large for the layer shape", rank=25)
    refused(r"rank 20 stores 3\.\d\dx the original expert parameters.*--allow-larger", rank=20)
    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_text((teacher_dir / "config.json").read_text())
    refused("no model.safetensors", model=str(broken))
    llama = tmp_path / "llama"
    T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2)).save_pretrained(llama)
    refused("supported MoE types", model=str(llama))
    compress(CompressConfig(model=str(teacher_dir), output=str(out), rank=2, steps=2))
    refused("different configuration", rank=3)
    compress(CompressConfig(model=str(teacher_dir), output=str(out), rank=3, steps=2, overwrite=True))
    assert json.loads((out / "config.json").read_text())["shared_core"]["ranks"]["gate"] == 3
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="not a moe-ds compression output"):
        compress(CompressConfig(model=str(teacher_dir), output=str(unrelated), rank=2, steps=2))


@pytest.mark.slow
def test_two_rank_launcher_equals_one_process(teacher_dir, tmp_path):
    args = ["--model", teacher_dir, "--rank", 4, "--steps", 30, "--init", "svd"]
    run_compress(*args, "--output", tmp_path / "one")
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--include", "localhost:0,1", "--master_port",
           str(single_process_env()["MASTER_PORT"]), str(REPO / "launch" / "compress.py"), *map(str, args),
           "--output", str(tmp_path / "two")]
    out = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[rank 1]" in out.stdout + out.stderr
    one, two = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-6, atol=1e-7)


RSS_SCRIPT = r"""
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_stays_flat_as_the_layer_count_grows(tmp_path):
    """A rank holds one layer's experts at a time: 6 more layers of 25 MB experts barely move peak RSS."""
    peaks = {}
    for layers in (2, 8):
        cfg = T.Qwen3MoeConfig(vocab_size=64, hidden_size=256, moe_intermediate_size=512, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                               num_experts_per_tok=2)
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"m{layers}")
        cmd = [sys.executable, str(REPO / "launch" / "compress.py"), "--model", str(tmp_path / f"m{layers}"),
               "--output", str(tmp_path / f"c{layers}"), "--rank", "8", "--steps", "2"]
        # A fixed mmap threshold stops glibc from keeping freed multi-MB blocks on its heap (its dynamic
        # threshold otherwise grows after the first free), so RSS tracks live memory, not allocator history.
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *cmd],
                             env=single_process_env(MALLOC_MMAP_THRESHOLD_=1 << 20),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[layers] = int(out.stdout.strip()) / 1024  # MiB
    expert_mib = 16 * 3 * 256 * 512 * 4 / 2**20  # one layer's experts, fp32
    print(f"peak RSS: {peaks} MiB; one layer's experts {expert_mib:.0f} MiB")
    assert peaks[8] - peaks[2] < 2 * expert_mib, (peaks, expert_mib)  # loading all would add 6 × 24 MiB

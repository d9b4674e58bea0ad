"""Every benchmark script runs and prints its side-by-side table (tiny sizes: behaviour, not speed)."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO

from moe_ds.distill_config import DistillConfig
from moe_ds.kd_loss import TAIL_MODES

STAGE_WORKERS = next(f.default for f in dataclasses.fields(DistillConfig) if f.name == "dataloader_num_workers")
# Every benchmark's header (bench/common.py): provenance of the figures below it.
HEADER = ["# bench: ", "# date: ", " UTC", "# machine: ", " cores usable", " GiB RAM", "GPU: ", "# versions: ",
          "torch ", "transformers ", "deepspeed ", "h5py ", "# git: ", "# command: "]

# script -> (tiny arguments, substrings every one of which the printed output must contain)
BENCHES = {
    "experts_forward.py": (["--experts", "8", "--hidden", "64", "--intermediate", "32", "--tokens", "64",
                            "--ranks", "4", "16", "--repeats", "1", "--dtypes", "float32"],
                           ["| 64 | float32 | fwd | stock (grouped_mm)", "| 64 | float32 | fwd+bwd | shared-core (loop) | 16 |",
                            "| 64 | float32 | fwd | shared-core (grouped) | 16 |", "| compute ops |"]),
    "fit.py": (["--experts", "4", "--d-out", "32", "--d-in", "48", "--rank", "4", "--steps", "20"],
               ["| 0 |", "| 20 |", "rank-2r SVD bound"]),
    "teacher_cache.py": (["--sequences", "8", "--seq-len", "16", "--top-k", "8", "--vocab", "1000"],
                         ["dense fp16", "none", "lzf", "gzip", "batch 4", "SequentialSampler",
                          *(f"{w} workers: resident" for w in sorted({0, STAGE_WORKERS})),
                          "warm", "cold", "x GPU", "ESTIMATE (not measured)", "19,682 tok/s"]),
    "kd_loss.py": (["--vocab", "512", "--positions", "64", "--k", "8", "--chunk", "16", "--repeats", "1"],
                   [*(f"top-k KD, tail={t}, chunked (16 positions)" for t in TAIL_MODES),
                    *(f"top-k KD, tail={t}, unchunked (1 chunk of 64)" for t in TAIL_MODES),
                    "dense full-vocabulary KL",
                    *(f"tail={t}: chunked / unchunked (chunking)" for t in TAIL_MODES),
                    *(f"tail={t}: unchunked / dense (top-k cache)" for t in TAIL_MODES)]),
}


def _run(script: str) -> str:
    args, _ = BENCHES[script]
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], check=False, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_prints_header_and_table(script):
    stdout = _run(script)
    for text in HEADER + BENCHES[script][1]:
        assert text in stdout, (text, stdout)
    command = next(line for line in stdout.splitlines() if line.startswith("# command: "))
    assert f"bench/{script}" in command and all(a in command for a in BENCHES[script][0]), command
    assert stdout.startswith("# bench: "), stdout[:200]  # the header comes first
    if script == "kd_loss.py":
        # Two ratio rows per tail mode, each with a number in both the peak and the time column.
        ratios = [line.split() for line in stdout.splitlines() if " / " in line and line.startswith("tail=")]
        assert len(ratios) == 2 * len(TAIL_MODES), stdout
        assert all(float(r[-1]) > 0 and float(r[-2]) > 0 for r in ratios), ratios
    if script == "teacher_cache.py":
        # One warm and one cold row per id distribution and compression; the cold drop is verified or said not to be.
        rows = [line.split() for line in stdout.splitlines() if line.split()[2:3] in (["warm"], ["cold"])]
        assert len(rows) == 2 * 3 * 2, stdout
        assert ("cold cache verified" in stdout) != ("cold cache NOT" in stdout), stdout


@pytest.mark.slow
def test_data_aware_benchmark_runs_the_launchers_and_prints_its_table(tiny_lm_dir, stdlib_text, tmp_path):
    """bench/data_aware.py on a tiny random MoE with 1 rank: calibration, three fits, the table and the goal lines."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": stdlib_text[i:i + 4000]}) + "\n" for i in range(0, 80_000, 4000)))
    args = ["--teacher", str(tiny_lm_dir), "--calibration-data", str(text), "--heldout", str(text), "--ratios", "0.5",
            "--steps", "2", "--num-sequences", "4", "--seq-len", "32", "--heldout-tokens", "32", "--eval-windows", "4",
            "--structures", "full", "--nproc", "1", "--workdir", str(tmp_path / "work")]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "data_aware.py"), *args], check=False,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for text in HEADER + ["| target | rank | expert params |", "calibration s: full moments",
                          "activation (full): gap / weight gap"]:
        assert text in out.stdout, (text, out.stdout)
    assert "shared_diag" not in out.stdout.split("# command:")[1].split("\n", 1)[1]  # --structures full: not run
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 0.5 |")]
    assert [r[3].strip() for r in rows] == ["weight", "activation (full)"], out.stdout
    for r in rows:  # a rank, a parameter ratio within the budget, a finite perplexity and output error
        assert int(r[1]) >= 0 and 0 < float(r[2]) <= 0.5 and float(r[4]) > 1 and 0 <= float(r[7]) < 10, r
    for name in ("cal_full", "r0.5_weight_full", "r0.5_activation_full"):
        assert (tmp_path / "work" / name).is_dir(), name  # --workdir keeps what was run
    # compress_config.json records the rank --target-ratio resolved to (it wrote null before)
    run_config = json.loads((tmp_path / "work" / "r0.5_weight_full" / "compress_config.json").read_text())
    assert run_config["rank"] == int(rows[0][1]) and run_config["target_ratio"] == 0.5, run_config


@pytest.mark.slow
def test_methods_benchmark_runs_every_kind_of_method_and_stays_within_the_budget(tiny_lm_dir, stdlib_text, tmp_path):
    """bench/methods.py on a tiny random MoE with 1 rank: a factorised, a structural and a sparse method, one budget."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": stdlib_text[i:i + 4000]}) + "\n" for i in range(0, 80_000, 4000)))
    args = ["--teacher", str(tiny_lm_dir), "--calibration-data", str(text), "--heldout", str(text), "--ratios", "0.5",
            "--methods", "lowrank", "prune", "magnitude", "--num-sequences", "4", "--seq-len", "32",
            "--heldout-tokens", "32", "--eval-windows", "4", "--nproc", "1", "--workdir", str(tmp_path / "work")]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "methods.py"), *args], check=False,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for text in HEADER + ["| target | method (objective) | setting | expert bytes |", "Best zero-shot method per budget"]:
        assert text in out.stdout, (text, out.stdout)
    rows = {line.split("|")[2].strip(): line.split("|")[3:-1] for line in out.stdout.splitlines()
            if line.startswith("| 0.5 |")}
    assert set(rows) == {"lowrank (weight)", "lowrank (activation)", "prune", "magnitude"}, out.stdout
    for name, (setting, ratio, ppl, *_) in rows.items():  # within the budget, a finite perplexity
        assert 0 < float(ratio) <= 0.5 and 1 < float(ppl) < 1e6, (name, ratio, ppl)
    assert rows["prune"][0].strip() == "3 of 6 experts" and rows["magnitude"][0].startswith(" density 0.4"), rows

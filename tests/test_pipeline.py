"""End-to-end smoke test: the four stages through their real launchers at tiny sizes, then the report."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, launcher_env, single_process_env


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], env=launcher_env(WANDB_MODE="disabled"), capture_output=True,
                         text=True, timeout=400, cwd=REPO, check=False, **kw)
    assert out.returncode == 0, f"{cmd[:3]}\n{out.stdout[-2500:]}\n{out.stderr[-2500:]}"
    return out


@pytest.mark.slow
def test_four_stages_through_the_launchers_and_the_report(tiny_lm_dir, stdlib_text, tmp_path):
    deepspeed = REPO / ".venv" / "bin" / "deepspeed"
    port = lambda: single_process_env()["MASTER_PORT"]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 90_000, 3000)))
    heldout.write_text("".join(json.dumps({"text": stdlib_text[-i - 3000:-i]}) + "\n" for i in range(1, 9_000, 3000)))
    run = tmp_path / "demo"

    # 1. compression with 2 ranks
    _run([deepspeed, "--include", "localhost:0,1", "--master_port", port(), "launch/compress.py",
          "--model", tiny_lm_dir, "--output", run / "compressed", "--rank", 4, "--steps", 20, "--init", "svd"])
    # 2. teacher cache with 2 ranks
    _run(["bash", "launch/cache_teacher.sh", "--teacher", tiny_lm_dir, "--data", train, "--output",
          run / "teacher_cache.h5", "--top-k", 8, "--seq-len", 32, "--nproc", 2, "--max-sequences", 48])
    # 4. the evaluator, started before training, watching the run directory
    evaluator = subprocess.Popen(
        [sys.executable, "launch/evaluate.py", "--watch", str(run / "distill"), "--baseline", str(tiny_lm_dir),
         "--tasks", "perplexity", "--ppl-file", str(heldout), "--limit", "2", "--stop-after-step", "4",
         "--wandb-mode", "disabled"], env=launcher_env(), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        # 3. ZeRO-3 distillation with 2 ranks
        _run([deepspeed, "--include", "localhost:0,1", "--master_port", port(), "launch/distill.py",
              "--deepspeed", "ds_configs/zero3.json", "--student", run / "compressed", "--teacher-cache",
              run / "teacher_cache.h5", "--output", run / "distill", "--max-steps", 4, "--save-steps", 2,
              "--batch-size", 2, "--report-to", "none"])
        log, _ = evaluator.communicate(timeout=300)
    finally:
        evaluator.kill()
    assert evaluator.returncode == 0, log[-3000:]
    for step in (2, 4):
        record = json.loads((run / "distill" / f"checkpoint-{step}" / "eval" / "results.json").read_text())
        assert record["status"] == "ok" and record["step"] == step
        assert record["tasks"]["perplexity"]["metrics"]["word_perplexity"] > 1
    assert (run / "distill" / "baseline_eval" / "results.json").is_file()
    assert "checkpoint-4" in (run / "distill" / "eval_summary.md").read_text()

    _run([sys.executable, "launch/report.py", "--run", run, "--teacher", tiny_lm_dir, "--heldout", heldout,
          "--seq-len", 32, "--max-windows", 8])
    report = json.loads((run / "report.json").read_text())
    assert [c["step"] for c in report["distilled"]["checkpoints"]] == [2, 4]
    assert report["teacher"]["ppl"] > 1 and report["zero_shot"]["ppl"] > 1 and report["distilled"]["ppl"] > 1
    assert report["expert_param_ratio"] == pytest.approx(
        (3 * 32 * 24 + 6 * 3 * 2 * 4 * (32 + 24)) / (6 * 3 * 32 * 24))
    assert (run / "report.png").stat().st_size > 10_000
    assert "| distilled | 4 |" in (run / "report.md").read_text()

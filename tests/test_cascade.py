"""The progressive cascade (issue #15): recipe checks, the table and plot, and a run through the launchers that
resumes from any step."""

import json
import os
import sys
from pathlib import Path

import pytest

from moe_ds.cascade import CascadeConfig, CascadeConfigError, cascade_markdown, plot_cascade, run_cascade


@pytest.fixture(scope="module")
def texts(tmp_path_factory, stdlib_text):
    root = tmp_path_factory.mktemp("cascade_text")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n"
                                              for i in range(0, 45_000, 3000)))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n"
                                                for i in range(60_000, 66_000, 3000)))
    return root


def _cfg(tiny_lm_dir, texts, out, **kw) -> CascadeConfig:
    base = dict(teacher=str(tiny_lm_dir), data=str(texts / "train.jsonl"), heldout=str(texts / "heldout.jsonl"),
                output=str(out), cascade=[{"ratio": 0.5, "steps": 2}, {"ratio": 0.25}], method="lowrank",
                compress_args={"steps": 3}, distill_args={"batch_size": 2, "report_to": "none", "save_steps": 2,
                                                          "logging_steps": 1, "dataloader_num_workers": 0},
                seq_len=32, max_sequences=8, top_k=0, eval_windows=4, nproc=2, deepspeed="ds_configs/zero3.json")
    base.update(kw)
    return CascadeConfig(**base)


def test_recipe_checks(tiny_lm_dir, texts, tmp_path):
    with pytest.raises(CascadeConfigError, match="decrease"):
        _cfg(tiny_lm_dir, texts, tmp_path, cascade=[{"ratio": 0.25, "steps": 2}, {"ratio": 0.5}])
    with pytest.raises(CascadeConfigError, match="first step needs steps"):
        _cfg(tiny_lm_dir, texts, tmp_path, cascade=[{"ratio": 0.5}])
    with pytest.raises(CascadeConfigError, match=r"in \(0, 1\)"):
        _cfg(tiny_lm_dir, texts, tmp_path, cascade=[{"ratio": 1.5, "steps": 2}])
    with pytest.raises(CascadeConfigError, match="unknown cascade step"):
        _cfg(tiny_lm_dir, texts, tmp_path, cascade=[{"ratio": 0.5, "steps": 2, "lr": 1}])
    with pytest.raises(CascadeConfigError, match="may not set"):
        _cfg(tiny_lm_dir, texts, tmp_path, distill_args={"max_steps": 3})
    with pytest.raises(CascadeConfigError, match="teacher_source"):
        _cfg(tiny_lm_dir, texts, tmp_path, teacher_source="cache")
    with pytest.raises(CascadeConfigError, match="does not exist"):
        _cfg(tiny_lm_dir, texts, tmp_path, heldout=str(tmp_path / "missing.jsonl"))
    with pytest.raises(CascadeConfigError, match="needs teacher_source original"):
        _cfg(tiny_lm_dir, texts, tmp_path, teacher_cache=str(texts / "train.jsonl"))
    with pytest.raises(CascadeConfigError, match="teacher_cache .* does not exist"):
        _cfg(tiny_lm_dir, texts, tmp_path, teacher_source="original", teacher_cache=str(tmp_path / "c.h5"))
    assert _cfg(tiny_lm_dir, texts, tmp_path, cascade=[{"ratio": 0.5, "steps": 7}, {"ratio": 0.25},
                                                       {"ratio": 0.1, "steps": 3}]).step_counts() == [7, 7, 3]


def test_table_and_plot_hold_every_step(tmp_path):
    summary = {"teacher_ppl": 100.0, "method": "lowrank", "teacher_source": "previous", "steps": [
        {"step": 0, "expert_bytes_ratio": 0.5, "distill_steps": 10, "zero_shot_ppl": 120.0, "distilled_ppl": 105.0,
         "train_log": str(tmp_path / "none.jsonl")},
        {"step": 1, "expert_bytes_ratio": 0.25, "distill_steps": 10, "zero_shot_ppl": 150.0, "distilled_ppl": 110.0,
         "train_log": str(tmp_path / "none.jsonl")}]}
    md = cascade_markdown(summary)
    assert "| 0 | 0.5000 | 10 | 120.00 | 105.00 | +5.0 % |" in md and "| 1 | 0.2500 | 10 | 150.00 | 110.00 | +10.0 % |" in md
    plot_cascade(summary, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cascade_runs_through_the_launchers_and_resumes_from_any_step(tiny_lm_dir, texts, tmp_path, monkeypatch):
    """2 ranks per launcher, distillation under ZeRO-3 with the previous student as a partitioned live teacher."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = tmp_path / "run"
    cfg = _cfg(tiny_lm_dir, texts, out)
    first = run_cascade(cfg, log=lambda *a: None)
    assert [r["step"] for r in first] == [0, 1]
    # the second step compressed the first one's distilled student (exported densely), distilled from it live
    assert first[1]["teacher"] == f"live teacher {first[0]['checkpoint']}"
    assert (out / "step-1" / "source" / "config.json").is_file()
    assert "live teacher (zero3" in (out / "logs" / "step1_distill.log").read_text()
    for r in first:
        assert r["expert_bytes_ratio"] <= r["ratio"] + 1e-6 and r["expert_bytes_ratio"] > 0.5 * r["ratio"]
        assert r["zero_shot_ppl"] > 0 and r["distilled_ppl"] > 0
        rows = [json.loads(x) for x in open(r["train_log"])]
        assert [row["step"] for row in rows][-1] == 2
    summary = json.loads((out / "cascade.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [0, 1] and summary["teacher_ppl"] > 0
    assert (out / "cascade.png").is_file() and "| 1 |" in (out / "cascade.md").read_text()

    # resume from step 1: step 0 is not run again (its files untouched), step 1 is redone
    stamp = os.path.getmtime(out / "step-0" / "result.json")
    compress_log = (out / "logs" / "step0_compress.log").read_text()
    (out / "step-1" / "result.json").unlink()
    for marker in (out / "step-1" / "distill").glob("checkpoint-*/CHECKPOINT_COMPLETE"):
        marker.unlink()
    again = run_cascade(cfg, log=lambda *a: None)
    assert os.path.getmtime(out / "step-0" / "result.json") == stamp
    assert (out / "logs" / "step0_compress.log").read_text() == compress_log
    assert again[0] == first[0] and again[1]["expert_bytes_ratio"] == first[1]["expert_bytes_ratio"]
    assert again[1]["distilled_ppl"] == pytest.approx(first[1]["distilled_ppl"], rel=1e-3)

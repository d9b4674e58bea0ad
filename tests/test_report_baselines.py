"""The demo report's comparison (issue #16): every method at the demo's budget (``baselines``), the teacher
trained on for the same steps (``control``), and the gap closed against each, on a fabricated run folder."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import tiny_model
from moe_ds.checkpoint import STATISTICS_FILE
from moe_ds.report import (BASELINE_METHODS, ReportConfig, ReportError, baseline_results, build_report,
                           control_result, expert_bytes_ratio, gap_closed, heldout_windows, report_markdown,
                           token_perplexity)
from moe_ds.run_layout import CHECKPOINT_COMPLETE

SEQ_LEN, WINDOWS = 32, 4


def _entry(original: int, ratio: float) -> dict:
    return {"original": original, "compressed": int(original * ratio), "ratio": ratio}


def _save(path, tokenizer, seed: int, stats: dict | None = None, complete: bool = False):
    """A tiny stock Qwen3-MoE (random weights of ``seed``) with the tokenizer; optional statistics and marker."""
    model = tiny_model("qwen3_moe", seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if stats is not None:
        (path / STATISTICS_FILE).write_text(yaml.safe_dump(stats))
    if complete:
        (path / CHECKPOINT_COMPLETE).write_text("")
    return path


# What launch/compress.py writes, cut to the keys the report reads: the shared core's own accounting ...
SHARED_CORE_STATS = {
    "ranks": {"gate": 3, "up": 3, "down": 3}, "shape": {"num_experts": 6},
    "expert_params": _entry(10_000, 0.27), "total_params": _entry(20_000, 0.6),
    "active_params_per_token": _entry(12_000, 0.9), "expert_macs_per_token": _entry(5_000, 0.7),
    "bytes": {"experts_original": 40_000, "experts_compressed": 10_800},
}
# ... and moe_ds.budget.method_statistics' (every other method)
LOWRANK_STATS = {"method": "lowrank", "kept_experts": 6, "rank": 5, "density": None, "shape": {"num_experts": 6},
                 "expert_bytes": {**_entry(40_000, 0.2625), "value_bytes": 4}}
PRUNE_STATS = {"method": "prune", "kept_experts": 2, "rank": None, "density": None,
               "num_experts": {"original": 6, "kept": 2}, "expert_bytes": {**_entry(40_000, 0.25), "value_bytes": 4}}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_lm_dir, stdlib_text):
    """A demo run folder: compressed/, distill/checkpoint-{2,4}, control/checkpoint-4 (checkpoint-6 unfinished),
    baselines/{lowrank,prune}; delta, merge and magnitude absent (merge's folder half written)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    run = tmp_path_factory.mktemp("demo")
    heldout = run / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": stdlib_text[-i - 3000:-i]}) + "\n" for i in range(1, 9000, 3000)))
    _save(run / "compressed", tokenizer, 1, SHARED_CORE_STATS)
    for seed, step in ((2, 2), (3, 4)):
        _save(run / "distill" / f"checkpoint-{step}", tokenizer, seed, complete=True)
    _save(run / "control" / "checkpoint-4", tokenizer, 4, complete=True)
    _save(run / "control" / "checkpoint-6", tokenizer, 5)  # no completion marker: still being written
    _save(run / "baselines" / "lowrank", tokenizer, 6, LOWRANK_STATS)
    _save(run / "baselines" / "prune", tokenizer, 7, PRUNE_STATS)
    (run / "baselines" / "merge").mkdir()  # compress started and stopped before writing its config
    (run / "stage_seconds.tsv").write_text("compress 22\nbaselines 40\ncontrol 200\n")
    report = build_report(ReportConfig(run=str(run), teacher=str(tiny_lm_dir), heldout=str(heldout),
                                       seq_len=SEQ_LEN, max_windows=WINDOWS))
    windows = heldout_windows(heldout, tokenizer, SEQ_LEN, WINDOWS)
    return run, report, windows


def test_baselines_hold_every_method_with_its_own_perplexity_and_stored_ratio(demo_run):
    run, report, windows = demo_run
    baselines = report["baselines"]
    assert list(baselines) == ["shared_core", *BASELINE_METHODS]
    assert baselines["shared_core"]["ppl"] == report["zero_shot"]["ppl"]
    assert baselines["shared_core"]["expert_bytes_ratio"] == pytest.approx(10_800 / 40_000)
    assert baselines["lowrank"]["expert_bytes_ratio"] == 0.2625 and baselines["lowrank"]["setting"] == "rank 5"
    assert baselines["prune"]["expert_bytes_ratio"] == 0.25 and baselines["prune"]["setting"] == "2 of 6 experts"
    for method in ("lowrank", "prune"):  # each scored from its own folder (distinct random weights)
        assert baselines[method]["ppl"] == pytest.approx(token_perplexity(run / "baselines" / method, windows))
    ppls = [b["ppl"] for b in baselines.values() if b["ppl"] is not None]
    assert len(set(ppls)) == 3
    markdown = (run / "report.md").read_text()
    assert f"| lowrank | rank 5 | 0.2625 | {baselines['lowrank']['ppl']:.2f} |" in markdown
    assert json.loads((run / "report.json").read_text())["baselines"] == baselines


def test_a_missing_or_unfinished_baseline_is_reported_missing(demo_run):
    run, report, _ = demo_run
    for method in ("delta", "merge", "magnitude"):
        assert report["baselines"][method] == {"status": "missing", "dir": str(run / "baselines" / method),
                                               "ppl": None, "expert_bytes_ratio": None, "setting": None}
        assert f"| {method} | missing ({run / 'baselines' / method}) | – | – | – |" in (run / "report.md").read_text()


def test_control_is_the_last_complete_checkpoint_and_the_gap_is_closed_against_it(demo_run):
    run, report, windows = demo_run
    control = report["control"]
    assert control["steps"] == 4 and control["dir"] == str(run / "control" / "checkpoint-4")
    assert control["ppl"] == pytest.approx(token_perplexity(run / "control" / "checkpoint-4", windows))
    d, zs = report["distilled"], report["zero_shot"]["ppl"]
    assert d["step"] == 4
    assert d["gap_closed_vs_control"] == gap_closed(zs, d["ppl"], control["ppl"])
    assert d["gap_closed_vs_teacher"] == gap_closed(zs, d["ppl"], report["teacher"]["ppl"])
    assert "| control: the teacher distilled like the student (not compressed) | 4 |" in (run / "report.md").read_text()
    assert (run / "report.png").stat().st_size > 10_000


def test_gap_closed_on_hand_set_numbers():
    assert gap_closed(120.0, 110.0, 100.0) == pytest.approx(0.5)  # half way from zero-shot to the control
    assert gap_closed(120.0, 110.0, 113.0) == pytest.approx(10 / 7)  # past the teacher as it was
    assert gap_closed(120.0, 125.0, 100.0) == pytest.approx(-0.25)  # distillation made it worse
    assert gap_closed(120.0, 110.0, 120.0) is None and gap_closed(120.0, 110.0, 130.0) is None  # no gap
    assert gap_closed(120.0, None, 100.0) is None and gap_closed(120.0, 110.0, None) is None


def test_markdown_states_both_gaps_and_judges_the_target_on_the_control():
    r = {"heldout": {"windows": 4, "seq_len": 32, "file": "h.jsonl"}, "stage_seconds": {},
         "teacher": {"ppl": 113.0, "lm_eval": {}}, "control": {"ppl": 100.0, "steps": 300},
         "zero_shot": {"ppl": 120.0, "lm_eval": {}, "ranks": {"gate": 7}, "mean_reconstruction_error": 0.5},
         "distilled": {"ppl": 110.0, "step": 300, "checkpoints": [{"step": 300, "ppl": 110.0, "lm_eval": {}}],
                       "gap_closed_vs_control": gap_closed(120.0, 110.0, 100.0),
                       "gap_closed_vs_teacher": gap_closed(120.0, 110.0, 113.0)},
         "params": {k: _entry(100, 0.5) for k in ("expert_params", "total_params", "active_params_per_token",
                                                  "expert_macs_per_token")},
         "baselines": {}}
    md = report_markdown(r)
    assert "against the control: 50 % of the zero-shot − control perplexity gap (120.00 − 100.00" in md
    assert "target ≥ 50 %: met" in md
    assert "Against the teacher as it was (before any further training): 143 %" in md
    r["distilled"]["gap_closed_vs_control"] = gap_closed(120.0, 111.0, 100.0)
    assert "target ≥ 50 %: NOT met" in report_markdown(r)
    r["control"] = None
    assert "Gap closed against the control: – (no control run in this folder)." in report_markdown(r)


def test_a_run_without_baselines_or_control_reports_them_missing(tmp_path):
    assert control_result(tmp_path, windows=None) is None
    found = baseline_results(tmp_path, windows=None)
    assert list(found) == list(BASELINE_METHODS) and all(b["status"] == "missing" for b in found.values())


def test_expert_bytes_ratio_prefers_packed_then_method_then_shared_core_bytes():
    packed = {"quantization": {"expert_bytes": {"ratio": 0.24}}, "expert_bytes": {"ratio": 0.26}}
    assert expert_bytes_ratio(packed) == 0.24
    assert expert_bytes_ratio(LOWRANK_STATS) == 0.2625
    assert expert_bytes_ratio(SHARED_CORE_STATS) == pytest.approx(0.27)
    with pytest.raises(ReportError, match="without expert bytes"):
        expert_bytes_ratio({"ranks": {"gate": 3}})

"""launch/sweep.py and moe_ds.sweep: config validation, the table/CSV/plot writers, and resuming a sweep."""

import copy
import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from moe_ds import sweep
from moe_ds.checkpoint import is_quantized_checkpoint, load_model
from moe_ds.quantized_checkpoint import quantize_checkpoint
from moe_ds.stage_runner import StageFailed
from moe_ds.sweep import SweepConfigError, parse_config


@pytest.fixture
def texts(tmp_path, stdlib_text) -> tuple[Path, Path]:
    """(train, held-out) JSONL files of stdlib source."""
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    chunks = [stdlib_text[i:i + 2000] for i in range(0, 60_000, 2000)]
    train.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks[:24]))
    heldout.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks[24:]))
    return train, heldout


def smoke(tmp_path: Path, teacher: Path, texts, **changes) -> dict:
    """sweeps/smoke.yaml with the tiny teacher, its texts and an output under tmp_path."""
    data = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    data["output"] = str(tmp_path / "sweep")
    data["testbeds"][0].update(teacher=str(teacher), train=str(texts[0]), heldout=str(texts[1]))
    data.update(changes)
    return data


@pytest.mark.parametrize("shipped", ["toy.yaml", "toy_strong.yaml", "smollm.yaml", "smoke.yaml"])
def test_shipped_configs_validate(shipped, tmp_path, tiny_lm_dir, texts):
    data = yaml.safe_load((REPO / "sweeps" / shipped).read_text())
    for tb in data["testbeds"]:  # the toy teacher is built by make demo: validate against the tiny stand-in
        tb.update(teacher=str(tiny_lm_dir), train=str(texts[0]), heldout=str(texts[1]))
        if "data_dir" in tb:
            tb["data_dir"] = str(tmp_path)
    cfg = parse_config(data)
    assert cfg.budgets and cfg.methods and cfg.distill.steps >= 1
    if shipped in ("toy.yaml", "toy_strong.yaml", "smollm.yaml"):
        names = {m.name: m for m in cfg.methods}
        assert {"shared_core", "lowrank", "delta", "prune", "merge", "magnitude"} <= set(names)
        assert names["shared_core+int4"].flags["quantize"] == "int4-g64"
        assert names["lowrank/act"].calibration and names["lowrank/act"].flags["objective"] == "activation"
        assert names["prune"].calibration and not names["lowrank"].calibration  # structural methods need one
        assert cfg.budgets == [0.5, 0.25, 0.125]


@pytest.mark.parametrize("change, key", [
    ({"bogus": 1}, "bogus"),
    ({"budgets": [0.5, 1.5]}, "budgets"),
    ({"budgets": []}, "budgets"),
    ({"methods": [{"name": "nonsense"}]}, "methods[0].method"),
    ({"methods": [{"name": "lowrank", "bogus_flag": 1}]}, "methods[0].bogus_flag"),
    ({"methods": [{"name": "lowrank", "target_ratio": 0.3}]}, "methods[0].target_ratio"),
    ({"methods": [{"name": "lowrank", "objective": "activation"}]}, "methods[0].objective"),
    ({"methods": [{"name": "lowrank", "quantize": "int3-g7"}]}, "methods[0].quantize"),
    ({"methods": [{"name": "lowrank"}, {"name": "lowrank"}]}, "duplicate"),
    ({"methods": [{"name": "a b", "method": "lowrank"}]}, "methods[0].name"),
    ({"distill": {"steps": -1}}, "distill.steps"),
    ({"distill": {"steps": 2, "student": "x"}}, "distill.student"),
    ({"distill": {"steps": 2, "no_such_flag": 1}}, "distill.no_such_flag"),
    ({"cache": {"top_k": 0}}, "cache.top_k"),
    ({"cache": {"topk": 8}}, "cache: unknown key(s) ['topk']"),
    ({"nproc": 0}, "nproc"),
    ({"testbeds": []}, "testbeds"),
])
def test_bad_configs_name_the_key(change, key, tmp_path, tiny_lm_dir, texts):
    data = smoke(tmp_path, tiny_lm_dir, texts)
    data.update(copy.deepcopy(change))
    with pytest.raises(SweepConfigError, match=re.escape(key)):
        parse_config(data)


def test_missing_files_and_keys(tmp_path, tiny_lm_dir, texts):
    data = smoke(tmp_path, tiny_lm_dir, texts)
    data["testbeds"][0]["heldout"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(SweepConfigError, match=r"testbeds\[0\]\.heldout: .*missing.jsonl does not exist"):
        parse_config(data)
    data = smoke(tmp_path, tiny_lm_dir, texts)
    del data["budgets"]
    with pytest.raises(SweepConfigError, match="budgets is missing"):
        parse_config(data)
    with pytest.raises(SweepConfigError, match="does not exist"):
        sweep.load_config(tmp_path / "nope.yaml")


def test_infeasible_budgets(tiny_lm_dir):
    """The tiny teacher: E = 6, top-2, d = 32, I = 24, float32."""
    m = lambda name, **flags: sweep.MethodConfig(name, name, name in ("prune", "merge"), flags)  # noqa: E731
    assert sweep.infeasible_reason(tiny_lm_dir, m("prune"), 0.5) is None  # 3 of 6 experts
    assert "fewer than top-k = 2" in sweep.infeasible_reason(tiny_lm_dir, m("prune"), 0.25)  # 1 of 6
    assert sweep.infeasible_reason(tiny_lm_dir, m("shared_core"), 1 / 6 + 1e-3) is None  # the core alone fits
    assert "cores' own share" in sweep.infeasible_reason(tiny_lm_dir, m("shared_core"), 0.1)
    assert sweep.infeasible_reason(tiny_lm_dir, m("lowrank"), 0.1) is None


def test_task_accuracies():
    metrics = {"arc_easy/acc": 0.5, "arc_easy/acc_norm": 0.6, "piqa/acc": 0.7, "gsm8k/exact_match,strict-match": 0.1,
               "wikitext/word_perplexity": 30.0}
    assert sweep.task_accuracies(metrics) == {"arc_easy": 0.5, "piqa": 0.7, "gsm8k": 0.1}
    acc = sweep.task_accuracies(metrics, "acc_norm")
    assert acc == {"arc_easy": 0.6, "piqa": 0.7, "gsm8k": 0.1}
    assert sweep.mean_accuracy(acc) == pytest.approx((0.6 + 0.7 + 0.1) / 3)
    assert sweep.mean_accuracy({}) is None


def _cell(method, budget, ratio, zs, dist, status="done", acc=None, error=None):
    phases = {}
    if ratio is not None:
        phases["compress"] = {"seconds": 10.0, "expert_bytes_ratio": ratio}
    if zs is not None:
        phases["zero_shot"] = {"ppl": zs, "tasks": {"piqa": acc[0]} if acc else {}, "mean_acc": acc and acc[0],
                               "seconds": 2.0}
    if dist is not None:
        phases["distill"] = {"seconds": 60.0}
        phases["distilled"] = {"ppl": dist, "tasks": {"piqa": acc[1]} if acc else {}, "mean_acc": acc and acc[1],
                               "seconds": 2.0}
    return {"testbed": "toy", "method": method, "budget": budget, "status": status, "error": error, "phases": phases}


def test_writers_on_fabricated_results(tmp_path):
    testbeds = {"toy": {"phases": {"cache": {"seconds": 30.0},
                                   "teacher": {"ppl": 100.0, "tasks": {"piqa": 0.70}, "mean_acc": 0.70, "seconds": 1.0},
                                   "control": {"seconds": 70.0},
                                   "control_eval": {"ppl": 98.0, "tasks": {"piqa": 0.71}, "mean_acc": 0.71,
                                                    "seconds": 1.0}}}}
    records = [_cell("shared_core", 0.5, 0.5, 120.0, 105.0, acc=(0.60, 0.66)),
               _cell("lowrank", 0.5, 0.4998, 110.0, 107.5, acc=(0.62, 0.64)),
               _cell("shared_core", 0.25, 0.25, 150.0, 112.0, acc=(0.55, 0.61)),
               _cell("lowrank", 0.25, 0.2497, 160.0, None, status="failed", acc=(0.50, 0.0),
                     error="StageFailed: distill failed (exit 1); last lines:\nboom"),
               _cell("prune", 0.25, None, None, None, status="infeasible", error="keeps 1 of 8 experts")]
    rows = sweep.write_outputs(tmp_path, None, testbeds, records)

    table = list(csv.DictReader(io.StringIO((tmp_path / sweep.SWEEP_CSV).read_text())))
    by = {(r["method"], r["budget"], r["phase"]): r for r in table}
    assert len(table) == 2 + 2 * len(records)  # teacher, control, two phases per cell
    assert float(by[("shared_core", "0.5", "zero_shot")]["ppl"]) == 120.0
    assert float(by[("shared_core", "0.5", "zero_shot")]["gap_pct"]) == pytest.approx(20.0)
    assert float(by[("shared_core", "0.25", "distilled")]["gap_pct"]) == pytest.approx(12.0)
    assert float(by[("lowrank", "0.5", "zero_shot")]["expert_bytes_ratio"]) == 0.4998
    assert float(by[("lowrank", "0.5", "distilled")]["acc/piqa"]) == 0.64
    assert float(by[("lowrank", "0.5", "distilled")]["seconds"]) == 62.0  # distillation + evaluation
    assert by[("lowrank", "0.25", "distilled")]["status"] == "failed"
    assert by[("lowrank", "0.25", "distilled")]["error"] == "StageFailed: distill failed (exit 1); last lines:"
    assert by[("lowrank", "0.25", "zero_shot")]["status"] == "done"
    assert by[("prune", "0.25", "zero_shot")]["status"] == "infeasible"
    assert float(by[("control", "1.0", "distilled")]["ppl"]) == 98.0
    assert [r["method"] for r in rows[:2]] == ["teacher", "control"]

    md = (tmp_path / sweep.SWEEP_MD).read_text()
    ppl_table = md.split("### held-out perplexity")[1].split("###")[0]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in ppl_table.splitlines() if line.startswith("| ") and "---" not in line}
    assert lines["teacher"] == ["100.00", "100.00"]
    assert lines["teacher trained on (control)"] == ["98.00", "98.00"]
    # budgets 0.5 then 0.25; best zero-shot and best distilled per budget in bold
    assert lines["shared_core"] == ["120.00 (+20.0 %) → **105.00** (+5.0 %)",
                                    "**150.00** (+50.0 %) → **112.00** (+12.0 %)"]
    assert lines["lowrank"] == ["**110.00** (+10.0 %) → 107.50 (+7.5 %)", "160.00 (+60.0 %) → failed"]
    assert lines["prune"] == ["", "infeasible"]
    assert "zero-shot → after the same distillation" in md and "not distilled" not in md
    acc_table = md.split("### mean task accuracy")[1]
    acc_lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                 for line in acc_table.splitlines() if line.startswith("| ") and "---" not in line}
    assert acc_lines["shared_core"] == ["0.6000 → **0.6600**", "**0.5500** → **0.6100**"]
    assert acc_lines["lowrank"][0] == "**0.6200** → 0.6400"
    assert (tmp_path / sweep.PARETO_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_lm_dir, texts):
    """Launcher failures in the control and in a cell: recorded with their errors, the next cell still runs, the
    outputs are still written and say which failed."""
    data = smoke(tmp_path, tiny_lm_dir, texts, budgets=[0.5, 0.25], methods=[{"name": "lowrank"}])
    cfg = parse_config(data)
    calls = []

    def fake_run(name, cmd, nproc, log_dir):
        calls.append(name)
        if name == "compress" and "0.5" in cmd:
            raise StageFailed("compress failed (exit 2); last lines:\nCompressError: boom")
        if name in ("compress", "control"):
            raise StageFailed(f"{name} failed again")
        return 0.1

    records = sweep.run_sweep(cfg, run=fake_run)
    assert calls == ["cache", "control", "compress", "compress"]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert records[0]["error"].startswith("StageFailed: compress failed (exit 2)")
    testbeds, on_disk = sweep.collect(cfg)
    assert [r["status"] for r in on_disk] == ["failed", "failed"]
    assert testbeds["tiny"]["control_error"] == "StageFailed: control failed again"
    assert testbeds["tiny"]["phases"]["teacher"]["ppl"] > 1  # in process: the tiny teacher's perplexity
    assert [r["method"] for r in sweep.failed(records, testbeds)] == ["lowrank", "lowrank", "control"]
    md = (Path(cfg.output) / sweep.SWEEP_MD).read_text()
    assert "| lowrank | failed | failed |" in md
    assert "| teacher trained on (control) | failed | failed |" in md


def _fake_pipeline(tiny_lm_dir: Path, calls: list):
    """A stage runner that writes what each launcher would (a copy of the tiny model as the compressed model and as
    checkpoint-<steps>, an empty teacher cache and calibration folder), recording (name, cmd, whether the output existed before)."""
    import shutil

    def run(name, cmd, nproc, log_dir):
        cmd = [str(c) for c in cmd]
        out = Path(cmd[cmd.index("--output") + 1])
        calls.append((name, cmd, out.exists()))
        if name == "compress" and "--quantize" in cmd:  # a packed checkpoint, as compress --quantize writes
            quantize_checkpoint(tiny_lm_dir, out, experts=cmd[cmd.index("--quantize") + 1], router="int8")
            stats = yaml.safe_load((out / "compression_statistics.yaml").read_text())
            stats["quantization"]["expert_bytes"] = {"ratio": 0.2499}  # against the teacher (compress adds it)
            (out / "compression_statistics.yaml").write_text(yaml.safe_dump(stats))
        elif name == "compress":
            shutil.copytree(tiny_lm_dir, out, dirs_exist_ok=True)
            (out / "compression_statistics.yaml").write_text("expert_bytes: {ratio: 0.4999}\n")
        elif name == "cache":
            out.write_bytes(b"")
        elif name == "calibrate":
            out.mkdir(parents=True, exist_ok=True)
        elif name in ("distill", "control"):
            steps = cmd[cmd.index('--max-steps') + 1]
            ckpt = out / f"checkpoint-{steps}"
            shutil.copytree(tiny_lm_dir, ckpt, dirs_exist_ok=True)
            (ckpt / "CHECKPOINT_COMPLETE").write_text("")
            if "--quantization" in cmd:  # QAT's packed end (moe_ds.qat)
                quantize_checkpoint(tiny_lm_dir, out / f"quantized-{steps}", experts="int8", router="int8")
        return 0.1

    return run


def test_half_finished_cell_resumes_from_its_last_phase(tmp_path, tiny_lm_dir, texts):
    """Phase records keyed by their inputs: a lost distillation record resumes with --resume, a changed distillation
    setting restarts the distillation only (its old run removed), a changed evaluation setting runs no launcher."""
    data = smoke(tmp_path, tiny_lm_dir, texts, control=False)
    cfg = parse_config(data)
    calls = []
    run = _fake_pipeline(tiny_lm_dir, calls)
    records = sweep.run_sweep(cfg, run=run)
    assert [c[0] for c in calls] == ["cache", "compress", "distill"] and records[0]["status"] == "done"
    assert "--resume" not in calls[2][1]
    cell = sweep.cell_dir(cfg, "tiny", "lowrank", 0.5)
    record = json.loads((cell / sweep.CELL_RECORD).read_text())
    assert record["phases"]["compress"]["expert_bytes_ratio"] == 0.4999

    del record["phases"]["distill"], record["phases"]["distilled"]  # killed after checkpoint-2 was written
    (cell / sweep.CELL_RECORD).write_text(json.dumps(record))
    calls.clear()
    assert sweep.run_sweep(cfg, run=run)[0]["status"] == "done"
    assert [(c[0], "--resume" in c[1], c[2]) for c in calls] == [("distill", True, True)]

    data["distill"]["learning_rate"] = 3e-4  # another student: distil again from the start
    calls.clear()
    cfg = parse_config(data)
    assert sweep.run_sweep(cfg, run=run)[0]["status"] == "done"
    assert [(c[0], "--resume" in c[1], c[2]) for c in calls] == [("distill", False, False)]

    data["evaluation"]["windows"] = 3  # only the evaluations are redone, in process
    calls.clear()
    cfg = parse_config(data)
    again = sweep.run_sweep(cfg, run=run)[0]
    assert calls == [] and again["status"] == "done"
    assert again["phases"]["zero_shot"]["key"]["eval"]["windows"] == 3


def test_records_without_their_files_report_and_remake_only_what_a_pending_phase_reads(tmp_path, tiny_lm_dir, texts):
    """The records are the results: with every model, cache and checkpoint deleted (records copied to another
    machine), a rerun runs nothing and reports the same table; a cell whose distilled evaluation is still to run
    gets back the files it reads (the cache, its compressed model, its distillation), and the control is left alone."""
    data = smoke(tmp_path, tiny_lm_dir, texts, control=True)
    cfg = parse_config(data)
    calls = []
    sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert [c[0] for c in calls] == ["cache", "control", "compress", "distill"]
    out = Path(cfg.output)
    md = (out / sweep.SWEEP_MD).read_text()
    for path in sorted(out.rglob("*"), reverse=True):  # keep cell.json and testbed.json only
        if path.is_file() and path.name not in (sweep.CELL_RECORD, sweep.TESTBED_RECORD):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    assert not (out / "tiny" / "shared" / "teacher_cache.h5").exists()
    calls.clear()
    records = sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert calls == [] and records[0]["status"] == "done"
    assert (out / sweep.SWEEP_MD).read_text() == md

    cell = sweep.cell_dir(cfg, "tiny", "lowrank", 0.5)
    record = json.loads((cell / sweep.CELL_RECORD).read_text())
    del record["phases"]["distilled"]
    (cell / sweep.CELL_RECORD).write_text(json.dumps(record))
    calls.clear()
    records = sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert [c[0] for c in calls] == ["cache", "compress", "distill"] and records[0]["status"] == "done"
    assert "--resume" not in calls[2][1]
    calls.clear()
    sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert calls == []


def test_records_are_keyed_by_paths_relative_to_the_checkout(tmp_path, monkeypatch):
    """A record written in one checkout is done in another (records copied between machines), and one written with
    absolute paths by an older version still compares equal in its own checkout."""
    key = {"teacher": f"{sweep.REPO}/runs/t", "budget": 0.5, "tasks": ["piqa"], "data_dir": "/data/shared"}
    sweep._Phases(tmp_path / "new.json", {}).save("compress", key)
    assert json.loads((tmp_path / "new.json").read_text())["phases"]["compress"]["key"]["teacher"] == "runs/t"
    (tmp_path / "old.json").write_text(json.dumps({"phases": {"compress": {"key": key}}}))
    assert sweep._Phases(tmp_path / "old.json", {}).done("compress", key)
    monkeypatch.setattr(sweep, "REPO", Path("/elsewhere/moe-ds"))
    moved = {**key, "teacher": "/elsewhere/moe-ds/runs/t"}
    assert sweep._Phases(tmp_path / "new.json", {}).done("compress", moved)
    assert not sweep._Phases(tmp_path / "new.json", {}).done("compress", {**moved, "data_dir": "/data/other"})


def test_report_of_a_sweep_still_running(tmp_path, tiny_lm_dir, texts):
    """--report-only while a sweep runs (or after it was stopped): the cell in progress reads "not finished", not
    failed; a cell not reached reads "infeasible" where its budget is, "not run" otherwise."""
    data = smoke(tmp_path, tiny_lm_dir, texts, control=False, budgets=[0.5, 0.25],
                 methods=[{"name": "lowrank"}, {"name": "prune"}])
    cfg = parse_config(data)
    cell = sweep.cell_dir(cfg, "tiny", "lowrank", 0.5)
    cell.mkdir(parents=True)
    (cell / sweep.CELL_RECORD).write_text(json.dumps({**_cell("lowrank", 0.5, 0.4999, 120.0, None, status="running"), "testbed": "tiny"}))
    testbeds, records = sweep.collect(cfg)
    assert [(r["method"], r["budget"], r["status"]) for r in records] == [
        ("lowrank", 0.5, "running"), ("lowrank", 0.25, "not run"), ("prune", 0.5, "not run"),
        ("prune", 0.25, "infeasible")]
    assert "fewer than top-k" in records[3]["error"]
    md = sweep.sweep_markdown(sweep.sweep_rows({"tiny": {"phases": {"teacher": {"ppl": 100.0}}}}, records))
    assert "| lowrank | **120.00** (+20.0 %) → not finished | not run |" in md
    assert "| prune | not run | infeasible |" in md
    assert "failed" not in md.split("\n## ", 1)[1]


def test_quantized_method_is_distilled_by_qat_of_its_full_precision_twin(tmp_path, tiny_lm_dir, texts):
    """A +int8 cell: compress --quantize writes a packed model; distillation gets its unpacked twin (the same
    values) and --quantization int8; the distilled evaluation reads QAT's packed quantized-<steps> end."""
    data = smoke(tmp_path, tiny_lm_dir, texts, control=False,
                 methods=[{"name": "lowrank+int8", "method": "lowrank", "quantize": "int8"}])
    cfg = parse_config(data)
    calls = []
    records = sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert [c[0] for c in calls] == ["cache", "compress", "distill"]
    assert records[0]["status"] == "done" and set(records[0]["phases"]) == set(sweep.CELL_PHASES)
    distill = calls[2][1]
    assert distill[distill.index("--quantization") + 1] == "int8"
    cell = sweep.cell_dir(cfg, "tiny", "lowrank+int8", 0.5)
    student = Path(distill[distill.index("--student") + 1])
    assert student == cell / "qat_student" and not is_quantized_checkpoint(student)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():  # the twin computes exactly what the packed model does
        assert torch.equal(load_model(student)(ids).logits, load_model(cell / "compressed")(ids).logits)
    # the packed end (fake: the same int8 model as the compressed one) was evaluated, not checkpoint-2 (fake: fp32)
    phases = records[0]["phases"]
    assert phases["distilled"]["ppl"] == phases["zero_shot"]["ppl"]
    assert sweep.qat_spec(sweep.MethodConfig("x", "lowrank", flags={"quantize": "int4-g64", "quantize_router": "none"})
                          ) == "experts=int4-g64,router=none"
    assert sweep.qat_spec(sweep.MethodConfig("x", "lowrank")) is None
    stats = Path(cfg.output) / "q"  # a quantized checkpoint's statistics: packed bytes under quantization
    stats.mkdir()
    (stats / "compression_statistics.yaml").write_text(
        "expert_params: {ratio: 1.875}\nbytes: {experts_original: 8, experts_compressed: 15}\n"
        "quantization: {expert_bytes: {original: 1024, compressed: 255, ratio: 0.2490234375}}\n")
    assert sweep.expert_bytes_ratio(stats) == 0.2490234375
    md = (Path(cfg.output) / sweep.SWEEP_MD).read_text()
    assert re.search(r"\| lowrank\+int8 \| \*\*([\d.]+)\*\* \([^)]*\) → \*\*\1\*\* ", md)  # fake: both the int8 model
    calls.clear()
    sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert calls == []


def test_select_restricts_methods_and_phases(tmp_path, tiny_lm_dir, texts):
    data = smoke(tmp_path, tiny_lm_dir, texts, methods=[{"name": "lowrank"}, {"name": "delta"}])
    cfg = parse_config(data)
    part = sweep.select(cfg, "delta", zero_shot=True)
    assert [m.name for m in part.methods] == ["delta"] and part.distill.steps == 0
    assert [m.name for m in cfg.methods] == ["lowrank", "delta"] and cfg.distill.steps == 2  # a copy
    keys = sweep.testbed_keys(cfg, cfg.testbeds[0])  # a subset's cells are the full sweep's
    assert (sweep.cell_keys(part, keys, part.methods[0], 0.5, "t")["zero_shot"]
            == sweep.cell_keys(cfg, keys, cfg.methods[1], 0.5, "t")["zero_shot"])
    with pytest.raises(SweepConfigError, match="unknown \\['prune'\\]"):
        sweep.select(cfg, "delta,prune")


def test_zero_shot_sweep_runs_no_cache_distillation_or_control(tmp_path, tiny_lm_dir, texts):
    """distill.steps 0: compress and the zero-shot evaluation only; the distilled phase reads "not run" in sweep.csv
    and sweep.md shows the zero-shot value alone; a rerun runs nothing, and steps > 0 later distils the same cells."""
    data = smoke(tmp_path, tiny_lm_dir, texts, control=True)
    data["distill"]["steps"] = 0
    cfg = parse_config(data)
    calls = []
    records = sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert [c[0] for c in calls] == ["compress"]
    assert records[0]["status"] == "done" and set(records[0]["phases"]) == {"compress", "zero_shot"}
    rows = list(csv.DictReader((Path(cfg.output) / sweep.SWEEP_CSV).open()))
    assert {(r["method"], r["phase"], r["status"]) for r in rows} == {
        ("teacher", "teacher", "done"), ("lowrank", "zero_shot", "done"), ("lowrank", "distilled", "not run")}
    md = (Path(cfg.output) / sweep.SWEEP_MD).read_text()
    assert re.search(r"\| lowrank \| \*\*[\d.]+\*\* \([^)]*\) \|", md) and "not run" not in md
    assert "control" not in md
    assert "zero-shot only: this sweep ran no distillation" in md and "→" not in md
    calls.clear()
    sweep.run_sweep(cfg, run=_fake_pipeline(tiny_lm_dir, calls))
    assert calls == []
    data["distill"]["steps"] = 2  # the same cells, now distilled: the compressed models are reused
    sweep.run_sweep(parse_config(data), run=_fake_pipeline(tiny_lm_dir, calls))
    assert [c[0] for c in calls] == ["cache", "control", "distill"]


def test_markdown_says_which_cells_were_not_distilled():
    """A table mixing distilled cells with zero-shot-only ones says so; the zero-shot-only cell shows one value."""
    def row(method, phase, status, ppl):
        return {"testbed": "t", "method": method, "budget": 0.5, "expert_bytes_ratio": 0.5, "phase": phase,
                "status": status, "ppl": ppl, "gap_pct": None, "tasks": {}, "mean_acc": None, "seconds": 1.0,
                "error": None}

    md = sweep.sweep_markdown([row("a", "zero_shot", "done", 120.0), row("a", "distilled", "done", 110.0),
                               row("b", "zero_shot", "done", 130.0), row("b", "distilled", "not run", None)])
    assert "zero-shot → after the same distillation" in md
    assert "A cell with one value was not distilled" in md
    assert "| a | **120.00** → **110.00** |" in md and "| b | 130.00 |" in md


def test_markdown_writes_huge_perplexities_in_scientific_notation():
    """A destroyed model's perplexity and gap read as three significant digits (2.72e+11, +3.96e+11 %), not twelve;
    values under 1e5 keep two decimals."""
    def row(method, phase, ppl):
        return {"testbed": "t", "method": method, "budget": 0.5, "expert_bytes_ratio": 0.5, "phase": phase,
                "status": "done", "ppl": ppl, "gap_pct": 100 * (ppl - 68.6) / 68.6, "tasks": {}, "mean_acc": None,
                "seconds": 1.0, "error": None}

    md = sweep.sweep_markdown([row("a", "zero_shot", 271558834659.30), row("a", "distilled", 48656.82)])
    assert "| a | **2.72e+11** (+3.96e+11 %) → **48656.82** (+70828.3 %) |" in md


@pytest.mark.slow
def test_sweep_runs_and_a_rerun_skips_finished_cells(tmp_path, tiny_lm_dir, texts):
    """1 method × 1 budget × 2 distillation steps on the tiny MoE through the launchers (nproc 1; the control, one
    more distillation of the same launcher, left out for time); a rerun runs no launcher (resuming a half-finished
    cell: test_half_finished_cell_resumes_from_its_last_phase)."""
    cfg = parse_config(smoke(tmp_path, tiny_lm_dir, texts, control=False))
    calls = []

    def counting_run(name, cmd, nproc, log_dir):
        calls.append((name, [str(c) for c in cmd]))
        return sweep.run_stage(name, cmd, nproc, log_dir)

    records = sweep.run_sweep(cfg, run=counting_run)
    assert [name for name, _ in calls] == ["cache", "compress", "distill"]
    assert [r["status"] for r in records] == ["done"], records[0].get("error")
    out = Path(cfg.output)
    cell = sweep.cell_dir(cfg, "tiny", "lowrank", 0.5)
    record = json.loads((cell / sweep.CELL_RECORD).read_text())
    assert set(record["phases"]) == set(sweep.CELL_PHASES)
    assert record["phases"]["compress"]["expert_bytes_ratio"] <= 0.5
    assert (cell / "distill" / "checkpoint-2").is_dir() and (cell / sweep.LOSS_PNG).is_file()
    rows = list(csv.DictReader(io.StringIO((out / sweep.SWEEP_CSV).read_text())))
    assert [(r["method"], r["phase"]) for r in rows] == [("teacher", "teacher"), ("lowrank", "zero_shot"),
                                                         ("lowrank", "distilled")]
    assert float(rows[2]["ppl"]) == pytest.approx(record["phases"]["distilled"]["ppl"], rel=1e-5)  # 6 digits
    assert (out / sweep.PARETO_PNG).is_file()

    calls.clear()
    again = sweep.run_sweep(cfg, run=counting_run)
    assert calls == []  # nothing ran again
    assert again[0]["phases"] == record["phases"]

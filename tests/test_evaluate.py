"""Stage 4 evaluator: local lm-eval tasks, results files, summary, the watchdog loop, locks and signals.

Most tests score a tiny model on a small local JSONL (the ``perplexity`` task, which needs no built-in
task index); the WikiText tests read the shared evaluation data (``conftest.SHARED_DATA``) and skip without it.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from watchdog.events import DirCreatedEvent, FileCreatedEvent, FileMovedEvent

from conftest import REPO, SHARED_DATA
from moe_ds.eval_tasks import render_local_tasks
from moe_ds.evaluate import (BASELINE_DIR, SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG, EvalConfig, WandbLog, flat_metrics,
                             perplexity, read_results, results_dir)
from moe_ds.run_layout import CHECKPOINT_COMPLETE, EVALUATED
from moe_ds.watch import LOCK_NAME, CheckpointWatcher, MarkerHandler, run_once

needs_data = pytest.mark.skipif(not (SHARED_DATA / "wikitext2_raw_test_docs.jsonl").is_file(),
                                reason=f"real evaluation data not found at {SHARED_DATA}")

DOCS = ["The river rose after three days of rain, and the town moved its market to the hill.",
        "She wrote the numbers down twice, because the first copy had smudged in the wet air.",
        "A small boat drifted past the old mill while the children counted the geese."]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return path


def make_checkpoint(run_dir: Path, step: int, src: Path, complete: bool = True, broken: bool = False) -> Path:
    """A ``checkpoint-<step>`` copy of ``src``; the marker is written last, as distillation does."""
    ckpt = run_dir / f"checkpoint-{step}"
    shutil.copytree(src, ckpt)
    if broken:
        (ckpt / "config.json").write_text("{ not json", encoding="utf-8")
    if complete:
        (ckpt / CHECKPOINT_COMPLETE).write_text("", encoding="utf-8")
    return ckpt


def cfg_for(run_dir, text_file, **kw) -> EvalConfig:
    return EvalConfig(watch=str(run_dir), tasks=("perplexity",), ppl_file=str(text_file), limit=2,
                      wandb_mode="disabled", rescan_s=0, debounce_s=0.2, **kw)


# ------------------------------------------------------------------------------------------- config


def test_config_rejects_bad_values(tmp_path, text_file):
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(tasks=("perplexity",), ppl_file=str(text_file))
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(watch=str(tmp_path), checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="needs ppl_file"):
        EvalConfig(watch=str(tmp_path), tasks="perplexity")
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(watch=str(tmp_path), limit=0)
    with pytest.raises(ValueError, match="whole number"):
        EvalConfig(watch=str(tmp_path), limit=2.5)
    with pytest.raises(ValueError, match="order"):
        EvalConfig(watch=str(tmp_path), order="random")
    with pytest.raises(ValueError, match="baseline"):
        EvalConfig(checkpoint=str(tmp_path), baseline=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        EvalConfig(checkpoint=str(tmp_path / "missing"))
    EvalConfig(watch=str(tmp_path / "not_yet"))  # a run that training has not created yet is fine
    cfg = EvalConfig(watch=str(tmp_path), tasks="wikitext, piqa", ppl_file=str(text_file), limit=3.0)
    assert cfg.tasks == ["wikitext", "piqa", "perplexity"] and cfg.limit == 3 and isinstance(cfg.limit, int)


def test_flat_metrics_names_task_slash_metric():
    record = {"tasks": {"wikitext": {"metrics": {"word_perplexity": 9.0, "word_perplexity_stderr": 0.5}},
                        "piqa": {"metrics": {"acc": 0.6}, "error": "..."}, "broken": {}}}
    assert flat_metrics(record) == {"wikitext/word_perplexity": 9.0, "piqa/acc": 0.6}
    assert list(flat_metrics(record, stderr=True)) == ["wikitext/word_perplexity", "wikitext/word_perplexity_stderr",
                                                       "piqa/acc"]
    assert flat_metrics(None) == {} == flat_metrics({"status": "error"})


def test_render_local_tasks_writes_absolute_paths_and_checks_files(tmp_path, text_file):
    data = tmp_path / "data"
    for rel in ("wikitext2_raw_test_docs.jsonl", "arc_easy/test.json", "arc_easy/validation.json"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="piqa"):
        render_local_tasks(tmp_path / "out0", data_dir=data)
    (data / "piqa").mkdir()
    (data / "piqa/validation.jsonl").write_text("", encoding="utf-8")
    names = render_local_tasks(tmp_path / "out", data_dir=data, text_file=text_file)
    assert names == {"wikitext": "moe_ds_wikitext2", "arc_easy": "moe_ds_arc_easy", "piqa": "moe_ds_piqa",
                     "perplexity": "moe_ds_perplexity"}
    for yaml in (tmp_path / "out").glob("*.yaml"):
        text = yaml.read_text()
        assert "@" not in text.replace("@-@", ""), yaml  # no template placeholder left
    assert f'"{data.resolve().as_posix()}/piqa/validation.jsonl"' in (tmp_path / "out/moe_ds_piqa.yaml").read_text()
    assert (tmp_path / "out/eval_task_utils.py").is_file()
    bad = tmp_path / "notes.md"
    bad.write_text("x")
    with pytest.raises(ValueError, match="jsonl"):
        render_local_tasks(tmp_path / "out2", text_file=bad)


def test_marker_handler_reacts_to_markers_not_directories(tmp_path):
    seen = []
    handler = MarkerHandler(tmp_path, seen.append)
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    handler.dispatch(DirCreatedEvent(str(ckpt)))  # a folder without its marker: nothing
    handler.dispatch(FileCreatedEvent(str(ckpt / "model.safetensors")))
    handler.dispatch(FileCreatedEvent(str(tmp_path / "other" / CHECKPOINT_COMPLETE)))  # not a checkpoint folder
    assert seen == []
    handler.dispatch(FileMovedEvent(str(ckpt / ".tmp_marker"), str(ckpt / CHECKPOINT_COMPLETE)))
    assert seen == [ckpt]
    (ckpt / CHECKPOINT_COMPLETE).touch()
    moved_in = tmp_path / "checkpoint-6"
    shutil.copytree(ckpt, moved_in)
    handler.dispatch(DirCreatedEvent(str(moved_in)))  # whole folder renamed/copied in with its marker
    assert seen == [ckpt, moved_in]


# --------------------------------------------------------------------------------------- evaluation


def _reference_word_perplexity(model_dir: Path, docs: list[str]) -> float:
    """exp(total NLL / total words), each document scored after an EOS prefix, in plain torch."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    nll, words = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[tok.eos_token_id] + tok(doc)["input_ids"]])
        assert ids.shape[1] <= model.config.max_position_embeddings  # one window, no rolling needed
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        words += len(doc.split())
    return math.exp(nll / words)


def test_perplexity_of_txt_file_matches_plain_torch(tiny_lm_dir, tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(DOCS[:2]) + "\n", encoding="utf-8")  # two paragraphs = two documents
    metrics = perplexity(tiny_lm_dir, path)
    assert set(metrics) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert metrics["word_perplexity"] == pytest.approx(_reference_word_perplexity(tiny_lm_dir, DOCS[:2]), rel=1e-4)


def test_once_baseline_exactly_once_broken_recorded_locked_skipped(tiny_lm_dir, tmp_path, text_file):
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run, 10, tiny_lm_dir, broken=True)
    make_checkpoint(run, 20, tiny_lm_dir)
    make_checkpoint(run, 30, tiny_lm_dir, complete=False)  # still being written: ignored
    locked = make_checkpoint(run, 40, tiny_lm_dir)
    (locked / "eval").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        with FileLock({str(locked / 'eval' / LOCK_NAME)!r}):
            print('locked', flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = CheckpointWatcher(cfg_for(run, text_file, baseline=str(tiny_lm_dir), once=True)).run()
    finally:
        holder.kill()
        holder.wait()
    assert done == ["baseline", "checkpoint-10", "checkpoint-20"]
    broken, good = (read_results(results_dir(run / f"checkpoint-{s}")) for s in (10, 20))
    base = read_results(run / BASELINE_DIR)
    assert broken["status"] == "error" and "load failed" in broken["error"] and broken["tasks"] == {}
    assert good["status"] == "ok" and good["step"] == 20 and good["limit"] == 2
    assert good["tasks"]["perplexity"]["n_samples"] == {"original": 3, "effective": 2}
    assert base["role"] == "baseline" and base["step"] is None
    # Same weights, same data, fixed seeds: the baseline and the copy score identically.
    assert good["tasks"]["perplexity"]["metrics"] == base["tasks"]["perplexity"]["metrics"]
    assert (results_dir(run / "checkpoint-20") / EVALUATED).is_file()
    assert not (run / "checkpoint-30" / "eval").exists()
    assert not (locked / "eval" / "results.json").exists()
    csv_lines = (run / SUMMARY_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("model,step,status,perplexity/word_perplexity")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["baseline", "checkpoint-10", "checkpoint-20"]
    assert "| checkpoint-20 | 20 | ok |" in (run / SUMMARY_MD).read_text()
    assert (run / SUMMARY_PNG).read_bytes()[:4] == b"\x89PNG"

    # A restart evaluates only what is new: the baseline never again, the lock-freed checkpoint now.
    stamp = (run / BASELINE_DIR / "results.json").stat().st_mtime_ns
    done = CheckpointWatcher(cfg_for(run, text_file, baseline=str(tiny_lm_dir), once=True)).run()
    assert done == ["checkpoint-40"]
    assert (run / BASELINE_DIR / "results.json").stat().st_mtime_ns == stamp


def test_polling_watcher_evaluates_new_checkpoint_and_stops_after_step(tiny_lm_dir, tmp_path, text_file):
    run = tmp_path / "run"  # not created yet: the evaluator is started before training
    ev = CheckpointWatcher(cfg_for(run, text_file, polling=True, poll_interval_s=0.2, stop_after_step=7))
    thread = threading.Thread(target=ev.run)
    thread.start()
    try:
        assert ev.watching.wait(timeout=60)
        ckpt = make_checkpoint(run, 7, tiny_lm_dir)
        thread.join(timeout=60)  # stop_after_step=7 ends the loop once checkpoint-7 is evaluated
        assert not thread.is_alive()
    finally:
        ev.stop.set()
        thread.join(timeout=30)
    assert ev.evaluated == ["checkpoint-7"]
    assert read_results(results_dir(ckpt))["status"] == "ok"


def test_watcher_subprocess_evaluates_checkpoint_from_other_process_and_ends_on_sigterm(
        tiny_lm_dir, tmp_path, text_file):
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run, 1, tiny_lm_dir, complete=False)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    log = (tmp_path / "evaluator.log").open("w")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch/evaluate.py"), "--watch", str(run), "--devices", "6,7",
                             "--tasks", "perplexity", "--ppl-file", str(text_file), "--limit", "2",
                             "--debounce-s", "0.2", "--rescan-s", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90
        while "waiting for" not in (tmp_path / "evaluator.log").read_text() and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "evaluator.log").read_text()
            time.sleep(0.2)
        # Another process writes a checkpoint, its marker last (atomic rename, as distillation does).
        ckpt = run / "checkpoint-2"
        writer = textwrap.dedent(f"""
            import os, shutil
            shutil.copytree({str(tiny_lm_dir)!r}, {str(ckpt)!r})
            open({str(ckpt / '.marker.tmp')!r}, 'w').close()
            os.replace({str(ckpt / '.marker.tmp')!r}, {str(ckpt / CHECKPOINT_COMPLETE)!r})
            """)
        subprocess.run([sys.executable, "-c", writer], check=True)
        marker_time = (run / "checkpoint-2" / CHECKPOINT_COMPLETE).stat().st_mtime
        evaluated = results_dir(run / "checkpoint-2") / EVALUATED
        while not evaluated.exists() and time.time() < marker_time + 30:
            time.sleep(0.1)
        assert evaluated.exists(), (tmp_path / "evaluator.log").read_text()
        latency = evaluated.stat().st_mtime - marker_time
        assert latency < 10, f"evaluated {latency:.1f} s after its marker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "evaluator.log").read_text()
    record = read_results(results_dir(run / "checkpoint-2"))
    assert record["status"] == "ok" and record["cuda_visible_devices"] == "6,7"
    assert not (run / "checkpoint-1" / "eval").exists()  # never got its marker
    assert "signal 15" in text and "evaluator done" in text


@needs_data
def test_local_wikitext_matches_lm_eval_cli(tiny_lm_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(tiny_lm_dir, ckpt)
    ours = run_once(EvalConfig(checkpoint=str(ckpt), tasks="wikitext", data_dir=str(SHARED_DATA), limit=3,
                               wandb_mode="disabled"))
    assert ours["status"] == "ok"
    include = tmp_path / "tasks"
    render_local_tasks(include, data_dir=SHARED_DATA)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt}",
                    "--tasks", "moe_ds_wikitext2", "--include_path", str(include), "--limit", "3", "--device", "cpu",
                    "--batch_size", "8", "--output_path", str(tmp_path / "cli")], check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]["moe_ds_wikitext2"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["tasks"]["wikitext"]["metrics"][metric] == pytest.approx(cli[f"{metric},none"], rel=1e-5)
    assert (ckpt / "eval" / EVALUATED).is_file()


def test_deleted_checkpoint_is_skipped(tmp_path, text_file):
    ev = CheckpointWatcher(cfg_for(tmp_path, text_file))
    gone = tmp_path / "checkpoint-9"  # announced by an event, then deleted before its turn
    assert ev._evaluate(gone, results_dir(gone), gone.name) is False
    assert not gone.exists() and ev.evaluated == []


def test_wandb_offline_logs_against_checkpoint_step_in_any_order(tmp_path):
    cfg = EvalConfig(watch=str(tmp_path), tasks="wikitext", wandb_mode="offline")
    log = WandbLog(cfg, tmp_path)
    try:
        log.log({"role": "baseline", "step": None, "tasks": {"wikitext": {"metrics": {"word_perplexity": 10.0}}}})
        log.log({"role": "checkpoint", "step": 20, "tasks": {"wikitext": {"metrics": {"word_perplexity": 12.0}}}})
        # Newest-first catch-up logs a smaller step later; the custom x-axis keeps it (wandb's step would not).
        log.log({"role": "checkpoint", "step": 10, "tasks": {"wikitext": {"metrics": {"word_perplexity": 14.0}}}})
        summary = log.run.summary
        assert summary["baseline/wikitext/word_perplexity"] == 10.0
        assert summary["eval/wikitext/word_perplexity"] == 14.0 and summary["checkpoint_step"] == 10
        assert log.run.project == "moe-compression"
    finally:
        log.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))

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
from moe_ds.cli import run
from moe_ds.evaluate import (BASELINE_DIR, SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG, EvalConfig, EvalError, TaskResolver,
                             WandbLog, evaluate_into, flat_metrics, perplexity, read_results, results_dir)
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


def _launcher():
    """launch/evaluate.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return launch


def _main_stderr(capfd, argv: list[str]) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``launch/evaluate.py ARGV`` run in this process through ``moe_ds.cli.run``."""
    launch = _launcher()
    capfd.readouterr()
    code = run("evaluate", lambda: launch.main(argv), launch.ERRORS)
    return code, capfd.readouterr().err.splitlines()


PPL = ["--tasks", "perplexity", "--ppl-file", "{t}/heldout.jsonl", "--limit", "2", "--wandb-mode", "disabled"]
UNKNOWN_TASK = ("unknown lm-eval task(s) ['nosuchtask']; wikitext/arc_easy/piqa work offline with --data-dir, "
                "perplexity with --ppl-file")
# arguments -> the one-line message after "evaluate: error: "; {t} is the test's folder, {m} the tiny model
BAD_INPUTS = {
    "missing checkpoint": (["--checkpoint", "{t}/nope", *PPL], "checkpoint='{t}/nope' does not exist"),
    "checkpoint is not a model folder": (["--checkpoint", "{t}/empty", *PPL],
                                         "checkpoint {t}/empty has no config.json: not a model folder"),
    "checkpoint without its marker": (["--checkpoint", "{t}/run/checkpoint-3", *PPL],
                                      "{t}/run/checkpoint-3 has no CHECKPOINT_COMPLETE marker: distillation is still "
                                      "writing it, or stopped before finishing it; wait for the marker, or pass "
                                      "--allow-incomplete to evaluate it as it is"),
    "missing run folder with --once": (["--watch", "{t}/nope", "--once", *PPL],
                                       "watch='{t}/nope' does not exist (--once evaluates the checkpoints already "
                                       "there)"),
    "missing baseline": (["--watch", "{t}/run", "--baseline", "{t}/nope", "--once", *PPL],
                         "baseline='{t}/nope' does not exist"),
    "checkpoint without a tokenizer": (["--checkpoint", "{t}/no_tokenizer", *PPL],
                                       "checkpoint {t}/no_tokenizer has no tokenizer files (tokenizer.json, "
                                       "tokenizer.model, vocab.json, vocab.txt or *.tiktoken)"),
    "baseline is not a model folder": (["--watch", "{t}/run", "--baseline", "{t}/empty", "--once", *PPL],
                                       "baseline {t}/empty has no config.json: not a model folder"),
    "unknown task": (["--checkpoint", "{m}", "--out", "{t}/out", "--tasks", "nosuchtask"], UNKNOWN_TASK),
    "unknown task, watching": (["--watch", "{t}/new_run", "--tasks", "nosuchtask"], UNKNOWN_TASK),
    "missing perplexity file": (["--checkpoint", "{m}", "--out", "{t}/out", "--ppl-file", "{t}/none.jsonl"],
                                "ppl_file='{t}/none.jsonl' does not exist"),
    "perplexity file of an unknown kind": (["--checkpoint", "{m}", "--out", "{t}/out", "--ppl-file", "{t}/notes.md"],
                                           "perplexity file must be .jsonl, .json or .txt, got {t}/notes.md"),
    "perplexity task without a file": (["--checkpoint", "{m}", "--tasks", "perplexity"],
                                       "task 'perplexity' needs ppl_file"),
    "missing data folder": (["--checkpoint", "{m}", "--tasks", "wikitext", "--data-dir", "{t}/nope"],
                            "data_dir='{t}/nope' does not exist"),
    "data folder without the task's files": (["--checkpoint", "{m}", "--out", "{t}/out", "--tasks", "wikitext",
                                              "--data-dir", "{t}/empty"],
                                             "--data-dir {t}/empty lacks ['wikitext2_raw_test_docs.jsonl'] needed by "
                                             "the local 'wikitext' task"),
    "output is a file": (["--checkpoint", "{m}", "--out", "{t}/a_file", *PPL], "output {t}/a_file is a file, not a "
                         "folder"),
    "output below a file": (["--checkpoint", "{m}", "--out", "{t}/a_file/eval", *PPL],
                            "cannot create output folder {t}/a_file/eval: {t}/a_file is a file"),
    "run folder is a file": (["--watch", "{t}/a_file", *PPL], "run {t}/a_file is a file, not a folder"),
    "run folder below a file": (["--watch", "{t}/a_file/run", *PPL],
                                "cannot create run folder {t}/a_file/run: {t}/a_file is a file"),
    "bad limit": (["--checkpoint", "{m}", "--limit", "0", *PPL[:4]], "limit must be > 0, got 0.0"),
}


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_lm_dir, tmp_path, text_file, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "run").mkdir()
    make_checkpoint(tmp_path / "run", 3, tiny_lm_dir, complete=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    shutil.copytree(tiny_lm_dir, tmp_path / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    args, message = BAD_INPUTS[case]
    before, handlers = _tree(tmp_path), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    code, err = _main_stderr(capfd, [a.format(t=tmp_path, m=model) for a in args])
    assert (code, err) == (2, [f"evaluate: error: {message.format(t=tmp_path, m=model)}"])
    assert _tree(tmp_path) == before  # refused before anything is written (no run folder, no eval/)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_read_only_output_is_one_line(tiny_lm_dir, tmp_path, text_file, capfd):
    # Root writes into a chmod 500 folder; sysfs refuses new files even to root.
    read_only = Path("/sys") if os.geteuid() == 0 else tmp_path / "ro"
    if read_only != Path("/sys"):
        read_only.mkdir()
        read_only.chmod(0o500)
    try:
        for args, what in ((["--checkpoint", str(tiny_lm_dir), "--out", str(read_only / "eval")], "output"),
                           (["--watch", str(read_only / "run")], "run")):
            code, err = _main_stderr(capfd, args + [a.format(t=tmp_path) for a in PPL])
            assert code == 2 and len(err) == 1, err
            assert err[0].startswith(f"evaluate: error: cannot write {what} folder {read_only}/"), err
            assert "Permission denied" in err[0]
    finally:
        if read_only != Path("/sys"):
            read_only.chmod(0o700)


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


def test_checkpoint_without_marker_only_with_allow_incomplete_and_never_in_the_summary(tiny_lm_dir, tmp_path,
                                                                                          text_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = make_checkpoint(run_dir, 3, tiny_lm_dir, complete=False)
    with pytest.raises(EvalError, match="has no CHECKPOINT_COMPLETE marker"):
        EvalConfig(checkpoint=str(ckpt), tasks="perplexity", ppl_file=str(text_file))
    record = run_once(EvalConfig(checkpoint=str(ckpt), tasks="perplexity", ppl_file=str(text_file), limit=2,
                                 wandb_mode="disabled", allow_incomplete=True))
    assert record["status"] == "ok" and record["checkpoint_complete"] is False
    assert "checkpoint-3" not in (run_dir / SUMMARY_MD).read_text()  # an unmarked checkpoint is no point of the curve


def test_rebuilt_checkpoint_is_evaluated_again_and_its_stale_row_leaves_the_summary(tiny_lm_dir, tmp_path, text_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (1, 2):
        make_checkpoint(run_dir, step, tiny_lm_dir)
    assert CheckpointWatcher(cfg_for(run_dir, text_file, once=True)).run() == ["checkpoint-1", "checkpoint-2"]
    old = read_results(results_dir(run_dir / "checkpoint-2"))
    assert set(old["fingerprint"]) == {"config.json", "model.safetensors"}
    assert "| checkpoint-2 | 2 | ok |" in (run_dir / SUMMARY_MD).read_text()

    # A --resume rebuilt checkpoint-2 (other weights, a new marker) and its old eval/ folder survived.
    other = tmp_path / "other"
    import transformers as T

    from conftest import tiny_model
    model = tiny_model("qwen3_moe", seed=5, vocab_size=T.AutoConfig.from_pretrained(tiny_lm_dir).vocab_size)
    model.config.eos_token_id = model.config.pad_token_id = T.AutoConfig.from_pretrained(tiny_lm_dir).eos_token_id
    model.save_pretrained(other)
    shutil.copy(other / "model.safetensors", run_dir / "checkpoint-2" / "model.safetensors")
    (run_dir / "checkpoint-2" / CHECKPOINT_COMPLETE).write_text('{"step": 2}', encoding="utf-8")
    from moe_ds.evaluate import write_summary

    assert [r.name for r in write_summary(run_dir)] == ["checkpoint-1"]  # the stale row leaves at once
    assert "checkpoint-2" not in (run_dir / SUMMARY_MD).read_text() + (run_dir / SUMMARY_CSV).read_text()
    assert CheckpointWatcher(cfg_for(run_dir, text_file, once=True)).run() == ["checkpoint-2"]
    new = read_results(results_dir(run_dir / "checkpoint-2"))
    assert new["status"] == "ok" and new["fingerprint"] != old["fingerprint"]
    assert flat_metrics(new) != flat_metrics(old)
    rows = (run_dir / SUMMARY_CSV).read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["checkpoint-1", "checkpoint-2"]
    assert f"{flat_metrics(new)['perplexity/word_perplexity']}" in rows[2]
    # unchanged since: not evaluated again
    assert CheckpointWatcher(cfg_for(run_dir, text_file, once=True)).run() == []


def test_watch_retries_an_error_recorded_before_the_marker(tiny_lm_dir, tmp_path, text_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = make_checkpoint(run_dir, 5, tiny_lm_dir, complete=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # still to be written when it was evaluated
        (ckpt / name).unlink()
    resolver = TaskResolver(["perplexity"], ppl_file=str(text_file))
    try:
        record = evaluate_into(ckpt, results_dir(ckpt), resolver, limit=2)
    finally:
        resolver.close()
    assert record["status"] == "error" and "no tokenizer files" in record["error"]
    assert record["checkpoint_complete"] is False and (results_dir(ckpt) / EVALUATED).is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_lm_dir / name, ckpt / name)
    (ckpt / CHECKPOINT_COMPLETE).write_text("", encoding="utf-8")
    assert CheckpointWatcher(cfg_for(run_dir, text_file, once=True)).run() == ["checkpoint-5"]  # no --retry-failed
    assert read_results(results_dir(ckpt))["status"] == "ok"


def test_full_disk_during_a_task_is_raised_not_recorded(tiny_lm_dir, tmp_path, text_file, monkeypatch):
    """A task that cannot write (e.g. the datasets cache) on a full disk: recorded as an error, it would never be
    evaluated again; raised, cli.run reports it in one line and a rerun evaluates the checkpoint."""
    import errno

    import lm_eval.evaluator

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", full)
    ckpt = make_checkpoint(tmp_path, 4, tiny_lm_dir)
    resolver = TaskResolver(["perplexity"], ppl_file=str(text_file))
    try:
        with pytest.raises(OSError, match="No space left"):
            evaluate_into(ckpt, results_dir(ckpt), resolver, limit=2)
    finally:
        resolver.close()
    assert not (results_dir(ckpt) / "results.json").exists() and not (results_dir(ckpt) / EVALUATED).exists()


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
    ckpt = make_checkpoint(tmp_path, 3, tiny_lm_dir)
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

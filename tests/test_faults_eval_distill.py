"""Fault injection for distillation and evaluation: a run SIGKILLed (its whole process group) while it writes, or
stopped by a full disk (a file-size limit, RLIMIT_FSIZE, set in the child), is finished by a plain rerun
(``--resume`` for distillation) with the outputs of an uninterrupted run, and nothing half-written is ever taken
for finished: no checkpoint without ``CHECKPOINT_COMPLETE`` is resumed from or evaluated, no results without
``EVALUATED`` reach the summary. The pattern is tests/test_faults.py's (the compression stage)."""

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from moe_ds.checkpoint import compress_model, save_compressed
from moe_ds.evaluate import (SUMMARY_CSV, EvalConfig, EvalError, flat_metrics, is_evaluated, read_results, results_dir,
                             write_summary)
from moe_ds.run_layout import CHECKPOINT_COMPLETE, EVALUATED, complete_checkpoints
from test_faults import launch

pytestmark = pytest.mark.slow

FULL_DISK = "File too large writing the output; free space and rerun the same command to resume"


# -------------------------------------------------------------------------------------------- distillation

DISTILL = ["--deepspeed", "none", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--batch-size",
           "2", "--learning-rate", "1e-3", "--report-to", "none", "--dataloader-num-workers", "0"]
CURVE = ("loss", "ce", "kl", "lr", "grad_norm")  # train_log.jsonl columns that must not depend on interruptions


@pytest.fixture(scope="module")
def distill_reference(tmp_path_factory, tiny_tokenizer, stdlib_text):
    """A student, a teacher cache, and an uninterrupted 4-step run of ``launch/distill.py`` (checkpoints 2, 4)."""
    from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher

    root = tmp_path_factory.mktemp("distill_faults")
    tok = tiny_tokenizer
    teacher, student = (tiny_model("qwen3_moe", seed=seed, vocab_size=len(tok)) for seed in (0, 1))
    for model in (teacher, student):
        model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        model.config.bos_token_id = None
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    save_compressed(compress_model(student, {"gate": 2, "up": 2, "down": 2}), root / "student", tokenizer=tok)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text[i:i + 3000]}) + "\n" for i in range(0, 30_000, 3000)))
    cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), data=str(data), output=str(root / "cache.h5"),
                                     top_k=8, seq_len=32, max_sequences=12))
    code, err, _ = launch("distill.py", *_distill_args(root, root / "reference"))
    assert code == 0, err[-3000:]
    return root


def _distill_args(root: Path, out: Path) -> list:
    return ["--student", root / "student", "--teacher-cache", root / "cache.h5", "--output", out, *DISTILL]


def _curve(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), rows  # one line per step: nothing logged twice
    return {r["step"]: {k: r[k] for k in CURVE} for r in rows}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _assert_no_unmarked_checkpoint_is_taken(out: Path, reference: Path) -> None:
    """Marked checkpoints are whole (the reference's weights); unmarked ones are refused by the evaluator."""
    for ckpt in sorted(out.glob("checkpoint-*")):
        if (ckpt / CHECKPOINT_COMPLETE).is_file():
            ours, ref = _weights(ckpt), _weights(reference / ckpt.name)
            assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), ckpt
        else:
            with pytest.raises(EvalError, match="has no CHECKPOINT_COMPLETE marker"):
                EvalConfig(checkpoint=str(ckpt), tasks="wikitext")
    assert complete_checkpoints(out) == [c for c in sorted(out.glob("checkpoint-*"))
                                         if (c / CHECKPOINT_COMPLETE).is_file()]


@pytest.mark.parametrize("fault", ["kill:checkpoint-2/model.safetensors", "kill:checkpoint-4", "fsize=100000",
                                   "fsize=200000"])
def test_distill_resumes_to_the_uninterrupted_run(distill_reference, tmp_path, fault):
    root, out = distill_reference, tmp_path / "run"
    args = _distill_args(root, out)
    if fault.startswith("fsize="):  # model.safetensors (safetensors) is 165 kB, optimizer.pt (torch.save) 361 kB
        code, err, _ = launch("distill.py", *args, fsize=int(fault.split("=")[1]))
        assert code == 2, err[-3000:]
        message = FULL_DISK if fault == "fsize=100000" else (
            f"could not write a checkpoint in {out}: torch.save failed (basic_ios::clear: iostream error); the disk "
            "may be full or a file-size limit reached: free space and rerun with --resume")
        assert err.strip().splitlines()[-1] == f"distill: error: {message}", err[-3000:]
    else:
        code, err, killed = launch("distill.py", *args, kill_when=str(out / fault.split(":")[1]))
        assert killed, f"the run ended (code {code}) before {fault}: {err[-2000:]}"
    assert not (out / "checkpoint-4" / CHECKPOINT_COMPLETE).exists()  # an interrupted run never looks finished
    _assert_no_unmarked_checkpoint_is_taken(out, root / "reference")

    code, err, _ = launch("distill.py", *args, "--resume")
    assert code == 0, err[-3000:]
    assert _curve(out) == _curve(root / "reference")
    for step in (2, 4):
        ours, ref = _weights(out / f"checkpoint-{step}"), _weights(root / "reference" / f"checkpoint-{step}")
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), step
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(c.name for c in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# ------------------------------------------------------------------------------------------------ evaluator

def _eval_args(run_dir: Path, text_file: Path) -> list:
    return ["--watch", run_dir, "--once", "--tasks", "perplexity", "--ppl-file", text_file, "--limit", "2",
            "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory, tiny_tokenizer):
    """Three checkpoints with different weights and their uninterrupted ``--watch --once`` evaluation."""
    root = tmp_path_factory.mktemp("eval_faults")
    text_file = root / "heldout.jsonl"
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The river rose after three days of rain, and the town moved its market to the hill.",
        "She wrote the numbers down twice, because the first copy had smudged in the wet air.",
        "A small boat drifted past the old mill while the children counted the geese.")), encoding="utf-8")
    for step in (1, 2, 3):
        ckpt = root / "models" / f"checkpoint-{step}"
        model = tiny_model("qwen3_moe", seed=step, vocab_size=len(tiny_tokenizer))
        model.config.eos_token_id = model.config.pad_token_id = tiny_tokenizer.eos_token_id
        model.save_pretrained(ckpt)
        tiny_tokenizer.save_pretrained(ckpt)
        (ckpt / CHECKPOINT_COMPLETE).write_text("{}")
    shutil.copytree(root / "models", root / "reference")
    code, err, _ = launch("evaluate.py", *_eval_args(root / "reference", text_file))
    assert code == 0, err[-3000:]
    return root, text_file


def _metrics(run_dir: Path) -> dict[str, dict]:
    return {c.name: flat_metrics(read_results(results_dir(c))) for c in sorted(run_dir.glob("checkpoint-*"))
            if is_evaluated(results_dir(c))}


def _assert_nothing_partial_is_read(run_dir: Path, reference: Path) -> None:
    """Every EVALUATED checkpoint holds the reference's metrics; the summary lists only those."""
    ref = _metrics(reference)
    done = _metrics(run_dir)
    assert all(done[name] == ref[name] for name in done), (done, ref)
    if (run_dir / SUMMARY_CSV).is_file():
        listed = [line.split(",")[0] for line in (run_dir / SUMMARY_CSV).read_text().splitlines()[1:]]
        assert set(listed) <= set(done), (listed, done)


@pytest.mark.parametrize("fault", ["kill:checkpoint-2/eval/.eval.lock", "kill:checkpoint-2/eval/.results.json.*.tmp",
                                   "fsize=1500", "fsize=2000", "fsize=20000"])
def test_evaluator_rerun_gives_the_uninterrupted_results(eval_reference, tmp_path, fault):
    root, text_file = eval_reference
    run_dir = tmp_path / "run"
    shutil.copytree(root / "models", run_dir)
    args = _eval_args(run_dir, text_file)
    if fault.startswith("fsize="):
        code, err, _ = launch("evaluate.py", *args, fsize=int(fault.split("=")[1]))
        assert code == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("evaluate: error: File too large writing ") and last.endswith(
            "; free space and rerun the same command to resume"), err[-3000:]
    else:
        pattern = str(run_dir / fault.split(":")[1])
        code, err, killed = launch("evaluate.py", *args, kill_when=pattern)
        if not killed:  # the temporary file lives a few ms: leave behind what a kill there would
            assert code == 0, err[-3000:]
            for step in (2, 3):
                for name in (EVALUATED, "results.json"):
                    (results_dir(run_dir / f"checkpoint-{step}") / name).unlink()
            (results_dir(run_dir / "checkpoint-2") / ".results.json.123-abcdef01.tmp").write_text('{"tasks": {')
            write_summary(run_dir)  # as it was after checkpoint-1
    assert len(_metrics(run_dir)) < 3  # the fault struck before the end
    _assert_nothing_partial_is_read(run_dir, root / "reference")

    code, err, _ = launch("evaluate.py", *args)
    assert code == 0, err[-3000:]
    assert _metrics(run_dir) == _metrics(root / "reference") and len(_metrics(run_dir)) == 3
    assert (run_dir / SUMMARY_CSV).read_text() == (root / "reference" / SUMMARY_CSV).read_text()
    assert not glob.glob(str(run_dir / "checkpoint-*" / "eval" / ".*.tmp"))  # what the kill left is cleaned up

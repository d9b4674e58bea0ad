"""The stage launchers: --help comes from each stage's config dataclass, bad input is one line and exit code 2."""

import subprocess
import sys

import pytest

from conftest import REPO, launcher_env
from moe_ds.cli import parse_config
from moe_ds.evaluate import EvalConfig
from moe_ds.toy_teacher import BuildTeacherConfig, TeacherConfig

# launcher -> (a field comment its --help must show, bad arguments, the start of the one-line error)
LAUNCHERS = {
    "cache_teacher": ("logits kept per position", ["--teacher", "{tmp}/no-teacher", "--data", "{tmp}/d.jsonl",
                                                   "--output", "{tmp}/c.h5"], "teacher '{tmp}/no-teacher' is not"),
    "evaluate": ("catch-up and queue order", ["--checkpoint", "{tmp}/no-model", "--tasks", "wikitext"],
                 "checkpoint='{tmp}/no-model' does not exist"),
    "report": ("held-out windows scored per model", ["--run", "{tmp}", "--teacher", "{tmp}", "--heldout",
                                                     "{tmp}/none.jsonl"], "heldout '{tmp}/none.jsonl' does not exist"),
    "build_toy_teacher": ("routed experts per layer (E)", ["--num-experts", "2", "--top-k", "3"],
                          "top_k=3 exceeds num_experts=2"),
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=REPO, env=launcher_env(WANDB_MODE="disabled"),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("stage", sorted(LAUNCHERS))
def test_help_shows_the_config_field_comments(stage):
    out = _run([sys.executable, f"launch/{stage}.py", "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert LAUNCHERS[stage][0] in " ".join(out.stdout.split())  # argparse wraps the help text


@pytest.mark.parametrize("stage", sorted(LAUNCHERS))
def test_bad_input_is_one_line_and_exit_2(stage, tmp_path):
    _, args, message = LAUNCHERS[stage]
    out = _run([sys.executable, f"launch/{stage}.py"] + [a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.splitlines() == [out.stderr.rstrip("\n")], out.stderr  # exactly one line
    assert out.stderr.startswith(f"{stage}: error: {message.format(tmp=tmp_path)}"), out.stderr


def test_cache_teacher_sh_passes_its_help_and_flags_through(tmp_path):
    out = _run(["bash", "launch/cache_teacher.sh", "--help"])
    assert out.returncode == 0 and "--master-port" in out.stdout
    assert LAUNCHERS["cache_teacher"][0] in " ".join(out.stdout.split())


@pytest.mark.slow
def test_cache_teacher_sh_refusal_reaches_the_caller(tmp_path):
    out = _run(["bash", "launch/cache_teacher.sh", "--nproc", "1", "--teacher", tmp_path / "no-teacher", "--data",
                tmp_path / "d.jsonl", "--output", tmp_path / "c.h5", "--top-k", "4"])
    assert out.returncode == 2
    assert f"cache_teacher: error: teacher '{tmp_path}/no-teacher' is not" in out.stderr


def test_evaluate_tasks_take_spaces_or_commas(tmp_path):
    cfg = parse_config(EvalConfig, ["--watch", str(tmp_path), "--tasks", "wikitext,piqa", "arc_easy"])
    assert cfg.tasks == ["wikitext", "piqa", "arc_easy"] and cfg.wandb_mode == "disabled"  # from $WANDB_MODE
    with pytest.raises(SystemExit):
        parse_config(EvalConfig, ["--watch", str(tmp_path), "--order", "random"])  # not a choice


def test_toy_teacher_minutes_replace_the_default_steps():
    steps = parse_config(BuildTeacherConfig, [])
    assert steps.teacher_config() == TeacherConfig() and steps.output == "runs/toy/teacher" and not steps.force
    timed = parse_config(BuildTeacherConfig, ["--minutes", "3", "--output", "x", "--force"])
    assert timed.teacher_config() == TeacherConfig(steps=None, minutes=3.0) and timed.force
    with pytest.raises(ValueError, match="exactly one"):
        parse_config(BuildTeacherConfig, ["--steps", "5", "--minutes", "3"])

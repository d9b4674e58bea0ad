"""Stage 4: evaluate every finished checkpoint of a distillation run with lm-evaluation-harness.

    python launch/evaluate.py --watch runs/qwen3-30b --devices 6,7 --baseline /models/Qwen3-30B-A3B \\
        --stop-after-step 20000          # beside distillation on GPUs 0-5; default task set, online data
    python launch/evaluate.py --watch runs/toy --baseline runs/toy/teacher --tasks wikitext,arc_easy,piqa \\
        --data-dir ../shared/data --ppl-file runs/toy/heldout.jsonl --limit 20 --polling   # CPU, offline
    python launch/evaluate.py --checkpoint runs/toy/checkpoint-100 --tasks wikitext --data-dir ../shared/data

Results: <checkpoint>/eval/results.json (+ EVALUATED), RUN_DIR/baseline_eval/, RUN_DIR/eval_summary.{csv,md,png},
wandb project moe-compression (offline unless --wandb-mode online).
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


_pin_devices(sys.argv[1:])

import argparse  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_ds.dist import setup_logging  # noqa: E402
from moe_ds.evaluate import DEFAULT_TASKS, EvalConfig  # noqa: E402
from moe_ds.watch import Evaluator, run_once  # noqa: E402


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--watch", metavar="RUN_DIR", help="evaluate checkpoint-<step>/ folders as they complete")
    mode.add_argument("--checkpoint", metavar="DIR", help="evaluate one model folder, then exit")
    p.add_argument("--out", help="--checkpoint mode: results folder (default DIR/eval)")
    p.add_argument("--baseline", metavar="DIR", help="uncompressed teacher, evaluated once per run")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma list of lm-eval task names")
    p.add_argument("--data-dir", help="offline data folder: wikitext, arc_easy, piqa use local copies")
    p.add_argument("--ppl-file", help="local .jsonl/.json/.txt file: adds the 'perplexity' task")
    p.add_argument("--limit", type=float, help="documents per task (>= 1) or fraction (< 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", default="8", help="int or 'auto'")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--devices", help="CUDA device ids, e.g. 6,7 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--order", default="oldest", choices=["oldest", "newest"], help="which checkpoints first")
    p.add_argument("--polling", action="store_true", help="polling observer (NFS and other network filesystems)")
    p.add_argument("--poll-interval-s", type=float, default=2.0)
    p.add_argument("--debounce-s", type=float, default=1.0)
    p.add_argument("--rescan-s", type=float, default=60.0, help="safety-net rescan period (0: never)")
    p.add_argument("--once", action="store_true", help="baseline + catch-up, then exit")
    p.add_argument("--stop-after-step", type=int, help="exit once a checkpoint at this step or later is evaluated")
    p.add_argument("--retry-failed", action="store_true", help="re-evaluate checkpoints whose results hold an error")
    p.add_argument("--wandb-mode", default=os.environ.get("WANDB_MODE", "offline"),
                   choices=["online", "offline", "disabled"])
    p.add_argument("--wandb-project", default="moe-compression")
    args = vars(p.parse_args(argv))
    return EvalConfig(**{f.name: args[f.name] for f in fields(EvalConfig) if f.name in args})


def main(argv=None) -> int:
    setup_logging()
    cfg = parse_args(argv)
    if cfg.watch is not None:
        Evaluator(cfg).run()
        return 0
    return 0 if run_once(cfg)["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

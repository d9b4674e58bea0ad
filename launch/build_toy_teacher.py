"""Build the demo's toy teacher: a small Qwen3-MoE trained on this Python's standard library (a fixture maker,
not a pipeline stage). Reuses a complete cached teacher with the same config and stdlib file list.

    python launch/build_toy_teacher.py --output runs/toy/teacher             # about 5 minutes on 2 CPU cores
    python launch/build_toy_teacher.py --output runs/toy/teacher --minutes 3 --force

Writes the model + tokenizer and teacher.json to --output, the corpus to <output>/../data/{train,heldout}.jsonl.
"""

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings; the BPE trainer still uses threads

from moe_ds.toy_teacher import TeacherConfig, build_teacher  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/toy/teacher", help="teacher folder (default %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"optimiser steps (default {defaults.steps}; deterministic)")
    budget.add_argument("--minutes", type=float, help="wall-clock training budget instead of a step count")
    p.add_argument("--seed", type=int, default=defaults.seed, help="init and batch-order seed")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching cached teacher exists")
    for f in dataclasses.fields(TeacherConfig):  # every other config field is a flag too, for tuning
        if f.name not in ("steps", "minutes", "seed"):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help="default %(default)s")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)}
    if args.minutes is not None:
        fields["steps"] = None
    elif args.steps is None:
        fields["steps"] = TeacherConfig.steps
    record = build_teacher(TeacherConfig(**fields), args.output, force=args.force)
    print(f"toy teacher {'(cached) ' if record['cached'] else ''}{args.output}: held-out ppl "
          f"{record['heldout_ppl']:.1f} (before training {record['heldout_ppl_before']:.1f}), "
          f"{record['params']['total'] / 1e6:.2f} M params, {record['steps']} steps, {record['seconds']:.0f} s training")
    return record


if __name__ == "__main__":
    main()

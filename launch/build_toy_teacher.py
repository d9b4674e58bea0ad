"""Build a toy teacher: a small Qwen3-MoE trained on this Python's standard library (a fixture maker, not a pipeline
stage). Reuses a complete cached teacher with the same config and stdlib file list.

    python launch/build_toy_teacher.py --output runs/toy/teacher             # the demo's, about 5 minutes on 2 CPU cores
    python launch/build_toy_teacher.py --output runs/toy/teacher --minutes 3 --force
    python launch/build_toy_teacher.py --preset strong                       # runs/toy_strong/teacher, a testbed
                                                                             # where compression hurts (issue #16)

--preset NAME starts from a named configuration (moe_ds.toy_teacher.PRESETS; flags override it) and builds into
that preset's own folder unless --output is given. Writes the model + tokenizer and teacher.json to --output, the
corpus to <output>/../data/{train,heldout}.jsonl.
"""

import argparse
import logging
import os
import sys

from moe_ds.cli import build_parser, run
from moe_ds.toy_teacher import PRESETS, BuildTeacherConfig, ToyTeacherError, build_teacher


def main(argv=None) -> None:
    parser = build_parser(BuildTeacherConfig, description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="named teacher configuration the other flags override (default: demo)")
    given = vars(parser.parse_args(argv))
    given.pop("local_rank", None)
    cfg = BuildTeacherConfig.preset(given.pop("preset", "demo"), **given)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings; the BPE trainer still uses threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = build_teacher(cfg.teacher_config(), cfg.output, force=cfg.force)
    print(f"toy teacher {'(cached) ' if record['cached'] else ''}{cfg.output}: held-out ppl "
          f"{record['heldout_ppl']:.1f} (before training {record['heldout_ppl_before']:.1f}), "
          f"{record['params']['total'] / 1e6:.2f} M params, {record['steps']} steps, "
          f"{record['seconds']:.0f} s training")


if __name__ == "__main__":
    sys.exit(run("build_toy_teacher", main, errors=(ToyTeacherError,)))

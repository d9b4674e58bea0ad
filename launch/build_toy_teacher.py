"""Build the demo's toy teacher: a small Qwen3-MoE trained on this Python's standard library (a fixture maker,
not a pipeline stage). Reuses a complete cached teacher with the same config and stdlib file list.

    python launch/build_toy_teacher.py --output runs/toy/teacher             # about 5 minutes on 2 CPU cores
    python launch/build_toy_teacher.py --output runs/toy/teacher --minutes 3 --force

Writes the model + tokenizer and teacher.json to --output, the corpus to <output>/../data/{train,heldout}.jsonl.
"""

import logging
import os
import sys

from moe_ds.cli import parse_config, run
from moe_ds.toy_teacher import BuildTeacherConfig, ToyTeacherError, build_teacher


def main(argv=None) -> None:
    cfg = parse_config(BuildTeacherConfig, argv, description=__doc__)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings; the BPE trainer still uses threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = build_teacher(cfg.teacher_config(), cfg.output, force=cfg.force)
    print(f"toy teacher {'(cached) ' if record['cached'] else ''}{cfg.output}: held-out ppl "
          f"{record['heldout_ppl']:.1f} (before training {record['heldout_ppl_before']:.1f}), "
          f"{record['params']['total'] / 1e6:.2f} M params, {record['steps']} steps, "
          f"{record['seconds']:.0f} s training")


if __name__ == "__main__":
    sys.exit(run("build_toy_teacher", main, errors=(ToyTeacherError,)))

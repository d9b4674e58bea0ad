"""The progressive cascade (issue #15): compress in steps, each student distilled before it is compressed further.

    python launch/cascade.py --config launch/cascade.example.yaml
    python launch/cascade.py --config launch/cascade.example.yaml --teacher-source original --output runs/cascade_orig

A driver process, not a DeepSpeed job: each step runs launch/compress.py and launch/distill.py on --nproc ranks (see
moe_ds.cascade). Rerun the same command to resume: finished steps are skipped. Writes step-<i>/ (source,
compressed, distill/checkpoint-*), cascade.json, cascade.md and cascade.png into --output.
"""

import sys

from moe_ds.cascade import CascadeConfig, CascadeConfigError, run_cascade
from moe_ds.cli import parse_config, run
from moe_ds.stage_runner import StageFailed


def main(argv=None) -> None:
    cfg = parse_config(CascadeConfig, argv, description=__doc__, exclude=("cascade", "compress_args", "distill_args"),
                       config_file=True, what="cascade")
    run_cascade(cfg)


if __name__ == "__main__":
    sys.exit(run("cascade", main, errors=(CascadeConfigError, StageFailed)))

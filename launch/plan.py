"""Plan a run before starting it: GPU and host memory per rank and disk of every stage, without loading weights.

    python launch/plan.py --model Qwen/Qwen3-30B-A3B --gpus 8 --rank 64 --top-k 64 --tokens 491520000 --seq-len 2048
    python launch/plan.py --model runs/toy/teacher --gpus 2 --distill-gpus 2 --target-ratio 0.28 --tokens 307200
"""

import sys

from moe_ds.arch import UnsupportedModelError
from moe_ds.cli import parse_config, run
from moe_ds.compress import CompressError
from moe_ds.plan import PlanConfig, PlanError, plan, plan_table

ERRORS = (PlanError, UnsupportedModelError, CompressError)


def main(argv=None) -> None:
    cfg = parse_config(PlanConfig, argv, description=__doc__)
    print(plan_table(plan(cfg), cfg))


if __name__ == "__main__":
    sys.exit(run("plan", main, errors=ERRORS))

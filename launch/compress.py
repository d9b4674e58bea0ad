"""Stage 1: zero-shot shared-core compression, one slice of MoE layers per DeepSpeed rank.

    deepspeed --include localhost:0,1,2,3,4,5,6,7 launch/compress.py --model Qwen/Qwen3-30B-A3B \\
        --output runs/qwen3/compressed --rank 64 --init svd
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/compress.py \\
        --model runs/toy/teacher --output runs/toy/compressed --target-ratio 0.28      # CPU
    python launch/compress.py --model runs/toy/teacher --output runs/toy/compressed --rank 8   # one process

(DeepSpeed's launcher rejects the range form localhost:0-7; list the GPUs or use --num_gpus 8.)
Rerunning the same command resumes: layers already fitted are skipped.
"""

import argparse
import sys

from moe_ds.compress import CompressConfig, compress
from moe_ds.dist import setup_logging


def parse_args(argv=None) -> CompressConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="original MoE model: local directory or Hub id")
    p.add_argument("--output", required=True, help="compressed model directory to create")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="wrapper rank r of every projection")
    size.add_argument("--target-ratio", type=float, help="pick the largest r keeping <= this fraction of expert params")
    p.add_argument("--init", choices=["spec", "svd"], default="spec", help="zero-shot start (see moe_ds/fit.py)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps per (layer, projection)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=0.0, help="stop early below this relative improvement per 50 steps")
    p.add_argument("--init-std", type=float, default=1.0, help="σ of V at the spec init")
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace results of a different configuration")
    p.add_argument("--keep-factors", action="store_true", help="keep OUTPUT/.factors after assembly")
    p.add_argument("--report-to", choices=["none", "wandb"], default="none")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the launcher
    a = vars(p.parse_args(argv))
    a.pop("local_rank")
    return CompressConfig(**a)


def main(argv=None) -> int:
    setup_logging()
    compress(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

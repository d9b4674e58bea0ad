"""Stage 1: zero-shot compression of the experts, one slice of MoE layers per DeepSpeed rank.

    deepspeed --include localhost:0,1,2,3,4,5,6,7 launch/compress.py --model Qwen/Qwen3-30B-A3B \\
        --output runs/qwen3/compressed --rank 64 --init svd
    deepspeed --include localhost:0,1,2,3,4,5,6,7 launch/compress.py --model Qwen/Qwen3-30B-A3B \\
        --output runs/qwen3/pruned --method prune --target-ratio 0.5 --calibration runs/qwen3/calibration
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/compress.py \\
        --model runs/toy/teacher --output runs/toy/compressed --target-ratio 0.28      # CPU
    python launch/compress.py --model runs/toy/teacher --output runs/toy/compressed --rank 8   # one process
    python launch/compress.py --model runs/toy/teacher --output runs/toy/q4 --target-ratio 0.25 --quantize int4-g64

--method shared_core (default), lowrank, delta, merge, prune or magnitude, or a structural step first
(prune,shared_core --num-experts 64 --rank 32 --calibration CAL); --target-ratio counts expert-storage bytes for every method.
--quantize int4-g128 stores the experts packed (--quantize-router int8 by default, none keeps it; --quantize-attention
optional; -mse ranges, with --calibration activation-weighted for dense experts); --target-ratio then counts the
packed bytes (values + scales + zero points). Loading dequantizes to bf16/fp32: storage quantization, no int4 kernels.
(DeepSpeed's launcher rejects the range form localhost:0-7; list the GPUs or use --num_gpus 8.)
Rerunning the same command resumes: layers already fitted are skipped.
"""

import sys

from moe_ds.arch import UnsupportedModelError
from moe_ds.checkpoint import CheckpointError
from moe_ds.cli import parse_config, run
from moe_ds.compress import CompressConfig, CompressError, compress
from moe_ds.dist import setup_logging
from moe_ds.run_layout import OutputError

ERRORS = (CompressError, CheckpointError, UnsupportedModelError, OutputError)


def main(argv=None) -> None:
    cfg = parse_config(CompressConfig, argv, description=__doc__)
    setup_logging()
    compress(cfg)


if __name__ == "__main__":
    sys.exit(run("compress", main, errors=ERRORS))

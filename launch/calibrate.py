"""Calibration: per-expert routing and activation statistics of an MoE model over calibration text (#12).

    deepspeed --include localhost:0,1,2,3,4,5,6,7 launch/calibrate.py --model Qwen/Qwen3-30B-A3B \\
        --data HuggingFaceFW/fineweb-edu --dataset-config sample-10BT --output runs/qwen3/calibration \\
        --num-sequences 256 --seq-len 2048
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/calibrate.py \\
        --model runs/toy/teacher --data runs/toy/data/train.jsonl --output runs/toy/calibration \\
        --num-sequences 64 --seq-len 256                                                        # CPU
    python launch/calibrate.py --model runs/toy/teacher --data runs/toy/data/train.jsonl \\
        --output runs/toy/calibration --num-sequences 64 --seq-len 256                          # one process

(DeepSpeed's launcher rejects the range form localhost:0-7; list the GPUs or use --num_gpus 8.)
Writes OUTPUT/layer-NNNNN.safetensors per MoE layer, OUTPUT/expert_usage.png and, last, OUTPUT/calibration.json.
Rerunning the same command resumes a stopped run (and returns at once on a finished one). User errors are one
line, exit code 2.
"""

import sys

from moe_ds.arch import UnsupportedModelError
from moe_ds.calibrate import CalibrateConfig, CalibrationError, calibrate
from moe_ds.checkpoint import CheckpointError
from moe_ds.cli import parse_config, run
from moe_ds.corpus import CorpusError
from moe_ds.dist import setup_logging
from moe_ds.model_files import CompressError
from moe_ds.run_layout import OutputError

ERRORS = (CalibrationError, CompressError, CheckpointError, UnsupportedModelError, CorpusError, OutputError)


def main(argv=None) -> None:
    cfg = parse_config(CalibrateConfig, argv, description=__doc__)
    setup_logging()
    calibrate(cfg)


if __name__ == "__main__":
    sys.exit(run("calibrate", main, errors=ERRORS))

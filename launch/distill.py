"""Stage 3: distil the compressed student against the cached teacher top-k logits (ZeRO-3, HF Trainer).

    deepspeed --include localhost:0,1,2,3,4,5 launch/distill.py --deepspeed ds_configs/zero3.json \\
        --student runs/qwen3/compressed --teacher-cache runs/qwen3/teacher_cache.h5 --output runs/qwen3/distill \\
        --config launch/distill_stages.example.json --batch-size 4 --bf16 --gradient-checkpointing --save-steps 300
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/distill.py --student runs/toy/compressed \\
        --teacher-cache runs/toy/teacher_cache.h5 --output runs/toy/distill --max-steps 200 --save-steps 50   # CPU

A live teacher instead of the cache (exactly one of them), with feature distillation on chosen layers:
    deepspeed --include localhost:0,1,2,3,4,5 launch/distill.py --deepspeed ds_configs/zero3.json \
        --student runs/qwen3/compressed --teacher models/Qwen3-30B-A3B --data fineweb.jsonl --seq-len 4096 \
        --teacher-placement zero3 --teacher-top-k 64 --feature-layers 8,16,24 --feature-weight 0.1 \
        --output runs/qwen3/distill_live --max-steps 1000 --bf16

--config FILE: JSON/YAML of the settings below plus "stages"; or one stage from flags: --max-steps N --groups
'PATTERN=LR_MULT[:WD]' ... (first match wins, 0 freezes). --deepspeed none: no DeepSpeed. --resume continues.
"""

import sys

from moe_ds.cache_teacher import CacheTeacherError
from moe_ds.checkpoint import CheckpointError
from moe_ds.cli import parse_config, run
from moe_ds.corpus import CorpusError
from moe_ds.distill import CheckpointWriteError, DistillConfig, DistillConfigError, run_distill
from moe_ds.features import FeatureConfigError
from moe_ds.online_teacher import OnlineTeacherError
from moe_ds.run_layout import OutputError
from moe_ds.teacher_cache import CacheFormatError, TokenizerMismatchError

ERRORS = (DistillConfigError, CheckpointError, CacheFormatError, TokenizerMismatchError, OutputError,
          CheckpointWriteError, FeatureConfigError, OnlineTeacherError, CacheTeacherError, CorpusError)


def config_from_args(argv=None) -> DistillConfig:
    return parse_config(DistillConfig, argv, description=__doc__, exclude=("stages",), config_file=True,
                        what="distillation")


def main(argv=None) -> None:
    run_distill(config_from_args(argv))


if __name__ == "__main__":
    sys.exit(run("distill", main, errors=ERRORS))

"""Stage 2: run the teacher once over the training text and cache its top-k logits in HDF5.

    deepspeed --num_gpus 8 launch/cache_teacher.py --teacher Qwen/Qwen3-30B-A3B \\
        --data HuggingFaceFW/fineweb-edu --dataset-config sample-10BT --max-sequences 250000 \\
        --output runs/qwen3/teacher_cache.h5 --top-k 64 --seq-len 2048 --batch-size 8
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/cache_teacher.py \\
        --teacher runs/toy/teacher --data runs/toy/data/train.jsonl \\
        --output runs/toy/teacher_cache.h5 --top-k 16 --seq-len 128   # CPU

Usually started through ``bash launch/cache_teacher.sh``. Rerunning the same command resumes a stopped run
(and returns at once, writing nothing, on a finished cache). User errors are one line, exit code 2.
"""

import sys

from moe_ds.cache_teacher import CacheTeacherConfig, CacheTeacherError, cache_teacher
from moe_ds.cli import parse_config, run
from moe_ds.corpus import CorpusError
from moe_ds.run_layout import OutputError
from moe_ds.teacher_cache import CacheFormatError

ERRORS = (CacheTeacherError, CorpusError, CacheFormatError, OutputError)


def main(argv=None) -> None:
    cache_teacher(parse_config(CacheTeacherConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run("cache_teacher", main, errors=ERRORS))

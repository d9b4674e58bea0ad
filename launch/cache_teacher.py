"""Stage 2: run the teacher once over the training text and cache its top-k logits in HDF5.

    deepspeed --num_gpus 8 launch/cache_teacher.py --teacher Qwen/Qwen3-30B-A3B \
        --data HuggingFaceFW/fineweb-edu --dataset-config sample-10BT --max-sequences 250000 \
        --output runs/qwen3/teacher_cache.h5 --top-k 64 --seq-len 2048 --batch-size 8
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/cache_teacher.py \
        --teacher runs/toy/teacher --data /work/shared/data/wikitext2_raw_test_docs.jsonl \
        --output runs/toy/teacher_cache.h5 --top-k 16 --seq-len 128   # CPU

Usually started through ``bash launch/cache_teacher.sh``. Rerunning the same command resumes a stopped run.
"""

import argparse
import sys

from moe_ds.cache_teacher import CacheTeacherConfig, cache_teacher


def parse_args(argv=None) -> CacheTeacherConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--data", required=True, help=".jsonl/.json/.parquet/.txt file or folder, or hub dataset name")
    p.add_argument("--output", required=True, help="cache index OUT.h5 (shards go to OUT.shards/)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per teacher forward")
    p.add_argument("--text-field", default=None, help="text column (default: 'text' or the only string column)")
    p.add_argument("--split", default="train")
    p.add_argument("--dataset-config", default=None, help="hub dataset config, e.g. sample-10BT")
    p.add_argument("--max-sequences", type=int, default=None, help="cap on packed sequences (all ranks)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--quantize", default="none", help="none | 8bit | 4bit (bitsandbytes)")
    p.add_argument("--compression", default="lzf", help="none | lzf | gzip")
    p.add_argument("--gzip-level", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="discard existing shards instead of resuming")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the launcher
    a = p.parse_args(argv)
    return CacheTeacherConfig(
        teacher=a.teacher, data=a.data, output=a.output, top_k=a.top_k, seq_len=a.seq_len, batch_size=a.batch_size,
        text_field=a.text_field, split=a.split, dataset_config=a.dataset_config, max_sequences=a.max_sequences,
        dtype=a.dtype, quantize=a.quantize, compression=a.compression, gzip_level=a.gzip_level,
        overwrite=a.overwrite, trust_remote_code=a.trust_remote_code)


def main(argv=None) -> int:
    cache_teacher(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

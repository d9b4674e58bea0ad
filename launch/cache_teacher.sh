#!/usr/bin/env bash
# Stage 2: cache the teacher's top-k logits over the training text, one DeepSpeed rank per GPU (or CPU rank).
#
#   bash launch/cache_teacher.sh --teacher Qwen/Qwen3-30B-A3B --data HuggingFaceFW/fineweb-edu \
#       --output runs/qwen3/teacher_cache.h5 --top-k 64 --seq-len 2048 --nproc 8 \
#       --dataset-config sample-10BT --max-sequences 250000 --batch-size 8
#   bash launch/cache_teacher.sh --teacher runs/toy/teacher \
#       --data /work/shared/data/wikitext2_raw_test_docs.jsonl --output runs/toy/teacher_cache.h5 \
#       --top-k 16 --seq-len 128 --nproc 2                                          # CPU
#
# Flags (environment variable in brackets; flag wins): --teacher [TEACHER] --data [DATA]
# --output [OUTPUT, default runs/teacher_cache.h5] --top-k [TOP_K, 64] --seq-len [SEQ_LEN, 2048]
# --nproc [NPROC: the GPU count, or 2 without GPUs] --master-port [MASTER_PORT: a free port].
# Any other flag goes to launch/cache_teacher.py (--batch-size, --max-sequences, --compression,
# --dtype, --quantize, --text-field, --dataset-config, --overwrite; see --help there).
# Rerunning the same command resumes a stopped run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PY=${PYTHON:-python}

TEACHER=${TEACHER:-}; DATA=${DATA:-}; OUTPUT=${OUTPUT:-runs/teacher_cache.h5}
TOP_K=${TOP_K:-64}; SEQ_LEN=${SEQ_LEN:-2048}; NPROC=${NPROC:-}; PORT=${MASTER_PORT:-}
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --teacher) TEACHER=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --output) OUTPUT=$2; shift 2 ;;
        --top-k) TOP_K=$2; shift 2 ;;
        --seq-len) SEQ_LEN=$2; shift 2 ;;
        --nproc) NPROC=$2; shift 2 ;;
        --master-port) PORT=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
if [ -z "$TEACHER" ] || [ -z "$DATA" ]; then
    echo "cache_teacher.sh: --teacher and --data are required (see --help)" >&2
    exit 2
fi

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ -z "$NPROC" ]; then
    if [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; else NPROC=2; fi
fi
if [ "$GPUS" -eq 0 ]; then
    # CPU ranks: the launcher counts NUMA nodes unless told (see shared/CPU_DEEPSPEED.md); one thread per rank.
    export LOCAL_SIZE=$NPROC OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
fi
PORT=${PORT:-$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}

exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/cache_teacher.py \
    --teacher "$TEACHER" --data "$DATA" --output "$OUTPUT" --top-k "$TOP_K" --seq-len "$SEQ_LEN" \
    ${EXTRA[@]+"${EXTRA[@]}"}

#!/usr/bin/env bash
# Stage 2: cache the teacher's top-k logits over the training text, one DeepSpeed rank per GPU (or CPU rank).
#
#   bash launch/cache_teacher.sh --teacher Qwen/Qwen3-30B-A3B --data HuggingFaceFW/fineweb-edu \
#       --output runs/qwen3/teacher_cache.h5 --top-k 64 --seq-len 2048 --nproc 8 \
#       --dataset-config sample-10BT --max-sequences 250000 --batch-size 8
#   bash launch/cache_teacher.sh --teacher runs/toy/teacher --data runs/toy/data/train.jsonl \
#       --output runs/toy/teacher_cache.h5 --top-k 16 --seq-len 128 --nproc 2          # CPU
#
# This script's own flags (environment variable in brackets; the flag wins): --nproc [NPROC: the GPU count,
# or 2 without GPUs], --master-port [MASTER_PORT: a free port]. Every other flag goes to
# launch/cache_teacher.py unchanged (--help lists them). Rerunning the same command resumes a stopped run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PY=${PYTHON:-python}

NPROC=${NPROC:-}; PORT=${MASTER_PORT:-}
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) NPROC=$2; shift 2 ;;
        --nproc=*) NPROC=${1#*=}; shift ;;
        --master-port) PORT=$2; shift 2 ;;
        --master-port=*) PORT=${1#*=}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; echo; exec $PY launch/cache_teacher.py --help ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ -z "$NPROC" ]; then
    if [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; else NPROC=2; fi
fi
if [ "$GPUS" -eq 0 ]; then
    # CPU ranks: the launcher counts NUMA nodes unless told; one thread per rank.
    export LOCAL_SIZE=$NPROC OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
fi
PORT=${PORT:-$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}

exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/cache_teacher.py ${ARGS[@]+"${ARGS[@]}"}

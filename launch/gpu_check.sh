#!/usr/bin/env bash
# `make gpu-check`: the four stages on a tiny MoE with the node's real backend (NCCL on every visible GPU;
# gloo on 2 CPU ranks where there is none), one PASS/FAIL line per stage. Logs: runs/gpu_check/<stage>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu_check}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then
    N=$GPUS; INCLUDE=localhost:$(seq -s, 0 $((N - 1))); TRAIN_DTYPE=(--bf16); EVAL_DEVICES=(--devices "$((N - 1))")
    echo "gpu-check: $N GPU(s), NCCL: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
else
    N=2; INCLUDE=localhost:0,1; TRAIN_DTYPE=(); EVAL_DEVICES=()
    export LOCAL_SIZE=2 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
    echo "gpu-check: no GPU visible, checking the same path on 2 CPU ranks with gloo"
fi
port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
FAILED=0
STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}  # seconds; a stage that hangs (e.g. a collective waiting forever) fails
stage() {  # stage NAME FILE-THAT-MUST-EXIST COMMAND...
    local name=$1 expect=$2 t0=$SECONDS; shift 2
    if timeout --kill-after=10 "$STAGE_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1 && [ -e "$expect" ]; then
        echo "PASS $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL $name ($((SECONDS - t0)) s): see $OUT/$name.log"; tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
        FAILED=1
    fi
}
rm -rf "$OUT" && mkdir -p "$OUT"

stage teacher "$OUT/teacher/teacher.json" python launch/build_toy_teacher.py --output "$OUT/teacher" \
    --vocab-size 512 --hidden-size 64 --num-layers 2 --num-heads 4 --num-kv-heads 2 --head-dim 16 \
    --num-experts 8 --top-k 2 --moe-intermediate-size 32 --seq-len 64 --steps 10 --heldout-chars 20000
stage compress "$OUT/compressed/config.json" deepspeed --include "$INCLUDE" --master_port "$(port)" \
    launch/compress.py --model "$OUT/teacher" --output "$OUT/compressed" --rank 4 --init svd --steps 20
stage cache "$OUT/teacher_cache.h5" bash launch/cache_teacher.sh --teacher "$OUT/teacher" \
    --data "$OUT/data/train.jsonl" --output "$OUT/teacher_cache.h5" --top-k 8 --seq-len 64 --nproc "$N" \
    --max-sequences $((16 * N)) --batch-size 4
stage distill "$OUT/distill/checkpoint-4/CHECKPOINT_COMPLETE" deepspeed --include "$INCLUDE" \
    --master_port "$(port)" launch/distill.py --deepspeed ds_configs/zero3.json --student "$OUT/compressed" \
    --teacher-cache "$OUT/teacher_cache.h5" --output "$OUT/distill" --max-steps 4 --save-steps 2 --batch-size 2 --report-to none \
    "${TRAIN_DTYPE[@]}"
stage evaluate "$OUT/distill/checkpoint-4/eval/results.json" python launch/evaluate.py \
    --checkpoint "$OUT/distill/checkpoint-4" --tasks perplexity --ppl-file "$OUT/data/heldout.jsonl" --limit 5 \
    "${EVAL_DEVICES[@]}"
[ "$FAILED" = 0 ] && echo "gpu-check: all stages passed" || echo "gpu-check: FAILED"
exit "$FAILED"

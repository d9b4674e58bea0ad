#!/usr/bin/env bash
# moe-ds end to end on the embedded default (`make demo`): a small Qwen3-MoE trained here on the Python standard
# library is compressed to ~28 % of its expert bytes with 2 DeepSpeed ranks (and, for comparison, by every other
# method to the same bytes), its top-k logits are cached, the compressed student is distilled under ZeRO-3 while
# the evaluator scores every checkpoint, the teacher itself is trained on by the same distillation (the control),
# and a report compares teacher, control, every method zero-shot and the distilled student. Each stage line is
# the CPU variant of the production command in the README (there: --include localhost:0,1,2,3,4,5,6,7, real
# models, GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# CPU ranks: the launcher counts NUMA nodes unless told, one thread per rank, no hub access, wandb offline.
export LOCAL_SIZE=2 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false

TOY=${TOY:-runs/toy}                 # the cached toy teacher and its corpus (reused across demos)
RUN=${RUN:-runs/demo}                # this demo's outputs
STEPS=${STEPS:-300}                  # distillation steps
SAVE=${SAVE:-50}                     # a checkpoint every SAVE steps
DATA_DIR=${DATA_DIR:-../shared/data} # WikiText-2 / ARC-Easy / PIQA copies, used when present
port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$RUN/stage_seconds.tsv"; }

rm -rf "$RUN" && mkdir -p "$RUN"
EVAL_TASKS=(--tasks perplexity --ppl-file "$TOY/data/heldout.jsonl" --limit 10)
if [ -d "$DATA_DIR" ]; then
    EVAL_TASKS=(--tasks perplexity,wikitext,arc_easy,piqa --ppl-file "$TOY/data/heldout.jsonl" --limit 10
                --data-dir "$DATA_DIR")
fi

# 0. the teacher: a fixture, trained once and cached under $TOY (not a pipeline stage)
timed teacher python launch/build_toy_teacher.py --output "$TOY/teacher"

# 1. zero-shot shared-core compression, one slice of layers per rank
timed compress deepspeed --include localhost:0,1 --master_port "$(port)" launch/compress.py \
    --model "$TOY/teacher" --output "$RUN/compressed" --target-ratio 0.28 --init svd --steps 300 --lr 1e-4

#    (for comparison only: the same ratio from the specified start, C = mean, U = 0, V ~ N(0, 1), 1000 steps)
timed compress_mean deepspeed --include localhost:0,1 --master_port "$(port)" launch/compress.py \
    --model "$TOY/teacher" --output "$RUN/compressed_mean" --target-ratio 0.28 --init mean --steps 1000 --lr 1e-3

#    (for comparison only: every other method at the same expert bytes, zero-shot. One process each, on the two
#    cores side by side: lowrank, delta and magnitude need no data, like the shared core; prune and merge choose
#    experts from a small calibration, 64 x 256 training tokens)
baseline() {
    python launch/compress.py --model "$TOY/teacher" --output "$RUN/baselines/$1" --method "$1" --target-ratio 0.28 \
        "${@:2}" > "$RUN/baselines/$1.log" 2>&1 || { tail -n 5 "$RUN/baselines/$1.log" >&2; return 1; }
}
baselines() {
    mkdir -p "$RUN/baselines"
    python launch/calibrate.py --model "$TOY/teacher" --data "$TOY/data/train.jsonl" --output "$RUN/calibration" \
        --num-sequences 64 --seq-len 256 > "$RUN/calibration.log" 2>&1 &
    local calibrate=$!
    baseline lowrank
    baseline delta
    baseline magnitude
    wait "$calibrate" || { tail -n 5 "$RUN/calibration.log" >&2; return 1; }
    baseline prune --calibration "$RUN/calibration" &
    local prune=$!
    baseline merge --calibration "$RUN/calibration"
    wait "$prune"
}
timed baselines baselines

# 2. the teacher's top-k logits over the training text, one shard per rank
timed cache bash launch/cache_teacher.sh --teacher "$TOY/teacher" --data "$TOY/data/train.jsonl" \
    --output "$RUN/teacher_cache.h5" --top-k 32 --seq-len 256 --nproc 2 --max-sequences 1200 --batch-size 8

# 4. (started first) the evaluator: the teacher as baseline, then every checkpoint as its marker appears
timed zero_shot_eval python launch/evaluate.py --checkpoint "$RUN/compressed" "${EVAL_TASKS[@]}" \
    --wandb-mode disabled
python launch/evaluate.py --watch "$RUN/distill" --baseline "$TOY/teacher" "${EVAL_TASKS[@]}" \
    --stop-after-step "$STEPS" > "$RUN/evaluator.log" 2>&1 &
EVALUATOR=$!
trap 'kill $EVALUATOR 2>/dev/null || true' EXIT

# 3. ZeRO-3 distillation of the compressed student against the cached logits
timed distill deepspeed --include localhost:0,1 --master_port "$(port)" launch/distill.py \
    --deepspeed ds_configs/zero3.json --student "$RUN/compressed" --teacher-cache "$RUN/teacher_cache.h5" \
    --output "$RUN/distill" --max-steps "$STEPS" --save-steps "$SAVE" --batch-size 4 --learning-rate 1e-4

timed evaluator_tail wait "$EVALUATOR"
trap - EXIT

#    the control: the uncompressed teacher trained on by the same distillation (launcher, cache, steps, settings),
#    so the report measures the gap closed against what the same training does without compression
timed control deepspeed --include localhost:0,1 --master_port "$(port)" launch/distill.py \
    --deepspeed ds_configs/zero3.json --student "$TOY/teacher" --teacher-cache "$RUN/teacher_cache.h5" \
    --output "$RUN/control" --max-steps "$STEPS" --save-steps "$STEPS" --batch-size 4 --learning-rate 1e-4

# the report: held-out perplexity of teacher, control, every method zero-shot and every checkpoint; gap closed
# against the control and the teacher; parameters, MACs, stage times
python launch/report.py --run "$RUN" --teacher "$TOY/teacher" --heldout "$TOY/data/heldout.jsonl"
echo "demo: $((SECONDS / 60)) min $((SECONDS % 60)) s"

"""Stage 3: distil the compressed student against the cached teacher top-k logits (ZeRO-3, HF Trainer).

    deepspeed --include localhost:0,1,2,3,4,5 launch/distill.py --deepspeed ds_configs/zero3.json \
        --student runs/qwen3/compressed --teacher-cache runs/qwen3/teacher_cache.h5 --output runs/qwen3/distill \
        --config launch/distill_stages.example.json --batch-size 4 --bf16 --gradient-checkpointing --save-steps 300
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --include localhost:0,1 launch/distill.py \
        --deepspeed ds_configs/zero3.json --student runs/toy/compressed --teacher-cache runs/toy/teacher_cache.h5 \
        --output runs/toy/distill --max-steps 200 --save-steps 50 --batch-size 4   # CPU

Settings: defaults < --config FILE (JSON/YAML with DistillConfig keys, e.g. a "stages" list) < flags.
``--group PATTERN=LR_MULT[:WEIGHT_DECAY]`` (repeatable) defines the parameter groups of a single stage; the
first matching pattern wins and a multiplier of 0 freezes. Rerun with ``--resume`` to continue a stopped run.
"""

import argparse
import sys

from moe_ds.checkpoint import CheckpointError
from moe_ds.distill import DistillConfigError, build_config, load_config_file, run_distill
from moe_ds.teacher_cache import CacheFormatError, TokenizerMismatchError

REFUSALS = (DistillConfigError, CheckpointError, CacheFormatError, TokenizerMismatchError)


def _group(text: str) -> dict:
    pattern, sep, rest = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"--group wants PATTERN=LR_MULT[:WEIGHT_DECAY], got {text!r}")
    mult, _, wd = rest.partition(":")
    try:
        return {"pattern": pattern, "lr_mult": float(mult), "weight_decay": float(wd) if wd else None}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group {text!r}: LR_MULT and WEIGHT_DECAY must be numbers") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="JSON/YAML file of settings (DistillConfig fields, including 'stages')")
    a("--deepspeed", help="DeepSpeed JSON (default ds_configs/zero3.json; 'none' for the plain Trainer)")
    a("--student", help="compressed checkpoint or HF causal LM directory")
    a("--teacher-cache", dest="teacher_cache", help="teacher top-k cache OUT.h5 from stage 2")
    a("--output", help="run directory (checkpoint-<step>/ folders, train_log.jsonl)")
    a("--tokenizer", help="tokenizer directory (default: the student's)")
    a("--max-steps", dest="max_steps", type=int)
    a("--save-steps", dest="save_steps", type=int)
    a("--alpha", type=float, help="KL weight in (1-alpha)*CE + alpha*T^2*KL (default 0.9)")
    a("--temperature", type=float, help="KD temperature (default 1)")
    a("--kd-tail", dest="kd_tail", choices=["tail", "renormalize"], help="mass outside the teacher's top-k")
    a("--kd-chunk-size", dest="kd_chunk_size", type=int, help="positions per KD-loss chunk")
    a("--learning-rate", "--lr", dest="learning_rate", type=float, help="base learning rate (default 1e-4)")
    a("--weight-decay", dest="weight_decay", type=float)
    a("--warmup-ratio", dest="warmup_ratio", type=float, help="share of each stage's steps warming up")
    a("--lr-scheduler", dest="lr_scheduler", help="transformers scheduler name (default cosine)")
    a("--batch-size", dest="batch_size", type=int, help="sequences per device per micro-step")
    a("--gradient-accumulation-steps", "--grad-accum", dest="gradient_accumulation_steps", type=int)
    a("--max-grad-norm", dest="max_grad_norm", type=float, help="gradient clipping (0: off)")
    a("--bf16", action="store_true", default=None)
    a("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    a("--seed", type=int)
    a("--no-shuffle", dest="shuffle", action="store_false", default=None, help="read the cache in order")
    a("--logging-steps", dest="logging_steps", type=int)
    a("--save-total-limit", dest="save_total_limit", type=int)
    a("--report-to", dest="report_to", help="wandb (default, offline unless WANDB_MODE is set) | none")
    a("--wandb-project", dest="wandb_project")
    a("--run-name", dest="run_name")
    a("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    a("--trust-remote-code", dest="trust_remote_code", action="store_true", default=None)
    a("--group", dest="groups", action="append", type=_group, help="PATTERN=LR_MULT[:WD], one stage")
    a("--default-lr-mult", dest="default_lr_mult", type=float, help="with --group: multiplier of the rest")
    a("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        run_distill(config_from_args(argv))
    except REFUSALS as e:  # bad input, found before the first step: the message is the whole story
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    return 0


def config_from_args(argv=None):
    ns = vars(parse_args(argv))
    ns.pop("local_rank")
    file_settings = load_config_file(ns.pop("config")) if ns.get("config") else {}
    groups, default_mult = ns.pop("groups"), ns.pop("default_lr_mult")
    if ns.get("deepspeed") == "none":
        ns["deepspeed"], file_settings["deepspeed"] = None, None
    if groups or default_mult is not None:
        if file_settings.get("stages"):
            raise DistillConfigError("--group/--default-lr-mult define one stage; the config file already has stages")
        steps = ns.get("max_steps") or file_settings.get("max_steps")
        if steps is None:
            raise DistillConfigError("--group needs --max-steps")
        ns["stages"] = [{"steps": steps, "groups": groups or [],
                         "default_lr_mult": 1.0 if default_mult is None else default_mult}]
    return build_config(file_settings, ns)


if __name__ == "__main__":
    sys.exit(main())

"""Live-teacher, feature and cascade distillation (issue #15) on the demo's toy teacher at 0.125 of its expert bytes.

    .venv/bin/python bench/live_teacher.py                   # 35 min measured on 2 loaded CPU cores
    .venv/bin/python bench/live_teacher.py --steps 60 --timing-steps 10 --cache-sequences 200   # a quick look

Every arm runs through the launchers (``--nproc`` ranks, ZeRO-3) for the same total distillation steps from the
same zero-shot start or teacher, and is scored by held-out perplexity on text no stage trained on:

- teacher, and the control: the teacher itself distilled (trained on) for the same steps from its own cache;
- zero-shot: one-shot compression to ``--ratio`` (svd start + Adam fit, the demo's settings);
- (a) one-shot + logit KD from the top-k cache;
- (b) one-shot + logit KD + feature KD from a live teacher (hidden states of every layer, beta = 0.1);
- (c) the progressive cascade 0.5 -> 0.25 -> ratio, steps/3 each, distilled from the previous student (live) and,
  separately, from the original teacher's cache.

Seconds per step of the live teacher against the cache are measured side by side in one run (two short runs with
the same settings and top-k, each timed from its train_log after its first logged step).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import print_header
from data_aware import add_common_arguments, launcher, run_stage, teacher_paths

from moe_ds.stage_runner import cache_command


def _seconds_per_step(log: Path) -> float:
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    (a, b) = rows[0], rows[-1]
    return (b["time"] - a["time"]) / max(b["step"] - a["step"], 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="shared_core", help="compression method of every arm (launch/compress.py)")
    ap.add_argument("--ratio", type=float, default=0.125, help="final expert-bytes ratio")
    ap.add_argument("--steps", type=int, default=150, help="total distillation steps of every arm")
    ap.add_argument("--timing-steps", type=int, default=30, help="steps of each timing run")
    ap.add_argument("--fit-steps", type=int, default=300, help="Adam steps of each zero-shot fit after the svd start")
    ap.add_argument("--cache-sequences", type=int, default=800)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--feature-weight", type=float, default=0.1)
    add_common_arguments(ap)
    args = ap.parse_args()
    print_header("live-teacher, feature and cascade distillation at the same total steps")

    import torch
    from transformers import AutoTokenizer

    from moe_ds.cascade import CascadeConfig, run_cascade
    from moe_ds.report import heldout_windows, token_perplexity
    from moe_ds.run_layout import complete_checkpoints

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher, train, heldout = teacher_paths(args)
    layers = ",".join(map(str, range(json.loads((teacher / "config.json").read_text())["num_hidden_layers"])))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_live_"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    tok = AutoTokenizer.from_pretrained(teacher)
    windows = heldout_windows(heldout, tok, args.seq_len, args.eval_windows)
    ppl = lambda path: float(token_perplexity(path, windows))  # noqa: E731
    common = ["--batch-size", str(args.batch_size), "--learning-rate", "1e-4", "--report-to", "none",
              "--logging-steps", "10", "--deepspeed", "ds_configs/zero3.json"]
    live = ["--teacher", str(teacher), "--data", str(train), "--seq-len", str(args.seq_len), "--max-sequences",
            str(args.cache_sequences), "--teacher-top-k", str(args.top_k)]
    fit = ["--init", "svd", "--steps", str(args.fit_steps), "--lr", "1e-4"]
    seconds = {}

    def distill(name, student, steps, extra):
        out = work / name
        if not complete_checkpoints(out) or not (out / "train_log.jsonl").is_file():
            t0 = time.time()
            run_stage(name, launcher("distill.py", args.nproc) + [
                "--student", str(student), "--output", str(out), "--max-steps", str(steps), "--save-steps", str(steps),
                "--resume", *common, *extra], args.nproc, logs)
            seconds[name] = time.time() - t0
        return complete_checkpoints(out)[-1]

    cache = work / "cache.h5"
    if not cache.is_file():
        seconds["cache"] = run_stage("cache", cache_command(teacher, train, cache, args.top_k, args.seq_len,
                                                            args.nproc, args.cache_sequences, 8), args.nproc, logs)
    compressed = work / "compressed"
    if not (compressed / "compression_statistics.yaml").is_file():
        seconds["compress"] = run_stage("compress", launcher("compress.py", args.nproc) + [
            "--model", str(teacher), "--output", str(compressed), "--method", args.method, "--target-ratio",
            str(args.ratio), "--overwrite", *fit], args.nproc, logs)

    # seconds per step, side by side: the same student, settings and top-k; cache vs live teacher
    lock = Path("/tmp/moe_bench.lock")
    lock.touch()
    try:
        timing = {}
        for name, extra in (("timing_cache", ["--teacher-cache", str(cache)]), ("timing_live", live),
                            ("timing_live_features", [*live, "--feature-layers", layers])):
            distill(name, compressed, args.timing_steps, [*extra, "--logging-steps", "1"])
            timing[name] = _seconds_per_step(work / name / "train_log.jsonl")
    finally:
        lock.unlink(missing_ok=True)

    results = {"teacher": ppl(teacher), "zero-shot": ppl(compressed)}
    results["control: teacher trained on"] = ppl(distill("control", teacher, args.steps,
                                                         ["--teacher-cache", str(cache)]))
    results["(a) one-shot + logit KD (cache)"] = ppl(distill("a_logit", compressed, args.steps,
                                                             ["--teacher-cache", str(cache)]))
    results["(b) one-shot + logit + feature KD (live)"] = ppl(distill(
        "b_feature", compressed, args.steps, [*live, "--feature-layers", layers, "--feature-weight",
                                              str(args.feature_weight)]))
    per = args.steps // 3
    for source in ("previous", "original"):
        t0 = time.time()
        cfg = CascadeConfig(teacher=str(teacher), data=str(train), heldout=str(heldout),
                            output=str(work / f"cascade_{source}"), teacher_source=source, method=args.method,
                            compress_args={"init": "svd", "steps": args.fit_steps, "lr": 1e-4},
                            distill_args={"batch_size": args.batch_size, "learning_rate": 1e-4, "report_to": "none",
                                          "logging_steps": 10, "save_steps": per},
                            cascade=[{"ratio": 0.5, "steps": per}, {"ratio": 0.25}, {"ratio": args.ratio}],
                            teacher_cache=str(cache), seq_len=args.seq_len, max_sequences=args.cache_sequences,
                            top_k=args.top_k,
                            eval_windows=args.eval_windows, nproc=args.nproc)
        steps = run_cascade(cfg, log=lambda *a: None)
        seconds[f"cascade_{source}"] = time.time() - t0
        label = "live, previous student" if source == "previous" else "cache, original teacher"
        results[f"(c) cascade 0.5 -> 0.25 -> {args.ratio} ({label})"] = steps[-1]["distilled_ppl"]
        print(f"\ncascade ({label}):\n" + (work / f"cascade_{source}" / "cascade.md").read_text(), flush=True)

    t = results["teacher"]
    print(f"\nheld-out perplexity, {args.method} at {args.ratio} of the teacher's expert bytes, {args.steps} distillation "
          f"steps of {args.nproc} x {args.batch_size} x {args.seq_len} tokens each arm ({len(windows)} x {args.seq_len} "
          "held-out tokens)\n")
    print("| arm | held-out ppl | vs teacher |")
    print("|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} | {100 * (value / t - 1):+.1f} % |")
    print(f"\nseconds per distillation step ({args.timing_steps} steps each, same student and settings, top-{args.top_k}):")
    print("| teacher | s/step | vs cache |")
    print("|---|---|---|")
    for name, label in (("timing_cache", "top-k cache"), ("timing_live", "live teacher (ZeRO-3 partitioned)"),
                        ("timing_live_features", f"live teacher + features of layers {layers}")):
        print(f"| {label} | {timing[name]:.3f} | {timing[name] / timing['timing_cache']:.2f}x |")
    print("\nwall seconds per launcher command:", json.dumps({k: round(v, 1) for k, v in seconds.items()}))
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()

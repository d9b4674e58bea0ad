"""Is a toy teacher a testbed where compression hurts? The three criteria of issue #16, measured and judged.

    .venv/bin/python bench/testbed.py --teacher runs/toy_strong/teacher   # builds the strong preset when missing
    .venv/bin/python bench/testbed.py --teacher runs/toy/teacher          # the demo's teacher, for comparison

All perplexities are token-level on the teacher's held-out modules (``moe_ds.report.token_perplexity``, the same
windows for every model; default: every window of the held-out file).

(i) mean experts — every MoE layer's experts replaced by their mean (``toy_teacher.mean_experts``; router kept):
    held-out perplexity >= --mean-factor (5) x the teacher's, i.e. the experts matter.
(ii) zero-shot compression — the best of lowrank and shared_core (svd start + --steps Adam steps) at --ratio (0.25)
    of expert bytes through ``launch/compress.py``, with the weight objective and, on one calibration
    (``launch/calibrate.py``), the activation objective: its held-out perplexity >= (1 + --gap) x the teacher's.
(iii) the control — the teacher trained on with its own training loop for the distillation budget (--control-steps
    300 x --control-batch 8 windows of the teacher's sequence length, the demo's 2 ranks x 4 sequences; AdamW lr
    1e-4, cosine after a 5 % warm-up, no weight decay; ``toy_teacher.control_config``): its held-out perplexity is
    lowered by < --control-gain (1 %), so what distillation gains is not further pre-training.

Prints the dated header, one line per measurement and a PASS/FAIL line per criterion; exits 1 when one fails.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, print_header

from moe_ds import stage_runner

FACTORISED = ("lowrank", "shared_core")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(REPO / "runs" / "toy_strong" / "teacher"), help="toy teacher folder")
    ap.add_argument("--preset", default="strong", help="toy-teacher preset built when --teacher has no model")
    ap.add_argument("--eval-windows", type=int, default=100_000, help="held-out windows scored (default: all)")
    ap.add_argument("--ratio", type=float, default=0.25, help="(ii): share of the expert bytes kept")
    ap.add_argument("--methods", nargs="+", default=list(FACTORISED), choices=FACTORISED)
    ap.add_argument("--steps", type=int, default=300, help="(ii) shared_core: Adam steps after the svd start")
    ap.add_argument("--lr", type=float, default=1e-4, help="(ii) shared_core: Adam learning rate")
    ap.add_argument("--no-activation", action="store_true", help="(ii): weight objective only (no calibration)")
    ap.add_argument("--num-sequences", type=int, default=64, help="(ii): calibration sequences")
    ap.add_argument("--heldout-tokens", type=int, default=1024, help="(ii): calibration tokens kept for the output "
                    "error")
    ap.add_argument("--control-steps", type=int, default=300)
    ap.add_argument("--control-batch", type=int, default=8, help="(iii): windows per step")
    ap.add_argument("--control-lr", type=float, default=1e-4)
    ap.add_argument("--mean-factor", type=float, default=5.0, help="(i): pass when mean-experts ppl >= this x")
    ap.add_argument("--gap", type=float, default=0.05, help="(ii): pass when the best gap is >= this")
    ap.add_argument("--control-gain", type=float, default=0.01, help="(iii): pass when the gain is < this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["i", "ii", "iii"], help="criteria not measured")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per launcher command")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--workdir", help="keep the compressed models and logs here (default: a temporary folder)")
    args = ap.parse_args()
    print_header("toy-teacher testbed: does compression hurt? (mean experts, best zero-shot method, control run)")

    import torch
    from transformers import AutoTokenizer

    from moe_ds.checkpoint import load_model
    from moe_ds.report import heldout_windows, token_perplexity
    from moe_ds.toy_teacher import (RECORD, Document, TeacherConfig, build_teacher, control_config,
                                    heldout_perplexity, mean_experts, pack, train)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher = Path(args.teacher)
    if not (teacher / "config.json").exists():
        print(f"# building the {args.preset} toy teacher at {teacher}", flush=True)
        build_teacher(TeacherConfig.preset(args.preset), teacher)
    record = json.loads((teacher / RECORD).read_text())
    data = teacher.parent / "data"
    train_file, heldout_file = data / "train.jsonl", data / "heldout.jsonl"
    cfg = TeacherConfig(**record["config"])
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    windows = heldout_windows(heldout_file, tokenizer, cfg.seq_len, args.eval_windows)
    out = {"teacher": str(teacher), "config": record["config"], "build_seconds": record.get("total_seconds"),
           "eval_tokens": windows.shape[0] * (windows.shape[1] - 1)}
    ppl = out["teacher_ppl"] = heldout_perplexity(load_model(teacher), windows)
    print(f"# teacher {teacher}: {record['params']['total'] / 1e6:.2f} M parameters, {record['steps']} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} tokens, built in {record.get('total_seconds')} s; held-out ppl "
          f"{ppl:.3f} on {windows.shape[0]} windows x {windows.shape[1]} tokens", flush=True)
    verdicts = []

    if "i" not in args.skip:
        out["mean_ppl"] = heldout_perplexity(mean_experts(load_model(teacher)), windows)
        factor = out["mean_ppl"] / ppl
        verdicts.append(("(i) mean experts", factor >= args.mean_factor,
                         f"ppl {out['mean_ppl']:.2f} = {factor:.2f} x the teacher's (need >= {args.mean_factor:g})"))
        print(f"# mean experts: {verdicts[-1][2]}", flush=True)

    if "ii" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="testbed_") as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            objectives = ["weight"] if args.no_activation else ["weight", "activation"]
            cal = work / "calibration"
            if "activation" in objectives:
                seconds = stage_runner.run_stage("calibrate", stage_runner.launcher("calibrate.py", args.nproc) + [
                    "--model", str(teacher), "--data", str(train_file), "--output", str(cal), "--num-sequences",
                    str(args.num_sequences), "--seq-len", str(cfg.seq_len), "--heldout-tokens",
                    str(args.heldout_tokens)], args.nproc, work)
                print(f"# calibration: {args.num_sequences} x {cfg.seq_len} tokens in {seconds:.1f} s", flush=True)
            out["zero_shot"] = {}
            for method in args.methods:
                for objective in objectives:
                    folder = work / f"r{args.ratio}_{method}_{objective}"
                    cmd = stage_runner.launcher("compress.py", args.nproc) + [
                        "--model", str(teacher), "--output", str(folder), "--method", method, "--target-ratio",
                        str(args.ratio), "--objective", objective, "--overwrite"]
                    if objective == "activation":
                        cmd += ["--calibration", str(cal)]
                    if method == "shared_core":
                        cmd += ["--init", "svd", "--steps", str(args.steps), "--lr", str(args.lr)]
                    seconds = stage_runner.run_stage(folder.name, cmd, args.nproc, work)
                    name = f"{method} ({objective})"
                    out["zero_shot"][name] = token_perplexity(folder, windows)
                    print(f"# {name} at {args.ratio:g} of expert bytes: ppl {out['zero_shot'][name]:.3f} "
                          f"({out['zero_shot'][name] / ppl - 1:+.2%}), {seconds:.0f} s", flush=True)
        best = min(out["zero_shot"], key=out["zero_shot"].get)
        gap = out["zero_shot"][best] / ppl - 1
        verdicts.append(("(ii) best zero-shot", gap >= args.gap, f"{best} at {args.ratio:g} of expert bytes: ppl "
                         f"{out['zero_shot'][best]:.2f}, gap {gap:+.2%} (need >= {args.gap:.0%})"))
        print(f"# {verdicts[-1][2]}", flush=True)

    if "iii" not in args.skip:
        ctrl = control_config(cfg, args.control_steps, args.control_batch, args.control_lr)
        texts = [Document(r["source"], "", r["text"]) for r in map(json.loads, train_file.open(encoding="utf-8"))]
        model = load_model(teacher)
        t0 = time.perf_counter()
        stats = train(model, pack(texts, tokenizer, cfg.seq_len, str(train_file)), ctrl)
        out["control_ppl"] = heldout_perplexity(model, windows)
        gain = 1 - out["control_ppl"] / ppl
        verdicts.append(("(iii) control", gain < args.control_gain,
                         f"{stats['steps']} steps x {ctrl.batch_size} x {ctrl.seq_len} tokens at lr {ctrl.lr:g} in "
                         f"{time.perf_counter() - t0:.0f} s: ppl {out['control_ppl']:.2f}, lowered by {gain:.2%} "
                         f"(need < {args.control_gain:.0%})"))
        print(f"# control: {verdicts[-1][2]}", flush=True)

    print(f"\nTestbed {teacher} (teacher held-out ppl {ppl:.3f}):")
    for name, ok, text in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'} {name}: {text}")
    out["verdicts"] = {name: ok for name, ok, _ in verdicts}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    sys.exit(0 if all(ok for _, ok, _ in verdicts) else 1)


if __name__ == "__main__":
    try:
        main()
    except stage_runner.StageFailed as e:
        sys.exit(str(e))

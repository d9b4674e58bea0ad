"""Quantized experts (issue #14): bytes per expert parameter, load and forward time, and what QAT recovers.

    .venv/bin/python bench/quantize.py                   # the demo's toy teacher (built once, ~6 min); ~8 min
    .venv/bin/python bench/quantize.py --steps 50

1. Storage: bytes per expert parameter of the packed format (``moe_ds.quantize.packed_bytes``: values, scales, zero
   points) at the toy's and at Qwen3-30B-A3B's expert shapes, against 16-bit weights.
2. The toy teacher's shared-core student (``launch/compress.py``, svd start, the demo's ratio) and its teacher cache
   (``launch/cache_teacher.sh``); then, on held-out text, perplexity of
   - the full-precision student, zero-shot, and its post-training quantization (PTQ, ``quantize_checkpoint``);
   - the student distilled ``--steps`` steps at full precision (2-rank ZeRO-3), and that model's PTQ;
   - the student distilled the same steps with quantization-aware training (``--quantization``: fake-quantized
     experts and router, straight-through gradients) and written really quantized at the end (``quantized-<step>``).
   QAT's recovery is the share of the PTQ gap (PTQ of the distilled model − the distilled model) it closes:
   (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_full). The issue's goal: >= 80 %.
3. Load and forward seconds of the full-precision and the quantized checkpoint (the quantized one is dequantized at
   load: weight-only storage quantization, the forward runs the same dense kernels).

The toy's d = I = 192 is not a multiple of 128, so its experts use int4 groups of 64 (``--spec``); the Qwen3 row
is int4-g128.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import print_header
from data_aware import add_common_arguments, launcher, run_stage, teacher_paths

from moe_ds.stage_runner import cache_command


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="int4-g64", help="experts' quantization (the router is int8)")
    ap.add_argument("--target-ratio", type=float, default=0.28, help="the student's expert-parameter ratio (the demo's)")
    ap.add_argument("--steps", type=int, default=100, help="distillation steps of both runs")
    ap.add_argument("--fit-steps", type=int, default=300, help="Adam steps of the zero-shot fit after the svd start")
    ap.add_argument("--cache-sequences", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=4)
    add_common_arguments(ap)
    args = ap.parse_args()
    print_header("quantized experts: bytes per parameter, PTQ vs QAT perplexity, load and forward time")

    import torch
    from transformers import AutoTokenizer

    from moe_ds.checkpoint import load_model
    from moe_ds.quantize import QuantSpec, packed_bytes
    from moe_ds.quantized_checkpoint import quantize_checkpoint
    from moe_ds.report import heldout_windows, token_perplexity

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher, train, heldout = teacher_paths(args)
    QuantSpec.parse(args.spec)  # a bad --spec fails here, before any stage runs
    print("\n| shape [E, N, K] | spec | bytes per expert parameter | vs 16-bit |")
    print("|---|---|---|---|")
    for shape, s in (((8, 192, 192), args.spec), ((128, 768, 2048), "int4-g128"), ((128, 2048, 768), "int4-g128"),
                     ((128, 768, 2048), "int8")):
        per = packed_bytes(shape, s) / (shape[0] * shape[1] * shape[2])
        print(f"| {list(shape)} | {s} | {per:.4f} | {per / 2:.3f}x |")
    print(flush=True)

    with tempfile.TemporaryDirectory(prefix="quantize_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        windows = heldout_windows(heldout, AutoTokenizer.from_pretrained(teacher), args.seq_len, args.eval_windows)
        ppl = {"teacher": token_perplexity(teacher, windows)}
        seconds = {}
        student = work / "student"
        seconds["compress"] = run_stage("compress", launcher("compress.py", args.nproc) + [
            "--model", str(teacher), "--output", str(student), "--target-ratio", str(args.target_ratio), "--init", "svd",
            "--steps", str(args.fit_steps), "--lr", "1e-4", "--overwrite"], args.nproc, work)
        cache = work / "teacher_cache.h5"
        seconds["cache"] = run_stage("cache", cache_command(teacher, train, cache, 32, args.seq_len, args.nproc,
                                                            args.cache_sequences, 8), args.nproc, work)
        runs = {}
        for name, extra in (("full", []), ("qat", ["--quantization", args.spec])):
            out = work / f"distill_{name}"
            seconds[f"distill {name}"] = run_stage(f"distill_{name}", launcher("distill.py", args.nproc) + [
                "--deepspeed", "ds_configs/zero3.json", "--student", str(student), "--teacher-cache", str(cache),
                "--output", str(out), "--max-steps", str(args.steps), "--save-steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--learning-rate", "1e-4", "--report-to", "none",
                *extra], args.nproc, work)
            runs[name] = out
        distilled = runs["full"] / f"checkpoint-{args.steps}"
        qat = runs["qat"] / f"quantized-{args.steps}"
        ptq = {"zero-shot": quantize_checkpoint(student, work / "ptq_zero_shot", experts=args.spec, router="int8",
                                                overwrite=True),
               "distilled": quantize_checkpoint(distilled, work / "ptq_distilled", experts=args.spec, router="int8",
                                                overwrite=True)}
        ppl.update({"zero-shot": token_perplexity(student, windows),
                    "zero-shot PTQ": token_perplexity(ptq["zero-shot"], windows),
                    "distilled": token_perplexity(distilled, windows),
                    "distilled PTQ": token_perplexity(ptq["distilled"], windows),
                    "QAT": token_perplexity(qat, windows)})
        timing = {}
        for name, path in (("full precision", distilled), (f"{args.spec} (dequantized at load)", qat)):
            t0 = time.perf_counter()
            model = load_model(path)
            load = time.perf_counter() - t0
            with torch.no_grad():
                model(windows[:8])
                t0 = time.perf_counter()
                for _ in range(3):
                    model(windows[:8])
            timing[name] = (load, (time.perf_counter() - t0) / 3)
            del model
        sizes = {name: sum(f.stat().st_size for f in path.glob("*.safetensors"))
                 for name, path in (("full", distilled), ("qat", qat))}

    print(f"\nHeld-out perplexity ({windows.shape[0]} windows x {windows.shape[1]} tokens), experts {args.spec}, "
          f"router int8, {args.steps} distillation steps each, {args.nproc} ranks:\n")
    print("| model | held-out ppl |")
    print("|---|---|")
    for name in ("teacher", "zero-shot", "zero-shot PTQ", "distilled", "distilled PTQ", "QAT"):
        label = {"QAT": f"QAT-distilled ({args.steps} steps), written quantized",
                 "distilled": f"distilled at full precision ({args.steps} steps)",
                 "distilled PTQ": "distilled, then PTQ"}.get(name, name)
        print(f"| {label} | {ppl[name]:.3f} |")
    gap = ppl["distilled PTQ"] - ppl["distilled"]
    recovery = (ppl["distilled PTQ"] - ppl["QAT"]) / gap if gap > 0 else float("nan")
    print(f"\nPTQ gap after distillation {gap:+.3f}; QAT closes {recovery:.1%} of it (goal >= 80 %): "
          f"{'met' if recovery >= 0.8 else 'NOT met'}")
    print(f"checkpoint weights: full precision {sizes['full'] / 1e6:.2f} MB, quantized {sizes['qat'] / 1e6:.2f} MB")
    print("\n| checkpoint | load s | forward s (8 x 256 tokens) |")
    print("|---|---|---|")
    for name, (load, fwd) in timing.items():
        print(f"| {name} | {load:.2f} | {fwd:.3f} |")
    print("\nstage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()

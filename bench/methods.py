"""Every compression method at the same expert-storage bytes (issue #13): held-out perplexity zero-shot and fit time.

    .venv/bin/python bench/methods.py                            # the demo's toy teacher (built once, ~6 min)
    .venv/bin/python bench/methods.py --ratios 0.25 --methods lowrank prune

Each method compresses the teacher through ``launch/compress.py --method M --target-ratio R`` on ``--nproc`` ranks,
with one calibration (``launch/calibrate.py``) shared by all: the structural methods choose experts from it, and
the factorised ones (shared_core, lowrank, delta) are run twice, with the weight objective and with the activation
objective on it. ``--target-ratio`` counts expert-storage bytes (``moe_ds.budget``), so every row of a budget stores
at most that share of the original experts' bytes; the "expert bytes" column is what the checkpoint's
compression_statistics.yaml says it stores. Perplexity is measured on held-out text neither the calibration nor the
teacher's training saw. The teacher row is the control; rows a budget cannot reach (pruning or merging below top-k
experts) say so. Seconds are wall-clock per launcher command, process start included.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml
from common import print_header
from data_aware import add_common_arguments, launcher, run_stage, teacher_paths

FACTORISED = ("shared_core", "lowrank", "delta")
METHODS = ("shared_core", "lowrank", "delta", "merge", "prune", "magnitude")


def stored_ratio(folder: Path) -> float:
    """Expert-storage bytes / the original's, as the checkpoint's compression_statistics.yaml records them."""
    stats = yaml.safe_load((folder / "compression_statistics.yaml").read_text())
    if "expert_bytes" in stats:
        return stats["expert_bytes"]["ratio"]
    return stats["bytes"]["experts_compressed"] / stats["bytes"]["experts_original"]


def describe(folder: Path, experts: int) -> str:
    """What the budget bought: rank, experts kept or density."""
    stats = yaml.safe_load((folder / "compression_statistics.yaml").read_text())
    if stats.get("density") is not None:
        return f"density {stats['density']:.3f}"
    parts = []
    if stats.get("kept_experts") not in (None, experts):
        parts.append(f"{stats['kept_experts']} of {experts} experts")
    rank = stats.get("rank", (stats.get("ranks") or {}).get("gate"))
    if rank is not None:
        parts.append(f"rank {rank}")
    return ", ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=300, help="shared_core: Adam steps after the svd start")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--num-sequences", type=int, default=64, help="calibration sequences")
    ap.add_argument("--heldout-tokens", type=int, default=1024, help="calibration tokens kept for the output error")
    add_common_arguments(ap)
    args = ap.parse_args()
    print_header("compression methods at equal expert bytes: zero-shot held-out perplexity and fit time")

    import torch
    from transformers import AutoTokenizer

    from moe_ds.budget import BudgetError, kept_experts_for_ratio
    from moe_ds.report import heldout_windows, token_perplexity

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher, train, heldout = teacher_paths(args)
    config = yaml.safe_load((teacher / "config.json").read_text())
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    top_k = config["num_experts_per_tok"]
    with tempfile.TemporaryDirectory(prefix="methods_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        windows = heldout_windows(heldout, AutoTokenizer.from_pretrained(teacher), args.seq_len, args.eval_windows)
        teacher_ppl = token_perplexity(teacher, windows)
        print(f"# teacher {teacher}: E = {experts}, top-{top_k}; held-out perplexity {teacher_ppl:.3f} on "
              f"{windows.shape[0]} windows x {windows.shape[1]} tokens of {heldout}", flush=True)
        cal = work / "calibration"
        cal_seconds = run_stage("calibrate", launcher("calibrate.py", args.nproc) + [
            "--model", str(teacher), "--data", str(train), "--output", str(cal), "--num-sequences",
            str(args.num_sequences), "--seq-len", str(args.seq_len), "--heldout-tokens", str(args.heldout_tokens)],
            args.nproc, work)
        print(f"# calibration: {args.num_sequences} x {args.seq_len} tokens of {train} in {cal_seconds:.1f} s", flush=True)

        rows = []
        for ratio in args.ratios:
            for method in args.methods:
                for objective in (("weight", "activation") if method in FACTORISED else ("activation",)):
                    name = method if method not in FACTORISED else f"{method} ({objective})"
                    if method in ("prune", "merge"):
                        try:
                            kept_experts_for_ratio(ratio, experts, top_k)
                        except BudgetError:
                            rows.append({"target": ratio, "method": name, "skip": f"needs >= top-k = {top_k} "
                                         f"experts (ratio >= {top_k / experts:.3f})"})
                            continue
                    out = work / f"r{ratio}_{method}_{objective}"
                    cmd = launcher("compress.py", args.nproc) + [
                        "--model", str(teacher), "--output", str(out), "--method", method, "--target-ratio", str(ratio),
                        "--calibration", str(cal), "--objective", objective, "--overwrite"]
                    if method == "shared_core":
                        cmd += ["--init", "svd", "--steps", str(args.steps), "--lr", str(args.lr)]
                    seconds = run_stage(out.name, cmd, args.nproc, work)
                    stats = yaml.safe_load((out / "compression_statistics.yaml").read_text())
                    out_err = stats.get("output_error") or {}
                    row = {"target": ratio, "method": name, "seconds": seconds, "bytes": stored_ratio(out),
                           "what": describe(out, experts), "ppl": token_perplexity(out, windows),
                           "output_error": sum(out_err.values()) / len(out_err) if out_err else float("nan")}
                    rows.append(row)
                    print(f"# {ratio} {name}: ppl {row['ppl']:.3f}, {seconds:.1f} s", flush=True)

    print(f"\nTeacher held-out perplexity {teacher_ppl:.3f} (the control). Zero-shot students, {args.nproc} rank(s); "
          f"calibration {cal_seconds:.1f} s:\n")
    print("| target | method (objective) | setting | expert bytes | held-out ppl | ppl / teacher | output err | compress s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skip" in r:
            print(f"| {r['target']} | {r['method']} | — | — | {r['skip']} | | | |")
            continue
        print(f"| {r['target']} | {r['method']} | {r['what']} | {r['bytes']:.4f} | {r['ppl']:.3f} | "
              f"{r['ppl'] / teacher_ppl:.3f} | {r['output_error']:.4f} | {r['seconds']:.1f} |")
    print("\nBest zero-shot method per budget:")
    for ratio in args.ratios:
        done = [r for r in rows if r["target"] == ratio and "ppl" in r]
        if done:
            best = min(done, key=lambda r: r["ppl"])
            print(f"  {ratio}: {best['method']} ({best['ppl']:.3f}, {best['ppl'] / teacher_ppl:.3f}x the teacher)")
    over = [r for r in rows if "bytes" in r and r["bytes"] > r["target"] + 1e-9]
    if over:
        sys.exit(f"budget exceeded: {[(r['target'], r['method'], r['bytes']) for r in over]}")


if __name__ == "__main__":
    main()

"""The progressive cascade: compress in steps, each student distilled before it is compressed further.

    launch/cascade.py --config launch/cascade.example.yaml

A recipe ``cascade: [{ratio: 0.5, steps: N}, {ratio: 0.25}, {ratio: 0.125}]`` (ratios of the ORIGINAL teacher's
expert bytes) runs, for step i, through the same launchers a user would:

1. the source: the original teacher (i = 0), else step i - 1's distilled student, exported as a stock checkpoint
   (``moe_ds.checkpoint.export_dense``: a shared-core or low-rank student's experts reconstructed) so that any
   compression method can take it;
2. ``launch/compress.py`` to ``ratio_i / s_i`` of the source's expert bytes, s_i being the source's expert bytes over
   the original's (1 for a dense export of an unpruned model; the kept share after pruning);
3. ``launch/distill.py`` for ``steps`` (a step without ``steps`` takes the previous one's) from
   ``teacher_source: previous`` — the previous student (the original teacher for i = 0) as a live teacher on the
   training text — or ``original`` — the original teacher's top-k cache, built once;
4. held-out perplexity of the zero-shot and the distilled student.

The background notes' example shrinks 4.15M -> 1M -> 250K -> 83K parameters, each student teaching the next.
Every step writes ``step-<i>/result.json`` last (atomically); a rerun skips finished steps and resumes a stopped
one (a complete compressed model is kept, distillation continues with ``--resume``). The run folder gets
``cascade.json`` (teacher and every step), ``cascade.md`` and ``cascade.png`` (expert-bytes ratio vs held-out
perplexity, zero-shot and distilled, the teacher as a line; and the loss terms of every step).
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .cli import ConfigError, from_mapping
from .run_layout import write_atomic, write_json_atomic

TeacherSource = Literal["previous", "original"]
RESULT = "result.json"  # step-<i>/result.json: written last, marks the step done


class CascadeConfigError(ConfigError):
    """A cascade recipe is unusable (the message names the key)."""


@dataclass
class CascadeStep:
    ratio: float  # expert bytes of this step's student / the ORIGINAL teacher's, in (0, 1)
    steps: int | None = None  # distillation steps of this step (None: the previous step's)

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise CascadeConfigError(f"cascade step ratio must be in (0, 1), got {self.ratio!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise CascadeConfigError(f"cascade step steps must be an integer >= 1, got {self.steps!r}")


@dataclass
class CascadeConfig:
    teacher: str  # the original teacher (model folder)
    data: str  # training text (.jsonl/.json/.parquet/.txt file or folder): the cache's or the live teacher's
    heldout: str  # held-out text (.jsonl with "text") for perplexity
    output: str  # run folder: step-<i>/, cascade.json/.md/.png
    cascade: list[CascadeStep] = field(default_factory=list)  # the ratios, decreasing, and steps
    teacher_source: TeacherSource = "previous"  # previous: the previous student live; original: the teacher's cache
    method: str = "shared_core"  # launch/compress.py --method
    compress_args: dict = field(default_factory=dict)  # other launch/compress.py flags, e.g. {steps: 300, init: svd}
    distill_args: dict = field(default_factory=dict)  # other launch/distill.py flags, e.g. {batch_size: 4}
    seq_len: int = 256  # tokens per training sequence (cache and live teacher alike) and per held-out window
    max_sequences: int | None = 1200  # cap on packed training sequences
    top_k: int = 32  # cache top-k (teacher_source original) and the live teacher's (previous; None-like 0: full)
    eval_windows: int = 64  # held-out windows of seq_len tokens
    nproc: int = 2  # ranks per launcher command
    deepspeed: str = "ds_configs/zero3.json"  # distillation's DeepSpeed config
    teacher_cache: str | None = None  # teacher_source original: an existing cache of the teacher (else built once)

    def __post_init__(self):
        if not self.cascade:
            raise CascadeConfigError("cascade: give at least one step, e.g. [{ratio: 0.5, steps: 100}, {ratio: 0.25}]")
        steps = []
        for s in self.cascade:
            if isinstance(s, CascadeStep):
                steps.append(s)
                continue
            try:
                steps.append(from_mapping(CascadeStep, s, "cascade step"))
            except ConfigError as e:
                raise CascadeConfigError(str(e)) from None
        self.cascade = steps
        if self.cascade[0].steps is None:
            raise CascadeConfigError("cascade: the first step needs steps (later ones default to the previous)")
        ratios = [s.ratio for s in self.cascade]
        if any(b >= a for a, b in zip(ratios, ratios[1:])):
            raise CascadeConfigError(f"cascade ratios must decrease step by step, got {ratios}")
        if self.teacher_source not in ("previous", "original"):
            raise CascadeConfigError(f"teacher_source must be previous or original, got {self.teacher_source!r}")
        for name in ("compress_args", "distill_args"):
            if not isinstance(getattr(self, name), dict):
                raise CascadeConfigError(f"{name} must be a mapping of launcher flags, got {getattr(self, name)!r}")
        owned = {"model", "output", "target_ratio", "method", "rank"} & {k.replace("-", "_") for k in self.compress_args}
        if owned:
            raise CascadeConfigError(f"compress_args may not set {sorted(owned)}: the cascade sets them per step")
        owned = {"student", "output", "teacher", "teacher_cache", "data", "max_steps", "resume", "seq_len",
                 "max_sequences", "deepspeed", "teacher_top_k"} & {k.replace("-", "_") for k in self.distill_args}
        if owned:
            raise CascadeConfigError(f"distill_args may not set {sorted(owned)}: the cascade sets them per step")
        for name, lo in (("seq_len", 2), ("top_k", 0), ("eval_windows", 1), ("nproc", 1)):
            if getattr(self, name) < lo:
                raise CascadeConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.teacher_cache is not None and self.teacher_source != "original":
            raise CascadeConfigError("teacher_cache is the original teacher's cache: it needs teacher_source original")
        if self.teacher_cache is not None and not Path(self.teacher_cache).is_file():
            raise CascadeConfigError(f"teacher_cache {self.teacher_cache} does not exist")
        for name in ("teacher", "data", "heldout"):
            if not Path(getattr(self, name)).exists():
                raise CascadeConfigError(f"{name} {getattr(self, name)} does not exist")
        if not (Path(self.teacher) / "config.json").is_file():
            raise CascadeConfigError(f"teacher {self.teacher} is not a model folder (no config.json)")

    def step_counts(self) -> list[int]:
        """Distillation steps of every cascade step (a missing one: the previous step's)."""
        out, last = [], None
        for s in self.cascade:
            last = s.steps if s.steps is not None else last
            out.append(last)
        return out


def _flags(args: dict) -> list[str]:
    """``{batch_size: 4, bf16: true}`` as ``--batch-size 4 --bf16`` (false booleans left out)."""
    out = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        else:
            out += [flag, str(value)]
    return out


def expert_bytes(model_dir: str | Path) -> int:
    """Bytes of the routed experts' weights stored in a stock checkpoint (safetensors headers only): every tensor
    whose name holds ``.mlp.experts.`` (per-expert keys on disk; shared experts are not routed experts)."""
    from .checkpoint import open_safetensors, read_weight_map

    path = Path(model_dir)
    total = 0
    for name in sorted(set(read_weight_map(path).values())):
        with open_safetensors(path / name) as f:
            for key in f.keys():
                if ".mlp.experts." in key:
                    sl = f.get_slice(key)
                    size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}[sl.get_dtype()]
                    total += math.prod(sl.get_shape()) * size
    return total


def _ppl(model_dir: Path, windows) -> float:
    from .report import token_perplexity

    return round(float(token_perplexity(model_dir, windows)), 4)


def _achieved_ratio(compressed: Path) -> float:
    import yaml

    from .report import expert_bytes_ratio

    return expert_bytes_ratio(yaml.safe_load((compressed / "compression_statistics.yaml").read_text()))


def run_cascade(cfg: CascadeConfig, log=print) -> list[dict]:
    """Run (or resume) the cascade; returns every step's result.

    Raises:
        moe_ds.stage_runner.StageFailed: a launcher failed (its log's tail in the message); rerun to resume.
    """
    from transformers import AutoTokenizer

    from .checkpoint import export_dense, is_compressed_checkpoint, is_quantized_checkpoint
    from .report import heldout_windows
    from .run_layout import complete_checkpoints
    from .stage_runner import cache_command, launcher, run_stage

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    write_json_atomic(out / "cascade_config.json", _to_dict(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    windows = heldout_windows(cfg.heldout, tokenizer, cfg.seq_len, cfg.eval_windows)
    summary_file = out / "cascade.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if summary.get("teacher_ppl") is None:
        summary = {"teacher": str(Path(cfg.teacher).resolve()), "teacher_ppl": _ppl(Path(cfg.teacher), windows),
                   "teacher_source": cfg.teacher_source, "method": cfg.method, "steps": []}
        write_json_atomic(summary_file, summary)
    log(f"teacher {cfg.teacher}: held-out perplexity {summary['teacher_ppl']:.2f} on {len(windows)} x {cfg.seq_len} "
        "tokens")
    original_bytes = expert_bytes(cfg.teacher)
    cache = Path(cfg.teacher_cache) if cfg.teacher_cache else out / "teacher_cache.h5"
    if cfg.teacher_source == "original" and not cache.is_file():
        log(f"caching the original teacher's top-{cfg.top_k} over {cfg.data}")
        run_stage("cache", cache_command(cfg.teacher, cfg.data, cache, cfg.top_k, cfg.seq_len, cfg.nproc,
                                         cfg.max_sequences), cfg.nproc, logs)

    results, previous = [], None
    for i, (step, steps) in enumerate(zip(cfg.cascade, cfg.step_counts())):
        folder = out / f"step-{i}"
        done = folder / RESULT
        if done.is_file():
            r = json.loads(done.read_text())
            log(f"step {i}: done ({r['expert_bytes_ratio']:.4f} of the teacher's expert bytes, zero-shot "
                f"{r['zero_shot_ppl']:.2f}, distilled {r['distilled_ppl']:.2f}); skipped")
            results.append(r)
            previous = Path(r["checkpoint"])
            continue
        t0 = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        # 1. the source: a stock checkpoint of the previous student
        if previous is None:
            source = Path(cfg.teacher)
        elif is_compressed_checkpoint(previous) or is_quantized_checkpoint(previous):
            source = folder / "source"
            if not (source / "config.json").is_file():
                log(f"step {i}: exporting {previous} as a stock checkpoint (experts reconstructed) to compress it")
                export_dense(previous, source, overwrite=True)
        else:
            source = previous
        share = expert_bytes(source) / original_bytes
        # 2. compress to ratio_i of the ORIGINAL's expert bytes
        compressed = folder / "compressed"
        if not (compressed / "compression_statistics.yaml").is_file():
            request = step.ratio / share
            if not 0 < request < 1:
                raise CascadeConfigError(f"step {i}: ratio {step.ratio} of the original's expert bytes is not below "
                                         f"its source's {share:.4f}")
            log(f"step {i}: {cfg.method} to {step.ratio} of the original's expert bytes ({request:.4f} of the "
                f"source's {share:.4f})")
            run_stage(f"step{i}_compress", launcher("compress.py", cfg.nproc) + [
                "--model", str(source), "--output", str(compressed), "--method", cfg.method, "--target-ratio",
                f"{request:.6f}", "--overwrite", *_flags(cfg.compress_args)], cfg.nproc, logs)
        achieved = _achieved_ratio(compressed) * share
        zero_shot = _ppl(compressed, windows)
        log(f"step {i}: compressed to {achieved:.4f} of the teacher's expert bytes; zero-shot perplexity {zero_shot:.2f}")
        # 3. distil from the previous student (live) or the original teacher's cache
        distill = folder / "distill"
        if cfg.teacher_source == "original":
            teacher_args = ["--teacher-cache", str(cache)]
            teacher_name = "the original teacher's cache"
        else:
            teacher = previous if previous is not None else Path(cfg.teacher)
            teacher_args = ["--teacher", str(teacher), "--data", cfg.data, "--seq-len", str(cfg.seq_len),
                            *(["--max-sequences", str(cfg.max_sequences)] if cfg.max_sequences else []),
                            *(["--teacher-top-k", str(cfg.top_k)] if cfg.top_k else [])]
            teacher_name = f"live teacher {teacher}"
        log(f"step {i}: distilling {steps} steps from {teacher_name}")
        run_stage(f"step{i}_distill", launcher("distill.py", cfg.nproc) + [
            "--student", str(compressed), "--output", str(distill), "--max-steps", str(steps), "--deepspeed",
            cfg.deepspeed, "--resume", *teacher_args, *_flags(cfg.distill_args)], cfg.nproc, logs)
        checkpoint = complete_checkpoints(distill)[-1]
        distilled = _ppl(checkpoint, windows)
        r = {"step": i, "ratio": step.ratio, "expert_bytes_ratio": round(achieved, 6), "distill_steps": steps,
             "teacher": teacher_name, "zero_shot_ppl": zero_shot, "distilled_ppl": distilled,
             "checkpoint": str(checkpoint.resolve()), "seconds": round(time.time() - t0, 1),
             "train_log": str((distill / "train_log.jsonl").resolve())}
        write_json_atomic(done, r)
        log(f"step {i}: distilled perplexity {distilled:.2f} ({r['seconds']:.0f} s); checkpoint {checkpoint}")
        results.append(r)
        previous = checkpoint
    summary["steps"] = results
    write_json_atomic(summary_file, summary)
    write_atomic(out / "cascade.md", cascade_markdown(summary))
    plot_cascade(summary, out / "cascade.png")
    return results


def _to_dict(cfg: CascadeConfig) -> dict:
    d = asdict(cfg)
    d["cascade"] = [asdict(s) if not isinstance(s, dict) else s for s in cfg.cascade]
    return d


def cascade_markdown(summary: dict) -> str:
    """The cascade's table: one row per step (ratio, steps, zero-shot and distilled perplexity, gap to the teacher)."""
    t = summary["teacher_ppl"]
    lines = [f"Cascade ({summary['method']}, teacher source: {summary['teacher_source']}); teacher held-out perplexity "
             f"{t:.2f}", "", "| step | expert bytes | distill steps | zero-shot ppl | distilled ppl | gap to teacher |",
             "|---|---|---|---|---|---|"]
    for r in summary["steps"]:
        lines.append(f"| {r['step']} | {r['expert_bytes_ratio']:.4f} | {r['distill_steps']} | {r['zero_shot_ppl']:.2f} "
                     f"| {r['distilled_ppl']:.2f} | {100 * (r['distilled_ppl'] / t - 1):+.1f} % |")
    return "\n".join(lines) + "\n"


def plot_cascade(summary: dict, path: Path) -> None:
    """Ratio-vs-perplexity (zero-shot and distilled per step, the teacher as a line) and each step's loss terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = summary["steps"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["expert_bytes_ratio"] for r in steps]
    ax.plot(x, [r["zero_shot_ppl"] for r in steps], "o--", label="zero-shot")
    ax.plot(x, [r["distilled_ppl"] for r in steps], "o-", label="distilled")
    ax.axhline(summary["teacher_ppl"], color="k", lw=1, label="teacher")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("expert bytes / teacher's")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"cascade ({summary['method']}, teacher: {summary['teacher_source']})")
    ax.legend()
    offset = 0
    for r in steps:
        log = Path(r["train_log"])
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        for key, style in (("kl", "-"), ("ce", ":"), ("feature", "--")):
            pts = [(offset + row["step"], row[key]) for row in rows if row.get(key) is not None]
            if pts:
                bx.plot(*zip(*pts), style, label=f"{key} (step {r['step']})")
        offset += r["distill_steps"]
    bx.set_xlabel("cascade distillation step")
    bx.set_yscale("log")
    bx.set_title("loss terms")
    if bx.get_legend_handles_labels()[0]:
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

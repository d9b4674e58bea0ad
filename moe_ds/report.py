"""The demo's report: what compression cost and what distillation recovered, in one table, JSON and plot.

Held-out perplexity (the headline number) is token-level: exp(mean next-token NLL) over the same packed
windows of the held-out stdlib modules for every model (``toy_teacher.heldout_perplexity``), so the teacher,
the zero-shot compressed model and every distilled checkpoint are compared on identical tokens. The
evaluator's lm-eval numbers (word perplexity and bits per byte on the held-out file; WikiText-2, ARC-Easy,
PIQA where a data directory was given) are added beside it from each model's ``eval/results.json``.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .checkpoint import STATISTICS_FILE, load_model
from .evaluate import BASELINE_DIR, flat_metrics, read_results, results_dir
from .run_layout import checkpoint_step, complete_checkpoints, save_figure_atomic, write_atomic, write_json_atomic
from .toy_teacher import RECORD as TEACHER_RECORD
from .toy_teacher import heldout_perplexity

logger = logging.getLogger("moe_ds")


class ReportError(ValueError):
    """A report input is missing (the message names it)."""


@dataclass
class ReportConfig:
    run: str  # demo run directory: compressed/, distill/, stage_seconds.tsv (from launch/demo.sh)
    teacher: str  # the uncompressed teacher directory
    heldout: str  # held-out JSONL, one {"text": ...} per line
    seq_len: int = 256  # tokens per held-out window
    max_windows: int = 128  # held-out windows scored per model

    def __post_init__(self):
        """Raises ReportError naming the missing input or bad value."""
        for name, path in (("run", self.run), ("teacher", self.teacher), ("heldout", self.heldout),
                           ("run/compressed", Path(self.run) / "compressed")):
            if not Path(path).exists():
                raise ReportError(f"{name} {str(path)!r} does not exist")
        if self.seq_len < 2:
            raise ReportError(f"seq_len must be >= 2 (one token predicted from another), got {self.seq_len}")
        if self.max_windows < 1:
            raise ReportError(f"max_windows must be >= 1, got {self.max_windows}")


def heldout_windows(heldout_jsonl: str | Path, tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
    """[N, T] int64 packed windows of a held-out JSONL file (``text`` field), the first ``max_windows``."""
    from .corpus import pack_sequences

    texts = [json.loads(line)["text"] for line in Path(heldout_jsonl).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    seqs = pack_sequences(texts, tokenizer, seq_len, max_sequences=max_windows, name=str(heldout_jsonl))
    return torch.stack([torch.as_tensor(seq, dtype=torch.int64) for seq in seqs])


def token_perplexity(model_dir: str | Path, windows: torch.Tensor) -> float:
    """Token-level held-out perplexity of a model folder (compressed or plain) on the given windows."""
    model = load_model(model_dir)
    with torch.no_grad():
        return heldout_perplexity(model, windows, batch_size=16)


def _eval_metrics(out_dir: Path) -> dict:
    return flat_metrics(read_results(out_dir))


def build_report(cfg: ReportConfig) -> dict:
    """Collect the demo run's numbers and write report.{json,md,png} into ``cfg.run``.

    Expects ``run/compressed`` (stage 1), ``run/distill/checkpoint-*`` (stage 3, evaluated by stage 4)
    and ``run/stage_seconds.tsv`` (written by launch/demo.sh).

    Returns:
        The report dict (as written to report.json).
    """
    from transformers import AutoTokenizer

    run_dir, teacher_dir, heldout_jsonl = Path(cfg.run), Path(cfg.teacher), cfg.heldout
    seq_len, max_windows = cfg.seq_len, cfg.max_windows
    compressed, distill = run_dir / "compressed", run_dir / "distill"
    windows = heldout_windows(heldout_jsonl, AutoTokenizer.from_pretrained(teacher_dir), seq_len, max_windows)
    logger.info("held-out perplexity on %d windows × %d tokens", *windows.shape)
    teacher_ppl = token_perplexity(teacher_dir, windows)
    zero_shot_ppl = token_perplexity(compressed, windows)
    checkpoints = []
    for ckpt in complete_checkpoints(distill):
        checkpoints.append({"step": checkpoint_step(ckpt), "ppl": token_perplexity(ckpt, windows),
                            "lm_eval": _eval_metrics(results_dir(ckpt))})
        logger.info("checkpoint %d: held-out ppl %.2f", checkpoints[-1]["step"], checkpoints[-1]["ppl"])
    # Optional comparison: the same ratio fitted from the user's specified start (C = mean, U = 0, V ~ N(0, 1)).
    mean_dir = run_dir / "compressed_mean"
    mean = None
    if (mean_dir / "config.json").is_file():
        mean_stats = yaml.safe_load((mean_dir / STATISTICS_FILE).read_text())
        mean = {"dir": str(mean_dir), "ppl": token_perplexity(mean_dir, windows), "ranks": mean_stats["ranks"],
                "mean_reconstruction_error": _mean_error(mean_stats)}
    stats = yaml.safe_load((compressed / STATISTICS_FILE).read_text())
    record_file = teacher_dir / TEACHER_RECORD
    teacher_record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    final = checkpoints[-1] if checkpoints else None
    gap = zero_shot_ppl - teacher_ppl
    closed = (zero_shot_ppl - final["ppl"]) / gap if final and gap > 0 else None
    seconds_file = run_dir / "stage_seconds.tsv"  # "<stage> <seconds>" per line, from launch/demo.sh
    report = {
        "heldout": {"file": str(heldout_jsonl), "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                    "definition": "exp(mean next-token NLL) over packed windows, first token of each unpredicted"},
        "teacher": {"dir": str(teacher_dir), "ppl": teacher_ppl, "lm_eval": _eval_metrics(distill / BASELINE_DIR),
                    "builder": {k: teacher_record.get(k) for k in ("heldout_ppl", "params", "steps", "seconds")}},
        "zero_shot": {"dir": str(compressed), "ppl": zero_shot_ppl, "lm_eval": _eval_metrics(results_dir(compressed)),
                      "ranks": stats["ranks"], "mean_reconstruction_error": _mean_error(stats)},
        "zero_shot_mean_init": mean,
        "distilled": {"ppl": final["ppl"] if final else None, "step": final["step"] if final else None,
                      "gap_closed": closed, "checkpoints": checkpoints},
        "expert_param_ratio": stats["expert_params"]["ratio"],
        "params": {k: stats[k] for k in ("expert_params", "total_params", "active_params_per_token",
                                         "expert_macs_per_token")},
        "stage_seconds": ({name: float(sec) for name, sec in map(str.split, seconds_file.read_text().splitlines())}
                          if seconds_file.is_file() else {}),
    }
    write_json_atomic(run_dir / "report.json", report)
    write_atomic(run_dir / "report.md", report_markdown(report))
    _plot(report, run_dir / "report.png", distill / "train_log.jsonl")
    return report


def _mean_error(stats: dict) -> float | None:
    errors = [p["rel_error"] for layer in stats.get("reconstruction_error", {}).values() for p in layer.values()]
    return sum(errors) / len(errors) if errors else None


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def report_markdown(r: dict) -> str:
    """The report as Markdown: perplexities, lm-eval extras, parameters and MACs, stage times."""
    lines = ["# moe-ds demo report", "",
             (f"Held-out perplexity: token-level on {r['heldout']['windows']} windows × {r['heldout']['seq_len']} "
              f"tokens of stdlib modules the teacher never saw ({r['heldout']['file']})."), "",
             "| model | step | held-out ppl | " + " | ".join(_extra_columns(r)) + " |",
             "|---|---|---|" + "---|" * len(_extra_columns(r))]
    rows = [("teacher", None, r["teacher"]["ppl"], r["teacher"]["lm_eval"])]
    if r.get("zero_shot_mean_init"):
        rows.append((f"zero-shot, mean init (r = {r['zero_shot_mean_init']['ranks']['gate']}, not distilled)", None,
                     r["zero_shot_mean_init"]["ppl"], {}))
    rows.append((f"zero-shot, svd init (r = {r['zero_shot']['ranks']['gate']})", 0, r["zero_shot"]["ppl"],
                 r["zero_shot"]["lm_eval"]))
    rows += [("distilled", c["step"], c["ppl"], c["lm_eval"]) for c in r["distilled"]["checkpoints"]]
    for name, step, ppl, extra in rows:
        cells = " | ".join(_fmt(extra.get(col), ".4g") for col in _extra_columns(r))
        lines.append(f"| {name} | {'' if step is None else step} | {ppl:.2f} | {cells} |")
    closed = r["distilled"]["gap_closed"]
    verdict = ("met" if closed is not None and closed >= 0.5 else "NOT met")
    lines += ["", (f"Gap closed by distillation: {_fmt(None if closed is None else 100 * closed, '.0f')} % of the "
                   f"zero-shot − teacher perplexity gap (target ≥ 50 %: {verdict})."),
              (f"Mean relative reconstruction error of the zero-shot fit: svd init "
               f"{_fmt(r['zero_shot']['mean_reconstruction_error'], '.3f')}, mean init "
               f"{_fmt((r.get('zero_shot_mean_init') or {}).get('mean_reconstruction_error'), '.3f')}."),
              "", "| | original | compressed | ratio |", "|---|---|---|---|"]
    for key, label in (("expert_params", "expert parameters"), ("total_params", "total parameters"),
                       ("active_params_per_token", "active parameters per token"),
                       ("expert_macs_per_token", "expert MACs per token")):
        p = r["params"][key]
        lines.append(f"| {label} | {p['original']:,} | {p['compressed']:,} | {p['ratio']:.3f} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def _extra_columns(r: dict) -> list[str]:
    cols = []
    checkpoints = [c["lm_eval"] for c in r["distilled"]["checkpoints"]]
    for src in [r["teacher"]["lm_eval"], r["zero_shot"]["lm_eval"], *checkpoints]:
        cols += [c for c in src if c not in cols]
    return cols


def _plot(r: dict, path: Path, train_log: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    steps = [c["step"] for c in r["distilled"]["checkpoints"]]
    ax.plot([0] + steps, [r["zero_shot"]["ppl"]] + [c["ppl"] for c in r["distilled"]["checkpoints"]], "o-",
            label="compressed student")
    ax.axhline(r["teacher"]["ppl"], color="k", ls="--", label="teacher")
    ax.set(xlabel="distillation step", ylabel="held-out perplexity (token)", title="recovery by distillation")
    ax.legend()
    ax = axes[1]
    if train_log.is_file():
        rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
        for key in ("loss", "ce", "kl"):
            pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set(xlabel="step", title="training loss (train_log.jsonl)")
        ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)

"""The demo's report: what compression cost and what distillation recovered, in one table, JSON and plot.

Held-out perplexity (the headline number) is token-level: exp(mean next-token NLL) over the same packed
windows of the held-out stdlib modules for every model (``toy_teacher.heldout_perplexity``), so the teacher,
the zero-shot compressed model and every distilled checkpoint are compared on identical tokens. The
evaluator's lm-eval numbers (word perplexity and bits per byte on the held-out file; WikiText-2, ARC-Easy,
PIQA where a data directory was given) are added beside it from each model's ``eval/results.json``.

Two comparisons put the shared core's numbers in context (issue #16):

* **baselines**: every other compression method (``moe_ds.budget.METHODS``) at the same ``--target-ratio`` of
  expert bytes, zero-shot, in ``run/baselines/<method>/``; the report gives each one's held-out perplexity and the
  expert-bytes ratio its checkpoint's compression_statistics.yaml says it stores (``expert_bytes_ratio``).
* **control**: the uncompressed teacher trained on by the same distillation (launcher, teacher cache, steps,
  settings) as the student, in ``run/control/``. The student's CE term keeps training it on the corpus, so
  against the teacher as it was the student can "close" more than 100 % of the gap; the control is the
  uncompressed model given the same training, and the gap closed is measured against it::

      gap closed vs control = (ppl_zero_shot − ppl_distilled) / (ppl_zero_shot − ppl_control)
      gap closed vs teacher = (ppl_zero_shot − ppl_distilled) / (ppl_zero_shot − ppl_teacher)

  1 (100 %) means the distilled student is as good as the uncompressed model given the same steps.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .budget import METHODS
from .checkpoint import STATISTICS_FILE, load_model
from .evaluate import BASELINE_DIR, flat_metrics, read_results, results_dir
from .run_layout import checkpoint_step, complete_checkpoints, save_figure_atomic, write_atomic, write_json_atomic
from .toy_teacher import RECORD as TEACHER_RECORD
from .toy_teacher import heldout_perplexity

logger = logging.getLogger("moe_ds")


BASELINES_DIR = "baselines"  # run/baselines/<method>/: the other methods' zero-shot students
CONTROL_DIR = "control"  # run/control/checkpoint-<step>/: the teacher trained on by the student's distillation
BASELINE_METHODS = tuple(m for m in METHODS if m != "shared_core")


class ReportError(ValueError):
    """A report input is missing (the message names it)."""


@dataclass
class ReportConfig:
    run: str  # demo run directory: compressed/, distill/, baselines/, control/, stage_seconds.tsv (launch/demo.sh)
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


def expert_bytes_ratio(stats: dict) -> float:
    """Expert-storage bytes / the original's, as a checkpoint's compression_statistics.yaml records them.

    The packed bytes of a quantized checkpoint (``quantization.expert_bytes``), else the method accounting of
    ``moe_ds.budget.method_statistics`` (``expert_bytes``), else the shared core's ``bytes.experts_*``.

    Raises:
        ReportError: the statistics hold none of these.
    """
    quantized = (stats.get("quantization") or {}).get("expert_bytes")
    if quantized is not None:
        return float(quantized["ratio"])
    if stats.get("expert_bytes") is not None:
        return float(stats["expert_bytes"]["ratio"])
    stored = stats.get("bytes") or {}
    if stored.get("experts_original"):
        return stored["experts_compressed"] / stored["experts_original"]
    raise ReportError(f"compression statistics without expert bytes (keys: {sorted(stats)})")


def _setting(stats: dict) -> str:
    """What a budget bought: rank, experts kept or density."""
    parts = []
    original = (stats.get("num_experts") or {}).get("original", (stats.get("shape") or {}).get("num_experts"))
    if stats.get("kept_experts") not in (None, original):
        parts.append(f"{stats['kept_experts']} of {original} experts")
    rank = stats.get("rank", (stats.get("ranks") or {}).get("gate"))
    if rank is not None:
        parts.append(f"rank {rank}")
    if stats.get("density") is not None:
        parts.append(f"density {stats['density']:.3f}")
    return ", ".join(parts)


def gap_closed(zero_shot_ppl: float, distilled_ppl: float | None, reference_ppl: float | None) -> float | None:
    """Share of the zero-shot perplexity gap to ``reference_ppl`` that distillation closed.

    (ppl_zero_shot − ppl_distilled) / (ppl_zero_shot − ppl_reference): 1 when the student reaches the reference,
    above 1 when it passes it, negative when distillation made it worse. The reference is the control (the
    teacher trained on for the same steps) or the teacher as it was.

    Returns:
        The fraction, or None when a perplexity is missing or the reference is not below the zero-shot student
        (no gap to close).
    """
    if distilled_ppl is None or reference_ppl is None or not zero_shot_ppl > reference_ppl:
        return None
    return (zero_shot_ppl - distilled_ppl) / (zero_shot_ppl - reference_ppl)


def baseline_results(run_dir: str | Path, windows: torch.Tensor, methods=BASELINE_METHODS) -> dict:
    """The other methods' zero-shot students at the demo's budget, from ``run_dir/baselines/<method>/``.

    Args:
        windows: [N, T] int64 held-out windows (``heldout_windows``).
        methods: method names, each looked for in its own folder.

    Returns:
        {method: {"status": "ok", "dir", "ppl" (token-level held-out perplexity), "expert_bytes_ratio"
        (``expert_bytes_ratio``), "setting"}}; a method whose folder holds no finished checkpoint (config.json
        and compression_statistics.yaml, which compress writes last) is {"status": "missing", "dir", "ppl": None,
        "expert_bytes_ratio": None, "setting": None}.
    """
    out = {}
    for method in methods:
        folder = Path(run_dir) / BASELINES_DIR / method
        if not ((folder / "config.json").is_file() and (folder / STATISTICS_FILE).is_file()):
            logger.warning("baseline %s: no finished checkpoint in %s; reported as missing", method, folder)
            out[method] = {"status": "missing", "dir": str(folder), "ppl": None, "expert_bytes_ratio": None,
                           "setting": None}
            continue
        stats = yaml.safe_load((folder / STATISTICS_FILE).read_text())
        out[method] = {"status": "ok", "dir": str(folder), "ppl": token_perplexity(folder, windows),
                       "expert_bytes_ratio": expert_bytes_ratio(stats), "setting": _setting(stats)}
        logger.info("baseline %s: held-out ppl %.2f at %.4f of the expert bytes", method, out[method]["ppl"],
                    out[method]["expert_bytes_ratio"])
    return out


def control_result(run_dir: str | Path, windows: torch.Tensor) -> dict | None:
    """The control: the last complete checkpoint of ``run_dir/control`` (the teacher distilled like the student).

    Returns:
        {"dir", "ppl" (token-level held-out perplexity), "steps" (its training step)}, or None when the run has
        no complete control checkpoint.
    """
    checkpoints = complete_checkpoints(Path(run_dir) / CONTROL_DIR)
    if not checkpoints:
        logger.warning("no complete control checkpoint in %s; gap closed only against the teacher",
                       Path(run_dir) / CONTROL_DIR)
        return None
    last = checkpoints[-1]
    return {"dir": str(last), "ppl": token_perplexity(last, windows), "steps": checkpoint_step(last)}


def build_report(cfg: ReportConfig) -> dict:
    """Collect the demo run's numbers and write report.{json,md,png} into ``cfg.run``.

    Expects ``run/compressed`` (stage 1), ``run/distill/checkpoint-*`` (stage 3, evaluated by stage 4)
    and ``run/stage_seconds.tsv`` (written by launch/demo.sh); uses ``run/baselines/<method>`` and
    ``run/control/checkpoint-*`` where present (``baseline_results``, ``control_result``).

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
    control = control_result(run_dir, windows)
    baselines = {"shared_core": {"status": "ok", "dir": str(compressed), "ppl": zero_shot_ppl,
                                 "expert_bytes_ratio": expert_bytes_ratio(stats), "setting": _setting(stats)},
                 **baseline_results(run_dir, windows)}
    final_ppl = final["ppl"] if final else None
    seconds_file = run_dir / "stage_seconds.tsv"  # "<stage> <seconds>" per line, from launch/demo.sh
    report = {
        "heldout": {"file": str(heldout_jsonl), "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                    "definition": "exp(mean next-token NLL) over packed windows, first token of each unpredicted"},
        "teacher": {"dir": str(teacher_dir), "ppl": teacher_ppl, "lm_eval": _eval_metrics(distill / BASELINE_DIR),
                    "builder": {k: teacher_record.get(k) for k in ("heldout_ppl", "params", "steps", "seconds")}},
        "zero_shot": {"dir": str(compressed), "ppl": zero_shot_ppl, "lm_eval": _eval_metrics(results_dir(compressed)),
                      "ranks": stats["ranks"], "mean_reconstruction_error": _mean_error(stats)},
        "zero_shot_mean_init": mean,
        "distilled": {"ppl": final_ppl, "step": final["step"] if final else None,
                      "gap_closed_vs_control": gap_closed(zero_shot_ppl, final_ppl, (control or {}).get("ppl")),
                      "gap_closed_vs_teacher": gap_closed(zero_shot_ppl, final_ppl, teacher_ppl),
                      "checkpoints": checkpoints},
        "control": control,
        "baselines": baselines,
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
    """The report as Markdown: perplexities (control included), gap closed against the control and the teacher,
    lm-eval extras, parameters and MACs, the baselines at the same budget, stage times."""
    lines = ["# moe-ds demo report", "",
             (f"Held-out perplexity: token-level on {r['heldout']['windows']} windows × {r['heldout']['seq_len']} "
              f"tokens of stdlib modules the teacher never saw ({r['heldout']['file']})."), "",
             "| model | step | held-out ppl | " + " | ".join(_extra_columns(r)) + " |",
             "|---|---|---|" + "---|" * len(_extra_columns(r))]
    rows = [("teacher", None, r["teacher"]["ppl"], r["teacher"]["lm_eval"])]
    if r.get("control"):
        rows.append(("control: the teacher distilled like the student (not compressed)", r["control"]["steps"],
                     r["control"]["ppl"], {}))
    if r.get("zero_shot_mean_init"):
        rows.append((f"zero-shot, mean init (r = {r['zero_shot_mean_init']['ranks']['gate']}, not distilled)", None,
                     r["zero_shot_mean_init"]["ppl"], {}))
    rows.append((f"zero-shot, svd init (r = {r['zero_shot']['ranks']['gate']})", 0, r["zero_shot"]["ppl"],
                 r["zero_shot"]["lm_eval"]))
    rows += [("distilled", c["step"], c["ppl"], c["lm_eval"]) for c in r["distilled"]["checkpoints"]]
    for name, step, ppl, extra in rows:
        cells = " | ".join(_fmt(extra.get(col), ".4g") for col in _extra_columns(r))
        lines.append(f"| {name} | {'' if step is None else step} | {ppl:.2f} | {cells} |")
    lines += ["", *_gap_lines(r), "",
              (f"Mean relative reconstruction error of the zero-shot fit: svd init "
               f"{_fmt(r['zero_shot']['mean_reconstruction_error'], '.3f')}, mean init "
               f"{_fmt((r.get('zero_shot_mean_init') or {}).get('mean_reconstruction_error'), '.3f')}."),
              "", "| | original | compressed | ratio |", "|---|---|---|---|"]
    for key, label in (("expert_params", "expert parameters"), ("total_params", "total parameters"),
                       ("active_params_per_token", "active parameters per token"),
                       ("expert_macs_per_token", "expert MACs per token")):
        p = r["params"][key]
        lines.append(f"| {label} | {p['original']:,} | {p['compressed']:,} | {p['ratio']:.3f} |")
    lines += _baseline_lines(r)
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def _percent(closed: float | None) -> str:
    return _fmt(None if closed is None else 100 * closed, ".0f")


def _gap_lines(r: dict) -> list[str]:
    """Gap closed against the control (the headline, with the ≥ 50 % target) and against the teacher."""
    d, control = r["distilled"], r.get("control")
    vs_control, vs_teacher = d.get("gap_closed_vs_control"), d.get("gap_closed_vs_teacher")
    lines = []
    if control:
        verdict = "met" if vs_control is not None and vs_control >= 0.5 else "NOT met"
        lines.append(f"Gap closed by distillation, against the control: {_percent(vs_control)} % of the zero-shot − "
                     f"control perplexity gap ({_fmt(r['zero_shot']['ppl'])} − {_fmt(control['ppl'])}; the control is "
                     f"the uncompressed teacher trained on by the same {control['steps']}-step distillation; target "
                     f"≥ 50 %: {verdict}).")
    else:
        lines.append("Gap closed against the control: – (no control run in this folder).")
    lines.append(f"Against the teacher as it was (before any further training): {_percent(vs_teacher)} % of the "
                 f"zero-shot − teacher gap ({_fmt(r['zero_shot']['ppl'])} − {_fmt(r['teacher']['ppl'])}); above "
                 f"100 % when the student's CE term trains it past the teacher.")
    return lines


def _baseline_lines(r: dict) -> list[str]:
    """One row per compression method at the demo's budget, zero-shot (none of them distilled)."""
    baselines = r.get("baselines") or {}
    if not baselines:
        return []
    teacher = r["teacher"]["ppl"]
    lines = ["", "Every method at the same expert-byte budget, zero-shot (not distilled); expert bytes as each "
             "checkpoint's compression_statistics.yaml records them:", "",
             "| method | setting | expert bytes ratio | held-out ppl | ppl / teacher |", "|---|---|---|---|---|"]
    for method, b in baselines.items():
        if b["status"] != "ok":
            lines.append(f"| {method} | {b['status']} ({b['dir']}) | – | – | – |")
            continue
        lines.append(f"| {method} | {b['setting'] or '–'} | {b['expert_bytes_ratio']:.4f} | {b['ppl']:.2f} | "
                     f"{b['ppl'] / teacher:.3f} |")
    return lines


def _extra_columns(r: dict) -> list[str]:
    cols = []
    checkpoints = [c["lm_eval"] for c in r["distilled"]["checkpoints"]]
    for src in [r["teacher"]["lm_eval"], r["zero_shot"]["lm_eval"], *checkpoints]:
        cols += [c for c in src if c not in cols]
    return cols


def _reference_lines(ax, r: dict) -> None:
    ax.axhline(r["teacher"]["ppl"], color="k", ls="--", label="teacher")
    if r.get("control"):
        ax.axhline(r["control"]["ppl"], color="g", ls=":",
                   label=f"control (teacher trained on, {r['control']['steps']} steps)")


def _plot(r: dict, path: Path, train_log: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    steps = [c["step"] for c in r["distilled"]["checkpoints"]]
    ax.plot([0] + steps, [r["zero_shot"]["ppl"]] + [c["ppl"] for c in r["distilled"]["checkpoints"]], "o-",
            label="compressed student")
    _reference_lines(ax, r)
    ax.set(xlabel="distillation step", ylabel="held-out perplexity (token)", title="recovery by distillation")
    ax.legend()
    ax = axes[1]
    done = {m: b for m, b in (r.get("baselines") or {}).items() if b["status"] == "ok"}
    for method, b in done.items():
        ax.scatter(b["expert_bytes_ratio"], b["ppl"], label=method)
    if r["distilled"]["ppl"] is not None and "shared_core" in done:
        ax.scatter(done["shared_core"]["expert_bytes_ratio"], r["distilled"]["ppl"], marker="*", s=150, c="k",
                   label=f"shared_core distilled ({r['distilled']['step']} steps)")
    _reference_lines(ax, r)
    ax.set(xlabel="expert bytes / original", ylabel="held-out perplexity (token, log scale)", yscale="log",
           title="methods at the same expert bytes, zero-shot")
    ax.legend(fontsize="small")
    ax = axes[2]
    if train_log.is_file():
        rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
        for key in ("loss", "ce", "kl", "feature"):  # feature: with --feature-layers
            pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set(xlabel="step", title="training loss (train_log.jsonl)")
        ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)

"""The demo report: teacher, control and every compression method zero-shot vs every distilled checkpoint,
parameters, MACs, stage times.

    python launch/report.py --run runs/demo --teacher runs/toy/teacher --heldout runs/toy/data/heldout.jsonl

Reads RUN/compressed, RUN/distill and, where present, RUN/baselines/<method> and RUN/control (launch/demo.sh).
Writes RUN/report.md, RUN/report.json and RUN/report.png (definitions, gap closed included, in moe_ds/report.py).
"""

import sys
from pathlib import Path

from moe_ds.checkpoint import CheckpointError
from moe_ds.cli import parse_config, run
from moe_ds.dist import setup_logging
from moe_ds.report import ReportConfig, ReportError, build_report


def _percent(closed: float | None) -> str:
    return "n/a" if closed is None else f"{100 * closed:.0f} %"


def main(argv=None) -> None:
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    setup_logging()
    report = build_report(cfg)
    print((Path(cfg.run) / "report.md").read_text())
    distilled = report["distilled"]
    print(f"report: {cfg.run}/report.md, report.json, report.png (gap closed: "
          f"{_percent(distilled['gap_closed_vs_control'])} vs the control, "
          f"{_percent(distilled['gap_closed_vs_teacher'])} vs the teacher)")


if __name__ == "__main__":
    sys.exit(run("report", main, errors=(ReportError, CheckpointError)))

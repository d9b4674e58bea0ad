"""The demo report: teacher vs zero-shot compressed vs every distilled checkpoint, parameters, MACs, stage times.

    python launch/report.py --run runs/demo --teacher runs/toy/teacher --heldout runs/toy/data/heldout.jsonl

Writes RUN/report.md, RUN/report.json and RUN/report.png (definitions in moe_ds/report.py).
"""

import sys
from pathlib import Path

from moe_ds.checkpoint import CheckpointError
from moe_ds.cli import parse_config, run
from moe_ds.dist import setup_logging
from moe_ds.report import ReportConfig, ReportError, build_report


def main(argv=None) -> None:
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    setup_logging()
    report = build_report(cfg)
    print((Path(cfg.run) / "report.md").read_text())
    closed = report["distilled"]["gap_closed"]
    print(f"report: {cfg.run}/report.md, report.json, report.png (gap closed: "
          f"{'n/a' if closed is None else f'{100 * closed:.0f} %'})")


if __name__ == "__main__":
    sys.exit(run("report", main, errors=(ReportError, CheckpointError)))

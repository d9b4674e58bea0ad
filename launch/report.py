"""The demo report: teacher vs zero-shot compressed vs every distilled checkpoint, parameters, MACs, stage times.

    python launch/report.py --run runs/demo --teacher runs/toy/teacher --heldout runs/toy/data/heldout.jsonl

Writes RUN/report.md, RUN/report.json and RUN/report.png (see moe_ds/report.py for the definitions).
"""

import argparse
import sys

from moe_ds.dist import setup_logging
from moe_ds.report import build_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="demo run directory (compressed/, distill/, stage_seconds.json)")
    p.add_argument("--teacher", required=True, help="the uncompressed teacher directory")
    p.add_argument("--heldout", required=True, help="held-out JSONL ({'text': ...} per line)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=128, help="held-out windows scored per model")
    a = p.parse_args(argv)
    setup_logging()
    report = build_report(a.run, a.teacher, a.heldout, a.seq_len, a.max_windows)
    print(open(f"{a.run}/report.md").read())
    closed = report["distilled"]["gap_closed"]
    print(f"report: {a.run}/report.md, report.json, report.png (gap closed: "
          f"{'n/a' if closed is None else f'{100 * closed:.0f} %'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

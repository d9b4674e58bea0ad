"""The comparison sweep: every method × budget on each testbed, zero-shot and after the same distillation.

    python launch/sweep.py --config sweeps/qwen3.yaml           # GPUs: nproc ranks per launcher command
    python launch/sweep.py --config sweeps/toy.yaml             # CPU: the demo's toy teacher, ~1 h on 2 cores
    python launch/sweep.py --config sweeps/toy.yaml --report-only   # rewrite the tables from finished cells
    python launch/sweep.py --config sweeps/smollm.yaml --zero-shot --methods shared_core,lowrank   # a subset

Each stage runs through its launcher (calibrate, cache_teacher.sh, compress, distill, evaluate) as a child process;
what a cell did is in <output>/<testbed>/<method>/r<budget>/ (cell.json, logs/, loss.png). Rerunning the same
command resumes: finished cells are skipped, a half-finished one continues from its last finished phase. Writes
<output>/sweep.csv, sweep.md and pareto.png (definitions in moe_ds/sweep.py). Exit status 1 when a cell failed
(the table says which), 2 for a bad config.
"""

import argparse
import logging
import os
import sys

from moe_ds.cli import run
from moe_ds.sweep import SweepConfigError, collect, failed, load_config, run_sweep, select, write_outputs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="sweep YAML (sweeps/*.yaml)")
    ap.add_argument("--output", help="sweep folder (default: the config's output)")
    ap.add_argument("--report-only", action="store_true", help="write sweep.csv/md and pareto.png from the cells "
                    "already finished, running nothing")
    ap.add_argument("--zero-shot", action="store_true", help="compress and evaluate zero-shot only (distill.steps "
                    "0: no cache, distillation or control); a later run without it distils the same cells")
    ap.add_argument("--methods", help="comma-separated method names of the config to run (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    cfg = select(load_config(args.config, args.output), args.methods, args.zero_shot)
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))  # in-process perplexity; ranks get 1 thread each
    if args.report_only:
        write_outputs(cfg.output, cfg, *collect(cfg))
    else:
        run_sweep(cfg)
    testbeds, records = collect(cfg)
    bad = failed(records, testbeds)
    print(open(os.path.join(cfg.output, "sweep.md")).read())
    print(f"sweep: {cfg.output}/sweep.md, sweep.csv, pareto.png; {len(records) - len(failed(records))} of "
          f"{len(records)} cells done or infeasible")
    if bad:
        for r in bad:
            print(f"not done: {r['testbed']} {r['method']} {r['budget']:g}: {str(r.get('error')).splitlines()[0]}",
                  file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(run("sweep", main, errors=(SweepConfigError,)))

"""``python tools/benchmark.py power``: the command line."""

from __future__ import annotations

import os
import sys

from .records import records_root
from .report import report_path, write_report
from .runner import sweep
from .tasks import TASKS


def main(argv=None) -> None:
    """``python tools/benchmark.py power``: run what is missing, then write the report.

    python tools/benchmark.py power                     # every task: run what is missing, write docs/benchmarks_power.md
    python tools/benchmark.py power --report-only       # regenerate the report from docs/bench_records/ alone
    python tools/benchmark.py power --tasks facts128 --arms lora scalora-I --phase tune
    python tools/benchmark.py power --tasks facts128 --workers 8   # on a GPU: docs/bench_records_cuda/, its own report
    python tools/benchmark.py power --device cuda --report-only    # the GPU's report, regenerated on any machine

    Task (a), the single-layer regression: 570 runs, 4.1 min of run time in all on 2 cores (0.1-1.7 s a run);
    task (c), facts128, about 5 min a run on 2 idle cores (9 arms: ~70 tuning runs and 72 report runs);
    task (c'), facts128-one-layer, ~150 s a run two at a time (--workers 2: ~1.3x the throughput on 2 cores).
    """
    import argparse

    import torch

    p = argparse.ArgumentParser(prog="tools/benchmark.py power", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                   help="the tasks to run (default: all); the report covers these and every task with records")
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (default: all)")
    p.add_argument("--phase", choices=["tune", "report", "both"], default="both")
    p.add_argument("--report-only", action="store_true", help="no runs: regenerate the report from the records")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="whose records and report (default: this machine's, cuda where one is visible); each device "
                        "has its own records folder and report, so no comparison mixes them")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, each a fresh process with an equal share of the CPU threads (a GPU holds "
                        "several of task (c)'s runs at once); 1: one after the other in this process")
    p.add_argument("--records", default=None, help="records folder (default: docs/bench_records, or "
                                                   "docs/bench_records_<device> for another device)")
    p.add_argument("--out", default=None, help="the report (default: docs/benchmarks_power.md, or "
                                               "docs/benchmarks_power_<device>.md)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = args.records or records_root(device)
    out = args.out or report_path(device)
    tasks = [TASKS[name]() for name in (args.tasks or TASKS)]
    if all(t.name == "regression" for t in tasks) and args.workers <= 1:
        torch.set_num_threads(1)  # its runs are tiny: one thread is faster and leaves the other core free
    failed = 0
    if not args.report_only:
        phases = ("tune", "report") if args.phase == "both" else (args.phase,)
        for task in tasks:
            try:
                failed += sweep(task, args.arms, phases, records, workers=args.workers, device=device)
            except ValueError as exc:  # records of another device: nothing ran, nothing was written
                sys.exit(f"tools/benchmark.py power: {exc}")
    # the report covers every task with records on this device, not only the ones just run: a sweep of one
    # task must not drop the others from the shared report
    shown = [name for name in TASKS if name in (args.tasks or ()) or os.path.isdir(os.path.join(records, name))]
    command = ("python tools/benchmark.py power" + ("" if device == "cpu" else f" --device {device}")
               + ("" if shown == list(TASKS) else " --tasks " + " ".join(shown)))
    write_report([TASKS[name]() for name in shown], out, records, command=command)
    print(f"wrote {out}")
    if failed:
        sys.exit(f"{failed} runs failed (above): they are still missing; the same command retries them")

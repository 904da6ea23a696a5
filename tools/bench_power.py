"""The powered ScaLoRA benchmark (ds_scalora.bench.power): tune on two seeds, report on fresh ones.

    python tools/bench_power.py                     # run what is missing, then write docs/benchmarks_power.md
    python tools/bench_power.py --report-only       # regenerate the report from docs/bench_records/ alone
    python tools/bench_power.py --arms lora scalora-I --phase tune

Task (a), the single-layer regression: 570 runs, 4.1 min of run time in all on 2 cores (0.1-1.7 s a run);
task (c), facts256, about 2.5 min a run on 2 idle cores (9 arms: ~90 tuning runs and 72 report runs).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_scalora.bench import power  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(power.TASKS), choices=list(power.TASKS))
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (default: all)")
    p.add_argument("--phase", choices=["tune", "report", "both"], default="both")
    p.add_argument("--report-only", action="store_true", help="no runs: regenerate the report from the records")
    p.add_argument("--records", default=power.RECORDS)
    p.add_argument("--out", default=os.path.join(power.REPO, "docs", "benchmarks_power.md"))
    args = p.parse_args(argv)
    import torch

    tasks = [power.TASKS[name]() for name in args.tasks]
    if all(t.name == "regression" for t in tasks):
        torch.set_num_threads(1)  # its runs are tiny: one thread is faster and leaves the other core free
    if not args.report_only:
        phases = ("tune", "report") if args.phase == "both" else (args.phase,)
        for task in tasks:
            power.sweep(task, args.arms, phases, args.records)
    power.write_report(tasks, args.out, args.records, command="python tools/bench_power.py")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The powered benchmark (issue 16): paired seeds, hyperparameters tuned on other seeds, statistics.

Protocol, per task:

1. **tune**: every arm's grid (learning rate, and for the arms that merge the strength ``shrink``,
   jointly) is run on the tuning seeds; the point with the lowest mean error is the arm's setting, and
   the report flags a setting on the edge of its grid;
2. **report**: every arm at its setting on fresh seeds (disjoint from the tuning seeds); each arm is
   compared with LoRA seed by seed (``ds_scalora.bench.stats``).

Each finished run is one line in ``docs/bench_records/<task>/<arm>.jsonl`` (a few hundred bytes), keyed
by its phase, settings and seed: an interrupted sweep resumes where it stopped, and the report
(``docs/benchmarks_power.md``) regenerates from the records alone. Runs on another device than the 2-core
CPU (a GPU: ``docs/bench_records_cuda/``, ``docs/benchmarks_power_cuda.md``) keep records and a report of their
own, since one comparison must not mix devices; ``--workers`` runs several at a time there.

The package, one room each: ``tasks`` (what runs: tasks, arms, grids), ``records`` (what ran: the JSON lines,
the tuned setting, what is missing), ``runner`` (running what is missing), ``report`` (the markdown and the
targets), ``cli`` (``tools/benchmark.py power``).
"""


from .cli import main
from .records import (RECORDS, check_device, load_records, records_root, report_values, run_time, superseded,
                      tuned_setting, tuning_table)
from .report import render, report_path, steps_to_reach, targets, write_report
from .runner import sweep
from .tasks import TASKS, Arm, Task, distill_task, facts_task, regression_task

__all__ = ["Arm", "Task", "TASKS", "RECORDS", "check_device", "distill_task", "facts_task", "load_records", "main",
           "records_root", "regression_task", "render", "report_path", "report_values", "run_time", "steps_to_reach",
           "superseded", "sweep", "targets", "tuned_setting", "tuning_table", "write_report"]

"""The records: one JSON line per finished run in ``<root>/<task>/<arm>.jsonl``, keyed by phase, settings and
seed; what they hold decides each arm's tuned setting, its report values and what is still missing."""

from __future__ import annotations

import json
import math
import os
import statistics

from .. import REPO
from .tasks import Arm, Task, grid_points

RECORDS = os.path.join(REPO, "docs", "bench_records")


def records_root(device: str) -> str:
    """Where a device's records live: ``docs/bench_records`` for the CPU (the 2-core machine's), a folder of
    its own for any other (``docs/bench_records_cuda``), so that no report mixes them."""
    return RECORDS if device == "cpu" else f"{RECORDS}_{device}"



def record_key(phase: str, spec: dict, lr: float, seed: int) -> str:
    return json.dumps({"phase": phase, "spec": spec, "lr": lr, "seed": seed}, sort_keys=True)


def read_records(task: str, arm: str, root: str):
    path = os.path.join(root, task, f"{arm}.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def is_current(task: Task, rec: dict) -> bool:
    return all(rec.get(k) == v for k, v in task.current.items())


def load_records(task: Task, arm: str, root: str = RECORDS) -> dict:
    """The arm's current records (``Task.current``), keyed by phase, settings and seed; a later line wins."""
    return {record_key(rec["phase"], rec["spec"], rec["lr"], rec["seed"]): rec for rec in read_records(task.name, arm, root)
            if is_current(task, rec)}


def superseded(task: Task, root: str = RECORDS) -> int:
    """How many records of the task's arms lack ``Task.current``: kept in the files, used nowhere."""
    return sum(not is_current(task, rec) for arm in task.arms for rec in read_records(task.name, arm.name, root))


def append_record(task: str, arm: str, rec: dict, root: str) -> None:
    os.makedirs(os.path.join(root, task), exist_ok=True)
    with open(os.path.join(root, task, f"{arm}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_device(task: Task, root: str, device: str) -> None:
    """Refuse to add ``device``'s runs to a records folder that holds another device's: one comparison must not
    mix them (the numbers differ in their last digits, and the run times entirely)."""
    for arm in task.arms:
        for rec in read_records(task.name, arm.name, root):
            if rec.get("device", "cpu") != device:
                raise ValueError(
                    f"{os.path.join(root, task.name, arm.name + '.jsonl')} holds runs made on {rec.get('device', 'cpu')}, "
                    f"and this machine runs on {device}: give this device's runs a folder of their own "
                    f"(--records {records_root(device)}, the default on {device})")


def _mean(values):
    values = [v if v is not None and math.isfinite(v) else math.inf for v in values]
    return sum(values) / len(values)


def tuning_table(task: Task, arm: Arm, root: str = RECORDS) -> dict:
    """{(shrink or None, lr): mean over the tuning seeds, or None where a tuning run is missing}."""
    have = load_records(task, arm.name, root)
    table = {}
    for spec, lr in grid_points(arm):
        recs = [have.get(record_key("tune", spec, lr, s)) for s in task.tune_seeds]
        table[(spec.get("shrink"), lr)] = None if any(r is None for r in recs) else _mean([r[task.metric] for r in recs])
    return table


def tuned_setting(task: Task, arm: Arm, root: str = RECORDS):
    """(spec, lr, grid table, edge flags) of the best mean over the tuning seeds, or None if incomplete."""
    table = tuning_table(task, arm, root)
    if any(v is None for v in table.values()):
        return None
    (shrink, lr), _ = min(table.items(), key=lambda kv: kv[1])
    spec = dict(arm.spec) if arm.shrinks is None else {**arm.spec, "shrink": shrink}
    edges = []
    if len(arm.lrs) > 1 and lr in (arm.lrs[0], arm.lrs[-1]):
        edges.append("lr")
    if arm.shrinks and shrink in (arm.shrinks[0], arm.shrinks[-1]):
        edges.append("shrink")
    return spec, lr, table, edges



def report_values(task: Task, arm: Arm, root: str = RECORDS):
    """(setting, {seed: record}) of the report phase, or None."""
    setting = tuned_setting(task, arm, root)
    if setting is None:
        return None
    spec, lr, _, _ = setting
    have = load_records(task, arm.name, root)
    recs = {s: have[record_key("report", spec, lr, s)] for s in task.report_seeds if record_key("report", spec, lr, s) in have}
    return setting, recs


def run_time(task: Task, root: str = RECORDS) -> dict:
    """The sweep's run time from its records: runs recorded and their seconds, runs still missing (tuning
    points on the tuning seeds; report seeds at the tuned setting, or all of them while tuning is
    incomplete) and an estimate of their time at the median recorded run."""
    done, seconds, missing = 0, [], 0
    for arm in task.arms:
        have = load_records(task, arm.name, root)
        done += len(have)
        seconds += [r["seconds"] for r in have.values() if isinstance(r.get("seconds"), (int, float))]
        missing += sum(record_key("tune", spec, lr, s) not in have for spec, lr in grid_points(arm) for s in task.tune_seeds)
        setting = tuned_setting(task, arm, root)
        missing += len(task.report_seeds) if setting is None else sum(
            record_key("report", setting[0], setting[1], s) not in have for s in task.report_seeds)
    median = statistics.median(seconds) if seconds else math.nan
    return {"runs": done, "hours": sum(seconds) / 3600, "median_s": median, "missing": missing,
            "missing_hours": missing * median / 3600}


"""Running what the records lack: the tuning grids, then every arm at its tuned setting on the report seeds,
one run at a time or in worker processes (this process the only writer of the records)."""

from __future__ import annotations

import json
import math
import os
import time

from .records import RECORDS, append_record, check_device, load_records, record_key, tuned_setting
from .tasks import Arm, Task, grid_points

def _compact(result: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()
            if k != "curve"} | {"curve": [round(x, 5) if math.isfinite(x) else None for x in result.get("curve", [])]}


def _missing(task: Task, arm: Arm, phase: str, points, seeds, have: dict) -> list:
    return [(arm, phase, spec, lr, seed) for spec, lr in points for seed in seeds
            if record_key(phase, spec, lr, seed) not in have]


def _record(task: Task, job, result: dict, seconds: float, device: str, root: str, log=print) -> None:
    arm, phase, spec, lr, seed = job
    rec = {"phase": phase, "spec": spec, "lr": lr, "seed": seed, **_compact(result), "seconds": round(seconds, 2),
           **({} if device == "cpu" else {"device": device})}  # the CPU records of before 2026-12-04 carry none
    append_record(task.name, arm.name, rec, root)
    log(f"  {task.name} {arm.name} {phase} lr={lr:g} {json.dumps(spec)} seed={seed}: "
        f"{task.metric} {rec[task.metric]:.4g} ({rec['seconds']:.1f} s)")


def _timed_run(task: Task, spec: dict, lr: float, seed: int, threads: int | None = None):
    """One run and its seconds; in a worker process of its own (``threads`` set) or in this one."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = task.run(spec, lr, seed)
    return result, time.perf_counter() - t0


def _run_jobs(task: Task, jobs: list, root: str, device: str, workers: int = 1, log=print) -> int:
    """Run ``jobs`` and record each as it finishes; returns how many failed. With ``workers`` > 1 every run
    is a fresh process of its own (``spawn``), ``workers`` at a time, each with an equal share of this
    machine's CPU threads (a GPU holds several 135M runs at once); this process alone writes the records,
    so no two writers share a file. A failed run is reported and left missing: the next sweep retries it."""
    if workers <= 1:
        for job in jobs:
            result, seconds = _timed_run(task, *job[2:])
            _record(task, job, result, seconds, device, root, log)
        return 0
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    failed = 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(_timed_run, task, *job[2:], threads): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result, seconds = future.result()
            except Exception as exc:  # one run's failure (a lost port, out of memory) does not stop the others
                failed += 1
                log(f"  {task.name} {job[0].name} {job[1]} lr={job[3]:g} {json.dumps(job[2])} seed={job[4]}: "
                    f"FAILED ({type(exc).__name__}: {exc}); left missing, the next sweep retries it")
                continue
            _record(task, job, result, seconds, device, root, log)
    return failed



def sweep(task: Task, arms: list | None = None, phases=("tune", "report"), root: str = RECORDS, log=print,
          workers: int = 1, device: str = "cpu") -> int:
    """Run whatever records are missing: the tuning grids, then each arm at its tuned setting (report runs
    seed by seed across the arms, so that a sweep stopped midway leaves whole pairs). Returns how many runs
    failed (left missing)."""
    check_device(task, root, device)
    chosen = [a for a in task.arms if arms is None or a.name in arms]
    failed = 0
    if "tune" in phases:
        jobs = [job for arm in chosen for job in _missing(task, arm, "tune", list(grid_points(arm)), task.tune_seeds,
                                                          load_records(task, arm.name, root))]
        failed += _run_jobs(task, jobs, root, device, workers, log)
    if "report" in phases:
        settings = {}
        for arm in chosen:
            setting = tuned_setting(task, arm, root)
            if setting is None:
                log(f"  {arm.name}: tuning incomplete, no report runs")
            else:
                settings[arm.name] = (arm, setting[0], setting[1], load_records(task, arm.name, root))
        jobs = [job for seed in task.report_seeds for arm, spec, lr, have in settings.values()
                for job in _missing(task, arm, "report", [(spec, lr)], [seed], have)]
        failed += _run_jobs(task, jobs, root, device, workers, log)
    return failed


"""The benchmark's runs (tools/benchmark.py): quality runs swept over learning rates and seeds, cached
with their settings, and per-method cost runs, each in a fresh process (``ds_scalora.bench.cost_worker``)
so that its peak memory is its own."""

from __future__ import annotations

import json
import os
import shutil
import time

from . import grid, measure


def run_settings(task, method, steps, eval_every, sets=()) -> dict:
    """What a cached run must match besides its file name (method, lr, seed): the method's and the
    task's overrides, the schedule and the command line's ``--set``s. A run cached without them
    (before 2026-11-23) is re-run."""
    out = {"method": grid.method_overrides(method, steps), "task": task.overrides, "steps": steps,
           "eval_every": eval_every}
    return out | ({"sets": list(sets)} if sets else {})  # runs cached before --set existed stay valid


def quality_runs(preset, task, methods, seeds, single_lr, work, sets=()) -> list[dict]:
    runs = []
    for method in grid.task_methods(preset, task, methods):
        lrs = grid.task_lrs(preset, task, method)
        steps, eval_every = grid.task_schedule(preset, task)
        for lr in ([lrs[len(lrs) // 2]] if single_lr else lrs):
            for seed in seeds:
                key = f"{preset.name}_{task.name}_{method}_lr{lr:g}_s{seed}"
                cached = os.path.join(work, key + ".json")
                settings = run_settings(task, method, steps, eval_every, sets)
                if os.path.isfile(cached):
                    with open(cached) as f:
                        run = json.load(f)
                    if run.get("settings") == settings:
                        runs.append(run)
                        continue
                    stale = cached.replace(".json", ".stale.json")
                    os.replace(cached, stale)
                    print(f"  {key}: cached run had other settings ({run.get('settings')}); kept as {stale}, re-running")
                t0 = time.perf_counter()
                cfg = grid.run_config(task, method, lr, seed, steps, eval_every,
                                      os.path.join(work, key), os.path.join(work, "data"), user_sets=sets)  # fmt: skip
                hooks = measure.UpdateRank(cfg.method.target_modules)
                summary = grid.train_once(cfg, hooks, log_path=os.path.join(work, key + ".log"))
                run = {"task": task.name, "method": method, "lr": lr, "seed": seed, "history": summary["history"],
                       "final": summary["eval"], "update_rank_mean": summary.get("update_rank_mean"),
                       "scalora_accumulated_rank": summary.get("scalora_accumulated_rank"),
                       "elalora_rank_pattern": summary.get("elalora_rank_pattern"),
                       "seconds": time.perf_counter() - t0, "settings": settings}  # fmt: skip
                with open(cached + ".tmp", "w") as f:
                    json.dump(run, f)
                os.replace(cached + ".tmp", cached)
                # the result is cached; the run's final checkpoint is not needed again (a full fine-tuning
                # one is 2 GB: the preset's 84 runs kept about 70 GB before this)
                shutil.rmtree(os.path.join(work, key, "checkpoints"), ignore_errors=True)
                print(f"  {key}: {task.metric}={run['final'].get(task.metric)} loss={run['final'].get('eval_loss'):.4g} "
                      f"rank={run['update_rank_mean']} ({run['seconds']:.0f} s)", flush=True)
                runs.append(run)
    return runs


def cost_runs(preset, task, methods, work, sets=()) -> dict:
    # the matmul peak is kept with the cost runs it belongs to: a report regenerated from cached runs
    # divides by the peak measured when they ran, not by a new reading (it varied by 30% between days)
    peak_path = os.path.join(work, f"cost_{preset.name}_{task.name}_peak.json")
    if os.path.isfile(peak_path):
        with open(peak_path) as f:
            peak, peak_what = json.load(f)
    else:
        peak, peak_what = measure.matmul_peak_flops()
        with open(peak_path, "w") as f:
            json.dump([peak, peak_what], f)
    out, rounds = {}, {}
    measured = [m for m in grid.task_methods(preset, task, methods) if preset.cost_methods is None or m in preset.cost_methods]
    for round_ in range(preset.cost_repeats):  # interleaved, so that a slow spell of the machine hits every method
        for method in measured:
            path = os.path.join(work, f"cost_{preset.name}_{task.name}_{method}_{round_}.json")
            argv = ["-m", "ds_scalora.bench.cost_worker", "--preset", preset.name, "--task", task.name,
                    "--method", method, "--work", work, "--out", path, *(f"--set={s}" for s in sets)]  # fmt: skip
            result = None
            if os.path.isfile(path):  # cached from an earlier invocation, if with the same --sets
                with open(path) as f:
                    result = json.load(f)
                if result.get("sets", []) != list(sets):
                    result = None
            if result is None:
                result = measure.cost_in_subprocess(argv)
            result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak
            print(f"  cost {method} (round {round_ + 1}): {result['step_time_s'] * 1e3:.0f} ms/step, "
                  f"{result['tokens_per_s']:.0f} tok/s, peak {result['peak_memory_gib']:.2f} GiB, MFU {result['mfu']:.1%}",
                  flush=True)  # fmt: skip
            rounds.setdefault(method, []).append(result["step_time_s"])
            if method not in out or result["step_time_s"] < out[method]["step_time_s"]:
                out[method] = result
    for method, times in rounds.items():
        out[method]["rounds_s"] = times
    out["_peak"] = f"{peak / 1e9:.1f} GFLOP/s ({peak_what})"
    out["_excluded"] = {m: why for m, why in (task.excluded or {}).items() if m in methods}
    out["_excluded"] |= {m: f"the {preset.name} preset measures the cost of {', '.join(preset.cost_methods)} only"
                         for m in methods if m not in measured and m not in out["_excluded"]}  # fmt: skip
    return out


# A cost run measures the steady state: ScaLoRA's first refresh at step 2, so that the measured steps
# (3 to cost_steps - 1) hold the steady share of refreshes (every step for I = 1, two in 21 for I = 10)
# rather than the quality runs' warm-up.
STEADY_STATE = {m: {"method.scalora.warmup_steps": 2} for m in ("scalora", "scalora-I")}

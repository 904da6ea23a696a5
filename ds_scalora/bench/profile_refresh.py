"""Where one ScaLoRA refresh spends its time, inside the real training entry point.

    python tools/benchmark.py profile-refresh [--task dates] [--steps 6] [--top 25]

Runs the benchmark's ``cpu`` preset task (SmolLM2-135M, one rank, in this process) as ScaLoRA with a
refresh at every step from step 2, times every ``ZeroScaLoRA.refresh`` call and prints the cProfile
table of all of them (sorted by own time), next to the step times. Why: the refresh's share of a
step is the cost that ScaLoRA adds to LoRA, and on a CPU it is made of many small per-layer pieces
of work that only a profile separates. Nothing is downloaded; the run goes to /tmp.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time


from . import grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="dates", choices=[t.name for t in grid.PRESETS["cpu"].tasks])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    task = next(t for t in grid.PRESETS["cpu"].tasks if t.name == a.task)
    work = tempfile.mkdtemp(prefix="profile_refresh_")
    cfg = grid.run_config(task, "scalora", grid.task_lrs(grid.PRESETS["cpu"], task, "scalora")[0], 0, a.steps, 0,
                          os.path.join(work, "run"), os.path.join(work, "data"),
                          extra={"train.eval_on_start": False, "eval.exact_match": False, "eval.max_batches": 1,
                                 "method.scalora.interval": 1, "method.scalora.warmup_steps": 2})  # fmt: skip
    profile, seconds = cProfile.Profile(), []

    class TimeRefreshes:
        def after_setup(self, engine, model):
            from ..zero.controller import ZeroScaLoRA

            original = ZeroScaLoRA.refresh

            def refresh(controller):
                t0 = time.perf_counter()
                profile.enable()
                try:
                    return original(controller)
                finally:
                    profile.disable()
                    seconds.append(time.perf_counter() - t0)

            ZeroScaLoRA.refresh = refresh

    summary = grid.train_once(cfg, TimeRefreshes(), log_path=os.path.join(work, "log"))
    steps = [h["step_time_s"] for h in summary["history"] if "step_time_s" in h]
    print(f"refresh seconds: {', '.join(f'{s:.3f}' for s in seconds)}")
    print(f"step seconds (refresh included): {', '.join(f'{s:.3f}' for s in steps)}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()

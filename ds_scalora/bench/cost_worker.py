"""One cost run in this process: ``python -m ds_scalora.bench.cost_worker --preset P --task T --method M
--work DIR --out FILE [--set KEY=VALUE ...]``, started by :func:`ds_scalora.bench.runs.cost_runs` in a
fresh process so that the peak memory it reports is this method's alone. Writes a JSON result."""

from __future__ import annotations

import argparse
import json
import os
import shutil

from . import grid, measure

# A cost run measures the steady state: ScaLoRA's first refresh at step 2, so that the measured steps
# (3 to cost_steps - 1) hold the steady share of refreshes (every step for I = 1, two in 21 for I = 10)
# rather than the quality runs' warm-up.
STEADY_STATE = {m: {"method.scalora.warmup_steps": 2} for m in ("scalora", "scalora-I")}


def cost_run(preset_name: str, task_name: str, method: str, work: str, out: str, sets=()) -> dict:
    """The method on the task's config, no eval; the result is also written to ``out``."""
    preset = grid.PRESETS[preset_name]
    task = next(t for t in preset.tasks if t.name == task_name)
    lrs = grid.task_lrs(preset, task, method)
    # ReLoRA's restart interval as in the quality runs (it is derived from their steps); only max_steps
    # is cut to the cost run's length
    steps, _ = grid.task_schedule(preset, task)
    cfg = grid.run_config(task, method, lrs[len(lrs) // 2], 0, steps, 0,
                          os.path.join(work, f"costrun_{method}"), os.path.join(work, "data"),
                          extra={"train.eval_on_start": False, "eval.exact_match": False, "eval.max_batches": 1,
                                 "train.max_steps": preset.cost_steps, **STEADY_STATE.get(method, {})},
                          user_sets=list(sets))  # fmt: skip

    class Count:
        def after_setup(self, engine, model):
            self.params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)

    hooks = Count()
    summary = grid.train_once(cfg, hooks, log_path=out + ".log")
    result = measure.cost_summary(summary)
    result["flops_per_token"] = measure.model_flops_per_token(hooks.params, full=method == "full",
                                                              checkpointing=cfg.model.gradient_checkpointing)  # fmt: skip
    result["params"] = hooks.params
    result["sets"] = list(sets)
    with open(out, "w") as f:
        json.dump(result, f)
    shutil.rmtree(os.path.join(work, f"costrun_{method}", "checkpoints"), ignore_errors=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", required=True, choices=sorted(grid.PRESETS))
    p.add_argument("--task", required=True)
    p.add_argument("--method", required=True, choices=list(grid.METHODS))
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    cost_run(a.preset, a.task, a.method, a.work, a.out, a.set)


if __name__ == "__main__":
    main()

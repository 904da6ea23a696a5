"""From benchmark results to ``docs/benchmarks.md`` and its plots: learning rate chosen per method,
mean and spread over seeds, steps to reach plain LoRA's final metric, the accumulated rank, cost
ratios to LoRA measured in the same run, and the targets of issue 7 with how far each one is missed.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

# issue 7's targets; the GPU step-time ratios are issue 21's, which tightened issue 7's 1.03 and 1.15 to
# 1.02 and 1.10 at both GPU shapes (the CPU's tighter issue-21 ratios are stated by `benchmark.py refresh`)
TARGETS = {"scalora-I_step_ratio_cpu": 1.10, "scalora-I_step_ratio_gpu": 1.02, "scalora_step_ratio_gpu": 1.10,
           "steps_fraction": 0.7, "gap_closed": 0.5}  # fmt: skip


def _mean_sd(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean, sd, digits=3):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def curve(run: dict, metric: str) -> list[tuple[int, float]]:
    return [(h["step"], h[metric]) for h in run["history"] if metric in h]


def mean_curve(runs: list[dict], metric: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over seeds at the eval steps every run has."""
    by_step = defaultdict(list)
    for run in runs:
        for step, value in curve(run, metric):
            by_step[step].append(value)
    return [(s, statistics.fmean(v), min(v), max(v)) for s, v in sorted(by_step.items()) if len(v) == len(runs)]


def choose_lr(runs: list[dict], metric: str) -> float:
    """The learning rate with the best mean final metric over seeds; ties go to the lower eval loss."""
    by_lr = defaultdict(list)
    for run in runs:
        by_lr[run["lr"]].append(run)

    def key(lr):
        m, _ = _mean_sd([r["final"].get(metric) for r in by_lr[lr]])
        loss, _ = _mean_sd([r["final"].get("eval_loss") for r in by_lr[lr]])
        return (m if m is not None else -math.inf, -(loss if loss is not None else math.inf))

    return max(by_lr, key=key)


def steps_to_reach(points, target: float, lower_is_better: bool = False):
    for step, mean, _, _ in points:
        if (mean <= target + 1e-12) if lower_is_better else (mean >= target - 1e-12):
            return step
    return None


def reach_vs_lora(points, lora_points, lower_is_better: bool = False) -> tuple:
    """(first eval step at which ``points`` reach LoRA's final mean, that as a share of the steps LoRA
    took); (None, None) if they never do, the share None if LoRA's own count is unknown."""
    if not lora_points:
        return None, None
    final = lora_points[-1][1]
    lora_steps = steps_to_reach(lora_points, final, lower_is_better)
    reach = steps_to_reach(points, final, lower_is_better)
    return reach, (reach / lora_steps if reach is not None and lora_steps else None)


def task_table(task, runs: list[dict], cost: dict | None, methods: list[str]) -> tuple[list[str], dict]:
    """Markdown rows for one task, and the chosen runs per method (for plots and targets)."""
    metric = task.metric
    chosen, rows = {}, []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            lr = choose_lr(mine, metric)
            chosen[method] = [r for r in mine if r["lr"] == lr]
    lora_points = mean_curve(chosen["lora"], metric) if "lora" in chosen else []
    lora_loss = mean_curve(chosen["lora"], "eval_loss") if "lora" in chosen else []
    header = ("| method | lr (swept) | final " + metric.removeprefix("eval_") + " | final eval loss | steps to LoRA's final "
              "| vs LoRA | steps to LoRA's final eval loss (vs LoRA) | accumulated rank | step time vs LoRA | "
              "tokens/s vs LoRA | peak memory vs LoRA | MFU |")
    rows += [header, "|---" * (header.count("|") - 1) + "|"]
    at_edge = []
    for method, sel in chosen.items():
        m, sd = _mean_sd([r["final"].get(metric) for r in sel])
        loss, loss_sd = _mean_sd([r["final"].get("eval_loss") for r in sel])
        reach, share = reach_vs_lora(mean_curve(sel, metric), lora_points)
        loss_reach, loss_share = reach_vs_lora(mean_curve(sel, "eval_loss"), lora_loss, lower_is_better=True)
        rank, rank_sd = _mean_sd([r.get("update_rank_mean") for r in sel])
        lrs = sorted({r["lr"] for r in runs if r["method"] == method})
        edge = len(lrs) > 1 and sel[0]["lr"] in (lrs[0], lrs[-1])
        if edge:
            at_edge.append(method)
        c = (cost or {}).get(method)
        base = (cost or {}).get("lora")
        rel = (lambda k, inv=False: f"{(base[k] / c[k]) if inv else (c[k] / base[k]):.3f}") if c and base else None
        rows.append(
            f"| {method} | {sel[0]['lr']:g}{' †' if edge else ''} ({', '.join(f'{x:g}' for x in lrs)}) | {_fmt(m, sd)} (n={len(sel)}) | "
            f"{_fmt(loss, loss_sd, 4)} | {_steps(reach)} | {_share(reach, share)} | "
            f"{_steps(loss_reach)}{f' ({loss_share:.2f})' if loss_share is not None else ''} | {_fmt(rank, rank_sd, 1)} | "
            f"{rel('step_time_s') if rel else 'n/a'} | {rel('tokens_per_s') if rel else 'n/a'} | "
            f"{rel('peak_memory_gib') if rel else 'n/a'} | {format(c['mfu'], '.1%') if c and c.get('mfu') else 'n/a'} |"
        )
    if at_edge:
        rows += ["", f"† best at the edge of its swept grid ({', '.join(at_edge)}): the method's optimum may lie beyond "
                     "it, so its figures may understate it; widen the grid before reading a difference."]
    return rows, chosen


def _steps(reach) -> str:
    return "never" if reach is None else str(reach)


def _share(reach, share) -> str:
    return "never" if reach is None else ("n/a" if share is None else f"{share:.2f}")


def plot_task(task, chosen: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, sel in chosen.items():
        for ax, metric in zip(axes, (task.metric, "eval_loss")):
            pts = mean_curve(sel, metric)
            if not pts:
                continue
            steps, mean, lo, hi = zip(*pts)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{method} (lr {sel[0]['lr']:g})")
            ax.fill_between(steps, lo, hi, alpha=0.15)
    axes[0].set_ylabel(task.metric)
    axes[1].set_ylabel("eval loss")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task.name}: mean over seeds at each method's chosen learning rate (band: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GPU_NOT_MEASURED = (f"- the GPU step-time targets (ScaLoRA-I ≤ {TARGETS['scalora-I_step_ratio_gpu']}, ScaLoRA ≤ "
                    f"{TARGETS['scalora_step_ratio_gpu']}): not measured by a run on a CPU; `python tools/benchmark.py cost "
                    "--preset gpu` on one 80 GB GPU measures them at the 1B and 12B shapes (docs/benchmarks_cost_gpu.md)")


def cost_targets(cost: dict | None, device: str, where: str = "") -> list[str]:
    """The verdicts on the step-time targets this device has (CPU: ScaLoRA-I; GPU: ScaLoRA-I and ScaLoRA)."""
    lines = []
    if cost and "lora" in cost:
        for method, key in (("scalora-I", "scalora-I_step_ratio_cpu" if device == "cpu" else "scalora-I_step_ratio_gpu"),
                            ("scalora", None if device == "cpu" else "scalora_step_ratio_gpu")):  # fmt: skip
            if method in cost and key:
                ratio = cost[method]["step_time_s"] / cost["lora"]["step_time_s"]
                lines.append(_verdict(f"{where}{method} step time / LoRA ({device})", ratio, TARGETS[key],
                                      lower_is_better=True))  # fmt: skip
    return lines


def targets_section(per_task: dict, cost: dict | None, device: str) -> list[str]:
    lines = ["## Targets", "", *cost_targets(cost, device), *([GPU_NOT_MEASURED] if device == "cpu" else [])]
    for name, (task, chosen) in per_task.items():
        metric = task.metric
        if "lora" not in chosen or "scalora" not in chosen:
            continue
        reach, share = reach_vs_lora(mean_curve(chosen["scalora"], metric), mean_curve(chosen["lora"], metric))
        if name != "facts" and (share is not None or reach is None):
            frac = math.inf if reach is None else share
            lines.append(_verdict(f"{name}: ScaLoRA steps to LoRA's final {metric} / LoRA's", frac,
                                  TARGETS["steps_fraction"], lower_is_better=True))  # fmt: skip
        if name == "facts" and "full" not in chosen:
            lines.append(f"- {name}: share of the LoRA → full fine-tuning gap closed by ScaLoRA: not measurable in "
                         f"this run (full fine-tuning was not run; target ≥ {TARGETS['gap_closed']})")
        if name == "facts" and "full" in chosen:
            get = lambda m: statistics.fmean(r["final"][metric] for r in chosen[m])  # noqa: E731
            gap = get("full") - get("lora")
            closed = (get("scalora") - get("lora")) / gap if gap > 0 else math.nan
            lines.append(_verdict(f"{name}: share of the rank-4 LoRA → full fine-tuning gap closed by ScaLoRA", closed,
                                  TARGETS["gap_closed"], lower_is_better=False))  # fmt: skip
    return lines + [""]


def _verdict(what: str, value: float, target: float, lower_is_better: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"- {what}: not measurable in this run (target {target})"
    ok = value <= target + 1e-9 if lower_is_better else value >= target - 1e-9  # not missed by rounding
    how = "met" if ok else f"**missed** by {abs(value - target):.3f}"
    return f"- {what}: {value:.3f} (target {'≤' if lower_is_better else '≥'} {target}): {how}"


def write_report(out_dir: str, preset, tasks_runs: dict, cost: dict | None, meta: dict, scaling_md: str | None) -> str:
    """Write ``benchmarks.md`` and the plots into ``out_dir``; returns the markdown's path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# Benchmarks", "", f"Generated by `{meta['command']}` (preset `{preset.name}`) on {meta['device']}, "
             f"{meta['date']}, in {meta['seconds'] / 60:.1f} min of runs. Do not edit by hand: rerun the command." + (
             " **A reduced run**: fewer seeds, learning rates, tasks or methods than the preset; its figures are "
             "single measurements, not the tuned comparison the preset makes." if meta.get("reduced") else ""), "",
             "Steps per run: " + ", ".join(f"{t.name} {t.steps or preset.steps}" for t, _ in tasks_runs)
             + f"; seeds: {_seeds_text(meta.get('seeds', preset.seeds))}; "
             + ("learning rates: the middle of each method's grid only (no sweep: `--single-lr`). " if meta.get("single_lr")
                else "the learning rate of every method is the best of its grid by mean final metric on the evaluation "
                     "set (the same set the table reports: an optimistic choice, the same for every method). ")
             + "Steps to LoRA's final: the first evaluation at which the mean over seeds reaches LoRA's final mean "
             "(on the task's metric, which the targets use, and on eval loss, for reference: a saturated metric "
             "cannot separate methods that all reach it). "
             + "Accumulated rank: the numerical rank (singular values above 1e-3 of the largest) of each adapted "
             "matrix's total update W_final − W_initial, averaged over matrices, for every method alike. "
             + (f"Cost: a separate run per method in a fresh process, same DeepSpeed configuration, {preset.cost_steps} "
                f"steps, mean (amortised) step time after 2 warm-up steps, the fastest of {preset.cost_repeats} interleaved rounds; "
                f"MFU against the measured matmul peak ({cost.get('_peak', 'n/a')})." if cost else
                "Cost: not measured in this run (`--no-cost`)."), ""]  # fmt: skip
    per_task = {}
    for task, runs in tasks_runs:
        rows, chosen = task_table(task, runs, cost if task is tasks_runs[0][0] else None, preset.methods)
        per_task[task.name] = (task, chosen)
        png = f"benchmark_{task.name}.png"
        plot_task(task, chosen, os.path.join(out_dir, png))
        lines += [f"## {task.name}", "", task.what + ".", "", *rows, "", f"![{task.name}]({png})", ""]
    if cost:
        lines += ["Cost columns are measured on the first task's configuration only.", "",
                  "## Cost per step", "", *cost_section(preset, tasks_runs[0][0], cost, meta)]  # fmt: skip
    lines += targets_section(per_task, cost, meta["device_kind"])
    if scaling_md:
        lines += ["## Scaling over data-parallel ranks", "", scaling_md, ""]
    return _write_lines(os.path.join(out_dir, "benchmarks.md"), lines)


def cost_section(preset, task, cost: dict, meta: dict) -> list[str]:
    """The cost of every method in absolute terms and as ratios to LoRA, with every round's step time;
    methods the task excludes are listed with the reason."""
    base = cost["lora"]
    excluded = cost.get("_excluded", {})
    lines = [f"Each method is the training entry point at one rank on the task's configuration ({task.what}), in a "
             f"fresh process (so that its peak memory is its own), {preset.cost_steps} steps, mean (amortised) step time "
             f"after 2 warm-up steps (periodic refreshes and restarts included; ScaLoRA refreshes from step 2 here, so the "
             f"measured steps hold its steady share of refreshes), the fastest of {preset.cost_repeats} "
             f"interleaved rounds; the round-to-round spread of LoRA itself is shown for scale; MFU against the measured matmul "
             f"peak ({cost.get('_peak', 'n/a')}). Ratios are to LoRA measured in the same invocation.", "",
             "| method | step time (ms) | every round (ms) | step time vs LoRA | tokens/s | tokens/s vs LoRA | "
             "peak memory (GiB) | peak memory vs LoRA | MFU |", "|---" * 9 + "|"]  # fmt: skip
    for method in preset.methods:
        c = cost.get(method)
        if method in excluded:
            lines.append(f"| {method} | not run: {excluded[method]} |" + " |" * 7)
        if not c:
            continue
        every = ", ".join(f"{t * 1e3:.0f}" for t in c.get("rounds_s", []))
        lines.append(f"| {method} | {c['step_time_s'] * 1e3:.0f} | {every} | {c['step_time_s'] / base['step_time_s']:.3f} | "
                     f"{c['tokens_per_s']:.0f} | {c['tokens_per_s'] / base['tokens_per_s']:.3f} | "
                     f"{c['peak_memory_gib']:.2f} | {c['peak_memory_gib'] / base['peak_memory_gib']:.3f} | "
                     f"{format(c['mfu'], '.1%') if c.get('mfu') else 'n/a'} |")  # fmt: skip
    lines.append("")
    if meta.get("sets"):
        lines += [f"The configuration above is changed by the command line's overrides: {', '.join(f'`{x}`' for x in meta['sets'])}.", ""]
    if task.reference:
        lines += [f"Reference measured elsewhere ({task.reference}): a lead for the absolute figures, not a ratio "
                  f"(LoRA here: {base['tokens_per_s']:,.0f} tokens/s, {base['peak_memory_gib']:.1f} GiB).", ""]
    return lines


def write_cost_report(out_dir: str, preset, tasks_cost: list, meta: dict) -> str:
    """Write ``benchmarks_cost_<preset>.md``: the cost of every method as ratios to LoRA on each task's
    configuration, without quality runs (``tools/benchmark.py cost``, and the gpu preset), so that
    cost can be measured on its own on an idle machine or on a GPU."""
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# Benchmark: cost per step", "",
             f"Generated by `{meta['command']}` (preset `{preset.name}`) on {meta['device']}, {meta['date']}, in "
             f"{meta['seconds'] / 60:.1f} min. Do not edit by hand: rerun the command.", ""]  # fmt: skip
    targets = ["## Targets", ""]
    for task, cost in tasks_cost:
        lines += [f"## {task.name}", "", *cost_section(preset, task, cost, meta)]
        targets += cost_targets(cost, meta["device_kind"], f"{task.name}: ")
    if meta["device_kind"] == "cpu":
        targets.append(GPU_NOT_MEASURED)
    return _write_lines(os.path.join(out_dir, f"benchmarks_cost_{preset.name}.md"), lines + targets + [""])


def write_scaling_report(out_dir: str, body_md: str, meta: dict) -> str:
    """Write ``benchmarks_scaling.md``: one refresh at 1, 2 and 4 ranks and the model for 8 to 64 GPUs
    (``tools/benchmark.py scaling``)."""
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# Benchmark: scaling of one refresh", "",
             f"Generated by `{meta['command']}` on {meta['device']}, {meta['date']}, in {meta['seconds'] / 60:.1f} min. "
             "Do not edit by hand: rerun the command.", "", body_md]  # fmt: skip
    return _write_lines(os.path.join(out_dir, "benchmarks_scaling.md"), lines)


def _seeds_text(seeds) -> str:
    """``[0, 1]`` or, per task, ``dates [0, 1], facts [0, 1, 2]``."""
    return ", ".join(f"{name} {list(s)}" for name, s in seeds.items()) if isinstance(seeds, dict) else str(list(seeds))


def _write_lines(path: str, lines: list[str]) -> str:
    """Write a report atomically: a reader (or an interrupted run) never sees half a file."""
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path

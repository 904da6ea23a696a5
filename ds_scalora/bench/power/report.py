"""The report (``docs/benchmarks_power.md``, one per device): per task, every arm's paired comparison with
LoRA, its tuning grid, the sweep's run time and the issue's targets, met or missed."""

from __future__ import annotations

import json
import math
import os

from .. import REPO
from .records import RECORDS, report_values, run_time, superseded, tuning_table
from .tasks import Task

def report_path(device: str) -> str:
    return os.path.join(REPO, "docs", "benchmarks_power.md" if device == "cpu" else f"benchmarks_power_{device}.md")


def _fmt(x, digits=3):
    """``digits`` decimals; below 0.01, ``digits`` significant digits (distill's KL is ~2e-4)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}" if x and abs(x) < 0.01 else f"{x:.{digits}f}"


# curves are stored rounded to 5 decimals (_compact), the final metric to 6: a point within this of a level
# has reached it (else a run would not reach its own final value)
_CURVE_ROUNDING = 5e-6


def steps_to_reach(curve: list, level: float, every: int = 20, start: int | None = None) -> int | None:
    """First evaluated step whose error is at or below ``level``: curves hold the error every ``every``
    steps from step ``start`` (None: from step ``every``, no point at step 0)."""
    start = every if start is None else start
    for i, v in enumerate(curve):
        if v is not None and v <= level + _CURVE_ROUNDING:
            return start + i * every
    return None


def render(task: Task, root: str = RECORDS) -> tuple[str, dict]:
    """The task's section of docs/benchmarks_power.md, and the figures the targets read."""
    from ..stats import gap_closed, paired_difference

    lines = [f"## {task.name}: {task.what}", ""]
    if task.floor is not None:
        lines += [f"Rank-4 LoRA's floor (the energy of D outside its top 4 directions): **{task.floor:.3f}**; "
                  "full fine-tuning's: 0.", ""]
    lines += [f"Tuning seeds {task.tune_seeds}; report seeds {task.report_seeds[0]}–{task.report_seeds[-1]} "
              f"(n = {len(task.report_seeds)}), disjoint. Differences are LoRA − arm per seed (positive: the arm is "
              "better), 95% t-interval, exact two-sided Wilcoxon signed-rank p; gap closed = (LoRA − arm) / "
              "(LoRA − full) on the means, paired bootstrap 95% interval (10,000 resamples).", ""]
    results = {a.name: report_values(task, a, root) for a in task.arms}
    base, full = results.get("lora"), results.get("full")

    def seeds_ok(res):
        return res is not None and len(res[1]) == len(task.report_seeds)

    extra_title = f" {task.extra[1]} |" if task.extra else ""
    lines += [f"| arm | setting (tuned) | n | {task.metric}, mean ± sd |{extra_title} energy outside top r | "
              f"LoRA − arm [95% CI] | Wilcoxon p | gap closed [95% CI] | steps to LoRA's final {task.metric} |",
              "|---" * (10 if task.extra else 9) + "|"]
    figures, values = {}, {}
    for arm in task.arms:
        res = results[arm.name]
        if not seeds_ok(res):
            have = 0 if res is None else len(res[1])
            lines.append(f"| {arm.name} | (incomplete: {have}/{len(task.report_seeds)} report runs) |"
                         + " |" * (8 if task.extra else 7))
            continue
        (spec, lr, _, edges), recs = res
        vals = [recs[s][task.metric] for s in task.report_seeds]
        values[arm.name] = vals
        finite = [v for v in vals if v is not None and math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        sd = (sum((v - mean) ** 2 for v in finite) / max(1, len(finite) - 1)) ** 0.5 if finite else math.nan
        energy = [recs[s].get("energy_outside_top_r") for s in task.report_seeds]
        energy = [e for e in energy if e is not None and math.isfinite(e)]
        setting = f"lr {lr:g}" + (f", shrink {spec['shrink']:g}" if "shrink" in spec else "")
        setting += (" † " + "/".join(edges)) if edges else ""
        row = [arm.name, setting, str(len(vals)), f"{_fmt(mean)} ± {_fmt(sd)}"]
        if task.extra:
            xs = [recs[s].get(task.extra[0]) for s in task.report_seeds]
            xs = [x for x in xs if x is not None and math.isfinite(x)]
            row.append(_fmt(sum(xs) / len(xs)) if xs else "—")
        row.append(_fmt(sum(energy) / len(energy)) if energy else "—")
        fig = {"mean": mean}
        if seeds_ok(base) and arm.name != "lora":
            lv = [base[1][s][task.metric] for s in task.report_seeds]
            d = paired_difference(lv, vals)
            row += [f"{_fmt(d['mean'])} [{_fmt(d['low'])}, {_fmt(d['high'])}]", f"{d['p_wilcoxon']:.2g}"]
            fig["diff"] = d
            if seeds_ok(full):
                fv = [full[1][s][task.metric] for s in task.report_seeds]
                g = gap_closed(lv, vals, fv)
                row.append(f"{_fmt(g['share'], 2)} [{_fmt(g['low'], 2)}, {_fmt(g['high'], 2)}]")
                fig["gap"] = g
            else:
                row.append("—")
            reach = [steps_to_reach(recs[s]["curve"], base[1][s][task.metric], task.curve_every, task.curve_start)
                     for s in task.report_seeds]
            lora_steps = [steps_to_reach(base[1][s]["curve"], base[1][s][task.metric], task.curve_every,
                                         task.curve_start) for s in task.report_seeds]
            ratios = [a / b for a, b in zip(reach, lora_steps) if a is not None and b]
            reached = sum(a is not None for a in reach)
            row.append(f"{reached}/{len(reach)} seeds; median ratio {sorted(ratios)[len(ratios) // 2]:.2f}"
                       if ratios else f"0/{len(reach)} seeds")
            fig["steps_ratio"] = sorted(ratios)[len(ratios) // 2] if ratios and reached == len(reach) else None
        else:
            row += ["—", "—", "—", "—"]  # LoRA itself: no comparison
        figures[arm.name] = fig
        lines.append("| " + " | ".join(row) + " |")
    detectable = [f"{name} {_fmt(fig['diff']['detectable'])}" for name, fig in figures.items()
                  if "diff" in fig and math.isfinite(fig["diff"].get("detectable", math.nan))]
    if detectable:  # what an interval covering zero is worth
        lines += ["", f"Smallest true difference the paired t-test would detect with 80% power (two-sided 5%, n = "
                  f"{len(task.report_seeds)}, each arm's observed spread of LoRA − arm; stats.detectable_difference): "
                  + ", ".join(detectable) + "."]
    # what each variant or ablation changes, measured against the default it varies rather than against LoRA
    ref = values.get("scalora-I")
    others = [name for name in values if name not in ("lora", "full", "scalora-I")]
    if ref is not None and others:
        lines += ["", "Against ScaLoRA-I at the default, paired on the same seeds (ScaLoRA-I − arm, positive: the arm is "
                  "better; 95% t-interval, exact Wilcoxon p): what each variant, ablation or other method changes.", "",
                  "| arm | ScaLoRA-I − arm [95% CI] | Wilcoxon p |", "|---|---|---|"]
        for name in others:
            d = paired_difference(ref, values[name])
            figures[name]["vs_scalora_I"] = d
            lines.append(f"| {name} | {_fmt(d['mean'])} [{_fmt(d['low'])}, {_fmt(d['high'])}] | {d['p_wilcoxon']:.2g} |")
    lines += ["", "† the tuned setting is on the edge of its grid (named). Every arm's tuning grid (mean over the tuning "
              "seeds; — where a tuning run is still missing):", ""]
    for arm in task.arms:
        table = tuning_table(task, arm, root)
        if all(v is None for v in table.values()):
            continue
        shrinks = sorted({k[0] for k in table}, key=lambda x: -1 if x is None else x)
        head = "| " + ("shrink \\ lr" if arm.shrinks else "lr") + " | " + " | ".join(f"{lr:g}" for lr in arm.lrs) + " |"
        lines += [f"**{arm.name}** ({arm.what})", "", head, "|---" * (len(arm.lrs) + 1) + "|"]
        for sh in shrinks:
            label = "default" if sh is None else f"{sh:g}"
            lines.append(f"| {label} | " + " | ".join(_fmt(table[(sh, lr)]) for lr in arm.lrs) + " |")
        lines.append("")
    return "\n".join(lines), figures


def targets(task: Task, figures: dict) -> list[str]:
    """The issue's targets on this task, fixed before running: met or missed, and by how much."""
    arm = figures.get("scalora-I")
    if not arm or "diff" not in arm:
        return ["ScaLoRA-I at the default: no complete report runs yet (the targets are not evaluated)"]
    out = []
    d = arm["diff"]
    if task.name in ("regression", "distill"):
        g = arm.get("gap")
        if g is None:
            out.append("gap closed: full fine-tuning's report runs are missing")
        else:
            ok = g["share"] >= 0.5 and d["low"] > 0
            out.append(f"ScaLoRA-I (default) closes ≥ 50% of the LoRA → full gap with the interval excluding no "
                       f"improvement: gap closed {g['share']:.2f} [{g['low']:.2f}, {g['high']:.2f}], paired improvement "
                       f"{d['mean']:.3g} [{d['low']:.3g}, {d['high']:.3g}] → **{'met' if ok else 'missed'}**"
                       + ("" if ok else f" (by {max(0.5 - g['share'], 0):.2f} of the gap)"))
    if task.name.startswith("facts128"):  # (c) and its one-layer variant (c')
        ok = d["low"] > 0
        out.append(f"ScaLoRA-I (default) paired NLL improvement over LoRA with the interval excluding zero: "
                   f"{d['mean']:.3g} [{d['low']:.3g}, {d['high']:.3g}] → **{'met' if ok else 'missed'}**"
                   + ("" if ok else f" (the interval's low end is {d['low']:.3g})"))
    if task.name == "distill" or task.name.startswith("facts128"):
        ratio = arm.get("steps_ratio")
        ok = ratio is not None and ratio <= 0.7
        out.append(f"ScaLoRA-I reaches LoRA's final {task.metric} in ≤ 0.7× LoRA's steps: median ratio "
                   f"{'never on some seed' if ratio is None else f'{ratio:.2f}'} → **{'met' if ok else 'missed'}**")
    return out


def _shown(path: str) -> str:
    """A path as the report names it: relative to the repository when inside it."""
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def write_report(tasks: list, path: str, root: str = RECORDS, command: str = "") -> str:
    parts = ["# ScaLoRA's powered benchmark", "",
             f"Generated by `{command or 'python tools/benchmark.py power'}` from the records in "
             f"`{_shown(root)}/` (one line per finished run; the report regenerates from them alone).", ""]
    for task in tasks:
        text, figures = render(task, root)
        t = run_time(task, root)
        parts += [text, "", f"Run time: {t['runs']} runs recorded, {t['hours']:.1f} h in all (median "
                  f"{_fmt(t['median_s'], 1)} s a run, as the records state it: on a loaded machine a run takes longer); "
                  f"{t['missing']} runs of this task's arms still missing"
                  + (f", about {t['missing_hours']:.1f} h at the median" if t["missing"] and t["runs"] else "") + "."
                  + (f" {old} records of an earlier version of the task (without {json.dumps(task.current)}) stay in "
                     "the files, unused." if (old := superseded(task, root)) else ""),
                  "", "**Targets**", ""] + [f"- {t}" for t in targets(task, figures)] + [""]
    text = "\n".join(parts)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


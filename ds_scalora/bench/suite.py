"""Side-by-side benchmark of LoRA, rsLoRA, ScaLoRA (I=1), ScaLoRA-I (I=10), ElaLoRA, a ReLoRA-style
restart baseline and full fine-tuning; writes docs/benchmarks.md and its plots.

    python tools/benchmark.py quality --preset quick      # the harness end to end, ~2 min (the tests run it; writes under runs/)
    python tools/benchmark.py quality --preset cpu --scaling   # the report in docs/ (2 idle CPU cores: about 5 h)
    python tools/benchmark.py quality --preset cpu --tasks dates --seeds 0 --single-lr   # a reduced run, ~17 min
    python tools/benchmark.py cost --preset cpu --tasks dates   # docs/benchmarks_cost_cpu.md (idle machine)
    python tools/benchmark.py cost --preset gpu           # one 80 GB GPU: cost at the 1B and 12B shapes (not yet
                                                          # run; ~25 min estimated) -> docs/benchmarks_cost_gpu.md
    python tools/benchmark.py scaling --preset cpu        # docs/benchmarks_scaling.md (idle machine)

Every run is the training entry point (``ds_scalora.train.loop.run``) at one rank, in this process,
with each method's learning rate swept (``ds_scalora.bench.grid.PRESETS``) over several seeds. Cost is
measured per method in a fresh process (so that its peak memory is its own) and reported as ratios to
LoRA from the same invocation. ``--scaling`` adds ``zero_scaling``'s measurement of one refresh (and
of ElaLoRA's per-step communication) at 1, 2 and 4 data-parallel ranks and the communication model for 8
to 64 GPUs on a 12B model. Finished runs are cached in ``--work`` with their settings (a rerun skips
them; a cached run whose method or task settings changed is set aside and re-run), so a long preset can
be resumed after an interruption.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time


from . import REPO, grid, report
from .runs import cost_runs, quality_runs


SCALING_MODEL = """Model of one refresh at N data-parallel ranks (ZeRO-2, what the controller does; ZeRO-3 drops the
last term): an all-reduce of the fp32 factors and gradients (payload 2·4·n_adapter bytes, a ring sends
2(N−1)/N of it per rank), an all-reduce of the packed α, β (negligible), and the all-gather of the merged
frozen-weight shares (each rank sends (N−1)/N of the bf16 adapted weights, 2·n_adapted bytes). Time:
t(N) ≈ t_solve·(layers/N)/layers + t_merge/N + bytes_sent(N)/bandwidth + (collectives)·latency.
For a 12B model (Mistral-NeMo shape: 40 layers, hidden 5120, MLP 14336, 8 KV heads; r = 8 on all seven
projections): n_adapter = 28.5 M (114 MB fp32), n_adapted = 10.9 B (21.8 GB bf16). Per rank and refresh:
factors 2(N−1)/N·228 MB ≈ 0.40–0.45 GB for N = 8–64, and under ZeRO-2 the weight all-gather
(N−1)/N·21.8 GB ≈ 19–21.5 GB. At an assumed 50 GB/s per GPU across nodes (400 Gb/s InfiniBand) that is
≈ 0.4 s (ZeRO-2) or ≈ 0.01 s (ZeRO-3) per refresh, independent of N beyond 8; amortised over I = 10 steps
of a 12B step (seconds), a few percent at ZeRO-2 and well under one percent at ZeRO-3. These bandwidths are
assumptions, not measurements: the measured rows above are CPU/gloo figures for the structure (bytes
and collectives per refresh). Their "model" column is this formula's bytes at the measured shape, next to
the bytes counted by wrapping the collectives (they differ by the α, β packet and the all-gather's
padding to a multiple of N). The CPU times say little about GPUs: 4 ranks share 2 cores.
ElaLoRA communicates at every step instead: an all-reduce of the full fp32 P and Q (its orthogonality
regulariser and reallocation need whole factors; each rank writes its ZeRO pieces into a zero buffer),
2(N−1)/N·4·n_PQ bytes per rank, plus R floats per matrix on a reallocation step. For the 12B shape at
r = 8 of 16 slots, n_PQ = 57 M (228 MB fp32): ≈ 0.40–0.45 GB per rank and step for N = 8–64, ≈ 9 ms at
the same assumed 50 GB/s, two to four times what reducing the factors' own gradients sends (bf16 or
fp32). An all-gather of the partitions would send half; not done: the all-reduce of a zero-filled
buffer serves ZeRO stages 1 to 3 with one code path."""


def scaling_section(quick: bool) -> str:
    args = ["--no-memory"] + (["--quick"] if quick else [])
    proc = subprocess.run([sys.executable, "-m", "ds_scalora.bench.zero_scaling", *args], capture_output=True, text=True,
                          timeout=3600, cwd=REPO)
    command = " ".join(["python tools/benchmark.py zero", *args])
    if proc.returncode != 0:
        return f"`{command}` failed:\n\n```\n{proc.stderr[-2000:]}\n```"
    return f"Measured by `{command}`:\n\n{proc.stdout.strip()}\n\n{SCALING_MODEL}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--preset", choices=sorted(grid.PRESETS), default="quick")
    p.add_argument("--out", default=None, help="where benchmarks.md goes (default: docs/; for --preset quick, "
                   "runs/benchmark_quick/docs, so that a harness check never overwrites the report)")
    p.add_argument("--work", default=None, help="run outputs and the cache (default: <out>/../runs/benchmark_<preset>)")
    p.add_argument("--tasks", nargs="+", default=None, help="a subset of the preset's tasks")
    p.add_argument("--methods", nargs="+", default=None, choices=list(grid.METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's (and its tasks') seeds")
    p.add_argument("--single-lr", action="store_true", help="only the middle of each method's grid (no sweep)")
    p.add_argument("--no-cost", action="store_true", help="skip the per-method cost runs")
    p.add_argument("--cost-only", action="store_true", help="only the cost runs (every task), written to "
                   "<out>/benchmarks_cost_<preset>.md; run it on an otherwise idle machine (the gpu preset is cost only)")
    p.add_argument("--scaling", action="store_true", help="add zero_scaling's refresh scaling at 1, 2, 4 ranks")
    p.add_argument("--scaling-only", action="store_true", help="only the refresh scaling, written to "
                   "<out>/benchmarks_scaling.md; run it on an otherwise idle machine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config override applied to every run (as launch/train.py's --set), e.g. "
                   "--set model.model_name_or_path=/models/Llama-3.2-1B to measure the cost on a real model")
    a = p.parse_args(argv)
    preset = grid.PRESETS[a.preset]
    tasks = [t for t in preset.tasks if a.tasks is None or t.name in a.tasks]
    if not tasks:
        p.error(f"--tasks: preset {preset.name} has {[t.name for t in preset.tasks]}")
    methods = a.methods or preset.methods
    if "lora" not in methods:
        p.error("--methods must include lora: every figure is a ratio to it")
    work = a.work or os.path.join(REPO, "runs", f"benchmark_{preset.name}")
    if a.out is None:
        a.out = os.path.join(work, "docs") if preset.name == "quick" else os.path.join(REPO, "docs")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    meta = {"command": ("python tools/benchmark.py quality " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
            "device": device, "device_kind": "gpu" if torch.cuda.is_available() else "cpu",
            "date": datetime.date.today().isoformat()}  # fmt: skip
    if a.scaling_only:
        body = scaling_section(quick=preset.name == "quick")
        print(f"wrote {report.write_scaling_report(a.out, body, meta | {'seconds': time.perf_counter() - t0})}")
        return
    if a.cost_only or not preset.quality:
        if a.no_cost:
            p.error("--no-cost leaves nothing to run with --cost-only or a cost preset")
        tasks_cost = []
        for task in tasks:
            print(f"cost {task.name}", flush=True)
            tasks_cost.append((task, cost_runs(preset, task, methods, work, a.set)))
        meta |= {"seconds": time.perf_counter() - t0, "sets": a.set}
        print(f"wrote {report.write_cost_report(a.out, preset, tasks_cost, meta)}")
        return
    tasks_runs = []
    for task in tasks:
        print(f"task {task.name}", flush=True)
        tasks_runs.append((task, quality_runs(preset, task, methods, a.seeds or grid.task_seeds(preset, task), a.single_lr, work, a.set)))
    cost = None if a.no_cost else cost_runs(preset, tasks[0], methods, work, a.set)
    scaling = scaling_section(quick=preset.name == "quick") if a.scaling else None
    meta |= {"seeds": a.seeds or {t.name: grid.task_seeds(preset, t) for t in tasks}, "single_lr": a.single_lr,
             "sets": a.set,
             # cached runs count with the time they took when they ran
             "seconds": max(time.perf_counter() - t0, sum(r["seconds"] for _, runs in tasks_runs for r in runs))}  # fmt: skip
    if a.seeds or a.single_lr or a.tasks or a.methods or a.set:
        meta["reduced"] = True
    path = report.write_report(a.out, preset, tasks_runs, cost, meta, scaling)
    print(f"wrote {path} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()

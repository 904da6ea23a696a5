"""Does an arm's result on task (c') need the update's rank? Its run, then the trained weight's update cut to its
best rank-k approximation and the answer NLL evaluated again.

    python -m ds_scalora.bench.update_rank                           # every arm of ARMS on report seeds 0-7
    python -m ds_scalora.bench.update_rank --arms scalora-I --seeds 0 1 # some; the records' runs are not run again
    python -m ds_scalora.bench.update_rank --report-only             # the table, from the records

Why (issue 16, 2026-12-05): on (c') ScaLoRA-I beats LoRA by 0.124 NLL through one weight (layer 24's
``mlp.down_proj``), and the ablations say the merge does it, not the solve; yet LoRA at rank 16 is no better than
at rank 4, and the rank sketch puts only 0.6-8% of ScaLoRA-I's accumulated update's energy outside its top 4
directions. Two readings: the merge accumulates rank that matters, or it makes a better optimiser of a
(nearly) rank-4 update. Cutting the finished update ΔW = W − W0 (+ the adapter's s·B·A) to its top k singular
directions (SVD, float64) with the adapter switched off, and evaluating (c')'s metric for each k, tells them
apart: if ScaLoRA-I's rank-4 cut keeps its NLL, rank is not what it adds.

Each run is the arm's own (c') run (``OneLayerFactsTask.run``) at its tuned setting (the task's records), with a
hook (``loop.run``'s ``after_training``) that cuts and evaluates the model as the last evaluation saw it, then
puts it back. The rebuilt update at full rank (``nll_rebuilt``) must give the run's own NLL (fp32 rounding of
W0 + ΔW only): that checks the cut's bookkeeping on every run. One record per (arm, seed) in RECORDS, written as
each run finishes; the table regenerates from the records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch

from .power.records import tuned_setting
from .power.tasks import ONE_LAYER, OneLayerFactsTask, one_layer_facts_task
from .stats import paired_difference

RECORDS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "bench_records", "update_rank",
                       "facts128-one-layer.jsonl")
KS = (1, 2, 4, 8, 16, 64)
ARMS = ("lora", "lora-4r", "scalora-I", "scalora-I-4r", "scalora-I-constant", "relora", "full")


def cut(delta: torch.Tensor, k: int, svd=None) -> torch.Tensor:
    """The best rank-``k`` approximation of ``delta`` in Frobenius norm (Eckart-Young): its top ``k`` singular
    directions. ``svd``: ``torch.linalg.svd(delta, full_matrices=False)`` when already computed."""
    U, S, Vh = svd if svd is not None else torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def energy_outside(S: torch.Tensor, k: int) -> float:
    """The share of ‖ΔW‖²_F outside the top ``k`` singular directions (S: the singular values)."""
    total = float((S * S).sum())
    return float((S[k:] * S[k:]).sum()) / total if total > 0 else 0.0


def _adapter_delta(module) -> torch.Tensor | None:
    """s·B·A of a PEFT LoRA layer's active adapters in the weight's layout (PEFT's ``get_delta_weight``); None for a
    plain layer (full fine-tuning)."""
    if not hasattr(module, "lora_A"):
        return None
    return sum(module.get_delta_weight(name) for name in module.active_adapters)


class CutUpdate:
    """The ``loop.run`` hooks: W0 after set-up; after training, the NLL of every rank-k cut of the update."""

    def __init__(self, target: str, ks=KS):
        self.target, self.ks, self.result = target, tuple(ks), None

    def after_setup(self, engine, model) -> None:
        self.module = next(m for name, m in model.named_modules() if name.endswith(self.target))
        self.weight = getattr(self.module, "base_layer", self.module).weight
        if self.weight.dtype not in (torch.float32, torch.float64):
            # a bf16 base keeps part of ScaLoRA's merges in the precision policy's state, not in the weight
            raise ValueError(f"update_rank reads the merged update from the weight; it is {self.weight.dtype} (use fp32)")
        self.w0 = self.weight.detach().to(torch.float64, copy=True)

    @torch.no_grad()
    def after_training(self, engine, model, evaluate) -> None:
        nll = evaluate()["eval_loss"]
        adapter = _adapter_delta(self.module)
        delta = self.weight.detach().double() - self.w0 + (0 if adapter is None else adapter.detach().double())
        svd = torch.linalg.svd(delta, full_matrices=False)
        saved = self.weight.detach().clone()
        lora_B = [self.module.lora_B[name].weight for name in self.module.active_adapters] if adapter is not None else []
        saved_B = [b.detach().clone() for b in lora_B]
        for b in lora_B:
            b.zero_()  # the adapter off: the cut alone carries the update
        cuts = {}
        try:
            for k in (*self.ks, None):
                self.weight.copy_(self.w0 + (delta if k is None else cut(delta, k, svd)))
                cuts["all" if k is None else str(k)] = evaluate()["eval_loss"]
        finally:
            self.weight.copy_(saved)
            for b, v in zip(lora_B, saved_B):
                b.copy_(v)
        S = svd[1]
        self.result = {"nll": nll, "nll_rebuilt": cuts.pop("all"), "cut_nll": cuts,
                       "energy_outside": {str(k): round(energy_outside(S, k), 6) for k in self.ks},
                       "update_norm": float(S.norm()), "singular_values": [round(float(s), 6) for s in S[:16]]}


def load(path: str = RECORDS) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    out[(rec["arm"], rec["seed"])] = rec
    return out


def run_missing(arms, seeds, ks=KS, path: str = RECORDS) -> None:
    task = one_layer_facts_task()
    by_name = {arm.name: arm for arm in task.arms}
    have = load(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for name in arms:
        setting = tuned_setting(task, by_name[name])
        if setting is None:
            raise SystemExit(f"{name}: its (c') tuning is incomplete; run `python tools/benchmark.py power --tasks "
                             f"{task.name} --arms {name} --phase tune` first")
        spec, lr, _, _ = setting
        for seed in seeds:
            if (name, seed) in have:
                continue
            hook = CutUpdate(OneLayerFactsTask.targets[0], ks)  # the one weight the task trains
            result = task.run(spec, lr, seed, hooks=hook)
            rec = {"arm": name, "seed": seed, "spec": spec, "lr": lr, **hook.result, "run_nll": result["nll"]}
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{name} seed {seed}: nll {rec['nll']:.4f} (rebuilt {rec['nll_rebuilt']:.4f}), cuts "
                  + ", ".join(f"{k}: {v:.4f}" for k, v in rec["cut_nll"].items()), flush=True)


def report(path: str = RECORDS) -> str:
    recs = load(path)
    arms = [a for a in ARMS if any(key[0] == a for key in recs)] + sorted({a for a, _ in recs} - set(ARMS))
    if not recs:
        return "no records"
    ks = sorted({int(k) for rec in recs.values() for k in rec["cut_nll"]})
    lines = [f"Answer NLL on (c') with the update of layer {ONE_LAYER}'s mlp.down_proj cut to its top k directions "
             "(mean ± sd over the seeds; `python -m ds_scalora.bench.update_rank`)", "",
             "| arm | seeds | run | " + " | ".join(f"k={k}" for k in ks) + " | energy outside top 4 |",
             "|---|---|---|" + "---|" * len(ks) + "---|"]
    for arm in arms:
        rows = [rec for (a, _), rec in sorted(recs.items()) if a == arm]
        cells = [_mean_sd([r["nll"] for r in rows])] + [_mean_sd([r["cut_nll"][str(k)] for r in rows]) for k in ks]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + f" | {_mean_sd([r['energy_outside']['4'] for r in rows])} |")
    worst = max(abs(r["nll_rebuilt"] - r["nll"]) for r in recs.values())
    lines += ["", f"The update rebuilt at full rank reproduces each run's NLL to {worst:.1e} (at most) of the run's own.", ""]
    lines.append("Paired over the seeds both arms have (baseline − arm: positive, the arm is better; 95% t-interval, "
                 "exact Wilcoxon p):")
    # what a cut costs each arm, and whether ScaLoRA-I's cut update still beats LoRA's whole one
    pairs = [("scalora-I", "run", "scalora-I", "4"), ("scalora-I", "run", "scalora-I", "8"),
             ("lora", "run", "scalora-I", "4"), ("lora", "run", "scalora-I", "8"), ("lora-4r", "run", "lora-4r", "4"),
             ("scalora-I-constant", "run", "scalora-I-constant", "4"), ("relora", "run", "relora", "4"),
             ("lora", "run", "lora-4r", "run"), ("scalora-I-4r", "run", "scalora-I-4r", "16"),
             ("scalora-I", "run", "scalora-I-4r", "run"), ("lora-4r", "run", "scalora-I-4r", "run")]
    for base, base_k, arm, arm_k in pairs:
        seeds = sorted(s for a, s in recs if a == base and (arm, s) in recs)
        if len(seeds) < 2:
            continue
        pick = lambda rec, k: rec["nll"] if k == "run" else rec["cut_nll"][k]  # noqa: E731
        d = paired_difference([pick(recs[(base, s)], base_k) for s in seeds], [pick(recs[(arm, s)], arm_k) for s in seeds])
        what = lambda k: "its run" if k == "run" else f"cut to {k}"  # noqa: E731
        lines.append(f"- {base} ({what(base_k)}) − {arm} ({what(arm_k)}): "
                     f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}], p {d['p_wilcoxon']:.3g} ({d['n']} seeds)")
    return "\n".join(lines)


def _mean_sd(values: list) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.mean(values):.3f} ± {sd:.3f}" if sd == sd else f"{values[0]:.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="arms of (c') (their tuned settings)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="of (c')'s report seeds")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--records", default=RECORDS)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if not a.report_only:
        run_missing(a.arms, a.seeds, a.ks, a.records)
    print(report(a.records))


if __name__ == "__main__":
    main()

"""CPU micro-benchmark of one ScaLoRA refresh on a SmolLM2-135M-shaped Llama, next to a LoRA step.

Why: a refresh touches every adapted weight (a rank-r merge per layer), so its cost should be
stated against the training step it is amortised over. This script measures both in one run.

How to run (from the repository root; nothing is downloaded, the model is randomly initialised)::

    python tools/benchmark.py refresh                  # r = 4, 16, 64; bf16 and fp32 bases
    python tools/benchmark.py refresh --quick          # smoke test: r = 4, 2 layers, 1 repeat

What is measured, per (base dtype, r):

* setup (untimed): PEFT LoRA on q,k,v,o,gate,up,down (adapters in fp32), 3 AdamW steps on a
  2 x 64 random-token batch (lora_B becomes non-zero, Adam moments exist), then one more
  forward/backward to fill ``.grad``. Factors, gradients and moments are snapshotted.
* total: ``ScaLoRA.refresh()`` (strength "auto"), median over repeats; the snapshot is restored
  before each repeat, so every repeat does the same work (the base weights keep accumulating
  merges, which does not change the cost).
* solve / merge: the refresh core's own phases (``ds_scalora.methods.scalora_refresh.RefreshCore``),
  timed separately from the same restored snapshot: gather + ``solve_round_robin`` (``solve_scaling``
  for every layer, including ``build_problem``), then ``merge_layer`` for every rescaled layer, with
  the core's own policies and merge state. "other" = total - solve - merge (factor rescale, crossed
  gradients and moments, the rank sketch, bookkeeping); being a difference of medians it can be noisy.
* LoRA step: forward + backward + AdamW step on a 4 x 256 random-token batch, one untimed warm-up,
  median over repeats. Ratio = refresh / step; amortised overhead at interval I = refresh / (I step).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ..methods import ScaLoRA, ScaLoRAConfig
from ..methods.scalora import default_shrink
from ..precision import get_policy
from ..scaling import SOLVERS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INTERVAL = 10


def build(dtype: torch.dtype, r: int, layers: int, seed: int = 0):
    """SmolLM2-135M shape, random init, base in ``dtype``, PEFT LoRA (fp32 adapters), AdamW."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def batch(size: int, seq: int, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (size, seq))


def train_step(model, opt, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def snapshot(scalora: ScaLoRA) -> list:
    """Clones of what a refresh mutates on the adapter side: factors, their grads, Adam moments."""
    saved = []
    for layer in scalora.layers:
        for p in (layer.lora_A, layer.lora_B):
            state = {k: v.clone() for k, v in scalora.optimizer.state[p].items() if torch.is_tensor(v)}
            saved.append((p, p.detach().clone(), p.grad.clone(), state))
    return saved


def restore(scalora: ScaLoRA, saved: list) -> None:
    for p, data, grad, state in saved:
        p.data.copy_(data)
        p.grad.copy_(grad)
        for k, v in state.items():
            scalora.optimizer.state[p][k].copy_(v)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def solve_all(scalora: ScaLoRA) -> list:
    """The refresh core's own gather and solve phases (all layers)."""
    full, directions = scalora.core.gather_factors_and_grads()
    return full, scalora.core.solve_round_robin(full, directions)


@torch.no_grad()
def merge_all(scalora: ScaLoRA, solved) -> None:
    """The refresh core's own merge phase (merge_delta_flat + policy.merge_) for every rescaled layer."""
    full, sols = solved
    for index, (layer, (A, B, _, _), (alpha, beta, used, _)) in enumerate(zip(scalora.layers, full, sols)):
        if used != "none":
            scalora.core.merge_layer(index, layer, A, B, alpha, beta, step=0)


def bench(dtype_name: str, r: int, args) -> dict:
    model, opt = build(DTYPES[dtype_name], r, args.layers)
    model.train()
    for _ in range(3):  # lora_B leaves zero, Adam moments exist
        train_step(model, opt, batch(2, 64))
    model(input_ids=(ids := batch(2, 64)), labels=ids).loss.backward()
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(solver=args.solver, warmup_steps=0, rank_sketch=args.rank_sketch,
                                                interval=10))
    saved = snapshot(scalora)

    totals, solves, merges, mix = [], [], [], Counter()
    for _ in range(args.repeats):
        restore(scalora, saved)
        report = None

        def run():
            nonlocal report
            report = scalora.refresh()

        totals.append(timed(run))
        mix = report.solvers
        restore(scalora, saved)
        solved = []
        solves.append(timed(lambda: solved.extend(solve_all(scalora))))
        merges.append(timed(lambda: merge_all(scalora, solved)))

    opt.zero_grad(set_to_none=True)
    ids = batch(4, 256)
    train_step(model, opt, ids)  # warm-up
    steps = [timed(lambda: train_step(model, opt, ids)) for _ in range(args.repeats)]

    n = len(scalora.layers)
    out = dict(dtype=dtype_name, r=r, layers=n, total=statistics.median(totals), solve=statistics.median(solves),
               merge=statistics.median(merges), step=statistics.median(steps), mix=dict(mix),
               spread={"total": (min(totals), max(totals)), "step": (min(steps), max(steps))},
               adapted=sum(l.weight.numel() for l in scalora.layers),
               adapter=sum(l.lora_A.numel() + l.lora_B.numel() for l in scalora.layers))
    del model, opt, scalora, saved
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--dtype", choices=list(DTYPES), help="base weight dtype (default: both)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--solver", choices=SOLVERS, default="column")
    parser.add_argument("--layers", type=int, default=30, help="hidden layers (SmolLM2-135M has 30)")
    parser.add_argument("--rank-sketch", type=int, default=64, help="ScaLoRAConfig.rank_sketch (0: no rank estimate)")
    parser.add_argument("--quick", action="store_true", help="r=4, 2 hidden layers, 1 repeat: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.layers, args.repeats = [4], 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [args.dtype] if args.dtype else list(DTYPES)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    print(f"model: SmolLM2-135M shape, {args.layers} hidden layers, random init; LoRA on {','.join(TARGETS)}; "
          f"solver {args.solver}, strength auto (shrink {default_shrink(10):g}), rank_sketch {args.rank_sketch}; repeats {args.repeats} (median)")
    start = time.perf_counter()
    rows = [bench(d, r, args) for d in dtypes for r in args.ranks]
    first = rows[0]
    print(f"adapted layers: {first['layers']}; adapted parameters (sum d_out*d_in): {first['adapted']:,}")
    print("adapter parameters: " + ", ".join(f"r={row['r']}: {row['adapter']:,}" for row in rows
                                             if row["dtype"] == first["dtype"]))
    print()
    print("| base | r | refresh ms | solve ms | merge ms | other ms | ms/layer | LoRA step ms | refresh/step "
          f"| overhead I={INTERVAL} | solvers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ms = {k: 1e3 * row[k] for k in ("total", "solve", "merge", "step")}
        ratio = row["total"] / row["step"]
        mix = " ".join(f"{k}:{v}" for k, v in sorted(row["mix"].items()))
        lo_t, hi_t = (1e3 * t for t in row["spread"]["total"])
        lo_s, hi_s = (1e3 * t for t in row["spread"]["step"])
        print(f"| {row['dtype']} | {row['r']} | {ms['total']:.0f} ({lo_t:.0f}-{hi_t:.0f}) | {ms['solve']:.0f} "
              f"| {ms['merge']:.0f} | {ms['total'] - ms['solve'] - ms['merge']:.0f} | {ms['total'] / row['layers']:.2f} "
              f"| {ms['step']:.0f} ({lo_s:.0f}-{hi_s:.0f}) | {ratio:.3f} | {100 * ratio / INTERVAL:.1f}% | {mix} |")
    print(f"refresh and LoRA step: median (min-max) of {args.repeats}; solve, merge: medians of separate loops, "
          "other = refresh - solve - merge. A wide range means other processes competed for the CPU.")
    print()
    for d in dtypes:
        policy = get_policy("auto", DTYPES[d])
        per = policy.state_bytes_per_param(DTYPES[d])
        print(f"merge state, {d} base: policy {policy.name}, {per} B per adapted parameter, "
              f"{per * first['adapted'] / 2**20:.1f} MiB in all")
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

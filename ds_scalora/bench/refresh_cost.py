"""Micro-benchmark of one ScaLoRA refresh on a SmolLM2-135M-shaped Llama (CPU) or a GPU reference shape, next to a LoRA step.

Why: a refresh touches every adapted weight (a rank-r merge per layer), so its cost should be
stated against the training step it is amortised over. This script measures both in one run.

How to run (from the repository root; nothing is downloaded, the model is randomly initialised)::

    python tools/benchmark.py refresh                  # r = 8 (the demo's); bf16 and fp32 bases
    python tools/benchmark.py refresh --ranks 4 16 64  # other ranks
    python tools/benchmark.py refresh --quick          # smoke test: r = 4, 2 layers, 1 repeat
    python tools/benchmark.py refresh --device cuda --shape 1b --ranks 16   # on a GPU: the 1.1B shape, bf16
    python tools/benchmark.py refresh --device cuda --shape 12b             # the 12.2B shape (checkpointing)

On a GPU (not yet run: written after the first H200 session, docs/gpu_runs.md) the same measurements run
on the device with a synchronisation around every timed piece, in bf16 only (the LoRA step and the
side-by-side ratios too, against issue 21's GPU targets), at the shape's layers and batch; the merge state
is the "auto" policy's (fp32_residual for a bf16 base; the shipped 12B one-GPU config uses bf16_pair).

What is measured, per (base dtype, r):

* setup (untimed): PEFT LoRA on q,k,v,o,gate,up,down (adapters in fp32), 3 AdamW steps on a
  2 x 64 random-token batch (lora_B becomes non-zero, Adam moments exist), then one more
  forward/backward to fill ``.grad``. Factors, gradients and moments are snapshotted.
* total: ``ScaLoRA.refresh()`` (strength "auto"), median over repeats, twice: at a step that measures
  the rank sketches and at one that only adds to them (``ScaLoRAConfig.rank_sketch_every``: ScaLoRA-I
  measures at every refresh, ScaLoRA every tenth). The snapshot is restored before each repeat, so
  every repeat does the same work (the base weights keep accumulating merges, which does not change
  the cost).
* phases: the refresh core's own steps (``ds_scalora.methods.scalora_refresh.RefreshCore``), timed one
  after the other from the same restored snapshot: gather (factors and gradients into one buffer),
  solve (``solve_round_robin``: every shape's layers in one batch), merge (``merge_all``: the
  product added into each frozen weight through its precision policy), rescale (masters, gradients and
  moments, crossed), norms (the merged norms), sketch add (the merges into the rank sketches,
  ``SketchBatch.add``) and sketch measure (their Gram matrices and eigenvalues, ``SketchBatch.measure``).
  One process: the replica all-gather and the all-reduces are no-ops here (``tools/benchmark.py zero``
  measures them across ranks).
* roofline: the merge must read and write every adapted weight and its precision state once; that
  traffic is timed in the same run as an in-place pass over exactly those tensors (``mul_(1)``), the
  refresh's floor. The refresh and its merge are reported as multiples of it, with the bandwidth it
  implies and the merge's FLOPs (2·r per adapted parameter). Beside it (fp32 base), the merge's BLAS
  call alone (``kernel_pass``: a rank-r ``addmm_`` into every adapted weight): on the 2-core CPU it
  already cost 1.4x the floor (``docs/benchmarks_refresh.md``), which bounds how close any refresh can come.
* LoRA step (fp32 base only: bf16 training on a CPU without bf16 matmuls is not what anyone runs):
  forward + backward + AdamW step on the demo's batch (``--batch``: 8 rows of 72 random tokens), one
  untimed warm-up, median over repeats. Ratio = refresh / step; amortised overhead per step: at I = 1
  (nine refreshes of ten not measured) ((E − 1)·unmeasured + measured) / (E·step) with
  E = rank_sketch_every; at I = 10, measured / (10·step).
* step time over LoRA's, measured directly (fp32 base, ``--rounds``, :func:`interleaved`): 10 training
  steps of LoRA, ScaLoRA and ScaLoRA-I at their defaults per round, on one model, interleaved step by step
  (``console_report.side_by_side``; until 2026-12-03, 10-step blocks one after the other, whose times
  drifted by several per cent from one block to the next). A round's ratio still varies by a few per
  cent, so this check resolves ScaLoRA's ~10% more easily than ScaLoRA-I's ~1%, which the amortised
  overhead above states from the refresh's own (much steadier) time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections import Counter

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from .console_report import INTERVAL_NOTE, add_shared_arguments, interval_text, print_and_write, side_by_side, verdict
from ..methods import ScaLoRA, ScaLoRAConfig
from ..methods.scalora import default_shrink
from ..precision import get_policy
from ..scaling import SOLVERS
from .grid import MISTRAL_NEMO_12B, TINYLLAMA_1B

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INTERVAL = 10
TARGETS_CPU = {"scalora": 1.15, "scalora-I": 1.03}  # issue 21: step time over LoRA's on the CPU
TARGETS_GPU = {"scalora": 1.10, "scalora-I": 1.02}  # and on a GPU, at the 1.1B and 12.2B shapes
FLOOR_TARGET = 2.0  # issue 21: a refresh (one that does not measure its sketches) within 2x its floor


SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "tie_word_embeddings": True}
# --shape: the CPU's SmolLM2-135M, and the GPU shapes of ../shared/gpu.md's reference figures (bench/grid.py)
SHAPES = {"smollm2": SMOLLM2_135M,
          "1b": {k: v for k, v in TINYLLAMA_1B.items() if k != "num_hidden_layers"},
          "12b": {k: v for k, v in MISTRAL_NEMO_12B.items() if k != "num_hidden_layers"}}
SHAPE_NAMES = {"smollm2": "SmolLM2-135M", "1b": "TinyLlama-1.1B", "12b": "Mistral-NeMo-12B"}
# the GPU shapes' depth and batch (the reference figures'); SmolLM2's come from --layers and --batch's defaults
GPU_SHAPE_LAYERS = {"1b": TINYLLAMA_1B["num_hidden_layers"], "12b": MISTRAL_NEMO_12B["num_hidden_layers"]}
GPU_SHAPE_BATCH = {"1b": [4, 2048], "12b": [2, 2048]}


def base_model(layers: int, seed: int = 0, shape: str = "smollm2", dtype=None, device: str = "cpu") -> LlamaForCausalLM:
    """The ``shape`` (SmolLM2-135M by default) with ``layers`` hidden layers, random init (seeded), fp32 on the
    CPU; on another device built there in ``dtype`` (a 12B shape in fp32 on the host would take 49 GB)."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, **SHAPES[shape])
    if device == "cpu":
        return LlamaForCausalLM(config)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def with_lora(base, r: int):
    """PEFT LoRA of rank ``r`` (α = 2r) on TARGETS, and an AdamW over its factors."""
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def build(dtype: torch.dtype, r: int, layers: int, seed: int = 0, shape: str = "smollm2", device: str = "cpu"):
    """The shape, random init, base in ``dtype``, PEFT LoRA (fp32 adapters), AdamW; gradient checkpointing
    for the 12B shape (as its shipped config)."""
    base = base_model(layers, seed, shape, dtype, device).to(dtype)
    if shape == "12b":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return with_lora(base, r)


def batch(size: int, seq: int, vocab: int = 49152, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (size, seq)).to(device)


def sync() -> None:
    """Wait for the accelerator's queued work, so that a host timer measures it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


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


def timed_call(fn) -> tuple:
    """(seconds, ``fn()``), the accelerator's queued work included."""
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def timed(fn) -> float:
    return timed_call(fn)[0]


PHASES = ("gather", "solve", "merge", "rescale", "norms", "sketch add", "sketch measure")
EVERY = 10  # ScaLoRAConfig.rank_sketch_every


@torch.no_grad()
def phases(scalora: ScaLoRA) -> dict:
    """The refresh core's steps one after the other, each timed (what ``RefreshCore.refresh`` runs)."""
    core, t = scalora.core, {}
    params = [(layer.lora_B, layer.lora_A) for layer in core.layers]

    def part(name, fn):
        t[name], value = timed_call(fn)
        return value

    buffer, pieces, _ = part("gather", lambda: core.gather_factors_and_grads(params))
    packed, used, _ = part("solve", lambda: core.solve_round_robin(buffer))
    rescaled = [i for i, u in enumerate(used) if u != "none"]
    part("merge", lambda: core.merge_all(buffer, packed, rescaled, step=0))
    part("rescale", lambda: core.rescale_pieces(params, pieces, packed, rescaled))
    part("norms", lambda: core.merged_norms(buffer, packed))
    part("sketch add", lambda: core.measure_sketches(buffer, packed, measure=False))
    inputs = []  # what measure_sketches measures (after adding) when it measures
    for group, batch in core.sketch_batches:
        A, B = group.stacked(buffer[0])
        alpha, beta = group.alpha_beta(packed)
        scale = torch.tensor([core.scales[i] for i in group.layers])
        inputs.append((batch, A, B.mT @ batch.omega, alpha * beta, scale))
    part("sketch measure", lambda: [batch.measure(A, BtO, kept, scale, A.shape[-1]) for batch, A, BtO, kept, scale in inputs])
    return t


@torch.no_grad()
def floor_pass(scalora: ScaLoRA) -> tuple[float, int]:
    """Seconds of one in-place pass over every adapted weight and its merge state (what a merge must at
    least read and write), and those bytes read plus written."""
    tensors = [t for w, st in zip((layer.weight for layer in scalora.layers), scalora.core.merge_state)
               for t in (w.data, st) if t is not None]
    sync()
    start = time.perf_counter()
    for t in tensors:
        t.mul_(1)
    sync()
    return time.perf_counter() - start, sum(2 * t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def kernel_pass(scalora: ScaLoRA, r: int) -> float:
    """Seconds of the fp32 merge's BLAS call alone, outside the refresh: a rank-``r`` ``addmm_`` into every
    adapted weight (what ``MergePolicy.merge_product_`` fuses the merge into), with zero factors so that
    the weights keep their values. Its ratio to the floor is the part of the refresh's ratio that no
    orchestration can remove on this machine."""
    work = [(w, torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device),
             torch.zeros(r, w.shape[1], dtype=w.dtype, device=w.device))
            for w in (layer.weight.data for layer in scalora.layers)]
    sync()
    start = time.perf_counter()
    for w, left, right in work:
        w.addmm_(left, right)
    sync()
    return time.perf_counter() - start


def interleaved(model, opt, ids: torch.Tensor, rounds: int) -> dict:
    """Step-time ratios measured side by side (``console_report.side_by_side``): each round runs INTERVAL
    training steps of LoRA, of ScaLoRA (I = 1, a refresh at every step) and of ScaLoRA-I (I = INTERVAL, one
    refresh), each with its default settings, on one model, optimizer and batch, interleaved step by step;
    per round, each variant's time over LoRA's. Returns {variant: [ratio per round]}."""
    variants = {"scalora": ScaLoRA(model, opt, ScaLoRAConfig(warmup_steps=0, interval=1)),
                "scalora-I": ScaLoRA(model, opt, ScaLoRAConfig(warmup_steps=0, interval=INTERVAL))}

    def step(scalora) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if scalora is not None:
            scalora.refresh_if_due()  # each variant counts its own steps: ScaLoRA-I refreshes once a round
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()  # side_by_side's host timer then measures the step's kernels too

    steppers = {"lora": lambda: step(None), **{name: (lambda s=s: step(s)) for name, s in variants.items()}}
    return side_by_side(steppers, rounds, INTERVAL)


def bench(dtype_name: str, r: int, args) -> dict:
    dev = args.device
    model, opt = build(DTYPES[dtype_name], r, args.layers, shape=args.shape, device=dev)
    model.train()
    vocab = SHAPES[args.shape]["vocab_size"]
    for _ in range(3):  # lora_B leaves zero, Adam moments exist
        train_step(model, opt, batch(2, 64, vocab, dev))
    model(input_ids=(ids := batch(2, 64, vocab, dev)), labels=ids).loss.backward()
    # interval 1, so that step 0 measures the sketches and step 1 does not; shrink of ScaLoRA-I's default
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(solver=args.solver, warmup_steps=0, rank_sketch=args.rank_sketch,
                                                interval=1, shrink=default_shrink(INTERVAL), rank_sketch_every=EVERY))
    saved = snapshot(scalora)

    totals, plain, parts, floors, kernels, mix = [], [], {k: [] for k in PHASES}, [], [], Counter()
    for _ in range(args.repeats):
        for step, out in ((0, totals), (1, plain)):
            restore(scalora, saved)
            report = None

            def run():
                nonlocal report
                report = scalora.core.refresh(step)

            out.append(timed(run))
            assert bool(report.accumulated_rank) == (step == 0 and args.rank_sketch > 0)
        mix = report.solvers
        restore(scalora, saved)
        for k, v in phases(scalora).items():
            parts[k].append(v)
        seconds, moved = floor_pass(scalora)
        floors.append(seconds)
        if dtype_name == "fp32" or dev != "cpu":  # a bf16 addmm_ on a CPU without bf16 matmuls is not what the bf16 merge runs
            kernels.append(kernel_pass(scalora, r))

    n = len(scalora.layers)
    adapted = sum(layer.weight.numel() for layer in scalora.layers)
    adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in scalora.layers)
    opt.zero_grad(set_to_none=True)
    steps, ratios = [math.nan], {}
    if dtype_name == "fp32" or dev != "cpu":  # a bf16 step on a CPU without bf16 matmuls says nothing
        ids = batch(*args.batch, vocab, dev)
        train_step(model, opt, ids)  # warm-up
        steps = [timed(lambda: train_step(model, opt, ids)) for _ in range(args.repeats)]
        if args.rounds:
            ratios = interleaved(model, opt, batch(*args.batch, vocab, dev), args.rounds)

    out = dict(dtype=dtype_name, r=r, layers=n, total=statistics.median(totals), plain=statistics.median(plain),
               step=statistics.median(steps),
               parts={k: statistics.median(v) for k, v in parts.items()}, floor=min(floors), bytes=moved,
               kernel=min(kernels) if kernels else math.nan,
               flops=2 * r * adapted, mix=dict(mix),
               spread={"total": (min(totals), max(totals)), "step": (min(steps), max(steps))},
               adapted=adapted, adapter=adapter, ratios=ratios)
    del model, opt, saved
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--dtype", choices=list(DTYPES), help="base weight dtype (default: both)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solver", choices=SOLVERS, default="column")
    parser.add_argument("--rank-sketch", type=int, default=64, help="ScaLoRAConfig.rank_sketch (0: no rank estimate)")
    parser.add_argument("--rounds", type=int, default=21,
                        help="rounds of the interleaved step-time comparison (fp32 base; 0: none). 21: the median's "
                             "interval is then x(6)-x(16) (97%%), about half as wide as with 11 (x(2)-x(10)), which "
                             "left ScaLoRA-I's 1.03 undecided")
    parser.add_argument("--quick", action="store_true", help="r=4, 2 hidden layers, 1 repeat: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: on a GPU, the bf16 base only, the "
                        "LoRA step and the side-by-side ratios in bf16, the report in docs/benchmarks_refresh_<shape>_gpu.md")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2",
                        help="smollm2 (the CPU's), or a GPU reference shape: 1b (TinyLlama, batch 4 x 2048), 12b "
                             "(Mistral-NeMo, batch 2 x 2048, gradient checkpointing); --layers and --batch default to the shape's")
    add_shared_arguments(parser, "benchmarks_refresh.md")
    args = parser.parse_args(argv)
    if args.shape in GPU_SHAPE_LAYERS and args.layers == parser.get_default("layers"):
        args.layers = GPU_SHAPE_LAYERS[args.shape]
    if args.shape in GPU_SHAPE_BATCH and args.batch == parser.get_default("batch"):
        args.batch = GPU_SHAPE_BATCH[args.shape]
    if args.device != "cpu":
        args.dtype = args.dtype or "bf16"
        if args.out == parser.get_default("out"):
            args.out = os.path.join(os.path.dirname(args.out), f"benchmarks_refresh_{args.shape}_gpu.md")
    if args.quick:
        args.out = ""
    where = "CPU" if args.device == "cpu" else "GPU"
    command = " ".join(["python tools/benchmark.py refresh"]
                       + ([f"--device {args.device} --shape {args.shape}"] if args.device != "cpu" else []))
    print_and_write(report, args, args.out, f"The refresh's cost and roofline ({where})", command)


def report(args) -> None:
    """Measure and print (``main``'s options)."""
    if args.quick:
        args.ranks, args.layers, args.repeats, args.rounds = [4], 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [args.dtype] if args.dtype else list(DTYPES)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    if args.device != "cpu":
        print(f"device {args.device}: {torch.cuda.get_device_name()}")
    print(f"model: {SHAPE_NAMES[args.shape]} shape, {args.layers} hidden layers, random init; LoRA on {','.join(TARGETS)}; "
          f"solver {args.solver}, strength auto (shrink {default_shrink(10):g}), rank_sketch {args.rank_sketch}; repeats {args.repeats} (median)")
    start = time.perf_counter()
    rows = [bench(d, r, args) for d in dtypes for r in args.ranks]
    first = rows[0]
    print(f"adapted layers: {first['layers']}; adapted parameters (sum d_out*d_in): {first['adapted']:,}")
    print("adapter parameters: " + ", ".join(f"r={row['r']}: {row['adapter']:,}" for row in rows
                                             if row["dtype"] == first["dtype"]))
    print()
    print("| base | r | refresh ms, measured | not measured | " + " | ".join(f"{k} ms" for k in PHASES)
          + " | LoRA step ms | overhead I=1 | overhead I=10 | solvers |")
    print("|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|")
    for row in rows:
        mix = " ".join(f"{k}:{v}" for k, v in sorted(row["mix"].items()))
        lo_t, hi_t = (1e3 * t for t in row["spread"]["total"])
        lo_s, hi_s = (1e3 * t for t in row["spread"]["step"])
        per_step_i1 = ((EVERY - 1) * row["plain"] + row["total"]) / EVERY  # I = 1: one refresh in EVERY measures
        if math.isnan(row["step"]):  # bf16 on the CPU: no step timed (see bench)
            step = "not timed (bf16 on this CPU) | — | —"
        else:
            step = (f"{1e3 * row['step']:.0f} ({lo_s:.0f}-{hi_s:.0f}) | {100 * per_step_i1 / row['step']:.1f}% "
                    f"| {100 * row['total'] / (INTERVAL * row['step']):.1f}%")
        print(f"| {row['dtype']} | {row['r']} | {1e3 * row['total']:.0f} ({lo_t:.0f}-{hi_t:.0f}) | {1e3 * row['plain']:.0f} | "
              + " | ".join(f"{1e3 * row['parts'][k]:.0f}" for k in PHASES) + f" | {step} | {mix} |")
    print(f"refresh and LoRA step: median (min-max) of {args.repeats}; phases: medians of the core's steps run one "
          "after the other. A wide range means other processes competed for the CPU. Overhead per step: I=1 "
          f"refreshes at every step and measures its sketches at one refresh in {EVERY} (rank_sketch_every); "
          f"I={INTERVAL} measures at every refresh.")
    timed_rows = [row for row in rows if row["ratios"]]
    if timed_rows:
        print()
        rounds = len(next(iter(timed_rows[0]["ratios"].values())))
        print(f"Step time over LoRA's, measured side by side (`interleaved`): {rounds} rounds, each of {INTERVAL} "
              f"training steps of LoRA, ScaLoRA (I=1) and ScaLoRA-I (I={INTERVAL}), interleaved step by step, on one model and "
              f"batch ({args.batch[0]} x {args.batch[1]} tokens), every method at its defaults; per round, the method's "
              f"time over LoRA's. {INTERVAL_NOTE}")
        print()
        print("| base | r | method | step time / LoRA, median | interval (coverage) | target | verdict |")
        print("|---|---|---|---|---|---|---|")
        for row in timed_rows:
            for name, values in row["ratios"].items():
                target = (TARGETS_CPU if args.device == "cpu" else TARGETS_GPU)[name]
                print(f"| {row['dtype']} | {row['r']} | {name} | {statistics.median(values):.3f} | "
                      f"{interval_text(values)} | ≤ {target} | {verdict(values, target)} |")
    print()
    print("Roofline: the floor is one in-place pass over every adapted weight and its merge state (the bytes a "
          "merge must read and write), timed in this run (fastest repeat). The addmm_ is the fp32 merge's BLAS call "
          "alone (`kernel_pass`, fastest repeat): a rank-r update of every adapted weight, with nothing of the "
          "refresh around it; what the refresh costs beyond it is orchestration (gathers, solves, rescales, sketches).")
    print()
    print("| base | r | bytes moved MB | floor ms | bandwidth GB/s | merge FLOPs G | addmm_ ms | addmm_ / floor "
          "| merge / floor | refresh / floor (measured) | refresh / floor (not measured) | target (not measured) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kernel = "— | —" if math.isnan(row["kernel"]) else f"{1e3 * row['kernel']:.1f} | {row['kernel'] / row['floor']:.1f}"
        ratio = row["plain"] / row["floor"]
        met = "met" if ratio <= FLOOR_TARGET else f"missed ({ratio / FLOOR_TARGET:.1f}x the target)"
        print(f"| {row['dtype']} | {row['r']} | {row['bytes'] / 1e6:.0f} | {1e3 * row['floor']:.1f} | "
              f"{row['bytes'] / row['floor'] / 1e9:.1f} | {row['flops'] / 1e9:.2f} | {kernel} | "
              f"{row['parts']['merge'] / row['floor']:.1f} | {row['total'] / row['floor']:.1f} | "
              f"{ratio:.1f} | ≤ {FLOOR_TARGET:g}: {met} |")
    print()
    for d in dtypes:
        policy = get_policy("auto", DTYPES[d])
        per = policy.state_bytes_per_param(DTYPES[d])
        print(f"merge state, {d} base: policy {policy.name}, {per} B per adapted parameter, "
              f"{per * first['adapted'] / 2**20:.1f} MiB in all")
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

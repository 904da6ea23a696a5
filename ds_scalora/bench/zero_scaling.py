"""Cost of ScaLoRA under DeepSpeed, measured side by side with plain LoRA in one run.

    python tools/benchmark.py zero [--ranks 1 2 4] [--stage 2] [--dtype bf16] [--hidden 512 --layers 4 --r 16]
                                   [--steps 20] [--quick]

The driver launches this module with ``deepspeed --num_gpus N`` for each N (``DS_ACCELERATOR=cpu`` is set
when no GPU is present) and prints the tables. Each launch builds one engine per method from the same
random-init Llama shape with PEFT adapters on all block linears: plain LoRA, ScaLoRA-I, ScaLoRA and
ElaLoRA (PEFT's SVD layers; same DeepSpeed config, same data), and measures

* per refresh: payload bytes this rank hands to collectives (counted by wrapping
  ``torch.distributed`` during the refresh), the ring-model bytes each rank sends (all-reduce
  2(N−1)/N, all-gather (N−1)/N of the payload), and the time, against the size of the adapters;
* step time of LoRA, ScaLoRA-I (I=10), ScaLoRA (I=1) and ElaLoRA, timed in interleaved blocks, as
  ratios to LoRA;
* ElaLoRA's per-step communication: the collectives of its step window (the all-reduce of the full P
  and Q for the orthogonality regulariser), counted the same way, next to the model's bytes;
* memory: ScaLoRA's persistent extra state per rank (the precision policy's shard of the merge
  accumulator) in bytes per adapted parameter, its largest transient buffer, and on a GPU the peak
  allocated memory of each engine's steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ..deepspeed_import import import_deepspeed

INTERVALS = {"lora": None, "scalora_i10": 10, "scalora_i1": 1, "elalora": None}
ELALORA_INTERVAL = 10


def worker(a) -> None:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..methods.elalora import elastic_lora_model
    from ..zero import attach, attach_elalora, disable_cpu_shm_comm

    deepspeed = import_deepspeed()
    disable_cpu_shm_comm()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def build(name):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                          num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                          num_key_value_heads=max(1, a.hidden // 256), max_position_embeddings=a.seq)
        if name == "elalora":  # r active of 2r slots per matrix, as the training entry point builds it
            model = elastic_lora_model(LlamaForCausalLM(cfg), targets, init_rank=a.r, max_rank=2 * a.r, alpha=2 * a.r)
        else:
            model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=targets))
        conf = {"train_micro_batch_size_per_gpu": a.micro_batch, "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0, "zero_optimization": {"stage": a.stage},
                "bf16": {"enabled": a.dtype == "bf16"}, "steps_per_print": 10**9}
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), config=conf)
        if name == "elalora":  # a long run's schedule: a reallocation round every ELALORA_INTERVAL steps from step 2
            ctl = attach_elalora(engine, model, total_steps=10**6, init_rank=a.r, max_rank=2 * a.r, init_warmup=1,
                                 final_warmup=0, interval=ELALORA_INTERVAL)  # fmt: skip
        else:
            ctl = attach(engine, model, interval=INTERVALS[name], warmup_steps=1) if INTERVALS[name] else None
        return engine, ctl

    g = torch.Generator().manual_seed(rank)
    batch = {"input_ids": torch.randint(0, 1024, (a.micro_batch, a.seq), generator=g)}
    batch["labels"] = batch["input_ids"].clone()

    def step(engine):
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()

    engines = {name: build(name) for name in a.methods.split(",")}
    if a.memory_only:  # one method per process: its peak resident memory is this method's alone
        (name, (engine, _)), = engines.items()
        for _ in range(a.steps):
            step(engine)
        # NCCL reduces device tensors only
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64,
                            device=engine.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if cuda:
            peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=engine.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0:
            with open(a.out, "w") as f:
                json.dump({"world": world, "method": name, "peak_bytes": float(peak),
                           "kind": "cuda max_memory_allocated" if cuda else "peak RSS"}, f)
        return
    for engine, _ in engines.values():  # warm up: first steps allocate optimizer state
        for _ in range(2):
            step(engine)

    # -- one refresh, with the collectives counted --------------------------------------------
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_into_tensor", "broadcast")}

    @contextlib.contextmanager
    def counting_collectives(counted: list):
        """Record (collective, bytes of this rank's local input) for every collective in the block."""
        def wrap(name):
            def wrapper(tensor_or_out, *args, **kwargs):
                t = args[0] if name == "all_gather_into_tensor" else tensor_or_out  # the local input
                counted.append((name, t.numel() * t.element_size()))
                return originals[name](tensor_or_out, *args, **kwargs)
            return wrapper

        for name in originals:
            setattr(dist, name, wrap(name))
        try:
            yield counted
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    # bytes each rank sends in a ring, per byte of its local input: an all-reduce sends 2(N-1)/N of its
    # buffer; an all-gather forwards the N-1 other ranks' chunks, each the size of its own input
    ring = {"all_reduce": 2 * (world - 1) / world, "all_gather_into_tensor": world - 1, "broadcast": 1.0}

    def sent(counted) -> float:
        return sum(b * ring[n] for n, b in counted) if world > 1 else 0.0

    engine, ctl = engines["scalora_i1"]
    counted = []
    refresh_times = []
    for _ in range(a.repeats):
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        counted.clear()
        with counting_collectives(counted):
            dist.barrier()
            t0 = time.perf_counter()
            ctl.refresh()
            if cuda:
                torch.cuda.synchronize()
            refresh_times.append(time.perf_counter() - t0)
        ctl.config.warmup_steps = 10**9  # the step below must not refresh again
        engine.step()
        ctl.config.warmup_steps = 1
    payload = sum(b for _, b in counted)
    wire = sent(counted)
    adapter_bytes = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for l in ctl.layers for p in (l.lora_A, l.lora_B)) * 4
    adapted_params = sum(ctl.access.weight_numel(l.weight) for l in ctl.layers)
    weight_bytes = sum(ctl.access.weight_numel(l.weight) * l.weight.element_size() for l in ctl.layers)
    state_bytes = sum(0 if s is None else s.numel() * s.element_size() for s in ctl.merge_state)

    # -- ElaLoRA's per-step window, with the collectives counted ------------------------------
    ela = {}
    if "elalora" in engines:
        engine, ectl = engines["elalora"]
        windows = []  # (moves due at this step, collectives of its window)
        on_step = ectl.core.on_step

        def counted_on_step(step_number):
            with counting_collectives([]) as c:
                report = on_step(step_number)
            windows.append((ectl.config.moves_at(step_number), list(c)))
            return report

        ectl.core.on_step = counted_on_step
        for _ in range(ELALORA_INTERVAL):  # one reallocation round among them
            step(engine)
        ectl.core.on_step = on_step
        plain = next(c for moves, c in windows if moves == 0)
        round_ = next((c for moves, c in windows if moves > 0), None)
        pq_numel = sum(math.prod(sh[n]) for sh in ectl.core.shapes for n in ("P", "Q"))
        ela = {"collectives": len(plain), "payload_bytes": sum(b for _, b in plain), "wire_bytes": sent(plain),
               "round_extra_wire_bytes": None if round_ is None else sent(round_) - sent(plain),
               "pq_bytes": 4 * pq_numel, "max_rank": ectl.config.max_rank}

    # -- step times, interleaved blocks ---------------------------------------------------------
    times = {name: [] for name in engines}
    peaks = {}
    for _ in range(a.blocks):
        for name, (engine, _) in engines.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(engine)
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            times[name].append((time.perf_counter() - t0) / a.steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    if rank == 0:
        out = {"world": world, "collectives": len(counted), "payload_bytes": payload, "wire_bytes": wire,
               "refresh_s": statistics.median(refresh_times), "adapter_bytes": adapter_bytes,
               "adapted_params_total": adapted_params, "adapted_weight_bytes": weight_bytes,
               "state_bytes_rank": state_bytes, "stage": a.stage,
               "gather_buffer_bytes": 2 * adapter_bytes, "step_s": med, "peak_bytes": peaks, "elalora": ela,
               "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"}
        with open(a.out, "w") as f:
            json.dump(out, f)


def driver(a) -> None:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    def launch(n, *extra):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(29600 + n), "--module", __name__ if __name__ != "__main__"
                   else "ds_scalora.bench.zero_scaling", "--worker", "--out", out]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in WORKER_ARGS] + list(extra)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"launch at {n} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            print(f"  {n} rank(s) {' '.join(extra)} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            with open(out) as f:
                return json.load(f)

    rows = [launch(n) for n in a.ranks]
    memory = {n: {m: launch(n, "--memory-only", f"--methods={m}") for m in ("lora", "scalora_i1")}
              for n in ([] if a.no_memory else a.ranks)}
    r0 = rows[0]
    print(f"\nshape: hidden {a.hidden}, {a.layers} layers, r={a.r}, ZeRO-{a.stage}, {a.dtype}, micro-batch {a.micro_batch} x seq {a.seq}; "
          f"device: {r0['device']}")
    print(f"adapters: {r0['adapter_bytes'] / 2**20:.2f} MiB fp32; adapted frozen weights: {r0['adapted_params_total'] / 1e6:.1f} M params\n")
    print("| ranks | collectives/refresh | payload MiB/rank | sent MiB/rank (ring) | model: sent MiB/rank | sent / adapter size "
          "| refresh ms | LoRA step ms | ScaLoRA-I (I=10) / LoRA | ScaLoRA (I=1) / LoRA | merge state B/adapted param/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["step_s"]
        print(f"| {r['world']} | {r['collectives']} | {r['payload_bytes'] / 2**20:.3f} | {r['wire_bytes'] / 2**20:.3f} "
              f"| {modelled_sent_bytes(r) / 2**20:.3f} "
              f"| {r['wire_bytes'] / r['adapter_bytes']:.2f} | {1e3 * r['refresh_s']:.1f} | {1e3 * s['lora']:.1f} "
              f"| {s['scalora_i10'] / s['lora']:.3f} | {s['scalora_i1'] / s['lora']:.3f} "
              f"| {r['state_bytes_rank'] / r['adapted_params_total']:.2f} |")
    if rows[0].get("elalora"):
        e0 = rows[0]["elalora"]
        print(f"\nElaLoRA (r = {a.r} active of {e0['max_rank']} slots per matrix, orthogonality regulariser on, a reallocation "
              f"round every {ELALORA_INTERVAL} steps): its step window's collectives on an ordinary step; P and Q "
              f"buffers {e0['pq_bytes'] / 2**20:.2f} MiB fp32\n")
        print("| ranks | collectives/step | payload MiB/rank | sent MiB/rank (ring) | model: sent MiB/rank | sent / P,Q size "
              "| a round step adds (KiB sent) | ElaLoRA / LoRA step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            e = r["elalora"]
            extra = "n/a" if e["round_extra_wire_bytes"] is None else f"{e['round_extra_wire_bytes'] / 2**10:.1f}"
            print(f"| {r['world']} | {e['collectives']} | {e['payload_bytes'] / 2**20:.3f} | {e['wire_bytes'] / 2**20:.3f} "
                  f"| {modelled_elalora_sent_bytes(r) / 2**20:.3f} | {e['wire_bytes'] / e['pq_bytes']:.2f} | {extra} "
                  f"| {r['step_s']['elalora'] / r['step_s']['lora']:.3f} |")
    if memory:
        print("\n| ranks | peak per rank, LoRA (MiB) | peak per rank, ScaLoRA (MiB) | difference (MiB) "
              "| merge state per rank (MiB) | difference / adapted params (B) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            m = memory[r["world"]]
            d = m["scalora_i1"]["peak_bytes"] - m["lora"]["peak_bytes"]
            print(f"| {r['world']} | {m['lora']['peak_bytes'] / 2**20:.1f} | {m['scalora_i1']['peak_bytes'] / 2**20:.1f} "
                  f"| {d / 2**20:.1f} | {r['state_bytes_rank'] / 2**20:.1f} | {d / r['adapted_params_total']:.2f} |")
        print(f"(measured as {next(iter(memory.values()))['lora']['kind']}, one method per launch)")
    if any(r["peak_bytes"] for r in rows):
        print("\npeak GPU memory per rank (GiB): " + "; ".join(
            f"{r['world']} ranks: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["peak_bytes"].items()) for r in rows))
    print("\nmerge state: the precision policy's accumulator, sharded over ranks (fp32_residual: 4 B per adapted "
          f"parameter for bf16 weights, divided by the number of ranks); transient: the gather buffer, "
          f"{r0['gather_buffer_bytes'] / 2**20:.2f} MiB (2 x the adapters in fp32), and at most 256 MiB of replica shares.")


def modelled_sent_bytes(r: dict) -> float:
    """The communication model's bytes sent per rank and refresh (what ``--scaling`` states for 8 to 64
    GPUs): a ring all-reduce of the fp32 factors and gradients, 2(N-1)/N x 2 x adapter bytes, plus under
    ZeRO-0/1/2 the all-gather of the merged weights, (N-1)/N x their bytes; the α, β packet is left out."""
    n = r["world"]
    if n == 1:
        return 0.0
    gather = (n - 1) / n * r["adapted_weight_bytes"] if r["stage"] < 3 else 0.0
    return 2 * (n - 1) / n * 2 * r["adapter_bytes"] + gather


def modelled_elalora_sent_bytes(r: dict) -> float:
    """ElaLoRA's bytes sent per rank on an ordinary step: a ring all-reduce of the full fp32 P and Q
    (every rank's pieces written into a zero buffer, plus the one-float finiteness flag), 2(N-1)/N of
    it; ZeRO-0 holds whole replicas and sends nothing."""
    n = r["world"]
    if n == 1 or r["stage"] == 0:
        return 0.0
    return 2 * (n - 1) / n * (r["elalora"]["pq_bytes"] + 4)


WORKER_ARGS = ("stage", "dtype", "hidden", "layers", "r", "seq", "micro_batch", "steps", "blocks", "repeats")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=3, help="interleaved timed blocks per method")
    p.add_argument("--repeats", type=int, default=3, help="timed refreshes")
    p.add_argument("--quick", action="store_true", help="1 and 2 ranks, a tiny shape, few steps")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory launches")
    p.add_argument("--methods", default="lora,scalora_i10,scalora_i1,elalora", help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.ranks, a.hidden, a.layers, a.r, a.seq, a.steps, a.blocks, a.repeats = [1, 2], 128, 2, 4, 32, 3, 1, 1
    if not a.worker:
        driver(a)
        return
    worker(a)
    from ..zero import end_distributed, exit_process

    end_distributed()
    exit_process(0)  # on gloo: os._exit, see ds_scalora/zero/teardown.py


if __name__ == "__main__":
    main()

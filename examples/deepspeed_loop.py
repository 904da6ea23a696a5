"""ScaLoRA in a hand-written DeepSpeed loop: the few lines that change are marked ``# ScaLoRA``.

    deepspeed --num_gpus 2 examples/deepspeed_loop.py --stage 2 [--steps 40] [--interval 10]
        [--deepspeed_config ds_configs/zero3_bf16.json --bf16] [--ckpt DIR [--save-every N]] [--resume]

On a machine without a GPU, set DS_ACCELERATOR=cpu (DeepSpeed then uses gloo). The model is a small
random-init Llama and the data the synthetic lookup task of examples/plain_pytorch.py, so nothing is
downloaded; swap in your own model and loader.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist

from ds_scalora import ScaLoRAConfig
from ds_scalora.zero import attach, disable_cpu_shm_comm, end_distributed, exit_process  # ScaLoRA
from ds_scalora.zero.ds_config import fill_auto
from plain_pytorch import batches, make_model


def ds_config(args) -> dict:
    """The DeepSpeed config file (or a ZeRO stage alone), its "auto" values set from this script's own."""
    config = {"zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            config = json.load(f)
    return fill_auto(config, micro_batch=4, gradient_accumulation=2, gradient_clipping=1.0,
                     world=dist.get_world_size(), bf16=args.bf16)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--ckpt", default=None, help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()

    disable_cpu_shm_comm()  # CPU accelerator only: skip DeepSpeed's inference-only shm op (see its docstring)
    deepspeed.init_distributed()
    model = make_model(torch.float32, rank=4)
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=5e-3), config=ds_config(args))
    scalora = attach(engine, model, ScaLoRAConfig(interval=args.interval, warmup_steps=5))  # ScaLoRA

    if args.resume:
        scalora.load_checkpoint(args.ckpt)  # ScaLoRA: engine.load_checkpoint + the merge-state shard
    rank, world, gas = dist.get_rank(), dist.get_world_size(), engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    data = batches(args.steps, batch=micro * world * gas)
    for step, batch in enumerate(data):
        if step < engine.global_steps:
            continue  # resumed: these batches were consumed before the checkpoint
        for k in range(gas):
            rows = slice((rank * gas + k) * micro, (rank * gas + k + 1) * micro)
            loss = engine(**{key: v[rows].to(engine.device) for key, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # ScaLoRA refreshes inside, at the boundary, when due
        if rank == 0 and (step % args.print_every == 0 or step == args.steps - 1):
            report = scalora.last_report
            note = f"  refreshed {report.layers} layers, scalar fallback {report.scalar_fraction:.2f}" if report else ""
            print(f"step {step:4d} loss {loss.item():.6f}{note}", flush=True)
        if args.ckpt and (step + 1) % args.save_every == 0:
            scalora.save_checkpoint(args.ckpt)  # ScaLoRA: engine.save_checkpoint + the merge-state shard
    if rank == 0:
        print("totals:", dict(scalora.totals))
    end_distributed()  # barrier + destroy_process_group (on gloo, see ds_scalora/zero/teardown.py)


if __name__ == "__main__":
    main()
    exit_process(0)  # on gloo (CPU): leave without interpreter finalization, see ds_scalora/zero/teardown.py

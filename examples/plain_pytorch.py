"""ScaLoRA in a plain PyTorch loop, one process or DDP: LoRA and ScaLoRA side by side on one small model.

    python examples/plain_pytorch.py                          # one process, about a minute on 2 CPU cores
    torchrun --nproc_per_node 2 examples/plain_pytorch.py     # the same loop under DDP (gloo on CPU)
    python examples/plain_pytorch.py --ckpt ck --save-every 50 --steps 150 [--resume]
    python examples/plain_pytorch.py --out trained            # trained/scalora: the merged HF model

Nothing is downloaded: a small random-init Llama learns a fixed synthetic mapping (each key token is
followed by its value token), once with plain LoRA (``torch.optim.AdamW``) and once with ScaLoRA
(``ScaLoRAOptimizer`` wrapping the same AdamW), at the same rank, learning rate, schedule and data. The
loop is the usual one: ``get_scheduler``, gradient clipping, ``opt.step(); scheduler.step();
opt.zero_grad()``; the wrapper's ``step`` refreshes when due. It prints the losses and the numerical rank
of the accumulated update ``W_now + s·B·A − W_initial`` per layer (LoRA's stays at most r).

Checkpoints hold the whole model's ``state_dict`` (the merges live in the frozen weights), the
optimizer's (AdamW's and ScaLoRA's state) and the scheduler's; ``--resume`` continues from the newest one
and replays the same batches. ``--out`` saves each trained model with ``save_pretrained``: LoRA's is
a PEFT adapter, ScaLoRA's the merged model (the wrapper makes ``save_pretrained`` write it, since an
adapter alone would leave every merge out); the script then reloads it with ``from_pretrained`` and
prints how far the reloaded logits are from the trained model's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, get_scheduler

from ds_scalora import ScaLoRAConfig, ScaLoRAOptimizer
from ds_scalora.methods import find_adapted_linears
from ds_scalora.spectrum import numerical_rank

VOCAB, KEYS = 128, 64


def make_base(dtype, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def make_model(dtype, rank, seed=0):
    base = make_base(dtype, seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, lora)


TABLE = torch.randperm(VOCAB - KEYS, generator=torch.Generator().manual_seed(0)) + KEYS  # value of each key


def batch_at(step, batch=16, pairs=8, rank=0, world=1):
    """The global batch of ``step`` (a function of the step alone, so a resumed run sees the same data), of
    which this process takes its rows; value = a fixed random permutation of the key (a lookup table)."""
    g = torch.Generator().manual_seed(1000 + step)
    keys = torch.randint(0, KEYS, (batch, pairs), generator=g)
    ids = torch.stack([keys, TABLE[keys % (VOCAB - KEYS)]], dim=-1).flatten(1)
    labels = ids.clone()
    labels[:, 0::2] = -100  # loss on the values only
    return {"input_ids": ids[rank::world], "labels": labels[rank::world]}


def batches(steps, batch=16, pairs=8):
    """The global batches of steps 0 .. steps-1, whole (examples/deepspeed_loop.py cuts them itself)."""
    for step in range(steps):
        yield batch_at(step, batch, pairs)


def train(method, args, rank, world):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = make_model(dtype, args.rank)
    layers = find_adapted_linears(model)
    initial = {layer.name: layer.effective_weight().float().clone() for layer in layers}  # B = 0: W_initial
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    if method == "scalora":
        opt = ScaLoRAOptimizer(opt, model, ScaLoRAConfig(interval=args.interval, warmup_steps=args.warmup))
    scheduler = get_scheduler("cosine", opt, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)

    start_step, path = 0, os.path.join(args.ckpt, f"{method}.pt") if args.ckpt else None
    if args.resume and path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)  # tensors and plain containers only
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_step = saved["step"]
        log(rank, f"  {method:8s} resumed from {path} at step {start_step}")

    losses, start = [], time.perf_counter()
    for step in range(start_step, args.steps):
        loss = net(**batch_at(step, rank=rank, world=world)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()  # ScaLoRA: the refresh when due, then AdamW's step
        scheduler.step()
        opt.zero_grad()
        value = loss.detach().float()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if step % args.print_every == 0 or step == args.steps - 1:
            log(rank, f"{method} step {step} loss {value.item():.6f}")
        if path and args.save_every and (step + 1) % args.save_every == 0 and rank == 0:
            os.makedirs(args.ckpt, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": step + 1}
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: an interrupted save leaves the previous checkpoint

    current = {layer.name: (opt.scalora.effective_weight(layer) if method == "scalora" else layer.effective_weight())
               for layer in layers}  # fmt: skip
    ranks = [numerical_rank(current[l.name].float() - initial[l.name], rtol=1e-4) for l in layers]
    result = {"final_loss": statistics.mean(losses[-10:]) if losses else None, "ranks": ranks,
              "seconds": time.perf_counter() - start}
    if method == "scalora":
        totals = opt.scalora.totals
        result["fallback"] = totals["solver/scalar"] / max(1, totals["refreshes"] * len(layers))
    if args.out and rank == 0:
        result["reload_max_abs_diff"] = save_and_reload(model, os.path.join(args.out, method), args)
    return result


@torch.no_grad()
def save_and_reload(model, directory, args) -> float:
    """``save_pretrained`` as a user would call it, then ``from_pretrained``: the largest logit difference."""
    model.save_pretrained(directory)  # LoRA: the adapter; ScaLoRA: the merged model
    if os.path.exists(os.path.join(directory, "adapter_config.json")):
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(make_base(model.dtype), directory)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
    ids = batch_at(args.steps)["input_ids"]
    model.eval(), reloaded.eval()
    return (model(input_ids=ids).logits.float() - reloaded(input_ids=ids).logits.float()).abs().max().item()


def log(rank, text):
    if rank == 0:
        print(text, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--interval", type=int, default=1, help="1 = ScaLoRA, 10 = ScaLoRA-I")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before the first refresh")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--methods", nargs="+", choices=["lora", "scalora"], default=["lora", "scalora"])
    p.add_argument("--ckpt", help="checkpoint folder (one file per method)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt")
    p.add_argument("--out", help="save each trained model here (<out>/<method>) and check that it reloads")
    p.add_argument("--print-every", type=int, default=15)
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    results = {m: train(m, args, rank, world) for m in args.methods}

    log(rank, f"\nr={args.rank}, interval={args.interval}, {args.steps} steps, {args.dtype}, {world} process(es)")
    log(rank, "method    mean loss (last 10)   accumulated rank per layer (min/median/max)   seconds")
    for m, r in results.items():
        ranks = sorted(r["ranks"])
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        log(rank, f"{m:8s}  {loss:>19s}   {ranks[0]:>3d} / {ranks[len(ranks) // 2]:>3d} / {ranks[-1]:>3d}"
                  f"{'':30s}{r['seconds']:7.1f}")
    if "scalora" in results:
        log(rank, f"scalar-fallback fraction of ScaLoRA layer refreshes: {results['scalora']['fallback']:.2f}")
    log(rank, json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""ScaLoRA in a plain PyTorch loop: LoRA and ScaLoRA side by side on one small model.

Runs on its embedded default in about a minute on a 2-core CPU, with nothing downloaded: a small
random-init Llama learns a fixed synthetic mapping (each key token is followed by its value token),
once with plain LoRA and once with ScaLoRA at the same rank, learning rate and data. It prints the
losses and the numerical rank of the accumulated update ``W_now + s A Bᵀ − W_initial`` per layer.

    python examples/plain_pytorch.py [--steps 150] [--rank 2] [--interval 1] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ds_scalora import ScaLoRA, ScaLoRAConfig
from ds_scalora.spectrum import numerical_rank

VOCAB, KEYS = 128, 64


def make_model(dtype, rank, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, lora)


def batches(steps, batch=16, pairs=8, seed=0):
    """Sequences of (key, value) pairs; value = a fixed random permutation of the key (a lookup table)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(VOCAB - KEYS, generator=g) + KEYS
    for _ in range(steps):
        keys = torch.randint(0, KEYS, (batch, pairs), generator=g)
        ids = torch.stack([keys, table[keys % (VOCAB - KEYS)]], dim=-1).flatten(1)
        labels = ids.clone()
        labels[:, 0::2] = -100  # loss on the values only
        yield {"input_ids": ids, "labels": labels}


def train(method, args):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = make_model(dtype, args.rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(interval=args.interval, warmup_steps=args.warmup))
    initial = {layer.name: scalora.merged_weight(layer).clone() for layer in scalora.layers}
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(batches(args.steps)):
        loss = model(**batch).loss
        loss.backward()
        if method == "scalora":
            scalora.refresh_if_due()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"  {method:8s} step {step:4d}  loss {loss.item():.4f}")
    ranks = [numerical_rank(scalora.effective_weight(l) - initial[l.name], rtol=1e-4) for l in scalora.layers]
    return {
        "final_loss": statistics.mean(losses[-10:]),
        "ranks": ranks,
        "seconds": time.perf_counter() - start,
        "fallback": scalora.totals["solver/scalar"] / max(1, scalora.totals["refreshes"] * len(scalora.layers)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--interval", type=int, default=1, help="1 = ScaLoRA, 10 = ScaLoRA-I")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {m: train(m, args) for m in ("lora", "scalora")}
    print(f"\nr={args.rank}, interval={args.interval}, {args.steps} steps, {args.dtype}")
    print("method    mean loss (last 10)   accumulated rank per layer (min/median/max)   seconds")
    for m, r in results.items():
        ranks = sorted(r["ranks"])
        print(f"{m:8s}  {r['final_loss']:19.4f}   {ranks[0]:>3d} / {ranks[len(ranks) // 2]:>3d} / {ranks[-1]:>3d}"
              f"{'':30s}{r['seconds']:7.1f}")
    print(f"scalar-fallback fraction of ScaLoRA layer refreshes: {results['scalora']['fallback']:.2f}")


if __name__ == "__main__":
    main()

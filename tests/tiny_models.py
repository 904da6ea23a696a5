"""Tiny random-init Llama models wrapped with PEFT LoRA, and a fixed batch, for fast CPU tests."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96


def tiny_lora_model(dtype=torch.float32, r=4, alpha=8, use_rslora=False, seed=0, **lora_kwargs):
    """A 2-layer Llama (hidden 32) with LoRA on all linear layers of the blocks.

    Adapters follow PEFT's defaults: lora_A Kaiming-uniform, lora_B zero, adapters upcast to fp32
    when the base is bf16 (autocast_adapter_dtype).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, use_rslora=use_rslora, **lora_kwargs)
    return get_peft_model(base, lora)


def tiny_elastic_model(dtype=torch.float32, init_rank=2, max_rank=4, alpha=8, seed=0, total_steps=8):
    """The same 2-layer Llama with ElaLoRA's fixed max-rank SVD adapters (PEFT AdaLoRA layers)."""
    from ds_scalora.methods import elastic_lora_model

    base = tiny_llama(dtype, seed)
    return elastic_lora_model(base, TARGETS, init_rank=init_rank, max_rank=max_rank, alpha=alpha, total_steps=total_steps)


def tiny_llama(dtype=torch.float32, seed=0):
    """The bare 2-layer Llama the elastic model wraps (the same weights for the same seed)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def fixed_batch(seed=1, batch=4, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def adamw(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())

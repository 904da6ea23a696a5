"""The merged Hugging Face model of a ScaLoRA run, and the guard that writes it in place of an adapter.

After a refresh has merged part of the adapter into the frozen weights, a PEFT adapter file alone
describes the wrong model: loading it on the base model leaves every merge out, silently. Whatever
the path (the optimizer wrapper, the Trainer callback), what ``save_pretrained`` writes for a ScaLoRA
model is therefore the merged model: the base model's files with each adapted weight replaced by its
effective weight (frozen weight with its merges + s·B·A), LoRA tensors dropped, PEFT's ``base_layer``
names undone, in the model's dtype.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR as CHECKPOINT_PREFIX  # checkpoint-<global_step>

from .scalora import ScaLoRA


@torch.no_grad()
def save_merged(model, scalora, directory: str) -> None:
    """Write the merged model of ``model`` (a PEFT model) to ``directory``. Needs whole weights on this
    process (one process, DDP, or ZeRO-0/1/2 replicas). The single-process :class:`ScaLoRA` adds its
    full-precision merge state; anything else (a DeepSpeed replica, whose accumulator is sharded) is
    used as stored: the difference is below one unit in the weight's last place."""
    effective = {}
    for layer in scalora.layers:
        value = scalora.effective_weight(layer) if isinstance(scalora, ScaLoRA) else layer.effective_weight()
        effective[layer.weight] = value.to(layer.weight.dtype)
    base = model.get_base_model()
    write_merged(base, by_state_name(base, effective), directory)


def by_state_name(base, by_weight: dict) -> dict:
    """Re-key {frozen weight parameter: tensor} by the parameter's name in ``base`` (found by identity, so
    no assumption about how PEFT prefixes module names)."""
    return {name: by_weight[p] for name, p in base.named_parameters() if p in by_weight}


def write_merged(base, effective: dict, directory: str) -> None:
    """``base.save_pretrained`` with PEFT's wrapping undone: LoRA tensors dropped, ``base_layer`` names
    restored, adapted weights replaced by ``effective`` (keyed by their name in ``base.state_dict()``)."""
    state = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or "lora_dropout" in name:
            continue
        state[name.replace(".base_layer.", ".")] = effective.get(name, tensor)
    base.save_pretrained(directory, state_dict=state)


def guard_save_pretrained(model, save_instead, when=lambda: True) -> None:
    """Replace ``model.save_pretrained`` (this instance only): outside a Trainer checkpoint folder, and while
    ``when()`` holds, ``save_instead(directory, is_main_process)`` writes what a stock reload needs (or
    raises saying why it cannot); inside a checkpoint folder the method's shards complete PEFT's file."""
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        inside_checkpoint = os.path.basename(os.path.normpath(str(save_directory))).startswith(CHECKPOINT_PREFIX + "-")
        if inside_checkpoint or not when():
            return original(save_directory, *args, **kwargs)
        save_instead(str(save_directory), kwargs.get("is_main_process", True))

    model.save_pretrained = save_pretrained

"""The run's own adapter as a stock PEFT adapter, exactly: the trained factors, no SVD.

* LoRA and rsLoRA: ``lora_A`` and ``lora_B`` from the fp32 masters under the run's ``r``, ``lora_alpha`` and
  ``use_rslora``, so PEFT computes with the very update the run trained.
* ElaLoRA: each module's active slots as a plain LoRA layer, ``lora_A = Q[act]``,
  ``lora_B = s·P[:, act]·λ[act]`` with scaling 1 (``alpha_pattern`` = ``rank_pattern``); the active masks
  come from the checkpoint's ElaLoRA state.

ScaLoRA and ReLoRA have no exact adapter: their merges live in the frozen weights and the total update is
high-rank (``merged``, or ``peft`` for a truncated SVD with its error reported).
"""

from __future__ import annotations

import json
import os

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS  # PEFT's own file name
from tqdm import tqdm

from ..methods.elalora import active_slots_lora_fields, lora_adapter_tensors
from ..methods.svd_layers import svd_scale
from .final_model import EXACT_ADAPTER_METHODS
from .output import atomic_dir
from .source import PEFT_PREFIX, ExportError, RunSource
from .weights import EffectiveWeights

INFO = "ds_scalora_export.json"


def export_adapter(source: RunSource, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the exact PEFT adapter (plus ``out/base_model`` for a random-init run) to ``out``; returns what
    was written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from .model_card import write_model_card
    from .peft_export import adapter_base

    name = source.method["name"]
    if name not in EXACT_ADAPTER_METHODS:
        raise ExportError(f"a {name} run has no exact adapter (its update is merged into the frozen weights); "
                          "use 'merged' for the model, or 'peft' for a truncated-SVD adapter")
    weights = EffectiveWeights(source)
    active = _active_masks(source) if name == "elalora" else None
    tensors, rank_pattern = {}, {}
    for weight in tqdm(weights.adapted(), desc="adapter", unit="module", disable=not progress):
        module = weights.module_of[weight]  # the PeftModel's module name, as PEFT keys its files
        t = weights.adapter_tensors(weight)
        if active is None:
            A, B = t["lora_A"], t["lora_B"]
        else:
            ranknum = float(t["ranknum"].flatten()[0]) if "ranknum" in t else float(source.method["r"])
            A, B = lora_adapter_tensors(t["lora_B"], t["lora_E"].view(-1), t["lora_A"], active[module],
                                        svd_scale(float(source.method["lora_alpha"]), ranknum))  # fmt: skip
        tensors[f"{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{module}.lora_B.weight"] = B.float().contiguous()
        rank_pattern[module.removeprefix(PEFT_PREFIX)] = A.shape[0]
    if not tensors:
        raise ExportError(f"{source.tag_dir} holds no adapter tensors")
    m = source.method
    if active is None:
        fields = {"r": int(m["r"]), "lora_alpha": m["lora_alpha"], "use_rslora": bool(m.get("use_rslora") or name == "rslora")}
    else:
        fields = active_slots_lora_fields(rank_pattern)
    with atomic_dir(out, overwrite) as tmp:
        base = adapter_base(source, weights, tmp, os.path.abspath(out))
        config = LoraConfig(target_modules=sorted(rank_pattern), task_type="CAUSAL_LM",
                            fan_in_fan_out=bool(weights.transposed), base_model_name_or_path=base, **fields)  # fmt: skip
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        source.tokenizer().save_pretrained(tmp)
        info = {"checkpoint": source.tag_dir, "step": source.step, "method": name, "kind": "adapter",
                "zero_stage": source.ckpt.stage, "world_size": source.ckpt.world, "modules": len(rank_pattern),
                "rank_pattern": rank_pattern if active is not None else None}  # fmt: skip
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(info, f, indent=2)
        write_model_card(tmp, source, "adapter")
    return info


def _active_masks(source: RunSource) -> dict[str, torch.Tensor]:
    """ElaLoRA's active-slot mask per adapted module, from the checkpoint's replicated ElaLoRA state."""
    state = source.client.get("ds_elalora")
    if not isinstance(state, dict) or "active" not in state or "layers" not in state:
        raise ExportError(f"{source.tag_dir} is an ElaLoRA checkpoint without its ElaLoRA state (active slots); "
                          "it was not written by launch/train.py or attach_elalora")
    return {layer: torch.as_tensor(a).bool() for layer, a in zip(state["layers"], state["active"])}

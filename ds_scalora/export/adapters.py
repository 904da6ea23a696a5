"""The adapter's contribution to one module's effective weight, one small function per method.

Each function gets the module's adapter tensors by PEFT suffix (``lora_A``, ``lora_B``, and for
ElaLoRA's AdaLoRA layers ``lora_E``, ``ranknum``), the run's ``method`` config, and returns
``ΔW`` in the base layer's layout (d_out x d_in) in float64. A new method is one more entry in
:data:`DELTAS`.
"""

from __future__ import annotations

import math

import torch

from ..methods.svd_layers import svd_scale


def lora_scale(method: dict) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    r, alpha = int(method["r"]), float(method["alpha"])
    rs = method.get("rslora") or method["name"] == "rslora"
    return alpha / math.sqrt(r) if rs else alpha / r


def lora_delta(t: dict, method: dict) -> torch.Tensor:
    """LoRA, rsLoRA, ScaLoRA, ReLoRA: ``scale · B A`` (merges are already in the frozen weight)."""
    return lora_scale(method) * (t["lora_B"].double() @ t["lora_A"].double())


def elalora_delta(t: dict, method: dict) -> torch.Tensor:
    """PEFT AdaLoRA ``SVDLinear``: ``B (A ⊙ E) · alpha / (ranknum + 1e-5)``, inactive slots exactly 0."""
    ranknum = float(t["ranknum"].flatten()[0]) if "ranknum" in t else float(method["r"])
    return (t["lora_B"].double() @ (t["lora_A"].double() * t["lora_E"].double())) * svd_scale(float(method["alpha"]), ranknum)


DELTAS = {"lora": lora_delta, "rslora": lora_delta, "scalora": lora_delta, "relora": lora_delta, "elalora": elalora_delta}


def adapter_delta(tensors: dict, method: dict) -> torch.Tensor:
    name = method["name"]
    if name not in DELTAS:
        raise ValueError(f"method {name!r} has no adapter; known: {sorted(DELTAS)}")
    return DELTAS[name](tensors, method)

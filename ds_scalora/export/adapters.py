"""The adapter's contribution to one module's effective weight, one small function per method.

Each function gets the module's adapter tensors by PEFT suffix (``lora_A``, ``lora_B``, and for
ElaLoRA's AdaLoRA layers ``lora_E``, ``ranknum``), the run's ``method`` config, and returns
``ΔW`` in the base layer's layout (d_out x d_in) in float64. A new method is one more entry in
:data:`DELTAS`.
"""

from __future__ import annotations

import torch

from ..methods.adapted_layers import lora_scaling, lora_update
from ..methods.svd_layers import svd_scale, svd_update


def lora_scale(method: dict) -> float:
    """PEFT's scaling for the run's method config (rsLoRA by flag or by name)."""
    return lora_scaling(int(method["r"]), float(method["lora_alpha"]), bool(method.get("use_rslora") or method["name"] == "rslora"))


def lora_delta(t: dict, method: dict) -> torch.Tensor:
    """LoRA, rsLoRA, ScaLoRA, ReLoRA: ``scale · B A`` (merges are already in the frozen weight)."""
    return lora_update(t["lora_A"], t["lora_B"], lora_scale(method), torch.float64)


def elalora_delta(t: dict, method: dict) -> torch.Tensor:
    """PEFT AdaLoRA ``SVDLinear``: ``B (A ⊙ E) · alpha / (ranknum + 1e-5)``, inactive slots exactly 0."""
    ranknum = float(t["ranknum"].flatten()[0]) if "ranknum" in t else float(method["r"])
    return svd_update(t["lora_B"], t["lora_E"], t["lora_A"], svd_scale(float(method["lora_alpha"]), ranknum))


DELTAS = {"lora": lora_delta, "rslora": lora_delta, "scalora": lora_delta, "relora": lora_delta, "elalora": elalora_delta}


def adapter_delta(tensors: dict, method: dict) -> torch.Tensor:
    name = method["name"]
    if name not in DELTAS:
        raise ValueError(f"method {name!r} has no adapter; known: {sorted(DELTAS)}")
    return DELTAS[name](tensors, method)

"""The SVD-form adapted layers of a PEFT AdaLoRA model, as ElaLoRA sees them.

PEFT's ``SVDLinear`` adds ``scaling/(ranknum + 1e-5) · lora_B (lora_A ⊙ lora_E) x``: ``lora_B`` is P
(d_out x R), ``lora_E`` holds λ (R x 1), ``lora_A`` is Q (R x d_in). ElaLoRA keeps R fixed (the buffer's
maximum rank) and marks slots active or not; this module is the one place that knows PEFT's names.
Layers are returned sorted by name: every data-parallel rank must visit them in one order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.adalora.layer import AdaLoraLayer, SVDLinear

# (attribute, slot axis): the slot index of an element runs along this axis of the row-major tensor
FACTORS = (("Q", 0), ("lam", 0), ("P", 1))
PEFT_NAMES = {"Q": "lora_A", "lam": "lora_E", "P": "lora_B"}  # the ParameterDict each factor lives in
RANKNUM_EPS = 1e-5  # PEFT's SVDLinear divides by ranknum + 1e-5


def svd_scale(scaling: float, ranknum: float) -> float:
    """The factor PEFT's ``SVDLinear`` puts on ``P diag(λ) Q``: ``lora_alpha / (ranknum + 1e-5)``."""
    return scaling / (ranknum + RANKNUM_EPS)


def svd_update(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, scale: float, dtype=torch.float64) -> torch.Tensor:
    """The update ``scale · P diag(λ) Q`` (d_out x d_in) of PEFT's AdaLoRA tensors (``lora_B``, ``lora_E``,
    ``lora_A``); inactive slots hold zeros and contribute exactly nothing."""
    return (P.to(dtype) @ (Q.to(dtype) * lam.to(dtype).view(-1, 1))) * scale


@dataclass(frozen=True)
class SVDAdapted:
    """One PEFT AdaLoRA ``SVDLinear`` for one adapter: ``W_eff = W + scale · P diag(λ) Q``."""

    name: str
    module: SVDLinear
    adapter: str

    @property
    def Q(self) -> torch.nn.Parameter:  # R x d_in
        return getattr(self.module, PEFT_NAMES["Q"])[self.adapter]

    @property
    def lam(self) -> torch.nn.Parameter:  # R x 1
        return getattr(self.module, PEFT_NAMES["lam"])[self.adapter]

    @property
    def P(self) -> torch.nn.Parameter:  # d_out x R
        return getattr(self.module, PEFT_NAMES["P"])[self.adapter]

    def factors(self) -> list[tuple[str, torch.nn.Parameter, int]]:
        """(name, parameter, slot axis) of Q, λ and P."""
        return [(name, getattr(self, name), axis) for name, axis in FACTORS]

    @property
    def scale(self) -> float:
        """``lora_alpha / ranknum``: ElaLoRA keeps ranknum at the initial rank r0 for the whole run."""
        ranknum = self.module.ranknum[self.adapter]  # under ZeRO-3, read it inside a parameter gather
        return svd_scale(float(self.module.scaling[self.adapter]), float(ranknum.flatten()[0]))

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.get_base_layer().weight


def find_svd_layers(model: torch.nn.Module, adapter: str = "default") -> list[SVDAdapted]:
    """All AdaLoRA ``SVDLinear`` layers of ``model`` carrying ``adapter``, sorted by name."""
    layers, problems = [], []
    for name, module in model.named_modules():
        if not isinstance(module, AdaLoraLayer) or adapter not in module.lora_A:
            continue
        if type(module) is not SVDLinear:
            problems.append(f"{name}: {type(module).__name__} is not a plain AdaLoRA SVDLinear layer")
        else:
            layers.append(SVDAdapted(name, module, adapter))
    if problems:
        raise ValueError("these adapted layers are not supported by ElaLoRA:\n  " + "\n  ".join(problems))
    if not layers:
        raise ValueError(
            f"no SVD-form adapted layers with adapter {adapter!r} found; build the model with "
            "ds_scalora.methods.elastic_lora_model(base, ...) first"
        )
    return sorted(layers, key=lambda layer: layer.name)

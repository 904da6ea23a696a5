"""The adapted layers of a PEFT LoRA model, seen in the paper's orientation.

PEFT stores ``lora_A.weight`` (r x d_in) and ``lora_B.weight`` (d_out x r) and adds
``scaling · lora_B(lora_A(x))``; ``scaling`` is ``alpha/r`` or, with ``use_rslora``, ``alpha/sqrt(r)``.
The paper's ``A`` is ``lora_B.weight`` and its ``B`` is ``lora_A.weight.T`` (spec §1). This module is
the one place that knows that mapping, so the methods work on (A, B, scale) views and never on PEFT's
names. Layers are returned sorted by name: every data-parallel rank must visit them in one order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (what ``module.scaling`` holds)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_update(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dtype: torch.dtype | None = None):
    """The adapter's update ``s · B A`` (d_out x d_in) from PEFT's tensors, in ``dtype`` (default: lora_B's):
    the one formula behind training (``AdaptedLinear.effective_weight``), export and inspection."""
    dtype = dtype or lora_B.dtype
    return scale * (lora_B.to(dtype) @ lora_A.to(dtype))


@dataclass(frozen=True)
class AdaptedLinear:
    """One PEFT LoRA ``Linear`` for one adapter: ``W_eff = W + scale · A Bᵀ``."""

    name: str
    module: LoraLinear
    adapter: str

    @property
    def lora_A(self) -> torch.nn.Parameter:  # r x d_in, the paper's Bᵀ
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> torch.nn.Parameter:  # d_out x r, the paper's A
        return self.module.lora_B[self.adapter].weight

    @property
    def A(self) -> torch.Tensor:
        return self.lora_B

    @property
    def B(self) -> torch.Tensor:
        return self.lora_A.T  # a view: in-place edits reach the parameter

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def weight(self) -> torch.nn.Parameter:
        """The frozen base weight, in the base layer's layout (d_out x d_in unless fan_in_fan_out)."""
        return self.module.get_base_layer().weight

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A d_out x d_in update in the base weight's own layout (GPT-2's Conv1D stores it transposed)."""
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def effective_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """``W + s A Bᵀ`` in the base weight's layout, at ``base``'s precision (default: the frozen weight;
        ScaLoRA passes its full-precision merged weight)."""
        W = self.weight.detach() if base is None else base
        return W + self.to_weight_layout(lora_update(self.lora_A, self.lora_B, self.scale, W.dtype))

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_A, grad_B) in the paper's orientation; zeros where autograd left no gradient."""
        gA = self.lora_B.grad
        gB = self.lora_A.grad
        gA = torch.zeros_like(self.lora_B) if gA is None else gA
        gB = torch.zeros_like(self.lora_A) if gB is None else gB
        return gA, gB.T


def fresh_lora_A(shape, generator: torch.Generator) -> torch.Tensor:
    """A new ``lora_A`` (r x d_in, fp32) as PEFT initialises it: Kaiming-uniform with a = √5, i.e.
    U(−1/√d_in, 1/√d_in). Drawn from ``generator`` so that every data-parallel rank draws the same."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(tuple(shape), generator=generator, dtype=torch.float32) * 2 - 1) * bound


def find_adapted_linears(model: torch.nn.Module, adapter: str = "default") -> list[AdaptedLinear]:
    """All LoRA Linear layers of ``model`` carrying ``adapter``, sorted by name.

    Refuses what the rescale cannot treat exactly: DoRA (the magnitude vector makes the layer
    non-linear in A Bᵀ), a LoRA bias, and LoRA on other layer types (embeddings, convolutions).
    """
    layers, problems = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if type(module) is not LoraLinear:
            problems.append(f"{name}: {type(module).__name__} is not a plain LoRA Linear layer")
        elif module.use_dora.get(adapter, False):
            problems.append(f"{name}: DoRA (use_dora=True) is not supported by ScaLoRA")
        elif module.lora_bias.get(adapter, False):
            problems.append(f"{name}: lora_bias=True is not supported by ScaLoRA")
        else:
            layers.append(AdaptedLinear(name, module, adapter))
    if problems:
        raise ValueError(
            "these LoRA layers cannot be rescaled:\n  "
            + "\n  ".join(problems)
            + "\nRemove them from target_modules (or disable the option) and try again."
        )
    if not layers:
        raise ValueError(
            f"no LoRA Linear layers with adapter {adapter!r} found; wrap the model with "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...])) first"
        )
    return sorted(layers, key=lambda layer: layer.name)

"""Layer 2: the methods, on PEFT modules. No DeepSpeed imports here."""

from .adapted_layers import AdaptedLinear, find_adapted_linears
from .scalora import RefreshReport, ScaLoRA, ScaLoRAConfig

__all__ = ["AdaptedLinear", "find_adapted_linears", "RefreshReport", "ScaLoRA", "ScaLoRAConfig"]

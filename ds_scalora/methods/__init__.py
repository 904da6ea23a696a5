"""Layer 2: the methods, on PEFT modules. No DeepSpeed imports here."""

from .adapted_layers import AdaptedLinear, find_adapted_linears
from .elalora import ElaLoRA, ElaLoRAConfig, ElasticRanks, RoundReport, elastic_lora_model, lora_adapter_tensors
from .scalora import RefreshReport, ScaLoRA, ScaLoRAConfig
from .scalora_optimizer import ScaLoRAOptimizer
from .svd_layers import SVDAdapted, find_svd_layers

__all__ = ["AdaptedLinear", "find_adapted_linears", "RefreshReport", "ScaLoRA", "ScaLoRAConfig", "ScaLoRAOptimizer", "ElaLoRA",
           "ElaLoRAConfig", "ElasticRanks", "RoundReport", "elastic_lora_model", "lora_adapter_tensors",
           "SVDAdapted", "find_svd_layers"]

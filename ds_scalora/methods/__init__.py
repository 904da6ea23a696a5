"""Layer 2: the methods, on PEFT modules. No DeepSpeed imports here.

Each method keeps its config apart (``scalora_config``, ``elalora_config``: no PEFT import) from its
layers and its reference loop; the names below are imported on first use (PEP 562).
"""

from importlib import import_module

_EXPORTS = {
    "AdaptedLinear": ".adapted_layers", "find_adapted_linears": ".adapted_layers",
    "ElaLoRA": ".elalora", "ElasticRanks": ".elalora", "RoundReport": ".elalora", "elastic_lora_model": ".elalora",
    "lora_adapter_tensors": ".elalora", "ElaLoRAConfig": ".elalora_config",
    "RefreshReport": ".scalora_refresh", "ScaLoRA": ".scalora", "ScaLoRAConfig": ".scalora_config",
    "ScaLoRAOptimizer": ".scalora_optimizer", "SVDAdapted": ".svd_layers", "find_svd_layers": ".svd_layers",
}  # fmt: skip
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ds_scalora.methods' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)

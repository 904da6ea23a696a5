"""ds-scalora: ScaLoRA (optimally scaled, high-rank-accumulating LoRA) for DeepSpeed and plain PyTorch.

Layers, imports pointing down only:
  1. math:     scaling (the optimal column scaling), rescale (merge, rescale, crossed transfer),
               precision (how merges accumulate in a low-precision weight), spectrum (numerical rank),
               elastic (ElaLoRA's scores, schedule and moves), pieces (a rank's piece of a parameter);
               deepspeed_import (DeepSpeed's first import in a process, without mlflow)
  2. methods:  ds_scalora.methods (PEFT layers; the single-process ScaLoRA and ElaLoRA references)
  3. zero:     ds_scalora.zero (both methods inside a DeepSpeed engine, ZeRO stages 0 to 3)

The names below are imported on first use (PEP 562), so that ``ds_scalora.train.config`` (or any
light submodule) loads without PEFT and transformers: a run config's mistake is reported at once.
"""

from importlib import import_module

_EXPORTS = {
    "ElaLoRA": ".methods", "ElaLoRAConfig": ".methods", "elastic_lora_model": ".methods", "ScaLoRA": ".methods",
    "ScaLoRAConfig": ".methods", "ScaLoRAOptimizer": ".methods", "get_policy": ".precision",
    "ScalingSolution": ".scaling", "solve_scaling": ".scaling",
}  # fmt: skip
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ds_scalora' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)

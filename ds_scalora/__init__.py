"""ds-scalora: ScaLoRA (optimally scaled, high-rank-accumulating LoRA) for DeepSpeed and plain PyTorch.

Layers, imports pointing down only:
  1. math:     scaling (the optimal column scaling), rescale (merge, rescale, crossed transfer),
               precision (how merges accumulate in a low-precision weight), spectrum (numerical rank),
               elastic (ElaLoRA's scores, schedule and moves), pieces (a rank's piece of a parameter)
  2. methods:  ds_scalora.methods (PEFT layers; the single-process ScaLoRA and ElaLoRA references)
  3. zero:     ds_scalora.zero (both methods inside a DeepSpeed engine, ZeRO stages 0 to 3)
"""

from .methods import ElaLoRA, ElaLoRAConfig, ScaLoRA, ScaLoRAConfig, ScaLoRAOptimizer, elastic_lora_model
from .precision import get_policy
from .scaling import ScalingSolution, solve_scaling

__all__ = ["ElaLoRA", "ElaLoRAConfig", "elastic_lora_model", "ScaLoRA", "ScaLoRAConfig", "ScaLoRAOptimizer", "ScalingSolution", "get_policy", "solve_scaling"]
__version__ = "0.1.0"

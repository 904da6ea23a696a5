"""ds-scalora: ScaLoRA (optimally scaled, high-rank-accumulating LoRA) for DeepSpeed and plain PyTorch.

Layers, imports pointing down only:
  1. math:     scaling (the optimal column scaling), rescale (merge, rescale, crossed transfer),
               precision (how merges accumulate in a low-precision weight), spectrum (numerical rank)
  2. methods:  ds_scalora.methods (PEFT layers; the single-process ScaLoRA reference)
"""

from .methods import ScaLoRA, ScaLoRAConfig
from .precision import get_policy
from .scaling import ScalingSolution, solve_scaling

__all__ = ["ScaLoRA", "ScaLoRAConfig", "ScalingSolution", "get_policy", "solve_scaling"]
__version__ = "0.1.0"

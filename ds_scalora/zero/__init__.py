"""Layer 3: the DeepSpeed integration. Only ``state_access`` touches DeepSpeed internals."""

from .controller import ZeroScaLoRA, attach
from .state_access import UnsupportedConfig, disable_cpu_shm_comm

__all__ = ["ZeroScaLoRA", "attach", "UnsupportedConfig", "disable_cpu_shm_comm"]

"""Layer 3: the DeepSpeed integration. Only ``state_access`` touches DeepSpeed internals."""

from .controller import ZeroScaLoRA, attach
from .elalora_controller import ZeroElaLoRA, attach_elalora
from .hf_callback import ScaLoRACallback, preflight_resume
from .hf_elalora_callback import ElaLoRACallback
from .state_access import UnsupportedConfig, disable_cpu_shm_comm
from .teardown import end_distributed, exit_process, peer_lost

__all__ = ["ZeroScaLoRA", "attach", "ScaLoRACallback", "preflight_resume", "ElaLoRACallback", "ZeroElaLoRA", "attach_elalora", "UnsupportedConfig", "disable_cpu_shm_comm", "end_distributed", "exit_process", "peer_lost"]

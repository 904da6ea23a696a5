"""Multi-process DeepSpeed tests (CPU accelerator, gloo). Select or skip them with ``-m dist``."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # tests/ (tiny_models) and tests/distributed/ (launch, reference)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "dist: launches DeepSpeed ranks as subprocesses (deepspeed launcher, CPU/gloo; ~20-30 s per launch "
        "on 2 cores; DeepSpeed's CPU shm op is never built, see ds_scalora.zero.disable_cpu_shm_comm)",
    )

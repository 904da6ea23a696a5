"""A program started without a launcher (``python launch/train.py ...``) is a one-rank run.

DeepSpeed's ``init_distributed`` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which its
launcher (``deepspeed``) and ``torchrun`` set; without them it tries MPI discovery, which without mpi4py ends
in a ModuleNotFoundError traceback. Where nothing says the process is one of several, it is the only rank:
those variables get one-rank values (a free port on 127.0.0.1), as ``deepspeed --num_gpus 1`` would give.
"""

from __future__ import annotations

import os
import socket

# any of these: a launcher, MPI (mpirun, srun with PMI) or a cloud that DeepSpeed sets up itself started the
# process, and DeepSpeed's own discovery is left to it
LAUNCHED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
            "AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_if_not_launched() -> bool:
    """Set the one-rank variables when no launcher did (those already set are kept); whether it did."""
    if any(key in os.environ for key in LAUNCHED) or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return False  # (srun -n N without PMI starts N processes that no variable ranks: not one rank either)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True

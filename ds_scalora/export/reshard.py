"""``convert.py reshard``: a checkpoint written at N data-parallel ranks, rewritten to resume at M.

The new tag directory holds DeepSpeed's files for M ranks (ZeRO-1/2: the model states with the merged
frozen weights unchanged, M optimizer files with the fp32 masters, Adam moments and step re-cut) and
ScaLoRA's M merge-state shards; the learning-rate scheduler, global step, sample count and the loop's
client state (step, history, config) are carried over as they are. It is written to a temporary
directory beside OUT, moved into place, and marked ``COMPLETE``, so ``train.resume=OUT`` takes it.

Keep the global batch: resume with ``train.micro_batch_size x train.gradient_accumulation_steps x M``
equal to the original run's (the data order depends on the step and the global batch only).
The file formats are in :mod:`ds_scalora.zero.reshard_files`.
"""

from __future__ import annotations

import glob
import os
import shutil

import torch

from ..zero import reshard_files
from ..zero.checkpoint_files import CheckpointFileError
from .output import atomic_dir
from .source import MARKER, ExportError, RunSource


def reshard(source: RunSource, out: str, world: int, overwrite: bool = False) -> dict:
    """Write ``source``'s checkpoint for ``world`` ranks into ``out`` (a tag directory); returns a summary."""
    if world < 1:
        raise ExportError(f"--world must be at least 1, got {world}")
    ckpt = source.ckpt
    try:
        reshard_files.check_supported(ckpt)
    except CheckpointFileError as e:
        raise ExportError(str(e)) from None
    if glob.glob(os.path.join(ckpt.dir, "ds_elalora_rank*_of*.pt")):
        raise ExportError(f"{ckpt.dir} is an ElaLoRA checkpoint; changing the world size of ElaLoRA's importance "
                          "shards is not supported yet")
    scalora = ckpt.scalora_shards()
    names = [os.path.basename(p) for p in ckpt.optim_files]
    prefix = names[0][: names[0].index("zero_pp_rank_")]  # '' or 'bf16_'
    with atomic_dir(out, overwrite) as tmp:
        torch.save(reshard_files.model_states(ckpt, world), os.path.join(tmp, os.path.basename(ckpt.model_files[0])))
        for k, sd in enumerate(reshard_files.optimizer_files(ckpt, world)):
            torch.save(sd, os.path.join(tmp, f"{prefix}zero_pp_rank_{k}_mp_rank_00_optim_states.pt"))
        if scalora:
            for k, shard in enumerate(reshard_files.scalora_shards(scalora, world)):
                torch.save(shard, os.path.join(tmp, reshard_files.shard_name(k, world)))
        for extra in ("zero_to_fp32.py",):
            if os.path.isfile(os.path.join(ckpt.dir, extra)):
                shutil.copy2(os.path.join(ckpt.dir, extra), tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"{source.step}\n")
    return {"from": ckpt.dir, "to": os.path.abspath(out), "step": source.step, "stage": ckpt.stage,
            "world": {"from": ckpt.world, "to": world}, "scalora_shards": len(scalora) > 0}  # fmt: skip

"""``convert.py reshard``: a checkpoint written at N data-parallel ranks, rewritten to resume at M.

The new tag directory holds DeepSpeed's files for M ranks (the merged frozen weights: ZeRO-1/2 one
model-states file unchanged, ZeRO-3 M files with the fragments re-cut; M optimizer files with the fp32
masters, Adam moments and step re-cut) and ScaLoRA's M merge-state shards or ElaLoRA's M importance
shards; the learning-rate scheduler, global step, sample count and the loop's
client state (step, history, config) are carried over as they are. It is written to a temporary
directory beside OUT, moved into place, and marked ``COMPLETE``, so ``train.resume_from_checkpoint=OUT`` takes it.

Keep the global batch: resume with ``train.per_device_train_batch_size x train.gradient_accumulation_steps x M``
equal to the original run's (the data order depends on the step and the global batch only).
The file formats are in :mod:`ds_scalora.checkpoint.reshard_files`.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..checkpoint import layout, reshard_files, shards
from ..checkpoint.deepspeed_files import CheckpointFileError
from .output import atomic_dir
from .source import ExportError, RunSource


def reshard(source: RunSource, out: str, world: int, overwrite: bool = False) -> dict:
    """Write ``source``'s checkpoint for ``world`` ranks into ``out`` (a tag directory); returns a summary."""
    if world < 1:
        raise ExportError(f"--world must be at least 1, got {world}")
    ckpt = source.ckpt
    try:
        reshard_files.check_supported(ckpt)
        scalora, elalora = (shards.find(ckpt.dir, kind, ckpt.world) for kind in ("scalora", "elalora"))
    except CheckpointFileError as e:
        raise ExportError(str(e)) from None
    names = [os.path.basename(p) for p in ckpt.optim_files]
    prefix = names[0][: names[0].index("zero_pp_rank_")] if names else ""  # "" or "bf16_"; ZeRO-0 has none
    with atomic_dir(out, overwrite) as tmp:
        for name, states in reshard_files.model_state_files(ckpt, world):
            torch.save(states, os.path.join(tmp, name))
        for k, sd in enumerate(reshard_files.optimizer_files(ckpt, world)):
            torch.save(sd, os.path.join(tmp, f"{prefix}zero_pp_rank_{k}_mp_rank_00_optim_states.pt"))
        if scalora:
            for k, record in enumerate(reshard_files.scalora_shards(scalora, world)):
                shards.write(shards.shard_path(tmp, k, world, "scalora"), record)
        if elalora:
            adapter = (ckpt.client_state().get("ds_elalora") or {}).get("config", {}).get("adapter", "default")
            for k, record in enumerate(reshard_files.elalora_shards(ckpt, elalora, world, adapter)):
                shards.write(shards.shard_path(tmp, k, world, "elalora"), record)
        for extra in ("zero_to_fp32.py",):
            if os.path.isfile(os.path.join(ckpt.dir, extra)):
                shutil.copy2(os.path.join(ckpt.dir, extra), tmp)
        layout.mark_complete(tmp, source.step)
    return {"from": ckpt.dir, "to": os.path.abspath(out), "step": source.step, "stage": ckpt.stage,
            "world": {"from": ckpt.world, "to": world}, "scalora_shards": len(scalora) > 0,
            "elalora_shards": len(elalora) > 0}  # fmt: skip

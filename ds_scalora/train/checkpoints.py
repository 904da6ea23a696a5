"""Checkpoints of a run: DeepSpeed's own, made atomic, rotated, and found again on resume.

A checkpoint is ``<output_dir>/checkpoints/step00000042/`` written by ``engine.save_checkpoint`` (and
the method's per-rank shards); its layout (tag names, the ``COMPLETE`` marker) is
:mod:`ds_scalora.checkpoint.layout`'s. Only after every rank has finished writing does rank 0 add the
marker: a save interrupted at any moment leaves a directory without it, which resume skips (with a
warning) and the next save removes. DeepSpeed's ``latest`` is written after the marker, for the ecosystem
(``zero_to_fp32.py`` in every checkpoint folder, ``engine.load_checkpoint(dir)``); resume never trusts it.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from ..checkpoint.layout import MARKER, checkpoint_root, is_complete, mark_complete, step_tags, tag_for, write_latest
from ..zero.teardown import peer_lost


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def complete_tags(output_dir: str) -> list[str]:
    return step_tags(checkpoint_root(output_dir))[0]


def incomplete_tags(output_dir: str) -> list[str]:
    return step_tags(checkpoint_root(output_dir))[1]


def save(engine, controller, output_dir: str, step: int, client_state: dict, keep_last: int, keep_step: int | None = None) -> str:
    """Write the checkpoint of ``step`` on every rank, mark it complete, drop the oldest ones (never ``keep_step``'s,
    the best one when the final model comes from it)."""
    root, tag = checkpoint_root(output_dir), tag_for(step)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        for stale in incomplete_tags(output_dir):  # leftovers of an interrupted save
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    _barrier()
    writer = controller.save_checkpoint if controller is not None else engine.save_checkpoint
    try:
        writer(root, tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:  # noqa: BLE001 - a full disk reaches us as OSError or as torch's RuntimeError
        if peer_lost(e):  # another rank failed (and says why): not this rank's save
            raise
        raise CheckpointError(_save_failed(root, tag, e)) from e
    _barrier()
    if rank0:
        mark_complete(os.path.join(root, tag), step)
        write_latest(root, tag)  # for zero_to_fp32.py and a tag-less engine.load_checkpoint; resume ignores it
        kept = None if keep_step is None else tag_for(keep_step)
        for old in complete_tags(output_dir)[:-keep_last] if keep_last > 0 else []:
            if old != kept:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return os.path.join(root, tag)


def _save_failed(root: str, tag: str, e: Exception) -> str:
    """What a failed save means for the run's files, with the free space (the usual cause)."""
    free = shutil.disk_usage(root).free if os.path.isdir(root) else None
    space = "" if free is None else f"; {free / 2**30:.2f} GiB free there" + (" (the disk is full)" if free < 2**26 else "")
    return (f"saving checkpoint {os.path.join(root, tag)} failed ({type(e).__name__}: {e}){space}. It has no {MARKER} "
            "marker, so resume skips it and the next save removes it; earlier checkpoints are untouched. Free space "
            "(or lower train.save_total_limit, or move output_dir) and rerun: train.resume_from_checkpoint=auto continues from the newest "
            "complete checkpoint.")


def resolve_resume(resume: str, output_dir: str) -> tuple[str, str] | None:
    """(checkpoint root, tag) to resume from, or None. ``auto``: the newest complete checkpoint."""
    if resume == "never":
        done, partial = step_tags(checkpoint_root(output_dir))
        if done or partial:  # keep_last keeps the highest steps: the new run's checkpoints would be the ones dropped
            raise CheckpointError(
                f"train.resume_from_checkpoint=never, but {checkpoint_root(output_dir)} holds checkpoints of an earlier run "
                f"({', '.join((done + partial)[-3:])}); this run's checkpoints would be mixed with them (and rotated "
                "away first). Use a new train.output_dir, remove that directory, or continue it with train.resume_from_checkpoint=auto")
        return None
    if resume == "auto":
        tags = complete_tags(output_dir)
        return (checkpoint_root(output_dir), tags[-1]) if tags else None
    path = os.path.abspath(resume)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker): its save was interrupted")
    return os.path.dirname(path), os.path.basename(path)


def check_resumed_step(step: int, max_steps: int, where: str) -> None:
    """A checkpoint past the run's end is refused: lowering max_steps does not undo the steps taken."""
    if step > max_steps:
        raise CheckpointError(f"{where} is at step {step}, past train.max_steps={max_steps}: that run already went "
                              "further. Raise train.max_steps, resume from an earlier checkpoint "
                              "(train.resume_from_checkpoint=<dir>), or start anew in another train.output_dir")


def check_resumed_batch(client: dict, global_batch: int, allowed: bool, where: str) -> None:
    """A resume must keep the global batch its checkpoint was trained with (recorded since 2026-11-25):
    the rows of a step depend on the step and the global batch, so another one would not continue the run."""
    saved = client.get("global_batch")
    if saved is None or saved == global_batch or allowed:
        return
    raise CheckpointError(f"{where} was trained with a global batch of {saved} rows per step; this run has "
                          f"{global_batch} (train.per_device_train_batch_size x train.gradient_accumulation_steps x ranks), so it "
                          f"would not continue that run. Choose them so that the product is {saved}, or set "
                          "train.allow_batch_change=true to go on with the new batch deliberately")


def check_files(tag_dir: str, world: int) -> None:
    """:func:`ds_scalora.checkpoint.preflight.check_tag` with the run's error type."""
    from ..checkpoint.deepspeed_files import CheckpointFileError
    from ..checkpoint.preflight import check_tag

    try:
        check_tag(tag_dir, world)
    except CheckpointFileError as e:
        raise CheckpointError(str(e)) from None


def load(engine, controller, root: str, tag: str) -> dict:
    """Restore a checkpoint on every rank (after :func:`check_files`); returns its client state."""
    check_files(os.path.join(root, tag), dist.get_world_size() if dist.is_initialized() else 1)
    loader = controller.load_checkpoint if controller is not None else engine.load_checkpoint
    try:
        path, client_state = loader(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds on damaged files
        if peer_lost(e):  # another rank failed (and says why): not a damaged file here
            raise
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} could not be loaded ({type(e).__name__}: {e}); "
                           "it is damaged: remove it, or resume from an older one with train.resume_from_checkpoint=<dir>") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {os.path.join(root, tag)}")
    return client_state or {}


def _barrier():
    if dist.is_initialized():
        dist.barrier()

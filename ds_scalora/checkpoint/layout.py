"""Where a checkpoint's parts lie: tag names, the completion marker, DeepSpeed's ``latest`` file, and
which slice of a flattened tensor each data-parallel rank owns.

A run writes ``<output_dir>/checkpoints/step00000042/`` (``engine.save_checkpoint`` plus the method's
per-rank shards, see :mod:`.shards`); rank 0 adds :data:`MARKER` only after every rank has written, so a
directory without it is an interrupted save.
"""

from __future__ import annotations

import os

MARKER = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
TAG_PREFIX = "step"
LATEST = "latest"  # DeepSpeed's file naming the newest tag of a save_dir
TRAINER_STATE = "ds_scalora_state.pt"  # ScaLoRATrainer's merge state in a checkpoint without DeepSpeed
ELALORA_TRAINER_STATE = "ds_elalora_state.pt"  # ElaLoRACallback's masks and history in a Trainer checkpoint


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, MARKER))


def mark_complete(tag_dir: str, step: int) -> None:
    """Write the marker atomically (rank 0, after every rank has saved)."""
    tmp = os.path.join(tag_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
    os.replace(tmp, os.path.join(tag_dir, MARKER))


def write_latest(root: str, tag: str) -> None:
    """Point DeepSpeed's ``latest`` at a complete tag (atomically), so that ``zero_to_fp32.py`` and
    ``engine.load_checkpoint(root)`` find it without ``--tag``; resume itself goes by the marker."""
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(root, LATEST))


def step_tags(root: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) step tags under a checkpoints directory, oldest first."""
    if not os.path.isdir(root):
        return [], []
    tags = sorted(t for t in os.listdir(root) if t.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(root, t)))
    done = [t for t in tags if is_complete(os.path.join(root, t))]
    return done, [t for t in tags if t not in done]


def latest_tag(save_dir: str) -> str:
    """The tag DeepSpeed's ``latest`` file names; FileNotFoundError naming the fix when there is none."""
    latest = os.path.join(save_dir, LATEST)
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{save_dir} has no '{LATEST}' file: pass the checkpoint tag explicitly")
    with open(latest) as f:
        return f.read().strip()


def piece_numel(numel: int, world: int) -> int:
    """Elements in each rank's piece of a flattened tensor split over ``world`` ranks: ``ceil(numel/world)``
    (ZeRO-3's partitioning rule, which the method shards follow at every stage)."""
    return -(-numel // world)


def piece_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s piece; the last ranks' pieces may be short or empty."""
    size = piece_numel(numel, world)
    start = min(size * rank, numel)
    return start, min(start + size, numel)

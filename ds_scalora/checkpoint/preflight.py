"""What a checkpoint must pass before anything of it is loaded for a resume.

DeepSpeed's ``engine.load_checkpoint`` (0.19.8) reads its files with ``torch.load(weights_only=False)``:
an object planted in any of them would run code on every rank. So every ``.pt`` file of the tag is read
first as plain data (:func:`.deepspeed_files.load`, ``weights_only`` with DeepSpeed's few value classes
allowed, memory-mapped so that tensors are not read), on every rank, which also makes a damaged file
that only one rank would read an error every rank reports. The checkpoint must also have been written
at this run's number of data-parallel ranks.
"""

from __future__ import annotations

import os

from . import shards
from .deepspeed_files import CheckpointFileError, load


def check_tag(tag_dir: str, world: int) -> None:
    """Raise :class:`CheckpointFileError` naming the file, or the reshard command, when the tag is unfit."""
    if not os.path.isdir(tag_dir):
        raise CheckpointFileError(f"{tag_dir} is not a checkpoint directory")
    names = sorted(n for n in os.listdir(tag_dir) if n.endswith(".pt"))
    for name in names:
        try:
            load(os.path.join(tag_dir, name), mmap=True)
        except CheckpointFileError as e:
            raise CheckpointFileError(f"resume refused: {e}") from None
    optim = [n for n in names if n.endswith("_optim_states.pt") and "zero_pp_rank_" in n]
    saved = len(optim) or None
    other = next((name for name in (shards.other_world(tag_dir, kind, world) for kind in shards.KINDS) if name), None)
    if (saved is not None and saved != world) or other:
        written = f"{saved} data-parallel ranks" if saved and saved != world else f"another world size ({other})"
        raise CheckpointFileError(f"{tag_dir} was written at {written}; this run has {world}. Convert it first: "
                                  f"python tools/convert.py reshard {tag_dir} NEW_DIR --world {world}, then resume "
                                  "from NEW_DIR with the same global batch (micro batch x gradient accumulation x ranks)")

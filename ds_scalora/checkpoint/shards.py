"""The method shards a checkpoint holds beside DeepSpeed's files: their names, their discovery, and
their records (typed, with a schema version).

ScaLoRA and ElaLoRA keep state DeepSpeed does not know: each data-parallel rank writes one file
``ds_<kind>_rank<k>_of<N>.pt`` into the tag directory. A record read back is checked field by field: a
file written before the schema existed (version 0, the same fields) is read; a newer version, another
kind or a missing field is refused with the reason.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import MISSING, dataclass, field, fields

import torch

from .deepspeed_files import CheckpointFileError, load

SCHEMA_VERSION = 2  # 2 (2026-12-01): ScaLoRAShard.weights; schema-1 shards are read with weights None
KINDS = ("scalora", "elalora")
_PATTERN = re.compile(r"ds_(scalora|elalora)_rank(\d{5})_of(\d{5})\.pt$")


def shard_name(rank: int, world: int, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; one of {KINDS}")
    return f"ds_{kind}_rank{rank:05d}_of{world:05d}.pt"


def shard_path(tag_dir: str, rank: int, world: int, kind: str) -> str:
    return os.path.join(tag_dir, shard_name(rank, world, kind))


def _found(tag_dir: str, kind: str) -> dict[int, tuple[int, str]]:
    """rank -> (world, path) of every ``kind`` shard in ``tag_dir``."""
    out = {}
    for path in glob.glob(os.path.join(tag_dir, f"ds_{kind}_rank*_of*.pt")):
        m = _PATTERN.search(os.path.basename(path))
        if m and m.group(1) == kind:
            out[int(m.group(2))] = (int(m.group(3)), path)
    return out


def find(tag_dir: str, kind: str, world: int) -> list[str]:
    """Paths of the ``kind`` shards, one per rank of ``world`` (empty when the method wrote none);
    shards of another world size or a missing rank raise :class:`CheckpointFileError`."""
    found = _found(tag_dir, kind)
    if not found:
        return []
    worlds = {w for w, _ in found.values()}
    if worlds != {world}:
        raise CheckpointFileError(f"{tag_dir}: {kind} shards written for {sorted(worlds)} ranks, DeepSpeed files "
                                  f"for {world}")
    missing = [r for r in range(world) if r not in found]
    if missing:
        raise CheckpointFileError(f"{tag_dir}: missing {kind} shard {shard_name(missing[0], world, kind)}")
    return [found[r][1] for r in range(world)]


def read_scalora(tag_dir: str, world: int) -> list[ScaLoRAShard]:
    """Every rank's ScaLoRA shard of ``tag_dir`` in rank order (empty when ScaLoRA wrote none), checked to
    list the same adapted layers."""
    paths = find(tag_dir, "scalora", world)
    records = [read(p, "scalora", mmap=True) for p in paths]
    for p, s in zip(paths, records):
        if s.layers != records[0].layers or len(s.merge_state) != len(s.layers):
            raise CheckpointFileError(f"{p} lists other adapted layers than the other shards")
    return records


def other_world(tag_dir: str, kind: str, world: int) -> str | None:
    """The name of a ``kind`` shard written for a world size other than ``world``, if any (for errors)."""
    names = sorted(os.path.basename(p) for w, p in _found(tag_dir, kind).values() if w != world)
    return names[0] if names else None


@dataclass
class ScaLoRAShard:
    """One rank's ScaLoRA state: the run's counters and config, and this rank's piece of every layer's
    merge state (the low-precision remainder; None under a policy without one) and its sketches."""

    config: dict
    totals: dict
    world: int
    layers: list
    rank: int
    merge_state: list
    sketches: dict = field(default_factory=dict)
    # this rank's slice of every adapted frozen weight, merges included (ds_scalora.zero.weight_slice order),
    # or None; written by ScaLoRACallback, whose host Trainer may save DeepSpeed checkpoints without frozen
    # parameters (schema 2; a schema-1 shard has none)
    weights: list | None = None
    kind = "scalora"


@dataclass
class ElaLoRAShard:
    """One rank's ElaLoRA importance averages (``ema["i/F"]``: layer i, factor F, this rank's piece)."""

    layers: list
    ema: dict
    kind = "elalora"


RECORDS = {"scalora": ScaLoRAShard, "elalora": ElaLoRAShard}


def write(path: str, record) -> None:
    """Save a record atomically (``.tmp`` then rename), stamped with its kind and schema version."""
    data = {"schema": SCHEMA_VERSION, "kind": record.kind, **{f.name: getattr(record, f.name) for f in fields(record)}}
    torch.save(data, path + ".tmp")
    os.replace(path + ".tmp", path)


def read(path: str, kind: str, mmap: bool = False):
    """The record in ``path``, checked against ``kind`` and the schema; errors name the file and the fix."""
    data = load(path, mmap=mmap)
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path} is not a ds-scalora {kind} shard")
    version = data.get("schema", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointFileError(f"{path} has shard schema {version!r}; this ds-scalora reads up to {SCHEMA_VERSION}: "
                                  "it was written by a newer version; upgrade ds-scalora to read it")
    found = data.get("kind", kind)
    if found != kind:
        raise CheckpointFileError(f"{path} holds {found} state where {kind} state was expected")
    cls = RECORDS[kind]
    optional = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
    missing = [f.name for f in fields(cls) if f.name not in data and f.name not in optional]
    if missing:
        raise CheckpointFileError(f"{path}: {kind} shard without {', '.join(missing)}: the file is damaged or not "
                                  "a ds-scalora shard")
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

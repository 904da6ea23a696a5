"""Writing one checkpoint tag's files again for another data-parallel world size (DeepSpeed 0.19.8).

The reading side is :mod:`ds_scalora.zero.checkpoint_files`; this module builds, from a
:class:`~ds_scalora.zero.checkpoint_files.ZeroCheckpoint` written at N ranks, the dictionaries that
DeepSpeed and ds_scalora would have written at M ranks, so that ``engine.load_checkpoint`` (rigid,
non-elastic path, ``load_from_fp32_weights`` true, DeepSpeed's default) and ``ZeroScaLoRA.load_shard``
load them unchanged at M ranks.

ZeRO-1/2 (``deepspeed/runtime/zero/stage_1_and_2.py``): per optimizer group, the trainable parameters
are laid end to end (with ``param_alignment_paddings`` between them, independent of the world size)
into one flat tensor of ``L`` elements, padded to a multiple of ``2·N`` and cut into N equal partitions.
Each rank's file holds its partition of the fp32 masters without the trailing padding
(``single_partition_of_fp32_groups``), the torch optimizer's state for that partition *with* the
padding (``base_optimizer_state``: ``exp_avg``, ``exp_avg_sq`` of the padded size, ``step``),
``group_paddings`` (the padding inside this rank's partition), ``partition_count`` and
``param_slice_mappings`` (each parameter's fragment in the partition). Concatenating the unpadded
parts over the N ranks gives the L elements back; they are cut again for M ranks the same way.

ScaLoRA's shards (``ds_scalora_rankNNNNN_ofNNNNN.pt``): ``merge_state[j]`` is the precision policy's
state for rank k's slice ``[k·ceil(numel/N), ...)`` of layer j's flattened frozen weight (or None);
``sketches`` holds layer i's sketch on rank ``i mod N``. Both are re-cut for M.

Not supported (refused with :class:`ReshardError`): ZeRO-3 (per-rank model states and
``fp32_flat_groups`` in another layout), ZeRO-0 / BF16_Optimizer files, checkpoints written with
``elastic_checkpoint`` or the unpadded legacy layout, MoE groups, and ElaLoRA's importance shards.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .checkpoint_files import CheckpointFileError, ZeroCheckpoint, load

NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: "4-byte alignment/sizeof(fp16) = 2"


class ReshardError(CheckpointFileError):
    """A checkpoint this tool cannot bring to another world size; the message says why."""


def _fragment_address(numel: int, start: int):
    from deepspeed.utils.tensor_fragment import fragment_address

    return fragment_address(numel=numel, start=start)


def check_supported(ckpt: ZeroCheckpoint) -> None:
    if ckpt.stage not in (1, 2):
        raise ReshardError(f"{ckpt.dir} is a ZeRO-{ckpt.stage} checkpoint; changing the world size is supported "
                           "for ZeRO-1 and ZeRO-2 only")
    for r in range(ckpt.world):
        osd = ckpt.optim(r)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base:
            raise ReshardError(f"{ckpt.optim_files[r]} was written with zero_optimization.elastic_checkpoint; only "
                               "the default (rigid) layout is supported")
        if "param_alignment_paddings" not in osd or "single_partition_of_fp32_groups" not in osd:
            raise ReshardError(f"{ckpt.optim_files[r]} lacks param_alignment_paddings: written by another DeepSpeed "
                               "version than the pinned 0.19.8")
        pc = osd["partition_count"]
        if any(int(c) != ckpt.world for c in (pc if isinstance(pc, list) else [pc])):
            raise ReshardError(f"{ckpt.optim_files[r]}: partition_count {pc} differs from the data-parallel world "
                               f"size {ckpt.world} (MoE / expert groups are not supported)")


def _group_layout(ckpt: ZeroCheckpoint, group: int) -> tuple[int, list[tuple[str, int, int]]]:
    """(L, [(name, offset, numel)]) of one group's flat space, without the world-size padding."""
    osd = ckpt.optim(0)["optimizer_state_dict"]
    paddings = osd["param_alignment_paddings"][group]
    entries, offset = [], 0
    for i, (name, shape) in enumerate(ckpt.param_shapes[group].items()):
        n = math.prod(shape)
        entries.append((name, offset, n))
        offset += n + paddings[i]
    return offset, entries


def _cut(total: int, world: int) -> int:
    """Partition size of a flat group of ``total`` elements at ``world`` ranks (DeepSpeed's alignment)."""
    alignment = NCCL_START_ALIGNMENT_FACTOR * world
    aligned = math.ceil(total / alignment) * alignment
    return aligned // world


def optimizer_files(ckpt: ZeroCheckpoint, world: int) -> list[dict]:
    """The M per-rank ``*_optim_states.pt`` dictionaries of a ZeRO-1/2 checkpoint re-cut for ``world`` ranks."""
    check_supported(ckpt)
    first = ckpt.optim(0)
    osd0 = first["optimizer_state_dict"]
    n_groups = len(osd0["single_partition_of_fp32_groups"])
    # whole (unpartitioned) flat tensors per group: masters and every tensor optimizer state
    masters, states, scalars, layouts = [], [], [], []
    for g in range(n_groups):
        total, entries = _group_layout(ckpt, g)
        parts = [ckpt.optim(r)["optimizer_state_dict"]["single_partition_of_fp32_groups"][g].reshape(-1)
                 for r in range(ckpt.world)]  # fmt: skip
        flat = torch.cat(parts)
        if flat.numel() != total:
            raise CheckpointFileError(f"{ckpt.dir}: group {g}'s fp32 partitions hold {flat.numel()} elements, "
                                      f"the parameter shapes need {total}: the files do not match")
        masters.append(flat)
        per_key, plain = {}, {}
        padded0 = parts[0].numel() + int(osd0["group_paddings"][g])  # rank 0's partition, with its padding
        for key, value in osd0["base_optimizer_state"]["state"][g].items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == padded0:
                pieces = []
                for r in range(ckpt.world):
                    v = ckpt.optim(r)["optimizer_state_dict"]["base_optimizer_state"]["state"][g][key].reshape(-1)
                    pieces.append(v[: parts[r].numel()])  # strip this rank's partition padding
                per_key[key] = torch.cat(pieces)
            else:  # 'step' and other per-group scalars: the same on every rank
                plain[key] = value.clone() if torch.is_tensor(value) else value
        states.append(per_key)
        scalars.append(plain)
        layouts.append((total, entries))

    out = []
    for k in range(world):
        single, groups_padding, state, mappings = [], [], {}, []
        for g in range(n_groups):
            total, entries = layouts[g]
            size = _cut(total, world)
            lo, hi = min(k * size, total), min((k + 1) * size, total)
            single.append(masters[g][lo:hi].clone())
            groups_padding.append(size - (hi - lo))
            st = {}
            for key, value in scalars[g].items():
                st[key] = value.clone() if torch.is_tensor(value) else value
            for key, whole in states[g].items():
                padded = torch.zeros(size, dtype=whole.dtype)
                padded[: hi - lo] = whole[lo:hi]
                st[key] = padded
            # keep the saved key order (step first, as torch writes it)
            state[g] = {key: st[key] for key in osd0["base_optimizer_state"]["state"][g]}
            mapping = OrderedDict()
            for name, offset, n in entries:
                a, b = max(offset, k * size), min(offset + n, (k + 1) * size)
                if a < b:
                    mapping[name] = _fragment_address(b - a, a - k * size)
            mappings.append(mapping)
        osd = dict(osd0)
        osd["base_optimizer_state"] = {"state": state,
                                       "param_groups": [dict(pg) for pg in osd0["base_optimizer_state"]["param_groups"]]}  # fmt: skip
        osd["single_partition_of_fp32_groups"] = single
        osd["group_paddings"] = groups_padding
        osd["partition_count"] = [world] * n_groups if isinstance(osd0["partition_count"], list) else world
        osd["param_slice_mappings"] = mappings
        out.append({**first, "optimizer_state_dict": osd})
    return out


def model_states(ckpt: ZeroCheckpoint, world: int) -> dict:
    """``mp_rank_00_model_states.pt`` for ``world`` ranks (ZeRO-1/2: only ``dp_world_size`` and our own
    client state's world size change; the frozen weights in ``module`` are whole replicas)."""
    check_supported(ckpt)
    ms = dict(load(ckpt.model_files[0]))  # memory-mapped: torch.save pages the frozen weights through
    ms["dp_world_size"] = world
    if isinstance(ms.get("ds_scalora"), dict):
        ms["ds_scalora"] = {**ms["ds_scalora"], "world": world}
    return ms


def _split_slices(parts: list, world: int, what: str):
    """Re-cut per-rank slices ``[k·ceil(numel/N), ...)`` of one flattened tensor for ``world`` ranks."""
    if all(p is None for p in parts):
        return [None] * world
    if any(p is None for p in parts):
        raise CheckpointFileError(f"{what}: merge state present on some ranks only")
    whole = torch.cat([p.reshape(-1) for p in parts])
    numel = whole.numel()
    chunk = -(-numel // world)
    return [whole[min(chunk * k, numel) : min(chunk * k, numel) + chunk].clone() for k in range(world)]


def scalora_shards(paths: list[str], world: int) -> list[dict]:
    """ScaLoRA's per-rank shard dictionaries, re-cut for ``world`` ranks (index k: rank k)."""
    saved = [load(p, mmap=False) for p in paths]
    old = len(saved)
    layers = saved[0]["layers"]
    for p, s in zip(paths, saved):
        if s["layers"] != layers or len(s["merge_state"]) != len(layers):
            raise CheckpointFileError(f"{p} was written for other adapted layers than {paths[0]}")
    merge = [_split_slices([s["merge_state"][j] for s in saved], world, f"{paths[0]} layer {layers[j]}")
             for j in range(len(layers))]  # fmt: skip
    sketches = {}
    for r, s in enumerate(saved):
        for i, Y in (s.get("sketches") or {}).items():
            if int(i) % old != r:
                raise CheckpointFileError(f"{paths[r]} holds the sketch of layer {i}, which belongs to rank {int(i) % old}")
            sketches[int(i)] = Y
    out = []
    for k in range(world):
        shard = {key: v for key, v in saved[0].items() if key not in ("rank", "merge_state", "sketches")}
        shard.update(world=world, rank=k, merge_state=[m[k] for m in merge],
                     sketches={i: Y.clone() for i, Y in sketches.items() if i % world == k})
        out.append(shard)
    return out


def shard_name(rank: int, world: int) -> str:
    return f"ds_scalora_rank{rank:05d}_of{world:05d}.pt"

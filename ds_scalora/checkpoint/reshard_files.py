"""Writing one checkpoint tag's files again for another data-parallel world size (DeepSpeed 0.19.8).

The reading side is :mod:`.deepspeed_files` (and :mod:`.shards` for the method shards); this module
builds, from a :class:`~ds_scalora.checkpoint.deepspeed_files.ZeroCheckpoint` written at N ranks, the dictionaries that
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

ZeRO-3 (``deepspeed/runtime/zero/stage3.py``, ``_rigid_state_dict``): every parameter, trainable or
frozen, is padded to a multiple of N and rank k holds piece k of ``ceil(numel/N)`` elements. Each rank
has its own model-states file (``zero_pp_rank_k_mp_rank_00_model_states.pt``) whose
``frozen_param_fragments`` are its pieces of the frozen weights (the merged ones included); its optimizer
file holds ``fp32_flat_groups`` (per *sub-group*: its pieces of the trainable parameters laid end to
end, no other padding) and the torch optimizer's ``state_dict`` with one state entry per sub-group. The
sub-groups are cut by ``_create_fp16_sub_groups`` from the piece sizes and ``sub_group_size``; they are
recomputed for M.

ScaLoRA's shards (``ds_scalora_rankNNNNN_ofNNNNN.pt``): ``merge_state[j]`` is the precision policy's
state for rank k's slice ``[k·ceil(numel/N), ...)`` of layer j's flattened frozen weight (or None);
``sketches`` holds layer i's sketch on rank ``i mod N``. Both are re-cut for M. ElaLoRA's shards
(``ds_elalora_rankNNNNN_ofNNNNN.pt``): ``ema["i/F"]`` is the (importance, uncertainty) pair of rank k's
piece of layer i's factor F, wherever ZeRO put that piece; the pieces are joined and cut again along the
new layout.

ZeRO-0 (fp32; the only ZeRO-0 form ScaLoRA trains) keeps everything in one replicated file: only the
world size recorded in it and our shards change.

Not supported (refused with :class:`ReshardError`): BF16_Optimizer files (ZeRO-0 in bf16, which the
training entry point refuses), checkpoints written with ``elastic_checkpoint`` or the unpadded legacy
layout, MoE / expert groups.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch

from ..deepspeed_import import import_deepspeed
from ..methods.svd_layers import PEFT_NAMES
from . import shards
from .deepspeed_files import CheckpointFileError, ZeroCheckpoint, load, narrow_across
from .layout import piece_numel, piece_range

NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: "4-byte alignment/sizeof(fp16) = 2"


class ReshardError(CheckpointFileError):
    """A checkpoint this tool cannot bring to another world size; the message says why."""


def _fragment_address(numel: int, start: int):
    import_deepspeed()
    from deepspeed.utils.tensor_fragment import fragment_address

    return fragment_address(numel=numel, start=start)


def check_supported(ckpt: ZeroCheckpoint) -> None:
    if ckpt.stage not in (0, 1, 2, 3):
        raise ReshardError(f"{ckpt.dir} is a ZeRO-{ckpt.stage} checkpoint; changing the world size is supported "
                           "for ZeRO-0 (fp32), ZeRO-1, ZeRO-2 and ZeRO-3 only")
    if ckpt.stage == 0:
        return  # one replicated file; nothing per rank but our own shards
    if ckpt.stage == 3:
        _check_zero3(ckpt)
        return
    for r in range(ckpt.world):
        osd = ckpt.optim(r)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base:
            raise ReshardError(f"{ckpt.optim_files[r]} was written with zero_optimization.elastic_checkpoint; only "
                               "the default (rigid) layout is supported")
        if "param_alignment_paddings" not in osd or "single_partition_of_fp32_groups" not in osd:
            raise ReshardError(f"{ckpt.optim_files[r]} lacks param_alignment_paddings: written by another DeepSpeed "
                               "version than the tested 0.19.6 to 0.19.8")
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
    """The M per-rank ``*_optim_states.pt`` dictionaries of a checkpoint re-cut for ``world`` ranks."""
    check_supported(ckpt)
    if ckpt.stage == 0:
        return []  # the optimizer state is in the (replicated) model-states file
    if ckpt.stage == 3:
        return _zero3_optimizer_files(ckpt, world)
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


def _with_world(ms: dict, world: int) -> dict:
    ms = dict(ms)
    ms["dp_world_size"] = world
    for key in ("ds_scalora", "ds_elalora"):
        if isinstance(ms.get(key), dict):
            ms[key] = {**ms[key], "world": world}
    return ms


def model_state_files(ckpt: ZeroCheckpoint, world: int):
    """Yield (file name, dictionary) of every model-states file for ``world`` ranks, one at a time.

    ZeRO-0/1/2: one ``mp_rank_00_model_states.pt``; only ``dp_world_size`` and our client state's world
    size change (the frozen weights in ``module`` are whole replicas, paged through from the
    memory-mapped source). ZeRO-3: one file per rank, its ``frozen_param_fragments`` re-cut; memory is
    one new rank's share of the frozen weights.
    """
    check_supported(ckpt)
    if ckpt.stage != 3:
        yield os.path.basename(ckpt.model_files[0]), _with_world(load(ckpt.model_files[0]), world)
        return
    first = ckpt.model(0)
    for k in range(world):
        fragments = OrderedDict()
        for name, shape in first["frozen_param_shapes"].items():
            numel = math.prod(shape)
            old = [ckpt.model(r)["frozen_param_fragments"][name].reshape(-1) for r in range(ckpt.world)]
            fragments[name] = _piece(old, numel, world, k)
        ms = _with_world(first, world)
        ms["frozen_param_fragments"] = fragments
        yield f"zero_pp_rank_{k}_mp_rank_00_model_states.pt", ms


def _piece(parts: list, numel: int, world: int, k: int) -> torch.Tensor:
    """ZeRO-3's piece k (``ceil(numel/world)`` elements, zero padded) of the tensor whose first ``numel``
    elements are the concatenation of ``parts``."""
    lo, hi = piece_range(numel, world, k)
    out = torch.zeros(piece_numel(numel, world), dtype=parts[0].dtype)
    if hi > lo:
        out[: hi - lo] = narrow_across(parts, lo, hi - lo)
    return out


# -- ZeRO-3 -----------------------------------------------------------------------------------------


def _check_zero3(ckpt: ZeroCheckpoint) -> None:
    for r in range(ckpt.world):
        osd = ckpt.optim(r)["optimizer_state_dict"]
        if "fp32_flat_groups" not in osd or "optimizer_state_dict" not in osd:
            raise ReshardError(f"{ckpt.optim_files[r]} lacks fp32_flat_groups: written by another DeepSpeed "
                               "version than the tested 0.19.6 to 0.19.8, or with optimizer offload")
        if osd.get("ds_zero_partition_groups") is not None:
            raise ReshardError(f"{ckpt.optim_files[r]} uses expert (AutoEP) partition groups, which are not supported")
        if int(osd["partition_count"]) != ckpt.world:
            raise ReshardError(f"{ckpt.optim_files[r]}: partition_count {osd['partition_count']} differs from the "
                               f"data-parallel world size {ckpt.world}")
    for r in range(ckpt.world):
        if "frozen_param_fragments" not in ckpt.model(r):
            raise ReshardError(f"{ckpt.model_files[r]} holds no frozen_param_fragments (saved with "
                               "exclude_frozen_parameters): the merged weights are not in this checkpoint")


def _sub_groups(numels: list[int], world: int, sub_group_size: int) -> list[list[int]]:
    """Indices of a group's parameters per sub-group at ``world`` ranks (``_create_fp16_sub_groups``)."""
    sizes = [piece_numel(n, world) for n in numels]
    if sub_group_size >= sum(sizes):
        return [list(range(len(numels)))]
    out, current, size = [], [], 0
    for i, s in enumerate(sizes):
        current.append(i)
        size += s
        if size >= sub_group_size or i == len(sizes) - 1:
            out.append(current)
            current, size = [], 0
    return out


def _zero3_optimizer_files(ckpt: ZeroCheckpoint, world: int) -> list[dict]:
    first = ckpt.optim(0)
    osd0 = first["optimizer_state_dict"]
    inner0 = osd0["optimizer_state_dict"]
    zc = (first.get("ds_config") or {}).get("zero_optimization") or {}
    sub_group_size = int(float(zc.get("sub_group_size", 1_000_000_000)))
    entry0 = inner0["state"][min(inner0["state"])] if inner0["state"] else {}
    flat0 = osd0["fp32_flat_groups"][0].numel() if osd0["fp32_flat_groups"] else -1
    moment_keys = [key for key, v in entry0.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == flat0]
    scalars = {key: v for key, v in entry0.items() if key not in moment_keys}
    groups = [list(shapes) for shapes in ckpt.param_shapes]
    whole = {name: {None: ckpt.master(name).reshape(-1), **{key: ckpt.moment(name, key).reshape(-1) for key in moment_keys}}
             for names in groups for name in names}  # fmt: skip
    cut = [_sub_groups([whole[n][None].numel() for n in names], world, sub_group_size) for names in groups]
    out = []
    for k in range(world):
        flats, state, param_groups, s = [], {}, [], 0
        for g, names in enumerate(groups):
            pg = {key: v for key, v in inner0["param_groups"][g].items() if key != "params"}
            pg["params"] = []
            for members in cut[g]:
                chosen = [names[i] for i in members]
                flats.append(torch.cat([_piece([whole[n][None]], whole[n][None].numel(), world, k) for n in chosen]))
                st = {key: (v.clone() if torch.is_tensor(v) else v) for key, v in scalars.items()}
                for key in moment_keys:
                    st[key] = torch.cat([_piece([whole[n][key]], whole[n][key].numel(), world, k) for n in chosen])
                state[s] = {key: st[key] for key in entry0}
                pg["params"].append(s)
                s += 1
            param_groups.append(pg)
        osd = dict(osd0)
        osd["partition_count"] = world
        osd["optimizer_state_dict"] = {"state": state, "param_groups": param_groups}
        osd["fp32_flat_groups"] = flats
        out.append({**first, "optimizer_state_dict": osd})
    return out


# -- where each rank's piece of a trainable parameter lies, at any world size ------------------------


def piece_ranges(ckpt: ZeroCheckpoint, world: int) -> dict[str, list[tuple[int, int]]]:
    """name -> [(start, numel)] of rank k's piece of each trainable parameter (elements of the flattened
    parameter) at ``world`` ranks, in this checkpoint's ZeRO layout; numel 0 where a rank holds none."""
    out = {}
    if ckpt.stage == 0:  # every rank holds every parameter whole
        return {name: [(0, math.prod(shape))] * world for shapes in ckpt.param_shapes for name, shape in shapes.items()}
    if ckpt.stage == 3:
        for shapes in ckpt.param_shapes:
            for name, shape in shapes.items():
                n = math.prod(shape)
                out[name] = [(lo, hi - lo) for lo, hi in (piece_range(n, world, k) for k in range(world))]
        return out
    for g in range(len(ckpt.param_shapes)):
        total, entries = _group_layout(ckpt, g)
        size = _cut(total, world)
        for name, offset, n in entries:
            ranges = []
            for k in range(world):
                a, b = max(offset, k * size), min(offset + n, (k + 1) * size)
                ranges.append((a - offset, b - a) if a < b else (0, 0))
            out[name] = ranges
    return out


def _split_slices(parts: list, world: int, what: str):
    """Re-cut per-rank slices ``[k·ceil(numel/N), ...)`` of one flattened tensor for ``world`` ranks."""
    if all(p is None for p in parts):
        return [None] * world
    if any(p is None for p in parts):
        raise CheckpointFileError(f"{what}: merge state present on some ranks only")
    whole = torch.cat([p.reshape(-1) for p in parts])
    return [whole[slice(*piece_range(whole.numel(), world, k))].clone() for k in range(world)]


def scalora_shards(paths: list[str], world: int) -> list[shards.ScaLoRAShard]:
    """ScaLoRA's per-rank shard records, re-cut for ``world`` ranks (index k: rank k)."""
    saved = [shards.read(p, "scalora") for p in paths]
    old = len(saved)
    layers = saved[0].layers
    for p, s in zip(paths, saved):
        if s.layers != layers or len(s.merge_state) != len(layers):
            raise CheckpointFileError(f"{p} was written for other adapted layers than {paths[0]}")
    merge = [_split_slices([s.merge_state[j] for s in saved], world, f"{paths[0]} layer {layers[j]}")
             for j in range(len(layers))]  # fmt: skip
    sketches = {}
    for r, s in enumerate(saved):
        for i, Y in (s.sketches or {}).items():
            if int(i) % old != r:
                raise CheckpointFileError(f"{paths[r]} holds the sketch of layer {i}, which belongs to rank {int(i) % old}")
            sketches[int(i)] = Y
    weights = None  # the frozen weights' slices, when the shards carry them (ScaLoRACallback): cut like the state
    if all(s.weights is not None for s in saved):
        weights = [_split_slices([s.weights[j] for s in saved], world, f"{paths[0]} layer {layers[j]} weight")
                   for j in range(len(layers))]  # fmt: skip
    first = saved[0]
    return [shards.ScaLoRAShard(config=first.config, totals=first.totals, world=world, layers=layers, rank=k,
                                merge_state=[m[k] for m in merge],
                                sketches={i: Y.clone() for i, Y in sketches.items() if i % world == k},
                                weights=None if weights is None else [w[k] for w in weights])
            for k in range(world)]  # fmt: skip


def elalora_shards(ckpt: ZeroCheckpoint, paths: list[str], world: int,
                   adapter: str = "default") -> list[shards.ElaLoRAShard]:
    """ElaLoRA's per-rank importance records, re-cut for ``world`` ranks along the new ZeRO layout."""
    saved = [shards.read(p, "elalora") for p in paths]
    layers = saved[0].layers
    for p, s in zip(paths, saved):
        if s.layers != layers:
            raise CheckpointFileError(f"{p} was written for other adapted layers than {paths[0]}")
    old, new = piece_ranges(ckpt, ckpt.world), piece_ranges(ckpt, world)
    keys = sorted({key for s in saved for key in s.ema}, key=_natural_key)
    out = [shards.ElaLoRAShard(layers=layers, ema={}) for _ in range(world)]
    for key in keys:
        i, factor = key.split("/")
        name = f"{layers[int(i)]}.{PEFT_NAMES[factor]}.{adapter}"
        if name not in old:
            raise CheckpointFileError(f"{paths[0]}: importance entry {key} names {name}, which is not a trainable "
                                      "parameter of this checkpoint")
        numel = ckpt.where[name][2].numel()  # not the pieces' sum: ZeRO-0 pieces are whole replicas
        whole = torch.zeros(2, numel)
        for r, s in enumerate(saved):
            start, n = old[name][r]
            if n == 0:
                continue
            if key not in s.ema or s.ema[key].shape[-1] != n:
                raise CheckpointFileError(f"{paths[r]}: importance entry {key} is missing or has another size than "
                                          f"this rank's piece of {name} ({n} elements)")
            whole[:, start : start + n] = s.ema[key].reshape(2, n)
        for k in range(world):
            start, n = new[name][k]
            if n:
                out[k].ema[key] = whole[:, start : start + n].clone()
    return out


def _natural_key(key: str):
    i, factor = key.split("/")
    return int(i), factor

"""Reading DeepSpeed's checkpoint *files* (not a live engine): the only module that knows their layout.

Tested against deepspeed 0.19.6 to 0.19.8 (OLDEST_DEEPSPEED, TESTED_DEEPSPEED below; ``ds_version`` of every file is checked). It reads
one tag directory written by ``engine.save_checkpoint`` (the method shards beside it: :mod:`.shards`)
tensor by tensor, so that a converter never holds more than one parameter's worth of data at a time:

* files are opened with ``torch.load(mmap=True, weights_only=True)``: nothing pickled is executed (a
  few plain DeepSpeed value classes are allow-listed, see :data:`SAFE_GLOBALS`) and tensors are paged
  in from disk only when touched;
* :meth:`ZeroCheckpoint.frozen` gives a frozen weight in its stored dtype: ZeRO-1/2 from
  ``module`` of ``mp_rank_00_model_states.pt`` (``zero_to_fp32`` leaves them out at stage 1), ZeRO-3
  from the ``frozen_param_fragments`` of every rank's model-states file;
* ZeRO-0 (fp32 only: ScaLoRA refuses ZeRO-0 in bf16/fp16) writes one ``mp_rank_00_model_states.pt``
  with every parameter in ``module`` and the torch optimizer's state in ``optimizer``;
* :meth:`ZeroCheckpoint.master` gives a trainable parameter's fp32 master (and :meth:`moment` its Adam
  moments) from the per-rank optimizer files, following ``deepspeed/utils/zero_to_fp32.py``'s layouts
  (ZeRO-1/2: one flat partition per rank and group, parameters laid end to end with alignment
  padding; ZeRO-3: every parameter split in ``ceil(numel / N)`` pieces, piece k in rank k's flat group).

Damaged files (truncated, another world size, a missing rank) raise :class:`CheckpointFileError`
naming the file.
"""

from __future__ import annotations

import enum
import glob
import math
import os
import pickle
import re

import torch

from ..deepspeed_import import import_deepspeed
from .layout import piece_numel

# The DeepSpeed versions the ZeRO equivalence tests pass with (pyproject.toml pins this range; zero.state_access
# checks the live one). Older ones fail them: 0.18.9 and 0.19.0-0.19.5 differ at ZeRO-0 fp32 with clipping and
# with ReLoRA under ZeRO-2 (measured 2026-12-01, tests/test_zero_single_rank.py); 0.19.8 is the newest released.
OLDEST_DEEPSPEED = "0.19.6"
TESTED_DEEPSPEED = "0.19.8"  # the newest tested, which a fresh install takes


def supported_deepspeed(version: str) -> bool:
    """Whether ``version`` lies in [OLDEST_DEEPSPEED, TESTED_DEEPSPEED] (local build tags ignored)."""
    from packaging.version import Version

    v = Version(version).release
    return Version(OLDEST_DEEPSPEED).release <= v <= Version(TESTED_DEEPSPEED).release


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing, truncated or does not match the others; names the file."""


def _safe_globals() -> list:
    """DeepSpeed value classes found in optimizer files (plain attribute bags, no code on load)."""
    out = []
    try:
        import_deepspeed()  # first: without mlflow
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return out


def _enum_member(cls, name: str):
    """``getattr`` as the unpickler may call it: only for a member of an allowed enum. Python 3.11.0 to 3.11.4
    (Debian 12's system Python is 3.11.2) pickle an enum member as ``getattr(cls, name)``, so DeepSpeed's
    optimizer files written there hold ZeroStageEnum in that form; anything else is refused."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in SAFE_GLOBALS and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not a member of an allowed enum")


SAFE_GLOBALS = _safe_globals()
# torch reads a (callable, "module.name") entry as "load this global as that callable"
_LOAD_GLOBALS = [*SAFE_GLOBALS, (_enum_member, "builtins.getattr")]


def load(path: str, mmap: bool = True) -> dict:
    """``torch.load`` without executing pickled code, memory-mapped; errors name the file."""
    if not os.path.isfile(path):
        raise CheckpointFileError(f"missing checkpoint file {path}")
    try:
        with torch.serialization.safe_globals(_LOAD_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zipfile, pickle and torch raise many kinds on damaged files
        text = str(e)
        if "Unsupported global" in text or "Unsupported operand" in text:
            what = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")[:200]
            raise CheckpointFileError(f"{path} holds a pickled object that is not plain data ({what}): loading it "
                                      "would run code, so it is refused. Use a checkpoint you wrote yourself, or "
                                      "inspect this one in isolation") from None
        raise CheckpointFileError(f"cannot read {path} ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''}); "
                                  "the file is truncated, damaged or not a DeepSpeed checkpoint file") from None


def _natural(text: str):
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def _files(tag_dir: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(tag_dir, pattern)), key=_natural)


def narrow_across(parts: list[torch.Tensor], offset: int, length: int) -> torch.Tensor:
    """Elements ``[offset, offset + length)`` of the concatenation of ``parts`` (copies only those)."""
    out, pos = [], 0
    for t in parts:
        n = t.numel()
        lo, hi = max(offset, pos), min(offset + length, pos + n)
        if lo < hi:
            out.append(t.view(-1)[lo - pos : hi - pos])
        pos += n
    got = sum(t.numel() for t in out)
    if got != length:
        raise CheckpointFileError(f"flat partitions hold {pos} elements, {offset + length} needed: files do not match")
    return out[0].clone() if len(out) == 1 else torch.cat(out)


class ZeroCheckpoint:
    """One DeepSpeed checkpoint tag directory, read lazily."""

    def __init__(self, tag_dir: str):
        self.dir = tag_dir
        optim = _files(tag_dir, "*zero_pp_rank_*_optim_states.pt")
        if not optim:
            single = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
            if not os.path.isfile(single):
                raise CheckpointFileError(f"{tag_dir} holds neither '*_optim_states.pt' files nor "
                                          "mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
            self._init_stage0(single)
            return
        self.optim_files = optim
        self._optim = [None] * len(optim)
        first = self.optim(0)
        osd = first["optimizer_state_dict"]
        self.stage = int(osd["zero_stage"])
        pc = osd["partition_count"]
        self.world = max(pc) if isinstance(pc, list) else int(pc)
        if self.world != len(optim):
            raise CheckpointFileError(f"{optim[0]} says {self.world} data-parallel ranks but {tag_dir} holds "
                                      f"{len(optim)} optimizer files: a rank's file is missing or left over")
        if self.stage == 3:
            self.model_files = [os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(self.world)]
        else:
            self.model_files = [os.path.join(tag_dir, "mp_rank_00_model_states.pt")]
        self._model = [None] * len(self.model_files)
        ms = self.model(0)
        self._check_version(ms)
        self.param_shapes = [dict(g) for g in ms["param_shapes"]]  # trainable, per optimizer group
        self.frozen_shapes = dict(ms.get("frozen_param_shapes") or {})
        if self.stage <= 2 and not self.frozen_shapes:  # ZeRO-1 does not write them: take ``module``
            trainable = {n for g in self.param_shapes for n in g}
            self.frozen_shapes = {n: t.shape for n, t in ms["module"].items()
                                  if n not in trainable and n not in set(ms.get("buffer_names", []))}  # fmt: skip
        self.shared = dict(ms.get("shared_params") or {})
        self._locate_trainable()

    def _check_version(self, ms: dict) -> None:
        version = ms.get("ds_version")
        if not (isinstance(version, str) and supported_deepspeed(version)):
            import warnings

            warnings.warn(f"{self.model_files[0]} was written by deepspeed=={version}; this reader is tested "
                          f"against {OLDEST_DEEPSPEED} to {TESTED_DEEPSPEED}", stacklevel=3)

    def _init_stage0(self, path: str) -> None:
        """ZeRO-0 in fp32: one file, ``module`` holds every parameter (the trainable ones are their own
        fp32 masters) and ``optimizer`` the torch optimizer's state, indexed in the order of its groups;
        the trainable parameters are the adapter's (``.lora_`` names) or, for full fine-tuning, all."""
        self.stage, self.optim_files, self.model_files, self._model, self._optim = 0, [], [path], [None], []
        ms = self.model(0)
        self._check_version(ms)
        self.world = int(ms.get("dp_world_size") or 1)
        osd = ms.get("optimizer")
        if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
            raise CheckpointFileError(f"{path} holds no optimizer state: a ZeRO-0 checkpoint saved without it "
                                      "(or another kind of file) cannot be converted")
        module, buffers = ms["module"], set(ms.get("buffer_names") or [])
        names = [n for n in module if n not in buffers]
        indices = [i for g in osd["param_groups"] for i in g["params"]]
        adapters = [n for n in names if ".lora_" in n]
        trainable = adapters if len(adapters) == len(indices) else names if len(names) == len(indices) else None
        if trainable is None:
            raise CheckpointFileError(f"{path}: the optimizer holds {len(indices)} parameters, which are neither the "
                                      f"{len(adapters)} adapter tensors nor all {len(names)} parameters")
        self._stage0_index = dict(zip(trainable, indices))
        self.param_shapes = [{n: module[n].shape for n in trainable}]
        self.frozen_shapes = {n: module[n].shape for n in names if n not in self._stage0_index}
        self.shared = {}
        self.where = {n: (0, 0, module[n].shape) for n in trainable}

    # -- files ------------------------------------------------------------------------------------

    def optim(self, rank: int) -> dict:
        if self._optim[rank] is None:
            self._optim[rank] = load(self.optim_files[rank])
        return self._optim[rank]

    def model(self, rank: int = 0) -> dict:
        if self._model[rank] is None:
            self._model[rank] = load(self.model_files[rank])
        return self._model[rank]

    def scalora_shards(self) -> list:
        """ScaLoRA's shard of every rank, beside DeepSpeed's files (:func:`.shards.read_scalora`)."""
        from .shards import read_scalora  # shards reads its files through this module

        return read_scalora(self.dir, self.world)

    def client_state(self) -> dict:
        """What the training loop passed as ``client_state`` (the non-DeepSpeed top-level keys)."""
        ds_keys = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                   "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version"}  # fmt: skip
        return {k: v for k, v in self.model(0).items() if k not in ds_keys}

    # -- frozen weights ---------------------------------------------------------------------------

    def frozen(self, name: str) -> torch.Tensor:
        """A frozen parameter, whole, in the dtype it was stored in."""
        shape = torch.Size(self.frozen_shapes[name])
        if self.stage <= 2:  # ZeRO-0 too: whole tensors in ``module``
            return self.model(0)["module"][name].view(shape)
        parts = []
        for r in range(self.world):
            frags = self.model(r).get("frozen_param_fragments")
            if frags is None or name not in frags:
                raise CheckpointFileError(f"{self.model_files[r]} has no frozen fragment of {name}")
            parts.append(frags[name].view(-1))
        return narrow_across(parts, 0, shape.numel()).view(shape)

    # -- trainable parameters ---------------------------------------------------------------------

    def _locate_trainable(self) -> None:
        """Where each trainable parameter starts in its group's flat space (ZeRO-1/2) or partitions (ZeRO-3)."""
        self.where: dict[str, tuple[int, int, torch.Size]] = {}
        osd = self.optim(0)["optimizer_state_dict"]
        if self.stage <= 2:
            paddings = osd.get("param_alignment_paddings")
            for g, shapes in enumerate(self.param_shapes):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self.where[name] = (g, offset, torch.Size(shape))
                    offset += math.prod(shape)
                    if paddings is not None:
                        offset += paddings[g][i]
        else:
            offset = 0
            for shapes in self.param_shapes:
                for name, shape in shapes.items():
                    self.where[name] = (0, offset, torch.Size(shape))
                    offset += piece_numel(math.prod(shape), self.world)

    def trainable_names(self) -> list[str]:
        return list(self.where)

    def _flat(self, rank: int, group: int, state: str | None) -> list[torch.Tensor]:
        """Rank ``rank``'s flat fp32 tensors (masters, or an optimizer moment) of one group."""
        osd = self.optim(rank)["optimizer_state_dict"]
        if self.stage <= 2:
            if state is None:
                return [osd["single_partition_of_fp32_groups"][group]]
            return [osd["base_optimizer_state"]["state"][group][state]]
        if state is None:
            return list(osd["fp32_flat_groups"])
        inner = osd["optimizer_state_dict"]["state"]
        return [inner[k][state] for k in sorted(inner)]

    def master(self, name: str) -> torch.Tensor:
        """The fp32 master of a trainable parameter, whole."""
        return self._gather(name, None)

    def moment(self, name: str, state: str) -> torch.Tensor:
        """An optimizer state tensor (``exp_avg``, ``exp_avg_sq``) of a trainable parameter, whole."""
        return self._gather(name, state)

    def _gather(self, name: str, state: str | None) -> torch.Tensor:
        if self.stage == 0:
            if state is None:
                return self.model(0)["module"][name]
            return self.model(0)["optimizer"]["state"][self._stage0_index[name]][state]
        group, offset, shape = self.where[name]
        numel = shape.numel()
        if self.stage <= 2:
            parts = []
            for r in range(self.world):
                flat = self._flat(r, group, state)[0]
                parts.append(flat)
            if state is not None:  # the inner optimizer's flats keep the partition padding: strip it
                sizes = [self._flat(r, group, None)[0].numel() for r in range(self.world)]
                parts = [p.view(-1)[:s] for p, s in zip(parts, sizes)]
            return narrow_across(parts, offset, numel).view(shape)
        n = piece_numel(numel, self.world)
        parts = [narrow_across(self._flat(r, group, state), offset, n) for r in range(self.world)]
        return torch.cat(parts)[:numel].view(shape)

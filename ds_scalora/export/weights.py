"""Every parameter's effective value, one at a time: what the trained model really computes with.

For an adapted layer: the frozen weight with everything merged into it at the precision policy's full
precision (the stored weight plus, for ScaLoRA, each rank's slice of the policy state from the
``ds_scalora_rank*.pt`` shards), plus the adapter's delta from the fp32 masters. Other parameters: the
fp32 master when trained (``full``), else the stored frozen value. Nothing is held beyond the module
being produced (the checkpoint files are memory-mapped).
"""

from __future__ import annotations

import math
import re

import torch

from ..precision import get_policy
from ..checkpoint import shards as shard_files
from ..checkpoint.deepspeed_files import CheckpointFileError
from ..checkpoint.layout import piece_range
from .adapters import adapter_delta
from .source import RunSource, hf_name

_ADAPTER = re.compile(r"^(.*)\.(lora_[A-Za-z]+|ranknum)(\.[^.]+)?(\.weight)?$")


class EffectiveWeights:
    def __init__(self, source: RunSource):
        self.src = source
        ck = source.ckpt
        self.origin: dict[str, str] = {}  # HF name -> checkpoint name
        self.adapter: dict[str, dict[str, str]] = {}  # checkpoint module name -> {suffix: checkpoint name}
        for name in list(ck.frozen_shapes) + ck.trainable_names():
            m = _ADAPTER.match(name)
            if m:
                self.adapter.setdefault(m.group(1), {})[m.group(2)] = name
                continue
            self.origin[hf_name(name)] = name
        for module in self.adapter:
            weight = hf_name(module + ".base_layer.weight")
            if weight not in self.origin:
                raise CheckpointFileError(f"{ck.dir}: adapter on {module} but no base weight {module}.base_layer.weight")
        self.module_of = {hf_name(m + ".base_layer.weight"): m for m in self.adapter}
        transposed = source.transposed_modules() if self.adapter else set()
        self.transposed = {n for n in self.module_of if n.removesuffix(".weight") in transposed}
        self._shards = None

    # -- what there is --------------------------------------------------------------------------

    def names(self) -> list[str]:
        """HF parameter names, in checkpoint order, tied copies left out."""
        return [n for n, c in self.origin.items() if c not in self.src.ckpt.shared]

    def adapted(self) -> list[str]:
        """HF weight names of the adapted linear layers, in checkpoint order."""
        return [n for n in self.origin if n in self.module_of]

    def shape(self, name: str) -> torch.Size:
        ck, c = self.src.ckpt, self.origin[name]
        return torch.Size(ck.frozen_shapes[c]) if c in ck.frozen_shapes else ck.where[c][2]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    # -- values ---------------------------------------------------------------------------------

    def stored(self, name: str) -> torch.Tensor:
        """The parameter as the checkpoint stores it (frozen: its dtype; trainable: the fp32 master)."""
        ck, c = self.src.ckpt, self.origin[name]
        return ck.master(c) if c in ck.where else ck.frozen(c)

    def effective(self, name: str) -> torch.Tensor:
        """The effective value: float64 for adapted layers, else the stored value."""
        if name not in self.module_of:
            return self.stored(name)
        delta = adapter_delta(self.adapter_tensors(name), self.src.method)  # d_out x d_in
        return self.merged_frozen(name) + (delta.T if name in self.transposed else delta)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter of the layer whose weight is ``name``, by PEFT suffix (``lora_A``, ...), as stored
        (trainable: the fp32 master)."""
        ck = self.src.ckpt
        return {s: (ck.master(c) if c in ck.where else ck.frozen(c)) for s, c in self.adapter[self.module_of[name]].items()}

    def update_out_in(self, name: str) -> torch.Tensor:
        """:meth:`update` as d_out x d_in (the layout of LoRA's ``B A``), whatever the layer stores."""
        update = self.update(name)
        return update.T if name in self.transposed else update

    def update(self, name: str) -> torch.Tensor:
        """Effective minus the base model's weight, float64: everything training changed in a layer."""
        return (self.effective(name).double() - self.src.base_weight(name).double()).detach()

    def merged_frozen(self, name: str) -> torch.Tensor:
        """The frozen weight of an adapted layer with all merges, at full precision (float64 copy)."""
        W = self.stored(name)
        module = self.module_of.get(name)
        shards = self.shards()
        if module is None or not shards or module not in shards[0].layers:
            return W.double()
        index = shards[0].layers.index(module)
        policy = get_policy(shards[0].config["precision"], W.dtype)
        flat = W.reshape(-1)
        n, world = flat.numel(), len(shards)
        out = torch.empty(n, dtype=torch.float64)
        for r, shard in enumerate(shards):
            lo, hi = piece_range(n, world, r)
            state = shard.merge_state[index]
            if state is not None and state.numel() != hi - lo:
                raise CheckpointFileError(f"{self.src.ckpt.dir}: ScaLoRA shard of rank {r} holds {state.numel()} "
                                          f"elements of {module}, its slice has {hi - lo}: shards do not match")
            # ScaLoRACallback's shards carry the rank's slice of the merged weight itself (its host Trainer's
            # checkpoint has no frozen weights): it replaces the stored (base) values
            own = shard.weights[index] if shard.weights is not None else None
            stored = flat[lo:hi] if own is None else own.view(-1).to(W.dtype)
            out[lo:hi] = policy.value(stored, None if state is None else state.view(-1)).double()
        return out.view(W.shape)

    def shards(self) -> list[shard_files.ScaLoRAShard]:
        """ScaLoRA's per-rank state as the checkpoint reader finds it (its shard files, or a Trainer's file)."""
        if self._shards is None:
            self._shards = self.src.ckpt.scalora_shards()
        return self._shards

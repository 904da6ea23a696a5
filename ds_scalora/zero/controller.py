"""ScaLoRA inside a DeepSpeed engine, at ZeRO stages 0 to 3, on one node or many.

The refresh runs in the one window where it is correct: after the gradient reduction and before the
ZeRO step (``step_hook.install_step_hook``). It works the same under a hand-written loop, HF Trainer
and Accelerate.

The refresh itself is ``ds_scalora.methods.scalora_refresh.RefreshCore``, the core the single-process
reference runs too, here on ``ZeroAccess``: one all-reduce assembles the factors and gradients, the
layers are solved round-robin across ranks, each rank rescales its own pieces of masters, gradients
and moments and merges into its own slice of each frozen weight (the precision policy's accumulator
is sharded: its memory per rank shrinks with the number of ranks), and ZeRO-0/1/2 replicas are
all-gathered back to bit-identical copies. This module owns what only a DeepSpeed run has: the step
window, and the checkpoint shards beside DeepSpeed's files.

The ZeRO step that follows propagates the new masters into the low-precision weights.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..checkpoint import shards
from ..checkpoint.layout import latest_tag
from ..methods.adapted_layers import AdaptedLinear, find_adapted_linears
from ..methods.scalora import ScaLoRAConfig
from ..methods.scalora_refresh import RefreshCore, RefreshReport
from .state_access import ZeroAccess
from .step_hook import install_step_hook


class ZeroScaLoRA:
    """ScaLoRA attached to a DeepSpeed engine. Create it with :func:`ds_scalora.zero.attach`."""

    def __init__(self, engine, model: torch.nn.Module, config: ScaLoRAConfig):
        self.engine = engine
        self.config = config
        self.access = ZeroAccess(engine)
        self.layers: list[AdaptedLinear] = find_adapted_linears(model, config.adapter)
        frozen = [layer.name for layer in self.layers if not (layer.lora_A.requires_grad and layer.lora_B.requires_grad)]
        if frozen:
            raise ValueError(f"the LoRA factors of {frozen[0]} are not trainable; ScaLoRA needs both factors trained")
        self.core = RefreshCore(self.layers, config, self.access)
        self.last_report: RefreshReport | None = None
        self._wrap_step()

    # -- the hook -------------------------------------------------------------------------------

    def _wrap_step(self) -> None:
        def refresh_if_due(step):
            self.last_report = self.refresh() if self.config.is_due(step) else None

        install_step_hook(self.engine, self.access.kind, refresh_if_due, after=self.access.write_back_grads)

    # -- the refresh ----------------------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Rescale every adapted layer now. Collective: every data-parallel rank must call it."""
        return self.core.refresh(self.engine.global_steps)

    @property
    def totals(self) -> Counter:
        return self.core.totals

    @property
    def merge_state(self) -> list:
        """This rank's precision-policy state per layer (beside its slice of the frozen weight)."""
        return self.core.merge_state

    def full_merged_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """The whole frozen weight with everything merged into it, at the policy's full precision
        (fp32, or fp64 for fp64 weights), assembled from every rank's slice. Collective."""
        return self.core.full_merged_weight(layer)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The replicated part of the state; it goes into ``client_state`` and into every shard file."""
        return {"config": asdict(self.config), "totals": dict(self.totals), "world": self.access.world,
                "layers": [layer.name for layer in self.layers]}

    def shard_path(self, tag_dir: str) -> str:
        return shards.shard_path(tag_dir, self.access.rank, self.access.world, "scalora")

    def save_shard(self, tag_dir: str, weights: bool = False) -> None:
        """Write this rank's merge-state shard into a checkpoint's tag directory (atomic rename). With
        ``weights``, it also carries this rank's slice of every adapted frozen weight (merges included), for
        hosts whose checkpoints leave frozen parameters out (``ScaLoRACallback``)."""
        sketches = {i: sketch.Y.clone() for i, sketch in self.core.sketches.items()}  # views into a batch: own copies
        slices = [self.access.weight_slice(layer.weight)[0].detach().clone().cpu() for layer in self.layers] if weights else None
        shards.write(self.shard_path(tag_dir), shards.ScaLoRAShard(**self.state_dict(), rank=self.access.rank,
                                                                   merge_state=self.merge_state, sketches=sketches,
                                                                   weights=slices))
        if dist.is_initialized():
            dist.barrier()

    def load_shard(self, tag_dir: str, weights: bool = False) -> None:
        """Restore this rank's merge-state shard and the counters from a checkpoint's tag directory; with
        ``weights``, also the frozen weights from the slices the shard carries (``save_shard(weights=True)``).
        Collective when ``weights``: the replicas of ZeRO-0/1/2 are re-assembled from every rank's slice."""
        path = self.shard_path(tag_dir)
        if not os.path.isfile(path):
            other = shards.other_world(tag_dir, "scalora", self.access.world)
            if other:
                raise ValueError(
                    f"{tag_dir} holds ScaLoRA shards for another world size ({other}); this run has "
                    f"{self.access.world} data-parallel ranks: resume at the same world size or convert the checkpoint"
                )
            raise FileNotFoundError(f"missing ScaLoRA merge-state shard {path}: the checkpoint is incomplete")
        saved = shards.read(path, "scalora")
        if saved.layers != [layer.name for layer in self.layers]:
            raise ValueError(f"{path} was written for different adapted layers than this model has")
        for mine, theirs in zip(self.merge_state, saved.merge_state):
            if (mine is None) != (theirs is None) or (mine is not None and mine.shape != theirs.shape):
                raise ValueError(f"{path}: merge state does not match this run's precision policy or sharding")
            if mine is not None:
                mine.copy_(theirs)
        for i, Y in saved.sketches.items():
            if i in self.core.sketches:
                self.core.sketches[i].load_(Y)
        self.core.totals = Counter(saved.totals)
        if weights:
            if saved.weights is None:
                raise ValueError(f"{path} carries no frozen-weight slices (it was not written by ScaLoRACallback), "
                                 "and the host's checkpoint may not hold the merged weights: resume it the way it "
                                 "was written")
            with torch.no_grad():
                for layer, slice_ in zip(self.layers, saved.weights):
                    target, _ = self.access.weight_slice(layer.weight)
                    if target.shape != slice_.shape or target.dtype != slice_.dtype:
                        raise ValueError(f"{path}: the weight slice of {layer.name} does not match this run's "
                                         "sharding or dtype")
                    target.copy_(slice_)
            self.access.share_replica_slices([layer.weight for layer in self.layers])

    def save_checkpoint(self, save_dir: str, tag=None, client_state: dict | None = None, **kwargs) -> None:
        """``engine.save_checkpoint`` plus this rank's merge-state shard, written beside it."""
        if kwargs.get("exclude_frozen_parameters"):
            raise ValueError("exclude_frozen_parameters=True would drop the merged weights from the checkpoint")
        tag = str(tag if tag is not None else f"global_step{self.engine.global_steps}")
        client_state = {**(client_state or {}), "ds_scalora": self.state_dict()}
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, **kwargs)
        self.save_shard(os.path.join(save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag=None, **kwargs):
        """``engine.load_checkpoint`` plus this rank's merge-state shard; returns what the engine returns."""
        tag = tag if tag is not None else latest_tag(load_dir)
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is not None:
            self.load_shard(os.path.join(load_dir, str(tag)))
        return path, client_state


def attach(engine, model: torch.nn.Module | None = None, config: ScaLoRAConfig | None = None, **options) -> ZeroScaLoRA:
    """Attach ScaLoRA to a DeepSpeed engine built from a PEFT LoRA model; returns the controller.

    ``options`` are :class:`ScaLoRAConfig` fields (``interval=10``, ``strength="auto"``, ...). The
    engine must have been built with a stock optimizer (``torch.optim.AdamW``) over the LoRA factors.
    """
    if config is not None and options:
        raise ValueError("pass either config or keyword options, not both")
    config = config or ScaLoRAConfig(**options)
    return ZeroScaLoRA(engine, model if model is not None else engine.module, config)

"""ElaLoRA inside a DeepSpeed engine, at ZeRO stages 0 to 3: the same ``ElasticRanks`` on ZeRO's pieces.

Shapes never change (fixed max-rank buffers), so ZeRO's flattened partitions stay valid; every rank
runs ``ElasticRanks.on_step`` in the step window (``step_hook``) on its own pieces of P, λ, Q, their
reduced gradients and moments. Communication per step: one all-reduce of the full P and Q (for the
orthogonality regulariser; a one-element one when it is off and no round is due), plus, on a
reallocation step, one all-reduce of the slot scores (R floats per matrix). Every rank then plans the
same moves from the same numbers and writes only its own entries.

Checkpoints: the replicated state (masks, round history) goes into ``client_state["ds_elalora"]``; the
importance averages are per rank, in ``ds_elalora_rankNNNNN_ofNNNNN.pt`` beside DeepSpeed's files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..checkpoint import shards
from ..checkpoint.layout import latest_tag
from ..methods.elalora import ElaLoRAConfig, ElasticRanks, RoundReport
from ..methods.svd_layers import find_svd_layers
from .state_access import ZeroAccess
from .step_hook import install_step_hook


class ZeroElaLoRA:
    """ElaLoRA attached to a DeepSpeed engine. Create it with :func:`attach_elalora`."""

    def __init__(self, engine, model: torch.nn.Module, config: ElaLoRAConfig):
        self.engine, self.config = engine, config
        self.access = ZeroAccess(engine)
        layers = find_svd_layers(model, config.adapter)
        frozen = [layer.name for layer in layers if not all(p.requires_grad for _, p, _ in layer.factors())]
        if frozen:
            raise ValueError(f"the factors of {frozen[0]} are not trainable; ElaLoRA trains P, λ and Q")
        self.core = ElasticRanks(layers, config, self.access)
        self.last_report: RoundReport | None = None
        install_step_hook(engine, self.access.kind, self._on_step, after=self.access.write_back_grads)

    def _on_step(self, step: int) -> None:
        self.last_report = self.core.on_step(step)

    @property
    def layers(self):
        return self.core.layers

    @property
    def totals(self):
        return self.core.totals

    def rank_pattern(self) -> dict[str, int]:
        return self.core.rank_pattern()

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**self.core.state_dict(), "world": self.access.world}

    def shard_path(self, tag_dir: str) -> str:
        return shards.shard_path(tag_dir, self.access.rank, self.access.world, "elalora")

    def save_checkpoint(self, save_dir: str, tag=None, client_state: dict | None = None, **kwargs) -> None:
        """``engine.save_checkpoint`` plus this rank's importance averages, written beside it."""
        tag = str(tag if tag is not None else f"global_step{self.engine.global_steps}")
        client_state = {**(client_state or {}), "ds_elalora": self.state_dict()}
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, **kwargs)
        self.save_shard(os.path.join(save_dir, tag))
        if dist.is_initialized():
            dist.barrier()

    def save_shard(self, tag_dir: str) -> None:
        """This rank's importance averages, beside DeepSpeed's files in ``tag_dir`` (every rank)."""
        shards.write(self.shard_path(tag_dir), shards.ElaLoRAShard(layers=[layer.name for layer in self.layers],
                                                                   ema=self.core.ema_state()))  # fmt: skip

    def load_shard(self, tag_dir: str, state: dict) -> None:
        """The replicated ``state`` (masks, history: :meth:`state_dict`) and this rank's averages from its shard."""
        self.core.load_state_dict(state)
        shard = self.shard_path(tag_dir)
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"missing ElaLoRA shard {shard}: the checkpoint is incomplete or was written "
                                    f"at another world size (this run has {self.access.world} ranks)")  # fmt: skip
        saved = shards.read(shard, "elalora")
        if saved.layers != [layer.name for layer in self.layers]:
            raise ValueError(f"{shard} was written for different adapted layers than this model has")
        device = self.layers[0].P.device
        self.core.load_ema_state({k: v.to(device) for k, v in saved.ema.items()})

    def load_checkpoint(self, load_dir: str, tag=None, **kwargs):
        """``engine.load_checkpoint`` plus the masks, history and this rank's averages."""
        tag = tag if tag is not None else latest_tag(load_dir)
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            return path, client_state
        if "ds_elalora" not in (client_state or {}):
            raise ValueError(f"{os.path.join(load_dir, str(tag))} holds no ElaLoRA state: it was not written by ElaLoRA")
        self.load_shard(os.path.join(load_dir, str(tag)), client_state["ds_elalora"])
        return path, client_state


def attach_elalora(engine, model: torch.nn.Module | None = None, config: ElaLoRAConfig | None = None,
                   **options) -> ZeroElaLoRA:  # fmt: skip
    """Attach ElaLoRA to a DeepSpeed engine built from :func:`ds_scalora.methods.elastic_lora_model`.

    ``options`` are :class:`ElaLoRAConfig` fields (``total_steps=...`` is required). The engine must
    have been built with a stock optimizer (``torch.optim.AdamW``) over the factors.
    """
    if config is not None and options:
        raise ValueError("pass either config or keyword options, not both")
    config = config or ElaLoRAConfig(**options)
    return ZeroElaLoRA(engine, model if model is not None else engine.module, config)

"""ElaLoRA as one ``transformers.TrainerCallback``, for a ``Trainer`` or TRL's ``SFTTrainer``, with or
without ``--deepspeed`` (ZeRO 0 to 3)::

    model = elastic_lora_model(base, target_modules=[...], init_rank=8, max_rank=16, alpha=16)
    trainer = SFTTrainer(model=model, args=SFTConfig(..., deepspeed=ds_config), train_dataset=ds,
                         callbacks=[ElaLoRACallback(interval=10, init_warmup=50, final_warmup=50)])
    trainer.train()
    trainer.save_model("out")          # a stock PEFT LoRA adapter with the final rank_pattern

The model is PEFT AdaLoRA ``SVDLinear`` layers with a fixed buffer of ``max_rank`` slots
(:func:`ds_scalora.methods.elastic_lora_model`, the ``peft_config`` of this method); the callback reads
``init_rank`` and ``max_rank`` from it and ``total_steps`` from the Trainer's ``max_steps``, so each is said
once. The rest of :class:`ElaLoRAConfig` comes as keyword options.

* ``on_train_begin``: the ZeRO controller on the engine wrapping the model (its work runs in the engine's
  step window, see ``ScaLoRACallback``), or the single-process ElaLoRA in front of ``optimizer.step``
  (after the Trainer's clipping: the regulariser's gradient is then added unclipped);
* ``on_save``: the masks and round history (``ds_elalora_state.pt`` in the checkpoint folder) and, under
  DeepSpeed, each rank's importance averages beside DeepSpeed's files; a resumed run restores them, so
  resume is exact. The factors themselves are trainable: the host's checkpoint holds them;
* ``save_pretrained`` of the model is guarded outside checkpoint folders: PEFT's own AdaLoRA file would
  leave ``ranknum`` out, and a stock reload would then scale by ``alpha / max_rank`` instead of the run's
  ``alpha / init_rank``: silently another model. The active slots are written instead as a plain LoRA
  adapter (``lora_A = Q[act]``, ``lora_B = s·P[:, act]·λ[act]``, scaling 1 through ``alpha_pattern``), exact.
  Under ZeRO-3 it refuses and names :meth:`ElaLoRACallback.save_adapter`, a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS  # PEFT's own file name
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR as CHECKPOINT_PREFIX

from ..checkpoint.layout import ELALORA_TRAINER_STATE, latest_tag
from ..deepspeed_import import import_deepspeed
from ..methods.elalora import ElaLoRA, ElaLoRAConfig, active_slots_lora_fields, lora_adapter_tensors
from ..methods.merged_model import guard_save_pretrained
from ..methods.svd_layers import find_svd_layers
from .elalora_controller import ZeroElaLoRA, attach_elalora
from .hf_callback import preflight_resume, resume_dir
from .state_access import find_engine

RANK_PATTERN_FILE = "elalora_rank_pattern.json"


class ElaLoRACallback(TrainerCallback):
    """``options``: :class:`ElaLoRAConfig` fields other than ``total_steps``, ``init_rank`` and ``max_rank``,
    which come from the Trainer and the model."""

    def __init__(self, **options):
        taken = {"total_steps", "init_rank", "max_rank"} & set(options)
        if taken:
            raise ValueError(f"ElaLoRACallback takes {sorted(taken)} from the Trainer (max_steps) and the model "
                             "(elastic_lora_model's init_rank and max_rank); leave them out")
        known = {f.name for f in dataclasses.fields(ElaLoRAConfig)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown ElaLoRA options {sorted(unknown)}; known: {sorted(known - taken)}")
        self.options = options
        self.ela: ZeroElaLoRA | ElaLoRA | None = None
        self.model = None

    # -- attach --------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        preflight_resume(args, args.resume_from_checkpoint)  # before DeepSpeed's unpickling loader (see hf_callback)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.ela is None:
            self.attach(model, optimizer, state.max_steps, resuming=state.global_step > 0)
        if state.global_step > 0:
            self.restore(resume_dir(args, state))

    def config_for(self, model, total_steps: int) -> ElaLoRAConfig:
        """The run's :class:`ElaLoRAConfig`: ``init_rank`` and ``max_rank`` read off the model's layers."""
        layers = find_svd_layers(model, self.options.get("adapter", "default"))
        if not layers:
            raise ValueError("ElaLoRACallback found no PEFT AdaLoRA layers: build the model with "
                             "ds_scalora.methods.elastic_lora_model(base, target_modules, init_rank, max_rank, alpha)")
        init_rank = int(round(_first_value(layers[0].module.ranknum[layers[0].adapter])))  # elastic_lora_model's
        max_rank = int(layers[0].module.r[layers[0].adapter])
        return ElaLoRAConfig(total_steps=int(total_steps), init_rank=init_rank, max_rank=max_rank, **self.options)

    def attach(self, model, optimizer, total_steps: int, resuming: bool = False) -> None:
        """Attach to the engine wrapping ``model``, or to the plain ``optimizer``. Called by ``on_train_begin``."""
        if model is None:
            raise ValueError("ElaLoRACallback got no model from the Trainer: add it to a transformers.Trainer")
        config = self.config_for(model, total_steps)
        engine = find_engine(model)
        if engine is not None:
            self.ela = attach_elalora(engine, model, config)
        else:
            inner = getattr(optimizer, "optimizer", optimizer)
            if not isinstance(inner, torch.optim.Optimizer):
                raise ValueError(f"ElaLoRACallback needs a torch optimizer (AdamW), got {type(inner).__name__}")
            self.ela = ElaLoRA(model, inner, config, resuming=resuming)
            inner.register_step_pre_hook(self._on_step)
        self.model = model
        guard_save_pretrained(model, self._save_instead)

    def _on_step(self, *_):
        self.ela.after_backward()  # a step pre-hook must return None

    @property
    def deepspeed(self) -> bool:
        return isinstance(self.ela, ZeroElaLoRA)

    def rank_pattern(self) -> dict[str, int]:
        return self.ela.rank_pattern()

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if self.deepspeed:
            self.ela.save_shard(os.path.join(folder, latest_tag(folder)))  # every rank: its own averages
            if args.should_save:
                torch.save(self.ela.state_dict(), os.path.join(folder, ELALORA_TRAINER_STATE))
        elif args.should_save:
            torch.save(self.ela.state_dict(), os.path.join(folder, ELALORA_TRAINER_STATE))

    def restore(self, folder: str) -> None:
        """ElaLoRA's state from a checkpoint folder written with this callback."""
        path = os.path.join(folder, ELALORA_TRAINER_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder} was not written with ElaLoRACallback, so the active "
                                    "slots cannot be restored; resume from a checkpoint written with it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self.deepspeed:
            self.ela.load_shard(os.path.join(folder, latest_tag(folder)), state)
        else:
            self.ela.load_state_dict(state)

    # -- the trained adapter ----------------------------------------------------------------------

    def _save_instead(self, directory: str, is_main_process: bool) -> None:
        if self.deepspeed and self.ela.access.kind == "zero3":
            raise ValueError("ZeRO-3 partitions ElaLoRA's factors across ranks: one rank cannot write the adapter "
                             "here, and PEFT's own AdaLoRA file would reload with another scale. Call "
                             "ElaLoRACallback.save_adapter(directory) on every rank instead of trainer.save_model()")
        if is_main_process:
            factors = [{"P": layer.P.detach(), "lam": layer.lam.detach(), "Q": layer.Q.detach()} for layer in self.ela.layers]
            _write_lora_adapter(self.ela, factors, directory, _base_name(self.model))

    def save_adapter(self, directory: str) -> None:
        """Write the exact LoRA adapter from the fp32 masters. Under DeepSpeed call it on **every** rank (it
        gathers the partitions); rank 0 writes."""
        if self.ela is None:
            raise ValueError("ElaLoRACallback is not attached yet: call save_adapter after trainer.train()")
        if not self.deepspeed:
            factors = [{"P": layer.P.detach(), "lam": layer.lam.detach(), "Q": layer.Q.detach()} for layer in self.ela.layers]
            _write_lora_adapter(self.ela, factors, directory, _base_name(self.model))
            return
        import torch.distributed as dist

        factors = self.ela.core.full_factors()  # collective
        if self.ela.access.rank == 0:
            _write_lora_adapter(self.ela, factors, directory, _base_name(self.model))
        if dist.is_initialized():
            dist.barrier()


def _first_value(p: torch.Tensor) -> float:
    """The first element of a parameter, gathered first if ZeRO-3 partitioned it (collective then)."""
    if hasattr(p, "ds_status"):
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters([p]):
            return float(p.detach().float().flatten()[0])
    return float(p.detach().float().flatten()[0])


def _base_name(model) -> str | None:
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "base_model_name_or_path", None)


@torch.no_grad()
def _write_lora_adapter(ela, factors: list[dict], directory: str, base: str | None) -> None:
    """A stock PEFT LoRA adapter of the active slots, scaling 1 (``alpha_pattern`` = ``rank_pattern``)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, rank_pattern = {}, {}
    for layer, f, active, scale in zip(ela.layers, factors, ela.core.active, ela.core.scales):
        A, B = lora_adapter_tensors(f["P"].float().cpu(), f["lam"].float().cpu().view(-1), f["Q"].float().cpu(),
                                    active.cpu(), scale)  # fmt: skip
        tensors[f"{layer.name}.lora_A.weight"] = A.contiguous()  # PEFT keys adapters by the PeftModel's module names
        tensors[f"{layer.name}.lora_B.weight"] = B.contiguous()
        rank_pattern[layer.name.removeprefix("base_model.model.")] = int(active.sum())
    config = LoraConfig(target_modules=sorted(rank_pattern), task_type="CAUSAL_LM", base_model_name_or_path=base,
                        **active_slots_lora_fields(rank_pattern))
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, RANK_PATTERN_FILE), "w") as fh:
        json.dump(rank_pattern, fh, indent=1)

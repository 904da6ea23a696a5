"""ScaLoRA in a ``transformers.Trainer`` job, with or without ``--deepspeed ds_config.json``.

Use :class:`ScaLoRATrainer` in place of ``Trainer``; everything else stays as it was::

    trainer = ScaLoRATrainer(model=peft_model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                             train_dataset=ds, scalora=ScaLoRAConfig(interval=10))
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

What it changes, and why:

* once the optimizer exists (and, under DeepSpeed, the engine), it attaches the controller: the ZeRO
  one (:func:`ds_scalora.zero.attach`) under DeepSpeed, the single-process reference hooked in front
  of ``optimizer.step`` otherwise;
* checkpoints: the stock Trainer saves DeepSpeed checkpoints of a PEFT model with
  ``exclude_frozen_parameters=True``, which would silently drop every merge into the frozen weights.
  This subclass saves them whole, together with the ScaLoRA state, and restores both on resume, after
  reading every file of the checkpoint as plain data (no pickled code runs).
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

from ..methods.scalora import ScaLoRA, ScaLoRAConfig
from ..checkpoint.layout import TRAINER_STATE, latest_tag
from ..checkpoint.preflight import check_tag
from .controller import attach


class ScaLoRATrainer(Trainer):
    def __init__(self, *args, scalora: ScaLoRAConfig | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalora_config = scalora if isinstance(scalora, ScaLoRAConfig) else ScaLoRAConfig(**(scalora or {}))
        self.scalora = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; a DeepSpeed checkpoint to resume from is first read as plain data on every
        rank (DeepSpeed itself loads with ``weights_only=False``; see ds_scalora/checkpoint/preflight.py)."""
        if resume_from_checkpoint and self.is_deepspeed_enabled:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            if path:  # none found: the Trainer says so itself
                check_tag(os.path.join(path, latest_tag(path)), self.args.world_size)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Called right after accelerator.prepare(): the optimizer and the DeepSpeed engine now exist.
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.scalora is None:
            self._attach()
        return scheduler

    def _attach(self) -> None:
        if self.is_deepspeed_enabled:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            self.scalora = attach(engine, self.model, self.scalora_config)
            return
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        self.scalora = ScaLoRA(self.model, inner, self.scalora_config)
        # The Trainer clips before optimizer.step(): here the refresh sees clipped gradients. The
        # scaling is invariant to the gradient scale, so only the clip coefficient differs from the
        # documented refresh-then-clip loop.
        def refresh(*_):
            self.scalora.refresh_if_due()  # a pre-hook must return None

        inner.register_step_pre_hook(refresh)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:
                # the PEFT checkpoint holds only the adapter: the merged base weights go here
                merged = {layer.name: layer.weight.detach().cpu() for layer in self.scalora.layers}
                torch.save({"scalora": self.scalora.state_dict(), "merged_weights": merged},
                           os.path.join(output_dir, TRAINER_STATE))
            return
        # the whole engine state, frozen (merged) weights included, plus the per-rank merge state
        self.scalora.save_checkpoint(output_dir)
        # as the stock method: a scheduler DeepSpeed does not own is saved beside the checkpoint
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.is_deepspeed_enabled:
            # the engine itself was restored by the Trainer (deepspeed_load_checkpoint)
            self.scalora.load_shard(os.path.join(checkpoint, latest_tag(checkpoint)))
            return
        path = os.path.join(checkpoint, TRAINER_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {checkpoint} was not written by ScaLoRATrainer")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.scalora.load_state_dict(saved["scalora"])
        with torch.no_grad():
            for layer in self.scalora.layers:
                layer.weight.copy_(saved["merged_weights"][layer.name])

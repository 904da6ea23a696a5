"""``ScaLoRATrainer``: a ``transformers.Trainer`` with :class:`ScaLoRACallback` already added, plus two things
a callback cannot do, with or without ``--deepspeed ds_config.json``::

    trainer = ScaLoRATrainer(model=peft_model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                             train_dataset=ds, scalora=ScaLoRAConfig(interval=10))
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

* before a DeepSpeed resume, every file of the checkpoint is read as plain data on every rank
  (DeepSpeed itself loads with ``weights_only=False``: ``ds_scalora/checkpoint/preflight.py``);
* DeepSpeed checkpoints are saved whole (the stock Trainer passes ``exclude_frozen_parameters=True`` for a
  PEFT model), so ``tools/convert.py`` reads them like ``launch/train.py``'s; the callback's shards then
  need not carry the frozen weights.

It composes with other Trainer subclasses by inheritance, e.g. ``class T(ScaLoRATrainer, SFTTrainer)``;
where a subclass does not fit (LLaMA-Factory, axolotl, ms-swift have their own), add the callback.
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

from ..methods.scalora import ScaLoRAConfig
from .hf_callback import ScaLoRACallback, preflight_resume


class ScaLoRATrainer(Trainer):
    def __init__(self, *args, scalora: ScaLoRAConfig | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalora_callback = ScaLoRACallback(scalora, shard_weights=False)
        self.add_callback(self.scalora_callback)

    @property
    def scalora_config(self) -> ScaLoRAConfig:
        return self.scalora_callback.config

    @property
    def scalora(self):
        """The attached controller (``ZeroScaLoRA`` or the single-process ``ScaLoRA``); None before training."""
        return self.scalora_callback.scalora

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; a DeepSpeed checkpoint to resume from is first read as plain data on every
        rank (DeepSpeed itself loads with ``weights_only=False``; see ds_scalora/checkpoint/preflight.py)."""
        if self.is_deepspeed_enabled:
            preflight_resume(self.args, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # the whole engine state, frozen (merged) weights included; the callback's on_save adds the shards
        self.model_wrapped.save_checkpoint(output_dir, client_state={"ds_scalora": self.scalora.state_dict()})
        # as the stock method: a scheduler DeepSpeed does not own is saved beside the checkpoint
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

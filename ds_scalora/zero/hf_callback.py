"""ScaLoRA as one ``transformers.TrainerCallback``: add it to any Trainer (TRL's ``SFTTrainer``, and the
frameworks built on them), with or without ``--deepspeed``, ZeRO 0 to 3::

    trainer = SFTTrainer(model=peft_model, args=SFTConfig(..., deepspeed="ds_config.json"), train_dataset=ds,
                         callbacks=[ScaLoRACallback(ScaLoRAConfig(interval=10))])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")            # the merged model (see below)

What it does, and why:

* at ``on_train_begin`` (the optimizer and, under DeepSpeed, the engine exist by then) it attaches the
  controller: the ZeRO one on the engine wrapping the model (:func:`ds_scalora.zero.attach`: the refresh
  runs inside the engine's step window, after the reduction and before the ZeRO step; Accelerate runs
  ``engine.step`` inside ``backward``, so ``on_pre_optimizer_step`` would come too late), the
  single-process ScaLoRA hooked in front of ``optimizer.step`` otherwise (under DDP every replica holds
  the same reduced gradients and computes the same refresh);
* at ``on_save`` each rank writes its shard beside the Trainer's checkpoint: the merge state and **its
  slice of every adapted frozen weight**, because Trainers save a PEFT model's DeepSpeed checkpoint
  with ``exclude_frozen_parameters=True``, which drops every merge. Without DeepSpeed the merged
  weights go into one file beside the adapter. A resumed run (``state.global_step > 0`` at the start)
  restores them, so resume is exact whatever the host saves;
* ``save_pretrained`` of the PEFT model is guarded: a PEFT adapter file alone would silently leave out
  everything merged into the frozen weights. Outside a checkpoint (``trainer.save_model(dir)``) it writes
  the merged Hugging Face model instead (frozen weights with their merges + s·B·A, in the model's
  dtype); under ZeRO-3, where one rank cannot see the partitioned weights, it refuses and names the
  command that converts the last checkpoint (``tools/convert.py merged``). Inside a Trainer checkpoint
  folder the adapter is written as usual: the shards beside it complete it.

DeepSpeed's own loader unpickles checkpoint files (``weights_only=False``), and the Trainer loads a DeepSpeed
checkpoint before ``on_train_begin``. The callback therefore reads the checkpoint named in
``TrainingArguments(resume_from_checkpoint=...)`` as plain data at ``on_init_end`` (the HF and TRL example
scripts pass that field on to ``train``); a checkpoint given only to ``trainer.train(...)`` is not visible
to a callback: call :func:`preflight_resume` on it first (``ScaLoRATrainer.train`` does).
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR as CHECKPOINT_PREFIX  # checkpoint-<global_step>
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint.layout import TRAINER_STATE, latest_tag
from ..checkpoint.preflight import check_tag
from ..deepspeed_import import import_deepspeed
from ..methods.merged_model import by_state_name, guard_save_pretrained, save_merged, write_merged
from ..methods.scalora import ScaLoRA, ScaLoRAConfig
from .controller import ZeroScaLoRA, attach
from .state_access import find_engine


class ScaLoRACallback(TrainerCallback):
    """``config``: the :class:`ScaLoRAConfig` (or its fields as a dict). ``shard_weights=False`` leaves the
    frozen-weight slices out of the shards, for a host that saves DeepSpeed checkpoints whole
    (``ScaLoRATrainer`` does)."""

    def __init__(self, config: ScaLoRAConfig | dict | None = None, shard_weights: bool = True):
        self.config = config if isinstance(config, ScaLoRAConfig) else ScaLoRAConfig(**(config or {}))
        self.shard_weights = shard_weights
        self.scalora: ZeroScaLoRA | ScaLoRA | None = None
        self.model = None

    # -- attach --------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        preflight_resume(args, args.resume_from_checkpoint)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.scalora is None:
            self.attach(model, optimizer)
        if state.global_step > 0:
            self.restore(resume_dir(args, state))

    def attach(self, model, optimizer) -> None:
        """Attach to the engine wrapping ``model``, or to the plain ``optimizer`` (Accelerate's wrapper is
        looked through). Called by ``on_train_begin``; public for hosts that build their loop by hand."""
        if model is None:
            raise ValueError("ScaLoRACallback got no model from the Trainer: add it to a transformers.Trainer")
        engine = find_engine(model)
        if engine is not None:
            self.scalora = attach(engine, model, self.config)
        else:
            inner = getattr(optimizer, "optimizer", optimizer)
            if not isinstance(inner, torch.optim.Optimizer):
                raise ValueError(f"ScaLoRACallback needs a torch optimizer (AdamW), got {type(inner).__name__}")
            self.scalora = ScaLoRA(model, inner, self.config)
            inner.register_step_pre_hook(self._refresh)
        self.model = model
        # once a refresh has merged, a PEFT adapter alone would lack the merges: the merged model instead
        guard_save_pretrained(model, self._save_instead, when=lambda: bool(self.scalora.totals.get("refreshes")))

    def _save_instead(self, directory: str, is_main_process: bool) -> None:
        if self.deepspeed and self.scalora.access.kind == "zero3":
            raise ValueError(
                "ScaLoRA merged updates into the frozen weights, which ZeRO-3 partitions across ranks: one rank "
                "cannot write the merged model here, and a PEFT adapter alone would silently be wrong. Call "
                "ScaLoRACallback.save_merged_model(directory) on every rank instead of trainer.save_model()")
        if is_main_process:
            save_merged(self.model, self.scalora, directory)

    def _refresh(self, *_):
        # the Trainer clips before optimizer.step(): the refresh sees clipped gradients. The scaling is
        # invariant to the gradient scale, so only the clip coefficient differs from refresh-then-clip.
        self.scalora.refresh_if_due()  # a step pre-hook must return None

    @property
    def deepspeed(self) -> bool:
        return isinstance(self.scalora, ZeroScaLoRA)

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        if self.deepspeed:
            # every rank: DeepSpeed wrote its tag (and `latest`) into the folder before on_save
            self.scalora.save_shard(os.path.join(folder, latest_tag(folder)), weights=self.shard_weights)
        elif args.should_save:
            merged = {layer.name: layer.weight.detach().cpu() for layer in self.scalora.layers}
            torch.save({"scalora": self.scalora.state_dict(), "merged_weights": merged},
                       os.path.join(folder, TRAINER_STATE))

    def restore(self, folder: str) -> None:
        """Restore the merged weights and ScaLoRA's state from a checkpoint folder written with this callback."""
        if self.deepspeed:
            self.scalora.load_shard(os.path.join(folder, latest_tag(folder)), weights=self.shard_weights)
            return
        path = os.path.join(folder, TRAINER_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder} was not written with ScaLoRACallback, so the merged "
                                    "weights cannot be restored; resume from a checkpoint written with it")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.scalora.load_state_dict(saved["scalora"])
        with torch.no_grad():
            for layer in self.scalora.layers:
                layer.weight.copy_(saved["merged_weights"][layer.name])


    # -- the trained model ------------------------------------------------------------------------

    def save_merged_model(self, directory: str, is_main_process: bool | None = None) -> None:
        """Write the merged Hugging Face model (every adapted weight = frozen weight with its merges, at the
        policy's full precision, + s·B·A, cast to the model's dtype). Under DeepSpeed call it on **every**
        rank: it gathers (ZeRO-3 partitions, the sharded merge accumulator); only the main process writes."""
        if self.scalora is None:
            raise ValueError("ScaLoRACallback is not attached yet: call save_merged_model after trainer.train()")
        if not self.deepspeed:
            save_merged(self.model, self.scalora, directory)
            return
        import torch.distributed as dist

        deepspeed = import_deepspeed()

        main = (dist.get_rank() == 0) if is_main_process is None else is_main_process
        scalora, base = self.scalora, self.model.get_base_model()
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            effective = {layer.weight: layer.effective_weight(scalora.full_merged_weight(layer)).to(layer.weight.dtype)
                         for layer in scalora.layers}  # fmt: skip
            if main:
                write_merged(base, by_state_name(base, effective), directory)
        if dist.is_initialized():
            dist.barrier()


def preflight_resume(args, checkpoint) -> None:
    """Before a DeepSpeed Trainer resumes from ``checkpoint`` (a ``checkpoint-N`` folder, or True for the newest
    in ``args.output_dir``; None, False or "" do nothing): read every file of its DeepSpeed tag as plain data
    on this rank and check its world size (:func:`ds_scalora.checkpoint.preflight.check_tag`), since
    DeepSpeed's loader unpickles with ``weights_only=False``. Raises ``CheckpointFileError`` naming the file."""
    if not checkpoint or not getattr(args, "deepspeed", None):
        return  # without DeepSpeed the Trainer loads its files itself, as plain data
    path = checkpoint
    if path is True or path == "True":
        path = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if path and os.path.isdir(path):  # anything else: the Trainer says what is wrong itself
        check_tag(os.path.join(path, latest_tag(path)), args.world_size)


def resume_dir(args, state) -> str:
    """The checkpoint folder a Trainer resumed from: ``args.resume_from_checkpoint`` when it names one,
    else ``<output_dir>/checkpoint-<global_step>`` (what ``train(resume_from_checkpoint=True)`` takes)."""
    named = args.resume_from_checkpoint
    if isinstance(named, str) and os.path.isdir(named):
        return named
    folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the Trainer resumed at step {state.global_step} but {folder} does not exist: pass "
                                "the checkpoint folder as TrainingArguments(resume_from_checkpoint=...)")
    return folder

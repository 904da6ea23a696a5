"""ScaLoRA as a ``torch.optim.Optimizer``: one object to hand to a plain PyTorch or DDP loop.

    opt = ScaLoRAOptimizer(torch.optim.AdamW(trainable, lr=2e-4), model, ScaLoRAConfig(interval=10))
    scheduler = transformers.get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=T)
    for batch in loader:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); scheduler.step(); opt.zero_grad()

``step()`` runs the refresh when it is due (the single-process :class:`ScaLoRA`, on the gradients in
``.grad``) and then the wrapped optimizer's step. Everything else (``param_groups``, ``state``,
``zero_grad``, hooks) is the wrapped optimizer's, so schedulers, clipping and gradient scalers see a
normal optimizer. The refresh comes after clipping here (the wrapper is called at ``step``), as in the
HF Trainer path: the optimal scaling does not depend on the gradients' scale, only the clip coefficient
differs from refresh-then-clip. Under DDP every replica holds the same reduced gradients and computes the
same refresh; nothing here communicates. Not for DeepSpeed (its engine owns the step): use
``ds_scalora.zero.attach``.

``state_dict()`` holds the wrapped optimizer's state and ScaLoRA's (step, counters, precision state,
sketches). The merged frozen weights are model parameters: save ``model.state_dict()`` (the whole model,
not only the adapter) beside it for resume. For the trained model, ``save_merged_model(dir)`` writes the
merged Hugging Face model; once a refresh has merged, the PEFT model's ``save_pretrained`` writes that
too, since an adapter file alone would silently leave every merge out. ``examples/plain_pytorch.py`` is
the complete loop (scheduler, clipping, checkpoint and resume, DDP, the merged model).
"""

from __future__ import annotations

import torch

from .merged_model import guard_save_pretrained, save_merged
from .scalora import ScaLoRA, ScaLoRAConfig


class ScaLoRAOptimizer(torch.optim.Optimizer):
    """A wrapped optimizer whose ``step`` refreshes the PEFT LoRA layers of ``model`` when due."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, config: ScaLoRAConfig | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ScaLoRAOptimizer wraps a torch.optim.Optimizer (AdamW, Adam, SGD), got {type(optimizer).__name__}")
        if isinstance(optimizer, ScaLoRAOptimizer):
            raise TypeError("this optimizer is already a ScaLoRAOptimizer: wrap the inner optimizer once")
        # no Optimizer.__init__: the wrapped optimizer owns the parameter groups and the state
        self.optimizer = optimizer
        self.model = model
        self.scalora = ScaLoRA(model, optimizer, config)
        if hasattr(model, "get_base_model"):  # a PEFT model: once a refresh merged, its adapter alone is wrong
            guard_save_pretrained(model, self._save_instead, when=lambda: bool(self.scalora.totals.get("refreshes")))

    # the wrapped optimizer's, so that schedulers, clipping and scalers see a normal optimizer
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:  # the refresh needs this step's gradients before the step: compute them first
            with torch.enable_grad():
                loss = closure()
            self.scalora.refresh_if_due()
            self.optimizer.step()
            return loss
        self.scalora.refresh_if_due()
        return self.optimizer.step()

    # -- the trained model ------------------------------------------------------------------------

    def save_merged_model(self, directory: str) -> None:
        """Write the merged Hugging Face model: each adapted weight = frozen weight with every merge (at the
        precision policy's full precision) + s·B·A, cast to the model's dtype; LoRA tensors dropped. It loads
        with ``AutoModelForCausalLM.from_pretrained(directory)``. Under DDP call it on one rank."""
        save_merged(self.model, self.scalora, directory)

    def _save_instead(self, directory: str, is_main_process: bool) -> None:
        if is_main_process:
            self.save_merged_model(directory)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scalora": self.scalora.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"optimizer", "scalora"}:
            raise ValueError("not a ScaLoRAOptimizer state dict (expected the keys 'optimizer' and 'scalora'); "
                             "a plain optimizer's state belongs to the wrapped optimizer's load_state_dict")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.scalora.load_state_dict(state_dict["scalora"])

    def __repr__(self) -> str:
        return f"ScaLoRAOptimizer({self.optimizer!r}, interval={self.scalora.config.interval})"

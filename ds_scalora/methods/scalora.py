"""ScaLoRA on a PEFT LoRA model with a stock torch optimizer: the single-process reference.

Usage, in any plain PyTorch (or DDP) loop::

    model = get_peft_model(base, LoraConfig(r=8, target_modules=[...]))   # use_rslora works too
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(interval=10))
    for batch in loader:
        model(**batch).loss.backward()
        scalora.refresh_if_due()          # after backward, before clipping and the optimizer step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()

A refresh rewrites every adapted layer at the same effective weight (spec §4): solve α, β, merge
``s A diag(1 − α∘β) Bᵀ`` into the frozen weight through a precision policy, rescale the factors,
and re-express the gradients and the optimizer moments (crossed). No optimizer reset, no
re-warm-up. Under DDP every replica holds the same reduced gradients, so every replica computes the
same refresh; nothing here communicates. The refresh itself is ``scalora_refresh.RefreshCore``, the
same core the DeepSpeed controller runs on its ZeRO pieces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch

from ..pieces import LocalAccess
from .adapted_layers import AdaptedLinear, find_adapted_linears
from .scalora_config import MAX_SCALE, ScaLoRAConfig, default_shrink  # noqa: F401  (public here too)
from .scalora_refresh import RefreshCore, RefreshReport, restart_seed  # noqa: F401  (restart_seed: public here)


class ScaLoRA:
    """Refreshes the LoRA layers of a PEFT model in place; see the module docstring for the loop.
    Build it once the model is on its device: the merge accumulator and rank sketches are allocated
    next to the frozen weights here."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ScaLoRAConfig | None = None):
        self.config = config or ScaLoRAConfig()
        self.optimizer = optimizer
        self.layers: list[AdaptedLinear] = find_adapted_linears(model, self.config.adapter)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            layer.name for layer in self.layers if not {id(layer.lora_A), id(layer.lora_B)} <= in_optimizer
        ]
        if missing:
            raise ValueError(
                f"the optimizer does not train the LoRA factors of {len(missing)} layer(s), e.g. {missing[0]}; "
                "build it from the model's trainable parameters"
            )
        self.core = RefreshCore(self.layers, self.config, LocalAccess(optimizer))
        self.step = 0  # optimizer steps seen so far

    # -- the schedule -------------------------------------------------------------------------

    def refresh_if_due(self) -> RefreshReport | None:
        """Call once per optimizer step, after backward and before the step. Counts the step."""
        report = self.refresh() if self.config.is_due(self.step) else None
        self.step += 1
        return report

    def refresh(self) -> RefreshReport:
        """Rescale every adapted layer now, from the gradients currently in ``.grad``."""
        return self.core.refresh(self.step)

    # -- what the refreshes accumulated -----------------------------------------------------------

    @property
    def totals(self) -> Counter:
        """Over the run: refreshes, and layers per solver / reason."""
        return self.core.totals

    def merged_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """The frozen weight with everything merged into it, at the policy's full precision."""
        return self.core.full_merged_weight(layer)

    @torch.no_grad()
    def effective_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """``W + s A Bᵀ`` (base weight layout) at full precision: what an exported model should carry."""
        return layer.effective_weight(self.merged_weight(layer))

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Config, step, counters, and per layer (by name) the precision policy's state and rank sketch."""
        names = [layer.name for layer in self.layers]
        return {
            "config": asdict(self.config),
            "step": self.step,
            "totals": dict(self.totals),
            "merge_state": {names[i]: v for i, v in enumerate(self.core.merge_state) if v is not None},
            "sketches": {names[i]: sketch.Y.clone() for i, sketch in self.core.sketches.items()},  # own copies, not views
        }

    def load_state_dict(self, state: dict) -> None:
        saved = ScaLoRAConfig(**state["config"])
        if saved.precision != self.config.precision or saved.adapter != self.config.adapter:
            raise ValueError(
                f"checkpoint was written with precision={saved.precision!r}, adapter={saved.adapter!r}; "
                f"this run uses precision={self.config.precision!r}, adapter={self.config.adapter!r}"
            )
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        unknown = set(state["merge_state"]) - set(index)
        if unknown:
            raise ValueError(f"checkpoint has merge state for layers this model lacks: {sorted(unknown)[:3]}")
        for name, tensor in state["merge_state"].items():
            mine = self.core.merge_state[index[name]]
            if mine is None or mine.numel() != tensor.numel():
                raise ValueError(f"merge state of {name} does not match this model's layer")
            mine.copy_(tensor.reshape(-1))  # flat; states saved before 2026-12-01 were weight-shaped
        for name, Y in state.get("sketches", {}).items():
            if name in index and index[name] in self.core.sketches:
                self.core.sketches[index[name]].load_(Y)
        self.step = int(state["step"])
        self.core.totals = Counter(state["totals"])

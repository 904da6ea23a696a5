"""``ScaLoRAConfig``: the options of ScaLoRA, apart from the layers and the refresh (as PEFT keeps its
``LoraConfig`` apart), so that a run config is validated without importing PEFT, transformers or
DeepSpeed: a typo is reported in a second or two, before any heavy import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..precision import POLICY_NAMES
from ..scaling import ABLATIONS, SOLVERS

# Guard rail on α_j, β_j (ScaLoRAConfig.max_scale): wide enough never to bind in a normal refresh
# (docs/scalora-strength.md), narrow enough that a crossed second moment grows at most 1e4-fold.
MAX_SCALE = 100.0


def default_shrink(interval: int) -> float:
    """The default ``shrink`` for a refresh interval, chosen by measurement (docs/scalora-strength.md §6):
    1.5 when refreshing every step, 4 for any longer interval (measured at 10)."""
    return DEFAULT_SHRINK_I1 if interval == 1 else DEFAULT_SHRINK_I10


DEFAULT_SHRINK_I1 = 1.5
DEFAULT_SHRINK_I10 = 4.0


@dataclass
class ScaLoRAConfig:
    """Options of the method (each field's ``help`` says what it does; PEFT's configs are the model). The
    run config's ``method.scalora`` block is built from these fields (``ds_scalora.train.config``)."""

    interval: int = field(default=1, metadata={"help": "refresh every `interval` optimizer steps (1 = ScaLoRA, 10 = ScaLoRA-I)"})
    strength: float | str = field(default="auto", metadata={"help": (
        "the knob c = L·η of spec §3, or 'auto': c chosen per layer and refresh so that the refresh divides the "
        "adapter's squared column norms by `shrink`")})
    shrink: float | None = field(default=None, metadata={"help": (
        "with strength 'auto', how much each refresh shrinks the adapter (merging about 1 - 1/shrink of it into the "
        "frozen weight); 1.0 is the old norm-keeping 'auto', which merges almost nothing; None = the measured default "
        "for the interval (default_shrink, docs/scalora-strength.md)")})
    max_scale: float = field(default=MAX_SCALE, metadata={"help": (
        "every α_j, β_j is kept within [1/max_scale, max_scale] (a guard rail: a tiny column must not get a huge "
        "scale, nor its crossed second moment the square of one)")})
    ablation: str | None = field(default=None, metadata={"help": (
        "None, or 'constant_shrink' / 'rebalance_only' (benchmark ablations, see solve_scaling)")})
    warmup_steps: int = field(default=10, metadata={"help": (
        "optimizer steps before the first refresh (PEFT's zero init makes step 0 degenerate)")})
    solver: str = field(default="column", metadata={"help": (
        "'column' (the paper's, with its scalar fallback), 'scalar', 'nnls' (exact optimum) or 'adam' (the exact "
        "optimum of the Adam-aware objective)")})
    precision: str = field(default="auto", metadata={"help": (
        "how merges accumulate in the frozen weight: 'auto', 'naive', 'fp32_residual', 'bf16_pair' or 'stochastic' "
        "(ds_scalora.precision)")})
    adapter: str = field(default="default", metadata={"help": "the PEFT adapter name to refresh"})
    seed: int = field(default=0, metadata={"help": "seeds stochastic rounding; replicas that share it round identically"})
    rank_sketch: int = field(default=64, metadata={"help": (
        "columns k of the random sketch that estimates each layer's accumulated rank up to k (ds_scalora.spectrum."
        "RankSketch and SketchBatch; 4·k·(d_out + d_in) bytes per layer, on the rank that solves it); 0 turns it off")})
    rank_sketch_every: int = field(default=10, metadata={"help": (
        "measure the sketches (a float64 Gram matrix and an eigendecomposition per layer, the refresh's costliest "
        "part after the merge) at most once per this many optimizer steps: at the first refresh of each window "
        "of that many steps, and so at every refresh when `interval` is at least this; the merges are added to "
        "the sketches at every refresh all the same. 1 = measure at every refresh")})
    restart: bool = field(default=False, metadata={"help": (
        "the ReLoRA-style baseline instead of ScaLoRA: every refresh merges the whole adapter (α = β = 0, so factors "
        "and moments become zero) and re-initialises lora_A as PEFT does; the learning-rate re-warm-up is the "
        "training loop's business")})

    def __post_init__(self):
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = ScaLoRA, 10 = ScaLoRA-I), got {self.interval!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.strength != "auto":
            ok = isinstance(self.strength, (int, float)) and not isinstance(self.strength, bool)
            if not ok or not (self.strength > 0 and math.isfinite(self.strength)):
                raise ValueError(f"strength must be a positive number or 'auto', got {self.strength!r}")
        if self.shrink is None:
            self.shrink = default_shrink(self.interval)
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not (
                math.isfinite(self.shrink) and self.shrink > 0):
            raise ValueError(f"shrink must be a positive number (1.0 = keep the adapter's size; None = the default "
                             f"for the interval), got {self.shrink!r}")
        self.shrink = float(self.shrink)
        if isinstance(self.max_scale, bool) or not isinstance(self.max_scale, (int, float)) or not (
                math.isfinite(self.max_scale) and self.max_scale >= 1):
            raise ValueError(f"max_scale must be a finite number >= 1, got {self.max_scale!r}")
        if self.ablation is not None and self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be None or one of {ABLATIONS}, got {self.ablation!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not isinstance(self.rank_sketch, int) or isinstance(self.rank_sketch, bool) or self.rank_sketch < 0:
            raise ValueError(f"rank_sketch must be an integer >= 0 (0 = off), got {self.rank_sketch!r}")
        if not isinstance(self.rank_sketch_every, int) or isinstance(self.rank_sketch_every, bool) or self.rank_sketch_every < 1:
            raise ValueError(f"rank_sketch_every must be an integer >= 1 (1 = at every refresh), got {self.rank_sketch_every!r}")
        if self.precision != "auto" and self.precision not in POLICY_NAMES:
            raise ValueError(f"precision must be 'auto' or one of {POLICY_NAMES}, got {self.precision!r}")

    def solve_options(self) -> dict:
        """The keyword arguments of :func:`ds_scalora.scaling.solve_scaling` this config sets."""
        return {"shrink": self.shrink, "max_scale": self.max_scale, "ablation": self.ablation}

    def is_due(self, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (0-based) is preceded by a refresh."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.interval == 0

    def is_measured(self, step: int) -> bool:
        """Whether the refresh before step ``step`` (one that :meth:`is_due`) measures the rank sketches: the
        first refresh, and every refresh whose window of ``rank_sketch_every`` steps holds no earlier one.
        Decided from the step alone, so every rank, and a resumed run, agrees."""
        return step - self.interval < self.warmup_steps or (step - self.interval) // self.rank_sketch_every < step // self.rank_sketch_every

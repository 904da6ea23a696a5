"""``ElaLoRAConfig``: the options of ElaLoRA, apart from its layers and rank moves (as PEFT keeps its
configs apart), so that a run config is validated without importing PEFT, transformers or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import elastic


@dataclass
class ElaLoRAConfig:
    """Options of the method (each field's ``help`` says what it does; defaults: the official GLUE scripts'
    β, k, b and regulariser weight). The run config's ``method.elalora`` block is built from these fields
    (``ds_scalora.train.config``)."""

    total_steps: int = field(metadata={"help": "T, optimizer steps of the run (the schedule depends on it)"})
    init_rank: int = field(default=8, metadata={"help": "r0, active slots per matrix at the start; the budget is "
                                                        "r0 x matrices"})
    max_rank: int = field(default=16, metadata={"help": "R, the fixed buffer size: the most ranks one matrix can reach"})
    init_warmup: int = field(default=50, metadata={"help": "steps before the first reallocation (scores accumulate "
                                                           "meanwhile)"})
    final_warmup: int = field(default=50, metadata={"help": "final steps with frozen ranks (no scores, no moves)"})
    interval: int = field(default=10, metadata={"help": "ΔT, steps between reallocation rounds"})
    moves: int = field(default=4, metadata={"help": "b0, ranks pruned (and as many grown) in the first round; decays "
                                                    "cubically to 0"})
    per_matrix: int = field(default=2, metadata={"help": "k, the most ranks one matrix offers (and can gain) per round"})
    beta1: float = field(default=0.85, metadata={"help": "decay of the importance's moving average"})
    beta2: float = field(default=0.85, metadata={"help": "decay of the importance uncertainty's moving average"})
    orth_reg: float = field(default=0.1, metadata={"help": "weight of the orthogonality regulariser (0 = off)"})
    init_value: float = field(default=1e-13, metadata={"help": "λ of a grown slot (the official 1e-13: the output "
                                                               "does not change)"})
    seed: int = field(default=0, metadata={"help": "seeds the grown directions; every rank draws the same ones"})
    adapter: str = field(default="default", metadata={"help": "the PEFT adapter name"})

    def __post_init__(self):
        def whole(name, low):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"ElaLoRA {name} must be an integer >= {low}, got {v!r}")

        for name, low in (("total_steps", 1), ("init_rank", 1), ("max_rank", 1), ("init_warmup", 0),
                          ("final_warmup", 0), ("interval", 1), ("moves", 0), ("per_matrix", 1)):  # fmt: skip
            whole(name, low)
        if self.max_rank < self.init_rank:
            raise ValueError(f"ElaLoRA max_rank ({self.max_rank}) must be >= init_rank ({self.init_rank})")
        if self.init_warmup >= self.total_steps - self.final_warmup:
            raise ValueError(
                f"ElaLoRA init_warmup ({self.init_warmup}) must be < total_steps - final_warmup "
                f"({self.total_steps} - {self.final_warmup}): no step would be left for reallocation"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"ElaLoRA {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not (self.orth_reg >= 0 and math.isfinite(self.orth_reg)):
            raise ValueError(f"ElaLoRA orth_reg must be a finite number >= 0, got {self.orth_reg!r}")

    def moves_at(self, step: int) -> int:
        return elastic.moves_at(step, self.total_steps, self.init_warmup, self.final_warmup, self.interval, self.moves)

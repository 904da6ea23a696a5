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
same refresh; nothing here communicates. The DeepSpeed integration reuses these pieces per shard.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from ..precision import POLICY_NAMES, get_policy
from ..rescale import cross_gradients_, cross_moments_, merge_delta, rescale_factors_
from ..pieces import LocalAccess
from ..scaling import ABLATIONS, SOLVERS, ScalingSolution, restart_solution, solve_scaling
from ..spectrum import RankSketch
from .adapted_layers import AdaptedLinear, find_adapted_linears, fresh_lora_A


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
        "RankSketch; 4·k·d_out bytes per layer); 0 turns it off")})
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
        if self.precision != "auto" and self.precision not in POLICY_NAMES:
            raise ValueError(f"precision must be 'auto' or one of {POLICY_NAMES}, got {self.precision!r}")

    def solve_options(self) -> dict:
        """The keyword arguments of :func:`ds_scalora.scaling.solve_scaling` this config sets."""
        return {"shrink": self.shrink, "max_scale": self.max_scale, "ablation": self.ablation}

    def is_due(self, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (0-based) is preceded by a refresh."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.interval == 0


@dataclass
class RefreshReport:
    """What one refresh did, for logging: solver outcomes, α∘β over all columns, merged norm."""

    step: int
    solvers: Counter = field(default_factory=Counter)  # solver_used -> layers
    reasons: Counter = field(default_factory=Counter)  # fallback / skip reason -> layers
    alpha_beta: list = field(default_factory=list)  # one tensor of α∘β per rescaled layer
    merged_sq_norm: float = 0.0
    accumulated_rank: list = field(default_factory=list)  # per layer, estimated (empty if rank_sketch=0)
    # per layer, the estimated share of the accumulated update's energy outside its top-r directions
    energy_outside: list = field(default_factory=list)

    @property
    def layers(self) -> int:
        return sum(self.solvers.values())

    @property
    def scalar_fraction(self) -> float:
        """Fraction of layers that used one scale per factor (the paper reports about 20%)."""
        return self.solvers["scalar"] / max(1, self.layers)

    @property
    def merged_norm(self) -> float:
        return math.sqrt(self.merged_sq_norm)

    @property
    def energy_outside_mean(self) -> float | None:
        """Mean over layers of the share of the accumulated update's energy outside its top r directions:
        unlike the numerical rank, tiny directions count only by their energy."""
        vals = [v for v in self.energy_outside if v == v]
        return sum(vals) / len(vals) if vals else None

    @property
    def accumulated_rank_mean(self) -> float | None:
        """Mean over layers of the estimated rank of (everything merged + the current adapter)."""
        return sum(self.accumulated_rank) / len(self.accumulated_rank) if self.accumulated_rank else None


def restart_seed(seed: int, step: int, index: int) -> int:
    """The seed of layer ``index``'s fresh ``lora_A`` at a restart: the same on every rank."""
    return ((seed * 1_000_003 + step) * 10_007 + index) * 7 + 3


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
        self.policies = {layer.name: get_policy(self.config.precision, layer.weight.dtype) for layer in self.layers}
        self.merge_state = {layer.name: self.policies[layer.name].init_state(layer.weight) for layer in self.layers}
        k = self.config.rank_sketch
        self.sketches = {
            layer.name: RankSketch(layer.A.shape[0], layer.B.shape[0], k, seed=index, device=layer.weight.device)
            for index, layer in enumerate(self.layers)
        } if k else {}  # fmt: skip
        self.step = 0  # optimizer steps seen so far
        self.totals = Counter()  # over the run: refreshes, and layers per solver / reason

    # -- the schedule -------------------------------------------------------------------------

    def refresh_if_due(self) -> RefreshReport | None:
        """Call once per optimizer step, after backward and before the step. Counts the step."""
        report = self.refresh() if self.config.is_due(self.step) else None
        self.step += 1
        return report

    # -- the refresh --------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self) -> RefreshReport:
        """Rescale every adapted layer now, from the gradients currently in ``.grad``."""
        report = RefreshReport(step=self.step)
        grads = [layer.grads() for layer in self.layers]
        if not all(torch.isfinite(g).all() for pair in grads for g in pair):
            # A non-finite gradient anywhere means this optimizer step is skipped (loss scaling,
            # overflow checks) or the run is already corrupt: rescaling the other layers would only
            # leave the factors inconsistent with a skipped step. No layer is touched.
            report.solvers["none"] = len(self.layers)
            report.reasons["nonfinite"] = len(self.layers)
            self._count(report)
            return report
        for index, (layer, (grad_A, grad_B)) in enumerate(zip(self.layers, grads)):
            if self.config.restart:
                sol = restart_solution(layer.A.shape[1])
            else:
                sol = solve_scaling(
                    layer.A, layer.B, grad_A, grad_B, self.config.strength, solver=self.config.solver,
                    scale=layer.scale, directions=self.adam_directions(layer), **self.config.solve_options()
                )
            report.solvers[sol.solver_used] += 1
            if sol.reason:
                report.reasons[sol.reason] += 1
            if sol.rescaled:
                report.merged_sq_norm += self._apply(index, layer, sol)
                report.alpha_beta.append((sol.alpha * sol.beta).float())
        if self.sketches:
            measured = [self.sketches[l.name].measure(l.A.shape[1], l.A, l.B, l.scale) for l in self.layers]
            report.accumulated_rank = [rank for rank, _ in measured]
            report.energy_outside = [share for _, share in measured]
        self._count(report)
        return report

    def adam_directions(self, layer: AdaptedLinear):
        """Adam's next step directions (U_A, U_B, paper orientation) for solver "adam", else None."""
        if self.config.solver != "adam":
            return None
        access = LocalAccess(self.optimizer)
        u_A = access.piece(layer.lora_B).adam_direction().view(layer.lora_B.shape)
        u_B = access.piece(layer.lora_A).adam_direction().view(layer.lora_A.shape).T
        return u_A, u_B

    def _count(self, report: RefreshReport) -> None:
        self.totals["refreshes"] += 1
        self.totals.update({f"solver/{k}": v for k, v in report.solvers.items()})
        self.totals.update({f"reason/{k}": v for k, v in report.reasons.items()})

    def _apply(self, index: int, layer: AdaptedLinear, sol: ScalingSolution) -> float:
        """Spec §4 steps 3 to 6 on one layer; returns ‖merged update‖_F²."""
        weight = layer.weight
        work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = merge_delta(layer.A, layer.B, sol.alpha, sol.beta, layer.scale, dtype=work_dtype)
        seed = (self.config.seed * 1_000_003 + self.step) * 10_007 + index
        self.policies[layer.name].merge_(weight.data, layer.to_weight_layout(delta), self.merge_state[layer.name], seed=seed)
        if self.sketches:
            self.sketches[layer.name].add(layer.A, layer.B, 1 - sol.alpha * sol.beta, layer.scale)
        rescale_factors_(layer.A.data, layer.B.data, sol.alpha, sol.beta)
        grad_B = layer.lora_A.grad
        cross_gradients_(layer.lora_B.grad, None if grad_B is None else grad_B.T, sol.alpha, sol.beta)
        state = self.optimizer.state
        cross_moments_(
            dict(state.get(layer.lora_B, {})),
            {k: (v.T if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in state.get(layer.lora_A, {}).items()},
            sol.alpha,
            sol.beta,
        )
        if self.config.restart:
            gen = torch.Generator().manual_seed(restart_seed(self.config.seed, self.step, index))
            layer.lora_A.data.copy_(fresh_lora_A(layer.lora_A.shape, gen))
        return float(delta.pow(2).sum(dtype=torch.float64))

    # -- what the refreshes accumulated -----------------------------------------------------------

    def merged_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """The frozen weight with everything merged into it, at the policy's full precision."""
        return self.policies[layer.name].value(layer.weight.data, self.merge_state[layer.name])

    @torch.no_grad()
    def effective_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """``W + s A Bᵀ`` (base weight layout) at full precision: what an exported model should carry."""
        return layer.effective_weight(self.merged_weight(layer))

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "step": self.step,
            "totals": dict(self.totals),
            "merge_state": {k: v for k, v in self.merge_state.items() if v is not None},
            "sketches": {name: sketch.Y for name, sketch in self.sketches.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = ScaLoRAConfig(**state["config"])
        if saved.precision != self.config.precision or saved.adapter != self.config.adapter:
            raise ValueError(
                f"checkpoint was written with precision={saved.precision!r}, adapter={saved.adapter!r}; "
                f"this run uses precision={self.config.precision!r}, adapter={self.config.adapter!r}"
            )
        names = {layer.name for layer in self.layers}
        unknown = set(state["merge_state"]) - names
        if unknown:
            raise ValueError(f"checkpoint has merge state for layers this model lacks: {sorted(unknown)[:3]}")
        for name, tensor in state["merge_state"].items():
            if self.merge_state[name] is None or self.merge_state[name].shape != tensor.shape:
                raise ValueError(f"merge state of {name} does not match this model's layer")
            self.merge_state[name].copy_(tensor)
        for name, Y in state.get("sketches", {}).items():
            if name in self.sketches:
                self.sketches[name].load_(Y)
        self.step = int(state["step"])
        self.totals = Counter(state["totals"])

"""ScaLoRA's refresh on pieces: the one core that the single-process reference and the ZeRO controller run.

It sees the model only through an *access* object (``ds_scalora.pieces.LocalAccess`` in one process,
``ds_scalora.zero.state_access.ZeroAccess`` inside a DeepSpeed engine), as ElaLoRA's ``ElasticRanks``
does. One refresh, for the whole model (spec §4):

1. every rank copies its pieces of all factors and gradients into one flat buffer, and
   ``access.join_pieces`` assembles the full factors and gradients everywhere (one all-reduce under
   ZeRO-1/2/3, nothing at ZeRO-0 or in one process; the adapters are ~0.3% of a model);
2. the layers are solved round-robin (layer i on rank i mod N), a rank's layers of one shape in one
   batch (``solve_scaling_batch``), and ``access.all_reduce`` of the packed α, β shares them: every
   rank ends with bit-identical values;
3. each rank rescales its own pieces of the masters, gradients and Adam moments (crossed), with no
   communication, and merges into its own slice of each frozen weight (``access.weight_slice``) through
   the precision policy, whose high-precision state therefore lives only beside that slice; the merge is
   formed from the factors (``MergePolicy.merge_product_``), never as a weight-sized temporary;
4. ``access.share_replica_slices`` makes replicated weights (ZeRO-0/1/2) bit-identical again.

With one process the access object is the identity at every step, so this is also the plain
algorithm; the float64 tests check it against brute force (``tests/test_scalora_reference.py``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..precision import get_policy
from ..rescale import MOMENT_POWERS, apply_scalings, column_scalings, merged_sq_norms
from ..scaling import SOLVERS, restart_solution, solve_scaling_batch
from ..spectrum import SketchBatch
from .adapted_layers import AdaptedLinear, fresh_lora_A

# every ScalingSolution.solver_used, packed as a code into the all-reduce that shares the solutions
_SOLVERS = ("none", "restart", "constant", *SOLVERS)
_REASONS = (None, "negative_column_solution", "degenerate", "nonfinite")


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


def merge_seed(seed: int, step: int, index: int, rank: int) -> int:
    """The stochastic-rounding seed of layer ``index``'s merge on ``rank`` (each rank rounds its own slice)."""
    return ((seed * 1_000_003 + step) * 10_007 + index) * 65_537 + rank


class RefreshCore:
    """The refresh of every adapted layer, on whatever ``access`` says this rank holds. ``config`` is a
    ``ScaLoRAConfig``. Collective when the access object communicates: every rank must call it."""

    def __init__(self, layers: list[AdaptedLinear], config, access):
        self.layers, self.config, self.access = layers, config, access
        self.policies = [get_policy(config.precision, layer.weight.dtype) for layer in layers]
        self.merge_state = [policy.init_state(access.weight_slice(layer.weight)[0])
                            for policy, layer in zip(self.policies, layers)]  # fmt: skip
        access.own_writable_copies([layer.weight for layer in layers])
        # the accumulated-rank sketch of layer i lives on the rank that solves it (i mod N), stored and
        # updated with the other layers of its shape
        self.sketch_batches: list = []  # (layer indices, SketchBatch)
        self.sketches = {}  # layer index -> its RankSketch (a view into its batch; what checkpoints hold)
        if config.rank_sketch:
            for group in self.shape_groups([i for i in range(len(layers)) if i % access.world == access.rank]):
                d_out, d_in = access.full_shape(layers[group[0]].lora_B)[0], access.full_shape(layers[group[0]].lora_A)[1]
                batch = SketchBatch(d_out, d_in, config.rank_sketch, seeds=group, device=layers[group[0]].lora_B.device)
                self.sketch_batches.append((group, batch))
                self.sketches.update(zip(group, batch.sketches))
        self.totals = Counter()  # over the run: refreshes, and layers per solver / reason

    def shape_groups(self, indices: list) -> list[list]:
        """``indices`` grouped by the full shapes of their factors: what is solved and sketched in one batch."""
        groups = {}
        for i in indices:
            layer = self.layers[i]
            groups.setdefault((tuple(self.access.full_shape(layer.lora_B)), tuple(self.access.full_shape(layer.lora_A))),
                              []).append(i)
        return list(groups.values())

    @torch.no_grad()
    def refresh(self, step: int) -> RefreshReport:
        """Rescale every adapted layer now, from the gradients the access object holds; ``step`` is the
        optimizer step about to be taken (it seeds the merges and restarts)."""
        report = RefreshReport(step=step)
        full, directions, finite = self.gather_factors_and_grads()
        if not finite:
            # A non-finite gradient anywhere means this optimizer step is skipped (loss scaling,
            # overflow checks) or the run is already corrupt: rescaling the other layers would only
            # leave the factors inconsistent with a skipped step. No layer is touched.
            report.solvers["none"] = len(self.layers)
            report.reasons["nonfinite"] = len(self.layers)
            self._count(report)
            return report
        solutions = self.solve_round_robin(full, directions)
        merged, scalings, restarts = [], [], []
        for index, (layer, (A, B, _, _), (alpha, beta, used, reason)) in enumerate(zip(self.layers, full, solutions)):
            report.solvers[used] += 1
            if reason:
                report.reasons[reason] += 1
            if used != "none":
                self.merge_layer(index, layer, A, B, alpha, beta, step)
                scalings += self.rescale_pieces(layer, alpha, beta)
                if used == "restart":
                    restarts.append((index, layer))
                report.alpha_beta.append((alpha * beta).float())
                merged.append(layer.weight)
        apply_scalings(scalings)  # every layer's masters, gradients and moments in one multi-tensor call
        for index, layer in restarts:  # after the scaling, which zeroed the old lora_A
            self._reinit_lora_A(index, layer, step)
        norms = self.merged_norms(full, solutions)
        measured = self.measure_sketches(full, solutions, measure=self.config.is_measured(step))
        self.access.share_replica_slices(merged)
        # one all-reduce for the merged norms and the ranks (each from the rank that owns the layer)
        totals = self.access.all_reduce(torch.cat([norms, *(measured or ())]).to(self.layers[0].lora_B.device)).cpu()
        n = len(self.layers)
        report.merged_sq_norm = float(totals[:n].sum())
        if self.config.rank_sketch and measured is not None:
            report.accumulated_rank = [int(r) for r in totals[n : 2 * n]]
            report.energy_outside = [float(e) for e in totals[2 * n :]]
        self._count(report)
        return report

    def merged_norms(self, full, solutions) -> torch.Tensor:
        """‖merged delta‖² per layer, each counted once, by the rank that solved it (zero elsewhere)."""
        norms = torch.zeros(len(self.layers), dtype=torch.float64)
        mine = [i for i in range(len(self.layers)) if i % self.access.world == self.access.rank]
        for group in self.shape_groups(mine):
            A, B = (torch.stack([full[i][k] for i in group]) for k in (0, 1))
            alpha, beta = (torch.stack([solutions[i][k] for i in group]) for k in (0, 1))
            norms[group] = merged_sq_norms(A, B, alpha, beta, [self.layers[i].scale for i in group])
        return norms

    def measure_sketches(self, full, solutions, measure: bool = True):
        """Add this refresh's merges to the sketches this rank owns, a shape at a time, and, if
        ``measure``, measure them; returns (ranks, energy shares) per layer, zero for the layers other
        ranks own, or None when not measured."""
        ranks = torch.zeros(len(self.layers), dtype=torch.float64)
        energy = torch.zeros(len(self.layers), dtype=torch.float64)
        for group, batch in self.sketch_batches:
            A, B = (torch.stack([full[i][k] for i in group]) for k in (0, 1))
            kept = torch.stack([solutions[i][0] * solutions[i][1] for i in group])  # α∘β (1 where not rescaled)
            scale = torch.tensor([self.layers[i].scale for i in group], dtype=torch.float64)
            BtO = batch.add(A, B, 1 - kept, scale)
            if measure:
                r, e = batch.measure(A, BtO, kept, scale, A.shape[-1])
                ranks[group], energy[group] = r.double(), e.double()
        return (ranks, energy) if measure else None

    def _work_dtype(self) -> torch.dtype:
        """fp32 (the ZeRO masters), or fp64 when the factors are fp64 (the float64 references)."""
        f64 = any(p.dtype == torch.float64 for layer in self.layers for p in (layer.lora_B, layer.lora_A))
        return torch.float64 if f64 else torch.float32

    def gather_factors_and_grads(self):
        """Full (A, B, grad_A, grad_B) of every layer, paper orientation, in the work dtype. With solver
        "adam" also Adam's next step directions (U_A, U_B), computed elementwise on each rank's pieces and
        assembled in the same buffer; otherwise None. Missing gradients read as zeros. Third: whether
        all of it is finite (one check of the joined buffer)."""
        adam = self.config.solver == "adam"
        sizes = [math.prod(self.access.full_shape(p)) for layer in self.layers for p in (layer.lora_B, layer.lora_A)]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        total = offsets[-1]
        blocks = 3 if adam else 2  # masters, gradients[, directions]
        dtype = self._work_dtype()
        buffer = torch.zeros(blocks * total, dtype=dtype, device=self.layers[0].lora_B.device)
        into, values = [], []  # copied in one multi-tensor call
        for i, layer in enumerate(self.layers):
            for j, p in enumerate((layer.lora_B, layer.lora_A)):
                piece = self.access.piece(p)
                if piece is None:
                    continue
                at = offsets[2 * i + j] + piece.start
                into.append(buffer[at : at + piece.numel])
                values.append(piece.master)
                if piece.grad is not None:
                    into.append(buffer[total + at : total + at + piece.numel])
                    values.append(piece.grad)
                    if adam:
                        into.append(buffer[2 * total + at : 2 * total + at + piece.numel])
                        values.append(piece.adam_direction())
        if into:
            torch._foreach_copy_(into, values)  # converts to the work dtype
        self.access.join_pieces(buffer)
        finite = bool(torch.isfinite(buffer).all())
        full, directions = [], []
        for i, layer in enumerate(self.layers):
            shapes = (self.access.full_shape(layer.lora_B), self.access.full_shape(layer.lora_A))
            a, bt, ga, gbt, ua, ubt = (
                buffer[k * total + offsets[2 * i + j] : k * total + offsets[2 * i + j + 1]].view(shapes[j])
                if k < blocks else None
                for k in range(3) for j in range(2)
            )
            full.append((a, bt.T, ga, gbt.T))
            directions.append((ua, ubt.T) if adam else None)
        return full, (directions if adam else None), finite

    def solve_round_robin(self, full, directions=None):
        """Layer i is solved on rank i mod N, all of a rank's layers of one shape in one batch
        (``solve_scaling_batch``); one all-reduce shares the packed results."""
        rank, world = self.access.rank, self.access.world
        solutions = self.solve_layers([i for i in range(len(full)) if i % world == rank], full, directions)
        widths = [2 * A.shape[1] + 1 for A, _, _, _ in full]
        packed = torch.zeros(sum(widths), dtype=torch.float64, device=full[0][0].device)
        at = 0
        for i, (A, _, _, _) in enumerate(full):
            if i in solutions:
                sol, r = solutions[i], A.shape[1]
                packed[at : at + r] = sol.alpha
                packed[at + r : at + 2 * r] = sol.beta
                packed[at + 2 * r] = _SOLVERS.index(sol.solver_used) * 10 + _REASONS.index(sol.reason)
            at += widths[i]
        self.access.all_reduce(packed)
        ends = [0]
        for w in widths:
            ends.append(ends[-1] + w)
        codes = [int(c) for c in packed[torch.tensor(ends[1:], device=packed.device) - 1].tolist()]  # one sync
        out = []
        for (A, _, _, _), at, code in zip(full, ends, codes):
            r = A.shape[1]
            out.append((packed[at : at + r].clone(), packed[at + r : at + 2 * r].clone(), _SOLVERS[code // 10], _REASONS[code % 10]))
        return out

    def solve_layers(self, indices: list, full, directions=None) -> dict:
        """{layer index: ScalingSolution} for ``indices``, the layers of one shape solved together."""
        if self.config.restart:
            return {i: restart_solution(full[i][0].shape[1]) for i in indices}
        out = {}
        for group in self.shape_groups(indices):
            A, B, gA, gB = (torch.stack([full[i][k] for i in group]) for k in range(4))
            dirs = None
            if directions:
                dirs = tuple(torch.stack([directions[i][k] for i in group]) for k in range(2))
            scale = torch.tensor([self.layers[i].scale for i in group], dtype=torch.float64)
            sols = solve_scaling_batch(A, B, gA, gB, self.config.strength, solver=self.config.solver, scale=scale,
                                       directions=dirs, **self.config.solve_options())
            out.update(zip(group, sols))
        return out

    def merge_layer(self, index: int, layer: AdaptedLinear, A, B, alpha, beta, step: int) -> None:
        """Merge ``s A diag(1 − α∘β) Bᵀ`` into this rank's slice of the frozen weight, formed from the
        factors a block of rows at a time (``MergePolicy.merge_product_``)."""
        target, start = self.access.weight_slice(layer.weight)
        dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
        coef = ((1.0 - alpha.double() * beta.double()) * layer.scale).to(device=A.device, dtype=dtype)
        left, right = (B, A) if layer.fan_in_fan_out else (A, B)  # the weight's own layout
        seed = merge_seed(self.config.seed, step, index, self.access.rank)
        self.policies[index].merge_product_(target, (left.to(dtype) * coef).to(target.device),
                                            right.to(device=target.device, dtype=dtype), start,
                                            self.merge_state[index], seed=seed)

    def rescale_pieces(self, layer: AdaptedLinear, alpha, beta) -> list:
        """How to scale this rank's pieces of masters, gradients and moments (spec §4 steps 4 to 6,
        crossed): (view, factor) pairs (:func:`~ds_scalora.rescale.column_scalings`), which the refresh
        multiplies for all its layers at once (:func:`~ds_scalora.rescale.apply_scalings`)."""
        ops = []
        # lora_B is the paper's A (columns scaled by α, gradients/moments by β); lora_A = Bᵀ (rows by β / α)
        for p, axis, own, crossed in ((layer.lora_B, 1, alpha, beta), (layer.lora_A, 0, beta, alpha)):
            piece = self.access.piece(p)
            if piece is None:
                continue
            shape = self.access.full_shape(p)
            own_k = own.to(device=piece.master.device, dtype=piece.master.dtype)
            crossed_k = crossed.to(device=piece.master.device, dtype=piece.master.dtype)
            ops += column_scalings(piece.master, own_k, shape, axis, piece.start)
            if piece.grad is not None:
                ops += column_scalings(piece.grad, crossed_k, shape, axis, piece.start)
            for name, t in piece.moments.items():
                if name not in MOMENT_POWERS:
                    raise ValueError(
                        f"optimizer state {name!r} has no known rule under column rescaling; "
                        f"supported: {sorted(MOMENT_POWERS)} (use torch.optim.AdamW)"
                    )
                power = MOMENT_POWERS[name]
                ops += column_scalings(t, crossed_k if power == 1 else crossed_k**power, shape, axis, piece.start)
        return ops

    def _reinit_lora_A(self, index: int, layer: AdaptedLinear, step: int) -> None:
        """ReLoRA's restart: a fresh PEFT init of lora_A (the same draw on every rank), piece by piece."""
        gen = torch.Generator().manual_seed(restart_seed(self.config.seed, step, index))
        fresh = fresh_lora_A(self.access.full_shape(layer.lora_A), gen).view(-1)
        piece = self.access.piece(layer.lora_A)
        if piece is not None:
            piece.master.copy_(fresh[piece.start : piece.start + piece.numel].to(piece.master))

    @torch.no_grad()
    def full_merged_weight(self, layer: AdaptedLinear) -> torch.Tensor:
        """The whole frozen weight with everything merged into it, at the policy's full precision
        (fp32, or fp64 for fp64 weights), assembled from every rank's slice. Collective."""
        index = self.layers.index(layer)
        target, start = self.access.weight_slice(layer.weight)
        value = self.policies[index].value(target, self.merge_state[index])
        if self.access.world == 1 and start == 0 and value.numel() == self.access.weight_numel(layer.weight):
            return value.view(self.access.weight_shape(layer.weight))
        full = torch.zeros(self.access.weight_numel(layer.weight), dtype=value.dtype, device=value.device)
        full[start : start + value.numel()] = value  # each rank contributes only its own slice
        return self.access.all_reduce(full).view(self.access.weight_shape(layer.weight))

    def _count(self, report: RefreshReport) -> None:
        self.totals["refreshes"] += 1
        self.totals.update({f"solver/{k}": v for k, v in report.solvers.items()})
        self.totals.update({f"reason/{k}": v for k, v in report.reasons.items()})

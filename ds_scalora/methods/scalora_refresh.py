"""ScaLoRA's refresh on pieces: the one core that the single-process reference and the ZeRO controller run.

It sees the model only through an *access* object (``ds_scalora.pieces.LocalAccess`` in one process,
``ds_scalora.zero.state_access.ZeroAccess`` inside a DeepSpeed engine), as ElaLoRA's ``ElasticRanks``
does. One refresh, for the whole model (spec §4):

1. every rank copies its pieces of all factors and gradients into one flat buffer, and
   ``access.join_pieces`` assembles the full factors and gradients everywhere (one all-reduce under
   ZeRO-1/2/3, nothing at ZeRO-0 or in one process; the adapters are ~0.3% of a model); the buffer
   is laid out by :class:`ShapeGroup` (each rank's layers of one shape side by side), so a group's
   stacked factors are views of it, not copies;
2. the layers are solved round-robin (layer i on rank i mod N), a rank's layers of one shape in one
   batch (``solve_scaling_batch``), and ``access.all_reduce`` of the packed α, β shares them: every
   rank ends with bit-identical values;
3. each rank merges into its own slice of each frozen weight (``access.weight_slice``) through the
   precision policy, whose high-precision state therefore lives only beside that slice; the merge is
   formed from the factors (``MergePolicy.merge_product_``), never as a weight-sized temporary. Then it
   rescales its own pieces of the masters, gradients and Adam moments (crossed), with no communication:
   every factor element's multipliers are laid out like the joined buffer (two more vectors of its
   length, a third with the squares for second moments), so a piece's are the slice at its place, and
   all pieces go through one multi-tensor multiply;
4. ``access.share_replica_slices`` makes replicated weights (ZeRO-0/1/2) bit-identical again.

Everything that can be checked or converted once per refresh is (finiteness of the joined buffer and of
the merge factors, the solvers' codes, α and β per dtype), so the per-layer work is the merge's
``addmm_`` and the rescale's slices: ``python tools/benchmark.py refresh`` times each phase.

With one process the access object is the identity at every step, so this is also the plain
algorithm; the float64 tests check it against brute force (``tests/test_scalora_reference.py``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..precision import all_finite, get_policy
from ..rescale import MOMENT_POWERS, merged_sq_norms
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


@dataclass(frozen=True)
class ShapeGroup:
    """Layers whose factors have one full shape, solved by one rank in one batch (``owner``): in the
    refresh's joined buffer their lora_B sit side by side from ``b_at`` and their lora_A from ``a_at``,
    so the stacked factors of the group are views of the buffer, and their solutions one block of the
    packed results from ``packed_at`` (2r + 1 values per layer: α, β and the solver's code)."""

    owner: int
    layers: tuple
    b_shape: tuple  # lora_B: d_out x r
    a_shape: tuple  # lora_A: r x d_in
    b_at: int
    a_at: int
    packed_at: int

    @property
    def r(self) -> int:
        return self.b_shape[1]

    def solutions(self, packed: torch.Tensor) -> torch.Tensor:
        """The group's block of the packed solutions: n x (2r + 1), a view (α, β, the solver's code)."""
        n, r = len(self.layers), self.r
        return packed[self.packed_at : self.packed_at + n * (2 * r + 1)].view(n, 2 * r + 1)

    def alpha_beta(self, packed: torch.Tensor):
        """The group's α and β (n x r each), views of the packed solutions."""
        block = self.solutions(packed)
        return block[:, : self.r], block[:, self.r : 2 * self.r]

    def stacked(self, block: torch.Tensor):
        """The group's (A, B) in the paper's orientation (n x d_out x r, n x d_in x r), views of ``block``."""
        n, (d_out, r), (_, d_in) = len(self.layers), self.b_shape, self.a_shape
        A = block[self.b_at : self.b_at + n * d_out * r].view(n, d_out, r)
        Bt = block[self.a_at : self.a_at + n * r * d_in].view(n, r, d_in)
        return A, Bt.mT


class RefreshCore:
    """The refresh of every adapted layer, on whatever ``access`` says this rank holds. ``config`` is a
    ``ScaLoRAConfig``. Collective when the access object communicates: every rank must call it."""

    def __init__(self, layers: list[AdaptedLinear], config, access):
        self.layers, self.config, self.access = layers, config, access
        self.policies = [get_policy(config.precision, layer.weight.dtype) for layer in layers]
        self.merge_state = [policy.init_state(access.weight_slice(layer.weight)[0])
                            for policy, layer in zip(self.policies, layers)]  # fmt: skip
        access.own_writable_copies([layer.weight for layer in layers])
        self.scales = [layer.scale for layer in layers]
        self.groups, self.total, self.packed_total = self._layout()
        # where layer i's lora_B (j = 0) and lora_A (j = 1) start in a block of the joined buffer
        self.offsets = {(i, 0): g.b_at + k * math.prod(g.b_shape) for g in self.groups for k, i in enumerate(g.layers)}
        self.offsets.update({(i, 1): g.a_at + k * math.prod(g.a_shape) for g in self.groups
                             for k, i in enumerate(g.layers)})  # fmt: skip
        self.own = [g for g in self.groups if g.owner == access.rank]
        # where each layer's solver code sits in the packed solutions, and the layer order they come in
        self.code_at = torch.tensor([g.packed_at + k * (2 * g.r + 1) + 2 * g.r for g in self.groups
                                     for k in range(len(g.layers))])  # fmt: skip
        self.code_layers = [i for g in self.groups for i in g.layers]
        # the accumulated-rank sketch of layer i lives on the rank that solves it (i mod N), stored and
        # updated with the other layers of its shape
        self.sketch_batches: list = []  # (ShapeGroup, SketchBatch)
        self.sketches = {}  # layer index -> its RankSketch (a view into its batch; what checkpoints hold)
        if config.rank_sketch:
            for group in self.own:
                batch = SketchBatch(group.b_shape[0], group.a_shape[1], config.rank_sketch, seeds=list(group.layers),
                                    device=layers[group.layers[0]].lora_B.device)
                self.sketch_batches.append((group, batch))
                self.sketches.update(zip(group.layers, batch.sketches))
        self.totals = Counter()  # over the run: refreshes, and layers per solver / reason

    def shape_groups(self, indices: list) -> list[list]:
        """``indices`` grouped by the full shapes of their factors: what is solved and sketched in one batch."""
        groups = {}
        for i in indices:
            layer = self.layers[i]
            groups.setdefault((tuple(self.access.full_shape(layer.lora_B)), tuple(self.access.full_shape(layer.lora_A))),
                              []).append(i)
        return list(groups.values())

    def _layout(self):
        """Every rank's layers (i mod N) grouped by shape, in one order that all ranks share: the
        :class:`ShapeGroup` s, the length of one block of the joined buffer, and that of the packed
        solutions."""
        groups, at, packed_at = [], 0, 0
        for owner in range(self.access.world):
            for members in self.shape_groups([i for i in range(len(self.layers)) if i % self.access.world == owner]):
                first = self.layers[members[0]]
                b_shape = tuple(self.access.full_shape(first.lora_B))
                a_shape = tuple(self.access.full_shape(first.lora_A))
                n = len(members)
                groups.append(ShapeGroup(owner, tuple(members), b_shape, a_shape, at, at + n * math.prod(b_shape),
                                         packed_at))
                at += n * (math.prod(b_shape) + math.prod(a_shape))
                packed_at += n * (2 * b_shape[1] + 1)
        return groups, at, packed_at

    @torch.no_grad()
    def refresh(self, step: int) -> RefreshReport:
        """Rescale every adapted layer now, from the gradients the access object holds; ``step`` is the
        optimizer step about to be taken (it seeds the merges and restarts)."""
        report = RefreshReport(step=step)
        params = [(layer.lora_B, layer.lora_A) for layer in self.layers]
        buffer, pieces, finite = self.gather_factors_and_grads(params)
        if not finite:
            # A non-finite gradient anywhere means this optimizer step is skipped (loss scaling,
            # overflow checks) or the run is already corrupt: rescaling the other layers would only
            # leave the factors inconsistent with a skipped step. No layer is touched.
            report.solvers["none"] = len(self.layers)
            report.reasons["nonfinite"] = len(self.layers)
            self._count(report)
            return report
        packed, used, reasons = self.solve_round_robin(buffer)
        for u, why in zip(used, reasons):
            report.solvers[u] += 1
            if why:
                report.reasons[why] += 1
        rescaled = [i for i, u in enumerate(used) if u != "none"]
        self.merge_all(buffer, packed, rescaled, step)
        self.rescale_pieces(params, pieces, packed, rescaled)  # masters, gradients, moments: one call
        for index in rescaled:
            if used[index] == "restart":  # after the scaling, which zeroed the old lora_A
                self._reinit_lora_A(index, self.layers[index], step)
        alpha, beta = self.per_layer(packed)
        report.alpha_beta = [(alpha[i] * beta[i]).float() for i in rescaled]
        norms = self.merged_norms(buffer, packed)
        measured = self.measure_sketches(buffer, packed, measure=self.config.is_measured(step))
        self.access.share_replica_slices([self.layers[i].weight for i in rescaled])
        # one all-reduce for the merged norms and the ranks (each from the rank that owns the layer)
        totals = self.access.all_reduce(torch.cat([norms, *(measured or ())]).to(params[0][0].device)).cpu()
        n = len(self.layers)
        report.merged_sq_norm = float(totals[:n].sum())
        if self.config.rank_sketch and measured is not None:
            report.accumulated_rank = [int(r) for r in totals[n : 2 * n]]
            report.energy_outside = [float(e) for e in totals[2 * n :]]
        self._count(report)
        return report

    def _work_dtype(self, params) -> torch.dtype:
        """fp32 (the ZeRO masters), or fp64 when the factors are fp64 (the float64 references)."""
        return torch.float64 if any(p.dtype == torch.float64 for pair in params for p in pair) else torch.float32

    def gather_factors_and_grads(self, params):
        """Every layer's full lora_B, lora_A and their gradients (and, with solver "adam", Adam's next step
        directions, computed elementwise on each rank's pieces) in one joined buffer, in the work dtype:
        ``blocks x total`` with block 0 the factors, 1 the gradients, 2 the directions, each laid out by
        :class:`ShapeGroup`. Missing gradients read as zeros. Also this rank's pieces (reused by the
        rescale) and whether everything is finite (one check of the joined buffer)."""
        adam = self.config.solver == "adam"
        buffer = torch.zeros(3 if adam else 2, self.total, dtype=self._work_dtype(params), device=params[0][0].device)
        pieces = {}
        into, values = [], []  # copied in one multi-tensor call
        for group in self.groups:
            for i in group.layers:
                for j, p in enumerate(params[i]):
                    piece = pieces[id(p)] = self.access.piece(p)
                    if piece is None:
                        continue
                    at = self.offsets[i, j] + piece.start
                    into.append(buffer[0, at : at + piece.numel])
                    values.append(piece.master)
                    if piece.grad is not None:
                        into.append(buffer[1, at : at + piece.numel])
                        values.append(piece.grad)
                        if adam:
                            into.append(buffer[2, at : at + piece.numel])
                            values.append(piece.adam_direction())
        if into:
            torch._foreach_copy_(into, values)  # converts to the work dtype
        self.access.join_pieces(buffer.view(-1))
        finite = all_finite(buffer)  # one pass, one sync
        return buffer, pieces, finite

    def solve_round_robin(self, buffer: torch.Tensor):
        """Layer i is solved on rank i mod N, all of a rank's layers of one shape in one batch
        (``solve_scaling_batch``); one all-reduce shares the packed results. Returns the packed
        solutions (float64, laid out by :class:`ShapeGroup`) and per layer the solver used and the reason."""
        packed = torch.zeros(self.packed_total, dtype=torch.float64, device=buffer.device)
        for group in self.own:
            r, n = group.r, len(group.layers)
            if self.config.restart:
                sols = [restart_solution(r) for _ in group.layers]
            else:
                A, B = group.stacked(buffer[0])
                gA, gB = group.stacked(buffer[1])
                dirs = group.stacked(buffer[2]) if self.config.solver == "adam" else None
                scale = torch.tensor([self.scales[i] for i in group.layers], dtype=torch.float64)
                # finite: the joined buffer was checked as a whole
                sols = solve_scaling_batch(A, B, gA, gB, self.config.strength, solver=self.config.solver, scale=scale,
                                           directions=dirs, finite=torch.ones(n, dtype=torch.bool),
                                           **self.config.solve_options())
            codes = torch.tensor([_SOLVERS.index(s.solver_used) * 10 + _REASONS.index(s.reason) for s in sols],
                                 dtype=torch.float64)
            block = torch.cat([torch.stack([s.alpha for s in sols]), torch.stack([s.beta for s in sols]),
                               codes[:, None]], dim=1)
            group.solutions(packed).copy_(block)
        self.access.all_reduce(packed)
        used, reasons = [None] * len(self.layers), [None] * len(self.layers)
        codes = packed[self.code_at.to(packed.device)].tolist()  # to the host in one transfer
        for i, code in zip(self.code_layers, codes):
            used[i], reasons[i] = _SOLVERS[int(code) // 10], _REASONS[int(code) % 10]
        return packed, used, reasons

    def per_layer(self, packed: torch.Tensor):
        """(α per layer, β per layer): views of the packed solutions."""
        alpha, beta = [None] * len(self.layers), [None] * len(self.layers)
        for group in self.groups:
            a, b = group.alpha_beta(packed)
            for k, i in enumerate(group.layers):
                alpha[i], beta[i] = a[k], b[k]
        return alpha, beta

    def merge_all(self, buffer: torch.Tensor, packed: torch.Tensor, rescaled: list, step: int) -> None:
        """Merge ``s A diag(1 − α∘β) Bᵀ`` of every rescaled layer into this rank's slice of its frozen
        weight, formed from the factors a block of rows at a time (``MergePolicy.merge_product_``). The
        coefficients are applied to A a shape at a time, and all factors are checked finite at once
        before anything is written."""
        todo = set(rescaled)
        work, checks = [], []  # (layer index, A diag(coef), B); each shape's A diag(coef), checked at once
        for group in self.groups:
            A, B = group.stacked(buffer[0])
            alpha, beta = group.alpha_beta(packed)
            scale = torch.tensor([self.scales[i] for i in group.layers], dtype=torch.float64, device=A.device)
            coef = (1.0 - alpha * beta) * scale[:, None]
            scaled = A * coef.to(A.dtype)[:, None, :]
            checks.append(scaled)  # B comes from the checked buffer
            work += [(i, scaled[k], B[k]) for k, i in enumerate(group.layers) if i in todo]
        if work and not all_finite(*checks):
            raise ValueError("the merge factors contain NaN or Inf (an overflow of A·(1 − α∘β)·s): nothing was merged")
        for index, left, right in work:
            layer = self.layers[index]
            target, start = self.access.weight_slice(layer.weight)
            dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
            if layer.fan_in_fan_out:  # the weight's own layout: d_in x d_out
                left, right = right, left
            seed = merge_seed(self.config.seed, step, index, self.access.rank)
            self.policies[index].merge_product_(target, left.to(device=target.device, dtype=dtype),
                                                right.to(device=target.device, dtype=dtype), start,
                                                self.merge_state[index], seed=seed, checked=True)

    def multipliers(self, packed: torch.Tensor, dtype: torch.dtype, device) -> tuple:
        """Every factor element's multiplier at this refresh, laid out like a block of the joined buffer:
        (own, crossed), two vectors of ``total`` elements in ``dtype``. lora_B is the paper's A: its
        columns are scaled by α and its gradient and moments by β; lora_A = Bᵀ has its rows scaled by β,
        its gradient and moments by α (spec §4 steps 4 to 6). A rank's piece of a factor then finds its
        multipliers in the slice of these vectors at the piece's own place, at every ZeRO stage."""
        k = packed.to(device=device, dtype=dtype)  # α, β in the pieces' dtype, converted once
        own = torch.empty(self.total, dtype=dtype, device=device)
        crossed = torch.empty_like(own)
        for group in self.groups:
            alpha, beta = group.alpha_beta(k)  # n x r
            for vector, on_b, on_a in ((own, alpha, beta), (crossed, beta, alpha)):
                lora_B, lora_A_t = group.stacked(vector)  # views: n x d_out x r, and lora_A (n x r x d_in) transposed
                lora_B.copy_(on_b[:, None, :].expand_as(lora_B))  # one value per column
                lora_A_t.mT.copy_(on_a[:, :, None].expand_as(lora_A_t.mT))  # one value per row
        return own, crossed

    def rescale_pieces(self, params, pieces: dict, packed: torch.Tensor, rescaled: list) -> None:
        """Rescale this rank's pieces of the masters, gradients and Adam moments of the rescaled layers
        (spec §4 steps 4 to 6, crossed; first moments by k, second by k², ``MOMENT_POWERS``): each piece is
        multiplied by the slice of :meth:`multipliers` at its place, all in one multi-tensor call of
        same-shape pairs. No communication."""
        work = []  # (piece, where it starts in a block of the joined buffer)
        for index in rescaled:
            for j, p in enumerate(params[index]):
                piece = pieces[id(p)]
                if piece is not None and piece.numel > 0:
                    work.append((piece, self.offsets[index, j] + piece.start))
        # the multiplier vectors cut at every piece's ends by one split each (a slice per tensor costs
        # more than the multiply): piece k's multipliers are chunk[k] of each
        bounds = sorted({0, self.total, *(at for _, at in work), *(at + piece.numel for piece, at in work)})
        chunk_at = {b: k for k, b in enumerate(bounds)}
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        chunks = {}  # (device, dtype) -> (own, crossed, crossed²) chunks, built on first use; MOMENT_POWERS index it

        def factors_for(t: torch.Tensor) -> tuple:
            key = (t.device, t.dtype)
            if key not in chunks:
                own, crossed = self.multipliers(packed, t.dtype, t.device)
                chunks[key] = tuple(v.split(sizes) for v in (own, crossed, crossed * crossed))
            return chunks[key]

        targets, factors = [], []
        for piece, at in work:
            k = chunk_at[at]
            targets.append(piece.master)
            factors.append(factors_for(piece.master)[0][k])
            if piece.grad is not None:
                targets.append(piece.grad)
                factors.append(factors_for(piece.grad)[1][k])
            for name, t in piece.moments.items():
                if name not in MOMENT_POWERS:
                    raise ValueError(
                        f"optimizer state {name!r} has no known rule under column rescaling; "
                        f"supported: {sorted(MOMENT_POWERS)} (use torch.optim.AdamW)"
                    )
                targets.append(t)
                factors.append(factors_for(t)[MOMENT_POWERS[name]][k])
        if targets:
            torch._foreach_mul_(targets, factors)

    def merged_norms(self, buffer: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """‖merged delta‖² per layer, each counted once, by the rank that solved it (zero elsewhere)."""
        norms = torch.zeros(len(self.layers), dtype=torch.float64)
        for group in self.own:
            A, B = group.stacked(buffer[0])
            alpha, beta = group.alpha_beta(packed)
            norms[list(group.layers)] = merged_sq_norms(A, B, alpha, beta, [self.scales[i] for i in group.layers])
        return norms

    def measure_sketches(self, buffer: torch.Tensor, packed: torch.Tensor, measure: bool = True):
        """Add this refresh's merges to the sketches this rank owns, a shape at a time, and, if
        ``measure``, measure them; returns (ranks, energy shares) per layer, zero for the layers other
        ranks own, or None when not measured."""
        ranks = torch.zeros(len(self.layers), dtype=torch.float64)
        energy = torch.zeros(len(self.layers), dtype=torch.float64)
        for group, batch in self.sketch_batches:
            A, B = group.stacked(buffer[0])
            alpha, beta = group.alpha_beta(packed)
            kept = alpha * beta  # α∘β (1 where not rescaled)
            scale = torch.tensor([self.scales[i] for i in group.layers], dtype=torch.float64)
            BtO = batch.add(A, B, 1 - kept, scale)
            if measure:
                r, e = batch.measure(A, BtO, kept, scale, A.shape[-1])
                ranks[list(group.layers)], energy[list(group.layers)] = r.double(), e.double()
        return (ranks, energy) if measure else None

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

"""ScaLoRA inside a DeepSpeed engine, at ZeRO stages 0 to 3, on one node or many.

The refresh runs in the one window where it is correct: after the gradient reduction and before the
ZeRO step (``step_hook.install_step_hook``). It works the same under a hand-written loop, HF Trainer
and Accelerate.

One refresh, for the whole model:

1. every rank copies its pieces of all factors and reduced gradients into one flat fp32 buffer, and
   **one all-reduce** assembles the full factors and gradients everywhere (the adapters are ~0.3% of
   a model, so this is cheap);
2. the layers are solved round-robin (layer i on rank i mod N) and **one all-reduce** of the packed
   α, β shares them: every rank ends with bit-identical values;
3. each rank rescales its own pieces of the fp32 masters, gradients and Adam moments (crossed), with
   no communication, and merges into its own slice of each frozen weight through the precision
   policy, whose high-precision state therefore lives only beside that slice (the accumulator is
   sharded: its memory per rank shrinks with the number of ranks);
4. ZeRO-0/1/2 keep a full replica of every frozen weight per rank: the merged slices are all-gathered
   (in chunks) so that the replicas stay bit-identical. ZeRO-3 needs nothing more: each rank's slice
   is its own partition.

The ZeRO step that follows propagates the new masters into the low-precision weights.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..checkpoint import shards
from ..checkpoint.layout import latest_tag
from ..methods.adapted_layers import AdaptedLinear, find_adapted_linears, fresh_lora_A
from ..methods.scalora import RefreshReport, ScaLoRAConfig, restart_seed
from ..precision import get_policy
from ..rescale import MOMENT_POWERS, expand_column_scale, merge_delta_flat
from ..scaling import SOLVERS, restart_solution, solve_scaling
from ..spectrum import RankSketch
from .state_access import ZeroAccess
from .step_hook import install_step_hook

# every ScalingSolution.solver_used, packed as a code into the all-reduce that shares the solutions
_SOLVERS = ("none", "restart", "constant", *SOLVERS)
_REASONS = (None, "negative_column_solution", "degenerate", "nonfinite")


class ZeroScaLoRA:
    """ScaLoRA attached to a DeepSpeed engine. Create it with :func:`ds_scalora.zero.attach`."""

    def __init__(self, engine, model: torch.nn.Module, config: ScaLoRAConfig):
        self.engine = engine
        self.config = config
        self.access = ZeroAccess(engine)
        self.layers: list[AdaptedLinear] = find_adapted_linears(model, config.adapter)
        frozen = [layer.name for layer in self.layers if not (layer.lora_A.requires_grad and layer.lora_B.requires_grad)]
        if frozen:
            raise ValueError(f"the LoRA factors of {frozen[0]} are not trainable; ScaLoRA needs both factors trained")
        self.policies = [get_policy(config.precision, layer.weight.dtype) for layer in self.layers]
        self.merge_state = [
            policy.init_state(self.access.weight_slice(layer.weight)[0])
            for policy, layer in zip(self.policies, self.layers)
        ]
        self.access.own_writable_copies([layer.weight for layer in self.layers])
        # the accumulated-rank sketch of layer i lives on the rank that solves it (i mod N)
        k = config.rank_sketch
        self.sketches = {
            i: RankSketch(self.access.full_shape(layer.lora_B)[0], self.access.full_shape(layer.lora_A)[1], k,
                          seed=i, device=layer.lora_B.device)
            for i, layer in enumerate(self.layers) if k and i % self.access.world == self.access.rank
        }  # fmt: skip
        self.totals = Counter()
        self.last_report: RefreshReport | None = None
        self._wrap_step()

    # -- the hook -------------------------------------------------------------------------------

    def _wrap_step(self) -> None:
        def refresh_if_due(step):
            self.last_report = self.refresh() if self.config.is_due(step) else None

        install_step_hook(self.engine, self.access.kind, refresh_if_due, after=self.access.write_back_grads)

    # -- the refresh ----------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self) -> RefreshReport:
        """Rescale every adapted layer now. Collective: every data-parallel rank must call it."""
        report = RefreshReport(step=self.engine.global_steps)
        full, directions = self._gather_factors_and_grads()
        if not all(torch.isfinite(t).all() for pair in full for t in pair):
            report.solvers["none"] = len(self.layers)
            report.reasons["nonfinite"] = len(self.layers)
            self._count(report)
            return report
        solutions = self._solve_round_robin(full, directions)
        merged = []
        ranks = torch.zeros(len(self.layers), dtype=torch.float64)
        energy = torch.zeros(len(self.layers), dtype=torch.float64)
        for index, (layer, (A, B, _, _), (alpha, beta, used, reason)) in enumerate(zip(self.layers, full, solutions)):
            report.solvers[used] += 1
            if reason:
                report.reasons[reason] += 1
            if used != "none":
                report.merged_sq_norm += self._merge(index, layer, A, B, alpha, beta)
                self._rescale_pieces(layer, alpha, beta)
                if used == "restart":
                    self._reinit_lora_A(index, layer)
                report.alpha_beta.append((alpha * beta).float())
                merged.append(layer.weight)
            sketch = self.sketches.get(index)
            if sketch is not None:
                if used != "none":
                    sketch.add(A, B, 1 - alpha * beta, layer.scale)
                    A, B = A * alpha.to(A), B * beta.to(B)  # the adapter after the rescale
                ranks[index], energy[index] = sketch.measure(A.shape[1], A, B, layer.scale)
        self.access.share_replica_slices(merged)
        # one all-reduce for the merged norm (summed over slices) and the ranks (each from its owner)
        totals = self.access.all_reduce(torch.cat([torch.tensor([report.merged_sq_norm], dtype=torch.float64), ranks,
                                                   energy])
                                        .to(self.layers[0].lora_B.device)).cpu()  # fmt: skip
        report.merged_sq_norm = float(totals[0])
        if self.config.rank_sketch:
            n = len(self.layers)
            report.accumulated_rank = [int(r) for r in totals[1 : 1 + n]]
            report.energy_outside = [float(e) for e in totals[1 + n :]]
        self._count(report)
        return report

    def _gather_factors_and_grads(self):
        """Full (A, B, grad_A, grad_B) of every layer, paper orientation, fp32: one all-reduce (none at
        ZeRO-0). With solver "adam" also Adam's next step directions (U_A, U_B), computed elementwise on
        each rank's pieces and assembled in the same all-reduce; otherwise None."""
        adam = self.config.solver == "adam"
        sizes = [math.prod(self.access.full_shape(p)) for layer in self.layers for p in (layer.lora_B, layer.lora_A)]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        total = offsets[-1]
        blocks = 3 if adam else 2  # masters, gradients[, directions]
        device = self.layers[0].lora_B.device
        buffer = torch.zeros(blocks * total, dtype=torch.float32, device=device)
        for i, layer in enumerate(self.layers):
            for j, p in enumerate((layer.lora_B, layer.lora_A)):
                piece = self.access.piece(p)
                if piece is None:
                    continue
                at = offsets[2 * i + j] + piece.start
                buffer[at : at + piece.numel] = piece.master
                if piece.grad is not None:
                    buffer[total + at : total + at + piece.numel] = piece.grad.float()
                    if adam:
                        buffer[2 * total + at : 2 * total + at + piece.numel] = piece.adam_direction().float()
        self.access.join_pieces(buffer)
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
        return full, (directions if adam else None)

    def _solve_round_robin(self, full, directions=None):
        """Layer i is solved on rank i mod N; one all-reduce shares the packed results."""
        rank, world = self.access.rank, self.access.world
        widths = [2 * A.shape[1] + 1 for A, _, _, _ in full]
        packed = torch.zeros(sum(widths), dtype=torch.float64, device=full[0][0].device)
        at = 0
        for i, ((A, B, gA, gB), layer) in enumerate(zip(full, self.layers)):
            if i % world == rank:
                if self.config.restart:
                    sol = restart_solution(A.shape[1])
                else:
                    sol = solve_scaling(A, B, gA, gB, self.config.strength, solver=self.config.solver, scale=layer.scale,
                                        directions=directions[i] if directions else None,
                                        **self.config.solve_options())
                r = A.shape[1]
                packed[at : at + r] = sol.alpha
                packed[at + r : at + 2 * r] = sol.beta
                packed[at + 2 * r] = _SOLVERS.index(sol.solver_used) * 10 + _REASONS.index(sol.reason)
            at += widths[i]
        self.access.all_reduce(packed)
        out, at = [], 0
        for A, _, _, _ in full:
            r = A.shape[1]
            code = int(packed[at + 2 * r])
            out.append((packed[at : at + r].clone(), packed[at + r : at + 2 * r].clone(), _SOLVERS[code // 10], _REASONS[code % 10]))
            at += 2 * r + 1
        return out

    def _merge(self, index: int, layer: AdaptedLinear, A, B, alpha, beta) -> float:
        """Merge into this rank's slice of the frozen weight; returns the slice's ‖delta‖²."""
        target, start = self.access.weight_slice(layer.weight)
        dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
        delta = merge_delta_flat(A, B, alpha, beta, layer.scale, start, target.numel(), layer.fan_in_fan_out, dtype)
        seed = ((self.config.seed * 1_000_003 + self.engine.global_steps) * 10_007 + index) * 65_537 + self.access.rank
        state = self.merge_state[index]
        self.policies[index].merge_(target, delta.to(target.device), state, seed=seed)
        return float(delta.pow(2).sum(dtype=torch.float64))

    def _rescale_pieces(self, layer: AdaptedLinear, alpha, beta) -> None:
        """Scale this rank's pieces of masters, gradients and moments (spec §4 steps 4 to 6, crossed)."""
        # lora_B is the paper's A (columns scaled by α, gradients/moments by β); lora_A = Bᵀ (rows by β / α)
        for p, axis, own, crossed in ((layer.lora_B, 1, alpha, beta), (layer.lora_A, 0, beta, alpha)):
            piece = self.access.piece(p)
            if piece is None:
                continue
            shape = self.access.full_shape(p)
            k_own = expand_column_scale(own.to(piece.master.device), shape, axis, piece.start, piece.numel)
            k_cross = expand_column_scale(crossed.to(piece.master.device), shape, axis, piece.start, piece.numel)
            piece.master.mul_(k_own.to(piece.master.dtype))
            if piece.grad is not None:
                piece.grad.mul_(k_cross.to(piece.grad.dtype))
            for name, t in piece.moments.items():
                if name not in MOMENT_POWERS:
                    raise ValueError(
                        f"optimizer state {name!r} has no known rule under column rescaling; "
                        f"supported: {sorted(MOMENT_POWERS)} (use torch.optim.AdamW)"
                    )
                t.mul_(k_cross.to(t.dtype) ** MOMENT_POWERS[name])

    def _reinit_lora_A(self, index: int, layer: AdaptedLinear) -> None:
        """ReLoRA's restart: a fresh PEFT init of lora_A (the same draw on every rank), piece by piece."""
        gen = torch.Generator().manual_seed(restart_seed(self.config.seed, self.engine.global_steps, index))
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
        full = torch.zeros(self.access.weight_numel(layer.weight), dtype=value.dtype, device=value.device)
        full[start : start + value.numel()] = value  # each rank contributes only its own slice
        return self.access.all_reduce(full).view(self.access.weight_shape(layer.weight))

    def _count(self, report: RefreshReport) -> None:
        self.totals["refreshes"] += 1
        self.totals.update({f"solver/{k}": v for k, v in report.solvers.items()})
        self.totals.update({f"reason/{k}": v for k, v in report.reasons.items()})

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The replicated part of the state; it goes into ``client_state`` and into every shard file."""
        return {"config": asdict(self.config), "totals": dict(self.totals), "world": self.access.world,
                "layers": [layer.name for layer in self.layers]}

    def shard_path(self, tag_dir: str) -> str:
        return shards.shard_path(tag_dir, self.access.rank, self.access.world, "scalora")

    def save_shard(self, tag_dir: str) -> None:
        """Write this rank's merge-state shard into a checkpoint's tag directory (atomic rename)."""
        sketches = {i: sketch.Y for i, sketch in self.sketches.items()}
        shards.write(self.shard_path(tag_dir), shards.ScaLoRAShard(**self.state_dict(), rank=self.access.rank,
                                                                   merge_state=self.merge_state, sketches=sketches))
        if dist.is_initialized():
            dist.barrier()

    def load_shard(self, tag_dir: str) -> None:
        """Restore this rank's merge-state shard and the counters from a checkpoint's tag directory."""
        path = self.shard_path(tag_dir)
        if not os.path.isfile(path):
            other = shards.other_world(tag_dir, "scalora", self.access.world)
            if other:
                raise ValueError(
                    f"{tag_dir} holds ScaLoRA shards for another world size ({other}); this run has "
                    f"{self.access.world} data-parallel ranks: resume at the same world size or convert the checkpoint"
                )
            raise FileNotFoundError(f"missing ScaLoRA merge-state shard {path}: the checkpoint is incomplete")
        saved = shards.read(path, "scalora")
        if saved.layers != [layer.name for layer in self.layers]:
            raise ValueError(f"{path} was written for different adapted layers than this model has")
        for mine, theirs in zip(self.merge_state, saved.merge_state):
            if (mine is None) != (theirs is None) or (mine is not None and mine.shape != theirs.shape):
                raise ValueError(f"{path}: merge state does not match this run's precision policy or sharding")
            if mine is not None:
                mine.copy_(theirs)
        for i, Y in saved.sketches.items():
            if i in self.sketches:
                self.sketches[i].load_(Y)
        self.totals = Counter(saved.totals)

    def save_checkpoint(self, save_dir: str, tag=None, client_state: dict | None = None, **kwargs) -> None:
        """``engine.save_checkpoint`` plus this rank's merge-state shard, written beside it."""
        if kwargs.get("exclude_frozen_parameters"):
            raise ValueError("exclude_frozen_parameters=True would drop the merged weights from the checkpoint")
        tag = str(tag if tag is not None else f"global_step{self.engine.global_steps}")
        client_state = {**(client_state or {}), "ds_scalora": self.state_dict()}
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, **kwargs)
        self.save_shard(os.path.join(save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag=None, **kwargs):
        """``engine.load_checkpoint`` plus this rank's merge-state shard; returns what the engine returns."""
        tag = tag if tag is not None else latest_tag(load_dir)
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is not None:
            self.load_shard(os.path.join(load_dir, str(tag)))
        return path, client_state


def attach(engine, model: torch.nn.Module | None = None, config: ScaLoRAConfig | None = None, **options) -> ZeroScaLoRA:
    """Attach ScaLoRA to a DeepSpeed engine built from a PEFT LoRA model; returns the controller.

    ``options`` are :class:`ScaLoRAConfig` fields (``interval=10``, ``strength="auto"``, ...). The
    engine must have been built with a stock optimizer (``torch.optim.AdamW``) over the LoRA factors.
    """
    if config is not None and options:
        raise ValueError("pass either config or keyword options, not both")
    config = config or ScaLoRAConfig(**options)
    return ZeroScaLoRA(engine, model if model is not None else engine.module, config)

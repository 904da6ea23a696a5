"""ElaLoRA (arXiv 2504.00254) with fixed buffers: ranks move between matrices, shapes never change.

Usage, in any plain PyTorch (or DDP) loop::

    model = elastic_lora_model(base, target_modules=[...], init_rank=8, max_rank=16, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
    ela = ElaLoRA(model, opt, ElaLoRAConfig(init_rank=8, max_rank=16, total_steps=T))
    for batch in loader:
        model(**batch).loss.backward()
        ela.after_backward()        # before clipping and the optimizer step
        clip_grad_norm_(...); opt.step(); opt.zero_grad()

Every adapted matrix is PEFT AdaLoRA's ``SVDLinear`` with R = ``max_rank`` slots, of which ``init_rank``
start active (the budget: ``init_rank`` x matrices, constant through every round). An inactive slot
holds exact zeros in P, λ, Q and in their optimizer moments: its contribution and all its gradients
are exactly zero, so the optimizer leaves it at zero with no masking anywhere. Per optimizer step,
in the window between the gradient reduction and the step (the one ScaLoRA uses under ZeRO):

1. the orthogonality regulariser's gradient is added to the gradients (spec §A.5; the same as adding
   ``orth_reg · mean_tensors ‖·‖_F`` to the loss, clipped with it, without a gather in the forward);
2. the importance averages advance (§A.2) until the final phase;
3. on a reallocation step (§A.4) the slot scores are all-reduced, every rank plans the same moves
   (§A.3), pruned slots are zeroed (values, gradients, moments, averages) and grown slots receive
   orthogonalised random unit directions in P and Q, λ = ``init_value`` (≈ 0: the output is unchanged)
   and fresh zero moments for their own entries only. Nothing else is touched: every other entry keeps
   its moments bit for bit, the optimizer and its learning-rate schedule are the same objects.

The class :class:`ElasticRanks` does this on *pieces* (``ds_scalora.pieces``): the whole tensors here,
each rank's ZeRO shard in ``ds_scalora.zero`` — one mechanism for every stage.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .. import elastic
from ..pieces import LocalAccess, Piece
from .elalora_config import ElaLoRAConfig
from .svd_layers import SVDAdapted, find_svd_layers, svd_scale


def elastic_lora_model(base: torch.nn.Module, target_modules, init_rank: int = 8, max_rank: int = 16,
                       alpha: float = 16.0, dropout: float = 0.0, total_steps: int = 1, task_type="CAUSAL_LM"):  # fmt: skip
    """Wrap ``base`` with PEFT AdaLoRA ``SVDLinear`` layers of ``max_rank`` slots, ``init_rank`` active.

    The scale is ``alpha / init_rank`` for the whole run (``ranknum`` = r0, as the official code has it);
    AdaLoRA's init (λ = 0, P and Q ~ N(0, 0.02²)) on the active slots, exact zeros on the others. PEFT's
    own regulariser in ``AdaLoraModel.forward`` is bypassed: ElaLoRA adds its gradient itself.
    """
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=max_rank, target_r=init_rank, lora_alpha=alpha, lora_dropout=dropout,
                           target_modules=target_modules if isinstance(target_modules, str) else list(target_modules), total_step=max(2, total_steps), tinit=0, tfinal=0,
                           orth_reg_weight=0.0, task_type=task_type)  # fmt: skip
    model = get_peft_model(base, config)
    inner = model.base_model
    # no PEFT regulariser pass (it would gather every factor under ZeRO-3). Looked up at each call, not bound
    # now: hosts patch the base model's forward later (TRL's SFTTrainer adds a fused LM head)
    inner.forward = lambda *args, **kwargs: inner.model.forward(*args, **kwargs)
    with torch.no_grad():
        for layer in find_svd_layers(model):
            layer.module.ranknum[layer.adapter].fill_(float(init_rank))
            layer.lam.zero_()
            layer.Q[init_rank:].zero_()
            layer.P[:, init_rank:].zero_()
    return model


@dataclass
class RoundReport:
    """What one optimizer step's window did, for logging."""

    step: int
    moves: int = 0  # ranks pruned (= ranks grown) this step
    pruned: list = field(default_factory=list)  # (layer name, slot)
    grown: list = field(default_factory=list)  # (layer name, slot)
    ranks: list = field(default_factory=list)  # active ranks per layer after the step's round
    orth_penalty: float | None = None  # mean over the P and Q tensors of ‖·‖_F
    skipped: str | None = None  # "nonfinite" when the gradients were not finite


class ElasticRanks:
    """ElaLoRA's state and its per-step work, on this rank's pieces (see the module docstring).

    ``access`` provides ``piece(p)``, ``full_shape(p)``, ``join_pieces(buffer)`` and ``all_reduce(t)``: a
    :class:`~ds_scalora.pieces.LocalAccess` in one process, a ``ZeroAccess`` inside DeepSpeed.
    ``on_step`` is collective: every data-parallel rank calls it at every optimizer step.
    """

    def __init__(self, layers: list[SVDAdapted], config: ElaLoRAConfig, access):
        self.layers, self.config, self.access = layers, config, access
        self.shapes = [{name: tuple(access.full_shape(p)) for name, p, _ in layer.factors()} for layer in layers]
        for layer, shapes in zip(layers, self.shapes):
            R = shapes["P"][1]
            if shapes["Q"][0] != R or shapes["lam"] != (R, 1):
                raise ValueError(f"{layer.name}: P, λ, Q shapes {shapes} do not share one rank")
            if R != config.max_rank:
                raise ValueError(f"{layer.name} has {R} slots but max_rank is {config.max_rank}: build the model "
                                 "with elastic_lora_model(..., max_rank=config.max_rank)")  # fmt: skip
        # the gather buffer's layout: every Q, then every P, those of one shape side by side, so that a shape's
        # factors are one (n x R x d or n x d x R) view for the regulariser, with no copy
        self.offsets, self.groups, at = {}, [], 0  # (layer, "P"/"Q") -> offset; (name, members, offset, shape)
        for name in ("Q", "P"):
            by_shape: dict = {}
            for i, shapes in enumerate(self.shapes):
                by_shape.setdefault(shapes[name], []).append(i)
            for shape, members in by_shape.items():
                self.groups.append((name, members, at, shape))
                for i in members:
                    self.offsets[(i, name)], at = at, at + math.prod(shape)
        self.gather_numel = at
        self.scales = [svd_scale(float(layer.module.scaling[layer.adapter]), config.init_rank) for layer in layers]
        self.active = [torch.arange(config.max_rank) < config.init_rank for _ in layers]
        self.ema: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # this rank's pieces only
        self.rounds: list[dict] = [{"step": 0, "moves": 0, "ranks": self.ranks()}]
        self.totals = Counter()

    # -- what the budget looks like ------------------------------------------------------------

    def ranks(self) -> list[int]:
        return [int(a.sum()) for a in self.active]

    def rank_pattern(self) -> dict[str, int]:
        return {layer.name: r for layer, r in zip(self.layers, self.ranks())}

    @property
    def budget(self) -> int:
        return self.config.init_rank * len(self.layers)

    # -- the per-step work ---------------------------------------------------------------------

    @torch.no_grad()
    def on_step(self, step: int) -> RoundReport:
        """Regulariser, importance and (when due) one reallocation round before optimizer step ``step``."""
        cfg = self.config
        report = RoundReport(step=step)
        pieces = [{name: self.access.piece(p) for name, p, _ in layer.factors()} for layer in self.layers]
        moves = cfg.moves_at(step)
        need_full = cfg.orth_reg > 0 or moves > 0
        buffer, finite = self._gather_masters(pieces, need_full)
        if not finite:
            report.skipped = "nonfinite"
            report.ranks = self.ranks()
            self.totals["skipped_nonfinite"] += 1
            return report
        full = None if buffer is None else self._full_views(buffer)
        if cfg.orth_reg > 0:
            report.orth_penalty = self._add_orthogonality_grad(pieces, buffer)
        if elastic.scores_are_updated(step, cfg.total_steps, cfg.final_warmup):
            ipts, uncs, values, grads = [], [], [], []
            for i, layer_pieces in enumerate(pieces):
                for name, piece in layer_pieces.items():
                    if piece is not None and piece.grad is not None:
                        ipt, unc = self._ema(i, name, piece)
                        ipts.append(ipt), uncs.append(unc), values.append(piece.master), grads.append(piece.grad)
            elastic.update_importances_(ipts, uncs, values, grads, cfg.beta1, cfg.beta2)
        if moves > 0:
            self._reallocate(step, moves, pieces, full, report)
        report.ranks = self.ranks()
        return report

    def _ema(self, i: int, name: str, piece: Piece):
        if (i, name) not in self.ema:
            z = torch.zeros(piece.numel, dtype=torch.float32, device=piece.master.device)
            self.ema[(i, name)] = (z, z.clone())
        return self.ema[(i, name)]

    def _gather_masters(self, pieces, need_full: bool):
        """The full fp32 P and Q of every layer in one buffer (one all-reduce; its layout: ``self.groups``) if
        needed, and whether every rank's gradients are finite (carried by the same all-reduce, or by a
        one-element one)."""
        grads = [piece.grad for layer_pieces in pieces for piece in layer_pieces.values()
                 if piece is not None and piece.grad is not None and piece.grad.numel()]
        # one multi-tensor L2 norm per gradient and one host read: NaN and ±Inf propagate through it (the
        # fastest of the checks measured on the CPU: 4 ms over 630 tensors, isfinite().all() 17 ms, the max
        # norm 24 ms). A gradient whose squares overflow (entries near 1e19 in fp32) reads as non-finite too:
        # the step's ElaLoRA work is skipped and nothing is written, as for a NaN
        device = self.layers[0].P.device
        local_bad = bool(grads) and not bool(torch.stack([n.float().to(device) for n in torch._foreach_norm(grads, 2)])
                                             .isfinite().all())
        if not need_full:
            flag = self.access.all_reduce(torch.tensor([float(local_bad)], device=device))
            return None, float(flag[0]) == 0
        buffer = torch.zeros(self.gather_numel + 1, dtype=_work_dtype(pieces), device=device)
        into, values = [], []
        for i, layer_pieces in enumerate(pieces):
            for name in ("P", "Q"):
                piece = layer_pieces[name]
                if piece is not None:
                    at = self.offsets[(i, name)] + piece.start
                    into.append(buffer[at : at + piece.numel])
                    values.append(piece.master)
        if into:
            torch._foreach_copy_(into, values)  # one multi-tensor call, converting to the work dtype
        buffer[-1] = float(local_bad)  # joined like a piece: summed over shards; at ZeRO-0 the same on every rank
        self.access.join_pieces(buffer)
        if float(buffer[-1]) != 0:
            return None, False
        return buffer[:-1], True

    def _full_views(self, buffer: torch.Tensor) -> list[dict]:
        """Per layer, its full P and Q: views into the gathered buffer."""
        return [{name: buffer[self.offsets[(i, name)] : self.offsets[(i, name)] + math.prod(self.shapes[i][name])]
                 .view(self.shapes[i][name]) for name in ("P", "Q")} for i in range(len(self.layers))]  # fmt: skip

    def _add_orthogonality_grad(self, pieces, buffer: torch.Tensor) -> float:
        """Add ``orth_reg/N · ∇‖·‖_F`` of every P and Q (N = 2 x layers, PEFT's mean) to the gradients; the
        factors of one shape in one batch (:func:`~ds_scalora.elastic.orthogonality_penalties`), read as one
        view of the gathered buffer."""
        coef = self.config.orth_reg / (2 * len(self.layers))
        norms, into, adds = [], [], []
        for name, members, at, shape in self.groups:
            M = buffer[at : at + len(members) * math.prod(shape)].view(len(members), *shape)
            active = torch.stack([self.active[i] for i in members]).to(M.device)
            norm, grad = elastic.orthogonality_penalties(M, active, rows=name == "Q")
            norms.append(norm)
            for k, i in enumerate(members):
                piece = pieces[i][name]
                if piece is not None and piece.grad is not None:
                    into.append(piece.grad)
                    adds.append(grad[k].reshape(-1)[piece.start : piece.start + piece.numel]
                                .to(device=piece.grad.device, dtype=piece.grad.dtype))
        if into:
            torch._foreach_add_(into, adds, alpha=coef)
        return float(torch.cat(norms).sum()) / (2 * len(self.layers))

    def _reallocate(self, step: int, moves: int, pieces, full, report: RoundReport) -> None:
        cfg = self.config
        parts = []
        for i, layer_pieces in enumerate(pieces):
            S = torch.zeros(cfg.max_rank, dtype=torch.float64, device=full[i]["P"].device)
            for name, p, axis in self.layers[i].factors():
                piece = layer_pieces[name]
                if piece is not None and (i, name) in self.ema:
                    ipt, unc = self.ema[(i, name)]
                    S += elastic.slot_score_part(ipt, unc, piece.start, self.shapes[i][name], axis, cfg.max_rank).to(S.device)
            parts.append(S)
        scores = self.access.join_pieces(torch.cat(parts)).cpu().view(len(self.layers), cfg.max_rank)
        prune, grow = elastic.plan_moves(list(scores), self.active, cfg.per_matrix, moves)
        for i, j in prune:
            self._write_slot(i, j, pieces[i], None)
            self.active[i][j] = False
            full[i]["P"][:, j] = 0
            full[i]["Q"][j] = 0
            report.pruned.append((self.layers[i].name, j))
        for i in grow:
            j = int(torch.nonzero(~self.active[i])[0])
            gen = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 10_007 + i) * 101 + j)
            act = self.active[i].to(full[i]["Q"].device)
            q = elastic.orthogonal_direction(full[i]["Q"][act], gen)
            p = elastic.orthogonal_direction(full[i]["P"][:, act].T, gen)
            self._write_slot(i, j, pieces[i], {"Q": q, "P": p, "lam": torch.tensor([cfg.init_value], dtype=torch.float64)})
            self.active[i][j] = True
            full[i]["Q"][j] = q.to(full[i]["Q"])
            full[i]["P"][:, j] = p.to(full[i]["P"])
            report.grown.append((self.layers[i].name, j))
        report.moves = len(grow)
        self.totals["rounds"] += 1
        self.totals["moved"] += len(grow)
        self.rounds.append({"step": step, "moves": len(grow), "ranks": self.ranks()})

    def _write_slot(self, i: int, j: int, layer_pieces: dict, values: dict | None) -> None:
        """Slot j of layer i on this rank's pieces: values (or zeros), zero gradient, moments and averages."""
        for name, _, axis in self.layers[i].factors():
            piece = layer_pieces[name]
            if piece is None:
                continue
            shape = self.shapes[i][name]
            slots = elastic.slot_of(piece.start, piece.numel, shape, axis, device=piece.master.device)
            local = torch.nonzero(slots == j).flatten()
            if local.numel() == 0:
                continue
            if values is None:
                piece.master[local] = 0
            else:  # the component index of each entry: its column (Q, λ) or its row (P)
                flat = local + piece.start
                comp = flat % shape[1] if axis == 0 else flat // shape[1]
                piece.master[local] = values[name].to(piece.master.device)[comp].to(piece.master.dtype)
            if piece.grad is not None:
                piece.grad[local] = 0
            for t in piece.moments.values():
                t[local] = 0
            if (i, name) in self.ema:
                for t in self.ema[(i, name)]:
                    t[local] = 0

    # -- full tensors (collective) and checkpoints ---------------------------------------------------

    @torch.no_grad()
    def full_factors(self) -> list[dict]:
        """Every layer's full fp32 P, λ, Q, assembled from all ranks' pieces (collective)."""
        out = []
        for layer in self.layers:
            entry = {}
            for name, p, _ in layer.factors():
                shape = tuple(self.access.full_shape(p))
                buf = torch.zeros(math.prod(shape), dtype=torch.float32, device=layer.P.device)
                piece = self.access.piece(p, grad=False)
                if piece is not None:
                    buf[piece.start : piece.start + piece.numel] = piece.master.float()
                entry[name] = self.access.join_pieces(buf).view(shape).cpu()
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        """The replicated state (config, masks, history); the averages are per rank: see ``ema_state``."""
        return {"config": asdict(self.config), "layers": [layer.name for layer in self.layers],
                "active": [a.clone() for a in self.active], "rounds": self.rounds, "totals": dict(self.totals)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state["layers"] != [layer.name for layer in self.layers]:
            raise ValueError("the checkpoint's ElaLoRA state was written for different adapted layers")
        saved = ElaLoRAConfig(**state["config"])
        if (saved.init_rank, saved.max_rank) != (self.config.init_rank, self.config.max_rank):
            raise ValueError(f"checkpoint has init_rank={saved.init_rank}, max_rank={saved.max_rank}; this run "
                             f"has {self.config.init_rank}, {self.config.max_rank}")  # fmt: skip
        self.active = [a.clone().bool() for a in state["active"]]
        self.rounds = list(state["rounds"])
        self.totals = Counter(state["totals"])

    def ema_state(self) -> dict:
        return {f"{i}/{name}": torch.stack(pair) for (i, name), pair in self.ema.items()}

    def load_ema_state(self, state: dict) -> None:
        """Importance averages from :meth:`ema_state`, placed with the factors (a checkpoint is read
        to the CPU; a step on a GPU would otherwise mix devices)."""
        self.ema = {}
        for key, stacked in state.items():
            i, name = key.split("/")
            device = getattr(self.layers[int(i)], name).device
            self.ema[(int(i), name)] = (stacked[0].to(device, copy=True), stacked[1].to(device, copy=True))


class ElaLoRA:
    """ElaLoRA on a PEFT AdaLoRA model with a stock torch optimizer: the single-process reference."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ElaLoRAConfig,
                 resuming: bool = False):  # fmt: skip
        """``resuming``: the factors already hold a checkpoint's (moved) slots; :meth:`load_state_dict` follows."""
        layers = find_svd_layers(model, config.adapter)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in layers if not {id(p) for _, p, _ in layer.factors()} <= in_optimizer]
        if missing:
            raise ValueError(f"the optimizer does not train the factors of {missing[0]}; build it from the "
                             "model's trainable parameters")  # fmt: skip
        if not resuming:
            _check_inactive_slots_zero(layers, config)
        self.optimizer = optimizer
        self.core = ElasticRanks(layers, config, LocalAccess(optimizer))
        self.step = 0
        self.last_report: RoundReport | None = None

    @property
    def layers(self) -> list[SVDAdapted]:
        return self.core.layers

    def after_backward(self) -> RoundReport:
        """Call once per optimizer step, after backward and before clipping and the step."""
        for layer in self.layers:
            for _, p, _ in layer.factors():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.last_report = self.core.on_step(self.step)
        self.step += 1
        return self.last_report

    def rank_pattern(self) -> dict[str, int]:
        return self.core.rank_pattern()

    def state_dict(self) -> dict:
        return {**self.core.state_dict(), "step": self.step, "ema": self.core.ema_state()}

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state)
        self.core.load_ema_state(state["ema"])
        self.step = int(state["step"])


def _work_dtype(pieces) -> torch.dtype:
    """fp32 (the ZeRO masters), or fp64 when the model is trained in fp64 (the float64 references)."""
    f64 = any(p is not None and p.master.dtype == torch.float64 for lp in pieces for p in lp.values())
    return torch.float64 if f64 else torch.float32


def _check_inactive_slots_zero(layers: list[SVDAdapted], config: ElaLoRAConfig) -> None:
    for layer in layers:
        if layer.Q.numel() == 0:  # partitioned (ZeRO-3): checked by elastic_lora_model's construction
            continue
        r0 = config.init_rank
        if layer.Q[r0:].abs().sum() or layer.P[:, r0:].abs().sum() or layer.lam[r0:].abs().sum():
            raise ValueError(f"{layer.name}: slots beyond init_rank={r0} are not zero; build the model with "
                             "ds_scalora.methods.elastic_lora_model(..., init_rank=r0)")  # fmt: skip


def active_slots_lora_fields(rank_pattern: dict[str, int]) -> dict:
    """The ``LoraConfig`` fields of the plain LoRA adapter :func:`lora_adapter_tensors` builds: each module's
    own rank (``rank_pattern``) and scaling 1 (``alpha_pattern`` = ``rank_pattern``; ``r`` = ``lora_alpha`` =
    the largest rank)."""
    r = max(rank_pattern.values())
    return {"r": r, "lora_alpha": r, "rank_pattern": dict(rank_pattern), "alpha_pattern": dict(rank_pattern)}


def lora_adapter_tensors(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor, active: torch.Tensor, scale: float):
    """(lora_A, lora_B) of a plain LoRA layer with PEFT scaling 1 that equals ``scale·P diag(λ) Q`` on
    the active slots: lora_A = Q[active], lora_B = scale·P[:, active]·λ[active]."""
    act = active.to(P.device)
    return Q[act].clone(), (scale * P[:, act] * lam[act].view(1, -1)).clone()

"""A rank's piece of a trainable parameter: the common currency of the methods and the ZeRO layer.

Under ZeRO each data-parallel rank holds a contiguous range of every flattened trainable parameter
(possibly empty); without ZeRO the one piece is the whole parameter. Methods that work entry by entry
(importance scores, slot resets) operate on pieces and never need to know which case they are in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Piece:
    """Elements ``[start, start + numel)`` of a flattened trainable parameter, held by this rank."""

    start: int
    numel: int
    master: torch.Tensor  # fp32 (or the parameter's own dtype) view, 1-D, writable
    grad: torch.Tensor | None  # view of the reduced gradient, 1-D
    moments: dict  # optimizer state name -> 1-D view; empty before the first optimizer step
    # the optimizer's param group and state holding this piece (references: read only by adam_direction)
    group: dict | None = None
    state: dict | None = None

    def adam_direction(self):
        """Adam's next step direction on this piece (``ds_scalora.scaling.adam_direction``), float64."""
        from .scaling import adam_direction

        hyper = adam_hyper(self.group or {}, self.state or {})
        if hyper is None:
            raise ValueError("solver='adam' models Adam's next step, but the optimizer has no 'betas' "
                             "(not Adam/AdamW): use solver='column' or 'nnls' with this optimizer")
        return adam_direction(self.grad, self.moments.get("exp_avg"), self.moments.get("exp_avg_sq"),
                              hyper["step"], hyper["betas"], hyper["eps"])


def adam_hyper(group: dict, state: dict) -> dict | None:
    """Betas, eps and the steps taken, from a torch optimizer's param group and one parameter's state;
    None for an optimizer that is not of the Adam family (no ``betas``)."""
    if "betas" not in group:
        return None
    step = state.get("step", 0)
    return {"betas": tuple(group["betas"]), "eps": float(group["eps"]),
            "step": int(step.item() if torch.is_tensor(step) else step)}


class LocalAccess:
    """Pieces of a model trained by a plain torch optimizer in one process (or under DDP, where every
    replica holds the same reduced gradients): each piece is the whole parameter; nothing communicates.
    Mirrors the surface of ``ds_scalora.zero.state_access.ZeroAccess``."""

    rank, world = 0, 1

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.opt = optimizer
        self._groups: dict = {}  # id(param) -> its param group (a scan of every group per piece is quadratic)

    def piece(self, p: torch.nn.Parameter, grad: bool = True) -> Piece:
        state = self.opt.state.get(p, {})
        moments = {k: v.view(-1) for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        g = p.grad.view(-1) if grad and p.grad is not None else None
        group = self._groups.get(id(p))
        if group is None:  # first sight, or a param group added since (torch optimizers only add groups)
            self._groups = {id(q): gr for gr in self.opt.param_groups for q in gr["params"]}
            group = self._groups[id(p)]
        return Piece(0, p.numel(), p.data.view(-1), g, moments, group, state)

    def full_shape(self, p: torch.nn.Parameter) -> torch.Size:
        return p.shape

    def join_pieces(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer

    # frozen weights: the one slice is the whole weight, flat (merges need it contiguous)

    def weight_slice(self, W: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
        if not W.data.is_contiguous():
            raise ValueError("ScaLoRA merges into the frozen weight in place; this weight is not contiguous")
        return W.data.view(-1), 0

    def weight_numel(self, W: torch.nn.Parameter) -> int:
        return W.numel()

    def weight_shape(self, W: torch.nn.Parameter) -> torch.Size:
        return W.shape

    def own_writable_copies(self, weights: list) -> None:
        """As ``ZeroAccess.own_writable_copies``: weights mapped copy-on-write from a safetensors file are
        rewritten once at start-up, so the first refresh does not pay the page faults."""
        rewrite_private(weights)

    def share_replica_slices(self, weights: list) -> None:
        """Nothing: one process holds the only copy."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t


def rewrite_private(weights: list) -> None:
    """Rewrite CPU weights bit for bit, so that pages mapped copy-on-write from a safetensors file become
    this process's own before the first merge (which would otherwise fault every page at once)."""
    for W in weights:
        if W.device.type == "cpu" and W.numel():
            W.data.copy_(W.data.clone())

"""ElaLoRA's math (arXiv 2504.00254): importance scores, the move schedule, the prune/expand plan,
fresh orthogonal directions and the orthogonality regulariser. Pure functions on small tensors.

Notation (shared/research/elalora-rslora-peft.md §A): an adapted matrix carries ``ΔW = s·P diag(λ) Q``
with P = PEFT AdaLoRA's ``lora_B`` (d_out x R), λ = ``lora_E`` (R x 1), Q = ``lora_A`` (R x d_in), R the
fixed maximum rank of the buffers. Slot j (the triplet P[:, j], λ_j, Q[j, :]) is *active* or not; an
inactive slot holds exact zeros, so it contributes nothing and receives zero gradients.

* §A.2 importance, per entry w:  I = |w·∂L/∂w|,  Ī ← β1·Ī + (1−β1)·I,  Ū ← β2·Ū + (1−β2)·|I − Ī|,
  s = Ī·Ū; the score of slot j is  S_j = s(λ_j) + mean_k s(Q_jk) + mean_k s(P_kj).
* §A.3 one round moves b ranks: every matrix offers its k_i = min(k, r_i − 1) weakest active slots;
  the b weakest offers are pruned, the matrices behind the b strongest offers grow one slot each.
* §A.4 schedule: b_t = round(b0·(1 − p³)), p the progress through the reallocation phase.
* §A.5 regulariser: R = ‖Q Qᵀ − I_active‖_F + ‖Pᵀ P − I_active‖_F (Frobenius norm, not squared).
"""

from __future__ import annotations

import math

import torch

# -- importance (§A.2) ---------------------------------------------------------------------------


def update_importance_(ema_ipt: torch.Tensor, ema_unc: torch.Tensor, value: torch.Tensor, grad: torch.Tensor,
                       beta1: float, beta2: float) -> None:  # fmt: skip
    """Advance the two exponential moving averages of one tensor's entries in place."""
    update_importances_([ema_ipt], [ema_unc], [value], [grad], beta1, beta2)


def update_importances_(ema_ipt: list, ema_unc: list, values: list, grads: list, beta1: float, beta2: float) -> None:
    """:func:`update_importance_` of many tensors (fp32 averages) in a few multi-tensor calls: the same
    elementwise operations in the same order, so the same bits."""
    if not ema_ipt:
        return
    sens = torch._foreach_mul([v.float() for v in values], [g.float() for g in grads])
    torch._foreach_abs_(sens)
    torch._foreach_lerp_(ema_ipt, sens, 1 - beta1)  # Ī + (1−β1)(I − Ī): one pass where mul_ and add_ took two
    torch._foreach_sub_(sens, ema_ipt)  # sens − Ī, in place: sens is not needed after this
    torch._foreach_abs_(sens)
    torch._foreach_lerp_(ema_unc, sens, 1 - beta2)


def slot_of(start: int, numel: int, shape: tuple[int, int], slot_axis: int, device=None) -> torch.Tensor:
    """Slot index of each element ``[start, start+numel)`` of a row-major (rows x cols) tensor.

    Q (``lora_A``, R x d_in) and λ (R x 1) have their slots along axis 0, P (``lora_B``, d_out x R) along
    axis 1. Works on any contiguous piece of the flattened tensor, as ZeRO shards it.
    """
    idx = torch.arange(start, start + numel, device=device)
    return idx // shape[1] if slot_axis == 0 else idx % shape[1]


def slot_score_part(ema_ipt: torch.Tensor, ema_unc: torch.Tensor, start: int, shape: tuple[int, int],
                    slot_axis: int, rank: int) -> torch.Tensor:  # fmt: skip
    """This piece's contribution to the slot scores S (float64, length ``rank``): its entries' scores
    summed per slot and divided by the slot's full length, so that the parts of all pieces add up to
    the mean over the slot."""
    score = (ema_ipt.double() * ema_unc.double()).view(-1)
    out = torch.zeros(rank, dtype=torch.float64, device=score.device)
    if score.numel() == 0:
        return out
    # the piece laid into the whole rows it touches, summed along one axis: a fixed order of additions on
    # every device (index_add_ adds with atomics on CUDA, so replicas that each score their own copy, at
    # ZeRO-0 or under DDP, could rank two near-equal slots differently and prune different ones)
    cols = shape[1]
    first, last = start // cols, (start + score.numel() - 1) // cols
    rows = torch.zeros((last - first + 1) * cols, dtype=torch.float64, device=score.device)
    rows[start - first * cols : start - first * cols + score.numel()] = score
    rows = rows.view(-1, cols)
    if slot_axis == 0:
        out[first : last + 1] = rows.sum(1)
    else:
        out += rows.sum(0)
    return out / shape[1 - slot_axis]


# -- schedule (§A.4) -----------------------------------------------------------------------------


def moves_at(step: int, total_steps: int, init_warmup: int, final_warmup: int, interval: int, moves: int) -> int:
    """Ranks moved (pruned, and as many added) before optimizer step ``step`` (0-based); 0 if none.

    Reallocation rounds happen at ``init_warmup < step < total_steps − final_warmup`` with
    ``(step − init_warmup) % interval == 0``; the count decays cubically from ``moves`` to 0.
    """
    end = total_steps - final_warmup
    if not (init_warmup < step < end) or (step - init_warmup) % interval:
        return 0
    progress = min(1.0, max(0.0, (step - init_warmup) / max(1, end - init_warmup)))
    return int(round(moves * (1 - progress**3)))


def scores_are_updated(step: int, total_steps: int, final_warmup: int) -> bool:
    """The importance averages advance at every step before the final (frozen-rank) phase."""
    return step < total_steps - final_warmup


# -- the prune/expand plan (§A.3) ----------------------------------------------------------------


def plan_moves(scores: list[torch.Tensor], active: list[torch.Tensor], per_matrix: int, moves: int):
    """Which slots to prune and which matrices to grow, keeping the total active rank constant.

    ``scores[i]``, ``active[i]``: slot scores and the active mask of matrix i (length R_i). Returns
    ``(prune, grow)``: lists of (matrix, slot) and of matrix indices (one entry per added rank), of
    equal length ≤ ``moves``. Ties break on (matrix, slot) order, so every rank plans identically. A
    matrix never loses its last active slot, and grows only into free slots (its buffer's capacity).
    """
    offers = []  # (score, matrix, slot): the k_i weakest active slots of every matrix
    for i, (s, a) in enumerate(zip(scores, active)):
        slots = torch.nonzero(a).flatten().tolist()
        k_i = min(per_matrix, len(slots) - 1)
        if k_i <= 0:
            continue
        ranked = sorted(slots, key=lambda j: (float(s[j]), j))
        offers += [(float(s[j]), i, j) for j in ranked[:k_i]]
    offers.sort(key=lambda o: (o[0], o[1], o[2]))
    for b in range(min(moves, len(offers)), 0, -1):  # fewer moves only when the buffers are full
        prune = [(i, j) for _, i, j in offers[:b]]
        free = [int((~a).sum()) for a in active]
        for i, _ in prune:
            free[i] += 1
        grow = []
        for _, i, _ in reversed(offers):  # strongest offers first
            if len(grow) == b:
                break
            if free[i] > 0:
                free[i] -= 1
                grow.append(i)
        if len(grow) == b:
            return prune, grow
    return [], []


# -- new directions --------------------------------------------------------------------------------


def orthogonal_direction(existing: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector (float64) orthogonal to the rows of ``existing`` (n x d, any n < d).

    The rows are orthonormalised first (QR), and the projection is applied twice ("twice is enough"),
    so the result is orthogonal to machine precision even when the rows are not orthonormal.
    """
    d = existing.shape[1]
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    if existing.shape[0]:
        basis = torch.linalg.qr(existing.double().T.cpu()).Q  # d x n
        for _ in range(2):
            v = v - basis @ (basis.T @ v)
    norm = float(v.norm())
    if not math.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"cannot find a direction orthogonal to {existing.shape[0]} rows in dimension {d}")
    return v / norm


# -- orthogonality regulariser (§A.5) -------------------------------------------------------------


def orthogonality_penalty(M: torch.Tensor, active: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖G − D‖_F, its gradient with respect to M) for one factor, in M's dtype.

    ``rows=True``: M is Q (R x d), G = M Mᵀ; ``rows=False``: M is P (d x R), G = Mᵀ M. D is the
    diagonal of the active mask, so inactive (zero) slots add nothing: their rows/columns get a zero
    gradient and they stay exactly zero. Gradient: d‖X‖ = ⟨X, dX⟩/‖X‖ with X symmetric gives
    2 X M / ‖X‖ (rows) or 2 M X / ‖X‖ (columns); 0 where X = 0.
    """
    norm, grad = orthogonality_penalties(M[None], active[None], rows)
    return norm[0], grad[0]


def orthogonality_penalties(M: torch.Tensor, active: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`orthogonality_penalty` of a batch of factors of one shape (M: n x R x d or n x d x R, active:
    n x R): the n norms and the n gradients, with no host synchronisation (the zero case is a ``where``)."""
    G = M @ M.mT if rows else M.mT @ M
    X = G - torch.diag_embed(active.to(M.dtype))
    norm = torch.linalg.matrix_norm(X)
    # the factor 2/‖X‖ goes on X (R x R), so that the product with M is the one pass over the factors;
    # where ‖X‖ = 0, X is exactly zero and so is the gradient
    X = X * (2 / torch.where(norm == 0, torch.ones_like(norm), norm))[:, None, None]
    return norm, (X @ M if rows else M @ X)

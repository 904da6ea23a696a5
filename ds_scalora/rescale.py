"""The rescale step of ScaLoRA as small composable functions (spec §4, steps 3 to 6).

Paper orientation: ``A`` is d_out x r, ``B`` is d_in x r (a PEFT layer's ``lora_B.weight`` and the
transpose of its ``lora_A.weight``; transposed views work, every function here acts in place on
whatever tensor it is given). ``alpha`` scales the columns of A, ``beta`` those of B.

The effective weight ``W + s A Bᵀ`` is rewritten as ``[W + s A diag(1 − α∘β) Bᵀ] + s (Aα)(Bβ)ᵀ``:
the bracket is merged into the frozen weight, the factors are rescaled, and the current gradients
and Adam moments are re-expressed at the new factors. Gradients and moments cross: A's are scaled
by β and B's by α, because ``∂L/∂(A diag α) = G B diag β`` at the same effective weight.
"""

from __future__ import annotations

import torch


def merge_delta(A, B, alpha, beta, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s · A diag(1 − α∘β) Bᵀ`` (d_out x d_in): what moves from the adapter into the frozen weight.

    Formed in ``dtype`` from the (high-precision) factors; cost O(d_out · d_in · r).
    """
    coef = ((1.0 - alpha.double() * beta.double()) * scale).to(device=A.device, dtype=dtype)
    return (A.to(dtype) * coef) @ B.to(dtype).T


def merged_sq_norms(A, B, alpha, beta, scale) -> torch.Tensor:
    """``‖merge_delta(A, B, α, β, s)‖_F²`` of a batch of layers (A: n x d_out x r, α: n x r, s: n), from
    r x r Gram matrices in float64 without forming the deltas: ``‖L Rᵀ‖² = Σ (LᵀL) ⊙ (RᵀR)`` with
    L = s A diag(1 − α∘β), R = B."""
    scale = torch.as_tensor(scale, dtype=torch.float64, device=alpha.device).reshape(-1, 1)
    coef = (1.0 - alpha.double() * beta.double()) * scale
    L, R = A.double() * coef.to(A.device)[:, None, :], B.double()
    return ((L.mT @ L) * (R.mT @ R)).sum((-2, -1)).cpu()


def rescale_factors_(A, B, alpha, beta) -> None:
    """``A ← A diag(α)``, ``B ← B diag(β)`` in place (step 4)."""
    A.mul_(alpha.to(device=A.device, dtype=A.dtype))
    B.mul_(beta.to(device=B.device, dtype=B.dtype))


def cross_gradients_(grad_A, grad_B, alpha, beta) -> None:
    """Re-express this step's gradients at the rescaled factors (step 5): ``G_A β``, ``G_B α``.

    A missing gradient (``None``) is left missing.
    """
    for g, k in ((grad_A, beta), (grad_B, alpha)):
        if g is not None:
            g.mul_(k.to(device=g.device, dtype=g.dtype))


# How each per-element optimizer state tensor transforms under a column scaling of its parameter
# by k: first moments (and momentum) scale by k, second moments by k². Anything else cannot be
# carried over analytically and is refused rather than silently left inconsistent.
MOMENT_POWERS = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def cross_moments_(state_A: dict, state_B: dict, alpha, beta) -> None:
    """Carry optimizer moments across the rescale, crossed like the gradients (step 6).

    ``state_A``/``state_B`` map state names to tensors shaped like A/B (an empty dict before the first
    optimizer step). Scalars such as Adam's ``step`` are left alone: no reset, no re-warm-up.
    """
    for state, k in ((state_A, beta), (state_B, alpha)):
        for name, t in state.items():
            if not torch.is_tensor(t) or t.dim() == 0:
                continue
            if name not in MOMENT_POWERS:
                raise ValueError(
                    f"optimizer state {name!r} has no known rule under column rescaling; "
                    f"supported per-element states: {sorted(MOMENT_POWERS)} (use Adam/AdamW or SGD)"
                )
            t.mul_(k.to(device=t.device, dtype=t.dtype) ** MOMENT_POWERS[name])

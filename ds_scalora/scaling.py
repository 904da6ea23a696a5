"""The optimal column scaling of ScaLoRA: the small quadratic problem and its three solvers.

Everything here follows ``shared/design/scalora-math.md`` (cited as "spec §N"). Orientation is the
paper's: ``A`` is d_out x r, ``B`` is d_in x r, the adapter adds ``scale * A @ B.T``. The factors are
scale-folded internally (``Â = sqrt(s) A``, ``Ĝ_A = grad_A / sqrt(s)``, spec §1), so callers pass the
raw factors, the raw autograd gradients and ``scale``.

The problem (spec §3): with ``z = [α²; β²] >= 0``, minimise

    q(z) = ½ zᵀ H z − (1/c) λᵀ z,     H = (S_AᵀS_A) ⊙ (S_BᵀS_B),  S_A = [A, G_A],  S_B = [G_B, B],
                                      λ = [colnorm²(G_B); colnorm²(G_A)]

which is ``(f − ‖G‖²/L²) / (2η²)`` for the paper's ``f = ‖G/L − η ΔW(z)‖²`` with ``c = L·η``. ``q`` is
what :class:`ScalingSolution` reports as the objective. Only A, B and their gradients are needed,
never the full weight gradient. Small matrices are solved in float64.

The solve is invariant to a common scale of the gradients (H and λ both scale by k²), so a loss scale
or a gradient clipping coefficient does not change α, β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SOLVERS = ("column", "scalar", "nnls", "adam")
# what a refresh does with the solved scaling besides the method itself: the benchmark's ablations
ABLATIONS = ("constant_shrink", "rebalance_only")

# A variable is degenerate when its basis matrix is zero: H_jj = ‖a_j‖²·λ_j, so a zero column or a
# zero column gradient. Magnitudes alone never make a column degenerate (rescaling a column by t maps
# the problem to an equivalent one, and the Jacobi scaling below removes it), so the test is absolute:
# anything that is not a normal float64 well above underflow.
_DEGENERATE_ATOL = 1e-280
# Ridge added to the unit-diagonal (Jacobi-scaled) Gram matrix: keeps exactly singular H (parallel
# columns) solvable while moving a well-conditioned solution by ~1e-10 relative.
_RIDGE = 1e-10


@dataclass
class ScalingSolution:
    """α, β (length r, non-negative, float64) and how they were obtained.

    ``solver_used`` is ``"column"``, ``"scalar"``, ``"nnls"`` or ``"none"`` (no rescale: α = β = 1);
    ``reason`` says why a fallback or a skip happened (``None`` when the requested solver applied).
    ``objective`` and ``objective_identity`` are q(z) at the chosen scaling and at α = β = 1 for the
    same ``strength``.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    solver_used: str
    reason: str | None
    objective: float
    objective_identity: float
    strength: float

    @property
    def rescaled(self) -> bool:
        return self.solver_used != "none"


@dataclass
class ScalingProblem:
    """H (2r x 2r), λ (2r) and the squared column norms of the folded factors, all float64; with a
    leading batch dimension when built for several layers at once (``build_problems``).

    ``linear`` is False for the paper's problem, whose unknowns are ``z = [α²; β²]``, and True for the
    Adam-aware one (spec §3b, ``docs/scalora-strength.md``), whose unknowns are ``[α; β]`` themselves.
    """

    H: torch.Tensor
    lam: torch.Tensor
    col_norms: torch.Tensor  # [‖â_j‖²; ‖b̂_j‖²]: what the strength rule keeps or shrinks
    linear: bool = False

    @property
    def r(self) -> int:
        return self.lam.shape[-1] // 2

    def objective(self, z: torch.Tensor, strength) -> float | torch.Tensor:
        """q(z) at ``strength`` (a float per problem when batched: then a tensor of them)."""
        q = 0.5 * torch.einsum("...i,...ij,...j->...", z, self.H, z) - (self.lam * z).sum(-1) / torch.as_tensor(
            strength, dtype=torch.float64)
        return float(q) if q.dim() == 0 else q

    def degenerate(self) -> torch.Tensor:
        """Mask of variables whose basis matrix is (numerically) zero. In the paper's problem a zero
        right-hand side (a zero column gradient) also makes a variable irrelevant; in the Adam-aware one
        λ_j may be zero or negative (momentum against the gradient) and the variable is still solved."""
        d = self.H.diagonal(dim1=-2, dim2=-1)
        if self.linear:
            return ~(d > _DEGENERATE_ATOL)
        return ~((d > _DEGENERATE_ATOL) & (self.lam > _DEGENERATE_ATOL))

    def squared_norms_after(self, z: torch.Tensor) -> torch.Tensor:
        """Squared norms of the folded columns after a rescale by the unknowns ``z``."""
        return (z * z if self.linear else z) * self.col_norms

    def __getitem__(self, index) -> ScalingProblem:
        return ScalingProblem(self.H[index], self.lam[index], self.col_norms[index], self.linear)


def _scales(scale, n: int) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(n).reshape(n, 1, 1)


def _side_by_side_gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``SᵀS`` in float64 for ``S = [left, right]`` (n x d x 2r): the concatenation is written once, in
    float64, from the inputs' own dtype (no float64 copies of each and then of their concatenation).
    Inputs stored transposed (lora_A's ``Bᵀ``, r x d in memory) are written as ``Sᵀ``, 2r x d: a copy
    along their rows, about 3x faster on a CPU than scattering them into the columns of S."""
    n, d, r = left.shape
    if left.mT.is_contiguous() and right.mT.is_contiguous():
        St = torch.empty(n, 2 * r, d, dtype=torch.float64, device=left.device)
        St[:, :r].copy_(left.detach().mT)
        St[:, r:].copy_(right.detach().mT)
        return St @ St.mT
    S = torch.empty(n, d, 2 * r, dtype=torch.float64, device=left.device)
    S[..., :r].copy_(left.detach())
    S[..., r:].copy_(right.detach())
    return S.mT @ S


def build_problems(A, B, grad_A, grad_B, scale=1.0) -> ScalingProblem:
    """Gram matrices and right-hand sides of spec §3 from the factors and their LoRA gradients, for a
    batch of layers of one shape (``A``: n x d_out x r, ...; ``scale`` a float or one per layer).

    The folding by √s (spec §1) cancels in H, whose entry (i, j) multiplies ``d_i d_j`` from S_AᵀS_A by
    ``d'_i d'_j`` from S_BᵀS_B with ``d_i d'_i = 1``; λ and the column norms are diagonals of the same two
    Gram matrices, divided and multiplied by s. So the tall matrices are read once, into two Gram
    products. Cost O(n (d_out + d_in) r²). Inputs may be any float dtype; the products are formed in float64.
    """
    _check_shapes(A, B, grad_A, grad_B)
    r = A.shape[-1]
    s = _scales(scale, A.shape[0]).to(A.device)[:, :, 0]  # n x 1
    gram_A = _side_by_side_gram(A, grad_A)  # [A, G_A]
    gram_B = _side_by_side_gram(grad_B, B)  # [G_B, B]
    H = gram_A * gram_B
    H = 0.5 * (H + H.mT)
    diag_A, diag_B = gram_A.diagonal(dim1=-2, dim2=-1), gram_B.diagonal(dim1=-2, dim2=-1)
    lam = torch.cat([diag_B[:, :r], diag_A[:, r:]], dim=-1) / s  # colnorm²(G_B / √s), colnorm²(G_A / √s)
    col_norms = torch.cat([diag_A[:, :r], diag_B[:, r:]], dim=-1) * s  # ‖√s a_j‖², ‖√s b_j‖²
    return ScalingProblem(H.cpu(), lam.cpu(), col_norms.cpu())


def build_problem(A, B, grad_A, grad_B, scale: float = 1.0) -> ScalingProblem:
    """:func:`build_problems` for one layer (``A``: d_out x r, ...)."""
    return build_problems(*(t.unsqueeze(0) for t in (A, B, grad_A, grad_B)), scale)[0]


def build_adam_problems(A, B, grad_A, grad_B, dir_A, dir_B, scale=1.0) -> ScalingProblem:
    """The Adam-aware problem (``docs/scalora-strength.md`` §3), unknowns ``w = [α; β]``, batched as
    :func:`build_problems`.

    Adam's step is invariant to a column's scale once gradients and moments are crossed, so after a
    rescale the next weight increment is ``−η s (U_A diag(β) Bᵀ + A diag(α) U_Bᵀ)`` (``U``: Adam's own
    next step directions, :func:`adam_direction`), linear in α and β. Its distance to the full
    fine-tuning step ``−G/L`` is ``½ wᵀKw − μᵀw / c`` up to constants, with the paper's structure:

        K = s² (S_AᵀS_A) ⊙ (S_BᵀS_B),   S_A = [A, U_A],  S_B = [U_B, B],
        μ = [colwise⟨grad_B, U_B⟩; colwise⟨grad_A, U_A⟩]      (only r-column products, never G)
    """
    _check_shapes(A, B, grad_A, grad_B)
    if dir_A.shape != A.shape or dir_B.shape != B.shape:
        raise ValueError(f"Adam directions must match their factors: {tuple(dir_A.shape)} vs {tuple(A.shape)}, "
                         f"{tuple(dir_B.shape)} vs {tuple(B.shape)}")
    r = A.shape[-1]
    s = _scales(scale, A.shape[0]).to(A.device)
    gram_A = _side_by_side_gram(A, dir_A)  # [A, U_A]
    gram_B = _side_by_side_gram(dir_B, B)  # [U_B, B]
    H = (s * s) * (gram_A * gram_B)
    H = 0.5 * (H + H.mT)
    GA, GB, UA, UB = (t.detach().double() for t in (grad_A, grad_B, dir_A, dir_B))
    lam = torch.cat([(GB * UB).sum(-2), (GA * UA).sum(-2)], dim=-1)
    diag_A, diag_B = gram_A.diagonal(dim1=-2, dim2=-1), gram_B.diagonal(dim1=-2, dim2=-1)
    col_norms = s[:, :, 0] * torch.cat([diag_A[:, :r], diag_B[:, r:]], dim=-1)  # ‖a_j‖², ‖b_j‖² (times s)
    return ScalingProblem(H.cpu(), lam.cpu(), col_norms.cpu(), linear=True)


def build_adam_problem(A, B, grad_A, grad_B, dir_A, dir_B, scale: float = 1.0) -> ScalingProblem:
    """:func:`build_adam_problems` for one layer."""
    return build_adam_problems(*(t.unsqueeze(0) for t in (A, B, grad_A, grad_B, dir_A, dir_B)), scale)[0]


def adam_direction(grad, exp_avg=None, exp_avg_sq=None, step: int = 0, betas=(0.9, 0.999), eps: float = 1e-8):
    """The direction of Adam's next step after ``grad`` (``m̂ / (sqrt(v̂) + eps)``; the step is −lr times
    it, weight decay left out), from the moments before it (None: no step taken yet) and the number of
    steps already taken. Elementwise, so it can be computed on any rank's piece of a parameter."""
    b1, b2 = betas
    g = grad.double()
    m = (1 - b1) * g if exp_avg is None else b1 * exp_avg.double() + (1 - b1) * g
    v = (1 - b2) * g * g if exp_avg_sq is None else b2 * exp_avg_sq.double() + (1 - b2) * g * g
    t = step + 1
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def _masked_solve(H: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    """Solutions of the sub-systems ``H[m][:, m] x = b[m]`` of a batch (``mask`` m per problem), zero
    outside the mask, and a per-problem flag of success: the rows and columns left out are replaced by
    the identity, which decouples them (one batched LU instead of a loop over sub-matrices)."""
    both = mask[..., :, None] & mask[..., None, :]
    eye = torch.diag_embed((~mask).to(H.dtype))
    x, info = torch.linalg.solve_ex(torch.where(both, H, eye), torch.where(mask, b, 0.0))
    ok = (info == 0) & torch.isfinite(x).all(-1)
    return torch.where(mask, x, 0.0), ok


def nnls_gram_batch(H: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``argmin_{z >= 0} ½ zᵀHz − bᵀz`` for a batch of small symmetric positive definite H
    (n x m x m, float64), every problem solved in lock-step.

    Lawson–Hanson's active-set method written on the Gram matrix: the problem is a non-negative
    least squares in the H-metric. Terminates in at most a few times m outer iterations.
    """
    n, m = b.shape
    tol = 1e-12 * b.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    z = torch.zeros(n, m, dtype=torch.float64)
    passive = torch.zeros(n, m, dtype=torch.bool)
    rows = torch.arange(n)
    for _ in range(3 * m + 10):
        w = b - (H @ z.unsqueeze(-1)).squeeze(-1)  # minus the gradient: positive entries could still lower q
        candidates = (~passive) & (w > tol)
        going = candidates.any(-1)
        if not going.any():
            break
        best = torch.where(candidates, w, -math.inf).argmax(-1)
        passive[rows[going], best[going]] = True
        inner = going.clone()
        while inner.any():
            s, ok = _masked_solve(H, b, passive)
            s = torch.where(ok[:, None], s, z)  # a failed solve (singular sub-matrix) keeps the last point
            good = inner & (((s > 0) | ~passive).all(-1) | ~ok)
            z = torch.where(good[:, None], s, z)
            inner &= ~good
            if not inner.any():
                break
            # move from z towards s until the first passive variable reaches zero, and drop it
            bad = inner[:, None] & passive & (s <= 0)
            ratios = torch.where(bad, z / torch.where(bad, z - s, 1.0).clamp_min(1e-300), math.inf)
            step, first = ratios.min(-1)
            step = torch.where(inner, step, 0.0)
            moved = z + step[:, None] * (s - z)
            moved[rows[inner], first[inner]] = 0.0
            z = torch.where(inner[:, None], moved, z)
            passive &= ~inner[:, None] | (z > 0)
            z = torch.where(passive, z, 0.0)
            inner &= passive.any(-1)  # nothing passive left: z = 0, the outer loop goes on
    return z


def nnls_gram(H: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`nnls_gram_batch` for one problem."""
    return nnls_gram_batch(H.unsqueeze(0), b.unsqueeze(0))[0]


def solve_scaling(A, B, grad_A, grad_B, strength, solver: str = "column", scale: float = 1.0, *,
                  shrink: float = 1.0, directions=None, max_scale: float | None = None,
                  ablation: str | None = None) -> ScalingSolution:
    """The optimal column scaling α, β of one adapted layer (spec §3; ``docs/scalora-strength.md``).

    ``strength`` is the knob ``c = L·η`` (a positive float), or ``"auto"``: c is then chosen per layer
    so that the refresh divides the folded factors' total squared column norm (over the solved
    columns) by ``shrink``. ``shrink = 1`` keeps the adapter's size (it only rebalances columns and
    merges almost nothing); ``shrink > 1`` moves about ``1 − 1/shrink`` of the adapter into the frozen
    weight at every refresh, which is what accumulates a high-rank update. Solvers:

    * ``"column"``: the paper's closed form (Thm 3.7), falling back to ``"scalar"`` when the
      unconstrained solution has a negative entry (``reason="negative_column_solution"``);
    * ``"scalar"``: one scale per factor (Thm 3.5), boundary cases included;
    * ``"nnls"``: the exact non-negative optimum over all 2r variables, never worse than the others;
    * ``"adam"``: the exact optimum of the Adam-aware objective (:func:`build_adam_problem`); needs
      ``directions=(U_A, U_B)``, Adam's next step directions (:func:`adam_direction`).

    Guard rail: ``max_scale`` bounds every α_j, β_j to ``[1/max_scale, max_scale]`` (a tiny non-zero
    column would otherwise get a huge scale, and the crossed second moments its square). Ablations:
    ``"constant_shrink"`` ignores the problem and scales every column by ``shrink^-½``;
    ``"rebalance_only"`` keeps each column's solved ratio α_j/β_j but sets α_j β_j = 1 (nothing merged).

    Degenerate inputs do not raise: non-finite values give no rescale (``reason="nonfinite"``);
    columns whose basis matrix vanishes (PEFT's zero init, zero gradients) are left unscaled and
    removed from the solve; if nothing is left there is no rescale (``reason="degenerate"``).

    This is :func:`solve_scaling_batch` for one layer: the refresh solves all layers of a shape at once.
    """
    one = (lambda t: t.unsqueeze(0))  # noqa: E731
    dirs = None if directions is None else tuple(one(t) for t in directions)
    return solve_scaling_batch(one(A), one(B), one(grad_A), one(grad_B), strength, solver, scale, shrink=shrink,
                               directions=dirs, max_scale=max_scale, ablation=ablation)[0]


def check_options(strength, solver: str, shrink: float, max_scale: float | None, ablation: str | None):
    """Refuse bad options with a message naming them; returns the strength as a float or "auto"."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r} is not one of {ABLATIONS} (or None)")
    if not (isinstance(shrink, (int, float)) and math.isfinite(shrink) and shrink > 0):
        raise ValueError(f"shrink must be a positive finite number, got {shrink!r}")
    if max_scale is not None and not (math.isfinite(max_scale) and max_scale >= 1):
        raise ValueError(f"max_scale must be a finite number >= 1 (or None), got {max_scale!r}")
    if strength == "auto":
        return strength
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a positive number or 'auto', got {strength!r}") from None
    if not (strength > 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be a positive finite number or 'auto', got {strength!r}")
    return strength


def solve_scaling_batch(A, B, grad_A, grad_B, strength, solver: str = "column", scale=1.0, *,
                        shrink: float = 1.0, directions=None, max_scale: float | None = None,
                        ablation: str | None = None, finite: torch.Tensor | None = None) -> list[ScalingSolution]:
    """:func:`solve_scaling` for a batch of layers of one shape (``A``: n x d_out x r, ...; ``scale``
    a float or one per layer); every layer is solved independently, as if alone. ``finite``: per layer,
    that the caller has checked its inputs finite (a refresh checks all layers at once); by default
    they are checked here."""
    strength = check_options(strength, solver, shrink, max_scale, ablation)
    if solver == "adam" and directions is None:
        raise ValueError("solver='adam' needs directions=(U_A, U_B): Adam's next step directions "
                         "(ds_scalora.scaling.adam_direction)")
    _check_shapes(A, B, grad_A, grad_B)
    n = A.shape[0]
    inputs = (A, B, grad_A, grad_B) + (tuple(directions) if solver == "adam" else ())
    if finite is None:
        finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in inputs]).all(0).cpu()
    finite = finite.cpu() & torch.isfinite(_scales(scale, n).reshape(n))
    if ablation == "constant_shrink":
        k = torch.full((A.shape[-1],), shrink**-0.5, dtype=torch.float64)
        constant = ScalingSolution(k, k.clone(), "constant", None, math.nan, math.nan, math.nan)
        return [constant if ok else _identity(k.numel(), "nonfinite", 1.0 if strength == "auto" else strength, None)
                for ok in finite.tolist()]
    scale = torch.where(finite, _scales(scale, n).reshape(n), 1.0)
    if solver == "adam":
        problem = build_adam_problems(A, B, grad_A, grad_B, *directions, scale=scale)
    else:
        problem = build_problems(A, B, grad_A, grad_B, scale)
    return solve_problems(problem, strength, solver, shrink=shrink, max_scale=max_scale, ablation=ablation,
                          finite=finite)


def solve_problems(problem: ScalingProblem, strength, solver: str = "column", *, shrink: float = 1.0,
                   max_scale: float | None = None, ablation: str | None = None,
                   finite: torch.Tensor | None = None) -> list[ScalingSolution]:
    """Solve a batch of problems (``build_problems``) with the options of :func:`solve_scaling`; ``finite`` marks the layers
    whose inputs were finite (the others get no rescale, ``reason="nonfinite"``)."""
    strength = check_options(strength, solver, shrink, max_scale, ablation)
    auto = strength == "auto"
    n, r = problem.lam.shape[0], problem.r
    finite = torch.ones(n, dtype=torch.bool) if finite is None else finite.clone()
    finite &= torch.isfinite(problem.H).flatten(1).all(1) & torch.isfinite(problem.lam).all(1)
    # a layer that is not finite is solved as an empty problem (then replaced by the identity)
    problem = ScalingProblem(torch.where(finite[:, None, None], problem.H, 0.0),
                             torch.where(finite[:, None], problem.lam, 0.0),
                             torch.where(finite[:, None], problem.col_norms, 0.0), problem.linear)
    free = ~problem.degenerate() & finite[:, None]
    z1, fixed, used, reason = _solve_unit_strength(problem, free, solver)
    if auto:
        c = _auto_strength(problem, ~fixed, z1, shrink)
        valid = torch.isfinite(c)
        c = torch.where(valid, c, 1.0)
    else:
        c = torch.full((n,), strength, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
    z = torch.where(fixed, 1.0, z1 / c[:, None])  # variables that were not solved for stay unscaled
    scales = z if problem.linear else z.sqrt()
    alpha, beta = scales[:, :r], scales[:, r:]
    if ablation == "rebalance_only":
        prod = alpha * beta
        fix = torch.where(prod > 0, prod.clamp_min(1e-300).rsqrt(), torch.ones_like(prod))
        alpha, beta = torch.where(prod > 0, alpha * fix, 1.0), torch.where(prod > 0, beta * fix, 1.0)
    if max_scale is not None:
        alpha, beta = alpha.clamp(1 / max_scale, max_scale), beta.clamp(1 / max_scale, max_scale)
    final = torch.cat([alpha, beta], dim=1)
    objective = problem.objective(final if problem.linear else final * final, c)
    identity = problem.objective(torch.ones(n, 2 * r, dtype=torch.float64), c)
    out = []
    flags = zip(finite.tolist(), free.any(-1).tolist(), valid.tolist(), objective.tolist(), identity.tolist(), c.tolist())
    for i, (ok, any_free, is_valid, obj, ident, ci) in enumerate(flags):
        if not ok:
            out.append(_identity(r, "nonfinite", 1.0 if auto else strength, None))
        elif not any_free or not is_valid:
            out.append(_identity(r, "degenerate", 1.0 if auto else strength, problem[i]))
        else:
            out.append(ScalingSolution(alpha[i], beta[i], used[i], reason[i], obj, ident, ci))
    return out


def _jacobi(H: torch.Tensor, lam: torch.Tensor, free: torch.Tensor):
    """The free block scaled to unit diagonal (column magnitudes may differ by many decades), plus a
    ridge; the fixed variables decoupled (identity rows, zero right-hand side, so they solve to 0)."""
    d = torch.where(free, H.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).rsqrt(), 0.0)
    Hs = H * d[:, :, None] * d[:, None, :] + torch.diag_embed(torch.where(free, _RIDGE, 1.0))
    return Hs, lam * d, d


def _solve_unit_strength(problem: ScalingProblem, free: torch.Tensor, solver: str):
    """z at c = 1 (the solution at any c is z / c), the mask of variables held at 1, and per layer the
    solver used and the reason for a fallback."""
    n, m = problem.lam.shape
    z = torch.zeros(n, m, dtype=torch.float64)
    scalar = torch.ones(n, dtype=torch.bool)
    if solver != "scalar":
        Hs, bs, d = _jacobi(problem.H, problem.lam, free)
        if solver in ("nnls", "adam"):
            return d * nnls_gram_batch(Hs, bs), ~free, [solver] * n, [None] * n
        v, ok = _masked_solve(Hs, bs, free)
        scalar = ~(ok & ((v >= 0) | ~free).all(-1))  # Thm 3.7: a non-negative stationary point is optimal
        z = torch.where(scalar[:, None], z, d * v)
    fixed = ~free
    if scalar.any():
        zs, fixed_s = _solve_scalar(problem[scalar], free[scalar])
        z[scalar], fixed = zs, fixed.clone()
        fixed[scalar] = fixed_s
    used = ["scalar" if s else "column" for s in scalar.tolist()]
    fallback = "negative_column_solution" if solver == "column" else None
    return z, fixed, used, [fallback if s else None for s in scalar.tolist()]


def _solve_scalar(problem: ScalingProblem, free: torch.Tensor):
    """Scalar (Thm 3.5): one variable for all of A's columns, one for all of B's. A side none of whose
    columns is free is held at 1; a degenerate column of a solved side follows its side's scale (it
    does not move the objective)."""
    n, m = problem.lam.shape
    r = m // 2
    groups = torch.zeros(2, m, dtype=torch.float64)
    groups[0, :r] = 1.0
    groups[1, r:] = 1.0
    solved = torch.stack([free[:, :r].any(-1), free[:, r:].any(-1)], dim=1)  # n x 2
    H2 = groups @ problem.H @ groups.T
    b2 = problem.lam @ groups.T
    Hs, bs, d2 = _jacobi(H2, b2, solved)
    xy = d2 * nnls_gram_batch(Hs, bs)
    fixed = (~solved).to(torch.float64) @ groups > 0
    return xy @ groups, fixed


def _auto_strength(problem: ScalingProblem, solved: torch.Tensor, z1: torch.Tensor, shrink: float = 1.0):
    """c per layer such that the refresh divides the solved columns' total squared norm by ``shrink``,
    with z = z1 / c; NaN where no such c exists.

    Paper's problem: Σ (z1_j / c) n_j = Σ n_j / shrink. Adam-aware (linear): Σ (z1_j / c)² n_j = Σ n_j / shrink.
    """
    num = torch.where(solved, problem.squared_norms_after(z1), 0.0).sum(-1)
    den = torch.where(solved, problem.col_norms, 0.0).sum(-1) / shrink
    ratio = num / den
    ok = (num > 0) & (den > 0) & torch.isfinite(ratio)
    c = ratio.sqrt() if problem.linear else ratio
    return torch.where(ok, c, math.nan)


def restart_solution(r: int) -> ScalingSolution:
    """α = β = 0: the whole adapter is merged and both factors (and, crossed, their moments) become
    zero. A ReLoRA-style merge-and-restart is this refresh followed by a fresh init of one factor."""
    zero = torch.zeros(r, dtype=torch.float64)
    return ScalingSolution(zero, zero.clone(), "restart", None, math.nan, math.nan, math.nan)


def _identity(r: int, reason: str, strength: float, problem: ScalingProblem | None) -> ScalingSolution:
    one = torch.ones(r, dtype=torch.float64)
    obj = math.nan
    if problem is not None:
        obj = problem.objective(torch.ones(2 * r, dtype=torch.float64), strength)
    return ScalingSolution(one, one.clone(), "none", reason, obj, obj, float(strength))


def _check_shapes(A, B, grad_A, grad_B) -> None:
    if A.dim() not in (2, 3) or B.dim() != A.dim() or A.shape[-1] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(
            f"expected A (d_out x r) and B (d_in x r) with the same r (and the same batch), got {tuple(A.shape)} "
            f"and {tuple(B.shape)}"
        )
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradients must match their factors: grad_A {tuple(grad_A.shape)} vs A {tuple(A.shape)}, "
            f"grad_B {tuple(grad_B.shape)} vs B {tuple(B.shape)}"
        )

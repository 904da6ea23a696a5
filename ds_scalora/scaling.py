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
    """H (2r x 2r), λ (2r) and the squared column norms of the folded factors, all float64.

    ``linear`` is False for the paper's problem, whose unknowns are ``z = [α²; β²]``, and True for the
    Adam-aware one (spec §3b, ``docs/scalora-strength.md``), whose unknowns are ``[α; β]`` themselves.
    """

    H: torch.Tensor
    lam: torch.Tensor
    col_norms: torch.Tensor  # [‖â_j‖²; ‖b̂_j‖²]: what the strength rule keeps or shrinks
    linear: bool = False

    @property
    def r(self) -> int:
        return self.lam.numel() // 2

    def objective(self, z: torch.Tensor, strength: float) -> float:
        return float(0.5 * z @ self.H @ z - self.lam @ z / strength)

    def degenerate(self) -> torch.Tensor:
        """Mask of variables whose basis matrix is (numerically) zero. In the paper's problem a zero
        right-hand side (a zero column gradient) also makes a variable irrelevant; in the Adam-aware one
        λ_j may be zero or negative (momentum against the gradient) and the variable is still solved."""
        d = self.H.diagonal()
        if self.linear:
            return ~(d > _DEGENERATE_ATOL)
        return ~((d > _DEGENERATE_ATOL) & (self.lam > _DEGENERATE_ATOL))

    def squared_norms_after(self, z: torch.Tensor) -> torch.Tensor:
        """Squared norms of the folded columns after a rescale by the unknowns ``z``."""
        return (z * z if self.linear else z) * self.col_norms


def build_problem(A, B, grad_A, grad_B, scale: float = 1.0) -> ScalingProblem:
    """Gram matrix and right-hand side of spec §3 from the factors and their LoRA gradients.

    Cost O((d_out + d_in) r²). Inputs may be any float dtype; the products are formed in float64.
    """
    _check_shapes(A, B, grad_A, grad_B)
    root = math.sqrt(scale)
    A = A.detach().double() * root
    B = B.detach().double() * root
    GA = grad_A.detach().double() / root
    GB = grad_B.detach().double() / root
    SA = torch.cat([A, GA], dim=1)  # d_out x 2r
    SB = torch.cat([GB, B], dim=1)  # d_in x 2r
    H = (SA.T @ SA) * (SB.T @ SB)
    H = 0.5 * (H + H.T)
    lam = torch.cat([(GB * GB).sum(0), (GA * GA).sum(0)])
    col_norms = torch.cat([(A * A).sum(0), (B * B).sum(0)])
    return ScalingProblem(H.cpu(), lam.cpu(), col_norms.cpu())


def build_adam_problem(A, B, grad_A, grad_B, dir_A, dir_B, scale: float = 1.0) -> ScalingProblem:
    """The Adam-aware problem (``docs/scalora-strength.md`` §3): unknowns ``w = [α; β]``.

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
    A, B, GA, GB, UA, UB = (t.detach().double() for t in (A, B, grad_A, grad_B, dir_A, dir_B))
    SA = torch.cat([A, UA], dim=1)
    SB = torch.cat([UB, B], dim=1)
    H = (scale * scale) * ((SA.T @ SA) * (SB.T @ SB))
    H = 0.5 * (H + H.T)
    lam = torch.cat([(GB * UB).sum(0), (GA * UA).sum(0)])
    col_norms = scale * torch.cat([(A * A).sum(0), (B * B).sum(0)])
    return ScalingProblem(H.cpu(), lam.cpu(), col_norms.cpu(), linear=True)


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


def nnls_gram(H: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``argmin_{z >= 0} ½ zᵀHz − bᵀz`` for a small symmetric positive definite H (float64).

    Lawson–Hanson's active-set method written on the Gram matrix: the problem is a non-negative
    least squares in the H-metric. Terminates in at most a few times n outer iterations.
    """
    n = b.numel()
    tol = 1e-12 * float(b.abs().max().clamp_min(1e-300))
    z = torch.zeros(n, dtype=torch.float64)
    passive = torch.zeros(n, dtype=torch.bool)
    for _ in range(3 * n + 10):
        w = b - H @ z  # minus the gradient: positive entries could still lower q
        candidates = (~passive) & (w > tol)
        if not candidates.any():
            break
        passive[int(torch.where(candidates, w, -math.inf).argmax())] = True
        while True:
            idx = passive.nonzero().flatten()
            if idx.numel() == 0:
                break
            s = torch.zeros(n, dtype=torch.float64)
            s[idx] = torch.linalg.solve(H[idx][:, idx], b[idx])
            if (s[idx] > 0).all():
                z = s
                break
            # move from z towards s until the first passive variable reaches zero, and drop it
            bad = idx[s[idx] <= 0]
            ratios = z[bad] / (z[bad] - s[bad])
            z = z + ratios.min() * (s - z)
            z[bad[ratios.argmin()]] = 0.0
            passive &= z > 0
            z[~passive] = 0.0
    return z


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
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r} is not one of {ABLATIONS} (or None)")
    if not (isinstance(shrink, (int, float)) and math.isfinite(shrink) and shrink > 0):
        raise ValueError(f"shrink must be a positive finite number, got {shrink!r}")
    if max_scale is not None and not (math.isfinite(max_scale) and max_scale >= 1):
        raise ValueError(f"max_scale must be a finite number >= 1 (or None), got {max_scale!r}")
    auto = strength == "auto"
    if not auto:
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise ValueError(f"strength must be a positive number or 'auto', got {strength!r}") from None
        if not (strength > 0 and math.isfinite(strength)):
            raise ValueError(f"strength must be a positive finite number or 'auto', got {strength!r}")
    if solver == "adam" and directions is None:
        raise ValueError("solver='adam' needs directions=(U_A, U_B): Adam's next step directions "
                         "(ds_scalora.scaling.adam_direction)")
    r = A.shape[1]
    inputs = (A, B, grad_A, grad_B) + (tuple(directions) if solver == "adam" else ())
    if not all(torch.isfinite(t).all() for t in inputs) or not math.isfinite(scale):
        return _identity(r, "nonfinite", 1.0 if auto else strength, None)
    if ablation == "constant_shrink":
        k = torch.full((r,), shrink**-0.5, dtype=torch.float64)
        return ScalingSolution(k, k.clone(), "constant", None, math.nan, math.nan, math.nan)
    if solver == "adam":
        problem = build_adam_problem(A, B, grad_A, grad_B, *directions, scale=scale)
    else:
        problem = build_problem(A, B, grad_A, grad_B, scale)
    if not (torch.isfinite(problem.H).all() and torch.isfinite(problem.lam).all()):
        return _identity(r, "nonfinite", 1.0 if auto else strength, None)  # overflow in the products
    free = ~problem.degenerate()
    if not free.any():
        return _identity(r, "degenerate", 1.0 if auto else strength, problem)

    z1, fixed, used, reason = _solve_unit_strength(problem, free, solver)
    if auto:
        strength = _auto_strength(problem, ~fixed, z1, shrink)
        if strength is None:
            return _identity(r, "degenerate", 1.0, problem)
    z = z1 / strength
    z[fixed] = 1.0  # variables that were not solved for stay unscaled
    scales = z if problem.linear else z.sqrt()
    alpha, beta = scales[:r], scales[r:]
    if ablation == "rebalance_only":
        prod = alpha * beta
        fix = torch.where(prod > 0, prod.clamp_min(1e-300).rsqrt(), torch.ones_like(prod))
        alpha, beta = torch.where(prod > 0, alpha * fix, 1.0), torch.where(prod > 0, beta * fix, 1.0)
    if max_scale is not None:
        alpha, beta = alpha.clamp(1 / max_scale, max_scale), beta.clamp(1 / max_scale, max_scale)
    final = torch.cat([alpha, beta])
    z = final if problem.linear else final * final
    ident = torch.ones(2 * r, dtype=torch.float64)
    return ScalingSolution(
        alpha=alpha,
        beta=beta,
        solver_used=used,
        reason=reason,
        objective=problem.objective(z, strength),
        objective_identity=problem.objective(ident, strength),
        strength=float(strength),
    )


def _solve_unit_strength(problem: ScalingProblem, free: torch.Tensor, solver: str):
    """z at c = 1 (the solution at any c is z / c), the mask of variables held at 1, solver, reason."""
    idx = free.nonzero().flatten()
    n = problem.lam.numel()
    if solver != "scalar":
        # Jacobi scaling to unit diagonal: column magnitudes may differ by many decades.
        d = problem.H.diagonal()[idx].rsqrt()
        Hs = problem.H[idx][:, idx] * d[:, None] * d[None, :] + _RIDGE * torch.eye(len(idx), dtype=torch.float64)
        bs = problem.lam[idx] * d
        z = torch.zeros(n, dtype=torch.float64)
        if solver in ("nnls", "adam"):
            z[idx] = d * nnls_gram(Hs, bs)
            return z, ~free, solver, None
        v = torch.linalg.solve(Hs, bs)
        if (v >= 0).all():  # Thm 3.7: a non-negative stationary point is the global optimum
            z[idx] = d * v
            return z, ~free, "column", None
    # Scalar (Thm 3.5): one variable for all of A's columns, one for all of B's. A side none of whose
    # columns is free is held at 1; a degenerate column of a solved side follows its side's scale
    # (it does not move the objective).
    r = problem.r
    groups = torch.zeros(2, n, dtype=torch.float64)
    groups[0, :r] = 1.0
    groups[1, r:] = 1.0
    solved = (groups[:, free.nonzero().flatten()].sum(1) > 0).nonzero().flatten()
    H2 = groups @ problem.H @ groups.T
    b2 = groups @ problem.lam
    d2 = H2.diagonal()[solved].rsqrt()
    H2s = H2[solved][:, solved] * d2[:, None] * d2[None, :] + _RIDGE * torch.eye(len(solved), dtype=torch.float64)
    xy = torch.zeros(2, dtype=torch.float64)
    xy[solved] = d2 * nnls_gram(H2s, b2[solved] * d2)
    unsolved = torch.ones(2, dtype=torch.bool)
    unsolved[solved] = False
    fixed = groups[unsolved].sum(0) > 0
    reason = "negative_column_solution" if solver == "column" else None
    return groups.T @ xy, fixed, "scalar", reason


def _auto_strength(problem: ScalingProblem, solved: torch.Tensor, z1: torch.Tensor, shrink: float = 1.0) -> float | None:
    """c such that the refresh divides the solved columns' total squared norm by ``shrink``, with z = z1 / c.

    Paper's problem: Σ (z1_j / c) n_j = Σ n_j / shrink. Adam-aware (linear): Σ (z1_j / c)² n_j = Σ n_j / shrink.
    """
    n = problem.col_norms[solved]
    num = float(problem.squared_norms_after(z1)[solved].sum())
    den = float(n.sum()) / shrink
    if not (num > 0 and den > 0 and math.isfinite(num / den)):
        return None
    return math.sqrt(num / den) if problem.linear else num / den


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
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(
            f"expected A (d_out x r) and B (d_in x r) with the same r, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradients must match their factors: grad_A {tuple(grad_A.shape)} vs A {tuple(A.shape)}, "
            f"grad_B {tuple(grad_B.shape)} vs B {tuple(B.shape)}"
        )

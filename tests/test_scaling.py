"""solve_scaling against a brute-force float64 minimisation of the vectorised objective (spec §3).

The reference never uses the Gram identities: it materialises the full gradient G, the 2r basis
matrices M_j = â_j â_jᵀ G and N_j = G b̂_j b̂_jᵀ, and solves min_{z>=0} ‖G/c − Σ z_j M_j‖_F with
scipy's NNLS (the paper's f with η = 1, L = c). The reduced objective q that solve_scaling reports is
(f − ‖G/c‖²)/2.
"""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from ds_scalora.scaling import build_problem, nnls_gram, solve_scaling

F64 = torch.float64


def _problem(kind: str, gen: torch.Generator, m=12, n=9, r=4):
    """Factors, full gradient G and LoRA gradients of one layer (scale s = 1 unless folded below)."""
    A = torch.randn(m, r, dtype=F64, generator=gen)
    B = torch.randn(n, r, dtype=F64, generator=gen)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    if kind == "aligned":  # gradient correlated with the adapter: ~20% need the scalar fallback
        G = A @ B.T + 0.3 * G
    elif kind == "lowrank":  # rank-1 gradient: H singular on the a-side
        G = torch.randn(m, 1, dtype=F64, generator=gen) @ torch.randn(1, n, dtype=F64, generator=gen)
    elif kind == "magnitudes":  # columns spread over twelve decades
        A = A * torch.logspace(-6, 6, r, dtype=F64)
        B = B * torch.logspace(4, -4, r, dtype=F64)
    elif kind == "tiny_dims":  # d_out, d_in < 2r: the 2r basis matrices are linearly dependent
        A, B, G = A[:3], B[:2], G[:3, :2]
    elif kind == "zero_A":  # PEFT's init: lora_B = 0, so half the problem vanishes
        A = torch.zeros_like(A)
    elif kind == "zero_column":
        A[:, 1] = 0.0
        B[:, 2] = 0.0
    elif kind == "rank1":
        A, B = A[:, :1], B[:, :1]
    return A, B, G


def _brute_force(A, B, G, c, s):
    """Minimum of the paper's f over z >= 0, by NNLS on the vectorised basis matrices."""
    Ah, Bh = A * math.sqrt(s), B * math.sqrt(s)
    cols = [(Ah[:, j : j + 1] @ Ah[:, j : j + 1].T @ G).flatten() for j in range(A.shape[1])]
    cols += [(G @ Bh[:, j : j + 1] @ Bh[:, j : j + 1].T).flatten() for j in range(A.shape[1])]
    M = torch.stack(cols, 1).numpy()
    target = (G / c).flatten().numpy()
    z, _ = scipy.optimize.nnls(M, target, maxiter=50 * M.shape[1])
    f = lambda zz: float(np.sum((target - M @ zz) ** 2))  # noqa: E731
    return z, f, float(np.sum(target**2))


KINDS = ["random", "aligned", "lowrank", "magnitudes", "tiny_dims", "zero_A", "zero_column", "rank1"]


@pytest.mark.parametrize("kind", KINDS)
def test_nnls_matches_brute_force_and_ordering(kind):
    """nnls within 1e-6 relative of the brute-force optimum; nnls <= column <= no rescale.

    Relative to |q*|, the objective without its constant, which is much stricter than relative to f.
    The brute force works on an (m·n) x 2r float64 least-squares problem, so its own optimum is
    accurate to ~1e-12 relative; 1e-6 leaves room for the 1e-10 ridge on the Jacobi-scaled Gram matrix.
    The ordering holds up to rounding of q: 1e-9 relative.
    """
    gen = torch.Generator().manual_seed(hash(kind) % 2**31)
    fallbacks = 0
    for trial in range(25):
        A, B, G = _problem(kind, gen)
        s = [1.0, 0.5, 16 / math.sqrt(8)][trial % 3]  # LoRA alpha/r, rsLoRA alpha/sqrt(r)
        c = float(10 ** torch.empty(1).uniform_(-2, 2, generator=gen))
        grad_A, grad_B = s * G @ B, s * G.T @ A
        z_bf, f, const = _brute_force(A, B, G, c, s)
        q_bf = (f(z_bf) - const) / 2
        sols = {k: solve_scaling(A, B, grad_A, grad_B, c, solver=k, scale=s) for k in ("column", "scalar", "nnls")}
        for k, sol in sols.items():
            z = torch.cat([sol.alpha, sol.beta]) ** 2
            # the reported objective is the paper's f, shifted and halved, at the returned scaling
            assert sol.objective == pytest.approx((f(z.numpy()) - const) / 2, rel=1e-9, abs=1e-12 * abs(q_bf))
            assert sol.objective <= sol.objective_identity + 1e-9 * abs(sol.objective_identity)
            assert (sol.alpha >= 0).all() and (sol.beta >= 0).all()
        q = {k: v.objective for k, v in sols.items()}
        tol = 1e-9 * max(abs(q_bf), 1e-300)
        assert abs(q["nnls"] - q_bf) <= 1e-6 * abs(q_bf) + 1e-300, (kind, trial, q["nnls"], q_bf)
        assert q["nnls"] <= q["column"] + tol
        assert q["nnls"] <= q["scalar"] + tol
        assert q["column"] <= sols["column"].objective_identity + tol
        fallbacks += sols["column"].solver_used == "scalar"
        if sols["column"].solver_used == "column":
            # Thm 3.7: a non-negative unconstrained solution is the global optimum
            assert q["column"] == pytest.approx(q["nnls"], rel=1e-6, abs=1e-12 * abs(q_bf))
    if kind in ("aligned", "lowrank", "tiny_dims"):
        assert fallbacks > 0, "these families must exercise the scalar fallback"


def test_scalar_solver_is_the_two_variable_optimum():
    """The scalar solver against a dense grid over (α², β²) >= 0 including both boundaries."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        A, B, G = _problem("aligned", gen)
        sol = solve_scaling(A, B, G @ B, G.T @ A, 1.0, solver="scalar")
        assert torch.allclose(sol.alpha, sol.alpha[:1].expand_as(sol.alpha))
        P = build_problem(A, B, G @ B, G.T @ A)
        x0, y0 = float(sol.alpha[0] ** 2), float(sol.beta[0] ** 2)
        grid = torch.linspace(0, 3 * max(x0, y0, 1.0), 301, dtype=F64)
        best = min(P.objective(torch.cat([x.repeat(4), y.repeat(4)]), 1.0) for x in grid[::10] for y in grid[::10])
        assert sol.objective <= best + 1e-12 * abs(best)


def test_nnls_gram_kkt():
    """KKT conditions of the returned point on random SPD problems: an independent optimality check."""
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 16, 64):
        X = torch.randn(n + 3, n, dtype=F64, generator=gen)
        H = X.T @ X
        b = torch.randn(n, dtype=F64, generator=gen)
        z = nnls_gram(H, b)
        grad = H @ z - b
        scale = float(b.abs().max())
        assert (z >= 0).all()
        assert (grad >= -1e-9 * scale).all()  # no descent direction into the feasible set
        assert float((z * grad).abs().max()) <= 1e-9 * scale * max(1.0, float(z.abs().max()))


def test_degenerate_inputs_do_not_crash():
    r = 3
    A, B = torch.randn(10, r, dtype=F64), torch.randn(7, r, dtype=F64)
    zeros = (torch.zeros(10, r, dtype=F64), torch.zeros(7, r, dtype=F64))
    # zero gradients: nothing to learn, no rescale
    sol = solve_scaling(A, B, *zeros, 1.0)
    assert sol.solver_used == "none" and sol.reason == "degenerate"
    assert torch.equal(sol.alpha, torch.ones(r, dtype=F64)) and torch.equal(sol.beta, torch.ones(r, dtype=F64))
    # zero-initialised A: its columns are left unscaled, B's are solved
    G = torch.randn(10, 7, dtype=F64)
    Z = torch.zeros_like(A)
    sol = solve_scaling(Z, B, G @ B, G.T @ Z, 1.0)
    assert sol.rescaled and torch.equal(sol.alpha, torch.ones(r, dtype=F64))
    assert not torch.allclose(sol.beta, torch.ones(r, dtype=F64))
    # non-finite gradients: no rescale, the reason says why
    for bad in (math.nan, math.inf):
        gA = G @ B
        gA[0, 0] = bad
        sol = solve_scaling(A, B, gA, G.T @ A, 1.0)
        assert sol.solver_used == "none" and sol.reason == "nonfinite"
    # rank 1 works
    assert solve_scaling(A[:, :1], B[:, :1], (G @ B)[:, :1], (G.T @ A)[:, :1], 1.0).rescaled


def test_invariant_to_gradient_scale_and_dtype():
    """A loss scale or clipping coefficient k multiplies H and λ by k²: α, β must not change.

    Over 1e-30 .. 1e30 in float64 the Gram entries stay far from under/overflow, so agreement is to
    rounding (1e-9). float32 inputs give the same answer to float32 precision of the inputs (1e-4).
    """
    gen = torch.Generator().manual_seed(3)
    A, B, G = _problem("random", gen)
    ref = solve_scaling(A, B, G @ B, G.T @ A, 2.0)
    for k in (1e-30, 1e-8, 1e8, 1e30):
        sol = solve_scaling(A, B, k * G @ B, k * G.T @ A, 2.0)
        torch.testing.assert_close(sol.alpha, ref.alpha, rtol=1e-9, atol=0)
        torch.testing.assert_close(sol.beta, ref.beta, rtol=1e-9, atol=0)
    sol = solve_scaling(A.float(), B.float(), (G @ B).float(), (G.T @ A).float(), 2.0)
    torch.testing.assert_close(sol.alpha, ref.alpha, rtol=1e-4, atol=0)


def test_auto_strength_keeps_adapter_size():
    """strength='auto': Σ‖Aα‖² + ‖Bβ‖² over solved columns equals the same sum before (scale-folded)."""
    gen = torch.Generator().manual_seed(4)
    for kind in ("random", "aligned", "magnitudes", "zero_column"):
        A, B, G = _problem(kind, gen)
        s = 2.0
        for solver in ("column", "scalar", "nnls"):
            sol = solve_scaling(A, B, s * G @ B, s * G.T @ A, "auto", solver=solver, scale=s)
            before = s * (A.pow(2).sum() + B.pow(2).sum())
            after = s * ((A * sol.alpha).pow(2).sum() + (B * sol.beta).pow(2).sum())
            torch.testing.assert_close(after, before, rtol=1e-9, atol=0)
            # and it is the optimum for the strength it chose
            fixed = solve_scaling(A, B, s * G @ B, s * G.T @ A, sol.strength, solver=solver, scale=s)
            torch.testing.assert_close(fixed.alpha, sol.alpha, rtol=1e-9, atol=0)


def test_bad_arguments_are_named():
    A, B = torch.randn(5, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="solver"):
        solve_scaling(A, B, A, B, 1.0, solver="svd")
    with pytest.raises(ValueError, match="strength"):
        solve_scaling(A, B, A, B, -1.0)
    with pytest.raises(ValueError, match="strength"):
        solve_scaling(A, B, A, B, "big")
    with pytest.raises(ValueError, match="grad_A"):
        solve_scaling(A, B, B, B, 1.0)
    with pytest.raises(ValueError, match="same r"):
        solve_scaling(A, torch.randn(4, 3), A, torch.randn(4, 3), 1.0)


@pytest.mark.parametrize("solver", ["column", "scalar", "nnls"])
def test_batch_solves_each_layer_as_if_alone(solver):
    """solve_scaling_batch (what the refresh runs, all layers of a shape at once) against solve_scaling on
    each layer alone, over a batch mixing every kind of problem: clean, fallback, degenerate, zero-init,
    non-finite. Both are float64; the batched LU and the per-layer one differ only by rounding (1e-9)."""
    from ds_scalora.scaling import solve_scaling_batch

    gen = torch.Generator().manual_seed(5)
    layers = []
    for kind in ["random", "aligned", "lowrank", "magnitudes", "zero_A", "zero_column", "aligned", "random"]:
        A, B, G = _problem(kind, gen)
        layers.append([A, B, G @ B, G.T @ A])
    layers[3][2] = torch.zeros_like(layers[3][2])  # zero gradients: degenerate
    layers[3][3] = torch.zeros_like(layers[3][3])
    layers[6][2] = layers[6][2].clone()
    layers[6][2][1, 1] = math.nan  # one non-finite layer does not disturb the others
    scales = [1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.0, 0.25]
    for strength in (1.0, "auto"):
        batch = solve_scaling_batch(*(torch.stack(t) for t in zip(*layers)), strength, solver,
                                    torch.tensor(scales), shrink=2.0, max_scale=100.0)
        reasons = set()
        for (A, B, gA, gB), s, got in zip(layers, scales, batch):
            want = solve_scaling(A, B, gA, gB, strength, solver, s, shrink=2.0, max_scale=100.0)
            assert (got.solver_used, got.reason) == (want.solver_used, want.reason)
            torch.testing.assert_close(got.alpha, want.alpha, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got.beta, want.beta, rtol=1e-9, atol=1e-12)
            assert got.strength == pytest.approx(want.strength, rel=1e-9)
            reasons.add(got.reason)
        assert {"nonfinite", "degenerate"} <= reasons


def test_nnls_batch_is_each_problem_alone():
    """The lock-step batched active set against scipy's NNLS on each problem alone: with H = LLᵀ,
    ½zᵀHz − bᵀz = ½‖Lᵀz − L⁻¹b‖² + const. Well-conditioned random problems: agreement to 1e-8."""
    from ds_scalora.scaling import nnls_gram_batch

    gen = torch.Generator().manual_seed(6)
    X = torch.randn(20, 19, 16, dtype=F64, generator=gen)
    H = X.mT @ X
    b = torch.randn(20, 16, dtype=F64, generator=gen)
    batch = nnls_gram_batch(H, b)
    for i in range(20):
        L = torch.linalg.cholesky(H[i])
        want, _ = scipy.optimize.nnls(L.T.numpy(), torch.linalg.solve_triangular(L, b[i, :, None], upper=False)[:, 0].numpy())
        torch.testing.assert_close(batch[i], torch.from_numpy(want), rtol=1e-8, atol=1e-10)


def test_problems_of_factors_stored_transposed_equal_a_float64_reference():
    """build_problems writes factors stored transposed (lora_A: r x d_in in memory, the refresh's views) as
    Sᵀ along their rows, others into the columns of S: both layouts give the Gram products of a plain
    float64 concatenation, from float32 inputs (only the summation order differs: rtol 1e-12)."""
    from ds_scalora.scaling import build_problems

    g = torch.Generator().manual_seed(0)
    n, d_out, d_in, r = 3, 7, 11, 2
    A, gA = (torch.randn(n, d_out, r, generator=g) for _ in range(2))
    Bt, gBt = (torch.randn(n, r, d_in, generator=g) for _ in range(2))  # stored r x d_in, as lora_A
    B, gB = Bt.mT, gBt.mT
    assert B.mT.is_contiguous() and not B.is_contiguous()  # the transposed path is the one taken
    scale = torch.tensor([0.5, 1.0, 2.0])
    transposed = build_problems(A, B, gA, gB, scale)
    columns = build_problems(A, B.contiguous(), gA, gB.contiguous(), scale)
    S_A = torch.cat([A, gA], -1).double()
    S_B = torch.cat([gB, B], -1).double()
    H = (S_A.mT @ S_A) * (S_B.mT @ S_B)
    for problem in (transposed, columns):
        torch.testing.assert_close(problem.H, H, rtol=1e-12, atol=0)

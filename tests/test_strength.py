"""The merging strength (shrink), the guard rails, the Adam-aware solver and the library defaults.

References are independent of the code under test: the Adam directions against torch's own AdamW step,
the Adam-aware solve against scipy's NNLS on the materialised basis matrices, in float64.
"""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from ds_scalora.bench import regression
from ds_scalora.scaling import adam_direction, build_adam_problem, solve_scaling

F64 = torch.float64


def _layer(gen, m=12, n=9, r=4):
    A = torch.randn(m, r, dtype=F64, generator=gen)
    B = torch.randn(n, r, dtype=F64, generator=gen)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    return A, B, G


def _directions(gen, A, B):
    """Adam-like directions: correlated with the gradients but not equal to them."""
    return (torch.randn(A.shape, dtype=F64, generator=gen), torch.randn(B.shape, dtype=F64, generator=gen))


@pytest.mark.parametrize("solver", ["column", "nnls", "adam"])
@pytest.mark.parametrize("shrink", [1.0, 1.5, 4.0])
def test_shrink_divides_the_adapters_squared_norm(solver, shrink):
    """strength "auto": Σ_j (α_j²‖â_j‖² + β_j²‖b̂_j‖²) after the refresh = (the same before) / shrink,
    to rounding (1e-9 relative), for the paper's solvers and the Adam-aware one; shrink 1 keeps the size."""
    gen = torch.Generator().manual_seed(int(shrink * 10) + len(solver))
    for trial in range(10):
        A, B, G = _layer(gen)
        s = [1.0, 2.0, 16 / math.sqrt(8)][trial % 3]
        gA, gB = s * G @ B, s * G.T @ A
        dirs = _directions(gen, A, B) if solver == "adam" else None
        sol = solve_scaling(A, B, gA, gB, "auto", solver=solver, scale=s, shrink=shrink, directions=dirs)
        assert sol.rescaled
        before = s * (A.pow(2).sum() + B.pow(2).sum())
        after = s * ((A * sol.alpha).pow(2).sum() + (B * sol.beta).pow(2).sum())
        assert float(after) == pytest.approx(float(before) / shrink, rel=1e-9)


def test_shrink_is_the_old_auto_times_shrink():
    """The solution at shrink k is the norm-keeping one with c multiplied by k (paper's problem: z / k)."""
    gen = torch.Generator().manual_seed(3)
    A, B, G = _layer(gen)
    keep = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls")
    four = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls", shrink=4.0)
    assert four.strength == pytest.approx(4 * keep.strength, rel=1e-12)
    assert torch.allclose(four.alpha, keep.alpha / 2, rtol=1e-12) and torch.allclose(four.beta, keep.beta / 2, rtol=1e-12)


def test_max_scale_bounds_a_tiny_column():
    """A column 1e-12 the size of the others would be scaled up by ~1e12 to balance (and its crossed
    second moment by 1e24); max_scale keeps every α_j, β_j within [1/max_scale, max_scale]."""
    gen = torch.Generator().manual_seed(5)
    A, B, G = _layer(gen)
    A[:, 1] *= 1e-12
    free = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls")
    assert float(free.alpha.max()) > 1e6  # the unbounded solve does blow up
    bounded = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls", max_scale=100.0)
    for k in (bounded.alpha, bounded.beta):
        assert float(k.max()) <= 100.0 and float(k.min()) >= 1 / 100.0
    assert torch.isfinite(bounded.alpha).all() and torch.isfinite(bounded.beta).all()


def test_ablations():
    gen = torch.Generator().manual_seed(8)
    A, B, G = _layer(gen)
    const = solve_scaling(A, B, G @ B, G.T @ A, "auto", shrink=4.0, ablation="constant_shrink")
    assert torch.allclose(const.alpha, torch.full((4,), 0.5, dtype=F64)) and torch.allclose(const.beta, const.alpha)
    solved = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls", shrink=4.0)
    rebal = solve_scaling(A, B, G @ B, G.T @ A, "auto", solver="nnls", shrink=4.0, ablation="rebalance_only")
    assert torch.allclose(rebal.alpha * rebal.beta, torch.ones(4, dtype=F64), rtol=1e-12)  # nothing merged
    some = solved.alpha * solved.beta > 0
    assert 0 < int(some.sum()) < 4  # this draw has a column that NNLS zeroes: it is left as it is (1, 1)
    assert torch.allclose((rebal.alpha / rebal.beta)[some], (solved.alpha / solved.beta)[some], rtol=1e-9)
    assert float(rebal.alpha[~some].sub(1).abs().max()) == 0 and float(rebal.beta[~some].sub(1).abs().max()) == 0


def test_adam_direction_is_torchs_adamw_step():
    """adam_direction × (−lr) is the step torch.optim.AdamW (no weight decay) takes, from no state and
    after a few steps: the elementwise formula, bias corrections and eps, to float64 rounding."""
    gen = torch.Generator().manual_seed(11)
    p = torch.nn.Parameter(torch.randn(7, 5, dtype=F64, generator=gen))
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    for step in range(4):
        p.grad = torch.randn(7, 5, dtype=F64, generator=gen)
        state = opt.state.get(p, {})
        u = adam_direction(p.grad, state.get("exp_avg"), state.get("exp_avg_sq"), step, (0.8, 0.95), 1e-6)
        before = p.detach().clone()
        opt.step()
        assert torch.allclose(p.detach() - before, -0.01 * u, rtol=1e-10, atol=1e-15), step


def _adam_brute_force(A, B, G, UA, UB, s, c):
    """min_{α,β >= 0} ‖G/c − s Σ_j (α_j a_j u_Bjᵀ + β_j u_Aj b_jᵀ)‖² by NNLS on the vectorised basis."""
    cols = [(s * A[:, j : j + 1] @ UB[:, j : j + 1].T).flatten() for j in range(A.shape[1])]
    cols += [(s * UA[:, j : j + 1] @ B[:, j : j + 1].T).flatten() for j in range(A.shape[1])]
    M = torch.stack(cols, 1).numpy()
    target = (G / c).flatten().numpy()
    w, _ = scipy.optimize.nnls(M, target, maxiter=50 * M.shape[1])
    return w, lambda ww: float(np.sum((target - M @ ww) ** 2)), float(np.sum(target**2))


def test_adam_aware_solver_matches_brute_force():
    """The Gram identities of build_adam_problem and the exact NNLS: the objective at the solution is
    within 1e-6 relative of the brute-force optimum (as for the paper's nnls solver in test_scaling), and
    the reported objective is (f − ‖G/c‖²)/2, the same reduction."""
    gen = torch.Generator().manual_seed(13)
    for trial in range(25):
        A, B, G = _layer(gen)
        s = [1.0, 0.5, 16 / math.sqrt(8)][trial % 3]
        c = float(10 ** torch.empty(1).uniform_(-2, 2, generator=gen))
        gA, gB = s * G @ B, s * G.T @ A
        UA = gA + 0.7 * torch.randn(A.shape, dtype=F64, generator=gen)  # Adam: aligned with the gradient, noisy
        UB = gB + 0.7 * torch.randn(B.shape, dtype=F64, generator=gen)
        w_bf, f, const = _adam_brute_force(A, B, G, UA, UB, s, c)
        q_bf = (f(w_bf) - const) / 2
        sol = solve_scaling(A, B, gA, gB, c, solver="adam", scale=s, directions=(UA, UB))
        w = torch.cat([sol.alpha, sol.beta]).numpy()
        q = (f(w) - const) / 2
        assert q <= q_bf + 1e-6 * abs(q_bf), (trial, q, q_bf)
        assert sol.objective == pytest.approx(q, rel=1e-8, abs=1e-12)
        assert sol.objective <= sol.objective_identity + 1e-12


def test_adam_problem_predicts_the_next_increment():
    """What the Adam-aware objective models is real: after a rescale (gradients and moments crossed),
    AdamW's next step changes s·A Bᵀ by −lr·s(U_A diag(β) Bᵀ + A diag(α) U_Bᵀ) plus the second-order
    lr²·s·U_A U_Bᵀ term, where U are the directions computed before the rescale (float64, eps → 0 so
    that Adam is exactly scale-invariant)."""
    from ds_scalora.rescale import cross_gradients_, cross_moments_, rescale_factors_

    gen = torch.Generator().manual_seed(17)
    A, B, G = _layer(gen)
    s, lr = 2.0, 1e-3
    pA, pB = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt = torch.optim.AdamW([pA, pB], lr=lr, eps=1e-30, weight_decay=0.0)
    for _ in range(3):  # build up moments
        pA.grad, pB.grad = torch.randn(A.shape, dtype=F64, generator=gen), torch.randn(B.shape, dtype=F64, generator=gen)
        opt.step()
    G = torch.randn(A.shape[0], B.shape[0], dtype=F64, generator=gen)
    pA.grad, pB.grad = s * G @ pB.detach(), s * G.T @ pA.detach()
    dirs = [adam_direction(p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], 3, (0.9, 0.999), 1e-30)
            for p in (pA, pB)]
    alpha = torch.rand(4, dtype=F64, generator=gen) + 0.2
    beta = torch.rand(4, dtype=F64, generator=gen) + 0.2
    A0, B0 = pA.detach().clone(), pB.detach().clone()
    rescale_factors_(pA.data, pB.data, alpha, beta)
    cross_gradients_(pA.grad, pB.grad, alpha, beta)
    cross_moments_(opt.state[pA], opt.state[pB], alpha, beta)
    before = s * pA.detach() @ pB.detach().T
    opt.step()
    got = s * pA.detach() @ pB.detach().T - before
    UA, UB = dirs
    predicted = -lr * s * (UA * beta @ B0.T + (A0 * alpha) @ UB.T) + lr * lr * s * UA @ UB.T
    assert torch.allclose(got, predicted, rtol=1e-9, atol=1e-14)
    # and the Gram form of the first-order part: ‖Σ w_j basis_j‖² = wᵀKw
    problem = build_adam_problem(A0, B0, pA.grad, pB.grad, UA, UB, scale=s)
    w = torch.cat([alpha, beta])
    first = s * (UA * beta @ B0.T + (A0 * alpha) @ UB.T)
    assert float(w @ problem.H @ w) == pytest.approx(float(first.pow(2).sum()), rel=1e-10)


def test_library_defaults_accumulate_past_lora_floor():
    """At the library defaults (strength "auto", default shrink, column solver), ScaLoRA-I on the
    single-layer high-rank regression ends well below the error any rank-4 update can reach, while
    LoRA sits at that floor, and so does the old norm-keeping "auto" (shrink 1, the default until
    2026-11-25): this test fails on that default. One seed not used for tuning; lr 1e-2 (in every grid)."""
    floor = regression.lora_floor(4)
    lora = regression.run({"method": "lora", "r": 4}, 1e-2, seed=7)["error"]
    old = regression.run({"method": "scalora", "r": 4, "interval": 10, "shrink": 1.0}, 1e-2, seed=7)["error"]
    scalora = regression.run({"method": "scalora", "r": 4, "interval": 10}, 1e-2, seed=7)
    print(f"floor {floor:.3f}, LoRA {lora:.3f}, old auto {old:.3f}, ScaLoRA-I {scalora['error']:.4f}, "
          f"energy outside top 4 {scalora['energy_outside_top_r']:.3f}")
    assert lora >= floor - 1e-3 and old >= floor - 1e-2
    assert scalora["error"] < 0.25 * floor
    assert scalora["energy_outside_top_r"] > 0.3  # the update really is high rank (D's own share: 0.561)


def test_adam_aware_solver_refuses_a_non_adam_optimizer():
    """SGD has no betas: the Adam-aware solver would model a step that never happens. It says so."""
    from ds_scalora import ScaLoRA, ScaLoRAConfig
    from tiny_models import fixed_batch, tiny_lora_model

    model = tiny_lora_model(torch.float32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    scalora = ScaLoRA(model, opt, ScaLoRAConfig(solver="adam", warmup_steps=0))
    model(**fixed_batch(seed=0)).loss.backward()
    with pytest.raises(ValueError, match="not Adam/AdamW"):
        scalora.refresh()

"""ElaLoRA: the math of ds_scalora.elastic and the single-process reference, checked in float64.

References are independent: the schedule against the cubic written out here, the regulariser's
gradient and the importance averages against autograd of ``loss + orth_reg · mean ‖·‖_F`` and a
direct implementation of the EMA formulas (research note §A.2, §A.5), the plan against its invariants
over many random score sets.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import fixed_batch, tiny_elastic_model

from ds_scalora import elastic
from ds_scalora.methods import ElaLoRA, ElaLoRAConfig, lora_adapter_tensors

# -- layer 1 ------------------------------------------------------------------------------------------


def test_schedule_is_cubic_decay_between_warmups():
    T, t_init, t_final, dT, b0 = 200, 20, 30, 10, 8
    got = {t: elastic.moves_at(t, T, t_init, t_final, dT, b0) for t in range(T)}
    for t, b in got.items():
        if t <= t_init or t >= T - t_final or (t - t_init) % dT:
            assert b == 0, t
        else:
            p = (t - t_init) / (T - t_final - t_init)
            assert b == round(b0 * (1 - p**3)), t
    rounds = [t for t, b in got.items() if b]
    assert rounds[0] == 30 and rounds[-1] == 160 and got[30] == 8 and got[160] == 1
    assert all(got[a] >= got[b] for a, b in zip(rounds, rounds[1:]))  # non-increasing
    assert elastic.scores_are_updated(169, T, t_final) and not elastic.scores_are_updated(170, T, t_final)


@pytest.mark.parametrize("seed", range(40))
def test_plan_keeps_budget_capacity_and_limits(seed):
    g = torch.Generator().manual_seed(seed)
    n, R, k = 7, 5, 2
    active = [torch.rand(R, generator=g) < 0.6 for _ in range(n)]
    for a in active:
        a[int(torch.randint(R, (1,), generator=g))] = True  # every matrix has at least one rank
    scores = [torch.rand(R, generator=g, dtype=torch.float64) for _ in range(n)]
    moves = int(torch.randint(0, 8, (1,), generator=g))
    prune, grow = elastic.plan_moves(scores, active, k, moves)
    assert len(prune) == len(grow) <= moves
    after = [int(a.sum()) for a in active]
    for i, j in prune:
        assert active[i][j]
        after[i] -= 1
    for i in grow:
        after[i] += 1
    assert sum(after) == sum(int(a.sum()) for a in active)  # the budget
    assert all(1 <= r <= R for r in after)
    assert all(sum(1 for i, _ in prune if i == m) <= k and grow.count(m) <= k for m in range(n))
    if prune:  # the pruned are the weakest offers: no unpruned offer scores below a pruned one
        worst_kept = min(
            (float(scores[i][j]) for i in range(n) for j in sorted(torch.nonzero(active[i]).flatten().tolist(),
             key=lambda j: float(scores[i][j]))[: min(k, int(active[i].sum()) - 1)] if (i, j) not in prune),
            default=math.inf,
        )  # fmt: skip
        assert max(float(scores[i][j]) for i, j in prune) <= worst_kept


def test_orthogonal_direction_is_unit_and_orthogonal():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, dtype=torch.float64, generator=g)  # not orthonormal
    v = elastic.orthogonal_direction(rows, torch.Generator().manual_seed(3))
    assert abs(float(v.norm()) - 1) < 1e-12
    assert float((rows @ v).abs().max()) < 1e-12 * float(rows.norm())
    assert torch.equal(v, elastic.orthogonal_direction(rows, torch.Generator().manual_seed(3)))  # every rank agrees


@pytest.mark.parametrize("rows", [True, False])
def test_orthogonality_gradient_matches_autograd(rows):
    g = torch.Generator().manual_seed(1)
    M = torch.randn((4, 30) if rows else (30, 4), dtype=torch.float64, generator=g)
    active = torch.tensor([True, False, True, True])
    if rows:
        M[~active] = 0
    else:
        M[:, ~active] = 0
    value, grad = elastic.orthogonality_penalty(M, active, rows)
    X = M.clone().requires_grad_(True)
    G = X @ X.T if rows else X.T @ X
    ref = torch.linalg.matrix_norm(G - torch.diag(active.double()))
    ref.backward()
    assert abs(float(value - ref)) < 1e-12 * float(ref)
    assert float((grad - X.grad).norm()) < 1e-12 * float(X.grad.norm())
    assert float(grad[~active].abs().sum() if rows else grad[:, ~active].abs().sum()) == 0  # inactive: no pull


@pytest.mark.parametrize("rows", [True, False])
def test_batched_penalties_and_importances_equal_one_at_a_time(rows):
    """The per-step work runs batched (one shape at a time, multi-tensor EMAs): the same values as one
    factor at a time, written out here, including a factor whose penalty is exactly zero."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn((5, 4, 30) if rows else (5, 30, 4), dtype=torch.float64, generator=g)
    active = torch.rand(5, 4, generator=g) < 0.6
    active[:, 0] = True
    for k in range(5):
        if rows:
            M[k][~active[k]] = 0
        else:
            M[k][:, ~active[k]] = 0
    M[3] = 0
    active[3] = False  # G = 0 = D: a zero penalty and a zero gradient, not NaN
    norms, grads = elastic.orthogonality_penalties(M, active, rows)
    for k in range(5):
        G = M[k] @ M[k].T if rows else M[k].T @ M[k]
        X = G - torch.diag(active[k].double())
        ref = torch.linalg.matrix_norm(X)
        assert abs(float(norms[k] - ref)) <= 1e-12 * max(float(ref), 1.0)
        ref_grad = torch.zeros_like(M[k]) if ref == 0 else 2 * (X @ M[k] if rows else M[k] @ X) / ref
        assert torch.allclose(grads[k], ref_grad, rtol=1e-12, atol=0)
    assert float(norms[3]) == 0 and not grads[3].any()
    values = [torch.randn(n, generator=g) for n in (7, 1, 12)]
    grads_ = [torch.randn(n, generator=g) for n in (7, 1, 12)]
    ipt = [torch.rand(n, generator=g) for n in (7, 1, 12)]
    unc = [torch.rand(n, generator=g) for n in (7, 1, 12)]
    ipt_ref, unc_ref = [t.clone() for t in ipt], [t.clone() for t in unc]
    elastic.update_importances_(ipt, unc, values, grads_, 0.85, 0.8)
    for i in range(3):  # the formulas of §A.2, one tensor at a time: bit for bit
        sens = (values[i] * grads_[i]).abs()
        ipt_ref[i] = ipt_ref[i] * 0.85 + sens * (1 - 0.85)
        unc_ref[i] = unc_ref[i] * 0.8 + (sens - ipt_ref[i]).abs() * (1 - 0.8)
        assert torch.allclose(ipt[i], ipt_ref[i], rtol=1e-6, atol=0) and torch.allclose(unc[i], unc_ref[i], rtol=1e-6, atol=1e-7)


# -- the reference, float64 ----------------------------------------------------------------------------

CFG = {"init_rank": 2, "max_rank": 4, "init_warmup": 1, "final_warmup": 1, "interval": 2, "moves": 3, "per_matrix": 2}


def setup(steps=10, **overrides):
    model = tiny_elastic_model(total_steps=steps, init_rank=CFG["init_rank"], max_rank=CFG["max_rank"]).double()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    cfg = ElaLoRAConfig(total_steps=steps, **{**CFG, **overrides})
    return model, opt, ElaLoRA(model, opt, cfg)


def batch(step):
    return fixed_batch(seed=100 + step)


def one_step(model, opt, ela, step):
    model(**batch(step)).loss.backward()
    report = ela.after_backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return report


def test_budget_constant_and_moves_follow_schedule():
    model, opt, ela = setup(steps=12)
    budget = 2 * len(ela.layers)
    for t in range(12):
        report = one_step(model, opt, ela, t)
        assert sum(report.ranks) == budget
        assert report.moves == ela.core.config.moves_at(t)  # buffers have room: every scheduled move happens
        assert len(report.pruned) == len(report.grown) == report.moves
    assert [r["step"] for r in ela.core.rounds] == [0, 3, 5, 7, 9]
    assert [r["moves"] for r in ela.core.rounds] == [0, 3, 3, 2, 1]


def test_importance_and_regulariser_match_autograd_and_the_formulas():
    model, opt, ela = setup(steps=10)
    layers = ela.layers
    params = [(i, name, p) for i, layer in enumerate(layers) for name, p, _ in layer.factors()]
    ipt = {(i, n): torch.zeros_like(p) for i, n, p in params}
    unc = {(i, n): torch.zeros_like(p) for i, n, p in params}
    for t in range(3):  # steps 0-2: before the first round (which rewrites the touched slots' gradients)
        # independent: autograd of loss + 0.1 · mean over the 2·L tensors of ‖Q Qᵀ − I‖ / ‖Pᵀ P − I‖
        snapshot = {(i, n): p.detach().clone() for i, n, p in params}
        loss = model(**batch(t)).loss
        reg = 0
        for i, layer in enumerate(layers):
            D = torch.diag(ela.core.active[i].double())
            reg = reg + torch.linalg.matrix_norm(layer.Q @ layer.Q.T - D) + torch.linalg.matrix_norm(layer.P.T @ layer.P - D)
        total = loss + 0.1 * reg / (2 * len(layers))
        grads = torch.autograd.grad(total, [p for _, _, p in params])
        ref_grad = {(i, n): g for (i, n, _), g in zip(params, grads)}
        loss2 = model(**batch(t)).loss
        loss2.backward()
        ela.after_backward()
        for key in ref_grad:
            p = dict(((i, n), p) for i, n, p in params)[key]
            assert float((p.grad - ref_grad[key]).abs().max()) <= 1e-12 + 1e-9 * float(ref_grad[key].abs().max()), (t, key)
            sens = (snapshot[key] * ref_grad[key]).abs()
            ipt[key] = 0.85 * ipt[key] + 0.15 * sens
            unc[key] = 0.85 * unc[key] + 0.15 * (sens - ipt[key]).abs()
            got_ipt, got_unc = ela.core.ema[key]
            # the averages are kept in fp32: relative 1e-6 of the largest entry
            assert float((got_ipt.view_as(p).double() - ipt[key]).abs().max()) <= 1e-6 * float(ipt[key].abs().max()) + 1e-30
            assert float((got_unc.view_as(p).double() - unc[key]).abs().max()) <= 1e-6 * float(unc[key].abs().max()) + 1e-30
        opt.step()
        opt.zero_grad(set_to_none=True)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=fixed_batch(seed=7)["input_ids"]).logits.double()


def test_reallocation_round_prunes_exactly_grows_silently_and_keeps_other_moments():
    model, opt, ela = setup(steps=10)
    for t in range(3):
        one_step(model, opt, ela, t)
    # step 3 is a round: inspect the window around it
    model(**batch(3)).loss.backward()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for layer in ela.layers for _, p, _ in layer.factors()}
    values = {id(p): p.detach().clone() for layer in ela.layers for _, p, _ in layer.factors()}
    report = ela.after_backward()
    assert report.moves == 3 and opt is ela.optimizer
    touched = {(name, j) for name, j in report.pruned + report.grown}
    for i, layer in enumerate(ela.layers):
        for fname, p, axis in layer.factors():
            for j in range(CFG["max_rank"]):
                sel = (slice(None), j) if axis == 1 else (j,)
                for key in ("exp_avg", "exp_avg_sq"):
                    now, then = opt.state[p][key][sel], before[id(p)][key][sel]
                    if (layer.name, j) in touched:
                        assert torch.all(now == 0), (layer.name, fname, j)  # fresh moments for the slot
                    else:
                        assert torch.equal(now, then), (layer.name, fname, j)  # bit-identical
                if (layer.name, j) not in touched:
                    assert torch.equal(p.detach()[sel], values[id(p)][sel])
    # pruned slots are exact zeros; grown slots are orthonormal directions with λ ≈ 0
    for name, j in report.pruned:
        if (name, j) in report.grown:
            continue
        layer = next(layer for layer in ela.layers if layer.name == name)
        assert float(layer.Q[j].abs().sum() + layer.P[:, j].abs().sum() + layer.lam[j].abs().sum()) == 0
    logits_after = _logits(model)
    silenced = copy.deepcopy(model)
    by_name = {layer.name: layer for layer in ela.layers}
    from ds_scalora.methods import find_svd_layers

    for layer in find_svd_layers(silenced):
        for name, j in report.grown:
            if name == layer.name:
                with torch.no_grad():
                    layer.lam[j] = 0
                assert abs(float(by_name[name].lam[j]) - 1e-13) < 1e-20
                assert abs(float(by_name[name].Q[j].norm()) - 1) < 1e-12
    rel = float((logits_after - _logits(silenced)).norm() / _logits(silenced).norm())
    assert rel < 1e-6, rel  # an expansion changes the logits by less than 1e-6 relative
    assert opt.param_groups[0]["lr"] == 1e-2  # the optimizer and its schedule are untouched


def test_inactive_slots_contribute_nothing_and_stay_zero():
    model, opt, ela = setup(steps=10)
    for t in range(8):
        one_step(model, opt, ela, t)
    model(**batch(8)).loss.backward()
    for i, layer in enumerate(ela.layers):
        off = ~ela.core.active[i]
        for _, p, axis in layer.factors():
            sl = (slice(None), off) if axis == 1 else (off,)
            assert torch.all(p.detach()[sl] == 0) and torch.all(p.grad[sl] == 0)  # no gradient can revive them
    opt.zero_grad(set_to_none=True)
    # the model's output equals base + s · P_act diag(λ_act) Q_act, computed by hand
    x = torch.randn(3, ela.layers[0].Q.shape[1], dtype=torch.float64)
    layer = ela.layers[0]
    act = ela.core.active[0]
    with torch.no_grad():
        by_hand = x @ layer.weight.T + ela.core.scales[0] * (x @ (layer.Q[act].T * layer.lam[act].T) @ layer.P[:, act].T)
        assert float((layer.module(x) - by_hand).abs().max()) < 1e-12


def test_state_dict_round_trip_continues_identically():
    model, opt, ela = setup(steps=10)
    for t in range(4):
        one_step(model, opt, ela, t)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(ela.state_dict()))
    for t in range(4, 10):
        one_step(model, opt, ela, t)
    model2, opt2, ela2 = setup(steps=10)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    ela2.load_state_dict(saved[2])
    for t in range(4, 10):
        one_step(model2, opt2, ela2, t)
    assert ela2.core.rounds == ela.core.rounds
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n


def test_lora_export_reproduces_the_svd_form():
    model, opt, ela = setup(steps=10)
    for t in range(6):
        one_step(model, opt, ela, t)
    for i, layer in enumerate(ela.layers):
        A, B = lora_adapter_tensors(layer.P.detach(), layer.lam.detach(), layer.Q.detach(), ela.core.active[i],
                                    ela.core.scales[i])  # fmt: skip
        assert A.shape[0] == int(ela.core.active[i].sum())
        svd = ela.core.scales[i] * layer.P.detach() @ (layer.Q.detach() * layer.lam.detach())
        assert float((B @ A - svd).abs().max()) < 1e-14 + 1e-12 * float(svd.abs().max())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="max_rank"):
        ElaLoRAConfig(total_steps=10, init_rank=8, max_rank=4)
    with pytest.raises(ValueError, match="init_warmup"):
        ElaLoRAConfig(total_steps=10, init_warmup=5, final_warmup=5)
    model = tiny_elastic_model(total_steps=10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="max_rank"):
        ElaLoRA(model, opt, ElaLoRAConfig(total_steps=10, init_rank=2, max_rank=6, init_warmup=1, final_warmup=1))


@pytest.mark.parametrize("slot_axis", [0, 1])
def test_slot_scores_from_any_pieces_equal_the_slot_means(slot_axis):
    """The slot scores summed over any cut of the flattened tensor into pieces (as ZeRO shards it, mid-row
    included) equal the brute-force mean over each slot, in float64 (tolerance 1e-12: only the order of
    additions differs)."""
    g = torch.Generator().manual_seed(3)
    shape = (6, 7)  # Q-like (slots = rows) or P-like (slots = columns)
    rank = shape[slot_axis]
    ipt, unc = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    want = (ipt * unc).mean(dim=1 - slot_axis)
    for cuts in ([], [20], [3, 17, 18, 40], [7, 14, 21]):
        bounds = [0, *cuts, ipt.numel()]
        got = sum(elastic.slot_score_part(ipt.view(-1)[lo:hi], unc.view(-1)[lo:hi], lo, shape, slot_axis, rank)
                  for lo, hi in zip(bounds, bounds[1:]))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

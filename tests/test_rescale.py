"""The rescale step's functions against autograd and dense references (float64)."""

import torch

from ds_scalora.rescale import (
    cross_gradients_,
    merge_delta,
    rescale_factors_,
)

F64 = torch.float64


def expand_column_scale(  # the element-by-element reference for column_scalings
    k: torch.Tensor, shape: tuple, axis: int, start: int, numel: int) -> torch.Tensor:
    """The per-element factor for elements ``[start, start + numel)`` of a row-major 2-D tensor of
    ``shape`` whose index along ``axis`` is scaled by ``k``: how a column scaling acts on a flat shard.

    PEFT's ``lora_B.weight`` (d_out x r) is scaled along axis 1, ``lora_A.weight`` (r x d_in) along axis 0.
    """
    idx = torch.arange(start, start + numel, device=k.device)
    which = idx % shape[1] if axis == 1 else idx // shape[1]
    return k[which]


def test_rewrite_preserves_effective_weight_and_crosses_gradients():
    """W + sABᵀ is unchanged by merge + rescale; autograd at the new factors equals the crossed grads."""
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(s, dtype=F64, generator=g) for s in ((9, 7), (9, 3), (7, 3)))
    target = torch.randn(9, 7, dtype=F64, generator=g)
    s = 0.8
    alpha, beta = torch.rand(3, dtype=F64, generator=g) + 0.1, torch.rand(3, dtype=F64, generator=g) + 0.1

    def loss(W, A, B):
        return ((W + s * A @ B.T - target) ** 3).sum()  # anything non-quadratic

    A.requires_grad_(True)
    B.requires_grad_(True)
    loss(W, A, B).backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    with torch.no_grad():
        W2 = W + merge_delta(A, B, alpha, beta, s, dtype=F64)
        A2, B2 = A.detach().clone(), B.detach().clone()
        rescale_factors_(A2, B2, alpha, beta)
        torch.testing.assert_close(W2 + s * A2 @ B2.T, W + s * A @ B.T, rtol=1e-13, atol=1e-13)
    cross_gradients_(gA, gB, alpha, beta)
    A2.requires_grad_(True)
    B2.requires_grad_(True)
    loss(W2, A2, B2).backward()
    torch.testing.assert_close(A2.grad, gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B2.grad, gB, rtol=1e-10, atol=1e-12)


def test_flat_pieces_tile_the_dense_versions():
    """A shard of the merge (as the refresh forms it from the factors, ``MergePolicy.merge_product_``, in
    both weight layouts) / of a column scaling equals the same slice of the dense result."""
    from ds_scalora.precision import get_policy

    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(11, 4, dtype=F64, generator=g), torch.randn(6, 4, dtype=F64, generator=g)
    alpha, beta = torch.rand(4, dtype=F64, generator=g), torch.rand(4, dtype=F64, generator=g)
    dense = merge_delta(A, B, alpha, beta, 0.5, dtype=F64)
    for transpose, full in ((False, dense.reshape(-1)), (True, dense.T.reshape(-1))):
        coef = (1 - alpha * beta) * 0.5
        left, right = (B * coef, A) if transpose else (A * coef, B)
        merged = torch.zeros(66, dtype=F64)
        for start, n in ((0, 13), (13, 40), (53, 13)):
            get_policy("auto", F64).merge_product_(merged[start : start + n], left, right, start, None)
        torch.testing.assert_close(merged, full, rtol=1e-14, atol=1e-14)
    k = torch.rand(4, dtype=F64, generator=g)
    M = torch.randn(11, 4, dtype=F64, generator=g)  # like lora_B: columns scaled
    assert torch.equal(expand_column_scale(k, (11, 4), 1, 5, 30) * M.reshape(-1)[5:35], (M * k).reshape(-1)[5:35])
    N = torch.randn(4, 6, dtype=F64, generator=g)  # like lora_A: rows scaled
    assert torch.equal(expand_column_scale(k, (4, 6), 0, 7, 10) * N.reshape(-1)[7:17], (N * k[:, None]).reshape(-1)[7:17])


def test_rescale_pieces_scale_every_piece_by_its_own_columns():
    """RefreshCore.rescale_pieces on pieces cut at every kind of boundary (partial first and last rows, whole
    rows, one element, the whole tensor; three cuts of every factor of a tiny model), as ZeRO cuts them, against the dense rescale: masters by their own
    factor (lora_B's columns by α, lora_A's rows by β), gradients and first moments crossed, second moments
    by the crossed square; expand_column_scale spells the expected factors out element by element."""
    from ds_scalora import ScaLoRA, ScaLoRAConfig
    from ds_scalora.pieces import Piece
    from tiny_models import adamw, tiny_lora_model

    model = tiny_lora_model(F64, r=3)
    core = ScaLoRA(model, adamw(model), ScaLoRAConfig()).core
    gen = torch.Generator().manual_seed(0)
    packed = torch.rand(core.packed_total, dtype=F64, generator=gen) + 0.5
    alpha, beta = core.per_layer(packed)
    params = [(layer.lora_B, layer.lora_A) for layer in core.layers]
    rescaled = list(range(0, len(params), 2))  # the others are left alone
    checks = []
    for trial in range(3):
        pieces = {}
        for index, pair in enumerate(params):
            for j, p in enumerate(pair):
                total = p.numel()
                start = [0, 1, total - 1][trial] if j else [0, 7, total // 3][trial]
                numel = [total, total - start - 1, 1][trial] if j else [total, total // 2, total - start][trial]
                dense = {name: torch.randn(p.shape, dtype=F64, generator=gen)
                         for name in ("master", "grad", "exp_avg", "exp_avg_sq")}
                flat = {name: t.reshape(-1)[start : start + numel].clone() for name, t in dense.items()}
                pieces[id(p)] = Piece(start, numel, flat["master"], flat["grad"],
                                      {"exp_avg": flat["exp_avg"], "exp_avg_sq": flat["exp_avg_sq"]})
                own, crossed = (alpha[index], beta[index]) if j == 0 else (beta[index], alpha[index])
                axis = 1 if j == 0 else 0  # lora_B (d_out x r): columns; lora_A (r x d_in): rows
                factor = {"master": own, "grad": crossed, "exp_avg": crossed, "exp_avg_sq": crossed * crossed}
                for name in dense:
                    expand = expand_column_scale(factor[name], tuple(p.shape), axis, start, numel)
                    before = dense[name].reshape(-1)[start : start + numel]
                    want = before * expand if index in rescaled else before
                    # the factors lie in [0.5, 1.5): a rescaled piece that was left alone cannot pass
                    assert (index in rescaled) != torch.equal(want, before)
                    checks.append((flat[name], want, (trial, index, j, name, start, numel)))
        core.rescale_pieces(params, pieces, packed, rescaled)
    for got, want, where in checks:
        assert torch.equal(got, want), where

"""The accumulated-rank sketch against the brute-force rank of the explicitly accumulated update."""

import pytest
import torch

from ds_scalora.spectrum import RankSketch, numerical_rank


def _factors(g, d_out, d_in, r):
    return torch.randn(d_out, r, generator=g, dtype=torch.float64), torch.randn(d_in, r, generator=g, dtype=torch.float64)


def test_sketch_rank_matches_the_explicit_update():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, s = 64, 48, 4, 0.5
    sketch = RankSketch(d_out, d_in, k=40, seed=7)
    total = torch.zeros(d_out, d_in, dtype=torch.float64)
    for merges in range(1, 6):
        A, B = _factors(g, d_out, d_in, r)
        w = torch.rand(r, generator=g, dtype=torch.float64) + 0.1  # 1 - alpha*beta, away from 0
        sketch.add(A, B, w, s)
        total += s * (A * w) @ B.T
        # float64 reference: the explicit sum of rank-4 increments (well separated from zero)
        assert numerical_rank(total, rtol=1e-3) == 4 * merges
        assert sketch.rank() == 4 * merges
    A, B = _factors(g, d_out, d_in, r)  # the current adapter adds its own directions
    assert sketch.rank(A, B, s) == numerical_rank(total + s * A @ B.T, rtol=1e-3) == 24


def test_sketch_saturates_at_k_and_is_zero_before_any_merge():
    g = torch.Generator().manual_seed(1)
    sketch = RankSketch(32, 32, k=8, seed=3)
    assert sketch.rank() == 0
    A, B = _factors(g, 32, 32, 16)
    sketch.add(A, B, torch.ones(16, dtype=torch.float64), 1.0)
    assert sketch.rank() == 8  # min(rank 16, k 8)


def test_sketch_ignores_columns_that_were_not_merged():
    """weights = 1 - alpha*beta is 0 for columns kept whole: they add nothing to the merged part."""
    g = torch.Generator().manual_seed(2)
    sketch = RankSketch(40, 30, k=20, seed=5)
    A, B = _factors(g, 40, 30, 6)
    w = torch.tensor([1.0, 0, 0, 2.0, 0, 0], dtype=torch.float64)
    sketch.add(A, B, w, 1.0)
    assert sketch.rank() == 2
    other = RankSketch(40, 30, k=20, seed=5)
    other.load_(sketch.Y)  # a resumed run regenerates the same Omega from the seed
    assert other.rank() == 2 and torch.equal(other.Y, sketch.Y)
    with pytest.raises(ValueError, match="rank_sketch"):
        RankSketch(40, 30, k=10, seed=5).load_(sketch.Y)


def test_energy_outside_top_r_exact_and_sketched():
    """energy_outside_top against the definition, and the sketch estimate (k = 64) against the exact share.

    A 96 x 80 update with a known spectrum: σ_i = i^-½ (share outside the top 4: Σ_{i>4} 1/i / Σ 1/i).
    The sketch's top-r energy also catches part of the tail, so it underestimates the share; with k = 64
    Gaussian columns the relative error of the energies is ~1/√k per direction, and the test allows 0.1
    absolute (the share here is 0.62), with the sign of the bias checked over 20 independent sketches.
    """
    import torch

    from ds_scalora.spectrum import RankSketch, energy_outside_top

    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 80, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64, generator=gen))
    s = torch.arange(1, 81, dtype=torch.float64) ** -0.5
    M = U @ torch.diag(s) @ V.T
    exact = float((s[4:] ** 2).sum() / (s**2).sum())
    assert energy_outside_top(M, 4) == pytest.approx(exact, rel=1e-12)
    assert energy_outside_top(U[:, :3] @ V[:, :3].T, 4) == pytest.approx(0.0, abs=1e-12)
    estimates = []
    for seed in range(20):
        sketch = RankSketch(96, 80, 64, seed=seed)
        sketch.Y.copy_((M @ sketch.omega().double()).float())
        estimates.append(sketch.energy_outside(4))
    assert all(abs(e - exact) < 0.1 for e in estimates), (exact, estimates)
    assert sum(estimates) / len(estimates) < exact  # biased low, as documented


def test_sketch_batch_is_each_layer_sketched_alone():
    """SketchBatch (one stacked Y per shape; ``add`` at every refresh, ``measure`` only when asked) against
    a RankSketch per layer fed the same merges. A measurement skipped leaves nothing out: the merges are
    added all the same. Ranks equal; shares to 1e-5 relative (Y is float32 in both, summed in a
    different order, ~1e-7 relative, and the share is a ratio of sums of its squared singular values)."""
    from ds_scalora.spectrum import SketchBatch

    g = torch.Generator().manual_seed(4)
    n, d_out, d_in, r = 3, 40, 30, 3
    batch = SketchBatch(d_out, d_in, 20, seeds=[11, 12, 13])
    alone = [RankSketch(d_out, d_in, 20, seed) for seed in (11, 12, 13)]
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for refresh in range(4):
        A = torch.randn(n, d_out, r, generator=g, dtype=torch.float64)
        B = torch.randn(n, d_in, r, generator=g, dtype=torch.float64)
        kept = torch.rand(n, r, generator=g, dtype=torch.float64)
        kept[1] = 1.0  # layer 1 not rescaled at all: nothing merged into its sketch
        BtO = batch.add(A, B, 1 - kept, scale)
        for j, sketch in enumerate(alone):
            sketch.add(A[j], B[j], 1 - kept[j], float(scale[j]))
        if refresh in (0, 3):  # refreshes 1 and 2 are not measured
            ranks, shares = batch.measure(A, BtO, kept, scale, r)
            for j, sketch in enumerate(alone):
                rank, share = sketch.measure(r, A[j] * kept[j], B[j], float(scale[j]))
                assert int(ranks[j]) == rank and float(shares[j]) == pytest.approx(share, rel=1e-5)
    assert [int(x) for x in ranks] == [12, 3, 12]  # 4 merges of rank 3 (the adapter's directions among them)

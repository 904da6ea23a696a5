"""Singular values and numerical rank of accumulated updates (for tests, logs and inspection)."""

from __future__ import annotations

import math

import torch


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, computed in float64, descending."""
    return torch.linalg.svdvals(M.detach().double())


def numerical_rank(M: torch.Tensor, rtol: float = 1e-6) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix)."""
    return _count_above(singular_values(M), rtol)


def _count_above(s: torch.Tensor, rtol: float) -> int:
    """How many of the descending singular values ``s`` exceed ``rtol`` times the largest."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > rtol * s[0]).sum())


def energy_outside_top(M: torch.Tensor, r: int) -> float:
    """Share of ``‖M‖_F²`` outside its top-``r`` singular directions (0 for a rank-<=r matrix, NaN for
    a zero one): how much of an accumulated update a rank-r adapter could not hold. Unlike the numerical
    rank, tiny directions count only by their energy."""
    return _tail_share(singular_values(M) ** 2, r)


def sketch_width(d_out: int, d_in: int, k: int) -> int:
    """The columns a sketch of a d_out x d_in update keeps for a requested ``k`` (no more than its rank can be)."""
    return max(1, min(k, d_in, d_out))


def _tail_share(energies: torch.Tensor, r: int) -> float:
    """Share of the total of descending ``energies`` (squared singular values) past the first ``r``."""
    total = float(energies.sum())
    return float(energies[r:].sum()) / total if total > 0 else float("nan")


class RankSketch:
    """A running estimate of the rank of one layer's accumulated update, at O((d_out + d_in)·k) memory.

    ScaLoRA's total update of a layer is everything merged so far plus the current adapter,
    ``ΔW = Σ_t s·A_t diag(1 − α_t∘β_t) B_tᵀ + s·A Bᵀ``. Keeping ΔW itself would cost a second copy of
    the weight; instead ``Y = ΔW_merged Ω`` is kept for a fixed Gaussian ``Ω`` (d_in x k, regenerated
    from ``seed``, never stored). For a Gaussian Ω, rank(ΔW Ω) = min(rank(ΔW), k) almost surely, so the
    numerical rank of ``Y + s·A (Bᵀ Ω)`` estimates the accumulated rank up to ``k`` (the randomized
    range finder of Halko, Martinsson & Tropp 2011). Paper orientation: A is d_out x r, B is d_in x r.
    """

    def __init__(self, d_out: int, d_in: int, k: int, seed: int, device=None, Y: torch.Tensor | None = None):
        self.d_in, self.k, self.seed = d_in, sketch_width(d_out, d_in, k), seed
        # ``Y``: storage given by a SketchBatch (a view into its stacked tensor), else this sketch's own
        self.Y = torch.zeros(d_out, self.k, dtype=torch.float32, device=device) if Y is None else Y

    def omega(self) -> torch.Tensor:
        """The fixed test matrix; drawn on the CPU so every rank and device gets the same one."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.d_in, self.k, generator=g).to(self.Y.device)

    @torch.no_grad()
    def add(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
        """Account for a merge of ``scale · A diag(weights) Bᵀ`` (weights = 1 − α∘β)."""
        Y = scale * (A.float() * weights.float().to(A.device)) @ (B.float().T @ self.omega().to(B.device)).to(A.device)
        self.Y += Y.to(self.Y.device)

    @torch.no_grad()
    def energies(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None, scale: float = 1.0):
        """Squared singular values of the sketch (descending, float64) of the merged part, plus the
        current adapter ``scale · A Bᵀ`` when given: from the k x k Gram matrix (exact enough for
        thresholds >= 1e-6 of the largest singular value)."""
        Y = self.Y.double()
        if A is not None:
            Y = Y + scale * A.double().to(Y.device) @ (B.double().to(Y.device).T @ self.omega().double())
        return torch.linalg.eigvalsh(Y.T @ Y).clamp_min(0).flip(0)

    def rank(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None, scale: float = 1.0,
             rtol: float = 1e-3) -> int:
        """Numerical rank (singular values above ``rtol`` x the largest) of the sketched update."""
        return _count_above(self.energies(A, B, scale).sqrt(), rtol)

    def energy_outside(self, r: int, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                       scale: float = 1.0) -> float:
        """Estimated share of the sketched update's energy outside its top-``r`` directions.

        ``E[ΩΩᵀ] = k·I`` makes ``‖Y‖²`` an unbiased estimate of ``k‖ΔW‖²``; the top-r energy of ``Y`` is
        biased up (the sketch's top directions also catch some of the tail), so the share is an
        underestimate that tightens as k grows past r (tested against the exact SVD in tests/test_spectrum.py).
        """
        return _tail_share(self.energies(A, B, scale), r)

    def measure(self, r: int, A: torch.Tensor | None = None, B: torch.Tensor | None = None, scale: float = 1.0,
                rtol: float = 1e-3) -> tuple[int, float]:
        """:meth:`rank` and :meth:`energy_outside` from one eigendecomposition (what a refresh logs)."""
        e = self.energies(A, B, scale)
        return _count_above(e.sqrt(), rtol), _tail_share(e, r)

    def load_(self, Y: torch.Tensor) -> None:
        """Restore ``Y`` from a checkpoint (Ω is regenerated from the seed)."""
        if Y.shape != self.Y.shape:
            raise ValueError(f"saved rank sketch has shape {tuple(Y.shape)}, this run's is {tuple(self.Y.shape)}: "
                             "resume with the rank_sketch (k) the checkpoint was written with")
        self.Y.copy_(Y)


class SketchBatch:
    """The rank sketches of several layers of one shape, stored stacked and updated together: one
    batched product and one batched eigendecomposition per refresh instead of a dozen small operations
    per layer. ``sketches[j]`` is layer j's :class:`RankSketch` (its ``Y`` a view into the stack, so
    checkpoints save and load it per layer as before). The test matrices Ω are drawn once and kept,
    4·k·d_in bytes per layer beside Y's 4·k·d_out (drawing them at every refresh cost more than the
    rest of the sketch)."""

    def __init__(self, d_out: int, d_in: int, k: int, seeds: list, device=None):
        k = sketch_width(d_out, d_in, k)
        self.Y = torch.zeros(len(seeds), d_out, k, dtype=torch.float32, device=device)
        self.sketches = [RankSketch(d_out, d_in, k, seed, device, Y=self.Y[j]) for j, seed in enumerate(seeds)]
        self.omega = torch.stack([sketch.omega() for sketch in self.sketches])  # n x d_in x k

    @torch.no_grad()
    def add(self, A: torch.Tensor, B: torch.Tensor, merged: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Account for merges ``scale · A diag(merged) Bᵀ`` (merged = 1 − α∘β, 0 where a layer was not
        rescaled); A: n x d_out x r, B: n x d_in x r, the factors before the rescale. Every refresh does
        this (O((d_out + d_in)·r·k) per layer, one batched product). Returns ``Bᵀ Ω`` (n x r x k), which
        :meth:`measure` reuses."""
        dev = self.Y.device
        B, scale = B.to(dev, torch.float32), scale.to(dev, torch.float32)
        BtO = B.mT @ self.omega  # n x r x k
        weights = merged.to(dev, torch.float32) * scale[:, None]
        self.Y.baddbmm_(A.to(dev, torch.float32) * weights[:, None, :], BtO)
        return BtO

    @torch.no_grad()
    def measure(self, A: torch.Tensor, BtO: torch.Tensor, kept: torch.Tensor, scale: torch.Tensor, r: int,
                rtol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Measure the accumulated update with the adapter left, ``scale · A diag(kept) Bᵀ`` (kept = α∘β),
        from the k x k Gram matrices in float64 (O(d_out·k²) per layer and an eigendecomposition: the
        costly part, which is why a refresh measures only every ``rank_sketch_every`` steps). Returns each
        layer's numerical rank (:meth:`RankSketch.rank`) and share of energy outside its top r
        (:meth:`RankSketch.energy_outside`), as :meth:`RankSketch.measure` would."""
        dev = self.Y.device
        weights = kept.to(dev, torch.float64) * scale.to(dev, torch.float64)[:, None]
        now = torch.baddbmm(self.Y.double(), A.to(dev, torch.float64) * weights[:, None, :], BtO.double())
        e = torch.linalg.eigvalsh(now.mT @ now).clamp_min(0).flip(-1).cpu()  # descending, per layer
        s = e.sqrt()
        ranks = torch.where(s[:, 0] > 0, (s > rtol * s[:, :1]).sum(-1), 0)
        total = e.sum(-1)
        share = torch.where(total > 0, e[:, r:].sum(-1) / torch.where(total > 0, total, 1.0), math.nan)
        return ranks, share

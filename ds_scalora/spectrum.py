"""Singular values and numerical rank of accumulated updates (for tests, logs and inspection)."""

from __future__ import annotations

import torch


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, computed in float64, descending."""
    return torch.linalg.svdvals(M.detach().double())


def numerical_rank(M: torch.Tensor, rtol: float = 1e-6) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix)."""
    s = singular_values(M)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > rtol * s[0]).sum())

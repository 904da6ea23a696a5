"""Paired statistics for the powered benchmark: every arm is compared with LoRA seed by seed.

A seed fixes initialisation, data order and the task's instance, so the difference between two arms
on the same seed removes most of the seed-to-seed spread. Reported: the mean paired difference with a
95% t-interval, an exact two-sided Wilcoxon signed-rank test (scipy), and the share of the LoRA → full
fine-tuning gap closed with a paired bootstrap percentile interval.
"""

from __future__ import annotations

import math

import numpy as np


def paired_difference(baseline: list, arm: list, level: float = 0.95) -> dict:
    """``baseline − arm`` per seed (positive: the arm has the lower error/loss): mean, t-interval, Wilcoxon."""
    from scipy import stats

    d = np.asarray(baseline, dtype=float) - np.asarray(arm, dtype=float)
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan, "p_wilcoxon": math.nan}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(d, alternative="two-sided", method="exact" if n <= 50 else "auto",
                                 zero_method="wilcox").pvalue)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p_wilcoxon": p}


def gap_closed(lora: list, arm: list, full: list, resamples: int = 10_000, level: float = 0.95,
               seed: int = 0) -> dict:
    """Share of LoRA's gap to full fine-tuning that ``arm`` closes, ``(L − X) / (L − F)`` on the means over
    seeds, with a paired bootstrap percentile interval (seeds resampled together for all three arms)."""
    L, X, F = (np.asarray(v, dtype=float) for v in (lora, arm, full))
    share = float((L.mean() - X.mean()) / (L.mean() - F.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, L.size, size=(resamples, L.size))
    Lb, Xb, Fb = L[idx].mean(1), X[idx].mean(1), F[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (Lb - Xb) / (Lb - Fb)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size else (math.nan, math.nan)
    return {"share": share, "low": float(lo), "high": float(hi)}

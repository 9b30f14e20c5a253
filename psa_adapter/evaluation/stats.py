"""Confidence intervals for rates and means: percentile bootstrap, and a paired one over prompts for win rates.

Every interval here is a 95% percentile bootstrap with a fixed seed, so the same records always give the same
interval. ``n_boot`` resamples of the records (with replacement) give the statistic's distribution; the interval is
its 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean, *,
                 n_boot: int = DEFAULT_N_BOOT, level: float = 0.95, seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over ``values`` (N,) or (N, ...) rows resampled together.

    Returns ``(nan, nan)`` for no values. A rate is the mean of 0/1 values.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([statistic(values[i]) for i in idx]) if statistic is not np.mean else values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_with_ci(values: Sequence[float] | np.ndarray, **kwargs) -> dict:
    """``{"value": mean, "ci": [lo, hi], "n": N}`` (value None and ci [None, None] for no values)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    lo, hi = bootstrap_ci(values, **kwargs)
    return {"value": float(values.mean()), "ci": [lo, hi], "n": int(len(values))}


def paired_win_ci(outcomes: Sequence[float] | np.ndarray, **kwargs) -> dict:
    """Paired bootstrap over prompts for a comparison of two methods.

    ``outcomes`` (N,): per prompt +1 (A wins), -1 (B wins), 0 (tie). Prompts are resampled as units, so the
    intervals of ``win_rate_a``, ``win_rate_b``, ``tie_rate`` and of the difference ``a_minus_b`` respect the
    pairing; an interval of ``a_minus_b`` that excludes 0 says the two methods differ.
    """
    o = np.asarray(outcomes, dtype=np.float64)
    if len(o) == 0:
        return {name: {"value": None, "ci": [None, None]} for name in ("win_rate_a", "win_rate_b", "tie_rate",
                                                                         "a_minus_b")} | {"n": 0}
    columns = np.stack([o > 0, o < 0, o == 0, o], axis=1).astype(np.float64)
    rng = np.random.default_rng(kwargs.get("seed", DEFAULT_SEED))
    n_boot, level = kwargs.get("n_boot", DEFAULT_N_BOOT), kwargs.get("level", 0.95)
    idx = rng.integers(0, len(o), size=(n_boot, len(o)))
    boot = columns[idx].mean(axis=1)  # (n_boot, 4)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
    point = columns.mean(axis=0)
    names = ("win_rate_a", "win_rate_b", "tie_rate", "a_minus_b")
    out = {name: {"value": float(point[k]), "ci": [float(lo[k]), float(hi[k])]} for k, name in enumerate(names)}
    out["n"] = int(len(o))
    return out


__all__ = ["DEFAULT_N_BOOT", "DEFAULT_SEED", "bootstrap_ci", "mean_with_ci", "paired_win_ci"]

"""Bootstrap confidence intervals over samples and per-sample correlations with p-values.

Examples
--------
>>> lo, hi = bootstrap_ci(np.arange(10.0), n_boot=200, seed=0)
>>> bool(lo < 4.5 < hi)
True
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["ALL_SUBSETS", "Correlation", "bootstrap_ci", "bootstrap_mean_ci", "correlate",
           "subset_means"]

ALL_SUBSETS = "all"


def _resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_mean_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over axis 0 (samples), for every other entry at once.

    NaN entries are left out of each resampled mean (a sample missing one layer still counts for
    the others); an entry with no finite value gets a NaN interval.

    Parameters
    ----------
    values : array of shape (n_samples, ...)
    n_boot, seed, level : resamples, RNG seed, coverage

    Returns
    -------
    (lo, hi) : arrays of shape ``values.shape[1:]``

    Examples
    --------
    >>> lo, hi = bootstrap_mean_ci(np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> hi.tolist()[1], lo.tolist()[1]
    (1.0, 1.0)
    """
    values = np.asarray(values, dtype=np.float64)
    tail = values.shape[1:]
    if values.shape[0] == 0:
        return np.full(tail, np.nan), np.full(tail, np.nan)
    flat = values.reshape(values.shape[0], -1)
    idx = _resample_indices(values.shape[0], n_boot, seed)
    finite = np.isfinite(flat)
    sums = np.zeros((n_boot, flat.shape[1]))
    counts = np.zeros((n_boot, flat.shape[1]))
    # Accumulate per resample row to keep memory at n_boot x entries, not n_boot x n x entries.
    filled = np.where(finite, flat, 0.0)
    for j in range(values.shape[0]):
        sums += filled[idx[:, j]]
        counts += finite[idx[:, j]]
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():  # an all-NaN entry has a NaN interval, which is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(means, [alpha, 1.0 - alpha], axis=0)
    return np.asarray(lo).reshape(tail), np.asarray(hi).reshape(tail)


def bootstrap_ci(values: np.ndarray, statistic: Any = np.mean, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` of a 1-D sample (NaNs dropped first).

    Examples
    --------
    >>> bootstrap_ci(np.ones(5), n_boot=50)
    (1.0, 1.0)
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    idx = _resample_indices(x.size, n_boot, seed)
    stats = np.array([statistic(x[row]) for row in idx], dtype=np.float64)
    alpha = (1.0 - level) / 2.0
    return float(np.nanquantile(stats, alpha)), float(np.nanquantile(stats, 1 - alpha))


@dataclass
class Correlation:
    """Spearman and Pearson correlation of paired samples, with p-values and a bootstrap CI."""

    n: int
    spearman_rho: float
    spearman_p: float
    pearson_r: float
    pearson_p: float
    rho_ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rho_ci"] = list(self.rho_ci)
        return out


# resamples with a constant side (rho undefined) a rho bootstrap CI may leave out: at most the
# mass of one tail of the 95% interval
MAX_DEGENERATE_SHARE = 0.025


def correlate(x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> Correlation:
    """Per-sample Spearman and Pearson correlation of ``x`` with ``y`` (pairs with a NaN dropped).

    The CI is a percentile bootstrap of Spearman's rho over samples; NaN when more than
    :data:`MAX_DEGENERATE_SHARE` of the resamples have a constant side (rho undefined there:
    leaving them out would narrow the interval around the few varying resamples).
    Correlations are NaN when fewer than three pairs remain or either side is constant.

    Examples
    --------
    >>> c = correlate(np.arange(20.0), np.arange(20.0) ** 2, n_boot=100)
    >>> c.n, round(c.spearman_rho, 6), c.spearman_p < 1e-6
    (20, 1.0, True)
    """
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, nan, nan, nan, nan, (nan, nan))
    rho, p_rho = stats.spearmanr(x, y)
    r, p_r = stats.pearsonr(x, y)
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    idx = _resample_indices(n, n_boot, seed)
    boots = []
    for row in idx:
        # Spearman on a resample = Pearson of the resample's own ranks.
        a, b = stats.rankdata(rank_x[row]), stats.rankdata(rank_y[row])
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            boots.append(np.corrcoef(a, b)[0, 1])
    usable = len(boots) >= (1 - MAX_DEGENERATE_SHARE) * len(idx) and boots
    ci = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if usable else (nan, nan)
    return Correlation(n, float(rho), float(p_rho), float(r), float(p_r), ci)


def subset_means(values: np.ndarray, subsets: Sequence[str], *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Mean over samples per subset and over all samples, with bootstrap CIs and n.

    Parameters
    ----------
    values : array (n_samples, ...), NaN where a sample has no value
    subsets : each sample's subset label (empty labels count only towards ``"all"``)

    Returns
    -------
    dict with ``subset`` (sorted labels, ``"all"`` last) and ``mean``, ``lo``, ``hi``, ``n``,
    each of shape ``values.shape[1:] + (n_subsets,)``.

    Examples
    --------
    >>> out = subset_means(np.array([[1.0], [0.0], [1.0]]), ["hard", "easy", "hard"], n_boot=20)
    >>> out["subset"], out["mean"][0].tolist(), out["n"][0].tolist()
    (['easy', 'hard', 'all'], [0.0, 1.0, 0.6666666666666666], [1, 2, 3])
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray([str(s) for s in subsets], dtype=object)
    names = sorted({str(s) for s in labels if s and s != ALL_SUBSETS}) + [ALL_SUBSETS]
    shape = values.shape[1:] + (len(names),)
    mean, lo, hi = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    n = np.zeros(shape, dtype=np.int64)
    for k, name in enumerate(names):
        rows = values if name == ALL_SUBSETS else values[labels == name]
        n[..., k] = np.isfinite(rows).sum(axis=0)
        mean[..., k] = np.where(n[..., k] > 0, np.nansum(rows, axis=0) / np.maximum(n[..., k], 1), np.nan)
        lo[..., k], hi[..., k] = bootstrap_mean_ci(rows, n_boot=n_boot, seed=seed)
    return {"subset": names, "mean": mean, "lo": lo, "hi": hi, "n": n}

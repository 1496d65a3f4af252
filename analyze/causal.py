"""Causal-tracing summaries: effective visual depth, tau, the cliff boundary and transfer layers.

Inputs are ``delta`` matrices of shape (n_samples, n_layers) for one method and channel
(``D(l) = s_clean - s_patched(l)``, NaN where a value was not captured) and the matching layer
indices (the run's ``layer`` coordinate, which may skip layers).  RESEARCH.md section 1.

Examples
--------
>>> d = np.array([[2.0, 1.0, 0.5, 0.0], [2.0, 2.0, 0.0, 0.0]])
>>> evd_threshold(d, [0, 1, 2, 3], tau=0.5).tolist()
[2.0, 1.0]
>>> cliff_boundary(d, [0, 1, 2, 3], "median_evd", tau=0.5)
1.0
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

__all__ = ["CLIFF_METHODS", "adaptive_tau", "cliff_boundary", "evd_area", "evd_threshold",
           "mean_curve", "transfer_point", "transfer_window"]

CliffMethod = Literal["median_evd", "gradient", "threshold_crossing"]
CLIFF_METHODS: tuple[str, ...] = ("median_evd", "gradient", "threshold_crossing")


def _as_matrix(delta: np.ndarray, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    d = np.atleast_2d(np.asarray(delta, dtype=np.float64))
    lay = np.asarray(layers, dtype=np.float64)
    if d.shape[-1] != lay.size:
        raise ValueError(f"delta has {d.shape[-1]} layers but {lay.size} layer indices were given")
    return d, lay


def evd_threshold(delta: np.ndarray, layers: Sequence[int], tau: float) -> np.ndarray:
    """Effective visual depth ``max{l : D(l) >= tau}`` per sample.

    Returns -1 for a sample whose delta never reaches ``tau`` (the visual tokens matter at no
    captured layer), and NaN where the answer is unknown: a NaN delta (a failed measurement)
    at a layer above the last one that reaches ``tau`` might have reached it too.

    Examples
    --------
    >>> evd_threshold(np.array([[0.0, 0.0], [np.nan, np.nan], [0.5, np.nan]]), [4, 8], tau=0.01).tolist()
    [-1.0, nan, nan]
    """
    d, lay = _as_matrix(delta, layers)
    hit = d >= tau  # NaN compares False
    n = lay.size
    last = np.where(hit.any(axis=1), n - 1 - np.argmax(hit[:, ::-1], axis=1), -1)
    above = np.arange(n)[None, :] > last[:, None]
    unknown = (np.isnan(d) & above).any(axis=1)
    return np.where(unknown, np.nan, np.where(last >= 0, lay[np.maximum(last, 0)], -1.0))


def evd_area(delta: np.ndarray) -> np.ndarray:
    """Area form of EVD: ``sum_l max(D(l), 0) / (L * max_l D(l))``, in [0, 1] per sample.

    0 when no delta is positive, NaN when a sample has no finite delta.  ``L`` and the sum run
    over the sample's finite layers: a failed measurement is left out, not counted as 0.

    Examples
    --------
    >>> evd_area(np.array([[1.0, 1.0, 0.0, -1.0], [1.0, np.nan, 0.0, 1.0]])).tolist()
    [0.5, 0.6666666666666666]
    """
    d = np.atleast_2d(np.asarray(delta, dtype=np.float64))
    pos = np.clip(np.nan_to_num(d, nan=0.0), 0.0, None)
    top = pos.max(axis=1)
    measured = np.isfinite(d).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        area = np.where(top > 0, pos.sum(axis=1) / (measured * top), 0.0)
    return np.where(measured > 0, area, np.nan)


def adaptive_tau(delta: np.ndarray, ratio: float) -> float:
    """Adaptive threshold ``ratio * mean D(first layer)`` over a pilot set of samples.

    Examples
    --------
    >>> adaptive_tau(np.array([[2.0, 1.0], [4.0, 0.0]]), 0.1)
    0.30000000000000004
    """
    first = np.atleast_2d(np.asarray(delta, dtype=np.float64))[:, 0]
    first = first[np.isfinite(first)]
    if first.size == 0:
        return float("nan")
    return float(ratio * first.mean())


def mean_curve(delta: np.ndarray) -> np.ndarray:
    """Mean delta per layer over the samples with a finite value there."""
    d = np.atleast_2d(np.asarray(delta, dtype=np.float64))
    counts = np.isfinite(d).sum(axis=0)
    sums = np.nansum(d, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def cliff_boundary(delta: np.ndarray, layers: Sequence[int], method: CliffMethod, tau: float,
                   evd: np.ndarray | None = None) -> float:
    """The population cliff layer by one of three methods.

    All three name the same kind of layer, the *last* layer whose visual states still matter
    (EVD's convention), so CP1 (truncating at the cliff) and CP3 (pre = layers <= cliff) mean
    the same thing whichever method is configured:

    - ``median_evd``: the median of the samples' EVD, an EVD that occurred (the lower median;
      the upper one when the lower is -1 but only half the samples never reach tau, so -1,
      "no cliff", needs a majority).
    - ``gradient``: the layer after which the mean delta curve drops the most per layer, i.e.
      ``l_i`` for the steepest ``(m(l_{i+1}) - m(l_i)) / (l_{i+1} - l_i)``; NaN when the curve
      never drops.
    - ``threshold_crossing``: the captured layer just before the first layer where the mean
      delta falls below ``tau`` after being at or above it (RESEARCH.md's "first layer where
      mean D < tau" is the next captured layer); NaN when it never crosses from above.

    NaN when the method has nothing to go on (no samples, one layer, no drop, no crossing).

    Examples
    --------
    >>> d = np.array([[3.0, 3.0, 0.5, 0.2, 0.0]])
    >>> cliff_boundary(d, [0, 1, 2, 3, 4], "gradient", tau=0.3)
    1.0
    >>> cliff_boundary(d, [0, 1, 2, 3, 4], "threshold_crossing", tau=0.3)
    2.0
    >>> cliff_boundary(d, [0, 1, 2, 3, 4], "median_evd", tau=0.3, evd=np.array([-1, -1, 2, 3]))
    2.0
    """
    d, lay = _as_matrix(delta, layers)
    if method == "median_evd":
        values = evd_threshold(d, lay, tau) if evd is None else np.asarray(evd, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            return float("nan")
        median = float(np.quantile(values, 0.5, method="lower"))
        if median < 0 and (values < 0).mean() <= 0.5:  # a tie between "no cliff" and a layer
            median = float(np.quantile(values, 0.5, method="higher"))
        return median
    curve = mean_curve(d)
    if method == "gradient":
        slope = np.diff(curve) / np.diff(lay)
        if slope.size == 0 or not (slope < 0).any():  # NaN compares False
            return float("nan")
        return float(lay[int(np.nanargmin(slope))])
    if method == "threshold_crossing":
        above = np.flatnonzero(curve >= tau)
        below = np.flatnonzero(curve < tau)
        below = below[below > above[0]] if above.size else below[:0]
        return float(lay[below[0] - 1]) if below.size else float("nan")
    raise ValueError(f"unknown cliff method {method!r}; choose from {', '.join(CLIFF_METHODS)}")


def transfer_window(curve: np.ndarray, layers: Sequence[int], *, early_layers: int = 1,
                    upper: float = 0.9, lower: float = 0.1) -> tuple[float, float]:
    """The window over which the mean visual contribution fades: ``(start, end)`` layers.

    The early level is the mean of the curve over its first ``early_layers`` layers; ``start`` is
    the first later layer below ``upper`` x that level, ``end`` the first below ``lower`` x it.
    NaN for a bound that is never crossed (or a non-positive early level).

    Examples
    --------
    >>> transfer_window(np.array([1.0, 0.95, 0.8, 0.4, 0.05]), [0, 1, 2, 3, 4])
    (2.0, 4.0)
    """
    c, lay = _as_matrix(curve, layers)
    c = c[0]
    level = np.nanmean(c[:early_layers]) if c.size else np.nan
    if not np.isfinite(level) or level <= 0:
        return float("nan"), float("nan")

    def first_below(fraction: float) -> float:
        hits = np.flatnonzero(c[early_layers:] < fraction * level)
        return float(lay[early_layers + hits[0]]) if hits.size else float("nan")

    return first_below(upper), first_below(lower)


def transfer_point(delta_visual: np.ndarray, delta_text: np.ndarray,
                   layers: Sequence[int]) -> np.ndarray | float:
    """First layer where ``|D_visual|`` falls below ``|D_text|`` (dual-channel tracing).

    1-D inputs (mean curves) give a float; 2-D inputs (samples x layers) give one value per
    sample.  Falling needs visual at or above text at some earlier layer: text ahead from the
    first layer on is no transfer.  NaN where visual never falls below text.

    Examples
    --------
    >>> transfer_point(np.array([3.0, 2.0, 0.5]), np.array([1.0, 1.0, 1.0]), [0, 4, 8])
    8.0
    >>> transfer_point(np.array([1.0, 3.0, 0.5]), np.array([2.0, 1.0, 1.0]), [0, 4, 8])
    8.0
    """
    v, lay = _as_matrix(delta_visual, layers)
    t, _ = _as_matrix(delta_text, layers)
    ahead = np.maximum.accumulate(np.abs(v) >= np.abs(t), axis=1)  # NaN compares False
    falls = np.abs(v) < np.abs(t)
    falls[:, 1:] &= ahead[:, :-1]
    falls[:, 0] = False
    point = np.where(falls.any(axis=1), lay[np.argmax(falls, axis=1)], np.nan)
    return float(point[0]) if np.ndim(delta_visual) == 1 else point

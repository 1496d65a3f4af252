"""Relabel hard / easy from a run's truncation results: the samples that need late vision are hard.

Keyword labels (assigned at capture time) guess difficulty from the question. A run measures it:
a sample answered correctly on the clean input whose correctness is lost when the visual tokens
are truncated after layer L (for many of the truncation settings) needed visual information late,
so it is hard; one that stays correct under most truncations is easy. Samples wrong on the clean
input say nothing about truncation and keep a fallback label.

Examples
--------
>>> import numpy as np
>>> clean = np.array([1.0, 1.0, 0.0])
>>> trunc = np.array([[0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=float)
>>> relabel(clean, trunc).tolist()
['hard', 'easy', 'unsolved']
"""

from __future__ import annotations

import numpy as np


def relabel(clean: np.ndarray, truncated: np.ndarray, fallback: np.ndarray | None = None,
            threshold: float = 0.5, min_lost_fraction: float = 0.5) -> np.ndarray:
    """Subset labels from clean and truncated correctness scores.

    Parameters
    ----------
    clean : numpy.ndarray
        ``(n_samples,)`` score of the clean (untruncated) input, in [0, 1] (an evaluator's
        score or a 0/1 correctness); NaN where unknown.
    truncated : numpy.ndarray
        ``(n_samples, ...)`` scores under each truncation setting (e.g. ``trunc_layer`` x
        ``mode``); NaN where that setting was not run. Select the settings (layers, modes) to
        count before calling.
    fallback : numpy.ndarray of str, optional
        Labels for samples the run cannot judge (clean wrong, or no truncation result); default
        ``"unsolved"``.
    threshold : float
        A score ``>= threshold`` counts as correct.
    min_lost_fraction : float
        A clean-correct sample is hard when it is wrong in more than this fraction of its
        available truncation settings (after layer 0 only block 0 has read the image, so
        losing correctness there alone does not make a question hard).

    Returns
    -------
    numpy.ndarray
        ``(n_samples,)`` of ``"hard"``, ``"easy"`` or the fallback label.

    Examples
    --------
    >>> clean = np.array([1.0, 1.0, np.nan])
    >>> trunc = np.array([[0, 1, 1, 1], [0, 0, 0, np.nan], [1, 1, 1, 1]])
    >>> relabel(clean, trunc, fallback=np.array(["easy", "easy", "hard"])).tolist()
    ['easy', 'hard', 'hard']
    """
    clean = np.asarray(clean, dtype=np.float64)
    n = clean.shape[0]
    scores = np.asarray(truncated, dtype=np.float64).reshape(n, -1)
    available = ~np.isnan(scores)
    lost = (scores < threshold) & available
    n_available = available.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        lost_fraction = lost.sum(axis=1) / n_available
    judged = (clean >= threshold) & (n_available > 0)  # NaN compares False: unknown clean
    labels = np.array(["unsolved"] * n, dtype=object) if fallback is None \
        else np.asarray(fallback, dtype=object).copy()
    if labels.shape != (n,):
        raise ValueError(f"fallback has shape {labels.shape}, expected ({n},)")
    labels[judged] = np.where(lost_fraction[judged] > min_lost_fraction, "hard", "easy")
    return labels.astype(str)

"""Independent reference implementations of the geometry metrics (the textbook definitions).

Shared by the metric and pipeline tests: an SVD per matrix, the full cosine matrix and explicit
n x n Gram matrices, nothing from ``analyze``.
"""

from __future__ import annotations

import numpy as np


def ref_effective_rank(x: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values of the centred rows; NaN below two rows."""
    if len(x) < 2:
        return float("nan")
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    s = s[s > s.max() * 1e-10]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_icc(x: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    n = len(x)
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def ref_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) eq. 5 with explicit n x n Gram matrices."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    return ref_hsic(x, y) / np.sqrt(ref_hsic(x, x) * ref_hsic(y, y))


def ref_minibatch_cka(batches: list[list[np.ndarray]]) -> np.ndarray:
    """Nguyen et al. (2021): HSIC summed over minibatches, then normalised.

    ``batches[i][layer]`` is minibatch i's rows at that layer (the same rows at every layer).
    """
    n_layers = len(batches[0])
    h = np.array([[sum(ref_hsic(b[a], b[c]) for b in batches) for c in range(n_layers)]
                  for a in range(n_layers)])
    return h / np.sqrt(np.outer(np.diag(h), np.diag(h)))

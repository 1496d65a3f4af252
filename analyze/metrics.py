"""Geometry metrics as pure array functions: effective rank, ICC, debiased linear CKA, massive tokens.

Every function takes plain numpy arrays (rows = tokens or samples, columns = hidden features) and
is exact: the fast forms here are algebraic rewrites of the textbook definitions, which the tests
check against direct SVD / O(N^2) / Gram-matrix implementations.

- Effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum(s)``, ``s`` the
  singular values of the *centred* token matrix.  Per sample it comes from the eigenvalues of the
  small N x N centred Gram matrix; pooled over samples from streamed covariance moments
  (:class:`Moments`, merged with Chan et al.'s parallel update so nothing is read twice).
- ICC: mean pairwise cosine of a set of tokens, ``(|sum u_i|^2 - N) / (N (N - 1))`` for unit rows.
- Debiased linear CKA (Song et al. 2012 unbiased HSIC; Nguyen et al. 2021), evaluated through
  feature-space products so the n x n Gram matrix is never formed when n exceeds the width.
- Massive activations (Sun et al. 2024): tokens whose norm exceeds ``k`` times the median norm of
  their sample's tokens at that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Moments", "cka_matrix", "debiased_cka", "debiased_hsic", "effective_rank",
    "effective_rank_from_gram", "effective_rank_from_spectrum", "hsic_matrix", "icc", "icc_shifted",
    "massive_mask", "minibatch_cka",
    "ROW_BUFFER_BYTES", "RowAccumulator",
]

ROW_BUFFER_BYTES = 16 << 20  # float64 rows a RowAccumulator gathers before each syrk


def effective_rank_from_spectrum(singular_values: np.ndarray) -> float:
    """Effective rank ``exp(H(p))`` of a set of singular values.

    Values at or below ``max(s) * sqrt(100 * len * eps)`` count as zero: that is the round-off of
    a spectrum obtained as square roots of eigenvalues, so an exactly low-rank matrix gets its
    exact rank (values this small change a real effective rank by far less than its precision).

    Parameters
    ----------
    singular_values : array of shape (k,)
        Non-negative singular values (any order).

    Returns
    -------
    float
        ``exp(-sum p log p)``; NaN when every value is zero (no spread at all).

    Examples
    --------
    >>> round(effective_rank_from_spectrum(np.array([1.0, 1.0, 1.0, 0.0])), 12)
    3.0
    """
    s = np.asarray(singular_values, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)):
        return float("nan")
    top = s.max()
    if top <= 0:
        return float("nan")
    s = s[s > top * np.sqrt(100 * s.size * np.finfo(np.float64).eps)]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _spectrum_from_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    # Round-off can make the smallest eigenvalues of a PSD matrix slightly negative.
    return np.sqrt(np.clip(eigenvalues, 0.0, None))


def effective_rank_from_gram(gram: np.ndarray) -> float:
    """Effective rank of a token matrix from its Gram matrix ``X X^T`` (rows centred or not).

    The Gram matrix is double-centred here (``H G H`` with ``H = I - 11^T/N``), which equals the
    Gram matrix of the column-centred rows, so any row subset of a Gram matrix gives the subset's
    effective rank without touching the features again.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    >>> round(effective_rank_from_gram(x @ x.T), 6) == round(effective_rank(x), 6)
    True
    """
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    if n < 2:
        return float("nan")
    row = g.mean(axis=1)
    centred = g - row[:, None] - row[None, :] + row.mean()
    eig = np.linalg.eigvalsh(centred)  # values only: LAPACK syevd without vectors
    return effective_rank_from_spectrum(_spectrum_from_eigenvalues(eig))


def effective_rank(x: np.ndarray) -> float:
    """Effective rank of the centred token matrix ``x`` (rows = tokens), via the smaller Gram side.

    Parameters
    ----------
    x : array of shape (N, d)

    Returns
    -------
    float
        Between 1 and ``min(N - 1, d)``; NaN for fewer than two rows or identical rows.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # two equal directions
    >>> round(effective_rank(x), 12)
    2.0
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        return float("nan")
    centred = x - x.mean(axis=0)
    if n <= d:
        return effective_rank_from_gram(centred @ centred.T)
    return Moments.from_rows(centred).effective_rank()


@dataclass
class Moments:
    """Streaming count, mean and scatter ``sum (x - mean)(x - mean)^T`` of a set of rows.

    Only the upper triangle of ``scatter`` is kept up to date (what BLAS ``syrk`` writes and
    LAPACK reads for a symmetric matrix); :meth:`full_scatter` returns the symmetric matrix.

    Two sets merge exactly (Chan, Golub & LeVeque 1979), so chunks read once, in any order and on
    any worker, add up to the moments of all rows; the pooled effective rank is then the effective
    rank of the scatter's eigenvalue square roots (the singular values of the centred rows).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = rng.standard_normal((50, 4))
    >>> m = Moments.from_rows(x[:20])
    >>> m.merge(Moments.from_rows(x[20:]))
    >>> bool(np.allclose(m.full_scatter(), (x - x.mean(0)).T @ (x - x.mean(0))))
    True
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "Moments":
        """No rows yet; the d x d scatter is allocated by the first merge, not before."""
        return cls(0, np.zeros(dim), np.zeros((0, 0)))

    @classmethod
    def from_rows(cls, x: np.ndarray) -> "Moments":
        """Moments of the rows of ``x`` (see :class:`RowAccumulator` for the precision)."""
        acc = RowAccumulator(x.shape[1])
        acc.add(x)
        return acc.moments()

    def merge(self, other: "Moments") -> None:
        """Add ``other``'s rows to these moments, in place (``other`` is left as it was)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean = other.count, other.mean.copy()
            self.scatter = np.array(other.scatter, dtype=np.float64, order="F")
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        # In place: no d x d temporaries (each would be a 32 MB allocation at d = 2048).
        self.scatter += other.scatter
        self.scatter = _add_outer_upper(self.scatter, delta, self.count * other.count / total)
        self.mean += delta * (other.count / total)
        self.count = total

    def full_scatter(self) -> np.ndarray:
        """The symmetric scatter matrix (from the upper triangle)."""
        upper = np.triu(self.scatter)
        return upper + np.triu(upper, 1).T

    def effective_rank(self) -> float:
        """Effective rank of all rows seen so far (NaN below two rows)."""
        if self.count < 2:
            return float("nan")
        eig = np.linalg.eigvalsh(self.scatter, UPLO="U")
        return effective_rank_from_spectrum(_spectrum_from_eigenvalues(eig))


def _add_outer_upper(a: np.ndarray, v: np.ndarray, alpha: float) -> np.ndarray:
    """``a + alpha v v^T`` on the upper triangle (BLAS ``dsyr``): in place for a Fortran-ordered
    float64 ``a``, otherwise on a copy; use the returned array."""
    from scipy.linalg.blas import dsyr

    return dsyr(alpha, np.asarray(v, dtype=np.float64), a=a, overwrite_a=1)


class RowAccumulator:
    """Moments of rows added a group at a time (one sample's tokens), without concatenating them.

    Each group is centred on its own mean into a float64 buffer, followed by one row
    ``sqrt(n) (mean - shift)`` (``shift`` is the first group's mean): the outer products of a
    group's rows about ``shift`` sum to exactly those of its centred rows plus that row's.  When
    the buffer fills, its scatter is accumulated in place with one BLAS ``syrk`` over many groups'
    rows (faster than one product per sample: a sample has 40 question tokens), and
    :meth:`moments` converts to centred moments.  :meth:`add` hands back the group's centred rows
    in the buffer, so a caller that needs them (a Gram matrix) makes no copy of its own.

    float64 because the effective rank takes square roots of these eigenvalues: float32
    round-off (eps x the largest eigenvalue, whatever the shift) would turn zero or tiny
    eigenvalues into singular values of ~3e-4 x the largest and inflate the effective rank of
    any pool with fewer rows than features (by 0.1% on the analysis bench's two-sample pool).

    Examples
    --------
    >>> acc = RowAccumulator(2)
    >>> centred, mean = acc.add(np.array([[1.0, 0.0], [3.0, 0.0]]))
    >>> centred.tolist(), mean.tolist()
    ([[-1.0, 0.0], [1.0, 0.0]], [2.0, 0.0])
    >>> _ = acc.add(np.array([[2.0, 3.0]]))
    >>> m = acc.moments()
    >>> m.count, m.mean.tolist(), m.full_scatter().tolist()
    (3, [2.0, 1.0], [[2.0, 0.0], [0.0, 6.0]])
    """

    def __init__(self, dim: int, buffer_bytes: int = ROW_BUFFER_BYTES) -> None:
        self.dim = dim
        self.capacity = max(64, buffer_bytes // (8 * max(dim, 1)))
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(self.dim)  # sum of (row - shift)
        self.upper: np.ndarray | None = None
        self._buffer: np.ndarray | None = None
        self._used = 0

    def add(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add the rows of ``x`` (n, dim), float32 or float64, as one group.

        Returns the rows centred on their mean (float64, valid until the next ``add``) and the
        mean.
        """
        n = x.shape[0]
        mean = x.mean(axis=0, dtype=np.float64) if n else np.full(self.dim, np.nan)
        if n == 0:
            return np.zeros((0, self.dim)), mean
        if self.shift is None:
            self.shift = mean.copy()
        rows = self._rows(n + 1)
        np.subtract(x, mean, out=rows[:n])
        offset = mean - self.shift
        np.multiply(offset, np.sqrt(n), out=rows[n])
        self.count += n
        self.total += n * offset
        return rows[:n], mean

    def _rows(self, k: int) -> np.ndarray:
        """The next ``k`` free rows of the buffer, flushing or growing it first as needed."""
        if self._buffer is not None and self._used + k > self._buffer.shape[0]:
            self._flush()
            if self._buffer.shape[0] < max(k, self.capacity):  # a small pool that keeps growing
                self._buffer = np.empty((max(k, self.capacity), self.dim))
        if self._buffer is None:  # sized to what is known so far (small pools stay small)
            self._buffer = np.empty((max(k, min(self.capacity, 4 * k)), self.dim))
        rows = self._buffer[self._used:self._used + k]
        self._used += k
        return rows

    def _flush(self) -> None:
        from scipy.linalg.blas import dsyrk

        if not self._used or self._buffer is None:
            return
        y = self._buffer[:self._used]  # C-ordered rows
        # y.T of a C-ordered array is Fortran-ordered: BLAS reads it in place; C is updated in place.
        if self.upper is None:
            self.upper = dsyrk(1.0, y.T, trans=0)
        else:
            self.upper = dsyrk(1.0, y.T, beta=1.0, c=self.upper, trans=0, overwrite_c=1)
        self._used = 0

    def moments(self) -> "Moments":
        """The centred moments of every row added; this ends the accumulation (the d x d matrix
        is handed over without a copy and the accumulator starts again empty)."""
        self._flush()
        upper, count, total, shift = self.upper, self.count, self.total, self.shift
        self._reset()
        if count == 0 or upper is None or shift is None:
            return Moments.empty(self.dim)
        offset = total / count
        # Only the upper triangle matters (see Moments); no symmetric copy of a d x d matrix.
        return Moments(count, shift + offset, _add_outer_upper(upper, offset, -float(count)))


def icc(x: np.ndarray) -> float:
    """Inter-token cosine concentration: the mean cosine similarity over all pairs of rows.

    Computed in O(N d) as ``(|sum u_i|^2 - N) / (N (N - 1))`` with ``u_i`` the unit rows; rows of
    zero norm have no direction and are left out.

    Examples
    --------
    >>> icc(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))   # identical directions
    1.0
    >>> icc(np.eye(3))                                          # orthogonal tokens
    0.0
    """
    x = np.asarray(x, dtype=np.float64)
    return icc_shifted(x, np.zeros(x.shape[1]), np.sqrt(np.einsum("ij,ij->i", x, x)))


def icc_shifted(centred: np.ndarray, mean: np.ndarray, norms: np.ndarray) -> float:
    """:func:`icc` of the rows ``centred + mean`` whose norms are ``norms``, without forming them.

    ``sum u_i = sum w_i x_i = w^T centred + (sum w) mean`` with ``w_i = 1 / |x_i|``: one
    matrix-vector product over rows a caller has already centred (for a Gram matrix).  Rows
    whose norm is given as 0 are left out, so a subset is the same rows with the others' norms
    set to 0.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    >>> mean = x.mean(axis=0)
    >>> icc_shifted(x - mean, mean, np.linalg.norm(x, axis=1)) == icc(x)
    True
    >>> icc_shifted(x - mean, mean, np.array([1.0, 2.0, 0.0]))   # the first two rows only
    1.0
    """
    norms = np.asarray(norms, dtype=np.float64)
    keep = norms > 0
    n = int(keep.sum())
    if n < 2:
        return float("nan")
    weights = np.divide(1.0, norms, out=np.zeros_like(norms), where=keep)
    total = weights @ np.asarray(centred, dtype=np.float64) + weights.sum() * np.asarray(mean, np.float64)
    return float((total @ total - n) / (n * (n - 1)))


def massive_mask(norms: np.ndarray, k: float) -> np.ndarray:
    """Tokens whose norm exceeds ``k`` times the median norm of the given tokens.

    Parameters
    ----------
    norms : array of shape (N,)
        L2 norms of one sample's tokens at one layer (the median is taken over these).
    k : float
        Ratio to the median above which a token is "massive" (an attention sink, BOS, ...).

    Examples
    --------
    >>> massive_mask(np.array([1.0, 1.2, 0.9, 300.0]), k=100).tolist()
    [False, False, False, True]
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        return np.zeros(0, dtype=bool)
    return norms > k * np.median(norms)


def _centre(x: np.ndarray) -> np.ndarray:
    # The unbiased HSIC is invariant to a shift of the features; removing the mean first only
    # removes round-off (activations carry a large common offset).
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def _hsic(cross: float, ra: np.ndarray, rb: np.ndarray, ka1: np.ndarray, kb1: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC from feature-space pieces.

    With ``K~ = K - diag(K)`` (and ``L~`` alike), ``cross = <K, L>_F``, ``r = diag(K)``,
    ``K~ 1 = X (X^T 1) - r``::

        HSIC = [tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) (K~1)'(L~1)] / (n (n - 3))
    """
    return float(_hsic_from_terms(cross - ra @ rb, ka1.sum() * kb1.sum(), ka1 @ kb1, ra.shape[0]))


def _hsic_from_terms(trace: Any, sums: Any, k1_dot: Any, n: int) -> Any:
    """The HSIC formula above from ``tr(K~L~)``, ``(1'K~1)(1'L~1)`` and ``(K~1)'(L~1)`` (scalars,
    or arrays of them for many pairs at once)."""
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * k1_dot) / (n * (n - 3))


def _pieces(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.einsum("ij,ij->i", x, x)
    return r, x @ x.sum(axis=0) - r


def debiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC estimator with linear kernels, paired rows of ``x`` (n, p) and ``y`` (n, q).

    The cross term ``tr(K L) = ||X^T Y||_F^2`` is a p x q product, so the cost is O(n p q) and no
    n x n matrix exists.  Needs n >= 4.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((30, 3))
    >>> debiased_hsic(x, x) > 0
    True
    """
    x, y = _centre(x), _centre(y)
    n = x.shape[0]
    if n < 4 or y.shape[0] != n:
        raise ValueError(f"debiased HSIC needs n >= 4 paired rows, got {x.shape[0]} and {y.shape[0]}")
    ra, ka1 = _pieces(x)
    rb, kb1 = _pieces(y)
    cross = float(np.square(x.T @ y).sum())
    return _hsic(cross, ra, rb, ka1, kb1)


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA between paired rows ``x`` (n, p) and ``y`` (n, q).

    Invariant to orthogonal transforms and isotropic scaling of either side.  NaN when either
    side has no estimated variance (the denominator is not positive) or n < 4.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((40, 5))
    >>> round(debiased_cka(x, 3.0 * x), 12)
    1.0
    """
    return float(cka_matrix([np.asarray(x), np.asarray(y)])[0, 1])


def hsic_matrix(grams: np.ndarray) -> np.ndarray:
    """Unbiased HSIC between every pair of ``L`` Gram matrices of the same ``n >= 4`` rows.

    ``grams`` is ``(L, n, n)``, e.g. the linear Gram matrices of one sample's tokens at each
    layer; returns ``(L, L)``.  Summed over samples it gives the minibatch CKA of
    :func:`minibatch_cka` (each sample's tokens one minibatch).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.standard_normal((2, 9, 4))
    >>> h = hsic_matrix(np.stack([x @ x.T, y @ y.T]))
    >>> bool(np.isclose(h[0, 1], debiased_hsic(x, y)) and np.isclose(h[1, 1], debiased_hsic(y, y)))
    True
    """
    g = np.asarray(grams, dtype=np.float64)
    n_layers, n = g.shape[0], g.shape[1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 rows, got {n}")
    flat = g.reshape(n_layers, n * n)
    r = np.diagonal(g, axis1=1, axis2=2)          # (L, n)
    k1 = g.sum(axis=2) - r                         # row sums of K - diag(K)
    sums = k1.sum(axis=1)
    return _hsic_from_terms(flat @ flat.T - r @ r.T, np.outer(sums, sums), k1 @ k1.T, n)


def minibatch_cka(hsic_sum: np.ndarray) -> np.ndarray:
    """Minibatch CKA (Nguyen et al. 2021) from HSIC matrices summed over minibatches: ``(L, L)``.

    NaN where a diagonal term is not positive (no estimated variance).

    Examples
    --------
    >>> minibatch_cka(np.array([[4.0, 2.0], [2.0, 1.0]])).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    h = np.asarray(hsic_sum, dtype=np.float64)
    diag = np.diagonal(h)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.sqrt(np.outer(diag, diag))
        return np.where((diag[:, None] > 0) & (diag[None, :] > 0), h / scale, np.nan)


def cka_matrix(stack: Sequence[np.ndarray] | np.ndarray, *, max_bytes: int = 256 << 20) -> np.ndarray:
    """Debiased linear CKA between every pair of entries of ``stack``: an L x L map.

    ``stack`` is an array (L, n, d) or any sequence of L arrays (n, d_i) with paired rows (e.g. a
    lazy view of a memory-mapped file: each entry is read when used and centred in float64 only
    while it is used).  The cross terms ``<K_a, K_b>`` are evaluated whichever way costs fewer
    operations: through n x n Gram matrices (one per entry, kept in blocks of at most
    ``max_bytes``, recomputed per block) or through the feature-space products
    ``||X_a^T X_b||_F^2`` (no n x n matrix at all; chosen when n is large).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((20, 6))
    >>> m = cka_matrix(np.stack([x, 2 * x, rng.standard_normal((20, 6))]))
    >>> bool(np.isclose(m[0, 1], 1.0) and np.isclose(m[1, 0], 1.0))
    True
    """
    n_layers = len(stack)
    if n_layers == 0:
        return np.zeros((0, 0))
    pieces, widths = [], []
    for i in range(n_layers):
        xi = _centre(stack[i])
        if pieces and xi.shape[0] != len(pieces[0][0]):
            raise ValueError(f"CKA needs paired rows; entry {i} has {xi.shape[0]} rows, entry 0 "
                             f"{len(pieces[0][0])}")
        pieces.append(_pieces(xi))
        widths.append(xi.shape[1])
    n, d = len(pieces[0][0]), max(widths)
    out = np.full((n_layers, n_layers), np.nan)
    if n < 4:
        return out
    self_h = np.full(n_layers, np.nan)

    def fill(a: int, b: int, cross: float) -> None:
        ha, hb = self_h[a], self_h[b]
        if ha > 0 and hb > 0:
            value = _hsic(cross, pieces[a][0], pieces[b][0], pieces[a][1], pieces[b][1])
            out[a, b] = out[b, a] = value / np.sqrt(ha * hb)

    def self_term(a: int, cross: float) -> None:
        self_h[a] = _hsic(cross, pieces[a][0], pieces[a][0], pieces[a][1], pieces[a][1])

    block = max(1, int(max_bytes // (n * n * 8)))
    n_pairs = n_layers * (n_layers + 1) // 2
    sweeps = -(-n_layers // block)
    gram_cost = sweeps * n_layers * n * n * d + n_pairs * n * n
    if n_pairs * n * d * d < gram_cost:
        for a in range(n_layers):
            xa = _centre(stack[a])
            self_term(a, float(np.square(xa.T @ xa).sum()))
        for a in range(n_layers):
            xa = _centre(stack[a])
            for b in range(a, n_layers):
                fill(a, b, float(np.square(xa.T @ _centre(stack[b])).sum()))
        return out
    for start in range(0, n_layers, block):
        grams = {}
        for a in range(start, min(n_layers, start + block)):
            xa = _centre(stack[a])
            grams[a] = xa @ xa.T
        for b in range(start, n_layers):
            if b in grams:
                gb = grams[b]
            else:
                xb = _centre(stack[b])
                gb = xb @ xb.T
            if start == 0:  # the first sweep meets every layer once: its self term
                self_term(b, float(np.square(gb).sum()))
            for a, ga in grams.items():
                if a <= b:
                    fill(a, b, float((ga * gb).sum()))
    return out

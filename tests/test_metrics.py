"""Geometry metrics against closed forms and direct SVD / O(N^2) / Gram-matrix implementations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.metrics import (Moments, cka_matrix, debiased_cka, debiased_hsic, effective_rank,
                             effective_rank_from_gram, effective_rank_from_spectrum, icc,
                             icc_shifted, massive_mask)
from reference_metrics import ref_cka, ref_effective_rank, ref_hsic, ref_icc


def with_spectrum(rng: np.random.Generator, n: int, d: int, s: np.ndarray) -> np.ndarray:
    """A centred n x d matrix whose singular values are exactly ``s``."""
    k = len(s)
    a = rng.standard_normal((n, k))
    a -= a.mean(axis=0)  # columns orthogonal to 1: the matrix stays centred
    u, _ = np.linalg.qr(a)
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return u @ np.diag(s) @ v.T


# --- effective rank ---------------------------------------------------------------------------

def test_effective_rank_known_spectrum():
    rng = np.random.default_rng(0)
    s = np.array([5.0, 3.0, 1.0, 0.5])
    p = s / s.sum()
    expected = np.exp(-(p * np.log(p)).sum())
    for n, d in [(30, 10), (8, 40)]:  # both sides of the Gram / covariance switch
        x = with_spectrum(rng, n, d, s) + 7.0  # a common offset that centring must remove
        assert effective_rank(x) == pytest.approx(expected, rel=1e-9)


def test_effective_rank_flat_spectrum_is_rank_and_rank_one_is_one():
    rng = np.random.default_rng(1)
    assert effective_rank(with_spectrum(rng, 20, 50, np.ones(6))) == pytest.approx(6.0, rel=1e-9)
    assert effective_rank(with_spectrum(rng, 20, 50, np.array([4.0]))) == pytest.approx(1.0)
    assert np.isnan(effective_rank(np.ones((5, 3))))  # identical tokens: no spread at all
    assert np.isnan(effective_rank(np.ones((1, 3))))


@pytest.mark.parametrize("n,d", [(40, 16), (12, 64), (64, 64)])
def test_effective_rank_matches_svd(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) * rng.gamma(0.5, size=d) + rng.standard_normal(d) * 3
    assert effective_rank(x) == pytest.approx(ref_effective_rank(x), rel=1e-9)
    assert effective_rank(x.astype(np.float32)) == pytest.approx(ref_effective_rank(x), rel=1e-5)


def test_gram_subset_is_subset_effective_rank():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 50)) + 10.0
    keep = rng.random(30) > 0.3
    g = x @ x.T
    assert effective_rank_from_gram(g[np.ix_(keep, keep)]) == pytest.approx(ref_effective_rank(x[keep]))


def test_spectrum_edge_cases():
    assert effective_rank_from_spectrum(np.array([2.0, 2.0])) == pytest.approx(2.0)
    assert np.isnan(effective_rank_from_spectrum(np.zeros(3)))
    assert np.isnan(effective_rank_from_spectrum(np.array([1.0, np.nan])))


# --- streamed moments, pooled effective rank -----------------------------------------------------

def test_moments_merge_equals_direct_in_any_order():
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((m, 6)) + rng.standard_normal(6) for m in (5, 1, 17, 9)]
    x = np.concatenate(chunks)
    forward, backward = Moments.empty(6), Moments.empty(6)
    for c in chunks:
        forward.merge(Moments.from_rows(c))
    for c in chunks[::-1]:
        backward.merge(Moments.from_rows(c))
    centred = x - x.mean(0)
    for m in (forward, backward):
        assert m.count == len(x)
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.full_scatter(), centred.T @ centred, rtol=1e-10, atol=1e-10)
    assert forward.effective_rank() == pytest.approx(ref_effective_rank(x), rel=1e-9)


def test_pooled_effective_rank_is_svd_of_all_rows_float32_with_large_offset():
    # Activations carry a large common offset; fewer rows than features leave zero eigenvalues,
    # which round-off must not turn into spurious singular values.
    rng = np.random.default_rng(4)
    chunks = [(rng.standard_normal((5, 64)) * np.linspace(0.1, 2, 64) + 500.0).astype(np.float32)
              for _ in range(6)]
    m = Moments.empty(64)
    for c in chunks:
        m.merge(Moments.from_rows(c))
    x = np.concatenate(chunks).astype(np.float64)
    assert m.effective_rank() == pytest.approx(ref_effective_rank(x), rel=1e-4)


def test_row_accumulator_chunks_equal_direct_moments():
    from analyze.metrics import RowAccumulator

    rng = np.random.default_rng(8)
    chunks = [(rng.standard_normal((m, 5)) * [1, 2, 3, 4, 5] + 1000.0).astype(np.float32) for m in (7, 0, 30, 2)]
    acc = RowAccumulator(5)
    for c in chunks:
        acc.add(c)
    m = acc.moments()
    x = np.concatenate(chunks).astype(np.float64)
    centred = x - x.mean(0)
    assert m.count == 39
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-7)
    np.testing.assert_allclose(m.full_scatter(), centred.T @ centred, rtol=1e-9, atol=1e-6)
    assert RowAccumulator(5).moments().count == 0


def test_moments_below_two_rows():
    m = Moments.empty(3)
    assert np.isnan(m.effective_rank())
    m.merge(Moments.from_rows(np.ones((1, 3))))
    assert m.count == 1 and np.isnan(m.effective_rank())


# --- ICC --------------------------------------------------------------------------------------

def test_icc_closed_forms():
    assert icc(np.eye(5)) == pytest.approx(0.0)                      # orthogonal tokens
    assert icc(np.tile([[3.0, 4.0]], (6, 1))) == pytest.approx(1.0)   # identical tokens
    assert icc(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)  # antipodal
    # three unit vectors at 120 degrees: every pair has cosine -1/2
    angles = np.deg2rad([0, 120, 240])
    assert icc(np.stack([np.cos(angles), np.sin(angles)], 1)) == pytest.approx(-0.5)
    assert np.isnan(icc(np.ones((1, 4))))


def test_icc_matches_pairwise_cosines_and_ignores_zero_rows():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 11)) + 0.5
    assert icc(x) == pytest.approx(ref_icc(x), rel=1e-10)
    with_zero = np.vstack([x, np.zeros((2, 11))])
    assert icc(with_zero) == pytest.approx(ref_icc(x), rel=1e-10)



def test_icc_shifted_equals_pairwise_cosines_of_rows_and_subsets():
    # Rows with a large common offset, given as (centred rows, mean): the pipeline's form.
    rng = np.random.default_rng(15)
    x = rng.standard_normal((29, 13)) + 3.0
    mean = x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1)
    assert icc_shifted(x - mean, mean, norms) == pytest.approx(ref_icc(x), rel=1e-10)
    drop = np.zeros(29, bool)
    drop[[0, 7, 20]] = True  # a subset: the dropped rows' norms given as 0
    assert icc_shifted(x - mean, mean, np.where(drop, 0.0, norms)) == pytest.approx(ref_icc(x[~drop]), rel=1e-10)
    assert np.isnan(icc_shifted(x - mean, mean, np.where(np.arange(29) == 3, norms, 0.0)))

# --- massive activations -----------------------------------------------------------------------

def test_massive_mask_threshold_is_strict_and_relative_to_median():
    norms = np.array([1.0, 2.0, 3.0, 300.0, 200.0])   # median 3
    assert massive_mask(norms, 100).tolist() == [False, False, False, False, False]  # 300 == 100*3
    assert massive_mask(norms, 50).tolist() == [False, False, False, True, True]
    assert massive_mask(np.zeros(0), 10).shape == (0,)


# --- debiased HSIC / CKA -----------------------------------------------------------------------

@pytest.mark.parametrize("n,p,q", [(10, 3, 4), (25, 40, 7), (6, 2, 2)])
def test_hsic_matches_gram_matrix_formula(n, p, q):
    rng = np.random.default_rng(n * p * q)
    x = rng.standard_normal((n, p))
    y = x[:, :1] @ rng.standard_normal((1, q)) + rng.standard_normal((n, q))
    assert debiased_hsic(x, y) == pytest.approx(ref_hsic(x, y), rel=1e-9, abs=1e-12)
    assert debiased_cka(x, y) == pytest.approx(ref_cka(x, y), rel=1e-9)


def test_hsic_needs_four_rows():
    with pytest.raises(ValueError):
        debiased_hsic(np.ones((3, 2)), np.ones((3, 2)))
    assert np.isnan(debiased_cka(np.ones((3, 2)), np.ones((3, 2))))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0), shift=st.floats(-50, 50))
def test_cka_invariances(seed, scale, shift):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 5))
    y = x @ rng.standard_normal((5, 4)) + 0.5 * rng.standard_normal((16, 4))
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    base = debiased_cka(x, y)
    assert debiased_cka(x, scale * y @ q + shift) == pytest.approx(base, rel=1e-7, abs=1e-9)
    assert debiased_cka(y, x) == pytest.approx(base, rel=1e-10)
    assert debiased_cka(x, x) == pytest.approx(1.0)


def test_cka_independent_features_near_zero_and_identical_one():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3))
    assert abs(debiased_cka(x, y)) < 0.02  # debiased: no positive bias at n >> d
    assert debiased_cka(x, x @ np.diag([1.0, 1.0, 1.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("n,d,max_bytes", [(12, 30, 1 << 30), (12, 30, 2000), (40, 5, 1 << 30)])
def test_cka_matrix_matches_pairwise_reference(n, d, max_bytes):
    rng = np.random.default_rng(n + d)
    base = rng.standard_normal((n, d))
    stack = np.stack([base + 0.3 * i * rng.standard_normal((n, d)) for i in range(5)])
    m = cka_matrix(stack.astype(np.float32), max_bytes=max_bytes)
    for a in range(5):
        for b in range(5):
            assert m[a, b] == pytest.approx(ref_cka(stack[a], stack[b]), rel=1e-5)
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-9)


def test_cka_matrix_too_few_rows_is_nan():
    assert np.isnan(cka_matrix(np.ones((2, 3, 4)))).all()

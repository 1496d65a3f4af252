"""EVD, tau, cliff boundaries, transfer window/point, truncation correctness and stats, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from analyze.causal import (adaptive_tau, cliff_boundary, evd_area, evd_threshold, mean_curve,
                            transfer_point, transfer_window)
from analyze.stats import bootstrap_ci, bootstrap_mean_ci, correlate, subset_means
from analyze.truncation import correctness_from_logprob, correctness_from_text, parse_answers
from schemas.errors import GapError

LAYERS = [0, 4, 8, 12, 16]


def test_evd_threshold_is_last_layer_at_or_above_tau():
    d = np.array([
        [1.0, 0.5, 0.2, 0.01, 0.0],     # 0.01 >= tau exactly: EVD 12
        [1.0, 0.0, 0.5, 0.0, 0.0],      # non-monotone: the last crossing counts (8)
        [0.0, 0.0, 0.0, 0.0, 0.0],      # never: -1
        [np.nan] * 5,                   # not captured: NaN
        [np.nan, 0.3, 0.0, 0.0, 0.0],   # NaN below the last crossing: EVD still 4
        [1.0, 0.3, 0.0, np.nan, 0.0],   # NaN above it might have crossed: unknown
        [0.0, np.nan, 0.0, 0.0, 0.0],   # no crossing, but the NaN layer might: unknown
        [0.0, 0.0, 0.0, 0.0, 0.5],      # last layer crosses: 16
    ])
    out = evd_threshold(d, LAYERS, tau=0.01)
    assert out[:3].tolist() == [12.0, 8.0, -1.0]
    assert np.isnan(out[3]) and out[4] == 4.0
    assert np.isnan(out[5]) and np.isnan(out[6]) and out[7] == 16.0


def test_evd_area_form():
    d = np.array([[2.0, 2.0, 1.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0, 0.0]])
    # (2 + 2 + 1) / (5 * 2) = 0.5; no positive delta: 0
    assert evd_area(d).tolist() == [0.5, 0.0]
    assert np.isnan(evd_area(np.full((1, 3), np.nan))[0])
    # a failed layer is left out of L: (2 + 1) / (4 * 2), not (2 + 1) / (5 * 2)
    assert evd_area(np.array([[2.0, np.nan, 1.0, 0.0, -1.0]]))[0] == pytest.approx(3 / 8)


def test_adaptive_tau_uses_first_layer_mean():
    d = np.array([[2.0, 9.0], [4.0, 9.0], [np.nan, 9.0]])
    assert adaptive_tau(d, 0.1) == pytest.approx(0.3)
    assert np.isnan(adaptive_tau(np.full((2, 2), np.nan), 0.1))


def test_cliff_three_methods_on_a_planted_curve():
    # mean curve 3, 3, 0.5, 0.2, 0: steepest drop between layers 4 and 8 -> 4
    d = np.array([[3.0, 3.0, 0.5, 0.2, 0.0]] * 3)
    assert cliff_boundary(d, LAYERS, "gradient", tau=0.3) == 4.0
    # the first layer below tau is 12 (0.2 < 0.3); the cliff is the last one above it, like EVD's
    assert cliff_boundary(d, LAYERS, "threshold_crossing", tau=0.3) == 8.0
    assert cliff_boundary(d, LAYERS, "median_evd", tau=0.3) == 8.0            # 0.5 >= 0.3 at 8
    with pytest.raises(ValueError, match="unknown cliff method"):
        cliff_boundary(d, LAYERS, "nope", tau=0.3)


def test_cliff_gradient_divides_by_layer_spacing():
    # drops of 1.0 over 1 layer (0 -> 1) vs 1.5 over 4 layers (1 -> 5): per layer the first wins
    d = np.array([[3.0, 2.0, 0.5]])
    assert cliff_boundary(d, [0, 1, 5], "gradient", tau=0.0) == 0.0


def test_no_drop_or_no_crossing_from_above_is_no_cliff():
    rising = np.array([[0.0, 1.0, 2.5, 3.0]])
    assert np.isnan(cliff_boundary(rising, [0, 1, 2, 3], "gradient", tau=0.5))
    assert np.isnan(cliff_boundary(np.ones((1, 4)), [0, 1, 2, 3], "gradient", tau=0.5))  # flat
    # below tau from the start: nothing crossed; one rise above tau, then the crossing counts
    assert np.isnan(cliff_boundary(np.zeros((1, 4)), [0, 1, 2, 3], "threshold_crossing", tau=0.5))
    d = np.array([[0.1, 0.9, 0.2, 0.0]])
    assert cliff_boundary(d, [0, 1, 2, 3], "threshold_crossing", tau=0.5) == 1.0


def test_median_evd_is_an_observed_value_and_skips_nan():
    evd = np.array([2.0, 8.0, np.nan, 4.0, 12.0])
    assert cliff_boundary(np.zeros((5, 5)), LAYERS, "median_evd", tau=1, evd=evd) == 4.0  # lower median
    assert np.isnan(cliff_boundary(np.zeros((1, 5)), LAYERS, "median_evd", tau=1, evd=np.array([np.nan])))
    assert np.isnan(cliff_boundary(np.ones((2, 5)), LAYERS, "threshold_crossing", tau=0.5))


def test_median_evd_no_cliff_needs_a_majority():
    # -1 (never reaches tau) for exactly half the samples is a tie: the upper median, a layer
    assert cliff_boundary(np.zeros((4, 5)), LAYERS, "median_evd", tau=1,
                          evd=np.array([-1.0, -1.0, 8.0, 4.0])) == 4.0
    assert cliff_boundary(np.zeros((5, 5)), LAYERS, "median_evd", tau=1,
                          evd=np.array([-1.0, -1.0, -1.0, 8.0, 4.0])) == -1.0
    # without -1 an even count keeps the lower median
    assert cliff_boundary(np.zeros((4, 5)), LAYERS, "median_evd", tau=1,
                          evd=np.array([0.0, 12.0, 8.0, 4.0])) == 4.0


def test_every_cliff_method_names_the_last_layer_that_matters():
    # a clean step: visual matters up to layer 8 and not from 12 on, in every sample
    d = np.array([[2.0, 2.0, 2.0, 0.0, 0.0]] * 3)
    for method in ("median_evd", "gradient", "threshold_crossing"):
        assert cliff_boundary(d, LAYERS, method, tau=0.5) == 8.0, method


def test_mean_curve_ignores_missing_samples():
    d = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    out = mean_curve(d)
    assert out[0] == 2.0 and np.isnan(out[1])


def test_transfer_window():
    curve = np.array([2.0, 2.0, 1.7, 1.0, 0.1, 0.0])
    # early level 2: below 1.8 first at index 2, below 0.2 first at index 4
    assert transfer_window(curve, [0, 1, 2, 3, 4, 5]) == (2.0, 4.0)
    assert transfer_window(curve, [0, 1, 2, 3, 4, 5], early_layers=2) == (2.0, 4.0)
    start, end = transfer_window(np.array([1.0, 0.95, 0.92]), [0, 1, 2])
    assert np.isnan(start) and np.isnan(end)
    assert np.isnan(transfer_window(np.array([-1.0, -2.0]), [0, 1])[0])


def test_transfer_point_curves_and_samples():
    v = np.array([[3.0, 2.0, 0.5, 0.1], [3.0, 3.0, 3.0, 3.0]])
    t = np.array([[1.0, -2.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # |2| < |-2.5| at layer 1 for the first sample; never for the second
    out = transfer_point(v, t, [0, 1, 2, 3])
    assert out[0] == 1.0 and np.isnan(out[1])
    assert transfer_point(v[0], t[0], [0, 1, 2, 3]) == 1.0


def test_transfer_point_needs_visual_ahead_first():
    # text ahead at the first layer is no fall; visual overtakes at 1 and falls below at 5
    v = np.array([[1.0, 3.0, 3.0, 3.0, 3.0, 0.2, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    t = np.array([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]] * 2)
    out = transfer_point(v, t, list(range(7)))
    assert out[0] == 5.0 and np.isnan(out[1])  # the second sample: text ahead throughout


def test_correctness_from_logprob_threshold_half():
    lp = np.array([np.log(0.51), np.log(0.5), np.log(0.49), np.nan])
    out = correctness_from_logprob(lp)
    assert out[:3].tolist() == [1.0, 0.0, 0.0] and np.isnan(out[3])


def test_correctness_from_text_uses_the_dataset_evaluator():
    from analyze.evaluators import evaluate

    texts = np.array([["10.4", ""], ["12", None]], dtype=object)
    answers = [["10"], ["10"]]
    out = correctness_from_text(texts, answers, lambda p, g: evaluate("chartqa", p, g))
    # an empty answer is a wrong one (it counts in accuracy); only a missing value is NaN
    assert out[0].tolist() == [1.0, 0.0] and out[1, 0] == 0.0 and np.isnan(out[1, 1])


def test_parse_answers_errors_name_the_sample():
    assert parse_answers("") == []
    with pytest.raises(GapError, match="sample s7"):
        parse_answers("{not json", "s7")
    with pytest.raises(GapError, match="sample s8"):
        parse_answers('{"a": 1}', "s8")


def test_bootstrap_mean_ci_brackets_the_mean_and_handles_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=(400, 2))
    x[:, 1] = np.nan
    lo, hi = bootstrap_mean_ci(x, n_boot=300, seed=1)
    se = 1 / np.sqrt(400)
    assert lo[0] < x[:, 0].mean() < hi[0]
    assert hi[0] - lo[0] == pytest.approx(2 * 1.96 * se, rel=0.2)  # the normal-theory width
    assert np.isnan(lo[1]) and np.isnan(hi[1])
    assert bootstrap_ci(np.array([2.0, 2.0, np.nan])) == (2.0, 2.0)


def test_correlate_matches_scipy_and_handles_degenerate_input():
    from scipy import stats

    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    y[5] = np.nan
    c = correlate(x, y, n_boot=200)
    ok = np.isfinite(y)
    rho, p = stats.spearmanr(x[ok], y[ok])
    r, pr = stats.pearsonr(x[ok], y[ok])
    assert c.n == 59
    assert (c.spearman_rho, c.spearman_p, c.pearson_r, c.pearson_p) == pytest.approx((rho, p, r, pr))
    assert c.rho_ci[0] < rho < c.rho_ci[1]
    assert np.isnan(correlate(np.ones(10), np.arange(10.0)).spearman_rho)  # constant side
    assert correlate(np.arange(2.0), np.arange(2.0)).n == 2


def test_correlate_has_no_ci_when_resamples_are_mostly_constant():
    # 63 of 64 x equal: a resample misses the odd one out with probability (63/64)^64 ~ 0.37,
    # and rho is undefined there; the few varying resamples would give a narrow, biased CI
    x = np.ones(64)
    x[5] = 2.0
    c = correlate(x, np.arange(64.0), n_boot=400)
    assert np.isfinite(c.spearman_rho) and np.isnan(c.rho_ci).all()
    # two odd ones out of 64 per side... still about 13% constant: no CI; half and half: a CI
    x[6] = 2.0
    assert np.isnan(correlate(x, np.arange(64.0), n_boot=400).rho_ci).all()
    assert np.isfinite(correlate(np.arange(64.0) % 2, np.arange(64.0), n_boot=400).rho_ci).all()


def test_subset_means_counts_and_labels():
    v = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
    out = subset_means(v, ["hard", "easy", "hard", ""], n_boot=50)
    assert out["subset"] == ["easy", "hard", "all"]
    assert out["n"].tolist() == [[1, 2, 4], [1, 1, 3]]
    np.testing.assert_allclose(out["mean"][0], [0.0, 1.0, 0.625])
    np.testing.assert_allclose(out["mean"][1], [1.0, 1.0, 2 / 3])

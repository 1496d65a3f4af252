"""Checkpoint rules case by case on their thresholds, and decide() on hand-built analyses."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyze.decisions import (cp1_verdict, cp2_verdict, cp3_criteria, cp3_verdict, decide,
                               overall_verdict)
from schemas.config import AnalysisConfig

CFG = AnalysisConfig()


@pytest.mark.parametrize("hard,easy,expected", [
    (0.06, 0.005, "GO"),
    (0.0500001, 0.0099, "GO"),
    (0.05, 0.0, "MARGINAL"),       # hard drop must exceed 0.05 for GO
    (0.06, 0.01, "MARGINAL"),      # easy drop must stay below 0.01
    (0.06, float("nan"), "MARGINAL"),  # no easy subset: cannot be GO
    (0.031, 0.5, "MARGINAL"),
    (0.03, 0.0, "NO-GO"),          # marginal needs > 0.03
    (-0.2, 0.0, "NO-GO"),
    (float("nan"), 0.0, "N/A"),
])
def test_cp1_thresholds(hard, easy, expected):
    assert cp1_verdict(hard, easy, CFG) == expected


def test_cp1_thresholds_come_from_config():
    cfg = AnalysisConfig(cp1_hard_drop_go=0.2, cp1_easy_drop_max=0.1, cp1_hard_drop_marginal=0.1)
    assert cp1_verdict(0.15, 0.0, cfg) == "MARGINAL"
    assert cp1_verdict(0.25, 0.05, cfg) == "GO"


@pytest.mark.parametrize("rho,p,expected", [
    (0.2, 0.049, "GO"), (0.2, 0.05, "NO-GO"), (0.0, 0.001, "NO-GO"), (-0.5, 0.001, "NO-GO"),
    (1e-6, 0.01, "GO"), (float("nan"), 0.01, "N/A"),
])
def test_cp2_thresholds(rho, p, expected):
    assert cp2_verdict(rho, p, CFG) == expected


def test_cp3_criteria_each_on_its_threshold():
    base = dict(visual_er_ratio=0.69, text_er_ratio=0.86, visual_icc_increase=0.051, cka_increase=0.051)
    assert all(cp3_criteria(cfg=CFG, **base).values())
    edges = dict(visual_er_ratio=0.7, text_er_ratio=0.85, visual_icc_increase=0.05, cka_increase=0.05)
    for key, value in edges.items():  # each exactly on its threshold fails only itself
        crit = cp3_criteria(cfg=CFG, **{**base, key: value})
        assert crit == {k: k != key for k in base}
    assert not cp3_criteria(float("nan"), 0.9, 0.1, 0.1, CFG)["visual_er_ratio"]


@pytest.mark.parametrize("met,expected", [(4, "GO"), (3, "GO"), (2, "MARGINAL"), (1, "NO-GO"), (0, "NO-GO")])
def test_cp3_count(met, expected):
    assert cp3_verdict({str(i): i < met for i in range(4)}) == expected


@pytest.mark.parametrize("cps,expected,reading", [
    ((True, True, True), "FULL GO", "all supported"),
    ((True, True, False), "PARTIAL GO", "reframe"),
    ((True, False, True), "PARTIAL GO", "efficiency"),
    ((True, False, False), "PARTIAL GO", "efficiency"),
    ((False, True, True), "NO-GO", ""),
    ((False, False, False), "NO-GO", ""),
])
def test_overall(cps, expected, reading):
    out = overall_verdict(*cps)
    assert out["verdict"] == expected and reading in out["reading"]


# ------------------------------------------------------------------------------ decide()

def analysis(n_hard: int = 10, n_easy: int = 10, hard_fail: int = 1, easy_fail: int = 0,
             cliff: float = 2.0, visual_er=(100.0, 100.0, 100.0, 50.0, 50.0),
             text_er=(10.0, 10.0, 10.0, 9.0, 9.0), icc=(0.1, 0.1, 0.1, 0.2, 0.2),
             cka=(0.3, 0.3, 0.3, 0.4, 0.4)) -> xr.Dataset:
    """Five layers, truncation at every layer, correctness lost at the cliff by ``*_fail`` samples."""
    n = n_hard + n_easy
    subsets = np.array(["hard"] * n_hard + ["easy"] * n_easy, dtype=object)
    correct = np.ones((n, 6, 1))
    correct[:hard_fail, 1 + int(cliff), 0] = 0.0
    correct[n_hard:n_hard + easy_fail, 1 + int(cliff), 0] = 0.0
    layers = np.arange(5)
    evd = np.arange(n, dtype=float) % 5
    er = np.stack([visual_er, text_er], axis=1)
    icc_s = np.broadcast_to(np.stack([icc, icc], axis=1), (n, 5, 2)).copy()
    ds = xr.Dataset({
        "sample_subset": ("sample", subsets),
        "trunc_correct": (("sample", "trunc_layer", "mode"), correct),
        "evd": ("sample", evd),
        "logp_clean": ("sample", evd * 0.5 + np.sin(np.arange(n))),
        "cliff_layer": ((), cliff),
        "effective_rank": (("layer", "modality"), er),
        "effective_rank_nomassive": (("layer", "modality"), er),
        "icc": (("sample", "layer", "modality"), icc_s),
        "icc_nomassive": (("sample", "layer", "modality"), icc_s),
        "cka_modality": ("layer", np.array(cka)),
        "cka_modality_nomassive": ("layer", np.array(cka)),
    }, coords={"trunc_layer": [-1, 0, 1, 2, 3, 4], "mode": ["knockout"], "layer": layers,
               "modality": ["visual", "text"]})
    return ds


def test_decide_cp1_numbers_and_n():
    out = decide(analysis(hard_fail=1), AnalysisConfig(bootstrap=50))["cp1"]
    assert out["hard"]["drop"] == pytest.approx(0.1) and out["easy"]["drop"] == 0.0
    assert out["hard"]["n"] == 10 and out["n"] == 20
    assert out["verdict"] == "GO" and out["trunc_layer"] == 2 and out["mode"] == "knockout"
    assert decide(analysis(hard_fail=0), AnalysisConfig(bootstrap=50))["cp1"]["verdict"] == "NO-GO"
    # 1 of 25 hard samples fails: drop 0.04 -> MARGINAL
    assert decide(analysis(n_hard=25, hard_fail=1), AnalysisConfig(bootstrap=50))["cp1"]["verdict"] == "MARGINAL"
    assert decide(analysis(easy_fail=1), AnalysisConfig(bootstrap=50))["cp1"]["verdict"] == "MARGINAL"


def test_decide_cp1_uses_the_nearest_truncation_layer_and_na_without_cliff():
    ds = analysis(cliff=2.0).sel(trunc_layer=[-1, 0, 3, 4])
    assert decide(ds, AnalysisConfig(bootstrap=50))["cp1"]["trunc_layer"] == 3
    ds = analysis().assign(cliff_layer=((), np.nan))
    out = decide(ds, AnalysisConfig(bootstrap=50))
    assert out["cp1"]["verdict"] == "N/A" and out["cp3"]["verdict"] == "N/A"
    assert out["overall"]["verdict"] == "NO-GO"
    # median EVD -1 (tau never reached) is no cliff either, not a cliff at layer 0, where
    # truncation removes the image and every hard sample fails
    ds = analysis(hard_fail=10).assign(cliff_layer=((), -1.0))
    ds["trunc_correct"][:10, 1, 0] = 0.0
    out = decide(ds, AnalysisConfig(bootstrap=50))
    assert out["cp1"]["verdict"] == "N/A" and out["cp3"]["verdict"] == "N/A"
    assert "never reaches tau" in out["cp1"]["reason"] and out["cp1"]["n"] == 0


def test_decide_cp2_correlates_per_sample():
    from scipy import stats

    ds = analysis()
    out = decide(ds, AnalysisConfig(bootstrap=50))["cp2"]
    # baseline correctness is constant (all correct): judged on the score instead
    assert out["judged_on"] == "score"
    rho, p = stats.spearmanr(ds.evd.values, ds.logp_clean.values)
    assert out["rho"] == pytest.approx(rho) and out["p"] == pytest.approx(p)
    assert out["verdict"] == ("GO" if rho > 0 and p < 0.05 else "NO-GO")
    assert out["n"] == 20
    # correctness that varies with EVD is preferred
    ds2 = ds.copy(deep=True)
    ds2["trunc_correct"][:, 0, 0] = (ds2.evd.values >= 2).astype(float)
    out2 = decide(ds2, AnalysisConfig(bootstrap=50))["cp2"]
    assert out2["judged_on"] == "correctness" and out2["verdict"] == "GO"


def test_decide_cp3_windows_and_verdicts():
    # pre = layers 1, 2 (w = 2, <= cliff 2); post = layers 3, 4
    out = decide(analysis(), AnalysisConfig(bootstrap=50))["cp3"]
    assert out["pre_layers"] == [1, 2] and out["post_layers"] == [3, 4]
    nm = out["no_massive"]
    assert nm["visual_er_ratio"] == pytest.approx(0.5) and nm["text_er_ratio"] == pytest.approx(0.9)
    assert nm["visual_icc_increase"] == pytest.approx(0.1) and nm["cka_increase"] == pytest.approx(0.1)
    assert out["met"] == 4 and out["verdict"] == "GO"
    flat = decide(analysis(visual_er=(100.0,) * 5, cka=(0.3,) * 5), AnalysisConfig(bootstrap=50))["cp3"]
    assert flat["met"] == 2 and flat["verdict"] == "MARGINAL"
    wide = decide(analysis(), AnalysisConfig(bootstrap=50, cp3_window=3))["cp3"]
    assert wide["pre_layers"] == [0, 1, 2] and wide["post_layers"] == [3, 4]


def test_decide_overall_full_go():
    ds = analysis()
    ds["trunc_correct"][:, 0, 0] = 1.0
    ds["logp_clean"][:] = ds.evd.values  # perfect rank correlation
    out = decide(ds, AnalysisConfig(bootstrap=50))
    assert [out[k]["verdict"] for k in ("cp1", "cp2", "cp3")] == ["GO", "GO", "GO"]
    assert out["overall"]["verdict"] == "FULL GO" and out["overall"]["n"] == 20


def test_decide_cp1_is_judged_on_keyword_labels_not_relabelled_ones():
    # Relabelled "hard" = fails under truncation: judging those would pass CP1 by construction.
    # Here the keyword-hard and keyword-easy samples fail alike (2 of 10 each): not a GO.
    ds = analysis(hard_fail=2, easy_fail=2)
    relabelled = np.where(ds["trunc_correct"][:, 3, 0].values == 0, "hard", "easy").astype(object)
    ds["subset_relabelled"] = ("sample", relabelled)
    out = decide(ds, AnalysisConfig(bootstrap=50))["cp1"]
    assert out["hard"]["drop"] == pytest.approx(0.2) and out["easy"]["drop"] == pytest.approx(0.2)
    assert out["verdict"] == "MARGINAL" and out["labels"].startswith("keyword")
    shown = out["relabelled_not_judged"]
    assert (shown["hard"]["drop"], shown["hard"]["n"], shown["easy"]["drop"]) == (1.0, 4, 0.0)


def test_decide_cp1_prefers_knockout_then_drop_and_judges_zero_one_layer_earlier():
    # zero at L leaves block L + 1 reading the visual states: zero at cliff - 1 is the removal
    # knockout makes at the cliff (here failures at trunc_layer 1 under zero, 2 under drop)
    ds = analysis(hard_fail=3)
    zero = ds["trunc_correct"].copy(deep=True)
    zero[:, 3, 0], zero[:3, 2, 0] = 1.0, 0.0
    both = xr.concat([zero, ds["trunc_correct"]], dim="mode").assign_coords(mode=["zero", "drop"])
    out = decide(ds.drop_vars("trunc_correct").drop_dims("mode").assign(trunc_correct=both),
                 AnalysisConfig(bootstrap=50))["cp1"]
    assert (out["mode"], out["trunc_layer"], out["hard"]["drop"]) == ("drop", 2, pytest.approx(0.3))
    only_zero = ds.drop_vars("trunc_correct").drop_dims("mode").assign(
        trunc_correct=zero.assign_coords(mode=["zero"]))
    out = decide(only_zero, AnalysisConfig(bootstrap=50))["cp1"]
    assert (out["mode"], out["target_layer"], out["trunc_layer"]) == ("zero", 1.0, 1)
    assert out["hard"]["drop"] == pytest.approx(0.3) and out["verdict"] == "GO"


def test_decide_cp3_is_na_without_geometry_on_both_sides_of_the_cliff():
    out = decide(analysis(cliff=4.0), AnalysisConfig(bootstrap=50))["cp3"]
    assert out["verdict"] == "N/A" and "both sides of the cliff at layer 4" in out["reason"]


def test_decide_overall_n_counts_the_analysed_samples():
    ds = analysis()
    ds.attrs["n_ok"] = 17  # three samples failed at capture (their rows are NaN)
    assert decide(ds, AnalysisConfig(bootstrap=50))["overall"]["n"] == 17


def test_decide_cp2_is_na_when_evd_is_nearly_constant():
    # every sample's EVD the same but one (a model organism with one cliff for all): rho exists,
    # its bootstrap CI does not; no verdict either way
    ds = analysis()
    ds["evd"][:] = 1.0
    ds["evd"][3] = 2.0
    ds["logp_clean"][:] = 0.0
    out = decide(ds, AnalysisConfig(bootstrap=200))["cp2"]
    assert out["verdict"] == "N/A" and "do not vary enough" in out["reason"]


def test_decide_cp2_falls_back_to_the_score_when_correctness_barely_varies():
    # one wrong answer of 20: correctness has a rho but most resamples hold no wrong answer
    ds = analysis()
    ds["trunc_correct"][:, 0, 0] = 1.0
    ds["trunc_correct"][7, 0, 0] = 0.0
    ds["logp_clean"][:] = ds.evd.values + np.arange(20) * 1e-3
    out = decide(ds, AnalysisConfig(bootstrap=200))["cp2"]
    assert np.isfinite(out["correctness"]["spearman_rho"]) and out["judged_on"] == "score"
    assert out["verdict"] == "GO"


def test_overall_reading_says_when_cp1_could_not_be_judged():
    out = decide(analysis(n_hard=0, n_easy=20), AnalysisConfig(bootstrap=50))
    assert out["cp1"]["verdict"] == "N/A" and out["cp1"]["reason"].startswith("no hard samples")
    assert out["overall"]["verdict"] == "NO-GO"
    assert out["overall"]["reading"] == "CP1 could not be judged: no hard samples with truncation results (keyword labels)"

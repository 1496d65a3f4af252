"""Checkpoint decisions CP1-CP3 and the overall Phase-2 verdict (RESEARCH.md section 4).

The verdict rules are small pure functions of numbers and :class:`schemas.config.AnalysisConfig`
thresholds; :func:`decide` gathers the numbers from an analysis dataset (what
:func:`analyze.open_analysis` returns) and returns the content of ``decision.json``: for each
checkpoint its verdict, whether it passed (only ``GO`` passes), the numbers behind it and n.

Verdicts: ``GO``, ``MARGINAL``, ``NO-GO``, or ``N/A`` when the run lacks the data to judge
(e.g. no hard samples, no cliff).  ``N/A`` does not pass.

Examples
--------
>>> from schemas.config import AnalysisConfig
>>> cp1_verdict(0.08, 0.0, AnalysisConfig())
'GO'
>>> overall_verdict(True, False, True)["verdict"]
'PARTIAL GO'
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from schemas.config import AnalysisConfig

__all__ = ["NA", "cp1_verdict", "cp2_verdict", "cp3_criteria", "cp3_verdict", "decide",
           "overall_verdict"]

GO, MARGINAL, NOGO, NA = "GO", "MARGINAL", "NO-GO", "N/A"


def _finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def cp1_verdict(hard_drop: float, easy_drop: float, cfg: AnalysisConfig) -> str:
    """CP1, the cliff causes real failures: hard drop > go and easy drop < max -> GO; hard drop >
    marginal -> MARGINAL; else NO-GO.  N/A without a hard drop.

    >>> cfg = AnalysisConfig()
    >>> [cp1_verdict(h, e, cfg) for h, e in [(0.06, 0.02), (0.04, 0.0), (0.03, 0.0), (0.051, 0.009)]]
    ['MARGINAL', 'MARGINAL', 'NO-GO', 'GO']
    """
    if not _finite(hard_drop):
        return NA
    if hard_drop > cfg.cp1_hard_drop_go and _finite(easy_drop) and easy_drop < cfg.cp1_easy_drop_max:
        return GO
    if hard_drop > cfg.cp1_hard_drop_marginal:
        return MARGINAL
    return NOGO


def cp2_verdict(rho: float, p_value: float, cfg: AnalysisConfig) -> str:
    """CP2, EVD tracks performance: GO when Spearman rho > 0 and p < alpha.

    >>> cfg = AnalysisConfig()
    >>> cp2_verdict(0.3, 0.01, cfg), cp2_verdict(0.3, 0.05, cfg), cp2_verdict(-0.3, 0.001, cfg)
    ('GO', 'NO-GO', 'NO-GO')
    """
    if not _finite(rho, p_value):
        return NA
    return GO if rho > 0 and p_value < cfg.cp2_alpha else NOGO


def cp3_criteria(visual_er_ratio: float, text_er_ratio: float, visual_icc_increase: float,
                 cka_increase: float, cfg: AnalysisConfig) -> dict[str, bool]:
    """The four CP3 criteria (post vs pre cliff); a NaN number does not meet its criterion.

    >>> sorted(cp3_criteria(0.5, 0.9, 0.1, 0.0, AnalysisConfig()).items())
    [('cka_increase', False), ('text_er_ratio', True), ('visual_er_ratio', True), ('visual_icc_increase', True)]
    """
    return {
        "visual_er_ratio": _finite(visual_er_ratio) and visual_er_ratio < cfg.cp3_visual_er_ratio,
        "text_er_ratio": _finite(text_er_ratio) and text_er_ratio > cfg.cp3_text_er_ratio,
        "visual_icc_increase": _finite(visual_icc_increase) and visual_icc_increase > cfg.cp3_icc_increase,
        "cka_increase": _finite(cka_increase) and cka_increase > cfg.cp3_cka_increase,
    }


def cp3_verdict(criteria: dict[str, bool]) -> str:
    """>= 3 criteria met -> GO, 2 -> MARGINAL, else NO-GO.

    >>> cp3_verdict({"a": True, "b": True, "c": False, "d": False})
    'MARGINAL'
    """
    met = sum(bool(v) for v in criteria.values())
    return GO if met >= 3 else MARGINAL if met == 2 else NOGO


def overall_verdict(cp1: bool, cp2: bool, cp3: bool) -> dict[str, str]:
    """FULL GO (all three), PARTIAL GO (CP1 & CP2: geometry weak, reframe; CP1 only: EVD as an
    efficiency metric), else NO-GO.

    >>> overall_verdict(True, True, True)["verdict"], overall_verdict(False, True, True)["verdict"]
    ('FULL GO', 'NO-GO')
    """
    if cp1 and cp2 and cp3:
        return {"verdict": "FULL GO", "reading": "cliff, EVD and geometric collapse all supported"}
    if cp1 and cp2:
        return {"verdict": "PARTIAL GO", "reading": "geometry weak: reframe around causal depth"}
    if cp1:
        return {"verdict": "PARTIAL GO", "reading": "use EVD as an efficiency metric"}
    return {"verdict": "NO-GO", "reading": "the cliff does not cause measurable failures"}


# ------------------------------------------------------------------------------ gathering numbers

def _num(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


# CP1's truncation mode by preference, with the offset of its layer from the cliff: knockout is
# the clean removal and drop equals it; zero at L zeroes the outputs of blocks > L, so block L + 1
# still reads the visual states and zero at cliff - 1 removes what knockout at the cliff does.
CP1_MODES = {"knockout": 0, "drop": 0, "zero": -1}


def _mode(ds: Any) -> str | None:
    if "mode" not in ds.coords or ds.sizes.get("mode", 0) == 0:
        return None
    modes = [str(m) for m in ds["mode"].values]
    return next((m for m in CP1_MODES if m in modes), modes[0])


def _nearest_trunc_layer(ds: Any, cliff: float) -> int | None:
    layers = [int(v) for v in ds["trunc_layer"].values if int(v) >= 0]
    if not layers:
        return None
    return min(layers, key=lambda v: (abs(v - cliff), v))


def _no_cliff(cliff: float) -> str | None:
    """Why ``cliff`` is no cliff to judge at, or None when it is one."""
    if not _finite(cliff):
        return "no cliff layer"
    if cliff < 0:  # median EVD -1: most samples' visual delta never reaches tau
        return "no cliff: most samples' visual delta never reaches tau (cliff_layer -1)"
    return None


def _subset_drops(drop_per_sample: np.ndarray, labels: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    """Mean accuracy drop of the hard and the easy samples, with bootstrap CIs and n."""
    from analyze.stats import bootstrap_mean_ci

    subsets = np.asarray(labels).astype(str)
    out: dict[str, Any] = {}
    for name in ("hard", "easy"):
        drops = drop_per_sample[subsets == name]
        drops = drops[np.isfinite(drops)]
        lo, hi = bootstrap_mean_ci(drops[:, None], n_boot=cfg.bootstrap, seed=cfg.seed)
        out[name] = {"drop": _num(drops.mean()) if drops.size else None,
                     "ci95": [_num(lo[0]), _num(hi[0])], "n": int(drops.size)}
    return out


def _cp1(ds: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    cliff = float(ds["cliff_layer"]) if "cliff_layer" in ds else float("nan")
    if (why := _no_cliff(cliff)) is not None:
        return {"verdict": NA, "passed": False, "n": 0, "reason": why, "cliff_layer": _num(cliff)}
    mode = _mode(ds) if "trunc_correct" in ds else None
    target = cliff + CP1_MODES.get(mode, 0)
    layer = _nearest_trunc_layer(ds, target) if mode else None
    out: dict[str, Any] = {"cliff_layer": _num(cliff), "mode": mode, "target_layer": _num(target),
                           "trunc_layer": layer, "labels": "keyword (capture-time subset)",
                           "metric": "accuracy drop = baseline (trunc_layer -1) - accuracy at the cliff"}
    if layer is None or -1 not in [int(v) for v in ds["trunc_layer"].values]:
        return {"verdict": NA, "passed": False, "n": 0, "reason": "no truncation results", **out}
    correct = ds["trunc_correct"].sel(mode=mode)
    drop_per_sample = (correct.sel(trunc_layer=-1) - correct.sel(trunc_layer=layer)).values
    # Judged on the keyword labels: labels relabelled from these truncation results would make
    # hard mean "fails under truncation", so CP1 would pass by construction; they are shown only.
    out.update(_subset_drops(drop_per_sample, ds["sample_subset"].values, cfg))
    if "subset_relabelled" in ds:
        out["relabelled_not_judged"] = _subset_drops(drop_per_sample, ds["subset_relabelled"].values, cfg)
    hard = out["hard"]["drop"] if out["hard"]["drop"] is not None else float("nan")
    easy = out["easy"]["drop"] if out["easy"]["drop"] is not None else float("nan")
    verdict = cp1_verdict(hard, easy, cfg)
    if verdict == NA:
        out["reason"] = "no hard samples with truncation results (keyword labels)"
    out["thresholds"] = {"hard_drop_go": cfg.cp1_hard_drop_go, "easy_drop_max": cfg.cp1_easy_drop_max,
                         "hard_drop_marginal": cfg.cp1_hard_drop_marginal}
    return {"verdict": verdict, "passed": verdict == GO, "n": out["hard"]["n"] + out["easy"]["n"], **out}


def _cp2(ds: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    from analyze.stats import correlate

    evd = ds["evd"].values if "evd" in ds else np.full(ds.sizes.get("sample", 0), np.nan)
    targets: dict[str, np.ndarray] = {}
    mode = _mode(ds) if "trunc_correct" in ds else None
    if mode is not None and -1 in [int(v) for v in ds["trunc_layer"].values]:
        targets["correctness"] = ds["trunc_correct"].sel(mode=mode, trunc_layer=-1).values
    if "logp_clean" in ds:
        targets["score"] = ds["logp_clean"].values
    out: dict[str, Any] = {"thresholds": {"alpha": cfg.cp2_alpha}}
    for name, target in targets.items():
        out[name] = correlate(evd, target, n_boot=cfg.bootstrap, seed=cfg.seed).to_dict()
    # Judge on correctness when it varies enough for a bootstrap CI; the teacher-forced score
    # otherwise (a run that is nearly always right says little through its correctness).
    judged = next((k for k in ("correctness", "score")
                   if k in out and _finite(out[k]["spearman_rho"], *out[k]["rho_ci"])), None)
    if judged is None:
        return {"verdict": NA, "passed": False, "n": 0, "reason": "EVD, correctness and score do not vary "
                "enough (no rho with a bootstrap CI)", **out}
    rho, p = out[judged]["spearman_rho"], out[judged]["spearman_p"]
    verdict = cp2_verdict(rho, p, cfg)
    return {"verdict": verdict, "passed": verdict == GO, "judged_on": judged, "rho": rho, "p": p,
            "n": out[judged]["n"], **out}


def _window_means(values: Any, layers: np.ndarray, cliff: float, w: int) -> tuple[float, float]:
    pre = layers[layers <= cliff][-w:]
    post = layers[layers > cliff][:w]
    if pre.size == 0 or post.size == 0:
        return float("nan"), float("nan")
    return float(values.sel(layer=pre).mean()), float(values.sel(layer=post).mean())


def _cp3(ds: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    cliff = float(ds["cliff_layer"]) if "cliff_layer" in ds else float("nan")
    needed = ("effective_rank", "icc", "cka_modality")
    if (why := _no_cliff(cliff)) is not None:
        return {"verdict": NA, "passed": False, "n": 0, "reason": why, "cliff_layer": _num(cliff)}
    if any(name not in ds for name in needed):
        return {"verdict": NA, "passed": False, "n": 0, "reason": "no geometry"}
    layers = np.asarray(ds["effective_rank"]["layer"].values)
    w = cfg.cp3_window
    if not (layers <= cliff).any() or not (layers > cliff).any():
        return {"verdict": NA, "passed": False, "n": 0, "cliff_layer": cliff,
                "reason": f"no geometry layer on both sides of the cliff at layer {cliff:g} "
                          f"(geometry layers {int(layers.min())}-{int(layers.max())})" if layers.size
                          else "no geometry layers"}
    result: dict[str, Any] = {"cliff_layer": cliff, "window": w,
                              "pre_layers": [int(v) for v in layers[layers <= cliff][-w:]],
                              "post_layers": [int(v) for v in layers[layers > cliff][:w]],
                              "thresholds": {"visual_er_ratio": cfg.cp3_visual_er_ratio,
                                             "text_er_ratio": cfg.cp3_text_er_ratio,
                                             "icc_increase": cfg.cp3_icc_increase,
                                             "cka_increase": cfg.cp3_cka_increase}}
    # Judged without massive-activation tokens (they dominate ER and ICC); both are reported.
    for suffix in ("_nomassive", ""):
        er, icc_, cka = (ds[name + suffix] for name in needed)
        v_pre, v_post = _window_means(er.sel(modality="visual"), layers, cliff, w)
        t_pre, t_post = _window_means(er.sel(modality="text"), layers, cliff, w)
        i_pre, i_post = _window_means(icc_.sel(modality="visual").mean("sample"), layers, cliff, w)
        c_pre, c_post = _window_means(cka, layers, cliff, w)
        with np.errstate(invalid="ignore", divide="ignore"):
            numbers = {"visual_er_ratio": v_post / v_pre, "text_er_ratio": t_post / t_pre,
                       "visual_icc_increase": i_post - i_pre, "cka_increase": c_post - c_pre,
                       "visual_er_pre_post": [v_pre, v_post], "text_er_pre_post": [t_pre, t_post],
                       "visual_icc_pre_post": [i_pre, i_post], "cka_pre_post": [c_pre, c_post]}
        result["all_tokens" if suffix == "" else "no_massive"] = {
            k: (_num(v) if not isinstance(v, list) else [_num(x) for x in v]) for k, v in numbers.items()}
        if suffix:
            criteria = cp3_criteria(numbers["visual_er_ratio"], numbers["text_er_ratio"],
                                    numbers["visual_icc_increase"], numbers["cka_increase"], cfg)
    verdict = cp3_verdict(criteria)
    n = int(np.isfinite(ds["icc_nomassive"].sel(modality="visual")).any("layer").sum())
    return {"verdict": verdict, "passed": verdict == GO, "criteria": criteria,
            "met": int(sum(criteria.values())), "n": n, "judged_on": "no_massive", **result}


def decide(ds: Any, cfg: AnalysisConfig | None = None) -> dict[str, Any]:
    """The content of ``decision.json`` for an analysis dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        Analysis results (``cliff_layer``, ``evd``, ``trunc_correct``, ``subset``, geometry).
    cfg : thresholds; defaults to :class:`AnalysisConfig`'s.

    Returns
    -------
    dict with keys ``cp1``, ``cp2``, ``cp3``, ``overall``.
    """
    cfg = cfg or AnalysisConfig()
    cp1, cp2, cp3 = _cp1(ds, cfg), _cp2(ds, cfg), _cp3(ds, cfg)
    overall = overall_verdict(cp1["passed"], cp2["passed"], cp3["passed"])
    if cp1["verdict"] == NA:  # "no measurable failures" would claim what was not measured
        overall["reading"] = f"CP1 could not be judged: {cp1.get('reason', 'no data')}"
    overall["passed"] = {"cp1": cp1["passed"], "cp2": cp2["passed"], "cp3": cp3["passed"]}
    overall["n"] = int(ds.attrs.get("n_ok", ds.sizes.get("sample", 0)))  # the samples analysed
    return {"cp1": cp1, "cp2": cp2, "cp3": cp3, "overall": overall}

"""The analysis dataset: causal, truncation and geometry results under their CONTRACT names.

:func:`build` turns a run (the lazy dataset of :func:`store.open_run`) and the geometry pass's
result into one :class:`xarray.Dataset`; :func:`write` and :func:`read` store it as Zarr under
the output directory (``analysis.zarr``).  Samples whose status is not ``ok`` keep their row
with NaN values, so the dataset lines up with the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from analyze import causal as causal_
from analyze.stats import subset_means
from analyze.truncation import correctness_from_logprob, correctness_from_text, parse_answers
from schemas.config import AnalysisConfig
from schemas.errors import GapError

ANALYSIS_STORE = "analysis.zarr"
PRIMARY_METHODS = ("zero", "mean", "gaussian", "swap")

__all__ = ["ANALYSIS_STORE", "build", "dataset_name", "read", "write"]


def dataset_name(run: Any) -> str:
    """The run's ``data.name`` (which evaluator judges its texts), from the stored config."""
    import yaml

    text = run.attrs.get("config_yaml", "")
    cfg = yaml.safe_load(text) if text else None
    return str(((cfg or {}).get("data") or {}).get("name") or "synthetic")


def ok_mask(run: Any) -> np.ndarray:
    if "status" not in run:
        return np.ones(run.sizes.get("sample", 0), bool)
    return np.asarray(run["status"].values).astype(str) == "ok"


def _primary_method(methods: list[str]) -> str:
    return next((m for m in PRIMARY_METHODS if m in methods), methods[0])


Part = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # variables, coords, attrs


def causal_variables(run: Any, ok: np.ndarray, subsets: np.ndarray, cfg: AnalysisConfig) -> Part:
    """EVD, cliff, transfer window/point and mean causal curves by subset (with CIs)."""
    if "delta" not in run or run.sizes.get("method", 0) == 0:
        return {}, {}, {}
    delta = run["delta"].transpose("sample", "layer", "method", "channel")
    values = np.where(ok[:, None, None, None], delta.values.astype(np.float64), np.nan)
    captured = np.isfinite(values).any(axis=(0, 2, 3))
    values = values[:, captured]
    layers = np.asarray(run["layer"].values)[captured]
    methods = [str(m) for m in run["method"].values]
    channels = [str(c) for c in run["channel"].values]
    if layers.size == 0 or "visual" not in channels:
        return {}, {}, {}
    method = _primary_method(methods)
    vis = values[:, :, methods.index(method), channels.index("visual")]
    tau = cfg.tau if cfg.tau_ratio is None else causal_.adaptive_tau(vis[ok], cfg.tau_ratio)
    evd = causal_.evd_threshold(vis, layers, tau)
    out: dict[str, Any] = {
        "evd": (("sample",), evd),
        "evd_area": (("sample",), causal_.evd_area(vis)),
        "evd_by_method": (("sample", "method"), np.stack(
            [causal_.evd_threshold(values[:, :, i, channels.index("visual")], layers, tau)
             for i in range(len(methods))], axis=1)),
        "cliff_layer": ((), causal_.cliff_boundary(vis, layers, cfg.cliff_method, tau, evd=evd)),
        "cliff_by_method": (("cliff_method",), np.array(
            [causal_.cliff_boundary(vis, layers, m, tau, evd=evd) for m in causal_.CLIFF_METHODS])),
        "transfer_window": (("bound",), np.array(causal_.transfer_window(causal_.mean_curve(vis), layers))),
    }
    if "text" in channels:
        txt = values[:, :, :, channels.index("text")]
        out["transfer_point"] = (("method",), np.array(
            [causal_.transfer_point(causal_.mean_curve(values[:, :, i, channels.index("visual")]),
                                    causal_.mean_curve(txt[:, :, i]), layers) for i in range(len(methods))]))
        out["transfer_point_sample"] = (("sample",), causal_.transfer_point(
            vis, txt[:, :, methods.index(method)], layers))
    curves = subset_means(values, subsets, n_boot=cfg.bootstrap, seed=cfg.seed)
    dims = ("causal_layer", "method", "channel", "subset")
    for key, name in (("mean", "causal_curve"), ("lo", "causal_curve_lo"), ("hi", "causal_curve_hi"),
                      ("n", "causal_curve_n")):
        out[name] = (dims, curves[key])
    coords = {"causal_layer": layers, "method": methods, "channel": channels, "subset": curves["subset"],
              "cliff_method": list(causal_.CLIFF_METHODS), "bound": ["start", "end"]}
    source = "fixed" if cfg.tau_ratio is None else f"adaptive ({cfg.tau_ratio} x mean D(first layer))"
    attrs = {"tau": float(tau), "tau_source": source, "evd_method": method, "evd_channel": "visual",
             "cliff_method": cfg.cliff_method}
    return out, coords, attrs


def stored_subsets(run: Any, ok: np.ndarray) -> np.ndarray:
    """The capture-time subset labels ("" for samples that are not analysed)."""
    labels = np.asarray(run["subset"].values).astype(str) if "subset" in run else np.full(len(ok), "")
    return np.where(ok, labels, "")


def truncation_variables(run: Any, ok: np.ndarray, subsets: np.ndarray, cfg: AnalysisConfig,
                         relabel: bool = False) -> tuple[Part, np.ndarray]:
    """Per-sample correctness under truncation and accuracy curves per subset and mode.

    Returns the parts and the subset labels in use (relabelled from the truncation results when
    ``relabel`` and the run has the untruncated baseline).
    """
    if "trunc_logp" not in run or run.sizes.get("mode", 0) == 0:
        return ({}, {}, {}), subsets
    order = ("sample", "trunc_layer", "mode")
    # A run has trunc_text only when it generated answers; an empty answer is scored (wrong),
    # even when the model stopped at once on every sample.
    if "trunc_text" in run:
        from analyze.evaluators import evaluate

        texts = run["trunc_text"].transpose(*order).values
        name = dataset_name(run)
        ids = np.asarray(run["sample_id"].values).astype(str)
        answers = [parse_answers(str(a), ids[i]) for i, a in enumerate(run["answers"].values)]
        try:
            correct = correctness_from_text(texts, answers, lambda p, golds: evaluate(name, p, golds))
        except ValueError as exc:  # an unknown dataset name: say which run config key
            raise GapError(f"data.name {name!r} of the run: {exc}") from None
        source = f"trunc_text judged by the {name} evaluator"
    else:
        correct = correctness_from_logprob(run["trunc_logp"].transpose(*order).values)
        source = "trunc_logp: correct when p(answer) > 1/2 (greedy decoding starts with the answer)"
    correct = np.where(ok[:, None, None], correct, np.nan)
    logp = np.where(ok[:, None, None], run["trunc_logp"].transpose(*order).values.astype(np.float64), np.nan)
    variables: dict[str, Any] = {"trunc_correct": (order, correct)}
    trunc_layers = [int(v) for v in run["trunc_layer"].values]
    if relabel and -1 in trunc_layers:
        from analyze.subsets import relabel as relabel_

        base = trunc_layers.index(-1)
        others = [i for i in range(len(trunc_layers)) if i != base]
        # no keyword fallback: one scheme throughout, samples the run cannot judge are "unsolved"
        subsets = np.where(ok, relabel_(correct[:, base, 0], correct[:, others]), "")
        variables["subset_relabelled"] = (("sample",), subsets.astype(object))
    acc = subset_means(correct, subsets, n_boot=cfg.bootstrap, seed=cfg.seed)
    lp = subset_means(logp, subsets, n_boot=cfg.bootstrap, seed=cfg.seed)
    dims = ("trunc_layer", "mode", "subset")
    variables.update({"trunc_curve": (dims, acc["mean"]), "trunc_curve_lo": (dims, acc["lo"]),
                      "trunc_curve_hi": (dims, acc["hi"]), "trunc_curve_n": (dims, acc["n"]),
                      "trunc_logp_curve": (dims, lp["mean"])})
    coords = {"trunc_layer": trunc_layers, "mode": [str(m) for m in run["mode"].values],
              "subset": acc["subset"]}
    attrs = {"trunc_correct_source": source, "subsets_relabelled": int("subset_relabelled" in variables)}
    return (variables, coords, attrs), subsets


def geometry_variables(geo: Any, cfg: AnalysisConfig) -> Part:
    """Geometry under CONTRACT names, each also ``*_nomassive`` (massive tokens left out)."""
    from analyze.pipeline import MODALITIES, MODALITY_CODES

    variables: dict[str, Any] = {}
    for v, suffix in enumerate(("", "_nomassive")):
        variables.update({
            f"effective_rank{suffix}": (("layer", "modality"), geo.er_pooled[:, :, v]),
            f"effective_rank_n{suffix}": (("layer", "modality"), geo.n_pooled[:, :, v]),
            f"effective_rank_sample{suffix}": (("sample", "layer", "modality"), geo.er_sample[..., v]),
            f"icc{suffix}": (("sample", "layer", "modality"), geo.icc[..., v]),
            f"cka_modality{suffix}": (("layer",), geo.cka_modality[:, v]),
            f"cka_layers{suffix}": (("modality", "layer", "layer2"), geo.cka_layers[:, v]),
        })
    variables["geometry_n_tokens"] = (("sample", "layer", "modality"), geo.n_tokens[..., 0])
    variables["hidden_nonfinite"] = (("sample", "layer"), geo.nonfinite)
    variables["n_massive"] = (("sample", "layer", "modality"), geo.n_tokens[..., 0] - geo.n_tokens[..., 1])
    m = geo.massive
    layer_of = np.asarray(geo.layers)
    variables.update({
        "massive_sample": (("massive",), m[:, 0].astype(np.int64)),
        "massive_token": (("massive",), m[:, 1].astype(np.int64)),
        "massive_layer": (("massive",), layer_of[m[:, 2].astype(np.int64)] if len(m) else np.zeros(0, np.int64)),
        "massive_modality": (("massive",), np.array([MODALITY_CODES[int(c)] for c in m[:, 3]], dtype=object)),
        "massive_ratio": (("massive",), m[:, 4]),
    })
    coords = {"layer": geo.layers, "layer2": geo.layers, "modality": list(MODALITIES)}
    attrs = {"massive_k": float(cfg.massive_k), "cka_tokens": int(cfg.cka_tokens),
             **{f"cka_n_{k}": int(v) for k, v in geo.n_cka.items()}}
    return variables, coords, attrs


def build(run: Any, cfg: AnalysisConfig | None = None, geo: Any = None, *, relabel: bool = False,
          source: str = "") -> Any:
    """The analysis dataset of a run (``geo``: the result of :func:`analyze.pipeline.geometry`).

    Examples
    --------
    >>> analysis = build(open_run("runs/r1"))                 # doctest: +SKIP
    >>> float(analysis.cliff_layer)                           # doctest: +SKIP
    """
    import xarray as xr

    cfg = cfg or AnalysisConfig()
    ok = ok_mask(run)
    (t_vars, t_coords, t_attrs), subsets = truncation_variables(run, ok, stored_subsets(run, ok), cfg, relabel)
    c_vars, c_coords, c_attrs = causal_variables(run, ok, subsets, cfg)
    g_vars, g_coords, g_attrs = geometry_variables(geo, cfg) if geo is not None else ({}, {}, {})
    n = int(ok.size)
    base: dict[str, Any] = {
        "sample_subset": (("sample",), np.asarray(run["subset"].values).astype(object) if "subset" in run
                          else np.full(n, "", dtype=object)),
        "status": (("sample",), np.asarray(run["status"].values).astype(object) if "status" in run
                   else np.full(n, "ok", dtype=object)),
    }
    if "logp_clean" in run:
        base["logp_clean"] = (("sample",), np.where(ok, run["logp_clean"].values.astype(np.float64), np.nan))
    ids = np.asarray(run["sample_id"].values).astype(object) if "sample_id" in run else np.arange(n).astype(str)
    coords = {"sample_id": (("sample",), ids), **t_coords, **c_coords, **g_coords}
    ds = xr.Dataset({**base, **t_vars, **c_vars, **g_vars}, coords=coords)
    n_total = int(run.attrs.get("n_total", n) or n)
    n_ok, n_failed = int(ok.sum()), int((~ok).sum())
    partial = n < n_total or n_failed > 0
    ds.attrs.update({**t_attrs, **c_attrs, **g_attrs,
                     "run": str(source), "n_samples": n, "n_ok": n_ok, "n_failed": n_failed,
                     "n_total": n_total, "partial": int(partial),
                     "partial_note": (f"partial run: {n_ok} of {n_total} samples analysed "
                                      f"({n} committed, {n_failed} not ok)") if partial else "",
                     "dataset": dataset_name(run),
                     "model_path": str(run.attrs.get("model_path", "")),
                     "analysis_config": json.dumps(cfg.model_dump(mode="json"))})
    return ds


def write(ds: Any, out_dir: str | Path) -> Path:
    """Write the analysis dataset to ``out_dir/analysis.zarr`` (replacing an earlier one)."""
    path = Path(out_dir) / ANALYSIS_STORE
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    # Variable-length strings have a Zarr v3 spec; numpy's fixed-width unicode does not.
    for name in list(ds.variables):
        if ds[name].dtype.kind == "U":
            ds[name] = ds[name].astype(object)
    ds.to_zarr(path, mode="w", consolidated=False)
    return path


def read(out_dir: str | Path) -> Any:
    """The analysis dataset written by :func:`write`, loaded into memory."""
    import xarray as xr

    path = Path(out_dir) / ANALYSIS_STORE
    if not (path / "zarr.json").exists():
        raise GapError(f"{out_dir}: no analysis found (expected {path}); run `gap analyze RUN --out {out_dir}`")
    with xr.open_zarr(path, consolidated=False) as ds:
        return ds.load()

"""``report.md``: the checkpoint verdicts, the numbers behind them, and links to every figure.

Examples
--------
>>> write_report(analysis, decision, figures, "runs/r1/analysis")   # doctest: +SKIP
PosixPath('runs/r1/analysis/report.md')
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from analyze.plots import FIGURES

__all__ = ["render_report", "write_report"]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (float, np.floating)):
        return "n/a" if not math.isfinite(float(x)) else f"{float(x):.{digits}g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return str(x)


def _cp_lines(decision: dict[str, Any]) -> list[str]:
    cp1, cp2, cp3 = decision["cp1"], decision["cp2"], decision["cp3"]
    lines = ["| checkpoint | verdict | numbers | n |", "|---|---|---|---|"]
    if cp1["verdict"] != "N/A":
        hard, easy = cp1.get("hard", {}), cp1.get("easy", {})
        numbers = (f"drop at L={cp1['trunc_layer']} ({cp1['mode']}, keyword labels): hard "
                   f"{_fmt(hard.get('drop'))} CI {_fmt(hard.get('ci95'))}, easy {_fmt(easy.get('drop'))} "
                   f"CI {_fmt(easy.get('ci95'))}")
        if "relabelled_not_judged" in cp1:
            shown = cp1["relabelled_not_judged"]
            numbers += (f"; relabelled (not judged): hard {_fmt(shown['hard']['drop'])}, "
                        f"easy {_fmt(shown['easy']['drop'])}")
    else:
        numbers = cp1.get("reason", "")
    lines.append(f"| CP1 cliff causes failures | **{cp1['verdict']}** | {numbers} | {cp1.get('n', 0)} |")
    if cp2["verdict"] != "N/A":
        judged = cp2[cp2["judged_on"]]
        numbers = (f"EVD vs {cp2['judged_on']}: Spearman rho {_fmt(judged['spearman_rho'])} "
                   f"(p {_fmt(judged['spearman_p'])}, CI {_fmt(judged['rho_ci'])}), Pearson r "
                   f"{_fmt(judged['pearson_r'])} (p {_fmt(judged['pearson_p'])})")
    else:
        numbers = cp2.get("reason", "")
    lines.append(f"| CP2 EVD tracks performance | **{cp2['verdict']}** | {numbers} | {cp2.get('n', 0)} |")
    if cp3["verdict"] != "N/A":
        nm = cp3["no_massive"]
        numbers = (f"{cp3['met']}/4 met (pre {cp3['pre_layers']}, post {cp3['post_layers']}): visual ER "
                   f"ratio {_fmt(nm['visual_er_ratio'])}, text ER ratio {_fmt(nm['text_er_ratio'])}, "
                   f"visual ICC change {_fmt(nm['visual_icc_increase'])}, CKA change {_fmt(nm['cka_increase'])}")
    else:
        numbers = cp3.get("reason", "")
    lines.append(f"| CP3 geometric collapse | **{cp3['verdict']}** | {numbers} | {cp3.get('n', 0)} |")
    return lines


def render_report(ds: Any, decision: dict[str, Any], figures: dict[str, list[Path]]) -> str:
    """The Markdown text of the report (figure paths are written relative to the report)."""
    attrs = ds.attrs
    lines = [f"# Analysis of `{attrs.get('run', '')}`", "",
             f"Model `{attrs.get('model_path', '')}`, dataset `{attrs.get('dataset', '')}`: "
             f"{attrs.get('n_ok', 0)} samples analysed of {attrs.get('n_samples', 0)} committed "
             f"({attrs.get('n_total', 0)} configured).", ""]
    if attrs.get("partial"):
        lines += [f"> **Partial run.** {attrs.get('partial_note', '')}. Numbers below cover the "
                  "committed samples with status `ok` only.", ""]
    overall = decision["overall"]
    lines += [f"## Verdict: {overall['verdict']}", "", overall["reading"] + ".", ""]
    lines += _cp_lines(decision) + [""]
    lines += ["Thresholds come from the `analysis` section of the config; every number is in "
              "[`decision.json`](decision.json).", ""]
    if "cliff_layer" in ds:
        cliffs = ", ".join(f"{m} {_fmt(float(v))}" for m, v in
                           zip(ds["cliff_method"].values, ds["cliff_by_method"].values))
        window = ds["transfer_window"].values
        lines += ["## Causal tracing", "",
                  f"Cliff layer ({attrs.get('cliff_method')}): **{_fmt(float(ds['cliff_layer']))}**, the "
                  f"last layer whose visual states still matter; all methods: {cliffs}. "
                  f"tau = {_fmt(attrs.get('tau'))} ({attrs.get('tau_source')}); "
                  f"EVD from method `{attrs.get('evd_method')}`, visual channel. Transfer window "
                  f"{_fmt(window[0])} to {_fmt(window[1])}."]
        if "transfer_point" in ds:
            points = ", ".join(f"{m} {_fmt(float(v))}" for m, v in
                               zip(ds["method"].values, ds["transfer_point"].values))
            lines[-1] += f" Visual/text transfer point by method: {points}."
        lines.append("")
    if "trunc_correct" in ds:
        lines += ["## Truncation", "", f"Correctness: {attrs.get('trunc_correct_source')}.", ""]
    if "effective_rank" in ds and ds.sizes.get("layer", 0):
        n_massive = int(ds.sizes.get("massive", 0))
        lines += ["## Geometry", "",
                  f"Massive activations (norm > {attrs.get('massive_k')} x the sample's median at "
                  f"that layer): {n_massive} token-layers excluded in the `*_nomassive` variants "
                  "(listed in `massive_*`).", "",
                  "| layer | ER visual | ER text | ER visual (no massive) | ER text (no massive) | "
                  "ICC visual (no massive) | CKA visual-text |", "|---|---|---|---|---|---|---|"]
        icc = ds["icc_nomassive"].sel(modality="visual").mean("sample", skipna=True)
        for i, layer in enumerate(ds["layer"].values):
            er, ern = ds["effective_rank"].isel(layer=i), ds["effective_rank_nomassive"].isel(layer=i)
            lines.append(f"| {layer} | {_fmt(float(er.sel(modality='visual')))} | "
                         f"{_fmt(float(er.sel(modality='text')))} | {_fmt(float(ern.sel(modality='visual')))} | "
                         f"{_fmt(float(ern.sel(modality='text')))} | {_fmt(float(icc.isel(layer=i)))} | "
                         f"{_fmt(float(ds['cka_modality'].isel(layer=i)))} |")
        lines.append("")
    lines += ["## Figures", ""]
    for name, paths in figures.items():
        png, pdf = paths
        lines += [f"### {FIGURES.get(name, name)}", "", f"![{name}]({png.name})", "",
                  f"[PDF]({pdf.name})", ""]
    lines += ["The analysis dataset: `from analyze import open_analysis; open_analysis(DIR)`.", ""]
    return "\n".join(lines)


def write_report(ds: Any, decision: dict[str, Any], figures: dict[str, list[Path]],
                 out: str | Path) -> Path:
    """Write ``report.md`` into ``out`` and return its path."""
    path = Path(out) / "report.md"
    path.write_text(render_report(ds, decision, figures))
    return path

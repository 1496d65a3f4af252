"""Figures of an analysis (PNG and PDF): causal and truncation curves, EVD, geometry, CKA, summary.

Every figure states its n and draws bootstrap 95% CIs over samples where the quantity is a mean
over samples.  matplotlib is imported here only (lazily by the CLI) with the Agg backend.

Examples
--------
>>> from analyze import open_analysis                           # doctest: +SKIP
>>> make_all(open_analysis("runs/r1/analysis"), decision, "runs/r1/analysis")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIGURES", "make_all"]

FIGURES = {
    "causal_curves": "Causal contribution of the visual tokens by layer, hard vs easy",
    "truncation_curves": "Accuracy when the visual tokens are truncated after layer L, per mode",
    "evd_hist": "Effective visual depth per sample",
    "geometry": "Effective rank, ICC and modality CKA per layer",
    "cka_layers": "Layer x layer CKA per modality",
    "checkpoint_summary": "Checkpoint decisions",
}
SUBSET_COLOURS = {"hard": "tab:red", "easy": "tab:blue", "medium": "tab:orange", "all": "black"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _plt().close(fig)
    return paths


def _cliff(ax: Any, ds: Any) -> None:
    if "cliff_layer" in ds and np.isfinite(float(ds["cliff_layer"])):
        ax.axvline(float(ds["cliff_layer"]), color="grey", ls="--", lw=1,
                   label=f"cliff ({ds.attrs.get('cliff_method', '')}) = {float(ds['cliff_layer']):g}")


def _subsets(ds: Any) -> list[str]:
    names = [str(s) for s in ds["subset"].values] if "subset" in ds.coords else []
    preferred = [s for s in ("hard", "easy") if s in names]
    return preferred + ["all"] if preferred else [s for s in names]


def causal_curves(ds: Any, out: Path) -> list[Path]:
    plt = _plt()
    methods = [str(m) for m in ds["method"].values]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    layers = ds["causal_layer"].values
    for ax, method in zip(axes[0], methods):
        for subset in _subsets(ds):
            sel = dict(method=method, channel="visual", subset=subset)
            mean, lo, hi = (ds[v].sel(sel).values for v in ("causal_curve", "causal_curve_lo", "causal_curve_hi"))
            n = int(ds["causal_curve_n"].sel(sel).max())
            colour = SUBSET_COLOURS.get(subset)
            ax.plot(layers, mean, marker=".", color=colour, label=f"{subset} (n={n})")
            ax.fill_between(layers, lo, hi, color=colour, alpha=0.15)
        _cliff(ax, ds)
        ax.axhline(float(ds.attrs.get("tau", 0.0)), color="grey", lw=0.8, ls=":", label="tau")
        ax.set(title=f"visual channel, {method}", xlabel="layer", ylabel="D(l) = s_clean - s_patched")
        ax.legend(fontsize=7)
    fig.suptitle("Causal tracing (mean, bootstrap 95% CI)")
    return _save(fig, out, "causal_curves")


def truncation_curves(ds: Any, out: Path) -> list[Path]:
    plt = _plt()
    modes = [str(m) for m in ds["mode"].values]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    tl = np.asarray(ds["trunc_layer"].values)
    cut = tl >= 0
    for ax, mode in zip(axes[0], modes):
        for subset in _subsets(ds):
            sel = dict(mode=mode, subset=subset)
            acc, lo, hi = (ds[v].sel(sel).values for v in ("trunc_curve", "trunc_curve_lo", "trunc_curve_hi"))
            n = int(ds["trunc_curve_n"].sel(sel).max())
            colour = SUBSET_COLOURS.get(subset)
            ax.plot(tl[cut], acc[cut], marker=".", color=colour, label=f"{subset} (n={n})")
            ax.fill_between(tl[cut], lo[cut], hi[cut], color=colour, alpha=0.15)
            if (~cut).any():
                ax.axhline(acc[~cut][0], color=colour, lw=0.8, ls=":")
        _cliff(ax, ds)
        ax.set(title=f"truncation: {mode} (dotted: untruncated)", xlabel="truncate after layer L",
               ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    fig.suptitle(f"Truncation ({ds.attrs.get('trunc_correct_source', '')[:60]})", fontsize=9)
    return _save(fig, out, "truncation_curves")


def evd_hist(ds: Any, out: Path) -> list[Path]:
    plt = _plt()
    evd = ds["evd"].values
    evd = evd[np.isfinite(evd)]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if evd.size:
        bins = np.arange(evd.min() - 0.5, evd.max() + 1.5)
        ax.hist(evd, bins=bins, color="tab:purple", alpha=0.8)
    _cliff(ax, ds)
    ax.set(title=f"EVD (tau = {float(ds.attrs.get('tau', np.nan)):.3g}, n = {evd.size})",
           xlabel="effective visual depth (layer)", ylabel="samples")
    ax.legend(fontsize=7)
    return _save(fig, out, "evd_hist")


def geometry(ds: Any, out: Path) -> list[Path]:
    from analyze.stats import bootstrap_mean_ci

    plt = _plt()
    layers = ds["layer"].values
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colours = {"visual": "tab:green", "text": "tab:brown"}
    for modality, colour in colours.items():
        for suffix, style in (("", "-"), ("_nomassive", "--")):
            label = f"{modality}{' (no massive)' if suffix else ''}"
            n = int(ds[f"effective_rank_n{suffix}"].sel(modality=modality).max())
            axes[0].plot(layers, ds[f"effective_rank{suffix}"].sel(modality=modality), style,
                         color=colour, marker=".", label=f"{label}, {n} tokens")
            icc = ds[f"icc{suffix}"].sel(modality=modality).transpose("sample", "layer").values
            lo, hi = bootstrap_mean_ci(icc, n_boot=200)
            n_s = int(np.isfinite(icc).any(axis=1).sum())
            axes[1].plot(layers, np.nanmean(icc, axis=0) if n_s else np.full(len(layers), np.nan),
                         style, color=colour, marker=".", label=f"{label} (n={n_s})")
            axes[1].fill_between(layers, lo, hi, color=colour, alpha=0.12)
    for suffix, style in (("", "-"), ("_nomassive", "--")):
        n = ds.attrs.get(f"cka_n_modality_{'nomassive' if suffix else 'all'}", "?")
        axes[2].plot(layers, ds[f"cka_modality{suffix}"], style, color="black", marker=".",
                     label=f"visual vs text{' (no massive)' if suffix else ''} (n={n})")
    titles = ("pooled effective rank", "ICC (mean over samples, 95% CI)", "debiased CKA, sample-paired")
    for ax, title in zip(axes, titles):
        _cliff(ax, ds)
        ax.set(title=title, xlabel="layer")
        ax.legend(fontsize=7)
    fig.suptitle(f"Geometry (massive: norm > {ds.attrs.get('massive_k', '?')} x the sample's median at the layer)")
    return _save(fig, out, "geometry")


def cka_layers(ds: Any, out: Path) -> list[Path]:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(9, 8), squeeze=False)
    layers = ds["layer"].values
    for i, modality in enumerate(("visual", "text")):
        for j, suffix in enumerate(("", "_nomassive")):
            ax = axes[i, j]
            mat = ds[f"cka_layers{suffix}"].sel(modality=modality).values
            im = ax.imshow(mat, vmin=0, vmax=1, origin="lower", cmap="viridis",
                           extent=(layers[0] - 0.5, layers[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5))
            n = ds.attrs.get(f"cka_n_layers_{modality}_{'nomassive' if suffix else 'all'}", "?")
            ax.set(title=f"{modality}{' (no massive)' if suffix else ''}, n={n}", xlabel="layer",
                   ylabel="layer")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Minibatch CKA between layers (the same {ds.attrs.get('cka_tokens', '?')} tokens per "
                 "sample at both; n = samples)")
    return _save(fig, out, "cka_layers")


def checkpoint_summary(ds: Any, decision: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    fig = plt.figure(figsize=(8.5, 11))
    lines = [f"Overall: {decision['overall']['verdict']}  ({decision['overall']['reading']})", ""]
    if ds.attrs.get("partial_note"):
        lines += [ds.attrs["partial_note"], ""]
    for key in ("cp1", "cp2", "cp3"):
        cp = decision[key]
        lines.append(f"{key.upper()}: {cp['verdict']}   (n = {cp.get('n', 0)})")
        numbers = {k: v for k, v in cp.items() if k not in ("verdict", "passed", "n")}
        text = json.dumps(numbers, indent=1, default=str)
        lines += ["   " + ln for ln in text.splitlines()[:40]] + [""]
    fig.text(0.04, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=6.5)
    return _save(fig, out, "checkpoint_summary")


def make_all(ds: Any, decision: dict[str, Any], out: str | Path) -> dict[str, list[Path]]:
    """Draw every figure the analysis has data for; returns ``{name: [png, pdf]}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[Path]] = {}
    if "causal_curve" in ds:
        made["causal_curves"] = causal_curves(ds, out)
    if "trunc_curve" in ds:
        made["truncation_curves"] = truncation_curves(ds, out)
    if "evd" in ds:
        made["evd_hist"] = evd_hist(ds, out)
    if "effective_rank" in ds and ds.sizes.get("layer", 0):
        made["geometry"] = geometry(ds, out)
        made["cka_layers"] = cka_layers(ds, out)
    made["checkpoint_summary"] = checkpoint_summary(ds, decision, out)
    return made

"""The CPU side of gap: metrics, Dask pipelines, checkpoint decisions, figures and the report.

``from analyze import open_analysis`` reopens what ``gap analyze`` wrote.  Nothing heavy is
imported here: xarray, dask and matplotlib load when a function needs them.

Examples
--------
>>> from analyze import open_analysis                   # doctest: +SKIP
>>> ds = open_analysis("runs/r1/analysis")              # doctest: +SKIP
>>> ds.effective_rank.sel(modality="visual")            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["open_analysis"]


def open_analysis(path: str | Path) -> Any:
    """The analysis results in ``path`` (a ``gap analyze --out`` directory) as an xarray Dataset.

    Variables follow CONTRACT.md: ``effective_rank`` (layer, modality), ``effective_rank_sample``
    and ``icc`` (sample, layer, modality), ``cka_modality`` (layer), ``cka_layers`` (modality,
    layer, layer2; minibatch CKA of the same tokens per sample), ``evd`` (sample), ``cliff_layer``, ``trunc_correct`` (sample, trunc_layer,
    mode), ``trunc_curve`` (trunc_layer, mode, subset), each geometry metric also as
    ``*_nomassive``, and the excluded massive tokens as ``massive_*``.
    """
    from analyze.results import read

    return read(path)

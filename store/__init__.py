"""The run store: a Zarr v3 layout written by capture shards and read as one xarray Dataset.

``from store import open_run`` is all a notebook needs; capture uses :class:`RunWriter`.
Heavy imports (xarray, dask, zarr) happen on first use, not at import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_run", "RunWriter", "RunSpec", "read_run"]


def __getattr__(name: str) -> Any:
    if name == "open_run":
        from store.view import open_run

        return open_run
    if name in ("RunWriter", "RunSpec"):
        from store import writer

        return getattr(writer, name)
    if name == "read_run":
        from store.reader import read_run

        return read_run
    raise AttributeError(name)

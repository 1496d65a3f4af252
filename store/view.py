"""The read-only xarray view of a run: all shards merged lazily, padding and uncommitted data hidden.

Samples are ordered by their row in the configured selection (``sample_index``) and tokens by
sample, so a run's view does not depend on how many shards wrote it or how often it resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from schemas.errors import GapError
from schemas.run import (TOKEN_FLAG_ANSWER, TOKEN_FLAG_TEXT, TOKEN_FLAG_VISUAL, VARIABLES, produced,
                         sample_variables)
from store import layout
from store.encoding import decode_hidden, decode_values
from store.reader import PartState, RunState, read_run

log = logging.getLogger("gap.store")

# float32 bytes per layer of a Dask chunk of hidden: a few samples of a 2048-4096-wide model, so a
# one-sample selection reads little more than the sample and a whole-layer pass has enough tasks
TARGET_DASK_CHUNK_BYTES = 16 << 20
RECORD_FIELDS = ("sample_id", "question", "answer", "subset", "status", "error", "n_tokens", "n_visual")


def committed_samples(state: RunState) -> list[tuple[PartState, dict[str, Any]]]:
    """Every committed sample once, ordered by ``index``: its latest record in its part (a retried
    sample's new record replaces the failed one); a sample in two parts keeps its first part's."""
    seen: dict[int, tuple[PartState, dict[str, Any]]] = {}
    for part in state.parts:
        for meta in part.samples:
            if meta["index"] in seen:
                log.warning("sample %s committed twice (%s and %s); using the first", meta["sample_id"],
                            seen[meta["index"]][0].path.name, part.path.name)
                continue
            seen[meta["index"]] = (part, meta)
    return [seen[k] for k in sorted(seen)]


def _token_ranges(samples: list[tuple[PartState, dict[str, Any]]]) -> list[tuple[PartState, int, int]]:
    """(part, start, stop) token ranges in view order, adjacent ranges of one part merged."""
    ranges: list[tuple[PartState, int, int]] = []
    for part, meta in samples:
        n = meta["n_tokens"]
        if not n:
            continue
        start = meta["offset"]
        if ranges and ranges[-1][0] is part and ranges[-1][2] == start:
            ranges[-1] = (part, ranges[-1][1], start + n)
        else:
            ranges.append((part, start, start + n))
    return ranges


def _read_tokens(part: PartState) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(part.path / layout.TOKENS, mode="r")[: part.end])


class HiddenPart:
    """Array-like over one part's hidden shards, read with positioned reads (for ``dask.array``).

    zarr-python reads the same files (tests check both agree); this path skips its per-chunk
    overhead, which dominates when analysis streams hundreds of GB.
    """

    def __init__(self, path: Path, hidden: dict[str, Any], n_tokens: int) -> None:
        self.path = path
        self.n_layers = len(hidden["layers"])
        self.block = hidden["block_tokens"]
        self.size = hidden["hidden_size"]
        self.compression = hidden.get("compression", "none")
        self.dtype = np.dtype(layout.ENCODINGS[hidden["encoding"]])
        self.shape = (self.n_layers, n_tokens, self.size)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        layers, tokens, cols = key
        rows = range(*tokens.indices(self.shape[1]))
        if rows.step != 1:  # the covering rows, then every step-th
            lo, hi = (min(rows), max(rows) + 1) if rows else (0, 0)
            return self[layers, slice(lo, hi), cols][:, np.asarray(rows, dtype=np.int64) - lo]
        t0, t1 = rows.start, rows.stop
        n_layers = len(range(self.n_layers)[layers])
        out = np.empty((n_layers, max(0, t1 - t0), self.size), self.dtype)
        for b in range(t0 // self.block, (t1 + self.block - 1) // self.block):
            lo, hi = max(t0, b * self.block), min(t1, (b + 1) * self.block)
            out[:, lo - t0: hi - t0] = layout.read_hidden_shard(
                self.path / layout.hidden_chunk_key(b), self.n_layers, self.block, self.size, self.dtype,
                layers, slice(lo - b * self.block, hi - b * self.block), self.compression)
        return out[:, :, cols]


class RunHidden:
    """Float32 array-like over the hidden states of a whole run in view token order (for Dask).

    A view token range maps onto runs of consecutive tokens in the parts (shards take every N-th
    sample and capture writes in length-batch order, so nearly every sample is a run of its own).
    One array over them keeps the Dask graph at layers x token chunks whatever the number of
    samples (slicing one array per run adds tasks per sample and layer). A selection reads the
    whole chunks it touches (Dask does not narrow the read), hence chunks of a few samples.
    """

    def __init__(self, state: RunState, ranges: list[tuple[PartState, int, int]]) -> None:
        hidden = state.hidden
        self.parts = {p.path: HiddenPart(p.path / layout.HIDDEN, hidden, p.end) for p, _, _ in ranges}
        self.runs = [(p.path, a, b) for p, a, b in ranges]
        self.starts = np.concatenate([[0], np.cumsum([b - a for _, a, b in ranges], dtype=np.int64)])
        self.encoding = hidden["encoding"]
        self.dtype = np.dtype(np.float32)
        self.shape = (len(hidden["layers"]), int(self.starts[-1]), hidden["hidden_size"])
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        layers, tokens, cols = key
        rows = range(*tokens.indices(self.shape[1]))
        if rows.step != 1:  # the covering rows, then the ones asked for
            lo, hi = (min(rows), max(rows) + 1) if rows else (0, 0)
            return self[layers, slice(lo, hi), cols][:, np.asarray(rows, dtype=np.int64) - lo]
        t0, t1 = rows.start, max(rows.start, rows.stop)
        pieces = []
        i = max(0, int(np.searchsorted(self.starts, t0, side="right")) - 1)
        while i < len(self.runs) and self.starts[i] < t1:
            path, a, _ = self.runs[i]
            lo, hi = max(t0, int(self.starts[i])), min(t1, int(self.starts[i + 1]))
            base = a - int(self.starts[i])
            pieces.append(decode_hidden(self.parts[path][layers, slice(base + lo, base + hi), cols], self.encoding))
            i += 1
        if not pieces:
            n_layers = len(range(self.shape[0])[layers])
            return np.zeros((n_layers, 0, len(range(self.shape[2])[cols])), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)


def sample_chunks(n_tokens: np.ndarray, max_tokens: int) -> tuple[int, ...]:
    """Token chunk sizes along the view's token axis: whole samples, up to ``max_tokens`` a chunk.

    A chunk never splits a sample (one larger than ``max_tokens`` is a chunk of its own), so a
    selection of one sample reads that sample's chunk only, and an analysis task holds whole
    samples.

    >>> sample_chunks(np.array([3, 4, 0, 2, 9, 1]), max_tokens=8)
    (7, 2, 9, 1)
    """
    sizes: list[int] = []
    current = 0
    for n in (int(x) for x in n_tokens if x):
        if current and current + n > max_tokens:
            sizes.append(current)
            current = 0
        current += n
    if current:
        sizes.append(current)
    return tuple(sizes)


def _hidden_dask(state: RunState, ranges: list[tuple[PartState, int, int]], n_tokens: np.ndarray,
                 chunks: int | None):
    import dask.array as da
    from dask.base import tokenize

    hidden = state.hidden
    size, n_layers = hidden["hidden_size"], len(hidden["layers"])
    if not ranges:
        return da.zeros((n_layers, 0, size), dtype=np.float32)
    if chunks is None:
        chunks = max(1, TARGET_DASK_CHUNK_BYTES // (size * 4))
    source = RunHidden(state, ranges)
    # the name is the graph key: everything that makes the array (the commit logs fix the token
    # runs), so that two opens of different chunking, places or contents never share one (dask
    # would mix their tasks)
    name = "hidden-" + tokenize([(str(p.path.resolve()), p.end, p.log_bytes) for p in state.parts],
                                chunks, hidden)
    return da.from_array(source, chunks=((1,) * n_layers, sample_chunks(n_tokens, chunks), (size,)),
                         name=name, asarray=False, fancy=False)


def open_run(run: str | Path, chunks: int | None = None):
    """Open a run as a lazy :class:`xarray.Dataset` over every committed sample of every shard.

    Parameters
    ----------
    run : path of the run directory.
    chunks : most tokens per Dask chunk of ``hidden`` (default: ~16 MB of float32 per layer).
        Chunks hold whole samples (:func:`sample_chunks`); one layer each.

    ``hidden`` and the causal variables share the ``layer`` dimension, which holds the layers of
    both: where ``capture.layers`` and ``capture.causal.layers`` differ, ``hidden`` is NaN at a
    layer it did not capture (select ``ds.attrs["hidden_layers"]``) and ``delta`` at one it did
    not patch.

    Examples
    --------
    >>> ds = open_run("runs/r1")                                       # doctest: +SKIP
    >>> vis = ds.hidden.sel(layer=10).where(ds.is_visual, drop=True)   # doctest: +SKIP
    """
    import xarray as xr

    state = read_run(run)
    samples = committed_samples(state)
    coords_spec = state.coords
    n = len(samples)

    data: dict[str, Any] = {}
    sample_index = np.array([m["index"] for _, m in samples], np.int64)
    for name in RECORD_FIELDS:
        var = VARIABLES[name]
        values = [m.get(name, var.fill) for _, m in samples]
        data[name] = (("sample",), np.array(values, dtype=str if var.dtype == "str" else var.dtype))
    data["answers"] = (("sample",), np.array([json.dumps(m.get("answers", [])) for _, m in samples], dtype=str))
    config = yaml.safe_load(state.attrs.get("config_yaml") or "") or {}
    for var in sample_variables():
        if var.name in data or var.name == "sample_index":
            continue
        if var.dims[1:] and not all(coords_spec.get(d) for d in var.dims[1:]):
            continue  # this run did not configure the dimension (e.g. no causal methods)
        if not produced(var, config):
            continue  # e.g. trunc_text of a run that generated nothing (CONTRACT)
        items = [m.get("values", {}).get(var.name) for _, m in samples]
        data[var.name] = (var.dims, decode_values(var.name, items, coords_spec))

    # per-token coordinates, ordered by sample
    ranges = _token_ranges(samples)
    tables = {p.path: _read_tokens(p) for p in {p.path: p for p, _, _ in ranges}.values()}
    table = (np.concatenate([tables[p.path][a:b] for p, a, b in ranges]) if ranges
             else np.zeros((0, len(layout.TOKEN_COLUMNS)), np.int32))
    n_tok = np.array([m["n_tokens"] for _, m in samples], np.int64)
    token_sample = np.repeat(np.arange(n, dtype=np.int64), n_tok)  # tokens are ordered by sample
    if not np.array_equal(sample_index[token_sample], table[:, 3]):
        bad = int(np.flatnonzero(sample_index[token_sample] != table[:, 3])[0])
        raise GapError(f"{run}: token {bad} of the view carries sample index {int(table[bad, 3])}, not "
                       f"{int(sample_index[token_sample[bad]])}: the tokens table is damaged (gap store verify)")
    flags = table[:, 2]
    token_start = np.concatenate([[0], np.cumsum(n_tok)[:-1]]).astype(np.int64) if n else n_tok

    coords: dict[str, Any] = {
        "sample_id": (("sample",), data.pop("sample_id")[1]),
        "sample_index": (("sample",), sample_index),
        "token_start": (("sample",), token_start),
        "token_sample": (("token",), token_sample),
        "input_ids": (("token",), table[:, 0].astype(np.int32)),
        "position": (("token",), table[:, 1].astype(np.int32)),
        "is_visual": (("token",), (flags & TOKEN_FLAG_VISUAL).astype(bool)),
        "is_text": (("token",), (flags & TOKEN_FLAG_TEXT).astype(bool)),
        "is_answer": (("token",), (flags & TOKEN_FLAG_ANSWER).astype(bool)),
    }
    for dim in ("method", "channel", "trunc_layer", "mode"):
        if coords_spec.get(dim):
            coords[dim] = coords_spec[dim]
    ds = xr.Dataset(data, coords={**coords, **({"layer": coords_spec["layer"]} if coords_spec.get("layer") else {})})

    if state.hidden["layers"]:
        hidden = _hidden_dask(state, ranges, n_tok, chunks)
        hidden_ds = xr.Dataset({"hidden": (("layer", "token", "hidden_dim"), hidden)},
                               coords={"layer": state.hidden["layers"]})
        ds = xr.merge([ds, hidden_ds], join="outer", compat="no_conflicts", combine_attrs="drop_conflicts")
    ds.attrs.update(_attrs(state, n))
    return ds


def _attrs(state: RunState, n_committed: int) -> dict[str, Any]:
    attrs = state.attrs
    model = attrs.get("model", {})
    prov = attrs.get("provenance", {})
    return {
        "model_path": str(model.get("path")),
        "model_revision": str(model.get("revision")),
        "model_family": str(model.get("family")),
        "dtype": str(model.get("dtype")),
        "trust_remote_code": int(bool(model.get("trust_remote_code"))),
        "hidden_encoding": attrs["hidden"]["encoding"],
        "hidden_layers": [int(v) for v in attrs["hidden"]["layers"]],
        "gap_version": str(prov.get("gap_version")),
        "git_commit": str(prov.get("git_commit")),
        "libraries": json.dumps(prov.get("libraries", {})),
        "created": str(prov.get("created")),
        "config_yaml": attrs.get("config_yaml", ""),
        "model_info": json.dumps(model),
        "n_shards": int(attrs.get("n_shards", 0)),
        "n_total": int(attrs.get("n_total", 0)),
        "n_committed": n_committed,
        "complete": int(n_committed >= attrs.get("n_total", 0)),
        "updated": max((c["time"] for p in state.parts for c in p.commits), default=""),
    }

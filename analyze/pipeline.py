"""The Dask pipelines: one read of the activations for every geometry metric, then the rest.

Geometry pass.  The token axis of ``hidden`` is cut into *batches*: the samples whose tokens
start in one Dask chunk (a sample running past the chunk's end takes the next chunk's first
tokens along).  The array is then re-chunked at the batches' spans, so each task receives
exactly its own tokens, and when all tasks of a layer group are computed together every store
chunk is read exactly once, whichever batches share it.  A task computes, for each
of its samples and layers and for both modalities (visual tokens, question tokens):

- the massive-token mask (norm > k x the median norm of the sample's tokens at that layer);
- per-sample effective rank (eigenvalues of the centred N x N Gram matrix) and ICC, with all
  tokens and without the massive ones (a row subset of the same Gram matrix);
- the mean-pooled state (for the sample-paired CKA of the two modalities);
- the Gram matrix of a fixed subset of the sample's tokens of each modality (``cka_tokens`` of
  them, the same tokens at every layer), from which the layer x layer map is the minibatch CKA
  of Nguyen et al. (2021): one minibatch per sample, so each pair of layers compares the same
  tokens, and the map needs neither all layers at once nor a d x d matrix per pair;
- the streamed scatter of the tokens for the pooled effective rank, accumulated in its worker's
  memory: each worker holds one d x d accumulator per layer, modality and variant for the whole
  pass, and only those (not one per task) travel, to the worker that takes the eigenvalues.

The client writes the per-sample values, the pooled states and the token Gram matrices (memory
maps in the scratch directory) as tasks finish, checks that every batch reached the pooled ranks exactly once (a
worker lost mid-pass loses its accumulators: the layer group runs again), and computes the CKA
maps at the end.  Layer groups are as large as ``memory_budget`` per worker allows.  Each
finished group's results are saved in the scratch directory, so a pass that stops (a time
limit, a failure) resumes after its last finished group when run again over the same samples.

Examples
--------
>>> from store import open_run                                                   # doctest: +SKIP
>>> ds = open_run("runs/r1")                                                    # doctest: +SKIP
>>> ok = ds.status.values == "ok"                                               # doctest: +SKIP
>>> with open_client("threads") as client:                                      # doctest: +SKIP
...     geo = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values,
...                    ds.is_text.values, ok, client=client, scratch="out/.scratch")
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from analyze.cka_maps import CKA_TOKENS, TokenGrams, cka_token_subset, layer_cka
from analyze.metrics import (ROW_BUFFER_BYTES, Moments, RowAccumulator, cka_matrix, effective_rank_from_gram,
                             icc_shifted, massive_mask)
from schemas.config import SLURM_SIZE, slurm_memory_per
from schemas.errors import GapError

log = logging.getLogger("gap.analyze")

MODALITIES = ("visual", "text")
VARIANTS = ("all", "nomassive")
MODALITY_CODES = {0: "visual", 1: "text", 2: "other"}
# What a saved layer group holds; another version's scratch starts afresh (2: nonfinite added)
SCRATCH_FORMAT = 2

__all__ = ["Batch", "GeometryResult", "MODALITIES", "geometry", "open_client", "plan_batches",
           "sample_layer_geometry"]



# ------------------------------------------------------------------------------ planning

@dataclass
class Batch:
    """Whole samples whose tokens start in token chunk ``chunk_lo`` (and may run to ``chunk_hi``).

    ``bounds`` are the samples' token ranges relative to the first token of ``chunk_lo``.
    """

    chunk_lo: int
    chunk_hi: int
    offset: int
    samples: np.ndarray
    bounds: np.ndarray


def sample_runs(token_sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample, start, stop) of each sample's contiguous run of tokens.

    >>> [a.tolist() for a in sample_runs(np.array([0, 0, 1, 1, 1, 3]))]
    [[0, 1, 3], [0, 2, 5], [2, 5, 6]]
    """
    ts = np.asarray(token_sample)
    if ts.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ts) != 0) + 1])
    stops = np.concatenate([starts[1:], [ts.size]])
    samples = ts[starts]
    if np.unique(samples).size != samples.size:
        raise GapError("hidden: the tokens of a sample are not contiguous along the token axis")
    return samples.astype(np.int64), starts.astype(np.int64), stops.astype(np.int64)


def plan_batches(token_sample: np.ndarray, ok: np.ndarray, chunk_sizes: Sequence[int]) -> list[Batch]:
    """Group the ``ok`` samples by the token chunk their first token lies in.

    >>> b = plan_batches(np.array([0, 0, 0, 1, 1, 2]), np.array([True, True, True]), [4, 2])
    >>> [(x.chunk_lo, x.chunk_hi, x.samples.tolist(), x.bounds.tolist()) for x in b]
    [(0, 1, [0, 1], [[0, 3], [3, 5]]), (1, 1, [2], [[1, 2]])]
    """
    edges = np.concatenate([[0], np.cumsum(chunk_sizes)]).astype(np.int64)
    samples, starts, stops = sample_runs(token_sample)
    keep = np.asarray(ok, bool)[samples] if samples.size else np.zeros(0, bool)
    samples, starts, stops = samples[keep], starts[keep], stops[keep]
    first = np.searchsorted(edges, starts, side="right") - 1
    last = np.searchsorted(edges, stops - 1, side="right") - 1
    batches = []
    for chunk in np.unique(first):
        sel = first == chunk
        offset = int(edges[chunk])
        bounds = np.stack([starts[sel] - offset, stops[sel] - offset], axis=1)
        batches.append(Batch(int(chunk), int(last[sel].max()), offset, samples[sel], bounds))
    return batches


def plan_layer_groups(layer_chunks: Sequence[int], hidden_size: int, chunk_tokens: int,
                      memory_budget: int) -> list[tuple[int, int]]:
    """Consecutive layer-chunk ranges ``[a, b)`` whose working memory per worker fits ``memory_budget``.

    Per layer, on each worker: two modalities x (kept + massive tokens) float64 scatter matrices
    and the kept tokens' row buffers (see :class:`RowAccumulator`), plus, for each task in flight
    (its own and one queued), a float32 chunk and its batch's copy.

    >>> plan_layer_groups([1, 1, 1, 1], 512, 4096, 200 << 20)
    [(0, 2), (2, 4)]
    """
    per_layer = 4 * hidden_size * hidden_size * 8 + 2 * ROW_BUFFER_BYTES + 2 * 2 * chunk_tokens * hidden_size * 4
    groups, start, used = [], 0, 0
    for i, size in enumerate(layer_chunks):
        cost = size * per_layer
        if i > start and used + cost > memory_budget:
            groups.append((start, i))
            start, used = i, 0
        used += cost
    if len(layer_chunks):
        groups.append((start, len(layer_chunks)))
    return groups


# ------------------------------------------------------------------------------ the task kernel

@dataclass
class SampleGeometry:
    """One sample at one layer: per modality and variant (all / no massive)."""

    er: np.ndarray          # (2 modalities, 2 variants)
    icc: np.ndarray         # (2, 2)
    n_tokens: np.ndarray    # (2, 2)
    pooled: np.ndarray      # (2, 2, d)
    massive: np.ndarray     # indices (within the sample) of massive tokens
    ratio: np.ndarray       # their norm / median norm
    modality: np.ndarray    # their modality code (0 visual, 1 text, 2 other)
    cka_gram: np.ndarray    # (2, K, K) Gram matrix of the CKA tokens (zero-padded past their count)
    cka_heavy: np.ndarray   # (2, K) which of the CKA tokens are massive here
    finite: bool = True     # False: NaN/inf among the states, the sample left out at this layer


def sample_layer_geometry(x: np.ndarray, visual: np.ndarray, text: np.ndarray, k: float,
                          pools: Sequence[tuple[RowAccumulator, RowAccumulator]] | None = None,
                          cka_rows: Sequence[np.ndarray] | None = None, cka_tokens: int = CKA_TOKENS
                          ) -> SampleGeometry:
    """Every per-sample geometry number of one sample at one layer.

    Parameters
    ----------
    x : (n_tokens, d) all of the sample's tokens at this layer (float32 or float64)
    visual, text : boolean masks over those tokens
    k : massive-activation ratio to the median norm of all the sample's tokens
    pools : per modality, the (kept tokens, massive tokens) accumulators of the pooled effective
        rank, which receive this sample's tokens; throw-away ones when not given
    cka_rows : per modality, which of its tokens enter the layer x layer CKA (at most
        ``cka_tokens``; :func:`cka_token_subset`, default the first ``cka_tokens``)

    Examples
    --------
    >>> x = np.vstack([np.eye(4), 1000 * np.ones((1, 4))])
    >>> g = sample_layer_geometry(x, np.array([1, 1, 1, 1, 0], bool), np.array([0, 0, 0, 0, 1], bool), 100)
    >>> g.massive.tolist(), g.modality.tolist(), g.n_tokens[1].tolist()
    ([4], [1], [1, 0])

    States with NaN or inf (capture marks such samples failed, so a damaged store) leave the sample
    out at this layer: NaN numbers, no tokens, nothing pooled.
    """
    d = x.shape[1]
    if pools is None:
        pools = [(RowAccumulator(d), RowAccumulator(d)) for _ in range(2)]
    if not np.isfinite(x).all():
        return SampleGeometry(np.full((2, 2), np.nan), np.full((2, 2), np.nan), np.zeros((2, 2), np.int64),
                              np.full((2, 2, d), np.nan, np.float32), np.zeros(0, np.int64), np.zeros(0),
                              np.zeros(0, np.int64), np.zeros((2, cka_tokens, cka_tokens), np.float32),
                              np.zeros((2, cka_tokens), bool), finite=False)
    # float64 norms: the ICC divides by them (the massive mask would not need it).
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    median = float(np.median(norms)) if norms.size else 0.0
    massive = massive_mask(norms, k)
    out = SampleGeometry(np.full((2, 2), np.nan), np.full((2, 2), np.nan), np.zeros((2, 2), np.int64),
                         np.full((2, 2, d), np.nan, np.float32), np.flatnonzero(massive),
                         norms[massive] / median if median > 0 else np.full(int(massive.sum()), np.inf),
                         np.where(visual[massive], 0, np.where(text[massive], 1, 2)),
                         np.zeros((2, cka_tokens, cka_tokens), np.float32), np.zeros((2, cka_tokens), bool))
    for m, mask in enumerate((visual, text)):
        rows, heavy, row_norms = _rows(x, mask), massive[mask], norms[mask]
        kept_pool, heavy_pool = pools[m]
        if rows.shape[0] == 0:
            continue
        chosen = np.arange(min(rows.shape[0], cka_tokens)) if cka_rows is None else cka_rows[m]
        sub, sub_heavy = rows[chosen].astype(np.float64), heavy[chosen]
        # HSIC does not see a shift: centring only keeps the stored float32 Gram precise, on the
        # ordinary tokens (a massive one in the mean would offset them all by a huge vector)
        sub -= sub[~sub_heavy].mean(axis=0) if not sub_heavy.all() else sub.mean(axis=0)
        c = chosen.size
        out.cka_gram[m, :c, :c], out.cka_heavy[m, :c] = sub @ sub.T, sub_heavy
        out.n_tokens[m] = rows.shape[0], rows.shape[0] - int(heavy.sum())
        if not heavy.any():
            # The usual case: the rows are centred once, into the pooled accumulator's buffer,
            # and that copy serves the Gram matrix and the ICC too.
            centred, mean = kept_pool.add(rows)
            out.er[m] = effective_rank_from_gram(centred @ centred.T)
            out.icc[m] = icc_shifted(centred, mean, row_norms)
            out.pooled[m] = mean
            continue
        # float64: the Gram route squares the spectrum, and float32 round-off (eps x |x|^2) would
        # swamp the small eigenvalues whenever a large token sets the scale.
        mean = rows.mean(axis=0, dtype=np.float64)
        centred = rows - mean
        gram = centred @ centred.T
        out.er[m, 0] = effective_rank_from_gram(gram)
        out.icc[m, 0] = icc_shifted(centred, mean, row_norms)  # O(N d), reusing the centred rows
        out.pooled[m, 0] = mean
        out.er[m, 1] = effective_rank_from_gram(gram[np.ix_(~heavy, ~heavy)])
        out.icc[m, 1] = icc_shifted(centred, mean, np.where(heavy, 0.0, row_norms))
        heavy_pool.add(rows[heavy])
        if not heavy.all():
            out.pooled[m, 1] = kept_pool.add(rows[~heavy])[1]
    return out


def _rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x[mask]``, as a view when the mask is one run of tokens (visual tokens usually are)."""
    where = np.flatnonzero(mask)
    if where.size and where[-1] - where[0] + 1 == where.size:
        return x[where[0]:where[-1] + 1]
    return x[where]


@dataclass
class GeometryPartial:
    """What one task returns for its batch of samples and its layer group (the pooled moments
    stay in its worker's memory, see :func:`_collect`)."""

    samples: np.ndarray
    er: np.ndarray          # (n_b, Lg, 2, 2)
    icc: np.ndarray         # (n_b, Lg, 2, 2)
    n_tokens: np.ndarray    # (n_b, Lg, 2, 2)
    pooled: np.ndarray      # (n_b, Lg, 2, 2, d) float32
    massive: np.ndarray     # (m, 5): sample, token (in view), layer position, modality, ratio
    cka_gram: np.ndarray    # (n_b, 2, Lg, K, K) float32
    cka_heavy: np.ndarray   # (n_b, 2, Lg, K)
    nonfinite: np.ndarray   # (n_b, Lg) the sample's states hold NaN/inf at that layer


def geometry_task(parts: list[list[np.ndarray]], batch: Batch, batch_id: int, layer_start: int,
                  visual: np.ndarray, text: np.ndarray, k: float, pass_key: str,
                  cka_tokens: int = CKA_TOKENS) -> GeometryPartial:
    """Run :func:`sample_layer_geometry` over a batch; ``parts[layer_chunk][token_chunk]``.

    The batch's tokens go into this worker's pooled accumulators for ``pass_key``, which
    :func:`_collect` hands over at the end of the pass: a d x d matrix per layer and worker
    instead of one per task.
    """
    lo, hi = int(batch.bounds[:, 0].min()), int(batch.bounds[:, 1].max())
    spans = [_token_span(row, lo, hi) for row in parts]
    block = spans[0] if len(spans) == 1 else np.concatenate(spans, axis=0)
    bounds, visual, text = batch.bounds - lo, visual[lo:hi], text[lo:hi]
    n_b, n_layers, d = len(batch.samples), block.shape[0], block.shape[2]
    res = GeometryPartial(batch.samples, np.full((n_b, n_layers, 2, 2), np.nan),
                          np.full((n_b, n_layers, 2, 2), np.nan), np.zeros((n_b, n_layers, 2, 2), np.int64),
                          np.full((n_b, n_layers, 2, 2, d), np.nan, np.float32), np.zeros((0, 5)),
                          np.zeros((n_b, 2, n_layers, cka_tokens, cka_tokens), np.float32),
                          np.zeros((n_b, 2, n_layers, cka_tokens), bool), np.zeros((n_b, n_layers), bool))
    # the same tokens at every layer: chosen once per sample
    cka_rows = [[cka_token_subset(int(mask[a:b].sum()), cka_tokens, int(sample)) for mask in (visual, text)]
                for sample, (a, b) in zip(batch.samples, bounds)]
    state = _worker_pools(pass_key)
    massive = []
    for li in range(n_layers):
        pools = state.pools.setdefault(layer_start + li, [(RowAccumulator(d), RowAccumulator(d))
                                                          for _ in range(2)])
        for si, (a, b) in enumerate(bounds):
            g = sample_layer_geometry(block[li, a:b], visual[a:b], text[a:b], k, pools, cka_rows[si], cka_tokens)
            res.er[si, li], res.icc[si, li], res.n_tokens[si, li], res.pooled[si, li] = \
                g.er, g.icc, g.n_tokens, g.pooled
            res.cka_gram[si, :, li], res.cka_heavy[si, :, li] = g.cka_gram, g.cka_heavy
            res.nonfinite[si, li] = not g.finite
            if g.massive.size:
                massive.append(np.column_stack([np.full(g.massive.size, batch.samples[si]),
                                                batch.offset + lo + a + g.massive,
                                                np.full(g.massive.size, layer_start + li),
                                                g.modality, g.ratio]))
    state.batches.append(batch_id)
    if massive:
        res.massive = np.concatenate(massive)
    return res


def _token_span(row: list[np.ndarray], lo: int, hi: int) -> np.ndarray:
    """Tokens ``[lo, hi)`` of consecutive chunks (layers, tokens, d), copying only that span."""
    pieces, start = [], 0
    for chunk in row:
        stop = start + chunk.shape[1]
        if stop > lo and start < hi:
            pieces.append(chunk[:, max(lo - start, 0):min(hi, stop) - start])
        start = stop
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)


# ------------------------------------------------------------------------------ pooled moments on the workers

@dataclass
class _WorkerPools:
    """One worker thread's pooled accumulators for one pass, and the batches they hold."""

    pools: dict[int, list[tuple[RowAccumulator, RowAccumulator]]] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)


# (pass key, worker address, thread): a worker with several threads keeps one set per thread.
_POOLS: dict[tuple[str, str, int], _WorkerPools] = {}
_POOLS_LOCK = threading.Lock()


def _worker_address() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # a plain call outside any worker
        return ""


def _worker_pools(pass_key: str) -> _WorkerPools:
    with _POOLS_LOCK:
        return _POOLS.setdefault((pass_key, _worker_address(), threading.get_ident()), _WorkerPools())


@dataclass
class _Collected:
    """A worker's pooled moments for a pass: {layer position: [(kept, massive) per modality]}."""

    moments: dict[int, list[tuple[Moments, Moments]]]
    batches: list[int]


def _collect(pass_key: str) -> _Collected:
    """Take this worker's accumulators of ``pass_key`` (all its threads') as moments."""
    address = _worker_address()
    with _POOLS_LOCK:
        mine = [_POOLS.pop(key) for key in list(_POOLS) if key[:2] == (pass_key, address)]
    out = _Collected({}, [])
    for state in mine:
        out.batches += state.batches
        for layer, pools in state.pools.items():
            got = [(kept.moments(), heavy.moments()) for kept, heavy in pools]
            if layer not in out.moments:
                out.moments[layer] = got
                continue
            for (kept, heavy), (more_kept, more_heavy) in zip(out.moments[layer], got):
                kept.merge(more_kept)
                heavy.merge(more_heavy)
    return out


def _pick(collected: _Collected, layer: int, modality: int, dim: int) -> tuple[Moments, Moments, list[int]]:
    kept, heavy = collected.moments.get(layer, [(Moments.empty(dim), Moments.empty(dim))] * 2)[modality]
    return kept, heavy, collected.batches


def _drop_pools(prefix: str) -> None:
    """Forget every accumulator of the passes named ``prefix...`` (after a failure)."""
    with _POOLS_LOCK:
        for key in [key for key in _POOLS if key[0].startswith(prefix)]:
            del _POOLS[key]


def _pooled_effective_rank(*picks: tuple[Moments, Moments, list[int]]) -> tuple[list[float], list[int], list[int]]:
    """([all tokens, no massive] pooled effective rank, [their token counts], the batches merged)
    of one layer and modality, from every worker's moments."""
    kept, heavy, batches = Moments.empty(0), Moments.empty(0), []
    for more_kept, more_heavy, more_batches in picks:
        kept.merge(more_kept)
        heavy.merge(more_heavy)
        batches += more_batches
    no_massive, n_kept = kept.effective_rank(), kept.count
    if heavy.count == 0:
        return [no_massive, no_massive], [n_kept, n_kept], batches
    kept.merge(heavy)
    return [kept.effective_rank(), no_massive], [kept.count, n_kept], batches


# ------------------------------------------------------------------------------ the pass

@dataclass
class GeometryResult:
    """Geometry of a run: per-sample arrays, pooled values and the CKA maps."""

    layers: np.ndarray                      # layer coordinate values
    er_sample: np.ndarray                   # (n, L, 2 modality, 2 variant)
    icc: np.ndarray                         # (n, L, 2, 2)
    n_tokens: np.ndarray                    # (n, L, 2, 2)
    er_pooled: np.ndarray                   # (L, 2, 2)
    n_pooled: np.ndarray                    # (L, 2, 2)
    cka_modality: np.ndarray                # (L, 2 variant)
    cka_layers: np.ndarray                  # (2 modality, 2 variant, L, L)
    massive: np.ndarray                     # (m, 5) sample, token, layer position, modality, ratio
    nonfinite: np.ndarray                   # (n, L) NaN/inf states: the sample left out there
    n_cka: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # pass / pooled_eig / cka wall times


def _hidden_array(hidden: Any):
    import dask.array as da

    data = hidden.data if hasattr(hidden, "data") else hidden
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(1, 4096, -1))
    return data.rechunk({2: -1}) if len(data.chunks[2]) > 1 else data


def geometry(hidden: Any, token_sample: np.ndarray, is_visual: np.ndarray, is_text: np.ndarray,
             ok: np.ndarray, *, client: Any, scratch: str | Path, massive_k: float = 100.0,
             memory_budget: int = 256 << 20, cka_tokens: int = CKA_TOKENS, progress: bool = True) -> GeometryResult:
    """All geometry metrics of a run in one read of its activations.

    Parameters
    ----------
    hidden : xarray.DataArray or dask/numpy array (layer, token, hidden_dim)
    token_sample, is_visual, is_text : per-token coordinates (numpy)
    ok : per-sample mask of the samples to analyse (status ``ok``)
    client : a ``distributed.Client`` (see :func:`open_client`)
    scratch : directory for the memory-mapped pooled states and each finished layer group's
        results: a pass that stopped (killed at a time limit, a failure) resumes from it when run
        again over the same samples; removed once the pass is complete
    massive_k : a token is massive when its norm exceeds ``massive_k`` x the sample-layer median
    memory_budget : bytes per worker for its pooled accumulators and in-flight chunks; sets how
        many layers a pass holds
    cka_tokens : tokens per sample and modality in the layer x layer CKA (:func:`cka_token_subset`);
        the scratch directory holds their Gram matrices, ``n x 2 x L x cka_tokens^2`` float32

    Examples
    --------
    >>> import xarray as xr
    >>> rng = np.random.default_rng(0)
    >>> hidden = xr.DataArray(rng.standard_normal((2, 12, 8)).astype(np.float32),
    ...                       dims=("layer", "token", "hidden_dim"), coords={"layer": [0, 5]})
    >>> token_sample = np.repeat([0, 1], 6)
    >>> visual = np.tile([True] * 4 + [False] * 2, 2)
    >>> with open_client("threads", workers=1) as client:                     # doctest: +SKIP
    ...     geo = geometry(hidden, token_sample, visual, ~visual, np.array([True, True]),
    ...                    client=client, scratch="/tmp/geo-scratch", progress=False)
    >>> geo.er_sample.shape                                                    # doctest: +SKIP
    (2, 2, 2, 2)
    """
    data = _hidden_array(hidden)
    n_layers, _, d = data.shape
    n = len(ok)
    layer_values = np.asarray(getattr(hidden, "layer", np.arange(n_layers)))
    batches = plan_batches(token_sample, ok, data.chunks[1])
    # Chunks cut at the batches' own token spans: a batch whose last sample runs past its chunk's
    # end then receives just those tokens, not the whole next chunk from another worker.
    spans = {0, data.shape[1]} | {b.offset + int(e) for b in batches for e in (b.bounds[0, 0], b.bounds[-1, 1])}
    data = data.rechunk({1: tuple(np.diff(sorted(spans)).tolist())})
    batches = plan_batches(token_sample, ok, data.chunks[1])
    layer_edges = np.concatenate([[0], np.cumsum(data.chunks[0])])
    groups = plan_layer_groups(data.chunks[0], d, max(data.chunks[1], default=1), memory_budget)
    visual, text = np.asarray(is_visual, bool), np.asarray(is_text, bool)
    chunk_grid = data.to_delayed(optimize_graph=True)[:, :, 0]  # (layer chunk, token chunk)

    scratch = Path(scratch)
    resuming = _open_scratch(scratch, _fingerprint(data, layer_values, groups, [massive_k, cka_tokens],
                                                   token_sample, ok, visual, text))
    # Entries of samples without tokens of a modality stay 0 and are never read (see _cka).
    mode = "r+" if resuming else "w+"
    pooled = np.lib.format.open_memmap(scratch / "pooled.npy", mode=mode, dtype=np.float32,
                                       shape=(n_layers, 2, 2, n, d))
    grams = TokenGrams.open(scratch, mode, n, n_layers, cka_tokens)
    shape = (n, n_layers, 2, 2)
    out = GeometryResult(layer_values, np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, np.int64),
                         np.full((n_layers, 2, 2), np.nan), np.zeros((n_layers, 2, 2), np.int64),
                         np.full((n_layers, 2), np.nan), np.full((2, 2, n_layers, n_layers), np.nan),
                         np.zeros((0, 5)), np.zeros((n, n_layers), bool),
                         seconds={"pass": 0.0, "pooled_eig": 0.0, "cka": 0.0})
    bar = _progress(len(batches) * len(groups), progress)
    prefix = f"geometry-{uuid.uuid4().hex}"
    massive: list[np.ndarray] = []
    saved = [scratch / f"layers-{layer_edges[ga]}-{layer_edges[gb]}.npz" for ga, gb in groups]
    if resuming:
        log.info("resuming the geometry pass from %s: %d of %d layer groups done", scratch,
                 sum(path.exists() for path in saved), len(groups))
    completed = False
    try:
        for (ga, gb), path in zip(groups, saved):
            la, lb = int(layer_edges[ga]), int(layer_edges[gb])
            if path.exists():
                massive.append(_load_group(path, out, slice(la, lb)))
                bar.update(len(batches))
                continue
            group = _GroupPass(client, chunk_grid[ga:gb], d, batches, visual, text, massive_k, pooled, grams,
                               out, la, lb, bar)
            for attempt in range(2):
                if group.run(f"{prefix}-{ga}-{attempt}"):
                    break
                log.warning("layers %s-%s: a worker was lost with its pooled moments; running these layers "
                            "again", layer_values[la], layer_values[lb - 1])
            else:
                raise GapError(f"layers {layer_values[la]}-{layer_values[lb - 1]}: workers kept "
                               "failing during the geometry pass; see the Dask worker logs")
            group_massive = np.concatenate(group.massive) if group.massive else np.zeros((0, 5))
            pooled.flush()  # the group's pooled states are on disk before its results say it is done
            grams.flush()
            _save_group(path, out, slice(la, lb), group_massive)
            massive.append(group_massive)
        started = time.perf_counter()
        out.cka_modality, out.cka_layers, out.n_cka = _cka(pooled, grams, out.n_tokens)
        out.seconds["cka"] = time.perf_counter() - started
        completed = True
    finally:
        bar.close()
        del pooled, grams
        client.run(_drop_pools, prefix, on_error="ignore")  # a lost worker must not hide the first error
        if completed:  # otherwise the next pass over the same samples resumes from here
            shutil.rmtree(scratch, ignore_errors=True)
    out.massive = np.concatenate(massive) if massive else np.zeros((0, 5))
    if out.nonfinite.any():
        bad = np.flatnonzero(out.nonfinite.any(axis=1))
        log.warning("%d samples have NaN/inf hidden states (a damaged store? gap store verify --data), left "
                    "out of the geometry at those layers: %s", bad.size, ", ".join(
                        f"sample {s} layers {layer_values[out.nonfinite[s]].tolist()}" for s in bad[:5]))
    return out


def _fingerprint(data: Any, layer_values: np.ndarray, groups: list[tuple[int, int]], parameters: list[float],
                 *token_arrays: np.ndarray) -> str:
    """What a stopped pass's saved groups depend on: the samples, their tokens and the plan."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([SCRATCH_FORMAT, list(data.shape), list(data.chunks[0]),
                                        np.asarray(layer_values).tolist(), groups, parameters]).encode())
    for array in token_arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _open_scratch(scratch: Path, fingerprint: str) -> bool:
    """True when ``scratch`` holds a stopped pass over the same samples; else make it empty."""
    stamp = scratch / "fingerprint"
    maps = ("pooled.npy", "cka_gram.npy", "cka_heavy.npy")  # a kill may come between their creations
    if stamp.exists() and stamp.read_text() == fingerprint and all((scratch / m).exists() for m in maps):
        return True
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return False


def _save_group(path: Path, out: GeometryResult, layers: slice, massive: np.ndarray) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        np.savez(f, er=out.er_sample[:, layers], icc=out.icc[:, layers], n_tokens=out.n_tokens[:, layers],
                 er_pooled=out.er_pooled[layers], n_pooled=out.n_pooled[layers], massive=massive,
                 nonfinite=out.nonfinite[:, layers])
    os.replace(partial, path)  # a group is either saved whole or not at all


def _load_group(path: Path, out: GeometryResult, layers: slice) -> np.ndarray:
    with np.load(path) as saved:
        out.er_sample[:, layers], out.icc[:, layers] = saved["er"], saved["icc"]
        out.n_tokens[:, layers] = saved["n_tokens"]
        out.er_pooled[layers], out.n_pooled[layers] = saved["er_pooled"], saved["n_pooled"]
        out.nonfinite[:, layers] = saved["nonfinite"]
        return saved["massive"]


class _GroupPass:
    """One pass over the tokens for the layers ``[la, lb)``: tasks, then the pooled ranks."""

    def __init__(self, client: Any, chunks: np.ndarray, dim: int, batches: list[Batch], visual: np.ndarray,
                 text: np.ndarray, massive_k: float, pooled: np.ndarray, grams: TokenGrams, out: GeometryResult,
                 la: int, lb: int, bar: Any) -> None:
        self.client, self.batches, self.visual, self.text, self.k = client, batches, visual, text, massive_k
        self.pooled, self.grams, self.out, self.la, self.lb, self.bar = pooled, grams, out, la, lb, bar
        self.chunks, self.dim = chunks, dim  # the group's delayed chunks (layer chunk, token chunk)
        self.massive: list[np.ndarray] = []

    def run(self, key: str) -> bool:
        """True when every batch's tokens reached the pooled ranks exactly once."""
        from dask import delayed
        from distributed import as_completed

        client, out, lsl = self.client, self.out, slice(self.la, self.lb)
        tasks = []
        for i, batch in enumerate(self.batches):
            parts = [list(row[batch.chunk_lo:batch.chunk_hi + 1]) for row in self.chunks]
            span = slice(batch.offset, batch.offset + int(batch.bounds[:, 1].max()))
            tasks.append(delayed(geometry_task)(parts, batch, i, self.la, self.visual[span], self.text[span],
                                                self.k, key, self.grams.tokens))
        self.massive = []
        started = time.perf_counter()
        for future in as_completed(client.compute(tasks)):
            part: GeometryPartial = future.result()
            future.release()
            rows = part.samples
            out.er_sample[rows, lsl], out.icc[rows, lsl], out.n_tokens[rows, lsl] = part.er, part.icc, part.n_tokens
            out.nonfinite[rows, lsl] = part.nonfinite
            self.pooled[lsl, :, :, rows] = np.moveaxis(part.pooled, 0, 3)
            self.grams.gram[rows, :, lsl], self.grams.heavy[rows, :, lsl] = part.cka_gram, part.cka_heavy
            if part.massive.size:
                self.massive.append(part.massive)
            self.bar.update(1)
        out.seconds["pass"] += time.perf_counter() - started
        started = time.perf_counter()
        # Each worker's moments stay where they are; the d x d eigendecompositions run on the
        # workers too: in parallel, one BLAS thread each (a multi-threaded LAPACK on a busy
        # machine spends its time spinning).  A pinned task may run elsewhere once its worker is
        # gone: it then finds nothing, which the batch count below catches.
        collected = [client.submit(_collect, key, workers=[w], allow_other_workers=True, pure=False)
                     for w in client.nthreads()]
        ranks = {(li, m): client.submit(_pooled_effective_rank,
                                        *[client.submit(_pick, c, li, m, self.dim, pure=False) for c in collected],
                                        pure=False)
                 for li in range(self.la, self.lb) for m in range(2)}
        complete = True
        for (li, m), future in ranks.items():
            out.er_pooled[li, m], out.n_pooled[li, m], merged = future.result()
            complete &= sorted(merged) == list(range(len(self.batches)))
        out.seconds["pooled_eig"] += time.perf_counter() - started
        return complete


def _cka(pooled: np.ndarray, grams: TokenGrams, ntok: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """CKA: sample-paired visual vs text per layer; layer x layer per modality (same tokens)."""
    n_layers = pooled.shape[0]
    cka_mod = np.full((n_layers, 2), np.nan)
    n_cka: dict[str, int] = {}
    # Rows: samples with tokens of the modality at every layer (paired rows throughout).
    complete = [[np.flatnonzero((ntok[:, :, m, v] > 0).all(axis=1)) for v in range(2)] for m in range(2)]
    for v, variant in enumerate(VARIANTS):
        both = np.intersect1d(complete[0][v], complete[1][v])
        n_cka[f"modality_{variant}"] = int(both.size)
        for layer in range(n_layers):
            x = np.asarray(pooled[layer, 0, v][both])
            y = np.asarray(pooled[layer, 1, v][both])
            cka_mod[layer, v] = cka_matrix([x, y])[0, 1]
    # a sample's CKA tokens at every layer (none where its states were not finite: left out)
    cka_lay, used = layer_cka(grams, ntok[:, :, :, 0].min(axis=1))
    for m, modality in enumerate(MODALITIES):
        for v, variant in enumerate(VARIANTS):
            n_cka[f"layers_{modality}_{variant}"] = int(used[m, v])
    return cka_mod, cka_lay, n_cka


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="geometry", unit="task", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------ clusters

# Workers allocate and free megabyte arrays per sample-layer.  Dask's default for its workers
# (MALLOC_TRIM_THRESHOLD_=64 KiB) hands that memory back to the OS at once, so every array is
# page-faulted in again: a third of the CPU time went to the kernel at 576 x 2048.  Keeping up to
# 64 MiB in the heap (and serving arrays under 16 MiB from it) removes that; big chunks still
# come from mmap and go back when freed.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(16 << 20)}

def _nanny_environ_export() -> str:
    """A shell line giving remote nannies our malloc settings (dask's other defaults kept)."""
    import dask
    import distributed  # noqa: F401  (loads distributed's config defaults)

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **MALLOC_ENV}
    # Dask parses an environment value with literal_eval, so the dict keeps its upper-case keys.
    return f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON={shlex.quote(repr(environ))}"


@contextmanager
def open_client(scheduler: str = "local", *, workers: int | None = None, slurm: Any = None,
                setup: Sequence[str] = (), jobs: int = 1,
                scratch: str | Path | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, closed (with its cluster) on exit.

    - ``local``: a LocalCluster of one single-threaded worker process per core, listening on
      127.0.0.1 only, no dashboard (nobody else on the machine can connect).
    - ``threads``: the same in this process (no processes to start: tests, small runs).
    - ``slurm``: dask-jobqueue's SLURMCluster with ``jobs`` jobs of ``slurm`` (a
      :class:`schemas.config.SlurmAnalysisConfig`, after the shell lines ``setup``, e.g. module
      loads); traffic is TLS with throw-away certificates
      (``Security.temporary()``), so other users of the cluster cannot connect and run code.
    - an address (``tcp://HOST:PORT``, ``tls://...``): an existing scheduler.

    Examples
    --------
    >>> with open_client("threads", workers=1) as client:       # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler in ("local", "threads"):
        n = workers or max(1, len(os.sched_getaffinity(0)))
        # In-process workers talk over inproc://, which no other process can reach at all; the
        # scheduler's HTTP routes (unauthenticated) go to a free loopback port in both modes.
        network = {"host": "127.0.0.1"} if scheduler == "local" else {}
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC_ENV.items()}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=scheduler == "local",
                                   dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.WARNING, **network)
        client = Client(cluster)
    elif scheduler == "slurm":
        cluster, security = slurm_cluster(slurm, setup=setup, scratch=scratch)
        cluster.scale(jobs=jobs)
        client = Client(cluster, security=security)
    elif "://" in scheduler:
        cluster, client = None, Client(scheduler)
    else:
        raise GapError(f"--scheduler {scheduler!r}: use local, slurm, threads or an address like tcp://HOST:PORT")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def slurm_cluster(analysis: Any = None, *, setup: Sequence[str] = (),
                  scratch: str | Path | None = None) -> tuple[Any, Any]:
    """A TLS-secured SLURMCluster for the analysis, and its Security (jobs not yet started).

    ``analysis`` is a :class:`schemas.config.SlurmAnalysisConfig` (partition, cpus, mem, time,
    extra).  One worker process per CPU, one thread each (BLAS threads stay at one per process).
    Memory: ``mem`` per job, or (``mem: null``) ``--mem-per-cpu`` in ``extra`` times ``cpus``
    (see :func:`_worker_memory`).

    Examples
    --------
    >>> cluster, security = slurm_cluster(scratch="/shared/tmp")   # doctest: +SKIP
    >>> print(cluster.job_script())                                 # doctest: +SKIP
    """
    from dask_jobqueue import SLURMCluster
    from distributed.security import Security

    from schemas.config import SlurmAnalysisConfig

    cfg = analysis or SlurmAnalysisConfig()
    # dask-jobqueue prefixes "#SBATCH " itself
    extra = [item.strip().removeprefix("#SBATCH").strip() for item in cfg.extra]
    memory, job_mem = _worker_memory(cfg.mem, extra, cfg.cpus)
    security = Security.temporary()
    # job_mem None: no --mem line (sbatch refuses it beside --mem-per-cpu); else Slurm's own
    # reading of "32G" (GiB) rather than dask's
    kwargs: dict[str, Any] = {"job_mem": job_mem} if job_mem else {"job_directives_skip": ["--mem="]}
    if scratch is not None:
        if re.search(r"[^A-Za-z0-9_./+=,@-]", str(scratch)):
            # dask-jobqueue writes these paths into the workers' job script unquoted
            raise GapError(f"{scratch}: the Slurm analysis scheduler needs a run path of letters, digits "
                           "and _./+=,@- only (dask-jobqueue does not quote it); use --scheduler local")
        Path(scratch).mkdir(mode=0o750, parents=True, exist_ok=True)  # its TLS keys go there
        kwargs["shared_temp_directory"] = str(scratch)
        kwargs["log_directory"] = str(Path(scratch) / "logs")
    cluster = SLURMCluster(cores=cfg.cpus, processes=cfg.cpus, memory=memory,
                           walltime=cfg.time, queue=cfg.partition, job_extra_directives=extra,
                           # dask-jobqueue writes the interpreter into the job script unquoted
                           python=shlex.quote(sys.executable),
                           job_script_prologue=[*setup, _nanny_environ_export()],
                           security=security, protocol="tls",
                           # HTTP routes (scheduler's and workers') are unauthenticated: loopback only.
                           scheduler_options={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                           worker_extra_args=["--dashboard-address", "127.0.0.1:0"], **kwargs)
    return cluster, security


def _worker_memory(mem: str | None, extra: Sequence[str], cpus: int) -> tuple[str, str | None]:
    """The memory of one analysis job for dask (``memory``) and for its ``--mem`` line (None: none).

    ``slurm.analysis.mem``, or with ``mem: null`` the ``--mem-per-cpu`` of ``extra`` times
    ``cpus`` (sites that refuse per-node memory), checked as the sbatch scripts are
    (:func:`schemas.config.slurm_memory_per`).

    >>> _worker_memory("32G", [], 4)
    ('32G', '32G')
    >>> _worker_memory(None, ["--mem-per-cpu=4G"], 4)
    ('17179869184', None)
    """
    per = slurm_memory_per(mem, list(extra), "slurm.analysis")
    if mem is not None:
        return mem, mem
    size = SLURM_SIZE.fullmatch(per[0][2]) if per and per[0][1] == "cpu" else None
    if size is None:
        raise GapError("slurm.analysis.mem is null: the Slurm analysis scheduler sizes its workers from it or "
                       "from --mem-per-cpu=SIZE in slurm.analysis.extra; set one (e.g. 32G) or use "
                       "--scheduler local")
    number, unit = size.groups()
    return str(int(number) * 1024 ** " KMGT".index(unit or "M") * cpus), None

"""The Dask geometry pass on a real store, against direct per-sample SVD / cosine / Gram computations."""

from __future__ import annotations

import numpy as np
import pytest

from analysis_fixtures import make_run
from analyze.pipeline import geometry, open_client, plan_batches, plan_layer_groups, sample_runs
from reference_metrics import ref_cka, ref_effective_rank, ref_icc, ref_minibatch_cka
from store import open_run


@pytest.fixture(scope="module")
def client():
    with open_client("threads", workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("geo") / "run")


def _massive(x: np.ndarray, k: float = 100.0) -> np.ndarray:
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return norms > k * np.median(norms)


@pytest.fixture(scope="module")
def geo(run, client, tmp_path_factory):
    path, _ = run
    ds = open_run(path, chunks=32)
    hidden = ds.hidden.chunk({"token": 32})  # regular chunks: samples straddle chunk boundaries
    assert (np.cumsum(hidden.data.chunks[1])[:, None] != ds.token_start.values[None, :]).all(axis=0).any()
    ok = ds.status.values.astype(str) == "ok"
    # A budget of one layer per pass: four passes, each reading its own layer's chunks.
    return geometry(hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                    client=client, scratch=tmp_path_factory.mktemp("scratch") / "s",
                    memory_budget=1, progress=False)


def test_per_sample_metrics_match_direct_computation(run, geo):
    path, truth = run
    order = sorted(truth.hidden)
    for pos, index in enumerate(range(14)):
        if index in truth.failed:
            assert np.isnan(geo.er_sample[pos]).all() and np.isnan(geo.icc[pos]).all()
            continue
        h = truth.hidden[index].astype(np.float64)
        for li in range(4):
            heavy = _massive(h[li])
            for m, mask in enumerate((truth.visual[index], truth.text[index])):
                for v, rows in enumerate((mask, mask & ~heavy)):
                    expected = ref_effective_rank(h[li][rows])
                    assert geo.er_sample[pos, li, m, v] == pytest.approx(expected, rel=1e-4)
                    assert geo.icc[pos, li, m, v] == pytest.approx(ref_icc(h[li][rows]), rel=1e-4, abs=1e-6)
                    assert geo.n_tokens[pos, li, m, v] == rows.sum()
    assert order  # the run has analysed samples


def test_pooled_effective_rank_is_svd_of_all_tokens(run, geo):
    _, truth = run
    for li in range(4):
        for m, key in enumerate(("visual", "text")):
            for v in range(2):
                rows = []
                for i, h in truth.hidden.items():
                    mask = getattr(truth, key)[i]
                    if v:
                        mask = mask & ~_massive(h[li].astype(np.float64))
                    rows.append(h[li][mask].astype(np.float64))
                x = np.concatenate(rows)
                assert geo.er_pooled[li, m, v] == pytest.approx(ref_effective_rank(x), rel=1e-4)
                assert geo.n_pooled[li, m, v] == len(x)


def test_massive_tokens_recorded_and_excluded(run, geo):
    _, truth = run
    records = {(int(s), int(layer), int(mod)) for s, _, layer, mod, _ in geo.massive}
    n_ok = 14 - len(truth.failed)
    # every sample's BOS at every layer ("other"), plus sample 3's visual token at layer 2
    assert len(geo.massive) == n_ok * 4 + 1
    assert (3, 2, 0) in records
    assert all(mod == 2 for s, layer, mod in records if (s, layer) != (3, 2))
    assert geo.n_tokens[3, 2, 0, 0] - geo.n_tokens[3, 2, 0, 1] == 1
    assert (geo.massive[:, 4] > 100).all()


def test_cka_matches_gram_matrix_reference(run, geo):
    _, truth = run
    idx = sorted(truth.hidden)
    for li in range(4):
        x = np.stack([truth.hidden[i][li][truth.visual[i]].astype(np.float64).mean(0) for i in idx])
        y = np.stack([truth.hidden[i][li][truth.text[i]].astype(np.float64).mean(0) for i in idx])
        assert geo.cka_modality[li, 0] == pytest.approx(ref_cka(x, y), rel=1e-4)
    assert geo.n_cka["modality_all"] == len(idx)


def _layer_cka_reference(truth, modality: str, k: int, no_massive: bool = False) -> tuple[np.ndarray, int]:
    """Minibatch CKA from the raw states: each sample's chosen tokens of the modality, the same
    at every layer (without the massive variant: those massive at any layer left out)."""
    from analyze.cka_maps import cka_token_subset

    batches = []
    for pos in sorted(truth.hidden):  # no failed sample before an ok one changes positions here
        h = truth.hidden[pos].astype(np.float64)
        rows = np.flatnonzero(getattr(truth, modality)[pos])
        rows = rows[cka_token_subset(rows.size, k, pos)]
        if no_massive:
            rows = rows[~np.any([_massive(h[li])[rows] for li in range(4)], axis=0)]
        if rows.size >= 4:
            batches.append([h[li][rows] for li in range(4)])
    return ref_minibatch_cka(batches), len(batches)


def test_layer_cka_is_the_minibatch_cka_of_the_same_tokens(run, geo):
    _, truth = run
    for m, modality in enumerate(("visual", "text")):
        for v in range(2):
            expected, n = _layer_cka_reference(truth, modality, 64, no_massive=bool(v))
            np.testing.assert_allclose(geo.cka_layers[m, v], expected, rtol=1e-4)  # float32 Grams
            assert geo.n_cka[f"layers_{modality}_{('all', 'nomassive')[v]}"] == n
    # sample 3's massive visual token (layer 2 only) is out of its minibatch at every layer
    assert not np.allclose(geo.cka_layers[0, 0], geo.cka_layers[0, 1])


def test_layer_cka_of_a_token_subset(run, client, tmp_path):
    path, truth = run
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    small = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                     client=client, scratch=tmp_path / "s", cka_tokens=5, progress=False)
    expected, n = _layer_cka_reference(truth, "visual", 5)
    np.testing.assert_allclose(small.cka_layers[0, 0], expected, rtol=1e-4)
    assert n == len(truth.hidden)  # 6..12 visual tokens each: 5 of them from every sample


def test_task_size_does_not_change_results(run, client, geo, tmp_path):
    # Chunks of 16 tokens: 13 batches, joined into 6 tasks of 2-3 samples (the run is split into
    # at least two tasks per worker); the fixture's 32-token chunks run one chunk per task.
    path, _ = run
    ds = open_run(path, chunks=16)
    ok = ds.status.values.astype(str) == "ok"
    joined = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                      client=client, scratch=tmp_path / "s", memory_budget=1, progress=False)
    for name in ("er_sample", "icc", "er_pooled", "cka_modality", "cka_layers"):
        np.testing.assert_allclose(getattr(joined, name), getattr(geo, name), rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(joined.n_tokens, geo.n_tokens)


def test_each_store_chunk_is_read_once(run, client, tmp_path, monkeypatch):
    import zarr

    path, _ = run
    calls = []
    original = zarr.Array.__getitem__

    def counting(self, selection):
        if self.ndim == 3:
            calls.append(tuple((s.start, s.stop) for s in selection))
        return original(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
             client=client, scratch=tmp_path / "s", memory_budget=1, progress=False)
    reads = [c for c in calls if c[1][1] > c[1][0]]
    assert len(reads) == len(set(reads))  # no region twice
    by_layer: dict[int, list] = {}
    for (l0, _), (t0, t1), _ in reads:
        by_layer.setdefault(l0, []).append((t0, t1))
    for spans in by_layer.values():  # and no two reads of a layer overlap
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_plans():
    samples, starts, stops = sample_runs(np.array([0, 0, 2, 2, 2]))
    assert samples.tolist() == [0, 2] and starts.tolist() == [0, 2] and stops.tolist() == [2, 5]
    with pytest.raises(Exception, match="contiguous"):
        sample_runs(np.array([0, 1, 0]))
    # a failed sample (1) is skipped; sample 2 starts in chunk 0 and runs into chunk 2
    batches = plan_batches(np.array([0, 0, 1, 2, 2, 2, 2, 2, 3]), np.array([1, 0, 1, 1], bool), [4, 2, 3])
    assert [(b.chunk_lo, b.chunk_hi, b.samples.tolist()) for b in batches] == [(0, 2, [0, 2]), (2, 2, [3])]
    assert batches[1].bounds.tolist() == [[2, 3]]
    assert plan_layer_groups([1] * 5, 8, 10, 1) == [(i, i + 1) for i in range(5)]
    assert plan_layer_groups([2, 2], 8, 10, 1 << 30) == [(0, 2)]


def test_lost_pooled_moments_rerun_the_layer_group(run, client, geo, tmp_path, monkeypatch, caplog):
    # A worker that dies takes its pooled accumulators along.  Here the first collection of each
    # layer group misses a worker that holds some (the cluster is in this process, so its
    # accumulators can be looked at); the batch count catches it and the group runs again.
    import analyze.pipeline as pipeline

    path, _ = run
    workers, dropped = client.nthreads, []

    def missing_one():
        live = dict(workers())
        holding = {(key, address) for (key, address, _) in pipeline._POOLS
                   if key.endswith("-0") and key not in {k for k, _ in dropped}}
        if holding:  # a first attempt: one worker holding its moments is gone
            dropped.append(holding.pop())
            del live[dropped[-1][1]]
        return live

    monkeypatch.setattr(client, "nthreads", missing_one)
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    again = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                     client=client, scratch=tmp_path / "s", memory_budget=1, progress=False)
    assert len(dropped) == 4 and "running these layers again" in caplog.text
    np.testing.assert_allclose(again.er_pooled, geo.er_pooled, rtol=1e-9)
    np.testing.assert_array_equal(again.n_pooled, geo.n_pooled)
    assert len(again.massive) == len(geo.massive)
    assert not pipeline._POOLS  # the accumulators nobody collected are gone too


def test_workers_that_keep_losing_moments_stop_the_pass(run, client, tmp_path, monkeypatch):
    import analyze.pipeline as pipeline

    path, _ = run
    monkeypatch.setattr(client, "nthreads", dict)  # no worker to collect from, every time
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    with pytest.raises(Exception, match="workers kept failing"):
        geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                 client=client, scratch=tmp_path / "s", memory_budget=1, progress=False)
    assert not pipeline._POOLS


def test_worker_processes_give_the_same_results(run, geo, tmp_path):
    # Separate worker processes: each keeps its own pooled accumulators, which must be collected
    # from the process that holds them (in-process workers share one memory).
    path, _ = run
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    with open_client("local", workers=2) as processes:
        again = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                         client=processes, scratch=tmp_path / "s", memory_budget=1, progress=False)
    for name in ("er_sample", "icc", "er_pooled", "cka_modality", "cka_layers"):
        np.testing.assert_allclose(getattr(again, name), getattr(geo, name), rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(again.n_pooled, geo.n_pooled)


def test_a_stopped_pass_resumes_from_its_finished_layer_groups(run, client, geo, tmp_path, monkeypatch):
    # Killed after two of the four layer groups (one layer each): the next pass over the same
    # samples runs only the last two and gives what an uninterrupted pass gives.
    import analyze.pipeline as pipeline

    path, _ = run
    ds = open_run(path, chunks=32)
    ok = ds.status.values.astype(str) == "ok"
    original, ran = pipeline._GroupPass.run, []

    def stopping_after_two(self, key):
        if len(ran) == 2:
            raise KeyboardInterrupt  # what a time limit's signal leaves behind
        ran.append(self.la)
        return original(self, key)

    def args(scratch):
        return dict(client=client, scratch=scratch, memory_budget=1, progress=False)

    monkeypatch.setattr(pipeline._GroupPass, "run", stopping_after_two)
    with pytest.raises(KeyboardInterrupt):
        geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                 **args(tmp_path / "s"))
    assert sorted(p.name for p in (tmp_path / "s").glob("layers-*.npz")) == ["layers-0-1.npz", "layers-1-2.npz"]

    ran.clear()
    monkeypatch.setattr(pipeline._GroupPass, "run", lambda self, key: ran.append(self.la) or original(self, key))
    resumed = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                       **args(tmp_path / "s"))
    assert ran == [2, 3] and not (tmp_path / "s").exists()
    for name in ("er_sample", "icc", "er_pooled", "cka_modality", "cka_layers"):
        np.testing.assert_allclose(getattr(resumed, name), getattr(geo, name), rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(resumed.n_tokens, geo.n_tokens)
    np.testing.assert_array_equal(resumed.massive[np.lexsort(resumed.massive.T)], geo.massive[np.lexsort(geo.massive.T)])

    # Other samples (one left out): nothing of the stopped pass is reused.
    monkeypatch.setattr(pipeline._GroupPass, "run", stopping_after_two)
    ran.clear()
    with pytest.raises(KeyboardInterrupt):
        geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                 **args(tmp_path / "t"))
    fewer = ok.copy()
    fewer[np.flatnonzero(ok)[0]] = False
    ran.clear()
    monkeypatch.setattr(pipeline._GroupPass, "run", lambda self, key: ran.append(self.la) or original(self, key))
    geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, fewer, **args(tmp_path / "t"))
    assert ran == [0, 1, 2, 3]

    # A scratch missing one of its memory maps (killed while creating them) starts afresh.
    monkeypatch.setattr(pipeline._GroupPass, "run", stopping_after_two)
    ran.clear()
    with pytest.raises(KeyboardInterrupt):
        geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                 **args(tmp_path / "u"))
    (tmp_path / "u" / "cka_heavy.npy").unlink()
    ran.clear()
    monkeypatch.setattr(pipeline._GroupPass, "run", lambda self, key: ran.append(self.la) or original(self, key))
    again = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values, ok,
                     **args(tmp_path / "u"))
    assert ran == [0, 1, 2, 3]
    np.testing.assert_allclose(again.cka_layers, geo.cka_layers, rtol=1e-9)


def test_non_finite_states_leave_the_sample_out_at_that_layer_only(client, tmp_path):
    # Capture marks NaN/inf samples failed, so NaN in a store is damage: the pass goes on without
    # that sample at that layer, and says so.
    import xarray as xr

    rng = np.random.default_rng(3)
    n, per, layers, d = 5, 12, 3, 8
    clean = rng.standard_normal((layers, n * per, d)).astype(np.float32)
    token_sample = np.repeat(np.arange(n), per)
    visual = np.tile([True] * 8 + [False] * 4, n)
    damaged = clean.copy()
    damaged[1, 2 * per + 3, 5] = np.nan  # sample 2 at layer position 1

    def run(values, ok, name):
        hidden = xr.DataArray(values, dims=("layer", "token", "hidden_dim"), coords={"layer": [0, 4, 8]})
        return geometry(hidden, token_sample, visual, ~visual, ok, client=client, scratch=tmp_path / name,
                        progress=False)

    got = run(damaged, np.ones(n, bool), "damaged")
    ref = run(clean, np.ones(n, bool), "clean")
    without = run(clean, np.arange(n) != 2, "without")
    assert got.nonfinite.tolist() == [[s == 2 and li == 1 for li in range(layers)] for s in range(n)]
    assert np.isnan(got.er_sample[2, 1]).all() and (got.n_tokens[2, 1] == 0).all()
    np.testing.assert_allclose(got.er_sample[2, [0, 2]], ref.er_sample[2, [0, 2]], rtol=1e-6)
    np.testing.assert_allclose(got.er_pooled[1], without.er_pooled[1], rtol=1e-6)  # left out there
    np.testing.assert_allclose(got.er_pooled[[0, 2]], ref.er_pooled[[0, 2]], rtol=1e-6)  # kept elsewhere
    # the paired maps need the sample at every layer: the same as without it
    np.testing.assert_allclose(got.cka_layers, without.cka_layers, rtol=1e-6)
    np.testing.assert_allclose(got.cka_modality, without.cka_modality, rtol=1e-6)

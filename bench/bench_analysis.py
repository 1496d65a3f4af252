"""Analysis benchmarks: geometry speed vs a per-sample numpy baseline, and peak memory out of core.

``analysis_speedup``: the same geometry metrics on both sides (per-sample effective rank and ICC,
with and without massive tokens, per modality; the pooled effective rank per layer and modality;
sample-paired CKA and the layer x layer maps, the latter a minibatch CKA over 64 tokens per sample)
on LLaVA-shaped samples (576 visual + 40 question
+ 24 other tokens, hidden 2048, bf16 store), extrapolated to 1000 samples x 48 layers:

- ours: the Dask pass on a local cluster (one single-threaded worker per core), the median of
  ``repeats`` passes after one untimed pass (the workers' first pass grows their heaps, a
  one-off); its per-sample-layer cost scales linearly, its d x d eigendecompositions for the
  pooled effective rank are a fixed cost per layer.
- the baseline, the earlier prototype's style, run as one single-threaded process per core at
  once: an SVD per sample (float32, as stored), an O(N^2) cosine matrix for ICC, Gram-matrix
  CKA, and the pooled effective rank as an SVD of all pooled centred tokens, whose cost is
  modelled as LAPACK computes it for a tall matrix: a QR factorisation linear in the rows (the
  per-sample share, timed on a pool of about 1.9 d rows) plus an SVD of the d x d R factor, a
  fixed cost per layer and modality (timed).  The baseline's per-sample time is the median over
  ``measured`` sample-layers per process.

``analysis_floor_ms_per_sample_layer`` and ``analysis_speedup_bound``: what no exact float64
method gets below, timed in the baseline's processes on the same samples (:func:`kernel_floor`:
the pooled scatter's ``syrk``, the Gram matrix and its eigenvalues), and the speedup that floor
would give.  float32 products would halve it but are not exact enough: the Gram route squares
the spectrum, and on a steep (``s_i ~ i^-2``) or rank-deficient sample float32 moves the
effective rank by 1e-3 to 1e-2 (``analysis_float32_er_max_rel_err``, :func:`float32_products_error`).

The values of both are compared (``analysis_er_max_rel_diff``, ``analysis_icc_cka_max_abs_diff``;
the pooled effective ranks on the tall visual pool and on a question-token pool with fewer rows
than features, where round-off would show).  The default 26 samples make four task batches of
6-7 samples, even for two workers (with 16, one worker idles through a third of the pass, an
artefact of a small store); the start and the tail of each short pass still count in our
per-sample time, so ours is somewhat overstated for a 1000-sample run.

``analysis_peak_gib``: peak resident memory of the whole process tree of ``gap analyze`` (client,
nannies, workers) on a store at least three times larger than that peak (``analysis_store_gib``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_VISUAL, N_TEXT, N_OTHER, HIDDEN = 576, 40, 24, 2048
TARGET_SAMPLES, TARGET_LAYERS = 1000, 48


def _spec(layers: int, hidden: int, n_total: int, encoding: str):
    from schemas.config import config_from_dict
    from store.writer import RunSpec

    cfg = config_from_dict({"model": {"path": "/models/bench"}, "data": {"name": "synthetic"}})
    return RunSpec(config=cfg, model_info={"family": "bench", "n_layers": layers}, layers=list(range(layers)),
                   hidden_size=hidden, hidden_encoding=encoding, n_total=n_total)


def _masks(n_other: int, n_visual: int, n_text: int) -> tuple[np.ndarray, np.ndarray, int]:
    n = n_other + n_visual + n_text
    visual = np.zeros(n, bool)
    visual[n_other:n_other + n_visual] = True
    text = np.zeros(n, bool)
    text[n_other + n_visual:] = True
    return visual, text, n


def write_store(path: Path, samples: int, layers: int, hidden: int, n_visual: int, n_text: int,
                n_other: int, encoding: str, seed: int = 0, distinct: int = 0) -> None:
    """Samples of activations with a decaying spectrum and a massive first token.

    ``distinct`` > 0 reuses that many random blocks, scaled per sample (fast for large stores).
    """
    from schemas.run import SampleRecord
    from store.encoding import float32_to_bf16_bits
    from store.writer import RunWriter

    rng = np.random.default_rng(seed)
    visual, text, n = _masks(n_other, n_visual, n_text)
    scale = (1.0 / np.sqrt(1 + np.arange(hidden))).astype(np.float32)  # a decaying spectrum

    def block() -> np.ndarray:
        x = rng.standard_normal((layers, n, hidden), dtype=np.float32) * scale
        x[:, 0] *= 500.0  # BOS-like massive activation
        return x

    pool = [block() for _ in range(distinct)]
    with RunWriter(path, _spec(layers, hidden, samples, encoding)) as writer:
        for i in range(samples):
            x = pool[i % distinct] * np.float32(1 + 0.01 * i) if distinct else block()
            hidden_values = float32_to_bf16_bits(x) if encoding == "bfloat16" else x
            writer.put(SampleRecord(index=i, sample_id=f"bench/{i}", subset="hard",
                                    input_ids=np.arange(n, dtype=np.int32), is_visual=visual, is_text=text,
                                    hidden=hidden_values))


# ------------------------------------------------------------------------------ the baseline

def _er_from_singular_values(s: np.ndarray) -> float:
    s = s[s > s.max() * 1e-7]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _er_svd(x: np.ndarray) -> float:
    return _er_from_singular_values(np.linalg.svd(x - x.mean(0), compute_uv=False))


def _icc_cos(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    return float((c.sum() - len(x)) / (len(x) * (len(x) - 1)))


def baseline_sample_layer(x: np.ndarray, visual: np.ndarray, text: np.ndarray, k: float) -> np.ndarray:
    """(modality, variant, [er, icc]) the prototype's way: SVD and a full cosine matrix each."""
    norms = np.linalg.norm(x, axis=1)
    heavy = norms > k * np.median(norms)
    out = np.full((2, 2, 2), np.nan)
    for m, mask in enumerate((visual, text)):
        for v, rows in enumerate((mask, mask & ~heavy)):
            if v == 1 and not (mask & heavy).any():
                out[m, 1] = out[m, 0]
                continue
            out[m, v] = _er_svd(x[rows]), _icc_cos(x[rows])
    return out


def _hsic_gram(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float((np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3)))


def _cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    return _hsic_gram(x, y) / np.sqrt(_hsic_gram(x, x) * _hsic_gram(y, y))


def baseline_cka(pooled: np.ndarray, tokens: list[list[np.ndarray]], masks: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Modality CKA per layer from ``pooled`` (n, L, modality, d), and the visual/text layer maps
    as minibatch CKA over each sample's CKA tokens (``tokens[sample][layer]``, all tokens kept)."""
    from analyze.cka_maps import CKA_TOKENS, cka_token_subset

    n_layers = pooled.shape[1]
    mod = np.array([_cka_gram(pooled[:, i, 0], pooled[:, i, 1]) for i in range(n_layers)])
    maps = []
    for mask in masks:
        rows = np.flatnonzero(mask)
        picked = [[tokens[s][layer][rows[cka_token_subset(rows.size, CKA_TOKENS, s)]].astype(np.float64)
                   for layer in range(n_layers)] for s in range(len(tokens))]
        h = np.array([[sum(_hsic_gram(x[a], x[b]) for x in picked) for b in range(n_layers)]
                      for a in range(n_layers)])
        maps.append(h / np.sqrt(np.outer(np.diag(h), np.diag(h))))
    return mod, np.array(maps)


# ------------------------------------------------------------------------------ benchmarks

def _warm_up() -> None:
    import analyze.pipeline  # noqa: F401
    import scipy.linalg.blas  # noqa: F401
    import zarr  # noqa: F401


def kernel_floor(x: np.ndarray, visual: np.ndarray, text: np.ndarray) -> float:
    """Seconds of the float64 products that no exact method avoids for one sample-layer.

    The pooled scatter of its visual and question tokens (one ``syrk`` over those rows, d x d),
    the Gram matrix of its centred visual tokens (``syrk``, N x N) and that matrix's eigenvalues.
    Everything else ours does (norms, centring, ICC, reading the store) comes on top.
    """
    from scipy.linalg.blas import dsyrk

    rows = np.tile(x[visual | text].astype(np.float64), (3, 1))  # syrk runs best on many rows
    centred = x[visual].astype(np.float64)
    centred -= centred.mean(axis=0)
    t0 = time.perf_counter()
    dsyrk(1.0, rows.T, trans=0)  # both transposes are Fortran-ordered: BLAS reads them in place
    t_pooled = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    gram = dsyrk(1.0, centred.T, trans=1)
    np.linalg.eigvalsh(gram, UPLO="U")
    return t_pooled + time.perf_counter() - t0


def float32_products_error(seed: int = 0) -> float:
    """Largest relative effective-rank error of float32 Gram products (what would halve the
    floor) against ours, on three bf16 samples of 576 x 2048 that real images produce: a steep
    spectrum (``s_i ~ i^-2``), 300 identical patches (a plain background) and a rank-50 sample.
    """
    from scipy.linalg import lapack

    from analyze.metrics import effective_rank, effective_rank_from_spectrum
    from store.encoding import bf16_bits_to_float32, float32_to_bf16_bits

    rng = np.random.default_rng(seed)
    n, d = N_VISUAL, HIDDEN

    def spectrum(alpha: float) -> np.ndarray:
        u = np.linalg.qr(rng.standard_normal((n, n)))[0]
        v = np.linalg.qr(rng.standard_normal((d, n)))[0]
        return (u * 100 * (1 + np.arange(n)) ** -alpha) @ v.T

    background = spectrum(1.0)
    background[:300] = background[0]
    samples = [spectrum(2.0), background, rng.standard_normal((n, 50)) @ rng.standard_normal((50, d))]
    worst = 0.0
    for x in samples:
        x = bf16_bits_to_float32(float32_to_bf16_bits(x.astype(np.float32)))
        centred = (x - x.mean(axis=0, dtype=np.float64)).astype(np.float32)
        _, diag, off, _, _ = lapack.ssytrd(centred @ centred.T, lower=0)
        eig = np.sort(lapack.dsterf(diag.astype(np.float64), off.astype(np.float64))[0])[1:]  # rank n - 1
        fast = effective_rank_from_spectrum(np.sqrt(np.clip(eig, 0.0, None)))
        exact = effective_rank(x)
        worst = max(worst, abs(fast - exact) / exact)
    return worst


def baseline(run: str, samples: int, layers: int, measured: int, offset: int = 0) -> dict:
    """The prototype-style computation on a few sample-layers of ``run`` (timings and values).

    The pooled effective rank the prototype's way is an SVD of all pooled (centred) tokens.  For
    a tall matrix LAPACK's ``gesdd`` first reduces it by a QR factorisation, whose cost is linear
    in the rows, then takes the SVD of the d x d R factor, a fixed cost per layer and modality.
    Both are timed here on a tall pool (past gesdd's 11 d / 6 rows threshold) and the QR's cost
    per row (``2 d^2 (m - d / 3)`` flops for m rows) gives the per-sample share.
    """
    from store import open_run

    ds = open_run(run)
    visual, text, n_tok = _masks(N_OTHER, N_VISUAL, N_TEXT)
    hidden, starts = ds.hidden.values, ds.token_start.values
    tokens = [[hidden[layer, starts[s]:starts[s] + n_tok] for layer in range(layers)] for s in range(samples)]
    picks = [((offset + j) % samples, (offset + j) % layers) for j in range(measured)]
    per_sample, seconds, floor = [], [], []
    for s, layer in picks:
        t0 = time.perf_counter()
        per_sample.append(baseline_sample_layer(tokens[s][layer], visual, text, 100.0).tolist())
        seconds.append(time.perf_counter() - t0)
        floor.append(kernel_floor(tokens[s][layer], visual, text))
    t_sample = float(np.median(seconds))
    pool = -(-int(np.ceil(1.9 * HIDDEN)) // N_VISUAL)
    if pool > samples:
        raise ValueError(f"the baseline's tall pool needs {pool} samples, the store has {samples}")
    tall = np.concatenate([tokens[s][0][visual] for s in range(pool)])
    t0 = time.perf_counter()
    r = np.linalg.qr(tall - tall.mean(0), mode="r")
    t_qr = time.perf_counter() - t0
    t0 = time.perf_counter()
    singular = np.linalg.svd(r, compute_uv=False)
    t_fixed = time.perf_counter() - t0
    t_pooled = t_qr / (len(tall) - HIDDEN / 3) * (N_VISUAL + N_TEXT)
    pooled_er = {"visual": _er_from_singular_values(singular),
                 "text": _er_svd(np.concatenate([tokens[s][0][text] for s in range(pool)]))}
    pooled = np.stack([[np.stack([tokens[s][i][mask].astype(np.float64).mean(0) for mask in (visual, text)])
                        for i in range(layers)] for s in range(samples)])
    t0 = time.perf_counter()
    mod, maps = baseline_cka(pooled, tokens, (visual, text))
    t_cka = (time.perf_counter() - t0) / (samples * layers)
    return {"seconds_per_sample_layer": t_sample + t_pooled + t_cka, "seconds_per_layer_modality": t_fixed,
            "floor_seconds_per_sample_layer": float(np.median(floor)),
            "per_sample": per_sample, "picks": picks, "pool": pool, "pooled_er": pooled_er,
            "cka_modality": mod.tolist(), "cka_layers": maps.tolist()}


def speedup(tmp: Path, samples: int = 26, layers: int = 2, measured: int = 3, repeats: int = 3) -> dict[str, float]:
    import json

    from analyze.metrics import Moments
    from analyze.pipeline import geometry, open_client
    from store import open_run

    run = tmp / "speed"
    write_store(run, samples, layers, HIDDEN, N_VISUAL, N_TEXT, N_OTHER, "bfloat16")
    cores = len(os.sched_getaffinity(0))
    ds = open_run(run)  # as `gap analyze` opens it
    per_sl, eig_per_layer = [], []
    with open_client("local", workers=cores) as client:
        client.run(_warm_up)  # worker start-up and imports are a one-off, not a per-sample cost
        for i in range(1 + repeats):  # a shared machine: the median of a few passes
            geo = geometry(ds.hidden, ds.token_sample.values, ds.is_visual.values, ds.is_text.values,
                           np.ones(samples, bool), client=client, scratch=tmp / "scratch", progress=False)
            if i == 0:  # the workers' first pass also grows their heaps: a one-off, untimed
                continue
            # The pass's start and its last task's tail count here as per-sample costs too.
            per_sl.append((geo.seconds["pass"] + geo.seconds["cka"]) / (samples * layers))
            eig_per_layer.append(geo.seconds["pooled_eig"] / layers)
    ours_per_sl, ours_eig_per_layer = float(np.median(per_sl)), float(np.median(eig_per_layer))

    # The baseline runs as one process per core at once (one BLAS thread each, like our workers),
    # so it gets the same cores under the same load: perfectly parallel prototype code.
    code = ("import json, sys; import bench.bench_analysis as b; "
            "print(json.dumps(b.baseline(sys.argv[1], *map(int, sys.argv[2:]))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), str(samples), str(layers), str(measured),
                               str(i * measured)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for i in range(cores)]
    bases = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("the baseline process failed")
    base = bases[0]

    visual, text, n_tok = _masks(N_OTHER, N_VISUAL, N_TEXT)
    er_diffs, abs_diffs = [], []  # relative for effective ranks; absolute for cosines and CKA
    for (s, layer), ref in ((pick, np.array(ref)) for b in bases for pick, ref in zip(b["picks"], b["per_sample"])):
        er_diffs.append(np.nanmax(np.abs(geo.er_sample[s, layer] - ref[..., 0]) / ref[..., 0]))
        abs_diffs.append(np.nanmax(np.abs(geo.icc[s, layer] - ref[..., 1])))
    hidden, starts = ds.hidden.values, ds.token_start.values
    for m, mask in (("visual", visual), ("text", text)):
        rows = np.concatenate([hidden[0, starts[s]:starts[s] + n_tok][mask] for s in range(base["pool"])])
        er_diffs.append(abs(Moments.from_rows(rows).effective_rank() - base["pooled_er"][m]) / base["pooled_er"][m])
    abs_diffs += [np.nanmax(np.abs(np.array(base["cka_modality"]) - geo.cka_modality[:, 0])),
                  np.nanmax(np.abs(np.array(base["cka_layers"]) - geo.cka_layers[:, 0]))]

    # Per core (the processes ran side by side); the per-layer SVDs (visual, text) share the cores.
    base_per_sl = float(np.median([b["seconds_per_sample_layer"] for b in bases])) / cores
    base_per_layer = 2 * float(np.median([b["seconds_per_layer_modality"] for b in bases])) / cores
    n_sl = TARGET_SAMPLES * TARGET_LAYERS
    base_total = n_sl * base_per_sl + TARGET_LAYERS * base_per_layer
    ours_total = n_sl * ours_per_sl + TARGET_LAYERS * ours_eig_per_layer
    floor_per_sl = float(np.median([b["floor_seconds_per_sample_layer"] for b in bases])) / cores
    floor_total = n_sl * floor_per_sl + TARGET_LAYERS * ours_eig_per_layer
    return {"analysis_floor_ms_per_sample_layer": 1e3 * floor_total / n_sl,
            "analysis_speedup_bound": base_total / floor_total,
            "analysis_float32_er_max_rel_err": float32_products_error(),"analysis_baseline_ms_per_sample_layer": 1e3 * base_total / n_sl,
            "analysis_ms_per_sample_layer": 1e3 * ours_total / n_sl,
            "analysis_baseline_hours_1000x48": base_total / 3600,
            "analysis_hours_1000x48": ours_total / 3600,
            "analysis_speedup": base_total / ours_total,
            "analysis_er_max_rel_diff": float(max(er_diffs)),
            "analysis_icc_cka_max_abs_diff": float(max(abs_diffs))}


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_memory(tmp: Path, store_gib: float = 3.1) -> dict[str, float]:
    """Peak RSS of ``gap analyze`` (all its processes) on an out-of-core store."""
    import psutil

    layers, hidden, n_visual, n_text, n_other = 16, 512, 256, 30, 14
    per_sample = layers * (n_visual + n_text + n_other) * hidden * 4
    samples = int(np.ceil(store_gib * (1 << 30) / per_sample))
    run = tmp / "big"
    write_store(run, samples, layers, hidden, n_visual, n_text, n_other, "float32", distinct=4)
    size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    cmd = [sys.executable, "-c", "import sys, gap; sys.exit(gap.main(sys.argv[1:]))", "analyze", str(run),
           "--out", str(tmp / "big_out"), "--no-plots", "-q", "--set", "analysis.bootstrap=50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(watched))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"gap analyze failed on the memory bench store: {err.strip()[-500:]}")
    return {"analysis_peak_gib": peak[0] / (1 << 30), "analysis_store_gib": size / (1 << 30),
            "analysis_big_seconds": time.perf_counter() - t0}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gap-bench-analysis-"))
    try:
        results = {**speedup(tmp), **peak_memory(tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, value in results.items():
        print(f"{name}: {value:.4g}" if name != "analysis_speedup" else f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()

"""Store write/read throughput vs raw numpy files of the same bytes, files per GB, codec table;
and the writer's pipeline against a modelled disk.

Workload: bf16 activations of the Qwen3-VL-30B-A3B shape (48 layers x ~700 tokens x 2048), as the
capture loop hands them over (uint16 bit patterns), written through RunWriter's background thread.
The raw reference writes the same arrays with ``np.save`` (one file per sample) and reads them back
with ``np.load``.  The store fsyncs every block file before committing it (committed samples
survive a node crash); the raw files are left in the page cache, so the write ratio is a
conservative one.

``store_pipeline_vs_limit``: a capture-like producer (a modelled forward of 86 ms per sample, 30%
of it holding the GIL like the trace's Python, batches of 2 handed over after the next batch's
forward, as the capture loop does) feeds :class:`RunWriter` 96 samples of the Qwen3-VL-30B-A3B
shape, whose block files go to a modelled disk (one at a time at 1.3 GB/s, the H100 machine's
fsynced speed).  Wall time over max(forward, bytes / disk speed) tells what the writer's own
structure (queue, I/O threads, commits, padding) costs a disk-bound capture, free of this VM's
disk noise; the start (two batches' forwards before the first write) is part of it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from schemas.config import config_from_dict
from schemas.run import SampleRecord
from store.encoding import bf16_bits_to_float32
from store import layout
from store.inspect import run_info
from store.view import open_run
from store.writer import RunSpec, RunWriter

N_LAYERS, HIDDEN, N_SAMPLES = 48, 2048, 4


def _samples(rng: np.random.Generator) -> list[SampleRecord]:
    out = []
    for i in range(N_SAMPLES):
        n = int(rng.integers(600, 800))
        bits = (rng.standard_normal((N_LAYERS, n, HIDDEN), np.float32).view(np.uint32) >> 16).astype(np.uint16)
        out.append(SampleRecord(index=i, sample_id=f"bench/{i}", input_ids=np.zeros(n, np.int32), hidden=bits))
    return out


def _write_store(root: Path, samples: list[SampleRecord], compression: str) -> float:
    cfg = config_from_dict({"model": {"path": "/bench"}})
    spec = RunSpec(config=cfg, model_info={"family": "bench"}, layers=list(range(N_LAYERS)),
                   hidden_size=HIDDEN, hidden_encoding="bfloat16", n_total=len(samples), compression=compression)
    start = time.perf_counter()
    with RunWriter(root, spec) as writer:
        for s in samples:
            writer.put(s)
    return time.perf_counter() - start


def _write_raw(root: Path, samples: list[SampleRecord]) -> float:
    root.mkdir()
    start = time.perf_counter()
    for s in samples:
        np.save(root / f"{s.index}.npy", s.hidden)
    return time.perf_counter() - start


PIPELINE_SAMPLES, PIPELINE_TOKENS, FORWARD_S, GIL_SHARE, DISK_BPS = 96, 640, 0.086, 0.3, 1.3e9


@contextlib.contextmanager
def _modelled_disk(bytes_per_s: float) -> Iterator[None]:
    """Block files (>= 1 MB) take bytes / speed on one shared disk instead of being written."""
    real, disk = layout._write_all, threading.Lock()

    def write_all(fd: int, pieces: list) -> None:
        n = layout.data_bytes(pieces)
        if n < 1 << 20:
            return real(fd, pieces)
        with disk:
            time.sleep(n / bytes_per_s)

    layout._write_all = write_all
    try:
        yield
    finally:
        layout._write_all = real


def _forward(seconds: float) -> None:
    """A modelled forward: the trace's Python holds the GIL for part of it, the GPU the rest."""
    end = time.perf_counter() + seconds * GIL_SHARE
    while time.perf_counter() < end:
        pass
    time.sleep(seconds * (1 - GIL_SHARE))


def _pipeline(root: Path) -> tuple[float, float]:
    """Seconds for the modelled capture of PIPELINE_SAMPLES samples, and its physical limit."""
    hidden = np.zeros((N_LAYERS, PIPELINE_TOKENS, HIDDEN), np.uint16)
    samples = [SampleRecord(index=i, sample_id=f"bench/{i}", input_ids=np.zeros(PIPELINE_TOKENS, np.int32),
                            hidden=hidden) for i in range(PIPELINE_SAMPLES)]
    cfg = config_from_dict({"model": {"path": "/bench"}})
    spec = RunSpec(config=cfg, model_info={"family": "bench"}, layers=list(range(N_LAYERS)),
                   hidden_size=HIDDEN, hidden_encoding="bfloat16", n_total=len(samples))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)  # as CaptureRunner.run does
    try:
        with _modelled_disk(DISK_BPS):
            start = time.perf_counter()
            with RunWriter(root, spec) as writer:
                previous: list[SampleRecord] = []
                for k in range(0, len(samples), 2):
                    _forward(2 * FORWARD_S)
                    for s in previous:
                        writer.put(s)
                    previous = samples[k:k + 2]
                for s in previous:
                    writer.put(s)
            wall = time.perf_counter() - start
    finally:
        sys.setswitchinterval(interval)
    return wall, max(len(samples) * FORWARD_S, hidden.nbytes * len(samples) / DISK_BPS)


def main() -> None:
    rng = np.random.default_rng(0)
    samples = _samples(rng)
    nbytes = sum(s.hidden.nbytes for s in samples)
    tmp = Path(tempfile.mkdtemp(prefix="gap-bench-store-"))
    try:
        ratios = []
        for rep in range(3):  # alternate to even out page-cache and background noise
            raw_t = _write_raw(tmp / f"raw{rep}", samples)
            store_t = _write_store(tmp / f"store{rep}", samples, "none")
            ratios.append(raw_t / store_t)
            print(f"rep {rep}: raw {nbytes / raw_t / 1e9:.2f} GB/s, store {nbytes / store_t / 1e9:.2f} GB/s")
        run = tmp / "store0"
        start = time.perf_counter()
        hidden = open_run(run).hidden.values
        store_read = time.perf_counter() - start
        start = time.perf_counter()
        raw = [bf16_bits_to_float32(np.load(tmp / "raw0" / f"{s.index}.npy")) for s in samples]
        raw_read = time.perf_counter() - start
        assert np.array_equal(hidden, np.concatenate(raw, axis=1)), "store read differs from raw"
        info = run_info(run)
        zstd_t = _write_store(tmp / "zstd", samples, "zstd")
        zstd_bytes = sum(f.stat().st_size for f in (tmp / "zstd").rglob("*") if f.is_file())
        print(f"files: {info['files']} for {info['bytes'] / 1e9:.2f} GB; zstd-1 ratio {info['bytes'] / zstd_bytes:.3f}")
        print(f"store_write_vs_raw: {float(np.median(ratios)):.2f}")
        print(f"store_read_vs_raw: {raw_read / store_read:.2f}")
        print(f"store_files_per_gb: {info['files'] / (info['bytes'] / 1e9):.1f}")
        print(f"store_zstd_ratio: {info['bytes'] / zstd_bytes:.3f}")
        print(f"store_zstd_write_vs_raw: {float(np.median([_write_raw(tmp / 'rawz', samples)])) / zstd_t:.2f}")
        # on a RAM filesystem where there is one: the small files (token tables, commit lines) are
        # written for real, and this VM's fsync latency is not the modelled disk's
        memfs = Path("/dev/shm")
        with tempfile.TemporaryDirectory(dir=memfs if memfs.is_dir() else tmp) as where:
            wall, limit = _pipeline(Path(where) / "pipeline")
        print(f"store_pipeline_ms_per_sample: {wall / PIPELINE_SAMPLES * 1e3:.1f}")
        print(f"store_pipeline_limit_ms_per_sample: {limit / PIPELINE_SAMPLES * 1e3:.1f}")
        print(f"store_pipeline_vs_limit: {wall / limit:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

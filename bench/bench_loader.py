"""Loader throughput: the synthetic set, and a staged parquet split read as one capture shard.

- ``loader_samples_per_s``: synthetic samples drawn through ``open_dataset`` (56 px, all kinds).
- ``loader_parquet_samples_per_s``: one strided shard (rows i % 4 == 1) of a 512-row parquet
  split of 224 px PNG images in 64-row groups, read through ``open_dataset`` (one row group
  read per 16 samples, images decoded to RGB).
- ``loader_parquet_speedup_vs_reread``: the same shard read the naive way, re-reading the row
  group of each sample (what a loader without the row-group cache does), in the same run.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capture.datasets import open_dataset, to_rgb
from capture.synthetic import generate
from schemas.config import DataConfig

N_SYNTHETIC, N_PARQUET, ROWS_PER_GROUP, SHARDS = 400, 512, 64, 4


def _write_split(path: Path) -> None:
    rows = generate(N_PARQUET, seed=0, image_size=224, split="test")
    images = []
    for r in rows:
        buf = io.BytesIO()
        r["image"].save(buf, "PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "query": [r["question"] for r in rows], "label": [r["answers"] for r in rows]})
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)


def _naive_shard(path: Path, rows: list[int]) -> int:
    pf = pq.ParquetFile(path)
    done = 0
    for row in rows:
        group = pf.read_row_group(row // ROWS_PER_GROUP, columns=["image", "query", "label"])
        rec = group.slice(row % ROWS_PER_GROUP, 1).to_pylist()[0]
        to_rgb(rec["image"], f"chartqa/test/{row}")
        done += 1
    return done


def main() -> None:
    ds = open_dataset(DataConfig(name="synthetic", limit=N_SYNTHETIC))
    start = time.perf_counter()
    n = sum(1 for s in ds.iter_indices(range(len(ds))) if isinstance(s, dict))
    print(f"loader_samples_per_s: {n / (time.perf_counter() - start):.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data" / "test-00000-of-00001.parquet"
        _write_split(path)
        parquet = open_dataset(DataConfig(name="chartqa", path=tmp, split="test"))
        shard = [i for i in range(len(parquet)) if i % SHARDS == 1]
        start = time.perf_counter()
        n = sum(1 for s in parquet.iter_indices(shard) if isinstance(s, dict))
        ours = time.perf_counter() - start
        start = time.perf_counter()
        _naive_shard(path, shard)
        naive = time.perf_counter() - start
    print(f"loader_parquet_samples_per_s: {n / ours:.1f}")
    print(f"loader_parquet_speedup_vs_reread: {naive / ours:.2f}")


if __name__ == "__main__":
    main()

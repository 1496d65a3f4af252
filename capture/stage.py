"""Stage a hub dataset to a local directory that the offline loaders read, with a manifest.

Run on a machine with internet (a login node). The layout is the hub's own parquet layout,
``DIR/data/{split}-{k:05d}-of-{n:05d}.parquet`` with images embedded as ``{bytes, path}``
structs and small row groups (cheap random access per sample), plus ``DIR/manifest.json``::

    {"dataset": "chartqa", "repo": "HuggingFaceM4/ChartQA", "config": null, "revision": null,
     "splits": {"test": {"rows": 2500, "files": [{"path": "data/test-00000-of-00001.parquet",
                                                    "rows": 2500, "bytes": ..., "sha256": ...}]}}}

Examples
--------
>>> sorted(DEFAULT_SPLITS)
['chartqa', 'docvqa', 'scienceqa', 'textvqa', 'vqav2']
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from schemas.errors import GapError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The splits with gold answers (DocVQA's and VQAv2's test answers are hidden on the hub).
DEFAULT_SPLITS: dict[str, list[str]] = {
    "chartqa": ["test"], "docvqa": ["validation"], "textvqa": ["validation"],
    "vqav2": ["validation"], "scienceqa": ["test"],
}
ROWS_PER_GROUP = 64
MAX_SHARD_BYTES = 512 * 2**20


def sha256_file(path: Path, chunk: int = 2**20) -> str:
    """Hex sha256 of a file, read in chunks.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "f"; _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load_split(name: str, split: str, source: str | None, config: str | None,
                revision: str | None) -> Any:
    import datasets

    from capture.datasets import SPECS

    repo = source or SPECS[name].repo
    kwargs: dict[str, Any] = {"split": split, "revision": revision}
    if source is not None:
        # A local directory stands in for the hub repo; a config is a sub-directory there.
        if config and (Path(source) / config).is_dir():
            kwargs["data_dir"] = config
    elif config:
        kwargs["name"] = config
    try:
        return datasets.load_dataset(repo, **kwargs)
    except Exception as exc:  # the boundary to the hub: any failure becomes one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if "split" in first.lower() and ("unknown" in first.lower() or "not" in first.lower()):
            raise GapError(f"{name}: split {split!r} does not exist in {repo} ({first})") from None
        hint = "" if source else "; is the hub reachable from this machine?"
        raise GapError(f"{name}: cannot load {repo} split {split!r} "
                       f"({exc.__class__.__name__}: {first}){hint}") from None


def _embedded(ds: Any, batch_size: int) -> Any:
    """``ds`` with image files read into the table, so the copy does not point at this machine.

    The same step ``datasets`` takes before pushing parquet shards to the hub.
    """
    from datasets.table import embed_table_storage

    return ds.with_format("arrow").map(embed_table_storage, batched=True, batch_size=batch_size,
                                       keep_in_memory=True, desc="embedding images")


def stage(name: str, to: str | Path, splits: list[str] | None = None, source: str | None = None,
          config: str | None = None, revision: str | None = None, limit: int | None = None,
          rows_per_group: int = ROWS_PER_GROUP, max_shard_bytes: int = MAX_SHARD_BYTES
          ) -> dict[str, Any]:
    """Download (or copy from ``source``) splits of a dataset into ``to``; return the manifest.

    Parameters
    ----------
    name : str
        ``chartqa``, ``docvqa``, ``textvqa``, ``vqav2`` or ``scienceqa``.
    to : path
        Output directory; staging more splits later adds them to the same manifest.
    splits : list of str, optional
        Default :data:`DEFAULT_SPLITS`.
    source : str, optional
        A local directory read instead of the hub repo (``datasets.load_dataset(source)``).
    config, revision : str, optional
        Hub config (default: the dataset's, e.g. ``DocVQA``) and revision.
    limit : int, optional
        Keep only the first ``limit`` rows of each split.
    rows_per_group, max_shard_bytes : int
        Parquet row-group size and the approximate size of one file.

    Returns
    -------
    dict
        The manifest written to ``to/manifest.json``.

    Examples
    --------
    >>> stage("nope", "/tmp/x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    schemas.errors.GapError: dataset 'nope' cannot be staged; choose from ...
    """
    from tqdm import tqdm

    from capture.datasets import SPECS

    if name not in DEFAULT_SPLITS:
        raise GapError(f"dataset {name!r} cannot be staged; "
                       f"choose from {', '.join(DEFAULT_SPLITS)}")
    out = Path(to).expanduser()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = config or SPECS[name].config
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest and manifest.get("dataset") != name:
        raise GapError(f"{manifest_path} belongs to dataset {manifest.get('dataset')!r}, "
                       f"not {name!r}")
    # top level: the latest staging; each split also records its own source (they may differ)
    origin = {"repo": source or SPECS[name].repo, "config": config, "revision": revision}
    manifest.update(dataset=name, layout="parquet-v1", **origin)
    manifest.setdefault("splits", {})
    for split in splits or DEFAULT_SPLITS[name]:
        ds = _load_split(name, split, source, config, revision)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        n_files = max(1, min(len(ds), math.ceil(ds.data.nbytes / max_shard_bytes)))
        # The split is written whole into a hidden folder (readers skip dot-folders) and only then
        # replaces the old files: a staging that stops while writing leaves the old split as it
        # was; one killed within the swap itself leaves a split that loaders refuse as incomplete.
        pending = out / f".staging-{split}"
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir()
        files = []
        for k in tqdm(range(n_files), desc=f"{name}/{split}", unit="file", disable=n_files == 1):
            file_name = f"{split}-{k:05d}-of-{n_files:05d}.parquet"
            part = _embedded(ds.shard(n_files, k, contiguous=True), rows_per_group)
            part.to_parquet(str(pending / file_name), batch_size=rows_per_group)
            written = pending / file_name
            files.append({"path": f"data/{file_name}", "rows": len(part), "bytes": written.stat().st_size,
                          "sha256": sha256_file(written)})
        for stale in data_dir.glob(f"{split}-*.parquet"):
            stale.unlink()
        for entry in files:
            os.replace(pending / Path(entry["path"]).name, out / entry["path"])
        pending.rmdir()
        manifest["splits"][split] = {"rows": len(ds), "files": files, **origin,
                                     "staged_at": datetime.now(timezone.utc).isoformat()}
        log.info("staged %s/%s: %d rows in %d file(s)", name, split, len(ds), n_files)
        tmp_manifest = manifest_path.with_suffix(".json.tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_manifest, manifest_path)
    return manifest


def verify(directory: str | Path) -> list[str]:
    """Check a staged directory against its manifest; return one line per problem (empty: ok).

    Examples
    --------
    >>> import tempfile
    >>> verify(tempfile.mkdtemp())[0].endswith("manifest.json: missing")
    True
    >>> verify("/nonexistent/staged")
    ['/nonexistent/staged: no such directory']
    """
    import pyarrow.parquet as pq

    root = Path(directory).expanduser()
    if not root.is_dir():
        return [f"{root}: {'not a directory' if root.exists() else 'no such directory'}"]
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{manifest_path}: not valid JSON ({exc.msg})"]
    problems = []
    for split, info in manifest.get("splits", {}).items():
        total = 0
        for entry in info.get("files", []):
            path = root / entry["path"]
            if not path.is_file():
                problems.append(f"{path}: missing (split {split})")
                continue
            if sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest")
                continue
            rows = pq.ParquetFile(path).metadata.num_rows
            total += rows
            if rows != entry["rows"]:
                problems.append(f"{path}: {rows} rows, manifest says {entry['rows']}")
        if total != info.get("rows"):
            problems.append(f"split {split}: {total} rows readable, "
                            f"manifest says {info.get('rows')}")
    return problems

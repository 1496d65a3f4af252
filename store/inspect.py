"""``gap store info`` and ``gap store verify``: what a run holds, and whether it is intact."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from schemas.run import STATUS_OK
from store import layout
from store.reader import PartState, RunState, read_run


def writer_of(part_dir: Path) -> str | None:
    """Who holds a part's writer lock (``"pid N on HOST"``), or None when no writer is live.

    A live writer's tail (blocks and an array extent past its last commit, a half-written line)
    is work in progress, not damage.
    """
    import fcntl

    try:
        fh = open(part_dir / layout.LOCK, "r")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _disk_usage(path: Path) -> tuple[int, int]:
    """Files and bytes of the run's own data (its root metadata and parts; not an analysis
    written inside the run directory)."""
    files = size = 0
    for top in (p for p in path.iterdir() if p.is_file()):
        try:
            size += top.stat().st_size
            files += 1
        except FileNotFoundError:
            continue
    for root, _, names in os.walk(path / layout.PARTS):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:  # a live writer's temporary file, renamed since the listing
                continue
            files += 1
    return files, size


def run_info(run: str | Path) -> dict[str, Any]:
    """Counts a person (or ``gap slurm status``) wants about a run."""
    state = read_run(run)
    files, size = _disk_usage(state.path)
    shards = []
    for part in state.parts:
        samples = part.samples
        ok = sum(s["status"] == STATUS_OK for s in samples)
        shards.append({"shard": part.shard, "n_shards": part.n_shards, "ok": ok, "failed": len(samples) - ok,
                       "segments": len(part.commits), "tokens": sum(s["n_tokens"] for s in samples),
                       "updated": part.commits[-1]["time"] if part.commits else None,
                       "writer": writer_of(part.path)})
    ok = sum(s["ok"] for s in shards)
    failed = sum(s["failed"] for s in shards)
    attrs = state.attrs
    files_per_gb = files / (size / 1e9) if size else 0.0
    return {"run": str(state.path), "model": attrs["model"].get("path"), "family": attrs["model"].get("family"),
            "n_shards": attrs.get("n_shards"), "n_total": attrs.get("n_total", 0), "ok": ok, "failed": failed,
            "left": max(0, attrs.get("n_total", 0) - ok - failed), "layers": attrs["hidden"]["layers"],
            "hidden_size": attrs["hidden"]["hidden_size"], "encoding": attrs["hidden"]["encoding"],
            "bytes": size, "files": files, "files_per_gb": round(files_per_gb, 1), "shards": shards}


def format_info(info: dict[str, Any]) -> str:
    layers = info["layers"]
    layer_text = f"{len(layers)} ({layers[0]}..{layers[-1]})" if layers else "none (activations off)"
    lines = [
        f"run      {info['run']}",
        f"model    {info['model']} ({info['family']})",
        f"samples  {info['ok']} ok, {info['failed']} failed, {info['left']} left of {info['n_total']}",
        f"shards   {len(info['shards'])} of {info['n_shards']} started",
        f"layers   {layer_text}; hidden {info['hidden_size']} as {info['encoding']}",
        f"disk     {info['bytes'] / 1e9:.3f} GB in {info['files']} files ({info['files_per_gb']} files/GB)",
    ]
    for s in info["shards"]:
        lines.append(f"  shard {s['shard']}/{s['n_shards']}: {s['ok']} ok, {s['failed']} failed, "
                     f"{s['tokens']} tokens, {s['segments']} segments, last commit {s['updated'] or 'none yet'}"
                     + (f"; being written by {s['writer']}" if s.get("writer") else ""))
    return "\n".join(lines)


def _check_array(part: PartState, name: str, expect: dict[str, Any], problems: list[str],
                 live: bool = False) -> None:
    meta_path = part.path / name / "zarr.json"
    where = f"{part.path.name}/{name}"
    if not meta_path.exists():
        problems.append(f"{where}: missing array metadata")
        return
    try:
        meta = layout.read_json(meta_path)
    except ValueError as exc:  # truncated or overwritten: name it, and check the rest
        problems.append(f"{where}: array metadata zarr.json is damaged ({str(exc).splitlines()[0]})")
        return
    for key in ("data_type", "chunk_grid"):
        if meta.get(key) != expect[key]:
            problems.append(f"{where}: {key} {meta.get(key)} != expected {expect[key]}")
    shape, want = meta.get("shape", []), expect["shape"]
    if len(shape) != len(want) or any(a != b for i, (a, b) in enumerate(zip(shape, want)) if i != expect["axis"]):
        problems.append(f"{where}: shape {shape} does not match the run ({want})")
    elif shape[expect["axis"]] != part.end and not (live and shape[expect["axis"]] > part.end):
        problems.append(f"{where}: extent {shape[expect['axis']]} != committed end {part.end} "
                        "(uncommitted leftovers; resume the shard)")


def _chunk_blocks(array_dir: Path, axis: int) -> set[int]:
    """Block indices whose chunk file exists (hidden: c/0/B/0, tokens: c/B/0)."""
    base = array_dir / "c" / "0" if axis == 1 else array_dir / "c"
    if not base.exists():
        return set()
    return {int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "0").is_file()}


def verify_run(run: str | Path) -> list[str]:
    """One line per problem found; an empty list means the run is intact."""
    # a writer seen before the state is read or after it: its tail in the state may be in progress
    parts_dir = Path(run) / layout.PARTS
    live_before = ({p.name for p in parts_dir.iterdir() if p.is_dir() and writer_of(p)}
                   if parts_dir.is_dir() else set())
    state: RunState = read_run(run)
    problems: list[str] = []
    hidden = state.hidden
    block = hidden["block_tokens"]
    n_layers, size, encoding = len(hidden["layers"]), hidden["hidden_size"], hidden["encoding"]
    itemsize = np.dtype(layout.ENCODINGS[encoding]).itemsize
    owners: Counter[int] = Counter()
    for part in state.parts:
        name = part.path.name
        live = name in live_before or writer_of(part.path) is not None  # its tail may be in progress
        if part.n_shards != state.attrs.get("n_shards"):
            problems.append(f"{name}: part of a {part.n_shards}-shard layout in a "
                            f"{state.attrs.get('n_shards')}-shard run")
        if part.file_bytes != part.log_bytes and not live:
            problems.append(f"{name}: torn commit line after the last commit (uncommitted leftovers; resume the shard)")
        for number, _ in part.damaged:
            problems.append(f"{name}: commit line {number} is damaged (not a commit): its samples are not in the view "
                            "(gap capture --resume captures any missing)")
        after_damage = {position for _, position in part.damaged}
        expected_start = 0
        for position, c in enumerate(part.commits):
            # after a damaged line, the damaged segment's tokens may lie in between
            starts_right = c["start"] == expected_start or (position in after_damage and c["start"] > expected_start)
            if not starts_right or not c["start"] <= c["stop"] <= c["end"] or c["end"] % block:
                problems.append(f"{name}: segment {c['segment']} bounds {c['start']}..{c['stop']}..{c['end']} "
                                "are inconsistent")
            expected_start = c["end"]
            for s in c["samples"]:
                if s["index"] % part.n_shards != part.shard:
                    problems.append(f"{name}: sample {s['sample_id']} belongs to another shard")
                if s["n_tokens"] and not c["start"] <= s["offset"] <= s["offset"] + s["n_tokens"] <= c["stop"]:
                    problems.append(f"{name}: sample {s['sample_id']} lies outside its segment")
        latest = {id(s) for s in part.samples}
        owners.update(s["index"] for s in part.samples)
        for s in part.records:  # only a failed record (no tokens) may be replaced by a retry
            if id(s) not in latest and (s["status"] == STATUS_OK or s["n_tokens"]):
                problems.append(f"{name}: sample {s['sample_id']} was committed again after an ok record "
                                "(duplicated sample)")
        n_blocks = part.end // block
        arrays = [(layout.TOKENS, 0, layout.tokens_metadata(part.end, block))]
        if n_layers:
            arrays.append((layout.HIDDEN, 1, layout.hidden_metadata(n_layers, part.end, size, encoding, block,
                                                                    hidden.get("compression", "none"))))
        for array, axis, meta in arrays:
            _check_array(part, array, {**meta, "axis": axis}, problems, live)
            present = _chunk_blocks(part.path / array, axis)
            missing = sorted(set(range(n_blocks)) - present)
            extra = sorted(b for b in present if b >= n_blocks)
            if missing:
                problems.append(f"{name}/{array}: missing chunks for blocks {missing[:5]}")
            if extra and not live:
                problems.append(f"{name}/{array}: uncommitted leftover chunks {extra[:5]} (resume the shard)")
        problems += _check_chunk_files(part, n_blocks, n_layers, block, block * size * itemsize,
                                       hidden.get("compression", "none"))
        problems += _check_token_owners(part, block)
    for index, count in owners.items():
        if count > 1:
            problems.append(f"sample index {index} committed {count} times (duplicated sample)")
    return problems


def verify_data(run: str | Path, progress: bool = True) -> tuple[list[str], int]:
    """Recompute the CRC-32 of every committed block file against its commit line.

    Reads every byte of the run (the structural :func:`verify_run` reads none): a flipped bit,
    a file overwritten by another, a block copied over another. Segments committed before
    checksums were recorded are counted, not checked.

    Returns
    -------
    (problems, unchecked)
        One line per damaged file, and the number of segments without checksums.
    """
    from tqdm import tqdm

    state: RunState = read_run(run)
    block = state.hidden["block_tokens"]
    arrays = ([(layout.HIDDEN, layout.hidden_chunk_key)] if state.hidden["layers"] else []) + \
        [(layout.TOKENS, layout.tokens_chunk_key)]
    files: list[tuple[Path, str, int]] = []  # (path, what, expected CRC-32)
    unchecked = 0
    for part in state.parts:
        for commit in part.commits:
            crcs = commit.get("crc32")
            if crcs is None:
                unchecked += 1
                continue
            for k, expected in enumerate(crcs):
                b = commit["start"] // block + k
                files += [(part.path / name / key(b), f"{part.path.name}/{name}: block {b}", crc)
                          for (name, key), crc in zip(arrays, expected)]
    sizes = [path.stat().st_size if path.exists() else 0 for path, _, _ in files]
    problems = []
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="verify --data", disable=not progress) as bar:
        for (path, what, expected), size in zip(files, sizes):
            if not path.exists():
                problems.append(f"{what}: file missing")
            elif layout.file_crc32(path) != expected:
                problems.append(f"{what}: checksum mismatch (its bytes changed after the commit)")
            bar.update(size)
    return problems, unchecked


def _check_chunk_files(part: PartState, n_blocks: int, n_layers: int, block: int, chunk_bytes: int,
                       compression: str) -> list[str]:
    import google_crc32c

    problems = []
    index_bytes = n_layers * 16
    for b in range(n_blocks):
        tok = part.path / layout.TOKENS / layout.tokens_chunk_key(b)
        if tok.exists() and tok.stat().st_size != block * len(layout.TOKEN_COLUMNS) * 4:
            problems.append(f"{part.path.name}/tokens: chunk {b} is truncated")
        if not n_layers:
            continue
        path = part.path / layout.HIDDEN / layout.hidden_chunk_key(b)
        if not path.exists():
            continue
        size = path.stat().st_size
        if compression == "none" and size != n_layers * chunk_bytes + index_bytes + 4:
            problems.append(f"{part.path.name}/hidden: shard {b} has {size} bytes, expected "
                            f"{n_layers * chunk_bytes + index_bytes + 4}")
            continue
        with open(path, "rb") as fh:
            fh.seek(size - index_bytes - 4)
            tail = fh.read()
        if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
            problems.append(f"{part.path.name}/hidden: shard {b} index checksum mismatch")
    return problems


def _check_token_owners(part: PartState, block: int) -> list[str]:
    """Each committed sample's tokens must carry its own index (catches misplaced or stale blocks)."""
    if not part.end or not (part.path / layout.TOKENS / "zarr.json").exists():
        return []
    import zarr

    try:
        table = np.asarray(zarr.open_array(part.path / layout.TOKENS, mode="r")[: part.end])
    except Exception as exc:  # a damaged chunk must not hide the rest of the report
        return [f"{part.path.name}/tokens: unreadable ({exc.__class__.__name__})"]
    problems = []
    for s in part.records:
        if s["n_tokens"]:
            owner = table[s["offset"]: s["offset"] + s["n_tokens"], 3]
            if not np.all(owner == s["index"]):
                problems.append(f"{part.path.name}: tokens of sample {s['sample_id']} do not carry its index")
    return problems

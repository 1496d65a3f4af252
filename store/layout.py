"""The on-disk layout of a run: paths, names, chunking and the Zarr v3 bytes we write.

A run directory is a Zarr v3 hierarchy::

    RUN/zarr.json                         root group; attrs["gap"] = provenance + run spec
    RUN/parts/zarr.json                   group of writer parts
    RUN/parts/shard-0001-of-0004/         one group per writer (``--shard I/N``); only it writes here
        zarr.json                         attrs["gap"] = shard, n_shards
        hidden/                           (layer, token, hidden_dim); shard = (all layers, B tokens)
        tokens/                           (token, 4) int32: input_id, position, flags, sample_index
        commits.jsonl                     the commit log: one line per committed segment
        writer.lock                       flock held by the live writer

Tokens of a part are appended in *segments*.  A segment starts at a block boundary (B tokens, the
token extent of one hidden shard), its blocks are written whole (so no shard file holding committed
data is ever rewritten), and it becomes visible only when its line is appended to
``commits.jsonl`` (the commit marker, written last).  Tokens between a segment's ``stop`` and its
block-aligned ``end`` are padding and never appear in the xarray view.  A sample that failed
(no tokens) may be committed again by a later segment (``gap capture --resume --retry-failed``);
its latest record is the one that counts.

Everything here is pure: no threads, no locks.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PARTS = "parts"
HIDDEN = "hidden"
TOKENS = "tokens"
COMMITS = "commits.jsonl"
LOCK = "writer.lock"
TOKEN_COLUMNS = ("input_id", "position", "flags", "sample_index")
ENCODINGS = {"bfloat16": "uint16", "float32": "float32", "float16": "float16"}
TARGET_CHUNK_BYTES = 2 << 20  # inner chunk (1 layer x B tokens): >= 1 MB for analysis reads
EMPTY = np.uint64(2**64 - 1)


def part_name(shard: int, n_shards: int) -> str:
    """``shard-0001-of-0004`` for ``--shard 1/4``.

    >>> part_name(1, 4)
    'shard-0001-of-0004'
    """
    return f"shard-{shard:04d}-of-{n_shards:04d}"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """Inverse of :func:`part_name`; None for other names."""
    bits = name.split("-")
    if len(bits) != 4 or bits[0] != "shard" or bits[2] != "of":
        return None
    try:
        return int(bits[1]), int(bits[3])
    except ValueError:
        return None


def part_dir(run: Path, shard: int, n_shards: int) -> Path:
    return Path(run) / PARTS / part_name(shard, n_shards)


def block_tokens_for(hidden_size: int, itemsize: int) -> int:
    """Tokens per block, a power of two making one layer's inner chunk about 2 MB (64..1024).

    >>> block_tokens_for(2048, 2)
    512
    """
    ideal = TARGET_CHUNK_BYTES / max(1, hidden_size * itemsize)
    return int(min(1024, max(64, 2 ** round(math.log2(ideal)))))


def group_metadata(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs}


def hidden_metadata(n_layers: int, n_tokens: int, hidden_size: int, encoding: str, block: int,
                    compression: str = "none") -> dict[str, Any]:
    """Zarr v3 metadata of the hidden array: shards of (all layers, block, hidden), inner chunks per layer."""
    inner: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        inner.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r} (none | zstd)")
    return {
        "zarr_format": 3, "node_type": "array",
        "shape": [n_layers, n_tokens, hidden_size],
        "data_type": ENCODINGS[encoding],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [n_layers, block, hidden_size]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, block, hidden_size],
            "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {"gap_encoding": encoding},
        "dimension_names": ["layer", "token", "hidden_dim"],
        "storage_transformers": [],
    }


def tokens_metadata(n_tokens: int, block: int) -> dict[str, Any]:
    """Zarr v3 metadata of the per-token int32 table (token, 4), one chunk per block."""
    return {
        "zarr_format": 3, "node_type": "array",
        "shape": [n_tokens, len(TOKEN_COLUMNS)],
        "data_type": "int32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [block, len(TOKEN_COLUMNS)]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": -1,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {"columns": list(TOKEN_COLUMNS)},
        "dimension_names": ["token", "column"],
        "storage_transformers": [],
    }


def hidden_chunk_key(block_index: int) -> str:
    return f"c/0/{block_index}/0"


def tokens_chunk_key(block_index: int) -> str:
    return f"c/{block_index}/0"


def encode_hidden_shard(parts: list[np.ndarray], pad_tokens: int = 0,
                        compression: str = "none") -> list[Piece]:
    """Pieces of one hidden shard file from token-consecutive ``parts`` of shape (layers, t_i, hidden).

    The shard holds one inner chunk per layer (all B tokens of that layer), then the index.  Each
    layer's rows of a part are contiguous in the part's own memory, so uncompressed shards are
    written straight from the samples' arrays (zero-copy).  The ``pad_tokens`` zero rows that end
    each layer of a segment's last block are holes (see :data:`Piece`): the disk writes none of
    them, which at a commit every 16 blocks is ~3% of an all-layer capture's bytes.
    """
    import google_crc32c

    n_layers = parts[0].shape[0]
    dtype, size = parts[0].dtype, parts[0].shape[2]
    hole = pad_tokens * size * dtype.itemsize
    pieces: list[Piece] = []
    sizes = np.zeros(n_layers, np.uint64)
    for layer in range(n_layers):
        rows = [np.ascontiguousarray(p[layer]) for p in parts]
        if compression == "none":
            pieces += [memoryview(r).cast("B") for r in rows]
            pieces += [hole] if hole else []
            sizes[layer] = sum(r.nbytes for r in rows) + hole
        else:
            if pad_tokens:
                rows.append(np.zeros((pad_tokens, size), dtype))
            import numcodecs

            blob = numcodecs.Zstd(level=1).encode(np.concatenate(rows).view(np.uint8))
            pieces.append(blob)
            sizes[layer] = len(blob)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
    index = np.stack([offsets, sizes], axis=1).astype("<u8").tobytes()
    return [*pieces, index + google_crc32c.value(index).to_bytes(4, "little")]


def read_hidden_shard(path: Path, n_layers: int, block: int, hidden_size: int, dtype: np.dtype,
                      layers: slice, tokens: slice, compression: str = "none") -> np.ndarray:
    """Read ``[layers, tokens, :]`` of one shard file (the view's fast path; zarr-python reads it too).

    Uncompressed inner chunks are read with one positioned read per layer covering just the token
    rows asked for; the index is honoured, never assumed.  A missing file reads as fill (zeros).
    """
    dtype = np.dtype(dtype)
    layer_ids = range(n_layers)[layers]
    t0, t1, _ = tokens.indices(block)
    out = np.zeros((len(layer_ids), max(0, t1 - t0), hidden_size), dtype)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return out
    try:
        end = os.fstat(fd).st_size
        index = np.frombuffer(os.pread(fd, n_layers * 16, end - n_layers * 16 - 4), "<u8").reshape(n_layers, 2)
        row = hidden_size * dtype.itemsize
        for k, layer in enumerate(layer_ids):
            offset, nbytes = (int(v) for v in index[layer])
            if offset == int(EMPTY):
                continue
            if compression == "none":
                buf = os.pread(fd, (t1 - t0) * row, offset + t0 * row)
                out[k] = np.frombuffer(buf, dtype).reshape(t1 - t0, hidden_size)
            else:
                import numcodecs

                chunk = numcodecs.Zstd().decode(os.pread(fd, nbytes, offset))
                out[k] = np.frombuffer(chunk, dtype).reshape(block, hidden_size)[t0:t1]
    finally:
        os.close(fd)
    return out


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

Piece = bytes | memoryview | int
"""A piece of a file to write: its bytes, or a number of zero bytes left as a hole (nothing
written; the file reads zeros there, and the filesystem stores none)."""


def data_bytes(pieces: list[Piece]) -> int:
    """Bytes that writing ``pieces`` puts on disk (holes excluded).

    >>> data_bytes([b"abc", 4096, memoryview(b"de")])
    5
    """
    return sum(len(p) for p in pieces if not isinstance(p, int))


_ZEROS = bytes(1 << 20)  # a hole's bytes, for its checksum


def pieces_crc32(pieces: list[Piece] | bytes) -> int:
    """CRC-32 (zlib's) of the file that writing ``pieces`` makes (holes read as zeros).

    zlib's CRC lets other threads run while it works (google_crc32c's holds the GIL, which would
    stall the capture loop while the I/O threads checksum its blocks).

    >>> import zlib
    >>> pieces_crc32([b"ab", 3, memoryview(b"c")]) == zlib.crc32(b"ab\\0\\0\\0c")
    True
    """
    import zlib

    if isinstance(pieces, (bytes, bytearray, memoryview)):
        pieces = [pieces]
    crc = 0
    for piece in pieces:
        if isinstance(piece, int):
            for start in range(0, piece, len(_ZEROS)):
                crc = zlib.crc32(_ZEROS[:min(len(_ZEROS), piece - start)], crc)
        else:
            crc = zlib.crc32(piece, crc)
    return crc


def file_crc32(path: Path, bufsize: int = 8 << 20) -> int:
    """CRC-32 (zlib's) of a file's bytes, read in ``bufsize`` pieces."""
    import zlib

    crc = 0
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing one of ``path`` and its parents when it is not a directory (no
    directory can be made at ``path`` then), else None.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); (d / "f").write_text("")
    0
    >>> file_in_the_way(d / "f" / "sub") == d / "f", file_in_the_way(d / "new" / "sub")
    (True, None)
    """
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some network and FUSE filesystems cannot fsync a directory (and order metadata themselves)
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive the node going down: each new entry is fsynced
    in its parent."""
    missing = []
    path = Path(path)
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # made meanwhile by another writer thread, which fsyncs it
            continue
        fsync_dir(directory.parent)


def atomic_write(path: Path, pieces: list[Piece] | bytes, fsync: bool = False) -> None:
    """Write a file so that readers see the old version or the new one, never a torn one.

    With ``fsync`` the new version is also durable on return: its bytes, then its name (the
    rename, fsynced in the directory), as POSIX asks rather than trusting a journal's ordering.
    """
    if isinstance(pieces, (bytes, bytearray, memoryview)):
        pieces = [pieces]
    path = Path(path)
    tmp = _temp_path(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            _write_all(fd, pieces)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def _write_all(fd: int, pieces: list[Piece]) -> None:
    """All of ``pieces`` with as few system calls as the kernel allows: one ``writev`` per run of
    byte pieces, one ``lseek`` per hole.

    One call per file rather than one per piece: each return from a system call has to take the
    GIL back, and beside a Python-heavy capture loop that can wait a whole switch interval.
    """
    run: list[bytes | memoryview] = []
    for piece in [*pieces, 0]:
        if not isinstance(piece, int):
            run.append(piece)
            continue
        _writev_all(fd, run)
        run = []
        if piece:
            os.lseek(fd, piece, os.SEEK_CUR)
    if pieces and isinstance(pieces[-1], int) and pieces[-1]:  # a hole at the very end: the file's length
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))


def _writev_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first:first + _IOV_MAX])
        while first < len(views) and written >= len(views[first]):  # short writes resume mid-piece
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def write_json(path: Path, obj: Any, fsync: bool = False) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode(), fsync)


def _temp_path(path: Path, tag: str) -> Path:
    """A temporary name beside ``path`` that no other process uses: a pid alone repeats across
    the nodes sharing a file system (two shards starting at once would share one file)."""
    return path.with_name(f".{path.name}.{tag}{os.getpid()}-{secrets.token_hex(4)}")


def create_json_exclusive(path: Path, obj: Any) -> bool:
    """Create ``path`` with ``obj`` unless it exists (atomic across processes, durable). True if
    created."""
    path = Path(path)
    tmp = _temp_path(path, "new")
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(obj, indent=1).encode())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # fails if another writer created it first
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with stored attrs."""
    return json.loads(json.dumps(obj))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def set_array_length(array_dir: Path, axis: int, length: int) -> None:
    """Set an array's extent along ``axis`` by rewriting its zarr.json atomically and durably."""
    meta = read_json(Path(array_dir) / "zarr.json")
    meta["shape"][axis] = int(length)
    write_json(Path(array_dir) / "zarr.json", meta, fsync=True)


class CommitLog(NamedTuple):
    """A part's commit log as read: its commits, the bytes of its complete lines, and the
    ``(line number, commits before it)`` of each complete line that is damaged (not a commit)."""

    commits: list[dict[str, Any]]
    good: int
    damaged: list[tuple[int, int]]


_COMMIT_FIELDS = {"segment": int, "start": int, "stop": int, "end": int, "samples": list}
_SAMPLE_FIELDS = {"index": int, "sample_id": str, "status": str, "n_tokens": int}


def is_commit(obj: Any) -> bool:
    """Whether a parsed commit line has a commit's fields and types (a sample with tokens also
    its ``offset``): a damaged byte can leave valid JSON with a changed key.

    >>> is_commit({"segment": 0, "start": 0, "stop": 2, "end": 8, "samples": [
    ...     {"index": 3, "sample_id": "a/3", "status": "ok", "n_tokens": 2, "offset": 0}]})
    True
    >>> is_commit({"segment": 0, "start": 0, "stop": 2, "end": 8, "samplqs": []})
    False
    """
    def typed(d: Any, fields: dict[str, type]) -> bool:
        return isinstance(d, dict) and all(
            isinstance(d.get(k), t) and not isinstance(d.get(k), bool) for k, t in fields.items())

    return typed(obj, _COMMIT_FIELDS) and all(
        typed(s, _SAMPLE_FIELDS) and (not s["n_tokens"] or isinstance(s.get("offset"), int))
        for s in obj["samples"])


def parse_commit_log(data: bytes) -> CommitLog:
    """The commits of a log's complete lines.

    A writer killed while appending leaves a partial last line (no newline); it is not a commit.
    A complete line that is not a commit (not JSON, or JSON without a commit's fields: the file
    damaged since) is skipped and listed in ``damaged``, so the commits after it still count:
    each commit names its own token range.

    Lines end at ``\\n`` only: a damaged byte that reads as ``\\r`` must not look like a torn
    last line, which would hide every commit after it (and resume would truncate them away).

    >>> c = '{"segment": 0, "start": 0, "stop": 0, "end": %d, "samples": []}'
    >>> data = "\\n".join([c % 8, '{"e\\rnd": 1}', "[16]", c % 16, '{"end"']).encode()
    >>> log = parse_commit_log(data)
    >>> [c["end"] for c in log.commits], log.damaged
    ([8, 16], [(2, 1), (3, 1)])
    """
    commits: list[dict[str, Any]] = []
    damaged: list[tuple[int, int]] = []
    good = 0
    *lines, _torn = data.split(b"\n")  # the last piece has no newline: never a commit
    for number, line in enumerate(lines, 1):
        try:
            commit = json.loads(line) if line_intact(line) else None
        except ValueError:  # not JSON, or not UTF-8
            commit = None
        if is_commit(commit):
            commits.append(commit)
        else:  # damaged, or JSON that is no commit
            damaged.append((number, len(commits)))
        good += len(line) + 1
    return CommitLog(commits, good, damaged)


def latest_samples(commits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sample's latest committed record, in the order of those records (a retried sample's
    new record replaces its failed one).

    >>> log = [{"samples": [{"index": 0, "status": "oom"}, {"index": 1, "status": "ok"}]},
    ...        {"samples": [{"index": 0, "status": "ok"}]}]
    >>> [(s["index"], s["status"]) for s in latest_samples(log)]
    [(1, 'ok'), (0, 'ok')]
    """
    latest: dict[int, dict[str, Any]] = {}
    for commit in commits:
        for sample in commit["samples"]:
            latest.pop(sample["index"], None)
            latest[sample["index"]] = sample
    return list(latest.values())


LINE_CRC = b',"line_crc32":'  # ends every commit line: the CRC-32 of the bytes before it


def encode_commit(commit: dict[str, Any]) -> bytes:
    """One commit line: the commit as JSON, ending with the checksum of the line before it.

    >>> line = encode_commit({"segment": 0})
    >>> line[:len(b'{"segment":0,"line_crc32":')], line_intact(line.rstrip(b"\\n"))
    (b'{"segment":0,"line_crc32":', True)
    """
    import zlib

    head = json.dumps(commit, separators=(",", ":"), allow_nan=True)[:-1].encode()
    return head + LINE_CRC + str(zlib.crc32(head)).encode() + b"}\n"


def line_intact(line: bytes) -> bool:
    """Whether a commit line's checksum matches its bytes (a line written before checksums,
    without one, passes: JSON parsing and :func:`is_commit` are its only checks)."""
    import zlib

    at = line.rfind(LINE_CRC)
    if at < 0:
        return True
    tail = line[at + len(LINE_CRC):]
    return tail[-1:] == b"}" and tail[:-1].isdigit() and int(tail[:-1]) == zlib.crc32(line[:at])

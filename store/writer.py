"""Writing one shard of a run: a background thread, bounded memory, commit marker last.

One :class:`RunWriter` owns one part (``--shard I/N``) and holds an exclusive lock on it, so two
processes never write the same files.  Records arrive through a bounded queue; the thread packs
their tokens into blocks, writes each block's shard file whole (atomic rename), and commits a
segment by appending one line to ``commits.jsonl`` after its data.  A writer killed at any instant
therefore leaves whole committed samples and, at most, uncommitted blocks that ``resume`` removes.
Block files, their names (the directories they were renamed and made in) and the arrays' extents
are fsynced before the commit line that covers them, and the line itself after it is written, so
committed samples also survive the node going down, not only the process.  Writing at the disk's
own speed costs a long run nothing: once the page cache is full, every writer goes at that speed.

Examples
--------
>>> from schemas.config import config_from_dict
>>> import tempfile
>>> cfg = config_from_dict({"model": {"path": "/m"}})
>>> spec = RunSpec(config=cfg, model_info={"family": "toy"}, layers=[0], hidden_size=4,
...                hidden_encoding="float32", n_total=1)
>>> run = tempfile.mkdtemp() + "/run"
>>> with RunWriter(run, spec) as w:
...     w.put(SampleRecord(index=0, sample_id="toy/0", input_ids=np.arange(3, dtype=np.int32),
...                        hidden=np.ones((1, 3, 4), np.float32)))
>>> sorted(RunWriter.committed_in(run, 0, 1))
[0]
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, KeysView
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from schemas.config import Config, config_from_dict, config_to_yaml, first_difference, invariant_view
from schemas.errors import GapError
from schemas.run import SCHEMA_VERSION, STATUS_OK, SampleRecord
from store import layout
from store.encoding import encode_value, to_float16

log = logging.getLogger("gap.store")


def _io_threads() -> int:
    """Threads writing block files at once: one per 4 CPUs this process may use, 2 to 8.

    Two keep a local disk busy (one copies into the page cache while the other waits on fsync, and
    the disk's speed is the same from 1 to 8 threads).  A filesystem that keeps up (tmpfs, a
    parallel filesystem) takes what each thread can copy (tmpfs on a 2-core VM: 1.7 GB/s from one
    thread, 4.9 from two), and an all-layer capture of a 7B model on an H100 makes ~6 GB/s.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(2, min(8, cpus // 4))


IO_THREADS = _io_threads()
LOCK_TRIES = 5  # tries 0.1 s apart to take a shard's writer lock

LIBRARIES = ("torch", "transformers", "nnsight", "accelerate", "numpy", "zarr", "xarray", "dask")


@dataclass
class RunSpec:
    """What a run measures: shared by every writer of the run and checked on every open."""

    config: Config
    model_info: dict[str, Any]
    layers: list[int]  # captured layers: hidden's `layer` coordinate ([] when activations are off)
    hidden_size: int
    hidden_encoding: str = "bfloat16"
    coords: dict[str, list[Any]] = field(default_factory=dict)
    n_total: int = 0  # rows in the configured selection (all shards)
    block_tokens: int | None = None  # tokens per hidden shard; default sizes inner chunks ~2 MB
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.hidden_encoding not in layout.ENCODINGS:
            raise ValueError(f"hidden_encoding must be one of {sorted(layout.ENCODINGS)}")
        for dim in ("layer", "method", "channel", "trunc_layer", "mode"):
            self.coords.setdefault(dim, [])
        if self.block_tokens is None:
            itemsize = np.dtype(layout.ENCODINGS[self.hidden_encoding]).itemsize
            self.block_tokens = layout.block_tokens_for(self.hidden_size, itemsize)

    def attrs(self) -> dict[str, Any]:
        """The run-invariant description stored in the root group."""
        cfg = self.config
        return {
            "schema_version": SCHEMA_VERSION,
            "config": invariant_view(cfg),
            "config_yaml": config_to_yaml(cfg),
            "model": {"path": cfg.model.path, "revision": cfg.model.revision, "dtype": cfg.model.dtype,
                      "trust_remote_code": cfg.model.trust_remote_code, **self.model_info},
            "hidden": {"layers": list(self.layers), "hidden_size": self.hidden_size,
                       "encoding": self.hidden_encoding, "block_tokens": self.block_tokens,
                       "compression": self.compression},
            "coords": self.coords,
            "n_total": self.n_total,
        }


def provenance() -> dict[str, Any]:
    """Where and with what a run was made (not compared between writers)."""
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        version = metadata.version("gap")
    except metadata.PackageNotFoundError:
        version = None
    return {"gap_version": version, "git_commit": commit, "libraries": libs,
            "created": _now(), "host": socket.gethostname()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _comparable(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in ("config_yaml", "provenance", "n_shards")}


def _with_current_defaults(attrs: dict[str, Any]) -> dict[str, Any]:
    """Stored attrs with their config read through today's schema, so a config key added since
    the run began (and left at its default) is no difference; a config that no longer reads is
    compared as stored."""
    try:
        return {**attrs, "config": invariant_view(config_from_dict(attrs["config"], "stored config"))}
    except (GapError, KeyError, TypeError):
        return attrs


@contextmanager
def _access_errors(run: Path) -> Iterator[None]:
    """Turn a permission or read-only filesystem error about ``run`` into one line; other
    ``OSError``s are real I/O failures and go on as they are."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise GapError(f"cannot write to {run}: {os.strerror(exc.errno).lower()} (read-only path?)") from None


def _check_out(run: Path) -> None:
    """Refuse an ``--out`` that is (or lies under) a file, or a folder holding something else."""
    blocker = layout.file_in_the_way(run)
    if blocker is not None:
        where = "" if blocker == run else f"{blocker} "
        raise GapError(f"--out {run}: {where}exists and is not a directory")
    # Leftovers of our own atomic writes start with a dot, and `gap slurm submit` writes its
    # scripts and config copy to slurm/ before the first task; anything else is foreign.
    if run.exists() and not (run / "zarr.json").exists() and any(
            not p.name.startswith(".") and p.name != "slurm" for p in run.iterdir()):
        raise GapError(f"{run} exists and is not a gap run (no zarr.json); choose another --out")


def _stored_attrs(run: Path) -> dict[str, Any]:
    """The ``gap`` attrs of the run whose root ``zarr.json`` exists."""
    stored = layout.read_json(run / "zarr.json").get("attributes", {}).get("gap")
    if stored is None:
        raise GapError(f"{run} is a Zarr group but not a gap run (no 'gap' attrs)")
    return stored


def _check_matches(run: Path, stored: dict[str, Any], attrs: dict[str, Any], n_shards: int,
                   keys: tuple[str, ...] | None = None) -> None:
    """Refuse a run whose stored attrs differ from ``attrs`` (on ``keys`` only, when given) or
    that was started with another shard count."""
    theirs = _comparable(_with_current_defaults(stored))
    ours = _comparable(layout.json_roundtrip(attrs))
    if keys is not None:
        theirs, ours = ({k: d.get(k) for k in keys} for d in (theirs, ours))
    diff = first_difference(theirs, ours)
    if diff:
        raise GapError(f"{run} was made with a different model or config: '{diff}' differs; "
                       "use another --out or the same config")
    if stored.get("n_shards") != n_shards:
        raise GapError(f"{run} was started with {stored.get('n_shards')} shards, not {n_shards}")


def _refuse_committed(run: Path, shard: tuple[int, int], commit_log: layout.CommitLog) -> None:
    """Refuse to start afresh a shard whose commit log holds commits (or damaged lines)."""
    if commit_log.commits or commit_log.damaged:
        n = sum(len(c["samples"]) for c in commit_log.commits)
        raise GapError(f"shard {shard[0]}/{shard[1]} of {run} already has {n} committed "
                       "samples; pass --resume to continue it")


def preflight(run: str | Path, config: Config, shard: tuple[int, int] = (0, 1), resume: bool = False) -> None:
    """Refuse, reading only, what the run store and the config decide without the model.

    ``gap capture`` calls this before loading the model (minutes for a large checkpoint on a GPU
    allocation). :class:`RunWriter` makes the same checks through the same helpers when it opens
    (:func:`ensure_run` on the whole spec, the commit log under the shard's lock), so the one-line
    errors are the same whichever comes first.

    Parameters
    ----------
    run : str or pathlib.Path
        The run directory (``--out``); it need not exist.
    config : schemas.config.Config
        The capture's config, compared with the run's on its run-invariant part.
    shard : tuple of int
        ``(shard, n_shards)`` to write.
    resume : bool
        Whether committed samples of the shard may be there (``--resume``).

    Raises
    ------
    GapError
        ``run`` is (or lies under) a file or a foreign folder; the run was made with another
        config or shard count; the shard has committed samples and ``resume`` is False.
    """
    run = Path(run)
    with _access_errors(run):
        _check_out(run)
        if (run / "zarr.json").exists():
            # the part of the run's attrs that the config alone decides
            attrs = {"config": invariant_view(config), "schema_version": SCHEMA_VERSION}
            _check_matches(run, _stored_attrs(run), attrs, shard[1], keys=tuple(attrs))
        commits = layout.part_dir(run, *shard) / layout.COMMITS
        if not resume and commits.exists():
            _refuse_committed(run, shard, layout.parse_commit_log(commits.read_bytes()))


def ensure_run(run: Path, spec: RunSpec, n_shards: int) -> dict[str, Any]:
    """Create the run's root group, or check that an existing run measures the same thing."""
    run = Path(run)
    with _access_errors(run):
        _check_out(run)
        layout.make_dirs(run)
        layout.fsync_dir(run.parent)  # the run's own name, also when something else made the folder
        attrs = {**spec.attrs(), "n_shards": n_shards, "provenance": provenance()}
        layout.create_json_exclusive(run / "zarr.json", layout.group_metadata({"gap": attrs}))
        layout.make_dirs(run / layout.PARTS)
        layout.create_json_exclusive(run / layout.PARTS / "zarr.json", layout.group_metadata({}))
    stored = _stored_attrs(run)
    _check_matches(run, stored, spec.attrs(), n_shards)
    return stored


class RunWriter:
    """Write one shard of a run from a background thread (see the module docstring)."""

    def __init__(self, run: str | Path, spec: RunSpec, shard: tuple[int, int] = (0, 1),
                 resume: bool = False, queue_size: int = 2, segment_tokens: int | None = None,
                 commit_seconds: float = 60.0) -> None:
        self.run = Path(run)
        self.spec = spec
        self.shard, self.n_shards = shard
        self.block = int(spec.block_tokens or 0)
        self.segment_tokens = segment_tokens or 16 * self.block
        self.commit_seconds = commit_seconds
        ensure_run(self.run, spec, self.n_shards)
        self.dir = layout.part_dir(self.run, self.shard, self.n_shards)
        layout.make_dirs(self.dir)
        self._lock_fh = self._lock()
        try:
            layout.create_json_exclusive(self.dir / "zarr.json", layout.group_metadata(
                {"gap": {"shard": self.shard, "n_shards": self.n_shards}}))
            commits = self._recover(resume)
            self._ensure_arrays()
        except BaseException:
            self._lock_fh.close()  # a caller that catches the error may open the shard again
            raise
        # each committed sample's latest status (a failed one may be captured again: a retry) and
        # when that record was committed (ISO 8601, UTC; a retry may redo only the failures
        # committed before some time); later commits replace earlier ones (_note_committed)
        self.committed_status: dict[int, str] = {}
        self.committed_time: dict[int, str] = {}
        for commit in commits:
            self._note_committed(commit)
        self.n_committed_segments = len(commits)
        self._cursor = commits[-1]["end"] if commits else 0  # next block-aligned token offset
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self.bytes_written = 0
        # seconds the producer was held up by the store: put() on a full queue, close()'s flush
        self.wait_seconds = 0.0
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix=f"gap-io-{self.shard}")
        self._io_pending: deque[Future] = deque()
        self._block_crcs: dict[int, list[int]] = {}  # block -> CRC-32 of its files, until committed
        self._put_ok: set[int] = set()  # samples put ok in this session (committed or still queued)
        self._thread = threading.Thread(target=self._consume, name=f"gap-writer-{self.shard}", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------
    @property
    def committed(self) -> KeysView[int]:
        """Indices of the samples this part has committed (ok or failed)."""
        return self.committed_status.keys()

    @staticmethod
    def committed_in(run: str | Path, shard: int, n_shards: int) -> set[int]:
        """Sample indices committed in one part (reading only)."""
        path = layout.part_dir(Path(run), shard, n_shards) / layout.COMMITS
        if not path.exists():
            return set()
        commits = layout.parse_commit_log(path.read_bytes()).commits
        return {s["index"] for c in commits for s in c["samples"]}

    def put(self, record: SampleRecord) -> None:
        """Queue one record for writing (blocks while the queue is full).

        A sample already committed may come again only if its committed record failed (a retry);
        one put ok in this session may not come again, and every sample must be of this shard.
        """
        self._raise_if_failed()
        if record.index % self.n_shards != self.shard:
            raise ValueError(f"sample {record.sample_id} (row {record.index}) belongs to shard "
                             f"{record.index % self.n_shards}/{self.n_shards}, not {self.shard}")
        if self.committed_status.get(record.index) == STATUS_OK or record.index in self._put_ok:
            raise ValueError(f"sample {record.sample_id} is already committed (ok) in {self.dir}")
        item = self._prepare(record)
        if record.status == STATUS_OK:
            self._put_ok.add(record.index)
        start = time.perf_counter()
        try:
            while True:
                try:
                    self._queue.put(item, timeout=0.5)
                    return
                except queue.Full:
                    self._raise_if_failed()
        finally:
            self.wait_seconds += time.perf_counter() - start

    def close(self) -> None:
        """Flush, commit what is pending, stop the thread, release the lock; re-raise its error."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self.wait_seconds += time.perf_counter() - start
        try:
            self._raise_if_failed()
        finally:
            if self._lock_fh is not None:
                self._lock_fh.close()
                self._lock_fh = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- setup ----------------------------------------------------------------------------------
    def _lock(self):
        fh = open(self.dir / layout.LOCK, "a+")
        for attempt in range(LOCK_TRIES):  # `gap store verify` holds it shared for an instant
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < LOCK_TRIES - 1:
                    time.sleep(0.1)
                    continue
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise GapError(f"shard {self.shard}/{self.n_shards} of {self.run} is being written by "
                               f"{holder}; two writers may not share a shard") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        return fh

    def _recover(self, resume: bool) -> list[dict[str, Any]]:
        """Read the commit log; with resume, drop a torn last line and uncommitted blocks.

        A damaged line's samples count as not committed (captured again); its line stays.
        """
        path = self.dir / layout.COMMITS
        data = path.read_bytes() if path.exists() else b""
        commit_log = layout.parse_commit_log(data)
        commits, good, damaged = commit_log
        if not resume:
            _refuse_committed(self.run, (self.shard, self.n_shards), commit_log)
        if damaged:
            log.warning("%s: commit line(s) %s damaged; their samples will be captured again", path,
                        ", ".join(str(n) for n, _ in damaged))
        if good != len(data):
            with open(path, "r+b") as fh:
                fh.truncate(good)
        end = commits[-1]["end"] if commits else 0
        for name, key in ((layout.HIDDEN, 1), (layout.TOKENS, 0)):
            self._drop_blocks_from(self.dir / name, end // self.block, key)
        return commits

    def _drop_blocks_from(self, array_dir: Path, first_block: int, axis: int) -> None:
        if not (array_dir / "zarr.json").exists():
            return
        chunk_root = array_dir / "c"
        base = chunk_root / "0" if axis == 1 else chunk_root
        if base.exists():
            for child in base.iterdir():
                if child.name.isdigit() and int(child.name) >= first_block:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        layout.set_array_length(array_dir, axis, first_block * self.block)

    def _ensure_arrays(self) -> None:
        spec = self.spec
        if spec.layers and not (self.dir / layout.HIDDEN / "zarr.json").exists():
            layout.make_dirs(self.dir / layout.HIDDEN)
            layout.write_json(self.dir / layout.HIDDEN / "zarr.json", layout.hidden_metadata(
                len(spec.layers), 0, spec.hidden_size, spec.hidden_encoding, self.block, spec.compression),
                fsync=True)
        if not (self.dir / layout.TOKENS / "zarr.json").exists():
            layout.make_dirs(self.dir / layout.TOKENS)
            layout.write_json(self.dir / layout.TOKENS / "zarr.json", layout.tokens_metadata(0, self.block),
                              fsync=True)

    # -- producer side --------------------------------------------------------------------------
    def _prepare(self, record: SampleRecord) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
        spec = self.spec
        n = record.n_tokens
        hidden = record.hidden
        values = dict(record.values)
        if record.status == STATUS_OK and spec.layers:
            if hidden is None:
                raise ValueError(f"sample {record.sample_id}: status ok but no hidden states")
            expect = (len(spec.layers), n, spec.hidden_size)
            if hidden.shape != expect:
                raise ValueError(f"sample {record.sample_id}: hidden shape {hidden.shape} != {expect}")
            if spec.hidden_encoding == "float16" and hidden.dtype != np.float16:
                hidden, values["fp16_overflow"] = to_float16(hidden)
            storage = np.dtype(layout.ENCODINGS[spec.hidden_encoding])
            if hidden.dtype != storage:
                raise ValueError(f"sample {record.sample_id}: hidden dtype {hidden.dtype} != {storage} "
                                 f"({spec.hidden_encoding} encoding)")
        elif record.status != STATUS_OK:
            hidden, n = None, 0  # failed samples keep their record, not their tokens
        tokens = None
        if n:
            cols = [record.input_ids,
                    record.position if record.position is not None else np.arange(n),
                    record.token_flags(), np.full(n, record.index)]
            tokens = np.stack([np.asarray(c, np.int64) for c in cols], axis=1).astype(np.int32)
        encoded = {k: encode_value(k, v, spec.coords) for k, v in values.items()}
        meta = {"index": int(record.index), "sample_id": record.sample_id, "question": record.question,
                "answer": record.answer, "answers": list(record.answers), "subset": record.subset,
                "status": record.status, "error": record.error, "n_tokens": int(n),
                "n_visual": int(np.count_nonzero(record.is_visual)) if record.is_visual is not None and n else 0,
                "values": encoded}
        return meta, tokens, hidden

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise GapError(f"disk full while writing {self.dir}; committed samples are intact, "
                               "free space and rerun with --resume") from err
            if isinstance(err, GapError):
                raise err
            raise GapError(f"writer for {self.dir} failed: {err!r}") from err

    # -- writer thread --------------------------------------------------------------------------
    def _consume(self) -> None:
        seg_samples: list[dict[str, Any]] = []
        pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # tokens not yet written as a block
        state = {"start": self._cursor, "filled": self._cursor, "t0": time.monotonic()}
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    item = ...
                if item is None:
                    break
                if item is not ...:
                    meta, tokens, hidden = item
                    meta["offset"] = self._tail(pending, state)
                    seg_samples.append(meta)
                    if tokens is not None:
                        pending.append((tokens, hidden))
                        self._write_full_blocks(pending, state)
                seg_len = self._tail(pending, state) - state["start"]
                if seg_samples and (seg_len >= self.segment_tokens
                                    or time.monotonic() - state["t0"] >= self.commit_seconds):
                    self._commit(seg_samples, pending, state)
                    seg_samples, pending = [], []
            if seg_samples:
                self._commit(seg_samples, pending, state)
        except BaseException as exc:  # surfaced to the producer by put()/close()
            self._error = exc
            log.error("writer for %s stopped: %r", self.dir, exc)
            while True:  # keep the producer from blocking on a full queue
                try:
                    if self._queue.get(timeout=0.1) is None:
                        break
                except queue.Empty:
                    if not threading.main_thread().is_alive():
                        break
        finally:
            self._io.shutdown(wait=True)

    @staticmethod
    def _tail(pending: list, state: dict[str, Any]) -> int:
        """Part-local token offset just after everything received (written or still pending)."""
        return state["filled"] + sum(len(t) for t, _ in pending)

    def _write_full_blocks(self, pending: list, state: dict[str, Any], pad: bool = False) -> None:
        while pending and (sum(len(t) for t, _ in pending) >= self.block or pad):
            tokens, hidden, pad_tokens = self._take_block(pending)
            self._write_block(state["filled"] // self.block, tokens, hidden, pad_tokens)
            state["filled"] += self.block

    def _take_block(self, pending: list) -> tuple[np.ndarray, list[np.ndarray], int]:
        """Pop up to one block of tokens from the front of ``pending``: token table, hidden views, padding."""
        b = self.block
        tok_parts, hid_parts, got = [], [], 0
        while pending and got < b:
            tokens, hidden = pending[0]
            take = min(b - got, len(tokens))
            tok_parts.append(tokens[:take])
            if hidden is not None:
                hid_parts.append(hidden[:, :take])
            if take == len(tokens):
                pending.pop(0)
            else:
                pending[0] = (tokens[take:], hidden[:, take:] if hidden is not None else None)
            got += take
        tokens = np.full((b, len(layout.TOKEN_COLUMNS)), -1, np.int32)
        tokens[:got] = np.concatenate(tok_parts)
        return tokens, hid_parts, b - got

    def _write_block(self, block_index: int, tokens: np.ndarray, hidden: list[np.ndarray], pad: int) -> None:
        """Hand one block's files to the I/O threads (at most ``IO_THREADS`` blocks in flight)."""
        files = []
        if hidden:
            pieces = layout.encode_hidden_shard(hidden, pad, self.spec.compression)
            files.append((self.dir / layout.HIDDEN / layout.hidden_chunk_key(block_index), pieces))
            self.bytes_written += layout.data_bytes(pieces)
        files.append((self.dir / layout.TOKENS / layout.tokens_chunk_key(block_index),
                      tokens.astype("<i4").tobytes()))
        self._drain_io(leave=IO_THREADS - 1)
        self._io_pending.append(self._io.submit(_write_files, block_index, files))

    def _drain_io(self, leave: int = 0) -> None:
        """Wait for the oldest blocks handed to the I/O threads until at most ``leave`` are in
        flight; re-raise the first failure."""
        while len(self._io_pending) > leave:
            block_index, crcs = self._io_pending.popleft().result()
            self._block_crcs[block_index] = crcs

    def _commit(self, samples: list[dict[str, Any]], pending: list, state: dict[str, Any]) -> None:
        stop = self._tail(pending, state)
        self._write_full_blocks(pending, state, pad=True)
        self._drain_io()  # the commit line goes after its data, never before
        end = state["filled"]
        for name, axis in ((layout.HIDDEN, 1), (layout.TOKENS, 0)):
            if (self.dir / name / "zarr.json").exists():
                layout.set_array_length(self.dir / name, axis, end)
        blocks = range(state["start"] // self.block, end // self.block)
        crcs = [self._block_crcs.pop(b) for b in blocks]
        # each block file's CRC-32 ([hidden, tokens] or [tokens]): `gap store verify --data`
        commit = {"segment": self.n_committed_segments, "start": state["start"], "stop": stop,
                  "end": end, "time": _now(), "samples": samples, "crc32": crcs}
        log_path = self.dir / layout.COMMITS
        new_log = not log_path.exists()
        with open(log_path, "ab") as fh:
            fh.write(layout.encode_commit(commit))
            fh.flush()
            os.fsync(fh.fileno())
        if new_log:
            layout.fsync_dir(self.dir)
        self.n_committed_segments += 1
        self._note_committed(commit)
        state.update(start=end, filled=end, t0=time.monotonic())
        log.debug("committed segment %d (%d samples) of %s", commit["segment"], len(samples), self.dir)


    def _note_committed(self, commit: dict[str, Any]) -> None:
        """Record the status and commit time of the samples of ``commit`` (the latest one so far)."""
        for sample in commit["samples"]:
            self.committed_status[sample["index"]] = sample["status"]
            self.committed_time[sample["index"]] = commit["time"]


def _write_files(block_index: int, files: list[tuple[Path, Any]]) -> tuple[int, list[int]]:
    """Write one block's files (on an I/O thread); their CRC-32s, computed here beside the disk's
    work rather than on the writer thread."""
    crcs = []
    for path, pieces in files:
        layout.make_dirs(path.parent)
        crcs.append(layout.pieces_crc32(pieces))
        layout.atomic_write(path, pieces, fsync=True)
    return block_index, crcs

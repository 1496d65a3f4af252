"""Reading what a run has committed: root attrs, parts and their commit logs (no xarray here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from schemas.errors import GapError
from store import layout


@dataclass
class PartState:
    shard: int
    n_shards: int
    path: Path
    commits: list[dict[str, Any]]
    log_bytes: int  # bytes of complete commit lines
    file_bytes: int  # size of commits.jsonl (larger: a torn last line)
    damaged: list[tuple[int, int]]  # (line number, commits before it) of lines that are not commits

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every committed sample record, a retried sample's earlier failed ones included."""
        return [s for c in self.commits for s in c["samples"]]

    @cached_property
    def samples(self) -> list[dict[str, Any]]:
        """Each sample's latest committed record (see :func:`store.layout.latest_samples`)."""
        return layout.latest_samples(self.commits)

    @property
    def end(self) -> int:
        return self.commits[-1]["end"] if self.commits else 0


@dataclass
class RunState:
    path: Path
    attrs: dict[str, Any]
    parts: list[PartState]

    @property
    def hidden(self) -> dict[str, Any]:
        return self.attrs["hidden"]

    @property
    def coords(self) -> dict[str, list[Any]]:
        return self.attrs["coords"]


def read_run(run: str | Path) -> RunState:
    """The committed state of a run; a one-line :class:`GapError` for anything that is not a run."""
    run = Path(run)
    if not run.is_dir():
        raise GapError(f"{run}: {'not a directory' if run.exists() else 'no such run directory'}")
    root = run / "zarr.json"
    if not root.exists():
        raise GapError(f"{run} is not a gap run (no zarr.json)")
    try:
        attrs = layout.read_json(root).get("attributes", {}).get("gap")
    except ValueError:
        raise GapError(f"{run}/zarr.json is not valid JSON") from None
    if not attrs:
        raise GapError(f"{run} is a Zarr store but not a gap run (no 'gap' attrs)")
    parts = []
    parts_dir = run / layout.PARTS
    for child in sorted(parts_dir.iterdir()) if parts_dir.exists() else []:
        ident = layout.parse_part_name(child.name)
        if ident is None or not child.is_dir():
            continue
        log_path = child / layout.COMMITS
        data = log_path.read_bytes() if log_path.exists() else b""
        log = layout.parse_commit_log(data)
        if log.damaged:
            logging.getLogger("gap.store").warning(
                "%s: commit line(s) %s damaged; their samples are not in the view (gap capture --resume "
                "captures them again)", log_path, ", ".join(str(n) for n, _ in log.damaged))
        parts.append(PartState(ident[0], ident[1], child, log.commits, log.good, len(data), log.damaged))
    return RunState(run, attrs, parts)

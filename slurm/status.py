"""Progress of a Slurm-submitted run: samples per shard from the store, job states from Slurm.

The store's commit logs say what is done (``ok``) or failed per shard; ``left`` is the rest of the
shard's rows (``schemas.run.shard_indices``). Job ids come from ``RUN/slurm/jobs.jsonl``, which
``gap slurm submit`` appends to; their states come from ``squeue`` (which also knows jobs that
finished a few minutes ago) and then ``sacct`` where accounting is enabled.

Examples
--------
>>> shard_jobs([{"capture": "12", "tasks": [0, 1]}, {"capture": "15", "tasks": [1]}])
{0: '12_0', 1: '15_1'}
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.errors import GapError
from schemas.run import RETRYABLE, STATUS_OK, shard_indices

JOBS_FILE = "jobs.jsonl"
CONFIG_FILE = "config.yaml"
# The state of a job that neither squeue (failing) nor sacct could tell: it may still be queued.
UNKNOWN = "unknown"
# sacct's one line for the pending tasks of an array: 100_[1-3,5] (with an optional %throttle)
_PENDING_TASKS = re.compile(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]")


@dataclass
class ShardProgress:
    """Samples of one shard: done (ok), failed, left (None while the run's size is unknown), and
    how many of the failed ones ``--retry-failed`` would capture again."""

    shard: int
    done: int
    failed: int
    left: int | None
    job: str | None = None
    state: str | None = None
    retryable: int = 0


def shard_progress(run_dir: str | Path, n_shards: int) -> list[ShardProgress]:
    """Per shard: committed ok / failed samples and the rows left, read from the store.

    A run that no capture task has opened yet has no store: every shard is then ``0, 0, None``.
    """
    from store.reader import read_run

    run_dir = Path(run_dir)
    if not (run_dir / "zarr.json").exists():
        return [ShardProgress(i, 0, 0, None) for i in range(n_shards)]
    state = read_run(run_dir)
    stored = state.attrs.get("n_shards")
    if stored is not None and stored != n_shards:
        raise GapError(f"{run_dir} was started with {stored} shards, but its slurm config says {n_shards}")
    n_total = state.attrs.get("n_total")
    parts = {p.shard: p for p in state.parts if p.n_shards == n_shards}
    out = []
    for i in range(n_shards):
        samples = parts[i].samples if i in parts else []
        ok = sum(s["status"] == STATUS_OK for s in samples)
        failed = len(samples) - ok
        left = None if n_total is None else len(shard_indices(n_total, i, n_shards)) - ok - failed
        out.append(ShardProgress(i, ok, failed, left, retryable=sum(s["status"] in RETRYABLE for s in samples)))
    return out


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    """The submissions recorded in ``RUN/slurm/jobs.jsonl``, oldest first."""
    path = Path(run_dir) / "slurm" / JOBS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shard_jobs(submissions: Sequence[dict[str, Any]]) -> dict[int, str]:
    """The array task (``ARRAYID_TASK``) that last ran each shard."""
    out: dict[int, str] = {}
    for sub in submissions:
        for task in sub.get("tasks", []):
            out[int(task)] = f"{sub['capture']}_{task}"
    return out


def _job_ids(text: str) -> list[str]:
    """The job ids one squeue / sacct JobID stands for (sacct folds pending array tasks).

    >>> _job_ids("100_[1-3,5%2]"), _job_ids("100_4")
    (['100_1', '100_2', '100_3', '100_5'], ['100_4'])
    """
    folded = _PENDING_TASKS.fullmatch(text)
    if not folded:
        return [text]
    job, spans = folded.groups()
    tasks = []
    for span in spans.split(","):
        first, _, last = span.partition("-")
        tasks += range(int(first), int(last or first) + 1)
    return [f"{job}_{task}" for task in tasks]


def _parse_states(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        bits = line.strip().split("|")
        if len(bits) >= 2 and bits[0]:
            # sacct writes "CANCELLED by 0"; the first word is the state.
            state = bits[1].split()[0] if bits[1].strip() else bits[1]
            states.update(dict.fromkeys(_job_ids(bits[0]), state))
    return states


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Slurm state of each job id (``123`` or ``123_4``) that squeue or sacct still knows.

    When squeue fails (a controller timeout) and sacct does not know a job either, its state is
    ``unknown (squeue failed: REASON)`` (:data:`UNKNOWN`): it may still be queued, and leaving it
    out would read as "not in the queue".

    Examples
    --------
    >>> job_states([])
    {}
    """
    ids = sorted({j.split("_")[0] for j in job_ids})
    if not ids or not shutil.which("squeue"):
        return {}
    # -t all: finished jobs stay visible for MinJobAge; -r: one line per array task.
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(),
                          "-o", "%i|%T"], capture_output=True, text=True, timeout=60, check=False)
    states = _parse_states(out.stdout) if out.returncode == 0 else {}
    if any(j not in states for j in job_ids) and shutil.which("sacct"):
        acct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                              capture_output=True, text=True, timeout=60, check=False)
        if acct.returncode == 0:  # non-zero where accounting is disabled
            states.update({k: v for k, v in _parse_states(acct.stdout).items() if k not in states})
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        states = {j: states.get(j, f"{UNKNOWN} (squeue failed: {reason})") for j in job_ids}
    return {j: states[j] for j in job_ids if j in states}


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything ``gap slurm status`` shows, as plain data (``--json`` prints it)."""
    from schemas.config import load_config

    run_dir = Path(run_dir)
    config_path = run_dir / "slurm" / CONFIG_FILE
    if not config_path.exists():
        raise GapError(f"{run_dir}: no {config_path.relative_to(run_dir)} (not submitted with gap slurm submit)")
    n_shards = load_config(config_path).slurm.shards
    shards = shard_progress(run_dir, n_shards)
    submissions = read_jobs(run_dir)
    by_shard = shard_jobs(submissions)
    analysis = submissions[-1].get("analysis") if submissions else None
    states = job_states([*by_shard.values(), *([analysis] if analysis else [])])
    for s in shards:
        s.job = by_shard.get(s.shard)
        s.state = states.get(s.job) if s.job else None
    left = [s.left for s in shards]
    return {
        "run": str(run_dir),
        "shards": [asdict(s) for s in shards],
        "done": sum(s.done for s in shards),
        "failed": sum(s.failed for s in shards),
        "retryable": sum(s.retryable for s in shards),
        "left": None if None in left else sum(left),
        "analysis": {"job": analysis, "state": states.get(analysis) if analysis else None,
                     "decision": (run_dir / "analysis" / "decision.json").exists()},
    }


def format_status(status: dict[str, Any]) -> str:
    """A table: one line per shard, then the totals and the analysis job.

    Examples
    --------
    >>> print(format_status({"run": "/r", "done": 3, "failed": 1, "retryable": 1, "left": 0,
    ...     "shards": [{"shard": 0, "done": 3, "failed": 1, "left": 0, "job": "7_0", "state": "COMPLETED"}],
    ...     "analysis": {"job": "8", "state": "RUNNING", "decision": False}}))
    run /r: 3 done, 1 failed, 0 left
    shard   done  failed    left  job         state
    0          3       1       0  7_0         COMPLETED
    1 failed for a non-data reason (out of memory, NaN/inf, an error): gap slurm submit --retry-failed redoes them
    analysis: job 8 RUNNING
    """
    def cell(value: Any) -> str:
        return "?" if value is None else str(value)

    lines = [(f"run {status['run']}: {status['done']} done, {status['failed']} failed, "
              f"{cell(status['left'])} left"),
             f"{'shard':<6}{'done':>6}{'failed':>8}{'left':>8}  {'job':<10}  state"]
    for s in status["shards"]:
        lines.append(f"{s['shard']:<6}{s['done']:>6}{s['failed']:>8}{cell(s['left']):>8}  "
                     f"{s['job'] or '-':<10}  {s['state'] or ('-' if not s['job'] else 'not in queue')}")
    if status["left"] is None:
        lines.append("? left: known once a capture task has opened the dataset and started the run")
    if status.get("retryable"):
        lines.append(f"{status['retryable']} failed for a non-data reason (out of memory, NaN/inf, an error): "
                     "gap slurm submit --retry-failed redoes them")
    ana = status["analysis"]
    if ana["job"]:
        state = ana["state"] or "not in queue"
        lines.append(f"analysis: job {ana['job']} {state}" + (", decision.json written" if ana["decision"] else ""))
    return "\n".join(lines)

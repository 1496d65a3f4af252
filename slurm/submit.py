"""Submit a run to Slurm: config copy and scripts into ``RUN/slurm/``, then two ``sbatch`` calls.

``gap slurm submit`` writes the resolved config (``--set`` applied, local relative paths made
absolute) to ``RUN/slurm/config.yaml`` so every task, requeue and resubmission reads the same
config; renders ``capture.sbatch`` (an array with one task per shard) and ``analysis.sbatch``;
submits the array with ``sbatch --parsable`` and the analysis with
``--dependency=afterok:<array id> --kill-on-invalid-dep=yes`` (a cancelled or failed capture task
then cancels the analysis instead of leaving it pending forever); appends the ids to
``RUN/slurm/jobs.jsonl``.

Resubmitting the same command to an existing run resumes it: only shards with rows left are
submitted (``gap capture --resume`` skips what the store has committed), or just the analysis
when every shard is complete. With ``--retry-failed`` the shards holding samples that failed for
a non-data reason (out of memory, NaN/inf, an intervention error) run too, and their tasks capture
those samples again. It refuses while jobs of the run are still queued or running, since two
writers of one shard would contend for its lock.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from schemas.config import Config, config_from_dict, config_to_yaml, first_difference, invariant_view, load_config
from schemas.errors import GapError
from slurm import render
from slurm.status import CONFIG_FILE, JOBS_FILE, UNKNOWN, job_states, read_jobs, shard_jobs, shard_progress

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
                 "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass
class Plan:
    """What a submission writes and runs; ``tasks`` empty means only the analysis is needed."""

    run_dir: Path
    config: Config
    tasks: list[int]
    scripts: dict[str, str] = field(default_factory=dict)  # file name -> text

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    def sbatch_commands(self, capture_id: str) -> list[list[str]]:
        """The sbatch command lines, in order (``capture_id`` fills the dependency)."""
        cmds = []
        if self.tasks:
            cmds.append(["sbatch", "--parsable", str(self.slurm_dir / render.CAPTURE_SCRIPT)])
        analysis = ["sbatch", "--parsable"]
        if self.tasks:
            analysis += [f"--dependency=afterok:{capture_id}", "--kill-on-invalid-dep=yes"]
        return cmds + [analysis + [str(self.slurm_dir / render.ANALYSIS_SCRIPT)]]


def gap_command(setup: Sequence[str], executable: str | None = None) -> list[str]:
    """How a job runs gap: the submitting environment's own, unless setup lines activate an env.

    >>> gap_command(["module load X", "conda activate gap2"])
    ['gap']
    """
    if any(re.search(r"\bactivate\b", line) for line in setup):
        return ["gap"]
    # abspath, not resolve: resolving a venv's python symlink would leave the venv.
    exe = Path(os.path.abspath(executable or sys.executable))
    sibling = exe.parent / "gap"
    return [str(sibling)] if sibling.exists() else [str(exe), "-m", "gap"]


def _absolute_local_paths(cfg: Config, base: Path) -> Config:
    """Make ``model.path`` / ``data.path`` absolute when they name something under ``base``."""
    raw = cfg.model_dump(mode="json")
    for section in ("model", "data"):
        value = raw[section].get("path")
        if value and not os.path.isabs(value) and (base / value).exists():
            raw[section]["path"] = str((base / value).absolute())
    return config_from_dict(raw)


def _check_same_run(existing_path: Path, cfg: Config) -> None:
    old = load_config(existing_path)
    diff = first_difference(invariant_view(old), invariant_view(cfg))
    if diff:
        raise GapError(f"{existing_path}: the run was submitted with a different '{diff}'; "
                       "use another --out or the same config")
    if old.slurm.shards != cfg.slurm.shards:
        raise GapError(f"{existing_path}: the run has {old.slurm.shards} shards, not {cfg.slurm.shards} "
                       "(slurm.shards)")


def plan_submission(config_path: str | Path, run_dir: str | Path, overrides: Sequence[str] = (),
                    gap: Sequence[str] | None = None, analyze_args: Sequence[str] = (),
                    retry_failed: bool = False) -> Plan:
    """Load and resolve the config, pick the shards to run, render both scripts (nothing written).

    ``gap`` is the command jobs run gap with (default: :func:`gap_command`); ``analyze_args`` are
    further ``gap analyze`` options for the analysis job; ``retry_failed`` also runs the shards
    with retryable failures, as ``gap capture --resume --retry-failed-before NOW``: the failures
    committed before this submission, not those a requeued task of it records.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "c.yaml").write_text("model: {path: /m}\\nslurm: {shards: 3, gpus: 0}\\n")
    >>> plan = plan_submission(d / "c.yaml", d / "run", gap=["gap"])
    >>> plan.tasks, sorted(plan.scripts)
    ([0, 1, 2], ['analysis.sbatch', 'capture.sbatch'])
    """
    cfg = _absolute_local_paths(load_config(config_path, list(overrides)), Path.cwd())
    run_dir = Path(os.path.abspath(run_dir))
    existing = run_dir / "slurm" / CONFIG_FILE
    if existing.exists():
        _check_same_run(existing, cfg)
    shards = shard_progress(run_dir, cfg.slurm.shards)
    tasks = [s.shard for s in shards if s.left is None or s.left > 0 or (retry_failed and s.retryable)]
    gap = list(gap) if gap is not None else gap_command(cfg.slurm.setup)
    plan = Plan(run_dir, cfg, tasks)
    config_copy = str(plan.slurm_dir / CONFIG_FILE)
    if tasks:
        plan.scripts[render.CAPTURE_SCRIPT] = render.render_capture(
            cfg.slurm, run_dir=str(run_dir), config_path=config_copy, gap=gap, tasks=tasks,
            retry_failed_before=datetime.now(timezone.utc).isoformat(timespec="seconds") if retry_failed else None)
    plan.scripts[render.ANALYSIS_SCRIPT] = render.render_analysis(cfg.slurm, run_dir=str(run_dir),
                                                                  config_path=config_copy, gap=gap,
                                                                  analyze_args=analyze_args)
    return plan


def format_dry_run(plan: Plan) -> str:
    """The scripts and the sbatch commands a submission would run, for ``--dry-run``."""
    out = [f"# gap slurm submit --dry-run: nothing written, nothing submitted (run {plan.run_dir})"]
    if not plan.tasks:
        out.append("# every shard is complete: only the analysis would be submitted")
    for name, text in plan.scripts.items():
        out += [f"# ===== {plan.slurm_dir / name}", text.rstrip("\n")]
    out.append("# ===== submitted as")
    cmds = [shlex.join(cmd) for cmd in plan.sbatch_commands("__ID__")]
    if plan.tasks:
        out.append(f"CAPTURE_ID=$({cmds[0]})")
    out.append(cmds[-1].replace("__ID__", '"$CAPTURE_ID"'))
    return "\n".join(out) + "\n"


def write_plan(plan: Plan) -> None:
    """Write the config copy and the scripts into ``RUN/slurm/`` (group-readable, never world)."""
    old = os.umask(0o027)
    try:
        (plan.slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    for name, text in {CONFIG_FILE: config_to_yaml(plan.config), **plan.scripts}.items():
        _write_private(plan.slurm_dir / name, text)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` whole (readers see the old text or the new), group-readable, never world."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o640)  # a leftover temporary file keeps its own mode through O_TRUNC
        fh.write(text)
    os.replace(tmp, path)


def sbatch(cmd: Sequence[str]) -> str:
    """Run one ``sbatch --parsable`` command; return the job id (a one-line GapError on failure)."""
    if not shutil.which(cmd[0]):
        raise GapError(f"{cmd[0]} not found on PATH: run on a Slurm login node, or use --dry-run")
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, umask=0o027, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise GapError(f"{' '.join(cmd)} failed: {reason}")
    # --parsable prints "jobid" or "jobid;cluster".
    return done.stdout.strip().split(";")[0]


def _check_not_active(run_dir: Path) -> None:
    submissions = read_jobs(run_dir)
    if not submissions:
        return
    jobs = list(shard_jobs(submissions).values())
    if submissions[-1].get("analysis"):
        jobs.append(submissions[-1]["analysis"])
    states = job_states(jobs)
    unknown = sorted(j for j, s in states.items() if s.startswith(UNKNOWN))
    if unknown:  # possibly still queued: a second writer per shard must not start
        raise GapError(f"{run_dir}: cannot tell whether jobs {', '.join(unknown)} are still queued "
                       f"({states[unknown[0]]}); try again")
    active = {j: s for j, s in states.items() if s in ACTIVE_STATES}
    if active:
        listed = ", ".join(f"{j} {s}" for j, s in sorted(active.items()))
        raise GapError(f"{run_dir} still has jobs in the queue ({listed}); wait for them or scancel them first")


def submit(plan: Plan) -> dict[str, object]:
    """Write the plan, submit capture (if any shard has rows left) then analysis; record the ids.

    The capture array is recorded as soon as it is submitted, so that a failing analysis
    submission cannot hide it from the next ``gap slurm submit`` (which would start a second
    writer on every shard).
    """
    _check_not_active(plan.run_dir)
    write_plan(plan)
    capture_id = sbatch(plan.sbatch_commands("")[0]) if plan.tasks else None
    record: dict[str, object] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "capture": capture_id,
                                 "tasks": plan.tasks, "analysis": None, "scripts": sorted(plan.scripts)}
    if capture_id:
        _record(plan, record)
    try:
        record["analysis"] = sbatch(plan.sbatch_commands(capture_id or "")[-1])
    except GapError as exc:
        if capture_id:
            raise GapError(f"capture array {capture_id} was submitted (and recorded), but the analysis was not: "
                           f"{exc}; fix it, then `gap slurm submit` again once the capture is done") from None
        raise
    _record(plan, record, replace_last=bool(capture_id))
    return record


def _record(plan: Plan, record: dict[str, object], replace_last: bool = False) -> None:
    """Append ``record`` to the run's jobs file, or put it in place of the last line."""
    path = plan.slurm_dir / JOBS_FILE
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if replace_last:
        lines = lines[:-1]
    _write_private(path, "".join(lines) + json.dumps(record) + "\n")


def describe(plan: Plan, record: dict[str, object]) -> str:
    """What ``gap slurm submit`` prints after submitting."""
    lines = []
    if record["capture"]:
        lines.append(f"capture array job {record['capture']}: {len(plan.tasks)} task(s), shards "
                     f"{render.array_spec(plan.tasks)} of {plan.config.slurm.shards}")
    else:
        lines.append("capture: every shard is complete, nothing to capture")
    lines.append(f"analysis job {record['analysis']}"
                 + (f" (starts after job {record['capture']} succeeds)" if record["capture"] else ""))
    lines.append(f"scripts, config copy and logs: {plan.slurm_dir}; progress: gap slurm status {plan.run_dir}")
    return "\n".join(lines)


"""Render readable sbatch scripts from a :class:`schemas.config.SlurmConfig` (pure functions).

A script is four named slots, like dask-jobqueue's template: the ``#SBATCH`` *header*, the
*prologue* (site setup lines from ``slurm.setup``, then the offline environment), the *command*
and the *epilogue*. ``slurm.extra`` / ``slurm.analysis.extra`` are the escape hatch for site flags
(``-C gpu``, ``--account=...``, ``--qos=...``), copied as extra ``#SBATCH`` lines.

Every path that comes from a config or the command line goes through :func:`shlex.quote`, once,
into a shell variable (``RUN=...``) that the rest of the script uses as ``"$RUN"``.

Preemption and time limits: the capture array asks for ``--signal=B:USR1@<signal_seconds>``.
``B:`` sends the warning to the batch shell only (without it Slurm signals job *steps*, and the
capture runs in the batch step, not in an ``srun`` step); the shell passes it on to ``gap
capture``, which finishes the current batch, commits and exits 0. The script then requeues itself
(``--requeue``, ``--open-mode=append`` keeps one log) and the next start resumes from the store.
A stop that committed nothing (the warning came while the model was still loading) exits
:data:`schemas.run.STOPPED_WITHOUT_PROGRESS` instead, and the script fails rather than requeue:
every restart would hit the same wall.
On ``scancel``, a time-limit kill or a preemption Slurm sends SIGTERM to every process of the job
itself, so the shell does not forward SIGTERM (a second signal must not reach ``gap capture``) and
only waits for it to commit.  The analysis job works the same way: on the warning ``gap analyze``
stops, the job requeues itself, and the restart goes on after the geometry pass's finished layers
(or, when no new layer group was finished, exits :data:`~schemas.run.STOPPED_WITHOUT_PROGRESS`
and is not requeued).

Nothing from a config or the command line may carry a backslash, CR or LF into an ``#SBATCH``
line (sbatch reads its own escapes there) or into the run and config paths.

Examples
--------
>>> from schemas.config import SlurmConfig
>>> script = render_capture(SlurmConfig(shards=2, gpus=0), run_dir="/runs/r 1",
...                         config_path="/runs/r 1/slurm/config.yaml", gap=["gap"])
>>> "#SBATCH --array=0-1" in script and "RUN='/runs/r 1'" in script
True
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import PurePath

from schemas.config import ConfigError, SlurmAnalysisConfig, SlurmConfig, slurm_memory_per
from schemas.run import STOPPED_WITHOUT_PROGRESS

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
CAPTURE_SCRIPT = "capture.sbatch"
ANALYSIS_SCRIPT = "analysis.sbatch"
# A shard that keeps hitting its time limit without finishing is requeued at most this often.
MAX_REQUEUES = 50

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}")
# Characters no #SBATCH value may hold: sbatch reads its own escapes there, and a line break
# would start a directive or a command of its own.
_HEADER_FORBIDDEN = "\\\r\n"


def _check_line(value: str, key: str, forbidden: str = "\r\n") -> None:
    """Refuse a value with a line break (or another ``forbidden`` character), naming ``key``."""
    if any(char in value for char in forbidden):
        what = "a single line" if forbidden == "\r\n" else "a single line without backslashes"
        raise ConfigError(f"{key}: {value!r} must be {what}")


def _check_paths(run_dir: str, config_path: str) -> None:
    """The run directory and config path land in #SBATCH lines (logs) and shell variables."""
    for key, value in (("run directory", run_dir), ("config path", config_path)):
        _check_line(value, key, _HEADER_FORBIDDEN)


def _check_resources(mem: str | None, time: str, extra: Sequence[str], prefix: str) -> None:
    slurm_memory_per(mem, list(extra), prefix)
    if not _TIME.fullmatch(time):
        raise ConfigError(f"{prefix}.time: {time!r} is not a Slurm time (e.g. \"02:00:00\", \"1-12:00:00\")")


def time_seconds(text: str) -> int:
    """Seconds in a Slurm ``--time`` value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S).

    >>> time_seconds("02:00:00"), time_seconds("90"), time_seconds("1-12")
    (7200, 5400, 129600)
    """
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H[:M[:S]]
        h, m, s = (parts + [0, 0])[:3]
    else:  # M, M:S or H:M:S
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def array_spec(tasks: Sequence[int]) -> str:
    """Slurm ``--array`` text for task ids, compressing runs into ranges.

    >>> array_spec([0, 1, 2, 3])
    '0-3'
    >>> array_spec([1, 3, 4, 5, 7])
    '1,3-5,7'
    """
    ids = sorted({int(t) for t in tasks})
    if not ids:
        raise ValueError("no array tasks to render")
    parts, start, prev = [], ids[0], ids[0]
    for t in ids[1:] + [None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if t is not None:
            start = prev = t
    return ",".join(parts)


def log_pattern(directory: str | PurePath, pattern: str) -> str:
    """An sbatch ``--output`` value: ``%`` in the directory doubled so only ``pattern`` expands.

    >>> log_pattern("/runs/100%", "capture_%A_%a.out")
    '/runs/100%%/capture_%A_%a.out'
    """
    return str(PurePath(directory)).replace("%", "%%") + "/" + pattern


def extra_directives(extra: Sequence[str], key: str) -> list[str]:
    """``#SBATCH`` lines for site flags (``-C gpu`` -> ``#SBATCH -C gpu``), as dask-jobqueue does.

    >>> extra_directives(["-C gpu", "#SBATCH --qos=long"], "slurm.extra")
    ['#SBATCH -C gpu', '#SBATCH --qos=long']
    """
    out = []
    for i, item in enumerate(extra):
        item = item.strip()
        _check_line(item, f"{key}[{i}]", _HEADER_FORBIDDEN)
        if item.startswith("#SBATCH"):
            out.append(item)
        elif item.startswith("-"):
            out.append(f"#SBATCH {item}")
        else:
            raise ConfigError(f"{key}[{i}]: {item!r} is not an sbatch option (start it with '-')")
    return out


def _directive(option: str, value: object, key: str | None = None) -> str:
    """One ``#SBATCH --option=value`` line; ``key`` names the config key a bad value came from."""
    _check_line(str(value), key or f"--{option}", _HEADER_FORBIDDEN)
    return f"#SBATCH --{option}={shlex.quote(str(value))}"


def _resources(partition: str | None, cpus: int, mem: str | None, time: str, prefix: str) -> list[str]:
    lines = [_directive("partition", partition, f"{prefix}.partition")] if partition else []
    lines += [_directive("nodes", 1), _directive("ntasks", 1), _directive("cpus-per-task", cpus)]
    return (lines + ([_directive("mem", mem, f"{prefix}.mem")] if mem is not None else [])
            + [_directive("time", time, f"{prefix}.time")])


def _prologue(setup: Sequence[str], variables: dict[str, str]) -> list[str]:
    for i, line in enumerate(setup):
        _check_line(line, f"slurm.setup[{i}]")
    lines = ["# --- prologue: site setup (slurm.setup), then no network from here on"]
    lines += list(setup)
    # set -u only after the setup lines: conda's activate scripts read unset variables.
    lines += ["set -uo pipefail", "export " + " ".join(f"{name}=1" for name in OFFLINE_ENV)]
    lines += [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    return lines


def render_script(header: Sequence[str], prologue: Sequence[str], command: Sequence[str],
                  epilogue: Sequence[str] = ()) -> str:
    """Join the four slots into a bash script (``umask 027``: nothing a job writes is world-readable).

    >>> print(render_script(["#SBATCH --time=1"], ["X=1"], ["echo $X"]))
    #!/usr/bin/env bash
    #SBATCH --time=1
    umask 027
    X=1
    echo $X
    <BLANKLINE>
    """
    body = ["#!/usr/bin/env bash", *header, "umask 027", *prologue, *command, *epilogue]
    return "\n".join(body) + "\n"


def _check_signal(signal_seconds: int, time: str, key: str) -> None:
    # A warning in the first half of the job leaves less time to work than to commit: jobs would
    # mostly requeue (or, stopped before their first commit, fail) instead of working.
    if signal_seconds and 2 * signal_seconds > time_seconds(time):
        raise ConfigError(f"slurm.signal_seconds ({signal_seconds}) must be at most half of {key} ({time}): "
                          f"raise {key} or lower slurm.signal_seconds")


def _background(command: str, on_term: str) -> list[str]:
    """Run ``command`` as the shell's child, passing SIGUSR1 on to it; ``$rc`` is its exit status
    and ``$stopped`` 1 once the warning came.  SIGTERM reaches every process of the job from
    Slurm itself, so the shell only notes it (``on_term``) and keeps waiting."""
    return ['stopped=0; child=""',
            "trap 'stopped=1; kill -USR1 \"$child\" 2>/dev/null' USR1",
            f"trap 'echo \"{on_term}\"' TERM",
            f"{command} &",
            "child=$!",
            'wait "$child"; rc=$?',
            "# wait returns early (> 128) when a trapped signal arrives; wait again for the exit status",
            'while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
            "# a child that ended while the trap ran: collect its status now; bash may have lost it",
            "# (it then says -1), which counts as a clean stop: the restart finishes what is left",
            'if [ "$stopped" -eq 1 ] && [ "$rc" -gt 128 ]; then wait "$child"; rc=$?; [ "$rc" -ge 0 ] || rc=0; fi']


def _job_name(kind: str, run_dir: str) -> str:
    name = PurePath(run_dir).name or "run"
    return f"gap-{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def render_capture(slurm: SlurmConfig, *, run_dir: str, config_path: str, gap: Sequence[str],
                   tasks: Sequence[int] | None = None, retry_failed_before: str | None = None) -> str:
    """The capture array script: one task per shard, probe first, then ``gap capture --resume``.

    Parameters
    ----------
    slurm : SlurmConfig
        Resources, site flags and setup lines (``slurm.gpus: 0`` renders no ``--gres``).
    run_dir, config_path : str
        Absolute run directory and the config copy inside it that every task reads.
    gap : sequence of str
        The command that runs gap on the node, e.g. ``["/venv/bin/gap"]`` or ``["gap"]``.
    tasks : sequence of int, optional
        Shards to (re)submit; all ``slurm.shards`` by default.
    retry_failed_before : str, optional
        Capture with ``--retry-failed-before`` this time (the submission's): the samples that
        failed for a non-data reason before it are redone, once; a requeued task leaves the
        failures of its own submission for the next ``--retry-failed``.

    Examples
    --------
    >>> s = render_capture(SlurmConfig(shards=4, gpus=4, signal_seconds=300), run_dir="/r",
    ...                    config_path="/r/slurm/config.yaml", gap=["gap"], tasks=[1, 3])
    >>> [line for line in s.splitlines() if line.startswith(("#SBATCH --array", "#SBATCH --gres", "#SBATCH --sig"))]
    ['#SBATCH --array=1,3', '#SBATCH --gres=gpu:4', '#SBATCH --signal=B:USR1@300']
    """
    _check_paths(run_dir, config_path)
    _check_resources(slurm.mem, slurm.time, slurm.extra, "slurm")
    _check_signal(slurm.signal_seconds, slurm.time, "slurm.time")
    n = slurm.shards
    tasks = list(range(n)) if tasks is None else list(tasks)
    if any(not 0 <= t < n for t in tasks):
        raise ConfigError(f"slurm.shards: tasks {tasks} are not all in 0..{n - 1}")
    log = log_pattern(PurePath(run_dir) / "slurm" / "logs", "capture_%A_%a.out")
    header = [_directive("job-name", _job_name("capture", run_dir)),
              _directive("array", array_spec(tasks)),
              *_resources(slurm.partition, slurm.cpus, slurm.mem, slurm.time, "slurm")]
    if slurm.gpus:
        header.append(_directive("gres", f"gpu:{slurm.gpus}"))
    header += [_directive("output", log), _directive("open-mode", "append"), "#SBATCH --requeue"]
    if slurm.signal_seconds:
        header.append(_directive("signal", f"B:USR1@{slurm.signal_seconds}"))
    header += extra_directives(slurm.extra, "slurm.extra")
    header.append(f"# gap capture, {n} shard(s): written by `gap slurm submit`; "
                  "resubmitting the same command resumes from the store.")
    gap_cmd = shlex.join(gap)
    prologue = _prologue(slurm.setup, {"RUN": run_dir, "CONFIG": config_path})
    prologue += [f'SHARD="$SLURM_ARRAY_TASK_ID/{n}"',
                 ('echo "$(date "+%F %T") gap capture shard $SHARD of $RUN on $(hostname)'
                  ' (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}, restart ${SLURM_RESTART_COUNT:-0})"')]
    command = [
        "# --- command: check the node fast, then capture this shard in the background so that",
        "# the shell can pass the time-limit warning (SIGUSR1) on to it",
        f'{gap_cmd} slurm probe "$CONFIG" || exit 1',
        *_background(f'{gap_cmd} capture "$CONFIG" --out "$RUN" --shard "$SHARD" --resume'
                     + (f" --retry-failed-before {shlex.quote(retry_failed_before)}" if retry_failed_before else ""),
                     "gap capture shard $SHARD: SIGTERM, waiting for the current batch to commit"),
    ]
    epilogue = ["# --- epilogue: stopped before the time limit -> back into the queue; the restart resumes",
                # ARRAY_TASK, not SLURM_JOB_ID: for one task that id can be the array's, requeueing all.
                'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                *_requeue_epilogue("gap capture shard $SHARD", "$task", "slurm.time")]
    return render_script(header, prologue, command, epilogue)


NOT_REQUEUED_RC = 75  # stopped early and not back in the queue (EX_TEMPFAIL)


def _requeue_epilogue(what: str, task: str, time_key: str) -> list[str]:
    """Requeue ``task`` after a stop at the time-limit warning; when that cannot happen (the
    requeue limit, scontrol failing, or a stop without progress:
    :data:`~schemas.run.STOPPED_WITHOUT_PROGRESS`) exit non-zero, so that no ``afterok`` job starts
    on an unfinished run."""
    return [
        f'if [ "$rc" -eq {STOPPED_WITHOUT_PROGRESS} ] && [ "$stopped" -eq 1 ]; then',
        (f'    echo "{what} stopped before committing anything: raise {time_key} or lower '
         'slurm.signal_seconds; not requeued" >&2'),
        "fi",
        'if [ "$rc" -eq 0 ] && [ "$stopped" -eq 1 ]; then',
        f'    if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {MAX_REQUEUES} ]; then',
        f'        echo "{what} stopped early; requeueing {task}"',
        f'        scontrol requeue "{task}" && exit 0',
        "    fi",
        f'    echo "{what} stopped early and is not requeued (limit {MAX_REQUEUES} or scontrol failed); '
        'run gap slurm submit again" >&2',
        f"    rc={NOT_REQUEUED_RC}",
        "fi",
        'exit "$rc"',
    ]


def render_analysis(slurm: SlurmConfig, *, run_dir: str, config_path: str, gap: Sequence[str],
                    analyze_args: Sequence[str] = ()) -> str:
    """The analysis job script (CPU): ``gap analyze RUN --config CONFIG --out RUN/analysis --workers
    CPUS [analyze_args]``.

    ``config_path`` is the submission's config copy: its ``analysis`` and ``slurm`` sections
    replace the run's, so settings changed at a resubmission take effect. ``analyze_args`` are
    further ``gap analyze`` options (e.g. ``--no-plots``). The script is submitted with
    ``--dependency=afterok:<capture array id>`` on the sbatch command line, since that id exists
    only after the capture array is submitted.

    Examples
    --------
    >>> s = render_analysis(SlurmConfig(), run_dir="/r", config_path="/r/slurm/config.yaml",
    ...                     gap=["gap"])  # the site's default partition
    >>> [line for line in s.splitlines() if "--partition" in line or line.startswith("gap analyze")]
    ['gap analyze "$RUN" --config "$CONFIG" --out "$RUN/analysis" --workers 8 &']
    >>> s = render_analysis(SlurmConfig(analysis={"partition": "cpu"}), run_dir="/r", config_path="/r/c.yaml",
    ...                     gap=["gap"])
    >>> [line for line in s.splitlines() if "--partition" in line]
    ['#SBATCH --partition=cpu']
    """
    _check_paths(run_dir, config_path)
    ana: SlurmAnalysisConfig = slurm.analysis
    _check_resources(ana.mem, ana.time, ana.extra, "slurm.analysis")
    _check_signal(slurm.signal_seconds, ana.time, "slurm.analysis.time")
    log = log_pattern(PurePath(run_dir) / "slurm" / "logs", "analysis_%j.out")
    header = [_directive("job-name", _job_name("analyze", run_dir)),
              *_resources(ana.partition, ana.cpus, ana.mem, ana.time, "slurm.analysis"),
              _directive("output", log), _directive("open-mode", "append"), "#SBATCH --requeue"]
    if slurm.signal_seconds:
        header.append(_directive("signal", f"B:USR1@{slurm.signal_seconds}"))
    header += [*extra_directives(ana.extra, "slurm.analysis.extra"),
               "# gap analysis: written by `gap slurm submit`; runs once every capture task succeeded."]
    prologue = _prologue(slurm.setup, {"RUN": run_dir, "CONFIG": config_path})
    more = "".join(" " + shlex.quote(arg) for arg in analyze_args)
    command = ["# --- command: one Dask worker per allocated CPU (without task binding a job sees",
               "# every core of the node), in the background so that the shell can pass the",
               "# time-limit warning (SIGUSR1) on to it",
               *_background(f'{shlex.join(gap)} analyze "$RUN" --config "$CONFIG" --out "$RUN/analysis" '
                                        f'--workers {ana.cpus}{more}',
                            "gap analyze: SIGTERM")]
    epilogue = ["# --- epilogue: stopped before the time limit -> back into the queue; the restart goes on",
                "# after the geometry pass's finished layers",
                *_requeue_epilogue("gap analyze", "$SLURM_JOB_ID", "slurm.analysis.time")]
    return render_script(header, prologue, command, epilogue)

"""sbatch rendering, submission planning with a fake sbatch, status from a store, the device probe.

No Slurm needed here (the real cluster tests are in test_slurm_cluster.py). The golden dry-run
lives in tests/golden/; regenerate it only on purpose with ``GAP_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from schemas.config import ConfigError, SlurmConfig, load_config
from schemas.errors import GapError
from slurm import cli, probe, render, status, submit
from slurm.probe import parse_bytes

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]

PROFILE_4GPU = {
    "model": {"path": "/models/Qwen3-VL-30B-A3B-Thinking", "dtype": "bfloat16"},
    "data": {"name": "chartqa", "path": "/data/chartqa", "split": "test", "limit": 100},
    "capture": {"causal": {"methods": ["zero", "swap"]}},
    "slurm": {"partition": "gpu", "gpus": 4, "cpus": 8, "mem": "64G", "time": "02:00:00", "shards": 4,
              "setup": ["module load Miniforge3", "conda activate gap2"], "extra": ["-C gpu", "--account=vlm"],
              "analysis": {"partition": "cpu", "cpus": 8, "mem": "32G", "time": "01:00:00"}},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GAP_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: generate it with GAP_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"output differs from {path} (GAP_UPDATE_GOLDEN=1 regenerates it)"


# ----------------------------------------------------------------------------- rendering

def test_dry_run_4gpu_profile_matches_golden(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "qwen3.yaml", PROFILE_4GPU)
    run = "/scratch/alice/runs/qwen3 4gpu"
    assert cli.main(["submit", str(cfg), "--out", run, "--dry-run", "--set", "data.limit=200"]) == 0
    out = capsys.readouterr().out
    check_golden("slurm_submit_4gpu.txt", out)
    assert not Path(run).exists()  # a dry run writes nothing
    # The lines the issue names, spelled out (the golden file could be regenerated wrongly).
    for line in ["#SBATCH --array=0-3", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --time=02:00:00",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH -C gpu", "#SBATCH --account=vlm", "module load Miniforge3", "conda activate gap2",
                 "umask 027", "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
                 "RUN='/scratch/alice/runs/qwen3 4gpu'", 'gap slurm probe "$CONFIG" || exit 1',
                 'gap capture "$CONFIG" --out "$RUN" --shard "$SHARD" --resume &',
                 'gap analyze "$RUN" --config "$CONFIG" --out "$RUN/analysis" --workers 8 &',
                 "CONFIG='/scratch/alice/runs/qwen3 4gpu/slurm/config.yaml'", "#SBATCH --partition=cpu",
                 "#SBATCH --mem=32G",
                 ("sbatch --parsable --dependency=afterok:\"$CAPTURE_ID\" --kill-on-invalid-dep=yes "
                  "'/scratch/alice/runs/qwen3 4gpu/slurm/analysis.sbatch'")]:
        assert line in out.splitlines(), line
    # Site setup comes before the work, and each script has exactly one shebang at its top.
    capture = out.split("# ===== ")[1]
    assert capture.index("conda activate gap2") < capture.index("slurm probe") < capture.index("gap capture \"$CONFIG\"")
    assert out.count("#!/usr/bin/env bash") == 2


def test_header_lines_follow_the_config() -> None:
    slurm = SlurmConfig(partition=None, gpus=0, shards=3, signal_seconds=0, extra=["#SBATCH --qos=long"])
    text = render.render_capture(slurm, run_dir="/r", config_path="/r/slurm/config.yaml", gap=["gap"],
                                 tasks=[0, 2])
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0,2" in header and "#SBATCH --qos=long" in header
    assert not any(k in line for line in header for k in ("--partition", "--gres", "--signal"))
    assert 'SHARD="$SLURM_ARRAY_TASK_ID/3"' in text


@pytest.mark.parametrize("tasks, spec", [([0], "0"), ([3, 0, 1, 2], "0-3"), ([0, 2, 3, 5, 6, 7, 9], "0,2-3,5-7,9")])
def test_array_spec(tasks: list[int], spec: str) -> None:
    assert render.array_spec(tasks) == spec


@pytest.mark.parametrize("change, key", [
    ({"extra": ["C gpu"]}, "slurm.extra[0]"),
    ({"extra": ["-C gpu\n#SBATCH --x"]}, "slurm.extra[0]"),
    ({"setup": ["module load x\nrm -rf /"]}, "slurm.setup[0]"),
    ({"mem": "64 GB"}, "slurm.mem"),
    ({"time": "2h"}, "slurm.time"),
    ({"extra": ["--mem-per-cpu=4G"]}, r"slurm.mem=64G and slurm.extra '--mem-per-cpu=4G' exclude"),
    ({"time": "00:05:00", "signal_seconds": 300}, "slurm.signal_seconds"),
    # the warning must leave the job at least as long to work as it reserves for committing
    ({"time": "00:09:00", "signal_seconds": 300}, r"slurm.signal_seconds \(300\) must be at most half of slurm.time"),
    # a trailing line break passed `$`; a backslash or line break must not reach an #SBATCH line
    ({"mem": "64G\n"}, "slurm.mem"),
    ({"time": "02:00:00\n"}, "slurm.time"),
    ({"partition": "gpu\n#SBATCH --x"}, "slurm.partition"),
    ({"partition": "gpu\\"}, "slurm.partition"),
    ({"extra": ["--qos=long\\"]}, "slurm.extra[0]"),
    ({"extra": ["--qos=long\r--x"]}, "slurm.extra[0]"),
])
def test_bad_slurm_values_are_one_line_errors(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as err:
        render.render_capture(SlurmConfig(**change), run_dir="/r", config_path="/r/c.yaml", gap=["gap"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, key", [
    ({"mem": "32G\n"}, "slurm.analysis.mem"),
    ({"time": "01:00:00\n"}, "slurm.analysis.time"),
    ({"partition": "cpu\\"}, "slurm.analysis.partition"),
    ({"extra": ["--account=x\n#SBATCH --y"]}, r"slurm.analysis.extra\[0\]"),
])
def test_bad_analysis_header_values_are_one_line_errors(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as err:
        render.render_analysis(SlurmConfig(analysis=change), run_dir="/r", config_path="/r/c.yaml", gap=["gap"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("run_dir, config_path, key", [
    ("/runs/r\n#SBATCH --x", "/r/c.yaml", "run directory"),
    ("/runs/r\\1", "/r/c.yaml", "run directory"),
    ("/runs/r", "/r/c\r.yaml", "config path"),
])
def test_paths_with_backslashes_or_line_breaks_are_refused(run_dir: str, config_path: str, key: str) -> None:
    for render_one in (render.render_capture, render.render_analysis):
        with pytest.raises(ConfigError, match=f"^{key}: ") as err:
            render_one(SlurmConfig(), run_dir=run_dir, config_path=config_path, gap=["gap"])
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, seconds", [("45", 45 * 60), ("10:30", 10 * 60 + 30), ("02:00:00", 7200),
                                           ("2-0", 2 * 86400), ("1-02:03", 86400 + 2 * 3600 + 3 * 60),
                                           ("1-02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4)])
def test_time_seconds(text: str, seconds: int) -> None:
    assert render.time_seconds(text) == seconds


def test_analysis_passes_extra_arguments_quoted() -> None:
    text = render.render_analysis(SlurmConfig(), run_dir="/r", config_path="/r/my config.yaml",
                                  gap=["/opt/my env/bin/gap"], analyze_args=["--set", "analysis.tau=0.02 ; rm x"])
    assert ("'/opt/my env/bin/gap' analyze \"$RUN\" --config \"$CONFIG\" --out \"$RUN/analysis\" --workers 8 "
            "--set 'analysis.tau=0.02 ; rm x'") in text
    assert "CONFIG='/r/my config.yaml'" in text.splitlines()


def test_memory_can_be_left_to_the_site_or_given_per_cpu() -> None:
    slurm = SlurmConfig(mem=None, extra=["--mem-per-cpu=4G"],
                        analysis={"mem": None, "extra": ["--mem-per-gpu 20G"]})
    capture = render.render_capture(slurm, run_dir="/r", config_path="/r/c.yaml", gap=["gap"])
    analysis = render.render_analysis(slurm, run_dir="/r", config_path="/r/c.yaml", gap=["gap"])
    assert "--mem=" not in capture and "#SBATCH --mem-per-cpu=4G" in capture
    assert "--mem=" not in analysis and "#SBATCH --mem-per-gpu 20G" in analysis
    with pytest.raises(ConfigError, match=r"^slurm.analysis.mem=32G and slurm.analysis.extra"):
        render.render_analysis(SlurmConfig(analysis={"extra": ["--mem-per-cpu=1G"]}), run_dir="/r",
                               config_path="/r/c.yaml", gap=["gap"])


def test_analysis_time_is_checked() -> None:
    slurm = SlurmConfig(analysis={"time": "1 hour"})
    with pytest.raises(ConfigError, match="slurm.analysis.time"):
        render.render_analysis(slurm, run_dir="/r", config_path="/r/c.yaml", gap=["gap"])


HOSTILE = "/tmp/it's a \"run\" $HOME `id` 100%"


def _fake_bin(tmp_path: Path, probe_rc: int = 0, capture_rc: int | None = None, stop_rc: int = 0) -> Path:
    """``gap`` and ``scontrol`` stand-ins that record their argv (one JSON line per call).

    ``gap capture`` exits ``capture_rc`` at once, or (None) waits up to 10 s for SIGUSR1 and then
    exits ``stop_rc`` with "stopped early", as capture/cli.py does (``gap analyze`` waits too).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    (bin_dir / "gap").write_text(f"""#!{sys.executable}
import json, signal, sys, time
with open({str(record)!r}, "a") as fh:
    fh.write(json.dumps(["gap", *sys.argv[1:]]) + "\\n")
if sys.argv[1] == "slurm":
    sys.exit({probe_rc})
if sys.argv[1] == "capture" and {capture_rc!r} is not None:
    sys.exit({capture_rc!r})
if sys.argv[1] in ("capture", "analyze"):
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    open({str(tmp_path / "started")!r}, "w").close()
    for _ in range(200):
        if got:
            print("stopped early"); sys.exit({stop_rc})
        time.sleep(0.05)
""")
    (bin_dir / "scontrol").write_text(f"""#!{sys.executable}
import json, sys
with open({str(record)!r}, "a") as fh:
    fh.write(json.dumps(["scontrol", *sys.argv[1:]]) + "\\n")
""")
    for name in ("gap", "scontrol"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("restarts", [0, render.MAX_REQUEUES])
def test_script_passes_hostile_paths_verbatim_and_requeues_on_usr1(tmp_path: Path, restarts: int) -> None:
    """Run the rendered capture script with bash (no Slurm): paths with quotes, spaces, $, `, %
    reach gap as single arguments, unchanged; SIGUSR1 reaches gap capture; the script requeues
    its own array task, or fails when it may not (so that the analysis waiting on it never starts)."""
    bin_dir = _fake_bin(tmp_path)
    config = HOSTILE + "/slurm/config.yaml"
    text = render.render_capture(SlurmConfig(shards=4, gpus=0), run_dir=HOSTILE, config_path=config,
                                 gap=[str(bin_dir / "gap")])
    returncode, out, err, calls = _warn_while_running(tmp_path, bin_dir, text, restarts)
    assert calls[:2] == [["gap", "slurm", "probe", config],
                         ["gap", "capture", config, "--out", HOSTILE, "--shard", "2/4", "--resume"]]
    assert "stopped early" in out
    if restarts < render.MAX_REQUEUES:
        assert returncode == 0, err
        assert calls[2:] == [["scontrol", "requeue", "77_2"]] and "requeueing 77_2" in out
    else:
        assert returncode == render.NOT_REQUEUED_RC and calls[2:] == []
        assert "is not requeued (limit 50 or scontrol failed)" in err


def _warn_while_running(tmp_path: Path, bin_dir: Path, text: str,
                        restarts: int = 0) -> tuple[int, str, str, list[list[str]]]:
    """Run a rendered job script with bash over the stand-ins, send it SIGUSR1 once its gap runs;
    return (exit code, stdout, stderr, calls)."""
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "79", "SLURM_RESTART_COUNT": str(restarts)}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does: the batch shell only
    out, err = proc.communicate(timeout=30)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return proc.returncode, out, err, calls


@pytest.mark.parametrize("kind, key", [("capture", "slurm.time"), ("analysis", "slurm.analysis.time")])
def test_a_stop_without_progress_is_not_requeued(tmp_path: Path, kind: str, key: str) -> None:
    """A warning before the first commit (a model still loading): requeueing would hit the same
    wall up to MAX_REQUEUES times, so the job fails with the reason instead."""
    bin_dir = _fake_bin(tmp_path, stop_rc=render.STOPPED_WITHOUT_PROGRESS)
    gap = [str(bin_dir / "gap")]
    slurm = SlurmConfig(shards=4, gpus=0)
    text = (render.render_capture(slurm, run_dir="/r", config_path="/r/c.yaml", gap=gap) if kind == "capture"
            else render.render_analysis(slurm, run_dir="/r", config_path="/r/c.yaml", gap=gap))
    returncode, _, err, calls = _warn_while_running(tmp_path, bin_dir, text)
    assert returncode == render.STOPPED_WITHOUT_PROGRESS
    assert not [c for c in calls if c[0] == "scontrol"]
    assert f"stopped before committing anything: raise {key} or lower slurm.signal_seconds; not requeued" in err


def test_capture_and_analyze_exit_with_the_code_the_scripts_expect() -> None:
    from analyze import cli as analyze_cli
    from capture import cli as capture_cli

    assert (capture_cli.STOPPED_WITHOUT_PROGRESS == analyze_cli.STOPPED_WITHOUT_PROGRESS
            == render.STOPPED_WITHOUT_PROGRESS)
    assert render.STOPPED_WITHOUT_PROGRESS not in (0, 1, 2, render.NOT_REQUEUED_RC)  # success, GapError, argparse


def test_capture_stopped_while_the_model_loads_exits_without_progress(tiny_checkpoint, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture,
                                                                      signal_handlers: None) -> None:
    import capture.family
    from capture import cli as capture_cli

    config = write_yaml(tmp_path / "c.yaml", {"model": {"path": str(tiny_checkpoint("llava", n_layers=2)),
                                                        "dtype": "float32"},
                                              "data": {"name": "synthetic", "limit": 2}})
    loader = capture.family.load_model

    def warned_while_loading(cfg):
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's time-limit warning, before any batch
        return loader(cfg)

    monkeypatch.setattr(capture.family, "load_model", warned_while_loading)
    rc = capture_cli.main([str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == render.STOPPED_WITHOUT_PROGRESS
    assert "stopped before committing anything (SIGUSR1): raise slurm.time or lower slurm.signal_seconds" in err


def _run_single_task_script(tmp_path: Path, **fake: int) -> tuple[int, list[list[str]]]:
    """Render a one-shard capture script over the stand-ins, run it, return (exit code, calls)."""
    bin_dir = _fake_bin(tmp_path, **fake)
    script = tmp_path / "capture.sbatch"
    script.write_text(render.render_capture(SlurmConfig(shards=1, gpus=0), run_dir="/r",
                                            config_path="/r/c.yaml", gap=[str(bin_dir / "gap")]))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "5", "SLURM_JOB_ID": "5"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    calls = [json.loads(line)[:2] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return done.returncode, calls


def test_script_without_signal_does_not_requeue_and_passes_exit_code(tmp_path: Path) -> None:
    returncode, calls = _run_single_task_script(tmp_path, capture_rc=3)
    assert returncode == 3
    assert calls == [["gap", "slurm"], ["gap", "capture"]]  # no scontrol requeue


def test_probe_failure_stops_the_script(tmp_path: Path) -> None:
    returncode, calls = _run_single_task_script(tmp_path, probe_rc=1)
    assert returncode == 1
    assert calls == [["gap", "slurm"]]  # gap capture never ran


# ----------------------------------------------------------------------------- submission

def test_gap_command_uses_the_submitting_interpreter() -> None:
    assert submit.gap_command(["source /opt/venv/bin/activate"]) == ["gap"]
    here = submit.gap_command([])
    assert Path(here[0]).parent == Path(os.path.abspath(sys.executable)).parent
    assert here in ([str(Path(os.path.abspath(sys.executable)).parent / "gap")],
                    [os.path.abspath(sys.executable), "-m", "gap"])
    fake = "/nonexistent/env/bin/python3"
    assert submit.gap_command([], executable=fake) == [fake, "-m", "gap"]


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``sbatch`` on PATH that records its argv and answers ids 100, 101, ... (submitit-style)."""
    bin_dir = tmp_path / "sbatch_bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.jsonl"
    (bin_dir / "sbatch").write_text(f"""#!{sys.executable}
import json, os, sys
log = {str(log)!r}
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "umask": os.umask(0)}}) + "\\n")
print(f"{{100 + n}};cluster")
""")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_submit_writes_config_copy_and_chains_analysis(tmp_path: Path, fake_sbatch: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "models/tiny"}, "data": {"limit": 5},
                                           "slurm": {"shards": 2, "gpus": 0}})
    run = tmp_path / "run"
    assert cli.main(["submit", str(cfg), "--out", "run", "--set", "data.limit=7"]) == 0
    out = capsys.readouterr().out
    assert "capture array job 100: 2 task(s), shards 0-1 of 2" in out and "analysis job 101" in out
    calls = [json.loads(line) for line in fake_sbatch.read_text().splitlines()]
    assert calls[0]["argv"] == ["--parsable", str(run / "slurm" / "capture.sbatch")]
    assert calls[1]["argv"] == ["--parsable", "--dependency=afterok:100", "--kill-on-invalid-dep=yes",
                                str(run / "slurm" / "analysis.sbatch")]
    assert all(c["umask"] == 0o027 for c in calls)  # Slurm creates the logs with this umask
    copy = load_config(run / "slurm" / "config.yaml")
    assert copy.data.limit == 7 and copy.model.path == str(tmp_path / "models" / "tiny")
    assert f"CONFIG={run}/slurm/config.yaml" in (run / "slurm" / "capture.sbatch").read_text()
    assert status.read_jobs(run)[0]["capture"] == "100" and status.read_jobs(run)[0]["tasks"] == [0, 1]
    for path in (run / "slurm").rglob("*"):
        assert path.stat().st_mode & 0o007 == 0, path

    # The same run with a different measurement is refused, naming the key.
    with pytest.raises(GapError, match="'data.limit'"):
        submit.plan_submission(cfg, run, ["data.limit=8"])
    with pytest.raises(GapError, match="slurm.shards"):
        submit.plan_submission(cfg, run, ["data.limit=7", "slurm.shards=3"])


def test_a_failed_analysis_submission_still_records_the_capture(tmp_path: Path, fake_sbatch: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the next submit must know the capture array is there (or it would start a second writer per shard)
    real = submit.sbatch

    def rejects_analysis(command):
        if "analysis.sbatch" in command[-1]:
            raise GapError("sbatch failed: invalid partition specified: cpu")
        return real(command)

    monkeypatch.setattr(submit, "sbatch", rejects_analysis)
    monkeypatch.setattr(submit, "job_states", lambda jobs: {j: "RUNNING" for j in jobs})
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/m"}, "data": {"limit": 4},
                                           "slurm": {"shards": 2, "gpus": 0}})
    run = tmp_path / "run"
    with pytest.raises(GapError, match="capture array 100 was submitted \\(and recorded\\), but the analysis"):
        submit.submit(submit.plan_submission(cfg, run, gap=["gap"]))
    assert status.read_jobs(run) == [{**status.read_jobs(run)[0], "capture": "100", "tasks": [0, 1],
                                      "analysis": None}]
    with pytest.raises(GapError, match=r"still has jobs in the queue \(100_0 RUNNING, 100_1 RUNNING\)"):
        submit.submit(submit.plan_submission(cfg, run, gap=["gap"]))


def test_a_failing_squeue_does_not_read_as_an_empty_queue(tmp_path: Path, fake_sbatch: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/m"}, "data": {"limit": 4},
                                           "slurm": {"shards": 2, "gpus": 0}})
    run = tmp_path / "run"
    submit.submit(submit.plan_submission(cfg, run, gap=["gap"]))  # no squeue on PATH: nothing known
    bin_dir = fake_sbatch.parent / "sbatch_bin"
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'squeue: error: Socket timed out on send/recv' >&2\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'sacct: error: accounting storage is disabled' >&2\nexit 1\n")
    (bin_dir / "sacct").chmod(0o755)
    with pytest.raises(GapError, match=r"run: cannot tell whether jobs 100_0, 100_1, 101 are still queued "
                                       r"\(unknown \(squeue failed: squeue: error: Socket timed out on send/recv\)\); "
                                       r"try again$"):
        submit.submit(submit.plan_submission(cfg, run, gap=["gap"]))
    assert len(status.read_jobs(run)) == 1  # nothing submitted twice
    # status shows the states as unknown, not as "not in queue"
    unknown = "unknown (squeue failed: squeue: error: Socket timed out on send/recv)"
    assert status.job_states(["100_0"]) == {"100_0": unknown}
    text = status.format_status(status.run_status(run))
    assert f"100_1       {unknown}" in text and f"analysis: job 101 {unknown}" in text
    assert "not in queue" not in text


def test_sacct_pending_array_ranges_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # squeue has forgotten the array; sacct folds its pending tasks into one line
    (tmp_path / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "sacct").write_text("#!/bin/sh\nprintf '100_0|COMPLETED\\n100_[1-3,5%%2]|PENDING\\n101|PENDING\\n'\n")
    for name in ("squeue", "sacct"):
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert status.job_states(["100_0", "100_1", "100_3", "100_4", "100_5", "101"]) == {
        "100_0": "COMPLETED", "100_1": "PENDING", "100_3": "PENDING", "100_5": "PENDING", "101": "PENDING"}


def test_submit_without_sbatch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/m"}, "slurm": {"gpus": 0}})
    with pytest.raises(GapError, match="sbatch not found on PATH"):
        submit.submit(submit.plan_submission(cfg, tmp_path / "run", gap=["gap"]))


# ----------------------------------------------------------------------------- status from a store

def _partial_store(run: Path) -> None:
    """12 samples in 2 shards: shard 0 complete (with one failed sample), shard 1 has 2 of 6."""
    sys.path.insert(0, str(Path(__file__).parent))
    from storekit import make_record, make_spec

    from store.writer import RunWriter

    spec = make_spec(n_total=12)
    with RunWriter(run, spec, shard=(0, 2)) as writer:
        for index in range(0, 12, 2):
            writer.put(make_record(index, spec, fail_every=4))  # fails 3, 7, 11: none of shard 0
    with RunWriter(run, spec, shard=(1, 2)) as writer:
        for index in (1, 3):
            writer.put(make_record(index, spec, fail_every=4))


def test_status_and_resubmission_follow_the_store(tmp_path: Path, fake_sbatch: Path) -> None:
    run = tmp_path / "run"
    _partial_store(run)
    progress = status.shard_progress(run, 2)
    assert [(p.done, p.failed, p.left) for p in progress] == [(6, 0, 0), (1, 1, 4)]
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/models/toy"}, "slurm": {"shards": 2, "gpus": 0}})
    plan = submit.plan_submission(cfg, run, gap=["gap"])
    assert plan.tasks == [1]  # only the shard with rows left
    assert "#SBATCH --array=1\n" in plan.scripts["capture.sbatch"]
    submit.submit(plan)
    shown = status.run_status(run)  # no squeue here: job states unknown
    assert (shown["done"], shown["failed"], shown["left"]) == (7, 1, 4)
    assert [s["job"] for s in shown["shards"]] == [None, "100_1"]
    text = status.format_status(shown)
    assert "7 done, 1 failed, 4 left" in text and "100_1" in text and "? left" not in text
    # before the first capture task opened the dataset, nothing knows the run's size yet
    pending = {"run": "/r", "done": 0, "failed": 0, "retryable": 0, "left": None,
               "shards": [{"shard": 0, "done": 0, "failed": 0, "left": None, "job": "7_0", "state": "PENDING"}],
               "analysis": {"job": None, "state": None, "decision": False}}
    assert "? left: known once a capture task has opened the dataset" in status.format_status(pending)
    with pytest.raises(GapError, match="started with 2 shards"):
        status.shard_progress(run, 3)


def test_retry_failed_resubmits_only_shards_with_retryable_failures(tmp_path: Path) -> None:
    # Every row is committed; shard 0 has an out-of-memory sample, shard 1 only a data error.
    sys.path.insert(0, str(Path(__file__).parent))
    from storekit import make_record, make_spec

    from schemas.run import failed_record
    from store.writer import RunWriter

    run = tmp_path / "run"
    spec = make_spec(n_total=8)
    with RunWriter(run, spec, shard=(0, 2)) as writer:
        for index in (0, 2, 4, 6):
            writer.put(failed_record(4, "toy/test/4", "CUDA out of memory", status="oom") if index == 4
                       else make_record(index, spec))
    with RunWriter(run, spec, shard=(1, 2)) as writer:
        for index in (1, 3, 5, 7):
            writer.put(make_record(index, spec, fail_every=4))  # 3 and 7: data errors
    progress = status.shard_progress(run, 2)
    assert [(p.done, p.failed, p.left, p.retryable) for p in progress] == [(3, 1, 0, 1), (2, 2, 0, 0)]
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/models/toy"}, "slurm": {"shards": 2, "gpus": 0}})
    assert submit.plan_submission(cfg, run, gap=["gap"]).tasks == []  # only the analysis
    before = datetime.now(timezone.utc).replace(microsecond=0)
    plan = submit.plan_submission(cfg, run, gap=["gap"], retry_failed=True)
    assert plan.tasks == [0]
    # the submission's time: a requeued task of it does not redo the failures it recorded itself
    stamp = re.search(r'--shard "\$SHARD" --resume --retry-failed-before (\S+) &$', plan.scripts["capture.sbatch"],
                      re.MULTILINE).group(1)
    assert before <= datetime.fromisoformat(stamp) <= datetime.now(timezone.utc)
    with RunWriter(run, spec, shard=(0, 2), resume=True) as writer:  # what that task does
        writer.put(make_record(4, spec))
    assert [(p.done, p.failed, p.retryable) for p in status.shard_progress(run, 2)] == [(4, 0, 0), (2, 2, 0)]
    assert submit.plan_submission(cfg, run, gap=["gap"], retry_failed=True).tasks == []


def test_status_of_a_run_not_yet_started(tmp_path: Path, fake_sbatch: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"path": "/m"}, "slurm": {"shards": 3, "gpus": 0}})
    submit.submit(submit.plan_submission(cfg, tmp_path / "run", gap=["gap"]))
    assert cli.main(["status", str(tmp_path / "run"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["left"] is None and [s["job"] for s in shown["shards"]] == ["100_0", "100_1", "100_2"]
    with pytest.raises(GapError, match="not submitted with gap slurm submit"):
        status.run_status(tmp_path)


# ----------------------------------------------------------------------------- the device probe

def _model_dir(tmp_path: Path, weight_bytes: int = 3000) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as fh:
        fh.truncate(weight_bytes)  # sparse: a large checkpoint's size without its bytes
    return model


def _probe_config(tmp_path: Path, weight_bytes: int = 3000, **changes: object) -> Path:
    data = {"model": {"path": str(_model_dir(tmp_path, weight_bytes))}, "data": {"name": "synthetic"}, "slurm": {"gpus": 0}}
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return write_yaml(tmp_path / "probe.yaml", data)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache for the probe (the machine's own cache must not leak in)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_probe_without_cuda_fails_in_one_line(tmp_path: Path) -> None:
    """``python -m slurm.probe`` on this CPU-only machine with slurm.gpus=4: one line, exit 1."""
    cfg = _probe_config(tmp_path, slurm__gpus=4)
    done = subprocess.run([sys.executable, "-m", "slurm.probe", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("gap slurm probe: error: CUDA is not available on ") and "slurm.gpus=4" in lines[0]


def test_probe_cpu_only_passes_without_torch(tmp_path: Path) -> None:
    cfg = _probe_config(tmp_path)
    code = ("import sys; from slurm import probe, cli, submit, status, render; "
            f"assert probe.main([{str(cfg)!r}]) == 0; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "probe ok" in done.stdout and "CPU only (slurm.gpus=0)" in done.stdout
    assert "(1 weight files, 0.00 GB)" in done.stdout


@pytest.mark.parametrize("changes, message", [
    ({"model__path": "/nonexistent/model"}, "model.path /nonexistent/model is neither a directory nor in the HF hub"),
    ({"model__path": "org/not-cached"}, "model.path org/not-cached is neither a directory"),
    ({"data__name": "chartqa"}, "data.path is not set and HuggingFaceM4/ChartQA (chartqa) is not in the HF hub cache"),
    ({"data__name": "docvqa", "data__path": "/nonexistent/docvqa"}, "data.path /nonexistent/docvqa does not exist"),
])
def test_probe_names_what_is_missing(tmp_path: Path, hub: Path, changes: dict, message: str) -> None:
    with pytest.raises(GapError, match=re.escape(message)) as err:
        probe.main([str(_probe_config(tmp_path, **changes))])
    assert "\n" not in str(err.value)


def test_probe_finds_hub_cache_entries(tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture) -> None:
    snap = hub / "models--org--tiny" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"\0" * 10)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc")
    (hub / "datasets--someone--chartqa-copy" / "snapshots" / "x").mkdir(parents=True)  # not the loader's repo
    with pytest.raises(GapError, match="HuggingFaceM4/ChartQA .* is not in the HF hub cache"):
        probe.main([str(_probe_config(tmp_path, model__path="org/tiny", data__name="chartqa"))])
    data_snap = hub / "datasets--HuggingFaceM4--ChartQA" / "snapshots" / "def"
    data_snap.mkdir(parents=True)
    assert probe.main([str(_probe_config(tmp_path, model__path="org/tiny", data__name="chartqa"))]) == 0
    out = capsys.readouterr().out
    assert f"model {snap} (1 weight files" in out and f"data chartqa in hub cache ({data_snap})" in out


class _FakeCuda:
    """torch.cuda as a node with ``n`` GPUs of ``gib`` GiB would answer."""

    def __init__(self, n: int, gib: int) -> None:
        self.n, self.gib = n, gib

    def is_available(self) -> bool:
        return self.n > 0

    def device_count(self) -> int:
        return self.n

    def get_device_properties(self, i: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total_memory=self.gib * 2**30)

    def get_device_name(self, i: int) -> str:
        return "Fake H100"


@pytest.mark.parametrize("visible, changes, message", [
    (4, {}, None),
    (2, {}, r"shows 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=.*\), slurm.gpus asks for 4"),
    (4, {"model__max_memory": {"0": "90GiB", "cpu": "200GiB"}}, r"model.max_memory\[0\]=90GiB exceeds GPU 0's 80.0 GiB"),
    (4, {"weights": 320 * 10**9}, r"model weights \(320.0 GB\) do not fit in 4 GPU\(s\) of 80.0 GiB"),
])
def test_probe_gpu_checks(tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                          visible: int, changes: dict, message: str | None) -> None:
    """GPU count, per-GPU budget and total weights against the config, with a stand-in torch.cuda."""
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda(visible, 80)))
    weights = changes.pop("weights", 250 * 10**9)  # 0.9 x 4 x 80 GiB = 309 GB fit
    cfg = _probe_config(tmp_path, weights, slurm__gpus=4, **changes)
    if message is None:
        assert probe.main([str(cfg)]) == 0
        assert "4 x Fake H100 (80.0 GiB); data synthetic (generated); model" in capsys.readouterr().out
    else:
        with pytest.raises(GapError, match=message):
            probe.main([str(cfg)])


@pytest.mark.parametrize("text, value", [("70GiB", 70 * 2**30), ("80GB", 80 * 10**9), ("64G", 64 * 2**30),
                                         ("1.5T", int(1.5 * 2**40)), ("512", 512)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_cli_help_lists_the_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("submit", "status", "probe", "resubmits only the shards"))


@pytest.mark.parametrize("child, expected", [
    # ends while the shell runs its USR1 trap: its own status, or 0 where bash lost it (never 138)
    ('trap "" USR1; kill -USR1 $PPID; exit 3', {(3, 1), (0, 1)}),
    # stops cleanly on the warning it was passed
    ('trap "exit 0" USR1; kill -USR1 $PPID; sleep 5 & wait', {(0, 1)}),
    ('trap "" USR1; kill -USR1 $PPID; sleep 0.3; exit 4', {(4, 1)}),
    ("exit 5", {(5, 0)}),
    ("kill -KILL $$", {(137, 0)}),
])
def test_background_child_status_survives_the_warning(child, expected):
    # The job scripts' wrapper: `rc` must be the child's status whenever the time-limit warning
    # (SIGUSR1) lands; a child ending inside the trap used to leave rc=138 and fail the task.
    lines = render._background(f"bash -c {shlex.quote(child)}", "TERM")
    script = "\n".join([*lines, 'echo "$rc $stopped"'])
    for _ in range(3):
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20).stdout
        assert tuple(int(x) for x in out.split()) in expected, out


def test_probe_reads_the_snapshot_the_loader_reads(tmp_path: Path, hub: Path) -> None:
    # refs/main (or model.revision), not the alphabetically last snapshot
    repo = hub / "models--org--tiny"
    for commit in ("aaa", "mmm", "zzz"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    (repo / "refs" / "v2").write_text("mmm")

    def snapshot(**model: object) -> Path:
        return probe.model_dir(load_config(_probe_config(tmp_path, model__path="org/tiny", **model)))

    assert snapshot() == repo / "snapshots" / "aaa"
    assert snapshot(model__revision="v2") == repo / "snapshots" / "mmm"
    assert snapshot(model__revision="zzz") == repo / "snapshots" / "zzz"
    with pytest.raises(GapError, match="model.path org/tiny is neither a directory nor in the HF hub cache at "
                                       "revision v3"):
        snapshot(model__revision="v3")

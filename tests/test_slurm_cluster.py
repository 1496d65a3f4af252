"""The sbatch scripts on a real single-node Slurm (started by ``slurm_cluster``).

First tier: the scripts' mechanics with a fake ``gap`` (array tasks, afterok dependency,
SIGUSR1 -> requeue -> resume, scancel -> analysis cancelled -> resubmission). Second tier: the
real ``gap capture`` / ``gap analyze`` on a tiny model on CPUs, an uninterrupted run and one
whose task is cancelled mid-shard and resubmitted, compared with each other.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)

from schemas.errors import GapError
from slurm import status as slurm_status
from slurm import submit

pytestmark = pytest.mark.slurm

FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}

# A stand-in for `gap` with the same command line: capture appends one line per sample to
# RUN/fake/shard_I.txt (skipping lines already there, like --resume), and on SIGUSR1 / SIGTERM
# finishes the current sample and exits 0 with "stopped early", like capture/cli.py.
FAKE_GAP = r'''
import signal, sys, time, json
from pathlib import Path
argv = sys.argv[1:]
if argv[:2] == ["slurm", "probe"]:
    print("probe ok (fake)"); sys.exit(0)
if argv[0] == "capture":
    import yaml
    cfg = yaml.safe_load(open(argv[1]))
    run = Path(argv[argv.index("--out") + 1]); shard, n = map(int, argv[argv.index("--shard") + 1].split("/"))
    assert "--resume" in argv
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append("USR1"))
    signal.signal(signal.SIGTERM, lambda *a: stop.append("TERM"))
    out = run / "fake" / f"shard_{shard}.txt"; out.parent.mkdir(parents=True, exist_ok=True)
    done = set(out.read_text().split()) if out.exists() else set()
    print(f"capture start shard {shard} done={len(done)}", flush=True)
    for row in range(shard, cfg["data"]["limit"], n):
        if str(row) in done:
            continue
        if stop:
            print(f"stopped early ({stop[0]})", flush=True); sys.exit(0)
        time.sleep(float(cfg["data"]["seed"]) / 1000)
        with open(out, "a") as fh:
            fh.write(f"{row}\n")
    print("capture done", flush=True)
if argv[0] == "analyze":
    run = Path(argv[1]); outdir = Path(argv[argv.index("--out") + 1]); outdir.mkdir(parents=True, exist_ok=True)
    # RUN/fake/analysis_steps (when there) asks for that many 0.2 s steps, each logged once in
    # RUN/fake/analysis_done; SIGUSR1 stops between steps with exit 0, like analyze/cli.py.
    steps = run / "fake" / "analysis_steps"; done = run / "fake" / "analysis_done"
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append("USR1"))
    for step in range(int(steps.read_text()) if steps.exists() else 0):
        if done.exists() and str(step) in done.read_text().split():
            continue
        if stop:
            print(f"analysis stopped early ({stop[0]})", flush=True); sys.exit(0)
        time.sleep(0.2)
        with open(done, "a") as fh:
            fh.write(f"{step}\n")
    rows = [int(x) for p in sorted((run / "fake").glob("shard_*.txt")) for x in p.read_text().split()]
    (outdir / "decision.json").write_text(json.dumps({"rows": rows, "time": time.time()}))
'''


def wait_for(predicate: Callable[[], object], what: str, timeout: float, cluster: SlurmCluster) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    queue = cluster.run("squeue", "-t", "all", check=False).stdout
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{queue}\n{cluster.logs()}")


def states(cluster: SlurmCluster, job: str) -> dict[str, str]:
    """Array task / job id -> state, for one submitted job id."""
    out = cluster.run("squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%i|%T", check=False)
    return dict(line.split("|") for line in out.stdout.split() if "|" in line)


def wait_final(cluster: SlurmCluster, job: str, n: int, timeout: float) -> dict[str, str]:
    def finished() -> dict[str, str] | None:
        got = states(cluster, job)
        return got if len(got) == n and set(got.values()) <= FINAL else None

    return wait_for(finished, f"job {job} to finish", timeout, cluster)


def write_config(path: Path, model: str, limit: int, shards: int, seed: int = 0, **slurm: object) -> Path:
    cfg = {"model": {"path": model},
           "data": {"name": "synthetic", "limit": limit, "seed": seed},
           "slurm": {"partition": "cpu", "gpus": 0, "cpus": 1, "mem": "500M", "time": "00:10:00",
                     "shards": shards, "signal_seconds": 60,
                     "analysis": {"partition": "cpu", "cpus": 1, "mem": "500M", "time": "00:10:00"},
                     **slurm}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fake_gap(tmp_path: Path) -> list[str]:
    script = tmp_path / "bin" / "gap"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n{FAKE_GAP}")
    script.chmod(0o755)
    return [str(script)]


def fake_rows(run: Path) -> list[int]:
    return [int(x) for p in sorted((run / "fake").glob("shard_*.txt")) for x in p.read_text().split()]


def test_fake_array_usr1_requeue_and_dependency(slurm_cluster: SlurmCluster, fake_gap: list[str],
                                                tmp_path: Path) -> None:
    """Task 1 gets the time-limit warning mid-shard: it stops, requeues itself and finishes later;
    the analysis starts only after both tasks completed and sees every row exactly once."""
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path), limit=40, shards=2, seed=150)  # 150 ms/row
    run = tmp_path / "run with space"
    record = submit.submit(submit.plan_submission(cfg, run, gap=fake_gap))
    job, task1 = record["capture"], f"{record['capture']}_1"
    shard1 = run / "fake" / "shard_1.txt"
    wait_for(lambda: shard1.exists() and len(shard1.read_text().split()) >= 3, "shard 1 to start", 60,
             slurm_cluster)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", task1)
    final = wait_final(slurm_cluster, job, 2, 120)
    assert final == {f"{job}_0": "COMPLETED", task1: "COMPLETED"}
    wait_final(slurm_cluster, record["analysis"], 1, 60)

    log1 = (run / "slurm" / "logs" / f"capture_{job}_1.out").read_text()
    assert "stopped early (USR1)" in log1 and f"requeueing {task1}" in log1
    assert f"job {task1}, restart 1)" in log1 and log1.count("capture done") == 1
    log0 = (run / "slurm" / "logs" / f"capture_{job}_0.out").read_text()
    assert "restart 1" not in log0 and "stopped early" not in log0  # only task 1 was requeued
    assert sorted(fake_rows(run)) == list(range(40))  # nothing lost, nothing twice
    decision = json.loads((run / "analysis" / "decision.json").read_text())
    assert sorted(decision["rows"]) == list(range(40))
    assert decision["time"] > shard1.stat().st_mtime  # afterok: analysis ran after the last capture write
    # Files the jobs wrote: group-readable at most, never world-accessible (umask 027).
    logs = run / "slurm" / "logs"
    for path in [run / "analysis" / "decision.json", shard1, run / "slurm" / "capture.sbatch",
                 logs / f"capture_{job}_1.out", logs / f"analysis_{record['analysis']}.out"]:
        assert path.stat().st_mode & 0o007 == 0, path


def test_fake_analysis_usr1_requeues_and_goes_on(slurm_cluster: SlurmCluster, fake_gap: list[str],
                                                tmp_path: Path) -> None:
    """The analysis job gets the time-limit warning mid-way: it stops, requeues itself and the
    restart finishes the steps left, each done exactly once."""
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path), limit=4, shards=1)
    run = tmp_path / "run"
    (run / "fake").mkdir(parents=True)
    (run / "fake" / "analysis_steps").write_text("40")
    record = submit.submit(submit.plan_submission(cfg, run, gap=fake_gap))
    done = run / "fake" / "analysis_done"
    wait_for(lambda: done.exists() and len(done.read_text().split()) >= 3, "the analysis to start", 90,
             slurm_cluster)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", record["analysis"])
    assert wait_final(slurm_cluster, record["analysis"], 1, 120) == {record["analysis"]: "COMPLETED"}
    log = (run / "slurm" / "logs" / f"analysis_{record['analysis']}.out").read_text()
    assert "analysis stopped early (USR1)" in log and f"requeueing {record['analysis']}" in log
    assert sorted(map(int, done.read_text().split())) == list(range(40))  # nothing lost, nothing twice
    assert json.loads((run / "analysis" / "decision.json").read_text())["rows"] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- the real gap

E2E_ROWS = 40  # 20 per shard, one at a time with generation: long enough to stop a task mid-shard
PER_SHARD = E2E_ROWS // 2
# A threaded scheduler and no figures: the default (a local Dask cluster, plots) adds ~25 s here.
ANALYZE_ARGS = ("--scheduler", "threads", "--no-plots")


def e2e_plan(config: Path, run: Path) -> submit.Plan:
    return submit.plan_submission(config, run, analyze_args=ANALYZE_ARGS)


@pytest.fixture(scope="module")
def e2e_config(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_checkpoint("llava", n_layers=2)
    cfg = write_config(tmp_path_factory.mktemp("e2e") / "tiny.yaml", str(model), limit=E2E_ROWS, shards=2)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["dtype"] = "float32"
    data["capture"] = {"batch_size": 1, "causal": {"methods": ["zero"]},
                       "truncation": {"modes": ["knockout"], "layers": [0], "score": ["logprob", "generate"],
                                      "max_new_tokens": 8}}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _log(run: Path, job: str, task: int) -> str:
    path = run / "slurm" / "logs" / f"capture_{job}_{task}.out"
    return path.read_text() if path.exists() else ""


def _check_complete(run: Path) -> None:
    from store.inspect import verify_run

    assert verify_run(run) == []
    progress = slurm_status.shard_progress(run, 2)
    assert [(p.done, p.failed, p.left) for p in progress] == [(PER_SHARD, 0, 0), (PER_SHARD, 0, 0)]
    decision = json.loads((run / "analysis" / "decision.json").read_text())
    assert {"cp1", "cp2", "cp3", "overall"} <= set(decision)


@pytest.fixture(scope="module")
def e2e_reference(slurm_cluster: SlurmCluster, e2e_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the 2-task capture array and its dependent analysis job."""
    run = tmp_path_factory.mktemp("e2e") / "reference run"
    record = submit.submit(e2e_plan(e2e_config, run))
    final = wait_final(slurm_cluster, record["capture"], 2, 240)
    assert set(final.values()) == {"COMPLETED"}, (final, _log(run, record["capture"], 0), _log(run, record["capture"], 1))
    assert wait_final(slurm_cluster, record["analysis"], 1, 240) == {record["analysis"]: "COMPLETED"}
    return run


def test_e2e_array_then_analysis(e2e_reference: Path) -> None:
    """The capture array and the analysis it gates give a complete, intact run and a decision."""
    _check_complete(e2e_reference)
    shown = slurm_status.run_status(e2e_reference)
    assert [s["state"] for s in shown["shards"]] == ["COMPLETED", "COMPLETED"]
    assert shown["analysis"]["state"] == "COMPLETED" and shown["analysis"]["decision"]


def test_e2e_requeue_and_scancel_then_resubmit(slurm_cluster: SlurmCluster, e2e_config: Path,
                                              e2e_reference: Path, tmp_path: Path) -> None:
    """Mid-shard, task 0 gets the time-limit warning (it commits, requeues itself, resumes) and
    task 1 is cancelled (the analysis is cancelled with it). A second `submit` is refused while
    jobs are queued, and afterwards resubmits shard 1 only. The run then equals the
    uninterrupted one: every sample once, the same values."""
    from store import open_run

    run = tmp_path / "run"
    first = submit.submit(e2e_plan(e2e_config, run))
    job = first["capture"]
    with pytest.raises(GapError, match="still has jobs in the queue"):
        submit.submit(e2e_plan(e2e_config, run))
    # The first progress line comes after a shard's first sample: signal both tasks in the loop
    # (so each commits what it has, not nothing).
    wait_for(lambda: all(" samples done (" in _log(run, job, t) for t in (0, 1)),
             "both captures to finish a sample", 180, slurm_cluster)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_0")
    slurm_cluster.run("scancel", f"{job}_1")
    final = wait_final(slurm_cluster, job, 2, 240)
    assert final == {f"{job}_0": "COMPLETED", f"{job}_1": "CANCELLED"}, (_log(run, job, 0), _log(run, job, 1))
    # --kill-on-invalid-dep: the analysis is cancelled rather than left pending forever.
    assert wait_final(slurm_cluster, first["analysis"], 1, 60) == {first["analysis"]: "CANCELLED"}
    log0 = _log(run, job, 0)
    assert "SIGUSR1 received" in log0 and f"stopped early; requeueing {job}_0" in log0 and "restart 1)" in log0
    log1 = _log(run, job, 1)
    assert "SIGTERM received" in log1 and "stopped early" in log1  # it committed its batch, then exited
    progress = slurm_status.shard_progress(run, 2)
    assert (progress[0].done, progress[0].left) == (PER_SHARD, 0)
    assert progress[1].done < PER_SHARD and progress[1].done + progress[1].left == PER_SHARD

    second = submit.submit(e2e_plan(e2e_config, run))
    assert second["tasks"] == [1]
    assert wait_final(slurm_cluster, second["capture"], 1, 240) == {f"{second['capture']}_1": "COMPLETED"}
    assert wait_final(slurm_cluster, second["analysis"], 1, 240) == {second["analysis"]: "COMPLETED"}
    assert f"shard 1/2: {PER_SHARD - progress[1].done} of {PER_SHARD} samples to do" in _log(run, second["capture"], 1)
    _check_complete(run)

    got, want = open_run(run), open_run(e2e_reference)
    assert sorted(got.sample_index.values.tolist()) == list(range(E2E_ROWS))
    got, want = got.sortby("sample_index"), want.sortby("sample_index")
    for name in ("sample_id", "logp_clean", "delta", "trunc_logp", "input_ids", "hidden"):
        assert got[name].equals(want[name]), name

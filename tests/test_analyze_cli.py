"""`gap analyze` end to end on small runs: outputs, CONTRACT names, partial runs, clusters, errors."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis_fixtures import make_run

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("causal_curves", "truncation_curves", "evd_hist", "geometry", "cka_layers", "checkpoint_summary")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    import gap

    run, truth = make_run(tmp_path_factory.mktemp("cli") / "run")
    out = run.parent / "out"
    rc = gap.main(["analyze", str(run), "--out", str(out), "--scheduler", "threads", "--workers", "2",
                   "-q", "--set", "analysis.bootstrap=100"])
    assert rc == 0
    return run, out, truth


def test_outputs_and_contract_names(analysed):
    from analyze import open_analysis

    _, out, truth = analysed
    ds = open_analysis(out)
    dims = {"effective_rank": ("layer", "modality"), "effective_rank_sample": ("sample", "layer", "modality"),
            "icc": ("sample", "layer", "modality"), "cka_modality": ("layer",),
            "cka_layers": ("modality", "layer", "layer2"), "evd": ("sample",), "cliff_layer": (),
            "trunc_correct": ("sample", "trunc_layer", "mode"), "trunc_curve": ("trunc_layer", "mode", "subset")}
    for name, expected in dims.items():
        assert ds[name].dims == expected, name
        if name not in ("evd", "cliff_layer", "trunc_correct", "trunc_curve"):
            assert ds[f"{name}_nomassive"].dims == expected
    assert list(ds.modality.values) == ["visual", "text"]
    decision = json.loads((out / "decision.json").read_text())
    assert set(decision) == {"cp1", "cp2", "cp3", "overall"}
    for key in ("cp1", "cp2", "cp3"):
        assert decision[key]["verdict"] in ("GO", "MARGINAL", "NO-GO", "N/A") and "n" in decision[key]
    report = (out / "report.md").read_text()
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").exists()
        assert f"({name}.png)" in report
    assert "Partial run" in report  # one sample failed


def test_values_follow_the_planted_run(analysed):
    from analyze import open_analysis

    _, out, truth = analysed
    ds = open_analysis(out)
    ok = [i for i in range(14) if i not in truth.failed]
    # delta = 2 up to the sample's cliff, 0 after: EVD is that layer
    assert ds.evd.values[ok].tolist() == [float(truth.cliff[i]) for i in ok]
    assert np.isnan(ds.evd.values[sorted(truth.failed)]).all()
    assert float(ds.cliff_layer) == np.quantile([truth.cliff[i] for i in ok], 0.5, method="lower")
    # easy samples never fail; hard ones fail at truncation layers <= their cliff
    tc = ds.trunc_correct.sel(mode="knockout")
    for i in ok:
        expected = [1.0 if truth.subset[i] == "easy" or not (0 <= t <= truth.cliff[i]) else 0.0
                    for t in ds.trunc_layer.values]
        assert tc.values[i].tolist() == expected
    easy = ds.trunc_curve.sel(mode="knockout", subset="easy").values
    assert (easy == 1.0).all()
    assert int(ds.trunc_curve_n.sel(mode="knockout", subset="all", trunc_layer=-1)) == len(ok)
    assert ds.attrs["n_ok"] == 13 and ds.attrs["partial"] == 1
    # the massive visual token of sample 3 at layer 2 is recorded and excluded
    hit = (ds.massive_sample.values == 3) & (ds.massive_layer.values == 2) & (ds.massive_modality.values == "visual")
    assert hit.sum() == 1
    assert int(ds.n_massive.sel(modality="visual").isel(sample=3, layer=2)) == 1


def test_partial_run_is_analysed_and_says_so(tmp_path):
    from analyze.cli import analyse

    run, _ = make_run(tmp_path / "run", n=8, n_total=20, failed=(), generate=False)
    report = analyse(run, tmp_path / "out", scheduler="threads", workers=1, plots=False, progress=False,
                     overrides=["analysis.bootstrap=50", "analysis.tau_ratio=0.1",
                                "analysis.cliff_method=threshold_crossing"])
    text = report.read_text()
    assert "Partial run" in text and "8 of 20" in text
    from analyze import open_analysis

    ds = open_analysis(tmp_path / "out")
    assert ds.attrs["n_total"] == 20 and ds.attrs["n_samples"] == 8
    assert ds.attrs["trunc_correct_source"].startswith("trunc_logp")  # no texts were generated
    # adaptive tau = 0.1 x mean D(first layer) = 0.1 x 2.0; the configured cliff method is used
    assert ds.attrs["tau"] == pytest.approx(0.2) and ds.attrs["cliff_method"] == "threshold_crossing"
    assert float(ds.cliff_layer) == float(ds.cliff_by_method.sel(cliff_method="threshold_crossing"))


def test_generated_texts_are_judged_even_when_all_are_empty(tmp_path):
    from analyze.results import ok_mask, truncation_variables
    from schemas.config import AnalysisConfig
    from store import open_run

    run = open_run(make_run(tmp_path / "run", n=4, failed=(), activations=False)[0])
    ok, subsets = ok_mask(run), np.asarray(run["subset"].values).astype(str)
    cfg = AnalysisConfig(bootstrap=10)
    (variables, _, attrs), _ = truncation_variables(run, ok, subsets, cfg)
    assert attrs["trunc_correct_source"].startswith("trunc_text")
    # every generated answer empty (the model stopped at once): all wrong, not p(answer) > 1/2
    silent = run.assign(trunc_text=run["trunc_text"].copy(data=np.full(run["trunc_text"].shape, "", object)))
    (variables, _, attrs), _ = truncation_variables(silent, ok, subsets, cfg)
    assert attrs["trunc_correct_source"].startswith("trunc_text")
    assert (variables["trunc_correct"][1] == 0.0).all()


def test_relabel_uses_the_truncation_results_only(tmp_path):
    import gap
    from analyze import open_analysis

    run, truth = make_run(tmp_path / "run", n=10, wrong=(2, 7), activations=False, seed=2)
    out = tmp_path / "out"
    assert gap.main(["analyze", str(run), "--out", str(out), "--scheduler", "threads", "-q", "--relabel",
                     "--no-plots", "--set", "analysis.bootstrap=50"]) == 0
    ds = open_analysis(out)
    # hard samples lose correctness at trunc layers 0..cliff of 4, in both modes: hard when
    # (cliff + 1) / 4 > 1/2; the capture-time label of a sample wrong at baseline is not kept
    expected = {i: "" if i in truth.failed else "unsolved" if i in (2, 7)
                else "hard" if truth.subset[i] == "hard" and truth.cliff[i] + 1 > 2 else "easy"
                for i in range(10)}
    assert dict(enumerate(ds["subset_relabelled"].values.tolist())) == expected
    assert "unsolved" in ds["subset"].values.tolist() and ds.attrs["subsets_relabelled"] == 1
    assert set(expected.values()) >= {"hard", "easy", "unsolved"}  # the case covers every label
    # CP1 stays on the capture-time labels; the relabelled split is shown beside it
    cp1 = json.loads((out / "decision.json").read_text())["cp1"]
    keyword_hard = [i for i in range(10) if truth.subset[i] == "hard" and i not in truth.failed]
    assert cp1["hard"]["n"] == len(keyword_hard) and "relabelled_not_judged" in cp1
    assert cp1["relabelled_not_judged"]["hard"]["n"] == list(expected.values()).count("hard")
    assert "relabelled (not judged)" in (out / "report.md").read_text()


def test_run_without_activations_has_no_geometry(tmp_path):
    from analyze import open_analysis
    from analyze.cli import analyse

    run, _ = make_run(tmp_path / "run", n=6, failed=(), activations=False)
    analyse(run, tmp_path / "out", scheduler="threads", workers=1, progress=False, plots=False,
            overrides=["analysis.bootstrap=50"])
    ds = open_analysis(tmp_path / "out")
    assert "effective_rank" not in ds and "evd" in ds and "trunc_curve" in ds
    decision = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert decision["cp3"]["verdict"] == "N/A" and decision["cp1"]["verdict"] != "N/A"
    assert "## Geometry" not in (tmp_path / "out" / "report.md").read_text()


def test_errors_are_one_line(tmp_path, capsys):
    import gap

    assert gap.main(["analyze", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gap analyze: error:") and "missing" in err and "\n" not in err
    from analyze import open_analysis
    from schemas.errors import GapError

    with pytest.raises(GapError, match="no analysis found"):
        open_analysis(tmp_path)


def test_sigusr1_stops_the_analysis_and_a_rerun_resumes_it(tmp_path, capsys, monkeypatch):
    # Slurm's time-limit warning arrives while the second layer group runs: `gap analyze` stops
    # with status 0 and keeps the first group; the rerun starts at the second and finishes.
    import signal

    import analyze.pipeline as pipeline
    import gap

    run, _ = make_run(tmp_path / "run")
    args = ["analyze", str(run), "--out", str(tmp_path / "out"), "--scheduler", "threads", "--workers", "1",
            "-q", "--no-plots", "--memory-budget", "1", "--set", "analysis.bootstrap=20"]
    original, ran = pipeline._GroupPass.run, []

    def warned_in_the_second_group(self, key):
        ran.append(self.la)
        if len(ran) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, key)

    monkeypatch.setattr(pipeline._GroupPass, "run", warned_in_the_second_group)
    before = signal.getsignal(signal.SIGUSR1)
    assert gap.main(args) == 0
    assert "stopped early (SIGUSR1)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) == before
    assert [p.name for p in (tmp_path / "out" / ".scratch").glob("layers-*.npz")] == ["layers-0-1.npz"]
    assert not (tmp_path / "out" / "report.md").exists()

    ran.clear()
    monkeypatch.setattr(pipeline._GroupPass, "run", lambda self, key: ran.append(self.la) or original(self, key))
    assert gap.main([a for a in args if a != "-q"]) == 0  # without -q: the resume is logged
    assert ran == [1, 2, 3] and "1 of 4 layer groups done" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.md").exists() and not (tmp_path / "out" / ".scratch").exists()


def test_help_lists_the_schedulers(capsys):
    from analyze.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "gap analyze" in text and "--scheduler" in text and "127.0.0.1" in text


def _listening(include_children: bool) -> list:
    import psutil

    procs = [psutil.Process()] + (psutil.Process().children(recursive=True) if include_children else [])
    return [c.laddr.ip for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


@pytest.mark.parametrize("scheduler", ["local", "threads"])
def test_local_clusters_listen_on_loopback_only(scheduler):
    from analyze.pipeline import open_client

    with open_client(scheduler, workers=1) as client:
        if scheduler == "local":
            assert client.scheduler.address.startswith("tcp://127.0.0.1:")
            workers = client.scheduler_info()["workers"]
            assert all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
        assert client.submit(sum, [1, 2]).result() == 3
        ips = _listening(True)
        assert set(ips) <= {"127.0.0.1"}  # nothing reachable from another machine
        assert ips or scheduler == "threads"


def test_slurm_cluster_uses_tls_and_the_config(tmp_path):
    from analyze.pipeline import slurm_cluster
    from schemas.config import SlurmAnalysisConfig

    cfg = SlurmAnalysisConfig(partition="cpu", cpus=4, mem="32G", time="00:30:00",
                              extra=["--account=lab", "#SBATCH --qos=long"])
    scratch = tmp_path / "run" / "analysis" / ".dask"  # not there yet: a fresh output directory
    cluster, security = slurm_cluster(cfg, setup=["module load Miniforge3"], scratch=scratch)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
        assert "#SBATCH #SBATCH" not in script
        for needle in ("#SBATCH -p cpu", "--cpus-per-task=4", "#SBATCH --mem=32G\n", "-t 00:30:00",
                       "#SBATCH --account=lab", "#SBATCH --qos=long", "module load Miniforge3", "--tls-key",
                       "--nworkers 4",
                       "--dashboard-address 127.0.0.1:0", "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=",
                       "MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS"):
            assert needle in script
        assert security.require_encryption
        # the exported Dask config reaches remote nannies with its upper-case keys intact
        line = next(ln for ln in script.splitlines() if "PRE_SPAWN_ENVIRON" in ln)
        probe = subprocess.run(["bash", "-c", f"{line}; {sys.executable} -c 'import dask, distributed; "
                                "print(dask.config.get(\"distributed.nanny.pre-spawn-environ\"))'"],
                               capture_output=True, text=True)
        env = ast.literal_eval(probe.stdout.strip())
        assert env["MALLOC_TRIM_THRESHOLD_"] == str(64 << 20) and env["OPENBLAS_NUM_THREADS"] == 1
        import psutil

        http_port = cluster.scheduler_info["services"]["dashboard"]
        listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == http_port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
        keys = [p for p in scratch.iterdir() if ".key." in p.name]
        assert keys and all(p.stat().st_mode & 0o077 == 0 for p in keys)  # not readable by others
    finally:
        cluster.close()
    from schemas.errors import GapError

    with pytest.raises(GapError, match="needs a run path of letters"):
        slurm_cluster(cfg, scratch=tmp_path / "my run" / ".dask")
    with pytest.raises(GapError, match="^slurm.analysis.mem is null"):
        slurm_cluster(SlurmAnalysisConfig(mem=None), scratch=scratch)


def test_unknown_scheduler_is_a_gap_error():
    from analyze.pipeline import open_client
    from schemas.errors import GapError

    with pytest.raises(GapError, match="--scheduler"):
        with open_client("mpi"):
            pass


def test_analyze_imports_without_torch():
    code = ("import sys, analyze, analyze.cli, analyze.pipeline, analyze.decisions, analyze.results, "
            "analyze.report; print(int(any(m in sys.modules for m in ('torch', 'nnsight', 'transformers', "
            "'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_one_line_errors_for_an_out_file_an_empty_run_and_a_file_as_run(tmp_path, capsys):
    import gap
    from store.writer import RunWriter
    from storekit import make_spec

    run, _ = make_run(tmp_path / "run", n=4, activations=False)
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        assert gap.main(["analyze", str(run), "--out", str(out), "-q"]) == 1
        assert capsys.readouterr().err.strip() == f"gap analyze: error: --out {out}: exists and is not a directory"
    with RunWriter(tmp_path / "empty", make_spec(n_total=4)):
        pass  # started, killed before its first commit
    assert gap.main(["analyze", str(tmp_path / "empty"), "-q"]) == 1
    assert capsys.readouterr().err.strip().endswith("empty: no committed samples yet; nothing to analyse")
    assert gap.main(["analyze", str(afile), "-q"]) == 1
    assert capsys.readouterr().err.strip().endswith("afile: not a directory")
    assert gap.main(["demo", "--out", str(afile)]) == 1
    assert capsys.readouterr().err.strip() == f"gap demo: error: --out {afile}: exists and is not a directory"


def test_config_replaces_the_analysis_settings_of_the_run(tmp_path):
    # what `gap slurm submit --set analysis.tau=0.5` resubmits: the analysis job passes its
    # config copy, whose analysis (and slurm) sections win; model/data/capture stay the run's
    import yaml

    import gap
    from analyze import open_analysis
    from analyze.cli import run_config
    from store import open_run

    run, _ = make_run(tmp_path / "run", n=6, activations=False)
    config = tmp_path / "resubmitted.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "/elsewhere"}, "data": {"limit": 1},
                                      "analysis": {"tau": 0.5, "bootstrap": 20},
                                      "slurm": {"analysis": {"cpus": 3}}}))
    cfg = run_config(open_run(run), ["analysis.bootstrap=30"], config)
    stored = run_config(open_run(run), [])
    assert (cfg.analysis.tau, cfg.analysis.bootstrap, cfg.slurm.analysis.cpus) == (0.5, 30, 3)
    assert cfg.model == stored.model and cfg.data == stored.data and cfg.capture == stored.capture
    out = tmp_path / "out"
    assert gap.main(["analyze", str(run), "--config", str(config), "--out", str(out), "-q", "--no-plots"]) == 0
    assert open_analysis(out).attrs["tau"] == 0.5
    # a hand-written file with one key: that key changes, every other setting stays the run's
    partial = tmp_path / "partial.yaml"
    partial.write_text("slurm: {analysis: {cpus: 3}}\n")
    cfg = run_config(open_run(run), [], partial)
    assert cfg.slurm.analysis.cpus == 3 and cfg.analysis == stored.analysis
    assert cfg.slurm.analysis.model_dump(exclude={"cpus"}) == stored.slurm.analysis.model_dump(exclude={"cpus"})


def test_a_layer_group_saved_again_under_its_old_name_counts_as_progress(tmp_path):
    # a restarted scratch (another fingerprint) saves its groups under the same names
    from analyze.cli import _saved_groups

    group = tmp_path / "layers-0-1.npz"
    group.write_bytes(b"first")
    before = _saved_groups(tmp_path)
    partial = tmp_path / ".layers-0-1.npz.partial"
    partial.write_bytes(b"again")
    os.replace(partial, group)  # as the pass saves a group
    assert _saved_groups(tmp_path) - before


def test_a_stop_before_any_new_layer_group_exits_without_progress(tmp_path, capsys, monkeypatch):
    # The warning comes during the first layer group: nothing saved, a requeue would stop at the
    # same point, so the exit status says so (the job script then does not requeue).
    import signal

    import analyze.pipeline as pipeline
    import gap
    from analyze.cli import STOPPED_WITHOUT_PROGRESS

    run, _ = make_run(tmp_path / "run")
    args = ["analyze", str(run), "--out", str(tmp_path / "out"), "--scheduler", "threads", "--workers", "1",
            "-q", "--no-plots", "--memory-budget", "1", "--set", "analysis.bootstrap=20"]
    original = pipeline._GroupPass.run

    def warned(self, key):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, key)

    monkeypatch.setattr(pipeline._GroupPass, "run", warned)
    assert gap.main(args) == STOPPED_WITHOUT_PROGRESS == 3
    captured = capsys.readouterr()
    assert ("gap analyze: stopped before committing anything (SIGUSR1): raise slurm.analysis.time or lower "
            "slurm.signal_seconds") in captured.err and "stopped early" not in captured.out


def test_slurm_workers_run_a_quoted_interpreter_and_can_size_memory_per_cpu(tmp_path, monkeypatch):
    from analyze.pipeline import slurm_cluster
    from schemas.config import SlurmAnalysisConfig
    from schemas.errors import GapError

    monkeypatch.setattr(sys, "executable", "/opt/my env/bin/python")
    scratch = tmp_path / "run" / "analysis" / ".dask"
    # sites that refuse per-node memory: mem null, --mem-per-cpu in extra, workers sized from both
    cfg = SlurmAnalysisConfig(cpus=4, mem=None, extra=["--mem-per-cpu=3G"])
    cluster, _ = slurm_cluster(cfg, scratch=scratch)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "'/opt/my env/bin/python' -m distributed.cli.dask_worker" in script
    assert "#SBATCH --mem-per-cpu=3G" in script and "--mem=" not in script
    assert "--memory-limit 3.00GiB" in script  # 4 x 3G over 4 worker processes
    with pytest.raises(GapError, match=r"^slurm.analysis.mem=32G and slurm.analysis.extra '--mem-per-cpu=3G' "
                                       "exclude each other"):
        slurm_cluster(SlurmAnalysisConfig(mem="32G", extra=["--mem-per-cpu=3G"]), scratch=scratch)
    with pytest.raises(GapError, match=r"^slurm.analysis.mem: '32G\\n' is not a Slurm memory size"):
        slurm_cluster(SlurmAnalysisConfig(mem="32G\n"), scratch=scratch)
    with pytest.raises(GapError, match="^slurm.analysis.mem is null"):
        slurm_cluster(SlurmAnalysisConfig(mem=None, extra=["--mem-per-gpu=3G"]), scratch=scratch)

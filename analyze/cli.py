"""``gap analyze RUN``: metrics, checkpoint decisions, plots and a report from a run store (CPU).

Examples
--------
>>> main(["runs/r1", "--out", "runs/r1/analysis", "--scheduler", "local"])   # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from schemas.errors import GapError
from schemas.run import STOPPED_WITHOUT_PROGRESS

log = logging.getLogger("gap.analyze")

DESCRIPTION = """Analyse a run store on CPUs: causal summaries (EVD, cliff, transfer window),
truncation accuracy curves, geometry (effective rank, ICC, CKA; with and without massive
activations) in one read of the activations, the checkpoint decisions CP1-CP3, figures and
report.md.  A run still being captured, or with failed samples, is analysed on its committed
samples with status ok, and the report says so.  SIGUSR1 (Slurm's time-limit warning) stops it
with exit status 0; run it again and the geometry pass goes on after its last finished layers.
A stop before this process finished any new layer group exits with status 3 instead: a rerun
would stop at the same point (give the job more time)."""

EPILOG = """schedulers:
  local            a Dask cluster of one worker process per core, on 127.0.0.1 only (default)
  threads          the same inside this process (small runs)
  slurm            dask-jobqueue SLURMCluster from the config's slurm.analysis section, TLS
  tcp://HOST:PORT  an existing Dask scheduler (tls://... with your Dask TLS config)

examples:
  gap analyze runs/r1
  gap analyze runs/r1 --out /tmp/a --set analysis.cliff_method=gradient --set analysis.massive_k=50
  gap analyze runs/r1 --config edited.yaml     # the analysis/slurm keys it sets replace the run's
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gap analyze", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory written by `gap capture`")
    p.add_argument("--out", help="output directory (default: RUN/analysis)")
    p.add_argument("--scheduler", default="local", help="local | threads | slurm | tcp://HOST:PORT")
    p.add_argument("--workers", type=int, help="local workers (default: one per available core)")
    p.add_argument("--jobs", type=int, default=1, help="Slurm jobs for --scheduler slurm (default 1)")
    p.add_argument("--config", metavar="FILE",
                   help="a gap config (or just its analysis/slurm keys): the keys it sets in its "
                        "analysis and slurm sections replace the run's, the rest stays the run's; "
                        "--set applies on top")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. analysis.tau=0.02 (VALUE is YAML); repeatable")
    p.add_argument("--memory-budget", default="256M",
                   help="memory per worker for the pooled accumulators and chunks in flight, e.g. "
                        "128M, 2G (default 256M; more means more layers per pass, fewer passes)")
    p.add_argument("--relabel", action="store_true",
                   help="relabel hard/easy from the truncation results for the curves: hard loses "
                        "correctness in over half the truncation settings; samples wrong without "
                        "truncation become 'unsolved'. CP1 stays judged on the keyword labels "
                        "(relabelled ones would pass it by construction); decision.json shows the "
                        "relabelled drops beside them")
    p.add_argument("--no-plots", action="store_true", help="skip the figures (report without them)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def parse_bytes(text: str) -> int:
    """``512M`` -> 536870912.

    >>> parse_bytes("2G"), parse_bytes("1500")
    (2147483648, 1500)
    """
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().rstrip("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise GapError(f"--memory-budget {text!r}: expected a size like 512M or 2G") from None


# The sections of a --config that replace the run's: what the analysis reads, not what was measured.
ANALYSIS_SECTIONS = ("analysis", "slurm")


def run_config(run: Any, overrides: list[str], config: str | Path | None = None) -> Any:
    """The run's stored config, its analysis settings replaced by ``config``'s, then ``--set``.

    Parameters
    ----------
    run : xarray.Dataset
        The run (``open_run``); its ``config_yaml`` attribute is the captured config.
    overrides : list of str
        ``--set KEY=VALUE`` items, applied last (analysis/slurm keys usually).
    config : path, optional
        A gap config (e.g. ``RUN/slurm/config.yaml`` of a resubmission): the keys it sets in its
        ``analysis`` and ``slurm`` sections replace the run's, the others stay the run's; its
        model, data and capture sections (which it need not have) are ignored.
    """
    import yaml

    from schemas.config import apply_overrides, config_from_dict, deep_merge, read_config_yaml

    raw = yaml.safe_load(run.attrs.get("config_yaml") or "") or {"model": {"path": str(run.attrs.get("model_path"))}}
    source = "run config"
    if config is not None:
        given = read_config_yaml(config)
        raw = deep_merge(raw, {section: given[section] for section in ANALYSIS_SECTIONS if section in given})
        source += f" + {config}"
    return config_from_dict(apply_overrides(raw, overrides), f"{source} + --set")


def analyse(run_dir: str | Path, out: str | Path | None = None, *, scheduler: str = "local",
            workers: int | None = None, jobs: int = 1, overrides: list[str] | None = None,
            config: str | Path | None = None, memory_budget: int = 256 << 20, relabel: bool = False,
            plots: bool = True, progress: bool = True) -> Path:
    """Analyse a run end to end; returns the path of ``report.md``.

    ``config`` and ``overrides`` are :func:`run_config`'s. A SIGUSR1 stop raises
    :class:`StopRequested` with ``progressed`` set when this call saved a new layer group of the
    geometry pass (what a rerun goes on from).
    """
    from analyze import results
    from analyze.decisions import decide
    from analyze.pipeline import geometry, open_client
    from analyze.report import write_report
    from store import layout, open_run, read_run

    state = read_run(run_dir)
    out = Path(out) if out else Path(run_dir) / "analysis"
    if layout.file_in_the_way(out) is not None:
        raise GapError(f"--out {out}: exists and is not a directory")
    if not any(part.commits for part in state.parts):
        raise GapError(f"{run_dir}: no committed samples yet; nothing to analyse")
    run = open_run(run_dir)
    cfg = run_config(run, overrides or [], config)
    out.mkdir(parents=True, exist_ok=True)
    ok = results.ok_mask(run)
    if run.attrs.get("n_total", 0) and (ok.sum() < run.attrs["n_total"]):
        log.warning("partial run: %d of %d samples committed with status ok; analysing those",
                    int(ok.sum()), run.attrs["n_total"])
    geo = None
    captured = state.hidden.get("layers") or []
    if "hidden" in run and captured and ok.any():
        hidden = run["hidden"].sel(layer=captured)
        scratch = out / ".scratch"
        saved_before = _saved_groups(scratch)
        try:
            with open_client(scheduler, workers=workers, slurm=cfg.slurm.analysis, setup=cfg.slurm.setup,
                             jobs=jobs, scratch=out / ".dask") as client:
                log.info("geometry over %d layers x %d tokens (%s)", len(captured), run.sizes["token"], scheduler)
                geo = geometry(hidden, run["token_sample"].values, run["is_visual"].values,
                               run["is_text"].values, ok, client=client, scratch=scratch,
                               massive_k=cfg.analysis.massive_k, memory_budget=memory_budget,
                               cka_tokens=cfg.analysis.cka_tokens, progress=progress)
        except StopRequested as stop:
            stop.progressed = bool(_saved_groups(scratch) - saved_before)
            raise
    analysis = results.build(run, cfg.analysis, geo, relabel=relabel, source=str(run_dir))
    results.write(analysis, out)
    decision = decide(analysis, cfg.analysis)
    decision["overall"]["partial"] = bool(analysis.attrs["partial"])
    (out / "decision.json").write_text(json.dumps(_jsonable(decision), indent=1))
    figures = {}
    if plots:
        from analyze.plots import make_all

        figures = make_all(analysis, decision, out)
    return write_report(analysis, decision, figures, out)


def _saved_groups(scratch: Path) -> set[tuple[str, int, int]]:
    """The layer groups a stopped geometry pass has saved in ``scratch`` (a rerun skips them), as
    files: a group saved again under its old name (the scratch restarted) is a new one."""
    out = set()
    for path in scratch.glob("layers-*.npz"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed with the scratch since the listing
            continue
        out.add((path.name, stat.st_ino, stat.st_mtime_ns))
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to null."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


class StopRequested(BaseException):
    """Raised in the main thread by SIGUSR1: the work in flight is dropped, what is saved stays.

    A BaseException, like KeyboardInterrupt, so that no library's ``except Exception`` swallows it.
    ``progressed`` says whether the stopped call saved work a rerun goes on from; a stop outside
    the geometry pass saves nothing (a rerun starts the results again).
    """

    progressed = False


def _stop(signum: int, frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("gap analyze: %(message)s"))
    # Our own progress messages; only warnings from Dask's chatty cluster loggers.
    handler.addFilter(lambda r: r.name.startswith("gap") or r.levelno >= logging.WARNING)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, handlers=[handler],
                        force=True)
    previous = signal.signal(signal.SIGUSR1, _stop)
    try:
        report = analyse(args.run, args.out, scheduler=args.scheduler, workers=args.workers, jobs=args.jobs,
                         overrides=args.overrides, config=args.config,
                         memory_budget=parse_bytes(args.memory_budget), relabel=args.relabel,
                         plots=not args.no_plots, progress=not args.quiet)
    except StopRequested as stop:
        if not stop.progressed:
            print(f"gap analyze: stopped before committing anything ({stop}): raise slurm.analysis.time "
                  "or lower slurm.signal_seconds", file=sys.stderr)
            return STOPPED_WITHOUT_PROGRESS
        print(f"gap analyze: stopped early ({stop}); run it again to go on after the finished layers")
        return 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    print(report)
    return 0

"""``gap slurm``: submit a run's capture array and analysis job, show progress, probe a node."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  gap slurm submit config.yaml --out /scratch/$USER/runs/r1 --dry-run
  gap slurm submit config.yaml --out /scratch/$USER/runs/r1 --set slurm.shards=8
  gap slurm status /scratch/$USER/runs/r1

Scripts, the config copy every job reads, and logs are written to RUN/slurm/. A capture task
asks Slurm for SIGUSR1 slurm.signal_seconds before its time limit, commits what it has and
requeues itself (a task stopped before committing anything fails instead: raise slurm.time).
After a cancelled or failed task, run the same `gap slurm submit` again: it
resubmits only the shards with samples left (they resume from the store), then the analysis;
with --retry-failed (e.g. after --set capture.batch_size=1) also the shards with samples that
failed for a non-data reason, which are captured again.
"""


def _submit(args: argparse.Namespace) -> int:
    from slurm import submit

    plan = submit.plan_submission(args.config, args.out, args.overrides, retry_failed=args.retry_failed)
    if args.dry_run:
        print(submit.format_dry_run(plan), end="")
        return 0
    record = submit.submit(plan)
    print(submit.describe(plan, record))
    return 0


def _status(args: argparse.Namespace) -> int:
    from slurm.status import format_status, run_status

    status = run_status(args.run)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``gap slurm`` (see ``gap slurm --help``)."""
    parser = argparse.ArgumentParser(
        prog="gap slurm", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run gap on a Slurm cluster: a capture job array (one task per shard) and an\n"
                    "analysis job that starts once every capture task succeeded.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{submit,status,probe}")

    p = sub.add_parser("submit", help="write the sbatch scripts into RUN/slurm and submit them",
                       description="Write RUN/slurm/{config.yaml,capture.sbatch,analysis.sbatch}, submit "
                                   "the capture array with sbatch --parsable and the analysis with "
                                   "--dependency=afterok on it, and print the job ids. On an existing "
                                   "run, only shards with samples left are submitted.")
    p.add_argument("config", help="the YAML config (its slurm section sets resources and site flags)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory (shared file system)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, the value parsed as YAML; repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the scripts and sbatch commands; write and submit nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="also run the shards with samples that failed for a non-data reason (out of "
                        "memory, NaN/inf, an intervention error) and capture those samples again")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="per shard: samples done / failed / left and the job state",
                       description="Read the run's store and RUN/slurm/jobs.jsonl; ask squeue (and sacct "
                                   "where accounting is on) for the job states.")
    p.add_argument("run", help="the run directory given to gap slurm submit --out")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_status)

    # Listed for --help only: `probe` is dispatched before parsing (its options are its own).
    sub.add_parser("probe", help="check a compute node: data, model, GPUs (run by the capture script)")

    if argv[:1] == ["probe"]:
        from slurm import probe

        return probe.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)

"""``gap store info RUN [--json]`` and ``gap store verify RUN [--data]``."""

from __future__ import annotations

import argparse
import json
import sys

from store.inspect import format_info, run_info, verify_data, verify_run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gap store",
        description="Inspect or check a run store written by `gap capture`.",
        epilog="examples:\n  gap store info runs/r1\n  gap store info runs/r1 --json\n"
               "  gap store verify runs/r1          # structure: exit 1 when anything is damaged\n"
               "  gap store verify runs/r1 --data   # also every byte against its checksum",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="samples ok/failed/left, shards, bytes, files, layers")
    info.add_argument("run", metavar="RUN", help="run directory")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    verify = sub.add_parser("verify", help="check every shard; exit 1 on damage")
    verify.add_argument("run", metavar="RUN", help="run directory")
    verify.add_argument("--data", action="store_true",
                        help="also read every block file and compare its CRC-32 with the one its "
                             "commit recorded (reads the whole run: minutes for hundreds of GB)")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.action == "info":
        info_dict = run_info(args.run)
        print(json.dumps(info_dict, indent=1) if args.json else format_info(info_dict))
        return 0
    problems = verify_run(args.run)
    unchecked = 0
    if args.data:
        damaged, unchecked = verify_data(args.run, progress=not args.quiet)
        problems += damaged
    for line in problems:
        print(f"DAMAGED: {line}", file=sys.stderr)
    if problems:
        print(f"{args.run}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    info_dict = run_info(args.run)
    print(f"{args.run}: intact ({info_dict['ok']} ok, {info_dict['failed']} failed samples "
          f"in {len(info_dict['shards'])} shards{'; every byte matches its checksum' if args.data else ''})")
    if unchecked:
        print(f"  {unchecked} segments were committed before checksums were recorded: their bytes were not checked")
    for s in info_dict["shards"]:
        if s["writer"]:
            print(f"  shard {s['shard']}/{s['n_shards']} is being written by {s['writer']}: its "
                  "committed samples were checked, its work in progress was not")
    return 0

"""`gap data`: stage a hub dataset for offline compute nodes, or verify a staged copy.

Examples
--------
>>> main(["verify", "/nonexistent/dir"])
1
"""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Compute nodes have no internet: stage datasets once on a login node, then point the run config's
data.path at the staged directory (data.split names one of its splits).

  gap data stage chartqa --to /shared/data/chartqa
  gap data stage docvqa --to /shared/data/docvqa --split validation
  gap data verify /shared/data/chartqa
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gap data", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="{stage,verify}")
    st = sub.add_parser("stage", help="download a dataset into a local parquet layout + manifest",
                        description="Download NAME with `datasets` and write DIR/data/*.parquet "
                        "and DIR/manifest.json (row counts, sha256 checksums).")
    st.add_argument("name", choices=["chartqa", "docvqa", "textvqa", "vqav2", "scienceqa"])
    st.add_argument("--to", required=True, metavar="DIR", help="output directory")
    st.add_argument("--split", action="append", metavar="SPLIT",
                    help="split to stage (repeatable; default: the split with gold answers)")
    st.add_argument("--config", metavar="NAME", help="hub config (default: e.g. DocVQA for docvqa)")
    st.add_argument("--revision", metavar="REV", help="hub revision (branch, tag or commit)")
    st.add_argument("--limit", type=int, metavar="N", help="keep only the first N rows per split")
    st.add_argument("--source", metavar="PATH",
                    help="read this local dataset directory instead of the hub repo")
    ve = sub.add_parser("verify", help="check a staged directory against its manifest",
                        description="Recompute checksums and row counts of DIR's staged files.")
    ve.add_argument("dir", metavar="DIR")
    return parser


def main(argv: list[str]) -> int:
    """Run ``gap data ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "verify":
        from capture.stage import verify

        problems = verify(args.dir)
        for line in problems:
            print(line, file=sys.stderr)
        if not problems:
            print(f"{args.dir}: ok")
        return 1 if problems else 0
    from capture.stage import stage

    if args.limit is not None and args.limit < 0:
        from schemas.errors import GapError

        raise GapError(f"--limit {args.limit}: must be >= 0")
    manifest = stage(args.name, args.to, splits=args.split, source=args.source,
                     config=args.config, revision=args.revision, limit=args.limit)
    for split, info in manifest["splits"].items():
        print(f"{args.to}: {split} {info['rows']} rows in {len(info['files'])} file(s)")
    return 0

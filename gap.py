"""`gap`: a thin dispatcher over the rooms' own command-line interfaces.

Each room owns its subcommand (``capture/cli.py``, ``store/cli.py``, ...); this module only maps
a name to a module and imports it lazily, so ``gap analyze`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "capture": ("capture.cli", "run the model on a dataset and write a run store (GPU job)"),
    "analyze": ("analyze.cli", "compute metrics, decisions, plots and a report from a run (CPU)"),
    "store": ("store.cli", "inspect (info) or check (verify) a run store"),
    "slurm": ("slurm.cli", "submit capture + analysis jobs to Slurm, or show their status"),
    "data": ("capture.data_cli", "stage a hub dataset to a local directory for offline nodes"),
    "organism": ("capture.organism", "train the model organism with a planted modality cliff"),
    "demo": ("demo_cli", "run the whole pipeline offline on the built-in organism"),
}

USAGE = """usage: gap COMMAND [ARGS...]

gap measures how vision-language models use their visual tokens, layer by layer.
A GPU job captures activations and interventions into a run store; CPU jobs analyse it.

commands:
{commands}

Run `gap COMMAND --help` for the options of one command.
Typical flow: gap capture config.yaml --out runs/r1 ; gap analyze runs/r1 ; open runs/r1/analysis/report.md
"""


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gap: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from schemas.errors import GapError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except GapError as exc:
        print(f"gap {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gap {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

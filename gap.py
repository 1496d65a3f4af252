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
    "demo": ("gap", "run the whole pipeline offline on the built-in model organism"),
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


def demo(argv: list[str]) -> int:
    """``gap demo [--out DIR]``: organism -> capture (every intervention) -> analysis -> report.

    The only place that calls both rooms, which is why it lives in the dispatcher.
    """
    import argparse
    import json
    import shutil
    from pathlib import Path

    from schemas.errors import GapError

    parser = argparse.ArgumentParser(
        prog="gap demo",
        description="Run the whole pipeline offline on the shipped model organism (a tiny LLaVA "
                    "with a planted modality cliff) and the synthetic dataset: capture with all "
                    "interventions, analysis, checkpoint decisions and a report.")
    parser.add_argument("--out", default="demo", help="output directory (default: ./demo)")
    from capture.organism import SHIPPED_CLIFFS

    parser.add_argument("--cliff", type=int, default=None, choices=SHIPPED_CLIFFS,
                        help="which shipped organism, by its planted cliff: the first layer whose "
                             "visual states no longer matter (default: the demo config's, 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo config, e.g. data.limit=16")
    args = parser.parse_args(argv)

    from capture import cli as capture_cli
    from capture.organism import ORGANISM_DIR, organism_path

    config = ORGANISM_DIR / "demo.yaml"
    if args.cliff is not None:
        model_path = organism_path(args.cliff)
    else:
        from schemas.config import load_config

        model_path = (Path(__file__).parent / load_config(config).model.path).resolve()
    overrides = [f"model.path={model_path}", *args.overrides]
    out = Path(args.out)
    from store.layout import file_in_the_way

    if file_in_the_way(out) is not None:
        raise GapError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path / "organism.json", out / "organism.json")
    run = out / "run"
    planted = json.loads((out / "organism.json").read_text())["planted_cliff"]
    print(f"[demo] organism {model_path.name}: visual states matter up to layer {planted - 1} and no "
          f"longer from layer {planted} on, so expect cliff_layer {planted - 1} (the last layer "
          f"that still matters); capturing into {run}")
    code = capture_cli.main([str(config), "--out", str(run), "--resume"] +
                            [a for o in overrides for a in ("--set", o)])
    if code:
        return code
    from analyze import cli as analyze_cli

    print(f"[demo] analysing {run}")
    code = analyze_cli.main([str(run), "--out", str(out / "analysis")])
    if code:
        return code
    report = (out / "analysis" / "report.md").resolve()
    print(f"[demo] report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a command is missing: usage on stderr, like argparse
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gap: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from schemas.errors import GapError

    try:
        if name == "demo":
            return demo(rest)
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

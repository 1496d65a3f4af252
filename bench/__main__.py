"""`python -m bench`: run every bench/bench_*.py and end with one `NAME: VALUE` line per figure.

Each module's ``main()`` prints its own figures as ``NAME: VALUE`` lines (ratios measured side by
side in one run); this runner collects them and repeats them together at the end.
Pass module names to run a subset: ``python -m bench store capture``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import re
import sys
import time
from pathlib import Path

FIGURE = re.compile(r"^([a-z0-9_]+): (-?[0-9.]+(?:e-?[0-9]+)?|nan|inf)$")


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    if argv:
        names = [n for n in names if n.removeprefix("bench_") in argv]
    figures: list[str] = []
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        buf = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
                importlib.import_module(f"bench.{name}").main()
        except Exception as exc:  # one broken bench must not hide the others' figures
            failed.append(name)
            print(f"{name} failed: {exc!r}", file=sys.stderr)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
        figures += [line for line in buf.getvalue().splitlines() if FIGURE.match(line.strip())]
    print("\n== figures")
    for line in figures:
        print(line.strip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""capture.encode_ahead on its own: order, the worker process, what it survives and what it does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capture.encode_ahead import EncodeAhead, EncoderProcess

REPO = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _worker_pid(process: EncoderProcess) -> int:
    (worker,) = process._pool._processes.values()
    return worker.pid


def test_the_process_encodes_in_order_and_an_item_that_cannot_travel_is_encoded_on_the_thread():
    on_the_thread = []

    def here(item):
        on_the_thread.append(item)
        return str(item)

    process = EncoderProcess(str)
    try:
        cannot_pickle = lambda: 0  # noqa: E731
        items = [1, -2, cannot_pickle, ValueError("bad row"), -4] + list(range(10, 20))
        ahead = EncodeAhead(items, here, depth=3, process=process)
        out = list(ahead)
        ahead.close()
    finally:
        process.close()
    assert out == [str(i) for i in items]
    # the lambda did not pickle; an exception item (a DataError) is always handled here
    assert on_the_thread == [cannot_pickle, items[3]]


def test_an_error_of_the_items_surfaces_in_order():
    def items():
        yield from range(3)
        raise KeyError("row 3")

    ahead = EncodeAhead(items(), lambda i: i * 10, depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(KeyError, match="row 3"):
        next(ahead)
    ahead.close()


def test_the_worker_ignores_the_jobs_signals_and_ends_with_close():
    process = EncoderProcess(str)
    pid = _worker_pid(process)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # Slurm's, a terminal's
        os.kill(pid, sig)
    time.sleep(0.3)
    assert process.submit(7).result(timeout=10) == "7"
    process.close()
    assert _gone(pid)


def test_the_worker_ends_when_the_capture_process_is_killed():
    script = ("import os, signal\n"
              "from capture.encode_ahead import EncoderProcess\n"
              "p = EncoderProcess(str)\n"
              "(w,) = p._pool._processes.values()\n"
              "print(w.pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(pid), f"worker {pid} outlived its killed parent"

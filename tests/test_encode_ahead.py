"""capture.encode_ahead on its own: order, the worker process, what it survives and what it does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capture import encode_ahead
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


def test_items_that_keep_failing_to_travel_give_the_process_up(caplog, monkeypatch):
    # one item that cannot be pickled is the item's problem; several in a row are the way's
    # (e.g. a /dev/shm too small for the results): then the thread does all the work, once
    monkeypatch.setattr(encode_ahead, "IN_PROCESS", 1)  # which item is where, when, is then fixed
    on_the_thread = []

    def here(item):
        on_the_thread.append(item)
        return str(item)

    unpicklable = [lambda: k for k in range(3)]
    process = EncoderProcess(str)
    try:
        with caplog.at_level("DEBUG", logger="gap.capture"):
            ahead = EncodeAhead(unpicklable + [5, 6], here, depth=8, process=process)
            out = list(ahead)
            ahead.close()
    finally:
        process.close()
    # 5 was in the process already when the third lambda came back: only 6 is done here
    assert out == [str(i) for i in unpicklable + [5, 6]] and on_the_thread == unpicklable + [6]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and warnings[0].startswith("an item did not travel to or from the encoder process")
    assert warnings[1].startswith("3 items in a row did not travel to the encoder process or back (")
    assert warnings[1].endswith("; encoding on the thread from here on")


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

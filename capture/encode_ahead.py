"""Samples read and encoded ahead of the capture loop: on a thread, or in a worker process.

Reading a sample (an image decode) and running the processor (chat template, tokenizer, image
preprocessing) take milliseconds per sample that the GPU would otherwise wait for, so they run
ahead of the loop.  On a thread of the loop's own process they still compete with it for the
GIL: the processor makes many short calls that release it (torch ops, the tokenizer, PIL) and
take it back from the loop each time, and the loop must hand it over at every switch interval.
Measured on an H200 (LLaVA-1.5-7B shape, 48 samples of 640 tokens, all layers into a RAM store),
a capture of samples encoded beforehand took 57.5 ms per sample against 77.8 with the thread
encoding them (38.8 against 42.8 without storing states).  So on a GPU the processor runs in a
worker process of its own (:class:`EncoderProcess`, spawned, so no CUDA state is forked), fed by
a thread that reads the items; ``bench/gpu_capture.py`` prints both ways side by side.  If that
process does not start or dies, the thread encodes, with a warning.

Examples
--------
>>> ahead = EncodeAhead(range(5), lambda i: i * i, depth=2)
>>> list(ahead)
[0, 1, 4, 9, 16]
>>> ahead.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from schemas.errors import one_line

log = logging.getLogger("gap.capture")

START_TIMEOUT_S = 600.0
MAX_UNTRAVELLED_IN_A_ROW = 3  # then the process is given up for the thread
IN_PROCESS = 4  # items handed to the process at once: it never waits for the next, and few are held twice
PARENT_POLL_S = 1.0  # how often the worker checks that the capture process is alive
_INSTALLED: Callable[[Any], Any] | None = None  # the worker process's encode function


def _install(encode: Callable[[Any], Any]) -> None:
    global _INSTALLED
    _INSTALLED = encode
    # The capture process decides when its worker ends (close(), or its own end, which closes
    # the worker's pipe): Slurm's SIGTERM to every process of a job, or a terminal's Ctrl-C to
    # the whole process group, must not kill the worker under the batch the capture finishes.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # ... and if it is killed outright, its worker follows (the worker's own copy of the task
    # pipe keeps it from ever reading an end of file there)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="gap-encode-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _call_installed(item: Any) -> Any:
    return _INSTALLED(item)  # type: ignore[misc]


def _ready() -> bool:
    return _INSTALLED is not None


class EncoderProcess:
    """One spawned worker process running ``encode``, which is pickled to it once (a processor
    can weigh megabytes: it does not travel with each item).

    The constructor waits until the worker has started and unpickled ``encode`` (its imports
    take seconds), so that cost falls before the capture loop, not in it; it raises
    ``TimeoutError`` after ``START_TIMEOUT_S`` (imports from a cold network filesystem can take a
    minute, but not ten).  ``close()`` ends it.
    """

    def __init__(self, encode: Callable[[Any], Any]) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_install, initargs=(encode,))
        try:
            self._pool.submit(_ready).result(timeout=START_TIMEOUT_S)
        except BaseException:
            for worker in list(self._pool._processes.values()):  # a start-up that hangs
                worker.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def submit(self, item: Any) -> Future:
        return self._pool.submit(_call_installed, item)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class EncodeAhead:
    """``encode(item)`` for every item, in order, up to ``depth`` ahead of the reader.

    A background thread reads the items; it encodes them itself, or hands them to ``process``
    (an :class:`EncoderProcess` running the same encoding), ``IN_PROCESS`` at a time.  Items that are exceptions (a dataset's ``DataError``) are always encoded on
    the thread.  An error of the items' iterator or of ``encode`` is raised by ``next()`` in the
    loop's thread, where it happened in the order.  ``close()`` stops the thread (items it read
    ahead are dropped, not recorded).
    """

    _END = object()

    def __init__(self, items: Iterable[Any], encode: Callable[[Any], Any], depth: int,
                 process: EncoderProcess | None = None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._process = process
        self._untravelled = 0  # items in a row that did not travel to the process or back
        self._thread = threading.Thread(target=self._work, args=(iter(items), encode), name="gap-encode",
                                        daemon=True)
        self._thread.start()

    def _work(self, items: Iterator[Any], encode: Callable[[Any], Any]) -> None:
        in_flight: deque[tuple[Any, Future | None]] = deque()
        try:
            for item in items:
                in_flight.append((item, self._submit(item)))
                # on the thread (no future) each item is done at once; the process keeps a few
                while in_flight and (in_flight[0][1] is None or len(in_flight) > IN_PROCESS):
                    if not self._offer(self._result(*in_flight.popleft(), encode)):
                        return
            while in_flight:
                if not self._offer(self._result(*in_flight.popleft(), encode)):
                    return
            self._offer(self._END)
        except BaseException as exc:  # handed to the loop's thread
            self._offer(_Raised(exc))

    def _submit(self, item: Any) -> Future | None:
        if self._process is None or isinstance(item, BaseException):
            return None
        try:
            return self._process.submit(item)
        except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: shut down meanwhile
            self._lose_process(f"the encoder process stopped ({one_line(exc)})")
            return None

    def _result(self, item: Any, future: Future | None, encode: Callable[[Any], Any]) -> Any:
        if future is not None:
            try:
                result = future.result()
                self._untravelled = 0
                return result
            except BrokenProcessPool as exc:
                self._lose_process(f"the encoder process stopped ({one_line(exc)})")
            except Exception as exc:  # noqa: BLE001 - the item or its result did not travel: encode it here
                # one such item is the item's (an unreadable image cannot be pickled); several in
                # a row are the way there or back (e.g. a /dev/shm too small for the results)
                self._untravelled += 1
                log.log(logging.WARNING if self._untravelled == 1 else logging.DEBUG,
                        "an item did not travel to or from the encoder process (%s); encoding it on the "
                        "thread", one_line(exc))
                if self._untravelled >= MAX_UNTRAVELLED_IN_A_ROW:
                    self._lose_process(f"{self._untravelled} items in a row did not travel to the encoder "
                                       f"process or back ({one_line(exc)})")
        return encode(item)

    def _lose_process(self, why: str) -> None:
        if self._process is not None:
            log.warning("%s; encoding on the thread from here on", why)
            self._process = None

    def _offer(self, value: Any) -> bool:
        """Queue ``value`` unless closed meanwhile (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> EncodeAhead:
        return self

    def __next__(self) -> Any:
        value = self._queue.get()
        if value is self._END:
            self._queue.put(value)  # stays exhausted
            raise StopIteration
        if isinstance(value, _Raised):
            raise value.exc
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Raised:
    exc: BaseException

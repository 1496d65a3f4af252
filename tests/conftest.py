"""Shared fixtures: tiny offline checkpoints of every family, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_checkpoint(family, **build_kwargs) -> Path`` (fp32, cached per session).

    Each distinct ``(family, kwargs)`` is built once with :func:`capture.tiny.build_tiny` into
    a session temp dir; later calls return the same directory.

    Examples
    --------
    >>> def test_x(tiny_checkpoint):          # doctest: +SKIP
    ...     path = tiny_checkpoint("qwen3_vl", n_layers=2)
    """
    cache: dict[tuple, Path] = {}

    def build(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            from capture.tiny import build_tiny

            out = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = build_tiny(family, out, **kwargs)
        return cache[key]

    return build


@pytest.fixture
def signal_handlers():
    """Restore the SIGTERM / SIGUSR1 handlers that ``gap capture`` installs."""
    import signal

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)

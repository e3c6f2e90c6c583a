"""Ctrl-C and SIGTERM take the same clean abort path: both raise a KeyboardInterrupt in the main thread, so the
output's `abort()` runs and nothing is left at the output path. Cleanup itself is not interruptible."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def install_handlers() -> None:
    """Make SIGTERM and SIGHUP behave like Ctrl-C (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _raise_terminated)


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell convention: 128 + the signal number."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def uninterruptible():
    """Ignore Ctrl-C / SIGTERM / SIGHUP while cleaning up after a failure (the run is ending anyway); a no-op
    outside the main thread, where Python delivers no signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C / SIGTERM / SIGHUP until the block is done, then act on them as usual: for steps of the output
    that must not be cut in half (a write that finishes a shard renames it and records it for --resume)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])

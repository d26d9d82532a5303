"""Ctrl-C and preemption: SIGINT and SIGTERM end a run cleanly, a second one at once.

While ``handled()`` is active, the first SIGINT or SIGTERM only sets a flag; the training loop
polls it after each step (``requested``), saves a checkpoint of where it is, stops its loader
and raises ``Interrupted``. Outside a training loop (``graceful`` not set) the first signal
raises ``Interrupted`` where the program is. ``main.py`` turns it into one line and the exit
code of a signal (130 for SIGINT, 143 for SIGTERM). A second signal exits at once with that
code (the loader's processes die with their parent).
"""

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal; ``code`` is the exit code, the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class _State:
    signum: int | None = None
    graceful: bool = False


_state = _State()


def _handler(signum, frame):
    if _state.signum is not None:  # the second signal: no more waiting
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    _state.signum = signum
    name = signal.Signals(signum).name
    if not _state.graceful:
        raise Interrupted(signum, f"stopped by {name}")
    sys.stderr.write(f"\n{name}: stopping after this step and saving a checkpoint "
                     "(send it again to exit at once)\n")
    sys.stderr.flush()


def requested() -> int | None:
    """The signal that asked the run to stop, if one did."""
    return _state.signum


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM handled as this module says (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.signum = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def graceful():
    """Within: a first signal waits for the training loop to stop at its next step."""
    before, _state.graceful = _state.graceful, True
    try:
        yield
    finally:
        _state.graceful = before

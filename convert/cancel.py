"""Ctrl-C and SIGTERM that stop a conversion within a second, whatever phase it is in.

Python runs signal handlers on the main thread between bytecodes only. While MLX evaluates a
graph (a quantized tensor, a forward pass over the calibration text) the main thread sits in C++
for as long as that takes, tens of seconds on a large model, and the KeyboardInterrupt waits.
Likewise a download waits for its worker threads on the way out.

So a watcher thread hears the signal at once, through `signal.set_wakeup_fd` (the C-level handler
writes to it from whichever thread took the signal). The main thread gets `grace` seconds to
unwind by itself (it does whenever it is in Python); if it has not, the watcher runs the cleanup
(removes the temporary output), reports the error and ends the process. Only front ends that own
the process (the CLI) ask for that last step; a library caller gets the ordinary unwinding.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

# Reports an exception the way the front end does and returns the exit code.
Reporter = Callable[[BaseException], int]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Watcher:
    def __init__(self, reporter: Reporter, make_error: Callable[[], BaseException], grace: float):
        self.reporter = reporter
        self.make_error = make_error
        self.grace = grace
        self.cleanups: list[Callable[[], None]] = []
        self.shielded = 0  # > 0 while finishing touches must not be cut (the final rename)
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def run(self) -> None:
        try:
            while True:
                data = os.read(self.read_fd, 64)
                if not data or self.done.is_set():
                    return
                if any(b in _SIGNALS for b in data):
                    self._stop_unless_unwound()
        except OSError:
            return
        finally:
            os.close(self.read_fd)

    def _stop_unless_unwound(self) -> None:
        if self.done.wait(self.grace):
            return
        with self.lock:  # the main thread finishing now keeps the lock until it is done
            if self.done.is_set() or self.shielded:
                return
            for cleanup in self.cleanups:
                cleanup()
            exit_now(self.reporter, self.make_error())


def exit_now(reporter: Reporter, error: BaseException) -> None:
    """Report `error` and end the process at once. Interpreter teardown is skipped: with torch
    and transformers loaded it takes seconds on a busy machine, and nothing is left to flush."""
    code = reporter(error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def interruptible(
    reporter: Reporter | None,
    make_error: Callable[[], BaseException],
    *,
    grace: float = 0.5,
) -> Iterator[_Watcher | None]:
    """SIGTERM unwinds like Ctrl-C; with a `reporter`, a signal also ends the process within
    `grace` seconds when the main thread cannot unwind (busy in C++). Yields the watcher
    (None when inactive): `add_cleanup(w, fn)` and `shield(w)` act on it."""

    def to_interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    old_term = signal.signal(signal.SIGTERM, to_interrupt)
    watcher = _Watcher(reporter, make_error, grace) if reporter is not None else None
    old_fd = None
    if watcher is not None:
        old_fd = signal.set_wakeup_fd(watcher.write_fd, warn_on_full_buffer=False)
        threading.Thread(target=watcher.run, name="mlxrun-interrupt", daemon=True).start()
    try:
        yield watcher
    finally:
        if watcher is not None:
            with watcher.lock:
                watcher.done.set()
            signal.set_wakeup_fd(old_fd if old_fd is not None else -1)
            os.close(watcher.write_fd)  # the watcher's read returns b"" and it ends
        signal.signal(signal.SIGTERM, old_term)


def add_cleanup(watcher: _Watcher | None, fn: Callable[[], None]) -> None:
    if watcher is not None:
        watcher.cleanups.append(fn)


@contextlib.contextmanager
def shield(watcher: _Watcher | None) -> Iterator[None]:
    """No hard stop inside (a quick step that must finish once begun, such as the final rename);
    a signal is still delivered as KeyboardInterrupt once the main thread is back in Python."""
    if watcher is None:
        yield
        return
    with watcher.lock:
        watcher.shielded += 1
    try:
        yield
    finally:
        with watcher.lock:
            watcher.shielded -= 1

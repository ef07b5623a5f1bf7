"""Prompt stops: SIGTERM and SIGINT end every command within seconds, with one line.

Python runs signal handlers in the main thread between bytecodes, so a main thread blocked in
TensorFlow's C++ (a multi-worker start-up waiting for its peers, a collective) or in a Beam job
never sees them: such a process ignored SIGTERM. :func:`install` keeps Python's handlers (they
raise :class:`Interrupted` where the main thread can unwind, running every ``finally``: staging
folders are removed, locks released) and adds a watcher thread woken by the signal's wakeup
byte: if the main thread has not finished unwinding after :data:`GRACE_SECONDS`, or a second
signal comes, it writes the line itself and ends the process. Either way the state left is one
the same command resumes (staging folders of dead processes are removed by the next run, their
locks taken over, fit resumes from its crash-safe backup).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
GRACE_SECONDS = 10.0

_installed = False
_finished = False
_published: list[str] = []  # outputs published whole by this process
_first_signal: list[float] = []
_signums: list[int] = []  # the signal that arrived (the first), kept however its exception fared


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM (a BaseException, like KeyboardInterrupt,
    so that ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 1)


def message(signum: int) -> str:
    name = signal.Signals(signum).name
    if _published:  # between the publish and the end of the command (its summary)
        from tfseg.errors import safe

        return (f"error: interrupted by {name} after {safe(_published[-1])} was published (it is complete); "
                "the command stopped before its end")
    return (f"error: interrupted by {name}; nothing was published, and the same command resumes "
            "(or starts over) where this one stopped")


def published(path: str) -> None:
    """Notes an output published whole (:func:`tfseg.io.publish.publish_dir`), so that a signal
    from now on does not say nothing was."""
    _published.append(path)


def finished_message(signum: int) -> str:
    return (f"tfseg: {signal.Signals(signum).name} arrived after the command finished; its output is "
            "complete as reported (exit 0)")


def finished() -> None:
    """Marks the command done (its output published, its summary printed): a signal from now on
    ends the process at once, exit 0, with :func:`finished_message` instead of raising into the
    interpreter's exit (TensorFlow's teardown can take seconds; an exception raised there printed
    "Exception ignored" or nothing, and exit 143 said a complete output had failed: a supervisor
    would run the command again, and an export would publish a second version)."""
    global _finished
    _finished = True


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    if _finished:
        _exit_now(signum)
    if _first_signal:
        return  # the watcher ends the process; unwinding is under way
    _first_signal.append(time.monotonic())
    _signums.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raises :class:`Interrupted` if SIGINT or SIGTERM arrived, even when the exception its
    handler raised was swallowed (inside a library's callback: JAX's GC callback, a Beam
    runner that wraps errors). Called before anything is published, so that no output appears
    after a signal."""
    if _signums:
        raise Interrupted(_signums[0])


def _watch(fd: int) -> None:
    """Waits for signal bytes; after the first, gives the main thread :data:`GRACE_SECONDS` to
    unwind, ending the process sooner on a second signal. One thread does both: starting another
    one can fail once the interpreter is shutting down (the normal unwinding ends the process
    while this thread still runs)."""
    first = None
    deadline = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            data = os.read(fd, 64) if ready else b""
        except (OSError, ValueError):
            return
        if not ready:
            _exit_now(first)
        for signum in data:
            if signum not in EXIT_CODES:
                continue
            if first is None:
                first, deadline = signum, time.monotonic() + GRACE_SECONDS
            else:
                _exit_now(signum)


def _exit_now(signum: int) -> None:
    try:
        sys.stderr.write((finished_message(signum) if _finished else message(signum)) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(0 if _finished else EXIT_CODES[signum])


def install() -> None:
    """Installs the handlers and the watcher (main thread only; once per process) for a command
    that starts now."""
    global _installed, _finished
    _finished = False
    _published.clear()
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for signum in EXIT_CODES:
        signal.signal(signum, _handler)
    threading.Thread(target=_watch, args=(r,), name="tfseg-signals", daemon=True).start()
    _installed = True

"""A deadline for TensorFlow calls that hold the GIL while they wait (multi-worker start-up).

``MultiWorkerMirroredStrategy()`` blocks in C++ until every worker of ``TF_CONFIG`` answers,
without a deadline and without releasing the GIL: no Python thread or signal handler of the
process runs meanwhile (a fit was seen waiting 11 minutes, deaf to SIGTERM). :class:`Deadline`
guards such a call from outside Python:

- a sidecar process (``python -m tfseg.watchdog``, standard library only) waits for the call to
  finish; at the deadline it writes one line naming the members of the cluster that accept no
  connection, and if the guarded process dies of a signal meanwhile it writes the interrupted line;
- faulthandler's C thread ends the guarded process with exit code 1 just after the deadline;
- SIGTERM and SIGINT keep their default action during the call (the process ends at once, 143 /
  130), since Python's handlers could not run; TensorFlow's preemption notifier takes SIGTERM over
  during its wait, so :func:`wait_for_peers` first waits in Python until every peer answers, and
  the guarded call itself is short.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def unreachable(members: list[tuple[str, str]], timeout: float = 2.0) -> list[str]:
    """The ``(name, "host:port")`` members that accept no TCP connection within ``timeout`` s."""
    down = []
    for name, addr in members:
        host, _, port = str(addr).rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except (OSError, ValueError):
            down.append(f"{name} ({addr})")
    return down


def wait_for_peers(own: str | None, members: list[tuple[str, str]], seconds: float, what: str) -> None:
    """Waits, in Python (so SIGTERM and SIGINT are answered), until every member accepts a TCP
    connection, listening on ``own`` meanwhile so the others see this worker too.

    TensorFlow's own wait that follows then finds the cluster up (and while it waits it holds the
    GIL and its preemption notifier takes SIGTERM: that wait is kept short this way). The
    listener accepts nothing and is closed before TensorFlow binds the port.

    Raises:
      TfsegError: (exit code 1) naming the members that did not answer within ``seconds``.
    """
    import time

    from tfseg.errors import TfsegError

    listener = None
    if own:
        host, _, port = own.rpartition(":")
        try:
            listener = socket.create_server((host.strip("[]") or "0.0.0.0", int(port)), reuse_port=False)
        except (OSError, ValueError):
            listener = None  # taken (TensorFlow of this process, or a stale socket): peers retry
    try:
        deadline = time.monotonic() + seconds
        waiting = list(members)
        while waiting:
            waiting = [(n, a) for n, a in waiting if unreachable([(n, a)], timeout=1.0)]
            if not waiting:
                break
            if time.monotonic() > deadline:
                e = TfsegError(f"{what}: no answer within {seconds:g} s (--peer-timeout) from "
                               + ", ".join(f"{n} ({a})" for n, a in waiting))
                e.exit_code = 1
                raise e
            time.sleep(0.5)
    finally:
        if listener is not None:
            listener.close()


class Deadline:
    """Guards a blocking call: ``with Deadline(300, peers, what): call()`` (see the module)."""

    def __init__(self, seconds: float, members: list[tuple[str, str]], what: str):
        self.seconds, self.members, self.what = float(seconds), members, what

    def __enter__(self):
        import faulthandler

        self._devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for faulthandler's C thread
        faulthandler.dump_traceback_later(self.seconds + 3, exit=True, file=self._devnull)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tfseg.watchdog", json.dumps(
                {"seconds": self.seconds, "members": self.members, "what": self.what})],
            stdin=subprocess.PIPE, start_new_session=True)
        self._old = {s: signal.signal(s, signal.SIG_DFL) for s in _SIGNALS}
        return self

    def __exit__(self, *exc):
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        for s, handler in self._old.items():
            signal.signal(s, handler)
        try:
            self._proc.stdin.write(b"k")
            self._proc.stdin.close()
        except OSError:
            pass
        self._proc.wait()
        self._devnull.close()
        return False


def _sidecar(spec: dict) -> int:
    seconds, what = float(spec["seconds"]), spec["what"]
    ready, _, _ = select.select([sys.stdin.buffer], [], [], seconds)
    if ready:
        if sys.stdin.buffer.read(1) == b"k":
            return 0  # the call finished
        sys.stderr.write(f"error: interrupted while {what}; the same command resumes where it stopped\n")
        return 0
    down = unreachable([tuple(m) for m in spec["members"]])
    sys.stderr.write(f"error: {what}: no answer within {seconds:g} s (--peer-timeout) from "
                     f"{', '.join(down) if down else 'the cluster (every address accepts connections)'}\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the guarded process
    sys.exit(_sidecar(json.loads(sys.argv[1])))

"""Fault injection for the production tests: named points where a test stops the process.

The one place production code yields to a test: with ``TFSEG_TEST_PAUSE_AT=NAME`` in the
environment, the process reaching point NAME writes its pid to ``TFSEG_TEST_PAUSE_FILE`` and waits
there until the test kills it (kill -9 at that exact moment). Unset, a point costs one lookup.
"""

from __future__ import annotations

import os
import time

from tfseg.io.fs import atomic_write_text

PAUSE_ENV = "TFSEG_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """A named step where a test may stop this process (for a kill -9 at that moment): with
    ``TFSEG_TEST_PAUSE_AT=name`` the process writes ``TFSEG_TEST_PAUSE_FILE`` (its pid) and waits
    there until killed. Points: ``publish`` (a staged output complete, not yet renamed into place),
    ``backup`` (a fit's new backup written under its temporary name, not yet renamed),
    ``backup-rename`` (half-way through renaming the old pair aside), ``epoch``
    (a fit's epoch finished and backed up)."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get("TFSEG_TEST_PAUSE_FILE")
    if flag:
        atomic_write_text(flag, str(os.getpid()))
    while True:
        time.sleep(1)

"""Helpers shared by several test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now (for worker clusters and emulators)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()

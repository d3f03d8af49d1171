"""systemd's readiness protocol: READY=1 once pgmux listens, RELOADING=1 then READY=1
around a reload, STOPPING=1 when it starts to shut down (``Type=notify`` units).

A datagram to $NOTIFY_SOCKET, as sd_notify(3) sends it; without the variable (not
under systemd, or a worker, whose supervisor is the unit's main process) it does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pgmux")


def notify(*fields: str) -> None:
    """Send ``fields`` ("READY=1", "STATUS=...") to systemd, if it is listening."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s", path, exc.strerror or exc)


def reloading() -> None:
    """RELOADING=1 with the clock systemd wants (sd_notify(3), Type=notify-reload)."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

"""The systemd notify protocol, without a dependency.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or an abstract socket when it starts
with ``@``) to a ``Type=notify`` service; the service sends newline-separated ``KEY=VALUE``
datagrams such as ``READY=1``, ``STOPPING=1`` and ``WATCHDOG=1``. Outside systemd the
variable is unset and every call is a no-op, so the service runs the same in a terminal.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send one state message; True when it was sent, False when there is no socket (or it is gone).

    A notification that cannot be delivered is not worth crashing for: systemd notices a missing
    READY=1 or WATCHDOG=1 by itself.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when the watchdog is off.

    ``WATCHDOG_PID`` (when set) must name this process: a child must not ping for its parent.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000

"""systemd readiness notification (``sd_notify``) without a dependency.

Guarantees: a no-op when ``$NOTIFY_SOCKET`` is unset; never raises (a failed notification is
logged, and systemd's own timeout then tells the operator).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("castghld.sdnotify")


def notify(message: str) -> bool:
    """Send `message` (e.g. ``READY=1``) to systemd; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warning("sd_notify %s failed: %s", message, e)
        return False
    return True

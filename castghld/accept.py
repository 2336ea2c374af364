"""Accepting connections without a busy loop when the process runs out of file descriptors.

Tornado's accept handler lets `accept()`'s EMFILE/ENFILE escape: the listening socket stays
readable, so the IOLoop calls the handler again at once, forever, logging a traceback each time
while the pending connection waits. `accept_connections` instead stops watching the socket for
`ACCEPT_PAUSE` seconds, logs one line per storm (at most every `LOG_EVERY` seconds) and counts
each pause in ``castghld_accept_paused``; connections already open are served meanwhile, and
accepting resumes by itself once descriptors are free again. The kernel keeps new connections
in the listen backlog during a pause.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable

from tornado.ioloop import IOLoop

from castghld.metrics import Metrics

log = logging.getLogger("castghld.accept")

ACCEPT_PAUSE = 0.5
LOG_EVERY = 10.0
ACCEPTS_PER_WAKEUP = 128  # Tornado's: do not starve other work when many connect at once
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_connections(
    sock: socket.socket,
    callback: Callable[[socket.socket, object], None],
    metrics: Metrics,
) -> Callable[[], None]:
    """Call `callback(connection, address)` for each connection accepted on `sock`; returns the
    function that stops it (as `tornado.netutil.add_accept_handler` does). One function on
    purpose: its four closures share one socket's pause state, read top to bottom."""
    io_loop = IOLoop.current()
    removed = False
    paused: object | None = None  # the timeout handle while paused
    last_logged = -LOG_EVERY

    def on_readable(_fd: object, _events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if removed or paused is not None:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in OUT_OF_RESOURCES:
                    raise
                pause(e)
                return
            callback(connection, address)

    def pause(error: OSError) -> None:
        nonlocal paused, last_logged
        io_loop.remove_handler(sock)
        paused = io_loop.call_later(ACCEPT_PAUSE, resume)
        metrics.accept_paused.inc()
        now = time.monotonic()
        if now - last_logged >= LOG_EVERY:
            last_logged = now
            log.error(
                "cannot accept connections (%s): out of file descriptors or memory; pausing "
                "accepts for %.1fs at a time until some are free (raise LimitNOFILE?)",
                error.strerror,
                ACCEPT_PAUSE,
            )

    def resume() -> None:
        nonlocal paused
        paused = None
        if not removed:
            io_loop.add_handler(sock, on_readable, IOLoop.READ)

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        if paused is not None:
            io_loop.remove_timeout(paused)
        else:
            io_loop.remove_handler(sock)

    io_loop.add_handler(sock, on_readable, IOLoop.READ)
    return remove

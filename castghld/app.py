"""Wires castghld together: `Daemon` (the components built by the startup steps of
`castghld.startup`, started and stopped in order), `make_app()` (the routes), `run()`
(`castghld serve`).

Guarantees:
- Startup validates everything that can be validated before listening (config, key file, webhook
  keys, state file); a problem there is a `StartupError` with one line per problem, not a crash.
- `/healthz` answers 503 until every component has started and again from the moment shutdown
  begins, so a proxy or systemd stops sending traffic first.
- SIGHUP reloads the config, its secret files and the webhook keys (`Daemon.reload`); a bad
  new config is rejected with its reasons and the running one kept.
- Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish within
  `server.shutdown_timeout`, stop components (they persist what they hold), flush the state file,
  exit 0. `READY=1` / `STOPPING=1` go to systemd when `$NOTIFY_SOCKET` is set.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import prometheus_client
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web

from castghld import __version__, sdnotify
from castghld.accept import accept_connections
from castghld.admin import AdminServer, AdminSocketError
from castghld.config import Config, ConfigError, load_config
from castghld.credits import CastCredits
from castghld.handlers import app_webhook, health, inbound, messages, oauth
from castghld.handlers.base import NotFoundHandler, log_request
from castghld.inbound import inbound_routes
from castghld.inflight import InFlight
from castghld.log import setup_logging
from castghld.metrics import Metrics
from castghld.oauth import CodeExchangeLimits
from castghld.reload import (
    config_changes,
    effective_config,
    needs_restart,
    unrefreshed_credentials,
)
from castghld.signatures import KeyFileError, SignatureVerifier, load_public_keys
from castghld.startup import (
    SEND_DRAIN_SECONDS,
    StartupError,
    StartupProblems,
    init_delivery,
    init_state,
    init_tokens,
    init_webhook_keys,
    load_outbox,
)
from castghld.state import (
    StateError,
    is_transient,
    lock_directory,
    remove_leftover_temp_files,
)
from castghld.usage import UsageLedger
from castghld.webhook_ids import RecentWebhookIds

log = logging.getLogger("castghld")

# Upstream timeouts (JupyterHub's choice): fail fast and retry rather than hang on a dead peer.
CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 256  # well above delivery.concurrency: a request must not queue in the client
# The graceful stop fits in server.shutdown_timeout (default 20 s, under the unit's 30 s
# TimeoutStopSec): requests get what the later phases leave, then Cast sends and GHL inbound posts
# in flight get SEND_DRAIN_SECONDS, and the final flushes FLUSH_SECONDS. Token refreshes in flight
# get tokens.REFRESH_STOP_WAIT from the start of the stop, overlapping those phases.
FLUSH_SECONDS = 2.0
RESERVED_FOR_LATER_PHASES = SEND_DRAIN_SECONDS + FLUSH_SECONDS
_http_client_configured = False
# CASTGHLD_LAG_PROBE=1 (benchmarks) adds castghld_loop_lag_seconds: how late a 5 ms timer fires,
# i.e. how long the IOLoop was blocked (GC pauses, CPU-bound work on the loop's thread).
LAG_PROBE_ENV = "CASTGHLD_LAG_PROBE"
LAG_PROBE_INTERVAL = 0.005
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


async def probe_loop_lag(histogram: Any) -> None:
    """Observe forever how late a `LAG_PROBE_INTERVAL` timer fires (cancel to stop)."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LAG_PROBE_INTERVAL)
        histogram.observe(max(0.0, loop.time() - started - LAG_PROBE_INTERVAL))


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def configure_http_client(request_timeout: float = REQUEST_TIMEOUT) -> str:
    """Choose the AsyncHTTPClient implementation once per process; returns its name.

    `AsyncHTTPClient` is a per-loop singleton configured globally: configuring it after the first
    instance exists has no effect on that instance, so this runs before any client is made.
    `request_timeout` (`delivery.request_timeout`) bounds every upstream request.
    """
    global _http_client_configured
    # Tornado turns on libcurl's verbose trace when this logger is at DEBUG, and that trace holds
    # every request header and body: bearer tokens, refresh tokens, the client secret, the Cast
    # API key. Debug logging of castghld must never switch it on.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)
    # Redirects are never followed: libcurl would hand the X-API-Key header, and for a 307/308 the
    # form with the client secret or a refresh token, to whatever host a Location names. GHL and
    # Cast do not redirect their API calls, so a 3xx is an answer like any other non-2xx.
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT,
        "request_timeout": request_timeout,
        "follow_redirects": False,
    }
    try:
        import pycurl  # noqa: F401

        impl = "tornado.curl_httpclient.CurlAsyncHTTPClient"
    except ImportError:
        impl = None
    if not _http_client_configured:
        tornado.httpclient.AsyncHTTPClient.configure(
            impl, max_clients=MAX_CLIENTS, defaults=defaults
        )
        _http_client_configured = True
        if impl:
            log.info("HTTP client: CurlAsyncHTTPClient (keep-alive connections)")
        else:
            log.warning("pycurl not importable; HTTP client: SimpleAsyncHTTPClient (no keep-alive)")
    return "curl" if impl else "simple"


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's server with an accept loop that survives running out of descriptors
    (`castghld.accept`)."""

    def initialize(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        self.metrics = metrics
        super().initialize(*args, **kwargs)

    def add_sockets(self, sockets: Sequence[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = accept_connections(
                sock, self._handle_connection, self.metrics
            )


class Daemon:
    """Everything one castghld process holds; tests run it in-process on loopback."""

    def __init__(self, config: Config):
        """Build every part (castghld.startup's steps); StartupError names what is wrong."""
        self.config = config
        self.metrics = Metrics()
        self.phase = "starting"
        self._reload_requested = False  # a SIGHUP during the start: reloaded once serving
        self.requests = InFlight()  # HTTP requests being answered
        self.exit_code = 0
        self._lock_fd: int | None = None
        self.started_at = time.time()
        self._server: HTTPServer | None = None
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._lag_probe: asyncio.Task | None = None
        self.port = 0
        self.route_of: dict[type, str] = {}  # handler class -> route pattern (make_app)
        self.admin = AdminServer(self)
        problems = StartupProblems()
        self.keyring, self.state = init_state(config, self.metrics, problems)
        self.verifier = init_webhook_keys(config, self.metrics, problems)
        problems.raise_any()
        self.code_exchanges = CodeExchangeLimits()
        self.app_webhook_ids = RecentWebhookIds()
        self.ghl, self.installations = init_tokens(config, self.state, self.metrics)
        self.usage = UsageLedger(self.state)
        delivery = init_delivery(
            config, self.keyring, self.ghl, self.installations, self.metrics, self.usage
        )
        self.outbox, self.cast = delivery.outbox, delivery.cast
        self.outbound, self.inbound = delivery.outbound, delivery.inbound
        load_outbox(self.outbox, self.metrics, self.state)
        self.credits = CastCredits(
            config, self.cast, self.metrics, self.outbox, self.outbound.lane_name
        )
        self.credits.other_reads = self.outbound.accounts.balances
        self.outbound.accounts.waiting = self.credits.waiting.waiting
        # The ledger stops last: the counts of the last sends are in it before the final commit.
        # The credits follow the outbox before it dispatches anything.
        self.components: list[Component] = [
            self.usage,
            self.installations,
            self.credits,
            delivery,
        ]
        self.metrics.before_scrape.append(self._update_backlog_age)

    def _update_backlog_age(self) -> None:
        """castghld_outbox_oldest_age_seconds{kind}: how long the oldest unfinished message of
        each kind has waited since we accepted it (a backlog that only grows shows here first)."""
        now = time.time()
        for kind in ("outbound", "inbound"):
            record = self.outbox.oldest(kind) or {}
            since = record.get("accepted_at") or record.get("received_at")
            age = now - since if isinstance(since, int | float) else 0.0
            self.metrics.oldest_waiting.labels(kind).set(max(0.0, age))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make_app(self) -> tornado.web.Application:
        handlers: list[Any] = []
        handlers += health.default_handlers
        handlers += oauth.default_handlers
        handlers += app_webhook.default_handlers
        handlers += messages.default_handlers
        handlers += inbound.default_handlers
        # The metric label of a request: its route pattern (bounded), never the requested path.
        self.route_of = {cls: pattern for pattern, cls in handlers}
        self.route_of[NotFoundHandler] = "unknown"
        return tornado.web.Application(
            [(pattern, cls, {"daemon": self}) for pattern, cls in handlers],
            default_handler_class=NotFoundHandler,
            default_handler_args={"daemon": self},
            log_function=log_request,
            compress_response=False,
            xsrf_cookies=False,
        )

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Lock the state directory, bind, start components, then serve (on `sockets` if given,
        else on the configured address); StartupError if any step cannot be done."""
        try:
            self._lock_fd = lock_directory(self.config.state.dir)
        except StateError as e:
            raise StartupError([str(e)], e.transient) from None
        remove_leftover_temp_files(self.config.state.dir)
        # Key rotation: the state under the newest key first; the outbox follows in its start.
        await self.state.adopt_newest_key()
        try:
            self.admin.bind()  # before the port: a refusal must come before GHL can reach us
        except AdminSocketError as e:
            raise StartupError([f"{self.config.path}: {e}"]) from None
        if sockets is None:
            sockets = self._bind()
        try:
            for component in self.components:
                await component.start()
        except (StateError, OSError) as e:
            raise StartupError([str(e)], is_transient(e)) from None
        self._server = self.init_server()
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.admin.start()
        self.phase = "serving"
        if os.environ.get(LAG_PROBE_ENV) == "1":
            self._start_lag_probe()
        log.info("castghld %s listening on %s:%d", __version__, self.config.server.host, self.port)
        sdnotify.notify("READY=1")
        if self._reload_requested:
            self._reload_requested = False
            self.reload_from_signal()

    def _bind(self) -> list[socket.socket]:
        server = self.config.server
        try:
            return tornado.netutil.bind_sockets(server.port, server.host)
        except OSError as e:
            raise StartupError(
                [f"cannot listen on {server.host}:{server.port}: {e.strerror or e}"],
                is_transient(e),
            ) from None

    def init_server(self) -> HTTPServer:
        """The HTTP server of `make_app()`'s routes, not listening yet."""
        return HTTPServer(
            self.make_app(),
            metrics=self.metrics,
            xheaders=self.config.server.xheaders,
            # The handlers answer 413 themselves for bodies over 1 MiB; this only stops a client
            # from streaming an unbounded body at us.
            max_body_size=16 * 1024 * 1024,
            idle_connection_timeout=60,
            body_timeout=30,
        )

    def _start_lag_probe(self) -> None:
        histogram = prometheus_client.Histogram(
            "castghld_loop_lag_seconds",
            "How late a 5 ms timer fires: IOLoop blocked (benchmark probe)",
            buckets=LAG_BUCKETS,
            registry=self.metrics.registry,
        )
        self._lag_probe = asyncio.ensure_future(probe_loop_lag(histogram))

    def reload(self) -> bool:
        """SIGHUP: re-read the config file, its secret files and the webhook public keys.

        All or nothing: a new config with any problem is rejected (each problem logged) and the
        running one stays. Otherwise every component that keeps the config (`config_holders`)
        sees the new one from its next use on (no restart of loops or workers; a send in progress
        finishes with what it started with). Keys in `reload.RESTART_KEYS` keep their running
        value and are logged as waiting for a restart. Returns whether the new config was taken.
        """
        running = self.config
        try:
            loaded = load_config(running.path)
            extra_keys = load_public_keys(loaded.ghl.webhook_public_keys)
        except ConfigError as e:
            self.metrics.reload_done(applied=False)
            for problem in e.problems:
                log.error("reload rejected, running config kept: %s", problem)
            return False
        except KeyFileError as e:
            self.metrics.reload_done(applied=False)
            log.error(
                "reload rejected, running config kept: %s: ghl.webhook_public_keys: %s",
                running.path,
                e,
            )
            return False
        changes = config_changes(running, loaded)
        new = effective_config(running, loaded)
        for holder in self.config_holders():
            holder.config = new
        self.verifier = SignatureVerifier(
            extra_keys, accept_legacy=new.ghl.accept_legacy_rsa, metrics=self.metrics
        )
        self.inbound.routes = inbound_routes(new)
        if new.logging != running.logging:
            setup_logging(new.logging.level, new.logging.format)
        self.metrics.reload_done(applied=True)
        for change in changes:
            if needs_restart(change):
                log.warning("reload: %s (takes effect at the next restart)", change.describe())
            else:
                log.info("reload: %s", change.describe())
        stale = unrefreshed_credentials(running, loaded)
        if stale:
            log.warning(
                "reload: %s unchanged in $CREDENTIALS_DIRECTORY: systemd copied it at start; a new "
                "value in its LoadCredential= source is not seen until `systemctl restart "
                "castghld` (or a systemd that refreshes credentials on reload)",
                ", ".join(stale),
            )
        note = "" if changes else " (secret files and webhook keys re-read)"
        if stale:
            note = f"; {len(stale)} systemd credential(s) not known to be current (see above)"
        log.info("config reloaded from %s: %d change(s)%s", running.path, len(changes), note)
        return True

    def reload_from_signal(self) -> None:
        """SIGHUP: `reload` inside systemd's reload protocol (RELOADING=1 with the monotonic
        time, then READY=1) with a STATUS= that `systemctl status` shows: a rejected reload is
        visible there and in `castghld_config_last_reload_successful`, not only in the log.

        Before the start has said READY=1 the reload waits for it (a READY=1 from it would tell
        systemd the start is done while it may still fail); during a stop it is not done."""
        if self.phase != "serving":
            self._reload_requested = self.phase == "starting"
            log.info("SIGHUP while %s: reloaded once serving, if ever", self.phase)
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        if self.reload():
            status = "config reloaded"
        else:
            status = "reload rejected, running config kept (journalctl -u castghld -p err)"
        sdnotify.notify(f"READY=1\nSTATUS={status}")

    def config_holders(self) -> list[Any]:
        """The components that keep the config and read it at each use; a reload hands each the
        new one. A component that keeps a reference to the config belongs in this list."""
        return [
            self,
            self.ghl,
            self.installations,
            self.cast,
            self.outbound,
            self.inbound,
            self.credits.balances,
        ]

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_for_stop_request(self) -> None:
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Graceful stop (see module docstring); safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self.phase = "stopping"
        sdnotify.notify("STOPPING=1")
        if self._lag_probe is not None:
            self._lag_probe.cancel()
        served = self._server is not None
        if served:
            log.info("stopping: no new connections; draining %d request(s)", self.requests.count)
        else:  # a start that failed before listening: nothing to drain, the error says why
            log.debug("start failed before listening; releasing what was opened")
        await self.admin.stop()
        self.installations.begin_stop()
        budget = max(1.0, self.config.server.shutdown_timeout - RESERVED_FOR_LATER_PHASES)
        deadline = time.monotonic() + budget
        if self._server is not None:
            self._server.stop()
        if not await self.requests.wait_idle(deadline - time.monotonic()):
            log.warning("shutdown bound reached; cutting %d request(s)", self.requests.count)
        if self._server is not None:
            await self._server.close_all_connections()
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:
                log.exception("error stopping %s", type(component).__name__)
        try:
            await self.state.commit()
        except OSError as e:
            self.exit_code = 1
            log.error(
                "could not save %s (%s): token pairs refreshed since its last write are lost; "
                "those locations may need to reinstall",
                self.state.path,
                e.strerror,
            )
        finally:
            self.state.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        log.log(logging.INFO if served else logging.DEBUG, "stopped")


async def run(config: Config) -> int:
    """`castghld serve`: run until SIGTERM/SIGINT, then stop gracefully; the exit code."""
    configure_http_client(config.delivery.request_timeout)
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    # Without a handler SIGHUP (logrotate, `kill -HUP` habit) would end the process with no
    # drain, and systemd counts that death as clean: Restart=on-failure would not bring it back.
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_from_signal)
    try:
        await daemon.start()
    except StartupError:
        await daemon.stop()
        raise
    # What startup loaded (modules, config, the outbox's waiting records) lives as long as the
    # process: full collections need not walk it again.
    gc.freeze()
    await daemon.wait_for_stop_request()
    log.info("stop requested")
    await daemon.stop()
    return daemon.exit_code

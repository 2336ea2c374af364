"""The startup steps: each builds one part of a daemon from the config (`init_state`,
`init_webhook_keys`, `init_tokens`, `init_delivery`, `load_outbox`), collecting what is wrong as
`StartupProblems` and raising it as one `StartupError`. `app.Daemon` runs them all; an offline
command of cli.py runs only those it needs.
"""

from __future__ import annotations

import logging
import time

from castghld.cast import CastClient
from castghld.config import Config
from castghld.ghl import GHLClient
from castghld.inbound import InboundDelivery
from castghld.metrics import Metrics
from castghld.outbound import OutboundDelivery
from castghld.outbox import Outbox
from castghld.signatures import KeyFileError, SignatureVerifier, load_public_keys
from castghld.state import KeyRing, StateError, StateStore, is_transient
from castghld.tokens import Installations
from castghld.usage import UsageLedger

log = logging.getLogger("castghld")

# Cast sends and GHL inbound posts in flight at a stop get this long to finish (the stop budget
# is laid out in app.py).
SEND_DRAIN_SECONDS = 5.0


class StartupError(Exception):
    """The daemon cannot start; each line of `problems` says why and names the file.
    `transient`: nothing to fix in the config, a later start may work (address in use, an I/O
    error, the state directory locked by a process that is exiting): the CLI exits 75."""

    def __init__(self, problems: list[str], transient: bool = False):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.transient = transient


class DeliveryPipelines:
    """The outbox and the two pipelines it dispatches to (Cast sends and GHL inbound posts), as
    one component.

    Stop: no new Cast send or GHL inbound post starts; those in flight get SEND_DRAIN_SECONDS to
    finish and record their outcome; then every pipeline stops where it is (on disk).
    """

    def __init__(
        self,
        outbox: Outbox,
        cast: CastClient,
        outbound: OutboundDelivery,
        inbound: InboundDelivery,
    ):
        self.outbox = outbox
        self.cast = cast
        self.outbound = outbound
        self.inbound = inbound

    async def start(self) -> None:
        await self.outbox.start()

    async def stop(self) -> None:
        self.cast.begin_stop()
        self.inbound.begin_stop()
        deadline = time.monotonic() + SEND_DRAIN_SECONDS
        if not await self.cast.sends.wait_idle(SEND_DRAIN_SECONDS):
            log.warning(
                "%d Cast send(s) still in flight after %.0fs; they resume (same idempotency key) "
                "at the next start",
                self.cast.sends.count,
                SEND_DRAIN_SECONDS,
            )
        if not await self.inbound.posts.wait_idle(deadline - time.monotonic()):
            log.warning(
                "%d GHL inbound post(s) still in flight; they are posted again at the next start",
                self.inbound.posts.count,
            )
        await self.outbox.stop()


# -- Startup steps ---------------------------------------------------------------------------
# Each builds one part of a daemon from the config. `Daemon` runs them all; an offline command
# runs only those whose parts it reads (cli.py): `installs` the state, `reconcile` the state and
# the token side, `check-config` the files `serve` would load. None of them locks, binds or
# writes: `Daemon.start` does.


class StartupProblems:
    """Problems of the steps after which the next step can still run, so that one start (or
    check-config) names all of them; `raise_any` raises them as one StartupError."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._transient: list[bool] = []

    def add(self, problem: str, transient: bool = False) -> None:
        self.problems.append(problem)
        self._transient.append(transient)

    def raise_any(self) -> None:
        if self.problems:
            raise StartupError(self.problems, all(self._transient))


def init_state(
    config: Config, metrics: Metrics, problems: StartupProblems
) -> tuple[KeyRing, StateStore]:
    """The key ring and the state file, loaded. Without a readable key ring nothing else can be
    read: StartupError at once; a state file that does not load is one of `problems`."""
    try:
        keyring = KeyRing.load(config.state.key_file)
    except StateError as e:
        raise StartupError([f"{config.path}: {e}"], e.transient) from None
    state = StateStore(config.state.dir, keyring)
    state.on_write = metrics.state_write_seconds.observe
    try:
        state.load()
    except StateError as e:
        problems.add(str(e), e.transient)
    return keyring, state


def init_webhook_keys(
    config: Config, metrics: Metrics, problems: StartupProblems
) -> SignatureVerifier:
    """The verifier of GHL webhook signatures: the built-in keys and `ghl.webhook_public_keys`
    (a file that does not load is one of `problems`)."""
    try:
        extra_keys = load_public_keys(config.ghl.webhook_public_keys)
    except KeyFileError as e:
        problems.add(f"{config.path}: ghl.webhook_public_keys: {e}")
        extra_keys = []
    return SignatureVerifier(
        extra_keys, accept_legacy=config.ghl.accept_legacy_rsa, metrics=metrics
    )


def init_tokens(
    config: Config, state: StateStore, metrics: Metrics
) -> tuple[GHLClient, Installations]:
    """The GHL client and the install records with their tokens (nothing runs until started)."""
    ghl = GHLClient(config, metrics)
    return ghl, Installations(config, state, ghl, metrics)


def init_outbox(config: Config, keyring: KeyRing, metrics: Metrics) -> Outbox:
    """The outbox, empty until `load_outbox`."""
    return Outbox(config.state.dir, keyring, metrics, config.delivery.seen_retention)


def load_outbox(outbox: Outbox, metrics: Metrics, state: StateStore) -> None:
    """Replay the outbox journal (read-only); StartupError if it cannot be read, or if a line
    is under a key that an earlier start used (`state`'s key history) and the ring lacks."""
    outbox.journal.retired_key_ids = frozenset(state.key_history())
    try:
        outbox.load()
    except (StateError, OSError) as e:
        raise StartupError([str(e)], is_transient(e)) from None
    metrics.outbox_quarantined.set(len(outbox.journal.unreadable))


def init_delivery(
    config: Config,
    keyring: KeyRing,
    ghl: GHLClient,
    installations: Installations,
    metrics: Metrics,
    usage: UsageLedger | None = None,
) -> DeliveryPipelines:
    """The Cast client, the outbox (not loaded) and its outbound and inbound pipelines; they
    count what they send and receive in `usage`."""
    cast = CastClient(config, metrics)
    outbox = init_outbox(config, keyring, metrics)
    outbound = OutboundDelivery(config, cast, ghl, installations, metrics, usage)
    inbound = InboundDelivery(config, ghl, installations, metrics)
    if usage is not None:
        inbound.count_reply = lambda location_id: usage.count_reply(
            location_id, cast.account_for(location_id).name
        )
    outbox.pipelines["outbound"] = outbound
    outbox.pipelines["inbound"] = inbound
    # Replies kept for want of an installed location go on once one is installed.
    installations.on_usable.append(lambda _location_id: outbox.redispatch("inbound"))
    # Texts of a location that left are not sent or reported any more.
    installations.on_departed.append(outbound.location_departed)
    return DeliveryPipelines(outbox, cast, outbound, inbound)

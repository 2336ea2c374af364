"""Fake GHL and fake Cast: real Tornado servers on loopback for tests, demos and benchmarks.

Modules: `server` (the framework both fakes share: listening, the call log, violations, scripted
failures, hangs, random faults, and the test helpers `wait_for` and `max_in_window`), `ghl`
(`FakeGHL`), `cast` (`FakeCast`), `cast_accounts` (Cast's account side: wallets, key and account
switches, ``/api/v1/account/*``). Import from here: every public name is re-exported.

The fakes hold the daemon to SPEC §4 and §5, not to what the daemon happens to send. Guarantees:

- Every request is logged in ``calls`` (a `Call`) before anything else happens: rejected, hung
  and slow requests included.
- Every contract breach the fakes detect (missing or wrong header, wrong ``Version``, wrong content
  type, a body field that is missing, mistyped or unknown, a wrong client secret, an unknown route,
  going over a rate limit) is appended to ``violations`` as one line of text and answered with the
  error status the real service would give. ``violations == []`` at the end of a test means every
  request the daemon made was one the contract allows.
- What a correct client can meet is answered like the real service but is no violation: an expired
  access token, a reused, revoked or unknown refresh token (``refresh_reuse`` counts reuses), a
  spent authorization code, a suspended location, an unknown API key.
- GHL refresh tokens and authorization codes are single-use. A Cast ``X-Idempotency-Key`` seen
  again for the same API key (or account: `FakeCast.idempotency_scope`) replays the first answer
  and never sends twice.
- Scripting (`fail_next`, `latency`, `hang`) works per logical route: GHL ``token``,
  ``location_token``, ``installed_locations``, ``status``, ``upsert``, ``inbound``; Cast ``send``,
  ``sms_status``, ``balance``, ``profile``, ``usage``, ``sender_ids``, ``unsubscribed``
  (``hang("refresh")`` holds only GHL refresh grants). A scripted failure is
  spent by the next request to its route that passed the contract and authentication checks, and
  changes no state (no token consumed, no idempotency key stored). Status 599 drops the
  connection without an answer.
- Random faults (`fault_mix`, a `FaultMix` per route) come from a seeded ``random.Random``: error
  statuses (599: a reset connection), 429 bursts with ``Retry-After``, and slow answers that take
  effect but arrive after the client's timeout. They are drawn where scripted failures are (after
  the contract and authentication checks, before any state change), never recorded as
  violations, and counted in ``faults`` by (route, kind).
- Fake Cast can cache a transient error under the idempotency key (`FakeCast.error_cache_seconds`):
  a 5xx answered to a send is replayed to that key for that long, as an idempotency layer that
  stores every answer does; nothing was sent meanwhile.
- Fake Cast's accounts have unlimited credits until a test gives one a wallet (`set_credits`):
  then sends spend it by parts (`castghld.parts.message_parts`) and are refused with 402 when it
  cannot pay. Key and account switches (`revoke_key`, `expire_key`, `deactivate`, `refuse_ip`,
  `allow_channels`) answer Cast's 403s; `add_key` is a rotation (both keys valid, one account).
  Idempotency keys are kept per API key (`idempotency_scope`, or per account); refusals are not
  kept under them unless `cache_refusals`.
- `stop` releases hung and slow requests, lets them answer, then closes every connection.
"""

from __future__ import annotations

from castghld.fakes.cast import (
    CAST_ERROR_CODES,
    CAST_SEND_FIELDS,
    DEFAULT_DLR,
    PH_MOBILE,
    FakeCast,
)
from castghld.fakes.cast_accounts import UNLIMITED_CREDITS, FakeCastAccount
from castghld.fakes.ghl import (
    E164,
    GHL_RATE_MAX,
    GHL_RATE_WINDOW,
    GHL_SCOPES,
    GHL_VERSION,
    GHL_VERSION_CONTACTS,
    INBOUND_FIELDS,
    STATUS_FIELDS,
    UPSERT_FIELDS,
    FakeGHL,
)
from castghld.fakes.server import (
    DROP_CONNECTION,
    FORM,
    Answer,
    Call,
    FaultMix,
    max_in_window,
    wait_for,
)

__all__ = [
    "CAST_ERROR_CODES",
    "CAST_SEND_FIELDS",
    "DEFAULT_DLR",
    "DROP_CONNECTION",
    "E164",
    "FORM",
    "GHL_RATE_MAX",
    "GHL_RATE_WINDOW",
    "GHL_SCOPES",
    "GHL_VERSION",
    "GHL_VERSION_CONTACTS",
    "INBOUND_FIELDS",
    "PH_MOBILE",
    "STATUS_FIELDS",
    "UNLIMITED_CREDITS",
    "UPSERT_FIELDS",
    "Answer",
    "Call",
    "FakeCast",
    "FakeCastAccount",
    "FakeGHL",
    "FaultMix",
    "max_in_window",
    "wait_for",
]

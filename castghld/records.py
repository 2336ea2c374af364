"""The outbound record: what the outbox keeps of one GHL message on its way to Cast and back.

One definition of its fields (`OutboundRecord`) and of its stages (`Stage`), for the steps that
write them (castghld.outbound) and whatever reads them (the admin socket, the backlog metrics).

Guarantees:
- At runtime a record is a plain ``dict`` of atomic values (str, int, float, bool, None, tuple of
  str), never an instance of a class: the GC untracks such dicts, so 100k waiting messages cost a
  full collection nothing. `OutboundRecord` is a `TypedDict`, which is a plain dict at runtime;
  `Stage` values are plain str for the same reason (an Enum member is an object the GC tracks).
- Records are replaced, never mutated (the outbox's ``update``/``note`` build a new dict): a
  record handed out is a consistent snapshot.
- Which fields survive a restart is the outbox journal's business: ``put`` (the fields
  `new_record` sets), ``update`` (journaled progress) and ``note`` (memory only). Each field
  below says which.

Stages: ``new`` -> (send through Cast) -> ``sent`` -> (report ``pending`` to GHL) -> ``polling``
-> (poll Cast's delivery status) -> ``report`` -> (report the final status) -> finished (the
record leaves the outbox; its id stays seen). A message we cannot send goes ``new`` ->
``report`` with status ``failed`` and a reason.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

KIND = "outbound"


class Stage:
    """Where an outbound record is (its ``stage`` field). Plain str constants, not an Enum."""

    NEW = "new"  # waiting for its first send, or for a send retry
    SENT = "sent"  # Cast took it (journaled with its cast_id): report ``pending`` to GHL next
    POLLING = "polling"  # GHL shows ``pending``: poll Cast's delivery status on its schedule
    REPORT = "report"  # the final status is decided: report it to GHL, then finish
    # Written by an older version once its polls were used up: finished as ``pending``.
    UNDECIDED = "undecided"


class _Accepted(TypedDict):
    """The fields of every outbound record: set by `new_record` at ack time, journaled in the
    ``put`` entry before the webhook is answered 200."""

    kind: str  # KIND
    stage: str  # a `Stage` value
    message_id: str  # GHL's messageId: also Cast's X-Idempotency-Key
    location_id: str
    type: str  # GHL's message type; only "SMS" is sent
    phone: str  # as GHL sent it; normalised to E.164 at each send
    message: str
    attachments: tuple[str, ...]  # URLs, appended to the SMS text (Cast has no MMS)
    received_at: float  # wall clock at ack: the send deadline and the resend window count from it


class OutboundRecord(_Accepted, total=False):
    """An outbound record. Optional fields, by who sets them and whether a restart keeps them
    (journaled: in an ``update`` entry; memory: a restart does that work again)."""

    # The webhook handler, in the ``put`` entry: (error code, reason) why its fields cannot be
    # sent; the message is reported failed without an attempt.
    refused: tuple[str, str]
    # The send step, journaled before the first request may leave: the Cast account (its name
    # and sender ID) is the idempotency key's scope, so every resend goes through it.
    attempted: bool
    account: str  # the account's name (cast.account; unnamed: its key's default name)
    sender_id: str
    # The send step, journaled before an attempt that changes them may leave: the key id
    # (`CastAccount.key_id`, a hash) the message was last attempted with, and the idempotency key
    # when it is not the message id (a new one after a cached refusal). ``unsent``: journaled
    # True after a definite account refusal while every attempt so far got one (nothing can have
    # been sent), False before the next attempt leaves.
    key_id: str
    idem_key: str
    unsent: bool
    # The send step, memory: the account refusal this message met last and the account's resume
    # count (`AccountStates.epoch`) then; ``fresh_key``: the next attempt takes a new idem_key.
    refused_code: str
    refused_epoch: int
    fresh_key: bool
    # The send step, journaled with stage ``sent``.
    cast_id: str  # Cast's message id, for the status polls
    sent_at: float
    # The send step, memory: this run's attempts, and the last error retried.
    tries: int
    provider_errors: int  # Cast 502 PROVIDER_ERRORs so far (retried a few times only)
    last_status: int
    last_code: str
    last_reason: str
    resumed: bool  # the first attempt happened before a restart
    # The decided final status (stage ``report``). Decided by the send step: journaled once the
    # message was attempted, memory for a refusal before any attempt (decided again the same way
    # after a restart). Decided by a status poll: memory (a restart polls again).
    status: str  # "delivered" or "failed" ("pending" is reported, never stored)
    error_code: str
    error_reason: str
    error: dict[str, str]  # the same, as journaled by an older version
    # The receipt (status poll) step, memory.
    polls_done: int  # points of ``delivery.status_polls`` used up by answered polls
    poll_failures: int  # unanswered polls in a row (backoff)
    # The report step, memory.
    report_since: float | None  # wall clock of the first try of the current report
    report_failures: int


def record_id(message_id: str) -> str:
    return "out:" + message_id


def new_record(payload: dict[str, Any]) -> OutboundRecord:
    """The outbox record of an authentic, well-formed webhook (fields validated by the handler)."""
    return {
        "kind": KIND,
        "stage": Stage.NEW,
        "message_id": payload["messageId"],
        "location_id": payload["locationId"],
        "type": payload.get("type", "SMS"),
        "phone": payload.get("phone") or "",
        "message": payload.get("message") or "",
        "attachments": tuple(payload.get("attachments") or ()),
        "received_at": time.time(),
    }


def log_context(record: OutboundRecord) -> str:
    """How a log line names the message: its GHL ids, never its number or text."""
    return f"message={record['message_id']} location={record['location_id']}"


def sms_text(record: OutboundRecord) -> str:
    """The message with attachment URLs appended, one per line (Cast has no MMS)."""
    parts = [record["message"]] if record["message"] else []
    parts += record["attachments"]
    return "\n".join(parts)

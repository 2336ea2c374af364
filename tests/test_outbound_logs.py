"""The log line of each final outbound failure says what happened, with Cast's code and text,
as JSON fields too, and never a full phone number."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket

import pytest

from castghld.cast import PROVIDER_ERROR_RETRIES
from castghld.fakes import wait_for
from castghld.log import _JSONFormatter, _TextFormatter

NUMBER = "+639171234567"


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


async def failed_message(bridge, caplog, extra: dict | None = None) -> list[logging.LogRecord]:
    """Send msg-1 to NUMBER, wait until GHL was told `failed`; the outbound warnings/errors."""
    caplog.set_level(logging.INFO, logger="castghld")
    await bridge.start(extra)
    await bridge.install("loc1")
    await bridge.post_message(phone=NUMBER)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1")[-1:] == ["failed"], timeout=25)
    await wait_for(lambda: not bridge.daemon.outbox.records)
    return [
        r for r in caplog.records if r.name == "castghld.outbound" and r.levelno >= logging.WARNING
    ]


def assert_no_full_number(records: list[logging.LogRecord]) -> None:
    for formatter in (_TextFormatter(journal=False), _JSONFormatter(journal=False)):
        for record in records:
            assert "9171234567" not in formatter.format(record)


def json_fields(record: logging.LogRecord) -> dict:
    return json.loads(_JSONFormatter(journal=False).format(record))


def cast_error(code: str, text: str) -> dict:
    return {"success": False, "error": text, "error_code": code}


@pytest.mark.gen_test(timeout=30)
async def test_final_refusal_logs_cast_refused_with_its_code(bridge, caplog):
    bridge.cast.fail_next("send", 400, cast_error("VALIDATION_ERROR", f"Bad number ({NUMBER})"))
    [line] = await failed_message(bridge, caplog)
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        "Cast refused message=msg-1 location=loc1: 400 VALIDATION_ERROR Bad number ([number])"
    )
    fields = json_fields(line)
    assert {k: fields[k] for k in ("message_id", "location_id", "outcome", "status")} == {
        "message_id": "msg-1",
        "location_id": "loc1",
        "outcome": "refused",
        "status": 400,
    }
    assert fields["error_code"] == "VALIDATION_ERROR"
    assert fields["reason"] == "Bad number ([number])"
    assert_no_full_number(caplog.records)


@pytest.mark.gen_test(timeout=40)
async def test_provider_errors_retried_out_log_gave_up_not_refused(bridge, caplog):
    bridge.cast.fail_next(
        "send", 502, cast_error("PROVIDER_ERROR", f"carrier rejected {NUMBER}"), times=100
    )
    lines = await failed_message(bridge, caplog, {"delivery": {"send_deadline": "1h"}})
    attempts = 1 + PROVIDER_ERROR_RETRIES
    *retries, final = lines
    assert len(retries) == PROVIDER_ERROR_RETRIES
    assert all(r.getMessage().startswith("Cast 502 PROVIDER_ERROR") for r in retries)
    assert final.levelno == logging.ERROR
    assert re.fullmatch(
        rf"gave up on message=msg-1 location=loc1 after {attempts} attempts over \d+\.\ds: "
        r"last error 502 PROVIDER_ERROR carrier rejected \[number\] "
        rf"\({PROVIDER_ERROR_RETRIES} retries of PROVIDER_ERROR used up\)",
        final.getMessage(),
    ), final.getMessage()
    fields = json_fields(final)
    assert fields["outcome"] == "gave_up"
    assert fields["status"] == 502
    assert fields["error_code"] == "PROVIDER_ERROR"
    assert fields["attempt"] == attempts
    assert fields["message_id"] == "msg-1" and fields["location_id"] == "loc1"
    assert not any("Cast refused" in r.getMessage() for r in caplog.records)
    assert_no_full_number(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_server_errors_until_the_send_deadline_log_gave_up(bridge, caplog):
    bridge.cast.fail_next(
        "send",
        503,
        cast_error("SERVICE_UNAVAILABLE", "maintenance"),
        headers={"Retry-After": "1"},
        times=100,
    )
    lines = await failed_message(bridge, caplog, {"delivery": {"send_deadline": "3s"}})
    final = lines[-1]
    assert final.levelno == logging.ERROR
    assert re.fullmatch(
        r"gave up on message=msg-1 location=loc1 after \d+ attempts over \d+\.\ds: "
        r"last error 503 SERVICE_UNAVAILABLE maintenance \((the next retry would fall after the "
        r"send deadline|the send deadline passed while it waited for its retry)\)",
        final.getMessage(),
    ), final.getMessage()
    fields = json_fields(final)
    assert fields["outcome"] == "gave_up"
    assert fields["status"] == 503
    assert fields["attempt"] == len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) >= 2
    assert bridge.ghl.statuses["msg-1"][-1]["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert not any("Cast refused" in r.getMessage() for r in caplog.records)
    assert_no_full_number(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_failed_delivery_report_logs_casts_dlr_status_and_text(bridge, caplog):
    bridge.cast.set_delivery(
        NUMBER, "undelivered", dlr_status="UNDELIV", error_message=f"Subscriber {NUMBER} absent"
    )
    [line] = await failed_message(bridge, caplog)
    cast_id = bridge.cast.sent[0]["message_id"]
    assert line.getMessage() == (
        f"Cast reported undelivered message=msg-1 location=loc1 cast_id={cast_id}: "
        "dlr_status=UNDELIV Subscriber [number] absent"
    )
    fields = json_fields(line)
    assert {
        k: fields[k]
        for k in ("message_id", "location_id", "cast_id", "outcome", "status", "reason")
    } == {
        "message_id": "msg-1",
        "location_id": "loc1",
        "cast_id": cast_id,
        "outcome": "failed",
        "status": "undelivered",
        "reason": "Subscriber [number] absent",
    }
    assert fields["error_code"] == "UNDELIV"
    assert_no_full_number(caplog.records)


FORGED = "\nERROR castghld.app: forged line\r\n<3>CRITICAL castghld: forged too"


def assert_one_line_each(records: list[logging.LogRecord]) -> None:
    """Whatever Cast's text holds, each event is one line in every format (under journald each
    line is an entry of its own: a line break would forge one)."""
    formatters = [_TextFormatter(journal=False), _TextFormatter(journal=True)]
    formatters.append(_JSONFormatter(journal=False))
    for record in records:
        for formatter in formatters:
            text = formatter.format(record)
            assert "\n" not in text and "\r" not in text, text
            assert "forged" not in text or "\\nERROR castghld.app: forged line" in text, text


@pytest.mark.gen_test(timeout=30)
async def test_casts_error_text_cannot_forge_a_log_line(bridge, caplog):
    bridge.cast.fail_next("send", 400, cast_error("VALIDATION_ERROR", "bad" + FORGED))
    [line] = await failed_message(bridge, caplog)
    assert line.getMessage().startswith("Cast refused message=msg-1 location=loc1: 400 ")
    assert_one_line_each(caplog.records)
    assert json_fields(line)["reason"] == "bad" + FORGED  # JSON keeps the text, escaped


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_delivery_reports_text_cannot_forge_a_log_line_or_leak_a_number(
    bridge, caplog
):
    text = f"Message to {NUMBER}." + FORGED
    bridge.cast.set_delivery(NUMBER, "failed", dlr_status="REJECTD", error_message=text)
    [line] = await failed_message(bridge, caplog)
    assert "Message to [number]." in line.getMessage()
    assert_one_line_each(caplog.records)
    assert_no_full_number(caplog.records)
    assert "9171234567" not in str(bridge.ghl.statuses["msg-1"])


@pytest.mark.gen_test(timeout=30)
async def test_a_cast_redirect_is_not_followed_with_the_key_and_the_sms(bridge, caplog, elsewhere):
    url, seen = elsewhere
    bridge.cast.fail_next("send", 307, "", headers={"Location": url}, times=100)
    lines = await failed_message(bridge, caplog, {"delivery": {"send_deadline": "2s"}})
    assert seen == []  # libcurl would resend the SMS, its number and X-API-Key there
    assert lines[-1].getMessage().startswith("gave up on message=msg-1 location=loc1 after ")
    assert " last error 502 HTTP_307 " in lines[-1].getMessage()


@pytest.mark.gen_test(timeout=30)
async def test_gave_up_after_a_restart_does_not_pass_off_its_attempts_as_all(bridge, caplog):
    caplog.set_level(logging.INFO, logger="castghld")
    unavailable = cast_error("SERVICE_UNAVAILABLE", "maintenance")
    bridge.cast.fail_next("send", 503, unavailable, times=100)
    extra = {"delivery": {"send_deadline": "2s"}}
    await bridge.start(extra)
    await bridge.install("loc1")
    await bridge.post_message(phone=NUMBER)
    await wait_for(lambda: len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) >= 1)
    await bridge.stop()
    before = len(bridge.cast.calls_to("POST", "/api/v1/sms/send"))
    await asyncio.sleep(2.5)  # down past the send deadline: the restart resends once (same key)
    await bridge.start(extra)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1")[-1:] == ["failed"], timeout=15)
    after = len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) - before
    [final] = [r for r in caplog.records if r.getMessage().startswith("gave up on ")]
    message = final.getMessage()
    # This run knows its own attempts only: it must not present them as every attempt.
    assert re.match(
        rf"gave up on message=msg-1 location=loc1 after {after} attempts? since castghld "
        r"restarted over \d+\.\ds: last error 503 SERVICE_UNAVAILABLE maintenance ",
        message,
    ), message
    assert json_fields(final)["attempt"] == after


@pytest.mark.gen_test(timeout=30)
async def test_a_retried_send_logs_why_cast_did_not_answer(bridge, caplog):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every send is refused at connect
    extra = {"cast": {"api_base": f"http://127.0.0.1:{port}"}, "delivery": {"send_deadline": "2s"}}
    lines = await failed_message(bridge, caplog, extra)
    *retries, final = lines
    assert retries, [r.getMessage() for r in lines]
    assert all(
        "attempt=" in r.getMessage()
        and ": no answer from Cast: CurlError (Failed to connect to 127.0.0.1" in r.getMessage()
        for r in retries
    ), [r.getMessage() for r in retries]
    assert final.getMessage().startswith("gave up on message=msg-1 location=loc1 after ")

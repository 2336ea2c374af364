"""Log lines a sysadmin can filter: journald priorities, JSON fields, timestamps, no secrets."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from tornado.httpclient import AsyncHTTPClient

SCRIPT = """
import logging, sys
from castghld.log import setup_logging
setup_logging("debug", sys.argv[1])
log = logging.getLogger("castghld")
log.debug("debug line")
log.info("sent message=%s", "m1", extra={"message_id": "m1", "location_id": "loc1",
         "cast_id": "CAST1", "outcome": "sent", "status": 200, "ms": 12.5,
         "token": "leaked-token"})
log.warning("retrying")
log.error("Cast refused", extra={"reason": "to +639171234567 access_token=abc"})
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed")
"""


def run_logging(tmp_path, fmt: str, journal: bool) -> list[str]:
    """Run SCRIPT with stderr to a file; with `journal`, JOURNAL_STREAM names that file, as
    systemd does for a service whose stderr is the journal stream."""
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT, fmt], stderr=err, env=env, check=True)
    return err_path.read_text().splitlines()


def test_priority_prefixes_when_stderr_is_the_journal(tmp_path):
    lines = run_logging(tmp_path, "text", journal=True)
    assert lines[0] == "<7>DEBUG castghld: debug line"
    assert lines[1].startswith("<6>INFO castghld: sent")
    assert lines[2].startswith("<4>WARNING")
    assert lines[3].startswith("<3>ERROR")
    # Every line of a traceback is filed at the record's priority, not at journald's default.
    traceback = lines[4:]
    assert len(traceback) > 2 and all(line.startswith("<3>") for line in traceback)


def test_no_prefix_when_journal_stream_is_another_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    lines = run_logging(tmp_path, "text", journal=False)
    assert not any(line.startswith("<") for line in lines)


def test_text_lines_carry_a_utc_timestamp_outside_journald(tmp_path):
    lines = run_logging(tmp_path, "text", journal=False)
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO castghld: sent message=m1$", lines[1]
    )


def test_json_lines_have_real_fields_from_extra(tmp_path):
    events = [json.loads(line) for line in run_logging(tmp_path, "json", journal=False)]
    sent = events[1]
    assert sent["msg"] == "sent message=m1"
    assert sent["message_id"] == "m1"
    assert sent["location_id"] == "loc1"
    assert sent["cast_id"] == "CAST1"
    assert sent["outcome"] == "sent"
    assert sent["status"] == 200
    assert sent["ms"] == 12.5
    assert "token" not in sent  # not in the allowlist
    refused = events[3]
    assert refused["level"] == "error"
    assert "+639171234567" not in refused["reason"] and "[number]" in refused["reason"]
    assert "abc" not in refused["reason"]
    assert "ValueError: boom" in events[4]["exc"]


def test_json_under_journald_is_prefixed(tmp_path):
    lines = run_logging(tmp_path, "json", journal=True)
    assert lines[3].startswith("<3>{")
    assert json.loads(lines[3][3:])["level"] == "error"


@pytest.fixture
def daemon(daemons):
    return daemons.start()


@pytest.mark.gen_test(timeout=20)
async def test_refused_webhook_logs_why_and_counts_the_request(daemon, caplog):
    body = b'{"type": "SMS", "phone": "+639171234567"}'
    with caplog.at_level(logging.INFO, logger="castghld.access"):
        response = await AsyncHTTPClient().fetch(
            daemon.url + "/api/ghl/v1/webhook/messages",
            method="POST",
            body=body,
            headers={"X-GHL-Signature": "bm90IGEgc2lnbmF0dXJl"},
            raise_error=False,
        )
    assert response.code == 401
    line = next(r for r in caplog.records if r.name == "castghld.access")
    message = line.getMessage()
    assert "401 POST /api/ghl/v1/webhook/messages" in message
    assert "error=invalid_signature: X-GHL-Signature does not verify" in message
    assert "639171234567" not in caplog.text
    assert line.status == 401 and line.reason.startswith("invalid_signature")
    text = generate_latest(daemon.metrics.registry).decode()
    assert (
        'castghld_http_requests_total{route="/api/ghl/v1/webhook/messages",status="401"} 1.0'
        in text
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    "text",
    [
        "bad request\nclient_secret=SUPERSECRET",
        "Host: x\r\nX-API-Key: SUPERSECRET",
        "answer:\nAuthorization: Bearer SUPERSECRET",
    ],
)
def test_a_secret_after_a_line_break_is_scrubbed_in_both_formats(fmt, text):
    """Upstream text is written on one line (breaks escaped); the secret after the break must
    still be scrubbed: escaping first turned the break into a word character before its name."""
    from castghld.log import _JSONFormatter, _TextFormatter

    formatter = _JSONFormatter(False) if fmt == "json" else _TextFormatter(False)
    record = logging.LogRecord("castghld.test", logging.WARNING, __file__, 1, "%s", (text,), None)
    line = formatter.format(record)
    assert "SUPERSECRET" not in line and "[secret]" in line
    assert "\n" not in line


def test_a_reason_for_no_answer_redacts_a_number_after_a_line_break():
    from castghld.log import no_answer_reason

    reason = no_answer_reason(OSError(1, "refused for\n09171234567"))
    assert "9171234567" not in reason and "[number]" in reason and "\n" not in reason


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_logger_named_like_a_secret_keeps_the_first_word_of_its_message(tmp_path, fmt):
    script = (
        "import logging, sys\n"
        "from castghld.log import setup_logging\n"
        "setup_logging('info', sys.argv[1])\n"
        "logging.getLogger('castghld.state').error('compaction of state.bin failed')\n"
        "logging.getLogger('castghld.state').error('refresh state: abc123 token: tok456')\n"
    )
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        subprocess.run([sys.executable, "-c", script, fmt], stderr=err, check=True)
    first, second = err_path.read_text().splitlines()
    assert "castghld.state" in first and "compaction of state.bin failed" in first
    # A name and its value inside the message are still hidden.
    assert "abc123" not in second and "tok456" not in second

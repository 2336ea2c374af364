"""Texts an operator reads must say what happened: no scrubber-mangled messages, no status code
Cast never sends, a TLS failure not called "no answer", durations in the unit the user wrote, no
redundant follow-up error; scrapes and probes stay out of the info log."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for
from castghld.log import _TextFormatter
from tests.test_outbound import statuses
from tests.test_outbound_logs import failed_message


def formatted(records: list[logging.LogRecord]) -> list[str]:
    formatter = _TextFormatter(journal=False)
    return [formatter.format(record) for record in records]


@pytest.mark.gen_test(timeout=30)
async def test_refused_cast_callback_says_why_without_scrubbed_words(bridge, caplog):
    caplog.set_level(logging.INFO, logger="castghld.access")
    await bridge.start()
    response = await AsyncHTTPClient().fetch(
        bridge.daemon.url + "/api/cast/v1/webhook/inbound",
        method="POST",
        headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"},
        body="{}",
        raise_error=False,
    )
    assert response.code == 401
    assert b"[secret]" not in response.body
    lines = [line for line in formatted(caplog.records) if "webhook/inbound" in line]
    assert lines and "[secret]" not in lines[0], lines
    assert "cast.inbound_secret" in lines[0]


@pytest.mark.gen_test(timeout=30)
async def test_scrapes_and_probes_are_logged_at_debug(bridge, caplog):
    caplog.set_level(logging.DEBUG, logger="castghld.access")
    await bridge.start()
    for path in ("/metrics", "/healthz", "/no-such-path"):
        await AsyncHTTPClient().fetch(bridge.daemon.url + path, raise_error=False)
    levels = {
        record.getMessage().split()[2]: record.levelno
        for record in caplog.records
        if record.name == "castghld.access"
    }
    assert levels == {
        "/metrics": logging.DEBUG,
        "/healthz": logging.DEBUG,
        "/no-such-path": logging.WARNING,
    }


def self_signed_for(name: str, tmp_path) -> ssl.SSLContext:
    """A server TLS context with a self-signed certificate for `name` (not 127.0.0.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.mark.gen_test(timeout=30)
async def test_a_cast_that_fails_tls_is_not_reported_as_no_answer(bridge, caplog, tmp_path):
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([]), ssl_options=self_signed_for("wrong.example", tmp_path)
    )
    server.add_sockets([sock])
    caplog.set_level(logging.DEBUG, logger="castghld")
    try:
        extra = {"cast": {"api_base": f"https://127.0.0.1:{port}"}}
        await bridge.start({**extra, "delivery": {"send_deadline": "2s"}})
        await bridge.install("loc1")
        await bridge.post_message()
        await wait_for(lambda: statuses(bridge.ghl, "msg-1")[-1:] == ["failed"], timeout=25)
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "castghld.outbound"]
    tls = [line for line in lines if "no trusted TLS connection to Cast" in line]
    assert tls, lines
    assert not any("no answer" in line for line in lines), lines
    assert not any("599" in line for line in lines), lines


@pytest.mark.gen_test(timeout=30)
async def test_no_answer_from_cast_is_not_given_a_status_cast_never_sends(bridge, caplog):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every send is refused at connect
    extra = {"cast": {"api_base": f"http://127.0.0.1:{port}"}, "delivery": {"send_deadline": "2s"}}
    records = await failed_message(bridge, caplog, extra)
    lines = formatted(records)
    assert lines and all("599" not in line for line in lines), lines
    assert "Cast no answer message=msg-1" in lines[0], lines
    assert "last error no answer" in lines[-1], lines

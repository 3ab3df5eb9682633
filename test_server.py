"""The HTTPS server of ``server.py``, end to end.

A real server runs in a thread on 127.0.0.1, port 0, and the tests speak to it
with ``http.client`` over TLS that trusts the registry's own CA, with hostname
checking on. They walk SPEC section 2's statuses in their order, the
administrator's calls of section 4 with and without the token, whoami by
password and by mutual TLS (section 5), the HTTP framing around them (413, 411,
404, 405, keep-alive), the data folder's modes, and, last, the README's curl
workflow run as printed against ``python3 server.py`` in a subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import ca
import server
from conftest import FakeClock, assert_issued_from, make_csr, make_key, serve

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
JSON = "application/json"
PEM = "application/x-pem-file"
REGISTER = "/api/client-registry/register"
STATUS = "/api/client-registry"
UNLOCK = "/api/client-registry/unlock"
LOCK = "/api/client-registry/lock"
REQUESTS = "/api/client-registry/requests"
USERS = "/api/users"
AUDIT = "/api/client-registry/audit"
CA_PATH = "/api/client-registry/ca"
WHOAMI = "/api/auth/whoami"
PAIRING_ID = re.compile(r"[0-9a-f]{6}")
SENSOR = {"username": "sensor-0003", "password": "s3cret-pass", "roles": ["minimum"]}
READ_TELEMETRY = {"resource": "plant/+/telemetry", "operation": "read", "context": "mqtt"}


# --- A client of the server -------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer: status, headers, the body parsed as JSON (None when it is not JSON), and the raw body."""

    status: int
    headers: http.client.HTTPMessage
    body: Any
    raw: bytes


class Client:
    """One keep-alive HTTPS connection to a running server."""

    def __init__(self, port: int, context: ssl.SSLContext, token: str) -> None:
        self.connection = http.client.HTTPSConnection(HOST, port, context=context, timeout=10)
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        *,
        kind: str | None = JSON,
    ) -> Reply:
        """Send a request and read the answer, checking its Content-Type (``kind``, unless None) and length."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        raw = response.read()
        if kind is not None:
            assert response.headers["Content-Type"] == kind, (method, path, response.status, raw)
        if method != "HEAD":
            assert response.headers["Content-Length"] == str(len(raw)), (method, path)
        parsed = json.loads(raw) if response.headers["Content-Type"] == JSON and raw else None
        return Reply(response.status, response.headers, parsed, raw)

    def admin(self, method: str, path: str, body: object = None, *, token: str | None = None) -> Reply:
        """An administrator's call, with the right token unless another is given."""
        return self.call(method, path, body, {"Authorization": f"Bearer {token or self.token}"})

    def register(self, payload: object) -> Reply:
        return self.call("POST", REGISTER, payload, {"Content-Type": JSON})

    def whoami(self, headers: dict[str, str] | None = None) -> Reply:
        return self.call("GET", WHOAMI, headers=headers)

    @property
    def connected(self) -> socket.socket | None:
        """The socket of the connection, to tell whether it was kept."""
        return self.connection.sock

    def close(self) -> None:
        self.connection.close()


@dataclass
class Running:
    """A server in a thread, its clock, its data folder, and the clients opened on it."""

    server: server.RegistryServer
    thread: threading.Thread
    clock: FakeClock
    data_dir: Path
    token: str
    clients: list[Client] = field(default_factory=list)
    stopped: bool = False

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context that trusts the registry's CA and checks the host name."""
        context = ssl.create_default_context(cafile=self.data_dir / "ca.pem")
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    def client(self, cert: tuple[Path, Path] | None = None) -> Client:
        client = Client(self.port, self.context(cert), self.token)
        self.clients.append(client)
        return client

    def authority(self) -> ca.CA:
        return ca.CA.load_or_create(self.data_dir, self.clock())

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for client in self.clients:
            client.close()
        self.server.shutdown()
        self.server.server_close()
        self.server.app.core.close()
        self.thread.join(5)


Start = Callable[..., Running]


def launch(data_dir: Path, *, clock: FakeClock | None = None, **config: Any) -> Running:
    """Start a server over HTTPS on port 0, in a thread; a fake clock at the present unless one is given."""
    clock = clock or FakeClock(datetime.now(UTC).replace(microsecond=0))
    config.setdefault("admin_token", secrets.token_urlsafe(24))
    instance = server.build(server.Config(port=0, data_dir=data_dir, scrypt_n=16, **config), clock=clock)
    # A short poll interval: shutdown() waits for it.
    thread = threading.Thread(target=instance.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    token = config["admin_token"] or (data_dir / "admin-token").read_text().strip()
    return Running(instance, thread, clock, data_dir, token)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start servers: ``start(data_dir=..., clock=..., **config)``, all stopped at teardown."""
    running: list[Running] = []

    def start_server(data_dir: Path | None = None, **options: Any) -> Running:
        running.append(launch(data_dir or tmp_path / "data", **options))
        return running[-1]

    yield start_server
    for instance in running:
        instance.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One locked, empty registry for the tests of refusals, which must leave it as they found it."""
    instance = launch(tmp_path_factory.mktemp("shared"))
    yield instance
    instance.stop()


@pytest.fixture
def refused(shared: Running) -> Iterator[Client]:
    """A client of the shared registry, checked to be locked and empty before the test."""
    client = shared.client()
    status, requests, users, _ = snapshot(client)
    assert without_crl(status) == {"locked": True, "unlockedUntil": None, "pending": 0} and requests == users == []
    yield client
    client.close()


@pytest.fixture
def live(start: Start, request: pytest.FixtureRequest) -> Running:
    """A registry with the default settings and a fake clock that stands at the present.

    Tests marked ``BOTH_READERS`` run twice: with the fast head reader, and
    with http.server's own (``Config.fast_http=False``).
    """
    return start(fast_http=getattr(request, "param", True))


BOTH_READERS = pytest.mark.parametrize("live", [True, False], indirect=True, ids=["fast reader", "http.server reader"])


@pytest.fixture
def client(live: Running) -> Client:
    return live.client()


def assert_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """The reply is the JSON error of SPEC section 2: an ``error`` code and a ``message`` for a person."""
    assert reply.status == status, reply.raw
    assert isinstance(reply.body, dict), reply.raw
    assert isinstance(reply.body.get("error"), str) and reply.body["error"]
    assert isinstance(reply.body.get("message"), str) and reply.body["message"]
    if code is not None:
        assert reply.body["error"] == code, reply.body
    return reply.body


def assert_pending(reply: Reply, username: str) -> str:
    """A 202 of SPEC section 2, with Retry-After 5; returns the pairing id."""
    assert reply.status == 202, reply.raw
    assert reply.headers["Retry-After"] == "5"
    assert reply.body == {"status": "pending", "username": username, "pairingId": reply.body["pairingId"]}
    assert PAIRING_ID.fullmatch(reply.body["pairingId"])
    return reply.body["pairingId"]


def without_crl(status: dict[str, Any]) -> dict[str, Any]:
    """A status without its "crl", checked to be the first CRL a fresh registry signs: valid seven days from now."""
    crl = status["crl"]
    assert crl["number"] == 1
    days = (datetime.fromisoformat(crl["nextUpdate"]) - datetime.now(UTC)) / timedelta(days=1)
    assert 6.99 < days <= 7
    return {name: value for name, value in status.items() if name != "crl"}


def snapshot(client: Client) -> tuple[object, ...]:
    """Everything the administrator can see, to prove that a refused call changed nothing."""
    answers = [client.admin("GET", path) for path in (STATUS, REQUESTS, USERS, AUDIT)]
    assert [answer.status for answer in answers] == [200] * 4
    return tuple(answer.body for answer in answers)


def unlocked(client: Client) -> Client:
    assert client.admin("POST", UNLOCK).status == 200
    return client


def approve(client: Client, username: str, grant: object = None) -> dict[str, Any]:
    reply = client.admin("POST", f"{REQUESTS}/{username}/approve", grant)
    assert reply.status == 200, reply.raw
    return reply.body


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki_sha256(key: Any) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pem(label: str, der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def tampered_csr(common_name: str) -> str:
    """A CSR that parses but whose signature does not verify: no proof of possession."""
    csr = x509.load_pem_x509_csr(make_csr(common_name).encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is the signature's
    return pem("CERTIFICATE REQUEST", bytes(der))


def self_signed(common_name: str, key: Any) -> bytes:
    """A client certificate that no registry issued."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Agent:
    """A client with a key: its CSR, and where its key lies on disk."""

    username: str
    key: Any
    csr: str
    key_path: Path

    def payload(self, **extra: object) -> dict[str, object]:
        return {"username": self.username, "csr": self.csr, **extra}

    def credentials(self, certificate_pem: str | bytes) -> tuple[Path, Path]:
        """The (certificate, key) files for ``load_cert_chain``."""
        path = self.key_path.with_suffix(".pem")
        path.write_bytes(certificate_pem if isinstance(certificate_pem, bytes) else certificate_pem.encode())
        return path, self.key_path


def make_agent(folder: Path, username: str = "agent-0001") -> Agent:
    key = make_key()
    key_path = folder / f"{username}.key"
    key_path.write_bytes(key_pem(key))
    return Agent(username, key, make_csr(username, key), key_path)


def admitted_agent(live: Running, client: Client, tmp_path: Path, username: str = "agent-0001") -> tuple[Agent, str]:
    """An agent whose CSR request was approved; returns it with its certificate."""
    agent = make_agent(tmp_path, username)
    assert_pending(client.register(agent.payload()), username)
    approve(client, username)
    reply = client.register(agent.payload())
    assert reply.status == 201, reply.raw
    return agent, reply.body["certificate"]


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


# --- SPEC section 2: the client's request, in the order of the checks --------


def test_a_new_request_while_locked_is_423_with_retry_after_30_and_nothing_is_stored(client: Client) -> None:
    """Proves LOCK-3.1, REG-2.4-LOCKED, REG-2.5-RETRY-AFTER."""
    before = snapshot(client)
    assert without_crl(before[0]) == {"locked": True, "unlockedUntil": None, "pending": 0}

    reply = client.register(SENSOR)

    assert_error(reply, 423, "locked")
    assert reply.headers["Retry-After"] == "30"
    assert snapshot(client) == before


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_is_read_as_json_whatever_its_content_type_says(client: Client, content_type: str | None) -> None:
    """Proves REQ-1-CONTENT-TYPE: the same JSON under another Content-Type, or none, is the same request."""
    client.admin("POST", UNLOCK)
    headers = {} if content_type is None else {"Content-Type": content_type}
    first = client.call("POST", REGISTER, SENSOR, headers)
    again = client.call("POST", REGISTER, SENSOR, {"Content-Type": "application/json"})
    assert (first.status, again.status, again.body) == (202, 202, first.body)


def test_after_unlock_a_request_is_pending_and_each_repetition_is_a_poll(live: Running, client: Client) -> None:
    """Proves REG-2.4-STORE, REG-2.4-PENDING, REG-2.4-MATCH, REG-2.5-PENDING-BODY."""
    unlocked(client)

    pairing_id = assert_pending(client.register(SENSOR), "sensor-0003")
    live.clock.advance(seconds=7)
    assert assert_pending(client.register(SENSOR), "sensor-0003") == pairing_id
    assert assert_pending(client.register({**SENSOR, "context": "line 4, cabinet 2"}), "sensor-0003") == pairing_id

    [stored] = client.admin("GET", REQUESTS).body
    assert stored["pairingId"] == pairing_id
    assert stored["pollCount"] == 2
    assert client.admin("GET", STATUS).body["pending"] == 1


def test_a_poll_is_answered_while_locked_but_a_new_request_is_not(client: Client) -> None:
    """Proves REG-2.5-LOCK-SCOPE, REG-2.4-LOCKED."""
    unlocked(client)
    pairing_id = assert_pending(client.register(SENSOR), "sensor-0003")
    assert client.admin("POST", LOCK).body["locked"] is True

    assert assert_pending(client.register(SENSOR), "sensor-0003") == pairing_id
    assert_error(client.register({"username": "sensor-0004", "password": "s3cret-pass"}), 423, "locked")


def test_a_username_with_a_hyphen_registers(client: Client) -> None:
    """Proves REG-2.3-USERNAME."""
    unlocked(client)
    assert_pending(client.register({"username": "sensor-0003", "password": "s3cret-pass"}), "sensor-0003")


def test_a_deep_nesting_of_100000_brackets_is_400_not_500(start: Start) -> None:
    """Proves REG-2.2-MALFORMED."""
    client = start(max_body=1 << 20).client()
    unlocked(client)
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        assert_error(client.register(body), 400, "malformed_request")
    assert client.admin("GET", STATUS).body["pending"] == 0


MALFORMED = {
    "not JSON": b"username=sensor-0003&password=s3cret-pass",
    "truncated JSON": b'{"username": "sensor-0003", "password": ',
    "empty body": b"",
    "a list": b'[{"username": "sensor-0003", "password": "s3cret-pass"}]',
    "a string": b'"sensor-0003"',
    "null": b"null",
    "deep nesting": b"[" * 60_000,
    "deep nesting in a field": b'{"username": "sensor-0003", "password": "s3cret-pass", "roles": '
    + b"[" * 30_000
    + b"]" * 30_000
    + b"}",
    "Latin-1": '{"username": "capteur-é", "password": "s3cret-pass"}'.encode("latin-1"),
    "bytes that are no text": b'{"username": "\xff\xfe\xfd", "password": "s3cret-pass"}',
    "UTF-16": json.dumps(SENSOR).encode("utf-16"),
    "UTF-32": json.dumps(SENSOR).encode("utf-32"),
    "an unknown field": {**SENSOR, "admin": True},
    "both credentials": {**SENSOR, "csr": make_csr("sensor-0003")},
    "neither credential": {"username": "sensor-0003", "roles": ["minimum"]},
    "no username": {"password": "s3cret-pass"},
    "a username of the wrong type": {"username": 3, "password": "s3cret-pass"},
    "roles not a list": {**SENSOR, "roles": "minimum"},
    "an http resource without a slash": {
        **SENSOR,
        "permissions": [{"resource": "api/x", "operation": "read", "context": "http"}],
    },
    "an unknown operation": {**SENSOR, "permissions": [{**READ_TELEMETRY, "operation": "delete"}]},
    "a permission with an extra field": {**SENSOR, "permissions": [{**READ_TELEMETRY, "qos": 1}]},
    "a context over 1024 characters": {**SENSOR, "context": "x" * 1025},
    "a CSR that is not PEM": {"username": "agent-0001", "csr": "not a certificate signing request"},
    "a CSR whose signature does not verify": {"username": "agent-0001", "csr": tampered_csr("agent-0001")},
    "a CSR without a Common Name": {"username": "agent-0001", "csr": make_csr(None)},
    "a CSR for another Common Name": {"username": "agent-0001", "csr": make_csr("agent-0002")},
    "a short username with an unknown field": {"username": "ab", "password": "1", "admin": True},
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_400_before_policy_and_the_lock(refused: Client, body: object) -> None:
    """Proves REG-2-ORDER, REQ-1-SHAPE, REQ-1-PERMISSION, REQ-1-CONTEXT, REQ-1-UTF8, REG-2.2-MALFORMED, REG-2.2-CSR,
    REG-2.2-CN."""
    client = refused
    before = snapshot(client)

    assert_error(client.register(body), 400, "malformed_request")

    assert snapshot(client) == before
    # The connection survives a bad body.
    assert client.admin("GET", STATUS).status == 200


POLICY = {
    "a username of 2 characters": {"username": "ab", "password": "s3cret-pass"},
    "a username of 65 characters": {"username": "a" * 65, "password": "s3cret-pass"},
    "a username starting with a hyphen": {"username": "-sensor", "password": "s3cret-pass"},
    "a username with a space": {"username": "sensor 3", "password": "s3cret-pass"},
    "a username with a slash": {"username": "plant/sensor", "password": "s3cret-pass"},
    "a password of 4 characters": {"username": "sensor-0003", "password": "1234"},
    "a password of 1025 characters": {"username": "sensor-0003", "password": "p" * 1025},
    "a role outside the catalog": {**SENSOR, "roles": ["minimum", "administrator"]},
    "a P-521 key": {"username": "agent-0001", "csr": make_csr("agent-0001", make_key("p521"))},
    "an RSA key of 1024 bits": {"username": "agent-0001", "csr": make_csr("agent-0001", make_key("rsa1024"))},
}


@pytest.mark.parametrize("body", POLICY.values(), ids=POLICY.keys())
def test_a_request_against_policy_is_422_before_the_lock(refused: Client, body: object) -> None:
    """Proves REG-2-ORDER, REG-2.3-USERNAME, REG-2.3-PASSWORD, REG-2.3-ROLE, REG-2.3-KEY."""
    client = refused
    before = snapshot(client)

    assert_error(client.register(body), 422, "policy_violation")

    assert snapshot(client) == before


@pytest.mark.parametrize(
    "body",
    [
        {"username": "abc", "password": "12345"},
        {"username": "a" * 64, "password": "p" * 1024},
        {"username": "Agent_7.b-c", "password": "s3cret-pass", "permissions": [READ_TELEMETRY]},
    ],
    ids=["shortest", "longest", "every character class"],
)
def test_a_request_at_the_edges_of_policy_is_accepted(client: Client, body: dict[str, object]) -> None:
    """Proves REG-2.3-USERNAME, REG-2.3-PASSWORD."""
    assert_error(client.register(body), 423, "locked")
    unlocked(client)
    assert_pending(client.register(body), body["username"])


def test_a_different_request_for_a_pending_username_is_409_duplicate_request(client: Client) -> None:
    """Proves REG-2.4-PENDING, REG-2.4-MATCH."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    before = snapshot(client)

    for other in (
        {**SENSOR, "password": "other-pass"},
        {**SENSOR, "roles": []},
        {**SENSOR, "permissions": [READ_TELEMETRY]},
        {"username": "sensor-0003", "csr": make_csr("sensor-0003")},
    ):
        assert_error(client.register(other), 409, "duplicate_request")
    assert snapshot(client) == before


def test_an_approved_password_request_is_201_again_and_its_username_is_taken(client: Client) -> None:
    """Proves REG-2.4-USER, REG-2.5-APPROVED-BODY."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    approve(client, "sensor-0003")
    client.admin("POST", LOCK)

    expected = {"status": "approved", "username": "sensor-0003", "roles": ["minimum"], "permissions": []}
    for _ in range(2):
        reply = client.register(SENSOR)
        assert reply.status == 201, reply.raw
        assert reply.body == expected
        assert "Retry-After" not in reply.headers

    assert_error(client.register({**SENSOR, "password": "other-pass"}), 409, "username_taken")
    assert_error(client.register({**SENSOR, "roles": []}), 409, "username_taken")


def test_an_approved_csr_request_is_201_with_a_certificate_from_the_registry_ca(
    live: Running, client: Client, tmp_path: Path
) -> None:
    """Proves REG-2.4-USER, REG-2.4-REDELIVER, REG-2.5-APPROVED-BODY, REG-2.5-PENDING-BODY, CERT-5.4-CA."""
    unlocked(client)
    agent = make_agent(tmp_path)
    pairing_id = assert_pending(client.register(agent.payload()), "agent-0001")
    # README: the pairing id of a CSR request is the start of the SHA-256 of its public key.
    assert pairing_id == spki_sha256(agent.key)[:6]
    approve(client, "agent-0001")

    first = client.register(agent.payload())
    again = client.register(agent.payload())

    assert first.status == again.status == 201
    assert first.body == again.body
    assert set(first.body) == {
        "status", "username", "roles", "permissions", "certificate", "caCertificate", "notAfter", "renewAfter"
    }  # fmt: skip
    assert first.body["status"] == "approved" and first.body["username"] == "agent-0001"
    assert first.body["caCertificate"] == (live.data_dir / "ca.pem").read_text()
    assert_issued_from(agent.csr, first.body["certificate"], live.authority())
    # README: a new CSR for the same key matches, and fetches the certificate issued at approval.
    renewed = make_csr("agent-0001", agent.key, extensions=[x509.SubjectAlternativeName([x509.DNSName("agent")])])
    assert client.register({"username": "agent-0001", "csr": renewed}).body == first.body
    (tmp_path / "other").mkdir()
    assert_error(client.register(make_agent(tmp_path / "other").payload()), 409, "username_taken")


def test_a_denied_request_is_403_with_the_reason_and_a_different_one_is_409(client: Client) -> None:
    """Proves REG-2.4-DENIED."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    denied = client.admin("POST", f"{REQUESTS}/sensor-0003/deny", {"reason": "unknown device"})
    assert denied.status == 200
    assert denied.body["state"] == "denied" and denied.body["reason"] == "unknown device"

    for _ in range(2):
        body = assert_error(client.register(SENSOR), 403, "denied")
        assert body["reason"] == "unknown device"
    assert_error(client.register({**SENSOR, "password": "other-pass"}), 409, "duplicate_request")


def test_a_denial_without_a_body_gives_an_empty_reason(client: Client) -> None:
    """Proves REG-2.4-DENIED."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    assert client.admin("POST", f"{REQUESTS}/sensor-0003/deny").status == 200

    assert assert_error(client.register(SENSOR), 403, "denied")["reason"] == ""


def test_a_pending_request_is_forgotten_after_the_retention_period(live: Running, client: Client) -> None:
    """Proves REG-2.5-RETENTION."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")

    live.clock.advance(hours=24, seconds=1)

    assert client.admin("GET", REQUESTS).body == []
    assert without_crl(client.admin("GET", STATUS).body) == {"locked": True, "unlockedUntil": None, "pending": 0}
    # Forgotten: the same request is new again, and the registry is locked by now.
    assert_error(client.register(SENSOR), 423, "locked")


def test_identical_requests_at_once_store_one_request(live: Running, client: Client) -> None:
    """Proves REG-2.4-PENDING."""
    unlocked(client)
    clients = [live.client() for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    replies: list[Reply] = []

    def ask(each: Client) -> None:
        barrier.wait()
        replies.append(each.register(SENSOR))

    threads = [threading.Thread(target=ask, args=(each,)) for each in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len({assert_pending(reply, "sensor-0003") for reply in replies}) == 1
    [stored] = client.admin("GET", REQUESTS).body
    assert stored["pollCount"] == len(clients) - 1


# --- SPEC section 2.1: the size limit, and the HTTP framing around the API ---


def test_a_body_over_max_body_is_413_unparsed_and_the_connection_goes_on(start: Start) -> None:
    """Proves REG-2.1-SIZE, HTTP-8.3-CONNECTION."""
    client = start(max_body=1024).client()
    before = snapshot(client)
    first_socket = client.connected

    for body in (b"{" * 1025, json.dumps(SENSOR).encode() + b" " * 1024):
        assert_error(client.register(body), 413, "payload_too_large")

    assert snapshot(client) == before  # locked, yet 413: the body was not looked at
    assert client.connected is first_socket  # the body was read and dropped, keeping the connection
    unlocked(client)
    assert_error(client.register(json.dumps(SENSOR).encode() + b" " * 1024), 413, "payload_too_large")
    assert client.admin("GET", STATUS).body["pending"] == 0
    padded = json.dumps(SENSOR).encode()
    assert_pending(client.register(padded + b" " * (1024 - len(padded))), "sensor-0003")  # exactly the limit


@BOTH_READERS
def test_a_huge_announced_body_is_413_and_the_connection_is_closed_cleanly(live: Running) -> None:
    """Proves REG-2.1-SIZE, HTTP-8.3-CONNECTION."""
    connection = http.client.HTTPSConnection(HOST, live.port, context=live.context(), timeout=5)
    connection.putrequest("POST", REGISTER)
    connection.putheader("Content-Type", JSON)
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()

    response = connection.getresponse()
    body = json.loads(response.read())

    assert response.status == 413 and body["error"] == "payload_too_large" and body["message"]
    assert response.headers["Connection"] == "close"
    assert connection.sock is None  # http.client closed it, as the answer said
    connection.close()


def raw_exchange(live: Running, data: bytes, timeout: float = 5) -> tuple[bytes, bytes]:
    """Send bytes on a fresh TLS connection and read until the server closes it: (head, body)."""
    with (
        socket.create_connection((HOST, live.port), timeout=timeout) as raw,
        live.context().wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(data)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@BOTH_READERS
def test_a_chunked_body_is_411_with_a_json_error(live: Running) -> None:
    """Proves HTTP-8.1-STATUSES."""
    body = json.dumps(SENSOR).encode()
    head, answer = raw_exchange(
        live,
        b"POST /api/client-registry/register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
    )

    assert head.startswith(b"HTTP/1.1 411 ")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(answer)}\r\n".encode() in head
    error = json.loads(answer)
    assert error["error"] and error["message"]


CHUNKED_64K = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(64)) + b"0\r\n\r\n"


@BOTH_READERS
@pytest.mark.parametrize(
    ("head", "body", "status"),
    [
        ("Transfer-Encoding: chunked", CHUNKED_64K, 411),
        (f"Content-Length: {2 << 20}", b"{" * (256 << 10), 413),
    ],
    ids=["64 KiB chunked", "the first 256 KiB of 2 MiB"],
)
def test_a_client_still_sending_its_body_receives_the_refusal(
    live: Running, head: str, body: bytes, status: int
) -> None:
    """Proves HTTP-8.3-CONNECTION."""
    # RFC 9112 section 9.6: a server closes in stages (its side first, then
    # reading on for a while), since closing outright while the client's
    # body is still arriving makes TCP reset the connection, which destroys
    # the answer before the client reads it. The loss is a race, so the
    # request is sent ten times: each must be answered.
    request = f"POST {REGISTER} HTTP/1.1\r\nHost: localhost\r\n{head}\r\n\r\n".encode() + body
    outcomes = []
    for _ in range(10):
        with (
            socket.create_connection((HOST, live.port), timeout=5) as raw,
            live.context().wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            try:
                tls.sendall(request)
                answer = b""
                while b"\r\n" not in answer and (chunk := tls.recv(4096)):
                    answer += chunk
                outcomes.append(answer.split(b"\r\n")[0].decode() or "closed without an answer")
            except OSError as lost:
                outcomes.append(repr(lost))

    assert all(outcome.startswith(f"HTTP/1.1 {status} ") for outcome in outcomes), outcomes


@BOTH_READERS
@pytest.mark.parametrize(
    "length",
    ["twelve", "-1", "+2", "0x10", "1 2", "\N{SUPERSCRIPT TWO}"],
    ids=["a word", "negative", "signed", "hexadecimal", "two numbers", "superscript two"],
)
def test_a_content_length_that_is_no_number_is_400(live: Running, length: str) -> None:
    """Proves HTTP-8.2-HEADERS."""
    # The superscript two is a digit to str.isdigit, and no number to int().
    request = f"POST {REGISTER} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n{{}}"
    head, body = raw_exchange(live, request.encode("latin-1"), timeout=2)

    assert head.startswith(b"HTTP/1.1 400 "), head
    error = json.loads(body)
    assert error["error"] and error["message"]


@BOTH_READERS
def test_a_request_line_that_is_no_http_is_400_in_json(live: Running) -> None:
    """Proves HTTP-8.2-HEADERS."""
    head, body = raw_exchange(live, b"HELLO\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["message"]


HEAD_LINE_CASES = {
    "a space before the colon": b"Content-Length : 2\r\n",
    "a folded line": b"X-Note: one\r\n two\r\n",
    "a line without a colon": b"NoColonHere\r\n",
    "a name with a space": b"Content Length: 2\r\n",
    "two lengths that differ": b"Content-Length: 2\r\nContent-Length: 7\r\n",
    "a bare CR in a value": b"X-Note: one\rtwo\r\n",
    "a NUL in a value": b"X-Note: one\x00two\r\n",
}


@BOTH_READERS
@pytest.mark.parametrize("lines", HEAD_LINE_CASES.values(), ids=HEAD_LINE_CASES.keys())
def test_a_header_line_rfc_9112_refuses_is_400_and_stores_nothing(live: Running, lines: bytes) -> None:
    """Proves HTTP-8.2-HEADERS."""
    request = b"POST " + REGISTER.encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + lines + b"\r\n{}"
    head, body = raw_exchange(live, request)

    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["message"]
    assert live.client().admin("GET", "/api/client-registry/requests").body == []


@BOTH_READERS
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
def test_a_request_in_http_2_or_later_is_505(live: Running, version: bytes) -> None:
    """Proves HTTP-8.1-STATUSES."""
    head, body = raw_exchange(live, b"GET /api/client-registry/ca " + version + b"\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 505 "), head
    assert json.loads(body)["error"] == "http_version_not_supported"


@BOTH_READERS
def test_header_names_are_read_whatever_their_case(live: Running) -> None:
    client = live.client()
    request = (
        f"GET /api/client-registry HTTP/1.1\r\nhost: localhost\r\nAUTHORIZATION: Bearer {client.token}\r\n"
        "connection: CLOSE\r\n\r\n"
    )
    head, body = raw_exchange(live, request.encode())

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["locked"] is True


@BOTH_READERS
def test_an_empty_line_before_a_request_is_ignored(live: Running) -> None:
    """Proves HTTP-8.2-HEADERS."""
    # RFC 9112 section 2.2: some clients send a CRLF after a POST body.
    head, body = raw_exchange(
        live, b"\r\nGET /api/client-registry/ca HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert body.startswith(b"-----BEGIN CERTIFICATE-----")


@BOTH_READERS
def test_an_http_1_0_request_is_answered_and_its_connection_closed(live: Running) -> None:
    """Proves HTTP-8.1-STATUSES."""
    # raw_exchange reads until the server closes: it returns only if the server does.
    head, body = raw_exchange(live, b"GET /api/client-registry/ca HTTP/1.0\r\n\r\n")

    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Connection: close" in head.split(b"\r\n")
    assert body.startswith(b"-----BEGIN CERTIFICATE-----")


@BOTH_READERS
def test_expect_100_continue_gets_a_100_before_the_answer(live: Running) -> None:
    """Proves HTTP-8.2-HEADERS."""
    body = json.dumps(SENSOR).encode()
    request = (
        f"POST {REGISTER} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection((HOST, live.port), timeout=5) as raw,
        live.context().wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(request)
        assert tls.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n")
        tls.sendall(body)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 423 "), answer


@BOTH_READERS
def test_an_unknown_path_is_404(client: Client) -> None:
    """Proves HTTP-8.1-STATUSES."""
    for path in ("/api/nothing", "/api/client-registry/register/more", "/api/client-registry/"):
        assert_error(client.call("GET", path), 404, "not_found")


@BOTH_READERS
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", REGISTER, "POST"),
        ("PUT", REGISTER, "POST"),
        ("DELETE", CA_PATH, "GET"),
        ("POST", USERS, "GET"),
        ("PATCH", UNLOCK, "POST"),
        ("GET", f"{REQUESTS}/sensor-0003", "DELETE"),
        ("OPTIONS", WHOAMI, "GET"),
    ],
)
def test_a_known_path_with_another_method_is_405_with_allow(
    client: Client, method: str, path: str, allowed: str
) -> None:
    """Proves HTTP-8.1-STATUSES."""
    assert client.call("GET", CA_PATH, kind=PEM).status == 200
    first_socket = client.connected

    reply = client.call(method, path, SENSOR)

    assert_error(reply, 405, "method_not_allowed")
    assert allowed in [name.strip() for name in reply.headers["Allow"].split(",")]
    # The body of the refused request was read: the next request on the connection is understood.
    assert client.call("GET", CA_PATH, kind=PEM).status == 200
    assert client.connected is first_socket


@BOTH_READERS
def test_put_does_not_register(client: Client) -> None:
    """Proves HTTP-8.1-STATUSES."""
    unlocked(client)
    assert_error(client.call("PUT", REGISTER, SENSOR), 405, "method_not_allowed")
    assert client.admin("GET", REQUESTS).body == []


@BOTH_READERS
def test_head_answers_like_get_without_a_body(live: Running, client: Client) -> None:
    """Proves HTTP-8.1-STATUSES."""
    # RFC 9110 section 9.1: a general-purpose server supports GET and HEAD;
    # section 9.3.2: HEAD is GET without the content.
    pem_bytes = (live.data_dir / "ca.pem").read_bytes()

    reply = client.call("HEAD", CA_PATH, kind=PEM)

    assert reply.status == 200
    assert reply.raw == b""
    assert reply.headers["Content-Length"] == str(len(pem_bytes))
    assert client.call("GET", CA_PATH, kind=PEM).raw == pem_bytes


@BOTH_READERS
def test_head_of_an_administrator_call_without_the_token_is_401_without_a_body(client: Client) -> None:
    """Proves HTTP-8.1-STATUSES, ADMIN-4.1-TOKEN."""
    reply = client.call("HEAD", STATUS)

    # HEAD is GET without the body (RFC 9110 section 9.3.2): the GET route is
    # found, and its token is checked before anything else is answered.
    assert reply.status == 401 and reply.raw == b""
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="client-registry"'
    assert client.admin("GET", STATUS).status == 200  # and the connection goes on


@BOTH_READERS
def test_an_unknown_method_is_501_in_json(client: Client) -> None:
    """Proves HTTP-8.1-STATUSES."""
    # RFC 9110 section 15.6.2: a method the server does not recognise, on any path.
    assert_error(client.call("BREW", STATUS), 501, "not_implemented")
    assert_error(client.call("BREW", "/api/nothing"), 501, "not_implemented")
    assert client.call("GET", CA_PATH, kind=PEM).status == 200  # and the connection goes on


@BOTH_READERS
def test_several_requests_share_one_connection(client: Client) -> None:
    assert client.call("GET", CA_PATH, kind=PEM).status == 200
    first_socket = client.connected
    assert first_socket is not None

    statuses = [
        client.admin("GET", STATUS).status,
        client.register(SENSOR).status,
        client.register(b"not json").status,
        client.call("GET", "/api/nothing").status,
        client.call("DELETE", USERS).status,
        client.whoami().status,
        client.admin("GET", STATUS, token="wrong").status,
        client.admin("POST", UNLOCK).status,
        client.register(SENSOR).status,
    ]

    assert statuses == [200, 423, 400, 404, 405, 401, 401, 200, 202]
    assert client.connected is first_socket


@BOTH_READERS
def test_answers_leave_at_once_without_waiting_for_an_ack(live: Running) -> None:
    # With Nagle's algorithm, an answer written in pieces on a kept-alive
    # connection waits for the client's delayed ACK (RFC 896): the handler's
    # sockets must have TCP_NODELAY.
    seen = []
    original = live.server.RequestHandlerClass.setup

    def setup(handler: server.Handler) -> None:
        original(handler)
        seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    live.server.RequestHandlerClass = type("Spy", (server.Handler,), {"setup": setup})
    live.client().call("GET", CA_PATH, kind=PEM)
    assert seen and all(seen)


@BOTH_READERS
def test_the_access_log_is_written_while_the_server_runs(
    client: Client, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """Proves HTTP-8.5-ACCESS-LOG."""
    caplog.set_level(logging.INFO, logger="registry.access")
    client.call("GET", "/api/client-registry/ca", kind=None)
    written, deadline = "", time.monotonic() + 10
    while "/api/client-registry/ca" not in written and time.monotonic() < deadline:
        time.sleep(0.05)
        written += capfd.readouterr().err

    line = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO GET /api/client-registry/ca 200 \d+\.\dms 127\.0\.0\.1"
    assert re.search(f"^{line}$", written, re.MULTILINE), written


@BOTH_READERS
def test_the_ca_certificate_is_public_pem(live: Running, client: Client) -> None:
    """Proves CERT-5.1-CA-PUBLIC."""
    reply = client.call("GET", CA_PATH, kind=PEM)

    assert reply.status == 200
    assert reply.raw == (live.data_dir / "ca.pem").read_bytes()
    assert x509.load_pem_x509_certificate(reply.raw).subject == live.authority().certificate.subject


def exchange(live: Running, data: bytes) -> list[int]:
    """Send bytes on a fresh TLS connection, read until the server closes it: the statuses of the answers."""
    head, body = raw_exchange(live, data)
    return [int(status) for status in re.findall(rb"^HTTP/1\.1 (\d{3}) ", head + b"\r\n\r\n" + body, re.MULTILINE)]


CA_REQUEST = b"GET /api/client-registry/ca HTTP/1.1\r\nHost: localhost\r\n\r\n"


@BOTH_READERS
@pytest.mark.parametrize(
    ("coding", "length", "status"),
    [
        ("gzip", True, 400),
        ("identity", True, 400),
        ("gzip", False, 400),
        ("chunked, gzip", True, 400),
        ("", True, 400),
        ("gzip, chunked", True, 411),
        ("chunked", True, 411),
    ],
)
def test_a_transfer_encoding_is_refused_and_the_connection_closed(
    live: Running, coding: str, length: bool, status: int
) -> None:
    """Proves HTTP-8.1-STATUSES."""
    # RFC 9112 section 6.3: a request whose Transfer-Encoding does not end in
    # chunked has no length the server can know: 400, then close. Framed by
    # its Content-Length instead, its body could carry a request that a proxy
    # in front took for data (request smuggling). A chunked one this server
    # does not read: 411. Either way the pipelined request after it is not
    # answered (section 6.1: close after a Transfer-Encoding with a length).
    framing = f"Transfer-Encoding: {coding}\r\n" + (f"Content-Length: {len(CA_REQUEST)}\r\n" if length else "")
    request = f"POST {REGISTER} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n".encode()

    assert exchange(live, request + CA_REQUEST + CA_REQUEST) == [status]


HOST_CASES = {
    "no Host in HTTP/1.1": (b"HTTP/1.1", b"", 400),
    "two Host lines": (b"HTTP/1.1", b"Host: localhost\r\nHost: localhost\r\n", 400),
    "a Host that is no host": (b"HTTP/1.1", b"Host: a b/c@d\r\n", 400),
    "a Host with a path": (b"HTTP/1.1", b"Host: localhost/api\r\n", 400),
    "a Host with user information": (b"HTTP/1.1", b"Host: admin@localhost\r\n", 400),
    "no Host in HTTP/1.0": (b"HTTP/1.0", b"", 200),
    "a name and a port": (b"HTTP/1.1", b"Host: localhost:8443\r\n", 200),
    "an IPv4 address": (b"HTTP/1.1", b"Host: 127.0.0.1\r\n", 200),
    "an IPv6 literal and a port": (b"HTTP/1.1", b"Host: [::1]:8443\r\n", 200),
    "an empty Host": (b"HTTP/1.1", b"Host:\r\n", 200),
}


@BOTH_READERS
@pytest.mark.parametrize(("version", "lines", "status"), HOST_CASES.values(), ids=HOST_CASES.keys())
def test_a_request_names_one_valid_host(live: Running, version: bytes, lines: bytes, status: int) -> None:
    """Proves HTTP-8.2-HEADERS."""
    # RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request
    # without Host, and to any request with more than one Host line or a Host
    # that is not uri-host [":" port] (RFC 9110 section 7.2), which may be empty.
    request = b"GET /api/client-registry/ca " + version + b"\r\n" + lines + b"Connection: close\r\n\r\n"

    assert exchange(live, request) == [status]


@BOTH_READERS
@pytest.mark.parametrize("after", ["\xa0", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f"], ids=ascii)
def test_only_spaces_and_tabs_are_white_space_around_a_token(live: Running, after: str) -> None:
    """Proves HTTP-8.2-HEADERS, ADMIN-4.1-TOKEN."""

    # RFC 9110 section 5.6.3: optional white space is SP and HTAB, and
    # nothing else. A control character is off the field-value grammar
    # (section 5.5: 400); a no-break space or a NEL is obs-text, part of the
    # value, and then the token is not the token (401).
    def status_with(value: str) -> list[int]:
        request = f"GET {STATUS} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {value}\r\nConnection: close\r\n\r\n"
        return exchange(live, request.encode("latin-1"))

    assert status_with(f"Bearer {live.token}{after}") == [401 if after in "\xa0\x85" else 400]
    assert status_with(f"Bearer {live.token} \t") == status_with(f"Bearer  {live.token}") == [200]


@BOTH_READERS
def test_basic_credentials_take_no_other_white_space_either(live: Running, client: Client) -> None:
    """Proves AUTH-5.2-WHOAMI."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    approve(client, "sensor-0003")
    encoded = basic(SENSOR["username"], SENSOR["password"])["Authorization"]

    assert client.whoami({"Authorization": encoded}).status == 200
    assert_error(client.whoami({"Authorization": encoded + "\xa0"}), 401, "unauthorized")


@BOTH_READERS
@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PATCH", "PUT", "OPTIONS"])
def test_a_method_the_server_knows_is_405_with_allow_on_a_known_path(client: Client, method: str) -> None:
    """Proves HTTP-8.1-STATUSES."""
    # RFC 9110 section 15.5.6: a method the server knows that the target does
    # not take is 405, with Allow; section 15.6.2: one it does not recognise is 501.
    reply = client.call(method, STATUS)

    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["Allow"] == "GET, HEAD"


@BOTH_READERS
def test_every_answer_is_in_the_access_log(
    live: Running, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """Proves HTTP-8.5-ACCESS-LOG."""
    caplog.set_level(logging.INFO, logger="registry.access")
    assert_error(live.client().call("BREW", STATUS), 501, "not_implemented")
    assert exchange(live, f"POST {REGISTER} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\r\n b\r\n\r\n".encode()) == [400]
    assert exchange(live, b"HELLO\r\n\r\n") == [400]
    assert exchange(live, b"GET / HTTP/2.0\r\n\r\n") == [505]
    lines = [
        f"BREW {STATUS} 501 ",
        f"POST {REGISTER} 400 ",
        "- - 400 ",
        "- - 505 ",
    ]
    written, deadline = "", time.monotonic() + 10
    while not all(line in written for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
        written += capfd.readouterr().err

    assert [line for line in lines if line not in written] == [], written


def test_tls_1_2_offers_aead_suites_only_and_tls_1_3_stays(live: Running) -> None:
    # Mozilla's "intermediate" configuration: ECDHE with AES-GCM or
    # ChaCha20-Poly1305. CBC suites (MAC-then-encrypt) are the ones of the
    # padding-oracle attacks (Lucky Thirteen).
    def handshake(ciphers: str | None = None) -> tuple[str, str]:
        context = live.context()
        if ciphers is not None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers)
        with (
            socket.create_connection((HOST, live.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            return tls.version(), tls.cipher()[0]

    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
        with pytest.raises(ssl.SSLError):
            handshake(cbc)
    for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert handshake(aead) == ("TLSv1.2", aead)
    assert handshake()[0] == "TLSv1.3"


@BOTH_READERS
def test_no_route_of_the_table_answers_500(client: Client) -> None:
    """Proves HTTP-8.1-STATUSES."""
    for route in server.ROUTES:
        path = route.pattern.replace("{username}", "nobody").replace("{name}", "nothing.js")
        reply = client.call(route.method, path, headers={"Authorization": f"Bearer {client.token}"}, kind=None)
        assert reply.status < 500, (route.method, path, reply.raw)


# --- SPEC section 4: the administrator --------------------------------------

ADMIN_CALLS = [
    ("GET", STATUS, None),
    ("POST", UNLOCK, None),
    ("POST", UNLOCK, {"duration": 600_000}),
    ("POST", LOCK, None),
    ("GET", REQUESTS, None),
    ("POST", f"{REQUESTS}/sensor-0003/approve", None),
    ("POST", f"{REQUESTS}/sensor-0003/approve", {"roles": [], "permissions": []}),
    ("POST", f"{REQUESTS}/sensor-0003/deny", {"reason": "no"}),
    ("DELETE", f"{REQUESTS}/sensor-0003", None),
    ("GET", "/api/client-registry/roles", None),
    ("GET", AUDIT, None),
    ("GET", USERS, None),
    ("DELETE", f"{USERS}/agent-0001", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_an_administrator_call_without_the_right_token_is_401_and_changes_nothing(
    live: Running, client: Client, tmp_path: Path, method: str, path: str, body: object
) -> None:
    """Proves ADMIN-4.1-TOKEN."""
    unlocked(client)
    admitted_agent(live, client, tmp_path)
    assert_pending(client.register(SENSOR), "sensor-0003")
    client.admin("POST", UNLOCK, {"duration": 60_000})
    live.clock.advance(seconds=10)  # so that an unlock would move the window
    before = snapshot(client)
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {client.token}x"},
        {"Authorization": f"Bearer {client.token[:-1]}"},
        {"Authorization": f"Basic {client.token}"},
        {"Authorization": client.token},
        {"X-Admin-Token": client.token},
    ]

    for headers in wrong:
        reply = client.call(method, path, body, headers)
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")

    assert snapshot(client) == before


def test_status_unlock_and_lock(live: Running, client: Client) -> None:
    """Proves ADMIN-4.2-CALLS, LOCK-3.2, LOCK-3.3."""
    now = live.clock()
    assert without_crl(client.admin("GET", STATUS).body) == {"locked": True, "unlockedUntil": None, "pending": 0}

    opened = client.admin("POST", UNLOCK).body
    assert opened["locked"] is False and opened["pending"] == 0
    assert datetime.fromisoformat(opened["unlockedUntil"]) == now + timedelta(minutes=5)

    live.clock.advance(minutes=2)
    short = client.admin("POST", UNLOCK, {"duration": 60_000}).body
    assert datetime.fromisoformat(short["unlockedUntil"]) == now + timedelta(minutes=3)  # a new window from now

    assert without_crl(client.admin("POST", LOCK).body) == {"locked": True, "unlockedUntil": None, "pending": 0}
    assert client.admin("GET", STATUS).body["locked"] is True
    assert_error(client.register(SENSOR), 423, "locked")


def test_the_unlock_window_closes_by_itself(live: Running, client: Client) -> None:
    """Proves LOCK-3.2, LOCK-3.4."""
    client.admin("POST", UNLOCK, {"duration": 60_000})
    live.clock.advance(seconds=59)
    assert client.admin("GET", STATUS).body["locked"] is False

    live.clock.advance(seconds=1)

    assert without_crl(client.admin("GET", STATUS).body) == {"locked": True, "unlockedUntil": None, "pending": 0}
    assert_error(client.register(SENSOR), 423, "locked")


@pytest.mark.parametrize(
    "body",
    [
        {"duration": 0},
        {"duration": -1000},
        {"duration": "60000"},
        {"duration": 1.5},
        {"duration": None},
        {"duration": True},
        {"duration": 24 * 3600 * 1000 + 1},
        {"duration": 60_000, "extra": 1},
        {"minutes": 5},
        [60_000],
        b"60000x",
        b"{",
    ],
)
def test_an_unlock_with_a_bad_duration_is_400_and_leaves_the_lock(refused: Client, body: object) -> None:
    """Proves LOCK-3.2."""
    client = refused
    before = snapshot(client)

    assert_error(client.admin("POST", UNLOCK, body), 400)

    assert snapshot(client) == before


def test_requests_lists_every_field(live: Running, client: Client, tmp_path: Path) -> None:
    """Proves ADMIN-4.2-CALLS."""
    unlocked(client)
    created = live.clock()
    assert_pending(client.register({**SENSOR, "permissions": [READ_TELEMETRY], "context": "cabinet 2"}), "sensor-0003")
    live.clock.advance(seconds=30)
    assert_pending(client.register({**SENSOR, "permissions": [READ_TELEMETRY]}), "sensor-0003")
    agent = make_agent(tmp_path)
    agent_pairing = assert_pending(client.register(agent.payload()), "agent-0001")

    sensor, agent_request = client.admin("GET", REQUESTS).body

    assert {
        "username",
        "state",
        "pairingId",
        "method",
        "roles",
        "permissions",
        "context",
        "createdAt",
        "lastPollAt",
        "pollCount",
        "clientAddress",
    } <= set(sensor)
    assert sensor["username"] == "sensor-0003" and sensor["state"] == "pending"
    assert sensor["method"] == "password" and PAIRING_ID.fullmatch(sensor["pairingId"])
    assert sensor["roles"] == ["minimum"] and sensor["permissions"] == [READ_TELEMETRY]
    assert sensor["context"] == "cabinet 2"
    assert datetime.fromisoformat(sensor["createdAt"]) == created
    assert datetime.fromisoformat(sensor["lastPollAt"]) == created + timedelta(seconds=30)
    assert sensor["pollCount"] == 1
    assert sensor["clientAddress"] == HOST
    assert agent_request["username"] == "agent-0001" and agent_request["method"] == "csr"
    assert agent_request["pairingId"] == agent_pairing
    assert agent_request["roles"] == [] and agent_request["context"] is None
    assert client.admin("GET", STATUS).body["pending"] == 2


def test_approve_may_grant_narrower_rights(client: Client) -> None:
    """Proves ADMIN-4.4-APPROVE-BODY."""
    unlocked(client)
    asked = {**SENSOR, "permissions": [READ_TELEMETRY, {**READ_TELEMETRY, "operation": "readWrite"}]}
    assert_pending(client.register(asked), "sensor-0003")
    client.admin("POST", LOCK)  # decisions work while locked

    user = approve(client, "sensor-0003", {"roles": [], "permissions": [READ_TELEMETRY]})

    assert user["username"] == "sensor-0003" and user["method"] == "password"
    assert user["roles"] == [] and user["permissions"] == [READ_TELEMETRY]
    granted = client.register(asked)
    assert granted.status == 201
    assert granted.body == {
        "status": "approved",
        "username": "sensor-0003",
        "roles": [],
        "permissions": [READ_TELEMETRY],
    }
    whoami = client.whoami(basic("sensor-0003", "s3cret-pass"))
    assert whoami.body["roles"] == [] and whoami.body["permissions"] == [READ_TELEMETRY]


@pytest.mark.parametrize(
    ("grant", "status"),
    [
        ({"roles": ["administrator"]}, 422),
        ({"roles": "minimum"}, 400),
        ({"roles": [], "expires": 5}, 400),
        ({"permissions": [{"resource": "x", "operation": "read", "context": "http"}]}, 400),
        ([], 400),
        (b"{", 400),
    ],
)
def test_approve_with_a_bad_grant_is_refused_and_the_request_stays_pending(
    client: Client, grant: object, status: int
) -> None:
    """Proves ADMIN-4.4-APPROVE-BODY."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    before = snapshot(client)

    assert_error(client.admin("POST", f"{REQUESTS}/sensor-0003/approve", grant), status)

    assert snapshot(client) == before
    assert_pending(client.register(SENSOR), "sensor-0003")


def test_a_deny_with_a_bad_body_is_400_and_changes_nothing(client: Client) -> None:
    """Proves ADMIN-4.2-CALLS."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    before = snapshot(client)

    for body in ({"reason": 5}, {"why": "no"}, {"reason": "x" * 1025}, b"{"):
        assert_error(client.admin("POST", f"{REQUESTS}/sensor-0003/deny", body), 400)

    assert snapshot(client) == before


def test_deciding_an_unknown_username_is_404(client: Client) -> None:
    """Proves ADMIN-4.3-DECIDE."""
    before = snapshot(client)
    for method, path in (
        ("POST", f"{REQUESTS}/nobody/approve"),
        ("POST", f"{REQUESTS}/nobody/deny"),
        ("DELETE", f"{REQUESTS}/nobody"),
        ("DELETE", f"{USERS}/nobody"),
    ):
        assert_error(client.admin(method, path), 404, "not_found")
    assert snapshot(client) == before


def test_deciding_a_request_that_is_not_pending_is_409(client: Client) -> None:
    """Proves ADMIN-4.3-DECIDE."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    assert_pending(client.register({"username": "sensor-0004", "password": "s3cret-pass"}), "sensor-0004")
    approve(client, "sensor-0003")
    assert client.admin("POST", f"{REQUESTS}/sensor-0004/deny").status == 200
    before = snapshot(client)

    for method, path in (
        ("POST", f"{REQUESTS}/sensor-0003/approve"),
        ("POST", f"{REQUESTS}/sensor-0003/deny"),
        ("DELETE", f"{REQUESTS}/sensor-0003"),
        ("POST", f"{REQUESTS}/sensor-0004/approve"),
        ("POST", f"{REQUESTS}/sensor-0004/deny"),
    ):
        assert_error(client.admin(method, path), 409, "not_pending")
    assert snapshot(client) == before


def test_forget_lets_the_username_ask_again(client: Client) -> None:
    """Proves ADMIN-4.2-CALLS."""
    unlocked(client)
    first = assert_pending(client.register(SENSOR), "sensor-0003")

    reply = client.admin("DELETE", f"{REQUESTS}/sensor-0003")

    assert reply.status == 200 and reply.body == {"status": "forgotten", "username": "sensor-0003"}
    assert client.admin("GET", REQUESTS).body == []
    assert_pending(client.register({**SENSOR, "password": "another-pass"}), "sensor-0003")
    [stored] = client.admin("GET", REQUESTS).body
    assert stored["pollCount"] == 0
    assert stored["pairingId"] != first  # a new request, with its own salted hash


def test_a_denied_request_may_be_forgotten(client: Client) -> None:
    """Proves ADMIN-4.2-CALLS."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    client.admin("POST", f"{REQUESTS}/sensor-0003/deny", {"reason": "no"})

    assert client.admin("DELETE", f"{REQUESTS}/sensor-0003").status == 200

    assert_pending(client.register(SENSOR), "sensor-0003")


def test_users_and_removing_one(live: Running, client: Client, tmp_path: Path) -> None:
    """Proves ADMIN-4.2-CALLS."""
    unlocked(client)
    _, certificate = admitted_agent(live, client, tmp_path)
    assert_pending(client.register(SENSOR), "sensor-0003")
    approve(client, "sensor-0003")

    users = client.admin("GET", USERS).body

    assert [user["username"] for user in users] == ["agent-0001", "sensor-0003"]
    agent_user, sensor_user = users
    assert agent_user["method"] == "csr" and sensor_user["method"] == "password"
    assert sensor_user["roles"] == ["minimum"] and sensor_user["permissions"] == []
    issued = x509.load_pem_x509_certificate(certificate.encode())
    assert int(agent_user["certificateSerial"], 16) == issued.serial_number
    assert datetime.fromisoformat(agent_user["certificateNotAfter"]) == issued.not_valid_after_utc
    assert datetime.fromisoformat(sensor_user["createdAt"]) == live.clock()

    removed = client.admin("DELETE", f"{USERS}/agent-0001")

    assert removed.status == 200 and removed.body == {"status": "removed", "username": "agent-0001"}
    assert [user["username"] for user in client.admin("GET", USERS).body] == ["sensor-0003"]
    assert [request["username"] for request in client.admin("GET", REQUESTS).body] == ["sensor-0003"]
    # The username may register again, with another key.
    (tmp_path / "again").mkdir()
    assert_pending(client.register(make_agent(tmp_path / "again").payload()), "agent-0001")
    assert_error(client.admin("DELETE", f"{USERS}/agent-0001"), 404, "not_found")


def test_roles_is_the_catalog(client: Client) -> None:
    """Proves ADMIN-4.8-EXTRA."""
    reply = client.admin("GET", "/api/client-registry/roles")

    assert reply.status == 200
    assert [role["name"] for role in reply.body] == ["minimum"]
    assert isinstance(reply.body[0]["description"], str)


def test_audit_is_newest_first_and_pages(client: Client) -> None:
    """Proves ADMIN-4.8-EXTRA."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    approve(client, "sensor-0003")
    client.admin("POST", LOCK)

    trail = client.admin("GET", AUDIT).body

    assert [entry["action"] for entry in trail["entries"]] == ["lock", "approve", "request", "unlock"]
    assert trail["next"] is None
    assert {entry["username"] for entry in trail["entries"][1:3]} == {"sensor-0003"}
    newest = client.admin("GET", f"{AUDIT}?limit=1").body
    assert [entry["action"] for entry in newest["entries"]] == ["lock"]
    older = client.admin("GET", f"{AUDIT}?limit=2&before={newest['next']}").body
    assert [entry["action"] for entry in older["entries"]] == ["approve", "request"]


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=1001", "before=-1", "limit=%C2%B2", "before=%C2%B2"])
def test_audit_with_a_bad_query_is_400(refused: Client, query: str) -> None:
    """Proves ADMIN-4.8-EXTRA."""
    # %C2%B2 is the superscript two: a digit to str.isdigit, and no number to int().
    assert_error(refused.admin("GET", f"{AUDIT}?{query}"), 400, "malformed_request")


def test_no_answer_holds_a_password(client: Client) -> None:
    """Proves SAFE-6.3-PASSWORDS."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    assert_pending(client.register({"username": "sensor-0004", "password": "0ther-s3cret"}), "sensor-0004")
    approve(client, "sensor-0003")

    for path in (REQUESTS, USERS, AUDIT, STATUS):
        raw = client.admin("GET", path).raw
        assert b"s3cret-pass" not in raw and b"0ther-s3cret" not in raw
        assert b"scrypt" not in raw
    assert b"s3cret-pass" not in client.register(SENSOR).raw


# --- SPEC section 5: whoami -------------------------------------------------


def test_whoami_by_http_basic(client: Client) -> None:
    """Proves AUTH-5.2-WHOAMI."""
    unlocked(client)
    assert_pending(client.register(SENSOR), "sensor-0003")
    assert_error(client.whoami(basic("sensor-0003", "s3cret-pass")), 401, "unauthorized")  # pending is not a user
    approve(client, "sensor-0003")

    reply = client.whoami(basic("sensor-0003", "s3cret-pass"))

    assert reply.status == 200
    assert reply.body == {"username": "sensor-0003", "roles": ["minimum"], "permissions": [], "method": "password"}
    for headers in (
        basic("sensor-0003", "wrong-pass"),
        basic("sensor-0004", "s3cret-pass"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"Authorization": f"Bearer {client.token}"},
    ):
        reply = assert_error(client.whoami(headers), 401, "unauthorized")


def test_whoami_without_credentials_is_401_with_a_basic_challenge(client: Client) -> None:
    """Proves AUTH-5.2-WHOAMI."""
    reply = client.whoami()

    assert_error(reply, 401, "unauthorized")
    assert reply.headers["WWW-Authenticate"].startswith("Basic")


def test_whoami_by_the_issued_certificate_over_mutual_tls(live: Running, client: Client, tmp_path: Path) -> None:
    """Proves AUTH-5.2-WHOAMI."""
    unlocked(client)
    agent, certificate = admitted_agent(live, client, tmp_path)
    mutual = live.client(agent.credentials(certificate))

    reply = mutual.whoami()

    assert reply.status == 200
    assert reply.body == {"username": "agent-0001", "roles": [], "permissions": [], "method": "certificate"}
    # README: a client certificate wins over Basic credentials.
    assert mutual.whoami(basic("sensor-0003", "whatever")).body["method"] == "certificate"


def test_a_certificate_not_from_the_registry_ca_gets_no_identity(live: Running, tmp_path: Path) -> None:
    """Proves AUTH-5.2-WHOAMI."""
    key = make_key()
    key_path = tmp_path / "stranger.key"
    key_path.write_bytes(key_pem(key))
    cert_path = tmp_path / "stranger.pem"
    cert_path.write_bytes(self_signed("agent-0001", key))
    stranger = live.client((cert_path, key_path))

    try:
        reply = stranger.whoami()
    except OSError:  # the handshake failed: the server does not trust the certificate
        return
    assert_error(reply, 401, "unauthorized")


def test_the_certificate_of_a_removed_user_is_401(live: Running, client: Client, tmp_path: Path) -> None:
    """Proves LIFE-7.3-REVOKE."""
    unlocked(client)
    agent, certificate = admitted_agent(live, client, tmp_path)
    assert client.admin("DELETE", f"{USERS}/agent-0001").status == 200

    reply = live.client(agent.credentials(certificate)).whoami()

    assert_error(reply, 401, "unauthorized")


# --- SPEC sections 3 and 6: the data folder ---------------------------------


def test_the_data_folder_and_its_secrets_are_the_owners_alone(start: Start, tmp_path: Path) -> None:
    """Proves SAFE-6.4-FILES, ADMIN-4.1-TOKEN."""
    data = tmp_path / "fresh"
    live = start(data, admin_token=None)

    assert (data / "admin-token").read_text().strip() == live.token
    assert len(live.token) >= 32
    assert _mode(data) == 0o700
    for secret in ("ca.key", "server.key", "admin-token"):
        assert _mode(data / secret) == 0o600, secret
    assert live.client().admin("GET", STATUS).status == 200


def test_a_given_token_is_not_written_down(start: Start, tmp_path: Path) -> None:
    """Proves ADMIN-4.1-TOKEN."""
    data = tmp_path / "given"
    live = start(data, admin_token="given-token-0123456789abcdef-0123")

    assert not (data / "admin-token").exists()
    assert live.client().admin("GET", STATUS).status == 200


def test_a_generated_token_is_printed_once_then_where_it_is_kept(tmp_path: Path) -> None:
    """Proves ADMIN-4.1-TOKEN."""
    # A terminal's scrollback or a service's journal should not gather a
    # copy of the token at every start.
    data = tmp_path / "registry-data"

    def printed_at_start() -> str:
        with server_process(data, free_port(), tmp_path / "server.log") as process:
            printed = process.stdout.readline() + process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        return printed

    first, second = printed_at_start(), printed_at_start()
    token = (data / "admin-token").read_text().strip()

    assert first.count(token) == 1 and first.count("Administrator token:") == 1
    assert token not in second and "Administrator token:" not in second
    assert f"kept in {data / 'admin-token'}" in second


def test_a_restart_keeps_the_token_the_ca_the_lock_and_the_requests(start: Start, tmp_path: Path) -> None:
    """Proves LOCK-3.1, STORE-6.2-DURABLE, CERT-5.4-CA, ADMIN-4.1-TOKEN."""
    data = tmp_path / "kept"
    first = start(data, admin_token=None)
    client = unlocked(first.client())
    pairing_id = assert_pending(client.register(SENSOR), "sensor-0003")
    ca_pem = (data / "ca.pem").read_bytes()
    first.stop()

    second = start(data, clock=first.clock, admin_token=None)
    client = second.client()

    assert second.token == first.token
    assert (data / "ca.pem").read_bytes() == ca_pem
    assert client.admin("GET", STATUS).body["locked"] is False
    assert assert_pending(client.register(SENSOR), "sensor-0003") == pairing_id


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- The README's workflow, as printed, against `python3 server.py` ---------

needs_tools = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None, reason="needs curl and openssl"
)


# The README's sections whose commands run, in this order, in one shell, as a newcomer runs them.
README_WORKFLOWS = (
    "The workflow with curl",
    "The workflow with client.py",
    "A certificate's life, and who trusts it",
    "EST with curl",
    "Learning, and testing other implementations",
)


def readme_workflow(title: str = README_WORKFLOWS[0]) -> list[str]:
    """The ```sh blocks of the README's section ``title``."""
    readme = (HERE / "README.md").read_text()
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def output_shape(line: str) -> str:
    """A line printed, or shown in a README comment, without what changes from run to run: times, ids, serials."""
    line = re.sub(r"[0-9A-Fa-f:.]*[0-9][0-9A-Fa-f:.]*", "#", line)  # numbers, times, hex (abridged with ... or not)
    line = re.sub(r"\b[0-9a-f]{6,}\b", "#", line)  # a pairing id or serial that happens to hold no digit
    return " ".join(line.split())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def json_documents(text: str) -> list[Any]:
    """The JSON documents written one after another, as curl prints them."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
        while at < len(text) and text[at].isspace():
            at += 1
    return documents


def curl_answer(output: str) -> tuple[str, dict[str, str], Any]:
    """What `curl -i` printed: the status line, the headers (lower-case names) and the JSON body."""
    head, _, body = output.strip().replace("\r\n", "\n").partition("\n\n")
    status, *lines = head.split("\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, json.loads(body)


@contextlib.contextmanager
def server_process(data: Path, port: int, log: Path) -> Iterator[subprocess.Popen[str]]:
    """``python3 server.py --port PORT --data-dir DATA`` from this folder, with a fresh data folder."""
    environment = {name: value for name, value in os.environ.items() if name != "REGISTRY_ADMIN_TOKEN"}
    with log.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(port), "--data-dir", str(data)],
            cwd=HERE,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()


def wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, "server.py exited at start"
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    pytest.fail("server.py did not listen within 15 seconds")


@needs_tools
def test_the_readme_workflows_run_as_printed_in_order(tmp_path: Path) -> None:
    """Proves TLS-6.5-HTTPS.

    Issue 17: every example of the README, in order, in one shell, in this folder, against a fresh server."""
    blocks = [block for title in README_WORKFLOWS for block in readme_workflow(title)]
    assert len(blocks) == 13, "the README's workflow changed: update this test with it"
    data, work, port = tmp_path / "registry-data", tmp_path / "client", free_port()
    work.mkdir()
    script = ["set -e -o pipefail", f"export REGISTRY_URL=https://localhost:{port}"]  # client.py's --server
    for number, block in enumerate(blocks):
        script += [
            # No new line before the mark: an answer that does not end with one shows.
            f"printf '@@ block {number}\\n'; printf '@@ block {number}\\n' >&2",
            # The README's scratch folder, $work, is this test's, to read what the commands wrote.
            block.replace(":8443", f":{port}")
            .replace("registry-data", str(data))
            .replace("$(mktemp -d)", str(work))
            .replace(".venv/bin/python", sys.executable),
        ]
    repository = set(HERE.iterdir())

    with server_process(data, port, tmp_path / "server.log") as process:
        wait_for_port(port, process)
        run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=HERE, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, f"the README's commands failed:\n{run.stderr}\n{run.stdout}"
        # SIGTERM stops the server even while a client is halfway through a request.
        with (
            socket.create_connection((HOST, port), timeout=5) as raw,
            ssl.create_default_context(cafile=data / "ca.pem").wrap_socket(raw, server_hostname=HOST) as idle,
        ):
            idle.sendall(f"GET {CA_PATH} HTTP/1.1\r\nHost: localhost\r\n".encode())
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        printed = process.stdout.read()

    # The token is printed once at start, and is the one kept in the data folder.
    token = (data / "admin-token").read_text().strip()
    assert printed.count(token) == 1 and printed.count("Administrator token:") == 1
    outputs = re.split(r"@@ block \d+\n", run.stdout)[1:]
    assert outputs[0].strip() == ""
    # Issue 26 item 9: the prompt never sticks to an answer.
    assert [number for number, output in enumerate(outputs) if output and not output.endswith("\n")] == []
    # What client.py and openssl print is in the README, line for line, but for what changes from run to run.
    errors = re.split(r"@@ block \d+\n", run.stderr)[1:]
    for number in (8, 9, 10):
        printed = (outputs[number] + errors[number]).replace(str(work), "$work").splitlines()
        shown = {output_shape(line) for line in re.findall(r"(?:^|  )# (.*)$", blocks[number], re.MULTILINE)}
        assert {output_shape(line) for line in printed} <= shown, f"block {number}: the README leaves out lines"

    status, headers, body = curl_answer(outputs[1])
    assert status.startswith("HTTP/1.1 423") and headers["retry-after"] == "30" and body["error"] == "locked"

    [opened] = json_documents(outputs[2])
    assert opened["locked"] is False

    status, headers, body = curl_answer(outputs[3])
    assert status.startswith("HTTP/1.1 202") and headers["retry-after"] == "5"
    assert body["status"] == "pending" and body["username"] == "sensor-0003"

    [agent_pending] = json_documents(outputs[4])
    agent_key = serialization.load_pem_private_key((work / "agent.key").read_bytes(), password=None)
    assert agent_pending == {"status": "pending", "username": "agent-0001", "pairingId": spki_sha256(agent_key)[:6]}

    listed, agent_user, sensor_user = json_documents(outputs[5])
    assert {(r["username"], r["state"]) for r in listed} == {("sensor-0003", "pending"), ("agent-0001", "pending")}
    assert agent_user["username"] == "agent-0001" and agent_user["certificateSerial"]
    assert sensor_user["username"] == "sensor-0003" and sensor_user["roles"] == []

    assert outputs[6].strip() == ""
    authority = ca.CA.load_or_create(data, datetime.now(UTC))
    assert_issued_from((work / "agent.csr").read_text(), (work / "agent.pem").read_text(), authority)

    by_certificate, by_password = json_documents(outputs[7])
    assert by_certificate == {"username": "agent-0001", "roles": [], "permissions": [], "method": "certificate"}
    assert by_password == {"username": "sensor-0003", "roles": [], "permissions": [], "method": "password"}

    # client.py: unlock, the agent registered, approved, signed in and renewed.
    assert outputs[8].startswith("unlocked until ")
    assert re.search(r"^agent-0002 +pending +[0-9a-f]{6} +csr ", outputs[9], re.MULTILINE)
    assert "registered agent-0002: roles minimum; permissions mqtt:read:sensors/#" in outputs[9] + run.stderr
    assert "agent-0002, by certificate: roles minimum; permissions mqtt:read:sensors/#" in outputs[9]
    renewed = x509.load_pem_x509_certificate((work / "agent" / "cert.pem").read_bytes())
    assert renewed.subject.rfc4514_string() == "CN=agent-0002"
    assert renewed.not_valid_before_utc > datetime.now(UTC) - timedelta(minutes=10)
    # Revocation: the CRL lists the deleted agent's certificate.
    assert "certificate revoked" in run.stderr + outputs[10]
    crl = x509.load_pem_x509_crl((work / "crl.pem").read_bytes())
    assert renewed.serial_number in {entry.serial_number for entry in crl}
    # EST (issue 25): the CA as PKCS#7, a 202, then the certificate, which openssl accepts for a TLS client.
    assert "subject=CN = Client Registry CA" in outputs[11] and "HTTP/1.1 202 Accepted" in outputs[11]
    assert re.search(r"^Retry-After: 5\r?$", outputs[11], re.MULTILINE)
    assert outputs[11].rstrip().endswith("plc.pem: OK")
    plc = x509.load_pem_x509_certificate((work / "plc.pem").read_bytes())
    assert plc.subject.rfc4514_string() == "CN=plc-0001"
    # The tour ran, and the conformance kit found no MUST broken.
    assert re.search(r"\d+ checks in [\d.]+ s: \d+ PASS, 0 FAIL", outputs[12] + run.stderr)
    # Nothing was written into the repository.
    assert set(HERE.iterdir()) == repository


# --- Listings carry a validator (issue 18) --------------------------------------


@pytest.mark.parametrize("path", [REQUESTS, USERS])
def test_a_listing_that_has_not_changed_is_304_without_a_body(client: Client, path: str) -> None:
    """Proves ADMIN-4.6-LISTS.

    RFC 9110 sections 8.8.3 and 13.1.2: the page asks again with the ETag it holds, and gets 304 until a change."""
    admin = {"Authorization": f"Bearer {client.token}"}
    unlocked(client)
    first = client.admin("GET", path)
    tag = first.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', tag)

    client.connection.request("GET", path, headers=admin | {"If-None-Match": tag})
    response = client.connection.getresponse()
    assert (response.status, response.read(), response.headers["ETag"]) == (304, b"", tag)
    assert response.headers["Content-Length"] is None and response.headers["Content-Type"] is None

    # The connection goes on, and a change gives a new list and a new tag.
    assert client.register({"username": "sensor-0003", "password": "s3cret-pass"}).status == 202
    if path == USERS:
        assert client.admin("POST", f"{REQUESTS}/sensor-0003/approve").status == 200
    client.connection.request("GET", path, headers=admin | {"If-None-Match": tag})
    response = client.connection.getresponse()
    body = response.read()
    assert response.status == 200 and response.headers["ETag"] != tag
    assert [entry["username"] for entry in json.loads(body)] == ["sensor-0003"]


@pytest.mark.parametrize("held", ["W/{tag}", '"other", W/{tag}', '{tag}, W/"other"'])
def test_a_weak_validator_matches_too(client: Client, held: str) -> None:
    """RFC 9110 section 13.1.2: If-None-Match uses the weak comparison (issue 23 item 6)."""
    tag = client.admin("GET", REQUESTS).headers["ETag"]

    client.connection.request(
        "GET", REQUESTS, headers={"Authorization": f"Bearer {client.token}", "If-None-Match": held.format(tag=tag)}
    )
    response = client.connection.getresponse()

    assert (response.status, response.read()) == (304, b"")


# --- The server agrees with its OpenAPI document (issue 19 item 9) ----------------


@pytest.mark.parametrize("path", [f"{AUDIT}?limit=", f"{AUDIT}?before=", f"{AUDIT}?limit=5&before="])
def test_an_empty_integer_parameter_is_a_bad_request(client: Client, path: str) -> None:
    assert_error(client.admin("GET", path), 400, "malformed_request")


@pytest.mark.parametrize("path", [UNLOCK, f"{REQUESTS}/sensor-0003/deny", f"{REQUESTS}/sensor-0003/approve"])
def test_a_null_body_is_a_bad_request_as_for_a_registration(client: Client, path: str) -> None:
    """Proves REG-2.2-MALFORMED."""
    unlocked(client)
    assert client.register({"username": "sensor-0003", "password": "s3cret-pass"}).status == 202
    before = snapshot(client)

    reply = client.call("POST", path, "null", {"Authorization": f"Bearer {client.token}"})

    assert assert_error(reply, 400, "malformed_request")["message"] == "the body must be a JSON object, or empty"
    assert snapshot(client) == before
    assert assert_error(client.register(None), 400, "malformed_request")


def test_a_whole_duration_written_with_a_point_is_a_whole_number(live: Running, client: Client) -> None:
    """Proves LOCK-3.2: JSON Schema's "integer" takes 386.0; so does the server."""
    reply = client.admin("POST", UNLOCK, {"duration": 386.0})
    assert reply.status == 200
    assert datetime.fromisoformat(reply.body["unlockedUntil"]) == live.clock.now + timedelta(milliseconds=386)
    assert_error(client.admin("POST", UNLOCK, {"duration": 386.5}), 400, "malformed_request")


@pytest.mark.parametrize("body", ["\n", " ", "\r\n"])
def test_a_body_of_white_space_alone_is_not_json_on_any_route(client: Client, body: str) -> None:
    """Proves REG-2.2-MALFORMED.

    RFC 8259 section 2: no JSON text is white space alone; an optional body that is there must be JSON."""
    before = snapshot(client)
    reply = client.call("POST", UNLOCK, body, {"Authorization": f"Bearer {client.token}"})
    assert assert_error(reply, 400, "malformed_request")["message"] == "the body is not JSON"
    assert snapshot(client) == before


# --- What a newcomer reads at start, and in --help (issue 26) ---------------------


def test_the_help_shows_only_defaults_that_read_right() -> None:
    """Issue 26 item 6: no "(default: None)", "(default: [])", nor a "(default: True)" on a --no- flag."""
    printed = subprocess.run(
        [sys.executable, "server.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True
    ).stdout
    options = {
        found.group(1): " ".join(found.group(2).split())
        for found in re.finditer(r"^  (--[a-z-]+)[^\n]*?(?:  +|\n +)(.*?)(?=^  -|\Z)", printed, re.M | re.S)
    }
    assert not [name for name, text in options.items() if re.search(r"\(default: (None|\[\]|True)\)", text)]
    assert options["--no-fast-http"].endswith("instead of the faster one, which is the default")
    assert options["--retry-after-locked"] == "Retry-After seconds of a 423 or 503 (1 to 3600) (default: 30)"
    assert "it starts locked" in options["--test-clients"] and "unlock for 30 s" not in options["--test-clients"]
    # A default that means something stays.
    assert options["--port"] == "port; 0 picks a free one (0 to 65535) (default: 8443)"


# --- What the administrator's page needs (issue 27) -------------------------------


def test_while_unlocked_the_status_says_how_long_is_left_by_the_server_s_clock(live: Running, client: Client) -> None:
    """Proves ADMIN-4.10-PAGE-FIELDS: unlockedForMs and serverTime come from the registry's clock, not the caller's."""
    opened = client.admin("POST", UNLOCK, {"duration": 60_000}).body
    assert opened["unlockedForMs"] == 60_000 and datetime.fromisoformat(opened["serverTime"]) == live.clock()
    live.clock.advance(seconds=15.25)
    status = client.admin("GET", STATUS).body
    assert status["locked"] is False and status["unlockedForMs"] == 44_750
    assert datetime.fromisoformat(status["serverTime"]) == live.clock()
    assert datetime.fromisoformat(status["unlockedUntil"]) - live.clock() == timedelta(milliseconds=44_750)
    locked = client.admin("POST", LOCK).body
    assert "unlockedForMs" not in locked and "serverTime" not in locked


def test_the_listing_describes_a_csr_s_key_and_users_carry_their_certificate_s_fingerprint(client: Client) -> None:
    """Proves ADMIN-4.10-PAGE-FIELDS: the key's type and the SHA-256 of its SubjectPublicKeyInfo; the certificate's."""
    key = make_key("p384")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    unlocked(client)
    assert client.register({"username": "agent-0001", "csr": make_csr("agent-0001", key)}).status == 202
    assert client.register(SENSOR).status == 202
    listing = {entry["username"]: entry for entry in client.admin("GET", REQUESTS).body}
    assert listing["agent-0001"]["publicKey"] == {"type": "EC secp384r1", "sha256": hashlib.sha256(spki).hexdigest()}
    assert listing["sensor-0003"]["publicKey"] is None

    assert client.admin("POST", f"{REQUESTS}/agent-0001/approve").status == 200
    answer = client.register({"username": "agent-0001", "csr": make_csr("agent-0001", key)}).body
    der = x509.load_pem_x509_certificate(answer["certificate"].encode()).public_bytes(serialization.Encoding.DER)
    [user] = client.admin("GET", USERS).body
    assert user["certificateSha256"] == hashlib.sha256(der).hexdigest()
    assert user["certificateSerial"] == format(x509.load_der_x509_certificate(der).serial_number, "x")


def test_a_listing_without_poll_statistics_keeps_its_etag_while_clients_poll(client: Client) -> None:
    """Proves ADMIN-4.10-PAGE-FIELDS: ?polls=omit changes with arrivals and decisions, not with polls."""
    admin = {"Authorization": f"Bearer {client.token}"}
    unlocked(client)
    assert client.register(SENSOR).status == 202
    light = client.admin("GET", f"{REQUESTS}?polls=omit")
    assert set(light.body[0]).isdisjoint(server.POLL_STATISTICS)
    full_tag = client.admin("GET", REQUESTS).headers["ETag"]
    for _ in range(3):
        assert client.register(SENSOR).status == 202  # a poll
    assert client.admin("GET", REQUESTS).headers["ETag"] != full_tag
    client.connection.request("GET", f"{REQUESTS}?polls=omit", headers=admin | {"If-None-Match": light.headers["ETag"]})
    response = client.connection.getresponse()
    assert (response.status, response.read()) == (304, b"")
    assert client.admin("POST", f"{REQUESTS}/sensor-0003/deny").status == 200
    assert client.admin("GET", f"{REQUESTS}?polls=omit").headers["ETag"] != light.headers["ETag"]


def test_an_unknown_polls_value_is_a_bad_request(client: Client) -> None:
    reply = client.admin("GET", f"{REQUESTS}?polls=sometimes")
    assert assert_error(reply, 400, "malformed_request")["message"] == "'polls' must be 'include' or 'omit'"


def test_the_sign_in_says_where_the_token_is_kept_and_never_the_token(start: Start, tmp_path: Path) -> None:
    """Proves ADMIN-4.10-PAGE-FIELDS: the file of --data-dir, or the flag or variable that gave it."""
    folder = tmp_path / "elsewhere"
    kept = start(data_dir=folder, admin_token=None).client()
    reply = kept.call("GET", "/api/client-registry/sign-in")
    assert reply.body == {"tokenFrom": "file", "file": str(folder / "admin-token")}
    given = start(data_dir=tmp_path / "given", token_source="--admin-token").client()
    reply = given.call("GET", "/api/client-registry/sign-in")
    assert reply.body == {"tokenFrom": "flag", "file": None}
    assert given.token not in reply.raw.decode()


def test_every_answer_is_nosniff_and_https_answers_carry_hsts(client: Client, tmp_path: Path) -> None:
    """Proves HTTP-8.7-SECURITY-HEADERS: on the API's answers, its refusals and the page; HSTS over HTTPS alone."""
    for reply in (client.admin("GET", STATUS), client.call("GET", STATUS), client.call("GET", "/nothing-here")):
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Strict-Transport-Security"] == "max-age=31536000"
    with serve(tmp_path / "plain") as plain, urllib.request.urlopen(plain.url + CA_PATH, timeout=10) as response:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Strict-Transport-Security"] is None

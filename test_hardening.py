"""Hardening: nothing lost under kills and races, no 500 on hostile input, secrets kept.

Every load here goes to 127.0.0.1 only, and every loop is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import admins
import server
from conftest import ADMIN_TOKEN, make_csr, make_key, serve

HERE = Path(__file__).parent
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def call(
    address: tuple[str, int], method: str, path: str, body: object = None, headers: dict | None = None
) -> tuple[int, dict[str, str], object]:
    """One request on a new connection: status, headers, JSON (or text) body."""
    connection = http.client.HTTPConnection(*address, timeout=20)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        text = raw.decode()
        payload = json.loads(text) if response.getheader("Content-Type") == "application/json" else text
        return response.status, dict(response.getheaders()), payload
    finally:
        connection.close()


def register(address: tuple[str, int], payload: dict) -> tuple[int, object]:
    status, _, body = call(address, "POST", "/api/client-registry/register", payload)
    return status, body


def admin(address: tuple[str, int], method: str, path: str, body: object = None) -> object:
    status, _, answer = call(address, method, path, body, ADMIN)
    assert status == 200, answer
    return answer


def snapshot(address: tuple[str, int]) -> tuple[object, object, object]:
    """What the administrator can see: requests, users and the audit trail."""
    return (
        admin(address, "GET", "/api/client-registry/requests"),
        admin(address, "GET", "/api/users"),
        admin(address, "GET", "/api/client-registry/audit?limit=1000"),
    )


# --- Kills -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """server.py as a subprocess on a fixed port, to be killed and started again."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "server.py", "--http", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--admin-token", ADMIN_TOKEN, "--timeout", "3", "--log-level", "WARNING"],
            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if call(self.address, "GET", "/api/client-registry/ca")[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("server.py did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(10)


@pytest.fixture
def server_process(tmp_path: Path) -> ServerProcess:
    """server.py in a subprocess, killed at the end whatever the test did."""
    process = ServerProcess(tmp_path)
    yield process
    if process.process is not None and process.process.poll() is None:
        process.process.kill()
        process.process.wait(10)


def test_killed_server_loses_nothing_it_answered(tmp_path: Path, server_process: ServerProcess) -> None:
    """Proves STORE-6.2-DURABLE."""
    process = server_process
    process.start()
    ca_before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    admin(process.address, "POST", "/api/client-registry/unlock", {"duration": 3_600_000})
    accepted: dict[str, dict] = {}  # username -> the request that got 202
    issued: dict[str, str] = {}  # username -> the certificate of its 201
    stop = threading.Event()
    keys = [make_key() for _ in range(4)]

    def agent(worker: int) -> None:
        # Each round asks for one new username and polls every earlier one still waiting.
        mine: dict[str, dict] = {}
        for n in range(40):
            if stop.is_set():
                return
            name = f"agent-{worker}-{n}"
            mine[name] = {"username": name, "csr": make_csr(name, keys[worker])}
            for name, payload in list(mine.items()):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, body = register(process.address, payload)
                    if status == 202:
                        accepted[name] = payload
                    elif status == 201:
                        issued[name] = body["certificate"]
                        del mine[name]

    def approver() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, http.client.HTTPException, AssertionError):
                for request in admin(process.address, "GET", "/api/client-registry/requests"):
                    if request["state"] == "pending":
                        call(process.address, "POST", f"/api/client-registry/requests/{request['username']}/approve",
                             None, ADMIN)  # fmt: skip
            time.sleep(0.05)

    threads = [threading.Thread(target=agent, args=(w,)) for w in range(4)] + [threading.Thread(target=approver)]
    for thread in threads:
        thread.start()
    chaos = random.Random(7)
    try:
        for _ in range(3):
            time.sleep(chaos.uniform(0.3, 1.2))
            process.kill()
            process.start()
    finally:
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)

    assert accepted and issued, "the load made no progress"
    states = {r["username"]: r["state"] for r in admin(process.address, "GET", "/api/client-registry/requests")}
    for name, payload in accepted.items():
        # A name with a 201 is approved. Any other was approved or not when
        # the load stopped (an approval may come after its agent's last
        # poll): one more poll tells which, and the list must say the same.
        answered = 201 if name in issued else register(process.address, payload)[0]
        assert states.get(name) == {201: "approved", 202: "pending"}[answered], (name, answered)
    users = {u["username"] for u in admin(process.address, "GET", "/api/users")}
    for name, certificate in issued.items():
        assert name in users
        status, body = register(process.address, accepted[name])
        assert (status, body["certificate"]) == (201, certificate)
    assert process.stop() == 0
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM users GROUP BY username HAVING count(*) > 1").fetchall() == []
        stored = dict(
            db.execute(
                "SELECT users.username, certificates.certificate FROM users"
                " JOIN certificates ON certificates.serial = users.serial"
            )
        )
    assert all(stored[name] == certificate for name, certificate in issued.items())


# --- Races -------------------------------------------------------------------


def test_racing_clients_get_one_request_per_username(tmp_path: Path) -> None:
    """Proves REG-2.4-PENDING."""
    # 60 clients at once, all from 127.0.0.1: over the default cap of one address.
    with serve(tmp_path, max_connections_per_address=100) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        distinct = [{"username": f"plant-{i:02}", "password": f"password-{i}"} for i in range(50)]
        contested = [{"username": "contested", "password": f"password-{i}"} for i in range(10)]
        with concurrent.futures.ThreadPoolExecutor(60) as pool:
            answers = list(pool.map(lambda p: register(address, p)[0], distinct + contested, timeout=120))
        assert answers[:50] == [202] * 50
        # One is stored; the other nine are wrong passwords for it, failed sign-ins from one address
        # (REG-2.4-THROTTLE): five are checked (409), and the rest are not (429).
        assert sorted(answers[50:]) == [202] + [409] * 5 + [429] * 4
        requests = admin(address, "GET", "/api/client-registry/requests")
        assert sorted(r["username"] for r in requests) == sorted({p["username"] for p in distinct + contested})


def test_approvals_race_with_polls_and_deletes(tmp_path: Path) -> None:
    # 30 clients at once from 127.0.0.1, each connection lingering as it closes: room over the default cap.
    with serve(tmp_path, max_connections_per_address=100) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        payloads = [{"username": f"unit-{i:02}", "password": "password-x"} for i in range(20)]
        for payload in payloads:
            assert register(address, payload)[0] == 202

        def poll(payload: dict) -> list[int]:
            return [register(address, payload)[0] for _ in range(5)]

        def decide(payload: dict) -> list[int]:
            name = payload["username"]
            approved = call(address, "POST", f"/api/client-registry/requests/{name}/approve", None, ADMIN)[0]
            removed = call(address, "DELETE", f"/api/users/{name}", None, ADMIN)[0]
            return [approved, removed]

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            polls = [pool.submit(poll, p) for p in payloads]
            decisions = [pool.submit(decide, p) for p in payloads]
            statuses = [s for f in polls + decisions for s in f.result(timeout=120)]
        assert set(statuses) <= {200, 201, 202, 404, 423}
        assert 500 not in statuses
        assert admin(address, "GET", "/api/users") == []


# --- Hostile input -----------------------------------------------------------


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> server.RegistryServer:
    with serve(tmp_path_factory.mktemp("hostile"), timeout=2) as srv:
        yield srv


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["username", "password", "csr", "roles", "permissions", "context", "other"])
requests_like = st.dictionaries(field_names, json_values, max_size=6)


def assert_clean_refusal(status: int, headers: dict[str, str], body: object) -> None:
    assert 400 <= status < 500, (status, body)
    assert headers["Content-Type"] == "application/json"
    assert isinstance(body, dict) and body["error"] and body["message"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(body=st.binary(max_size=300) | requests_like.map(lambda d: json.dumps(d).encode()))
def test_hostile_bodies_get_a_json_4xx_and_change_nothing(locked_server: server.RegistryServer, body: bytes) -> None:
    """Proves REG-2.2-MALFORMED, REG-2.5-ERRORS."""
    address = locked_server.server_address
    before = snapshot(address)
    assert_clean_refusal(*call(address, "POST", "/api/client-registry/register", body))
    assert snapshot(address) == before


HOSTILE_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"username": ' * 50_000,
    b'{"username": "x", "password": 1' + b"0" * 5000 + b"}",
    b'{"username": "sensor-01", "password": 1e999}',
    b'{"username": "\\ud800abc", "password": "secret"}',
    b'{"username": "sensor-01", "context": "\\udfff", "password": "secret"}',
    '{"username": "séñsor", "password": "secret"}'.encode("latin-1"),
    b'{"username": "sensor-01", "password": "' + b"p" * 60_000 + b'"}',
    b'{"username": "sensor-01", "csr": "-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n'
    b'-----END CERTIFICATE REQUEST-----"}',
    b'{"username": "sensor-01", "csr": "' + b"A" * 1000 + b'"}',
    b'{"username": "sensor-01", "password": "secret", "roles": [[]]}',
    b'{"username": "sensor-01", "password": "secret", "permissions": [{"resource": {}}]}',
    b'{"username": ["a"], "password": {"b": 1}}',
    b"\xff\xfe\x00\x00",
    b"null",
    b"",
]


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_hand_written_hostile_bodies(locked_server: server.RegistryServer, body: bytes) -> None:
    """Proves REG-2.2-MALFORMED, REG-2.5-ERRORS."""
    address = locked_server.server_address
    before = snapshot(address)
    assert_clean_refusal(*call(address, "POST", "/api/client-registry/register", body))
    assert snapshot(address) == before


def test_csrs_asking_for_more_are_not_a_fault(tmp_path: Path) -> None:
    """Proves CERT-5.3-SUBJECT, CERT-5.3-BASIC-CONSTRAINTS."""
    csr = make_csr(
        "gateway-1",
        extensions=[
            x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.DNSName("*.example")]),
            x509.BasicConstraints(ca=True, path_length=None),
        ],
    )
    with serve(tmp_path) as srv:
        admin(srv.server_address, "POST", "/api/client-registry/unlock")
        assert register(srv.server_address, {"username": "gateway-1", "csr": csr})[0] == 202
        admin(srv.server_address, "POST", "/api/client-registry/requests/gateway-1/approve")
        status, body = register(srv.server_address, {"username": "gateway-1", "csr": csr})
    assert status == 201
    certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


REGISTER = b"POST /api/client-registry/register HTTP/1.1\r\nHost: localhost\r\n"
# Each broken framing and what it gets: a status and error code (HTTP-8.1-STATUSES names 411, 414, 431, 505),
# or None: the connection is closed unanswered (a body that never comes ends with the request timeout).
BROKEN_FRAMING = {
    "content-length too large": (REGISTER + b"Content-Length: 500\r\n\r\n{}", None),
    "content-length too small": (REGISTER + b'Content-Length: 2\r\n\r\n{"username": "x"}', (400, "malformed_request")),
    "content-length not a number": (REGISTER + b"Content-Length: ten\r\n\r\n{}", (400, "bad_framing")),
    "negative content-length": (REGISTER + b"Content-Length: -5\r\n\r\n{}", (400, "bad_framing")),
    "no content-length": (REGISTER + b"\r\n", (400, "malformed_request")),
    "chunked": (REGISTER + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", (411, "bad_framing")),
    "header line too long": (
        REGISTER + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        (431, "request_header_fields_too_large"),
    ),
    "too many headers": (
        REGISTER + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
        (431, "request_header_fields_too_large"),
    ),
    "request line too long": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", (414, "uri_too_long")),
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", (400, "bad_framing")),
    # RFC 9110 section 15.6.6: an unsupported major version is 505, the one 5xx a client may cause.
    "unknown HTTP version": (b"GET / HTTP/7.0\r\n\r\n", (505, "http_version_not_supported")),
    "header without colon": (REGISTER + b"NoColonHere\r\n\r\n", (400, "bad_framing")),
}


@pytest.mark.parametrize(("raw", "expected"), BROKEN_FRAMING.values(), ids=BROKEN_FRAMING.keys())
def test_broken_framing_gets_its_json_4xx_or_a_closed_connection(
    locked_server: server.RegistryServer, raw: bytes, expected: tuple[int, str] | None
) -> None:
    """Proves HTTP-8.1-STATUSES, HTTP-8.2-HEADERS: each framing fault has one answer, and changes nothing."""
    address = locked_server.server_address
    before = snapshot(address)
    with socket.create_connection(address, timeout=10) as connection:
        connection.sendall(raw)
        answer = receive_all(connection)
    if expected is None:
        assert answer == b""
    else:
        head, _, body = answer.partition(b"\r\n\r\n")
        first = body.split(b"HTTP/1.1")[0]
        error = json.loads(first[: int(header(head, b"content-length"))])["error"]
        assert (int(head.split()[1]), error) == expected, answer[:200]
    assert snapshot(address) == before
    assert call(address, "GET", "/api/client-registry/ca")[0] == 200


def receive_all(connection: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_by_server(connection: socket.socket, seconds: float = 8) -> bool:
    """Whether the server closes ``connection`` within ``seconds``, sending nothing."""
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


def header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise KeyError(name)


# --- Slow clients ------------------------------------------------------------


def test_slow_clients_are_cut_off_and_never_block_others(tmp_path: Path) -> None:
    """Proves HTTP-8.4-LIMITS."""
    with serve(tmp_path, timeout=1.5) as srv:
        address = srv.server_address
        silent = [socket.create_connection(address, timeout=10) for _ in range(5)]
        trickling = [socket.create_connection(address, timeout=10) for _ in range(5)]
        started = time.monotonic()
        closed: set[int] = set()
        served = 0
        while len(closed) < len(trickling) and time.monotonic() - started < 12:
            for index, connection in enumerate(trickling):
                if index not in closed:
                    try:
                        connection.send(b"G")
                    except OSError:
                        closed.add(index)
            served += call(address, "GET", "/api/client-registry/ca")[0] == 200
            time.sleep(0.5)
        assert closed == set(range(len(trickling))), "a trickling client kept its connection"
        assert served >= 3
        for connection in silent:
            assert closed_by_server(connection), "a silent client kept its connection"
        for connection in silent + trickling:
            connection.close()


def test_tls_clients_that_stall_are_cut_off(tmp_path: Path) -> None:
    """Proves HTTP-8.4-LIMITS."""
    with serve(tmp_path, http=False, timeout=1.0) as srv:
        address = srv.server_address
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        no_handshake = socket.create_connection(address, timeout=10)
        silent = socket.create_connection(address, timeout=10)
        silent_after_handshake = trust.wrap_socket(silent, server_hostname="localhost")
        with no_handshake, silent_after_handshake:
            assert closed_by_server(no_handshake), "a client that never shook hands held its connection"
            assert closed_by_server(silent_after_handshake), "a silent TLS client held its connection"
        with trust.wrap_socket(socket.create_connection(address, timeout=10), server_hostname="localhost") as other:
            other.sendall(b"GET /api/client-registry/ca HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert other.recv(12) == b"HTTP/1.1 200"


def test_a_body_cut_short_over_tls_is_one_access_line_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """Proves HTTP-8.5-ACCESS-LOG."""
    # A client that sends less body than its Content-Length and closes has
    # aborted its request: no client's mistake may write a traceback, and an
    # aborted request is one access line at most. Closing without TLS's
    # close_notify is what the server once met with "handshake not done yet".
    caplog.set_level(logging.DEBUG, logger="registry")
    request = b"POST /api/client-registry/register HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{}"
    with serve(tmp_path, http=False) as srv:
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        for _ in range(30):
            with socket.create_connection(srv.server_address, timeout=10) as raw:
                trust.wrap_socket(raw, server_hostname="localhost").sendall(request)
        deadline = time.monotonic() + 10
        while srv.connections_from("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
    written = capfd.readouterr().err

    assert [
        record.getMessage() for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR
    ] == []
    assert written.count("POST /api/client-registry/register") <= 30


# --- Limits ------------------------------------------------------------------


def test_a_full_registry_answers_503_and_still_serves_polls(tmp_path: Path) -> None:
    """Proves REG-2.4-FULL."""
    with serve(tmp_path, max_pending=3) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        stored = [{"username": f"cell-{i}", "password": "password-x"} for i in range(3)]
        for payload in stored:
            assert register(address, payload)[0] == 202
        status, headers, body = call(address, "POST", "/api/client-registry/register",
                                     {"username": "cell-9", "password": "password-x"})  # fmt: skip
        assert (status, body["error"]) == (503, "registry_full") and int(headers["Retry-After"]) > 0
        assert [register(address, payload)[0] for payload in stored] == [202, 202, 202]


def test_the_rate_limit_counts_new_requests_only(tmp_path: Path) -> None:
    """Proves REG-2.4-RATE."""
    with serve(tmp_path, rate_limit=2) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        first = {"username": "line-1", "password": "password-x"}
        assert register(address, first)[0] == 202
        assert register(address, {"username": "line-2", "password": "password-x"})[0] == 202
        status, headers, body = call(address, "POST", "/api/client-registry/register",
                                     {"username": "line-3", "password": "password-x"})  # fmt: skip
        assert (status, body["error"]) == (429, "too_many_requests") and int(headers["Retry-After"]) > 0
        assert [register(address, first)[0] for _ in range(5)] == [202] * 5


def test_failed_sign_ins_are_throttled(tmp_path: Path) -> None:
    """Proves AUTH-5.2-THROTTLE."""
    with serve(tmp_path) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        payload = {"username": "meter-7", "password": "right-password"}
        register(address, payload)
        admin(address, "POST", "/api/client-registry/requests/meter-7/approve")
        assert whoami(address, "meter-7", "right-password") == 200
        assert [whoami(address, "meter-7", f"guess-{i}") for i in range(5)] == [401] * 5
        assert whoami(address, "meter-7", "right-password") == 429


def whoami(address: tuple[str, int], username: str, password: str) -> int:
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return call(address, "GET", "/api/auth/whoami", None, {"Authorization": f"Basic {token}"})[0]


def test_refused_requests_cost_no_key_derivation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    derivations = []
    real_scrypt = hashlib.scrypt
    monkeypatch.setattr(hashlib, "scrypt", lambda *a, **k: derivations.append(1) or real_scrypt(*a, **k))
    with serve(tmp_path, max_body=1024) as srv:
        address = srv.server_address
        refused = [
            {"username": "valve-1", "password": "password-x", "other": 1},  # 400
            {"username": "v", "password": "password-x"},  # 422
            {"username": "valve-1", "password": "password-x"},  # 423: locked
        ]
        assert [register(address, payload)[0] for payload in refused] == [400, 422, 423]
        assert call(address, "POST", "/api/client-registry/register", b"x" * 2048)[0] == 413
        assert derivations == []
        admin(address, "POST", "/api/client-registry/unlock")
        assert register(address, {"username": "valve-1", "password": "password-x"})[0] == 202
        assert len(derivations) == 1, "the counter must see the one derivation of a stored request"


def test_one_address_holding_its_cap_of_connections_leaves_room_for_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves HTTP-8.4-LIMITS."""
    # As nginx's limit_conn: one address may hold so many connections at once,
    # so that 300 slow ones from one client cannot take the server from the
    # rest. 127.0.0.2 is another loopback address on Linux.
    caplog.set_level(logging.WARNING, logger="registry.server")
    with serve(tmp_path, max_connections_per_address=4, timeout=5) as srv:
        address = srv.server_address
        held = [socket.create_connection(address, timeout=10) for _ in range(4)]
        deadline = time.monotonic() + 5
        while srv.connections_from("127.0.0.1") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with socket.create_connection(address, timeout=10) as extra:
                assert closed_by_server(extra, seconds=5), "a fifth connection from 127.0.0.1 was kept"
            with socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0)) as other:
                other.sendall(b"GET /api/client-registry/ca HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert receive_all(other).startswith(b"HTTP/1.1 200 "), "another address was not served"
        finally:
            for connection in held:
                connection.close()
        assert srv.refused["127.0.0.1"] == 1 and "127.0.0.2" not in srv.refused
        assert any("closing a connection from 127.0.0.1 unserved" in r.getMessage() for r in caplog.records)
        # The held connections closed, the address is served again.
        deadline = time.monotonic() + 5
        while srv.connections_from("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert call(address, "GET", "/api/client-registry/ca")[0] == 200


# --- Secrets -----------------------------------------------------------------


def test_no_password_is_stored_logged_or_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """Proves SAFE-6.3-PASSWORDS."""
    caplog.set_level(logging.DEBUG)
    passwords = [f"pw-{os.urandom(6).hex()}" for _ in range(4)]
    answers = []
    with serve(tmp_path) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        for i, password in enumerate(passwords):
            payload = {"username": f"robot-{i}", "password": password}
            answers += [register(address, payload), register(address, payload)]
        admin(address, "POST", "/api/client-registry/requests/robot-0/approve")
        admin(address, "POST", "/api/client-registry/requests/robot-1/deny", {"reason": "unknown"})
        answers += [register(address, {"username": "robot-0", "password": passwords[0]})]
        answers += [whoami(address, "robot-0", passwords[0]), whoami(address, "robot-0", passwords[1])]
        answers += [snapshot(address)]
    log = caplog.text + capfd.readouterr().err
    assert "POST /api/client-registry/register 202" in log, "the access log must be part of what is searched"
    everything = json.dumps(answers) + log
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("registry.db"))
    for password in passwords:
        assert password not in everything
        assert password.encode() not in stored
    assert ADMIN_TOKEN not in log


def test_the_server_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    """Proves SAFE-6.4-FILES."""
    with serve(tmp_path):
        pass
    assert os.stat(tmp_path).st_mode & 0o777 == 0o700
    assert (tmp_path / "registry.db").stat().st_mode & 0o777 == 0o600
    (tmp_path / "admin-token").write_text("a-token-kept-in-the-folder-0123456789\n")
    (tmp_path / "admin-token").chmod(0o600)  # as the server keeps it
    for name in ("ca.key", "admin-token"):
        (tmp_path / name).chmod(0o644)
        result = subprocess.run(
            [sys.executable, "server.py", "--http", "--port", "0", "--data-dir", str(tmp_path)],
            cwd=HERE, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode != 0
        assert f"chmod 600 {tmp_path / name}" in result.stderr
        (tmp_path / name).chmod(0o600)


# --- Audit trail -------------------------------------------------------------


def test_the_audit_trail_of_a_lifecycle(tmp_path: Path) -> None:
    """Proves ADMIN-4.8-EXTRA."""
    with serve(tmp_path) as srv:
        address = srv.server_address
        admin(address, "POST", "/api/client-registry/unlock")
        csr = make_csr("drone-1")
        register(address, {"username": "drone-1", "csr": csr, "roles": ["minimum"]})
        register(address, {"username": "drone-2", "password": "password-x"})
        approved = admin(address, "POST", "/api/client-registry/requests/drone-1/approve", {"roles": []})
        admin(address, "POST", "/api/client-registry/requests/drone-2/deny", {"reason": "not ours"})
        admin(address, "DELETE", "/api/client-registry/requests/drone-2")
        admin(address, "DELETE", "/api/users/drone-1")
        admin(address, "POST", "/api/client-registry/lock")
        trail = admin(address, "GET", "/api/client-registry/audit")["entries"]
        first_page = admin(address, "GET", "/api/client-registry/audit?limit=3")
        second_page = admin(address, "GET", f"/api/client-registry/audit?limit=3&before={first_page['next']}")
    actions = [(entry["action"], entry["username"]) for entry in trail]
    assert actions == [
        ("lock", None),
        ("remove user", "drone-1"),
        ("forget", "drone-2"),
        ("deny", "drone-2"),
        ("approve", "drone-1"),
        ("request", "drone-2"),
        ("request", "drone-1"),
        ("unlock", None),
    ]
    approval = trail[4]
    assert approval["details"]["requested"]["roles"] == ["minimum"]
    assert approval["details"]["granted"]["roles"] == []
    assert approval["details"]["serial"] == approved["certificateSerial"]
    assert trail[3]["details"] == {"reason": "not ours"}
    assert {entry["address"] for entry in trail} == {"127.0.0.1"}
    assert {entry["actor"] for entry in trail if entry["action"] != "request"} == {"admin"}  # the quick start's token
    assert first_page["entries"] + second_page["entries"] == trail[:6]


def test_the_administrator_token_is_compared_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves ADMIN-4.1-TOKEN."""
    compared = []
    real = admins.hmac.compare_digest
    monkeypatch.setattr(admins.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    guess = {"Authorization": "Bearer guess"}
    with serve(tmp_path) as srv:
        assert call(srv.server_address, "GET", "/api/client-registry", None, guess)[0] == 401
        assert call(srv.server_address, "GET", "/api/client-registry", None, ADMIN)[0] == 200

    def digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).hexdigest().encode()

    assert compared == [(digest("guess"), digest(ADMIN_TOKEN)), (digest(ADMIN_TOKEN), digest(ADMIN_TOKEN))]

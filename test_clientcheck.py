"""``server.py --test-clients`` (SPEC section 9): it varies what a correct client must cope with, and reports the rest.

The rules of ``clientcheck.py`` on a fake clock first; then a real server in
that mode, against which ``client.py`` must come out clean and an impatient
client must not.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import client
import clientcheck
import server
from clientcheck import ClientCheck, Variation
from conftest import ADMIN_TOKEN, call, make_key, serve

CALM = Variation(busy=0.0, lost=0.0)


class Ticks:
    """A monotonic clock that moves when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


def findings(check: ClientCheck) -> list[tuple[str, str]]:
    return [(finding["rule"], finding["message"]) for c in check.report()["clients"] for finding in c["findings"]]


# --- The rules -------------------------------------------------------------------


def test_a_client_that_waits_its_retry_after_is_clean(ticks: Ticks) -> None:
    """Proves CLIENT-9.1-RETRY-AFTER."""
    check = ClientCheck(CALM, seed=1, clock=ticks)
    for _ in range(5):
        assert check.arrive("sensor-0003", "10.0.0.1") is None
        retry_after, lost = check.answered("sensor-0003", "10.0.0.1", 202, None)
        assert lost is False and 1 <= retry_after <= 8
        ticks.now += retry_after

    assert check.report() == {
        "clean": True,
        "clients": [
            {"username": "sensor-0003", "address": "10.0.0.1", "requests": 5, "findings": [], "moreFindings": 0}
        ],
        "varied": {"busy": 0, "lost": 0},
        "unfollowed": 0,
    }


def test_a_poll_before_its_retry_after_is_reported(ticks: Ticks) -> None:
    """Proves CLIENT-9.1-RETRY-AFTER."""
    check = ClientCheck(CALM, seed=1, clock=ticks)
    check.arrive("sensor-0003", "10.0.0.1")
    retry_after, _ = check.answered("sensor-0003", "10.0.0.1", 423, "locked")
    ticks.now += retry_after - 1

    check.arrive("sensor-0003", "10.0.0.1")

    assert findings(check) == [
        ("CLIENT-9.1-RETRY-AFTER", f"sent again {retry_after - 1:.1f} s after a 423 with Retry-After: {retry_after}")
    ]
    assert check.report()["clean"] is False


def test_a_changed_request_and_a_request_after_a_denial_are_reported(ticks: Ticks) -> None:
    """Proves CLIENT-9.2-SAME-REQUEST, CLIENT-9.3-DENIED."""
    check = ClientCheck(CALM, seed=1, clock=ticks)
    check.arrive("agent-0001", "10.0.0.1")
    check.answered("agent-0001", "10.0.0.1", 409, "duplicate_request")
    ticks.now += 60
    check.arrive("agent-0001", "10.0.0.1")
    check.answered("agent-0001", "10.0.0.1", 403, "denied")
    ticks.now += 60

    check.arrive("agent-0001", "10.0.0.1")

    assert findings(check) == [
        ("CLIENT-9.2-SAME-REQUEST", "changed its request while one was stored (409)"),
        ("CLIENT-9.3-DENIED", "sent its request again after it was denied (403)"),
    ]


def test_a_lost_answer_lets_the_client_send_again_at_once(ticks: Ticks) -> None:
    """Proves CLIENT-9.4-LOST-ANSWER."""
    check = ClientCheck(Variation(busy=0.0, lost=1.0), seed=1, clock=ticks)
    check.arrive("sensor-0003", "10.0.0.1")
    assert check.answered("sensor-0003", "10.0.0.1", 201, None) == (None, True)

    check.arrive("sensor-0003", "10.0.0.1")

    assert findings(check) == []


def test_the_check_varies_retry_after_and_answers_busy_in_their_ranges(ticks: Ticks) -> None:
    """Proves CLIENT-9.1-RETRY-AFTER."""
    check = ClientCheck(Variation(busy=0.5, lost=0.0), seed=7, clock=ticks)
    busy, waits = [], set()
    for _ in range(200):
        refusal = check.arrive(None, "10.0.0.1")
        if refusal is not None:
            busy.append(refusal)
        waits.add(check.answered(None, "10.0.0.1", 202, None)[0])

    assert {status for status, _ in busy} == {429, 503}
    assert all(1 <= seconds <= 5 for _, seconds in busy)
    assert 60 < len(busy) < 140
    assert waits == set(range(1, 9))  # Retry-After changes from answer to answer


def test_the_report_is_bounded_whatever_clients_send(ticks: Ticks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 item 6: names no registry takes are not followed, findings and clients are capped."""
    monkeypatch.setattr(clientcheck, "MAX_CLIENTS", 3)
    check = ClientCheck(CALM, seed=1, clock=ticks)
    for number in range(300):
        check.arrive(f"{number}-" + "x" * 60_000, "10.0.0.1")  # 60 KB usernames: 422 from the registry
    for number in range(5):
        check.answered(f"agent-{number}", "10.0.0.1", 409, "duplicate_request")
    for _ in range(50):
        check.answered("agent-0", "10.0.0.1", 409, "duplicate_request")

    report = check.report()

    assert [client["username"] for client in report["clients"]] == ["agent-0", "agent-1", "agent-2"]
    assert report["unfollowed"] == 2
    first = report["clients"][0]
    assert (len(first["findings"]), first["moreFindings"]) == (clientcheck.MAX_FINDINGS, 51 - clientcheck.MAX_FINDINGS)
    assert len(json.dumps(report)) < 10_000


# --- A real server in the mode ----------------------------------------------------


@pytest.fixture
def testing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[server.RegistryServer]:
    """A server that tests its clients, with short Retry-Afters so that the test takes seconds."""
    monkeypatch.setattr(
        clientcheck, "RETRY_RANGES", {status: (1, 2) for status in clientcheck.RETRY_RANGES}
    )  # fmt: skip
    with serve(tmp_path, test_clients=True) as instance:
        instance.app.check = Scripted()
        yield instance


class Scripted(ClientCheck):
    """The mode's check, made sure to vary each thing once: a busy answer first, then a 202 and a 201 lost."""

    def __init__(self) -> None:
        super().__init__(CALM, seed=11)
        self.owed = {"busy", 202, 201}

    def arrive(self, username: str | None, address: str) -> tuple[int, int] | None:
        self.variation = Variation(busy=float("busy" in self.owed), lost=0.0)
        self.owed.discard("busy")
        return super().arrive(username, address)

    def answered(self, username: str | None, address: str, status: int, error: str | None) -> tuple[int | None, bool]:
        self.variation = Variation(busy=0.0, lost=float(status in self.owed))
        self.owed.discard(status)
        return super().answered(username, address, status, error)


def admin(instance: server.RegistryServer, method: str, path: str) -> tuple[int, object]:
    return call(instance.url, method, path, token=ADMIN_TOKEN)


def approve_when_pending(instance: server.RegistryServer, names: set[str], stop: threading.Event) -> None:
    """The administrator: unlocks (30 s windows) and approves whatever of ``names`` is pending."""
    while not stop.is_set() and names:
        admin(instance, "POST", "/api/client-registry/unlock")
        _, requests = admin(instance, "GET", "/api/client-registry/requests")
        for request in requests:
            if request["state"] == "pending" and request["username"] in names:
                admin(instance, "POST", f"/api/client-registry/requests/{request['username']}/approve")
                names.discard(request["username"])
        stop.wait(0.5)


def test_client_py_comes_out_clean(testing: server.RegistryServer) -> None:
    """Proves CLIENT-9.1-RETRY-AFTER, CLIENT-9.2-SAME-REQUEST, CLIENT-9.4-LOST-ANSWER."""
    url = "http://{}:{}".format(*testing.server_address[:2])
    stop = threading.Event()
    administrator = threading.Thread(
        target=approve_when_pending, args=(testing, {"sensor-0003", "agent-0001"}, stop), daemon=True
    )
    administrator.start()
    try:
        sensor = client.register(url, "sensor-0003", password="s3cret-pass", timeout=60)
        agent = client.register(url, "agent-0001", key=make_key(), timeout=60)
    finally:
        stop.set()
        administrator.join(10)

    assert (sensor.username, agent.username) == ("sensor-0003", "agent-0001")
    status, report = admin(testing, "GET", "/api/client-registry/client-report")
    assert status == 200
    assert report["clean"] is True, report
    assert {entry["username"] for entry in report["clients"]} == {"sensor-0003", "agent-0001"}
    # It met what the mode varies: a busy answer, a lost 202 and a lost 201 (so its 201 came twice).
    assert report["varied"] == {"busy": 1, "lost": 2}


def test_an_impatient_client_is_reported(testing: server.RegistryServer, caplog: pytest.LogCaptureFixture) -> None:
    """Proves CLIENT-9.1-RETRY-AFTER."""
    testing.app.check = ClientCheck(CALM)
    host, port = testing.server_address[:2]
    body = json.dumps({"username": "sensor-0099", "password": "s3cret-pass"})
    answers = []
    for _ in range(3):  # locked: 423 with a Retry-After, and it asks again at once
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("POST", "/api/client-registry/register", body, {"Content-Type": "application/json"})
        answers.append(connection.getresponse().status)
        connection.close()

    assert answers == [423, 423, 423]
    _, report = admin(testing, "GET", "/api/client-registry/client-report")
    [impatient] = report["clients"]
    assert impatient["username"] == "sensor-0099" and impatient["requests"] == 3
    assert [finding["rule"] for finding in impatient["findings"]] == ["CLIENT-9.1-RETRY-AFTER"] * 2
    assert report["clean"] is False
    logged = [record.getMessage() for record in caplog.records if record.name == "registry.clientcheck"]
    assert len(logged) == 2 and all("sensor-0099 at 127.0.0.1 sent again" in line for line in logged)


def test_a_server_that_tests_no_clients_has_no_report(tmp_path: Path) -> None:
    with serve(tmp_path) as instance:
        status, body = admin(instance, "GET", "/api/client-registry/client-report")
    assert (status, body["error"]) == (404, "not_found")
    assert body["message"] == "this server tests no clients: start it with --test-clients"


def test_the_mode_unlocks_for_30_seconds_at_most(tmp_path: Path) -> None:
    with serve(tmp_path, test_clients=True) as instance:
        assert instance.app.core.settings.unlock_duration.total_seconds() == 30


def test_a_deeply_nested_body_is_400_as_without_the_mode(tmp_path: Path) -> None:
    """Issue 23 item 6: under --test-clients too, a body JSON cannot read (RecursionError) is the client's 400."""
    with serve(tmp_path, test_clients=True) as instance:
        instance.app.check = ClientCheck(CALM, seed=1)
        connection = http.client.HTTPConnection(*instance.server_address[:2], timeout=10)
        connection.request("POST", "/api/client-registry/register", b"[" * 50_000, {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()

    assert (response.status, body["error"]) == (400, "malformed_request")

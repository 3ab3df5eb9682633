"""The fast path is transparent: the same commands, with and without it, give the same answers and state.

``fastpath.FastRegistry`` extends the reference ``registry.Registry`` with a
fast path (bodies answered 202 answered again without parsing, passwords and
CSRs remembered once verified, poll counts kept in memory). ``FastPathMachine``
drives the two with the same random sequence of client requests (as parsed
JSON and as wire bytes, new ones and exact repeats), administrator calls and
clock moves. After every command both must have answered alike, and
both must show the same status, requests, users and audit trail.

Two things differ between any two registries and are made comparable:
certificates (a random serial, a randomised signature) come from a CA that
signs nothing and derives each certificate from its inputs; and the pairing
id of a password request comes from its salted hash, so each pairing id is
replaced by the order in which it first appeared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import ca
import fastpath
import registry
from conftest import FAST, START, FakeClock
from test_properties import ACCEPTED_KEYS, CATALOG, HTTP_WRITE, MQTT_READ, csr_for

USERNAMES = ("sensor-0003", "agent.7", "Pump_12")
PASSWORDS = ("correct horse", "battery staple", "no")  # the last breaks the policy: 422
KEYS = ACCEPTED_KEYS[:2]
ROLE_SETS = ((), ("minimum",), ("operator", "minimum"), ("no-such-role",))
PERMISSION_SETS = ((), (MQTT_READ,), (HTTP_WRITE, MQTT_READ))
GRANTS = (None, {}, {"roles": []}, {"roles": ["minimum"]}, {"permissions": [MQTT_READ]}, {"roles": ["nope"]})
AUTHORITY = ca.CA.create(START)
# One CSR text per (username, key): the same text, so that an exact repeat is the same bytes.
CSRS = {(name, index): csr_for(name, key) for name in USERNAMES for index, key in enumerate(KEYS)}


class DerivedCA:
    """The real CA's reading of CSRs; certificates derived from their inputs, so that two registries agree."""

    def __init__(self, authority: ca.CA) -> None:
        self.certificate_pem = authority.certificate_pem
        self.not_after = authority.not_after
        self.inspect_csr = authority.inspect_csr
        self.inspect_public_key = authority.inspect_public_key
        self.issued = 0

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> ca.IssuedCertificate:
        self.issued += 1
        digest = hashlib.sha256(public_key + f"{username} {now.isoformat()} {self.issued}".encode()).hexdigest()
        return ca.IssuedCertificate(
            pem=f"certificate {digest}",
            serial=int(digest[:30], 16),
            not_before=now,
            not_after=now + timedelta(days=365),
            sha256=digest,
        )

    def sign_crl(
        self, revoked: list[tuple[int, datetime, str]], number: int, this_update: datetime, next_update: datetime
    ) -> bytes:
        return repr((revoked, number, this_update, next_update)).encode()


class PairingIds:
    """Each pairing id replaced by the order of its first appearance, throughout a JSON value."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: self.seen.setdefault(item, len(self.seen)) if key == "pairingId" else self(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self(item) for item in value]
        return value


def outcome_of(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a call answered, as data: its result, or its error's kind, status, body and headers."""
    try:
        result = call()
    except registry.RegistryError as error:
        return "refused", (type(error).__name__, error.status, error.body(), error.headers)
    if isinstance(result, registry.Outcome):
        assert result.content == json.dumps(result.body).encode()  # the bytes the server sends
        return "answered", (result.status, result.body, result.headers)
    return "answered", result


class FastPathMachine(RuleBasedStateMachine):
    """Two registries, one fast and one reference, fed the same commands."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.registries = [
            kind(clock=self.clock, ca=DerivedCA(AUTHORITY), roles=CATALOG, settings=FAST)
            for kind in (fastpath.FastRegistry, registry.Registry)
        ]
        self.pairing_ids = [PairingIds(), PairingIds()]
        self.sent: list[bytes] = []
        self.accepted: list[bytes] = []

    @initialize(duration=st.sampled_from([300_000, 86_400_000]))
    def open_the_registry(self, duration: int) -> None:
        """Every run begins with an administrator opening the registry: new requests get in."""
        self.both(lambda instance: instance.unlock({"duration": duration}))

    def teardown(self) -> None:
        for instance in self.registries:
            instance.close()

    def both(self, command: Callable[[registry.Registry], Any]) -> tuple[str, Any]:
        """Run ``command`` on both registries: the same answer, pairing ids by order of appearance; that answer."""
        answers = [
            ids(outcome_of(lambda instance=instance: command(instance)))
            for instance, ids in zip(self.registries, self.pairing_ids, strict=True)
        ]
        note(f"-> {answers[0]}")
        assert answers[0] == answers[1]
        return answers[0]

    # --- Clients ---

    @rule(
        username=st.sampled_from(USERNAMES),
        credential=st.sampled_from([*(("password", p) for p in PASSWORDS), *(("csr", i) for i in range(len(KEYS)))]),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.sampled_from(["line 3", "cabinet 2"]),
        raw=st.sampled_from([True, False]),  # the wire bytes first: the fast path's way in
        address=st.sampled_from(["10.0.0.1", "10.0.0.2"]),
    )
    def register(
        self,
        username: str,
        credential: tuple[str, object],
        roles: tuple[str, ...],
        permissions: tuple[dict[str, str], ...],
        context: str | None,
        raw: bool,
        address: str,
    ) -> None:
        method, value = credential
        payload: dict[str, Any] = {"username": username}
        payload["password" if method == "password" else "csr"] = (
            value if method == "password" else CSRS[username, value]
        )
        if roles:
            payload["roles"] = list(roles)
        if permissions:
            payload["permissions"] = list(permissions)
        if context is not None:
            payload["context"] = context
        if raw:
            body = json.dumps(payload).encode()
            kind, answer = self.both(lambda instance: instance.register_body(body, address))
            # Bodies answered 202 are what the fast path remembers: repeats go mostly to them.
            self.sent.append(body)
            if kind == "answered" and answer[0] == 202:
                self.accepted.append(body)
        else:
            self.both(lambda instance: instance.register(payload, address))

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), times=st.integers(1, 3), address=st.sampled_from(["10.0.0.1", "10.0.0.3"]))
    def repeat_a_body(self, data: st.DataObject, times: int, address: str) -> None:
        """The exact bytes of an earlier request: what the fast path answers without parsing."""
        remembered = self.accepted and data.draw(st.integers(0, 3), label="a remembered one") > 0
        body = data.draw(st.sampled_from(self.accepted if remembered else self.sent), label="body")
        for _ in range(times):
            self.both(lambda instance: instance.register_body(body, address))

    @rule(body=st.sampled_from([b"{", b"[]", b'{"username": "sensor-0003"}', b"null"]))
    def send_a_malformed_body(self, body: bytes) -> None:
        self.both(lambda instance: instance.register_body(body))

    @rule(username=st.sampled_from(USERNAMES), password=st.sampled_from(PASSWORDS))
    def sign_in(self, username: str, password: str) -> None:
        self.both(lambda instance: instance.authenticate_password(username, password))

    # --- The administrator and the clock ---

    @rule(duration=st.none() | st.sampled_from([1_000, 60_000, 300_000, 86_400_000]))
    def unlock(self, duration: int | None) -> None:
        self.both(lambda instance: instance.unlock(None if duration is None else {"duration": duration}))

    @rule()
    def lock(self) -> None:
        self.both(lambda instance: instance.lock())

    @rule(seconds=st.sampled_from([0.4, 1, 2, 61, 299, 301, 3_600, 86_401]))
    def advance_the_clock(self, seconds: float) -> None:
        self.clock.advance(seconds=seconds)

    @rule(username=st.sampled_from(USERNAMES), grant=st.sampled_from(GRANTS))
    def approve(self, username: str, grant: dict[str, Any] | None) -> None:
        self.both(lambda instance: instance.approve(username, grant))

    @rule(username=st.sampled_from(USERNAMES), reason=st.none() | st.just("not ours"))
    def deny(self, username: str, reason: str | None) -> None:
        self.both(lambda instance: instance.deny(username, None if reason is None else {"reason": reason}))

    @rule(username=st.sampled_from(USERNAMES))
    def forget(self, username: str) -> None:
        self.both(lambda instance: instance.forget(username))

    @rule(username=st.sampled_from(USERNAMES))
    def remove_user(self, username: str) -> None:
        self.both(lambda instance: instance.remove_user(username))

    # --- After every step ---

    @invariant()
    def both_store_the_same(self) -> None:
        self.both(lambda instance: (instance.status(), instance.requests(), instance.users(), instance.audit(1000)))


# More examples than the CI profile's 40: a run reaches the remembered polls only after an unlock, a
# registration as bytes answered 202 and a repeat of those bytes; 150 runs (about 5 s) make about a hundred.
FastPathMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestFastPathMachine = FastPathMachine.TestCase


def test_the_machine_catches_a_fast_path_that_answers_from_memory_alone(monkeypatch) -> None:
    """The comparison has teeth: a poll cache that never looks at the store, nor counts the poll, is caught."""

    def from_memory(self: fastpath.FastRegistry, fingerprint: bytes, address: str) -> registry.Outcome | None:
        seen = self._repeated.get(fingerprint)
        return None if seen is None else seen.outcome

    monkeypatch.setattr(fastpath.FastRegistry, "_repeated_poll", from_memory)

    with pytest.raises(AssertionError):
        run_state_machine_as_test(FastPathMachine, settings=settings(max_examples=200, stateful_step_count=40))

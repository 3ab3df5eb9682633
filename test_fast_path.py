"""The fast path is transparent: the same commands, with and without it, give the same answers and state.

``fastpath.FastRegistry`` extends the reference ``registry.Registry`` with a
fast path (bodies answered 202 answered again without parsing, passwords and
CSRs remembered once verified, poll counts kept in memory). ``FastPathMachine``
drives the two with the same random sequence of client requests (as parsed
JSON and as wire bytes, new ones and exact repeats), administrator calls and
clock moves. After every command both must have answered alike, and
both must show the same status, requests, users and audit trail. The
commands include right and wrong passwords from several addresses (by
registration and by whoami, so that the sign-in throttle comes into play),
renewals, re-keys, repeated and refused renewals from any certificate a
client was given, whoami with a certificate, and restarts on the same
database files (what is in memory, the fast path's and the throttle's, is
gone).

Two things differ between any two registries and are made comparable:
certificates (a random serial, a randomised signature) come from a CA that
signs nothing and derives each certificate from its inputs, as bytes that
stand for its DER (the registry finds a presented certificate by the SHA-256
of its DER); and the pairing id of a password request comes from its salted
hash, so each pairing id is replaced by the order in which it first
appeared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import Phase, event, note, settings
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
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
# Small throttle limits, so that a run crosses them; the rules are the same at 5 and 50.
THROTTLED = dataclasses.replace(FAST, max_auth_failures=2, max_auth_failures_per_username=3)
ROLE_SETS = ((), ("minimum",), ("operator", "minimum"), ("no-such-role",))
PERMISSION_SETS = ((), (MQTT_READ,), (HTTP_WRITE, MQTT_READ))
GRANTS = (None, {}, {"roles": []}, {"roles": ["minimum"]}, {"permissions": [MQTT_READ]}, {"roles": ["nope"]})
AUTHORITY = ca.CA.create(START)
# One CSR text per (username, key): the same text, so that an exact repeat is the same bytes.
CSRS = {(name, index): csr_for(name, key) for name in USERNAMES for index, key in enumerate(KEYS)}


class DerivedCA:
    """The real CA's reading of CSRs; certificates derived from their inputs, so that two registries agree.

    A certificate's "DER" is the bytes of its inputs, and its "PEM" those
    bytes in hex: ``der_of`` gives back what a client presents, whose
    SHA-256 is the one the registry recorded.
    """

    def __init__(self, authority: ca.CA) -> None:
        self.certificate_pem = authority.certificate_pem
        self.not_after = authority.not_after
        self.inspect_csr = authority.inspect_csr
        self.inspect_public_key = authority.inspect_public_key
        self.issued = 0

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> ca.IssuedCertificate:
        self.issued += 1
        der = f"{username} {now.isoformat()} {self.issued} ".encode() + public_key
        digest = hashlib.sha256(der).hexdigest()
        return ca.IssuedCertificate(
            pem=f"certificate {der.hex()}",
            serial=int(digest[:30], 16),
            not_before=now,
            not_after=min(now + timedelta(days=365), self.not_after),
            sha256=digest,
        )

    def sign_crl(
        self, revoked: list[tuple[int, datetime, str]], number: int, this_update: datetime, next_update: datetime
    ) -> bytes:
        return repr((revoked, number, this_update, next_update)).encode()


def der_of(pem: str) -> bytes:
    """What a client presents of a ``DerivedCA`` certificate: the bytes whose SHA-256 the registry recorded."""
    return bytes.fromhex(pem.removeprefix("certificate "))


def certificates_in(value: Any) -> Iterator[tuple[str, str]]:
    """The (username, certificate) pairs of every answer body within a JSON value."""
    if isinstance(value, dict):
        if "certificate" in value and "username" in value:
            yield value["username"], value["certificate"]
        for item in value.values():
            yield from certificates_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from certificates_in(item)


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
    """Two registries, one fast and one reference, fed the same commands.

    Proves that the fast path keeps AUTH-5.2-THROTTLE, REG-2.4-THROTTLE,
    AUTH-5.2-KNOWN-ADDRESS, LIFE-7.2-RENEW and LIFE-7.3-REVOKE as the
    reference path does, restarts included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.folder = tempfile.mkdtemp(prefix="fast-path-machine-")
        self.authorities = [DerivedCA(AUTHORITY), DerivedCA(AUTHORITY)]
        self.registries = [self.open(index) for index in range(2)]
        self.pairing_ids = [PairingIds(), PairingIds()]
        self.sent: list[bytes] = []
        self.accepted: list[bytes] = []
        # Every certificate a client was given (username, PEM), in order; and the last renewal that issued one
        # for each username: the certificate presented, and the key of the new one.
        self.certificates: list[tuple[str, str]] = []
        self.renewed: dict[str, tuple[str, int]] = {}
        self.password_users: list[str] = []  # those admitted with a password

    def open(self, index: int) -> registry.Registry:
        """The fast registry (0) or the reference one (1), on its own database file."""
        kind = (fastpath.FastRegistry, registry.Registry)[index]
        return kind(
            f"{self.folder}/registry-{index}.db",
            clock=self.clock,
            ca=self.authorities[index],
            roles=CATALOG,
            settings=THROTTLED,
        )

    @initialize(duration=st.sampled_from([300_000, 86_400_000]))
    def open_the_registry(self, duration: int) -> None:
        """Every run begins with an administrator opening the registry: new requests get in."""
        self.both(lambda instance: instance.unlock({"duration": duration}))

    @initialize(
        admitted=st.lists(
            st.tuples(
                st.sampled_from(USERNAMES),
                st.sampled_from([("password", PASSWORDS[0]), ("password", PASSWORDS[1]), ("csr", 0), ("csr", 1)]),
                st.sampled_from(ADDRESSES),
            ),
            min_size=1,
            max_size=2,
            unique_by=lambda admission: admission[0],
        )
    )
    def admit(self, admitted: list[tuple[str, tuple[str, object], str]]) -> None:
        """Every run begins with a user or two admitted and their 201 fetched: passwords to guess, certificates to
        renew."""
        for username, credential, address in admitted:
            self.admit_one(username, credential, address)

    def admit_one(self, username: str, credential: tuple[str, object], address: str) -> None:
        method, value = credential
        if method == "password":
            self.password_users.append(username)
        payload = {"username": username, method: value if method == "password" else CSRS[username, value]}
        self.both(lambda instance: instance.unlock({"duration": 60_000}))
        self.both(lambda instance: instance.register(payload, address), "an admission")
        self.both(lambda instance: instance.approve(username))
        self.both(lambda instance: instance.register(payload, address), "an admission")

    def teardown(self) -> None:
        for instance in self.registries:
            instance.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def both(self, command: Callable[[registry.Registry], Any], what: str = "") -> tuple[str, Any]:
        """Run ``command`` on both registries: the same answer, pairing ids by order of appearance; that answer."""
        answers = [
            ids(outcome_of(lambda instance=instance: command(instance)))
            for instance, ids in zip(self.registries, self.pairing_ids, strict=True)
        ]
        note(f"-> {answers[0]}")
        assert answers[0] == answers[1]
        kind, value = answers[0]
        if what:
            event(f"{what}: {value[1] if kind == 'refused' else value[0] if isinstance(value, list) else 'answered'}")
        for given in certificates_in(answers[0]):
            if given not in self.certificates:
                self.certificates.append(given)
        return answers[0]

    # --- Clients ---

    @rule(
        username=st.sampled_from(USERNAMES),
        credential=st.sampled_from([*(("password", p) for p in PASSWORDS), *(("csr", i) for i in range(len(KEYS)))]),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.sampled_from(["line 3", "cabinet 2"]),
        raw=st.sampled_from([True, False]),  # the wire bytes first: the fast path's way in
        address=st.sampled_from(ADDRESSES),
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
            kind, answer = self.both(lambda instance: instance.register_body(body, address), "a registration")
            # Bodies answered 202 are what the fast path remembers: repeats go mostly to them.
            self.sent.append(body)
            if kind == "answered" and answer[0] == 202:
                self.accepted.append(body)
        else:
            self.both(lambda instance: instance.register(payload, address), "a registration")

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), times=st.integers(1, 3), address=st.sampled_from(["10.0.0.1", "10.0.0.3"]))
    def repeat_a_body(self, data: st.DataObject, times: int, address: str) -> None:
        """The exact bytes of an earlier request: what the fast path answers without parsing."""
        remembered = self.accepted and data.draw(st.integers(0, 3), label="a remembered one") > 0
        body = data.draw(st.sampled_from(self.accepted if remembered else self.sent), label="body")
        for _ in range(times):
            self.both(lambda instance: instance.register_body(body, address), "a repeated body")

    @rule(body=st.sampled_from([b"{", b"[]", b'{"username": "sensor-0003"}', b"null"]))
    def send_a_malformed_body(self, body: bytes) -> None:
        self.both(lambda instance: instance.register_body(body))

    @rule(username=st.sampled_from(USERNAMES), password=st.sampled_from(PASSWORDS), address=st.sampled_from(ADDRESSES))
    def sign_in(self, username: str, password: str, address: str) -> None:
        self.both(lambda instance: instance.authenticate_password(username, password, address), "a sign-in")

    @rule(
        data=st.data(),
        via=st.sampled_from(["whoami", "registration"]),
        address=st.sampled_from(ADDRESSES),
        times=st.integers(1, 4),
    )
    def guess(self, data: st.DataObject, via: str, address: str, times: int) -> None:
        """Wrong passwords in a row from one address, mostly for a user admitted with a password: the throttle's
        limits come into play (AUTH-5.2-THROTTLE, REG-2.4-THROTTLE)."""
        choices = self.password_users if self.password_users and data.draw(st.integers(0, 3)) else USERNAMES
        username = data.draw(st.sampled_from(choices), label="username")
        payload = {"username": username, "password": "a guess"}
        for _ in range(times):
            if via == "whoami":
                self.both(lambda instance: instance.authenticate_password(username, "a guess", address), "a guess")
            else:
                self.both(lambda instance: instance.register(payload, address), "a guessed registration")

    # --- The certificate's life ---

    def renew_from(self, username: str, pem: str, key: int, name: str, address: str) -> None:
        """Renew from ``pem`` with the CSR of ``name`` for ``key``; a new certificate is remembered as a renewal."""
        given = len(self.certificates)
        self.both(lambda instance: instance.renew(der_of(pem), {"csr": CSRS[name, key]}, address=address), "a renewal")
        if len(self.certificates) > given:
            self.renewed[username] = (pem, key)

    @precondition(lambda self: self.certificates)
    @rule(
        data=st.data(),
        key=st.sampled_from(range(len(KEYS))),
        own_name=st.sampled_from([True, True, True, False]),
        address=st.sampled_from(ADDRESSES),
    )
    def renew(self, data: st.DataObject, key: int, own_name: bool, address: str) -> None:
        """Renew (or re-key) from any certificate a client was given: the latest mostly, an older one sometimes."""
        latest = data.draw(st.booleans(), label="the latest of its user")
        username, pem = data.draw(st.sampled_from(self.certificates), label="certificate")
        if latest:
            pem = [given for name, given in self.certificates if name == username][-1]
        name = username if own_name else next(other for other in USERNAMES if other != username)
        self.renew_from(username, pem, key, name, address)

    @precondition(lambda self: self.renewed)
    @rule(data=st.data(), address=st.sampled_from(ADDRESSES))
    def repeat_a_renewal(self, data: st.DataObject, address: str) -> None:
        """The last renewal of a username again: a lost answer fetched again, if nothing came between."""
        username = data.draw(st.sampled_from(sorted(self.renewed)), label="username")
        pem, key = self.renewed[username]
        self.renew_from(username, pem, key, username, address)

    @precondition(lambda self: self.certificates)
    @rule(data=st.data())
    def whoami_with_a_certificate(self, data: st.DataObject) -> None:
        _, pem = data.draw(st.sampled_from(self.certificates), label="certificate")
        self.both(lambda instance: instance.authenticate_certificate(der_of(pem)))

    @rule()
    def restart(self) -> None:
        """Both registries closed and opened again on their database files: memory, fast path and throttle, gone."""
        for instance in self.registries:
            instance.close()
        self.registries = [self.open(index) for index in range(2)]

    # --- The administrator and the clock ---

    @rule(duration=st.none() | st.sampled_from([1_000, 60_000, 300_000, 86_400_000]))
    def unlock(self, duration: int | None) -> None:
        self.both(lambda instance: instance.unlock(None if duration is None else {"duration": duration}))

    @rule()
    def lock(self) -> None:
        self.both(lambda instance: instance.lock())

    @rule(seconds=st.sampled_from([0.4, 1, 2, 61, 299, 301, 3_600, 86_401, 365 * 86_400]))
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


# The machine with a defect put in must fail; it need not shrink the failure it finds.
CATCHING = settings(max_examples=200, stateful_step_count=40, phases=(Phase.generate,))


def test_the_machine_catches_a_fast_path_that_answers_from_memory_alone(monkeypatch) -> None:
    """The comparison has teeth: a poll cache that never looks at the store, nor counts the poll, is caught."""

    def from_memory(self: fastpath.FastRegistry, fingerprint: bytes, address: str) -> registry.Outcome | None:
        seen = self._repeated.get(fingerprint)
        return None if seen is None else seen.outcome

    monkeypatch.setattr(fastpath.FastRegistry, "_repeated_poll", from_memory)

    with pytest.raises(AssertionError):
        run_state_machine_as_test(FastPathMachine, settings=CATCHING)


def test_the_machine_catches_a_fast_path_that_rejects_a_wrong_password_from_memory(monkeypatch) -> None:
    """The comparison has teeth for the throttle: a fast path that rejects a password other than the remembered
    one by its HMAC alone, as ``PasswordVerifier.check`` once did, is caught, since the throttle never counts those
    failures there while the reference path answers 429 (REG-2.4-THROTTLE, AUTH-5.2-THROTTLE)."""
    reference = registry.Registry._answer

    def from_memory(
        self: registry.Registry, registration: registry.Registration, csr: registry.CsrInfo | None, address: str
    ) -> registry.Outcome:
        if isinstance(self, fastpath.FastRegistry) and registration.password is not None:
            now = self._now()
            with self._lock:
                stored = self._password_to_verify(registration, now)
                remembered = stored is not None and stored in self._passwords._known
                if remembered and not self._passwords.remembered(registration.password, stored):
                    decision, row = self._decide(registration, csr, address, now, password_matches=False)
                    return self._act(decision, registration, csr, row, address, now, None)
        return reference(self, registration, csr, address)

    monkeypatch.setattr(registry.Registry, "_answer", from_memory)

    with pytest.raises(AssertionError):
        run_state_machine_as_test(FastPathMachine, settings=CATCHING)


def test_poll_counts_wait_in_memory_a_second_at_most(tmp_path) -> None:
    """Proves ADMIN-4.7-POLL-STATS: a poll writes nothing to disk; its count goes with a write within a second."""
    clock, database = FakeClock(), tmp_path / "registry.db"
    fast = fastpath.FastRegistry(str(database), clock=clock, roles=CATALOG, settings=FAST)
    fast.unlock()
    body = json.dumps({"username": "sensor-0003", "password": "correct horse"}).encode()

    def on_disk() -> int:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return db.execute("SELECT poll_count FROM requests").fetchone()[0]

    assert fast.register_body(body).status == 202  # stored
    assert fast.register_body(body).status == 202  # a poll, counted in memory
    assert on_disk() == 0
    clock.advance(seconds=1)
    assert fast.register_body(body).status == 202  # a second on: both counts are written with this poll
    assert on_disk() == 2
    assert fast.requests()[0]["pollCount"] == 2
    fast.close()

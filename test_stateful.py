"""The stateful model of the whole contract: ``RegistryMachine``.

It keeps a plain-dict model of the contract (the lock window, the stored
requests, the users, the certificates each user was given and the failed
sign-ins), drives a real registry with client requests from
several addresses, sign-ins, renewals, administrator calls, restarts and a
fake clock, and checks every answer and the registry's whole visible state
against the model after every step. It runs twice: on the fast path
(``fastpath.FastRegistry``) and on the reference (``registry.Registry``).

Where SPEC is silent the model follows the registry's documented reading
(docs/design.md): an approval body's field left out stays as requested, and
a denied request's retention starts at the denial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ca
import fastpath
import registry
from conftest import FAST, START, FakeClock, assert_issued_from
from test_properties import (
    ACCEPTED_KEYS,
    CATALOG,
    DEFAULT_UNLOCK,
    GOOD_PASSWORD,
    HTTP_WRITE,
    MQTT_READ,
    OTHER_PASSWORD,
    RETENTION,
    Key,
    Payload,
    Rights,
    answer,
    assert_error_body,
    csr_for,
    granted_by,
    rights_of,
    snapshot,
)

# --- The stateful model ----------------------------------------------------

Credential = tuple[str, object]  # ("password", the password) or ("csr", an index into MACHINE_KEYS)
USERNAMES = ("sensor-0003", "agent.7", "Pump_12")
PASSWORDS = (GOOD_PASSWORD, OTHER_PASSWORD)
MACHINE_KEYS = (ACCEPTED_KEYS[0], ACCEPTED_KEYS[3], ACCEPTED_KEYS[1])
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
addresses = st.sampled_from(ADDRESSES)
ROLE_SETS = ((), ("minimum",), ("operator", "minimum"))
PERMISSION_SETS = ((), (MQTT_READ,), (HTTP_WRITE, MQTT_READ))
GRANTS = (None, {}, {"roles": [], "permissions": []}, {"roles": ["minimum"]}, {"permissions": [MQTT_READ]})

CREDENTIALS = [("password", password) for password in PASSWORDS] + [("csr", key) for key in range(len(MACHINE_KEYS))]
durations = st.one_of(
    st.none(),
    st.sampled_from([1, 1_000, 299_999, 300_000, 300_001, 3_600_000, 86_400_000]),
    st.integers(1, 86_400_000),
)
steps = st.one_of(
    st.integers(1, 120),
    st.sampled_from([299, 300, 301, 86_399, 86_400, 86_401]),
    st.integers(1, 30).map(lambda hours: hours * 3600),
)


def pairing_id_of(key: Key) -> str:
    """The first six hex digits of the SHA-256 of the key's SubjectPublicKeyInfo."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:6]


def payload_of(username: str, credential: Credential, rights: Rights, context: str | None) -> Payload:
    """The JSON request a client with these wishes sends; empty rights are left out."""
    roles, permissions = rights
    payload: Payload = {"username": username}
    method, value = credential
    if method == "password":
        payload["password"] = value
    else:
        payload["csr"] = csr_for(username, MACHINE_KEYS[value])
    if roles:
        payload["roles"] = sorted(roles)
    if permissions:
        payload["permissions"] = [dict(zip(("resource", "operation", "context"), p, strict=True)) for p in permissions]
    if context is not None:
        payload["context"] = context
    return payload


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up: a Retry-After that is never early."""
    return -((now - moment) // timedelta(seconds=1))


def der_of(pem: str) -> bytes:
    """A certificate's DER, as mutual TLS presents it."""
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def serial_of(pem: str) -> str:
    """A certificate's serial as the registry lists it: lower-case hex."""
    return format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x")


class RegistryMachine(RuleBasedStateMachine):
    """SPEC sections 2 to 7 as a plain-dict model, checked against the real registry after every step.

    ``self.model`` holds what SPEC says the registry knows:
    ``unlocked_until`` (a datetime, or None when never unlocked or locked),
    ``requests`` (username -> state, credential, rights, reason, and the
    time its retention started, its pairing id, the payload first sent, its
    creation and last poll, its poll count), ``users`` (username -> granted
    rights), ``certificates`` (serial -> username, key, notAfter, whether
    revoked, the serial it replaced, and its PEM once the client was given
    it), ``current`` (username -> the serial of its current certificate),
    and, in memory only, ``failures`` (username -> the address and time of
    each failed sign-in) and ``known`` ((username, address) -> the last
    successful sign-in from there). Pending requests are forgotten 24 hours
    after they were made, denied ones 24 hours after the denial.

    Proves, besides sections 2 to 4, AUTH-5.2-THROTTLE, REG-2.4-THROTTLE,
    AUTH-5.2-KNOWN-ADDRESS, AUTH-5.2-WHOAMI, LIFE-7.1-TIMES, LIFE-7.2-RENEW,
    LIFE-7.3-REVOKE and STORE-6.2-DURABLE (a restart keeps what is stored).
    """

    # Small limits, so that a run of thirty steps crosses them; the rules are the same at 5 and 50.
    registry_settings = dataclasses.replace(FAST, max_auth_failures=2, max_auth_failures_per_username=3)
    registry_kind: type[registry.Registry] = fastpath.FastRegistry

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.authority = ca.CA.create(START)
        self.folder = tempfile.mkdtemp(prefix="registry-machine-")
        self.registry = self.open()
        self.model: dict[str, Any] = {
            "unlocked_until": None,
            "requests": {},
            "users": {},
            "certificates": {},
            "current": {},
            "failures": {},
            "known": {},
        }
        # SPEC 3: the registry starts locked.
        self.check_status(self.registry.status())

    def open(self) -> registry.Registry:
        """A registry on the machine's database file."""
        return self.registry_kind(
            f"{self.folder}/registry.db",
            clock=self.clock,
            ca=self.authority,
            roles=CATALOG,
            settings=self.registry_settings,
        )

    @initialize(duration=st.sampled_from([None, 300_000, 3_600_000, 86_400_000]))
    def start(self, duration: int | None) -> None:
        """Most runs begin with an administrator opening the registry, for a while or for long."""
        if duration is not None:
            self.unlock(duration)

    @initialize(
        admitted=st.lists(
            st.tuples(st.sampled_from(USERNAMES), st.sampled_from(CREDENTIALS), addresses),
            max_size=2,
            unique_by=lambda admission: admission[0],
        )
    )
    def admit(self, admitted: list[tuple[str, Credential, str]]) -> None:
        """Some runs begin with users admitted and their 201 fetched: passwords to guess, certificates to renew."""
        was_locked = self.locked
        if admitted and was_locked:
            self.unlock(None)
        for username, credential, address in admitted:
            self.register(username, credential, (frozenset(), frozenset()), None, raw=False, address=address)
            self.approve_now(username, None)
            self.register(username, credential, (frozenset(), frozenset()), None, raw=False, address=address)
        if admitted and was_locked:
            self.lock()

    def teardown(self) -> None:
        self.registry.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- The model's view of time ------------------------------------------

    @property
    def locked(self) -> bool:
        until = self.model["unlocked_until"]
        return until is None or self.clock.now >= until

    def expire(self) -> None:
        """Forget what SPEC's retention period has run out on."""
        requests = self.model["requests"]
        for username, stored in list(requests.items()):
            if stored["state"] != "approved" and self.clock.now >= stored["since"] + RETENTION:
                event(f"a {stored['state']} request forgotten after the retention period")
                del requests[username]

    # --- The sign-in throttle (AUTH-5.2) ------------------------------------

    def is_known(self, username: str, address: str) -> bool:
        """AUTH-5.2-KNOWN-ADDRESS: the username signed in from ``address`` within the known-address period."""
        since = self.model["known"].get((username, address))
        return since is not None and self.clock.now < since + self.registry_settings.known_address_period

    def throttle_wait(self, username: str, address: str) -> int | None:
        """AUTH-5.2-THROTTLE: the seconds until a sign-in for ``username`` from ``address`` is let through; None: now.

        The failures within the window count, from ``address`` against the
        per-address limit and, unless the address is known, from all
        addresses against the per-username one; the attempt waits until
        every limit it is over lets it through.
        """
        settings, now = self.registry_settings, self.clock.now
        window = settings.auth_failure_window
        failures = [(where, at) for where, at in self.model["failures"].get(username, []) if at > now - window]
        limits = [([at for where, at in failures if where == address], settings.max_auth_failures)]
        if not self.is_known(username, address):
            limits.append(([at for _, at in failures], settings.max_auth_failures_per_username))
        ends = [sorted(times)[-most] + window for times, most in limits if len(times) >= most]
        return seconds_until(max(ends), now) if ends else None

    def fail(self, username: str, address: str) -> None:
        event("a failed sign-in")
        self.model["failures"].setdefault(username, []).append((address, self.clock.now))

    def signed_in(self, username: str, address: str) -> None:
        self.model["known"][username, address] = self.clock.now

    def check_throttled(self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str], wait: int) -> None:
        """A 429 that says how long to wait."""
        event("a sign-in throttled")
        assert status == HTTPStatus.TOO_MANY_REQUESTS
        assert_error_body(body, "too_many_requests")
        assert headers["Retry-After"] == str(wait)

    # --- The client --------------------------------------------------------

    def send(
        self, username: str, credential: Credential, rights: Rights, payload: Payload, *, raw: bool, address: str
    ) -> None:
        """Send a request, parsed or as the server's raw body, and check the answer against SPEC 2.4."""
        self.expire()
        status, body, headers = answer(self.registry, json.dumps(payload).encode() if raw else payload, address)
        note(f"{username} {credential} from {address} -> {status} {body.get('error', body.get('status'))}")
        stored = self.model["requests"].get(username)
        event(f"a request for a {stored['state'] if stored else 'new'} username: {status.value}")
        if stored is None:
            self.check_new(username, credential, rights, payload, status, body, headers)
            return
        if credential[0] == "password" and stored["credential"][0] == "password":
            # REG-2.4-THROTTLE: a password for a stored password passes the throttle first.
            wait = self.throttle_wait(username, address)
            if wait is not None:
                self.check_throttled(status, body, headers, wait)
                return
            if credential != stored["credential"]:
                self.fail(username, address)
        matches = stored["credential"] == credential and stored["rights"] == rights
        if stored["state"] == "approved":
            if matches:
                self.check_approved(username, payload, status, body)
                self.signed_in(username, address)
            else:
                assert status == HTTPStatus.CONFLICT
                assert_error_body(body, "username_taken")
        elif stored["state"] == "pending":
            if matches:
                self.check_pending(username, status, body, headers, stored["pairingId"])
                stored.update(polls=stored["polls"] + 1, lastPoll=self.clock.now)
            else:
                assert status == HTTPStatus.CONFLICT
                assert_error_body(body, "duplicate_request")
        elif matches:
            assert status == HTTPStatus.FORBIDDEN
            assert_error_body(body, "denied")
            assert body["reason"] == stored["reason"]
            stored.update(polls=stored["polls"] + 1, lastPoll=self.clock.now)  # ADMIN-4.7-POLL-STATS: it was told
        else:
            assert status == HTTPStatus.CONFLICT
            assert_error_body(body)

    def check_new(
        self,
        username: str,
        credential: Credential,
        rights: Rights,
        payload: Payload,
        status: HTTPStatus,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> None:
        """A request for a username with nothing stored: 423 while locked, else stored as pending."""
        if self.locked:
            assert status == HTTPStatus.LOCKED
            assert_error_body(body, "locked")
            assert headers["Retry-After"] == "30"
            return
        method, value = credential
        # README: a CSR request's pairing id begins the SHA-256 of its key,
        # which the client can compute on its own.
        self.check_pending(
            username, status, body, headers, pairing_id_of(MACHINE_KEYS[value]) if method == "csr" else None
        )
        self.model["requests"][username] = {
            "state": "pending",
            "credential": credential,
            "rights": rights,
            "reason": None,
            "since": self.clock.now,
            "pairingId": body["pairingId"],
            "payload": payload,
            "created": self.clock.now,
            "polls": 0,
            "lastPoll": self.clock.now,
        }

    def check_pending(
        self, username: str, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str], pairing_id: str | None
    ) -> None:
        """A 202 that names the request; a poll names it by the pairing id it was first given."""
        assert status == HTTPStatus.ACCEPTED
        assert set(body) == {"status", "username", "pairingId"}
        assert body["status"] == "pending" and body["username"] == username
        assert re.fullmatch(r"[0-9a-f]{6}", body["pairingId"])
        if pairing_id is not None:
            assert body["pairingId"] == pairing_id
        assert headers["Retry-After"] == "5"

    def check_approved(self, username: str, payload: Payload, status: HTTPStatus, body: dict[str, Any]) -> None:
        """A 201 with what was granted and, for a CSR, the user's current certificate every time."""
        assert status == HTTPStatus.CREATED
        assert body["status"] == "approved" and body["username"] == username
        assert rights_of(body["roles"], body["permissions"]) == self.model["users"][username]
        if "csr" not in payload:
            assert "certificate" not in body
            return
        assert_issued_from(payload["csr"], body["certificate"], self.authority)
        self.check_current_certificate(username, body)

    def check_current_certificate(self, username: str, body: dict[str, Any]) -> None:
        """The answer carries ``username``'s current certificate, with its CA and notAfter (LIFE-7.1-TIMES)."""
        certificate = self.model["certificates"][self.model["current"][username]]
        if certificate["pem"] is None:  # the client is given it now, for the first time
            assert serial_of(body["certificate"]) == self.model["current"][username]
            certificate["pem"] = body["certificate"]
        assert body["certificate"] == certificate["pem"]
        assert body["caCertificate"] == self.authority.certificate_pem
        assert datetime.fromisoformat(body["notAfter"]) == certificate["notAfter"]

    def not_after(self) -> datetime:
        """LIFE-7.1-TIMES: a certificate signed now ends a validity after its notBefore, and never after its CA."""
        not_before = self.clock.now.replace(microsecond=0) - ca.CLOCK_SKEW
        return min(not_before + self.authority.validity, self.authority.not_after)

    @rule(
        username=st.sampled_from(USERNAMES),
        password=st.sampled_from(PASSWORDS),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.text(max_size=20),
        raw=st.booleans(),
        address=addresses,
    )
    def register_with_a_password(
        self,
        username: str,
        password: str,
        roles: tuple,
        permissions: tuple,
        context: str | None,
        raw: bool,
        address: str,
    ) -> None:
        rights = rights_of(list(roles), list(permissions))
        self.register(username, ("password", password), rights, context, raw=raw, address=address)

    @rule(
        username=st.sampled_from(USERNAMES),
        key=st.sampled_from(range(len(MACHINE_KEYS))),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.text(max_size=20),
        raw=st.booleans(),
        address=addresses,
    )
    def register_with_a_csr(
        self,
        username: str,
        key: int,
        roles: tuple,
        permissions: tuple,
        context: str | None,
        raw: bool,
        address: str,
    ) -> None:
        self.register(
            username, ("csr", key), rights_of(list(roles), list(permissions)), context, raw=raw, address=address
        )

    def register(
        self, username: str, credential: Credential, rights: Rights, context: str | None, *, raw: bool, address: str
    ) -> None:
        payload = payload_of(username, credential, rights, context)
        self.send(username, credential, rights, payload, raw=raw, address=address)

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), raw=st.booleans(), times=st.integers(1, 3), fresh=st.booleans(), address=addresses)
    def poll(self, data: st.DataObject, raw: bool, times: int, fresh: bool, address: str) -> None:
        """Re-send a stored request (it may have been forgotten since), parsed or as the server's raw body.

        Exactly as it was sent, or with a fresh CSR for the same key, another
        context, and its rights in another order with a repeat: SPEC 2.4
        matches the key, not the CSR's text, leaves the context out, and
        (README) compares rights as sets.
        """
        username = data.draw(st.sampled_from(sorted(self.model["requests"])), label="username")
        stored = self.model["requests"][username]
        payload = stored["payload"]
        if fresh:
            context = data.draw(st.none() | st.text(max_size=20), label="context")
            payload = payload_of(username, stored["credential"], stored["rights"], context)
            for field in ("roles", "permissions"):
                if field in payload:
                    repeated = [*payload[field], payload[field][0]]
                    payload[field] = data.draw(st.permutations(repeated), label=field)
        for _ in range(times):
            self.send(username, stored["credential"], stored["rights"], payload, raw=raw, address=address)

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), address=addresses)
    def register_with_another_credential(self, data: st.DataObject, address: str) -> None:
        username = data.draw(st.sampled_from(sorted(self.model["requests"])), label="username")
        stored = self.model["requests"][username]
        others = [credential for credential in CREDENTIALS if credential != stored["credential"]]
        credential = data.draw(st.sampled_from(others), label="credential")
        self.register(username, credential, stored["rights"], None, raw=False, address=address)

    @rule(username=st.sampled_from(USERNAMES), password=st.sampled_from(PASSWORDS), address=addresses)
    def sign_in(self, username: str, password: str, address: str) -> None:
        """Whoami with a username and password (AUTH-5.2-WHOAMI): the throttle first, then the password."""
        wait = self.throttle_wait(username, address)
        identity, status, body, headers = None, HTTPStatus.OK, {}, {}
        try:
            identity = self.registry.authenticate_password(username, password, address)
        except registry.RegistryError as error:
            status, body, headers = error.status, error.body(), error.headers
        note(f"whoami {username} from {address} -> {identity or status}")
        if wait is not None:
            self.check_throttled(status, body, headers, wait)
            return
        stored = self.model["requests"].get(username)
        has_password = username in self.model["users"] and stored["credential"][0] == "password"
        if has_password and stored["credential"] == ("password", password):
            assert identity is not None and identity.username == username and identity.method == "password"
            assert rights_of(**identity.rights.to_json()) == self.model["users"][username]
            self.signed_in(username, address)
            return
        assert identity is None and status == HTTPStatus.UNAUTHORIZED
        assert_error_body(body, "unauthorized")
        assert headers["WWW-Authenticate"].startswith("Basic")
        # A wrong password fails, and so does any for an unknown username or one without a password, so that
        # a 429 tells no username apart (AUTH-5.2-THROTTLE).
        self.fail(username, address)

    # --- The certificate's life (SPEC section 7) ----------------------------

    def standing(self, serial: str) -> str:
        """LIFE-7.2-RENEW, LIFE-7.3-REVOKE: how a certificate the client was given stands now."""
        certificate = self.model["certificates"][serial]
        if certificate["revoked"]:
            return "revoked"
        if self.clock.now >= certificate["notAfter"]:
            return "expired"
        if certificate["username"] not in self.model["users"]:
            return "of no user"
        return "current" if self.model["current"][certificate["username"]] == serial else "superseded"

    def given(self, *standings: str) -> list[str]:
        """The serials of the certificates the clients were given, in one of ``standings`` (any, when none).

        In the order they were issued: serials are random, and the choices of
        a run must not depend on them.
        """
        return [
            serial
            for serial, certificate in self.model["certificates"].items()
            if certificate["pem"] is not None and (not standings or self.standing(serial) in standings)
        ]

    def renew(self, serial: str, key: int, address: str, *, name: str | None = None) -> None:
        """Renew from the certificate ``serial`` with a CSR for ``key`` (and ``name``, or its username).

        LIFE-7.2-RENEW: only the current certificate renews (the same key)
        or re-keys (another one); the certificate it replaced may only repeat
        that renewal, a CSR for the current key, and is given the current
        certificate again; anything else is 401 and changes nothing.
        """
        certificate = self.model["certificates"][serial]
        username = certificate["username"]
        csr = csr_for(name or username, MACHINE_KEYS[key])
        standing = self.standing(serial)
        before = snapshot(self.registry)
        try:
            outcome = self.registry.renew(der_of(certificate["pem"]), {"csr": csr}, address=address)
        except registry.RegistryError as error:
            status, body = error.status, error.body()
        else:
            status, body = outcome.status, outcome.body
        event(f"a renewal from a {standing} certificate: {status.value}")
        note(f"renew {serial} ({standing}) with key {key}, name {name} -> {status} {body.get('error')}")
        current = self.model["certificates"].get(self.model["current"].get(username))
        repeat = standing == "superseded" and current["renewedFrom"] == serial and current["key"] == key
        # The order of the checks: the certificate may renew at all, the CSR (section 2), then the table.
        if standing not in ("current", "superseded"):
            assert status == HTTPStatus.UNAUTHORIZED
            assert_error_body(body, "unauthorized")
        elif name is not None:
            assert status == HTTPStatus.BAD_REQUEST
            assert_error_body(body, "malformed_request")
        elif standing == "superseded" and not repeat:
            assert status == HTTPStatus.UNAUTHORIZED
            assert_error_body(body, "unauthorized")
        else:
            assert status == HTTPStatus.CREATED
            assert body["status"] == "renewed" and body["username"] == username
            assert rights_of(body["roles"], body["permissions"]) == self.model["users"][username]
            assert_issued_from(csr, body["certificate"], self.authority)
            self.signed_in(username, address)
            if standing == "current":
                self.issued(username, key, body, serial)
            self.check_current_certificate(username, body)
            if standing == "current":
                return
        assert snapshot(self.registry) == before

    def issued(self, username: str, key: int, body: dict[str, Any], replaced: str) -> None:
        """A renewal issued a new certificate: it is the user's current one, and its key the user's credential."""
        serial = serial_of(body["certificate"])
        assert serial not in self.model["certificates"], "a new certificate every time one is issued"
        self.model["certificates"][serial] = {
            "username": username,
            "key": key,
            "notAfter": self.not_after(),
            "revoked": False,
            "renewedFrom": replaced,
            "pem": body["certificate"],
        }
        self.model["current"][username] = serial
        stored = self.model["requests"][username]
        stored["credential"] = ("csr", key)
        stored["payload"] = stored["payload"] | {"csr": csr_for(username, MACHINE_KEYS[key])}

    @precondition(lambda self: self.given("current"))
    @rule(data=st.data(), address=addresses)
    def renew_with_the_same_key(self, data: st.DataObject, address: str) -> None:
        serial = data.draw(st.sampled_from(self.given("current")), label="serial")
        self.renew(serial, self.model["certificates"][serial]["key"], address)

    @precondition(lambda self: self.given("current"))
    @rule(data=st.data(), address=addresses)
    def rekey(self, data: st.DataObject, address: str) -> None:
        serial = data.draw(st.sampled_from(self.given("current")), label="serial")
        others = [key for key in range(len(MACHINE_KEYS)) if key != self.model["certificates"][serial]["key"]]
        self.renew(serial, data.draw(st.sampled_from(others), label="key"), address)

    def predecessors(self) -> list[str]:
        """The certificates that the current certificate of their user replaced, still unexpired."""
        certificates = self.model["certificates"]
        return [
            certificates[serial]["renewedFrom"]
            for _, serial in sorted(self.model["current"].items())
            if certificates[serial]["renewedFrom"] is not None
            and self.standing(certificates[serial]["renewedFrom"]) == "superseded"
        ]

    @precondition(lambda self: self.predecessors())
    @rule(data=st.data(), address=addresses)
    def repeat_a_renewal(self, data: st.DataObject, address: str) -> None:
        """The certificate the current one replaced, with a CSR for the current key: a lost answer fetched again."""
        serial = data.draw(st.sampled_from(self.predecessors()), label="serial")
        username = self.model["certificates"][serial]["username"]
        self.renew(serial, self.model["certificates"][self.model["current"][username]]["key"], address)

    @precondition(lambda self: self.given("superseded", "revoked", "expired", "of no user"))
    @rule(data=st.data(), key=st.sampled_from(range(len(MACHINE_KEYS))), address=addresses)
    def renew_from_a_replaced_or_revoked_certificate(self, data: st.DataObject, key: int, address: str) -> None:
        """Any certificate but the current one, with any key: 401 and nothing changes, unless it repeats."""
        serials = self.given("superseded", "revoked", "expired", "of no user")
        self.renew(data.draw(st.sampled_from(serials), label="serial"), key, address)

    @precondition(lambda self: self.given())
    @rule(data=st.data(), key=st.sampled_from(range(len(MACHINE_KEYS))), address=addresses)
    def renew_for_another_name(self, data: st.DataObject, key: int, address: str) -> None:
        """A CSR whose Common Name is not the caller's: 400 from a certificate that may renew, else 401."""
        serial = data.draw(st.sampled_from(self.given()), label="serial")
        others = [name for name in USERNAMES if name != self.model["certificates"][serial]["username"]]
        self.renew(serial, key, address, name=data.draw(st.sampled_from(others), label="name"))

    @precondition(lambda self: self.given())
    @rule(data=st.data())
    def whoami_with_a_certificate(self, data: st.DataObject) -> None:
        """AUTH-5.2-WHOAMI: a certificate says who it is while issued, unrevoked and unexpired, superseded or not."""
        serial = data.draw(st.sampled_from(self.given()), label="serial")
        certificate = self.model["certificates"][serial]
        standing = self.standing(serial)
        event(f"whoami with a {standing} certificate")
        if standing in ("current", "superseded"):
            identity = self.registry.authenticate_certificate(der_of(certificate["pem"]))
            assert identity.username == certificate["username"] and identity.method == "certificate"
            assert rights_of(**identity.rights.to_json()) == self.model["users"][certificate["username"]]
        else:
            with pytest.raises(registry.Unauthorized):
                self.registry.authenticate_certificate(der_of(certificate["pem"]))

    # --- The lock, the clock and restarts ----------------------------------

    def check_status(self, status: dict[str, Any]) -> None:
        """SPEC 4 and ADMIN-4.10-PAGE-FIELDS: ``{"locked", "unlockedUntil", "pending"}`` as the model has them.

        While unlocked, also the time left and the registry's time.
        """
        self.expire()
        assert status["locked"] is self.locked
        if self.locked:
            assert set(status) == {"locked", "unlockedUntil", "pending", "crl"}
            assert status["unlockedUntil"] is None
        else:
            assert set(status) == {"locked", "unlockedUntil", "unlockedForMs", "serverTime", "pending", "crl"}
            assert datetime.fromisoformat(status["unlockedUntil"]) == self.model["unlocked_until"]
            left = self.model["unlocked_until"] - self.clock.now
            assert status["unlockedForMs"] == left // timedelta(milliseconds=1)
            assert datetime.fromisoformat(status["serverTime"]) == self.clock.now
        pending = [u for u, stored in self.model["requests"].items() if stored["state"] == "pending"]
        assert status["pending"] == len(pending)

    @rule(duration=durations)
    def unlock(self, duration: int | None) -> None:
        body = None if duration is None else {"duration": duration}
        window = DEFAULT_UNLOCK if duration is None else timedelta(milliseconds=duration)
        self.model["unlocked_until"] = self.clock.now + window
        self.check_status(self.registry.unlock(body))

    @precondition(lambda self: not self.locked)
    @rule()
    def lock(self) -> None:
        self.model["unlocked_until"] = None
        self.check_status(self.registry.lock())

    def ends(self) -> list[datetime]:
        """The moments at which something the model holds changes by itself."""
        settings = self.registry_settings
        ends = [
            stored["since"] + RETENTION for stored in self.model["requests"].values() if stored["state"] != "approved"
        ]
        if not self.locked:
            ends.append(self.model["unlocked_until"])
        ends += [
            at + settings.auth_failure_window for failures in self.model["failures"].values() for _, at in failures
        ]
        ends += [since + settings.known_address_period for since in self.model["known"].values()]
        if self.clock.now < START + timedelta(days=5 * 365):  # and the CA, of ten years, lives on
            ends += [certificate["notAfter"] for certificate in self.model["certificates"].values()]
        return sorted(end for end in ends if end > self.clock.now - timedelta(seconds=1))

    @rule(data=st.data())
    def advance_the_clock(self, data: st.DataObject) -> None:
        """Move time on by a while, or to the second before, at or after an end: a window's, a retention's, a failed
        sign-in's, a known address's or a certificate's."""
        ends = self.ends()
        if ends and data.draw(st.booleans(), label="to an end"):
            end = data.draw(st.sampled_from(ends), label="end")
            offset = data.draw(st.sampled_from([-1, 0, 1]), label="offset")
            seconds = math.ceil((end - self.clock.now).total_seconds()) + offset
        else:
            seconds = data.draw(steps, label="seconds")
        self.clock.advance(seconds=max(seconds, 0))

    @rule()
    def restart(self) -> None:
        """Close the registry and open another on the same database: what is stored stays, the throttle is empty."""
        self.registry.close()
        self.registry = self.open()
        self.model["failures"].clear()
        self.model["known"].clear()

    # --- The administrator ------------------------------------------------

    def decide(self, call: Callable[[], Any], username: str, *, allowed: tuple[str, ...]) -> Any:
        """Run an administrator call on ``username``'s request: 404 when none, 409 unless its state is ``allowed``."""
        self.expire()
        stored = self.model["requests"].get(username)
        if stored is None or stored["state"] not in allowed:
            with pytest.raises(registry.RegistryError) as refusal:
                call()
            expected = HTTPStatus.NOT_FOUND if stored is None else HTTPStatus.CONFLICT
            event(f"an administrator's call refused: {expected.value}")
            assert refusal.value.status == expected
            assert_error_body(refusal.value.body())
            return None
        return call()

    def someone(self, data: st.DataObject, *states: str) -> str:
        """A username the administrator names: mostly one whose request is in one of ``states``, sometimes any."""
        fitting = sorted(username for username, stored in self.model["requests"].items() if stored["state"] in states)
        if fitting and data.draw(st.integers(0, 3)):
            return data.draw(st.sampled_from(fitting), label="username")
        return data.draw(st.sampled_from(USERNAMES), label="username")

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), grant=st.sampled_from(GRANTS))
    def approve(self, data: st.DataObject, grant: dict[str, Any] | None) -> None:
        self.approve_now(self.someone(data, "pending"), grant)

    def approve_now(self, username: str, grant: dict[str, Any] | None) -> None:
        user = self.decide(lambda: self.registry.approve(username, grant), username, allowed=("pending",))
        if user is None:
            return
        stored = self.model["requests"][username]
        granted = granted_by(stored["rights"], grant)
        stored["state"] = "approved"
        self.model["users"][username] = granted
        assert user["username"] == username
        assert user["method"] == stored["credential"][0]
        assert rights_of(user["roles"], user["permissions"]) == granted
        assert (user["certificateSerial"] is not None) == (stored["credential"][0] == "csr")
        if stored["credential"][0] == "csr":
            serial = user["certificateSerial"]
            assert serial not in self.model["certificates"], "a new certificate every time one is issued"
            self.model["certificates"][serial] = {
                "username": username,
                "key": stored["credential"][1],
                "notAfter": self.not_after(),
                "revoked": False,
                "renewedFrom": None,
                "pem": None,  # until the client fetches its 201
            }
            self.model["current"][username] = serial

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), reason=st.none() | st.text(max_size=30))
    def deny(self, data: st.DataObject, reason: str | None) -> None:
        username = self.someone(data, "pending")
        body = None if reason is None else {"reason": reason}
        listed = self.decide(lambda: self.registry.deny(username, body), username, allowed=("pending",))
        if listed is None:
            return
        stored = self.model["requests"][username]
        stored.update(state="denied", reason=reason or "", since=self.clock.now)
        assert listed["username"] == username and listed["state"] == "denied"
        assert listed["reason"] == stored["reason"]

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        username = self.someone(data, "pending", "denied")
        allowed = ("pending", "denied")
        self.expire()
        forgettable = self.model["requests"].get(username, {}).get("state") in allowed
        assert self.decide(lambda: self.registry.forget(username), username, allowed=allowed) is None
        if forgettable:
            del self.model["requests"][username]

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data())
    def remove_user(self, data: st.DataObject) -> None:
        """LIFE-7.3-REVOKE: the user and its request go, and every certificate of it that has not expired is revoked."""
        username = self.someone(data, "approved")
        if username not in self.model["users"]:
            with pytest.raises(registry.NotFound):
                self.registry.remove_user(username)
            return
        self.registry.remove_user(username)
        del self.model["users"][username]
        del self.model["requests"][username]
        self.model["current"].pop(username, None)
        for certificate in self.model["certificates"].values():
            if certificate["username"] == username and self.clock.now < certificate["notAfter"]:
                certificate["revoked"] = True

    # --- After every step -------------------------------------------------

    @invariant()
    def the_registry_agrees_with_the_model(self) -> None:
        self.check_status(self.registry.status())
        requests = self.registry.requests()
        names = [listed["username"] for listed in requests]
        assert len(names) == len(set(names)), "at most one request per username"
        model_requests = self.model["requests"]
        states = {listed["username"]: listed["state"] for listed in requests}
        assert states == {username: stored["state"] for username, stored in model_requests.items()}
        for listed in requests:
            stored = model_requests[listed["username"]]
            assert listed["pairingId"] == stored["pairingId"]
            assert listed["method"] == stored["credential"][0]
            assert rights_of(listed["roles"], listed["permissions"]) == stored["rights"]
            # SPEC 4's list: the first request's context, its times and how often it was polled.
            assert listed["context"] == stored["payload"].get("context")
            assert datetime.fromisoformat(listed["createdAt"]) == stored["created"]
            assert datetime.fromisoformat(listed["lastPollAt"]) == stored["lastPoll"]
            assert listed["pollCount"] == stored["polls"]
            if stored["state"] == "denied":
                assert listed["reason"] == stored["reason"]
        users = self.registry.users()
        user_names = [user["username"] for user in users]
        assert len(user_names) == len(set(user_names)), "never two users for a username"
        granted = {user["username"]: rights_of(user["roles"], user["permissions"]) for user in users}
        assert granted == self.model["users"]
        assert all(states.get(name) == "approved" for name in user_names), "a user always has an approved request"
        # LIFE-7.1-TIMES: each user's current certificate, as the model has it.
        for user in users:
            serial = self.model["current"].get(user["username"])
            assert user["certificateSerial"] == serial
            if serial is not None:
                not_after = self.model["certificates"][serial]["notAfter"]
                assert datetime.fromisoformat(user["certificateNotAfter"]) == not_after


class ReferenceRegistryMachine(RegistryMachine):
    """The same model against the reference path: no caches, every poll parsed and written at once."""

    registry_kind = registry.Registry


# More examples than the CI profile's 40, as in test_fast_path: a run reaches a renewal, a repeat or a throttled
# sign-in only after a few steps on the same username; 120 runs of 40 steps take about 6 s a machine.
RegistryMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40)
ReferenceRegistryMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40)
TestRegistryMachine = RegistryMachine.TestCase
TestReferenceRegistryMachine = ReferenceRegistryMachine.TestCase

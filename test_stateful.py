"""The stateful model of the whole contract: ``RegistryMachine``.

It keeps a plain-dict model of the contract (the lock window, the stored
requests, the users), drives a real ``registry.Registry`` with client
requests, administrator calls and a fake clock, and checks every answer and
the registry's whole visible state against the model after every step. It
runs twice: on the fast path (``fastpath.FastRegistry``) and on the
reference (``registry.Registry``).

Where SPEC is silent the model follows the registry's documented reading
(docs/design.md): an approval body's field left out stays as requested, and
a denied request's retention starts at the denial.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

import pytest
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
)

# --- The stateful model ----------------------------------------------------

Credential = tuple[str, object]  # ("password", the password) or ("csr", an index into MACHINE_KEYS)
USERNAMES = ("sensor-0003", "agent.7", "Pump_12")
PASSWORDS = (GOOD_PASSWORD, OTHER_PASSWORD)
MACHINE_KEYS = (ACCEPTED_KEYS[0], ACCEPTED_KEYS[3])
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


class RegistryMachine(RuleBasedStateMachine):
    """SPEC sections 2 to 4 as a plain-dict model, checked against the real registry after every step.

    ``self.model`` holds what SPEC says the registry knows:
    ``unlocked_until`` (a datetime, or None when never unlocked or locked),
    ``requests`` (username -> state, credential, rights, reason, and the
    time its retention started, its pairing id, the payload first sent, its
    creation and last poll, its poll count) and ``users`` (username ->
    granted rights). Pending requests are forgotten
    24 hours after they were made, denied ones 24 hours after the denial.
    """

    registry_settings = FAST
    registry_kind: type[registry.Registry] = fastpath.FastRegistry

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.authority = ca.CA.create(START)
        self.registry = self.registry_kind(
            clock=self.clock, ca=self.authority, roles=CATALOG, settings=self.registry_settings
        )
        self.model: dict[str, Any] = {"unlocked_until": None, "requests": {}, "users": {}}
        # The first certificate each user was given: a lost 201 must bring the same one back.
        self.certificates: dict[str, str] = {}
        # SPEC 3: the registry starts locked.
        self.check_status(self.registry.status())

    @initialize(duration=st.sampled_from([None, 300_000, 3_600_000, 86_400_000]))
    def start(self, duration: int | None) -> None:
        """Most runs begin with an administrator opening the registry, for a while or for long."""
        if duration is not None:
            self.unlock(duration)

    def teardown(self) -> None:
        self.registry.close()

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

    # --- The client --------------------------------------------------------

    def send(self, username: str, credential: Credential, rights: Rights, payload: Payload, *, raw: bool) -> None:
        """Send a request, parsed or as the server's raw body, and check the answer against SPEC 2.4."""
        self.expire()
        status, body, headers = answer(self.registry, json.dumps(payload).encode() if raw else payload)
        note(f"{username} {credential} -> {status} {body.get('error', body.get('status'))}")
        stored = self.model["requests"].get(username)
        event(f"a request for a {stored['state'] if stored else 'new'} username: {status.value}")
        if stored is None:
            self.check_new(username, credential, rights, payload, status, body, headers)
            return
        matches = stored["credential"] == credential and stored["rights"] == rights
        if stored["state"] == "approved":
            if matches:
                self.check_approved(username, payload, status, body)
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
        """A 201 with what was granted and, for a CSR, the same certificate every time."""
        assert status == HTTPStatus.CREATED
        assert body["status"] == "approved" and body["username"] == username
        assert rights_of(body["roles"], body["permissions"]) == self.model["users"][username]
        if "csr" not in payload:
            assert "certificate" not in body
            return
        assert_issued_from(payload["csr"], body["certificate"], self.authority)
        assert body["caCertificate"] == self.authority.certificate_pem
        assert body["certificate"] == self.certificates.setdefault(username, body["certificate"])

    @rule(
        username=st.sampled_from(USERNAMES),
        password=st.sampled_from(PASSWORDS),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.text(max_size=20),
        raw=st.booleans(),
    )
    def register_with_a_password(
        self, username: str, password: str, roles: tuple, permissions: tuple, context: str | None, raw: bool
    ) -> None:
        self.register(username, ("password", password), rights_of(list(roles), list(permissions)), context, raw=raw)

    @rule(
        username=st.sampled_from(USERNAMES),
        key=st.sampled_from(range(len(MACHINE_KEYS))),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.text(max_size=20),
        raw=st.booleans(),
    )
    def register_with_a_csr(
        self, username: str, key: int, roles: tuple, permissions: tuple, context: str | None, raw: bool
    ) -> None:
        self.register(username, ("csr", key), rights_of(list(roles), list(permissions)), context, raw=raw)

    def register(
        self, username: str, credential: Credential, rights: Rights, context: str | None, *, raw: bool = False
    ) -> None:
        self.send(username, credential, rights, payload_of(username, credential, rights, context), raw=raw)

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), raw=st.booleans(), times=st.integers(1, 3), fresh=st.booleans())
    def poll(self, data: st.DataObject, raw: bool, times: int, fresh: bool) -> None:
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
            self.send(username, stored["credential"], stored["rights"], payload, raw=raw)

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data())
    def register_with_another_credential(self, data: st.DataObject) -> None:
        username = data.draw(st.sampled_from(sorted(self.model["requests"])), label="username")
        stored = self.model["requests"][username]
        others = [credential for credential in CREDENTIALS if credential != stored["credential"]]
        credential = data.draw(st.sampled_from(others), label="credential")
        self.register(username, credential, stored["rights"], None)

    # --- The lock and the clock -------------------------------------------

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

    @rule(data=st.data())
    def advance_the_clock(self, data: st.DataObject) -> None:
        """Move time on by a while, or to the second before, at or after an end: the window's or a retention's."""
        ends = [
            stored["since"] + RETENTION for stored in self.model["requests"].values() if stored["state"] != "approved"
        ]
        if not self.locked:
            ends.append(self.model["unlocked_until"])
        if ends and data.draw(st.booleans(), label="to an end"):
            end = data.draw(st.sampled_from(sorted(ends)), label="end")
            offset = data.draw(st.sampled_from([-1, 0, 1]), label="offset")
            seconds = math.ceil((end - self.clock.now).total_seconds()) + offset
        else:
            seconds = data.draw(steps, label="seconds")
        self.clock.advance(seconds=max(seconds, 0))

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
        username = self.someone(data, "pending")
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
        username = self.someone(data, "approved")
        if username not in self.model["users"]:
            with pytest.raises(registry.NotFound):
                self.registry.remove_user(username)
            return
        self.registry.remove_user(username)
        del self.model["users"][username]
        del self.model["requests"][username]
        self.certificates.pop(username, None)

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


class ReferenceRegistryMachine(RegistryMachine):
    """The same model against the reference path: no caches, every poll parsed and written at once."""

    registry_kind = registry.Registry


RegistryMachine.TestCase.settings = settings(stateful_step_count=30)
ReferenceRegistryMachine.TestCase.settings = settings(stateful_step_count=30)
TestRegistryMachine = RegistryMachine.TestCase
TestReferenceRegistryMachine = ReferenceRegistryMachine.TestCase

"""The executable spec of ``registry.py``: SPEC sections 1 to 7, rule by rule.

Every test drives the sans-IO core directly, with the fake clock of
``conftest.py``: no sockets, no sleeping.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
import warnings
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

import ca
import registry
from conftest import FAST, START, assert_issued_from, issue, make_csr, make_key, without_poll_statistics

PASSWORD = "correct horse battery staple"
READ_TELEMETRY = {"resource": "plant/+/telemetry/#", "operation": "read", "context": "mqtt"}
WRITE_COMMANDS = {"resource": "/api/commands", "operation": "write", "context": "http"}
PAIRING_ID = re.compile(r"[0-9a-f]{6}")


# --- Helpers -----------------------------------------------------------------


def password_request(username: str = "sensor-0001", password: str = PASSWORD, **fields: object) -> dict:
    """A client's request with a password; ``fields`` adds or replaces fields."""
    return {"username": username, "password": password, **fields}


def csr_request(username: str = "sensor-0001", key: object = None, **fields: object) -> dict:
    """A client's request with a CSR for ``username`` (a new EC key unless given)."""
    return {"username": username, "csr": make_csr(username, key), **fields}


def csr_with_empty_common_name() -> str:
    """A CSR whose subject holds a CN of zero characters, which cryptography builds only when told not to check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "", _validate=False)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(make_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_with_broken_signature(username: str) -> str:
    """A CSR for ``username`` whose last signature byte is flipped: no proof of possession (RFC 2986 section 3)."""
    csr = x509.load_pem_x509_csr(make_csr(username).encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def unordered(permissions: list[dict]) -> set[tuple]:
    """Permissions compared without their order, which is immaterial (SPEC section 2.4)."""
    return {tuple(sorted(p.items())) for p in permissions}


def snapshot(reg: registry.Registry) -> tuple:
    """Everything an administrator can see of a registry."""
    return reg.status(), reg.requests(), reg.users(), reg.audit()


def request_of(reg: registry.Registry, username: str) -> dict:
    """The administrator's listing of the one stored request for ``username``."""
    [listed] = [r for r in reg.requests() if r["username"] == username]
    return listed


def certificate_der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def approved(reg: registry.Registry, payload: dict, body: object = None) -> registry.Outcome:
    """Store ``payload`` as a request, approve it with ``body``, and fetch the 201."""
    assert reg.register(payload).status == 202
    reg.approve(payload["username"], body)
    return reg.register(payload)


class _AnyPairingId:
    """Equal to any pairing id of six hex digits, for comparing whole bodies."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and PAIRING_ID.fullmatch(other) is not None

    def __repr__(self) -> str:
        return "<six hex digits>"


ANY_PAIRING_ID = _AnyPairingId()


@pytest.fixture
def open_reg(reg: registry.Registry) -> registry.Registry:
    """The ``reg`` fixture, unlocked for the default five minutes."""
    reg.unlock()
    return reg


# --- The whole lifecycle -----------------------------------------------------


def test_lifecycle_of_a_sensor_that_asks_for_a_certificate(reg, clock, authority):
    """Proves LOCK-3.1, REG-2.4-LOCKED, LOCK-3.2, REG-2.4-STORE, REG-2.5-PENDING-BODY, REG-2.4-PENDING,
    ADMIN-4.2-CALLS, REG-2.5-APPROVED-BODY, REG-2.4-USER, REG-2.4-REDELIVER."""
    # A sensor makes a key and asks for a certificate for its name, with the
    # rights it needs and a note for the administrator.
    key = make_key()
    request = csr_request("sensor-0003", key, roles=["minimum"], permissions=[READ_TELEMETRY], context="boiler room")

    # The registry starts locked: the sensor is told to come back in 30 s,
    # and nothing is stored.
    with pytest.raises(registry.Locked) as locked:
        reg.register(request, "10.0.0.7")
    assert locked.value.status == 423
    assert locked.value.code == "locked"
    assert locked.value.headers == {"Retry-After": "30"}
    assert reg.requests() == []

    # The administrator opens the registry, for the default five minutes.
    status = reg.unlock()
    assert status["locked"] is False
    assert datetime.fromisoformat(status["unlockedUntil"]) == START + timedelta(minutes=5)

    # The sensor asks again: its request is stored, and it is told to poll
    # in 5 s, with a pairing id to show in its log.
    first = reg.register(request, "10.0.0.7")
    assert first.status == 202
    assert first.headers == {"Retry-After": "5"}
    pairing_id = first.body["pairingId"]
    assert PAIRING_ID.fullmatch(pairing_id)
    assert first.body == {"status": "pending", "username": "sensor-0003", "pairingId": pairing_id}

    # It polls by sending the very same request: pending still, and the
    # registry counts the poll.
    clock.advance(seconds=5)
    poll = reg.register(request, "10.0.0.7")
    assert (poll.status, poll.body, poll.headers) == (202, first.body, first.headers)
    assert request_of(reg, "sensor-0003")["pollCount"] == 1
    clock.advance(seconds=5)
    reg.register(request, "10.0.0.7")

    # The administrator lists it, and sees the pairing id the sensor logged.
    [listed] = reg.requests()
    assert listed["username"] == "sensor-0003"
    assert listed["state"] == "pending"
    assert listed["pairingId"] == pairing_id
    assert listed["method"] == "csr"
    assert listed["roles"] == ["minimum"]
    assert listed["permissions"] == [READ_TELEMETRY]
    assert listed["context"] == "boiler room"
    assert listed["clientAddress"] == "10.0.0.7"
    assert listed["pollCount"] == 2
    assert datetime.fromisoformat(listed["createdAt"]) == START
    assert datetime.fromisoformat(listed["lastPollAt"]) == START + timedelta(seconds=10)
    assert reg.status()["pending"] == 1

    # The administrator approves it: the CSR is signed and a user exists.
    reg.approve("sensor-0003")
    assert [user["username"] for user in reg.users()] == ["sensor-0003"]
    assert reg.status()["pending"] == 0

    # The next poll gets 201 with the certificate and the CA that signed it.
    clock.advance(seconds=5)
    admitted = reg.register(request, "10.0.0.7")
    assert admitted.status == 201
    assert admitted.body["status"] == "approved"
    assert admitted.body["username"] == "sensor-0003"
    assert admitted.body["roles"] == ["minimum"]
    assert admitted.body["permissions"] == [READ_TELEMETRY]
    assert_issued_from(request["csr"], admitted.body["certificate"], authority)
    assert admitted.body["caCertificate"] == authority.certificate_pem

    # The answer was lost: the same request fetches the same certificate.
    again = reg.register(request, "10.0.0.7")
    assert (again.status, again.body) == (201, admitted.body)

    # Another client claims the name with another credential: the name is taken.
    with pytest.raises(registry.Conflict) as taken:
        reg.register(password_request("sensor-0003"))
    assert taken.value.status == 409
    assert taken.value.code == "username_taken"
    assert taken.value.body()["error"] == "username_taken"


# --- SPEC section 2: the outcomes, rule by rule ------------------------------


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param([], "JSON object", id="a list"),
        pytest.param("sensor-0001", "JSON object", id="a string"),
        pytest.param(None, "JSON object", id="null"),
        pytest.param({"password": PASSWORD}, "'username' is required", id="no username"),
        pytest.param({"username": 7, "password": PASSWORD}, "'username' must be a string", id="username a number"),
        pytest.param(password_request(password=12345), "'password' must be a string", id="password a number"),
        pytest.param(password_request(colour="red"), "unknown field 'colour'", id="unknown field"),
        pytest.param({"username": "sensor-0001"}, "exactly one of", id="neither password nor csr"),
        pytest.param(password_request(csr=make_csr("sensor-0001")), "exactly one of", id="both password and csr"),
        pytest.param(password_request(roles="minimum"), "'roles' must be a list", id="roles a string"),
        pytest.param(password_request(roles=["minimum", 1]), "'roles' must be a list", id="a role a number"),
        pytest.param(password_request(permissions=READ_TELEMETRY), "'permissions' must be a list", id="one object"),
        pytest.param(password_request(permissions=["read"]), "must be an object", id="permission a string"),
        pytest.param(
            password_request(permissions=[{"resource": "a/b", "operation": "read"}]),
            "exactly the fields",
            id="permission without context",
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "qos": 1}]),
            "exactly the fields",
            id="permission with an extra field",
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "operation": "delete"}]),
            "operation",
            id="unknown operation",
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "context": "coap"}]), "context", id="unknown context"
        ),
        pytest.param(
            password_request(permissions=[{**WRITE_COMMANDS, "resource": "api/commands"}]),
            "start with '/'",
            id="http resource without a slash",
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "resource": ""}]), "non-empty", id="empty resource"
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "resource": 42}]), "non-empty", id="resource a number"
        ),
        # MQTT 3.1.1 section 4.7.1: a wildcard takes a whole topic level, and '#' only the last.
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "resource": "plant/#/x"}]),
            "topic filter",
            id="mqtt # before the last level",
        ),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "resource": "plant/a+"}]),
            "topic filter",
            id="mqtt + inside a level",
        ),
        pytest.param(password_request(context=["boiler room"]), "'context' must be a string", id="context a list"),
        pytest.param(password_request(context="x" * 1025), "more than 1024", id="context too long"),
        pytest.param({"username": "sensor-0001", "csr": "hello"}, "PKCS#10", id="csr not PEM"),
        pytest.param(
            {"username": "sensor-0001", "csr": csr_with_broken_signature("sensor-0001")},
            "signature",
            id="csr signature does not verify",
        ),
        pytest.param({"username": "sensor-0001", "csr": make_csr(None)}, "no Common Name", id="csr without CN"),
        pytest.param(
            {"username": "sensor-0001", "csr": csr_with_empty_common_name()},
            "no Common Name",
            id="csr with empty CN",
            # cryptography warns as it reads the CN it would not have built.
            marks=pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning"),
        ),
        pytest.param(
            {"username": "sensor-0001", "csr": make_csr("sensor-0002")}, "is not the username", id="csr for another CN"
        ),
        pytest.param(
            {"username": "sensor-0001", "csr": make_csr("Sensor-0001")}, "is not the username", id="CN differs in case"
        ),
    ],
)
def test_a_malformed_request_gets_400(open_reg, payload, problem):
    """Proves REQ-1-SHAPE, REQ-1-PERMISSION, REQ-1-CONTEXT, REG-2.2-MALFORMED, REG-2.2-CSR, REG-2.2-CN,
    REG-2.5-ERRORS."""
    with pytest.raises(registry.MalformedRequest) as refused:
        open_reg.register(payload)
    assert refused.value.status == 400
    assert refused.value.body() == {"error": "malformed_request", "message": refused.value.message}
    assert problem in refused.value.message
    assert open_reg.requests() == []


def test_a_request_with_several_problems_lists_each_in_details(open_reg):
    """Proves REG-2.5-ERRORS."""
    with pytest.raises(registry.MalformedRequest) as refused:
        open_reg.register({"password": 12345, "colour": "red"})
    details = refused.value.body()["details"]
    assert len(details) == 3
    assert any("'username' is required" in d for d in details)
    assert any("'password' must be a string" in d for d in details)
    assert any("unknown field 'colour'" in d for d in details)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        pytest.param(password_request("ab"), "3 to 64", id="username of 2"),
        pytest.param(password_request("a" * 65), "3 to 64", id="username of 65"),
        pytest.param(password_request(""), "3 to 64", id="empty username"),
        pytest.param(password_request("-sensor"), "starting with", id="username starts with a hyphen"),
        pytest.param(password_request(".sensor"), "starting with", id="username starts with a dot"),
        pytest.param(password_request("sensor 01"), "3 to 64", id="username with a space"),
        pytest.param(password_request("sensör-01"), "3 to 64", id="username not ASCII"),
        pytest.param(password_request("sensor\n"), "3 to 64", id="username with a trailing newline"),
        pytest.param(password_request(password="1234"), "5 to 1024", id="password of 4"),
        pytest.param(password_request(password="x" * 1025), "5 to 1024", id="password of 1025"),
        pytest.param(password_request(roles=["admin"]), "role 'admin'", id="role not in the catalog"),
        pytest.param(csr_request(key=make_key("rsa1024")), "RSA 1024-bit", id="RSA 1024"),
        pytest.param(csr_request(key=make_key("p521")), "secp521r1", id="EC P-521"),
    ],
)
def test_a_request_against_policy_gets_422(open_reg, payload, problem):
    """Proves REG-2.3-USERNAME, REG-2.3-PASSWORD, REG-2.3-ROLE, REG-2.3-KEY."""
    with pytest.raises(registry.PolicyViolation) as refused:
        open_reg.register(payload)
    assert refused.value.status == 422
    assert refused.value.code == "policy_violation"
    assert problem in refused.value.message
    assert open_reg.requests() == []


def test_a_request_that_breaks_several_policy_rules_lists_each_in_details(open_reg):
    """Proves REG-2.5-ERRORS."""
    with pytest.raises(registry.PolicyViolation) as refused:
        open_reg.register(password_request("ab", "1234", roles=["admin"]))
    assert len(refused.value.body()["details"]) == 3


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(password_request("sensor-0003"), id="hyphen in the username"),
        pytest.param(password_request("s_1.x"), id="dot and underscore"),
        pytest.param(password_request("abc"), id="username of 3"),
        pytest.param(password_request("a" * 64), id="username of 64"),
        pytest.param(password_request(password="12345"), id="password of 5"),
        pytest.param(password_request(password="x" * 1024), id="password of 1024"),
        pytest.param(password_request(roles=["minimum", "operator"]), id="roles in the catalog"),
        pytest.param(password_request(context="x" * 1024), id="context of 1024"),
        pytest.param(password_request(permissions=[READ_TELEMETRY, WRITE_COMMANDS]), id="permissions"),
        pytest.param(
            password_request(permissions=[{**READ_TELEMETRY, "resource": r} for r in ("#", "+", "+/+/x", "a/b")]),
            id="mqtt wildcards",
        ),
        pytest.param(csr_request(key=make_key("ec")), id="EC P-256"),
        pytest.param(csr_request(key=make_key("p384")), id="EC P-384"),
        pytest.param(csr_request(key=make_key("ed25519")), id="Ed25519"),
        pytest.param(csr_request(key=make_key("rsa")), id="RSA 2048"),
    ],
)
def test_a_request_within_policy_is_stored_as_pending(open_reg, payload):
    """Proves REG-2.3-USERNAME, REG-2.3-PASSWORD, REG-2.3-KEY, REQ-1-CONTEXT, REQ-1-PERMISSION, REG-2.4-STORE,
    REG-2.5-PENDING-BODY."""
    outcome = open_reg.register(payload)
    assert outcome.status == 202
    assert outcome.headers == {"Retry-After": "5"}
    assert outcome.body == {"status": "pending", "username": payload["username"], "pairingId": ANY_PAIRING_ID}
    assert request_of(open_reg, payload["username"])["state"] == "pending"


def test_the_pairing_id_of_a_csr_is_derived_from_its_public_key(open_reg):
    """Proves REG-2.5-PENDING-BODY."""
    key = make_key()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    outcome = open_reg.register(csr_request("sensor-0001", key))
    assert outcome.body["pairingId"] == digest.finalize().hex()[:6]


def test_a_new_request_while_locked_gets_423_and_nothing_is_stored(reg):
    """Proves REG-2.4-LOCKED, REG-2.5-RETRY-AFTER."""
    with pytest.raises(registry.Locked) as refused:
        reg.register(password_request())
    assert refused.value.status == 423
    assert refused.value.headers == {"Retry-After": "30"}
    assert refused.value.body()["error"] == "locked"
    assert reg.requests() == []
    assert reg.status()["pending"] == 0


def test_retry_after_comes_from_the_settings(clock, authority):
    """Proves REG-2.5-RETRY-AFTER."""
    settings = registry.Settings(scrypt_n=16, retry_after_pending=7, retry_after_locked=60)
    reg = registry.Registry(clock=clock, ca=authority, settings=settings)
    with pytest.raises(registry.Locked) as refused:
        reg.register(password_request())
    assert refused.value.headers == {"Retry-After": "60"}
    reg.unlock()
    assert reg.register(password_request()).headers == {"Retry-After": "7"}
    reg.close()


# --- SPEC section 2: the order of the checks ---------------------------------


def test_malformed_and_locked_gets_400(reg):
    """Proves REG-2-ORDER."""
    with pytest.raises(registry.MalformedRequest) as refused:
        reg.register(password_request(colour="red"))
    assert refused.value.status == 400


def test_against_policy_and_locked_gets_422(reg):
    """Proves REG-2-ORDER."""
    with pytest.raises(registry.PolicyViolation) as refused:
        reg.register(password_request("ab"))
    assert refused.value.status == 422


def test_malformed_and_against_policy_gets_400(open_reg):
    """Proves REG-2-ORDER."""
    with pytest.raises(registry.MalformedRequest) as refused:
        open_reg.register(password_request("ab", "1234", colour="red"))
    assert refused.value.status == 400
    assert "colour" in refused.value.message


def test_a_csr_for_another_cn_with_an_unaccepted_key_gets_400(open_reg):
    """Proves REG-2-ORDER, REG-2.2-CN."""
    with pytest.raises(registry.MalformedRequest) as refused:
        open_reg.register({"username": "sensor-0001", "csr": make_csr("sensor-0002", make_key("p521"))})
    assert "is not the username" in refused.value.message


def test_a_malformed_request_for_a_pending_username_gets_400(open_reg):
    """Proves REG-2-ORDER."""
    open_reg.register(password_request())
    with pytest.raises(registry.MalformedRequest):
        open_reg.register(password_request(colour="red"))
    assert request_of(open_reg, "sensor-0001")["pollCount"] == 0


def test_a_request_against_policy_for_an_approved_username_gets_422(open_reg):
    """Proves REG-2-ORDER."""
    approved(open_reg, password_request())
    with pytest.raises(registry.PolicyViolation) as refused:
        open_reg.register(password_request(roles=["admin"]))
    assert refused.value.status == 422


def test_a_pending_request_still_polls_while_locked(open_reg):
    """Proves REG-2.5-LOCK-SCOPE, REG-2.4-PENDING."""
    first = open_reg.register(password_request())
    open_reg.lock()
    poll = open_reg.register(password_request())
    assert (poll.status, poll.body, poll.headers) == (202, first.body, {"Retry-After": "5"})
    assert request_of(open_reg, "sensor-0001")["pollCount"] == 1


def test_an_approved_request_gets_201_again_while_locked(open_reg):
    """Proves REG-2.5-LOCK-SCOPE, REG-2.4-USER."""
    admitted = approved(open_reg, password_request())
    open_reg.lock()
    again = open_reg.register(password_request())
    assert (again.status, again.body) == (201, admitted.body)


def test_a_denied_request_gets_403_with_the_reason(open_reg):
    """Proves REG-2.4-DENIED."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001", {"reason": "not one of ours"})
    with pytest.raises(registry.Denied) as refused:
        open_reg.register(password_request())
    assert refused.value.status == 403
    assert refused.value.body()["error"] == "denied"
    assert refused.value.body()["reason"] == "not one of ours"


def test_a_denied_request_gets_403_while_locked(open_reg):
    """Proves REG-2.4-DENIED, REG-2-ORDER."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001")
    open_reg.lock()
    with pytest.raises(registry.Denied) as refused:
        open_reg.register(password_request())
    assert refused.value.status == 403


def test_a_different_request_for_a_denied_username_gets_409(open_reg):
    """Proves REG-2.4-DENIED."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001")
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(password_request(password="another password"))
    assert refused.value.status == 409
    assert request_of(open_reg, "sensor-0001")["state"] == "denied"


def test_a_different_request_for_an_approved_username_gets_409_username_taken(open_reg):
    """Proves REG-2.4-USER, REG-2.4-MATCH."""
    approved(open_reg, password_request())
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(password_request(roles=["operator"]))
    assert refused.value.code == "username_taken"


@pytest.mark.parametrize(
    "differing",
    [
        pytest.param(password_request(password="another password"), id="another password"),
        pytest.param(password_request(roles=["minimum", "operator"]), id="another role"),
        pytest.param(password_request(roles=[]), id="no roles"),
        pytest.param(password_request(roles=["minimum"], permissions=[READ_TELEMETRY]), id="fewer permissions"),
        pytest.param(
            password_request(
                roles=["minimum"], permissions=[{**READ_TELEMETRY, "operation": "readWrite"}, WRITE_COMMANDS]
            ),
            id="another operation",
        ),
        pytest.param(csr_request(roles=["minimum"], permissions=[READ_TELEMETRY, WRITE_COMMANDS]), id="a csr"),
    ],
)
def test_a_different_request_for_a_pending_username_gets_409_duplicate_request(open_reg, differing):
    """Proves REG-2.4-PENDING, REG-2.4-MATCH."""
    original = password_request(roles=["minimum"], permissions=[READ_TELEMETRY, WRITE_COMMANDS])
    open_reg.register(original)
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(differing)
    assert refused.value.status == 409
    assert refused.value.code == "duplicate_request"
    assert request_of(open_reg, "sensor-0001")["pollCount"] == 0


def test_a_csr_with_another_key_for_a_pending_username_gets_409(open_reg):
    """Proves REG-2.4-PENDING, REG-2.4-MATCH."""
    open_reg.register(csr_request("sensor-0001"))
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(csr_request("sensor-0001"))
    assert refused.value.code == "duplicate_request"


def test_a_new_csr_for_the_same_key_is_a_poll(open_reg):
    """Proves REG-2.4-MATCH."""
    key = make_key()
    first_request = csr_request("sensor-0001", key)
    first = open_reg.register(first_request)
    # ECDSA signatures are randomised: the second CSR text differs, its key does not.
    second_request = csr_request("sensor-0001", key)
    assert second_request["csr"] != first_request["csr"]
    poll = open_reg.register(second_request)
    assert (poll.status, poll.body) == (202, first.body)


def test_context_takes_no_part_in_matching(open_reg):
    """Proves REG-2.4-MATCH."""
    first = open_reg.register(password_request(context="boiler room"))
    poll = open_reg.register(password_request(context="roof, next to the antenna"))
    assert (poll.status, poll.body) == (202, first.body)
    assert open_reg.register(password_request()).status == 202
    assert request_of(open_reg, "sensor-0001")["context"] == "boiler room"


def test_context_takes_no_part_in_matching_a_decided_request(open_reg):
    """Proves REG-2.4-MATCH."""
    admitted = approved(open_reg, password_request("sensor-0001", context="boiler room"))
    again = open_reg.register(password_request("sensor-0001", context="somewhere else"))
    assert (again.status, again.body) == (201, admitted.body)
    open_reg.register(password_request("sensor-0002", context="boiler room"))
    open_reg.deny("sensor-0002", {"reason": "unknown device"})
    with pytest.raises(registry.Denied):
        open_reg.register(password_request("sensor-0002", context="somewhere else"))


def test_the_order_of_roles_and_permissions_takes_no_part_in_matching(open_reg):
    """Proves REG-2.4-MATCH."""
    first = open_reg.register(
        password_request(roles=["minimum", "operator"], permissions=[READ_TELEMETRY, WRITE_COMMANDS])
    )
    poll = open_reg.register(
        password_request(roles=["operator", "minimum"], permissions=[WRITE_COMMANDS, READ_TELEMETRY])
    )
    assert (poll.status, poll.body) == (202, first.body)


# --- SPEC section 3: the lock ------------------------------------------------

# The CRL a registry with a CA signs when it first opens (SPEC section 7): valid seven days.
FIRST_CRL = {"number": 1, "nextUpdate": "2026-01-08T12:00:00.000+00:00"}


def test_the_registry_starts_locked(reg):
    """Proves LOCK-3.1."""
    assert reg.status() == {"locked": True, "unlockedUntil": None, "pending": 0, "crl": FIRST_CRL}


def test_the_window_closes_by_itself_after_five_minutes(reg, clock):
    """Proves LOCK-3.2, LOCK-3.4."""
    reg.unlock()
    clock.advance(minutes=5, milliseconds=-1)
    assert reg.status()["locked"] is False
    assert reg.register(password_request("sensor-0001")).status == 202
    clock.advance(milliseconds=1)
    assert reg.status() == {"locked": True, "unlockedUntil": None, "pending": 1, "crl": FIRST_CRL}
    with pytest.raises(registry.Locked):
        reg.register(password_request("sensor-0002"))


def test_an_unlock_while_open_starts_a_new_window_from_now(reg, clock):
    """Proves LOCK-3.2."""
    reg.unlock()
    clock.advance(minutes=4)
    status = reg.unlock()
    assert datetime.fromisoformat(status["unlockedUntil"]) == START + timedelta(minutes=9)
    clock.advance(minutes=4, seconds=59)
    assert reg.register(password_request()).status == 202
    clock.advance(seconds=1)
    assert reg.status()["locked"] is True


def test_lock_closes_the_registry_at_once(reg):
    """Proves LOCK-3.3."""
    reg.unlock()
    assert reg.lock() == {"locked": True, "unlockedUntil": None, "pending": 0, "crl": FIRST_CRL}
    with pytest.raises(registry.Locked):
        reg.register(password_request())


def test_unlock_takes_a_duration_in_milliseconds(reg, clock):
    """Proves LOCK-3.2."""
    status = reg.unlock({"duration": 90_000})
    assert datetime.fromisoformat(status["unlockedUntil"]) == START + timedelta(seconds=90)
    clock.advance(seconds=90)
    assert reg.status()["locked"] is True


def test_unlock_accepts_the_longest_duration_of_the_settings(reg):
    """Proves LOCK-3.2."""
    status = reg.unlock({"duration": 24 * 60 * 60 * 1000})
    assert datetime.fromisoformat(status["unlockedUntil"]) == START + timedelta(days=1)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"duration": 0}, id="zero"),
        pytest.param({"duration": -1000}, id="negative"),
        pytest.param({"duration": 1.5}, id="a fraction"),
        pytest.param({"duration": "60000"}, id="a string"),
        pytest.param({"duration": True}, id="a boolean"),
        pytest.param({"duration": None}, id="null"),
        pytest.param({"duration": 24 * 60 * 60 * 1000 + 1}, id="longer than the longest"),
        pytest.param({"duration": 60_000, "reason": "maintenance"}, id="an extra field"),
        pytest.param({"minutes": 5}, id="another field"),
        pytest.param([60_000], id="a list"),
    ],
)
def test_unlock_with_a_bad_duration_gets_400_and_stays_locked(reg, body):
    """Proves LOCK-3.2."""
    with pytest.raises(registry.MalformedRequest) as refused:
        reg.unlock(body)
    assert refused.value.status == 400
    assert reg.status()["locked"] is True


def test_the_lock_window_survives_reopening_the_database(tmp_path, clock, authority):
    """Proves LOCK-3.1, STORE-6.2-DURABLE."""
    database = str(tmp_path / "registry.db")
    first = registry.Registry(database, clock=clock, ca=authority, settings=FAST)
    opened = first.unlock()
    first.close()

    reopened = registry.Registry(database, clock=clock, ca=authority, settings=FAST)
    assert reopened.status() == opened
    clock.advance(minutes=5)
    assert reopened.status()["locked"] is True
    reopened.unlock()
    reopened.lock()
    reopened.close()

    again = registry.Registry(database, clock=clock, ca=authority, settings=FAST)
    assert again.status()["locked"] is True
    again.close()


# --- Retention ---------------------------------------------------------------


def test_a_pending_request_is_forgotten_after_the_retention_period(open_reg, clock):
    """Proves REG-2.5-RETENTION."""
    open_reg.register(password_request())
    clock.advance(hours=24, seconds=-1)
    assert request_of(open_reg, "sensor-0001")["state"] == "pending"
    assert open_reg.status()["pending"] == 1
    clock.advance(seconds=1)
    assert open_reg.requests() == []
    assert open_reg.status()["pending"] == 0
    with pytest.raises(registry.NotFound):
        open_reg.approve("sensor-0001")


def test_an_expired_pending_request_no_longer_answers_a_poll(open_reg, clock):
    """Proves REG-2.5-RETENTION."""
    open_reg.register(password_request())
    clock.advance(hours=24)
    with pytest.raises(registry.Locked):
        open_reg.register(password_request())


def test_after_a_pending_request_expires_the_username_may_register_anew(open_reg, clock):
    """Proves REG-2.5-RETENTION."""
    first = open_reg.register(password_request())
    clock.advance(hours=25)
    open_reg.unlock()
    again = open_reg.register(password_request(password="a new password", roles=["operator"]))
    assert again.status == 202
    assert again.body["pairingId"] != first.body["pairingId"]
    listed = request_of(open_reg, "sensor-0001")
    assert (listed["roles"], listed["pollCount"]) == (["operator"], 0)
    assert datetime.fromisoformat(listed["createdAt"]) == START + timedelta(hours=25)


def test_a_denied_request_is_forgotten_after_the_retention_period(open_reg, clock):
    """Proves REG-2.5-RETENTION."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001", {"reason": "unknown device"})
    clock.advance(hours=24, seconds=1)
    assert open_reg.requests() == []
    open_reg.unlock()
    assert open_reg.register(password_request()).status == 202


def test_an_approved_request_is_kept_with_its_user(open_reg, clock):
    """Proves REG-2.5-RETENTION."""
    admitted = approved(open_reg, password_request())
    clock.advance(days=30)
    assert request_of(open_reg, "sensor-0001")["state"] == "approved"
    assert [user["username"] for user in open_reg.users()] == ["sensor-0001"]
    again = open_reg.register(password_request())
    assert (again.status, again.body) == (201, admitted.body)


# --- SPEC section 4: the administrator's decisions ---------------------------


def test_a_denied_client_learns_the_reason_and_the_listing_shows_it(open_reg):
    """Proves ADMIN-4.2-CALLS, REG-2.4-DENIED."""
    open_reg.register(password_request())
    denied = open_reg.deny("sensor-0001", {"reason": "not on the plant list"})
    assert (denied["state"], denied["reason"]) == ("denied", "not on the plant list")
    assert request_of(open_reg, "sensor-0001")["state"] == "denied"
    assert open_reg.users() == []
    with pytest.raises(registry.Denied) as refused:
        open_reg.register(password_request())
    assert refused.value.body()["reason"] == "not on the plant list"


def test_a_deny_without_a_reason_still_denies(open_reg):
    """Proves ADMIN-4.2-CALLS."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001")
    with pytest.raises(registry.Denied) as refused:
        open_reg.register(password_request())
    assert refused.value.status == 403


def test_an_approval_may_narrow_the_rights_and_the_201_shows_what_was_granted(open_reg, authority):
    """Proves ADMIN-4.4-APPROVE-BODY, REG-2.5-APPROVED-BODY."""
    request = csr_request(roles=["minimum", "operator"], permissions=[READ_TELEMETRY, WRITE_COMMANDS])
    admitted = approved(open_reg, request, {"roles": ["minimum"], "permissions": [READ_TELEMETRY]})
    assert admitted.status == 201
    assert (admitted.body["roles"], admitted.body["permissions"]) == (["minimum"], [READ_TELEMETRY])
    assert_issued_from(request["csr"], admitted.body["certificate"], authority)
    [user] = open_reg.users()
    assert (user["roles"], user["permissions"]) == (["minimum"], [READ_TELEMETRY])
    # The client still repeats what it *requested*, and that is what matches.
    listed = request_of(open_reg, "sensor-0001")
    assert listed["roles"] == ["minimum", "operator"]
    assert unordered(listed["permissions"]) == unordered([READ_TELEMETRY, WRITE_COMMANDS])


def test_an_approval_body_that_names_one_field_keeps_the_other_as_requested(open_reg):
    """Proves ADMIN-4.4-APPROVE-BODY."""
    payload = password_request(roles=["minimum", "operator"], permissions=[READ_TELEMETRY])
    answer = approved(open_reg, payload, {"permissions": []})
    assert (answer.body["roles"], answer.body["permissions"]) == (["minimum", "operator"], [])
    other = password_request("sensor-0002", roles=["operator"], permissions=[READ_TELEMETRY])
    answer = approved(open_reg, other, {"roles": ["minimum"]})
    assert (answer.body["roles"], answer.body["permissions"]) == (["minimum"], [READ_TELEMETRY])


def test_the_certificate_takes_nothing_from_the_csr_but_its_key(open_reg, authority):
    """Proves CERT-5.3-SUBJECT, CERT-5.3-BASIC-CONSTRAINTS."""
    key = make_key()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0001"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil")]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    admitted = approved(open_reg, {"username": "sensor-0001", "csr": csr})
    certificate = assert_issued_from(csr, admitted.body["certificate"], authority)
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_an_approval_that_grants_nothing_grants_nothing(open_reg):
    """Proves ADMIN-4.4-APPROVE-BODY."""
    admitted = approved(open_reg, password_request(roles=["operator"]), {"roles": [], "permissions": []})
    assert (admitted.body["roles"], admitted.body["permissions"]) == ([], [])


def test_an_approval_with_a_role_outside_the_catalog_gets_422(open_reg):
    """Proves REG-2.3-ROLE."""
    open_reg.register(password_request())
    with pytest.raises(registry.PolicyViolation):
        open_reg.approve("sensor-0001", {"roles": ["root"]})
    assert request_of(open_reg, "sensor-0001")["state"] == "pending"


def test_the_administrator_decides_while_the_registry_is_locked(open_reg):
    """Proves REG-2.5-LOCK-SCOPE."""
    open_reg.register(password_request("sensor-0001"))
    open_reg.register(password_request("sensor-0002"))
    open_reg.lock()
    open_reg.approve("sensor-0001")
    open_reg.deny("sensor-0002")
    assert [r["state"] for r in open_reg.requests()] == ["approved", "denied"]


@pytest.mark.parametrize(
    ("decided_by", "decision"),
    [
        pytest.param("approve", "approve", id="approve an approved request"),
        pytest.param("approve", "deny", id="deny an approved request"),
        pytest.param("approve", "forget", id="forget an approved request"),
        pytest.param("deny", "approve", id="approve a denied request"),
        pytest.param("deny", "deny", id="deny a denied request"),
    ],
)
def test_deciding_a_request_that_is_not_pending_gets_409(open_reg, decided_by, decision):
    """Proves ADMIN-4.3-DECIDE."""
    open_reg.register(password_request())
    getattr(open_reg, decided_by)("sensor-0001")
    before = snapshot(open_reg)
    with pytest.raises(registry.Conflict) as refused:
        getattr(open_reg, decision)("sensor-0001")
    assert refused.value.status == 409
    assert refused.value.code == "not_pending"
    assert snapshot(open_reg) == before


@pytest.mark.parametrize("decision", ["approve", "deny", "forget", "remove_user"])
def test_deciding_for_an_unknown_username_gets_404(open_reg, decision):
    """Proves ADMIN-4.3-DECIDE."""
    with pytest.raises(registry.NotFound) as refused:
        getattr(open_reg, decision)("nobody")
    assert refused.value.status == 404
    assert refused.value.code == "not_found"


def test_removing_a_user_whose_request_is_pending_gets_404(open_reg):
    """Proves ADMIN-4.2-CALLS."""
    open_reg.register(password_request())
    with pytest.raises(registry.NotFound):
        open_reg.remove_user("sensor-0001")


def test_forgetting_a_pending_request_frees_the_username(open_reg):
    """Proves ADMIN-4.2-CALLS."""
    open_reg.register(password_request())
    open_reg.forget("sensor-0001")
    assert open_reg.requests() == []
    assert open_reg.register(password_request(password="another password")).status == 202


def test_forgetting_a_denied_request_frees_the_username(open_reg):
    """Proves ADMIN-4.2-CALLS."""
    open_reg.register(password_request())
    open_reg.deny("sensor-0001")
    open_reg.forget("sensor-0001")
    assert open_reg.register(password_request()).status == 202


def test_after_remove_user_the_username_may_register_again(open_reg):
    """Proves ADMIN-4.2-CALLS."""
    approved(open_reg, password_request())
    open_reg.remove_user("sensor-0001")
    assert open_reg.users() == []
    assert open_reg.requests() == []
    with pytest.raises(registry.Unauthorized):
        open_reg.authenticate_password("sensor-0001", PASSWORD)
    assert open_reg.register(password_request(password="another password")).status == 202


# --- A rejected command changes nothing --------------------------------------


def _register(payload: dict) -> object:
    return lambda reg: reg.register(payload)


REJECTED_COMMANDS = [
    pytest.param(_register(password_request("fresh-0001", colour="red")), 400, id="register malformed"),
    pytest.param(_register(password_request("fresh-0001", roles=["root"])), 422, id="register against policy"),
    pytest.param(_register(password_request("fresh-0001")), 423, id="register while locked"),
    pytest.param(_register(password_request("pending-1", "other password")), 409, id="register other for pending"),
    pytest.param(_register(password_request("approved-1")), 409, id="register other for approved"),
    pytest.param(_register(password_request("denied-1")), 403, id="register a denied request"),
    pytest.param(_register(password_request("denied-1", "other password")), 409, id="register other for denied"),
    pytest.param(lambda reg: reg.unlock({"duration": 0}), 400, id="unlock for no time"),
    pytest.param(lambda reg: reg.approve("pending-1", {"roles": ["root"]}), 422, id="approve with unknown role"),
    pytest.param(lambda reg: reg.approve("pending-1", {"roles": "minimum"}), 400, id="approve with a bad body"),
    pytest.param(lambda reg: reg.approve("approved-1"), 409, id="approve an approved request"),
    pytest.param(lambda reg: reg.approve("denied-1"), 409, id="approve a denied request"),
    pytest.param(lambda reg: reg.approve("nobody"), 404, id="approve an unknown username"),
    pytest.param(lambda reg: reg.deny("pending-1", {"reason": 42}), 400, id="deny with a bad reason"),
    pytest.param(lambda reg: reg.deny("approved-1"), 409, id="deny an approved request"),
    pytest.param(lambda reg: reg.forget("approved-1"), 409, id="forget an approved request"),
    pytest.param(lambda reg: reg.forget("nobody"), 404, id="forget an unknown username"),
    pytest.param(lambda reg: reg.remove_user("pending-1"), 404, id="remove a user that does not exist"),
]


@pytest.mark.parametrize(("command", "status"), REJECTED_COMMANDS)
def test_a_rejected_command_changes_nothing(open_reg, clock, command, status):
    """Proves ADMIN-4.3-DECIDE, REG-2.4-DENIED, ADMIN-4.7-POLL-STATS: nothing changes; a denied request's poll is
    counted, so that the administrator sees its client was told."""
    open_reg.register(password_request("pending-1"))
    approved(open_reg, csr_request("approved-1"))
    open_reg.register(password_request("denied-1"))
    open_reg.deny("denied-1", {"reason": "unknown"})
    open_reg.lock()
    clock.advance(seconds=7)
    before = snapshot(open_reg)
    with pytest.raises(registry.RegistryError) as refused:
        command(open_reg)
    assert refused.value.status == status
    after = snapshot(open_reg)
    assert without_poll_statistics(after) == without_poll_statistics(before)
    told = {"denied-1": 1} if status == 403 else {}
    for was, now in zip(before[1], after[1], strict=True):
        polls = told.get(was["username"], 0)
        assert now["pollCount"] == was["pollCount"] + polls
        assert (now["lastPollAt"] == was["lastPollAt"]) == (polls == 0)


# --- SPEC section 6: storage -------------------------------------------------


def test_reopening_the_database_keeps_requests_users_certificates_and_the_lock(tmp_path, clock, authority):
    """Proves STORE-6.1-SQLITE, STORE-6.2-DURABLE, LOCK-3.1."""
    database = str(tmp_path / "registry.db")
    first = registry.Registry(database, clock=clock, ca=authority, settings=FAST)
    first.unlock()
    pending = first.register(password_request("sensor-0001"), "10.0.0.1")
    denied_request = password_request("sensor-0002")
    first.register(denied_request)
    first.deny("sensor-0002", {"reason": "spare part"})
    with_csr = csr_request("sensor-0003")
    admitted = approved(first, with_csr)
    before = snapshot(first)
    first.close()

    reopened = registry.Registry(database, clock=clock, ca=authority, settings=FAST)
    assert snapshot(reopened) == before
    # The poll is checked against the stored scrypt hash: this process has never seen the password.
    poll = reopened.register(password_request("sensor-0001"), "10.0.0.1")
    assert (poll.status, poll.body) == (202, pending.body)
    with pytest.raises(registry.Conflict):
        reopened.register(password_request("sensor-0001", "a wrong password"))
    with pytest.raises(registry.Denied) as refused:
        reopened.register(denied_request)
    assert refused.value.body()["reason"] == "spare part"
    again = reopened.register(with_csr)
    assert (again.status, again.body) == (201, admitted.body)
    identity = reopened.authenticate_certificate(certificate_der(admitted.body["certificate"]))
    assert identity.username == "sensor-0003"
    reopened.approve("sensor-0001")
    assert reopened.authenticate_password("sensor-0001", PASSWORD).username == "sensor-0001"
    reopened.close()


# --- Passwords ---------------------------------------------------------------


def test_no_plain_password_reaches_the_database_file(tmp_path, clock, authority):
    """Proves SAFE-6.3-PASSWORDS."""
    secret = "plain-text-secret-7f3a"
    database = tmp_path / "registry.db"
    reg = registry.Registry(str(database), clock=clock, ca=authority, settings=FAST)
    reg.unlock()
    reg.register(password_request("sensor-0001", secret))
    reg.register(password_request("sensor-0001", secret))
    reg.register(password_request("sensor-0002", secret))
    reg.approve("sensor-0001")
    reg.deny("sensor-0002")

    def stored_bytes() -> bytes:
        files = [database, *database.parent.glob("registry.db-*")]
        return b"".join(path.read_bytes() for path in files)

    assert b"sensor-0001" in stored_bytes()
    assert secret.encode() not in stored_bytes()
    reg.close()
    assert secret.encode() not in stored_bytes()


def test_no_plain_password_is_answered_or_listed(open_reg):
    """Proves SAFE-6.3-PASSWORDS."""
    secret = "plain-text-secret-7f3a"
    answers = [open_reg.register(password_request("sensor-0001", secret)).body]
    open_reg.approve("sensor-0001")
    answers.append(open_reg.register(password_request("sensor-0001", secret)).body)
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(password_request("sensor-0001", secret + "!"))
    answers.append(refused.value.body())
    seen = json.dumps([answers, open_reg.requests(), open_reg.users(), open_reg.audit()])
    assert secret not in seen


def test_authenticate_password_knows_the_right_password_from_a_wrong_one(open_reg):
    """Proves AUTH-5.2-WHOAMI."""
    approved(open_reg, password_request(roles=["operator"], permissions=[WRITE_COMMANDS]))
    identity = open_reg.authenticate_password("sensor-0001", PASSWORD)
    assert identity.to_json() == {
        "username": "sensor-0001",
        "roles": ["operator"],
        "permissions": [WRITE_COMMANDS],
        "method": "password",
    }
    for username, password in (("sensor-0001", PASSWORD + "!"), ("nobody", PASSWORD)):
        with pytest.raises(registry.Unauthorized) as refused:
            open_reg.authenticate_password(username, password)
        # RFC 9110 section 11.6.1: a 401 says how to authenticate.
        assert refused.value.status == 401
        assert refused.value.headers == {"WWW-Authenticate": 'Basic realm="client-registry"'}


def test_a_pending_client_cannot_authenticate(open_reg):
    """Proves AUTH-5.2-WHOAMI."""
    open_reg.register(password_request())
    with pytest.raises(registry.Unauthorized):
        open_reg.authenticate_password("sensor-0001", PASSWORD)


def test_failed_sign_ins_are_throttled_and_recover_after_the_window(open_reg, clock):
    """Proves AUTH-5.2-THROTTLE."""
    approved(open_reg, password_request())
    for _ in range(open_reg.settings.max_auth_failures):
        with pytest.raises(registry.Unauthorized):
            open_reg.authenticate_password("sensor-0001", "a wrong password")
        clock.advance(seconds=1)
    # Now even the right password waits: the registry does not tell which guess was right.
    with pytest.raises(registry.TooManyRequests) as refused:
        open_reg.authenticate_password("sensor-0001", PASSWORD)
    assert refused.value.status == 429
    assert int(refused.value.headers["Retry-After"]) > 0
    # Another username is not held back.
    approved(open_reg, password_request("sensor-0002"))
    assert open_reg.authenticate_password("sensor-0002", PASSWORD).username == "sensor-0002"
    clock.advance(minutes=1)
    assert open_reg.authenticate_password("sensor-0001", PASSWORD).username == "sensor-0001"


def test_a_strangers_failed_sign_ins_do_not_lock_the_device_out(open_reg, clock):
    """Proves AUTH-5.2-THROTTLE.

    Issue 19: five wrong passwords from one address pause that address, not the device at another."""
    approved(open_reg, password_request())
    for _ in range(open_reg.settings.max_auth_failures):
        with pytest.raises(registry.Unauthorized):
            open_reg.authenticate_password("sensor-0001", "a wrong password", "198.51.100.7")

    with pytest.raises(registry.TooManyRequests):
        open_reg.authenticate_password("sensor-0001", PASSWORD, "198.51.100.7")
    assert open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5").username == "sensor-0001"


def test_failed_sign_ins_from_many_addresses_pause_the_username_at_a_higher_ceiling(open_reg, clock):
    """Proves AUTH-5.2-THROTTLE."""
    approved(open_reg, password_request())
    ceiling = open_reg.settings.max_auth_failures_per_username
    for guess in range(ceiling):
        with pytest.raises(registry.Unauthorized):
            open_reg.authenticate_password("sensor-0001", "a wrong password", f"198.51.100.{guess}")

    with pytest.raises(registry.TooManyRequests) as refused:
        open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5")
    assert int(refused.value.headers["Retry-After"]) == 60
    clock.advance(minutes=1)
    assert open_reg.authenticate_password("sensor-0001", PASSWORD, "10.0.0.5").username == "sensor-0001"


def test_authenticate_certificate_knows_the_issued_certificate_from_a_foreign_one(open_reg):
    """Proves AUTH-5.2-WHOAMI."""
    admitted = approved(open_reg, csr_request("sensor-0001", roles=["minimum"]))
    identity = open_reg.authenticate_certificate(certificate_der(admitted.body["certificate"]))
    assert identity.to_json() == {
        "username": "sensor-0001",
        "roles": ["minimum"],
        "permissions": [],
        "method": "certificate",
    }

    foreign = ca.CA.create(START, name="Someone Else's CA")
    issued = issue(foreign, make_csr("sensor-0001"), "sensor-0001", START)
    with pytest.raises(registry.Unauthorized) as refused:
        open_reg.authenticate_certificate(certificate_der(issued.pem))
    assert refused.value.status == 401
    with pytest.raises(registry.Unauthorized):
        open_reg.authenticate_certificate(b"not a certificate")


def test_a_certificate_of_a_removed_user_no_longer_authenticates(open_reg):
    """Proves LIFE-7.3-REVOKE."""
    admitted = approved(open_reg, csr_request("sensor-0001"))
    open_reg.remove_user("sensor-0001")
    with pytest.raises(registry.Unauthorized):
        open_reg.authenticate_certificate(certificate_der(admitted.body["certificate"]))


# --- A registry without a CA -------------------------------------------------


def test_a_registry_without_a_ca_refuses_csrs_and_serves_passwords(clock):
    """Proves REG-2.3-NO-CA."""
    reg = registry.Registry(clock=clock, ca=None, settings=FAST)
    reg.unlock()
    with pytest.raises(registry.PolicyViolation) as refused:
        reg.register(csr_request())
    assert refused.value.status == 422
    assert "issues no certificates" in refused.value.message
    assert reg.requests() == []

    admitted = approved(reg, password_request())
    assert admitted.status == 201
    assert admitted.body == {"status": "approved", "username": "sensor-0001", "roles": [], "permissions": []}
    assert reg.authenticate_password("sensor-0001", PASSWORD).method == "password"
    reg.close()


def test_an_expired_certificate_no_longer_authenticates(open_reg, clock):
    """Proves AUTH-5.2-WHOAMI."""
    answer = approved(open_reg, csr_request("sensor-0001"))
    der = certificate_der(answer.body["certificate"])
    assert open_reg.authenticate_certificate(der).username == "sensor-0001"
    clock.advance(days=366)
    with pytest.raises(registry.Unauthorized, match="expired"):
        open_reg.authenticate_certificate(der)


def test_a_password_approval_carries_no_certificate(open_reg):
    """Proves REG-2.5-APPROVED-BODY."""
    admitted = approved(open_reg, password_request())
    assert "certificate" not in admitted.body
    assert "caCertificate" not in admitted.body
    assert open_reg.users()[0]["certificateSerial"] is None


# --- Settings that protect the registry --------------------------------------


def test_a_full_registry_answers_503_and_still_answers_polls(clock, authority):
    """Proves REG-2.4-FULL, REG-2.5-RETRY-AFTER."""
    reg = registry.Registry(clock=clock, ca=authority, settings=registry.Settings(scrypt_n=16, max_pending=2))
    reg.unlock()
    first = reg.register(password_request("sensor-0001"))
    reg.register(password_request("sensor-0002"))
    with pytest.raises(registry.Full) as refused:
        reg.register(password_request("sensor-0003"))
    assert refused.value.status == 503
    assert refused.value.code == "registry_full"
    assert int(refused.value.headers["Retry-After"]) > 0
    assert reg.status()["pending"] == 2
    poll = reg.register(password_request("sensor-0001"))
    assert (poll.status, poll.body) == (202, first.body)
    # A decision makes room.
    reg.approve("sensor-0001")
    assert reg.register(password_request("sensor-0003")).status == 202
    reg.close()


def test_new_requests_from_one_address_are_rate_limited_and_polls_are_not(clock, authority):
    """Proves REG-2.4-RATE, REG-2.5-RETRY-AFTER."""
    reg = registry.Registry(clock=clock, ca=authority, settings=registry.Settings(scrypt_n=16, rate_limit=2))
    reg.unlock()
    first = reg.register(password_request("sensor-0001"), "10.0.0.1")
    reg.register(password_request("sensor-0002"), "10.0.0.1")
    with pytest.raises(registry.TooManyRequests) as refused:
        reg.register(password_request("sensor-0003"), "10.0.0.1")
    assert refused.value.status == 429
    assert refused.value.code == "too_many_requests"
    assert int(refused.value.headers["Retry-After"]) > 0
    assert [r["username"] for r in reg.requests()] == ["sensor-0001", "sensor-0002"]
    for _ in range(5):
        assert reg.register(password_request("sensor-0001"), "10.0.0.1").body == first.body
    assert reg.register(password_request("sensor-0003"), "10.0.0.2").status == 202
    clock.advance(seconds=61)
    assert reg.register(password_request("sensor-0004"), "10.0.0.1").status == 202
    reg.close()


# --- Threads -----------------------------------------------------------------


def test_concurrent_clients_leave_one_request_per_username(tmp_path, clock, authority):
    """Proves REG-2.4-PENDING."""
    reg = registry.Registry(str(tmp_path / "registry.db"), clock=clock, ca=authority, settings=FAST)
    reg.unlock()
    usernames = [f"sensor-{n:04d}" for n in range(4)]
    # Two clients per credential: for each username, two credentials race.
    passwords = ["first password", "second password"]
    keys = [make_key() for _ in usernames]
    clients = 6
    start = threading.Barrier(clients + 1)
    answers: list[int] = []
    unexpected: list[BaseException] = []

    def client(number: int) -> None:
        start.wait()
        for _ in range(5):
            for index, username in enumerate(usernames):
                if number == 0:
                    payload = {"username": username, "csr": make_csr(username, keys[index])}
                else:
                    payload = password_request(username, passwords[number % 2])
                try:
                    answers.append(reg.register(payload, f"10.0.0.{number}").status)
                except registry.RegistryError as error:
                    answers.append(error.status)
                except Exception as error:
                    unexpected.append(error)

    def administrator() -> None:
        start.wait()
        for _ in range(5):
            for username in usernames:
                try:
                    reg.approve(username)
                except registry.RegistryError:
                    pass
                except Exception as error:
                    unexpected.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=administrator))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert unexpected == []
    assert sorted(r["username"] for r in reg.requests()) == usernames
    assert {user["username"] for user in reg.users()} <= set(usernames)
    # Three credentials raced for every username; the losers were told 409.
    assert set(answers) <= {201, 202, 409}
    assert 409 in answers
    reg.close()


class CountingLock:
    """The registry's lock, counting the calls that have asked for it."""

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.asked = 0

    def __enter__(self) -> None:
        self.asked += 1
        self.lock.acquire()

    def __exit__(self, *error: object) -> None:
        self.lock.release()


def test_every_approval_answers_its_own_user_however_many_wait(open_reg):
    """Proves ADMIN-4.5-APPROVE-ATOMIC.

    Issue 13: with more approvals waiting than a batch held, the last caller got 200 with null."""
    names = [f"user-{i}" for i in range(111)]
    for name in names:
        assert open_reg.register(password_request(name)).status == 202
    counting = open_reg._lock = CountingLock(open_reg._lock)
    answers: dict[str, object] = {}

    def approve(name: str) -> None:
        answers[name] = open_reg.approve(name)

    with counting.lock:
        threads = [threading.Thread(target=approve, args=(name,)) for name in names[:-1]]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while counting.asked < len(threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counting.asked == len(threads)
        # The last caller, while 110 others wait for the lock (this thread holds it, and may take it again).
        last = open_reg.approve(names[-1])
    for thread in threads:
        thread.join(30)

    assert last["username"] == names[-1]
    assert {name: answer["username"] for name, answer in answers.items()} == {name: name for name in names[:-1]}
    assert [user["username"] for user in open_reg.users()] == sorted(names)
    assert {request["state"] for request in open_reg.requests()} == {"approved"}
    assert sum(entry["action"] == "approve" for entry in open_reg.audit(limit=1000)["entries"]) == len(names)


class FailingCA:
    """The session's CA, whose signing device refuses to sign."""

    def __init__(self, authority: ca.CA) -> None:
        self.certificate_pem = authority.certificate_pem
        self.not_after = authority.not_after
        self.inspect_csr = authority.inspect_csr
        self.inspect_public_key = authority.inspect_public_key

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> ca.IssuedCertificate:
        raise RuntimeError(f"the signing device refused {username}")

    def sign_crl(self, *crl: object) -> bytes:
        return b"a CRL"


def test_an_approval_whose_signature_fails_changes_nothing(clock, authority):
    """Proves ADMIN-4.5-APPROVE-ATOMIC."""
    failing = registry.Registry(clock=clock, ca=FailingCA(authority), settings=FAST)
    failing.unlock()
    request = csr_request("sensor-0001")
    assert failing.register(request).status == 202
    before = snapshot(failing)

    with pytest.raises(RuntimeError, match="refused sensor-0001"):
        failing.approve("sensor-0001")

    assert snapshot(failing) == before
    assert failing.register(request).status == 202
    failing.ca = authority  # the device is back: the same request is approved as if nothing had happened
    assert failing.approve("sensor-0001")["username"] == "sensor-0001"
    assert_issued_from(request["csr"], failing.register(request).body["certificate"], authority)
    failing.close()


# --- A certificate for the verified key, and no other (issue 13) -----------


def with_header(csr_pem: str, header: str = "Comment: hello") -> str:
    """The CSR with RFC 1421 header lines after its BEGIN line, which some PEM readers skip."""
    begin, rest = csr_pem.split("\n", 1)
    return f"{begin}\n{header}\n\n{rest}"


def refused_csr_texts(username: str) -> dict[str, str]:
    """Texts of a ``csr`` field that hold more than one PEM block of a CSR: each must be a 400."""
    first, second = make_csr(username, make_key("ec")), make_csr(username, make_key("rsa1024"))
    return {
        "the reported attack": with_header(first) + second,
        "two requests": first + second,
        "a header": with_header(first),
        "text before": f"my key:\n{first}",
        "text after": f"{first}-- \nsent by the agent\n",
        "a second key of another label": first + second.replace("CERTIFICATE REQUEST", "PUBLIC KEY"),
    }


@pytest.mark.parametrize("case", list(refused_csr_texts("sensor-0001")))
def test_a_csr_field_of_more_than_one_pem_block_is_malformed_and_nothing_is_stored(open_reg, case):
    """Proves REQ-1-CSR-PEM."""
    text = refused_csr_texts("sensor-0001")[case]
    before = snapshot(open_reg)

    with pytest.raises(registry.MalformedRequest) as refused:
        open_reg.register({"username": "sensor-0001", "csr": text})

    assert refused.value.status == 400 and refused.value.code == "malformed_request"
    assert refused.value.message == (
        "'csr' must be one PKCS#10 certificate signing request in exactly one PEM block, from"
        " '-----BEGIN CERTIFICATE REQUEST-----' to"
        " '-----END CERTIFICATE REQUEST-----', with nothing before or after it and no header lines"
    )
    assert snapshot(open_reg) == before


def test_the_certificate_carries_the_key_whose_signature_was_verified(open_reg, authority):
    """Proves CERT-5.3-VERIFIED-KEY.

    The reported attack, had its text been taken: the certificate would carry the RSA 1024 key."""
    key = make_key("ec")
    request = {"username": "sensor-0001", "csr": make_csr("sensor-0001", key)}

    outcome = approved(open_reg, request)

    certificate = x509.load_pem_x509_certificate(outcome.body["certificate"].encode())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    expected = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert certificate.public_key().public_bytes(serialization.Encoding.DER, spki) == expected


OLD_REQUESTS_TABLE = """
CREATE TABLE requests (
    username TEXT PRIMARY KEY, state TEXT NOT NULL, method TEXT NOT NULL, password_hash TEXT, csr TEXT,
    key_sha256 TEXT, pairing_id TEXT NOT NULL, requested TEXT NOT NULL, context TEXT, client_address TEXT,
    created_at INTEGER NOT NULL, last_poll_at INTEGER NOT NULL, poll_count INTEGER NOT NULL DEFAULT 0,
    decided_at INTEGER, reason TEXT
)
"""


def test_a_database_that_kept_csr_texts_keeps_their_verified_keys_and_forgets_an_unproved_one(
    tmp_path, clock, authority
):
    """Proves CERT-5.3-VERIFIED-KEY.

    A database of the version before issue 13 stored each CSR's text: its pending requests carry on."""
    database = tmp_path / "old.db"
    key = make_key("ec")
    sound = make_csr("sensor-0001", key)
    attack = refused_csr_texts("sensor-0002")["the reported attack"]
    now = int((START - registry.EPOCH) / registry.MICROSECOND)
    with sqlite3.connect(database) as old:
        old.execute(OLD_REQUESTS_TABLE)
        for name, text in (("sensor-0001", sound), ("sensor-0002", attack)):
            # The fingerprint and pairing id that registration gave each: that of the first block's key.
            digest = hashlib.sha256(
                x509.load_pem_x509_csr(text.encode())
                .public_key()
                .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            ).hexdigest()
            old.execute(
                "INSERT INTO requests (username, state, method, csr, key_sha256, pairing_id, requested,"
                " created_at, last_poll_at) VALUES (?, 'pending', 'csr', ?, ?, ?, ?, ?, ?)",
                (name, text, digest, digest[:6], registry.Rights().dumps(), now, now),
            )
    old.close()

    reg = registry.Registry(str(database), clock=clock, ca=authority, settings=FAST)

    assert [request["username"] for request in reg.requests()] == ["sensor-0001"]
    assert reg.register({"username": "sensor-0001", "csr": sound}).status == 202  # still the same request
    reg.approve("sensor-0001")
    outcome = reg.register({"username": "sensor-0001", "csr": sound})
    assert_issued_from(sound, outcome.body["certificate"], authority)
    reg.close()


# --- A full disk (issue 19) ----------------------------------------------------


def fill_the_disk(reg: registry.Registry) -> None:
    """Let the database grow no further, as a full disk would (SQLite answers SQLITE_FULL to both), and fill it."""
    pages = reg._store._db.execute("PRAGMA page_count").fetchone()[0]
    reg._store._db.execute(f"PRAGMA max_page_count = {pages}")
    for filler in range(1000):
        try:
            reg.register(password_request(f"filler-{filler:04d}", context="x" * 1000))
        except registry.StorageUnavailable:
            return
    raise AssertionError("the database never filled up")


def free_the_disk(reg: registry.Registry) -> None:
    reg._store._db.execute("PRAGMA max_page_count = 1073741823")


def test_a_full_disk_answers_503_to_new_requests_loses_nothing_and_recovers(open_reg, clock, caplog):
    """Proves STORE-6.2-FULL-DISK."""
    pending = password_request("sensor-0001")
    assert open_reg.register(pending).status == 202
    names = [f"sensor-{i:04d}" for i in range(2, 42)]
    fill_the_disk(open_reg)
    before = snapshot(open_reg)

    refusals = []
    for name in names:
        with pytest.raises(registry.StorageUnavailable) as refused:
            open_reg.register(password_request(name, context="x" * 1000))
        refusals.append(refused.value)

    assert {(error.status, error.code, error.headers["Retry-After"]) for error in refusals} == {
        (503, "storage_unavailable", "30")
    }
    assert refusals[0].message == "the registry cannot store requests now: try again later"
    # Polls of the stored request go on.
    for _ in range(3):
        clock.advance(seconds=2)
        assert open_reg.register(pending).status == 202
    # Logged once a minute, not once a refusal.
    logged = "the database cannot store (disk full?): new requests get 503 until it can"
    assert [r.getMessage() for r in caplog.records if r.name == "registry"] == [logged]
    clock.advance(minutes=1)
    with pytest.raises(registry.StorageUnavailable):
        open_reg.register(password_request(names[0], context="x" * 1000))
    assert [r.getMessage() for r in caplog.records if r.name == "registry"] == [logged, logged]
    free_the_disk(open_reg)
    assert [r["username"] for r in open_reg.requests()] == [r["username"] for r in before[1]]
    assert request_of(open_reg, "sensor-0001")["pollCount"] == 3
    assert open_reg.register(password_request(names[0])).status == 202
    assert open_reg.approve("sensor-0001")["username"] == "sensor-0001"


def test_the_listing_is_read_on_a_full_disk_its_purge_waits(open_reg, clock, monkeypatch):
    """Proves STORE-6.2-FULL-DISK (issue 23 item 6): reading the requests writes nothing that must succeed."""
    assert open_reg.register(password_request("sensor-0001")).status == 202
    clock.advance(hours=23)
    open_reg.unlock()
    assert open_reg.register(password_request("sensor-0002")).status == 202
    clock.advance(hours=2)  # sensor-0001 is past its retention, and due to be purged

    def full(*args: object) -> None:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise error

    monkeypatch.setattr(registry.Store, "purge", full)
    assert [request["username"] for request in open_reg.requests()] == ["sensor-0002"]


def test_the_listing_shows_what_was_granted_and_whether_the_client_has_collected_it(open_reg, clock):
    """Proves ADMIN-4.2-CALLS.

    Issue 18: an approved row shows the granted rights, and "collected" once the client has fetched its 201."""
    request = password_request(roles=["minimum", "operator"], permissions=[READ_TELEMETRY])
    assert open_reg.register(request).status == 202
    assert (request_of(open_reg, "sensor-0001")["granted"], request_of(open_reg, "sensor-0001")["collectedAt"]) == (
        None,
        None,
    )
    clock.advance(minutes=1)
    open_reg.approve("sensor-0001", {"roles": ["minimum"]})

    listed = request_of(open_reg, "sensor-0001")
    assert listed["granted"] == {"roles": ["minimum"], "permissions": [READ_TELEMETRY]}
    assert (listed["roles"], listed["collectedAt"]) == (["minimum", "operator"], None)
    clock.advance(minutes=1)
    assert open_reg.register(request).status == 201
    collected = clock.now
    clock.advance(minutes=1)
    assert open_reg.register(request).status == 201
    assert datetime.fromisoformat(request_of(open_reg, "sensor-0001")["collectedAt"]) == collected


# --- SPEC section 7: the certificate's life ---------------------------------


def crl_of(reg: registry.Registry, authority: ca.CA) -> x509.CertificateRevocationList:
    """The registry's current CRL, whose signature must verify with the CA's key."""
    crl = x509.load_der_x509_crl(reg.crl())
    assert crl.is_signature_valid(authority.certificate.public_key())
    return crl


def renewal(
    reg: registry.Registry, certificate_pem: str, key: object, username: str = "sensor-0001"
) -> registry.Outcome:
    return reg.renew(certificate_der(certificate_pem), {"csr": make_csr(username, key)})


@pytest.fixture
def device(open_reg):
    """An approved CSR client: its key, its request and its 201."""
    key = make_key()
    request = csr_request("sensor-0001", key, roles=["minimum"])
    return key, request, approved(open_reg, request)


def test_every_answer_that_carries_a_certificate_says_when_it_ends_and_when_to_renew(open_reg, device):
    """Proves LIFE-7.1-TIMES, CERT-5.3-VALIDITY."""
    _, _request, admitted = device
    certificate = x509.load_pem_x509_certificate(admitted.body["certificate"].encode())
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc

    assert not_before == START - timedelta(minutes=5)  # clock skew
    assert not_after == not_before + timedelta(days=365)  # LIFE-7.1-TIMES
    assert datetime.fromisoformat(admitted.body["notAfter"]) == not_after
    assert datetime.fromisoformat(admitted.body["renewAfter"]) == not_before + (not_after - not_before) * 2 / 3
    [user] = open_reg.users()
    assert (user["certificateNotAfter"], user["certificateRenewAfter"]) == (
        admitted.body["notAfter"],
        admitted.body["renewAfter"],
    )
    assert user["certificateStatus"] == "valid"


def test_the_users_list_says_when_a_certificate_is_due_for_renewal_and_when_it_has_expired(open_reg, clock, device):
    """Proves LIFE-7.1-TIMES."""
    _, _, admitted = device
    clock.now = datetime.fromisoformat(admitted.body["renewAfter"]) - timedelta(microseconds=1)
    assert open_reg.users()[0]["certificateStatus"] == "valid"
    clock.advance(microseconds=1)
    assert open_reg.users()[0]["certificateStatus"] == "renew"
    clock.now = datetime.fromisoformat(admitted.body["notAfter"])
    assert open_reg.users()[0]["certificateStatus"] == "expired"


def test_a_renewal_with_the_same_key_issues_a_new_current_certificate_and_the_old_one_stays_valid(
    open_reg, clock, device, authority
):
    """Proves LIFE-7.2-RENEW."""
    key, request, admitted = device
    clock.advance(days=300)

    renewed = renewal(open_reg, admitted.body["certificate"], key)

    assert renewed.status == 201
    body = renewed.body
    assert set(body) == {
        "status", "username", "roles", "permissions", "certificate", "caCertificate", "notAfter", "renewAfter"
    }  # fmt: skip
    assert (body["status"], body["username"], body["roles"], body["permissions"]) == (
        "renewed",
        "sensor-0001",
        ["minimum"],
        [],
    )
    new = assert_issued_from(request["csr"], body["certificate"], authority)
    assert new.serial_number != x509.load_pem_x509_certificate(admitted.body["certificate"].encode()).serial_number
    assert new.not_valid_after_utc == new.not_valid_before_utc + timedelta(days=365)
    assert body["caCertificate"] == authority.certificate_pem
    # Renewal is not revocation: both certificates authenticate, each until its own notAfter.
    for pem in (admitted.body["certificate"], body["certificate"]):
        assert open_reg.authenticate_certificate(certificate_der(pem)).username == "sensor-0001"
    [user] = open_reg.users()
    assert user["certificateSerial"] == format(new.serial_number, "x")
    # The approved request repeated now gets the current certificate.
    assert open_reg.register(request).body["certificate"] == body["certificate"]
    [entry] = [e for e in open_reg.audit()["entries"] if e["action"] == "renew"]
    assert entry["details"] == {
        "serial": user["certificateSerial"],
        "from": format(x509.load_pem_x509_certificate(admitted.body["certificate"].encode()).serial_number, "x"),
        "newKey": False,
    }
    clock.now = datetime.fromisoformat(admitted.body["notAfter"])
    with pytest.raises(registry.Unauthorized, match="expired"):
        open_reg.authenticate_certificate(certificate_der(admitted.body["certificate"]))
    assert open_reg.authenticate_certificate(certificate_der(body["certificate"])).username == "sensor-0001"


def test_a_renewal_with_a_new_key_rekeys_and_the_old_key_no_longer_registers(open_reg, device, authority):
    """Proves LIFE-7.2-RENEW."""
    _old_key, request, admitted = device
    new_key = make_key("ed25519")

    renewed = renewal(open_reg, admitted.body["certificate"], new_key)

    assert load_key(renewed.body["certificate"]) == public_der(new_key)
    rekeyed = request | {"csr": make_csr("sensor-0001", new_key)}
    assert open_reg.register(rekeyed).body["certificate"] == renewed.body["certificate"]
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register(request)
    assert refused.value.code == "username_taken"
    [entry] = [e for e in open_reg.audit()["entries"] if e["action"] == "renew"]
    assert entry["details"]["newKey"] is True


def test_a_repeated_renewal_answers_the_certificate_it_issued_so_a_lost_answer_can_be_fetched(open_reg, device):
    """Proves LIFE-7.2-RENEW."""
    key, _, admitted = device
    first = renewal(open_reg, admitted.body["certificate"], key)

    again = renewal(open_reg, admitted.body["certificate"], key)

    assert again.body == first.body
    assert [e["action"] for e in open_reg.audit()["entries"]].count("renew") == 1
    # From the new certificate, a renewal is a new one.
    third = renewal(open_reg, first.body["certificate"], key)
    assert third.body["certificate"] != first.body["certificate"]


def test_a_renewal_never_changes_the_rights(open_reg):
    """Proves LIFE-7.2-RENEW."""
    key = make_key()
    request = csr_request("sensor-0001", key, roles=["minimum", "operator"], permissions=[READ_TELEMETRY])
    admitted = approved(open_reg, request, {"roles": ["minimum"]})

    renewed = renewal(open_reg, admitted.body["certificate"], key)

    assert (renewed.body["roles"], renewed.body["permissions"]) == (["minimum"], [READ_TELEMETRY])


def foreign_certificate() -> str:
    """A client certificate for sensor-0001 from another CA."""
    return issue(ca.CA.create(START, name="Someone Else's CA"), make_csr("sensor-0001"), "sensor-0001", START).pem


@pytest.mark.parametrize("case", ["no certificate", "another CA's", "revoked", "expired", "of a removed user"])
def test_a_renewal_with_a_certificate_that_is_not_current_is_401_and_changes_nothing(open_reg, clock, device, case):
    """Proves LIFE-7.2-RENEW."""
    key, _, admitted = device
    presented = certificate_der(admitted.body["certificate"])
    if case == "no certificate":
        presented = None
    elif case == "another CA's":
        presented = certificate_der(foreign_certificate())
    elif case in ("revoked", "of a removed user"):
        open_reg.remove_user("sensor-0001")
        if case == "of a removed user":  # and the name registered again since
            approved(open_reg, csr_request("sensor-0001", key))
    else:
        clock.now = datetime.fromisoformat(admitted.body["notAfter"])
    before = snapshot(open_reg)

    with pytest.raises(registry.Unauthorized) as refused:
        open_reg.renew(presented, {"csr": make_csr("sensor-0001", key)})

    assert refused.value.status == 401
    assert refused.value.headers["WWW-Authenticate"] == 'Basic realm="client-registry"'
    assert snapshot(open_reg) == before


def test_a_password_user_cannot_renew(open_reg):
    """Proves LIFE-7.2-RENEW."""
    approved(open_reg, password_request("meter-0001"))
    with pytest.raises(registry.Unauthorized, match="client certificate"):
        open_reg.renew(None, {"csr": make_csr("meter-0001")})


@pytest.mark.parametrize(
    ("body", "error", "problem"),
    [
        (None, registry.MalformedRequest, "only 'csr'"),
        ({"csr": "hello"}, registry.MalformedRequest, "exactly one PEM block"),
        ({"csr": make_csr("sensor-0001"), "roles": ["operator"]}, registry.MalformedRequest, "only 'csr'"),
        ({"csr": make_csr("sensor-0002")}, registry.MalformedRequest, "is not the username"),
        ({"csr": make_csr("sensor-0001", make_key("rsa1024"))}, registry.PolicyViolation, "RSA 1024-bit"),
    ],
    ids=["no body", "not a CSR", "another field", "another CN", "a weak key"],
)
def test_a_renewal_csr_follows_the_registration_rules(open_reg, device, body, error, problem):
    """Proves LIFE-7.2-RENEW."""
    _, _, admitted = device
    before = snapshot(open_reg)

    with pytest.raises(error, match=problem):
        open_reg.renew(certificate_der(admitted.body["certificate"]), body)

    assert snapshot(open_reg) == before


def test_removing_a_user_revokes_its_unexpired_certificates_and_a_new_crl_lists_them(
    open_reg, clock, device, authority
):
    """Proves LIFE-7.3-REVOKE, LIFE-7.5-CRL-FRESH."""
    key, _, admitted = device
    renewed = renewal(open_reg, admitted.body["certificate"], key)
    other = approved(open_reg, csr_request("sensor-0002"))
    first = crl_of(open_reg, authority)
    clock.advance(hours=1)

    open_reg.remove_user("sensor-0001")

    crl = crl_of(open_reg, authority)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    serials = {
        x509.load_pem_x509_certificate(pem.encode()).serial_number
        for pem in (admitted.body["certificate"], renewed.body["certificate"])
    }
    assert {entry.serial_number for entry in crl} == serials
    for entry in crl:
        assert entry.revocation_date_utc == clock.now
        assert (
            entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            == x509.ReasonFlags.cessation_of_operation
        )
    for pem in (admitted.body["certificate"], renewed.body["certificate"]):
        with pytest.raises(registry.Unauthorized, match="revoked"):
            open_reg.authenticate_certificate(certificate_der(pem))
    assert open_reg.authenticate_certificate(certificate_der(other.body["certificate"])).username == "sensor-0002"
    [entry] = [e for e in open_reg.audit()["entries"] if e["action"] == "remove user"]
    assert entry["details"] == {"revokedCertificates": 2}


def test_the_crl_has_its_number_issuer_times_and_authority_key_identifier(open_reg, clock, authority):
    """Proves LIFE-7.4-CRL."""
    crl = crl_of(open_reg, authority)

    assert crl.issuer == authority.certificate.subject
    assert crl.last_update_utc == START
    assert crl.next_update_utc == START + timedelta(days=7)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    identifier = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    ca_identifier = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert identifier == ca_identifier
    assert list(crl) == []
    assert open_reg.status()["crl"] == {"number": 1, "nextUpdate": "2026-01-08T12:00:00.000+00:00"}


def test_the_crl_is_signed_anew_before_half_of_its_validity_is_gone(open_reg, clock, authority):
    """Proves LIFE-7.5-CRL-FRESH."""
    clock.advance(days=3, hours=12)  # exactly half left: not yet
    open_reg.refresh_crl()
    assert open_reg.status()["crl"]["number"] == 1
    clock.advance(microseconds=1)

    open_reg.refresh_crl()

    crl = crl_of(open_reg, authority)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert crl.next_update_utc == (clock.now + timedelta(days=7)).replace(microsecond=0)
    assert open_reg.status()["crl"]["number"] == 2


def test_a_revoked_certificate_leaves_the_crl_once_it_has_expired(open_reg, clock, device, authority):
    """Proves LIFE-7.4-CRL."""
    _, _, admitted = device
    open_reg.remove_user("sensor-0001")
    assert len(list(crl_of(open_reg, authority))) == 1
    clock.now = datetime.fromisoformat(admitted.body["notAfter"])
    clock.advance(days=4)

    open_reg.refresh_crl()

    assert list(crl_of(open_reg, authority)) == []


def test_a_registry_without_a_ca_has_no_crl(clock):
    bare = registry.Registry(clock=clock, settings=FAST)
    with pytest.raises(registry.NotFound):
        bare.crl()
    assert bare.status()["crl"] is None
    bare.close()


def load_key(certificate_pem: str) -> bytes:
    return public_der(x509.load_pem_x509_certificate(certificate_pem.encode()))


def public_der(holder: object) -> bytes:
    """The SubjectPublicKeyInfo of a private key or a certificate."""
    return holder.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- The audit trail ---------------------------------------------------------


def test_the_audit_trail_records_a_lifecycle_newest_first_and_pages(reg, clock, authority):
    """Proves ADMIN-4.8-EXTRA."""
    reg.unlock(address="192.0.2.9")
    clock.advance(seconds=1)
    admitted = approved(reg, csr_request("sensor-0001", roles=["minimum"]))
    serial = x509.load_pem_x509_certificate(admitted.body["certificate"].encode()).serial_number
    reg.register(password_request("sensor-0002"), "10.0.0.2")
    reg.deny("sensor-0002", {"reason": "unknown device"}, address="192.0.2.9")
    reg.register(password_request("sensor-0003"))
    reg.forget("sensor-0003")
    reg.remove_user("sensor-0001")
    clock.advance(seconds=1)
    reg.lock()

    entries = reg.audit()["entries"]
    assert [(e["action"], e["username"]) for e in entries] == [
        ("lock", None),
        ("remove user", "sensor-0001"),
        ("forget", "sensor-0003"),
        ("request", "sensor-0003"),
        ("deny", "sensor-0002"),
        ("request", "sensor-0002"),
        ("approve", "sensor-0001"),
        ("request", "sensor-0001"),
        ("unlock", None),
    ]
    lock, deny, request, approve, unlock = entries[0], entries[4], entries[5], entries[6], entries[8]
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    assert datetime.fromisoformat(lock["at"]) == START + timedelta(seconds=2)
    assert (unlock["actor"], unlock["address"], unlock["details"]) == (
        "administrator",
        "192.0.2.9",
        {"durationMs": 300_000},
    )
    assert int(approve["details"]["serial"], 16) == serial
    assert approve["details"]["granted"] == {"roles": ["minimum"], "permissions": []}
    assert (deny["details"], deny["address"]) == ({"reason": "unknown device"}, "192.0.2.9")
    assert (request["actor"], request["address"]) == ("sensor-0002", "10.0.0.2")

    pages, before = [], None
    while True:
        page = reg.audit(limit=4, before=before)
        pages.append(page["entries"])
        before = page["next"]
        if before is None:
            break
    assert [len(page) for page in pages] == [4, 4, 1]
    assert [entry for page in pages for entry in page] == entries


def test_polls_and_rejected_requests_leave_no_audit_entry(open_reg):
    """Proves ADMIN-4.8-EXTRA."""
    open_reg.register(password_request())
    trail = open_reg.audit()
    open_reg.register(password_request())
    with pytest.raises(registry.Conflict):
        open_reg.register(password_request(password="another password"))
    assert open_reg.audit() == trail


# --- Bodies as bytes: the poll that skips parsing -----------------------------


def body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def test_a_body_repeated_as_bytes_polls_and_sees_each_decision(open_reg):
    """Proves REG-2.4-PENDING, REG-2.4-USER."""
    request = body(password_request(roles=["minimum"]))
    first = open_reg.register_body(request, "10.0.0.1")
    assert open_reg.register_body(request, "10.0.0.2") == first
    assert request_of(open_reg, "sensor-0001")["pollCount"] == 1
    assert request_of(open_reg, "sensor-0001")["clientAddress"] == "10.0.0.2"
    open_reg.approve("sensor-0001")
    assert open_reg.register_body(request).status == 201


def test_a_remembered_body_does_not_match_a_new_request_for_the_same_name(open_reg):
    """Proves REG-2.4-MATCH."""
    old = body(password_request(password="first-password"))
    assert open_reg.register_body(old).status == 202
    open_reg.forget("sensor-0001")
    assert open_reg.register_body(body(password_request(password="other-password"))).status == 202
    with pytest.raises(registry.Conflict) as refused:
        open_reg.register_body(old)
    assert refused.value.code == "duplicate_request"


def test_a_remembered_csr_body_does_not_match_other_rights_for_the_same_key(open_reg):
    """Proves REG-2.4-MATCH."""
    key = make_key()
    csr = make_csr("sensor-0001", key)
    old = body({"username": "sensor-0001", "csr": csr, "roles": ["minimum"]})
    assert open_reg.register_body(old).status == 202
    open_reg.forget("sensor-0001")
    assert open_reg.register_body(body({"username": "sensor-0001", "csr": csr, "roles": ["operator"]})).status == 202
    with pytest.raises(registry.Conflict):
        open_reg.register_body(old)


def test_a_remembered_body_is_denied_and_expires_like_any_other(open_reg, clock):
    """Proves REG-2.4-DENIED, REG-2.5-RETENTION."""
    request = body(password_request())
    open_reg.register_body(request)
    open_reg.register_body(request)
    open_reg.deny("sensor-0001", {"reason": "not ours"})
    with pytest.raises(registry.Denied):
        open_reg.register_body(request)
    clock.advance(hours=25)
    with pytest.raises(registry.Locked):
        open_reg.register_body(request)


@pytest.mark.parametrize("raw", [b"{", b"\xff", '{"username": "x"}'.encode("utf-16"), b"[" * 100_000])
def test_a_body_that_is_not_json_in_utf8_is_malformed(open_reg, raw):
    """Proves REQ-1-UTF8."""
    with pytest.raises(registry.MalformedRequest, match="not JSON"):
        open_reg.register_body(raw)


def test_an_mqtt_resource_with_a_null_character_is_malformed(open_reg):
    """Proves REQ-1-PERMISSION."""
    # MQTT 3.1.1 section 4.7.3: a topic holds no U+0000.
    permission = {"resource": "plant/\0/line", "operation": "read", "context": "mqtt"}
    with pytest.raises(registry.MalformedRequest, match="MQTT topic filter"):
        open_reg.register(password_request(permissions=[permission]))

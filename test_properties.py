"""The status rules of SPEC section 2 as properties; the stateful model of the whole contract is test_stateful.py.

The first half states one rule of ``SPEC.md`` per test, over
requests that hypothesis generates: exactly one of ``password`` and ``csr``;
the CSR's Common Name equal to the username; the order of the checks (400,
then 422, then the stored request, then 423), each check alone and all of
them mixed; the username, password, key and context limits at their
boundaries; unknown fields, wrong types, raw bodies; the permissions table;
the lock window and the retention period; what a 201 carries; and that a
rejected command changes nothing.

Where SPEC is silent the tests follow the registry's documented reading: an
approval body's field left out stays as requested, and a denied request's
retention starts at the denial.

Keys are slow to make, so a small pool is made once, here; signing a CSR
with one of them is fast enough to do inside an example.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from hypothesis import example, given, note
from hypothesis import strategies as st

import ca
import fastpath
import registry
from conftest import FAST, START, FakeClock, assert_issued_from, make_key, without_poll_statistics

# The tests send CSRs whose Common Name is empty or longer than the 64
# characters of RFC 5280's ub-common-name on purpose; cryptography warns
# when it reads one back.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

Key = CertificateIssuerPrivateKeyTypes
Payload = dict[str, Any]
Rights = tuple[frozenset[str], frozenset[tuple[str, str, str]]]

CATALOG = ("minimum", "operator")
GOOD_PASSWORD = "correct horse"
OTHER_PASSWORD = "battery staple"
RETENTION = timedelta(hours=24)
DEFAULT_UNLOCK = timedelta(minutes=5)
MQTT_READ = {"resource": "plant/+/temperature", "operation": "read", "context": "mqtt"}
HTTP_WRITE = {"resource": "/api/telemetry", "operation": "write", "context": "http"}
A_REQUEST = {"username": "sensor-0003", "password": GOOD_PASSWORD}

# SPEC section 2.3: the keys the registry accepts, and some it refuses.
ACCEPTED = {
    "P-256": make_key("ec"),
    "another P-256": make_key("ec"),
    "P-384": make_key("p384"),
    "Ed25519": make_key("ed25519"),
    "RSA 2048": make_key("rsa"),
}
REFUSED = {"P-521": make_key("p521"), "RSA 1024": make_key("rsa1024"), "Ed448": ed448.Ed448PrivateKey.generate()}
ACCEPTED_KEYS, REFUSED_KEYS = tuple(ACCEPTED.values()), tuple(REFUSED.values())


# --- Oracles: the rules of SPEC sections 1 and 2, written from the SPEC ----


def username_conforms(name: str) -> bool:
    """SPEC 2.3: 3 to 64 characters matching ``^[A-Za-z0-9][A-Za-z0-9._-]*$`` (no trailing newline)."""
    return 3 <= len(name) <= 64 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None


def password_conforms(password: str) -> bool:
    """SPEC 2.3: at least 5 and at most 1024 characters."""
    return 5 <= len(password) <= 1024


def wildcards_placed(topic: str) -> bool:
    """MQTT 3.1.1 section 4.7.1, character by character: '+' fills a whole level, '#' is the whole last level."""
    for index, char in enumerate(topic):
        before = topic[index - 1] if index else "/"
        after = topic[index + 1] if index + 1 < len(topic) else "/"
        if char == "#" and (before != "/" or index != len(topic) - 1):
            return False
        if char == "+" and (before != "/" or after != "/"):
            return False
    return True


def permission_conforms(permission: object) -> bool:
    """SPEC section 1's permissions table, for one permission object."""
    if not isinstance(permission, dict) or set(permission) != {"resource", "operation", "context"}:
        return False
    resource, operation, context = permission["resource"], permission["operation"], permission["context"]
    if not isinstance(operation, str) or operation not in ("read", "write", "readWrite"):
        return False
    if not isinstance(context, str) or context not in ("mqtt", "http"):
        return False
    if not isinstance(resource, str) or not resource:
        return False
    if context == "http":
        return resource.startswith("/")
    return "\0" not in resource and wildcards_placed(resource)  # MQTT 3.1.1 section 4.7.3: no U+0000


# --- Helpers ---------------------------------------------------------------


def csr_for(common_name: str | None, key: Key) -> str:
    """A PEM CSR with subject CN ``common_name`` (none when None), signed by ``key``.

    Unlike conftest's ``make_csr`` the CN may be empty or over 64
    characters: cryptography refuses such names unless told not to check,
    and the registry has to refuse them itself.
    """
    attributes = [] if common_name is None else [x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)]
    # EdDSA signs the message itself: cryptography takes no hash for it.
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes)).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def with_broken_signature(csr_pem: str) -> str:
    """The CSR with the last byte of its signature flipped: it parses, but proves no possession."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def without(payload: Payload, *names: str) -> Payload:
    return {name: value for name, value in payload.items() if name not in names}


def with_csr(payload: Payload, csr_pem: str) -> Payload:
    """The payload with ``csr_pem`` as its only credential."""
    return without(payload, "password") | {"csr": csr_pem}


def request_for(username: str, method: str, key: Key) -> Payload:
    """A well-formed, policy-conforming request with every optional field."""
    payload = {"username": username, "roles": ["minimum"], "permissions": [MQTT_READ], "context": "line 3, cabinet 2"}
    if method == "password":
        return payload | {"password": GOOD_PASSWORD}
    return payload | {"csr": csr_for(username, key)}


def rights_of(roles: list[str], permissions: list[dict[str, str]]) -> Rights:
    """Rights as the model compares them: order and repeats are immaterial."""
    return frozenset(roles), frozenset((p["resource"], p["operation"], p["context"]) for p in permissions)


def granted_by(requested: Rights, grant: dict[str, Any] | None) -> Rights:
    """What an approval grants: the body's roles and permissions; a field left out stays as requested."""
    grant = grant or {}
    roles, permissions = rights_of(grant.get("roles", []), grant.get("permissions", []))
    return (roles if "roles" in grant else requested[0]), (permissions if "permissions" in grant else requested[1])


@contextmanager
def opened(authority: ca.CA, *, locked: bool = False, clock: FakeClock | None = None) -> Iterator[registry.Registry]:
    """A fresh in-memory registry (conftest's catalog, fast scrypt), locked or unlocked."""
    instance = registry.Registry(clock=clock or FakeClock(), ca=authority, roles=CATALOG, settings=FAST)
    try:
        if not locked:
            instance.unlock()
        yield instance
    finally:
        instance.close()


def answer(
    reg: registry.Registry, payload: object, address: str = ""
) -> tuple[HTTPStatus, dict[str, Any], dict[str, str]]:
    """What the server would answer to ``payload`` (parsed JSON, or the raw body) from ``address``: status, JSON
    body and headers."""
    try:
        outcome = reg.register_body(payload, address) if isinstance(payload, bytes) else reg.register(payload, address)
    except registry.RegistryError as error:
        assert_error_body(error.body())
        return error.status, error.body(), error.headers
    return outcome.status, outcome.body, outcome.headers


def assert_error_body(body: dict[str, Any], code: str | None = None) -> None:
    """SPEC section 2: every error is ``{"error", "message"}``, with ``details`` where several things are wrong."""
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body.get("details", []), list)
    if code is not None:
        assert body["error"] == code


def snapshot(reg: registry.Registry) -> tuple[object, ...]:
    """Everything an administrator can see of the registry."""
    return reg.status(), reg.requests(), reg.users(), reg.audit(limit=10_000)


def store(reg: registry.Registry, payload: Payload, state: str) -> None:
    """Register ``payload`` (the registry is unlocked) and decide it into ``state``."""
    assert answer(reg, payload)[0] == HTTPStatus.ACCEPTED
    if state == "approved":
        reg.approve(payload["username"])
    elif state == "denied":
        reg.deny(payload["username"], {"reason": "not one of ours"})


# --- Strategies --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
not_strings = json_values.filter(lambda value: not isinstance(value, str))
accepted_keys = st.sampled_from(ACCEPTED_KEYS)
refused_keys = st.sampled_from(REFUSED_KEYS)
conforming_usernames = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}", fullmatch=True)
usernames = st.one_of(conforming_usernames, st.text(max_size=70))
optional_fields = st.fixed_dictionaries(
    {},
    optional={
        "roles": st.lists(st.sampled_from(CATALOG), max_size=3),
        "permissions": st.lists(st.sampled_from([MQTT_READ, HTTP_WRITE]), max_size=2),
        "context": st.text(max_size=40),
    },
)
# Resources over a small alphabet, so that every placement of '/', '+'
# and '#' comes up, and over any text.
resources = st.one_of(st.text("ab/+#", max_size=8), st.text(max_size=12), st.text(max_size=8).map("/".__add__))
permission_objects = st.one_of(
    st.fixed_dictionaries(
        {
            "resource": resources,
            "operation": st.sampled_from(["read", "write", "readWrite"]),
            "context": st.sampled_from(["mqtt", "http"]),
        }
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "resource": resources | json_values,
            "operation": st.sampled_from(["read", "write", "readWrite", "Read", "readwrite", ""]) | json_values,
            "context": st.sampled_from(["mqtt", "http", "MQTT", "https", ""]) | json_values,
            "qos": json_values,
        },
    ),
    json_values,
)
WRONG_TYPES = {
    "username": not_strings,
    "password": not_strings,
    "csr": not_strings,
    "context": not_strings,
    "roles": st.one_of(
        json_values.filter(lambda value: not isinstance(value, list)),
        st.lists(json_values, min_size=1, max_size=3).filter(lambda roles: not all(isinstance(r, str) for r in roles)),
    ),
    "permissions": st.one_of(
        json_values.filter(lambda value: not isinstance(value, list)),
        st.lists(json_values.filter(lambda value: not isinstance(value, dict)), min_size=1, max_size=3),
        st.tuples(st.sampled_from(sorted(MQTT_READ)), not_strings).map(lambda wrong: [MQTT_READ | dict([wrong])]),
    ),
}


# --- Password XOR CSR, and the Common Name -----------------------------------


@given(
    has_password=st.booleans(), has_csr=st.booleans(), extra=optional_fields, key=accepted_keys, locked=st.booleans()
)
def test_exactly_one_of_password_and_csr(
    authority: ca.CA, has_password: bool, has_csr: bool, extra: Payload, key: Key, locked: bool
) -> None:
    """Both credentials or neither is 400; exactly one goes on to the lock (423 or 202)."""
    payload = {"username": "sensor-0003", **extra}
    if has_password:
        payload["password"] = GOOD_PASSWORD
    if has_csr:
        payload["csr"] = csr_for("sensor-0003", key)
    with opened(authority, locked=locked) as reg:
        status, body, _ = answer(reg, payload)
    if has_password == has_csr:
        assert status == HTTPStatus.BAD_REQUEST, body
    else:
        assert status == (HTTPStatus.LOCKED if locked else HTTPStatus.ACCEPTED), body


COMMON_NAMES: dict[str, Callable[[str, str], str | None]] = {
    "missing": lambda username, other: None,
    "empty": lambda username, other: "",
    "the username": lambda username, other: username,
    "upper case": lambda username, other: username.upper(),
    "lower case": lambda username, other: username.lower(),
    "with a trailing space": lambda username, other: username + " ",
    "with a leading space": lambda username, other: " " + username,
    "with a trailing newline": lambda username, other: username + "\n",
    "one character short": lambda username, other: username[:-1],
    "one character more": lambda username, other: username + "0",
    "another first character": lambda username, other: "x" + username[1:],
    "any text": lambda username, other: other,
}


@given(
    username=usernames,
    variant=st.sampled_from(sorted(COMMON_NAMES)),
    other=st.text(),
    key=accepted_keys,
    locked=st.booleans(),
)
@example(username="", variant="the username", other="", key=ACCEPTED_KEYS[0], locked=False)
@example(username="sensor-0003", variant="any text", other="sensor-0003", key=ACCEPTED_KEYS[0], locked=False)
def test_the_common_name_must_be_the_username(
    authority: ca.CA, username: str, variant: str, other: str, key: Key, locked: bool
) -> None:
    """A missing, empty or different CN is 400; the username's own CN goes on to policy and the lock."""
    common_name = COMMON_NAMES[variant](username, other)
    with opened(authority, locked=locked) as reg:
        status, body, _ = answer(reg, {"username": username, "csr": csr_for(common_name, key)})
    if not common_name or common_name != username:
        assert status == HTTPStatus.BAD_REQUEST, body
    elif not username_conforms(username):
        assert status == HTTPStatus.UNPROCESSABLE_ENTITY, body
    else:
        assert status == (HTTPStatus.LOCKED if locked else HTTPStatus.ACCEPTED), body


# --- The order of the checks -------------------------------------------------

# Each makes a request malformed (SPEC 2.2), given the request, its username
# and an accepted key; applied in any order, the last one applied stays.
MALFORMATIONS: dict[str, Callable[[Payload, str, Key], Payload]] = {
    "an unknown field": lambda p, u, k: p | {"colour": "blue"},
    "no username": lambda p, u, k: without(p, "username"),
    "a username that is not a string": lambda p, u, k: p | {"username": [u]},
    "both credentials": lambda p, u, k: p | {"password": GOOD_PASSWORD, "csr": csr_for(u, k)},
    "no credential": lambda p, u, k: without(p, "password", "csr"),
    "roles that are not a list": lambda p, u, k: p | {"roles": "minimum"},
    "a permission that breaks the table": lambda p, u, k: p | {"permissions": [MQTT_READ | {"resource": "a/#/b"}]},
    "a context over 1024 characters": lambda p, u, k: p | {"context": "x" * 1025},
    "a CSR that does not parse": lambda p, u, k: with_csr(p, "-----BEGIN CERTIFICATE REQUEST-----\nbm9uZQ==\n"),
    "a CSR whose signature does not verify": lambda p, u, k: with_csr(p, with_broken_signature(csr_for(u, k))),
    "a CSR without a Common Name": lambda p, u, k: with_csr(p, csr_for(None, k)),
    "a CSR for another Common Name": lambda p, u, k: with_csr(p, csr_for(u + "x", k)),
}

# Each breaks one policy rule (SPEC 2.3) of a well-formed request, given the
# request, its username and a key the registry refuses; by credential.
POLICY_BREACHES: dict[str, dict[str, Callable[[Payload, str, Key], Payload]]] = {
    "password": {
        "a password under 5 characters": lambda p, u, k: p | {"password": "abcd"},
        "a password over 1024 characters": lambda p, u, k: p | {"password": "x" * 1025},
        "a role outside the catalog": lambda p, u, k: p | {"roles": ["minimum", "root"]},
    },
    "csr": {
        "a role outside the catalog": lambda p, u, k: p | {"roles": ["minimum", "root"]},
        "a key the registry refuses": lambda p, u, k: p | {"csr": csr_for(u, k)},
    },
}

ANSWER_TO_A_REPEAT = {
    "pending": HTTPStatus.ACCEPTED,
    "approved": HTTPStatus.CREATED,
    "denied": HTTPStatus.FORBIDDEN,
}
nonconforming_usernames = st.one_of(
    st.sampled_from(["ab", "a" * 65, "-abc", ".abc", "_abc", "ab c", "abc/", "äbc"]),
    st.text(min_size=1, max_size=70).filter(lambda name: not username_conforms(name)),
)


def broken(
    payload: Payload, username: str, breaches: list[str], malformations: list[str], data: st.DataObject
) -> Payload:
    """``payload`` with the policy ``breaches`` and then the ``malformations`` applied, in their order."""
    method = "password" if "password" in payload else "csr"
    refused = data.draw(refused_keys, label="refused key")
    for breach in breaches:
        payload = POLICY_BREACHES[method][breach](payload, username, refused)
    key = data.draw(accepted_keys, label="key for malformations")
    for malformation in malformations:
        payload = MALFORMATIONS[malformation](payload, username, key)
    return payload


def answer_in_state(
    authority: ca.CA, payload: Payload, clean: Payload, prior: str | None, locked: bool
) -> tuple[HTTPStatus, dict[str, Any]]:
    """The answer to ``payload`` from a registry holding ``clean`` as ``prior`` (or nothing), locked or not.

    Whatever the answer, a refusal must have changed nothing.
    """
    with opened(authority) as reg:
        if prior is not None:
            store(reg, clean, prior)
        if locked:
            reg.lock()
        before = snapshot(reg)
        status, body, _ = answer(reg, payload)
        if status >= HTTPStatus.BAD_REQUEST:
            assert snapshot(reg) == before
    return status, body


def some(data: st.DataObject, choices: dict[str, object], label: str) -> list[str]:
    """Any of ``choices``' names, in any order."""
    return data.draw(st.lists(st.sampled_from(sorted(choices)), unique=True), label=label)


@pytest.mark.parametrize("malformation", sorted(MALFORMATIONS))
@given(data=st.data(), method=st.sampled_from(["password", "csr"]), locked=st.booleans())
def test_a_malformed_request_is_400_whatever_else_holds(
    authority: ca.CA, malformation: str, data: st.DataObject, method: str, locked: bool
) -> None:
    """SPEC 2.2 comes first: whatever policy it breaks, whatever is stored, locked or not."""
    username = data.draw(usernames, label="username")
    clean = request_for(username, method, data.draw(accepted_keys, label="key"))
    others = some(data, MALFORMATIONS, "other malformations")
    breaches = some(data, POLICY_BREACHES[method], "breaches")
    payload = broken(clean, username, breaches, [*others, malformation], data)
    prior = (
        data.draw(st.sampled_from([None, *ANSWER_TO_A_REPEAT]), label="prior") if username_conforms(username) else None
    )
    status, body = answer_in_state(authority, payload, clean, prior, locked)
    assert status == HTTPStatus.BAD_REQUEST, body


POLICY_RULES = [
    *((method, breach) for method, breaches in POLICY_BREACHES.items() for breach in breaches),
    ("password", "a username outside the policy"),
    ("csr", "a username outside the policy"),
]


@pytest.mark.parametrize(("method", "breach"), POLICY_RULES)
@given(data=st.data(), locked=st.booleans())
def test_a_policy_breach_is_422_whatever_the_state(
    authority: ca.CA, method: str, breach: str, data: st.DataObject, locked: bool
) -> None:
    """SPEC 2.3 comes next: a well-formed request that breaks policy is 422, whatever is stored, locked or not."""
    outside = breach == "a username outside the policy"
    username = data.draw(nonconforming_usernames if outside else conforming_usernames, label="username")
    clean = request_for(username, method, data.draw(accepted_keys, label="key"))
    breaches = [] if outside else [*some(data, POLICY_BREACHES[method], "other breaches"), breach]
    payload = broken(clean, username, breaches, [], data)
    prior = None if outside else data.draw(st.sampled_from([None, *ANSWER_TO_A_REPEAT]), label="prior")
    status, body = answer_in_state(authority, payload, clean, prior, locked)
    assert status == HTTPStatus.UNPROCESSABLE_ENTITY, body


@given(data=st.data(), method=st.sampled_from(["password", "csr"]), locked=st.booleans())
def test_the_first_rule_that_applies_decides(authority: ca.CA, data: st.DataObject, method: str, locked: bool) -> None:
    """400 before 422 before the stored request before 423, over any mix of defects and states."""
    username = data.draw(usernames, label="username")
    clean = request_for(username, method, data.draw(accepted_keys, label="key"))
    breaches = some(data, POLICY_BREACHES[method], "breaches")
    malformations = some(data, MALFORMATIONS, "malformations")
    payload = broken(clean, username, breaches, malformations, data)
    # A conforming request for the username may be stored first: the
    # request under test is then that request itself, or a broken one.
    prior = (
        data.draw(st.sampled_from([None, *ANSWER_TO_A_REPEAT]), label="prior") if username_conforms(username) else None
    )
    status, body = answer_in_state(authority, payload, clean, prior, locked)
    # An empty username makes an empty CN: that is malformed before it breaks policy.
    if malformations or (method == "csr" and not username):
        assert status == HTTPStatus.BAD_REQUEST, body
    elif breaches or not username_conforms(username):
        assert status == HTTPStatus.UNPROCESSABLE_ENTITY, body
    elif prior is not None:
        assert status == ANSWER_TO_A_REPEAT[prior], body
    else:
        assert status == (HTTPStatus.LOCKED if locked else HTTPStatus.ACCEPTED), body


@pytest.mark.parametrize(
    ("key", "accepted"),
    [pytest.param(key, True, id=name) for name, key in ACCEPTED.items()]
    + [pytest.param(key, False, id=name) for name, key in REFUSED.items()],
)
def test_the_key_policy(reg: registry.Registry, key: Key, accepted: bool) -> None:
    """SPEC 2.3: RSA of 2048 bits or more, EC P-256 or P-384, Ed25519; nothing else."""
    reg.unlock()
    status, body, _ = answer(reg, {"username": "sensor-0003", "csr": csr_for("sensor-0003", key)})
    assert status == (HTTPStatus.ACCEPTED if accepted else HTTPStatus.UNPROCESSABLE_ENTITY), body


@pytest.mark.parametrize(("length", "accepted"), [(0, True), (1024, True), (1025, False)])
def test_the_context_limit(reg: registry.Registry, length: int, accepted: bool) -> None:
    """SPEC 1: a context of at most 1024 characters; a longer one is malformed."""
    reg.unlock()
    status, body, _ = answer(reg, {"username": "sensor-0003", "password": GOOD_PASSWORD, "context": "é" * length})
    assert status == (HTTPStatus.ACCEPTED if accepted else HTTPStatus.BAD_REQUEST), body


# --- A certificate for the key that was verified (issue 13) ------------------

# Ways to write one PEM block that readers agree on (RFC 7468 section 3 and 7).
PEM_WRITINGS: dict[str, Callable[[str], str]] = {
    "as made": lambda pem: pem,
    "older label": lambda pem: pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
    "CRLF": lambda pem: pem.replace("\n", "\r\n"),
    "no line breaks": lambda pem: pem.replace("\n", ""),
    "trailing spaces": lambda pem: pem.replace("\n", " \n"),
    "body on one line": lambda pem: "{}\n{}\n{}".format(
        pem.split("\n")[0], "".join(pem.strip().split("\n")[1:-1]), pem.strip().split("\n")[-1]
    ),
}


def spki(key: object) -> bytes:
    """The SubjectPublicKeyInfo DER of a public key (RFC 5280 section 4.1.2.7)."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@given(
    key=accepted_keys,
    writing=st.sampled_from(sorted(PEM_WRITINGS)),
    before=st.text(" \t\r\n", max_size=3),
    after=st.text(" \t\r\n", max_size=3),
)
def test_the_certificate_carries_the_key_of_the_csr_that_was_verified(
    authority: ca.CA, key: Key, writing: str, before: str, after: str
) -> None:
    text = before + PEM_WRITINGS[writing](csr_for("sensor-0003", key)) + after
    verified = x509.load_pem_x509_csr(text.encode())
    assert verified.is_signature_valid
    with opened(authority) as reg:
        assert reg.register({"username": "sensor-0003", "csr": text}).status == HTTPStatus.ACCEPTED
        reg.approve("sensor-0003")
        outcome = reg.register({"username": "sensor-0003", "csr": text})

    certificate = x509.load_pem_x509_certificate(outcome.body["certificate"].encode())
    assert spki(certificate.public_key()) == spki(verified.public_key()) == spki(key.public_key())
    certificate.verify_directly_issued_by(authority.certificate)


# --- A revoked or expired certificate never authenticates (SPEC section 7) ----

life_steps = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 400)),
        st.tuples(st.just("renew"), st.booleans()),
        st.just(("remove",)),
        st.just(("register again",)),
    ),
    max_size=8,
)


@given(steps=life_steps)
def test_a_certificate_authenticates_exactly_while_it_is_issued_unrevoked_and_unexpired(
    authority: ca.CA, steps: list[tuple]
) -> None:
    clock = FakeClock()
    keys = [ACCEPTED[name] for name in ("P-256", "another P-256")]
    issued: dict[str, dict[str, Any]] = {}  # certificate PEM -> its notAfter, and whether it was revoked

    def keep(body: dict[str, Any]) -> None:
        issued.setdefault(body["certificate"], {"notAfter": datetime.fromisoformat(body["notAfter"]), "revoked": False})

    with opened(authority, clock=clock) as reg:
        request = {"username": "sensor-0003", "csr": csr_for("sensor-0003", keys[0])}
        reg.register(request)
        reg.approve("sensor-0003")
        keep(reg.register(request).body)
        current = next(iter(issued))
        for step in steps:
            note(f"{step}")
            if step[0] == "advance":
                clock.advance(days=step[1])
            elif step[0] == "renew" and current is not None:
                der = x509.load_pem_x509_certificate(current.encode()).public_bytes(serialization.Encoding.DER)
                try:
                    body = reg.renew(der, {"csr": csr_for("sensor-0003", keys[step[1]])}).body
                except registry.Unauthorized:
                    assert clock.now >= issued[current]["notAfter"]
                else:
                    keep(body)
                    current = body["certificate"]
            elif step[0] == "remove" and current is not None:
                reg.remove_user("sensor-0003")
                for state in issued.values():
                    state["revoked"] = state["revoked"] or clock.now < state["notAfter"]
                current = None
            elif step[0] == "register again" and current is None:
                reg.unlock()
                reg.register(request)
                reg.approve("sensor-0003")
                keep(reg.register(request).body)
                current = list(issued)[-1]
            for pem, state in issued.items():
                der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
                valid = not state["revoked"] and clock.now < state["notAfter"]
                try:
                    reg.authenticate_certificate(der)
                except registry.Unauthorized:
                    assert not valid
                else:
                    assert valid


# --- The username and password policies --------------------------------------

USERNAME_CASES = [
    ("ab", False),
    ("abc", True),
    ("a" * 64, True),
    ("a" * 65, False),
    ("sensor-0003", True),
    ("0-9", True),
    ("Z._", True),
    ("a.b_c-D", True),
    ("-abc", False),
    (".abc", False),
    ("_abc", False),
    ("abc-", True),
    ("ab c", False),
    ("abc/", False),
    ("abc@host", False),
    ("abc\n", False),
    ("\nabc", False),
    ("äbc", False),
    ("abc\u0000", False),
]


@pytest.mark.parametrize("method", ["password", "csr"])
@pytest.mark.parametrize(("username", "conforms"), USERNAME_CASES)
def test_the_username_policy_at_its_boundaries(
    reg: registry.Registry, method: str, username: str, conforms: bool
) -> None:
    """3 to 64 characters, letters, digits, '.', '_' and '-', starting with a letter or a digit."""
    reg.unlock()
    status, body, _ = answer(reg, request_for(username, method, ACCEPTED_KEYS[0]))
    assert status == (HTTPStatus.ACCEPTED if conforms else HTTPStatus.UNPROCESSABLE_ENTITY), body


@given(username=usernames)
def test_the_username_policy(authority: ca.CA, username: str) -> None:
    """Over any username: 202 when it conforms to SPEC 2.3, 422 otherwise."""
    with opened(authority) as reg:
        status, body, _ = answer(reg, {"username": username, "password": GOOD_PASSWORD})
    assert status == (HTTPStatus.ACCEPTED if username_conforms(username) else HTTPStatus.UNPROCESSABLE_ENTITY), body


@pytest.mark.parametrize("method", ["password", "csr"])
def test_sensor_0003_registers(reg: registry.Registry, authority: ca.CA, method: str) -> None:
    """SPEC 2.3: the hyphen is allowed, so 'sensor-0003' goes all the way to 201."""
    reg.unlock()
    payload = request_for("sensor-0003", method, ACCEPTED_KEYS[0])
    assert answer(reg, payload)[0] == HTTPStatus.ACCEPTED
    reg.approve("sensor-0003")
    status, body, _ = answer(reg, payload)
    assert status == HTTPStatus.CREATED, body
    assert body["username"] == "sensor-0003"
    if method == "csr":
        assert_issued_from(payload["csr"], body["certificate"], authority)


@pytest.mark.parametrize(
    ("password", "conforms"),
    [
        ("", False),
        ("abcd", False),
        ("abcde", True),
        ("x" * 1024, True),
        ("x" * 1025, False),
        ("ääää", False),  # 8 bytes, but 4 characters
        ("äääää", True),
        ("€" * 1024, True),  # 3072 bytes, but 1024 characters
        ("€" * 1025, False),
    ],
)
def test_the_password_policy_at_its_boundaries(reg: registry.Registry, password: str, conforms: bool) -> None:
    """At least 5 and at most 1024 characters (characters, not bytes)."""
    reg.unlock()
    status, body, _ = answer(reg, {"username": "sensor-0003", "password": password})
    assert status == (HTTPStatus.ACCEPTED if conforms else HTTPStatus.UNPROCESSABLE_ENTITY), body


@given(
    password=st.one_of(st.text(max_size=12), st.builds(str.__mul__, st.characters(codec="utf-8"), st.integers(0, 1100)))
)
def test_the_password_policy(authority: ca.CA, password: str) -> None:
    """Over any password: 202 when it has 5 to 1024 characters, 422 otherwise."""
    with opened(authority) as reg:
        status, body, _ = answer(reg, {"username": "sensor-0003", "password": password})
    assert status == (HTTPStatus.ACCEPTED if password_conforms(password) else HTTPStatus.UNPROCESSABLE_ENTITY), body


# --- Unknown fields, wrong types, the permissions table ----------------------


@given(
    name=st.text(max_size=12).filter(lambda name: name not in registry.REQUEST_FIELDS),
    value=json_values,
    extra=optional_fields,
    locked=st.booleans(),
)
def test_an_unknown_field_is_malformed(
    authority: ca.CA, name: str, value: object, extra: Payload, locked: bool
) -> None:
    """SPEC 1: any field outside the table is a malformed request."""
    with opened(authority, locked=locked) as reg:
        status, body, _ = answer(reg, {"username": "sensor-0003", "password": GOOD_PASSWORD, **extra, name: value})
    assert status == HTTPStatus.BAD_REQUEST, body


@given(body=json_values.filter(lambda value: not isinstance(value, dict)))
def test_a_body_that_is_not_an_object_is_malformed(authority: ca.CA, body: object) -> None:
    """SPEC 2.2: the body is one JSON object."""
    with opened(authority) as reg:
        assert answer(reg, body)[0] == HTTPStatus.BAD_REQUEST


@given(
    body=st.one_of(
        st.binary(max_size=40),
        json_values.map(lambda value: json.dumps(value).encode()),
        optional_fields.map(lambda extra: json.dumps(A_REQUEST | extra).encode()),
        st.sampled_from([b"", b"{", json.dumps(A_REQUEST).encode("utf-16"), b'{"username": "\xff"}']),
    )
)
def test_a_raw_body_is_answered_as_its_json(authority: ca.CA, body: bytes) -> None:
    """SPEC 2.2: a body that is not JSON is 400; one that is gets the answer its parsed JSON gets."""
    try:
        parsed = json.loads(body.decode())
    except ValueError:
        parsed = None
    with opened(authority) as raw_registry, opened(authority) as parsed_registry:
        raw_answer = answer(raw_registry, body)
        if parsed is None:
            assert raw_answer[0] == HTTPStatus.BAD_REQUEST
        else:
            parsed_answer = answer(parsed_registry, parsed)
            assert raw_answer[0] == parsed_answer[0]
            assert raw_answer[1].get("error") == parsed_answer[1].get("error")


# What may happen to a pending request between two polls with the same raw
# body, and what SPEC 2.4 then answers (when locked, when unlocked).
CHANGES: dict[str, tuple[Callable[[registry.Registry, FakeClock], object], HTTPStatus, HTTPStatus]] = {
    "nothing": (lambda reg, clock: None, HTTPStatus.ACCEPTED, HTTPStatus.ACCEPTED),
    "approved": (lambda reg, clock: reg.approve("sensor-0003"), HTTPStatus.CREATED, HTTPStatus.CREATED),
    "denied": (lambda reg, clock: reg.deny("sensor-0003"), HTTPStatus.FORBIDDEN, HTTPStatus.FORBIDDEN),
    "forgotten": (lambda reg, clock: reg.forget("sensor-0003"), HTTPStatus.LOCKED, HTTPStatus.ACCEPTED),
    "expired": (lambda reg, clock: clock.advance(hours=24), HTTPStatus.LOCKED, HTTPStatus.ACCEPTED),
    "approved, then its user removed": (
        lambda reg, clock: (reg.approve("sensor-0003"), reg.remove_user("sensor-0003")),
        HTTPStatus.LOCKED,
        HTTPStatus.ACCEPTED,
    ),
    "forgotten, then asked for with another password": (
        lambda reg, clock: (reg.forget("sensor-0003"), reg.register(A_REQUEST | {"password": OTHER_PASSWORD})),
        HTTPStatus.CONFLICT,
        HTTPStatus.CONFLICT,
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@given(method=st.sampled_from(["password", "csr"]), locked=st.booleans(), polls=st.integers(1, 3))
def test_a_repeated_raw_body_is_answered_as_things_stand(
    authority: ca.CA, change: str, method: str, locked: bool, polls: int
) -> None:
    """SPEC 2.4 for a client that polls with the very same bytes: every change in between shows in the answer."""
    body = json.dumps(request_for("sensor-0003", method, ACCEPTED_KEYS[0])).encode()
    make_change, when_locked, when_unlocked = CHANGES[change]
    clock = FakeClock()
    with opened(authority, clock=clock) as reg:
        for _ in range(polls):
            assert answer(reg, body)[0] == HTTPStatus.ACCEPTED
        make_change(reg, clock)
        if locked:
            reg.lock()
        else:
            reg.unlock()
        status, answered, _ = answer(reg, body)
    assert status == (when_locked if locked else when_unlocked), answered


@pytest.mark.parametrize("field", sorted(WRONG_TYPES))
@given(data=st.data(), locked=st.booleans())
def test_a_field_of_the_wrong_type_is_malformed(
    authority: ca.CA, field: str, data: st.DataObject, locked: bool
) -> None:
    """SPEC 1: every field has its type; null, numbers, lists and objects in its place are 400."""
    wrong = data.draw(WRONG_TYPES[field], label=field)
    payload = {"username": "sensor-0003", "password": GOOD_PASSWORD, "roles": ["minimum"], "permissions": [MQTT_READ]}
    if field == "csr":
        payload = without(payload, "password")
    with opened(authority, locked=locked) as reg:
        status, body, _ = answer(reg, payload | {field: wrong})
    assert status == HTTPStatus.BAD_REQUEST, body


def sorted_items(permission: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A permission in a form that sorts and hashes."""
    return tuple(sorted(permission.items()))


@given(permissions=st.lists(permission_objects, min_size=1, max_size=3), locked=st.booleans())
@example(permissions=[{"resource": "site/\0/+", "operation": "read", "context": "mqtt"}], locked=False)
def test_permissions_follow_the_table(authority: ca.CA, permissions: list[object], locked: bool) -> None:
    """Operation, context, an http resource starting with '/', MQTT 3.1.1 topic filters (sections 4.7.1, 4.7.3)."""
    with opened(authority, locked=locked) as reg:
        status, body, _ = answer(
            reg, {"username": "sensor-0003", "password": GOOD_PASSWORD, "permissions": permissions}
        )
        if all(permission_conforms(p) for p in permissions):
            assert status == (HTTPStatus.LOCKED if locked else HTTPStatus.ACCEPTED), body
            if not locked:
                listed = reg.requests()[0]["permissions"]
                assert sorted(map(sorted_items, listed)) == sorted(set(map(sorted_items, permissions)))
        else:
            assert status == HTTPStatus.BAD_REQUEST, body


@pytest.mark.parametrize(
    ("context", "resource", "allowed"),
    [
        ("mqtt", "#", True),
        ("mqtt", "+", True),
        ("mqtt", "/#", True),
        ("mqtt", "a/#", True),
        ("mqtt", "a/+/b", True),
        ("mqtt", "+/+", True),
        ("mqtt", "a//b", True),
        ("mqtt", "a#", False),
        ("mqtt", "a/#/b", False),
        ("mqtt", "#/", False),
        ("mqtt", "a+", False),
        ("mqtt", "a/b+/c", False),
        ("mqtt", "++", False),
        ("mqtt", "##", False),
        ("mqtt", "", False),
        ("http", "/", True),
        ("http", "/api/telemetry", True),
        ("http", "/api/+/#", True),
        ("http", "api/telemetry", False),
        ("http", " /api", False),
        ("http", "", False),
    ],
)
def test_resources_at_their_corners(reg: registry.Registry, context: str, resource: str, allowed: bool) -> None:
    """An http resource starts with '/'; an MQTT filter follows MQTT 3.1.1 sections 4.7.1 and 4.7.3 (not empty)."""
    reg.unlock()
    permission = {"resource": resource, "operation": "read", "context": context}
    status, body, _ = answer(reg, {"username": "sensor-0003", "password": GOOD_PASSWORD, "permissions": [permission]})
    assert status == (HTTPStatus.ACCEPTED if allowed else HTTPStatus.BAD_REQUEST), body


# --- The lock, and what an approval grants -----------------------------------


@given(duration=st.none() | st.integers(1, 86_400_000), data=st.data(), method=st.sampled_from(["password", "csr"]))
def test_a_new_request_is_423_exactly_when_the_window_has_ended(
    authority: ca.CA, duration: int | None, data: st.DataObject, method: str
) -> None:
    """SPEC 3: unlocking opens the registry until now + duration (default 5 minutes), then it is locked again."""
    window = DEFAULT_UNLOCK if duration is None else timedelta(milliseconds=duration)
    end = window // timedelta(milliseconds=1)
    elapsed = data.draw(st.sampled_from([0, end - 1, end, end + 1]) | st.integers(0, 2 * end), label="elapsed ms")
    clock = FakeClock()
    with opened(authority, locked=True, clock=clock) as reg:
        reg.unlock(None if duration is None else {"duration": duration})
        clock.advance(milliseconds=elapsed)
        ended = elapsed >= end
        status, body, headers = answer(reg, request_for("sensor-0003", method, ACCEPTED_KEYS[0]))
        assert status == (HTTPStatus.LOCKED if ended else HTTPStatus.ACCEPTED), body
        assert headers["Retry-After"] == ("30" if ended else "5")
        assert reg.status()["locked"] is ended


@given(start=st.integers(1, 999), duration=st.integers(1, 86_400_000))
@example(start=5, duration=3)
def test_the_window_ends_at_now_plus_duration_at_any_instant(authority: ca.CA, start: int, duration: int) -> None:
    """SPEC 3 from a clock that reads a fraction of a second: at now + duration exactly, the window has ended."""
    clock = FakeClock(START + timedelta(milliseconds=start))
    with opened(authority, locked=True, clock=clock) as reg:
        reg.unlock({"duration": duration})
        clock.advance(milliseconds=duration)
        crl = {
            "number": 1,
            "nextUpdate": (clock.now - timedelta(milliseconds=duration) + timedelta(days=7)).isoformat(
                timespec="milliseconds"
            ),
        }
        assert reg.status() == {"locked": True, "unlockedUntil": None, "pending": 0, "crl": crl}
        assert answer(reg, {"username": "sensor-0003", "password": GOOD_PASSWORD})[0] == HTTPStatus.LOCKED


@given(
    state=st.sampled_from(["pending", "denied", "approved"]),
    waited=st.sampled_from([0, 86_399]) | st.integers(0, 86_399),
    data=st.data(),
    method=st.sampled_from(["password", "csr"]),
)
def test_pending_and_denied_requests_are_forgotten_after_the_retention_period(
    authority: ca.CA, state: str, waited: int, data: st.DataObject, method: str
) -> None:
    """SPEC 2: pending and denied requests are forgotten after 24 hours; an approved one stays with its user.

    A pending request's period starts when it is made (a poll does not
    restart it), a denied one's at the denial (SPEC is silent; this is the
    README's reading). A forgotten request is new again: 423 while locked.
    """
    clock = FakeClock()
    payload = request_for("sensor-0003", method, ACCEPTED_KEYS[0])
    with opened(authority, clock=clock) as reg:
        assert answer(reg, payload)[0] == HTTPStatus.ACCEPTED
        reg.lock()
        clock.advance(seconds=waited)
        assert answer(reg, payload)[0] == HTTPStatus.ACCEPTED
        if state == "approved":
            reg.approve("sensor-0003")
        elif state == "denied":
            reg.deny("sensor-0003")
        left = 86_400 - (0 if state == "denied" else waited)
        elapsed = data.draw(st.sampled_from([left - 1, left, left + 1]) | st.integers(0, 3 * 86_400), label="elapsed")
        clock.advance(seconds=elapsed)
        forgotten = state != "approved" and elapsed >= left
        status, body, _ = answer(reg, payload)
        listed = [request["state"] for request in reg.requests()]
    assert listed == ([] if forgotten else [state])
    assert status == (HTTPStatus.LOCKED if forgotten else ANSWER_TO_A_REPEAT[state]), body


grants = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "roles": st.lists(st.sampled_from(CATALOG), max_size=2),
        "permissions": st.lists(st.sampled_from([MQTT_READ, HTTP_WRITE]), max_size=2),
    },
)


@given(requested=optional_fields, grant=grants, method=st.sampled_from(["password", "csr"]), key=accepted_keys)
def test_a_201_carries_what_was_granted(
    authority: ca.CA, requested: Payload, grant: dict[str, Any] | None, method: str, key: Key
) -> None:
    """SPEC 2: the 201 body holds the granted rights (the request's, or what the approval names) and a certificate."""
    payload = {**request_for("sensor-0003", method, key), "roles": [], "permissions": [], **requested}
    with opened(authority) as reg:
        assert answer(reg, payload)[0] == HTTPStatus.ACCEPTED
        reg.approve("sensor-0003", grant)
        reg.lock()
        status, body, _ = answer(reg, payload)
    assert status == HTTPStatus.CREATED, body
    wanted = rights_of(payload["roles"], payload["permissions"])
    assert rights_of(body["roles"], body["permissions"]) == granted_by(wanted, grant)
    if method == "csr":
        assert_issued_from(payload["csr"], body["certificate"], authority)
        assert body["caCertificate"] == authority.certificate_pem
    else:
        assert "certificate" not in body


# --- A rejected command changes nothing --------------------------------------

PENDING = {"username": "pending-1", "password": GOOD_PASSWORD, "roles": ["minimum"]}
DENIED = {"username": "denied-1", "password": GOOD_PASSWORD}
APPROVED = {"username": "approved-1", "csr": csr_for("approved-1", ACCEPTED_KEYS[0]), "permissions": [MQTT_READ]}

# Each is refused by a registry holding PENDING, DENIED and APPROVED.
REFUSED_COMMANDS: dict[str, Callable[[registry.Registry], object]] = {
    "a conflicting request for a pending username": lambda r: r.register(PENDING | {"password": OTHER_PASSWORD}),
    "a request with other rights for a pending username": lambda r: r.register(PENDING | {"roles": []}),
    "a request for a taken username": lambda r: r.register(without(APPROVED, "csr") | {"password": GOOD_PASSWORD}),
    "a request with another key for a taken username": lambda r: r.register(
        APPROVED | {"csr": csr_for("approved-1", ACCEPTED_KEYS[1])}
    ),
    "a repeat of a denied request": lambda r: r.register(DENIED),
    "another request for a denied username": lambda r: r.register(DENIED | {"password": OTHER_PASSWORD}),
    "a policy breach": lambda r: r.register(PENDING | {"roles": ["root"]}),
    "approving an unknown username": lambda r: r.approve("nobody"),
    "approving an approved request": lambda r: r.approve("approved-1"),
    "approving a denied request": lambda r: r.approve("denied-1"),
    "approving with a role outside the catalog": lambda r: r.approve("pending-1", {"roles": ["root"]}),
    "approving with a malformed grant": lambda r: r.approve("pending-1", {"roles": "minimum"}),
    "denying an approved request": lambda r: r.deny("approved-1"),
    "denying a denied request": lambda r: r.deny("denied-1", {"reason": "twice"}),
    "denying with a reason that is not a string": lambda r: r.deny("pending-1", {"reason": 7}),
    "denying with a reason over 1024 characters": lambda r: r.deny("pending-1", {"reason": "x" * 1025}),
    "forgetting an approved request": lambda r: r.forget("approved-1"),
    "forgetting an unknown username": lambda r: r.forget("nobody"),
    "removing a user that does not exist": lambda r: r.remove_user("pending-1"),
    "unlocking for no time": lambda r: r.unlock({"duration": 0}),
    "unlocking for a duration that is not a number": lambda r: r.unlock({"duration": "5"}),
    "unlocking with an unknown field": lambda r: r.unlock({"minutes": 5}),
}


def refused_requests(locked: bool) -> st.SearchStrategy[object]:
    """Client requests that a registry holding PENDING, DENIED and APPROVED must refuse."""
    return st.one_of(
        json_values.filter(lambda value: not isinstance(value, dict)),
        st.tuples(st.text(max_size=8).filter(lambda n: n not in registry.REQUEST_FIELDS), json_values).map(
            lambda item: PENDING | dict([item])
        ),
        st.sampled_from(sorted(WRONG_TYPES)).flatmap(
            lambda field: WRONG_TYPES[field].map(lambda wrong: without(PENDING, "password") | {field: wrong})
        ),
        usernames.filter(lambda name: not username_conforms(name)).map(lambda name: PENDING | {"username": name}),
        # A new, conforming request is refused only by the lock.
        st.from_regex(r"new-[a-z0-9]{0,20}", fullmatch=True).map(lambda name: PENDING | {"username": name})
        if locked
        else st.nothing(),
    )


@given(data=st.data(), locked=st.booleans())
def test_a_rejected_command_changes_nothing(authority: ca.CA, data: st.DataObject, locked: bool) -> None:
    """STYLE and SPEC 4: whatever is refused, and whoever asked, leaves the registry as it was, but for the poll
    a denied request's 403 counts. Proves ADMIN-4.3-DECIDE, ADMIN-4.7-POLL-STATS."""
    choice = data.draw(st.sampled_from([*REFUSED_COMMANDS, "a refused request"]), label="command")
    if choice == "a refused request":
        payload = data.draw(refused_requests(locked), label="payload")

        def command(reg: registry.Registry) -> object:
            return reg.register(payload)

    else:
        command = REFUSED_COMMANDS[choice]
    with opened(authority) as reg:
        store(reg, PENDING, "pending")
        store(reg, DENIED, "denied")
        store(reg, APPROVED, "approved")
        if locked:
            reg.lock()
        before = snapshot(reg)
        with pytest.raises(registry.RegistryError) as refusal:
            command(reg)
        note(f"refused with {refusal.value.status}: {refusal.value.body()}")
        after = snapshot(reg)
        assert without_poll_statistics(after) == without_poll_statistics(before)
        # Only the denied request's 403 is a poll (ADMIN-4.7-POLL-STATS): its client was told.
        told = refusal.value.status == HTTPStatus.FORBIDDEN
        counts = [(r["username"], r["pollCount"]) for r in after[1]]
        assert counts == [(r["username"], r["pollCount"] + (told and r["state"] == "denied")) for r in before[1]]


# --- Trust: only the current certificate renews (issue 22) --------------------

LIFE_NAME = "sensor-0003"
LIFE_KEYS = tuple(ACCEPTED[name] for name in ("P-256", "another P-256", "Ed25519"))
LIFE_CSRS = tuple(csr_for(LIFE_NAME, key) for key in LIFE_KEYS)


def der_of(pem: str) -> bytes:
    """A certificate's DER, as mutual TLS presents it."""
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


class CertificateLife:
    """One user's certificates as SPEC section 7 tells them apart, beside a real registry.

    ``certificates`` maps each certificate the client was given (PEM) to its
    key (an index into ``LIFE_KEYS``), its notAfter, whether it was revoked
    and the certificate it replaced; ``current`` is the user's credential.
    """

    def __init__(self, reg: registry.Registry, clock: FakeClock) -> None:
        self.reg, self.clock = reg, clock
        self.certificates: dict[str, dict[str, Any]] = {}
        self.current: str | None = None

    def admit(self, key: int) -> None:
        """Register with ``key``, be approved, fetch the 201: the first certificate of a user."""
        request = {"username": LIFE_NAME, "csr": LIFE_CSRS[key]}
        self.reg.unlock()
        assert self.reg.register(request).status == HTTPStatus.ACCEPTED
        self.reg.approve(LIFE_NAME)
        self.keep(self.reg.register(request).body, key, None)

    def keep(self, body: dict[str, Any], key: int, replaced: str | None) -> None:
        assert body["certificate"] not in self.certificates, "a new certificate every time one is issued"
        not_after = datetime.fromisoformat(body["notAfter"])
        self.certificates[body["certificate"]] = {"key": key, "notAfter": not_after, "revoked": False, "from": replaced}
        self.current = body["certificate"]

    def standing(self, pem: str) -> str:
        """LIFE-7.2-RENEW, LIFE-7.3-REVOKE: revoked, then expired, then current or superseded."""
        certificate = self.certificates[pem]
        if certificate["revoked"]:
            return "revoked"
        if self.clock.now >= certificate["notAfter"]:
            return "expired"
        return "current" if pem == self.current else "superseded"

    def is_repeat(self, pem: str, key: int) -> bool:
        """Whether renewing from ``pem`` with ``key`` repeats the renewal that made the current certificate."""
        if self.current is None:
            return False
        current = self.certificates[self.current]
        return current["from"] == pem and current["key"] == key

    def renew(self, pem: str, key: int) -> tuple[HTTPStatus, dict[str, Any]]:
        """The registry's answer to a renewal from ``pem`` with a CSR for ``key``: status and body."""
        try:
            outcome = self.reg.renew(der_of(pem), {"csr": LIFE_CSRS[key]}, address="10.0.0.9")
        except registry.RegistryError as error:
            assert_error_body(error.body())
            return error.status, error.body()
        return outcome.status, outcome.body

    def step(self, pem: str, key: int) -> None:
        """Renew from ``pem`` with ``key`` and check the answer against the table of LIFE-7.2-RENEW."""
        standing, repeat = self.standing(pem), self.is_repeat(pem, key)
        before = snapshot(self.reg)
        status, body = self.renew(pem, key)
        note(f"renew from a {standing} certificate with key {key}: {status}")
        if standing == "current":
            assert status == HTTPStatus.CREATED
            assert_issued_from(LIFE_CSRS[key], body["certificate"], self.reg.ca)
            self.keep(body, key, pem)
        elif standing == "superseded" and repeat:
            assert status == HTTPStatus.CREATED
            assert body["certificate"] == self.current
            assert snapshot(self.reg) == before
        else:
            assert status == HTTPStatus.UNAUTHORIZED
            assert snapshot(self.reg) == before

    def remove(self) -> None:
        """LIFE-7.3-REVOKE: removing the user revokes every certificate of it that has not expired."""
        self.reg.remove_user(LIFE_NAME)
        for certificate in self.certificates.values():
            certificate["revoked"] = certificate["revoked"] or self.clock.now < certificate["notAfter"]
        self.current = None


certificate_life = st.lists(
    st.one_of(
        st.tuples(st.just("renew"), st.integers(0, 9), st.integers(0, len(LIFE_KEYS) - 1)),
        st.tuples(st.just("advance"), st.sampled_from([1, 100, 200, 366])),
        st.tuples(st.just("remove and admit again"), st.integers(0, len(LIFE_KEYS) - 1)),
    ),
    max_size=7,
)


def live(authority: ca.CA, steps: list[tuple], after_each: Callable[[CertificateLife], None]) -> None:
    """Admit ``LIFE_NAME``, go through ``steps`` (renewals from any certificate it was given, time, removal), and
    call ``after_each`` with the life after the admission and after every step."""
    clock = FakeClock()
    with opened(authority, clock=clock) as reg:
        life = CertificateLife(reg, clock)
        life.admit(0)
        after_each(life)
        for step in steps:
            note(f"{step}")
            if step[0] == "renew":
                issued = list(life.certificates)
                life.step(issued[step[1] % len(issued)], step[2])
            elif step[0] == "advance":
                clock.advance(days=step[1])
            elif life.current is not None:
                life.remove()
                life.admit(step[1])
            after_each(life)


@given(steps=certificate_life)
def test_only_the_current_certificate_starts_a_renewal(authority: ca.CA, steps: list[tuple]) -> None:
    """At any moment, a renewal from any certificate the user was given but its current one is 401 and changes
    nothing, unless it repeats the renewal that made the current one; from the current one it issues.

    Proves LIFE-7.2-RENEW, LIFE-7.3-REVOKE.
    """

    def no_other_certificate_renews(life: CertificateLife) -> None:
        for pem in life.certificates:
            for key in range(len(LIFE_KEYS)):
                if pem != life.current and not life.is_repeat(pem, key):
                    before = snapshot(life.reg)
                    status, body = life.renew(pem, key)
                    assert status == HTTPStatus.UNAUTHORIZED, f"a {life.standing(pem)} certificate renewed"
                    assert body["error"] == "unauthorized"
                    assert snapshot(life.reg) == before

    live(authority, steps, no_other_certificate_renews)


@given(steps=certificate_life)
def test_a_replaced_or_revoked_certificate_is_never_answered_as_current(authority: ca.CA, steps: list[tuple]) -> None:
    """A superseded certificate only fetches the current one again and still says who it is until its notAfter;
    a revoked one authenticates nothing; a registration with a key the user no longer holds is 409.

    Proves LIFE-7.2-RENEW, LIFE-7.3-REVOKE.
    """

    def only_the_current_one_counts(life: CertificateLife) -> None:
        reg = life.reg
        for pem in life.certificates:
            standing = life.standing(pem)
            if standing in ("revoked", "expired"):
                with pytest.raises(registry.Unauthorized):
                    reg.authenticate_certificate(der_of(pem))
            else:
                assert reg.authenticate_certificate(der_of(pem)).username == LIFE_NAME
            current_key = life.current and life.certificates[life.current]["key"]
            if standing == "superseded" and life.is_repeat(pem, current_key):
                # The lost answer fetched again: the current certificate, and nothing new.
                before = snapshot(reg)
                status, body = life.renew(pem, current_key)
                assert (status, body["certificate"]) == (HTTPStatus.CREATED, life.current)
                assert snapshot(reg) == before
        if life.current is None:
            return
        [user] = reg.users()
        assert user["certificateSerial"] == format(
            x509.load_pem_x509_certificate(life.current.encode()).serial_number, "x"
        )
        current_key = life.certificates[life.current]["key"]
        for key in range(len(LIFE_KEYS)):
            request = {"username": LIFE_NAME, "csr": LIFE_CSRS[key]}
            if key == current_key:
                assert reg.register(request).body["certificate"] == life.current
            else:
                with pytest.raises(registry.Conflict) as refusal:
                    reg.register(request)
                assert refusal.value.body()["error"] == "username_taken"

    live(authority, steps, only_the_current_one_counts)


# --- Trust: a password is tested only as often as the throttle allows (issue 22) ----

# Small limits, so that a few dozen guesses cross them; the rules are the same at 5 and 50.
THROTTLED = dataclasses.replace(FAST, max_auth_failures=3, max_auth_failures_per_username=5)
GUESSERS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
guesses = st.lists(
    st.tuples(
        st.sampled_from(["register", "whoami"]),
        st.sampled_from(GUESSERS),
        st.booleans(),  # the right password
        st.sampled_from([0, 0, 0, 1, 30, 59, 60, 61]),  # seconds before the guess
    ),
    max_size=40,
)


def over_the_limit(tests: list[tuple[str, datetime, bool]], window: timedelta, most: int, *, per_address: bool) -> list:
    """The tests (address, time, whether from a stranger) that came while ``most`` earlier ones were within
    ``window`` before them: from the same address, or (``per_address`` false) from anywhere, for a stranger."""
    return [
        (address, at)
        for index, (address, at, stranger) in enumerate(tests)
        if (per_address or stranger)
        and sum(1 for other, then, _ in tests[:index] if then > at - window and (other == address or not per_address))
        >= most
    ]


@given(state=st.sampled_from(["pending", "approved"]), fast_path=st.booleans(), guesses=guesses)
def test_a_password_is_tested_no_more_often_than_the_throttle_allows(
    state: str, fast_path: bool, guesses: list[tuple[str, str, bool, int]]
) -> None:
    """Whatever the guesses (by registration or by whoami, right or wrong, from several addresses), a wrong
    password is verified, and answered otherwise than 429, at most ``max_auth_failures`` times a window from
    one address, and, for an address that has not signed in as the username lately, only while fewer than
    ``max_auth_failures_per_username`` failures from all addresses are within the window.

    Proves AUTH-5.2-THROTTLE, REG-2.4-THROTTLE, AUTH-5.2-KNOWN-ADDRESS.
    """
    kind = fastpath.FastRegistry if fast_path else registry.Registry
    settings = THROTTLED
    clock = FakeClock()
    guess: dict[str, Any] = {}  # the guess under way: its address, and whether it comes from a stranger
    verified: list[tuple[str, datetime, bool]] = []  # every wrong password verified (scrypt)
    answered: list[tuple[str, datetime, bool]] = []  # every wrong guess answered otherwise than 429
    signed_in: dict[str, datetime] = {}  # each address's last successful sign-in as the username
    check_password = registry.check_password

    def counted_check(password: str, stored: str) -> bool:
        matches = check_password(password, stored)
        if not matches:
            verified.append((guess["address"], clock.now, guess["stranger"]))
        return matches

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "check_password", counted_check)
        reg = kind(clock=clock, roles=CATALOG, settings=settings)
        try:
            reg.unlock()
            store(reg, A_REQUEST, state)
            for via, address, right, seconds in guesses:
                clock.advance(seconds=seconds)
                since = signed_in.get(address)
                stranger = since is None or since <= clock.now - settings.known_address_period
                guess.update(address=address, stranger=stranger)
                password = GOOD_PASSWORD if right else OTHER_PASSWORD
                try:
                    if via == "register":
                        reg.register(A_REQUEST | {"password": password}, address)
                    else:
                        reg.authenticate_password(A_REQUEST["username"], password, address)
                    status = HTTPStatus.OK
                except registry.RegistryError as error:
                    status = error.status
                note(f"{via} from {address}, {'right' if right else 'wrong'}: {status}")
                throttled = status == HTTPStatus.TOO_MANY_REQUESTS
                if right and state == "approved" and not throttled:
                    signed_in[address] = clock.now
                # Whoami for a pending request tests nothing: there is no user yet.
                if not right and not throttled and (via == "register" or state == "approved"):
                    answered.append((address, clock.now, stranger))
        finally:
            reg.close()

    window = settings.auth_failure_window
    for tests in (verified, answered):
        assert not over_the_limit(tests, window, settings.max_auth_failures, per_address=True)
        assert not over_the_limit(tests, window, settings.max_auth_failures_per_username, per_address=False)


def failed_sign_in(reg: registry.Registry, address: str) -> HTTPStatus:
    """The status of a wrong password for ``A_REQUEST``'s user, by whoami from ``address``: 401, or 429."""
    with pytest.raises(registry.RegistryError) as refusal:
        reg.authenticate_password(A_REQUEST["username"], OTHER_PASSWORD, address)
    return refusal.value.status


def test_the_device_signing_in_takes_back_none_of_a_strangers_failures(authority: ca.CA) -> None:
    """Once a username has its all-addresses limit of failures within the window, a stranger's next guess is 429
    however often the device signs in meanwhile from its known address: its success frees no slot.

    Proves AUTH-5.2-THROTTLE, AUTH-5.2-KNOWN-ADDRESS.
    """
    settings = FAST
    strangers = [f"192.0.2.{n}" for n in range(settings.max_auth_failures_per_username // settings.max_auth_failures)]
    with opened(authority) as reg:
        store(reg, A_REQUEST, "approved")
        reg.authenticate_password(A_REQUEST["username"], GOOD_PASSWORD, "10.0.0.1")  # the device: a known address
        for address in strangers:
            for _ in range(settings.max_auth_failures):
                assert failed_sign_in(reg, address) == HTTPStatus.UNAUTHORIZED
        assert failed_sign_in(reg, "198.51.100.1") == HTTPStatus.TOO_MANY_REQUESTS

        reg.authenticate_password(A_REQUEST["username"], GOOD_PASSWORD, "10.0.0.1")  # spared the all-addresses limit

        assert failed_sign_in(reg, "198.51.100.1") == HTTPStatus.TOO_MANY_REQUESTS


def test_retry_after_is_when_every_limit_lets_the_attempt_through(authority: ca.CA) -> None:
    """An address over its own limit, while the username is over the all-addresses one for longer, is told to
    wait until both let it through: a Retry-After is never early.

    Proves AUTH-5.2-THROTTLE.
    """
    settings, clock = FAST, FakeClock()
    window = int(settings.auth_failure_window.total_seconds())
    devices = [f"10.0.0.{n}" for n in range(settings.max_auth_failures_per_username // settings.max_auth_failures)]
    with opened(authority, clock=clock) as reg:
        store(reg, A_REQUEST, "approved")
        for address in devices:  # each signs in: known addresses, spared the all-addresses limit
            reg.authenticate_password(A_REQUEST["username"], GOOD_PASSWORD, address)
        for _ in range(settings.max_auth_failures):
            assert failed_sign_in(reg, "192.0.2.1") == HTTPStatus.UNAUTHORIZED  # the stranger's own limit, now
        clock.advance(seconds=30)
        for address in devices:  # the username's limit, 30 s later: it holds 30 s longer
            for _ in range(settings.max_auth_failures):
                assert failed_sign_in(reg, address) == HTTPStatus.UNAUTHORIZED
        clock.advance(seconds=1)

        with pytest.raises(registry.TooManyRequests) as refusal:
            reg.authenticate_password(A_REQUEST["username"], OTHER_PASSWORD, "192.0.2.1")
        assert refusal.value.headers["Retry-After"] == str(window - 1)

        clock.advance(seconds=window - 2)
        assert failed_sign_in(reg, "192.0.2.1") == HTTPStatus.TOO_MANY_REQUESTS
        clock.advance(seconds=1)
        assert failed_sign_in(reg, "192.0.2.1") == HTTPStatus.UNAUTHORIZED

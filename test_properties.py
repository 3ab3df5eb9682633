"""The status rules of SPEC section 2 as properties, and a stateful model of the whole contract.

The first half states one rule of ``../shared/SPEC.md`` per test, over
requests that hypothesis generates: exactly one of ``password`` and ``csr``,
the CSR's Common Name equal to the username, the order of the checks
(400, then 422, then the stored request, then 423), the username and
password policies at their boundaries, unknown fields, wrong types, the
permissions table, and that a rejected command changes nothing.

The second half is ``RegistryMachine``: it keeps a plain-dict model of the
contract (the lock window, the stored requests, the users), drives a real
``registry.Registry`` with client requests, administrator calls and a fake
clock, and checks every answer and the registry's whole visible state
against the model after every step.

Keys are slow to make, so a small pool is made once, here; signing a CSR
with one of them is fast enough to do inside an example.
"""

from __future__ import annotations

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
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ca
import registry
from conftest import FAST, START, FakeClock, assert_issued_from, make_key

# The tests send CSRs whose Common Name is empty or longer than the 64
# characters of RFC 5280's ub-common-name on purpose; cryptography warns
# when it reads one back.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

Key = CertificateIssuerPrivateKeyTypes
Payload = dict[str, Any]

CATALOG = ("minimum", "operator")
GOOD_PASSWORD = "correct horse"
OTHER_PASSWORD = "battery staple"
RETENTION = timedelta(hours=24)
DEFAULT_UNLOCK = timedelta(minutes=5)
MQTT_READ = {"resource": "plant/+/temperature", "operation": "read", "context": "mqtt"}
HTTP_WRITE = {"resource": "/api/telemetry", "operation": "write", "context": "http"}

# SPEC section 2.3: the keys the registry accepts, and some it refuses.
ACCEPTED_KEYS = (make_key("ec"), make_key("ec"), make_key("p384"), make_key("ed25519"), make_key("rsa"))
REFUSED_KEYS = (make_key("p521"), make_key("rsa1024"), ed448.Ed448PrivateKey.generate())


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
    return resource.startswith("/") if context == "http" else wildcards_placed(resource)


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


@contextmanager
def opened(authority: ca.CA, *, locked: bool = False) -> Iterator[registry.Registry]:
    """A fresh in-memory registry (conftest's catalog, fast scrypt), locked or unlocked."""
    instance = registry.Registry(clock=FakeClock(), ca=authority, roles=CATALOG, settings=FAST)
    try:
        if not locked:
            instance.unlock()
        yield instance
    finally:
        instance.close()


def answer(reg: registry.Registry, payload: object) -> tuple[HTTPStatus, dict[str, Any], dict[str, str]]:
    """What the server would answer to ``payload``: status, JSON body and headers."""
    try:
        outcome = reg.register(payload)
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


def near_misses(username: str) -> list[str]:
    """Common Names that a careless comparison would take for ``username``."""
    return [
        username.upper(),
        username.lower(),
        username + " ",
        " " + username,
        username + "\n",
        username[:-1],
        username + "0",
        "x" + username[1:],
    ]


@given(data=st.data(), key=accepted_keys, locked=st.booleans())
def test_the_common_name_must_be_the_username(authority: ca.CA, data: st.DataObject, key: Key, locked: bool) -> None:
    """A missing, empty or different CN is 400; the username's own CN goes on to policy and the lock."""
    username = data.draw(usernames, label="username")
    common_name = data.draw(
        st.one_of(st.none(), st.just(""), st.just(username), st.sampled_from(near_misses(username)), st.text()),
        label="common_name",
    )
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


@given(data=st.data(), method=st.sampled_from(["password", "csr"]), locked=st.booleans())
def test_the_first_rule_that_applies_decides(authority: ca.CA, data: st.DataObject, method: str, locked: bool) -> None:
    """400 before 422 before the stored request before 423, whatever else is wrong and whether locked or not."""
    username = data.draw(st.one_of(conforming_usernames, st.text(max_size=70)), label="username")
    key, refused = data.draw(accepted_keys, label="key"), data.draw(refused_keys, label="refused key")
    breaches = data.draw(st.lists(st.sampled_from(sorted(POLICY_BREACHES[method])), unique=True), label="breaches")
    malformations = data.draw(st.lists(st.sampled_from(sorted(MALFORMATIONS)), unique=True), label="malformations")
    # A conforming request for the username may be stored first: the
    # request under test is then that request itself, or a broken one.
    prior = (
        data.draw(st.sampled_from([None, *ANSWER_TO_A_REPEAT]), label="prior") if username_conforms(username) else None
    )
    clean = request_for(username, method, key)
    payload = clean
    for breach in breaches:
        payload = POLICY_BREACHES[method][breach](payload, username, refused)
    for malformation in malformations:
        payload = MALFORMATIONS[malformation](payload, username, key)
    with opened(authority) as reg:
        if prior is not None:
            store(reg, clean, prior)
        if locked:
            reg.lock()
        before = snapshot(reg)
        status, body, _ = answer(reg, payload)
        if status >= HTTPStatus.BAD_REQUEST:
            assert snapshot(reg) == before
    # An empty username makes an empty CN: that is malformed before it breaks policy.
    if malformations or (method == "csr" and not username):
        assert status == HTTPStatus.BAD_REQUEST, body
    elif breaches or not username_conforms(username):
        assert status == HTTPStatus.UNPROCESSABLE_ENTITY, body
    elif prior is not None:
        assert status == ANSWER_TO_A_REPEAT[prior], body
    else:
        assert status == (HTTPStatus.LOCKED if locked else HTTPStatus.ACCEPTED), body


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


@given(permissions=st.lists(permission_objects, min_size=1, max_size=3), locked=st.booleans())
def test_permissions_follow_the_table(authority: ca.CA, permissions: list[object], locked: bool) -> None:
    """Operation, context, an http resource starting with '/', MQTT wildcards per MQTT 3.1.1 section 4.7.1."""
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


def sorted_items(permission: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(permission.items()))


@pytest.mark.parametrize(
    ("resource", "placed"),
    [
        ("#", True),
        ("+", True),
        ("/#", True),
        ("a/#", True),
        ("a/+/b", True),
        ("+/+", True),
        ("a//b", True),
        ("a#", False),
        ("a/#/b", False),
        ("#/", False),
        ("a+", False),
        ("a/b+/c", False),
        ("++", False),
        ("##", False),
        ("", False),
    ],
)
def test_mqtt_wildcard_placement(reg: registry.Registry, resource: str, placed: bool) -> None:
    """MQTT 3.1.1 section 4.7.1 at its corners (and 4.7.3: a filter has at least one character)."""
    reg.unlock()
    permission = {"resource": resource, "operation": "read", "context": "mqtt"}
    status, body, _ = answer(reg, {"username": "sensor-0003", "password": GOOD_PASSWORD, "permissions": [permission]})
    assert status == (HTTPStatus.ACCEPTED if placed else HTTPStatus.BAD_REQUEST), body


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
    """STYLE and SPEC 4: whatever is refused, and whoever asked, leaves the registry as it was."""
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
        assert snapshot(reg) == before


# --- The stateful model ----------------------------------------------------

USERNAMES = ("sensor-0003", "agent.7", "Pump_12")
PASSWORDS = (GOOD_PASSWORD, OTHER_PASSWORD)
MACHINE_KEYS = (ACCEPTED_KEYS[0], ACCEPTED_KEYS[3])
ROLE_SETS = ((), ("minimum",), ("operator", "minimum"))
PERMISSION_SETS = ((), (MQTT_READ,), (HTTP_WRITE, MQTT_READ))
GRANTS = (None, {}, {"roles": [], "permissions": []}, {"roles": ["minimum"]}, {"permissions": [MQTT_READ]})
Credential = tuple[str, object]  # ("password", the password) or ("csr", an index into MACHINE_KEYS)
Rights = tuple[frozenset[str], frozenset[tuple[str, str, str]]]

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


def rights_of(roles: list[str], permissions: list[dict[str, str]]) -> Rights:
    """Rights as the model compares them: order and repeats are immaterial."""
    return frozenset(roles), frozenset((p["resource"], p["operation"], p["context"]) for p in permissions)


def granted_by(requested: Rights, grant: dict[str, Any] | None) -> Rights:
    """What an approval grants: the body's roles and permissions; a field left out stays as requested."""
    grant = grant or {}
    roles, permissions = rights_of(grant.get("roles", []), grant.get("permissions", []))
    return (roles if "roles" in grant else requested[0]), (permissions if "permissions" in grant else requested[1])


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
    time its retention started, its pairing id and the payload sent) and
    ``users`` (username -> granted rights). Pending requests are forgotten
    24 hours after they were made, denied ones 24 hours after the denial.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.authority = ca.CA.create(START)
        self.registry = registry.Registry(clock=self.clock, ca=self.authority, roles=CATALOG, settings=FAST)
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

    def send(self, username: str, credential: Credential, rights: Rights, payload: Payload) -> None:
        """Send ``payload`` and check the answer against SPEC 2.4 as the model sees it."""
        self.expire()
        status, body, headers = answer(self.registry, payload)
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
        if self.locked:
            assert status == HTTPStatus.LOCKED
            assert_error_body(body, "locked")
            assert headers["Retry-After"] == "30"
            return
        self.check_pending(username, status, body, headers, None)
        self.model["requests"][username] = {
            "state": "pending",
            "credential": credential,
            "rights": rights,
            "reason": None,
            "since": self.clock.now,
            "pairingId": body["pairingId"],
            "payload": payload,
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
    )
    def register_with_a_password(
        self, username: str, password: str, roles: tuple, permissions: tuple, context: str | None
    ) -> None:
        self.register(username, ("password", password), rights_of(list(roles), list(permissions)), context)

    @rule(
        username=st.sampled_from(USERNAMES),
        key=st.sampled_from(range(len(MACHINE_KEYS))),
        roles=st.sampled_from(ROLE_SETS),
        permissions=st.sampled_from(PERMISSION_SETS),
        context=st.none() | st.text(max_size=20),
    )
    def register_with_a_csr(
        self, username: str, key: int, roles: tuple, permissions: tuple, context: str | None
    ) -> None:
        self.register(username, ("csr", key), rights_of(list(roles), list(permissions)), context)

    def register(self, username: str, credential: Credential, rights: Rights, context: str | None) -> None:
        self.send(username, credential, rights, payload_of(username, credential, rights, context))

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data())
    def poll(self, data: st.DataObject) -> None:
        """Re-send a stored request exactly (it may have been forgotten since)."""
        username = data.draw(st.sampled_from(sorted(self.model["requests"])), label="username")
        stored = self.model["requests"][username]
        self.send(username, stored["credential"], stored["rights"], stored["payload"])

    @precondition(lambda self: self.model["requests"])
    @rule(data=st.data(), context=st.none() | st.text(max_size=20))
    def poll_with_a_fresh_csr_and_context(self, data: st.DataObject, context: str | None) -> None:
        """SPEC 2.4: the credential is the key, not the CSR's text, and the context takes no part."""
        username = data.draw(st.sampled_from(sorted(self.model["requests"])), label="username")
        stored = self.model["requests"][username]
        self.register(username, stored["credential"], stored["rights"], context)

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
        """SPEC 4: ``{"locked", "unlockedUntil", "pending"}`` as the model has them."""
        self.expire()
        assert set(status) == {"locked", "unlockedUntil", "pending"}
        assert status["locked"] is self.locked
        if self.locked:
            assert status["unlockedUntil"] is None
        else:
            assert datetime.fromisoformat(status["unlockedUntil"]) == self.model["unlocked_until"]
        pending = [u for u, stored in self.model["requests"].items() if stored["state"] == "pending"]
        assert status["pending"] == len(pending)

    @rule(duration=durations)
    def unlock(self, duration: int | None) -> None:
        body = None if duration is None else {"duration": duration}
        window = DEFAULT_UNLOCK if duration is None else timedelta(milliseconds=duration)
        self.model["unlocked_until"] = self.clock.now + window
        self.check_status(self.registry.unlock(body))

    @rule()
    def lock(self) -> None:
        self.model["unlocked_until"] = None
        self.check_status(self.registry.lock())

    @rule(seconds=steps)
    def advance_the_clock(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

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
        if self.decide(lambda: self.registry.forget(username), username, allowed=allowed) is not None:
            raise AssertionError("forget answers nothing")
        if self.model["requests"].get(username, {}).get("state") in allowed:
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
            if stored["state"] == "denied":
                assert listed["reason"] == stored["reason"]
        users = self.registry.users()
        user_names = [user["username"] for user in users]
        assert len(user_names) == len(set(user_names)), "never two users for a username"
        granted = {user["username"]: rights_of(user["roles"], user["permissions"]) for user in users}
        assert granted == self.model["users"]
        assert all(states.get(name) == "approved" for name in user_names), "a user always has an approved request"


RegistryMachine.TestCase.settings = settings(stateful_step_count=30)
TestRegistryMachine = RegistryMachine.TestCase

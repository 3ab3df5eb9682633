"""The client registry: the domain core of client self-registration.

Theory of operation
===================

A client (an agent, a sensor) asks to be registered by sending a request:
a username, exactly one credential (a password, or a PKCS#10 certificate
signing request whose Common Name is the username) and the roles and
permissions it would like. It then polls by sending the very same request
again until an administrator has decided.

States
------
A stored request is in one of three states::

    PENDING --approve--> APPROVED      (a user now exists; a CSR was signed)
    PENDING --deny-----> DENIED        (the client is told why, with 403)
    PENDING, DENIED --forget--> gone   (the username may ask again)
    APPROVED --remove user--> gone     (the username may ask again)

The table ``TRANSITIONS`` holds these moves, and the registry takes each new
state from it; any other move is a single failed lookup that raises
``Conflict`` naming the event and the state.

The registry itself is either locked or unlocked. It starts locked;
``unlock`` opens it until now + a duration (its ``LockWindow``), after which
it is locked again with no action from anyone; ``lock`` closes it at once.
The lock keeps out only *new* requests: polls and the administrator's
decisions go on.

The order of the checks (SPEC section 2)
----------------------------------------
``register`` decides by the first rule that applies:

1. 400 ``MalformedRequest``: the payload breaks the shape of SPEC section 1,
   or its CSR is not one PEM block, does not parse, does not verify, or
   names another CN.
2. 422 ``PolicyViolation``: username, password, role or CSR key policy.
3. ``decide``: the stored request for the username, if any, by its state
   and whether the request matches it (201 again, 202 for a poll, 403 for a
   denied one, 409 when it differs); for a username with none, 423 when the
   registry is locked, 503 when the pending queue is full, 429 when the
   client address asks too often (when limited); otherwise it is stored as
   pending: 202.

A request *matches* a stored one when the credential (the same password,
or a CSR with the same public key) and the requested rights are equal.

The certificate's life (SPEC section 7)
---------------------------------------
Every certificate issued is recorded. A client renews its current one over
mutual TLS (``renew``): the same key renews, a new one re-keys, and the new
certificate becomes the user's credential while the previous one stays
valid until its own notAfter. Removing a user revokes its unexpired
certificates; the CA signs a CRL of them at every revocation and whenever
the current CRL has less than half of its validity left (``refresh_crl``,
which the server calls from a timer).

Invariants
----------
- A rejected command changes nothing.
- At most one request, and at most one user, per username; a user always
  has its approved request beside it.
- No password is stored: users and requests hold a salted scrypt hash.
- A CSR is read once, by the CA, when it is registered: the registry keeps
  the public key of the very request whose signature was verified, and an
  approval issues the certificate for that key.
- Time comes only from the injected clock, kept as whole microseconds;
  every state change is committed in a SQLite transaction before it is
  answered, one transaction per command, so a kill at any moment loses
  nothing answered.

The layers
----------
The module reads in three layers, each under its own heading:

1. **The rules**: values, tables and pure functions (parsing, policy,
   ``decide``, ``transition``). No database, thread, secret or clock.
2. **The store**: the SQLite schema, and each read and write as a method of
   ``Store``.
3. **The registry**: ``Registry``, the thread-safe facade that reads the
   clock, asks the rules, and writes what they decided.

Thousands of clients poll every few seconds, so the registry keeps a fast
path beside the reference one: bodies answered 202 are answered again
without parsing, passwords and CSRs that verified once are remembered, and
poll statistics are counted in memory and written with the next
transaction. It lives in named helpers (``RepeatedPolls``,
``PasswordVerifier``, ``PollCounter`` and a ``BoundedCache`` of CSRs), and
``Settings(fast_path=False)`` turns all of it off; a stateful property test
(``test_fast_path.py``) checks that both give the same answers and store
the same state.

The core touches no socket. Certificates are the business of an injected
``CertificateAuthority`` (``ca.py`` provides one); without it the registry
serves password registrations only.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import enum
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Protocol

Clock = Callable[[], datetime]
log = logging.getLogger("registry")

# =============================================================================
# 1. The rules: values, tables and pure functions over them
# =============================================================================

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
USERNAME_LENGTH = range(3, 65)
PASSWORD_LENGTH = range(5, 1025)
CONTEXT_LENGTH = 1024
REASON_LENGTH = 1024
OPERATIONS = ("read", "write", "readWrite")
CONTEXTS = ("mqtt", "http")
REQUEST_FIELDS = frozenset({"username", "password", "csr", "roles", "permissions", "context"})
PERMISSION_FIELDS = frozenset({"resource", "operation", "context"})
# SPEC section 2.3: the keys a CSR may carry (the curve names are those of
# cryptography's ``EllipticCurve.name``).
ACCEPTED_CURVES = frozenset({"secp256r1", "secp384r1"})
MIN_RSA_BITS = 2048
# Times are whole microseconds since the epoch: exact, so that a window of
# d milliseconds opened at t is over at t + d, not a rounding error later.
SECOND = 1_000_000
MINUTE = 60 * SECOND
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
MILLISECOND = timedelta(milliseconds=1)
ADMIN = "administrator"
# RFC 9110 section 11.6.1: every 401 says how to authenticate.
CHALLENGE = {"WWW-Authenticate": 'Basic realm="client-registry"'}
# The clock skew of ca.py's certificates (notBefore = signing - 5 minutes), for
# certificates recorded before their notBefore was kept.
SKEW_OF_OLD_CERTIFICATES = 5 * MINUTE

# --- Errors ---------------------------------------------------------------


class RegistryError(Exception):
    """A refused command: it knows its HTTP status and its error code."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Iterable[str] = (),
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = list(details)
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON error body of SPEC section 2."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        body.update(self.extra)
        return body


class MalformedRequest(RegistryError):
    """The request breaks the shape of SPEC section 1 (400)."""

    status, code = HTTPStatus.BAD_REQUEST, "malformed_request"


class Unauthorized(RegistryError):
    """No credentials, or wrong ones (401)."""

    status, code = HTTPStatus.UNAUTHORIZED, "unauthorized"


class Denied(RegistryError):
    """The administrator denied the request (403); ``reason`` says why."""

    status, code = HTTPStatus.FORBIDDEN, "denied"


class NotFound(RegistryError):
    """No such request, user or path (404)."""

    status, code = HTTPStatus.NOT_FOUND, "not_found"


class Conflict(RegistryError):
    """The request differs from the stored one, or the move is illegal in its state (409)."""

    status, code = HTTPStatus.CONFLICT, "conflict"


class PolicyViolation(RegistryError):
    """The request is well-formed but against policy (422)."""

    status, code = HTTPStatus.UNPROCESSABLE_ENTITY, "policy_violation"


class Locked(RegistryError):
    """A new request while the registry is locked (423)."""

    status, code = HTTPStatus.LOCKED, "locked"


class TooManyRequests(RegistryError):
    """Over a rate limit (429)."""

    status, code = HTTPStatus.TOO_MANY_REQUESTS, "too_many_requests"


class Full(RegistryError):
    """The pending requests are at their cap (503)."""

    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "registry_full"


class StorageUnavailable(RegistryError):
    """The database cannot take a write now, its disk full (503); nothing was stored."""

    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "storage_unavailable"


# --- Values ---------------------------------------------------------------


class State(enum.Enum):
    """Where a stored request stands."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


class Event(enum.Enum):
    """What the administrator (or time) does to a stored request."""

    APPROVE = "approve"
    DENY = "deny"
    FORGET = "forget"
    REMOVE_USER = "remove the user of"


GONE = None
TRANSITIONS: dict[tuple[State, Event], State | None] = {
    (State.PENDING, Event.APPROVE): State.APPROVED,
    (State.PENDING, Event.DENY): State.DENIED,
    (State.PENDING, Event.FORGET): GONE,
    (State.DENIED, Event.FORGET): GONE,
    (State.APPROVED, Event.REMOVE_USER): GONE,
}


def transition(state: State, event: Event) -> State | None:
    """The state after ``event``; ``Conflict`` when the move is illegal."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        hint = " (remove its user instead)" if state is State.APPROVED else ""
        raise Conflict(
            f"cannot {event.value} a request that is {state.value}{hint}",
            code="not_pending",
            state=state.value,
        ) from None


@dataclass(frozen=True, order=True)
class Permission:
    """One permission of SPEC section 1: a resource, an operation, a context."""

    context: str
    resource: str
    operation: str

    def to_json(self) -> dict[str, str]:
        return {"resource": self.resource, "operation": self.operation, "context": self.context}


@dataclass(frozen=True)
class Rights:
    """Roles and permissions, as requested or as granted; order is immaterial."""

    roles: tuple[str, ...] = ()
    permissions: tuple[Permission, ...] = ()

    @classmethod
    def of(cls, roles: Iterable[str], permissions: Iterable[Permission]) -> Rights:
        return cls(tuple(sorted(set(roles))), tuple(sorted(set(permissions))))

    def to_json(self) -> dict[str, list[Any]]:
        return {
            "roles": list(self.roles),
            "permissions": [p.to_json() for p in self.permissions],
        }

    def dumps(self) -> str:
        """A canonical text: equal rights give equal texts."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Rights:
        data = json.loads(text)
        return cls(tuple(data["roles"]), tuple(Permission(**p) for p in data["permissions"]))


@dataclass(frozen=True)
class Registration:
    """A well-formed request of SPEC section 1."""

    username: str
    password: str | None
    csr: str | None
    rights: Rights
    context: str | None

    @property
    def method(self) -> str:
        return "password" if self.password is not None else "csr"


@dataclass(frozen=True)
class CsrInfo:
    """What the registry needs to know of a parsed, verified CSR."""

    common_name: str | None
    key_algorithm: str  # "RSA", "EC", "Ed25519", or another name
    key_size: int
    curve: str | None
    # The SubjectPublicKeyInfo (DER) of the very request whose signature was
    # verified: the key a certificate is issued for, kept from that moment.
    public_key: bytes

    @functools.cached_property
    def public_key_sha256(self) -> str:
        """The hex SHA-256 of the key: how a poll with the same key is recognised."""
        return hashlib.sha256(self.public_key).hexdigest()


@dataclass(frozen=True)
class IssuedCertificate:
    """A client certificate as the CA issued it."""

    pem: str
    serial: int
    not_before: datetime
    not_after: datetime
    sha256: str  # hex digest of the certificate DER


@dataclass(frozen=True)
class RevokedCertificate:
    """One entry of a CRL (RFC 5280 section 5.1.2.6): which certificate, since when, and why."""

    serial: int
    revoked_at: datetime
    reason: str  # a CRLReason name of RFC 5280 section 5.3.1, such as "cessationOfOperation"


class CertificateAuthority(Protocol):
    """What the registry asks of a CA; ``ca.CA`` is one."""

    certificate_pem: str

    def inspect_csr(self, pem: str) -> CsrInfo:
        """Parse and verify a CSR; ``ValueError`` when it is malformed."""

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> IssuedCertificate:
        """Sign a client certificate for ``username`` and ``public_key``, the verified SPKI DER of its CSR."""

    def sign_crl(
        self, revoked: Iterable[RevokedCertificate], number: int, this_update: datetime, next_update: datetime
    ) -> bytes:
        """Sign a CRL (DER) listing ``revoked``."""

    def describe_public_key(self, public_key: bytes) -> str:
        """What a verified key (SPKI DER) is, for a person: "EC secp256r1", "RSA 2048-bit", "Ed25519"."""


@dataclass(frozen=True)
class Outcome:
    """A successful answer to ``register``: 201 or 202. Read-only: a repeated poll gets the same one."""

    status: HTTPStatus
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def content(self) -> bytes:
        """The body as JSON, encoded once."""
        return json.dumps(self.body).encode()


@dataclass(frozen=True)
class Identity:
    """A registered client that proved who it is."""

    username: str
    rights: Rights
    method: str  # how it authenticated: "password" or "certificate"

    def to_json(self) -> dict[str, Any]:
        return {"username": self.username, **self.rights.to_json(), "method": self.method}


@dataclass(frozen=True)
class Settings:
    """Every knob of the registry, with the defaults of SPEC."""

    unlock_duration: timedelta = timedelta(minutes=5)
    max_unlock_duration: timedelta = timedelta(days=1)
    retention: timedelta = timedelta(hours=24)
    retry_after_pending: int = 5
    retry_after_locked: int = 30
    max_pending: int = 100_000
    # New requests per client address per minute; 0 is no limit, since a
    # whole plant often sits behind one address.
    rate_limit: int = 0
    # Failed password sign-ins within the window before a pause: per
    # username and client address, and (higher, so that a stranger cannot
    # lock a device out) per username from all addresses together.
    max_auth_failures: int = 5
    max_auth_failures_per_username: int = 50
    auth_failure_window: timedelta = timedelta(minutes=1)
    # Retry-After of a 503 when the database cannot store (a full disk).
    retry_after_unavailable: int = 30
    # SPEC section 7: a CRL is valid this long, and signed anew when half of
    # that is left.
    crl_validity: timedelta = timedelta(days=7)
    # scrypt's cost n (RFC 7914 section 2): 2**14 is the interactive-login
    # choice of the RFC's authors; tests lower it to stay fast.
    scrypt_n: int = 2**14
    # The poll cache, the password and CSR caches and the in-memory poll
    # counters (layer 3); False answers every request the reference way.
    fast_path: bool = True


@dataclass(frozen=True)
class LockWindow:
    """When the registry takes new requests: until ``until`` (microseconds since the epoch); never when None."""

    until: int | None = None

    def is_open(self, now: int) -> bool:
        return self.until is not None and now < self.until

    def to_json(self, now: int) -> dict[str, Any]:
        if not self.is_open(now):
            return {"locked": True, "unlockedUntil": None}
        # SPEC ADMIN-4.9-PAGE-FIELDS: what is left and the registry's own time,
        # so that a page counts down without trusting its own clock.
        assert self.until is not None
        left = (self.until - now) // 1000
        return {"locked": False, "unlockedUntil": _iso(self.until), "unlockedForMs": left, "serverTime": _iso(now)}


class Decision(enum.Enum):
    """What a well-formed registration within policy comes to (SPEC section 2.4), with its status."""

    REDELIVER = "the approved request again", HTTPStatus.CREATED
    POLL = "a poll of the pending request", HTTPStatus.ACCEPTED
    STORE = "a new pending request", HTTPStatus.ACCEPTED
    USERNAME_TAKEN = "another request for a user's name", HTTPStatus.CONFLICT
    DUPLICATE = "another request beside a stored one", HTTPStatus.CONFLICT
    DENIED = "the denied request again", HTTPStatus.FORBIDDEN
    LOCKED = "a new request while locked", HTTPStatus.LOCKED
    FULL = "a new request while the queue is full", HTTPStatus.SERVICE_UNAVAILABLE
    LIMITED = "a new request over the address's rate", HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, meaning: str, status: HTTPStatus) -> None:
        self.meaning = meaning
        self.status = status


# SPEC section 2.4: a stored request decides, by its state and whether the
# request matches it.
STORED: dict[tuple[State, bool], Decision] = {
    (State.APPROVED, True): Decision.REDELIVER,
    (State.APPROVED, False): Decision.USERNAME_TAKEN,
    (State.PENDING, True): Decision.POLL,
    (State.PENDING, False): Decision.DUPLICATE,
    (State.DENIED, True): Decision.DENIED,
    (State.DENIED, False): Decision.DUPLICATE,
}


def decide(
    stored: State | None, matches: bool, *, locked: bool = False, full: bool = False, limited: bool = False
) -> Decision:
    """The answer to a registration for a username whose stored request is ``stored`` (None: none).

    ``locked``, ``full`` and ``limited`` count only for a username with no
    stored request, in that order (SPEC section 2.4: the lock keeps out only
    new requests).
    """
    if stored is not None:
        return STORED[stored, matches]
    if locked:
        return Decision.LOCKED
    if full:
        return Decision.FULL
    if limited:
        return Decision.LIMITED
    return Decision.STORE


def refusal(
    decision: Decision,
    username: str,
    *,
    reason: str = "",
    stored: State | None = None,
    retry_after: int = 0,
    rate_limit: int = 0,
) -> RegistryError:
    """The error that answers a refusing ``decision``: its status, code, message and headers."""
    name = username
    retry = {"Retry-After": str(retry_after)}
    if decision is Decision.USERNAME_TAKEN:
        return Conflict(f"the username {name!r} is taken", code="username_taken")
    if decision is Decision.DUPLICATE and stored is State.DENIED:
        return Conflict(
            f"a different request for {name!r} was denied; it is forgotten after the retention period",
            code="duplicate_request",
        )
    if decision is Decision.DUPLICATE:
        return Conflict(
            f"a different request for {name!r} is pending: poll with the same request", code="duplicate_request"
        )
    if decision is Decision.DENIED:
        return Denied(f"the request for {name!r} was denied", reason=reason)
    if decision is Decision.LOCKED:
        return Locked(
            "the registry is locked: ask the administrator to unlock it, then send the request again", headers=retry
        )
    if decision is Decision.FULL:
        return Full("the registry holds as many pending requests as it may: try again later", headers=retry)
    if decision is Decision.LIMITED:
        return TooManyRequests(f"more than {rate_limit} new requests a minute from this address", headers=retry)
    raise ValueError(f"{decision.name} is not a refusal")


def pending_outcome(username: str, pairing_id: str, retry_after: int) -> Outcome:
    """SPEC section 2.4's 202: the request, named by its pairing id."""
    return Outcome(
        HTTPStatus.ACCEPTED,
        {"status": "pending", "username": username, "pairingId": pairing_id},
        {"Retry-After": str(retry_after)},
    )


def pairing_id(credential_sha256: str) -> str:
    """Six hex digits the client and the administrator can compare (SPEC section 2.4)."""
    return credential_sha256[:6]


def renew_after(not_before: int, not_after: int) -> int:
    """SPEC section 7: the moment from which a client should renew, two thirds of the way through the validity."""
    return not_before + (not_after - not_before) * 2 // 3


def certificate_status(not_before: int, not_after: int, now: int) -> str:
    """How a certificate stands: "valid", "renew" (from its renewAfter on: it expires soon) or "expired"."""
    if now >= not_after:
        return "expired"
    return "renew" if now >= renew_after(not_before, not_after) else "valid"


def crl_due(next_update: int | None, validity: timedelta, now: int) -> bool:
    """SPEC section 7: a new CRL once less than half of the current one's validity is left (or there is none)."""
    return next_update is None or next_update - now < validity // MICROSECOND // 2


# --- Parsing and policy ------------------------------------------------------


def parse_json(body: bytes) -> object:
    """A body as JSON; ``MalformedRequest`` when it is not JSON in UTF-8."""
    try:
        # RFC 8259 section 8.1: JSON between systems is UTF-8; decoding first
        # refuses the UTF-16 and UTF-32 that json.loads would guess.
        return json.loads(body.decode())
    except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too
        raise MalformedRequest("the body is not JSON") from None


def parse_registration(payload: object) -> Registration:
    """Check the shape of a request (SPEC section 1); ``MalformedRequest``."""
    problems: list[str] = []
    if not isinstance(payload, dict):
        raise MalformedRequest("the body must be a JSON object")
    for unknown in sorted(set(payload) - REQUEST_FIELDS):
        problems.append(f"unknown field {unknown!r}")
    username = _text(payload, "username", problems, required=True)
    password = _text(payload, "password", problems)
    csr = _text(payload, "csr", problems)
    if "password" in payload and "csr" in payload:
        problems.append("send exactly one of 'password' and 'csr', not both")
    elif "password" not in payload and "csr" not in payload:
        problems.append("send exactly one of 'password' and 'csr'")
    context = _text(payload, "context", problems)
    if context is not None and len(context) > CONTEXT_LENGTH:
        problems.append(f"'context' has more than {CONTEXT_LENGTH} characters")
    rights = parse_rights(payload, problems)
    if problems:
        raise _malformed(problems)
    assert username is not None
    return Registration(username, password, csr, rights, context)


def parse_rights(body: Mapping[str, Any], problems: list[str]) -> Rights:
    """Read ``roles`` and ``permissions`` from a body, noting each problem."""
    roles = body.get("roles", [])
    if not isinstance(roles, list) or not all(_is_text(r) for r in roles):
        problems.append("'roles' must be a list of strings")
        roles = []
    permissions = body.get("permissions", [])
    if not isinstance(permissions, list):
        problems.append("'permissions' must be a list of objects")
        permissions = []
    parsed = [_permission(i, p, problems) for i, p in enumerate(permissions)]
    return Rights.of(roles, (p for p in parsed if p is not None))


def _permission(index: int, value: object, problems: list[str]) -> Permission | None:
    where = f"permissions[{index}]"
    if not isinstance(value, dict):
        problems.append(f"{where} must be an object")
        return None
    before = len(problems)
    if set(value) != PERMISSION_FIELDS:
        problems.append(f"{where} must have exactly the fields 'resource', 'operation' and 'context'")
        return None
    resource, operation, context = value["resource"], value["operation"], value["context"]
    if operation not in OPERATIONS:
        problems.append(f"{where}.operation must be one of {', '.join(OPERATIONS)}")
    if context not in CONTEXTS:
        problems.append(f"{where}.context must be one of {', '.join(CONTEXTS)}")
    if not _is_text(resource) or not resource:
        problems.append(f"{where}.resource must be a non-empty string")
    elif context == "http" and not resource.startswith("/"):
        problems.append(f"{where}.resource must start with '/' for the http context")
    elif context == "mqtt" and not _is_topic_filter(resource):
        problems.append(
            f"{where}.resource is not an MQTT topic filter: '+' and '#' take a whole level, '#' the last; no NUL"
        )
    return Permission(context, resource, operation) if len(problems) == before else None


def _is_topic_filter(resource: str) -> bool:
    # MQTT 3.1.1 section 4.7.1: '#' stands alone as the last level, '+'
    # stands alone in its level; section 4.7.3: no U+0000.
    levels = resource.split("/")
    return "\0" not in resource and all(
        ("#" not in level or (level == "#" and i == len(levels) - 1)) and ("+" not in level or level == "+")
        for i, level in enumerate(levels)
    )


def _text(body: Mapping[str, Any], name: str, problems: list[str], *, required: bool = False) -> str | None:
    if name not in body:
        if required:
            problems.append(f"'{name}' is required")
        return None
    value = body[name]
    if not _is_text(value):
        problems.append(f"'{name}' must be a string")
        return None
    return value


def _is_text(value: object) -> bool:
    """A string that can be stored: JSON may carry lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _malformed(problems: list[str]) -> MalformedRequest:
    if len(problems) == 1:
        return MalformedRequest(problems[0])
    return MalformedRequest(f"the request has {len(problems)} problems", details=problems)


def policy_problems(registration: Registration, catalog: Mapping[str, str], csr: CsrInfo | None) -> list[str]:
    """The policy rules of SPEC section 2.3 that a request breaks."""
    problems = []
    name = registration.username
    if len(name) not in USERNAME_LENGTH or not USERNAME.fullmatch(name):
        problems.append(
            "'username' must be 3 to 64 characters: letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit"
        )
    if registration.password is not None and len(registration.password) not in PASSWORD_LENGTH:
        problems.append("'password' must be 5 to 1024 characters")
    for role in registration.rights.roles:
        if role not in catalog:
            problems.append(f"role {role!r} is not in the role catalog")
    if csr is not None and not key_accepted(csr):
        problems.append(key_problem(csr))
    return problems


def key_accepted(csr: CsrInfo) -> bool:
    """SPEC section 2.3: RSA >= 2048 bits, EC P-256 or P-384, Ed25519."""
    return (
        (csr.key_algorithm == "RSA" and csr.key_size >= MIN_RSA_BITS)
        or (csr.key_algorithm == "EC" and csr.curve in ACCEPTED_CURVES)
        or csr.key_algorithm == "Ed25519"
    )


def key_problem(csr: CsrInfo) -> str:
    """What to say of a key the policy refuses."""
    return f"a {describe_key(csr)} key is not accepted: use RSA of 2048 bits or more, EC P-256 or P-384, or Ed25519"


def describe_key(csr: CsrInfo) -> str:
    if csr.key_algorithm == "EC":
        return f"EC {csr.curve}"
    return f"{csr.key_algorithm} {csr.key_size}-bit" if csr.key_size else csr.key_algorithm


def _policy(problems: list[str]) -> PolicyViolation:
    if len(problems) == 1:
        return PolicyViolation(problems[0])
    return PolicyViolation(f"the request breaks {len(problems)} policy rules", details=problems)


def parse_grant(body: object, catalog: Mapping[str, str]) -> dict[str, Any]:
    """The rights an approval's body grants instead of the requested ones: a field left out stays as requested."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise MalformedRequest("the body must be a JSON object with 'roles' and 'permissions'")
    problems = [f"unknown field {name!r}" for name in sorted(set(body) - {"roles", "permissions"})]
    rights = parse_rights(body, problems)
    if problems:
        raise _malformed(problems)
    unknown = [f"role {role!r} is not in the role catalog" for role in rights.roles if role not in catalog]
    if unknown:
        raise _policy(unknown)
    return {name: getattr(rights, name) for name in ("roles", "permissions") if name in body}


def parse_reason(body: object) -> str:
    """A denial's reason: the body's ``reason``, or none."""
    if body is None or body == {}:
        return ""
    if not isinstance(body, dict) or set(body) != {"reason"} or not _is_text(body["reason"]):
        raise MalformedRequest("the body may hold only 'reason', a string")
    if len(body["reason"]) > REASON_LENGTH:
        raise MalformedRequest(f"'reason' has more than {REASON_LENGTH} characters")
    return body["reason"]


def parse_renewal(body: object) -> str:
    """A renewal's body (SPEC section 7), ``{"csr": "<PEM>"}``: the CSR's text."""
    if not isinstance(body, dict) or set(body) != {"csr"} or not _is_text(body["csr"]):
        raise MalformedRequest("the body must be a JSON object with only 'csr': a CSR for the key to certify")
    return body["csr"]


def parse_duration(body: object, default: timedelta, longest: timedelta) -> timedelta:
    """An unlock's duration: the body's ``duration`` in milliseconds, or ``default``."""
    if body is None or body == {}:
        return default
    most = longest // MILLISECOND
    if not isinstance(body, dict) or set(body) != {"duration"}:
        raise MalformedRequest("the body may hold only 'duration', in milliseconds")
    duration = body["duration"]
    # JSON has one kind of number: 386.0 is the whole number 386 (as JSON Schema's "integer" counts it).
    if type(duration) is float and duration.is_integer():
        duration = int(duration)
    if type(duration) is not int or not 0 < duration <= most:
        raise MalformedRequest(f"'duration' must be a whole number of milliseconds from 1 to {most}")
    return timedelta(milliseconds=duration)


def _seconds_until(moment: int, now: int) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up: a Retry-After that is never early."""
    return -((now - moment) // SECOND)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def _iso(micros: int) -> str:
    return _datetime(micros).isoformat(timespec="milliseconds")


def _datetime(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


# =============================================================================
# 2. The store: the SQLite schema, and each read and write of the registry
# =============================================================================

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS requests (
    username TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    method TEXT NOT NULL,
    password_hash TEXT,
    public_key BLOB,
    key_sha256 TEXT,
    pairing_id TEXT NOT NULL,
    requested TEXT NOT NULL,
    context TEXT,
    client_address TEXT,
    created_at INTEGER NOT NULL,
    last_poll_at INTEGER NOT NULL,
    poll_count INTEGER NOT NULL DEFAULT 0,
    decided_at INTEGER,
    reason TEXT,
    collected_at INTEGER
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (state, created_at);
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY REFERENCES requests (username),
    method TEXT NOT NULL,
    password_hash TEXT,
    granted TEXT NOT NULL,
    certificate TEXT,
    certificate_sha256 TEXT UNIQUE,
    serial TEXT,
    not_after INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    key_sha256 TEXT NOT NULL,
    certificate TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    renewed_from TEXT,
    revoked_at INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_by_user ON certificates (username);
CREATE TABLE IF NOT EXISTS crl (
    number INTEGER PRIMARY KEY,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    address TEXT,
    action TEXT NOT NULL,
    username TEXT,
    details TEXT
);
"""
# What the administrator's listings show: no hash, no key, no certificate.
REQUEST_COLUMNS = (
    "requests.username, state, pairing_id, requests.method, requested, context, requests.created_at, last_poll_at,"
    " poll_count, client_address, decided_at, reason, collected_at, users.granted, requests.public_key,"
    " requests.key_sha256"
)
USER_COLUMNS = (
    "users.username, method, granted, created_at, users.serial, users.not_after, certificates.not_before,"
    " users.certificate_sha256"
)


class Store:
    """One SQLite database: the lock window, the requests, the users and the audit trail.

    Not thread-safe on its own: ``Registry`` calls it under its lock. Writes
    happen inside ``transaction()``.
    """

    def __init__(self, database: str = ":memory:") -> None:
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL with synchronous NORMAL: a committed transaction survives a
        # killed process (https://www.sqlite.org/wal.html#durability).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # In WAL mode a commit does not sync; a checkpoint does. Ten times
        # SQLite's default of 1000 pages between checkpoints (a WAL of up to
        # 40 MB) makes that cost a tenth as often.
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        # Columns added since the first version of the schema.
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(requests)")}
        if "collected_at" not in columns:
            self._db.execute("ALTER TABLE requests ADD COLUMN collected_at INTEGER")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises.

        A database that cannot grow (SQLITE_FULL: the disk or the database's
        page limit is full) raises ``StorageUnavailable``, with nothing stored.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back some failed commits itself
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_FULL:
                raise
            raise StorageUnavailable("the registry cannot store requests now: try again later") from error

    # --- The lock window (SPEC section 3) ---

    def lock_window(self) -> LockWindow:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'unlocked_until'").fetchone()
        return LockWindow(None if row is None or row[0] is None else int(row[0]))

    def set_lock_window(self, window: LockWindow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('unlocked_until', ?)",
            (None if window.until is None else str(window.until),),
        )

    # --- Requests ---

    def request(self, username: str) -> sqlite3.Row | None:
        """The stored request for ``username``, expired or not."""
        return self._db.execute("SELECT * FROM requests WHERE username = ?", (username,)).fetchone()

    def pending_count(self, cutoff: int) -> int:
        """The pending requests created after ``cutoff``."""
        return self._db.execute(
            "SELECT count(*) FROM requests WHERE state = ? AND created_at > ?", (State.PENDING.value, cutoff)
        ).fetchone()[0]

    def add_request(self, **columns: object) -> None:
        """Store a new request, in place of an expired one of the same name."""
        self._db.execute("DELETE FROM requests WHERE username = ?", (columns["username"],))
        self._insert("requests", columns)

    def set_state(self, username: str, state: State, decided_at: int, reason: str | None = None) -> None:
        self._db.execute(
            "UPDATE requests SET state = ?, decided_at = ?, reason = ? WHERE username = ?",
            (state.value, decided_at, reason, username),
        )

    def delete_request(self, username: str) -> None:
        self._db.execute("DELETE FROM requests WHERE username = ?", (username,))

    def requests(self, username: str | None = None) -> list[sqlite3.Row]:
        """Every stored request (or the one of ``username``), oldest first, as the administrator sees them."""
        return self._db.execute(
            f"SELECT {REQUEST_COLUMNS} FROM requests LEFT JOIN users ON users.username = requests.username"
            " WHERE ? IS NULL OR requests.username = ? ORDER BY requests.created_at, requests.username",
            (username, username),
        ).fetchall()

    def mark_collected(self, username: str, now: int) -> None:
        """The client of an approved request has fetched its 201."""
        self._db.execute("UPDATE requests SET collected_at = ? WHERE username = ?", (now, username))

    def purge(self, cutoff: int) -> None:
        """Drop pending requests created, and denied ones decided, at or before ``cutoff``."""
        self._db.execute("DELETE FROM requests WHERE state = ? AND created_at <= ?", (State.PENDING.value, cutoff))
        self._db.execute("DELETE FROM requests WHERE state = ? AND decided_at <= ?", (State.DENIED.value, cutoff))

    def count_polls(self, polls: Mapping[str, tuple[int, int, str]]) -> None:
        """Add polls to pending requests: by username, (last time, how many, from which address)."""
        self._db.executemany(
            "UPDATE requests SET last_poll_at = ?, poll_count = poll_count + ?, client_address = ?"
            " WHERE username = ? AND state = ?",
            [(at, count, address, name, State.PENDING.value) for name, (at, count, address) in polls.items()],
        )

    # --- Users ---

    def add_user(self, **columns: object) -> None:
        self._insert("users", columns)

    def user(self, username: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()

    def user_by_certificate(self, certificate_sha256: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM users WHERE certificate_sha256 = ?", (certificate_sha256,)).fetchone()

    def users(self) -> list[sqlite3.Row]:
        """Every user, by name, with its current certificate's validity."""
        return self._db.execute(
            f"SELECT {USER_COLUMNS} FROM users LEFT JOIN certificates ON certificates.serial = users.serial"
            " ORDER BY users.username"
        ).fetchall()

    def set_current_certificate(self, username: str, certificate: Mapping[str, Any]) -> None:
        """Make ``certificate`` (a row of ``certificates``) the user's current one, and its key the user's."""
        self._db.execute(
            "UPDATE users SET certificate = ?, certificate_sha256 = ?, serial = ?, not_after = ? WHERE username = ?",
            (
                certificate["certificate"],
                certificate["sha256"],
                certificate["serial"],
                certificate["not_after"],
                username,
            ),
        )
        self._db.execute("UPDATE requests SET key_sha256 = ? WHERE username = ?", (certificate["key_sha256"], username))

    # --- Issued certificates, revocation and the CRL (SPEC section 7) ---

    def add_certificate(self, **columns: object) -> None:
        self._insert("certificates", columns)

    def certificate(self, sha256: str) -> sqlite3.Row | None:
        """An issued certificate by the SHA-256 of its DER."""
        return self._db.execute("SELECT * FROM certificates WHERE sha256 = ?", (sha256,)).fetchone()

    def certificate_by_serial(self, serial: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()

    def revoke(self, username: str, now: int, reason: str) -> int:
        """Revoke every unexpired certificate of ``username`` not yet revoked; how many."""
        return self._db.execute(
            "UPDATE certificates SET revoked_at = ?, reason = ?"
            " WHERE username = ? AND revoked_at IS NULL AND not_after > ?",
            (now, reason, username, now),
        ).rowcount

    def revoked(self, now: int) -> list[sqlite3.Row]:
        """The revoked certificates that have not expired: what a CRL lists (RFC 5280 section 3.3)."""
        return self._db.execute(
            "SELECT serial, revoked_at, reason FROM certificates"
            " WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY revoked_at, serial",
            (now,),
        ).fetchall()

    def crl(self) -> sqlite3.Row | None:
        """The current CRL: its number, thisUpdate, nextUpdate and DER."""
        return self._db.execute("SELECT * FROM crl ORDER BY number DESC LIMIT 1").fetchone()

    def set_crl(self, number: int, this_update: int, next_update: int, der: bytes) -> None:
        self._db.execute("DELETE FROM crl")
        self._insert("crl", {"number": number, "this_update": this_update, "next_update": next_update, "der": der})

    def delete_user(self, username: str) -> None:
        self._db.execute("DELETE FROM users WHERE username = ?", (username,))

    # --- The audit trail ---

    def append_audit(
        self, at: int, actor: str, address: str, action: str, username: str | None, details: object
    ) -> None:
        self._insert(
            "audit",
            {
                "at": at,
                "actor": actor,
                "address": address,
                "action": action,
                "username": username,
                "details": None if details is None else json.dumps(details),
            },
        )

    def audit(self, limit: int, before: int | None) -> list[sqlite3.Row]:
        """Up to ``limit`` entries older than the entry ``before``, newest first."""
        return self._db.execute(
            "SELECT * FROM audit WHERE id < ? ORDER BY id DESC LIMIT ?",
            (before if before is not None else 2**63 - 1, limit),
        ).fetchall()

    # --- Upgrades ---

    def keep_verified_keys(self, inspect_csr: Callable[[str], CsrInfo] | None) -> None:
        """Upgrade a database that kept each CSR's text (column ``csr``) to one that keeps its verified key.

        Each pending CSR is read once more by ``inspect_csr``, the reader that
        verified it at registration; one that it now refuses (a text of more
        than one PEM block, say) is forgotten, since no key of it was proved.
        Without a CA nothing can be read, and the texts wait for one.
        """
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(requests)")}
        if "csr" not in columns:
            return
        with self.transaction():
            if "public_key" not in columns:
                self._db.execute("ALTER TABLE requests ADD COLUMN public_key BLOB")
            if inspect_csr is None:
                return
            rows = self._db.execute(
                "SELECT username, csr, key_sha256 FROM requests"
                " WHERE state = ? AND csr IS NOT NULL AND public_key IS NULL",
                (State.PENDING.value,),
            ).fetchall()
            for row in rows:
                try:
                    info = inspect_csr(row["csr"])
                except ValueError:
                    info = None
                if info is None or info.public_key_sha256 != row["key_sha256"]:
                    self.delete_request(row["username"])
                else:
                    self._db.execute(
                        "UPDATE requests SET public_key = ? WHERE username = ?", (info.public_key, row["username"])
                    )

    def record_issued_certificates(self, skew: int) -> None:
        """Upgrade a database whose users' certificates were kept only beside the users: record each.

        Their notBefore was not kept: it was the approval's moment less the
        CA's clock skew (``skew`` microseconds).
        """
        with self.transaction():
            self._db.execute(
                "INSERT INTO certificates (serial, username, sha256, key_sha256, certificate, not_before, not_after)"
                " SELECT users.serial, users.username, users.certificate_sha256, requests.key_sha256,"
                " users.certificate, users.created_at - ?, users.not_after"
                " FROM users JOIN requests ON requests.username = users.username"
                " WHERE users.serial IS NOT NULL"
                " AND users.serial NOT IN (SELECT serial FROM certificates)",
                (skew,),
            )

    def _insert(self, table: str, columns: Mapping[str, object]) -> None:
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        self._db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(columns.values()))


def _since(row: sqlite3.Row) -> int:
    """When the retention period of a request started: its creation, or its denial."""
    return row["decided_at"] if row["state"] == State.DENIED.value else row["created_at"]


def _user_json(user: Mapping[str, Any], now: int) -> dict[str, Any]:
    """A user as the administrator sees it, with its current certificate's validity (SPEC section 7)."""
    body = {
        "username": user["username"],
        "method": user["method"],
        **json.loads(user["granted"]),  # canonical: as Rights.to_json has it
        "createdAt": _iso(user["created_at"]),
        "certificateSerial": user["serial"],
        "certificateNotAfter": None,
        "certificateRenewAfter": None,
        "certificateStatus": None,
        "certificateSha256": user["certificate_sha256"],  # SPEC ADMIN-4.9-PAGE-FIELDS
    }
    if user["serial"]:
        not_before, not_after = user["not_before"], user["not_after"]
        body["certificateNotAfter"] = _iso(not_after)
        body["certificateRenewAfter"] = _iso(renew_after(not_before, not_after))
        body["certificateStatus"] = certificate_status(not_before, not_after, now)
    return body


def _request_json(row: sqlite3.Row) -> dict[str, Any]:
    requested = json.loads(row["requested"])
    return {
        "username": row["username"],
        "state": row["state"],
        "pairingId": row["pairing_id"],
        "method": row["method"],
        "roles": requested["roles"],
        "permissions": requested["permissions"],
        "context": row["context"],
        "createdAt": _iso(row["created_at"]),
        "lastPollAt": _iso(row["last_poll_at"]),
        "pollCount": row["poll_count"],
        "clientAddress": row["client_address"],
        "decidedAt": _iso(row["decided_at"]) if row["decided_at"] else None,
        "reason": row["reason"],
        # What was granted, and when the client first fetched it (approved requests).
        "granted": json.loads(row["granted"]) if row["granted"] else None,
        "collectedAt": _iso(row["collected_at"]) if row["collected_at"] else None,
    }


# =============================================================================
# 3. The registry: the thread-safe facade over the rules and the store
# =============================================================================


def hash_password(password: str, n: int = 2**14) -> str:
    """A salted scrypt hash, with its parameters, as one text."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, maxmem=2**26, dklen=32)
    return f"scrypt${n}$8$1${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one behind the ``stored`` hash."""
    _, n, r, p, salt, digest = stored.split("$")
    expected = base64.b64decode(digest)
    actual = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        maxmem=2**26,
        dklen=len(expected),
    )
    return hmac.compare_digest(actual, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- The fast path: each helper can be left out (Settings.fast_path) ---------


class BoundedCache(collections.OrderedDict):
    """A dict that forgets its oldest entries beyond ``capacity`` (0 keeps nothing)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: object, value: object) -> None:
        self[key] = value
        while len(self) > self.capacity:
            self.popitem(last=False)


class PasswordVerifier:
    """Verifies passwords against scrypt hashes, paying for each hash once (capacity 0: every time).

    A password that verified against a hash is remembered as its HMAC under
    a key that lives only in this process: the next check of the same hash
    is one HMAC. A wrong password never enters, and a remembered hash tells
    a different password apart without scrypt, since the HMAC differs.
    """

    def __init__(self, capacity: int = 250_000) -> None:
        self._key = secrets.token_bytes(32)
        self._known = BoundedCache(capacity)

    def check(self, password: str, stored: str) -> bool:
        tag = hmac.digest(self._key, password.encode(), "sha256")
        known = self._known.get(stored)
        if known is not None:
            return hmac.compare_digest(known, tag)
        if not check_password(password, stored):
            return False
        self._known.put(stored, tag)
        return True

    def remember(self, password: str, stored: str) -> None:
        """Record a password that is known to match ``stored`` (just hashed)."""
        self._known.put(stored, hmac.digest(self._key, password.encode(), "sha256"))


@dataclass
class _Poll:
    """A body that was answered 202, known by its keyed hash: what it asked for."""

    username: str
    pairing_id: str
    requested: str  # the canonical text of the requested rights
    outcome: Outcome
    created_at: int = 0
    checked: int = -1  # the registry's version when the stored request was last seen to match


class RepeatedPolls:
    """Bodies answered 202, by a hash keyed with a secret of this process only, since a body holds a password."""

    def __init__(self, capacity: int) -> None:
        self._key = secrets.token_bytes(32)
        self._seen = BoundedCache(capacity)

    def fingerprint(self, body: bytes) -> bytes:
        return hashlib.blake2b(body, key=self._key, digest_size=16).digest()

    def get(self, fingerprint: bytes) -> _Poll | None:
        return self._seen.get(fingerprint)

    def remember(self, fingerprint: bytes, registration: Registration, outcome: Outcome) -> None:
        poll = _Poll(registration.username, outcome.body["pairingId"], registration.rights.dumps(), outcome)
        self._seen.put(fingerprint, poll)


class PollCounter:
    """Polls counted in memory, to be written with the next transaction or once ``period`` has passed."""

    def __init__(self, period: int, now: int) -> None:
        self.period = period
        self._counts: dict[str, tuple[int, int, str]] = {}
        self._taken_at = now

    def count(self, username: str, address: str, now: int) -> bool:
        """Count a poll; True when the counts are due to be written."""
        _, count, _ = self._counts.get(username, (0, 0, ""))
        self._counts[username] = (now, count + 1, address)
        return abs(now - self._taken_at) >= self.period

    def take(self, now: int) -> dict[str, tuple[int, int, str]]:
        """The counts so far, by username: (last poll, how many, from which address); they start again."""
        counts, self._counts, self._taken_at = self._counts, {}, now
        return counts

    def give_back(self, counts: Mapping[str, tuple[int, int, str]]) -> None:
        """Counts that could not be written, to be written with the next ones."""
        for name, (at, count, address) in counts.items():
            later_at, later, later_address = self._counts.get(name, (at, 0, address))
            self._counts[name] = (later_at, count + later, later_address)


# --- The registry ------------------------------------------------------------


class Registry:
    """The registry of SPEC sections 1 to 7, over one SQLite database.

    Every public method is safe to call from many threads at once.
    """

    def __init__(
        self,
        database: str = ":memory:",
        *,
        clock: Clock,
        roles: Mapping[str, str] | Iterable[str] = ("minimum",),
        ca: CertificateAuthority | None = None,
        settings: Settings = Settings(),
    ) -> None:
        self.clock = clock
        self.roles = dict(roles) if isinstance(roles, Mapping) else dict.fromkeys(roles, "")
        self.ca = ca
        self.settings = settings
        self._lock = threading.RLock()
        self._store = Store(database)
        fast = settings.fast_path
        self._passwords = PasswordVerifier(250_000 if fast else 0)
        self._csrs = BoundedCache(settings.max_pending if fast else 0)
        self._repeated = RepeatedPolls(settings.max_pending) if fast else None
        self._polls = PollCounter(SECOND if fast else 0, self._now())
        # Write transactions that may change a request: a remembered poll
        # looks at its request again when this has moved.
        self._version = 0
        self._new_requests: dict[str, collections.deque[int]] = {}
        self._auth_failures: dict[object, collections.deque[int]] = {}
        self._storage_logged_at = -MINUTE
        self._store.keep_verified_keys(ca.inspect_csr if ca else None)
        self._store.record_issued_certificates(SKEW_OF_OLD_CERTIFICATES)
        self.refresh_crl()

    def close(self) -> None:
        """Write what is counted in memory and close the database."""
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):  # closed already
            self._write_polls()
            self._store.close()

    # --- The client's request (SPEC section 2) ----------------------------

    def register(self, payload: object, client_address: str = "") -> Outcome:
        """Answer a client's request, its parsed JSON body: 201 or 202, or raise a ``RegistryError``."""
        return self._register(payload, client_address)[1]

    def register_body(self, body: bytes, client_address: str = "") -> Outcome:
        """Answer a client's request as it came over the wire: the body's bytes (400 when not JSON).

        On the fast path a body answered 202 before is answered again without
        being parsed, while its request is still the one pending.
        """
        if self._repeated is None:
            return self.register(parse_json(body), client_address)
        fingerprint = self._repeated.fingerprint(body)
        outcome = self._repeated_poll(fingerprint, client_address)
        if outcome is None:
            registration, outcome = self._register(parse_json(body), client_address)
            if outcome.status is HTTPStatus.ACCEPTED:
                self._repeated.remember(fingerprint, registration, outcome)
        return outcome

    def _register(self, payload: object, address: str) -> tuple[Registration, Outcome]:
        registration = parse_registration(payload)
        csr = self._inspect_csr(registration)
        problems = policy_problems(registration, self.roles, csr)
        if problems:
            raise _policy(problems)
        return registration, self._answer(registration, csr, address)

    def _answer(self, registration: Registration, csr: CsrInfo | None, address: str) -> Outcome:
        """SPEC section 2.4 for a well-formed request within policy: ``decide``, then do what it says."""
        now = self._now()
        with self._lock:
            decision, row = self._decide(registration, csr, address, now)
            if decision is not Decision.STORE or registration.password is None:
                return self._act(decision, registration, csr, row, address, now, None)
        # A new password request: its scrypt is paid outside the lock, and the
        # request decided again, since another thread may have stored one for
        # the same username meanwhile.
        password_hash = self._hash(registration.password)
        with self._lock:
            decision, row = self._decide(registration, csr, address, now)
            return self._act(decision, registration, csr, row, address, now, password_hash)

    def _decide(
        self, registration: Registration, csr: CsrInfo | None, address: str, now: int
    ) -> tuple[Decision, sqlite3.Row | None]:
        row = self._live_request(registration.username, now)
        if row is not None:
            return decide(State(row["state"]), self._matches(registration, csr, row)), row
        limit = self.settings.rate_limit
        admission = {
            "locked": not self._store.lock_window().is_open(now),
            "full": self._pending_count(now) >= self.settings.max_pending,
            "limited": limit > 0 and len(self._rate_window(address, now)) >= limit,
        }
        return decide(None, False, **admission), None

    def _act(
        self,
        decision: Decision,
        registration: Registration,
        csr: CsrInfo | None,
        row: sqlite3.Row | None,
        address: str,
        now: int,
        password_hash: str | None,
    ) -> Outcome:
        name = registration.username
        if decision is Decision.REDELIVER:
            if row["collected_at"] is None:
                self._mark_collected(name, now)
            return self._approved_outcome(name)
        if decision is Decision.POLL:
            assert row is not None
            self._count_poll(name, address, now)
            return pending_outcome(name, row["pairing_id"], self.settings.retry_after_pending)
        if decision is Decision.STORE:
            if self.settings.rate_limit:
                self._rate_window(address, now).append(now)
            return self._store_new(registration, csr, password_hash, address, now)
        retry_after = self.settings.retry_after_locked
        if decision is Decision.LIMITED:
            retry_after = _seconds_until(self._rate_window(address, now)[0] + MINUTE, now)
        raise refusal(
            decision,
            name,
            reason=(row["reason"] or "") if row is not None else "",
            stored=State(row["state"]) if row is not None else None,
            retry_after=retry_after,
            rate_limit=self.settings.rate_limit,
        )

    def _inspect_csr(self, registration: Registration) -> CsrInfo | None:
        if registration.csr is None:
            return None
        if self.ca is None:
            raise PolicyViolation("this registry issues no certificates: register with a password")
        return self._read_csr(registration.csr, registration.username)

    def _read_csr(self, text: str, username: str) -> CsrInfo:
        """The CSR ``text``, read and verified by the CA, naming ``username``; ``MalformedRequest`` otherwise."""
        assert self.ca is not None
        # The same CSR text verifies the same way: on the fast path a poll
        # pays for reading it once.
        digest = hashlib.sha256(text.encode()).digest()
        info = self._csrs.get(digest)
        if info is None:
            try:
                info = self.ca.inspect_csr(text)
            except ValueError as error:
                raise MalformedRequest(f"'csr' {error}") from None
            self._csrs.put(digest, info)
        if not info.common_name:
            raise MalformedRequest("the CSR's subject has no Common Name: it must be the username")
        if info.common_name != username:
            raise MalformedRequest(f"the CSR's Common Name {info.common_name!r} is not the username {username!r}")
        return info

    def _matches(self, registration: Registration, csr: CsrInfo | None, row: sqlite3.Row) -> bool:
        if registration.method != row["method"] or registration.rights.dumps() != row["requested"]:
            return False
        if csr is not None:
            return hmac.compare_digest(csr.public_key_sha256, row["key_sha256"])
        return self._passwords.check(registration.password or "", row["password_hash"])

    def _rate_window(self, address: str, now: int) -> collections.deque[int]:
        return _window(self._new_requests, address, now - MINUTE)

    def _hash(self, password: str | None) -> str | None:
        if password is None:
            return None
        stored = hash_password(password, self.settings.scrypt_n)
        self._passwords.remember(password, stored)
        return stored

    def _store_new(
        self, registration: Registration, csr: CsrInfo | None, password_hash: str | None, address: str, now: int
    ) -> Outcome:
        name = registration.username
        credential = csr.public_key_sha256 if csr else hashlib.sha256((password_hash or "").encode()).hexdigest()
        pairing = pairing_id(credential)
        with self._writing():
            self._store.add_request(
                username=name,
                state=State.PENDING.value,
                method=registration.method,
                password_hash=password_hash,
                public_key=csr.public_key if csr else None,
                key_sha256=csr.public_key_sha256 if csr else None,
                pairing_id=pairing,
                requested=registration.rights.dumps(),
                context=registration.context,
                client_address=address,
                created_at=now,
                last_poll_at=now,
            )
            self._audit(now, name, address, "request", name, registration.rights.to_json() | {"pairingId": pairing})
        return pending_outcome(name, pairing, self.settings.retry_after_pending)

    def _approved_outcome(self, name: str) -> Outcome:
        user = self._store.user(name)
        body = {"status": "approved", "username": name, **Rights.loads(user["granted"]).to_json()}
        if user["serial"]:
            body |= self._certificate_json(self._store.certificate_by_serial(user["serial"]))
        return Outcome(HTTPStatus.CREATED, body)

    def _certificate_json(self, certificate: Mapping[str, Any]) -> dict[str, Any]:
        """SPEC section 7: a certificate in an answer comes with its CA, its notAfter and its renewAfter."""
        body = {"certificate": certificate["certificate"]}
        if self.ca is not None:
            body["caCertificate"] = self.ca.certificate_pem
        return body | {
            "notAfter": _iso(certificate["not_after"]),
            "renewAfter": _iso(renew_after(certificate["not_before"], certificate["not_after"])),
        }

    def _repeated_poll(self, fingerprint: bytes, address: str) -> Outcome | None:
        """The 202 again for a body seen before, while its request is the one pending."""
        assert self._repeated is not None
        seen = self._repeated.get(fingerprint)
        if seen is None:
            return None
        now = self._now()
        with self._lock:
            if seen.checked != self._version and not self._still_pending(seen):
                return None
            if seen.created_at <= self._cutoff(now):
                return None
            self._count_poll(seen.username, address, now)
        return seen.outcome

    def _still_pending(self, seen: _Poll) -> bool:
        """Whether the stored request is still the pending one ``seen`` matched."""
        row = self._store.request(seen.username)
        # A password request's pairing id comes from its salted hash, and a
        # CSR request's from its key: with the rights, they say that the
        # stored request is still the one this body matched.
        if (
            row is None
            or row["state"] != State.PENDING.value
            or row["pairing_id"] != seen.pairing_id
            or row["requested"] != seen.requested
        ):
            return False
        seen.created_at, seen.checked = row["created_at"], self._version
        return True

    # --- The lock (SPEC section 3) ----------------------------------------

    def status(self) -> dict[str, Any]:
        """The lock state, the number of pending requests, and the current CRL's number and nextUpdate."""
        now = self._now()
        with self._lock:
            crl = self._store.crl()
            return self._store.lock_window().to_json(now) | {
                "pending": self._pending_count(now),
                "crl": crl and {"number": crl["number"], "nextUpdate": _iso(crl["next_update"])},
            }

    def unlock(self, body: object = None, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Open the registry from now for the body's ``duration`` (ms) or the default."""
        duration = parse_duration(body, self.settings.unlock_duration, self.settings.max_unlock_duration)
        now = self._now()
        with self._lock, self._writing():
            self._store.set_lock_window(LockWindow(now + duration // MICROSECOND))
            self._audit(now, actor, address, "unlock", None, {"durationMs": duration // MILLISECOND})
        return self.status()

    def lock(self, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Close the registry at once."""
        now = self._now()
        with self._lock, self._writing():
            self._store.set_lock_window(LockWindow(None))
            self._audit(now, actor, address, "lock", None, None)
        return self.status()

    # --- The administrator (SPEC section 4) -------------------------------

    def requests(self) -> list[dict[str, Any]]:
        """Every stored request, oldest first; a CSR's with what its key is (SPEC ADMIN-4.9-PAGE-FIELDS)."""
        now = self._now()
        with self._lock:
            with self._writing():
                self._store.purge(self._cutoff(now))
            rows = self._store.requests()
        return [_request_json(row) | {"publicKey": self._key_json(row)} for row in rows]

    def _key_json(self, row: sqlite3.Row) -> dict[str, str] | None:
        """The verified key a CSR request holds, as the administrator compares it with the device's label."""
        if row["public_key"] is None or self.ca is None:
            return None
        return {"type": self.ca.describe_public_key(row["public_key"]), "sha256": row["key_sha256"]}

    def approve(self, username: str, body: object = None, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Approve a pending request, granting the body's rights or the requested ones; sign its CSR's key."""
        granted = parse_grant(body, self.roles)
        moment = self.clock()
        now = _micros(moment)
        with self._lock:
            row, state = self._decidable(username, Event.APPROVE, now)
            if row["method"] == "csr" and self.ca is None:
                raise PolicyViolation("this registry has no CA to sign the request's CSR")
            rights = row["requested"]  # a canonical text already
            if granted:
                rights = dataclasses.replace(Rights.loads(rights), **granted).dumps()
            certificate = None
            if row["method"] == "csr":
                certificate = self._issue(username, row["public_key"], row["key_sha256"], moment)
            user = {
                "username": username,
                "method": row["method"],
                "password_hash": row["password_hash"],
                "granted": rights,
                "certificate": certificate and certificate["certificate"],
                "certificate_sha256": certificate and certificate["sha256"],
                "serial": certificate and certificate["serial"],
                "not_after": certificate and certificate["not_after"],
                "created_at": now,
            }
            details = {"requested": json.loads(row["requested"]), "granted": json.loads(rights)}
            if certificate:
                details["serial"] = certificate["serial"]
            with self._writing():
                self._store.set_state(username, state, now)
                self._store.add_user(**user)
                if certificate:
                    self._store.add_certificate(**certificate)
                self._audit(now, actor, address, "approve", username, details)
        return _user_json(user | {"not_before": certificate and certificate["not_before"]}, now)

    def _issue(
        self, username: str, public_key: bytes, key_sha256: str, moment: datetime, renewed_from: str | None = None
    ) -> dict[str, Any]:
        """A certificate for ``username`` and a verified key, as a row of the issued certificates."""
        assert self.ca is not None
        issued = self.ca.issue_client_certificate(public_key, username, moment)
        return {
            "serial": format(issued.serial, "x"),
            "username": username,
            "sha256": issued.sha256,
            "key_sha256": key_sha256,
            "certificate": issued.pem,
            "not_before": _micros(issued.not_before),
            "not_after": _micros(issued.not_after),
            "renewed_from": renewed_from,
        }

    def deny(self, username: str, body: object = None, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Deny a pending request, with the body's ``reason``."""
        reason = parse_reason(body)
        now = self._now()
        with self._lock:
            _, state = self._decidable(username, Event.DENY, now)
            with self._writing():
                self._store.set_state(username, state, now, reason)
                self._audit(now, actor, address, "deny", username, {"reason": reason})
            row = self._store.requests(username)[0]
        return _request_json(row) | {"publicKey": self._key_json(row)}

    def forget(self, username: str, *, actor: str = ADMIN, address: str = "") -> None:
        """Forget a pending or denied request."""
        now = self._now()
        with self._lock:
            self._decidable(username, Event.FORGET, now)
            with self._writing():
                self._store.delete_request(username)
                self._audit(now, actor, address, "forget", username, None)

    def users(self) -> list[dict[str, Any]]:
        """Every registered user, by name, with its current certificate's validity."""
        now = self._now()
        with self._lock:
            rows = self._store.users()
        return [_user_json(row, now) for row in rows]

    def remove_user(self, username: str, *, actor: str = ADMIN, address: str = "") -> None:
        """Remove a user and its request, and revoke its unexpired certificates: the username may register again."""
        now = self._now()
        with self._lock:
            if self._store.user(username) is None:
                raise NotFound(f"there is no user {username!r}")
            self._decidable(username, Event.REMOVE_USER, now)
            with self._writing():
                self._store.delete_user(username)
                self._store.delete_request(username)
                # RFC 5280 section 5.3.1: the subject no longer needs the certificate.
                revoked = self._store.revoke(username, now, "cessationOfOperation")
                self._audit(now, actor, address, "remove user", username, {"revokedCertificates": revoked})
                if revoked:
                    self._sign_crl(now)

    # --- The certificate's life (SPEC section 7) --------------------------

    def renew(self, certificate_der: bytes | None, body: object, *, address: str = "") -> Outcome:
        """A new certificate for the user whose current certificate is ``certificate_der`` (SPEC section 7).

        The same key renews, a new one re-keys; the rights stay. A renewal that
        repeats the last one (the same certificate presented, the same key)
        answers the certificate that renewal issued.
        """
        now = self._now()
        with self._lock:
            caller = self._valid_certificate(certificate_der, now)
        username = caller["username"]
        csr = self._read_csr(parse_renewal(body), username)
        if not key_accepted(csr):
            raise _policy([key_problem(csr)])
        moment = self.clock()
        now = _micros(moment)
        with self._lock:
            caller = self._valid_certificate(certificate_der, now)  # the user may be gone meanwhile
            user = self._store.user(username)
            current = self._store.certificate_by_serial(user["serial"])
            if current["renewed_from"] != caller["sha256"] or current["key_sha256"] != csr.public_key_sha256:
                current = self._issue(username, csr.public_key, csr.public_key_sha256, moment, caller["sha256"])
                details = {"serial": current["serial"], "from": caller["serial"]}
                details["newKey"] = current["key_sha256"] != caller["key_sha256"]
                with self._writing():
                    self._store.add_certificate(**current)
                    self._store.set_current_certificate(username, current)
                    self._audit(now, username, address, "renew", username, details)
            rights = Rights.loads(user["granted"]).to_json()
        body = {"status": "renewed", "username": username, **rights, **self._certificate_json(current)}
        return Outcome(HTTPStatus.CREATED, body)

    def crl(self) -> bytes:
        """The current CRL, DER (SPEC section 7); ``NotFound`` for a registry without a CA."""
        with self._lock:
            crl = self._store.crl()
        if crl is None:
            raise NotFound("this registry has no CA, and so no CRL")
        return crl["der"]

    def refresh_crl(self) -> None:
        """Sign a new CRL when the current one has less than half of its validity left; a timer calls this."""
        if self.ca is None:
            return
        now = self._now()
        with self._lock:
            crl = self._store.crl()
            if crl_due(crl and crl["next_update"], self.settings.crl_validity, now):
                with self._writing(changes_requests=False):
                    self._sign_crl(now)

    def _sign_crl(self, now: int) -> None:
        """A new CRL of the revoked certificates that have not expired; call within a transaction."""
        assert self.ca is not None
        crl = self._store.crl()
        number = crl["number"] + 1 if crl else 1
        next_update = now + self.settings.crl_validity // MICROSECOND
        revoked = [
            RevokedCertificate(int(row["serial"], 16), _datetime(row["revoked_at"]), row["reason"])
            for row in self._store.revoked(now)
        ]
        der = self.ca.sign_crl(revoked, number, _datetime(now), _datetime(next_update))
        self._store.set_crl(number, now, next_update, der)

    def audit(self, limit: int = 100, before: int | None = None) -> dict[str, Any]:
        """The audit trail, newest first; ``next`` pages on."""
        with self._lock:
            rows = self._store.audit(limit, before)
        entries = [
            {
                "id": row["id"],
                "at": _iso(row["at"]),
                "actor": row["actor"],
                "address": row["address"],
                "action": row["action"],
                "username": row["username"],
                "details": json.loads(row["details"]) if row["details"] else None,
            }
            for row in rows
        ]
        return {"entries": entries, "next": entries[-1]["id"] if entries and len(entries) == limit else None}

    def _decidable(self, username: str, event: Event, now: int) -> tuple[sqlite3.Row, State | None]:
        """The stored request for ``username`` and its state after ``event``; ``NotFound`` or ``Conflict``."""
        row = self._live_request(username, now)
        if row is None:
            raise NotFound(f"there is no request for {username!r}")
        return row, transition(State(row["state"]), event)

    # --- After registration (SPEC section 5) ------------------------------

    def authenticate_password(self, username: str, password: str, client_address: str = "") -> Identity:
        """The user behind a username and password; ``Unauthorized`` otherwise.

        Failures pause sign-ins for the username from the address that failed
        (``max_auth_failures``), and from everywhere only at a higher count
        (``max_auth_failures_per_username``), so that a stranger's guesses do
        not lock the device itself out.
        """
        now = self._now()
        window = self.settings.auth_failure_window // MICROSECOND
        with self._lock:
            windows = [
                (
                    _window(self._auth_failures, (username, client_address), now - window),
                    self.settings.max_auth_failures,
                ),
                (_window(self._auth_failures, username, now - window), self.settings.max_auth_failures_per_username),
            ]
            for failures, most in windows:
                if len(failures) >= most:
                    raise TooManyRequests(
                        "too many failed sign-ins for this username: wait a minute",
                        headers={"Retry-After": str(_seconds_until(failures[0] + window, now))},
                    )
            user = self._store.user(username)
            if user is None or not user["password_hash"] or not self._passwords.check(password, user["password_hash"]):
                for failures, _ in windows:
                    failures.append(now)
                raise Unauthorized("unknown username or wrong password", headers=dict(CHALLENGE))
        return Identity(username, Rights.loads(user["granted"]), "password")

    def authenticate_certificate(self, certificate_der: bytes) -> Identity:
        """The user a certificate was issued to, while it is valid; ``Unauthorized`` otherwise."""
        now = self._now()
        with self._lock:
            certificate = self._valid_certificate(certificate_der, now)
            user = self._store.user(certificate["username"])
        return Identity(user["username"], Rights.loads(user["granted"]), "certificate")

    def _valid_certificate(self, certificate_der: bytes | None, now: int) -> sqlite3.Row:
        """The issued certificate ``certificate_der``, if it is of a user, unrevoked and unexpired; else 401."""
        challenge = dict(CHALLENGE)
        if not certificate_der:
            raise Unauthorized(
                "present the client certificate this registry issued you (mutual TLS)", headers=challenge
            )
        certificate = self._store.certificate(hashlib.sha256(certificate_der).hexdigest())
        if certificate is not None and certificate["revoked_at"] is not None:
            raise Unauthorized("this certificate was revoked", headers=challenge)
        if certificate is None or self._store.user(certificate["username"]) is None:
            raise Unauthorized("this certificate belongs to no registered user", headers=challenge)
        if certificate["not_after"] <= now:
            raise Unauthorized("this certificate has expired", headers=challenge)
        return certificate

    # --- Time, transactions and the counted polls -------------------------

    def _now(self) -> int:
        return _micros(self.clock())

    def _cutoff(self, now: int) -> int:
        return now - self.settings.retention // MICROSECOND

    def _live_request(self, username: str, now: int) -> sqlite3.Row | None:
        """The stored request for ``username``; one past its retention period counts as gone."""
        row = self._store.request(username)
        if row is None or (row["state"] != State.APPROVED.value and _since(row) <= self._cutoff(now)):
            return None
        return row

    def _pending_count(self, now: int) -> int:
        return self._store.pending_count(self._cutoff(now))

    @contextlib.contextmanager
    def _writing(self, *, changes_requests: bool = True) -> Iterator[None]:
        """A write transaction that writes the counted polls first; remembered polls look again after it."""
        if changes_requests:
            self._version += 1
        now = self._now()
        counts = self._polls.take(now)
        try:
            with self._store.transaction():
                if counts:
                    self._store.count_polls(counts)
                yield
        except BaseException as error:
            self._polls.give_back(counts)
            if isinstance(error, StorageUnavailable):
                error.headers["Retry-After"] = str(self.settings.retry_after_unavailable)
                if now - self._storage_logged_at >= MINUTE:
                    self._storage_logged_at = now
                    log.error("the database cannot store (disk full?): new requests get 503 until it can")
            raise

    def _mark_collected(self, username: str, now: int) -> None:
        # Once, and only to inform the administrator: the answer goes out
        # even when it cannot be written.
        with contextlib.suppress(StorageUnavailable), self._writing(changes_requests=False):
            self._store.mark_collected(username, now)

    def _count_poll(self, username: str, address: str, now: int) -> None:
        if self._polls.count(username, address, now):
            # A poll answers 202 though its count cannot be written now:
            # the count waits in memory for the next write.
            with contextlib.suppress(StorageUnavailable):
                self._write_polls()

    def _write_polls(self) -> None:
        # Poll counts change no request's state: the remembered polls stand.
        with self._writing(changes_requests=False):
            pass

    def _audit(self, now: int, actor: str, address: str, action: str, username: str | None, details: object) -> None:
        self._store.append_audit(now, actor, address, action, username, details)


def _window(windows: dict[Any, collections.deque[int]], key: object, start: int) -> collections.deque[int]:
    """The times in ``windows[key]`` after ``start``, as a deque to append to."""
    if len(windows) > 10_000:
        for stale in [k for k, times in windows.items() if not times or times[-1] <= start]:
            del windows[stale]
    window = windows.setdefault(key, collections.deque())
    while window and window[0] <= start:
        window.popleft()
    return window

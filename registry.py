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
3. ``decide``: the stored request for the username, if any: first, for a
   password repeating a stored password, 429 while the username's failed
   sign-ins from this address are at their limit (REG-2.4-THROTTLE: no
   password is checked then); then by its state and whether the request
   matches it (201 again, 202 for a poll, 403 for a denied one, 409 when it
   differs; a wrong password is a failed sign-in); for a username with none, 423 when the
   registry is locked, 503 when the pending queue is full, 429 when the
   client address asks too often (when limited); otherwise it is stored as
   pending: 202.

A request *matches* a stored one when the credential (the same password,
or a CSR with the same public key) and the requested rights are equal.

The certificate's life (SPEC section 7)
---------------------------------------
Every certificate issued is recorded, and stands *current* (the user's
credential), *superseded* (a renewal replaced it), *revoked* or *expired*.
The table ``CERTIFICATE_LIFE`` alone decides a renewal over mutual TLS
(``renew``): the current certificate renews with the same key or re-keys
with a new one, and the new certificate becomes current; the one it
replaced may only repeat that renewal (a CSR for the current key fetches
the current certificate again); anything else is 401. A superseded
certificate stays valid for relying parties until its own notAfter. Removing a user revokes its unexpired
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
- Every password check passes the sign-in throttle first
  (``SignInThrottle``); no key derivation or signature runs under the
  registry's lock.
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

This module is the reference: every request is answered the plain way, with
no cache. Thousands of clients poll every few seconds, so the server uses
``fastpath.FastRegistry``, which extends ``Registry`` with remembered polls,
passwords and CSRs, and batches the poll counts; ``test_fast_path.py``
checks that both give the same answers and store the same state.

The core touches no socket. Certificates are the business of an injected
``CertificateAuthority`` (``ca.py`` provides one); without it the registry
serves password registrations only. An injected ``Provisioner`` (SPEC
section 11; ``broker.py`` provides one) must hold a password user's
password before that user's 201 is answered.
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
import os
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
# MQTT 3.1.1 section 4.7.1: '#' stands alone as the last level, '+' stands
# alone in its level; section 4.7.3: no U+0000. The OpenAPI document says the
# same with this very pattern.
_TOPIC_LEVEL = r"(?:\+|[^+#/\x00]*)"
TOPIC_FILTER = re.compile(rf"#|{_TOPIC_LEVEL}(?:/{_TOPIC_LEVEL})*(?:/#)?")
USERNAME_LENGTH = range(3, 65)
PASSWORD_LENGTH = range(5, 1025)
CONTEXT_LENGTH = 1024
REASON_LENGTH = 1024
OPERATIONS = ("read", "write", "readWrite")
CONTEXTS = ("mqtt", "http")
REQUEST_FIELDS = frozenset({"username", "password", "csr", "roles", "permissions", "context"})
PERMISSION_FIELDS = frozenset({"resource", "operation", "context"})
# REQ-1-CSR-PEM: a CSR field is exactly one PEM block (RFC 7468 section 7, or
# the older NEW label), with nothing around it but white space: no second
# block, no RFC 1421 header lines, no text. Any other text could be read one
# way when its signature is checked and another way later.
ONE_CSR_BLOCK = re.compile(
    r"\s*-----BEGIN ((?:NEW )?)CERTIFICATE REQUEST-----[A-Za-z0-9+/=\s]+-----END \1CERTIFICATE REQUEST-----\s*",
    re.ASCII,
)
ONE_CSR_BLOCK_HELP = (
    "must be one PKCS#10 certificate signing request in exactly one PEM block, from"
    " '-----BEGIN CERTIFICATE REQUEST-----' to"
    " '-----END CERTIFICATE REQUEST-----', with nothing before or after it and no header lines"
)
# REG-2.3-KEY: the keys a CSR may carry (the curve names are those of
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
        """The JSON error body (REG-2.5-ERRORS)."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        body.update(self.extra)
        return body


class MalformedRequest(RegistryError):
    """The request breaks the shape of SPEC section 1 (400; REG-2.2-MALFORMED)."""

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


class CaExpired(RegistryError):
    """The registry's CA has expired: it issues nothing (503; LIFE-7.6-CA-EXPIRY)."""

    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "ca_expired"


class StorageUnavailable(RegistryError):
    """The database cannot take a write now, its disk full (503); nothing was stored."""

    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "storage_unavailable"


class BrokerUnavailable(RegistryError):
    """The MQTT broker could not be given a password user's credential now (503); the next poll tries again."""

    status, code = HTTPStatus.SERVICE_UNAVAILABLE, "broker_unavailable"


# --- Values ---------------------------------------------------------------


class State(enum.Enum):
    """Where a stored request stands."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


class Event(enum.Enum):
    """What a client, the administrator or time does to a stored request."""

    REQUEST = "request"
    APPROVE = "approve"
    DENY = "deny"
    FORGET = "forget"
    REMOVE_USER = "remove the user of"
    EXPIRE = "expire"


GONE = None
# Every move of a stored request; GONE is no request (before one is made, and
# after it is forgotten). Nothing else changes a request's state.
TRANSITIONS: dict[tuple[State | None, Event], State | None] = {
    (GONE, Event.REQUEST): State.PENDING,  # REG-2.4-STORE
    (State.PENDING, Event.APPROVE): State.APPROVED,  # ADMIN-4.2-CALLS
    (State.PENDING, Event.DENY): State.DENIED,
    (State.PENDING, Event.FORGET): GONE,
    (State.DENIED, Event.FORGET): GONE,
    (State.APPROVED, Event.REMOVE_USER): GONE,
    (State.PENDING, Event.EXPIRE): GONE,  # REG-2.5-RETENTION
    (State.DENIED, Event.EXPIRE): GONE,
}
# REG-2.5-RETENTION: the column from which a request's retention period
# counts, for each state that expires: a pending request's creation, a
# denied one's decision. An approved request is kept as long as its user.
RETENTION_STARTS: dict[State, str] = {State.PENDING: "created_at", State.DENIED: "decided_at"}
assert set(RETENTION_STARTS) == {state for state, event in TRANSITIONS if event is Event.EXPIRE}


def transition(state: State | None, event: Event) -> State | None:
    """The state after ``event`` (ADMIN-4.3-DECIDE); ``Conflict`` when the move is illegal."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        hint = " (remove its user instead)" if state is State.APPROVED else ""
        now = state.value if state else "gone"
        raise Conflict(
            f"cannot {event.value} a request that is {now}{hint}",
            code="not_pending",
            state=now,
        ) from None


def expired(state: State, times: Mapping[str, Any], cutoff: int) -> bool:
    """REG-2.5-RETENTION: whether a request in ``state`` with these times is gone at ``cutoff``."""
    start = RETENTION_STARTS.get(state)
    return start is not None and times[start] <= cutoff


class Standing(enum.Enum):
    """Where an issued certificate stands in its user's life (LIFE-7.2-RENEW)."""

    CURRENT = "current"  # the user's credential: it renews and re-keys
    SUPERSEDED = "superseded"  # a renewal replaced it: valid for relying parties, it may only repeat that renewal
    REVOKED = "revoked"  # its user was removed
    EXPIRED = "expired"  # past its notAfter


class LifeEvent(enum.Enum):
    """What happens to an issued certificate: a renewal presenting it, its user's removal, time."""

    RENEW = "renew with the same key"
    REKEY = "re-key"
    REPEAT = "repeat the renewal that replaced"
    REMOVE_USER = "remove the user of"
    EXPIRE = "expire"


class Renewal(enum.Enum):
    """What a renewal answers (LIFE-7.2-RENEW)."""

    ISSUE = "a new certificate, which becomes the current one"
    REDELIVER = "the current certificate again"


# LIFE-7.2-RENEW, LIFE-7.3-REVOKE: (standing, event) -> (the presented
# certificate's standing after it, what a renewal answers). Only the current
# certificate starts a renewal; the certificate it replaced may only fetch
# the current one again (a lost answer); nothing else renews.
CERTIFICATE_LIFE: dict[tuple[Standing, LifeEvent], tuple[Standing, Renewal | None]] = {
    (Standing.CURRENT, LifeEvent.RENEW): (Standing.SUPERSEDED, Renewal.ISSUE),
    (Standing.CURRENT, LifeEvent.REKEY): (Standing.SUPERSEDED, Renewal.ISSUE),
    (Standing.SUPERSEDED, LifeEvent.REPEAT): (Standing.SUPERSEDED, Renewal.REDELIVER),
    (Standing.CURRENT, LifeEvent.REMOVE_USER): (Standing.REVOKED, None),
    (Standing.SUPERSEDED, LifeEvent.REMOVE_USER): (Standing.REVOKED, None),
    (Standing.CURRENT, LifeEvent.EXPIRE): (Standing.EXPIRED, None),
    (Standing.SUPERSEDED, LifeEvent.EXPIRE): (Standing.EXPIRED, None),
}
RENEWING = frozenset(standing for (standing, _), (_, answer) in CERTIFICATE_LIFE.items() if answer is not None)
NOT_RENEWING = {
    Standing.SUPERSEDED: "a renewal replaced this certificate: renew with the current one (repeating that renewal,"
    " a CSR for the current certificate's key, fetches the current certificate again)",
    Standing.REVOKED: "this certificate was revoked",
    Standing.EXPIRED: "this certificate has expired",
}


def standing(*, revoked: bool, expired: bool, current: bool) -> Standing:
    """How an issued certificate of an existing user stands: revocation first, then time, then renewal."""
    if revoked:
        return Standing.REVOKED
    if expired:
        return Standing.EXPIRED
    return Standing.CURRENT if current else Standing.SUPERSEDED


def renewal_event(csr_key: str, presented_key: str, current_key: str, *, replaced_by_current: bool) -> LifeEvent:
    """Which renewal a CSR for ``csr_key`` is, from a certificate for ``presented_key`` (keys as SHA-256 hex).

    A repeat is the certificate that the current one replaced asking again
    for the current certificate's key: its lost answer.
    """
    if replaced_by_current and csr_key == current_key:
        return LifeEvent.REPEAT
    return LifeEvent.RENEW if csr_key == presented_key else LifeEvent.REKEY


def renewal(presented: Standing, event: LifeEvent) -> Renewal:
    """What a renewal answers, from ``CERTIFICATE_LIFE`` alone; ``Unauthorized`` when it renews nothing."""
    _, answer = CERTIFICATE_LIFE.get((presented, event), (presented, None))
    if answer is None:
        raise Unauthorized(
            NOT_RENEWING.get(presented, f"a {presented.value} certificate cannot {event.value}"),
            headers=dict(CHALLENGE),
        )
    return answer


@dataclass(frozen=True, order=True)
class Permission:
    """One permission (REQ-1-PERMISSION): a resource, an operation, a context."""

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
    # How the request came (SPEC EST-10.4-VIA): "api" (this JSON) or "est"
    # (RFC 7030). The administrator sees it; it takes no part in matching.
    via: str = "api"

    @property
    def method(self) -> str:
        return "password" if self.password is not None else "csr"


class CsrInfo(Protocol):
    """What the registry needs to know of a CSR its CA read and verified; ``ca.CsrInfo`` is one."""

    common_name: str | None
    key_algorithm: str  # "RSA", "EC", "Ed25519", or another name
    key_size: int
    curve: str | None
    # The SubjectPublicKeyInfo (DER) of the very request whose signature was
    # verified: the key a certificate is issued for, kept from that moment.
    # None when the CA cannot load the key's algorithm: nothing was verified,
    # and the key policy refuses it (REG-2.3-KEY).
    public_key: bytes | None

    @property
    def public_key_sha256(self) -> str:
        """The hex SHA-256 of the key: how a poll with the same key is recognised."""


class IssuedCertificate(Protocol):
    """A client certificate as the CA issued it; ``ca.IssuedCertificate`` is one."""

    pem: str
    serial: int
    not_before: datetime
    not_after: datetime
    sha256: str  # hex digest of the certificate DER


class CertificateAuthority(Protocol):
    """What the registry asks of a CA; ``ca.CA`` is one."""

    certificate_pem: str
    not_after: datetime  # the CA certificate's own notAfter: nothing it issues outlives it

    def inspect_csr(self, pem: str) -> CsrInfo:
        """Parse and verify a CSR; ``ValueError`` when it is malformed."""

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> IssuedCertificate:
        """Sign a client certificate for ``username`` and ``public_key``, the verified SPKI DER of its CSR."""

    def sign_crl(
        self, revoked: Iterable[tuple[int, datetime, str]], number: int, this_update: datetime, next_update: datetime
    ) -> bytes:
        """Sign a CRL (DER) listing ``revoked``: (serial, when, a CRLReason name of RFC 5280 section 5.3.1)."""


@dataclass(frozen=True)
class Account:
    """A user as a broker needs to know it (SPEC section 11): its name, how it signs in, and what it was granted."""

    username: str
    method: str  # "password" or "csr"
    rights: Rights
    # A password user's password, named without being revealed: the SHA-256
    # of its salted hash (it changes when the user registers anew). None for
    # a certificate user.
    credential: str | None


def password_credential(password_hash: str) -> str:
    """The name of a stored password that reveals nothing of it: the SHA-256 of its salted scrypt hash."""
    return hashlib.sha256(password_hash.encode()).hexdigest()


class Provisioner(Protocol):
    """Where a password user's credential must arrive before its 201 (SPEC section 11); ``broker.Reconciler`` is one.

    The registry keeps no password, only its scrypt hash: the plaintext is
    in the client's own request alone, so it reaches the broker when the
    client collects its 201.
    """

    def provision_password(self, username: str, password: str, rights: Rights, credential: str) -> None:
        """Make ``username`` able to sign in with ``password`` and ``rights``; ``BrokerUnavailable`` when it cannot.

        ``credential`` names the password without revealing it (the SHA-256 of
        its salted hash), so that a provisioner can tell a password it holds
        already from a new one.
        """

    def inspect_public_key(self, public_key: bytes) -> CsrInfo:
        """What a verified key (SPKI DER, as ``inspect_csr`` gave it) is: its algorithm, size and curve."""


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
    # AUTH-5.2-KNOWN-ADDRESS: an address the username signed in from within
    # this period is spared the all-addresses limit (its own limit stays).
    known_address_period: timedelta = timedelta(days=30)
    # AUTH-5.2-BOUNDED: the failure windows and known addresses kept in
    # memory, each; the least recently touched are forgotten first.
    max_throttle_entries: int = 100_000
    # Retry-After of a 503 when the database cannot store (a full disk).
    retry_after_unavailable: int = 30
    # LIFE-7.4-CRL, LIFE-7.5-CRL-FRESH: a CRL is valid this long, and signed anew when half of
    # that is left.
    crl_validity: timedelta = timedelta(days=7)
    # scrypt's cost n (RFC 7914 section 2): 2**14 is the interactive-login
    # choice of the RFC's authors; tests lower it to stay fast.
    scrypt_n: int = 2**14

    def __post_init__(self) -> None:
        """STORE-6.10-SETTINGS: refuse a setting outside its range, naming it and the range."""
        for name, (least, most) in SETTING_RANGES.items():
            value = getattr(self, name)
            if not least <= value <= most:
                raise ValueError(f"the setting {name} must be from {least} to {most}, not {value}")
        if self.scrypt_n & (self.scrypt_n - 1):  # RFC 7914 section 2: N is a power of two
            raise ValueError(f"the setting scrypt_n must be a power of two, not {self.scrypt_n}")
        if self.unlock_duration > self.max_unlock_duration:
            raise ValueError("the setting unlock_duration must not be longer than max_unlock_duration")


# STORE-6.10-SETTINGS: the least and the most each setting may be. A window
# of zero would make every answer wrong in its own way (an unlock that
# stays locked, requests that vanish, a CRL already stale), and a huge one
# overflows a date.
SETTING_RANGES: dict[str, tuple[Any, Any]] = {
    "unlock_duration": (timedelta(seconds=30), timedelta(days=1)),
    "max_unlock_duration": (timedelta(minutes=1), timedelta(days=30)),
    "retention": (timedelta(hours=1), timedelta(days=365)),
    "retry_after_pending": (1, 3600),
    "retry_after_locked": (1, 3600),
    "max_pending": (1, 10_000_000),
    "rate_limit": (0, 100_000),
    "max_auth_failures": (1, 1000),
    "max_auth_failures_per_username": (1, 1_000_000),
    "auth_failure_window": (timedelta(seconds=1), timedelta(days=1)),
    "known_address_period": (timedelta(0), timedelta(days=365)),
    "max_throttle_entries": (100, 10_000_000),
    "retry_after_unavailable": (1, 3600),
    "crl_validity": (timedelta(days=1), timedelta(days=365)),
    "scrypt_n": (2, 2**20),
}


@dataclass(frozen=True)
class LockWindow:
    """When the registry takes new requests: until ``until`` (microseconds since the epoch); never when None."""

    until: int | None = None

    def is_open(self, now: int) -> bool:
        return self.until is not None and now < self.until

    def to_json(self, now: int) -> dict[str, Any]:
        if not self.is_open(now):
            return {"locked": True, "unlockedUntil": None}
        # SPEC ADMIN-4.10-PAGE-FIELDS: what is left and the registry's own time,
        # so that a page counts down without trusting its own clock.
        assert self.until is not None
        left = (self.until - now) // 1000
        return {"locked": False, "unlockedUntil": _iso(self.until), "unlockedForMs": left, "serverTime": _iso(now)}


class Decision(enum.Enum):
    """What a well-formed registration within policy comes to (SPEC section 2.4)."""

    THROTTLED = "a password over the failed sign-ins' limit"
    REDELIVER = "the approved request again"
    POLL = "a poll of the pending request"
    STORE = "a new pending request"
    USERNAME_TAKEN = "another request for a user's name"
    DUPLICATE = "another request beside a pending one"
    DUPLICATE_OF_DENIED = "another request beside a denied one"
    DENIED = "the denied request again"
    LOCKED = "a new request while locked"
    FULL = "a new request while the queue is full"
    LIMITED = "a new request over the address's rate"

    @property
    def status(self) -> HTTPStatus:
        """The status that answers it."""
        answer = ANSWERS[self]
        return answer.error.status if isinstance(answer, Refusal) else answer


@dataclass(frozen=True)
class Refusal:
    """How a decision refuses: its error (which knows its status), its code and its message for ``name``."""

    error: type[RegistryError]
    message: str  # formatted with the username as {name} and the rate limit as {limit}
    code: str | None = None  # the error's own code when None


# SPEC section 2.4 (REG-2.4-*): every decision's answer, in one table: the status of
# those the registry carries out (``Registry._act``), the refusal of the rest.
ANSWERS: dict[Decision, HTTPStatus | Refusal] = {
    Decision.REDELIVER: HTTPStatus.CREATED,  # REG-2.4-USER, REG-2.4-REDELIVER
    Decision.POLL: HTTPStatus.ACCEPTED,  # REG-2.4-PENDING
    Decision.STORE: HTTPStatus.ACCEPTED,  # REG-2.4-STORE
    Decision.THROTTLED: Refusal(  # REG-2.4-THROTTLE
        TooManyRequests, "too many failed sign-ins for {name!r} from this address: wait, then send the request again"
    ),
    Decision.USERNAME_TAKEN: Refusal(Conflict, "the username {name!r} is taken", "username_taken"),  # REG-2.4-USER
    Decision.DUPLICATE: Refusal(  # REG-2.4-PENDING
        Conflict, "a different request for {name!r} is pending: poll with the same request", "duplicate_request"
    ),
    Decision.DUPLICATE_OF_DENIED: Refusal(  # REG-2.4-DENIED
        Conflict,
        "a different request for {name!r} was denied; it is forgotten after the retention period",
        "duplicate_request",
    ),
    Decision.DENIED: Refusal(Denied, "the request for {name!r} was denied"),  # REG-2.4-DENIED
    Decision.LOCKED: Refusal(  # REG-2.4-LOCKED
        Locked, "the registry is locked: ask the administrator to unlock it, then send the request again"
    ),
    Decision.FULL: Refusal(  # REG-2.4-FULL
        Full, "the registry holds as many pending requests as it may: try again later"
    ),
    Decision.LIMITED: Refusal(  # REG-2.4-RATE
        TooManyRequests, "more than {limit} new requests a minute from this address"
    ),
}


# REG-2.4-USER, REG-2.4-PENDING, REG-2.4-DENIED: a stored request decides, by its state and whether the
# request matches it.
STORED: dict[tuple[State, bool], Decision] = {
    (State.APPROVED, True): Decision.REDELIVER,
    (State.APPROVED, False): Decision.USERNAME_TAKEN,
    (State.PENDING, True): Decision.POLL,
    (State.PENDING, False): Decision.DUPLICATE,
    (State.DENIED, True): Decision.DENIED,
    (State.DENIED, False): Decision.DUPLICATE_OF_DENIED,
}


def decide(
    stored: State | None,
    matches: bool,
    *,
    throttled: bool = False,
    locked: bool = False,
    full: bool = False,
    limited: bool = False,
) -> Decision:
    """The answer to a registration for a username whose stored request is ``stored`` (None: none).

    ``throttled`` counts only for a stored request, before it is matched
    (REG-2.4-THROTTLE: no password is verified over the limit). ``locked``,
    ``full`` and ``limited`` count only for a username with no stored
    request, in that order (REG-2.5-LOCK-SCOPE: the lock keeps out only new
    requests).
    """
    if stored is not None:
        return Decision.THROTTLED if throttled else STORED[stored, matches]
    if locked:
        return Decision.LOCKED
    if full:
        return Decision.FULL
    if limited:
        return Decision.LIMITED
    return Decision.STORE


def refusal(
    decision: Decision, username: str, *, reason: str = "", retry_after: int = 0, limit: int = 0
) -> RegistryError:
    """The error that answers a refusing ``decision``, from ``ANSWERS``: status, code, message and headers."""
    answer = ANSWERS[decision]
    if not isinstance(answer, Refusal):
        raise ValueError(f"{decision.name} is not a refusal")
    # REG-2.5-RETRY-AFTER: every 423, 429 and 503 says when to come back.
    waits = answer.error.status in (HTTPStatus.LOCKED, HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE)
    return answer.error(
        answer.message.format(name=username, limit=limit),
        code=answer.code,
        headers={"Retry-After": str(retry_after)} if waits else None,
        **({"reason": reason} if decision is Decision.DENIED else {}),
    )


def pending_outcome(username: str, pairing_id: str, retry_after: int) -> Outcome:
    """REG-2.5-PENDING-BODY, REG-2.5-RETRY-AFTER: the 202, the request named by its pairing id."""
    return Outcome(
        HTTPStatus.ACCEPTED,
        {"status": "pending", "username": username, "pairingId": pairing_id},
        {"Retry-After": str(retry_after)},
    )


def pairing_id(credential_sha256: str) -> str:
    """Six hex digits the client and the administrator can compare (REG-2.5-PENDING-BODY)."""
    return credential_sha256[:6]


def renew_after(not_before: int, not_after: int) -> int:
    """LIFE-7.1-TIMES: the moment from which a client should renew, two thirds of the way through the validity."""
    return not_before + (not_after - not_before) * 2 // 3


def certificate_status(not_before: int, not_after: int, now: int) -> str:
    """How a certificate stands: "valid", "renew" (from its renewAfter on: it expires soon) or "expired"."""
    if now >= not_after:
        return "expired"
    return "renew" if now >= renew_after(not_before, not_after) else "valid"


def crl_due(next_update: int | None, validity: timedelta, now: int) -> bool:
    """LIFE-7.5-CRL-FRESH: a new CRL once less than half of the current one's validity is left (or none is)."""
    return next_update is None or next_update - now < validity // MICROSECOND // 2


# --- Parsing and policy ------------------------------------------------------


def parse_json(body: bytes) -> object:
    """A body as JSON; ``MalformedRequest`` when it is not JSON in UTF-8 (REQ-1-UTF8)."""
    try:
        # RFC 8259 section 8.1: JSON between systems is UTF-8; decoding first
        # refuses the UTF-16 and UTF-32 that json.loads would guess.
        return json.loads(body.decode())
    except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too
        raise MalformedRequest("the body is not JSON") from None


def parse_registration(payload: object) -> Registration:
    """REQ-1-SHAPE: check the shape of a request; ``MalformedRequest`` (REG-2.2-MALFORMED)."""
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
    """REQ-1-PERMISSION: an MQTT topic filter (``TOPIC_FILTER``)."""
    return TOPIC_FILTER.fullmatch(resource) is not None


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
    """The policy rules of SPEC section 2.3 that a request breaks (REG-2.3-USERNAME, -PASSWORD, -ROLE, -KEY)."""
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
    """REG-2.3-KEY: RSA >= 2048 bits, EC P-256 or P-384, Ed25519; never a key the CA could not load."""
    return csr.public_key is not None and (
        (csr.key_algorithm == "RSA" and csr.key_size >= MIN_RSA_BITS)
        or (csr.key_algorithm == "EC" and csr.curve in ACCEPTED_CURVES)
        or csr.key_algorithm == "Ed25519"
    )


def key_problem(csr: CsrInfo) -> str:
    """What to say of a key the policy refuses."""
    return f"a {describe_key(csr)} key is not accepted: use RSA of 2048 bits or more, EC P-256 or P-384, or Ed25519"


def describe_key(csr: CsrInfo) -> str:
    """A key as a person names it: "EC secp256r1", "RSA 1024-bit"."""
    if csr.public_key is None:
        return f"{csr.key_algorithm} (an algorithm the CA cannot read)"
    if csr.key_algorithm == "EC":
        return f"EC {csr.curve}"
    return f"{csr.key_algorithm} {csr.key_size}-bit" if csr.key_size else csr.key_algorithm


def _policy(problems: list[str]) -> PolicyViolation:
    if len(problems) == 1:
        return PolicyViolation(problems[0])
    return PolicyViolation(f"the request breaks {len(problems)} policy rules", details=problems)


def parse_grant(body: object, catalog: Mapping[str, str]) -> dict[str, Any]:
    """ADMIN-4.4-APPROVE-BODY: the rights an approval grants instead of the requested ones; one left out, as asked."""
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
    """A renewal's body (LIFE-7.2-RENEW), ``{"csr": "<PEM>"}``: the CSR's text."""
    if not isinstance(body, dict) or set(body) != {"csr"} or not _is_text(body["csr"]):
        raise MalformedRequest("the body must be a JSON object with only 'csr': a CSR for the key to certify")
    return body["csr"]


def parse_duration(body: object, default: timedelta, longest: timedelta) -> timedelta:
    """An unlock's duration: the body's ``duration`` in milliseconds, or ``default`` (LOCK-3.2)."""
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

USERS_TABLE = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY REFERENCES requests (username),
    method TEXT NOT NULL,
    password_hash TEXT,
    granted TEXT NOT NULL,
    serial TEXT,
    not_after INTEGER,
    created_at INTEGER NOT NULL
);
"""
CERTIFICATES_TABLE = """
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
"""
SCHEMA = f"""
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
    collected_at INTEGER,
    decided_by TEXT,
    via TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (state, created_at);
{USERS_TABLE}
{CERTIFICATES_TABLE}
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
    " poll_count, client_address, decided_at, decided_by, reason, collected_at, users.granted, via,"
    " requests.public_key, requests.key_sha256"
)
USER_COLUMNS = (
    "users.username, method, granted, created_at, users.serial, users.not_after, certificates.not_before,"
    " certificates.sha256 AS certificate_sha256"
)


class Store:
    """One SQLite database: the lock window, the requests, the users and the audit trail.

    Not thread-safe on its own: ``Registry`` calls it under its lock. Writes
    happen inside ``transaction()``.
    """

    def __init__(self, database: str = ":memory:") -> None:
        if database not in ("", ":memory:") and not database.startswith("file:"):
            # Password hashes: the owner's alone, as server.py makes it; SQLite gives the -wal and -shm
            # files the database's mode (issue 26). An existing file keeps its mode.
            os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
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
        self._upgrade()

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
        """The pending requests whose retention has not ended at ``cutoff`` (REG-2.5-RETENTION)."""
        start = RETENTION_STARTS[State.PENDING]
        return self._db.execute(
            f"SELECT count(*) FROM requests WHERE state = ? AND {start} > ?", (State.PENDING.value, cutoff)
        ).fetchone()[0]

    def add_request(self, **columns: object) -> None:
        """Store a new request, in place of an expired one of the same name."""
        self._db.execute("DELETE FROM requests WHERE username = ?", (columns["username"],))
        self._insert("requests", columns)

    def set_state(
        self, username: str, state: State, decided_at: int, reason: str | None = None, decided_by: str | None = None
    ) -> None:
        self._db.execute(
            "UPDATE requests SET state = ?, decided_at = ?, reason = ?, decided_by = ? WHERE username = ?",
            (state.value, decided_at, reason, decided_by, username),
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
        """Drop the requests whose retention ended at or before ``cutoff`` (REG-2.5-RETENTION)."""
        for state, start in RETENTION_STARTS.items():
            self._db.execute(f"DELETE FROM requests WHERE state = ? AND {start} <= ?", (state.value, cutoff))

    def count_polls(self, polls: Mapping[str, tuple[int, int, str]]) -> None:
        """Add polls to pending and denied requests: by username, (last time, how many, from which address)."""
        self._db.executemany(
            "UPDATE requests SET last_poll_at = ?, poll_count = poll_count + ?, client_address = ?"
            " WHERE username = ? AND state IN (?, ?)",
            [
                (at, count, address, name, State.PENDING.value, State.DENIED.value)
                for name, (at, count, address) in polls.items()
            ],
        )

    # --- Users ---

    def add_user(self, **columns: object) -> None:
        self._insert("users", columns)

    def user(self, username: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()

    def accounts(self) -> list[sqlite3.Row]:
        """Every user's name, method, grant and password hash, by name (SPEC section 11)."""
        query = "SELECT username, method, granted, password_hash FROM users ORDER BY username"
        return self._db.execute(query).fetchall()

    def users(self) -> list[sqlite3.Row]:
        """Every user, by name, with its current certificate's validity."""
        return self._db.execute(
            f"SELECT {USER_COLUMNS} FROM users LEFT JOIN certificates ON certificates.serial = users.serial"
            " ORDER BY users.username"
        ).fetchall()

    def set_current_certificate(self, username: str, certificate: Mapping[str, Any]) -> None:
        """Make ``certificate`` (a row of ``certificates``) the user's current one, and its key the user's."""
        self._db.execute(
            "UPDATE users SET serial = ?, not_after = ? WHERE username = ?",
            (certificate["serial"], certificate["not_after"], username),
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

    def revoked_after(self, moment: int) -> bool:
        """Whether a certificate was revoked after ``moment``."""
        return (
            self._db.execute("SELECT 1 FROM certificates WHERE revoked_at > ? LIMIT 1", (moment,)).fetchone()
            is not None
        )

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

    def _upgrade(self) -> None:
        """Bring the database to ``SCHEMA_VERSION`` by the steps of ``UPGRADES``, in order; refuse one it cannot.

        STORE-6.11-SCHEMA: ``PRAGMA user_version`` numbers the schema. A new
        database is made at the current version; a database of the versions
        before the numbering (0) takes every step, each of which looks at
        what is there.
        """
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database is of schema version {version}, made by a newer registry; this one knows"
                f" {SCHEMA_VERSION} at most: run the newer registry, or restore a backup of this version"
            )
        if tables and "requests" not in tables:
            raise SchemaError(f"the database holds tables of no registry ({', '.join(sorted(tables))})")
        if not tables:
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        # A table is rebuilt by dropping the old one, which a foreign key
        # may name: the keys are checked once the step is done
        # (https://www.sqlite.org/lang_altertable.html#otheralter, step 1).
        self._db.execute("PRAGMA foreign_keys=OFF")
        for number, step in enumerate(UPGRADES[version:], start=version + 1):
            with self.transaction():
                step(self._db)
                if self._db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise SchemaError(f"upgrading the database to version {number} broke a reference: restore a backup")
                self._db.execute(f"PRAGMA user_version = {number}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)  # the indexes a rebuilt table lost

    def _insert(self, table: str, columns: Mapping[str, object]) -> None:
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        self._db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(columns.values()))


class SchemaError(ValueError):
    """A database this registry cannot read or upgrade (STORE-6.11-SCHEMA)."""


def _columns(db: sqlite3.Connection, table: str) -> dict[str, str]:
    """A table's columns and their declared types; empty when there is no such table."""
    return {row[1]: row[2] for row in db.execute(f"PRAGMA table_info({table})")}


def _rebuild(db: sqlite3.Connection, table: str, definition: str, values: Mapping[str, str]) -> None:
    """Make ``table`` anew as ``definition`` (its columns: the SQL expressions of ``values`` over the old rows).

    SQLite cannot change a column's type or drop a UNIQUE column in place
    (https://www.sqlite.org/lang_altertable.html#otheralter): a new table is
    filled from the old, which is dropped, and the new one takes its name.
    """
    db.execute(
        re.sub(rf"^CREATE TABLE (IF NOT EXISTS )?{table} ", f"CREATE TABLE {table}_upgraded ", definition.strip())
    )
    names = ", ".join(values)
    db.execute(f"INSERT INTO {table}_upgraded ({names}) SELECT {', '.join(values.values())} FROM {table}")
    db.execute(f"DROP TABLE {table}")
    db.execute(f"ALTER TABLE {table}_upgraded RENAME TO {table}")


def _micros_of(column: str) -> str:
    return f"CAST(round({column} * 1000000) AS INTEGER)"


def _times_in_microseconds(db: sqlite3.Connection) -> None:
    """Version 1: the first schema kept times as REAL seconds; every time is whole microseconds since."""
    times = {
        "requests": ("created_at", "last_poll_at", "decided_at"),
        "users": ("not_after", "created_at"),
        "audit": ("at",),
    }
    for table, columns in times.items():
        declared = _columns(db, table)
        if not any(declared.get(column) == "REAL" for column in columns):
            continue
        definition = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        definition = re.sub(r"\bREAL\b", "INTEGER", re.sub(r"\s+", " ", definition))
        values = {name: _micros_of(name) if name in columns else name for name in declared}
        _rebuild(db, table, definition, values)
    row = db.execute("SELECT value FROM meta WHERE key = 'unlocked_until'").fetchone() if _columns(db, "meta") else None
    if row is not None and row[0] is not None and "." in row[0]:
        db.execute("UPDATE meta SET value = ? WHERE key = 'unlocked_until'", (str(round(float(row[0]) * SECOND)),))


def _add_column(table: str, column: str, declaration: str) -> Callable[[sqlite3.Connection], None]:
    """A step that adds a column the schema gained, unless it is there."""

    def add(db: sqlite3.Connection) -> None:
        if column not in _columns(db, table):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    add.__doc__ = f"Add {table}.{column}."
    return add


def _record_issued_certificates(db: sqlite3.Connection) -> None:
    """Version 4: users' certificates were kept beside the users only; each is recorded as issued.

    Their notBefore was not kept: it was the approval's moment less the
    CA's clock skew then, five minutes.
    """
    db.execute(CERTIFICATES_TABLE)
    if "certificate_sha256" not in _columns(db, "users"):
        return
    db.execute(
        "INSERT INTO certificates (serial, username, sha256, key_sha256, certificate, not_before, not_after)"
        " SELECT users.serial, users.username, users.certificate_sha256, requests.key_sha256,"
        " users.certificate, users.created_at - ?, users.not_after"
        " FROM users JOIN requests ON requests.username = users.username"
        " WHERE users.serial IS NOT NULL"
        " AND users.serial NOT IN (SELECT serial FROM certificates)",
        (SKEW_OF_OLD_CERTIFICATES,),
    )


def _drop_unread_user_columns(db: sqlite3.Connection) -> None:
    """Version 5: a user's certificate is the row of ``certificates`` its serial names; the copies go."""
    declared = _columns(db, "users")
    if "certificate" not in declared and "certificate_sha256" not in declared:
        return
    kept = {name: name for name in declared if name not in ("certificate", "certificate_sha256")}
    _rebuild(db, "users", USERS_TABLE, kept)


# STORE-6.11-SCHEMA: the steps from each version to the next, in order; the
# schema's version is the number of steps taken. A step may only be added.
UPGRADES: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _times_in_microseconds,
    _add_column("requests", "collected_at", "INTEGER"),
    _add_column("requests", "public_key", "BLOB"),
    _record_issued_certificates,
    _drop_unread_user_columns,
    _add_column("requests", "decided_by", "TEXT"),
    _add_column("requests", "via", "TEXT"),  # EST-10.4-VIA: how a request came; NULL in older rows reads "api"
)
SCHEMA_VERSION = len(UPGRADES)


def _user_json(user: Mapping[str, Any], now: int) -> dict[str, Any]:
    """A user as the administrator sees it (ADMIN-4.6-LISTS), with its certificate's validity (LIFE-7.1-TIMES)."""
    body = {
        "username": user["username"],
        "method": user["method"],
        **json.loads(user["granted"]),  # canonical: as Rights.to_json has it
        "createdAt": _iso(user["created_at"]),
        "certificateSerial": user["serial"],
        "certificateNotAfter": None,
        "certificateRenewAfter": None,
        "certificateStatus": None,
        "certificateSha256": user["certificate_sha256"],  # SPEC ADMIN-4.10-PAGE-FIELDS
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
        "decidedBy": row["decided_by"],  # the administrator who approved or denied it
        "reason": row["reason"],
        # What was granted, and when the client first fetched it (approved requests).
        "granted": json.loads(row["granted"]) if row["granted"] else None,
        "collectedAt": _iso(row["collected_at"]) if row["collected_at"] else None,
        "via": row["via"] or "api",
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


# --- The counted polls (ADMIN-4.7-POLL-STATS) ---------------------------------


class PollCounter:
    """Polls counted in memory until they are written: at once (``period`` 0), or with the next transaction
    once ``period`` has passed; counts that cannot be written wait for the next write (STORE-6.2-FULL-DISK)."""

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


# --- The sign-in throttle (AUTH-5.2) ------------------------------------------


class SignInThrottle:
    """Failed sign-ins of a username, per client address and from all addresses together (AUTH-5.2-THROTTLE).

    A failure is a password that does not match the one stored for the
    username (by ``whoami`` or by a registration), or any password for a
    username without one (so that the throttle tells no username apart). An address the username
    signed in from lately is *known* and spared the all-addresses limit,
    so that a stranger's guesses cannot lock the device out
    (AUTH-5.2-KNOWN-ADDRESS, the address form of a device cookie).

    Every window is a deque of failure times in an ``OrderedDict`` kept in
    the order of its last change: stale windows are dropped from the front
    and, beyond ``capacity``, the oldest are forgotten, so an attempt costs
    O(1) (amortised) however many windows there are (AUTH-5.2-BOUNDED).
    Not thread-safe on its own: ``Registry`` calls it under its lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.window = settings.auth_failure_window // MICROSECOND
        self.known_for = settings.known_address_period // MICROSECOND
        self.capacity = settings.max_throttle_entries
        self.per_address = settings.max_auth_failures
        self.per_username = settings.max_auth_failures_per_username
        self._failures: collections.OrderedDict[object, collections.deque[int]] = collections.OrderedDict()
        self._known: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def __len__(self) -> int:
        """How many failure windows are kept."""
        return len(self._failures)

    def wait(self, username: str, address: str, now: int) -> int | None:
        """Whole seconds until ``username`` may try again from ``address``; None when it may now."""
        self._forget_stale(now)
        limits = [((username, address), self.per_address)]
        if not self.is_known(username, address, now):
            limits.append((username, self.per_username))
        waits = []
        for key, most in limits:
            failures = self._failures.get(key)
            # A limit holds while the ``most``-th last failure is within the
            # window (older ones are dropped at the next failure).
            if failures is not None and len(failures) >= most and failures[-most] > now - self.window:
                waits.append(_seconds_until(failures[-most] + self.window, now))
        return max(waits, default=None)  # when every limit lets the attempt through

    def fail(self, username: str, address: str, now: int) -> None:
        """Count a failed sign-in (or one whose check is under way: ``forgive`` takes it back)."""
        for key in ((username, address), username):
            failures = self._failures.setdefault(key, collections.deque())
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            failures.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)

    def forgive(self, username: str, address: str, at: int) -> None:
        """Take back a failure counted at ``at`` for a check that then succeeded."""
        for key in ((username, address), username):
            with contextlib.suppress(KeyError, ValueError):
                self._failures[key].remove(at)

    def signed_in(self, username: str, address: str, now: int) -> None:
        """``username`` proved who it is from ``address``: the address is known from now on."""
        key = (username, address)
        self._known[key] = now
        self._known.move_to_end(key)
        while self._known and (
            len(self._known) > self.capacity or next(iter(self._known.values())) <= now - self.known_for
        ):
            self._known.popitem(last=False)

    def is_known(self, username: str, address: str, now: int) -> bool:
        """Whether ``username`` signed in from ``address`` within the known-address period."""
        since = self._known.get((username, address))
        return since is not None and since > now - self.known_for

    def _forget_stale(self, now: int) -> None:
        # The front window changed least recently: once its last failure is
        # out of the window, the whole window is.
        while self._failures:
            failures = next(iter(self._failures.values()))
            if failures and failures[-1] > now - self.window:
                break
            self._failures.popitem(last=False)


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
        provisioner: Provisioner | None = None,
    ) -> None:
        self.clock = clock
        self.provisioner = provisioner
        self.roles = dict(roles) if isinstance(roles, Mapping) else dict.fromkeys(roles, "")
        self.ca = ca
        self.settings = settings
        self._lock = threading.RLock()
        self._store = Store(database)
        self._polls = PollCounter(0, self._now())  # each poll written at once; a subclass may batch them
        self._new_requests: dict[str, collections.deque[int]] = {}
        self._throttle = SignInThrottle(settings)
        # Slow work runs outside the lock, at most one key derivation a core
        # at a time: the rest wait here, not on the registry's lock.
        self._derivations = threading.BoundedSemaphore(os.cpu_count() or 1)
        # One CRL signer at a time, outside the registry's lock.
        self._crl_lock = threading.Lock()
        self._storage_logged_at = -MINUTE
        self._store.keep_verified_keys(self._inspect_text if ca else None)
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

    def register_via(self, via: str, payload: object, client_address: str = "") -> Outcome:
        """``register``, for a request that came another way than the JSON API (SPEC section 10: "est").

        The same rules in the same order; a request it stores is listed with ``via``.
        """
        return self._register(payload, client_address, via)[1]

    def register_body(self, body: bytes, client_address: str = "") -> Outcome:
        """Answer a client's request as it came over the wire: the body's bytes (400 when not JSON)."""
        return self.register(parse_json(body), client_address)

    def _register(self, payload: object, address: str, via: str = "api") -> tuple[Registration, Outcome]:
        registration = parse_registration(payload)
        if via != registration.via:
            registration = dataclasses.replace(registration, via=via)
        csr = self._inspect_csr(registration)
        problems = policy_problems(registration, self.roles, csr)
        if problems:
            raise _policy(problems)
        outcome = self._answer(registration, csr, address)
        if outcome.status is HTTPStatus.CREATED:
            self._provision(registration, outcome)  # BROKER-11.2-PASSWORD-201: may raise 503 instead
            self._collected(registration.username)
        return registration, outcome

    def _answer(self, registration: Registration, csr: CsrInfo | None, address: str) -> Outcome:
        """SPEC section 2.4 for a well-formed request within policy: ``decide``, then do what it says.

        A password is verified against the stored one, or a new one hashed,
        outside the lock and only after the throttle let it through
        (REG-2.4-THROTTLE); the request is then decided again on what is
        stored, since another thread may have changed it meanwhile.
        """
        name, password = registration.username, registration.password
        now = self._now()
        with self._lock:
            stored_hash = self._password_to_verify(registration, now)
            throttled = stored_hash is not None and self._throttle.wait(name, address, now) is not None
            if stored_hash is None or throttled:
                decision, row = self._decide(registration, csr, address, now)
                if decision is not Decision.STORE or password is None:
                    return self._act(decision, registration, csr, row, address, now, None)
            else:
                # AUTH-5.2-THROTTLE: counted as failed before the check, taken back when it matches.
                self._throttle.fail(name, address, now)
        assert password is not None
        new_hash = self._hash(password) if stored_hash is None else None
        matches = stored_hash is not None and self._verify(password, stored_hash)
        with self._lock:
            if matches:
                self._throttle.forgive(name, address, now)
            if self._password_to_verify(registration, now) == stored_hash:
                decision, row = self._decide(registration, csr, address, now, password_matches=matches)
                return self._act(decision, registration, csr, row, address, now, new_hash)
        # The stored request changed while the password was checked: decide again.
        return self._answer(registration, csr, address)

    def _password_to_verify(self, registration: Registration, now: int) -> str | None:
        """The stored password hash a password request must be verified against: its username's, if any."""
        row = self._live_request(registration.username, now)
        if registration.password is None or row is None or row["method"] != "password":
            return None
        return row["password_hash"]

    def _decide(
        self,
        registration: Registration,
        csr: CsrInfo | None,
        address: str,
        now: int,
        *,
        password_matches: bool | None = None,
    ) -> tuple[Decision, sqlite3.Row | None]:
        """``decide`` on what is stored now; ``password_matches``: what the check outside the lock found, if made."""
        row = self._live_request(registration.username, now)
        if row is not None:
            throttled = (
                password_matches is None
                and registration.password is not None
                and row["method"] == "password"
                and self._throttle.wait(registration.username, address, now) is not None
            )
            matches = self._matches(registration, csr, row, bool(password_matches))
            return decide(State(row["state"]), matches, throttled=throttled), row
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
            self._throttle.signed_in(name, address, now)
            return self._approved_outcome(name)
        if decision in (Decision.POLL, Decision.DENIED):
            # ADMIN-4.7-POLL-STATS: a denied request's poll counts too, so that
            # the administrator sees its client was told (the 403 below).
            self._count_poll(name, address, now)
        if decision is Decision.POLL:
            assert row is not None
            return pending_outcome(name, row["pairing_id"], self.settings.retry_after_pending)
        if decision is Decision.STORE:
            if self.settings.rate_limit:
                self._rate_window(address, now).append(now)
            return self._store_new(registration, csr, password_hash, address, now)
        retry_after = self.settings.retry_after_locked
        if decision is Decision.LIMITED:
            retry_after = _seconds_until(self._rate_window(address, now)[0] + MINUTE, now)
        if decision is Decision.THROTTLED:
            retry_after = self._throttle.wait(name, address, now) or 1
        reason = (row["reason"] or "") if row is not None else ""
        raise refusal(decision, name, reason=reason, retry_after=retry_after, limit=self.settings.rate_limit)

    def _inspect_csr(self, registration: Registration) -> CsrInfo | None:
        if registration.csr is None:
            return None
        if self.ca is None:
            raise PolicyViolation("this registry issues no certificates: register with a password")
        return self._read_csr(registration.csr, registration.username)

    def _read_csr(self, text: str, username: str) -> CsrInfo:
        """The CSR ``text``, read and verified by the CA, naming ``username``; ``MalformedRequest`` otherwise."""
        assert self.ca is not None
        try:
            info = self._inspect_text(text)
        except ValueError as error:
            raise MalformedRequest(f"'csr' {error}") from None
        if not info.common_name:
            raise MalformedRequest("the CSR's subject has no Common Name: it must be the username")
        if info.common_name != username:
            raise MalformedRequest(f"the CSR's Common Name {info.common_name!r} is not the username {username!r}")
        return info

    def _inspect_text(self, text: str) -> CsrInfo:
        """REQ-1-CSR-PEM, then the CA's reading and verifying (REG-2.2-CSR); ``ValueError`` saying what is wrong."""
        assert self.ca is not None
        if ONE_CSR_BLOCK.fullmatch(text) is None:
            raise ValueError(ONE_CSR_BLOCK_HELP)
        return self.ca.inspect_csr(text)

    def _matches(
        self, registration: Registration, csr: CsrInfo | None, row: sqlite3.Row, password_matches: bool
    ) -> bool:
        """REG-2.4-MATCH: the same method, rights and credential (a password verified outside the lock)."""
        if registration.method != row["method"] or registration.rights.dumps() != row["requested"]:
            return False
        if csr is not None:
            return hmac.compare_digest(csr.public_key_sha256, row["key_sha256"])
        return password_matches

    def _rate_window(self, address: str, now: int) -> collections.deque[int]:
        return _window(self._new_requests, address, now - MINUTE)

    def _hash(self, password: str) -> str:
        """A new password's hash (SAFE-6.3-PASSWORDS); call outside the lock (SAFE-6.6-SLOW-WORK)."""
        with self._derivations:
            return hash_password(password, self.settings.scrypt_n)

    def _verify(self, password: str, stored: str) -> bool:
        """Whether ``password`` is the one behind ``stored``; call outside the lock, after the throttle."""
        with self._derivations:
            return check_password(password, stored)

    def _store_new(
        self, registration: Registration, csr: CsrInfo | None, password_hash: str | None, address: str, now: int
    ) -> Outcome:
        """REG-2.4-STORE: a new pending request (TRANSITIONS' request), audited; its 202."""
        name = registration.username
        credential = csr.public_key_sha256 if csr else hashlib.sha256((password_hash or "").encode()).hexdigest()
        pairing = pairing_id(credential)
        state = transition(GONE, Event.REQUEST)
        with self._writing():
            self._store.add_request(
                username=name,
                state=state.value,
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
                via=registration.via,
            )
            self._audit(now, name, address, "request", name, registration.rights.to_json() | {"pairingId": pairing})
        return pending_outcome(name, pairing, self.settings.retry_after_pending)

    def _approved_outcome(self, name: str) -> Outcome:
        """REG-2.4-REDELIVER, REG-2.5-APPROVED-BODY: the 201, with what was granted and the current certificate."""
        user = self._store.user(name)
        body = {"status": "approved", "username": name, **Rights.loads(user["granted"]).to_json()}
        if user["serial"]:
            body |= self._certificate_json(self._store.certificate_by_serial(user["serial"]))
        return Outcome(HTTPStatus.CREATED, body)

    def _certificate_json(self, certificate: Mapping[str, Any]) -> dict[str, Any]:
        """LIFE-7.1-TIMES: a certificate in an answer comes with its CA, its notAfter and its renewAfter."""
        body = {"certificate": certificate["certificate"]}
        if self.ca is not None:
            body["caCertificate"] = self.ca.certificate_pem
        return body | {
            "notAfter": _iso(certificate["not_after"]),
            "renewAfter": _iso(renew_after(certificate["not_before"], certificate["not_after"])),
        }

    # --- The broker's part (SPEC section 11) ------------------------------

    def _provision(self, registration: Registration, outcome: Outcome) -> None:
        """BROKER-11.2-PASSWORD-201: a password user's 201 goes out only once the provisioner holds its password.

        Called outside the lock with every 201 that ``register`` answers; a
        provisioner that cannot be reached turns it into 503 ``broker_unavailable``.
        """
        if self.provisioner is None or registration.password is None or outcome.status is not HTTPStatus.CREATED:
            return
        with self._lock:
            user = self._store.user(registration.username)
        if user is None:  # removed since it was answered: there is nothing to provision
            return
        credential = password_credential(user["password_hash"])
        rights = Rights.loads(user["granted"])
        try:
            self.provisioner.provision_password(registration.username, registration.password, rights, credential)
        except BrokerUnavailable as error:
            error.headers.setdefault("Retry-After", str(self.settings.retry_after_pending))
            raise

    def accounts(self) -> list[Account]:
        """Every user as a broker needs to know it, by name: what a reconciler makes the broker equal to."""
        with self._lock:
            rows = self._store.accounts()
        return [
            Account(
                row["username"],
                row["method"],
                Rights.loads(row["granted"]),
                password_credential(row["password_hash"]) if row["password_hash"] else None,
            )
            for row in rows
        ]

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
        """Open the registry from now for the body's ``duration`` (ms) or the default (LOCK-3.2)."""
        duration = parse_duration(body, self.settings.unlock_duration, self.settings.max_unlock_duration)
        now = self._now()
        with self._lock, self._writing():
            self._store.set_lock_window(LockWindow(now + duration // MICROSECOND))
            self._audit(now, actor, address, "unlock", None, {"durationMs": duration // MILLISECOND})
        return self.status()

    def lock(self, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Close the registry at once (LOCK-3.3)."""
        now = self._now()
        with self._lock, self._writing():
            self._store.set_lock_window(LockWindow(None))
            self._audit(now, actor, address, "lock", None, None)
        return self.status()

    # --- The administrator (SPEC section 4) -------------------------------

    def requests(self) -> list[dict[str, Any]]:
        """Every stored request, oldest first; a CSR's with what its key is (SPEC ADMIN-4.10-PAGE-FIELDS)."""
        now = self._now()
        with self._lock:
            # STORE-6.2-FULL-DISK: the purge is housekeeping; on a full disk
            # it waits, and the administrator can still read.
            with contextlib.suppress(StorageUnavailable), self._writing():
                self._store.purge(self._cutoff(now))
            rows = self._store.requests()
        cutoff = self._cutoff(now)  # what a skipped purge left is not shown
        return [
            _request_json(row) | {"publicKey": self._key_json(row)}
            for row in rows
            if not expired(State(row["state"]), row, cutoff)
        ]

    def _key_json(self, row: sqlite3.Row) -> dict[str, str] | None:
        """ADMIN-4.10-PAGE-FIELDS: the verified key a CSR request holds, as the administrator compares it with the
        device's label."""
        if row["public_key"] is None or self.ca is None:
            return None
        return {"type": describe_key(self.ca.inspect_public_key(row["public_key"])), "sha256": row["key_sha256"]}

    def approve(self, username: str, body: object = None, *, actor: str = ADMIN, address: str = "") -> dict[str, Any]:
        """Approve a pending request, granting the body's rights or the requested ones; sign its CSR's key.

        ADMIN-4.5-APPROVE-ATOMIC: one transaction, its own answer; the signature is made outside the lock.
        """
        granted = parse_grant(body, self.roles)
        moment = self.clock()
        now = _micros(moment)
        with self._lock:
            row, state = self._decidable(username, Event.APPROVE, now)
            if row["method"] == "csr" and self.ca is None:
                raise PolicyViolation("this registry has no CA to sign the request's CSR")
        # The certificate is signed outside the lock, and kept only if the
        # request is still the pending one it was signed for.
        certificate = None
        if row["method"] == "csr":
            certificate = self._issue(username, row["public_key"], row["key_sha256"], moment)
        with self._lock:
            again, state = self._decidable(username, Event.APPROVE, now)
            if any(again[column] != row[column] for column in ("created_at", "key_sha256", "password_hash")):
                return self.approve(username, body, actor=actor, address=address)  # another request took its place
            rights = row["requested"]  # a canonical text already
            if granted:
                rights = dataclasses.replace(Rights.loads(rights), **granted).dumps()
            user = {
                "username": username,
                "method": row["method"],
                "password_hash": row["password_hash"],
                "granted": rights,
                "serial": certificate and certificate["serial"],
                "not_after": certificate and certificate["not_after"],
                "created_at": now,
            }
            details = {"requested": json.loads(row["requested"]), "granted": json.loads(rights)}
            if certificate:
                details["serial"] = certificate["serial"]
            with self._writing():
                self._store.set_state(username, state, now, decided_by=actor)  # ADMIN-4.9-ATTRIBUTED
                self._store.add_user(**user)
                if certificate:
                    self._store.add_certificate(**certificate)
                self._audit(now, actor, address, "approve", username, details)
        facts = {"not_before": certificate and certificate["not_before"], "certificate_sha256": None}
        if certificate:
            facts["certificate_sha256"] = certificate["sha256"]
        return _user_json(user | facts, now)

    def _issue(
        self, username: str, public_key: bytes, key_sha256: str, moment: datetime, renewed_from: str | None = None
    ) -> dict[str, Any]:
        """A certificate for ``username`` and a verified key, as a row of issued certificates; outside the lock."""
        assert self.ca is not None
        if moment >= self.ca.not_after:
            raise CaExpired(
                f"the registry's CA expired at {self.ca.not_after.isoformat()}: it issues no certificate"
                " until the operator gives the registry a new CA"
            )
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
                self._store.set_state(username, state, now, reason, decided_by=actor)
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
        """Remove a user and its request, and revoke its unexpired certificates (LIFE-7.3-REVOKE): the name is free."""
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
            self._sign_crl()  # LIFE-7.5-CRL-FRESH

    # --- The certificate's life (SPEC section 7) --------------------------

    def renew(self, certificate_der: bytes | None, body: object, *, address: str = "") -> Outcome:
        """A new certificate for the user whose current certificate is ``certificate_der`` (LIFE-7.2-RENEW).

        The same key renews, a new one re-keys; the rights stay. Only
        ``CERTIFICATE_LIFE`` decides: the current certificate renews, the one
        it replaced may only fetch it again, anything else is 401. The new
        certificate is signed outside the lock, and kept only if the user's
        current certificate is still the one the renewal was decided on.
        """
        now = self._now()
        with self._lock:
            presented, _ = self._presented(certificate_der, now)
        username = presented["username"]
        csr = self._read_csr(parse_renewal(body), username)
        if not key_accepted(csr):
            raise _policy([key_problem(csr)])
        moment = self.clock()
        now = _micros(moment)
        with self._lock:
            presented, current = self._presented(certificate_der, now)
            event = renewal_event(
                csr.public_key_sha256,
                presented["key_sha256"],
                current["key_sha256"],
                replaced_by_current=current["renewed_from"] == presented["sha256"],
            )
            answer = renewal(self._standing(presented, current, now), event)
            self._throttle.signed_in(username, address, now)
            rights = Rights.loads(self._store.user(username)["granted"]).to_json()
        if answer is Renewal.ISSUE:
            issued = self._issue(username, csr.public_key, csr.public_key_sha256, moment, presented["sha256"])
            with self._lock:
                latest = self._current_certificate(username)
                if latest is None or latest["serial"] != current["serial"]:
                    # Another renewal or a removal came first: decide again on what is stored now.
                    return self.renew(certificate_der, body, address=address)
                details = {"serial": issued["serial"], "from": presented["serial"], "newKey": event is LifeEvent.REKEY}
                with self._writing():
                    self._store.add_certificate(**issued)
                    self._store.set_current_certificate(username, issued)
                    self._audit(now, username, address, "renew", username, details)
            current = issued
        body = {"status": "renewed", "username": username, **rights, **self._certificate_json(current)}
        return Outcome(HTTPStatus.CREATED, body)

    def _presented(self, certificate_der: bytes | None, now: int) -> tuple[sqlite3.Row, sqlite3.Row]:
        """The presented certificate, if a renewal may start from it, and its user's current one; else 401."""
        presented = self._valid_certificate(certificate_der, now)
        current = self._current_certificate(presented["username"])
        standing = self._standing(presented, current, now)
        if standing not in RENEWING:
            renewal(standing, LifeEvent.RENEW)  # raises the 401 that says why
        return presented, current

    def _current_certificate(self, username: str) -> sqlite3.Row | None:
        user = self._store.user(username)
        return user and self._store.certificate_by_serial(user["serial"])

    @staticmethod
    def _standing(certificate: sqlite3.Row, current: sqlite3.Row | None, now: int) -> Standing:
        return standing(
            revoked=certificate["revoked_at"] is not None,
            expired=certificate["not_after"] <= now,
            current=current is not None and current["serial"] == certificate["serial"],
        )

    def crl(self) -> bytes:
        """The current CRL, DER (LIFE-7.4-CRL); ``NotFound`` for a registry without a CA."""
        with self._lock:
            crl = self._store.crl()
        if crl is None:
            raise NotFound("this registry has no CA, and so no CRL")
        return crl["der"]

    def refresh_crl(self) -> None:
        """Sign a new CRL when the current one has less than half of its validity left, or misses a revocation.

        A timer calls this, and so does the start: a revocation whose CRL was
        not signed (the process was killed in between) is signed then.
        """
        if self.ca is not None:
            self._sign_crl(only_when_due=True)

    def _sign_crl(self, *, only_when_due: bool = False) -> None:
        """A new CRL of the revoked certificates that have not expired, signed outside the registry's lock.

        Signers take turns, so numbers grow; a revocation committed after this
        one read the list signs a CRL of its own after it.
        """
        assert self.ca is not None
        with self._crl_lock:
            now = self._now()
            with self._lock:
                crl = self._store.crl()
                missed = crl is not None and self._store.revoked_after(crl["this_update"])
                if (
                    only_when_due
                    and not missed
                    and not crl_due(crl and crl["next_update"], self.settings.crl_validity, now)
                ):
                    return
                revoked = [
                    (int(row["serial"], 16), _datetime(row["revoked_at"]), row["reason"])
                    for row in self._store.revoked(now)
                ]
            number = crl["number"] + 1 if crl else 1
            next_update = now + self.settings.crl_validity // MICROSECOND
            der = self.ca.sign_crl(revoked, number, _datetime(now), _datetime(next_update))
            with self._lock, self._writing():
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

        The throttle comes first (AUTH-5.2-THROTTLE): over its limit no
        password is checked. The check itself runs outside the lock.
        """
        now = self._now()
        with self._lock:
            wait = self._throttle.wait(username, client_address, now)
            if wait is not None:
                raise TooManyRequests(
                    "too many failed sign-ins for this username: wait, then try again",
                    headers={"Retry-After": str(wait)},
                )
            user = self._store.user(username)
            self._throttle.fail(username, client_address, now)  # taken back when it matches
            if user is None or not user["password_hash"]:
                raise Unauthorized("unknown username or wrong password", headers=dict(CHALLENGE))
        stored = user["password_hash"]
        matches = self._verify(password, stored)
        with self._lock:
            user = self._store.user(username)  # it may be gone meanwhile
            if not matches or user is None or user["password_hash"] != stored:
                raise Unauthorized("unknown username or wrong password", headers=dict(CHALLENGE))
            self._throttle.forgive(username, client_address, now)
            self._throttle.signed_in(username, client_address, now)
        return Identity(username, Rights.loads(user["granted"]), "password")

    def authenticate_certificate(self, certificate_der: bytes) -> Identity:
        """The user a certificate was issued to, while it is valid; ``Unauthorized`` otherwise (AUTH-5.2-WHOAMI)."""
        now = self._now()
        with self._lock:
            certificate = self._valid_certificate(certificate_der, now)
            user = self._store.user(certificate["username"])
        return Identity(user["username"], Rights.loads(user["granted"]), "certificate")

    def _valid_certificate(self, certificate_der: bytes | None, now: int) -> sqlite3.Row:
        """The issued certificate ``certificate_der``: a user's, unrevoked, unexpired; else 401 (LIFE-7.3-REVOKE)."""
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
        if row is None or expired(State(row["state"]), row, self._cutoff(now)):
            return None
        return row

    def _pending_count(self, now: int) -> int:
        return self._store.pending_count(self._cutoff(now))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write transaction that writes the counted polls first (STORE-6.2-FULL-DISK: 503 when it cannot)."""
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

    def _collected(self, username: str) -> None:
        """Note when the client of an approved request first fetched its 201.

        Once, and only to inform the administrator: the answer goes out even
        when it cannot be written.
        """
        now = self._now()
        with self._lock:
            row = self._store.request(username)
            if row is None or row["collected_at"] is not None:
                return
            with contextlib.suppress(StorageUnavailable), self._writing():
                self._store.mark_collected(username, now)

    def _count_poll(self, username: str, address: str, now: int) -> None:
        if self._polls.count(username, address, now):
            # A poll answers 202 though its count cannot be written now:
            # the count waits in memory for the next write.
            with contextlib.suppress(StorageUnavailable):
                self._write_polls()

    def _write_polls(self) -> None:
        with self._writing():
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

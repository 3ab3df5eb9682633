"""The conformance kit: checks a running registry against SPEC.md, over HTTP only.

Usage::

    python3 conformance.py https://host:8443 --admin-token T [--ca-file F | --insecure]
                           [--require-full] [--only ID ...] [--junit FILE] [--json FILE]

Theory of operation
===================

The kit is a black box's client: it speaks HTTP (and TLS) to the registry and
reads nothing else, so it can be copied alone next to another
implementation, as ``client.py`` can. It needs the standard library and
``cryptography`` (to make CSRs and to check certificates and CRLs).

Each *check* is a short scenario, a function below decorated with
``@check``, that names the requirement ids of SPEC.md it covers. Within it,
every expectation names the one requirement it tests, so a failure says
which rule was broken. A check ends as:

- PASS: every expectation held;
- FAIL: an expectation of a MUST did not hold (the check stops there);
- WARN: an expectation of a SHOULD did not hold;
- SKIP: the check cannot run here, and says why: no admin token, no CA, or
  no mutual TLS over an ``http://`` URL.

A failure prints the request that was sent, the answer that came back, what
the requirement expected and a ``curl`` line that sends the same request
again (the administrator token as ``$TOKEN``, as the README sets it, so
that reports can be shared; a client certificate as files named after its user, which the kit
made and removed). The steps before it, which made the state it met, are
the check's own: ``--only NAME`` runs them again. The exit status is 0 when
no MUST failed, 1 otherwise, 2 for a wrong command line or a registry the
kit cannot check as given: before any check, it makes sure the registry
answers, at the scheme given, and takes the token, and else says what is
wrong in one line. A run without the token (or against a registry without
a CA, or over http://) skips what needs it: the summary says it was a
partial run, and ``--require-full`` makes such a run fail (exit 1).
``--json`` and ``--junit`` write the results for a machine too.

Safe against a live registry
----------------------------
- Every username the kit sends carries a prefix unique to the run
  (``kit`` and six random hex digits), but the few too short to hold one,
  which a conforming registry refuses anyway.
- At the end it removes what it created: the users and requests of its
  prefix, and any other name a registry stored for it.
- It reads the lock first and puts it back as it found it: locked, or open
  until the same moment. Meanwhile it opens the registry for a minute at a
  time; anyone may register while it is open, as when an administrator
  opens it.
- It never restarts the server: what must survive a restart or a kill
  (SPEC section 6) stays with the implementation's own tests.

What is not checked, and why, is the last column of SPEC.md's table, which
``--table`` prints from ``REQUIREMENTS`` and ``NOT_CHECKED`` below.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import enum
import hashlib
import http.client
import itertools
import json
import secrets
import shlex
import ssl
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

API = "/api/client-registry"
REGISTER = f"{API}/register"
RENEW = f"{API}/renew"
WHOAMI = "/api/auth/whoami"
USERS = "/api/users"
TIMEOUT = 10.0  # seconds one call may take
OPEN_MS = 60_000  # how long the kit opens the registry at a time
DEFAULT_MAX_BODY = 64 * 1024  # SPEC section 2.1's default limit
SKEW = timedelta(seconds=5)  # clock tolerance between the kit and the registry (Date has whole seconds)

# Every requirement of SPEC.md: (strength, section, what it asks, in short).
REQUIREMENTS: dict[str, tuple[str, str, str]] = {
    "REQ-1-SHAPE": ("MUST", "1", "the body follows the field table: no other field, a username, one credential"),
    "REQ-1-PERMISSION": ("MUST", "1", "a permission has three valid fields; an mqtt resource is a topic filter"),
    "REQ-1-CONTEXT": ("MUST", "1", "a context over 1024 characters is malformed (400)"),
    "REQ-1-CSR-PEM": ("MUST", "1", "a csr is one PEM block and nothing else"),
    "REQ-1-CONTENT-TYPE": ("SHOULD", "1", "the body is read as JSON whatever its Content-Type says"),
    "REQ-1-UTF8": ("MUST", "1", "a body is UTF-8 JSON; UTF-16 and UTF-32 are malformed"),
    "REG-2-ORDER": ("MUST", "2", "the first rule that applies decides: 413, 400, 422, then the state"),
    "REG-2.1-SIZE": ("MUST", "2", "a body over the limit (64 KiB) is 413, and nothing else happens"),
    "REG-2.2-MALFORMED": ("MUST", "2", "not JSON, not an object, a wrong type, an unknown field: 400"),
    "REG-2.2-CSR": ("MUST", "2", "a CSR that does not parse or whose signature does not verify: 400"),
    "REG-2.2-CN": ("MUST", "2", "a CSR whose Common Name is missing, empty or not the username: 400"),
    "REG-2.3-USERNAME": ("MUST", "2", "a username is 3 to 64 of [A-Za-z0-9._-], starting alphanumeric; else 422"),
    "REG-2.3-PASSWORD": ("MUST", "2", "a password has 5 to 1024 characters; else 422"),
    "REG-2.3-ROLE": ("MUST", "2", "every requested role is in the catalog; else 422"),
    "REG-2.3-KEY": ("MUST", "2", "a CSR key is RSA >= 2048, EC P-256 or P-384, or Ed25519; else 422"),
    "REG-2.3-NO-CA": ("MUST", "2", "a registry without a CA answers a CSR with 422, before parsing it"),
    "REG-2.4-MATCH": ("MUST", "2", "a request matches on username, credential and rights as sets; not context"),
    "REG-2.4-USER": ("MUST", "2", "for an existing user: 201 again when it matches, else 409 username_taken"),
    "REG-2.4-REDELIVER": ("MUST", "2", "that 201 carries the certificate issued at approval"),
    "REG-2.4-PENDING": ("MUST", "2", "for a pending request: 202 when it matches, else 409 duplicate_request"),
    "REG-2.4-THROTTLE": ("MUST", "2", "a wrong password for a stored one is a failed sign-in; over the limit: 429"),
    "REG-2.4-DENIED": ("MUST", "2", "for a denied request: 403 denied with the reason when it matches, else 409"),
    "REG-2.4-LOCKED": ("MUST", "2", "a new request while locked is 423, and nothing is stored"),
    "REG-2.4-FULL": ("MUST", "2", "a new request while the pending requests are at their cap is 503"),
    "REG-2.4-RATE": ("MUST", "2", "a new request over a set per-address limit is 429"),
    "REG-2.4-STORE": ("MUST", "2", "otherwise a new pending request is stored: 202"),
    "REG-2.5-RETENTION": ("MUST", "2", "pending and denied requests are forgotten after the retention period"),
    "REG-2.5-LOCK-SCOPE": ("MUST", "2", "the lock keeps out only new requests: polls and decisions go on"),
    "REG-2.5-RETRY-AFTER": ("MUST", "2", "every 202 and 423 carries Retry-After (seconds)"),
    "REG-2.5-ERRORS": ("MUST", "2", 'every answer is JSON; an error is {"error", "message"} (+ "details")'),
    "REG-2.5-PENDING-BODY": ("MUST", "2", 'a 202 is {"status": "pending", "username", "pairingId": 6 hex}'),
    "REG-2.5-APPROVED-BODY": ("MUST", "2", 'a 201 is {"status": "approved", "username", granted rights, certs}'),
    "LOCK-3.1": ("MUST", "3", "the registry starts locked and keeps its lock across a restart"),
    "LOCK-3.2": ("MUST", "3", "unlock opens it until now + duration; it locks again by itself"),
    "LOCK-3.3": ("MUST", "3", "lock closes it at once"),
    "LOCK-3.4": ("MUST", "3", "time comes from an injected clock"),
    "ADMIN-4.1-TOKEN": ("MUST", "4", "every administrator call needs the Bearer token; else 401, nothing happens"),
    "ADMIN-4.2-CALLS": ("MUST", "4", "the administrator's calls do what SPEC section 4's table says"),
    "ADMIN-4.3-DECIDE": ("MUST", "4", "deciding a request that is not pending is 409 not_pending; unknown is 404"),
    "ADMIN-4.4-APPROVE-BODY": ("MUST", "4", "an approval body grants its roles and permissions; left out: as asked"),
    "ADMIN-4.5-APPROVE-ATOMIC": ("MUST", "4", "an approval is one transaction; a failure stores nothing"),
    "ADMIN-4.6-LISTS": ("MUST", "4", "requests (oldest first) and users (by name) are bare arrays, no secrets"),
    "ADMIN-4.7-POLL-STATS": ("SHOULD", "4", "poll statistics are written within a second"),
    "ADMIN-4.8-EXTRA": ("SHOULD", "4", "the registry serves roles, audit, its OpenAPI document and a web page"),
    "ADMIN-4.9-ATTRIBUTED": ("MUST", "4", "every administrator's call is attributed to the administrator by name"),
    "ADMIN-4.10-PAGE-FIELDS": (
        "SHOULD",
        "4",
        "time left, key descriptions, a listing without polls, where the token is",
    ),
    "CERT-5.1-CA-PUBLIC": ("MUST", "5", "GET /api/client-registry/ca returns the CA certificate, no authentication"),
    "AUTH-5.2-WHOAMI": ("MUST", "5", "whoami answers a registered client by Basic or by its certificate; else 401"),
    "AUTH-5.2-THROTTLE": ("MUST", "5", "after 5 failed sign-ins a minute for one username and address: 429"),
    "AUTH-5.2-KNOWN-ADDRESS": ("MUST", "5", "an address signed in from lately is spared the all-addresses limit"),
    "AUTH-5.2-BOUNDED": ("MUST", "5", "the throttle's memory is bounded and each attempt costs O(1)"),
    "CERT-5.3-SUBJECT": ("MUST", "5", "an issued certificate has subject CN = username and nothing else asked for"),
    "CERT-5.3-VERIFIED-KEY": ("MUST", "5", "the certificate is for the key of the verified CSR"),
    "CERT-5.3-BASIC-CONSTRAINTS": ("MUST", "5", "BasicConstraints CA false, critical"),
    "CERT-5.3-EKU": ("MUST", "5", "extended key usage clientAuth"),
    "CERT-5.3-SERIAL": ("MUST", "5", "a random serial"),
    "CERT-5.3-VALIDITY": ("MUST", "5", "a validity that is a setting, from five minutes before signing"),
    "CERT-5.4-CA": ("MUST", "5", "signed by the registry's own CA"),
    "STORE-6.1-SQLITE": ("MUST", "6", "state lives in one SQLite database"),
    "STORE-6.2-DURABLE": ("MUST", "6", "a restart or a kill loses nothing answered 201 or 202"),
    "STORE-6.2-FULL-DISK": ("MUST", "6", "a full disk is 503 storage_unavailable, and nothing is stored"),
    "SAFE-6.3-PASSWORDS": ("MUST", "6", "no password is stored, logged or answered in plain text"),
    "SAFE-6.4-FILES": ("MUST", "6", "the keys and the token are 0600 in a 0700 folder"),
    "TLS-6.5-HTTPS": ("MUST", "6", "the server speaks HTTPS by default"),
    "SAFE-6.6-SLOW-WORK": ("MUST", "6", "no key derivation or signature runs under the registry's lock"),
    "STORE-6.7-ONE-SERVER": ("MUST", "6", "one server at a time serves a data folder"),
    "STORE-6.8-CA-KEPT": ("MUST", "6", "a CA that issued certificates is never replaced in silence"),
    "STORE-6.9-BACKUP": ("MUST", "6", "a backup is renamed into place only when complete and checked"),
    "STORE-6.10-SETTINGS": ("MUST", "6", "every numeric setting has a range, checked at start"),
    "STORE-6.11-SCHEMA": ("MUST", "6", "the schema is numbered, and older databases upgraded in order"),
    "TLS-6.12-RENEW": ("MUST", "6", "the server's own certificate renews itself at two thirds of its life"),
    "LIFE-7.1-TIMES": ("MUST", "7", "an answer with a certificate carries notAfter and renewAfter (2/3 through)"),
    "LIFE-7.2-RENEW": ("MUST", "7", "renewal over mutual TLS: 201 renewed; 400, 401, 422 as for registration"),
    "LIFE-7.3-REVOKE": ("MUST", "7", "deleting a user revokes its certificates: they authenticate nothing"),
    "LIFE-7.4-CRL": ("MUST", "7", "a signed v2 CRL in DER and PEM, listing each revoked certificate"),
    "LIFE-7.5-CRL-FRESH": ("MUST", "7", "a new CRL on every revocation and before the current one expires"),
    "LIFE-7.6-CA-EXPIRY": ("MUST", "7", "no certificate outlives the CA; an expired CA issues nothing (503)"),
    "HTTP-8.1-STATUSES": ("MUST", "8", "404, 405, 501, 411, 414, 431, 505 and 500 as HTTP wants"),
    "HTTP-8.2-HEADERS": ("MUST", "8", "request lines and headers follow RFC 9112"),
    "HTTP-8.3-CONNECTION": ("SHOULD", "8", "an over-long body is drained; a closing connection lingers"),
    "HTTP-8.4-LIMITS": ("MUST", "8", "a request arrives within a timeout; at most 256 connections"),
    "HTTP-8.5-ACCESS-LOG": ("SHOULD", "8", "one access line per request, written in batches"),
    "HTTP-8.6-FORWARDED": ("SHOULD", "8", "behind an allowed proxy, the client's address is X-Forwarded-For's last"),
    "HTTP-8.7-SECURITY-HEADERS": ("SHOULD", "8", "nosniff on every answer, HSTS on every answer over HTTPS"),
    "CLIENT-9.1-RETRY-AFTER": ("MUST", "9", "a client sends again no sooner than the Retry-After it was given"),
    "CLIENT-9.2-SAME-REQUEST": ("MUST", "9", "a client polls with the very request it sent"),
    "CLIENT-9.3-DENIED": ("SHOULD", "9", "a denied client stops asking"),
    "CLIENT-9.4-LOST-ANSWER": ("MUST", "9", "a client sends again when an answer is lost, and takes a 201 twice"),
    "BROKER-11.1-MAPPING": ("MUST", "11", "each user is a broker client with its roles and a role of its grants"),
    "BROKER-11.2-PASSWORD-201": ("MUST", "11", "a password user's 201 only once the broker holds its password"),
    "BROKER-11.3-RECONCILE": ("MUST", "11", "the broker's marked clients are made equal to the users, and kept so"),
    "BROKER-11.4-STATUS": ("MUST", "11", "the status call reports the broker's state"),
}

# Why the kit leaves a requirement (or a part of one) to the implementation's own tests.
NOT_CHECKED: dict[str, str] = {
    "REG-2.4-FULL": "no: it would take 100,000 pending requests (the cap) on a live registry",
    "REG-2.4-RATE": "no: the limit is off by default, and its value is a setting the kit cannot see",
    "REG-2.5-RETENTION": "no: the period is 24 hours by default",
    "LOCK-3.1": "no: a restart; the implementation's own tests (test_server.py)",
    "LOCK-3.4": "no: a clock inside the implementation, not observable over HTTP",
    "ADMIN-4.5-APPROVE-ATOMIC": "no: needs a failing signature or store, which HTTP cannot cause",
    "ADMIN-4.9-ATTRIBUTED": "no: the administrators are named on the server's command line (test_admins.py)",
    "STORE-6.1-SQLITE": "no: inside the implementation (section 6)",
    "STORE-6.2-DURABLE": "no: needs a restart or a kill; the implementation's own tests",
    "STORE-6.2-FULL-DISK": "no: needs a full disk",
    "SAFE-6.4-FILES": "no: file modes on the server's disk",
    "TLS-6.5-HTTPS": "no: a default of the server's command line; the kit uses the URL it is given",
    "AUTH-5.2-KNOWN-ADDRESS": "no: needs sign-ins from many client addresses; test_trust.py",
    "AUTH-5.2-BOUNDED": "no: memory inside the implementation; test_trust.py",
    "SAFE-6.6-SLOW-WORK": "no: a lock inside the implementation; test_trust.py, and bench.py's admin-under-guesses",
    "LIFE-7.6-CA-EXPIRY": "no: needs a CA at its end; test_trust.py",
    "STORE-6.7-ONE-SERVER": "no: the server's start on its own disk (test_operations.py)",
    "STORE-6.8-CA-KEPT": "no: the server's start on its own disk (test_operations.py)",
    "STORE-6.9-BACKUP": "no: the server's own command line on its disk (test_operations.py)",
    "STORE-6.10-SETTINGS": "no: the server's own command line (test_operations.py)",
    "STORE-6.11-SCHEMA": "no: inside the implementation (test_schema.py)",
    "TLS-6.12-RENEW": "no: months of the server's life (test_operations.py, on a fake clock)",
    "HTTP-8.1-STATUSES": "no: HTTP framing (section 8), tested by test_http_parsing.py and test_hardening.py",
    "HTTP-8.2-HEADERS": "no: HTTP framing (section 8), tested by test_http_parsing.py",
    "HTTP-8.3-CONNECTION": "no: HTTP framing (section 8), tested by test_hardening.py",
    "HTTP-8.4-LIMITS": "no: slow and many connections (section 8), tested by test_hardening.py",
    "HTTP-8.5-ACCESS-LOG": "no: the server's log file",
    "HTTP-8.6-FORWARDED": "no: needs a proxy in front of the server (test_proxy.py, with nginx)",
    "HTTP-8.7-SECURITY-HEADERS": "no: headers for browsers (section 8), tested by test_server.py",
    "ADMIN-4.10-PAGE-FIELDS": "no: fields for the administrator's page; test_server.py and test_web.py",
    "CLIENT-9.1-RETRY-AFTER": "no: a client's duty, which `server.py --test-clients` checks",
    "CLIENT-9.2-SAME-REQUEST": "no: a client's duty, which `server.py --test-clients` checks",
    "CLIENT-9.3-DENIED": "no: a client's duty, which `server.py --test-clients` checks",
    "CLIENT-9.4-LOST-ANSWER": "no: a client's duty, which `server.py --test-clients` tests by losing answers",
    "BROKER-11.1-MAPPING": "no: needs a broker (section 11), tested by test_broker.py",
    "BROKER-11.2-PASSWORD-201": "no: needs a broker (section 11), tested by test_broker.py",
    "BROKER-11.3-RECONCILE": "no: needs a broker (section 11), tested by test_broker.py",
    "BROKER-11.4-STATUS": "no: needs a broker (section 11), tested by test_broker.py",
}
# Requirements the kit checks only in part: what it leaves out.
PARTLY: dict[str, str] = {
    "REG-2.1-SIZE": "at the default limit of 64 KiB (--max-body for another)",
    "LOCK-3.2": "with a short window (--unlock-ms); the default of five minutes is a setting",
    "CERT-5.4-CA": "the signature; not the key file's mode",
    "CERT-5.3-VALIDITY": "its start; its length is a setting",
    "AUTH-5.2-THROTTLE": "per username and address; not the 50 from all addresses",
    "SAFE-6.3-PASSWORDS": "in the answers of the lists and the audit; not the database or the log",
    "LIFE-7.5-CRL-FRESH": "on revocation; not half-way through the CRL's validity (days)",
}


class Result(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"  # a MUST broken
    WARN = "WARN"  # a SHOULD broken
    SKIP = "SKIP"


# --- One exchange -------------------------------------------------------------


@dataclass
class Exchange:
    """One request the kit sent and the answer it got (``status`` None: no answer, ``error`` says why)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    answer_headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    answer: bytes = b""
    error: str = ""
    client_certificate: str = ""  # the username whose certificate was presented (mutual TLS)
    tls: str = ""  # for https: the CA file to trust, or "insecure"
    token: str = ""  # the administrator's token, shown as $TOKEN (the README's name) so that reports can be shared

    def json(self) -> Any:
        """The answer as JSON; ``NOT_JSON`` when it is not."""
        try:
            return json.loads(self.answer)
        except ValueError:
            return NOT_JSON

    def server_time(self) -> datetime:
        """The registry's clock by its Date header (RFC 9110 section 6.6.1), or the kit's without one."""
        try:
            return parsedate_to_datetime(self.answer_headers["date"]).astimezone(UTC)
        except (KeyError, TypeError, ValueError):
            return datetime.now(UTC)

    def describe(self) -> str:
        """The request and the answer, shortened, for a person."""
        sent = f"{self.method} {self.url}" + (
            f" (client certificate of {self.client_certificate})" * bool(self.client_certificate)
        )
        lines = [f"sent:      {sent}"]
        lines += [f"           {name}: {self._masked(value)}" for name, value in self.headers.items()]
        if self.body:
            lines.append(f"           {_shorten(self.body)}")
        if self.status is None:
            lines.append(f"received:  no answer: {self.error}")
        else:
            phrase = http.client.responses.get(self.status, "")
            lines.append(f"received:  {self.status} {phrase}")
            lines += [f"           {n}: {v}" for n, v in self.answer_headers.items() if n in SHOWN_HEADERS]
            if self.answer:
                lines.append(f"           {_shorten(self.answer)}")
        return "\n".join(lines)

    def curl(self) -> str:
        """A shell line that sends this request again."""
        words = ["curl", "-sS", "-i", "-X", self.method]
        if self.tls == "insecure":
            words.append("--insecure")
        elif self.tls:
            words += ["--cacert", self.tls]
        if self.client_certificate:
            words += ["--cert", f"{self.client_certificate}-cert.pem", "--key", f"{self.client_certificate}-key.pem"]
        line = " ".join(shlex.quote(word) for word in [*words, self.url])
        for name, value in self.headers.items():
            parts = f"{name}: {value}".split(self.token) if self.token else [f"{name}: {value}"]
            line += " -H " + '"$TOKEN"'.join(shlex.quote(part) for part in parts)
        if self.body:
            line = _with_body(line, self.body)
        return line

    def _masked(self, text: str) -> str:
        return text.replace(self.token, "$TOKEN") if self.token else text


NOT_JSON = object()
SHOWN_HEADERS = ("content-type", "retry-after", "allow", "www-authenticate", "location")


def _shorten(data: bytes, limit: int = 600) -> str:
    text = data.decode("utf-8", "backslashreplace")
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} ... ({len(data)} bytes) ... {text[-limit // 4 :]}"


def _with_body(line: str, body: bytes) -> str:
    """``line`` sending ``body``: inline, or made by python3 when it is long (a 413's 64 KiB)."""
    if len(body) <= 2000:
        return line + " --data-binary " + shlex.quote(body.decode("utf-8", "surrogateescape"))
    head, run, tail = _longest_run(body)
    program = f"import sys; sys.stdout.buffer.write({head!r} + {run[:1]!r} * {len(run)} + {tail!r})"
    return f"python3 -c {shlex.quote(program)} | {line} --data-binary @-"


def _longest_run(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``data`` as what comes before its longest run of one byte, the run, and what follows."""
    runs, position = [], 0
    for _, group in itertools.groupby(data):
        length = sum(1 for _ in group)
        runs.append((length, position))
        position += length
    length, start = max(runs, default=(0, 0))
    return data[:start], data[start : start + length], data[start + length :]


class Broken(Exception):
    """A requirement the registry broke: which, what it expected, and the exchange that showed it."""

    def __init__(self, requirement: str, expected: str, exchange: Exchange | None = None) -> None:
        assert requirement in REQUIREMENTS, requirement
        super().__init__(f"{requirement}: {expected}")
        self.requirement = requirement
        self.expected = expected
        self.exchange = exchange


class Skipped(Exception):
    """The check cannot run against this registry; the message says why."""


# --- The checks -----------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One scenario: its name, its section, the requirements it covers, what it needs, and the code."""

    name: str
    section: str
    requirements: tuple[str, ...]
    needs: frozenset[str]
    run: Callable[[Kit], None]

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip()


CHECKS: list[Check] = []


def check(section: str, *requirements: str, needs: Iterable[str] = ()) -> Callable:
    """Add the decorated function to ``CHECKS``: it covers ``requirements`` and needs ``needs``.

    ``needs`` may hold "admin" (the token), "ca" (a registry with a CA),
    "tls" (mutual TLS, so https) and "no-ca" (a registry without a CA).
    """
    assert all(requirement in REQUIREMENTS for requirement in requirements), requirements

    def add(function: Callable[[Kit], None]) -> Callable[[Kit], None]:
        name = function.__name__.removeprefix("check_").replace("_", "-")
        CHECKS.append(Check(name, section, requirements, frozenset(needs), function))
        return function

    return add


@dataclass
class Outcome:
    """How one check ended."""

    check: Check
    result: Result
    requirement: str = ""  # the one that failed or warned
    expected: str = ""
    why: str = ""  # a skip's reason, or the kit's own error
    exchange: Exchange | None = None
    seconds: float = 0.0

    def report(self) -> str:
        """The lines a person reads for it."""
        ids = " ".join(self.check.requirements)
        head = f"{self.result.value}  {self.check.section}  {self.check.name:<24} {ids}"
        if self.result is Result.SKIP:
            return f"{head}\n      skipped: {self.why}"
        if self.result is Result.PASS:
            return head
        strength = REQUIREMENTS[self.requirement][0]
        lines = [head, f"      {self.requirement} ({strength}): {REQUIREMENTS[self.requirement][2]}"]
        lines.append(f"      expected:  {self.expected}")
        if self.why:
            lines.append(f"      error:     {self.why}")
        if self.exchange is not None:
            lines += ["      " + line for line in self.exchange.describe().splitlines()]
            lines.append(f"      reproduce: {self.exchange.curl()}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        exchange = self.exchange
        return {
            "check": self.check.name,
            "section": self.check.section,
            "requirements": list(self.check.requirements),
            "result": self.result.value,
            "requirement": self.requirement or None,
            "expected": self.expected or None,
            "why": self.why or None,
            "seconds": round(self.seconds, 3),
            "exchange": exchange
            and {
                "method": exchange.method,
                "url": exchange.url,
                "body": exchange.body.decode("utf-8", "backslashreplace")[:4000],
                "status": exchange.status,
                "answer": exchange.answer.decode("utf-8", "backslashreplace")[:4000],
                "error": exchange.error or None,
            },
            "curl": exchange.curl() if exchange else None,
        }


# --- Keys, CSRs, certificates ---------------------------------------------------------


def generate_key(kind: str = "ec") -> Any:
    """A private key: "ec" (P-256), "p384", "p521", "rsa" (2048), "rsa1024", "ed25519" or "ed448"."""
    makers = {
        "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa1024": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
    }
    return makers[kind]()


def make_csr(
    common_name: str | None,
    key: Any,
    *,
    unit: str | None = None,
    organization: str | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> str:
    """A PEM CSR signed by ``key`` for ``common_name`` (none when None); ``unit`` makes its bytes differ."""
    names = []
    if common_name is not None:
        # An empty CN is not a valid X.520 name, which cryptography refuses
        # unless asked not to check: the kit needs one to see it refused.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            names.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False))
    if organization:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if unit:
        names.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def spki(key: Any) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a private or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def tampered(csr_pem: str) -> str:
    """The CSR with the last byte of its signature changed: it parses, but proves nothing."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return pem("CERTIFICATE REQUEST", bytes(der))


def pem(label: str, der: bytes) -> str:
    """RFC 7468 text of ``der``."""
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def self_signed(common_name: str, key: Any) -> str:
    """A certificate for ``common_name`` that no registry issued."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _iso(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else None


def _rights_set(body: Mapping[str, Any]) -> tuple[frozenset, frozenset]:
    """Roles and permissions as sets: order and repetition do not matter (SPEC section 2.4)."""
    roles = body.get("roles")
    permissions = body.get("permissions")
    if not isinstance(roles, list) or not isinstance(permissions, list):
        return frozenset({"<not a list>"}), frozenset()
    try:
        return frozenset(roles), frozenset(tuple(sorted(p.items())) for p in permissions)
    except (AttributeError, TypeError):
        return frozenset({"<not strings>"}), frozenset()


# --- The kit --------------------------------------------------------------------------


class Unusable(Exception):
    """The registry cannot be checked as given (no answer, the wrong scheme, a refused token): one line, exit 2."""


def _check_reached(url: str, answer: Exchange) -> None:
    """Raise ``Unusable`` unless the first call was answered, at the scheme the registry speaks."""
    if answer.status is None:
        # OpenSSL reads a plain "HTTP/1.1 400" as a TLS record of an unknown version (3.0 and 3.2 say it so).
        if "WRONG_VERSION_NUMBER" in answer.error or "record layer failure" in answer.error:
            raise Unusable(f"{url} speaks plain HTTP: use {url.replace('https://', 'http://', 1)}")
        raise Unusable(f"no answer from {url}: {answer.error}")
    refusal = answer.json()
    if (
        answer.status == HTTPStatus.BAD_REQUEST
        and isinstance(refusal, dict)
        and refusal.get("error") == "https_required"
    ):
        raise Unusable(f"{url} speaks HTTPS: use {url.replace('http://', 'https://', 1)}")


class Kit:
    """A run against one registry: how to reach it, what it has, and what the run created."""

    def __init__(
        self,
        url: str,
        *,
        admin_token: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        max_body: int = DEFAULT_MAX_BODY,
        unlock_ms: int = 1500,
        timeout: float = TIMEOUT,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self._parts = parts
        self.admin_token = admin_token
        self.ca_file = ca_file
        self.insecure = insecure
        self.max_body = max_body
        self.unlock_ms = unlock_ms
        self.timeout = timeout
        self.prefix = f"kit{secrets.token_hex(3)}-"
        self.last: Exchange | None = None  # the latest exchange, to show with a failure
        self.created: set[str] = set()  # names a registry stored for the kit (answered 201 or 202)
        self.passwords: set[str] = set()  # every password the kit sent, to look for in answers
        self.ca_pem: str | None = None
        self.ca_certificate: x509.Certificate | None = None
        self.tls = parts.scheme == "https"
        self._folder = tempfile.TemporaryDirectory(prefix="conformance-")
        self._pinned: str | None = None  # the served CA, trusted when no --ca-file or --insecure
        self._found_lock: tuple[bool, float | None] | None = None  # (locked, seconds left) at the start
        self._started = time.monotonic()
        self._roles: list[str] | None = None

    # --- Reaching the registry ----------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        admin: bool = False,
        basic: tuple[str, str] | None = None,
        identity: tuple[str, str, Any] | None = None,
    ) -> Exchange:
        """Send one request: ``body`` as JSON, or ``raw`` bytes as they are.

        ``admin`` adds the Bearer token, ``basic`` HTTP Basic credentials,
        and ``identity`` (username, certificate PEM, key) presents a client
        certificate over mutual TLS.
        """
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        sent: dict[str, str] = {}
        if body is not None and raw is None:
            sent["Content-Type"] = "application/json"
        if admin:
            sent["Authorization"] = f"Bearer {self.admin_token}"
        if basic:
            sent["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
        sent.update(headers or {})
        exchange = Exchange(method, self.url + path, sent, data, tls=self._curl_trust(), token=self.admin_token or "")
        self.last = exchange
        if identity:
            exchange.client_certificate = identity[0]
        host, port = self._parts.hostname or "", self._parts.port
        try:
            if self.tls:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self._context(identity)
                )
            else:
                connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
            with contextlib.closing(connection):
                connection.request(method, self._parts.path.rstrip("/") + path, body=data or None, headers=sent)
                response = connection.getresponse()
                exchange.status = response.status
                exchange.answer_headers = {name.lower(): value for name, value in response.getheaders()}
                exchange.answer = response.read()
        except (OSError, http.client.HTTPException) as error:
            exchange.error = f"{type(error).__name__}: {error}"
        return exchange

    def _curl_trust(self) -> str:
        if not self.tls:
            return ""
        if self.insecure:
            return "insecure"
        return self.ca_file or "ca.pem"

    def _context(self, identity: tuple[str, str, Any] | None) -> ssl.SSLContext:
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_file:
            context = ssl.create_default_context(cafile=self.ca_file)
        elif self._pinned:
            context = ssl.create_default_context(cadata=self._pinned)
        else:  # the first call, to fetch the CA to pin
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if identity:
            context.load_cert_chain(*self._identity_files(*identity))
        return context

    def _identity_files(self, username: str, certificate_pem: str, key: Any) -> tuple[Path, Path]:
        """The certificate and key as files, as ``ssl`` wants them (in the run's private folder)."""
        folder = Path(self._folder.name)
        digest = hashlib.sha256(certificate_pem.encode()).hexdigest()[:16]
        certificate, private = folder / f"{digest}-cert.pem", folder / f"{digest}-key.pem"
        if not certificate.exists():
            certificate.write_text(certificate_pem)
            private.touch(mode=0o600)
            private.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        return certificate, private

    def start(self) -> None:
        """Learn what the registry has (a CA), pin its CA if asked to, and note its lock."""
        answer = self.call("GET", f"{API}/ca")
        _check_reached(self.url, answer)
        if answer.status == HTTPStatus.OK:
            try:
                self.ca_certificate = x509.load_pem_x509_certificate(answer.answer)
                self.ca_pem = answer.answer.decode()
            except ValueError:
                self.ca_certificate = None
        if self.tls and not (self.ca_file or self.insecure):
            if not self.ca_pem:
                raise Unusable("the registry serves no CA to trust: give --ca-file or --insecure")
            self._pinned = self.ca_pem
        if self.admin_token:
            status = self.call("GET", API, admin=True)
            if status.status == HTTPStatus.UNAUTHORIZED:
                raise Unusable(
                    f"the registry refuses the administrator token (401 to GET {API}): check --admin-token,"
                    " or leave it out for a partial run"
                )
            body = status.json()
            if status.status == HTTPStatus.OK and isinstance(body, dict):
                until = _iso(body.get("unlockedUntil"))
                left = (until - status.server_time()).total_seconds() if until else None
                self._found_lock = (bool(body.get("locked", True)), left)
        self._started = time.monotonic()

    def finish(self) -> str:
        """Remove what the run created and put the lock back; a sentence saying what was done."""
        try:
            if not self.admin_token:
                return "no admin token: nothing to remove, the lock untouched"
            removed = self._remove_created()
            return f"removed {removed[0]} requests and {removed[1]} users of the run; {self._restore_lock()}"
        finally:
            self._folder.cleanup()

    def _remove_created(self) -> tuple[int, int]:
        requests = users = 0
        listing = self.call("GET", f"{API}/requests", admin=True).json()
        for entry in listing if isinstance(listing, list) else ():
            name = entry.get("username", "") if isinstance(entry, dict) else ""
            if not self.ours(name):
                continue
            if entry.get("state") == "approved":
                users += self.call("DELETE", f"{USERS}/{quote(name, safe='')}", admin=True).status == 200
            else:
                requests += self.call("DELETE", f"{API}/requests/{quote(name, safe='')}", admin=True).status == 200
        listing = self.call("GET", USERS, admin=True).json()
        for entry in listing if isinstance(listing, list) else ():
            name = entry.get("username", "") if isinstance(entry, dict) else ""
            if self.ours(name):
                users += self.call("DELETE", f"{USERS}/{quote(name, safe='')}", admin=True).status == 200
        return requests, users

    def _restore_lock(self) -> str:
        if self._found_lock is None:
            return "the lock was not read at the start"
        locked, left = self._found_lock
        if not locked and left is not None:
            remaining = int((left - (time.monotonic() - self._started)) * 1000)
            if remaining > 0:
                self.call("POST", f"{API}/unlock", {"duration": remaining}, admin=True)
                return f"the registry is open again, for the {remaining / 1000:.0f} s it had left"
        self.call("POST", f"{API}/lock", admin=True)
        return "the registry is locked, as it was" if locked else "the registry is locked: its window has passed"

    def ours(self, username: str) -> bool:
        """Whether the run made ``username``: its prefix, or a name stored for the kit."""
        return self.prefix in username or username in self.created

    def name(self, label: str) -> str:
        """A username of this run."""
        return self.prefix + label

    # --- What the checks say ---------------------------------------------------

    def register(self, body: object = None, *, raw: bytes | None = None, **options: Any) -> Exchange:
        """POST a registration; a name it stores is noted, to be removed at the end."""
        exchange = self.call("POST", REGISTER, body, raw=raw, **options)
        if isinstance(body, dict):
            if isinstance(body.get("password"), str):
                self.passwords.add(body["password"])
            if exchange.status in (HTTPStatus.CREATED, HTTPStatus.ACCEPTED) and isinstance(body.get("username"), str):
                self.created.add(body["username"])
        return exchange

    def expect(
        self, exchange: Exchange, status: int, requirement: str, expected: str, *, code: str | None = None
    ) -> Any:
        """The JSON body of ``exchange`` when it got ``status`` (and error ``code``); ``Broken`` otherwise."""
        if exchange.status != status:
            raise Broken(requirement, expected, exchange)
        body = exchange.json()
        if body is NOT_JSON:
            raise Broken("REG-2.5-ERRORS", "every answer is JSON", exchange)
        if status >= 400:
            self.error_shape(exchange, body)
            if code is not None and body.get("error") != code:
                raise Broken(requirement, f"{expected}, with the error code {code!r}", exchange)
        return body

    def error_shape(self, exchange: Exchange, body: Any) -> None:
        """SPEC section 2.5: ``{"error": code, "message": sentence}``, ``details`` a list when present."""
        if not (
            isinstance(body, dict)
            and isinstance(body.get("error"), str)
            and isinstance(body.get("message"), str)
            and isinstance(body.get("details", []), list)
        ):
            raise Broken("REG-2.5-ERRORS", 'an error is {"error": "<code>", "message": "<sentence>"}', exchange)

    def require(self, holds: bool, requirement: str, expected: str, exchange: Exchange | None = None) -> None:
        """``Broken`` unless ``holds``; the exchange that shows it is by default the last one."""
        if not holds:
            raise Broken(requirement, expected, exchange or self.last)

    def malformed(self, body: object, requirement: str, expected: str, *, raw: bytes | None = None) -> Exchange:
        """A registration that must be 400 malformed_request."""
        exchange = self.register(body, raw=raw)
        self.expect(exchange, 400, requirement, f"{expected}: 400 malformed_request", code="malformed_request")
        return exchange

    def against_policy(self, body: object, requirement: str, expected: str) -> Exchange:
        """A registration that must be 422 policy_violation."""
        exchange = self.register(body)
        self.expect(exchange, 422, requirement, f"{expected}: 422 policy_violation", code="policy_violation")
        return exchange

    def pending(self, body: dict[str, Any], requirement: str, expected: str) -> str:
        """A registration that must be 202 pending, with Retry-After; its pairing id."""
        exchange = self.register(body)
        answer = self.expect(exchange, 202, requirement, f"{expected}: 202 Accepted")
        self.retry_after(exchange)
        pairing = answer.get("pairingId") if isinstance(answer, dict) else None
        self.require(
            isinstance(answer, dict)
            and answer.get("status") == "pending"
            and answer.get("username") == body["username"]
            and isinstance(pairing, str)
            and len(pairing) == 6
            and all(c in "0123456789abcdefABCDEF" for c in pairing),
            "REG-2.5-PENDING-BODY",
            '{"status": "pending", "username": U, "pairingId": "<6 hex digits>"}',
            exchange,
        )
        return pairing.lower()

    def approved(self, body: dict[str, Any], requirement: str, expected: str) -> dict[str, Any]:
        """A registration that must be 201 approved; its body, checked for the fields of SPEC section 2.5."""
        exchange = self.register(body)
        answer = self.expect(exchange, 201, requirement, f"{expected}: 201 Created")
        self.require(
            isinstance(answer, dict)
            and answer.get("status") == "approved"
            and answer.get("username") == body["username"]
            and isinstance(answer.get("roles"), list)
            and isinstance(answer.get("permissions"), list),
            "REG-2.5-APPROVED-BODY",
            '{"status": "approved", "username": U, "roles": [...], "permissions": [...]}',
            exchange,
        )
        if "csr" in body:
            self.require(
                isinstance(answer.get("certificate"), str) and isinstance(answer.get("caCertificate"), str),
                "REG-2.5-APPROVED-BODY",
                'for a CSR, "certificate" and "caCertificate" (PEM)',
                exchange,
            )
            self.times(exchange, answer)
        answer["_exchange"] = exchange
        return answer

    def retry_after(self, exchange: Exchange) -> None:
        """SPEC section 2.5: a Retry-After of whole seconds."""
        value = exchange.answer_headers.get("retry-after", "")
        self.require(
            value.isascii() and value.isdigit(),
            "REG-2.5-RETRY-AFTER",
            f"a {exchange.status} carries Retry-After: <seconds>",
            exchange,
        )

    def times(self, exchange: Exchange, answer: Mapping[str, Any]) -> x509.Certificate:
        """SPEC section 7.1: notAfter and renewAfter beside a certificate, as the certificate has them."""
        certificate = self.certificate_of(exchange, answer)
        not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        renew_after = not_before + (not_after - not_before) * 2 / 3
        given_not_after, given_renew_after = _iso(answer.get("notAfter")), _iso(answer.get("renewAfter"))
        self.require(
            given_not_after is not None and abs(given_not_after - not_after) <= timedelta(seconds=1),
            "LIFE-7.1-TIMES",
            f"notAfter (ISO-8601) is the certificate's, {not_after.isoformat()}",
            exchange,
        )
        self.require(
            given_renew_after is not None and abs(given_renew_after - renew_after) <= timedelta(seconds=1),
            "LIFE-7.1-TIMES",
            f"renewAfter (ISO-8601) is two thirds of the way through the validity, {renew_after.isoformat()}",
            exchange,
        )
        return certificate

    def certificate_of(self, exchange: Exchange, answer: Mapping[str, Any]) -> x509.Certificate:
        """The answer's certificate, parsed."""
        try:
            return x509.load_pem_x509_certificate(str(answer.get("certificate")).encode())
        except ValueError:
            raise Broken("REG-2.5-APPROVED-BODY", '"certificate" is a PEM certificate', exchange) from None

    # --- The administrator --------------------------------------------------------

    def admin(self, method: str, path: str, body: object = None, *, requirement: str = "ADMIN-4.2-CALLS") -> Any:
        """An administrator call that must succeed (200, or 204 for one that answers nothing)."""
        exchange = self.call(method, path, body, admin=True)
        if exchange.status == HTTPStatus.NO_CONTENT and method != "GET":
            return None
        return self.expect(exchange, 200, requirement, f"{method} {path} succeeds: 200")

    def open(self) -> None:
        """Unlock the registry for a minute, so that new requests are stored."""
        self.admin("POST", f"{API}/unlock", {"duration": OPEN_MS})

    def lock(self) -> None:
        self.admin("POST", f"{API}/lock")

    def approve(self, username: str, grant: object = None, requirement: str = "ADMIN-4.2-CALLS") -> Any:
        return self.admin("POST", f"{API}/requests/{quote(username, safe='')}/approve", grant, requirement=requirement)

    def deny(self, username: str, reason: str | None = None) -> Any:
        body = None if reason is None else {"reason": reason}
        return self.admin("POST", f"{API}/requests/{quote(username, safe='')}/deny", body)

    def requests(self) -> dict[str, dict[str, Any]]:
        """The stored requests of this run, by username."""
        listing = self.admin("GET", f"{API}/requests")
        self.require(isinstance(listing, list), "ADMIN-4.6-LISTS", "the requests are a bare JSON array")
        return {e["username"]: e for e in listing if isinstance(e, dict) and self.ours(str(e.get("username")))}

    def users(self) -> list[dict[str, Any]]:
        listing = self.admin("GET", USERS)
        self.require(isinstance(listing, list), "ADMIN-4.6-LISTS", "the users are a bare JSON array")
        return listing

    def certified(
        self, label: str, key: Any = None, grant: object = None, **csr_options: Any
    ) -> tuple[str, Any, dict[str, Any]]:
        """A user of this run with a certificate: (username, key, the 201's body)."""
        username = self.name(label)
        key = key or generate_key()
        request = {"username": username, "csr": make_csr(username, key, **csr_options), "roles": self.roles[:1]}
        self.open()
        self.pending(request, "REG-2.4-STORE", "a new request while the registry is open is stored")
        self.approve(username, grant)
        return username, key, self.approved(request, "REG-2.4-USER", "the approved request again")

    def password_user(self, label: str) -> tuple[str, str]:
        """An approved user of this run with a password: (username, password)."""
        username, password = self.name(label), f"pw-{secrets.token_hex(8)}"
        self.open()
        self.pending({"username": username, "password": password}, "REG-2.4-STORE", "a new request is stored")
        self.approve(username)
        return username, password

    @property
    def roles(self) -> list[str]:
        """The role catalog's names (SPEC section 4.8), or the default one, "minimum"."""
        if self._roles is None:
            self._roles = ["minimum"]
            if self.admin_token:
                catalog = self.call("GET", f"{API}/roles", admin=True).json()
                if isinstance(catalog, list):
                    names = [r.get("name") if isinstance(r, dict) else r for r in catalog]
                    self._roles = [n for n in names if isinstance(n, str)] or self._roles
        return self._roles


PERMISSION = {"resource": "sensors/+/temperature", "operation": "read", "context": "mqtt"}
OTHER_PERMISSION = {"resource": "/api/readings", "operation": "write", "context": "http"}


def password_request(username: str, **fields: Any) -> dict[str, Any]:
    """A well-formed password registration, with a password of its own."""
    return {"username": username, "password": f"pw-{secrets.token_hex(8)}", **fields}


# =============================================================================
# Section 1: the client's request
# =============================================================================


@check("1", "REQ-1-SHAPE", "REG-2.2-MALFORMED", "REG-2.5-ERRORS")
def check_shape(kit: Kit) -> None:
    """Bodies that break the shape of section 1 are 400 malformed_request, with details when several things are."""
    name = kit.name("shape")
    for raw, why in [
        (b"not json", "a body that is not JSON"),
        (b"[]", "a JSON array, not an object"),
        (b'"text"', "a JSON string, not an object"),
        (b"", "an empty body"),
    ]:
        kit.malformed(None, "REG-2.2-MALFORMED", why, raw=raw)
    for body, requirement, why in [
        ({"password": "pw-12345"}, "REQ-1-SHAPE", "no username"),
        ({"username": name}, "REQ-1-SHAPE", "neither password nor csr"),
        (
            {"username": name, "password": "pw-12345", "csr": make_csr(name, generate_key())},
            "REQ-1-SHAPE",
            "both password and csr",
        ),
        ({"username": name, "password": "pw-12345", "email": "a@b.c"}, "REQ-1-SHAPE", "an unknown field"),
        ({"username": 42, "password": "pw-12345"}, "REG-2.2-MALFORMED", "a username that is not a string"),
        ({"username": name, "password": 12345}, "REG-2.2-MALFORMED", "a password that is not a string"),
        ({"username": name, "password": None}, "REG-2.2-MALFORMED", "a password that is null"),
        ({"username": name, "password": "pw-12345", "roles": "minimum"}, "REG-2.2-MALFORMED", "roles not a list"),
        ({"username": name, "password": "pw-12345", "roles": [1]}, "REG-2.2-MALFORMED", "a role not a string"),
        ({"username": name, "password": "pw-12345", "permissions": {}}, "REG-2.2-MALFORMED", "permissions not a list"),
        ({"username": name, "password": "pw-12345", "context": 5}, "REG-2.2-MALFORMED", "a context not a string"),
    ]:
        kit.malformed(body, requirement, why)
    several = kit.malformed({"password": "pw-12345", "email": "a@b.c"}, "REQ-1-SHAPE", "no username, unknown field")
    details = several.json().get("details")
    kit.require(
        isinstance(details, list) and len(details) >= 2 and all(isinstance(d, str) for d in details),
        "REG-2.5-ERRORS",
        "an error where several things are wrong has a 'details' list naming each",
        several,
    )


@check("1", "REQ-1-PERMISSION")
def check_permissions(kit: Kit) -> None:
    """A permission that lacks a field, has another, or names a bad operation, context or resource is 400."""
    name = kit.name("permission")
    for permission, why in [
        ({"resource": "a/b", "operation": "read"}, "a permission without its context"),
        (dict(PERMISSION, extra=1), "a permission with a fourth field"),
        (dict(PERMISSION, operation="execute"), "an operation other than read, write, readWrite"),
        (dict(PERMISSION, context="amqp"), "a context other than mqtt, http"),
        ({"resource": "api/readings", "operation": "read", "context": "http"}, "an http resource without '/'"),
        (dict(PERMISSION, resource="a/#/b"), "an mqtt '#' that is not the last level"),
        (dict(PERMISSION, resource="a/b#"), "an mqtt '#' that shares its level"),
        (dict(PERMISSION, resource="a/b+/c"), "an mqtt '+' that shares its level"),
        (dict(PERMISSION, resource="a/\u0000/c"), "an mqtt resource with NUL"),
        (dict(PERMISSION, resource=""), "an empty resource"),
        (dict(PERMISSION, resource=7), "a resource that is not a string"),
        ("read a/b", "a permission that is not an object"),
    ]:
        kit.malformed(password_request(name, permissions=[permission]), "REQ-1-PERMISSION", why)


@check("1", "REQ-1-CONTEXT")
def check_context_length(kit: Kit) -> None:
    """A context of 1025 characters is malformed, since the limit is part of the field's shape."""
    kit.malformed(password_request(kit.name("context"), context="c" * 1025), "REQ-1-CONTEXT", "a 1025-char context")


@check("1", "REQ-1-CSR-PEM", "REG-2.2-CSR", needs=["ca"])
def check_csr_pem(kit: Kit) -> None:
    """A csr that is not one PEM block of a CSR, or whose signature does not verify, is 400."""
    name = kit.name("csr-pem")
    csr = make_csr(name, generate_key())
    begin, rest = csr.split("\n", 1)
    for text, requirement, why in [
        (csr + csr, "REQ-1-CSR-PEM", "two PEM blocks"),
        ("hello\n" + csr, "REQ-1-CSR-PEM", "text before the PEM block"),
        (csr + "bye\n", "REQ-1-CSR-PEM", "text after the PEM block"),
        (f"{begin}\nProc-Type: 4,CLEAR\nContent-Domain: RFC822\n\n{rest}", "REQ-1-CSR-PEM", "RFC 1421 headers"),
        (kit.ca_pem or "", "REQ-1-CSR-PEM", "a certificate, not a certificate request"),
        ("not a csr", "REG-2.2-CSR", "a csr that is not PEM"),
        (pem("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"), "REG-2.2-CSR", "a PEM block that is no PKCS#10"),
        (tampered(csr), "REG-2.2-CSR", "a CSR whose signature does not verify (no proof of possession)"),
    ]:
        kit.malformed({"username": name, "csr": text}, requirement, why)


@check("1", "REQ-1-UTF8")
def check_utf8(kit: Kit) -> None:
    """A body in UTF-16 or UTF-32, or with bytes that are not UTF-8, is malformed."""
    text = json.dumps(password_request(kit.name("utf8")))
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        kit.malformed(None, "REQ-1-UTF8", f"a body in {encoding.upper()}", raw=text.encode(encoding))
    kit.malformed(None, "REQ-1-UTF8", "a body with bytes that are not UTF-8", raw=text.encode()[:-2] + b'\xff"}')


@check("1", "REQ-1-CONTENT-TYPE", needs=["admin"])
def check_content_type(kit: Kit) -> None:
    """A body is read as JSON whatever its Content-Type says, or without one."""
    kit.open()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        body = password_request(kit.name(f"type-{len(content_type or '')}"))
        headers = {"Content-Type": content_type} if content_type else {}
        exchange = kit.register(raw=json.dumps(body).encode(), headers=headers)
        if exchange.status in (201, 202):
            kit.created.add(body["username"])
        kit.expect(exchange, 202, "REQ-1-CONTENT-TYPE", f"a JSON body sent as {content_type}: 202 as any")


# =============================================================================
# Section 2: outcomes, in order
# =============================================================================


@check("2", "REG-2-ORDER", "REG-2.1-SIZE")
def check_order(kit: Kit) -> None:
    """What breaks several rules gets the first one's answer: 413 before 400, 400 before 422."""
    name = kit.name("order")
    exchange = kit.register(raw=b"x" * (kit.max_body + 1))
    kit.expect(exchange, 413, "REG-2.1-SIZE", f"a body of {kit.max_body + 1} bytes, not JSON: 413 first")
    kit.malformed(
        {"username": "k1", "password": "1234", "email": "x"},
        "REG-2-ORDER",
        "a short username and password (422) with an unknown field (400)",
    )
    kit.malformed(
        {"username": "k1", "password": "1234", "roles": "minimum"},
        "REG-2-ORDER",
        "a short username and password (422) with roles not a list (400)",
    )
    if kit.ca_certificate is not None:
        weak = generate_key("rsa1024")
        kit.malformed(
            {"username": name, "csr": make_csr(kit.name("other"), weak)},
            "REG-2-ORDER",
            "a refused key (422) in a CSR for another Common Name (400)",
        )
        kit.malformed(
            {"username": name, "csr": tampered(make_csr(name, weak))},
            "REG-2-ORDER",
            "a refused key (422) in a CSR whose signature does not verify (400)",
        )


@check("2", "REG-2.1-SIZE", needs=["admin"])
def check_size(kit: Kit) -> None:
    """A valid request padded past the limit is 413 and stores nothing; one of exactly the limit is taken."""
    kit.open()
    too_big = password_request(kit.name("size-over"))
    text = json.dumps(too_big).encode()
    exchange = kit.register(too_big, raw=text + b" " * (kit.max_body + 1 - len(text)))
    kit.expect(exchange, 413, "REG-2.1-SIZE", f"a valid request of {kit.max_body + 1} bytes: 413")
    kit.require(too_big["username"] not in kit.requests(), "REG-2.1-SIZE", "a 413 stores nothing", exchange)
    fits = password_request(kit.name("size-fits"))
    text = json.dumps(fits).encode()
    exchange = kit.register(fits, raw=text + b" " * (kit.max_body - len(text)))
    kit.expect(exchange, 202, "REG-2.1-SIZE", f"a valid request of exactly {kit.max_body} bytes is read: 202")


@check("2", "REG-2.2-CN", needs=["ca"])
def check_common_name(kit: Kit) -> None:
    """A CSR whose Common Name is missing, empty or not exactly the username is 400."""
    name = kit.name("cn")
    key = generate_key()
    for common_name, why in [
        (None, "a CSR without a Common Name"),
        ("", "a CSR with an empty Common Name"),
        (kit.name("someone-else"), "a CSR for another username"),
        (name.upper(), "a Common Name that differs in case"),
        (name + " ", "a Common Name with a trailing space"),
    ]:
        kit.malformed({"username": name, "csr": make_csr(common_name, key)}, "REG-2.2-CN", why)


@check("2", "REG-2.3-USERNAME", "REG-2.3-PASSWORD", "REG-2.3-ROLE")
def check_policy(kit: Kit) -> None:
    """Usernames, passwords and roles that break the policy are 422 policy_violation."""
    for username, why in [
        ("k1", "a username of 2 characters"),
        (kit.prefix + "u" * (65 - len(kit.prefix)), "a username of 65 characters"),
        ("-" + kit.name("dash"), "a username starting with '-'"),
        ("." + kit.name("dot"), "a username starting with '.'"),
        ("_" + kit.name("underscore"), "a username starting with '_'"),
        (kit.name("a b"), "a username with a space"),
        (kit.name("a/b"), "a username with '/'"),
        (kit.name("caf\u00e9"), "a username with a letter beyond ASCII"),
    ]:
        kit.against_policy(password_request(username), "REG-2.3-USERNAME", why)
    name = kit.name("policy")
    kit.against_policy({"username": name, "password": "1234"}, "REG-2.3-PASSWORD", "a password of 4 characters")
    kit.against_policy({"username": name, "password": "p" * 1025}, "REG-2.3-PASSWORD", "a password of 1025 chars")
    kit.against_policy(
        password_request(name, roles=[kit.name("no-such-role")]), "REG-2.3-ROLE", "a role that is not in the catalog"
    )


@check("2", "REG-2.3-KEY", needs=["ca"])
def check_key_policy(kit: Kit) -> None:
    """A CSR with an RSA key under 2048 bits, EC P-521 or Ed448 is 422 policy_violation."""
    name = kit.name("key")
    for kind, why in [("rsa1024", "an RSA key of 1024 bits"), ("p521", "an EC P-521 key"), ("ed448", "an Ed448 key")]:
        kit.against_policy({"username": name, "csr": make_csr(name, generate_key(kind))}, "REG-2.3-KEY", why)


@check("2", "REG-2.3-NO-CA", needs=["no-ca"])
def check_no_ca(kit: Kit) -> None:
    """A registry without a CA answers a CSR with 422 before parsing it: even one that is not a CSR."""
    name = kit.name("no-ca")
    kit.against_policy({"username": name, "csr": make_csr(name, generate_key())}, "REG-2.3-NO-CA", "a CSR, no CA")
    kit.against_policy({"username": name, "csr": "not a csr"}, "REG-2.3-NO-CA", "a csr not parsed, no CA")


@check(
    "2",
    "REG-2.4-STORE",
    "REG-2.5-PENDING-BODY",
    "REG-2.5-RETRY-AFTER",
    "REG-2.3-USERNAME",
    "REG-2.3-PASSWORD",
    "REG-2.3-ROLE",
    "REQ-1-PERMISSION",
    "REQ-1-CONTEXT",
    needs=["admin"],
)
def check_accepted(kit: Kit) -> None:
    """Requests at the edges of section 1 and the policy are stored: 202 pending, with Retry-After."""
    kit.open()
    for body, requirement, why in [
        (password_request(kit.name("sensor-0003")), "REG-2.3-USERNAME", "a username with hyphens"),
        (password_request(kit.name("a.b_c")), "REG-2.3-USERNAME", "a username with '.' and '_'"),
        (password_request(kit.prefix + "u" * (64 - len(kit.prefix))), "REG-2.3-USERNAME", "a 64-char username"),
        ({"username": kit.name("pw5"), "password": "12345"}, "REG-2.3-PASSWORD", "a password of 5 characters"),
        ({"username": kit.name("pw1024"), "password": "p" * 1024}, "REG-2.3-PASSWORD", "a password of 1024"),
        (password_request(kit.name("role"), roles=kit.roles[:1]), "REG-2.3-ROLE", "a role of the catalog"),
        (password_request(kit.name("context"), context="c" * 1024), "REQ-1-CONTEXT", "a context of 1024 chars"),
        (
            password_request(
                kit.name("permissions"),
                permissions=[
                    PERMISSION,
                    OTHER_PERMISSION,
                    {"resource": "#", "operation": "readWrite", "context": "mqtt"},
                    {"resource": "plant/+/line/#", "operation": "write", "context": "mqtt"},
                    {"resource": "+", "operation": "read", "context": "mqtt"},
                ],
            ),
            "REQ-1-PERMISSION",
            "permissions with MQTT wildcards in their own levels and an http path",
        ),
        (password_request(kit.name("store")), "REG-2.4-STORE", "a new request while the registry is open"),
    ]:
        kit.pending(body, requirement, why)


@check("2", "REG-2.3-KEY", "REQ-1-CSR-PEM", "REG-2.5-PENDING-BODY", needs=["admin", "ca"])
def check_accepted_csr(kit: Kit) -> None:
    """CSRs of every accepted key, in either PEM label, are stored; the pairing id is of the key."""
    kit.open()
    for kind in ("ec", "p384", "rsa", "ed25519"):
        name, key = kit.name(f"key-{kind}"), generate_key(kind)
        pairing = kit.pending({"username": name, "csr": make_csr(name, key)}, "REG-2.3-KEY", f"a {kind} key")
        kit.require(
            pairing == hashlib.sha256(spki(key)).hexdigest()[:6],
            "REG-2.5-PENDING-BODY",
            "a CSR's pairingId is the first six hex digits of the SHA-256 of its SubjectPublicKeyInfo",
        )
    name = kit.name("old-label")
    older = make_csr(name, generate_key()).replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    kit.pending({"username": name, "csr": older}, "REQ-1-CSR-PEM", "a CSR under the older NEW label")
    name = kit.name("white-space")
    spaced = "\n  " + make_csr(name, generate_key()) + "\n\n"
    kit.pending({"username": name, "csr": spaced}, "REQ-1-CSR-PEM", "a CSR with white space around it")


@check("2", "REG-2.4-MATCH", "REG-2.4-PENDING", "REG-2-ORDER", needs=["admin"])
def check_matching(kit: Kit) -> None:
    """A poll matches on the password and the rights as sets, not the context; anything else is 409."""
    kit.open()
    name = kit.name("match")
    first = password_request(name, roles=kit.roles[:1], permissions=[PERMISSION, OTHER_PERMISSION], context="one")
    pairing = kit.pending(first, "REG-2.4-STORE", "a new request")
    for body, why in [
        (first, "the very same request"),
        (dict(first, context="two"), "the same request with another context"),
        ({k: v for k, v in first.items() if k != "context"}, "the same request without its context"),
        (
            dict(first, permissions=[OTHER_PERMISSION, PERMISSION, PERMISSION], roles=kit.roles[:1] * 2),
            "the same rights in another order, repeated",
        ),
    ]:
        again = kit.pending(body, "REG-2.4-MATCH", f"{why} is a poll")
        kit.require(again == pairing, "REG-2.4-MATCH", f"{why} names the same request (pairingId {pairing})")
    for body, why in [
        (dict(first, password="pw-another-one"), "another password"),
        (dict(first, roles=[]), "other roles"),
        (dict(first, permissions=[PERMISSION]), "other permissions"),
    ]:
        exchange = kit.register(body)
        kit.expect(exchange, 409, "REG-2.4-PENDING", f"{why} beside a pending request: 409", code="duplicate_request")
    kit.against_policy(dict(first, password="1234"), "REG-2-ORDER", "a short password (422) beside a pending request")
    kit.malformed(dict(first, email="x"), "REG-2-ORDER", "an unknown field (400) beside a pending request")
    if kit.ca_certificate is not None:
        exchange = kit.register({"username": name, "csr": make_csr(name, generate_key())})
        kit.expect(exchange, 409, "REG-2.4-PENDING", "a CSR beside a pending password request: 409")


@check("2", "REG-2.4-MATCH", "REG-2.4-PENDING", needs=["admin", "ca"])
def check_matching_csr(kit: Kit) -> None:
    """A CSR request matches on its key: a new CSR for the same key polls, one for another key is 409."""
    kit.open()
    name, key = kit.name("match-csr"), generate_key()
    first = {"username": name, "csr": make_csr(name, key), "roles": kit.roles[:1]}
    pairing = kit.pending(first, "REG-2.4-STORE", "a new request")
    again = kit.pending(
        dict(first, csr=make_csr(name, key, unit="again")), "REG-2.4-MATCH", "a new CSR for the same key is a poll"
    )
    kit.require(again == pairing, "REG-2.4-MATCH", "a new CSR for the same key names the same request")
    exchange = kit.register(dict(first, csr=make_csr(name, generate_key())))
    kit.expect(exchange, 409, "REG-2.4-PENDING", "a CSR for another key: 409", code="duplicate_request")
    exchange = kit.register(password_request(name, roles=kit.roles[:1]))
    kit.expect(exchange, 409, "REG-2.4-PENDING", "a password beside a pending CSR: 409", code="duplicate_request")


@check("2", "REG-2.4-LOCKED", "REG-2.5-LOCK-SCOPE", "REG-2.5-RETRY-AFTER", "REG-2-ORDER", needs=["admin"])
def check_lock_scope(kit: Kit) -> None:
    """While locked a new request is 423 and not stored, but polls and decisions go on."""
    kit.open()
    polling, denied = password_request(kit.name("poll-locked")), password_request(kit.name("deny-locked"))
    pairing = kit.pending(polling, "REG-2.4-STORE", "a new request")
    kit.pending(denied, "REG-2.4-STORE", "a new request")
    kit.lock()
    again = kit.pending(polling, "REG-2.5-LOCK-SCOPE", "a poll while locked")
    kit.require(again == pairing, "REG-2.5-LOCK-SCOPE", "a poll while locked names its request")
    newcomer = password_request(kit.name("new-locked"))
    exchange = kit.register(newcomer)
    kit.expect(exchange, 423, "REG-2.4-LOCKED", "a new request while locked: 423", code="locked")
    kit.retry_after(exchange)
    kit.require(newcomer["username"] not in kit.requests(), "REG-2.4-LOCKED", "a 423 stores nothing", exchange)
    kit.against_policy({"username": "k1", "password": "pw-12345"}, "REG-2-ORDER", "a short username (422) while locked")
    kit.approve(polling["username"], requirement="REG-2.5-LOCK-SCOPE")
    kit.deny(denied["username"], "kit: denied while locked")
    kit.approved(polling, "REG-2.5-LOCK-SCOPE", "the approved request again while locked")


@check("2", "REG-2.4-DENIED", "ADMIN-4.3-DECIDE", "ADMIN-4.2-CALLS", needs=["admin"])
def check_denied(kit: Kit) -> None:
    """A denied request gets 403 with the reason; another request is 409; a decided one cannot be decided again."""
    kit.open()
    request = password_request(kit.name("denied"))
    username, reason = request["username"], f"kit: not this one ({secrets.token_hex(3)})"
    kit.pending(request, "REG-2.4-STORE", "a new request")
    kit.deny(username, reason)
    exchange = kit.register(request)
    body = kit.expect(exchange, 403, "REG-2.4-DENIED", "the denied request again: 403 denied", code="denied")
    kit.require(
        body.get("reason") == reason or reason in str(body.get("message")),
        "REG-2.4-DENIED",
        f"the 403 carries the administrator's reason, {reason!r}",
        exchange,
    )
    exchange = kit.register(dict(request, password="pw-another-one"))
    kit.expect(exchange, 409, "REG-2.4-DENIED", "another request for a denied username: 409")
    path = f"{API}/requests/{quote(username)}"
    for action in ("deny", "approve"):
        exchange = kit.call("POST", f"{path}/{action}", admin=True)
        kit.expect(exchange, 409, "ADMIN-4.3-DECIDE", f"{action} a denied request: 409 not_pending", code="not_pending")
    unknown = f"{API}/requests/{quote(kit.name('nobody'))}"
    for method, where in [("POST", "/approve"), ("POST", "/deny"), ("DELETE", "")]:
        exchange = kit.call(method, unknown + where, admin=True)
        kit.expect(exchange, 404, "ADMIN-4.3-DECIDE", f"{method} {where or 'forget'} for an unknown username: 404")
    kit.admin("DELETE", path)
    kit.pending(request, "ADMIN-4.2-CALLS", "a forgotten denied request's username may ask again")
    kit.admin("DELETE", path)
    kit.require(username not in kit.requests(), "ADMIN-4.2-CALLS", "a forgotten request is no longer listed")


@check(
    "2",
    "REG-2.4-USER",
    "REG-2.5-APPROVED-BODY",
    "ADMIN-4.4-APPROVE-BODY",
    "ADMIN-4.3-DECIDE",
    "AUTH-5.2-WHOAMI",
    needs=["admin"],
)
def check_approved(kit: Kit) -> None:
    """An approval with narrowed permissions: the 201 and whoami show what was granted; other requests are 409."""
    kit.open()
    request = password_request(kit.name("approved"), roles=kit.roles[:1], permissions=[PERMISSION, OTHER_PERMISSION])
    username, path = request["username"], f"{API}/requests/{quote(kit.name('approved'))}"
    kit.pending(request, "REG-2.4-STORE", "a new request")
    kit.approve(username, {"permissions": [PERMISSION]})
    granted = {"roles": kit.roles[:1], "permissions": [PERMISSION]}
    answer = kit.approved(request, "REG-2.4-USER", "the approved request again")
    kit.require(
        _rights_set(answer) == _rights_set(granted),
        "ADMIN-4.4-APPROVE-BODY",
        f"the 201 shows what was granted: roles as requested (left out of the grant), permissions {[PERMISSION]}",
        answer["_exchange"],
    )
    kit.require("certificate" not in answer, "REG-2.5-APPROVED-BODY", "a password user's 201 has no certificate")
    kit.approved(request, "REG-2.4-USER", "the approved request once more")
    for body, why in [
        (dict(request, password="pw-another-one"), "another password"),
        (dict(request, roles=[]), "other roles"),
    ]:
        exchange = kit.register(body)
        kit.expect(exchange, 409, "REG-2.4-USER", f"{why} for a user: 409 username_taken", code="username_taken")
    for method, where in [("POST", "/approve"), ("POST", "/deny"), ("DELETE", "")]:
        exchange = kit.call(method, path + where, admin=True)
        kit.expect(
            exchange,
            409,
            "ADMIN-4.3-DECIDE",
            f"{method} {where or 'forget'} an approved request: 409",
            code="not_pending",
        )
    exchange = kit.call("GET", WHOAMI, basic=(username, request["password"]))
    body = kit.expect(exchange, 200, "AUTH-5.2-WHOAMI", "whoami with the user's password: 200")
    kit.require(
        body.get("username") == username
        and body.get("method") == "password"
        and _rights_set(body) == _rights_set(granted),
        "AUTH-5.2-WHOAMI",
        f'{{"username": {username!r}, "roles", "permissions" as granted, "method": "password"}}',
        exchange,
    )
    for basic, why in [((username, "pw-wrong-one"), "a wrong password"), (None, "no credentials")]:
        exchange = kit.call("GET", WHOAMI, basic=basic)
        kit.expect(exchange, 401, "AUTH-5.2-WHOAMI", f"whoami with {why}: 401")
    kit.require(username in {u.get("username") for u in kit.users()}, "ADMIN-4.2-CALLS", "the user is listed")


@check("4", "ADMIN-4.4-APPROVE-BODY", needs=["admin"])
def check_grants(kit: Kit) -> None:
    """An approval grants what its body names: roles alone, nothing at all, or, without a body, what was asked."""
    kit.open()
    asked = {"roles": kit.roles[:1], "permissions": [PERMISSION]}
    for label, grant, granted in [
        ("grant-roles", {"roles": []}, {"roles": [], "permissions": [PERMISSION]}),
        ("grant-nothing", {"roles": [], "permissions": []}, {"roles": [], "permissions": []}),
        ("grant-as-asked", None, asked),
    ]:
        request = password_request(kit.name(label), **asked)
        kit.pending(request, "REG-2.4-STORE", "a new request")
        kit.approve(request["username"], grant)
        answer = kit.approved(request, "REG-2.4-USER", "the approved request again")
        kit.require(
            _rights_set(answer) == _rights_set(granted),
            "ADMIN-4.4-APPROVE-BODY",
            f"approved with {json.dumps(grant)}: the 201 grants {json.dumps(granted)}",
            answer["_exchange"],
        )


@check("2", "REG-2.4-USER", "REG-2.4-REDELIVER", "REG-2.5-APPROVED-BODY", "LIFE-7.1-TIMES", needs=["admin", "ca"])
def check_redelivery(kit: Kit) -> None:
    """The approved CSR request again, or a new CSR for its key, gets the certificate issued at approval."""
    username, key, answer = kit.certified("redeliver")
    request = {"username": username, "csr": make_csr(username, key), "roles": kit.roles[:1]}
    for body, why in [
        (request, "the approved request again"),
        (dict(request, csr=make_csr(username, key, unit="again")), "a new CSR for the approved key"),
    ]:
        again = kit.approved(body, "REG-2.4-USER", why)
        kit.require(
            again.get("certificate") == answer.get("certificate"),
            "REG-2.4-REDELIVER",
            f"{why} gets the certificate issued at approval, not a new one",
            again["_exchange"],
        )
    kit.require(
        _same_certificate(answer.get("caCertificate"), kit.ca_pem),
        "REG-2.5-APPROVED-BODY",
        '"caCertificate" is the CA the registry serves',
        answer["_exchange"],
    )
    exchange = kit.register(dict(request, csr=make_csr(username, generate_key())))
    kit.expect(exchange, 409, "REG-2.4-USER", "a CSR for another key: 409 username_taken", code="username_taken")
    user = next((u for u in kit.users() if u.get("username") == username), {})
    kit.require(
        _iso(user.get("certificateNotAfter")) == _iso(answer.get("notAfter"))
        and _iso(user.get("certificateRenewAfter")) == _iso(answer.get("renewAfter"))
        and user.get("certificateStatus") == "valid",
        "LIFE-7.1-TIMES",
        "the users list shows certificateNotAfter and certificateRenewAfter of the 201, certificateStatus 'valid'",
    )


def _same_certificate(first: object, second: object) -> bool:
    try:
        return x509.load_pem_x509_certificate(str(first).encode()) == x509.load_pem_x509_certificate(
            str(second).encode()
        )
    except ValueError:
        return False


# =============================================================================
# Section 3: the lock
# =============================================================================


@check("3", "LOCK-3.2", "LOCK-3.3", "ADMIN-4.2-CALLS", needs=["admin"])
def check_lock_window(kit: Kit) -> None:
    """An unlock opens a window that closes by itself (a short one here); an unlock restarts it; lock is at once."""
    for duration in (0, -5, 1.5, "1000", True, 86_400_001, [1000]):
        exchange = kit.call("POST", f"{API}/unlock", {"duration": duration}, admin=True)
        kit.expect(exchange, 400, "LOCK-3.2", f"an unlock for {json.dumps(duration)} ms: 400")
    exchange = kit.call("POST", f"{API}/unlock", {"duration": 1000, "until": "later"}, admin=True)
    kit.expect(exchange, 400, "LOCK-3.2", "an unlock body with another field: 400")
    kit.lock()
    _expect_status(kit, locked=True, requirement="LOCK-3.3")
    exchange = kit.register(password_request(kit.name("window-0")))
    kit.expect(exchange, 423, "LOCK-3.3", "a new request once locked: 423")
    window = kit.unlock_ms / 1000
    with _in_window(window) as opened:
        kit.admin("POST", f"{API}/unlock", {"duration": kit.unlock_ms})
        first_until = _expect_status(kit, locked=False, requirement="LOCK-3.2", within=window)
        kit.pending(password_request(kit.name("window-1")), "LOCK-3.2", "a new request in the window")
    time.sleep(max(0.0, window / 3 - (time.monotonic() - opened)))
    with _in_window(window) as reopened:
        kit.admin("POST", f"{API}/unlock", {"duration": kit.unlock_ms})
        second_until = _expect_status(kit, locked=False, requirement="LOCK-3.2", within=window)
    kit.require(
        second_until > first_until,
        "LOCK-3.2",
        f"an unlock while open starts a new window from now: unlockedUntil moves on from {first_until.isoformat()}",
    )
    time.sleep(max(0.0, window - (time.monotonic() - reopened)) + 0.25)
    _expect_status(kit, locked=True, requirement="LOCK-3.2")
    exchange = kit.register(password_request(kit.name("window-2")))
    kit.expect(exchange, 423, "LOCK-3.2", f"a new request after the {kit.unlock_ms} ms window closed by itself: 423")
    kit.open()
    kit.lock()
    exchange = kit.register(password_request(kit.name("window-3")))
    kit.expect(exchange, 423, "LOCK-3.3", "a new request just after lock: 423")


@contextlib.contextmanager
def _in_window(window: float) -> Iterator[float]:
    """Steps that must end within ``window`` seconds of the start: a failure after it was too slow to tell."""
    started = time.monotonic()
    try:
        yield started
    except Broken:
        if time.monotonic() - started < window:
            raise
        raise Skipped(f"the steps took longer than the {window:g} s window: give a longer --unlock-ms") from None


def _expect_status(kit: Kit, *, locked: bool, requirement: str, within: float = 0) -> datetime:
    """The lock state is as expected; when open, unlockedUntil within ``within`` seconds of the server's now."""
    exchange = kit.call("GET", API, admin=True)
    body = kit.expect(exchange, 200, "ADMIN-4.2-CALLS", "GET /api/client-registry: 200")
    kit.require(
        isinstance(body, dict)
        and isinstance(body.get("locked"), bool)
        and type(body.get("pending")) is int
        and "unlockedUntil" in body,
        "ADMIN-4.2-CALLS",
        '{"locked": bool, "unlockedUntil": ISO-8601 or null, "pending": count}',
        exchange,
    )
    kit.require(body["locked"] is locked, requirement, f"the registry is {'locked' if locked else 'open'}", exchange)
    until = _iso(body["unlockedUntil"])
    if locked:
        kit.require(body["unlockedUntil"] is None, requirement, "a locked registry's unlockedUntil is null", exchange)
        return datetime.min.replace(tzinfo=UTC)
    now = exchange.server_time()
    kit.require(
        until is not None and now - SKEW < until <= now + timedelta(seconds=within) + SKEW,
        requirement,
        f"unlockedUntil is now + {within:g} s (the server's Date: {now.isoformat()})",
        exchange,
    )
    return until


# =============================================================================
# Section 4: the administrator
# =============================================================================


@check("4", "ADMIN-4.1-TOKEN")
def check_token(kit: Kit) -> None:
    """Every administrator call without the token, with a wrong one or another scheme is 401 and does nothing."""
    name = quote(kit.name("token"))
    calls = [
        ("GET", API),
        ("POST", f"{API}/unlock"),
        ("POST", f"{API}/lock"),
        ("GET", f"{API}/requests"),
        ("POST", f"{API}/requests/{name}/approve"),
        ("POST", f"{API}/requests/{name}/deny"),
        ("DELETE", f"{API}/requests/{name}"),
        ("GET", USERS),
        ("DELETE", f"{USERS}/{name}"),
    ]
    wrong = f"kit-wrong-{secrets.token_hex(8)}"
    for method, path in calls:
        for headers, why in [
            ({}, "no Authorization"),
            ({"Authorization": f"Bearer {wrong}"}, "a wrong token"),
            ({"Authorization": f"Basic {kit.admin_token}"}, "the token under another scheme"),
            ({"Authorization": "Bearer "}, "an empty token"),
        ]:
            exchange = kit.call(method, path, headers=headers)
            kit.expect(exchange, 401, "ADMIN-4.1-TOKEN", f"{method} {path} with {why}: 401")
    if not kit.admin_token:
        return
    kit.open()
    request = password_request(kit.name("token"))
    kit.pending(request, "REG-2.4-STORE", "a new request")
    for method, action in [("POST", "/approve"), ("POST", "/deny"), ("DELETE", "")]:
        exchange = kit.call(method, f"{API}/requests/{name}{action}", headers={"Authorization": f"Bearer {wrong}"})
        kit.expect(exchange, 401, "ADMIN-4.1-TOKEN", f"{method} {action or 'forget'} with a wrong token: 401")
        stored = kit.requests().get(request["username"], {})
        kit.require(stored.get("state") == "pending", "ADMIN-4.1-TOKEN", "a 401 changes nothing", exchange)
    kit.call("POST", f"{API}/lock", headers={"Authorization": f"Bearer {wrong}"})
    _expect_status(kit, locked=False, requirement="ADMIN-4.1-TOKEN", within=OPEN_MS / 1000)


@check("4", "ADMIN-4.6-LISTS", "ADMIN-4.2-CALLS", "SAFE-6.3-PASSWORDS", needs=["admin"])
def check_lists(kit: Kit) -> None:
    """The requests list holds every field, oldest first; users come by name; no list tells a password."""
    kit.open()
    older = password_request(kit.name("list-b"), roles=kit.roles[:1], permissions=[PERMISSION], context="kit list")
    newer = password_request(kit.name("list-a"))
    pairing = kit.pending(older, "REG-2.4-STORE", "a new request")
    time.sleep(0.01)
    kit.pending(newer, "REG-2.4-STORE", "a new request")
    kit.approve(newer["username"])
    listing = kit.admin("GET", f"{API}/requests")
    kit.require(isinstance(listing, list), "ADMIN-4.6-LISTS", "the requests are a bare JSON array")
    names = [e.get("username") for e in listing if isinstance(e, dict)]
    kit.require(
        older["username"] in names
        and newer["username"] in names
        and names.index(older["username"]) < names.index(newer["username"]),
        "ADMIN-4.6-LISTS",
        "the requests come oldest first",
    )
    entry = listing[names.index(older["username"])]
    fields = (
        "username",
        "state",
        "pairingId",
        "method",
        "roles",
        "permissions",
        "context",
        "createdAt",
        "lastPollAt",
        "pollCount",
        "clientAddress",
    )
    kit.require(all(f in entry for f in fields), "ADMIN-4.2-CALLS", f"a listed request has {', '.join(fields)}")
    kit.require(
        entry["state"] == "pending"
        and entry["method"] == "password"
        and entry["pairingId"] == pairing
        and entry["context"] == "kit list"
        and _rights_set(entry) == _rights_set(older),
        "ADMIN-4.2-CALLS",
        "a listed request shows its state, method, pairing id, requested rights and context",
    )
    users = kit.users()
    names = [u.get("username") for u in users if isinstance(u, dict)]
    kit.require(names == sorted(names), "ADMIN-4.6-LISTS", "the users come by name")
    kit.require(newer["username"] in names, "ADMIN-4.2-CALLS", "an approved request's user is listed")
    audit = kit.call("GET", f"{API}/audit", admin=True)
    for what, answer in [("requests", listing), ("users", users), ("audit", audit.json())]:
        shown = json.dumps(answer)
        leaked = [p for p in kit.passwords | {older["password"], newer["password"]} if p in shown]
        kit.require(not leaked, "SAFE-6.3-PASSWORDS", f"the {what} list shows no password in plain text")
        secrets_shown = sorted(set(_keys(answer)) & SECRET_FIELDS)
        kit.require(not secrets_shown, "ADMIN-4.6-LISTS", f"the {what} list holds no secret ({secrets_shown})")


SECRET_FIELDS = {"password", "passwordHash", "password_hash", "hash", "salt", "key", "privateKey"}


def _keys(value: object) -> Iterator[str]:
    """Every key of every object in a JSON value."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from _keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _keys(inner)


@check("4", "ADMIN-4.7-POLL-STATS", needs=["admin"])
def check_poll_statistics(kit: Kit) -> None:
    """Polls are counted, with their time, and the count shows in the list within a second."""
    kit.open()
    request = password_request(kit.name("polls"))
    kit.pending(request, "REG-2.4-STORE", "a new request")
    before = kit.requests()[request["username"]]
    for _ in range(3):
        kit.pending(request, "REG-2.4-PENDING", "a poll")
    time.sleep(1.1)
    after = kit.requests()[request["username"]]
    count = (before.get("pollCount") or 0) + 3
    kit.require(
        isinstance(after.get("pollCount"), int)
        and after["pollCount"] >= count
        and (_iso(after.get("lastPollAt")) or datetime.min.replace(tzinfo=UTC))
        >= (_iso(before.get("lastPollAt")) or datetime.max.replace(tzinfo=UTC)),
        "ADMIN-4.7-POLL-STATS",
        f"three polls later the list shows pollCount >= {count} and a later lastPollAt within a second",
    )


@check("4", "ADMIN-4.8-EXTRA", needs=["admin"])
def check_extras(kit: Kit) -> None:
    """The registry serves its role catalog, its audit trail, its OpenAPI document and the administrator's page."""
    for path, admin, requirement in [
        (f"{API}/roles", True, "a JSON list"),
        (f"{API}/audit", True, "JSON"),
        ("/api/openapi.json", False, "a JSON OpenAPI document"),
    ]:
        exchange = kit.call("GET", path, admin=admin)
        kit.expect(exchange, 200, "ADMIN-4.8-EXTRA", f"GET {path}: 200, {requirement}")
    document = kit.call("GET", "/api/openapi.json").json()
    kit.require(isinstance(document, dict) and "openapi" in document, "ADMIN-4.8-EXTRA", "an OpenAPI document")
    page = kit.call("GET", "/")
    kit.require(
        page.status == 200 and "text/html" in page.answer_headers.get("content-type", ""),
        "ADMIN-4.8-EXTRA",
        "GET /: 200, the administrator's page (text/html)",
        page,
    )


# =============================================================================
# Section 5: after registration
# =============================================================================


@check("5", "CERT-5.1-CA-PUBLIC", "CERT-5.4-CA", needs=["ca"])
def check_ca(kit: Kit) -> None:
    """The CA certificate is served without authentication: a self-signed CA."""
    exchange = kit.call("GET", f"{API}/ca")
    kit.require(exchange.status == 200, "CERT-5.1-CA-PUBLIC", "GET /api/client-registry/ca: 200, PEM", exchange)
    try:
        certificate = x509.load_pem_x509_certificate(exchange.answer)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        raise Broken("CERT-5.4-CA", "a self-signed CA certificate (BasicConstraints CA true)", exchange) from None
    kit.require(constraints.ca, "CERT-5.4-CA", "the CA certificate says BasicConstraints CA true", exchange)


@check(
    "5",
    "CERT-5.3-SUBJECT",
    "CERT-5.3-VERIFIED-KEY",
    "CERT-5.3-BASIC-CONSTRAINTS",
    "CERT-5.3-EKU",
    "CERT-5.3-SERIAL",
    "CERT-5.3-VALIDITY",
    "CERT-5.4-CA",
    needs=["admin", "ca"],
)
def check_certificate(kit: Kit) -> None:
    """A CSR asking for more (another subject field, a SAN, CA true) gets the fixed profile for its key."""
    extensions = [
        x509.SubjectAlternativeName([x509.DNSName("evil.example")]),
        x509.BasicConstraints(ca=True, path_length=None),
    ]
    username, key, answer = kit.certified("profile", organization="Kit Evil Org", extensions=extensions)
    exchange = answer["_exchange"]
    certificate = kit.certificate_of(exchange, answer)
    kit.require(
        certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)]),
        "CERT-5.3-SUBJECT",
        f"the subject is CN={username} alone, whatever the CSR's subject held",
        exchange,
    )
    try:
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        raise Broken("CERT-5.3-SUBJECT", "nothing the CSR asked for beyond its key: no subjectAltName", exchange)
    kit.require(spki(certificate.public_key()) == spki(key), "CERT-5.3-VERIFIED-KEY", "the CSR's key", exchange)
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as missing:
        raise Broken(
            "CERT-5.3-BASIC-CONSTRAINTS" if "BasicConstraints" in str(missing) else "CERT-5.3-EKU",
            f"the certificate has the extension: {missing}",
            exchange,
        ) from None
    kit.require(
        constraints.critical and constraints.value.ca is False,
        "CERT-5.3-BASIC-CONSTRAINTS",
        "BasicConstraints CA false, critical, though the CSR asked for CA true",
        exchange,
    )
    kit.require(ExtendedKeyUsageOID.CLIENT_AUTH in usage, "CERT-5.3-EKU", "extended key usage clientAuth", exchange)
    signed_at = exchange.server_time()
    kit.require(
        abs(certificate.not_valid_before_utc - (signed_at - timedelta(minutes=5))) <= SKEW + timedelta(seconds=2)
        and certificate.not_valid_after_utc > signed_at,
        "CERT-5.3-VALIDITY",
        f"valid from five minutes before signing (the server's Date: {signed_at.isoformat()}) to after now",
        exchange,
    )
    try:
        certificate.verify_directly_issued_by(kit.ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise Broken("CERT-5.4-CA", "signed by the registry's CA (GET /api/client-registry/ca)", exchange) from None
    _, _, second = kit.certified("profile-2")
    serials = [certificate.serial_number, kit.certificate_of(second["_exchange"], second).serial_number]
    kit.require(
        serials[0] != serials[1] and abs(serials[0] - serials[1]) > 1 and min(serials).bit_length() >= 48,
        "CERT-5.3-SERIAL",
        f"random serials of 64 bits or more, not consecutive (got {serials[0]:x} and {serials[1]:x})",
        second["_exchange"],
    )


@check("5", "AUTH-5.2-WHOAMI", needs=["admin", "ca", "tls"])
def check_whoami_certificate(kit: Kit) -> None:
    """whoami knows a client by the certificate it was issued, over Basic too; a stranger's is refused."""
    username, key, answer = kit.certified("whoami-cert")
    identity = (username, answer["certificate"], key)
    exchange = kit.call("GET", WHOAMI, identity=identity)
    body = kit.expect(exchange, 200, "AUTH-5.2-WHOAMI", "whoami with the issued certificate: 200")
    kit.require(
        body.get("username") == username
        and body.get("method") == "certificate"
        and _rights_set(body) == _rights_set(answer),
        "AUTH-5.2-WHOAMI",
        f'{{"username": {username!r}, "roles", "permissions", "method": "certificate"}}',
        exchange,
    )
    other, password = kit.password_user("whoami-basic")
    exchange = kit.call("GET", WHOAMI, identity=identity, basic=(other, password))
    body = kit.expect(exchange, 200, "AUTH-5.2-WHOAMI", "whoami with a certificate and Basic: 200")
    kit.require(body.get("username") == username, "AUTH-5.2-WHOAMI", "a client certificate wins over Basic", exchange)
    stranger_key = generate_key()
    stranger = (username, self_signed(username, stranger_key), stranger_key)
    exchange = kit.call("GET", WHOAMI, identity=stranger)
    kit.require(
        exchange.status in (None, 401),
        "AUTH-5.2-WHOAMI",
        "a certificate the registry did not issue authenticates nothing: 401 (or the TLS handshake fails)",
        exchange,
    )
    exchange = kit.call("GET", WHOAMI, basic=(username, "pw-anything"))
    kit.expect(exchange, 401, "AUTH-5.2-WHOAMI", "a certificate user has no password: Basic is 401")


@check("5", "AUTH-5.2-THROTTLE")
def check_throttle(kit: Kit) -> None:
    """Five failed sign-ins for one username from one address, then 429 with Retry-After."""
    credentials = (kit.name("throttle"), "pw-wrong-one")
    for attempt in range(1, 6):
        exchange = kit.call("GET", WHOAMI, basic=credentials)
        kit.expect(exchange, 401, "AUTH-5.2-THROTTLE", f"failed sign-in {attempt} of 5: 401")
    exchange = kit.call("GET", WHOAMI, basic=credentials)
    kit.expect(exchange, 429, "AUTH-5.2-THROTTLE", "a sixth sign-in within the minute: 429")
    value = exchange.answer_headers.get("retry-after", "")
    kit.require(value.isdigit(), "AUTH-5.2-THROTTLE", "the 429 carries Retry-After", exchange)


@check("2", "REG-2.4-THROTTLE", "AUTH-5.2-THROTTLE", needs=["admin"])
def check_register_throttle(kit: Kit) -> None:
    """Wrong passwords repeating a stored request are failed sign-ins: five 409s, then 429 even for the right one."""
    username, password = kit.name("register-throttle"), f"pw-{secrets.token_hex(8)}"
    kit.open()
    kit.pending({"username": username, "password": password}, "REG-2.4-STORE", "a new request is stored")
    wrong = {"username": username, "password": "pw-wrong-one"}
    for attempt in range(1, 6):
        exchange = kit.register(wrong)
        kit.expect(exchange, 409, "REG-2.4-THROTTLE", f"a wrong password for the pending request ({attempt} of 5): 409")
    for body, why in [
        (wrong, "a sixth wrong password"),
        ({"username": username, "password": password}, "the right one"),
    ]:
        exchange = kit.register(body)
        kit.expect(exchange, 429, "REG-2.4-THROTTLE", f"{why}, within the minute: 429, and no password is checked")
        value = exchange.answer_headers.get("retry-after", "")
        kit.require(value.isdigit(), "REG-2.4-THROTTLE", "the 429 carries Retry-After", exchange)


# =============================================================================
# Section 7: the certificate's life
# =============================================================================


def _renewed(kit: Kit, exchange: Exchange, username: str, key: Any, rights: Mapping[str, Any]) -> dict[str, Any]:
    """A renewal's 201, checked: its fields, a certificate for ``key`` and the user's rights."""
    body = kit.expect(exchange, 201, "LIFE-7.2-RENEW", "a renewal with the current certificate: 201")
    kit.require(
        body.get("status") == "renewed"
        and body.get("username") == username
        and all(isinstance(body.get(f), str) for f in ("certificate", "caCertificate", "notAfter", "renewAfter")),
        "LIFE-7.2-RENEW",
        '{"status": "renewed", "username", "roles", "permissions", "certificate", "caCertificate", "notAfter", '
        '"renewAfter"}',
        exchange,
    )
    kit.require(_rights_set(body) == _rights_set(rights), "LIFE-7.2-RENEW", "a renewal keeps the rights", exchange)
    certificate = kit.times(exchange, body)
    kit.require(
        spki(certificate.public_key()) == spki(key)
        and certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)]),
        "LIFE-7.2-RENEW",
        f"the new certificate is for CN={username} and the CSR's key",
        exchange,
    )
    try:
        certificate.verify_directly_issued_by(kit.ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise Broken("LIFE-7.2-RENEW", "the new certificate is signed by the registry's CA", exchange) from None
    return body


@check("7", "LIFE-7.2-RENEW", "LIFE-7.1-TIMES", needs=["admin", "ca", "tls"])
def check_renewal(kit: Kit) -> None:
    """Renewal with the same key: a new certificate, the same rights; repeated, the same answer; the old one lives."""
    username, key, answer = kit.certified("renew", grant={"roles": []})
    first = (username, answer["certificate"], key)
    renewal = {"csr": make_csr(username, key)}
    renewed = _renewed(kit, kit.call("POST", RENEW, renewal, identity=first), username, key, answer)
    kit.require(renewed["certificate"] != answer["certificate"], "LIFE-7.2-RENEW", "a new certificate")
    for body, why in [
        (renewal, "the same renewal again"),
        ({"csr": make_csr(username, key, unit="again")}, "a new CSR for the same key"),
    ]:
        exchange = kit.call("POST", RENEW, body, identity=first)
        again = _renewed(kit, exchange, username, key, answer)
        kit.require(
            again["certificate"] == renewed["certificate"],
            "LIFE-7.2-RENEW",
            f"{why}, with the same certificate, answers the certificate that renewal issued",
            exchange,
        )
    for certificate, why in [(answer["certificate"], "the previous certificate"), (renewed["certificate"], "the new")]:
        exchange = kit.call("GET", WHOAMI, identity=(username, certificate, key))
        kit.expect(exchange, 200, "LIFE-7.2-RENEW", f"whoami with {why}: 200 (renewal is not revocation)")
    request = {"username": username, "csr": make_csr(username, key), "roles": kit.roles[:1]}
    again = kit.approved(request, "LIFE-7.2-RENEW", "the approved request again, after a renewal")
    kit.require(
        again.get("certificate") == renewed["certificate"],
        "LIFE-7.2-RENEW",
        "the approved request repeated after a renewal gets the current certificate",
        again["_exchange"],
    )


@check("7", "LIFE-7.2-RENEW", "REG-2.4-USER", needs=["admin", "ca", "tls"])
def check_rekey(kit: Kit) -> None:
    """Renewal with a new key re-keys: the new key is the credential, the old one is 409."""
    username, key, answer = kit.certified("rekey")
    new_key = generate_key("ed25519")
    exchange = kit.call(
        "POST", RENEW, {"csr": make_csr(username, new_key)}, identity=(username, answer["certificate"], key)
    )
    renewed = _renewed(kit, exchange, username, new_key, answer)
    request = {"username": username, "roles": kit.roles[:1]}
    again = kit.approved(
        dict(request, csr=make_csr(username, new_key)),
        "LIFE-7.2-RENEW",
        "the approved request with a CSR for the new key",
    )
    kit.require(
        again.get("certificate") == renewed["certificate"],
        "LIFE-7.2-RENEW",
        "the approved request with the new key gets the current certificate",
        again["_exchange"],
    )
    exchange = kit.register(dict(request, csr=make_csr(username, key)))
    kit.expect(
        exchange,
        409,
        "LIFE-7.2-RENEW",
        "a CSR for the key the user no longer holds: 409 username_taken",
        code="username_taken",
    )


@check("7", "LIFE-7.2-RENEW", needs=["admin", "ca", "tls"])
def check_superseded(kit: Kit) -> None:
    """A certificate a renewal replaced renews nothing; it may only fetch the current certificate again."""
    username, key, answer = kit.certified("superseded")
    replaced = (username, answer["certificate"], key)
    new_key = generate_key()
    exchange = kit.call("POST", RENEW, {"csr": make_csr(username, new_key)}, identity=replaced)
    current = _renewed(kit, exchange, username, new_key, answer)
    for csr_key, why in [(generate_key(), "a key of its own"), (key, "its own key")]:
        exchange = kit.call("POST", RENEW, {"csr": make_csr(username, csr_key)}, identity=replaced)
        kit.expect(exchange, 401, "LIFE-7.2-RENEW", f"a renewal from the replaced certificate with {why}: 401")
    exchange = kit.call("POST", RENEW, {"csr": make_csr(username, new_key)}, identity=replaced)
    again = _renewed(kit, exchange, username, new_key, answer)
    kit.require(
        again["certificate"] == current["certificate"],
        "LIFE-7.2-RENEW",
        "the replaced certificate repeating its renewal (the current key) gets the current certificate",
        exchange,
    )


@check("7", "LIFE-7.2-RENEW", needs=["admin", "ca", "tls"])
def check_renewal_refused(kit: Kit) -> None:
    """A renewal without a registry certificate is 401; a bad CSR 400; a refused key 422; nothing changes."""
    username, key, answer = kit.certified("renew-refused")
    identity = (username, answer["certificate"], key)
    renewal = {"csr": make_csr(username, key)}
    exchange = kit.call("POST", RENEW, renewal)
    kit.expect(exchange, 401, "LIFE-7.2-RENEW", "a renewal without a client certificate: 401")
    other, password = kit.password_user("renew-password")
    exchange = kit.call("POST", RENEW, {"csr": make_csr(other, generate_key())}, basic=(other, password))
    kit.expect(exchange, 401, "LIFE-7.2-RENEW", "a password user has no certificate and cannot renew: 401")
    stranger_key = generate_key()
    exchange = kit.call("POST", RENEW, renewal, identity=(username, self_signed(username, stranger_key), stranger_key))
    kit.require(exchange.status in (None, 401), "LIFE-7.2-RENEW", "a certificate not of this registry: 401", exchange)
    for body, status, why in [
        ({"csr": make_csr(kit.name("someone-else"), key)}, 400, "a CSR for another Common Name"),
        ({"csr": tampered(make_csr(username, key))}, 400, "a CSR whose signature does not verify"),
        ({"csr": "not a csr"}, 400, "a csr that is not PEM"),
        ({}, 400, "a body without csr"),
        ({"csr": make_csr(username, generate_key("p521"))}, 422, "a CSR with a refused key (EC P-521)"),
    ]:
        exchange = kit.call("POST", RENEW, body, identity=identity)
        kit.expect(exchange, status, "LIFE-7.2-RENEW", f"a renewal with {why}: {status}")
    request = {"username": username, "csr": make_csr(username, key), "roles": kit.roles[:1]}
    again = kit.approved(request, "LIFE-7.2-RENEW", "the approved request again")
    kit.require(
        again.get("certificate") == answer["certificate"],
        "LIFE-7.2-RENEW",
        "refused renewals change nothing: the approval's certificate is still the current one",
        again["_exchange"],
    )


def _crl(kit: Kit, path: str = f"{API}/crl") -> tuple[x509.CertificateRevocationList, int, Exchange]:
    """The registry's CRL, checked against its CA (SPEC section 7.4), with its number."""
    exchange = kit.call("GET", path)
    kit.require(exchange.status == 200, "LIFE-7.4-CRL", f"GET {path}: 200, without authentication", exchange)
    try:
        if path.endswith(".pem"):
            crl = x509.load_pem_x509_crl(exchange.answer)
        else:
            crl = x509.load_der_x509_crl(exchange.answer)
    except ValueError:
        raise Broken(
            "LIFE-7.4-CRL", f"GET {path} is an X.509 CRL ({'PEM' if '.pem' in path else 'DER'})", exchange
        ) from None
    assert kit.ca_certificate is not None
    kit.require(
        crl.issuer == kit.ca_certificate.subject and crl.is_signature_valid(kit.ca_certificate.public_key()),
        "LIFE-7.4-CRL",
        "the CRL is issued and signed by the registry's CA",
        exchange,
    )
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        authority = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound as missing:
        raise Broken(
            "LIFE-7.4-CRL", f"the CRL has a CRL number and an authority key identifier ({missing})", exchange
        ) from None
    expected = x509.AuthorityKeyIdentifier.from_issuer_public_key(kit.ca_certificate.public_key())
    kit.require(
        authority.key_identifier == expected.key_identifier,
        "LIFE-7.4-CRL",
        "the authority key identifier is the CA's",
        exchange,
    )
    now = exchange.server_time()
    next_update = crl.next_update_utc
    kit.require(
        next_update is not None
        and crl.last_update_utc <= now + SKEW < next_update + SKEW
        and next_update > crl.last_update_utc,
        "LIFE-7.4-CRL",
        f"thisUpdate <= now ({now.isoformat()}) < nextUpdate",
        exchange,
    )
    return crl, number, exchange


@check("7", "LIFE-7.4-CRL", needs=["ca"])
def check_crl(kit: Kit) -> None:
    """The CRL is served in DER (application/pkix-crl) and PEM, signed by the CA, with its number and times."""
    _, number, exchange = _crl(kit)
    kit.require(
        exchange.answer_headers.get("content-type", "").split(";")[0].strip() == "application/pkix-crl",
        "LIFE-7.4-CRL",
        "the DER CRL is served as application/pkix-crl",
        exchange,
    )
    _, in_pem, exchange = _crl(kit, f"{API}/crl.pem")
    kit.require(in_pem >= number, "LIFE-7.4-CRL", "the PEM CRL is the current one, as the DER", exchange)


@check("7", "LIFE-7.3-REVOKE", "LIFE-7.4-CRL", "LIFE-7.5-CRL-FRESH", "ADMIN-4.2-CALLS", needs=["admin", "ca"])
def check_revocation(kit: Kit) -> None:
    """Removing a user revokes its certificate: a new CRL lists it, with a reason; its username may ask again."""
    _, before, _ = _crl(kit)
    username, key, answer = kit.certified("revoked")
    serial = kit.certificate_of(answer["_exchange"], answer).serial_number
    kit.admin("DELETE", f"{USERS}/{quote(username)}")
    crl, number, exchange = _crl(kit)
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    kit.require(
        entry is not None, "LIFE-7.3-REVOKE", f"the removed user's certificate {serial:x} is on the CRL", exchange
    )
    kit.require(number > before, "LIFE-7.5-CRL-FRESH", f"a revocation signs a new CRL (number > {before})", exchange)
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = None
    kit.require(
        reason is x509.ReasonFlags.cessation_of_operation
        and abs(entry.revocation_date_utc - exchange.server_time()) < timedelta(minutes=1) + SKEW,
        "LIFE-7.4-CRL",
        "the entry has the time of revocation and the reason code cessationOfOperation",
        exchange,
    )
    kit.require(username not in {u.get("username") for u in kit.users()}, "ADMIN-4.2-CALLS", "a removed user is gone")
    kit.open()
    kit.pending(
        {"username": username, "csr": make_csr(username, key)},
        "ADMIN-4.2-CALLS",
        "a removed user's username may register again",
    )


@check("7", "LIFE-7.3-REVOKE", needs=["admin", "ca", "tls"])
def check_revoked_authenticates_nothing(kit: Kit) -> None:
    """A removed user's certificates, the renewed and the previous one, neither sign in nor renew."""
    username, key, answer = kit.certified("revoked-tls")
    first = (username, answer["certificate"], key)
    renewed = kit.call("POST", RENEW, {"csr": make_csr(username, key)}, identity=first)
    renewed = _renewed(kit, renewed, username, key, answer)
    kit.admin("DELETE", f"{USERS}/{quote(username)}")
    for certificate, which in [(answer["certificate"], "the first"), (renewed["certificate"], "the renewed")]:
        identity = (username, certificate, key)
        exchange = kit.call("GET", WHOAMI, identity=identity)
        kit.expect(exchange, 401, "LIFE-7.3-REVOKE", f"whoami with {which} certificate of a removed user: 401")
        exchange = kit.call("POST", RENEW, {"csr": make_csr(username, key)}, identity=identity)
        kit.expect(exchange, 401, "LIFE-7.3-REVOKE", f"a renewal with {which} certificate of a removed user: 401")


# --- Running -------------------------------------------------------------------------


def select(only: Sequence[str]) -> list[Check]:
    """The checks that cover any of ``only`` (requirement ids or check names), or all."""
    if not only:
        return list(CHECKS)
    wanted = set(only)
    return [c for c in CHECKS if c.name in wanted or wanted & set(c.requirements)]


def run(kit: Kit, checks: Iterable[Check], report: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``checks`` one after the other, reporting each as it ends."""
    outcomes = []
    for item in checks:
        outcome = _run_one(kit, item)
        outcomes.append(outcome)
        report(outcome.report())
    return outcomes


def _run_one(kit: Kit, item: Check) -> Outcome:
    started = time.monotonic()
    outcome = Outcome(item, Result.PASS)
    try:
        _ready(kit, item)
        item.run(kit)
    except Skipped as why:
        outcome = Outcome(item, Result.SKIP, why=str(why))
    except Broken as broken:
        strength = REQUIREMENTS[broken.requirement][0]
        result = Result.FAIL if strength == "MUST" else Result.WARN
        outcome = Outcome(item, result, broken.requirement, broken.expected, exchange=broken.exchange)
    except Exception as error:  # the kit's own failure on an answer it did not foresee: still a failure
        outcome = Outcome(
            item,
            Result.FAIL,
            item.requirements[0],
            "answers the check can read to its end",
            why=f"{type(error).__name__}: {error}",
            exchange=kit.last,
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def _ready(kit: Kit, item: Check) -> None:
    if "admin" in item.needs and not kit.admin_token:
        raise Skipped("no administrator token (--admin-token)")
    if "ca" in item.needs and kit.ca_certificate is None:
        raise Skipped("the registry serves no CA (GET /api/client-registry/ca): it takes no CSR")
    if "no-ca" in item.needs and kit.ca_certificate is not None:
        raise Skipped("the registry has a CA")
    if "tls" in item.needs and not kit.tls:
        raise Skipped("the registry is reached over http://: mutual TLS needs https")


def summary(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return {result.value: sum(o.result is result for o in outcomes) for result in Result}


def requirement_results(outcomes: Sequence[Outcome]) -> dict[str, str]:
    """Each covered requirement's result: FAIL or WARN when a check broke it, else PASS, or SKIP if only skipped."""
    results: dict[str, str] = {}
    for outcome in outcomes:
        for requirement in outcome.check.requirements:
            if outcome.result is Result.SKIP:
                results.setdefault(requirement, "SKIP")
            elif results.get(requirement) in (None, "SKIP"):
                results[requirement] = "PASS"
    for outcome in outcomes:
        if outcome.result in (Result.FAIL, Result.WARN):
            results[outcome.requirement] = outcome.result.value
    return results


def write_json(path: Path, kit: Kit, outcomes: Sequence[Outcome], seconds: float, cleanup: str) -> None:
    document = {
        "url": kit.url,
        "prefix": kit.prefix,
        "seconds": round(seconds, 3),
        "summary": summary(outcomes),
        "requirements": requirement_results(outcomes),
        "cleanup": cleanup,
        "checks": [o.to_json() for o in outcomes],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_junit(path: Path, outcomes: Sequence[Outcome], seconds: float) -> None:
    """JUnit XML: one testcase per check, its classname the section, a failure carrying the reproduction."""
    counts = summary(outcomes)
    suite = ET.Element(
        "testsuite",
        name="conformance",
        tests=str(len(outcomes)),
        failures=str(counts["FAIL"]),
        skipped=str(counts["SKIP"]),
        errors="0",
        time=f"{seconds:.3f}",
    )
    for outcome in outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"section {outcome.check.section}",
            name=f"{outcome.check.name} ({' '.join(outcome.check.requirements)})",
            time=f"{outcome.seconds:.3f}",
        )
        if outcome.result is Result.FAIL:
            failure = ET.SubElement(case, "failure", message=f"{outcome.requirement}: {outcome.expected}")
            failure.text = outcome.report()
        elif outcome.result is Result.SKIP:
            ET.SubElement(case, "skipped", message=outcome.why)
        elif outcome.result is Result.WARN:
            ET.SubElement(case, "system-out").text = outcome.report()
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(suite)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def table() -> str:
    """SPEC.md's closing table: every requirement, its strength, and the checks that cover it or why none."""
    covering: dict[str, list[str]] = {}
    for item in CHECKS:
        for requirement in item.requirements:
            covering.setdefault(requirement, []).append(f"`{item.name}`")
    rows = ["| requirement | strength | checked by the kit (`conformance.py`), or why not |", "|---|---|---|"]
    for requirement, (strength, _, _) in REQUIREMENTS.items():
        if requirement in covering:
            text = ", ".join(covering[requirement])
            if requirement in PARTLY:
                text += f"; in part: {PARTLY[requirement]}"
        else:
            text = NOT_CHECKED[requirement]
        rows.append(f"| {requirement} | {strength} | {text} |")
    return "\n".join(rows)


# What a check may need that a run can lack, by the name the summary gives it.
WANTED = {"admin": "--admin-token", "ca": "a registry with a CA", "tls": "https"}


def partial_run(kit: Kit, outcomes: Sequence[Outcome]) -> str:
    """A sentence saying how many checks were skipped for want of the token, a CA or https; "" for a full run."""
    has = {"admin": bool(kit.admin_token), "ca": kit.ca_certificate is not None, "tls": kit.tls}
    wanting: dict[str, int] = {}
    skipped = 0
    for outcome in outcomes:
        lacked = [need for need in WANTED if need in outcome.check.needs and not has[need]]
        if outcome.result is Result.SKIP and lacked:
            skipped += 1
            for need in lacked:
                wanting[need] = wanting.get(need, 0) + 1
    if not skipped:
        return ""
    needs = ", ".join(f"{count} for want of {WANTED[need]}" for need, count in wanting.items())
    checks = f"{skipped} check" + "s" * (skipped != 1)
    return f"a partial run: {checks} skipped ({needs}); --require-full makes that a failure"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conformance.py",
        description="Check a running client registry against SPEC.md, over HTTP only.",
        epilog="Exit status: 0 when no MUST fails, 1 when one does (or, with --require-full, when a check was "
        "skipped for want of the token, a CA or https), 2 for a wrong command line or a registry that cannot be "
        "checked as given (no answer, the wrong scheme, a refused token).",
    )
    parser.add_argument("url", nargs="?", help="the registry's root, such as https://host:8443")
    parser.add_argument("--admin-token", help="the administrator's token; without it the checks that need it SKIP")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca-file", help="trust the server's certificate by this CA (default: the CA it serves)")
    trust.add_argument("--insecure", action="store_true", help="do not check the server's certificate")
    parser.add_argument(
        "--require-full",
        action="store_true",
        help="fail (exit 1) when a check was skipped for want of --admin-token, a CA or https: a partial run",
    )
    parser.add_argument("--only", nargs="+", default=[], metavar="ID", help="only the checks of these ids or names")
    parser.add_argument("--junit", type=Path, metavar="FILE", help="also write the results as JUnit XML")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="the registry's body limit (bytes)")
    parser.add_argument("--unlock-ms", type=int, default=1500, help="the short unlock window to wait out (ms)")
    parser.add_argument("--list", action="store_true", help="list the checks and the ids they cover, and stop")
    parser.add_argument("--table", action="store_true", help="print SPEC.md's closing table, and stop")
    return parser


def main(argv: Sequence[str] | None = None, report: Callable[[str], None] = print) -> int:
    """The command line; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.table:
        report(table())
        return 0
    checks = select(args.only)
    if args.list:
        for item in checks:
            report(f"{item.section}  {item.name:<24} {' '.join(item.requirements)}\n   {item.doc}")
        return 0
    if not args.url:
        parser.error("the registry's URL is required")
    if args.only and not checks:
        parser.error(f"no check covers {' '.join(args.only)}")
    try:
        kit = Kit(
            args.url,
            admin_token=args.admin_token,
            ca_file=args.ca_file,
            insecure=args.insecure,
            max_body=args.max_body,
            unlock_ms=args.unlock_ms,
        )
        kit.start()
    except (ValueError, Unusable, OSError) as error:
        report(f"conformance: {error}")
        return 2
    report(
        f"conformance: {kit.url}, usernames {kit.prefix}*, admin token {'given' if kit.admin_token else 'not given'}"
        f", CA {'served' if kit.ca_certificate else 'none'}, mutual TLS {'yes' if kit.tls else 'no (http://)'}"
    )
    started = time.monotonic()
    try:
        outcomes = run(kit, checks, report)
    finally:
        cleanup = kit.finish()
    seconds = time.monotonic() - started
    counts = summary(outcomes)
    partial = partial_run(kit, outcomes)
    report(
        f"{len(outcomes)} checks in {seconds:.1f} s: "
        + ", ".join(f"{n} {r}" for r, n in counts.items())
        + (f"\n{partial}" if partial else "")
        + f"\ncleanup: {cleanup}"
    )
    if args.json:
        write_json(args.json, kit, outcomes, seconds, cleanup)
    if args.junit:
        write_junit(args.junit, outcomes, seconds)
    return 1 if counts["FAIL"] or (partial and args.require_full) else 0


# --- Section 10: EST (RFC 7030), a separate block ------------------------------------
#
# EST's answers are not JSON: a certificate travels as base64 of a certs-only
# PKCS#7 (RFC 7030 section 4.1.3), a refusal as a sentence in text/plain.

EST = "/.well-known/est"
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
REQUIREMENTS.update(
    {
        "EST-10.1-PATHS": ("MUST", "10", "EST under /.well-known/est/[label/] on HTTPS; 404 another op, 405 a method"),
        "EST-10.2-CACERTS": ("MUST", "10", "cacerts: 200 application/pkcs7-mime, base64 certs-only with the CA"),
        "EST-10.3-ENROLL": ("MUST", "10", "simpleenroll is a registration of the CSR's CN, in section 2's order"),
        "EST-10.3-OUTCOMES": ("MUST", "10", "202 with Retry-After and the pairing id; 200 certs-only; re-delivered"),
        "EST-10.3-ERRORS": ("MUST", "10", "every EST refusal is text/plain with section 2's status; 413 too"),
        "EST-10.3-LOCKED": ("MUST", "10", "a new EST request while locked is 503 with Retry-After, not stored"),
        "EST-10.4-VIA": ("MUST", "10", 'an EST request is listed with "via": "est", and decided as any other'),
        "EST-10.5-LABEL": ("MUST", "10", "a label requests the role it names; an unknown label is 404"),
        "EST-10.6-REENROLL": ("MUST", "10", "simplereenroll over mutual TLS renews: 200 certs-only; 400, 401"),
        "EST-10.7-CSRATTRS": ("MUST", "10", "csrattrs is 204"),
    }
)
PARTLY["EST-10.1-PATHS"] = "over the https:// URL it is given; not that a plain-HTTP listener answers 404"


def est_body(csr_pem: str, width: int = 64) -> bytes:
    """A CSR as EST sends it: base64 of its DER (RFC 7030 section 4.2.1), in lines of ``width``."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    text = base64.b64encode(der).decode()
    return "\r\n".join(text[i : i + width] for i in range(0, len(text), width)).encode() + b"\r\n"


def _est(kit: Kit, method: str, operation: str, body: bytes = b"", **options: Any) -> Exchange:
    headers = {"Content-Type": "application/pkcs10"} if method == "POST" else {}
    return kit.call(method, f"{EST}/{operation}", raw=body, headers=headers | options.pop("headers", {}), **options)


def _est_text(kit: Kit, exchange: Exchange, status: int, requirement: str, expected: str) -> str:
    """The text of an EST refusal that must be ``status``: text/plain, a sentence, not JSON (EST-10.3-ERRORS)."""
    kit.require(exchange.status == status, requirement, expected, exchange)
    text = exchange.answer.decode("utf-8", "replace")
    kit.require(
        exchange.answer_headers.get("content-type", "").startswith("text/plain")
        and text.strip() != ""
        and exchange.json() is NOT_JSON,
        "EST-10.3-ERRORS",
        f"a {status} on an EST path has a text/plain body saying what to do, not JSON",
        exchange,
    )
    return text


def _est_certificates(kit: Kit, exchange: Exchange, requirement: str, expected: str) -> list[x509.Certificate]:
    """The certificates of a 200 whose body is base64 of a DER certs-only PKCS#7."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    kit.require(exchange.status == 200, requirement, expected, exchange)
    kit.require(
        exchange.answer_headers.get("content-type", "").startswith("application/pkcs7-mime"),
        requirement,
        "Content-Type: application/pkcs7-mime",
        exchange,
    )
    try:
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(exchange.answer.split()), validate=True))
    except ValueError:
        raise Broken(requirement, "a body of base64 of a DER certs-only PKCS#7", exchange) from None


def _est_enrolled(kit: Kit, label: str) -> tuple[str, Any, x509.Certificate]:
    """A user of this run enrolled by EST and approved: (username, key, its certificate)."""
    username, key = kit.name(label), generate_key()
    body = est_body(make_csr(username, key))
    kit.open()
    exchange = _est(kit, "POST", "simpleenroll", body)
    kit.require(exchange.status == 202, "EST-10.3-OUTCOMES", "a new EST request while open: 202", exchange)
    kit.created.add(username)
    kit.approve(username)
    exchange = _est(kit, "POST", "simpleenroll", body)
    [certificate] = _est_certificates(kit, exchange, "EST-10.3-OUTCOMES", "the approved request again: 200")
    return username, key, certificate


@check("10", "EST-10.2-CACERTS", "EST-10.1-PATHS", needs=["ca", "tls"])
def check_est_cacerts(kit: Kit) -> None:
    """cacerts is the CA certificate in certs-only PKCS#7; another operation is 404, another method 405."""
    exchange = _est(kit, "GET", "cacerts")
    certificates = _est_certificates(kit, exchange, "EST-10.2-CACERTS", "GET cacerts: 200 with the CA")
    kit.require(certificates == [kit.ca_certificate], "EST-10.2-CACERTS", "cacerts holds the CA certificate alone")
    _est_text(kit, _est(kit, "GET", "fullcmc"), 404, "EST-10.1-PATHS", "an operation the registry lacks: 404")
    exchange = _est(kit, "POST", "cacerts", b"x")
    _est_text(kit, exchange, 405, "EST-10.1-PATHS", "POST cacerts: 405")
    kit.require("GET" in exchange.answer_headers.get("allow", ""), "EST-10.1-PATHS", "a 405 names GET in Allow")


@check("10", "EST-10.3-ENROLL", "EST-10.3-OUTCOMES", "EST-10.4-VIA", needs=["admin", "ca", "tls"])
def check_est_enroll(kit: Kit) -> None:
    """An EST enrollment waits, is listed via EST, is approved as usual and gets its certificate, twice."""
    username, key = kit.name("est-enroll"), generate_key()
    csr = make_csr(username, key)
    kit.open()
    # RFC 8951 section 3: a Content-Transfer-Encoding header may come, and need not.
    exchange = _est(kit, "POST", "simpleenroll", est_body(csr, 76), headers={"Content-Transfer-Encoding": "base64"})
    text = _est_text_pending(kit, exchange)
    kit.created.add(username)
    pairing = hashlib.sha256(spki(key)).hexdigest()[:6]
    kit.require(pairing in text, "EST-10.3-OUTCOMES", f"the 202's text gives the pairing id {pairing}", exchange)
    listed = kit.requests().get(username, {})
    kit.require(
        listed.get("state") == "pending" and listed.get("via") == "est" and listed.get("roles") == [],
        "EST-10.4-VIA",
        'the EST request is listed pending, "via": "est", with no role',
    )
    _est_text_pending(kit, _est(kit, "POST", "simpleenroll", est_body(csr, 40)))
    kit.approve(username)
    exchange = _est(kit, "POST", "simpleenroll", est_body(csr))
    [certificate] = _est_certificates(kit, exchange, "EST-10.3-OUTCOMES", "the approved request again: 200")
    kit.require(
        exchange.answer_headers.get("content-type", "").replace(" ", "") == PKCS7_CERTS_ONLY.replace(" ", ""),
        "EST-10.3-OUTCOMES",
        f"Content-Type: {PKCS7_CERTS_ONLY}",
        exchange,
    )
    kit.require(
        certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == username
        and certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == spki(key),
        "EST-10.3-ENROLL",
        "the certificate names the CSR's CN and certifies its key",
        exchange,
    )
    again = _est_certificates(kit, _est(kit, "POST", "simpleenroll", est_body(csr)), "EST-10.3-OUTCOMES", "200")
    kit.require(again == [certificate], "EST-10.3-OUTCOMES", "a repeat re-delivers the same certificate")


def _est_text_pending(kit: Kit, exchange: Exchange) -> str:
    kit.require(exchange.status == 202, "EST-10.3-OUTCOMES", "a new or polled EST request: 202", exchange)
    value = exchange.answer_headers.get("retry-after", "")
    kit.require(value.isascii() and value.isdigit(), "EST-10.3-OUTCOMES", "a 202 has Retry-After: <seconds>", exchange)
    kit.require(
        exchange.answer_headers.get("content-type", "").startswith("text/plain"),
        "EST-10.3-OUTCOMES",
        "a 202's body is text/plain",
        exchange,
    )
    return exchange.answer.decode("utf-8", "replace")


@check("10", "EST-10.3-ERRORS", "EST-10.3-ENROLL", needs=["admin", "ca", "tls"])
def check_est_errors(kit: Kit) -> None:
    """Bad bodies are 400, a weak key 422, a taken name 409, a denied request 403 with its reason, as text."""
    for body, what in [
        (b"not base64!", "a body that is not base64"),
        (base64.b64encode(b"not a certificate request"), "base64 of no PKCS#10"),
        (est_body(make_csr(None, generate_key())), "a CSR without a Common Name"),
    ]:
        _est_text(kit, _est(kit, "POST", "simpleenroll", body), 400, "EST-10.3-ENROLL", f"{what}: 400")
    weak = est_body(make_csr(kit.name("est-weak"), generate_key("rsa1024")))
    _est_text(kit, _est(kit, "POST", "simpleenroll", weak), 422, "EST-10.3-ENROLL", "an RSA key of 1024 bits: 422")
    large = b"A" * (kit.max_body + 1)
    _est_text(kit, _est(kit, "POST", "simpleenroll", large), 413, "EST-10.3-ERRORS", "a body over the limit: 413")
    username, _, _ = _est_enrolled(kit, "est-taken")
    other = est_body(make_csr(username, generate_key()))
    _est_text(kit, _est(kit, "POST", "simpleenroll", other), 409, "EST-10.3-ERRORS", "another key for a user: 409")
    denied = est_body(make_csr(kit.name("est-denied"), generate_key()))
    _est_text_pending(kit, _est(kit, "POST", "simpleenroll", denied))
    kit.created.add(kit.name("est-denied"))
    kit.deny(kit.name("est-denied"), "kit: an unknown device")
    text = _est_text(kit, _est(kit, "POST", "simpleenroll", denied), 403, "EST-10.3-ERRORS", "a denied request: 403")
    kit.require("kit: an unknown device" in text, "EST-10.3-ERRORS", "the 403 gives the administrator's reason")


@check("10", "EST-10.3-LOCKED", needs=["admin", "ca", "tls"])
def check_est_locked(kit: Kit) -> None:
    """A new EST request while locked is 503 with Retry-After, and nothing is stored."""
    kit.lock()
    username = kit.name("est-locked")
    exchange = _est(kit, "POST", "simpleenroll", est_body(make_csr(username, generate_key())))
    _est_text(kit, exchange, 503, "EST-10.3-LOCKED", "a new EST request while locked: 503")
    value = exchange.answer_headers.get("retry-after", "")
    kit.require(value.isascii() and value.isdigit(), "EST-10.3-LOCKED", "the 503 has Retry-After: <seconds>", exchange)
    kit.require(username not in kit.requests(), "EST-10.3-LOCKED", "the 503 stores nothing", exchange)


@check("10", "EST-10.5-LABEL", needs=["admin", "ca", "tls"])
def check_est_label(kit: Kit) -> None:
    """A label asks for the role it names; a label that names no role is 404."""
    role = kit.roles[0]
    username = kit.name("est-label")
    kit.open()
    exchange = _est(kit, "POST", f"{quote(role, safe='')}/simpleenroll", est_body(make_csr(username, generate_key())))
    _est_text_pending(kit, exchange)
    kit.created.add(username)
    listed = kit.requests().get(username, {})
    kit.require(listed.get("roles") == [role], "EST-10.5-LABEL", f"the request under the label asks for [{role!r}]")
    unknown = f"{kit.prefix}no-such-role"
    exchange = _est(kit, "POST", f"{unknown}/simpleenroll", est_body(make_csr(kit.name("est-nolabel"), generate_key())))
    _est_text(kit, exchange, 404, "EST-10.5-LABEL", "a label that names no role: 404")
    _est_text(kit, _est(kit, "GET", f"{unknown}/cacerts"), 404, "EST-10.5-LABEL", "on every operation: 404")


@check("10", "EST-10.6-REENROLL", needs=["admin", "ca", "tls"])
def check_est_reenroll(kit: Kit) -> None:
    """Re-enrollment over mutual TLS renews; another subject is 400; none, or a removed user's, is 401."""
    username, key, certificate = _est_enrolled(kit, "est-reenroll")
    identity = (username, certificate.public_bytes(serialization.Encoding.PEM).decode(), key)
    renamed = est_body(make_csr(username, key, organization="kit"))
    exchange = _est(kit, "POST", "simplereenroll", renamed, identity=identity)
    _est_text(kit, exchange, 400, "EST-10.6-REENROLL", "a CSR whose subject is not the certificate's: 400")
    same = est_body(make_csr(username, key))
    _est_text(kit, _est(kit, "POST", "simplereenroll", same), 401, "EST-10.6-REENROLL", "no certificate: 401")
    exchange = _est(kit, "POST", "simplereenroll", same, identity=identity)
    [renewed] = _est_certificates(kit, exchange, "EST-10.6-REENROLL", "a re-enrollment with the certificate: 200")
    kit.require(
        renewed.serial_number != certificate.serial_number and renewed.subject == certificate.subject,
        "EST-10.6-REENROLL",
        "a new certificate for the same subject",
        exchange,
    )
    # The renewed certificate is the user's current one (LIFE-7.2-RENEW): it is the one that must be refused.
    identity = (username, renewed.public_bytes(serialization.Encoding.PEM).decode(), key)
    kit.admin("DELETE", f"{USERS}/{quote(username)}")
    exchange = _est(kit, "POST", "simplereenroll", same, identity=identity)
    _est_text(kit, exchange, 401, "EST-10.6-REENROLL", "the certificate of a removed user: 401")


@check("10", "EST-10.7-CSRATTRS", needs=["ca", "tls"])
def check_est_csrattrs(kit: Kit) -> None:
    """csrattrs is 204, no content."""
    exchange = _est(kit, "GET", "csrattrs")
    kit.require(exchange.status == 204 and exchange.answer == b"", "EST-10.7-CSRATTRS", "204, no content", exchange)


if __name__ == "__main__":
    sys.exit(main())

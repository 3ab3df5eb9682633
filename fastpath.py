"""The fast path: ``FastRegistry``, the reference ``registry.Registry`` with memory.

Thousands of clients poll every few seconds, each by sending its very request
again. ``registry.py`` answers each the reference way: parse the JSON, read
and verify the CSR, check the password with scrypt, write the poll's count.
``FastRegistry`` answers the same, faster, by remembering what it proved:

- a body answered 202 is answered again without being parsed, while its
  request is still the one pending (``RepeatedPolls``);
- a CSR text that verified once is not read again (a ``BoundedCache``);
- a password that matched a hash once matches it again with one HMAC
  (``PasswordVerifier``); only a success is remembered, so a wrong password
  costs what it costs in the reference, the throttle first and then scrypt
  (REG-2.4-THROTTLE: a fast path never makes a failure cheaper);
- poll counts are written with the next transaction, or once a second
  (ADMIN-4.7-POLL-STATS).

Each remembered answer is checked against the store whenever a write may have
changed its request, and passes the same throttle as the reference.
``test_fast_path.py`` drives a ``FastRegistry`` and a ``Registry`` with the same
random commands and compares every answer and the whole visible state.
``server.py`` uses this class unless started with ``--no-fast-path``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import registry
from registry import SECOND, CsrInfo, Outcome, Registration, Settings, State

DEFAULT_SETTINGS = Settings()


class BoundedCache(collections.OrderedDict):
    """A dict that forgets its oldest entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: object, value: object) -> None:
        self[key] = value
        while len(self) > self.capacity:
            self.popitem(last=False)


class PasswordVerifier:
    """Remembers passwords that verified against scrypt hashes.

    A success is remembered as the password's HMAC under a key that lives
    only in this process, so the same password's next check of the same
    hash is one HMAC. Only a success is remembered: any other password is
    not told apart here but goes the reference way, throttle then scrypt,
    so that a wrong guess never costs less (Trust before speed).
    """

    def __init__(self, capacity: int = 250_000) -> None:
        self._key = secrets.token_bytes(32)
        self._known = BoundedCache(capacity)

    def remembered(self, password: str, stored: str) -> bool:
        """Whether ``password`` is the one remembered to match ``stored``; False says nothing."""
        known = self._known.get(stored)
        return known is not None and hmac.compare_digest(known, hmac.digest(self._key, password.encode(), "sha256"))

    def remember(self, password: str, stored: str) -> None:
        """Record a password that is known to match ``stored``."""
        self._known.put(stored, hmac.digest(self._key, password.encode(), "sha256"))


@dataclass
class _Poll:
    """A body that was answered 202, known by its keyed hash: what it asked for."""

    username: str
    pairing_id: str
    requested: str  # the canonical text of the requested rights
    password: bool  # whether the body holds a password: the throttle comes first
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
        poll = _Poll(
            registration.username,
            outcome.body["pairingId"],
            registration.rights.dumps(),
            registration.password is not None,
            outcome,
        )
        self._seen.put(fingerprint, poll)


class FastRegistry(registry.Registry):
    """``registry.Registry`` with the remembered polls, passwords and CSRs, and the poll counts batched."""

    def __init__(
        self,
        database: str = ":memory:",
        *,
        clock: registry.Clock,
        roles: Mapping[str, str] | Iterable[str] = ("minimum",),
        ca: registry.CertificateAuthority | None = None,
        settings: Settings = DEFAULT_SETTINGS,
        provisioner: registry.Provisioner | None = None,
    ) -> None:
        self._passwords = PasswordVerifier()
        self._csrs = BoundedCache(settings.max_pending)
        self._repeated = RepeatedPolls(settings.max_pending)
        # Write transactions so far: a remembered poll looks at its request
        # again once this has moved.
        self._version = 0
        super().__init__(database, clock=clock, roles=roles, ca=ca, settings=settings, provisioner=provisioner)
        self._polls.period = SECOND

    def register_body(self, body: bytes, client_address: str = "") -> Outcome:
        """``Registry.register_body``; a body answered 202 before is answered again while it is still pending."""
        fingerprint = self._repeated.fingerprint(body)
        outcome = self._repeated_poll(fingerprint, client_address)
        if outcome is None:
            registration, outcome = self._register(registry.parse_json(body), client_address)
            if outcome.status is HTTPStatus.ACCEPTED:
                self._repeated.remember(fingerprint, registration, outcome)
        return outcome

    def _repeated_poll(self, fingerprint: bytes, address: str) -> Outcome | None:
        """The 202 again for a body seen before, while its request is the one pending; None: the reference way."""
        seen = self._repeated.get(fingerprint)
        if seen is None:
            return None
        now = self._now()
        with self._lock:
            if seen.checked != self._version and not self._still_pending(seen):
                return None
            if seen.created_at <= self._cutoff(now):
                return None
            if seen.password and self._throttle.wait(seen.username, address, now) is not None:
                return None  # the reference way answers 429 (REG-2.4-THROTTLE)
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

    def _inspect_text(self, text: str) -> CsrInfo:
        # The same CSR text verifies the same way: a poll pays for reading it once.
        digest = hashlib.sha256(text.encode()).digest()
        info = self._csrs.get(digest)
        if info is None:
            info = super()._inspect_text(text)
            self._csrs.put(digest, info)
        return info

    def _hash(self, password: str) -> str:
        stored = super()._hash(password)
        self._passwords.remember(password, stored)
        return stored

    def _verify(self, password: str, stored: str) -> bool:
        # Called after the throttle let the attempt through: a remembered
        # success is one HMAC; anything else is scrypt, as in the reference.
        if self._passwords.remembered(password, stored):
            return True
        if not super()._verify(password, stored):
            return False
        self._passwords.remember(password, stored)
        return True

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        self._version += 1
        with super()._writing():
            yield

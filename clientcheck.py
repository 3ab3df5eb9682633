"""A registry that tests the clients talking to it: ``server.py --test-clients`` (SPEC section 9).

As ACME's test server Pebble does for ACME clients, the registry then
varies what a correct client must cope with, and watches each client for
what it does wrong. Standard library only, and no HTTP: ``server.py`` asks
it about each registration and tells it each answer.

What it varies, at random (``Variation`` holds the odds):

- the ``Retry-After`` of every 202, 423, 429 and 503, from answer to answer;
- now and then a 429 or a 503 (with ``Retry-After``) in place of the answer;
- now and then a lost answer: the request is handled, and the connection
  closed without a word, so that the client must send it again (a 201 is
  then delivered twice);
- short unlock windows (the server's default unlock is 30 s in this mode).

What it watches, per client (its username):

- CLIENT-9.1-RETRY-AFTER: a request sooner than the ``Retry-After`` it was
  given (after a 202, a 423, a 429 or a 503);
- CLIENT-9.2-SAME-REQUEST: a changed request while its request is pending
  (the registry's 409 ``duplicate_request``);
- CLIENT-9.3-DENIED: a request again after its request was denied (403).

Each finding is one log line; ``report()`` sums them up for
``GET /api/client-registry/client-report``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger("registry.clientcheck")

# A client may be this early: clocks, schedulers and networks jitter.
TOLERANCE = 0.25
# The report is bounded, whatever clients send: the clients followed, the
# findings kept for each (the rest are counted), and the length of a name
# (a longer one is no username the registry takes, REG-2.3-USERNAME).
MAX_CLIENTS = 10_000
MAX_FINDINGS = 20
MAX_NAME = 64
# The statuses whose Retry-After a client must honour, and the range of seconds the check gives for each.
RETRY_RANGES = {
    HTTPStatus.ACCEPTED: (1, 8),
    HTTPStatus.LOCKED: (2, 15),
    HTTPStatus.TOO_MANY_REQUESTS: (1, 5),
    HTTPStatus.SERVICE_UNAVAILABLE: (1, 5),
}


@dataclass(frozen=True)
class Variation:
    """The odds of each thing the check does to a registration's answer."""

    busy: float = 0.1  # a 429 or 503 instead of the answer
    lost: float = 0.05  # the answer lost after the request was handled


@dataclass
class Finding:
    """One thing a client did wrong: when (seconds since the check began), which rule, what."""

    at: float
    rule: str
    message: str

    def to_json(self) -> dict[str, object]:
        return {"at": round(self.at, 3), "rule": self.rule, "message": self.message}


@dataclass
class Watched:
    """What the check knows of one client."""

    username: str
    address: str = ""
    requests: int = 0
    told: int = 0  # the last status it was answered
    wait_until: float = 0.0  # when it may send again: the moment of the answer plus its Retry-After
    retry_after: int = 0
    findings: list[Finding] = field(default_factory=list)
    more_findings: int = 0  # found beyond MAX_FINDINGS: counted, not kept


class ClientCheck:
    """Varies registrations' answers and watches the clients that send them; safe across threads."""

    def __init__(
        self,
        variation: Variation = Variation(),
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.variation = variation
        self._random = random.Random(seed)
        self._clock = clock
        self._began = clock()
        self._clients: dict[str, Watched] = {}
        self._varied = {"busy": 0, "lost": 0}  # how often each variation was made
        self._unfollowed = 0  # registrations of clients beyond MAX_CLIENTS
        self._lock = threading.Lock()

    def arrive(self, username: str | None, address: str) -> tuple[HTTPStatus, int] | None:
        """A registration arrives: note what its client does wrong; a (status, Retry-After) to answer instead."""
        now = self._clock()
        with self._lock:
            client = self._client(username, address)
            if client is not None:
                client.requests += 1
                if client.told == HTTPStatus.FORBIDDEN:
                    self._find(client, "CLIENT-9.3-DENIED", "sent its request again after it was denied (403)")
                elif now < client.wait_until - TOLERANCE:
                    waited = now - (client.wait_until - client.retry_after)
                    self._find(
                        client,
                        "CLIENT-9.1-RETRY-AFTER",
                        f"sent again {waited:.1f} s after a {client.told} with Retry-After: {client.retry_after}",
                    )
            if self._random.random() >= self.variation.busy:
                return None
            self._varied["busy"] += 1
            status = self._random.choice([HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE])
            retry_after = self._random.randint(*RETRY_RANGES[status])
            if client is not None:
                self._told(client, status, retry_after, now)
            return status, retry_after

    def answered(self, username: str | None, address: str, status: int, error: str | None) -> tuple[int | None, bool]:
        """The registry's answer to a registration: its Retry-After as varied (or None), and whether to lose it."""
        now = self._clock()
        with self._lock:
            client = self._client(username, address)
            retry_range = RETRY_RANGES.get(HTTPStatus(status))
            retry_after = None if retry_range is None else self._random.randint(*retry_range)
            lost = status in (HTTPStatus.CREATED, HTTPStatus.ACCEPTED) and self._random.random() < self.variation.lost
            self._varied["lost"] += lost
            if client is not None:
                if error == "duplicate_request":
                    self._find(client, "CLIENT-9.2-SAME-REQUEST", "changed its request while one was stored (409)")
                # CLIENT-9.4-LOST-ANSWER: a lost answer told the client nothing: it may send again at once.
                self._told(client, 0 if lost else status, 0 if lost else retry_after or 0, now)
            return retry_after, lost

    def report(self) -> dict[str, object]:
        """Every client seen, with its findings; ``clean`` when no client did anything wrong; what was varied."""
        with self._lock:
            clients = [
                {
                    "username": client.username,
                    "address": client.address,
                    "requests": client.requests,
                    "findings": [finding.to_json() for finding in client.findings],
                    "moreFindings": client.more_findings,
                }
                for client in sorted(self._clients.values(), key=lambda client: client.username)
            ]
            varied, unfollowed = dict(self._varied), self._unfollowed
        clean = not any(client["findings"] for client in clients)
        return {"clean": clean, "clients": clients, "varied": varied, "unfollowed": unfollowed}

    def _client(self, username: str | None, address: str) -> Watched | None:
        if username is None or len(username) > MAX_NAME:  # a body with no username: nothing to follow
            return None
        client = self._clients.get(username)
        if client is None:
            if len(self._clients) >= MAX_CLIENTS:
                self._unfollowed += 1
                return None
            client = self._clients[username] = Watched(username)
        client.address = address
        return client

    def _told(self, client: Watched, status: int, retry_after: int, now: float) -> None:
        client.told, client.retry_after, client.wait_until = status, retry_after, now + retry_after

    def _find(self, client: Watched, rule: str, message: str) -> None:
        if len(client.findings) >= MAX_FINDINGS:
            client.more_findings += 1
            return
        finding = Finding(self._clock() - self._began, rule, message)
        client.findings.append(finding)
        log.warning("client %s at %s %s (%s)", client.username, client.address, message, rule)

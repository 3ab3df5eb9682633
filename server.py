"""The registry over HTTPS: a thin ``http.server`` adapter over registry.py.

``App`` maps a parsed request to a response through the route table; the
``Handler`` does the socket work: it reads a request, asks the app, writes
the answer. Every refusal, the core's and the HTTP reader's, is a
``registry.RegistryError`` that becomes a response in one place
(``error_response``); anything unexpected is a 500 with no internals in it.

Run ``python3 server.py --help`` for the settings.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import ca as ca_module
import clientcheck
import files
import openapi
import registry

log = logging.getLogger("registry.server")
access_logger = logging.getLogger("registry.access")


JSON = "application/json"
PEM = "application/x-pem-file"
PKIX_CRL = "application/pkix-crl"  # RFC 2585 section 4.2
TEST_UNLOCK = timedelta(seconds=30)  # the longest unlock window under --test-clients
CRL_CHECK_SECONDS = 60.0  # how often the server asks whether the CRL is due to be signed again
STATIC = Path(__file__).with_name("static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
# The page runs only its own script and style, and no one may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# SPEC HTTP-8.6-SECURITY-HEADERS: no answer is sniffed into another type, and
# a browser that reached the registry over HTTPS keeps to HTTPS (RFC 6797).
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
HSTS = {"Strict-Transport-Security": "max-age=31536000"}
# The poll statistics (SPEC ADMIN-4.7-POLL-STATS), which ?polls=omit leaves out of the requests listing.
POLL_STATISTICS = ("lastPollAt", "pollCount", "clientAddress")
DRAINABLE = 1 << 20  # an over-long body up to this size is read and dropped, keeping the connection
LINGER_SECONDS = 1.0  # how long a closing connection reads what the client still sends
ACCESS_LOG_SECONDS = 0.2  # the longest an access line waits to be written
MAX_LINE = 65536  # the longest request line or header line, as http.server has it
MAX_HEADERS = 100  # as http.client has it
# RFC 9112 section 3: method SP request-target SP HTTP-version, one SP
# each; a method is a token (RFC 9110 section 9.1), a target visible ASCII
# (RFC 3986 section 2), a version one digit, a dot and one digit (RFC 9112
# section 2.3).
REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([!-~]+) HTTP/([0-9])\.([0-9])\r?\n")
# RFC 9112 section 5: field-name ":" OWS field-value OWS; no space before the
# colon (section 5.1), and a value of visible characters, obs-text, spaces and
# tabs (RFC 9110 section 5.5): no CR, LF, NUL or other control character.
HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\r?\n")
FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# RFC 9110 section 7.2: Host = uri-host [ ":" port ], uri-host an IP literal
# or a reg-name (RFC 3986 section 3.2.2), which an IPv4 address also reads as.
HOST = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")
# RFC 9110 section 9.3 defines these, RFC 5789 PATCH: a known method on a
# path that does not take it is 405, any other method 501 (section 15.6.2).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# Mozilla's "intermediate" TLS 1.2 suites: ECDHE, then AEAD only (no CBC).
# TLS 1.3 has its own suites, all AEAD, which set_ciphers leaves alone.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


@dataclass(frozen=True)
class Config:
    """The server's settings: each is a command-line flag but ``scrypt_n`` (tests lower it) and ``token_source``."""

    host: str = "127.0.0.1"
    port: int = 8443
    data_dir: Path = Path("registry-data")
    http: bool = False
    server_names: tuple[str, ...] = ()
    admin_token: str | None = None
    token_source: str = ""  # where a given token came from: "--admin-token" or "$REGISTRY_ADMIN_TOKEN"
    unlock_minutes: float = 5
    retry_after: int = 5
    retry_after_locked: int = 30
    cert_days: int = 365
    crl_days: float = 7
    roles: Path | None = None
    max_body: int = 64 * 1024
    retention_hours: float = 24
    timeout: float = 10
    max_connections: int = 256
    max_connections_per_address: int = 32
    rate_limit: int = 0
    max_pending: int = 100_000
    log_level: str = "INFO"
    scrypt_n: int = 2**14
    fast_http: bool = True
    backup: Path | None = None  # --backup DEST: copy the data folder there instead of serving
    test_clients: bool = False  # vary the answers to registrations and report what clients do wrong


@dataclass(frozen=True)
class Request:
    """What the handler read: enough for any route."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # by lower-case name
    body: bytes = b""
    client_address: str = ""
    peer_certificate: bytes | None = None


@dataclass(frozen=True)
class Response:
    """What the handler writes."""

    status: HTTPStatus
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    lost: bool = False  # --test-clients: close the connection instead of answering

    @classmethod
    def json(cls, status: HTTPStatus, data: object, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(data).encode(), JSON, headers or {})


def error_response(error: Exception, context: str = "") -> Response:
    """The one place where an error becomes an answer: a refusal by its status and code, anything else a 500."""
    if isinstance(error, registry.RegistryError):
        return Response.json(error.status, error.body(), error.headers)
    log.error("unexpected error %s", context, exc_info=error)
    return Response.json(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        {"error": "internal_error", "message": "the server failed to answer; the error is in its log"},
    )


@dataclass(frozen=True)
class Route:
    """One line of the route table: who may call it and what it answers."""

    method: str
    pattern: str
    handler: str
    access: str  # "public", "admin", "client" (password or certificate) or "certificate"
    summary: str
    statuses: tuple[int, ...] = (200,)

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


ROUTES = (
    Route("POST", "/api/client-registry/register", "register", "public", "Ask to be registered, or poll",
          (201, 202, 400, 403, 409, 413, 422, 423, 429, 503)),
    Route("GET", "/api/client-registry", "status", "admin", "The lock state and the pending count"),
    Route("POST", "/api/client-registry/unlock", "unlock", "admin", "Open the registry for new requests", (200, 400)),
    Route("POST", "/api/client-registry/lock", "lock", "admin", "Close the registry at once"),
    Route("GET", "/api/client-registry/requests", "requests", "admin", "Every stored request", (200, 304, 400)),
    Route("POST", "/api/client-registry/requests/{username}/approve", "approve", "admin",
          "Approve a pending request, optionally granting other rights", (200, 400, 404, 409, 422)),
    Route("POST", "/api/client-registry/requests/{username}/deny", "deny", "admin",
          "Deny a pending request", (200, 400, 404, 409)),
    Route("DELETE", "/api/client-registry/requests/{username}", "forget", "admin",
          "Forget a pending or denied request", (200, 404, 409)),
    Route("GET", "/api/client-registry/sign-in", "sign_in", "public",
          "Where the administrator token is kept, for the page's sign-in"),
    Route("GET", "/api/client-registry/roles", "roles", "admin", "The role catalog"),
    Route("GET", "/api/client-registry/audit", "audit", "admin", "The audit trail, newest first", (200, 400)),
    Route("GET", "/api/users", "users", "admin", "Every registered user", (200, 304)),
    Route("DELETE", "/api/users/{username}", "remove_user", "admin",
          "Remove a user and its request", (200, 404)),
    Route("GET", "/api/client-registry/ca", "ca", "public", "The CA certificate (PEM)", (200, 404)),
    Route("GET", "/api/client-registry/crl", "crl", "public", "The CA's current CRL (DER)", (200, 404)),
    Route("GET", "/api/client-registry/crl.pem", "crl_pem", "public", "The CA's current CRL (PEM)", (200, 404)),
    Route("POST", "/api/client-registry/renew", "renew", "certificate",
          "Renew or re-key the client certificate presented over mutual TLS", (201, 400, 401, 422, 503)),
    Route("GET", "/api/auth/whoami", "whoami", "client",
          "Who the caller is, by HTTP Basic or by its client certificate", (200, 401, 429)),
    Route("GET", "/api/client-registry/client-report", "client_report", "admin",
          "What each client did wrong (a server started with --test-clients)", (200, 404)),
    Route("GET", "/api/openapi.json", "openapi", "public", "This API as an OpenAPI 3.1 document"),
    Route("GET", "/", "page", "public", "The administrator's page (HTML)", (200, 404)),
    Route("GET", "/admin", "page", "public", "The administrator's page (HTML)", (200, 404)),
    Route("GET", "/static/{name}", "static", "public", "The page's script and style", (200, 404)),
)  # fmt: skip


class App:
    """The HTTP face of a ``registry.Registry``: routes, authentication, JSON."""

    def __init__(
        self,
        core: registry.Registry,
        admin_token: str,
        *,
        max_body: int = 64 * 1024,
        check: clientcheck.ClientCheck | None = None,
        token_kept: dict[str, str | None] | None = None,
    ) -> None:
        self.core = core
        # SPEC ADMIN-4.9-PAGE-FIELDS: where the token is kept, for the page's sign-in hint.
        self.token_kept = token_kept or {"tokenFrom": "file", "file": None}
        self.max_body = max_body
        self.check = check  # --test-clients: registrations varied, their clients watched
        self._token = admin_token.encode()
        self._routes = [(route, route.regex) for route in ROUTES]

    def handle(self, request: Request) -> Response:
        """Answer one request; what goes wrong is answered by ``error_response``."""
        try:
            route, arguments = self._route(request)
            if route.access == "admin":
                self._authorize(request)
            if self.check is not None and route.handler == "register":
                return self._checked_register(request)
            return getattr(self, route.handler)(request, **arguments)
        except Exception as error:
            return error_response(error, f"in {request.method} {request.path}")

    def _route(self, request: Request) -> tuple[Route, dict[str, str]]:
        if request.method not in KNOWN_METHODS:
            raise UnknownMethod(f"{request.method} is not a method this server knows")
        allowed = []
        # RFC 9110 section 9.3.2: HEAD is GET without the body.
        method = "GET" if request.method == "HEAD" else request.method
        for route, regex in self._routes:
            found = regex.match(request.path)
            if found:
                if route.method == method:
                    return route, {k: unquote(v) for k, v in found.groupdict().items()}
                allowed += ["GET", "HEAD"] if route.method == "GET" else [route.method]
        if allowed:
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}: use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise registry.NotFound(f"there is nothing at {request.path}")

    def _authorize(self, request: Request) -> None:
        scheme, token = _credentials(request)
        # Compare in constant time, so the token cannot be guessed byte by byte.
        if scheme != "bearer" or not hmac.compare_digest(token.encode("latin-1"), self._token):
            raise registry.Unauthorized(
                "send the administrator token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="client-registry"'},
            )

    # --- Handlers: parse, call the core, serialize ------------------------

    def _checked_register(self, request: Request) -> Response:
        """A registration under ``--test-clients``: as the check varies its answer, its client watched."""
        assert self.check is not None
        username, address = _username_of(request.body), request.client_address
        busy = self.check.arrive(username, address)
        if busy is not None:
            status, _ = busy
            code = "too_many_requests" if status == HTTPStatus.TOO_MANY_REQUESTS else "service_unavailable"
            message = "the registry is busy (it tests its clients: --test-clients): try again after Retry-After"
            response = Response.json(status, {"error": code, "message": message})
        else:
            try:
                response = self.register(request)
            except registry.RegistryError as error:
                response = error_response(error)
        error = json.loads(response.body).get("error") if response.status >= 400 else None
        retry_after, lost = self.check.answered(username, address, response.status, error)
        if busy is not None:
            retry_after = busy[1]
        headers = response.headers | ({"Retry-After": str(retry_after)} if retry_after is not None else {})
        return dataclasses.replace(response, headers=headers, lost=lost)

    def client_report(self, request: Request) -> Response:
        if self.check is None:
            raise registry.NotFound("this server tests no clients: start it with --test-clients")
        return Response.json(HTTPStatus.OK, self.check.report())

    def register(self, request: Request) -> Response:
        outcome = self.core.register_body(request.body, request.client_address)
        return Response(outcome.status, outcome.content, JSON, outcome.headers)

    def status(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.core.status())

    def unlock(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.core.unlock(_json_body(request), **_actor(request)))

    def lock(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.core.lock(**_actor(request)))

    def requests(self, request: Request) -> Response:
        listing = self.core.requests()
        # SPEC ADMIN-4.9-PAGE-FIELDS: without what every poll changes, the
        # listing's ETag changes with decisions and arrivals only.
        polls = request.query.get("polls", ["include"])[-1]
        if polls not in ("include", "omit"):
            raise registry.MalformedRequest("'polls' must be 'include' or 'omit'")
        if polls == "omit":
            listing = [{k: v for k, v in entry.items() if k not in POLL_STATISTICS} for entry in listing]
        return _validated(request, listing)

    def approve(self, request: Request, username: str) -> Response:
        user = self.core.approve(username, _json_body(request), **_actor(request))
        return Response.json(HTTPStatus.OK, user)

    def deny(self, request: Request, username: str) -> Response:
        decided = self.core.deny(username, _json_body(request), **_actor(request))
        return Response.json(HTTPStatus.OK, decided)

    def forget(self, request: Request, username: str) -> Response:
        self.core.forget(username, **_actor(request))
        return Response.json(HTTPStatus.OK, {"status": "forgotten", "username": username})

    def sign_in(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.token_kept)

    def roles(self, request: Request) -> Response:
        catalog = [{"name": name, "description": text} for name, text in self.core.roles.items()]
        return Response.json(HTTPStatus.OK, catalog)

    def audit(self, request: Request) -> Response:
        limit = _query_int(request, "limit", 100, 1, 1000)
        before = _query_int(request, "before", None, 1, openapi.AUDIT_LARGEST_ID)
        return Response.json(HTTPStatus.OK, self.core.audit(limit, before))

    def users(self, request: Request) -> Response:
        return _validated(request, self.core.users())

    def remove_user(self, request: Request, username: str) -> Response:
        self.core.remove_user(username, **_actor(request))
        return Response.json(HTTPStatus.OK, {"status": "removed", "username": username})

    def ca(self, request: Request) -> Response:
        if self.core.ca is None:
            raise registry.NotFound("this registry has no CA")
        return Response(HTTPStatus.OK, self.core.ca.certificate_pem.encode(), PEM)

    def crl(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, self.core.crl(), PKIX_CRL)

    def crl_pem(self, request: Request) -> Response:
        # RFC 7468 section 5: a CRL's PEM label.
        lines = textwrap.wrap(base64.b64encode(self.core.crl()).decode(), 64)
        text = "\n".join(["-----BEGIN X509 CRL-----", *lines, "-----END X509 CRL-----", ""])
        return Response(HTTPStatus.OK, text.encode(), PEM)

    def renew(self, request: Request) -> Response:
        outcome = self.core.renew(request.peer_certificate, _json_body(request), address=request.client_address)
        return Response(outcome.status, outcome.content, JSON, outcome.headers)

    def whoami(self, request: Request) -> Response:
        if request.peer_certificate:
            identity = self.core.authenticate_certificate(request.peer_certificate)
        else:
            identity = self.core.authenticate_password(*_basic_credentials(request), request.client_address)
        return Response.json(HTTPStatus.OK, identity.to_json())

    def page(self, request: Request) -> Response:
        return self.static(request, "admin.html")

    def static(self, request: Request, name: str) -> Response:
        path = STATIC / name
        kind = STATIC_TYPES.get(path.suffix)
        if kind is None or "/" in name or name.startswith(".") or not path.is_file():
            raise registry.NotFound(f"there is no file {name!r}")
        return Response(HTTPStatus.OK, path.read_bytes(), kind, PAGE_HEADERS)

    def openapi(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, openapi.document(ROUTES))


class MethodNotAllowed(registry.RegistryError):
    """A known path, another method (405); ``Allow`` lists the methods it takes."""

    status, code = HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed"


class UnknownMethod(registry.RegistryError):
    """A method the server does not recognise (501, RFC 9110 section 15.6.2)."""

    status, code = HTTPStatus.NOT_IMPLEMENTED, "not_implemented"


class PayloadTooLarge(registry.RegistryError):
    """A body over the limit (413), refused before it is parsed."""

    status, code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "payload_too_large"


class BadFraming(registry.RegistryError):
    """Bytes that HTTP/1.1 does not read as a request (RFC 9112): the answer closes the connection."""

    status, code = HTTPStatus.BAD_REQUEST, "bad_framing"


class LengthRequired(BadFraming):
    """A chunked body (411): this server reads a body by its Content-Length only."""

    status = HTTPStatus.LENGTH_REQUIRED


class UriTooLong(BadFraming):
    """A request line over ``MAX_LINE`` (414)."""

    status, code = HTTPStatus.REQUEST_URI_TOO_LONG, "uri_too_long"


class HeadersTooLarge(BadFraming):
    """A header line over ``MAX_LINE``, or over ``MAX_HEADERS`` lines (431)."""

    status, code = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request_header_fields_too_large"


class VersionNotSupported(BadFraming):
    """HTTP/2 or later on an HTTP/1.1 connection (505, RFC 9110 section 15.6.6)."""

    status, code = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "http_version_not_supported"


# http.server's own refusals (send_error), as the errors above.
REFUSALS = {error.status: error for error in (BadFraming, HeadersTooLarge, UriTooLong, VersionNotSupported)}


def _json_body(request: Request) -> Any:
    """An optional body as JSON; None when there is none. A body that is there is an object (JSON's null is not).

    White space alone is a body, and not JSON (RFC 8259 section 2): 400, as for a registration.
    """
    if not request.body:
        return None
    body = registry.parse_json(request.body)
    if body is None:
        raise registry.MalformedRequest("the body must be a JSON object, or empty")
    return body


def _validated(request: Request, data: object) -> Response:
    """A listing with its ETag (RFC 9110 section 8.8.3), or 304 when the client holds it already (section 13.1.2).

    The administrator's page asks every few seconds; a list that has not
    changed costs one hash, and the page nothing.
    """
    response = Response.json(HTTPStatus.OK, data)
    tag = f'"{hashlib.sha256(response.body).hexdigest()[:32]}"'
    held = {candidate.strip() for candidate in request.headers.get("if-none-match", "").split(",")}
    if tag in held or "*" in held:
        return Response(HTTPStatus.NOT_MODIFIED, b"", JSON, {"ETag": tag})
    return Response(response.status, response.body, JSON, {"ETag": tag})


def _username_of(body: bytes) -> str | None:
    """The username a registration names, if its body is a JSON object with one."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    name = payload.get("username") if isinstance(payload, dict) else None
    return name if isinstance(name, str) else None


def _is_number(text: str) -> bool:
    """Only ASCII digits: str.isdigit also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _actor(request: Request) -> dict[str, str]:
    return {"actor": registry.ADMIN, "address": request.client_address}


def _query_int(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    values = request.query.get(name)
    if not values:
        return default
    if not _is_number(values[-1]) or not low <= int(values[-1]) <= high:
        raise registry.MalformedRequest(f"'{name}' must be a whole number from {low} to {high}")
    return int(values[-1])


def _credentials(request: Request) -> tuple[str, str]:
    """The Authorization header as (scheme in lower case, credentials).

    RFC 9110 section 11.4: credentials = auth-scheme [ 1*SP ... ]. Only
    spaces part the two, and the header reader has already cut the
    spaces and tabs around the value (section 5.6.3); any other character,
    a no-break space or a vertical tab, is part of the credentials.
    """
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower(), credentials.lstrip(" ")


def _basic_credentials(request: Request) -> tuple[str, str]:
    scheme, encoded = _credentials(request)
    challenge = {"WWW-Authenticate": 'Basic realm="client-registry"'}
    if scheme != "basic":
        raise registry.Unauthorized("authenticate with HTTP Basic or your client certificate", headers=challenge)
    try:
        username, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except ValueError:  # not base64, not ASCII, not UTF-8
        raise registry.Unauthorized("the Basic credentials are not base64 of 'username:password'") from None
    if not colon:
        raise registry.Unauthorized("the Basic credentials are not base64 of 'username:password'")
    return username, password


# --- Sockets --------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Reads one request at a time off a connection and writes the app's answer."""

    protocol_version = "HTTP/1.1"
    server: RegistryServer
    # An answer leaves in one segment, at once: no wait for the client's
    # delayed acknowledgement (Nagle's algorithm, RFC 896).
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def setup(self) -> None:
        super().setup()
        # Read once, after the handshake: a TLS connection that its client
        # has closed halfway through a request can no longer tell it.
        self.peer_certificate = _peer_certificate(self.connection)

    def handle_one_request(self) -> None:
        """Read a request, answer it and log the answer: every answer, a refusal too, leaves here."""
        # A whole request, from its first byte to its last, arrives within
        # the timeout: a client trickling a byte a second cannot hold a thread.
        self.server.watchdog.arm(self.connection, self.server.config.timeout)
        started = time.perf_counter()
        self.command = self.path = None
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        try:
            request = self._read_request()
        except registry.RegistryError as refusal:
            if isinstance(refusal, BadFraming):  # what follows on the connection cannot be told apart
                self.close_connection = True
            response = error_response(refusal)
        else:
            self.server.watchdog.arm(self.connection, None)  # the answer is ours to make
            response = self.server.app.handle(request)
        if response.lost:
            self.close_connection = True
        else:
            self._write(response)
        if access_logger.isEnabledFor(logging.INFO):
            elapsed = (time.perf_counter() - started) * 1000
            path = (self.path or "-").partition("?")[0]
            status = f"{response.status} lost" if response.lost else response.status
            self.server.access_log.write(
                f"{self.command or '-'} {path} {status} {elapsed:.1f}ms {self.client_address[0]}"
            )

    def _read_request(self) -> Request:
        """The request, read whole: its head by ``parse_request``, its body by its Content-Length."""
        if len(self.raw_requestline) > MAX_LINE:
            raise UriTooLong(f"the request line has over {MAX_LINE} bytes")
        self.parse_request()
        _check_host(self.headers, self.request_version)
        length = _body_length(self.headers)
        if length > self.server.app.max_body:
            # SPEC section 2.1: answered without being parsed. A body of
            # moderate size is read and dropped, so the client sees the 413.
            if length <= DRAINABLE:
                self._drain(length)
            else:
                self.close_connection = True
            raise PayloadTooLarge(f"the body has {length} bytes; at most {self.server.app.max_body} are read")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client stopped sending: an aborted request
            raise BadFraming(f"the body ended after {len(body)} of the {length} bytes of its Content-Length")
        url = urlsplit(self.path)
        return Request(
            method=self.command,
            path=url.path,
            # An empty ?limit= is a value, to be refused as one, not a missing parameter.
            query=parse_qs(url.query, keep_blank_values=True) if url.query else {},
            headers=self.headers,
            body=body,
            client_address=self.client_address[0],
            peer_certificate=self.peer_certificate,
        )

    def parse_request(self) -> bool:
        """The request line and the headers into ``command``, ``path``, ``request_version`` and ``headers``.

        ``headers`` is a dict by lower-case name. With ``Config.fast_http``
        (the default) ``_read_head`` reads them; without it, http.server's
        own parse_request, the reference that test_http_parsing.py holds the
        fast reader to. Either raises ``BadFraming`` for a head it refuses.
        """
        if self.raw_requestline in (b"\r\n", b"\n"):  # RFC 9112 section 2.2: an empty line before a request is ignored
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if self.server.config.fast_http:
            self._read_head()
        else:
            self._read_head_by_http_server()
        return True

    def _read_head(self) -> None:
        """The fast reader: http.server's work without the email package, and stricter.

        http.server's own parse_request hands the headers to the email
        package, which costs as much as the rest of a poll. This reads them
        as plain lines into a dict, under http.server's limits, and refuses
        what RFC 9112 says to refuse: a request line or a header line off
        the grammar (REQUEST_LINE, HEADER_LINE), a version other than 1.x
        (505), space before a colon, a folded line.
        """
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        text = self.raw_requestline.decode("latin-1")
        self.requestline = text.rstrip("\r\n")
        line = REQUEST_LINE.fullmatch(text)
        if line is None:
            raise BadFraming("the request line is not a method, a path and a version, one space apart")
        method, target, major, minor = line.groups()
        if major != "1":
            raise VersionNotSupported(f"HTTP/{major}.{minor} is not served: use 1.x")
        # A target of '//host/...' would read as an authority (RFC 3986 section 4.2).
        self.command, self.path = method, "/" + target.lstrip("/") if target.startswith("//") else target
        self.request_version = f"HTTP/1.{minor}"
        self.close_connection = minor == "0"
        self.headers = headers = self._read_headers()
        connection = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        if "close" in connection:
            self.close_connection = True
        elif "keep-alive" in connection:
            self.close_connection = False
        if headers.get("expect", "").lower() == "100-continue" and minor != "0":
            self.handle_expect_100()

    def _read_headers(self) -> dict[str, str]:
        """The header lines up to the empty one; a field sent twice has its values joined (RFC 9110 section 5.3)."""
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            raw = self.rfile.readline(MAX_LINE + 1)
            if len(raw) > MAX_LINE:
                raise HeadersTooLarge(f"a header line has over {MAX_LINE} bytes")
            if raw in (b"\r\n", b"\n", b""):
                return headers
            found = HEADER_LINE.fullmatch(raw.decode("latin-1"))
            if found is None:
                raise BadFraming("a header line is not 'Name: value' (RFC 9112 section 5)")
            name, value = found[1].lower(), found[2]
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise HeadersTooLarge(f"there are more than {MAX_HEADERS} headers")

    def _read_head_by_http_server(self) -> None:
        """http.server's own reading, its refusals raised (``send_error``), its headers as the fast reader's dict."""
        if not super().parse_request():  # an empty request line, which it leaves unanswered
            raise BadFraming("the request line is empty")
        message = self.headers
        # A line the email package cannot read as a field ends the headers
        # there, and the lines after it would be lost without a word.
        if message.defects or message.get_payload():
            raise BadFraming("a header line is not 'Name: value' (RFC 9112 section 5)")
        headers: dict[str, str] = {}
        for name, value in message.items():
            # RFC 9112 section 5: the spaces after a value are not part of it.
            name, value = name.lower(), value.rstrip(" \t")
            # It keeps a folded line's CR LF and any control character: the
            # rules of FIELD_VALUE hold whichever reader read the line.
            if not FIELD_VALUE.fullmatch(value):
                raise BadFraming(f"the {name} header has a control character or a folded line (RFC 9110 section 5.5)")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's refusals (in its parse_request), raised as this module's errors."""
        raise REFUSALS.get(code, BadFraming)(message or HTTPStatus(code).phrase)

    def handle_expect_100(self) -> bool:
        super().handle_expect_100()
        self.wfile.flush()  # the 100 leaves now, not with the answer (wbufsize)
        return True

    def finish(self) -> None:
        self.server.watchdog.forget(self.connection)
        super().finish()

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)

    def _write(self, response: Response) -> None:
        self.server.watchdog.arm(self.connection, self.server.config.timeout)
        status = HTTPStatus(response.status)
        headers = {"Date": http_date(), "Content-Type": response.content_type, "Content-Length": len(response.body)}
        if status is HTTPStatus.NOT_MODIFIED:
            headers = {"Date": headers["Date"]}  # RFC 9110 section 15.4.5: no content, and no length of none
        headers |= {"Cache-Control": "no-store", **NOSNIFF, **response.headers}
        if self.server.tls is not None:
            headers |= HSTS
        if self.close_connection:
            headers["Connection"] = "close"
        # The status line and the headers in one piece, as send_response_only
        # and send_header would make them, and the body in the same write.
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.wfile.write((head + "\r\n").encode("latin-1") + (b"" if self.command == "HEAD" else response.body))
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: " + format, self.client_address[0], *args)


class Every:
    """Calls ``action`` every ``period`` seconds from a thread of its own, until stopped.

    SPEC section 7: a running registry never serves an expired CRL, so a
    timer, not a request, asks the core to sign a new one when it is due.
    """

    def __init__(self, period: float, action: Callable[[], None], name: str) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period, action), name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self, period: float, action: Callable[[], None]) -> None:
        while not self._stopped.wait(period):
            try:
                action()
            except Exception:  # a full disk, say: the next period tries again
                log.exception("%s failed; trying again in %.0f s", getattr(action, "__name__", action), period)


class Watchdog:
    """Shuts the connections whose deadline has passed, from a thread of its own.

    Socket timeouts would do it too, but a socket with a timeout polls before
    every send and recv (CPython's ``sock_call``): a system call and a hand-off
    of the GIL each time, a third of what a poll costs. One look a fraction of
    a second costs nothing per request.
    """

    def __init__(self, period: float) -> None:
        self._deadlines: dict[socket.socket, float] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(period,), name="watchdog", daemon=True)
        self._thread.start()

    def arm(self, connection: socket.socket, seconds: float | None) -> None:
        """Shut ``connection`` unless it is armed again within ``seconds`` (None: never)."""
        self._deadlines[connection] = math.inf if seconds is None else time.monotonic() + seconds

    def forget(self, connection: socket.socket) -> None:
        self._deadlines.pop(connection, None)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self, period: float) -> None:
        while not self._stopped.wait(period):
            now = time.monotonic()
            for connection, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    self.forget(connection)
                    log.debug("closing a connection that took too long: %s", connection)
                    # The plain socket's shutdown, even for TLS (SSLSocket's would
                    # drop its state under the handler): the blocked read ends.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(connection, socket.SHUT_RDWR)


class AccessLog:
    """One line a request on standard error, as http.server writes its own log, a batch at a time.

    Not through ``logging``: a record costs about 30 microseconds, a third of
    a whole poll. Nor a write a line: with every connection's thread writing,
    that is a sixth of a poll. As nginx's ``access_log ... buffer= flush=``
    does, lines wait in memory and leave together, at most ``period``
    seconds later; a killed server may lose that much of its access log,
    never a request. The lines have the shape of the other log lines, and
    the ``registry.access`` logger's level turns them on and off.
    """

    def __init__(self, period: float) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._flush_every, args=(period,), name="access-log", daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        now = time.time()
        self._lines.append(f"{_per_second(int(now)).local},{int(now % 1 * 1000):03d} INFO {text}\n")

    def flush(self) -> None:
        lines = [self._lines.popleft() for _ in range(len(self._lines))]
        # A closed standard error loses the lines, not the server.
        with contextlib.suppress(OSError, ValueError):
            if lines:
                sys.stderr.write("".join(lines))
                sys.stderr.flush()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.flush()

    def _flush_every(self, period: float) -> None:
        while not self._stopped.wait(period):
            self.flush()


def http_date() -> str:
    """The Date header (RFC 9110 section 6.6.1)."""
    return _per_second(int(time.time())).http


@functools.lru_cache(maxsize=2)
def _per_second(second: int) -> types.SimpleNamespace:
    """The texts of a second, made once: the Date header and the log's local time."""
    return types.SimpleNamespace(
        http=email.utils.formatdate(second, usegmt=True),
        local=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)),
    )


def _check_host(headers: Mapping[str, str], version: str) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request has one Host line, and a Host is one host and port (else 400)."""
    host = headers.get("host")
    if host is None and version != "HTTP/1.0":
        raise BadFraming("an HTTP/1.1 request names its host in a Host header")
    # Two Host lines are joined with ", ", which no host has.
    if host is not None and not HOST.fullmatch(host):
        raise BadFraming("the Host header is not one host[:port]")


def _body_length(headers: Mapping[str, str]) -> int:
    """The body's length by RFC 9112 section 6.3: its Content-Length, or none; never a transfer coding."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        # Section 6.3: a request whose last coding is not chunked has no
        # length (400, and close); a chunked one this server does not read
        # (411: send a Content-Length). Both close the connection.
        if coding.rpartition(",")[2].partition(";")[0].strip().lower() == "chunked":
            raise LengthRequired("send the body with a Content-Length, not chunked")
        raise BadFraming(f"a Transfer-Encoding of {coding!r} leaves the length of the body unknown")
    text = headers.get("content-length", "0")
    if not _is_number(text):
        raise BadFraming("the Content-Length is not a whole number")
    return int(text)


def _peer_certificate(connection: socket.socket) -> bytes | None:
    if isinstance(connection, ssl.SSLSocket):
        return connection.getpeercert(binary_form=True)
    return None


class RegistryServer(ThreadingHTTPServer):
    """A threading HTTP(S) server: the TLS handshake happens in each connection's thread."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: Config, app: App, tls: ssl.SSLContext | None) -> None:
        self.config = config
        self.app = app
        self.tls = tls
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._held: collections.Counter[str] = collections.Counter()  # open connections by client address
        self._held_lock = threading.Lock()
        self.refused: collections.Counter[str] = collections.Counter()  # connections closed unserved, by address
        self.watchdog = Watchdog(min(0.5, config.timeout / 4))
        self.access_log = AccessLog(ACCESS_LOG_SECONDS)
        self.crl_timer = Every(CRL_CHECK_SECONDS, app.core.refresh_crl, "crl")
        super().__init__((config.host, config.port), Handler)

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.stop()
        self.access_log.close()
        self.crl_timer.stop()

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread a connection, no more threads than slots, and no more
        # slots for one address than its cap (as nginx's limit_conn): one
        # client holding its cap leaves the others room.
        address = client_address[0]
        with self._held_lock:
            if self._held[address] >= self.config.max_connections_per_address:
                refusal = f"it holds {self.config.max_connections_per_address}, its most"
            elif not self._slots.acquire(blocking=False):
                refusal = f"{self.config.max_connections} are open, the most"
            else:
                refusal = None
                self._held[address] += 1
            if refusal:
                self.refused[address] += 1
                refused_so_far = self.refused[address]
        if refusal:
            log.warning("closing a connection from %s unserved: %s (%d so far)", address, refusal, refused_so_far)
            self.close_request(request)
            return
        super().process_request(request, client_address)

    def connections_from(self, address: str) -> int:
        """How many connections ``address`` holds open now."""
        with self._held_lock:
            return self._held[address]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            with self._held_lock:
                self._held[client_address[0]] -= 1
                if not self._held[client_address[0]]:
                    del self._held[client_address[0]]

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake in this thread, under the watchdog: a client that
        # never finishes it cannot hold the thread.
        connection = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            self.watchdog.arm(connection, self.config.timeout)
            try:
                connection.do_handshake()
            except OSError as error:  # ssl.SSLError is one
                log.debug("TLS handshake with %s failed: %s", client_address[0], error)
                if getattr(error, "reason", None) == "HTTP_REQUEST":
                    self._refuse_plain_http(connection)
                return
            super().finish_request(connection, client_address)
        finally:
            self.watchdog.forget(connection)
            self.shutdown_request(connection)

    def _refuse_plain_http(self, connection: socket.socket) -> None:
        """Answer a plain HTTP request on the TLS port in plain HTTP, as nginx does: the scheme is wrong."""
        host, port = self.server_address[:2]
        message = f"this server speaks HTTPS: send the request to https://{host}:{port}, not http://"
        body = json.dumps({"error": "https_required", "message": message}).encode()
        head = f"HTTP/1.1 400 Bad Request\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
        with contextlib.suppress(OSError):  # the plain socket under the TLS one, as the watchdog's shutdown
            socket.socket.sendall(connection, (head + "Connection: close\r\n\r\n").encode() + body)

    def shutdown_request(self, request: Any) -> None:
        # RFC 9112 section 9.6: close in stages. Input the handler left unread
        # (a refused body) would otherwise reset the connection, and the
        # client would lose the answer sent just before.
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER_SECONDS)
            deadline, left = time.monotonic() + LINGER_SECONDS, DRAINABLE
            while left > 0 and time.monotonic() < deadline and (chunk := request.recv(65536)):
                left -= len(chunk)
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away or timed out
            log.debug("connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("error on the connection from %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'http' if self.tls is None else 'https'}://{host}:{port}"


# --- Start ------------------------------------------------------------------


def build(config: Config, clock: registry.Clock = lambda: datetime.now(UTC)) -> RegistryServer:
    """Check what can be checked, open the data folder (creating what is missing), and bind the server.

    A mistake in the settings, a port in use or a damaged database stops it
    before anything is made, with ``OSError`` or ``ValueError`` saying which.
    """
    roles = load_roles(config.roles)
    check_port(config.host, config.port)
    data = config.data_dir
    database = data / "registry.db"
    if database.exists():
        check_database(database)
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    authority = ca_module.CA.load_or_create(data, clock(), cert_days=config.cert_days)
    settings = registry.Settings(
        # --test-clients: short windows, so that clients meet the lock again.
        unlock_duration=min(timedelta(minutes=config.unlock_minutes), TEST_UNLOCK)
        if config.test_clients
        else timedelta(minutes=config.unlock_minutes),
        retention=timedelta(hours=config.retention_hours),
        retry_after_pending=config.retry_after,
        retry_after_locked=config.retry_after_locked,
        rate_limit=config.rate_limit,
        max_pending=config.max_pending,
        scrypt_n=config.scrypt_n,
        crl_validity=timedelta(days=config.crl_days),
    )
    database.touch(mode=0o600)  # password hashes: the owner's alone, and so are its -wal and -shm
    core = registry.Registry(str(database), clock=clock, roles=roles, ca=authority, settings=settings)
    check = clientcheck.ClientCheck() if config.test_clients else None
    app = App(core, admin_token(config), max_body=config.max_body, check=check, token_kept=token_kept(config))
    tls = None if config.http else tls_context(authority, data, [config.host, *config.server_names], clock())
    return RegistryServer(config, app, tls)


def admin_token(config: Config) -> str:
    """The token given, or the one kept in the data folder (made on first start)."""
    if config.admin_token:
        return config.admin_token
    path = config.data_dir / "admin-token"
    if path.exists():
        files.check_private(path)
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    files.write_private(path, token + "\n")
    return token


def token_kept(config: Config) -> dict[str, str | None]:
    """Where the administrator token comes from, as the page's sign-in says it: a file, a flag or a variable.

    It names a place, never the token; the data folder's path is what the
    server prints at its start.
    """
    if config.admin_token:
        source = "environment" if config.token_source == "$REGISTRY_ADMIN_TOKEN" else "flag"
        return {"tokenFrom": source, "file": None}
    return {"tokenFrom": "file", "file": str(config.data_dir / "admin-token")}


def check_port(host: str, port: int) -> None:
    """Refuse, before anything is made, an address another program listens on."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(
                f"cannot listen on {host}:{port}: {error.strerror}: stop what holds it, or choose another --port"
            ) from None


def check_database(path: Path) -> None:
    """Refuse a database that SQLite finds damaged (``PRAGMA quick_check``): never serve it, never replace it."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as database:
            verdict = database.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if verdict != "ok":
        raise ValueError(f"{path} is damaged ({verdict}): restore it from a backup (--backup), or move it away")


def backup(data: Path, destination: Path) -> None:
    """Copy a registry's data folder to a new folder, consistently, while its server runs.

    The database through SQLite's online backup API
    (https://www.sqlite.org/backup.html); the CA's key and certificate, the
    token and the server's certificate beside it, each readable by the owner
    alone: the copy holds the CA's key, so it is as secret as the original.
    """
    database = data / "registry.db"
    if not database.exists():
        raise FileNotFoundError(f"{data} holds no registry: there is no {database}")
    try:
        destination.mkdir(mode=0o700)
    except FileExistsError:
        raise FileExistsError(f"{destination} exists: name a folder that does not, and it is made") from None
    destination.chmod(0o700)
    copy_path = destination / "registry.db"
    copy_path.touch(mode=0o600)
    with (
        contextlib.closing(sqlite3.connect(database)) as source,
        contextlib.closing(sqlite3.connect(copy_path)) as copy,
    ):
        source.backup(copy)
    for name in ("ca.pem", "ca.key", "admin-token", "server.pem", "server.key"):
        if (data / name).exists():
            files.write_private(destination / name, (data / name).read_text())


def load_roles(path: Path | None) -> dict[str, str]:
    """The role catalog: a JSON list of names, or an object of names to descriptions."""
    if path is None:
        return {"minimum": "The least a client needs"}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"the role catalog {path} is not JSON: {error}") from None
    if isinstance(data, list) and all(isinstance(name, str) for name in data):
        return dict.fromkeys(data, "")
    if isinstance(data, dict) and all(isinstance(text, str) for text in data.values()):
        return data
    raise ValueError(f"{path}: the role catalog must be a list of names or an object of names to descriptions")


def tls_context(authority: ca_module.CA, data: Path, names: list[str], now: datetime) -> ssl.SSLContext:
    """A server context with a certificate from the CA, asking for optional client certificates."""
    cert_path, key_path = data / "server.pem", data / "server.key"
    names = [name for name in names if name not in ("0.0.0.0", "::", "")]
    if not key_path.exists() or not _server_certificate_fits(cert_path, names, now):
        credentials = authority.issue_server_certificate(now, names)
        cert_path.write_text(credentials.certificate_pem)
        files.write_private(key_path, credentials.key_pem)
    files.check_private(key_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(cert_path, key_path)
    # Mutual TLS for whoami: a client may show a certificate from our CA.
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=authority.certificate_pem)
    return context


def _server_certificate_fits(path: Path, names: list[str], now: datetime) -> bool:
    from cryptography import x509

    if not path.exists():
        return False
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    present = {str(name.value) for name in sans}
    return set(names) <= present and certificate.not_valid_after_utc - now > timedelta(days=30)


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line, as a ``Config``."""
    d = Config()
    parser = argparse.ArgumentParser(
        description="Serve the client registry over HTTPS.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    option = parser.add_argument
    option("--host", default=d.host, help="address to listen on")
    option("--port", type=int, default=d.port, help="port; 0 picks a free one")
    option("--data-dir", type=Path, default=d.data_dir, help="the database, the CA, the keys and the token")
    option("--http", action="store_true", help="serve plain HTTP (behind a TLS proxy, or for tests)")
    option(
        "--server-name",
        dest="server_names",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or address for the server's certificate (repeat for more)",
    )
    option(
        "--admin-token",
        help="administrator token; default $REGISTRY_ADMIN_TOKEN, else made once and kept in the data folder",
    )
    option(
        "--backup",
        type=Path,
        metavar="DEST",
        help="copy the data folder to the new folder DEST while a server may run on it, then exit",
    )
    option("--unlock-minutes", type=float, default=d.unlock_minutes, help="the unlock window")
    option("--retry-after", type=int, default=d.retry_after, help="Retry-After seconds of a 202")
    option("--retry-after-locked", type=int, default=d.retry_after_locked, help="Retry-After seconds of a 423")
    option("--cert-days", type=int, default=d.cert_days, help="validity of client certificates, in days")
    option(
        "--crl-days",
        type=float,
        default=d.crl_days,
        help="validity of the CRL, in days; it is signed anew when less than half is left",
    )
    option("--roles", type=Path, help="JSON file of the role catalog (without it: one role, 'minimum')")
    option("--max-body", type=int, default=d.max_body, help="largest body in bytes; more gets 413")
    option(
        "--retention-hours", type=float, default=d.retention_hours, help="how long pending and denied requests are kept"
    )
    option("--timeout", type=float, default=d.timeout, help="seconds a whole request may take to arrive")
    option("--max-connections", type=int, default=d.max_connections, help="connections served at once; more are closed")
    option(
        "--max-connections-per-address",
        type=int,
        default=d.max_connections_per_address,
        help="connections one client address may hold at once; more are closed, and counted",
    )
    option(
        "--rate-limit", type=int, default=d.rate_limit, help="new requests per client address per minute; 0 is no limit"
    )
    option("--max-pending", type=int, default=d.max_pending, help="most pending requests; beyond, new ones get 503")
    option(
        "--no-fast-http",
        dest="fast_http",
        action="store_false",
        help="read request heads with http.server's own parser instead of the faster one",
    )
    option("--log-level", default=d.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    option(
        "--test-clients",
        action="store_true",
        help="test the clients (SPEC section 9): vary Retry-After, answer 429 and 503 now and then, lose answers,"
        " unlock for 30 s; report what each client does wrong at /api/client-registry/client-report",
    )
    args = parser.parse_args(argv)
    args.server_names = tuple(args.server_names)
    if args.admin_token:
        args.token_source = "--admin-token"
    elif os.environ.get("REGISTRY_ADMIN_TOKEN"):
        args.admin_token, args.token_source = os.environ["REGISTRY_ADMIN_TOKEN"], "$REGISTRY_ADMIN_TOKEN"
    return Config(**vars(args))


def main(argv: list[str] | None = None) -> None:
    """Start the server; Ctrl-C or SIGTERM stops it."""
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if config.backup:
        try:
            backup(config.data_dir, config.backup)
        except OSError as error:
            sys.exit(f"server.py: cannot back up: {error}")
        print(f"Backed up {config.data_dir} to {config.backup}; serve the copy with --data-dir {config.backup}")
        return
    kept = config.data_dir / "admin-token"
    made_now = not config.admin_token and not kept.exists()
    try:
        server = build(config)
    except (OSError, ValueError) as error:
        sys.exit(f"server.py: cannot start: {error}")
    print(f"Client registry at {server.url}/api/client-registry (data in {config.data_dir})", flush=True)
    # The token is shown once, when it is made; a terminal's scrollback or a
    # service's journal should not collect a copy at every start.
    if made_now:
        print(f"Administrator token: {admin_token(config)} (kept in {kept})", flush=True)
    elif not config.admin_token:
        print(f"The administrator token is kept in {kept}", flush=True)
    else:
        unused = f"; the one kept in {kept} is not used" if kept.exists() else ""
        print(f"The administrator token is the one given in {config.token_source}{unused}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.core.close()
        log.info("stopped")


if __name__ == "__main__":
    main()

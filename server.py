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
import ipaddress
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

import admins as admins_module
import broker as broker_module
import ca as ca_module
import clientcheck
import datafolder
import est
import fastpath
import files
import openapi
import registry

log = logging.getLogger("registry.server")
access_logger = logging.getLogger("registry.access")


JSON, PEM, PKIX_CRL = openapi.JSON, openapi.PEM, openapi.PKIX_CRL  # the media types, as the document names them
TEST_UNLOCK = timedelta(seconds=30)  # the longest unlock window under --test-clients
CRL_CHECK_SECONDS = 60.0  # how often the server asks whether the CRL is due to be signed again
SERVER_CERTIFICATE_CHECK_SECONDS = 3600.0  # how often it asks whether its own certificate is due
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
# SPEC HTTP-8.7-SECURITY-HEADERS: no answer is sniffed into another type, and
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


SETTINGS = registry.Settings()  # the registry's defaults: the command line's, in its units
MINUTE, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
# STORE-6.10-SETTINGS: a flag that sets a registry setting, and the unit its
# number counts in; the setting's default and range are registry.py's.
SETTING_FLAGS: dict[str, tuple[str, timedelta | None]] = {
    "unlock_minutes": ("unlock_duration", MINUTE),
    "retention_hours": ("retention", HOUR),
    "crl_days": ("crl_validity", DAY),
    "retry_after": ("retry_after_pending", None),
    "retry_after_locked": ("retry_after_locked", None),
    "rate_limit": ("rate_limit", None),
    "max_pending": ("max_pending", None),
}
# The server's own numbers: the least and the most each may be.
SERVER_RANGES: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "cert_days": (1, 3650),  # within the CA's ten years
    "max_body": (1024, 16 << 20),  # a CSR of a 4096-bit RSA key is under 2 KiB
    "timeout": (0.1, 3600),
    "max_connections": (1, 65536),
    "max_connections_per_address": (1, 65536),
}


def _setting(flag: str) -> Any:
    """The registry's default of the setting behind ``flag``, in the flag's unit."""
    field_name, unit = SETTING_FLAGS[flag]
    value = getattr(SETTINGS, field_name)
    return _whole(value / unit) if unit else value


def _whole(number: float) -> float:
    """5.0 as 5: how a person writes it."""
    return int(number) if float(number).is_integer() else number


@dataclass(frozen=True)
class Config:
    """The server's settings: each is a command-line flag but ``scrypt_n`` (tests lower it) and ``token_source``.

    A number that is a registry setting takes its default from ``registry.Settings``.
    """

    host: str = "127.0.0.1"
    port: int = 8443
    data_dir: Path = Path("registry-data")
    http: bool = False
    server_names: tuple[str, ...] = ()
    admin_token: str | None = None
    token_source: str = ""  # where a given token came from: "--admin-token" or "$REGISTRY_ADMIN_TOKEN"
    unlock_minutes: float = _setting("unlock_minutes")
    retry_after: int = _setting("retry_after")
    retry_after_locked: int = _setting("retry_after_locked")
    cert_days: int = 365
    crl_days: float = _setting("crl_days")
    roles: Path | None = None
    max_body: int = 64 * 1024
    retention_hours: float = _setting("retention_hours")
    timeout: float = 10
    max_connections: int = 256
    max_connections_per_address: int = 32
    rate_limit: int = _setting("rate_limit")
    max_pending: int = _setting("max_pending")
    log_level: str = "INFO"
    scrypt_n: int = SETTINGS.scrypt_n
    fast_http: bool = True
    fast_path: bool = True  # fastpath.FastRegistry; False: the reference registry.Registry
    backup: Path | None = None  # --backup DEST: copy the data folder there instead of serving
    # --forwarded-allow: the proxies whose X-Forwarded-For names the client (HTTP-8.6-FORWARDED)
    forwarded_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    add_admin: str | None = None  # --add-admin NAME: a new administrator, its token printed once
    remove_admin: str | None = None
    list_admins: bool = False
    test_clients: bool = False  # vary the answers to registrations and report what clients do wrong
    # SPEC section 11: the MQTT broker kept equal to the users (mqtt:// or mqtts://), its CA, its admin's file.
    mosquitto: str | None = None
    mosquitto_cafile: Path | None = None
    mosquitto_admin: Path | None = None


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
    administrator: str = ""  # who the token is, once checked (ADMIN-4.9-ATTRIBUTED)


@dataclass(frozen=True)
class Response:
    """What the handler writes."""

    status: HTTPStatus
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    lost: bool = False  # --test-clients: close the connection instead of answering
    administrator: str = ""  # the administrator who called, for the access log

    @classmethod
    def json(cls, status: HTTPStatus, data: object, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(data).encode(), JSON, headers or {})


def error_response(error: Exception, context: str = "") -> Response:
    """The one place where an error becomes an answer: a refusal by its status and code, anything else a 500.

    REG-2.5-ERRORS: every refusal is JSON, ``{"error", "message"}``; HTTP-8.1-STATUSES: a 500 only for a fault
    of the server, logged with its traceback, and nothing of it in the body.
    """
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
        broker: broker_module.Reconciler | None = None,
        over_tls: bool = False,
        administrators: admins_module.Administrators | None = None,
        token_kept: dict[str, str | None] | None = None,
    ) -> None:
        self.core = core
        self.broker = broker  # --mosquitto: a broker.Reconciler, kicked after every change of a user
        self.est = est.Est(core, over_tls=over_tls)  # SPEC section 10, on the HTTPS listener only
        # SPEC ADMIN-4.10-PAGE-FIELDS: where the token is kept, for the page's sign-in hint.
        self.token_kept = token_kept or {"tokenFrom": "file", "file": None}
        self.max_body = max_body
        self.check = check  # --test-clients: registrations varied, their clients watched
        # ``admin_token`` is the administrator ``admin``; the named ones come with ``administrators``.
        self.administrators = administrators or admins_module.Administrators(None, admin_token)
        self._routes = [(route, route.regex) for route in ROUTES]

    def handle(self, request: Request) -> Response:
        """Answer one request; what goes wrong is answered by ``error_response``."""
        administrator = ""
        try:
            if est.is_est(request.path):
                return self._est(request)
            route, arguments = self._route(request)
            if route.access == "admin":
                administrator = self._authorize(request)
                request = dataclasses.replace(request, administrator=administrator)
            if self.check is not None and route.handler == "register":
                return self._checked_register(request)
            response = getattr(self, route.handler)(request, **arguments)
        except Exception as error:
            response = error_response(error, f"in {request.method} {request.path}")
        # ADMIN-4.9-ATTRIBUTED: the access log names the administrator, refused calls too.
        return dataclasses.replace(response, administrator=administrator) if administrator else response

    def _route(self, request: Request) -> tuple[Route, dict[str, str]]:
        # HTTP-8.1-STATUSES: 501 for a method that is none of RFC 9110's, 405 with Allow, 404.
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

    def _est(self, request: Request) -> Response:
        """SPEC section 10: EST's paths, answered by est.py in EST's types and plain text."""
        answer = self.est.answer(
            request.method,
            request.path,
            request.body,
            client_address=request.client_address,
            peer_certificate=request.peer_certificate,
        )
        return _est_response(answer)

    def refusal(self, error: registry.RegistryError, path: str | None) -> Response:
        """A refusal of the HTTP reader (413, 400, ...): in plain text on EST's paths (SPEC section 10)."""
        if path is not None and est.is_est(path):
            return _est_response(est.refusal(error))
        return error_response(error)

    def _authorize(self, request: Request) -> str:
        """ADMIN-4.1-TOKEN: the administrator whose token the request carries; 401 for anyone else."""
        scheme, token = _credentials(request)
        # Compared in constant time with every administrator's, so the token
        # cannot be guessed byte by byte; an empty token never matches.
        name = self.administrators.who(token) if scheme == "bearer" else None
        if name is None:
            raise registry.Unauthorized(
                "send the administrator token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="client-registry"'},
            )
        return name

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
        # REQ-1-CONTENT-TYPE: the body is read as JSON whatever its Content-Type says.
        outcome = self.core.register_body(request.body, request.client_address)
        return Response(outcome.status, outcome.content, JSON, outcome.headers)

    def status(self, request: Request) -> Response:
        kept = {"broker": self.broker.status()} if self.broker else {}
        return Response.json(HTTPStatus.OK, self.core.status() | kept)

    def unlock(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.core.unlock(_json_body(request), **_actor(request)))

    def lock(self, request: Request) -> Response:
        return Response.json(HTTPStatus.OK, self.core.lock(**_actor(request)))

    def requests(self, request: Request) -> Response:
        listing = self.core.requests()
        # SPEC ADMIN-4.10-PAGE-FIELDS: without what every poll changes, the
        # listing's ETag changes with decisions and arrivals only.
        polls = request.query.get("polls", ["include"])[-1]
        if polls not in ("include", "omit"):
            raise registry.MalformedRequest("'polls' must be 'include' or 'omit'")
        if polls == "omit":
            listing = [{k: v for k, v in entry.items() if k not in POLL_STATISTICS} for entry in listing]
        return _validated(request, listing)

    def approve(self, request: Request, username: str) -> Response:
        user = self.core.approve(username, _json_body(request), **_actor(request))
        self._kick_broker()
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
        self._kick_broker()
        return Response.json(HTTPStatus.OK, {"status": "removed", "username": username})

    def ca(self, request: Request) -> Response:
        # CERT-5.1-CA-PUBLIC: the CA certificate, to anyone (the route's access is public).
        if self.core.ca is None:
            raise registry.NotFound("this registry has no CA")
        return Response(HTTPStatus.OK, self.core.ca.certificate_pem.encode(), PEM)

    def crl(self, request: Request) -> Response:
        # LIFE-7.4-CRL: DER as application/pkix-crl, and PEM below, without authentication.
        return Response(HTTPStatus.OK, self.core.crl(), PKIX_CRL)

    def crl_pem(self, request: Request) -> Response:
        # RFC 7468 section 5: a CRL's PEM label.
        lines = textwrap.wrap(base64.b64encode(self.core.crl()).decode(), 64)
        text = "\n".join(["-----BEGIN X509 CRL-----", *lines, "-----END X509 CRL-----", ""])
        return Response(HTTPStatus.OK, text.encode(), PEM)

    def renew(self, request: Request) -> Response:
        outcome = self.core.renew(request.peer_certificate, _json_body(request), address=request.client_address)
        self._kick_broker()
        return Response(outcome.status, outcome.content, JSON, outcome.headers)

    def _kick_broker(self) -> None:
        # BROKER-11.3-RECONCILE: a pass after every approval, renewal and removal.
        if self.broker is not None:
            self.broker.kick()

    def whoami(self, request: Request) -> Response:
        # AUTH-5.2-WHOAMI: a client certificate, when shown, wins over Basic.
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

    ADMIN-4.6-LISTS.

    The administrator's page asks every few seconds; a list that has not
    changed costs one hash, and the page nothing.
    """
    response = Response.json(HTTPStatus.OK, data)
    tag = f'"{hashlib.sha256(response.body).hexdigest()[:32]}"'
    # Section 13.1.2: If-None-Match uses the weak comparison, W/"x" matches "x".
    held = {candidate.strip().removeprefix("W/") for candidate in request.headers.get("if-none-match", "").split(",")}
    if tag in held or "*" in held:
        return Response(HTTPStatus.NOT_MODIFIED, b"", JSON, {"ETag": tag})
    return Response(response.status, response.body, JSON, {"ETag": tag})


def _est_response(answer: est.Answer) -> Response:
    return Response(answer.status, answer.body, answer.content_type, answer.headers)


def _username_of(body: bytes) -> str | None:
    """The username a registration names, if its body is a JSON object with one."""
    try:
        payload = registry.parse_json(body)
    except registry.MalformedRequest:
        return None
    name = payload.get("username") if isinstance(payload, dict) else None
    return name if isinstance(name, str) else None


def _is_number(text: str) -> bool:
    """Only ASCII digits: str.isdigit also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _actor(request: Request) -> dict[str, str]:
    """ADMIN-4.9-ATTRIBUTED: an administrator's call is the named administrator's, in the audit and the listing."""
    return {"actor": request.administrator or registry.ADMIN, "address": request.client_address}


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
    challenge = dict(registry.CHALLENGE)
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
        # HTTP-8.4-LIMITS: a whole request, from its first byte to its last, arrives
        # within the timeout: a client trickling a byte a second cannot hold a thread.
        self.server.watchdog.arm(self.connection, self.server.config.timeout)
        started = time.perf_counter()
        self.command = self.path = None
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        address = self.client_address[0]
        try:
            request = self._read_request()
        except registry.RegistryError as refusal:
            if isinstance(refusal, BadFraming):  # what follows on the connection cannot be told apart
                self.close_connection = True
            response = self.server.app.refusal(refusal, self.path)
        else:
            self.server.watchdog.arm(self.connection, None)  # the answer is ours to make
            response = self.server.app.handle(request)
            address = request.client_address  # HTTP-8.6-FORWARDED: the client behind an allowed proxy
        if response.lost:
            self.close_connection = True
        else:
            self._write(response)
        if access_logger.isEnabledFor(logging.INFO):  # HTTP-8.5-ACCESS-LOG
            elapsed = (time.perf_counter() - started) * 1000
            path = (self.path or "-").partition("?")[0]
            status = f"{response.status} lost" if response.lost else response.status
            who = f" {response.administrator}" if response.administrator else ""  # ADMIN-4.9-ATTRIBUTED
            self.server.access_log.write(f"{self.command or '-'} {path} {status} {elapsed:.1f}ms {address}{who}")

    def _read_request(self) -> Request:
        """The request, read whole: its head by ``parse_request``, its body by its Content-Length."""
        if len(self.raw_requestline) > MAX_LINE:
            raise UriTooLong(f"the request line has over {MAX_LINE} bytes")
        self.parse_request()
        _check_host(self.headers, self.request_version)
        length = _body_length(self.headers)
        if length > self.server.app.max_body:
            # REG-2.1-SIZE: answered without being parsed. A body of moderate
            # size is read and dropped, so the client sees the 413 (HTTP-8.3-CONNECTION).
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
            client_address=forwarded_client(self.client_address[0], self.headers, self.server.config.forwarded_allow),
            peer_certificate=self.peer_certificate,
        )

    def parse_request(self) -> bool:
        """The request line and the headers into ``command``, ``path``, ``request_version`` and ``headers``.

        HTTP-8.2-HEADERS: a request line or a header line that RFC 9112 refuses is 400.

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
        if status in (HTTPStatus.NOT_MODIFIED, HTTPStatus.NO_CONTENT):
            # RFC 9110 sections 15.4.5 and 8.6: no content, and no length of none.
            headers = {"Date": headers["Date"]}
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

    LIFE-7.5-CRL-FRESH: a running registry never serves an expired CRL, so a
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
    folder_lock: datafolder.FolderLock | None = None  # the data folder, held while it serves
    server_certificate: ServerCertificate | None = None  # HTTPS: its own certificate, renewed by a timer
    certificate_timer: Every | None = None

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
        if self.app.broker is not None:
            self.app.broker.stop()
        if self.certificate_timer is not None:
            self.certificate_timer.stop()
        if self.folder_lock is not None:
            self.folder_lock.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        # HTTP-8.4-LIMITS: one thread a connection, no more threads than slots, and no more
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
        # HTTP-8.3-CONNECTION, RFC 9112 section 9.6: close in stages. Input the handler left unread
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
    check_server_ranges(config)
    # A Config made in code may name its proxies as text: each is a network from here on.
    proxies_allowed = tuple(ipaddress.ip_network(str(proxy), strict=False) for proxy in config.forwarded_allow)
    config = dataclasses.replace(config, forwarded_allow=proxies_allowed)
    roles = load_roles(config.roles)
    check_token(config)
    check_port(config.host, config.port)
    data = config.data_dir
    database = data / "registry.db"
    if database.exists():
        check_database(database)
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)  # SAFE-6.4-FILES: the secrets' folder is the owner's alone
    folder_lock = datafolder.FolderLock(data)  # STORE-6.7-ONE-SERVER
    try:
        return _build(config, clock, roles, folder_lock)
    except BaseException:
        folder_lock.release()
        raise


def _build(
    config: Config, clock: registry.Clock, roles: dict[str, str], folder_lock: datafolder.FolderLock
) -> RegistryServer:
    """``build`` within the data folder, which this server holds."""
    data = config.data_dir
    database = data / "registry.db"
    datafolder.check_ca_kept(data)
    authority = ca_module.CA.load_or_create(data, clock(), cert_days=config.cert_days)
    if warning := authority.validity_warning(clock()):
        log.warning("%s", warning)  # LIFE-7.6-CA-EXPIRY
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
    # STORE-6.1-SQLITE: one SQLite database in the data folder. Its password hashes are the
    # owner's alone, and so are its -wal and -shm.
    database.touch(mode=0o600)
    kind = fastpath.FastRegistry if config.fast_path else registry.Registry
    core = kind(str(database), clock=clock, roles=roles, ca=authority, settings=settings)
    check = clientcheck.ClientCheck() if config.test_clients else None
    reconciler = None
    if config.mosquitto:  # paho-mqtt is imported then, and only then
        reconciler = broker_module.serve(core, config.mosquitto, config.mosquitto_admin, config.mosquitto_cafile, clock)
    administrators = admins_module.Administrators(data, admin_token(config))
    app = App(
        core,
        admin_token(config),
        max_body=config.max_body,
        check=check,
        broker=reconciler,
        over_tls=not config.http,
        administrators=administrators,
        token_kept=token_kept(config),
    )
    names = server_names([config.host, *config.server_names])
    # TLS-6.5-HTTPS: HTTPS unless --http is given.
    tls = None if config.http else tls_context(authority, data, names, clock())
    instance = RegistryServer(config, app, tls)
    instance.folder_lock = folder_lock
    if tls is not None:
        instance.server_certificate = ServerCertificate(authority, data, names, clock, tls)
        instance.certificate_timer = Every(SERVER_CERTIFICATE_CHECK_SECONDS, instance.server_certificate.refresh, "tls")
    if reconciler is not None:
        reconciler.start()
    return instance


def admin_token(config: Config) -> str:
    """ADMIN-4.1-TOKEN: the token given, or the one kept in the data folder (made on first start)."""
    if config.admin_token is not None:
        return config.admin_token
    path = config.data_dir / "admin-token"
    if path.exists():
        files.check_private(path)
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    files.write_private(path, token + "\n")
    return token


def check_token(config: Config) -> None:
    """ADMIN-4.1-TOKEN: refuse a token given or kept that is shorter than 32 characters, before anything is made."""
    if config.admin_token is not None:
        problem = admins_module.token_problem(config.admin_token, config.token_source or "the settings")
    elif (config.data_dir / "admin-token").exists():
        path = config.data_dir / "admin-token"
        files.check_private(path)
        problem = admins_module.token_problem(path.read_text().strip(), str(path))
    else:
        problem = None
    if problem:
        raise ValueError(problem)


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
    names = server_names(names)
    if not key_path.exists() or not _server_certificate_fits(cert_path, names, now):
        _issue_server_certificate(authority, data, names, now)
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
    # TLS-6.12-RENEW: due from two thirds of its life, as a client's (LIFE-7.1).
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return set(names) <= present and now < not_before + (not_after - not_before) * 2 / 3


def server_names(names: list[str]) -> list[str]:
    """The names the server's certificate must carry: its addresses but the wildcard ones."""
    return [name for name in names if name not in ("0.0.0.0", "::", "")]


def _issue_server_certificate(authority: ca_module.CA, data: Path, names: list[str], now: datetime) -> None:
    credentials = authority.issue_server_certificate(now, names)
    # The key first, then the certificate: a certificate on disk always has its key beside it.
    files.write_private(data / "server.key.next", credentials.key_pem)
    (data / "server.pem.next").write_text(credentials.certificate_pem)
    os.replace(data / "server.key.next", data / "server.key")
    os.replace(data / "server.pem.next", data / "server.pem")


class ServerCertificate:
    """The HTTPS server's own certificate, renewed from the CA at two thirds of its life (TLS-6.12-RENEW).

    A timer calls ``refresh``; the new certificate is loaded into the live
    ``SSLContext`` (``load_cert_chain``), so the next connections get it
    with no restart, and the open ones keep theirs.
    """

    def __init__(
        self, authority: ca_module.CA, data: Path, names: list[str], clock: registry.Clock, context: ssl.SSLContext
    ) -> None:
        self.authority, self.data, self.names, self.clock, self.context = authority, data, names, clock, context
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Renew the certificate when it is due; whether it was."""
        now = self.clock()
        with self._lock:
            if _server_certificate_fits(self.data / "server.pem", self.names, now):
                return False
            _issue_server_certificate(self.authority, self.data, self.names, now)
            self.context.load_cert_chain(self.data / "server.pem", self.data / "server.key")
        log.info("renewed the server's certificate (%s)", self.data / "server.pem")
        return True


# A help that names %(default) gets no "(default: ...)" from ArgumentDefaultsHelpFormatter; this names it and
# prints nothing, for an option whose default would read wrong: None, [], the True of a --no- flag (issue 26).
NO_DEFAULT_SHOWN = "%(default).0s"


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
        help="another name or address for the server's certificate (repeat for more)" + NO_DEFAULT_SHOWN,
    )
    option(
        "--admin-token",
        help="administrator token; default $REGISTRY_ADMIN_TOKEN, else made once and kept in the data folder"
        + NO_DEFAULT_SHOWN,
    )
    option(
        "--backup",
        type=Path,
        metavar="DEST",
        help="copy the data folder to the new folder DEST while a server may run on it, then exit" + NO_DEFAULT_SHOWN,
    )
    option(
        "--forwarded-allow",
        type=proxies,
        default=(),
        metavar="ADDR[,ADDR...]",
        help="the reverse proxies (addresses or networks) whose X-Forwarded-For names the client: its last entry"
        " is the client's address for the throttles and the access log" + NO_DEFAULT_SHOWN,
    )
    option(
        "--add-admin",
        metavar="NAME",
        help="add the administrator NAME, print its new token once, and exit" + NO_DEFAULT_SHOWN,
    )
    option(
        "--remove-admin",
        metavar="NAME",
        help="withdraw the token of the administrator NAME, and exit" + NO_DEFAULT_SHOWN,
    )
    option("--list-admins", action="store_true", help="list the administrators by name, and exit" + NO_DEFAULT_SHOWN)
    option("--unlock-minutes", type=float, default=d.unlock_minutes, help="the unlock window")
    option("--retry-after", type=int, default=d.retry_after, help="Retry-After seconds of a 202")
    option("--retry-after-locked", type=int, default=d.retry_after_locked, help="Retry-After seconds of a 423 or 503")
    option("--cert-days", type=int, default=d.cert_days, help="validity of client certificates, in days")
    option(
        "--crl-days",
        type=float,
        default=d.crl_days,
        help="validity of the CRL, in days; it is signed anew when less than half is left",
    )
    option(
        "--roles", type=Path, help="JSON file of the role catalog (without it: one role, 'minimum')" + NO_DEFAULT_SHOWN
    )
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
        help="read request heads with http.server's own parser instead of the faster one, which is the default"
        + NO_DEFAULT_SHOWN,
    )
    option(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="answer every request the reference way (registry.Registry), with no remembered polls, passwords or"
        " CSRs; the fast path (fastpath.FastRegistry) is the default" + NO_DEFAULT_SHOWN,
    )
    option("--log-level", default=d.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    option(
        "--test-clients",
        action="store_true",
        help="test the clients (SPEC section 9): vary Retry-After, answer 429 and 503 now and then, lose answers,"
        " keep each unlock to 30 s at most (it starts locked, as always); report what each client does wrong at"
        " /api/client-registry/client-report",
    )
    option(
        "--mosquitto",
        metavar="URL",
        help="keep this MQTT broker's dynamic security equal to the users (mqtt://HOST:PORT or mqtts://HOST:PORT;"
        " needs paho-mqtt; see docs/relying-parties.md)" + NO_DEFAULT_SHOWN,
    )
    option(
        "--mosquitto-cafile",
        type=Path,
        metavar="FILE",
        help="the CA that signed an mqtts:// broker's certificate" + NO_DEFAULT_SHOWN,
    )
    option(
        "--mosquitto-admin",
        type=Path,
        metavar="FILE",
        help='a 0600 JSON file {"username": ..., "password": ...}: the broker\'s dynamic-security administrator'
        + NO_DEFAULT_SHOWN,
    )
    _check_ranges(parser)
    args = parser.parse_args(argv)
    args.server_names = tuple(args.server_names)
    # A token given empty is given, and refused at start (ADMIN-4.1-TOKEN).
    if args.admin_token is not None:
        args.token_source = "--admin-token"
    elif "REGISTRY_ADMIN_TOKEN" in os.environ:
        args.admin_token, args.token_source = os.environ["REGISTRY_ADMIN_TOKEN"], "$REGISTRY_ADMIN_TOKEN"
    return Config(**vars(args))


def proxies(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """--forwarded-allow: addresses or networks, comma-separated (as nginx's set_real_ip_from)."""
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def forwarded_client(
    peer: str, headers: Mapping[str, str], proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> str:
    """The client's address: the last entry of X-Forwarded-For when the peer is an allowed proxy, else the peer.

    HTTP-8.6-FORWARDED: only the last entry, the one the proxy itself
    appended (nginx's $proxy_add_x_forwarded_for), is trusted; the entries
    before it are whatever the client sent. A peer that is no allowed proxy
    is the client, whatever its header says.
    """
    forwarded = headers.get("x-forwarded-for")
    if not proxies or not forwarded:
        return peer
    try:
        if not any(ipaddress.ip_address(peer) in network for network in proxies):
            return peer
        return str(ipaddress.ip_address(forwarded.rsplit(",", 1)[-1].strip()))
    except ValueError:  # an entry that is no address: the proxy is the one known
        return peer


def manage_admins(config: Config) -> str:
    """--add-admin, --remove-admin, --list-admins (ADMIN-4.9-ATTRIBUTED): what to print.

    They change ``admins.json`` in the data folder, which a running server
    reads again at its next administrator call.
    """
    data = config.data_dir
    if config.add_admin:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = admins_module.add(data, config.add_admin)
        return (
            f"Administrator {config.add_admin}: {token}\n"
            f"(shown once: {data / admins_module.FILE} keeps only its hash; --remove-admin {config.add_admin}"
            " withdraws it)"
        )
    if config.remove_admin:
        admins_module.remove(data, config.remove_admin)
        return f"Administrator {config.remove_admin} removed: its token opens nothing from the next call on"
    kept = "given at start" if config.admin_token is not None else f"kept in {data / 'admin-token'}"
    return "\n".join([f"{admins_module.QUICK_START} (the token {kept})", *admins_module.names(data)])


def flag_range(dest: str) -> tuple[float, float]:
    """The least and the most the flag ``dest`` may be, in its unit (STORE-6.10-SETTINGS)."""
    if dest not in SETTING_FLAGS:
        return SERVER_RANGES[dest]
    field_name, unit = SETTING_FLAGS[dest]
    least, most = registry.SETTING_RANGES[field_name]
    return (_whole(least / unit), _whole(most / unit)) if unit else (least, most)


def _check_ranges(parser: argparse.ArgumentParser) -> None:
    """Each numeric flag refuses a value outside its range (argparse's exit 2, naming the flag), and says the range."""
    for action in parser._actions:
        if action.dest in SETTING_FLAGS or action.dest in SERVER_RANGES:
            least, most = flag_range(action.dest)
            action.type = _ranged(action.type or float, least, most)
            action.help = f"{action.help} ({_whole(least)} to {_whole(most)})"


def _ranged(kind: Callable[[str], float], least: float, most: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' * (kind is int)}number") from None
        if not least <= value <= most:  # NaN is in no range
            raise argparse.ArgumentTypeError(f"{text} is outside its range, {_whole(least)} to {_whole(most)}")
        return value

    return parse


def check_server_ranges(config: Config) -> None:
    """A ``Config`` made in code meets the command line's ranges too (``registry.Settings`` checks its own)."""
    for dest, (least, most) in SERVER_RANGES.items():
        value = getattr(config, dest)
        if not least <= value <= most:
            raise ValueError(f"{dest} must be from {_whole(least)} to {_whole(most)}, not {value}")


def main(argv: list[str] | None = None) -> None:
    """Start the server; Ctrl-C or SIGTERM stops it."""
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if config.backup:
        try:
            datafolder.backup(config.data_dir, config.backup)
        except (OSError, ValueError) as error:
            sys.exit(f"server.py: cannot back up: {error}")
        print(f"Backed up {config.data_dir} to {config.backup}; serve the copy with --data-dir {config.backup}")
        return
    if config.add_admin or config.remove_admin or config.list_admins:
        try:
            print(manage_admins(config))
        except (OSError, ValueError) as error:
            sys.exit(f"server.py: {error}")
        return
    kept = config.data_dir / "admin-token"
    made_now = config.admin_token is None and not kept.exists()
    try:
        server = build(config)
    except (OSError, ValueError) as error:
        sys.exit(f"server.py: cannot start: {error}")
    # Before the first line: whoever reads it may stop the server at once.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"Client registry at {server.url}/api/client-registry (data in {config.data_dir})", flush=True)
    # The token is shown once, when it is made; a terminal's scrollback or a
    # service's journal should not collect a copy at every start.
    if made_now:
        print(f"Administrator token: {admin_token(config)} (kept in {kept})", flush=True)
    elif config.admin_token is None:
        print(f"The administrator token is kept in {kept}", flush=True)
    else:
        unused = f"; the one kept in {kept} is not used" if kept.exists() else ""
        if kept.exists() and kept.read_text().strip() == config.admin_token:
            unused = f", the same as the one kept in {kept}"  # as after export REGISTRY_ADMIN_TOKEN=$(cat ...)
        print(f"The administrator token is the one given in {config.token_source}{unused}", flush=True)
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

"""The OpenAPI 3.1 document of the routes the server really serves.

``document(routes)`` walks the server's route table (``server.ROUTES``, passed
in so that this module needs nothing of the adapter) and describes each
route: its path and method, who may call it, the body it takes, and one
response for each status it may answer. What differs from route to route is
data in the tables below, keyed by the handler's name; what every route
shares (errors, ``Retry-After``, the 401 of an authenticated route) is the
work of a few short functions.

The schemas say what the core really answers (``registry.py``): the bodies of
``Outcome``, ``status()``, ``requests()``, ``users()``, ``audit()`` and
``RegistryError.body()``. Limits come from ``registry`` itself, so the
document cannot drift from the checks. OpenAPI 3.1 schemas are JSON Schema
2020-12 (https://spec.openapis.org/oas/v3.1.0#schema-object), hence
``"type": ["string", "null"]`` and ``const``.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from http import HTTPStatus
from typing import Any, Protocol

import registry

JSON = "application/json"
PEM = "application/x-pem-file"
PKIX_CRL = "application/pkix-crl"  # RFC 2585 section 4.2
# The types of the page's files, as the server's STATIC_TYPES serves them.
STATIC_TYPES = ("text/html; charset=utf-8", "text/javascript", "text/css", "image/png")
PARAMETER = re.compile(r"\{(\w+)\}")

Schema = dict[str, Any]


# --- Schemas ---------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(name: str) -> Schema:
    return {"type": "array", "items": _ref(name)}


def _json(schema: Schema) -> Schema:
    """The content of a JSON body of this schema."""
    return {JSON: {"schema": schema}}


def _closed(properties: Schema, required: tuple[str, ...] | None = None, **extra: Any) -> Schema:
    """An object with only these properties: all of them required, unless ``required`` says which."""
    needed = list(properties) if required is None else list(required)
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    return schema | ({"required": needed} if needed else {})


TEXT: Schema = {"type": "string"}
MAYBE_TEXT: Schema = {"type": ["string", "null"]}
TIME: Schema = {"type": "string", "format": "date-time"}
MAYBE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
ROLES: Schema = {"type": "array", "items": TEXT, "description": "Names from the role catalog"}
PERMISSIONS: Schema = _list("Permission")
PAIRING_ID: Schema = {
    "type": "string",
    "pattern": "^[0-9a-f]{6}$",
    "description": "Derived from the credential: the client logs it, the administrator compares",
}
USERNAME: Schema = {
    "type": "string",
    "minLength": min(registry.USERNAME_LENGTH),
    "maxLength": max(registry.USERNAME_LENGTH),
    "pattern": f"^{registry.USERNAME.pattern}$",
}
# MQTT 3.1.1 sections 4.7.1 and 4.7.3, as the registry reads a topic filter. One closing '$', so that a
# generator reads it as the end of the string.
TOPIC_FILTER = f"^(?:{registry.TOPIC_FILTER.pattern})$"
# What a path parameter may be: any other value names nothing, and is 404.
PATH_PARAMETERS: dict[str, Schema] = {
    "username": USERNAME,
    "name": {
        "type": "string",
        "pattern": "^[^./][^/]*$",
        "description": "A file of the page",
        "examples": ["admin.js", "admin.css", "favicon.png"],
    },
}
# SPEC LIFE-7.1-TIMES: what every answer that carries a certificate carries.
CERTIFIED: Schema = {
    "certificate": {"type": "string", "description": "PEM of the issued certificate"},
    "caCertificate": {"type": "string", "description": "PEM of the issuing CA"},
    "notAfter": {**TIME, "description": "When the certificate expires"},
    "renewAfter": {**TIME, "description": "From when to renew it: two thirds of its validity"},
}
LONGEST_UNLOCK_MS = registry.Settings().max_unlock_duration // timedelta(milliseconds=1)

SCHEMAS: dict[str, Schema] = {
    "Permission": _closed(
        {
            "resource": {
                "type": "string",
                "minLength": 1,
                "description": "An MQTT topic filter ('+' and '#' allowed), or an HTTP path starting with '/'",
            },
            "operation": {"enum": list(registry.OPERATIONS)},
            "context": {"enum": list(registry.CONTEXTS)},
        },
        oneOf=[
            {"properties": {"context": {"const": "http"}, "resource": {"pattern": "^/"}}},
            {"properties": {"context": {"const": "mqtt"}, "resource": {"pattern": TOPIC_FILTER}}},
        ],
        description="SPEC REQ-1-PERMISSION: the resource's form follows the context",
    ),
    "Registration": _closed(
        {
            "username": USERNAME,
            "password": {
                "type": "string",
                "minLength": min(registry.PASSWORD_LENGTH),
                "maxLength": max(registry.PASSWORD_LENGTH),
            },
            "csr": {"type": "string", "description": "PEM PKCS#10 request whose subject CN is the username"},
            "roles": ROLES,
            "permissions": PERMISSIONS,
            "context": {"type": "string", "maxLength": registry.CONTEXT_LENGTH, "description": "For the administrator"},
        },
        required=("username",),
        oneOf=[{"required": ["password"]}, {"required": ["csr"]}],
        description="SPEC section 1: exactly one of 'password' and 'csr'. Re-send the same request to poll.",
        examples=[{"username": "sensor-0003", "password": "s3cret-pass", "roles": ["minimum"]}],
    ),
    "Unlock": _closed(
        {"duration": {"type": "integer", "minimum": 1, "maximum": LONGEST_UNLOCK_MS, "description": "Milliseconds"}},
        required=(),
        description="Without a duration, the registry opens for the server's default window",
    ),
    "Grant": _closed(
        {"roles": ROLES, "permissions": PERMISSIONS},
        required=(),
        description="The rights to grant instead of those requested; without a body, those requested are granted",
    ),
    "Denial": _closed({"reason": {"type": "string", "maxLength": registry.REASON_LENGTH}}, required=()),
    "PendingAnswer": _closed({"status": {"const": "pending"}, "username": TEXT, "pairingId": PAIRING_ID}),
    "ApprovedAnswer": _closed(
        {
            "status": {"const": "approved"},
            "username": TEXT,
            "roles": ROLES,
            "permissions": PERMISSIONS,
            **CERTIFIED,
        },
        required=("status", "username", "roles", "permissions"),
        description="What was granted, which may be narrower than what was requested; a certificate for a CSR",
    ),
    "Renewal": _closed(
        {"csr": {"type": "string", "description": "PEM PKCS#10 request whose CN is your username: same key or new"}},
        description="SPEC section 7: sent over mutual TLS with the current certificate",
    ),
    "RenewedAnswer": _closed(
        {
            "status": {"const": "renewed"},
            "username": TEXT,
            "roles": ROLES,
            "permissions": PERMISSIONS,
            **CERTIFIED,
        },
        description="The user's rights are unchanged; the previous certificate stays valid until its own notAfter",
    ),
    "Error": _closed(
        {
            "error": {"type": "string", "description": "A code such as malformed_request, locked or not_pending"},
            "message": {"type": "string", "description": "A sentence for a person"},
            "details": {"type": "array", "items": TEXT, "description": "Each problem, when there are several"},
            "reason": {"type": "string", "description": "The administrator's reason (error 'denied')"},
            "state": {"enum": [s.value for s in registry.State], "description": "The request's state (not_pending)"},
        },
        required=("error", "message"),
    ),
    "Status": _closed(
        {
            "locked": {"type": "boolean"},
            "unlockedUntil": MAYBE_TIME,
            "unlockedForMs": {
                "type": "integer",
                "minimum": 1,
                "description": "While unlocked: the milliseconds left, by the registry's clock",
            },
            "serverTime": {**TIME, "description": "While unlocked: the registry's own time"},
            "pending": {"type": "integer"},
            "crl": {
                "oneOf": [
                    _closed({"number": {"type": "integer", "minimum": 1}, "nextUpdate": TIME}),
                    {"type": "null"},
                ],
                "description": "The current CRL (null without a CA)",
            },
            # SPEC section 11: only on a server started with --mosquitto.
            "broker": _closed(
                {
                    "reachable": {"type": ["boolean", "null"], "description": "Whether the last pass reached it"},
                    "lastAgreement": MAYBE_TIME,
                    "pendingDifferences": {"type": ["integer", "null"], "minimum": 0},
                    "conflicts": {"type": "array", "items": TEXT, "description": "Names held by hand"},
                    "awaitingPassword": {"type": ["integer", "null"], "minimum": 0},
                },
                description="The MQTT broker kept equal to the users (a server started with --mosquitto)",
            ),
        },
        required=("locked", "unlockedUntil", "pending", "crl"),
    ),
    "Request": _closed(
        {
            "username": TEXT,
            "state": {"enum": [s.value for s in registry.State]},
            "pairingId": PAIRING_ID,
            "method": {"enum": ["password", "csr"]},
            "roles": ROLES,
            "permissions": PERMISSIONS,
            "context": MAYBE_TEXT,
            "createdAt": TIME,
            "lastPollAt": TIME,
            "pollCount": {"type": "integer", "minimum": 0},
            "clientAddress": MAYBE_TEXT,
            "decidedAt": MAYBE_TIME,
            "decidedBy": {**MAYBE_TEXT, "description": "The administrator who approved or denied it"},
            "reason": MAYBE_TEXT,
            "granted": {
                "oneOf": [_closed({"roles": ROLES, "permissions": PERMISSIONS}), {"type": "null"}],
                "description": "What was granted (an approved request)",
            },
            "collectedAt": {**MAYBE_TIME, "description": "When the client first fetched its 201"},
            "via": {"enum": ["api", "est"], "description": "How the request came: this JSON API, or EST (RFC 7030)"},
            "publicKey": {
                "oneOf": [
                    _closed(
                        {
                            "type": {"type": "string", "description": "Such as 'EC secp256r1' or 'RSA 2048-bit'"},
                            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        }
                    ),
                    {"type": "null"},
                ],
                "description": "A CSR's verified key and the SHA-256 of its SubjectPublicKeyInfo (null for a password)",
            },
        },
        required=(
            "username",
            "state",
            "pairingId",
            "method",
            "roles",
            "permissions",
            "context",
            "createdAt",
            "decidedAt",
            "reason",
            "granted",
            "collectedAt",
            "decidedBy",
            "via",
            "publicKey",
        ),
        description="With ?polls=omit, lastPollAt, pollCount and clientAddress are left out",
    ),
    "User": _closed(
        {
            "username": TEXT,
            "method": {"enum": ["password", "csr"]},
            "roles": ROLES,
            "permissions": PERMISSIONS,
            "createdAt": TIME,
            "certificateSerial": {"type": ["string", "null"], "description": "Hexadecimal, of the current certificate"},
            "certificateNotAfter": MAYBE_TIME,
            "certificateRenewAfter": MAYBE_TIME,
            "certificateStatus": {
                "enum": ["valid", "renew", "expired", None],
                "description": "'renew' from renewAfter on (it expires soon); null for a password user",
            },
            "certificateSha256": {
                "type": ["string", "null"],
                "description": "The SHA-256 fingerprint of the current certificate's DER",
            },
        }
    ),
    "Identity": _closed(
        {"username": TEXT, "roles": ROLES, "permissions": PERMISSIONS, "method": {"enum": ["password", "certificate"]}}
    ),
    "Role": _closed({"name": TEXT, "description": TEXT}),
    "AuditEntry": _closed(
        {
            "id": {"type": "integer"},
            "at": TIME,
            "actor": {
                "type": "string",
                "description": "The administrator by name ('admin': the quick start's token), or the client's username",
            },
            "address": MAYBE_TEXT,
            "action": {"type": "string", "description": "request, unlock, lock, approve, deny, forget, remove user"},
            "username": MAYBE_TEXT,
            "details": {"type": ["object", "null"]},
        }
    ),
    "AuditPage": _closed(
        {
            "entries": _list("AuditEntry"),
            "next": {"type": ["integer", "null"], "description": "Pass as 'before' for the next page"},
        }
    ),
    "SignIn": _closed(
        {
            "tokenFrom": {"enum": ["file", "flag", "environment"]},
            "file": {**MAYBE_TEXT, "description": "The token's file, as the server was started (tokenFrom 'file')"},
        },
        description="Where the administrator token is kept; never the token",
    ),
    "Removal": _closed({"status": {"enum": ["forgotten", "removed"]}, "username": TEXT}),
    "ClientReport": _closed(
        {
            "clean": {"type": "boolean", "description": "No client did anything wrong"},
            "varied": _closed(
                {"busy": {"type": "integer", "minimum": 0}, "lost": {"type": "integer", "minimum": 0}},
                description="How often a 429 or 503 stood in for an answer, and how often an answer was lost",
            ),
            "clients": {
                "type": "array",
                "items": _closed(
                    {
                        "username": TEXT,
                        "address": TEXT,
                        "requests": {"type": "integer", "minimum": 0},
                        "findings": {
                            "type": "array",
                            "items": _closed(
                                {
                                    "at": {"type": "number", "description": "Seconds since the server started"},
                                    "rule": {"type": "string", "description": "The SPEC.md id of section 9"},
                                    "message": TEXT,
                                }
                            ),
                            "description": "The first findings, 20 at most",
                        },
                        "moreFindings": {"type": "integer", "minimum": 0, "description": "Findings beyond those"},
                    }
                ),
            },
            "unfollowed": {
                "type": "integer",
                "minimum": 0,
                "description": "Registrations of clients beyond the 10,000 the report follows",
            },
        },
        description="SPEC section 9: what each client did wrong, under --test-clients",
    ),
}

HEADERS: dict[str, Schema] = {
    "Retry-After": {
        "description": "Seconds to wait before sending the request again",
        "schema": {"type": "integer", "minimum": 1},
    },
    "WWW-Authenticate": {"description": "The scheme to authenticate with", "schema": TEXT},
    "ETag": {"description": "The listing's validator: send it back as If-None-Match", "schema": TEXT},
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "adminToken": {"type": "http", "scheme": "bearer", "description": "The administrator's token"},
    "basic": {"type": "http", "scheme": "basic", "description": "A registered client's username and password"},
    "clientCertificate": {"type": "mutualTLS", "description": "The certificate the registry issued to the client"},
}


# --- Route tables: keyed by the handler's name, its access, or a status ----

# Who may call a route, as alternatives; [] is anyone.
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "public": [],
    "admin": [{"adminToken": []}],
    "client": [{"basic": []}, {"clientCertificate": []}],
    "certificate": [{"clientCertificate": []}],
}

# The JSON body a handler reads: (schema name, whether it is required).
BODIES: dict[str, tuple[str, bool]] = {
    "register": ("Registration", True),
    "unlock": ("Unlock", False),
    "approve": ("Grant", False),
    "deny": ("Denial", False),
    "renew": ("Renewal", True),
}

# What a handler answers when it succeeds: status -> content.
SUCCESS: dict[str, dict[int, Schema]] = {
    "register": {201: _json(_ref("ApprovedAnswer")), 202: _json(_ref("PendingAnswer"))},
    "status": {200: _json(_ref("Status"))},
    "unlock": {200: _json(_ref("Status"))},
    "lock": {200: _json(_ref("Status"))},
    "requests": {200: _json(_list("Request"))},
    "approve": {200: _json(_ref("User"))},
    "deny": {200: _json(_ref("Request"))},
    "forget": {200: _json(_ref("Removal"))},
    "roles": {200: _json(_list("Role"))},
    "sign_in": {200: _json(_ref("SignIn"))},
    "audit": {200: _json(_ref("AuditPage"))},
    "users": {200: _json(_list("User"))},
    "remove_user": {200: _json(_ref("Removal"))},
    "ca": {200: {PEM: {"schema": TEXT}}},
    "crl": {200: {PKIX_CRL: {"schema": {"type": "string", "contentEncoding": "binary"}}}},
    "crl_pem": {200: {PEM: {"schema": TEXT}}},
    "renew": {201: _json(_ref("RenewedAnswer"))},
    "client_report": {200: _json(_ref("ClientReport"))},
    "whoami": {200: _json(_ref("Identity"))},
    "openapi": {200: _json({"type": "object", "description": "This document"})},
    "page": {200: {STATIC_TYPES[0]: {"schema": TEXT}}},
    "static": {200: {kind: {"schema": TEXT} for kind in STATIC_TYPES}},
}

# What a status means on a route, where its phrase alone says too little.
NOTES: dict[str, dict[int, str]] = {
    "register": {
        201: "Approved: the user exists and the request matches the approved one (sent again on every repeat)",
        202: "Pending: a new request was stored, or this is a poll of one",
        400: "Malformed (malformed_request): the shape of SPEC section 1, or a CSR that fails to parse or verify",
        403: "Denied (denied): the administrator denied this request; 'reason' says why",
        409: "Conflict: username_taken, or duplicate_request (another request for the username is stored)",
        413: "The body is over the limit; it was not parsed",
        422: "Against policy (policy_violation): username, password, role or CSR key",
        423: "Locked: a new request while the registry is locked; nothing was stored",
        429: "Too many new requests from this address (when a rate limit is set)",
        503: "Full (registry_full): as many pending requests as the registry keeps; or broker_unavailable: the MQTT"
        " broker could not be given a password user's account yet (SPEC section 11)",
    },
    "approve": {409: "not_pending: the request was already decided", 422: "A role outside the catalog, or no CA"},
    "deny": {409: "not_pending: the request was already decided"},
    "requests": {400: "'polls' is neither 'include' nor 'omit'"},
    "forget": {409: "not_pending: the request is approved (remove its user instead)"},
    "whoami": {401: "Not a registered client", 429: "Too many failed sign-ins for this username"},
    "renew": {
        201: "Renewed (same key) or re-keyed (new key); a repeated renewal answers the certificate it issued",
        400: "A malformed body or CSR, or a CSR whose CN is not your username",
        401: "The certificate presented is not current: unknown, revoked, expired, of a removed user, or none",
        422: "A key the policy refuses",
    },
    "crl": {404: "The registry has no CA"},
    "client_report": {404: "The server was not started with --test-clients"},
    "crl_pem": {404: "The registry has no CA"},
}

# What a status means on any route, where its phrase alone says too little.
STATUS_NOTES: dict[int, str] = {
    304: "Not modified: the listing is the one whose ETag came in If-None-Match",
    401: "The credentials are missing or wrong; nothing happened",
}

# Headers that go with a status whatever the route.
STATUS_HEADERS: dict[int, tuple[str, ...]] = {
    304: ("ETag",),
    202: ("Retry-After",),
    401: ("WWW-Authenticate",),
    423: ("Retry-After",),
    429: ("Retry-After",),
    503: ("Retry-After",),
}

# OpenAPI links (https://spec.openapis.org/oas/v3.1.0#link-object): the calls that take the username an
# answer names, so that a reader, and a tool such as Schemathesis's stateful phase, can follow the workflow.
LINKS: dict[str, dict[int, tuple[str, ...]]] = {
    "register": {202: ("approve", "deny", "forget"), 201: ("remove_user",)},
    "approve": {200: ("remove_user",)},
    "deny": {200: ("forget",)},
}
BY_USERNAME = {"username": "$response.body#/username"}

AUDIT_LARGEST_ID = 2**62  # server.App.audit refuses more
QUERIES: dict[str, list[Schema]] = {
    "requests": [
        {
            "name": "polls",
            "in": "query",
            "description": "'omit' leaves the poll statistics out, so that the ETag changes with decisions only",
            "schema": {"enum": ["include", "omit"], "default": "include"},
        }
    ],
    "audit": [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        {
            "name": "before",
            "in": "query",
            "description": "Entries older than this id: the 'next' of the previous page",
            "schema": {"type": "integer", "minimum": 1, "maximum": AUDIT_LARGEST_ID},
        },
    ],
}

DESCRIPTION = (
    "Client self-registration (SPEC.md): a client asks to be registered and polls by sending the same request "
    "again; an administrator unlocks the registry and approves or denies what is pending."
)
OTHER_ERRORS = (
    "Any route may also answer 400 (bad_framing: a request line, header or Host that RFC 9112 refuses, or a "
    "Transfer-Encoding other than chunked), 404 (unknown path), 405 (a method the server knows that the path "
    "does not take, with Allow), 411 (a chunked body), 413 (a body over the limit), 414 or 431 (a request line "
    "or headers over the limit), 501 (a method the server does not recognise), 505 (HTTP/2 or later on this "
    "connection) or 500 (internal_error, with no details)"
)


class Route(Protocol):
    """What this module reads of a line of ``server.ROUTES``."""

    method: str
    pattern: str
    handler: str
    access: str
    summary: str
    statuses: tuple[int, ...]


# --- The document -----------------------------------------------------------


def document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``server.ROUTES``): a fresh dict on every call."""
    paths: dict[str, dict[str, Any]] = {}
    for route, operation_id in zip(routes, _operation_ids(routes), strict=True):
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route, operation_id)
    components = {"schemas": SCHEMAS, "headers": HEADERS, "securitySchemes": SECURITY_SCHEMES}
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {"title": "Client registry", "version": "1.0.0", "description": DESCRIPTION},
            "paths": paths,
            "components": components,
        }
    )


def _operation(route: Route, operation_id: str) -> dict[str, Any]:
    """One method on one path."""
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": route.summary,
        "security": SECURITY[route.access],
    }
    parameters = _path_parameters(route.pattern) + QUERIES.get(route.handler, [])
    if parameters:
        operation["parameters"] = parameters
    if route.handler in BODIES:
        name, required = BODIES[route.handler]
        operation["requestBody"] = {"required": required, "content": _json(_ref(name))}
    operation["responses"] = _responses(route)
    return operation


def _operation_ids(routes: Sequence[Route]) -> list[str]:
    """The handler's name; where one handler serves several paths, with the path."""
    uses = Counter(route.handler for route in routes)
    return [
        route.handler if uses[route.handler] == 1 else f"{route.handler}_{_slug(route.pattern)}" for route in routes
    ]


def _slug(pattern: str) -> str:
    return re.sub(r"\W+", "_", pattern).strip("_") or "root"


def _path_parameters(pattern: str) -> list[Schema]:
    return [
        {"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
        for name in PARAMETER.findall(pattern)
    ]


def _responses(route: Route) -> dict[str, Any]:
    """A response for every status of the route, plus 401 where it authenticates."""
    statuses = set(route.statuses) | ({401} if route.access != "public" else set())
    responses = {str(status): _response(route.handler, status) for status in sorted(statuses)}
    responses["default"] = {"description": OTHER_ERRORS, "content": _json(_ref("Error"))}
    return responses


def _response(handler: str, status: int) -> dict[str, Any]:
    note = NOTES.get(handler, {}).get(status) or STATUS_NOTES.get(status) or HTTPStatus(status).phrase
    response: dict[str, Any] = {"description": note}
    if status != HTTPStatus.NOT_MODIFIED:  # RFC 9110 section 15.4.5: a 304 has no content
        response["content"] = SUCCESS.get(handler, {}).get(status, _json(_ref("Error")))
    if status in STATUS_HEADERS:
        response["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in STATUS_HEADERS[status]}
    if status in LINKS.get(handler, {}):
        targets = LINKS[handler][status]
        response["links"] = {target: {"operationId": target, "parameters": BY_USERNAME} for target in targets}
    return response

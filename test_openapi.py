"""The OpenAPI document: it covers every route, it is well formed, and it says what the server answers.

The last test walks the registration workflow against a real server on port
0 and checks each answer against the document's response for its route and
status: the keys of every JSON body, its content type, its ``Retry-After``.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import openapi
import server
from conftest import ADMIN_TOKEN, make_csr

DOCUMENT = openapi.document(server.ROUTES)
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PYTHON_TYPES = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list, "null": type(None)}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, operation) of a document."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def refs(node: object) -> Iterator[str]:
    """Every ``$ref`` anywhere in a JSON value."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (a JSON pointer, RFC 6901) to what it names."""
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        schema = document
        for part in ref[2:].split("/"):
            schema = schema[part.replace("~1", "/").replace("~0", "~")]
    return schema


def assert_fits(value: object, schema: dict[str, Any], where: str = "body") -> None:
    """A tiny schema check: ``$ref``, ``type``, ``enum``/``const``, and exactly the declared keys."""
    schema = resolve(DOCUMENT, schema)
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds:
        fits = any(isinstance(value, PYTHON_TYPES[kind]) for kind in kinds)
        assert fits and not (isinstance(value, bool) and "boolean" not in kinds), f"{where}: {value!r} is not {kinds}"
    if "enum" in schema or "const" in schema:
        assert value in schema.get("enum", [schema.get("const")]), f"{where}: {value!r} is not allowed"
    if isinstance(value, dict) and "properties" in schema:
        missing = set(schema.get("required", ())) - set(value)
        extra = set(value) - set(schema["properties"])
        assert not missing and not extra, f"{where}: missing {sorted(missing)}, undeclared {sorted(extra)}"
        for key, item in value.items():
            assert_fits(item, schema["properties"][key], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            assert_fits(item, schema["items"], f"{where}[{index}]")


# --- The document against the route table ----------------------------------


def test_every_route_is_in_the_document_and_nothing_else() -> None:
    served = {(route.method.lower(), route.pattern) for route in server.ROUTES}
    documented = {(method, path) for method, path, _ in operations(DOCUMENT)}
    assert documented == served


@pytest.mark.parametrize("route", server.ROUTES, ids=lambda route: f"{route.method} {route.pattern}")
def test_every_status_of_a_route_is_documented(route: server.Route) -> None:
    operation = DOCUMENT["paths"][route.pattern][route.method.lower()]
    expected = {str(status) for status in route.statuses} | ({"401"} if route.access != "public" else set())
    assert expected <= set(operation["responses"])
    assert set(operation["responses"]) - expected == {"default"}
    assert operation["summary"] == route.summary


@pytest.mark.parametrize(
    ("access", "schemes"),
    [
        ("public", []),
        ("admin", [("http", "bearer")]),
        ("client", [("http", "basic"), ("mutualTLS", None)]),
        ("certificate", [("mutualTLS", None)]),
    ],
)
def test_security_follows_access(access: str, schemes: list[tuple[str, str | None]]) -> None:
    defined = DOCUMENT["components"]["securitySchemes"]
    for route in (route for route in server.ROUTES if route.access == access):
        security = DOCUMENT["paths"][route.pattern][route.method.lower()]["security"]
        used = [
            (defined[name]["type"], defined[name].get("scheme")) for requirement in security for name in requirement
        ]
        assert used == schemes, route.pattern


def test_the_bodies_a_route_takes() -> None:
    bodies = {
        operation["operationId"]: resolve(DOCUMENT, operation["requestBody"]["content"]["application/json"]["schema"])
        for _, _, operation in operations(DOCUMENT)
        if "requestBody" in operation
    }
    assert set(bodies) == {"register", "unlock", "approve", "deny", "renew"}
    register = bodies["register"]
    assert register["additionalProperties"] is False
    assert register["required"] == ["username"]
    assert register["oneOf"] == [{"required": ["password"]}, {"required": ["csr"]}]
    assert set(register["properties"]) == {"username", "password", "csr", "roles", "permissions", "context"}
    assert bodies["unlock"]["properties"]["duration"]["type"] == "integer"
    assert set(bodies["approve"]["properties"]) == {"roles", "permissions"}
    assert set(bodies["deny"]["properties"]) == {"reason"}
    assert (bodies["renew"]["required"], set(bodies["renew"]["properties"])) == (["csr"], {"csr"})


def test_retry_after_goes_with_202_423_429_503() -> None:
    for _, _, operation in operations(DOCUMENT):
        for status, response in operation["responses"].items():
            declared = "Retry-After" in response.get("headers", {})
            assert declared == (status in {"202", "423", "429", "503"}), (operation["operationId"], status)


def test_media_types_are_those_the_server_sends() -> None:
    assert openapi.PEM == server.PEM
    assert openapi.PKIX_CRL == server.PKIX_CRL
    assert set(openapi.STATIC_TYPES) == set(server.STATIC_TYPES.values())


# --- The document as OpenAPI 3.1 ------------------------------------------------


def test_the_document_is_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    assert isinstance(DOCUMENT["info"]["title"], str) and isinstance(DOCUMENT["info"]["version"], str)
    ids = [operation["operationId"] for _, _, operation in operations(DOCUMENT)]
    assert len(ids) == len(set(ids))
    for method, path, operation in operations(DOCUMENT):
        assert path.startswith("/") and method in METHODS
        in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert in_path == set(openapi.PARAMETER.findall(path)), path
        assert all(p["required"] for p in operation.get("parameters", []) if p["in"] == "path")
        for status, response in operation["responses"].items():
            assert status == "default" or (status.isdigit() and len(status) == 3)
            assert response["description"]


def test_every_ref_resolves_to_a_component() -> None:
    found = set(refs(DOCUMENT))
    assert found
    for ref in found:
        assert ref.startswith("#/components/"), ref
        assert isinstance(resolve(DOCUMENT, {"$ref": ref}), dict), ref


def test_the_document_is_plain_json() -> None:
    assert json.loads(json.dumps(DOCUMENT)) == DOCUMENT


def test_the_checker_rejects_missing_and_undeclared_keys() -> None:
    pending = {"$ref": "#/components/schemas/PendingAnswer"}
    assert_fits({"status": "pending", "username": "sensor-0003", "pairingId": "4f1c2a"}, pending)
    for wrong in (
        {"status": "pending", "username": "u"},
        {"status": "pending", "username": "u", "pairingId": "", "x": 1},
    ):
        with pytest.raises(AssertionError):
            assert_fits(wrong, pending)


# --- The real server ----------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[server.RegistryServer]:
    """The real server over plain HTTP on a free port, in a thread."""
    srv = server.build(server.Config(port=0, http=True, data_dir=tmp_path, admin_token=ADMIN_TOKEN, scrypt_n=16))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.app.core.close()


def call(
    srv: server.RegistryServer, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to the live server: status, headers, body."""
    host, port = srv.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, data, headers or {})
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


def test_the_server_serves_the_document(live: server.RegistryServer) -> None:
    """Proves ADMIN-4.8-EXTRA."""
    status, headers, body = call(live, "GET", "/api/openapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == openapi.document(server.ROUTES)


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REGISTER = "/api/client-registry/register"
SENSOR = {"username": "sensor-0003", "password": "s3cret-pass", "roles": ["minimum"]}
INTRUDER = {"username": "sensor-0004", "password": "another-pass"}
PERMISSION = {"resource": "plant/+/temperature", "operation": "read", "context": "mqtt"}


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def test_real_answers_are_what_the_document_says(live: server.RegistryServer) -> None:
    agent = {"username": "agent-0001", "csr": make_csr("agent-0001")}
    steps = [
        ("POST", REGISTER, SENSOR, {}, 423),
        ("GET", "/api/client-registry", None, {}, 401),
        ("POST", "/api/client-registry/unlock", {"duration": 60_000}, ADMIN, 200),
        ("POST", REGISTER, SENSOR, {}, 202),
        ("POST", REGISTER, SENSOR, {}, 202),
        ("POST", REGISTER, agent, {}, 202),
        ("POST", REGISTER, INTRUDER, {}, 202),
        ("POST", REGISTER, {"user": "sensor-0005"}, {}, 400),
        ("POST", REGISTER, {"username": "s", "password": "abc"}, {}, 422),
        ("GET", "/api/client-registry", None, ADMIN, 200),
        ("GET", "/api/client-registry/requests", None, ADMIN, 200),
        ("POST", "/api/client-registry/requests/sensor-0003/approve", {"roles": [], "permissions": [PERMISSION]},
         ADMIN, 200),
        ("POST", "/api/client-registry/requests/agent-0001/approve", None, ADMIN, 200),
        ("POST", "/api/client-registry/requests/sensor-0004/deny", {"reason": "not one of ours"}, ADMIN, 200),
        ("POST", "/api/client-registry/requests/sensor-0003/approve", None, ADMIN, 409),
        ("POST", "/api/client-registry/requests/nobody/deny", None, ADMIN, 404),
        ("POST", REGISTER, SENSOR, {}, 201),
        ("POST", REGISTER, agent, {}, 201),
        ("POST", REGISTER, INTRUDER, {}, 403),
        ("POST", REGISTER, {**SENSOR, "password": "other-pass"}, {}, 409),
        ("GET", "/api/auth/whoami", None, basic("sensor-0003", "s3cret-pass"), 200),
        ("GET", "/api/auth/whoami", None, basic("sensor-0003", "wrong-pass"), 401),
        ("GET", "/api/users", None, ADMIN, 200),
        ("GET", "/api/client-registry/roles", None, ADMIN, 200),
        ("GET", "/api/client-registry/audit?limit=3", None, ADMIN, 200),
        ("GET", "/api/client-registry/audit?limit=0", None, ADMIN, 400),
        ("DELETE", "/api/client-registry/requests/sensor-0004", None, ADMIN, 200),
        ("DELETE", "/api/users/sensor-0003", None, ADMIN, 200),
        ("GET", "/api/client-registry/ca", None, {}, 200),
        ("GET", "/admin", None, {}, 200),
        ("POST", "/api/client-registry/lock", None, ADMIN, 200),
    ]  # fmt: skip
    for method, path, body, headers, expected in steps:
        status, answer_headers, data = call(live, method, path, body, headers)
        where = f"{method} {path} -> {status}"
        assert status == expected, f"{where}: {data!r}"
        response = documented_response(method, path, status)
        content_type = answer_headers["Content-Type"]
        assert content_type in response["content"], where
        if content_type == "application/json":
            assert_fits(json.loads(data), response["content"][content_type]["schema"], where)
        if "Retry-After" in response.get("headers", {}):
            assert answer_headers["Retry-After"].isdigit(), where


def documented_response(method: str, path: str, status: int) -> dict[str, Any]:
    """The document's response for a concrete request, found as the server routes it."""
    bare = path.partition("?")[0]
    route = next(r for r in server.ROUTES if r.method == method and r.regex.match(bare))
    return DOCUMENT["paths"][route.pattern][method.lower()]["responses"][str(status)]

"""Schemathesis against the real server: the OpenAPI document and the answers agree (issue 19, item 9).

The test runs ``schemathesis run .../api/openapi.json --checks all`` with
every phase (examples, coverage, fuzzing, stateful) against a real server on
port 0, and fails on any failure it reports; its output says how to replay
each one. Schemathesis signs in as the document's security schemes say: the
administrator's token, and for ``whoami`` the password of a client admitted
before the run.

Schemathesis generates what the document allows. Two things a registration
needs cannot be said in JSON Schema, so the hooks at the end of this module
(loaded by the Schemathesis process, not by pytest) supply them in the
requests that are meant to be valid: a CSR is signed by its key and names
the username as its Common Name (SPEC REG-2.2-CSR and REG-2.2-CN), and a role
is in the server's catalog, a setting of the server (REG-2.3-ROLE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import schemathesis

import server
from conftest import ADMIN_TOKEN, FakeClock, make_csr, serve

REPOSITORY = Path(__file__).parent
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# The coverage phase sends every boundary case of the document whatever this
# says; each operation's fuzzing and the stateful phase stop at this many
# cases. At 100 the run takes about 25 s on a 2-core machine and tries about
# 2,100 cases; three runs at 500 (2 minutes each) found nothing more.
MAX_EXAMPLES = 100
TIMEOUT = 300
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
CLIENT = {"username": "schemathesis-client", "password": "schemathesis-pass"}

# Each setting that narrows what a check demands says why.
CONFIG = f"""
[auth.openapi.adminToken]
bearer = "{ADMIN_TOKEN}"

[auth.openapi.basic]
username = "{CLIENT["username"]}"
password = "{CLIENT["password"]}"

[phases.coverage]
# Every method Schemathesis probes but QUERY: QUERY is not a method of
# RFC 9110 (it is an IETF draft), and SPEC HTTP-8.1 answers a method the
# server does not recognise 501, as RFC 9110 section 15.6.2 says, where
# Schemathesis expects 405 (unsupported_method) and no 5xx (not_a_server_error).
unexpected-methods = ["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE"]

[checks.positive_data_acceptance]
# Schemathesis's list, plus 423: a new registration while the registry is
# locked (SPEC REG-2.4-LOCKED) is refused for the registry's state, not for
# its shape, as a 409 is; the phases lock the registry whenever they test
# the lock. The shape and the policy are checked before the lock (SPEC
# REG-2-ORDER), so a locked registry still answers 400 or 422 to a request
# that the document allows and the server does not.
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "423", "429", "5xx"]
"""


def test_schemathesis_finds_no_disagreement(tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    # The clock stands still, so that an unlock window the fuzzer drew (the
    # document allows 1 ms) stays open until a call locks the registry: the
    # stateful phase then meets an open one often enough to follow the links
    # from a registration to its approval and the removal of its user.
    with serve(tmp_path / "data", clock=FakeClock()) as instance:
        base = f"http://127.0.0.1:{instance.server_address[1]}"
        admit(base, CLIENT)
        command = [
            str(SCHEMATHESIS),
            "--config-file", str(config),
            "run", f"{base}/api/openapi.json",
            "--checks", "all",
            "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", str(MAX_EXAMPLES),
            "--generation-database", "none",
            "--no-color",
        ]  # fmt: skip
        env = os.environ | {"SCHEMATHESIS_HOOKS": __file__, "PYTHONPATH": str(REPOSITORY)}
        run = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-30_000:]}\n{run.stderr[-5_000:]}"


def admit(base: str, client: dict[str, str]) -> None:
    """Register ``client`` and approve it, as the workflow does, so that ``whoami`` has someone to answer."""
    steps = [
        ("/api/client-registry/unlock", {}, ADMIN, 200),
        ("/api/client-registry/register", client, {}, 202),
        (f"/api/client-registry/requests/{client['username']}/approve", {}, ADMIN, 200),
        ("/api/client-registry/lock", {}, ADMIN, 200),
    ]
    for path, body, headers, expected in steps:
        request = urllib.request.Request(base + path, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == expected, path


# --- Hooks, run inside the Schemathesis process -----------------------------

REGISTER = "POST /api/client-registry/register"
APPROVE = "POST /api/client-registry/requests/{username}/approve"
CATALOG = tuple(server.load_roles(None))
# The codes of HTTP's own refusals (openapi.OTHER_ERRORS), which any route may answer.
FRAMING_CODES = {
    error.code for error in (server.BadFraming, server.MethodNotAllowed, server.UnknownMethod, server.PayloadTooLarge)
}.union(error.code for error in server.REFUSALS.values())


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """In a request meant to be valid, a real CSR for the username and roles from the catalog."""
    body = case.body
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(body, dict):
        return case
    if case.operation.label in (REGISTER, APPROVE) and isinstance(body.get("roles"), list):
        body["roles"] = [role if role in CATALOG else CATALOG[0] for role in body["roles"]]
    if case.operation.label == REGISTER and isinstance(body.get("csr"), str):
        body["csr"] = make_csr(body["username"])
    return case


@schemathesis.check
def status_of_the_route(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """status_code_conformance, which passes whatever the status when an operation has a "default" response.

    Every operation here has one, for HTTP's own refusals; any other status
    must be one that the route lists (``server.ROUTES``).
    """
    if str(response.status_code) in case.operation.responses.status_codes:
        return
    try:
        code = response.json().get("error")
    except (ValueError, AttributeError):
        code = None
    assert code in FRAMING_CODES, f"{response.status_code} ({code}) is not a status of {case.operation.label}"

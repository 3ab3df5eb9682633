"""The conformance kit against our server, and against registries broken on purpose.

The reference server passes every MUST of the kit. Each broken registry is
the real server with one rule of the core changed by a small patch (applied
before the server starts: ``serve`` runs it in this process); the kit must
catch it, and name the requirement the change breaks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import conformance
import fastpath
import registry
from conftest import ADMIN_TOKEN, serve
from registry import Decision, State

SPEC = Path(__file__).with_name("SPEC.md")
# The kit sends a CSR with an empty Common Name, which cryptography reads with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


def run_kit(tmp_path: Path, *options: str, http: bool = False, token: bool = True) -> dict[str, Any]:
    """Run the kit's command line against a fresh server; its JSON report, exit status, printed lines, registry."""
    data, report = tmp_path / "data", tmp_path / "kit.json"
    lines: list[str] = []
    with serve(data, http=http) as instance:
        argv = [instance.url, "--json", str(report), *options]
        argv += ["--admin-token", ADMIN_TOKEN] if token else []
        argv += [] if http else ["--ca-file", str(data / "ca.pem")]
        status = conformance.main(argv, report=lines.append)
        core = instance.app.core
        left = {"requests": core.requests(), "users": core.users(), "status": core.status()}
    document = json.loads(report.read_text())
    return document | {"exit": status, "printed": "\n".join(lines), "left": left}


def results(document: dict[str, Any]) -> dict[str, str]:
    """Each check's result, by name."""
    return {check["check"]: check["result"] for check in document["checks"]}


def test_the_reference_server_passes_every_check_within_a_minute(tmp_path: Path) -> None:
    junit = tmp_path / "kit.xml"
    started = time.monotonic()
    document = run_kit(tmp_path, "--junit", str(junit))
    elapsed = time.monotonic() - started

    assert document["exit"] == 0, document["printed"]
    assert {name for name, result in results(document).items() if result != "PASS"} == {"no-ca"}
    assert elapsed < 60
    # It leaves the registry as it found it: nothing of the run, and locked.
    assert document["left"]["requests"] == [] and document["left"]["users"] == []
    assert document["left"]["status"]["locked"] is True
    # JUnit: one testcase per check, its classname the section, named by its ids.
    cases = ET.parse(junit).getroot().findall("./testsuite/testcase")
    assert len(cases) == len(conformance.CHECKS)
    assert {case.get("classname") for case in cases} == {f"section {n}" for n in [*"123457", "10"]}
    order = next(case for case in cases if case.get("name").startswith("order "))
    assert "REG-2-ORDER" in order.get("name")


def test_over_plain_http_the_mutual_tls_checks_skip_and_say_why(tmp_path: Path) -> None:
    document = run_kit(tmp_path, http=True)

    assert document["exit"] == 0, document["printed"]
    skipped = {c["check"]: c["why"] for c in document["checks"] if c["result"] == "SKIP"}
    tls = {c.name for c in conformance.CHECKS if "tls" in c.needs}
    assert set(skipped) == tls | {"no-ca"}
    assert all("mutual TLS needs https" in skipped[name] for name in tls)


def test_without_the_token_the_kit_skips_what_needs_it_and_stores_nothing(tmp_path: Path) -> None:
    document = run_kit(tmp_path, token=False)

    assert document["exit"] == 0, document["printed"]
    skipped = {c["check"]: c["why"] for c in document["checks"] if c["result"] == "SKIP"}
    assert {c.name for c in conformance.CHECKS if "admin" in c.needs} <= set(skipped)
    assert "no administrator token" in skipped["approved"]
    assert results(document)["shape"] == results(document)["token"] == "PASS"
    assert document["left"]["requests"] == []


def test_a_run_without_the_token_says_it_was_partial_and_require_full_fails_it(tmp_path: Path) -> None:
    """Issue 26 item 4: "13 PASS, 0 FAIL, 23 SKIP" and exit 0 read as a pass: the summary says what it left out."""
    needing = sum("admin" in c.needs for c in conformance.CHECKS)
    partial = f"a partial run: {needing} checks skipped ({needing} for want of --admin-token)"

    document = run_kit(tmp_path / "lenient", token=False)
    assert document["exit"] == 0, document["printed"]
    assert partial in document["printed"]

    strict = run_kit(tmp_path / "strict", "--require-full", "--only", "shape", "approved", token=False)
    assert strict["exit"] == 1 and results(strict) == {"shape": "PASS", "approved": "SKIP"}
    assert "a partial run: 1 check skipped (1 for want of --admin-token)" in strict["printed"]

    full = run_kit(tmp_path / "full", "--require-full", "--only", "shape", "approved")
    assert full["exit"] == 0 and "partial" not in full["printed"]


def unusable(url: str, *options: str) -> tuple[int, list[str]]:
    """The kit's exit status and printed lines against ``url``."""
    lines: list[str] = []
    return conformance.main([url, *options], lines.append), lines


def test_a_wrong_token_scheme_or_address_is_one_line_and_exit_2_before_any_check(tmp_path: Path) -> None:
    """Issue 26 item 4: not 22 times the same 401, nor 20 failures each showing the server's hint."""
    with serve(tmp_path / "tls", http=False) as instance:
        port = instance.server_address[1]
        trust = ["--ca-file", str(tmp_path / "tls" / "ca.pem")]
        assert unusable(instance.url, "--admin-token", "not-the-token", *trust) == (
            2,
            [
                "conformance: the registry refuses the administrator token (401 to GET /api/client-registry):"
                " check --admin-token, or leave it out for a partial run"
            ],
        )
        plain = f"http://127.0.0.1:{port}"
        assert unusable(plain, "--admin-token", ADMIN_TOKEN) == (
            2,
            [f"conformance: {plain} speaks HTTPS: use https://127.0.0.1:{port}"],
        )
        assert instance.app.core.requests() == []
    with serve(tmp_path / "http") as instance:
        port = instance.server_address[1]
        assert unusable(f"https://127.0.0.1:{port}", "--insecure") == (
            2,
            [f"conformance: https://127.0.0.1:{port} speaks plain HTTP: use http://127.0.0.1:{port}"],
        )
    status, [line] = unusable(f"http://127.0.0.1:{port}")  # that server has stopped: nothing listens there
    assert status == 2 and line.startswith(f"conformance: no answer from http://127.0.0.1:{port}: ")


def test_a_reproduction_names_the_token_as_the_readme_does() -> None:
    """Issue 26 item 4: the README sets $TOKEN; the kit's curl lines use the same name."""
    exchange = conformance.Exchange(
        "GET", "https://127.0.0.1:8443/api/client-registry", {"Authorization": "Bearer s3cret"}, b"", token="s3cret"
    )
    assert exchange.curl().endswith(""" -H 'Authorization: Bearer '"$TOKEN"''""")
    assert "s3cret" not in exchange.describe() and "Bearer $TOKEN" in exchange.describe()


def test_the_kit_puts_an_open_lock_back_as_it_found_it(tmp_path: Path) -> None:
    data, lines = tmp_path / "data", []
    with serve(data, http=True) as instance:
        core = instance.app.core
        core.unlock({"duration": 600_000})
        found = datetime.fromisoformat(core.status()["unlockedUntil"])
        status = conformance.main([instance.url, "--admin-token", ADMIN_TOKEN, "--only", "lock-scope"], lines.append)
        after = core.status()

    assert status == 0, "\n".join(lines)
    assert after["locked"] is False
    assert abs(datetime.fromisoformat(after["unlockedUntil"]) - found) < timedelta(seconds=2)


# --- Registries broken on purpose, one rule each ---------------------------------


def policy_before_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 and 422 swapped in order: the policy is checked before the shape."""
    parse = registry.parse_registration

    def policy_first(payload: object) -> registry.Registration:
        if isinstance(payload, dict) and isinstance(payload.get("username"), str):
            password = payload.get("password") if isinstance(payload.get("password"), str) else None
            early = registry.Registration(payload["username"], password, None, registry.Rights(), None)
            problems = registry.policy_problems(early, {}, None)
            if problems:
                raise registry.PolicyViolation(problems[0])
        return parse(payload)

    monkeypatch.setattr(registry, "parse_registration", policy_first)


def lock_not_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock does not keep new requests out."""
    decide = registry.decide
    monkeypatch.setattr(registry, "decide", lambda stored, matches, **state: decide(stored, matches, **state | {
        "locked": False}))  # fmt: skip


def lock_keeps_polls_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls of a pending request are 423 while locked (the fast path's remembered polls too)."""
    decide = registry.Registry._decide

    def locked_polls(self: registry.Registry, registration: Any, csr: Any, address: str, now: int, **check) -> tuple:
        decision, row = decide(self, registration, csr, address, now, **check)
        if decision is Decision.POLL and not self._store.lock_window().is_open(now):
            return Decision.LOCKED, None
        return decision, row

    monkeypatch.setattr(registry.Registry, "_decide", locked_polls)
    monkeypatch.setattr(fastpath.FastRegistry, "_repeated_poll", lambda self, fingerprint, address: None)


def common_name_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSR's Common Name is not compared with the username."""

    def read_csr(self: registry.Registry, text: str, username: str) -> registry.CsrInfo:
        try:
            return self.ca.inspect_csr(text)
        except ValueError as error:
            raise registry.MalformedRequest(f"'csr' {error}") from None

    monkeypatch.setattr(registry.Registry, "_read_csr", read_csr)


def key_policy_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key a CSR may carry is accepted."""
    monkeypatch.setattr(registry, "key_accepted", lambda csr: True)


def context_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The context takes part in matching a poll."""
    matches = registry.Registry._matches
    monkeypatch.setattr(registry.Registry, "_matches", lambda self, registration, csr, row, password: matches(
        self, registration, csr, row, password) and registration.context == row["context"])  # fmt: skip


def changed_request_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed request beside a pending one is answered 202, as a poll."""
    monkeypatch.setitem(registry.STORED, (State.PENDING, False), Decision.POLL)


def redelivery_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The approved request again is 409, as if the username were taken."""
    monkeypatch.setitem(registry.STORED, (State.APPROVED, True), Decision.USERNAME_TAKEN)


def redelivery_reissues(monkeypatch: pytest.MonkeyPatch) -> None:
    """The approved request again gets a new certificate, not the one issued at approval."""
    approved = registry.Registry._approved_outcome

    def reissue(self: registry.Registry, name: str) -> registry.Outcome:
        outcome = approved(self, name)
        if "certificate" not in outcome.body:
            return outcome
        certificate = x509.load_pem_x509_certificate(outcome.body["certificate"].encode())
        fresh = self.ca.issue_client_certificate(conformance.spki(certificate.public_key()), name, self.clock())
        return registry.Outcome(outcome.status, outcome.body | {"certificate": fresh.pem}, outcome.headers)

    monkeypatch.setattr(registry.Registry, "_approved_outcome", reissue)


def denial_without_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """A denial drops the administrator's reason."""
    monkeypatch.setattr(registry, "parse_reason", lambda body: "")


def narrowed_grant_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """An approval grants what was requested, whatever its body says."""
    monkeypatch.setattr(registry, "parse_grant", lambda body, catalog: {})


def retry_after_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 202 carries no Retry-After."""
    body = {"status": "pending"}
    monkeypatch.setattr(registry, "pending_outcome", lambda username, pairing, retry: registry.Outcome(
        HTTPStatus.ACCEPTED, body | {"username": username, "pairingId": pairing}))  # fmt: skip


def window_never_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unlock window stays open past its end."""
    monkeypatch.setattr(registry.LockWindow, "is_open", lambda self, now: self.until is not None)


def revocation_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing a user revokes none of its certificates."""
    monkeypatch.setattr(registry.Store, "revoke", lambda self, username, now, reason: 0)


BROKEN: list[tuple[Callable[[pytest.MonkeyPatch], None], str]] = [
    (policy_before_shape, "REG-2-ORDER"),
    (lock_not_enforced, "REG-2.4-LOCKED"),
    (lock_keeps_polls_out, "REG-2.5-LOCK-SCOPE"),
    (common_name_not_compared, "REG-2.2-CN"),
    (key_policy_ignored, "REG-2.3-KEY"),
    (context_matched, "REG-2.4-MATCH"),
    (changed_request_polls, "REG-2.4-PENDING"),
    (redelivery_refused, "REG-2.4-USER"),
    (redelivery_reissues, "REG-2.4-REDELIVER"),
    (denial_without_reason, "REG-2.4-DENIED"),
    (narrowed_grant_ignored, "ADMIN-4.4-APPROVE-BODY"),
    (retry_after_missing, "REG-2.5-RETRY-AFTER"),
    (window_never_closes, "LOCK-3.2"),
    (revocation_forgotten, "LIFE-7.3-REVOKE"),
]


@pytest.mark.parametrize(("breakage", "requirement"), BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_a_broken_registry_is_caught_by_the_requirement_it_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: Callable, requirement: str
) -> None:
    breakage(monkeypatch)
    document = run_kit(tmp_path, "--only", requirement)

    assert document["exit"] == 1
    assert document["requirements"][requirement] == "FAIL", document["printed"]
    failed = next(c for c in document["checks"] if c["requirement"] == requirement)
    assert failed["result"] == "FAIL" and failed["exchange"] and failed["curl"].startswith("curl ")
    # The printed report: the requirement, what it expected, the exchange and the way to send it again.
    for part in (f"{requirement} (MUST)", "expected:", "sent:", "received:", "reproduce: curl"):
        assert part in document["printed"]
    # It still cleans up after itself.
    assert document["left"]["requests"] == [] and document["left"]["users"] == []


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_curl_line_of_a_failure_reproduces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changed_request_polls(monkeypatch)
    data, report, lines = tmp_path / "data", tmp_path / "kit.json", []
    with serve(data, http=True) as instance:
        argv = [instance.url, "--admin-token", ADMIN_TOKEN, "--only", "matching", "--json", str(report)]
        # Keep the kit's requests: the reproduction needs the pending one it polled.
        monkeypatch.setattr(conformance.Kit, "finish", lambda kit: "kept")
        conformance.main(argv, lines.append)
        failed = next(c for c in json.loads(report.read_text())["checks"] if c["result"] == "FAIL")
        again = subprocess.run(["bash", "-c", failed["curl"]], capture_output=True, text=True, timeout=30,
                               env=os.environ | {"TOKEN": ADMIN_TOKEN})  # fmt: skip

    assert again.stdout.startswith(f"HTTP/1.1 {failed['exchange']['status']} ")


def test_the_kit_refuses_an_unknown_id() -> None:
    with pytest.raises(SystemExit) as exit_:
        conformance.main(["http://127.0.0.1:1", "--only", "REG-9-NOTHING"], lambda line: None)
    assert exit_.value.code == 2


# --- SPEC.md's table -------------------------------------------------------------------


def test_the_kit_knows_every_requirement_of_the_spec_with_its_strength() -> None:
    declared = dict(re.findall(r"\*\*([A-Z]+-[\w.-]+)\*\* \((MUST|SHOULD)", SPEC.read_text()))
    assert declared == {requirement: row[0] for requirement, row in conformance.REQUIREMENTS.items()}


def test_every_requirement_is_checked_or_says_why_not() -> None:
    covered = {requirement for check in conformance.CHECKS for requirement in check.requirements}
    for requirement in conformance.REQUIREMENTS:
        assert requirement in covered or conformance.NOT_CHECKED.get(requirement), requirement


def test_the_spec_ends_with_the_kit_s_table() -> None:
    """The kit's columns of SPEC.md's table; the last, "proved by", is tools/spec_proofs.py's (test_docs.py)."""
    spec_table = SPEC.read_text().rstrip().split("\n\n")[-1]
    kit_columns = "\n".join(row.rsplit("|", 2)[0] + "|" for row in spec_table.splitlines())
    assert kit_columns == conformance.table()

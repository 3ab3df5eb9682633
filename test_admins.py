"""Administrators by name (issue 23 item 7): each has a token of its own, and every call of theirs is attributed.

Proves ADMIN-4.1-TOKEN and ADMIN-4.9-ATTRIBUTED: ``server.py --add-admin``
prints a token once and keeps only its hash; the quick start's token is the
administrator ``admin``; the audit, the requests listing (``decidedBy``)
and the access log say who decided; a withdrawn token opens nothing.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from pathlib import Path

import pytest

import admins
import server
from conftest import ADMIN_TOKEN, call, make_csr, serve

REQUESTS = "/api/client-registry/requests"


def run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """``server.py argv`` that does its work and exits 0: what it printed."""
    server.main(list(argv))
    return capsys.readouterr().out


def added(capsys: pytest.CaptureFixture, data: Path, name: str) -> str:
    """The token ``--add-admin name`` printed."""
    printed = run(capsys, "--data-dir", str(data), "--add-admin", name)
    found = re.fullmatch(rf"Administrator {name}: (\S+)\n\(shown once: .*\)\n", printed)
    assert found, printed
    return found[1]


def test_a_named_administrator_s_token_is_shown_once_and_only_its_hash_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    token = added(capsys, tmp_path, "alice")

    assert len(token) >= admins.MIN_TOKEN_LENGTH
    kept = tmp_path / admins.FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert all(token not in path.read_text(errors="replace") for path in tmp_path.iterdir() if path.is_file())
    assert run(capsys, "--data-dir", str(tmp_path), "--list-admins") == (
        f"admin (the token kept in {tmp_path / 'admin-token'})\nalice\n"
    )


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("admin", "'admin' is the quick start's token (admin-token): choose another name"),
        ("alice", "'alice' is an administrator already: --remove-admin alice first to give a new token"),
        ("al ice", "'al ice' is not a name: letters, digits and . _ @ - (64 at most), a letter or digit first"),
    ],
)
def test_a_name_that_cannot_be_added_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, problem: str
) -> None:
    added(capsys, tmp_path, "alice")
    before = (tmp_path / admins.FILE).read_bytes()

    with pytest.raises(SystemExit) as stopped:
        server.main(["--data-dir", str(tmp_path), "--add-admin", name])

    assert stopped.value.code == f"server.py: {problem}"
    assert (tmp_path / admins.FILE).read_bytes() == before


def test_every_administrator_call_is_attributed_and_a_withdrawn_token_opens_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves ADMIN-4.9-ATTRIBUTED, ADMIN-4.1-TOKEN: the audit, the listing and the access log name who decided."""
    logging.getLogger("registry.access").setLevel(logging.INFO)
    alice, bob = added(capfd, tmp_path, "alice"), added(capfd, tmp_path, "bob")
    with serve(tmp_path) as running:
        url = running.url
        assert call(url, "POST", "/api/client-registry/unlock", token=ADMIN_TOKEN)[0] == 200
        for name in ("agent-0001", "agent-0002"):
            body = {"username": name, "csr": make_csr(name)}
            assert call(url, "POST", "/api/client-registry/register", body)[0] == 202
        assert call(url, "POST", f"{REQUESTS}/agent-0001/approve", token=alice)[0] == 200
        assert call(url, "POST", f"{REQUESTS}/agent-0002/deny", {"reason": "unknown"}, token=bob)[0] == 200
        assert call(url, "POST", f"{REQUESTS}/nobody/approve", token=bob)[0] == 404

        listing = {row["username"]: row["decidedBy"] for row in call(url, "GET", REQUESTS, token=alice)[1]}
        trail = call(url, "GET", "/api/client-registry/audit", token=alice)[1]["entries"]

        withdrawn = server.manage_admins(server.Config(data_dir=tmp_path, remove_admin="bob"))  # beside the server
        assert call(url, "GET", REQUESTS, token=bob)[0] == 401
        assert call(url, "GET", REQUESTS, token=alice)[0] == 200
        written, deadline = "", time.monotonic() + 10
        while f"GET {REQUESTS} 401" not in written and time.monotonic() < deadline:
            time.sleep(0.05)
            written += capfd.readouterr().err

    assert withdrawn == "Administrator bob removed: its token opens nothing from the next call on"
    assert listing == {"agent-0001": "alice", "agent-0002": "bob"}
    decisions = [(entry["action"], entry["actor"]) for entry in reversed(trail) if entry["action"] != "request"]
    assert decisions == [("unlock", "admin"), ("approve", "alice"), ("deny", "bob")]
    lines = written.splitlines()
    assert any(re.search(rf"POST {REQUESTS}/agent-0001/approve 200 \S+ 127\.0\.0\.1 alice$", line) for line in lines)
    assert any(re.search(rf"POST {REQUESTS}/nobody/approve 404 \S+ 127\.0\.0\.1 bob$", line) for line in lines)
    assert any(re.search(rf"GET {REQUESTS} 401 \S+ 127\.0\.0\.1$", line) for line in lines)
    assert run(capfd, "--data-dir", str(tmp_path), "--list-admins").splitlines()[1:] == ["alice"]


def test_a_token_is_compared_with_every_administrator_s(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No early exit: the time of a refusal does not tell how many administrators there are, or which matched."""
    tokens = [added(capsys, tmp_path, name) for name in ("alice", "bob", "carol")]
    compared = []
    real = admins.hmac.compare_digest
    administrators = admins.Administrators(tmp_path, ADMIN_TOKEN)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(admins.hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
        found = [administrators.who(token) for token in (ADMIN_TOKEN, *tokens, "x" * 40, "")]

    assert found == ["admin", "alice", "bob", "carol", None, None]
    assert len(compared) == 4 * 5  # four administrators, five tokens that were not empty

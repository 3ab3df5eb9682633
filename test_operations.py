"""Running the server as an operator does: start-up checks, the token's source, an online backup, the wrong scheme.

Issue 19 (operations) and issue 17 (what a newcomer meets): every mistake
stops the server with one line that says what to do, before anything is
made; a damaged data folder is never served nor silently replaced.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
from pathlib import Path

import pytest

import ca
import server
from conftest import ADMIN_TOKEN, START, call, make_csr, serve


def start_fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """``server.py argv`` stops at start with exit status 1; the one line it wrote."""

    def serve_forever(self: server.RegistryServer, *args: object) -> None:
        raise AssertionError("the server started")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(server.RegistryServer, "serve_forever", serve_forever)
        server.main([*argv, "--port", "0", "--log-level", "WARNING"])
    assert isinstance(stopped.value.code, str)  # sys.exit(message): status 1, the message on stderr
    assert "\n" not in stopped.value.code
    assert capsys.readouterr().out == ""
    return stopped.value.code


def admin(instance: server.RegistryServer, method: str, path: str, body: object = None) -> tuple[int, object]:
    return call(instance.url, method, path, body, token=ADMIN_TOKEN)


# --- Start-up: stop with one line, before anything is made --------------------


def test_a_port_in_use_is_named_and_nothing_is_made(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            server.main(["--data-dir", str(data), "--port", str(port)])

    assert stopped.value.code == (
        f"server.py: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use:"
        " stop what holds it, or choose another --port"
    )
    assert not data.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('["minimum", ', "is not JSON: Expecting value: line 1 column 13 (char 12)"),
        ('{"minimum": 3}', "must be a list of names or an object of names to descriptions"),
    ],
)
def test_a_bad_role_catalog_is_named_and_nothing_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, problem: str
) -> None:
    roles, data = tmp_path / "roles.json", tmp_path / "data"
    roles.write_text(text)

    line = start_fails(capsys, "--data-dir", str(data), "--roles", str(roles))

    assert str(roles) in line and line.endswith(problem)
    assert not data.exists()


def test_a_damaged_database_stops_the_server_and_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with serve(tmp_path) as instance:
        assert admin(instance, "POST", "/api/client-registry/unlock")[0] == 200
    database = tmp_path / "registry.db"
    damaged = bytearray(database.read_bytes())
    damaged[4096:8192] = b"\xa5" * 4096  # the second page: a table's rows
    database.write_bytes(bytes(damaged))

    line = start_fails(capsys, "--data-dir", str(tmp_path))

    assert line.startswith(f"server.py: cannot start: {database} is damaged (")
    assert line.endswith("): restore it from a backup (--backup), or move it away")
    assert database.read_bytes() == bytes(damaged)


def test_a_ca_key_that_is_not_its_certificates_stops_the_server(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Proves CERT-5.4-CA."""
    ca.CA.load_or_create(tmp_path, START)
    other = tmp_path / "other"
    other.mkdir()
    ca.CA.load_or_create(other, START)
    (tmp_path / "ca.key").write_bytes((other / "ca.key").read_bytes())

    line = start_fails(capsys, "--data-dir", str(tmp_path))

    assert line == (
        f"server.py: cannot start: {tmp_path / 'ca.key'} is not the key of {tmp_path / 'ca.pem'}:"
        " restore the pair from one backup"
    )


# --- The token: where it comes from, said at start -----------------------------


@pytest.mark.parametrize("kept", [True, False], ids=["a token kept", "a new folder"])
def test_the_start_says_which_token_is_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: bool) -> None:
    if kept:
        tmp_path.joinpath("admin-token").write_text("the-kept-token\n")
    monkeypatch.setenv("REGISTRY_ADMIN_TOKEN", "from-the-environment")

    config = server.parse_args(["--data-dir", str(tmp_path)])

    assert (config.admin_token, config.token_source) == ("from-the-environment", "$REGISTRY_ADMIN_TOKEN")
    flag = server.parse_args(["--data-dir", str(tmp_path), "--admin-token", "from-the-flag"])
    assert (flag.admin_token, flag.token_source) == ("from-the-flag", "--admin-token")
    monkeypatch.delenv("REGISTRY_ADMIN_TOKEN")
    assert server.parse_args(["--data-dir", str(tmp_path)]).token_source == ""


def test_an_environment_token_is_announced_with_the_kept_one_it_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tmp_path.joinpath("admin-token").write_text("the-kept-token\n")
    os.chmod(tmp_path / "admin-token", 0o600)
    monkeypatch.setenv("REGISTRY_ADMIN_TOKEN", "from-the-environment")
    monkeypatch.setattr(server.RegistryServer, "serve_forever", lambda self, *args: None)

    server.main(["--data-dir", str(tmp_path), "--port", "0", "--http", "--log-level", "WARNING"])

    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == (
        f"The administrator token is the one given in $REGISTRY_ADMIN_TOKEN; the one kept in {tmp_path / 'admin-token'}"
        " is not used"
    )


# --- An online backup ----------------------------------------------------------


def test_a_backup_taken_while_the_server_runs_serves_the_same_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, copy = tmp_path / "data", tmp_path / "copy"
    with serve(data) as running:
        assert admin(running, "POST", "/api/client-registry/unlock")[0] == 200
        csr = make_csr("agent-0001")
        for name, body in (("agent-0001", {"csr": csr}), ("sensor-0003", {"password": "s3cret-pass"})):
            assert admin(running, "POST", "/api/client-registry/register", {"username": name, **body})[0] == 202
        assert admin(running, "POST", "/api/client-registry/requests/agent-0001/approve")[0] == 200
        before = [admin(running, "GET", path)[1] for path in ("/api/client-registry", "/api/users")]
        requests = admin(running, "GET", "/api/client-registry/requests")[1]

        (data / "admin-token").write_text(ADMIN_TOKEN + "\n")  # as a server that made its token keeps it
        server.main(["--data-dir", str(data), "--backup", str(copy)])

        assert capsys.readouterr().out == f"Backed up {data} to {copy}; serve the copy with --data-dir {copy}\n"
        # The running server goes on.
        assert (
            admin(running, "POST", "/api/client-registry/register", {"username": "meter-9", "password": "pw-123"})[0]
            == 202
        )

    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    kept = sorted(path.name for path in copy.iterdir())
    assert kept == ["admin-token", "ca.key", "ca.pem", "registry.db"]  # no server.* for a plain HTTP server
    assert {stat.S_IMODE((copy / name).stat().st_mode) for name in kept} == {0o600}
    assert (copy / "ca.key").read_bytes() == (data / "ca.key").read_bytes()
    with serve(copy) as restored:
        assert [admin(restored, "GET", path)[1] for path in ("/api/client-registry", "/api/users")] == before
        assert admin(restored, "GET", "/api/client-registry/requests")[1] == requests
        assert admin(restored, "GET", "/api/client-registry/ca")[1] == (data / "ca.pem").read_bytes()
        answer = admin(restored, "POST", "/api/client-registry/register", {"username": "agent-0001", "csr": csr})
        assert answer[0] == 201


def test_a_backup_refuses_a_folder_that_exists(tmp_path: Path) -> None:
    with serve(tmp_path / "data"):
        pass
    existing = tmp_path / "existing"
    existing.mkdir()

    with pytest.raises(SystemExit) as stopped:
        server.main(["--data-dir", str(tmp_path / "data"), "--backup", str(existing)])

    assert stopped.value.code == (
        f"server.py: cannot back up: {existing} exists: name a folder that does not, and it is made"
    )
    assert list(existing.iterdir()) == []


# --- The wrong scheme -----------------------------------------------------------


def test_plain_http_to_the_tls_port_is_told_to_use_https(tmp_path: Path) -> None:
    """Proves TLS-6.5-HTTPS."""
    with serve(tmp_path, http=False) as instance:
        host, port = instance.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", "/api/client-registry/ca")
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        # The TLS port still speaks TLS.
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        secure = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        secure.request("GET", "/api/client-registry/ca")
        assert secure.getresponse().status == 200
        secure.close()

    assert response.status == 400
    assert body == {
        "error": "https_required",
        "message": f"this server speaks HTTPS: send the request to https://{host}:{port}, not http://",
    }

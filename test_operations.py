"""Running the server as an operator does: start-up checks, the token's source, an online backup, the wrong scheme.

Issue 19 (operations) and issue 17 (what a newcomer meets): every mistake
stops the server with one line that says what to do, before anything is
made; a damaged data folder is never served nor silently replaced.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

import ca
import files
import registry
import server
from conftest import ADMIN_TOKEN, START, FakeClock, call, make_csr, serve

HERE = Path(__file__).parent


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


# --- One server per data folder, and its CA kept ------------------------------


def test_a_second_server_on_the_same_folder_stops_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Proves STORE-6.7-ONE-SERVER (issue 23 item 1): the folder is held for the server's life, and then let go."""
    with serve(tmp_path) as running:
        assert (tmp_path / "server.lock").read_text() == f"{os.getpid()}\n"
        before = sorted(path.name for path in tmp_path.iterdir())

        line = start_fails(capsys, "--data-dir", str(tmp_path), "--http")

        assert line == (
            f"server.py: cannot start: {tmp_path} is served by another server (PID {os.getpid()}):"
            " stop it, or choose another --data-dir"
        )
        assert sorted(path.name for path in tmp_path.iterdir()) == before
        assert admin(running, "GET", "/api/client-registry")[0] == 200  # the first goes on
    with serve(tmp_path) as second:
        assert admin(second, "GET", "/api/client-registry")[0] == 200


def issue_one_certificate(folder: Path) -> None:
    """A server on ``folder`` that has issued one certificate, stopped."""
    with serve(folder) as running:
        assert admin(running, "POST", "/api/client-registry/unlock")[0] == 200
        body = {"username": "agent-0001", "csr": make_csr("agent-0001")}
        assert admin(running, "POST", "/api/client-registry/register", body)[0] == 202
        assert admin(running, "POST", "/api/client-registry/requests/agent-0001/approve")[0] == 200


@pytest.mark.parametrize("lost", [("ca.key",), ("ca.key", "ca.pem")], ids=["the key", "the key and the certificate"])
def test_a_folder_that_lost_its_ca_key_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture, lost: tuple[str, ...]
) -> None:
    """Proves STORE-6.8-CA-KEPT (issue 23 item 2): a CA that signed certificates is never replaced in silence."""
    issue_one_certificate(tmp_path)
    kept = (tmp_path / "ca.pem").read_bytes()
    for name in lost:
        (tmp_path / name).unlink()

    line = start_fails(capsys, "--data-dir", str(tmp_path), "--http")

    why = f"{tmp_path / 'ca.pem'} is there" if len(lost) == 1 else "the database records 1 issued certificate"
    assert line == (
        f"server.py: cannot start: {tmp_path / 'ca.key'} is missing, but {why}: a new CA would disown what the old"
        " one signed; restore ca.key and ca.pem from the backup this folder came from (docs/operations.md)"
    )
    assert not (tmp_path / "ca.key").exists()
    if len(lost) == 1:
        assert (tmp_path / "ca.pem").read_bytes() == kept


def test_an_unreadable_ca_key_stops_the_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Proves STORE-6.8-CA-KEPT (issue 23 item 2): a key cut short is named, not replaced."""
    issue_one_certificate(tmp_path)
    (tmp_path / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\nMIGH\n")

    line = start_fails(capsys, "--data-dir", str(tmp_path), "--http")

    assert line == f"server.py: cannot start: {tmp_path / 'ca.key'} is not a readable PEM key: restore it from a backup"


def test_an_embedder_s_ca_without_its_key_is_not_replaced(tmp_path: Path) -> None:
    """Proves STORE-6.8-CA-KEPT: ``ca.load_or_create`` refuses a certificate whose key is gone."""
    ca.CA.load_or_create(tmp_path, START)
    (tmp_path / "ca.key").unlink()
    kept = (tmp_path / "ca.pem").read_bytes()

    with pytest.raises(FileNotFoundError) as refused:
        ca.CA.load_or_create(tmp_path, START)
    assert str(refused.value) == (
        f"{tmp_path / 'ca.key'} is missing beside {tmp_path / 'ca.pem'}: restore the pair from one backup"
    )
    assert (tmp_path / "ca.pem").read_bytes() == kept


# --- Settings, checked at start ------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "limits"),
    [
        ("--cert-days", "0", "1 to 3650"),
        ("--cert-days", "-1", "1 to 3650"),
        ("--crl-days", "0", "1 to 365"),
        ("--crl-days", "1e9", "1 to 365"),
        ("--crl-days", "nan", "1 to 365"),
        ("--max-body", "-1", "1024 to 16777216"),
        ("--retention-hours", "-1", "1 to 8760"),
        ("--unlock-minutes", "-5", "0.5 to 1440"),
        ("--max-connections-per-address", "0", "1 to 65536"),
        ("--retry-after", "0", "1 to 3600"),
        ("--max-pending", "0", "1 to 10000000"),
    ],
)
def test_a_setting_out_of_its_range_is_argparse_s_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str, limits: str
) -> None:
    """Proves STORE-6.10-SETTINGS (issue 23 item 4): every number has a range, checked before anything is made."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(server.RegistryServer, "serve_forever", lambda *args: pytest.fail("the server started"))
        server.main(["--data-dir", str(tmp_path / "data"), "--port", "0", f"{flag}={value}"])

    assert stopped.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f": error: argument {flag}: {value} is outside its range, {limits}")
    )
    assert not (tmp_path / "data").exists()


def test_the_command_line_s_defaults_are_the_registry_s_settings() -> None:
    """Proves STORE-6.10-SETTINGS: no default is written twice; the flags count in their own units."""
    defaults = server.parse_args([])
    settings = registry.Settings()

    assert timedelta(minutes=defaults.unlock_minutes) == settings.unlock_duration
    assert timedelta(hours=defaults.retention_hours) == settings.retention
    assert timedelta(days=defaults.crl_days) == settings.crl_validity
    assert (defaults.retry_after, defaults.retry_after_locked) == (
        settings.retry_after_pending,
        settings.retry_after_locked,
    )
    assert (defaults.rate_limit, defaults.max_pending) == (settings.rate_limit, settings.max_pending)
    for flag, (name, unit) in server.SETTING_FLAGS.items():
        least, most = registry.SETTING_RANGES[name]
        assert server.flag_range(flag) == ((least / unit, most / unit) if unit else (least, most))


@pytest.mark.parametrize(
    ("wrong", "named"),
    [
        ({"retention": timedelta(0)}, "retention"),
        ({"unlock_duration": timedelta(minutes=-5)}, "unlock_duration"),
        ({"crl_validity": timedelta(days=10**6)}, "crl_validity"),
        ({"max_pending": 0}, "max_pending"),
        ({"scrypt_n": 1000}, "scrypt_n"),
        ({"unlock_duration": timedelta(hours=2), "max_unlock_duration": timedelta(hours=1)}, "unlock_duration"),
    ],
)
def test_an_embedder_s_setting_out_of_its_range_is_refused(wrong: dict[str, object], named: str) -> None:
    """Proves STORE-6.10-SETTINGS: ``registry.Settings`` checks its own ranges, naming the setting."""
    with pytest.raises(ValueError, match=f"^the setting {named} must "):
        registry.Settings(**wrong)


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


KEPT_TOKEN = "the-kept-token-0123456789abcdef-0123"


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("from-the-environment-0123456789abcdef", "; the one kept in {kept} is not used"),
        # Issue 26 item 8: after `export REGISTRY_ADMIN_TOKEN=$(cat registry-data/admin-token)`, the two agree.
        (KEPT_TOKEN, ", the same as the one kept in {kept}"),
    ],
    ids=["another token", "the kept token"],
)
def test_an_environment_token_is_announced_with_the_kept_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, given: str, said: str
) -> None:
    """The start says which token is in use, and how it stands to the one kept in the data folder."""
    tmp_path.joinpath("admin-token").write_text(KEPT_TOKEN + "\n")
    os.chmod(tmp_path / "admin-token", 0o600)
    monkeypatch.setenv("REGISTRY_ADMIN_TOKEN", given)
    monkeypatch.setattr(server.RegistryServer, "serve_forever", lambda self, *args: None)

    server.main(["--data-dir", str(tmp_path), "--port", "0", "--http", "--log-level", "WARNING"])

    printed = capsys.readouterr().out.splitlines()
    kept = tmp_path / "admin-token"
    assert printed[1] == "The administrator token is the one given in $REGISTRY_ADMIN_TOKEN" + said.format(kept=kept)


@pytest.mark.parametrize("where", ["--admin-token", "$REGISTRY_ADMIN_TOKEN", "admin-token"])
@pytest.mark.parametrize("token", ["", "x" * 31])
def test_a_short_or_empty_token_stops_the_start_and_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, where: str, token: str
) -> None:
    """Proves ADMIN-4.1-TOKEN (issue 22 item 5): a token of fewer than 32 characters is never served."""
    data, argv, kept = tmp_path / "data", [], where == "admin-token"
    monkeypatch.delenv("REGISTRY_ADMIN_TOKEN", raising=False)
    if where == "--admin-token":
        argv = [f"--admin-token={token}"]
    elif where == "$REGISTRY_ADMIN_TOKEN":
        monkeypatch.setenv("REGISTRY_ADMIN_TOKEN", token)
    else:
        data.mkdir(mode=0o700)
        (data / "admin-token").write_text(token + "\n")
        os.chmod(data / "admin-token", 0o600)
        where = str(data / "admin-token")

    line = start_fails(capsys, "--data-dir", str(data), *argv)

    assert line == (
        f"server.py: cannot start: the administrator token in {where} has {len(token)} characters, fewer than 32:"
        " make one with python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )
    if kept:
        assert sorted(path.name for path in data.iterdir()) == ["admin-token"]  # nothing made, nothing replaced
    else:
        assert not data.exists()


@pytest.mark.parametrize("authorization", ["Bearer ", "Bearer", "Bearer  "])
def test_an_empty_token_never_matches(tmp_path: Path, authorization: str) -> None:
    """Proves ADMIN-4.1-TOKEN (issue 22 item 5): even where the token held is empty, an empty one is refused."""
    core = registry.Registry(clock=lambda: START, settings=registry.Settings(scrypt_n=16))
    app = server.App(core, "")
    request = server.Request("POST", "/api/client-registry/unlock", headers={"authorization": authorization})

    response = app.handle(request)

    assert response.status == 401
    assert core.status()["locked"] is True
    core.close()


# --- An online backup ----------------------------------------------------------


def steady(answer: object) -> object:
    """An answer without what the clock moves while unlocked: the time left and the server's time."""
    if isinstance(answer, dict):
        return {name: value for name, value in answer.items() if name not in ("unlockedForMs", "serverTime")}
    return answer


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
        before = [steady(admin(running, "GET", path)[1]) for path in ("/api/client-registry", "/api/users")]
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
        assert [steady(admin(restored, "GET", path)[1]) for path in ("/api/client-registry", "/api/users")] == before
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


@pytest.mark.parametrize("cut_at", ["ca.pem", "ca.key", "admin-token"])
def test_a_backup_cut_short_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: str) -> None:
    """Proves STORE-6.9-BACKUP (issue 23 item 3): a copy interrupted at any file is never a data folder."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    issue_one_certificate(data)
    (data / "admin-token").write_text(ADMIN_TOKEN + "\n")
    write_private = files.write_private

    def interrupted(path: Path, text: str) -> None:
        if path.name == cut_at:
            raise KeyboardInterrupt  # as a Ctrl-C, or a kill, between two files
        write_private(path, text)

    monkeypatch.setattr(files, "write_private", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.main(["--data-dir", str(data), "--backup", str(copy)])

    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


def test_a_backup_whose_key_is_not_its_certificate_s_is_refused(tmp_path: Path) -> None:
    """Proves STORE-6.9-BACKUP: the copy is checked before it is kept; a mismatched pair is not a backup."""
    data, copy = tmp_path / "data", tmp_path / "copy"
    issue_one_certificate(data)
    (tmp_path / "other").mkdir()
    ca.CA.load_or_create(tmp_path / "other", START)
    (data / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())

    with pytest.raises(SystemExit) as stopped:
        server.main(["--data-dir", str(data), "--backup", str(copy)])

    assert stopped.value.code == (
        "server.py: cannot back up: the copy of ca.key is not the key of the copy of ca.pem:"
        " nothing was kept; try again"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "other"]


def backup_process(data: Path, copy: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "server.py", "--data-dir", str(data), "--backup", str(copy)],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_backup_killed_at_any_moment_is_never_half_a_folder(tmp_path: Path) -> None:
    """Proves STORE-6.9-BACKUP (issue 23 item 3) with real kills: the copy is there whole, or not at all."""
    data = tmp_path / "data"
    issue_one_certificate(data)
    started = time.monotonic()
    assert backup_process(data, tmp_path / "timed").wait(60) == 0
    whole_run = time.monotonic() - started
    chaos = random.Random(23)
    outcomes = []
    for attempt in range(8):
        copy = tmp_path / f"copy-{attempt}"
        process = backup_process(data, copy)
        time.sleep(chaos.uniform(0, whole_run))
        process.send_signal(signal.SIGKILL)  # by its PID: the process this test started
        process.wait(10)
        outcomes.append(copy.exists())
        if copy.exists():
            assert sorted(path.name for path in copy.iterdir()) == ["ca.key", "ca.pem", "registry.db"]
            with contextlib.closing(sqlite3.connect(copy / "registry.db")) as database:
                assert database.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                assert database.execute("SELECT count(*) FROM certificates").fetchone()[0] == 1
            assert ca.CA.load_or_create(copy, START).certificate_pem == (data / "ca.pem").read_text()
    # Whatever the kills left, only hidden .partial folders are beside the copies.
    assert all(path.name.endswith(".partial") for path in tmp_path.iterdir() if path.name.startswith("."))


def test_a_second_server_process_names_the_first_s_pid(tmp_path: Path) -> None:
    """Proves STORE-6.7-ONE-SERVER across processes; the kernel lets the folder go when its holder is killed."""
    command = [sys.executable, "server.py", "--http", "--data-dir", str(tmp_path), "--admin-token", ADMIN_TOKEN]
    first = subprocess.Popen([*command, "--port", "0"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("Client registry at http://127.0.0.1:")

        second = subprocess.run([*command, "--port", "0"], cwd=HERE, capture_output=True, text=True, timeout=60)

        assert (second.returncode, second.stdout) == (1, "")
        assert second.stderr == (
            f"server.py: cannot start: {tmp_path} is served by another server (PID {first.pid}):"
            " stop it, or choose another --data-dir\n"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        with serve(tmp_path) as third:
            assert admin(third, "GET", "/api/client-registry")[0] == 200
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        first.stdout.close()


# --- The server's own certificate renews itself ------------------------------------


def served_certificate(instance: server.RegistryServer, folder: Path) -> x509.Certificate:
    """The certificate a new TLS connection to ``instance`` is shown, verified against the folder's CA."""
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    with (
        socket.create_connection(instance.server_address[:2], timeout=10) as plain,
        context.wrap_socket(plain, server_hostname="localhost") as secure,
    ):
        return x509.load_der_x509_certificate(secure.getpeercert(binary_form=True))


def test_the_server_s_certificate_renews_itself_at_two_thirds_of_its_life(tmp_path: Path) -> None:
    """Proves TLS-6.12-RENEW (issue 23 item 5): no restart; new connections get the new certificate."""
    clock = FakeClock()
    with serve(tmp_path, http=False, clock=clock) as instance:
        first = served_certificate(instance, tmp_path)
        life = first.not_valid_after_utc - first.not_valid_before_utc
        assert isinstance(instance.certificate_timer, server.Every)  # what calls refresh, hourly

        clock.advance(seconds=(life * 2 / 3 - timedelta(minutes=10)).total_seconds())
        assert instance.server_certificate.refresh() is False
        assert served_certificate(instance, tmp_path).serial_number == first.serial_number
        clock.advance(minutes=20)
        assert instance.server_certificate.refresh() is True
        renewed = served_certificate(instance, tmp_path)

    assert renewed.serial_number != first.serial_number
    assert renewed.subject == first.subject
    names = x509.SubjectAlternativeName
    assert renewed.extensions.get_extension_for_class(names) == first.extensions.get_extension_for_class(names)
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()) == renewed


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

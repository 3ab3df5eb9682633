"""client.py end to end: a real ``server.py`` in a subprocess, the client as a command and as a function.

The server runs with ``--retry-after 1`` and the agents with
``--max-interval 1`` and a ``--timeout``, so that every wait is short and
nothing can hang.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

import ca
import client
from conftest import FakeClock, serve

ROOT = Path(__file__).parent
TOKEN = "test-admin-token-0123456789abcdef"
WAIT = 15  # seconds any one expected event may take before the test fails


# --- A server and the command, as subprocesses ------------------------------


class RegistryProcess:
    """``python3 server.py`` on a fixed port and data folder, so that it can be killed and started again."""

    def __init__(self, folder: Path) -> None:
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> Path:
        """The registry's CA certificate, as the server keeps it."""
        return self.data / "ca.pem"

    def start(self) -> None:
        """Start the server and wait until it listens."""
        command = [sys.executable, "server.py", "--port", str(self.port), "--data-dir", str(self.data)]
        command += ["--admin-token", TOKEN, "--retry-after", "1", "--retry-after-locked", "1", "--log-level", "WARNING"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"the server did not listen on port {self.port} within {WAIT} s")

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python3 client.py ARGS`` in a new process, to its end."""
    command = [sys.executable, "client.py", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT, env=_env())


def command(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``client.py ARGS`` run in this process, which is quicker than a new interpreter."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = client.main(list(map(str, args)))
        except SystemExit as usage:  # argparse's exit
            code = usage.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def admin(registry: RegistryProcess | InProcess, *args: str) -> str:
    """An administrator's command that must succeed; its standard output."""
    done = command("admin", *args, "--server", registry.url, "--ca-file", registry.ca_file, "--token", TOKEN)
    assert done.returncode == client.Exit.OK, done.stderr
    return done.stdout


def _env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("REGISTRY_")}


class Agent:
    """``python3 client.py register ARGS`` (or another command) in the background; its progress lines as they come."""

    def __init__(self, *args: str | Path, command: str = "register") -> None:
        command = [sys.executable, "client.py", command, *map(str, args)]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )
        self.lines: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            self._fresh.put(line.rstrip("\n"))
        self._fresh.put(None)

    def wait_for(self, text: str) -> str:
        """The next progress line that holds ``text``."""
        deadline = time.monotonic() + WAIT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._fresh.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the agent ended before saying {text!r}: {self.lines}")
            if text in line:
                return line
        pytest.fail(f"the agent did not say {text!r} within {WAIT} s: {self.lines}")

    def finish(self) -> tuple[int, str]:
        """The exit code and standard output, once the agent has ended."""
        code = self.process.wait(timeout=WAIT)
        return code, self.process.stdout.read()

    def said(self, text: str) -> int:
        """How many progress lines hold ``text``."""
        return sum(text in line for line in self.lines)

    def stop(self) -> None:
        """Kill the agent if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One server for the tests that do not restart it; each test uses its own usernames."""
    server = RegistryProcess(tmp_path_factory.mktemp("registry"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents started in a test, killed at its end if still running."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def register_args(registry: RegistryProcess, username: str, out: Path, *credential: str) -> list[str | Path]:
    """The arguments of a quick agent: short polls, a bound on the whole wait."""
    return ["--server", registry.url, "--username", username, *credential, "--out", out]


QUICK = ["--max-interval", "1", "--timeout", "20"]


# --- The workflow -------------------------------------------------------------


def test_an_agent_registers_with_a_generated_key_while_the_administrator_unlocks_and_approves(
    registry: RegistryProcess, agents: list[Agent], tmp_path: Path
) -> None:
    admin(registry, "lock")
    out = tmp_path / "agent"
    permission = "mqtt:read:sensors/#"
    agent = Agent(
        *register_args(registry, "agent-0001", out, "--generate-key"),
        *["--role", "minimum", "--permission", permission, "--context", "hall 3, line 2", *QUICK],
    )
    agents.append(agent)

    # With no CA file it pins the server's CA and shows its fingerprint.
    ca_certificate = x509.load_pem_x509_certificate(registry.ca_file.read_bytes())
    assert client.fingerprint(ca_certificate) in agent.wait_for("SHA-256 fingerprint")
    agent.wait_for("the registry is locked")

    assert "unlocked until" in admin(registry, "unlock", "--minutes", "1")
    pairing_id = agent.wait_for("pending, pairing id").split("pairing id ")[1].split(":")[0]

    # The administrator sees the same pairing id the agent printed.
    listed = {r["username"]: r for r in json.loads(admin(registry, "requests", "--json"))}
    assert listed["agent-0001"]["pairingId"] == pairing_id
    assert listed["agent-0001"]["method"] == "csr"
    assert listed["agent-0001"]["context"] == "hall 3, line 2"
    table = admin(registry, "requests")
    assert table.startswith("USERNAME") and pairing_id in table and permission in table

    assert "approved agent-0001" in admin(registry, "approve", "agent-0001")
    code, stdout = agent.finish()
    assert code == client.Exit.OK, agent.lines
    assert "registered agent-0001: roles minimum; permissions mqtt:read:sensors/#" in stdout
    assert agent.said("the registry is locked") == 1 and agent.said("pending") == 1

    # The key stayed here, for its owner alone; the certificate is for it.
    key_file = out / "key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).hexdigest()[:6] == pairing_id
    certificate = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))
    assert certificate.public_key() == key.public_key()
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent-0001"
    assert (out / "ca.pem").read_bytes() == registry.ca_file.read_bytes()
    granted = json.loads((out / "granted.json").read_text())
    assert granted == {
        "username": "agent-0001",
        "roles": ["minimum"],
        "permissions": [{"resource": "sensors/#", "operation": "read", "context": "mqtt"}],
    }

    # The written certificate authenticates over mutual TLS.
    whoami = command("whoami", "--server", registry.url, "--ca-file", out / "ca.pem",
                     "--cert", out / "cert.pem", "--key", key_file, "--json")  # fmt: skip
    assert whoami.returncode == client.Exit.OK, whoami.stderr
    assert json.loads(whoami.stdout) == {**granted, "method": "certificate"}

    # Run again, the agent reuses its key and fetches the same answer.
    again = command("register", *register_args(registry, "agent-0001", out, "--generate-key"), "--insecure",
                    "--role", "minimum", "--permission", permission, *QUICK)  # fmt: skip
    assert again.returncode == client.Exit.OK, again.stderr
    assert "of an earlier run" in again.stderr
    assert (out / "cert.pem").read_bytes() == certificate.public_bytes(serialization.Encoding.PEM)


def test_an_agent_keeps_polling_across_a_server_restart(agents: list[Agent], tmp_path: Path) -> None:
    """Proves CLIENT-9.4-LOST-ANSWER."""
    registry = RegistryProcess(tmp_path)
    registry.start()
    try:
        admin(registry, "unlock")
        (tmp_path / "password").write_text("s3cret-pass\n")
        out = tmp_path / "sensor"
        agent = Agent(*register_args(registry, "sensor-0003", out, "--password-file", tmp_path / "password"), *QUICK)
        agents.append(agent)
        agent.wait_for("pending, pairing id")

        registry.kill()
        agent.wait_for("no answer from")
        registry.start()
        admin(registry, "approve", "sensor-0003", "--grant-nothing")

        code, stdout = agent.finish()
        assert code == client.Exit.OK, agent.lines
        assert "registered sensor-0003: roles none; permissions none" in stdout
        assert json.loads((out / "granted.json").read_text())["roles"] == []
        assert not (out / "cert.pem").exists()
        whoami = command("whoami", "--server", registry.url, "--insecure",
                         "--username", "sensor-0003", "--password", "s3cret-pass")  # fmt: skip
        assert whoami.returncode == client.Exit.OK, whoami.stderr
        assert whoami.stdout.strip() == "sensor-0003, by password: roles none; permissions none"
        wrong = command("whoami", "--server", registry.url, "--insecure",
                        "--username", "sensor-0003", "--password", "not-the-pass")  # fmt: skip
        assert wrong.returncode == client.Exit.DENIED
        assert wrong.stderr == "client.py: 401 unauthorized: unknown username or wrong password\n"
    finally:
        registry.kill()


class DownThenUp:
    """A server that gives no answer ``down`` times, then the 201; it counts the polls."""

    def __init__(self, down: int) -> None:
        self.down, self.polls = down, 0

    def call(self, method: str, path: str, body: object = None, **kwargs: object) -> client.Reply:
        self.polls += 1
        if self.polls <= self.down:
            raise client.Unreachable("no answer from https://registry.test: connection refused")
        return client.Reply(201, {}, json.dumps({"status": "approved", "username": "sensor-0003"}).encode())


def test_polls_that_go_unanswered_are_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves CLIENT-9.4-LOST-ANSWER: five unanswered polls in a row make one line, and the sixth gets the answer."""
    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    lines: list[str] = []
    server = DownThenUp(down=5)

    answer = client._poll(server, {"username": "sensor-0003"}, None, 1.0, lines.append)

    assert answer["status"] == "approved"
    assert server.polls == 6
    assert lines == ["no answer from https://registry.test: connection refused; trying again"]


# --- Refusals: one line, one exit code -----------------------------------------


def register_once(registry: RegistryProcess, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``client.py register`` in a new process, trusting the registry's CA, waiting at most 5 s."""
    return run("register", "--server", registry.url, "--ca-file", registry.ca_file, "--out", tmp_path / "out",
               "--max-interval", "1", "--timeout", "5", *args)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--username", "ab", "--password", "s3cret-pass"], "422 policy_violation: 'username' must be 3 to 64"),
        (["--username", "role-asker", "--password", "s3cret-pass", "--role", "root"],
         "422 policy_violation: role 'root' is not in the role catalog"),
        (["--username", "web-client", "--password", "s3cret-pass", "--permission", "http:read:api"],
         "400 malformed_request: permissions[0].resource must start with '/' for the http context"),
    ],
)  # fmt: skip
def test_a_rejected_request_stops_with_the_servers_message(
    registry: RegistryProcess, tmp_path: Path, args: list[str], expected: str
) -> None:
    done = register_once(registry, tmp_path, *args)
    assert done.returncode == client.Exit.REJECTED
    assert done.stderr.splitlines()[-1].startswith(f"client.py: {expected}")
    assert not (tmp_path / "out" / "granted.json").exists()


def test_a_timeout_a_conflict_and_a_denial_each_have_their_exit_code(registry: RegistryProcess, tmp_path: Path) -> None:
    """Proves CLIENT-9.3-DENIED."""
    admin(registry, "unlock")
    waited = register_once(registry, tmp_path, "--username", "sensor-0409", "--password", "first-pass",
                           "--timeout", "1")  # fmt: skip
    assert waited.returncode == client.Exit.TIMEOUT
    assert "client.py: no decision within 1 s; the last state: pending, pairing id" in waited.stderr

    other = register_once(registry, tmp_path, "--username", "sensor-0409", "--password", "other-pass")
    assert other.returncode == client.Exit.CONFLICT
    last = other.stderr.splitlines()[-1]
    assert last.startswith("client.py: 409 duplicate_request: a different request for 'sensor-0409' is pending")
    assert "client.py admin forget|delete-user sensor-0409" in last

    denial = admin(registry, "deny", "sensor-0409", "--reason", "not on the plant's list")
    assert denial == "denied sensor-0409: not on the plant's list\n"
    denied = register_once(registry, tmp_path, "--username", "sensor-0409", "--password", "first-pass")
    assert denied.returncode == client.Exit.DENIED
    assert denied.stderr.splitlines()[-1] == (
        "client.py: 403 denied: the request for 'sensor-0409' was denied; reason: not on the plant's list"
    )


def test_administrator_errors_are_one_line_and_an_exit_code(
    registry: RegistryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--server", registry.url, "--ca-file", str(registry.ca_file)]
    wrong_token = run("admin", "status", *base, "--token", "not-the-token")
    assert wrong_token.returncode == client.Exit.DENIED
    assert wrong_token.stderr.startswith("client.py: 401 unauthorized:") and "--token" in wrong_token.stderr
    unknown = command("admin", "approve", "nobody-here", *base, "--token", TOKEN)
    assert unknown.returncode == client.Exit.ERROR
    assert unknown.stderr == "client.py: 404 not_found: there is no request for 'nobody-here'\n"
    monkeypatch.delenv("REGISTRY_ADMIN_TOKEN", raising=False)
    no_token = command("admin", "status", *base)
    assert no_token.returncode == client.Exit.USAGE and "REGISTRY_ADMIN_TOKEN" in no_token.stderr
    status = json.loads(admin(registry, "status", "--json"))
    assert {"locked", "unlockedUntil", "pending"} <= set(status)


def test_trust_failures_stop_before_anything_is_sent(registry: RegistryProcess, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    other_ca = ca.CA.load_or_create(stranger, datetime.now(UTC))  # a CA that is not the registry's
    base = ["register", "--server", registry.url, "--username", "trusting", "--password", "s3cret-pass",
            "--out", tmp_path / "out", "--timeout", "5"]  # fmt: skip
    wrong_ca = command(*base, "--ca-file", stranger / "ca.pem")
    assert wrong_ca.returncode == client.Exit.UNREACHABLE
    assert "client.py: cannot trust" in wrong_ca.stderr and "does not verify" in wrong_ca.stderr
    wrong_pin = command(*base, "--ca-fingerprint", client.fingerprint(other_ca.certificate))
    assert wrong_pin.returncode == client.Exit.UNREACHABLE
    assert "not the expected one" in wrong_pin.stderr
    closed = command("admin", "status", "--server", f"https://127.0.0.1:{_free_port()}", "--insecure", "--token", TOKEN)
    assert closed.returncode == client.Exit.UNREACHABLE and "no answer from" in closed.stderr
    requests = json.loads(admin(registry, "requests", "--json"))
    assert "trusting" not in {r["username"] for r in requests}


# --- Every message tells a newcomer what to do (issue 17) ----------------------


def test_a_server_url_that_ends_in_api_is_taken_as_the_servers_root(registry: RegistryProcess) -> None:
    # The README's curl examples set URL=https://localhost:8443/api; the same URL works for client.py.
    for url in (f"{registry.url}/api", f"{registry.url}/api/"):
        assert client.Server(url).url == registry.url
        done = command("admin", "status", "--server", url, "--token", TOKEN)  # pins the CA it serves
        assert done.returncode == client.Exit.OK, done.stderr
        assert "pending" in done.stdout


def test_a_certificate_given_for_the_key_is_named_a_certificate_not_a_key_to_chmod(tmp_path: Path) -> None:
    ca.CA.load_or_create(tmp_path, datetime.now(UTC))
    certificate = tmp_path / "ca.pem"
    certificate.chmod(0o644)
    done = command("register", "--server", "https://127.0.0.1:9", "--insecure", "--username", "agent-0017",
                   "--key", certificate, "--out", tmp_path / "out")  # fmt: skip
    assert done.returncode == client.Exit.ERROR
    assert done.stderr == (
        f"client.py: {certificate} is a certificate, not a private key: give the key's file, such as key.pem\n"
    )
    # A key that others may read is still refused, once it is known to be a key.
    key = tmp_path / "key.pem"
    client.load_or_generate_key(key)
    key.chmod(0o644)
    with pytest.raises(client.ClientError, match=f"others may read the key; run chmod 600 {key}"):
        client.load_or_generate_key(key, None)


def test_the_unlock_window_is_bounded_in_minutes_before_anything_is_sent(registry: RegistryProcess) -> None:
    unreachable = ["--server", f"https://127.0.0.1:{_free_port()}", "--insecure", "--token", TOKEN]
    for minutes in ("100000", "1440.5", "0"):
        done = command("admin", "unlock", "--minutes", minutes, *unreachable)
        assert done.returncode == client.Exit.USAGE
        assert "error: --minutes must be more than 0 and at most 1440 minutes (a day)" in done.stderr
        assert "millisecond" not in done.stderr
    opened = admin(registry, "unlock", "--minutes", "1440")
    until = datetime.strptime(opened.split("until ")[1].split(" UTC")[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert timedelta(hours=23, minutes=59) < until - datetime.now(UTC) <= timedelta(days=1)


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["register", "--username", "agent-0017", "--pasword", "s3cret-pass", "--out", "out"],
         "did you mean --password for --pasword?"),
        (["admin", "approve", "agent-0017", "--roles", "minimum", "--token", TOKEN],
         "did you mean --role for --roles?"),
        (["admin", "deny", "agent-0017", "--reasn=not ours", "--token", TOKEN], "did you mean --reason for --reasn?"),
        (["whoami", "--username", "agent-0017", "--pasword-file", "pass"],
         "did you mean --password-file for --pasword-file?"),
    ],
)  # fmt: skip
def test_a_mistyped_option_gets_the_near_one_as_a_hint(args: list[str], hint: str) -> None:
    done = command(*args, "--server", f"https://127.0.0.1:{_free_port()}", "--insecure")
    assert done.returncode == client.Exit.USAGE
    assert done.stderr.startswith("usage: client.py ")
    assert done.stderr.splitlines()[-1].endswith(f" ({hint})")
    # An abbreviation argparse accepts is no typo; a word near no option gets no guess.
    quiet = command("register", "--user", "agent-0017", "--colour", "--server", "https://127.0.0.1:9")
    assert quiet.returncode == client.Exit.USAGE and "did you mean" not in quiet.stderr


def test_a_wrong_scheme_is_named_with_the_one_to_use(registry: RegistryProcess, tmp_path: Path) -> None:
    # http:// to the TLS port: the server answers in plain HTTP, and its message is shown.
    port = registry.url.rsplit(":", 1)[1]
    plain = f"http://127.0.0.1:{port}"
    told = command("admin", "status", "--server", plain, "--token", TOKEN)
    assert told.returncode == client.Exit.UNREACHABLE
    assert told.stderr == f"client.py: this server speaks HTTPS: send the request to {registry.url}, not http://\n"
    # An agent stops at once: waiting does not cure a wrong scheme.
    started = time.monotonic()
    agent = command("register", "--server", plain, "--username", "agent-0017", "--password", "s3cret-pass",
                    "--out", tmp_path / "out", "--timeout", "5")  # fmt: skip
    assert agent.returncode == client.Exit.UNREACHABLE and "this server speaks HTTPS" in agent.stderr
    assert time.monotonic() - started < 2

    # https:// to a plain-HTTP server (server.py --http).
    with serve(tmp_path / "data") as instance:
        secure = instance.url.replace("http://", "https://")
        for trust in ([], ["--insecure"]):
            done = command("admin", "status", "--server", secure, "--token", TOKEN, *trust)
            assert done.returncode == client.Exit.UNREACHABLE
            assert done.stderr == f"client.py: the server at {secure} speaks plain HTTP: use {instance.url}\n"


def test_with_json_every_error_is_a_json_object_on_standard_output(registry: RegistryProcess) -> None:
    base = ["--server", registry.url, "--ca-file", registry.ca_file, "--token", TOKEN, "--json"]
    unknown = command("admin", "approve", "nobody-here", *base)
    assert unknown.returncode == client.Exit.ERROR and unknown.stderr == ""
    assert json.loads(unknown.stdout) == {
        "error": "not_found",
        "message": "404 not_found: there is no request for 'nobody-here'",
        "exitCode": 1,
        "status": 404,
    }
    wrong_token = json.loads(command("admin", "status", *base, "--token", "not-the-token").stdout)
    assert (wrong_token["error"], wrong_token["exitCode"], wrong_token["status"]) == ("unauthorized", 3, 401)
    assert "check --token" in wrong_token["message"]

    closed = command("admin", "status", "--server", f"https://127.0.0.1:{_free_port()}", "--insecure",
                     "--token", TOKEN, "--json")  # fmt: skip
    assert closed.returncode == client.Exit.UNREACHABLE
    assert json.loads(closed.stdout)["error"] == "unreachable" and json.loads(closed.stdout)["exitCode"] == 7

    # A wrong command line too, found by argparse or by the command.
    for args in (["admin", "status", "--tokn", TOKEN], ["admin", "unlock", "--minutes", "0", "--token", TOKEN]):
        usage = command(*args, "--json", "--server", registry.url)
        assert usage.returncode == client.Exit.USAGE and usage.stderr == ""
        error = json.loads(usage.stdout)
        assert (error["error"], error["exitCode"]) == ("usage", 2)
    assert (
        "did you mean --token for --tokn?"
        in json.loads(command("admin", "status", "--tokn", "x", "--json").stdout)["message"]
    )
    whoami = command("whoami", "--server", registry.url, "--ca-file", registry.ca_file, "--username", "nobody-here",
                     "--password", "not-the-pass", "--json")  # fmt: skip
    assert json.loads(whoami.stdout)["status"] == 401 and whoami.returncode == client.Exit.DENIED


def test_the_administrators_commands_do_not_ask_to_compare_the_fingerprint(registry: RegistryProcess) -> None:
    done = command("admin", "status", "--server", registry.url, "--token", TOKEN)  # no CA file: it pins
    assert done.returncode == client.Exit.OK and done.stderr == ""
    # A client's command still shows it, for its person to compare.
    whoami = command("whoami", "--server", registry.url, "--username", "nobody-here", "--password", "not-the-pass")
    assert "; pinned: compare it with the administrator's" in whoami.stderr


# Runs client.py as a script with every import of cryptography failing, as on a Python without it.
WITHOUT_CRYPTOGRAPHY = """
import runpy, sys

class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "cryptography":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Uninstalled())
sys.argv[0] = "client.py"
runpy.run_path("client.py", run_name="__main__")
"""


def test_without_cryptography_client_py_says_in_one_line_what_to_install() -> None:
    def without(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", WITHOUT_CRYPTOGRAPHY, *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT, env=_env())

    done = without("admin", "status")
    assert done.returncode == 1
    assert done.stderr == (
        "client.py needs the cryptography package: run .venv/bin/pip install -r requirements.txt"
        " (or pip install cryptography)\n"
    )
    as_json = without("admin", "status", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"] == "missing_dependency"


def _rows(table: str) -> dict[str, dict[str, str]]:
    """An administrator's table, as {username: {column: cell}}; cells are two spaces apart at the least."""
    headers, *lines = (re.split(r"  +", line.strip()) for line in table.splitlines())
    return {cells[0]: dict(zip(headers, cells, strict=True)) for cells in lines}


def test_the_requests_show_what_was_granted_and_whether_the_client_collected_it(registry: RegistryProcess) -> None:
    admin(registry, "unlock")
    server = client.Server(registry.url, ca_file=registry.ca_file)
    body = client.registration_request("collector-1", password="s3cret-pass", roles=["minimum"],
                                       permissions=[client.parse_permission("mqtt:read:plant/#")])  # fmt: skip
    assert server.call("POST", client.REGISTER, body).status == 202
    asked = _rows(admin(registry, "requests"))["collector-1"]
    assert (asked["ROLES"], asked["PERMISSIONS"], asked["COLLECTED"]) == ("minimum", "mqtt:read:plant/#", "-")

    # Once approved, the rights shown are those granted, not those asked for.
    admin(registry, "approve", "collector-1", "--permission", "mqtt:read:plant/line-2/#", "--no-roles")
    approved = _rows(admin(registry, "requests"))["collector-1"]
    assert (approved["ROLES"], approved["PERMISSIONS"]) == ("-", "mqtt:read:plant/line-2/#")
    assert approved["COLLECTED"] == "not yet"

    assert server.call("POST", client.REGISTER, body).status == 201  # the client fetches its approval
    assert _rows(admin(registry, "requests"))["collector-1"]["COLLECTED"] == "yes"


def test_the_users_show_their_certificates_status_and_renewal_time(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC))
    with serve(tmp_path / "data", http=False, cert_days=1, retry_after=1, clock=clock) as instance:
        registry = InProcess(instance.url, tmp_path / "data" / "ca.pem")
        renew_after = registered(registry, "status-1", tmp_path / "agent").renew_after
        user = _rows(admin(registry, "users"))["status-1"]
        assert (user["CERTIFICATE"], user["RENEW AFTER (UTC)"]) == ("valid", client._utc(renew_after))
        clock.advance(hours=17)  # past renewAfter, two thirds of the day
        assert _rows(admin(registry, "users"))["status-1"]["CERTIFICATE"] == "renewal due"
        clock.advance(hours=8)
        assert _rows(admin(registry, "users"))["status-1"]["CERTIFICATE"] == "expired"
        users = {user["username"]: user for user in json.loads(admin(registry, "users", "--json"))}
        assert users["status-1"]["certificateStatus"] == "expired"


# --- register() for embedders -------------------------------------------------


def test_register_as_a_function_returns_what_the_administrator_narrowed_it_to(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    admin(registry, "unlock")
    server = client.Server(registry.url, ca_file=registry.ca_file)
    reports: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.register,
            server,
            "embedded-1",
            key=client.generate_key("ed25519"),
            roles=["minimum"],
            permissions=[client.parse_permission("http:readWrite:/api/things")],
            out=tmp_path,
            timeout=20,
            max_interval=1,
            report=reports.append,
        )
        _wait_until_pending(registry, "embedded-1")
        admin(registry, "approve", "embedded-1", "--permission", "http:read:/api/things")
        registered = future.result(timeout=WAIT)
    assert registered.roles == ("minimum",)  # not named by the approval: granted as requested
    assert registered.permissions == ({"resource": "/api/things", "operation": "read", "context": "http"},)
    assert registered.certificate_path == tmp_path / "cert.pem" and registered.certificate_path.exists()
    assert registered.key_path == tmp_path / "key.pem"  # the key came from elsewhere: written with its certificate
    assert registered.ca_path.read_text() == registered.ca_certificate_pem
    assert len(reports) == 1 and reports[0].startswith("pending, pairing id")

    with pytest.raises(client.Conflict) as conflict:
        client.register(server, "embedded-1", password="s3cret-pass", timeout=5)
    assert (conflict.value.status, conflict.value.code) == (409, "username_taken")
    with pytest.raises(client.Rejected) as rejected:
        client.register(server, "embedded-1", password="four", timeout=5)
    assert rejected.value.exit_code == client.Exit.REJECTED and "'password'" in rejected.value.message


def _wait_until_pending(registry: RegistryProcess | InProcess, username: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        requests = json.loads(admin(registry, "requests", "--json"))
        if any(r["username"] == username and r["state"] == "pending" for r in requests):
            return
        time.sleep(0.1)
    pytest.fail(f"no pending request for {username} within {WAIT} s")


# --- The pieces -----------------------------------------------------------------


@pytest.mark.parametrize("kind", client.KEY_TYPES)
def test_a_generated_key_signs_a_csr_whose_only_name_is_the_username(kind: str) -> None:
    csr = x509.load_pem_x509_csr(client.make_csr("sensor-0003", client.generate_key(kind)).encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0003")])
    assert len(csr.extensions) == 0


def test_permissions_read_as_context_operation_resource() -> None:
    assert client.parse_permission("mqtt:write:plant/a:b/#") == {
        "resource": "plant/a:b/#",
        "operation": "write",
        "context": "mqtt",
    }
    for wrong in ("mqtt:read", "ftp:read:/x", "http:delete:/x", "read:mqtt:x"):
        with pytest.raises(ValueError, match="CONTEXT:OPERATION:RESOURCE"):
            client.parse_permission(wrong)


def test_retry_after_reads_seconds_and_dates() -> None:
    """Proves CLIENT-9.1-RETRY-AFTER."""
    assert client.retry_after({"retry-after": "7"}, 5) == 7
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(minutes=1), usegmt=True)
    assert 55 < client.retry_after({"retry-after": in_a_minute}, 5) <= 60
    assert client.retry_after({"retry-after": "soon"}, 5) == 5
    assert client.retry_after({}, 30) == 30


# --- After registration: renewal, re-key, the keep-alive agent (SPEC section 7) ---


@dataclass(frozen=True)
class InProcess:
    """A ``server.py`` built in this process by conftest's ``serve``, reached as ``RegistryProcess`` is."""

    url: str
    ca_file: Path


def registered(registry: RegistryProcess | InProcess, username: str, out: Path) -> client.Registered:
    """``username`` registered with the key ``out/key.pem``, approved as asked."""
    admin(registry, "unlock")
    key, _ = client.load_or_generate_key(out / "key.pem", "ec")
    server = client.Server(registry.url, ca_file=registry.ca_file)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.register, server, username, key=key, out=out, timeout=20, max_interval=1)
        _wait_until_pending(registry, username)
        admin(registry, "approve", username)
        return future.result(timeout=WAIT)


def assert_pair(registry: RegistryProcess | InProcess, out: Path) -> x509.Certificate:
    """``out`` holds a key and its certificate, which authenticate over mutual TLS; the certificate."""
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert certificate.public_key() == key.public_key()
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    whoami = command("whoami", "--server", registry.url, "--ca-file", registry.ca_file,
                     "--cert", out / "cert.pem", "--key", out / "key.pem")  # fmt: skip
    assert whoami.returncode == client.Exit.OK, whoami.stderr
    return certificate


def test_renew_and_rekey_over_mutual_tls(registry: RegistryProcess, tmp_path: Path) -> None:
    """Proves LIFE-7.2-RENEW, LIFE-7.1-TIMES."""
    out = tmp_path / "agent"
    first = registered(registry, "renewing-1", out)
    original = assert_pair(registry, out)
    # The 201 tells when the certificate expires, and when to renew it: two thirds of the way (LIFE-7.1).
    assert first.not_after == original.not_valid_after_utc
    assert abs(first.renew_after - client.renewal_moment(original)) < timedelta(seconds=1)
    kept = tmp_path / "original"
    kept.mkdir()
    for name in ("cert.pem", "key.pem"):
        (kept / name).write_bytes((out / name).read_bytes())

    # The same key renews: a new certificate, trusted through OUT/ca.pem.
    renewed = command("renew", "--server", registry.url, "--out", out)
    assert renewed.returncode == client.Exit.OK, renewed.stderr
    assert renewed.stdout.startswith("renewed renewing-1: valid until ")
    second = assert_pair(registry, out)
    assert second.serial_number != original.serial_number and second.public_key() == original.public_key()
    assert second.not_valid_after_utc >= original.not_valid_after_utc

    # The previous certificate stays valid until its own notAfter (LIFE-7.2).
    whoami = command("whoami", "--server", registry.url, "--ca-file", registry.ca_file,
                     "--cert", kept / "cert.pem", "--key", kept / "key.pem")  # fmt: skip
    assert whoami.returncode == client.Exit.OK, whoami.stderr

    # A new key re-keys; the key is written with its certificate.
    rekeyed = command("renew", "--server", registry.url, "--out", out, "--new-key", "--key-type", "ed25519")
    assert rekeyed.returncode == client.Exit.OK, rekeyed.stderr
    assert f"{out / 'key.pem'}" in rekeyed.stdout and "(a new key)" in rekeyed.stdout
    third = assert_pair(registry, out)
    assert third.public_key() != original.public_key()
    assert (out / "key.pem").is_symlink() and len(list(out.glob(".pair-*"))) == 1
    assert json.loads((out / "granted.json").read_text())["username"] == "renewing-1"
    users = {user["username"]: user for user in json.loads(admin(registry, "users", "--json"))}
    assert users["renewing-1"]["certificateSerial"] == f"{third.serial_number:x}"

    # Registering again with the old key is a conflict: the new key is the credential now.
    old_key = serialization.load_pem_private_key((kept / "key.pem").read_bytes(), password=None)
    with pytest.raises(client.Conflict):
        client.register(client.Server(registry.url, ca_file=registry.ca_file), "renewing-1", key=old_key, timeout=5)

    # Once the user is removed, the certificate is revoked: exit code 8.
    admin(registry, "delete-user", "renewing-1")
    gone = command("renew", "--server", registry.url, "--out", out)
    assert gone.returncode == client.Exit.REVOKED == 8
    assert gone.stderr.startswith("client.py: the registry no longer accepts this certificate: 401 ")
    assert "revoked" in gone.stderr and "register again" in gone.stderr


class LosingServer(client.Server):
    """A server whose first renewal answer is lost on its way back, as a reset connection loses it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.lost: list[client.Reply] = []  # shared with the copies that present a certificate

    def call(self, method: str, path: str, body: object = None, **kwargs: object) -> client.Reply:
        reply = super().call(method, path, body, **kwargs)
        if path == client.RENEW and not self.lost:
            self.lost.append(reply)
            raise client.Unreachable("no answer: the connection was reset")
        return reply


def test_a_lost_renewal_answer_is_fetched_again(registry: RegistryProcess, tmp_path: Path) -> None:
    """Proves LIFE-7.2-RENEW, CLIENT-9.4-LOST-ANSWER."""
    out = tmp_path / "agent"
    registered(registry, "renewing-2", out)
    before = (out / "key.pem").read_bytes(), (out / "cert.pem").read_bytes()
    server = LosingServer(registry.url, ca_file=registry.ca_file)
    new_key = client.generate_key()
    with pytest.raises(client.Unreachable):
        client.renew(server, out, new_key=new_key)
    assert ((out / "key.pem").read_bytes(), (out / "cert.pem").read_bytes()) == before  # nothing written
    assert_pair(registry, out)

    # The same renewal again (the old certificate, the same new key) gets the lost certificate.
    renewed = client.renew(server, out, new_key=new_key)
    assert renewed.certificate_pem == json.loads(server.lost[0].body)["certificate"]
    assert (out / "cert.pem").read_text() == renewed.certificate_pem
    assert assert_pair(registry, out).public_key() == new_key.public_key()


class Crash(BaseException):
    """The process stopped dead: no handler runs."""


@pytest.mark.parametrize("phase", ["the first re-key, of the files registration wrote", "a later re-key"])
def test_a_rekey_interrupted_at_any_write_leaves_a_matching_key_and_certificate(
    registry: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    out = tmp_path / "agent"
    registered(registry, f"crashing-{len(phase)}", out)
    server = client.Server(registry.url, ca_file=registry.ca_file)
    if phase == "a later re-key":
        client.renew(server, out, new_key=client.generate_key())
    replace = os.replace
    for step in itertools.count():
        calls = itertools.count()

        def crash_at_step(source: str, target: str, calls: Iterator[int] = calls, step: int = step) -> None:
            if next(calls) == step:
                raise Crash
            replace(source, target)

        monkeypatch.setattr(os, "replace", crash_at_step)
        try:
            client.renew(server, out, new_key=client.generate_key())
        except Crash:
            pass
        else:
            break
        finally:
            monkeypatch.setattr(os, "replace", replace)
        # Every rename is a possible crash; after each, the folder holds a pair that works.
        assert_pair(registry, out)
    assert step >= 5  # granted.json, ca.pem, the new key, the new certificate, the link
    assert_pair(registry, out)
    assert len(list(out.glob(".pair-*"))) == 1


class FlakyServer(client.Server):
    """A server the first three renewals cannot reach and whose fourth answer is lost; it notes each try's time."""

    def __init__(self, url: str, *, ca_file: Path, clock: FakeClock) -> None:
        super().__init__(url, ca_file=ca_file)
        self.clock = clock
        self.tries: list[datetime] = []  # these lists are shared with the copies that present a certificate
        self.lost: list[client.Reply] = []

    def call(self, method: str, path: str, body: object = None, **kwargs: object) -> client.Reply:
        if path != client.RENEW:
            return super().call(method, path, body, **kwargs)
        self.tries.append(self.clock())
        if len(self.tries) <= 3:
            raise client.Unreachable("no answer: connection refused")
        reply = super().call(method, path, body, **kwargs)
        if not self.lost:
            self.lost.append(reply)
            raise client.Unreachable("no answer: the connection was reset")
        return reply


class Narrator:
    """The agent's ``report``, in lockstep: the agent waits at each line until the test asks for the next one."""

    def __init__(self) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._turn = threading.Semaphore(0)
        self._holding = False

    def __call__(self, line: str) -> None:
        self._lines.put(line)
        assert self._turn.acquire(timeout=WAIT), "the test did not go on"

    def next(self, text: str) -> str:
        """Let the agent go on, and return its next line, which must hold ``text``."""
        self.release()
        try:
            line = self._lines.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"the agent did not say {text!r} within {WAIT} s")
        self._holding = True
        assert text in line
        return line

    def release(self) -> None:
        """Let the agent go on from the line it waits at."""
        if self._holding:
            self._turn.release()
            self._holding = False


def test_the_keep_alive_agent_renews_on_its_own_and_stops_when_its_user_is_removed(tmp_path: Path) -> None:
    """Proves LIFE-7.2-RENEW, LIFE-7.3-REVOKE."""
    # The registry and the agent share a fake clock that only the agent's
    # sleep moves. OpenSSL still checks a client certificate against the real
    # clock, so the fake one starts 20 hours back: with one-day certificates,
    # the renewal (16 fake hours on) and the refused one (32 hours on) each
    # show a certificate that both clocks hold valid.
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=20))
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.advance(seconds=seconds)

    out, narrator = tmp_path / "agent", Narrator()
    with serve(tmp_path / "data", http=False, cert_days=1, retry_after=1, clock=clock) as instance:
        registry = InProcess(instance.url, tmp_path / "data" / "ca.pem")
        admin(registry, "unlock")
        server = FlakyServer(registry.url, ca_file=registry.ca_file, clock=clock)
        with ThreadPoolExecutor(1) as pool:
            agent = pool.submit(client.keep, server, out, username="keeper-1", roles=["minimum"], new_key=True,
                                now=clock, sleep=sleep, report=narrator)  # fmt: skip
            narrator.next("pending, pairing id")
            admin(registry, "approve", "keeper-1")
            narrator.next("registered keeper-1: roles minimum")
            first = assert_pair(registry, out)

            # It sleeps until renewAfter, plus a tenth of the rest at most.
            line = narrator.next("the certificate of keeper-1 is valid until ")
            wake = datetime.strptime(line.split("renewing at ")[1], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
            earliest, latest = client.renewal_moment(first), first.not_valid_after_utc
            assert earliest - timedelta(seconds=1) <= wake <= earliest + (latest - earliest) / 10

            # The registry cannot be reached: it tries again, backing off, and says so once.
            narrator.next("cannot renew yet (no answer: connection refused)")
            narrator.next("renewed keeper-1 with a new key")
            assert earliest <= server.tries[0] <= wake + timedelta(seconds=1)
            gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(server.tries)]
            assert [low <= gap <= 2 * low for low, gap in zip([2.5, 5, 10, 20], gaps, strict=True)] == [True] * 4
            assert max(naps) <= client.LONGEST_NAP

            # The lost answer was fetched again: the same certificate, for the new key.
            second = assert_pair(registry, out)
            assert (out / "cert.pem").read_text() == json.loads(server.lost[0].body)["certificate"]
            assert second.public_key() != first.public_key()
            assert second.not_valid_after_utc > first.not_valid_after_utc

            # The administrator removes the user: the agent's next check of its standing stops it, exit code 8.
            admin(registry, "delete-user", "keeper-1")
            narrator.release()
            with pytest.raises(client.Revoked) as revoked:
                agent.result(timeout=WAIT)
    assert revoked.value.exit_code == client.Exit.REVOKED
    assert revoked.value.status == 401 and "revoked" in revoked.value.message
    assert clock() < client.renewal_moment(second)  # at once, not at the renewal
    assert len(server.tries) == 5

    # An expired certificate stops it before anything is sent.
    with pytest.raises(client.Expired) as expired:
        client.keep(server, out, now=lambda: second.not_valid_after_utc, sleep=sleep)
    assert expired.value.exit_code == client.Exit.REVOKED and len(server.tries) == 5


def test_keep_on_the_command_line_registers_then_sleeps_until_renewal(
    registry: RegistryProcess, agents: list[Agent], tmp_path: Path
) -> None:
    admin(registry, "unlock")
    out = tmp_path / "agent"
    agent = Agent("--server", registry.url, "--username", "keeper-3", "--role", "minimum", "--out", out,
                  "--max-interval", "1", command="keep")  # fmt: skip
    agents.append(agent)
    agent.wait_for("SHA-256 fingerprint")  # no OUT/ca.pem yet: it pins the server's CA
    agent.wait_for("pending, pairing id")
    admin(registry, "approve", "keeper-3")
    agent.wait_for("registered keeper-3: roles minimum")
    line = agent.wait_for("the certificate of keeper-3 is valid until ")
    wake = datetime.strptime(line.split("renewing at ")[1], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    assert wake >= client.renewal_moment(assert_pair(registry, out)) - timedelta(seconds=1)
    assert agent.process.poll() is None  # asleep until then


def test_keep_on_the_command_line_ends_with_exit_code_8_when_its_user_is_gone(tmp_path: Path) -> None:
    """Proves LIFE-7.3-REVOKE."""
    # A certificate issued 20 hours ago for a day, its user removed since:
    # keep asks the registry before anything else, and stops.
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=20))
    with serve(tmp_path / "data", http=False, cert_days=1, retry_after=1, clock=clock) as instance:
        registry = InProcess(instance.url, tmp_path / "data" / "ca.pem")
        out = tmp_path / "agent"
        registered(registry, "keeper-2", out)
        clock.now = datetime.now(UTC)  # 20 hours on, the user is removed
        admin(registry, "delete-user", "keeper-2")
        done = command("keep", "--server", registry.url, "--out", out)
    assert done.returncode == client.Exit.REVOKED == 8
    # Its last word says why (on a slow machine, a first check that got no answer may have been reported before it).
    assert done.stderr.splitlines()[-1] == (
        "client.py: the registry no longer accepts this certificate: 401 unauthorized: this certificate was revoked"
        " (the name may register again, for the administrator to approve anew)"
    )


def test_keep_needs_a_username_only_to_register(tmp_path: Path) -> None:
    done = command("keep", "--server", "https://127.0.0.1:9", "--insecure", "--out", tmp_path)
    assert done.returncode == client.Exit.ERROR
    assert "there is no certificate in" in done.stderr and "give a username" in done.stderr


def test_the_backoff_grows_from_five_seconds_to_five_minutes() -> None:
    """Proves CLIENT-9.4-LOST-ANSWER."""
    for failures, low in enumerate([2.5, 5, 10, 20, 40, 80, 150, 150], start=1):
        assert low <= client._backoff(failures, client.RETRY_MAX, client.RETRY_FIRST) <= min(2 * low, 300)


def test_a_retry_after_longer_than_max_interval_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC CLIENT-9.1-RETRY-AFTER: max_interval bounds the client's own waits, never a server's Retry-After."""
    answers = [
        client.Reply(202, {"retry-after": "90"}, b'{"status": "pending", "pairingId": "4f1c2a"}'),
        client.Reply(423, {}, b'{"error": "locked", "message": "locked"}'),
        client.Reply(201, {}, b'{"status": "approved", "username": "sensor-0003", "roles": [], "permissions": []}'),
    ]

    class Scripted:
        def call(self, method: str, path: str, body: object, *, timeout: float) -> client.Reply:
            return answers.pop(0)

    waits: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waits.append)

    client._poll(Scripted(), {"username": "sensor-0003", "password": "s3cret-pass"}, None, 10, lambda _: None)

    assert 90 <= waits[0] <= 90 * (1 + client.JITTER)  # the server's 90 s, though max_interval is 10
    assert 10 <= waits[1] <= 10 * (1 + client.JITTER)  # no Retry-After: the client's own default, capped at 10


# --- What a newcomer tripped on (issue 26) ---------------------------------------


def test_a_key_given_with_key_is_written_beside_its_certificate_so_that_renew_finds_it(
    registry: RegistryProcess, agents: list[Agent], tmp_path: Path
) -> None:
    """Issue 26 item 1: after ``register --key FILE --out DIR``, ``renew --out DIR`` works."""
    admin(registry, "unlock")
    own, out = tmp_path / "ed.key", tmp_path / "agent"
    key = client.generate_key("ed25519")
    own.touch(mode=0o600)
    own.write_bytes(client._private_pem(key))
    agent = Agent(*register_args(registry, "agent-0088", out, "--key", own), *QUICK)
    agents.append(agent)
    agent.wait_for("pending, pairing id")
    admin(registry, "approve", "agent-0088")
    code, stdout = agent.finish()
    assert code == client.Exit.OK, agent.lines
    assert f"; the key is {own}, copied to {out / 'key.pem'} for renew and keep" in stdout
    assert assert_pair(registry, out).public_key() == key.public_key()  # key.pem is 0600, and the pair works

    renewed = command("renew", "--server", registry.url, "--out", out)

    assert renewed.returncode == client.Exit.OK, renewed.stderr
    assert assert_pair(registry, out).public_key() == key.public_key()
    assert own.read_bytes() == client._private_pem(key)  # the given file is only read


def test_register_with_a_password_needs_no_out_but_a_key_does(registry: RegistryProcess, tmp_path: Path) -> None:
    """Issue 26 item 9: --out only ever wrote granted.json for a password; a key needs it for its pair."""
    admin(registry, "unlock")
    server = ["--server", registry.url, "--ca-file", registry.ca_file, *QUICK]
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(command, "register", "--username", "sensor-0026", "--password", "s3cret-pass", *server)
        _wait_until_pending(registry, "sensor-0026")
        admin(registry, "approve", "sensor-0026")
        registered = done.result(timeout=WAIT)
    assert registered.returncode == client.Exit.OK, registered.stderr
    assert registered.stdout == "registered sensor-0026: roles none; permissions none\n"

    keyed = command("register", "--username", "agent-0026", "--generate-key", *server)
    assert keyed.returncode == client.Exit.USAGE
    assert "--out is needed with a key" in keyed.stderr


def test_approve_grants_as_requested_what_no_option_names(registry: RegistryProcess, tmp_path: Path) -> None:
    """Issue 26 item 3, ADMIN-4.4-APPROVE-BODY: --permission alone keeps the roles asked for; --no-roles drops them."""
    admin(registry, "unlock")
    asked = {"roles": ["minimum"], "permissions": [client.parse_permission("mqtt:read:sensors/#")]}
    narrower = "mqtt:read:sensors/0003/temperature"
    server = client.Server(registry.url, ca_file=registry.ca_file)
    for name in ("sensor-0031", "sensor-0032", "sensor-0033"):
        request = client.registration_request(name, password="s3cret-pass", **asked)
        assert server.call("POST", client.REGISTER, request).status == 202

    admin(registry, "approve", "sensor-0031", "--permission", narrower)
    admin(registry, "approve", "sensor-0032", "--no-roles")
    admin(registry, "approve", "sensor-0033", "--role", "minimum", "--no-permissions")

    users = {user["username"]: user for user in json.loads(admin(registry, "users", "--json"))}
    assert users["sensor-0031"]["roles"] == ["minimum"]
    assert users["sensor-0031"]["permissions"] == [client.parse_permission(narrower)]
    assert users["sensor-0032"]["roles"] == [] and users["sensor-0032"]["permissions"] == asked["permissions"]
    assert users["sensor-0033"]["roles"] == ["minimum"] and users["sensor-0033"]["permissions"] == []
    both = command("admin", "approve", "sensor-0034", "--no-roles", "--role", "minimum", "--token", TOKEN)
    assert both.returncode == client.Exit.USAGE and "--role grants roles" in both.stderr


def test_keep_notices_a_revocation_at_start_and_at_each_wake_up(tmp_path: Path) -> None:
    """Proves LIFE-7.3-REVOKE (issue 26 item 2): keep asks whoami over mutual TLS at start and after each nap.

    A 401 (revoked) ends it."""
    clock = FakeClock(datetime.now(UTC))
    naps: list[float] = []
    with serve(tmp_path / "data", http=False, retry_after=1, clock=clock) as instance:
        registry = InProcess(instance.url, tmp_path / "data" / "ca.pem")
        server = client.Server(registry.url, ca_file=registry.ca_file)

        # The user is removed while the agent sleeps (a year's certificate): its next wake-up, an hour on, sees it.
        registered(registry, "keeper-26", tmp_path / "asleep")

        def sleep(seconds: float) -> None:
            naps.append(seconds)
            clock.advance(seconds=seconds)
            if len(naps) == 1:
                admin(registry, "delete-user", "keeper-26")

        said: list[str] = []
        with pytest.raises(client.Revoked) as revoked:
            client.keep(server, tmp_path / "asleep", now=clock, sleep=sleep, report=said.append)
        assert naps == [client.LONGEST_NAP]
        assert len(said) == 1 and said[0].startswith("the certificate of keeper-26 is valid until ")
        assert (
            revoked.value.exit_code == client.Exit.REVOKED and revoked.value.message == "this certificate was revoked"
        )

        # An agent started on a revoked certificate stops at once: no plan, no sleep.
        said.clear()
        with pytest.raises(client.Revoked):
            client.keep(server, tmp_path / "asleep", now=clock, sleep=sleep, report=said.append)
        assert said == [] and naps == [client.LONGEST_NAP]


def test_ctrl_c_while_keep_sleeps_speaks_of_no_registration(
    registry: RegistryProcess, agents: list[Agent], tmp_path: Path
) -> None:
    """Issue 26 item 2: keep interrupted says that the same command goes on, and exits 130."""
    out = tmp_path / "agent"
    registered(registry, "keeper-27", out)
    agent = Agent("--server", registry.url, "--out", out, command="keep")
    agents.append(agent)
    agent.wait_for("renewing at")
    agent.process.send_signal(signal.SIGINT)
    code, _ = agent.finish()
    assert code == client.Exit.INTERRUPTED == 130
    assert (
        agent.lines[-1] == "client.py: interrupted (keeping the certificate resumes when the same command runs again)"
    )

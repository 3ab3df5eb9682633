"""A real relying party: Debian's mosquitto trusts the registry's CA and honours its CRL (SPEC section 7).

The registry runs over plain HTTP in a thread (conftest's ``serve``); two
agents register with CSRs and are approved through the API, as in SPEC
sections 2 and 4. A mosquitto broker runs in a subprocess on a free loopback
port, configured as docs/relying-parties.md shows: it requires a client
certificate issued by the registry's CA, takes the certificate's Common Name
as the MQTT username (``use_identity_as_username``; with ``allow_anonymous
false`` a certificate is the only way in) and checks the registry's CRL. Its
``cafile`` and ``crlfile`` are fetched over HTTP, as a broker's host fetches
them, since the broker's user cannot read the registry's data folder. The
broker's own certificate is issued by the same CA, so that an agent trusts
it with the ``caCertificate`` its 201 carried.

Once an agent's user is deleted (LIFE-7.3-REVOKE), the broker reads the new
CRL on a reload (SIGHUP) and when restarted: from then on the agent's
certificate is refused in the TLS handshake, while the other agent's still
connects; ``openssl verify -crl_check`` agrees (LIFE-7.5-CRL-FRESH). Every
subprocess is bounded by a timeout, and the broker is stopped by its own
process handle whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import ca
from conftest import ADMIN_TOKEN, call, make_csr, make_key, serve

HOST = "127.0.0.1"
# Debian puts the broker in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/local/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=SEARCH_PATH)
MOSQUITTO_PUB = shutil.which("mosquitto_pub", path=SEARCH_PATH)
OPENSSL = shutil.which("openssl", path=SEARCH_PATH)
SUBPROCESS_SECONDS = 20  # any one command; each normally takes well under a second
LISTEN_SECONDS = 10  # for the broker to open its port

pytestmark = pytest.mark.skipif(
    not (MOSQUITTO and MOSQUITTO_PUB and OPENSSL),
    reason="mosquitto, mosquitto_pub or openssl is not installed: "
    "apt-get install mosquitto mosquitto-clients openssl to run the relying-party test",
)


# --- The registry, seen over HTTP --------------------------------------------


def download(base: str, path: str, target: Path) -> bytes:
    """Fetch a public PEM document (the CA, the CRL) into ``target``, as a relying party's cron job does."""
    with urllib.request.urlopen(base + path, timeout=10) as response:
        assert response.status == 200, (path, response.status)
        content = response.read()
    target.write_bytes(content)
    return content


@dataclass(frozen=True)
class Agent:
    """An agent's files, as the agent keeps them: its key, its certificate and the CA that issued it."""

    name: str
    folder: Path

    @property
    def key(self) -> Path:
        return self.folder / "agent.key"

    @property
    def certificate(self) -> Path:
        return self.folder / "agent.pem"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


def enrol(base: str, name: str, folder: Path) -> Agent:
    """Register ``name`` with a fresh key's CSR, have the administrator approve it, and keep the 201's files."""
    folder.mkdir()
    agent = Agent(name, folder)
    key = make_key()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    agent.key.write_bytes(key_pem)
    agent.key.chmod(0o600)
    request = {"username": name, "csr": make_csr(name, key)}
    assert call(base, "POST", "/api/client-registry/unlock", token=ADMIN_TOKEN)[0] == 200
    assert call(base, "POST", "/api/client-registry/register", request)[0] == 202
    approve = f"/api/client-registry/requests/{name}/approve"
    assert call(base, "POST", approve, token=ADMIN_TOKEN)[0] == 200
    status, answer = call(base, "POST", "/api/client-registry/register", request)
    assert status == 201, answer
    agent.certificate.write_text(answer["certificate"])
    agent.ca.write_text(answer["caCertificate"])
    return agent


# --- The relying party: mosquitto and openssl --------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago (the broker binds it next)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def write_broker_config(folder: Path, port: int) -> Path:
    """docs/relying-parties.md's mosquitto settings, for files in ``folder`` and a loopback ``port``."""
    config = folder / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                # As root, mosquitto changes to this user; it must read its files in ``folder``.
                f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                "persistence false",
                "log_dest stderr",
                "log_type all",
                f"listener {port} {HOST}",
                f"cafile {folder / 'ca.pem'}",
                f"certfile {folder / 'broker.pem'}",
                f"keyfile {folder / 'broker.key'}",
                "require_certificate true",
                "use_identity_as_username true",
                f"crlfile {folder / 'crl.pem'}",
                "allow_anonymous false",
                "",
            ]
        )
    )
    return config


@contextlib.contextmanager
def mosquitto(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The broker of ``config``, listening on ``port``, its output appended to ``log``; stopped on the way out."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_until_listening(process, port, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(SUBPROCESS_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(SUBPROCESS_SECONDS)


def wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Return once ``port`` accepts a connection; fail, with the broker's log, if it exits or takes too long."""
    deadline = time.monotonic() + LISTEN_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mosquitto exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    pytest.fail(f"mosquitto did not listen on {HOST}:{port} within {LISTEN_SECONDS} s:\n{log.read_text()}")


def reload(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGHUP, as docs/relying-parties.md's cron line sends: mosquitto reads its files again (mosquitto(8), SIGNALS)."""
    reloads = log.read_text().count("Reloading config.")
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + LISTEN_SECONDS
    while log.read_text().count("Reloading config.") == reloads:
        if time.monotonic() > deadline:
            pytest.fail(f"mosquitto did not reload within {LISTEN_SECONDS} s:\n{log.read_text()}")
        time.sleep(0.05)


def publish(agent: Agent, port: int, topic: str) -> subprocess.CompletedProcess[str]:
    """The agent connects with its certificate and publishes one message at QoS 1 (so the broker acknowledges it)."""
    command = [
        MOSQUITTO_PUB,
        "-h", HOST, "-p", str(port),
        "--cafile", str(agent.ca), "--cert", str(agent.certificate), "--key", str(agent.key),
        "-i", agent.name, "-q", "1", "-t", topic, "-m", "online",
    ]  # fmt: skip
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SUBPROCESS_SECONDS, check=False
    )


def verify(agent: Agent, broker: Path) -> subprocess.CompletedProcess[str]:
    """``openssl verify -crl_check`` of the agent's certificate against the broker's CA and CRL."""
    command = [
        OPENSSL, "verify", "-crl_check",
        "-CAfile", str(broker / "ca.pem"), "-CRLfile", str(broker / "crl.pem"), str(agent.certificate),
    ]  # fmt: skip
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SUBPROCESS_SECONDS, check=False
    )


# --- The test ----------------------------------------------------------------


def test_mosquitto_refuses_a_deleted_users_certificate_once_it_reads_the_new_crl(tmp_path: Path) -> None:
    """Proves LIFE-7.3-REVOKE, LIFE-7.4-CRL, LIFE-7.5-CRL-FRESH."""
    broker = tmp_path / "broker"
    broker.mkdir(mode=0o700)
    log = broker / "mosquitto.log"
    port = free_port()
    config = write_broker_config(broker, port)
    with serve(tmp_path / "data") as registry_server:
        base = registry_server.url
        first = enrol(base, "agent-0001", tmp_path / "agent-0001")
        second = enrol(base, "agent-0002", tmp_path / "agent-0002")

        # The broker's host fetches the CA and the CRL; the operator issues
        # the broker's own certificate with the registry's CA.
        download(base, "/api/client-registry/ca", broker / "ca.pem")
        first_crl = download(base, "/api/client-registry/crl.pem", broker / "crl.pem")
        now = datetime.now(UTC)
        credentials = ca.CA.load_or_create(tmp_path / "data", now).issue_server_certificate(now)
        (broker / "broker.pem").write_text(credentials.certificate_pem)
        (broker / "broker.key").write_text(credentials.key_pem)
        (broker / "broker.key").chmod(0o600)
        for agent in (first, second):
            checked = verify(agent, broker)
            assert checked.returncode == 0 and checked.stdout.strip().endswith(": OK"), checked

        with mosquitto(config, port, log) as running:
            for agent in (first, second):
                sent = publish(agent, port, f"plant/{agent.name}/status")
                assert sent.returncode == 0, (sent, log.read_text())
            # The certificate's Common Name is the MQTT username (the client sent none).
            assert f"u'{first.name}'" in log.read_text() and f"u'{second.name}'" in log.read_text()

            status, answer = call(base, "DELETE", f"/api/users/{first.name}", token=ADMIN_TOKEN)
            assert status == 200, answer
            assert download(base, "/api/client-registry/crl.pem", broker / "crl.pem") != first_crl
            # A reload reads the new CRL: the next handshake is refused.
            reload(running, log)
            after_reload = publish(first, port, f"plant/{first.name}/status")
            assert after_reload.returncode != 0, (after_reload, log.read_text())

    refused = verify(first, broker)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr, refused
    kept = verify(second, broker)
    assert kept.returncode == 0 and kept.stdout.strip().endswith(": OK"), kept

    # Restarted with the new CRL, the broker refuses the deleted user's
    # certificate in the handshake and admits the other agent's. Only the
    # CRL changed since the first start, so it is what refuses the agent.
    first_run = len(log.read_text())
    with mosquitto(config, port, log):
        refused_publish = publish(first, port, f"plant/{first.name}/status")
        kept_publish = publish(second, port, f"plant/{second.name}/status")
    second_run = log.read_text()[first_run:]
    assert refused_publish.returncode != 0, (refused_publish, second_run)
    assert "certificate verify failed" in second_run and f"u'{first.name}'" not in second_run, second_run
    assert kept_publish.returncode == 0, (kept_publish, second_run)
    assert f"u'{second.name}'" in second_run, second_run

"""SPEC section 7 over HTTPS: renewal with real client certificates, revocation, and the CRL the server serves.

The core's rules are in test_registry.py; here a real server (TLS, port 0)
answers a real client that presents its certificate, as a device would.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import server
from conftest import ADMIN_TOKEN, FakeClock, assert_issued_from, make_csr, make_key, serve

REGISTER = "/api/client-registry/register"
RENEW = "/api/client-registry/renew"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Registry:
    """A running HTTPS registry, spoken to as a device or as its administrator."""

    def __init__(self, instance: server.RegistryServer, folder: Path) -> None:
        self.instance = instance
        self.folder = folder
        self.port = instance.server_address[1]

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        admin: bool = False,
        identity: tuple | None = None,
        password: str | None = None,
    ) -> Answer:
        """One request; ``identity`` (certificate PEM, private key) is presented over mutual TLS."""
        context = ssl.create_default_context(cafile=str(self.folder / "ca.pem"))
        if identity is not None:
            certificate_pem, key = identity
            cert_path, key_path = self.folder / "client-cert.pem", self.folder / "client-key.pem"
            cert_path.write_text(certificate_pem)
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            context.load_cert_chain(cert_path, key_path)
        connection = http.client.HTTPSConnection("localhost", self.port, context=context, timeout=10)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if admin else {}
        if password is not None:
            headers = {"Authorization": "Basic " + base64.b64encode(password.encode()).decode()}
        payload = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, path, payload, headers)
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def admitted(self, username: str, key: object) -> dict[str, Any]:
        """Register ``username`` with a CSR for ``key``, approve it, and fetch its 201."""
        request = {"username": username, "csr": make_csr(username, key)}
        assert self.call("POST", "/api/client-registry/unlock", admin=True).status == 200
        assert self.call("POST", REGISTER, request).status == 202
        assert self.call("POST", f"/api/client-registry/requests/{username}/approve", admin=True).status == 200
        answer = self.call("POST", REGISTER, request)
        assert answer.status == 201
        return answer.json()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Registry]:
    """An HTTPS registry whose clock stands at the present, so that its certificates pass real TLS checks."""
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    with serve(tmp_path, http=False, clock=clock) as instance:
        yield Registry(instance, tmp_path)


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def test_a_device_renews_with_its_key_over_mutual_tls_and_both_certificates_sign_in(live: Registry) -> None:
    """Proves LIFE-7.2-RENEW, AUTH-5.2-WHOAMI."""
    key = make_key()
    admitted = live.admitted("agent-0001", key)

    answer = live.call("POST", RENEW, {"csr": make_csr("agent-0001", key)}, identity=(admitted["certificate"], key))

    assert answer.status == 201, answer.body
    renewed = answer.json()
    assert renewed["status"] == "renewed" and renewed["username"] == "agent-0001"
    certificate = assert_issued_from(make_csr("agent-0001", key), renewed["certificate"], live.instance.app.core.ca)
    assert certificate.serial_number != load(admitted["certificate"]).serial_number
    assert datetime.fromisoformat(renewed["notAfter"]) == certificate.not_valid_after_utc
    for pem in (admitted["certificate"], renewed["certificate"]):
        whoami = live.call("GET", "/api/auth/whoami", identity=(pem, key))
        assert (whoami.status, whoami.json()["method"]) == (200, "certificate")


def test_a_device_rekeys_and_its_new_key_signs_in(live: Registry) -> None:
    """Proves LIFE-7.2-RENEW."""
    old_key, new_key = make_key(), make_key("rsa")
    admitted = live.admitted("agent-0001", old_key)

    answer = live.call(
        "POST", RENEW, {"csr": make_csr("agent-0001", new_key)}, identity=(admitted["certificate"], old_key)
    )

    assert answer.status == 201, answer.body
    renewed = answer.json()
    assert load(renewed["certificate"]).public_key() == new_key.public_key()
    assert live.call("GET", "/api/auth/whoami", identity=(renewed["certificate"], new_key)).status == 200
    again = live.call("POST", REGISTER, {"username": "agent-0001", "csr": make_csr("agent-0001", old_key)})
    assert (again.status, again.json()["error"]) == (409, "username_taken")


def test_a_lost_renewal_answer_is_fetched_again(live: Registry) -> None:
    """Proves LIFE-7.2-RENEW."""
    key = make_key()
    admitted = live.admitted("agent-0001", key)
    identity = (admitted["certificate"], key)
    csr = make_csr("agent-0001", key)

    first = live.call("POST", RENEW, {"csr": csr}, identity=identity)
    again = live.call("POST", RENEW, {"csr": make_csr("agent-0001", key)}, identity=identity)

    assert first.status == again.status == 201
    assert again.json() == first.json()


@pytest.mark.parametrize("case", ["no certificate", "a password", "a removed user's certificate"])
def test_a_renewal_without_a_current_certificate_is_401_with_a_challenge(live: Registry, case: str) -> None:
    """Proves LIFE-7.2-RENEW."""
    key = make_key()
    admitted = live.admitted("agent-0001", key)
    identity, password = None, None
    if case == "a password":
        password = "agent-0001:correct horse"
    elif case == "a removed user's certificate":
        assert live.call("DELETE", "/api/users/agent-0001", admin=True).status == 200
        identity = (admitted["certificate"], key)

    answer = live.call("POST", RENEW, {"csr": make_csr("agent-0001", key)}, identity=identity, password=password)

    assert answer.status == 401
    assert answer.headers["www-authenticate"] == 'Basic realm="client-registry"'
    assert answer.json()["error"] == "unauthorized"


def test_the_crl_lists_a_removed_users_certificates_in_der_and_pem(live: Registry) -> None:
    """Proves LIFE-7.3-REVOKE, LIFE-7.4-CRL."""
    key = make_key()
    admitted = live.admitted("agent-0001", key)
    kept_key = make_key()
    kept = live.admitted("agent-0002", kept_key)
    before = live.call("GET", "/api/client-registry", admin=True).json()["crl"]

    assert live.call("DELETE", "/api/users/agent-0001", admin=True).status == 200

    der, pem = live.call("GET", "/api/client-registry/crl"), live.call("GET", "/api/client-registry/crl.pem")
    assert (der.status, der.headers["content-type"]) == (200, "application/pkix-crl")
    assert (pem.status, pem.headers["content-type"]) == (200, "application/x-pem-file")
    crl = x509.load_der_x509_crl(der.body)
    assert x509.load_pem_x509_crl(pem.body).public_bytes(serialization.Encoding.DER) == der.body
    assert crl.is_signature_valid(live.instance.app.core.ca.certificate.public_key())
    assert [entry.serial_number for entry in crl] == [load(admitted["certificate"]).serial_number]
    status = live.call("GET", "/api/client-registry", admin=True).json()["crl"]
    assert status["number"] == before["number"] + 1
    assert datetime.fromisoformat(status["nextUpdate"]) == crl.next_update_utc
    assert live.call("GET", "/api/auth/whoami", identity=(admitted["certificate"], key)).status == 401
    assert [user["username"] for user in live.call("GET", "/api/users", admin=True).json()] == ["agent-0002"]
    assert live.call("GET", "/api/auth/whoami", identity=(kept["certificate"], kept_key)).status == 200


def test_a_running_server_signs_a_new_crl_before_half_of_its_validity_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves LIFE-7.5-CRL-FRESH: a timer, not a request, keeps the CRL from expiring."""
    monkeypatch.setattr(server, "CRL_CHECK_SECONDS", 0.05)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    with serve(tmp_path, clock=clock, crl_days=2) as instance:
        core = instance.app.core
        first = core.status()["crl"]
        clock.advance(days=1, seconds=1)  # less than half of two days left

        deadline = time.monotonic() + 10
        while core.status()["crl"]["number"] == first["number"] and time.monotonic() < deadline:
            time.sleep(0.02)

        crl = core.status()["crl"]
        assert crl["number"] == first["number"] + 1
        assert datetime.fromisoformat(crl["nextUpdate"]) == clock.now + timedelta(days=2)

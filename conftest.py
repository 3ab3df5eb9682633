"""What the tests share: a fake clock, keys and CSRs, and predicates on certificates."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, settings

import ca
import registry
import server

# CI runs the whole suite on a slow machine within a few minutes: fewer
# examples there, and no deadline, since timing is not what is tested.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
# scrypt at its real cost takes tens of milliseconds; the rules under test
# are the same at n = 16.
FAST = registry.Settings(scrypt_n=16)
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # ADMIN-4.1-TOKEN: 32 characters or more


class FakeClock:
    """A clock that stands still until a test moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def make_key(kind: str = "ec") -> object:
    """A private key: "ec" (P-256), "p384", "p521", "rsa" (2048), "rsa1024" or "ed25519"."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def make_csr(common_name: str | None, key: object = None, *, extensions: list[x509.ExtensionType] = ()) -> str:
    """A PEM CSR for ``common_name`` (no CN when None), signed by ``key``."""
    key = key or make_key()
    attributes = [] if common_name is None else [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def issue(authority: ca.CA, csr_pem: str, username: str, now: datetime) -> ca.IssuedCertificate:
    """A certificate for ``username`` and the key of ``csr_pem``, read and verified as registration reads it."""
    return authority.issue_client_certificate(authority.inspect_csr(csr_pem).public_key, username, now)


def assert_issued_from(csr_pem: str, certificate_pem: str, authority: ca.CA) -> x509.Certificate:
    """The certificate was signed by ``authority`` for the CSR's key, under SPEC section 5's profile."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    certificate.verify_directly_issued_by(authority.certificate)
    assert certificate.public_key() == csr.public_key()
    common_name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    return certificate


POLL_STATISTICS = ("lastPollAt", "pollCount", "clientAddress")


def without_poll_statistics(state: tuple) -> tuple:
    """A snapshot (status, requests, users, audit) without the requests' poll statistics, which record a poll
    (ADMIN-4.7-POLL-STATS) and change no request."""
    status, requests, *rest = state
    return (status, [{k: v for k, v in r.items() if k not in POLL_STATISTICS} for r in requests], *rest)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> ca.CA:
    """One CA for the whole run: creating keys is the slow part."""
    return ca.CA.load_or_create(tmp_path_factory.mktemp("ca"), START)


@pytest.fixture
def reg(clock: FakeClock, authority: ca.CA) -> registry.Registry:
    """An in-memory registry with a CA, the default catalog plus "operator", and fast scrypt."""
    instance = registry.Registry(clock=clock, ca=authority, roles=("minimum", "operator"), settings=FAST)
    yield instance
    instance.close()


def call(base: str, method: str, path: str, body: object = None, *, token: str | None = None) -> tuple[int, Any]:
    """One HTTP call to a registry at ``base`` (its URL): the status, and the JSON body (or the bytes of another)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        raw = response.read()
        is_json = response.headers.get("Content-Type") == "application/json"
        return response.status, json.loads(raw) if is_json else raw


@contextlib.contextmanager
def serve(data_dir: Path, **config: object) -> Iterator[server.RegistryServer]:
    """A real server in a thread on 127.0.0.1, port 0, plain HTTP unless ``http=False``."""
    options = {"port": 0, "http": True, "admin_token": ADMIN_TOKEN, "scrypt_n": 16} | config
    clock = options.pop("clock", None)
    instance = server.build(server.Config(data_dir=data_dir, **options), *([clock] if clock else []))
    thread = threading.Thread(target=instance.serve_forever, daemon=True)
    thread.start()
    try:
        yield instance
    finally:
        instance.shutdown()
        instance.server_close()
        instance.app.core.close()
        thread.join(10)

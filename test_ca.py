"""The CA of ``ca.py``: its creation and loading, the client certificate profile of SPEC section 5, CSR
inspection, CSRs made by the ``openssl`` command line, the HTTPS server's certificate in a real TLS
handshake, and the writing of secret files."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

import ca
import files
import registry
from conftest import FAST, START, FakeClock, assert_issued_from, issue, make_csr, make_key

# SPEC section 5 and the issue: what a client certificate carries, and nothing more.
CLIENT_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}
# What cryptography says of the keys of conftest.make_key: (algorithm, size, curve).
KEY_DESCRIPTIONS = {
    "ec": ("EC", 256, "secp256r1"),
    "p384": ("EC", 384, "secp384r1"),
    "p521": ("EC", 521, "secp521r1"),
    "ed25519": ("Ed25519", 256, None),
    "rsa": ("RSA", 2048, None),
}
# The -newkey arguments of `openssl req` for each kind of key.
OPENSSL_KEYS = {
    "rsa2048": ["-newkey", "rsa:2048"],
    "rsa1024": ["-newkey", "rsa:1024"],
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "p521": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    "ed25519": ["-newkey", "ed25519"],
}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
# cryptography warns when it builds or reads a Common Name of length 0.
empty_name_warning = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


@pytest.fixture(scope="module")
def client_keys() -> dict[str, object]:
    """One key of each kind the tests sign for: RSA keys are slow to make, so only one."""
    return {kind: make_key(kind) for kind in KEY_DESCRIPTIONS}


@pytest.fixture(scope="module")
def live_authority() -> ca.CA:
    """A CA valid at the real time: Python's ``ssl`` checks validity against the system clock."""
    return ca.CA.create(datetime.now(UTC))


# --- Helpers ----------------------------------------------------------------


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def to_pem(der: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    """DER as PEM (RFC 7468): base64 in lines of 64 characters between the labels."""
    text = base64.b64encode(der).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def with_altered_signature(csr_pem: str) -> str:
    """The CSR with the last byte of its signature flipped: it still parses, and no longer verifies."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return to_pem(bytes(der))


def spki_sha256(key: object) -> str:
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def openssl_csr(folder: Path, kind: str, subject: str = "/CN=sensor-0003") -> str:
    """A PEM CSR made by `openssl req` with a new key of ``kind``."""
    key_file, csr_file = folder / f"{kind}.key", folder / f"{kind}.csr"
    command = ["openssl", "req", "-new", *OPENSSL_KEYS[kind], "-nodes", "-subj", subject]
    subprocess.run([*command, "-keyout", key_file, "-out", csr_file], check=True, capture_output=True)
    return csr_file.read_text()


def openssl_verify(folder: Path, ca_pem: str, certificate_pem: str, purpose: str) -> subprocess.CompletedProcess:
    """`openssl verify` of a certificate against the CA alone, one hour after START."""
    (folder / "ca.pem").write_text(ca_pem)
    (folder / "leaf.pem").write_text(certificate_pem)
    at = str(int((START + timedelta(hours=1)).timestamp()))
    command = ["openssl", "verify", "-x509_strict", "-attime", at, "-purpose", purpose]
    return subprocess.run([*command, "-CAfile", folder / "ca.pem", folder / "leaf.pem"], capture_output=True, text=True)


def registered(reg: registry.Registry, request: dict) -> registry.Outcome:
    """Register ``request`` in an unlocked registry, approve it, and fetch the 201 by polling."""
    reg.unlock()
    assert reg.register(request).status == HTTPStatus.ACCEPTED
    reg.approve(request["username"])
    outcome = reg.register(request)
    assert outcome.status == HTTPStatus.CREATED
    return outcome


def refusal(reg: registry.Registry, request: dict) -> registry.RegistryError:
    """The error an unlocked registry raises for ``request``; it must store nothing."""
    reg.unlock()
    with pytest.raises(registry.RegistryError) as caught:
        reg.register(request)
    assert reg.requests() == []
    return caught.value


def serve_tls(listener: socket.socket, context: ssl.SSLContext, connections: int) -> None:
    """Accept ``connections`` clients; greet each one whose handshake succeeds."""
    for _ in range(connections):
        connection, _ = listener.accept()
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
            tls.sendall(b"registry")


@contextlib.contextmanager
def tls_server(folder: Path, credentials: ca.ServerCredentials, connections: int = 1) -> Iterator[int]:
    """A TLS server on 127.0.0.1, in a thread, with ``credentials``; yields its port (CPython's test style)."""
    certificate_file, key_file = folder / "server.pem", folder / "server.key"
    certificate_file.write_text(credentials.certificate_pem)
    files.write_private(key_file, credentials.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate_file, key_file)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve_tls, args=(listener, context, connections), daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(timeout=10)
        assert not thread.is_alive()


def tls_greeting(port: int, trusted_ca_pem: str, server_hostname: str) -> bytes:
    """Connect trusting only ``trusted_ca_pem``, checking the host name; what the server says."""
    context = ssl.create_default_context(cadata=trusted_ca_pem)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(64)


# --- Creating and loading the CA ----------------------------------------------


def test_load_or_create_creates_the_certificate_and_a_key_for_the_owner_alone(tmp_path: Path) -> None:
    """Proves CERT-5.4-CA, SAFE-6.4-FILES."""
    authority = ca.CA.load_or_create(tmp_path, START)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["ca.key", "ca.pem"]
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.pem").read_text() == authority.certificate_pem
    key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    assert key.public_key() == authority.certificate.public_key()


def test_load_or_create_loads_the_same_ca_again(tmp_path: Path) -> None:
    """Proves CERT-5.4-CA."""
    created = ca.CA.load_or_create(tmp_path, START)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    loaded = ca.CA.load_or_create(tmp_path, START + timedelta(days=1))

    assert loaded.certificate == created.certificate
    assert loaded.certificate_pem == created.certificate_pem
    assert loaded.key.private_numbers() == created.key.private_numbers()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files


def test_load_or_create_refuses_a_key_others_may_read(tmp_path: Path) -> None:
    """Proves SAFE-6.4-FILES."""
    ca.CA.load_or_create(tmp_path, START)
    (tmp_path / "ca.key").chmod(0o644)

    with pytest.raises(PermissionError, match="chmod"):
        ca.CA.load_or_create(tmp_path, START)


def test_ca_certificate_is_a_self_signed_ca(authority: ca.CA) -> None:
    """Proves CERT-5.4-CA."""
    certificate = authority.certificate

    assert certificate.issuer == certificate.subject
    certificate.verify_directly_issued_by(certificate)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True and constraints.value.path_length == 0
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not (usage.value.digital_signature or usage.value.key_encipherment or usage.value.key_agreement)
    identifier = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert identifier == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())


def test_ca_validity_is_timezone_aware_utc(authority: ca.CA) -> None:
    certificate = authority.certificate
    assert certificate.not_valid_before_utc.tzinfo == UTC
    assert certificate.not_valid_before_utc == START - ca.CLOCK_SKEW
    assert certificate.not_valid_after_utc == START - ca.CLOCK_SKEW + ca.CA_VALIDITY

    # The same instant written in another zone gives the same validity.
    elsewhere = ca.CA.create(START.astimezone(timezone(timedelta(hours=-5)))).certificate
    assert elsewhere.not_valid_before_utc == certificate.not_valid_before_utc
    assert elsewhere.not_valid_after_utc == certificate.not_valid_after_utc


# --- Issued client certificates (SPEC section 5) ------------------------------


@pytest.mark.parametrize("kind", ["ec", "p384", "ed25519", "rsa"])
def test_client_certificate_carries_exactly_the_profile(
    authority: ca.CA, client_keys: dict[str, object], kind: str
) -> None:
    """Proves CERT-5.3-SUBJECT, CERT-5.3-BASIC-CONSTRAINTS, CERT-5.3-EKU."""
    key = client_keys[kind]
    csr = make_csr("sensor-0003", key)

    certificate = assert_issued_from(csr, issue(authority, csr, "sensor-0003", START).pem, authority)

    certificate.verify_directly_issued_by(authority.certificate)
    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0003")])
    assert certificate.issuer == authority.certificate.subject
    assert {extension.oid for extension in certificate.extensions} == CLIENT_EXTENSIONS
    assert len(certificate.extensions) == len(CLIENT_EXTENSIONS)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    # RFC 5280 section 4.2.1.3: only an RSA key enciphers a TLS key.
    assert usage.value.key_encipherment is (kind == "rsa")
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.content_commitment)
    assert not (usage.value.data_encipherment or usage.value.key_agreement)
    client_usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client_usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    subject_identifier = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert subject_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    authority_identifier = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_identifier = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert authority_identifier.key_identifier == ca_identifier.digest


def test_a_common_name_longer_than_rfc_5280_allows_is_refused(authority: ca.CA) -> None:
    """Proves CERT-5.3-SUBJECT: ub-common-name is 64; the registry's usernames fit, a caller of the CA may not."""
    csr = make_csr("sensor-0003")
    assert load(issue(authority, csr, "s" * 64, START).pem)

    with pytest.raises(ValueError, match="<= 64"):
        issue(authority, csr, "s" * 65, START)


@needs_openssl
def test_openssl_verifies_a_client_certificate_for_client_authentication(tmp_path: Path, authority: ca.CA) -> None:
    """Proves CERT-5.3-EKU."""
    csr = make_csr("sensor-0003")
    issued = issue(authority, csr, "sensor-0003", START)

    verified = openssl_verify(tmp_path, authority.certificate_pem, issued.pem, "sslclient")

    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().endswith(": OK")


@needs_openssl
def test_openssl_refuses_the_server_certificate_for_client_authentication(tmp_path: Path, authority: ca.CA) -> None:
    """Proves CERT-5.3-EKU: the purpose check of the test above has teeth; a serverAuth certificate fails it."""
    server = authority.issue_server_certificate(START)

    assert openssl_verify(tmp_path, authority.certificate_pem, server.certificate_pem, "sslclient").returncode != 0
    assert openssl_verify(tmp_path, authority.certificate_pem, server.certificate_pem, "sslserver").returncode == 0


def test_issued_certificate_record_describes_the_certificate(authority: ca.CA) -> None:
    issued = issue(authority, make_csr("sensor-0003"), "sensor-0003", START)

    certificate = load(issued.pem)
    assert issued.serial == certificate.serial_number
    assert issued.not_after == certificate.not_valid_after_utc
    assert issued.sha256 == hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_serials_are_random_positive_and_fit_in_twenty_octets(authority: ca.CA) -> None:
    """Proves CERT-5.3-SERIAL."""
    csr = make_csr("sensor-0003")

    serials = [issue(authority, csr, "sensor-0003", START).serial for _ in range(2)]

    assert serials[0] != serials[1]
    # RFC 5280 section 4.1.2.2: positive, at most 20 octets (x509.random_serial_number draws 159 bits).
    assert all(0 < serial < 2**159 for serial in serials)


def _accepted_pem_variants(pem: str) -> dict[str, str]:
    """The same CSR written as other tools write one PEM block: each is read, and signed for its key."""
    lines = pem.strip().split("\n")
    return {
        "as made": pem,
        "NEW label": pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
        "CRLF": pem.replace("\n", "\r\n"),
        "one body line": "\n".join([lines[0], "".join(lines[1:-1]), lines[-1]]),
        "no line breaks": pem.replace("\n", ""),
        "trailing spaces": pem.replace("\n", " \n"),
        "white space around": f"\n\t  {pem}\n\n",
    }


def _refused_pem_variants(pem: str, other_pem: str) -> dict[str, str]:
    """A CSR with something more than one PEM block: each is refused, whatever it holds."""
    lines = pem.strip().split("\n")
    key = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
    return {
        "text before": f"Subject: sensor-0003\n{pem}",
        "text after": f"{pem}sent by the agent\n",
        "a key first": key + pem,
        "a key after": pem + key,
        "two requests": pem + other_pem,
        # RFC 1421 headers, which the first reader of the attack skipped and the second did not.
        "headers": "\n".join([lines[0], "Comment: hello", "", *lines[1:]]),
        "headers and a second request": "\n".join([lines[0], "Comment: hello", "", *lines[1:]]) + "\n" + other_pem,
        "mismatched labels": pem.replace("END CERTIFICATE REQUEST", "END NEW CERTIFICATE REQUEST"),
        "a non-breaking space around": f"\xa0{pem}",
    }


@pytest.mark.parametrize("variant", list(_accepted_pem_variants(make_csr("sensor-0003"))))
def test_a_csr_in_one_pem_block_is_signed_for_its_key_however_the_block_is_written(
    authority: ca.CA, client_keys: dict[str, object], variant: str
) -> None:
    """Proves REQ-1-CSR-PEM."""
    key = client_keys["rsa"]
    text = _accepted_pem_variants(make_csr("sensor-0003", key))[variant]

    issued = issue(authority, text, "sensor-0003", START)

    assert load(issued.pem).public_key() == key.public_key()


@pytest.mark.parametrize("variant", list(_refused_pem_variants(make_csr("sensor-0003"), make_csr("sensor-0003"))))
def test_a_csr_field_with_more_than_one_pem_block_is_refused(
    reg: registry.Registry, client_keys: dict[str, object], variant: str
) -> None:
    """Proves REQ-1-CSR-PEM: the registry reads no text but one PEM block, before its CA reads anything."""
    text = _refused_pem_variants(make_csr("sensor-0003"), make_csr("sensor-0003", client_keys["rsa"]))[variant]
    reg.unlock()

    with pytest.raises(registry.MalformedRequest, match="exactly one PEM block"):
        reg.register({"username": "sensor-0003", "csr": text})
    assert reg.requests() == []


def test_validity_starts_before_now_for_clock_skew_and_lasts_a_year(authority: ca.CA) -> None:
    """Proves CERT-5.3-VALIDITY, LIFE-7.1-TIMES."""
    certificate = load(issue(authority, make_csr("sensor-0003"), "sensor-0003", START).pem)

    assert timedelta(0) < START - certificate.not_valid_before_utc <= timedelta(minutes=10)
    assert certificate.not_valid_before_utc == START - ca.CLOCK_SKEW
    assert certificate.not_valid_after_utc == START - ca.CLOCK_SKEW + timedelta(
        days=365
    )  # LIFE-7.1-TIMES: notBefore + validity


def test_validity_lasts_cert_days(tmp_path: Path, authority: ca.CA) -> None:
    """Proves CERT-5.3-VALIDITY."""
    csr = make_csr("sensor-0003")
    monthly = ca.CA(authority.key, authority.certificate, cert_days=30)
    assert load(issue(monthly, csr, "sensor-0003", START).pem).not_valid_after_utc == (
        START - ca.CLOCK_SKEW + timedelta(days=30)
    )

    ca.CA.load_or_create(tmp_path, START)
    reloaded = ca.CA.load_or_create(tmp_path, START, cert_days=7)
    assert load(issue(reloaded, csr, "sensor-0003", START).pem).not_valid_after_utc == (
        START - ca.CLOCK_SKEW + timedelta(days=7)
    )


def test_validity_is_the_same_instant_whatever_the_zone_of_now(authority: ca.CA) -> None:
    """Proves CERT-5.3-VALIDITY."""
    now = START.astimezone(timezone(timedelta(hours=9)))

    certificate = load(issue(authority, make_csr("sensor-0003"), "sensor-0003", now).pem)

    assert certificate.not_valid_before_utc == START - ca.CLOCK_SKEW
    assert certificate.not_valid_after_utc == START - ca.CLOCK_SKEW + timedelta(days=365)


def test_client_certificate_ignores_what_the_csr_asked_for(authority: ca.CA, client_keys: dict[str, object]) -> None:
    """Proves CERT-5.3-SUBJECT."""
    key = client_keys["ec"]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0003"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Plant Operators"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Administrators"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "root@plant.example"),
        ]
    )
    asked = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("hub.plant.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )

    certificate = load(issue(authority, asked, "sensor-0003", START).pem)

    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0003")])
    assert {extension.oid for extension in certificate.extensions} == CLIENT_EXTENSIONS
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert certificate.public_key() == key.public_key()


# --- inspect_csr ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KEY_DESCRIPTIONS))
def test_inspect_csr_names_the_common_name_and_the_key(
    authority: ca.CA, client_keys: dict[str, object], kind: str
) -> None:
    key = client_keys[kind]

    info = authority.inspect_csr(make_csr("sensor-0003", key))

    assert info.common_name == "sensor-0003"
    assert (info.key_algorithm, info.key_size, info.curve) == KEY_DESCRIPTIONS[kind]
    assert info.public_key_sha256 == spki_sha256(key)


def test_inspect_csr_fingerprints_the_key_not_the_request(authority: ca.CA, client_keys: dict[str, object]) -> None:
    """Proves REG-2.4-MATCH."""
    key, other = client_keys["ec"], client_keys["p384"]

    first = authority.inspect_csr(make_csr("sensor-0003", key)).public_key_sha256
    again = authority.inspect_csr(make_csr("sensor-0004", key)).public_key_sha256
    different = authority.inspect_csr(make_csr("sensor-0003", other)).public_key_sha256

    assert first == again != different


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a certificate signing request",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "certificate",
    ],
    ids=["empty", "words", "bad-der", "certificate"],
)
def test_inspect_csr_refuses_what_is_not_a_csr(authority: ca.CA, text: str) -> None:
    """Proves REG-2.2-CSR."""
    if text == "certificate":
        text = authority.certificate_pem

    with pytest.raises(ValueError):
        authority.inspect_csr(text)


@pytest.mark.parametrize("kind", ["ec", "ed25519", "rsa"])
def test_inspect_csr_refuses_an_altered_signature(authority: ca.CA, client_keys: dict[str, object], kind: str) -> None:
    """Proves REG-2.2-CSR."""
    csr = make_csr("sensor-0003", client_keys[kind])
    assert authority.inspect_csr(csr).common_name == "sensor-0003"

    with pytest.raises(ValueError, match="signature"):
        authority.inspect_csr(with_altered_signature(csr))


def csr_with_empty_common_name() -> str:
    # cryptography refuses an empty CN unless told not to validate; a client's CSR may still carry one.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "", _validate=False)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    return builder.sign(make_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@empty_name_warning
@pytest.mark.parametrize("empty", [True, False], ids=["empty-cn", "no-cn"])
def test_a_csr_without_a_common_name_is_a_bad_request(authority: ca.CA, reg: registry.Registry, empty: bool) -> None:
    """Proves REG-2.2-CN."""
    csr = csr_with_empty_common_name() if empty else make_csr(None)

    assert not authority.inspect_csr(csr).common_name

    # An empty username as well: the missing CN is a 400 before the username's policy (422) is looked at.
    for username in ("sensor-0003", ""):
        error = refusal(reg, {"username": username, "csr": csr})
        assert error.status == HTTPStatus.BAD_REQUEST
        assert "Common Name" in error.message


# --- CSRs made by the openssl command line ---------------------------------------


@needs_openssl
@pytest.mark.parametrize("kind", ["rsa2048", "p256", "p384", "ed25519"])
def test_openssl_csr_is_registered_and_signed(
    tmp_path: Path, reg: registry.Registry, authority: ca.CA, kind: str
) -> None:
    """Proves CERT-5.4-CA."""
    csr = openssl_csr(tmp_path, kind)

    outcome = registered(reg, {"username": "sensor-0003", "csr": csr})

    assert outcome.body["caCertificate"] == authority.certificate_pem
    assert_issued_from(csr, outcome.body["certificate"], authority)
    verified = openssl_verify(tmp_path, authority.certificate_pem, outcome.body["certificate"], "sslclient")
    assert verified.returncode == 0, verified.stderr


@needs_openssl
@pytest.mark.parametrize(
    ("kind", "subject", "alter", "status", "reason"),
    [
        ("rsa1024", "/CN=sensor-0003", False, HTTPStatus.UNPROCESSABLE_ENTITY, "key is not accepted"),
        ("p521", "/CN=sensor-0003", False, HTTPStatus.UNPROCESSABLE_ENTITY, "key is not accepted"),
        ("p256", "/CN=sensor-0004", False, HTTPStatus.BAD_REQUEST, "Common Name"),
        # openssl leaves out an attribute given no value: the subject is empty.
        ("p256", "/CN=", False, HTTPStatus.BAD_REQUEST, "Common Name"),
        ("p256", "/CN=sensor-0003", True, HTTPStatus.BAD_REQUEST, "signature"),
    ],
    ids=["rsa1024", "p521", "cn-mismatch", "empty-cn", "altered-signature"],
)
def test_openssl_csr_is_refused(
    tmp_path: Path,
    reg: registry.Registry,
    kind: str,
    subject: str,
    alter: bool,
    status: HTTPStatus,
    reason: str,
) -> None:
    """Proves REG-2.3-KEY, REG-2.2-CN, REG-2.2-CSR."""
    csr = openssl_csr(tmp_path, kind, subject)
    if alter:
        csr = with_altered_signature(csr)

    error = refusal(reg, {"username": "sensor-0003", "csr": csr})

    assert error.status == status
    assert reason in error.message


# --- The HTTPS server's certificate ----------------------------------------------


def test_server_certificate_names_localhost_and_the_extra_names(authority: ca.CA) -> None:
    """Proves TLS-6.5-HTTPS."""
    credentials = authority.issue_server_certificate(START, ["hub.plant.example", "10.1.2.3", "localhost"])

    certificate = load(credentials.certificate_pem)
    certificate.verify_directly_issued_by(authority.certificate)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "hub.plant.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key = serialization.load_pem_private_key(credentials.key_pem.encode(), password=None)
    assert key.public_key() == certificate.public_key()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_the_server_certificate(tmp_path: Path, live_authority: ca.CA, server_hostname: str) -> None:
    """Proves TLS-6.5-HTTPS."""
    credentials = live_authority.issue_server_certificate(datetime.now(UTC))

    with tls_server(tmp_path, credentials) as port:
        assert tls_greeting(port, live_authority.certificate_pem, server_hostname) == b"registry"


def test_tls_handshake_fails_for_another_name_or_another_ca(tmp_path: Path, live_authority: ca.CA) -> None:
    """The handshakes above succeed because the client checks, not in spite of it."""
    credentials = live_authority.issue_server_certificate(datetime.now(UTC))
    stranger = ca.CA.create(datetime.now(UTC))

    with tls_server(tmp_path, credentials, connections=2) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            tls_greeting(port, live_authority.certificate_pem, "hub.plant.example")
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            tls_greeting(port, stranger.certificate_pem, "localhost")


def test_registry_clock_drives_the_validity_of_issued_certificates(authority: ca.CA) -> None:
    """Proves CERT-5.3-VALIDITY: the registry signs at its injected clock's time, not the system's."""
    clock = FakeClock(START + timedelta(days=100))
    reg = registry.Registry(clock=clock, ca=authority, settings=FAST)
    try:
        csr = make_csr("sensor-0003")
        certificate = load(registered(reg, {"username": "sensor-0003", "csr": csr}).body["certificate"])
    finally:
        reg.close()

    assert certificate.not_valid_before_utc == clock.now - ca.CLOCK_SKEW
    assert certificate.not_valid_after_utc == clock.now - ca.CLOCK_SKEW + timedelta(days=365)

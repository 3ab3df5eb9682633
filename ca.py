"""The registry's own certificate authority, built on ``cryptography``.

One ``CA`` is created in a folder on first start and loaded from it after:
``ca.pem`` (the self-signed certificate) and ``ca.key`` (its key, readable
by the owner alone). It checks CSRs for the registry and signs client
certificates under one fixed profile (SPEC section 5); callers never pass
extensions through. It also signs the HTTPS server's own certificate.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from registry import CsrInfo, IssuedCertificate

# Client clocks run a little behind or ahead: a certificate is valid from a
# few minutes before it was signed.
CLOCK_SKEW = timedelta(minutes=5)
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
SERIALS_AT_ONCE = 64
# RFC 7468 section 7: a PEM CSR, under its label or the older one with NEW.
CSR_PEM = re.compile(
    r"-----BEGIN ((?:NEW )?)CERTIFICATE REQUEST-----([A-Za-z0-9+/=\s]*)-----END \1CERTIFICATE REQUEST-----"
)
KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage with only the ``granted`` bits set (RFC 5280 section 4.2.1.3)."""
    bits = dict.fromkeys(KEY_USAGE_BITS, False) | granted
    return x509.KeyUsage(**bits)


# The fixed parts of an end-entity certificate, made once.
END_ENTITY = x509.BasicConstraints(ca=False, path_length=None)
CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
# RFC 5280 section 4.2.1.3: every key signs; TLS with an RSA key may also
# encipher the pre-master secret (keyEncipherment).
SIGNING_USAGE = _key_usage(digital_signature=True)
RSA_USAGE = _key_usage(digital_signature=True, key_encipherment=True)
# Every certificate is signed with ECDSA over SHA-256 (the CA's key is EC).
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class ServerCredentials:
    """The HTTPS server's certificate and key, as PEM."""

    certificate_pem: str
    key_pem: str


class CA:
    """A certificate authority: a key and its self-signed certificate."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        *,
        cert_days: int = 365,
    ) -> None:
        self.key = key
        self.certificate = certificate
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.validity = timedelta(days=cert_days)
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._authority_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        # What every client certificate shares, in DER: the issuer, and the
        # extensions after the subject key identifier, by whether the key is RSA.
        self._issuer_der = certificate.subject.public_bytes()
        self._serials: list[int] = []
        self._client_extensions_der = {
            is_rsa: _extension(END_ENTITY, critical=True)
            + _extension(RSA_USAGE if is_rsa else SIGNING_USAGE, critical=True)
            + _extension(CLIENT_AUTH, critical=False)
            + _extension(self._authority_key_identifier, critical=False)
            for is_rsa in (False, True)
        }

    @classmethod
    def create(cls, now: datetime, *, cert_days: int = 365, name: str = "Client Registry CA") -> CA:
        """A new CA with an EC P-256 key and a ten-year self-signed certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            _builder(subject, subject, key.public_key(), now, CA_VALIDITY)
            # RFC 5280 section 4.2.1.9: a CA that signs only end-entity
            # certificates: path length 0.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate, cert_days=cert_days)

    @classmethod
    def load_or_create(cls, folder: Path | str, now: datetime, *, cert_days: int = 365) -> CA:
        """The CA kept in ``folder`` (``ca.pem``, ``ca.key``), created there if absent."""
        folder = Path(folder)
        key_path, cert_path = folder / "ca.key", folder / "ca.pem"
        if key_path.exists():
            check_private(key_path)
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            if not cert_path.exists():
                raise FileNotFoundError(f"{cert_path} is missing beside {key_path}: restore it, or remove both")
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(key, certificate, cert_days=cert_days)
        # The key is written last: a CA is there only when its key is.
        ca = cls.create(now, cert_days=cert_days)
        cert_path.write_text(ca.certificate_pem)
        write_private(key_path, _key_pem(ca.key))
        return ca

    def inspect_csr(self, pem: str) -> CsrInfo:
        """Parse a PEM PKCS#10 request and verify its signature; ``ValueError`` if it fails."""
        try:
            csr = x509.load_pem_x509_csr(pem.encode())
        except ValueError:
            raise ValueError("is not a PEM PKCS#10 certificate signing request") from None
        try:
            key = csr.public_key()
        except (UnsupportedAlgorithm, ValueError):
            return CsrInfo(_common_name(csr), "unsupported", 0, None, "")
        # RFC 2986 section 3: the signature proves possession of the key.
        if not csr.is_signature_valid:
            raise ValueError("has a signature that does not verify: it must be signed by its own key")
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        algorithm, size, curve = _describe(key)
        return CsrInfo(_common_name(csr), algorithm, size, curve, _sha256(spki))

    def issue_client_certificate(self, csr_pem: str, username: str, now: datetime) -> IssuedCertificate:
        """Sign a client certificate for ``username`` with the CSR's public key and nothing else of it.

        Approvals sign these in bulk, so the certificate is put together here
        in DER, field by field as RFC 5280 section 4.1 lists them, with the
        key exactly as the CSR sent it; only the signature is left to
        ``cryptography``. Its ``CertificateBuilder`` costs three times as much
        and holds the GIL throughout, where the key's own ``sign`` lets other
        threads run. test_ca.py checks the result byte for byte against what
        ``CertificateBuilder`` makes of the same fields.
        """
        spki = _subject_public_key_info(csr_pem)
        start = now.astimezone(UTC).replace(microsecond=0)
        not_after = start + self.validity
        serial = self._serial()
        algorithm, public_key = _algorithm_and_key(spki)
        # RFC 5280 section 4.2.1.2, method (1): the SHA-1 of the public key.
        key_identifier = hashlib.sha1(public_key, usedforsecurity=False).digest()
        fixed_extensions = self._client_extensions_der[algorithm.startswith(RSA_ENCRYPTION)]
        tbs = _der(
            SEQUENCE,
            VERSION_3
            + _integer(serial)
            + SIGNATURE_ALGORITHM
            + self._issuer_der
            + _der(SEQUENCE, _time(start - CLOCK_SKEW) + _time(not_after))
            + _subject(username)
            + spki
            + _der(EXTENSIONS, _der(SEQUENCE, SUBJECT_KEY_IDENTIFIER + key_identifier + fixed_extensions)),
        )
        signature = self.key.sign(tbs, ECDSA_SHA256)
        der = _der(SEQUENCE, tbs + SIGNATURE_ALGORITHM + _der(BIT_STRING, b"\x00" + signature))
        return IssuedCertificate(
            pem=ssl.DER_cert_to_PEM_cert(der),
            serial=serial,
            not_after=not_after,
            sha256=_sha256(der),
        )

    def _serial(self) -> int:
        """RFC 5280 section 4.1.2.2: positive, at most 20 octets, unpredictable.

        As ``x509.random_serial_number`` draws them (159 bits of
        ``os.urandom``), but 64 at a time: ``os.urandom`` lets go of the GIL,
        and under a batch of approvals each such hand-off between threads
        costs more than the bytes do.
        """
        while True:
            try:
                return self._serials.pop()
            except IndexError:  # empty: draw the next ones
                data = os.urandom(20 * SERIALS_AT_ONCE)
                self._serials += [int.from_bytes(data[i : i + 20], "big") >> 1 for i in range(0, len(data), 20)]

    def issue_server_certificate(self, now: datetime, names: Iterable[str] = ()) -> ServerCredentials:
        """A TLS server certificate for localhost, 127.0.0.1, ::1 and ``names``."""
        key = ec.generate_private_key(ec.SECP256R1())
        all_names = list(dict.fromkeys([*SERVER_NAMES, *names]))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])])
        certificate = (
            _builder(subject, self.certificate.subject, key.public_key(), now, SERVER_VALIDITY)
            .add_extension(END_ENTITY, critical=True)
            .add_extension(_end_entity_usage(key.public_key()), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in all_names]), critical=False)
            .add_extension(self._authority_key_identifier, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return ServerCredentials(certificate.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def _builder(
    subject: x509.Name, issuer: x509.Name, key: object, now: datetime, validity: timedelta
) -> x509.CertificateBuilder:
    """What every certificate shares: names, key, random serial, validity, SKI."""
    now = now.astimezone(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)  # type: ignore[arg-type]
        # RFC 5280 section 4.1.2.2: positive, at most 20 octets; random, so
        # that serials cannot be predicted.
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
    )


# --- DER (X.690), as much as a client certificate needs ----------------------

SEQUENCE, SET, INTEGER, BIT_STRING, OCTET_STRING, OBJECT_IDENTIFIER = 0x30, 0x31, 0x02, 0x03, 0x04, 0x06
UTF8_STRING, UTC_TIME, GENERALIZED_TIME = 0x0C, 0x17, 0x18
VERSION, EXTENSIONS = 0xA0, 0xA3  # the [0] and [3] EXPLICIT fields of a TBSCertificate
BOOLEAN_TRUE = b"\x01\x01\xff"


def _der(tag: int, content: bytes) -> bytes:
    """One element: its tag, its length (in short form below 128, else long form), its content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    width = (size.bit_length() + 7) // 8
    return bytes((tag, 0x80 | width)) + size.to_bytes(width, "big") + content


def _integer(value: int) -> bytes:
    """A non-negative INTEGER, big-endian, with a zero octet first when the high bit would be set."""
    return _der(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _content(der: bytes, at: int) -> tuple[int, int]:
    """Where the content of the element at ``at`` starts and ends."""
    size, start = der[at + 1], at + 2
    if size & 0x80:  # the long form: the next (size & 0x7F) octets hold the length
        start += size & 0x7F
        size = int.from_bytes(der[at + 2 : start], "big")
    return start, start + size


def _subject_public_key_info(csr_pem: str) -> bytes:
    """The key as the CSR has it: the third element of its CertificationRequestInfo (RFC 2986 section 4.1).

    The CSR was read and its signature checked when it was registered
    (``inspect_csr``); here its PEM is only decoded again. A text the
    pattern does not take goes through ``cryptography`` instead.
    """
    pem = CSR_PEM.search(csr_pem)
    if pem is None:
        info = x509.load_pem_x509_csr(csr_pem.encode()).tbs_certrequest_bytes
    else:
        der = binascii.a2b_base64(pem[2])
        start, _ = _content(der, 0)  # the CertificationRequest's first element, its info
        _, end = _content(der, start)
        info = der[start:end]
    version, _ = _content(info, 0)
    _, subject = _content(info, version)
    _, spki = _content(info, subject)
    _, end = _content(info, spki)
    return info[spki:end]


def _subject(common_name: str) -> bytes:
    """A Name of one commonName, a UTF8String (RFC 5280 section 4.1.2.6), as cryptography writes it."""
    if not 1 <= len(common_name) <= 64:  # ub-common-name
        raise ValueError(f"a common name has 1 to 64 characters, not {len(common_name)}")
    attribute = _der(SEQUENCE, COMMON_NAME + _der(UTF8_STRING, common_name.encode()))
    return _der(SEQUENCE, _der(SET, attribute))


def _algorithm_and_key(spki: bytes) -> tuple[bytes, bytes]:
    """The content of an SPKI's AlgorithmIdentifier, and its subjectPublicKey (RFC 5280 section 4.1.2.7)."""
    inside, _ = _content(spki, 0)
    algorithm, algorithm_end = _content(spki, inside)
    start, end = _content(spki, algorithm_end)
    return spki[algorithm:algorithm_end], spki[start + 1 : end]  # the key after its unused-bits octet


@functools.cache
def _object_identifier(dotted: str) -> bytes:
    """The first two arcs as one number, then each number in base 128, high groups flagged."""
    first, second, *rest = map(int, dotted.split("."))
    content = bytearray()
    for number in (40 * first + second, *rest):
        groups = [number & 0x7F]
        while number := number >> 7:
            groups.append(0x80 | number & 0x7F)
        content += bytes(reversed(groups))
    return _der(OBJECT_IDENTIFIER, bytes(content))


def _time(moment: datetime) -> bytes:
    """RFC 5280 section 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, whole seconds in UTC."""
    rest = (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    if moment.year < 2050:
        return _der(UTC_TIME, b"%02d%02d%02d%02d%02d%02dZ" % (moment.year % 100, *rest))
    return _der(GENERALIZED_TIME, b"%04d%02d%02d%02d%02d%02dZ" % (moment.year, *rest))


def _extension(value: x509.ExtensionType, *, critical: bool) -> bytes:
    """RFC 5280 section 4.1: the OID, the critical flag (left out when false, its default), the value."""
    flag = BOOLEAN_TRUE if critical else b""
    return _der(SEQUENCE, _object_identifier(value.oid.dotted_string) + flag + _der(OCTET_STRING, value.public_bytes()))


VERSION_3 = _der(VERSION, _integer(2))
SIGNATURE_ALGORITHM = _der(SEQUENCE, _object_identifier(SignatureAlgorithmOID.ECDSA_WITH_SHA256.dotted_string))
COMMON_NAME = _object_identifier(NameOID.COMMON_NAME.dotted_string)
RSA_ENCRYPTION = _object_identifier("1.2.840.113549.1.1.1")  # RFC 8017 appendix A.1
# The subject key identifier extension but its last 20 octets, the SHA-1 of the key.
SUBJECT_KEY_IDENTIFIER = _extension(x509.SubjectKeyIdentifier(bytes(20)), critical=False)[:-20]


def _end_entity_usage(key: object) -> x509.KeyUsage:
    return RSA_USAGE if isinstance(key, rsa.RSAPublicKey) else SIGNING_USAGE


def _describe(key: object) -> tuple[str, int, str | None]:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size, key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456, None
    return type(key).__name__.removesuffix("PublicKey").lstrip("_"), 0, None


def _common_name(csr: x509.CertificateSigningRequest) -> str | None:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def write_private(path: Path, text: str) -> None:
    """Write a secret file that only its owner may read (mode 0600), whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    # The rename is durable once the folder is (rename(2) and fsync(2)).
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_private(path: Path) -> None:
    """Refuse a secret file that others than its owner may read or write."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}: others may read it; run chmod 600 {path}")

"""The registry's own certificate authority, built on ``cryptography``.

One ``CA`` is created in a folder on first start and loaded from it after:
``ca.pem`` (the self-signed certificate) and ``ca.key`` (its key, readable
by the owner alone). It reads and verifies CSRs for the registry and signs
client certificates under one fixed profile (SPEC section 5); callers never
pass extensions through. It also signs the HTTPS server's own certificate.

A CSR is read once, here, by ``cryptography``: what the registry keeps of
it is the SubjectPublicKeyInfo of the very request whose signature was
verified, and a certificate is issued for that key and no other.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from files import check_private, write_private

# Client clocks run a little behind or ahead: a certificate is valid from a
# few minutes before it was signed.
CLOCK_SKEW = timedelta(minutes=5)
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")

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


END_ENTITY = x509.BasicConstraints(ca=False, path_length=None)  # CERT-5.3-BASIC-CONSTRAINTS, set critical below
# RFC 5280 section 4.2.1.3: every key signs; TLS with an RSA key may also
# encipher the pre-master secret (keyEncipherment).
SIGNING_USAGE = _key_usage(digital_signature=True)
RSA_USAGE = _key_usage(digital_signature=True, key_encipherment=True)


@dataclass(frozen=True)
class CsrInfo:
    """What a CSR says, read once and its signature verified (the registry's ``CsrInfo``)."""

    common_name: str | None
    key_algorithm: str  # "RSA", "EC", "Ed25519", or another name
    key_size: int
    curve: str | None
    # The SubjectPublicKeyInfo (DER) of the very request whose signature was
    # verified; None when cryptography cannot load the key's algorithm, so
    # that no signature could be checked and nothing may be certified.
    public_key: bytes | None

    @functools.cached_property
    def public_key_sha256(self) -> str:
        """The hex SHA-256 of the key (of nothing, for a key that could not be read)."""
        return hashlib.sha256(self.public_key or b"").hexdigest()


@dataclass(frozen=True)
class IssuedCertificate:
    """A client certificate as this CA issued it."""

    pem: str
    serial: int
    not_before: datetime
    not_after: datetime
    sha256: str  # hex digest of the certificate DER


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
        self.not_after = certificate.not_valid_after_utc
        self.validity = timedelta(days=cert_days)
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._authority_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

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
        """The CA kept in ``folder`` (``ca.pem``, ``ca.key``), created there if absent.

        CERT-5.4-CA: created on first start and kept; SAFE-6.4-FILES: a key others may read is refused.
        """
        folder = Path(folder)
        key_path, cert_path = folder / "ca.key", folder / "ca.pem"
        if key_path.exists():
            check_private(key_path)
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError(f"{key_path} is not a readable PEM key: restore it from a backup") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            if not cert_path.exists():
                raise FileNotFoundError(f"{cert_path} is missing beside {key_path}: restore it, or remove both")
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if certificate.public_key() != key.public_key():
                raise ValueError(f"{key_path} is not the key of {cert_path}: restore the pair from one backup")
            return cls(key, certificate, cert_days=cert_days)
        if cert_path.exists():  # STORE-6.8-CA-KEPT: a CA that lost its key is never replaced in silence
            raise FileNotFoundError(f"{key_path} is missing beside {cert_path}: restore the pair from one backup")
        # The key is written last: a CA is there only when its key is.
        ca = cls.create(now, cert_days=cert_days)
        cert_path.write_text(ca.certificate_pem)
        write_private(key_path, _key_pem(ca.key))
        return ca

    def validity_warning(self, now: datetime) -> str | None:
        """What the start says of a CA that has expired, or has less than one certificate validity left."""
        ends = self.not_after.isoformat()
        if now >= self.not_after:
            return f"the registry's CA expired at {ends}: it issues no certificate until it has a new CA"
        left = self.not_after - now
        if left < self.validity:
            return (
                f"the registry's CA ends in {left.days} days, at {ends}: the certificates it issues end with it;"
                " plan its replacement"
            )
        return None

    def inspect_csr(self, pem: str) -> CsrInfo:
        """Read a PEM CSR and verify its signature; ``ValueError`` saying what is wrong.

        The key in the answer is the SubjectPublicKeyInfo of the request whose
        signature was verified: the registry keeps it, and a certificate is
        issued for it without the CSR being read again. A key whose algorithm
        cryptography cannot load is answered with ``public_key`` None.
        """
        try:
            csr = x509.load_pem_x509_csr(pem.encode())
        except ValueError:
            raise ValueError("is not a PEM PKCS#10 certificate signing request") from None
        try:
            key = csr.public_key()
        except (UnsupportedAlgorithm, ValueError):
            return CsrInfo(_common_name(csr), _algorithm_name(csr), 0, None, None)
        # REG-2.2-CSR, RFC 2986 section 3: the signature proves possession of the key.
        if not csr.is_signature_valid:
            raise ValueError("has a signature that does not verify: it must be signed by its own key")
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        algorithm, size, curve = _describe(key)
        return CsrInfo(_common_name(csr), algorithm, size, curve, spki)

    def inspect_public_key(self, public_key: bytes) -> CsrInfo:
        """What a verified key (SPKI DER, as ``inspect_csr`` gave it) is: its algorithm, size and curve."""
        return _key_info(public_key)

    def issue_client_certificate(self, public_key: bytes, username: str, now: datetime) -> IssuedCertificate:
        """Sign a client certificate for ``username`` and the verified key ``public_key`` (SPKI DER).

        The subject is the username alone, and the extensions are this CA's:
        nothing of what the CSR asked for but its key (CERT-5.3-SUBJECT), the key
        whose signature was verified (CERT-5.3-VERIFIED-KEY). It
        ends ``cert_days`` after its notBefore, or with the CA if sooner
        (LIFE-7.1-TIMES, LIFE-7.6-CA-EXPIRY).
        """
        key = serialization.load_der_public_key(public_key)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)])
        certificate = self._end_entity(subject, key, now, self.validity, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
            self.key, hashes.SHA256()
        )
        return IssuedCertificate(
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
            serial=certificate.serial_number,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        )

    def sign_crl(
        self, revoked: Iterable[tuple[int, datetime, str]], number: int, this_update: datetime, next_update: datetime
    ) -> bytes:
        """LIFE-7.4-CRL: an X.509 v2 CRL (RFC 5280 section 5) of ``revoked``, (serial, when, a reason), in DER."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(_whole_seconds(this_update))
            .next_update(_whole_seconds(next_update))
            # RFC 5280 section 5.2.3: a number that grows with every CRL.
            .add_extension(x509.CRLNumber(number), critical=False)
            # RFC 5280 section 5.2.1: which CA key signed it.
            .add_extension(self._authority_key_identifier, critical=False)
        )
        for serial, revoked_at, reason in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_whole_seconds(revoked_at))
                # RFC 5280 section 5.3.1: why.
                .add_extension(x509.CRLReason(x509.ReasonFlags(reason)), critical=False)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def issue_server_certificate(self, now: datetime, names: Iterable[str] = ()) -> ServerCredentials:
        """A TLS server certificate for localhost, 127.0.0.1, ::1 and ``names`` (TLS-6.5-HTTPS)."""
        key = ec.generate_private_key(ec.SECP256R1())
        all_names = list(dict.fromkeys([*SERVER_NAMES, *names]))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])])
        certificate = (
            self._end_entity(subject, key.public_key(), now, SERVER_VALIDITY, ExtendedKeyUsageOID.SERVER_AUTH)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in all_names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return ServerCredentials(certificate.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))

    def _end_entity(
        self,
        subject: x509.Name,
        key: CertificatePublicKeyTypes,
        now: datetime,
        validity: timedelta,
        purpose: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        """What a client and a server certificate share: issued by this CA, for one purpose."""
        usage = RSA_USAGE if isinstance(key, rsa.RSAPublicKey) else SIGNING_USAGE
        return (
            _builder(subject, self.certificate.subject, key, now, validity, ends_by=self.not_after)
            # RFC 5280 section 4.2.1.9: not a CA, so it signs no certificates.
            .add_extension(END_ENTITY, critical=True)
            .add_extension(usage, critical=True)
            # CERT-5.3-EKU, RFC 5280 section 4.2.1.12: what the key is for (TLS client or server).
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            # RFC 5280 section 4.2.1.1: which CA key signed it.
            .add_extension(self._authority_key_identifier, critical=False)
        )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: CertificatePublicKeyTypes,
    now: datetime,
    validity: timedelta,
    *,
    ends_by: datetime | None = None,
) -> x509.CertificateBuilder:
    """What every certificate shares: names, key, random serial, validity, SKI.

    Times are whole seconds in UTC, as the certificate holds them (RFC 5280
    section 4.1.2.5), so that what is recorded equals what is signed. The
    validity (CERT-5.3-VALIDITY) counts from notBefore (LIFE-7.1-TIMES), and ends by ``ends_by``
    (the issuer's notAfter) at the latest.
    """
    not_before = _whole_seconds(now) - CLOCK_SKEW
    not_after = not_before + validity
    if ends_by is not None:
        not_after = min(not_after, ends_by)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        # CERT-5.3-SERIAL, RFC 5280 section 4.1.2.2: positive, at most 20 octets;
        # random, so that serials cannot be predicted.
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280 section 4.2.1.2: the SHA-1 of the key, method (1).
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def _whole_seconds(moment: datetime) -> datetime:
    """UTC to the second, as certificates and CRLs hold times (RFC 5280 section 4.1.2.5)."""
    return moment.astimezone(UTC).replace(microsecond=0)


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


def _algorithm_name(csr: x509.CertificateSigningRequest) -> str:
    """A CSR's key algorithm that cryptography cannot load, named by its OID (RFC 5280 section 4.1.2.7)."""
    return f"OID {csr.public_key_algorithm_oid.dotted_string}"


@functools.lru_cache(maxsize=4096)
def _key_info(public_key: bytes) -> CsrInfo:
    # Cached: the administrator's listing describes every stored key at each refresh.
    algorithm, size, curve = _describe(serialization.load_der_public_key(public_key))
    return CsrInfo(None, algorithm, size, curve, public_key)


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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()

"""EST (RFC 7030): the registry's face for devices that ship a standard enrollment client.

Theory of operation
===================

Industrial devices, routers and PLCs speak Enrollment over Secure Transport,
not the registry's JSON. EST already has the registry's workflow in it: a
client posts a CSR, a server that waits for a person's approval answers 202
with Retry-After (RFC 7030 section 4.2.3), the client sends the same request
again, and it re-enrolls later over mutual TLS. So this module adds no rule
of its own to the registry; it translates (SPEC section 10):

=================================  =========================================
``GET  .../cacerts``               the CA certificate, certs-only PKCS#7
``POST .../simpleenroll``          ``Registry.register_via("est", ...)``: a
                                   registration, username = the CSR's CN
``POST .../simplereenroll``        ``Registry.renew``: mutual TLS with the
                                   current certificate
``GET  .../csrattrs``              204: no attributes are required
=================================  =========================================

under ``/.well-known/est/`` (RFC 7030 section 3.2.2), and under
``/.well-known/est/<label>/``, where the label names a role of the catalog:
an enrollment there asks for that role, so that a fleet is pointed at a role
by its URL.

An enrollment is a registration in every way: section 2's order, matching,
polls and re-delivery are the registry's own, reached through
``register_via``; the administrator sees the request in the pending list,
marked ``via: "est"``, and approves or denies it as any other. The
registry's answers become EST's: 202 stays 202 (its ``Retry-After`` in
delta-seconds), 201 becomes 200 with the certificate as certs-only PKCS#7,
and every refusal a ``text/plain`` sentence (RFC 7030 section 4.2.3: without
a PKCS#7 error, the body is "a plaintext human-readable error message").
One refusal changes its status: the lock's 423 is answered 503 with
``Retry-After``, which EST clients know how to wait for (RFC 7030 section
4.2.3 names 202 and 503 with Retry-After; no EST client knows 423).

Bodies are base64 of DER (RFC 8951 section 3): white space anywhere in them
is ignored, and a ``Content-Transfer-Encoding`` header is accepted and not
needed. The CSR is read here only to learn the name it asks for; the
registry's CA reads the very same DER (wrapped as one PEM block, not
re-encoded) to verify it and to decide on its key.

Like registry.py, this module touches no socket: ``Est.answer`` takes what
the server read and gives back an ``Answer``.
"""

from __future__ import annotations

import base64
import logging
import textwrap
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

import registry

log = logging.getLogger("registry.est")

PREFIX = "/.well-known/est/"  # RFC 7030 section 3.2.2
VIA = "est"  # EST-10.4-VIA: how the pending list marks a request that came by EST
TEXT = "text/plain; charset=utf-8"
# RFC 7030 section 4.1.3 (cacerts) and 4.2.3 (enrollment), after RFC 5273 section 3.
PKCS7 = "application/pkcs7-mime"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# The operations served, and the method of each (RFC 7030 section 3.2.2).
OPERATIONS = {"cacerts": "GET", "simpleenroll": "POST", "simplereenroll": "POST", "csrattrs": "GET"}


@dataclass(frozen=True)
class Answer:
    """What the server writes for an EST request."""

    status: HTTPStatus
    body: bytes = b""
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)


class MethodNotAllowed(registry.RegistryError):
    """An EST operation asked with another method (405); ``Allow`` names its own."""

    status, code = HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed"


class NotOverTls(registry.RegistryError):
    """EST on a plain-HTTP listener (404): RFC 7030 section 3.3 puts it on TLS alone."""

    status, code = HTTPStatus.NOT_FOUND, "not_found"


def is_est(path: str) -> bool:
    """Whether ``path`` is one of EST's (SPEC section 10)."""
    return path.startswith(PREFIX)


class Est:
    """The EST face of a ``registry.Registry`` (SPEC section 10)."""

    def __init__(self, core: registry.Registry, *, over_tls: bool) -> None:
        self.core = core
        self.over_tls = over_tls
        ca_pem = core.ca.certificate_pem if core.ca is not None else None
        self._ca_certificate = x509.load_pem_x509_certificate(ca_pem.encode()) if ca_pem else None

    def answer(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        client_address: str = "",
        peer_certificate: bytes | None = None,
    ) -> Answer:
        """Answer one EST request; every refusal is ``text/plain`` (``refusal``)."""
        try:
            operation, label = self._route(method, path)
            roles = self._roles(label)
            if operation == "cacerts":
                return self.cacerts()
            if operation == "csrattrs":
                return self.csrattrs()
            if operation == "simpleenroll":
                return self.simpleenroll(body, roles, client_address)
            return self.simplereenroll(body, peer_certificate, client_address)
        except registry.RegistryError as error:
            return refusal(error)
        except Exception:
            log.exception("unexpected error in %s %s", method, path)
            return Answer(HTTPStatus.INTERNAL_SERVER_ERROR, b"the server failed to answer; the error is in its log\n")

    def _route(self, method: str, path: str) -> tuple[str, str | None]:
        """SPEC EST-10.1-PATHS: the operation and the label (None without one) of an EST path; else 404 or 405."""
        if not self.over_tls:
            raise NotOverTls("EST is served over HTTPS only (RFC 7030 section 3.3); this listener speaks plain HTTP")
        *labels, operation = path.removeprefix(PREFIX).split("/")
        if operation not in OPERATIONS or len(labels) > 1:
            served = ", ".join(OPERATIONS)
            raise registry.NotFound(f"there is no EST operation at {path}: this server serves {served}")
        # RFC 9110 section 9.3.2: HEAD is GET without the body.
        if OPERATIONS[operation] != ("GET" if method == "HEAD" else method):
            allowed = "GET, HEAD" if OPERATIONS[operation] == "GET" else "POST"
            raise MethodNotAllowed(f"{operation} takes {allowed}, not {method}", headers={"Allow": allowed})
        return operation, unquote(labels[0]) if labels else None

    def _roles(self, label: str | None) -> list[str]:
        """SPEC EST-10.5-LABEL: a label requests the role it names, which must be in the catalog."""
        if label is None:
            return []
        if label not in self.core.roles:
            raise registry.NotFound(f"there is no role {label!r} for the EST label to name: ask for one of the catalog")
        return [label]

    # --- The operations ---------------------------------------------------

    def cacerts(self) -> Answer:
        """SPEC EST-10.2-CACERTS: the CA certificate, a certs-only PKCS#7 in base64."""
        if self._ca_certificate is None:
            raise registry.NotFound("this registry has no CA")
        return Answer(HTTPStatus.OK, certs_only([self._ca_certificate]), PKCS7)

    def csrattrs(self) -> Answer:
        """SPEC EST-10.7-CSRATTRS: 204, no attributes required (RFC 7030 section 4.5.2)."""
        return Answer(HTTPStatus.NO_CONTENT)

    def simpleenroll(self, body: bytes, roles: list[str], client_address: str) -> Answer:
        """SPEC EST-10.3-ENROLL: a registration of the CSR's CN with the CSR, by the registry's own rules."""
        der, csr = read_csr(body)
        payload = {"username": common_name(csr), "csr": csr_pem(der), "roles": roles}
        outcome = self.core.register_via(VIA, payload, client_address)
        if outcome.status == HTTPStatus.ACCEPTED:
            return pending(outcome)
        return issued(outcome)

    def simplereenroll(self, body: bytes, peer_certificate: bytes | None, client_address: str) -> Answer:
        """SPEC EST-10.6-REENROLL: section 7's renewal, the CSR naming what the current certificate names."""
        if not peer_certificate:
            raise registry.Unauthorized(
                "re-enroll over mutual TLS, with the certificate this registry issued you",
                headers=dict(registry.CHALLENGE),
            )
        # Who asks comes before what is asked (401 before 400), as in section 7; renew checks again.
        self.core.authenticate_certificate(peer_certificate)
        der, csr = read_csr(body)
        current = x509.load_der_x509_certificate(peer_certificate)
        # RFC 7030 section 4.2.2: the Subject and the SubjectAltName are those of the certificate renewed.
        if csr.subject != current.subject or _alt_names(csr.extensions) != _alt_names(current.extensions):
            raise registry.MalformedRequest(
                f"the CSR's subject {csr.subject.rfc4514_string()!r} (or subjectAltName) is not the certificate's"
                f" {current.subject.rfc4514_string()!r}: re-enroll with the same names (RFC 7030 section 4.2.2)"
            )
        outcome = self.core.renew(peer_certificate, {"csr": csr_pem(der)}, address=client_address)
        return issued(outcome)


# --- Reading and writing EST's bodies -----------------------------------------


def read_csr(body: bytes) -> tuple[bytes, x509.CertificateSigningRequest]:
    """The DER and the parsed PKCS#10 of a base64 body (RFC 7030 section 4.2.1); 400 otherwise."""
    # RFC 8951 section 3.1: white space in base64 is ignored.
    text = b"".join(body.split())
    if not text:
        raise registry.MalformedRequest("the body is empty: send a PKCS#10 CSR, DER in base64 (RFC 7030 4.2.1)")
    try:
        der = base64.b64decode(text, validate=True)
    except ValueError:
        raise registry.MalformedRequest(
            "the body is not base64: send a PKCS#10 CSR, DER in base64 (RFC 8951 section 3)"
        ) from None
    try:
        return der, x509.load_der_x509_csr(der)
    except ValueError:
        raise registry.MalformedRequest(
            "the body is base64, but not of a DER PKCS#10 certificate signing request (RFC 2986)"
        ) from None


def common_name(csr: x509.CertificateSigningRequest) -> str:
    """The one Common Name of a CSR's subject: the username it asks for; 400 without one."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        raise registry.MalformedRequest(
            "the CSR's subject must have one Common Name: the device's name, which becomes its username"
        )
    return names[0].value


def csr_pem(der: bytes) -> str:
    """The CSR as one PEM block (RFC 7468 section 7) of the very DER that came: the registry reads the same bytes."""
    lines = textwrap.wrap(base64.b64encode(der).decode(), 64)
    return "\n".join(["-----BEGIN CERTIFICATE REQUEST-----", *lines, "-----END CERTIFICATE REQUEST-----", ""])


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData of ``certificates``, DER in base64 (RFC 7030 section 4.1.3, RFC 8951 section 3).

    cryptography's ``pkcs7.serialize_certificates`` writes the degenerate
    SignedData (no signers) that RFC 5272 section 4.1 calls a Simple PKI Response.
    """
    der = pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)
    return base64.encodebytes(der)  # lines of 76 characters, as MIME has them


def pending(outcome: registry.Outcome) -> Answer:
    """SPEC EST-10.3-OUTCOMES: the registry's 202 as EST's, its Retry-After, and the pairing id in words."""
    body = outcome.body
    text = (
        f"pending: the request for {body['username']!r} waits for the administrator's approval;"
        f" pairing id {body['pairingId']}. Send the same request again after Retry-After"
        f" ({outcome.headers['Retry-After']} seconds).\n"
    )
    return Answer(HTTPStatus.ACCEPTED, text.encode(), TEXT, {"Retry-After": outcome.headers["Retry-After"]})


def issued(outcome: registry.Outcome) -> Answer:
    """SPEC EST-10.3-OUTCOMES: the registry's 201 (approved, again, renewed) as EST's 200, certs-only PKCS#7.

    RFC 7030 section 4.2.3: the response contains "only the certificate that
    was issued"; the CA certificate is what cacerts is for.
    """
    certificate = x509.load_pem_x509_certificate(outcome.body["certificate"].encode())
    return Answer(HTTPStatus.OK, certs_only([certificate]), CERTS_ONLY)


def refusal(error: registry.RegistryError) -> Answer:
    """The one place where a refusal becomes EST's answer: its status, a sentence in text, no JSON (EST-10.3-ERRORS).

    SPEC EST-10.3-LOCKED: the lock's 423 is 503 with the same Retry-After.
    """
    status = HTTPStatus.SERVICE_UNAVAILABLE if error.status == HTTPStatus.LOCKED else error.status
    lines = [error.message, *(f"- {detail}" for detail in error.details)]
    if isinstance(error, registry.Denied):
        reason = error.extra.get("reason") or "no reason was given"
        lines += [
            f"The administrator's reason: {reason}",
            "Do not ask again: a person must see the administrator, who may forget the request so that it can be"
            " sent anew.",
        ]
    return Answer(status, ("\n".join(lines) + "\n").encode(), TEXT, dict(error.headers))


def _alt_names(extensions: x509.Extensions) -> x509.SubjectAlternativeName | None:
    """The SubjectAltName of a CSR or a certificate; None without one."""
    try:
        return extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None

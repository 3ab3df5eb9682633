"""EST (RFC 7030, SPEC section 10): est.py alone, over real HTTPS, and with a real EST client.

Three layers, as the module has them: ``est.py``'s functions and ``Est`` over
an in-memory registry (no socket); the server on 127.0.0.1, port 0, spoken
to with ``http.client``, curl and openssl; and Cisco libest's ``estclient``
(found on PATH: ``.ci/run`` puts ``../shared/tools/est`` there), which
enrolls, waits out a 202 while the test approves, and re-enrolls.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import ca
import conformance
import est
import registry
import server
import test_conformance
from conftest import FAST, FakeClock, make_csr, make_key, serve

ESTCLIENT = shutil.which("estclient")
needs_estclient = pytest.mark.skipif(
    ESTCLIENT is None, reason="estclient is not on PATH (.ci/run puts ../shared/tools/est there)"
)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
# The kit sends a CSR with an empty Common Name, which cryptography reads with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


def est_body(csr_pem: str, width: int = 64, newline: bytes = b"\r\n") -> bytes:
    """A CSR as an EST client sends it: base64 of its DER, in lines of ``width``."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    text = base64.b64encode(der)
    return newline.join(text[i : i + width] for i in range(0, len(text), width)) + newline


def certificates_of(answer: est.Answer | bytes) -> list[x509.Certificate]:
    """The certificates of a base64 certs-only PKCS#7."""
    body = answer.body if isinstance(answer, est.Answer) else answer
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split()), validate=True))


def common_name(certificate: x509.Certificate) -> str:
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture
def face(reg: registry.Registry) -> est.Est:
    return est.Est(reg, over_tls=True)


def enroll(face: est.Est, csr_pem: str, label: str | None = None) -> est.Answer:
    path = f"{est.PREFIX}{label}/simpleenroll" if label else f"{est.PREFIX}simpleenroll"
    return face.answer("POST", path, est_body(csr_pem), client_address="10.0.0.9")


def listed(reg: registry.Registry, username: str) -> dict[str, Any] | None:
    return next((r for r in reg.requests() if r["username"] == username), None)


# --- est.py's readers and writers -------------------------------------------------------


@pytest.mark.parametrize(("width", "newline"), [(64, b"\r\n"), (76, b"\n"), (10, b" \t\r\n"), (10_000, b"")])
def test_a_csr_body_is_base64_of_der_and_white_space_anywhere_in_it_is_ignored(width: int, newline: bytes) -> None:
    """Proves EST-10.3-ENROLL (RFC 8951 section 3.1)."""
    csr = make_csr("dev-0001")
    der, parsed = est.read_csr(est_body(csr, width, newline))

    assert der == x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    assert parsed.subject == x509.load_pem_x509_csr(csr.encode()).subject


@pytest.mark.parametrize(
    "body",
    [b"", b" \r\n", b"not base64!", b"QUJD", base64.b64encode(b"a"), base64.b64encode(b"\x30\x03\x02\x01\x01")],
    ids=["empty", "white-space", "not-base64", "three-bytes", "one-byte", "der-of-no-csr"],
)
def test_a_body_that_is_not_base64_of_a_pkcs10_is_malformed(body: bytes) -> None:
    """Proves EST-10.3-ENROLL: 400, with a sentence saying what to send."""
    with pytest.raises(registry.MalformedRequest, match=r"PKCS#10|base64"):
        est.read_csr(body)


def test_the_pem_handed_to_the_registry_is_one_block_of_the_very_der_that_came(face: est.Est) -> None:
    """Proves EST-10.3-ENROLL: the CA reads the bytes the client signed, not a re-encoding."""
    der, _ = est.read_csr(est_body(make_csr("dev-0001")))
    text = est.csr_pem(der)

    assert face.core.ca.inspect_csr(text).common_name == "dev-0001"
    assert x509.load_pem_x509_csr(text.encode()).public_bytes(serialization.Encoding.DER) == der


def test_certs_only_is_base64_of_a_pkcs7_that_openssl_and_cryptography_read(face: est.Est) -> None:
    """Proves EST-10.2-CACERTS: cryptography's serialize_certificates, in base64 lines."""
    authority = x509.load_pem_x509_certificate(face.core.ca.certificate_pem.encode())
    body = est.certs_only([authority])

    assert certificates_of(body) == [authority]
    assert all(len(line) <= 76 for line in body.splitlines())


def test_a_common_name_is_required_and_must_be_one() -> None:
    """Proves EST-10.3-ENROLL: the CN is the username; none, or two, is 400."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, "a-1"), x509.NameAttribute(NameOID.COMMON_NAME, "b-2")]
    two = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(make_key(), hashes.SHA256())
    for csr in [x509.load_pem_x509_csr(make_csr(None).encode()), two]:
        with pytest.raises(registry.MalformedRequest, match="one Common Name"):
            est.common_name(csr)
    assert est.common_name(x509.load_pem_x509_csr(make_csr("dev-0001").encode())) == "dev-0001"


# --- Refusals in EST's words ------------------------------------------------------------------


REFUSALS = [
    registry.MalformedRequest("bad", details=["one", "two"]),
    registry.PolicyViolation("against policy", details=["a key of 1024 bits"]),
    registry.Conflict("taken", code="username_taken"),
    registry.Denied("the request for 'd' was denied", reason="unknown device"),
    registry.Locked("the registry is locked: ask", headers={"Retry-After": "30"}),
    registry.Full("full", headers={"Retry-After": "30"}),
    registry.TooManyRequests("too many", headers={"Retry-After": "12"}),
    registry.StorageUnavailable("no disk", headers={"Retry-After": "30"}),
    registry.Unauthorized("who?", headers=dict(registry.CHALLENGE)),
    registry.NotFound("nothing"),
]


@pytest.mark.parametrize("error", REFUSALS, ids=[type(e).__name__ for e in REFUSALS])
def test_every_refusal_is_text_with_its_status_and_headers_and_the_lock_is_503(error: registry.RegistryError) -> None:
    """Proves EST-10.3-ERRORS and EST-10.3-LOCKED."""
    answer = est.refusal(error)

    expected = HTTPStatus.SERVICE_UNAVAILABLE if isinstance(error, registry.Locked) else error.status
    assert answer.status == expected
    assert answer.content_type == "text/plain; charset=utf-8"
    assert answer.headers == error.headers
    text = answer.body.decode()
    assert text.startswith(error.message) and all(f"- {d}" in text for d in error.details)
    with pytest.raises(ValueError):
        json.loads(answer.body)


def test_a_denial_gives_the_administrator_s_reason_and_says_to_stop() -> None:
    """Proves EST-10.3-ERRORS: 403 with the reason (CLIENT-9.3-DENIED: stop asking)."""
    text = est.refusal(registry.Denied("denied", reason="unknown device")).body.decode()

    assert "reason: unknown device" in text and "Do not ask again" in text


# --- Est over an in-memory registry: routes ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "fullcmc", 404, None),
        ("POST", "serverkeygen", 404, None),
        ("GET", "minimum/extra/cacerts", 404, None),
        ("GET", "", 404, None),
        ("POST", "cacerts", 405, "GET, HEAD"),
        ("GET", "simpleenroll", 405, "POST"),
        ("DELETE", "simplereenroll", 405, "POST"),
        ("POST", "minimum/csrattrs", 405, "GET, HEAD"),
    ],
)
def test_another_operation_is_404_and_another_method_405_with_allow(
    face: est.Est, method: str, path: str, status: int, allow: str | None
) -> None:
    """Proves EST-10.1-PATHS."""
    answer = face.answer(method, est.PREFIX + path, b"x")

    assert (answer.status, answer.headers.get("Allow"), answer.content_type) == (status, allow, est.TEXT)


def test_head_is_get_and_csrattrs_is_204(face: est.Est) -> None:
    """Proves EST-10.1-PATHS and EST-10.7-CSRATTRS."""
    assert face.answer("HEAD", est.PREFIX + "cacerts").status == HTTPStatus.OK
    assert face.answer("GET", est.PREFIX + "csrattrs") == est.Answer(HTTPStatus.NO_CONTENT)
    assert face.answer("GET", est.PREFIX + "minimum/csrattrs").status == HTTPStatus.NO_CONTENT


def test_a_plain_http_listener_serves_no_est(reg: registry.Registry) -> None:
    """Proves EST-10.1-PATHS: RFC 7030 section 3.3 puts EST on TLS."""
    plain = est.Est(reg, over_tls=False)
    reg.unlock()

    for method, operation in [("GET", "cacerts"), ("POST", "simpleenroll"), ("GET", "csrattrs")]:
        answer = plain.answer(method, est.PREFIX + operation, est_body(make_csr("dev-0001")))
        assert answer.status == HTTPStatus.NOT_FOUND and b"HTTPS only" in answer.body
    assert reg.requests() == []


def test_cacerts_is_the_ca_certificate_alone(face: est.Est) -> None:
    """Proves EST-10.2-CACERTS."""
    answer = face.answer("GET", est.PREFIX + "cacerts")

    assert (answer.status, answer.content_type) == (HTTPStatus.OK, "application/pkcs7-mime")
    assert certificates_of(answer) == [x509.load_pem_x509_certificate(face.core.ca.certificate_pem.encode())]


# --- Est over an in-memory registry: an enrollment is a registration ---------------------------


def test_an_enrollment_waits_for_approval_is_marked_est_and_gets_its_certificate_again_and_again(
    face: est.Est, reg: registry.Registry, clock: FakeClock
) -> None:
    """Proves EST-10.3-ENROLL, EST-10.3-OUTCOMES, EST-10.3-LOCKED and EST-10.4-VIA: the registry's own flow."""
    key = make_key()
    csr = make_csr("plc-0001", key)
    locked = enroll(face, csr)
    assert (locked.status, locked.headers) == (HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": "30"})
    assert b"locked" in locked.body and reg.requests() == []

    reg.unlock()
    pending = enroll(face, csr)
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pairing = hashlib.sha256(spki).hexdigest()[:6]
    assert (pending.status, pending.headers, pending.content_type) == (202, {"Retry-After": "5"}, est.TEXT)
    assert f"pairing id {pairing}" in pending.body.decode()
    request = listed(reg, "plc-0001")
    assert (request["state"], request["via"], request["method"], request["roles"]) == ("pending", "est", "csr", [])
    assert request["clientAddress"] == "10.0.0.9" and request["pairingId"] == pairing

    reg.lock()  # the lock keeps out only new requests (REG-2.5-LOCK-SCOPE): a poll is still a poll
    assert enroll(face, csr).status == HTTPStatus.ACCEPTED
    reg.approve("plc-0001")
    issued = enroll(face, csr)
    assert (issued.status, issued.content_type) == (HTTPStatus.OK, "application/pkcs7-mime; smime-type=certs-only")
    [certificate] = certificates_of(issued)
    assert common_name(certificate) == "plc-0001" and certificate.public_key() == key.public_key()
    assert listed(reg, "plc-0001")["collectedAt"] is not None

    clock.advance(minutes=1)
    assert certificates_of(enroll(face, csr)) == [certificate]  # REG-2.4-REDELIVER
    assert [u["username"] for u in reg.users()] == ["plc-0001"]


def test_a_json_request_is_marked_api_and_est_polls_it_as_the_same_request(
    face: est.Est, reg: registry.Registry
) -> None:
    """Proves EST-10.4-VIA: via shows how the request was stored, and takes no part in matching."""
    key = make_key()
    csr = make_csr("plc-0002", key)
    reg.unlock()
    reg.register({"username": "plc-0002", "csr": csr})

    assert enroll(face, csr).status == HTTPStatus.ACCEPTED
    assert listed(reg, "plc-0002")["via"] == "api"
    assert listed(reg, "plc-0002")["pollCount"] == 1


@pytest.mark.parametrize(
    ("csr", "status", "words"),
    [
        (lambda: make_csr(None), 400, b"one Common Name"),
        (lambda: make_csr("x"), 422, b"username"),
        (lambda: make_csr("plc-0003", make_key("rsa1024")), 422, b"key"),
    ],
    ids=["no-cn", "short-username", "weak-key"],
)
def test_a_refused_enrollment_is_section_2_s_status_as_text_and_stores_nothing(
    face: est.Est, reg: registry.Registry, csr: Callable[[], str], status: int, words: bytes
) -> None:
    """Proves EST-10.3-ENROLL and EST-10.3-ERRORS: section 2's rules, in its order."""
    reg.unlock()
    answer = enroll(face, csr())

    assert (answer.status, answer.content_type) == (status, est.TEXT)
    assert words in answer.body
    assert reg.requests() == []


def test_another_key_for_a_pending_or_approved_name_is_409(face: est.Est, reg: registry.Registry) -> None:
    """Proves EST-10.3-ERRORS: REG-2.4-PENDING and REG-2.4-USER, as text."""
    reg.unlock()
    enroll(face, make_csr("plc-0004"))
    assert enroll(face, make_csr("plc-0004")).status == HTTPStatus.CONFLICT
    reg.approve("plc-0004")
    taken = enroll(face, make_csr("plc-0004"))
    assert (taken.status, taken.content_type) == (HTTPStatus.CONFLICT, est.TEXT)
    assert b"taken" in taken.body


def test_a_denied_enrollment_is_403_with_the_reason(face: est.Est, reg: registry.Registry) -> None:
    """Proves EST-10.3-ERRORS: REG-2.4-DENIED."""
    reg.unlock()
    csr = make_csr("plc-0005")
    enroll(face, csr)
    reg.deny("plc-0005", {"reason": "not one of ours"})
    answer = enroll(face, csr)

    assert answer.status == HTTPStatus.FORBIDDEN and b"not one of ours" in answer.body


def test_a_label_requests_its_role_and_an_unknown_label_is_404_storing_nothing(
    face: est.Est, reg: registry.Registry
) -> None:
    """Proves EST-10.5-LABEL."""
    reg.unlock()
    csr = make_csr("plc-0006")
    assert enroll(face, csr, label="operator").status == HTTPStatus.ACCEPTED
    assert listed(reg, "plc-0006")["roles"] == ["operator"]
    assert enroll(face, csr, label="%6Fperator").status == HTTPStatus.ACCEPTED  # percent-encoded: a poll

    for operation in ("simpleenroll", "cacerts", "csrattrs"):
        method = "POST" if operation == "simpleenroll" else "GET"
        answer = face.answer(method, f"{est.PREFIX}janitor/{operation}", est_body(make_csr("plc-0007")))
        assert (answer.status, answer.content_type) == (HTTPStatus.NOT_FOUND, est.TEXT)
        assert b"'janitor'" in answer.body
    assert listed(reg, "plc-0007") is None


def test_the_same_device_under_another_label_is_another_request(face: est.Est, reg: registry.Registry) -> None:
    """Proves EST-10.5-LABEL: the label's role is part of the request, as roles are (REG-2.4-MATCH)."""
    reg.unlock()
    csr = make_csr("plc-0008")
    enroll(face, csr, label="operator")

    assert enroll(face, csr).status == HTTPStatus.CONFLICT
    assert enroll(face, csr, label="operator").status == HTTPStatus.ACCEPTED


# --- The same rules, whichever face: a property ------------------------------------------------


def _prepared(authority: ca.CA, stored: str | None, locked: bool, first_csr: str) -> registry.Registry:
    """An in-memory registry where "plc-0050" has a request in state ``stored`` (None: none) for ``first_csr``."""
    core = registry.Registry(clock=FakeClock(), ca=authority, roles=("minimum", "operator"), settings=FAST)
    core.unlock()
    if stored is not None:
        core.register({"username": "plc-0050", "csr": first_csr, "roles": []})
    if stored == "approved":
        core.approve("plc-0050")
    if stored == "denied":
        core.deny("plc-0050", {"reason": "no"})
    if locked:
        core.lock()
    return core


def _stored(core: registry.Registry) -> list[dict[str, Any]]:
    ignored = {"createdAt", "lastPollAt", "decidedAt", "collectedAt", "pairingId", "via"}
    return [{k: v for k, v in r.items() if k not in ignored} for r in core.requests()]


@settings(max_examples=25)
@given(
    stored=st.sampled_from([None, "pending", "approved", "denied"]),
    locked=st.booleans(),
    same_key=st.booleans(),
    label=st.sampled_from([None, "operator"]),
)
def test_an_enrollment_is_answered_as_the_registration_it_is(
    authority: ca.CA, stored: str | None, locked: bool, same_key: bool, label: str | None
) -> None:
    """Proves EST-10.3-ENROLL, EST-10.3-OUTCOMES and EST-10.3-LOCKED: EST's status is section 2's, mapped.

    The same request, by the JSON API to one registry and by EST to an
    identical one, gets the same decision (201 is EST's 200, 423 its 503)
    and leaves the same stored requests.
    """
    key = make_key()
    first = make_csr("plc-0050", key)
    asked = first if same_key else make_csr("plc-0050")
    by_json, by_est = (_prepared(authority, stored, locked, first) for _ in range(2))
    try:
        try:
            request = {"username": "plc-0050", "csr": asked, "roles": [label] if label else []}
            json_status = by_json.register(request, "10.0.0.9").status
        except registry.RegistryError as error:
            json_status = error.status
        answer = enroll(est.Est(by_est, over_tls=True), asked, label)
        expected = {HTTPStatus.CREATED: HTTPStatus.OK, HTTPStatus.LOCKED: HTTPStatus.SERVICE_UNAVAILABLE}
        assert answer.status == expected.get(json_status, json_status)
        assert _stored(by_est) == _stored(by_json)
    finally:
        by_json.close()
        by_est.close()


# --- Re-enrollment is renewal ---------------------------------------------------------------


def enrolled(face: est.Est, reg: registry.Registry, name: str, key: Any = None) -> tuple[Any, bytes]:
    """A device enrolled by EST and approved: its key and its certificate's DER."""
    key = key or make_key()
    reg.unlock()
    enroll(face, make_csr(name, key))
    reg.approve(name)
    [certificate] = certificates_of(enroll(face, make_csr(name, key)))
    return key, certificate.public_bytes(serialization.Encoding.DER)


def reenroll(face: est.Est, csr_pem: str, certificate: bytes | None, label: str = "") -> est.Answer:
    path = f"{est.PREFIX}{label}/simplereenroll" if label else f"{est.PREFIX}simplereenroll"
    return face.answer("POST", path, est_body(csr_pem), peer_certificate=certificate)


def test_reenrollment_with_the_current_certificate_renews_with_the_same_rights(
    face: est.Est, reg: registry.Registry
) -> None:
    """Proves EST-10.6-REENROLL: section 7's renewal, answered 200 certs-only; a new key re-keys."""
    key, first = enrolled(face, reg, "plc-0010")
    renewed = reenroll(face, make_csr("plc-0010", key), first)

    assert (renewed.status, renewed.content_type) == (HTTPStatus.OK, est.CERTS_ONLY)
    [second] = certificates_of(renewed)
    assert common_name(second) == "plc-0010" and second.public_key() == key.public_key()
    assert second.serial_number != x509.load_der_x509_certificate(first).serial_number
    new_key = make_key()
    second_der = second.public_bytes(serialization.Encoding.DER)
    [third] = certificates_of(reenroll(face, make_csr("plc-0010", new_key), second_der, label="operator"))
    assert third.public_key() == new_key.public_key()
    assert reg.authenticate_certificate(third.public_bytes(serialization.Encoding.DER)).rights.roles == ()


def csr_with_organization(common_name: str, key: Any) -> str:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o")]
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    "csr",
    [
        lambda key: make_csr("plc-0011", key, extensions=[x509.SubjectAlternativeName([x509.DNSName("plc")])]),
        lambda key: csr_with_organization("plc-0011", key),
    ],
    ids=["subject-alt-name", "other-subject"],
)
def test_a_reenrollment_naming_other_names_is_400_and_issues_nothing(
    face: est.Est, reg: registry.Registry, csr: Callable[[Any], str]
) -> None:
    """Proves EST-10.6-REENROLL: RFC 7030 section 4.2.2, the certificate's Subject and subjectAltName."""
    key, first = enrolled(face, reg, "plc-0011")
    before = reg.users()
    answer = reenroll(face, csr(key), first)

    assert (answer.status, answer.content_type) == (HTTPStatus.BAD_REQUEST, est.TEXT)
    assert b"RFC 7030 section 4.2.2" in answer.body
    assert reg.users() == before


def test_reenrollment_without_a_certificate_or_with_a_removed_user_s_is_401(
    face: est.Est, reg: registry.Registry
) -> None:
    """Proves EST-10.6-REENROLL: LIFE-7.2-RENEW and LIFE-7.3-REVOKE."""
    key, first = enrolled(face, reg, "plc-0012")
    nothing = reenroll(face, make_csr("plc-0012", key), None)
    assert (nothing.status, nothing.headers) == (HTTPStatus.UNAUTHORIZED, registry.CHALLENGE)

    reg.remove_user("plc-0012")
    refused = reenroll(face, make_csr("plc-0012", key), first)
    assert (refused.status, refused.content_type) == (HTTPStatus.UNAUTHORIZED, est.TEXT)
    assert b"revoked" in refused.body
    # Who asks is checked before what is asked: a revoked certificate learns nothing of its CSR.
    assert reenroll(face, csr_with_organization("plc-0012", key), first).status == HTTPStatus.UNAUTHORIZED
    assert face.answer("POST", est.PREFIX + "simplereenroll", b"junk", peer_certificate=first).status == 401


def test_a_label_that_names_no_role_refuses_reenrollment_too(face: est.Est, reg: registry.Registry) -> None:
    """Proves EST-10.5-LABEL on simplereenroll."""
    key, first = enrolled(face, reg, "plc-0013")

    assert reenroll(face, make_csr("plc-0013", key), first, label="janitor").status == HTTPStatus.NOT_FOUND


# --- Over real HTTPS -----------------------------------------------------------------------------


@contextlib.contextmanager
def https_server(tmp_path: Path, **config: Any) -> Iterator[server.RegistryServer]:
    with serve(tmp_path / "data", http=False, **config) as instance:
        yield instance


def https(instance: server.RegistryServer, data: Path, identity: tuple[Path, Path] | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(data / "ca.pem"))
    if identity:
        context.load_cert_chain(*identity)
    host, port = instance.server_address[:2]
    return http.client.HTTPSConnection(host, port, context=context, timeout=10)


def exchange(connection: Any, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> Any:
    with contextlib.closing(connection):
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()


def test_over_https_cacerts_equals_the_ca_and_an_enrollment_is_a_registration(tmp_path: Path) -> None:
    """Proves EST-10.2-CACERTS, EST-10.3-OUTCOMES and EST-10.4-VIA over the real server."""
    data = tmp_path / "data"
    with https_server(tmp_path) as instance:
        status, headers, body = exchange(https(instance, data), "GET", "/.well-known/est/cacerts")
        ca_pem = (data / "ca.pem").read_bytes()
        assert (status, headers["Content-Type"]) == (200, "application/pkcs7-mime")
        assert certificates_of(body) == [x509.load_pem_x509_certificate(ca_pem)]

        instance.app.core.unlock()
        csr = est_body(make_csr("rtu-0001"))
        sent = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        status, headers, body = exchange(https(instance, data), "POST", "/.well-known/est/simpleenroll", csr, sent)
        assert (status, headers["Retry-After"], headers["Content-Type"]) == (202, "5", est.TEXT)
        assert listed(instance.app.core, "rtu-0001")["via"] == "est"
        instance.app.core.approve("rtu-0001")
        status, headers, body = exchange(https(instance, data), "POST", "/.well-known/est/simpleenroll", csr)
        assert (status, headers["Content-Type"]) == (200, est.CERTS_ONLY)
        assert int(headers["Content-Length"]) == len(body) and common_name(certificates_of(body)[0]) == "rtu-0001"


def test_over_https_a_body_over_the_limit_is_413_as_text_and_csrattrs_204_has_no_length(tmp_path: Path) -> None:
    """Proves EST-10.3-ERRORS (the HTTP reader's 413 too) and EST-10.7-CSRATTRS (RFC 9110 section 8.6)."""
    data = tmp_path / "data"
    with https_server(tmp_path, max_body=1024) as instance:
        status, headers, body = exchange(https(instance, data), "POST", "/.well-known/est/simpleenroll", b"A" * 1025)
        assert (status, headers["Content-Type"]) == (413, est.TEXT) and b"1025 bytes" in body
        status, headers, _ = exchange(https(instance, data), "POST", "/api/client-registry/register", b"A" * 1025)
        assert (status, headers["Content-Type"]) == (413, "application/json")  # elsewhere, JSON as before
        status, headers, body = exchange(https(instance, data), "GET", "/.well-known/est/csrattrs")
        assert (status, body) == (204, b"")
        assert "Content-Length" not in headers and "Content-Type" not in headers


def test_over_plain_http_est_is_404(tmp_path: Path) -> None:
    """Proves EST-10.1-PATHS: the HTTPS listener only."""
    with serve(tmp_path / "data", http=True) as instance:
        host, port = instance.server_address[:2]
        status, headers, body = exchange(http.client.HTTPConnection(host, port, timeout=10), "GET",
                                         "/.well-known/est/cacerts")  # fmt: skip
    assert (status, headers["Content-Type"]) == (404, est.TEXT) and b"HTTPS only" in body


def test_over_https_reenrollment_takes_the_certificate_of_the_tls_handshake(tmp_path: Path) -> None:
    """Proves EST-10.6-REENROLL over mutual TLS."""
    data = tmp_path / "data"
    key = make_key()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with https_server(tmp_path) as instance:
        core = instance.app.core
        core.unlock()
        core.register({"username": "rtu-0002", "csr": make_csr("rtu-0002", key)})
        core.approve("rtu-0002")
        cert_file = tmp_path / "cert.pem"
        cert_file.write_text(core.register({"username": "rtu-0002", "csr": make_csr("rtu-0002", key)}).body[
            "certificate"])  # fmt: skip
        csr = est_body(make_csr("rtu-0002", key))
        status, _, body = exchange(https(instance, data), "POST", "/.well-known/est/simplereenroll", csr)
        assert status == 401 and b"mutual TLS" in body
        connection = https(instance, data, (cert_file, key_file))
        status, headers, body = exchange(connection, "POST", "/.well-known/est/simplereenroll", csr)
        assert (status, headers["Content-Type"]) == (200, est.CERTS_ONLY)
        assert certificates_of(body)[0].public_key() == key.public_key()


# --- curl and openssl alone, as the README shows ---------------------------------------------------


@needs_curl
@needs_openssl
def test_curl_and_openssl_enroll_as_the_readme_shows(tmp_path: Path) -> None:
    """Proves EST-10.2-CACERTS and EST-10.3-OUTCOMES with the tools alone."""
    data = tmp_path / "data"
    with https_server(tmp_path) as instance:
        url = f"https://127.0.0.1:{instance.server_address[1]}/.well-known/est"
        shell = {"URL": url, "CA": str(data / "ca.pem"), "W": str(tmp_path)}

        def run(*words: str) -> str:
            done = subprocess.run(["bash", "-c", " ".join(words)], capture_output=True, text=True, timeout=60,
                                  env=os.environ | shell, check=True)  # fmt: skip
            return done.stdout

        pkcs7_to_pem = "| openssl base64 -d | openssl pkcs7 -inform DER -print_certs"
        assert "subject=CN = Client Registry CA" in run('curl -s --cacert "$CA" "$URL/cacerts"', pkcs7_to_pem)
        run(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=plc-0042",
            '-keyout "$W/plc.key" -outform DER -out "$W/plc.der" 2>/dev/null',
            '&& openssl base64 -in "$W/plc.der" -out "$W/plc.b64"',
        )
        enroll = 'curl -s --cacert "$CA" "$URL/simpleenroll" -H "Content-Type: application/pkcs10"'
        instance.app.core.unlock()
        assert run(enroll, '-i --data-binary @"$W/plc.b64"').startswith("HTTP/1.1 202 Accepted")
        instance.app.core.approve("plc-0042")
        run(enroll, '--data-binary @"$W/plc.b64"', pkcs7_to_pem, '-out "$W/plc.pem"')
        assert run('openssl verify -purpose sslclient -CAfile "$CA" "$W/plc.pem"').strip().endswith(": OK")


# --- A real EST client: Cisco libest's estclient -----------------------------------------------------


class EstClient:
    """``estclient`` against one server, in its own folder; it exits 0 even when it fails (BUILD.md)."""

    def __init__(self, instance: server.RegistryServer, data: Path, folder: Path) -> None:
        self.port = str(instance.server_address[1])
        self.folder = folder
        self.env = os.environ | {"EST_OPENSSL_CACERT": str(data / "ca.pem")}

    def start(self, name: str, *options: str) -> tuple[subprocess.Popen, Path]:
        out = self.folder / name
        out.mkdir()
        command = [ESTCLIENT, "-s", "127.0.0.1", "-p", self.port, "-o", str(out), *options]
        process = subprocess.Popen(command, cwd=out, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)  # fmt: skip
        return process, out

    def run(self, name: str, *options: str) -> tuple[str, Path]:
        process, out = self.start(name, *options)
        return finish(process), out


def finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def wait_for_request(core: registry.Registry, username: str, process: subprocess.Popen) -> dict[str, Any]:
    """The request once the client has sent it (it makes a key first), within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        request = listed(core, username)
        if request is not None:
            return request
        time.sleep(0.1)
    raise AssertionError(f"estclient sent no request for {username}: {finish(process)}")


def crl_serials(core: registry.Registry) -> set[int]:
    return {entry.serial_number for entry in x509.load_der_x509_crl(core.crl())}


@needs_estclient
@needs_openssl
def test_estclient_fetches_the_ca_enrolls_waits_for_approval_reenrolls_and_is_refused_once_removed(
    tmp_path: Path,
) -> None:
    """Proves EST-10.2-CACERTS, EST-10.3-OUTCOMES, EST-10.4-VIA and EST-10.6-REENROLL with a real EST client."""
    data = tmp_path / "data"
    with https_server(tmp_path, retry_after=3) as instance:
        core = instance.app.core
        client = EstClient(instance, data, tmp_path)
        _, out = client.run("cacerts", "-g")
        status, _, ca_pem = exchange(https(instance, data), "GET", "/api/client-registry/ca")
        assert status == 200
        assert certificates_of((out / "cacert-0-0.pkcs7").read_bytes()) == [x509.load_pem_x509_certificate(ca_pem)]

        core.unlock()
        process, out = client.start("enroll", "-e", "--common-name", "plc-0100", "--pem-output")
        request = wait_for_request(core, "plc-0100", process)
        assert (request["state"], request["via"]) == ("pending", "est")
        core.approve("plc-0100")  # while the client sleeps its Retry-After
        output = finish(process)
        first = out / "cert-0-0.pem"
        assert first.exists(), output
        certificate = x509.load_pem_x509_certificate(first.read_bytes())
        assert common_name(certificate) == "plc-0100"
        verified = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(data / "ca.pem"),
                                   str(first)], capture_output=True, text=True, timeout=30)  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
        key = str(out / "key-x-x.pem")

        output, again = client.run("reenroll", "-r", "-c", str(first), "-k", key, "--pem-output")
        renewed = x509.load_pem_x509_certificate((again / "cert-0-0.pem").read_bytes())
        assert renewed.serial_number != certificate.serial_number and renewed.subject == certificate.subject
        assert core.authenticate_certificate(renewed.public_bytes(serialization.Encoding.DER)).username == "plc-0100"

        core.remove_user("plc-0100")
        output, refused = client.run("refused", "-r", "-c", str(again / "cert-0-0.pem"), "-k", key, "--pem-output")
        assert "EST_ERR_AUTH_FAIL" in output and not (refused / "cert-0-0.pem").exists()
        assert {certificate.serial_number, renewed.serial_number} <= crl_serials(core)


@needs_estclient
def test_estclient_is_told_of_a_denial_and_of_the_lock(tmp_path: Path) -> None:
    """Proves EST-10.3-ERRORS (403 with the reason) and EST-10.3-LOCKED (503 with Retry-After) with a real client."""
    data = tmp_path / "data"
    with https_server(tmp_path, retry_after=3) as instance:
        core = instance.app.core
        client = EstClient(instance, data, tmp_path)
        core.unlock()
        process, out = client.start("denied", "-e", "--common-name", "plc-0200", "--pem-output")
        wait_for_request(core, "plc-0200", process)
        core.deny("plc-0200", {"reason": "not on the plant's list"})
        output = finish(process)
        assert "HTTP/1.1 403 Forbidden" in output and "not on the plant's list" in output
        assert not (out / "cert-0-0.pem").exists()

        core.lock()
        output, out = client.run("locked", "-e", "--common-name", "plc-0201", "--pem-output")
        assert "HTTP/1.1 503 Service Unavailable" in output and "Retry-After: 30" in output
        assert not (out / "cert-0-0.pem").exists() and listed(core, "plc-0201") is None


# --- The kit catches a broken EST face -----------------------------------------------------------


def lock_answered_423(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's 423 goes to an EST client unchanged."""
    refusal = est.refusal
    monkeypatch.setattr(est, "refusal", lambda error: est.Answer(error.status, refusal(error).body, est.TEXT, {}))


def enrollment_not_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EST enrollment is stored as if it came by the JSON API."""
    monkeypatch.setattr(est, "VIA", "api")


def label_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A label requests no role."""
    monkeypatch.setattr(est.Est, "_roles", lambda self, label: [])


def subject_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-enrollment's CSR may name another subject than the certificate's."""
    monkeypatch.setattr(est, "_alt_names", lambda extensions: None)
    monkeypatch.setattr(x509.Name, "__ne__", lambda self, other: False)


def cacerts_as_pem(monkeypatch: pytest.MonkeyPatch) -> None:
    """cacerts answers the CA's PEM, as the JSON API's /ca does."""

    def pem(self: est.Est) -> est.Answer:
        return est.Answer(HTTPStatus.OK, self.core.ca.certificate_pem.encode(), est.PKCS7)

    monkeypatch.setattr(est.Est, "cacerts", pem)


BROKEN = [
    (lock_answered_423, "EST-10.3-LOCKED"),
    (enrollment_not_marked, "EST-10.4-VIA"),
    (label_ignored, "EST-10.5-LABEL"),
    (subject_not_compared, "EST-10.6-REENROLL"),
    (cacerts_as_pem, "EST-10.2-CACERTS"),
]


@pytest.mark.parametrize(("breakage", "requirement"), BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_the_kit_catches_a_broken_est_face_by_the_requirement_it_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: Callable, requirement: str
) -> None:
    """Proves that conformance.py's EST checks can fail, each on its own rule."""
    breakage(monkeypatch)
    document = test_conformance.run_kit(tmp_path, "--only", requirement)

    assert document["exit"] == 1
    assert document["requirements"][requirement] == "FAIL", document["printed"]
    assert document["left"]["requests"] == [] and document["left"]["users"] == []


def test_the_kit_s_est_checks_pass_against_the_reference_server(tmp_path: Path) -> None:
    """Proves, with the kit, as another implementation would be checked: EST-10.1-PATHS, EST-10.2-CACERTS,
    EST-10.3-ENROLL, EST-10.3-OUTCOMES, EST-10.3-ERRORS, EST-10.3-LOCKED, EST-10.4-VIA, EST-10.5-LABEL,
    EST-10.6-REENROLL, EST-10.7-CSRATTRS (the test checks that these are all of section 10's ids)."""
    document = test_conformance.run_kit(tmp_path, "--only", *est_ids())

    assert document["exit"] == 0, document["printed"]
    assert set(document["requirements"].values()) == {"PASS"}
    assert set(document["requirements"]) == set(est_ids())


def est_ids() -> list[str]:
    return [requirement for requirement in conformance.REQUIREMENTS if requirement.startswith("EST-")]

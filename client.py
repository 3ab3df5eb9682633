"""The client side of the registry: a registering agent and the administrator's command line.

Theory of operation
===================

A client registers by sending one request and then *the very same request*
again until the administrator has decided (SPEC section 2). ``register``
does exactly that:

1. It builds the request: the username, one credential (a password, or a
   CSR signed by the client's key, whose Common Name is the username; the
   key itself never leaves the client) and the rights it asks for.
2. It sends it and reads the answer:

   - 201: approved. The certificate is checked against the client's key and
     the CA that sent it, and ``cert.pem``, ``ca.pem`` and ``granted.json``
     are written (and ``key.pem``, for a key kept elsewhere until then).
   - 202 (pending), 423 (locked), 429 and 503 (busy), a 5xx, or no answer
     at all (the server is down or restarting): wait and send it again.
     The wait honours ``Retry-After`` (capped, with jitter so that many
     agents do not poll in step); no answer at all backs off exponentially.
   - 403 (denied), 409 (conflict), 400, 413 and 422 (rejected), or any other
     answer: stop with a ``Refused`` error that carries the server's message.

   Only a change of state is reported, not every poll; a deadline bounds
   the whole wait (``TimedOut``).

After registration (SPEC section 7) a certificate is renewed by the agent
itself, over mutual TLS with the certificate it renews:

- ``renew`` sends a CSR for the same key (or, to re-key, for a new one) and
  writes the certificate it gets. Sending the same renewal again is safe:
  the registry answers a repeated renewal with the certificate it already
  issued, so a lost answer is fetched again.
- ``keep`` is the long-running agent: it registers when the folder holds no
  certificate, sleeps until the certificate's renewAfter (two thirds of its
  validity, plus jitter), renews, and does that for ever. While the server
  cannot be reached it retries with a capped exponential back-off. At start
  and at each hourly wake-up it asks ``whoami`` over mutual TLS whether its
  certificate still authenticates: a 401 (the certificate was revoked: its
  user was removed) or an expired certificate ends it with its own exit
  code, ``Exit.REVOKED``, the moment it is seen, not at the renewal.
- A new key must never be on disk without its certificate: ``key.pem`` and
  ``cert.pem`` are links into a folder that holds one matching pair, and a
  renewal writes a new folder and swaps one link (``_install_pair``).

Trust: the server's certificate is checked against a CA file, or not at all
(``insecure``, as curl's flag), or, by default, against the CA the server
itself serves at ``/api/client-registry/ca``: fetched once without
verification, its SHA-256 fingerprint reported for a person to compare (or
checked against an expected one), then pinned for every later call.

The command line (``python3 client.py --help``) wraps ``register`` and the
administrator's calls. Its exit codes are the ``Exit`` enum below: one per
kind of failure, so that a script can tell a denial from a timeout. A
failure is one line on standard error, with what to do about it when that
is known (a mistyped option gets the near one); with ``--json``, it is a
JSON object on standard output, where the answer would have been.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import http.client
import json
import os
import random
import shutil
import ssl
import sys
import tempfile
import time
from base64 import b64encode
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

NEEDS_CRYPTOGRAPHY = (
    "client.py needs the cryptography package: run .venv/bin/pip install -r requirements.txt "
    "(or pip install cryptography)"
)
try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import NameOID
except ModuleNotFoundError as missing:
    # A newcomer may run the README's command with a Python that lacks it:
    # one line saying what to install, not a traceback. Imported as a
    # module, the error is the importer's to handle.
    if __name__ != "__main__" or (missing.name or "").partition(".")[0] != "cryptography":
        raise
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": "missing_dependency", "message": NEEDS_CRYPTOGRAPHY, "exitCode": 1}))
        sys.exit(1)
    sys.exit(NEEDS_CRYPTOGRAPHY)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Report = Callable[[str], None]
Clock = Callable[[], datetime]
Sleep = Callable[[float], None]

API = "/api"
REGISTER = f"{API}/client-registry/register"
CA_PATH = f"{API}/client-registry/ca"
RENEW = f"{API}/client-registry/renew"
WHOAMI = f"{API}/auth/whoami"
DEFAULT_SERVER = "https://localhost:8443"
REQUEST_TIMEOUT = 10.0  # seconds one call may take
MAX_INTERVAL = 60.0  # the longest wait of the client's own choosing; a server's Retry-After is always honoured
MIN_INTERVAL = 0.5  # the shortest, so that "Retry-After: 0" cannot make a busy loop
FIRST_BACKOFF = 0.5  # the first wait after no answer; it doubles up to MAX_INTERVAL
JITTER = 0.2  # a wait grows by up to this fraction, at random
RETRY_FIRST = 5.0  # keep: the first wait after a renewal got no answer; it doubles up to RETRY_MAX
RETRY_MAX = 300.0
RENEW_SPREAD = 0.1  # keep: renew at a random moment in this first fraction of the time left after renewAfter
RENEW_GAP = 60.0  # keep: seconds between two renewals at the least, whatever the clocks say
LONGEST_NAP = 3600.0  # keep: a long wait is cut into naps of at most this, each reading the clock again
PAIR_FILES = ("key.pem", "cert.pem")
PAIR_LINK = ".pair"  # OUT/.pair links to the folder of the current key and certificate (see _install_pair)
MAX_UNLOCK_MINUTES = 1440  # the longest unlock the registry grants (its max_unlock_duration, a day)
KEY_TYPES = ("ec", "rsa", "ed25519")
NOT_KEYS = {"CERTIFICATE": "a certificate", "CERTIFICATE REQUEST": "a CSR", "PUBLIC KEY": "a public key"}  # PEM labels
OPERATIONS = ("read", "write", "readWrite")
CONTEXTS = ("mqtt", "http")


class Exit(enum.IntEnum):
    """The command's exit codes."""

    OK = 0
    ERROR = 1  # any other failure: an unexpected answer (404, 500), a file that cannot be written
    USAGE = 2  # a wrong command line (argparse's own code)
    DENIED = 3  # 403: the administrator denied the request; 401: a wrong token or credentials
    CONFLICT = 4  # 409: the username is taken, another request is stored, or a decision is already made
    REJECTED = 5  # 400, 413, 422: the request is malformed or breaks the registry's policy
    TIMEOUT = 6  # no decision within --timeout
    UNREACHABLE = 7  # the server cannot be reached, or its certificate cannot be trusted
    REVOKED = 8  # renew, keep: the certificate no longer authenticates (401: revoked, its user removed), or expired
    INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


# --- Errors -----------------------------------------------------------------


class ClientError(Exception):
    """A failure the command line reports in one line; ``exit_code`` says which kind.

    ``hint``, when set, tells a person what to do about it.
    """

    exit_code = Exit.ERROR
    code = "error"  # the "error" of --json's error object
    hint = ""


class Unreachable(ClientError):
    """No answer: the connection failed, was reset, or timed out."""

    exit_code = Exit.UNREACHABLE
    code = "unreachable"


class TrustFailure(ClientError):
    """The server's certificate does not verify, or its CA is not the expected one."""

    exit_code = Exit.UNREACHABLE
    code = "untrusted"


class WrongScheme(ClientError):
    """http:// to a server that speaks HTTPS, or https:// to one that speaks plain HTTP.

    Not ``Unreachable``: waiting does not cure it, so an agent stops at once.
    """

    exit_code = Exit.UNREACHABLE
    code = "wrong_scheme"


class UsageError(ClientError):
    """A wrong command line, as argparse finds it (or a command's own check of its options)."""

    exit_code = Exit.USAGE
    code = "usage"

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class Interrupted(ClientError):
    """Ctrl-C; ``resumes`` says what the same command does when run again, if it goes on from here."""

    exit_code = Exit.INTERRUPTED
    code = "interrupted"

    def __init__(self, resumes: str = "") -> None:
        super().__init__("interrupted" + (f" ({resumes} when the same command runs again)" if resumes else ""))


# What each command does when run again after Ctrl-C; a command not named here starts afresh.
RESUMES = {"register": "a registration resumes", "keep": "keeping the certificate resumes"}


class TimedOut(ClientError):
    """The administrator did not decide before the deadline."""

    exit_code = Exit.TIMEOUT
    code = "timeout"


class Refused(ClientError):
    """The server answered with an error (SPEC section 2: ``{"error", "message", "details"}``)."""

    def __init__(self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        phrase = http.client.responses.get(status, "Error")
        self.status = status
        self.headers = dict(headers or {})
        self.code = str(body.get("error") or phrase.lower().replace(" ", "_"))
        self.message = str(body.get("message") or phrase)
        self.details = [str(detail) for detail in body.get("details") or ()]
        self.body = dict(body)
        super().__init__(self._sentence())

    def _sentence(self) -> str:
        sentence = f"{self.status} {self.code}: {self.message}"
        return sentence + "".join(f"; {detail}" for detail in self.details)

    @classmethod
    def from_reply(cls, reply: Reply) -> Refused:
        """The error of a reply, as the subclass its status calls for."""
        kind = {401: Unauthorized, 403: Denied, 409: Conflict, 400: Rejected, 413: Rejected, 422: Rejected}
        return kind.get(reply.status, cls)(reply.status, _error_body(reply), reply.headers)

    @property
    def transient(self) -> bool:
        """Whether waiting may cure it: the server is busy (429, 503) or failing (5xx)."""
        return self.status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE) or self.status >= 500


def _error_body(reply: Reply) -> dict[str, Any]:
    try:
        body = json.loads(reply.body)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Unauthorized(Refused):
    """401: the administrator token, or the client's credentials, are wrong."""

    exit_code = Exit.DENIED


class Denied(Refused):
    """403: the administrator denied the request; ``reason`` says why."""

    exit_code = Exit.DENIED

    @property
    def reason(self) -> str:
        """The administrator's reason, or "" when none was given."""
        return str(self.body.get("reason") or "")

    def _sentence(self) -> str:
        return super()._sentence() + (f"; reason: {self.reason}" if self.reason else " (no reason given)")


class Conflict(Refused):
    """409: the username is taken, another request for it is stored, or it is decided already."""

    exit_code = Exit.CONFLICT


class Rejected(Refused):
    """400, 413 or 422: the request is malformed or breaks the registry's policy."""

    exit_code = Exit.REJECTED


class Revoked(Refused):
    """401 to a renewal: the certificate was revoked (its user removed), is unknown, or has expired."""

    exit_code = Exit.REVOKED
    hint = "the name may register again, for the administrator to approve anew"

    def _sentence(self) -> str:
        return "the registry no longer accepts this certificate: " + super()._sentence()


class Expired(ClientError):
    """The certificate has expired by our clock: no renewal can authenticate with it."""

    exit_code = Exit.REVOKED
    code = "expired"
    hint = Revoked.hint


# --- One server -------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, headers (names in lower case) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ``ClientError`` when it is not."""
        try:
            return json.loads(self.body)
        except ValueError:
            raise ClientError(f"the server answered {self.status} with a body that is not JSON") from None


class Server:
    """A registry server: its URL, how its certificate is checked, and how to call it.

    ``url`` is the server's root, such as ``https://localhost:8443``; a
    trailing ``/api`` is dropped, since every path sent starts with it. The
    certificate is checked against ``ca_file``; or not at all when
    ``insecure``; or else against the CA the server serves, pinned at the
    first call (and compared with ``ca_fingerprint``, hex SHA-256, when
    given). ``certificate`` and ``key`` are files for mutual TLS.
    """

    def __init__(
        self,
        url: str,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        ca_fingerprint: str | None = None,
        certificate: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        report: Report = lambda message: None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if sum((ca_file is not None, insecure, ca_fingerprint is not None)) > 1:
            raise ValueError("give at most one of ca_file, insecure and ca_fingerprint")
        # The README's curl examples set $URL to https://localhost:8443/api: the
        # API's root, not the server's. Taken as it is, every path would be
        # /api/api/...
        self._prefix = parts.path.rstrip("/").removesuffix(API)
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self._parts = parts
        self._client_files = (certificate, key) if certificate else None
        self._expected = _normalize_fingerprint(ca_fingerprint) if ca_fingerprint else None
        self._report = report
        # How the server's certificate is checked: a CA file, nothing, or
        # (once pinned) the CA it served; None until then.
        self._trust: dict[str, Any] | None = None
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https" and (ca_file is not None or insecure):
            self._trust = {"ca_file": ca_file, "insecure": insecure}
            self._context = self._tls_context(**self._trust)

    def presenting(self, certificate: str | os.PathLike[str], key: str | os.PathLike[str]) -> Server:
        """This server, trusted as this one is, called with a client certificate (mutual TLS).

        The files are read now: after a renewal, call this again for the new ones.
        """
        other = copy.copy(self)
        other._client_files = (certificate, key)
        other._context = other._tls_context(**self._trust) if self._trust is not None else None
        return other

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Reply:
        """Send one request (``body`` as JSON when not None) and read the whole answer."""
        if self._parts.scheme == "https" and self._context is None:
            self._context = self._pin(timeout)
        data = None if body is None else json.dumps(body).encode()
        sent = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        reply = self._exchange(method, path, data, sent, self._context, timeout)
        if reply.status == HTTPStatus.BAD_REQUEST:
            refusal = _error_body(reply)
            if refusal.get("error") == "https_required":  # plain HTTP on the registry's TLS port, answered so
                raise WrongScheme(str(refusal.get("message") or "this server speaks HTTPS: use https://"))
        return reply

    def _pin(self, timeout: float) -> ssl.SSLContext:
        """Fetch the CA without verification, report (or check) its fingerprint, trust only it."""
        unverified = self._tls_context(insecure=True)
        pem, fingerprint = _parse_ca(self._exchange("GET", CA_PATH, None, {}, unverified, timeout))
        if self._expected and _normalize_fingerprint(fingerprint) != self._expected:
            raise TrustFailure(
                f"the server's CA has the SHA-256 fingerprint {fingerprint}, not the expected one: "
                "it is not the registry you meant, or someone is in between"
            )
        self._report(
            f"the registry's CA has the SHA-256 fingerprint {fingerprint}"
            + (" (as expected); pinned" if self._expected else "; pinned: compare it with the administrator's")
        )
        self._trust = {"cadata": pem}
        return self._tls_context(**self._trust)

    def _tls_context(
        self, *, ca_file: str | os.PathLike[str] | None = None, cadata: str | None = None, insecure: bool = False
    ) -> ssl.SSLContext:
        if insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            # Only the given CA is trusted, not the system's: the registry's
            # certificate is signed by its own CA.
            try:
                context = ssl.create_default_context(cafile=ca_file, cadata=cadata)
            except (OSError, ValueError) as error:
                raise TrustFailure(f"cannot load the CA file {ca_file}: {error}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._client_files:
            certificate, key = self._client_files
            try:
                context.load_cert_chain(certificate, key)
            except (OSError, ssl.SSLError) as error:
                raise ClientError(f"cannot load the certificate {certificate} and key {key}: {error}") from None
        return context

    def _exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: Mapping[str, str],
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> Reply:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request(method, self._prefix + path, body=data, headers=dict(headers))
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        except ssl.SSLCertVerificationError as error:
            raise TrustFailure(
                f"cannot trust {self.url}: its certificate does not verify: {error.verify_message}"
            ) from None
        except ssl.SSLError as error:
            if _plain_http_answered(error):
                plain = self.url.replace("https://", "http://", 1)
                raise WrongScheme(f"the server at {self.url} speaks plain HTTP: use {plain}") from None
            raise Unreachable(f"TLS with {self.url} failed: {_describe(error)}") from None
        except (OSError, http.client.HTTPException) as error:
            raise Unreachable(f"no answer from {self.url}: {_describe(error)}") from None
        finally:
            connection.close()


def _parse_ca(reply: Reply) -> tuple[str, str]:
    """The PEM and SHA-256 fingerprint of a CA served by ``GET /api/client-registry/ca``."""
    if reply.status != HTTPStatus.OK:
        raise TrustFailure(f"the server serves no CA to pin ({Refused.from_reply(reply)}): give a CA file")
    try:
        certificate = x509.load_pem_x509_certificate(reply.body)
    except ValueError:
        raise TrustFailure("the server's CA is not a PEM certificate") from None
    return reply.body.decode(), fingerprint(certificate)


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint as openssl prints it: ``AB:CD:...``."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _normalize_fingerprint(text: str) -> str:
    return text.replace(":", "").replace(" ", "").lower()


def _plain_http_answered(error: ssl.SSLError) -> bool:
    """Whether a TLS handshake failed because the server answered in plain HTTP.

    The server's "HTTP/1.1 400" is read as a TLS record of an unknown version:
    OpenSSL 3.0 says WRONG_VERSION_NUMBER, 3.2 and later "record layer failure".
    """
    return error.reason == "WRONG_VERSION_NUMBER" or "record layer failure" in str(error)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# --- Keys and requests ------------------------------------------------------


def generate_key(kind: str = "ec") -> PrivateKey:
    """A new private key: "ec" (P-256), "rsa" (3072 bits) or "ed25519"."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        # NIST SP 800-57 part 1, table 2: 3072 bits for use beyond 2030.
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {kind!r}: use one of {', '.join(KEY_TYPES)}")


def load_or_generate_key(path: str | os.PathLike[str], kind: str | None = "ec") -> tuple[PrivateKey, bool]:
    """The key in ``path``, or a new one of ``kind`` written there (mode 0600); and whether it is new.

    Reusing the key of an earlier run lets an agent that was stopped resume
    polling its request rather than send a different one (which gets 409).
    With ``kind`` None the key must exist.
    """
    path = Path(path)
    if path.exists():
        # The content first: a certificate given for the key is a wrong file,
        # not a key to chmod.
        key = _load_private_key(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ClientError(f"{path} has mode {mode:o}: others may read the key; run chmod 600 {path}")
        return key, False
    if kind is None:
        raise ClientError(f"there is no key at {path}")
    key = generate_key(kind)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(path, _private_pem(key), mode=0o600)
    return key, True


def _load_private_key(path: Path) -> PrivateKey:
    """The private key in a PEM file; a ``ClientError`` that says what the file holds when it is not one."""
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        held = next((kind for label, kind in NOT_KEYS.items() if f"-----BEGIN {label}-----".encode() in data), None)
        if held:
            raise ClientError(f"{path} is {held}, not a private key: give the key's file, such as key.pem") from None
        raise ClientError(f"{path} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, PrivateKey):
        raise ClientError(f"{path} holds a {type(key).__name__}: use an EC, RSA or Ed25519 key")
    return key


def make_csr(username: str, key: PrivateKey) -> str:
    """A PEM CSR whose subject is only CN=username (SPEC section 2: the CN must equal the username)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)])
    # Ed25519 signs without a separate digest (RFC 8410 section 6).
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def parse_permission(text: str) -> dict[str, str]:
    """``CONTEXT:OPERATION:RESOURCE`` (such as ``mqtt:read:sensors/#``) as the API's permission object."""
    context, _, rest = text.partition(":")
    operation, _, resource = rest.partition(":")
    if context not in CONTEXTS or operation not in OPERATIONS or not resource:
        raise ValueError(
            f"{text!r} is not CONTEXT:OPERATION:RESOURCE with a context of {'|'.join(CONTEXTS)} "
            f"and an operation of {'|'.join(OPERATIONS)}"
        )
    return {"resource": resource, "operation": operation, "context": context}


def format_permission(permission: Mapping[str, str]) -> str:
    """A permission object as ``CONTEXT:OPERATION:RESOURCE``."""
    return f"{permission['context']}:{permission['operation']}:{permission['resource']}"


def registration_request(
    username: str,
    *,
    password: str | None = None,
    key: PrivateKey | None = None,
    roles: Iterable[str] = (),
    permissions: Iterable[Mapping[str, str]] = (),
    context: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST /api/client-registry/register`` (SPEC section 1)."""
    if (password is None) == (key is None):
        raise ValueError("give exactly one of password and key")
    body: dict[str, Any] = {"username": username}
    if password is not None:
        body["password"] = password
    else:
        body["csr"] = make_csr(username, key)  # type: ignore[arg-type]
    body["roles"] = list(roles)
    body["permissions"] = [dict(permission) for permission in permissions]
    if context is not None:
        body["context"] = context
    return body


# --- Registering ------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """An approved registration, or a renewal: what was granted, the certificate's times, and the files written."""

    username: str
    roles: tuple[str, ...]
    permissions: tuple[dict[str, str], ...]
    certificate_pem: str | None = None
    ca_certificate_pem: str | None = None
    not_after: datetime | None = None
    renew_after: datetime | None = None
    certificate_path: Path | None = None
    ca_path: Path | None = None
    granted_path: Path | None = None
    key_path: Path | None = None  # set when the key was written with the certificate (a renewal)


def register(
    server: str | Server,
    username: str,
    *,
    password: str | None = None,
    key: PrivateKey | None = None,
    roles: Iterable[str] = (),
    permissions: Iterable[Mapping[str, str]] = (),
    context: str | None = None,
    out: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    max_interval: float = MAX_INTERVAL,
    report: Report = lambda message: None,
) -> Registered:
    """Ask to be registered, poll until the administrator decides, and return what was granted.

    Give exactly one of ``password`` and ``key`` (a private key: a CSR for it
    is sent, the key never is). ``server`` is a URL (its CA is then pinned
    on first contact) or a ``Server``. With ``out``, a folder, the answer is
    written there: ``granted.json`` and, for a key, ``cert.pem`` and
    ``ca.pem``, and ``key.pem`` unless it holds the key already (so that
    ``renew`` finds the pair). ``timeout`` bounds the whole wait in seconds
    (None waits for ever); ``max_interval`` caps the waits of the client's
    own choosing (a server's Retry-After is honoured whatever it says);
    ``report`` receives a sentence at every change of state.

    Raises ``Denied`` (403), ``Conflict`` (409), ``Rejected`` (400, 413,
    422), ``Refused`` (any other error), ``TimedOut``, ``TrustFailure``; all
    are ``ClientError``.
    """
    if not isinstance(server, Server):
        server = Server(server, report=report)
    body = registration_request(
        username, password=password, key=key, roles=roles, permissions=permissions, context=context
    )
    answer = _poll(server, body, timeout, max_interval, report)
    registered = _accept(answer, key)
    if out is None:
        return registered
    return _save(registered, Path(out), _key_to_pair(key, Path(out)) if registered.certificate_pem else None)


def _key_to_pair(key: PrivateKey | None, out: Path) -> bytes | None:
    """The key's PEM, to write beside its certificate; None when ``out/key.pem`` holds it already.

    ``renew`` and ``keep`` read the pair in ``out``: a key given from
    elsewhere is copied there (0600), with its certificate, in one step.
    """
    if key is None:
        return None
    try:
        if _load_private_key(out / "key.pem").public_key() == key.public_key():
            return None
    except (OSError, ClientError):
        pass  # no key there, or not this one: the pair is written whole
    return _private_pem(key)


class _StateReporter:
    """Reports a state once, when it is entered, not at every poll."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.state: object = None
        self.sentence = "no answer yet"

    def enter(self, state: object, sentence: str) -> None:
        """Note the state the last answer put us in; report it if it is new."""
        if state != self.state:
            self.report(sentence)
        self.state, self.sentence = state, sentence


def _poll(
    server: Server, body: dict[str, Any], timeout: float | None, max_interval: float, report: Report
) -> dict[str, Any]:
    """Send ``body`` until it is answered 201, and return that answer.

    CLIENT-9.2-SAME-REQUEST: every poll is the very ``body`` of the first request.
    CLIENT-9.3-DENIED: a 403 is a refusal, raised as ``Denied``: the client stops asking.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reporter = _StateReporter(report)
    failures = 0
    while True:
        try:
            reply = server.call("POST", REGISTER, body, timeout=_call_timeout(deadline))
        except Unreachable as error:
            # CLIENT-9.4-LOST-ANSWER: no answer, the same request again after a back-off.
            failures += 1
            reporter.enter("unreachable", f"{error}; trying again")
            wait = _backoff(failures, max_interval)
        else:
            failures = 0
            if reply.status == HTTPStatus.CREATED:
                return reply.json()
            state = _waiting_state(reply, body["username"])
            if state is None:
                raise Refused.from_reply(reply)
            reporter.enter(*state)
            # SPEC CLIENT-9.1-RETRY-AFTER: never sooner than the server asked,
            # however long; max_interval bounds only the waits we choose.
            default = min(30.0 if reply.status == HTTPStatus.LOCKED else 5.0, max_interval)
            wait = _jittered(retry_after(reply.headers, default))
        _sleep(wait, deadline, timeout, reporter.sentence)


def _waiting_state(reply: Reply, username: str) -> tuple[object, str] | None:
    """The state and its sentence for an answer worth waiting through; None for a refusal."""
    if reply.status == HTTPStatus.ACCEPTED:
        pairing_id = reply.json().get("pairingId", "?")
        return ("pending", pairing_id), (
            f"pending, pairing id {pairing_id}: waiting for the administrator to approve {username}"
        )
    if reply.status == HTTPStatus.LOCKED:
        return "locked", "the registry is locked: waiting for the administrator to unlock it"
    if reply.status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
        return "busy", f"the registry is busy ({Refused.from_reply(reply)}): waiting"
    if reply.status >= 500:
        return "failing", f"the registry failed ({Refused.from_reply(reply)}): trying again"
    return None


def retry_after(headers: Mapping[str, str], default: float) -> float:
    """Seconds to wait by a ``Retry-After`` header: seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    value = headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:  # RFC 9110 section 5.6.7: an HTTP date is in GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _jittered(seconds: float) -> float:
    # Agents started together would poll in step for ever: a random extra
    # spreads them out, and never makes a wait shorter than asked.
    seconds = max(seconds, MIN_INTERVAL)
    return seconds * (1 + random.uniform(0, JITTER))


def _backoff(failures: int, max_interval: float, first: float = FIRST_BACKOFF) -> float:
    # Exponential back-off with "equal jitter": half the wait is fixed,
    # half random (AWS Architecture Blog, "Exponential Backoff And Jitter").
    ceiling = min(first * 2 ** min(failures - 1, 16), max(max_interval, MIN_INTERVAL))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _call_timeout(deadline: float | None) -> float:
    if deadline is None:
        return REQUEST_TIMEOUT
    return max(0.1, min(REQUEST_TIMEOUT, deadline - time.monotonic()))


def _sleep(wait: float, deadline: float | None, timeout: float | None, last: str) -> None:
    """Sleep ``wait`` seconds; ``TimedOut`` at the deadline when the next poll would come after it."""
    if deadline is not None and time.monotonic() + wait >= deadline:
        time.sleep(max(0.0, deadline - time.monotonic()))
        raise TimedOut(f"no decision within {timeout:g} s; the last state: {last}")
    time.sleep(wait)


def _accept(answer: Mapping[str, Any], key: PrivateKey | None) -> Registered:
    """A 201 answer, with its certificate checked against our key and the CA that sent it."""
    certificate_pem, ca_pem = answer.get("certificate"), answer.get("caCertificate")
    if key is not None:
        if not certificate_pem or not ca_pem:
            raise ClientError("the registry approved the request but sent no certificate and CA")
        _check_certificate(certificate_pem, ca_pem, key)
    return Registered(
        username=answer["username"],
        roles=tuple(answer.get("roles", ())),
        permissions=tuple(answer.get("permissions", ())),
        certificate_pem=certificate_pem,
        ca_certificate_pem=ca_pem,
        not_after=_moment(answer.get("notAfter")),
        renew_after=_moment(answer.get("renewAfter")),
    )


def _moment(iso: str | None) -> datetime | None:
    """An ISO 8601 time from the server (SPEC section 7's notAfter and renewAfter), or None."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso)
    except ValueError:
        raise ClientError(f"the registry sent {iso!r} for a time: it is not ISO 8601") from None


def _check_certificate(certificate_pem: str, ca_pem: str, key: PrivateKey) -> None:
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
        authority = x509.load_pem_x509_certificate(ca_pem.encode())
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise ClientError(f"the registry sent a certificate that its CA did not sign: {_describe(error)}") from None
    if certificate.public_key() != key.public_key():
        raise ClientError("the registry sent a certificate for another key")


def _save(registered: Registered, out: Path, key_pem: bytes | None = None) -> Registered:
    """Write ``granted.json`` and, when there is one, ``ca.pem`` and ``cert.pem`` into ``out``.

    With ``key_pem``, ``key.pem`` and ``cert.pem`` are written as a pair, in one step (``_install_pair``).
    """
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    granted = {"username": registered.username, "roles": registered.roles, "permissions": registered.permissions}
    paths: dict[str, Path | None] = {"granted_path": out / "granted.json"}
    _write(out / "granted.json", (json.dumps(granted, indent=2) + "\n").encode())
    if registered.certificate_pem and registered.ca_certificate_pem:
        paths["certificate_path"], paths["ca_path"] = out / "cert.pem", out / "ca.pem"
        _write(out / "ca.pem", registered.ca_certificate_pem.encode())
        if key_pem is None:
            _write(out / "cert.pem", registered.certificate_pem.encode())
        else:
            _install_pair(out, key_pem, registered.certificate_pem.encode())
            paths["key_path"] = out / "key.pem"
    return dataclasses.replace(registered, **paths)


def _write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file whole or not at all, created with ``mode``."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(descriptor, mode)  # the umask may have narrowed it; a stale file may have widened it
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


NEXT_KEY = "next-key.pem"  # a re-key's new key, kept until its certificate is installed


def _install_pair(out: Path, key_pem: bytes, certificate_pem: bytes) -> None:
    """Make ``out/key.pem`` and ``out/cert.pem`` the new key and certificate in one atomic step.

    Two files cannot be replaced together: between two renames a reader, or
    a crash, would find the new key beside the old certificate, and a device
    left so can neither authenticate nor renew (the old certificate's key is
    gone). So, as Kubernetes' atomic writer does for a volume
    (pkg/volume/util/atomic_writer.go), the two names are links through
    ``out/.pair``, itself a link to a folder that holds one matching pair. A
    new pair is written whole into a new folder, and one rename of a link
    (rename(2) is atomic, POSIX.1-2017) moves ``.pair`` from the old folder
    to the new one. Each step before that rename leaves the names reading
    the old pair, and each after it the new one.
    """
    _link_pair_names(out)
    current = _pair_folder(out, key_pem, certificate_pem)
    _replace_link(out / PAIR_LINK, current)
    _sync_folder(out)
    for folder in out.glob(PAIR_LINK + "-*"):  # the old pair, and any a crash left half made
        if folder.name != current:
            shutil.rmtree(folder)


def _link_pair_names(out: Path) -> None:
    """Make ``key.pem`` and ``cert.pem`` links through ``.pair``, each still reading what it read.

    Registration writes the two as plain files (the key first, since it is
    made before the request is sent); the first renewal finds them so. Their
    pair becomes a folder, and then each name a link to the same content.
    """
    if all(os.path.islink(out / name) and os.readlink(out / name) == f"{PAIR_LINK}/{name}" for name in PAIR_FILES):
        return
    if all((out / name).exists() for name in PAIR_FILES):
        key_pem, certificate_pem = ((out / name).read_bytes() for name in PAIR_FILES)
        _replace_link(out / PAIR_LINK, _pair_folder(out, key_pem, certificate_pem))
    # Else there is no pair to keep reading (a registration with a key kept elsewhere): the first one comes next.
    for name in PAIR_FILES:
        _replace_link(out / name, f"{PAIR_LINK}/{name}")
    _sync_folder(out)


def _pair_folder(out: Path, key_pem: bytes, certificate_pem: bytes) -> str:
    """A new folder in ``out`` (mode 0700) holding ``key.pem`` (0600) and ``cert.pem``; its name."""
    folder = Path(tempfile.mkdtemp(prefix=PAIR_LINK + "-", dir=out))
    _write(folder / "key.pem", key_pem, mode=0o600)
    _write(folder / "cert.pem", certificate_pem)
    _sync_folder(folder)
    return folder.name


def _replace_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative to its folder) with one rename, whatever ``link`` was."""
    staged = link.with_name(link.name + ".link")
    staged.unlink(missing_ok=True)
    os.symlink(target, staged)
    os.replace(staged, link)


def _sync_folder(folder: Path) -> None:
    # A rename is durable once its folder is synced (fsync(2)).
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- Renewing (SPEC section 7) ----------------------------------------------


def renew(
    server: str | Server,
    out: str | os.PathLike[str],
    *,
    new_key: PrivateKey | None = None,
    now: Clock = lambda: datetime.now(UTC),
    report: Report = lambda message: None,
) -> Registered:
    """Renew the certificate in ``out`` over mutual TLS, and write the new one there.

    ``out`` holds ``cert.pem`` and ``key.pem``, as ``register`` left them;
    the call presents them as its client certificate. With ``new_key`` the
    new certificate is for that key (a re-key), and the key is written with
    its certificate in one step (``_install_pair``). Only the current
    certificate renews; the one a renewal replaced may only repeat it, with
    the new certificate's key (SPEC LIFE-7.2-RENEW). So a re-key's key is
    kept in ``out/next-key.pem`` (0600) before it is sent, until its
    certificate is installed: a renewal whose answer was lost, or whose
    install a crash cut short, is repeated with that key, and fetches the
    certificate issued then. ``server`` is a ``Server``, or a URL checked
    against ``out/ca.pem``.

    Raises ``Revoked`` (401: revoked, its user removed, or expired),
    ``Expired`` (by ``now``, before anything is sent), ``Rejected`` (400,
    422), ``Refused`` (any other error), ``Unreachable``, ``TrustFailure``;
    all are ``ClientError``.
    """
    out = Path(out)
    certificate_path, key_path = out / "cert.pem", out / "key.pem"
    certificate = _load_certificate(certificate_path)
    key, _ = load_or_generate_key(key_path, None)
    if certificate.public_key() != key.public_key():
        raise ClientError(f"{certificate_path} is not the certificate of the key {key_path}")
    username = _common_name(certificate)
    if now() >= certificate.not_valid_after_utc:
        raise Expired(f"the certificate of {username} in {certificate_path} expired at {_expiry(certificate)} UTC")
    if not isinstance(server, Server):
        server = Server(server, ca_file=out / "ca.pem", report=report)
    next_key_path = out / NEXT_KEY
    if next_key_path.exists():  # an earlier re-key may have been answered: repeat it
        new_key, _ = load_or_generate_key(next_key_path, None)
    elif new_key is not None:
        _write(next_key_path, _private_pem(new_key), mode=0o600)
    signer = new_key or key
    reply = server.presenting(certificate_path, key_path).call("POST", RENEW, {"csr": make_csr(username, signer)})
    if reply.status == HTTPStatus.UNAUTHORIZED:
        raise Revoked(reply.status, _error_body(reply), reply.headers)
    if reply.status != HTTPStatus.CREATED:
        raise Refused.from_reply(reply)
    renewed = _accept(reply.json(), signer)
    if renewed.username != username:
        raise ClientError(f"the registry renewed the certificate of {renewed.username!r}, not of {username!r}")
    key_pem = key_path.read_bytes() if new_key is None else _private_pem(new_key)
    saved = _save(renewed, out, key_pem)
    next_key_path.unlink(missing_ok=True)
    return saved


def keep(
    server: str | Server,
    out: str | os.PathLike[str],
    *,
    username: str | None = None,
    key_type: str = "ec",
    roles: Iterable[str] = (),
    permissions: Iterable[Mapping[str, str]] = (),
    context: str | None = None,
    new_key: bool = False,
    max_interval: float = MAX_INTERVAL,
    now: Clock = lambda: datetime.now(UTC),
    sleep: Sleep = time.sleep,
    report: Report = lambda message: None,
) -> NoReturn:
    """Keep a current certificate in ``out`` for ever: register when there is none, then renew each in time.

    Without ``out/cert.pem``, registers ``username`` with the key
    ``out/key.pem`` (made, of ``key_type``, unless an earlier run left one),
    asking for ``roles``, ``permissions`` and ``context`` as ``register``
    does. Then, for ever: sleeps until the certificate's renewAfter, plus a
    random part of the time left, so that devices registered together do not
    renew together; renews (with a new key each time when ``new_key``);
    retries with a capped exponential back-off while the server cannot be
    reached or is busy. At start and at each wake-up of its sleep (hourly
    naps) it checks that the registry still accepts the certificate
    (``check_standing``). ``now`` and ``sleep`` are the clock and the sleep,
    so that a test can drive the time.

    Never returns. Raises ``Revoked`` (401: the certificate was revoked, its
    user removed) or ``Expired``, whose exit code is ``Exit.REVOKED``; or
    another ``ClientError`` that waiting does not cure (``Rejected``,
    ``TrustFailure``, a refused registration).
    """
    out = Path(out)
    if not isinstance(server, Server):
        server = Server(server, ca_file=out / "ca.pem" if (out / "ca.pem").exists() else None, report=report)
    if not (out / "cert.pem").exists():
        if username is None:
            raise ClientError(f"there is no certificate in {out} to renew: give a username to register")
        key, _ = load_or_generate_key(out / "key.pem", key_type)
        registered = register(server, username, key=key, roles=roles, permissions=permissions, context=context,
                              out=out, max_interval=max_interval, report=report)  # fmt: skip
        report(f"registered {username}: {_rights(registered.roles, registered.permissions)}")
    holder = _common_name(_load_certificate(out / "cert.pem"))
    if username not in (None, holder):
        raise ClientError(f"{out / 'cert.pem'} is the certificate of {holder!r}, not of {username!r}")
    earliest = None  # no renewal yet
    while True:
        certificate = _load_certificate(out / "cert.pem")
        check_standing(server, out, now)
        wake = _renewal_moment(certificate)
        if earliest is not None and wake < earliest:
            # The registry's clock is far behind ours: renewing at once would
            # renew in a loop.
            wake = earliest
        report(f"the certificate of {holder} is valid until {_expiry(certificate)} UTC; "
               f"renewing at {_utc(wake)} UTC")  # fmt: skip
        _sleep_until(wake, now, sleep, awake=lambda: check_standing(server, out, now))
        renewed = _renew_patiently(server, out, key_type if new_key else None, now, sleep, report)
        report(f"renewed {renewed.username}" + (" with a new key" if new_key else ""))
        earliest = now() + timedelta(seconds=RENEW_GAP)


def _renew_patiently(
    server: Server, out: Path, key_type: str | None, now: Clock, sleep: Sleep, report: Report
) -> Registered:
    """Renew (re-keying with a new key of ``key_type``, if given), waiting through every failure that may pass."""
    # One new key for every try: a try that repeats one whose answer was lost
    # gets that answer again, rather than another certificate.
    new_key = generate_key(key_type) if key_type else None
    reporter = _StateReporter(report)
    failures = 0
    while True:
        try:
            return renew(server, out, new_key=new_key, now=now, report=report)
        except Unreachable as error:
            state, reason, asked = "unreachable", str(error), 0.0
        except Refused as error:
            if not error.transient:
                raise
            state, reason, asked = error.status, str(error), retry_after(error.headers, 0.0)
        failures += 1
        reporter.enter(state, f"cannot renew yet ({reason}); trying again, waiting up to {RETRY_MAX:g} s")
        sleep(max(_backoff(failures, RETRY_MAX, RETRY_FIRST), min(asked, RETRY_MAX)))


def renewal_moment(certificate: x509.Certificate) -> datetime:
    """When a certificate should be renewed: two thirds of the way through its validity (SPEC LIFE-7.1-TIMES)."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) * 2 / 3


def _renewal_moment(certificate: x509.Certificate) -> datetime:
    # Devices commissioned on one day would otherwise all renew in the same
    # minute: each picks a random moment in the first tenth of what is left.
    start = renewal_moment(certificate)
    return start + (certificate.not_valid_after_utc - start) * random.uniform(0, RENEW_SPREAD)


def _sleep_until(moment: datetime, now: Clock, sleep: Sleep, awake: Callable[[], None] = lambda: None) -> None:
    # time.sleep counts on the monotonic clock, which stops while the machine
    # is suspended: naps of at most an hour, each reading the clock again,
    # keep a suspended device from sleeping past its renewal. ``awake`` runs
    # after each nap but the last.
    while (left := (moment - now()).total_seconds()) > 0:
        sleep(min(left, LONGEST_NAP))
        if moment > now():
            awake()


def check_standing(server: Server, out: str | os.PathLike[str], now: Clock = lambda: datetime.now(UTC)) -> None:
    """Raise ``Revoked`` when the registry no longer accepts the certificate in ``out``, ``Expired`` when it expired.

    The registry says so at ``whoami`` over mutual TLS (SPEC LIFE-7.3-REVOKE: a
    revoked certificate authenticates nothing). An answer that is no
    answer (the server unreachable, busy or failing) proves nothing, and is
    left to the next check or the renewal.
    """
    out = Path(out)
    certificate = _load_certificate(out / "cert.pem")
    if now() >= certificate.not_valid_after_utc:
        username = _common_name(certificate)
        raise Expired(f"the certificate of {username} in {out / 'cert.pem'} expired at {_expiry(certificate)} UTC")
    try:
        reply = server.presenting(out / "cert.pem", out / "key.pem").call("GET", WHOAMI)
    except Unreachable:
        return
    if reply.status == HTTPStatus.UNAUTHORIZED:
        raise Revoked(reply.status, _error_body(reply), reply.headers)


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ClientError(f"there is no certificate at {path}: register first") from None
    except ValueError:
        raise ClientError(f"{path} is not a PEM certificate") from None


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ClientError("the certificate names no user: its subject has no Common Name")
    return str(names[0].value)


def _expiry(certificate: x509.Certificate) -> str:
    return _utc(certificate.not_valid_after_utc)


def _private_pem(key: PrivateKey) -> bytes:
    encoding, unencrypted = serialization.Encoding.PEM, serialization.NoEncryption()
    return key.private_bytes(encoding, serialization.PrivateFormat.PKCS8, unencrypted)


# --- The command line -------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the result is an ``Exit`` code.

    Every failure is reported here, in one place: one line on standard
    error, or, with ``--json``, one JSON object on standard output, where
    the answer would have been (``_report_failure``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args, unknown = _parser().parse_known_args(argv)
        if unknown:
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args, args.parser)
    except UsageError as error:
        error.hint = _near_options(error.parser, argv)
        return _report_failure(error, as_json=_wants_json(args, argv, error.parser), usage=error.parser)
    except ClientError as error:
        return _report_failure(error, as_json=_wants_json(args, argv))
    except OSError as error:
        return _report_failure(ClientError(str(error)), as_json=_wants_json(args, argv))
    except KeyboardInterrupt:
        resumes = RESUMES.get(getattr(args, "command", ""), "")
        return _report_failure(Interrupted(resumes), as_json=_wants_json(args, argv))


def _wants_json(
    args: argparse.Namespace | None, argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> bool:
    """Whether the command asked for ``--json``; before its options were parsed, whether it takes it and has it."""
    if args is not None:
        return getattr(args, "json", False)
    return parser is not None and "--json" in argv and "--json" in _options(parser)


def _report_failure(error: ClientError, *, as_json: bool, usage: argparse.ArgumentParser | None = None) -> int:
    """Report a failure and return its exit code.

    With ``--json`` the report is ``{"error", "message", "exitCode"}`` (and
    the HTTP ``status`` of a server's refusal) on standard output: a script
    reads one JSON document there whatever happened, while standard error
    keeps the progress lines.
    """
    sentence = f"{error}" + (f" ({error.hint})" if error.hint else "")
    if as_json:
        report = {"error": error.code, "message": sentence, "exitCode": int(error.exit_code)}
        if isinstance(error, Refused):
            report["status"] = error.status
        print(json.dumps(report), flush=True)
    elif usage is not None:  # as argparse reports it
        usage.print_usage(sys.stderr)
        _say(f"{usage.prog}: error: {sentence}")
    else:
        _say(f"client.py: {sentence}")
    return error.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are ``UsageError``s: ``main`` reports them as it reports any other."""

    def error(self, message: str) -> NoReturn:
        """Raise the error rather than print it and exit."""
        raise UsageError(message, self)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """The option strings a parser knows, such as ``--role``."""
    # argparse has no public list of them; _actions is what its own help formatter reads.
    return [option for action in parser._actions for option in action.option_strings]


def _near_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """A hint for the mistyped options in ``argv``, such as "did you mean --role for --roles?"; or ""."""
    known = _options(parser)
    names = [option[2:] for option in known if option.startswith("--")]  # "--" would make all options alike
    guesses = []
    for word in argv:
        typed = word.partition("=")[0]
        # argparse takes a unique prefix (--user for --username): only a word that starts no option is unknown.
        if typed.startswith("--") and not any(option.startswith(typed) for option in known):
            guesses += [f"--{name} for {typed}" for name in difflib.get_close_matches(typed[2:], names, n=1)]
    return f"did you mean {', '.join(guesses)}?" if guesses else ""


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--server",
        default=os.environ.get("REGISTRY_URL", DEFAULT_SERVER),
        help="the registry's root URL (default: $REGISTRY_URL, else %(default)s)",
    )
    trust = connection.add_mutually_exclusive_group()
    trust.add_argument("--ca-file", type=Path, help="verify the server against this CA (PEM)")
    trust.add_argument("--insecure", action="store_true", help="do not verify the server's certificate (as curl -k)")
    trust.add_argument(
        "--ca-fingerprint",
        metavar="SHA256",
        help="fetch the server's CA and verify it has this SHA-256 fingerprint (hex, colons optional)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print the server's JSON answer, for scripts")

    parser = _Parser(
        prog="client.py",
        description="Register with the client registry, or administer it.",
        epilog="Exit codes: " + ", ".join(f"{code.value} {code.name.lower()}" for code in Exit),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{register,renew,keep,admin,whoami}")
    _register_parser(commands.add_parser("register", parents=[connection], help="ask to be registered and wait"))
    _renew_parser(commands.add_parser("renew", parents=[connection], help=RENEW_HELP, description=RENEW_DESCRIPTION))
    _keep_parser(commands.add_parser("keep", parents=[connection], help=KEEP_HELP, description=KEEP_DESCRIPTION))
    _admin_parsers(commands.add_parser("admin", help="the administrator's calls"), [connection, output])
    _whoami_parser(commands.add_parser("whoami", parents=[connection, output], help="who the server says you are"))
    return parser


def _register_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--username", required=True, help="the name to register; with a key, the CSR's Common Name")
    credential = parser.add_mutually_exclusive_group(required=True)
    credential.add_argument("--password", help="register with this password")
    credential.add_argument("--password-file", type=Path, help="register with the password in this file")
    credential.add_argument(
        "--generate-key",
        action="store_true",
        help="register with a key: OUT/key.pem, made now (mode 0600) unless an earlier run left one",
    )
    credential.add_argument("--key", type=Path, help="register with this private key (PEM)")
    add("--key-type", choices=KEY_TYPES, default="ec", help="the kind of key --generate-key makes (default ec)")
    _rights_arguments(parser, "ask for")
    add("--context", help="free text for the administrator: what this client is, where it runs")
    add(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write granted.json and, with a key, cert.pem, key.pem and ca.pem (needed with a key)",
    )
    add("--timeout", type=float, metavar="SECONDS", help="give up after this long (default: wait for ever)")
    add(
        "--max-interval",
        type=float,
        default=MAX_INTERVAL,
        metavar="SECONDS",
        help="the longest wait of its own choosing between two polls; a Retry-After is always honoured"
        " (default %(default)g)",
    )
    parser.set_defaults(run=_run_register, parser=parser)


def _rights_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--role", dest="roles", action="append", default=[], metavar="ROLE", help=f"a role to {verb}; repeatable"
    )
    parser.add_argument(
        "--permission",
        dest="permissions",
        action="append",
        default=[],
        type=_permission_argument,
        metavar="CONTEXT:OPERATION:RESOURCE",
        help=f"a permission to {verb}, such as mqtt:read:sensors/#; repeatable",
    )


def _permission_argument(text: str) -> dict[str, str]:
    try:
        return parse_permission(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _run_register(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out is None and (args.generate_key or args.key):
        parser.error("--out is needed with a key: the folder where cert.pem and key.pem go, for renew and keep")
    server = _server(args, parser)
    key, key_path = _key(args)
    try:
        registered = register(
            server,
            args.username,
            password=_password(args),
            key=key,
            roles=args.roles,
            permissions=args.permissions,
            context=args.context,
            out=args.out,
            timeout=args.timeout,
            max_interval=args.max_interval,
            report=_say,
        )
    except Conflict as error:
        error.hint = f"the administrator may free the name: client.py admin forget|delete-user {args.username}"
        raise
    files = [registered.certificate_path, registered.ca_path, registered.granted_path]
    print(f"registered {registered.username}: {_rights(registered.roles, registered.permissions)}")
    if any(files):
        key = f"; the key is {key_path}" if key_path else ""
        copied = f", copied to {registered.key_path} for renew and keep" if registered.key_path else ""
        print("wrote " + ", ".join(str(path) for path in files if path) + key + copied)
    return Exit.OK


RENEW_HELP = "renew the certificate in --out now, over mutual TLS with it"
RENEW_DESCRIPTION = (
    "Renew the certificate in --out now: present OUT/cert.pem and OUT/key.pem over mutual TLS, and write the "
    "new certificate there (with --new-key, a new key too, in one step). Run it again to fetch an answer that "
    "was lost. Exit code 8 (revoked) when the registry no longer accepts the certificate: it was revoked (its "
    "user was removed) or has expired."
)
KEEP_HELP = "register if needed, then renew the certificate in time, for ever"
KEEP_DESCRIPTION = (
    "Keep a current certificate in --out: register with OUT/key.pem when there is no certificate yet "
    "(--username and the rights to ask for are needed then), sleep until its renewAfter, renew, and so on. "
    "It waits through an unreachable or busy registry, and ends with exit code 8 (revoked) when the "
    "certificate is revoked (its user was removed) or has expired: it asks the registry (whoami over mutual "
    "TLS) at start and at each hourly wake-up."
)
TRUST_DEFAULT = "The server is checked against OUT/ca.pem unless --ca-file, --insecure or --ca-fingerprint is given."


def _renew_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TRUST_DEFAULT
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder of cert.pem and key.pem")
    parser.add_argument(
        "--new-key", action="store_true", help="re-key: a new key, written only together with its certificate"
    )
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ec", help="the new key's kind (default ec)")
    parser.set_defaults(run=_run_renew, parser=parser)


def _run_renew(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    new_key = generate_key(args.key_type) if args.new_key else None
    renewed = renew(_server(args, parser), args.out, new_key=new_key, report=_say)
    print(f"renewed {renewed.username}{_validity(renewed)}")
    files = [renewed.certificate_path, renewed.key_path, renewed.ca_path, renewed.granted_path]
    print("wrote " + ", ".join(str(path) for path in files if path) + (" (a new key)" if new_key else ""))
    return Exit.OK


def _validity(renewed: Registered) -> str:
    if renewed.not_after is None or renewed.renew_after is None:
        return ""
    return f": valid until {_utc(renewed.not_after)} UTC, renew after {_utc(renewed.renew_after)} UTC"


def _keep_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TRUST_DEFAULT
    add = parser.add_argument
    add("--out", type=Path, required=True, metavar="DIR", help="the folder of key.pem, cert.pem, ca.pem, granted.json")
    add("--username", help="the name to register when there is no certificate yet")
    add("--key-type", choices=KEY_TYPES, default="ec", help="the kind of key to make (default ec)")
    _rights_arguments(parser, "ask for when registering")
    add("--context", help="free text for the administrator, when registering")
    add("--new-key", action="store_true", help="re-key at every renewal")
    add(
        "--max-interval",
        type=float,
        default=MAX_INTERVAL,
        metavar="SECONDS",
        help="the longest wait between two polls while registering (default %(default)g)",
    )
    parser.set_defaults(run=_run_keep, parser=parser)


def _run_keep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    keep(
        _server(args, parser),
        args.out,
        username=args.username,
        key_type=args.key_type,
        roles=args.roles,
        permissions=args.permissions,
        context=args.context,
        new_key=args.new_key,
        max_interval=args.max_interval,
        report=_say,
    )


def _key(args: argparse.Namespace) -> tuple[PrivateKey | None, Path | None]:
    """The key to register with, and its file: OUT/key.pem for --generate-key, or --key."""
    if args.generate_key:
        path = args.out / "key.pem"
        key, new = load_or_generate_key(path, args.key_type)
        _say(f"made a new {args.key_type} key, {path}" if new else f"using the key {path} of an earlier run")
        return key, path
    if args.key:
        return load_or_generate_key(args.key, None)[0], args.key
    return None, None


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file:
        return args.password_file.read_text().rstrip("\r\n")
    return args.password


def _server(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    report: Report | None = None,
    **client_files: Path | None,
) -> Server:
    ca_file = args.ca_file
    saved = getattr(args, "out", None) and args.out / "ca.pem"
    if args.command in ("renew", "keep") and not (ca_file or args.insecure or args.ca_fingerprint) and saved.exists():
        ca_file = saved  # the registry's CA, as registration saved it
    try:
        return Server(
            args.server,
            ca_file=ca_file,
            insecure=args.insecure,
            ca_fingerprint=args.ca_fingerprint,
            report=report or _say,
            **client_files,
        )
    except ValueError as error:
        parser.error(str(error))


# --- The administrator's commands -------------------------------------------


@dataclass(frozen=True)
class AdminCommand:
    """One administrator's command: its call and how its answer reads."""

    method: str
    path: str  # {name} is the username argument
    show: Callable[[Any], str]
    help: str


def _show_status(status: Mapping[str, Any]) -> str:
    state = "locked" if status["locked"] else f"unlocked until {_when(status['unlockedUntil'])} UTC"
    return f"{state}; {status['pending']} pending"


def _show_requests(requests: list[Mapping[str, Any]]) -> str:
    if not requests:
        return "no requests"
    headers = ["USERNAME", "STATE", "PAIRING", "METHOD", "ROLES", "PERMISSIONS", "COLLECTED", "POLLS",
               "LAST POLL (UTC)", "FROM", "CONTEXT / REASON"]  # fmt: skip
    return _table(headers, [_request_row(r) for r in requests])


def _request_row(r: Mapping[str, Any]) -> list[str]:
    rights = r["granted"] or r  # once approved, what was granted; until then, what is asked for
    return [
        r["username"],
        r["state"],
        r["pairingId"],
        r["method"],
        ", ".join(rights["roles"]) or "-",
        ", ".join(format_permission(p) for p in rights["permissions"]) or "-",
        _collected(r),
        str(r["pollCount"]),
        _when(r["lastPollAt"]),
        r["clientAddress"] or "-",
        _shorten((r["reason"] if r["state"] == "denied" else r["context"]) or "-"),
    ]


def _collected(request: Mapping[str, Any]) -> str:
    """Whether the client has fetched its approval: "yes", "not yet", or "-" for a request not approved."""
    if request["state"] != "approved":
        return "-"
    return "yes" if request["collectedAt"] else "not yet"


def _show_users(users: list[Mapping[str, Any]]) -> str:
    if not users:
        return "no users"
    headers = ["USERNAME", "METHOD", "ROLES", "PERMISSIONS", "CREATED (UTC)", "CERTIFICATE SERIAL", "CERTIFICATE",
               "RENEW AFTER (UTC)", "EXPIRES (UTC)"]  # fmt: skip
    rows = [
        [
            u["username"],
            u["method"],
            ", ".join(u["roles"]) or "-",
            ", ".join(format_permission(p) for p in u["permissions"]) or "-",
            _when(u["createdAt"]),
            u["certificateSerial"] or "-",
            CERTIFICATE_STATUS.get(u["certificateStatus"], u["certificateStatus"] or "-"),
            _when(u["certificateRenewAfter"]) if u["certificateRenewAfter"] else "-",
            _when(u["certificateNotAfter"]) if u["certificateNotAfter"] else "-",
        ]
        for u in users
    ]
    return _table(headers, rows)


# A user's certificateStatus, for a person: "renew" means the renewal is due (SPEC section 7).
CERTIFICATE_STATUS = {"valid": "valid", "renew": "renewal due", "expired": "expired"}


def _show_user(user: Mapping[str, Any]) -> str:
    certificate = f"; certificate serial {user['certificateSerial']}" if user.get("certificateSerial") else ""
    return f"approved {user['username']}: {_rights(user['roles'], user['permissions'])}{certificate}"


def _show_denied(request: Mapping[str, Any]) -> str:
    return f"denied {request['username']}" + (f": {request['reason']}" if request.get("reason") else "")


ADMIN_COMMANDS = {
    "status": AdminCommand("GET", "/client-registry", _show_status, "is the registry locked, and how many wait"),
    "unlock": AdminCommand("POST", "/client-registry/unlock", _show_status, "open the registry for new requests"),
    "lock": AdminCommand("POST", "/client-registry/lock", _show_status, "close the registry at once"),
    "requests": AdminCommand("GET", "/client-registry/requests", _show_requests, "list every stored request"),
    "approve": AdminCommand("POST", "/client-registry/requests/{name}/approve", _show_user, "approve a request"),
    "deny": AdminCommand("POST", "/client-registry/requests/{name}/deny", _show_denied, "deny a request"),
    "forget": AdminCommand(
        "DELETE", "/client-registry/requests/{name}", lambda a: f"forgot the request of {a['username']}",
        "forget a pending or denied request"),
    "users": AdminCommand("GET", "/users", _show_users, "list the registered users"),
    "delete-user": AdminCommand(
        "DELETE", "/users/{name}", lambda a: f"removed the user {a['username']}",
        "remove a user and its request: the name may register again"),
}  # fmt: skip


def _admin_parsers(parser: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--token",
        default=os.environ.get("REGISTRY_ADMIN_TOKEN"),
        help="the administrator token (default: $REGISTRY_ADMIN_TOKEN)",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="{" + ",".join(ADMIN_COMMANDS) + "}")
    for name, command in ADMIN_COMMANDS.items():
        action = actions.add_parser(name, parents=[*parents, common], help=command.help, description=command.help)
        if "{name}" in command.path:
            action.add_argument("name", metavar="NAME", help="the username")
        if name == "unlock":
            action.add_argument(
                "--minutes",
                type=float,
                help=f"how long it stays open, at most {MAX_UNLOCK_MINUTES} (default: the server's, 5)",
            )
        if name == "approve":
            _rights_arguments(action, "grant in place of those requested")
            action.add_argument("--no-roles", action="store_true", help="grant no roles (not given: as requested)")
            action.add_argument(
                "--no-permissions", action="store_true", help="grant no permissions (not given: as requested)"
            )
            action.add_argument("--grant-nothing", action="store_true", help="--no-roles and --no-permissions")
            action.epilog = "Roles, and permissions, that no option names are granted as the client requested them."
        if name == "deny":
            action.add_argument("--reason", help="why, for the client to read")
        action.set_defaults(run=_run_admin, parser=action)


def _admin_body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any] | None:
    """The body the command sends, from its options; None for none."""
    if args.action == "unlock" and args.minutes is not None:
        # The API counts milliseconds; a person, minutes: the limits are said in minutes, before anything is sent.
        if not 0 < args.minutes <= MAX_UNLOCK_MINUTES:
            parser.error(f"--minutes must be more than 0 and at most {MAX_UNLOCK_MINUTES} minutes (a day)")
        return {"duration": max(1, round(args.minutes * 60_000))}
    if args.action == "approve":
        return _approval_body(args, parser)
    if args.action == "deny" and args.reason is not None:
        return {"reason": args.reason}
    return None


def _approval_body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any] | None:
    """Only the fields an option names: SPEC ADMIN-4.4-APPROVE-BODY grants a field left out as requested."""
    no_roles, no_permissions = args.no_roles or args.grant_nothing, args.no_permissions or args.grant_nothing
    if no_roles and args.roles:
        parser.error("--role grants roles: it goes with neither --no-roles nor --grant-nothing")
    if no_permissions and args.permissions:
        parser.error("--permission grants permissions: it goes with neither --no-permissions nor --grant-nothing")
    body = {"roles": args.roles} if args.roles or no_roles else {}
    if args.permissions or no_permissions:
        body["permissions"] = args.permissions
    return body or None


def _run_admin(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.token:
        parser.error("give --token or set REGISTRY_ADMIN_TOKEN (the server keeps it in <data-dir>/admin-token)")
    command = ADMIN_COMMANDS[args.action]
    path = API + command.path.format(name=quote(getattr(args, "name", ""), safe=""))
    body = _admin_body(args, parser)
    # Pinning says "compare it with the administrator's": to the administrator
    # that is noise (--ca-file registry-data/ca.pem checks the CA strictly).
    server = _server(args, parser, report=lambda message: None)
    reply = server.call(command.method, path, body, headers={"Authorization": f"Bearer {args.token}"})
    if reply.status != HTTPStatus.OK:
        error = Refused.from_reply(reply)
        if isinstance(error, Unauthorized):
            error.hint = "check --token or $REGISTRY_ADMIN_TOKEN: the server keeps it in <data-dir>/admin-token"
        raise error
    answer = reply.json()
    print(json.dumps(answer, indent=2) if args.json else _printable(command.show(answer), keep_newlines=True))
    return Exit.OK


# --- whoami -----------------------------------------------------------------


def _whoami_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", type=Path, help="the client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    parser.add_argument("--username", help="the username, for HTTP Basic")
    password = parser.add_mutually_exclusive_group()
    password.add_argument("--password", help="the password, for HTTP Basic")
    password.add_argument("--password-file", type=Path, help="a file holding the password")
    parser.set_defaults(run=_run_whoami, parser=parser)


def _run_whoami(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    by_certificate = args.cert is not None or args.key is not None
    by_password = args.username is not None or args.password is not None or args.password_file is not None
    if by_certificate == by_password:
        parser.error("give either --cert and --key, or --username and --password")
    if by_certificate and (args.cert is None or args.key is None):
        parser.error("--cert and --key go together")
    headers = {}
    if by_password:
        password = _password(args)
        if args.username is None or password is None:
            parser.error("--username and --password go together")
        credentials = b64encode(f"{args.username}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {credentials}"
    server = _server(args, parser, certificate=args.cert, key=args.key)
    reply = server.call("GET", f"{API}/auth/whoami", headers=headers)
    if reply.status != HTTPStatus.OK:
        raise Refused.from_reply(reply)
    identity = reply.json()
    if args.json:
        print(json.dumps(identity, indent=2))
    else:
        rights = _rights(identity["roles"], identity["permissions"])
        print(_printable(f"{identity['username']}, by {identity['method']}: {rights}"))
    return Exit.OK


# --- Output -----------------------------------------------------------------


def _say(message: str) -> None:
    """A progress line, on standard error: standard output keeps the results."""
    print(_printable(message), file=sys.stderr, flush=True)


def _rights(roles: Iterable[str], permissions: Iterable[Mapping[str, str]]) -> str:
    listed = ", ".join(format_permission(p) for p in permissions)
    return f"roles {', '.join(roles) or 'none'}; permissions {listed or 'none'}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def _when(iso: str) -> str:
    """An ISO 8601 time from the server, in UTC to the second."""
    return _utc(datetime.fromisoformat(iso))


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _printable(text: str, *, keep_newlines: bool = False) -> str:
    # A client's context, or a server's message, could hold terminal escape
    # sequences: shown as \x1b, they cannot rewrite the administrator's screen.
    return "".join(
        char if char.isprintable() or (keep_newlines and char == "\n") else repr(char)[1:-1] for char in text
    )


if __name__ == "__main__":
    sys.exit(main())

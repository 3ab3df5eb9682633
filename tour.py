"""A narrated tour of the registry: the whole life of two clients over real HTTPS.

``python3 tour.py`` starts the real server (``server.build``, in a thread)
on a free loopback port with a temporary data folder, and walks a sensor
that has a password and an agent that has a key from a locked registry to
a revoked certificate. Each step prints the real HTTP exchange, the rules
of SPEC.md that decide the answer (by id), and a curl line that
reproduces it while the server runs. ``--pause`` waits for Enter between
steps, which leaves time to try those lines in another shell: each line,
run then, gets the answer the tour shows, or its label says what it
answers now (an approval made already is 409, a user deleted already 404).

``--markdown FILE`` writes the same transcript as a document, with what
changes from run to run (times, the port, the folder, pairing ids,
serials) masked, and a Mermaid sequence diagram of the exchange.
docs/tour.md is that file; test_tour.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

import ca
import client
import server

# The tour gives the server a fixed administrator token, so that its curl
# lines and its document read the same every time. A real server makes a
# random one on first start and keeps it in <data-dir>/admin-token.
ADMIN_TOKEN = "tour-admin-token-0123456789abcdef"
WIDTH = 100  # the widest line the tour prints, as far as JSON strings allow
UNLOCK_MS = 3_600_000  # an hour, time enough to read with --pause (without a body: five minutes)
TIMEOUT = 10  # seconds for any one call or command, so that nothing hangs

SENSOR, SENSOR_PASSWORD = "sensor-0003", "s3cret-pass"
AGENT = "agent-0001"
CAMERA, CAMERA_PASSWORD = "camera-0007", "camera-pass-7"
PLC = "plc-0009"
REGISTER = "/api/client-registry/register"
CA_FILE = '"$TOUR/registry/ca.pem"'
EST_ENROLL = "/.well-known/est/simpleenroll"
EST_REQUEST = "application/pkcs10"  # RFC 7030 section 4.2.1

# Who speaks in the sequence diagram, in the order of its columns.
PARTICIPANTS = {
    "Sensor": f"{SENSOR} (password)",
    "Agent": f"{AGENT} (CSR)",
    "Camera": CAMERA,
    "Plc": f"{PLC} (EST)",
    "Other": "other devices",
    "Registry": "registry",
    "Admin": "administrator",
    "Party": "relying party (broker, openssl)",
}

# Times as the registry writes them (ISO 8601) and as the tour shows a certificate's.
TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}| UTC)?")
# What a key or a certificate hashes to, and the milliseconds a window has left (issue 27): new at every run.
SHA256_HEX = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
MILLISECONDS_LEFT = re.compile(r'"unlockedForMs": \d+')
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
# KeyUsage's bits but encipher_only and decipher_only, which cryptography reads only beside key_agreement.
KEY_USAGES = tuple(bit for bit in ca.KEY_USAGE_BITS if bit not in ("encipher_only", "decipher_only"))


# --- Masking, for the document -------------------------------------------------


class Masker:
    """Replaces what changes from run to run with a stable label."""

    def __init__(self) -> None:
        self._labels: dict[str, str] = {}
        self.serials: list[str] = []  # in the order they appeared

    def name(self, value: str, label: str) -> None:
        """Write ``value`` as ``label`` in the document."""
        self._labels.setdefault(value, label)

    def serial(self, serial: str) -> None:
        """Number serials in the order they appear: <serial 1>, <serial 2>..."""
        if serial not in self.serials:
            self.serials.append(serial)
            self._labels[serial] = f"<serial {len(self.serials)}>"

    def __call__(self, text: str) -> str:
        text = TIME.sub("<time>", text)
        text = SHA256_HEX.sub("<sha-256>", text)
        text = MILLISECONDS_LEFT.sub('"unlockedForMs": <ms>', text)
        # Longest first, and whole words only, so that no value is replaced inside another.
        for value in sorted(self._labels, key=len, reverse=True):
            text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", self._labels[value], text)
        return text


# --- The transcript: printed at once, kept as Markdown --------------------------


@dataclass
class Transcript:
    """What the tour shows: printed as it happens, and kept as Markdown and as a sequence diagram."""

    mask: Masker
    markdown: list[str] = field(default_factory=list)
    diagram: list[str] = field(default_factory=list)
    steps: int = 0
    opening: int = 0  # how many Markdown parts come before the first step
    _heading: bool = True  # the last thing printed was a heading: no blank line before the next

    def _print(self, text: str) -> None:
        """Print ``text``, after a blank line unless it follows a heading."""
        print(text if self._heading else "\n" + text)
        self._heading = False

    def step(self, title: str, *narration: str) -> None:
        """Begin the next numbered step: its heading, a note in the diagram, and what it is about."""
        if not self.steps:
            self.opening = len(self.markdown)
        self.steps += 1
        heading = f"{self.steps}. {title}"
        print("\n\n" + f"== {heading} ".ljust(WIDTH, "="))
        self._heading = True
        self.markdown.append(f"## {heading}\n")
        self.message(f"Note over Sensor,Party: {heading}")
        for paragraph in narration:
            self.say(paragraph)

    def say(self, paragraph: str) -> None:
        """A paragraph of narration."""
        self._print(textwrap.fill(paragraph, WIDTH))
        self.markdown.append(paragraph + "\n")

    def block(self, lines: list[str]) -> None:
        """Preformatted lines: an exchange, a certificate, a command's output."""
        self._print("\n".join("  " + line for line in lines))
        self.markdown.append("```text\n" + "\n".join(lines) + "\n```\n")

    def rules(self, rules: dict[str, str]) -> None:
        """The rules of SPEC.md that decide the answer, by id, and why."""
        width = max(map(len, rules))
        indent = " " * (width + 6)
        lines = [
            textwrap.fill(why, WIDTH, initial_indent=f"    {rule:{width}}  ", subsequent_indent=indent)
            for rule, why in rules.items()
        ]
        self._print("\n".join(["  Rules of SPEC.md:", *lines]))
        self.markdown.append(
            "Rules of [SPEC.md](../SPEC.md):\n\n" + "".join(f"- `{r}`: {w}\n" for r, w in rules.items())
        )

    def command(self, words: list[str], label: str = "Try it") -> None:
        """A shell command, wrapped with backslashes to fit the width."""
        lines = wrap_command(words)
        self._print(f"  {label}:\n" + "\n".join("    " + line for line in lines))
        self.markdown.append(f"{label}:\n\n```sh\n" + "\n".join(lines) + "\n```\n")

    def message(self, line: str) -> None:
        """A line of the sequence diagram; Mermaid reads ";" as the end of a statement and "#" as an entity."""
        self.diagram.append("    " + line.replace(";", ",").replace("#", ""))

    def document(self, title: str, introduction: str) -> str:
        """The whole transcript as Markdown, masked, with the diagram after the opening."""
        diagram = ["```mermaid", "sequenceDiagram"]
        diagram += [f"    participant {key} as {name}" for key, name in PARTICIPANTS.items()]
        diagram += [*self.diagram, "```\n"]
        parts = [
            f"# {title}\n",
            introduction,
            *self.markdown[: self.opening],
            "## The exchange at a glance\n",
            "\n".join(diagram),
            *self.markdown[self.opening :],
        ]
        return self.mask("\n".join(parts))


def wrap_command(words: list[str]) -> list[str]:
    """``words`` joined by spaces, broken before a word where a line would pass the width."""
    lines, line = [], ""
    for word in words:
        if line and len(line) + len(word) + 3 > WIDTH - 4:
            lines.append(line + " \\")
            line = "     " + word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def pretty(data: Any, indent: int = 0, used: int = 0) -> list[str]:
    """JSON as lines: what fits in the width on one line, the rest one item a line.

    ``indent`` is the indentation of the lines after the first; ``used``,
    how much of the first line is taken before the value starts.
    """
    flat = json.dumps(data, ensure_ascii=False)
    if max(indent, used) + len(flat) <= WIDTH - 4 or not isinstance(data, dict | list) or not data:
        return [flat]
    if isinstance(data, dict):
        items = [(json.dumps(key, ensure_ascii=False) + ": ", value) for key, value in data.items()]
        opening, closing = "{", "}"
    else:
        items = [("", value) for value in data]
        opening, closing = "[", "]"
    lines, inner = [opening], " " * (indent + 2)
    for number, (prefix, value) in enumerate(items):
        first, *rest = pretty(value, indent + 2, indent + 2 + len(prefix))
        lines += [inner + prefix + first, *rest]
        lines[-1] += "," if number < len(items) - 1 else ""
    return [*lines, " " * indent + closing]


# --- Certificates and CRLs, read rather than shown as base64 ---------------------


def utc(moment: datetime) -> str:
    """A certificate's time, to the second as it holds it."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(span: timedelta) -> str:
    """A span as days, hours and minutes, leaving out what is zero."""
    minutes = int(span.total_seconds()) // 60
    parts = [(minutes // 1440, "day"), (minutes // 60 % 24, "hour"), (minutes % 60, "minute")]
    return " and ".join(f"{count} {unit}{'s' * (count != 1)}" for count, unit in parts if count) or "0 minutes"


def key_description(key: Any) -> str:
    """A public key by its algorithm and size, as SPEC REG-2.3-KEY names them."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def pairing_id(key: Any) -> str:
    """SPEC REG-2.5-PENDING-BODY: the first six hex digits of the SHA-256 of the public key (SPKI DER)."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:6]


def camel(snake: str) -> str:
    """RFC 5280's spelling of a name cryptography writes in snake case: key_cert_sign is keyCertSign."""
    first, *rest = snake.split("_")
    return first + "".join(word.upper() if word == "crl" else word.title() for word in rest)


def extension_lines(certificate: x509.Certificate) -> list[str]:
    """Each extension by its name and what it says; the key identifiers by name alone."""
    lines, identifiers = [], []
    for extension in certificate.extensions:
        value, name = extension.value, extension.oid._name
        critical = " (critical)" if extension.critical else ""
        if isinstance(value, x509.BasicConstraints):
            limit = "" if value.path_length is None else f", path length {value.path_length}"
            lines.append(f"{name}: CA {str(value.ca).lower()}{limit}{critical}")
        elif isinstance(value, x509.KeyUsage):
            lines.append(f"{name}: {', '.join(camel(u) for u in KEY_USAGES if getattr(value, u))}{critical}")
        elif isinstance(value, x509.ExtendedKeyUsage):
            lines.append(f"{name}: {', '.join(usage._name for usage in value)}{critical}")
        else:
            identifiers.append(name)
    return [*lines, *([", ".join(identifiers)] if identifiers else [])]


def certificate_lines(certificate: x509.Certificate, what: str, *, pairing: bool) -> list[str]:
    """A certificate by its subject, serial, key, validity and extensions.

    With ``pairing``, the key line also names the key's pairing id, as a
    client's certificate is for the key its request was paired by.
    """
    key = certificate.public_key()
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    first, *more = extension_lines(certificate)
    return [
        f"{what}: {certificate.subject.rfc4514_string()}, issued by {certificate.issuer.rfc4514_string()}",
        f"  serial      {format(certificate.serial_number, 'x')}",
        f"  key         {key_description(key)}" + (f" (pairing id {pairing_id(key)})" if pairing else ""),
        f"  valid       {utc(start)} to {utc(end)} ({duration(end - start)})",
        f"  extensions  {first}",
        *(f"              {line}" for line in more),
    ]


def crl_lines(crl: x509.CertificateRevocationList, serials: list[str]) -> list[str]:
    """A CRL by its issuer, number, times and entries, in the order of ``serials`` (the CRL's own is no order)."""
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    start, end = crl.last_update_utc, crl.next_update_utc
    lines = [
        f"CRL: issued by {crl.issuer.rfc4514_string()}, number {number}",
        f"  thisUpdate  {utc(start)}",
        f"  nextUpdate  {utc(end)} ({duration(end - start)} later)",
    ]
    known = {serial: place for place, serial in enumerate(serials)}
    for entry in sorted(crl, key=lambda entry: known.get(format(entry.serial_number, "x"), len(known))):
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        lines.append(f"  revoked     serial {format(entry.serial_number, 'x')}")
        lines.append(f"              at {utc(entry.revocation_date_utc)}, reason {reason}")
    return lines


# --- The registry, and calls to it ------------------------------------------------


class TourError(Exception):
    """The server answered other than the step expects: the tour, SPEC.md or the server has changed."""


@dataclass(frozen=True)
class Identity:
    """Who makes a call: a column of the diagram, and how it authenticates, if it does."""

    participant: str
    admin: bool = False
    basic: tuple[str, str] | None = None
    certificate: tuple[str, str] | None = None  # (certificate, key) files in the tour's folder: mutual TLS


ADMIN = Identity("Admin", admin=True)


@dataclass
class Answer:
    """An HTTP answer as it came."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, read as JSON."""
        return json.loads(self.body)


class Tour:
    """The registry running in a thread, the clients' files beside it, and what the steps share."""

    def __init__(self, folder: Path, show: Transcript) -> None:
        self.folder = folder
        self.show = show
        self.data = folder / "registry"
        for device in ("sensor", "agent", "camera", "plc"):
            (folder / device).mkdir(mode=0o700)
        config = server.Config(port=0, data_dir=self.data, admin_token=ADMIN_TOKEN, http=False)
        self.server = server.build(config)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/api"
        show.mask.name(str(folder), "<temporary folder>")
        show.mask.name(f"127.0.0.1:{self.port}", "127.0.0.1:<port>")
        self._thread = threading.Thread(target=self.server.serve_forever, name="registry", daemon=True)
        self._thread.start()
        self.pairing_ids: dict[str, str] = {}  # what each device logged from its 202
        self.agent_key: ec.EllipticCurvePrivateKey | None = None
        self.agent_request: dict[str, Any] = {}

    def stop(self) -> None:
        """Stop the server and close its database; the folder stays, for its owner to remove."""
        self.server.shutdown()
        self.server.server_close()
        self.server.app.core.close()
        self._thread.join(TIMEOUT)

    def call(
        self,
        who: Identity,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int,
        body_file: str | None = None,
        output: str | None = None,
        raw: str | None = None,
        after: tuple[int, str] | None = None,
        sent: str | None = None,
    ) -> Answer:
        """One HTTPS call, shown as it went, with its arrows in the diagram and a curl line.

        ``expect`` is the status the step is about: any other stops the tour.
        ``body_file`` (in the tour's folder) keeps the body for curl's
        ``-d @``; ``output`` keeps the answer; ``raw`` says what an answer
        that is not JSON is. ``after`` is the status, and why, that the curl
        line gets once the step is over, when the step has changed it (a
        reader with --pause runs it then). Without ``body``, a ``body_file``
        is sent as it is, as EST's (``sent`` says what it holds).
        """
        if body_file and body is not None:
            (self.folder / body_file).write_text(json.dumps(body))
        context = ssl.create_default_context(cafile=str(self.data / "ca.pem"))
        if who.certificate:
            context.load_cert_chain(*(self.folder / name for name in who.certificate))
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if body is None and body_file:
            headers["Content-Type"] = EST_REQUEST
        if who.admin:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        if who.basic:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(who.basic).encode()).decode()
        payload = None if body is None else json.dumps(body).encode()
        if body is None and body_file:
            payload = (self.folder / body_file).read_bytes()
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=TIMEOUT)
        try:
            connection.request(method, path, payload, headers)
            response = connection.getresponse()
            answer = Answer(response.status, response.reason, dict(response.getheaders()), response.read())
        finally:
            connection.close()
        if output:
            (self.folder / output).write_bytes(answer.body)
        self._show(who, f"{method} {path}", headers, body, answer, raw, sent)
        self.show.command(curl(who, method, path, body, body_file, output), try_it(after))
        if answer.status != expect:
            raise TourError(f"{method} {path}: the tour expected {expect}, the server answered {answer.status}")
        return answer

    def _show(
        self,
        who: Identity,
        line: str,
        headers: dict[str, str],
        body: Any,
        answer: Answer,
        raw: str | None,
        sent: str | None = None,
    ) -> None:
        shown = [f"> {line} HTTP/1.1"]
        if who.certificate:
            shown.append(f"> (over TLS, the client certificate $TOUR/{who.certificate[0]})")
        # A Basic header is base64 of "username:password": show what it says, as a reader would decode it.
        decoded = f"  ({':'.join(who.basic)})" if who.basic else ""
        shown += [f"> {name}: {value}{decoded if name == 'Authorization' else ''}" for name, value in headers.items()]
        if body is not None:
            shown += [">", *("> " + text for text in pretty(self.abridge(body)))]
        if sent:
            shown += [">", f"> ({sent})"]
        shown.append(f"< HTTP/1.1 {answer.status} {answer.reason}")
        kind = answer.headers.get("Content-Type", "")
        if kind != "application/json":
            shown.append(f"< Content-Type: {kind}")
        shown += [
            f"< {name}: {answer.headers[name]}"
            for name in ("Retry-After", "WWW-Authenticate")
            if name in answer.headers
        ]
        shown.append("<")
        if raw:
            shown.append(f"< ({raw})")
        elif kind.startswith("text/plain"):  # EST's answers in words (SPEC section 10)
            shown += ["< " + text for text in textwrap.wrap(answer.body.decode(), WIDTH - 2)]
        else:
            shown += ["< " + text for text in pretty(self.abridge(answer.json()))]
        self.show.block(shown)
        arrow = line.replace("/api/client-registry", "").replace("/api", "") or "/"
        tls = " (mutual TLS)" if who.certificate else ""
        self.show.message(f"{who.participant}->>Registry: {arrow}{tls}")
        self.show.message(f"Registry-->>{who.participant}: {answer.status} {answer.reason}")

    def abridge(self, data: Any) -> Any:
        """JSON with each PEM value replaced by what it holds: a CSR or a certificate is read, not shown."""
        if isinstance(data, dict):
            return {key: self.abridge(value) for key, value in data.items()}
        if isinstance(data, list):
            return [self.abridge(value) for value in data]
        if isinstance(data, str) and data.startswith("-----BEGIN CERTIFICATE REQUEST-----"):
            csr = x509.load_pem_x509_csr(data.encode())
            return f"<PEM: a CSR for {csr.subject.rfc4514_string()} and an {key_description(csr.public_key())} key>"
        if isinstance(data, str) and data.startswith("-----BEGIN CERTIFICATE-----"):
            return f"<PEM: the certificate of {self.read_certificate(data).subject.rfc4514_string()}>"
        return data

    def read_certificate(self, pem: str) -> x509.Certificate:
        """Read a certificate, and give its serial a label for the document."""
        certificate = x509.load_pem_x509_certificate(pem.encode())
        self.show.mask.serial(format(certificate.serial_number, "x"))
        return certificate

    def certificate(self, pem: str, what: str, *, save_as: str | None = None, pairing: bool = True) -> None:
        """Show a certificate by what it says, and keep it in a file as the client would."""
        if save_as:
            (self.folder / save_as).write_text(pem)
        self.show.block(certificate_lines(self.read_certificate(pem), what, pairing=pairing))

    def pending(self, answer: Answer, owner: str) -> None:
        """Note the pairing id of a 202: the device logs it, the document names whose it is."""
        self.pairing_ids[owner] = answer.json()["pairingId"]
        self.show.mask.name(self.pairing_ids[owner], f"<pairing id of {owner}>")

    def make_agent_key(self) -> ec.EllipticCurvePrivateKey:
        """The agent's EC P-256 key, made as client.py makes it, and written 0600 as a device keeps it."""
        self.agent_key = client.generate_key("ec")
        path = self.folder / "agent/key.pem"
        path.touch(mode=0o600)
        private = serialization.PrivateFormat.PKCS8
        path.write_bytes(
            self.agent_key.private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption())
        )
        self.show.mask.name(pairing_id(self.agent_key.public_key()), f"<pairing id of {AGENT}>")
        return self.agent_key

    def run(self, words: list[str]) -> None:
        """Show a command, run it as printed with $TOUR put in, and show what it printed."""
        self.show.command(words, "The command")
        command = shlex.split(" ".join(words).replace("$TOUR", str(self.folder)))
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        printed = (done.stdout + done.stderr).replace(str(self.folder), "$TOUR").splitlines()
        self.show.block([*printed, f"(exit status {done.returncode})"])


def try_it(after: tuple[int, str] | None) -> str:
    """The label of a curl line: "Try it", and what it answers now when the step has changed the answer."""
    return "Try it" if after is None else f"Try it (run now, it answers {after[0]}: {after[1]})"


def curl(who: Identity, method: str, path: str, body: Any, body_file: str | None, output: str | None) -> list[str]:
    """The curl line that makes the same call, with $TOUR, $URL and $TOKEN set as the tour says."""
    words = ["curl", "-sS" if output else "-i", f"--cacert {CA_FILE}"]
    if who.certificate:
        certificate, key = who.certificate
        words += [f'--cert "$TOUR/{certificate}"', f'--key "$TOUR/{key}"']
    if method not in ("GET", "POST") or (method == "POST" and body is None and not body_file):
        words.append(f"-X {method}")
    if who.admin:
        words.append('-H "Authorization: Bearer $TOKEN"')
    if who.basic:
        words.append("-u " + shlex.quote(":".join(who.basic)))
    if body is not None:
        data = f'@"$TOUR/{body_file}"' if body_file else shlex.quote(json.dumps(body))
        words += ["-H 'Content-Type: application/json'", f"-d {data}"]
    elif body_file:
        words += [f"-H 'Content-Type: {EST_REQUEST}'", f'--data-binary @"$TOUR/{body_file}"']
    if output:
        words.append(f'-o "$TOUR/{output}"')
    # EST's paths are beside /api, not under it: ${URL%/api} is the server's root.
    return [*words, "$URL" + path.removeprefix("/api") if path.startswith("/api/") else "${URL%/api}" + path]


# --- The steps ---------------------------------------------------------------------

SENSOR_REQUEST = {
    "username": SENSOR,
    "password": SENSOR_PASSWORD,
    "roles": ["minimum"],
    "permissions": [{"resource": "sensors/0003/#", "operation": "write", "context": "mqtt"}],
    "context": "boiler room, line 2",
}
SENSOR_FILE, AGENT_FILE, CAMERA_FILE = "sensor/register.json", "agent/register.json", "camera/register.json"
NARROWER = [{"resource": "sensors/0003/temperature", "operation": "write", "context": "mqtt"}]
SENSOR_ID = Identity("Sensor")
SENSOR_BASIC = Identity("Sensor", basic=(SENSOR, SENSOR_PASSWORD))
AGENT_ID = Identity("Agent")
AGENT_TLS = Identity("Agent", certificate=("agent/cert.pem", "agent/key.pem"))
AGENT_RENEWED_TLS = Identity("Agent", certificate=("agent/renewed.pem", "agent/key.pem"))


def the_ca(tour: Tour) -> None:
    tour.show.step(
        "What the clients trust: the registry's CA",
        "On first start the registry made its own CA, and a server certificate signed by it. A device gets "
        "the CA certificate with its software (here curl's --cacert reads it from the registry's data "
        "folder) and checks the server with it; anyone may fetch it again.",
    )
    answer = tour.call(SENSOR_ID, "GET", "/api/client-registry/ca", expect=200, raw="PEM: the CA certificate, below")
    tour.certificate(answer.body.decode(), "CA certificate", pairing=False)
    tour.show.rules(
        {
            "CERT-5.1-CA-PUBLIC": "the CA certificate is served to anyone, without authentication.",
            "CERT-5.4-CA": "the CA is made on first start and kept; its key is readable by its owner alone.",
            "TLS-6.5-HTTPS": "the server speaks HTTPS, with a certificate from that CA.",
        }
    )


def locked(tour: Tour) -> None:
    tour.show.step(
        "The sensor asks while the registry is locked: 423",
        f"The sensor {SENSOR} asks for an account with its password, the role 'minimum' and the right to "
        "publish under sensors/0003/. Nobody has unlocked the registry yet.",
    )
    tour.call(SENSOR_ID, "POST", REGISTER, SENSOR_REQUEST, expect=423, body_file=SENSOR_FILE)
    tour.show.rules(
        {
            "LOCK-3.1": "the registry starts locked.",
            "REG-2.4-LOCKED": "a new request while it is locked is answered 423, and nothing is stored.",
            "REG-2.5-RETRY-AFTER": "a 423 says when to ask again: Retry-After, 30 seconds by default.",
        }
    )


def unlock(tour: Tour) -> None:
    tour.show.step(
        "The administrator unlocks the registry",
        f"The administrator opens the registry to new requests, here for an hour ({UNLOCK_MS} ms) so that "
        "--pause leaves time to read; without a body it opens for five minutes. The tour's administrator "
        f"token is fixed, '{ADMIN_TOKEN}'; a real server makes a random one and keeps it in its data folder.",
    )
    tour.call(ADMIN, "POST", "/api/client-registry/unlock", {"duration": UNLOCK_MS}, expect=200)
    tour.show.rules(
        {
            "ADMIN-4.1-TOKEN": "every administrator call carries 'Authorization: Bearer <token>'; without it, 401.",
            "LOCK-3.2": "unlocking opens the registry until now + the duration; then it locks by itself.",
        }
    )


def stored(tour: Tour) -> None:
    tour.show.step(
        "The sensor asks again: 202 and a pairing id",
        "The sensor sends the very same request. It is stored as pending; the sensor logs its pairing id, "
        "for the administrator to compare with the registry's list.",
    )
    tour.pending(tour.call(SENSOR_ID, "POST", REGISTER, SENSOR_REQUEST, expect=202, body_file=SENSOR_FILE), SENSOR)
    tour.show.rules(
        {
            "REG-2.4-STORE": "a well-formed new request while unlocked is stored as pending: 202.",
            "REG-2.5-PENDING-BODY": "the 202 names the request and its pairing id, derived from the "
            "credential: for a password, from its salted hash, so that it reveals nothing.",
            "REG-2.5-RETRY-AFTER": "a 202 says when to poll: 5 seconds by default.",
        }
    )


def agent_asks(tour: Tour) -> None:
    key = tour.make_agent_key()
    tour.agent_request = {
        "username": AGENT,
        "csr": client.make_csr(AGENT, key),
        "roles": ["minimum"],
        "permissions": [{"resource": "sensors/#", "operation": "read", "context": "mqtt"}],
    }
    tour.show.step(
        "The agent asks with a CSR: 202",
        f"The agent {AGENT} made an EC P-256 key ($TOUR/agent/key.pem) and a certificate signing request "
        "whose Common Name is its username, as client.py does, and asks to read everything under sensors/ "
        "(the body is in $TOUR/agent/register.json). Before it sends anything it can compute its pairing id "
        f"from its own key: {pairing_id(key.public_key())}.",
    )
    answer = tour.call(AGENT_ID, "POST", REGISTER, tour.agent_request, expect=202, body_file=AGENT_FILE)
    tour.pending(answer, AGENT)
    tour.show.rules(
        {
            "REG-2.2-CSR": "the CSR parses and its signature verifies: the agent holds the key.",
            "REG-2.2-CN": "its Common Name is exactly the username.",
            "REG-2.3-KEY": "the key is one the policy accepts (RSA 2048 bits or more, EC P-256 or P-384, Ed25519).",
            "REG-2.5-PENDING-BODY": "for a CSR, the pairing id is the first six hex digits of the SHA-256 of "
            "the public key.",
        }
    )


def poll(tour: Tour) -> None:
    tour.show.step(
        "The sensor polls",
        "To poll is to send the same request again. Nothing new is stored; the registry counts the poll.",
    )
    tour.call(SENSOR_ID, "POST", REGISTER, SENSOR_REQUEST, expect=202, body_file=SENSOR_FILE)
    tour.show.rules(
        {
            "REG-2.4-MATCH": "a request matches a stored one when the username, the credential and the "
            "requested rights are equal; the context does not count.",
            "REG-2.4-PENDING": "a matching pending request: 202 again; one that does not match would be 409.",
        }
    )


def compare(tour: Tour) -> None:
    tour.show.step(
        "The administrator lists the requests and compares pairing ids",
        "The administrator sees who asked for what, from where, how often it polled, and each pairing id, "
        "and compares each pairing id with the one the device logged (its screen, its log, a phone call).",
    )
    listing = tour.call(ADMIN, "GET", "/api/client-registry/requests", expect=200).json()
    for request in listing:
        name, listed = request["username"], request["pairingId"]
        logged = tour.pairing_ids[name]
        verdict = "the same device: approve" if listed == logged else "not the same device: do not approve"
        tour.show.say(f"{name}: the registry lists {listed}, the device logged {logged}; {verdict}.")
    tour.show.rules(
        {
            "ADMIN-4.2-CALLS": "the list holds every stored request: its state, pairing id, method, the "
            "rights asked for, context, times, poll count and address.",
            "ADMIN-4.6-LISTS": "a bare JSON array, oldest first.",
        }
    )


def approve(tour: Tour) -> None:
    tour.show.step(
        "The administrator approves: the agent as asked, the sensor narrowed",
        "Without a body, an approval grants what was asked for and signs the CSR. With a body, it grants "
        "what the body names: the sensor may publish to sensors/0003/temperature, not to all of "
        "sensors/0003/; the roles, left out of the body, are granted as asked.",
    )
    approved = (409, "not_pending, the request is approved already")
    tour.call(ADMIN, "POST", f"/api/client-registry/requests/{AGENT}/approve", expect=200, after=approved)
    narrower = {"permissions": NARROWER}
    approval = f"/api/client-registry/requests/{SENSOR}/approve"
    tour.call(ADMIN, "POST", approval, narrower, expect=200, body_file="sensor/approval.json", after=approved)
    tour.show.rules(
        {
            "ADMIN-4.2-CALLS": "approving creates the user, and signs the CSR.",
            "ADMIN-4.4-APPROVE-BODY": "a field the body leaves out is granted as requested.",
            "ADMIN-4.5-APPROVE-ATOMIC": "the user, the certificate and the request's new state are stored "
            "together, or nothing is.",
        }
    )


def admitted(tour: Tour) -> None:
    tour.show.step(
        "The next polls: 201, with the certificate",
        "The agent's next poll is answered 201 with what was granted, its certificate (which it keeps as "
        "$TOUR/agent/cert.pem) and the CA's. Asking again keeps answering 201 with the same certificate, so "
        "a lost answer can be fetched again.",
    )
    answer = tour.call(AGENT_ID, "POST", REGISTER, tour.agent_request, expect=201, body_file=AGENT_FILE)
    tour.certificate(answer.json()["certificate"], "certificate", save_as="agent/cert.pem")
    tour.show.say("The sensor's next poll: 201 with what it was granted, the narrower permission.")
    tour.call(SENSOR_ID, "POST", REGISTER, SENSOR_REQUEST, expect=201, body_file=SENSOR_FILE)
    tour.show.rules(
        {
            "REG-2.4-USER": "the user exists and the request matches the approved one: 201, again and again.",
            "REG-2.5-APPROVED-BODY": "the 201 holds what was granted and, for a CSR, the certificate and the CA.",
            "CERT-5.3-SUBJECT": "the subject is CN=username, and nothing of the CSR is kept but its key.",
            "CERT-5.3-BASIC-CONSTRAINTS": "not a CA, critical.",
            "CERT-5.3-EKU": "for TLS clients only (clientAuth).",
            "CERT-5.3-SERIAL": "a random serial.",
            "LIFE-7.1-TIMES": "valid from five minutes before signing for 365 days; renewAfter is two thirds "
            "of the way.",
        }
    )


def whoami(tour: Tour) -> None:
    tour.show.step(
        "Who am I: by password, and by mutual TLS",
        "The sensor signs in with HTTP Basic; the agent shows its certificate in the TLS handshake, with no "
        "password at all. Both learn what they were granted.",
    )
    tour.call(SENSOR_BASIC, "GET", "/api/auth/whoami", expect=200)
    tour.call(AGENT_TLS, "GET", "/api/auth/whoami", expect=200)
    tour.show.rules(
        {
            "AUTH-5.2-WHOAMI": "a registered client is told its name, roles, permissions and how it signed in; "
            "anyone else gets 401.",
        }
    )


def conflict(tour: Tour) -> None:
    tour.show.step(
        "A 409: the username is taken",
        f"Another device asks to be {SENSOR}, with another password. The request is well formed, but it "
        "does not match the one that was approved, so the name is taken. A device whose request did match "
        "would get its 201 again.",
    )
    tour.call(Identity("Other"), "POST", REGISTER, {"username": SENSOR, "password": "an0ther-pass"}, expect=409)
    tour.show.rules(
        {
            "REG-2.4-USER": "a user of that name exists and the request does not match its approved one: 409 "
            "username_taken.",
            "REG-2.4-MATCH": "a different password is a different credential.",
        }
    )


def policy(tour: Tour) -> None:
    tour.show.step(
        "A 422: against the policy",
        "A device asks with a four-character password and a role the registry does not have. Both are "
        "reported at once; nothing is stored, although the registry is open.",
    )
    against = {"username": "sensor-0005", "password": "1234", "roles": ["admin"]}
    tour.call(Identity("Other"), "POST", REGISTER, against, expect=422)
    tour.show.rules(
        {
            "REG-2-ORDER": "the policy (422) is checked before the registry's state: the lock, the stored requests.",
            "REG-2.3-PASSWORD": "a password has 5 to 1024 characters.",
            "REG-2.3-ROLE": "every role asked for is in the role catalog (by default only 'minimum').",
            "REG-2.5-ERRORS": "an error is JSON with a code and a sentence, and 'details' when several things "
            "are wrong.",
        }
    )


def est_enroll(tour: Tour) -> None:
    tour.show.step(
        "A PLC enrolls by EST, on the same pending list",
        "Routers and PLCs often ship an EST client (RFC 7030) instead of speaking this JSON. The PLC posts its "
        "CSR, base64 of the DER, to /.well-known/est/simpleenroll: a registration of the CSR's Common Name, "
        "with the same rules, the same pending list (marked as coming by EST) and the same approval.",
    )
    key = client.generate_key("ec")
    tour.show.mask.name(pairing_id(key.public_key()), f"<pairing id of {PLC}>")
    csr = x509.load_pem_x509_csr(client.make_csr(PLC, key).encode()).public_bytes(serialization.Encoding.DER)
    (tour.folder / "plc/csr.b64").write_bytes(base64.encodebytes(csr))
    sent = f"base64 of the DER of a CSR for CN={PLC} and an {key_description(key.public_key())} key"
    plc = Identity("Plc")
    tour.call(
        plc, "POST", EST_ENROLL, expect=202, body_file="plc/csr.b64", sent=sent,
        after=(200, "the certificate, since the administrator approved it"),
    )  # fmt: skip
    listed = next(r for r in tour.server.app.core.requests() if r["username"] == PLC)
    tour.show.say(
        f'The administrator\'s list shows it as any other, with "via": "{listed["via"]}", and approves it. '
        "The PLC, which slept its Retry-After, sends the same request again."
    )
    tour.call(
        ADMIN, "POST", f"/api/client-registry/requests/{PLC}/approve", expect=200,
        after=(409, "not_pending, the request is approved already"),
    )  # fmt: skip
    answer = tour.call(
        plc, "POST", EST_ENROLL, expect=200, body_file="plc/csr.b64", output="plc/cert.p7", sent=sent,
        raw="base64 of a certs-only PKCS#7 holding the certificate, below",
    )  # fmt: skip
    [certificate] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    tour.certificate(certificate.public_bytes(serialization.Encoding.PEM).decode(), "PLC's certificate")
    tour.show.rules(
        {
            "EST-10.3-ENROLL": "simpleenroll is a registration of username = the CSR's Common Name, in "
            "section 2's order; no HTTP authentication: the approval is the authorization.",
            "EST-10.3-OUTCOMES": "pending: 202 with Retry-After and the pairing id in words; approved: 200, "
            "a certs-only PKCS#7 with the certificate, again at every repeat.",
            "EST-10.4-VIA": 'the request is listed "via": "est", and decided as any other.',
        }
    )


def deny(tour: Tour) -> None:
    tour.show.step(
        "The administrator denies a request, and locks the registry",
        "A camera nobody expected asks to register. The administrator denies it, saying why, and locks "
        "the registry, since no more devices are expected.",
    )
    camera = {"username": CAMERA, "password": CAMERA_PASSWORD, "context": "found on the network"}
    asked = tour.call(
        Identity("Camera"), "POST", REGISTER, camera, expect=202, body_file=CAMERA_FILE,
        after=(403, "denied, with the reason, since the administrator denied it"),
    )  # fmt: skip
    tour.pending(asked, CAMERA)
    reason = {"reason": "not in the plant inventory"}
    denial = f"/api/client-registry/requests/{CAMERA}/deny"
    tour.call(ADMIN, "POST", denial, reason, expect=200, after=(409, "not_pending, the request is denied already"))
    tour.call(ADMIN, "POST", "/api/client-registry/lock", expect=200)
    tour.show.say("The camera polls, as it does until it is answered otherwise: the lock does not stop a poll.")
    tour.call(Identity("Camera"), "POST", REGISTER, camera, expect=403, body_file=CAMERA_FILE)
    tour.show.rules(
        {
            "ADMIN-4.2-CALLS": "a denial may carry a reason.",
            "LOCK-3.3": "locking closes the registry at once.",
            "REG-2.5-LOCK-SCOPE": "the lock keeps out new requests only; polls and decisions go on.",
            "REG-2.4-DENIED": "a request that matches a denied one is answered 403 with the administrator's "
            "reason, until retention forgets it.",
        }
    )


def renew(tour: Tour) -> None:
    tour.show.step(
        "The agent renews its certificate over mutual TLS",
        "A device lives longer than its certificate. From its renewAfter on, the agent sends a new CSR for "
        "its key (or for a new key, to re-key), authenticated by the certificate it holds; no administrator "
        "is involved, and the registry may be locked.",
    )
    body = {"csr": client.make_csr(AGENT, tour.agent_key)}
    answer = tour.call(AGENT_TLS, "POST", "/api/client-registry/renew", body, expect=201, body_file="agent/renew.json")
    tour.certificate(answer.json()["certificate"], "renewed certificate", save_as="agent/renewed.pem")
    tour.show.rules(
        {
            "LIFE-7.2-RENEW": "over mutual TLS, with a current certificate of this registry: 201 with a new "
            "certificate for the same rights; the previous one stays valid until it expires.",
            "LIFE-7.1-TIMES": "the answer carries notAfter and renewAfter.",
        }
    )


def delete(tour: Tour) -> None:
    tour.show.step(
        "The administrator deletes the agent: its certificates are revoked",
        "The agent leaves the plant. Deleting its user revokes every certificate it was issued and signs a "
        "new CRL; its certificate no longer signs in.",
    )
    tour.call(ADMIN, "DELETE", f"/api/users/{AGENT}", expect=200, after=(404, "not_found, the user is gone already"))
    tour.call(AGENT_RENEWED_TLS, "GET", "/api/auth/whoami", expect=401)
    tour.show.rules(
        {
            "ADMIN-4.2-CALLS": "deleting a user removes it with its request: the name may register again.",
            "LIFE-7.3-REVOKE": "its certificates are revoked (cessationOfOperation) and authenticate nothing.",
        }
    )


def crl(tour: Tour) -> None:
    tour.show.step(
        "The CRL: who else learns of the revocation",
        "An MQTT broker or a reverse proxy that trusts the registry's CA fetches its certificate "
        "revocation list, in DER or PEM, without authentication.",
    )
    party = Identity("Party")
    tour.call(party, "GET", "/api/client-registry/crl", expect=200, output="crl.der", raw="DER: the CRL, below")
    tour.show.block(crl_lines(x509.load_der_x509_crl((tour.folder / "crl.der").read_bytes()), tour.show.mask.serials))
    tour.call(party, "GET", "/api/client-registry/crl.pem", expect=200, output="crl.pem", raw="PEM: the same CRL")
    tour.show.rules(
        {
            "LIFE-7.4-CRL": "an X.509 v2 CRL signed by the CA: a growing number, thisUpdate, nextUpdate 7 "
            "days later, and each revoked certificate with its time and reason.",
            "LIFE-7.5-CRL-FRESH": "a new CRL is signed at each revocation, and before half its validity is gone.",
        }
    )


def openssl(tour: Tour) -> None:
    tour.show.step(
        "openssl agrees",
        "The agent's certificates still chain to the CA: without the CRL, openssl finds nothing wrong. "
        "With it (-crl_check), both are refused as revoked.",
    )
    tour.show.message("Note over Party: openssl verify -crl_check: revoked")
    if shutil.which("openssl") is None:
        tour.show.say("openssl is not installed here, so the tour skips this step (apt-get install openssl).")
        return
    tour.run(["openssl verify", f"-CAfile {CA_FILE}", '"$TOUR/agent/cert.pem"'])
    crl_file, certificates = '-CRLfile "$TOUR/crl.pem"', ['"$TOUR/agent/cert.pem"', '"$TOUR/agent/renewed.pem"']
    tour.run(["openssl verify -crl_check", f"-CAfile {CA_FILE}", crl_file, *certificates])
    tour.show.rules({"LIFE-7.5-CRL-FRESH": "openssl verify -crl_check accepts the registry's CRL."})


STEPS: list[Callable[[Tour], None]] = [
    the_ca,
    locked,
    unlock,
    stored,
    agent_asks,
    poll,
    compare,
    approve,
    admitted,
    whoami,
    conflict,
    policy,
    est_enroll,
    deny,
    renew,
    delete,
    crl,
    openssl,
]


# --- The command line ---------------------------------------------------------------

TITLE = "A tour of the registry"
INTRODUCTION = (
    "Generated by `python3 tour.py --markdown docs/tour.md` from a run of [tour.py](../tour.py) against "
    "the real server: edit tour.py, not this file (test_tour.py fails when the two differ). What changes "
    "from run to run is masked: times, the port, the temporary folder, pairing ids and serials. Each step "
    "names the rules of [SPEC.md](../SPEC.md) that decide its answer.\n"
)


class Pause:
    """Waits for Enter between steps when asked to, and when there is a terminal to wait on."""

    def __init__(self, wanted: bool) -> None:
        self.waiting = wanted and sys.stdin.isatty()
        if wanted and not self.waiting:
            print("--pause is ignored: standard input is not a terminal.")

    def __call__(self, prompt: str) -> None:
        """Wait for Enter, showing ``prompt``; Ctrl-D stops the waiting."""
        if self.waiting:
            try:
                input(f"\n  [{prompt}] ")
            except EOFError:  # Ctrl-D: run to the end without waiting
                self.waiting = False


def opening(tour: Tour) -> None:
    """Where the server runs, and how to follow along with curl."""
    show = tour.show
    show.say(
        f"A sensor with a password ({SENSOR}) and an agent with a CSR ({AGENT}) go from a locked registry to "
        f"a revoked certificate. The registry runs at https://127.0.0.1:{tour.port} with its data in "
        "$TOUR/registry; the clients' files are in $TOUR. To try the curl lines while it runs (tour.py "
        "--pause waits between steps), set these in another shell:"
    )
    show.command([f"TOUR={tour.folder}", f"URL={tour.url}", f"TOKEN={ADMIN_TOKEN}"], "Set-up")


def walk(tour: Tour, pause: Callable[[str], None]) -> None:
    """The opening and every step, pausing after each."""
    opening(tour)
    pause("Enter: the first step")
    for step in STEPS:
        step(tour)
        pause("Enter: the next step" if step is not STEPS[-1] else "Enter: stop the server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --pause and --markdown FILE."""
    parser = argparse.ArgumentParser(description="A narrated tour of the client registry over real HTTPS.")
    parser.add_argument("--pause", action="store_true", help="wait for Enter between steps (on a terminal)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the transcript as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the server, walk the steps, stop it; the temporary folder goes with it."""
    args = parse_args(argv)
    pause = Pause(args.pause)
    show = Transcript(Masker())
    with tempfile.TemporaryDirectory(prefix="tour-") as name:
        tour = Tour(Path(name), show)
        try:
            walk(tour, pause)
        except KeyboardInterrupt:
            sys.exit("\ntour.py: interrupted; the server has stopped")
        except TourError as error:
            sys.exit(f"\ntour.py: step {show.steps}: {error}")
        finally:
            tour.stop()
    print("\nThe server has stopped, and its temporary folder is gone.")
    if args.markdown:
        args.markdown.write_text(show.document(TITLE, INTRODUCTION))
        print(f"Wrote {args.markdown}.")


if __name__ == "__main__":
    main()

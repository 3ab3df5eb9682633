"""How fast the registry answers, beside the ceiling of ``http.server`` itself.

Run ``python3 bench.py`` (under two minutes on two cores) for the table,
``--json FILE`` to keep the numbers too, ``--quick`` for a smoke run of a few
seconds, ``--profile DIR`` for cProfile reports of the server under load.

What is measured, in one run, on loopback, with HTTP/1.1 keep-alive:

a) the ceiling: a bare ``http.server`` handler that reads the body and answers
   a fixed 202 JSON body, over HTTP and over HTTPS;
b) polls of a pending password request through ``server.py`` (HTTP, HTTPS);
c) polls of a pool of pending CSR requests (HTTP);
d) the latency of one client polling back to back, with 10 users in the
   database and with 100,000 users and 10,000 pending requests;
e) CSR approvals through the administrator's API (approve, sign, store),
   reported in approvals per second without a bound: an approval is decided
   by a person, one at a time, and its speed does not matter next to its
   correctness;
f) the peak resident memory (VmHWM) of the server of d) with 100,000 users;
g) the administrator's ``GET /api/client-registry`` latency while 8
   connections send wrong passwords for many pending requests, right after
   a restart (so nothing is remembered): each guess costs scrypt, which must
   run outside the registry's lock (SPEC SAFE-6.6-SLOW-WORK).

The issue's targets (the polls of b), c) and d), the memory of f), the
administrator's latency of g)) are
printed beside the numbers, each marked PASS or FAIL; e) has none. The run
exits 0 whatever they say, and 1 only when something broke (a server that
did not start, an answer with the wrong status).

How, and why so:

- Every server runs in a process of its own (``python3 -c`` with a bootstrap
  that calls ``server.build`` and prints the port it bound), and the load
  comes from worker *processes*, so that the client does not share the
  server's GIL. Each worker holds a few keep-alive connections, one thread
  each, and sends pre-built request bytes over a raw socket, parsing only the
  status line and ``Content-Length``: a client far lighter than the server.
  The table shows the CPU each side used, so a client-bound run shows.
- The ceiling's handler buffers its answer (``wbufsize``), so that the
  headers and the body leave in one segment: unbuffered, as ``http.server``
  has it by default, the body waits for the client's delayed ACK.
- Throughputs are closed loops: each connection sends its next request when
  the last answer is in. The runs alternate (a, b, c, a, b, c ...; d small,
  d large, ...) and the best of the rounds is kept, so that a noisy
  neighbour hurts all alike; e) has as many rounds, each on fresh requests.
- The registry runs with its real settings (scrypt at its default cost,
  logging at INFO to a file); the 100,000 users are seeded straight into
  SQLite (see ``seed``), since registering them through the API would take
  minutes. Only password requests are seeded, and the copies take their
  columns from ``PRAGMA table_info``: the seeding does not depend on how a
  CSR request's key is stored.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import pstats
import random
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ca as ca_module
import registry
import server

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
REGISTER = "/api/client-registry/register"
# The servers run from this file: ``serve`` reads the rest of the command line.
BOOTSTRAP = "import sys, bench; bench.serve(sys.argv[1:])"
# Seeded password hashes are cheap to make; the server itself keeps its
# default cost for every request that comes over the wire.
SEED_SCRYPT_N = 2
# How many seeded users and requests go through ``Registry`` itself; the
# rest are copies of the last of them (see ``seed``).
SEED_THROUGH_REGISTRY = 10
SOCKET_TIMEOUT = 30.0
ONCE_TIMEOUT = 60.0  # the most a worker spends sending its share of a list of requests once
MAX_HEADER = 64 * 1024
MAX_REQUESTS_PER_CONNECTION = 2_000_000
ERRORS_KEPT = 5
WARMUP_SECONDS = 0.5  # the most a connection spends warming up, whatever its count


@dataclass(frozen=True)
class Scale:
    """How long and how big: the full run, or the smoke run of ``--quick``."""

    duration: float  # seconds of each throughput run
    rounds: int  # each kind of run alternates with the others this many times; the best is kept
    warmup: int  # requests per connection before the clock starts
    csr_pool: int  # distinct pending CSR requests polled in c)
    approvals: int  # CSR requests approved in e)
    latency_duration: float  # seconds of each latency run of d)
    small_users: int
    large_users: int
    large_pending: int
    guessed: int  # pending password requests in g), each guessed at 4 times (under the throttle's 5)


FULL = Scale(2.0, 3, 50, 200, 300, 1.5, 10, 100_000, 10_000, 150)
QUICK = Scale(0.3, 1, 5, 20, 20, 0.3, 10, 1_000, 100, 10)
GUESSES_PER_USER = 4  # wrong passwords per pending request in g): each is checked (409), none throttled (429)
GUESSING_CONNECTIONS = (2, 4)  # g)'s load: worker processes x connections each


# --- The client: raw keep-alive HTTP/1.1 over a socket ---------------------


def build_request(method: str, path: str, body: object = None, *, token: str | None = None) -> bytes:
    """The bytes of one request, built once and sent many times."""
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(payload)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive connection that sends requests and reads answers by their Content-Length."""

    def __init__(self, port: int, tls_ca: str | None) -> None:
        self.port, self.tls_ca = port, tls_ca
        self.sock = self._connect()
        self.buffer = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=SOCKET_TIMEOUT)
        # A request leaves in one segment: do not let Nagle hold it back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_ca is None:
            return sock
        context = ssl.create_default_context(cadata=self.tls_ca)
        return context.wrap_socket(sock, server_hostname=HOST)

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; the status and body of the answer."""
        self.sock.sendall(request)
        end = self.buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(self.buffer) > MAX_HEADER:
                raise ConnectionError("the answer's header has no end")
            self._fill()
            end = self.buffer.find(b"\r\n\r\n")
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length, close = 0, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                close = value.strip().lower() == "close"
        total = end + 4 + length
        while len(self.buffer) < total:
            self._fill()
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        if close:
            self.reopen()
        return status, body

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def reopen(self) -> None:
        self.close()
        self.sock = self._connect()
        self.buffer.clear()

    def close(self) -> None:
        self.sock.close()


# --- The load generator: worker processes, a few connections each ----------


@dataclass(frozen=True)
class Job:
    """What one worker process sends, over how many connections, for how long."""

    port: int
    tls_ca: str | None
    requests: tuple[bytes, ...]
    expect: int
    connections: int
    once: bool  # each request once (spread over the connections), or cycle until time is up
    duration: float
    warmup: int
    first: int  # this worker's first connection number, to spread where the cycles start


@dataclass
class WorkerResult:
    """What one worker saw."""

    requests: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0


def worker_main(pipe: Any) -> None:
    """A load worker: run each job the parent sends until it sends None.

    A job is a ``Job``, or a ``(function, argument)`` pair: between runs the
    workers also lend their processes to the seeding.
    """
    while (job := pipe.recv()) is not None:
        try:
            if isinstance(job, Job):
                pipe.send(_run_job(job, pipe))
            else:
                function, argument = job
                pipe.send(function(argument))
        except Exception:
            pipe.send(traceback.format_exc())


def _run_job(job: Job, pipe: Any) -> WorkerResult:
    slices = [job.requests[i :: job.connections] for i in range(job.connections)] if job.once else None
    ready = threading.Barrier(job.connections + 1, timeout=SOCKET_TIMEOUT * 2)
    go = threading.Event()
    clock: dict[str, float] = {}
    results = [WorkerResult() for _ in range(job.connections)]
    failures: list[str] = []

    def drive(index: int) -> None:
        mine = slices[index] if slices is not None else job.requests
        start = (job.first + index) % max(1, len(mine))
        connection = None
        try:
            if mine:
                connection = Connection(job.port, job.tls_ca)
                warm_until = time.perf_counter() + WARMUP_SECONDS
                for n in range(0 if job.once else job.warmup):
                    connection.exchange(mine[(start + n) % len(mine)])
                    if time.perf_counter() > warm_until:
                        break
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")
            ready.abort()
            return
        try:
            ready.wait()
            go.wait()
            if connection is not None:
                _drive(connection, mine, start, job, clock["deadline"], results[index])
        finally:
            if connection is not None:
                connection.close()

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(job.connections)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        raise ConnectionError(f"a connection failed before the run: {failures}") from None
    pipe.send("ready")
    pipe.recv()
    started, cpu = time.perf_counter(), time.process_time()
    clock["deadline"] = started + (ONCE_TIMEOUT if job.once else job.duration)
    go.set()
    for thread in threads:
        thread.join(ONCE_TIMEOUT + SOCKET_TIMEOUT)
    total = WorkerResult(seconds=time.perf_counter() - started, cpu=time.process_time() - cpu)
    for result in results:
        total.requests += result.requests
        total.latencies += result.latencies
        total.errors += result.errors[: ERRORS_KEPT - len(total.errors)]
        total.error_count += result.error_count
    if any(thread.is_alive() for thread in threads):
        total.error_count += 1
        total.errors.append("a connection did not finish in time")
    return total


def _drive(
    connection: Connection, mine: Sequence[bytes], start: int, job: Job, deadline: float, out: WorkerResult
) -> None:
    """Send requests back to back: each of ``mine`` once, or in a cycle until the deadline."""
    count = len(mine) if job.once else MAX_REQUESTS_PER_CONNECTION
    now = time.perf_counter()
    for n in range(count):
        if now >= deadline:
            break
        try:
            status, body = connection.exchange(mine[(start + n) % len(mine)])
        except (OSError, ValueError) as error:
            out.error_count += 1
            out.errors.append(f"{type(error).__name__}: {error}")
            return
        done = time.perf_counter()
        out.latencies.append(done - now)
        now = done
        out.requests += 1
        if status != job.expect:
            out.error_count += 1
            if len(out.errors) < ERRORS_KEPT:
                out.errors.append(f"{status} (expected {job.expect}): {body[:200].decode(errors='replace')}")
    if job.once and out.requests < len(mine):
        out.error_count += 1
        out.errors.append(f"only {out.requests} of {len(mine)} requests were answered in {ONCE_TIMEOUT:g} s")


@dataclass
class Load:
    """One measured run: what all workers did, and the CPU each side used."""

    requests: int
    seconds: float
    latencies: list[float]
    client_cpu: float
    server_cpu: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "requests_per_second": round(self.per_second, 1),
            "p50_ms": round(self.percentile(0.50) * 1000, 3),
            "p99_ms": round(self.percentile(0.99) * 1000, 3),
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            # Cores busy: 1.0 is one core for the whole run.
            "server_cpu": round(self.server_cpu / self.seconds, 3) if self.seconds else 0.0,
            "client_cpu": round(self.client_cpu / self.seconds, 3) if self.seconds else 0.0,
        }


class BenchError(Exception):
    """Something broke: the run cannot be trusted."""


class LoadGenerator:
    """Worker processes that stay up for the whole run, taking one job after another."""

    def __init__(self, workers: int, connections: int) -> None:
        self.connections = connections
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child,), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def run(
        self,
        target: ServerProcess,
        requests: Sequence[bytes],
        *,
        expect: int,
        once: bool = False,
        duration: float = 0.0,
        warmup: int = 0,
        workers: int | None = None,
        connections: int | None = None,
    ) -> Load:
        """Send ``requests`` to ``target`` from every worker; ``BenchError`` on a wrong answer."""
        pipes = self.pipes[: workers or len(self.pipes)]
        per_worker = connections or self.connections
        for k, pipe in enumerate(pipes):
            mine = tuple(requests[k :: len(pipes)]) if once else tuple(requests)
            pipe.send(Job(target.port, target.tls_ca, mine, expect, per_worker, once, duration, warmup, k * per_worker))
        for pipe in pipes:
            self._receive(pipe, "ready")
        server_cpu = target.cpu_seconds()
        for pipe in pipes:
            pipe.send("go")
        results = [self._receive(pipe, WorkerResult) for pipe in pipes]
        server_cpu = target.cpu_seconds() - server_cpu
        errors = [error for result in results for error in result.errors]
        if sum(result.error_count for result in results):
            raise BenchError(f"{sum(r.error_count for r in results)} wrong answers from {target.name}: {errors}")
        seconds = max(result.seconds for result in results)
        if not once:
            # Each worker ran for the same span; its requests over its own clock.
            seconds = sum(r.seconds for r in results) / len(results)
        return Load(
            requests=sum(result.requests for result in results),
            seconds=seconds,
            latencies=[latency for result in results for latency in result.latencies],
            client_cpu=sum(result.cpu for result in results),
            server_cpu=server_cpu,
        )

    def map(self, function: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
        """``function`` over slices of ``items`` in the workers, side by side; the results in order."""
        size = -(-len(items) // len(self.pipes))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for pipe, chunk in zip(self.pipes, chunks, strict=False):
            pipe.send((function, chunk))
        return [item for pipe, _ in zip(self.pipes, chunks, strict=False) for item in self._receive(pipe, list)]

    def _receive(self, pipe: Any, expected: object) -> Any:
        if not pipe.poll(ONCE_TIMEOUT + SOCKET_TIMEOUT * 2):
            raise BenchError("a load worker did not answer in time")
        message = pipe.recv()
        if isinstance(message, str) and message != expected:
            raise BenchError(f"a load worker failed:\n{message}")
        return message

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()


# --- The servers, each in a process of its own -----------------------------

PENDING_BODY = json.dumps({"status": "pending", "username": "sensor-0001", "pairingId": "4f1c2a"}).encode()


class BareHandler(BaseHTTPRequestHandler):
    """The ceiling: read the request's body, answer a fixed 202, framed as server.py frames it."""

    protocol_version = "HTTP/1.1"
    # A buffered wfile (StreamRequestHandler.wbufsize) sends the headers and
    # the body in one segment when the request is done. Unbuffered, as by
    # default, the body is a second small segment that Nagle's algorithm
    # holds until the client's delayed ACK (RFC 1122 section 4.2.3.2, up to
    # 40 ms on Linux): a keep-alive client then gets 25 answers a second.
    wbufsize = -1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response_only(HTTPStatus.ACCEPTED)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(PENDING_BODY)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Retry-After", "5")
        self.end_headers()
        self.wfile.write(PENDING_BODY)

    def log_message(self, format: str, *args: object) -> None:
        """Silent, as a ceiling should be."""


class BareServer(ThreadingHTTPServer):
    """The same kind of server as ``server.RegistryServer``: a thread per connection, TLS in that thread."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        super().__init__((HOST, 0), BareHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)


def serve(argv: list[str]) -> None:
    """The bootstrap of a server process: bind port 0, print the port, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="bench.py serve")
    parser.add_argument("kind", choices=["bare", "registry"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--admin-token")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "registry":
        config = server.Config(host=HOST, port=0, data_dir=args.data_dir, http=args.http, admin_token=args.admin_token)
        # As server.main does: one INFO line per request, here into the log file.
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
        httpd: ThreadingHTTPServer = server.build(config)
    else:
        tls = None
        if not args.http:
            # The registry's own TLS context, with the certificate its CA made for it.
            now = datetime.now(UTC)
            authority = ca_module.CA.load_or_create(args.data_dir, now)
            tls = server.tls_context(authority, args.data_dir, HOST, now)
        httpd = BareServer(tls)
    profiles = _profile_connections(httpd) if args.profile else None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown).start())
    print(json.dumps({"port": httpd.server_address[1]}), flush=True)
    httpd.serve_forever()
    httpd.server_close()
    if isinstance(httpd, server.RegistryServer):
        httpd.app.core.close()
    if profiles is not None:
        _dump_profiles(profiles, args.profile)


def _profile_connections(httpd: ThreadingHTTPServer) -> list[cProfile.Profile]:
    """Profile each connection's thread: cProfile sees only the thread it is enabled in."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    handle = httpd.process_request_thread

    def profiled(request: Any, client_address: Any) -> None:
        # CPU time of this thread, not wall time: a thread that waits for
        # its client's next request is not busy.
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            handle(request, client_address)
        finally:
            profile.disable()
            with lock:
                profiles.append(profile)

    httpd.process_request_thread = profiled  # type: ignore[method-assign]
    return profiles


def _dump_profiles(profiles: list[cProfile.Profile], path: Path) -> None:
    # The connection threads end as their clients hang up, which the bench
    # did before asking the server to stop; wait for the last ones a little.
    deadline = time.monotonic() + 5
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    if profiles:
        pstats.Stats(*profiles).dump_stats(path)


class ServerProcess:
    """A server started through ``BOOTSTRAP``; knows its port, its CPU time and its peak memory."""

    def __init__(
        self,
        name: str,
        kind: str,
        data_dir: Path,
        *,
        http: bool,
        token: str = "",
        profile: Path | None = None,
    ) -> None:
        self.name = name
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [sys.executable, "-c", BOOTSTRAP, kind, "--data-dir", str(data_dir)]
        command += ["--http"] * http + [f"--admin-token={token}"] * bool(token)
        command += ["--profile", str(profile)] * bool(profile)
        self.log_path = data_dir / f"{kind}-server.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=log)
        self.data_dir, self.http, self.token = data_dir, http, token
        self.port = 0
        self.tls_ca: str | None = None

    def wait(self) -> ServerProcess:
        """Wait for the port the server bound; ``BenchError`` if it does not come."""
        if not self.port:
            ready, _, _ = select.select([self.process.stdout], [], [], 60)
            line = self.process.stdout.readline() if ready else b""
            if not line:
                self.stop()
                raise BenchError(f"{self.name} did not start; see {self.log_path}:\n{self._log_tail()}")
            self.port = json.loads(line)["port"]
            self.tls_ca = None if self.http else (self.data_dir / "ca.pem").read_text()
        return self

    def cpu_seconds(self) -> float:
        """User and system time so far (proc(5): fields 14 and 15 of /proc/PID/stat)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_memory(self) -> int:
        """The peak resident set size in bytes (VmHWM of /proc/PID/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise BenchError("no VmHWM in /proc: this needs Linux")

    def call(self, method: str, path: str, body: object = None, *, expect: int = 200) -> Any:
        """One administrator call over a connection of its own; the JSON answer."""
        connection = Connection(self.port, self.tls_ca)
        try:
            status, answer = connection.exchange(build_request(method, path, body, token=self.token))
        finally:
            connection.close()
        if status != expect:
            raise BenchError(f"{method} {path} on {self.name}: {status} (expected {expect}): {answer[:300]!r}")
        return json.loads(answer)

    def signal_stop(self) -> None:
        """Ask the server to stop: the bootstrap shuts it down and writes its profile."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process.stdout.closed:
            return
        if self.process.poll() is None:
            self.signal_stop()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process.stdout.close()

    def _log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


# --- What the clients send ---------------------------------------------------

RIGHTS = {"roles": ["minimum"], "permissions": [{"resource": "telemetry/+", "operation": "write", "context": "mqtt"}]}


def password_of(username: str) -> str:
    return f"{username}-secret"


def password_request(username: str) -> dict[str, Any]:
    return {"username": username, "password": password_of(username), **RIGHTS}


def csr_request(username: str, csr: str) -> dict[str, Any]:
    return {"username": username, "csr": csr, **RIGHTS}


def make_csr(username: str) -> str:
    """A PEM CSR for ``username`` with a fresh EC P-256 key, as most fleets' agents make them."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


def polls(requests: Iterable[dict[str, Any]]) -> list[bytes]:
    return [build_request("POST", REGISTER, request) for request in requests]


# --- Seeding a large registry ------------------------------------------------


def hash_passwords(passwords: list[str]) -> list[str]:
    """Each password hashed as the registry hashes it, at the seeding cost."""
    return [registry.hash_password(password, SEED_SCRYPT_N) for password in passwords]


def seed(
    data_dir: Path, users: int, pending: int, hasher: Callable[[list[str]], list[str]] = hash_passwords
) -> list[str]:
    """A registry database with ``users`` users and ``pending`` pending requests; the pending names.

    The first few users and requests go through ``registry.Registry`` (with
    cheap scrypt); the rest are copies of the last of them, renamed, each
    with its own password hash and pairing id, made as the registry makes
    them. So every row is one the registry would have stored, and the
    seeding takes seconds instead of minutes.
    """
    data_dir.mkdir(mode=0o700, parents=True)
    path = data_dir / "registry.db"
    user_names = [f"user-{i:06d}" for i in range(users)]
    pending_names = [f"pend-{i:06d}" for i in range(pending)]
    core = registry.Registry(
        str(path), clock=lambda: datetime.now(UTC), settings=registry.Settings(scrypt_n=SEED_SCRYPT_N)
    )
    try:
        core.unlock()
        for name in user_names[:SEED_THROUGH_REGISTRY]:
            core.register(password_request(name), HOST)
            core.approve(name)
        for name in pending_names[:SEED_THROUGH_REGISTRY]:
            core.register(password_request(name), HOST)
        core.lock()
    finally:
        core.close()
    database = sqlite3.connect(path, isolation_level=None)
    try:
        # Only this connection, which writes what a crash may lose, skips the syncs.
        database.execute("PRAGMA synchronous=OFF")
        database.execute("BEGIN")
        for names in (user_names, pending_names):
            if len(names) > SEED_THROUGH_REGISTRY:
                copies = names[SEED_THROUGH_REGISTRY:]
                hashes = hasher([password_of(name) for name in copies])
                _copy_rows(database, names[SEED_THROUGH_REGISTRY - 1], copies, hashes)
        database.execute("COMMIT")
    finally:
        database.close()
    return pending_names


def _copy_rows(database: Any, template: str, names: Sequence[str], hashes: Sequence[str]) -> None:
    """Copy every row that names ``template``, once per name, with that name's password hash."""
    stored_hash, pairing_id = database.execute(
        "SELECT password_hash, pairing_id FROM requests WHERE username = ?", (template,)
    ).fetchone()
    if _pairing_id(stored_hash) != pairing_id:
        raise BenchError("the registry derives pairing ids in a new way: update bench._pairing_id")
    tables = [row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    recipes = []
    for table in tables:
        columns = database.execute(f"PRAGMA table_info({table})").fetchall()
        if "username" not in {column[1] for column in columns}:
            continue
        # An INTEGER PRIMARY KEY is the rowid: SQLite numbers the copies.
        kept = [column[1] for column in columns if not (column[5] and column[2].upper() == "INTEGER")]
        rows = database.execute(
            f"SELECT {', '.join(kept)} FROM {table} WHERE username = ? ORDER BY rowid", (template,)
        ).fetchall()
        insert = f"INSERT INTO {table} ({', '.join(kept)}) VALUES ({', '.join('?' * len(kept))})"
        recipes.append((insert, rows))
    keys = (template, stored_hash, pairing_id)
    copies: list[list[tuple[Any, ...]]] = [[] for _ in recipes]
    for name, new_hash in zip(names, hashes, strict=True):
        swap = dict(zip(keys, (name, new_hash, _pairing_id(new_hash)), strict=True))
        # Inside JSON text (the audit's details), the values are quoted.
        quoted = [(json.dumps(old), json.dumps(new)) for old, new in swap.items()]
        for (_, rows), out in zip(recipes, copies, strict=True):
            for row in rows:
                copy = list(row)
                for i in _varying(row, keys):
                    copy[i] = _swap(row[i], swap, quoted)
                out.append(tuple(copy))
    for (insert, _), rows in zip(recipes, copies, strict=True):
        database.executemany(insert, rows)


@functools.cache
def _varying(row: tuple[Any, ...], keys: tuple[str, ...]) -> tuple[int, ...]:
    """The columns of a template row that hold its name, hash or pairing id: the rest is copied as is."""
    return tuple(i for i, value in enumerate(row) if isinstance(value, str) and any(key in value for key in keys))


def _pairing_id(password_hash: str) -> str:
    """README, "The pairing id": of a password request, the SHA-256 of its salted hash."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:6]


def _swap(value: str, swap: dict[str, str], quoted: list[tuple[str, str]]) -> str:
    """``value`` with the template's name, hash and pairing id replaced, also inside JSON text."""
    if value in swap:
        return swap[value]
    if value.startswith(("{", "[")):
        for old, new in quoted:
            value = value.replace(old, new)
    return value


# --- The run ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the issue: a measured ratio or size against its bound."""

    name: str
    value: float
    bound: float
    at_least: bool  # the value must be >= bound; else < bound

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value < self.bound

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pass": self.passed}


class Bench:
    """The whole run: servers, load, and what came out."""

    def __init__(self, scale: Scale, load: LoadGenerator, stack: ExitStack, work: Path) -> None:
        self.scale, self.load, self.stack, self.work = scale, load, stack, work
        self.token = secrets.token_urlsafe(24)
        self.results: dict[str, dict[str, float]] = {}
        self.servers: list[ServerProcess] = []
        self.approver: ServerProcess | None = None

    def launch(self, name: str, kind: str, folder: str, *, http: bool, profile: Path | None = None) -> ServerProcess:
        """Start a server process; its ``wait`` gives its port. Servers start side by side."""
        process = ServerProcess(name, kind, self.work / folder, http=http, token=self.token, profile=profile)
        self.stack.callback(process.stop)
        self.servers.append(process)
        return process

    def stop_servers(self) -> None:
        """Stop every server started so far, all at once (each takes up to half a second)."""
        for process in self.servers:
            process.signal_stop()
        for process in self.servers:
            process.stop()
        self.servers.clear()

    def throughput(self) -> None:
        """a), b) and c), alternating, best of the rounds; the server of e) starts meanwhile."""
        registry_http = self.launch("registry over HTTP", "registry", "registry-http", http=True)
        registry_https = self.launch("registry over HTTPS", "registry", "registry-https", http=False)
        bare_http = self.launch("bare server over HTTP", "bare", "bare-http", http=True)
        self.approver = self.launch("registry for approvals", "registry", "registry-approvals", http=True)
        # The bare HTTPS server takes the certificate the registry's CA made for
        # the registry's server: the same key type, chain and TLS settings.
        registry_https.wait()
        bare_https = self.launch("bare server over HTTPS", "bare", "registry-https", http=False)
        poll = polls([password_request("sensor-0001")])
        for target in (registry_http, registry_https):
            self.register(target.wait(), poll)
        csr_polls = self.register(registry_http, self.csr_requests("agent", self.scale.csr_pool))
        runs = [
            ("a_http", bare_http.wait(), poll),
            ("b_http", registry_http, poll),
            ("c_http", registry_http, csr_polls),
            ("a_https", bare_https.wait(), poll),
            ("b_https", registry_https, poll),
        ]
        for _ in range(self.scale.rounds):
            for key, target, requests in runs:
                self.keep_best(key, self.poll_load(target, requests).summary())

    def csr_requests(self, prefix: str, count: int) -> list[tuple[str, str]]:
        """``count`` usernames, each with a CSR of its own."""
        names = [f"{prefix}-{i:05d}" for i in range(count)]
        return [(name, make_csr(name)) for name in names]

    def register(self, target: ServerProcess, requests: Sequence[bytes] | list[tuple[str, str]]) -> list[bytes]:
        """Unlock ``target`` and store each request (password polls, or (name, CSR) pairs) as pending."""
        if requests and isinstance(requests[0], tuple):
            requests = polls(csr_request(name, csr) for name, csr in requests)
        target.call("POST", "/api/client-registry/unlock")
        self.load.run(target, requests, expect=HTTPStatus.ACCEPTED, once=True)
        return list(requests)

    def poll_load(self, target: ServerProcess, requests: Sequence[bytes]) -> Load:
        return self.load.run(
            target, requests, expect=HTTPStatus.ACCEPTED, duration=self.scale.duration, warmup=self.scale.warmup
        )

    def approve(self, target: ServerProcess, names: Iterable[str]) -> Load:
        path = "/api/client-registry/requests/{}/approve"
        decisions = [build_request("POST", path.format(name), token=self.token) for name in names]
        return self.load.run(target, decisions, expect=HTTPStatus.OK, once=True)

    def keep_best(self, key: str, summary: dict[str, float], metric: str = "requests_per_second") -> None:
        """Keep the round with the highest ``metric`` (the lowest, for a latency): the least disturbed."""
        kept = self.results.get(key)
        lower = metric.endswith("_ms")
        if kept is None or (summary[metric] < kept[metric] if lower else summary[metric] > kept[metric]):
            self.results[key] = summary

    def approvals(self) -> None:
        """e): approve fresh pending CSR requests through the API each round; a measurement, not a target."""
        target = self.approver.wait()
        for number in range(self.scale.rounds):
            pairs = self.csr_requests(f"approve{number}", self.scale.approvals)
            self.register(target, pairs)
            load = self.approve(target, [name for name, _ in pairs])
            summary = {
                "approvals_per_second": round(load.per_second, 1),
                "approvals": load.requests,
                "seconds": round(load.seconds, 3),
            }
            self.keep_best("e_server", summary, "approvals_per_second")

    def latency(self) -> None:
        """d) and f): one client polling back to back, on a small and on a large registry."""
        scale = self.scale
        sizes = {"d_small": (scale.small_users, scale.small_users), "d_large": (scale.large_users, scale.large_pending)}
        samples, targets, seeded = {}, {}, {}
        for key, (users, pending) in sizes.items():
            started = time.perf_counter()
            names = seed(self.work / key, users, pending, lambda items: self.load.map(hash_passwords, items))
            seeded[key] = round(time.perf_counter() - started, 2)
            samples[key] = random.Random(6).sample(names, min(len(names), 10))
        for key, (users, _) in sizes.items():
            targets[key] = self.launch(f"registry with {users:,} users", "registry", key, http=True)
        for key, (_, pending) in sizes.items():
            # The server must see the seeded data: the same file, the same rows.
            stored = targets[key].wait().call("GET", "/api/client-registry")["pending"]
            if stored != pending:
                raise BenchError(f"{targets[key].name} sees {stored} pending requests, not the {pending} seeded")
        for _ in range(scale.rounds):
            for key, (users, pending) in sizes.items():
                load = self.load.run(
                    targets[key],
                    polls(map(password_request, samples[key])),
                    expect=HTTPStatus.ACCEPTED,
                    duration=scale.latency_duration,
                    warmup=len(samples[key]),
                    workers=1,
                    connections=1,
                )
                summary = load.summary() | {"users": users, "pending": pending, "seed_seconds": seeded[key]}
                self.keep_best(key, summary, "p50_ms")
        peak = targets["d_large"].peak_memory()
        self.results["f"] = {"peak_rss_mb": round(peak / 2**20, 1), "users": scale.large_users}

    def admin_under_guesses(self) -> None:
        """g): the administrator's status call, idle and while 8 connections guess passwords after a restart."""
        names = [f"guessed-{i:04d}" for i in range(self.scale.guessed)]
        setup = self.launch("registry (g's requests)", "registry", "registry-guesses", http=True).wait()
        self.register(setup, polls(map(password_request, names)))
        self.stop_servers()
        target = self.launch("registry after a restart", "registry", "registry-guesses", http=True).wait()
        self.results["g_idle"] = self.admin_latency(target, lambda: None)
        guesses = polls({**password_request(name), "password": f"wrong-{n}"} for n in range(4) for name in names)
        workers, connections = GUESSING_CONNECTIONS
        guessing = threading.Thread(
            target=lambda: self.load.run(
                target, guesses, expect=HTTPStatus.CONFLICT, once=True, workers=workers, connections=connections
            )
        )
        self.results["g_guesses"] = self.admin_latency(target, guessing.start, until=guessing)
        guessing.join()

    def admin_latency(
        self, target: ServerProcess, start: Callable[[], None], until: threading.Thread | None = None
    ) -> dict[str, float]:
        """``GET /api/client-registry`` back to back on one connection, for a second or until ``until`` ends."""
        connection = Connection(target.port, target.tls_ca)
        request = build_request("GET", "/api/client-registry", token=self.token)
        latencies: list[float] = []
        start()
        time.sleep(0.2 if until else 0.0)  # the guesses under way
        deadline = time.perf_counter() + 1.0
        while (until.is_alive() if until else time.perf_counter() < deadline) and len(latencies) < 100_000:
            sent = time.perf_counter()
            status, answer = connection.exchange(request)
            latencies.append(time.perf_counter() - sent)
            if status != HTTPStatus.OK:
                raise BenchError(f"GET /api/client-registry on {target.name}: {status}: {answer[:300]!r}")
        connection.close()
        load = Load(len(latencies), sum(latencies), latencies, 0.0, 0.0)
        return {"p50_ms": load.summary()["p50_ms"], "p99_ms": load.summary()["p99_ms"], "calls": len(latencies)}

    def targets(self) -> list[Target]:
        r = self.results

        def rate(key: str) -> float:
            return r[key]["requests_per_second"]

        return [
            Target("b/a polls with a password, HTTP", rate("b_http") / rate("a_http"), 0.75, True),
            Target("b/a polls with a password, HTTPS", rate("b_https") / rate("a_https"), 0.75, True),
            Target("c/a polls with a CSR, HTTP", rate("c_http") / rate("a_http"), 0.7, True),
            Target(
                f"d p50 with {r['d_large']['users']:,} users / with {r['d_small']['users']}",
                r["d_large"]["p50_ms"] / r["d_small"]["p50_ms"],
                1.3,
                False,
            ),
            Target(f"f peak RSS in MB with {r['f']['users']:,} users", r["f"]["peak_rss_mb"], 300, False),
            Target("g admin p50 ms under password guesses", r["g_guesses"]["p50_ms"], 5, False),
        ]


LABELS = {
    "a_http": "a) bare http.server, HTTP",
    "b_http": "b) poll with password, HTTP",
    "c_http": "c) poll with CSR, HTTP",
    "a_https": "a) bare http.server, HTTPS",
    "b_https": "b) poll with password, HTTPS",
    "d_small": "d) 1 client polling, {users:,} users",
    "d_large": "d) 1 client polling, {users:,} users",
}


def render(results: dict[str, dict[str, Any]], targets: list[Target], header: str) -> str:
    """The table of measurements and the table of targets."""
    lines = [header, ""]
    lines.append(f"{'measurement':<38}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'server CPU':>12}{'client CPU':>12}")
    for key, label in LABELS.items():
        row = results[key]
        lines.append(
            f"{label.format(**row):<38}{row['requests_per_second']:>9,.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
            f"{row['server_cpu']:>11.0%}{row['client_cpu']:>12.0%}"
        )
    # No target: an approval is decided by a person, one at a time.
    label = "e) CSR approvals through the API"
    lines.append(f"{label:<38}{results['e_server']['approvals_per_second']:>9,.0f}  approvals/s (no bound)")
    lines.append(f"{'f) server peak RSS (VmHWM)':<38}{results['f']['peak_rss_mb']:>9,.1f}  MB")
    for key, label in (("g_idle", "g) admin status call, idle"), ("g_guesses", "g) ... under 8 guessing connections")):
        row = results[key]
        lines.append(f"{label:<38}{'':>9}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}  ({row['calls']:,} calls)")
    lines += ["", f"{'target':<44}{'measured':>10}  {'bound':<9}result"]
    for target in targets:
        bound = f"{'>=' if target.at_least else '<'} {target.bound:g}"
        lines.append(f"{target.name:<44}{target.value:>10.2f}  {bound:<9}{'PASS' if target.passed else 'FAIL'}")
    lines += ["", "CPU: cores busy during the run (100% is one core)."]
    return "\n".join(lines)


def profile(bench: Bench, folder: Path) -> None:
    """Run b), c) and e) each against a server under cProfile; print where its time goes.

    The requests are stored by a server that is not profiled; a profiled one
    then starts on the same data and takes only the measured load.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scale = bench.scale
    poll = polls([password_request("sensor-0001")])
    agents = bench.csr_requests("agent", scale.csr_pool)
    approvals = bench.csr_requests("approve", scale.approvals)
    setup = bench.launch("registry (setup)", "registry", "profiled", http=True).wait()
    bench.register(setup, poll)
    csr_polls = bench.register(setup, agents)
    bench.register(setup, approvals)
    bench.stop_servers()
    phases = {
        "b": lambda target: bench.poll_load(target, poll),
        "c": lambda target: bench.poll_load(target, csr_polls),
        "e": lambda target: bench.approve(target, [name for name, _ in approvals]),
    }
    for phase, run in phases.items():
        path = folder / f"{phase}.prof"
        target = bench.launch(f"profiled registry ({phase})", "registry", "profiled", http=True, profile=path).wait()
        load = run(target)
        bench.stop_servers()
        print(f"\n=== {phase}) {load.requests:,} requests at {load.per_second:,.0f}/s under cProfile: {path}")
        print(profile_report(path))


def profile_report(path: Path) -> str:
    """The functions that cost most, by own time, then the repository's by cumulative time."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = [(where, calls, own, cumulative) for where, (_, calls, own, cumulative, _) in stats.items()]
    total = sum(row[2] for row in rows)
    ours = [row for row in rows if Path(row[0][0]).parent == HERE and Path(row[0][0]).name != "bench.py"]
    lines = [f"server CPU in the connections' threads: {total:.2f} s (slowed by the profiler)"]
    for title, chosen in (
        ("by own time, everywhere", sorted(rows, key=lambda row: -row[2])[:15]),
        ("by cumulative time, in this repository", sorted(ours, key=lambda row: -row[3])[:20]),
    ):
        lines += ["", title, f"{'own %':>7}{'cum %':>7}{'calls':>9}  function"]
        for where, calls, own, cumulative in chosen:
            lines.append(f"{own / total:>7.1%}{cumulative / total:>7.1%}{calls:>9,}  {_function_name(where)}")
    return "\n".join(lines)


def _function_name(where: tuple[str, int, str]) -> str:
    """``file:line(function)``, the file relative to this folder or to the standard library."""
    file, line, function = where
    if file == "~":
        return function
    path = Path(file)
    for root in (HERE, Path(logging.__file__).parent.parent):
        if path.is_relative_to(root):
            return f"{path.relative_to(root)}:{line}({function})"
    return f"{file}:{line}({function})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the registry beside the http.server ceiling.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="profile b), c) and e) instead; keep .prof files")
    parser.add_argument("--workers", type=int, default=3, help="load worker processes (default %(default)s)")
    parser.add_argument("--connections", type=int, default=2, help="connections per worker (default %(default)s)")
    parser.add_argument("--duration", type=float, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, help="rounds of each kind of run; the best is kept")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when it ran (whatever the targets say), 1 when something broke."""
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    scale = replace(scale, duration=args.duration or scale.duration, rounds=args.rounds or scale.rounds)
    started = time.perf_counter()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-") as work:
        load = LoadGenerator(args.workers, args.connections)
        stack.callback(load.close)
        bench = Bench(scale, load, stack, Path(work))
        try:
            if args.profile:
                profile(bench, args.profile)
                return 0
            bench.throughput()
            bench.approvals()
            bench.stop_servers()
            bench.latency()
            bench.stop_servers()
            bench.admin_under_guesses()
        except BenchError as error:
            print(f"bench.py: {error}", file=sys.stderr)
            return 1
    targets = bench.targets()
    seconds = time.perf_counter() - started
    header = (
        f"Client registry bench{' (quick)' if args.quick else ''}: {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, {args.workers} client processes x {args.connections} keep-alive connections, "
        f"{scale.duration:g} s per run, best of {scale.rounds}; {seconds:.0f} s in all"
    )
    print(render(bench.results, targets, header))
    if args.json:
        document = {
            "config": {
                "quick": args.quick,
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "workers": args.workers,
                "connections_per_worker": args.connections,
                **asdict(scale),
            },
            "measurements": bench.results,
            "targets": [target.to_json() for target in targets],
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

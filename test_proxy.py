"""Behind a reverse proxy (issue 23 item 8): the client's address comes from X-Forwarded-For, from allowed proxies only.

Proves HTTP-8.6-FORWARDED with Debian's nginx in front of a plain-HTTP
server, as the README's deployment has it: nginx runs on loopback ports
this test chose, in a folder of its own, and is stopped by its PID. The
clients connect from different loopback addresses (127.0.0.2, 127.0.0.3),
so that nginx sees each as another client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import server
from conftest import ADMIN_TOKEN, call, serve

NGINX = Path("/usr/sbin/nginx")
REGISTER = "/api/client-registry/register"
CONFIGURATION = """
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def nginx(folder: Path, upstream: int) -> Iterator[int]:
    """Debian's nginx on a loopback port, proxying to ``upstream``; its port. Stopped by its PID."""
    if not NGINX.exists():
        pytest.skip("Debian's nginx is not installed (/usr/sbin/nginx; .ci/run installs it): no proxy to test behind")
    folder.mkdir()
    port = free_port()
    (folder / "nginx.conf").write_text(CONFIGURATION.format(folder=folder, port=port, upstream=upstream))
    process = subprocess.Popen([str(NGINX), "-p", str(folder), "-c", str(folder / "nginx.conf")])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None, (folder / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen within 10 s"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()  # by its PID: the process this test started
        process.wait(10)


def register_from(source: str, port: int, username: str, forwarded: str | None = None) -> int:
    """A registration sent from the loopback address ``source`` to ``port``; its status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    headers = {"Content-Type": "application/json"} | ({"X-Forwarded-For": forwarded} if forwarded else {})
    connection.request("POST", REGISTER, json.dumps({"username": username, "password": "s3cret-pass"}), headers)
    status = connection.getresponse().status
    connection.close()
    return status


def client_addresses(instance: server.RegistryServer) -> dict[str, str]:
    requests = call(instance.url, "GET", "/api/client-registry/requests", token=ADMIN_TOKEN)[1]
    return {request["username"]: request["clientAddress"] for request in requests}


@pytest.mark.parametrize("allowed", [True, False], ids=["--forwarded-allow 127.0.0.1", "no proxy allowed"])
def test_behind_nginx_each_client_has_its_own_address(tmp_path: Path, allowed: bool) -> None:
    """Proves HTTP-8.6-FORWARDED: with the proxy allowed, the rate limit counts each client; else all are one."""
    options = {"rate_limit": 1, "forwarded_allow": ("127.0.0.1",) if allowed else ()}
    with serve(tmp_path / "data", **options) as instance:
        assert call(instance.url, "POST", "/api/client-registry/unlock", token=ADMIN_TOKEN)[0] == 200
        with nginx(tmp_path / "nginx", instance.server_address[1]) as port:
            first = register_from("127.0.0.2", port, "sensor-0002")
            # A client's own header is kept, and nginx appends the address it sees: the last entry wins.
            second = register_from("127.0.0.3", port, "sensor-0003", forwarded="10.9.9.9")
        # Sent straight to the server, the header is the client's word only, and is not taken.
        direct = register_from("127.0.0.4", instance.server_address[1], "sensor-0004", forwarded="10.8.8.8")
        addresses = client_addresses(instance)

    assert (first, direct) == (202, 202)
    if allowed:
        assert second == 202
        assert addresses == {"sensor-0002": "127.0.0.2", "sensor-0003": "127.0.0.3", "sensor-0004": "127.0.0.4"}
    else:
        assert second == 429  # one bucket for every client behind the proxy
        assert addresses == {"sensor-0002": "127.0.0.1", "sensor-0004": "127.0.0.4"}


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("127.0.0.1", "10.0.0.7", "10.0.0.7"),
        ("127.0.0.1", "203.0.113.5, 10.0.0.7", "10.0.0.7"),
        ("127.0.0.1", "not-an-address", "127.0.0.1"),
        ("192.0.2.1", "10.0.0.7", "192.0.2.1"),
        ("10.1.2.3", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_only_the_last_entry_from_an_allowed_proxy_is_taken(peer: str, forwarded: str, client: str) -> None:
    """Proves HTTP-8.6-FORWARDED."""
    allowed = server.proxies("127.0.0.1, 10.0.0.0/8")

    assert server.forwarded_client(peer, {"x-forwarded-for": forwarded}, allowed) == client
    assert server.forwarded_client(peer, {"x-forwarded-for": forwarded}, ()) == peer


def test_a_proxy_that_is_no_address_is_argparse_s_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        server.parse_args(["--forwarded-allow", "127.0.0.1,proxy.local"])

    assert stopped.value.code == 2
    assert "argument --forwarded-allow: 'proxy.local' does not appear to be an IPv4 or IPv6 network" in (
        capsys.readouterr().err
    )

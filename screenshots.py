"""Take the README's screenshots of the administrator's page with the browser tests' harness.

    python3 screenshots.py            # writes docs/registry-view.png and docs/grant-access.png

It starts a registry in a temporary folder, lets a few clients ask to be
registered, and photographs the Client Registry view and the Grant Access
dialog in Debian's headless Chromium.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import make_csr
from test_web import TOKEN, call, chromium, register, request_row, running_server, sign_in, unlock

DOCS = Path(__file__).with_name("docs")
VIEWPORT = {"width": 1440, "height": 860}


def populate(base: str) -> None:
    """The requests of a small plant: two pending, one approved, one denied."""
    admin = {"token": TOKEN}
    call(base, "POST", "/api/client-registry/unlock", **admin)
    register(base, "plc-0007", roles=["minimum"], context="PLC of the packaging line")
    call(base, "POST", "/api/client-registry/requests/plc-0007/approve", **admin)
    register(base, "cam-0042", context="no idea who I am")
    call(base, "POST", "/api/client-registry/requests/cam-0042/deny", {"reason": "not in the asset list"}, **admin)
    register(
        base,
        "sensor-0003",
        roles=["minimum"],
        permissions=[{"resource": "plant/line2/temperature", "operation": "write", "context": "mqtt"}],
        context="Temperature sensor, line 2, cabinet 4",
    )
    call(base, "POST", "/api/client-registry/register", agent_request())
    call(base, "POST", "/api/client-registry/register", agent_request())  # a poll


def agent_request() -> dict[str, object]:
    return {
        "username": "agent-0001",
        "csr": AGENT_CSR,
        "roles": ["minimum", "operator"],
        "permissions": [
            {"resource": "plant/line2/#", "operation": "readWrite", "context": "mqtt"},
            {"resource": "/api/telemetry", "operation": "write", "context": "http"},
        ],
        "context": "Edge agent on gateway gw-line2 (serial GW-2291), installed by J. Rivera.\n"
        "Forwards line 2 telemetry and receives setpoints.",
    }


AGENT_CSR = make_csr("agent-0001")


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, running_server(Path(folder)) as srv, chromium() as browser:
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        page = context.new_page()
        sign_in(page, srv.url)
        populate(srv.url)
        unlock(page)
        request_row(page, "agent-0001").wait_for()
        page.locator("#lock-detail").wait_for()
        page.wait_for_timeout(300)  # let the countdown tick once
        page.screenshot(path=DOCS / "registry-view.png")

        request_row(page, "agent-0001").click()
        page.locator("#grant-dialog").wait_for()
        page.uncheck("#grant-roles input[value=operator]")
        page.locator("#grant-dialog").evaluate("dialog => { dialog.scrollTop = 0; }")
        page.screenshot(path=DOCS / "grant-access.png")
        context.close()
    print(f"wrote {DOCS / 'registry-view.png'} and {DOCS / 'grant-access.png'}")


if __name__ == "__main__":
    main()

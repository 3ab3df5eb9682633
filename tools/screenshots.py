"""Take the screenshots of docs/admin-page.md with the browser tests' harness.

    python3 tools/screenshots.py   # writes docs/registry-view.png, grant-access.png, users-view.png, audit-view.png,
                             # registry-phone.png

It starts a registry in a temporary folder, lets a few clients ask to be
registered, and photographs the Client Registry view, the Grant Access
dialog, the Users view and the Audit view at 1440x860, and the Client
Registry view on a phone (390x844), in Debian's headless Chromium.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # the repository: tools/ holds what maintainers run
sys.path.insert(0, str(HERE))

from conftest import call, make_csr  # noqa: E402 (after the repository is on the path)
from test_web import TOKEN, chromium, register, request_row, running_server, sign_in  # noqa: E402

DOCS = HERE / "docs"
VIEWPORT = {"width": 1440, "height": 860}
PHONE = {"width": 390, "height": 844}
ADMIN = {"token": TOKEN}


def populate(base: str) -> None:
    """The requests of a small plant: two approved (one collected), one denied, two pending."""
    call(base, "POST", "/api/client-registry/unlock", **ADMIN)
    plc = {"username": "plc-0007", "csr": make_csr("plc-0007"), "roles": ["minimum"], "context": "PLC, packaging line"}
    call(base, "POST", "/api/client-registry/register", plc)
    call(base, "POST", "/api/client-registry/requests/plc-0007/approve", **ADMIN)
    call(base, "POST", "/api/client-registry/register", plc)  # it collects its certificate
    register(base, "hmi-0012", roles=["minimum", "operator"], context="Operator panel, line 1")
    call(base, "POST", "/api/client-registry/requests/hmi-0012/approve", {"roles": ["minimum"]}, **ADMIN)
    register(base, "cam-0042", context="no idea who I am")
    call(base, "POST", "/api/client-registry/requests/cam-0042/deny", {"reason": "not in the asset list"}, **ADMIN)
    register(
        base,
        "sensor-0003",
        roles=["minimum"],
        permissions=[{"resource": "plant/line2/temperature", "operation": "write", "context": "mqtt"}],
        context="Temperature sensor, line 2, cabinet 4",
    )
    call(base, "POST", "/api/client-registry/register", agent_request())
    call(base, "POST", "/api/client-registry/register", agent_request())  # a poll
    retired = {"username": "plc-0003", "csr": make_csr("plc-0003"), "roles": ["minimum"], "context": "PLC, retired"}
    call(base, "POST", "/api/client-registry/register", retired)
    call(base, "POST", "/api/client-registry/requests/plc-0003/approve", **ADMIN)
    call(base, "DELETE", "/api/users/plc-0003", **ADMIN)  # its certificate is revoked


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
        populate(srv.url)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        page = context.new_page()
        sign_in(page, srv.url)
        request_row(page, "agent-0001").wait_for()
        register(srv.url, "sensor-0004", roles=["minimum"], context="Pressure sensor, line 2")  # arrives: new
        page.locator("#requests-body tr.is-new").wait_for()
        page.mouse.move(0, VIEWPORT["height"] - 1)  # no row under the pointer, so none is shown hovered
        page.wait_for_timeout(5500)  # let the toast go, and the countdown tick
        page.screenshot(path=DOCS / "registry-view.png")

        request_row(page, "agent-0001").click()
        page.locator("#grant-dialog").wait_for()
        page.uncheck("#grant-roles input[value=operator]")
        page.screenshot(path=DOCS / "grant-access.png")
        page.keyboard.press("Escape")

        page.click("#tab-users")
        page.locator("#users-body tr").nth(1).wait_for()
        page.locator("#revoked").wait_for()
        page.screenshot(path=DOCS / "users-view.png")

        page.click("#tab-audit")
        page.locator("#audit-body tr").nth(5).wait_for()
        page.screenshot(path=DOCS / "audit-view.png")
        context.close()

        context = browser.new_context(viewport=PHONE, device_scale_factor=1)
        page = context.new_page()
        sign_in(page, srv.url)
        request_row(page, "agent-0001").wait_for()
        page.mouse.move(0, 0)
        page.screenshot(path=DOCS / "registry-phone.png")
        context.close()
    print(f"wrote registry-view.png, grant-access.png, users-view.png, audit-view.png and registry-phone.png in {DOCS}")


if __name__ == "__main__":
    main()

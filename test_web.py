"""The administrator's page in a real browser: Debian's Chromium driven by Playwright.

Each test starts the server on a free port over plain HTTP, opens the page
as an administrator would, and plays the clients with plain HTTP requests
from the test. ``screenshots.py`` uses the same harness for the README.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import server
from conftest import serve

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright"
)
expect = sync_api.expect

# Playwright's own browser builds cannot be downloaded here: it drives Debian's.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "t"
ROLES = {
    "minimum": "The least a client needs",
    "operator": "Reads the plant's telemetry and sends commands",
}
# The page refreshes every 3 seconds; wait for a refresh well within this.
REFRESH_TIMEOUT_MS = 10_000
# Records what the Content-Security-Policy blocked; Playwright injects this
# through the DevTools protocol, which the page's policy does not govern.
RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium to run the browser tests"
)


# --- The harness (shared with screenshots.py) --------------------------------


@contextlib.contextmanager
def running_server(folder: Path) -> Iterator[server.RegistryServer]:
    """A registry server over plain HTTP on a free port, with the catalog ``ROLES``, in a thread."""
    roles = folder / "roles.json"
    roles.write_text(json.dumps(ROLES))
    with serve(folder / "data", admin_token=TOKEN, roles=roles) as srv:
        yield srv


@contextlib.contextmanager
def chromium() -> Iterator[sync_api.Browser]:
    """Debian's headless Chromium under Playwright."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def call(base: str, method: str, path: str, body: object = None, *, token: str | None = None) -> tuple[int, Any]:
    """One HTTP call to the registry: its status and its JSON body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def register(base: str, username: str, **fields: object) -> tuple[int, Any]:
    """A client asks to be registered, or polls: the same request each time."""
    body = {"username": username, "password": "s3cret-pass", **fields}
    return call(base, "POST", "/api/client-registry/register", body)


def give_token(page: sync_api.Page, token: str = TOKEN) -> None:
    """Type a token into the page's sign-in dialog and send it."""
    page.fill("#token-input", token)
    page.click("#token-submit")


def sign_in(page: sync_api.Page, base: str) -> None:
    """Open the page and give it the administrator token."""
    page.goto(base + "/")
    give_token(page)
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#lock-state")).to_have_text("Locked")


def unlock(page: sync_api.Page) -> None:
    """Press Unlock and wait for the server's answer."""
    page.click("#unlock")
    expect(page.locator("#lock-state")).to_have_text("Unlocked")


def request_row(page: sync_api.Page, username: str) -> sync_api.Locator:
    return page.locator(f'#requests-body tr[data-username="{username}"]')


# --- Fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with chromium() as instance:
        yield instance


@pytest.fixture
def base(tmp_path: Path) -> Iterator[str]:
    with running_server(tmp_path) as srv:
        yield srv.url


@pytest.fixture
def page(browser: sync_api.Browser) -> Iterator[sync_api.Page]:
    """A fresh tab, recording console errors, uncaught exceptions and CSP violations."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(RECORD_VIOLATIONS)
    tab = context.new_page()
    tab.console_errors = []
    tab.on("console", lambda message: message.type == "error" and tab.console_errors.append(message.text))
    tab.on("pageerror", lambda error: tab.console_errors.append(str(error)))
    expect.set_options(timeout=REFRESH_TIMEOUT_MS)
    yield tab
    context.close()


# --- The workflow --------------------------------------------------------------


def test_allow_grants_what_is_left_ticked(page: sync_api.Page, base: str) -> None:
    """Unlock, see the request appear, untick a role, allow: the next poll gets the narrowed rights."""
    sign_in(page, base)
    unlock(page)
    expect(page.locator("#lock-detail")).to_contain_text("for 4:5")  # the server's five minutes, counting down
    countdown = page.locator("#lock-detail").text_content()
    expect(page.locator("#lock-detail")).not_to_have_text(countdown)

    status, body = register(base, "agent-0001", roles=["minimum", "operator"], context="line 2, cabinet 4")
    assert status == 202
    row = request_row(page, "agent-0001")
    expect(row).to_contain_text(body["pairingId"])
    expect(row).to_contain_text("Pending")
    expect(page.locator("#pending-count")).to_have_text("1")

    row.click()
    dialog = page.locator("#grant-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#grant-pairing")).to_have_text(body["pairingId"])
    expect(page.locator("#grant-context")).to_have_text("line 2, cabinet 4")
    expect(page.locator("#grant-roles input[value=minimum]")).to_be_checked()
    page.uncheck("#grant-roles input[value=operator]")
    page.click("#grant-allow")
    expect(dialog).to_be_hidden()
    expect(page.locator("#toast")).to_contain_text("agent-0001 is registered")

    status, body = register(base, "agent-0001", roles=["minimum", "operator"])
    assert status == 201
    assert body["roles"] == ["minimum"]
    assert body["permissions"] == []
    expect(row).to_contain_text("Approved")


def test_allow_sends_the_edited_permissions(page: sync_api.Page, base: str) -> None:
    """Permissions can be removed, edited and added before allowing."""
    requested = [
        {"resource": "plant/line2/#", "operation": "readWrite", "context": "mqtt"},
        {"resource": "/api/telemetry", "operation": "write", "context": "http"},
    ]
    sign_in(page, base)
    unlock(page)
    assert register(base, "sensor-0003", permissions=requested)[0] == 202
    request_row(page, "sensor-0003").click()
    rows = page.locator("#grant-permissions-body tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("input")).to_have_value("/api/telemetry")  # the server keeps them sorted
    rows.nth(0).locator("button").click()
    rows.nth(0).locator("input").fill("plant/line2/temperature")
    rows.nth(0).locator("select").first.select_option("read")
    page.click("#grant-add-permission")
    rows.nth(1).locator("input").fill("/api/health")
    rows.nth(1).locator("select").nth(1).select_option("http")
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    status, body = register(base, "sensor-0003", permissions=requested)
    assert status == 201
    assert body["permissions"] == [
        {"resource": "/api/health", "operation": "read", "context": "http"},
        {"resource": "plant/line2/temperature", "operation": "read", "context": "mqtt"},
    ]


def test_deny_tells_the_client_the_reason(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "intruder-9")[0] == 202
    request_row(page, "intruder-9").click()
    page.fill("#grant-reason", "not a device of this plant")
    page.click("#grant-deny")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    status, body = register(base, "intruder-9")
    assert status == 403
    assert body["error"] == "denied"
    assert body["reason"] == "not a device of this plant"
    expect(request_row(page, "intruder-9")).to_contain_text("Denied")
    expect(request_row(page, "intruder-9")).to_contain_text("not a device of this plant")


# --- Client text is text ---------------------------------------------------------


def test_what_a_client_sent_is_shown_as_text(page: sync_api.Page, base: str) -> None:
    """A context and a resource holding markup show the markup; none of it runs."""
    context = '<script>window.pwned = "script"</script><img src=x onerror="window.pwned = \'img\'">'
    resource = "plant/<b>bold</b>"
    sign_in(page, base)
    unlock(page)
    permissions = [{"resource": resource, "operation": "read", "context": "mqtt"}]
    assert register(base, "mallory", context=context, permissions=permissions)[0] == 202

    row = request_row(page, "mallory")
    expect(row.locator(".context-cell")).to_have_text(context)
    expect(row.locator(".perm-resource")).to_have_text(resource)
    row.click()
    expect(page.locator("#grant-context")).to_have_text(context)
    expect(page.locator("#grant-permissions-body input")).to_have_value(resource)

    assert page.locator("main script, main img, main b, dialog script, dialog img, dialog b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("window.cspViolations") == []


# --- Staying in place ------------------------------------------------------------


def test_a_refresh_keeps_rows_scroll_and_the_open_dialog(page: sync_api.Page, base: str) -> None:
    """Rows that did not change are the same elements; scroll, ticks and the dialog survive."""
    page.set_viewport_size({"width": 1280, "height": 600})
    sign_in(page, base)
    unlock(page)
    names = [f"sensor-{number:04d}" for number in range(30)]
    for name in names:
        assert register(base, name, roles=["minimum", "operator"])[0] == 202
    expect(page.locator("#requests-body tr")).to_have_count(30)

    page.evaluate("document.querySelector('#requests-body tr').marked = true")
    scroller = page.locator("#requests-scroll")
    scroller.evaluate("element => { element.scrollTop = 400; }")
    assert register(base, names[-1], roles=["minimum", "operator"])[0] == 202  # a poll changes one row
    expect(request_row(page, names[-1])).to_contain_text("1 poll")
    assert page.evaluate("document.querySelector('#requests-body tr').marked") is True
    assert scroller.evaluate("element => element.scrollTop") == 400

    request_row(page, names[-1]).click()
    page.uncheck("#grant-roles input[value=operator]")
    assert register(base, names[-1], roles=["minimum", "operator"])[0] == 202
    expect(page.locator("#grant-polled")).to_contain_text("2 polls")  # a refresh reached the open dialog
    expect(page.locator("#grant-dialog")).to_be_visible()
    expect(page.locator("#grant-roles input[value=operator]")).not_to_be_checked()


# --- Errors in words ---------------------------------------------------------------


def test_a_refused_token_asks_for_it_again(page: sync_api.Page, base: str) -> None:
    page.goto(base + "/")
    give_token(page, "wrong")
    expect(page.locator("#token-error")).to_contain_text("The server refused this token")
    expect(page.locator("#banner")).to_be_hidden()
    give_token(page)
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()

    page.evaluate("sessionStorage.setItem('clientRegistry.adminToken', 'expired')")
    expect(page.locator("#banner")).to_contain_text("token was refused")
    expect(page.locator("#token-dialog")).to_be_visible()
    give_token(page)
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('clientRegistry.adminToken')") == TOKEN


def test_a_request_decided_elsewhere_is_said_in_words(page: sync_api.Page, base: str) -> None:
    """Another administrator approves first: Allow answers 409, and the banner says so."""
    sign_in(page, base)
    unlock(page)
    assert register(base, "agent-0002")[0] == 202
    request_row(page, "agent-0002").click()
    # This tab's listing stays as it was, as if its next refresh had not come yet.
    stale = call(base, "GET", "/api/client-registry/requests", token=TOKEN)[1]
    page.route("**/api/client-registry/requests", lambda route: route.fulfill(json=stale))
    assert call(base, "POST", "/api/client-registry/requests/agent-0002/approve", token=TOKEN)[0] == 200

    page.click("#grant-allow")
    expect(page.locator("#banner")).to_contain_text("agent-0002 was already decided by someone else")
    expect(page.locator("#banner")).to_contain_text("approved")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    page.unroute("**/api/client-registry/requests")
    expect(request_row(page, "agent-0002")).to_contain_text("Approved")


def test_an_open_dialog_learns_the_request_was_decided(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "agent-0003")[0] == 202
    request_row(page, "agent-0003").click()
    assert call(base, "POST", "/api/client-registry/requests/agent-0003/deny", token=TOKEN)[0] == 200
    expect(page.locator("#grant-notice")).to_contain_text("denied meanwhile")
    expect(page.locator("#grant-allow")).to_be_disabled()


# --- Users ---------------------------------------------------------------------------


def test_users_view_deletes_after_asking(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    for name in ("keep-me", "remove-me"):
        assert register(base, name, roles=["minimum"])[0] == 202
        assert call(base, "POST", f"/api/client-registry/requests/{name}/approve", token=TOKEN)[0] == 200

    page.click("#tab-users")
    rows = page.locator("#users-body tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(1)).to_contain_text("remove-me")
    expect(rows.nth(1)).to_contain_text("minimum")

    rows.nth(1).get_by_role("button", name="Delete remove-me").click()
    expect(page.locator("#confirm-dialog")).to_contain_text("Delete remove-me?")
    page.click("#confirm-cancel")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    assert [user["username"] for user in call(base, "GET", "/api/users", token=TOKEN)[1]] == ["keep-me", "remove-me"]

    rows.nth(1).get_by_role("button", name="Delete remove-me").click()
    page.click("#confirm-ok")
    expect(rows).to_have_count(1)
    assert [user["username"] for user in call(base, "GET", "/api/users", token=TOKEN)[1]] == ["keep-me"]
    assert register(base, "remove-me", roles=["minimum"])[0] == 202  # the name is free again


# --- The page's policy ------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_policy_and_breaks_none_of_it(page: sync_api.Page, base: str) -> None:
    response = page.goto(base + "/admin")
    headers = response.headers
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "style-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert headers["x-frame-options"] == "DENY"

    sign_in(page, base)
    unlock(page)
    permissions = [{"resource": "plant/#", "operation": "read", "context": "mqtt"}]
    assert register(base, "agent-0004", roles=["operator"], permissions=permissions)[0] == 202
    request_row(page, "agent-0004").click()
    page.click("#grant-add-permission")
    page.click("#grant-allow")
    expect(page.locator("#grant-form")).to_contain_text("has no resource")
    page.locator("#grant-permissions-body tr").nth(1).locator("button").click()
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    page.click("#tab-users")
    expect(page.locator("#users-body tr")).to_have_count(1)
    page.click("#tab-registry")
    page.click("#lock")
    expect(page.locator("#lock-state")).to_have_text("Locked")

    assert page.evaluate("window.cspViolations") == []
    assert page.console_errors == []

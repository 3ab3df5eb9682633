"""The administrator's page in a real browser: Debian's Chromium driven by Playwright.

Each test starts the server on a free port over plain HTTP, opens the page
as an administrator would, and plays the clients with plain HTTP requests
from the test. ``tools/screenshots.py`` uses the same harness for the README.

The accessibility test runs axe-core 4.14.1 (Deque Systems, MPL-2.0), the
minified script of the npm package ``axe-core@4.14.1`` vendored as
``test-assets/axe.min.js`` with its licence header intact. It is put
into the page through the DevTools protocol, which the page's
Content-Security-Policy does not govern, so the policy stays as it is served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

import server
from conftest import call, make_csr, make_key, serve

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
TOKEN = "test-admin-token-0123456789abcdef"
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

AXE = Path(__file__).with_name("test-assets") / "axe.min.js"
# The three screens of issue 18: a laptop, a small laptop or tablet, a phone.
VIEWPORTS = {"1440x900": (1440, 900), "1024x768": (1024, 768), "390x844": (390, 844)}
# Every element of the page whose box leaves the viewport sideways, and the page's own width.
SIDEWAYS = """
(root) => {
  const width = document.documentElement.clientWidth;
  const out = [];
  for (const node of document.querySelectorAll(root)) {
    if (node.closest(".visually-hidden, [hidden], thead")) continue;
    const box = node.getBoundingClientRect();
    if (box.width && (box.right > width + 0.5 || box.left < -0.5)) {
      out.push(`${node.tagName}.${node.className} ${Math.round(box.left)}..${Math.round(box.right)}`);
    }
  }
  return { page: document.documentElement.scrollWidth, width, out: out.slice(0, 8) };
}
"""
# The requests listing, with or without its poll statistics (?polls=omit).
LISTING = re.compile(r"/api/client-registry/requests(\?polls=\w+)?$")
# Counts what changes in the requests table from now on, but the "… ago" that time moves on.
WATCH_ROWS = """
() => {
  window.rowMutations = 0;
  const moved = (record) =>
    (record.target.nodeType === 1 ? record.target : record.target.parentElement).closest(".ago");
  new MutationObserver((records) => { window.rowMutations += records.filter((r) => !moved(r)).length; })
    .observe(document.getElementById("requests-body"), { childList: true, subtree: true, characterData: true });
}
"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium to run the browser tests"
)


# --- The harness (shared with tools/screenshots.py) --------------------------------


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
    expect(page.locator("#lock-state")).to_have_text("Unknown")  # the status call needs the token
    give_token(page)
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#lock-state")).to_have_text(re.compile(r"^(Locked|Unlocked)$"))


def unlock(page: sync_api.Page) -> None:
    """Press Unlock and wait for the server's answer."""
    page.click("#unlock")
    expect(page.locator("#lock-state")).to_have_text("Unlocked")


def request_row(page: sync_api.Page, username: str) -> sync_api.Locator:
    return page.locator(f'#requests-body tr[data-username="{username}"]')


def open_request(page: sync_api.Page, username: str) -> None:
    """Open a pending request's Grant Access dialog with its button, as a keyboard or a screen reader finds it."""
    page.get_by_role("button", name=f"Review the request of {username}").click()
    expect(page.locator("#grant-dialog")).to_be_visible()


def approve(base: str, username: str, body: object = None) -> None:
    assert call(base, "POST", f"/api/client-registry/requests/{username}/approve", body, token=TOKEN)[0] == 200


def assert_fits(page: sync_api.Page, root: str = "body *") -> None:
    """Nothing under ``root`` leaves the viewport sideways, and the page does not scroll sideways."""
    report = page.evaluate(SIDEWAYS, root)
    assert report["page"] <= report["width"], report
    assert report["out"] == [], report


def inside(inner: dict[str, float], outer: dict[str, float]) -> bool:
    """Whether one bounding box lies wholly within another (half a pixel of rounding allowed)."""
    return (
        inner["x"] >= outer["x"] - 0.5
        and inner["y"] >= outer["y"] - 0.5
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 0.5
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 0.5
    )


def viewport_box(page: sync_api.Page) -> dict[str, float]:
    size = page.viewport_size
    return {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}


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
    rows = page.locator("#grant-permissions li")
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
    expect(page.locator("#grant-permissions input")).to_have_value(resource)

    assert page.locator("main script, main img, main b, dialog script, dialog img, dialog b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("window.cspViolations") == []


# --- Staying in place ------------------------------------------------------------


def test_a_refresh_keeps_rows_scroll_and_the_open_dialog(page: sync_api.Page, base: str) -> None:
    """Rows that did not change are the same elements; scroll, ticks and the dialog survive.

    The poll statistics come at a slower pace than the rest (issue 27): the
    test moves the page's clock on to them.
    """
    page.set_viewport_size({"width": 1280, "height": 600})
    page.clock.install()
    sign_in(page, base)
    unlock(page)
    names = [f"sensor-{number:04d}" for number in range(30)]
    for name in names:
        assert register(base, name, roles=["minimum", "operator"])[0] == 202
    expect(page.locator("#requests-body tr")).to_have_count(30)

    page.evaluate("document.querySelector('#requests-body tr:last-child').marked = true")
    page.evaluate("window.scrollTo(0, 400)")
    assert register(base, names[-1], roles=["minimum", "operator"])[0] == 202  # a poll changes one row
    page.clock.fast_forward(31_000)
    expect(request_row(page, names[-1])).to_contain_text("1 poll")
    assert page.evaluate("document.querySelector('#requests-body tr:last-child').marked") is True
    assert page.evaluate("window.scrollY") == 400

    open_request(page, names[-1])
    page.uncheck("#grant-roles input[value=operator]")
    assert register(base, names[-1], roles=["minimum", "operator"])[0] == 202
    page.clock.fast_forward(31_000)
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
    page.route(LISTING, lambda route: route.fulfill(json=stale))
    assert call(base, "POST", "/api/client-registry/requests/agent-0002/approve", token=TOKEN)[0] == 200

    page.click("#grant-allow")
    expect(page.locator("#banner")).to_contain_text("agent-0002 was already decided by someone else")
    expect(page.locator("#banner")).to_contain_text("approved")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    page.unroute(LISTING)
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
    # The focus does not fall to <body>: it goes to the neighbour's Delete.
    expect(page.get_by_role("button", name="Delete keep-me")).to_be_focused()
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
    expect(page.locator("#grant-form")).to_contain_text("Enter a resource")
    page.locator("#grant-permissions li").nth(1).locator("button").click()
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    page.click("#tab-users")
    expect(page.locator("#users-body tr")).to_have_count(1)
    page.click("#tab-registry")
    page.click("#lock")
    expect(page.locator("#lock-state")).to_have_text("Locked")

    assert page.evaluate("window.cspViolations") == []
    assert page.console_errors == []


# --- Issue 18: long values, small screens ---------------------------------------------------

LONG_NAME = "a" * 20 + "-very-long-device-name-" + "b" * 21  # 64 characters, the most a username may have
LONG_TOPIC = "plant/" + "/".join(f"area-{number:02d}-cabinet-{number:02d}-unit" for number in range(10))
LONG_CONTEXT = "Installed by the night shift; " + "serial-" + "X" * 300 + " " + "words " * 100


def populate_long_values(base: str) -> dict[str, str]:
    """Requests and users whose values are as long as the registry allows; the long CSR user's serial."""
    assert len(LONG_NAME) == 64 and 240 <= len(LONG_TOPIC) <= 260
    permissions = [
        {"resource": LONG_TOPIC, "operation": "readWrite", "context": "mqtt"},
        {"resource": "/api/" + "segment/" * 25, "operation": "read", "context": "http"},
    ]
    body = {"username": LONG_NAME, "csr": make_csr(LONG_NAME), "roles": ["minimum", "operator"]}
    body |= {"permissions": permissions, "context": LONG_CONTEXT[:1024]}
    assert call(base, "POST", "/api/client-registry/register", body)[0] == 202
    approve(base, LONG_NAME)
    assert register(base, "p" + LONG_NAME[1:], permissions=permissions, context=LONG_CONTEXT[:1024])[0] == 202
    assert register(base, "pressure-sensor-0003", roles=["minimum"])[0] == 202
    for number in range(5):
        assert register(base, f"sensor-{number:04d}", roles=["minimum"], context="line 2, cabinet 4")[0] == 202
    users = call(base, "GET", "/api/users", token=TOKEN)[1]
    return {user["username"]: user["certificateSerial"] for user in users}


@pytest.mark.parametrize("size", VIEWPORTS, ids=list(VIEWPORTS))
def test_long_values_fit_every_screen(page: sync_api.Page, base: str, size: str) -> None:
    """64-character names, 250-character topics, a long context: no sideways scroll, Allow wholly visible."""
    width, height = VIEWPORTS[size]
    page.set_viewport_size({"width": width, "height": height})
    sign_in(page, base)
    unlock(page)
    serials = populate_long_values(base)
    expect(page.locator("#requests-body tr")).to_have_count(8)
    assert_fits(page)
    if width < 500:  # the phone: the lock panel wraps, its three controls on screen
        for button in ("#unlock", "#lock", "#sign-out"):
            assert inside(page.locator(button).bounding_box(), viewport_box(page)), button

    open_request(page, "p" + LONG_NAME[1:])
    dialog = page.locator("#grant-dialog")
    assert_fits(page, "#grant-dialog *")
    allow = page.locator("#grant-allow").bounding_box()
    assert inside(allow, dialog.bounding_box())
    assert inside(allow, viewport_box(page))
    assert allow["width"] >= 80  # the whole button, not a sliver
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # A name that fits on a line of its own is not broken mid-word.
    open_request(page, "pressure-sensor-0003")
    rects = page.locator("#grant-username").evaluate("node => [...node.getClientRects()].map((r) => [r.x, r.width])")
    assert len(rects) == 1, (rects, page.locator("#grant-username").text_content())
    page.keyboard.press("Escape")

    page.click("#tab-users")
    expect(page.locator("#users-body tr")).to_have_count(1)
    assert_fits(page)
    delete = page.get_by_role("button", name=f"Delete {LONG_NAME}")
    delete.scroll_into_view_if_needed()  # below a card that grew with the fingerprint (issue 27): not beside it
    assert inside(delete.bounding_box(), viewport_box(page))
    serial = page.locator("#users-body .serial")
    expect(serial).to_have_text(serials[LONG_NAME])  # in full: no ellipsis
    assert serial.evaluate("node => node.scrollWidth <= node.clientWidth")


# --- Issue 18: the dialog's focus, errors in view ------------------------------------------


def test_the_dialog_opens_on_its_heading_and_two_enters_approve_nothing(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "agent-0005", roles=["minimum"])[0] == 202
    button = page.get_by_role("button", name="Review the request of agent-0005")
    button.focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")
    expect(page.locator("#grant-dialog")).to_be_visible()
    expect(page.locator("#grant-heading")).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    expect(page.locator("#grant-dialog")).to_be_visible()
    requests = call(base, "GET", "/api/client-registry/requests", token=TOKEN)[1]
    assert [request["state"] for request in requests] == ["pending"]

    # Escape keeps a typed denial reason: first it warns, then it closes and keeps the reason.
    page.locator("#grant-reason").press_sequentially("unknown device")
    page.keyboard.press("Escape")
    expect(page.locator("#grant-dialog")).to_be_visible()
    expect(page.locator("#grant-error")).to_contain_text("reason for a denial")
    page.keyboard.press("Escape")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    expect(page.locator("#toast")).to_contain_text("is kept")
    expect(button).to_be_focused()
    open_request(page, "agent-0005")
    expect(page.locator("#grant-reason")).to_have_value("unknown device")
    page.click("#grant-deny")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    assert register(base, "agent-0005", roles=["minimum"])[1]["reason"] == "unknown device"


def test_a_refused_permission_is_marked_next_to_its_field_in_view(page: sync_api.Page, base: str) -> None:
    """At 1024x768 the server's 400 names permissions[2]: that field is marked, its message beside it, on screen."""
    page.set_viewport_size({"width": 1024, "height": 768})
    sign_in(page, base)
    unlock(page)
    requested = [
        {"resource": f"plant/line{number}/#", "operation": "read", "context": "mqtt"} for number in range(1, 6)
    ]
    assert register(base, "agent-0006", roles=["minimum"], permissions=requested, context=LONG_CONTEXT[:600])[0] == 202
    open_request(page, "agent-0006")
    items = page.locator("#grant-permissions li")
    items.nth(2).locator("input").fill("plant/#/oops")  # the page lets it through; the server does not
    page.click("#grant-allow")

    field = items.nth(2).locator("input")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_be_focused()
    message = items.nth(2).locator(".field-error")
    expect(message).to_contain_text("Resource is not an MQTT topic filter")
    assert field.get_attribute("aria-describedby") == message.get_attribute("id")
    body = page.locator("#grant-body").bounding_box()
    for node in (field, message):
        box = node.bounding_box()
        assert inside(box, body) and inside(box, viewport_box(page)), box
    summary = page.locator("#grant-error")
    expect(summary).to_contain_text("The server refused this grant")
    assert inside(summary.bounding_box(), viewport_box(page))
    for text in (summary.text_content(), message.text_content()):
        assert "permissions[" not in text and "permission 3" not in text
    assert items.nth(1).locator("input").get_attribute("aria-invalid") is None

    field.fill("plant/oops/#")
    expect(field).not_to_have_attribute("aria-invalid", "true")
    expect(summary).to_be_hidden()
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()


# --- Issue 18: granted and collected; finding a request -------------------------------------


def test_approved_rows_show_what_was_granted_and_whether_it_was_collected(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    permissions = [{"resource": "plant/line2/#", "operation": "readWrite", "context": "mqtt"}]
    assert register(base, "agent-0007", roles=["minimum", "operator"], permissions=permissions)[0] == 202
    open_request(page, "agent-0007")
    page.uncheck("#grant-roles input[value=operator]")
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    row = request_row(page, "agent-0007")
    rights = row.locator("td.rights")
    expect(rights).to_contain_text("Granted")
    expect(rights.locator(".not-granted")).to_contain_text("operator")
    expect(rights.locator(".chip").first).to_have_text("minimum")
    expect(row).to_contain_text("Not collected yet")
    assert register(base, "agent-0007", roles=["minimum", "operator"], permissions=permissions)[0] == 201
    expect(row).to_contain_text("Collected")
    expect(row).not_to_contain_text("Not collected yet")


def test_a_denied_row_says_whether_its_client_was_told(page: sync_api.Page, base: str) -> None:
    """Proves ADMIN-4.7-POLL-STATS on the page (issue 27 item 7): a denied request's 403 poll shows as told."""
    sign_in(page, base)
    unlock(page)
    assert register(base, "told-0001")[0] == 202
    deny = "/api/client-registry/requests/told-0001/deny"
    assert call(base, "POST", deny, {"reason": "not ours"}, token=TOKEN)[0] == 200
    page.reload()  # a first listing brings the poll statistics at once
    row = request_row(page, "told-0001")
    expect(row.locator(".collected")).to_have_text("Not told yet")
    assert register(base, "told-0001")[0] == 403  # the client polls and is told
    page.reload()
    expect(row.locator(".collected")).to_contain_text("Told")
    expect(row.locator(".collected")).not_to_contain_text("Not told")
    assert axe_violations(page) == []


def shown_usernames(page: sync_api.Page) -> list[str]:
    return page.locator("#requests-body tr").evaluate_all("rows => rows.map((row) => row.dataset.username)")


def test_pending_first_newest_first_with_filter_search_and_new_arrivals(page: sync_api.Page, base: str) -> None:
    assert call(base, "POST", "/api/client-registry/unlock", token=TOKEN)[0] == 200
    pairing = {}
    for number in range(1, 6):
        status, body = register(base, f"dev-{number}")
        assert status == 202
        pairing[body["username"]] = body["pairingId"]
    approve(base, "dev-1")
    approve(base, "dev-2")
    sign_in(page, base)
    expect(page.locator("#requests-body tr")).to_have_count(5)
    expect(page.locator("#requests-body tr").first).to_have_attribute("data-username", "dev-5")
    assert shown_usernames(page) == ["dev-5", "dev-4", "dev-3", "dev-2", "dev-1"]
    expect(page).to_have_title("(3 pending) Client Registry")
    expect(page.locator("#requests-body .is-new")).to_have_count(0)  # all were there at sign-in

    page.click("#filter-pending")
    expect(page.locator("#requests-body tr")).to_have_count(3)
    expect(page.locator("#filter-pending")).to_have_attribute("aria-pressed", "true")
    page.fill("#search", "DEV-4")
    expect(page.locator("#requests-body tr")).to_have_count(1)
    page.fill("#search", pairing["dev-3"])
    assert shown_usernames(page) == ["dev-3"]
    page.fill("#search", "dev-1")
    expect(page.locator("#requests-empty")).to_contain_text("No pending request matches")
    page.click("#filter-all")
    assert shown_usernames(page) == ["dev-1"]
    page.fill("#search", "")
    page.select_option("#sort", "oldest")
    assert shown_usernames(page) == ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5"]
    page.select_option("#sort", "pending")

    assert register(base, "dev-6")[0] == 202
    expect(page.locator("#requests-body tr").first).to_have_attribute("data-username", "dev-6")
    expect(request_row(page, "dev-6")).to_have_class("actionable is-new")
    expect(request_row(page, "dev-6")).to_contain_text("New")
    expect(page).to_have_title("(4 pending) Client Registry")
    expect(page.locator("#toast")).to_contain_text("New request from dev-6")
    open_request(page, "dev-6")
    page.keyboard.press("Escape")
    expect(request_row(page, "dev-6")).not_to_have_class("actionable is-new")


# --- Issue 18: stale state ---------------------------------------------------------------------


def test_no_stale_state_before_sign_in_after_sign_out_or_after_an_outage(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)  # says "Unknown" before the token, "Locked" after
    unlock(page)
    expect(page.locator("#lock-detail")).to_contain_text("Accepting new requests")

    # The server goes away; a button is pressed meanwhile; the server comes back.
    page.route("**/api/**", lambda route: route.abort("connectionrefused"))
    page.click("#lock")
    expect(page.locator("#banner")).to_contain_text("cannot be reached")
    page.unroute("**/api/**")
    expect(page.locator("#banner")).to_be_hidden()
    expect(page.locator("#lock-state")).to_have_text("Unlocked")

    page.click("#sign-out")
    expect(page.locator("#token-dialog")).to_be_visible()
    expect(page.locator("#lock-state")).to_have_text("Unknown")
    detail = page.locator("#lock-detail").text_content()
    assert "Accepting" not in detail
    page.wait_for_timeout(1200)
    expect(page.locator("#lock-detail")).to_have_text(detail)  # no countdown runs
    expect(page).to_have_title("Client Registry")


# --- Issue 18: accessibility -------------------------------------------------------------------


def axe_violations(page: sync_api.Page) -> list[str]:
    """The serious and critical violations axe-core finds in the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    results = page.evaluate("axe.run(document, { resultTypes: ['violations'] })")
    return [
        f"{violation['id']} ({violation['impact']}): {[node['target'] for node in violation['nodes']][:5]}"
        for violation in results["violations"]
        if violation["impact"] in ("serious", "critical")
    ]


def contrast(first: str, second: str) -> float:
    """WCAG 2.2's contrast ratio of two CSS colours given as "rgb(r, g, b)"."""

    def luminance(colour: str) -> float:
        channels = [int(part) / 255 for part in re.findall(r"\d+", colour)[:3]]
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize("size", ["1440x900", "390x844"])
def test_axe_finds_no_serious_violation(page: sync_api.Page, base: str, size: str) -> None:
    """axe-core on the sign-in dialog, the Requests view, the Grant Access dialog and the Users view."""
    width, height = VIEWPORTS[size]
    page.set_viewport_size({"width": width, "height": height})
    page.goto(base + "/")
    expect(page.locator("#token-dialog")).to_be_visible()
    assert page.locator("#token-input").get_attribute("autocomplete") == "off"  # no password manager
    assert axe_violations(page) == []
    give_token(page)
    expect(page.locator("#lock-state")).to_have_text("Locked")
    unlock(page)
    serials = populate_long_values(base)
    assert register(base, "denied-0001")[0] == 202
    assert call(base, "POST", "/api/client-registry/requests/denied-0001/deny", {"reason": "no"}, token=TOKEN)[0] == 200
    late = [{"resource": "a/b", "operation": "read", "context": "mqtt"}]
    assert register(base, "late-0001", permissions=late)[0] == 202
    expect(request_row(page, "late-0001")).to_have_class("actionable is-new")
    assert axe_violations(page) == []
    # What axe does not measure: a field's border against the card (WCAG 1.4.11 asks 3:1).
    border = page.locator("#search").evaluate("node => getComputedStyle(node).borderTopColor")
    assert contrast(border, "rgb(255, 255, 255)") >= 3, border

    open_request(page, "late-0001")
    page.click("#grant-add-permission")
    labels = page.locator("#grant-permissions input, #grant-permissions select, #grant-permissions button")
    names = labels.evaluate_all("nodes => nodes.map((node) => node.getAttribute('aria-label'))")
    assert len(names) == 8 and len(set(names)) == 8, names
    page.click("#grant-allow")  # the empty resource is marked
    expect(page.locator("#grant-error")).to_be_visible()
    assert axe_violations(page) == []
    page.locator("#grant-close").click()

    page.click("#tab-users")
    expect(page.locator("#users-body .serial")).to_have_text(serials[LONG_NAME])
    expect(page.locator("#view-users h1")).to_have_text("Users")
    expect(page.locator("#users-body")).to_contain_text("Renew from")
    assert axe_violations(page) == []
    assert page.evaluate("window.cspViolations") == []


# --- Issue 18: refreshing cheaply ---------------------------------------------------------------


def test_an_unchanged_list_is_not_rendered_again(page: sync_api.Page, base: str) -> None:
    """300 requests: refreshes that bring nothing new change nothing in the page; a poll changes one row.

    The page shows 50 rows at a time, and the poll statistics at a slower
    pace (issue 27): the test moves the page's clock on to them.

    Whether or not the server tags its lists: when it does, the page's
    refreshes carry the tag and the unchanged list comes back as a 304.
    """
    listings: list[tuple[int, str | None, str | None]] = []  # status, If-None-Match sent, ETag received
    page.on(
        "response",
        lambda response: (
            LISTING.search(response.url)
            and listings.append(
                (response.status, response.request.headers.get("if-none-match"), response.headers.get("etag"))
            )
        ),
    )
    page.clock.install()
    sign_in(page, base)
    unlock(page)
    for number in range(300):
        assert register(base, f"bulk-{number:04d}", roles=["minimum"])[0] == 202
    expect(page.locator("#requests-body tr")).to_have_count(50)
    page.clock.fast_forward(31_000)  # every row's poll statistics
    expect(request_row(page, "bulk-0150")).to_have_count(0)
    expect(request_row(page, "bulk-0270")).not_to_contain_text("counting")
    page.evaluate(WATCH_ROWS)
    listings.clear()
    page.wait_for_timeout(7000)  # two refreshes at least
    assert page.evaluate("window.rowMutations") == 0
    assert len(listings) >= 2, listings
    tags = {etag for _, _, etag in listings}
    if tags != {None}:  # the server sends validators: nothing changed, so nothing is sent again
        assert all(status == 304 and sent in tags for status, sent, _ in listings), listings

    # A row's control, focused from the keyboard, shows a solid ring below the sticky header.
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    button = page.get_by_role("button", name="Review the request of bulk-0299")
    button.focus()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    expect(button).to_be_focused()
    header = page.locator("#requests thead th").first.bounding_box()
    assert button.bounding_box()["y"] >= header["y"] + header["height"]
    ring = button.evaluate("node => [getComputedStyle(node).outlineStyle, getComputedStyle(node).outlineColor]")
    assert ring == ["solid", "rgb(35, 87, 217)"]  # #2357d9: 6.1:1 on white

    assert register(base, "bulk-0270", roles=["minimum"])[0] == 202
    page.clock.fast_forward(31_000)
    expect(request_row(page, "bulk-0270")).to_contain_text("1 poll")
    assert page.evaluate("window.rowMutations") > 0


def test_the_page_sends_its_etag_and_keeps_the_rows_on_304(page: sync_api.Page, base: str) -> None:
    """With a server that tags its lists, the page asks If-None-Match and a 304 leaves the rows as they are."""
    sign_in(page, base)
    unlock(page)
    assert register(base, "tagged-0001")[0] == 202
    listing = call(base, "GET", "/api/client-registry/requests", token=TOKEN)[1]
    asked: list[str | None] = []

    def answer(route: sync_api.Route) -> None:
        asked.append(route.request.headers.get("if-none-match"))
        if route.request.headers.get("if-none-match") == '"v1"':
            route.fulfill(status=304, headers={"ETag": '"v1"'})
        else:
            route.fulfill(json=listing, headers={"ETag": '"v1"'})

    page.route(LISTING, answer)
    expect(request_row(page, "tagged-0001")).to_be_visible()
    page.evaluate(WATCH_ROWS)
    deadline = time.monotonic() + REFRESH_TIMEOUT_MS / 1000
    while asked.count('"v1"') < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert asked.count('"v1"') >= 2, asked
    expect(request_row(page, "tagged-0001")).to_contain_text("Pending")
    expect(page.locator("#banner")).to_be_hidden()
    assert page.evaluate("window.rowMutations") == 0
    assert page.console_errors == []


# --- Issue 25: a request that came by EST -------------------------------------------------


def test_a_request_that_came_by_est_is_marked_in_its_row_and_its_dialog(page: sync_api.Page, tmp_path: Path) -> None:
    """Proves EST-10.4-VIA on the page: the administrator sees how the request came."""
    with running_server(tmp_path) as srv:
        core = srv.app.core
        core.unlock()
        core.register_via("est", {"username": "plc-0001", "csr": make_csr("plc-0001"), "roles": []})
        core.register({"username": "agent-0001", "csr": make_csr("agent-0001")})
        sign_in(page, srv.url)

        expect(request_row(page, "plc-0001").locator(".via")).to_have_text("by EST")
        expect(request_row(page, "agent-0001").locator(".via")).to_have_count(0)
        open_request(page, "plc-0001")
        expect(page.locator("#grant-method")).to_have_text("Certificate signing request (CSR), by EST (RFC 7030)")


# --- Issue 27: the server's clock, focus that stays, cost, zoom, a background tab ---------------

# The browser's clock ahead of the server's by SKEW milliseconds: Date.now() and new Date() alone.
SKEWED_CLOCK = """
(() => {
  const skew = SKEW;
  const Real = Date;
  class Skewed extends Real {
    constructor(...parts) { if (parts.length) super(...parts); else super(Real.now() + skew); }
    static now() { return Real.now() + skew; }
  }
  window.Date = Skewed;
})();
"""
# The tab as the browser has it when the administrator works in another one.
HIDDEN_TAB = """
Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
document.dispatchEvent(new Event("visibilitychange"));
"""


def api_calls(page: sync_api.Page) -> list[str]:
    """Every API call the page makes from now on, as "METHOD path?query"."""
    calls: list[str] = []
    page.on("request", lambda request: "/api/" in request.url and calls.append(f"{request.method} {request.url}"))
    return calls


def test_the_countdown_comes_from_the_server_not_the_browser_s_clock(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 1: ten minutes ahead, the page shows the server's five minutes, Lock works, and no loop."""
    page.add_init_script(SKEWED_CLOCK.replace("SKEW", str(10 * 60 * 1000)))
    sign_in(page, base)
    assert page.evaluate("Date.now() - performance.timeOrigin - performance.now()") > 9 * 60 * 1000
    unlock(page)
    expect(page.locator("#lock-detail")).to_contain_text("for 4:5")
    calls = api_calls(page)
    page.wait_for_timeout(4000)
    expect(page.locator("#lock-state")).to_have_text("Unlocked")
    expect(page.locator("#lock")).to_be_enabled()
    assert len(calls) <= 8, calls  # a refresh every three seconds: a few calls, not hundreds
    page.click("#lock")
    expect(page.locator("#lock-state")).to_have_text("Locked")
    assert call(base, "GET", "/api/client-registry", token=TOKEN)[1]["locked"] is True


def test_a_window_that_ends_is_confirmed_once_not_in_a_loop(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 1: a browser five seconds ahead: when the server's window ends, the page asks once."""
    page.add_init_script(SKEWED_CLOCK.replace("SKEW", "5000"))
    sign_in(page, base)
    assert call(base, "POST", "/api/client-registry/unlock", {"duration": 9000}, token=TOKEN)[0] == 200
    expect(page.locator("#lock-state")).to_have_text("Unlocked")
    calls = api_calls(page)
    expect(page.locator("#lock-state")).to_have_text("Locked")
    page.wait_for_timeout(3000)
    assert len(calls) <= 10, calls


def long_request(base: str, username: str) -> None:
    """A pending request whose dialog scrolls: many permissions and a long context."""
    permissions = [
        {"resource": f"plant/line{number}/cabinet/{number}/#", "operation": "read", "context": "mqtt"}
        for number in range(24)
    ]
    assert register(base, username, roles=["minimum"], permissions=permissions, context=LONG_CONTEXT[:900])[0] == 202


def test_each_dialog_opens_at_its_top_with_the_pairing_id_in_view(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 2: the body scrolled down in one request does not open the next one scrolled."""
    page.set_viewport_size({"width": 1280, "height": 720})
    sign_in(page, base)
    unlock(page)
    long_request(base, "line-0001")
    long_request(base, "line-0002")
    open_request(page, "line-0002")
    page.locator("#grant-allow").focus()
    page.evaluate("document.getElementById('grant-body').scrollTop = 100000")
    assert page.evaluate("document.getElementById('grant-body').scrollTop") > 500
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    open_request(page, "line-0001")
    assert page.evaluate("document.getElementById('grant-body').scrollTop") == 0
    pairing = page.locator("#grant-pairing").bounding_box()
    assert inside(pairing, page.locator("#grant-body").bounding_box())


def test_focus_stays_on_its_control_across_decisions_and_refreshes(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 3: after Allow, after a decision elsewhere above the focus, after Unlock and Lock."""
    sign_in(page, base)
    unlock(page)
    for name in ("fleet-0001", "fleet-0002", "fleet-0003", "fleet-0004"):
        assert register(base, name)[0] == 202
    next_button = page.get_by_role("button", name="Review the request of fleet-0003")
    expect(next_button).to_be_visible()
    open_request(page, "fleet-0004")  # newest first: 0004, 0003, 0002, 0001
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    expect(next_button).to_be_focused()
    expect(request_row(page, "fleet-0004")).to_contain_text("Approved")  # the refresh moved the rows
    page.wait_for_timeout(3500)
    expect(next_button).to_be_focused()

    # Another administrator decides the row above the focused one.
    page.get_by_role("button", name="Review the request of fleet-0002").focus()
    approve(base, "fleet-0003")
    expect(request_row(page, "fleet-0003")).to_contain_text("Approved")
    expect(page.get_by_role("button", name="Review the request of fleet-0002")).to_be_focused()

    page.locator("#unlock").focus()
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    expect(page.locator("#unlock")).to_be_focused()
    page.locator("#lock").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#lock-state")).to_have_text("Locked")
    focused = page.evaluate("document.activeElement.id")
    assert focused in ("lock", "unlock"), focused


def test_an_idle_page_with_polling_clients_costs_almost_nothing(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 4: polls leave the listing's tag alone; rows are paged; long permission lists are a count."""
    page.clock.install()
    sign_in(page, base)
    unlock(page)
    names = [f"poller-{number:04d}" for number in range(60)]
    many = [{"resource": f"plant/cell{number}/#", "operation": "read", "context": "mqtt"} for number in range(12)]
    for name in names:
        assert register(base, name, permissions=many if name == "poller-0059" else [])[0] == 202
    expect(request_row(page, "poller-0059")).to_be_visible()
    rows = page.locator("#requests-body tr")
    assert rows.count() <= 50
    expect(page.locator("#requests-more")).to_contain_text("more")
    first = request_row(page, "poller-0059")
    expect(first.locator("details.permissions summary")).to_have_text("12 permissions")
    expect(first.locator(".perm").first).to_be_hidden()

    listings: list[tuple[str, int, str | None]] = []  # the URL, the status, the length of the body
    page.on(
        "response",
        lambda response: (
            LISTING.search(response.url)
            and listings.append((response.url, response.status, response.headers.get("content-length")))
        ),
    )
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:  # every client polls, again and again
        for name in names[-20:]:
            assert register(base, name, permissions=many if name == "poller-0059" else [])[0] == 202
    page.wait_for_timeout(500)  # the sync API delivers the page's events when it is called
    assert len(listings) >= 2, listings
    assert all(status == 304 for _, status, _ in listings), listings

    page.clock.fast_forward(31_000)  # the poll statistics come at a slower pace
    expect(first).not_to_contain_text("0 polls")
    page.click("#requests-more")
    expect(rows).to_have_count(60)


def test_the_dialog_s_head_and_decision_stay_reachable_at_any_zoom(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 5: 1280x720 at 200% and 400% zoom is 640x360 and 320x180 CSS pixels.

    At 200% the request's details get room; at either zoom the wheel brings
    the heading, the pairing id, Deny and Allow into view within the dialog.
    """
    sign_in(page, base)
    unlock(page)
    long_request(base, "zoomed-0001")
    for width, height in ((640, 360), (320, 180)):
        page.set_viewport_size({"width": width, "height": height})
        open_request(page, "zoomed-0001")
        dialog = page.locator("#grant-dialog")
        page.mouse.move(width / 2, height / 2)
        if width == 640:
            shown = page.evaluate(VISIBLE_HEIGHT, "#grant-body")
            assert shown >= 150, shown
        for control, wheel in (("#grant-heading", -20000), ("#grant-pairing", -20000), ("#grant-allow", 20000)):
            page.mouse.wheel(0, wheel)
            page.wait_for_timeout(300)
            box = page.locator(control).bounding_box()
            assert inside(box, viewport_box(page)) and inside(box, dialog.bounding_box()), (width, control, box)
            assert page.evaluate(VISIBLE_HEIGHT, control) >= box["height"] - 1, (width, control)
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()


# How much of an element shows: its height within every box that clips it, and within the viewport.
VISIBLE_HEIGHT = """
(selector) => {
  const node = document.querySelector(selector);
  let { top, bottom } = node.getBoundingClientRect();
  for (let box = node.parentElement; box; box = box.parentElement) {
    if (getComputedStyle(box).overflowY !== "visible") {
      const clip = box.getBoundingClientRect();
      top = Math.max(top, clip.top);
      bottom = Math.min(bottom, clip.bottom);
    }
  }
  return Math.max(0, Math.min(bottom, innerHeight) - Math.max(top, 0));
}
"""


def test_a_background_tab_still_counts_what_waits(page: sync_api.Page, base: str) -> None:
    """Issue 27 item 6: a hidden tab refreshes at a slower pace, so its title tells what arrived."""
    page.clock.install()
    sign_in(page, base)
    unlock(page)
    page.evaluate(HIDDEN_TAB)
    assert register(base, "while-away")[0] == 202
    for _ in range(8):
        page.clock.fast_forward(3_000)
        page.wait_for_timeout(200)
    expect(page).to_have_title("(1 pending) Client Registry")


# --- Issue 27 item 7: the smaller things ---------------------------------------------------------


def test_signing_in_again_keeps_the_open_dialog_and_what_was_typed(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "kept-0001", roles=["minimum", "operator"])[0] == 202
    open_request(page, "kept-0001")
    page.uncheck("#grant-roles input[value=operator]")
    page.fill("#grant-reason", "asked for too much")
    page.evaluate("sessionStorage.setItem('clientRegistry.adminToken', 'changed')")
    expect(page.locator("#token-dialog")).to_be_visible()
    give_token(page)
    expect(page.locator("#token-dialog")).to_be_hidden()
    expect(page.locator("#grant-dialog")).to_be_visible()
    expect(page.locator("#grant-reason")).to_have_value("asked for too much")
    expect(page.locator("#grant-roles input[value=operator]")).not_to_be_checked()
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()
    assert register(base, "kept-0001", roles=["minimum", "operator"])[1]["roles"] == ["minimum"]


def test_while_the_server_is_down_nothing_claims_to_retry_or_to_know_the_lock(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "outage-0001")[0] == 202
    open_request(page, "outage-0001")
    page.route("**/api/**", lambda route: route.abort("connectionrefused"))
    page.click("#grant-allow")
    error = page.locator("#grant-error")
    expect(error).to_contain_text("cannot be reached")
    expect(error).to_contain_text("Nothing was changed")
    expect(error).not_to_contain_text("keeps trying")
    page.keyboard.press("Escape")
    expect(page.locator("#lock-state")).to_have_text("Unknown")
    expect(page.locator("#lock-detail")).to_contain_text("cannot be reached")
    for button in ("#unlock", "#lock"):
        expect(page.locator(button)).to_be_disabled()
    page.unroute("**/api/**")
    expect(page.locator("#lock-state")).to_have_text("Unlocked")
    expect(page.locator("#lock")).to_be_enabled()


def test_direction_overrides_and_control_characters_are_shown_not_obeyed(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    context = "invoice \u202egnp.exe\u202c and a bell \u0007"
    assert register(base, "bidi-0001", context=context)[0] == 202
    cell = request_row(page, "bidi-0001").locator(".context-cell")
    expect(cell).to_contain_text("U+202E")
    expect(cell).to_contain_text("U+0007")
    assert "\u202e" not in cell.text_content()
    assert cell.locator("[dir=auto], bdi").count() >= 1
    open_request(page, "bidi-0001")
    expect(page.locator("#grant-context")).to_contain_text("U+202E")
    assert "\u202e" not in page.locator("#grant-context").text_content()


def test_the_sign_in_says_where_this_server_keeps_its_token(page: sync_api.Page, base: str) -> None:
    page.goto(base + "/")
    hint = page.locator("#token-hint")
    expect(hint).to_contain_text("--admin-token")
    expect(hint).not_to_contain_text("registry-data/admin-token")


def test_the_focused_dialog_heading_shows_a_ring(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    unlock(page)
    assert register(base, "ring-0001")[0] == 202
    open_request(page, "ring-0001")
    heading = page.locator("#grant-heading")
    expect(heading).to_be_focused()
    ring = heading.evaluate("node => [getComputedStyle(node).outlineStyle, getComputedStyle(node).outlineWidth]")
    assert ring[0] == "solid" and ring[1] != "0px", ring


def test_a_phone_card_shows_no_empty_context(page: sync_api.Page, base: str) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, base)
    unlock(page)
    assert register(base, "quiet-0001")[0] == 202
    expect(request_row(page, "quiet-0001")).to_be_visible()
    expect(request_row(page, "quiet-0001").locator(".context-cell")).to_be_hidden()


def test_api_answers_are_not_sniffed(page: sync_api.Page, base: str) -> None:
    sign_in(page, base)
    answer = page.request.get(base + "/api/client-registry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.headers["x-content-type-options"] == "nosniff"


# --- Issue 27, what was missing ------------------------------------------------------------------


def test_the_dialog_shows_the_csr_s_key_and_users_show_the_certificate_s_fingerprint(
    page: sync_api.Page, base: str
) -> None:
    """Missing 1: key type and SHA-256 of the public key beside the pairing id; serial and fingerprint in Users."""
    key = make_key("p384")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    sign_in(page, base)
    unlock(page)
    csr = make_csr("edge-0001", key)
    assert call(base, "POST", "/api/client-registry/register", {"username": "edge-0001", "csr": csr})[0] == 202
    open_request(page, "edge-0001")
    expect(page.locator("#grant-key-type")).to_have_text("EC secp384r1")
    digest = hashlib.sha256(spki).hexdigest().upper()
    expect(page.locator("#grant-key-sha256")).to_have_text(":".join(digest[i : i + 2] for i in range(0, 64, 2)))
    page.click("#grant-allow")
    expect(page.locator("#grant-dialog")).to_be_hidden()

    answer = call(base, "POST", "/api/client-registry/register", {"username": "edge-0001", "csr": csr})[1]
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    page.click("#tab-users")
    row = page.locator("#users-body tr")
    expect(row).to_contain_text(format(certificate.serial_number, "x"))
    expect(row.locator(".fingerprint")).to_have_text(certificate.fingerprint(hashes.SHA256()).hex(":").upper())


def test_the_search_looks_in_context_roles_topics_and_address(page: sync_api.Page, base: str) -> None:
    """Missing 2."""
    sign_in(page, base)
    unlock(page)
    topic = [{"resource": "plant/boiler-7/#", "operation": "read", "context": "mqtt"}]
    assert register(base, "dev-a", context="cabinet 4 by the loading dock")[0] == 202
    assert register(base, "dev-b", roles=["operator"])[0] == 202
    assert register(base, "dev-c", permissions=topic)[0] == 202
    expect(page.locator("#requests-body tr")).to_have_count(3)
    for query, expected in (("loading dock", ["dev-a"]), ("OPERATOR", ["dev-b"]), ("boiler-7", ["dev-c"])):
        page.fill("#search", query)
        expect(page.locator("#requests-body tr")).to_have_count(len(expected))
        assert shown_usernames(page) == expected, query
    page.fill("#search", "127.0.0.1")
    expect(page.locator("#requests-body tr")).to_have_count(3)


def test_a_fleet_is_approved_or_denied_at_once_after_a_confirmation(page: sync_api.Page, base: str) -> None:
    """Missing 3: select, confirm a list of names and rights, one call each, each failure reported."""
    sign_in(page, base)
    unlock(page)
    for number in range(1, 6):
        assert register(base, f"fleet-{number:04d}", roles=["minimum"])[0] == 202
    assert register(base, "other-0001")[0] == 202
    expect(page.locator("#requests-body tr")).to_have_count(6)
    page.fill("#search", "fleet-")
    expect(page.locator("#requests-body tr")).to_have_count(5)
    page.click("#bulk-select-all")
    expect(page.locator("#bulk-count")).to_have_text("5 selected")
    page.get_by_role("checkbox", name="Select fleet-0005").uncheck()
    expect(page.locator("#bulk-count")).to_have_text("4 selected")
    approve(base, "fleet-0004")  # another administrator is quicker for one of them

    page.click("#bulk-approve")
    dialog = page.locator("#bulk-dialog")
    expect(dialog).to_contain_text("Approve 4 requests?")
    expect(page.locator("#bulk-list li")).to_have_count(4)
    expect(page.locator('#bulk-list li[data-username="fleet-0001"]')).to_contain_text("roles minimum")
    assert axe_violations(page) == []
    page.click("#bulk-ok")
    expect(page.locator("#banner")).to_contain_text("3 of 4 approved")
    expect(page.locator("#banner")).to_contain_text("fleet-0004")
    for number in (1, 2, 3):
        assert register(base, f"fleet-{number:04d}", roles=["minimum"])[0] == 201
    assert register(base, "fleet-0005", roles=["minimum"])[0] == 202

    page.fill("#search", "")
    page.get_by_role("checkbox", name="Select other-0001").check()
    page.get_by_role("checkbox", name="Select fleet-0005").check()
    page.click("#bulk-deny")
    page.fill("#bulk-reason", "not in the asset list")
    page.click("#bulk-ok")
    expect(page.locator("#toast")).to_contain_text("2 requests denied")
    for name in ("other-0001", "fleet-0005"):
        status, body = register(base, name, roles=["minimum"] if name.startswith("fleet") else [])
        assert (status, body["reason"]) == (403, "not in the asset list")


def test_a_denial_is_forgotten_so_the_device_may_ask_again(page: sync_api.Page, base: str) -> None:
    """Missing 4: DELETE .../requests/{u}, after asking."""
    sign_in(page, base)
    unlock(page)
    assert register(base, "mistake-0001")[0] == 202
    denial = {"reason": "oops"}
    assert call(base, "POST", "/api/client-registry/requests/mistake-0001/deny", denial, token=TOKEN)[0] == 200
    row = request_row(page, "mistake-0001")
    forget = row.get_by_role("button", name="Forget the denial of mistake-0001")
    forget.click()
    expect(page.locator("#confirm-dialog")).to_contain_text("Forget the denial of mistake-0001?")
    page.click("#confirm-ok")
    expect(row).to_have_count(0)
    assert register(base, "mistake-0001")[0] == 202  # a new request, at once
    expect(request_row(page, "mistake-0001")).to_contain_text("Pending")


def test_times_say_how_long_ago_by_the_server_s_clock_with_their_zone(browser: sync_api.Browser, base: str) -> None:
    """Missing 6: "… ago" by the server's clock, the zone beside each time, the exact UTC time on hover."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, timezone_id="Asia/Kolkata")
    context.add_init_script(SKEWED_CLOCK.replace("SKEW", str(-2 * 60 * 60 * 1000)))  # two hours behind
    page = context.new_page()
    try:
        sign_in(page, base)
        unlock(page)
        assert register(base, "timed-0001")[0] == 202
        first = request_row(page, "timed-0001").locator(".time").first
        expect(first).to_contain_text("First less than a minute ago")
        expect(first).to_contain_text("GMT+5:30")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", first.get_attribute("title"))
        expect(page.locator("#lock-detail")).to_contain_text("GMT+5:30")
    finally:
        context.close()


def test_users_are_searched_filtered_by_certificate_and_revoked_serials_listed(page: sync_api.Page, base: str) -> None:
    """Missing 7: search, a filter by certificate status with counts, and the CRL's revoked serials."""
    sign_in(page, base)
    unlock(page)
    serials = {}
    for name in ("cam-0001", "cam-0002"):
        csr = make_csr(name)
        assert call(base, "POST", "/api/client-registry/register", {"username": name, "csr": csr})[0] == 202
        approve(base, name)
        answer = call(base, "POST", "/api/client-registry/register", {"username": name, "csr": csr})[1]
        serials[name] = format(x509.load_pem_x509_certificate(answer["certificate"].encode()).serial_number, "x")
    assert register(base, "panel-0001", roles=["operator"])[0] == 202
    approve(base, "panel-0001")
    page.click("#tab-users")
    rows = page.locator("#users-body tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#users-filter-valid-count")).to_have_text("2")
    expect(page.locator("#users-filter-password-count")).to_have_text("1")
    page.click('[data-user-filter="password"]')
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("panel-0001")
    page.click('[data-user-filter="all"]')
    page.fill("#users-search", serials["cam-0002"][:12])
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("cam-0002")
    page.fill("#users-search", "operator")
    expect(rows).to_have_count(1)
    page.fill("#users-search", "")

    page.get_by_role("button", name="Delete cam-0001").click()
    page.click("#confirm-ok")
    revoked = page.locator("#revoked")
    expect(revoked).to_contain_text("Revoked certificates (1)")
    expect(revoked.locator(".revoked-serial")).to_have_text(serials["cam-0001"])


def test_the_audit_view_says_who_did_what(page: sync_api.Page, base: str) -> None:
    """Missing 5: the audit, newest first, with its actor; a decidedBy or a named actor is shown when given."""
    sign_in(page, base)
    unlock(page)
    assert register(base, "audited-0001")[0] == 202
    approve(base, "audited-0001")
    page.click("#tab-audit")
    rows = page.locator("#audit-body tr")
    expect(rows.first).to_contain_text("approved audited-0001")
    # The quick start's token is the administrator "admin" (ADMIN-4.9-ATTRIBUTED); the cell is its name and address.
    expect(rows.first.locator("td").nth(1)).to_have_text(re.compile(r"^admin\s*127\.0\.0\.1$"))
    expect(page.locator("#audit-body")).to_contain_text("unlocked the registry")
    expect(page.locator("#audit-body")).to_contain_text("asked to be registered")
    assert axe_violations(page) == []

    # A server with named administrators: the page shows the names it is given.
    listing = call(base, "GET", "/api/client-registry/requests", token=TOKEN)[1]
    named = [entry | {"decidedBy": "alice"} for entry in listing]
    page.route(LISTING, lambda route: route.fulfill(json=named))
    page.click("#tab-registry")
    expect(request_row(page, "audited-0001")).to_contain_text("by alice")

// The administrator's page of the client registry: the Client Registry view
// (lock, requests, the Grant Access dialog) and the Users view.
//
// Safety: everything a client sent (username, context, permissions, roles) is
// put into the page with textContent or as a property, never as markup, and
// the page's Content-Security-Policy allows no inline script or style.
//
// Staying in place: the lists are refreshed every few seconds, but each row is
// kept and rewritten only when its request changed, so the scroll position,
// the focus and an open dialog survive a refresh.
//
// Refreshing cheaply: a list is fetched with the ETag of its last answer in
// If-None-Match (RFC 9110 section 13.1.2). A 304 keeps what is shown; so does
// an answer whose text is the one already shown, for a server that sends no
// ETag. Only a list that changed is rendered again. Every few seconds the page
// asks for the requests without their poll statistics (?polls=omit), whose tag
// changes only with arrivals and decisions; the statistics, which every poll
// changes, come at a slower pace. The list shows a page of rows at a time.
//
// The server's clock: the lock's countdown starts from the time the server
// says is left (unlockedForMs) and runs on this page's monotonic clock, so a
// browser whose clock is wrong still shows the server's window.
//
// Focus stays: a refresh that moves or rewrites the row holding the focus puts
// it back on the same control of the same request (or of its next neighbour).
"use strict";

const TOKEN_KEY = "clientRegistry.adminToken"; // sessionStorage: this browser tab only
const REFRESH_MS = 3000;
const HIDDEN_REFRESH_MS = 15000; // a tab in the background: slower, but its title still counts what waits
const POLL_STATS_MS = 30000; // the poll statistics, which every poll changes
const POLL_STATS_SOONEST_MS = 10000; // after an arrival, the statistics of the new rows, at most this often
const PAGE_SIZE = 50; // rows shown at a time
const PERMISSIONS_SHOWN = 3; // a longer list of permissions is a count that expands
const REQUESTS_PATH = "/client-registry/requests";
const DECISIONS_PATH = "/client-registry/requests?polls=omit";
// Characters that reorder or hide text (Unicode bidi controls, zero-width marks) and C0/C1 controls
// but tab and newline: shown as "⟨U+202E⟩" rather than obeyed.
const HIDDEN_CHARACTERS = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]/g;
const TOAST_MS = 5000;
const TITLE = "Client Registry";
const OPERATIONS = ["read", "write", "readWrite"];
const CONTEXTS = ["mqtt", "http"];
const STATE_LABELS = { pending: "Pending", approved: "Approved", denied: "Denied" };
const CERTIFICATE_LABELS = { valid: "Valid", renew: "Renewal due", expired: "Expired" };
const PERMISSION_FIELDS = ["resource", "operation", "context"];
// How the registry names a permission in an error: "permissions[1].resource must start with '/' ..."
const PERMISSION_PROBLEM = /^permissions\[(\d+)\](?:\.(resource|operation|context))?\s+(.*)$/s;

const $ = (id) => document.getElementById(id);

/** A refused API call: its HTTP status (0 when the server was not reached) and JSON error body. */
class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the server answered ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

const page = {
  view: "registry",
  session: 0, // grows at each sign-out, so that an answer to an older session is dropped
  statusKnown: false, // the lock state is unknown until a signed-in call answers
  reachable: true, // false from a call that did not reach the server until one does
  unlockedUntil: null, // the server's ISO time, or null when locked
  lockDeadline: null, // performance.now() at which the server's window ends, or null when locked
  lockBusy: false, // an Unlock or Lock call is under way
  polls: new Map(), // username -> { lastPollAt, pollCount, clientAddress } from the last full listing
  pollsFetchedAt: -Infinity, // performance.now() of the last full listing
  lastRefreshAt: -Infinity,
  clockOffset: 0, // the server's clock minus the browser's, from the Date of the last answer
  shownLimit: PAGE_SIZE,
  signInHint: null, // where the server keeps its token, as it said
  auditText: null, // the newest audit page shown, as text
  auditNext: null, // the id to ask entries before, for Older entries
  users: null, // the users as the server last listed them
  userFilter: "all",
  selected: new Set(), // pending requests chosen for one approval or denial of them all
  matching: [], // the requests the filter and the search let through, in order
  pending: 0,
  lists: new Map(), // API path -> { etag, text, data } of its last answer
  requests: new Map(), // username -> the request as the server last listed it
  position: new Map(), // username -> its place in the server's listing, oldest first
  requestRows: new Map(), // username -> { row, key }
  userRows: new Map(),
  filter: "all",
  search: "",
  sort: "pending",
  known: null, // the usernames of the first listing after sign-in: anything else arrived since
  fresh: new Set(), // arrivals not yet opened, highlighted as new
  drafts: new Map(), // username -> a denial reason typed but not sent
  catalog: null, // [{name, description}]
  openRequest: null, // the username whose Grant Access dialog is open
  opening: false,
  focusAfterClose: null,
  warnedDraft: false,
  signingIn: false, // a 401 now means the token just typed is wrong
  refreshing: false,
  refreshAgain: false,
  bannerSource: null,
  toastTimer: null,
};

// --- Small DOM helpers: text only, never markup ----------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

/**
 * Text a client sent, isolated from the text around it (dir="auto", as <bdi>)
 * and with its invisible controls shown: a right-to-left override cannot
 * reverse what the administrator reads.
 */
function clientText(tag, className, text) {
  const node = element(tag, className);
  node.dir = "auto";
  const value = text === undefined || text === null ? "" : String(text);
  let last = 0;
  for (const match of value.matchAll(HIDDEN_CHARACTERS)) {
    node.append(value.slice(last, match.index));
    const code = match[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    const mark = element("span", "control-char", `⟨U+${code}⟩`);
    mark.title = "An invisible control character the client sent";
    node.append(mark);
    last = match.index + match[0].length;
  }
  node.append(value.slice(last));
  return node;
}

function cell(label, className, ...children) {
  const node = element("td", className);
  if (label) node.dataset.label = label;
  node.append(...children);
  return node;
}

function chips(values, className, emptyText) {
  if (!values.length) return [element("span", "none", emptyText)];
  return values.map((value) => element("span", className, value));
}

function permissionNodes(permissions, { collapse = false } = {}) {
  if (!permissions.length) return [element("span", "none", "no permissions")];
  const lines = permissions.map((permission) => {
    const line = element("span", "perm");
    line.append(
      element("span", `perm-context ${permission.context}`, permission.context),
      clientText("code", "perm-resource", permission.resource),
      element("span", "perm-operation", permission.operation),
    );
    return line;
  });
  if (!collapse || permissions.length <= PERMISSIONS_SHOWN) return lines;
  // A long list is a count that expands: a 200-row page stays short.
  const details = element("details", "permissions");
  details.append(element("summary", null, `${permissions.length} permissions`), ...lines);
  return [details];
}

function rightsNodes(label, rights) {
  return [
    element("span", "rights-label", label),
    ...chips(rights.roles, "chip", "no roles"),
    ...permissionNodes(rights.permissions, { collapse: true }),
  ];
}

function polls(count) {
  return `${count} ${count === 1 ? "poll" : "polls"}`;
}

/** The server's time now, as far as the page knows it: the browser's clock set right by the last Date header. */
function serverNow() {
  return Date.now() + page.clockOffset;
}

/** A moment in the browser's zone, the zone named: "14:03:22 GMT+1", with the date when it is not today. */
function formatTime(iso) {
  if (!iso) return "";
  const moment = new Date(iso);
  const sameDay = moment.toDateString() === new Date(serverNow()).toDateString();
  const options = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZoneName: "short" };
  if (!sameDay) Object.assign(options, { year: "numeric", month: "short", day: "numeric" });
  return moment.toLocaleString(undefined, options);
}

/** The exact moment in UTC, for a title: "2026-12-06 04:03:22 UTC". */
function exactUtc(iso) {
  return `${new Date(iso).toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

/** How long ago, by the server's clock: "less than a minute ago", "3 min ago", "2 h ago", "4 days ago". */
function ago(iso) {
  const seconds = (serverNow() - Date.parse(iso)) / 1000;
  if (seconds < 60) return "less than a minute ago";
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.floor(hours / 24)} days ago`;
}

/** Every "… ago" on the page, brought up to date (text only where it changed). */
function refreshAgo() {
  for (const node of document.querySelectorAll(".ago[data-at]")) {
    const text = ago(node.dataset.at);
    if (node.textContent !== text) node.textContent = text;
  }
}

function formatCountdown(milliseconds) {
  const total = Math.max(0, Math.ceil(milliseconds / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = String(total % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${seconds}` : `${minutes}:${seconds}`;
}

/** "First 3 min ago", with the moment and its zone beside it and the exact UTC time on hover. */
function timeLine(prefix, iso, className = "line time") {
  const line = element("span", className, prefix ? `${prefix} ` : "");
  if (!iso) return line;
  const relative = element("span", "ago", ago(iso));
  relative.dataset.at = iso;
  line.append(relative, element("span", "at", ` · ${formatTime(iso)}`));
  line.title = exactUtc(iso);
  return line;
}

// --- Messages: the error banner and the success toast ----------------------

function showBanner(message, source) {
  $("banner-text").textContent = message;
  $("banner").hidden = false;
  page.bannerSource = source;
}

function clearBanner(source) {
  if (source === undefined || page.bannerSource === source) {
    $("banner").hidden = true;
    page.bannerSource = null;
  }
}

function showToast(message) {
  const toast = $("toast");
  toast.textContent = message;
  toast.hidden = false;
  clearTimeout(page.toastTimer);
  page.toastTimer = setTimeout(() => {
    toast.hidden = true;
  }, TOAST_MS);
}

function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error.message}`;
  if (error.status === 0) return "The server cannot be reached. Is it running? The page asks again every few seconds.";
  const details = Array.isArray(error.body.details) ? ` (${error.body.details.join("; ")})` : "";
  return `${error.message}${details}`;
}

/**
 * Put an error on the page. A refused token has already asked for the token
 * again; an unreachable server is one banner, whichever call found it, which
 * the next call that reaches the server clears.
 */
function report(error, source) {
  if (error instanceof ApiError && error.status === 401) return;
  const unreachable = error instanceof ApiError && error.status === 0;
  if (unreachable) setReachable(false);
  showBanner(describe(error), unreachable ? "network" : source);
}

/** Whether the last call reached the server: while it does not, the lock's state is unknown. */
function setReachable(reachable) {
  if (page.reachable === reachable) return;
  page.reachable = reachable;
  tick();
  if (reachable) refresh();
}

// --- The API ---------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** One call to the API: its response, whatever its status; a refused token asks for the token again. */
async function send(method, path, body, headers = {}) {
  const sent = token();
  const init = { method, headers: { Authorization: `Bearer ${sent || ""}`, ...headers }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api${path}`, init);
  } catch {
    throw new ApiError(0, null);
  }
  clearBanner("network"); // the server answered
  const date = Date.parse(response.headers.get("Date"));
  if (Number.isFinite(date)) page.clockOffset = date + 500 - Date.now(); // a Date has whole seconds
  setReachable(true);
  // A 401 to a token that was replaced meanwhile (a call sent before signing in again) says nothing of the new one.
  if (response.status === 401 && sent === token()) {
    sessionStorage.removeItem(TOKEN_KEY);
    // A refused token keeps the open dialog and what was typed in it: signing in again goes on from there.
    askForToken(
      page.signingIn
        ? "The server refused this token: check it and try again."
        : "Your administrator token was refused: it may have been changed. Enter it again.",
      { keepWork: true },
    );
  }
  return response;
}

async function api(method, path, body) {
  const response = await send(method, path, body);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** A list, and whether it changed since the last time it was fetched (304, or the same text). */
async function getList(path) {
  const last = page.lists.get(path);
  const response = await send("GET", path, undefined, last && last.etag ? { "If-None-Match": last.etag } : {});
  if (response.status === 304 && last) return { data: last.data, changed: false };
  const text = await response.text();
  if (!response.ok) {
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: the status says enough
    }
    throw new ApiError(response.status, body);
  }
  const etag = response.headers.get("ETag");
  if (last && last.text === text) {
    last.etag = etag;
    return { data: last.data, changed: false };
  }
  const data = JSON.parse(text);
  page.lists.set(path, { etag, text, data });
  return { data, changed: true };
}

const registryPath = (username, action) =>
  `/client-registry/requests/${encodeURIComponent(username)}/${action}`;

// --- Signing in --------------------------------------------------------------

/**
 * Ask for the token. After a sign-out everything shown is forgotten; after a
 * refused token (``keepWork``) the Grant Access dialog stays open under the
 * sign-in with its ticks, edits and reason, and the typed reasons are kept.
 */
function askForToken(message, { keepWork = false } = {}) {
  const dialog = $("token-dialog");
  $("token-error").textContent = message || "";
  $("token-error").hidden = !message;
  $("sign-out").hidden = true;
  forgetSession({ keepWork });
  showSignInHint();
  if (!dialog.open) {
    if (message) showBanner(message, "auth");
    $("token-input").value = "";
    for (const open of document.querySelectorAll("dialog[open]")) {
      if (!(keepWork && open.id === "grant-dialog")) open.close();
    }
    dialog.showModal();
  }
  $("token-input").focus();
}

/** Where this server keeps its token, as it says (GET /api/client-registry/sign-in, no token needed). */
async function showSignInHint() {
  if (page.signInHint) return;
  try {
    const response = await fetch("/api/client-registry/sign-in", { cache: "no-store" });
    if (!response.ok) return;
    page.signInHint = await response.json();
  } catch {
    return; // the hint stays general
  }
  const hint = $("token-hint");
  const { tokenFrom, file } = page.signInHint;
  if (tokenFrom === "file" && file) {
    hint.replaceChildren("The server prints it on its first start and keeps it in ", element("code", null, file), ".");
  } else if (tokenFrom === "flag") {
    hint.replaceChildren("It is the token the server was given with ", element("code", null, "--admin-token"), ".");
  } else if (tokenFrom === "environment") {
    hint.replaceChildren(
      "It is the token the server was given in ",
      element("code", null, "$REGISTRY_ADMIN_TOKEN"),
      ".",
    );
  }
}

async function signIn(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-submit").disabled = true;
  page.signingIn = true;
  try {
    renderStatus(await api("GET", "/client-registry"));
    $("token-dialog").close();
    $("sign-out").hidden = false;
    clearBanner("auth");
    page.catalog = null;
    await refresh();
  } catch (error) {
    if (error.status !== 401) {
      $("token-error").textContent = describe(error);
      $("token-error").hidden = false;
    }
  } finally {
    page.signingIn = false;
    $("token-submit").disabled = false;
  }
}

/** Everything this tab learned while signed in, forgotten: the lists, the lock state, the countdown. */
function forgetSession({ keepWork = false } = {}) {
  page.session += 1;
  for (const rows of [page.requestRows, page.userRows]) {
    for (const { row } of rows.values()) row.remove();
    rows.clear();
  }
  page.lists.clear();
  page.requests.clear();
  page.known = null;
  page.fresh.clear();
  if (!keepWork) {
    page.drafts.clear();
    page.selected.clear();
  }
  page.polls.clear();
  page.pollsFetchedAt = -Infinity;
  page.statusKnown = false;
  page.unlockedUntil = null;
  page.lockDeadline = null;
  page.pending = 0;
  $("pending-count").hidden = true;
  $("crl").hidden = true;
  delete $("crl").dataset.key;
  $("revoked").hidden = true;
  delete $("revoked").dataset.number;
  page.auditText = null;
  $("audit-body").replaceChildren();
  page.users = null;
  updateFilterCounts([]);
  $("requests-empty").hidden = true;
  $("users-empty").hidden = true;
  tick();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  clearBanner();
  askForToken();
}

// --- Refreshing --------------------------------------------------------------

async function refresh() {
  if (!token()) return;
  if (page.refreshing) {
    page.refreshAgain = true; // an action changed something while a refresh was under way
    return;
  }
  page.refreshing = true;
  page.lastRefreshAt = performance.now();
  const session = page.session;
  try {
    do {
      page.refreshAgain = false;
      const [status, requests] = await Promise.all([api("GET", "/client-registry"), getList(DECISIONS_PATH)]);
      if (session !== page.session) return;
      renderStatus(status);
      const polls = await refreshPolls(requests);
      if (session !== page.session) return;
      if (requests.changed || polls) renderRequests(requests.data);
      if (page.view === "users") {
        const users = await getList("/users");
        if (session !== page.session) return;
        if (users.changed) renderUsers(users.data);
        await showRevoked(status.crl);
      }
      if (page.view === "audit") {
        const audit = await api("GET", "/client-registry/audit?limit=100");
        if (session !== page.session) return;
        renderAudit(audit);
      }
      clearBanner("refresh");
    } while (page.refreshAgain);
  } catch (error) {
    if (session === page.session) report(error, "refresh");
  } finally {
    page.refreshing = false;
  }
}

/**
 * The poll statistics, which every poll changes, at a slower pace than the
 * rest; sooner when rows arrived that have none. Whether they changed.
 */
async function refreshPolls(requests) {
  const since = performance.now() - page.pollsFetchedAt;
  const missing = requests.data.some((request) => !page.polls.has(request.username));
  const pace = document.hidden ? POLL_STATS_MS * 2 : POLL_STATS_MS;
  if (since < pace && !(missing && since >= POLL_STATS_SOONEST_MS)) return false;
  page.pollsFetchedAt = performance.now();
  const full = await getList(REQUESTS_PATH);
  if (!full.changed) return false;
  page.polls = new Map(
    full.data.map(({ username, lastPollAt, pollCount, clientAddress }) => [
      username,
      { lastPollAt, pollCount, clientAddress },
    ]),
  );
  return true;
}

function renderStatus(status) {
  page.statusKnown = true;
  page.unlockedUntil = status.locked ? null : status.unlockedUntil;
  // The server's time left, counted down on this page's monotonic clock: the browser's own clock may be wrong.
  // A server without unlockedForMs: from unlockedUntil and the browser's clock, as before.
  const left = status.locked
    ? null
    : Number.isFinite(status.unlockedForMs)
      ? status.unlockedForMs
      : Date.parse(status.unlockedUntil) - Date.now();
  page.lockDeadline = left === null ? null : performance.now() + left;
  page.pending = status.pending;
  const count = $("pending-count");
  count.textContent = String(status.pending);
  count.hidden = status.pending === 0;
  renderCrl(status.crl);
  tick();
}

function renderCrl(crl) {
  const line = $("crl");
  const key = JSON.stringify(crl || null);
  if (line.dataset.key === key) return;
  line.dataset.key = key;
  line.hidden = !crl;
  if (!crl) return;
  const link = element("a", null, "crl.pem");
  link.href = "/api/client-registry/crl.pem";
  line.replaceChildren(
    `Certificate revocation list number ${crl.number}, next update ${formatTime(crl.nextUpdate)}: `,
    link,
  );
}

/**
 * A button that cannot act now, yet keeps the focus: aria-disabled rather than
 * disabled, which would drop the focus to <body> (its clicks are ignored).
 */
function setUsable(button, usable) {
  if (usable) button.removeAttribute("aria-disabled");
  else button.setAttribute("aria-disabled", "true");
}

const usable = (button) => button.getAttribute("aria-disabled") !== "true";

/** The lock panel, with its live countdown, and the tab's title. */
function tick() {
  document.title = page.statusKnown && page.pending ? `(${page.pending} pending) ${TITLE}` : TITLE;
  const panel = $("lock-panel");
  if (!page.statusKnown || !page.reachable) {
    panel.dataset.state = "unknown";
    $("lock-state").textContent = "Unknown";
    $("lock-detail").textContent = page.statusKnown
      ? "The server cannot be reached: whether it is locked is unknown until it answers again."
      : "Locked or unlocked: unknown until you sign in.";
    if (!page.statusKnown) $("unlock").textContent = "Unlock";
    setUsable($("unlock"), false);
    setUsable($("lock"), false);
    return;
  }
  const left = page.lockDeadline === null ? 0 : page.lockDeadline - performance.now();
  const unlocked = left > 0;
  panel.dataset.state = unlocked ? "unlocked" : "locked";
  $("lock-state").textContent = unlocked ? "Unlocked" : "Locked";
  if (unlocked) {
    const until = formatTime(page.unlockedUntil);
    $("lock-detail").textContent = `Accepting new requests for ${formatCountdown(left)} more (until ${until}).`;
  } else {
    $("lock-detail").textContent =
      "New requests are refused. Clients already pending can still poll, and you can still decide them.";
  }
  $("unlock").textContent = unlocked ? "Restart window" : "Unlock";
  setUsable($("unlock"), !page.lockBusy);
  setUsable($("lock"), unlocked && !page.lockBusy);
  if (page.lockDeadline !== null && !unlocked) {
    // The server's window ended: ask it once. Its answer says locked, or how long is left.
    page.lockDeadline = null;
    refresh();
  }
}

async function setLock(action) {
  if (!usable($(action)) || page.lockBusy) return;
  page.lockBusy = true;
  tick();
  try {
    renderStatus(await api("POST", `/client-registry/${action}`));
    clearBanner("lock");
  } catch (error) {
    report(error, "lock");
  } finally {
    page.lockBusy = false;
    tick();
  }
}

// --- The requests table ------------------------------------------------------

/**
 * Put rows in ``body`` in the order of ``items``, creating, rewriting or
 * dropping only what changed. Moving or rewriting the row that holds the
 * focus would drop it to <body>: it goes back to the same control of the same
 * row, or of the nearest row that follows it, or that preceded it.
 */
function reconcile(body, rows, items, fill) {
  const held = heldFocus(body);
  placeRows(body, rows, items, fill);
  if (held) restoreFocus(rows, held);
}

/** The focus within ``body``, by meaning: its row's username, the control's role, the rows around. */
function heldFocus(body) {
  const active = document.activeElement;
  const row = active && body.contains(active) ? active.closest("tr") : null;
  if (!row) return null;
  const names = (step) => {
    const found = [];
    for (let next = row[step]; next; next = next[step]) found.push(next.dataset.username);
    return found;
  };
  return {
    control: active,
    role: active.dataset.focus || null,
    names: [row.dataset.username, ...names("nextElementSibling"), ...names("previousElementSibling")],
  };
}

function restoreFocus(rows, held) {
  const active = document.activeElement;
  if (active === held.control && held.control.isConnected) return;
  if (active && active !== document.body) return; // the administrator moved it elsewhere meanwhile
  for (const name of held.names) {
    const entry = rows.get(name);
    if (!entry || !entry.row.isConnected) continue;
    const target =
      (held.role && entry.row.querySelector(`[data-focus="${held.role}"]`)) || entry.row.querySelector("[data-focus]");
    if (target) {
      target.focus({ preventScroll: true });
      return;
    }
  }
}

function placeRows(body, rows, items, fill) {
  const seen = new Set();
  let previous = null;
  for (const item of items) {
    seen.add(item.username);
    const key = JSON.stringify(item);
    let entry = rows.get(item.username);
    if (!entry) {
      entry = { row: document.createElement("tr"), key: null };
      rows.set(item.username, entry);
    }
    if (entry.key !== key) {
      fill(entry.row, item);
      entry.key = key;
    }
    const expected = previous ? previous.nextSibling : body.firstChild;
    if (entry.row !== expected) body.insertBefore(entry.row, expected);
    previous = entry.row;
  }
  for (const [name, entry] of rows) {
    if (!seen.has(name)) {
      entry.row.remove();
      rows.delete(name);
    }
  }
}

/** The listing without poll statistics, with the last statistics fetched (none yet for a new row). */
function renderRequests(requests) {
  const merged = requests.map((request) => ({ ...request, ...page.polls.get(request.username) }));
  page.requests = new Map(merged.map((request) => [request.username, request]));
  for (const name of page.selected) {
    if (page.requests.get(name)?.state !== "pending") page.selected.delete(name);
  }
  page.position = new Map(requests.map((request, index) => [request.username, index]));
  noteArrivals(requests);
  showRequests();
  if (page.openRequest !== null) updateGrantDialog(page.requests.get(page.openRequest));
}

/** Requests that arrived after the first listing are new until their dialog is opened or they are decided. */
function noteArrivals(requests) {
  if (page.known === null) {
    page.known = new Set(requests.map((request) => request.username));
    return;
  }
  const arrived = requests.filter((request) => !page.known.has(request.username));
  for (const request of arrived) {
    page.known.add(request.username);
    if (request.state === "pending") page.fresh.add(request.username);
  }
  for (const name of page.fresh) {
    const request = page.requests.get(name);
    if (!request || request.state !== "pending") page.fresh.delete(name);
  }
  const pending = arrived.filter((request) => request.state === "pending");
  if (pending.length === 1) showToast(`New request from ${pending[0].username}.`);
  else if (pending.length > 1) showToast(`${pending.length} new requests.`);
}

const ORDERS = {
  pending: (a, b) => (b.state === "pending") - (a.state === "pending") || newestFirst(a, b),
  newest: (a, b) => newestFirst(a, b),
  oldest: (a, b) => -newestFirst(a, b),
  username: (a, b) => a.username.localeCompare(b.username),
};

/** Newest first; the server lists oldest first, which settles a tie within a millisecond. */
function newestFirst(a, b) {
  const age = Date.parse(b.createdAt) - Date.parse(a.createdAt);
  return age || page.position.get(b.username) - page.position.get(a.username);
}

/** Everything of a request that the search looks in: names, pairing id, context, rights, address, key, reason. */
function searchText(request) {
  const rights = (list) => list.flatMap((p) => [p.resource, p.operation, p.context]);
  return [
    request.username,
    request.pairingId,
    request.context,
    request.clientAddress,
    request.reason,
    request.state,
    request.method,
    request.publicKey?.type,
    request.publicKey?.sha256,
    ...request.roles,
    ...rights(request.permissions),
    ...(request.granted ? [...request.granted.roles, ...rights(request.granted.permissions)] : []),
  ]
    .filter(Boolean)
    .join("\n")
    .toLowerCase();
}

/** The requests that the filter and the search let through, in the chosen order: a page of them as rows. */
function showRequests() {
  const all = [...page.requests.values()];
  const query = page.search.trim().toLowerCase();
  const matching = all
    .filter((request) => page.filter === "all" || request.state === "pending")
    .filter((request) => !query || searchText(request).includes(query))
    .sort(ORDERS[page.sort]);
  page.matching = matching;
  const shown = matching
    .slice(0, page.shownLimit)
    .map((request) => ({ ...request, isNew: page.fresh.has(request.username) }));
  reconcile($("requests-body"), page.requestRows, shown, fillRequestRow);
  updateFilterCounts(all);
  updateBulkBar();
  const more = $("requests-more");
  const hidden = matching.length - shown.length;
  more.hidden = hidden <= 0;
  more.textContent = `Show ${Math.min(hidden, PAGE_SIZE)} more (${hidden} not shown)`;
  const empty = $("requests-empty");
  empty.hidden = shown.length > 0;
  if (!all.length) {
    empty.textContent = "No requests. Unlock the registry, then start the client: its request appears here.";
  } else if (query) {
    const which = page.filter === "pending" ? "pending request" : "request";
    empty.textContent = `No ${which} matches “${page.search.trim()}”.`;
  } else {
    empty.textContent = "No pending request. Choose All to see the decided ones.";
  }
}

// --- A fleet at a time: several pending requests, one approval or one denial ----

function onSelect(event) {
  const box = event.target.closest(".select-request");
  if (!box) return;
  const username = box.closest("tr").dataset.username;
  if (box.checked) page.selected.add(username);
  else page.selected.delete(username);
  updateBulkBar();
}

function selectAllMatching() {
  for (const request of page.matching) if (request.state === "pending") page.selected.add(request.username);
  syncSelectBoxes();
}

function clearSelection() {
  page.selected.clear();
  syncSelectBoxes();
  $("bulk-select-all").focus();
}

function syncSelectBoxes() {
  for (const box of $("requests-body").querySelectorAll(".select-request")) {
    box.checked = page.selected.has(box.closest("tr").dataset.username);
  }
  updateBulkBar();
}

function updateBulkBar() {
  const count = page.selected.size;
  $("bulk-count").textContent = count ? `${count} selected` : "No request selected";
  const pending = page.matching.filter((request) => request.state === "pending").length;
  $("bulk-select-all").textContent = `Select all ${pending} pending that match`;
  $("bulk-select-all").hidden = pending === 0;
  for (const id of ["bulk-clear", "bulk-approve", "bulk-deny"]) $(id).hidden = count === 0;
}

/** What an approval as requested gives one request, in a line: its roles and permissions. */
function grantSummary(request) {
  const roles = request.roles.length ? `roles ${request.roles.join(", ")}` : "no roles";
  const permissions = request.permissions.map((p) => `${p.context} ${p.resource} ${p.operation}`);
  return `${roles}; ${permissions.length ? `permissions ${permissions.join(", ")}` : "no permissions"}`;
}

/** Ask first, listing each request and what it will get; then one call per request, each failure said. */
async function decideSelected(action) {
  const requests = [...page.selected].map((name) => page.requests.get(name)).filter(Boolean);
  const approving = action === "approve";
  const dialog = $("bulk-dialog");
  const count = `${requests.length} ${requests.length === 1 ? "request" : "requests"}`;
  $("bulk-heading").textContent = approving ? `Approve ${count}?` : `Deny ${count}?`;
  $("bulk-text").textContent = approving
    ? "Each gets what it asked for, as listed. Compare their pairing ids with the devices' first."
    : "Each client's next poll is refused (403), with the reason below.";
  $("bulk-list").replaceChildren(
    ...requests.map((request) => {
      const item = element("li");
      item.dataset.username = request.username;
      item.append(element("span", "username", request.username), element("span", "mono", `pairing ${request.pairingId}`));
      if (approving) item.append(element("span", "line", grantSummary(request)));
      return item;
    }),
  );
  $("bulk-reason-field").hidden = approving;
  $("bulk-reason").value = "";
  $("bulk-ok").textContent = approving ? `Approve ${count}` : `Deny ${count}`;
  $("bulk-ok").className = `button ${approving ? "primary" : "danger"}`;
  dialog.returnValue = "";
  dialog.showModal();
  $("bulk-heading").focus();
  const sure = await new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
  });
  if (!sure) return;
  const reason = $("bulk-reason").value.trim();
  const failed = [];
  for (const request of requests) {
    try {
      await api("POST", registryPath(request.username, action), approving ? undefined : reason ? { reason } : {});
      page.selected.delete(request.username);
      page.drafts.delete(request.username);
    } catch (error) {
      if (error.status === 401) break;
      failed.push(`${request.username} (${describe(error)})`);
    }
  }
  const done = requests.length - failed.length;
  const verb = approving ? "approved" : "denied";
  if (failed.length) {
    showBanner(`${done} of ${requests.length} ${verb}. Not ${verb}: ${failed.join("; ")}. They stay selected.`, "bulk");
  } else {
    clearBanner("bulk");
    showToast(`${done} ${done === 1 ? "request" : "requests"} ${verb}.`);
  }
  syncSelectBoxes();
  refresh();
}

function updateFilterCounts(all) {
  $("filter-all-count").textContent = String(all.length);
  $("filter-pending-count").textContent = String(all.filter((request) => request.state === "pending").length);
}

function showMore() {
  const before = $("requests-body").lastElementChild;
  page.shownLimit += PAGE_SIZE;
  showRequests();
  // The focus goes to the first row just shown, so that the keyboard carries on from there.
  const first = before ? before.nextElementSibling : $("requests-body").firstElementChild;
  const target = first?.querySelector("[data-focus]") || (!$("requests-more").hidden && $("requests-more"));
  if (target) target.focus();
}

function setFilter(filter) {
  page.filter = filter;
  for (const button of document.querySelectorAll(".segment")) {
    button.setAttribute("aria-pressed", String(button.dataset.filter === filter));
  }
  showRequests();
}

function fillRequestRow(row, request) {
  const pending = request.state === "pending";
  row.dataset.username = request.username;
  row.dataset.state = request.state;
  row.className = [pending ? "actionable" : "", request.isNew ? "is-new" : ""].join(" ").trim();

  const client = cell(null, "client");
  if (pending) {
    // A real button, so that the row is announced and reached as a control.
    const open = element("button", "open-request");
    open.type = "button";
    open.dataset.focus = "open";
    open.append(element("span", "visually-hidden", "Review the request of "), request.username);
    const select = element("input", "select-request");
    select.type = "checkbox";
    select.dataset.focus = "select";
    select.checked = page.selected.has(request.username);
    select.setAttribute("aria-label", `Select ${request.username}`);
    client.append(select, open);
  } else {
    client.append(element("span", "username", request.username));
  }
  if (request.isNew) client.append(element("span", "new-tag", "New"));
  const meta = element("span", "client-meta");
  meta.append(
    element("span", `method ${request.method}`, request.method === "csr" ? "CSR" : "password"),
    ...(request.via === "est" ? [element("span", "via", "by EST")] : []), // SPEC EST-10.4-VIA
    element("span", "pairing-cell mono", `pairing ${request.pairingId}`),
  );
  client.append(meta);

  const badge = element("span", `badge ${request.state}`, STATE_LABELS[request.state] || request.state);
  const state = cell("State", null, badge);
  if (request.reason) state.append(clientText("span", "reason", request.reason));
  if (request.state === "denied") {
    // Undo a denial: forgotten, the device may ask again at once rather than after the retention period.
    const forget = element("button", "button small forget", "Forget");
    forget.type = "button";
    forget.dataset.focus = "forget";
    forget.setAttribute("aria-label", `Forget the denial of ${request.username}`);
    state.append(forget);
  }
  if (request.state === "approved") {
    const collected = request.collectedAt
      ? timeLine("Collected", request.collectedAt, "collected yes")
      : element("span", "collected no", "Not collected yet");
    collected.title = request.collectedAt
      ? `The client fetched its credentials after the approval, at ${exactUtc(request.collectedAt)}.`
      : "The client has not polled since the approval: it does not have its credentials yet.";
    state.append(collected);
  }
  if (request.state === "denied" && request.pollCount !== undefined) {
    // ADMIN-4.7-POLL-STATS: a denied request's poll is answered 403 with the reason, and counted.
    const told = Boolean(request.lastPollAt && request.decidedAt && request.lastPollAt > request.decidedAt);
    const line = told
      ? timeLine("Told", request.lastPollAt, "collected yes")
      : element("span", "collected no", "Not told yet");
    line.title = told
      ? `The client polled after the denial and was answered 403 with the reason, at ${exactUtc(request.lastPollAt)}.`
      : "The client has not polled since the denial: it has not been told yet.";
    state.append(line);
  }
  if (request.decidedAt) {
    const decided = timeLine("Decided", request.decidedAt, "sub");
    // Named administrators (the operations issue): who decided, when the server says it.
    if (request.decidedBy) decided.append(" by ", clientText("span", "decided-by", request.decidedBy));
    state.append(decided);
  }

  const context = clientText("div", "clamp", request.context || "");
  if (request.context) context.title = request.context;
  // The poll statistics of a row that just arrived come with the next full listing.
  const counted = request.pollCount !== undefined;
  const seen = cell(
    "Seen",
    null,
    timeLine("First", request.createdAt),
    counted ? timeLine("Last", request.lastPollAt) : element("span", "line", "Last: counting…"),
    element("span", "sub", counted ? polls(request.pollCount) : "polls: counting…"),
  );
  // A card on a phone shows no label over an empty context.
  const contextCell = cell(request.context ? "Context" : null, "context-cell", context);
  contextCell.classList.toggle("is-empty", !request.context);
  row.replaceChildren(
    client,
    state,
    cell(null, "rights", ...rightsCell(request)),
    contextCell,
    cell("Address", "mono", request.clientAddress ?? "…"),
    seen,
  );
}

/** What an approved request was granted (and what of the request was not), or what a request asks for. */
function rightsCell(request) {
  if (request.state !== "approved" || !request.granted) return rightsNodes("Requested", request);
  const nodes = rightsNodes("Granted", request.granted);
  const key = (permission) => JSON.stringify([permission.context, permission.resource, permission.operation]);
  const granted = new Set(request.granted.permissions.map(key));
  const roles = request.roles.filter((role) => !request.granted.roles.includes(role));
  const permissions = request.permissions.filter((permission) => !granted.has(key(permission)));
  if (roles.length || permissions.length) {
    const withheld = element("span", "not-granted");
    withheld.append(element("span", "rights-label", "Requested, not granted"));
    if (roles.length) withheld.append(...chips(roles, "chip"));
    if (permissions.length) withheld.append(...permissionNodes(permissions));
    nodes.push(withheld);
  }
  return nodes;
}

function onRequestActivated(event) {
  if (event.target.closest(".select-request")) return; // its change event selects
  if (event.target.closest("button.forget")) {
    forgetDenial(event.target.closest("tr").dataset.username);
    return;
  }
  const row = event.target.closest("tr");
  if (!row || row.dataset.state !== "pending") return;
  if (event.target.closest("a")) return;
  openGrantDialog(row.dataset.username);
}

/** DELETE the denied request, after asking: its client may then register again without waiting. */
async function forgetDenial(username) {
  const sure = await confirmAction(
    `Forget the denial of ${username}?`,
    `The denied request of ${username} is removed. Its device may then ask again at once, ` +
      "and its new request waits here for a decision.",
    "Forget denial",
  );
  if (!sure) return;
  try {
    await api("DELETE", `/client-registry/requests/${encodeURIComponent(username)}`);
    showToast(`The denial of ${username} is forgotten: its device may ask again.`);
  } catch (error) {
    if (error.status === 404 || error.status === 409) {
      showBanner(`${username} was already forgotten or changed by someone else: nothing was changed.`, "decision");
    } else {
      report(error, "decision");
    }
  }
  refresh();
}

// --- The Grant Access dialog -------------------------------------------------

async function loadCatalog() {
  if (page.catalog === null) page.catalog = await api("GET", "/client-registry/roles");
  return page.catalog;
}

async function openGrantDialog(username) {
  const request = page.requests.get(username);
  if (!request || request.state !== "pending" || page.opening || $("grant-dialog").open) return;
  let catalog;
  page.opening = true; // a second click or Enter while the catalog loads opens nothing more
  try {
    catalog = await loadCatalog();
  } catch (error) {
    report(error, "dialog");
    return;
  } finally {
    page.opening = false;
  }
  page.openRequest = username;
  page.warnedDraft = false;
  if (page.fresh.delete(username)) showRequests();
  $("grant-username").textContent = username;
  $("grant-pairing").textContent = request.pairingId;
  $("grant-method").textContent =
    (request.method === "csr" ? "Certificate signing request (CSR)" : "Password") +
    (request.via === "est" ? ", by EST (RFC 7030)" : "");
  $("grant-address").textContent = request.clientAddress ?? "…";
  $("grant-created").textContent = `${formatTime(request.createdAt)} (${ago(request.createdAt)})`;
  $("grant-requested-roles").replaceChildren(...chips(request.roles, "chip", "none"));
  $("grant-requested-permissions").replaceChildren(...permissionNodes(request.permissions));
  $("grant-context").replaceChildren(...clientText("span", null, request.context || "(none)").childNodes);
  $("grant-context").dir = "auto";
  $("grant-context").classList.toggle("none", !request.context);
  showKey(request);
  fillRoleChoices(catalog, request.roles);
  $("grant-permissions").replaceChildren(...request.permissions.map(permissionItem));
  renumberPermissions();
  $("grant-reason").value = page.drafts.get(username) || "";
  clearGrantErrors();
  updateGrantDialog(request);
  $("grant-dialog").showModal();
  // After showModal: a closed dialog has no layout, and a scroll set before it would not hold.
  $("grant-body").scrollTop = 0;
  $("grant-dialog").scrollTop = 0;
  // Not on Allow: a second Enter must not approve what was not reviewed.
  $("grant-heading").focus({ preventScroll: true });
}

/** A CSR's key beside the pairing id: its type and the SHA-256 of its public key, as the device's label shows them. */
function showKey(request) {
  const key = request.publicKey;
  $("grant-key").hidden = !key;
  if (!key) return;
  $("grant-key-type").textContent = key.type;
  $("grant-key-sha256").textContent = fingerprint(key.sha256);
}

/** A hex digest in pairs, as openssl and browsers print fingerprints: "AB:CD:…". */
function fingerprint(hex) {
  return hex.toUpperCase().match(/../g).join(":");
}

function fillRoleChoices(catalog, requested) {
  const known = new Set(catalog.map((role) => role.name));
  const choices = catalog.map((role) => roleChoice(role.name, role.description, requested.includes(role.name)));
  for (const name of requested.filter((role) => !known.has(role))) {
    const choice = roleChoice(name, "not in the role catalog: cannot be granted", false);
    choice.querySelector("input").disabled = true;
    choices.push(choice);
  }
  $("grant-roles").replaceChildren(...choices);
}

function roleChoice(name, description, checked) {
  const label = element("label", "role-option");
  const box = element("input");
  box.type = "checkbox";
  box.name = "role";
  box.value = name;
  box.checked = checked;
  const text = element("span", "role-text");
  text.append(element("span", "role-name", name));
  if (description) text.append(element("span", "role-description", description));
  label.append(box, text);
  return label;
}

function select(options, value, field) {
  const node = element("select");
  node.dataset.field = field;
  for (const option of options) node.append(new Option(option, option, false, option === value));
  return node;
}

/** One permission of the grant, as editable fields; its error, if any, is shown right below them. */
function permissionItem(permission) {
  const item = element("li", "permission");
  const fields = element("div", "permission-fields");
  const resource = element("input", "resource");
  resource.dataset.field = "resource";
  resource.type = "text";
  resource.value = permission.resource;
  resource.placeholder = "topic filter, or /path";
  resource.spellcheck = false;
  const remove = element("button", "icon-button remove", "×");
  remove.type = "button";
  remove.addEventListener("click", () => {
    const next = item.nextElementSibling || item.previousElementSibling;
    item.remove();
    renumberPermissions();
    (next ? next.querySelector("input") : $("grant-add-permission")).focus();
  });
  fields.append(
    resource,
    select(OPERATIONS, permission.operation, "operation"),
    select(CONTEXTS, permission.context, "context"),
    remove,
  );
  const error = element("p", "field-error");
  error.hidden = true;
  item.append(fields, error);
  fields.addEventListener("input", () => clearFieldError(item));
  fields.addEventListener("change", () => clearFieldError(item));
  return item;
}

/** Give each permission's controls names of their own: "Resource of permission 2", and so on. */
function renumberPermissions() {
  const items = [...$("grant-permissions").children];
  items.forEach((item, index) => {
    const number = index + 1;
    for (const name of PERMISSION_FIELDS) {
      const label = `${name[0].toUpperCase()}${name.slice(1)} of permission ${number}`;
      item.querySelector(`[data-field="${name}"]`).setAttribute("aria-label", label);
    }
    item.querySelector(".remove").setAttribute("aria-label", `Remove permission ${number}`);
    item.querySelector(".field-error").id = `grant-permission-error-${number}`;
  });
  const empty = items.length === 0;
  $("grant-permissions-empty").hidden = !empty;
  $("grant-permissions-head").hidden = empty;
}

function addPermission() {
  const item = permissionItem({ resource: "", operation: "read", context: "mqtt" });
  $("grant-permissions").append(item);
  renumberPermissions();
  item.querySelector("input").focus();
}

/** What a refresh learned about the request whose dialog is open. */
function updateGrantDialog(request) {
  const notice = $("grant-notice");
  const decidable = Boolean(request && request.state === "pending");
  if (!request) {
    notice.textContent = "This request is gone: it was forgotten, or it expired.";
  } else if (!decidable) {
    notice.textContent = `This request was ${request.state} meanwhile, by another administrator.`;
  } else if (request.pollCount !== undefined) {
    $("grant-polled").textContent =
      `${formatTime(request.lastPollAt)} (${ago(request.lastPollAt)}, ${polls(request.pollCount)})`;
  } else {
    $("grant-polled").textContent = "counting…";
  }
  notice.hidden = decidable;
  $("grant-allow").disabled = !decidable;
  $("grant-deny").disabled = !decidable;
}

// --- Errors next to the field that caused them --------------------------------

function markField(item, field, message) {
  const control = item.querySelector(`[data-field="${field || "resource"}"]`);
  control.setAttribute("aria-invalid", "true");
  const error = item.querySelector(".field-error");
  error.textContent = error.hidden ? message : `${error.textContent} ${message}`;
  error.hidden = false;
  for (const name of PERMISSION_FIELDS) {
    const each = item.querySelector(`[data-field="${name}"]`);
    if (each.getAttribute("aria-invalid") === "true") each.setAttribute("aria-describedby", error.id);
  }
  return control;
}

function clearFieldError(item) {
  const error = item.querySelector(".field-error");
  if (error.hidden) return;
  error.hidden = true;
  error.textContent = "";
  for (const control of item.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    control.removeAttribute("aria-describedby");
  }
  if (!$("grant-permissions").querySelector("[aria-invalid]")) $("grant-error").hidden = true;
}

function clearGrantErrors() {
  for (const item of $("grant-permissions").children) clearFieldError(item);
  $("grant-error").hidden = true;
  $("grant-error").textContent = "";
}

/**
 * Show what is wrong: each permission's problem next to its fields, and a
 * sentence in the dialog's footer, which is always in view. The first field
 * at fault gets the focus, which scrolls it into view.
 */
function showGrantProblems(summary, problems) {
  const items = [...$("grant-permissions").children];
  const general = [];
  let first = null;
  for (const { index, field, message } of problems) {
    const item = index === undefined ? undefined : items[index];
    if (!item) {
      general.push(message);
      continue;
    }
    const control = markField(item, field, message);
    first = first || control;
  }
  const marked = problems.length - general.length;
  const which = marked === 1 ? "The permission at fault is" : "The permissions at fault are";
  const where = marked ? ` ${which} marked, with the reason beside it.` : "";
  $("grant-error").textContent = `${summary}${general.length ? ` ${general.join("; ")}.` : ""}${where}`;
  $("grant-error").hidden = false;
  if (first) first.focus();
}

/** The roles and permissions left ticked and edited, and what is wrong with them, as the server would say it. */
function collectGrant() {
  const roles = [...$("grant-roles").querySelectorAll("input:checked")].map((box) => box.value);
  const permissions = [];
  const problems = [];
  [...$("grant-permissions").children].forEach((item, index) => {
    const permission = Object.fromEntries(
      PERMISSION_FIELDS.map((name) => [name, item.querySelector(`[data-field="${name}"]`).value]),
    );
    permission.resource = permission.resource.trim();
    if (!permission.resource) {
      const message = "Enter a resource: an MQTT topic filter, or a /path for http.";
      problems.push({ index, field: "resource", message });
    } else if (permission.context === "http" && !permission.resource.startsWith("/")) {
      problems.push({ index, field: "resource", message: "An http resource starts with /." });
    }
    permissions.push(permission);
  });
  return { grant: { roles, permissions }, problems };
}

/** The server's problems, each tied to the permission it names ("permissions[1].resource ..."), where it names one. */
function serverProblems(error) {
  const texts = Array.isArray(error.body.details) && error.body.details.length ? error.body.details : [error.message];
  return texts.map((text) => {
    const match = PERMISSION_PROBLEM.exec(text);
    if (!match) return { message: text };
    const [, index, field, rest] = match;
    const subject = field ? field[0].toUpperCase() + field.slice(1) : "This permission";
    return { index: Number(index), field, message: `${subject} ${rest}` };
  });
}

async function decide(action) {
  const username = page.openRequest;
  clearGrantErrors();
  let body;
  if (action === "approve") {
    const { grant, problems } = collectGrant();
    if (problems.length) {
      showGrantProblems("Fix the permissions first.", problems);
      return;
    }
    body = grant;
  } else {
    const reason = $("grant-reason").value.trim();
    body = reason ? { reason } : {};
  }
  $("grant-allow").disabled = $("grant-deny").disabled = true;
  try {
    const answer = await api("POST", registryPath(username, action), body);
    page.drafts.delete(username);
    $("grant-reason").value = "";
    page.focusAfterClose = nextToReview(username);
    $("grant-dialog").close();
    if (action === "approve") {
      const roles = answer.roles.length ? answer.roles.join(", ") : "none";
      showToast(`${username} is registered (roles: ${roles}). Its next poll gets its credentials.`);
    } else {
      showToast(`${username} was denied. Its next poll is told so.`);
    }
    refresh();
  } catch (error) {
    if (error.status === 409 || error.status === 404) {
      $("grant-dialog").close();
      const state = error.body.state ? ` (it is ${error.body.state} now)` : "";
      showBanner(`${username} was already decided by someone else${state}: nothing was changed.`, "decision");
      refresh();
      return;
    }
    updateGrantDialog(page.requests.get(username));
    if (error.status === 401) return;
    const verb = action === "approve" ? "grant" : "denial";
    if (error.status === 400 || error.status === 422) {
      showGrantProblems(`The server refused this ${verb}.`, serverProblems(error));
    } else if (error.status === 0) {
      const button = action === "approve" ? "Allow" : "Deny";
      showGrantProblems(
        `The ${verb} was not sent: the server cannot be reached. Nothing was changed; press ${button} again once it answers.`,
        [],
      );
      setReachable(false);
    } else {
      showGrantProblems(`The ${verb} did not go through: ${describe(error)}`, []);
    }
  }
}

/** Escape, or the close button: a denial reason typed but not sent is kept for this request, and said so. */
function onGrantCancel(event) {
  const reason = $("grant-reason").value.trim();
  if (!reason || page.warnedDraft || !event.cancelable) return;
  event.preventDefault();
  page.warnedDraft = true;
  $("grant-error").textContent =
    "You typed a reason for a denial but did not press Deny. Press Escape again to close: " +
    "the reason is kept for when you reopen this request.";
  $("grant-error").hidden = false;
}

function onGrantClosed() {
  const username = page.openRequest;
  page.openRequest = null;
  if (username === null) return;
  const reason = $("grant-reason").value.trim();
  if (reason && page.requests.get(username)?.state === "pending") {
    page.drafts.set(username, $("grant-reason").value);
    showToast(`Your reason for denying ${username} is kept: open the request again to send it.`);
  }
  const target = page.focusAfterClose || requestButton(username);
  page.focusAfterClose = null;
  if (target) target.focus();
}

function requestButton(username) {
  return $("requests-body").querySelector(`tr[data-username="${CSS.escape(username)}"] .open-request`);
}

/** Where the focus goes once a request is decided: the next pending request, or the list's heading. */
function nextToReview(username) {
  const buttons = [...$("requests-body").querySelectorAll(".open-request")];
  const here = buttons.indexOf(requestButton(username));
  return buttons[here + 1] || buttons[here - 1] || $("requests-heading");
}

// --- The Users view ----------------------------------------------------------

const USER_FILTERS = {
  all: () => true,
  valid: (user) => user.certificateStatus === "valid",
  renew: (user) => user.certificateStatus === "renew",
  expired: (user) => user.certificateStatus === "expired",
  password: (user) => user.method === "password",
};

function renderUsers(users) {
  page.users = users;
  showUsers();
}

/** The users that the certificate filter and the search let through, with each filter's count. */
function showUsers() {
  const users = page.users || [];
  const query = $("users-search").value.trim().toLowerCase();
  const text = (user) =>
    [
      user.username,
      user.method,
      user.certificateSerial,
      user.certificateSha256,
      ...user.roles,
      ...user.permissions.flatMap((p) => [p.resource, p.operation, p.context]),
    ]
      .filter(Boolean)
      .join("\n")
      .toLowerCase();
  for (const [name, test] of Object.entries(USER_FILTERS)) {
    $(`users-filter-${name}-count`).textContent = String(users.filter(test).length);
  }
  const shown = users.filter(USER_FILTERS[page.userFilter]).filter((user) => !query || text(user).includes(query));
  reconcile($("users-body"), page.userRows, shown, fillUserRow);
  const empty = $("users-empty");
  empty.hidden = shown.length > 0;
  empty.textContent = users.length
    ? "No user matches this filter and search."
    : "No users yet: approve a request to create one.";
}

function setUserFilter(filter) {
  page.userFilter = filter;
  for (const button of document.querySelectorAll("[data-user-filter]")) {
    button.setAttribute("aria-pressed", String(button.dataset.userFilter === filter));
  }
  showUsers();
}

/**
 * The serial numbers the current CRL lists (RFC 5280 section 5.1), read from
 * its DER for display: CertificateList, TBSCertList, then each revoked
 * certificate's first field. Nothing is decided on it; the server signs it.
 */
function crlSerials(bytes) {
  const read = (at) => {
    let length = bytes[at + 1];
    let start = at + 2;
    if (length & 0x80) {
      const count = length & 0x7f;
      length = 0;
      for (let i = 0; i < count; i += 1) length = length * 256 + bytes[start + i];
      start += count;
    }
    return { tag: bytes[at], start, end: start + length };
  };
  const tbs = read(read(0).start);
  let field = read(tbs.start);
  if (field.tag === 0x02) field = read(field.end); // version
  for (let i = 0; i < 3; i += 1) field = read(field.end); // signature, issuer, thisUpdate
  const isTime = (tag) => tag === 0x17 || tag === 0x18; // UTCTime, GeneralizedTime
  if (isTime(field.tag)) field = field.end < tbs.end ? read(field.end) : null; // nextUpdate
  if (!field || field.tag !== 0x30) return [];
  const serials = [];
  for (let at = field.start; at < field.end; ) {
    const entry = read(at);
    const serial = read(entry.start);
    const hex = [...bytes.slice(serial.start, serial.end)].map((b) => b.toString(16).padStart(2, "0")).join("");
    serials.push(hex.replace(/^0+(?=.)/, ""));
    at = entry.end;
  }
  return serials;
}

/** The revoked serials, fetched again only when the CRL's number changed. */
async function showRevoked(crl) {
  const line = $("revoked");
  if (!crl) {
    line.hidden = true;
    return;
  }
  if (line.dataset.number === String(crl.number)) return;
  const response = await fetch("/api/client-registry/crl", { cache: "no-store" });
  if (!response.ok) return;
  const serials = crlSerials(new Uint8Array(await response.arrayBuffer()));
  line.dataset.number = String(crl.number);
  line.hidden = false;
  line.replaceChildren(
    element("span", "label", `Revoked certificates (${serials.length})`),
    ...(serials.length ? serials.map((serial) => element("span", "serial revoked-serial", serial)) : [
      element("span", "none", "none"),
    ]),
  );
}

function certificateCell(user) {
  if (!user.certificateSerial) {
    return cell("Certificate", null, element("span", "none", "none: signs in with a password"));
  }
  const node = cell("Certificate", null);
  const status = user.certificateStatus;
  node.append(element("span", `badge ${status}`, CERTIFICATE_LABELS[status] || status));
  const serial = element("span", "line");
  serial.append("Serial ", element("span", "serial", user.certificateSerial));
  node.append(serial);
  if (user.certificateSha256) {
    const digest = element("span", "line");
    digest.append("SHA-256 ", element("span", "fingerprint", fingerprint(user.certificateSha256)));
    node.append(digest);
  }
  node.append(timeLine(status === "expired" ? "Expired" : "Expires", user.certificateNotAfter));
  node.append(timeLine("Renew from", user.certificateRenewAfter));
  return node;
}

function fillUserRow(row, user) {
  const name = cell(null, "client", element("span", "username", user.username));
  const meta = element("span", "client-meta");
  meta.append(element("span", `method ${user.method}`, user.method === "csr" ? "CSR" : "password"));
  name.append(meta);
  const remove = element("button", "button small danger-outline", "Delete");
  remove.type = "button";
  remove.dataset.username = user.username;
  remove.dataset.focus = "delete";
  remove.setAttribute("aria-label", `Delete ${user.username}`);
  row.dataset.username = user.username;
  row.replaceChildren(
    name,
    cell("Roles and permissions", "rights", ...rightsNodes("Granted", user)),
    certificateCell(user),
    cell("Registered", null, timeLine(null, user.createdAt)),
    cell(null, "actions", remove),
  );
}

function confirmAction(title, text, ok) {
  const dialog = $("confirm-dialog");
  $("confirm-heading").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = ok;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-cancel").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
  });
}

async function onUserAction(event) {
  const button = event.target.closest("button[data-username]");
  if (!button) return;
  const username = button.dataset.username;
  const sure = await confirmAction(
    `Delete ${username}?`,
    `${username} can no longer sign in with its password or certificate, and its request is forgotten: ` +
      "the same username may then register again.",
    "Delete user",
  );
  if (!sure) return;
  button.disabled = true;
  try {
    await api("DELETE", `/users/${encodeURIComponent(username)}`);
    showToast(`${username} was deleted.`);
    dropUserRow(username);
  } catch (error) {
    if (error.status === 404) {
      showBanner(`${username} was already deleted by someone else.`, "users");
      dropUserRow(username);
    } else {
      report(error, "users");
      button.disabled = false;
      button.focus();
    }
  }
  refresh();
}

/** Remove a deleted user's row at once, and give the focus to its neighbour's Delete (or the heading). */
function dropUserRow(username) {
  const entry = page.userRows.get(username);
  if (!entry) return;
  const neighbour = entry.row.nextElementSibling || entry.row.previousElementSibling;
  entry.row.remove();
  page.userRows.delete(username);
  page.lists.delete("/users");
  $("users-empty").hidden = page.userRows.size > 0;
  const target = neighbour ? neighbour.querySelector("button[data-username]") : $("users-heading");
  target.focus();
}

// --- The Audit view: who did what ----------------------------------------------

const AUDIT_ACTIONS = {
  request: "asked to be registered",
  unlock: "unlocked the registry",
  lock: "locked the registry",
  approve: "approved",
  deny: "denied",
  forget: "forgot the request of",
  "remove user": "removed the user",
  renew: "renewed its certificate",
};

/** The newest page of the audit, rewritten only when it changed; older pages stay below it. */
function renderAudit(audit) {
  const text = JSON.stringify(audit.entries);
  if (page.auditText === text) return;
  page.auditText = text;
  $("audit-body").replaceChildren(...audit.entries.map(auditRow));
  page.auditNext = audit.next;
  $("audit-older").hidden = audit.next === null;
  $("audit-empty").hidden = audit.entries.length > 0;
}

async function showOlderAudit() {
  try {
    const audit = await api("GET", `/client-registry/audit?limit=100&before=${page.auditNext}`);
    $("audit-body").append(...audit.entries.map(auditRow));
    page.auditNext = audit.next;
    $("audit-older").hidden = audit.next === null;
  } catch (error) {
    report(error, "audit");
  }
}

/** One entry: when, who (the named administrator, or the client), what, on which request, and its details. */
function auditRow(entry) {
  const row = element("tr");
  const who = cell("Who", null, clientText("span", "username", entry.actor));
  if (entry.address) who.append(element("span", "sub mono", entry.address));
  const what = cell("What", null, element("span", null, AUDIT_ACTIONS[entry.action] || entry.action));
  if (entry.username) what.append(" ", clientText("span", "username", entry.username));
  const details = entry.details ? clientText("code", "audit-details", JSON.stringify(entry.details)) : "";
  row.append(cell("When", null, timeLine(null, entry.at)), who, what, cell("Details", null, details));
  return row;
}

// --- Views and start -----------------------------------------------------------

const VIEWS = { "#users": "users", "#audit": "audit" };

function showView() {
  page.view = VIEWS[location.hash] || "registry";
  for (const view of ["registry", "users", "audit"]) {
    $(`view-${view}`).hidden = view !== page.view;
    const tab = $(`tab-${view}`);
    if (view === page.view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  refresh();
}

function start() {
  $("token-form").addEventListener("submit", signIn);
  $("token-dialog").addEventListener("cancel", (event) => {
    if (!token()) event.preventDefault(); // nothing works without the token
  });
  $("sign-out").addEventListener("click", signOut);
  $("banner-close").addEventListener("click", () => clearBanner());
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      location.hash = tab.dataset.view === "registry" ? "" : `#${tab.dataset.view}`;
    });
  }
  window.addEventListener("hashchange", showView);
  $("unlock").addEventListener("click", () => setLock("unlock"));
  $("lock").addEventListener("click", () => setLock("lock"));
  for (const button of document.querySelectorAll(".segment")) {
    button.addEventListener("click", () => setFilter(button.dataset.filter));
  }
  $("search").addEventListener("input", (event) => {
    page.search = event.target.value;
    showRequests();
  });
  $("sort").addEventListener("change", (event) => {
    page.sort = event.target.value;
    showRequests();
  });
  $("requests-body").addEventListener("click", onRequestActivated);
  $("requests-more").addEventListener("click", showMore);
  $("requests-body").addEventListener("change", onSelect);
  $("bulk-select-all").addEventListener("click", selectAllMatching);
  $("bulk-clear").addEventListener("click", clearSelection);
  $("bulk-approve").addEventListener("click", () => decideSelected("approve"));
  $("bulk-deny").addEventListener("click", () => decideSelected("deny"));
  $("users-body").addEventListener("click", onUserAction);
  $("users-search").addEventListener("input", showUsers);
  $("audit-older").addEventListener("click", showOlderAudit);
  for (const button of document.querySelectorAll("[data-user-filter]")) {
    button.addEventListener("click", () => setUserFilter(button.dataset.userFilter));
  }
  $("grant-form").addEventListener("submit", (event) => event.preventDefault());
  $("grant-close").addEventListener("click", () => $("grant-dialog").close());
  $("grant-dialog").addEventListener("cancel", onGrantCancel);
  $("grant-dialog").addEventListener("close", onGrantClosed);
  $("grant-add-permission").addEventListener("click", addPermission);
  $("grant-allow").addEventListener("click", () => decide("approve"));
  $("grant-deny").addEventListener("click", () => decide("deny"));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });

  // A tab in the background refreshes too, at a slower pace: its title counts what waits.
  setInterval(() => {
    if (!document.hidden || performance.now() - page.lastRefreshAt >= HIDDEN_REFRESH_MS) refresh();
  }, REFRESH_MS);
  setInterval(tick, 500);
  setInterval(refreshAgo, 20000);
  tick();
  if (token()) $("sign-out").hidden = false;
  else askForToken();
  showView();
}

start();

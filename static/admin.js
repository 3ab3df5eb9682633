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
"use strict";

const TOKEN_KEY = "clientRegistry.adminToken"; // sessionStorage: this browser tab only
const REFRESH_MS = 3000;
const TOAST_MS = 5000;
const OPERATIONS = ["read", "write", "readWrite"];
const CONTEXTS = ["mqtt", "http"];
const STATE_LABELS = { pending: "Pending", approved: "Approved", denied: "Denied" };

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
  unlockedUntil: null, // milliseconds since the epoch, or null when locked
  requests: new Map(), // username -> the request as the server last listed it
  requestRows: new Map(), // username -> { row, key }
  userRows: new Map(),
  catalog: null, // [{name, description}]
  openRequest: null, // the username whose Grant Access dialog is open
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

function chips(values, className, emptyText) {
  if (!values.length) return [element("span", "none", emptyText)];
  return values.map((value) => element("span", className, value));
}

function permissionNodes(permissions) {
  if (!permissions.length) return [element("span", "none", "none")];
  return permissions.map((permission) => {
    const line = element("span", "perm");
    line.append(
      element("span", `perm-context ${permission.context}`, permission.context),
      element("code", "perm-resource", permission.resource),
      element("span", "perm-operation", permission.operation),
    );
    return line;
  });
}

function formatTime(iso) {
  if (!iso) return "";
  const moment = new Date(iso);
  const sameDay = moment.toDateString() === new Date().toDateString();
  const options = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  if (!sameDay) Object.assign(options, { year: "numeric", month: "short", day: "numeric" });
  return moment.toLocaleString(undefined, options);
}

function formatDate(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

function formatCountdown(milliseconds) {
  const total = Math.max(0, Math.ceil(milliseconds / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = String(total % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${seconds}` : `${minutes}:${seconds}`;
}

function timeCell(iso) {
  const cell = element("td", "time", formatTime(iso));
  if (iso) cell.title = new Date(iso).toString();
  return cell;
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
  if (error.status === 0) return "The server cannot be reached. Is it running? The page keeps trying.";
  const details = Array.isArray(error.body.details) ? ` (${error.body.details.join("; ")})` : "";
  return `${error.message}${details}`;
}

/** Put an error on the page; a refused token also asks for the token again. */
function report(error, source) {
  if (error instanceof ApiError && error.status === 401) return; // api() has asked for the token
  showBanner(describe(error), source);
}

// --- The API ---------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api${path}`, init);
  } catch {
    throw new ApiError(0, null);
  }
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(
      page.signingIn
        ? "The server refused this token: check it and try again."
        : "Your administrator token was refused: it may have been changed. Enter it again.",
    );
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const registryPath = (username, action) =>
  `/client-registry/requests/${encodeURIComponent(username)}/${action}`;

// --- Signing in --------------------------------------------------------------

function askForToken(message) {
  const dialog = $("token-dialog");
  $("token-error").textContent = message || "";
  $("token-error").hidden = !message;
  $("sign-out").hidden = true;
  if (!dialog.open) {
    if (message) showBanner(message, "auth");
    $("token-input").value = "";
    dialog.showModal();
  }
  $("token-input").focus();
}

async function signIn(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-submit").disabled = true;
  page.signingIn = true;
  try {
    await api("GET", "/client-registry");
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

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const rows of [page.requestRows, page.userRows]) {
    for (const { row } of rows.values()) row.remove();
    rows.clear();
  }
  page.requests.clear();
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
  try {
    do {
      page.refreshAgain = false;
      const [status, requests] = await Promise.all([
        api("GET", "/client-registry"),
        api("GET", "/client-registry/requests"),
      ]);
      renderStatus(status);
      renderRequests(requests);
      if (page.view === "users") renderUsers(await api("GET", "/users"));
      clearBanner("refresh");
    } while (page.refreshAgain);
  } catch (error) {
    report(error, "refresh");
  } finally {
    page.refreshing = false;
  }
}

function renderStatus(status) {
  page.unlockedUntil = status.locked || !status.unlockedUntil ? null : Date.parse(status.unlockedUntil);
  const count = $("pending-count");
  count.textContent = String(status.pending);
  count.hidden = status.pending === 0;
  tick();
}

/** The lock panel, with its live countdown. */
function tick() {
  const left = page.unlockedUntil === null ? 0 : page.unlockedUntil - Date.now();
  const unlocked = left > 0;
  const panel = $("lock-panel");
  panel.dataset.state = unlocked ? "unlocked" : "locked";
  $("lock-state").textContent = unlocked ? "Unlocked" : "Locked";
  if (unlocked) {
    const until = formatTime(new Date(page.unlockedUntil).toISOString());
    $("lock-detail").textContent = `Accepting new requests for ${formatCountdown(left)} more (until ${until}).`;
  } else {
    $("lock-detail").textContent =
      "New requests are refused. Clients already pending can still poll, and you can still decide them.";
  }
  $("unlock").textContent = unlocked ? "Restart window" : "Unlock";
  $("lock").disabled = !unlocked;
  if (page.unlockedUntil !== null && !unlocked) {
    page.unlockedUntil = null; // the window ended on its own: confirm with the server
    refresh();
  }
}

async function setLock(action) {
  const button = $(action);
  button.disabled = true;
  try {
    renderStatus(await api("POST", `/client-registry/${action}`));
    clearBanner("lock");
  } catch (error) {
    report(error, "lock");
  } finally {
    button.disabled = false;
    tick();
  }
}

// --- The requests table ------------------------------------------------------

/** Put rows in ``body`` in the order of ``items``, creating, rewriting or dropping only what changed. */
function reconcile(body, rows, items, fill) {
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

function renderRequests(requests) {
  page.requests = new Map(requests.map((request) => [request.username, request]));
  reconcile($("requests-body"), page.requestRows, requests, fillRequestRow);
  $("requests-empty").hidden = requests.length > 0;
  if (page.openRequest !== null) updateGrantDialog(page.requests.get(page.openRequest));
}

function fillRequestRow(row, request) {
  const pending = request.state === "pending";
  row.dataset.username = request.username;
  row.dataset.state = request.state;
  row.className = pending ? "actionable" : "";
  row.tabIndex = pending ? 0 : -1;
  row.title = pending ? `Review the request of ${request.username}` : "";

  const name = element("td", "username");
  name.append(element("strong", null, request.username));
  const context = element("td", "context-cell", request.context || "");
  if (request.context) context.title = request.context;
  const state = element("td");
  state.append(element("span", `badge ${request.state}`, STATE_LABELS[request.state] || request.state));
  if (request.reason) state.append(element("span", "reason", request.reason));
  const lastPoll = timeCell(request.lastPollAt);
  lastPoll.append(element("span", "polls", `${request.pollCount} ${request.pollCount === 1 ? "poll" : "polls"}`));
  const roles = element("td");
  roles.append(...chips(request.roles, "chip", "none"));
  const permissions = element("td", "perms");
  permissions.append(...permissionNodes(request.permissions));
  const method = element("td");
  method.append(element("span", `method ${request.method}`, request.method === "csr" ? "CSR" : "password"));

  row.replaceChildren(
    name,
    state,
    element("td", "mono pairing-cell", request.pairingId),
    method,
    roles,
    permissions,
    context,
    element("td", "mono", request.clientAddress),
    timeCell(request.createdAt),
    lastPoll,
  );
}

function onRequestActivated(event) {
  const row = event.target.closest("tr");
  if (!row || row.dataset.state !== "pending") return;
  if (event.type === "keydown") {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
  }
  openGrantDialog(row.dataset.username);
}

// --- The Grant Access dialog -------------------------------------------------

async function loadCatalog() {
  if (page.catalog === null) page.catalog = await api("GET", "/client-registry/roles");
  return page.catalog;
}

async function openGrantDialog(username) {
  const request = page.requests.get(username);
  if (!request || request.state !== "pending") return;
  let catalog;
  try {
    catalog = await loadCatalog();
  } catch (error) {
    report(error, "dialog");
    return;
  }
  page.openRequest = username;
  $("grant-username").textContent = username;
  $("grant-pairing").textContent = request.pairingId;
  $("grant-method").textContent = request.method === "csr" ? "Certificate signing request (CSR)" : "Password";
  $("grant-address").textContent = request.clientAddress;
  $("grant-created").textContent = formatTime(request.createdAt);
  $("grant-requested-roles").replaceChildren(...chips(request.roles, "chip", "none"));
  $("grant-requested-permissions").replaceChildren(...permissionNodes(request.permissions));
  $("grant-context").textContent = request.context || "(none)";
  $("grant-context").classList.toggle("none", !request.context);
  fillRoleChoices(catalog, request.roles);
  $("grant-permissions-body").replaceChildren(...request.permissions.map(permissionRow));
  updatePermissionsEmpty();
  $("grant-reason").value = "";
  $("grant-error").hidden = true;
  updateGrantDialog(request);
  $("grant-dialog").showModal();
  $("grant-allow").focus();
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

function select(options, value, label) {
  const node = element("select");
  node.setAttribute("aria-label", label);
  for (const option of options) node.append(new Option(option, option, false, option === value));
  return node;
}

function permissionRow(permission) {
  const row = element("tr");
  const resource = element("input", "resource");
  resource.type = "text";
  resource.value = permission.resource;
  resource.placeholder = "topic filter, or /path";
  resource.setAttribute("aria-label", "Resource");
  const remove = element("button", "icon-button remove", "×");
  remove.type = "button";
  remove.setAttribute("aria-label", "Remove this permission");
  remove.addEventListener("click", () => {
    row.remove();
    updatePermissionsEmpty();
  });
  const cells = [
    resource,
    select(OPERATIONS, permission.operation, "Operation"),
    select(CONTEXTS, permission.context, "Context"),
    remove,
  ];
  row.append(...cells.map((control) => {
    const cell = element("td");
    cell.append(control);
    return cell;
  }));
  return row;
}

function addPermission() {
  const row = permissionRow({ resource: "", operation: "read", context: "mqtt" });
  $("grant-permissions-body").append(row);
  updatePermissionsEmpty();
  row.querySelector("input").focus();
}

function updatePermissionsEmpty() {
  const empty = $("grant-permissions-body").children.length === 0;
  $("grant-permissions-empty").hidden = !empty;
  $("grant-permissions").hidden = empty;
}

/** What a refresh learned about the request whose dialog is open. */
function updateGrantDialog(request) {
  const notice = $("grant-notice");
  const decidable = Boolean(request && request.state === "pending");
  if (!request) {
    notice.textContent = "This request is gone: it was forgotten, or it expired.";
  } else if (!decidable) {
    notice.textContent = `This request was ${request.state} meanwhile, by another administrator.`;
  } else {
    const polls = `${request.pollCount} ${request.pollCount === 1 ? "poll" : "polls"}`;
    $("grant-polled").textContent = `${formatTime(request.lastPollAt)} (${polls})`;
  }
  notice.hidden = decidable;
  $("grant-allow").disabled = !decidable;
  $("grant-deny").disabled = !decidable;
}

/** The roles and permissions left ticked and edited, or a sentence saying what is wrong. */
function collectGrant() {
  const roles = [...$("grant-roles").querySelectorAll("input:checked")].map((box) => box.value);
  const permissions = [];
  const problems = [];
  [...$("grant-permissions-body").rows].forEach((row, index) => {
    const [resource, operation, context] = row.querySelectorAll("input, select");
    const permission = { resource: resource.value.trim(), operation: operation.value, context: context.value };
    if (!permission.resource) problems.push(`permission ${index + 1} has no resource`);
    else if (permission.context === "http" && !permission.resource.startsWith("/")) {
      problems.push(`permission ${index + 1}: an http resource starts with /`);
    }
    permissions.push(permission);
  });
  return { grant: { roles, permissions }, problems };
}

function showGrantError(message) {
  $("grant-error").textContent = message;
  $("grant-error").hidden = false;
}

async function decide(action) {
  const username = page.openRequest;
  let body;
  if (action === "approve") {
    const { grant, problems } = collectGrant();
    if (problems.length) {
      showGrantError(`Fix the permissions first: ${problems.join("; ")}.`);
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
    } else if (error.status !== 401) {
      showGrantError(describe(error));
      updateGrantDialog(page.requests.get(username));
    } else {
      updateGrantDialog(page.requests.get(username));
    }
  }
}

// --- The Users view ----------------------------------------------------------

function renderUsers(users) {
  reconcile($("users-body"), page.userRows, users, fillUserRow);
  $("users-empty").hidden = users.length > 0;
}

function fillUserRow(row, user) {
  const name = element("td", "username");
  name.append(element("strong", null, user.username));
  const method = element("td");
  method.append(element("span", `method ${user.method}`, user.method === "csr" ? "CSR" : "password"));
  const roles = element("td");
  roles.append(...chips(user.roles, "chip", "none"));
  const permissions = element("td", "perms");
  permissions.append(...permissionNodes(user.permissions));
  const expires = element("td", "time", formatDate(user.certificateNotAfter) || "—");
  if (user.certificateNotAfter) expires.title = new Date(user.certificateNotAfter).toString();
  const remove = element("button", "button small danger-outline", "Delete");
  remove.type = "button";
  remove.dataset.username = user.username;
  remove.setAttribute("aria-label", `Delete ${user.username}`);
  const actions = element("td", "actions");
  actions.append(remove);
  row.dataset.username = user.username;
  row.replaceChildren(
    name,
    method,
    roles,
    permissions,
    element("td", "mono serial", user.certificateSerial || "—"),
    expires,
    timeCell(user.createdAt),
    actions,
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
  } catch (error) {
    if (error.status === 404) showBanner(`${username} was already deleted by someone else.`, "users");
    else report(error, "users");
    button.disabled = false;
  }
  refresh();
}

// --- Views and start -----------------------------------------------------------

function showView() {
  page.view = location.hash === "#users" ? "users" : "registry";
  for (const view of ["registry", "users"]) {
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
      location.hash = tab.dataset.view === "users" ? "#users" : "";
    });
  }
  window.addEventListener("hashchange", showView);
  $("unlock").addEventListener("click", () => setLock("unlock"));
  $("lock").addEventListener("click", () => setLock("lock"));
  $("requests-body").addEventListener("click", onRequestActivated);
  $("requests-body").addEventListener("keydown", onRequestActivated);
  $("users-body").addEventListener("click", onUserAction);
  $("grant-form").addEventListener("submit", (event) => event.preventDefault());
  $("grant-close").addEventListener("click", () => $("grant-dialog").close());
  $("grant-dialog").addEventListener("close", () => {
    page.openRequest = null;
  });
  $("grant-add-permission").addEventListener("click", addPermission);
  $("grant-allow").addEventListener("click", () => decide("approve"));
  $("grant-deny").addEventListener("click", () => decide("deny"));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });

  setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
  setInterval(tick, 500);
  if (token()) $("sign-out").hidden = false;
  else askForToken();
  showView();
}

start();

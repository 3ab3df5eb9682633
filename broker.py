"""What the administrator grants takes effect: the registry's users, kept in an MQTT broker (SPEC section 11).

Theory of operation
===================

Debian's mosquitto 2.0 with its dynamic security plugin keeps clients (a
username, an optional password, roles) and roles (lists of ACLs), and is
administered by JSON commands published to ``$CONTROL/dynamic-security/v1``.
This module makes those equal to the registry's users.

The mapping (BROKER-11.1-MAPPING)
---------------------------------
Each user U becomes one broker client U, marked as the registry's (its
``textname`` is ``MARK``), holding:

- the roles U was granted, as broker roles of the same names (the operator
  gives them their ACLs; one that does not exist yet is created empty);
- one role of its own, ``client-registry/U``, also marked, whose ACLs are
  U's granted permissions of context ``mqtt`` (``ACL_TYPES``: ``read`` is
  ``subscribePattern`` and ``publishClientReceive``, ``write`` is
  ``publishClientSend``, ``readWrite`` all three) on the permission's topic
  filter. Permissions of context ``http`` are not the broker's.

A certificate user's client has no password: it signs in with its
certificate on a ``use_identity_as_username`` listener. A password user's
client gets its password when the client collects its 201
(``provision_password``), since the registry keeps only a hash; until then
it exists without one and nobody can sign in as it.

The reconciler (BROKER-11.3-RECONCILE)
--------------------------------------
Level-triggered, as a Kubernetes controller: it does not replay events, it
looks. Each pass reads the registry's users (the wanted state) and the
broker's clients and roles (the found state), computes with ``plan`` the
commands that make the found equal to the wanted, and sends them. Clients
and roles without the mark were made by hand and are never touched; a user
whose name such a client holds is reported as a conflict. A pass runs at
start, after every approval, renewal and removal (``kick``), every minute,
and every few seconds while the broker cannot be reached, so a broker that
was down or lost its state is brought back when it returns.

``plan`` is a pure function of two ``BrokerState`` values; the unit tests
run it and the ``Reconciler`` against an in-memory double of dynamic
security, and test_broker.py against the real broker. paho-mqtt is imported
only by ``MqttDynamicSecurity``, so the registry without ``--mosquitto``
does not need it.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import files
import registry

log = logging.getLogger("registry.broker")

MARK = "client-registry"  # the textname of every client and role this registry manages
OWN_ROLE = "client-registry/"  # + username: the role holding a user's own permissions
CATALOG_ROLE = "made by the client registry for its role catalog: give it its ACLs"
CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSES = CONTROL + "/response"
# BROKER-11.1-MAPPING: what each operation of an mqtt permission allows
# (mosquitto's dynamic security ACL types, plugins/dynamic-security/README.md).
ACL_TYPES: dict[str, tuple[str, ...]] = {
    "read": ("subscribePattern", "publishClientReceive"),
    "write": ("publishClientSend",),
    "readWrite": ("subscribePattern", "publishClientReceive", "publishClientSend"),
}
PERIOD_SECONDS = 60.0  # a pass at least this often
RETRY_SECONDS = 5.0  # and this often while the broker cannot be reached
EXCHANGE_SECONDS = 5.0  # the longest one exchange with the broker may take


class BrokerUnreachable(Exception):
    """The broker could not be reached, refused the administrator, or did not answer in time."""


# --- The rules: the mapping, and the plan that makes a broker equal to it ----


@dataclass(frozen=True, order=True)
class Acl:
    """One ACL of a role: an ACL type of dynamic security, a topic filter, allowed."""

    acltype: str
    topic: str
    allow: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "allow": self.allow}


@dataclass(frozen=True)
class Client:
    """A broker client: its roles, whether the registry manages it, and what its description says."""

    username: str
    roles: tuple[str, ...]  # sorted
    managed: bool = True
    # How it signs in: "certificate", or "password <credential>" once it holds
    # that password, with " awaited" while it does not yet.
    description: str = ""


@dataclass(frozen=True)
class Role:
    """A broker role: its ACLs, and whether the registry manages it."""

    rolename: str
    acls: frozenset[Acl] = frozenset()
    managed: bool = True


@dataclass(frozen=True)
class BrokerState:
    """Clients and roles by name: as the registry wants them, or as the broker has them."""

    clients: Mapping[str, Client] = field(default_factory=dict)
    roles: Mapping[str, Role] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """The commands that make a broker equal to the wanted state, and what cannot be made so."""

    commands: list[dict[str, Any]]
    conflicts: list[str]  # names held by clients or roles made by hand


def own_role(username: str) -> str:
    """The name of the role holding ``username``'s own permissions."""
    return OWN_ROLE + username


def acls_of(rights: registry.Rights) -> frozenset[Acl]:
    """BROKER-11.1-MAPPING: the ACLs of granted permissions; those of context http are not the broker's."""
    return frozenset(
        Acl(acltype, permission.resource)
        for permission in rights.permissions
        if permission.context == "mqtt"
        for acltype in ACL_TYPES[permission.operation]
    )


def description_of(account: registry.Account) -> str:
    """What a user's client says of how it signs in (``Client.description``)."""
    return "certificate" if account.credential is None else f"password {account.credential}"


def wanted_state(accounts: Iterable[registry.Account]) -> BrokerState:
    """BROKER-11.1-MAPPING: the clients and own roles the registry's users make."""
    clients, roles = {}, {}
    for account in accounts:
        mine = own_role(account.username)
        roles[mine] = Role(mine, acls_of(account.rights))
        for name in account.rights.roles:
            roles.setdefault(name, Role(name, managed=False))  # the operator's: it must exist
        clients[account.username] = Client(
            account.username, _roles_of(account.username, account.rights), True, description_of(account)
        )
    return BrokerState(clients, roles)


def plan(wanted: BrokerState, found: BrokerState, passwords: Mapping[str, str] | None = None) -> Plan:
    """BROKER-11.3-RECONCILE: the commands that make ``found`` equal to ``wanted``, in an order the broker takes.

    Roles are made before the clients that hold them and deleted after;
    a client whose credential changed is deleted and made anew, so that the
    old one stops working. ``passwords`` (username to password) are given
    to the clients that do not hold them yet. What was made by hand is
    never touched: a name it holds is a conflict.
    """
    passwords = passwords or {}
    # A role that lets its holder administer the broker (the one ``dynsec init``
    # makes) is never handed to a user, whatever the catalog calls it.
    administering = {name for name, role in found.roles.items() if not role.managed and _administers(role)}
    conflicts = sorted(
        [name for name in wanted.clients if name in found.clients and not found.clients[name].managed]
        + [name for name, role in wanted.roles.items() if role.managed and _by_hand(found.roles.get(name))]
        + [name for name, client in wanted.clients.items() if administering & set(client.roles)]
    )
    blocked = set(conflicts)
    roles, clients, deletions = [], [], []
    for name, role in wanted.roles.items():
        present = found.roles.get(name)
        if present is None:
            roles.append(_create_role(role))
        elif role.managed and present.managed and present.acls != role.acls:
            roles.append({"command": "modifyRole", "rolename": name, "acls": _acls_json(role.acls)})
    for name, client in wanted.clients.items():
        if name in blocked or own_role(name) in blocked:
            continue
        present = found.clients.get(name)
        password = passwords.get(name)
        if present is not None and not _same_credential(present, client):
            deletions.append({"command": "deleteClient", "username": name})
            present = None
        clients += _client_commands(client, present, password)
    deletions += [
        {"command": "deleteClient", "username": name}
        for name, present in found.clients.items()
        if present.managed and name not in wanted.clients
    ]
    stale_roles = [
        {"command": "deleteRole", "rolename": name}
        for name, present in found.roles.items()
        if present.managed and name not in wanted.roles
    ]
    return Plan(roles + deletions + clients + stale_roles, conflicts)


def _roles_of(username: str, rights: registry.Rights) -> tuple[str, ...]:
    return tuple(sorted({*rights.roles, own_role(username)}))


def _administers(role: Role) -> bool:
    return any(acl.allow and acl.topic.startswith("$CONTROL") for acl in role.acls)


def _by_hand(role: Role | None) -> bool:
    return role is not None and not role.managed


def _same_credential(present: Client, client: Client) -> bool:
    """Whether ``present`` signs in as ``client`` should: the same method, and the same password if any."""
    return present.description in (client.description, client.description + " awaited")


def _client_commands(client: Client, present: Client | None, password: str | None) -> list[dict[str, Any]]:
    name, roles = client.username, [{"rolename": role} for role in client.roles]
    is_password_user = client.description != "certificate"
    if present is None:
        command = {"command": "createClient", "username": name, "textname": MARK, "roles": roles}
        if password is not None:
            return [command | {"password": password, "textdescription": client.description}]
        awaited = " awaited" if is_password_user else ""
        return [command | {"textdescription": client.description + awaited}]
    change: dict[str, Any] = {}
    if present.roles != client.roles:
        change["roles"] = roles
    if password is not None and present.description != client.description:
        change |= {"password": password, "textdescription": client.description}
    # modifyClient disconnects the client, so that a change takes effect: only when something changed.
    return [{"command": "modifyClient", "username": name} | change] if change else []


def _create_role(role: Role) -> dict[str, Any]:
    if not role.managed:
        return {"command": "createRole", "rolename": role.rolename, "textdescription": CATALOG_ROLE}
    return {"command": "createRole", "rolename": role.rolename, "textname": MARK, "acls": _acls_json(role.acls)}


def _acls_json(acls: Iterable[Acl]) -> list[dict[str, Any]]:
    return [acl.to_json() for acl in sorted(acls)]


def found_state(clients: Iterable[Mapping[str, Any]], roles: Iterable[Mapping[str, Any]]) -> BrokerState:
    """The broker's state from the ``data`` of ``listClients`` and ``listRoles`` (verbose)."""
    return BrokerState(
        {
            c["username"]: Client(
                c["username"],
                tuple(sorted(r["rolename"] for r in c.get("roles", []))),
                c.get("textname") == MARK,
                c.get("textdescription", ""),
            )
            for c in clients
        },
        {
            r["rolename"]: Role(
                r["rolename"],
                frozenset(Acl(a["acltype"], a["topic"], a.get("allow", False)) for a in r.get("acls", [])),
                r.get("textname") == MARK,
            )
            for r in roles
        },
    )


# --- Talking to the broker ---------------------------------------------------


class DynamicSecurity(Protocol):
    """Where commands go: ``MqttDynamicSecurity`` for a real broker, an in-memory double in tests."""

    def exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands at once; their responses, in order; ``BrokerUnreachable`` when there is none."""

    def close(self) -> None:
        """Let go of the broker."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, from ``--mosquitto mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"--mosquitto {url!r}: give mqtt://HOST:PORT or mqtts://HOST:PORT")
        if parts.username or parts.password:
            raise ValueError("--mosquitto: the administrator's name and password go in --mosquitto-admin's file")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def load_admin(path: Path) -> tuple[str, str]:
    """The dynamic-security administrator's username and password, from a JSON file only its owner may read."""
    files.check_private(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--mosquitto-admin {path} is not JSON: {error}") from None
    if not (isinstance(data, dict) and isinstance(data.get("username"), str) and isinstance(data.get("password"), str)):
        raise ValueError(f'--mosquitto-admin {path}: write {{"username": "...", "password": "..."}}')
    return data["username"], data["password"]


class MqttDynamicSecurity:
    """Dynamic security over MQTT v5 with paho-mqtt: one connection, opened when needed, again after a loss."""

    def __init__(
        self,
        address: BrokerAddress,
        admin: tuple[str, str],
        *,
        cafile: Path | None = None,
        timeout: float = EXCHANGE_SECONDS,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt  # only with --mosquitto: the registry does not need it otherwise
        except ImportError:
            raise ValueError("--mosquitto needs paho-mqtt: pip install paho-mqtt") from None

        self._mqtt = mqtt
        self.address = address
        self._admin = admin
        self._cafile = cafile
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client: Any = None
        self._answers: queue.Queue[Any] = queue.Queue()

    def exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Publish ``commands`` in one message and wait for their responses (``DynamicSecurity.exchange``)."""
        with self._lock:
            try:
                if self._client is None or not self._client.is_connected():
                    self._connect()
                return self._send(commands)
            except (OSError, ValueError, BrokerUnreachable, queue.Empty) as error:
                self._close()
                reason = str(error) or "no answer within the timeout"
                raise BrokerUnreachable(f"the broker at {self.address}: {reason}") from None

    def close(self) -> None:
        """Disconnect from the broker."""
        with self._lock:
            self._close()

    def _connect(self) -> None:
        self._close()
        mqtt = self._mqtt
        self._answers = answers = queue.Queue()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"client-registry-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
        )
        client.username_pw_set(*self._admin)
        if self.address.tls:
            context = ssl.create_default_context(cafile=str(self._cafile) if self._cafile else None)
            client.tls_set_context(context)
        client.on_connect = lambda _c, _u, _f, reason, _p: answers.put(("connect", reason))
        client.on_subscribe = lambda _c, _u, _m, reasons, _p: answers.put(("subscribe", reasons[0]))
        client.on_message = lambda _c, _u, message: answers.put(("message", message.payload))
        client.on_disconnect = lambda _c, _u, _f, reason, _p: answers.put(("disconnect", reason))
        self._client = client
        client.connect(self.address.host, self.address.port, keepalive=60)
        client.loop_start()
        self._expect("connect", "the administrator's connection was refused")
        client.subscribe(RESPONSES, qos=1)
        self._expect("subscribe", "the administrator may not subscribe to the responses")

    def _expect(self, kind: str, refusal: str) -> None:
        got, reason = self._answers.get(timeout=self._timeout)
        if got != kind or reason.is_failure:
            raise BrokerUnreachable(f"{refusal} ({reason})")

    def _send(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tag = secrets.token_hex(8)
        tagged = [command | {"correlationData": f"{tag}-{i}"} for i, command in enumerate(commands)]
        self._client.publish(CONTROL, json.dumps({"commands": tagged}), qos=1)
        while True:
            kind, payload = self._answers.get(timeout=self._timeout)
            if kind == "disconnect":
                raise BrokerUnreachable(f"the connection was lost ({payload})")
            if kind != "message":
                continue
            responses = json.loads(payload).get("responses", [])
            if responses and str(responses[0].get("correlationData", "")).startswith(tag):
                return responses

    def _close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


# --- The reconciler ----------------------------------------------------------


class Reconciler:
    """Keeps the broker equal to the registry's users (BROKER-11.3-RECONCILE), and gives password users theirs.

    ``reconcile`` is one pass; ``start`` runs passes from a thread of its own,
    at start, when kicked, every ``PERIOD_SECONDS``, and every
    ``RETRY_SECONDS`` while the broker cannot be reached. It is the registry's
    ``Provisioner`` too (BROKER-11.2-PASSWORD-201).
    """

    def __init__(
        self,
        accounts: Callable[[], list[registry.Account]],
        dynsec: DynamicSecurity,
        *,
        clock: registry.Clock,
        period: float = PERIOD_SECONDS,
        retry: float = RETRY_SECONDS,
    ) -> None:
        self.accounts = accounts
        self.dynsec = dynsec
        self.clock = clock
        self.period, self.retry = period, retry
        self._lock = threading.Lock()  # one pass at a time
        self._recorded = threading.Lock()  # what the last pass found: read by status() without waiting for a pass
        self._kicked = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._reachable: bool | None = None  # None: not tried yet
        self._agreed_at: datetime | None = None
        self._pending: int | None = None
        self._conflicts: list[str] = []
        self._awaiting: int | None = None

    def reconcile(self, passwords: Mapping[str, str] | None = None) -> tuple[Plan, BrokerState]:
        """One pass: look, plan, send, look again; what is left to do, and what was found.

        ``BrokerUnreachable`` when the broker cannot be reached.
        """
        with self._lock:
            try:
                return self._pass(passwords or {})
            except BrokerUnreachable:
                with self._recorded:
                    self._reachable = False
                raise

    def _pass(self, passwords: Mapping[str, str]) -> tuple[Plan, BrokerState]:
        wanted = wanted_state(self.accounts())
        found = self._look()
        todo = plan(wanted, found, passwords)
        if todo.commands:
            responses = self.dynsec.exchange(todo.commands)
            for command, response in zip(todo.commands, responses, strict=True):
                if response.get("error"):
                    name = command.get("username") or command.get("rolename")
                    log.warning("the broker refused %s %s: %s", command["command"], name, response["error"])
            found = self._look()
        left = plan(wanted, found)
        self._record(found, left)
        return left, found

    def _record(self, found: BrokerState, left: Plan) -> None:
        if self._reachable is False:
            log.info("the broker is reachable again")
        if left.conflicts and left.conflicts != self._conflicts:
            log.warning("these names are held at the broker by hand, or by its administrator's role: %s: left alone",
                        ", ".join(left.conflicts))  # fmt: skip
        awaiting = sum(1 for c in found.clients.values() if c.managed and c.description.endswith(" awaited"))
        with self._recorded:
            self._reachable = True
            self._pending = len(left.commands) + len(left.conflicts)
            self._conflicts = left.conflicts
            if not left.commands and not left.conflicts:
                self._agreed_at = self.clock()
            self._awaiting = awaiting

    def _look(self) -> BrokerState:
        listing = [
            {"command": "listClients", "verbose": True, "count": -1, "offset": 0},
            {"command": "listRoles", "verbose": True, "count": -1, "offset": 0},
        ]
        clients, roles = self.dynsec.exchange(listing)
        for response in (clients, roles):
            if response.get("error"):
                raise BrokerUnreachable(f"{response['command']}: {response['error']}")
        return found_state(clients["data"]["clients"], roles["data"]["roles"])

    def provision_password(self, username: str, password: str, rights: registry.Rights, credential: str) -> None:
        """BROKER-11.2-PASSWORD-201: a pass that gives ``username`` its password; 503 unless the broker holds it."""
        try:
            left, found = self.reconcile({username: password})
        except BrokerUnreachable as error:
            log.warning("cannot give %s its password: %s", username, error)
            raise registry.BrokerUnavailable(
                "the MQTT broker cannot be reached to give you your account: poll again after Retry-After"
            ) from None
        if username in left.conflicts or own_role(username) in left.conflicts:
            raise registry.BrokerUnavailable(
                f"the MQTT broker holds a client or role for {username!r} that the registry did not make:"
                " the operator must remove it; poll again after Retry-After"
            )
        client = found.clients.get(username)
        if (
            client is None
            or client.description != f"password {credential}"
            or client.roles != _roles_of(username, rights)
        ):
            raise registry.BrokerUnavailable(
                f"the MQTT broker did not take {username!r}'s account: poll again after Retry-After"
            )

    def kick(self) -> None:
        """Ask for a pass now (after an approval, a renewal or a removal)."""
        self._kicked.set()

    def start(self) -> None:
        """Run passes from a thread of its own until ``stop``; the first at once."""
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the passes."""
        self._stopped.set()
        self._kicked.set()
        if self._thread is not None:
            self._thread.join()
        self.dynsec.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._kicked.clear()
            was_reachable, passed = self._reachable, False
            try:
                self.reconcile()
                passed = True
            except BrokerUnreachable as error:
                # Once when it goes away, not at every try: a broker down for an hour is one line.
                level = logging.DEBUG if was_reachable is False else logging.WARNING
                log.log(level, "%s; trying again every %.0f s", error, self.retry)
            except Exception:  # an answer it did not expect, say: the next pass tries again
                log.exception("a pass of the broker's reconciler failed; trying again in %.0f s", self.retry)
            self._kicked.wait(self.period if passed else self.retry)

    def status(self) -> dict[str, Any]:
        """BROKER-11.4-STATUS: the broker's state for the status call: reachable, the last agreement, what is left."""
        with self._recorded:
            return {
                "reachable": self._reachable,
                "lastAgreement": self._agreed_at.isoformat() if self._agreed_at else None,
                "pendingDifferences": self._pending,
                "conflicts": list(self._conflicts),
                "awaitingPassword": self._awaiting,
            }


def serve(
    core: registry.Registry, url: str, admin: Path | None, cafile: Path | None, clock: registry.Clock
) -> Reconciler:
    """``--mosquitto``: a reconciler for the broker at ``url``, made ``core``'s provisioner (not started yet).

    ``ValueError`` or ``OSError`` for a setting that cannot work: a bad URL, a
    missing or unreadable admin file, a role catalog that uses the own roles' prefix.
    """
    address = BrokerAddress.parse(url)
    if admin is None:
        raise ValueError(
            "--mosquitto needs --mosquitto-admin FILE: the dynamic-security administrator's name and password"
        )
    if cafile is not None and not cafile.is_file():
        raise ValueError(f"--mosquitto-cafile {cafile} is not a file")
    taken = [name for name in core.roles if name.startswith(OWN_ROLE)]
    if taken:
        raise ValueError(f"the role catalog's {', '.join(taken)}: names starting {OWN_ROLE!r} are the users' own roles")
    dynsec = MqttDynamicSecurity(address, load_admin(admin), cafile=cafile)
    reconciler = Reconciler(core.accounts, dynsec, clock=clock)
    core.provisioner = reconciler
    return reconciler

"""The registry keeps an MQTT broker equal to its users (SPEC section 11).

Two halves. The first runs broker.py's mapping, its ``plan`` and its
``Reconciler`` against ``FakeDynamicSecurity``, an in-memory double of
mosquitto's dynamic security plugin that takes the same JSON commands and
answers as the plugin's source does (plugins/dynamic-security/*.c of
mosquitto 2.0): a missing role is an error, a deleted or modified client is
disconnected. The second runs Debian's mosquitto with the real plugin and a
server started with ``--mosquitto``, and signs in with mosquitto_pub and
mosquitto_sub (MQTT v5, QoS 1), as a device does.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pwd
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

import broker
import ca
import registry
import server
from conftest import ADMIN_TOKEN, FAST, call, make_csr, make_key, serve
from test_interop import (
    HOST,
    MOSQUITTO,
    MOSQUITTO_PUB,
    SEARCH_PATH,
    SUBPROCESS_SECONDS,
    download,
    free_port,
    wait_until_listening,
)

PAHO = importlib.util.find_spec("paho") is not None

# --- An in-memory dynamic security -------------------------------------------


class FakeDynamicSecurity:
    """Dynamic security's commands over two dicts, as mosquitto 2.0's plugin answers them.

    ``up = False`` is a broker that cannot be reached; ``disconnected`` lists
    the usernames whose connections the plugin would close (it does on
    deleteClient and modifyClient); ``passwords`` what each client signs in with.
    """

    def __init__(self) -> None:
        self.clients: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}
        self.disconnected: list[str] = []
        self.up = True
        self.exchanges = 0

    def exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.up:
            raise broker.BrokerUnreachable("the broker at mqtt://fake: connection refused")
        self.exchanges += 1
        return [self._answer(command) for command in commands]

    def close(self) -> None:
        pass

    def _answer(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["command"]
        error, data = getattr(self, "_" + name)(command)
        response: dict[str, Any] = {"command": name}
        if error:
            response["error"] = error
        if data is not None:
            response["data"] = data
        return response

    def _listClients(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        return None, {"totalCount": len(self.clients), "clients": copy.deepcopy(list(self.clients.values()))}

    def _listRoles(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        return None, {"totalCount": len(self.roles), "roles": copy.deepcopy(list(self.roles.values()))}

    def _createClient(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        username = command["username"]
        if username in self.clients:
            return "Client already exists", None
        if any(role["rolename"] not in self.roles for role in command.get("roles", [])):
            return "Role not found", None
        self.clients[username] = _texts(command) | {
            "username": username,
            "roles": [{"rolename": role["rolename"]} for role in command.get("roles", [])],
            "groups": [],
        }
        if command.get("password"):
            self.passwords[username] = command["password"]
        return None, None

    def _modifyClient(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        client = self.clients.get(command["username"])
        if client is None:
            return "Client not found", None
        if "roles" in command:
            if any(role["rolename"] not in self.roles for role in command["roles"]):
                return "Role not found", None
            client["roles"] = [{"rolename": role["rolename"]} for role in command["roles"]]
        if command.get("password"):
            self.passwords[command["username"]] = command["password"]
        client.update(_texts(command))
        self.disconnected.append(command["username"])
        return None, None

    def _deleteClient(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        if self.clients.pop(command["username"], None) is None:
            return "Client not found", None
        self.passwords.pop(command["username"], None)
        self.disconnected.append(command["username"])
        return None, None

    def _createRole(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        if command["rolename"] in self.roles:
            return "Role already exists", None
        acls = [acl | {"priority": 0} for acl in command.get("acls", [])]
        self.roles[command["rolename"]] = _texts(command) | {"rolename": command["rolename"], "acls": acls}
        return None, None

    def _modifyRole(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        role = self.roles.get(command["rolename"])
        if role is None:
            return "Role does not exist", None
        if "acls" in command:
            role["acls"] = [acl | {"priority": 0} for acl in command["acls"]]
        role.update(_texts(command))
        return None, None

    def _deleteRole(self, command: dict[str, Any]) -> tuple[str | None, Any]:
        if self.roles.pop(command["rolename"], None) is None:
            return "Role not found", None
        for client in self.clients.values():
            client["roles"] = [role for role in client["roles"] if role["rolename"] != command["rolename"]]
        return None, None

    def acls(self, rolename: str) -> set[tuple[str, str]]:
        """A role's ACLs as (type, topic) pairs, all of them allowed."""
        assert all(acl["allow"] for acl in self.roles[rolename]["acls"])
        return {(acl["acltype"], acl["topic"]) for acl in self.roles[rolename]["acls"]}

    def role_names(self, username: str) -> set[str]:
        return {role["rolename"] for role in self.clients[username]["roles"]}


def _texts(command: dict[str, Any]) -> dict[str, str]:
    return {key: command[key] for key in ("textname", "textdescription") if key in command}


def permission(resource: str, operation: str, context: str = "mqtt") -> dict[str, str]:
    return {"resource": resource, "operation": operation, "context": context}


@pytest.fixture
def dynsec() -> FakeDynamicSecurity:
    return FakeDynamicSecurity()


@pytest.fixture
def wired(reg: registry.Registry, dynsec: FakeDynamicSecurity, clock: Any) -> broker.Reconciler:
    """The registry with a reconciler over the fake broker as its provisioner."""
    reconciler = broker.Reconciler(reg.accounts, dynsec, clock=clock)
    reg.provisioner = reconciler
    return reconciler


def approve(reg: registry.Registry, request: dict[str, Any], grant: dict[str, Any] | None = None) -> None:
    reg.unlock()
    assert reg.register(request).status == 202
    reg.approve(request["username"], grant)


# --- The mapping (BROKER-11.1-MAPPING) ---------------------------------------


def test_each_operation_becomes_the_acl_types_of_the_table_and_http_permissions_are_not_the_brokers() -> None:
    """Proves BROKER-11.1-MAPPING."""
    rights = registry.Rights.of(
        ["minimum"],
        [
            registry.Permission("mqtt", "plant/r/#", "read"),
            registry.Permission("mqtt", "plant/w/+/x", "write"),
            registry.Permission("mqtt", "plant/rw", "readWrite"),
            registry.Permission("http", "/api/data", "readWrite"),
        ],
    )
    assert broker.acls_of(rights) == {
        broker.Acl("subscribePattern", "plant/r/#"),
        broker.Acl("publishClientReceive", "plant/r/#"),
        broker.Acl("publishClientSend", "plant/w/+/x"),
        broker.Acl("subscribePattern", "plant/rw"),
        broker.Acl("publishClientReceive", "plant/rw"),
        broker.Acl("publishClientSend", "plant/rw"),
    }


def test_a_user_is_a_marked_client_with_its_granted_roles_and_a_role_of_its_own(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.1-MAPPING: the roles granted, narrowed, and the own role; no password for a certificate user."""
    request = {
        "username": "sensor-0001",
        "csr": make_csr("sensor-0001"),
        "roles": ["minimum", "operator"],
        "permissions": [permission("plant/#", "write"), permission("/api", "read", "http")],
    }
    approve(reg, request, {"roles": ["operator"], "permissions": [permission("plant/a/#", "write")]})
    left, _ = wired.reconcile()

    assert left == broker.Plan([], [])
    client = dynsec.clients["sensor-0001"]
    assert client["textname"] == broker.MARK and client["textdescription"] == "certificate"
    assert dynsec.role_names("sensor-0001") == {"operator", "client-registry/sensor-0001"}
    assert dynsec.acls("client-registry/sensor-0001") == {("publishClientSend", "plant/a/#")}
    assert "sensor-0001" not in dynsec.passwords
    # The catalog's role is the operator's: made empty, unmarked, for it to fill in.
    assert dynsec.roles["operator"]["acls"] == [] and "textname" not in dynsec.roles["operator"]
    assert "minimum" not in dynsec.roles


# --- The password's 201 (BROKER-11.2-PASSWORD-201) ---------------------------


def test_a_password_users_201_waits_for_the_broker_and_the_next_poll_completes_it(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.2-PASSWORD-201: 503 broker_unavailable, Retry-After, nothing changed; then 201."""
    request = {"username": "meter-0001", "password": "s3cret-pass", "permissions": [permission("plant/a/#", "read")]}
    approve(reg, request)
    wired.reconcile()
    assert dynsec.clients["meter-0001"]["textdescription"].endswith(" awaited")
    assert "meter-0001" not in dynsec.passwords  # nobody can sign in as it yet

    dynsec.up = False
    users = reg.users()
    with pytest.raises(registry.BrokerUnavailable) as refused:
        reg.register(request)
    assert refused.value.status == 503 and refused.value.code == "broker_unavailable"
    assert refused.value.headers["Retry-After"] == str(FAST.retry_after_pending)
    assert reg.users() == users
    [listed] = reg.requests()
    assert listed["collectedAt"] is None  # a 503 is not a collected 201
    assert wired.status()["reachable"] is False

    dynsec.up = True
    outcome = reg.register(request)
    assert outcome.status == 201
    assert reg.requests()[0]["collectedAt"] is not None
    assert dynsec.passwords["meter-0001"] == "s3cret-pass"
    assert not dynsec.clients["meter-0001"]["textdescription"].endswith(" awaited")
    assert wired.status()["reachable"] is True and wired.status()["awaitingPassword"] == 0


def test_a_repeated_201_finds_the_password_held_and_disconnects_no_one(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.2-PASSWORD-201: every repeat is confirmed, and a client that holds its password is left be."""
    request = {"username": "meter-0002", "password": "s3cret-pass"}
    approve(reg, request)
    wired.reconcile()  # the pass the approval kicks: the client exists, awaiting its password
    assert reg.register(request).status == 201
    assert reg.register(request).status == 201
    assert dynsec.disconnected == ["meter-0002"]  # once, when the password was given (modifyClient)
    dynsec.up = False
    with pytest.raises(registry.BrokerUnavailable):
        reg.register(request)


def test_a_name_held_by_a_hand_made_client_is_left_alone_and_its_201_waits(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.2-PASSWORD-201 and BROKER-11.3-RECONCILE: what was made by hand is never touched."""
    dynsec.clients["meter-0003"] = {"username": "meter-0003", "roles": [], "groups": []}
    dynsec.passwords["meter-0003"] = "the operator's"
    request = {"username": "meter-0003", "password": "s3cret-pass"}
    approve(reg, request)
    with pytest.raises(registry.BrokerUnavailable, match="the registry did not make"):
        reg.register(request)
    assert dynsec.clients["meter-0003"] == {"username": "meter-0003", "roles": [], "groups": []}
    assert dynsec.passwords["meter-0003"] == "the operator's"
    assert wired.status()["conflicts"] == ["meter-0003"] and wired.status()["pendingDifferences"] == 1


def test_a_catalog_role_that_administers_the_broker_is_never_given(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.1-MAPPING: a role whose ACLs reach $CONTROL (dynsec init's admin role) is no user's."""
    dynsec.roles["operator"] = {
        "rolename": "operator",
        "acls": [{"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "allow": True}],
    }
    approve(reg, {"username": "sensor-0009", "csr": make_csr("sensor-0009"), "roles": ["operator"]})
    left, _ = wired.reconcile()
    assert left.conflicts == ["sensor-0009"] and "sensor-0009" not in dynsec.clients


def test_a_registry_without_a_provisioner_answers_201_as_before(reg: registry.Registry) -> None:
    """Proves BROKER-11.2-PASSWORD-201 applies only with a broker: without one nothing changes."""
    request = {"username": "meter-0004", "password": "s3cret-pass"}
    approve(reg, request)
    assert reg.provisioner is None and reg.register(request).status == 201


# --- The reconciler (BROKER-11.3-RECONCILE) ----------------------------------


def test_removal_deletes_the_client_and_its_role_and_leaves_hand_made_ones(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.3-RECONCILE: a removed user's client is deleted (so disconnected); the rest stays."""
    dynsec.clients["watcher"] = {"username": "watcher", "textname": "by hand", "roles": [], "groups": []}
    dynsec.roles["watching"] = {"rolename": "watching", "acls": [{"acltype": "subscribePattern", "topic": "#"}]}
    approve(reg, {"username": "sensor-0002", "csr": make_csr("sensor-0002")})
    wired.reconcile()
    reg.remove_user("sensor-0002")
    wired.reconcile()
    assert set(dynsec.clients) == {"watcher"} and set(dynsec.roles) == {"watching"}
    assert dynsec.disconnected == ["sensor-0002"]


def test_a_renewal_changes_nothing_at_the_broker(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.3-RECONCILE: a renewal keeps the user, its rights and its client: nobody is disconnected."""
    key = make_key()
    request = {
        "username": "sensor-0004",
        "csr": make_csr("sensor-0004", key),
        "permissions": [permission("a/#", "write")],
    }
    approve(reg, request)
    certificate = x509.load_pem_x509_certificate(reg.register(request).body["certificate"].encode())
    wired.reconcile()
    before = copy.deepcopy((dynsec.clients, dynsec.roles))
    renewed = reg.renew(certificate.public_bytes(serialization.Encoding.DER), {"csr": make_csr("sensor-0004", key)})
    assert renewed.status == 201
    left, _ = wired.reconcile()
    assert left == broker.Plan([], []) and (dynsec.clients, dynsec.roles) == before and dynsec.disconnected == []


def test_what_drifted_at_the_broker_is_put_back(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.3-RECONCILE: level-triggered, it looks again and makes the broker agree."""
    approve(
        reg, {"username": "sensor-0003", "csr": make_csr("sensor-0003"), "permissions": [permission("a/#", "read")]}
    )
    wired.reconcile()
    wanted = copy.deepcopy((dynsec.clients, dynsec.roles))
    dynsec.roles["client-registry/sensor-0003"]["acls"].append(
        {"acltype": "publishClientSend", "topic": "#", "allow": True}
    )
    dynsec.clients["sensor-0003"]["roles"].append({"rolename": "watching"})
    dynsec.roles["watching"] = {"rolename": "watching", "acls": []}
    wired.reconcile()
    assert dynsec.clients == wanted[0] and dynsec.roles == wanted[1] | {
        "watching": {"rolename": "watching", "acls": []}
    }

    # A broker that lost its state is made again.
    dynsec.clients.clear()
    dynsec.roles.clear()
    wired.reconcile()
    assert dynsec.clients == wanted[0] and dynsec.roles == wanted[1]


def test_a_user_registered_again_gets_a_new_client_so_the_old_password_stops_working(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler
) -> None:
    """Proves BROKER-11.3-RECONCILE: a changed credential is a client deleted and made anew."""
    first = {"username": "meter-0005", "password": "first-pass"}
    approve(reg, first)
    assert reg.register(first).status == 201
    dynsec.up = False  # the removal happens while the broker is away
    reg.remove_user("meter-0005")
    second = {"username": "meter-0005", "password": "second-pass"}
    approve(reg, second)
    dynsec.up = True
    wired.reconcile()
    assert "meter-0005" not in dynsec.passwords
    assert dynsec.clients["meter-0005"]["textdescription"].endswith(" awaited")
    assert reg.register(second).status == 201 and dynsec.passwords["meter-0005"] == "second-pass"


def test_the_status_reports_the_brokers_state(
    reg: registry.Registry, dynsec: FakeDynamicSecurity, wired: broker.Reconciler, clock: Any
) -> None:
    """Proves BROKER-11.4-STATUS."""
    assert wired.status() == {
        "reachable": None,
        "lastAgreement": None,
        "pendingDifferences": None,
        "conflicts": [],
        "awaitingPassword": None,
    }
    approve(reg, {"username": "meter-0006", "password": "s3cret-pass"})
    dynsec.up = False
    with pytest.raises(broker.BrokerUnreachable):
        wired.reconcile()
    assert wired.status()["reachable"] is False and wired.status()["lastAgreement"] is None
    dynsec.up = True
    wired.reconcile()
    assert wired.status() == {
        "reachable": True,
        "lastAgreement": clock().isoformat(),
        "pendingDifferences": 0,
        "conflicts": [],
        "awaitingPassword": 1,
    }


USERNAMES = st.sampled_from(["dev-a", "dev-b", "dev-c", "dev-d"])
PERMISSIONS = st.lists(
    st.builds(
        registry.Permission,
        st.sampled_from(["mqtt", "http"]),
        st.sampled_from(["plant/a/#", "plant/+/x", "/api"]),
        st.sampled_from(registry.OPERATIONS),
    ),
    max_size=3,
)
ACCOUNTS = st.dictionaries(
    USERNAMES,
    st.tuples(
        st.sampled_from(["password", "csr"]),
        st.lists(st.sampled_from(["minimum", "operator"]), max_size=2),
        PERMISSIONS,
    ),
)


@given(before=ACCOUNTS, after=ACCOUNTS, by_hand=st.sets(USERNAMES, max_size=2))
def test_one_pass_makes_any_broker_agree_and_touches_nothing_made_by_hand(
    before: dict[str, Any], after: dict[str, Any], by_hand: set[str]
) -> None:
    """Proves BROKER-11.3-RECONCILE: from any state of the broker, one pass leaves nothing to do but conflicts."""

    def accounts(users: dict[str, Any]) -> list[registry.Account]:
        return [
            registry.Account(
                name, method, registry.Rights.of(roles, permissions), name if method == "password" else None
            )
            for name, (method, roles, permissions) in users.items()
        ]

    dynsec = FakeDynamicSecurity()
    for name in by_hand:
        dynsec.clients[name] = {"username": name, "roles": [], "groups": []}
    made_by_hand = copy.deepcopy(dynsec.clients)
    current = accounts(before)
    reconciler = broker.Reconciler(lambda: current, dynsec, clock=lambda: datetime.now(UTC))
    reconciler.reconcile()
    current = accounts(after)
    left, found = reconciler.reconcile()

    assert left.commands == [] and left.conflicts == sorted(by_hand & set(after))
    for name in by_hand:
        assert dynsec.clients[name] == made_by_hand[name]
    wanted = broker.wanted_state(current)
    for name, client in wanted.clients.items():
        if name not in by_hand:
            assert found.clients[name].roles == client.roles
            assert found.roles[broker.own_role(name)].acls == wanted.roles[broker.own_role(name)].acls
    assert {name for name, client in found.clients.items() if client.managed} == set(after) - by_hand


# --- The settings -------------------------------------------------------------


def test_the_broker_url_and_the_admin_file_are_checked(tmp_path: Path) -> None:
    """Proves BROKER-11.1-MAPPING's settings: a URL of mqtt or mqtts, and an admin file others cannot read."""
    assert broker.BrokerAddress.parse("mqtt://127.0.0.1:1884") == broker.BrokerAddress("127.0.0.1", 1884, False)
    assert broker.BrokerAddress.parse("mqtts://broker.plant") == broker.BrokerAddress("broker.plant", 8883, True)
    for wrong in ("http://127.0.0.1:1883", "mqtt://admin:pw@127.0.0.1:1883", "mqtt:///x", "127.0.0.1:1883"):
        with pytest.raises(ValueError, match="--mosquitto"):
            broker.BrokerAddress.parse(wrong)
    admin = tmp_path / "admin.json"
    admin.write_text(json.dumps({"username": "admin", "password": "pw"}))
    admin.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        broker.load_admin(admin)
    admin.chmod(0o600)
    assert broker.load_admin(admin) == ("admin", "pw")
    admin.write_text("admin pw")
    with pytest.raises(ValueError, match="not JSON"):
        broker.load_admin(admin)


def test_the_server_refuses_mosquitto_without_the_admin_file(tmp_path: Path) -> None:
    """Proves BROKER-11.1-MAPPING's settings: --mosquitto alone cannot start."""
    config = server.Config(data_dir=tmp_path / "data", port=0, http=True, mosquitto="mqtt://127.0.0.1:1883")
    with pytest.raises(ValueError, match="--mosquitto-admin"):
        server.build(config)


# --- Against the real broker ----------------------------------------------------

MOSQUITTO_SUB = shutil.which("mosquitto_sub", path=SEARCH_PATH)
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl", path=SEARCH_PATH)
# Debian ships the plugin in the mosquitto package, in its architecture's library folder.
PLUGINS = [*sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))]
PLUGINS.append(Path("/usr/lib/mosquitto_dynamic_security.so"))
DYNAMIC_SECURITY = next((path for path in PLUGINS if path.exists()), PLUGINS[-1])
AGREEMENT_SECONDS = 30  # for the reconciler to reach a broker that has just started
real_broker = pytest.mark.skipif(
    not (MOSQUITTO and MOSQUITTO_PUB and MOSQUITTO_SUB and MOSQUITTO_CTRL and DYNAMIC_SECURITY.exists() and PAHO),
    reason="mosquitto, mosquitto-clients, the dynamic security plugin or paho-mqtt is missing: apt-get install"
    " mosquitto mosquitto-clients and pip install paho-mqtt to run the broker's tests",
)


class Plant:
    """A registry started with --mosquitto, and Debian's mosquitto with the dynamic security plugin.

    The broker has a plain listener for password clients and a TLS one that
    requires a certificate from the registry's CA, checks its CRL, and takes
    its Common Name as the username. Its dynamic security starts with an
    administrator (``mosquitto_ctrl dynsec init``), whose name and password
    the registry reads from a 0600 file; the test adds a client by hand, the
    watcher, who may subscribe to and publish on ``plant/#``.
    """

    def __init__(self, folder: Path, base: str, data: Path, admin: int) -> None:
        self.folder, self.base = folder, base
        self.plain, self.tls, self.admin = free_port(), free_port(), admin
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        download(base, "/api/client-registry/ca", folder / "ca.pem")
        download(base, "/api/client-registry/crl.pem", folder / "crl.pem")
        credentials = ca.CA.load_or_create(data, datetime.now(UTC)).issue_server_certificate(datetime.now(UTC))
        (folder / "broker.pem").write_text(credentials.certificate_pem)
        (folder / "broker.key").write_text(credentials.key_pem)
        (folder / "broker.key").chmod(0o600)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            "\n".join(
                [
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    "persistence false",
                    "log_dest stderr",
                    "log_type all",
                    f"plugin {DYNAMIC_SECURITY}",
                    f"plugin_opt_config_file {folder / 'dynamic-security.json'}",
                    f"listener {self.plain} {HOST}",
                    f"listener {self.tls} {HOST}",
                    f"cafile {folder / 'ca.pem'}",
                    f"certfile {folder / 'broker.pem'}",
                    f"keyfile {folder / 'broker.key'}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    f"crlfile {folder / 'crl.pem'}",
                    # The registry's administrator, over TLS with no client certificate (mqtts://).
                    f"listener {self.admin} {HOST}",
                    f"cafile {folder / 'ca.pem'}",
                    f"certfile {folder / 'broker.pem'}",
                    f"keyfile {folder / 'broker.key'}",
                    "",
                ]
            )
        )

    def start(self) -> None:
        """Start the broker and wait until both its listeners take connections."""
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        for port in (self.plain, self.tls, self.admin):
            wait_until_listening(self.process, port, self.log)

    def stop(self) -> None:
        """Stop the broker this plant started, by its process handle."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(SUBPROCESS_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(SUBPROCESS_SECONDS)
        self.process = None

    def ctrl(self, *arguments: str) -> None:
        """One mosquitto_ctrl dynsec command as the administrator: how an operator makes a client by hand."""
        done = run(
            [MOSQUITTO_CTRL, "-h", HOST, "-p", str(self.plain), "-u", "admin", "-P", "admin-password", "dynsec",
             *arguments]
        )  # fmt: skip
        assert done.returncode == 0, done

    def status(self) -> dict[str, Any]:
        status, body = call(self.base, "GET", "/api/client-registry", token=ADMIN_TOKEN)
        assert status == 200, body
        return body["broker"]

    def wait_for_agreement(self) -> dict[str, Any]:
        """The broker's status once the reconciler reached it and left nothing to do."""
        deadline = time.monotonic() + AGREEMENT_SECONDS
        while time.monotonic() < deadline:
            state = self.status()
            if state["reachable"] and state["pendingDifferences"] == 0:
                return state
            time.sleep(0.1)
        pytest.fail(f"the broker did not agree within {AGREEMENT_SECONDS} s: {self.status()}\n{self.log.read_text()}")

    def publish(self, who: Device, topic: str) -> subprocess.CompletedProcess[str]:
        return run([MOSQUITTO_PUB, *self._sign_in(who), "-q", "1", "-t", topic, "-m", who.name])

    def subscribe_once(self, who: Device, topic: str) -> subprocess.CompletedProcess[str]:
        """The first message on ``topic`` (the retained one), or a failure within 10 s."""
        return run([MOSQUITTO_SUB, *self._sign_in(who), "-q", "1", "-t", topic, "-v", "-C", "1", "-W", "10"])

    def subscriber(self, who: Device, topic: str) -> subprocess.Popen[str]:
        """A subscriber that stays connected, printing what it receives."""
        return subprocess.Popen(
            [MOSQUITTO_SUB, *self._sign_in(who), "-q", "1", "-t", topic, "-v"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def _sign_in(self, who: Device) -> list[str]:
        common = ["-h", HOST, "-V", "5", "-i", who.name]
        if who.password is not None:
            return [*common, "-p", str(self.plain), "-u", who.name, "-P", who.password]
        return [*common, "-p", str(self.tls), "--cafile", str(self.folder / "ca.pem"),
                "--cert", str(who.folder / "device.pem"), "--key", str(who.folder / "device.key")]  # fmt: skip


@dataclass(frozen=True)
class Device:
    """A device's name and what it signs in with: a password, or the key and certificate in its folder."""

    name: str
    folder: Path
    password: str | None = None


class Watcher:
    """The client made by hand: subscribed to plant/#, it sees every message the broker delivers there."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed: queue.Queue[object] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
        self.client.username_pw_set("watcher", "watcher-password")
        self.client.on_message = lambda _c, _u, message: self.messages.put((message.topic, message.payload))
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: subscribed.put(reasons)
        self.client.on_connect = lambda client, _u, _f, _r, _p: client.subscribe("plant/#", qos=1)
        self.client.connect(HOST, port)
        self.client.loop_start()
        assert not subscribed.get(timeout=SUBPROCESS_SECONDS)[0].is_failure

    def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(SUBPROCESS_SECONDS)

    def next_topic(self) -> str:
        """The topic of the next message delivered (the broker delivers in order)."""
        return self.messages.get(timeout=SUBPROCESS_SECONDS)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SUBPROCESS_SECONDS, check=False
    )


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[tuple[Plant, Watcher]]:
    """A registry with --mosquitto and a running broker that agrees with it; the hand-made watcher connected."""
    folder = tmp_path / "broker"
    folder.mkdir(mode=0o700)
    init = run([MOSQUITTO_CTRL, "dynsec", "init", str(folder / "dynamic-security.json"), "admin", "admin-password"])
    assert init.returncode == 0, init
    admin = tmp_path / "mosquitto-admin.json"
    admin.write_text(json.dumps({"username": "admin", "password": "admin-password"}))
    admin.chmod(0o600)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    ca.CA.load_or_create(data, datetime.now(UTC))  # its certificate is the broker's CA as well
    port = free_port()
    # The port is chosen first, so the registry can be given it; the broker starts after the registry.
    with serve(
        data, mosquitto=f"mqtts://{HOST}:{port}", mosquitto_cafile=data / "ca.pem", mosquitto_admin=admin
    ) as registry_server:
        broker_plant = Plant(folder, registry_server.url, data, port)
        broker_plant.start()
        watcher = None
        try:
            registry_server.app.broker.kick()
            broker_plant.wait_for_agreement()
            broker_plant.ctrl("createRole", "watching")
            for acl in ("subscribePattern", "publishClientSend"):
                broker_plant.ctrl("addRoleACL", "watching", acl, "plant/#", "allow")
            broker_plant.ctrl("createClient", "watcher", "-p", "watcher-password")
            broker_plant.ctrl("addClientRole", "watcher", "watching")
            watcher = Watcher(broker_plant.plain)
            yield broker_plant, watcher
        finally:
            if watcher is not None:
                watcher.close()
            broker_plant.stop()


REGISTER = "/api/client-registry/register"


def enrol(plant: Plant, device: Device, request: dict[str, Any], grant: dict[str, Any] | None = None) -> None:
    """Register ``device`` asking for ``request``'s rights; the administrator approves, granting ``grant``."""
    device.folder.mkdir()
    body = {"username": device.name} | request
    if device.password is not None:
        body["password"] = device.password
    else:
        key = make_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (device.folder / "device.key").write_bytes(pem)
        (device.folder / "device.key").chmod(0o600)
        body["csr"] = make_csr(device.name, key)
    (device.folder / "request.json").write_text(json.dumps(body))
    assert call(plant.base, "POST", "/api/client-registry/unlock", token=ADMIN_TOKEN)[0] == 200
    assert call(plant.base, "POST", REGISTER, body)[0] == 202
    status, answer = call(
        plant.base, "POST", f"/api/client-registry/requests/{device.name}/approve", grant, token=ADMIN_TOKEN
    )
    assert status == 200, answer


def collect(plant: Plant, device: Device) -> tuple[int, Any]:
    """The device polls with its request once more: its 201, or the refusal."""
    status, answer = call(plant.base, "POST", REGISTER, json.loads((device.folder / "request.json").read_text()))
    if status == 201 and "certificate" in answer:
        (device.folder / "device.pem").write_text(answer["certificate"])
    return status, answer


def refused(published: subprocess.CompletedProcess[str]) -> bool:
    """mosquitto_pub sent the message and the broker refused it in its PUBACK (MQTT v5: Not authorized)."""
    return published.returncode == 0 and "Not authorized" in published.stderr


@real_broker
def test_a_certificate_client_publishes_where_it_was_granted_and_nowhere_else(
    plant: tuple[Plant, Watcher], tmp_path: Path
) -> None:
    """Proves BROKER-11.1-MAPPING and BROKER-11.3-RECONCILE against mosquitto: a narrowed grant is what holds."""
    broker_plant, watcher = plant
    device = Device("sensor-0001", tmp_path / "sensor-0001")
    enrol(broker_plant, device, {"permissions": [permission("plant/#", "write")]},
          {"permissions": [permission("plant/a/#", "write")]})  # fmt: skip
    assert collect(broker_plant, device)[0] == 201
    broker_plant.wait_for_agreement()

    allowed = broker_plant.publish(device, "plant/a/x")
    assert allowed.returncode == 0 and "Not authorized" not in allowed.stderr, allowed
    assert watcher.next_topic() == "plant/a/x"
    assert refused(broker_plant.publish(device, "plant/b/x"))
    watcher.publish("plant/sentinel", "after the refused one")
    assert watcher.next_topic() == "plant/sentinel"  # plant/b/x was never delivered


@real_broker
def test_a_password_client_narrowed_to_read_subscribes_and_cannot_publish(
    plant: tuple[Plant, Watcher], tmp_path: Path
) -> None:
    """Proves BROKER-11.1-MAPPING and BROKER-11.2-PASSWORD-201: asking for more than was granted gets the grant."""
    broker_plant, watcher = plant
    device = Device("meter-0001", tmp_path / "meter-0001", "meter-password")
    asked = [permission("plant/a/#", "readWrite"), permission("plant/b/#", "write")]
    enrol(broker_plant, device, {"permissions": asked}, {"permissions": [permission("plant/a/#", "read")]})
    status, answer = collect(broker_plant, device)
    assert status == 201 and answer["permissions"] == [permission("plant/a/#", "read")], answer

    watcher.publish("plant/a/news", "retained", retain=True)
    assert watcher.next_topic() == "plant/a/news"
    received = broker_plant.subscribe_once(device, "plant/a/#")
    assert received.returncode == 0 and received.stdout.strip() == "plant/a/news retained", received
    for topic in ("plant/a/x", "plant/b/x"):
        assert refused(broker_plant.publish(device, topic))
    watcher.publish("plant/sentinel", "after the refused ones")
    assert watcher.next_topic() == "plant/sentinel"
    denied = broker_plant.subscribe_once(device, "plant/b/#")
    assert "denied" in denied.stdout + denied.stderr, denied


@real_broker
def test_deleting_a_connected_user_disconnects_it_and_it_cannot_come_back(
    plant: tuple[Plant, Watcher], tmp_path: Path
) -> None:
    """Proves BROKER-11.3-RECONCILE: a removal deletes the client, which the broker disconnects at once."""
    broker_plant, watcher = plant
    device = Device("meter-0002", tmp_path / "meter-0002", "meter-password")
    enrol(broker_plant, device, {"permissions": [permission("plant/a/#", "read")]})
    assert collect(broker_plant, device)[0] == 201
    watcher.publish("plant/a/news", "retained", retain=True)
    subscriber = broker_plant.subscriber(device, "plant/a/#")
    try:
        assert subscriber.stdout.readline().strip() == "plant/a/news retained"  # connected and subscribed
        assert subscriber.poll() is None
        assert call(broker_plant.base, "DELETE", f"/api/users/{device.name}", token=ADMIN_TOKEN)[0] == 200
        subscriber.wait(SUBPROCESS_SECONDS)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait(SUBPROCESS_SECONDS)
        subscriber.stdout.close()
        subscriber.stderr.close()
    again = broker_plant.subscribe_once(device, "plant/a/#")
    assert again.returncode != 0 and "Not authorized" in again.stderr, again


@real_broker
def test_a_broker_stopped_during_an_approval_agrees_when_it_returns(
    plant: tuple[Plant, Watcher], tmp_path: Path
) -> None:
    """Proves BROKER-11.2-PASSWORD-201, BROKER-11.3-RECONCILE and BROKER-11.4-STATUS: 503 while down, then 201."""
    broker_plant, watcher = plant
    watcher.close()
    broker_plant.stop()
    device = Device("meter-0003", tmp_path / "meter-0003", "meter-password")
    enrol(broker_plant, device, {"permissions": [permission("plant/a/#", "read")]})
    status, answer = collect(broker_plant, device)
    assert status == 503 and answer["error"] == "broker_unavailable", answer
    assert broker_plant.status()["reachable"] is False

    broker_plant.start()
    state = broker_plant.wait_for_agreement()  # the reconciler finds it again, with no help
    assert state["awaitingPassword"] == 1  # the client exists, without a password until it is collected
    assert collect(broker_plant, device)[0] == 201
    assert broker_plant.wait_for_agreement()["awaitingPassword"] == 0
    watcher = Watcher(broker_plant.plain)
    try:
        watcher.publish("plant/a/news", "retained", retain=True)
        received = broker_plant.subscribe_once(device, "plant/a/#")
    finally:
        watcher.close()
    assert received.returncode == 0 and received.stdout.strip() == "plant/a/news retained", received


@real_broker
def test_a_client_made_by_hand_is_left_alone(plant: tuple[Plant, Watcher], tmp_path: Path) -> None:
    """Proves BROKER-11.3-RECONCILE: users come and go, and the operator's own client stays as it was made."""
    broker_plant, watcher = plant
    admin = broker.MqttDynamicSecurity(
        broker.BrokerAddress(HOST, broker_plant.plain, False), ("admin", "admin-password")
    )
    try:
        before = admin.exchange([{"command": "getClient", "username": "watcher"}])[0]["data"]
        device = Device("sensor-0002", tmp_path / "sensor-0002")
        enrol(broker_plant, device, {"permissions": [permission("plant/#", "write")]})
        assert collect(broker_plant, device)[0] == 201
        assert call(broker_plant.base, "DELETE", f"/api/users/{device.name}", token=ADMIN_TOKEN)[0] == 200
        broker_plant.wait_for_agreement()
        after = admin.exchange([{"command": "getClient", "username": "watcher"}])[0]["data"]
    finally:
        admin.close()
    assert after == before == {"client": {"username": "watcher", "roles": [{"rolename": "watching"}], "groups": []}}
    watcher.publish("plant/still-here", "yes")
    assert watcher.next_topic() == "plant/still-here"


def test_paho_is_imported_only_when_mosquitto_is_given(tmp_path: Path) -> None:
    """Proves BROKER-11.1-MAPPING's settings: the server without --mosquitto needs no MQTT library."""
    script = (
        "import sys, server\n"
        f"built = server.build(server.Config(data_dir=server.Path({str(tmp_path / 'data')!r}), port=0, http=True))\n"
        "built.server_close()\n"
        "assert not [name for name in sys.modules if name.startswith('paho')], 'paho was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

"""The database's schema is numbered, and every older version is upgraded in order (issue 23 item 6).

STORE-6.11-SCHEMA: ``PRAGMA user_version`` says the version; a database of
the first schema (times as REAL seconds, a user's certificate kept beside
it) is upgraded step by step, and one that no step can read is refused.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import registry
import server
from conftest import FAST, START, FakeClock, issue, make_csr, make_key

# The schema of the first version (commit 287478c), as it was written.
FIRST_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE requests (
    username TEXT PRIMARY KEY, state TEXT NOT NULL, method TEXT NOT NULL, password_hash TEXT, csr TEXT,
    key_sha256 TEXT, pairing_id TEXT NOT NULL, requested TEXT NOT NULL, context TEXT, client_address TEXT,
    created_at REAL NOT NULL, last_poll_at REAL NOT NULL, poll_count INTEGER NOT NULL DEFAULT 0,
    decided_at REAL, reason TEXT
);
CREATE INDEX requests_by_age ON requests (state, created_at);
CREATE TABLE users (
    username TEXT PRIMARY KEY REFERENCES requests (username), method TEXT NOT NULL, password_hash TEXT,
    granted TEXT NOT NULL, certificate TEXT, certificate_sha256 TEXT UNIQUE, serial TEXT, not_after REAL,
    created_at REAL NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, address TEXT,
    action TEXT NOT NULL, username TEXT, details TEXT
);
"""
PASSWORD = "s3cret-pass"


def seconds(moment: timedelta) -> float:
    """A time as the first schema kept it: REAL seconds since the epoch."""
    return (START + moment).timestamp()


def first_version_database(path: Path, authority: object) -> bytes:
    """A database as the first version left it: unlocked, one pending request, one user with a certificate."""
    key = make_key("ec")
    csr = make_csr("agent-0001", key)
    certificate = issue(authority, csr, "agent-0001", START - timedelta(days=1))
    spki = authority.inspect_csr(csr)
    rights = registry.Rights().dumps()
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(FIRST_SCHEMA)
        old.execute("INSERT INTO meta VALUES ('unlocked_until', ?)", (str(seconds(timedelta(minutes=10))),))
        old.execute(
            "INSERT INTO requests (username, state, method, password_hash, pairing_id, requested, created_at,"
            " last_poll_at, poll_count) VALUES ('sensor-0001', 'pending', 'password', ?, 'a1b2c3', ?, ?, ?, 2)",
            (
                registry.hash_password(PASSWORD, 16),
                rights,
                seconds(-timedelta(hours=1)),
                seconds(-timedelta(minutes=1)),
            ),
        )
        old.execute(
            "INSERT INTO requests (username, state, method, csr, key_sha256, pairing_id, requested, created_at,"
            " last_poll_at, decided_at) VALUES ('agent-0001', 'approved', 'csr', ?, ?, 'd4e5f6', ?, ?, ?, ?)",
            (csr, spki.public_key_sha256, rights, *[seconds(-timedelta(days=1))] * 3),
        )
        old.execute(
            "INSERT INTO users VALUES ('agent-0001', 'csr', NULL, ?, ?, ?, ?, ?, ?)",
            (
                rights,
                certificate.pem,
                certificate.sha256,
                format(certificate.serial, "x"),
                certificate.not_after.timestamp(),
                seconds(-timedelta(days=1)),
            ),
        )
        old.execute(
            "INSERT INTO audit (at, actor, action, username) VALUES (?, 'administrator', 'approve', 'agent-0001')",
            (seconds(-timedelta(days=1)),),
        )
        old.commit()
    return x509.load_pem_x509_certificate(certificate.pem.encode()).public_bytes(serialization.Encoding.DER)


def test_a_database_of_the_first_schema_is_upgraded_and_serves_as_it_did(tmp_path: Path, authority: object) -> None:
    """Proves STORE-6.11-SCHEMA: REAL seconds become microseconds, a user's certificate is recorded as issued."""
    database = tmp_path / "registry.db"
    certificate_der = first_version_database(database, authority)

    reg = registry.Registry(str(database), clock=FakeClock(), ca=authority, settings=FAST)

    status = reg.status()
    assert (status["locked"], status["unlockedUntil"], status["pending"]) == (False, "2026-01-01T12:10:00.000+00:00", 1)
    listed = {request["username"]: request for request in reg.requests()}
    assert sorted(listed) == ["agent-0001", "sensor-0001"]  # the purge kept the pending request
    assert (listed["sensor-0001"]["createdAt"], listed["sensor-0001"]["pollCount"]) == (
        "2026-01-01T11:00:00.000+00:00",
        2,
    )
    assert reg.register({"username": "sensor-0001", "password": PASSWORD}).status == 202
    assert reg.authenticate_certificate(certificate_der).username == "agent-0001"
    assert reg.audit()["entries"][0]["at"] == "2025-12-31T12:00:00.000+00:00"
    reg.close()
    with contextlib.closing(sqlite3.connect(database)) as upgraded:
        assert upgraded.execute("PRAGMA user_version").fetchone()[0] == registry.SCHEMA_VERSION
        columns = {row[1] for row in upgraded.execute("PRAGMA table_info(users)")}
        assert "certificate" not in columns and "certificate_sha256" not in columns
        assert upgraded.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_new_database_is_made_at_the_current_version(tmp_path: Path) -> None:
    """Proves STORE-6.11-SCHEMA."""
    registry.Registry(str(tmp_path / "new.db"), clock=FakeClock(), settings=FAST).close()

    with contextlib.closing(sqlite3.connect(tmp_path / "new.db")) as made:
        assert made.execute("PRAGMA user_version").fetchone()[0] == registry.SCHEMA_VERSION == len(registry.UPGRADES)


def test_a_database_of_a_newer_registry_stops_the_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Proves STORE-6.11-SCHEMA: a version this registry does not know is refused, with a message, and kept."""
    registry.Registry(str(tmp_path / "registry.db"), clock=FakeClock(), settings=FAST).close()
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as newer:
        newer.execute(f"PRAGMA user_version = {registry.SCHEMA_VERSION + 1}")
    kept = (tmp_path / "registry.db").read_bytes()

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(server.RegistryServer, "serve_forever", lambda *args: pytest.fail("the server started"))
        server.main(["--data-dir", str(tmp_path), "--port", "0", "--http", "--log-level", "WARNING"])

    assert stopped.value.code == (
        f"server.py: cannot start: the database is of schema version {registry.SCHEMA_VERSION + 1}, made by a"
        f" newer registry; this one knows {registry.SCHEMA_VERSION} at most: run the newer registry, or restore a"
        " backup of this version"
    )
    assert (tmp_path / "registry.db").read_bytes() == kept

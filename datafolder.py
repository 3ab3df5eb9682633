"""The server's data folder: one server at a time, a CA never replaced in silence, a backup made whole or not at all.

The folder holds the registry's database (``registry.db``), its CA
(``ca.pem``, ``ca.key``), the server's certificate, the administrators'
tokens and ``server.lock``. These are the operator's safeguards around it
(SPEC section 6); docs/operations.md says how to use them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import files

LOCK = "server.lock"
# What a backup copies beside the database: the secrets and the CA's certificate.
KEPT_FILES = ("ca.pem", "ca.key", "admin-token", "admins.json", "server.pem", "server.key")


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/server.lock`` for a server's whole life (STORE-6.7-ONE-SERVER).

    Two servers on one folder would each keep their own fast-path memory
    and answer from it; the second start stops instead, naming the holder.
    The kernel drops the lock when its holder exits, however it exits.
    """

    def __init__(self, folder: Path) -> None:
        path = folder / LOCK
        self._descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._descriptor)
            raise OSError(
                f"{folder} is served by another server (PID {holder}): stop it, or choose another --data-dir"
            ) from None
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let another server have the folder."""
        with contextlib.suppress(OSError):  # released already
            os.close(self._descriptor)


def check_ca_kept(folder: Path) -> None:
    """Refuse a folder that had a CA and lost its key (STORE-6.8-CA-KEPT): a new CA would disown every certificate.

    A new CA is made only in a folder that never issued a certificate: no
    ``ca.pem``, and no issued certificate in the database. A key that is
    there is checked against ``ca.pem`` when the CA is loaded.
    """
    key, certificate = folder / "ca.key", folder / "ca.pem"
    if key.exists():
        return
    issued = _issued_certificates(folder / "registry.db")
    if certificate.exists():
        why = f"{certificate} is there"
    elif issued:
        why = f"the database records {issued} issued certificate{'s' if issued > 1 else ''}"
    else:
        return
    raise FileNotFoundError(
        f"{key} is missing, but {why}: a new CA would disown what the old one signed;"
        f" restore ca.key and ca.pem from the backup this folder came from (docs/operations.md)"
    )


def _issued_certificates(database: Path) -> int:
    """How many certificates the database at ``database`` records as issued (0 without one)."""
    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        for query in ("SELECT count(*) FROM certificates", "SELECT count(*) FROM users WHERE serial IS NOT NULL"):
            with contextlib.suppress(sqlite3.OperationalError):  # a table an older schema lacks
                found = connection.execute(query).fetchone()[0]
                if found:
                    return found
    return 0


def backup(data: Path, destination: Path) -> None:
    """Copy a registry's data folder to the new folder ``destination``, whole and checked, while its server runs.

    STORE-6.9-BACKUP: the copy is made in a temporary folder beside
    ``destination`` and renamed to it only once complete and checked (the
    database passes ``PRAGMA quick_check``, the CA's key is its
    certificate's), so that ``destination`` never exists half-made: a
    backup cut short leaves at most a ``.partial`` folder, which no server
    takes for a data folder. The database is copied through SQLite's
    online backup API (https://www.sqlite.org/backup.html); the secrets
    beside it are each readable by the owner alone, as in the original.
    """
    database = data / "registry.db"
    if not database.exists():
        raise FileNotFoundError(f"{data} holds no registry: there is no {database}")
    if destination.exists():
        raise FileExistsError(f"{destination} exists: name a folder that does not, and it is made")
    check_ca_kept(data)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        _copy(data, partial)
        _check_copy(partial)
        _sync(partial)
        partial.rename(destination)
        _sync(destination.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _copy(data: Path, partial: Path) -> None:
    partial.chmod(0o700)
    copy_path = partial / "registry.db"
    copy_path.touch(mode=0o600)
    with (
        contextlib.closing(sqlite3.connect(data / "registry.db")) as source,
        contextlib.closing(sqlite3.connect(copy_path)) as copy,
    ):
        source.backup(copy)
    _sync(copy_path)
    for name in KEPT_FILES:
        if (data / name).exists():
            files.write_private(partial / name, (data / name).read_text())


def _check_copy(partial: Path) -> None:
    """Refuse a copy that is not a data folder a server would serve as the original."""
    with contextlib.closing(sqlite3.connect(partial / "registry.db")) as copy:
        verdict = copy.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise OSError(f"the copy of the database is damaged ({verdict}): nothing was kept; try again")
    key, certificate = partial / "ca.key", partial / "ca.pem"
    if key.exists() or certificate.exists():
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if x509.load_pem_x509_certificate(certificate.read_bytes()).public_key() != private.public_key():
            raise OSError("the copy of ca.key is not the key of the copy of ca.pem: nothing was kept; try again")


def _sync(path: Path) -> None:
    """fsync(2) a file or a folder, so that a rename after it publishes what is on the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""The administrators: who may call the administrator's routes, by name (SPEC section 4).

The quick start's token (``--admin-token``, ``$REGISTRY_ADMIN_TOKEN``, or
the one made once and kept in ``<data-dir>/admin-token``) is the
administrator ``admin``. More are added by name (``server.py --add-admin
NAME``): each gets a random token, printed once, of which the data folder
keeps only the SHA-256 (``admins.json``, 0600). A token is random and 32
characters or more, so its hash cannot be inverted by guessing: a slow hash
(scrypt) would add nothing but time to every administrator call.

Every token is compared in constant time with every administrator's, so
that neither a token nor a name can be guessed byte by byte or told apart
by timing, and an empty token never matches (ADMIN-4.1-TOKEN).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from pathlib import Path

from files import check_private, write_private

log = logging.getLogger("registry.admins")

FILE = "admins.json"
QUICK_START = "admin"  # the administrator of the token given or kept in admin-token
MIN_TOKEN_LENGTH = 32  # ADMIN-4.1-TOKEN: what secrets.token_urlsafe(24) makes, 192 random bits
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_problem(token: str, where: str) -> str | None:
    """Why the token given in ``where`` cannot be an administrator's (ADMIN-4.1-TOKEN), or None."""
    if len(token) >= MIN_TOKEN_LENGTH:
        return None
    return (
        f"the administrator token in {where} has {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}:"
        f" make one with {MAKE_ONE}"
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(folder: Path) -> dict[str, str]:
    """The named administrators kept in ``folder``: name to the SHA-256 of the token."""
    path = folder / FILE
    if not path.exists():
        return {}
    check_private(path)
    try:
        kept = json.loads(path.read_text())
    except ValueError:
        kept = None
    if not isinstance(kept, dict) or not all(isinstance(value, str) for value in kept.values()):
        raise ValueError(f"{path} is not an object of names to token hashes: restore it from a backup")
    return kept


def names(folder: Path) -> list[str]:
    """The named administrators kept in ``folder``, by name (``admin`` is not among them)."""
    return sorted(_read(folder))


def add(folder: Path, name: str) -> str:
    """Add the administrator ``name`` to ``folder`` and return its new token (the folder keeps only its hash)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a name: letters, digits and . _ @ - (64 at most), a letter or digit first")
    if name == QUICK_START:
        raise ValueError(f"{QUICK_START!r} is the quick start's token (admin-token): choose another name")
    kept = _read(folder)
    if name in kept:
        raise ValueError(f"{name!r} is an administrator already: --remove-admin {name} first to give a new token")
    token = secrets.token_urlsafe(32)
    write_private(folder / FILE, json.dumps(kept | {name: _digest(token)}, indent=1, sort_keys=True) + "\n")
    return token


def remove(folder: Path, name: str) -> None:
    """Withdraw the token of the administrator ``name``."""
    kept = _read(folder)
    if name not in kept:
        raise ValueError(f"{name!r} is not a named administrator of {folder} (--list-admins lists them)")
    del kept[name]
    write_private(folder / FILE, json.dumps(kept, indent=1, sort_keys=True) + "\n")


class Administrators:
    """Who a presented token belongs to: ``admin`` (the quick start's token) or a named administrator.

    The named ones are read again when ``admins.json`` changes, so that
    ``--add-admin`` and ``--remove-admin`` take effect on a running server.
    """

    def __init__(self, folder: Path | None, quick_start_token: str | None) -> None:
        self._folder = folder
        self._quick_start = None if quick_start_token is None else _digest(quick_start_token)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._named: dict[str, str] = {}

    def who(self, token: str) -> str | None:
        """The administrator whose token ``token`` is, or None; every administrator's is compared."""
        if not token:  # ADMIN-4.1-TOKEN: an empty token never matches
            return None
        digest, found = _digest(token).encode(), None
        everyone = ([(QUICK_START, self._quick_start)] if self._quick_start else []) + list(self._current().items())
        for name, stored in everyone:
            if hmac.compare_digest(digest, stored.encode()):  # no early exit: the time does not tell who
                found = name
        return found

    def _current(self) -> dict[str, str]:
        if self._folder is None:
            return {}
        try:
            status = os.stat(self._folder / FILE)
            seen = (status.st_mtime_ns, status.st_ino)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                try:
                    self._named = _read(self._folder) if seen else {}
                except (OSError, ValueError) as error:  # a damaged file: those read before stay
                    log.error("the named administrators were not read again: %s", error)
                self._seen = seen
            return self._named

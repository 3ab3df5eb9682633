"""The data folder's secret files: written whole with mode 0600, refused when others may read them.

The CA's key, the server's TLS key and the administrator token are such
files; ``ca.py`` and ``server.py`` both keep theirs through these two helpers.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write a secret file that only its owner may read (mode 0600), whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    # The rename is durable once the folder is (rename(2) and fsync(2)).
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_private(path: Path) -> None:
    """Refuse a secret file that others than its owner may read or write."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}: others may read it; run chmod 600 {path}")

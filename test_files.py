"""The secret files of ``files.py``: mode 0600 whatever was there, written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import files


def test_write_private_writes_mode_0600_whatever_was_there(tmp_path: Path) -> None:
    """Proves SAFE-6.4-FILES."""
    path = tmp_path / "secret.key"
    path.write_text("old")
    path.chmod(0o644)
    stale = tmp_path / "secret.key.partial"
    stale.write_text("left by a killed run")
    stale.chmod(0o666)
    umask = os.umask(0)
    try:
        files.write_private(path, "new secret")
    finally:
        os.umask(umask)

    assert path.read_text() == "new secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["secret.key"]


def test_write_private_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    files.write_private(path, "first secret")
    before = path.stat().st_ino

    with path.open() as reader:
        files.write_private(path, "second secret")
        # A reader of the old file sees it whole: the new one is a new file renamed over it.
        assert reader.read() == "first secret"

    assert path.read_text() == "second secret"
    assert path.stat().st_ino != before


def test_write_private_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.key"
    files.write_private(path, "first secret")

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.write_private(path, "second secret")

    assert path.read_text() == "first secret"
    assert path.stat().st_mode & 0o777 == 0o600


def test_check_private_refuses_a_file_others_may_read(tmp_path: Path) -> None:
    """Proves SAFE-6.4-FILES."""
    path = tmp_path / "secret.key"
    files.write_private(path, "secret")
    files.check_private(path)

    path.chmod(0o640)

    with pytest.raises(PermissionError, match="chmod 600"):
        files.check_private(path)

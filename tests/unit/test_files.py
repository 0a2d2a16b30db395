"""Safe local files (device/files.py), the one place the device and the sandbox write files
atomically: exact modes whatever the umask, no temporary file left behind, the old file
kept when a write fails, private folders, the advisory lock."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotref.device.files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    LockBusy,
    ensure_private_dir,
    file_lock,
    is_private,
    remove_durably,
    write_atomic,
    write_file_synced,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave new files readable and writable by everyone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [PRIVATE_FILE_MODE, PUBLIC_FILE_MODE])
def test_write_atomic_replaces_the_file_with_exactly_the_mode_asked(
    tmp_path: Path, loose_umask: None, mode: int
) -> None:
    target = tmp_path / "file.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o666)

    write_atomic(target, b'{"new": 1}\n', mode)

    assert target.read_bytes() == b'{"new": 1}\n'
    assert mode_of(target) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_write_atomic_defaults_to_private(tmp_path: Path, loose_umask: None) -> None:
    target = tmp_path / "secret.pem"
    write_atomic(target, b"key")
    assert mode_of(target) == PRIVATE_FILE_MODE
    assert is_private(target)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "tokens.json"
    target.write_bytes(b"old tokens")

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new tokens")

    assert target.read_bytes() == b"old tokens"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.json"]


def test_the_temporary_file_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    """The temporary file is created exclusively: a symlink (or any file) already at its
    name is refused, and what it points to is left alone."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    planted = tmp_path / ".key.pem.tmp"
    planted.symlink_to(victim)

    with pytest.raises(FileExistsError):
        write_file_synced(planted, b"secret", PRIVATE_FILE_MODE)

    assert victim.read_bytes() == b"untouched"


def test_ensure_private_dir_creates_and_tightens(tmp_path: Path, loose_umask: None) -> None:
    nested = tmp_path / "a" / "b"
    ensure_private_dir(nested)
    assert mode_of(nested) == PRIVATE_DIR_MODE
    assert mode_of(nested.parent) == PRIVATE_DIR_MODE

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert mode_of(loose) == PRIVATE_DIR_MODE


def test_ensure_private_dir_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        ensure_private_dir(path)


def test_remove_durably(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    path.write_bytes(b"x")
    assert remove_durably(path) is True
    assert not path.exists()
    assert remove_durably(path) is False


def test_file_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with file_lock(lock):
        assert mode_of(lock) == PRIVATE_FILE_MODE
        with pytest.raises(LockBusy), file_lock(lock, blocking=False):
            pass
    with file_lock(lock, blocking=False):
        pass

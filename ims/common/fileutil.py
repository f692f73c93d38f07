"""Idempotent, crash-safe file changes shared by the boot files and the tgt conf files."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, text: str, mode: int = 0o644, durable_rename: bool = False) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename.

    A reader sees the old or the new content, never a partial file; a crash leaves at
    most a hidden ``.<name>.*.tmp`` file behind.  The data is on disk before the rename, so
    after a power loss the file is the old or the new one, never empty or torn.

    Durability is the database's (SQLite WAL with ``synchronous = NORMAL``): a process that dies
    loses nothing, and a power loss may undo the last changes but never corrupts.  So the rename
    itself is not forced to disk (a directory fsync: it made every boot file and tgt conf file
    cost a second journal commit, shared with whatever else writes to that filesystem, e.g. a
    Ceph OSD) unless ``durable_rename``.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)  # mkstemp creates 0600
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable_rename:
        return
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def unlink_quietly(path: str) -> bool:
    """Remove ``path``; True if it existed.  Missing files are fine (retries are safe)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def remove_temp_leftovers(path: str) -> list[str]:
    """Remove the hidden temp files an :func:`atomic_write` of ``path`` killed mid-way left behind
    (``.<name>.*.tmp`` beside it); returns them.  Call it only where no other writer of ``path``
    can be running (under the lock that guards ``path``)."""
    directory, name = os.path.split(path)
    prefix = f".{name}."
    removed = []
    try:
        with os.scandir(directory or ".") as entries:
            leftovers = [e.path for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []
    for leftover in leftovers:
        if unlink_quietly(leftover):
            removed.append(leftover)
    return removed

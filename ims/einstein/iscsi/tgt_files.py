"""The conf dir of the tgt driver (mixed into :class:`ims.einstein.iscsi.tgt.TgtTarget`).

One tgt-admin style conf file per target, ``<conf_dir>/<name>.conf`` (what Debian's tgt.service
loads and :meth:`TgtTarget.restore` re-creates from), and the tid counter ``<conf_dir>/.tid``.
Rewrites and unlinks of a conf file take an flock on it, so a concurrent remove is never undone.
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ims.common.errors import InvalidInput
from ims.common.fileutil import atomic_write, remove_temp_leftovers, unlink_quietly
from ims.common.names import validate_name
from ims.einstein.iscsi.tgt_conf import TargetSpec, parse_conf, render_conf

LOG = logging.getLogger(__name__)

MAX_TID = 2**31 - 1


class TgtFiles:
    """Needs the driver's ``conf_dir`` and ``_template``."""

    conf_dir: str
    _template: str

    def conf_path(self, target: str) -> str:
        return os.path.join(self.conf_dir, validate_name(target, "target") + ".conf")

    def list_targets(self) -> list[str]:
        try:
            entries = os.listdir(self.conf_dir)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.endswith(".conf") and not entry.startswith("."):
                names.append(entry[:-len(".conf")])
        return sorted(names)

    def _read_spec(self, target: str) -> TargetSpec | None:
        try:
            text = Path(self.conf_path(target)).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return parse_conf(text, target)

    def _read_spec_quietly(self, name: str) -> TargetSpec | None:
        """For whole-dir passes: a malformed or foreign conf file is logged and skipped."""
        try:
            return self._read_spec(name)
        except (InvalidInput, OSError) as exc:
            LOG.warning("skipping tgt conf file for %s: %s", name, exc)
            return None

    def _rewrite_tid(self, target: str, tid: int | None, chap: tuple[str, str] | None = None) -> bool:
        """Record ``tid`` (and ``chap`` when given) in the target's conf file; False if the file is gone.

        Under an flock on the file, and only if the path still names the locked file, so
        a concurrent :meth:`remove_target` (which unlinks under the same lock) is never
        undone by a rewrite.
        """
        path = self.conf_path(target)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return False
            except FileNotFoundError:
                return False
            with os.fdopen(os.dup(fd), encoding="utf-8") as handle:
                spec = parse_conf(handle.read(), target)
            if spec.tid != tid or (chap is not None and spec.chap != chap):
                spec.tid = tid
                if chap is not None:
                    spec.chap = chap
                    LOG.info("iSCSI target %s: incominguser rewritten (CHAP user %s)", spec.iqn, chap[0])
                atomic_write(path, render_conf(spec, self._template), 0o600)
                LOG.info("iSCSI target %s: tid line rewritten to %s", spec.iqn, tid)
            return True
        finally:
            os.close(fd)

    def _unlink_conf(self, path: str) -> None:
        """Unlink under the same flock as :meth:`_rewrite_tid`."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            unlink_quietly(path)
            remove_temp_leftovers(path)  # of a write killed mid-way (rewrites hold this flock; adds the lock)
        finally:
            os.close(fd)

    def _next_tid(self, floor: int = 0) -> int:
        """Bump the counter in ``<conf_dir>/.tid`` (to more than ``floor``) under an fcntl lock
        shared by all workers."""
        fd = os.open(os.path.join(self.conf_dir, ".tid"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 32).strip()
            last = max(int(raw) if raw.isdigit() else 0, floor)
            tid = last + 1 if last < MAX_TID else 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(tid).encode())
            return tid
        finally:
            os.close(fd)  # closing drops the lock

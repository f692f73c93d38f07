"""Talking to tgtd (mixed into :class:`ims.einstein.iscsi.tgt.TgtTarget`): one request (``_run``: over
tgtd's control socket, :mod:`ims.einstein.iscsi.tgt_ipc`, or the tgtadm binary), the "ready" wait, the
full show, and which tgtd answers (``_daemon``) so that a request by tid only goes to the tgtd whose
show gave that tid (``_on_tid``): a restarted tgtd numbers its targets afresh.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from ims.common.errors import CommandFailed, IscsiError, TgtdRestarted
from ims.common.process import execute
from ims.einstein.iscsi.tgt_conf import LiveTarget, parse_show
from ims.einstein.iscsi.tgt_ipc import Unsupported, socket_path

if TYPE_CHECKING:
    from ims.einstein.iscsi.tgt_ipc import TgtIpc

LOG = logging.getLogger(__name__)

# How long a mutation waits for tgtd's system state to be "ready" again.  Debian's tgt.service keeps
# it "offline" while `tgt-admin -e` loads the conf files, and that run DELETES every live target
# missing from the configuration it parsed at its start: a target added meanwhile would vanish
# after BMI confirmed it.  So targets are only added/removed while ready, and checked again after.
SETTLE_SECONDS = 30.0

_EXISTS = "already exists"
_NO_TARGET = "can't find the target"
_NO_ACCOUNT = "can't find the account"

Daemon = tuple[int, int] | None


class TgtControl:
    """Needs ``tgtadm``, ``control_port``, ``timeout``, ``_ipc`` and ``_ipc_checked`` (set by the driver)."""

    if TYPE_CHECKING:
        tgtadm: str
        control_port: int
        timeout: float
        _ipc: TgtIpc | None
        _ipc_checked: bool

    def _run(self, *args: str, ok_missing: bool = False, ok_exists: bool = False) -> str | None:
        """Run tgtadm; returns stdout, or None when an allowed "missing"/"exists" error happened.

        With ``direct`` (the default) the request goes straight to tgtd's control socket
        (:mod:`ims.einstein.iscsi.tgt_ipc`: tgtadm's own protocol, no fork+exec); the results and
        errors are the CLI's."""
        argv = [self.tgtadm]
        if self.control_port:
            argv += ["-C", str(self.control_port)]
        argv += ["--lld", "iscsi", *args]
        try:
            if self._ipc is not None and self._ipc_usable():
                try:
                    return self._ipc.run("--lld", "iscsi", *args)
                except Unsupported:
                    pass
            out, _ = execute(*argv, timeout=self.timeout)
            return out
        except CommandFailed as exc:
            err = (exc.stderr or exc.stdout or str(exc)).strip()
            if exc.exit_code is None:
                raise IscsiError(f"cannot run tgtadm: {exc}") from exc
            if exc.exit_code == 107 or "tgt daemon" in err:
                raise IscsiError(
                    f"tgtd is not running or not reachable (control port {self.control_port}): start tgtd "
                    f"(e.g. 'systemctl start tgt' or scripts/tgtd-dev) and retry") from exc
            if ok_missing and (_NO_TARGET in err or _NO_ACCOUNT in err):
                return None
            if ok_exists and _EXISTS in err:
                return None
            raise IscsiError(f"tgtadm {' '.join(args[:4])} failed: {err}") from exc

    def _ipc_usable(self) -> bool:
        """Once per driver: does tgtd answer our socket requests as a tgtd we know does?  A ``show sys``
        must come back as tgtd's system status; anything else (a tgt whose protocol differs from the
        1.0.x one tgt_ipc speaks) turns the socket off for good and tgtadm runs instead."""
        if self._ipc_checked:
            return self._ipc is not None
        try:
            out = self._ipc.run("--lld", "iscsi", "--op", "show", "--mode", "sys") if self._ipc else ""
        except CommandFailed as exc:
            if exc.exit_code == 107:
                return True  # tgtd is not there now: the call reports that; check again next time
            out = f"error: {exc.stderr.strip()}"
        self._ipc_checked = True
        if self._ipc is not None and not (out.startswith("System:") and "State:" in out):
            LOG.warning("tgtd did not answer a request on its control socket as expected (%r): using the tgtadm "
                        "binary instead ([iscsi] control = tgtadm)", out[:200])
            self._ipc = None
        return self._ipc is not None

    def _wait_ready(self) -> None:
        """Wait (up to SETTLE_SECONDS) for tgtd's system state to be "ready"."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            out = self._run("--op", "show", "--mode", "sys") or ""
            state = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                          if line.strip().startswith("State:")), "ready")
            if state == "ready":
                return
            if time.monotonic() >= deadline:
                raise IscsiError(f"tgtd's state is {state!r} for more than {SETTLE_SECONDS:.0f} s (a tgt restart "
                                 "loading its targets, or set by an operator); retry when it is ready")
            time.sleep(0.1)

    def _show_all(self) -> dict[str, LiveTarget]:
        return parse_show(self._run("--op", "show", "--mode", "target") or "")

    def _daemon(self) -> Daemon:
        """Which tgtd answers on our control port: its socket's (inode, change time), None if absent.
        One stat, no request: a (re)started tgtd makes its socket anew."""
        try:
            st = os.stat(socket_path(self.control_port))
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _on_tid(self, daemon: Daemon, what: str, *args: str, ok_missing: bool = False) -> str | None:
        """:meth:`_run` a request by tid, only if tgtd is still ``daemon`` (taken before the show or the
        ``new`` that gave the tid).  :raises TgtdRestarted: it is not (nothing was sent)."""
        if self._daemon() != daemon:
            raise TgtdRestarted(f"tgtd restarted while {what}")
        return self._run(*args, ok_missing=ok_missing)

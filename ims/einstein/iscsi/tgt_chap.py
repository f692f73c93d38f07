"""CHAP accounts of tgt targets (mixed into :class:`ims.einstein.iscsi.tgt.TgtTarget`).

One incoming account per target, named after the target: created and bound when the target is
made (``_configure``), deleted when it is removed (tgt keeps accounts otherwise), compared and
re-bound by reconcile.  tgt never shows a secret: only account names are compared live; the
secret is compared through the conf file, which is what a restart loads.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ims.common.errors import InvalidInput, IscsiError, TargetNotFound
from ims.common.names import validate_name
from ims.einstein.iscsi.chap import check_chap
from ims.einstein.iscsi.tgt_conf import LiveTarget, TargetSpec

if TYPE_CHECKING:
    from ims.einstein.iscsi.tgt_control import Daemon

LOG = logging.getLogger(__name__)
_ANY = object()  # _bind_account without a tgtd to compare with (the tid is not from a show)


class TgtChap:
    """Needs the driver's ``_run``, ``_show_all``, ``_read_spec(_quietly)``, ``_rewrite_tid`` and ``iqn``."""

    if TYPE_CHECKING:
        def iqn(self, target: str) -> str: ...
        def conf_path(self, target: str) -> str: ...
        def _run(self, *args: str, ok_missing: bool = False, ok_exists: bool = False) -> str | None: ...
        def _show_all(self) -> dict[str, LiveTarget]: ...
        def _daemon(self) -> Daemon: ...
        def _on_tid(self, daemon: Daemon, what: str, *args: str, ok_missing: bool = False) -> str | None: ...
        def _read_spec(self, target: str) -> TargetSpec | None: ...
        def _read_spec_quietly(self, name: str) -> TargetSpec | None: ...
        def _rewrite_tid(self, target: str, tid: int | None, chap: tuple[str, str] | None = None) -> bool: ...

    def chap_user(self, target: str) -> str | None:
        """The CHAP user the target's conf file records (None: no CHAP); never the secret."""
        spec = self._read_spec_quietly(validate_name(target, "target"))
        return spec.chap[0] if spec is not None and spec.chap is not None else None

    def chap_drift(self, target: str, chap: tuple[str, str] | None) -> str | None:
        """Compare the target's conf file and live account binding with ``chap`` (one show).

        tgt never shows a secret, so a live account with another secret is only seen through
        the conf file (what a restart would load).  Never returns the secret itself.
        """
        spec = self._read_spec_quietly(validate_name(target, "target"))
        live = self._show_all().get(self.iqn(target))
        if spec is None or live is None:
            return None  # a missing target is reported (and re-added) elsewhere
        if chap is None:
            return f"CHAP user(s) {', '.join(live.accounts)} bound, none expected" if live.accounts else None
        if spec.chap is None:
            return "its conf file has no incominguser"
        if spec.chap != chap:
            return "its conf file has another CHAP account or secret"
        if live.accounts != [chap[0]]:
            bound = ", ".join(live.accounts) or "no account"
            return f"tgtd has {bound} bound instead of CHAP user {chap[0]}"
        return None

    def repair_chap(self, target: str, chap: tuple[str, str]) -> None:
        """Record ``chap`` in the conf file and (re-)bind it on the live target, by IQN.

        Sessions already logged in stay: CHAP is checked at login only.
        :raises TargetNotFound: no conf file or no live target.
        """
        account = check_chap(chap)
        assert account is not None
        if account[0] != target:
            raise InvalidInput(f"the CHAP user of target {target} must be named after it")
        spec = self._read_spec(target)
        # tids only change when a tgt restart loads its conf files (tgtd "offline"): acting by tid
        # while "ready", and checking the tid still carries our IQN after, keeps a neighbour's
        # account bound (an unbound target lets anyone log in).
        self._wait_ready()
        daemon = self._daemon()
        live = self._show_all().get(self.iqn(target))
        # under the conf file's flock, like every rewrite (a concurrent remove is never undone)
        if spec is None or live is None or not self._rewrite_tid(target, live.tid, chap=account):
            raise TargetNotFound(f"iSCSI target {target} does not exist")
        for user in live.accounts:  # by tid: only to the tgtd whose show gave it (TgtdRestarted: retry)
            if user != account[0]:
                self._on_tid(daemon, f"repairing the CHAP account of {live.iqn}", "--op", "unbind", "--mode",
                             "account", "--tid", str(live.tid), "--user", user, ok_missing=True)
        self._bind_account(str(live.tid), *account, daemon=daemon)
        after = self._show_all().get(spec.iqn)
        if after is not None and after.tid != live.tid:
            LOG.error("iSCSI target %s moved from tid %s while its CHAP account was repaired (tgtd restarted?): "
                      "reconcile again to check the target now at tid %s", spec.iqn, live.tid, live.tid)
        if after is None or after.tid != live.tid or after.accounts != [account[0]]:
            raise IscsiError(f"iSCSI target {spec.iqn} changed while its CHAP account was repaired; retry")
        LOG.info("iSCSI target %s: CHAP user %s re-bound", spec.iqn, account[0])

    def _bind_account(self, tid: str, user: str, secret: str, daemon: Daemon | object = _ANY) -> None:
        """Create the target's CHAP account and bind it as ``incominguser`` of ``tid``.

        The account is named after this target alone, so one that already exists is ours: a
        leftover of a half-made or restored target, or made by tgt-admin from the conf file.
        Its secret cannot be read back, so it is replaced.  (tgtadm takes the secret on its
        argv only; ims.common.process masks it in logs.)
        """
        if self._run("--op", "new", "--mode", "account", "--user", user, "--password", secret,
                     ok_exists=True) is None:
            self._delete_account(user)
            self._run("--op", "new", "--mode", "account", "--user", user, "--password", secret)
        bind = ("--op", "bind", "--mode", "account", "--tid", tid, "--user", user)
        if daemon is _ANY:
            self._run(*bind)
        else:  # only to the tgtd that gave ``tid``
            self._on_tid(daemon, f"binding CHAP user {user} to tid {tid}", *bind)

    def _delete_account(self, user: str) -> None:
        """Delete a CHAP account (tgtd unbinds it from every target first); absent is fine."""
        self._run("--op", "delete", "--mode", "account", "--user", user, ok_missing=True)

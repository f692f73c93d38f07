"""Keeping tgtd and the conf dir in step across tgt restarts (mixed into
:class:`ims.einstein.iscsi.tgt.TgtTarget`).

Debian's ``tgt.service`` restart numbers the targets again and its ``tgt-admin -e`` (tgtd
"offline" meanwhile) deletes every live target missing from the configuration it parsed at its
start and re-creates every parsed one that is not live.  So an add is confirmed only once tgtd is
"ready" again (:meth:`_settle_added`), a remove is checked to have stayed removed
(:meth:`_confirm_removed`), and :meth:`resync` / :meth:`restore` re-read every tid and re-create
what a restart or a crash lost.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ims.common.errors import IscsiError, TargetExists, TgtdRestarted
from ims.common.fileutil import atomic_write
from ims.einstein.iscsi.tgt_conf import NO_ADDRESS, LiveTarget, TargetSpec, render_conf

if TYPE_CHECKING:
    from ims.einstein.iscsi.tgt_control import Daemon

LOG = logging.getLogger(__name__)

SETTLE_ATTEMPTS = 3


class TgtSync:
    """Needs the driver's tgtadm helpers (``_wait_ready``, ``_show_all``, ``_create``,
    ``_delete_by_iqn``, ``_delete_account``) and its conf dir (:class:`TgtFiles`)."""

    if TYPE_CHECKING:
        conf_dir: str
        _template: str
        _gone: dict[str, float]

        def _wait_ready(self) -> None: ...
        def _show_all(self) -> dict[str, LiveTarget]: ...
        def _create(self, spec: TargetSpec, first: int | None = None) -> None: ...
        def _create_checked(self, spec: TargetSpec, first: int | None = None) -> None: ...
        def _delete_by_iqn(self, iqn: str, quiet: bool = False) -> int | None: ...
        def _delete_account(self, user: str) -> None: ...
        def list_targets(self) -> list[str]: ...
        def _read_spec_quietly(self, name: str) -> TargetSpec | None: ...
        def _rewrite_tid(self, target: str, tid: int | None, chap: tuple[str, str] | None = None) -> bool: ...
        def _run(self, *args: str, ok_missing: bool = False, ok_exists: bool = False) -> str | None: ...
        def _daemon(self) -> Daemon: ...
        def _on_tid(self, daemon: Daemon, what: str, *args: str, ok_missing: bool = False) -> str | None: ...

    def _settle_added(self, spec: TargetSpec, path: str) -> None:
        """Once tgtd is ready, the new target must be live with our backing store (and CHAP
        account): the one show that confirms the add.  If a restart's ``tgt-admin -e`` deleted
        it, it is made again: its conf file now exists, so any later ``tgt-admin -e`` keeps it.
        A tid that moved (the restart re-created it from the conf file) is written down."""
        for _ in range(SETTLE_ATTEMPTS):
            self._wait_ready()
            everything = self._show_all()
            live = everything.get(spec.iqn)
            if live is not None and live.backing_stores.get(spec.lun) == spec.backing.path \
                    and (spec.chap is None or spec.chap[0] in live.accounts):
                if live.tid != spec.tid:
                    # Made again from its conf file by a restart after our calls (they all reached the
                    # daemon that made it: _create compared its socket), or by tgt-admin on this daemon.
                    self._scrub_tid(spec, spec.tid, everything)
                    spec.tid = live.tid
                    atomic_write(path, render_conf(spec, self._template), 0o600)
                return
            LOG.warning("iSCSI target %s vanished while tgtd was loading its conf files (a tgt restart); "
                        "making it again", spec.iqn)
            self._scrub_tid(spec, spec.tid, everything)
            self._delete_by_iqn(spec.iqn, quiet=True)
            try:
                self._create(spec)
            except TgtdRestarted:
                continue  # the next round waits for the new tgtd and looks again
            atomic_write(path, render_conf(spec, self._template), 0o600)
        raise IscsiError(f"iSCSI target {spec.iqn} kept vanishing while tgtd restarted; retry")

    def _ours_at(self, spec: TargetSpec, tid: int | None, live: dict[str, LiveTarget]) -> tuple[
            LiveTarget | None, TargetSpec | None, list[int], list[tuple[str, str]], str | None]:
        """What of ``spec`` sits on the target that is at ``tid`` in ``live`` if that is not ours:
        ``(it, its conf spec or None, LUNs on our backing store, our ACL entries, our account)``."""
        other = next((t for t in live.values() if t.tid == tid and t.iqn != spec.iqn), None)
        if other is None:
            return None, None, [], [], None
        own = next((s for s in map(self._read_spec_quietly, self.list_targets())
                    if s is not None and s.iqn == other.iqn), None)
        keep = {NO_ADDRESS, *(own.initiators + own.initiator_names if own is not None else [])}
        luns = [lun for lun, path in other.backing_stores.items() if path == spec.backing.path]
        acl = [("-Q" if entry in spec.initiator_names else "-I", entry)
               for entry in [*spec.initiators, *spec.initiator_names] if entry in other.acl and entry not in keep]
        account = spec.chap[0] if spec.chap is not None and spec.chap[0] in other.accounts else None
        return other, own, luns, acl, account

    def _scrub_tid(self, spec: TargetSpec, tid: int | None, live: dict[str, LiveTarget]) -> None:
        """Take back from the target that is at ``tid`` now, if it is not ours, what our calls by that
        tid may have put on it after a renumbering (``live`` is a recent full show): a LUN on our
        backing store, our initiator addresses and names, our CHAP account.  A neighbour with a conf
        file here keeps what its conf file lists, and if our LUN was on it, it is deleted and made
        again from its conf file.  Called only when ours is not where we made it; no request unless
        something of ours is found, and then by tid only to the tgtd of a fresh show (if tgtd restarts
        meanwhile, what we put there went with the old tgtd: nothing is left to take back)."""
        if not any(self._ours_at(spec, tid, live)[2:]):
            return
        daemon = self._daemon()
        other, own, luns, acl, account = self._ours_at(spec, tid, self._show_all())
        if other is None or not (luns or acl or account):
            return
        LOG.error("iSCSI target %s (tid %s) got calls meant for %s after tgtd renumbered its targets: removing "
                  "from it LUNs %s, initiators %s%s", other.iqn, tid, spec.iqn, luns, [a for _f, a in acl],
                  f", CHAP account {account}" if account else "")
        what = f"taking {spec.iqn}'s bindings back from {other.iqn}"
        try:
            for lun in luns:
                self._on_tid(daemon, what, "--op", "delete", "--mode", "logicalunit", "--tid", str(tid), "--lun",
                             str(lun), ok_missing=True)
            for flag, entry in acl:
                self._on_tid(daemon, what, "--op", "unbind", "--mode", "target", "--tid", str(tid), flag, entry,
                             ok_missing=True)
            if account is not None:
                self._on_tid(daemon, what, "--op", "unbind", "--mode", "account", "--tid", str(tid), "--user",
                             account, ok_missing=True)
        except TgtdRestarted:
            LOG.warning("tgtd restarted while %s: those bindings went with the old tgtd", what)
            return
        if luns and own is not None:
            # Its own LUN could not be made while ours sat there: make it again from its conf file.
            self._delete_by_iqn(other.iqn, quiet=True)
            self.restore()

    def _confirm_removed(self, iqn: str, tid: int | None) -> None:
        """After ``remove_target`` deleted tid ``tid`` (by tgtadm's exit status) and unlinked the
        conf file: once tgtd is ready, ``iqn`` must be gone (the one show that confirms it).

        Still live means a tgt restart came in between: it renumbered the tids between our show
        and our delete (so the tid we deleted was a NEIGHBOUR's), or its ``tgt-admin -e`` read
        our conf file before it went and made the target again.  Either way :meth:`restore`
        brings back every target that has a conf file and is not live (ours has none now), then
        ours is deleted by its IQN, each delete confirmed by a show.  Best effort: the remove
        itself is done; a target left without owner is what reconcile reports.
        """
        try:
            self._wait_ready()
            live = self._show_all().get(iqn)
            if live is None:
                self._gone[iqn] = time.monotonic()
                return
            LOG.error("iSCSI target %s is live at tid %s after the delete of tid %s (a tgt restart renumbered "
                      "or re-made it): re-creating every target of %s that is not live, then deleting it again",
                      iqn, live.tid, tid, self.conf_dir)
            self.restore()
            self._delete_by_iqn(iqn)
        except IscsiError as exc:
            LOG.warning("iSCSI target %s removed, but could not check it stayed removed: %s", iqn, exc)

    def live_targets(self) -> list[str]:
        """Conf files whose IQN is live in tgtd, from ONE full show (for reconcile); re-syncs tids."""
        live = self._show_all()
        names = []
        for name in self.list_targets():
            spec = self._read_spec_quietly(name)
            if spec is not None and spec.iqn in live:
                if live[spec.iqn].tid != spec.tid:
                    self._rewrite_tid(name, live[spec.iqn].tid)
                names.append(name)
        return names

    def resync(self) -> int:
        """Rewrite every conf file whose tid line is stale, from one full show; returns how many.

        After a Debian-style tgt restart the tids are numbered again; this makes the conf
        files tell the truth again (operators read them; nothing trusts them blindly).
        """
        live = self._show_all()
        changed = 0
        for name in self.list_targets():
            spec = self._read_spec_quietly(name)
            if spec is not None and spec.iqn in live and live[spec.iqn].tid != spec.tid:
                if self._rewrite_tid(name, live[spec.iqn].tid):
                    changed += 1
        return changed

    def restore(self) -> int:
        """Start-up sync: re-read every tid (:meth:`resync`), then re-create, from the conf
        files, every target tgtd does not have; returns how many were re-created.

        Idempotent (a second run re-creates nothing) and safe to run from two workers at
        once: a target another run just made counts as live.  A target whose old tid is
        taken gets a free tid and its conf file is rewritten.
        """
        self._wait_ready()
        self.resync()
        live = dict(self._show_all())  # a copy: the targets made here are added to it
        restored = 0
        for name in self.list_targets():
            spec = self._read_spec_quietly(name)
            if spec is None or spec.iqn in live:
                continue
            taken = {t.tid for t in live.values()}
            wanted = spec.tid if spec.tid is not None and spec.tid not in taken else None
            try:
                self._create_checked(spec, first=wanted)
            except TargetExists:
                continue   # made meanwhile (another worker's restore): it is live, which is the goal
            except IscsiError as exc:
                # One target that cannot be made (its backing store is gone: e.g. another host rolled its
                # provision back while this one was down) must not keep the others, and Einstein, down.
                self._wait_ready()  # ... but tgtd itself failing is everyone's problem: raise that
                LOG.error("iSCSI target %s could not be restored from its conf file: %s (reconcile reports "
                          "it; recovery or `bmi reconcile --repair` deals with it)", spec.iqn, exc)
                continue
            if not self._rewrite_tid(name, spec.tid):
                # The conf file went away meanwhile (remove_target): do not resurrect the target.
                self._delete_by_iqn(spec.iqn)
                if spec.chap is not None:
                    self._delete_account(spec.chap[0])
                continue
            assert spec.tid is not None
            live[spec.iqn] = LiveTarget(tid=spec.tid, iqn=spec.iqn)
            restored += 1
            LOG.info("iSCSI target %s restored (tid %s)", spec.iqn, spec.tid)
        return restored

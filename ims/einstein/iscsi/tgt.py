"""The tgt (Linux SCSI target framework) iSCSI driver.

Targets are addressed by IQN, never by a remembered tid.  tgtadm acts on tids only,
and a tid is not stable: Debian's ``tgt.service`` restart (``tgt-admin --update ALL
-c /dev/null -f``, ``tgtadm --op delete --mode system``, ``tgtd -f``, ``tgt-admin -e``)
numbers the targets again 1, 2, ... in the glob order of ``conf.d/*.conf``, so the tid
a conf file remembers can name ANOTHER node's target afterwards.  So every delete and
every exists check first reads one full ``tgtadm --op show --mode target`` (IQN -> tid,
backing stores, ACL; see :func:`parse_show`) and acts on the tid that carries the
expected IQN *now*; a stale ``# bmi: tid=N`` line is rewritten.  A tid whose IQN is
not the expected one is never deleted nor reported as existing.

Why a full show: tgtadm 1.0.85 ``--op show --mode target --tid N`` prints only the
target's iSCSI parameters, not its name, so it cannot tell whose target tid N is.  One
full show is one tgtadm call whose output grows with the number of targets (about
40 lines each; a few ms for hundreds).

Every request by tid goes only to the tgtd that gave the tid (tgt_control ``_on_tid``): the
daemon's identity (its control socket's inode and change time; a restarted tgtd makes a new
socket) is taken before the show (or the ``--op new``) that gave the tid and compared, by one
stat and no request, right before each request by that tid.  A restart in between means the tid
is not sent: a delete looks again, an add stops before anything is bound (and is made again on
the new tgtd), a CHAP repair answers "retry".  That covers deletes, adds, CHAP repairs and the
scrub below.  Left: tgtadm has no "delete by name" nor compare-and-delete, so a restart landing
between that stat and tgtd reading the request (microseconds, while a restart is a daemon start
and four tgt-admin/tgtadm commands) is still caught only after the fact: after every delete a
show checks that our IQN is gone (for remove_target that is the show it makes anyway once tgtd
is ready again, which also catches a restart that re-made the target from its conf file:
tgt_sync._confirm_removed); if it is still live (at another tid), every target with a conf file
that is not live is re-created at once (:meth:`restore`) and the delete is retried by IQN.  A
target of another tool (no conf file here) hit in that instant is not brought back; that is
logged.  For an add, what no stat can see (a ``tgt-admin -e`` run by hand on the SAME daemon
re-using our tid) is caught by the show after the last request (once tgtd is ready,
tgt_sync._settle_added): if our IQN is not live at the tid we configured, whatever of ours is on
the target now at that tid (our LUN, our initiators, our account) is taken back from it (a
neighbour BMI owns is compared with its conf file, and re-made from it if its LUN was touched),
then ours is made again.

tgtadm requests per call: add_target 7 (ready check, new, LUN, LUN update, bind, ready check,
show; +1 per initiator name, +2 with CHAP), remove_target 5 (ready check, show, delete,
ready check, show; +1 account delete with CHAP).  By default each is written straight to tgtd's
control socket in tgtadm's own format (:mod:`ims.einstein.iscsi.tgt_ipc`), not a fork+exec of
the CLI: ``[iscsi] control``.

How tgtadm 1.0.85 reports things (checked by hand, the code relies on it):
  * a duplicate tid *and* a duplicate target name both exit 22 with
    "this target already exists";
  * an unknown tid exits 22 with "can't find the target";
  * tgtd down / socket missing exits 107, "failed to send request hdr to tgt daemon".

Each target also gets one tgt-admin style conf file, ``<conf_dir>/<name>.conf``, loadable
by Debian's tgt.service (``include <conf_dir>/*.conf`` in targets.conf); it records the
last known tid for operators and lets :meth:`TgtTarget.restore` re-create targets.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ims.common.errors import (
    InvalidInput,
    IscsiError,
    TargetExists,
    TargetNotFound,
    TgtdRestarted,
)
from ims.common.fileutil import atomic_write, unlink_quietly
from ims.common.names import IQN_PREFIX_RE, validate_name
from ims.einstein.boot import DEFAULT_TEMPLATES_DIR
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.iscsi.tgt_chap import TgtChap
from ims.einstein.iscsi.tgt_conf import (
    LUN_LBPPBE,
    NO_ADDRESS,
    LiveTarget,
    TargetSpec,
    check_backing,
    check_chap,
    check_initiators,
    parse_conf,  # noqa: F401 - re-exported: tests and tools read conf files through this module
    parse_show,  # noqa: F401 - re-exported, like parse_conf
    render_conf,
)
from ims.einstein.iscsi.tgt_control import Daemon, TgtControl
from ims.einstein.iscsi.tgt_files import TgtFiles
from ims.einstein.iscsi.tgt_ipc import TgtIpc
from ims.einstein.iscsi.tgt_sync import SETTLE_ATTEMPTS, TgtSync
from ims.einstein.storage.base import Backing

LOG = logging.getLogger(__name__)

TID_ATTEMPTS = 64
# The SCSI caching mode page with WCE cleared: what tgt-admin sends for "write-cache off".
WRITE_CACHE_OFF = "mode_page=8:0:18:0x10:0:0xff:0xff:0:0:0xff:0xff:0xff:0xff:0x80:0x14:0:0:0:0:0:0"

DELETE_ATTEMPTS = 3
# After this process deleted a target and a show confirmed its IQN gone, a second remove of the same
# target without a conf file (deprovision's forward step repeats the remove to be idempotent) answers
# TargetNotFound without another show for this long.  Only a "nothing to delete" answer is remembered,
# never a tid: nothing is ever deleted or reported live without a fresh show.
GONE_SECONDS = 2.0


class TgtTarget(TgtSync, TgtFiles, TgtChap, TgtControl, IscsiTarget):
    """tgt driver: one target per image, exported as LUN ``lun``.

    :param conf_dir: where the per-target conf files (and the tid counter) live.
    :param control_port: tgtd's ``-C`` port; 0 means tgtd's default socket.
    :param iqn_prefix: prepended to target names (``""`` keeps the original's bare names).
    :param direct: send tgtadm's requests straight to tgtd's control socket (no fork+exec per call);
        None = yes unless ``tgtadm`` names another binary than ``tgtadm``.
    """

    name = "tgt"

    def __init__(self, conf_dir: str, control_port: int = 0, iqn_prefix: str = "", lun: int = 1,
                 tgtadm: str = "tgtadm", timeout: float = 30.0, direct: bool | None = None) -> None:
        if not IQN_PREFIX_RE.fullmatch(iqn_prefix):
            raise InvalidInput(f"invalid iSCSI IQN prefix {iqn_prefix!r}")
        if int(lun) < 1:
            raise InvalidInput("the LUN must be 1 or more (LUN 0 is tgt's controller)")
        self.conf_dir = conf_dir
        self.control_port = int(control_port)
        self.iqn_prefix = iqn_prefix
        self.lun = int(lun)
        self.tgtadm = tgtadm
        self.timeout = timeout
        # Direct to tgtd's socket unless told otherwise or given another tgtadm binary (a wrapper).
        self._ipc: TgtIpc | None = TgtIpc(self.control_port, timeout) \
            if (tgtadm == "tgtadm" if direct is None else direct) else None
        self._ipc_checked = False
        self._template = Path(DEFAULT_TEMPLATES_DIR, "tgt_target.temp").read_text(encoding="utf-8")
        self._gone: dict[str, float] = {}  # IQN -> when our own delete's show confirmed it gone
        os.makedirs(conf_dir, exist_ok=True)

    # --- public API ------------------------------------------------------------
    def iqn(self, target: str) -> str:
        return self.iqn_prefix + validate_name(target, "target")

    def add_target(self, target: str, backing: Backing, initiators: list[str] | None = None,
                   initiator_names: list[str] | None = None, chap: tuple[str, str] | None = None) -> None:
        """Export ``backing`` as ``iqn(target)``; touches only this target (and its own CHAP account).

        ``chap`` is ``(user, secret)``: the account is created and bound as the target's
        ``incominguser`` (and written to the 0600 conf file), so only an initiator that knows
        the secret logs in.  The user name must be this target's own (one account per target).

        :raises TargetExists: the name has a conf file or a live tgt target (left untouched).
        :raises IscsiError: tgtd failed or is down (a half-made target is deleted first).
        :raises InvalidInput: bad name, backing or ACL entry.
        """
        addresses, names = check_initiators(initiators, initiator_names)
        spec = TargetSpec(name=target, iqn=self.iqn(target), backing=check_backing(backing), lun=self.lun,
                          initiators=addresses, initiator_names=names, chap=check_chap(chap))
        if spec.chap is not None and spec.chap[0] != target:
            raise InvalidInput(f"the CHAP user of target {target} must be named after it")
        path = self.conf_path(target)
        if os.path.exists(path):
            raise TargetExists(f"iSCSI target {target} already exists")
        self._gone.pop(spec.iqn, None)
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            self._wait_ready()
            try:
                self._create(spec)
                break
            except TgtdRestarted as exc:
                if attempt == SETTLE_ATTEMPTS:
                    raise
                LOG.warning("%s: making it again on the new tgtd", exc)
        try:
            atomic_write(path, render_conf(spec, self._template), 0o600)
            self._settle_added(spec, path)
        except BaseException:
            self._delete_by_iqn(spec.iqn, quiet=True)
            unlink_quietly(path)
            if spec.chap is not None:
                try:
                    self._delete_account(spec.chap[0])
                except IscsiError as exc:
                    LOG.warning("could not delete the CHAP account of target %s: %s", spec.iqn, exc)
            raise
        LOG.info("iSCSI target %s added (tid %s, %s %s%s)", spec.iqn, spec.tid, backing.bstype, backing.path,
                 f", CHAP user {spec.chap[0]}" if spec.chap else "")

    def remove_target(self, target: str) -> None:
        """Delete the target carrying ``iqn(target)`` (even with live sessions) and its conf file.

        The tid comes from a fresh show, never from the conf file alone.
        :raises TargetNotFound: neither a conf file nor a live target exists.
        :raises IscsiError:
        """
        path = self.conf_path(target)
        spec = self._read_spec(target)
        iqn = spec.iqn if spec is not None else self.iqn(target)
        gone = self._gone.pop(iqn, None)
        if spec is None and gone is not None and time.monotonic() - gone < GONE_SECONDS:
            raise TargetNotFound(f"iSCSI target {target} does not exist")
        self._wait_ready()
        tid = self._delete_live(iqn)
        if spec is None or spec.chap is not None:
            # tgt keeps accounts when their target goes: delete this target's own account (named
            # after the target, so without a conf file its name is still known).
            self._delete_account(spec.chap[0] if spec is not None and spec.chap else target)
        if tid is None and spec is None:
            raise TargetNotFound(f"iSCSI target {target} does not exist")
        self._unlink_conf(path)
        # One show once tgtd is ready confirms the delete hit ours (and that a restart's `tgt-admin -e`
        # that read the conf file before it went did not make it again); see _confirm_removed.
        self._confirm_removed(iqn, tid)
        LOG.info("iSCSI target %s removed (tid %s)", iqn, tid if tid is not None else "none live")

    def target_exists(self, target: str) -> bool:
        """Conf file present and a live target carrying its IQN (one full show).

        A stale tid line is rewritten on the way.
        """
        spec = self._read_spec(target)
        if spec is None:
            return False
        live = self._show_all().get(spec.iqn)
        if live is None:
            return False
        if live.tid != spec.tid:
            self._rewrite_tid(target, live.tid)
        return True

    def live_target(self, target: str) -> LiveTarget | None:
        """What tgtd has right now under ``iqn(target)`` (tid, backing stores, ACL), or None."""
        return self._show_all().get(self.iqn(target))

    def _create(self, spec: TargetSpec, first: int | None = None) -> None:
        """Create and configure ``spec`` under a free tid (sets ``spec.tid``); a half-made target
        is deleted.  Not confirmed here: add_target confirms with one show once tgtd is ready
        (:meth:`_settle_added`), restore with :meth:`_create_checked`.

        :raises TargetExists: tgtd already has ``spec.iqn`` (it is not touched).
        """
        daemon = self._daemon()
        spec.tid = self._new_target(spec.iqn, spec.name, first=first)
        try:
            self._configure(spec, daemon)
        except BaseException:
            self._discard(spec)
            raise

    def _create_checked(self, spec: TargetSpec, first: int | None = None) -> None:
        """:meth:`_create`, then a show must find our IQN at our tid with our backing store."""
        self._create(spec, first)
        try:
            live = self._show_all().get(spec.iqn)
            if live is None or live.tid != spec.tid or live.backing_stores.get(spec.lun) != spec.backing.path \
                    or (spec.chap is not None and spec.chap[0] not in live.accounts):
                raise IscsiError(f"iSCSI target {spec.iqn} changed while it was being added "
                                 "(tgtd restarted?); retry")
        except BaseException:
            self._discard(spec)
            raise

    def _discard(self, spec: TargetSpec) -> None:
        """Delete a half-made target (by IQN) and its CHAP account; failures are logged.  If tgtd
        renumbered meanwhile, what reached a neighbour at our tid is taken back first (_scrub_tid)."""
        try:
            self._scrub_tid(spec, spec.tid, self._show_all())
        except IscsiError as exc:
            LOG.warning("could not check the target at tid %s after %s failed there: %s", spec.tid, spec.iqn, exc)
        self._delete_by_iqn(spec.iqn, quiet=True)
        if spec.chap is not None:
            try:
                self._delete_account(spec.chap[0])
            except IscsiError as exc:
                LOG.warning("could not delete the CHAP account of half-made target %s: %s", spec.iqn, exc)

    def _new_target(self, iqn: str, name: str, first: int | None = None) -> int:
        """Create an empty target under a free tid; returns the tid.

        Candidates come from a counter file, so the usual case is one tgtadm call.  On
        "already exists" one full show tells whether the IQN is live (TargetExists) or the
        tid is taken (then the counter moves past every live tid).
        """
        candidate = first
        floor = 0
        for _ in range(TID_ATTEMPTS):
            if candidate is None:
                candidate = self._next_tid(floor)
            # Safe by tid: "new" names the IQN too, and tgtd refuses a tid (or an IQN) it already has.
            if self._run("--op", "new", "--mode", "target", "--tid", str(candidate), "-T", iqn,
                         ok_exists=True) is not None:
                return candidate
            live = self._show_all()
            if iqn in live:
                raise TargetExists(f"iSCSI target {name} already exists")
            # The tid is taken (another conf dir, or tgt-admin renumbered after a restart):
            # move the counter past every live tid.
            floor = max((t.tid for t in live.values()), default=0)
            candidate = None
        raise IscsiError(f"could not find a free tgt tid for {name} after {TID_ATTEMPTS} attempts")

    def _configure(self, spec: TargetSpec, daemon: Daemon) -> None:
        """LUN, write cache off, ACLs for a target that exists but is empty, each request only while the
        tgtd that made the target still answers (``daemon``: :meth:`_on_tid` raises TgtdRestarted)."""
        assert spec.tid is not None
        tid = str(spec.tid)
        what = f"iSCSI target {spec.iqn} was being made at tid {tid}"
        lun_args = ["--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(spec.lun),
                    "--bstype", spec.backing.bstype, "--backing-store", spec.backing.path]
        if spec.backing.bsopts:
            lun_args += ["--bsopts", spec.backing.bsopts]
        self._on_tid(daemon, what, *lun_args)
        # One update: write cache off and the physical block size a disk reports (see LUN_LBPPBE).
        self._on_tid(daemon, what, "--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", str(spec.lun),
                     "--params", f"{WRITE_CACHE_OFF},lbppbe={LUN_LBPPBE}")
        # Exactly what tgt-admin binds for the conf file, so a target reloaded by Debian's
        # tgt.service looks the same as one BMI made (NO_ADDRESS for names-only targets).
        for address in spec.initiators or [NO_ADDRESS]:
            self._on_tid(daemon, what, "--op", "bind", "--mode", "target", "--tid", tid, "-I", address)
        for name in spec.initiator_names:
            self._on_tid(daemon, what, "--op", "bind", "--mode", "target", "--tid", tid, "-Q", name)
        if spec.chap is not None:
            self._bind_account(tid, *spec.chap, daemon=daemon)

    def _delete_live(self, iqn: str) -> int | None:
        """Delete the tid that carries ``iqn`` in a fresh show; returns it, None if none was live.

        Trusts tgtadm's exit status: the caller confirms with a show afterwards
        (:meth:`_confirm_removed`, which also repairs a delete that a renumbering made hit a
        neighbour)."""
        for _ in range(DELETE_ATTEMPTS):
            daemon = self._daemon()
            target = self._show_all().get(iqn)
            if target is None:
                return None
            try:
                self._on_tid(daemon, f"deleting iSCSI target {iqn}", "--op", "delete", "--mode", "target",
                             "--tid", str(target.tid), "--force", ok_missing=True)
            except TgtdRestarted:
                continue  # that tid was the old tgtd's: look again
            return target.tid
        raise IscsiError(f"tgtd kept restarting while iSCSI target {iqn} was being deleted; retry")

    def _delete_by_iqn(self, iqn: str, quiet: bool = False) -> int | None:
        """Delete the live target carrying ``iqn``; returns the tid deleted, None if none was live.

        Each attempt: show, delete the tid that carries ``iqn`` now, show again.  If ``iqn``
        is still live after its delete, tgtd was renumbered in between and the tid we
        deleted was another target's: :meth:`restore` brings back every target with a conf
        file, and the next attempt deletes ours by its new tid.
        """
        try:
            daemon = self._daemon()
            live = self._show_all()
            deleted: int | None = None
            for _ in range(DELETE_ATTEMPTS):
                target = live.get(iqn)
                if target is None:
                    return deleted
                try:
                    self._on_tid(daemon, f"deleting iSCSI target {iqn}", "--op", "delete", "--mode", "target",
                                 "--tid", str(target.tid), "--force", ok_missing=True)
                except TgtdRestarted:  # nothing sent: that tid was the old tgtd's; look again
                    daemon = self._daemon()
                    live = self._show_all()
                    continue
                daemon = self._daemon()
                live = self._show_all()
                if iqn not in live:
                    self._gone[iqn] = time.monotonic()
                    return target.tid
                deleted = target.tid
                if live[iqn].tid != target.tid:
                    # Renumbered by a restart (tid N was someone else's when it was deleted), or
                    # re-created meanwhile by another worker's restore(): either way restore()
                    # brings back whatever of ours is missing, then ours is deleted by its new tid.
                    LOG.error("iSCSI target %s moved from tid %s while it was being deleted (tgtd restarted?): "
                              "re-creating every target of %s that is not live", iqn, target.tid, self.conf_dir)
                    self.restore()
                    live = self._show_all()
            raise IscsiError(f"iSCSI target {iqn} is still live after {DELETE_ATTEMPTS} deletes")
        except IscsiError as exc:
            if not quiet:
                raise
            LOG.warning("could not delete half-made tgt target %s: %s", iqn, exc)
            return None

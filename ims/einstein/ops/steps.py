"""Every journaled step BMI runs: its ``execute`` and its ``revert`` side by side.

Modelled on taskflow's Task: one object per kind of step.  ``run(tx, **params)`` records the
step in the journal with ``(undo_name, params)`` and calls ``execute(**params)``; the journal
calls ``revert(params, ctx)`` (registered under ``undo_name``) to roll it back, in this process
or in a later recovery.  Parameters are JSON (never a credential) and every revert is
idempotent: undoing a step that never really happened is harmless.

Undo only what a step made: a step whose ``execute`` fails because its object already existed
(``made_nothing``) is *disarmed* before the error propagates, so the roll-back does not remove
an object someone else made (a repeated ``iscsi create`` must not delete the live target).
The verbs also check for existence under their locks first (409, nothing changed); the
disarm covers the race with anything that does not take BMI's locks.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ims.common import names
from ims.common.errors import (
    ImageBusy,
    ImageExists,
    SnapshotExists,
    SnapshotNotFound,
    TargetExists,
    TargetNotFound,
)
from ims.database.models import Provision
from ims.einstein import flatten
from ims.einstein.iscsi import chap
from ims.einstein.journal import RecoveryContext, Tx
from ims.einstein.ops.background import start_step
from ims.einstein.ops.core import Core
from ims.einstein.ops.purge import purge
from ims.einstein.ops.purge import quietly as _quietly

LOG = logging.getLogger(__name__)


class Step:
    """One kind of journaled step. Subclasses set ``name``/``undo_name`` and implement both halves."""

    name = ""                 # the journal's step name (also the fault-injection point)
    undo_name: str | None = None  # the registered revert; None: nothing to undo (a later step's undo covers it)
    made_nothing: tuple[type[BaseException], ...] = ()

    def __init__(self, core: Core) -> None:
        self.core = core

    def execute(self, **params: Any) -> Any:
        raise NotImplementedError

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        raise NotImplementedError

    def run(self, tx: Tx, name: str | None = None, /, **params: Any) -> Any:
        undo = (self.undo_name, params) if self.undo_name else None
        try:
            return tx.step(name or self.name, lambda: self.execute(**params), undo=undo)
        except self.made_nothing:
            self._disarm(tx, name or self.name)
            raise

    def ahead(self, tx: Tx, /, **params: Any) -> None:
        """Record this step (the same record :meth:`run` / :meth:`start` with ``params`` writes) with the
        operation's next journal write (:meth:`Tx.ahead`); its run then writes nothing first."""
        tx.ahead(self.name, (self.undo_name, params) if self.undo_name else None)

    def start(self, tx: Tx, /, **params: Any) -> Future[Any]:
        """Like :meth:`run`, but ``execute`` runs in a background thread once its journal record is
        written, so it overlaps the operation's next steps (for work independent of them: a HIL
        call, boot files).  The caller waits for the future before the operation ends
        (ims/einstein/ops/background.py ``settled``): its error then rolls the operation back like any
        step's, and a roll-back starts only after it has ended, so the undo sees what it did."""
        undo = (self.undo_name, params) if self.undo_name else None
        return start_step(tx, self.name, undo, lambda: self.execute(**params))

    def _disarm(self, tx: Tx, name: str) -> None:
        """The step failed because its object was already there: it made nothing, so undo nothing."""
        tx.disarm(name, "failed: already existed")


# --- storage ---------------------------------------------------------------------
class Clone(Step):
    name, undo_name = "storage.clone", "storage.purge"
    made_nothing = (ImageExists,)

    def execute(self, parent: str, snap: str, image: str) -> None:
        st = self.core.storage
        for _attempt in range(3):
            try:
                st.clone(parent, snap, image)
                return
            except SnapshotNotFound:
                # ``parent`` awaits its background flatten: ``parent@snap`` is not taken yet, and
                # ``source@transient`` holds the same bytes (see ims/einstein/flatten.py).
                src = flatten.pending_source(self.core, parent, snap)
                if src is None:
                    if snap in st.list_snapshots(parent):
                        continue  # the flatten finished between our two looks
                    raise
            try:
                st.clone(src[0], src[1], image)
                return
            except SnapshotNotFound:
                continue  # collected just now: the flatten finished, so parent@snap exists
        st.clone(parent, snap, image)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        try:
            purge(self.core, params["image"])
        except ImageBusy:
            if ctx.fence is None:
                raise
            # A take-over finishing a dead host's half-made provision: that host's tgtd had made the
            # LUN, and its watch on the clone lingers (~30 s after a crash; for ever if it hangs) and
            # blocks the removal.  We hold the operation's locks: no BMI operation has the clone open,
            # so its other clients are gateways' LUNs (HostAgent.fence blocklists them), then remove.
            ctx.fence(params["image"])
            purge(self.core, params["image"])


class Flatten(Step):
    name = "storage.flatten"

    def execute(self, image: str) -> None:
        self.core.storage.flatten(image)


class QueueFlatten(Step):
    """Leave ``image`` a clone of ``source@snap`` and have a worker flatten it (ims/einstein/flatten.py)."""

    name, undo_name = "storage.queue_flatten", "storage.forget_flatten"

    def execute(self, image: str, source: str, snap: str) -> None:
        flatten.enqueue(self.core, image, source, snap)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        flatten.cancel(self.core, params["image"])


class CreateSnapshot(Step):
    name, undo_name = "storage.snapshot", "storage.remove_snapshot"
    made_nothing = (SnapshotExists,)

    def execute(self, image: str, snap: str) -> None:
        self.core.storage.create_snapshot(image, snap)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        remove_snapshot(self.core, params["image"], params["snap"])


def remove_snapshot(core: Core, image: str, snap: str) -> None:
    st = core.storage
    if not st.image_exists(image) or snap not in st.list_snapshots(image):
        return
    _quietly(lambda: st.unprotect_snapshot(image, snap))
    _quietly(lambda: st.remove_snapshot(image, snap))


class Protect(Step):
    name, undo_name = "storage.protect", "storage.unprotect"

    def execute(self, image: str, snap: str) -> None:
        self.core.storage.protect_snapshot(image, snap)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        _quietly(lambda: self.core.storage.unprotect_snapshot(params["image"], params["snap"]))


class Unprotect(Step):
    name, undo_name = "storage.unprotect", "storage.protect"

    def execute(self, image: str, snap: str) -> None:
        self.core.storage.unprotect_snapshot(image, snap)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        _quietly(lambda: self.core.storage.protect_snapshot(params["image"], params["snap"]))


# --- iSCSI -----------------------------------------------------------------------
def chap_of(core: Core, target: str | None) -> tuple[str, str] | None:
    """The CHAP ``(user, secret)`` of BMI target ``target`` (a clone's internal name), from its row.

    Read at the moment a target or boot script is made, so the secret is never a journal
    parameter; None when the row has no secret (made while [iscsi] chap was off) or is gone.
    """
    prefix = names.internal_prefix(core.uid)
    if not target or not target.startswith(prefix) or not target[len(prefix):].isdigit():
        return None
    with core.journal.connection() as tx:  # perf: plain SQL (ims/database/plain.py), twice per provision
        rows = tx.rows("SELECT chap_secret FROM image WHERE id = ?", (int(target[len(prefix):]),))
    return chap.account(target, rows[0][0] if rows else None)


def add_target(core: Core, target: str, image: str, initiators: list[str] | None,
               initiator_names: list[str] | None) -> None:
    """Export ``image`` as ``target`` with the target's CHAP account, if its row has a secret."""
    account = chap_of(core, target)
    if account is None:  # keeps drivers without the keyword (tests' fakes of earlier releases) working
        core.iscsi.add_target(target, core.storage.backing(image), initiators, initiator_names)
    else:
        core.iscsi.add_target(target, core.storage.backing(image), initiators, initiator_names, chap=account)


class AddTarget(Step):
    name, undo_name = "iscsi.add_target", "iscsi.remove"
    made_nothing = (TargetExists,)

    def execute(self, target: str, image: str, initiators: list[str] | None = None,
                initiator_names: list[str] | None = None) -> None:
        add_target(self.core, target, image, initiators, initiator_names)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        _quietly(lambda: self.core.iscsi.remove_target(params["target"]))


def ensure_target(core: Core, params: dict[str, Any]) -> None:
    """Re-add a target unless it is live (idempotent)."""
    if not core.iscsi.target_exists(params["target"]):
        # a conf file whose target is gone from the daemon would block the re-add
        _quietly(lambda: core.iscsi.remove_target(params["target"]))
        add_target(core, params["target"], params["image"], params.get("initiators"), params.get("initiator_names"))


class RemoveTarget(Step):
    name, undo_name = "iscsi.remove_target", "iscsi.add"
    # No target to remove (gone behind BMI's back): its undo must not add one that was not there.
    made_nothing = (TargetNotFound,)

    def execute(self, target: str, image: str, initiators: list[str] | None = None,
                initiator_names: list[str] | None = None) -> None:
        self.core.iscsi.remove_target(target)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        ensure_target(self.core, params)


# --- boot files ------------------------------------------------------------------
def write_boot(core: Core, params: dict[str, Any]) -> list[str]:
    """Write a node's boot files from step parameters; the CHAP secret comes from the target's row.

    ``target`` (the clone's internal name) is absent from journal rows of earlier releases:
    their scripts are written without CHAP, as they were.
    """
    return core.boot.write(params["node"], params["mac"], params["label"], params["iqn"],
                           params.get("initiator"), chap=chap_of(core, params.get("target")),
                           secondary=params.get("secondary"))


class WriteBoot(Step):
    name, undo_name = "boot.write", "boot.remove"

    def execute(self, node: str, mac: str, label: str, iqn: str, initiator: str | None = None,
                target: str | None = None, secondary: str | None = None) -> None:
        write_boot(self.core, {"node": node, "mac": mac, "label": label, "iqn": iqn, "initiator": initiator,
                               "target": target, "secondary": secondary})

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        self.core.boot.remove(params["node"], params["mac"])


class RemoveBoot(Step):
    name, undo_name = "boot.remove", "boot.write"

    def execute(self, node: str, mac: str, label: str, iqn: str, initiator: str | None = None,
                target: str | None = None, secondary: str | None = None) -> None:
        self.core.boot.remove(node, mac)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        write_boot(self.core, params)


# --- database --------------------------------------------------------------------
class DbStep(Step):
    """A database change recorded (with its undo) in the same transaction as the change."""

    def insert(self, session: Session, **params: Any) -> Any:
        raise NotImplementedError

    def undo_params(self, result: Any) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, tx: Tx, name: str | None = None, /, then: Callable[[Any], None] | None = None,
            **params: Any) -> Any:
        """``then(result)``: record the steps that follow ahead, in this step's own write (Tx.db_step)."""
        assert self.undo_name
        undo_name = self.undo_name
        return tx.db_step(name or self.name, lambda s: self.insert(s, **params),
                          lambda result: (undo_name, self.undo_params(result)), then)


class InsertImage(DbStep):
    """An image row."""

    name, undo_name = "db.insert_image", "db.delete_image"
    COLUMNS = ("name", "is_public", "is_snapshot", "project_id", "parent_id", "kind")

    def insert(self, session: Session, **params: Any) -> int:
        values = {"is_public": False, "is_snapshot": False, "parent_id": None, "kind": "golden", **params}
        if set(values) != set(self.COLUMNS):
            raise TypeError(f"an image row has the columns {', '.join(self.COLUMNS)}")
        # Made here, in the row's own transaction, so it is never a journal parameter.
        secret = chap.new_secret() if values["kind"] in ("node", "disk") and self.core.cfg.iscsi.chap else None
        tx = self.core.journal.plain.within(session)  # perf: plain SQL in the step's own transaction
        try:
            return tx.insert(f"INSERT INTO image ({', '.join(self.COLUMNS)}, chap_secret) VALUES "
                             f"({', '.join('?' * (len(self.COLUMNS) + 1))}) RETURNING id",
                             [*(values[c] for c in self.COLUMNS), secret])
        except IntegrityError:
            raise ImageExists(f"image {params['name']} already exists") from None

    def undo_params(self, result: Any) -> dict[str, Any]:
        return {"id": result}

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        delete_image_row(self.core, params["id"])


def delete_image_row(core: Core, image_id: int) -> None:
    """Delete an image's row and the provision rows that use it; its children's ``parent_id`` become
    NULL first (what the ORM's delete did, statement for statement; plain SQL, ims/database/plain.py)."""
    with core.journal.connection() as tx:
        tx.run("DELETE FROM provision WHERE image_id = ?", (image_id,))
        tx.run("UPDATE image SET parent_id = NULL WHERE parent_id = ?", (image_id,))
        tx.run("DELETE FROM image WHERE id = ?", (image_id,))


class InsertProvision(DbStep):
    name, undo_name = "db.insert_provision", "db.delete_provision"

    def insert(self, session: Session, **params: Any) -> str:
        session.add(Provision(**params))
        return str(params["node"])

    def undo_params(self, result: Any) -> dict[str, Any]:
        return {"node": result}

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        delete_provision_row(self.core, params["node"])


def delete_provision_row(core: Core, node: str) -> None:
    with core.session() as session:
        prov = session.get(Provision, node)
        if prov is not None:
            session.delete(prov)


class Steps:
    """One instance of every step, registered with the journal (reverts and forward finishers)."""

    def __init__(self, core: Core) -> None:
        from ims.einstein.ops.hil_steps import Connect, Detach  # (hil_steps imports Step from here)

        self.clone = Clone(core)
        self.flatten = Flatten(core)
        self.queue_flatten = QueueFlatten(core)
        self.snapshot = CreateSnapshot(core)
        self.protect = Protect(core)
        self.unprotect = Unprotect(core)
        self.add_target = AddTarget(core)
        self.remove_target = RemoveTarget(core)
        self.write_boot = WriteBoot(core)
        self.remove_boot = RemoveBoot(core)
        self.connect = Connect(core)
        self.detach = Detach(core)
        self.insert_image = InsertImage(core)
        self.insert_provision = InsertProvision(core)
        j = core.journal
        for step in vars(self).values():
            if isinstance(step, Step) and step.undo_name:
                j.register_undo(step.undo_name, step.revert)

        # Kept for journal rows written by earlier releases.
        def restore_provision(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            with core.session() as session:
                if session.get(Provision, params["node"]) is None:
                    session.add(Provision(node=params["node"], project_id=params["project_id"],
                                          image_id=params["image_id"], nic=params["nic"], mac=params["mac"],
                                          network=params.get("network")))

        j.register_undo("db.restore_provision", restore_provision)

        # Forward finishers: what a committed operation still has to do (idempotent).
        def finish_source_snapshot(args: dict[str, Any], _ctx: RecoveryContext) -> None:
            src, snap = args["source"], args["snap"]
            if core.storage.image_exists(src) and snap in core.storage.list_snapshots(src) \
                    and core.storage.list_children(src, snap):
                return  # something is still cloned from it; flatten.collect removes it later
            remove_snapshot(core, src, snap)

        def finish_removal(args: dict[str, Any], ctx: RecoveryContext) -> None:
            """A recovery's forward: the boot files, the target, then the storage and the rows."""
            if args.get("node"):
                core.boot.remove(args["node"], args["mac"])
            _quietly(lambda: core.iscsi.remove_target(args["image"]))
            finish_storage_removal(args, ctx)

        def finish_storage_removal(args: dict[str, Any], ctx: RecoveryContext) -> None:
            """The storage and the rows: all a live deprovision has left after its commit point (its own
            steps removed the boot files and the target under its locks, so nothing made them again)."""
            gone = purge(core, args["image"], ctx.described.pop(args["image"], None))
            delete_image_row(core, args["image_id"])
            if not gone:  # purge had to leave it (clones of its snapshots): they may be gone by now
                flatten.collect(core, args["image"])

        def finish_unprovision(args: dict[str, Any], _ctx: RecoveryContext) -> None:
            core.boot.remove(args["node"], args["mac"])
            delete_provision_row(core, args["node"])

        for kind, fn in {"import": finish_source_snapshot, "snapshot": finish_source_snapshot,
                         "deprovision": finish_removal, "remove_image": finish_removal,
                         "delete_disk": finish_removal, "deprovision_disk": finish_unprovision}.items():
            j.register_forward(kind, fn)
        self.forward = {"source_snapshot": finish_source_snapshot, "removal": finish_removal,
                        "storage_removal": finish_storage_removal, "unprovision": finish_unprovision}

"""Upload and download of raw image data (``bmi upload`` / ``bmi download``), on Picasso's behalf.

Where the bytes go: Picasso has no Ceph access (it is the tenant-facing process and holds no
storage credentials), so it sends the data to Einstein over the existing HMAC-authenticated RPC
in chunks: ``upload_begin``, ``upload_write`` (any worker: every worker opens the RBD image by
name), ``upload_commit``, ``upload_abort``; downloads read chunks with ``download_read``.

All or nothing: ``upload_begin`` opens a journal row of kind ``upload`` that outlives the call,
owned by the Picasso *process* streaming the body (``owner``, ``host:pid:start``), and takes the
image name's lock (``image:<project>/<img>``) for that owner.  The data goes to a staging image in
BMI's own namespace (``<uid>img-up-<token>``: no tenant can name it, reconcile ignores it) that no
database row names: the image is invisible and unusable until ``upload_commit`` inserts its row,
renames the staging image to ``<uid>img<id>`` and snapshots and protects it, as journaled steps of
the same row.  Whatever interrupts an upload, the row is rolled back (the staging image purged):

* Picasso sees the client go away or a chunk fail: ``upload_abort``;
* Picasso dies: the owner of its locks is dead, so the journal rolls back what it owned (at the next
  use of the name, when Einstein starts, and every ``[journal] retry_seconds``);
* Einstein dies, or Picasso runs on another host (whose liveness Einstein cannot judge): an upload
  that wrote nothing for ``[rest_api] upload_idle_seconds`` is reaped by ``Operations.recover``;
* a worker dies while committing: commit first moves the row and the lock to that worker (one
  conditional update), so its death is an ordinary dead worker's operation.

Commit, abort and reaping all start with that conditional update (``_claim``, which also changes the
row's kind to ``upload-commit`` or ``upload-abort``): exactly one of them wins an upload.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from ims.common import names
from ims.common import transfer as xfer
from ims.common.errors import BMIError, Conflict, ImageExists, InvalidInput, WrongKind
from ims.database.models import Lock, Operation
from ims.einstein.journal import LOCKS_KEY, RecoveryContext, Tx, current_owner
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.steps import Steps

LOG = logging.getLogger(__name__)

KIND = "upload"
# A claimed upload's row changes kind, so that nothing else (a chunk, an abort, the reaper) takes it again;
# if its new owner dies, journal recovery rolls it back like any dead worker's operation.
KIND_COMMIT, KIND_ABORT = "upload-commit", "upload-abort"
# A chunk write refreshes the upload's idle clock at most this often (one database write).
_HEARTBEAT_SECONDS = 5.0
_OWNER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}:\d{1,10}:[0-9?]{1,24}$")


@dataclass(frozen=True)
class _Row:
    owner: str
    steps: str


class UploadGone(Conflict):
    """The upload is not in progress any more (aborted, reaped after being idle, or committed)."""


def staging_prefix(uid: str) -> str:
    return f"{names.internal_prefix(uid)}-up-"


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not _OWNER_RE.fullmatch(owner):
        raise InvalidInput("invalid upload owner")
    return owner


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{what} must be an integer from {low} to {high}")
    return value


class Transfer:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps
        self._beats: dict[int, float] = {}
        self._beats_lock = threading.Lock()
        core.journal.register_undo("upload.rename_back", self._rename_back)

    # --- upload ------------------------------------------------------------------------
    def begin(self, auth: Auth, project: str, img: str, size: int, owner: str) -> dict[str, Any]:
        """Reserve ``img`` in ``project`` for ``owner`` and create its (empty, sparse) staging image."""
        core = self.core
        names.validate_name(project, "project")
        core.user_name(img, "image")
        _check_owner(owner)
        limit = xfer.max_upload_bytes(core.cfg)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidInput("the image size must be a positive number of bytes")
        if size > limit:
            raise BMIError(f"the image ({size} bytes) is larger than [rest_api] max_upload_bytes ({limit})",
                           status=413)
        core.access(auth, project)
        lock = f"image:{project}/{img}"
        core.journal.hold([lock], owner, KIND)
        try:
            with core.session() as session:
                proj = core.project(session, project)
                if core.find(session, proj, img) is not None:
                    raise ImageExists(f"image {img} already exists in project {project}")
                project_id = proj.id
            staging = f"{staging_prefix(core.uid)}{uuid.uuid4().hex[:16]}"
            args = {"project": project, "img": img, "project_id": project_id, "image": staging, "size": size}
            with core.journal.session() as session:
                row = Operation(kind=KIND, args=json.dumps({**args, LOCKS_KEY: [lock]}), owner=owner,
                                state="running")
                session.add(row)
                session.flush()
                op_id = row.id
        except BaseException:
            core.journal.release([lock], owner)
            raise
        tx = Tx(core.journal, op_id, KIND, args, RecoveryContext())
        try:
            with core.bmi_names({staging: img}):
                tx.step("storage.create", lambda: core.storage.create_image(staging, size),
                        undo=("storage.purge", {"image": staging}))
        except BaseException:
            if self._claim(op_id, owner, current_owner(), lock):
                self._roll_back(op_id, lock, current_owner())
            raise
        LOG.info("upload #%d of %s/%s (%d bytes) started", op_id, project, img, size)
        return {"id": op_id, "size": size, "chunk": xfer.CHUNK}

    def _running(self, upload_id: object, project: str) -> tuple[_Row, dict[str, Any]]:
        _check_int(upload_id, "upload id", 1, 2 ** 63 - 1)
        with self.core.session() as session:
            row = session.get(Operation, upload_id)
            if row is None or row.kind != KIND or row.state != "running":
                raise UploadGone(f"upload #{upload_id} is not in progress (it was aborted, or idle too long)")
            args = json.loads(row.args)
            if args.get("project") != project:
                raise UploadGone(f"upload #{upload_id} is not in progress in project {project}")
            args.pop(LOCKS_KEY, None)
            return _Row(row.owner, row.steps), args

    def write(self, auth: Auth, project: str, upload_id: int, extents: list[Any]) -> int:
        """Write ``[[offset, data], ...]`` into the upload's staging image; the bytes written."""
        core = self.core
        names.validate_name(project, "project")
        core.access(auth, project)
        _row, args = self._running(upload_id, project)
        if not isinstance(extents, (list, tuple)):
            raise InvalidInput("extents must be a list of [offset, data]")
        data: list[tuple[int, bytes]] = []
        total = 0
        for item in extents:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise InvalidInput("extents must be a list of [offset, data]")
            chunk = xfer.as_bytes(item[1])
            offset = _check_int(item[0], "offset", 0, args["size"] - len(chunk))
            total += len(chunk)
            if total > xfer.MAX_WRITE:
                raise InvalidInput(f"at most {xfer.MAX_WRITE} bytes per write")
            data.append((offset, chunk))
        if data:
            with core.bmi_names({args["image"]: args["img"]}):
                core.storage.write_extents(args["image"], data)
        self._heartbeat(upload_id)
        return total

    def _heartbeat(self, upload_id: int) -> None:
        now = time.monotonic()
        with self._beats_lock:
            if now - self._beats.get(upload_id, 0.0) < _HEARTBEAT_SECONDS:
                return
            self._beats[upload_id] = now
            if len(self._beats) > 1024:
                self._beats = {k: v for k, v in self._beats.items() if now - v < 3600}
        with self.core.session() as session:
            session.execute(update(Operation).where(Operation.id == upload_id, Operation.state == "running")
                            .values(updated_at=datetime.now(UTC)))

    def commit(self, auth: Auth, project: str, upload_id: int, owner: str) -> dict[str, Any]:
        """Make the staging image a golden image of the project (row, name, snapshot): all or nothing."""
        core, steps = self.core, self.steps
        names.validate_name(project, "project")
        _check_owner(owner)
        core.access(auth, project)
        row, args = self._running(upload_id, project)
        img, staging = args["img"], args["image"]
        lock, me = f"image:{project}/{img}", current_owner()
        if row.owner != owner or not self._claim(upload_id, owner, me, lock, KIND_COMMIT):
            raise UploadGone(f"upload #{upload_id} is not in progress (it was aborted, or idle too long)")
        tx = Tx(core.journal, upload_id, KIND, args, RecoveryContext())
        tx.steps = json.loads(row.steps)
        try:
            image_id = steps.insert_image.run(tx, name=img, project_id=args["project_id"], parent_id=None,
                                              is_snapshot=False, kind="golden")
            ceph = core.ceph_name(image_id)
            with core.bmi_names({ceph: img, staging: img}):
                tx.step("storage.rename", lambda: core.storage.rename_image(staging, ceph),
                        undo=("upload.rename_back", {"image": ceph, "staging": staging}))
                steps.snapshot.run(tx, "storage.snapshot_copy", image=ceph, snap=core.snap)
                steps.protect.run(tx, "storage.protect_copy", image=ceph, snap=core.snap)
            core.journal.fault("upload.done", "before")
            with core.session() as session:
                session.execute(update(Operation).where(Operation.id == upload_id)
                                .values(state="done", steps=json.dumps([{**s, "state": "done"} for s in tx.steps])))
        except BaseException:
            self._roll_back(upload_id, lock, me)
            raise
        core.journal.release([lock], me)
        LOG.info("upload #%d committed as image %s/%s", upload_id, project, img)
        return {"name": img, "size": args["size"]}

    def abort(self, auth: Auth, project: str, upload_id: int, owner: str) -> bool:
        """Roll the upload back (idempotent); False if it was not in progress any more."""
        names.validate_name(project, "project")
        _check_owner(owner)
        try:
            row, args = self._running(upload_id, project)
        except UploadGone:
            return False
        lock, me = f"image:{project}/{args['img']}", current_owner()
        if row.owner != owner or not self._claim(upload_id, owner, me, lock):
            return False
        self._roll_back(upload_id, lock, me)
        LOG.info("upload #%d of %s/%s aborted", upload_id, project, args["img"])
        return True

    def reap(self) -> list[int]:
        """Roll back uploads that wrote nothing for ``[rest_api] upload_idle_seconds`` (their Picasso or
        Einstein went away without a word)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=xfer.upload_idle_seconds(self.core.cfg))
        with self.core.session() as session:
            rows = session.execute(select(Operation.id, Operation.owner, Operation.args).where(
                Operation.kind == KIND, Operation.state == "running", Operation.updated_at < cutoff)).all()
        reaped = []
        me = current_owner()
        for op_id, owner, raw in rows:
            args = json.loads(raw)
            lock = f"image:{args.get('project')}/{args.get('img')}"
            if self._claim(op_id, owner, me, lock):
                LOG.warning("upload #%d of %s/%s idle since before %s: rolling it back", op_id, args.get("project"),
                            args.get("img"), cutoff.isoformat(timespec="seconds"))
                self._roll_back(op_id, lock, me)
                reaped.append(op_id)
        return reaped

    # --- claims and roll-back ---------------------------------------------------------------
    def _claim(self, op_id: int, owner: str, me: str, lock: str, kind: str = KIND_ABORT) -> bool:
        """Move the running upload ``op_id`` and its lock from ``owner`` to this process, as ``kind`` (one
        transaction); False if someone else did first (or it is not running)."""
        with self.core.session() as session:
            won = session.execute(update(Operation).where(
                Operation.id == op_id, Operation.kind == KIND, Operation.state == "running",
                Operation.owner == owner).values(owner=me, kind=kind, updated_at=datetime.now(UTC)))
            if won.rowcount != 1:
                return False
            session.execute(update(Lock).where(Lock.name == lock, Lock.owner == owner).values(owner=me))
        return True

    def _roll_back(self, op_id: int, lock: str, me: str) -> None:
        try:
            state = self.core.journal.finish(op_id)
            if state == "failed":
                LOG.error("upload #%d could not be rolled back yet; journal recovery retries it", op_id)
        finally:
            self.core.journal.release([lock], me)

    def _rename_back(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        st = self.core.storage
        if st.image_exists(params["image"]) and not st.image_exists(params["staging"]):
            st.rename_image(params["image"], params["staging"])

    # --- download ------------------------------------------------------------------------
    def _source(self, auth: Auth, project: str, img: str) -> str:
        core = self.core
        names.validate_names(project=project, image=img)
        core.access(auth, project)
        with core.session() as session:
            row = core.image(session, core.project(session, project), img)
            if row.kind in ("node", "disk"):
                raise WrongKind(f"{img} is a provisioned {row.kind}'s live disk; snapshot it and download the "
                                "snapshot")
            return core.ceph_name(row.id)

    def download_info(self, auth: Auth, project: str, img: str) -> dict[str, Any]:
        ceph = self._source(auth, project, img)
        with self.core.bmi_names({ceph: img}):
            self.core.require_storage(ceph, img)
            return {"name": img, "size": self.core.storage.image_size(ceph), "chunk": xfer.CHUNK}

    def download_read(self, auth: Auth, project: str, img: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``img`` from ``offset``; None when they are all zeros (nothing to send)."""
        _check_int(offset, "offset", 0, 2 ** 63 - 1)
        _check_int(length, "length", 1, xfer.MAX_WRITE)
        ceph = self._source(auth, project, img)
        with self.core.bmi_names({ceph: img}):
            data = self.core.storage.read(ceph, offset, length)
        return None if xfer.is_zero(data) else data

"""Background flatten jobs: import, snapshot and cp return once the copy is a copy-on-write clone.

A new golden image (or snapshot) ``X`` starts as a clone of ``source@snap``.  Its data never
changes (golden images are never written), so until ``X`` is independent anything that needs
``X@SNAP`` (provision, cp, a disk) is cloned from ``source@snap`` instead: the same bytes
(:func:`pending_source`, used by the Clone step).  A job row (``flatten_job``) says ``X`` still
has to be made independent; a thread in every Einstein worker (:class:`Worker`) claims queued
jobs (and jobs whose owner died: a killed Einstein's flatten resumes in the next worker, librbd
skipping what was already copied up) and runs :func:`complete`: flatten (reporting progress and
polling for cancellation), take ``X@SNAP`` and protect it, drop the job, then collect garbage.

Why ``X@SNAP`` is taken *after* the flatten: a snapshot of a clone keeps its parent link even
after the image head is flattened (measured: ``rbd children`` still lists it, the parent
snapshot cannot be unprotected), so a snapshot taken before would pin the source forever.

Garbage (:func:`collect`): a BMI *transient* snapshot (``<uid>img.t<hex>``, made on an import
source or a node's clone for one copy) is removed once nothing is cloned from it and no running
operation names it; a *doomed* image (BMI's namespace, its row deleted while clones of it still
existed: a node deprovisioned while its snapshot flattened, a golden image removed while a copy of
it flattened) is removed once it has no snapshots left, and then its own parent is collected.

Removing an image whose job runs cancels it (:func:`cancel`: the worker's progress callback sees
``cancelling`` and aborts librbd's flatten), then removes it as usual.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Integer, String, Text, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from ims.common.errors import BMIError, ImageBusy, ImageNotFound, NotFound, ServiceUnavailable, TargetNotFound
from ims.database.models import Base, Operation, utcnow
from ims.einstein.journal import current_owner, owner_alive
from ims.einstein.storage.base import FlattenCancelled

if TYPE_CHECKING:
    from ims.einstein.ops.core import Core

LOG = logging.getLogger(__name__)

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
# Above this virtual size a copy is flattened in the background; at or below it a synchronous
# flatten costs less than the bookkeeping (an 8 MiB image flattens in ~30 ms).


class FlattenJob(Base):
    """A copy still to be made independent of ``source@snap`` (one row per copy)."""

    __tablename__ = "flatten_job"

    image: Mapped[str] = mapped_column(String(128), primary_key=True)   # the copy's storage name
    source: Mapped[str] = mapped_column(String(128), nullable=False)
    snap: Mapped[str] = mapped_column(String(128), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=QUEUED)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# --- configuration ---------------------------------------------------------------------
def max_clone_depth(core: Core) -> int:
    return int(core.cfg.bmi.max_clone_depth)


def depth(core: Core, image: str) -> int:
    """How many clone links lead from ``image`` to an image with no parent."""
    hops = 0
    current: str | None = image
    while current is not None and hops < 64:
        parent = core.storage.parent_info(current)
        if parent is None:
            break
        current, hops = parent[0], hops + 1
    return hops


def use_background(core: Core, source: str) -> bool:
    """Copy ``source`` as a clone flattened later (True), or flatten within the operation (False).

    Synchronous when the driver's clone is already a full copy (file), when the image is small,
    and when the copy would be more than ``[bmi] max_clone_depth`` clone links deep.
    """
    st = core.storage
    if not st.background_flatten:
        return False
    try:
        if st.image_size(source) <= int(core.cfg.bmi.flatten_sync_max_bytes):
            return False
        return depth(core, source) + 1 <= max_clone_depth(core)
    except NotFound:
        return False  # the operation reports the missing image itself, in BMI's names


# --- names -----------------------------------------------------------------------------
def transient_snap(core: Core) -> str:
    """A fresh name for a snapshot BMI takes on a source for one copy (in BMI's reserved namespace)."""
    return f"{core.uid}img.t{uuid.uuid4().hex[:16]}"


def is_transient(core: Core, snap: str) -> bool:
    return snap.startswith(f"{core.uid}img.t")


def _image_id(core: Core, image: str) -> int | None:
    m = re.fullmatch(rf"{re.escape(core.uid)}img(\d+)", image)
    return int(m.group(1)) if m else None


def is_doomed(core: Core, image: str) -> bool:
    """A BMI-namespace image whose row is gone (kept only while clones of it exist)."""
    image_id = _image_id(core, image)
    if image_id is None:
        return False
    with core.journal.connection() as tx:  # perf: plain SQL (ims/database/plain.py): every removal asks
        return not tx.rows("SELECT id FROM image WHERE id = ?", (image_id,))


# --- jobs ------------------------------------------------------------------------------
def enqueue(core: Core, image: str, source: str, snap: str) -> None:
    with core.session() as session:
        if session.get(FlattenJob, image) is None:
            session.add(FlattenJob(image=image, source=source, snap=snap, state=QUEUED))


def job_of(core: Core, image: str) -> dict[str, Any] | None:
    """The pending job of ``image`` (progress included), or None once it is independent."""
    with core.session() as session:
        job = session.get(FlattenJob, image)
        if job is None:
            return None
        pct = 100.0 * job.done / job.total if job.total else 0.0
        return {"image": job.image, "source": job.source, "snap": job.snap, "state": job.state,
                "owner": job.owner, "progress": round(pct, 1), "attempts": job.attempts, "error": job.error}


def pending_source(core: Core, image: str, snap: str) -> tuple[str, str] | None:
    """Where to clone ``image@snap`` from while ``image`` awaits its flatten (its snapshot is not taken yet)."""
    if snap != core.snap:
        return None
    job = job_of(core, image)
    return (job["source"], job["snap"]) if job else None


def cancel(core: Core, image: str, timeout: float = 120.0) -> None:
    """Drop ``image``'s job; a running flatten is told to stop and waited for (idempotent)."""
    deadline = time.monotonic() + timeout
    while True:
        with core.session() as session:
            job = session.get(FlattenJob, image)
            if job is None:
                return
            if job.state in (RUNNING, CANCELLING) and job.owner and owner_alive(job.owner):
                job.state = CANCELLING
            else:
                session.delete(job)
                LOG.info("flatten of %s cancelled", image)
                return
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"image {image} is still being flattened; try again later")
        time.sleep(0.1)


def _progress(core: Core, image: str) -> Callable[[int, int], bool]:
    """A progress callback: records progress at most 4 times a second; True means "stop"."""
    last = [0.0]

    def report(done: int, total: int) -> bool:
        now = time.monotonic()
        if now - last[0] < 0.25 and done < total:
            return False
        last[0] = now
        with core.session() as session:
            job = session.get(FlattenJob, image)
            if job is None or job.state == CANCELLING:
                return True
            job.done, job.total = int(done), int(total)
        return False

    return report


def complete(core: Core, image: str) -> str:
    """Make ``image`` independent and usable as a parent; returns what happened (done/cancelled/retry)."""
    st = core.storage
    with core.session() as session:
        job = session.get(FlattenJob, image)
        if job is None:
            return "gone"
        source, snap = job.source, job.snap
    try:
        if not st.image_exists(image):
            raise ImageNotFound(f"image {image} not found")
        st.flatten_with_progress(image, _progress(core, image))
        if core.snap not in st.list_snapshots(image):
            st.create_snapshot(image, core.snap)
        st.protect_snapshot(image, core.snap)
    except FlattenCancelled:
        with core.session() as session:
            session.execute(delete(FlattenJob).where(FlattenJob.image == image))
        LOG.info("flatten of %s stopped: cancelled", image)
        return "cancelled"
    except ImageNotFound:
        with core.session() as session:  # removed meanwhile (by hand): nothing left to flatten
            session.execute(delete(FlattenJob).where(FlattenJob.image == image))
        collect(core, source, snap)
        return "gone"
    except Exception as exc:  # noqa: BLE001 - anything else: back to the queue, retried with back-off
        LOG.warning("flatten of %s failed (%s); will retry", image, exc)
        with core.session() as session:
            job = session.get(FlattenJob, image)
            if job is not None:
                job.state, job.owner, job.error = QUEUED, None, str(exc)[:2000]
                job.attempts += 1
        return "retry"
    try:  # before the row goes: whoever waits for the job sees the garbage gone too
        collect(core, source, snap)
    except BMIError as exc:
        LOG.warning("after flattening %s, %s@%s could not be cleaned up yet: %s", image, source, snap, exc)
    with core.session() as session:
        session.execute(delete(FlattenJob).where(FlattenJob.image == image))
    LOG.info("flatten of %s done", image)
    return "done"


def _claim(core: Core) -> str | None:
    """Take one runnable job (queued and due, or running under a dead owner); of two racers one wins."""
    me = current_owner()
    now = datetime.now(UTC)
    with core.session() as session:
        rows = session.execute(select(FlattenJob.image, FlattenJob.state, FlattenJob.owner, FlattenJob.attempts,
                                      FlattenJob.updated_at).order_by(FlattenJob.created_at)).all()
    for image, state, owner, attempts, updated in rows:
        if state == QUEUED:
            if attempts:
                stamp = updated if updated.tzinfo else updated.replace(tzinfo=UTC)
                if now - stamp < timedelta(seconds=min(300, 5 * 2 ** min(attempts, 6))):
                    continue  # back off after failures
        elif owner is None or owner_alive(owner):
            continue
        cond = [FlattenJob.image == image, FlattenJob.state == state]
        cond.append(FlattenJob.owner.is_(None) if owner is None else FlattenJob.owner == owner)
        new_state = RUNNING if state != CANCELLING else CANCELLING
        with core.session() as session:
            won = session.execute(update(FlattenJob).where(*cond).values(state=new_state, owner=me))
        if won.rowcount:
            if new_state == CANCELLING:  # its canceller is waiting for it to go away
                with core.session() as session:
                    session.execute(delete(FlattenJob).where(FlattenJob.image == image))
                continue
            if state == RUNNING:
                LOG.warning("resuming the flatten of %s left by dead process %s", image, owner)
            return str(image)
    return None


def run_pending(core: Core) -> int:
    """Run every runnable job now (tests, and the worker loop); returns how many were run."""
    count = 0
    while (image := _claim(core)) is not None:
        complete(core, image)
        count += 1
    return count


class Worker:
    """The thread each Einstein worker runs: claims and completes jobs until ``stop`` is set."""

    def __init__(self, core: Core, stop: threading.Event) -> None:
        self.core = core
        self.stop = stop
        self.poll = float(core.cfg.bmi.flatten_poll_seconds)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                run_pending(self.core)
            except Exception:  # noqa: BLE001 - the loop must survive a database or storage hiccup
                LOG.exception("background flatten failed; retrying")
            self.stop.wait(self.poll)


def start(core: Core, stop: threading.Event) -> threading.Thread | None:
    """Start the background flatten thread (drivers whose clone is already a full copy need none)."""
    if not core.storage.background_flatten:
        return None
    thread = threading.Thread(target=Worker(core, stop).run, name="flatten", daemon=True)
    thread.start()
    return thread


# --- garbage ---------------------------------------------------------------------------
def _named_by_running_op(core: Core, snap: str) -> bool:
    with core.session() as session:
        return session.scalars(select(Operation.id).where(Operation.state == "running",
                                                          Operation.args.contains(snap))).first() is not None


def collect(core: Core, image: str, snap: str | None = None, _hops: int = 0) -> None:
    """Remove what only existed for copies and clones that are gone (see the module docstring).

    With ``snap``: only that snapshot is considered (the one a removed child was cloned from),
    unless ``image`` is doomed. Idempotent; anything still in use is left alone.
    """
    try:
        _collect(core, image, snap, _hops)
    except NotFound as exc:  # best effort: whatever is left is collected at the next removal or by reconcile
        LOG.warning("collecting %s%s: %s", image, f"@{snap}" if snap else "", exc)


def _collect(core: Core, image: str, snap: str | None, _hops: int) -> None:
    st = core.storage
    doomed = is_doomed(core, image)
    if not doomed and (snap is None or not is_transient(core, snap)):
        return
    if _hops > 64 or not st.image_exists(image):
        return
    snaps = st.list_snapshots(image)
    for name in snaps if doomed else [s for s in snaps if s == snap]:
        if not (doomed or is_transient(core, name)) or st.list_children(image, name):
            continue
        if _named_by_running_op(core, name):
            continue
        with contextlib.suppress(NotFound, ImageBusy):
            st.unprotect_snapshot(image, name)
            st.remove_snapshot(image, name)
    if not doomed or st.list_snapshots(image) or job_of(core, image) is not None:
        return
    parent = st.parent_info(image)
    with contextlib.suppress(TargetNotFound):
        if core.iscsi.target_exists(image):
            core.iscsi.remove_target(image)
    try:
        st.remove_image(image)
    except NotFound:
        return
    except ImageBusy as exc:  # watchers: the next removal of a child collects it again
        LOG.warning("could not remove doomed image %s yet: %s", image, exc)
        return
    LOG.info("removed %s: its row was gone and its last clone has left", image)
    if parent is not None:
        collect(core, parent[0], parent[1], _hops + 1)

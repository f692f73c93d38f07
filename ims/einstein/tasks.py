"""Asynchronous operations: submit a mutating verb, get a record at once, follow it to done or failed.

``submit`` checks what the verb itself would check first (its arguments, the names, the caller's
access to the project), so those errors still answer the call; then it writes a ``task`` row
(state ``queued``; the verb's arguments without credentials) and returns the record.  The worker
that accepted the call keeps the credentials in memory only — HIL calls need them — and alone runs
the task, in a thread of its own.

Admission control: a task starts only while fewer than ``[scheduler] max_per_gateway`` tasks run
on its iSCSI gateway and fewer than ``max_per_cluster`` on its storage cluster.  The counts are
global across workers: they are read from the ``task`` table in the same (SQLite: ``BEGIN
IMMEDIATE``, so serialized) transaction that marks a task running.  Queued tasks are ordered
round-robin across projects: the next turn goes to the project served least recently, so one
project's batch of 100 never starves another's single provision (``queue_position`` is the rank
in that order, 1-based).  A worker only starts its own tasks but leaves
room for other workers' tasks that rank ahead of them.

Records, show/list/wait and the fair order live in ims/einstein/task_records.py.
Progress comes from the journal: ``journal.OPERATION_STARTED`` links each journal row the call
opens to the task, and the record shows those rows' steps.

Crash safety: a worker that dies leaves queued tasks that will never start: recovery
(:meth:`Tasks.recover`, after the journal's) marks them failed ("nothing was done"); a running
one takes the outcome of its journal rows (rolled back: failed; done or rolled forward: done).
SIGTERM: :meth:`Tasks.drain` lets queued and running tasks finish up to ``[rpc] drain_seconds``,
then marks the unstarted ones failed.
"""
from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, select, update

from ims.common import names
from ims.common.errors import (
    BMIError,
    InvalidInput,
    ServiceUnavailable,
    to_wire,
)
from ims.database.models import Operation, Task
from ims.database.plain import PlainTx
from ims.einstein.journal import OPERATION_STARTED, current_owner, owner_alive
from ims.einstein.ops.core import Auth, Core, user_of
from ims.einstein.task_records import STATES, TaskRecords, fair_order

__all__ = ["NOT_STARTED", "STATES", "Tasks", "fair_order"]

LOG = logging.getLogger(__name__)

# Verbs that use the iSCSI gateway (and the storage cluster); the others use the cluster only.
GATEWAY_VERBS = frozenset({"provision", "deprovision", "iscsi_create", "iscsi_remove", "provision_disk",
                           "deprovision_disk", "create_disk", "delete_disk"})
CLUSTER_VERBS = frozenset({"create_snapshot", "remove_image", "import_image", "copy_image", "move_image",
                           "export_image"})
SUBMITTABLE = GATEWAY_VERBS | CLUSTER_VERBS
# The kind of name each verb argument holds (validated before queuing, as the verb would).
ARG_KINDS = {"project": "project", "src_project": "project", "dest_project": "project", "node": "node",
             "img": "image", "img1": "image", "img2": "image", "name": "image", "snap_name": "snapshot",
             "snap": "snapshot", "network": "network", "nic": "nic", "disk": "disk"}
MAX_BATCH = 200
# How often a worker with queued tasks re-checks admission (other workers' tasks free slots
# without telling it); its own tasks' ends wake it at once.
POLL_SECONDS = 0.05
# While this worker's own running tasks fill the bounds, their ends wake the scheduler; this is
# only a safety net.
BLOCKED_WAIT_SECONDS = 1.0
NOT_STARTED = "the back-end stopped before it started; nothing was done"


class _Admission(NamedTuple):
    """A queued or running task, as an admission pass reads it."""

    id: int
    project: str
    state: str
    owner: str
    gateway: str | None
    cluster: str


class Tasks(TaskRecords):
    """One per Operations instance (per Einstein worker)."""

    def __init__(self, ops: Any, core: Core) -> None:
        self.ops = ops
        self.core = core
        self.owner = current_owner()
        cfg = core.cfg
        self.gateway = f"iscsi:{cfg.iscsi.ip}:{cfg.iscsi.port}"[:160]
        where = cfg.fs.path if cfg.fs.driver == "file" else f"{cfg.fs.conf_file}:{cfg.fs.pool}"
        self.cluster = f"{cfg.fs.driver}:{where}"[:160]
        # This worker's tasks: queued ones with their credentials (memory only), and running ids.
        self._pending: dict[int, tuple[str, Auth, dict[str, Any]]] = {}
        self._running: set[int] = set()
        self._running_gw: set[int] = set()  # those of them on the gateway (GATEWAY_VERBS)
        self._cond = threading.Condition()
        self._admit_lock = threading.Lock()
        self._scheduler: threading.Thread | None = None
        self._closing = False

    # --- limits ------------------------------------------------------------------
    def _limits(self) -> tuple[int, int]:
        sched = self.core.cfg.scheduler.values
        return int(sched["max_per_gateway"]), int(sched["max_per_cluster"])

    def _alive(self, owners: set[str]) -> dict[str, bool]:
        return {o: o == self.owner or owner_alive(o) for o in owners}

    # --- submit ------------------------------------------------------------------
    def _check(self, auth: Auth, verb: str, kwargs: Any) -> dict[str, Any]:
        """Everything the verb checks before it changes anything that is cheap to check here."""
        if not isinstance(verb, str) or verb not in SUBMITTABLE:
            raise InvalidInput(f"{verb!r} cannot be submitted; use one of {', '.join(sorted(SUBMITTABLE))}")
        if not isinstance(kwargs, dict):
            raise InvalidInput("the arguments of a submitted operation are an object of name: value")
        try:
            inspect.signature(getattr(self.ops, verb)).bind(auth, **kwargs)
        except TypeError as exc:
            raise InvalidInput(f"wrong arguments for {verb}: {exc}") from None
        for key, value in kwargs.items():
            if key in ARG_KINDS and value is not None:
                names.validate_name(value, ARG_KINDS[key])
            elif key not in ARG_KINDS and not isinstance(value, (bool, int, type(None))):
                raise InvalidInput(f"invalid value for {key}")
        user_of(auth)
        return dict(kwargs)

    def _authorize(self, auth: Auth, kwargs: dict[str, Any], seen: set[str]) -> str:
        project = kwargs.get("project", kwargs.get("src_project"))
        for key in ("project", "src_project", "dest_project"):
            value = kwargs.get(key)
            if value is not None and value not in seen:
                self.core.access(auth, value)
                seen.add(value)
        return str(project)

    def submit(self, auth: Auth, verb: str, kwargs: dict[str, Any], wait: Any = None) -> dict[str, Any]:
        """Queue one operation; its record.  ``wait`` (seconds, capped like :meth:`wait`'s): answer once
        it has finished, or after that long with the record as it is then (Picasso's ``Prefer: wait``
        and the legacy API: one call instead of a submit and an ``operation_wait``)."""
        return self.submit_batch(auth, verb, [kwargs], batch=False, wait=wait)[0]

    def submit_batch(self, auth: Auth, verb: str, items: list[dict[str, Any]],
                     batch: bool = True, wait: Any = None) -> list[dict[str, Any]]:
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))):
            raise InvalidInput("invalid wait")
        if not isinstance(items, list) or not items:
            raise InvalidInput("a batch is a non-empty list of operations")
        if len(items) > MAX_BATCH:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH} operations ({len(items)} given)")
        checked, projects, seen, nodes = [], [], set(), set()
        for index, kwargs in enumerate(items):
            try:
                args = self._check(auth, verb, kwargs)
                projects.append(self._authorize(auth, args, seen))
                node = args.get("node")
                if batch and node is not None and verb in ("provision", "deprovision", "provision_disk",
                                                            "deprovision_disk"):
                    if node in nodes:
                        raise InvalidInput(f"node {node} appears twice in the batch")
                    nodes.add(node)
            except BMIError as exc:
                if batch:  # name the item; keep its status (400/401/403/404)
                    exc.message = f"item {index}: {exc.message}"
                    exc.args = (exc.message,)
                raise
            checked.append(args)
        user = user_of(auth)[0][:64]
        gateway = self.gateway if verb in GATEWAY_VERBS else None
        with self.core.journal.connection() as tx:  # perf: plain SQL (ims/database/plain.py)
            now = tx.when(datetime.now(UTC))
            # ("user" is quoted: a reserved word in PostgreSQL)
            ids = [tx.insert('INSERT INTO task (verb, project, "user", args, state, owner, gateway, cluster, '
                             "journal_ops, created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, '[]', ?) RETURNING id",
                             (verb, project, user, json.dumps(args), self.owner, gateway, self.cluster, now))
                   for args, project in zip(checked, projects, strict=True)]
        with self._cond:
            for task_id, args in zip(ids, checked, strict=True):
                self._pending[task_id] = (verb, dict(auth), args)
        LOG.info("%s by %s queued as operation(s) %s", verb, user, ",".join(map(str, ids)))
        # The rows are queued: from here on the call is accepted whatever happens.
        try:
            claimed = self._claim()
        except Exception:  # noqa: BLE001 - e.g. the database briefly locked: the scheduler admits them
            LOG.exception("admitting operation(s) %s at once failed; the scheduler will", ",".join(map(str, ids)))
            claimed = []
        # perf: the tasks that may start now start before their records are read for the answer
        # (queued or running; a very quick one may even be done already)
        self._start(claimed)
        self._ensure_scheduler()
        if wait is not None and len(ids) == 1:
            # perf: no record is read (under the database lock the task's own writes need) until the
            # task ends or the wait does
            self._await_own(ids[0], max(0.0, min(float(wait), self.wait_cap())))
        return self.records(ids)

    # --- scheduling --------------------------------------------------------------
    def _ensure_scheduler(self) -> None:
        with self._cond:
            if self._scheduler is None or not self._scheduler.is_alive():
                self._scheduler = threading.Thread(target=self._schedule_loop, name="task-scheduler", daemon=True)
                self._scheduler.start()
            self._cond.notify_all()

    def _schedule_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
            with self._cond:
                # perf: while this worker's own running tasks already fill the bounds every queued
                # task of its needs, no admission pass can start one (the global counts include
                # them): wait for one of them to end (it notifies) instead of a database pass
                # (a write transaction) every POLL_SECONDS.  Other workers' ends cannot free a
                # slot here, so nothing is missed; the timeout is only a safety net.
                if self._blocked_by_own():
                    self._cond.wait(BLOCKED_WAIT_SECONDS)
                    continue
            try:
                started = self._start(self._claim())
            except Exception:  # noqa: BLE001 - e.g. the database is briefly locked: try again
                LOG.exception("admitting queued operations failed")
                started = 0
            if not started:
                with self._cond:
                    self._cond.wait(POLL_SECONDS)

    def _blocked_by_own(self) -> bool:
        """True when this worker's running tasks alone reach the bound each of its queued tasks
        needs (call with ``_cond`` held): an admission pass would start none of them.  All of this
        worker's tasks are on its cluster; the gateway verbs' also on its gateway."""
        if not self._pending:
            return False
        max_gw, max_cl = self._limits()
        if len(self._running) >= max_cl:
            return True
        if len(self._running_gw) < max_gw:
            return False
        return all(verb in GATEWAY_VERBS for verb, _auth, _kwargs in self._pending.values())

    def _claim(self) -> list[tuple[int, str, Auth, dict[str, Any]]]:
        """Mark running this worker's queued tasks that the bounds and the fair order let start now."""
        if not self._pending:
            return []
        max_gw, max_cl = self._limits()
        with self._admit_lock:
            to_start: list[int] = []
            # perf: plain SQL (ims/database/plain.py): every submit and admission pass runs this
            with self.core.journal.connection() as tx:
                tx.exclusive("bmi-task-admission")  # PostgreSQL: one admission at a time, like SQLite
                rows = [_Admission(*r) for r in tx.rows("SELECT id, project, state, owner, gateway, cluster FROM task "
                                                        "WHERE state IN ('queued', 'running')")]
                alive = self._alive({r.owner for r in rows})
                run_gw: dict[str, int] = {}
                run_cl: dict[str, int] = {}
                queued, info = [], {}
                for r in rows:
                    if not alive[r.owner]:
                        continue
                    if r.state == "running":
                        if r.gateway:
                            run_gw[r.gateway] = run_gw.get(r.gateway, 0) + 1
                        run_cl[r.cluster] = run_cl.get(r.cluster, 0) + 1
                    else:
                        queued.append((r.id, r.project))
                        info[r.id] = r
                for task_id in fair_order(queued, self._last_started(tx, queued)):
                    r = info[task_id]
                    if (r.gateway and run_gw.get(r.gateway, 0) >= max_gw) or run_cl.get(r.cluster, 0) >= max_cl:
                        continue
                    if r.gateway:
                        run_gw[r.gateway] = run_gw.get(r.gateway, 0) + 1
                    run_cl[r.cluster] = run_cl.get(r.cluster, 0) + 1
                    # Another worker's task keeps its slot: that worker starts it on its next look.
                    if r.owner == self.owner and task_id in self._pending:
                        to_start.append(task_id)
                if to_start:
                    tx.run(f"UPDATE task SET state = 'running', started_at = ? WHERE id IN "
                           f"({', '.join('?' * len(to_start))}) AND state = 'queued'",
                           [tx.when(datetime.now(UTC)), *to_start])
            claimed = []
            with self._cond:
                for task_id in to_start:
                    verb, auth, kwargs = self._pending.pop(task_id)
                    self._running.add(task_id)
                    if verb in GATEWAY_VERBS:
                        self._running_gw.add(task_id)
                    claimed.append((task_id, verb, auth, kwargs))
        return claimed

    def _start(self, claimed: list[tuple[int, str, Auth, dict[str, Any]]]) -> int:
        for task_id, verb, auth, kwargs in claimed:
            threading.Thread(target=self._run, args=(task_id, verb, auth, kwargs), name=f"task-{task_id}",
                             daemon=True).start()
        return len(claimed)

    def _link(self, task_id: int, tx: PlainTx, op_id: int) -> None:
        """Record that the call of task ``task_id`` opened journal row ``op_id`` (same transaction)."""
        linked = tx.rows("SELECT journal_ops FROM task WHERE id = ?", (task_id,))
        if linked:
            tx.run("UPDATE task SET journal_ops = ? WHERE id = ?",
                   (json.dumps([*json.loads(linked[0][0] or "[]"), op_id]), task_id))

    def _run(self, task_id: int, verb: str, auth: Auth, kwargs: dict[str, Any]) -> None:
        token = OPERATION_STARTED.set(lambda session, op_id: self._link(task_id, session, op_id))
        started = time.monotonic()
        result: Any = None
        error: dict[str, Any] | None = None
        try:
            result = getattr(self.ops, verb)(auth, **kwargs)
        except BMIError as exc:
            error = exc.to_dict()
        except Exception as exc:
            LOG.exception("operation %d (%s) crashed", task_id, verb)
            error = to_wire(exc)
        finally:
            OPERATION_STARTED.reset(token)
            del auth  # the credentials go with the task
        try:
            self._finish(task_id, result, error)
        finally:
            with self._cond:
                self._running.discard(task_id)
                self._running_gw.discard(task_id)
                self._cond.notify_all()
        LOG.info("operation %d (%s) %s in %.0f ms%s", task_id, verb, "failed" if error else "done",
                 (time.monotonic() - started) * 1000, f": {error['message']}" if error else "")

    def _finish(self, task_id: int, result: Any, error: dict[str, Any] | None) -> None:
        try:
            result_json = json.dumps(result)
        except (TypeError, ValueError):
            result_json = json.dumps(str(result))
        with self.core.journal.connection() as tx:  # plain SQL (ims/database/plain.py): once per operation
            tx.run("UPDATE task SET state = ?, result = ?, error = ?, finished_at = ? WHERE id = ?",
                   ("failed" if error else "done", None if error else result_json,
                    json.dumps(error) if error else None, tx.when(datetime.now(UTC)), task_id))

    # --- crash safety ----------------------------------------------------------------
    def recover(self, keep_days: float = 30.0) -> dict[str, list[int]]:
        """Settle the tasks of dead workers (after the journal finished their rows)."""
        summary: dict[str, list[int]] = {"not_started": [], "done": [], "failed": []}
        with self.core.session() as session:
            rows = session.execute(select(Task.id, Task.state, Task.owner, Task.journal_ops)
                                   .where(Task.state.in_(("queued", "running")))).all()
        alive = self._alive({r.owner for r in rows})
        for r in rows:
            if alive[r.owner]:
                continue
            if r.state == "queued":
                self._settle(r.id, None, ServiceUnavailable(NOT_STARTED).to_dict())
                summary["not_started"].append(r.id)
                continue
            outcome = self._journal_outcome(json.loads(r.journal_ops or "[]"))
            if outcome == "pending":
                continue  # the journal has not finished it yet: the next recovery looks again
            if outcome == "done":
                self._settle(r.id, None, None)
                summary["done"].append(r.id)
            else:
                self._settle(r.id, None, ServiceUnavailable(outcome).to_dict())
                summary["failed"].append(r.id)
        cutoff = datetime.now(UTC) - timedelta(days=keep_days)
        with self.core.session() as session:
            session.execute(delete(Task).where(Task.state.in_(("done", "failed")), Task.finished_at < cutoff))
        if any(summary.values()):
            LOG.warning("operations of stopped workers: %s", {k: v for k, v in summary.items() if v})
        return summary

    def _journal_outcome(self, op_ids: list[int]) -> str:
        """'done', 'pending', or the failure message of a running task whose worker died."""
        if not op_ids:
            return "the back-end stopped while it ran, before it changed anything; nothing was done"
        with self.core.session() as session:
            ops = list(session.scalars(select(Operation).where(Operation.id.in_(op_ids))))
        states = {op.state for op in ops}
        if "running" in states or any(op.state == "failed" and not op.committed for op in ops):
            return "pending"
        if "rolled_back" in states:
            return "the back-end stopped while it ran; its changes were rolled back: nothing was done"
        return "done"  # done, rolled forward, or committed and left for the journal to complete

    def _settle(self, task_id: int, result: Any, error: dict[str, Any] | None, only_queued: bool = False) -> None:
        with self.core.session() as session:
            query = update(Task).where(Task.id == task_id, Task.state.in_(
                ("queued",) if only_queued else ("queued", "running")))
            session.execute(query.values(state="failed" if error else "done", result=json.dumps(result),
                                         error=json.dumps(error) if error else None,
                                         finished_at=datetime.now(UTC)))

    def drain(self, timeout: float) -> bool:
        """Let this worker's tasks finish for up to ``timeout`` s; fail the ones that never started.

        True when none is left running."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending and not self._running, max(0.0, timeout))
        with self._admit_lock, self._cond:  # never while _claim is taking one of them
            unstarted = list(self._pending)
            self._pending.clear()
            running = bool(self._running)
        for task_id in unstarted:
            self._settle(task_id, None, ServiceUnavailable(NOT_STARTED).to_dict(), only_queued=True)
        if unstarted:
            LOG.error("stopping: %d queued operation(s) never started and were marked failed", len(unstarted))
        return not running

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

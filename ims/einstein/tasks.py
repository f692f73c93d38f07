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
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ims.common import names
from ims.common.errors import (
    BMIError,
    InvalidInput,
    OperationNotFound,
    ServiceUnavailable,
    to_wire,
)
from ims.database import exclusive
from ims.database.models import Operation, Task
from ims.einstein.journal import OPERATION_STARTED, current_owner, owner_alive
from ims.einstein.ops.core import Auth, Core, user_of

LOG = logging.getLogger(__name__)

# Verbs that use the iSCSI gateway (and the storage cluster); the others use the cluster only.
GATEWAY_VERBS = frozenset({"provision", "deprovision", "iscsi_create", "iscsi_remove", "provision_disk",
                           "deprovision_disk", "create_disk", "delete_disk"})
CLUSTER_VERBS = frozenset({"create_snapshot", "remove_image", "import_image", "copy_image", "move_image",
                           "export_image"})
SUBMITTABLE = GATEWAY_VERBS | CLUSTER_VERBS
STATES = ("queued", "running", "done", "failed")
# Roughly how many journal steps each verb records: progress while running (capped below 100).
EXPECTED_STEPS = {"provision": 5, "deprovision": 5, "create_snapshot": 6, "import_image": 4, "copy_image": 4,
                  "move_image": 2, "export_image": 3, "remove_image": 3, "create_disk": 3, "delete_disk": 3,
                  "provision_disk": 3, "deprovision_disk": 3, "iscsi_create": 1, "iscsi_remove": 1}
# The kind of name each verb argument holds (validated before queuing, as the verb would).
ARG_KINDS = {"project": "project", "src_project": "project", "dest_project": "project", "node": "node",
             "img": "image", "img1": "image", "img2": "image", "name": "image", "snap_name": "snapshot",
             "snap": "snapshot", "network": "network", "nic": "nic", "disk": "disk"}
MAX_BATCH = 200
MAX_LIST = 200
WAIT_CAP_SECONDS = 30.0
# How often a worker with queued tasks re-checks admission (other workers' tasks free slots
# without telling it); its own tasks' ends wake it at once.
POLL_SECONDS = 0.05
NOT_STARTED = "the back-end stopped before it started; nothing was done"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _aware(value).isoformat()  # SQLite returns naive datetimes: they are UTC


def fair_order(queued: Iterable[tuple[int, str]], last_started: dict[str, Any]) -> list[int]:
    """Ids of queued tasks ``(id, project)`` in the order they may start: round-robin by project.

    The next turn goes to the project served least recently (``last_started``: when its latest
    task started; projects never served first, then by their oldest queued task), which gives
    its oldest queued task and goes to the back of the round.
    """
    per_project: dict[str, list[int]] = {}
    for task_id, project in sorted(queued):
        per_project.setdefault(project, []).append(task_id)
    # (0, rank) for never served, (1, time) for served ones; then the oldest queued id.
    turn: dict[str, tuple[Any, ...]] = {}
    for project, ids in per_project.items():
        last = last_started.get(project)
        turn[project] = (0, ids[0]) if last is None else (1, _aware(last), ids[0])
    order: list[int] = []
    served = 0
    while per_project:
        project = min(per_project, key=lambda p: turn[p])
        ids = per_project[project]
        order.append(ids.pop(0))
        if not ids:
            del per_project[project]
        served += 1
        turn[project] = (2, served)
    return order


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Tasks:
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
        self._cond = threading.Condition()
        self._admit_lock = threading.Lock()
        self._scheduler: threading.Thread | None = None
        self._closing = False

    # --- limits ------------------------------------------------------------------
    def _limits(self) -> tuple[int, int]:
        sched = self.core.cfg.scheduler.values
        return int(sched["max_per_gateway"]), int(sched["max_per_cluster"])

    def wait_cap(self) -> float:
        return min(WAIT_CAP_SECONDS, float(self.core.cfg.rpc.timeout) / 2)

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

    def submit(self, auth: Auth, verb: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.submit_batch(auth, verb, [kwargs], batch=False)[0]

    def submit_batch(self, auth: Auth, verb: str, items: list[dict[str, Any]],
                     batch: bool = True) -> list[dict[str, Any]]:
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
        with self.core.session() as session:
            rows = [Task(verb=verb, project=project, user=user, args=json.dumps(args), state="queued",
                         owner=self.owner, gateway=gateway, cluster=self.cluster)
                    for args, project in zip(checked, projects, strict=True)]
            session.add_all(rows)
            session.flush()
            ids = [row.id for row in rows]
        with self._cond:
            for task_id, args in zip(ids, checked, strict=True):
                self._pending[task_id] = (verb, dict(auth), args)
        LOG.info("%s by %s queued as operation(s) %s", verb, user, ",".join(map(str, ids)))
        claimed = self._claim()
        try:
            records = self.records(ids)  # as accepted: queued or running, never already finished
        finally:
            self._start(claimed)
            self._ensure_scheduler()
        return records

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
            try:
                started = self._start(self._claim())
            except Exception:  # noqa: BLE001 - e.g. the database is briefly locked: try again
                LOG.exception("admitting queued operations failed")
                started = 0
            if not started:
                with self._cond:
                    self._cond.wait(POLL_SECONDS)

    def _claim(self) -> list[tuple[int, str, Auth, dict[str, Any]]]:
        """Mark running this worker's queued tasks that the bounds and the fair order let start now."""
        if not self._pending:
            return []
        max_gw, max_cl = self._limits()
        with self._admit_lock:
            to_start: list[int] = []
            with self.core.session() as session:
                exclusive(session, "bmi-task-admission")  # PostgreSQL: one admission at a time, like SQLite
                rows = session.execute(select(Task.id, Task.project, Task.state, Task.owner, Task.gateway,
                                              Task.cluster).where(Task.state.in_(("queued", "running")))).all()
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
                for task_id in fair_order(queued, self._last_started(session, queued)):
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
                    session.execute(update(Task).where(Task.id.in_(to_start), Task.state == "queued")
                                    .values(state="running", started_at=datetime.now(UTC)))
            claimed = []
            with self._cond:
                for task_id in to_start:
                    verb, auth, kwargs = self._pending.pop(task_id)
                    self._running.add(task_id)
                    claimed.append((task_id, verb, auth, kwargs))
        return claimed

    def _start(self, claimed: list[tuple[int, str, Auth, dict[str, Any]]]) -> int:
        for task_id, verb, auth, kwargs in claimed:
            threading.Thread(target=self._run, args=(task_id, verb, auth, kwargs), name=f"task-{task_id}",
                             daemon=True).start()
        return len(claimed)

    @staticmethod
    def _last_started(session: Session, queued: list[tuple[int, str]]) -> dict[str, Any]:
        projects = sorted({p for _i, p in queued})
        if not projects:
            return {}
        rows = session.execute(select(Task.project, func.max(Task.started_at)).where(Task.project.in_(projects))
                               .group_by(Task.project)).all()
        return {project: last for project, last in rows if last is not None}

    def _alive(self, owners: set[str]) -> dict[str, bool]:
        return {o: o == self.owner or owner_alive(o) for o in owners}

    def _link(self, task_id: int, session: Session, op_id: int) -> None:
        """Record that the call of task ``task_id`` opened journal row ``op_id`` (same transaction)."""
        task = session.get(Task, task_id)
        if task is not None:
            task.journal_ops = json.dumps([*json.loads(task.journal_ops or "[]"), op_id])

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
                self._cond.notify_all()
        LOG.info("operation %d (%s) %s in %.0f ms%s", task_id, verb, "failed" if error else "done",
                 (time.monotonic() - started) * 1000, f": {error['message']}" if error else "")

    def _finish(self, task_id: int, result: Any, error: dict[str, Any] | None) -> None:
        try:
            result_json = json.dumps(result)
        except (TypeError, ValueError):
            result_json = json.dumps(str(result))
        with self.core.session() as session:
            session.execute(update(Task).where(Task.id == task_id).values(
                state="failed" if error else "done", result=None if error else result_json,
                error=json.dumps(error) if error else None, finished_at=datetime.now(UTC)))

    # --- records -----------------------------------------------------------------
    def _positions(self, session: Session) -> dict[int, int]:
        rows = session.execute(select(Task.id, Task.project, Task.state, Task.owner)
                               .where(Task.state.in_(("queued", "running")))).all()
        alive = self._alive({r.owner for r in rows})
        queued = [(r.id, r.project) for r in rows if r.state == "queued" and alive[r.owner]]
        order = fair_order(queued, self._last_started(session, queued))
        return {task_id: pos for pos, task_id in enumerate(order, start=1)}

    def _record(self, task: Task, positions: dict[int, int], ops: dict[int, Operation]) -> dict[str, Any]:
        steps: list[dict[str, Any]] = []
        for op_id in json.loads(task.journal_ops or "[]"):
            op = ops.get(op_id)
            if op is not None:
                steps.extend(json.loads(op.steps or "[]"))
        done = [s for s in steps if s.get("state") == "done"]
        if task.state == "done":
            progress = 100
        elif task.state == "running":
            progress = min(95, len(done) * 100 // max(1, EXPECTED_STEPS.get(task.verb, 4)))
        else:
            progress = 0
        return {"id": task.id, "verb": task.verb, "project": task.project, "args": json.loads(task.args),
                "user": task.user, "state": task.state,
                "queue_position": positions.get(task.id) if task.state == "queued" else None,
                "progress": progress, "steps_done": len(done), "step": steps[-1]["name"] if steps else None,
                "result": json.loads(task.result) if task.result is not None and task.state == "done" else None,
                "error": json.loads(task.error) if task.error else None,
                "created_at": _iso(task.created_at), "started_at": _iso(task.started_at),
                "finished_at": _iso(task.finished_at)}

    def _records_of(self, session: Session, tasks: list[Task]) -> list[dict[str, Any]]:
        positions = self._positions(session) if any(t.state == "queued" for t in tasks) else {}
        op_ids = {i for t in tasks for i in json.loads(t.journal_ops or "[]")}
        ops = {op.id: op for op in session.scalars(select(Operation).where(Operation.id.in_(op_ids)))} \
            if op_ids else {}
        return [self._record(t, positions, ops) for t in tasks]

    def records(self, ids: list[int]) -> list[dict[str, Any]]:
        with self.core.session() as session:
            tasks = {t.id: t for t in session.scalars(select(Task).where(Task.id.in_(ids)))}
            return self._records_of(session, [tasks[i] for i in ids if i in tasks])

    # --- reading (tenant-scoped) ---------------------------------------------------
    def _visible(self, auth: Auth, project: str, admin: list[bool | None]) -> bool:
        """May ``auth`` see operations of ``project``?  Bad credentials raise 401; ``admin`` caches."""
        try:
            self.core.access(auth, project)
            return True
        except BMIError as exc:
            if exc.status not in (401, 403, 404):
                raise
        if admin[0] is None:
            self.core.net(auth).authenticate()  # wrong credentials: 401, whatever the operation
            try:
                self.core.admin(auth)
                admin[0] = True
            except BMIError:
                admin[0] = False
        return bool(admin[0])

    def _op_id(self, op_id: Any) -> int:
        if isinstance(op_id, bool) or not isinstance(op_id, (int, str)):
            raise InvalidInput("invalid operation id")
        try:
            value = int(op_id)
        except ValueError:
            raise InvalidInput("invalid operation id") from None
        if not 0 < value < 2**63:
            raise InvalidInput("invalid operation id")
        return value

    def show(self, auth: Auth, op_id: Any) -> dict[str, Any]:
        task_id = self._op_id(op_id)
        user_of(auth)
        with self.core.session() as session:
            task = session.get(Task, task_id)
            project = task.project if task is not None else None
        if project is None:
            self.core.net(auth).authenticate()
            raise OperationNotFound(f"operation {task_id} not found")
        if not self._visible(auth, project, [None]):
            raise OperationNotFound(f"operation {task_id} not found")
        return self.records([task_id])[0]

    def list(self, auth: Auth, state: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise InvalidInput(f"invalid state {state!r}: use one of {', '.join(STATES)}")
        user_of(auth)
        query = select(Task).order_by(Task.id.desc()).limit(MAX_LIST)
        if state is not None:
            query = query.where(Task.state == state)
        if project is not None:
            names.validate_name(project, "project")
            query = query.where(Task.project == project)
        with self.core.session() as session:
            tasks = list(session.scalars(query))
        admin: list[bool | None] = [None]
        allowed = {p: self._visible(auth, p, admin) for p in sorted({t.project for t in tasks})}
        if not tasks:
            self.core.net(auth).authenticate()
        with self.core.session() as session:
            return self._records_of(session, [t for t in tasks if allowed[t.project]])

    def wait(self, auth: Auth, op_id: Any, timeout: Any = 20.0) -> dict[str, Any]:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise InvalidInput("invalid timeout")
        record = self.show(auth, op_id)
        deadline = time.monotonic() + max(0.0, min(float(timeout), self.wait_cap()))
        pause = 0.005
        while record["state"] not in ("done", "failed"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # This worker's own tasks wake it the moment they end; another worker's are polled,
            # soon at first (most operations take tens of ms), then every 0.1 s.
            with self._cond:
                local = record["id"] in self._running or record["id"] in self._pending
                self._cond.wait(min(left, 1.0 if local else pause))
            pause = min(0.1, pause * 2)
            record = self.records([record["id"]])[0]
        return record

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

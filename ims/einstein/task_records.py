"""The read side of asynchronous operations (ims/einstein/tasks.py): records, queue positions,
tenant-scoped show / list, and waiting for an operation to end.

Split from tasks.py to keep modules small; :class:`Tasks` inherits :class:`TaskRecords`.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ims.common import names
from ims.common.errors import BMIError, InvalidInput, OperationNotFound
from ims.database.plain import PlainTx
from ims.einstein.ops.core import Auth, Core, user_of

STATES = ("queued", "running", "done", "failed")
# What a record shows of a task row ("user" quoted: a reserved word in PostgreSQL); the datetimes last.
_TASK_COLUMNS = ('id, verb, project, args, "user", state, result, error, journal_ops, created_at, started_at, '
                 "finished_at")


class _TaskRow(NamedTuple):
    id: int
    verb: str
    project: str
    args: str
    user: str
    state: str
    result: str | None
    error: str | None
    journal_ops: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


# Roughly how many journal steps each verb records: progress while running (capped below 100).
EXPECTED_STEPS = {"provision": 5, "deprovision": 5, "create_snapshot": 6, "import_image": 4, "copy_image": 4,
                  "move_image": 2, "export_image": 3, "remove_image": 3, "create_disk": 3, "delete_disk": 3,
                  "provision_disk": 3, "deprovision_disk": 3, "iscsi_create": 1, "iscsi_remove": 1}
MAX_LIST = 200
WAIT_CAP_SECONDS = 30.0


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


class TaskRecords:
    """Records and reads of the ``task`` table; the state it needs is set by :class:`Tasks`."""

    core: Core
    owner: str
    _cond: threading.Condition
    _running: set[int]
    _pending: dict[int, Any]

    def wait_cap(self) -> float:
        return min(WAIT_CAP_SECONDS, float(self.core.cfg.rpc.timeout) / 2)

    @staticmethod
    def _last_started(tx: PlainTx, queued: list[tuple[int, str]]) -> dict[str, Any]:
        """When each project of ``queued`` last had a task started (plain SQL, ims/database/plain.py)."""
        projects = sorted({p for _i, p in queued})
        if not projects:
            return {}
        # perf: one max() per project, which the (project, started_at) index answers with one seek; a
        # GROUP BY over the projects walks every task each one has kept (30 days of them), and this
        # runs in every admission pass, under the database's write lock
        one = "SELECT ?, (SELECT max(started_at) FROM task WHERE project = ?)"
        rows = tx.rows(" UNION ALL ".join([one] * len(projects)), [x for p in projects for x in (p, p)])
        return {str(project): tx.datetime(last) for project, last in rows if last is not None}

    def _alive(self, owners: set[str]) -> dict[str, bool]:
        raise NotImplementedError  # Tasks._alive (tasks.py)

    # --- records -----------------------------------------------------------------
    # perf: records are read with plain SQL (ims/database/plain.py): every operation's answer reads one
    def _positions(self, tx: PlainTx) -> dict[int, int]:
        rows = tx.rows("SELECT id, project, state, owner FROM task WHERE state IN ('queued', 'running')")
        alive = self._alive({owner for _i, _p, _s, owner in rows})
        queued = [(task_id, project) for task_id, project, state, owner in rows if state == "queued" and alive[owner]]
        order = fair_order(queued, self._last_started(tx, queued))
        return {task_id: pos for pos, task_id in enumerate(order, start=1)}

    @staticmethod
    def _tasks(tx: PlainTx, where: str, params: Iterable[Any], tail: str = "") -> list[_TaskRow]:
        rows = tx.rows(f"SELECT {_TASK_COLUMNS} FROM task WHERE {where}{tail}", tuple(params))
        return [_TaskRow(*r[:9], *(tx.datetime(v) for v in r[9:])) for r in rows]

    def _record(self, task: _TaskRow, positions: dict[int, int], ops: dict[int, str]) -> dict[str, Any]:
        steps: list[dict[str, Any]] = []
        for op_id in json.loads(task.journal_ops or "[]"):
            if op_id in ops:
                steps.extend(json.loads(ops[op_id] or "[]"))
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

    def _records_of(self, tx: PlainTx, tasks: list[_TaskRow]) -> list[dict[str, Any]]:
        positions = self._positions(tx) if any(t.state == "queued" for t in tasks) else {}
        op_ids = sorted({int(i) for t in tasks for i in json.loads(t.journal_ops or "[]")})
        ops = {int(op_id): steps for op_id, steps in tx.rows(
            f"SELECT id, steps FROM operation WHERE id IN ({', '.join('?' * len(op_ids))})", op_ids)} \
            if op_ids else {}
        return [self._record(t, positions, ops) for t in tasks]

    def records(self, ids: list[int]) -> list[dict[str, Any]]:
        if not ids:
            return []
        with self.core.journal.connection() as tx:
            tasks = {t.id: t for t in self._tasks(tx, f"id IN ({', '.join('?' * len(ids))})", ids)}
            return self._records_of(tx, [tasks[i] for i in ids if i in tasks])

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
        with self.core.journal.connection() as tx:  # one read: the record is only returned once visible
            found = self._tasks(tx, "id = ?", (task_id,))
            project = found[0].project if found else None
            record = self._records_of(tx, found)[0] if found else None
        if project is None or record is None:
            self.core.net(auth).authenticate()
            raise OperationNotFound(f"operation {task_id} not found")
        if not self._visible(auth, project, [None]):
            raise OperationNotFound(f"operation {task_id} not found")
        return record

    def list(self, auth: Auth, state: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise InvalidInput(f"invalid state {state!r}: use one of {', '.join(STATES)}")
        user_of(auth)
        where, params = ["1 = 1"], []
        if state is not None:
            where, params = [*where, "state = ?"], [*params, state]
        if project is not None:
            names.validate_name(project, "project")
            where, params = [*where, "project = ?"], [*params, project]
        with self.core.journal.connection() as tx:
            tasks = self._tasks(tx, " AND ".join(where), [*params, MAX_LIST], " ORDER BY id DESC LIMIT ?")
        admin: list[bool | None] = [None]
        allowed = {p: self._visible(auth, p, admin) for p in sorted({t.project for t in tasks})}
        if not tasks:
            self.core.net(auth).authenticate()
        with self.core.journal.connection() as tx:
            return self._records_of(tx, [t for t in tasks if allowed[t.project]])

    def wait(self, auth: Auth, op_id: Any, timeout: Any = 20.0) -> dict[str, Any]:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise InvalidInput("invalid timeout")
        task_id = self._op_id(op_id)
        user_of(auth)
        # perf: the record (its steps, and a queued one's position among every queued task) is built
        # once, when the wait ends; meanwhile only the state is read.  Visibility is checked first,
        # exactly as show() does: another tenant's operation is "not found" without waiting.
        state = self._state(task_id)
        if state is None or not self._visible(auth, state[1], [None]):
            if state is None:
                self.core.net(auth).authenticate()
            raise OperationNotFound(f"operation {task_id} not found")
        deadline = time.monotonic() + max(0.0, min(float(timeout), self.wait_cap()))
        pause = 0.005
        while state is not None and state[0] not in ("done", "failed"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # This worker's own tasks wake it the moment they end; another worker's are polled,
            # soon at first (most operations take tens of ms), then every 0.1 s.
            ended = self._await_own(task_id, min(left, 1.0), otherwise=min(left, pause))
            if ended:
                # perf: this worker's own task ended; its row was written before it left _running: the
                # record below reads it (no state read first)
                break
            pause = min(0.1, pause * 2)
            state = self._state(task_id)
        records = self.records([task_id])
        if not records:  # removed meanwhile (kept days, so only by an administrator)
            raise OperationNotFound(f"operation {task_id} not found")
        return records[0]

    def _await_own(self, task_id: int, seconds: float, otherwise: float = 0.0) -> bool:
        """Wait up to ``seconds`` for this worker's task ``task_id`` to end (True once it has: its row
        is written before it leaves ``_running``).  Another worker's task: False after ``otherwise``
        seconds (the caller polls its row)."""
        with self._cond:
            if task_id in self._running or task_id in self._pending:
                # perf: wake for THIS task's end only; every task's end (and every submit) notifies
                # the condition, and 50 waiters re-reading the database each time contend for it
                return self._cond.wait_for(lambda: task_id not in self._running and task_id not in self._pending,
                                           seconds)
            if otherwise > 0:
                self._cond.wait(otherwise)
            return False

    def _state(self, task_id: int) -> tuple[str, str] | None:
        """``(state, project)`` of a task, None if there is none: one narrow read."""
        with self.core.journal.connection() as tx:
            rows = tx.rows("SELECT state, project FROM task WHERE id = ?", (task_id,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

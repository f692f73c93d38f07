"""All-or-nothing operations and cross-process locks, both kept in the database.

An operation records each step *before* running it, together with how to undo it
(a registered undo name plus JSON parameters, never a secret).  If a step fails,
the completed (and the interrupted) steps are undone in reverse order; every undo
is idempotent, so undoing a step that never really happened is harmless.  Once an
operation passes its *commit point* (e.g. the source snapshot of an import is
being removed) it can no longer go back; from there a failure is finished by the
operation kind's idempotent *forward* function instead.

If the process dies mid-way, the journal row stays ``running`` with an owner whose
pid is gone; :meth:`Journal.recover` (run by Einstein before it serves) rolls such
operations back, or forward when committed, and clears their locks.

Locks are rows in ``lock`` (primary key = lock name): taking one is an INSERT, so
two processes racing for a node get exactly one winner; the loser gets NodeBusy
(409).  A lock whose owner process is dead is taken over.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ims.common.errors import BMIError, InternalError, NodeBusy
from ims.database.models import Lock, Operation

LOG = logging.getLogger(__name__)
T = TypeVar("T")

UndoFn = Callable[[dict[str, Any], "RecoveryContext"], None]
ForwardFn = Callable[[dict[str, Any], "RecoveryContext"], None]


def _proc_start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            data = fh.read()
        return data.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def current_owner() -> str:
    """``host:pid:starttime`` of this process (start time guards against pid reuse)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start_time(pid)}"


def owner_alive(owner: str) -> bool:
    """False only when the owner is a process on this host that no longer exists."""
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # another host's process: not ours to judge
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start == "?" or fields[19] == start


@dataclass
class RecoveryContext:
    """What undo/forward functions may use; ``net`` is None when no HIL credentials are at hand."""

    net: Any = None
    notes: list[str] = field(default_factory=list)


class Tx:
    """One running operation; created by :meth:`Journal.operation`."""

    def __init__(self, journal: Journal, op_id: int, kind: str, args: dict[str, Any],
                 ctx: RecoveryContext) -> None:
        self.journal = journal
        self.op_id = op_id
        self.kind = kind
        self.args = args
        self.ctx = ctx
        self.steps: list[dict[str, Any]] = []
        self.committed = False

    def _save(self, session: Session, **extra: Any) -> None:
        op = session.get(Operation, self.op_id)
        if op is None:
            raise InternalError(f"journal row {self.op_id} vanished")
        op.steps = json.dumps(self.steps)
        op.committed = self.committed
        for key, value in extra.items():
            setattr(op, key, value)

    def step(self, name: str, do: Callable[[], T], undo: tuple[str, dict[str, Any]] | None = None) -> T:
        """Record ``name`` (with its undo) durably, then run ``do``."""
        entry = {"name": name, "undo": list(undo) if undo else None, "state": "started"}
        self.steps.append(entry)
        with self.journal.session() as session:
            self._save(session)
        self.journal.fault(name, "before")
        result = do()
        self.journal.fault(name, "after")
        entry["state"] = "done"
        with self.journal.session() as session:
            self._save(session)
        return result

    def db_step(self, name: str, do: Callable[[Session], T],
                undo: Callable[[T], tuple[str, dict[str, Any]] | None]) -> T:
        """Run a database change and record it (and its undo) in the same transaction."""
        self.journal.fault(name, "before")
        with self.journal.session() as session:
            result = do(session)
            spec = undo(result)
            self.steps.append({"name": name, "undo": list(spec) if spec else None, "state": "done"})
            self._save(session)
        self.journal.fault(name, "after")
        return result

    def commit_point(self) -> None:
        """From here on a failure is finished forward, not rolled back."""
        self.committed = True
        with self.journal.session() as session:
            self._save(session)
        self.journal.fault("commit", "after")


class Journal:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self.undo_registry: dict[str, UndoFn] = {}
        self.forward_registry: dict[str, ForwardFn] = {}
        # Tests set this to inject failures: hook(step_name, "before"|"after").
        self.fault_hook: Callable[[str, str], None] | None = None

    # --- plumbing -------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    def fault(self, name: str, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(name, phase)

    def register_undo(self, name: str, fn: UndoFn) -> None:
        self.undo_registry[name] = fn

    def register_forward(self, kind: str, fn: ForwardFn) -> None:
        self.forward_registry[kind] = fn

    # --- locks ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, names: list[str], purpose: str) -> Iterator[None]:
        """Hold every lock in ``names`` (all or none) for the duration; NodeBusy (409) if taken."""
        owner = current_owner()
        names = sorted(set(names))
        self._acquire(names, owner, purpose)
        try:
            yield
        finally:
            with self.session() as session:
                session.execute(delete(Lock).where(Lock.name.in_(names), Lock.owner == owner))

    def _acquire(self, names: list[str], owner: str, purpose: str) -> None:
        for attempt in range(2):
            try:
                with self.session() as session:
                    for name in names:
                        session.add(Lock(name=name, owner=owner, purpose=purpose))
                return
            except IntegrityError:
                with self.session() as session:
                    held = session.scalars(select(Lock).where(Lock.name.in_(names))).all()
                    stale = [lk.name for lk in held if not owner_alive(lk.owner)]
                    live = [lk for lk in held if owner_alive(lk.owner)]
                    if stale:
                        session.execute(delete(Lock).where(Lock.name.in_(stale)))
                if live or attempt == 1:
                    what = live[0] if live else None
                    label = what.name.split(":", 1)[-1] if what else names[0]
                    doing = f" ({what.purpose} in progress)" if what else ""
                    raise NodeBusy(f"{label} is busy{doing}; try again when it has finished") from None

    # --- operations -----------------------------------------------------------
    @contextlib.contextmanager
    def operation(self, kind: str, args: dict[str, Any], ctx: RecoveryContext | None = None) -> Iterator[Tx]:
        """Run a journaled operation: roll back (or forward, once committed) on any exception."""
        ctx = ctx or RecoveryContext()
        with self.session() as session:
            op = Operation(kind=kind, args=json.dumps(args), owner=current_owner(), state="running")
            session.add(op)
            session.flush()
            op_id = op.id
        tx = Tx(self, op_id, kind, args, ctx)
        try:
            yield tx
        except BaseException as exc:
            self._finish_failed(tx, exc)
            raise
        else:
            with self.session() as session:
                tx._save(session, state="done")

    def _finish_failed(self, tx: Tx, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, BMIError) else f"{type(exc).__name__}: {exc}"
        state, error = self._finish(tx.op_id, tx.kind, tx.args, tx.steps, tx.committed, tx.ctx)
        if error:
            reason = f"{reason}; recovery failed: {error}"
        with self.session() as session:
            tx._save(session, state=state, error=reason[:2000])

    def _finish(self, op_id: int, kind: str, args: dict[str, Any], steps: list[dict[str, Any]], committed: bool,
                ctx: RecoveryContext) -> tuple[str, str | None]:
        """Roll forward (committed) or back; returns (new state, error or None)."""
        try:
            if committed:
                self._roll_forward(kind, args, ctx)
                return "rolled_forward", None
            self._roll_back(steps, ctx)
            return "rolled_back", None
        except Exception as exc:  # noqa: BLE001 - recorded; the journal keeps it for the next recovery
            LOG.error("operation %s #%s could not be %s: %s; left for recovery", kind, op_id,
                      "finished" if committed else "undone", exc)
            return "failed", str(exc)

    def _roll_back(self, steps: list[dict[str, Any]], ctx: RecoveryContext) -> None:
        for entry in reversed(steps):
            spec = entry.get("undo")
            if not spec:
                continue
            name, params = spec[0], spec[1]
            fn = self.undo_registry.get(name)
            if fn is None:
                raise InternalError(f"no undo registered for {name}")
            LOG.info("undo %s (%s)", name, entry["name"])
            fn(params, ctx)
            entry["state"] = "undone"

    def _roll_forward(self, kind: str, args: dict[str, Any], ctx: RecoveryContext) -> None:
        fn = self.forward_registry.get(kind)
        if fn is None:
            raise InternalError(f"no forward recovery registered for {kind}")
        fn(args, ctx)

    def recover(self, ctx: RecoveryContext | None = None, keep_days: float = 30.0) -> dict[str, Any]:
        """Finish every operation whose owner died: roll back, or forward if committed.

        Also retries operations whose earlier recovery failed, and forgets finished operations
        older than ``keep_days`` (the journal would otherwise grow forever).  Returns a summary.
        """
        ctx = ctx or RecoveryContext()
        summary: dict[str, Any] = {"rolled_back": [], "rolled_forward": [], "failed": [], "notes": ctx.notes}
        cutoff = datetime.now(UTC) - timedelta(days=keep_days)
        with self.session() as session:
            pruned = session.execute(delete(Operation).where(
                Operation.state.in_(("done", "rolled_back", "rolled_forward")), Operation.updated_at < cutoff))
            summary["pruned"] = pruned.rowcount or 0
        with self.session() as session:
            ops = session.scalars(select(Operation).where(Operation.state.in_(("running", "failed")))).all()
            pending = [(op.id, op.kind, json.loads(op.args), json.loads(op.steps), op.committed)
                       for op in ops if op.state == "failed" or not owner_alive(op.owner)]
            dead_locks = [lk.name for lk in session.scalars(select(Lock)).all() if not owner_alive(lk.owner)]
            if dead_locks:
                session.execute(delete(Lock).where(Lock.name.in_(dead_locks)))
        for op_id, kind, args, steps, committed in pending:
            state, error = self._finish(op_id, kind, args, steps, committed, ctx)
            summary[state].append({"id": op_id, "kind": kind, "args": args})
            with self.session() as session:
                op = session.get(Operation, op_id)
                if op is not None:
                    op.state = state
                    op.steps = json.dumps(steps)
                    if error:
                        op.error = error[:2000]
        return summary

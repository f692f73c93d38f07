"""All-or-nothing operations and cross-process locks, both kept in the database.

An operation records each step *before* running it, together with how to undo it
(a registered undo name plus JSON parameters, never a secret).  If a step fails,
the completed (and the interrupted) steps are undone in reverse order; every undo
is idempotent, so undoing a step that never really happened is harmless.  Once an
operation passes its *commit point* (e.g. the source snapshot of an import is
being removed) it can no longer go back; from there a failure is finished by the
operation kind's idempotent *forward* function instead (transient errors are
retried a few times), and the caller is told it succeeded: if the forward function
still cannot finish, the row stays ``failed`` and a later recovery completes it.

Locks are rows in ``lock`` (primary key = lock name): taking one is an INSERT, so
two processes racing for a node get exactly one winner (on SQLite and PostgreSQL alike: the
primary key decides); the loser gets NodeBusy (409).  Every operation row records the
locks it ran under (``args["_locks"]``).

Recovery happens *under those locks*, before anyone else proceeds: when a lock's
owner is dead, the first process that needs it takes over ALL the dead owner's locks
in one conditional UPDATE (of two racers exactly one wins), finishes (rolls back, or
forward when committed) every operation the dead owner left ``running``, and only
then releases them.  A ``failed`` operation is retried by whoever next takes one of
its locks (holding all of them), and by :meth:`Journal.recover`, which Einstein runs
at start, after a worker died, and every ``[journal] retry_seconds``.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ims.common.errors import BMIError, NodeBusy, ServiceUnavailable
from ims.database.models import Lock, utcnow
from ims.database.plain import Plain, PlainTx
from ims.einstein.journal_recovery import (
    HOST,
    LOCKS_KEY,
    RECOVERY_PURPOSE,
    ForwardFn,
    JournalRecovery,
    UndoFn,
    current_owner,
    owner_alive,
)
from ims.einstein.journal_tx import RecoveryContext, Tx

# Recovery (and owner identity) lives in ims/einstein/journal_recovery.py; its public names are
# re-exported here so callers keep importing them from ims.einstein.journal.
__all__ = ["Journal", "RecoveryContext", "Tx", "current_owner", "owner_alive", "LOCKS_KEY", "OPERATION_STARTED",
           "HOST", "RECOVERY_PURPOSE"]
LOG = logging.getLogger(__name__)

# Called (session, operation id) in the transaction that opens each journal row of this context:
# ims/einstein/tasks.py links an asynchronous operation to the rows its call opens.
OPERATION_STARTED: contextvars.ContextVar[Callable[[PlainTx, int], None] | None] = contextvars.ContextVar(
    "bmi_operation_started", default=None)


class Journal(JournalRecovery):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        engine = sessions.kw.get("bind")
        if engine is None:
            raise TypeError("the journal needs a session factory bound to one engine")
        self.plain = Plain(engine)
        self.undo_registry: dict[str, UndoFn] = {}
        self.forward_registry: dict[str, ForwardFn] = {}
        # Tests set this to inject failures: hook(step_name, "before"|"after").
        self.fault_hook: Callable[[str, str], None] | None = None
        # Builds the context recovery runs with (e.g. a HIL client with service credentials).
        self.context_factory: Callable[[], RecoveryContext] = RecoveryContext
        # Pauses between roll-forward attempts on a transient error (5 tries in ~7.5 s).
        self.forward_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
        # How long a caller waits for another process that is recovering a dead owner's locks.
        self.recovery_wait_seconds = 15.0
        self._held = threading.local()

    # --- plumbing -------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[PlainTx]:
        """One plain-SQL transaction (ims/database/plain.py) for the journal's own hot writes (step
        records, locks, journal rows): the same BEGIN / statements / COMMIT as :meth:`session`
        without SQLAlchemy's statement machinery."""
        with self.plain.transaction() as tx:
            yield tx

    def fault(self, name: str, phase: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(name, phase)

    def register_undo(self, name: str, fn: UndoFn) -> None:
        self.undo_registry[name] = fn

    def register_forward(self, kind: str, fn: ForwardFn) -> None:
        self.forward_registry[kind] = fn

    def _held_stack(self) -> list[list[str]]:
        stack: list[list[str]] = self._held.__dict__.setdefault("stack", [])
        return stack

    # --- locks ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, names: list[str], purpose: str, ctx: RecoveryContext | None = None) -> Iterator[None]:
        """Hold every lock in ``names`` (all or none) for the duration; NodeBusy (409) if taken.

        ``ctx`` (e.g. the caller's HIL client) is what finishing a dead process's operations under
        these locks uses; without it, :attr:`context_factory`'s (the service account, if any).

        Before returning, whatever a dead process (or an earlier failed recovery) left
        unfinished under these locks is finished: the caller never works on top of it.
        """
        owner = current_owner()
        names = sorted(set(names))
        unfinished = self._acquire(names, owner, purpose, ctx)
        try:
            self._finish_pending_under(names, owner, ctx, unfinished)
        except BaseException:
            self._release(names, owner)
            raise
        stack = self._held_stack()
        stack.append(names)
        try:
            yield
        finally:
            stack.pop()
            self._release(names, owner)

    def _release(self, names: list[str], owner: str) -> None:
        with self.connection() as tx:
            tx.run(f"DELETE FROM lock WHERE name IN ({', '.join('?' * len(names))}) AND owner = ?", [*names, owner])

    def _insert(self, names: list[str], owner: str, purpose: str, unfinished: list[Any] | None = None) -> bool:
        """Take every lock in ``names`` in one transaction; False (nothing taken) if one is held.

        ``unfinished``: a list that gets, read in the same transaction once the locks are in, the
        journal rows that may need finishing (:meth:`_unfinished`)."""
        try:
            with self.connection() as tx:
                # one INSERT of every row: the primary key still decides, all or none
                now = tx.when(utcnow())
                tx.many("INSERT INTO lock (name, owner, purpose, acquired_at) VALUES (?, ?, ?, ?)",
                        [(name, owner, purpose[:64], now) for name in names])
                if unfinished is not None:
                    # perf: read here, not in a transaction of its own right after (one fewer per lock)
                    unfinished.extend(self._unfinished(tx))
        except IntegrityError:
            return False
        return True

    def _acquire(self, names: list[str], owner: str, purpose: str,
                 ctx: RecoveryContext | None = None) -> list[Any]:
        """Take ``names`` (waiting out a recovery of a dead owner's); returns the unfinished journal rows
        read in the transaction that took them."""
        deadline = time.monotonic() + self.recovery_wait_seconds
        while True:
            unfinished: list[Any] = []
            if self._insert(names, owner, purpose, unfinished):
                return unfinished
            with self.session() as session:
                held = session.scalars(select(Lock).where(Lock.name.in_(names))).all()
                holders = [(lk.name, lk.owner, lk.purpose) for lk in held]
            dead = sorted({o for _n, o, _p in holders if not owner_alive(o)})
            live = [(n, o, p) for n, o, p in holders if o not in dead]
            if live:
                name, _o, what = live[0]
                # Someone is finishing a dead owner's work: that takes seconds, so wait for it.
                if what.startswith(RECOVERY_PURPOSE) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                label = name.split(":", 1)[-1]
                doing = what.split(":", 1)[0] if what.startswith(RECOVERY_PURPOSE) else what
                raise NodeBusy(f"{label} is busy ({doing} in progress); try again when it has finished")
            for dead_owner in dead:
                found = self._take_over_and_recover(dead_owner, owner, ctx)
                if found.get("failed"):
                    failed = found["failed"][0]
                    raise ServiceUnavailable(f"operation #{failed['id']} ({failed['kind']}) of a process that died "
                                             f"could not be finished yet ({failed.get('error')}); it will be "
                                             "retried, try again later")
            if time.monotonic() >= deadline:
                raise NodeBusy(f"{names[0].split(':', 1)[-1]} is busy; try again when it has finished")

    # --- operations -----------------------------------------------------------
    @contextlib.contextmanager
    def operation(self, kind: str, args: dict[str, Any], ctx: RecoveryContext | None = None) -> Iterator[Tx]:
        """Run a journaled operation: roll back (or forward, once committed) on any exception.

        Once the commit point has passed, an ordinary exception is NOT re-raised: the
        operation is finished forward (or left ``failed`` for recovery to finish) and the
        caller carries on as after a success.
        """
        ctx = ctx or RecoveryContext()
        held = sorted({name for names in self._held_stack() for name in names})
        stored = dict(args, **{LOCKS_KEY: held})
        with self.connection() as conn:
            now = conn.when(utcnow())
            op_id = conn.insert("INSERT INTO operation (kind, args, steps, state, committed, owner, started_at, "
                                "updated_at) VALUES (?, ?, '[]', 'running', ?, ?, ?, ?) RETURNING id",
                                (kind, json.dumps(stored), False, current_owner(), now, now))
            hook = OPERATION_STARTED.get()
            if hook is not None:
                hook(conn, op_id)
        tx = Tx(self, op_id, kind, args, ctx)
        try:
            yield tx
        except BaseException as exc:
            self._finish_failed(tx, exc)
            if not (tx.committed and isinstance(exc, Exception)):
                raise
            if tx.final_state == "failed":
                LOG.warning("operation %s #%d is committed and will be completed (%s: %s); answering success",
                            kind, op_id, type(exc).__name__, exc)
            else:
                LOG.warning("operation %s #%d hit %s after its commit point and was finished forward",
                            kind, op_id, type(exc).__name__)
        else:
            with self.connection() as conn:
                tx._save(conn, state="done")

    def _finish_failed(self, tx: Tx, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, BMIError) else f"{type(exc).__name__}: {exc}"
        state, error = self._finish(tx.op_id, tx.kind, tx.args, tx.steps, tx.committed, tx.ctx)
        if error:
            reason = f"{reason}; recovery failed: {error}"
        tx.final_state = state
        with self.connection() as conn:
            tx._save(conn, state=state, error=reason[:2000])

    # --- operations spanning several calls (uploads: ims/einstein/ops/transfer.py) ----------
    def hold(self, names: list[str], owner: str, purpose: str) -> None:
        """Take ``names`` for ``owner`` until :meth:`release` (not bound to this call, unlike :meth:`lock`).

        ``owner`` may be another process (``host:pid:start``): when it dies, its locks are taken
        over and its running operations finished exactly like a dead worker's.
        """
        names = sorted(set(names))
        unfinished = self._acquire(names, owner, purpose)
        try:
            self._finish_pending_under(names, owner, rows=unfinished)
        except BaseException:
            self._release(names, owner)
            raise

    def release(self, names: list[str], owner: str) -> None:
        self._release(sorted(set(names)), owner)


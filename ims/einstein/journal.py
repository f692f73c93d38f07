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
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ims.common.errors import BMIError, InternalError, NodeBusy, ServiceUnavailable
from ims.database import exclusive
from ims.database.models import Lock, Operation
from ims.einstein.journal_tx import RecoveryContext, Tx

__all__ = ["Journal", "RecoveryContext", "Tx", "current_owner", "owner_alive", "LOCKS_KEY", "OPERATION_STARTED"]
LOG = logging.getLogger(__name__)

# Reserved key of an operation's JSON args: the lock names it ran under.
LOCKS_KEY = "_locks"
# Purpose of a lock taken over from a dead owner while its operations are finished.
RECOVERY_PURPOSE = "recovery"

# Called (session, operation id) in the transaction that opens each journal row of this context:
# ims/einstein/tasks.py links an asynchronous operation to the rows its call opens.
OPERATION_STARTED: contextvars.ContextVar[Callable[[Session, int], None] | None] = contextvars.ContextVar(
    "bmi_operation_started", default=None)

UndoFn = Callable[[dict[str, Any], "RecoveryContext"], None]
ForwardFn = Callable[[dict[str, Any], "RecoveryContext"], None]


def _proc_start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            data = fh.read()
        return data.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


# Several hosts (set by ims/einstein/hosts.py): this host's name in owner strings ([host] name),
# and how another host's owner is judged (alive while that host's heartbeat is fresh).
HOST: dict[str, Any] = {"name": socket.gethostname(), "alive": None}


def current_owner() -> str:
    """``host:pid:starttime`` of this process (start time guards against pid reuse)."""
    pid = os.getpid()
    return f"{HOST['name']}:{pid}:{_proc_start_time(pid)}"


def owner_alive(owner: str) -> bool:
    """False only when the owner is a process on this host that no longer exists."""
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != HOST["name"]:
        remote = HOST["alive"]  # another host's process: alive while its host heart-beats
        return True if remote is None else bool(remote(host))
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] in ("Z", "X"):  # zombie or dead
        return False
    return start == "?" or fields[19] == start


def _transient(exc: BaseException) -> bool:
    """A 503-class error (storage, iSCSI or HIL briefly unavailable): worth trying again."""
    return isinstance(exc, BMIError) and exc.status == 503


class Journal:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
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
        self._acquire(names, owner, purpose, ctx)
        try:
            self._finish_pending_under(names, owner, ctx)
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
        with self.session() as session:
            session.execute(delete(Lock).where(Lock.name.in_(names), Lock.owner == owner))

    def _insert(self, names: list[str], owner: str, purpose: str) -> bool:
        """Take every lock in ``names`` in one transaction; False (nothing taken) if one is held."""
        try:
            with self.session() as session:
                for name in names:
                    session.add(Lock(name=name, owner=owner, purpose=purpose[:64]))
        except IntegrityError:
            return False
        return True

    def _acquire(self, names: list[str], owner: str, purpose: str, ctx: RecoveryContext | None = None) -> None:
        deadline = time.monotonic() + self.recovery_wait_seconds
        while True:
            if self._insert(names, owner, purpose):
                return
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

    def _take_over_and_recover(self, dead: str, owner: str,
                               ctx: RecoveryContext | None = None) -> dict[str, list[dict[str, Any]]]:
        """Take ALL of ``dead``'s locks at once, finish its running operations, release the locks.

        Returns what was finished by state; an empty dict if another process won the take-over
        (it is recovering them).
        """
        marker = f"{RECOVERY_PURPOSE}:{uuid.uuid4().hex}"
        with self.session() as session:
            # Conditional on the owner still being the dead one: of two racers exactly one wins.
            # PostgreSQL: serialised, so two multi-row UPDATEs never lock the rows in opposite orders.
            exclusive(session, "bmi-lock-takeover")
            won = session.execute(update(Lock).where(Lock.owner == dead).values(owner=owner, purpose=marker))
            names = list(session.scalars(select(Lock.name).where(Lock.purpose == marker)).all()) \
                if won.rowcount else []
        if not names:
            return {}
        LOG.warning("took over %d lock(s) of dead process %s to finish its operations first", len(names), dead)
        summary: dict[str, list[dict[str, Any]]] = {"rolled_back": [], "rolled_forward": [], "failed": []}
        try:
            with self.session() as session:
                ops = session.scalars(select(Operation.id).where(Operation.owner == dead,
                                                                 Operation.state == "running")).all()
            ctx = ctx or self.context_factory()
            for op_id in sorted(ops):
                result = self._finish_row(op_id, ctx)
                if result is not None:
                    summary[result[0]].append(result[1])
        finally:
            with self.session() as session:
                session.execute(delete(Lock).where(Lock.purpose == marker))
        return summary

    def _finish_pending_under(self, names: list[str], owner: str, ctx: RecoveryContext | None = None) -> None:
        """Finish ``failed`` operations (and running ones of dead owners) that ran under any of ``names``."""
        wanted = set(names)
        with self.session() as session:
            rows = session.execute(select(Operation.id, Operation.args, Operation.state, Operation.owner)
                                   .where(Operation.state.in_(("running", "failed")))).all()
        pending = []
        for op_id, args, state, op_owner in rows:
            locks = set(_locks_of(args))
            if locks & wanted and (state == "failed" or not owner_alive(op_owner)):
                pending.append((op_id, sorted(locks - wanted)))
        if not pending:
            return
        ctx = ctx or self.context_factory()
        for op_id, extra in sorted(pending):
            if extra and not self._insert(extra, owner, RECOVERY_PURPOSE):
                raise NodeBusy(f"{extra[0].split(':', 1)[-1]} is busy (an unfinished operation #{op_id} needs it); "
                               "try again later")
            try:
                result = self._finish_row(op_id, ctx)
            finally:
                if extra:
                    self._release(extra, owner)
            if result is not None and result[0] == "failed":
                raise ServiceUnavailable(f"an earlier operation #{op_id} ({result[1]['kind']}) on this resource "
                                         f"could not be finished yet ({result[1].get('error')}); it will be "
                                         "retried, try again later")

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
        with self.session() as session:
            op = Operation(kind=kind, args=json.dumps(stored), owner=current_owner(), state="running")
            session.add(op)
            session.flush()
            op_id = op.id
            hook = OPERATION_STARTED.get()
            if hook is not None:
                hook(session, op_id)
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
            with self.session() as session:
                tx._save(session, state="done")

    def _finish_failed(self, tx: Tx, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, BMIError) else f"{type(exc).__name__}: {exc}"
        state, error = self._finish(tx.op_id, tx.kind, tx.args, tx.steps, tx.committed, tx.ctx)
        if error:
            reason = f"{reason}; recovery failed: {error}"
        tx.final_state = state
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
            # where it failed (the innermost frames), so one log line is enough to find the cause
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                for f in reversed(traceback.extract_tb(exc.__traceback__)[-4:]))
            LOG.error("operation %s #%s could not be %s: %s (at %s); left for recovery", kind, op_id,
                      "finished" if committed else "undone", exc, where)
            return "failed", str(exc)

    def _finish_row(self, op_id: int, ctx: RecoveryContext) -> tuple[str, dict[str, Any]] | None:
        """Finish the journal row ``op_id`` (if still unfinished) and store its new state."""
        with self.session() as session:
            op = session.get(Operation, op_id)
            if op is None or op.state not in ("running", "failed"):
                return None
            kind, args, steps, committed = op.kind, _user_args(op.args), json.loads(op.steps), op.committed
        state, error = self._finish(op_id, kind, args, steps, committed, ctx)
        with self.session() as session:
            op = session.get(Operation, op_id)
            if op is not None:
                op.state = state
                op.steps = json.dumps(steps)
                if error:
                    op.error = error[:2000]
        entry = {"id": op_id, "kind": kind, "args": args}
        if error:
            entry["error"] = error
        LOG.info("operation %s #%d %s", kind, op_id, state.replace("_", " "))
        return state, entry

    def _roll_back(self, steps: list[dict[str, Any]], ctx: RecoveryContext) -> None:
        for entry in reversed(steps):
            spec = entry.get("undo")
            if not spec or entry.get("state") == "undone":
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
        delays = list(self.forward_delays)
        while True:
            try:
                fn(args, ctx)
                return
            except Exception as exc:
                if not delays or not _transient(exc):
                    raise
                delay = delays.pop(0)
                LOG.warning("finishing %s forward hit a transient error (%s); retrying in %.1f s", kind, exc, delay)
                time.sleep(delay)

    # --- operations spanning several calls (uploads: ims/einstein/ops/transfer.py) ----------
    def hold(self, names: list[str], owner: str, purpose: str) -> None:
        """Take ``names`` for ``owner`` until :meth:`release` (not bound to this call, unlike :meth:`lock`).

        ``owner`` may be another process (``host:pid:start``): when it dies, its locks are taken
        over and its running operations finished exactly like a dead worker's.
        """
        names = sorted(set(names))
        self._acquire(names, owner, purpose)
        try:
            self._finish_pending_under(names, owner)
        except BaseException:
            self._release(names, owner)
            raise

    def release(self, names: list[str], owner: str) -> None:
        self._release(sorted(set(names)), owner)

    def finish(self, op_id: int, ctx: RecoveryContext | None = None) -> str | None:
        """Roll back (or forward, once committed) the unfinished operation ``op_id``; its new state."""
        result = self._finish_row(op_id, ctx or self.context_factory())
        return result[0] if result is not None else None

    def recover(self, ctx: RecoveryContext | None = None, keep_days: float = 30.0) -> dict[str, Any]:
        """Finish every operation whose owner died, and retry ``failed`` ones, each under its locks.

        Per dead lock owner: take over all its locks, finish its running operations, release.
        Then every other unfinished operation (``failed``, or ``running`` under a dead owner
        that held no locks) is finished while holding the locks it ran under; one whose locks
        are busy is skipped (listed under ``skipped``) and left for the next round.  Also
        forgets finished operations older than ``keep_days``.  Returns a summary.
        """
        ctx = ctx or self.context_factory()
        summary: dict[str, Any] = {"rolled_back": [], "rolled_forward": [], "failed": [], "skipped": [],
                                   "notes": ctx.notes}
        cutoff = datetime.now(UTC) - timedelta(days=keep_days)
        with self.session() as session:
            pruned = session.execute(delete(Operation).where(
                Operation.state.in_(("done", "rolled_back", "rolled_forward")), Operation.updated_at < cutoff))
            summary["pruned"] = pruned.rowcount or 0
        me = current_owner()
        with self.session() as session:
            owners = sorted({o for o in session.scalars(select(Lock.owner)).all() if not owner_alive(o)})
        for dead in owners:
            for state, entries in self._take_over_and_recover(dead, me, ctx).items():
                summary[state].extend(entries)
        with self.session() as session:
            rows = session.execute(select(Operation.id, Operation.args, Operation.state, Operation.owner)
                                   .where(Operation.state.in_(("running", "failed")))).all()
        for op_id, args, state, owner in sorted(rows):
            if state == "running" and owner_alive(owner):
                continue
            locks = _locks_of(args)
            if locks and not self._insert(locks, me, RECOVERY_PURPOSE):
                summary["skipped"].append({"id": op_id, "reason": "its locks are held"})
                continue
            try:
                result = self._finish_row(op_id, ctx)
            finally:
                if locks:
                    self._release(locks, me)
            if result is not None:
                summary[result[0]].append(result[1])
        return summary


def _user_args(raw: str) -> dict[str, Any]:
    """An operation's args as its forward function expects them (without the reserved keys)."""
    args = json.loads(raw)
    args.pop(LOCKS_KEY, None)
    return args


def _locks_of(raw: str) -> list[str]:
    try:
        locks = json.loads(raw).get(LOCKS_KEY) or []
    except (ValueError, AttributeError):
        return []
    return sorted({str(name) for name in locks})

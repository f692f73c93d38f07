"""Journal recovery: finishing operations a process left unfinished (split from ims/einstein/journal.py).

Who owns a lock or a journal row is a ``host:pid:starttime`` string (:func:`current_owner`);
:func:`owner_alive` judges it.  A dead owner's locks are taken over all at once and its
``running`` operations finished (rolled back, or forward once committed) before the locks are
released (:meth:`JournalRecovery._take_over_and_recover`); ``failed`` rows are retried under the
locks they ran under.  :class:`~ims.einstein.journal.Journal` inherits these methods; import
everything from ims.einstein.journal, which re-exports the public names.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ims.common.errors import BMIError, InternalError, NodeBusy, ServiceUnavailable
from ims.database import exclusive
from ims.database.models import Lock, Operation
from ims.einstein.journal_tx import RecoveryContext

LOG = logging.getLogger("ims.einstein.journal")

# Reserved key of an operation's JSON args: the lock names it ran under.
LOCKS_KEY = "_locks"
# Purpose of a lock taken over from a dead owner while its operations are finished.
RECOVERY_PURPOSE = "recovery"

UndoFn = Callable[[dict[str, Any], RecoveryContext], None]
ForwardFn = Callable[[dict[str, Any], RecoveryContext], None]


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


_OWNER: dict[tuple[int, str], str] = {}


def current_owner() -> str:
    """``host:pid:starttime`` of this process (start time guards against pid reuse)."""
    pid = os.getpid()
    # perf: read /proc once per (pid, host name), not on every lock and journal row (a forked
    # child has another pid; [host] name may be set after start)
    key = (pid, HOST["name"])
    owner = _OWNER.get(key)
    if owner is None:
        owner = _OWNER[key] = f"{key[1]}:{pid}:{_proc_start_time(pid)}"
    return owner


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


def _alive(owner: str) -> bool:
    """:func:`owner_alive` as ims.einstein.journal has it at the time of the call: that module is where
    callers find it (and tests replace it), so recovery judges owners exactly as :meth:`Journal.lock` does."""
    from ims.einstein import journal  # at call time: journal imports this module

    return bool(journal.owner_alive(owner))


def _transient(exc: BaseException) -> bool:
    """A 503-class error (storage, iSCSI or HIL briefly unavailable): worth trying again."""
    return isinstance(exc, BMIError) and exc.status == 503


class JournalRecovery:
    """The recovery half of :class:`~ims.einstein.journal.Journal` (which provides the attributes below)."""

    if TYPE_CHECKING:
        undo_registry: dict[str, UndoFn]
        forward_registry: dict[str, ForwardFn]
        context_factory: Callable[[], RecoveryContext]
        forward_delays: tuple[float, ...]

        def session(self) -> contextlib.AbstractContextManager[Session]: ...
        def connection(self) -> contextlib.AbstractContextManager[Any]: ...
        def _insert(self, names: list[str], owner: str, purpose: str,
                    unfinished: list[Any] | None = None) -> bool: ...
        def _release(self, names: list[str], owner: str) -> None: ...

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

    @staticmethod
    def _unfinished(tx: Any) -> list[Any]:
        """``(id, args, state, owner)`` of every journal row that is running or failed (``tx``: a
        plain-SQL transaction, ims/database/plain.py)."""
        return tx.rows("SELECT id, args, state, owner FROM operation WHERE state IN ('running', 'failed')")

    def _finish_pending_under(self, names: list[str], owner: str, ctx: RecoveryContext | None = None,
                              rows: list[Any] | None = None) -> None:
        """Finish ``failed`` operations (and running ones of dead owners) that ran under any of ``names``.

        ``rows``: :meth:`_unfinished` as read once ``names`` were taken (else read now)."""
        wanted = set(names)
        if rows is None:
            with self.connection() as tx:
                rows = self._unfinished(tx)
        pending = []
        # perf: under a batch every lock taken meets the batch's other running rows: judge each
        # owner once (a /proc read) and parse a row's locks only when it is one to finish
        alive: dict[str, bool] = {}
        for op_id, args, state, op_owner in rows:
            if state != "failed":
                if op_owner not in alive:
                    alive[op_owner] = _alive(op_owner)
                if alive[op_owner]:
                    continue
            locks = set(_locks_of(args))
            if locks & wanted:
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
            owners = sorted({o for o in session.scalars(select(Lock.owner)).all() if not _alive(o)})
        for dead in owners:
            for state, entries in self._take_over_and_recover(dead, me, ctx).items():
                summary[state].extend(entries)
        with self.session() as session:
            rows = session.execute(select(Operation.id, Operation.args, Operation.state, Operation.owner)
                                   .where(Operation.state.in_(("running", "failed")))).all()
        for op_id, args, state, owner in sorted(rows):
            if state == "running" and _alive(owner):
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

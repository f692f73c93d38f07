"""One running journaled operation (:class:`Tx`) and what recovery functions get (:class:`RecoveryContext`).

Split from ims/einstein/journal.py, which creates both; import them from there.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from ims.common.errors import InternalError
from ims.database.models import utcnow
from ims.database.plain import PlainTx

if TYPE_CHECKING:
    from ims.einstein.journal import Journal

T = TypeVar("T")


@dataclass
class RecoveryContext:
    """What undo/forward functions may use; ``net`` is None when no HIL credentials are at hand."""

    net: Any = None
    notes: list[str] = field(default_factory=list)
    # Storage reads an operation started early (image name -> Future of Storage.describe), for its
    # forward step to use instead of reading again (deprovision; a recovery has none and reads).
    described: dict[str, Any] = field(default_factory=dict)
    # A take-over's recovery only (ims/einstein/takeover.py): blocklist the other Ceph clients of a
    # clone a dead host left half-made, so its removal need not wait for their watches to expire.
    fence: Callable[[str], Any] | None = None


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
        self.final_state: str | None = None
        # Steps recorded ahead of their run (:meth:`ahead`), in the order they will run, and how many
        # entries of ``steps`` the last journal write held.
        self._ahead: list[dict[str, Any]] = []
        self._written = 0

    def _save(self, conn: PlainTx, state: str | None = None, error: str | None = None) -> None:
        # One UPDATE (no SELECT first): this runs once per step of every operation.  (``_written`` is
        # set before the commit: if the commit fails, the operation rolls back and no later step runs.)
        sets, values = "steps = ?, committed = ?, updated_at = ?", [json.dumps(self.steps), self.committed,
                                                                     conn.when(utcnow())]
        if state is not None:
            sets, values = sets + ", state = ?, error = ?", [*values, state, error]
        if conn.run(f"UPDATE operation SET {sets} WHERE id = ?", [*values, self.op_id]) != 1:
            raise InternalError(f"journal row {self.op_id} vanished")
        self._written = len(self.steps)

    def _append(self, entry: dict[str, Any]) -> None:
        """Add a step's entry where it runs: before the steps recorded ahead that have not run yet."""
        pending = [i for i, e in enumerate(self.steps) if any(e is a for a in self._ahead)]
        self.steps.insert(pending[0] if pending else len(self.steps), entry)

    def ahead(self, name: str, undo: tuple[str, dict[str, Any]] | None = None) -> None:
        """Record step ``name`` (with its undo) with the operation's NEXT journal write, before it runs.

        For steps that follow one another with nothing between them that could fail half-way: one
        journal write records them all (e.g. a database step's own transaction), and each step's
        :meth:`step` then runs without a write of its own.  Recovery undoes a recorded step whether or
        not it ran (every undo is idempotent), exactly as it does for a step that died between its
        record and its work.  Steps recorded ahead run in the order they were recorded.
        """
        entry = {"name": name, "undo": list(undo) if undo else None, "state": "started"}
        self.steps.append(entry)
        self._ahead.append(entry)

    def _recorded_ahead(self, name: str, undo: list[Any] | None) -> dict[str, Any] | None:
        if not self._ahead or self._ahead[0]["name"] != name:
            return None
        entry = self._ahead.pop(0)
        if entry["undo"] != undo:  # not what was recorded: record what runs (the write below)
            entry["undo"] = undo
            self._written = min(self._written, self._index(entry))
        return entry

    def _index(self, entry: dict[str, Any]) -> int:
        return next(i for i, e in enumerate(self.steps) if e is entry)

    def step(self, name: str, do: Callable[[], T], undo: tuple[str, dict[str, Any]] | None = None,
             background: bool = False) -> T:
        """Record ``name`` (with its undo) durably, then run ``do``.

        One journal write per step: the record before ``do`` is what recovery needs (it undoes
        a ``started`` step exactly like a ``done`` one: every undo is idempotent).  The step's
        ``done`` mark is written with the next journal write of this operation (the next
        step's record, the commit point or the final state), which follows at once.  A step
        recorded :meth:`ahead` (and written since) runs without a write of its own.
        """
        spec = list(undo) if undo else None
        entry = self._recorded_ahead(name, spec)
        if entry is None:
            entry = {"name": name, "undo": spec, "state": "started"}
            self._append(entry)
        if self._index(entry) >= self._written:
            with self.journal.connection() as conn:  # perf: plain SQL (ims/database/plain.py)
                self._save(conn)
        self.journal.fault(name, "before")
        result = do()
        if not background:  # a background step's work has only started: its "after" comes when it ends
            self.journal.fault(name, "after")
        entry["state"] = "done"
        return result

    def disarm(self, name: str, state: str) -> None:
        """The last step named ``name`` made nothing: recovery must not undo it."""
        entry = next(e for e in reversed(self.steps) if e["name"] == name)
        entry["undo"] = None
        entry["state"] = state
        with self.journal.connection() as conn:
            self._save(conn)

    def db_step(self, name: str, do: Callable[[Session], T],
                undo: Callable[[T], tuple[str, dict[str, Any]] | None],
                then: Callable[[T], None] | None = None) -> T:
        """Run a database change and record it (and its undo) in the same transaction.

        ``then(result)`` may record the steps that follow :meth:`ahead`: the same write records them."""
        self.journal.fault(name, "before")
        with self.journal.session() as session:
            result = do(session)
            spec = undo(result)
            self._append({"name": name, "undo": list(spec) if spec else None, "state": "done"})
            if then is not None:
                then(result)
            self._save(self.journal.plain.within(session))
        self.journal.fault(name, "after")
        return result

    def commit_point(self) -> None:
        """From here on a failure is finished forward, not rolled back."""
        self.committed = True
        with self.journal.connection() as conn:
            self._save(conn)
        self.journal.fault("commit", "after")

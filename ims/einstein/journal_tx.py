"""One running journaled operation (:class:`Tx`) and what recovery functions get (:class:`RecoveryContext`).

Split from ims/einstein/journal.py, which creates both; import them from there.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, update
from sqlalchemy.orm import Session

from ims.common.errors import InternalError
from ims.database.models import Operation

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

    def _save(self, session: Session | Connection, **extra: Any) -> None:
        # One UPDATE (no SELECT first): this runs once per step of every operation.
        values = {"steps": json.dumps(self.steps), "committed": self.committed, **extra}
        result = session.execute(update(Operation).where(Operation.id == self.op_id).values(**values))
        if result.rowcount != 1:
            raise InternalError(f"journal row {self.op_id} vanished")

    def step(self, name: str, do: Callable[[], T], undo: tuple[str, dict[str, Any]] | None = None,
             background: bool = False) -> T:
        """Record ``name`` (with its undo) durably, then run ``do``.

        One journal write per step: the record before ``do`` is what recovery needs (it undoes
        a ``started`` step exactly like a ``done`` one: every undo is idempotent).  The step's
        ``done`` mark is written with the next journal write of this operation (the next
        step's record, the commit point or the final state), which follows at once.
        """
        entry = {"name": name, "undo": list(undo) if undo else None, "state": "started"}
        self.steps.append(entry)
        with self.journal.connection() as conn:  # perf: a bare connection (a Core UPDATE only)
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
        with self.journal.connection() as conn:
            self._save(conn)
        self.journal.fault("commit", "after")

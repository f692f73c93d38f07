"""Einstein-side numbers for Picasso's ``/metrics`` (one cheap, read-only call per scrape).

Everything comes from the shared database (so any worker answers for all of them) except the
live iSCSI targets, which come from ONE ``tgtadm --op show`` of the daemon.  A part that
cannot be read is ``None`` (with its error) instead of failing the whole answer: a scrape
still gets the others.  Nothing here writes: the tgt driver's ``live_targets`` re-syncs conf
files, so it is not used.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from ims.common.errors import BMIError
from ims.database.models import Operation, Task
from ims.einstein.flatten import FlattenJob
from ims.einstein.ops.core import Core

LOG = logging.getLogger(__name__)

UNFINISHED_JOURNAL_STATES = ("running", "failed")  # "failed": its rollback failed; recovery retries it


class Status:
    def __init__(self, core: Core) -> None:
        self.core = core

    def snapshot(self) -> dict[str, Any]:
        """``{"tasks": [[verb, state, n]...], "journal": {state: n}, "flatten": {state: n},
        "targets_live": n}`` (a part is None, and ``errors`` says why, when it cannot be read)."""
        out: dict[str, Any] = {"tasks": None, "journal": None, "flatten": None, "targets_live": None, "errors": {}}
        try:
            with self.core.session() as session:
                tasks = session.execute(select(Task.verb, Task.state, func.count()).where(
                    Task.state.in_(("queued", "running"))).group_by(Task.verb, Task.state)).all()
                journal = session.execute(select(Operation.state, func.count()).where(
                    Operation.state.in_(UNFINISHED_JOURNAL_STATES)).group_by(Operation.state)).all()
                flatten = session.execute(select(FlattenJob.state, func.count()).group_by(FlattenJob.state)).all()
            out["tasks"] = [[verb, state, int(n)] for verb, state, n in tasks]
            out["journal"] = {state: 0 for state in UNFINISHED_JOURNAL_STATES} | {s: int(n) for s, n in journal}
            out["flatten"] = {state: int(n) for state, n in flatten}
        except Exception as exc:  # noqa: BLE001 - the database part fails alone
            LOG.warning("status: cannot read the database: %s", exc)
            out["errors"]["db"] = str(exc)[:500]
        try:
            out["targets_live"] = self._targets_live()
        except (BMIError, OSError) as exc:
            LOG.warning("status: cannot read the iSCSI targets: %s", exc)
            out["errors"]["iscsi"] = str(exc)[:500]
        return out

    def _targets_live(self) -> int:
        iscsi = self.core.iscsi
        show = getattr(iscsi, "_show_all", None)  # tgt: one show, without the tid re-sync of live_targets
        if show is None:
            return len(iscsi.live_targets())
        live = show()
        return sum(1 for name in iscsi.list_targets() if iscsi.iqn(name) in live)

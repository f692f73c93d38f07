"""Test-only Einstein ops factory: the real Operations over the fakes, plus slow calls and a journaled provision.

``--ops-factory tests.support.journal_ops:build`` with ``[tests] dir = <directory>``:

* ``import_image(auth, project, "slow-<x>")`` writes ``<dir>/started-slow-<x>``, then waits
  for ``<dir>/release-slow-<x>`` before importing (a call that is in flight for as long as
  the test wants).
* ``provision(auth, project, node, img, network, nic)`` is a journaled operation on the
  SQLite file of ``[db] path``: under the lock ``node:<node>`` it writes ``<dir>/files/<node>``
  (undo: remove it), writes ``<dir>/started-provision-<node>``, then waits for
  ``<dir>/release-provision-<node>``.
* ``recover()`` runs the journal's recovery.  ``<dir>/events`` gets one line per
  ``build <pid>``, ``recover <pid> <rolled back ids>`` and ``provision <pid> <node>``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ims.database import make_engine, make_session_factory
from ims.einstein.journal import Journal, RecoveryContext
from tests.support.fake_ops import World

WAIT_SECONDS = 120.0


def make_journal(db: Path | str, files: Path) -> Journal:
    """A journal whose only resource is ``files/<node>`` holding the writer's label.

    ``db``: a SQLite file, or any database URL (a string with ``://``)."""
    url = db if isinstance(db, str) and "://" in db else f"sqlite:///{db}"
    journal = Journal(make_session_factory(make_engine(url)))

    def remove(params: dict[str, Any], _ctx: RecoveryContext) -> None:
        with open(files / "undo.log", "a", encoding="utf-8") as fh:
            fh.write(f"{params['node']}:{params['label']}\n")
        (files / params["node"]).unlink(missing_ok=True)

    journal.register_undo("file.remove", remove)
    return journal


def journaled_provision(journal: Journal, files: Path, node: str, label: str, after_write: Any = None) -> None:
    with journal.lock([f"node:{node}"], "provision"), journal.operation("provision", {"node": node}) as tx:
        tx.step("file.write", lambda: (files / node).write_text(label),
                undo=("file.remove", {"node": node, "label": label}))
        if after_write:
            after_write()


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


class JournalOps:
    """The seeded world's real Operations (tests/support/fake_ops.py) with two verbs replaced."""

    def __init__(self, cfg: Any) -> None:
        self.dir = Path(cfg.section("tests").dir)
        self.world = World(uid=cfg.bmi.uid, directory=str(self.dir / f"world-{os.getpid()}"))
        self.files = self.dir / "files"
        self.files.mkdir(exist_ok=True)
        self.journal = make_journal(Path(cfg.db.path), self.files)
        # Submitted operations (the /v1 and legacy APIs) run their verb on this object, not on the
        # world's Operations, so they reach the slow/held versions below.
        self.world.ops._tasks.ops = self
        self._event(f"build {os.getpid()}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.world.ops, name)

    def close(self) -> None:
        self.world.close()

    def _event(self, line: str) -> None:
        with open(self.dir / "events", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def import_image(self, auth: dict[str, str], project: str, img: str, snap: str | None = None,
                     protect: bool = False) -> None:
        if img.startswith("slow-"):
            (self.dir / f"started-{img}").write_text(str(os.getpid()))
            wait_for(self.dir / f"release-{img}")
            if not self.world.storage.image_exists(img):
                self.world.storage.create_image(img, 4096)
        return self.world.ops.import_image(auth, project, img, snap, protect)

    def provision(self, auth: dict[str, str], project: str, node: str, img: str, network: str, nic: str) -> None:
        self._event(f"provision {os.getpid()} {node}")

        def hold() -> None:
            (self.dir / f"started-provision-{node}").write_text(str(os.getpid()))
            wait_for(self.dir / f"release-provision-{node}")

        journaled_provision(self.journal, self.files, node, f"pid{os.getpid()}", after_write=hold)

    def recover(self) -> dict[str, Any]:
        summary = self.journal.recover()
        self._event(f"recover {os.getpid()} {','.join(str(e['id']) for e in summary['rolled_back'])}")
        return summary


def build(cfg: Any) -> JournalOps:
    return JournalOps(cfg)

"""The journal on a real SQLite file and a real PostgreSQL database, with real (SIGKILLed) processes
as dead lock owners, and several processes contending for one lock.

The "resource" here is a file per node (like a node's boot files): a step writes it, its undo
removes it.  A late rollback of a dead provision must never remove a NEWER provision's file.
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ims.common.errors import NodeBusy, ServiceUnavailable, StorageError
from ims.database.models import Lock, Operation
from ims.einstein.journal import LOCKS_KEY, Journal, RecoveryContext, current_owner
from tests.support.journal_ops import journaled_provision, make_journal

ROOT = Path(__file__).resolve().parents[2]


def provision(journal: Journal, files: Path, node: str, label: str, after_write: Any = None) -> None:
    journaled_provision(journal, files, node, label, after_write)


CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.support.journal_ops import make_journal, journaled_provision as provision
journal = make_journal(sys.argv[2], Path(sys.argv[3]))
provision(journal, Path(sys.argv[3]), "node1", "old", after_write=lambda: os.kill(os.getpid(), signal.SIGKILL))
"""


def kill_mid_provision(db: str, files: Path) -> None:
    """A real process writes node1's file under the node lock, then is SIGKILLed."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(db), str(files)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (files / "node1").read_text() == "old"


@pytest.fixture()
def env(tmp_path: Path, db_url: str) -> tuple[Journal, str, Path]:
    files = tmp_path / "files"
    files.mkdir()
    return make_journal(db_url, files), db_url, files


def rows(journal: Journal) -> list[tuple[str, str, dict[str, Any]]]:
    with journal.session() as s:
        return [(op.kind, op.state, json.loads(op.args)) for op in s.scalars(select(Operation).order_by(Operation.id))]


def test_new_provision_rolls_back_the_dead_one_first_and_recover_leaves_it_intact(env) -> None:
    journal, db, files = env
    kill_mid_provision(db, files)
    assert rows(journal)[0][1] == "running"
    provision(journal, files, "node1", "new")
    # The dead provision was rolled back BEFORE the new one ran, under the lock.
    assert (files / "undo.log").read_text() == "node1:old\n"
    assert (files / "node1").read_text() == "new"
    assert [r[:2] for r in rows(journal)] == [("provision", "rolled_back"), ("provision", "done")]
    assert rows(journal)[0][2][LOCKS_KEY] == ["node:node1"]
    # An Einstein restart finds nothing left to do and leaves the newer provision alone.
    summary = make_journal(db, files).recover()
    assert not summary["rolled_back"] and not summary["failed"] and not summary["skipped"]
    assert (files / "node1").read_text() == "new"
    assert (files / "undo.log").read_text() == "node1:old\n"
    with journal.session() as s:
        assert s.scalars(select(Lock)).all() == []


def test_recover_after_a_kill_rolls_back_under_the_locks(env) -> None:
    journal, db, files = env
    kill_mid_provision(db, files)
    summary = journal.recover()
    assert [e["kind"] for e in summary["rolled_back"]] == ["provision"]
    assert summary["rolled_back"][0]["args"] == {"node": "node1"}  # reserved key not handed to recovery
    assert not (files / "node1").exists()
    with journal.session() as s:
        assert s.scalars(select(Lock)).all() == []


def test_take_over_race_has_exactly_one_winner(env) -> None:
    journal, db, files = env
    kill_mid_provision(db, files)
    with journal.session() as s:
        dead = s.scalars(select(Lock.owner)).one()
    gate = threading.Barrier(4)
    results: list[dict[str, Any]] = []

    def racer(i: int) -> None:
        gate.wait()
        results.append(journal._take_over_and_recover(dead, f"{current_owner()}-racer{i}"))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r]
    assert len(winners) == 1, results
    assert [e["kind"] for e in winners[0]["rolled_back"]] == ["provision"]
    assert (files / "undo.log").read_text() == "node1:old\n"  # rolled back exactly once


def test_a_live_recovery_makes_others_wait_then_proceed(env) -> None:
    journal, db, files = env
    with journal.session() as s:
        s.add(Lock(name="node:node1", owner=current_owner(), purpose="recovery:abc"))
    journal.recovery_wait_seconds = 0.5
    with pytest.raises(NodeBusy):
        provision(journal, files, "node1", "new")
    with journal.session() as s:
        s.add(Lock(name="node:node2", owner=current_owner(), purpose="provision"))
    with pytest.raises(NodeBusy) as info:  # an ordinary live holder: 409 at once
        provision(journal, files, "node2", "new")
    assert "provision in progress" in info.value.message


def test_failed_rollback_blocks_the_resource_until_it_is_finished(env) -> None:
    journal, db, files = env
    kill_mid_provision(db, files)
    broken = {"on": True}
    original = journal.undo_registry["file.remove"]

    def flaky(params: dict[str, Any], ctx: RecoveryContext) -> None:
        if broken["on"]:
            raise StorageError("storage briefly unavailable")
        original(params, ctx)

    journal.register_undo("file.remove", flaky)
    with pytest.raises(ServiceUnavailable) as info:
        provision(journal, files, "node1", "new")
    assert "could not be finished" in info.value.message
    assert (files / "node1").read_text() == "old"
    assert rows(journal)[0][1] == "failed" and len(rows(journal)) == 1
    # recover() skips it while someone holds its lock...
    with journal.session() as s:
        s.add(Lock(name="node:node1", owner=current_owner(), purpose="provision"))
    summary = journal.recover()
    assert summary["skipped"] and rows(journal)[0][1] == "failed"
    with journal.session() as s:
        s.query(Lock).delete()
    # ...and the next caller of the lock finishes it first, then proceeds.
    broken["on"] = False
    provision(journal, files, "node1", "new")
    assert (files / "node1").read_text() == "new"
    assert [r[:2] for r in rows(journal)] == [("provision", "rolled_back"), ("provision", "done")]


def _committed_op(journal: Journal, calls: list[dict[str, Any]]) -> None:
    with journal.lock(["image:p/a"], "import"), journal.operation("import", {"source": "a"}) as tx:
        tx.step("noop", lambda: None)
        tx.commit_point()
        raise StorageError("the pool went away right after the commit point")


def test_past_the_commit_point_transient_errors_are_retried_and_the_answer_is_success(env) -> None:
    journal, _db, _files = env
    journal.forward_delays = (0.01, 0.01, 0.01, 0.01)
    calls: list[dict[str, Any]] = []

    def forward(args: dict[str, Any], _ctx: RecoveryContext) -> None:
        calls.append(args)
        if len(calls) < 3:
            raise StorageError("still unavailable")

    journal.register_forward("import", forward)
    _committed_op(journal, calls)  # no exception: committed means success
    assert calls == [{"source": "a"}] * 3
    assert rows(journal)[0][1] == "rolled_forward"


def test_committed_operation_that_cannot_finish_answers_success_and_is_completed_later(env, caplog) -> None:
    journal, _db, _files = env
    journal.forward_delays = (0.01,)
    down = {"on": True}
    calls: list[dict[str, Any]] = []

    def forward(args: dict[str, Any], _ctx: RecoveryContext) -> None:
        calls.append(args)
        if down["on"]:
            raise StorageError("still unavailable")

    journal.register_forward("import", forward)
    with caplog.at_level(logging.WARNING):
        _committed_op(journal, calls)
    assert len(calls) == 2  # bounded retries
    assert rows(journal)[0][1] == "failed"
    assert any("is committed and will be completed" in r.getMessage() for r in caplog.records)
    down["on"] = False
    summary = journal.recover()
    assert [e["kind"] for e in summary["rolled_forward"]] == ["import"]
    assert rows(journal)[0][1] == "rolled_forward"


def test_non_transient_error_before_commit_still_raises_and_rolls_back(env) -> None:
    journal, _db, files = env

    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError):
        provision(journal, files, "node1", "x", after_write=boom)
    assert not (files / "node1").exists()
    assert rows(journal)[0][1] == "rolled_back"


def test_recovery_under_the_lock_uses_the_context_factory(env) -> None:
    journal, db, files = env
    kill_mid_provision(db, files)
    made: list[RecoveryContext] = []

    def factory() -> RecoveryContext:
        made.append(RecoveryContext(net="hil-client"))
        return made[-1]

    seen: list[Any] = []
    original = journal.undo_registry["file.remove"]
    journal.register_undo("file.remove", lambda params, ctx: (seen.append(ctx.net), original(params, ctx)))
    journal.context_factory = factory
    provision(journal, files, "node1", "new")
    assert len(made) == 1 and seen == ["hil-client"]


def test_steps_recorded_ahead_are_in_the_journal_before_they_run_and_undone_if_they_did_not(env) -> None:
    """Tx.ahead: one journal write records the next steps (in the order they run) before any of them
    runs, each step's own run writes nothing more first, and a failure rolls back every recorded step —
    the ones that never ran too (their undos are idempotent)."""
    journal, _, files = env
    undone: list[str] = []
    journal.register_undo("test.unlink", lambda p, _ctx: (undone.append(p["name"]),
                                                          (files / p["name"]).unlink(missing_ok=True)))
    seen: dict[str, list[str]] = {}
    saves: list[int] = []

    def journal_steps() -> list[str]:
        with journal.session() as s:
            op = s.scalars(select(Operation).order_by(Operation.id.desc())).first()
            return [f"{e['name']}:{e['state']}" for e in json.loads(op.steps)]

    def hook(name: str, phase: str) -> None:
        if phase == "before":
            seen[name] = journal_steps()
        if (name, phase) == ("b", "before"):
            raise StorageError("b failed")

    journal.fault_hook = hook
    with pytest.raises(StorageError), journal.operation("provision", {"node": "n1"}) as tx:
        real_save = tx._save
        tx._save = lambda conn, **kw: (saves.append(1), real_save(conn, **kw))[1]  # type: ignore[method-assign]
        tx.ahead("a", ("test.unlink", {"name": "a"}))
        tx.ahead("b", ("test.unlink", {"name": "b"}))
        tx.db_step("db", lambda _s: 7, lambda _r: None)  # its own transaction writes the two records
        assert len(saves) == 1
        tx.step("a", lambda: (files / "a").write_text("x"), undo=("test.unlink", {"name": "a"}))
        assert len(saves) == 1  # no write of its own: recorded ahead
        tx.step("b", lambda: (files / "b").write_text("x"), undo=("test.unlink", {"name": "b"}))
    assert seen["a"] == ["db:done", "a:started", "b:started"]  # in the order they run, before either ran
    assert seen["b"] == ["db:done", "a:started", "b:started"]  # a's done mark waits for the next write
    assert undone == ["b", "a"] and not (files / "a").exists() and not (files / "b").exists()
    assert rows(journal)[-1][1] == "rolled_back"

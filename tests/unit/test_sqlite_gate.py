"""The process-local gate in front of SQLite's write lock (ims/database/sqlite_gate.py).

Threads of one process queue on the gate instead of SQLite's sleeping busy handler; the gate is
held exactly while a transaction is open and is handed back after commit, rollback, an error in
the transaction's body and a connection dropped by the pool.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from ims.database import make_engine, make_session_factory, sqlite_gate
from ims.database.models import Project

THREADS = 8
ROUNDS = 40


def _bare_engine(path: Path, gate: bool):  # type: ignore[no-untyped-def]
    """A SQLite engine whose busy handler gives up AT ONCE: only the gate can make writers wait."""
    engine = create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA busy_timeout = 0")
        dbapi_conn.execute("PRAGMA journal_mode = WAL")

    if gate:
        sqlite_gate.install(engine, str(path), timeout_s=30.0)
    else:
        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS counter (n INTEGER)"))
        conn.execute(text("DELETE FROM counter"))
        conn.execute(text("INSERT INTO counter VALUES (0)"))
    return engine


def _hammer(engine) -> list[BaseException]:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work() -> None:
        start.wait()
        try:
            for _ in range(ROUNDS):
                with engine.begin() as conn:  # read-modify-write: loses updates unless serialised
                    n = conn.execute(text("SELECT n FROM counter")).scalar_one()
                    conn.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_queue_on_the_gate_not_on_sqlite(tmp_path: Path) -> None:
    engine = _bare_engine(tmp_path / "gated.db", gate=True)
    assert _hammer(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar_one() == THREADS * ROUNDS
    assert not sqlite_gate.gate_for(str(tmp_path / "gated.db")).locked()


def test_without_the_gate_the_same_load_meets_sqlite_busy(tmp_path: Path) -> None:
    """The control: the load above does contend (so the test above proves the gate serialises)."""
    engine = _bare_engine(tmp_path / "bare.db", gate=False)
    errors = _hammer(engine)
    assert errors and all(isinstance(e, OperationalError) and "locked" in str(e) for e in errors)


def test_gate_is_handed_back_after_commit_rollback_error_and_invalidate(tmp_path: Path) -> None:
    path = tmp_path / "bmi.db"
    engine = make_engine(f"sqlite:///{path}")
    sessions = make_session_factory(engine)
    gate = sqlite_gate.gate_for(str(path))

    with sessions.begin() as session:
        session.add(Project(name="p1"))
        session.flush()
        assert gate.locked()  # held while the transaction is open
    assert not gate.locked()

    with pytest.raises(RuntimeError), sessions.begin() as session:
        session.add(Project(name="p2"))
        session.flush()
        raise RuntimeError("body failed")
    assert not gate.locked()

    session = sessions()
    session.execute(text("SELECT 1"))
    assert gate.locked()
    session.connection().invalidate()
    assert not gate.locked()
    session.close()

    session = sessions()
    session.execute(text("SELECT 1"))
    session.close()  # rollback on close / return to the pool
    assert not gate.locked()

    with sessions.begin() as session:
        assert [p.name for p in session.query(Project).all()] == ["p1"]  # p2 rolled back, p1 kept
    # Another engine on the same file (e.g. Picasso's) shares the gate.
    other = make_engine(f"sqlite:///{path}")
    with other.begin() as conn:
        conn.execute(text("SELECT 1"))
        assert gate.locked()
    assert not gate.locked()

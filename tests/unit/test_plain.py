"""ims/database/plain.py on SQLite and PostgreSQL: the journal's plain-SQL transactions commit, roll back,
raise SQLAlchemy's errors, store what the ORM stores, and queue on the SQLite gate like every other
transaction of the process."""
from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import sessionmaker

from ims.database import make_engine, sqlite_gate
from ims.database.models import Lock, Operation, Task
from ims.database.plain import Plain


@pytest.fixture()
def engine(db_url: str) -> Any:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def test_commit_rollback_and_a_duplicate_key(engine: Any) -> None:
    plain = Plain(engine)
    when = datetime(2026, 11, 27, 10, 30, 15, 123456, tzinfo=UTC)
    with plain.transaction() as tx:
        tx.run("INSERT INTO lock (name, owner, purpose, acquired_at) VALUES (?, ?, ?, ?)",
               ("node:a", "h:1:1", "provision", tx.when(when)))
    with pytest.raises(RuntimeError), plain.transaction() as tx:
        tx.run("INSERT INTO lock (name, owner, purpose, acquired_at) VALUES (?, ?, ?, ?)",
               ("node:b", "h:1:1", "provision", tx.when(when)))
        raise RuntimeError("the caller failed: nothing of this transaction stays")
    with pytest.raises(IntegrityError), plain.transaction() as tx:  # as SQLAlchemy raises it: a held lock
        tx.many("INSERT INTO lock (name, owner, purpose, acquired_at) VALUES (?, ?, ?, ?)",
                [("node:c", "h:2:2", "provision", tx.when(when)), ("node:a", "h:2:2", "provision", tx.when(when))])
    with sessionmaker(bind=engine).begin() as session:  # the ORM reads what plain SQL wrote, the same way
        locks = session.scalars(select(Lock)).all()
        assert [(lk.name, lk.owner) for lk in locks] == [("node:a", "h:1:1")]  # all or none: no node:c
        assert locks[0].acquired_at.replace(tzinfo=locks[0].acquired_at.tzinfo or UTC) == when
    with plain.transaction() as tx:
        stored = tx.rows("SELECT acquired_at FROM lock WHERE name = ?", ("node:a",))[0][0]
        assert tx.datetime(stored).replace(tzinfo=UTC) == when  # type: ignore[union-attr]


def test_insert_returning_and_booleans_match_the_orm(engine: Any) -> None:
    plain = Plain(engine)
    with plain.transaction() as tx:
        now = tx.when(datetime.now(UTC))
        first = tx.insert("INSERT INTO operation (kind, args, steps, state, committed, owner, started_at, updated_at) "
                          "VALUES (?, '{}', '[]', 'running', ?, ?, ?, ?) RETURNING id",
                          ("provision", True, "h:1:1", now, now))
        second = tx.insert('INSERT INTO task (verb, project, "user", args, state, owner, cluster, journal_ops, '
                           "created_at) VALUES ('provision', 'p', 'u', '{}', 'queued', 'h:1:1', 'c', '[]', ?) "
                           "RETURNING id", (now,))
        assert tx.run("UPDATE operation SET committed = ? WHERE id = ?", (False, first)) == 1
        assert tx.run("UPDATE operation SET committed = ? WHERE id = ?", (False, first + 1000)) == 0
    with sessionmaker(bind=engine).begin() as session:
        op = session.get(Operation, first)
        assert op is not None and op.committed is False and op.kind == "provision"
        assert session.get(Task, second).user == "u"  # type: ignore[union-attr]


def test_a_plain_transaction_holds_the_sqlite_gate(tmp_path: Any) -> None:
    """While a plain-SQL transaction is open, another thread's transaction (through SQLAlchemy) waits on
    the process's gate, then runs: no busy-handler error, no interleaving."""
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}", busy_timeout_ms=5000)
    try:
        plain = Plain(engine)
        gate = sqlite_gate.gate_of(engine)[0]  # type: ignore[index]
        order: list[str] = []
        inside = threading.Event()

        def other() -> None:
            assert inside.wait(10)
            with sessionmaker(bind=engine).begin() as session:
                seen = session.scalars(select(Lock.name)).all()  # its BEGIN IMMEDIATE: through the gate
                order.append(f"other saw {sorted(seen)}")
                session.add(Lock(name="node:y", owner="h:1:1", purpose="p"))

        thread = threading.Thread(target=other)
        thread.start()
        with plain.transaction() as tx:
            tx.run("INSERT INTO lock (name, owner, purpose, acquired_at) VALUES (?, ?, ?, ?)",
                   ("node:x", "h:1:1", "p", tx.when(datetime.now(UTC))))
            assert gate.locked()  # held by this transaction: the other thread queues on it
            inside.set()
            time.sleep(0.3)
            order.append("plain")
        assert not gate.locked()  # handed back with the COMMIT
        thread.join(10)
        assert order == ["plain", "other saw ['node:x']"]
        with plain.transaction() as tx:
            assert sorted(r[0] for r in tx.rows("SELECT name FROM lock")) == ["node:x", "node:y"]
    finally:
        engine.dispose()


def test_database_errors_are_sqlalchemys(engine: Any) -> None:
    with pytest.raises(DBAPIError) as info, Plain(engine).transaction() as tx:
        tx.rows("SELECT no_such_column FROM lock")
    assert "no_such_column" in str(info.value)
    with Plain(engine).transaction() as tx:  # the connection went back to the pool usable
        assert tx.rows("SELECT count(*) FROM lock") == [(0,)]

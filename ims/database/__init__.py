"""Database access: engine creation (SQLite in WAL mode by default, PostgreSQL, any SQLAlchemy URL).

The schema comes from the migrations (ims/database/migrate.py), not ``create_all``: every
engine made here finds its database at the newest revision (upgraded, serialised, if it was not).
"""
from __future__ import annotations

import hashlib
import os

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from ims.database import sqlite_gate


def make_engine(url: str, busy_timeout_ms: int = 30000, ensure_schema: bool = True) -> Engine:
    """Create the engine (SQLite gets WAL, a busy timeout and foreign keys) with its schema at head."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = url[len("sqlite:///"):]
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
    engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (BEGIN IMMEDIATE below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            # BEGIN IMMEDIATE, with this process's threads queued on a lock (no busy-handler sleeps).
            sqlite_gate.install(engine, database, busy_timeout_ms / 1000.0)
        else:
            @event.listens_for(engine, "begin")
            def _begin_immediate(conn):  # type: ignore[no-untyped-def]
                # Take the write lock at BEGIN so two processes never deadlock upgrading read locks.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
    if ensure_schema:
        from ims.database import migrate

        migrate.ensure(engine)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, future=True)


def exclusive(session: Session, name: str) -> None:
    """Serialise this transaction with every other one that calls ``exclusive`` with ``name``.

    For read-then-write decisions that must see every other writer's result (admitting tasks
    under global bounds, taking over a dead process's locks).  SQLite serialises every
    transaction already (BEGIN IMMEDIATE); PostgreSQL (READ COMMITTED) takes a
    transaction-level advisory lock, released at commit or rollback.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(name)})


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory lock key :func:`exclusive` takes for ``name``."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)

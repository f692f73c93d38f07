"""Plain-SQL transactions for the journal's and the task queue's hottest writes.

Every operation writes about ten short transactions: its locks, its journal row and each step's
record (written before the step runs), its task's link and final state.  Through SQLAlchemy's
Core each cost ~0.3 ms of Python (statement objects, cache keys, an execution context, events)
around ~0.02 ms of SQLite, and on two cores that Python is what a provision waits for beyond
the storage work.  Here the same SQL runs on the engine's own pooled DBAPI connection:

* the same transaction: SQLite ``BEGIN IMMEDIATE`` ... ``COMMIT`` in WAL mode with ``synchronous =
  NORMAL`` (the connection's pragmas are the engine's), taken through the same per-file gate as
  every other transaction of the process (ims/database/sqlite_gate.py); PostgreSQL's implicit
  ``BEGIN`` ... ``COMMIT`` (READ COMMITTED), exactly as SQLAlchemy issues them;
* the same values: datetimes go through SQLAlchemy's own bind processor for the dialect (SQLite
  stores them as the same text), booleans and text as the DBAPI adapts them;
* the same errors: a DBAPI error is raised as SQLAlchemy's wrapper (``IntegrityError`` for a
  duplicate key: a lock already held), so callers catch what they caught before.

Statements are written with ``?`` placeholders (converted to ``%s`` for a ``format`` DBAPI such
as psycopg2) and never contain a literal ``?`` or ``%``.  Names and values are always parameters.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Engine
from sqlalchemy.exc import DBAPIError

from ims.database import sqlite_gate

LOG = logging.getLogger(__name__)


class PlainTx:
    """One open transaction: run statements on its cursor."""

    def __init__(self, plain: Plain, cursor: Any) -> None:
        self._plain = plain
        self._cursor = cursor

    def _call(self, method: str, sql: str, params: Any) -> Any:
        statement = self._plain.sql(sql)
        try:
            return getattr(self._cursor, method)(statement, params)
        except self._plain.dbapi_error as exc:
            raise DBAPIError.instance(statement, params, exc, self._plain.dbapi_error) from exc

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute one statement; the number of rows it changed."""
        self._call("execute", sql, tuple(params))
        return int(self._cursor.rowcount)

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._call("executemany", sql, [tuple(r) for r in rows])

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._call("execute", sql, tuple(params))
        return [tuple(r) for r in self._cursor.fetchall()]

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """An ``INSERT ... RETURNING id`` (SQLite >= 3.35, PostgreSQL): the new row's id."""
        self._call("execute", sql, tuple(params))
        row = self._cursor.fetchone()
        self._cursor.fetchall()  # SQLite completes the statement only once its rows are read
        return int(row[0])

    def when(self, value: datetime | None) -> Any:
        """A datetime as the dialect stores it (SQLAlchemy's own bind processor)."""
        return self._plain.when(value)

    def datetime(self, value: Any) -> datetime | None:
        """A datetime column's value as read, as a datetime (SQLAlchemy's own result processor)."""
        return self._plain.datetime(value)

    def exclusive(self, name: str) -> None:
        """``ims.database.exclusive`` in this transaction: SQLite's BEGIN IMMEDIATE serialises it already;
        PostgreSQL takes the same transaction-level advisory lock."""
        if not self._plain.sqlite:
            from ims.database import advisory_key

            self.rows("SELECT pg_advisory_xact_lock(?)", (advisory_key(name),))


class Plain:
    """Plain-SQL transactions on ``engine``'s pool (one per engine, shared by its threads)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        self.sqlite = dialect.name == "sqlite"
        self._format = dialect.paramstyle in ("format", "pyformat")
        self.dbapi_error: type[BaseException] = dialect.loaded_dbapi.Error
        impl = DateTime(timezone=True).dialect_impl(dialect)
        self._when = impl.bind_processor(dialect) or (lambda value: value)
        self._read_when = impl.result_processor(dialect, None) or (lambda value: value)
        self._gate = sqlite_gate.gate_of(engine)
        self._statements: dict[str, str] = {}

    def sql(self, text: str) -> str:
        statement = self._statements.get(text)
        if statement is None:
            statement = self._statements[text] = text.replace("?", "%s") if self._format else text
        return statement

    def when(self, value: datetime | None) -> Any:
        return None if value is None else self._when(value)

    def datetime(self, value: Any) -> datetime | None:
        return None if value is None else self._read_when(value)

    def within(self, session: Any) -> PlainTx:
        """Statements in the transaction an ORM session (or Core connection) already has open."""
        return PlainTx(self, session.connection().connection.cursor())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PlainTx]:
        """``BEGIN`` (SQLite: ``IMMEDIATE``, through the gate) ... ``COMMIT``; ``ROLLBACK`` on any error."""
        conn = self.engine.raw_connection()
        try:
            if self._gate is not None:
                sqlite_gate.hold(conn.info, *self._gate)
            cursor = conn.cursor()
            try:
                if self.sqlite:
                    cursor.execute("BEGIN IMMEDIATE")
                yield PlainTx(self, cursor)
                if self.sqlite:
                    cursor.execute("COMMIT")
                else:
                    conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    if self.sqlite:
                        if conn.dbapi_connection is not None and conn.dbapi_connection.in_transaction:
                            cursor.execute("ROLLBACK")
                    else:
                        conn.rollback()
                raise
            finally:
                cursor.close()
        except self.dbapi_error as exc:  # BEGIN / COMMIT themselves (e.g. the database is locked)
            raise DBAPIError.instance(None, None, exc, self.dbapi_error) from exc
        finally:
            sqlite_gate.release(conn.info)
            conn.close()  # back to the pool

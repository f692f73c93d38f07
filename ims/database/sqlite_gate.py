"""Hand SQLite's write lock between the threads of one process without sleeping.

Every SQLite transaction BMI opens is ``BEGIN IMMEDIATE`` (it takes the database's write lock at
once, so two writers never deadlock upgrading read locks).  A second ``BEGIN IMMEDIATE`` while the
lock is held does not wait for it to be released: SQLite's busy handler *sleeps* 1, 2, 5, ... up to
100 ms between retries, so under a batch a worker's threads spent much of their time asleep while
the lock was free.  Here the threads of one process queue on a process-local lock per database
file first, taken just before ``BEGIN IMMEDIATE`` and released right after the ``COMMIT`` or
``ROLLBACK``: the next thread starts the moment the previous one ends.  Other processes (the other
Einstein workers, Picasso, the CLI) still meet SQLite's own lock and its busy handler, exactly as
before.

Nothing about durability or isolation changes: the same ``BEGIN IMMEDIATE`` / ``COMMIT`` run, in
WAL mode with ``synchronous = NORMAL``.  The gate is only ever held while this process holds (or is
about to take) SQLite's write lock, so it adds no wait that SQLite would not impose anyway; a
gate not handed back within the busy timeout is bypassed (logged) and SQLite decides, so a bug
here can never hang the process.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from sqlalchemy import Engine, event

LOG = logging.getLogger(__name__)

_HELD = "bmi_sqlite_gate"  # key in the pool record's info: the gate this connection holds
_GATES: dict[str, threading.Lock] = {}
_GATES_LOCK = threading.Lock()


def gate_for(path: str) -> threading.Lock:
    """The process-wide gate of one database file (every engine on that file shares it)."""
    key = os.path.realpath(path)
    with _GATES_LOCK:
        return _GATES.setdefault(key, threading.Lock())


# engine -> (its gate, the busy timeout in s), for transactions run on its raw connections
# (ims/database/plain.py)
_ENGINES: weakref.WeakKeyDictionary[Engine, tuple[threading.Lock, float]] = weakref.WeakKeyDictionary()


def gate_of(engine: Engine) -> tuple[threading.Lock, float] | None:
    """The gate :func:`install` put on ``engine`` and its timeout; None if it has none."""
    return _ENGINES.get(engine)


def hold(info: dict[str, Any], gate: threading.Lock, timeout_s: float) -> None:
    """Take ``gate`` for the pooled connection whose record's ``info`` this is (as ``BEGIN`` does
    here); its COMMIT/ROLLBACK or its return to the pool hands it back (or :func:`release`)."""
    if _HELD in info:
        return
    if gate.acquire(timeout=timeout_s):
        info[_HELD] = gate
    else:
        LOG.warning("a transaction of this process held the database for more than %.0f s; "
                    "going on without waiting for it (SQLite's own lock decides)", timeout_s)


def release(info: Any) -> None:
    """Hand back the gate the connection with this ``info`` holds, if any."""
    _release(info)


def _release(info: Any) -> None:
    if not isinstance(info, dict):
        return
    gate = info.pop(_HELD, None)
    if gate is not None:
        gate.release()


def _info_of(conn: Any) -> Any:
    # The pool's proxy has the record's info dict; the bare connection of a first connect has none.
    try:
        return conn.info
    except (AttributeError, NotImplementedError):
        return None


def install(engine: Engine, path: str, timeout_s: float) -> None:
    """Run every transaction of ``engine`` (a file SQLite database at ``path``) through its gate.

    Takes over the engine's ``begin`` (``BEGIN IMMEDIATE``), and wraps its dialect's commit and
    rollback (the pool's rollback-on-return included) to hand the gate back after them.
    """
    gate = gate_for(path)
    dialect = engine.dialect
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    _ENGINES[engine] = (gate, timeout_s)

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):  # type: ignore[no-untyped-def]
        info = conn.connection.info
        hold(info, gate, timeout_s)
        try:
            # Take the write lock at BEGIN so two processes never deadlock upgrading read locks.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(info)
            raise

    def _commit(dbapi_conn):  # type: ignore[no-untyped-def]
        try:
            do_commit(dbapi_conn)
        finally:
            _release(_info_of(dbapi_conn))

    def _rollback(dbapi_conn):  # type: ignore[no-untyped-def]
        try:
            do_rollback(dbapi_conn)
        finally:
            _release(_info_of(dbapi_conn))

    dialect.do_commit = _commit  # type: ignore[method-assign]
    dialect.do_rollback = _rollback  # type: ignore[method-assign]

    # A connection that goes back to the pool, is invalidated or closed never keeps the gate.
    for name in ("checkin", "close", "invalidate", "soft_invalidate", "detach"):
        event.listen(engine.pool, name, _on_pool_event(name))


def _on_pool_event(name: str):  # type: ignore[no-untyped-def]
    def handler(_dbapi_conn, record, *_rest):  # type: ignore[no-untyped-def]
        if record is not None:
            _release(record.info)
    handler.__name__ = f"_release_on_{name}"
    return handler

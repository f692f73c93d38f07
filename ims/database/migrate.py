"""Schema migrations (alembic, ims/database/migrations): ``upgrade(url)`` brings a database to head.

One upgrade runs in ONE transaction, serialised across processes and hosts (SQLite: BEGIN
IMMEDIATE takes the write lock; PostgreSQL: a transaction-level advisory lock), so two
processes upgrading at once never both apply a migration, and a failed upgrade changes nothing.

Databases without an ``alembic_version`` table are adopted:

* no tables: the baseline creates them;
* the original BMI's ``project``/``image`` (no ``image.kind``): the baseline converts them in
  place, keeping every row and id (ims/database/migrations/schema_0001.py);
* tables an earlier BMI made with ``create_all``: missing baseline tables and columns are
  added, the database is stamped at the baseline, and later revisions follow.

``ensure(engine)`` is what :func:`ims.database.make_engine` runs: nothing when the database is at
head (one SELECT), an upgrade otherwise (a fresh test database, a process started without
Einstein's supervisor).  Einstein's supervisor and ``bmi-manage db upgrade`` call ``upgrade``.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from ims.common.errors import ConfigError
from ims.database.migrations import schema_0001

LOG = logging.getLogger(__name__)
# alembic announces its plugins and dialect at INFO in every process that checks the schema: noise
logging.getLogger("alembic").setLevel(logging.WARNING)
SCRIPTS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key of schema upgrades (any constant unique within BMI's keys).
UPGRADE_LOCK_KEY = 0x424D49_0001


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    found = _script().get_current_head()
    assert found is not None
    return found


def current(conn: Connection) -> str | None:
    """The database's revision; None when it has no alembic_version table (never migrated)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (adopting an unversioned one first)."""
    from ims.database import make_engine

    engine = make_engine(url, ensure_schema=False)
    try:
        upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def ensure(engine: Engine) -> None:
    """Upgrade to head unless the database is there already (the common case: one query)."""
    with engine.connect() as conn:
        try:
            at = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            at = None  # no such table: a new database, or one never migrated
        conn.rollback()
    if at == head():
        return
    upgrade_engine(engine)


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # SQLite rebuilds a table to change a column: foreign keys must not act on the copy.
            # The pragma is a no-op inside a transaction, so it is set before BEGIN.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                if not sqlite:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})
                before = current(conn)
                _check_known(before)
                if before is None:
                    _adopt(conn)
                command.upgrade(_config(conn), revision)
                after = current(conn)
                if sqlite:
                    broken = conn.execute(text("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise ConfigError(f"the upgraded database has rows whose references are broken: "
                                          f"{broken[:5]}; nothing was changed")
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys = ON")  # type: ignore[union-attr]
    if before != after:
        LOG.warning("database schema upgraded from %s to %s", before or "an unversioned schema", after)


def _check_known(revision: str | None) -> None:
    if revision is None:
        return
    try:
        _script().get_revision(revision)
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown id
        raise ConfigError(f"the database schema is at revision {revision}, which this BMI does not know "
                          f"(its newest is {head()}): run a BMI at least as new as the one that upgraded it"
                          ) from None


def _adopt(conn: Connection) -> None:
    """Stamp a database an earlier BMI made with create_all (it has ``image.kind``) at the baseline."""
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    if "image" not in tables or "kind" not in {c["name"] for c in insp.get_columns("image")}:
        return  # empty, or the original BMI's tables: the baseline migration handles both
    md = schema_0001.metadata()
    missing = [t for t in md.sorted_tables if t.name not in tables]
    md.create_all(conn, tables=missing)
    if "connected" not in {c["name"] for c in insp.get_columns("provision")}:
        conn.execute(text("ALTER TABLE provision ADD COLUMN connected BOOLEAN"))
    LOG.warning("adopting a database made before migrations: stamped at revision %s", schema_0001.REVISION)
    command.stamp(_config(conn), schema_0001.REVISION)

"""BMI's tables as of the baseline revision 0001, frozen here (never import the live models).

Migrations describe a fixed point in history: the models in ims/database/models.py move on,
this file does not.  Used by the baseline migration (a fresh database, or the original BMI's
``project``/``image`` tables converted in place) and by :mod:`ims.database.migrate` to adopt a
database an earlier BMI made with ``create_all`` (before there were migrations).
"""
from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)

REVISION = "0001"


def metadata() -> MetaData:
    md = MetaData()
    Table("project", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("name", String(64), nullable=False, unique=True),
          Column("provision_network", String(64), nullable=True),
          sqlite_autoincrement=True)
    Table("image", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("name", String(64), nullable=False),
          Column("is_public", Boolean, nullable=False),
          Column("is_snapshot", Boolean, nullable=False),
          Column("project_id", Integer, ForeignKey("project.id"), nullable=False),
          Column("parent_id", Integer, ForeignKey("image.id", ondelete="SET NULL"), nullable=True),
          Column("kind", String(16), nullable=False),
          UniqueConstraint("project_id", "name", name="_project_id_image_name_unique_constraint"),
          sqlite_autoincrement=True)
    Table("provision", md,
          Column("node", String(64), primary_key=True),
          Column("project_id", Integer, ForeignKey("project.id"), nullable=False),
          Column("image_id", Integer, ForeignKey("image.id"), nullable=False),
          Column("nic", String(64), nullable=False),
          Column("mac", String(17), nullable=False),
          Column("network", String(64), nullable=True),
          Column("connected", Boolean, nullable=True),
          Column("created_at", DateTime(timezone=True), nullable=False))
    Table("operation", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("kind", String(32), nullable=False),
          Column("args", Text, nullable=False),
          Column("steps", Text, nullable=False),
          Column("state", String(16), nullable=False),
          Column("committed", Boolean, nullable=False),
          Column("owner", String(128), nullable=False),
          Column("error", Text, nullable=True),
          Column("started_at", DateTime(timezone=True), nullable=False),
          Column("updated_at", DateTime(timezone=True), nullable=False),
          sqlite_autoincrement=True)
    Table("lock", md,
          Column("name", String(160), primary_key=True),
          Column("owner", String(128), nullable=False),
          Column("purpose", String(64), nullable=False),
          Column("acquired_at", DateTime(timezone=True), nullable=False))
    Table("task", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("verb", String(32), nullable=False),
          Column("project", String(64), nullable=False),
          Column("user", String(64), nullable=False),
          Column("args", Text, nullable=False),
          Column("state", String(16), nullable=False, index=True),
          Column("owner", String(128), nullable=False),
          Column("gateway", String(160), nullable=True),
          Column("cluster", String(160), nullable=False),
          Column("journal_ops", Text, nullable=False),
          Column("result", Text, nullable=True),
          Column("error", Text, nullable=True),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Column("started_at", DateTime(timezone=True), nullable=True),
          Column("finished_at", DateTime(timezone=True), nullable=True),
          sqlite_autoincrement=True)
    Table("flatten_job", md,
          Column("image", String(128), primary_key=True),
          Column("source", String(128), nullable=False),
          Column("snap", String(128), nullable=False),
          Column("state", String(16), nullable=False),
          Column("owner", String(128), nullable=True),
          Column("done", Integer, nullable=False),
          Column("total", Integer, nullable=False),
          Column("attempts", Integer, nullable=False),
          Column("error", Text, nullable=True),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Column("updated_at", DateTime(timezone=True), nullable=False))
    return md


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


def adopt_original(conn: Connection, tables: set[str]) -> None:
    """Convert the original BMI's ``project`` and ``image`` tables into the baseline's, keeping every row.

    The original (SQLAlchemy ``create_all``, no migrations) had ``project(id, name[,
    provision_network NOT NULL])`` (the column was dropped in its last version) and
    ``image(id, name, is_public, is_snapshot, project_id, parent_id)``, ids without
    AUTOINCREMENT.  Rows keep their ids (Ceph names are ``<uid>img<id>``); from here on ids
    are never handed out again.  ``kind`` follows from the row: a snapshot, a golden image (no
    parent) or a clone.  A clone becomes a ``disk`` (the split API's word for a clone): the
    original recorded no MAC/NIC for the node booting it, so only ``bmi disk delete`` or
    ``bmi pro PROJECT NODE DISK NIC`` can manage it, never the guide's ``dpro``.
    """
    had = [t for t in ("image", "project") if t in tables]
    for table in had:
        conn.execute(text(f'ALTER TABLE "{table}" RENAME TO "_original_{table}"'))
    md = metadata()
    md.tables["project"].create(conn)
    md.tables["image"].create(conn)
    if "project" in had:
        network = "provision_network" if "provision_network" in _columns(conn, "_original_project") else "NULL"
        conn.execute(text(f"INSERT INTO project (id, name, provision_network) "
                          f"SELECT id, name, {network} FROM _original_project ORDER BY id"))
    if "image" in had:
        conn.execute(text(
            "INSERT INTO image (id, name, is_public, is_snapshot, project_id, parent_id, kind) "
            "SELECT id, name, COALESCE(is_public, false), COALESCE(is_snapshot, false), project_id, parent_id, "
            "CASE WHEN is_snapshot THEN 'snapshot' WHEN parent_id IS NULL THEN 'golden' ELSE 'disk' END "
            "FROM _original_image ORDER BY id"))
    for table in had:
        conn.execute(text(f'DROP TABLE "_original_{table}"'))

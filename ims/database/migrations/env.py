"""Alembic environment: always run by ims.database.migrate, which passes the connection.

The connection comes in a transaction that ``migrate`` opened and serialised (SQLite: BEGIN
IMMEDIATE; PostgreSQL: an advisory lock), so every migration of one upgrade commits or none.
"""
from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run BMI's migrations with `bmi-manage db upgrade` (ims.database.migrate.upgrade)")
# render_as_batch: SQLite changes a column by copying its table (ALTER COLUMN does not exist there).
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

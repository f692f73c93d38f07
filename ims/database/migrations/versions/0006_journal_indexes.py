"""Indexes for what every operation reads, so its cost does not grow with the history kept.

* ``operation (state, updated_at)``: every lock taken looks for unfinished journal rows under it
  (``state IN ('running', 'failed')``); recovery reaps idle uploads and forgets old rows by state
  and age.  Without it each read scans every row kept (30 days, ~1 KiB each: ~30 ms at 60,000
  rows) while holding the database's write lock.
* ``task (state, finished_at)`` in place of ``task (state)``: admission reads the queued and
  running tasks (the same prefix); recovery forgets finished ones older than 30 days by
  (state, finished_at), which ``task (state)`` answered by reading every finished task kept.
* ``image (parent_id)`` and ``provision (image_id)``: an image's children and the node booting
  from it, asked by deprovision, snapshot and image removal.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_operation_state_updated_at", "operation", ["state", "updated_at"]),
    ("ix_task_state_finished_at", "task", ["state", "finished_at"]),
    ("ix_image_parent_id", "image", ["parent_id"]),
    ("ix_provision_image_id", "provision", ["image_id"]),
)


# Replaced by ix_task_state_finished_at (its first column).
OLD_TASK_STATE = "ix_task_state"


def upgrade() -> None:
    # Idempotent like the others: a database made by create_all already has them.
    inspector = sa.inspect(op.get_bind())
    for name, table, columns in INDEXES:
        if name not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(name, table, columns)
    if OLD_TASK_STATE in {i["name"] for i in inspector.get_indexes("task")}:
        op.drop_index(OLD_TASK_STATE, table_name="task")


def downgrade() -> None:
    op.create_index(OLD_TASK_STATE, "task", ["state"])
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)

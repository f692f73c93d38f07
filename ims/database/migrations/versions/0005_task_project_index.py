"""The scheduler's fair order: an index on ``task (project, started_at)``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEX = "ix_task_project_started_at"


def upgrade() -> None:
    # Idempotent like the others: a database made by create_all already has it.
    if INDEX not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("task")}:
        op.create_index(INDEX, "task", ["project", "started_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="task")

"""Baseline: BMI's tables; adopts the original BMI's ``project`` and ``image`` tables if present.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ims.database.migrations import schema_0001

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    tables = set(sa.inspect(bind).get_table_names())
    # A database without alembic_version that has these tables is the original BMI's (a database
    # an earlier BMI made with create_all was stamped 0001 by ims.database.migrate instead).
    if tables & {"project", "image"}:
        schema_0001.adopt_original(bind, tables)
    schema_0001.metadata().create_all(bind, checkfirst=True)


def downgrade() -> None:
    raise NotImplementedError("the baseline cannot be downgraded")

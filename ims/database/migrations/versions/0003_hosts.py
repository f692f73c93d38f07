"""Several hosts (ims/einstein/hosts.py): the ``host`` registry and ``provision.gateway``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "host" in inspector.get_table_names():
        # made by a development build's create_all before this revision existed: keep it
        if "gateway" not in {c["name"] for c in inspector.get_columns("provision")}:
            op.add_column("provision", sa.Column("gateway", sa.String(64), nullable=True))
        return
    op.create_table(
        "host",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("portal", sa.String(128), nullable=False),
        sa.Column("rpc", sa.String(128), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("taken_over_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("taken_over_by", sa.String(64), nullable=True),
    )
    # A nullable column: a plain ADD COLUMN on SQLite too (no table rebuild).
    op.add_column("provision", sa.Column("gateway", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("provision") as batch:
        batch.drop_column("gateway")
    op.drop_table("host")

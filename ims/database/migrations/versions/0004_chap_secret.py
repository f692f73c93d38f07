"""CHAP (ims/einstein/iscsi/chap.py): ``image.chap_secret``, the secret of a node clone's target.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: a plain ADD COLUMN on SQLite too (no table rebuild, the id counter stays).
    if "chap_secret" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("image")}:
        op.add_column("image", sa.Column("chap_secret", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("chap_secret")

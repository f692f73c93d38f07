"""``image.kind`` gets the server default ``golden``: rows the original BMI's own tools insert
(they know no ``kind``) are golden images, as ``bmi db create`` meant.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _sequence(bind: sa.Connection) -> int | None:
    if bind.dialect.name != "sqlite":
        return None
    return bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'image'")).scalar()


def _restore_sequence(bind: sa.Connection, seq: int | None) -> None:
    """SQLite copies the table: keep its AUTOINCREMENT counter, so a deleted id is never reused."""
    if seq is None:
        return
    updated = bind.execute(sa.text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'image'"),
                           {"seq": seq})
    if not updated.rowcount:
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('image', :seq)"), {"seq": seq})


def _alter(server_default: str | None) -> None:
    bind = op.get_bind()
    seq = _sequence(bind)
    with op.batch_alter_table("image", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column("kind", existing_type=sa.String(16), existing_nullable=False,
                           server_default=server_default)
    _restore_sequence(bind, seq)


def upgrade() -> None:
    _alter("golden")


def downgrade() -> None:
    _alter(None)

"""Alembic migrations of BMI's database (applied by :func:`ims.database.migrate.upgrade`)."""

"""Bring a BMI database's schema up to date: ``upgrade(url)`` (``bmi-manage db upgrade``).

This version creates any missing table (``make_engine`` runs ``create_all``); schema migrations of
existing tables belong here too, so installs and upgrades have one entry point.
"""
from __future__ import annotations

from ims.database import make_engine


def upgrade(url: str) -> None:
    """Create or upgrade the schema of the database at SQLAlchemy ``url``."""
    make_engine(url).dispose()

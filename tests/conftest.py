"""Shared fixtures: real daemons (Ceph, tgtd, HIL simulator, PostgreSQL) started once per session.

Database backends: tests that take the ``db_url`` fixture (tests/support/pg.py) run once per
backend, with ``[sqlite]`` / ``[postgresql]`` in their ids (docs/deployment.md lists them).
"""
pytest_plugins = ["tests.support.ceph", "tests.support.tgt", "tests.support.hil", "tests.support.pg"]

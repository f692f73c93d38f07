"""Shared fixtures: real daemons (Ceph, tgtd, HIL simulator, PostgreSQL) started once per session.

Database backends: tests that take the ``db_url`` fixture (tests/support/pg.py) run once per
backend, with ``[sqlite]`` / ``[postgresql]`` in their ids (docs/deployment.md lists them).
"""
pytest_plugins = ["tests.support.ceph", "tests.support.tgt", "tests.support.hil", "tests.support.pg"]

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undo a test's ``ims.common.log.setup``: its console handler writes to the stderr pytest
    captured for THAT test, which is closed afterwards -- a background thread of that test still
    logging later ("I/O operation on closed file") must not print tracebacks into other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)

"""Shared fixtures: real daemons (Ceph, tgtd, HIL simulator) started once per session."""
pytest_plugins = ["tests.support.ceph", "tests.support.tgt", "tests.support.hil"]

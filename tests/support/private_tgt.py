"""Real Operations over a PRIVATE tgtd, for the tests that restart or crash tgtd (the session's shared
tgtd is left alone): a throwaway Ceph cluster, the HIL simulator and SQLite on disk, as
tests/integration/test_operations_real.py's RealEnv builds them."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.tgt import TgtdInstance, start_tgtd, stop_tgtd


@contextlib.contextmanager
def private_tgtd(tmp_path: Path) -> Iterator[TgtdInstance]:
    """A tgtd of its own (own control port and conf), stopped afterwards."""
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    try:
        yield instance
    finally:
        stop_tgtd(instance)


@contextlib.contextmanager
def private_tgtd_env(tmp_path: Path, ceph_cluster: Any, hil_sim: Any) -> Iterator[Any]:
    """A RealEnv (Ceph driver) whose iSCSI target is a private tgtd; closed, then the tgtd stopped."""
    # Imported here: tests/support must not import a test module at import time.
    from tests.integration.test_operations_real import RealEnv

    with private_tgtd(tmp_path) as instance:
        env = RealEnv(tmp_path, "ceph", ceph_cluster, instance, hil_sim)
        try:
            yield env
        finally:
            env.close()

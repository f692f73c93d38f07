"""Pytest fixtures for a real throwaway Ceph cluster and the storage drivers.

Use them from a conftest.py or a test module::

    pytest_plugins = ["tests.support.ceph"]          # in the top-level tests/conftest.py, or
    from tests.support.ceph import ceph_cluster, ceph_storage, file_storage  # noqa: F401

``ceph_cluster`` (session) runs ``scripts/ceph-dev start`` in a private temp dir and stops
it at session end, even when tests fail.  If the cluster cannot start, the test FAILS
with the tail of the script's output and logs; it is never skipped.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ims.common.errors import BMIError, CommandFailed, ImageBusy, NotFound
from ims.common.process import execute
from ims.einstein.storage.base import Storage
from ims.einstein.storage.ceph import CephStorage
from ims.einstein.storage.file import FileStorage

REPO = Path(__file__).resolve().parents[2]
CEPH_DEV = str(REPO / "scripts" / "ceph-dev")
START_TIMEOUT = 180.0


@dataclass
class CephCluster:
    """A running throwaway cluster: where its files are and how to talk to it."""

    dir: str
    conf: str
    keyring: str
    pool: str = "rbd"
    client_id: str = "admin"
    env: dict[str, str] = field(default_factory=dict)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """Run the ``rbd`` CLI against this cluster; returns stdout. :raises CommandFailed:"""
        out, _err = execute("rbd", *args, timeout=timeout, env=self.env)
        return out

    def storage(self) -> CephStorage:
        return CephStorage(self.pool, self.conf, self.client_id, self.keyring)


def _log_tail(run_dir: str, lines: int = 40) -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(run_dir, "log", "*"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            continue
        parts.append(f"--- {path} (last {len(tail)} lines)\n{''.join(tail)}")
    return "\n".join(parts)


def start_cluster(base: str, pools: str = "rbd") -> CephCluster:
    """Start a cluster in ``base/cluster``; pytest.fail with the logs if it cannot start."""
    run_dir = os.path.join(base, "cluster")
    env = dict(os.environ, CEPH_POOLS=pools)
    failure = ""
    try:
        out, _err = execute(CEPH_DEV, "start", run_dir, timeout=START_TIMEOUT, env=env)
    except CommandFailed as exc:
        # The script already stopped what it started; stop again in case it was killed midway.
        execute(CEPH_DEV, "stop", run_dir, timeout=60, check_exit_code=(0, 1))
        failure = (f"the throwaway Ceph cluster did not start (exit {exc.exit_code})\n"
                   f"--- scripts/ceph-dev stderr\n{exc.stderr[-4000:]}\n{_log_tail(run_dir)}")
    if failure:  # outside the except block, so the report is not buried in a chained traceback
        pytest.fail(failure, pytrace=False)
    conf = out.strip().splitlines()[-1]
    cluster_env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
    cluster_env["CEPH_CONF"] = conf
    return CephCluster(dir=run_dir, conf=conf, keyring=os.path.join(run_dir, "keyring"),
                       pool=pools.split()[0], env=cluster_env)


def stop_cluster(cluster: CephCluster, purge: bool = True) -> None:
    cluster.storage().close()  # drop librados' session before its mon goes away
    args = [CEPH_DEV, "stop", cluster.dir] + (["--purge"] if purge else [])
    execute(*args, timeout=120)


def purge_images(storage: Storage, prefix: str = "") -> None:
    """Remove every image whose name starts with ``prefix``: clones first, then snapshots, then parents."""
    for _round in range(10):
        images = [i for i in storage.list_images() if i.startswith(prefix)]
        if not images:
            return
        for image in images:
            try:
                for snap in storage.list_snapshots(image):
                    if storage.list_children(image, snap):
                        raise ImageBusy(f"{image}@{snap} still has clones")
                    storage.unprotect_snapshot(image, snap)
                    storage.remove_snapshot(image, snap)
                storage.remove_image(image)
            except (ImageBusy, NotFound):
                continue  # a clone of it goes first, in this round; retry next round
    left = [i for i in storage.list_images() if i.startswith(prefix)]
    if left:
        raise BMIError(f"could not remove test images: {left}")


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    base = tempfile.mkdtemp(prefix="bmi-ceph-")
    try:
        cluster = start_cluster(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        try:
            stop_cluster(cluster)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ceph_storage(ceph_cluster: CephCluster) -> CephStorage:
    return ceph_cluster.storage()


@pytest.fixture
def file_storage(tmp_path: Path) -> FileStorage:
    return FileStorage(str(tmp_path / "store"))

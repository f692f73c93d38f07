"""O(1) import, snapshot and cp on REAL Ceph (issue 8): what happens while a background flatten runs.

A throwaway bluestore cluster holds a 1 GiB source image with every byte written, so each
flatten copies 1 GiB and takes seconds here: the "while it runs" cases below happen while
librbd is really copying (each checks that the job is running before it acts).  The flatten
runs in a thread, as in every Einstein worker (``ims.einstein.flatten.start``), or in a child
process that is killed mid-flatten.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from sqlalchemy import select

from ims.database.models import Image
from ims.einstein import flatten
from ims.einstein.journal import owner_alive
from tests.integration.test_operations_real import MAC, NET, NIC, NODE, NODE_INITIATOR, USER, RealEnv
from tests.support import iscsi_rw
from tests.support.ceph import start_cluster, stop_cluster

BIG = "big-source"
BIG_SIZE = 1 << 30
PATTERN = os.urandom(8 << 20)  # written over and over: every object of BIG holds data
CHUNK = 64 << 20
TIMEOUT = 600.0  # generous: the machine is shared; no test asserts a duration


def expected(offset: int, length: int) -> bytes:
    out = bytearray()
    while length:
        pos = offset % len(PATTERN)
        n = min(length, len(PATTERN) - pos)
        out += PATTERN[pos:pos + n]
        offset, length = offset + n, length - n
    return bytes(out)


SPOTS = [0, 5 << 20, 333 << 20, BIG_SIZE - 4096]


def same_as_source(storage, image: str) -> bool:
    return all(storage.read(image, off, 4096) == expected(off, 4096) for off in SPOTS)


@pytest.fixture(scope="module")
def bluestore_cluster():
    base = tempfile.mkdtemp(prefix="bmi-ceph-bs-")
    try:
        with mock.patch.dict(os.environ, {"CEPH_OBJECTSTORE": "bluestore"}):
            cluster = start_cluster(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        st = cluster.storage()
        st.create_image(BIG, BIG_SIZE)
        chunk = PATTERN * (CHUNK // len(PATTERN))
        for off in range(0, BIG_SIZE, CHUNK):
            st.write(BIG, off, chunk)
        yield cluster
    finally:
        try:
            stop_cluster(cluster)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def env(tmp_path, bluestore_cluster, tgtd, hil_sim) -> Iterator[RealEnv]:
    e = RealEnv(tmp_path, "ceph", bluestore_cluster, tgtd, hil_sim)
    stop = threading.Event()
    e.stop_flatten = stop  # type: ignore[attr-defined]
    yield e
    stop.set()
    e.close()
    assert [i for i in e.ops.storage.list_images() if i.startswith("4242")] == []
    assert e.ops.storage.list_snapshots(BIG) == []  # the source is left as it was


def wait_for(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def ceph_of(env: RealEnv, name: str) -> str:
    with env.ops.journal.session() as s:
        row = s.scalars(select(Image).where(Image.name == name)).one()
        return env.ceph(row.id)


def job(env: RealEnv, image: str) -> dict | None:
    return flatten.job_of(env.ops.core, image)


def running(env: RealEnv, image: str) -> bool:
    j = job(env, image)
    return j is not None and j["state"] == "running" and j["progress"] > 0


def start_worker(env: RealEnv) -> None:
    assert flatten.start(env.ops.core, env.stop_flatten) is not None  # type: ignore[attr-defined]


def no_jobs(env: RealEnv) -> bool:
    with env.ops.journal.session() as s:
        return s.scalars(select(flatten.FlattenJob)).first() is None


def test_import_provision_and_snapshot_while_flattening(env):
    ops, st = env.ops, env.ops.storage
    ops.import_image(USER, "bmi_infra", BIG)
    gold = ceph_of(env, BIG)
    # O(1): still a clone of a transient snapshot of the source, listed, with a queued job
    (tmp,) = st.list_snapshots(BIG)
    assert st.parent_info(gold) == (BIG, tmp) and job(env, gold)["state"] == "queued"
    assert ops.list_images(USER, "bmi_infra") == [BIG]
    start_worker(env)
    wait_for("the import's flatten to run", lambda: running(env, gold))

    # provisioning from the image while its flatten runs: the node reads the image's bytes
    ops.provision(USER, "bmi_infra", NODE, BIG, NET, NIC)
    assert job(env, gold) is not None, "the flatten ended before the provision: nothing was tested"
    node = ceph_of(env, NODE)
    iqn = ops.iscsi.iqn(node)
    chap = iscsi_rw.conf_chap(ops.iscsi.conf_path(node))   # [iscsi] chap is on by default
    assert iscsi_rw.read_lun(env.tgtd.portal, iqn, 1, 0, 8, initiator=NODE_INITIATOR, chap=chap) == expected(0, 4096)
    iscsi_rw.write_lun(env.tgtd.portal, iqn, 1, 0, b"N" * 512, initiator=NODE_INITIATOR, chap=chap)

    # snapshotting the node (twice: again while the first snapshot's flatten runs)
    ops.create_snapshot(USER, "bmi_infra", NODE, "s1")
    s1 = ceph_of(env, "s1")
    wait_for("the snapshot's flatten to run", lambda: running(env, s1) or running(env, gold))
    ops.create_snapshot(USER, "bmi_infra", NODE, "s2")
    s2 = ceph_of(env, "s2")
    assert job(env, s1) is not None or job(env, gold) is not None
    assert sorted(r[1] for r in ops.db_list(USER)) == sorted([BIG, NODE, "s1", "s2"])

    wait_for("every flatten to finish", lambda: no_jobs(env))
    for image in (gold, s1, s2):
        assert st.parent_info(image) is None and st.is_protected(image, "snapshot")
    assert same_as_source(st, gold)  # the golden image is never modified
    for image in (s1, s2):
        assert st.read(image, 0, 512) == b"N" * 512 and st.read(image, 1 << 20, 4096) == expected(1 << 20, 4096)
    assert st.list_snapshots(BIG) == [tmp]  # the node was cloned from it before the flatten ended
    # a snapshot is provisionable once flattened, too
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert st.list_snapshots(BIG) == []
    ops.provision(USER, "bmi_infra", NODE, "s2", NET, NIC)
    assert st.parent_info(ceph_of(env, NODE)) == (s2, "snapshot")


def test_removing_the_new_image_while_it_flattens(env):
    ops, st = env.ops, env.ops.storage
    ops.import_image(USER, "bmi_infra", BIG)
    gold = ceph_of(env, BIG)
    start_worker(env)
    wait_for("the import's flatten to run", lambda: running(env, gold))
    ops.remove_image(USER, "bmi_infra", BIG)  # cancels the flatten, then removes as usual
    assert job(env, gold) is None and gold not in st.list_images()
    assert st.list_snapshots(BIG) == [] and ops.db_list(USER) == []


def test_removing_a_golden_image_while_its_copy_flattens(env):
    ops, st = env.ops, env.ops.storage
    ops.import_image(USER, "bmi_infra", BIG)
    gold = ceph_of(env, BIG)
    start_worker(env)
    wait_for("the import to finish", lambda: no_jobs(env))
    ops.copy_image(USER, "bmi_infra", BIG, "bmi_infra", "copy1")
    copy1 = ceph_of(env, "copy1")
    assert st.parent_info(copy1) == (gold, "snapshot")
    wait_for("the copy's flatten to run", lambda: running(env, copy1))
    ops.remove_image(USER, "bmi_infra", BIG)
    assert job(env, copy1) is not None, "the flatten ended before the removal: nothing was tested"
    # the row is gone at once; its storage only when the copy no longer needs it
    assert [r[1] for r in ops.db_list(USER)] == ["copy1"]
    wait_for("the copy's flatten to finish", lambda: no_jobs(env))
    wait_for("the golden image's storage to go", lambda: gold not in st.list_images(), timeout=30)
    assert st.parent_info(copy1) is None and same_as_source(st, copy1)


def test_deprovisioning_the_source_of_a_flattening_snapshot(env):
    ops, st = env.ops, env.ops.storage
    ops.import_image(USER, "bmi_infra", BIG)
    start_worker(env)
    wait_for("the import to finish", lambda: no_jobs(env))
    ops.provision(USER, "bmi_infra", NODE, BIG, NET, NIC)
    node = ceph_of(env, NODE)
    st.write(node, 0, b"D" * 4096)
    ops.create_snapshot(USER, "bmi_infra", NODE, "s1")
    s1 = ceph_of(env, "s1")
    wait_for("the snapshot's flatten to run", lambda: running(env, s1))
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    # On an idle machine the flatten may win the race and end first; then only the end state is checked.
    still_flattening = job(env, s1) is not None
    # the node is gone for BMI and tgt; its clone stays in storage while the snapshot needs it
    assert env.tgt_targets() == [] and [r[1] for r in ops.db_list(USER)] == [BIG, "s1"]
    assert not list((env.tmp / "tftp").rglob("*.ipxe")) and env.hil.nic_networks(NODE, NIC) == {}
    if still_flattening:
        assert node in st.list_images()
    wait_for("the snapshot's flatten to finish", lambda: no_jobs(env))
    assert node not in st.list_images()
    assert st.read(s1, 0, 4096) == b"D" * 4096 and st.read(s1, 333 << 20, 4096) == expected(333 << 20, 4096)
    assert MAC  # the node can be provisioned again at once
    ops.provision(USER, "bmi_infra", NODE, "s1", NET, NIC)


FLATTENER = """
import sys
from ims.common import config
from ims.einstein import flatten
from ims.einstein.operations import Operations
ops = Operations.from_config(config.parse(sys.argv[1]))
print("claimed", flatten.run_pending(ops.core), flush=True)
"""


def test_einstein_killed_mid_flatten_resumes(env):
    ops, st = env.ops, env.ops.storage
    ops.import_image(USER, "bmi_infra", BIG)
    gold = ceph_of(env, BIG)
    proc = subprocess.Popen([sys.executable, "-c", FLATTENER, str(env.cfg_path)], cwd=str(Path(__file__).parents[2]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("the child's flatten to run", lambda: running(env, gold) or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    left = job(env, gold)
    assert left is not None and left["state"] == "running" and not owner_alive(left["owner"])
    assert st.parent_info(gold) is not None  # killed half-way: still a clone
    # usable meanwhile, and the next worker resumes it
    ops.provision(USER, "bmi_infra", NODE, BIG, NET, NIC)
    assert flatten.run_pending(ops.core) == 1
    assert job(env, gold) is None and st.parent_info(gold) is None and st.is_protected(gold, "snapshot")
    assert same_as_source(st, gold)
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert st.list_snapshots(BIG) == []


def test_einstein_workers_flatten_in_the_background():
    """Through a whole stack (scripts/bmi-stack, real Einstein workers): the workers' thread does the flatten."""
    from tests.support.stack import running_stack

    with running_stack(workers=2) as stack:
        stack.rbd("create", "bg-golden", "--size", "256M", "--image-format", "2")
        stack.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total", "256M", "--io-pattern", "seq",
                  "bg-golden")
        assert stack.bmi("import", "bmi_infra", "bg-golden").stdout == "Success\n"
        assert "bg-golden" in stack.bmi("ls", "bmi_infra").stdout  # listed at once
        ceph = next(line.split()[0] for line in stack.rbd("ls", "-l").splitlines()
                    if line.split() and line.split()[0].endswith("img1"))

        def independent() -> bool:
            info = stack.rbd("info", ceph)
            return "parent:" not in info and f"{ceph}@snapshot" in stack.rbd("ls", "-l")

        wait_for("a worker to flatten the import", independent, timeout=300)
        wait_for("the source's transient snapshot to go", lambda: stack.rbd("snap", "ls", "bg-golden").strip() == "",
                 timeout=60)
        assert stack.bmi("pro", "bmi_infra", "bmi_node", "bg-golden", "bmi_network", "bmi_port").stdout == "Success\n"
        assert stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port").stdout == "Success\n"
        assert stack.bmi("rm", "bmi_infra", "bg-golden").stdout == "Success\n"
        stack.rbd("rm", "bg-golden")

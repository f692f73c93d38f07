"""Multipath (issue 9.4) on real daemons: a node's disk fails over from gateway A to gateway B.

A throwaway Ceph cluster, two private tgtd daemons (each its own control port and portal) with
tgt's rbd backing store, a BMI-style clone (golden image, protected snapshot, clone) and a
libiscsi initiator.  BMI's decision is active/passive (see ims/einstein/multipath.py and
docs/deployment.md "Multipath"): the target is live on A only; on failover the take-over fences
A's librbd client of the clone and creates the same IQN on B.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import pytest

from ims.common.errors import ImageNotFound, InvalidInput
from ims.einstein import multipath
from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.ceph import CephStorage
from tests.support import iscsi_rw
from tests.support.ceph import CephCluster, purge_images
from tests.support.tgt import TgtdInstance, start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
BLOCK = 512
PREFIX = "iqn.2026-01.org.bmi.mpath:"
INITIATOR = "iqn.2026-01.org.bmi.mpath:node"


class Bed:
    """Two gateways over one Ceph cluster; A exports the node's clone (active/passive)."""

    def __init__(self, base: str, cluster: CephCluster, storage: CephStorage, tag: str) -> None:
        self.cluster, self.storage = cluster, storage
        self.a = start_tgtd(tempfile.mkdtemp(prefix="gw-a-", dir=base))
        self.b = start_tgtd(tempfile.mkdtemp(prefix="gw-b-", dir=base))
        self.drv_a = TgtTarget(self.a.conf_dir, control_port=self.a.control_port, iqn_prefix=PREFIX)
        self.drv_b = TgtTarget(self.b.conf_dir, control_port=self.b.control_port, iqn_prefix=PREFIX)
        self.golden, self.clone = f"mp-{tag}-golden", f"mp-{tag}-node"
        self.golden_data = os.urandom(MiB)
        storage.create_image(self.golden, 64 * MiB)
        storage.write(self.golden, 0, self.golden_data)
        storage.create_snapshot(self.golden, "snap")
        storage.protect_snapshot(self.golden, "snap")
        storage.clone(self.golden, "snap", self.clone)
        self.iqn = self.drv_a.iqn(self.clone)
        self.drv_a.add_target(self.clone, storage.backing(self.clone), ["ALL"])

    def url(self, gw: TgtdInstance) -> str:
        return gw.url(self.iqn)

    def take_over(self) -> list[str]:
        """What the take-over does for this node: fence A's clients of the clone, then go live on B."""
        # Everything runs on 127.0.0.1 here; a real take-over passes the dead host's address.
        fenced = multipath.fail_over(self.storage, self.clone, self.drv_b, self.clone, ["ALL"],
                                     dead_hosts=["127.0.0.1"])
        # A take-over that crashed after this point runs again: nothing more to fence, target kept.
        assert multipath.fail_over(self.storage, self.clone, self.drv_b, self.clone, ["ALL"],
                                   dead_hosts=["127.0.0.1"]) == []
        return fenced

    def close(self) -> None:
        errors = []
        for gw, drv in ((self.a, self.drv_a), (self.b, self.drv_b)):
            try:
                if gw.alive() and drv.live_target(self.clone) is not None:
                    drv.remove_target(self.clone)
            except Exception as exc:  # a fenced LUN may refuse; stopping tgtd drops it anyway
                errors.append(exc)
            stop_tgtd(gw)
        purge_images(self.storage, f"mp-{self.golden.split('-')[1]}-")


@pytest.fixture()
def bed(request, tmp_path, ceph_cluster):
    b = Bed(str(tmp_path), ceph_cluster, ceph_cluster.storage(), request.node.name.split("_")[-1][:12])
    try:
        yield b
    finally:
        b.close()


def session(url: str) -> iscsi_rw._Session:
    return iscsi_rw._Session(iscsi_rw.parse_address(url), INITIATOR)


def test_killed_gateway_fails_over_without_stale_data(bed: Bed) -> None:
    # Passive: only A exports the node's target; B's portal answers but has no such target.
    assert bed.iqn in iscsi_rw.iscsi_ls_names(bed.a.portal)
    assert bed.iqn not in iscsi_rw.iscsi_ls_names(bed.b.portal)
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.read_lun(bed.url(bed.b), None, None, 0, 1, initiator=INITIATOR)

    # The node writes through A (a session kept open, like a booted initiator) and reads back.
    written = os.urandom(64 * BLOCK)
    s = session(bed.url(bed.a))
    s.write(4096, written, BLOCK)
    assert s.read(4096, 64, BLOCK) == written
    assert s.read(0, 16, BLOCK) == bed.golden_data[:16 * BLOCK]     # the parent shows through the clone
    clients_on_a = multipath.image_clients(bed.storage, bed.clone)
    assert len(clients_on_a) == 1                                      # A's LUN, nobody else

    # A's tgtd dies (no logout, no close).
    os.kill(bed.a.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while bed.a.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not bed.a.alive()
    s.lib.iscsi_destroy_context(s.ctx)
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.read_lun(bed.url(bed.a), None, None, 4096, 1, initiator=INITIATOR)
    # Its watch lingers (the OSD has not timed it out yet): that is what the fence is for.
    assert [c["addr"] for c in multipath.image_clients(bed.storage, bed.clone)] == [clients_on_a[0]["addr"]]

    fenced = bed.take_over()
    assert fenced == [clients_on_a[0]["addr"]]
    assert bed.iqn in iscsi_rw.iscsi_ls_names(bed.b.portal)

    # Through B: exactly what was written through A (B opened the image fresh: no stale cache).
    t = session(bed.url(bed.b))
    try:
        assert t.read(4096, 64, BLOCK) == written
        assert t.read(0, 16, BLOCK) == bed.golden_data[:16 * BLOCK]
        again = os.urandom(32 * BLOCK)
        t.write(8192, again, BLOCK)
        t.write(4096, again[:8 * BLOCK], BLOCK)
    finally:
        t.close()
    # Writes through B persist in Ceph (read with librbd, not through any gateway).
    assert bed.storage.read(bed.clone, 8192 * BLOCK, len(again)) == again
    assert bed.storage.read(bed.clone, 4096 * BLOCK, 64 * BLOCK) == again[:8 * BLOCK] + written[8 * BLOCK:]
    # And only B has the clone open now: A's fenced watch is gone, so deprovision could delete it.
    remaining = [c["addr"] for c in multipath.image_clients(bed.storage, bed.clone)]
    assert len(remaining) == 1 and remaining[0] not in fenced


def test_hung_gateway_cannot_overwrite_after_take_over(bed: Bed) -> None:
    """A hangs (SIGSTOP) with a write in flight; the take-over fences it and goes live on B; the node
    writes newer data through B; when A wakes up its old write must fail, not land."""
    old, new = b"A-late" * (8 * BLOCK // 6) + b"A-la", os.urandom(8 * BLOCK)
    assert len(old) == 8 * BLOCK
    s = session(bed.url(bed.a))
    s.write(100, os.urandom(8 * BLOCK), BLOCK)       # A is the node's live path
    outcome: list[str] = []

    def late_write() -> None:
        try:
            s.write(200, old, BLOCK)
            outcome.append("acknowledged")
        except iscsi_rw.IscsiIOError as exc:
            outcome.append(f"failed: {exc}")

    os.kill(bed.a.pid, signal.SIGSTOP)
    try:
        writer = threading.Thread(target=late_write)
        writer.start()
        time.sleep(0.5)                               # the write waits in the stopped tgtd's socket
        assert outcome == []
        fenced = bed.take_over()
        assert len(fenced) == 1
        t = session(bed.url(bed.b))
        try:
            t.write(200, new, BLOCK)
            assert t.read(200, 8, BLOCK) == new
        finally:
            t.close()
    finally:
        os.kill(bed.a.pid, signal.SIGCONT)
    writer.join(60)
    assert not writer.is_alive()
    assert outcome and outcome[0].startswith("failed"), outcome   # A's old write was refused by Ceph...
    assert bed.storage.read(bed.clone, 200 * BLOCK, len(new)) == new  # ...and the newer data stands
    try:
        s.close()
    except iscsi_rw.IscsiIOError:
        pass


def test_fence_spares_kept_clients_and_other_hosts(bed: Bed) -> None:
    clients = multipath.image_clients(bed.storage, bed.clone)
    assert len(clients) == 1
    addr = str(clients[0]["addr"])
    assert multipath.fence_image_clients(bed.storage, bed.clone, keep=[addr]) == []
    # Only the dead host's addresses are fenced: a client on another host is left alone.
    assert multipath.fence_image_clients(bed.storage, bed.clone, hosts=["10.255.255.1"]) == []
    # A still serves: nothing was fenced.
    data = os.urandom(8 * BLOCK)
    iscsi_rw.write_lun(bed.url(bed.a), None, None, 300, data, initiator=INITIATOR)
    assert bed.storage.read(bed.clone, 300 * BLOCK, len(data)) == data
    with pytest.raises(InvalidInput):
        multipath.fence_image_clients(bed.storage, bed.clone, hosts=["gateway-a\n"])
    with pytest.raises(InvalidInput):
        multipath.fence_image_clients(bed.storage, bed.clone, expire_seconds=0)
    # Fencing the live gateway's host: its next write is refused by Ceph, and its watch goes.
    assert multipath.fence_image_clients(bed.storage, bed.clone, hosts=["127.0.0.1"]) == [addr]
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.write_lun(bed.url(bed.a), None, None, 300, os.urandom(8 * BLOCK), initiator=INITIATOR)
    assert bed.storage.read(bed.clone, 300 * BLOCK, len(data)) == data
    deadline = time.monotonic() + 150  # the OSD drops a blocklisted watch after its timeout (30 s); slower when loaded
    while multipath.image_clients(bed.storage, bed.clone) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert multipath.image_clients(bed.storage, bed.clone) == []
    assert multipath.fence_image_clients(bed.storage, bed.clone, hosts=["127.0.0.1"]) == []
    with pytest.raises(ImageNotFound):
        multipath.fence_image_clients(bed.storage, "mp-no-such-image")

"""Issue 7 on REAL parts (throwaway Ceph, a private tgtd read back through libiscsi, the HIL simulator
over HTTP, SQLite on disk or PostgreSQL): a dpro typo, a NIC attached before pro, `iscsi create` twice, a tenant naming
BMI's internal storage, disk delete racing provision-by-disk in two processes, and reconcile --repair
next to a locked resource."""
from __future__ import annotations

import multiprocessing
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from ims.common.errors import BMIError
from ims.database.models import Image
from tests.integration.test_operations_real import ADMIN, MAC, NET, NIC, NODE, NODE_INITIATOR, USER, RealEnv
from tests.support import iscsi_rw

TENANT2 = {"username": "tenant2", "password": "secret2"}
GOLDEN_BYTES = 2048  # RealEnv writes random bytes at the start of bmi-test-image


@pytest.fixture
def env(tmp_path, ceph_cluster, tgtd, hil_sim, db_url):
    e = RealEnv(tmp_path, "ceph", ceph_cluster, tgtd, hil_sim, db_url)
    yield e
    e.close()


def refused(call, status: int, *words: str) -> BMIError:
    with pytest.raises(BMIError) as err:
        call()
    assert err.value.status == status, err.value
    for word in words:
        assert word in str(err.value), err.value
    return err.value


def tid_of(env: RealEnv, iqn: str) -> str:
    out = subprocess.run(["tgtadm", "-C", str(env.tgtd.control_port), "--lld", "iscsi", "--op", "show", "--mode",
                          "target"], capture_output=True, text=True, check=True).stdout
    found = re.search(rf"^Target (\d+): {re.escape(iqn)}$", out, re.M)
    assert found, out
    return found.group(1)


def node_reads_golden(env: RealEnv, clone: str) -> bool:
    iqn = env.ops.iscsi.iqn(clone)
    chap = iscsi_rw.conf_chap(env.ops.iscsi.conf_path(clone))   # [iscsi] chap is on by default
    data = iscsi_rw.read_lun(env.tgtd.portal, iqn, 1, 0, 4, initiator=NODE_INITIATOR, chap=chap)
    golden = env.ops.storage.read("bmi-test-image", 0, GOLDEN_BYTES)
    return data == golden


def test_dpro_typo_is_refused_and_changes_nothing(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    clone = ops.db_list(USER, name=NODE)[0][3]
    before = env.state()
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}
    refused(lambda: ops.deprovision(USER, "bmi_infra", NODE, "other_network", NIC), 409, NET, NIC)
    refused(lambda: ops.deprovision(USER, "bmi_infra", NODE, NET, "eth7"), 409, NET, NIC)
    # clone, target, conf file, boot files, rows and the HIL attachment are all still there
    assert env.state() == before
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}
    assert node_reads_golden(env, clone)
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert env.hil.nic_networks(NODE, NIC) == {} and env.tgt_targets() == []


def test_a_nic_attached_before_pro_stays_attached_after_dpro(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.hil.connect_network(NODE, NIC, NET)
    try:
        ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
        ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
        assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}
        assert env.tgt_targets() == [] and not list((env.tmp / "tftp").rglob("*.ipxe"))
    finally:
        env.hil.detach_network(NODE, NIC, NET)
    # and a NIC pro connected itself is detached by dpro
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert env.hil.nic_networks(NODE, NIC) == {}


def test_pro_of_a_node_we_do_not_own_is_refused_and_leaves_nothing(env):
    """The HIL read of the node runs while BMI clones the project's own image: a node the project
    does not own (free in HIL, or unknown) gets HIL's answer, and the clone made meanwhile is gone."""
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    before, images = env.state(), sorted(ops.storage.list_images())
    refused(lambda: ops.provision(USER, "bmi_infra", "cisco-03", "bmi-test-image", NET, "enp130s0f0"), 403,
            "cisco-03")
    refused(lambda: ops.provision(USER, "bmi_infra", "no-such-node", "bmi-test-image", NET, NIC), 404,
            "no-such-node")
    # HIL's answer wins over what BMI's own checks find meanwhile (here: no such image)
    refused(lambda: ops.provision(USER, "bmi_infra", "cisco-03", "no-such-image", NET, "enp130s0f0"), 403)
    assert env.state() == before and sorted(ops.storage.list_images()) == images
    assert env.hil.nic_networks("cisco-03", "enp130s0f0") == {}
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)  # no lock or row left behind
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}


def test_dpro_of_a_nic_detached_by_hand(env):
    """Deprovision sends the detach without reading the NIC first: a network someone detached by
    hand is "nothing to detach", and a deprovision that then fails must not connect it again."""
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")

    def fail_at_remove_target(name: str, phase: str) -> None:
        if (name, phase) == ("iscsi.remove_target", "before"):
            raise BMIError("injected: the target removal failed")

    # 1. connected by pro, detached by dpro; a dpro that fails reconnects it (it did detach)
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    with ops.journal.session() as s:
        clone = env.ceph(max(r.id for r in s.scalars(select(Image)).all()))
    ops.journal.fault_hook = fail_at_remove_target
    refused(lambda: ops.deprovision(USER, "bmi_infra", NODE, NET, NIC), 500, "injected")
    ops.journal.fault_hook = None
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}
    assert node_reads_golden(env, clone)
    # 2. detached by hand: the failing dpro leaves it detached, and the provision whole
    env.hil.detach_network(NODE, NIC, NET)
    before = env.state()
    ops.journal.fault_hook = fail_at_remove_target
    refused(lambda: ops.deprovision(USER, "bmi_infra", NODE, NET, NIC), 500, "injected")
    ops.journal.fault_hook = None
    assert env.state() == before and env.hil.nic_networks(NODE, NIC) == {}
    assert node_reads_golden(env, clone)
    # 3. and the dpro that succeeds leaves it detached too
    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert env.hil.nic_networks(NODE, NIC) == {} and env.tgt_targets() == []


def test_iscsi_create_twice_keeps_the_live_target(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    iqn = ops.iscsi_create(ADMIN, "bmi_infra", "bmi-test-image")
    initiator = "iqn.2017-10.org.moc.bmi.node:bmi-test-image"
    before = env.state()
    refused(lambda: ops.iscsi_create(ADMIN, "bmi_infra", "bmi-test-image"), 409, "already exported")
    assert env.state() == before
    assert any(t == iqn for t in env.tgt_targets())
    golden = ops.storage.read("bmi-test-image", 0, GOLDEN_BYTES)
    assert iscsi_rw.read_lun(env.tgtd.portal, iqn, 1, 0, 4, initiator=initiator) == golden
    ops.iscsi_remove(ADMIN, "bmi_infra", "bmi-test-image")
    assert env.tgt_targets() == []


def test_tenants_cannot_read_or_squat_bmis_internal_storage(env):
    ops = env.ops
    try:
        ops.create_project(ADMIN, "other_project")
    except BMIError:
        pass
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    golden_copy = ops.db_list(USER, name="bmi-test-image")[0][3]
    live_clone = ops.db_list(USER, name=NODE)[0][3]
    next_name = f"{env.ceph(int(live_clone.rsplit('img', 1)[1]) + 1)}"
    before = env.state()
    pool_before = sorted(ops.storage.list_images())
    for name in (golden_copy, live_clone, next_name):
        refused(lambda n=name: ops.import_image(TENANT2, "other_project", n), 400, "reserved")
        refused(lambda n=name: ops.export_image(USER, "bmi_infra", "bmi-test-image", n), 400, "reserved")
    assert ops.list_images(TENANT2, "other_project") == []
    assert env.state() == before and sorted(ops.storage.list_images()) == pool_before
    # the other tenant does not even see the internal names
    assert ops.db_list(TENANT2) == []
    # and the next create in bmi_infra still works (nobody squatted its internal name)
    ops.create_snapshot(USER, "bmi_infra", NODE, "snap1")
    assert ops.db_list(USER, name="snap1")[0][3] == next_name


# --- disk delete racing provision-by-disk, from two processes ---------------------------------------
def _worker(cfg_path: str, commands, results) -> None:
    from ims.common import config as cfgmod
    from ims.einstein.operations import Operations as Ops

    ops = Ops.from_config(cfgmod.parse(cfg_path))
    while True:
        cmd = commands.get()
        if cmd is None:
            break
        barrier, verb = cmd
        barrier.wait()
        try:
            if verb == "provision":
                ops.provision_disk(USER, "bmi_infra", NODE, "disk1", NIC)
            else:
                ops.delete_disk(USER, "bmi_infra", "disk1")
            results.put((verb, 200))
        except BMIError as exc:
            results.put((verb, exc.status))
    ops.close()


def test_disk_delete_racing_provision_by_disk(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    results = ctx.Queue()
    queues = [ctx.Queue(), ctx.Queue()]
    procs = [ctx.Process(target=_worker, args=(str(env.cfg_path), q, results)) for q in queues]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for _ in range(4):
            clone = ops.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")
            barrier = manager.Barrier(2)
            queues[0].put((barrier, "provision"))
            queues[1].put((barrier, "delete"))
            got = dict(results.get(timeout=300) for _ in range(2))
            outcomes.append(got)
            assert not (got["provision"] == 200 and got["delete"] == 200), got
            ipxe = env.tmp / "tftp" / f"{NODE}.ipxe"
            pxe = env.tmp / "tftp" / "pxelinux.cfg" / ("01-" + MAC.replace(":", "-"))
            if got["provision"] == 200:
                # the node boots from a disk that exists and is exported
                assert ipxe.exists() and pxe.exists() and clone in ops.storage.list_images()
                assert ops.iscsi.iqn(clone) in env.tgt_targets() and ops.iscsi.iqn(clone) in ipxe.read_text()
                ops.deprovision_disk(USER, "bmi_infra", NODE, NIC)
            else:
                assert not ipxe.exists() and not pxe.exists()
            if got["delete"] != 200:
                ops.delete_disk(USER, "bmi_infra", "disk1")
            assert clone not in ops.storage.list_images() and env.tgt_targets() == []
    finally:
        for q in queues:
            q.put(None)
        for p in procs:
            p.join(60)
        manager.shutdown()
    assert all(set(o.values()) <= {200, 404, 409} for o in outcomes), outcomes


# --- reconcile --repair next to a locked resource -----------------------------------------------------
def _hold_lock(cfg_path: str, names: list[str], held, release) -> None:
    from ims.common import config as cfgmod
    from ims.einstein.operations import Operations as Ops

    ops = Ops.from_config(cfgmod.parse(cfg_path))
    with ops.journal.lock(names, "provision"):
        held.set()
        release.wait(120)
    ops.close()


def test_reconcile_repair_skips_a_locked_resource(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    clone = ops.db_list(USER, name=NODE)[0][3]
    iqn = ops.iscsi.iqn(clone)
    # drift: the node's target vanished from tgtd behind BMI's back
    subprocess.run(["tgtadm", "-C", str(env.tgtd.control_port), "--lld", "iscsi", "--op", "delete", "--mode",
                    "target", "--tid", tid_of(env, iqn), "--force"], check=True, capture_output=True)
    assert iqn not in env.tgt_targets()
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(env.cfg_path), [f"node:{NODE}"], held, release))
    holder.start()
    try:
        assert held.wait(120), "the lock holder did not start"
        report = ops.reconcile(ADMIN, repair=True)
        assert report["missing_targets"] == [clone] and report["actions"] == []
        assert len(report["skipped"]) == 1 and clone in report["skipped"][0], report["skipped"]
        assert iqn not in env.tgt_targets()  # left alone while someone else holds the node
    finally:
        release.set()
        holder.join(60)
    report = ops.reconcile(ADMIN, repair=True)
    assert report["skipped"] == [] and report["actions"] == [f"re-add target {clone}"]
    assert iqn in env.tgt_targets() and node_reads_golden(env, clone)
    assert ops.reconcile(ADMIN)["missing_targets"] == []


def test_reconcile_finds_orphan_boot_files_and_hil_attachments(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    clone = ops.db_list(USER, name=NODE)[0][3]
    # boot files of a node nobody provisioned, and cisco-02 on the provisioning network without a provision
    ops.boot.write("cisco-02", "52:54:00:00:02:01", "x", ops.iscsi.iqn(clone))
    env.hil.connect_network("cisco-02", "enp130s0f0", NET)
    try:
        report = ops.reconcile(ADMIN)
        tftp = env.tmp / "tftp"
        assert report["orphan_boot_files"] == sorted([str(tftp / "cisco-02.ipxe"),
                                                      str(tftp / "by-mac" / "52-54-00-00-02-01.ipxe"),
                                                      str(tftp / "pxelinux.cfg" / "01-52-54-00-00-02-01")])
        assert report["hil_attachments_without_provision"] == [f"cisco-02/enp130s0f0/{NET}"]
        report = ops.reconcile(ADMIN, repair=True)
        assert not (tftp / "cisco-02.ipxe").exists() and (tftp / f"{NODE}.ipxe").exists()
        assert not (tftp / "by-mac" / "52-54-00-00-02-01.ipxe").exists()
        assert ops.reconcile(ADMIN)["orphan_boot_files"] == []
    finally:
        env.hil.detach_network("cisco-02", "enp130s0f0", NET)
    assert Path(tftp / "pxelinux.cfg" / ("01-" + MAC.replace(":", "-"))).exists()

"""Operations against in-memory drivers: the guide's workflow, every error path, fault injection at every
step, crash recovery and locks.  The same scenarios run against real Ceph/tgt in tests/integration."""
from __future__ import annotations

import json
import os
import threading

import pytest
from sqlalchemy import select

from ims.common import config
from ims.common.errors import BMIError, NodeBusy
from ims.database.models import Image, Lock, Operation, Provision
from ims.einstein.boot import BootFiles
from ims.einstein.operations import Operations
from tests.support.fakes import FakeHIL, FakeIscsi, FakeStorage

UID = "112233445566778899"
USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
OTHER = {"username": "tenant2", "password": "secret2"}
MAC = "52:54:00:AA:BB:01"


class Env:
    def __init__(self, tmp_path, bmi_extra="", net_extra=""):
        tftp = tmp_path / "tftp"
        (tftp / "pxelinux.cfg").mkdir(parents=True)
        text = f"""
[bmi]
uid = {UID}
admin_users = haasadmin
{bmi_extra}
[db]
path = {tmp_path}/bmi.db
[iscsi]
ip = 10.77.0.1
[net_isolator]
url = http://127.0.0.1:1
auth_cache_seconds = 0
{net_extra}
[tftp]
pxelinux_path = {tftp}/pxelinux.cfg
ipxe_path = {tftp}
leases_file = {tmp_path}/leases
"""
        self.cfg = config.parse("test.cfg", text)
        self.tftp = tftp
        self.storage = FakeStorage()
        self.iscsi = FakeIscsi()
        self.hil = FakeHIL()
        self.hil.add_user("haas", "secret", ["bmi_infra"])
        self.hil.add_user("haasadmin", "admin1234", [], admin=True)
        self.hil.add_user("tenant2", "secret2", ["other_project"])
        self.hil.add_node("bmi_node", "bmi_infra", {"bmi_port": MAC, "other_port": "52:54:00:aa:bb:99"})
        self.hil.add_node("node2", "bmi_infra", {"bmi_port": "52:54:00:aa:bb:02"})
        self.hil.add_node("foreign", "other_project", {"eth0": "52:54:00:aa:bb:03"})
        boot = BootFiles(self.cfg.tftp.pxelinux_path, self.cfg.tftp.ipxe_path, "10.77.0.1")
        self.ops = Operations(self.cfg, self.storage, self.iscsi, boot, self.hil.client)
        self.ops.create_project(ADMIN, "bmi_infra", "bmi_network")
        self.ops.create_project(ADMIN, "other_project")
        self.storage.create_image("bmi-test-image", 4096)
        self.storage.write("bmi-test-image", 0, b"golden-bytes")
        self.storage.create_image("cirros", 4096)

    def state(self):
        """Everything an operation may touch, as comparable plain data."""
        with self.ops.journal.session() as s:
            rows = sorted((r.id, r.name, r.project_id, r.parent_id, r.is_snapshot, r.kind)
                          for r in s.scalars(select(Image)).all())
            provs = sorted((p.node, p.mac) for p in s.scalars(select(Provision)).all())
        imgs = {n: (bytes(i.data), sorted(i.snaps), sorted(i.protected), i.parent)
                for n, i in self.storage.images.items()}
        files = sorted(str(p.relative_to(self.tftp)) for p in self.tftp.rglob("*") if p.is_file())
        nets = {(n, k): dict(v["networks"]) for n, d in self.hil.nodes.items() for k, v in d["nics"].items()}
        return {"rows": rows, "provs": provs, "images": imgs, "targets": sorted(self.iscsi.targets),
                "files": files, "nets": nets}


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.ops.close()


def ceph(i):
    return f"{UID}img{i}"


def test_guide_workflow(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "cirros")
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    # the golden source is untouched: no snapshot left on it, same bytes
    assert env.storage.list_snapshots("bmi-test-image") == []
    assert env.storage.read(ceph(2), 0, 12) == b"golden-bytes"
    assert env.storage.parent_info(ceph(2)) is None  # flattened
    assert env.storage.is_protected(ceph(2), "snapshot")
    assert ops.list_images(USER, "bmi_infra") == ["cirros", "bmi-test-image"]
    assert ops.db_list(USER) == [
        [1, "cirros", "bmi_infra", ceph(1), False, False, ""],
        [2, "bmi-test-image", "bmi_infra", ceph(2), False, False, ""],
    ]

    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    assert ops.db_list(USER)[2] == [3, "bmi_node", "bmi_infra", ceph(3), False, False, "bmi-test-image"]
    assert env.storage.parent_info(ceph(3)) == (ceph(2), "snapshot")
    target = env.iscsi.targets[ceph(3)]
    assert target["names"] == ["iqn.2017-10.org.moc.bmi.node:bmi_node"] and target["initiators"] is None
    ipxe = (env.tftp / "bmi_node.ipxe").read_text()
    assert f"iscsi:10.77.0.1:tcp:3260:1:iqn.2017-10.org.moc.bmi:{ceph(3)}" in ipxe
    pxe = (env.tftp / "pxelinux.cfg" / "01-52-54-00-aa-bb-01").read_text()
    assert "INITRD bmi_node.ipxe" in pxe and "bmi-test-image" in pxe
    assert env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"] == {"vlan/native": "bmi_network"}
    assert ops.list_provisioned(USER, "bmi_infra") == [["bmi_node", "bmi-test-image"]]

    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "bmi-test-image-snapshot")
    assert ops.db_list(USER)[3] == [4, "bmi-test-image-snapshot", "bmi_infra", ceph(4), False, True,
                                    "bmi-test-image"]
    assert env.storage.list_snapshots(ceph(3)) == []  # transient snapshot removed
    assert env.storage.is_protected(ceph(4), "snapshot") and env.storage.parent_info(ceph(4)) is None
    assert ops.list_snapshots(USER, "bmi_infra") == [["bmi-test-image-snapshot", "bmi-test-image"]]

    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert [r[0] for r in ops.db_list(USER)] == [1, 2, 4]
    assert not env.storage.image_exists(ceph(3)) and env.iscsi.targets == {}
    assert not (env.tftp / "bmi_node.ipxe").exists()
    assert not (env.tftp / "pxelinux.cfg" / "01-52-54-00-aa-bb-01").exists()
    assert env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"] == {}

    ops.remove_image(USER, "bmi_infra", "bmi-test-image-snapshot")
    ops.remove_image(USER, "bmi_infra", "bmi-test-image")
    assert ops.db_list(USER) == [[1, "cirros", "bmi_infra", ceph(1), False, False, ""]]
    assert sorted(env.storage.images) == sorted(["bmi-test-image", "cirros", ceph(1)])
    # ids are never reused
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    assert ops.db_list(USER)[-1][0] == 5


def test_provision_from_a_snapshot_and_split_api(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    env.storage.write(ceph(2), 0, b"node-wrote")
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "snap1")
    ops.provision(USER, "bmi_infra", "node2", "snap1", "bmi_network", "bmi_port")
    clone = ceph(4)
    assert env.storage.read(clone, 0, 10) == b"node-wrote"
    assert env.storage.read(ceph(1), 0, 12) == b"golden-bytes"  # golden stayed pristine
    ops.deprovision(USER, "bmi_infra", "node2", "bmi_network", "bmi_port")
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")

    target = ops.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")
    assert target == ceph(5) and env.iscsi.target_exists(target)
    ops.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")
    assert (env.tftp / "node2.ipxe").exists()
    assert ops.list_disks(USER, "bmi_infra") == [["disk1", "bmi-test-image"]]
    with pytest.raises(BMIError) as err:
        ops.delete_disk(USER, "bmi_infra", "disk1")
    assert err.value.status == 409
    ops.deprovision_disk(USER, "bmi_infra", "node2", "bmi_port")
    assert not (env.tftp / "node2.ipxe").exists()
    ops.delete_disk(USER, "bmi_infra", "disk1")
    assert not env.storage.image_exists(target) and not env.iscsi.target_exists(target)


def test_copy_move_export_iscsi_node_ip(env, tmp_path):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.copy_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", "copy1")
    assert env.storage.read(ceph(2), 0, 12) == b"golden-bytes"
    with pytest.raises(BMIError) as err:
        ops.copy_image(USER, "bmi_infra", "copy1", "other_project")
    assert err.value.status == 403
    ops.copy_image(ADMIN, "bmi_infra", "copy1", "other_project")
    assert ops.list_images(OTHER, "other_project") == ["copy1"]
    ops.move_image(USER, "bmi_infra", "copy1", "bmi_infra", "renamed")
    assert "renamed" in ops.list_images(USER, "bmi_infra")
    ops.export_image(USER, "bmi_infra", "renamed", "exported")
    assert env.storage.read("exported", 0, 12) == b"golden-bytes" and env.storage.parent_info("exported") is None
    with pytest.raises(BMIError) as err:
        ops.export_image(USER, "bmi_infra", "renamed", "exported")
    assert err.value.status == 409
    iqn = ops.iscsi_create(ADMIN, "bmi_infra", "renamed")
    assert ops.iscsi_list(USER, "bmi_infra") == [["renamed", iqn]]
    ops.iscsi_remove(ADMIN, "bmi_infra", "renamed")
    assert ops.iscsi_list(USER, "bmi_infra") == []
    with pytest.raises(BMIError) as err:
        ops.node_ip(USER, "bmi_infra", "bmi_node")
    assert err.value.status == 404
    (tmp_path / "leases").write_text("1700000000 52:54:00:aa:bb:99 10.77.0.5 host *\n")
    assert ops.node_ip(USER, "bmi_infra", "bmi_node") == "10.77.0.5"  # any NIC of the node with a lease
    with open(tmp_path / "leases", "a") as fh:
        fh.write("1700000000 52:54:00:aa:bb:01 10.77.0.10 bmi_node 01:52:54:00:aa:bb:01\n")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    assert ops.node_ip(USER, "bmi_infra", "bmi_node") == "10.77.0.10"  # the provisioned NIC


def test_admin_operations(env):
    ops = env.ops
    with pytest.raises(BMIError) as err:
        ops.create_project(USER, "newproj")
    assert err.value.status == 403
    ops.create_project(ADMIN, "newproj", "net1", id=42)
    assert [42, "newproj", "net1"] in ops.list_projects(ADMIN)
    with pytest.raises(BMIError) as err:
        ops.create_project(ADMIN, "newproj")
    assert err.value.status == 409
    ops.db_create(ADMIN, "newproj", "row1", id=100, public=True)
    assert ops.db_list(ADMIN, public=True) == [[100, "row1", "newproj", ceph(100), True, False, ""]]
    with pytest.raises(BMIError) as err:
        ops.remove_project(ADMIN, "newproj")
    assert err.value.status == 409
    ops.db_remove(ADMIN, "newproj", "row1")
    ops.remove_project(ADMIN, "newproj")
    assert "newproj" not in [p[1] for p in ops.list_projects(ADMIN)]
    # a tenant only sees rows of projects HIL lets them access
    ops.import_image(OTHER, "other_project", "cirros")
    assert ops.db_list(USER) == [] and len(ops.db_list(OTHER)) == 1 and len(ops.db_list(ADMIN)) == 1


@pytest.mark.parametrize("call,status", [
    (lambda o: o.import_image(USER, "nope", "cirros"), 404),
    (lambda o: o.import_image(USER, "bmi_infra", "missing-in-ceph"), 404),
    (lambda o: o.import_image({"username": "haas", "password": "bad"}, "bmi_infra", "cirros"), 401),
    (lambda o: o.import_image({"username": "nobody", "password": "x"}, "bmi_infra", "cirros"), 401),
    (lambda o: o.import_image({}, "bmi_infra", "cirros"), 401),
    (lambda o: o.import_image(OTHER, "bmi_infra", "cirros"), 401),
    (lambda o: o.import_image(USER, "bmi_infra", "../../etc/passwd"), 400),
    (lambda o: o.import_image(USER, "bmi_infra", "cirros", snap="nosuch"), 404),
    (lambda o: o.provision(USER, "bmi_infra", "bmi_node", "unknown", "bmi_network", "bmi_port"), 404),
    (lambda o: o.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "nope"), 404),
    (lambda o: o.provision(USER, "bmi_infra", "ghost", "bmi-test-image", "bmi_network", "bmi_port"), 404),
    (lambda o: o.provision(USER, "bmi_infra", "foreign", "bmi-test-image", "bmi_network", "eth0"), 401),
    (lambda o: o.provision(USER, "bmi_infra", "bmi_node\n", "bmi-test-image", "bmi_network", "bmi_port"), 400),
    (lambda o: o.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port"), 404),
    (lambda o: o.create_snapshot(USER, "bmi_infra", "bmi_node", "s"), 404),
    (lambda o: o.remove_image(USER, "bmi_infra", "nope"), 404),
    (lambda o: o.list_images(USER, "bmi_infra;rm"), 400),
    (lambda o: o.db_create(USER, "bmi_infra", "x"), 403),
    (lambda o: o.delete_disk(USER, "bmi_infra", "nodisk"), 404),
])
def test_errors_change_nothing(env, call, status):
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    before = env.state()
    with pytest.raises(BMIError) as err:
        call(env.ops)
    assert err.value.status == status, err.value
    assert env.state() == before


def test_conflicts(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    with pytest.raises(BMIError) as err:
        ops.import_image(USER, "bmi_infra", "bmi-test-image")
    assert err.value.status == 409
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    before = env.state()
    for call in (lambda: ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port"),
                 lambda: ops.remove_image(USER, "bmi_infra", "bmi-test-image"),
                 lambda: ops.remove_image(USER, "bmi_infra", "bmi_node"),
                 lambda: ops.create_disk(USER, "bmi_infra", "bmi_node", "bmi-test-image")):
        with pytest.raises(BMIError) as err:
            call()
        assert err.value.status == 409, err.value
        assert env.state() == before
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "s1")
    with pytest.raises(BMIError) as err:
        ops.create_snapshot(USER, "bmi_infra", "bmi_node", "s1")
    assert err.value.status == 409


def test_error_messages_use_bmi_names(env):
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.storage.images[ceph(1)].snaps.clear()  # drift: the golden copy lost its snapshot
    env.storage.images[ceph(1)].protected.clear()
    with pytest.raises(BMIError) as err:
        env.ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    assert err.value.status == 404
    assert "bmi-test-image" in str(err.value) and ceph(1) not in str(err.value)


def shape(state):
    """A state with ids and Ceph names replaced by their order (a retried operation gets new ids)."""
    import re

    state = dict(state, nets={"/".join(k): v for k, v in state["nets"].items()},
                 images={k: [v[0].hex(), v[1], v[2], v[3]] for k, v in state["images"].items()})
    text = json.dumps(state, sort_keys=True)
    ids = sorted({int(m) for m in re.findall(UID + r"img(\d+)", text)})
    for rank, i in enumerate(sorted(ids, reverse=True)):
        text = text.replace(f"{UID}img{i}", f"CEPH#{len(ids) - rank}")
    data = json.loads(text)
    data["rows"] = [row[1:] for row in data["rows"]]
    return data


class Boom(Exception):
    pass


def _steps_of(env, run):
    """Run once with a recording hook to learn the operation's step names."""
    seen = []
    env.ops.journal.fault_hook = lambda name, phase: seen.append((name, phase))
    run()
    env.ops.journal.fault_hook = None
    return seen


SCENARIOS = {
    "import": (lambda o: None, lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image")),
    "provision": (lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
                  lambda o: o.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")),
    "snapshot": (lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                            o.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")),
                 lambda o: o.create_snapshot(USER, "bmi_infra", "bmi_node", "snap1")),
    "deprovision": (lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                               o.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network",
                                           "bmi_port")),
                    lambda o: o.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")),
    "remove": (lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
               lambda o: o.remove_image(USER, "bmi_infra", "bmi-test-image")),
    "create_disk": (lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
                    lambda o: o.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")),
    "provision_disk": (lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                                  o.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")),
                       lambda o: o.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")),
    "deprovision_disk": (lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                                    o.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image"),
                                    o.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")),
                         lambda o: o.deprovision_disk(USER, "bmi_infra", "node2", "bmi_port")),
    "delete_disk": (lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                               o.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")),
                    lambda o: o.delete_disk(USER, "bmi_infra", "disk1")),
    "copy": (lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
             lambda o: o.copy_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", "copy1")),
    "export": (lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
               lambda o: o.export_image(USER, "bmi_infra", "bmi-test-image", "exported")),
}


def _probe(tmp_path, scenario):
    """Run ``scenario`` once cleanly: its setup, run, fault points (step, phase) and final state."""
    setup, run = SCENARIOS[scenario]
    probe = Env(tmp_path / "probe")
    setup(probe.ops)
    steps = _steps_of(probe, lambda: run(probe.ops))
    after = probe.state()
    probe.ops.close()
    return setup, run, steps, after


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fault_at_every_step_leaves_before_or_after_state(tmp_path, scenario):
    setup, run, steps, after = _probe(tmp_path, scenario)
    assert len(steps) >= 3, steps
    for i, (name, phase) in enumerate(steps):
        env = Env(tmp_path / f"run{i}")
        setup(env.ops)
        before = env.state()

        def hook(n, p, target=(name, phase)):
            if (n, p) == target:
                raise Boom(f"injected at {n}/{p}")

        env.ops.journal.fault_hook = hook
        committed = any(n == "commit" for n, _ in steps[:i + 1])
        if committed:
            run(env.ops)  # past the commit point the answer is success: the journal finished it
        else:
            with pytest.raises(Boom):
                run(env.ops)
        env.ops.journal.fault_hook = None
        state = env.state()
        expected = after if committed else before
        assert state == expected, f"fault at {name}/{phase}"
        with env.ops.journal.session() as s:
            ops = s.scalars(select(Operation)).all()
            assert ops[-1].state == ("rolled_forward" if committed else "rolled_back")
        # and the operation can simply be retried
        if not committed:
            run(env.ops)
            assert shape(env.state()) == shape(after)
        env.ops.close()


@pytest.mark.parametrize("scenario", ["import", "provision", "snapshot", "deprovision", "provision_disk",
                                      "deprovision_disk", "delete_disk", "export", "copy"])
def test_crash_mid_operation_is_recovered(tmp_path, scenario):
    """A process that dies mid-way leaves a 'running' journal row; recover() restores a consistent state."""
    setup, run, steps, after = _probe(tmp_path, scenario)
    for i, (name, phase) in enumerate(steps):
        env = Env(tmp_path / f"crash{i}")
        setup(env.ops)
        before = env.state()

        class Crash(BaseException):
            pass

        def hook(n, p, target=(name, phase)):
            if (n, p) == target:
                raise Crash()

        env.ops.journal.fault_hook = hook
        env.ops.journal._finish_failed = lambda tx, exc: None  # the process "dies": no in-process rollback
        with pytest.raises(Crash):
            run(env.ops)
        with env.ops.journal.session() as s:
            op = s.scalars(select(Operation)).all()[-1]
            assert op.state == "running"
            op.owner = f"{os.uname().nodename}:999999999:1"  # a dead process on this host
            for lock in s.scalars(select(Lock)).all():
                lock.owner = op.owner
        env.ops.journal.fault_hook = None
        summary = env.ops.recover(USER)
        committed = any(n == "commit" for n, _ in steps[:i + 1])
        assert env.state() == (after if committed else before), f"crash at {name}/{phase}: {json.dumps(summary)}"
        if not committed:
            run(env.ops)  # the dead process's locks are gone: the operation can run again
        env.ops.close()


def test_concurrent_provisions_one_wins_one_conflicts(env):
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    gate = threading.Event()
    results = []
    original = env.storage.clone

    def slow_clone(*a):
        gate.wait(5)
        return original(*a)

    env.storage.clone = slow_clone

    def worker():
        try:
            env.ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
            results.append(200)
        except BMIError as exc:
            results.append(exc.status)
            gate.set()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [200, 409]
    with pytest.raises(NodeBusy):
        with env.ops.journal.lock(["node:x"], "a"):
            with env.ops.journal.lock(["node:x"], "b"):
                pass


def test_reconcile_reports_and_repairs_drift(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    assert ops.reconcile(ADMIN)["missing_targets"] == []
    del env.iscsi.targets[ceph(2)]
    env.storage.create_image(ceph(77), 10)
    report = ops.reconcile(ADMIN)
    assert report["missing_targets"] == [ceph(2)] and report["images_without_row"] == [ceph(77)]
    ops.reconcile(ADMIN, repair=True)
    assert env.iscsi.target_exists(ceph(2))
    with pytest.raises(BMIError) as err:
        ops.reconcile(USER)
    assert err.value.status == 403


def test_http_boot_mode_writes_no_per_node_files_and_serves_the_script(tmp_path):
    from ims.picasso.boot import create_boot_app

    env = Env(tmp_path)
    env.cfg.tftp.values["boot_mode"] = "http"
    env.cfg.boot_http.values["ip"] = "10.77.0.1"
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    assert [p for p in env.tftp.rglob("*") if p.is_file()] == []
    script = ops.boot_script("52-54-00-AA-BB-01")
    assert script.startswith("#!ipxe")
    assert f"sanboot --keep iscsi:10.77.0.1:tcp:3260:1:iqn.2017-10.org.moc.bmi:{ceph(2)}" in script
    assert "set initiator-iqn iqn.2017-10.org.moc.bmi.node:bmi_node" in script
    client = create_boot_app(ops).test_client()
    r = client.get("/boot/52:54:00:aa:bb:01")
    assert r.status_code == 200 and r.mimetype == "text/plain" and r.text == script
    assert client.get("/boot/52:54:00:aa:bb:77").status_code == 404
    bad = client.get("/boot/not-a-mac")
    assert bad.status_code == 400 and bad.text.startswith("#!ipxe") and "exit 1" in bad.text
    assert client.get("/v1/projects").status_code == 404  # the tenant API is not served on the boot network
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert client.get("/boot/52:54:00:aa:bb:01").status_code == 404
    env.ops.close()


def test_http_boot_mode_needs_an_address():
    from ims.common.errors import ConfigError

    base = "[bmi]\nuid = 5\n[iscsi]\nip = 1.2.3.4\n[net_isolator]\nurl = http://127.0.0.1:1\n"
    with pytest.raises(ConfigError, match="boot_http"):
        config.parse("c", base + "[tftp]\nboot_mode = http\n")
    with pytest.raises(ConfigError, match="boot_mode"):
        config.parse("c", base + "[tftp]\nboot_mode = nfs\n")
    assert config.parse("c", base + "[tftp]\nboot_mode = http\n[boot_http]\nip = 10.0.0.1\n").boot_http.port == 8080


def test_recover_forgets_old_finished_operations_only(env):
    from datetime import UTC, datetime, timedelta

    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.ops.import_image(USER, "bmi_infra", "cirros")
    with env.ops.journal.session() as s:
        ops = s.scalars(select(Operation).order_by(Operation.id)).all()
        assert [o.state for o in ops] == ["done", "done"]
        ops[0].updated_at = datetime.now(UTC) - timedelta(days=31)
        s.add(Operation(kind="import", args="{}", steps="[]", state="failed", owner="x:1:1",
                        updated_at=datetime.now(UTC) - timedelta(days=90)))
    summary = env.ops.recover()
    assert summary["pruned"] == 1
    with env.ops.journal.session() as s:
        left = s.scalars(select(Operation).order_by(Operation.id)).all()
        # the recent one stays; a failed one is never forgotten, it is retried (and now rolled back)
        assert [(o.id, o.state) for o in left] == [(2, "done"), (3, "rolled_back")]


# --- issue 7: one shape, undo only what a step made, the record, tenancy, locks, reconcile ------------
def _unchanged(env, call, status, *words):
    before = env.state()
    with pytest.raises(BMIError) as err:
        call()
    assert err.value.status == status, err.value
    for word in words:
        assert word in str(err.value), err.value
    assert env.state() == before
    return err.value


def test_rpc_allow_list_is_generated_from_the_facade():
    from ims.einstein.ops.expose import exposed
    from ims.rpc.methods import ADMIN_METHODS, ALLOWED_METHODS

    public = {n for n in vars(Operations) if not n.startswith("_") and callable(getattr(Operations, n))}
    assert ALLOWED_METHODS == exposed(Operations) and ALLOWED_METHODS <= public
    # lifecycle helpers are never callable over RPC
    assert not ALLOWED_METHODS & {"close", "recover", "from_config", "ceph_name"}
    assert {"provision", "deprovision", "reconcile", "boot_script", "db_list"} <= ALLOWED_METHODS
    assert ADMIN_METHODS == {"create_project", "remove_project", "db_create", "db_remove", "reconcile"}
    assert "provision" not in exposed(Operations, read_only=True) and "db_list" in exposed(Operations, read_only=True)


def test_iscsi_create_twice_keeps_the_live_target(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    iqn = ops.iscsi_create(ADMIN, "bmi_infra", "bmi-test-image")
    _unchanged(env, lambda: ops.iscsi_create(ADMIN, "bmi_infra", "bmi-test-image"), 409, "bmi-test-image", iqn)
    # the race the pre-check cannot see (a target made behind BMI's locks): the failing step made nothing,
    # so its roll-back removes nothing
    env.iscsi.target_exists = lambda t: False
    _unchanged(env, lambda: ops.iscsi_create(ADMIN, "bmi_infra", "bmi-test-image"), 409)
    assert ceph(1) in env.iscsi.targets and ops.iscsi_list(USER, "bmi_infra") == [["bmi-test-image", iqn]]
    with ops.journal.session() as s:
        last = s.scalars(select(Operation).order_by(Operation.id.desc())).first()
        assert last.state == "rolled_back" and json.loads(last.steps)[-1]["undo"] is None


def test_export_and_import_races_never_remove_what_they_did_not_make(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.storage.create_image("squat", 10)
    env.storage.write("squat", 0, b"mine")
    _unchanged(env, lambda: ops.export_image(USER, "bmi_infra", "bmi-test-image", "squat"), 409)
    real = env.storage.image_exists
    env.storage.image_exists = lambda n: False if n == "squat" else real(n)
    _unchanged(env, lambda: ops.export_image(USER, "bmi_infra", "bmi-test-image", "squat"), 409)
    env.storage.image_exists = real
    assert env.storage.read("squat", 0, 4) == b"mine"
    # the next internal name already taken in the pool (a squatter from before tenancy checks): import
    # fails 409 and the squatter's image survives the roll-back
    env.storage.create_image(ceph(2), 10)
    env.storage.write(ceph(2), 0, b"squatter")
    _unchanged(env, lambda: ops.import_image(USER, "bmi_infra", "cirros"), 409)
    assert env.storage.read(ceph(2), 0, 8) == b"squatter"


def test_deprovision_uses_the_record(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    _unchanged(env, lambda: ops.deprovision(USER, "bmi_infra", "bmi_node", "other_network", "bmi_port"), 409,
               "bmi_network", "bmi_port")
    _unchanged(env, lambda: ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "other_port"), 409,
               "bmi_network", "bmi_port")
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"] == {}


def test_deprovision_leaves_a_nic_that_was_attached_before(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"]["vlan/native"] = "bmi_network"
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    with ops.journal.session() as s:
        assert s.get(Provision, "bmi_node").connected is False
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"] == {"vlan/native": "bmi_network"}
    assert not [c for c in env.hil.calls if c[0] in ("connect", "detach")]
    # a NIC pro did connect is detached
    ops.provision(USER, "bmi_infra", "node2", "bmi-test-image", "bmi_network", "bmi_port")
    ops.deprovision(USER, "bmi_infra", "node2", "bmi_network", "bmi_port")
    assert env.hil.calls[-2:] == [("connect", "node2", "bmi_port", "bmi_network"),
                                  ("detach", "node2", "bmi_port", "bmi_network")]


def test_deprovision_disk_uses_the_recorded_nic(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")
    ops.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")
    _unchanged(env, lambda: ops.deprovision_disk(USER, "bmi_infra", "node2", "eth9"), 409, "bmi_port")


def test_tenants_cannot_name_bmis_internal_storage(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    for name in (ceph(1), ceph(2), ceph(3), f"{UID}img", f"{UID}IMG1", f"{UID}imgx"):
        _unchanged(env, lambda n=name: ops.import_image(OTHER, "other_project", n), 400, "reserved")
        _unchanged(env, lambda n=name: ops.import_image(ADMIN, "other_project", n), 400, "reserved")
        _unchanged(env, lambda n=name: ops.export_image(USER, "bmi_infra", "bmi-test-image", n), 400, "reserved")
        _unchanged(env, lambda n=name: ops.copy_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", n), 400)
        _unchanged(env, lambda n=name: ops.move_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", n), 400)
        _unchanged(env, lambda n=name: ops.create_snapshot(USER, "bmi_infra", "bmi_node", n), 400)
        _unchanged(env, lambda n=name: ops.create_disk(USER, "bmi_infra", n, "bmi-test-image"), 400)
    # rows (and their internal names) of bmi_infra are not shown to another tenant
    assert ops.db_list(OTHER) == [] and ops.db_list(OTHER, ceph=ceph(1)) == []
    assert [r[3] for r in ops.db_list(USER)] == [ceph(1), ceph(2)]


def test_operator_restricts_what_tenants_import(tmp_path):
    env = Env(tmp_path, bmi_extra="import_pattern = bmi-[a-z-]+")
    _unchanged(env, lambda: env.ops.import_image(USER, "bmi_infra", "cirros"), 400, "bmi-[a-z-]+")
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    assert env.ops.list_images(USER, "bmi_infra") == ["bmi-test-image"]
    env.ops.close()


def test_disk_delete_and_provision_from_disk_share_a_lock(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.create_disk(USER, "bmi_infra", "disk1", "bmi-test-image")
    inside, release = threading.Event(), threading.Event()
    original = env.ops.core.boot.write

    def slow_write(*a, **kw):
        inside.set()
        release.wait(10)
        return original(*a, **kw)

    env.ops.core.boot.write = slow_write
    result = []
    t = threading.Thread(target=lambda: result.append(
        ops.provision_disk(USER, "bmi_infra", "node2", "disk1", "bmi_port")))
    t.start()
    assert inside.wait(10)
    with pytest.raises(NodeBusy):
        ops.delete_disk(USER, "bmi_infra", "disk1")
    release.set()
    t.join(10)
    assert result == [None] and (env.tftp / "node2.ipxe").exists() and env.iscsi.target_exists(ceph(2))
    with pytest.raises(BMIError) as err:
        ops.delete_disk(USER, "bmi_infra", "disk1")
    assert err.value.status == 409 and "node2" in str(err.value)


def test_id_bounds_and_missing_storage_is_404(env):
    ops = env.ops
    from ims.common.names import MAX_ID

    for bad in (0, 2 ** 63 - 1, 2 ** 63, MAX_ID + 1):
        with pytest.raises(BMIError) as err:
            ops.create_project(ADMIN, "p1", id=bad)
        assert err.value.status == 400
        with pytest.raises(BMIError) as err:
            ops.db_create(ADMIN, "bmi_infra", "row", id=bad)
        assert err.value.status == 400
    ops.create_project(ADMIN, "p1", id=MAX_ID)
    ops.create_project(ADMIN, "p2")  # the counter still has room
    ops.db_create(ADMIN, "bmi_infra", "norow")
    _unchanged(env, lambda: ops.iscsi_create(ADMIN, "bmi_infra", "norow"), 404, "norow")


def _drifted(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    del env.iscsi.targets[ceph(2)]


def test_reconcile_repair_skips_locked_resources(env):
    ops = env.ops
    _drifted(env)
    with ops.journal.lock(["node:bmi_node"], "provision"):
        report = ops.reconcile(ADMIN, repair=True)
    assert report["missing_targets"] == [ceph(2)] and report["actions"] == []
    assert len(report["skipped"]) == 1 and ceph(2) in report["skipped"][0] and "busy" in report["skipped"][0]
    assert not env.iscsi.target_exists(ceph(2))
    # an operation still running on it (a dead worker's, not yet recovered) keeps it skipped too
    with ops.journal.session() as s:
        s.add(Operation(kind="provision", args=json.dumps({"node": "bmi_node"}), steps="[]", state="running",
                        owner="elsewhere:1:1"))
    report = ops.reconcile(ADMIN, repair=True)
    assert report["actions"] == [] and "unfinished operation" in report["skipped"][0]
    with ops.journal.session() as s:
        s.scalars(select(Operation).where(Operation.owner == "elsewhere:1:1")).one().state = "rolled_back"
    report = ops.reconcile(ADMIN, repair=True)
    assert report["skipped"] == [] and report["actions"] == [f"re-add target {ceph(2)}"]
    assert env.iscsi.target_exists(ceph(2)) and ops.reconcile(ADMIN)["missing_targets"] == []


def test_reconcile_finds_orphan_and_stale_boot_files_and_hil_attachments(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    clean = ops.reconcile(ADMIN)
    assert all(clean[k] == [] for k in ("orphan_boot_files", "stale_boot_files", "missing_boot_files",
                                        "hil_attachments_without_provision"))
    # boot files of a node nobody provisioned (left by a lost race or a hand edit)
    ops.core.boot.write("node2", "52:54:00:aa:bb:02", "x", ops.iscsi.iqn(ceph(9)))
    # an attachment to the provisioning network with no provision behind it
    env.hil.nodes["node2"]["nics"]["bmi_port"]["networks"]["vlan/native"] = "bmi_network"
    (env.tftp / "boot.ipxe").write_text("#!ipxe\nchain http://10.0.0.1/boot/${mac}\n")  # not BMI's per-node file
    report = ops.reconcile(ADMIN)
    assert report["orphan_boot_files"] == sorted([str(env.tftp / "node2.ipxe"),
                                                  str(env.tftp / "by-mac" / "52-54-00-aa-bb-02.ipxe"),
                                                  str(env.tftp / "pxelinux.cfg" / "01-52-54-00-aa-bb-02")])
    assert report["hil_attachments_without_provision"] == ["node2/bmi_port/bmi_network"]
    # the clone of a provisioned node vanished: its boot files point at nothing
    env.storage.remove_image(ceph(2))
    report = ops.reconcile(ADMIN, repair=True)
    assert report["stale_boot_files"] == ["bmi_node"] and report["skipped"] == []
    assert not (env.tftp / "node2.ipxe").exists() and (env.tftp / "boot.ipxe").exists()
    assert not (env.tftp / "by-mac" / "52-54-00-aa-bb-02.ipxe").exists()
    assert not (env.tftp / "bmi_node.ipxe").exists()
    after = ops.reconcile(ADMIN)
    assert after["orphan_boot_files"] == [] and after["stale_boot_files"] == []
    # dpro then cleans up what is left of the broken node
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert ops.db_list(USER) == [[1, "bmi-test-image", "bmi_infra", ceph(1), False, False, ""]]


def test_reconcile_rewrites_boot_files_pointing_elsewhere(env):
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    good = (env.tftp / "bmi_node.ipxe").read_text()
    (env.tftp / "bmi_node.ipxe").write_text(good.replace(ceph(2), ceph(7)))
    report = ops.reconcile(ADMIN, repair=True)
    assert report["stale_boot_files"] == ["bmi_node"] and report["actions"] == ["rewrite boot files of bmi_node"]
    assert (env.tftp / "bmi_node.ipxe").read_text() == good
    # the node's PXELINUX file loading another node's script
    pxe = env.tftp / "pxelinux.cfg" / "01-52-54-00-aa-bb-01"
    right = pxe.read_text()
    pxe.write_text(right.replace("bmi_node.ipxe", "node2.ipxe"))
    report = ops.reconcile(ADMIN, repair=True)
    assert report["stale_boot_files"] == ["bmi_node"] and report["orphan_boot_files"] == []
    assert pxe.read_text() == right and ops.reconcile(ADMIN)["stale_boot_files"] == []
    # the per-MAC copy UEFI nodes chain to, pointing at another target
    by_mac = env.tftp / "by-mac" / "52-54-00-aa-bb-01.ipxe"
    by_mac.write_text(good.replace(ceph(2), ceph(7)))
    report = ops.reconcile(ADMIN, repair=True)
    assert report["stale_boot_files"] == ["bmi_node"] and report["orphan_boot_files"] == []
    assert by_mac.read_text() == good and ops.reconcile(ADMIN)["stale_boot_files"] == []


@pytest.mark.parametrize("service", [True, False])
def test_recovery_uses_the_service_account_for_hil(tmp_path, service):
    extra = "service_username = haasadmin\nservice_password = admin1234" if service else ""
    env = Env(tmp_path, net_extra=extra)
    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    before = env.state()
    assert ops.journal.context_factory().net is not None if service else ops.journal.context_factory().net is None

    class Crash(BaseException):
        pass

    def hook(n, p):
        if (n, p) == ("hil.connect", "after"):
            raise Crash()

    ops.journal.fault_hook = hook
    ops.journal._finish_failed = lambda tx, exc: None
    with pytest.raises(Crash):
        ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    ops.journal.fault_hook = None
    with ops.journal.session() as s:
        for op in s.scalars(select(Operation)).all():
            op.owner = f"{os.uname().nodename}:999999999:1"
        for lock in s.scalars(select(Lock)).all():
            lock.owner = f"{os.uname().nodename}:999999999:1"
    summary = ops.recover()  # no caller: Einstein's own start-up recovery
    state = env.state()
    if service:
        assert state == before and summary["notes"] == []
    else:
        assert state["nets"][("bmi_node", "bmi_port")] == {"vlan/native": "bmi_network"}
        assert any("detach network bmi_network" in n for n in summary["notes"])
    ops.close()


def test_a_database_from_before_the_connected_column_is_upgraded(tmp_path):
    import sqlite3

    env = Env(tmp_path)
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    env.ops.close()
    with sqlite3.connect(tmp_path / "bmi.db") as db:
        db.execute("ALTER TABLE provision DROP COLUMN connected")
    boot = BootFiles(env.cfg.tftp.pxelinux_path, env.cfg.tftp.ipxe_path, "10.77.0.1")
    env.ops = Operations(env.cfg, env.storage, env.iscsi, boot, env.hil.client)
    with env.ops.journal.session() as s:
        s.get(Provision, "bmi_node").connected = None  # an old row: nobody recorded who attached the NIC
    # as before the record: detached if attached
    env.ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert env.hil.nodes["bmi_node"]["nics"]["bmi_port"]["networks"] == {}
    env.ops.close()


# --- background flatten (issue 8): O(1) import, snapshot and cp ---------------------------------
class _ClonesStorage(FakeStorage):
    """A fake whose flatten "copies data" (like Ceph): copies are flattened in the background."""

    background_flatten = True


def _bg_env(tmp_path, extra=""):
    e = Env(tmp_path, bmi_extra="flatten_sync_max_bytes = 0\n" + extra)
    e.storage.__class__ = _ClonesStorage
    return e


def _jobs(env):
    from ims.einstein.flatten import FlattenJob

    with env.ops.journal.session() as s:
        return sorted(j.image for j in s.scalars(select(FlattenJob)).all())


def _run_jobs(env):
    from ims.einstein import flatten

    return flatten.run_pending(env.ops.core)


def test_background_import_snapshot_provision_and_cleanup(tmp_path):
    env = _bg_env(tmp_path)
    ops, st = env.ops, env.storage
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    gold = ceph(1)
    # usable at once: a clone of a transient snapshot of the source, listed, with a queued job
    (tmp,) = st.list_snapshots("bmi-test-image")
    assert tmp.startswith(f"{UID}img.t") and st.parent_info(gold) == ("bmi-test-image", tmp)
    assert ops.list_images(USER, "bmi_infra") == ["bmi-test-image"] and _jobs(env) == [gold]
    # provisioning before the flatten clones the same bytes from the source's transient snapshot
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    node = ceph(2)
    assert st.parent_info(node) == ("bmi-test-image", tmp) and st.read(node, 0, 12) == b"golden-bytes"
    assert _run_jobs(env) == 1 and _jobs(env) == []
    assert st.parent_info(gold) is None and st.is_protected(gold, "snapshot")
    assert st.list_snapshots("bmi-test-image") == [tmp]  # the early node still needs it
    st.write(node, 0, b"N" * 12)
    # a snapshot of the node, twice while the first still awaits its flatten
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "s1")
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "s2")
    s1, s2 = ceph(3), ceph(4)
    assert _jobs(env) == [s1, s2] and len(st.list_snapshots(node)) == 2
    assert st.read(s1, 0, 12) == b"N" * 12
    # removing a snapshot whose flatten is pending cancels it and leaves nothing behind
    ops.remove_image(USER, "bmi_infra", "s2")
    assert _jobs(env) == [s1] and s2 not in st.images and len(st.list_snapshots(node)) == 1
    # deprovisioning the source of a pending flatten: the row goes, the storage stays until then
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    assert node in st.images and [r[1] for r in ops.db_list(USER)] == ["bmi-test-image", "s1"]
    assert st.list_snapshots("bmi-test-image") == [tmp]  # the node's storage still clones it
    assert _run_jobs(env) == 1
    assert st.list_snapshots("bmi-test-image") == []  # the node's storage left: the source is as it was
    assert node not in st.images and st.parent_info(s1) is None and st.read(s1, 0, 12) == b"N" * 12
    assert sorted(st.images) == sorted(["bmi-test-image", "cirros", gold, s1])


def test_background_copy_of_a_removed_golden_and_clone_depth(tmp_path):
    env = _bg_env(tmp_path, "max_clone_depth = 1\n")
    ops, st = env.ops, env.storage
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    _run_jobs(env)
    ops.copy_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", "cp1")
    assert st.parent_info(ceph(2)) == (ceph(1), "snapshot") and _jobs(env) == [ceph(2)]
    # the golden image can go while its copy flattens: its storage is removed afterwards
    ops.remove_image(USER, "bmi_infra", "bmi-test-image")
    assert ceph(1) in st.images and [r[1] for r in ops.db_list(USER)] == ["cp1"]
    _run_jobs(env)
    assert ceph(1) not in st.images and st.read(ceph(2), 0, 12) == b"golden-bytes"
    # a node is one link deep; its snapshot would be two: flattened within the operation instead
    ops.provision(USER, "bmi_infra", "bmi_node", "cp1", "bmi_network", "bmi_port")
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "s1")
    assert _jobs(env) == [] and st.parent_info(ceph(4)) is None and st.is_protected(ceph(4), "snapshot")
    assert st.list_snapshots(ceph(3)) == []


@pytest.mark.parametrize("scenario", ["import", "snapshot", "copy"])
def test_background_fault_at_every_step_restores_everything(tmp_path, scenario):
    runs = {"import": lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
            "snapshot": lambda o: o.create_snapshot(USER, "bmi_infra", "bmi_node", "s1"),
            "copy": lambda o: o.copy_image(USER, "bmi_infra", "gold", "bmi_infra", "cp1")}

    def setup(e):
        if scenario != "import":
            e.ops.import_image(USER, "bmi_infra", "bmi-test-image")
            e.ops.move_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", "gold")
        if scenario == "snapshot":
            e.ops.provision(USER, "bmi_infra", "bmi_node", "gold", "bmi_network", "bmi_port")

    probe = _bg_env(tmp_path / "probe")
    setup(probe)
    seen: list[tuple[str, str]] = []
    probe.ops.journal.fault_hook = lambda n, p: seen.append((n, p))
    runs[scenario](probe.ops)
    assert ("storage.queue_flatten", "after") in seen
    probe.ops.close()
    for i, point in enumerate(seen):
        env = _bg_env(tmp_path / f"run{i}")
        setup(env)
        before, jobs = env.state(), _jobs(env)

        def hook(n, p, point=point):
            if (n, p) == point:
                raise RuntimeError("injected")

        env.ops.journal.fault_hook = hook
        with pytest.raises(RuntimeError):
            runs[scenario](env.ops)
        env.ops.journal.fault_hook = None
        assert env.state() == before and _jobs(env) == jobs, point
        env.ops.close()


@pytest.mark.parametrize("scenario", ["import", "snapshot"])
def test_background_crash_mid_operation_is_recovered(tmp_path, scenario):
    """A process dying anywhere in a background import/snapshot: recover() leaves no job, snapshot or clone."""
    runs = {"import": lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
            "snapshot": lambda o: o.create_snapshot(USER, "bmi_infra", "bmi_node", "s1")}

    def setup(e):
        if scenario == "snapshot":
            e.ops.import_image(USER, "bmi_infra", "bmi-test-image")
            _run_jobs(e)
            e.ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")

    probe = _bg_env(tmp_path / "probe")
    setup(probe)
    seen: list[tuple[str, str]] = []
    probe.ops.journal.fault_hook = lambda n, p: seen.append((n, p))
    runs[scenario](probe.ops)
    probe.ops.close()
    for i, point in enumerate(seen):
        env = _bg_env(tmp_path / f"crash{i}")
        setup(env)
        before = env.state()

        class Crash(BaseException):
            pass

        def hook(n, p, point=point):
            if (n, p) == point:
                raise Crash()

        env.ops.journal.fault_hook = hook
        env.ops.journal._finish_failed = lambda tx, exc: None  # the process "dies": no in-process rollback
        with pytest.raises(Crash):
            runs[scenario](env.ops)
        with env.ops.journal.session() as s:
            op = s.scalars(select(Operation)).all()[-1]
            op.owner = f"{os.uname().nodename}:999999999:1"
            for lock in s.scalars(select(Lock)).all():
                lock.owner = op.owner
        env.ops.journal.fault_hook = None
        env.ops.recover(USER)
        assert env.state() == before and _jobs(env) == [], point
        runs[scenario](env.ops)  # and it can run again, then be flattened
        assert _run_jobs(env) == 1 and _jobs(env) == []
        env.ops.close()


def test_background_job_failure_is_retried(tmp_path):
    from ims.einstein import flatten

    env = _bg_env(tmp_path)
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    env.storage.broken = True  # storage down during the flatten: the job goes back to the queue
    assert _run_jobs(env) == 1
    job = flatten.job_of(env.ops.core, ceph(1))
    assert job["state"] == "queued" and job["attempts"] == 1 and "down" in job["error"]
    env.storage.broken = False
    assert _run_jobs(env) == 0  # backing off
    with env.ops.journal.session() as s:  # pretend the back-off has passed
        s.get(flatten.FlattenJob, ceph(1)).attempts = 0
    assert _run_jobs(env) == 1 and _jobs(env) == [] and env.storage.parent_info(ceph(1)) is None


def test_removal_finishes_an_image_left_half_removed(env, monkeypatch):
    """A worker SIGKILLed inside a storage removal can leave an image that still opens but whose
    snapshots no longer read back (NotFound): the removal's roll-forward finishes it instead of
    failing on every retry (found by the chaos run)."""
    from ims.common.errors import ImageNotFound

    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.copy_image(USER, "bmi_infra", "bmi-test-image", "bmi_infra", "copy1")
    copy = ops.db_list(USER, name="copy1")[0][3]
    real = env.storage.list_snapshots
    broken = []

    def half_removed(image):
        if broken and image == copy:
            raise ImageNotFound(f"image {image} not found")
        return real(image)

    def break_at_commit(name, phase):
        if (name, phase) == ("commit", "after"):
            # what a worker killed inside the removal leaves: its snapshots gone, the image still
            # there, and reading its snapshot list fails
            for snap in real(copy):
                env.storage.unprotect_snapshot(copy, snap)
                env.storage.remove_snapshot(copy, snap)
            broken.append(True)

    monkeypatch.setattr(env.storage, "list_snapshots", half_removed)
    ops.journal.fault_hook = break_at_commit
    ops.remove_image(USER, "bmi_infra", "copy1")
    ops.journal.fault_hook = None
    monkeypatch.undo()
    assert copy not in env.storage.list_images()
    assert [r[1] for r in ops.db_list(USER)] == ["bmi-test-image"]
    assert ops.reconcile(ADMIN)["unfinished_operations"] == []

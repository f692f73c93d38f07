"""The guide's workflow and all-or-nothing behaviour of the operations against REAL parts:
a throwaway Ceph cluster (or the file driver), a private tgtd read back through libiscsi,
the HIL simulator over HTTP, and SQLite on disk or a throwaway PostgreSQL."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from ims.common import config
from ims.common.errors import BMIError
from ims.database.models import Image, Operation, Provision
from ims.einstein.hil import HILClient
from ims.einstein.operations import Operations
from tests.support import iscsi_rw
from tests.support.ceph import purge_images
from tests.support.pg import BACKENDS, backend_url

UID = "4242"
USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
NODE, NIC, NET, MAC = "bmi_node", "bmi_port", "bmi_network", "52:54:00:00:00:01"
NODE_INITIATOR = "iqn.2017-10.org.moc.bmi.node:bmi_node"
GOLDEN = os.urandom(1 << 20)
SIZE = 8 << 20


def write_config(tmp: Path, driver: str, ceph_cluster, tgtd, hil_sim, db_url: str | None = None) -> Path:
    (tmp / "tftp" / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    conf_dir = tgtd.new_conf_dir()
    fs = (f"driver = ceph\npool = {ceph_cluster.pool}\nconf_file = {ceph_cluster.conf}\nid = admin\n"
          f"keyring = {ceph_cluster.keyring}\n") if driver == "ceph" else f"driver = file\npath = {tmp}/store\n"
    path = tmp / "bmi.cfg"
    path.write_text(textwrap.dedent(f"""\
        [bmi]
        uid = {UID}
        admin_users = haasadmin
        [db]
        path = {tmp}/bmi.db
        url = {db_url or ""}
        [fs]
        """) + fs + textwrap.dedent(f"""\
        [iscsi]
        ip = {tgtd.portal_ip}
        port = {tgtd.portal_port}
        conf_dir = {conf_dir}
        control_port = {tgtd.control_port}
        [net_isolator]
        url = {hil_sim.url}
        auth_cache_seconds = 0
        [tftp]
        pxelinux_path = {tmp}/tftp/pxelinux.cfg
        ipxe_path = {tmp}/tftp
        [logs]
        path = {tmp}/logs
        """))
    return path


class RealEnv:
    def __init__(self, tmp: Path, driver: str, ceph_cluster, tgtd, hil_sim, db_url: str | None = None) -> None:
        self.tmp, self.driver, self.tgtd, self.hil_sim = tmp, driver, tgtd, hil_sim
        self.cfg_path = write_config(tmp, driver, ceph_cluster, tgtd, hil_sim, db_url)
        self.cfg = config.parse(str(self.cfg_path))
        self.ops = Operations.from_config(self.cfg)
        self.hil = HILClient(hil_sim.url, "haasadmin", "admin1234")
        try:
            self.ops.create_project(ADMIN, "bmi_infra", NET)
        except BMIError:
            pass
        if not self.ops.storage.image_exists("bmi-test-image"):
            self.ops.storage.create_image("bmi-test-image", SIZE)
            self.ops.storage.write("bmi-test-image", 0, GOLDEN)

    def ceph(self, image_id: int) -> str:
        return f"{UID}img{image_id}"

    def tgt_targets(self) -> list[str]:
        """Targets as the real tgtd reports them (not the driver's bookkeeping)."""
        out = subprocess.run(["tgtadm", "-C", str(self.tgtd.control_port), "--lld", "iscsi", "--op", "show",
                              "--mode", "target"], capture_output=True, text=True, check=True).stdout
        return sorted(re.findall(r"^Target \d+: (\S+)$", out, re.M))

    def state(self) -> dict:
        st = self.ops.storage
        with self.ops.journal.session() as s:
            rows = sorted([r.name, r.parent.name if r.parent else "", r.is_snapshot, r.kind,
                           self.ceph(r.id)] for r in s.scalars(select(Image)).all())
            provs = sorted([p.node, p.mac] for p in s.scalars(select(Provision)).all())
        images = {}
        for name in st.list_images():
            snaps = st.list_snapshots(name)
            images[name] = {"snaps": {sn: st.is_protected(name, sn) for sn in snaps}, "parent": st.parent_info(name)}
        files = sorted(str(p.relative_to(self.tmp / "tftp")) for p in (self.tmp / "tftp").rglob("*") if p.is_file())
        nets = {n["label"]: n.get("networks", {}) for n in self.hil.show_node(NODE)["nics"]}
        conf = sorted(f for f in os.listdir(self.ops.cfg.iscsi.conf_dir) if not f.startswith("."))
        return shape({"rows": rows, "provs": provs, "images": images, "targets": self.tgt_targets(),
                      "conf": conf, "files": files, "nets": nets})

    def cleanup(self) -> None:
        """Deprovision and remove everything BMI made, so the next scenario starts clean."""
        ops = self.ops
        with ops.journal.session() as s:
            provs = [(p.node, p.nic) for p in s.scalars(select(Provision)).all()]
            rows = [(r.name, r.kind) for r in s.scalars(select(Image).order_by(Image.id.desc())).all()]
        for node, nic in provs:
            ops.deprovision(USER, "bmi_infra", node, NET, nic)
        for name, kind in rows:
            if kind in ("golden", "snapshot"):
                ops.remove_image(USER, "bmi_infra", name)
        purge_images(ops.storage, UID + "img")
        assert self.tgt_targets() == []

    def close(self) -> None:
        self.cleanup()
        self.ops.close()


def shape(state: dict) -> dict:
    """Replace ids in Ceph names by their rank: a retried operation gets new ids, never reused ones."""
    text = json.dumps(state, sort_keys=True)
    ids = sorted({int(m) for m in re.findall(UID + r"img(\d+)", text)})
    for rank, i in sorted(enumerate(ids), key=lambda x: -x[1]):
        text = text.replace(f"{UID}img{i}", f"CEPH#{rank}")
    return json.loads(text)


# Both storage drivers on SQLite; PostgreSQL with Ceph (the multi-host pairing) - the driver does not
# change what the database sees.
ENVS = [p for p in (("ceph", "sqlite"), ("file", "sqlite"), ("ceph", "postgresql")) if p[1] in BACKENDS]


@pytest.fixture(params=ENVS, ids=["-".join(p) for p in ENVS])
def env(request, tmp_path, ceph_cluster, tgtd, hil_sim):
    driver, backend = request.param
    e = RealEnv(tmp_path, driver, ceph_cluster, tgtd, hil_sim, backend_url(request, backend, tmp_path))
    yield e
    e.close()


def test_guide_workflow_on_real_parts(env):
    ops = env.ops
    golden_before = ops.storage.read("bmi-test-image", 0, 1 << 20)
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    rows = ops.db_list(USER)
    assert rows[-1][1:] == ["bmi-test-image", "bmi_infra", rows[-1][3], False, False, ""]
    golden_copy = rows[-1][3]
    assert re.fullmatch(UID + r"img\d+", golden_copy)
    assert golden_copy in ops.storage.list_images()
    assert ops.storage.list_snapshots("bmi-test-image") == []  # the source is left untouched
    assert ops.storage.read("bmi-test-image", 0, 1 << 20) == golden_before
    assert ops.list_images(USER, "bmi_infra") == ["bmi-test-image"]

    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    node_row = ops.db_list(USER, name=NODE)[0]
    clone = node_row[3]
    assert node_row[6] == "bmi-test-image"
    iqn = ops.iscsi.iqn(clone)
    portal = env.tgtd.portal
    # the node's LUN, read through a real iSCSI initiator, is the golden image
    assert iqn in iscsi_rw.iscsi_ls(portal, initiator=NODE_INITIATOR)
    chap = iscsi_rw.conf_chap(ops.iscsi.conf_path(clone))   # [iscsi] chap is on by default
    assert chap is not None and f"set password {chap[1]}" in (env.tmp / "tftp" / f"{NODE}.ipxe").read_text()
    assert iscsi_rw.readcapacity16(env.tgtd.url(iqn), initiator=NODE_INITIATOR, chap=chap) == SIZE
    assert iscsi_rw.read_lun(portal, iqn, 1, 0, 2048, initiator=NODE_INITIATOR, chap=chap) == GOLDEN
    # another initiator may not log in to it (not even with the secret), nor the node without it
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.read_lun(portal, iqn, 1, 0, 8, initiator="iqn.2017-10.org.moc.bmi.node:intruder", chap=chap)
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.read_lun(portal, iqn, 1, 0, 8, initiator=NODE_INITIATOR)
    ipxe = (env.tmp / "tftp" / f"{NODE}.ipxe").read_text()
    assert f"sanboot --keep iscsi:{env.tgtd.portal_ip}:tcp:{env.tgtd.portal_port}:1:{iqn}" in ipxe
    assert f"set initiator-iqn {NODE_INITIATOR}" in ipxe
    assert "INITRD bmi_node.ipxe" in (env.tmp / "tftp" / "pxelinux.cfg" / "01-52-54-00-00-00-01").read_text()
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}

    # a node's write lands in its clone only
    iscsi_rw.write_lun(portal, iqn, 1, 0, b"N" * 512, initiator=NODE_INITIATOR, chap=chap)
    assert ops.storage.read(clone, 0, 512) == b"N" * 512
    assert ops.storage.read(golden_copy, 0, 512) == GOLDEN[:512]

    ops.create_snapshot(USER, "bmi_infra", NODE, "bmi-test-image-snapshot")
    snap_row = ops.db_list(USER, name="bmi-test-image-snapshot")[0]
    assert snap_row[4:] == [False, True, "bmi-test-image"]
    assert ops.storage.read(snap_row[3], 0, 512) == b"N" * 512  # the snapshot carries the node's writes
    assert ops.storage.list_snapshots(clone) == []
    assert ops.list_snapshots(USER, "bmi_infra") == [["bmi-test-image-snapshot", "bmi-test-image"]]

    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    assert iqn not in iscsi_rw.iscsi_ls(portal, initiator=NODE_INITIATOR)
    assert env.tgt_targets() == []
    assert clone not in ops.storage.list_images()
    assert not list((env.tmp / "tftp").rglob("*.ipxe")) and not list((env.tmp / "tftp").rglob("01-*"))
    assert env.hil.nic_networks(NODE, NIC) == {}

    ops.remove_image(USER, "bmi_infra", "bmi-test-image-snapshot")
    ops.remove_image(USER, "bmi_infra", "bmi-test-image")
    assert ops.db_list(USER) == []
    assert [i for i in ops.storage.list_images() if i.startswith(UID)] == []
    assert ops.storage.read("bmi-test-image", 0, 1 << 20) == golden_before


SETUPS = {
    "import": lambda o: None,
    "provision": lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
    "snapshot": lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                           o.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)),
    "deprovision": lambda o: (o.import_image(USER, "bmi_infra", "bmi-test-image"),
                              o.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)),
}
RUNS = {
    "import": lambda o: o.import_image(USER, "bmi_infra", "bmi-test-image"),
    "provision": lambda o: o.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC),
    "snapshot": lambda o: o.create_snapshot(USER, "bmi_infra", NODE, "snap1"),
    "deprovision": lambda o: o.deprovision(USER, "bmi_infra", NODE, NET, NIC),
}


class Injected(Exception):
    pass


@pytest.mark.parametrize("scenario", sorted(RUNS))
def test_failure_at_each_step_restores_everything(env, scenario):
    setup, run = SETUPS[scenario], RUNS[scenario]
    setup(env.ops)
    seen: list[tuple[str, str]] = []
    env.ops.journal.fault_hook = lambda n, p: seen.append((n, p))
    before = env.state()
    run(env.ops)
    env.ops.journal.fault_hook = None
    after = env.state()
    assert before != after
    for i, point in enumerate(seen):
        env.cleanup()
        setup(env.ops)
        assert env.state() == before

        def hook(n, p, point=point):
            if (n, p) == point:
                raise Injected(f"{n}/{p}")

        env.ops.journal.fault_hook = hook
        committed = any(n == "commit" for n, _ in seen[:i + 1])
        if committed:
            run(env.ops)  # past the commit point the answer is success: the journal finished it
        else:
            with pytest.raises(Injected):
                run(env.ops)
        env.ops.journal.fault_hook = None
        assert env.state() == (after if committed else before), f"{scenario}: fault at {point}"


KILLER = """
import os, signal, sys
from ims.common import config
from ims.einstein.operations import Operations
ops = Operations.from_config(config.parse(sys.argv[1]))
point = (sys.argv[2], sys.argv[3])
def hook(n, p):
    if (n, p) == point:
        os.kill(os.getpid(), signal.SIGKILL)
ops.journal.fault_hook = hook
auth = {"username": "haas", "password": "secret"}
if sys.argv[4] == "provision":
    ops.provision(auth, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
elif sys.argv[4] == "import":
    ops.import_image(auth, "bmi_infra", "bmi-test-image")
else:
    ops.create_snapshot(auth, "bmi_infra", "bmi_node", "snap1")
"""


@pytest.mark.parametrize("scenario,point,committed", [
    ("import", ("storage.clone", "after"), False),
    ("import", ("commit", "after"), True),
    ("provision", ("storage.clone", "after"), False),
    ("provision", ("db.insert_provision", "after"), False),
    ("provision", ("iscsi.add_target", "after"), False),
    ("provision", ("boot.write", "after"), False),
    ("snapshot", ("storage.flatten", "after"), False),
    ("snapshot", ("commit", "after"), True),
])
def test_killed_process_is_recovered(env, scenario, point, committed):
    setup, run = SETUPS[scenario], RUNS[scenario]
    setup(env.ops)
    before = env.state()
    proc = subprocess.run([sys.executable, "-c", KILLER, str(env.cfg_path), point[0], point[1], scenario],
                          capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).parents[2]))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with env.ops.journal.session() as s:
        assert s.scalars(select(Operation).order_by(Operation.id)).all()[-1].state == "running"
    summary = env.ops.recover(USER)
    assert summary["rolled_forward" if committed else "rolled_back"], summary
    if committed:
        # finished forward: exactly what a run that was never killed leaves (modulo ids)
        recovered = env.state()
        env.cleanup()
        setup(env.ops)
        assert env.state() == before
        run(env.ops)
        assert recovered == env.state()
    else:
        assert env.state() == before
        run(env.ops)  # the node/image is usable again: no stale lock, no leftover


def _provision_in_child(cfg_path: str, barrier, results) -> None:
    from ims.common import config as cfgmod
    from ims.einstein.operations import Operations as Ops

    ops = Ops.from_config(cfgmod.parse(cfg_path))
    barrier.wait()
    try:
        ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
        results.put(200)
    except BMIError as exc:
        results.put(exc.status)


def test_two_processes_provisioning_one_node(env):
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_provision_in_child, args=(str(env.cfg_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(results.get(timeout=5) for _ in range(2)) == [200, 409]
    assert len(env.tgt_targets()) == 1

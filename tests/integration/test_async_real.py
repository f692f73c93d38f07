"""Asynchronous operations against REAL parts: a throwaway Ceph cluster, a private tgtd read back
through libiscsi, the HIL simulator over HTTP, SQLite on disk or PostgreSQL.  submit -> wait -> done with the
node's target live; a batch of 10 provisions under ``[scheduler] max_per_gateway = 2`` all succeed
and the task table never shows more than 2 running at once; a worker SIGKILLed mid-task leaves its
running task rolled back and its queued ones failed, once recovery (as Einstein runs it) is done."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.common import config  # noqa: E402
from ims.database.models import Task  # noqa: E402
from ims.einstein.operations import Operations  # noqa: E402
from ims.einstein.tasks import NOT_STARTED  # noqa: E402
from tests.support import iscsi_rw  # noqa: E402
from tests.support.ceph import purge_images  # noqa: E402
from tests.support.hil import HILSimulator, HILSimulatorError, example_inventory, start_hil_simulator  # noqa: E402

pytestmark = pytest.mark.integration

UID = "5151"
USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
NET, NIC, PROJECT = "bmi_network", "eth0", "bmi_infra"
NODES = [f"an{i:02d}" for i in range(1, 12)]
SIZE = 8 << 20


def initiator(node: str) -> str:
    return f"iqn.2017-10.org.moc.bmi.node:{node}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HILSimulator]:
    inv = example_inventory()
    for i, node in enumerate(NODES, start=1):
        inv["nodes"].append({"name": node, "project": PROJECT,
                             "nics": [{"label": NIC, "macaddr": f"52:54:00:51:00:{i:02x}"}]})
    try:
        handle = start_hil_simulator(inv, tmp_path_factory.mktemp("hilsim-async"), action_delay=0.0)
    except HILSimulatorError as exc:
        pytest.fail(f"cannot start the HIL simulator: {exc}", pytrace=False)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture()
def ops(tmp_path: Path, ceph_cluster: Any, tgtd: Any, sim: HILSimulator, db_url: str) -> Iterator[Operations]:
    (tmp_path / "tftp" / "pxelinux.cfg").mkdir(parents=True)
    path = tmp_path / "bmi.cfg"
    path.write_text(textwrap.dedent(f"""\
        [bmi]
        uid = {UID}
        admin_users = haasadmin
        [db]
        url = {db_url}
        [fs]
        driver = ceph
        pool = {ceph_cluster.pool}
        conf_file = {ceph_cluster.conf}
        id = admin
        keyring = {ceph_cluster.keyring}
        [iscsi]
        ip = {tgtd.portal_ip}
        port = {tgtd.portal_port}
        conf_dir = {tgtd.new_conf_dir()}
        control_port = {tgtd.control_port}
        [net_isolator]
        url = {sim.url}
        auth_cache_seconds = 30
        [tftp]
        pxelinux_path = {tmp_path}/tftp/pxelinux.cfg
        ipxe_path = {tmp_path}/tftp
        [logs]
        path = {tmp_path}/logs
        [scheduler]
        max_per_gateway = 2
        """))
    ops = Operations.from_config(config.parse(str(path)))
    ops.create_project(ADMIN, PROJECT, NET)
    source = f"async-src-{UID}"
    if not ops.storage.image_exists(source):
        ops.storage.create_image(source, SIZE)
        ops.storage.write(source, 0, b"async-golden" * 100)
    ops.import_image(USER, PROJECT, source, None, False)
    ops.golden = source  # type: ignore[attr-defined]
    try:
        yield ops
    finally:
        ops.journal.fault_hook = None
        for node, _img in ops.list_provisioned(USER, PROJECT):
            ops.deprovision(USER, PROJECT, node, NET, NIC)
        ops.remove_image(USER, PROJECT, source)
        purge_images(ops.storage, UID + "img")
        ops.close()


def wait(ops: Operations, rec: dict[str, Any]) -> dict[str, Any]:
    for _ in range(200):
        rec = ops.operation_wait(USER, rec["id"], 10)
        if rec["state"] in ("done", "failed"):
            return rec
    raise AssertionError(f"operation {rec['id']} did not finish: {rec}")


def pro(ops: Operations, node: str) -> dict[str, str]:
    return {"project": PROJECT, "node": node, "img": ops.golden, "network": NET, "nic": NIC}  # type: ignore[attr-defined]


def test_submit_a_provision_and_wait(ops: Operations, tgtd: Any) -> None:
    node = NODES[-1]
    rec = ops.submit(USER, "provision", pro(ops, node))
    assert rec["state"] in ("queued", "running") and rec["verb"] == "provision"
    done = wait(ops, rec)
    assert done["state"] == "done" and done["error"] is None, done
    assert done["progress"] == 100 and done["steps_done"] >= 4
    clone = ops.db_list(USER, name=node)[0][3]
    iqn = ops.iscsi.iqn(clone)
    # the target is live: the node's initiator sees it and reads the golden bytes through it
    assert iqn in iscsi_rw.iscsi_ls(tgtd.portal, initiator=initiator(node))
    chap = iscsi_rw.conf_chap(ops.iscsi.conf_path(clone))   # [iscsi] chap is on by default
    assert iscsi_rw.read_lun(tgtd.portal, iqn, 1, 0, 1, initiator=initiator(node), chap=chap)[:12] == b"async-golden"
    gone = wait(ops, ops.submit(USER, "deprovision", {"project": PROJECT, "node": node, "network": NET, "nic": NIC}))
    assert gone["state"] == "done", gone
    assert iqn not in iscsi_rw.iscsi_ls(tgtd.portal, initiator=initiator(node))


def test_batch_of_ten_under_a_gateway_bound_of_two(ops: Operations, tgtd: Any) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def running_now() -> int:
        with ops.journal.session() as s:
            return int(s.scalar(select(func.count()).select_from(Task).where(Task.state == "running")) or 0)

    def sample(name: str, phase: str) -> None:  # at every step of every task: how many run now?
        n = running_now()
        with lock:
            seen.append(n)

    ops.journal.fault_hook = sample
    nodes = NODES[:10]
    recs = ops.submit_batch(USER, "provision", [pro(ops, n) for n in nodes])
    assert len(recs) == 10
    assert sorted(r["queue_position"] for r in recs if r["state"] == "queued") == list(range(1, 9))
    done = [wait(ops, r) for r in recs]
    ops.journal.fault_hook = None
    assert [r["state"] for r in done] == ["done"] * 10, [r["error"] for r in done]
    assert seen and max(seen) == 2, f"max running seen {max(seen)}"
    provisioned = sorted(n for n, _img in ops.list_provisioned(USER, PROJECT))
    assert provisioned == sorted(nodes)
    for node in (nodes[0], nodes[-1]):
        clone = ops.db_list(USER, name=node)[0][3]
        iqn, chap = ops.iscsi.iqn(clone), iscsi_rw.conf_chap(ops.iscsi.conf_path(clone))
        assert iscsi_rw.read_lun(tgtd.portal, iqn, 1, 0, 1, initiator=initiator(node), chap=chap)[:12] \
            == b"async-golden"
    gone = ops.submit_batch(USER, "deprovision", [{"project": PROJECT, "node": n, "network": NET, "nic": NIC}
                                                  for n in nodes])
    assert [wait(ops, r)["state"] for r in gone] == ["done"] * 10
    assert ops.list_provisioned(USER, PROJECT) == []


# An Einstein worker in miniature: it accepts a batch of 3 provisions (bound 1: one runs, two wait)
# and is SIGKILLed right after the running one made its node's target (its last step; its boot files
# are written alongside, done or not).
CHILD = """
import json, os, signal, sys, time
from ims.common import config
from ims.einstein.operations import Operations
ops = Operations.from_config(config.parse(sys.argv[1]))
auth = {"username": "haas", "password": "secret"}
def hook(name, phase):
    if (name, phase) == ("iscsi.add_target", "after"):
        os.kill(os.getpid(), signal.SIGKILL)
ops.journal.fault_hook = hook
items = [json.loads(a) for a in sys.argv[2:]]
recs = ops.submit_batch(auth, "provision", items)
print(json.dumps([r["id"] for r in recs]), flush=True)
time.sleep(120)
"""


def test_worker_killed_mid_task_recovery_settles_its_tasks(ops: Operations, tgtd: Any) -> None:
    ops.core.cfg.scheduler.values["max_per_gateway"] = 1
    cfg_path = Path(ops.cfg.path)
    text = cfg_path.read_text().replace("max_per_gateway = 2", "max_per_gateway = 1")
    cfg_path.write_text(text)
    nodes = NODES[:3]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg_path), *[json.dumps(pro(ops, n)) for n in nodes]],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT), check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[0])
    before = {i: ops.operation_show(USER, i)["state"] for i in ids}
    assert before == {ids[0]: "running", ids[1]: "queued", ids[2]: "queued"}
    assert ops.operation_show(USER, ids[0])["step"] == "iscsi.add_target"
    summary = ops.recover()  # what Einstein's supervisor runs before it respawns the dead worker
    assert summary["tasks"]["not_started"] == ids[1:] and summary["tasks"]["failed"] == ids[:1]
    after = {i: ops.operation_show(USER, i) for i in ids}
    assert after[ids[0]]["state"] == "failed" and "rolled back" in after[ids[0]]["error"]["message"]
    for i in ids[1:]:
        assert after[i]["state"] == "failed" and after[i]["error"]["message"] == NOT_STARTED
    # nothing of the three is left: no row, no target, no boot file; the nodes can be provisioned again
    assert ops.list_provisioned(USER, PROJECT) == []
    assert [t for t in ops.iscsi.live_targets() if t.startswith(UID)] == []
    assert not list((cfg_path.parent / "tftp").glob("*.ipxe"))
    again = wait(ops, ops.submit(USER, "provision", pro(ops, nodes[0])))
    assert again["state"] == "done", again

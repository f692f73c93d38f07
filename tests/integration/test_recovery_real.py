"""Recovery under the lock on REAL parts (Ceph, tgtd, HIL simulator, SQLite on disk or PostgreSQL).

A process provisioning bmi_node is SIGKILLed once its clone, target and boot files exist.
A NEW provision of the same node, by another process, must first roll the dead one back
under the node's lock, then succeed; a later full recovery (an Einstein restart) must
leave the newer provision intact: boot files, target, clone and rows.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from ims.database.models import Image, Lock, Operation, Provision
from tests.integration.test_operations_real import GOLDEN, MAC, NET, NIC, NODE, NODE_INITIATOR, USER, RealEnv
from tests.support import iscsi_rw

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, os, signal, sys
from ims.common import config
from ims.einstein.operations import Operations
ops = Operations.from_config(config.parse(sys.argv[1]))
auth = {"username": "haas", "password": "secret"}
if sys.argv[2] == "killed-provision":
    import time
    def hook(name, phase):
        # once the target is made and the boot files (written alongside, ims/einstein/ops/background.py
        # Step.start) are on disk: the last moment before the operation would end
        if (name, phase) == ("iscsi.add_target", "after"):
            deadline = time.monotonic() + 30
            while not all(os.path.exists(p) for p in sys.argv[3:]) and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGKILL)
    ops.journal.fault_hook = hook
    ops.provision(auth, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
elif sys.argv[2] == "provision":
    ops.provision(auth, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
else:  # an Einstein restart: the recovery it runs before serving
    print(json.dumps(ops.recover(auth)))
ops.close()
"""


def run_child(env: RealEnv, what: str, *wait_for: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(env.cfg_path), what, *map(str, wait_for)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT), check=False)


@pytest.fixture()
def env(tmp_path, ceph_cluster, tgtd, hil_sim, db_url):
    e = RealEnv(tmp_path, "ceph", ceph_cluster, tgtd, hil_sim, db_url)
    yield e
    e.close()


def test_new_provision_recovers_the_killed_one_under_the_lock_and_restart_keeps_it(env: RealEnv) -> None:
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    boot_file = env.tmp / "tftp" / f"{NODE}.ipxe"
    pxe_file = env.tmp / "tftp" / "pxelinux.cfg" / ("01-" + MAC.replace(":", "-"))

    killed = run_child(env, "killed-provision", boot_file, pxe_file)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with env.ops.journal.session() as s:
        dead = s.scalars(select(Operation).order_by(Operation.id)).all()[-1]
        dead_id = dead.id
        assert dead.kind == "provision" and dead.state == "running"
        dead_clone = env.ceph(s.scalars(select(Image).where(Image.name == NODE)).one().id)
        assert [lk.name for lk in s.scalars(select(Lock))] == ["image:bmi_infra/bmi_node", "node:bmi_node"]
    assert boot_file.exists() and pxe_file.exists()
    assert dead_clone in env.ops.storage.list_images()

    newer = run_child(env, "provision")
    assert newer.returncode == 0, newer.stderr
    with env.ops.journal.session() as s:
        ops = {op.id: op.state for op in s.scalars(select(Operation).where(Operation.kind == "provision"))}
        assert ops[dead_id] == "rolled_back"  # rolled back by the newer provision, before it ran
        assert [state for op_id, state in ops.items() if op_id > dead_id] == ["done"]
        clone = env.ceph(s.scalars(select(Image).where(Image.name == NODE)).one().id)
        assert s.get(Provision, NODE) is not None
        assert s.scalars(select(Lock)).all() == []
    assert clone != dead_clone
    assert dead_clone not in env.ops.storage.list_images()  # the dead provision's clone is gone
    intact = env.state()

    restart = run_child(env, "recover")
    assert restart.returncode == 0, restart.stderr
    summary = json.loads(restart.stdout.strip().splitlines()[-1])
    assert summary["rolled_back"] == [] and summary["rolled_forward"] == [] and summary["failed"] == []

    # The newer provision is whole: same state, and the node boots from its own clone.
    assert env.state() == intact
    iqn = env.ops.iscsi.iqn(clone)
    assert f":{iqn}" in boot_file.read_text()
    assert "INITRD bmi_node.ipxe" in pxe_file.read_text()
    assert env.tgt_targets() == [iqn]
    assert clone in env.ops.storage.list_images()
    chap = iscsi_rw.conf_chap(env.ops.iscsi.conf_path(clone))   # [iscsi] chap is on by default
    assert chap is not None and f"set password {chap[1]}" in boot_file.read_text()
    assert iscsi_rw.read_lun(env.tgtd.portal, iqn, 1, 0, 2048, initiator=NODE_INITIATOR, chap=chap) == GOLDEN
    assert env.hil.nic_networks(NODE, NIC) == {"vlan/native": NET}

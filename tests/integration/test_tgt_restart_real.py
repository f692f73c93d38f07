"""Issue 7.1 on real parts: after tgtd is restarted the way Debian's tgt.service does it,
deprovisioning one node must not touch its neighbour's target.

Real Operations over a throwaway Ceph cluster, a PRIVATE tgtd (it is restarted, so the
session's shared one is left alone), the HIL simulator and SQLite on disk; the neighbour's
LUN is read back through libiscsi.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ims.einstein.iscsi.tgt import TgtTarget, parse_conf
from tests.integration.test_operations_real import GOLDEN, NET, NIC, NODE, USER, RealEnv
from tests.support import iscsi_rw
from tests.support.private_tgt import private_tgtd_env
from tests.support.tgt import debian_restart

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
CISCO_NIC = "enp130s0f0"
INITIATOR = "iqn.2017-10.org.moc.bmi.node:"


@pytest.fixture()
def env(tmp_path, ceph_cluster, hil_sim):
    with private_tgtd_env(tmp_path, ceph_cluster, hil_sim) as e:
        yield e


def clone_of(env: RealEnv, node: str) -> str:
    return env.ops.db_list(USER, name=node)[0][3]


def remembered_tid(drv: TgtTarget, name: str) -> int | None:
    return parse_conf(Path(drv.conf_path(name)).read_text(), name).tid


def test_debian_restart_then_dpro_keeps_the_neighbours_target(env):
    ops, drv = env.ops, env.ops.iscsi
    assert isinstance(drv, TgtTarget)
    conf_dir = drv.conf_dir
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", NODE, "bmi-test-image", NET, NIC)
    ops.provision(USER, "bmi_infra", "cisco-01", "bmi-test-image", NET, CISCO_NIC)
    ops.provision(USER, "bmi_infra", "cisco-02", "bmi-test-image", NET, CISCO_NIC)
    c1, c2 = clone_of(env, "cisco-01"), clone_of(env, "cisco-02")
    assert c1 != c2
    # cisco-02 writes into its own disk: its marker tells its clone from any other
    marker = os.urandom(4096)
    chap2 = iscsi_rw.conf_chap(drv.conf_path(c2))   # [iscsi] chap is on by default
    iscsi_rw.write_lun(env.tgtd.portal, drv.iqn(c2), 1, 0, marker, initiator=INITIATOR + "cisco-02", chap=chap2)
    assert ops.storage.read(c2, 0, 4096) == marker and ops.storage.read(c1, 0, 4096) == GOLDEN[:4096]

    ops.deprovision(USER, "bmi_infra", NODE, NET, NIC)
    debian_restart(env.tgtd, conf_dir)

    live = drv._show_all()
    assert sorted(live) == sorted([drv.iqn(c1), drv.iqn(c2)])
    # tgt-admin numbered the two targets 1 and 2 again: the tid cisco-01's conf file remembers is
    # now cisco-02's (the operator's reproduction; the old driver deleted it with --force).
    assert remembered_tid(drv, c1) == live[drv.iqn(c2)].tid

    ops.deprovision(USER, "bmi_infra", "cisco-01", NET, CISCO_NIC)

    # cisco-02: still live, its LUN is its own clone, and a node can read it
    neighbour = drv.live_target(c2)
    assert neighbour is not None
    assert neighbour.backing_stores == {1: ops.storage.backing(c2).path}
    assert neighbour.acl == ["0.0.0.0/32", INITIATOR + "cisco-02"]
    first_mib = iscsi_rw.read_lun(env.tgtd.portal, drv.iqn(c2), 1, 0, MiB // 512, initiator=INITIATOR + "cisco-02",
                                  chap=chap2)
    assert first_mib == marker + GOLDEN[4096:MiB]
    assert drv.target_exists(c2) and ops.db_list(USER, name="cisco-02")
    # cisco-01: target, conf file, clone and row are gone
    assert drv.iqn(c1) not in drv._show_all()
    assert not os.path.exists(drv.conf_path(c1))
    assert c1 not in ops.storage.list_images()
    assert ops.db_list(USER, name="cisco-01") == []
    assert env.tgt_targets() == [drv.iqn(c2)]
    assert drv.list_targets() == [c2]

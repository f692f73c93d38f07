"""A take-over finishing a dead host's half-made provision, on REAL parts (throwaway Ceph, two tgtds,
the HIL simulator, one database): the dead host's tgtd had exported the clone, and its Ceph watch
on it outlives the crash (~30 s), so removing the clone fails "busy" until it expires.  The
take-over's recovery (HostAgent.take_over -> Operations.recover(fence=...)) blocklists that client
first and rolls the provision back at once; an ordinary recovery leaves it for a later round."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ims.common.errors import ImageBusy
from ims.einstein.takeover import HostAgent
from tests.integration.test_operations_real import KILLER, USER, RealEnv
from tests.support.tgt import start_tgtd, stop_tgtd

REPO = Path(__file__).resolve().parents[2]


def _config_on(env: RealEnv, other_tgtd, path: Path) -> Path:
    """``env``'s config (same database, Ceph, HIL and boot directory) for a host with ``other_tgtd``."""
    text = env.cfg_path.read_text()
    conf_dir = other_tgtd.new_conf_dir()
    for key, value in (("port", other_tgtd.portal_port), ("control_port", other_tgtd.control_port),
                       ("conf_dir", conf_dir)):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1, key
    path.write_text(text)
    return path


def test_takeover_fences_the_dead_gateways_client_of_a_half_made_clone(tmp_path, ceph_cluster, tgtd, hil_sim,
                                                                       db_url):
    env = RealEnv(tmp_path, "ceph", ceph_cluster, tgtd, hil_sim, db_url)
    dead = start_tgtd(str(tmp_path / "tgtd-dead-host"))
    try:
        env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
        before = env.state()
        images = set(env.ops.storage.list_images())
        cfg_dead = _config_on(env, dead, tmp_path / "dead-host.cfg")
        # The "dead host" provisions through ITS tgtd and dies right after the target was made.
        proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg_dead), "iscsi.add_target", "after", "provision"],
                              capture_output=True, text=True, timeout=120, cwd=str(REPO))
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        (clone,) = set(env.ops.storage.list_images()) - images
        os.kill(dead.pid, signal.SIGKILL)  # and its gateway with it: its watch on the clone lingers
        with pytest.raises(ImageBusy):
            env.ops.storage.remove_image(clone)
        # An ordinary recovery cannot remove the clone yet: the operation is left for a later round.
        summary = env.ops.recover(USER)
        assert summary["failed"] and not summary["rolled_back"], summary
        assert clone in env.ops.storage.list_images()
        # The take-over's recovery fences the dead gateway's client, then rolls the provision back.
        agent = HostAgent(ops=env.ops)
        summary = env.ops.recover(USER, fence=agent.fence)
        assert summary["rolled_back"] and not summary["failed"], summary
        assert clone not in env.ops.storage.list_images()
        assert env.state() == before
        env.ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
        assert len(env.tgt_targets()) == 1  # the node is usable again, through the live gateway
    finally:
        if dead.alive():
            stop_tgtd(dead)
        else:
            subprocess.run([str(REPO / "scripts" / "tgtd-dev"), "stop", dead.dir], capture_output=True, timeout=120)
        env.close()

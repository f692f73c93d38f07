"""A tgt restart's `tgt-admin -e` racing BMI's add and remove, on a real tgtd and the real tgt-admin.

Debian's tgt.service start sets tgtd "offline", runs `tgt-admin -e -c /etc/tgt/targets.conf`, then sets it
"ready".  That tgt-admin run parses the configuration first and, at its end, DELETES every live target
missing from what it parsed, and (re-)creates every parsed one that is not live.  Found by the chaos run:
a provision that added its target while a restart's tgt-admin was running answered 200, and the node
was left with no target.  These tests put the restart's tgt-admin run exactly into the bad moment.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

import ims.einstein.iscsi.tgt as tgt_module
import ims.einstein.iscsi.tgt_control as tgt_control
from ims.common.errors import IscsiError
from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.base import Backing
from tests.support import iscsi_rw
from tests.support.tgt import TgtdInstance, lun_file, start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PREFIX = "iqn.2026-01.org.bmi.test:"
INITIATOR = "iqn.2026-01.org.bmi.test.node:node-1"


def set_state(instance: TgtdInstance, state: str) -> None:
    subprocess.run(["tgtadm", "-C", str(instance.control_port), "--op", "update", "--mode", "sys",
                    "--name", "State", "-v", state], check=True, capture_output=True, timeout=30)


def tgt_admin_execute(instance: TgtdInstance, parsed_dir: Path, tmp: Path) -> None:
    """`tgt-admin -e` with the configuration a restart parsed at its start (a copy of the conf dir then)."""
    targets_conf = tmp / "targets.conf"
    targets_conf.write_text(f"include {parsed_dir}/*.conf\n")
    proc = subprocess.run(["tgt-admin", "-C", str(instance.control_port), "-e", "-c", str(targets_conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def snapshot_conf_dir(conf_dir: str, tmp: Path) -> Path:
    parsed = Path(tempfile.mkdtemp(prefix="parsed-", dir=tmp))
    for conf in Path(conf_dir).glob("*.conf"):
        shutil.copy(conf, parsed / conf.name)
    return parsed


def ready_later(instance: TgtdInstance, seconds: float = 0.5) -> threading.Timer:
    timer = threading.Timer(seconds, set_state, (instance, "ready"))
    timer.start()
    return timer


@pytest.fixture()
def stack(tmp_path: Path):
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
    keep, keep_data = lun_file(tmp_path, "keep", 0x4B)
    drv.add_target("keep", Backing("rdwr", keep), initiator_names=[INITIATOR])
    try:
        yield instance, drv, keep_data
    finally:
        set_state(instance, "ready")
        stop_tgtd(instance)


def assert_neighbour_intact(instance: TgtdInstance, drv: TgtTarget, keep_data: bytes) -> None:
    assert drv.target_exists("keep")
    url = instance.url(drv.iqn("keep"))
    assert iscsi_rw.read_lun(url, None, None, 0, 8, initiator=INITIATOR) == keep_data


def test_add_survives_a_restart_that_deletes_it_before_it_is_confirmed(stack, tmp_path: Path, monkeypatch) -> None:
    instance, drv, keep_data = stack
    parsed = snapshot_conf_dir(drv.conf_dir, tmp_path)       # what the restart's tgt-admin read: no "new"
    real_create = drv._create
    injected: list[bool] = []
    timers: list[threading.Timer] = []

    def create_then_restart(spec, first=None):
        real_create(spec, first)
        if not injected:
            injected.append(True)
            set_state(instance, "offline")
            tgt_admin_execute(instance, parsed, tmp_path)
            # the hazard is real: tgt-admin deleted the target BMI had just made and verified
            assert drv.iqn("new") not in drv._show_all()
            timers.append(ready_later(instance))

    monkeypatch.setattr(drv, "_create", create_then_restart)
    path, data = lun_file(tmp_path, "new", 0x4E)
    drv.add_target("new", Backing("rdwr", path), initiator_names=[INITIATOR])
    for timer in timers:
        timer.join()

    assert injected, "the restart was not injected"
    live = drv.live_target("new")
    assert live is not None and live.backing_stores.get(drv.lun) == path
    assert tgt_module.parse_conf(Path(drv.conf_path("new")).read_text(), "new").tid == live.tid
    assert iscsi_rw.read_lun(instance.url(drv.iqn("new")), None, None, 0, 8, initiator=INITIATOR) == data
    assert_neighbour_intact(instance, drv, keep_data)


def test_remove_stays_removed_when_a_restart_recreates_it_from_its_conf(stack, tmp_path: Path, monkeypatch) -> None:
    instance, drv, keep_data = stack
    path, _ = lun_file(tmp_path, "gone", 0x47)
    drv.add_target("gone", Backing("rdwr", path), initiator_names=[INITIATOR])
    parsed = snapshot_conf_dir(drv.conf_dir, tmp_path)       # the restart's tgt-admin read gone.conf
    real_unlink = drv._unlink_conf
    timers: list[threading.Timer] = []

    def unlink_then_restart(conf_path):
        real_unlink(conf_path)
        if not timers:
            set_state(instance, "offline")
            tgt_admin_execute(instance, parsed, tmp_path)
            assert drv.iqn("gone") in drv._show_all()       # resurrected, with no conf file: an orphan
            timers.append(ready_later(instance))

    monkeypatch.setattr(drv, "_unlink_conf", unlink_then_restart)
    drv.remove_target("gone")
    for timer in timers:
        timer.join()

    assert timers, "the restart was not injected"
    assert drv.iqn("gone") not in drv._show_all()
    assert not Path(drv.conf_path("gone")).exists()
    assert_neighbour_intact(instance, drv, keep_data)


def test_add_while_tgtd_stays_offline_fails_cleanly(stack, tmp_path: Path, monkeypatch) -> None:
    instance, drv, keep_data = stack
    monkeypatch.setattr(tgt_control, "SETTLE_SECONDS", 1.0)
    set_state(instance, "offline")
    path, _ = lun_file(tmp_path, "late", 0x4C)
    with pytest.raises(IscsiError, match="offline"):
        drv.add_target("late", Backing("rdwr", path), initiator_names=[INITIATOR])
    assert drv.iqn("late") not in drv._show_all()
    assert not Path(drv.conf_path("late")).exists()
    set_state(instance, "ready")
    assert_neighbour_intact(instance, drv, keep_data)


def test_add_waits_for_a_restart_to_finish_loading(stack, tmp_path: Path) -> None:
    """Offline for a moment (a restart loading its conf files): the add waits, then succeeds."""
    instance, drv, keep_data = stack
    set_state(instance, "offline")
    timer = ready_later(instance, 1.0)
    path, data = lun_file(tmp_path, "patient", 0x50)
    drv.add_target("patient", Backing("rdwr", path), initiator_names=[INITIATOR])
    timer.join()
    assert iscsi_rw.read_lun(instance.url(drv.iqn("patient")), None, None, 0, 8, initiator=INITIATOR) == data
    assert_neighbour_intact(instance, drv, keep_data)

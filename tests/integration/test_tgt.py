"""The tgt driver against a real tgtd, read back with the real libiscsi tools and library."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ims.common.errors import CommandFailed, IscsiError, TargetExists, TargetNotFound
from ims.einstein.iscsi.tgt import NO_ADDRESS, TgtTarget, parse_conf
from ims.einstein.storage.base import Backing
from tests.support import iscsi_rw
from tests.support.ceph import CephCluster, ceph_cluster  # noqa: F401  (fixture)
from tests.support.tgt import TgtdInstance, debian_restart, start_tgtd, stop_tgtd, tgtd  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20
PREFIX = "iqn.2026-01.org.bmi.test:"
GOOD_INITIATOR = "iqn.2026-01.org.bmi.test.node:node-1"
BAD_INITIATOR = "iqn.2026-01.org.bmi.test.node:intruder"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def random_file(directory: str | Path, size: int = 16 * MiB, fill: int | None = None) -> tuple[str, bytes]:
    """A sparse file of ``size`` bytes whose first ``fill`` bytes (default: all) are random."""
    path = os.path.join(directory, unique("lun") + ".img")
    data = os.urandom(size if fill is None else fill)
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(data)
    return path, data


def tgt_targets(instance: TgtdInstance) -> dict[str, int]:
    """What tgtd really has (name -> tid), from a full show (fine in a test)."""
    return {iqn: t.tid for iqn, t in instance.target()._show_all().items()}


@pytest.fixture()
def driver(tgtd: TgtdInstance) -> TgtTarget:  # noqa: F811
    return tgtd.target(PREFIX, conf_dir=tgtd.new_conf_dir())


def test_file_target_lifecycle(tgtd: TgtdInstance, driver: TgtTarget, tmp_path: Path) -> None:  # noqa: F811
    path, data = random_file(tmp_path)
    name = unique("node")
    iqn = driver.iqn(name)
    driver.add_target(name, Backing("rdwr", path), ["ALL"])

    # iscsi-ls sees it with LUN 1 as a disk
    listing = iscsi_rw.iscsi_ls(tgtd.portal)
    assert iqn in listing
    assert any(line.startswith("Lun:1") and "DIRECT_ACCESS" in line for line in listing[iqn])
    assert iscsi_rw.readcapacity16(tgtd.url(iqn)) == 16 * MiB
    assert "Vendor" in iscsi_rw.inquiry(tgtd.url(iqn)) or "VENDOR" in iscsi_rw.inquiry(tgtd.url(iqn)).upper()

    # the first MiB read through libiscsi is the file's first MiB
    assert iscsi_rw.read_lun(tgtd.url(iqn), None, None, 0, MiB // 512) == data[:MiB]
    # a write through libiscsi lands in the file
    payload = os.urandom(64 * 1024)
    iscsi_rw.write_lun(tgtd.portal, iqn, 1, 4096, payload)
    with open(path, "rb") as handle:
        handle.seek(4096 * 512)
        assert handle.read(len(payload)) == payload
    assert iscsi_rw.read_lun(tgtd.portal, iqn, 1, 4096, len(payload) // 512) == payload

    # the conf file: one per target, tgt-admin format, records the tid
    conf = Path(driver.conf_path(name)).read_text()
    tid = tgt_targets(tgtd)[iqn]
    assert conf.startswith(f"# bmi: tid={tid} lun=1\n<target {iqn}>\n")
    assert f"    backing-store {path}\n" in conf and "    bs-type rdwr\n" in conf
    assert driver.target_exists(name) and driver.list_targets() == [name]

    with pytest.raises(TargetExists):
        driver.add_target(name, Backing("rdwr", path), ["ALL"])
    assert tgt_targets(tgtd)[iqn] == tid    # the failed duplicate did not disturb the live one

    driver.remove_target(name)
    assert iqn not in iscsi_rw.iscsi_ls(tgtd.portal)
    assert iqn not in tgt_targets(tgtd)
    assert not os.path.exists(driver.conf_path(name))
    assert not driver.target_exists(name) and driver.list_targets() == []
    with pytest.raises(TargetNotFound):
        driver.remove_target(name)
    with pytest.raises(TargetNotFound):
        driver.remove_target(unique("never"))


def test_remove_with_open_session(tgtd: TgtdInstance, driver: TgtTarget, tmp_path: Path) -> None:  # noqa: F811
    """A node still logged in must not block deprovisioning (tgtadm --force)."""
    path, _ = random_file(tmp_path, 4 * MiB, fill=4096)
    name = unique("busy")
    driver.add_target(name, Backing("rdwr", path), ["ALL"])
    session = iscsi_rw._Session(iscsi_rw.parse_address(tgtd.url(driver.iqn(name))), GOOD_INITIATOR)
    try:
        assert session.read(0, 8, 512) == Path(path).read_bytes()[:4096]
        driver.remove_target(name)
        with pytest.raises(iscsi_rw.IscsiIOError):   # the node's session is really gone
            session.read(0, 8, 512)
    finally:
        session.close()
    assert driver.iqn(name) not in tgt_targets(tgtd)


def test_name_live_in_tgtd_and_tid_collisions(tgtd: TgtdInstance, tmp_path: Path) -> None:  # noqa: F811
    """Two conf dirs on one tgtd: their tid counters collide (retry) and a live name is TargetExists."""
    first = tgtd.target(PREFIX, conf_dir=tgtd.new_conf_dir())
    second = tgtd.target(PREFIX, conf_dir=tgtd.new_conf_dir())
    names = [unique("a"), unique("b")]
    for name in names:
        first.add_target(name, Backing("rdwr", random_file(tmp_path, MiB, fill=512)[0]), ["ALL"])
    # same name, no conf file in `second`: tgtd's "already exists" must map to TargetExists
    with pytest.raises(TargetExists):
        second.add_target(names[0], Backing("rdwr", random_file(tmp_path, MiB, fill=512)[0]), ["ALL"])
    assert second.list_targets() == []
    # a new name from `second` starts its counter at 1, which `first` (or other tests) hold: retried
    other = unique("c")
    second.add_target(other, Backing("rdwr", random_file(tmp_path, MiB, fill=512)[0]), ["ALL"])
    live = tgt_targets(tgtd)
    assert {first.iqn(n) for n in names} | {second.iqn(other)} <= set(live)
    assert len({live[first.iqn(n)] for n in names} | {live[second.iqn(other)]}) == 3
    for name in names:
        first.remove_target(name)
    second.remove_target(other)


def test_initiator_name_restriction(tgtd: TgtdInstance, driver: TgtTarget, tmp_path: Path) -> None:  # noqa: F811
    path, data = random_file(tmp_path, 4 * MiB, fill=MiB)
    name = unique("locked")
    iqn = driver.iqn(name)
    driver.add_target(name, Backing("rdwr", path), initiator_names=[GOOD_INITIATOR])
    assert "initiator-name " + GOOD_INITIATOR in Path(driver.conf_path(name)).read_text()

    assert iscsi_rw.read_lun(tgtd.url(iqn), None, None, 0, 16, initiator=GOOD_INITIATOR) == data[:16 * 512]
    assert iscsi_rw.readcapacity16(tgtd.url(iqn), initiator=GOOD_INITIATOR) == 4 * MiB
    with pytest.raises(iscsi_rw.IscsiIOError, match="login"):
        iscsi_rw.read_lun(tgtd.url(iqn), None, None, 0, 16, initiator=BAD_INITIATOR)
    with pytest.raises(CommandFailed):
        iscsi_rw.readcapacity16(tgtd.url(iqn), initiator=BAD_INITIATOR)
    driver.remove_target(name)


def test_initiator_address_restriction(tgtd: TgtdInstance, driver: TgtTarget, tmp_path: Path) -> None:  # noqa: F811
    path, data = random_file(tmp_path, MiB, fill=4096)
    refused, allowed = unique("elsewhere"), unique("local")
    driver.add_target(refused, Backing("rdwr", path), ["10.9.9.0/24"])
    driver.add_target(allowed, Backing("rdwr", random_file(tmp_path, MiB, fill=0)[0]), ["127.0.0.1"])
    with pytest.raises(iscsi_rw.IscsiIOError):
        iscsi_rw.read_lun(tgtd.url(driver.iqn(refused)), None, None, 0, 8)
    assert iscsi_rw.read_lun(tgtd.url(driver.iqn(allowed)), None, None, 0, 8) == bytes(4096)
    driver.remove_target(refused)
    driver.remove_target(allowed)


def test_failure_midway_leaves_nothing(tgtd: TgtdInstance, driver: TgtTarget, tmp_path: Path) -> None:  # noqa: F811
    name = unique("broken")
    missing = str(tmp_path / "does-not-exist.img")
    with pytest.raises(IscsiError):
        driver.add_target(name, Backing("rdwr", missing), ["ALL"])
    assert driver.iqn(name) not in tgt_targets(tgtd)
    assert not os.path.exists(driver.conf_path(name))
    # nothing half-made blocks a retry
    path, data = random_file(tmp_path, MiB, fill=4096)
    driver.add_target(name, Backing("rdwr", path), ["ALL"])
    assert iscsi_rw.read_lun(tgtd.url(driver.iqn(name)), None, None, 0, 8) == data
    driver.remove_target(name)


def test_restore_after_tgtd_crash_and_daemon_down(tmp_path: Path) -> None:
    """kill -9 tgtd, start a new one: restore() re-creates every target from the conf files."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    conf_dir = str(tmp_path / "conf.d")
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        files = {}
        for i in range(3):
            name = f"restore-{i}"
            files[name] = random_file(tmp_path, 2 * MiB, fill=8192)
            names = [GOOD_INITIATOR] if i == 0 else None
            drv.add_target(name, Backing("rdwr", files[name][0]), None if names else ["ALL"], names)
        os.kill(instance.pid, signal.SIGKILL)
        for _ in range(100):
            if not instance.alive():
                break
            time.sleep(0.05)
        stop_tgtd(instance)  # the daemon is gone; this cleans its socket files and pid file

        # tgtd down: a clear IscsiError, not a crash or a CommandFailed
        with pytest.raises(IscsiError, match="tgtd is not running"):
            drv.add_target("restore-x", Backing("rdwr", files["restore-1"][0]), ["ALL"])
        with pytest.raises(IscsiError, match="tgtd is not running"):
            drv.restore()
        assert drv.list_targets() == ["restore-0", "restore-1", "restore-2"]

        instance = start_tgtd(run_dir)
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        assert drv.restore() == 3
        assert drv.restore() == 0     # idempotent
        listing = iscsi_rw.iscsi_ls_names(instance.portal, initiator=GOOD_INITIATOR)
        assert sorted(listing) == sorted(drv.iqn(n) for n in files)
        for name, (_, data) in files.items():
            initiator = GOOD_INITIATOR if name == "restore-0" else iscsi_rw.DEFAULT_INITIATOR
            assert iscsi_rw.read_lun(instance.url(drv.iqn(name)), None, None, 0, 16, initiator=initiator) == data
            assert drv.target_exists(name)
        with pytest.raises(iscsi_rw.IscsiIOError):   # the ACL came back too
            iscsi_rw.read_lun(instance.url(drv.iqn("restore-0")), None, None, 0, 1, initiator=BAD_INITIATOR)
        drv.remove_target("restore-1")
        assert drv.list_targets() == ["restore-0", "restore-2"]
    finally:
        stop_tgtd(instance)
    assert not instance.alive()


def test_conf_file_loads_with_tgt_admin(tmp_path: Path) -> None:
    """The conf file is real tgt-admin input: an operator can load it without BMI."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        path, data = random_file(tmp_path, 2 * MiB, fill=4096)
        drv.add_target("admin-loaded", Backing("rdwr", path), initiator_names=[GOOD_INITIATOR])
        conf_copy = tmp_path / "targets.conf"
        conf_copy.write_text(Path(drv.conf_path("admin-loaded")).read_text())
        drv.remove_target("admin-loaded")
        proc = subprocess.run(["tgt-admin", "-C", str(instance.control_port), "-c", str(conf_copy), "--execute"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        url = instance.url(drv.iqn("admin-loaded"))
        assert iscsi_rw.readcapacity16(url, initiator=GOOD_INITIATOR) == 2 * MiB
        assert iscsi_rw.read_lun(url, None, None, 0, 8, initiator=GOOD_INITIATOR) == data
        with pytest.raises(iscsi_rw.IscsiIOError):
            iscsi_rw.read_lun(url, None, None, 0, 8, initiator=BAD_INITIATOR)
    finally:
        stop_tgtd(instance)


def test_fifty_targets_cost_per_call(tgtd: TgtdInstance, tmp_path: Path,  # noqa: F811
                                     capsys: pytest.CaptureFixture[str]) -> None:
    drv = tgtd.target(PREFIX, conf_dir=tgtd.new_conf_dir())
    names = [unique(f"many{i:02d}") for i in range(50)]
    add_times, remove_times = [], []
    for name in names:
        path, _ = random_file(tmp_path, MiB, fill=0)
        start = time.perf_counter()
        drv.add_target(name, Backing("rdwr", path), ["ALL"])
        add_times.append(time.perf_counter() - start)
    assert set(drv.iqn(n) for n in names) <= set(iscsi_rw.iscsi_ls_names(tgtd.portal))
    assert drv.list_targets() == sorted(names)
    for name in names:
        start = time.perf_counter()
        drv.remove_target(name)
        remove_times.append(time.perf_counter() - start)
    assert not set(drv.iqn(n) for n in names) & set(tgt_targets(tgtd))
    assert drv.list_targets() == []

    def ms(values: list[float]) -> str:
        return f"{1000 * sum(values) / len(values):.1f} ms"

    with capsys.disabled():
        print(f"\n[tgt timing] add: first 10 {ms(add_times[:10])}/call, last 10 {ms(add_times[-10:])}/call; "
              f"remove: first 10 (49..40 others live) {ms(remove_times[:10])}/call, "
              f"last 10 {ms(remove_times[-10:])}/call")


def test_rbd_target(ceph_cluster: CephCluster, tgtd: TgtdInstance, driver: TgtTarget) -> None:  # noqa: F811
    storage = ceph_cluster.storage()
    image = unique("tgtrbd")
    storage.create_image(image, 8 * MiB)
    try:
        data = os.urandom(MiB)
        storage.write(image, 0, data)
        backing = storage.backing(image)
        assert backing.bstype == "rbd"
        driver.add_target(image, backing, ["127.0.0.1"])
        conf = Path(driver.conf_path(image)).read_text()
        assert f"    bsopts \"'{backing.bsopts}'\"\n" in conf and "    bs-type rbd\n" in conf
        url = tgtd.url(driver.iqn(image))
        assert iscsi_rw.readcapacity16(url) == 8 * MiB
        assert iscsi_rw.read_lun(url, None, None, 0, MiB // 512) == data
        payload = os.urandom(8192)
        iscsi_rw.write_lun(url, None, None, 100, payload)
        assert storage.read(image, 100 * 512, len(payload)) == payload
        driver.remove_target(image)
    finally:
        if driver.target_exists(image):
            driver.remove_target(image)
        storage.remove_image(image)   # no watcher left once the target is gone


def conf_tid(drv: TgtTarget, name: str) -> int | None:
    return parse_conf(Path(drv.conf_path(name)).read_text(), name).tid


def test_debian_restart_then_remove_never_hits_a_neighbour(tmp_path: Path) -> None:
    """Issue 7.1 at driver level: after tgt.service renumbers the tids, the tid a conf file
    remembers names another target; remove/exists must go by IQN."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    conf_dir = str(tmp_path / "conf.d")
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        names = ["a-node", "b-node", "c-node", "d-node"]          # glob order = this order
        files = {n: random_file(tmp_path, 2 * MiB, fill=4096) for n in names}
        for name in names:
            drv.add_target(name, Backing("rdwr", files[name][0]), ["ALL"])
        before = {n: conf_tid(drv, n) for n in names}
        assert before == {n: tgt_targets(instance)[drv.iqn(n)] for n in names}

        drv.remove_target("a-node")
        debian_restart(instance, conf_dir)
        live = tgt_targets(instance)
        assert sorted(live) == sorted(drv.iqn(n) for n in names[1:])
        # tgt-admin numbered them again from 1 in glob order, so the trap is set:
        # c-node now has the tid that b-node's conf file remembers.
        assert [live[drv.iqn(n)] for n in names[1:]] == [1, 2, 3]
        assert live[drv.iqn("c-node")] == before["b-node"]
        assert conf_tid(drv, "b-node") == before["b-node"]        # nothing has re-read the tids yet

        drv.remove_target("b-node")
        live = tgt_targets(instance)
        assert drv.iqn("b-node") not in live
        assert drv.iqn("c-node") in live and drv.iqn("d-node") in live
        c = drv.live_target("c-node")
        assert c is not None and c.backing_stores == {1: files["c-node"][0]}
        assert iscsi_rw.read_lun(instance.url(drv.iqn("c-node")), None, None, 0, 8) == files["c-node"][1]
        assert not os.path.exists(drv.conf_path("b-node"))

        assert not drv.target_exists("a-node") and not drv.target_exists("b-node")
        assert conf_tid(drv, "c-node") == before["c-node"]
        assert drv.target_exists("c-node")
        assert conf_tid(drv, "c-node") == live[drv.iqn("c-node")]   # exists re-synced its tid line
        assert conf_tid(drv, "d-node") == before["d-node"] != live[drv.iqn("d-node")]
        assert drv.restore() == 0                                  # nothing lost ...
        assert conf_tid(drv, "d-node") == live[drv.iqn("d-node")]   # ... but every tid re-read
        assert drv.restore() == 0 and tgt_targets(instance) == live
        assert drv.live_targets() == ["c-node", "d-node"]

        # a new target after the restart gets a tid no live target has
        e_path, e_data = random_file(tmp_path, MiB, fill=4096)
        drv.add_target("e-node", Backing("rdwr", e_path), ["ALL"])
        live = tgt_targets(instance)
        assert len(set(live.values())) == len(live) == 3
        assert iscsi_rw.read_lun(instance.url(drv.iqn("e-node")), None, None, 0, 8) == e_data
        for name in ("c-node", "d-node", "e-node"):
            drv.remove_target(name)
        assert tgt_targets(instance) == {} and drv.list_targets() == []
    finally:
        stop_tgtd(instance)


def test_stale_tid_after_restart_without_reload(tmp_path: Path) -> None:
    """tgtd restarted with other targets first (another tool's): the remembered tid names a
    foreign target, which must be neither reported as ours nor deleted."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        path, _ = random_file(tmp_path, MiB, fill=512)
        drv.add_target("mine", Backing("rdwr", path), ["ALL"])
        tid = conf_tid(drv, "mine")
        (tmp_path / "empty.d").mkdir()
        debian_restart(instance, str(tmp_path / "empty.d"))        # our target is gone ...
        foreign = TgtTarget(str(tmp_path / "foreign.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        f_path, f_data = random_file(tmp_path, MiB, fill=4096)
        foreign.add_target("theirs", Backing("rdwr", f_path), ["ALL"])
        foreign_tid = tgt_targets(instance)[foreign.iqn("theirs")]
        if foreign_tid != tid:                                     # ... and its tid is someone else's
            subprocess.run(["tgtadm", "-C", str(instance.control_port), "--lld", "iscsi", "--op", "delete",
                            "--mode", "target", "--tid", str(foreign_tid)], check=True)
            subprocess.run(["tgtadm", "-C", str(instance.control_port), "--lld", "iscsi", "--op", "new",
                            "--mode", "target", "--tid", str(tid), "-T", PREFIX + "theirs-too"], check=True)
        victim = PREFIX + ("theirs" if foreign_tid == tid else "theirs-too")
        assert tgt_targets(instance)[victim] == tid
        assert not drv.target_exists("mine")
        drv.remove_target("mine")                                  # drops the stale conf file only
        assert not os.path.exists(drv.conf_path("mine"))
        assert tgt_targets(instance)[victim] == tid
        assert iscsi_rw.read_lun(instance.url(foreign.iqn("theirs")), None, None, 0, 8) == f_data
        with pytest.raises(TargetNotFound):
            drv.remove_target("mine")
    finally:
        stop_tgtd(instance)


def test_add_refuses_a_live_iqn_without_touching_it(tmp_path: Path) -> None:
    """A target with our IQN but no conf file (e.g. loaded by tgt-admin from a copy): TargetExists,
    and the live target keeps its tid, backing store and ACL."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        path, data = random_file(tmp_path, MiB, fill=4096)
        drv.add_target("dup", Backing("rdwr", path), initiator_names=[GOOD_INITIATOR])
        before = drv.live_target("dup")
        os.unlink(drv.conf_path("dup"))
        for tid_counter in ("0", str(before.tid - 1)):             # a fresh tid, and the live target's own tid
            Path(drv.conf_dir, ".tid").write_text(tid_counter)
            with pytest.raises(TargetExists):
                drv.add_target("dup", Backing("rdwr", random_file(tmp_path, MiB, fill=0)[0]), ["ALL"])
            assert drv.live_target("dup") == before and not os.path.exists(drv.conf_path("dup"))
        url = instance.url(drv.iqn("dup"))
        assert iscsi_rw.read_lun(url, None, None, 0, 8, initiator=GOOD_INITIATOR) == data
        with pytest.raises(iscsi_rw.IscsiIOError):
            iscsi_rw.read_lun(url, None, None, 0, 8, initiator=BAD_INITIATOR)
    finally:
        stop_tgtd(instance)


def test_conf_dir_reloaded_by_tgt_admin_is_still_bmis(tmp_path: Path) -> None:
    """Debian's tgt.service start (`tgt-admin -e -c targets.conf` with `include <conf_dir>/*.conf`)
    rebuilds BMI's targets as BMI made them: IQNs, backing stores, ACLs; names-only targets
    still refuse other initiators; the driver still finds and removes them by IQN."""
    run_dir = tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path)
    conf_dir = str(tmp_path / "conf.d")
    instance = start_tgtd(run_dir)
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        files = {n: random_file(tmp_path, 2 * MiB, fill=4096) for n in ("names", "addr", "open", "refused")}
        drv.add_target("names", Backing("rdwr", files["names"][0]), initiator_names=[GOOD_INITIATOR])
        drv.add_target("addr", Backing("rdwr", files["addr"][0]), ["127.0.0.1"], [GOOD_INITIATOR])
        drv.add_target("open", Backing("rdwr", files["open"][0]), ["ALL"])
        drv.add_target("refused", Backing("rdwr", files["refused"][0]), ["10.9.9.0/24"])
        made = drv._show_all()
        assert made[drv.iqn("names")].acl == [NO_ADDRESS, GOOD_INITIATOR]

        # drop every target behind BMI's back, then load the conf dir the way tgt.service does
        port = str(instance.control_port)
        proc = subprocess.run(["tgt-admin", "-C", port, "--update", "ALL", "-c", "/dev/null", "-f"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and drv._show_all() == {}, proc.stdout + proc.stderr
        targets_conf = tmp_path / "targets.conf"
        targets_conf.write_text(f"include {conf_dir}/*.conf\n")
        proc = subprocess.run(["tgt-admin", "-C", port, "-e", "-c", str(targets_conf)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        reloaded = drv._show_all()
        assert sorted(reloaded) == sorted(made)
        for iqn, target in made.items():
            assert reloaded[iqn].backing_stores == target.backing_stores
            assert reloaded[iqn].acl == target.acl
        assert reloaded[drv.iqn("names")].backing_stores == {1: files["names"][0]}

        names_url = instance.url(drv.iqn("names"))
        assert iscsi_rw.read_lun(names_url, None, None, 0, 8, initiator=GOOD_INITIATOR) == files["names"][1]
        with pytest.raises(iscsi_rw.IscsiIOError, match="login"):
            iscsi_rw.read_lun(names_url, None, None, 0, 8, initiator=BAD_INITIATOR)
        assert iscsi_rw.read_lun(instance.url(drv.iqn("addr")), None, None, 0, 8) == files["addr"][1]
        assert iscsi_rw.read_lun(instance.url(drv.iqn("open")), None, None, 0, 8,
                                 initiator=BAD_INITIATOR) == files["open"][1]
        with pytest.raises(iscsi_rw.IscsiIOError):
            iscsi_rw.read_lun(instance.url(drv.iqn("refused")), None, None, 0, 8)

        assert all(drv.target_exists(n) for n in files)
        assert drv.restore() == 0
        drv.remove_target("addr")
        assert sorted(tgt_targets(instance)) == sorted(drv.iqn(n) for n in ("names", "open", "refused"))
        assert iscsi_rw.read_lun(names_url, None, None, 0, 8, initiator=GOOD_INITIATOR) == files["names"][1]
        for name in ("names", "open", "refused"):
            drv.remove_target(name)
        assert tgt_targets(instance) == {} and drv.list_targets() == []
    finally:
        stop_tgtd(instance)

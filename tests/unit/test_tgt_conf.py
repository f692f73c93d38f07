"""tgt conf-file rendering/parsing and input validation of the tgt driver (no tgtd needed), and the
LUN parameters the conf file carries, checked on a real tgtd with a real Ceph rbd backing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from ims.common.errors import InvalidInput, IscsiError, TargetExists, TargetNotFound
from ims.common.process import execute
from ims.einstein.iscsi.tgt import (
    LUN_LBPPBE,
    LiveTarget,
    TargetSpec,
    TgtTarget,
    check_backing,
    check_initiators,
    parse_conf,
    parse_show,
    render_conf,
)
from ims.einstein.storage.base import Backing
from tests.support.ceph import CephCluster, ceph_cluster  # noqa: F401  (fixture)
from tests.support.tgt import start_tgtd, stop_tgtd

RBD = Backing("rbd", "bmi/5img12", "conf=/etc/ceph/ceph.conf;id=bmi")

EXPECTED_RBD = """# bmi: tid=7 lun=1
<target iqn.2017-10.org.moc.bmi:5img12>
    driver iscsi
    bs-type rbd
    backing-store bmi/5img12
    bsopts "'conf=/etc/ceph/ceph.conf;id=bmi'"
    write-cache off
    lbppbe 3
    initiator-address ALL
    initiator-name iqn.2017-10.org.moc.bmi.node:node-1
</target>
"""

EXPECTED_NAMES_ONLY = """# bmi: tid=9 lun=1
<target iqn.2017-10.org.moc.bmi:5img12>
    driver iscsi
    bs-type rbd
    backing-store bmi/5img12
    bsopts "'conf=/etc/ceph/ceph.conf;id=bmi'"
    write-cache off
    lbppbe 3
    # 0.0.0.0/32 matches no initiator: only the names below may log in
    initiator-address 0.0.0.0/32
    initiator-name iqn.2017-10.org.moc.bmi.node:node-1
</target>
"""

EXPECTED_FILE = """# bmi: tid=3 lun=2
<target 5img12>
    driver iscsi
    bs-type rdwr
    backing-store /var/lib/bmi/images/5img12
    write-cache off
    lbppbe 3
    initiator-address 10.0.0.0/24
    initiator-address 127.0.0.1
</target>
"""


def test_render_rbd_target_with_initiator_name() -> None:
    spec = TargetSpec(name="5img12", iqn="iqn.2017-10.org.moc.bmi:5img12", backing=RBD, lun=1,
                      initiators=["ALL"], initiator_names=["iqn.2017-10.org.moc.bmi.node:node-1"], tid=7)
    assert render_conf(spec) == EXPECTED_RBD


def test_render_names_only_keeps_tgt_admin_from_binding_all() -> None:
    spec = TargetSpec(name="5img12", iqn="iqn.2017-10.org.moc.bmi:5img12", backing=RBD, lun=1,
                      initiators=[], initiator_names=["iqn.2017-10.org.moc.bmi.node:node-1"], tid=9)
    assert render_conf(spec) == EXPECTED_NAMES_ONLY
    back = parse_conf(EXPECTED_NAMES_ONLY, "5img12")
    assert back.initiators == [] and back.initiator_names == ["iqn.2017-10.org.moc.bmi.node:node-1"]


def test_render_file_target() -> None:
    spec = TargetSpec(name="5img12", iqn="5img12", backing=Backing("rdwr", "/var/lib/bmi/images/5img12"), lun=2,
                      initiators=["10.0.0.0/24", "127.0.0.1"], tid=3)
    assert render_conf(spec) == EXPECTED_FILE


@pytest.mark.parametrize("text", [EXPECTED_RBD, EXPECTED_FILE, EXPECTED_NAMES_ONLY])
def test_parse_round_trip(text: str) -> None:
    spec = parse_conf(text, "5img12")
    assert render_conf(spec) == text


def test_parse_reads_fields() -> None:
    spec = parse_conf(EXPECTED_RBD, "5img12")
    assert spec.tid == 7 and spec.lun == 1
    assert spec.iqn == "iqn.2017-10.org.moc.bmi:5img12"
    assert spec.backing == RBD                      # the quotes are tgt-admin's, not part of the options
    assert spec.initiators == ["ALL"]
    assert spec.initiator_names == ["iqn.2017-10.org.moc.bmi.node:node-1"]


def test_parse_without_tid_line() -> None:
    text = EXPECTED_FILE.split("\n", 1)[1]
    spec = parse_conf(text, "5img12")
    assert spec.tid is None and spec.lun == 1


@pytest.mark.parametrize("text", ["", "<target x>\n</target>\n", "garbage\n"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_conf(text, "x")


@pytest.mark.parametrize("backing", [
    Backing("rbd; rm", "bmi/x"), Backing("rdwr", "/tmp/a b"), Backing("rdwr", "/tmp/x\n</target>"),
    Backing("rdwr", "/tmp/../etc/shadow"), Backing("rbd", "bmi/x", "conf=/e c;id=x"),
    Backing("rbd", "bmi/x", "conf=/etc/ceph.conf'\""), Backing("rdwr", "/tmp/x\n"), Backing("rdwr\n", "/tmp/x")])
def test_bad_backing_rejected(backing: Backing) -> None:
    with pytest.raises(InvalidInput):
        check_backing(backing)


def test_initiators() -> None:
    assert check_initiators(["ALL"], None) == (["ALL"], [])
    # tgtd ORs addresses and names: ALL is never added implicitly, or a names-only ACL would admit everyone
    assert check_initiators(None, ["iqn.2017-10.org.moc.bmi.node:n1"]) == ([], ["iqn.2017-10.org.moc.bmi.node:n1"])
    assert check_initiators(["10.1.0.0/16", "::1"], []) == (["10.1.0.0/16", "::1"], [])
    for bad_addr in (["10.0.0.300"], ["host name"], ["ALL\n"], ["10.0.0.1\n"]):
        with pytest.raises(InvalidInput):
            check_initiators(bad_addr, None)
    for bad_name in (["iqn.x"], ["iqn.2017-10.org:a b"], ["iqn.2017-10.org:a\n"]):
        with pytest.raises(InvalidInput):
            check_initiators(None, bad_name)
    with pytest.raises(InvalidInput):
        check_initiators(None, None)


def test_driver_validates_before_touching_anything(tmp_path: Path) -> None:
    # tgtadm that would fail loudly if it were ever run
    driver = TgtTarget(str(tmp_path), control_port=1, tgtadm="/nonexistent/tgtadm")
    for name in ("../x", "a b", "x\ny", ""):
        with pytest.raises(InvalidInput):
            driver.add_target(name, Backing("rdwr", "/tmp/x"), ["ALL"])
    with pytest.raises(InvalidInput):
        driver.add_target("ok", Backing("rdwr", "/tmp/x"), [])
    assert os.listdir(tmp_path) == []
    with pytest.raises(InvalidInput):
        TgtTarget(str(tmp_path), iqn_prefix="iqn.2017-10.org.moc bmi:")
    with pytest.raises(InvalidInput):
        TgtTarget(str(tmp_path), lun=0)


def test_iqn_and_list_targets(tmp_path: Path) -> None:
    driver = TgtTarget(str(tmp_path), iqn_prefix="iqn.2017-10.org.moc.bmi:")
    assert driver.iqn("5img1") == "iqn.2017-10.org.moc.bmi:5img1"
    (tmp_path / "b.conf").write_text(EXPECTED_FILE)
    (tmp_path / "a.conf").write_text(EXPECTED_FILE)
    (tmp_path / ".a.conf.x.tmp").write_text("")   # a leftover temp file is not a target
    (tmp_path / ".tid").write_text("4")
    assert driver.list_targets() == ["a", "b"]


def test_tid_counter_increments(tmp_path: Path) -> None:
    driver = TgtTarget(str(tmp_path))
    assert [driver._next_tid() for _ in range(3)] == [1, 2, 3]
    assert TgtTarget(str(tmp_path))._next_tid() == 4   # shared through the file, not the instance


def test_missing_binary_is_iscsi_error(tmp_path: Path) -> None:
    driver = TgtTarget(str(tmp_path), tgtadm="/nonexistent/tgtadm")
    with pytest.raises(IscsiError):
        driver.add_target("node1", Backing("rdwr", "/tmp/x"), ["ALL"])
    assert driver.list_targets() == []


def test_remove_unknown_without_daemon_lookup_fails_cleanly(tmp_path: Path) -> None:
    # No conf file -> fallback lookup via tgtadm; a missing tgtadm is an IscsiError, not a crash.
    driver = TgtTarget(str(tmp_path), tgtadm="/nonexistent/tgtadm")
    with pytest.raises((IscsiError, TargetNotFound)):
        driver.remove_target("node1")


# --- addressing by IQN ---------------------------------------------------------------------
SHOW = """Target 1: iqn.2017-10.org.moc.bmi:4242img3
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 1
            Initiator: iqn.2017-10.org.moc.bmi.node:cisco-02 alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Backing store type: null
            Backing store path: None
        LUN: 1
            Type: disk
            Backing store type: rbd
            Backing store path: bmi/4242img3
            Backing store flags:
    Account information:
    ACL information:
        0.0.0.0/32
        iqn.2017-10.org.moc.bmi.node:cisco-02
Target 2: iqn.2017-10.org.moc.bmi:4242img4
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
        ALL
"""


def test_parse_show() -> None:
    live = parse_show(SHOW)
    assert live == {
        "iqn.2017-10.org.moc.bmi:4242img3": LiveTarget(
            1, "iqn.2017-10.org.moc.bmi:4242img3", {1: "bmi/4242img3"},
            ["0.0.0.0/32", "iqn.2017-10.org.moc.bmi.node:cisco-02"]),
        "iqn.2017-10.org.moc.bmi:4242img4": LiveTarget(2, "iqn.2017-10.org.moc.bmi:4242img4", {}, ["ALL"]),
    }
    assert parse_show("") == {}
    # lazily parsed: each target's lines are read when it is looked up, and only its own lines
    img4 = "iqn.2017-10.org.moc.bmi:4242img4"
    assert live.get(img4) == LiveTarget(2, img4, {}, ["ALL"])
    assert "iqn.nope" not in live and live.get("iqn.nope") is None and len(live) == 2
    assert sorted(live) == ["iqn.2017-10.org.moc.bmi:4242img3", "iqn.2017-10.org.moc.bmi:4242img4"]
    # only column-0 "Target N: iqn" lines start a target; text before the first one is not a target's
    noisy = "Target 9 is not a head line\n    Target 8: iqn.indented\n" + SHOW.replace("bmi/4242img3", "bmi/x")
    assert sorted(parse_show(noisy)) == sorted(live)
    assert parse_show(noisy)["iqn.2017-10.org.moc.bmi:4242img3"].backing_stores == {1: "bmi/x"}


# A stand-in for tgtadm that keeps tgtd's state in a JSON file, so the driver's decisions can
# be checked at the exact moments a real tgtd cannot be made to renumber (between two calls).
FAKE_TGTADM = r'''#!{python}
import json, sys
STATE = {state!r}
st = json.load(open(STATE))
a = sys.argv[1:]
def arg(flag):
    return a[a.index(flag) + 1] if flag in a else None
op, mode = arg("--op"), arg("--mode")
targets = st["targets"]
def by_tid(tid):
    return next((i for i, t in targets.items() if t["tid"] == tid), None)
def fail(msg):
    json.dump(st, open(STATE, "w"))
    sys.stderr.write("tgtadm: " + msg + "\n"); sys.exit(22)
tid = int(arg("--tid")) if arg("--tid") else None
if op == "delete" and st.get("renumber_before_delete"):
    st["renumber_before_delete"] = False      # Debian's restart + tgt-admin -e, in glob order
    for n, iqn in enumerate(sorted(targets), 1):
        targets[iqn]["tid"] = n
st["calls"].append(" ".join(a))
if mode == "target" and op == "show":
    for iqn, t in sorted(targets.items(), key=lambda kv: kv[1]["tid"]):
        print(f"Target {{t['tid']}}: {{iqn}}\n    LUN information:")
        for lun, path in sorted(t["luns"].items()):
            print(f"        LUN: {{lun}}\n            Backing store path: {{path}}")
        print("    ACL information:")
        for entry in t["acl"]:
            print("        " + entry)
elif mode == "sys" and op == "show":
    print("System:\n    State: ready\n    debug: off")
elif mode == "target" and op == "new":
    if by_tid(tid) is not None or arg("-T") in targets:
        fail("this target already exists")
    targets[arg("-T")] = {{"tid": tid, "luns": {{}}, "acl": []}}
elif by_tid(tid) is None:
    fail("can't find the target")
elif mode == "target" and op == "delete":
    st["deleted"].append(by_tid(tid))
    del targets[by_tid(tid)]
elif mode == "logicalunit" and op == "new":
    targets[by_tid(tid)]["luns"][arg("--lun")] = arg("--backing-store")
elif mode == "target" and op == "bind":
    targets[by_tid(tid)]["acl"].append(arg("-I") or arg("-Q"))
json.dump(st, open(STATE, "w"))
'''


class FakeTgtd:
    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "tgtd.json"
        self.state.write_text(json.dumps({"targets": {}, "calls": [], "deleted": []}))
        self.tgtadm = tmp / "tgtadm"
        self.tgtadm.write_text(FAKE_TGTADM.format(python=sys.executable, state=str(self.state)))
        self.tgtadm.chmod(0o755)

    def load(self) -> dict:
        return json.loads(self.state.read_text())

    def update(self, **changes: object) -> None:
        st = self.load()
        st.update(changes)
        self.state.write_text(json.dumps(st))

    def tids(self) -> dict[str, int]:
        return {iqn: t["tid"] for iqn, t in self.load()["targets"].items()}


PFX = "iqn.2017-10.org.moc.bmi:"


@pytest.fixture()
def fake(tmp_path: Path) -> tuple[FakeTgtd, TgtTarget]:
    tgtd = FakeTgtd(tmp_path)
    driver = TgtTarget(str(tmp_path / "conf.d"), iqn_prefix=PFX, tgtadm=str(tgtd.tgtadm))
    for name in ("a", "b", "c"):
        driver.add_target(name, Backing("rdwr", f"/srv/{name}.img"), ["ALL"])
    assert tgtd.tids() == {PFX + "a": 1, PFX + "b": 2, PFX + "c": 3}
    return tgtd, driver


def renumber(tgtd: FakeTgtd) -> None:
    st = tgtd.load()
    for n, iqn in enumerate(sorted(st["targets"]), 1):
        st["targets"][iqn]["tid"] = n
    tgtd.state.write_text(json.dumps(st))


def test_stale_tid_is_never_deleted(fake: tuple[FakeTgtd, TgtTarget]) -> None:
    tgtd, driver = fake
    driver.remove_target("a")
    renumber(tgtd)                                         # b=1, c=2: b's conf file still says 2
    assert tgtd.tids() == {PFX + "b": 1, PFX + "c": 2}
    assert driver.target_exists("c")
    assert parse_conf(Path(driver.conf_path("c")).read_text(), "c").tid == 2   # re-synced
    driver.remove_target("b")
    assert tgtd.load()["deleted"] == [PFX + "a", PFX + "b"]
    assert tgtd.tids() == {PFX + "c": 2}
    assert not driver.target_exists("b") and not driver.target_exists("a")


def test_exists_is_false_when_the_remembered_tid_is_anothers(fake: tuple[FakeTgtd, TgtTarget]) -> None:
    tgtd, driver = fake
    st = tgtd.load()
    del st["targets"][PFX + "b"]
    st["targets"][PFX + "x"] = {"tid": 2, "luns": {"1": "/srv/x.img"}, "acl": ["ALL"]}
    tgtd.state.write_text(json.dumps(st))
    assert not driver.target_exists("b")                   # tid 2 is alive, but it is x's
    assert driver.live_targets() == ["a", "c"]
    driver.remove_target("b")                              # drops b's stale conf file only
    assert tgtd.load()["deleted"] == [] and PFX + "x" in tgtd.tids()
    assert not os.path.exists(driver.conf_path("b"))


def test_renumbered_between_show_and_delete(fake: tuple[FakeTgtd, TgtTarget]) -> None:
    """The documented window: the delete hits the neighbour; the check after it notices,
    the neighbour comes back from its conf file, and ours is deleted by its new tid."""
    tgtd, driver = fake
    driver.remove_target("a")
    tgtd.update(renumber_before_delete=True)
    driver.remove_target("b")
    st = tgtd.load()
    assert st["deleted"] == [PFX + "a", PFX + "c", PFX + "b"]   # c was hit in the window ...
    assert list(st["targets"]) == [PFX + "c"]                     # ... and re-created
    assert st["targets"][PFX + "c"]["luns"] == {"1": "/srv/c.img"} and st["targets"][PFX + "c"]["acl"] == ["ALL"]
    assert driver.target_exists("c") and driver.list_targets() == ["c"]


def test_add_of_a_live_iqn_touches_nothing(fake: tuple[FakeTgtd, TgtTarget]) -> None:
    tgtd, driver = fake
    os.unlink(driver.conf_path("b"))
    before = tgtd.load()
    for counter in ("0", "1"):                             # a free tid first, then b's own tid
        Path(driver.conf_dir, ".tid").write_text(counter)
        with pytest.raises(TargetExists):
            driver.add_target("b", Backing("rdwr", "/srv/other.img"), ["ALL"])
    st = tgtd.load()
    assert st["targets"] == before["targets"] and st["deleted"] == []
    # only "new target" attempts and shows were sent: no LUN, bind or delete
    assert {" ".join(c.split()[2:6]) for c in st["calls"][len(before["calls"]):]} == {
        "--op new --mode target", "--op show --mode target", "--op show --mode sys"}


def test_restore_resyncs_then_recreates(fake: tuple[FakeTgtd, TgtTarget]) -> None:
    tgtd, driver = fake
    st = tgtd.load()
    del st["targets"][PFX + "a"]
    tgtd.state.write_text(json.dumps(st))
    renumber(tgtd)                                         # b=1, c=2; a lost
    assert driver.restore() == 1
    tids = tgtd.tids()
    assert set(tids) == {PFX + "a", PFX + "b", PFX + "c"} and len(set(tids.values())) == 3
    for name in ("a", "b", "c"):
        assert parse_conf(Path(driver.conf_path(name)).read_text(), name).tid == tids[PFX + name]
    assert driver.restore() == 0 and tgtd.tids() == tids


def _lbppbe(url: str) -> int:
    out, _ = execute("iscsi-readcapacity16", url, timeout=30)
    match = re.search(r"LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:\s*(\d+)", out)
    assert match, out
    return int(match.group(1))


def test_rbd_lun_reports_disk_physical_blocks_live_and_after_reload(
        ceph_cluster: CephCluster, tmp_path: Path) -> None:  # noqa: F811
    """Real Ceph + tgtd: an rbd LUN reports 4 KiB physical blocks, not the 4 MiB object size, both as BMI
    makes it and when its conf file is loaded by tgt-admin (what restore and Debian's tgt.service do)."""
    storage = ceph_cluster.storage()
    image = f"lbppbe-{uuid.uuid4().hex[:8]}"
    storage.create_image(image, 8 * 1024 * 1024)
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    try:
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port,
                        iqn_prefix="iqn.2026-01.org.bmi.lbppbe")
        drv.add_target(image, storage.backing(image), ["127.0.0.1"])
        url = instance.url(drv.iqn(image))
        assert _lbppbe(url) == LUN_LBPPBE == 3
        conf_copy = tmp_path / "targets.conf"
        conf_copy.write_text(Path(drv.conf_path(image)).read_text())
        assert f"    lbppbe {LUN_LBPPBE}\n" in conf_copy.read_text()
        drv.remove_target(image)
        proc = subprocess.run(["tgt-admin", "-C", str(instance.control_port), "-c", str(conf_copy), "--execute"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _lbppbe(url) == LUN_LBPPBE
        # Without the parameter tgt's rbd backing reports the object size: what this fixes is real.
        subprocess.run(["tgt-admin", "-C", str(instance.control_port), "--delete", "ALL", "-f"],
                       capture_output=True, timeout=60, check=True)
        conf_copy.write_text(conf_copy.read_text().replace(f"    lbppbe {LUN_LBPPBE}\n", ""))
        subprocess.run(["tgt-admin", "-C", str(instance.control_port), "-c", str(conf_copy), "--execute"],
                       capture_output=True, timeout=60, check=True)
        assert _lbppbe(url) == 13   # 2**13 sectors = 4 MiB
    finally:
        stop_tgtd(instance)
        storage.remove_image(image)

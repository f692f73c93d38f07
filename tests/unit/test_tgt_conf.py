"""tgt conf-file rendering/parsing and input validation of the tgt driver (no tgtd needed)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ims.common.errors import InvalidInput, IscsiError, TargetNotFound
from ims.einstein.iscsi.tgt import TargetSpec, TgtTarget, check_backing, check_initiators, parse_conf, render_conf
from ims.einstein.storage.base import Backing

RBD = Backing("rbd", "bmi/5img12", "conf=/etc/ceph/ceph.conf;id=bmi")

EXPECTED_RBD = """# bmi: tid=7 lun=1
<target iqn.2017-10.org.moc.bmi:5img12>
    driver iscsi
    bs-type rbd
    backing-store bmi/5img12
    bsopts "'conf=/etc/ceph/ceph.conf;id=bmi'"
    write-cache off
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

"""add_target makes its target by tid (``--op new``), then adds the LUN and the ACL by that tid.  A
tgt restart (Debian's tgt.service renumbers the targets from the conf files) or a ``tgt-admin -e`` by
hand between those calls puts a NEIGHBOUR's target at our tid: our node's initiator must never be
bound to it (it would read the neighbour's disk), and our LUN must never land on it.  Real tgtd,
real tgt-admin, real iSCSI logins through libiscsi.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.base import Backing
from tests.support import iscsi_rw
from tests.support.tgt import TgtdInstance, debian_restart, lun_file, start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PREFIX = "iqn.2026-01.org.bmi.test:"
C_ADDRESS = "10.9.9.9"  # c-node's address ACL entry (bound, never connects): the first bind by tid
INIT = {name: f"iqn.2026-01.org.bmi.test.node:{name}" for name in ("x-node", "a-node", "b-node", "c-node")}


def can_read(instance: TgtdInstance, iqn: str, initiator: str) -> bytes | None:
    """The first 4 KiB of LUN 1 of ``iqn`` as ``initiator``, None if tgtd refuses the login."""
    try:
        return iscsi_rw.read_lun(instance.url(iqn), None, None, 0, 8, initiator=initiator)
    except iscsi_rw.IscsiIOError:
        return None


def three_neighbours_and_a_free_tid(tmp_path: Path, drv: TgtTarget) -> dict[str, tuple[str, bytes]]:
    """x-node, a-node, b-node at tids 1, 2, 3 (each open to its own initiator name only); a-node removed,
    and the tid counter wrapped so the next add takes tid 2 (as after MAX_TID, or a counter file reset)."""
    files = {}
    for byte, name in enumerate(("x-node", "a-node", "b-node"), start=0x41):
        files[name] = lun_file(tmp_path, name, byte)
        drv.add_target(name, Backing("rdwr", files[name][0]), initiator_names=[INIT[name]])
    assert {n: drv.live_target(n).tid for n in files} == {"x-node": 1, "a-node": 2, "b-node": 3}
    drv.remove_target("a-node")
    Path(drv.conf_dir, ".tid").write_text("1")
    files["c-node"] = lun_file(tmp_path, "c-node", 0x43)
    return files


def before_first_bind(drv: TgtTarget, monkeypatch, action) -> list[dict[str, int]]:  # type: ignore[no-untyped-def]
    """Run ``action`` once, right before add_target's first ``bind`` by tid; returns [iqn -> tid after it]."""
    real_run = drv._run
    seen: list[dict[str, int]] = []

    def run(*args: str, **kw):  # type: ignore[no-untyped-def]
        if not seen and args[:4] == ("--op", "bind", "--mode", "target"):
            action()
            seen.append({t.iqn: t.tid for t in drv._show_all().values()})
        return real_run(*args, **kw)

    monkeypatch.setattr(drv, "_run", run)
    return seen


def assert_isolated(instance: TgtdInstance, drv: TgtTarget, files: dict[str, tuple[str, bytes]],
                    neighbours: tuple[str, ...]) -> None:
    c = drv.live_target("c-node")
    assert c is not None and c.backing_stores == {1: files["c-node"][0]} and {INIT["c-node"], C_ADDRESS} <= set(c.acl)
    assert can_read(instance, drv.iqn("c-node"), INIT["c-node"]) == files["c-node"][1]
    for name in neighbours:
        live = drv.live_target(name)
        assert live is not None, name
        assert INIT["c-node"] not in live.acl and C_ADDRESS not in live.acl, (name, live.acl)
        assert files["c-node"][0] not in live.backing_stores.values(), (name, live.backing_stores)
        assert can_read(instance, drv.iqn(name), INIT["c-node"]) is None, f"c-node's initiator reads {name}"
        if name in files:
            assert can_read(instance, drv.iqn(name), INIT[name]) == files[name][1], name


def test_restart_between_new_and_binds_never_binds_our_node_to_the_neighbour(tmp_path: Path, monkeypatch) -> None:
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    conf_dir = str(tmp_path / "conf.d")
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        files = three_neighbours_and_a_free_tid(tmp_path, drv)
        # The restart comes after our `new` (tid 2) and LUN: glob order renumbers b-node=1, x-node=2.
        seen = before_first_bind(drv, monkeypatch, lambda: debian_restart(instance, conf_dir))
        drv.add_target("c-node", Backing("rdwr", files["c-node"][0]), [C_ADDRESS], [INIT["c-node"]])
        monkeypatch.undo()

        assert seen and seen[0][drv.iqn("x-node")] == 2 and drv.iqn("c-node") not in seen[0], \
            f"the trap was not set: {seen}"
        assert_isolated(instance, drv, files, ("x-node", "b-node"))
        assert sorted(drv.list_targets()) == ["b-node", "c-node", "x-node"]
        assert drv.live_target("c-node").tid == drv._read_spec("c-node").tid  # its conf file tells the truth
    finally:
        stop_tgtd(instance)


def test_tgt_admin_by_hand_reusing_our_tid_is_scrubbed(tmp_path: Path, monkeypatch) -> None:
    """Same daemon (no restart the socket could show): someone's tgt-admin deletes our half-made target
    and puts a target of its own (no conf file of ours) at our tid; our binds reach it.  The show that
    confirms the add finds ours missing, takes our initiator back from that target, and makes ours again."""
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    conf_dir = str(tmp_path / "conf.d")
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        files = three_neighbours_and_a_free_tid(tmp_path, drv)
        foreign, foreign_data = lun_file(tmp_path, "foreign", 0x46)
        foreign_iqn = "iqn.2026-01.org.other:foreign"
        ctl = ["tgtadm", "-C", str(instance.control_port), "--lld", "iscsi"]

        def hand_made() -> None:
            for argv in (["--op", "delete", "--mode", "target", "--tid", "2", "--force"],
                         ["--op", "new", "--mode", "target", "--tid", "2", "-T", foreign_iqn],
                         ["--op", "new", "--mode", "logicalunit", "--tid", "2", "--lun", "1", "-b", foreign],
                         ["--op", "bind", "--mode", "target", "--tid", "2", "-Q", "iqn.2026-01.org.other:init"]):
                subprocess.run([*ctl, *argv], check=True, capture_output=True, timeout=30)

        seen = before_first_bind(drv, monkeypatch, hand_made)
        drv.add_target("c-node", Backing("rdwr", files["c-node"][0]), [C_ADDRESS], [INIT["c-node"]])
        monkeypatch.undo()

        assert seen and seen[0].get(foreign_iqn) == 2, f"the trap was not set: {seen}"
        assert_isolated(instance, drv, files, ("x-node", "b-node"))
        other = drv._show_all()[foreign_iqn]
        assert other.tid == 2 and other.backing_stores == {1: foreign}, other
        assert INIT["c-node"] not in other.acl and C_ADDRESS not in other.acl, other.acl
        assert "iqn.2026-01.org.other:init" in other.acl, other.acl
        assert can_read(instance, foreign_iqn, INIT["c-node"]) is None
        assert can_read(instance, foreign_iqn, "iqn.2026-01.org.other:init") == foreign_data
    finally:
        stop_tgtd(instance)

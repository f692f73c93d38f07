"""How many tgtadm calls (a fork+exec each) an add and a remove cost, on a real tgtd: the counts
docs/performance.md and ims/einstein/iscsi/tgt.py state, so a call that creeps back is noticed."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.base import Backing
from tests.support.tgt import start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PREFIX = "iqn.2026-01.org.bmi.test:"
INITIATOR = "iqn.2026-01.org.bmi.test.node:node-1"


def test_add_and_remove_tgtadm_calls(tmp_path: Path, monkeypatch) -> None:
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    try:
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        neighbour = tmp_path / "n.img"
        neighbour.write_bytes(b"\0" * (1 << 20))
        drv.add_target("neighbour", Backing("rdwr", str(neighbour)), ["ALL"])
        lun = tmp_path / "x.img"
        lun.write_bytes(b"\0" * (1 << 20))

        calls: list[tuple[str, ...]] = []
        real_run = drv._run

        def counting(*args: str, **kwargs: bool) -> str | None:
            calls.append(args[:4])
            return real_run(*args, **kwargs)

        monkeypatch.setattr(drv, "_run", counting)
        drv.add_target("x", Backing("rdwr", str(lun)), initiator_names=[INITIATOR])
        ready = ("--op", "show", "--mode", "sys")
        show = ("--op", "show", "--mode", "target")
        # ready, new, LUN, LUN update, bind address, bind name, ready, ONE confirming show
        assert calls == [ready, ("--op", "new", "--mode", "target"),
                                          ("--op", "new", "--mode", "logicalunit"),
                                          ("--op", "update", "--mode", "logicalunit"),
                                          ("--op", "bind", "--mode", "target"), ("--op", "bind", "--mode", "target"),
                                          ready, show]
        calls.clear()
        drv.remove_target("x")
        # ready, show, delete, ready, ONE confirming show
        assert calls == [ready, show, ("--op", "delete", "--mode", "target"), ready, show]
        live = drv._show_all()
        assert drv.iqn("x") not in live and drv.iqn("neighbour") in live
    finally:
        stop_tgtd(instance)

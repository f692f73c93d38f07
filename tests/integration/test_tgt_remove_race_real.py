"""remove_target trusts tgtadm's exit status for its delete and confirms with ONE show once tgtd is
ready; that show must still catch a Debian-style tgt restart that renumbered the tids between the
remove's show and its delete (so the delete hit a NEIGHBOUR's tid), on a real tgtd.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ims.einstein.iscsi.tgt import TgtTarget
from ims.einstein.storage.base import Backing
from tests.support import iscsi_rw
from tests.support.tgt import debian_restart, lun_file, start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PREFIX = "iqn.2026-01.org.bmi.test:"


def test_remove_renumbered_between_show_and_delete_restores_the_neighbour(tmp_path: Path, monkeypatch) -> None:
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    conf_dir = str(tmp_path / "conf.d")
    try:
        drv = TgtTarget(conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)
        files = {}
        for byte, name in enumerate(("x-node", "a-node", "b-node"), start=0x41):  # tids 1, 2, 3
            files[name] = lun_file(tmp_path, name, byte)
            drv.add_target(name, Backing("rdwr", files[name][0]), ["ALL"])
        before = {n: drv.live_target(n).tid for n in files}
        assert before == {"x-node": 1, "a-node": 2, "b-node": 3}

        real_show = drv._show_all
        restarted: list[dict] = []

        def show_then_restart():  # type: ignore[no-untyped-def]
            live = real_show()
            if not restarted:
                # The restart comes right after remove's show: glob order renumbers a=1, b=2, x=3,
                # so the tid the show gave for a-node (2) is b-node's when the delete runs.
                debian_restart(instance, conf_dir)
                restarted.append({t.iqn: t.tid for t in real_show().values()})
            return live

        monkeypatch.setattr(drv, "_show_all", show_then_restart)
        drv.remove_target("a-node")
        monkeypatch.undo()

        assert restarted and restarted[0][drv.iqn("b-node")] == before["a-node"], "the trap was not set"
        live = drv._show_all()
        assert drv.iqn("a-node") not in live
        assert not Path(drv.conf_path("a-node")).exists()
        for name in ("x-node", "b-node"):  # the neighbour whose tid was deleted is back, with its data
            target = drv.live_target(name)
            assert target is not None and target.backing_stores == {1: files[name][0]}
            assert iscsi_rw.read_lun(instance.url(drv.iqn(name)), None, None, 0, 8) == files[name][1]
        assert drv.list_targets() == ["b-node", "x-node"]
    finally:
        stop_tgtd(instance)

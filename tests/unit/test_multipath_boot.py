"""``[iscsi] multipath_boot``: the second URI of a node's iPXE script is the host a take-over would pick.

Real SQLite host registry (ims/einstein/hosts.py), real templates (ims/templates/ipxe.temp).
"""
from __future__ import annotations

import bisect
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from ims.common import config
from ims.common.errors import InvalidInput
from ims.database import make_engine, make_session_factory
from ims.database.models import Host
from ims.einstein import hosts as hosts_module
from ims.einstein.boot import BootFiles
from ims.einstein.hosts import HashRing, Hosts

IQN = "iqn.2017-10.org.moc.bmi:t42"
KEYS = [f"node{i}" for i in range(300)]


def cfg_for(tmp: Path, name: str, ip: str, on: bool) -> config.BMIConfig:
    return config.parse("test.cfg", f"[bmi]\nuid = t\n[db]\npath = {tmp}/bmi.db\n[net_isolator]\nurl = http://x\n"
                                    f"[iscsi]\nip = {ip}\nport = 3261\nmultipath_boot = {str(on).lower()}\n"
                                    f"[host]\nname = {name}\n")


def registry(tmp: Path, name: str, ip: str, on: bool = True) -> tuple[config.BMIConfig, Hosts]:
    cfg = cfg_for(tmp, name, ip, on)
    engine = make_engine(cfg.db_url)
    hosts = Hosts(cfg, make_session_factory(engine), engine)
    hosts.register()
    return cfg, hosts


def walk_successor(ring: HashRing, key: str, primary: str) -> str | None:
    """Independently: the first host after ``primary`` on ``key``'s clockwise walk of the ring's points."""
    start = bisect.bisect(ring._keys, ring._hash(key))
    for step in range(len(ring._keys)):
        owner = ring._owners[(start + step) % len(ring._keys)]
        if owner != primary:
            return owner
    return None


@pytest.mark.parametrize("live", [["a", "b"], ["a", "b", "c"], ["h1", "h2", "h3", "h4", "h5"]])
def test_secondary_is_where_the_take_over_moves_the_node(live: list[str]) -> None:
    ring = HashRing(live)
    for key in KEYS:
        primary = ring.get(key)
        # what HostAgent.elect builds when ``primary`` died: the ring over the live hosts but it
        takeover = HashRing([h for h in live if h != primary]).get(key)
        assert takeover == walk_successor(ring, key, primary), key
        assert takeover != primary


def test_hosts_secondary_for_follows_liveness(tmp_path: Path) -> None:
    _, h1 = registry(tmp_path, "h1", "127.0.0.1")
    registry(tmp_path, "h2", "127.0.0.2")
    registry(tmp_path, "h3", "127.0.0.3")
    ring = HashRing(["h1", "h2", "h3"])
    for key in KEYS[:50]:
        primary = ring.get(key)
        assert h1.secondary_for(key, primary, fresh=True) == HashRing(
            [h for h in ("h1", "h2", "h3") if h != primary]).get(key)
    with h1.session() as s:  # h3 stops heart-beating: never named as a secondary
        s.execute(update(Host).where(Host.name == "h3").values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=60)))
    assert {h1.secondary_for(k, "h1", fresh=True) for k in KEYS} == {"h2"}
    with h1.session() as s:
        s.execute(update(Host).where(Host.name == "h2").values(state="dead"))
    assert h1.secondary_for("node1", "h1", fresh=True) is None  # alone


def test_secondary_portal_is_opt_in_and_names_the_next_hosts_portal(tmp_path: Path) -> None:
    saved = hosts_module._CURRENT.get("hosts")
    try:
        cfg1, h1 = registry(tmp_path, "h1", "127.0.0.1")
        registry(tmp_path, "h2", "127.0.0.2")
        hosts_module._CURRENT["hosts"] = h1
        assert hosts_module.secondary_portal(cfg1, "node7") == "127.0.0.2:3261"
        off = cfg_for(tmp_path, "h1", "127.0.0.1", on=False)
        assert hosts_module.secondary_portal(off, "node7") is None  # the default: today's one URI
        hosts_module._CURRENT.pop("hosts")
        assert hosts_module.secondary_portal(cfg1, "node7") is None  # no registry in this process
        hosts_module._CURRENT["hosts"] = h1
        _, h2 = registry(tmp_path, "h2", "127.0.0.1")  # h2 now shares h1's portal: no second path
        assert hosts_module.secondary_portal(cfg1, "node7") is None
    finally:
        if saved is None:
            hosts_module._CURRENT.pop("hosts", None)
        else:
            hosts_module._CURRENT["hosts"] = saved


def files(tmp_path: Path, lun: int = 1) -> BootFiles:
    (tmp_path / "pxelinux.cfg").mkdir(exist_ok=True)
    return BootFiles(str(tmp_path / "pxelinux.cfg"), str(tmp_path), "10.0.0.1", iscsi_port=3261, lun=lun)


def test_render_two_uris_primary_first(tmp_path: Path) -> None:
    boot = files(tmp_path)
    one = boot.render_ipxe(IQN, "iqn.x:n", ("u", "s3cretsecret"))
    two = boot.render_ipxe(IQN, "iqn.x:n", ("u", "s3cretsecret"), secondary="10.0.0.2:3262")
    assert f"      sanboot --keep iscsi:10.0.0.1:tcp:3261:1:{IQN}\n" in one
    assert one.replace(f"3261:1:{IQN}\n", f"3261:1:{IQN} iscsi:10.0.0.2:tcp:3262:1:{IQN}\n") == two
    paths = boot.write("n1", "aa:bb:cc:dd:ee:01", "img", IQN, secondary="10.0.0.2:3262")
    assert Path(paths[0]).read_text() == Path(paths[1]).read_text() == boot.render_ipxe(IQN, secondary="10.0.0.2:3262")


def test_render_refuses_a_bad_or_same_secondary_and_writes_nothing(tmp_path: Path) -> None:
    boot = files(tmp_path)
    for bad in ("10.0.0.1:3261", "10.0.0.2\nshell", "10.0.0.2:0"):
        with pytest.raises(InvalidInput):
            boot.write("n1", "aa:bb:cc:dd:ee:01", "img", IQN, secondary=bad)
    assert not list(tmp_path.glob("*.ipxe")) and not list((tmp_path / "pxelinux.cfg").iterdir())


def test_single_uri_script_is_byte_identical_to_the_previous_template(tmp_path: Path) -> None:
    boot = files(tmp_path, lun=2)
    expected = ("#!ipxe\n      set keep-san 1\n      isset ${net0/ip} || ifconf --configurator=dhcp net0\n"
                f"      set initiator-iqn iqn.x:n\n      sanboot --keep iscsi:10.0.0.1:tcp:3261:2:{IQN}\n      boot\n")
    assert boot.render_ipxe(IQN, "iqn.x:n") == expected


def test_lun_is_written_in_hexadecimal_as_ipxe_parses_it(tmp_path: Path) -> None:
    """iPXE reads an iscsi: URI's LUN as hex (scsi_parse_lun): LUN 10 is "a" in both URIs."""
    script = files(tmp_path, lun=10).render_ipxe(IQN, secondary="10.0.0.2")
    assert f"sanboot --keep iscsi:10.0.0.1:tcp:3261:a:{IQN} iscsi:10.0.0.2:tcp:3260:a:{IQN}\n" in script

"""``[iscsi] multipath_boot = true`` on three REAL hosts (tests/support/multihost.py: own tgtd each, one
Ceph, one SQLite file, one TFTP directory, the HIL simulator).

A provisioned node's iPXE script (the TFTP file and the HTTP ``boot_script`` answer) says
``sanboot --keep URI_gateway URI_secondary``: its gateway's portal first, then the portal of the host
the ring over the other live hosts picks.  That host is where the take-over really moves the node:
after its gateway is SIGKILLed (with its tgtd), each of its nodes is exported by exactly the host its
script named second, and the rewritten script names that survivor first and the last host second.
(The option off, one URI: tests/integration/test_hosts_real.py.)
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ims.database import make_engine, make_session_factory
from ims.database.models import Provision
from ims.einstein.hosts import HashRing
from tests.support.ceph import ceph_cluster  # noqa: F401 - fixture
from tests.support.multihost import NET, NIC, PROJECT, UID, Cluster, running_cluster, wait_for

USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
GOLDEN_NAME = "mpb-golden"
NODES = [f"mpbnode{i}" for i in range(9)]
HOSTS = ["host1", "host2", "host3"]
SIZE = 8 << 20
SANBOOT_RE = re.compile(r"^\s*sanboot --keep (.+)$", re.M)
URI_RE = re.compile(r"^iscsi:([0-9.]+):tcp:(\d+):1:(\S+)$")


@pytest.fixture()
def cluster(tmp_path: Path, ceph_cluster) -> Iterator[Cluster]:  # noqa: F811 - the fixture
    with running_cluster(tmp_path, ceph_cluster, 3, NODES, GOLDEN_NAME, SIZE, multipath_boot=True) as c:
        yield c


def provisions(sessions: Any) -> dict[str, tuple[str, str, str]]:
    """node -> (gateway host, target IQN, MAC)."""
    with sessions() as s:
        return {p.node: (p.gateway, f"iqn.2017-10.org.moc.bmi:{UID}img{p.image_id}", p.mac)
                for p in s.scalars(select(Provision))}


def portal(c: Cluster, host: str) -> str:
    tgtd = c.hosts[HOSTS.index(host)].tgtd
    assert tgtd is not None
    return f"{tgtd.portal_ip}:{tgtd.portal_port}"


def script_portals(text: str, iqn: str) -> list[str]:
    """The portals of the script's sanboot line, in order (each URI must name the node's IQN)."""
    lines = SANBOOT_RE.findall(text)
    assert len(lines) == 1, text
    found = []
    for uri in lines[0].split(" "):
        match = URI_RE.fullmatch(uri)
        assert match is not None and match.group(3) == iqn, uri
        found.append(f"{match.group(1)}:{match.group(2)}")
    return found


def test_script_names_gateway_then_take_over_host_and_follows_the_take_over(cluster: Cluster) -> None:
    c = cluster
    client = c.client(0)
    client.create_project(ADMIN, PROJECT, NET)
    client.import_image(USER, PROJECT, GOLDEN_NAME)
    for node in NODES:
        client.provision(USER, PROJECT, node, GOLDEN_NAME, NET, NIC)
    sessions = make_session_factory(make_engine(f"sqlite:///{c.db_path}"))
    placed = provisions(sessions)
    ring = HashRing(HOSTS)
    secondary: dict[str, str] = {}
    for node, (gateway, iqn, mac) in placed.items():
        assert gateway == ring.get(node)
        secondary[node] = HashRing([h for h in HOSTS if h != gateway]).get(node)
        text = (c.base / "tftp" / f"{node}.ipxe").read_text()
        assert script_portals(text, iqn) == [portal(c, gateway), portal(c, secondary[node])], node
        assert (c.base / "tftp" / "by-mac" / (mac.replace(":", "-") + ".ipxe")).read_text() == text
        assert client.boot_script(mac) == text  # the HTTP answer (routed to the gateway) is the same script
    # The victim: a host other than the one we call through that exports nodes whose secondaries differ.
    victim = max(("host2", "host3"), key=lambda h: sum(g == h for g, _i, _m in placed.values()))
    moved = sorted(n for n, (g, _i, _m) in placed.items() if g == victim)
    assert moved, placed
    survivors = [h for h in HOSTS if h != victim]

    c.kill(HOSTS.index(victim))

    def taken_over() -> bool:
        now = provisions(sessions)
        return all(now[n][0] != victim for n in moved) and all(
            now[n][1] in c.live_iqns(HOSTS.index(now[n][0])) for n in moved)

    wait_for(f"the take-over of {victim}'s nodes", taken_over)
    after = provisions(sessions)
    for node in moved:
        gateway, iqn, mac = after[node]
        assert gateway == secondary[node], node  # the take-over went where the script's second URI pointed
        (other,) = [h for h in survivors if h != gateway]
        expected = [portal(c, gateway), portal(c, other)]

        def rewritten(node: str = node, iqn: str = iqn, expected: list[str] = expected) -> bool:
            return script_portals((c.base / "tftp" / f"{node}.ipxe").read_text(), iqn) == expected

        wait_for(f"{node}'s script to name {gateway} first", rewritten, timeout=60)
        assert client.boot_script(mac) == (c.base / "tftp" / f"{node}.ipxe").read_text()
    for node in sorted(set(NODES) - set(moved)):  # the survivors' own nodes keep their gateway
        assert after[node][0] == placed[node][0], node

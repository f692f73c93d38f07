"""``scripts/bmi-stack restart einstein[-hostK] | tgtd[-hostK]`` on a ``--hosts 2`` stack.

Nodes are provisioned on both hosts (the ring places them); then host 2's Einstein and tgtd, and
host 1's (through the ``einstein`` and ``tgtd`` aliases), are restarted with ``bmi-stack restart``.
Each restart returns only once the daemon answers again, in its host's namespace, on the same
portal and control port.  Afterwards every node's target is live on the gateway recorded for it,
nothing was taken over (the same ``provision.gateway`` values, no ``host.taken_over_at``), each boot
script still names its gateway, and the guide's workflow (snap, dpro, pro) works through Picasso on
both hosts.  A tgtd that was SIGKILLed comes back the same way through ``restart tgtd-host2``.  A
restart of a service or host the stack does not have is refused and touches nothing; ``down``
leaves no namespace, veth, address or process.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

from ims.einstein.hosts import HashRing
from tests.integration.test_hosts_stack_real import assert_nothing_left, gateways, live, netns_inode
from tests.support.procs import alive
from tests.support.stack import STACK, Stack, running_stack

NODES = ["node-01", "node-02", "node-03", "node-04"]


def host_rows(stack: Stack) -> dict[str, tuple[int, str, object]]:
    """host -> (epoch, state, taken_over_at) from the stack's PostgreSQL."""
    url = urlparse(stack.env["BMI_DB_URL"])
    conn = psycopg2.connect(host=stack.env["BMI_PG_SOCKET_DIR"], port=url.port, user="postgres", dbname="bmi")
    try:
        with conn.cursor() as cur:
            cur.execute("select name, epoch, state, taken_over_at from host")
            return {n: (e, s, t) for n, e, s, t in cur.fetchall()}
    finally:
        conn.close()


def pid(path: Path) -> int:
    return int(path.read_text().strip())


def tgt_env(d: Path, tgt: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (d / tgt / "env").read_text().splitlines() if "=" in line)


def assert_targets_where_recorded(stack: Stack, placed: dict[str, tuple[str, str]]) -> None:
    d = stack.dir
    assert live(d, "tgt") == sorted(c for g, c in placed.values() if g == "host1")
    assert live(d, "tgt-host2") == sorted(c for g, c in placed.values() if g == "host2")
    for node, (gateway, _c) in placed.items():
        portal = tgt_env(d, "tgt" if gateway == "host1" else f"tgt-{gateway}")["TGT_PORTAL"]
        assert f"iscsi:{portal.rpartition(':')[0]}:" in (d / "tftp" / f"{node}.ipxe").read_text(), node


def restart(stack: Stack, service: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([STACK, "restart", service, "--dir", str(stack.dir)], capture_output=True, text=True,
                          timeout=300, check=False)
    if check:
        assert proc.returncode == 0, f"bmi-stack restart {service} failed: {proc.stderr[-3000:]}"
        assert "taken over" not in proc.stderr, proc.stderr
    return proc


def dpro(stack: Stack, node: str) -> None:
    """``bmi dpro``; the killed tgtd's Ceph watch may hold a clone for up to 30 s: 503, retried."""
    for _ in range(30):
        proc = stack.bmi("dpro", "bmi_infra", node, "bmi_network", "eth0", check=False)
        if proc.returncode == 0:
            assert proc.stdout.strip() == "Success"
            return
        if "not provisioned" in proc.stderr:  # an earlier try went through after all
            return
        time.sleep(3)
    pytest.fail(f"dpro {node}: {proc.stderr}")


def test_restart_of_each_hosts_einstein_and_tgtd_keeps_every_node_on_its_gateway() -> None:
    with running_stack(nodes=3 + len(NODES), hosts=2) as stack:  # bmi_node, cisco-01, cisco-02 + node-0N
        d = stack.dir
        made = [stack.env["BMI_NETNS"], stack.env["BMI_HOST1_NETNS"], stack.env["BMI_HOST2_NETNS"]]
        inodes = {netns_inode(n) for n in made}
        subnet = stack.env["BMI_SUBNET"].rsplit(".", 1)[0] + "."
        stack.rbd("create", "--size", "16", "restartgold")
        assert stack.bmi("import", "bmi_infra", "restartgold").stdout.strip() == "Success"
        for node in NODES:
            assert stack.bmi("pro", "bmi_infra", node, "restartgold", "bmi_network", "eth0").stdout.strip() == "Success"
        placed = gateways(stack)
        assert {g for g, _c in placed.values()} == {"host1", "host2"}, placed
        assert_targets_where_recorded(stack, placed)
        epochs = host_rows(stack)
        einstein2, tgtd1, tgtd2 = pid(d / "pids" / "einstein-host2.pid"), pid(d / "tgt" / "tgtd.pid"), \
            pid(d / "tgt-host2" / "tgtd.pid")
        ports = {t: tgt_env(d, t) for t in ("tgt", "tgt-host2")}

        # Bad input first: refused, nothing touched.
        for bad in ("einstein-host3", "tgtd-host0", "picasso-host2", "ceph"):
            proc = restart(stack, bad, check=False)
            assert proc.returncode == 2 and "error:" in proc.stderr, (bad, proc.stderr)
        assert (pid(d / "pids" / "einstein-host2.pid"), pid(d / "tgt-host2" / "tgtd.pid")) == (einstein2, tgtd2)

        restart(stack, "einstein-host2")
        new_einstein = pid(d / "pids" / "einstein-host2.pid")
        assert new_einstein != einstein2 and not alive(einstein2)
        assert os.stat(f"/proc/{new_einstein}/ns/net").st_ino == netns_inode(stack.env["BMI_HOST2_NETNS"])
        rows = host_rows(stack)
        assert rows["host2"][0] > epochs["host2"][0] and rows["host2"][1] == "up"  # it registered again

        einstein1 = pid(d / "pids" / "einstein.pid")
        restart(stack, "einstein")  # host 1's (Picasso's name server), the alias of einstein-host1
        assert pid(d / "pids" / "einstein.pid") != einstein1 and not alive(einstein1)
        assert host_rows(stack)["host1"][0] > epochs["host1"][0]
        restart(stack, "tgtd-host2")
        restart(stack, "tgtd")  # host 1's, the alias of tgtd-host1
        for tgt, old in (("tgt", tgtd1), ("tgt-host2", tgtd2)):
            new = pid(d / tgt / "tgtd.pid")
            assert new != old and not alive(old), tgt
            assert tgt_env(d, tgt) == ports[tgt]  # same control port, portal and namespace
            netns = ports[tgt]["TGT_NETNS"]
            assert os.stat(f"/proc/{new}/ns/net").st_ino == netns_inode(netns), tgt

        # Nothing moved: the same gateways, nobody taken over, every target live where it is recorded.
        assert gateways(stack) == placed
        rows = host_rows(stack)
        assert all(r[1] == "up" and r[2] is None for r in rows.values()), rows
        assert_targets_where_recorded(stack, placed)
        status = subprocess.run([STACK, "status", "--dir", str(d)], capture_output=True, text=True, check=False)
        assert status.returncode == 0 and ".old" not in status.stdout, status.stdout  # every daemon runs
        for k in (1, 2):
            assert re.search(rf"^host{k} .* present, .*einstein running, tgtd running", status.stdout, re.M)

        # A tgtd that died is started again the same way (same control port, portal, namespace).
        dead = pid(d / "tgt-host2" / "tgtd.pid")
        os.kill(dead, signal.SIGKILL)
        restart(stack, "tgtd-host2")
        new = pid(d / "tgt-host2" / "tgtd.pid")
        assert new != dead and tgt_env(d, "tgt-host2") == ports["tgt-host2"]
        assert os.stat(f"/proc/{new}/ns/net").st_ino == netns_inode(stack.env["BMI_HOST2_NETNS"])
        assert gateways(stack) == placed
        assert all(r[1] == "up" and r[2] is None for r in host_rows(stack).values())
        assert_targets_where_recorded(stack, placed)

        # The guide's workflow through Picasso, on both hosts.
        by_host = {g: n for n, (g, _c) in sorted(placed.items())}
        for gateway, node in by_host.items():
            assert stack.bmi("snap", "create", "bmi_infra", node, f"snap-{gateway}").stdout.strip() == "Success"
        snaps = stack.bmi("snap", "ls", "bmi_infra").stdout
        assert "snap-host1" in snaps and "snap-host2" in snaps, snaps
        for node in NODES:
            dpro(stack, node)
        assert live(d, "tgt") == [] and live(d, "tgt-host2") == []
        deadline = time.monotonic() + 180  # a clone the killed tgtd's Ceph watch held: finishes after it expires
        while gateways(stack) and time.monotonic() < deadline:
            time.sleep(1)
        assert gateways(stack) == {}
        ring = HashRing(["host1", "host2"])
        for gateway, node in by_host.items():  # from the snapshot taken on the other host's node, too
            snap = f"snap-{'host2' if gateway == 'host1' else 'host1'}"
            assert stack.bmi("pro", "bmi_infra", node, snap, "bmi_network", "eth0").stdout.strip() == "Success"
        again = gateways(stack)
        assert {n: g for n, (g, _c) in again.items()} == {n: ring.get(n) for n in by_host.values()}
        assert_targets_where_recorded(stack, again)
        for node in by_host.values():
            assert stack.bmi("dpro", "bmi_infra", node, "bmi_network", "eth0").stdout.strip() == "Success"
        assert live(d, "tgt") == [] and live(d, "tgt-host2") == []
    assert_nothing_left(d, made, inodes, subnet)

"""``scripts/bmi-stack up --hosts 2``: two hosts, each in its own network namespace, behind one Picasso.

Each host's Einstein (name server, RPC workers) and tgtd (portal) run inside the host's namespace
``bmi-<id>-hostK`` and listen only on its own address on the stack's bridge; Ceph, PostgreSQL, the HIL
simulator and Picasso listen on the bridge's shared address in the stack's shared namespace, and
nothing of the stack listens in this (the root) namespace.  Nodes provisioned with the ``bmi`` CLI land
on the gateway the ring picks; host 1's Einstein (the name server Picasso uses) and tgtd SIGKILLed:
host 2 takes its nodes over (targets live on host 2's tgtd, boot files name its portal) and Picasso,
finding host 2 in the PostgreSQL database, goes on serving: deprovision through it cleans up; ``down``
leaves no namespace, veth, address or process behind.
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
from tests.support.stack import Stack, running_stack

NODES = ["node-01", "node-02", "node-03", "node-04"]


def live(d: Path, tgt: str) -> list[str]:
    port = next(line.split("=", 1)[1] for line in (d / tgt / "env").read_text().splitlines()
                if line.startswith("TGT_CONTROL_PORT="))
    out = subprocess.run(["tgtadm", "-C", port, "--lld", "iscsi", "--op", "show", "--mode", "target"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(re.findall(r"^Target \d+: \S+:(\S+)$", out, re.M))


def gateways(stack: Stack) -> dict[str, tuple[str, str]]:
    """node -> (gateway, clone) from the stack's PostgreSQL (through its unix socket: the TCP
    address lives in the stack's namespace only)."""
    url = urlparse(stack.env["BMI_DB_URL"])
    conn = psycopg2.connect(host=stack.env["BMI_PG_SOCKET_DIR"], port=url.port, user="postgres", dbname="bmi")
    try:
        with conn.cursor() as cur:
            cur.execute("select node, gateway, image_id from provision")
            return {n: (g, f"112233445566778899img{i}") for n, g, i in cur.fetchall()}
    finally:
        conn.close()


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def listening(netns: str | None) -> dict[int, set[str]]:
    """pid -> the ``ip:port`` it listens on (TCP), in ``netns`` (None: this, the root, namespace)."""
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["ss", "-Hltnp"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found: dict[int, set[str]] = {}
    for line in out.splitlines():
        for pid in re.findall(r"pid=(\d+),", line):
            found.setdefault(int(pid), set()).add(line.split()[3])
    return found


def tree(pid: int) -> set[int]:
    """``pid`` and all its descendants (Einstein's workers are its children)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += children.get(p, [])
    return seen


def assert_hosts_in_their_namespaces(stack: Stack) -> None:
    d, env = stack.dir, stack.env
    shared_ns, shared_ip = env["BMI_NETNS"], env["BMI_SHARED_IP"]
    root = listening(None)
    namespaces = {shared_ns, env["BMI_HOST1_NETNS"], env["BMI_HOST2_NETNS"]}
    assert len(namespaces) == 3 and len({netns_inode(n) for n in namespaces}) == 3
    for k in (1, 2):
        netns, ip = env[f"BMI_HOST{k}_NETNS"], env[f"BMI_HOST{k}_IP"]
        sockets = listening(netns)
        einstein = int((d / "pids" / ("einstein.pid" if k == 1 else f"einstein-host{k}.pid")).read_text())
        tgtd = int((d / ("tgt" if k == 1 else f"tgt-host{k}") / "tgtd.pid").read_text())
        for pid in (einstein, tgtd):
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode(netns), f"pid {pid} not in {netns}"
            assert pid not in root, f"pid {pid} listens in the root namespace: {root[pid]}"
        einstein_sockets = set().union(*(sockets.get(p, set()) for p in tree(einstein)))
        # the name server and at least one RPC worker, every one on the host's own address
        assert len(einstein_sockets) >= 2, sockets
        assert {s.rpartition(":")[0] for s in einstein_sockets} == {ip}, einstein_sockets
        portal = re.search(r"^TGT_PORTAL=(\S+)$", (d / ("tgt" if k == 1 else f"tgt-host{k}") / "env").read_text(),
                           re.M).group(1)
        assert portal.startswith(f"{ip}:") and sockets.get(tgtd) == {portal}
        cfg = (d / ("bmiconfig.cfg" if k == 1 else f"bmiconfig-host{k}.cfg")).read_text()
        assert re.search(rf"^name_server_ip = {re.escape(ip)}$", cfg, re.M)
    # Ceph, PostgreSQL, the HIL simulator and Picasso: on the shared address, in the shared namespace.
    shared = {s for socks in listening(shared_ns).values() for s in socks}
    for url in (env["BMI_URL"], env["HIL_ENDPOINT"], env["BMI_DB_URL"].replace("postgresql+psycopg2", "pg")):
        parsed = urlparse(url)
        assert f"{parsed.hostname}:{parsed.port}" in shared and parsed.hostname == shared_ip, (url, shared)
    assert {s.rpartition(":")[0] for s in shared} == {shared_ip}, shared
    assert not any(shared_ip in s or env["BMI_HOST1_IP"] in s for socks in root.values() for s in socks)


def test_stack_with_two_hosts_in_namespaces_places_nodes_by_the_ring_and_survives_a_killed_host() -> None:
    with running_stack(nodes=3 + len(NODES), hosts=2) as stack:  # bmi_node, cisco-01, cisco-02 + node-0N
        d = stack.dir
        made = [stack.env["BMI_NETNS"], stack.env["BMI_HOST1_NETNS"], stack.env["BMI_HOST2_NETNS"]]
        subnet = stack.env["BMI_SUBNET"].rsplit(".", 1)[0] + "."
        inodes = {netns_inode(n) for n in made}
        status = subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "bmi-stack"), "status",
                                 "--dir", str(d)], capture_output=True, text=True, check=False)
        assert status.returncode == 0, status.stdout
        for k in (1, 2):
            assert re.search(rf"^host{k} .*{stack.env[f'BMI_HOST{k}_NETNS']} present, "
                             rf"{re.escape(stack.env[f'BMI_HOST{k}_IP'])} .*einstein running, tgtd running",
                             status.stdout, re.M), status.stdout
        assert_hosts_in_their_namespaces(stack)

        stack.rbd("create", "--size", "16", "hostsgold")
        assert stack.bmi("import", "bmi_infra", "hostsgold").stdout.strip() == "Success"
        for node in NODES:
            assert stack.bmi("pro", "bmi_infra", node, "hostsgold", "bmi_network", "eth0").stdout.strip() == "Success"
        placed = gateways(stack)
        ring = HashRing(["host1", "host2"])
        assert {n: g for n, (g, _c) in placed.items()} == {n: ring.get(n) for n in NODES}
        assert live(d, "tgt") == sorted(c for g, c in placed.values() if g == "host1")
        assert live(d, "tgt-host2") == sorted(c for g, c in placed.values() if g == "host2")
        assert live(d, "tgt-host2"), "the ring put no node on host2"
        assert live(d, "tgt"), "the ring put no node on host1"
        for node, (gateway, _c) in placed.items():  # each boot script names its gateway's own address
            ip = stack.env[f"BMI_{gateway.upper()}_IP"]
            assert f"iscsi:{ip}:" in (d / "tftp" / f"{node}.ipxe").read_text()
        # host 1 crashes (its Einstein, whose name server Picasso was using, and its tgtd)
        os.killpg(int((d / "pids" / "einstein.pid").read_text()), signal.SIGKILL)
        os.kill(int((d / "tgt" / "tgtd.pid").read_text()), signal.SIGKILL)
        portal = stack.env["BMI_HOST2_IP"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = gateways(stack)
            # a node is taken over when its target is live on host 2 AND its boot script names host 2
            # (the script is rewritten just after the target is made: wait for both, not the first)
            if all(g == "host2" for g, _c in now.values()) and \
                    live(d, "tgt-host2") == sorted(c for _g, c in now.values()) and \
                    all(f"iscsi:{portal}:" in (d / "tftp" / f"{node}.ipxe").read_text() for node in NODES):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"host 2 did not take over: {gateways(stack)}")
        # Picasso finds host 2's name server in the database and goes on serving through it.
        assert "hostsgold" in stack.bmi("ls", "bmi_infra").stdout
        answers = {}
        for node in NODES:  # the dead tgtd's Ceph watch may hold a clone for up to 30 s: 503, retry
            for _ in range(30):
                proc = stack.bmi("dpro", "bmi_infra", node, "bmi_network", "eth0", check=False)
                answers[node] = (proc.returncode, proc.stdout, proc.stderr)
                if proc.returncode == 0 or "not provisioned" in proc.stderr:
                    break
                time.sleep(3)
            else:
                pytest.fail(f"dpro {node}: {proc.stderr}")
        assert live(d, "tgt-host2") == []
        # A clone the dead tgtd's Ceph watch still held: the committed deprovision answered success and
        # finishes (clone and record removed) once the watch times out.
        deadline = time.monotonic() + 180
        while gateways(stack) and time.monotonic() < deadline:
            time.sleep(1)
        assert gateways(stack) == {}, answers
    assert_nothing_left(d, made, inodes, subnet)


def assert_nothing_left(d: Path, made: list[str], inodes: set[int], subnet: str) -> None:
    """After `down` (running_stack also checked that no process names the directory any more): no
    namespace, veth, address, directory or process of the stack is left."""
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in made if re.search(rf"^{re.escape(n)}\b", left, re.M)], left
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "vb-host" not in links, links
    addrs = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    assert subnet not in addrs, addrs
    assert not d.exists()
    inside = [pid for pid in os.listdir("/proc") if pid.isdigit() and in_netns(int(pid), inodes)]
    assert inside == [], f"processes left in the stack's namespaces: {inside}"


def in_netns(pid: int, inodes: set[int]) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino in inodes
    except OSError:
        return False

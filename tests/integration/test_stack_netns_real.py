"""scripts/stack_hosts.py on real network namespaces (no daemons): what `bmi-stack up --hosts N` builds.

Host namespaces reach the shared bridge address (and nothing of it is reachable from the root
namespace); a second `up` over existing names refuses instead of adopting them (so its `down` could
never delete another stack's namespaces); removal leaves no namespace and no veth.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import stack_hosts  # noqa: E402

SERVE_ONCE = ("import socket, sys\n"
              "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); print(s.getsockname()[1], flush=True)\n"
              "c, _ = s.accept(); c.sendall(b'hello'); c.close()\n")
CONNECT = ("import socket, sys\n"
           "print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).recv(5).decode())\n")


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_host_namespaces_reach_the_bridge_and_are_removed_exactly(tmp_path: Path) -> None:
    net = stack_hosts.plan(tmp_path, 2, None)
    names = [net["shared_ns"], *(h["netns"] for h in net["hosts"].values())]
    assert not any(n in netns_list() for n in names), "left over from an earlier run"
    logs: list[str] = []
    try:
        stack_hosts.make(net, lambda: None)
        assert all(n in netns_list() for n in names)
        for host in net["hosts"].values():
            addrs = subprocess.run(["ip", "-n", host["netns"], "-o", "-4", "addr", "show", "dev", "eth0"],
                                   capture_output=True, text=True, check=True).stdout
            assert f" {host['ip']}/24 " in addrs
        server = subprocess.Popen(["ip", "netns", "exec", net["shared_ns"], sys.executable, "-c", SERVE_ONCE,
                                   net["shared_ip"]], stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            # not from the root namespace: the bridge's subnet exists only inside the stack's namespaces
            root = subprocess.run([sys.executable, "-c", CONNECT, net["shared_ip"], port], capture_output=True,
                                  text=True, check=False)
            assert root.returncode != 0
            host2 = net["hosts"]["host2"]["netns"]
            got = subprocess.run(["ip", "netns", "exec", host2, sys.executable, "-c", CONNECT, net["shared_ip"],
                                  port], capture_output=True, text=True, check=True).stdout
            assert got.strip() == "hello"
        finally:
            server.kill()
            server.wait()
        again = stack_hosts.plan(tmp_path, 2, None)
        with pytest.raises(RuntimeError, match="exists already"):
            stack_hosts.make(again, lambda: None)
        stack_hosts.remove_hosts(again, logs.append)  # it made nothing: it removes nothing
        stack_hosts.remove_shared(again, logs.append)
        assert all(n in netns_list() for n in names)
    finally:
        stack_hosts.remove_hosts(net, logs.append)
        stack_hosts.remove_shared(net, logs.append)
    assert not any(n in netns_list() for n in names)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "vb-host" not in links
    assert logs == []  # no process had to be killed

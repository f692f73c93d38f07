"""bmi-stack --hosts N: N simulated BMI hosts, each in its own network namespace, on one bridge.

Layout (docs/deployment.md, "A simulated multi-host stack"):

    shared namespace S (with --boot the boot network's, else bmi-<id>-net made here)
      bridge br-bmi  P.1/24   Ceph (mon + OSD), PostgreSQL, the HIL simulator, Picasso, dnsmasq (--boot),
                              the nodes' qemu VMs (--boot)
      veth vb-hostK  -- enslaved to br-bmi --  eth0 in namespace bmi-<id>-hostK
    namespace bmi-<id>-hostK
      eth0           P.(10+K)/24  host K's Einstein (name server + RPC) and tgtd (portal)

``<id>`` is a hash of the stack's directory, so two stacks never share a namespace.  Nothing here
is routed: the namespaces see only the bridge's subnet (and their own loopback).  Every name made
is recorded in the stack's state file BEFORE it is made, so ``down`` removes exactly what ``up``
made, even after a half-finished ``up``.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any, Callable

BRIDGE = "br-bmi"
HOST_OFFSET = 10  # host K is P.(10+K): below a --boot network's DHCP range (.100-.200)


def stack_id(d: Path) -> str:
    return hashlib.sha1(str(d).encode("utf-8"), usedforsecurity=False).hexdigest()[:8]


def ip_cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def netns_exists(name: str) -> bool:
    out = ip_cmd("netns", "list", check=False).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def plan(d: Path, hosts: int, boot: dict[str, str] | None) -> dict[str, Any]:
    """Names and addresses of the shared namespace and of every host (nothing is made yet)."""
    sid = stack_id(d)
    if boot:
        shared_ns, bridge, shared_ip = boot["BOOTNET_NETNS"], boot["BOOTNET_BRIDGE"], boot["BOOTNET_IP"]
        prefix = int(boot.get("BOOTNET_PREFIX", "24"))
    else:
        # A private subnet inside a private namespace: it cannot meet any other network, the
        # third octet only tells stacks apart for a human reading `ip` output.
        shared_ns, bridge = f"bmi-{sid}-net", BRIDGE
        shared_ip, prefix = f"10.78.{int(sid[:4], 16) % 250 + 1}.1", 24
    base = shared_ip.rsplit(".", 1)[0]
    return {
        "id": sid, "shared_ns": shared_ns, "own_shared": not boot, "bridge": bridge, "shared_ip": shared_ip,
        "prefix": prefix, "subnet": f"{base}.0/{prefix}",
        "hosts": {f"host{k}": {"netns": f"bmi-{sid}-host{k}", "ip": f"{base}.{HOST_OFFSET + k}",
                                "veth": f"vb-host{k}"} for k in range(1, hosts + 1)},
    }


def make(net: dict[str, Any], save: Callable[[], None]) -> None:
    """Create the shared namespace (unless --boot made it) and every host's namespace and veth."""
    ns = net["shared_ns"]
    if net["own_shared"]:
        net["made_shared"] = True
        save()
        ip_cmd("netns", "add", ns)
        ip_cmd("-n", ns, "link", "set", "lo", "up")
        ip_cmd("-n", ns, "link", "add", net["bridge"], "type", "bridge", "stp_state", "0", "forward_delay", "0")
        ip_cmd("-n", ns, "addr", "add", f"{net['shared_ip']}/{net['prefix']}", "dev", net["bridge"])
        ip_cmd("-n", ns, "link", "set", net["bridge"], "up")
    for host in net["hosts"].values():
        host["made"] = True
        save()
        ip_cmd("netns", "add", host["netns"])
        ip_cmd("-n", host["netns"], "link", "set", "lo", "up")
        # The bridge end stays in S; the host end is eth0 of the host's namespace.
        ip_cmd("-n", ns, "link", "add", host["veth"], "type", "veth", "peer", "name", "eth0",
               "netns", host["netns"])
        ip_cmd("-n", ns, "link", "set", host["veth"], "master", net["bridge"])
        ip_cmd("-n", ns, "link", "set", host["veth"], "up")
        ip_cmd("-n", host["netns"], "addr", "add", f"{host['ip']}/{net['prefix']}", "dev", "eth0")
        ip_cmd("-n", host["netns"], "link", "set", "eth0", "up")


def netns_pids(name: str) -> list[int]:
    out = ip_cmd("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove_hosts(net: dict[str, Any], log: Callable[[str], None]) -> None:
    """Delete the hosts' veths and namespaces (after their daemons were stopped)."""
    import os
    import signal

    for name, host in net["hosts"].items():
        if not host.get("made"):
            continue
        if netns_exists(net["shared_ns"]):
            ip_cmd("-n", net["shared_ns"], "link", "del", host["veth"], check=False)
        if netns_exists(host["netns"]):
            # Only processes of this stack can live in its private namespace (it was made by `up`):
            # one left there would keep the namespace alive after `ip netns del`.
            for pid in netns_pids(host["netns"]):
                log(f"{name}: pid {pid} still in {host['netns']}: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip_cmd("netns", "del", host["netns"], check=False)


def remove_shared(net: dict[str, Any], log: Callable[[str], None]) -> None:
    """Delete the private shared namespace (the --boot one is scripts/bootnet's to delete)."""
    import os
    import signal

    ns = net["shared_ns"]
    if not net.get("made_shared") or not netns_exists(ns):
        return
    for pid in netns_pids(ns):
        log(f"pid {pid} still in {ns}: SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip_cmd("-n", ns, "link", "del", net["bridge"], check=False)
    ip_cmd("netns", "del", ns, check=False)


def host_config(d: Path, main_cfg: Path, name: str, host: dict[str, str], tgt: dict[str, str],
                free_port: Callable[[], int]) -> Path:
    """Host ``name``'s config: host1's, with its own tgtd, tgt conf dir, RPC address and ports, [host] name."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(main_cfg)
    portal_ip, _, portal_port = tgt["TGT_PORTAL"].rpartition(":")
    conf_dir = d / f"tgt-conf.d-{name}"
    conf_dir.mkdir(exist_ok=True)
    parser["iscsi"].update({"ip": portal_ip, "port": portal_port, "conf_dir": str(conf_dir),
                            "control_port": tgt["TGT_CONTROL_PORT"]})
    parser["rpc"].update({"name_server_ip": host["ip"], "name_server_port": str(free_port()),
                          "rpc_server_ip": host["ip"], "rpc_server_port": str(free_port())})
    parser["logs"]["path"] = str(d / "logs" / name)
    parser["host"] = {"name": name, "heartbeat_seconds": "1.0", "dead_after_seconds": "6.0"}
    path = d / f"bmiconfig-{name}.cfg"
    with open(path, "w", encoding="utf-8") as fh:
        parser.write(fh)
    path.chmod(0o600)
    return path


def listening(netns: str, pid: int) -> list[str]:
    """``ip:port`` of the TCP sockets ``pid`` (or its children) listens on inside ``netns``."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltnp"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    return sorted({line.split()[3] for line in out.splitlines() if f"pid={pid}," in line})

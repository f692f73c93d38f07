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
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    for name in [ns] * net["own_shared"] + [h["netns"] for h in net["hosts"].values()]:
        if netns_exists(name):  # never adopt (and later delete) a namespace this `up` did not make
            raise RuntimeError(f"network namespace {name} exists already (another stack in this directory? "
                               f"`scripts/bmi-stack down` it, or `ip netns del {name}`)")
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


def start_tgtd(stack: Any, d: Path, net: dict, name: str) -> dict[str, str]:
    """Host ``name``'s tgtd in its namespace, portal on its address (D/tgt for host1, D/tgt-hostK)."""
    host = net["hosts"][name]
    tgt_dir = d / ("tgt" if name == "host1" else f"tgt-{name}")
    stack.run(str(stack.SCRIPTS / "tgtd-dev"), "start", str(tgt_dir), host["ip"],
              env=dict(os.environ, TGT_NETNS=host["netns"]))
    return stack.read_env(tgt_dir / "env")


def start_extra_hosts(stack: Any, d: Path, cfg: Path, net: dict, env: dict[str, str]) -> None:
    """Hosts 2..N, each in its namespace: a tgtd on its address and an Einstein with its own name server."""
    for name, host in net["hosts"].items():
        if name == "host1":
            continue
        stack.log(f"starting {name} in {host['netns']} ({host['ip']}): tgtd and Einstein")
        tgt = start_tgtd(stack, d, net, name)
        host_cfg = host_config(d, cfg, name, host, tgt, stack.free_port)
        stack.spawn(f"einstein-{name}", stack.service_argv("einstein", d, cfg=host_cfg), d,
                    dict(env, BMI_CONFIG=str(host_cfg)), netns=host["netns"])


def start_database(stack: Any, d: Path, net: dict) -> str:
    """PostgreSQL (scripts/pg-dev) in the shared namespace on the bridge address; its SQLAlchemy URL."""
    # pg-dev runs the cluster as the `postgres` user: it must be able to pass through D (0700 from mkdtemp).
    d.chmod(d.stat().st_mode | 0o011)
    pg_env = dict(os.environ, PG_LISTEN=net["shared_ip"], PG_ALLOW=net["subnet"])
    return stack.run(str(stack.SCRIPTS / "pg-dev"), "start", str(d / "pg"), env=pg_env).strip().splitlines()[-1]


def status(stack: Any, d: Path, net: dict | None) -> bool:
    """`bmi-stack status`'s lines for each host and PostgreSQL; True if all run."""
    ok = True
    for name, host in (net or {}).get("hosts", {}).items():
        present = netns_exists(host["netns"])
        ok &= present
        einstein = d / "pids" / ("einstein.pid" if name == "host1" else f"einstein-{name}.pid")
        tgt_dir = d / ("tgt" if name == "host1" else f"tgt-{name}")
        tgtd = "running" if stack.alive(tgt_dir / "tgtd.pid") else "DEAD"
        einstein_state = "running" if stack.alive(einstein) else "DEAD"
        print(f"{name:15s} netns {host['netns']} {'present' if present else 'ABSENT'}, {host['ip']} on "
              f"{net['bridge']} in {net['shared_ns']}; einstein {einstein_state}, tgtd {tgtd}")
    if net:
        pg = "running" if subprocess.run([str(stack.SCRIPTS / "pg-dev"), "status", str(d / "pg")],
                                         capture_output=True, check=False).returncode == 0 else "DEAD"
        ok &= pg == "running"
        print(f"{'postgresql':15s} {pg} on {net['shared_ip']} in {net['shared_ns']}")
    return ok


"""Several BMI hosts on this machine, for tests and benchmarks (real daemons, no mocks).

Each host is one ``scripts/einstein_server`` (its own name server, workers and ``[host] name``)
with its OWN tgtd (``scripts/tgtd-dev``: own control port, own portal address 127.0.0.<i+1>) and its
own tgt conf dir; all hosts share one Ceph cluster, one database file, one TFTP directory (as an
NFS export would be shared) and one HIL simulator.

``kill(i)`` SIGKILLs host i's whole Einstein process group AND its tgtd, as a host crash would;
``restart(i)`` starts them again (same name and conf dir, a new tgtd on the same address).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ims.common import config
from ims.rpc.client import EinsteinClient
from tests.support.procs import free_port
from tests.support.tgt import TgtdInstance, start_tgtd, stop_tgtd

REPO = Path(__file__).resolve().parents[2]
KEY = "multihost-test-key"
UID = "mh"
NET, NIC, PROJECT = "bmi_network", "eth0", "bmi_infra"


def inventory(nodes: list[str]) -> dict[str, Any]:
    """A HIL simulator inventory: ``nodes`` in project bmi_infra (NIC eth0), users haas and haasadmin."""
    return {
        "projects": [PROJECT],
        "users": [{"name": "haas", "password": "secret", "is_admin": False, "projects": [PROJECT]},
                  {"name": "haasadmin", "password": "admin1234", "is_admin": True, "projects": []}],
        "networks": [{"name": NET, "owner": PROJECT, "access": [PROJECT], "net_id": "1001"}],
        "nodes": [{"name": n, "project": PROJECT,
                   "nics": [{"label": NIC, "macaddr": f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}"}]}
                  for i, n in enumerate(nodes)],
    }


@dataclass
class HostProc:
    index: int
    name: str
    dir: Path
    portal_ip: str
    workers: int
    ns_port: int = 0
    tgtd: TgtdInstance | None = None
    proc: subprocess.Popen[bytes] | None = None
    cfg_path: Path = field(default_factory=Path)
    restarts: int = 0

    @property
    def conf_dir(self) -> Path:
        return self.dir / "conf.d"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(self, base: Path, hosts: int, ceph: Any, hil_url: str, workers: int = 2,
                 heartbeat: float = 0.5, dead_after: float = 3.0, service_user: tuple[str, str] | None = None,
                 multipath_boot: bool = False) -> None:
        self.base = Path(base)
        self.ceph = ceph
        self.hil_url = hil_url
        self.heartbeat, self.dead_after = heartbeat, dead_after
        self.service_user = service_user
        self.multipath_boot = multipath_boot  # [iscsi] multipath_boot: two-URI boot scripts
        (self.base / "tftp" / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
        self.db_path = self.base / "bmi.db"
        self.hosts = [HostProc(i, f"host{i + 1}", self.base / f"host{i + 1}", f"127.0.0.{i + 1}", workers)
                      for i in range(hosts)]
        self._clients: dict[int, EinsteinClient] = {}

    # --- config ----------------------------------------------------------------------
    def config_text(self, host: HostProc) -> str:
        assert host.tgtd is not None
        service = (f"service_username = {self.service_user[0]}\nservice_password = {self.service_user[1]}\n"
                   if self.service_user else "")
        return textwrap.dedent(f"""\
            [bmi]
            uid = {UID}
            admin_users = haasadmin
            [db]
            path = {self.db_path}
            [fs]
            driver = ceph
            pool = {self.ceph.pool}
            conf_file = {self.ceph.conf}
            keyring = {self.ceph.keyring}
            [iscsi]
            ip = {host.tgtd.portal_ip}
            port = {host.tgtd.portal_port}
            conf_dir = {host.conf_dir}
            control_port = {host.tgtd.control_port}
            multipath_boot = {str(self.multipath_boot).lower()}
            [net_isolator]
            url = {self.hil_url}
            auth_cache_seconds = 0
            """) + service + textwrap.dedent(f"""\
            [tftp]
            pxelinux_path = {self.base}/tftp/pxelinux.cfg
            ipxe_path = {self.base}/tftp
            [logs]
            path = {host.dir}/logs
            [rpc]
            name_server_ip = 127.0.0.1
            name_server_port = {host.ns_port}
            rpc_server_ip = 127.0.0.1
            rpc_server_port = {free_port(host.workers)}
            workers = {host.workers}
            hmac_key = {KEY}
            timeout = 300
            drain_seconds = 5
            [journal]
            retry_seconds = 5
            [host]
            name = {host.name}
            heartbeat_seconds = {self.heartbeat}
            dead_after_seconds = {self.dead_after}
            """)

    # --- life cycle ------------------------------------------------------------------
    def start(self, index: int) -> HostProc:
        host = self.hosts[index]
        host.dir.mkdir(parents=True, exist_ok=True)
        host.conf_dir.mkdir(exist_ok=True)
        host.tgtd = start_tgtd(str(host.dir / f"tgtd{host.restarts}"), host.portal_ip)
        host.ns_port = free_port()
        host.cfg_path = host.dir / "bmi.cfg"
        host.cfg_path.write_text(self.config_text(host))
        out = open(host.dir / f"einstein{host.restarts}.out", "wb")  # noqa: SIM115 - child's stdout
        host.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "einstein_server"), "--config",
                                      str(host.cfg_path)], stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        out.close()
        self._clients.pop(index, None)
        self.wait_serving(host)
        return host

    def start_all(self) -> None:
        for i in range(len(self.hosts)):
            self.start(i)

    def log(self, host: HostProc) -> str:
        return "".join(p.read_text(errors="replace")[-6000:] for p in sorted(host.dir.glob("einstein*.out")))

    def wait_serving(self, host: HostProc, timeout: float = 120.0) -> None:
        import Pyro4.errors
        import Pyro4.naming

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not host.alive():
                raise RuntimeError(f"einstein of {host.name} exited:\n{self.log(host)}")
            try:
                with Pyro4.naming.locateNS("127.0.0.1", host.ns_port, broadcast=False, hmac_key=KEY.encode()) as ns:
                    if len(ns.list(prefix="bmi.einstein.")) >= host.workers:
                        return
            except Pyro4.errors.PyroError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"einstein of {host.name} did not serve in {timeout:.0f} s:\n{self.log(host)}")

    def kill(self, index: int) -> None:
        """A host crash: SIGKILL its Einstein (the whole process group we started) and its tgtd."""
        host = self.hosts[index]
        if host.proc is not None and host.proc.poll() is None:
            os.killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait(30)
        if host.tgtd is not None and host.tgtd.alive():
            os.kill(host.tgtd.pid, signal.SIGKILL)
            for _ in range(100):
                if not host.tgtd.alive():
                    break
                time.sleep(0.05)
        host.restarts += 1

    def stall(self, index: int) -> None:
        """A host that hangs (not dead): SIGSTOP its Einstein process group; its tgtd keeps serving."""
        proc = self.hosts[index].proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        proc = self.hosts[index].proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGCONT)

    def restart(self, index: int) -> HostProc:
        host = self.hosts[index]
        if host.tgtd is not None:
            stop_tgtd(host.tgtd)  # the killed one: removes its leftovers (pid is gone)
        return self.start(index)

    def stop_all(self) -> None:
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                try:
                    os.killpg(host.proc.pid, signal.SIGCONT)  # a stalled one must be able to stop
                except ProcessLookupError:
                    pass
                host.proc.send_signal(signal.SIGTERM)
                try:
                    host.proc.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            if host.proc is not None:
                try:
                    os.killpg(host.proc.pid, signal.SIGKILL)  # stragglers of that group only
                except ProcessLookupError:
                    pass
            if host.tgtd is not None:
                try:
                    stop_tgtd(host.tgtd)
                except RuntimeError:
                    pass
        for client in self._clients.values():
            client.close()

    # --- views -----------------------------------------------------------------------
    def client(self, index: int) -> EinsteinClient:
        if index not in self._clients:
            self._clients[index] = EinsteinClient(config.parse(str(self.hosts[index].cfg_path)))
        return self._clients[index]

    def live_iqns(self, index: int) -> list[str]:
        host = self.hosts[index]
        if host.tgtd is None or not host.tgtd.alive():
            return []
        out = subprocess.run(["tgtadm", "-C", str(host.tgtd.control_port), "--lld", "iscsi", "--op", "show",
                              "--mode", "target"], capture_output=True, text=True, check=True, timeout=60).stdout
        return sorted(re.findall(r"^Target \d+: (\S+)$", out, re.M))

    def host_of_portal(self, text: str) -> int | None:
        for host in self.hosts:
            if host.tgtd is not None and f"iscsi:{host.tgtd.portal_ip}:" in text and \
                    f":{host.tgtd.portal_port}:" in text:
                return host.index
        return None


@contextlib.contextmanager
def running_cluster(tmp_path: Path, ceph_cluster: Any, hosts: int, nodes: list[str], golden: str, size: int,
                    golden_data: bytes | None = None, **cluster_kw: Any) -> Iterator[Cluster]:
    """``hosts`` BMI hosts on one Ceph (``ceph_cluster``) and a HIL simulator with ``nodes``; ``golden`` made
    if missing (its first bytes ``golden_data``).  Everything stopped and the test's images removed after."""
    from tests.support.hil import HILSimulatorError, start_hil_simulator

    try:
        hil = start_hil_simulator(inventory(nodes), tmp_path / "hil", action_delay=0.0)
    except HILSimulatorError as exc:
        pytest.fail(f"cannot start the HIL simulator: {exc}", pytrace=False)
    storage = ceph_cluster.storage()
    c = Cluster(tmp_path, hosts, ceph_cluster, hil.url, service_user=("haasadmin", "admin1234"), **cluster_kw)
    try:
        if not storage.image_exists(golden):
            storage.create_image(golden, size)
            if golden_data:
                storage.write(golden, 0, golden_data)
        c.start_all()
        yield c
    finally:
        c.stop_all()
        hil.stop()
        purge_test_images(storage)
        storage.close()


def purge_test_images(storage: Any) -> None:
    """Remove the test's images; a SIGKILLed tgtd's watch on a clone lingers up to 30 s (Ceph's timeout)."""
    from ims.common.errors import BMIError
    from tests.support.ceph import purge_images

    deadline = time.monotonic() + 90
    while True:
        try:
            purge_images(storage, UID + "img")
            return
        except BMIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_for(what: str, check: Any, timeout: float = 120.0, interval: float = 0.25, log: Any = None) -> Any:
    """``check()``'s first truthy value within ``timeout`` s (tried every ``interval`` s); FAILS the test
    naming ``what`` otherwise, with ``log()`` (e.g. a daemon's log) appended if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f"; log:\n{log()}" if log else ""))

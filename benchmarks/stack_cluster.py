"""benchmarks/scale.py --netns: the run's view of a ``scripts/bmi-stack up --hosts H`` stack.

There each host is a network namespace with its own address (its Einstein and tgtd there), and the
database is the stack's PostgreSQL; scale.py runs inside the stack's shared namespace, where every
host's name server and the database answer.  Same interface as tests/support/multihost.Cluster for
what scale.py uses: ``hosts``, ``client(i)``, ``live_iqns(i)``, ``kill(i)``, ``db_url``, ``uid``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ims.common import config
from ims.rpc.client import EinsteinClient

STACK_UID = "112233445566778899"  # scripts/stack_config.py


@dataclass
class StackHost:
    index: int
    name: str


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class StackCluster:
    def __init__(self, d: Path) -> None:
        self.dir = d
        env = read_env(d / "env")
        self.db_url = env["BMI_DB_URL"]
        self.uid = STACK_UID
        self.hosts = [StackHost(i, f"host{i + 1}") for i in range(int(env["BMI_HOSTS"]))]
        self._clients: dict[int, EinsteinClient] = {}

    def _cfg(self, index: int) -> Path:
        return self.dir / ("bmiconfig.cfg" if index == 0 else f"bmiconfig-host{index + 1}.cfg")

    def _tgt(self, index: int) -> Path:
        return self.dir / ("tgt" if index == 0 else f"tgt-host{index + 1}")

    def _pid(self, path: Path) -> int:
        return int(path.read_text().strip())

    def client(self, index: int) -> EinsteinClient:
        if index not in self._clients:
            self._clients[index] = EinsteinClient(config.parse(str(self._cfg(index))))
        return self._clients[index]

    def live_iqns(self, index: int) -> list[str]:
        tgt = self._tgt(index)
        if not (tgt / "tgtd.pid").exists() or not pid_alive(self._pid(tgt / "tgtd.pid")):
            return []
        port = read_env_plain(tgt / "env")["TGT_CONTROL_PORT"]
        out = subprocess.run(["tgtadm", "-C", port, "--lld", "iscsi", "--op", "show", "--mode", "target"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        return sorted(re.findall(r"^Target \d+: (\S+)$", out, re.M))

    def kill(self, index: int) -> None:
        """A host crash: SIGKILL its Einstein's process group and its tgtd (pids from the stack's files)."""
        einstein = self.dir / "pids" / ("einstein.pid" if index == 0 else f"einstein-host{index + 1}.pid")
        os.killpg(self._pid(einstein), signal.SIGKILL)
        tgtd = self._pid(self._tgt(index) / "tgtd.pid")
        os.kill(tgtd, signal.SIGKILL)
        for _ in range(100):
            if not pid_alive(tgtd):
                break
            time.sleep(0.05)

    def stop_all(self) -> None:
        """The stack is brought down by whoever brought it up: only the clients are ours."""
        for client in self._clients.values():
            client.close()


def read_env_plain(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

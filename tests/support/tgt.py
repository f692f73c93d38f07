"""A private, real tgtd for tests (scripts/tgtd-dev), as a session-scoped pytest fixture.

    from tests.support.tgt import tgtd  # noqa: F401  (makes the fixture visible)

    def test_x(tgtd):
        driver = tgtd.target("iqn.2026-01.org.bmi.test:")
        ...

The daemon listens on 127.0.0.1 on a free port with a private control port, and is
stopped (exactly that pid) when the session ends.  If it cannot start the test FAILS.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ims.einstein.iscsi.tgt import TgtTarget
from tests.support import procs

REPO = Path(__file__).resolve().parents[2]
TGTD_DEV = str(REPO / "scripts" / "tgtd-dev")


@dataclass
class TgtdInstance:
    dir: str
    control_port: int
    portal_ip: str
    portal_port: int
    pid: int
    conf_dir: str
    _extra_dirs: list[str] = field(default_factory=list)

    @property
    def portal(self) -> str:
        return f"{self.portal_ip}:{self.portal_port}"

    def url(self, iqn: str, lun: int = 1) -> str:
        return f"iscsi://{self.portal}/{iqn}/{lun}"

    def target(self, prefix: str = "", conf_dir: str | None = None) -> TgtTarget:
        """A driver bound to this tgtd (conf files in ``conf_dir``, default the shared ``.conf_dir``)."""
        return TgtTarget(conf_dir or self.conf_dir, control_port=self.control_port, iqn_prefix=prefix)

    def new_conf_dir(self) -> str:
        """A fresh, empty conf dir (for tests that list or restore targets)."""
        path = tempfile.mkdtemp(prefix="conf-", dir=self.dir)
        self._extra_dirs.append(path)
        return path

    def alive(self) -> bool:
        try:  # a zombie (PID 1 may reap orphans late) has stopped: not alive
            return Path(f"/proc/{self.pid}/comm").read_text().strip() == "tgtd" and procs.alive(self.pid)
        except FileNotFoundError:
            return False


def start_tgtd(directory: str, portal_ip: str = "127.0.0.1") -> TgtdInstance:
    """Run ``scripts/tgtd-dev start``; FAILS the test (not skip) if tgtd cannot start."""
    if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
        pytest.fail("tgtd/tgtadm not installed: run scripts/install-deps (Debian package 'tgt')")
    proc = subprocess.run([TGTD_DEV, "start", directory, portal_ip], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"scripts/tgtd-dev start failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    env = dict(line.split("=", 1) for line in Path(directory, "env").read_text().splitlines() if "=" in line)
    ip, _, port = env["TGT_PORTAL"].rpartition(":")
    conf_dir = os.path.join(directory, "conf.d")
    os.makedirs(conf_dir, exist_ok=True)
    return TgtdInstance(dir=directory, control_port=int(env["TGT_CONTROL_PORT"]), portal_ip=ip,
                        portal_port=int(port), pid=int(Path(directory, "tgtd.pid").read_text()), conf_dir=conf_dir)


def stop_tgtd(instance: TgtdInstance) -> None:
    """Run ``scripts/tgtd-dev stop`` (exactly our pid); raises if the daemon is left running."""
    proc = subprocess.run([TGTD_DEV, "stop", instance.dir], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or instance.alive():
        raise RuntimeError(f"tgtd {instance.pid} did not stop: {proc.stdout}{proc.stderr}")


def debian_restart(instance: TgtdInstance, conf_dir: str) -> TgtdInstance:
    """Restart ``instance``'s tgtd the way Debian's tgt.service does (``scripts/tgtd-dev
    debian-restart``): every target goes away, a new tgtd starts on the same control port
    and portal, and ``tgt-admin -e`` loads ``conf_dir/*.conf``, numbering the targets
    1, 2, ... in glob order.  Updates ``instance.pid``; FAILS the test if it does not work."""
    proc = subprocess.run([TGTD_DEV, "debian-restart", instance.dir, conf_dir], capture_output=True, text=True,
                          timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"scripts/tgtd-dev debian-restart failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    instance.pid = int(Path(instance.dir, "tgtd.pid").read_text())
    if not instance.alive():
        pytest.fail(f"tgtd {instance.pid} is not running after debian-restart:\n{proc.stdout}\n{proc.stderr}")
    return instance


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def tgtd() -> Iterator[TgtdInstance]:
    # `timeout`/CI send SIGTERM, which would end pytest without running finalizers and
    # leave tgtd behind; as KeyboardInterrupt the finally below still stops it.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    directory = tempfile.mkdtemp(prefix="bmi-tgtd-")
    instance = start_tgtd(directory)
    try:
        yield instance
    finally:
        # A second SIGTERM must not cut the stop short either.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop_tgtd(instance)
        finally:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(directory, ignore_errors=True)


def lun_file(directory: Path, name: str, byte: int) -> tuple[str, bytes]:
    """A 2 MiB LUN file ``<directory>/<name>.img`` whose first 4 KiB are ``byte``; ``(path, those 4 KiB)``."""
    path = directory / f"{name}.img"
    data = bytes([byte]) * 4096
    with open(path, "wb") as handle:
        handle.truncate(2 << 20)
        handle.write(data)
    return str(path), data

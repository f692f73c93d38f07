"""pytest fixtures for network-boot tests: the test image, the boot network and a tgtd inside it.

Import the fixtures into a conftest.py::

    from tests.support.bootnet import boot_tgtd, bootnet, test_image  # noqa: F401

* ``test_image`` (session): path of build/bmi-test.img (built by scripts/build-test-image, cached).
* ``efi_test_image`` (session): build/bmi-test-efi.img, the same image as GPT + EFI system partition.
* ``bootnet`` (session): :class:`BootNet` for a private netns + bridge + dnsmasq (scripts/bootnet).
* ``boot_tgtd`` (session): :class:`BootTgtd`, a tgtd running inside that netns, portal on the bridge IP.

Nothing is skipped: if a real part cannot run, the fixture fails with the reason.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ims.common.errors import CommandFailed
from ims.common.names import normalize_mac, pxe_mac_filename, validate_name
from ims.common.process import execute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "build")
IMAGE_PATH = os.path.join(BUILD, "bmi-test.img")
EFI_IMAGE_PATH = os.path.join(BUILD, "bmi-test-efi.img")
ISCSI_PORT = 3260

# The partition offsets scripts/build-test-image uses (bytes), for both the BIOS and the EFI image.
BOOT_PART_OFFSET = 2048 * 512
DATA_PART_OFFSET = (2048 + 36 * 2048) * 512


def build_test_image(out: str | None = None, efi: bool = False) -> str:
    """Run scripts/build-test-image [--efi] (a no-op when the image is up to date)."""
    out = out or (EFI_IMAGE_PATH if efi else IMAGE_PATH)
    execute(os.path.join(REPO, "scripts", "build-test-image"), *(["--efi"] if efi else []), out, timeout=600)
    if not os.path.getsize(out):
        raise AssertionError(f"build-test-image produced an empty {out}")
    return out


@dataclass
class BootNet:
    """A running boot network (the values of DIR/env)."""

    dir: str
    netns: str
    bridge: str
    ip: str
    tftp_root: str
    leases: str
    hostsdir: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def up(cls, directory: str) -> BootNet:
        execute(os.path.join(REPO, "scripts", "bootnet"), "up", directory, timeout=60)
        env: dict[str, str] = {}
        with open(os.path.join(directory, "env"), encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key:
                    env[key] = value
        return cls(dir=env["BOOTNET_DIR"], netns=env["BOOTNET_NETNS"], bridge=env["BOOTNET_BRIDGE"],
                   ip=env["BOOTNET_IP"], tftp_root=env["BOOTNET_TFTP_ROOT"], leases=env["BOOTNET_LEASES"],
                   hostsdir=env["BOOTNET_HOSTSDIR"], env=env)

    def down(self) -> None:
        execute(os.path.join(REPO, "scripts", "bootnet"), "down", self.dir, timeout=60)

    def fixed_address(self, mac: str, name: str, host: int) -> str:
        """Give ``mac`` a fixed address (bridge /24, host part ``host``); return it."""
        validate_name(name, "node")
        ip = self.ip.rsplit(".", 1)[0] + f".{int(host)}"
        with open(os.path.join(self.hostsdir, name), "w", encoding="ascii") as f:
            f.write(f"{normalize_mac(mac)},{name},{ip}\n")
        return ip

    def write_boot_files(self, node: str, mac: str, target_iqn: str, initiator_iqn: str,
                         lun: int = 1, portal_port: int = ISCSI_PORT) -> tuple[str, str]:
        """Write pxelinux.cfg/01-<mac>, <node>.ipxe and by-mac/<mac>.ipxe the way BMI does; return the first two."""
        validate_name(node, "node")
        cfg = os.path.join(self.tftp_root, "pxelinux.cfg", pxe_mac_filename(mac))
        os.makedirs(os.path.dirname(cfg), exist_ok=True)
        with open(cfg, "w", encoding="ascii") as f:
            f.write("DEFAULT menu.c32\nPROMPT 0\nTIMEOUT 5\nMENU TITLE BMI PXE Boot Menu\n\n"
                    f"LABEL {node}\n        MENU LABEL {node}\n        KERNEL ipxe.lkrn\n"
                    f"        INITRD {node}.ipxe\n")
        script = os.path.join(self.tftp_root, f"{node}.ipxe")
        with open(script, "w", encoding="ascii") as f:
            f.write("#!ipxe\n"
                    "set keep-san 1\n"
                    f"set initiator-iqn {initiator_iqn}\n"
                    "ifconf --configurator=dhcp net0\n"
                    f"sanboot --keep iscsi:{self.ip}:tcp:{portal_port}:{lun}:{target_iqn}\n"
                    "boot\n")
        # UEFI nodes: scripts/bootnet's efi-boot.ipxe chains to the script by MAC.
        by_mac = os.path.join(self.tftp_root, "by-mac")
        os.makedirs(by_mac, exist_ok=True)
        shutil.copyfile(script, os.path.join(by_mac, normalize_mac(mac).replace(":", "-") + ".ipxe"))
        return cfg, script


class BootTgtd:
    """tgtd inside the boot netns (``ip netns exec NS tgtd -f -C PORT --iscsi portal=IP:3260``).

    The pid is ours exactly (``ip netns exec`` execs tgtd). Stopping deletes every target and then
    the system, because tgtd ignores SIGTERM while targets exist.
    """

    def __init__(self, netns: str, portal_ip: str, logdir: str) -> None:
        self.netns = netns
        self.portal_ip = portal_ip
        self.port = ISCSI_PORT
        self.control_port = self._free_control_port()
        self.log_path = os.path.join(logdir, "tgtd.log")
        self.tids: set[int] = set()
        with open(self.log_path, "ab") as log:
            # Long-running daemon: execute() waits for exit, so Popen (argv list, no shell) here.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, "tgtd", "-f", "-C", str(self.control_port),
                 "--iscsi", f"portal={portal_ip}:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"tgtd exited at start (rc {self.proc.returncode}); log:\n{self._log()}")
            out, _ = execute("tgtadm", "-C", str(self.control_port), "--op", "show", "--mode", "system",
                             check_exit_code=(0, 1, 107, 22))
            if "System" in out:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"tgtd did not answer on control port {self.control_port}:\n{self._log()}")
            time.sleep(0.2)

    @staticmethod
    def _free_control_port() -> int:
        for _ in range(200):
            port = random.randint(20000, 29999)
            if not os.path.exists(f"/var/run/tgtd/socket.{port}"):
                return port
        raise AssertionError("no free tgtd control port")

    def _log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def tgtadm(self, *args: str) -> str:
        out, _ = execute("tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args, timeout=30)
        return out

    def add_target(self, tid: int, iqn: str, backing_file: str, initiator_name: str) -> None:
        """Export ``backing_file`` (bs-type rdwr) as LUN 1 of ``iqn`` for one initiator name on the boot /24."""
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        self.tids.add(tid)
        self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                    "-b", backing_file, "--bstype", "rdwr")
        # tgt checks two ACLs: the address list (empty = nobody) and the name list (empty = anyone).
        subnet = self.portal_ip.rsplit(".", 1)[0] + ".0/24"
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "--initiator-address", subnet)
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "--initiator-name", initiator_name)

    def delete_target(self, tid: int) -> None:
        self.tgtadm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
        self.tids.discard(tid)

    def show(self) -> str:
        return self.tgtadm("--op", "show", "--mode", "target")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for tid in sorted(self.tids):
                try:
                    self.delete_target(tid)
                except CommandFailed as exc:  # keep stopping: the system delete below still runs
                    print(f"boot_tgtd: deleting tid {tid}: {exc}")
            execute("tgtadm", "-C", str(self.control_port), "--op", "delete", "--mode", "system",
                    check_exit_code=(0, 1, 22, 107))
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for suffix in ("", ".lock"):
            try:
                os.unlink(f"/var/run/tgtd/socket.{self.control_port}{suffix}")
            except FileNotFoundError:
                pass


@pytest.fixture(scope="session")
def test_image() -> str:
    return build_test_image()


@pytest.fixture(scope="session")
def efi_test_image() -> str:
    return build_test_image(efi=True)


@pytest.fixture(scope="session")
def bootnet() -> Iterator[BootNet]:
    directory = tempfile.mkdtemp(prefix="bmi-bootnet-")
    net = BootNet.up(directory)
    try:
        yield net
    finally:
        net.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def boot_tgtd(bootnet: BootNet) -> Iterator[BootTgtd]:
    tgtd = BootTgtd(bootnet.netns, bootnet.ip, bootnet.dir)
    try:
        yield tgtd
    finally:
        tgtd.stop()

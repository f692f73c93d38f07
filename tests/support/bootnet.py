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
import sys
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
    def up(cls, directory: str, extra_env: dict[str, str] | None = None) -> BootNet:
        """scripts/bootnet up; ``extra_env`` adds BOOTNET_* settings (HTTP boot port, loaders)."""
        env = {**os.environ, **extra_env} if extra_env else None
        execute(os.path.join(REPO, "scripts", "bootnet"), "up", directory, timeout=60, env=env)
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


# --- DHCP probe: what the boot network offers a client of a given architecture -----------------
_PROBE_CODE = r"""
import os, socket, struct, sys, time
ifname, mac, arch, user_class = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
xid = int.from_bytes(os.urandom(4), "big")
hw = bytes.fromhex(mac.replace(":", ""))
opts = bytes([53, 1, 1])
opts += bytes([93, 2]) + arch.to_bytes(2, "big")
vendor = b"PXEClient:Arch:%05d:UNDI:003010" % arch
opts += bytes([60, len(vendor)]) + vendor
if user_class:
    opts += bytes([77, len(user_class)]) + user_class.encode()
opts += bytes([55, 3, 1, 66, 67, 255])
pkt = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4),
                  bytes(4), hw, bytes(64), bytes(128), b"\x63\x82\x53\x63") + opts
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
s.bind(("0.0.0.0", 68))
s.settimeout(1.0)
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    s.sendto(pkt, ("255.255.255.255", 67))
    try:
        while True:
            data, _ = s.recvfrom(2048)
            if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid:
                continue
            name = data[108:236].split(b"\0", 1)[0]
            i, msg = 240, 0
            while i < len(data) and data[i] != 255:
                if data[i] == 0:
                    i += 1
                    continue
                code, ln = data[i], data[i + 1]
                val = data[i + 2:i + 2 + ln]
                if code == 53:
                    msg = val[0]
                if code == 67 and not name:
                    name = val.rstrip(b"\0")
                i += 2 + ln
            if msg == 2:
                print("OFFER file=" + name.decode(errors="replace"))
                sys.exit(0)
    except socket.timeout:
        pass
print("NO-OFFER")
sys.exit(3)
"""


def dhcp_offer_filename(net: BootNet, mac: str, arch: int, user_class: str = "") -> str:
    """The boot file name dnsmasq offers a client with this MAC, option 93 = ``arch`` and user class.

    A veth pair joins the boot bridge for the probe (nothing leaves the namespace); the client is a
    plain UDP socket bound to the veth, asking with the broadcast flag like a PXE ROM does. Returns
    the offered file name ('' when the offer has none). :raises AssertionError: no offer at all.
    """
    # Fresh names per probe: a deleted namespace's veth pair disappears asynchronously.
    tag = os.urandom(3).hex()
    client, peer, probe_ns = f"vpc{tag}", f"vpb{tag}", f"{net.netns}-p{tag}"
    nsx = ["ip", "netns", "exec", net.netns]
    pnsx = ["ip", "netns", "exec", probe_ns]
    # The client sits in a namespace of its own: it must have no IPv4 address at all, or the kernel
    # would source its broadcast from the bridge's address and the bridge would drop it as martian.
    execute("ip", "netns", "add", probe_ns)
    try:
        execute(*nsx, "ip", "link", "add", client, "type", "veth", "peer", "name", peer)
        execute(*nsx, "ip", "link", "set", client, "netns", probe_ns)
        execute(*nsx, "ip", "link", "set", peer, "master", net.bridge)
        execute(*nsx, "ip", "link", "set", peer, "up")
        execute(*pnsx, "ip", "link", "set", client, "address", normalize_mac(mac))
        execute(*pnsx, "ip", "link", "set", client, "up")
        out, _ = execute(*pnsx, sys.executable, "-c", _PROBE_CODE, client, normalize_mac(mac), str(arch), user_class,
                         timeout=60, check_exit_code=(0, 3))
    finally:
        execute("ip", "netns", "del", probe_ns, check_exit_code=(0, 1, 2))  # takes the veth pair with it
    line = out.strip().splitlines()[-1] if out.strip() else ""
    if not line.startswith("OFFER file="):
        raise AssertionError(f"no DHCP offer for arch {arch} user class {user_class!r}: {out!r}")
    return line.removeprefix("OFFER file=")

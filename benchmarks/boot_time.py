"""Boot-time benchmark: local disk vs. PXE -> iPXE -> iSCSI, BIOS (SeaBIOS) and UEFI (OVMF) side by side.

    .venv/bin/python benchmarks/boot_time.py [--runs N] [--timeout S] [--firmware bios,uefi]

For each firmware, with that firmware's test image (build/bmi-test.img, MBR + syslinux; or
build/bmi-test-efi.img, GPT + EFI system partition + GRUB EFI, from ``scripts/build-test-image [--efi]``):

(a) local: qemu boots the image as a local disk (``snapshot=on``, so it stays pristine);
(b) network: a diskless VM network-boots on a private boot network (scripts/bootnet) and sanboots a
    copy of the image exported by tgtd (LUN 1). BIOS: SeaBIOS -> iPXE ROM -> pxelinux.0 ->
    ipxe.lkrn -> script; UEFI: OVMF's own PXE -> snponly.efi (DHCP option 93) -> efi-boot.ipxe ->
    by-mac/<mac>.ipxe -> UEFI sanboot -> \\EFI\\BOOT\\BOOTX64.EFI.
Each run is timed from qemu's start to the ``BMI-BOOT-OK`` console line. Prints each run and a table
of medians (BIOS and UEFI columns) with the ratio (b)/(a). No thresholds. Runs are sequential (TCG on
a small box). Needs root.

    .venv/bin/python benchmarks/boot_time.py --image debian [--runs N] [--modes tftp,http]
                                             [--pxelinux-timeout T] [--memory MB]

``--image debian`` boots a real distribution instead: Debian 12 (systemd, open-iscsi's initramfs with
ISCSI_AUTO logging in from the iBFT, root filesystem on the LUN; ``scripts/build-debian-image``,
cached in build/debian12.img), BIOS only, timed from qemu's start to the ``BMI-DEBIAN-UP`` line its
bmi-up.service writes when systemd reaches multi-user.target. (a) is the same image as a local IDE
disk; (b) is network boot with the boot files BMI renders (ims.einstein.boot.BootFiles, so the
PXELINUX wait and the iPXE script are exactly BMI's), in TFTP mode (pxelinux.0 -> ipxe.lkrn -> the
node script) and HTTP mode (the ROM's iPXE -> static boot.ipxe -> GET /boot/<mac> from a small HTTP
server on the boot network, as Picasso's [boot_http] serves it). ``--pxelinux-timeout 30`` renders the
original 3 s PXELINUX wait, to measure what it cost.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hilsim.vm import FIRMWARES, QemuNode
from ims.common.process import execute
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi.tgt_conf import LUN_LBPPBE
from tests.support.bootnet import BootNet, BootTgtd, build_test_image

DEBIAN_IMAGE = os.path.join(REPO, "build", "debian12.img")
DEBIAN_MARKER = r"BMI-DEBIAN-UP "
HTTP_BOOT_PORT = 8089

NODE_MACS = {"bios": "52:54:00:be:0c:01", "uefi": "52:54:00:be:0c:11"}
LOCAL_MACS = {"bios": "52:54:00:be:0c:02", "uefi": "52:54:00:be:0c:12"}


def _local_disk_args(image: str, firmware: str) -> list[str]:
    """The image as the VM's local disk, never written (snapshot=on)."""
    path = image.replace(",", ",,")
    if firmware == "bios":
        return ["-drive", f"file={path},format=raw,if=ide,snapshot=on"]  # SeaBIOS boots it by -boot order=c
    # OVMF ignores -boot order: the disk gets bootindex (on its device, so no if=ide shortcut).
    return ["-drive", f"file={path},format=raw,if=none,id=disk0,snapshot=on",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]


def timed_boot(vm: QemuNode, timeout: float) -> float:
    """Power the VM on; seconds from qemu's start to the BMI-BOOT-OK line. Waits for power-off."""
    vm.power_cycle()
    try:
        vm.wait_for_console(r"BMI-BOOT-OK ", timeout=timeout)
        elapsed = time.monotonic() - (vm.started_at or 0.0)
        if not vm.wait_exit(timeout):
            raise TimeoutError(f"{vm.name} did not power off; console:\n{vm.console_tail()}")
        if "BMI-ERROR" in vm.console_text():
            raise RuntimeError(f"{vm.name} reported an error:\n{vm.console_tail()}")
        return elapsed
    finally:
        vm.power_off()


def build_debian_image() -> str:
    """scripts/build-debian-image (cached: a no-op when build/debian12.img is newer than the script)."""
    execute(os.path.join(REPO, "scripts", "build-debian-image"), DEBIAN_IMAGE, timeout=3600)
    return DEBIAN_IMAGE


def timed_boot_until(vm: QemuNode, marker: str, timeout: float) -> float:
    """Power the VM on; seconds from qemu's start to ``marker`` on the console; then power it off."""
    vm.power_cycle()
    try:
        vm.wait_for_console(marker, timeout=timeout)
        return time.monotonic() - (vm.started_at or 0.0)
    finally:
        vm.power_off()


class _HttpBootServer:
    """``GET /boot/<mac>`` on the boot network, the way Picasso's [boot_http] serves node scripts."""

    def __init__(self, net: BootNet, directory: str) -> None:
        self.directory = directory
        os.makedirs(os.path.join(directory, "boot"), exist_ok=True)
        self.log = open(os.path.join(directory, "http.log"), "ab")  # noqa: SIM115 (closed in stop)
        # Long-running server: Popen with an argv list (execute() waits for exit).
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", net.netns, sys.executable, "-m", "http.server", str(HTTP_BOOT_PORT),
             "--bind", net.ip, "--directory", directory],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"HTTP boot server exited (rc {self.proc.returncode})")

    def publish(self, mac: str, script: str) -> None:
        with open(os.path.join(self.directory, "boot", mac.lower()), "w", encoding="ascii") as f:
            f.write(script)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def run_debian(args: argparse.Namespace) -> int:
    """Debian 12: local disk vs. BMI's network boot over iSCSI, per boot mode (BIOS)."""
    image = build_debian_image()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = tempfile.mkdtemp(prefix="bmi-bench-debian-")
    results: dict[str, list[float]] = {}
    vms: list[QemuNode] = []
    try:
        for mode in ["local", *modes]:
            results[mode] = []
            env = {"BOOTNET_HTTP_BOOT_PORT": str(HTTP_BOOT_PORT)} if mode == "http" else None
            net = BootNet.up(os.path.join(work, f"net-{mode}"), extra_env=env)
            tgtd: BootTgtd | None = None
            http: _HttpBootServer | None = None
            try:
                mac = "52:54:00:de:b1:" + {"local": "01", "tftp": "02", "http": "03"}[mode]
                node = f"debian-{mode}"
                if mode == "local":
                    vm = QemuNode(node, mac, netns=net.netns, bridge=net.bridge,
                                  console_log=os.path.join(work, f"{node}-console.log"),
                                  workdir=os.path.join(work, f"vm-{node}"), boot_timeout=args.timeout,
                                  memory_mb=args.memory, boot_order="c", firmware="bios",
                                  qemu_args=_local_disk_args(image, "bios"))
                else:
                    tgtd = BootTgtd(net.netns, net.ip, work)
                    initiator = f"iqn.2017-10.org.moc.bmi.node:{node}"
                    target = f"iqn.2017-10.org.moc.bmi:{node}"
                    disk = os.path.join(work, f"{node}.img")
                    shutil.copyfile(image, disk)
                    tgtd.add_target(1, target, disk, initiator)
                    # What BMI sets on every LUN (a file backing reports 4 KiB already; rbd would say 4 MiB).
                    tgtd.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                                "--params", f"lbppbe={LUN_LBPPBE}")
                    net.fixed_address(mac, node, 30)
                    boot = BootFiles(os.path.join(net.tftp_root, "pxelinux.cfg"), net.tftp_root, net.ip,
                                     pxelinux_timeout=args.pxelinux_timeout)
                    if mode == "tftp":
                        boot.write(node, mac, "debian12", target, initiator)
                    else:
                        http = _HttpBootServer(net, os.path.join(work, "http"))
                        http.publish(mac, boot.render_ipxe(target, initiator))
                    vm = QemuNode(node, mac, netns=net.netns, bridge=net.bridge,
                                  console_log=os.path.join(work, f"{node}-console.log"),
                                  workdir=os.path.join(work, f"vm-{node}"), boot_timeout=args.timeout,
                                  memory_mb=args.memory, firmware="bios")
                vms.append(vm)
                for i in range(args.runs):
                    try:
                        t = timed_boot_until(vm, DEBIAN_MARKER, args.timeout)
                    except Exception:
                        print(f"{mode}: boot failed; console tail:\n{vm.console_tail()}", flush=True)
                        raise
                    results[mode].append(t)
                    print(f"debian {mode:5} run {i + 1}: {t:6.2f} s", flush=True)
                vm.stop()
            finally:
                if http is not None:
                    http.stop()
                if tgtd is not None:
                    tgtd.stop()
                net.down()
    finally:
        for vm in vms:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nDebian 12, BIOS: median seconds to BMI-DEBIAN-UP over {args.runs} run(s) each "
          f"(pxelinux_timeout {args.pxelinux_timeout}, {args.memory or 'default'} MiB)")
    # Medians and minima: on a shared box under TCG the minimum is the least disturbed boot.
    low = {k: min(v) for k, v in results.items()}
    print(f"{'':40}{'median':>10}{'min':>10}{'ratio med':>11}{'ratio min':>11}")
    print(f"{'(a) local disk':40}{med['local']:10.2f}{low['local']:10.2f}")
    for mode in modes:
        print(f"{'(b) ' + mode + ' boot -> iPXE -> iSCSI':40}{med[mode]:10.2f}{low[mode]:10.2f}"
              f"{med[mode] / med['local']:11.3f}{low[mode] / low['local']:11.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per mode and firmware (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-boot timeout in seconds")
    parser.add_argument("--firmware", default="bios,uefi", help="comma-separated: bios, uefi (default both)")
    parser.add_argument("--image", choices=("test", "debian"), default="test",
                        help="test: the busybox test image (default); debian: Debian 12 (BIOS)")
    parser.add_argument("--modes", default="tftp,http", help="--image debian: boot modes (default tftp,http)")
    parser.add_argument("--pxelinux-timeout", type=int, default=0,
                        help="--image debian: [tftp] pxelinux_timeout to render (tenths of a second; default 0)")
    parser.add_argument("--memory", type=int, default=None, help="guest MiB (default: $BMI_VM_MEMORY or 1024)")
    args = parser.parse_args(argv)
    if args.image == "debian":
        if any(m not in ("tftp", "http") for m in args.modes.split(",")):
            parser.error("--modes: a comma-separated subset of tftp, http")
        return run_debian(args)
    firmwares = [f.strip() for f in args.firmware.split(",") if f.strip()]
    if not firmwares or any(f not in FIRMWARES for f in firmwares):
        parser.error(f"--firmware: a comma-separated subset of {', '.join(FIRMWARES)}")

    images = {fw: build_test_image(efi=fw == "uefi") for fw in firmwares}
    work = tempfile.mkdtemp(prefix="bmi-bench-")
    net = BootNet.up(os.path.join(work, "net"))
    tgtd: BootTgtd | None = None
    vms: list[QemuNode] = []
    results: dict[tuple[str, str], list[float]] = {}
    try:
        tgtd = BootTgtd(net.netns, net.ip, work)
        for tid, fw in enumerate(firmwares, start=1):
            image = images[fw]
            local = QemuNode(f"bench-local-{fw}", LOCAL_MACS[fw], netns=net.netns, bridge=net.bridge,
                             console_log=os.path.join(work, f"local-{fw}-console.log"),
                             workdir=os.path.join(work, f"vm-local-{fw}"), boot_timeout=args.timeout,
                             boot_order="c", firmware=fw,
                             qemu_args=_local_disk_args(image, fw))
            vms.append(local)
            results[("local", fw)] = []
            for i in range(args.runs):
                t = timed_boot(local, args.timeout)
                results[("local", fw)].append(t)
                print(f"(a) local  {fw:4} run {i + 1}: {t:6.2f} s", flush=True)

            node = f"bench-{fw}"
            initiator = f"iqn.2017-10.org.moc.bmi.node:{node}"
            target = f"iqn.2017-10.org.moc.bmi:bench-{fw}"
            disk = os.path.join(work, f"bench-disk-{fw}.img")
            shutil.copyfile(image, disk)
            tgtd.add_target(tid, target, disk, initiator)
            net.fixed_address(NODE_MACS[fw], node, 20 + tid)
            net.write_boot_files(node, NODE_MACS[fw], target, initiator)
            remote = QemuNode(node, NODE_MACS[fw], netns=net.netns, bridge=net.bridge,
                              console_log=os.path.join(work, f"iscsi-{fw}-console.log"),
                              workdir=os.path.join(work, f"vm-iscsi-{fw}"), boot_timeout=args.timeout, firmware=fw)
            vms.append(remote)
            results[("iscsi", fw)] = []
            for i in range(args.runs):
                t = timed_boot(remote, args.timeout)
                results[("iscsi", fw)].append(t)
                print(f"(b) iSCSI  {fw:4} run {i + 1}: {t:6.2f} s", flush=True)
    finally:
        for vm in vms:
            vm.stop()
        if tgtd is not None:
            tgtd.stop()
        net.down()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmedian seconds to BMI-BOOT-OK over {args.runs} runs each")
    print(f"{'':34}" + "".join(f"{fw.upper():>10}" for fw in firmwares))
    print(f"{'(a) local disk':34}" + "".join(f"{med[('local', fw)]:10.2f}" for fw in firmwares))
    print(f"{'(b) network boot -> iPXE -> iSCSI':34}" + "".join(f"{med[('iscsi', fw)]:10.2f}" for fw in firmwares))
    print(f"{'ratio (b)/(a)':34}" + "".join(f"{med[('iscsi', fw)] / med[('local', fw)]:10.2f}" for fw in firmwares))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

    .venv/bin/python benchmarks/boot_time.py --image debian [--runs N] [--modes tftp,tftp-ipxe,http]
                                             [--pxelinux-timeout T] [--memory MB] [--console-dir DIR]
                                             [--nic e1000|virtio] [--local-disk ide|virtio]

``--image debian`` boots a real distribution instead: Debian 12 (systemd, open-iscsi's initramfs with
ISCSI_AUTO logging in from the iBFT, root filesystem on the LUN; ``scripts/build-debian-image``,
cached in build/debian12.img), BIOS only, timed from qemu's start to the ``BMI-DEBIAN-UP`` line its
bmi-up.service writes when systemd reaches multi-user.target. (a) is the same image as a local IDE
disk; (b) is network boot with the boot files BMI renders (ims.einstein.boot.BootFiles, so the
PXELINUX wait and the iPXE script are exactly BMI's) and the LUN parameters BMI sets, in TFTP mode
(pxelinux.0 -> ipxe.lkrn -> the node script), ``tftp-ipxe`` (the same files, the boot network sending
iPXE ROMs straight to by-mac/<mac>.ipxe: scripts/bootnet BOOTNET_IPXE_DIRECT=1) and HTTP mode (the
ROM's iPXE -> static boot.ipxe -> GET /boot/<mac> from a small HTTP server on the boot network, as
Picasso's [boot_http] serves it). The modes alternate within each run (local, tftp, http, local, ...)
so load from elsewhere on a shared box hits them alike; medians and minima are printed. Each boot is
split into phases read off the console (first line of the disk's syslinux, kernel start = marker
time - guest uptime, the initramfs' iSCSI login, up); ``--console-dir`` keeps every console with its
lines stamped. ``--pxelinux-timeout 30`` renders the original 3 s PXELINUX wait, to measure what it
cost. ``--nic`` picks the node's NIC (e1000, the default, or virtio-net; each with qemu's iPXE ROM) and
``--local-disk`` the local disk's controller for (a) (IDE, the default, or virtio-blk): under TCG an
emulated device's cost per request is part of what is measured, so compare like with like.
``--debian-image`` and ``--linger-until`` are for debugging with an instrumented copy.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hilsim.vm import FIRMWARES, QemuNode
from ims.common.process import execute
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi.tgt import WRITE_CACHE_OFF
from ims.einstein.iscsi.tgt_conf import LUN_LBPPBE
from tests.support.bootnet import BootNet, BootTgtd, build_test_image
from tests.support.procs import sigterm_unwinds

DEBIAN_IMAGE = os.path.join(REPO, "build", "debian12.img")
DEBIAN_MARKER = r"BMI-DEBIAN-UP "
HTTP_BOOT_PORT = 8089
# Network boot modes: BMI's TFTP mode (PXELINUX -> ipxe.lkrn), the same files with the boot network
# sending iPXE ROMs straight to by-mac/<mac>.ipxe (scripts/bootnet BOOTNET_IPXE_DIRECT=1), HTTP mode.
DEBIAN_MODES = ("tftp", "tftp-ipxe", "http")

# --nic: the node's NIC, in every mode (the local VM has the same one, unused). qemu gives each its
# iPXE ROM (pxe-e1000.rom, efi-virtio.rom), so the boot path is the same either way. Under TCG the
# emulated e1000 costs guest and host CPU per packet (register accesses, one frame per 1500 bytes),
# virtio-net per batch with segmentation offloads; docs/performance.md "Boot time" compares both.
NIC_MODELS = {"e1000": "e1000", "virtio": "virtio-net-pci"}

NODE_MACS = {"bios": "52:54:00:be:0c:01", "uefi": "52:54:00:be:0c:11"}
LOCAL_MACS = {"bios": "52:54:00:be:0c:02", "uefi": "52:54:00:be:0c:12"}


def _local_disk_args(image: str, firmware: str, disk: str = "ide") -> list[str]:
    """The image as the VM's local disk, never written (snapshot=on): IDE, or virtio-blk."""
    path = image.replace(",", ",,")
    if firmware == "bios" and disk == "ide":
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


class _ConsoleClock:
    """Stamps each console line with the time (seconds since qemu's start) it first appeared.

    qemu's serial file has no timestamps; polling it every 50 ms is precise enough to tell the
    phases of a 20-60 s boot apart (firmware + network loaders, syslinux loading the kernel and
    initrd, the initramfs' iSCSI login, systemd).
    """

    def __init__(self, vm: QemuNode) -> None:
        self.vm = vm
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            self._poll(seen)
            seen = len(self.lines)
            time.sleep(0.05)

    def _poll(self, seen: int) -> None:
        now = time.monotonic() - (self.vm.started_at or 0.0)
        text = self.vm.console_text()
        # Complete lines only (a line still being written is stamped when its newline arrives).
        complete = text.split("\n")[:-1]
        for line in complete[seen:]:
            self.lines.append((now, line.strip("\r")))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll(len(self.lines))

    def first(self, pattern: str) -> float | None:
        regex = re.compile(pattern)
        return next((t for t, line in self.lines if regex.search(line)), None)


# Phases read off the console: (name, regex of the line that ends it).
PHASE_MARKS = (
    ("syslinux", r"SYSLINUX|Loading vmlinuz|Loading initrd"),  # the disk's own loader is running
    ("iscsi-login", r"iscsistart: Logging into"),             # the initramfs logs in from the iBFT
    ("up", DEBIAN_MARKER),
)
# Printed in boot order; "kernel" comes from the marker line (see timed_debian_boot).
PHASE_NAMES = ("syslinux", "kernel", "iscsi-login", "up")


def timed_debian_boot(vm: QemuNode, timeout: float, linger_until: str | None = None
                      ) -> tuple[float, dict[str, float | None], list[str]]:
    """Power the VM on; (seconds to the marker, phase times, stamped console); then power it off.

    Phase times, all seconds since qemu's start: ``syslinux`` (first line of the disk's loader),
    ``kernel`` (the marker's time minus the guest's uptime it reports; the kernel's decompression
    counts before it), ``iscsi-login`` (network modes) and ``up``.
    """
    vm.power_cycle()
    clock = _ConsoleClock(vm)
    try:
        line = vm.wait_for_console(DEBIAN_MARKER, timeout=timeout)
        elapsed = time.monotonic() - (vm.started_at or 0.0)
        if linger_until:
            # Debugging: keep the VM up until it printed what it reports after the boot.
            try:
                vm.wait_for_console(linger_until, timeout=timeout)
            except TimeoutError as exc:
                print(f"--linger-until: {exc}", flush=True)
    finally:
        clock.stop()
        vm.power_off()
    phases: dict[str, float | None] = {name: clock.first(rx) for name, rx in PHASE_MARKS}
    phases["up"] = elapsed
    uptime = re.search(r"uptime=([0-9.]+)", line)
    phases["kernel"] = elapsed - float(uptime.group(1)) if uptime else None
    stamped = [f"{t:7.2f} {text}" for t, text in clock.lines]
    return elapsed, phases, stamped


class _DebianBed:
    """One boot mode's VM and what it needs: a boot network, and for network modes tgtd + files."""

    def __init__(self, mode: str, image: str, work: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.tgtd: BootTgtd | None = None
        self.http: _HttpBootServer | None = None
        self.vm: QemuNode | None = None
        env = {"http": {"BOOTNET_HTTP_BOOT_PORT": str(HTTP_BOOT_PORT)},
               "tftp-ipxe": {"BOOTNET_IPXE_DIRECT": "1"}}.get(mode)
        self.net = BootNet.up(os.path.join(work, f"net-{mode}"), extra_env=env)
        try:
            self._setup(image, work, args)
        except BaseException:
            self.stop()
            raise

    def _setup(self, image: str, work: str, args: argparse.Namespace) -> None:
        mode, net = self.mode, self.net
        mac = "52:54:00:de:b1:" + {"local": "01", "tftp": "02", "http": "03", "tftp-ipxe": "04"}[mode]
        node = f"debian-{mode}"
        common = {"netns": net.netns, "bridge": net.bridge, "boot_timeout": args.timeout, "firmware": "bios",
                  "console_log": os.path.join(work, f"{node}-console.log"), "memory_mb": args.memory,
                  "workdir": os.path.join(work, f"vm-{node}"), "nic_model": NIC_MODELS[args.nic]}
        if mode == "local":
            self.vm = QemuNode(node, mac, boot_order="c", qemu_args=_local_disk_args(image, "bios", args.local_disk),
                               **common)
            return
        self.tgtd = BootTgtd(net.netns, net.ip, work)
        initiator = f"iqn.2017-10.org.moc.bmi.node:{node}"
        target = f"iqn.2017-10.org.moc.bmi:{node}"
        disk = os.path.join(work, f"{node}.img")
        shutil.copyfile(image, disk)
        self.tgtd.add_target(1, target, disk, initiator)
        # What BMI sets on every LUN: write cache off, and the physical block size a disk reports
        # (a file backing reports 4 KiB already; rbd would say 4 MiB).
        self.tgtd.tgtadm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                         "--params", f"{WRITE_CACHE_OFF},lbppbe={LUN_LBPPBE}")
        net.fixed_address(mac, node, 30)
        boot = BootFiles(os.path.join(net.tftp_root, "pxelinux.cfg"), net.tftp_root, net.ip,
                         pxelinux_timeout=args.pxelinux_timeout)
        if mode in ("tftp", "tftp-ipxe"):
            boot.write(node, mac, "debian12", target, initiator)
        else:
            self.http = _HttpBootServer(net, os.path.join(work, "http"))
            self.http.publish(mac, boot.render_ipxe(target, initiator))
        self.vm = QemuNode(node, mac, **common)

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.stop()
        if self.http is not None:
            self.http.stop()
        if self.tgtd is not None:
            self.tgtd.stop()
        self.net.down()


def run_debian(args: argparse.Namespace) -> int:
    """Debian 12: local disk vs. BMI's network boot over iSCSI, per boot mode (BIOS).

    The modes alternate within each run (local, tftp, http, local, ...): on a shared box a burst
    of load from elsewhere then hits every mode alike instead of one mode's whole series.
    """
    image = args.debian_image or build_debian_image()
    modes = ["local", *[m.strip() for m in args.modes.split(",") if m.strip()]]
    work = tempfile.mkdtemp(prefix="bmi-bench-debian-")
    results: dict[str, list[float]] = {m: [] for m in modes}
    phases: dict[str, list[dict[str, float | None]]] = {m: [] for m in modes}
    beds: list[_DebianBed] = []
    try:
        for mode in modes:
            beds.append(_DebianBed(mode, image, work, args))
        for i in range(args.runs):
            for bed in beds:
                assert bed.vm is not None
                try:
                    t, ph, stamped = timed_debian_boot(bed.vm, args.timeout, args.linger_until)
                except Exception:
                    print(f"{bed.mode}: boot failed; console tail:\n{bed.vm.console_tail()}", flush=True)
                    raise
                results[bed.mode].append(t)
                phases[bed.mode].append(ph)
                print(f"debian {bed.mode:9} run {i + 1}: {t:6.2f} s  ({_phase_text(ph)})", flush=True)
                if args.console_dir:
                    os.makedirs(args.console_dir, exist_ok=True)
                    with open(os.path.join(args.console_dir, f"{bed.mode}-run{i + 1}.log"), "w",
                              encoding="utf-8") as f:
                        f.write("\n".join(stamped) + "\n")
    finally:
        for bed in beds:
            bed.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    low = {k: min(v) for k, v in results.items()}
    print(f"\nDebian 12, BIOS: seconds to BMI-DEBIAN-UP over {args.runs} run(s) each, modes interleaved "
          f"(pxelinux_timeout {args.pxelinux_timeout}, {args.memory or 'default'} MiB, NIC {args.nic}, "
          f"local disk {args.local_disk})")
    # Medians and minima: on a shared box under TCG the minimum is the least disturbed boot.
    print(f"{'':40}{'median':>10}{'min':>10}{'ratio med':>11}{'ratio min':>11}")
    print(f"{'(a) local disk':40}{med['local']:10.2f}{low['local']:10.2f}")
    for mode in modes[1:]:
        print(f"{'(b) ' + mode + ' -> iPXE -> iSCSI':40}{med[mode]:10.2f}{low[mode]:10.2f}"
              f"{med[mode] / med['local']:11.3f}{low[mode] / low['local']:11.3f}")
    print("\nmedian phase ends (s since qemu start): " + ", ".join(PHASE_NAMES))
    for mode in modes:
        cells = []
        for name in PHASE_NAMES:
            values = [p[name] for p in phases[mode] if p.get(name) is not None]
            cells.append(f"{statistics.median(values):8.2f}" if values else f"{'-':>8}")
        print(f"{mode:10}" + "".join(cells))
    return 0



def _phase_text(ph: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {ph[name]:.2f}" for name in PHASE_NAMES if ph.get(name) is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per mode and firmware (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-boot timeout in seconds")
    parser.add_argument("--firmware", default="bios,uefi", help="comma-separated: bios, uefi (default both)")
    parser.add_argument("--image", choices=("test", "debian"), default="test",
                        help="test: the busybox test image (default); debian: Debian 12 (BIOS)")
    parser.add_argument("--modes", default="tftp,http",
                        help=f"--image debian: boot modes, a subset of {', '.join(DEBIAN_MODES)} (default tftp,http)")
    parser.add_argument("--pxelinux-timeout", type=int, default=0,
                        help="--image debian: [tftp] pxelinux_timeout to render (tenths of a second; default 0)")
    parser.add_argument("--debian-image", default=None,
                        help="--image debian: boot this raw image instead of build/debian12.img (e.g. a debug copy)")
    parser.add_argument("--linger-until", default=None,
                        help="--image debian, debugging: after the marker, keep the VM up until a console line "
                             "matches this regex (e.g. an analysis a debug image prints), then power it off")
    parser.add_argument("--console-dir", default=None,
                        help="--image debian: write each boot's console, lines stamped with seconds since qemu's start")
    parser.add_argument("--nic", choices=sorted(NIC_MODELS), default="e1000",
                        help="--image debian: the node's NIC model (default e1000)")
    parser.add_argument("--local-disk", choices=("ide", "virtio"), default="ide",
                        help="--image debian: the local disk's controller for (a) (default ide)")
    parser.add_argument("--memory", type=int, default=None, help="guest MiB (default: $BMI_VM_MEMORY or 1024)")
    args = parser.parse_args(argv)
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still runs the teardown
    if args.image == "debian":
        if any(m not in DEBIAN_MODES for m in args.modes.split(",")):
            parser.error(f"--modes: a comma-separated subset of {', '.join(DEBIAN_MODES)}")
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

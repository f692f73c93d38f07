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
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from ims.hilsim.vm import FIRMWARES, QemuNode
from tests.support.bootnet import BootNet, BootTgtd, build_test_image

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="boots per mode and firmware (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-boot timeout in seconds")
    parser.add_argument("--firmware", default="bios,uefi", help="comma-separated: bios, uefi (default both)")
    args = parser.parse_args(argv)
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

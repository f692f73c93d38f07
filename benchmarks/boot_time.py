"""Boot-time benchmark: local disk vs. PXE -> iPXE -> iSCSI, same test image.

    .venv/bin/python benchmarks/boot_time.py [--runs N] [--timeout S]

(a) local: qemu boots build/bmi-test.img as an IDE disk (``snapshot=on``, so it stays pristine);
(b) network: a diskless VM PXE-boots on a private boot network (scripts/bootnet) and sanboots a copy
    of the image exported by tgtd (LUN 1), exactly the chain tests/e2e/test_netboot_smoke.py checks.
Each run is timed from qemu's start to the ``BMI-BOOT-OK`` console line. Prints each run, the
medians and the ratio (b)/(a). No thresholds. Runs are sequential (TCG on a small box). Needs root.
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

from ims.hilsim.vm import QemuNode
from tests.support.bootnet import BootNet, BootTgtd, build_test_image

MAC = "52:54:00:be:0c:01"
NODE = "bench1"
INITIATOR = f"iqn.2017-10.org.moc.bmi.node:{NODE}"
TARGET = "iqn.2017-10.org.moc.bmi:bench-node1"


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
    parser.add_argument("--runs", type=int, default=3, help="boots per mode (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-boot timeout in seconds")
    args = parser.parse_args(argv)

    image = build_test_image()
    work = tempfile.mkdtemp(prefix="bmi-bench-")
    net = BootNet.up(os.path.join(work, "net"))
    tgtd: BootTgtd | None = None
    vms: list[QemuNode] = []
    results: dict[str, list[float]] = {"local": [], "iscsi": []}
    try:
        local = QemuNode("bench-local", "52:54:00:be:0c:02", netns=net.netns, bridge=net.bridge,
                         console_log=os.path.join(work, "local-console.log"), workdir=os.path.join(work, "vm-local"),
                         boot_timeout=args.timeout, boot_order="c",
                         qemu_args=["-drive", f"file={image.replace(',', ',,')},format=raw,if=ide,snapshot=on"])
        vms.append(local)
        for i in range(args.runs):
            t = timed_boot(local, args.timeout)
            results["local"].append(t)
            print(f"(a) local  run {i + 1}: {t:6.2f} s", flush=True)

        disk = os.path.join(work, "bench-disk.img")
        shutil.copyfile(image, disk)
        tgtd = BootTgtd(net.netns, net.ip, work)
        tgtd.add_target(1, TARGET, disk, INITIATOR)
        net.fixed_address(MAC, NODE, 20)
        net.write_boot_files(NODE, MAC, TARGET, INITIATOR)
        remote = QemuNode(NODE, MAC, netns=net.netns, bridge=net.bridge,
                          console_log=os.path.join(work, "iscsi-console.log"), workdir=os.path.join(work, "vm-iscsi"),
                          boot_timeout=args.timeout)
        vms.append(remote)
        for i in range(args.runs):
            t = timed_boot(remote, args.timeout)
            results["iscsi"].append(t)
            print(f"(b) iSCSI  run {i + 1}: {t:6.2f} s", flush=True)
    finally:
        for vm in vms:
            vm.stop()
        if tgtd is not None:
            tgtd.stop()
        net.down()
        shutil.rmtree(work, ignore_errors=True)

    med_a = statistics.median(results["local"])
    med_b = statistics.median(results["iscsi"])
    print(f"median (a) local disk           : {med_a:6.2f} s  over {len(results['local'])} runs")
    print(f"median (b) PXE->iPXE->iSCSI      : {med_b:6.2f} s  over {len(results['iscsi'])} runs")
    print(f"ratio (b)/(a)                    : {med_b / med_a:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

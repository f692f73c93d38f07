"""Smoke test of the boot machinery, without BMI's own operations.

A diskless qemu VM PXE-boots on the private boot network: PXELINUX reads pxelinux.cfg/01-<mac>,
loads ipxe.lkrn with node1.ipxe (BMI's format), iPXE sanboots LUN 1 of a tgt target (a copy of the
test image, restricted to node1's initiator name), the image's initramfs logs in to the same disk
with iscsistart from the iBFT and writes a marker to partition 2. A second boot must see it, and the
image file must hold it afterwards.
"""
from __future__ import annotations

import os
import re
import shutil

from hilsim.vm import QemuNode
from ims.common.process import execute
from tests.support.bootnet import DATA_PART_OFFSET, BootNet, BootTgtd

MAC = "52:54:00:b0:07:01"
NODE = "node1"
INITIATOR = f"iqn.2017-10.org.moc.bmi.node:{NODE}"
TARGET = "iqn.2017-10.org.moc.bmi:smoke-node1"
BOOT_TIMEOUT = 300.0


def _boot_and_expect(vm: QemuNode, shots: str, expect: list[str]) -> list[str]:
    vm.power_cycle()
    lines = []
    try:
        for pattern in expect:
            lines.append(vm.wait_for_console(pattern, timeout=BOOT_TIMEOUT))
        assert vm.wait_exit(60), f"VM did not power off by itself; console:\n{vm.console_tail()}"
    except BaseException:
        if vm.is_running():
            vm.screendump(os.path.join(shots, "failure.png"))
        raise
    error = re.search(r"BMI-ERROR.*", vm.console_text())
    assert error is None, f"image reported {error.group(0)}"
    return lines


def _node_on_bootnet(test_image: str, bootnet: BootNet, boot_tgtd: BootTgtd, tmp_path, *, node: str, mac: str,
                     tid: int, target: str, host: int, **vm_extra: str) -> tuple[QemuNode, str]:
    """A copy of the test image exported as ``target`` (LUN 1 of ``tid``) for ``node``'s initiator name,
    ``node``'s fixed address and boot files, and its diskless BIOS VM; returns (VM, the copy's path)."""
    initiator = f"iqn.2017-10.org.moc.bmi.node:{node}"
    disk = str(tmp_path / f"{node}-disk.img")
    shutil.copyfile(test_image, disk)
    boot_tgtd.add_target(tid, target, disk, initiator)
    bootnet.fixed_address(mac, node, host)
    bootnet.write_boot_files(node, mac, target, initiator)
    vm = QemuNode(node, mac, netns=bootnet.netns, bridge=bootnet.bridge,
                  console_log=str(tmp_path / "console.log"), workdir=str(tmp_path / "vm"),
                  boot_timeout=BOOT_TIMEOUT, firmware="bios", **vm_extra)
    return vm, disk


def test_pxe_ipxe_iscsi_boot_and_marker_persists(test_image: str, bootnet: BootNet, boot_tgtd: BootTgtd,
                                                  tmp_path) -> None:
    vm, disk = _node_on_bootnet(test_image, bootnet, boot_tgtd, tmp_path, node=NODE, mac=MAC, tid=1,
                                target=TARGET, host=10)
    assert TARGET in boot_tgtd.show()
    try:
        first = _boot_and_expect(vm, str(tmp_path), [
            r"BMI-BOOT-OK ", r"BMI-PREVIOUS-MARKER ", r"BMI-MARKER-WRITTEN "])
        assert first[0].strip() == f"BMI-BOOT-OK target={TARGET} initiator={INITIATOR}", first[0]
        assert first[1].strip() == "BMI-PREVIOUS-MARKER none", first[1]
        assert first[2].strip() == f"BMI-MARKER-WRITTEN {NODE}", first[2]

        second = _boot_and_expect(vm, str(tmp_path), [r"BMI-BOOT-OK ", r"BMI-PREVIOUS-MARKER "])
        assert second[0].strip() == f"BMI-BOOT-OK target={TARGET} initiator={INITIATOR}", second[0]
        assert second[1].strip() == f"BMI-PREVIOUS-MARKER written-by={NODE}", second[1]
        # The first console was kept as .1 and is the first boot's.
        with open(vm.console_log + ".1", encoding="utf-8", errors="replace") as f:
            assert "BMI-PREVIOUS-MARKER none" in f.read()
    finally:
        vm.stop()
        boot_tgtd.delete_target(1)
    assert not vm.is_running()

    # The write went through iSCSI into the exported file.
    out, _ = execute("mtype", "-i", f"{disk}@@{DATA_PART_OFFSET}", "::marker.txt")
    assert out.strip() == f"written-by={NODE}"
    # The pristine image is untouched.
    out, _ = execute("mdir", "-b", "-i", f"{test_image}@@{DATA_PART_OFFSET}", "::", check_exit_code=(0, 1))
    assert "MARKER" not in out.upper()
    # dnsmasq served the chain over TFTP.
    with open(os.path.join(bootnet.dir, "dnsmasq.log"), encoding="utf-8", errors="replace") as f:
        log = f.read()
    for name in ("pxelinux.0", "ipxe.lkrn", f"{NODE}.ipxe"):
        assert name in log, f"dnsmasq never sent {name}"


def test_bios_node_with_virtio_nic_boots_over_iscsi(test_image: str, bootnet: BootNet, boot_tgtd: BootTgtd,
                                                    tmp_path) -> None:
    """A BIOS node whose NIC is virtio-net (qemu's efi-virtio.rom iPXE, not the e1000's) takes the same
    chain: benchmarks/boot_time.py --nic virtio relies on it, and the image's initramfs must then
    find the iBFT's NIC through virtio_net."""
    node, target = "node2", "iqn.2017-10.org.moc.bmi:smoke-node2"
    initiator = f"iqn.2017-10.org.moc.bmi.node:{node}"
    vm, disk = _node_on_bootnet(test_image, bootnet, boot_tgtd, tmp_path, node=node, mac="52:54:00:b0:07:02",
                                tid=2, target=target, host=12,  # host 11: test_multipath_boot's node
                                nic_model="virtio-net-pci")
    try:
        assert "virtio-net-pci,netdev=n0" in " ".join(vm._qemu_argv())
        lines = _boot_and_expect(vm, str(tmp_path), [r"BMI-BOOT-OK ", r"BMI-MARKER-WRITTEN "])
        assert lines[0].strip() == f"BMI-BOOT-OK target={target} initiator={initiator}", lines[0]
        assert lines[1].strip() == f"BMI-MARKER-WRITTEN {node}", lines[1]
    finally:
        vm.stop()
        boot_tgtd.delete_target(2)
    out, _ = execute("mtype", "-i", f"{disk}@@{DATA_PART_OFFSET}", "::marker.txt")
    assert out.strip() == f"written-by={node}"

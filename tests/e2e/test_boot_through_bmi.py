"""A node really boots from its clone, provisioned by BMI, and snapshots carry a node's writes.

The stack runs with its boot network (`scripts/bmi-stack up --boot`): dnsmasq (DHCP+TFTP) and tgtd on a
private bridge in a network namespace, HIL nodes backed by qemu VMs (TCG, no local disk). The flow is the
operator's: `bmi pro` then a HIL power cycle; the test image's init reports the iSCSI target it booted from
(iBFT), logs in to its own disk like a diskless node's initramfs, prints the marker it finds on its data
partition, writes its own and powers off.

UEFI: the same flow with OVMF nodes (``BMI_VM_FIRMWARE=uefi`` for the stack's HIL simulator) booting
the GPT/EFI test image (``scripts/build-test-image --efi``): OVMF's own PXE client gets snponly.efi by
DHCP option 93, that iPXE gets the static efi-boot.ipxe, which chains to BMI's per-MAC copy of the
node's script; iPXE's UEFI sanboot runs the LUN's \\EFI\\BOOT\\BOOTX64.EFI. OVMF under TCG is slow, so
the suite runs ONE node pair in ONE boot mode (``BMI_E2E_UEFI_MODE``, default tftp; http also works).
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bootnet import build_test_image
from tests.support.stack import Stack, running_stack

BOOT_TIMEOUT = 300


def boot(stack: Stack, node: str) -> str:
    """Power-cycle ``node`` through HIL and return its serial console once the image is done."""
    log = stack.dir / "consoles" / f"{node}.log"
    assert stack.hil_post(f"/v0/node/{node}/power_cycle", {"force": True}) == 200
    deadline = time.monotonic() + BOOT_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "BMI-MARKER-WRITTEN" in text or "BMI-ERROR" in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{node} did not finish booting in {BOOT_TIMEOUT}s; console:\n{text[-3000:]}")


@contextlib.contextmanager
def vm_firmware(firmware: str) -> Iterator[None]:
    """BMI_VM_FIRMWARE for the stack started inside (its HIL simulator's VMs inherit it)."""
    saved = os.environ.get("BMI_VM_FIRMWARE")
    os.environ["BMI_VM_FIRMWARE"] = firmware
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BMI_VM_FIRMWARE", None)
        else:
            os.environ["BMI_VM_FIRMWARE"] = saved


@pytest.fixture(scope="module", params=["tftp", "http"])
def boot_stack(request) -> Iterator[Stack]:
    """tftp: BMI writes each node's PXELINUX + iPXE files; http: no per-node files, the nodes chain
    to BMI's GET /boot/<mac> through one static boot.ipxe."""
    with vm_firmware("bios"), running_stack(boot=True, http_boot=request.param == "http") as handle:
        handle.mode = request.param
        yield handle


@pytest.fixture(scope="module")
def uefi_stack() -> Iterator[Stack]:
    """A --boot stack whose qemu nodes run OVMF (the HIL simulator inherits BMI_VM_FIRMWARE)."""
    mode = os.environ.get("BMI_E2E_UEFI_MODE", "tftp")
    assert mode in ("tftp", "http"), f"BMI_E2E_UEFI_MODE must be tftp or http, not {mode!r}"
    with vm_firmware("uefi"), running_stack(boot=True, http_boot=mode == "http") as handle:
        handle.mode = mode
        yield handle


def per_node_files(tftp: Path) -> list[str]:
    """The boot files BMI wrote into the TFTP root (the boot network's static ones left out)."""
    static = {"boot.ipxe", "efi-boot.ipxe"}
    return sorted(str(p.relative_to(tftp)) for p in [*tftp.rglob("*.ipxe"), *(tftp / "pxelinux.cfg").glob("01-*")]
                  if p.name not in static)


def marker_line(console: str, tag: str) -> str:
    match = re.search(rf"^{tag} .*$", console, re.M)
    assert match, f"no {tag} line on the console:\n{console[-3000:]}"
    return match.group(0).strip()


def test_nodes_boot_their_clones_and_snapshots_carry_writes(boot_stack: Stack) -> None:
    s = boot_stack
    image = build_test_image()
    s.rbd("import", "--no-progress", "--image-format", "2", image, "bmi-boot-image")
    assert s.bmi("import", "bmi_infra", "bmi-boot-image").stdout.strip() == "Success"

    # node1: provisioned from the golden image, then power-cycled by HIL
    assert s.bmi("pro", "bmi_infra", "bmi_node", "bmi-boot-image", "bmi_network", "bmi_port").stdout == "Success\n"
    rows = {r[1]: r for r in _rows(s.bmi("--json", "db", "ls").stdout)}
    tftp = Path(s.env["BOOTNET_TFTP_ROOT"])
    assert per_node_files(tftp) == ([] if s.mode == "http" else [
        "bmi_node.ipxe", "by-mac/52-54-00-00-00-01.ipxe", "pxelinux.cfg/01-52-54-00-00-00-01"])
    node1_target = next(t for t in s.targets() if t.endswith(rows["bmi_node"][3]))
    # CHAP is on by default: the target wants the node's own secret, which only its boot script carries,
    # so this boot (iPXE's sanboot, then the image's iscsistart -b from the iBFT) logs in with CHAP
    assert rows["bmi_node"][3] in s.tgtadm("--op", "show", "--mode", "account").split()
    console = boot(s, "bmi_node")
    assert marker_line(console, "BMI-BOOT-OK") == \
        f"BMI-BOOT-OK target={node1_target} initiator=iqn.2017-10.org.moc.bmi.node:bmi_node"
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER none"
    assert marker_line(console, "BMI-MARKER-WRITTEN") == "BMI-MARKER-WRITTEN bmi_node"

    # the node powered itself off: snapshot its disk, provision node2 from the snapshot
    assert s.bmi("snap", "create", "bmi_infra", "bmi_node", "node1-snap").stdout.strip() == "Success"
    assert s.bmi("pro", "bmi_infra", "cisco-01", "node1-snap", "bmi_network", "enp130s0f0").stdout.strip() == "Success"
    console = boot(s, "cisco-01")
    assert "target=iqn.2017-10.org.moc.bmi:" in marker_line(console, "BMI-BOOT-OK")
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER written-by=bmi_node"

    # node3 from the original image: the golden image stayed pristine
    assert s.bmi("pro", "bmi_infra", "cisco-02", "bmi-boot-image", "bmi_network", "enp130s0f0").stdout == "Success\n"
    console = boot(s, "cisco-02")
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER none"

    # deprovision everything: nothing left in Ceph, tgt or the tftp root
    s.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    s.bmi("dpro", "bmi_infra", "cisco-01", "bmi_network", "enp130s0f0")
    s.bmi("dpro", "bmi_infra", "cisco-02", "bmi_network", "enp130s0f0")
    s.bmi("snap", "rm", "bmi_infra", "node1-snap")
    s.bmi("rm", "bmi_infra", "bmi-boot-image")
    assert s.targets() == []
    assert s.tgtadm("--op", "show", "--mode", "account").split() in ([], ["Account", "list:"])
    assert s.rbd("ls").split() == ["bmi-boot-image"]
    assert per_node_files(tftp) == []
    s.rbd("rm", "--no-progress", "bmi-boot-image")


def test_uefi_nodes_boot_their_clones_and_snapshots_carry_writes(uefi_stack: Stack) -> None:
    """One UEFI node pair: bmi_node boots the EFI image's clone and writes; cisco-01 boots its snapshot."""
    s = uefi_stack
    image = build_test_image(efi=True)
    s.rbd("import", "--no-progress", "--image-format", "2", image, "bmi-efi-image")
    assert s.bmi("import", "bmi_infra", "bmi-efi-image").stdout.strip() == "Success"

    assert s.bmi("pro", "bmi_infra", "bmi_node", "bmi-efi-image", "bmi_network", "bmi_port").stdout == "Success\n"
    rows = {r[1]: r for r in _rows(s.bmi("--json", "db", "ls").stdout)}
    tftp = Path(s.env["BOOTNET_TFTP_ROOT"])
    assert per_node_files(tftp) == ([] if s.mode == "http" else [
        "bmi_node.ipxe", "by-mac/52-54-00-00-00-01.ipxe", "pxelinux.cfg/01-52-54-00-00-00-01"])
    node1_target = next(t for t in s.targets() if t.endswith(rows["bmi_node"][3]))
    # CHAP is on by default: the target wants the node's own secret, which only its boot script carries,
    # so this boot (iPXE's sanboot, then the image's iscsistart -b from the iBFT) logs in with CHAP
    assert rows["bmi_node"][3] in s.tgtadm("--op", "show", "--mode", "account").split()
    console = boot(s, "bmi_node")
    assert marker_line(console, "BMI-BOOT-OK") == \
        f"BMI-BOOT-OK target={node1_target} initiator=iqn.2017-10.org.moc.bmi.node:bmi_node"
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER none"
    assert marker_line(console, "BMI-MARKER-WRITTEN") == "BMI-MARKER-WRITTEN bmi_node"
    # It really was the UEFI chain: OVMF's PXE client, the EFI loader picked by option 93, GRUB EFI.
    assert "UEFI PXEv4" in console and "Welcome to GRUB!" in console, console[-3000:]
    dnsmasq_log = (s.dir / "bootnet" / "dnsmasq.log").read_text(errors="replace")
    assert re.search(r"sent \S+/snponly\.efi to ", dnsmasq_log), "dnsmasq never sent snponly.efi"
    chained = r"sent \S+/by-mac/52-54-00-00-00-01\.ipxe to " if s.mode == "tftp" else r"sent \S+/boot\.ipxe to "
    assert re.search(chained, dnsmasq_log), f"dnsmasq log lacks {chained!r}"
    assert not re.search(r"sent \S+/pxelinux\.0 to ", dnsmasq_log), "a UEFI node was sent pxelinux.0"

    assert s.bmi("snap", "create", "bmi_infra", "bmi_node", "node1-efi-snap").stdout.strip() == "Success"
    assert s.bmi("pro", "bmi_infra", "cisco-01", "node1-efi-snap", "bmi_network",
                 "enp130s0f0").stdout.strip() == "Success"
    console = boot(s, "cisco-01")
    assert "target=iqn.2017-10.org.moc.bmi:" in marker_line(console, "BMI-BOOT-OK")
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER written-by=bmi_node"
    assert marker_line(console, "BMI-MARKER-WRITTEN") == "BMI-MARKER-WRITTEN cisco-01"

    s.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    s.bmi("dpro", "bmi_infra", "cisco-01", "bmi_network", "enp130s0f0")
    s.bmi("snap", "rm", "bmi_infra", "node1-efi-snap")
    s.bmi("rm", "bmi_infra", "bmi-efi-image")
    assert s.targets() == []
    assert per_node_files(tftp) == []
    s.rbd("rm", "--no-progress", "bmi-efi-image")


def _rows(text: str) -> list[list]:
    import json

    data = json.loads(text)
    rows = data.get("result", data) if isinstance(data, dict) else data
    return [[r[k] for k in ("id", "name", "project", "ceph", "public", "snapshot", "parent")]
            if isinstance(r, dict) else r for r in rows]

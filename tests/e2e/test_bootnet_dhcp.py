"""The boot network hands each client architecture its own loader (DHCP option 93), in both boot modes.

No VM: a DHCP client (a UDP socket on a veth joined to the boot bridge) asks the real dnsmasq that
scripts/bootnet configured, as a BIOS PXE ROM (93 = 0), an x86-64 UEFI firmware (7, 9), an ARM64 UEFI
firmware (11), and each again as iPXE (user class ``iPXE``). The full boots behind these answers are
tests/e2e/test_boot_through_bmi.py (BIOS and UEFI).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.bootnet import BootNet, dhcp_offer_filename

MAC = "52:54:00:d4:c9:01"


@pytest.fixture(scope="module")
def http_arm64_bootnet() -> Iterator[BootNet]:
    """HTTP boot mode, ipxe.efi for x86-64 UEFI and an ARM64 loader configured."""
    directory = tempfile.mkdtemp(prefix="bmi-bootnet-arm-")
    arm64 = os.path.join(directory, "arm64-ipxe.efi")
    with open(arm64, "wb") as f:
        f.write(b"MZ stand-in for an arm64 iPXE build\n")  # served, never run
    net = BootNet.up(os.path.join(directory, "net"), {"BOOTNET_HTTP_BOOT_PORT": "8080", "BOOTNET_ARM64_LOADER": arm64,
                                                      "BOOTNET_EFI_LOADER": "ipxe.efi"})
    try:
        yield net
    finally:
        net.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("arch, user_class, expected", [
    (0, "", "pxelinux.0"),          # BIOS PXE ROM: PXELINUX reads pxelinux.cfg/01-<mac>, as always
    (0, "iPXE", "pxelinux.0"),      # the BIOS chain's iPXE ROM too (TFTP mode is PXELINUX-driven)
    (7, "", "snponly.efi"),         # x86-64 UEFI firmware's own PXE client
    (9, "", "snponly.efi"),
    (7, "iPXE", "efi-boot.ipxe"),   # that iPXE: the static chain to by-mac/<mac>.ipxe
    (11, "", ""),                   # ARM64 UEFI without a configured loader: no file, not pxelinux.0
])
def test_tftp_mode_loader_by_architecture(bootnet: BootNet, arch: int, user_class: str, expected: str) -> None:
    assert dhcp_offer_filename(bootnet, MAC, arch, user_class) == expected


def test_tftp_mode_static_efi_script_chains_by_mac(bootnet: BootNet) -> None:
    with open(os.path.join(bootnet.tftp_root, "efi-boot.ipxe"), encoding="ascii") as f:
        assert f.read().splitlines()[-1] == "chain by-mac/${mac:hexhyp}.ipxe"
    assert os.path.isfile(os.path.join(bootnet.tftp_root, "snponly.efi"))


@pytest.mark.parametrize("arch, user_class, expected", [
    (0, "", "pxelinux.0"),          # -> pxelinux.cfg/default -> ipxe.lkrn + boot.ipxe
    (0, "iPXE", "boot.ipxe"),
    (7, "", "ipxe.efi"),            # BOOTNET_EFI_LOADER=ipxe.efi
    (7, "iPXE", "boot.ipxe"),       # one static script -> GET /boot/<mac> for BIOS and UEFI alike
    (11, "", "ipxe-arm64.efi"),     # BOOTNET_ARM64_LOADER
    (11, "iPXE", "boot.ipxe"),
])
def test_http_mode_with_arm64_loader(http_arm64_bootnet: BootNet, arch: int, user_class: str, expected: str) -> None:
    assert dhcp_offer_filename(http_arm64_bootnet, MAC, arch, user_class) == expected


def test_http_mode_serves_the_configured_loaders(http_arm64_bootnet: BootNet) -> None:
    root = http_arm64_bootnet.tftp_root
    assert os.path.isfile(os.path.join(root, "ipxe.efi"))
    with open(os.path.join(root, "ipxe-arm64.efi"), "rb") as f:
        assert f.read().startswith(b"MZ stand-in")
    assert not os.path.exists(os.path.join(root, "efi-boot.ipxe"))

"""scripts/bootnet BOOTNET_IPXE_DIRECT=1: in TFTP mode every iPXE client skips PXELINUX.

A BIOS node whose NIC ROM is iPXE (qemu's e1000, many flashed server ROMs) then gets the static
efi-boot.ipxe, which chains to the by-mac/<mac>.ipxe copy BMI writes for every node, instead of
pxelinux.0 -> pxelinux.cfg/01-<mac> -> ipxe.lkrn -> a second DHCP. Other BIOS PXE ROMs still get
pxelinux.0, and UEFI firmware still gets its iPXE loader first. Asked of the real dnsmasq, as in
tests/e2e/test_bootnet_dhcp.py; benchmarks/boot_time.py --image debian --modes tftp-ipxe boots it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.bootnet import BootNet, dhcp_offer_filename

MAC = "52:54:00:d4:c9:02"


@pytest.fixture(scope="module")
def direct_bootnet() -> Iterator[BootNet]:
    directory = tempfile.mkdtemp(prefix="bmi-bootnet-direct-")
    net = BootNet.up(os.path.join(directory, "net"), {"BOOTNET_IPXE_DIRECT": "1"})
    try:
        yield net
    finally:
        net.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("arch, user_class, expected", [
    (0, "", "pxelinux.0"),          # a plain BIOS PXE ROM: PXELINUX, as always
    (0, "iPXE", "efi-boot.ipxe"),   # a BIOS iPXE ROM: straight to by-mac/<mac>.ipxe
    (7, "", "snponly.efi"),         # x86-64 UEFI firmware's own PXE client: its iPXE loader first
    (7, "iPXE", "efi-boot.ipxe"),
    (11, "", ""),                   # ARM64 UEFI without a configured loader: nothing, not pxelinux.0
])
def test_ipxe_direct_loader_by_client(direct_bootnet: BootNet, arch: int, user_class: str, expected: str) -> None:
    assert dhcp_offer_filename(direct_bootnet, MAC, arch, user_class) == expected


def test_ipxe_direct_script_chains_to_the_per_mac_copy(direct_bootnet: BootNet) -> None:
    with open(os.path.join(direct_bootnet.tftp_root, "efi-boot.ipxe"), encoding="ascii") as f:
        lines = f.read().splitlines()
    # The ROM's iPXE has an address already: no second DHCP before the chain.
    assert lines[1] == "isset ${ip} || ifconf --configurator=dhcp"
    assert lines[-1] == "chain by-mac/${mac:hexhyp}.ipxe"

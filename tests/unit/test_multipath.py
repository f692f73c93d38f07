"""The multipath sanboot line (ims.einstein.multipath): what the node's iPXE script runs."""
from __future__ import annotations

import pytest

from ims.common.errors import InvalidInput
from ims.einstein.multipath import Portal, primary_and_secondary, san_uri, sanboot_line, sanboot_uris

IQN = "iqn.2026-01.org.bmi:node-07"


def test_two_gateways_primary_first():
    line = sanboot_line("10.0.0.1:3260", "10.0.0.2:3261", IQN, 1)
    assert line == (f"sanboot --keep iscsi:10.0.0.1:tcp:3260:1:{IQN} iscsi:10.0.0.2:tcp:3261:1:{IQN}")
    assert "\n" not in line


def test_one_gateway_is_the_single_path_line():
    assert sanboot_line(Portal("10.0.0.1"), None, IQN) == f"sanboot --keep iscsi:10.0.0.1:tcp:3260:1:{IQN}"
    assert sanboot_line("10.0.0.1", None, IQN, keep=False) == f"sanboot iscsi:10.0.0.1:tcp:3260:1:{IQN}"


def test_lun_is_hexadecimal_as_ipxe_reads_it():
    assert san_uri("10.0.0.1", IQN, 10) == f"iscsi:10.0.0.1:tcp:3260:a:{IQN}"
    assert san_uri("10.0.0.1", IQN, 1) == f"iscsi:10.0.0.1:tcp:3260:1:{IQN}"


@pytest.mark.parametrize("primary,secondary,iqn,lun", [
    ("10.0.0.1", "10.0.0.1:3260", IQN, 1),                 # the secondary IS the primary
    ("10.0.0.1\nshell", "10.0.0.2", IQN, 1),                # command injection through the address
    ("10.0.0.1", "10.0.0.2", IQN + "\nshell", 1),           # ... through the IQN
    ("10.0.0.1", "10.0.0.2", IQN + " x", 1),
    ("10.0.0.1", "10.0.0.2", IQN, 0),                       # LUN 0 is tgt's controller
    ("10.0.0.1", "10.0.0.2", IQN, True),
    ("10.0.0.1:0", "10.0.0.2", IQN, 1),
    ("10.0.0.1:99999", "10.0.0.2", IQN, 1),
    ("10.0.0.1:x", "10.0.0.2", IQN, 1),
    ("", "10.0.0.2", IQN, 1),
])
def test_bad_input_is_refused(primary, secondary, iqn, lun):
    with pytest.raises(InvalidInput):
        sanboot_line(primary, secondary, iqn, lun)


def test_uris_and_preference_list():
    assert len(sanboot_uris("10.0.0.1", "10.0.0.2", IQN)) == 2
    first, second = primary_and_secondary(["10.0.0.3:3260", "10.0.0.3", "10.0.0.1:3260", "10.0.0.2"])
    assert (first, second) == (Portal("10.0.0.3"), Portal("10.0.0.1"))
    assert primary_and_secondary(["10.0.0.3"]) == (Portal("10.0.0.3"), None)
    with pytest.raises(InvalidInput):
        primary_and_secondary([])


def test_single_path_line_is_the_one_boot_files_render_today(tmp_path):
    """With no secondary the line is byte-identical to ims/templates/ipxe.temp's sanboot line, so the
    template can take ``${sanboot_line}`` from :func:`sanboot_line` without changing one-host boots."""
    from ims.einstein.boot import BootFiles

    files = BootFiles(str(tmp_path / "pxelinux.cfg"), str(tmp_path), "10.20.0.1", iscsi_port=3261, lun=3)
    script = files.render_ipxe(IQN)
    rendered = next(x.strip() for x in script.splitlines() if x.strip().startswith("sanboot"))
    assert rendered == sanboot_line(Portal("10.20.0.1", 3261), None, IQN, 3)

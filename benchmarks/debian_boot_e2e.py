"""A real Debian 12 boots from a BMI clone (kept out of `make test`: building the image debootstraps
~650 MB from Debian's mirror).  Run it by hand: `.venv/bin/pytest -p no:cacheprovider benchmarks/debian_boot_e2e.py`.

A real distribution boots from its BMI clone: Debian 12 over iSCSI, BIOS, TFTP mode.

The image comes from ``scripts/build-debian-image`` (cached in build/debian12.img; the first build
needs root and the Debian mirror): systemd, Debian's kernel, an initramfs whose open-iscsi logs in
from the iBFT iPXE's sanboot leaves (ISCSI_AUTO) and mounts the root filesystem from the LUN. Its
bmi-up.service prints ``BMI-DEBIAN-UP <hostname>`` on the serial console once systemd reached
multi-user.target. The flow is the operator's: ``bmi import``, ``bmi pro``, a HIL power cycle.
One boot only (Debian under TCG takes about 45 s); benchmarks/boot_time.py --image debian times it.
"""
from __future__ import annotations

import os
import re
import time

from ims.common.process import execute
from tests.support.stack import Stack, running_stack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is one level down
DEBIAN_IMAGE = os.path.join(REPO, "build", "debian12.img")
BOOT_TIMEOUT = 300


def build_debian_image() -> str:
    execute(os.path.join(REPO, "scripts", "build-debian-image"), DEBIAN_IMAGE, timeout=3600)
    return DEBIAN_IMAGE


def wait_console(stack: Stack, node: str, pattern: str) -> str:
    log = stack.dir / "consoles" / f"{node}.log"
    deadline = time.monotonic() + BOOT_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{node}: no {pattern!r} on the console in {BOOT_TIMEOUT}s:\n{text[-3000:]}")


def test_debian_boots_from_its_clone_over_iscsi() -> None:
    image = build_debian_image()
    with running_stack(boot=True) as s:
        s.rbd("import", "--no-progress", "--image-format", "2", image, "bmi-debian")
        assert s.bmi("import", "bmi_infra", "bmi-debian").stdout.strip() == "Success"
        assert s.bmi("pro", "bmi_infra", "bmi_node", "bmi-debian", "bmi_network", "bmi_port").stdout == "Success\n"
        targets = s.targets()
        assert len(targets) == 1, targets
        target = targets[0]
        assert s.hil_post("/v0/node/bmi_node/power_cycle", {"force": True}) == 200
        # Not anchored: getty's login prompt may share the line ("bmi-debian login: BMI-DEBIAN-UP ...").
        console = wait_console(s, "bmi_node", r"BMI-DEBIAN-UP ")
        # The initramfs logged in to the node's own target (from the iBFT), and systemd came up on it.
        login = re.search(r"iscsistart: Logging into (\S+) ", console)
        assert login, console[-3000:]
        assert login.group(1) == target
        assert re.search(r"BMI-DEBIAN-UP bmi-debian uptime=[0-9.]+\s*$", console, re.M)
        assert s.hil_post("/v0/node/bmi_node/power_off", {}) == 200
        s.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
        s.bmi("rm", "bmi_infra", "bmi-debian")
        assert s.targets() == []
        s.rbd("rm", "--no-progress", "bmi-debian")

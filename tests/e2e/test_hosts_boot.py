"""``scripts/bmi-stack up --boot --hosts 2``: qemu nodes on the boot bridge boot through each host's portal.

Each host's tgtd runs in its own network namespace with its portal on its own address on the boot
network's bridge; the ring puts ``bmi_node`` on one host and ``cisco-01`` on the other (asserted, so a
change of the ring cannot make this test boot through one gateway only).  Both nodes are power-cycled
through HIL; each boots its clone through its own gateway's portal (the boot script names it, the
image reports the target it booted from) and writes its marker.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from ims.einstein.hosts import HashRing
from tests.support.bootnet import build_test_image
from tests.support.stack import Stack, running_stack

pytestmark = [pytest.mark.timeout(1200)]

BOOT_TIMEOUT = 400
NODES = {"bmi_node": "bmi_port", "cisco-01": "enp130s0f0"}


def consoles(stack: Stack, nodes: list[str]) -> dict[str, str]:
    """Each node's serial console once its image is done (marker written or an error reported)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    done: dict[str, str] = {}
    while time.monotonic() < deadline and len(done) < len(nodes):
        for node in nodes:
            log = stack.dir / "consoles" / f"{node}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            if "BMI-MARKER-WRITTEN" in text or "BMI-ERROR" in text:
                done[node] = text
        time.sleep(1)
    missing = sorted(set(nodes) - set(done))
    assert not missing, f"{missing} did not finish booting in {BOOT_TIMEOUT}s"
    return done


def test_nodes_boot_through_the_gateway_of_their_own_host() -> None:
    ring = HashRing(["host1", "host2"])
    assert {ring.get(n) for n in NODES} == {"host1", "host2"}, "pick nodes the ring spreads over both hosts"
    image = build_test_image()
    with running_stack(boot=True, hosts=2) as s:
        s.rbd("import", "--no-progress", "--image-format", "2", image, "hosts-boot-image")
        assert s.bmi("import", "bmi_infra", "hosts-boot-image").stdout.strip() == "Success"
        for node, nic in NODES.items():
            assert s.bmi("pro", "bmi_infra", node, "hosts-boot-image", "bmi_network", nic).stdout.strip() == "Success"
        tftp = Path(s.env["BOOTNET_TFTP_ROOT"])
        targets = {}
        for node in NODES:
            ip = s.env[f"BMI_{ring.get(node).upper()}_IP"]
            match = re.search(rf"iscsi:{re.escape(ip)}:tcp:\d+:1:(\S+)", (tftp / f"{node}.ipxe").read_text())
            assert match, f"{node}'s boot script does not name its gateway's portal {ip}"
            targets[node] = match.group(1)
        for node in NODES:
            assert s.hil_post(f"/v0/node/{node}/power_cycle", {"force": True}) == 200
        for node, text in consoles(s, list(NODES)).items():
            assert f"BMI-BOOT-OK target={targets[node]} initiator=iqn.2017-10.org.moc.bmi.node:{node}" in text, \
                text[-3000:]
            assert f"BMI-MARKER-WRITTEN {node}" in text

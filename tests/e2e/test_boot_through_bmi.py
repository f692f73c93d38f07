"""A node really boots from its clone, provisioned by BMI, and snapshots carry a node's writes.

The stack runs with its boot network (`scripts/bmi-stack up --boot`): dnsmasq (DHCP+TFTP) and tgtd on a
private bridge in a network namespace, HIL nodes backed by qemu VMs (TCG, no local disk). The flow is the
operator's: `bmi pro` then a HIL power cycle; the test image's init reports the iSCSI target it booted from
(iBFT), logs in to its own disk like a diskless node's initramfs, prints the marker it finds on its data
partition, writes its own and powers off.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bootnet import build_test_image

REPO = Path(__file__).resolve().parents[2]
BMI = str(REPO / ".venv" / "bin" / "bmi")
BOOT_TIMEOUT = 300


class BootStack:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = dict(os.environ)
        for line in (directory / "env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                self.env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
        # the boot stack lives inside its network namespace; so do its clients
        self.nsx = ["ip", "netns", "exec", self.env["BMI_NETNS"]]

    def bmi(self, *args: str) -> str:
        proc = subprocess.run([*self.nsx, BMI, *args], capture_output=True, text=True, env=self.env, timeout=300)
        assert proc.returncode == 0, f"bmi {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def rbd(self, *args: str) -> str:
        return subprocess.run([*self.nsx, "rbd", *args], capture_output=True, text=True, env=self.env, check=True,
                              timeout=300).stdout

    def hil_post(self, path: str, body: dict) -> int:
        """POST to HIL (inside the namespace) with the tenant's credentials; returns the status code."""
        code = ("import json, sys, requests\n"
                "r = requests.post(sys.argv[1], data=sys.argv[2], auth=(sys.argv[3], sys.argv[4]), timeout=60)\n"
                "print(r.status_code)\n")
        out = subprocess.run([*self.nsx, sys.executable, "-c", code, self.env["HIL_ENDPOINT"] + path,
                              json.dumps(body), self.env["HIL_USERNAME"], self.env["HIL_PASSWORD"]],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return int(out.strip())

    def console(self, node: str) -> Path:
        return self.dir / "consoles" / f"{node}.log"

    def boot(self, node: str) -> str:
        """Power-cycle ``node`` through HIL and return its serial console once the image powered off."""
        log = self.console(node)
        assert self.hil_post(f"/v0/node/{node}/power_cycle", {"force": True}) == 200
        deadline = time.monotonic() + BOOT_TIMEOUT
        text = ""
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "BMI-MARKER-WRITTEN" in text or "BMI-ERROR" in text:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{node} did not finish booting in {BOOT_TIMEOUT}s; console:\n{text[-3000:]}")

    def targets(self) -> list[str]:
        import configparser

        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(self.env["BMI_CONFIG"])
        out = subprocess.run(["tgtadm", "-C", cfg.get("iscsi", "control_port"), "--lld", "iscsi", "--op", "show",
                              "--mode", "target"], capture_output=True, text=True, check=True).stdout
        return re.findall(r"^Target \d+: (\S+)$", out, re.M)


@pytest.fixture(scope="module")
def boot_stack() -> Iterator[BootStack]:
    directory = Path(tempfile.mkdtemp(prefix="bmi-boot-stack-"))
    up = subprocess.run([str(REPO / "scripts" / "bmi-stack"), "up", "--boot", "--dir", str(directory)],
                        capture_output=True, text=True, timeout=600)
    try:
        if up.returncode != 0:
            pytest.fail(f"scripts/bmi-stack up --boot failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
        yield BootStack(directory)
    finally:
        subprocess.run([str(REPO / "scripts" / "bmi-stack"), "down", "--dir", str(directory)],
                       capture_output=True, timeout=300)
        left = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True).stdout
        assert left.strip() == "", f"processes of the boot stack survived `down`: {left}"


def marker_line(console: str, tag: str) -> str:
    match = re.search(rf"^{tag} .*$", console, re.M)
    assert match, f"no {tag} line on the console:\n{console[-3000:]}"
    return match.group(0).strip()


def test_nodes_boot_their_clones_and_snapshots_carry_writes(boot_stack: BootStack) -> None:
    s = boot_stack
    image = build_test_image()
    s.rbd("import", "--no-progress", "--image-format", "2", image, "bmi-boot-image")
    assert s.bmi("import", "bmi_infra", "bmi-boot-image").strip() == "Success"

    # node1: provisioned from the golden image, then power-cycled by HIL
    assert s.bmi("pro", "bmi_infra", "bmi_node", "bmi-boot-image", "bmi_network", "bmi_port").strip() == "Success"
    rows = {r[1]: r for r in _rows(s.bmi("--json", "db", "ls"))}
    node1_target = next(t for t in s.targets() if t.endswith(rows["bmi_node"][3]))
    console = s.boot("bmi_node")
    assert marker_line(console, "BMI-BOOT-OK") == \
        f"BMI-BOOT-OK target={node1_target} initiator=iqn.2017-10.org.moc.bmi.node:bmi_node"
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER none"
    assert marker_line(console, "BMI-MARKER-WRITTEN") == "BMI-MARKER-WRITTEN bmi_node"

    # the node powered itself off: snapshot its disk, provision node2 from the snapshot
    assert s.bmi("snap", "create", "bmi_infra", "bmi_node", "node1-snap").strip() == "Success"
    assert s.bmi("pro", "bmi_infra", "cisco-01", "node1-snap", "bmi_network", "enp130s0f0").strip() == "Success"
    console = s.boot("cisco-01")
    assert "target=iqn.2017-10.org.moc.bmi:" in marker_line(console, "BMI-BOOT-OK")
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER written-by=bmi_node"

    # node3 from the original image: the golden image stayed pristine
    assert s.bmi("pro", "bmi_infra", "cisco-02", "bmi-boot-image", "bmi_network", "enp130s0f0").strip() == "Success"
    console = s.boot("cisco-02")
    assert marker_line(console, "BMI-PREVIOUS-MARKER") == "BMI-PREVIOUS-MARKER none"

    # deprovision everything: nothing left in Ceph, tgt or the tftp root
    s.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    s.bmi("dpro", "bmi_infra", "cisco-01", "bmi_network", "enp130s0f0")
    s.bmi("dpro", "bmi_infra", "cisco-02", "bmi_network", "enp130s0f0")
    s.bmi("snap", "rm", "bmi_infra", "node1-snap")
    s.bmi("rm", "bmi_infra", "bmi-boot-image")
    assert s.targets() == []
    assert s.rbd("ls").split() == ["bmi-boot-image"]
    tftp = Path(s.env["BOOTNET_TFTP_ROOT"])
    assert list(tftp.glob("*.ipxe")) == [] and list((tftp / "pxelinux.cfg").glob("01-*")) == []
    s.rbd("rm", "--no-progress", "bmi-boot-image")


def _rows(text: str) -> list[list]:
    import json

    data = json.loads(text)
    rows = data.get("result", data) if isinstance(data, dict) else data
    return [[r[k] for k in ("id", "name", "project", "ceph", "public", "snapshot", "parent")]
            if isinstance(r, dict) else r for r in rows]

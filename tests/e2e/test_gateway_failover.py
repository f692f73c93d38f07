"""A node survives its gateway (issue 9.7): no acknowledged write is lost when its host dies.

The stack is a user's: ``scripts/bmi-stack up --boot --hosts 2`` (two BMI hosts, each its own
Einstein and tgtd with its own portal on the boot bridge; one Ceph, database, TFTP root, HIL
simulator with qemu nodes, Picasso).  The golden image is the test image with a ``wloop`` file in
its data partition, which switches its init into write-loop mode (scripts/build-test-image): it
writes numbered, checksummed records to its disk, each made durable (fsync through the iSCSI LUN)
before it prints ``BMI-ACK n``, and on boot prints ``BMI-LOG-MAX n``, the highest valid record it
finds.

The node is provisioned with the ``bmi`` CLI and power-cycled through HIL; it boots through the
gateway the hash ring chose (A) and runs its write loop.  Host A crashes: its Einstein (process
group) and its tgtd are SIGKILLed.  BMI's own take-over on the other host (B) fences A's Ceph client
of the clone, re-creates the node's target (same IQN) on B's tgtd and rewrites the node's boot
files to name B's portal (one URI: the two-URI line's open problem, docs/deployment.md).  The node
is then power-cycled through HIL, as a user would, boots from B, and its log must hold every
record it acknowledged before the reset: ``last ack <= BMI-LOG-MAX <= last ack + 1`` (the one write
in flight when A died may or may not have landed; nothing after it can have).  It then goes on
writing through B.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.bootnet import DATA_PART_OFFSET, build_test_image
from tests.support.stack import Stack, running_stack

pytestmark = [pytest.mark.timeout(2400)]

NODE, NIC = "cisco-01", "enp130s0f0"  # any inventory node; the test kills whichever host holds it
PROJECT, NET = "bmi_infra", "bmi_network"
IMAGE = "bmi-failover-image"
INITIATOR = f"iqn.2017-10.org.moc.bmi.node:{NODE}"
BOOT_TIMEOUT = 400.0
ACKS_BEFORE_KILL = 10
ACK_RE = re.compile(r"^BMI-ACK (\d+)\r?\n", re.M)


def console(stack: Stack) -> str:
    log = stack.dir / "consoles" / f"{NODE}.log"
    return log.read_text(errors="replace") if log.exists() else ""


def acks(text: str) -> list[int]:
    """The sequence numbers the node acknowledged (complete console lines only)."""
    return [int(n) for n in ACK_RE.findall(text)]


def wait_console(stack: Stack, what: str, check, timeout: float = BOOT_TIMEOUT):  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = console(stack)
        if "BMI-ERROR" in text:
            pytest.fail(f"{NODE} reported an error while waiting for {what}:\n{text[-3000:]}")
        found = check(text)
        if found is not None and found is not False:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; console:\n{text[-3000:]}")


def log_max(text: str) -> str | None:
    match = re.search(r"^BMI-LOG-MAX (\S+)\r?$", text, re.M)
    return match.group(1) if match else None


def tgt_env(d: Path, host: str) -> dict[str, str]:
    tgt_dir = d / ("tgt" if host == "host1" else f"tgt-{host}")
    env = {}
    for line in (tgt_dir / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key.strip()] = value.strip().strip('"')
    return env


def live_targets(d: Path, host: str) -> str:
    """``tgtadm --op show`` of ``host``'s tgtd ('' once it is dead)."""
    proc = subprocess.run(["tgtadm", "-C", tgt_env(d, host)["TGT_CONTROL_PORT"], "--lld", "iscsi", "--op", "show",
                           "--mode", "target"], capture_output=True, text=True, check=False, timeout=60)
    return proc.stdout if proc.returncode == 0 else ""


def wloop_image(tmp_path: Path) -> str:
    """The test image with the ``wloop`` switch in its data partition (no rebuild: a copy, one mcopy)."""
    path = tmp_path / "bmi-test-wloop.img"
    shutil.copyfile(build_test_image(), path)
    flag = tmp_path / "wloop"
    flag.write_text("write loop\n")
    subprocess.run(["mcopy", "-i", f"{path}@@{DATA_PART_OFFSET}", str(flag), "::wloop"], check=True,
                   capture_output=True, timeout=60)
    path.chmod(0o644)
    return str(path)


def kill_host(d: Path, host: str) -> None:
    """A host crash: SIGKILL its Einstein (the process group bmi-stack started) and its tgtd."""
    pid_file = d / "pids" / ("einstein.pid" if host == "host1" else f"einstein-{host}.pid")
    os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
    tgt_dir = d / ("tgt" if host == "host1" else f"tgt-{host}")
    tgtd = int((tgt_dir / "tgtd.pid").read_text().strip())
    os.kill(tgtd, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{tgtd}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{tgtd}/stat").read_text(errors="replace") if Path(f"/proc/{tgtd}").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            break
        time.sleep(0.1)


def test_node_keeps_every_acknowledged_write_when_its_gateway_host_dies(tmp_path: Path) -> None:
    image = wloop_image(tmp_path)
    with running_stack(boot=True, hosts=2) as s:
        d = s.dir
        s.rbd("import", "--no-progress", "--image-format", "2", image, IMAGE)
        assert s.bmi("import", PROJECT, IMAGE).stdout.strip() == "Success"
        assert s.bmi("pro", PROJECT, NODE, IMAGE, NET, NIC).stdout.strip() == "Success"

        holders = [h for h in ("host1", "host2") if re.search(r"^Target \d+: \S+$", live_targets(d, h), re.M)]
        assert len(holders) == 1, f"the node's target should be on exactly one gateway: {holders}"
        dead = holders[0]
        survivor = "host2" if dead == "host1" else "host1"
        iqn = re.search(r"^Target \d+: (\S+)$", live_targets(d, dead), re.M).group(1)
        dead_portal = tgt_env(d, dead)["TGT_PORTAL"].rpartition(":")[0]
        survivor_portal = tgt_env(d, survivor)["TGT_PORTAL"].rpartition(":")[0]
        tftp = Path(s.env["BOOTNET_TFTP_ROOT"])
        script = tftp / f"{NODE}.ipxe"
        assert f"iscsi:{dead_portal}:" in script.read_text()  # one URI, naming the gateway that exports it

        # Boot through gateway A and let the write loop acknowledge some records.
        assert s.hil_post(f"/v0/node/{NODE}/power_cycle", {"force": True}) == 200
        first = wait_console(s, "the first boot's BMI-LOG-MAX", log_max)
        assert first == "none", first  # a fresh clone: no record yet
        assert f"BMI-BOOT-OK target={iqn} initiator={INITIATOR}" in console(s)
        wait_console(s, f"{ACKS_BEFORE_KILL} acknowledged writes",
                     lambda text: len(acks(text)) >= ACKS_BEFORE_KILL)
        assert f"Initiator: {INITIATOR}" in live_targets(d, dead)  # the node's session is on A

        # Host A crashes in the middle of the write loop.
        acked_before_kill = max(acks(console(s)))
        kill_host(d, dead)
        killed_at = time.monotonic()

        # BMI's take-over: the same IQN live on B, the node's boot files name B's portal.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if re.search(rf"^Target \d+: {re.escape(iqn)}$", live_targets(d, survivor), re.M) and \
                    f"iscsi:{survivor_portal}:" in script.read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"{survivor} did not take the node over; its tgtd shows:\n{live_targets(d, survivor)}")
        took = time.monotonic() - killed_at
        by_mac = tftp / "by-mac" / "52-54-00-00-01-01.ipxe"
        for boot_file in (script, *([by_mac] if by_mac.exists() else [])):
            text = boot_file.read_text()
            assert f"iscsi:{survivor_portal}:" in text and f"iscsi:{dead_portal}:" not in text, boot_file
        survivor_log = (d / "logs" / ("" if survivor == "host1" else survivor) / "ims.log")
        fenced = survivor_log.read_text(errors="replace") if survivor_log.exists() else ""
        print(f"take-over of {dead} by {survivor}: {took:.1f} s; fence lines: "
              f"{[x for x in fenced.splitlines() if 'fenced' in x][-2:]}")
        clone = iqn.rpartition(":")[2]
        assert f"fenced 1 old client(s) of {clone} before exporting it here" in fenced  # A's librbd client

        # Everything the node acknowledged before the reset (a superset of what it acked before the kill).
        acked = max(acks(console(s)))
        assert acked >= acked_before_kill
        print(f"acked before the kill: {acked_before_kill}, before the reset: {acked}")

        # The user power-cycles the node: it boots from B and reads its log back.
        assert s.hil_post(f"/v0/node/{NODE}/power_cycle", {"force": True}) == 200
        found = wait_console(s, "BMI-LOG-MAX after booting from the survivor", log_max)
        assert f"BMI-BOOT-OK target={iqn} initiator={INITIATOR}" in console(s)
        assert found != "none", "the log is gone"
        print(f"BMI-LOG-MAX after booting from {survivor}: {found}")
        assert acked <= int(found) <= acked + 1, (acked, found)  # no acknowledged write lost
        assert f"Initiator: {INITIATOR}" in live_targets(d, survivor)  # the node's disk session is on B
        # ...and it carries on writing through B.
        wait_console(s, "new acknowledged writes through B",
                     lambda text: any(n > int(found) for n in acks(text)))

        # Clean up as a user would (a clone held by the dead gateway's watch is fenced: no 30 s wait).
        assert s.hil_post(f"/v0/node/{NODE}/power_off", {}) == 200
        for _ in range(30):
            proc = s.bmi("dpro", PROJECT, NODE, NET, NIC, check=False)
            if proc.returncode == 0:
                break
            time.sleep(3)
        else:
            pytest.fail(f"dpro {NODE}: {proc.stderr}")
        assert s.bmi("rm", PROJECT, IMAGE).returncode == 0
        assert not re.search(r"^Target \d+:", live_targets(d, survivor), re.M)

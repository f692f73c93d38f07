"""A short chaos run inside the suite: benchmarks/chaos.py on a real stack, faults injected, state checked.

Random pro / dpro / snap create / snap rm / rm / cp through both REST APIs from 4 clients on 8 HIL
nodes, while Einstein workers (and all of Einstein), Picasso, tgtd (Debian's restart), the HIL
simulator and the Ceph OSD fail; afterwards every node, image, target, conf file, boot file, DB row
and HIL attachment must be whole and consistent with the answers the clients got (see the script's
docstring).  ~2-3 minutes wall; `benchmarks/chaos.py --minutes 10 --seed 1` is the long version.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path

from tests.support.stack import running_stack

REPO = Path(__file__).resolve().parents[2]
MINUTES = 2.0  # the load phase; stack start, settle and checks add under a minute
SEED = 1


def _chaos_module():  # benchmarks/ is not a package
    spec = importlib.util.spec_from_file_location("bmi_chaos", REPO / "benchmarks" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def test_chaos_run_ends_whole() -> None:
    chaos = _chaos_module()
    # `timeout`/CI send SIGTERM: as KeyboardInterrupt, run()'s finally still brings the stack down.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    lines: list[str] = []
    try:
        result = chaos.run(MINUTES, SEED, clients=4, nodes=8, workers=2, emit=lines.append)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = "\n".join(lines)
    assert lines[-1] == result.summary and lines[-1].startswith("chaos: ops ")
    assert result.ops > 0 and result.ok > 0, report
    assert result.fault_count > 0, report
    assert result.violations == [], report


def test_the_stack_and_fault_tools_the_chaos_run_relies_on() -> None:
    """bmi-stack --nodes/--workers/restart, and the Debian-style tgtd restart (targets back, tids renumbered)."""
    chaos = _chaos_module()
    with running_stack(workers=3, nodes=8) as stack:
        inventory = json.loads((stack.dir / "hil-inventory.json").read_text())
        assert len([n for n in inventory["nodes"] if n["project"] == "bmi_infra"]) == 8
        run = chaos.Chaos(stack.dir, 1, 4, 1)
        assert len(run.worker_pids()) == 3
        for service in ("hil-simulator", "picasso", "einstein"):
            before = (stack.dir / "pids" / f"{service}.pid").read_text()
            stack.restart(service)
            assert (stack.dir / "pids" / f"{service}.pid").read_text() != before
        assert len(run.worker_pids()) == 3

        stack.rbd("create", "fault-img", "--size", "1", "--image-format", "2")
        stack.bmi("import", "bmi_infra", "fault-img")
        for node, nic in (("bmi_node", "bmi_port"), ("cisco-01", "enp130s0f0")):
            stack.bmi("pro", "bmi_infra", node, "fault-img", "bmi_network", nic)
        stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
        (survivor,) = stack.targets()
        assert stack.tid_of(survivor) != "1"
        old_pid = (stack.dir / "tgt" / "tgtd.pid").read_text()
        chaos.restart_tgtd_debian(stack.dir / "tgt", run.cfg.iscsi.conf_dir)
        assert (stack.dir / "tgt" / "tgtd.pid").read_text() != old_pid
        # back from its conf file under a new tid, as after a gateway reboot
        assert stack.targets() == [survivor] and stack.tid_of(survivor) == "1"

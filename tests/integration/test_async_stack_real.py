"""Asynchronous operations through REAL Einstein workers (scripts/bmi-stack: Ceph, tgtd, HIL simulator,
Einstein with 2 worker processes sharing one database) over Pyro4.

A batch of provisions accepted by one worker is followed with operation_wait calls that the RPC client
spreads over both workers; then a batch of deprovisions is cut short by an Einstein restart (SIGTERM:
the workers drain), and every operation ends done or failed-before-it-started, never stuck."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.common import config  # noqa: E402
from ims.einstein.tasks import NOT_STARTED  # noqa: E402
from ims.rpc.client import EinsteinClient  # noqa: E402
from tests.support.stack import running_stack  # noqa: E402

pytestmark = pytest.mark.integration

USER = {"username": "haas", "password": "secret"}
PROJECT, NET, NIC = "bmi_infra", "bmi_network", "eth0"
NODES = [f"node-{i:02d}" for i in range(1, 5)]


def wait(client: EinsteinClient, rec: dict[str, Any]) -> dict[str, Any]:
    for _ in range(100):
        rec = client.operation_wait(USER, rec["id"], 10)
        if rec["state"] in ("done", "failed"):
            return rec
    raise AssertionError(f"operation {rec['id']} did not finish: {rec}")


def test_async_operations_across_real_workers_and_a_drain() -> None:
    with running_stack(workers=2, nodes=len(NODES) + 3) as stack:  # bmi_infra has 3 nodes before node-01
        cfg = config.parse(stack.env["BMI_CONFIG"])
        stack.rbd("create", "async-stack-img", "--size", "8", "--image-format", "2")
        client = EinsteinClient(cfg)
        try:
            client.import_image(USER, PROJECT, "async-stack-img")  # the synchronous verb, unchanged
            recs = client.submit_batch(USER, "provision", [
                {"project": PROJECT, "node": n, "img": "async-stack-img", "network": NET, "nic": NIC} for n in NODES])
            done = [wait(client, r) for r in recs]
            assert [r["state"] for r in done] == ["done"] * len(NODES), [r["error"] for r in done]
            ids = {r["id"] for r in recs}
            assert ids <= {r["id"] for r in client.operation_list(USER, state="done")}
            clones = {row[1]: row[3] for row in client.db_list(USER) if row[1] in NODES}
            targets = stack.targets()
            assert all(any(t.endswith(clones[n]) for t in targets) for n in NODES), targets
            gone = client.submit_batch(USER, "deprovision", [
                {"project": PROJECT, "node": n, "network": NET, "nic": NIC} for n in NODES])
        finally:
            client.close()
        stack.restart("einstein")  # SIGTERM: the workers drain their tasks, then a new Einstein starts
        client = EinsteinClient(cfg)
        try:
            after = [client.operation_show(USER, r["id"]) for r in gone]
            for rec in after:
                not_started = rec["state"] == "failed" and rec["error"]["message"] == NOT_STARTED
                assert rec["state"] == "done" or not_started, rec
            left = sorted(n for n, _img in client.list_provisioned(USER, PROJECT))
            assert left == sorted(r["args"]["node"] for r in after if r["state"] == "failed")
            assert client.operation_list(USER, state="running") == []
            assert client.operation_list(USER, state="queued") == []
            for node in left:  # whatever never started can simply be asked again
                assert client.deprovision(USER, PROJECT, node, NET, NIC) is None
        finally:
            client.close()

"""GET /metrics on a REAL stack (scripts/bmi-stack: Ceph, tgtd, HIL simulator, Einstein with 2 workers,
Picasso): the exposition parses with prometheus_client's own parser, and its numbers follow real
operations made with the `bmi` CLI (requests by verb and status, live iSCSI targets, the task table)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.stack import Stack, running_stack  # noqa: E402

pytestmark = pytest.mark.integration

PROJECT, NET, NIC = "bmi_infra", "bmi_network", "eth0"
NODES = ["node-01", "node-02"]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(stack: Stack) -> Samples:
    resp = requests.get(stack.url + "/metrics", timeout=60)
    assert resp.status_code == 200, resp.text
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def count(samples: Samples, verb: str, status: str, api: str = "v1") -> float:
    return samples.get(("bmi_requests_total", (("api", api), ("status", status), ("verb", verb))), 0.0)


def test_metrics_follow_real_operations() -> None:
    with running_stack(workers=2, nodes=len(NODES) + 3) as stack:  # bmi_infra has 3 nodes before node-01
        stack.rbd("create", "metrics-img", "--size", "8", "--image-format", "2")
        before = scrape(stack)
        assert before[("bmi_einstein_up", ())] == 1.0
        assert before[("bmi_db_up", ())] == 1.0 and before[("bmi_iscsi_up", ())] == 1.0
        assert before[("bmi_iscsi_targets_live", ())] == 0.0
        assert before[("bmi_operations_queued", ())] == 0.0 and before[("bmi_operations_running", ())] == 0.0
        assert before[("bmi_journal_unfinished", (("state", "running"),))] == 0.0
        assert before[("bmi_flatten_jobs", (("state", "running"),))] == 0.0

        stack.bmi("import", PROJECT, "metrics-img")
        for node in NODES:
            stack.bmi("pro", PROJECT, node, "metrics-img", NET, NIC)
        refused = stack.bmi("pro", PROJECT, "no-such-node", "metrics-img", NET, NIC, check=False)
        assert refused.returncode == 1
        mid = scrape(stack)
        assert mid[("bmi_iscsi_targets_live", ())] == 2.0 == float(len(stack.targets()))
        assert count(mid, "provision", "202") - count(before, "provision", "202") >= 2
        assert count(mid, "import_image", "202") + count(mid, "import_image", "200") >= 1
        hist = ("bmi_request_duration_seconds_count", (("api", "v1"), ("verb", "provision")))
        assert mid[hist] - before.get(hist, 0.0) >= 3  # the refused one is timed too
        # every operation the CLI waited for is finished: nothing queued or running, the journal is clean
        assert mid[("bmi_operations_queued", ())] == 0.0 and mid[("bmi_operations_running", ())] == 0.0
        assert mid[("bmi_journal_unfinished", (("state", "running"),))] == 0.0

        stack.bmi("dpro", PROJECT, NODES[0], NET, NIC)
        after = scrape(stack)
        assert after[("bmi_iscsi_targets_live", ())] == 1.0 == float(len(stack.targets()))
        assert count(after, "deprovision", "202") - count(mid, "deprovision", "202") >= 1
        # the scrapes themselves are counted too, under their own route
        assert count(after, "metrics", "200", api="metrics") >= 2

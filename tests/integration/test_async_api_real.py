"""Asynchronous operations as users see them, on a REAL stack (scripts/bmi-stack: Ceph, tgtd, the HIL
simulator, Einstein's Pyro4 workers, Picasso under waitress): the CLI waits and prints Success; --no-wait
prints an id that `bmi op show` follows to done; POST /v1 answers 202 with a Location that leads to the
done operation; a batch through `bmi pro` with several nodes; the legacy form API still answers Success;
a tenant cannot see another tenant's operation."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.integration

TENANT = ("haas", "secret")
TENANT2 = ("tenant2", "secret2")
ADMIN = ("haasadmin", "admin1234")
BATCH = ["node-01", "node-02", "node-03"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(nodes=12) as handle:
        handle.rbd("create", "async-img", "--size", "8", "--image-format", "2")
        assert handle.bmi("import", "bmi_infra", "async-img").stdout == "Success\n"
        yield handle


def follow(stack: Stack, location: str, auth: tuple[str, str] = TENANT) -> dict[str, Any]:
    """GET the operation at ``location`` (long polls) until it is done or failed."""
    while True:
        r = requests.get(f"{stack.url}{location}", params={"wait": "30"}, auth=auth, timeout=60)
        assert r.status_code == 200, r.text
        record = r.json()["result"]
        if record["state"] in ("done", "failed"):
            return record


def targets_of(stack: Stack, node: str) -> list[str]:
    """The live tgtd targets of ``node``'s clone (none when it has no clone)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stack.bmi("db", "ls").stdout.splitlines() if line.startswith("|")]
    ceph = [r[3] for r in rows if r[1] == node]
    return [t for t in stack.targets() if ceph and t.endswith(ceph[0])]


def test_cli_waits_and_prints_success(stack: Stack) -> None:
    proc = stack.bmi("pro", "bmi_infra", "bmi_node", "async-img", "bmi_network", "bmi_port")
    assert proc.stdout == "Success\n"  # stdout exactly as the guide: progress (if any) went to stderr
    assert targets_of(stack, "bmi_node"), "the operation was done when the CLI returned: the target is live"
    ops = json.loads(stack.bmi("op", "ls", "--state", "done", "--json").stdout)
    assert any(o["verb"] == "provision" and o["args"]["node"] == "bmi_node" for o in ops)
    assert all("password" not in json.dumps(o) for o in ops)


def test_no_wait_prints_an_id_that_op_show_follows(stack: Stack) -> None:
    out = stack.bmi("dpro", "--no-wait", "bmi_infra", "bmi_node", "bmi_network", "bmi_port").stdout
    assert re.fullmatch(r"\d+\n", out), out
    op_id = out.strip()
    record = json.loads(stack.bmi("op", "show", op_id, "--json").stdout)
    assert record["id"] == int(op_id) and record["verb"] == "deprovision"
    assert record["state"] in ("queued", "running", "done")
    final = json.loads(stack.bmi("op", "show", "--wait", "--json", op_id).stdout)
    assert final["state"] == "done" and final["progress"] == 100 and final["error"] is None
    assert final["finished_at"] and final["started_at"]
    assert not targets_of(stack, "bmi_node")
    table = stack.bmi("op", "show", op_id).stdout
    assert re.search(r"\|\s*state\s*\|\s*done\s*\|", table), table
    # another tenant: as if it did not exist
    proc = stack.bmi("op", "show", op_id, user=TENANT2, check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr.lower(), proc.stderr


def test_v1_answers_202_with_location_then_done(stack: Stack) -> None:
    url = f"{stack.url}/v1/projects/bmi_infra/nodes/bmi_node"
    body = {"image": "async-img", "network": "bmi_network", "nic": "bmi_port"}
    r = requests.post(f"{url}/provision", json=body, auth=TENANT, timeout=60)
    assert r.status_code == 202, r.text
    record = r.json()["result"]
    assert r.headers["Location"] == f"/v1/operations/{record['id']}"
    assert record["state"] in ("queued", "running", "done") and record["verb"] == "provision"
    done = follow(stack, r.headers["Location"])
    assert done["state"] == "done", done
    assert targets_of(stack, "bmi_node")
    # the tenant of another project gets 404 for it; the admin sees it
    assert requests.get(f"{stack.url}{r.headers['Location']}", auth=TENANT2, timeout=30).status_code == 404
    assert requests.get(f"{stack.url}{r.headers['Location']}", auth=ADMIN, timeout=30).status_code == 200
    # a second provision of the same node: refused at submit (409) or as the failed operation's 409
    again = requests.post(f"{url}/provision", json=body, auth=TENANT, timeout=60)
    if again.status_code == 202:
        failed = follow(stack, again.headers["Location"])
        assert failed["state"] == "failed" and failed["error"]["status"] == 409, failed
    else:
        assert again.status_code == 409, again.text
    r = requests.post(f"{url}/deprovision", json={"network": "bmi_network", "nic": "bmi_port"}, auth=TENANT,
                      timeout=60)
    assert r.status_code == 202 and follow(stack, r.headers["Location"])["state"] == "done"
    assert not targets_of(stack, "bmi_node")
    listed = requests.get(f"{stack.url}/v1/operations", params={"state": "done"}, auth=TENANT, timeout=30)
    assert listed.status_code == 200 and record["id"] in [o["id"] for o in listed.json()["result"]]
    assert requests.get(f"{stack.url}/v1/operations", auth=TENANT2, timeout=30).json()["result"] == [] or \
        all(o["project"] != "bmi_infra" for o in
            requests.get(f"{stack.url}/v1/operations", auth=TENANT2, timeout=30).json()["result"])


def test_prefer_wait_answers_once_the_operation_has_finished(stack: Stack) -> None:
    """RFC 7240 ``Prefer: wait=N``: the 202 comes when the operation is done (or failed), with the
    final record and ``Preference-Applied``; without it the 202 comes at once (queued or running)."""
    url = f"{stack.url}/v1/projects/bmi_infra/nodes/cisco-02"
    body = {"image": "async-img", "network": "bmi_network", "nic": "enp130s0f0"}
    r = requests.post(f"{url}/provision", json=body, auth=TENANT, timeout=60, headers={"Prefer": "wait=20"})
    assert r.status_code == 202, r.text
    record = r.json()["result"]
    assert record["state"] == "done" and record["progress"] == 100, record
    assert r.headers["Preference-Applied"] == "wait=20" and r.headers["Location"] == f"/v1/operations/{record['id']}"
    assert targets_of(stack, "cisco-02")
    # a failure is the record's, still a 202: the same node again
    again = requests.post(f"{url}/provision", json=body, auth=TENANT, timeout=60,
                          headers={"Prefer": "respond-async, wait=20"})
    if again.status_code == 202:
        failed = again.json()["result"]
        assert failed["state"] == "failed" and failed["error"]["type"] == "NodeAlreadyProvisioned", failed
    else:
        assert again.status_code == 409, again.text
    # an unusable preference is ignored (RFC 7240 section 2): answered at once, no Preference-Applied
    r = requests.post(f"{url}/deprovision", json={"network": "bmi_network", "nic": "enp130s0f0"}, auth=TENANT,
                      timeout=60, headers={"Prefer": "wait=soon"})
    assert r.status_code == 202 and "Preference-Applied" not in r.headers, r.headers
    assert follow(stack, r.headers["Location"])["state"] == "done"
    assert not targets_of(stack, "cisco-02")


def test_legacy_form_api_still_answers_success(stack: Stack) -> None:
    form = {"project": "bmi_infra", "node": "bmi_node", "img": "async-img", "network": "bmi_network",
            "nic": "bmi_port"}
    r = requests.put(f"{stack.url}/provision/", data=form, auth=TENANT, timeout=600)
    assert (r.status_code, r.text) == (200, "Success")
    assert targets_of(stack, "bmi_node")  # done when Success was answered
    again = requests.put(f"{stack.url}/provision/", data=form, auth=TENANT, timeout=600)
    assert again.status_code == 409 and again.headers["X-BMI-Error-Type"] == "NodeAlreadyProvisioned"
    assert "already provisioned" in again.text  # plain text, as the original answered
    dpro = {k: v for k, v in form.items() if k != "img"}
    r = requests.delete(f"{stack.url}/deprovision/", data=dpro, auth=TENANT, timeout=600)
    assert (r.status_code, r.text) == (200, "Success")
    assert not targets_of(stack, "bmi_node")


def test_pro_with_several_nodes_is_one_batch(stack: Stack) -> None:
    proc = stack.bmi("pro", "bmi_infra", ",".join(BATCH), "async-img", "bmi_network", "eth0")
    assert proc.stdout.splitlines() == [f"{n}: Success" for n in BATCH]
    provisioned = stack.bmi("showpro", "bmi_infra").stdout
    assert all(n in provisioned for n in BATCH)
    # again: every node is provisioned already, each fails, exit 1
    proc = stack.bmi("pro", "bmi_infra", ",".join(BATCH[:2]), "async-img", "bmi_network", "eth0", check=False)
    assert proc.returncode == 1
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == BATCH[:2]
    assert all(": failed: " in line for line in proc.stdout.splitlines()), proc.stdout
    for node in BATCH:
        assert stack.bmi("dpro", "bmi_infra", node, "bmi_network", "eth0").stdout == "Success\n"
    assert not any(n in stack.bmi("showpro", "bmi_infra").stdout for n in BATCH)

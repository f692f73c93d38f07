"""The service as users drive it: the `bmi` CLI and both REST APIs against a real stack
(Ceph, tgtd, the HIL simulator, Einstein with its Pyro4 workers, Picasso under waitress),
started by scripts/bmi-stack in a private directory and stopped afterwards."""
from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
from collections.abc import Iterator

import pytest
import requests

from tests.support.stack import BMI, Stack, running_stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as handle:
        yield handle


ADMIN = ("haasadmin", "admin1234")
TENANT2 = ("tenant2", "secret2")
HEADER = ["Id", "Name", "Project", "Ceph", "Public", "Snapshot", "Parent"]


def table(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return rows


def test_guide_workflow_through_the_cli(stack: Stack) -> None:
    stack.rbd("create", "bmi-test-image", "--size", "1", "--image-format", "2")
    assert stack.bmi("import", "bmi_infra", "bmi-test-image").stdout == "Success\n"
    db = table(stack.bmi("db", "ls").stdout)
    assert db[0] == HEADER
    golden = [r for r in db if r[1] == "bmi-test-image"][0]
    assert re.fullmatch(r"112233445566778899img\d+", golden[3]) and golden[4:] == ["False", "False", ""]
    assert golden[3] in stack.rbd("ls").split()
    assert ["bmi-test-image"] in table(stack.bmi("ls", "bmi_infra").stdout)

    assert stack.bmi("pro", "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port").stdout == "Success\n"
    node = [r for r in table(stack.bmi("db", "ls").stdout) if r[1] == "bmi_node"][0]
    assert node[6] == "bmi-test-image"
    assert any(t.endswith(node[3]) for t in stack.targets())
    assert table(stack.bmi("showpro", "bmi_infra").stdout)[1] == ["bmi_node", "bmi-test-image"]

    out = stack.bmi("snap", "create", "bmi_infra", "bmi_node", "bmi-test-image-snapshot").stdout
    assert out == "Success\n"
    snap = [r for r in table(stack.bmi("db", "ls").stdout) if r[1] == "bmi-test-image-snapshot"][0]
    assert snap[4:] == ["False", "True", "bmi-test-image"]
    assert f"{snap[3]}@snapshot" in stack.rbd("ls", "-l")
    assert ["bmi-test-image-snapshot", "bmi-test-image"] in table(stack.bmi("snap", "ls", "bmi_infra").stdout)

    assert stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port").stdout == "Success\n"
    assert "bmi_node" not in stack.bmi("db", "ls").stdout
    assert node[3] not in stack.rbd("ls").split() and not any(t.endswith(node[3]) for t in stack.targets())
    assert stack.bmi("snap", "rm", "bmi_infra", "bmi-test-image-snapshot").stdout == "Success\n"
    assert stack.bmi("rm", "bmi_infra", "bmi-test-image").stdout == "Success\n"
    assert "bmi-test-image" not in stack.bmi("db", "ls").stdout
    assert golden[3] not in stack.rbd("ls").split()
    stack.rbd("rm", "bmi-test-image")
    # --json for scripts
    rows = json.loads(stack.bmi("--json", "db", "ls").stdout)
    assert isinstance(rows, list)


def test_cli_errors_exit_non_zero_with_a_message(stack: Stack) -> None:
    bad = stack.bmi("ls", "bmi_infra", user=("haas", "wrong"), check=False)
    assert bad.returncode == 1 and bad.stdout == "" and "uthenticat" in bad.stderr
    other = stack.bmi("ls", "bmi_infra", user=TENANT2, check=False)
    assert other.returncode == 1 and "bmi_infra" in other.stderr
    missing = stack.bmi("pro", "bmi_infra", "bmi_node", "no-such-image", "bmi_network", "bmi_port", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    invalid = stack.bmi("import", "bmi_infra", "bad/name", check=False)
    assert invalid.returncode == 1 and "invalid" in invalid.stderr.lower()
    admin_only = stack.bmi("project", "create", "sneaky", check=False)
    assert admin_only.returncode == 1 and "admin" in admin_only.stderr
    env = dict(stack.env, BMI_URL="http://127.0.0.1:1")
    down = subprocess.run([BMI, "ls", "bmi_infra"], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 1 and "cannot reach" in down.stderr.lower()


def test_every_other_cli_command(stack: Stack) -> None:
    stack.rbd("create", "cli-golden", "--size", "1", "--image-format", "2")
    stack.rbd("snap", "create", "cli-golden@s1")
    assert stack.bmi("import", "bmi_infra", "cli-golden", "--snap", "s1", "--protect").stdout == "Success\n"
    assert stack.bmi("cp", "bmi_infra", "cli-golden", "bmi_infra", "cli-copy").stdout == "Success\n"
    assert stack.bmi("mv", "bmi_infra", "cli-copy", "bmi_infra", "cli-moved").stdout == "Success\n"
    assert stack.bmi("cp", "bmi_infra", "cli-moved", "other_project", user=ADMIN).stdout == "Success\n"
    assert ["cli-moved"] in table(stack.bmi("ls", "other_project", user=ADMIN).stdout)
    assert stack.bmi("export", "bmi_infra", "cli-moved", "cli-exported").stdout == "Success\n"
    assert "cli-exported" in stack.rbd("ls").split()
    assert stack.bmi("iscsi", "create", "bmi_infra", "cli-moved", user=ADMIN).stdout == "Success\n"
    listed = table(stack.bmi("iscsi", "ls", "bmi_infra").stdout)
    assert listed[1][0] == "cli-moved" and any(t == listed[1][1] for t in stack.targets())
    assert stack.bmi("iscsi", "rm", "bmi_infra", "cli-moved", user=ADMIN).stdout == "Success\n"
    target = stack.bmi("disk", "create", "bmi_infra", "cli-moved", "disk1").stdout.strip()
    assert any(t.endswith(target) for t in stack.targets())
    assert table(stack.bmi("showdisks", "bmi_infra").stdout)[1] == ["disk1", "cli-moved"]
    assert stack.bmi("disk", "delete", "bmi_infra", "disk1").stdout == "Success\n"
    ip = stack.bmi("node", "ip", "bmi_infra", "bmi_node", check=False)
    assert ip.returncode == 1 and "DHCP" in ip.stderr
    assert [r[1] for r in table(stack.bmi("project", "ls", user=ADMIN).stdout)][1:3] == ["bmi_infra", "other_project"]
    assert stack.bmi("project", "create", "proj3", user=ADMIN).stdout == "Success\n"
    assert stack.bmi("db", "create", "proj3", "row1", "--public", user=ADMIN).stdout == "Success\n"
    assert [r[1] for r in table(stack.bmi("db", "ls", "-p", user=ADMIN).stdout)[1:]] == ["row1"]
    assert stack.bmi("db", "rm", "proj3", "row1", user=ADMIN).stdout == "Success\n"
    assert stack.bmi("project", "rm", "proj3", user=ADMIN).stdout == "Success\n"
    report = json.loads(stack.bmi("--json", "reconcile", user=ADMIN).stdout)
    assert report["rows_without_image"] == [] and report["unfinished_operations"] == []
    # drift: a provisioned node's target vanished from tgtd; reconcile reports it, --repair restores it
    stack.bmi("pro", "bmi_infra", "bmi_node", "cli-golden", "bmi_network", "bmi_port")
    clone = next(r[3] for r in table(stack.bmi("db", "ls").stdout) if r[1] == "bmi_node")
    stack.tgtadm("--op", "delete", "--mode", "target", "--tid", stack.tid_of(clone), "--force")
    assert not any(t.endswith(clone) for t in stack.targets())
    assert json.loads(stack.bmi("reconcile", user=ADMIN).stdout)["missing_targets"] == [clone]
    repaired = json.loads(stack.bmi("reconcile", "--repair", user=ADMIN).stdout)
    assert repaired["repaired"] is True and any(t.endswith(clone) for t in stack.targets())
    stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    for img in ("cli-moved", "cli-golden"):
        stack.bmi("rm", "bmi_infra", img)
    stack.bmi("rm", "other_project", "cli-moved", user=ADMIN)
    stack.rbd("rm", "cli-exported")
    stack.rbd("snap", "unprotect", "cli-golden@s1")
    stack.rbd("snap", "rm", "cli-golden@s1")
    stack.rbd("rm", "cli-golden")


def test_legacy_form_api_with_the_real_backend(stack: Stack) -> None:
    url, auth = stack.url, ("haas", "secret")
    stack.rbd("create", "legacy-img", "--size", "1", "--image-format", "2")
    stack.bmi("import", "bmi_infra", "legacy-img")
    form = {"project": "bmi_infra", "node": "cisco-01", "img": "legacy-img", "network": "bmi_network",
            "nic": "enp130s0f0"}
    r = requests.put(f"{url}/provision/", data=form, auth=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    again = requests.put(f"{url}/provision/", data=form, auth=auth, timeout=60)
    # errors answer as the original's did (the message in plain text), with our status codes
    assert again.status_code == 409 and again.headers["Content-Type"].startswith("text/plain"), again.text
    assert "already provisioned" in again.text and again.headers["X-BMI-Error-Type"] == "NodeAlreadyProvisioned"
    r = requests.put(f"{url}/create_snapshot/", data={"project": "bmi_infra", "node": "cisco-01",
                                                       "snap_name": "legacy-snap"}, auth=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    r = requests.post(f"{url}/list_snapshots/", data={"project": "bmi_infra"}, auth=auth, timeout=60)
    assert ["legacy-snap", "legacy-img"] in r.json()
    r = requests.post(f"{url}/list_images/", data={"project": "bmi_infra"}, auth=auth, timeout=60)
    assert "legacy-img" in r.json()
    for status, kwargs in ((401, {"auth": ("haas", "nope")}), (401, {}),
                           (400, {"auth": auth, "data": {"project": "bmi_infra"}}),
                           (400, {"auth": auth, "data": dict(form, node="../../x")})):
        kw = {"data": form, **kwargs}
        r = requests.delete(f"{url}/deprovision/", timeout=60, **kw)
        assert r.status_code == status, (status, r.text)
        assert r.headers["Content-Type"].startswith("text/plain") and r.text and not r.text.startswith("{"), r.text
    r = requests.get(f"{url}/no/such/route", auth=auth, timeout=60)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.delete(f"{url}/deprovision/", data={k: form[k] for k in ("project", "node", "network", "nic")},
                        auth=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    for img in ("legacy-snap", "legacy-img"):
        r = requests.delete(f"{url}/remove_image/", data={"project": "bmi_infra", "img": img}, auth=auth,
                            timeout=60)
        assert (r.status_code, r.text) == (200, "Success")
    # split API: create_disk returns the target name, provision by disk writes boot files only
    stack.bmi("import", "bmi_infra", "legacy-img")
    r = requests.put(f"{url}/create_disk", data={"project": "bmi_infra", "disk_name": "d1", "img": "legacy-img"},
                     auth=auth, timeout=60)
    assert r.status_code == 200 and re.fullmatch(r"112233445566778899img\d+", r.json())
    r = requests.put(f"{url}/provision/", data={"project": "bmi_infra", "node": "cisco-02", "disk_name": "d1",
                                                "nic": "enp130s0f0"}, auth=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    r = requests.delete(f"{url}/delete_disk", data={"project": "bmi_infra", "disk_name": "d1"}, auth=auth,
                        timeout=60)
    assert r.status_code == 409
    r = requests.delete(f"{url}/deprovision/", data={"project": "bmi_infra", "node": "cisco-02",
                                                     "nic": "enp130s0f0"}, auth=auth, timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    r = requests.delete(f"{url}/delete_disk", data={"project": "bmi_infra", "disk_name": "d1"}, auth=auth,
                        timeout=60)
    assert (r.status_code, r.text) == (200, "Success")
    stack.bmi("rm", "bmi_infra", "legacy-img")
    stack.rbd("rm", "legacy-img")


def test_json_api_and_openapi_with_the_real_backend(stack: Stack) -> None:
    spec = requests.get(f"{stack.url}/v1/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.") and len(spec["paths"]) >= 15
    r = requests.get(f"{stack.url}/v1/projects/bmi_infra/images", auth=("haas", "secret"), timeout=30)
    assert r.status_code == 200 and isinstance(r.json()["result"], list)
    r = requests.get(f"{stack.url}/v1/projects/bmi_infra/images", auth=TENANT2, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["status"] == 401


def test_two_concurrent_provisions_of_one_node(stack: Stack) -> None:
    stack.rbd("create", "race-img", "--size", "1", "--image-format", "2")
    stack.bmi("import", "bmi_infra", "race-img")
    args = ("pro", "bmi_infra", "cisco-01", "race-img", "bmi_network", "enp130s0f0")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: stack.bmi(*args, check=False), range(2)))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.stdout, r.stderr) for r in results]
    loser = [r for r in results if r.returncode == 1][0]
    assert "busy" in loser.stderr or "already provisioned" in loser.stderr
    stack.bmi("dpro", "bmi_infra", "cisco-01", "bmi_network", "enp130s0f0")
    stack.bmi("rm", "bmi_infra", "race-img")
    stack.rbd("rm", "race-img")

"""The HIL simulator as a real subprocess over real HTTP, driven raw and through HILClient.

Statuses and bodies are the ones reference/hil-api.md records from real HIL.
Read-only checks use the session simulator (example inventory); tests that change
state use this module's own simulator, each on its own node.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from ims.common.errors import (
    AuthenticationFailed,
    Conflict,
    HILError,
    InvalidInput,
    NicNotFound,
    NodeNotFound,
    NotFound,
    ProjectNotFound,
)
from ims.einstein.hil import HILClient
from tests.support.hil import ADMIN, MEMBER, TENANT2, HILSimulator, example_inventory, start_hil_simulator

# ``hil_sim`` (the session simulator, example inventory) comes from tests/conftest.py's pytest_plugins.

pytestmark = pytest.mark.integration

ACTION_DELAY = 0.5  # long enough to observe PENDING and to race a second action


def _inventory() -> dict[str, Any]:
    inv = example_inventory()
    for i in range(1, 13):
        inv["nodes"].append({"name": f"t{i:02d}", "project": "bmi_infra",
                             "nics": [{"label": "eth0", "macaddr": f"52:54:00:10:00:{i:02x}"}]})
    inv["nodes"].append({"name": "free-01", "project": None,
                         "nics": [{"label": "eth0", "macaddr": "52:54:00:20:00:01"}]})
    inv["networks"].append({"name": "broken_net", "owner": "bmi_infra", "access": ["bmi_infra"],
                            "net_id": "1500", "fail_actions": True})
    return inv


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HILSimulator]:
    handle = start_hil_simulator(_inventory(), tmp_path_factory.mktemp("hilsim-mut"), action_delay=ACTION_DELAY)
    try:
        yield handle
    finally:
        handle.stop()


def call(sim: HILSimulator, method: str, path: str, auth: tuple[str, str] | None = MEMBER,
         body: Any = None, **kwargs: Any) -> requests.Response:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    return requests.request(method, f"{sim.url}/v0/{path}", auth=auth, data=data, timeout=10, **kwargs)


def hil_error(resp: requests.Response, status: int, type_: str, msg: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("text/html")  # as real HIL
    assert resp.json() == {"type": type_, "msg": msg}


def wait_action(sim: HILSimulator, status_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = call(sim, "GET", f"networking_action/{status_id}")
        assert reply.status_code == 200, reply.text
        if reply.json()["status"] != "PENDING":
            return reply.json()
        time.sleep(0.05)
    raise AssertionError(f"action {status_id} still PENDING after {timeout} s")


def client(sim: HILSimulator, creds: tuple[str, str] = MEMBER, **kwargs: Any) -> HILClient:
    return HILClient(sim.url, *creds, timeout=5, action_timeout=10, **kwargs)


# --- authentication and authorization (raw) -------------------------------------------------------
def test_401_bad_password(hil_sim: HILSimulator) -> None:
    hil_error(call(hil_sim, "GET", "project/bmi_infra/nodes", auth=("haas", "wrong")), 401, "AuthorizationError",
              "Authentication failed. Authentication is required to use this service.")


def test_401_without_credentials(hil_sim: HILSimulator) -> None:
    assert call(hil_sim, "GET", "nodes/free", auth=None).status_code == 401


def test_401_no_project_access(hil_sim: HILSimulator) -> None:
    hil_error(call(hil_sim, "GET", "project/bmi_infra/nodes", auth=TENANT2), 401, "AuthorizationError",
              "You do not have access to the required project.")
    hil_error(call(hil_sim, "GET", "node/bmi_node", auth=TENANT2), 401, "AuthorizationError",
              "You do not have access to the required project.")


def test_404_unknown_user(hil_sim: HILSimulator) -> None:
    hil_error(call(hil_sim, "GET", "nodes/free", auth=("nobody", "x")), 404, "NotFoundError",
              "User nobody does not exist.")


def test_members_and_admins(hil_sim: HILSimulator) -> None:
    resp = call(hil_sim, "GET", "project/bmi_infra/nodes")
    assert resp.status_code == 200 and resp.json() == ["bmi_node", "cisco-01", "cisco-02"]
    assert call(hil_sim, "GET", "project/bmi_infra/nodes", auth=ADMIN).json() == resp.json()
    assert call(hil_sim, "GET", "projects", auth=ADMIN).json() == ["bmi_infra", "other_project"]
    hil_error(call(hil_sim, "GET", "projects"), 401, "AuthorizationError", "This operation is administrator-only.")
    assert call(hil_sim, "GET", "nodes/free").json() == ["cisco-03", "cisco-04"]
    assert len(call(hil_sim, "GET", "nodes/all", auth=TENANT2).json()) == 5


# --- reads (raw) ------------------------------------------------------------------------------------
def test_show_node(hil_sim: HILSimulator) -> None:
    node = call(hil_sim, "GET", "node/bmi_node").json()
    assert node == {"metadata": {}, "name": "bmi_node", "project": "bmi_infra",
                    "nics": [{"label": "bmi_port", "macaddr": "52:54:00:00:00:01", "networks": {}}]}
    admin_view = call(hil_sim, "GET", "node/bmi_node", auth=ADMIN).json()
    assert {"port", "switch"} <= set(admin_view["nics"][0])
    # A free node is visible to any authenticated user.
    assert call(hil_sim, "GET", "node/cisco-03", auth=TENANT2).status_code == 200


def test_404_node_nic_network_project(hil_sim: HILSimulator) -> None:
    hil_error(call(hil_sim, "GET", "node/nope"), 404, "NotFoundError", "Node nope does not exist.")
    hil_error(call(hil_sim, "POST", "node/bmi_node/nic/nope/connect_network", body={"network": "bmi_network"}),
              404, "NotFoundError", "Nic nope on node bmi_node does not exist.")
    hil_error(call(hil_sim, "GET", "network/nope"), 404, "NotFoundError", "Network nope does not exist.")
    hil_error(call(hil_sim, "GET", "project/nope/nodes"), 404, "NotFoundError", "Project nope does not exist.")


def test_unknown_route_is_html_404(hil_sim: HILSimulator) -> None:
    resp = call(hil_sim, "GET", "no/such/route")
    assert resp.status_code == 404 and "<html" in resp.text.lower()


def test_show_network_and_project_networks(hil_sim: HILSimulator) -> None:
    net = call(hil_sim, "GET", "network/bmi_network").json()
    assert net["owner"] == "bmi_infra" and net["access"] == ["bmi_infra"]
    assert net["channels"] == ["vlan/native", "vlan/1001"]
    assert call(hil_sim, "GET", "project/bmi_infra/networks").json() == ["bmi_network"]
    assert call(hil_sim, "GET", "network/bmi_network", auth=TENANT2).status_code == 401


# --- request validation (raw) ---------------------------------------------------------------------
def test_400_unknown_key_and_missing_key(hil_sim: HILSimulator) -> None:
    resp = call(hil_sim, "POST", "node/bmi_node/nic/bmi_port/connect_network",
                body={"network": "bmi_network", "bogus": 1})
    assert resp.status_code == 400 and resp.json()["type"] == "ValidationError"
    resp = call(hil_sim, "POST", "node/bmi_node/nic/bmi_port/connect_network", body={"node": "bmi_node"})
    assert resp.status_code == 400  # path parameters must not be repeated in the body
    resp = call(hil_sim, "POST", "node/bmi_node/power_cycle", body={"force": "yes"})
    assert resp.status_code == 400


def test_400_get_with_body(hil_sim: HILSimulator) -> None:
    resp = call(hil_sim, "GET", "node/bmi_node", body={})
    assert resp.status_code == 400 and resp.json()["type"] == "ValidationError"


def test_form_encoded_body_is_not_seen(hil_sim: HILSimulator) -> None:
    # curl -d style: Werkzeug eats the form, so HIL sees no "network" (hil-api.md §3.1).
    resp = requests.post(f"{hil_sim.url}/v0/node/bmi_node/nic/bmi_port/connect_network", auth=MEMBER,
                         data={"network": "bmi_network"}, timeout=10)
    assert resp.status_code == 400 and "network" in resp.json()["msg"]


# --- networking actions (raw) -----------------------------------------------------------------------
def test_202_then_polling_to_done_and_nics_change_only_when_done(sim: HILSimulator) -> None:
    resp = call(sim, "POST", "node/t01/nic/eth0/connect_network",
                body={"network": "bmi_network", "channel": "vlan/native"})
    assert resp.status_code == 202
    status_id = resp.json()["status_id"]
    pending = call(sim, "GET", f"networking_action/{status_id}").json()
    assert pending == {"status": "PENDING", "node": "t01", "nic": "eth0", "new_network": "bmi_network",
                       "type": "modify_port", "channel": "vlan/native"}
    assert call(sim, "GET", "node/t01").json()["nics"][0]["networks"] == {}
    assert wait_action(sim, status_id)["status"] == "DONE"
    assert call(sim, "GET", "node/t01").json()["nics"][0]["networks"] == {"vlan/native": "bmi_network"}
    assert call(sim, "GET", "network/bmi_network").json()["connected-nodes"]["t01"] == ["eth0"]

    resp = call(sim, "POST", "node/t01/nic/eth0/detach_network", body={"network": "bmi_network"})
    assert resp.status_code == 202
    done = wait_action(sim, resp.json()["status_id"])
    assert done["status"] == "DONE" and done["new_network"] is None
    assert call(sim, "GET", "node/t01").json()["nics"][0]["networks"] == {}


def test_409_pending_action_on_the_nic(sim: HILSimulator) -> None:
    first = call(sim, "POST", "node/t02/nic/eth0/connect_network", body={"network": "bmi_network"})
    assert first.status_code == 202
    hil_error(call(sim, "POST", "node/t02/nic/eth0/detach_network", body={"network": "bmi_network"}),
              409, "BlockedError", "A networking operation is already active on the nic.")
    hil_error(call(sim, "POST", "project/bmi_infra/detach_node", body={"node": "t02"}),
              409, "BlockedError", "Node has pending network actions")
    wait_action(sim, first.json()["status_id"])


def test_409_already_attached_and_400_not_attached(sim: HILSimulator) -> None:
    first = call(sim, "POST", "node/t03/nic/eth0/connect_network", body={"network": "bmi_network"})
    wait_action(sim, first.json()["status_id"])
    hil_error(call(sim, "POST", "node/t03/nic/eth0/connect_network", body={"network": "bmi_network"}),
              409, "BlockedError", "The network is already attached to the nic.")
    hil_error(call(sim, "POST", "project/bmi_infra/detach_node", body={"node": "t03"}),
              409, "BlockedError", "Node attached to a network")
    hil_error(call(sim, "POST", "node/t04/nic/eth0/detach_network", body={"network": "bmi_network"}),
              400, "BadArgumentError", "The network is not attached to the nic.")


def test_old_status_id_404_after_newer_action(sim: HILSimulator) -> None:
    first = call(sim, "POST", "node/t05/nic/eth0/connect_network", body={"network": "bmi_network"})
    old_id = first.json()["status_id"]
    wait_action(sim, old_id)
    second = call(sim, "POST", "node/t05/nic/eth0/detach_network", body={"network": "bmi_network"})
    assert second.status_code == 202
    hil_error(call(sim, "GET", f"networking_action/{old_id}"), 404, "NotFoundError", "status_id not found")
    assert wait_action(sim, second.json()["status_id"])["status"] == "DONE"


def test_channel_and_project_checks(sim: HILSimulator) -> None:
    hil_error(call(sim, "POST", "node/t06/nic/eth0/connect_network",
                   body={"network": "bmi_network", "channel": "vlan/9999"}),
              400, "BadArgumentError", "Channel 'vlan/9999', is not legal for this network.")
    resp = call(sim, "POST", "node/t06/nic/eth0/connect_network",
                body={"network": "bmi_network", "channel": "vlan/1001"})
    assert resp.status_code == 202
    assert wait_action(sim, resp.json()["status_id"])["channel"] == "vlan/1001"
    hil_error(call(sim, "POST", "node/t07/nic/eth0/connect_network", body={"network": "other_network"}),
              409, "ProjectMismatchError", "Project does not have access to given network.")
    hil_error(call(sim, "POST", "node/free-01/nic/eth0/connect_network", body={"network": "bmi_network"},
                   auth=ADMIN), 409, "ProjectMismatchError", "Node not in project")
    hil_error(call(sim, "POST", "node/t07/nic/eth0/connect_network", body={"network": "bmi_network"},
                   auth=TENANT2), 401, "AuthorizationError", "You do not have access to the required project.")


def test_action_error_state(sim: HILSimulator) -> None:
    resp = call(sim, "POST", "node/t08/nic/eth0/connect_network", body={"network": "broken_net"})
    assert wait_action(sim, resp.json()["status_id"])["status"] == "ERROR"
    assert call(sim, "GET", "node/t08").json()["nics"][0]["networks"] == {}


# --- nodes in projects, power, boot device (raw) ------------------------------------------------------
def test_connect_and_detach_node(sim: HILSimulator) -> None:
    hil_error(call(sim, "POST", "project/bmi_infra/connect_node", body={"node": "t09"}),
              409, "BlockedError", "Node is already owned by a project.")
    hil_error(call(sim, "POST", "project/other_project/detach_node", body={"node": "t09"}, auth=TENANT2),
              404, "NotFoundError", "Node not in project")
    assert call(sim, "POST", "project/bmi_infra/detach_node", body={"node": "t09"}).status_code == 200
    assert "t09" in call(sim, "GET", "nodes/free").json()
    assert call(sim, "POST", "project/other_project/connect_node", body={"node": "t09"},
                auth=TENANT2).status_code == 200
    assert call(sim, "GET", "node/t09", auth=TENANT2).json()["project"] == "other_project"


def test_power_cycle_power_off_status_and_boot_device(sim: HILSimulator) -> None:
    resp = call(sim, "POST", "node/t10/power_cycle", body={"force": True})
    assert resp.status_code == 200 and resp.text == ""
    assert call(sim, "GET", "node/t10/power_status").json() == {"power_status": "on"}
    assert call(sim, "POST", "node/t10/power_off").status_code == 200
    assert call(sim, "GET", "node/t10/power_status").json() == {"power_status": "off"}
    assert call(sim, "PUT", "node/t10/boot_device", body={"bootdev": "pxe"}).status_code == 200
    state = call(sim, "GET", "_sim/state", auth=ADMIN).json()
    assert next(n for n in state["nodes"] if n["name"] == "t10")["bootdev"] == "pxe"
    hil_error(call(sim, "PUT", "node/t10/boot_device", body={"bootdev": "floppy"}), 400, "BadArgumentError",
              "Invalid boot device 'floppy'; use one of pxe, disk, none.")
    # Free nodes' power is administrator-only; other tenants get 401.
    assert call(sim, "POST", "node/free-01/power_cycle", body={"force": False}).status_code == 401
    assert call(sim, "POST", "node/free-01/power_cycle", body={"force": False}, auth=ADMIN).status_code == 200
    assert call(sim, "POST", "node/t10/power_cycle", body={}, auth=TENANT2).status_code == 401
    assert call(sim, "POST", "node/nope/power_cycle", body={}).status_code == 404


# --- admin set-up calls (raw) ---------------------------------------------------------------------------
def test_admin_setup_calls(sim: HILSimulator) -> None:
    assert call(sim, "PUT", "project/p3").status_code == 401
    assert call(sim, "PUT", "project/p3", auth=ADMIN).status_code == 200
    hil_error(call(sim, "PUT", "project/p3", auth=ADMIN), 409, "DuplicateError", "Project p3 already exists.")
    assert call(sim, "PUT", "auth/basic/user/carol", auth=ADMIN,
                body={"password": "pw3", "is_admin": False}).status_code == 200
    assert call(sim, "POST", "auth/basic/user/carol/add_project", auth=ADMIN, body={"project": "p3"}).status_code == 200
    assert call(sim, "PUT", "node/n-new", auth=ADMIN,
                body={"obm": {"type": "http://schema.massopencloud.org/haas/v0/obm/mock", "host": "h",
                              "user": "u", "password": "p"}}).status_code == 200
    assert call(sim, "PUT", "node/n-new/nic/eth0", auth=ADMIN, body={"macaddr": "52:54:00:99:00:01"}).status_code == 200
    resp = call(sim, "POST", "project/p3/connect_node", auth=("carol", "pw3"), body={"node": "n-new"})
    assert resp.status_code == 200
    assert call(sim, "PUT", "network/p3net", auth=("carol", "pw3"),
                body={"owner": "p3", "access": "p3", "net_id": ""}).status_code == 200
    net = call(sim, "GET", "network/p3net", auth=("carol", "pw3")).json()
    assert net["channels"][0] == "vlan/native" and net["channels"][1].startswith("vlan/")
    assert call(sim, "GET", "project/p3/nodes", auth=("carol", "pw3")).json() == ["n-new"]
    hil_error(call(sim, "DELETE", "project/p3", auth=ADMIN), 409, "BlockedError", "Project has nodes still")
    assert call(sim, "POST", "auth/basic/user/carol/remove_project", auth=ADMIN,
                body={"project": "p3"}).status_code == 200
    assert call(sim, "GET", "project/p3/nodes", auth=("carol", "pw3")).status_code == 401
    state = call(sim, "GET", "_sim/state", auth=ADMIN).json()
    assert "carol" in [u["name"] for u in state["users"]]
    assert "pw3" not in json.dumps(state)
    assert call(sim, "GET", "_sim/state").status_code == 401


# --- HILClient against the simulator ------------------------------------------------------------------
def test_client_reads(hil_sim: HILSimulator) -> None:
    c = client(hil_sim)
    c.authenticate()
    c.check_project_access("bmi_infra")
    assert c.list_project_nodes("bmi_infra") == ["bmi_node", "cisco-01", "cisco-02"]
    assert c.node_mac("bmi_node", "bmi_port") == "52:54:00:00:00:01"
    assert c.node_mac("cisco-01", "enp130s0f1") == "52:54:00:00:01:02"
    assert c.node_project("bmi_node") == "bmi_infra"
    assert c.node_project("cisco-03") is None
    assert c.is_admin() is False
    assert client(hil_sim, ADMIN).is_admin() is True


def test_client_errors(hil_sim: HILSimulator) -> None:
    with pytest.raises(AuthenticationFailed, match="authentication failed"):
        client(hil_sim, ("haas", "wrong")).authenticate()
    with pytest.raises(AuthenticationFailed, match="does not exist"):
        client(hil_sim, ("nobody", "x")).authenticate()
    with pytest.raises(AuthenticationFailed, match="no access to project bmi_infra"):
        client(hil_sim, TENANT2).check_project_access("bmi_infra")
    with pytest.raises(ProjectNotFound):
        client(hil_sim).check_project_access("nope")
    with pytest.raises(NodeNotFound):
        client(hil_sim).node_mac("nope", "bmi_port")
    with pytest.raises(NicNotFound):
        client(hil_sim).node_mac("bmi_node", "nope")
    with pytest.raises(NicNotFound):
        client(hil_sim).connect_network("bmi_node", "nope", "bmi_network")
    with pytest.raises(NotFound, match="Network nope"):
        client(hil_sim).connect_network("bmi_node", "bmi_port", "nope")
    with pytest.raises(InvalidInput, match="not attached"):
        client(hil_sim).detach_network("bmi_node", "bmi_port", "bmi_network")


def test_client_connect_detach_roundtrip(sim: HILSimulator) -> None:
    c = client(sim)
    c.connect_network("t11", "eth0", "bmi_network")  # returns only when DONE
    assert c.nic_networks("t11", "eth0") == {"vlan/native": "bmi_network"}
    with pytest.raises(Conflict, match="already attached"):
        c.connect_network("t11", "eth0", "bmi_network")
    c.detach_network("t11", "eth0", "bmi_network")
    assert c.nic_networks("t11", "eth0") == {}


def test_client_pending_conflict_and_action_error(sim: HILSimulator) -> None:
    first = call(sim, "POST", "node/t12/nic/eth0/connect_network", body={"network": "bmi_network"})
    with pytest.raises(Conflict, match="already active"):
        client(sim).detach_network("t12", "eth0", "bmi_network")
    wait_action(sim, first.json()["status_id"])
    with pytest.raises(HILError, match="ERROR") as exc:
        # vlan/native is taken by bmi_network: trunk broken_net on its own VLAN.
        client(sim, channel="vlan/1500").connect_network("t12", "eth0", "broken_net")
    assert exc.value.status == 502


def test_client_power(sim: HILSimulator) -> None:
    c = client(sim)
    c.power_off("t10")
    c.power_cycle("t10", force=False)
    c.set_boot_device("t10", "disk")
    assert call(sim, "GET", "node/t10/power_status").json() == {"power_status": "on"}
    with pytest.raises(InvalidInput):
        c.set_boot_device("t10", "floppy")


def test_passwords_not_in_simulator_log(sim: HILSimulator) -> None:
    call(sim, "GET", "nodes/free", auth=("haas", "wrong-password-xyz"))
    log = sim.log_path.read_text()
    assert "GET /v0/nodes/free" in log
    assert "wrong-password-xyz" not in log and "admin1234" not in log and "pw3" not in log


# --- process lifecycle ---------------------------------------------------------------------------------
def test_start_and_stop_leave_nothing(tmp_path: Any) -> None:
    handle = start_hil_simulator(example_inventory(), tmp_path)
    assert call(handle, "GET", "nodes/free").status_code == 200
    pid = handle.proc.pid
    handle.stop()
    assert handle.proc.returncode == 0  # SIGTERM is a clean shutdown
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", handle.port)) != 0


def test_bad_inventory_fails_clearly(tmp_path: Any) -> None:
    inv = example_inventory()
    inv["nodes"].append({"name": "x", "project": "no_such_project", "nics": []})
    with pytest.raises(RuntimeError, match="unknown project"):
        start_hil_simulator(inv, tmp_path)


def test_sigint_also_stops(tmp_path: Any) -> None:
    handle = start_hil_simulator(example_inventory(), tmp_path)
    handle.proc.send_signal(signal.SIGINT)
    assert handle.proc.wait(10) == 0

"""The round trips provisioning saves (issue 8 item 3): behaviour, not timings.

* a HIL client (one per operation) reads a node once for its MAC and its NIC's networks, and
  reads it afresh after it changed the node;
* clients with the same credentials share one keep-alive HTTP session, other credentials do not;
* the RPC client sends calls about an operation to the worker that accepted it.
"""
from __future__ import annotations

import json
from typing import Any

from ims.einstein.hil import HILClient
from ims.rpc.client import EinsteinClient
from tests.unit.test_hil_client import NODE, ScriptedHIL, hil  # noqa: F401 - the fixture

CONNECT = "/v0/node/n1/nic/eth0/connect_network"


def node_reads(server: ScriptedHIL) -> int:
    return sum(1 for r in server.requests if r["method"] == "GET" and r["path"] == "/v0/node/n1")


def test_one_node_read_per_operation_and_fresh_after_a_change(hil: ScriptedHIL) -> None:  # noqa: F811
    attached = json.loads(json.dumps(NODE))
    attached["nics"][0]["networks"] = {"vlan/native": "net"}
    hil.route("GET", "/v0/node/n1", (200, NODE), (200, attached))
    hil.route("POST", CONNECT, (202, {"status_id": "abc"}))
    hil.route("GET", "/v0/networking_action/abc", (200, {"status": "DONE"}))
    c = HILClient(hil.url, "alice", "s3cret-pw")
    assert c.node_mac("n1", "eth0") == "52:54:00:ab:cd:ef"
    assert c.nic_networks("n1", "eth0") == {}
    assert node_reads(hil) == 1
    c.connect_network("n1", "eth0", "net")
    assert c.nic_networks("n1", "eth0") == {"vlan/native": "net"}  # not the record read before
    assert node_reads(hil) == 2
    # A new client (the next operation) reads the node again.
    assert HILClient(hil.url, "alice", "s3cret-pw").nic_networks("n1", "eth0") == {"vlan/native": "net"}
    assert node_reads(hil) == 3


def test_callers_cannot_change_the_cached_record(hil: ScriptedHIL) -> None:  # noqa: F811
    hil.route("GET", "/v0/node/n1", (200, NODE))
    c = HILClient(hil.url, "alice", "s3cret-pw")
    c.show_node("n1")["nics"].clear()
    assert c.node_mac("n1", "eth0") == "52:54:00:ab:cd:ef"


def test_sessions_shared_per_credentials(hil: ScriptedHIL) -> None:  # noqa: F811
    a, b = HILClient(hil.url, "alice", "pw-1"), HILClient(hil.url, "alice", "pw-1")
    other = HILClient(hil.url, "alice", "pw-2")
    assert a.session is b.session
    assert other.session is not a.session
    assert other.session.auth == ("alice", "pw-2")
    a.close()  # closing one client does not break the others' session
    hil.route("GET", "/v0/node/n1", (200, NODE))
    assert b.node_project("n1") == "proj"


class _Cfg:
    class rpc:  # noqa: N801 - mirrors the config section
        name_server_ip, name_server_port, hmac_key, timeout = "127.0.0.1", 1, "", 5.0


def test_rpc_calls_about_an_operation_go_to_its_worker(monkeypatch: Any) -> None:
    c = EinsteinClient(_Cfg())
    c._uris = ["PYRO:w0@127.0.0.1:1", "PYRO:w1@127.0.0.1:2"]
    sent: list[tuple[str, str]] = []

    class Proxy:
        def __init__(self, uri: str) -> None:
            self.uri = uri

        def call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            sent.append((method, self.uri))
            if method == "submit":
                return {"ok": True, "result": {"id": 7, "state": "queued"}}
            if method == "submit_batch":
                return {"ok": True, "result": [{"id": 8}, {"id": 9}]}
            return {"ok": True, "result": {"id": args[1], "state": "done"}}

    monkeypatch.setattr(c, "_connected", lambda uri: Proxy(uri))
    c.submit({"username": "u", "password": "p"}, "provision", {})
    owner = sent[-1][1]
    for _ in range(4):  # round-robin would alternate workers
        c.operation_wait({"username": "u", "password": "p"}, 7, 1.0)
        assert sent[-1] == ("operation_wait", owner)
    c.submit_batch({"username": "u", "password": "p"}, "provision", [{}, {}])
    batch_owner = sent[-1][1]
    c.operation_show({"username": "u", "password": "p"}, 9)
    assert sent[-1] == ("operation_show", batch_owner)
    c._uris = ["PYRO:w2@127.0.0.1:3"]  # the worker went away: any worker answers
    c.operation_wait({"username": "u", "password": "p"}, 7, 1.0)
    assert sent[-1] == ("operation_wait", "PYRO:w2@127.0.0.1:3")

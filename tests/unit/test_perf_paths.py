"""The round trips provisioning saves (issue 8 item 3): behaviour, not timings.

* clients with the same credentials share one keep-alive HTTP session, other credentials do not;
* the RPC client sends calls about an operation to the worker that accepted it.
"""
from __future__ import annotations

from typing import Any

from ims.einstein.hil import HILClient
from ims.rpc.client import EinsteinClient
from tests.unit.test_hil_client import NODE, ScriptedHIL, hil  # noqa: F401 - the fixture


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

"""HILClient against a tiny scripted HTTP server on 127.0.0.1: error mapping and polling."""
from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from ims.common.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    HILError,
    HILUnavailable,
    InvalidInput,
    InvalidName,
    NicNotFound,
    NodeNotFound,
    NotFound,
    ProjectNotFound,
)
from ims.einstein.hil import HILClient, NetIsolator

Reply = tuple[int, Any]  # (status, body): dict/list -> JSON (as HIL: text/html), str -> raw text
Handler = Callable[[dict[str, Any]], Reply]

HTML_404 = "<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
NODE = {"metadata": {}, "name": "n1", "project": "proj",
        "nics": [{"label": "eth0", "macaddr": "52:54:00:AB:CD:EF", "networks": {}}]}


class ScriptedHIL:
    """Routes ``(method, path)`` to handlers; records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[dict[str, Any]] = []
        script = self

        class RequestHandler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                       "body": self.rfile.read(length).decode() if length else ""}
                script.requests.append(req)
                handler = script.routes.get((self.command, self.path))
                status, body = handler(req) if handler else (404, HTML_404)
                text = body if isinstance(body, str) else json.dumps(body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]  # clients that timed out
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def route(self, method: str, path: str, *replies: Reply) -> None:
        """Answer with ``replies`` in order; the last one repeats."""
        queue = list(replies)

        def handler(req: dict[str, Any]) -> Reply:
            return queue.pop(0) if len(queue) > 1 else queue[0]
        self.routes[(method, path)] = handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hil() -> Iterator[ScriptedHIL]:
    server = ScriptedHIL()
    yield server
    server.close()


def client(hil: ScriptedHIL, **kwargs: Any) -> HILClient:
    return HILClient(hil.url, "alice", "s3cret-pw", **kwargs)


def err(type_: str, msg: str) -> dict[str, str]:
    return {"type": type_, "msg": msg}


# --- transport ------------------------------------------------------------------------------
def test_is_a_net_isolator_and_adds_v0_once(hil: ScriptedHIL) -> None:
    assert isinstance(client(hil), NetIsolator)
    assert HILClient("http://h:7000/", "u", "p").base_url == "http://h:7000/v0"
    assert HILClient("http://h:7000/v0/", "u", "p").base_url == "http://h:7000/v0"


def test_basic_auth_and_raw_json_body(hil: ScriptedHIL) -> None:
    hil.route("POST", "/v0/node/n1/power_cycle", (200, ""))
    hil.route("GET", "/v0/project/proj/nodes", (200, ["n1", "n2"]))
    c = client(hil)
    c.power_cycle("n1")
    assert c.list_project_nodes("proj") == ["n1", "n2"]
    post, get = hil.requests
    assert post["headers"]["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert post["headers"]["Content-Type"] == "application/json"
    assert json.loads(post["body"]) == {"force": False}
    assert get["body"] == "" and "Content-Type" not in get["headers"]


def test_power_and_bootdev_bodies(hil: ScriptedHIL) -> None:
    hil.route("POST", "/v0/node/n1/power_cycle", (200, ""))
    hil.route("POST", "/v0/node/n1/power_off", (200, ""))
    hil.route("PUT", "/v0/node/n1/boot_device", (200, ""))
    c = client(hil)
    c.power_cycle("n1", force=True)
    c.power_off("n1")
    c.set_boot_device("n1", "pxe")
    assert [json.loads(r["body"]) for r in hil.requests] == [{"force": True}, {}, {"bootdev": "pxe"}]


def test_invalid_names_never_reach_hil(hil: ScriptedHIL) -> None:
    with pytest.raises(InvalidName):
        client(hil).show_node("../etc")
    with pytest.raises(InvalidName):
        client(hil).connect_network("n1", "eth0\n", "net")
    assert hil.requests == []


# --- reads -----------------------------------------------------------------------------------
def test_node_mac_is_normalized_and_unknown_nic_is_nic_not_found(hil: ScriptedHIL) -> None:
    hil.route("GET", "/v0/node/n1", (200, NODE))
    c = client(hil)
    assert c.node_mac("n1", "eth0") == "52:54:00:ab:cd:ef"
    assert c.node_project("n1") == "proj"
    assert c.nic_networks("n1", "eth0") == {}
    with pytest.raises(NicNotFound, match="eth9"):
        c.node_mac("n1", "eth9")


def test_free_node_has_no_project(hil: ScriptedHIL) -> None:
    hil.route("GET", "/v0/node/n1", (200, dict(NODE, project=None)))
    assert client(hil).node_project("n1") is None


# --- error mapping ---------------------------------------------------------------------------
def test_html_404_does_not_crash(hil: ScriptedHIL) -> None:
    with pytest.raises(NotFound, match="no route") as exc:
        client(hil).authenticate()  # no route scripted: the server's HTML 404
    assert exc.value.status == 404


@pytest.mark.parametrize("status,body,exc_type,text", [
    (401, err("AuthorizationError", "Authentication failed. Authentication is required to use this service."),
     AuthenticationFailed, "authentication failed"),
    (401, err("AuthorizationError", "You do not have access to the required project."),
     AuthenticationFailed, "no access to project proj"),
    (404, err("NotFoundError", "User alice does not exist."), AuthenticationFailed, "does not exist"),
    (404, err("NotFoundError", "Project proj does not exist."), ProjectNotFound, "proj"),
    (403, err("Forbidden", "nope"), Forbidden, "nope"),
    (500, "<html>Internal Server Error</html>", HILUnavailable, "500"),
    (502, err("OBMError", "bad gateway"), HILUnavailable, "bad gateway"),
])
def test_status_mapping(hil: ScriptedHIL, status: int, body: Any, exc_type: type, text: str) -> None:
    hil.route("GET", "/v0/project/proj/nodes", (status, body))
    with pytest.raises(exc_type, match=text) as exc:
        client(hil).check_project_access("proj")
    assert type(exc.value) is exc_type
    assert exc.value.status == exc_type.status


def test_404_kinds_on_network_calls(hil: ScriptedHIL) -> None:
    path = "/v0/node/n1/nic/eth0/connect_network"
    c = client(hil)
    hil.route("POST", path, (404, err("NotFoundError", "Node n1 does not exist.")))
    with pytest.raises(NodeNotFound):
        c.connect_network("n1", "eth0", "net")
    hil.route("POST", path, (404, err("NotFoundError", "Nic eth0 on node n1 does not exist.")))
    with pytest.raises(NicNotFound):
        c.connect_network("n1", "eth0", "net")
    hil.route("POST", path, (404, err("NotFoundError", "Network net does not exist.")))
    with pytest.raises(NotFound, match="Network net") as exc:
        c.connect_network("n1", "eth0", "net")
    assert type(exc.value) is NotFound


def test_409_and_400(hil: ScriptedHIL) -> None:
    c = client(hil)
    hil.route("POST", "/v0/node/n1/nic/eth0/connect_network",
              (409, err("BlockedError", "The network is already attached to the nic.")))
    with pytest.raises(Conflict, match="already attached"):
        c.connect_network("n1", "eth0", "net")
    hil.route("POST", "/v0/node/n1/nic/eth0/detach_network",
              (400, err("BadArgumentError", "The network is not attached to the nic.")))
    with pytest.raises(InvalidInput, match="not attached"):
        c.detach_network("n1", "eth0", "net")


def test_unexpected_status_is_hil_error(hil: ScriptedHIL) -> None:
    hil.route("GET", "/v0/node/n1", (418, "teapot"))
    with pytest.raises(HILError) as exc:
        client(hil).show_node("n1")
    assert exc.value.status == 502


def test_is_admin(hil: ScriptedHIL) -> None:
    hil.route("GET", "/v0/projects", (200, ["a"]))
    assert client(hil).is_admin() is True
    hil.route("GET", "/v0/projects", (401, err("AuthorizationError", "This operation is administrator-only.")))
    assert client(hil).is_admin() is False


def test_unreachable_server_is_hil_unavailable() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = HILClient(f"http://127.0.0.1:{port}", "u", "p", timeout=0.5)
    with pytest.raises(HILUnavailable, match=f"cannot reach HIL at http://127.0.0.1:{port}/v0") as exc:
        c.authenticate()
    assert exc.value.status == 503


def test_slow_server_times_out(hil: ScriptedHIL) -> None:
    def slow(req: dict[str, Any]) -> Reply:
        time.sleep(1.5)
        return 200, []
    hil.routes[("GET", "/v0/nodes/free")] = slow
    start = time.monotonic()
    with pytest.raises(HILUnavailable, match="cannot reach HIL"):
        client(hil, timeout=0.2).authenticate()
    assert time.monotonic() - start < 1.4


def test_password_never_logged_or_shown(hil: ScriptedHIL, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hil.route("GET", "/v0/nodes/free", (401, err("AuthorizationError", "Authentication failed.")))
    c = client(hil)
    with pytest.raises(AuthenticationFailed) as exc:
        c.authenticate()
    assert "s3cret-pw" not in str(exc.value) and "s3cret-pw" not in repr(c)
    assert "s3cret-pw" not in caplog.text
    assert "/nodes/free" in caplog.text


# --- networking actions -------------------------------------------------------------------------
CONNECT = "/v0/node/n1/nic/eth0/connect_network"
DETACH = "/v0/node/n1/nic/eth0/detach_network"


def action(status: str) -> Reply:
    return 200, {"status": status, "node": "n1", "nic": "eth0", "new_network": "net", "type": "modify_port",
                 "channel": "vlan/native"}


def test_connect_polls_until_done(hil: ScriptedHIL) -> None:
    hil.route("POST", CONNECT, (202, {"status_id": "abc"}))
    hil.route("GET", "/v0/networking_action/abc", action("PENDING"), action("PENDING"), action("DONE"))
    client(hil).connect_network("n1", "eth0", "net")
    assert [r["path"] for r in hil.requests].count("/v0/networking_action/abc") == 3
    assert json.loads(hil.requests[0]["body"]) == {"network": "net", "channel": "vlan/native"}


def test_channel_is_configurable(hil: ScriptedHIL) -> None:
    hil.route("POST", CONNECT, (202, {"status_id": "abc"}))
    hil.route("GET", "/v0/networking_action/abc", action("DONE"))
    client(hil, channel="vlan/1001").connect_network("n1", "eth0", "net")
    assert json.loads(hil.requests[0]["body"])["channel"] == "vlan/1001"


def test_action_error_is_hil_error_502(hil: ScriptedHIL) -> None:
    hil.route("POST", DETACH, (202, {"status_id": "abc"}))
    hil.route("GET", "/v0/networking_action/abc", action("PENDING"), action("ERROR"))
    with pytest.raises(HILError, match="ERROR") as exc:
        client(hil).detach_network("n1", "eth0", "net")
    assert exc.value.status == 502 and "detach network net from node n1 nic eth0" in str(exc.value)


def test_action_timeout_is_hil_unavailable(hil: ScriptedHIL) -> None:
    hil.route("POST", CONNECT, (202, {"status_id": "abc"}))
    hil.route("GET", "/v0/networking_action/abc", action("PENDING"))
    start = time.monotonic()
    with pytest.raises(HILUnavailable, match="still pending after 0.3 s") as exc:
        client(hil, action_timeout=0.3).connect_network("n1", "eth0", "net")
    assert exc.value.status == 503
    assert 0.3 <= time.monotonic() - start < 2.0
    polls = [r for r in hil.requests if r["path"] == "/v0/networking_action/abc"]
    assert 2 <= len(polls) <= 6  # backed off, not a busy loop


def test_superseded_action_decides_from_the_nic(hil: ScriptedHIL) -> None:
    attached = dict(NODE, nics=[dict(NODE["nics"][0], networks={"vlan/native": "net"})])
    hil.route("POST", CONNECT, (202, {"status_id": "old"}))
    hil.route("GET", "/v0/networking_action/old", (404, err("NotFoundError", "status_id not found")))
    hil.route("GET", "/v0/node/n1", (200, attached))
    client(hil).connect_network("n1", "eth0", "net")  # attached: success

    hil.route("GET", "/v0/node/n1", (200, NODE))
    with pytest.raises(Conflict, match="replaced"):
        client(hil).connect_network("n1", "eth0", "net")


def test_hil_v02_empty_202_polls_the_nic(hil: ScriptedHIL) -> None:
    attached = dict(NODE, nics=[dict(NODE["nics"][0], networks={"vlan/native": "net"})])
    hil.route("POST", CONNECT, (202, ""))
    hil.route("GET", "/v0/node/n1", (200, NODE), (200, NODE), (200, attached))
    client(hil).connect_network("n1", "eth0", "net")
    assert [r["path"] for r in hil.requests].count("/v0/node/n1") == 3


# --- the simulator's power hook (in-process, fake QemuNode) ---------------------------------------
class FakeQemuNode:
    instances: ClassVar[list[FakeQemuNode]] = []

    def __init__(self, name: str, mac: str, **options: Any) -> None:
        self.name, self.mac, self.options = name, mac, options
        self.calls: list[str] = []
        self.running = False
        FakeQemuNode.instances.append(self)

    def power_cycle(self) -> None:
        self.calls.append("power_cycle")
        self.running = True

    def power_off(self) -> None:
        self.calls.append("power_off")
        self.running = False

    def is_running(self) -> bool:
        return self.running

    def stop(self) -> None:
        self.calls.append("stop")


def test_simulator_drives_vm_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from hilsim import create_app

    fake_vm = types.ModuleType("hilsim.vm")
    fake_vm.QemuNode = FakeQemuNode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hilsim.vm", fake_vm)
    FakeQemuNode.instances.clear()
    inventory = {
        "projects": ["p"],
        "users": [{"name": "u", "password": "pw", "projects": ["p"]}],
        "nodes": [{"name": "vm1", "project": "p", "nics": [{"label": "eth0", "macaddr": "52:54:00:00:00:09"}],
                   "vm": {"memory": 256}},
                  {"name": "plain", "project": "p", "nics": [{"label": "eth0", "macaddr": "52:54:00:00:00:0a"}]}],
    }
    app = create_app(inventory, action_delay=0.0)
    (vm,) = FakeQemuNode.instances  # only the node with "vm" gets a QemuNode
    assert (vm.name, vm.mac, vm.options) == ("vm1", "52:54:00:00:00:09", {"memory": 256})
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:pw").decode()}
    web = app.test_client()
    assert json.loads(web.get("/v0/node/vm1/power_status", headers=auth).data) == {"power_status": "off"}
    assert web.post("/v0/node/vm1/power_cycle", data='{"force": false}', headers=auth).status_code == 200
    assert json.loads(web.get("/v0/node/vm1/power_status", headers=auth).data) == {"power_status": "on"}
    assert web.post("/v0/node/vm1/power_off", headers=auth).status_code == 200
    assert web.post("/v0/node/plain/power_cycle", data="{}", headers=auth).status_code == 200
    assert json.loads(web.get("/v0/node/plain/power_status", headers=auth).data) == {"power_status": "on"}
    app.extensions["hilsim"].close()
    assert vm.calls == ["power_cycle", "power_off", "stop"]


def test_proxy_settings_of_the_environment_are_honoured(hil: ScriptedHIL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's proxy settings (read once per HTTP session) still apply: through the proxy
    they name, unless ``no_proxy`` lists HIL's host."""
    monkeypatch.setenv("http_proxy", hil.url)  # the scripted server stands in for the proxy
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    hil.route("GET", "http://hil.invalid:7000/v0/node/n1", (200, NODE))
    proxied = HILClient("http://hil.invalid:7000", "alice", "s3cret-pw")  # never resolved: the proxy is asked
    assert proxied.show_node("n1")["name"] == "n1"
    assert proxied.show_node("n1")["name"] == "n1"
    assert [r["path"] for r in hil.requests] == ["http://hil.invalid:7000/v0/node/n1"] * 2
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed.getsockname()[1]}")  # nothing listens there
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    hil.route("GET", "/v0/node/n1", (200, NODE))
    direct = HILClient(hil.url + "/", "alice", "s3cret-pw")
    assert direct.show_node("n1")["name"] == "n1" and hil.requests[-1]["path"] == "/v0/node/n1"
    closed.close()

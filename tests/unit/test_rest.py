"""Picasso through Flask's test client with the in-memory fake operations."""
from __future__ import annotations

import base64
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.common import config as bmi_config
from ims.picasso.app import create_app
from ims.picasso.openapi import document
from tests.support.fake_ops import FakeOperations

CFG_TEXT = ("[bmi]\nuid = fake\n[net_isolator]\nurl = http://127.0.0.1:1\nauth_cache_seconds = 30\n"
            "[iscsi]\nip = 127.0.0.1\n")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ALICE = basic("alice", "alice-pw")
BOB = basic("bob", "bob-pw")
ADMIN = basic("admin", "admin-pw")


@pytest.fixture()
def ops() -> FakeOperations:
    return FakeOperations()


@pytest.fixture()
def web(ops: FakeOperations) -> Any:
    cfg = bmi_config.parse("test.cfg", text=CFG_TEXT)
    return create_app(cfg, client=ops).test_client()


def err(resp: Any, status: int, type_: str | None = None, text: str | None = None) -> None:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()["error"]
    assert body["status"] == status
    if type_:
        assert body["type"] == type_
    if text:
        assert text in body["message"]


def is_success(resp: Any) -> None:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_data(as_text=True) == "Success"
    assert resp.mimetype == "text/plain"


# --- legacy form API ---------------------------------------------------------------------------
def test_legacy_provision_snapshot_deprovision_flow(web: Any, ops: FakeOperations) -> None:
    form = {"project": "proj1", "node": "node1", "img": "golden", "network": "net1", "nic": "eno1"}
    is_success(web.put("/provision/", data=form, headers=ALICE))
    assert ("provision", ("proj1", "node1", "golden", "net1", "eno1")) in ops.calls
    err(web.put("/provision/", data=form, headers=ALICE), 409, "NodeAlreadyProvisioned")
    is_success(web.put("/create_snapshot/", data={"project": "proj1", "node": "node1", "snap_name": "s1"},
                       headers=ALICE))
    resp = web.post("/list_snapshots/", data={"project": "proj1"}, headers=ALICE)
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert ["s1", "golden"] in resp.get_json()
    is_success(web.delete("/deprovision/", data={"project": "proj1", "node": "node1", "network": "net1",
                                                  "nic": "eno1"}, headers=ALICE))
    err(web.delete("/deprovision/", data={"project": "proj1", "node": "node1", "network": "net1", "nic": "eno1"},
                   headers=ALICE), 404, "NodeNotProvisioned")


def test_legacy_list_and_remove_images(web: Any) -> None:
    resp = web.post("/list_images/", data={"project": "proj1"}, headers=ALICE)
    assert resp.status_code == 200 and resp.get_json() == ["golden"]
    err(web.delete("/remove_image/", data={"project": "proj1", "img": "golden"}, headers=ALICE), 409, "ImageBusy")
    is_success(web.delete("/remove_image/", data={"project": "proj1", "img": "golden-snap"}, headers=ALICE))
    err(web.delete("/remove_image/", data={"project": "proj1", "img": "golden-snap"}, headers=ALICE), 404,
        "ImageNotFound", "golden-snap")


def test_legacy_split_api_disks(web: Any, ops: FakeOperations) -> None:
    resp = web.put("/create_disk", data={"project": "proj1", "disk_name": "d1", "img": "golden"}, headers=ALICE)
    assert resp.status_code == 200 and resp.get_json() == "fakeimg4"
    is_success(web.put("/provision/", data={"project": "proj1", "node": "node2", "disk_name": "d1", "nic": "eno1"},
                       headers=ALICE))
    assert ops.provisioned[("proj1", "node2")] == "d1"
    is_success(web.put("/create_snapshot/", data={"project": "proj1", "disk_name": "d1", "snap_name": "ds"},
                       headers=ALICE))
    is_success(web.delete("/deprovision/", data={"project": "proj1", "node": "node2", "nic": "eno1"},
                          headers=ALICE))
    is_success(web.delete("/delete_disk", data={"project": "proj1", "disk_name": "d1"}, headers=ALICE))
    err(web.delete("/delete_disk", data={"project": "proj1", "disk_name": "d1"}, headers=ALICE), 404)


def test_legacy_errors(web: Any) -> None:
    resp = web.post("/list_images/", data={"project": "proj1"})
    err(resp, 401, "AuthenticationFailed")
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    err(web.post("/list_images/", data={"project": "proj1"}, headers=basic("alice", "nope")), 401)
    err(web.post("/list_images/", data={}, headers=ALICE), 400, "InvalidInput", "'project'")
    err(web.put("/provision/", data={"project": "proj1", "node": "node1", "img": "golden", "nic": "x"},
                headers=ALICE), 400, "InvalidInput", "'network'")
    err(web.post("/list_images/", data={"project": "../etc"}, headers=ALICE), 400, "InvalidName")
    err(web.put("/create_snapshot/", data={"project": "proj1", "node": "node1", "snap_name": "a\nb"},
                headers=ALICE), 400, "InvalidName")
    err(web.post("/list_images/", data={"project": "proj1"}, headers=BOB), 403, "Forbidden")
    err(web.post("/list_images/", data={"project": "nope"}, headers=ALICE), 404, "ProjectNotFound")
    err(web.get("/list_images/", headers=ALICE), 405, "MethodNotAllowed")
    err(web.get("/no/such/route", headers=ALICE), 404, "NotFound")
    err(web.put("/provision/", data={"project": "proj1", "node": "broken", "img": "golden", "network": "n",
                                     "nic": "e"}, headers=ALICE), 503, "StorageError")


def test_unexpected_exception_is_json_500(ops: FakeOperations) -> None:
    class Exploding(FakeOperations):
        def list_images(self, auth: Any, project: str) -> list[str]:
            raise RuntimeError("secret internals")

    app = create_app(bmi_config.parse("t.cfg", text=CFG_TEXT), client=Exploding())
    resp = app.test_client().post("/list_images/", data={"project": "proj1"}, headers=ALICE)
    err(resp, 500, "InternalError")
    assert "secret" not in resp.get_data(as_text=True)


def test_auth_cache_only_caches_success(web: Any, ops: FakeOperations) -> None:
    for _ in range(3):
        assert web.get("/v1/projects/proj1/images", headers=ALICE).status_code == 200
    assert [c for c in ops.calls if c[0] == "check_auth"] == [("check_auth", ("proj1",))]
    for _ in range(2):
        err(web.get("/v1/projects/proj1/images", headers=basic("alice", "bad")), 401)
    assert len([c for c in ops.calls if c[0] == "check_auth"]) == 3


def test_auth_cache_key_never_holds_the_password() -> None:
    from ims.picasso.auth import AuthCache

    cache = AuthCache(30)
    cache.remember({"username": "u", "password": "hunter2"}, "p")
    assert "hunter2" not in repr(cache._until)
    assert cache.valid({"username": "u", "password": "hunter2"}, "p")
    assert not cache.valid({"username": "u", "password": "other"}, "p")


# --- /v1 JSON API --------------------------------------------------------------------------------
def test_v1_images(web: Any) -> None:
    assert web.get("/v1/projects/proj1/images", headers=ALICE).get_json() == {"result": ["golden"]}
    resp = web.post("/v1/projects/proj1/images", json={"name": "new", "snapshot": "s", "protect": True},
                    headers=ALICE)
    assert resp.status_code == 201 and resp.get_json() == {"result": None}
    err(web.post("/v1/projects/proj1/images", json={"name": "new"}, headers=ALICE), 409, "ImageExists")
    err(web.post("/v1/projects/proj1/images", json={}, headers=ALICE), 400, "InvalidInput", "'name'")
    err(web.post("/v1/projects/proj1/images", json={"name": "a b"}, headers=ALICE), 400, "InvalidName")
    err(web.post("/v1/projects/proj1/images", data="nojson", headers=ALICE), 400, "InvalidInput")
    err(web.post("/v1/projects/proj1/images", json={"name": "x", "protect": "yes"}, headers=ALICE), 400)
    assert web.post("/v1/projects/proj1/images/new/export", json={"name": "out"}, headers=ALICE).status_code == 200
    resp = web.delete("/v1/projects/proj1/images/new", headers=ALICE)
    assert resp.status_code == 204 and resp.get_data() == b""
    err(web.delete("/v1/projects/proj1/images/new", headers=ALICE), 404, "ImageNotFound")
    err(web.put("/v1/projects/proj1/images", headers=ALICE), 405)


def test_v1_copy_move_need_admin_across_projects(web: Any, ops: FakeOperations) -> None:
    assert web.post("/v1/projects/proj1/images/golden/copy", json={"dest_project": "proj1", "dest_name": "g2"},
                    headers=ALICE).status_code == 201
    err(web.post("/v1/projects/proj1/images/golden/copy", json={"dest_project": "proj2"}, headers=ALICE), 403)
    err(web.post("/v1/projects/proj1/images/g2/move", json={"dest_project": "proj2"}, headers=ALICE), 403)
    assert web.post("/v1/projects/proj1/images/g2/move", json={"dest_project": "proj2", "dest_name": "g3"},
                    headers=ADMIN).status_code == 201
    assert ops._find("proj2", "g3") and not ops._find("proj1", "g2")
    assert web.post("/v1/projects/proj1/images/golden/copy", json={"dest_project": "proj2"},
                    headers=ADMIN).status_code == 201
    err(web.post("/v1/projects/proj1/images/golden/copy", json={}, headers=ADMIN), 400, text="'dest_project'")


def test_v1_nodes_and_snapshots(web: Any) -> None:
    base = "/v1/projects/proj1/nodes/node1"
    assert web.post(f"{base}/provision", json={"image": "golden", "network": "n", "nic": "e"},
                    headers=ALICE).get_json() == {"result": None}
    err(web.post(f"{base}/provision", json={"image": "golden", "network": "n", "nic": "e"}, headers=ALICE), 409)
    err(web.post(f"{base}/provision", json={"image": "golden", "nic": "e"}, headers=ALICE), 400, text="'network'")
    err(web.post("/v1/projects/proj1/nodes/ghost/provision", json={"image": "golden", "network": "n", "nic": "e"},
                 headers=ALICE), 404, "NodeNotFound")
    err(web.post("/v1/projects/proj1/nodes/broken/provision", json={"image": "golden", "network": "n", "nic": "e"},
                 headers=ALICE), 503, "StorageError")
    assert web.get("/v1/projects/proj1/nodes", headers=ALICE).get_json() == {"result": [["node1", "golden"]]}
    assert web.post(f"{base}/snapshots", json={"name": "snap1"}, headers=ALICE).status_code == 201
    assert ["snap1", "golden"] in web.get("/v1/projects/proj1/snapshots", headers=ALICE).get_json()["result"]
    assert web.delete("/v1/projects/proj1/snapshots/snap1", headers=ALICE).status_code == 204
    assert web.get(f"{base}/ip", headers=ALICE).get_json() == {"result": "10.0.0.11"}
    assert web.post(f"{base}/deprovision", json={"network": "n", "nic": "e"}, headers=ALICE).status_code == 200
    err(web.post(f"{base}/deprovision", json={"network": "n", "nic": "e"}, headers=ALICE), 404)


def test_v1_iscsi_and_disks(web: Any) -> None:
    resp = web.post("/v1/projects/proj1/iscsi", json={"image": "golden"}, headers=ALICE)
    assert resp.status_code == 201 and resp.get_json()["result"].endswith("fakeimg1")
    err(web.post("/v1/projects/proj1/iscsi", json={"image": "golden"}, headers=ALICE), 409, "TargetExists")
    assert web.get("/v1/projects/proj1/iscsi", headers=ALICE).get_json()["result"][0][0] == "golden"
    assert web.delete("/v1/projects/proj1/iscsi/golden", headers=ALICE).status_code == 204
    err(web.delete("/v1/projects/proj1/iscsi/golden", headers=ALICE), 404, "TargetNotFound")
    resp = web.post("/v1/projects/proj1/disks", json={"name": "d1", "image": "golden"}, headers=ALICE)
    assert resp.status_code == 201 and resp.get_json() == {"result": "fakeimg4"}
    assert web.get("/v1/projects/proj1/disks", headers=ALICE).get_json() == {"result": [["d1", "golden"]]}
    assert web.post("/v1/projects/proj1/nodes/node2/provision", json={"disk": "d1", "nic": "e"},
                    headers=ALICE).status_code == 200
    assert web.post("/v1/projects/proj1/nodes/node2/deprovision", json={"nic": "e"}, headers=ALICE).status_code == 200
    assert web.delete("/v1/projects/proj1/disks/d1", headers=ALICE).status_code == 204
    err(web.delete("/v1/projects/proj1/disks/d1", headers=ALICE), 404)


def test_v1_projects_admin(web: Any) -> None:
    assert web.get("/v1/projects", headers=BOB).get_json() == {"result": [[2, "proj2", "prov-net2"]]}
    err(web.get("/v1/projects"), 401)
    err(web.post("/v1/projects", json={"name": "p3", "network": "n3"}, headers=ALICE), 403, "Forbidden")
    assert web.post("/v1/projects", json={"name": "p3", "network": "n3", "id": 7}, headers=ADMIN).status_code == 201
    assert [7, "p3", "n3"] in web.get("/v1/projects", headers=ADMIN).get_json()["result"]
    err(web.post("/v1/projects", json={"name": "p3"}, headers=ADMIN), 409, "ProjectExists")
    err(web.post("/v1/projects", json={"name": "p4", "id": "x"}, headers=ADMIN), 400)
    err(web.delete("/v1/projects/p3", headers=ALICE), 403)
    assert web.delete("/v1/projects/p3", headers=ADMIN).status_code == 204
    err(web.delete("/v1/projects/p3", headers=ADMIN), 404, "ProjectNotFound")


def test_v1_db(web: Any) -> None:
    rows = web.get("/v1/db/images", headers=ALICE).get_json()["result"]
    assert rows[0] == [1, "golden", "proj1", "fakeimg1", True, False, ""]
    assert [r[1] for r in web.get("/v1/db/images?snapshots=true", headers=ALICE).get_json()["result"]] == \
        ["golden-snap"]
    assert [r[1] for r in web.get("/v1/db/images?project=proj2", headers=ALICE).get_json()["result"]] == ["other"]
    err(web.get("/v1/db/images?project=proj1", headers=BOB), 403)
    err(web.get("/v1/db/images?snapshots=maybe", headers=ALICE), 400)
    err(web.post("/v1/db/images", json={"project": "proj1", "name": "r"}, headers=ALICE), 403)
    assert web.post("/v1/db/images", json={"project": "proj1", "name": "r", "id": 40, "snapshot": True,
                                           "parent": "golden", "public": True}, headers=ADMIN).status_code == 201
    assert [40, "r", "proj1", "fakeimg40", True, True, "golden"] in \
        web.get("/v1/db/images?name=r", headers=ADMIN).get_json()["result"]
    err(web.delete("/v1/db/images/proj1/r", headers=ALICE), 403)
    assert web.delete("/v1/db/images/proj1/r", headers=ADMIN).status_code == 204
    err(web.delete("/v1/db/images/proj1/r", headers=ADMIN), 404)


def test_v1_reconcile(web: Any) -> None:
    err(web.post("/v1/admin/reconcile", headers=ALICE), 403)
    assert web.post("/v1/admin/reconcile", headers=ADMIN).get_json()["result"]["drift"] == []
    assert web.post("/v1/admin/reconcile", headers=ADMIN).get_json()["result"]["repaired"] is False
    assert web.post("/v1/admin/reconcile", headers=ADMIN, json={"repair": True}).get_json()["result"]["repaired"]
    err(web.post("/v1/admin/reconcile", headers=ADMIN, json={"repair": "yes"}), 400)


def test_v1_unknown_route_and_method_are_json(web: Any) -> None:
    err(web.get("/v1/nothing", headers=ALICE), 404, "NotFound")
    resp = web.delete("/v1/projects/proj1/snapshots", headers=ALICE)
    err(resp, 405, "MethodNotAllowed")
    assert "GET" in resp.headers["Allow"]


def test_openapi_lists_every_v1_route(web: Any) -> None:
    resp = web.get("/v1/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc == document() and doc["openapi"].startswith("3.")
    app = web.application
    routes: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/"):
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((path, method.lower()))
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented

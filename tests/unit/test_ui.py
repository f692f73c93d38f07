"""The web console (/ui/) through Flask's test client, backed by the REAL Operations over the fake
drivers (tests/support/fake_ops.py); the browser test against a real stack is
tests/integration/test_ui_browser_real.py."""
from __future__ import annotations

from typing import Any

import pytest

from ims.einstein.ops.console import parse_sessions
from ims.picasso.ui import human_size, image_tree
from tests.support.fake_ops import ALICE as ALICE_AUTH
from tests.support.fake_ops import InProcessClient, World
from tests.support.web import ADMIN, ALICE, BOB, basic, cfg_text, picasso_client, rpc, world

__all__ = ["rpc", "world"]  # fixtures (tests/support/web.py)

CFG_TEXT = cfg_text(auth_cache_seconds=0)


@pytest.fixture()
def web(rpc: InProcessClient) -> Any:
    return picasso_client(CFG_TEXT, rpc)


def page(resp: Any, status: int = 200) -> str:
    text = resp.get_data(as_text=True)
    assert resp.status_code == status, text
    assert resp.mimetype == "text/html"
    assert "script-src" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    return text


def test_index_lists_only_the_callers_projects(web: Any) -> None:
    alice = page(web.get("/ui/", headers=ALICE))
    assert 'href="/ui/projects/proj1"' in alice and 'href="/ui/projects/proj2"' in alice
    bob = page(web.get("/ui/", headers=BOB))
    assert 'href="/ui/projects/proj2"' in bob and "proj1" not in bob
    admin = page(web.get("/ui/", headers=ADMIN))
    assert "proj1" in admin and "proj2" in admin and "(administrator)" in admin


def test_project_page_shows_the_image_tree_nodes_and_operations(web: Any, world: World) -> None:
    world.ops.provision(ALICE_AUTH, "proj1", "node2", "golden-snap", "prov-net", "eno1")
    resp = web.post("/v1/projects/proj1/images", headers=ALICE, json={"name": "newimg"})
    assert resp.status_code == 202
    text = page(web.get("/ui/projects/proj1", headers=ALICE))
    # golden -> golden-snap -> node2's clone, nested in that order
    golden = text.index('data-name="golden"')
    snap = text.index('data-name="golden-snap"', golden)
    clone = text.index('data-kind="node"', snap)
    assert text.index("</li>", clone) < text.index("</ul>", clone) and golden < snap < clone
    assert "4.0 KiB" in text
    assert '<tr data-node="node2">' in text and "iqn.2017-10.org.moc.bmi:fake" in text
    assert "tgtd could not be asked" in text  # the fake iSCSI driver has no sessions to show
    assert "import_image" in text and "img=newimg" in text
    assert "other" not in text.split('id="images"')[1].split("</ul>")[0]  # proj2's image is not in proj1
    # let the import finish before the world closes under it
    op = resp.get_json()["result"]["id"]
    assert web.get(f"/v1/operations/{op}?wait=30", headers=ALICE).get_json()["result"]["state"] == "done"


def test_tenant_cannot_open_another_tenants_project(web: Any) -> None:
    main = page(web.get("/ui/projects/proj1", headers=BOB), 403).split("<main>")[1]
    assert "Forbidden" in main and "golden" not in main and "node1" not in main
    page(web.get("/ui/projects/nosuch", headers=ADMIN), 404)
    page(web.get("/ui/projects/-bad", headers=ALICE), 400)
    assert "golden" in page(web.get("/ui/projects/proj1", headers=ADMIN))


def test_credentials_are_asked_for_and_checked(web: Any) -> None:
    resp = web.get("/ui/")
    page(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    page(web.get("/ui/", headers=basic("alice", "wrong")), 401)
    page(web.get("/ui/?x=1", headers=ALICE), 400)


def test_names_from_users_are_escaped(web: Any, world: World) -> None:
    hostile = '<script>alert("x")</script>'
    world.hil.add_user(hostile, "pw", ["proj1"])
    text = page(web.get("/ui/projects/proj1", headers=basic(hostile, "pw")))
    assert hostile not in text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text


def test_parse_sessions_reads_the_i_t_nexus_lines() -> None:
    show = """Target 1: iqn.2017-10.org.moc.bmi:uidimg3
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 4
            Initiator: iqn.2017-10.org.moc.bmi.node:node1 alias: node1
            Connection: 0
                IP Address: 10.0.0.11
    LUN information:
        LUN: 0
            Type: controller
    ACL information:
        iqn.2017-10.org.moc.bmi.node:node1
Target 2: iqn.2017-10.org.moc.bmi:uidimg4
    System information:
        Driver: iscsi
    I_T nexus information:
    LUN information:
        LUN: 1
            Backing store path: rbd/uidimg4
"""
    assert parse_sessions(show) == {
        "iqn.2017-10.org.moc.bmi:uidimg3": [{"initiator": "iqn.2017-10.org.moc.bmi.node:node1",
                                             "address": "10.0.0.11"}],
        "iqn.2017-10.org.moc.bmi:uidimg4": []}
    assert parse_sessions("") == {}


def test_helpers() -> None:
    assert human_size(None) == "missing" and human_size(512) == "512 B" and human_size(3 << 30) == "3.0 GiB"
    rows = [{"name": "g", "parent": ""}, {"name": "s", "parent": "g"}, {"name": "c", "parent": "s"},
            {"name": "orphan", "parent": "elsewhere"}]
    tree = image_tree(rows)
    assert [r["name"] for r in tree] == ["g", "orphan"]
    assert tree[0]["children"][0]["children"][0]["name"] == "c"


def test_running_and_queued_operations_with_progress(web: Any, world: World) -> None:
    rpc = web.application.extensions["bmi"]["client"]
    standin = rpc.use_standin()
    standin.gate.clear()  # hold the queue: the operations stay queued
    try:
        for name in ("newimg", "new"):
            assert web.post("/v1/projects/proj1/images", headers=ALICE, json={"name": name}).status_code == 202
        with standin._cond:  # the first one as a running operation would look (progress from its journal)
            standin._queue.popleft()
            standin._records[1].update(state="running", progress=40, steps_done=2, step="storage.clone",
                                       started_at=standin._records[1]["created_at"])
        text = page(web.get("/ui/projects/proj1", headers=ALICE))
        active = text.split('id="operations-active"')[1].split("</table>")[0]
        assert active.index("img=newimg") < active.index("img=new<")  # running first, then the queue
        assert '<progress max="100" value="40"></progress> 40%' in active and "storage.clone" in active
        assert "queued (#1 in queue)" in active and 'http-equiv="refresh"' in text
        assert "img=newimg" in page(web.get("/ui/", headers=ALICE))
        assert "newimg" not in page(web.get("/ui/", headers=BOB))  # bob may not see proj1's operations
    finally:
        standin.gate.set()
        # let the queued one finish before the world closes under it
        assert standin.operation_wait(ALICE_AUTH, 2, 30.0)["state"] in ("done", "failed")

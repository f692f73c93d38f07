"""The last original BMI version's CLI forms (`bmi pro PROJECT NODE DISK NIC`, `bmi dpro PROJECT NODE NIC`),
told apart from the guide's by argument count, and `bmi db ls --project` for a project HIL does not know;
against a REAL Picasso over the real Operations (the fixtures of test_cli.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.cli.main import cli
from tests.support.fake_ops import World
from tests.unit.test_cli import fails, ok, picasso, rpc, run, world  # noqa: F401 - fixtures

__all__ = ["picasso", "rpc", "world"]


def test_disk_forms_of_pro_and_dpro(picasso: str, world: World) -> None:  # noqa: F811
    assert ok(run(picasso, "disk", "create", "proj1", "golden", "d1"), "fakeimg5")
    ok(run(picasso, "pro", "proj1", "node2", "d1", "eno1"))  # 4 arguments: boot node2 from disk d1
    assert (world.tftp / "node2.ipxe").exists()
    assert world.hil.nodes["node2"]["nics"]["eno1"]["networks"] == {}  # a disk's NIC is not moved
    fails(run(picasso, "pro", "proj1", "node2", "d1", "eno1"), "already provisioned")
    fails(run(picasso, "disk", "delete", "proj1", "d1"), "")  # still booted from: refused
    ok(run(picasso, "dpro", "proj1", "node2", "eno1"))  # 3 arguments: the disk form
    assert not (world.tftp / "node2.ipxe").exists()
    assert world.storage.image_exists("fakeimg5")  # the disk stays until `bmi disk delete`
    fails(run(picasso, "dpro", "proj1", "node2", "eno1"), "not provisioned")
    ok(run(picasso, "disk", "delete", "proj1", "d1"))
    fails(run(picasso, "pro", "proj1", "node2", "nodisk", "eno1"), "nodisk")


def test_guide_forms_keep_working_next_to_the_disk_forms(picasso: str, world: World) -> None:  # noqa: F811
    ok(run(picasso, "pro", "proj1", "node1", "golden", "prov-net", "eno1"))  # 5 arguments: an image
    assert world.hil.nodes["node1"]["nics"]["eno1"]["networks"] == {"vlan/native": "prov-net"}
    # 4 arguments on dpro are the guide's form (NETWORK NIC), not the disk form
    fails(run(picasso, "dpro", "proj1", "node1", "eno1"), "")  # node1 was provisioned from an image
    assert world.hil.nodes["node1"]["nics"]["eno1"]["networks"] == {"vlan/native": "prov-net"}
    ok(run(picasso, "dpro", "proj1", "node1", "prov-net", "eno1"))
    assert world.hil.nodes["node1"]["nics"]["eno1"]["networks"] == {}
    out = ok(run(picasso, "pro", "proj1", "node1,node2", "golden", "prov-net", "eno1"), None)  # batch form
    assert out.splitlines() == ["node1: Success", "node2: Success"]


def test_wrong_argument_counts_are_usage_errors(picasso: str, world: World) -> None:  # noqa: F811
    for args in (["pro", "proj1", "node1", "golden"], ["pro", "proj1", "node1", "a", "b", "c", "d"],
                 ["dpro", "proj1", "node1"], ["dpro", "proj1", "node1", "a", "b", "c"]):
        result = run(picasso, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "arguments" in result.stderr and "PROJECT NODE" in result.stderr
    # a disk boots one node: no batch form for it
    result = run(picasso, "pro", "proj1", "node1,node2", "d1", "eno1")
    assert result.exit_code == 2 and "one NODE" in result.stderr
    assert world.iscsi.targets == {} and not list(world.tftp.glob("*.ipxe"))


def test_help_shows_both_forms() -> None:
    for command, forms in (("pro", ("PROJECT NODE IMG NETWORK NIC", "PROJECT NODE DISK NIC")),
                           ("dpro", ("PROJECT NODE NETWORK NIC", "PROJECT NODE NIC"))):
        text = " ".join(ok(CliRunner().invoke(cli, [command, "--help"]), None).split())
        assert all(f in text for f in forms), text


def test_db_ls_project_hil_does_not_know(picasso: str, world: World) -> None:  # noqa: F811
    ok(run(picasso, "project", "create", "ghost", "ghost-net", user="admin"))
    ok(run(picasso, "db", "create", "ghost", "rec", "--id", "60", user="admin"))
    assert "ghost" not in world.hil.projects
    rows = json.loads(ok(run(picasso, "--json", "db", "ls", "--project", "ghost", user="admin"), None))
    assert [(r["id"], r["name"], r["project"]) for r in rows] == [(60, "rec", "ghost")]
    # a tenant sees none of its rows (not a member of a project HIL does not know), and no error
    assert json.loads(ok(run(picasso, "--json", "db", "ls", "--project", "ghost", user="alice"), None)) == []
    # a project HIL knows but the user is not in is still refused
    fails(run(picasso, "db", "ls", "--project", "proj1", user="bob"), "proj1")


def test_plain_text_errors_are_shown_as_they_are() -> None:
    """A server (or proxy) answering an error in plain text: the CLI prints its text, not only the status."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = b"project bmi_infra not found"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        fails(run(url, "ls", "bmi_infra"), f"BMI at {url} answered HTTP 404: project bmi_infra not found")
    finally:
        httpd.shutdown()
        httpd.server_close()

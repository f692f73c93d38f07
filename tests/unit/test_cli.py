"""The bmi CLI against a REAL Picasso (waitress on a free port, in a thread) backed by the REAL Operations
over the fake drivers (tests/support/fake_ops.py), through Einstein's RPC endpoint."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import waitress
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.cli.main import cli
from ims.common import config as bmi_config
from ims.picasso.app import create_app
from ims.picasso.openapi import MAX_ID
from tests.support.fake_ops import InProcessClient, World
from tests.support.procs import free_port as _free_port
from tests.support.web import rpc, world

__all__ = ["rpc", "world"]  # fixtures (tests/support/web.py)

CFG_TEXT = "[bmi]\nuid = fake\n[net_isolator]\nurl = http://127.0.0.1:1\n[iscsi]\nip = 127.0.0.1\n"
BMI = str(ROOT / ".venv" / "bin" / "bmi")


@pytest.fixture()
def picasso(rpc: InProcessClient):
    app = create_app(bmi_config.parse("t.cfg", text=CFG_TEXT), client=rpc)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    # waitress has no public stop.  Close every channel from INSIDE the event loop (through its
    # trigger), so select() never sees a closed descriptor; the loop then ends with an empty map.
    def close_all() -> None:
        for channel in list(server._map.values()):
            channel.close()

    server.trigger.pull_trigger(close_all)
    thread.join(10)
    server.task_dispatcher.shutdown()
    assert not thread.is_alive(), "waitress did not stop"


def run(url: str, *args: str, user: str = "alice", env: dict[str, str] | None = None) -> Any:
    full_env = {"BMI_URL": url, "HIL_USERNAME": user, "HIL_PASSWORD": f"{user}-pw", "BMI_CONFIG": "/nonexistent"}
    full_env.update(env or {})
    return CliRunner().invoke(cli, list(args), env=full_env, prog_name="bmi")


def ok(result: Any, expected: str | None = "Success") -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    if expected is not None:
        assert result.stdout == expected + "\n"
    return result.stdout


def fails(result: Any, text: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert text in result.stderr
    if code == 1:
        assert result.stderr.startswith("Error: ")


def test_help_without_env_or_config() -> None:
    proc = subprocess.run([BMI, "--help"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for word in ("import", "pro", "dpro", "snap", "db", "showpro", "project", "iscsi", "disk", "reconcile", "op"):
        assert f"  {word} " in proc.stdout
    proc = subprocess.run([BMI, "snap", "create", "--help"], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 0 and "WARNING: The Node must be in a powered down state" in " ".join(proc.stdout.split())


def test_missing_credentials_exit_1(picasso: str) -> None:
    result = CliRunner().invoke(cli, ["ls", "proj1"], env={"BMI_URL": picasso, "HIL_USERNAME": None,
                                                           "HAAS_USERNAME": None, "HIL_PASSWORD": None,
                                                           "HAAS_PASSWORD": None})
    fails(result, "HIL_USERNAME is not set")
    result = CliRunner().invoke(cli, ["ls", "proj1"], env={"BMI_URL": picasso, "HIL_USERNAME": None,
                                                           "HIL_PASSWORD": None, "HAAS_USERNAME": "alice",
                                                           "HAAS_PASSWORD": "alice-pw"})
    ok(result, None)  # the guide's HAAS_* names work too


def test_usage_error_exit_2(picasso: str) -> None:
    result = run(picasso, "pro", "proj1", "node1")
    assert result.exit_code == 2


def test_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    fails(run(url, "ls", "proj1"), f"cannot reach BMI at {url}")


def test_url_from_config_file(picasso: str, tmp_path: Path) -> None:
    port = picasso.rsplit(":", 1)[1]
    cfg = tmp_path / "bmi.cfg"
    cfg.write_text(f"[rest_api]\nip = 127.0.0.1\nport = {port}\n")  # an incomplete config is fine for the CLI
    result = run("", "ls", "proj1", env={"BMI_URL": "", "BMI_CONFIG": str(cfg)})
    assert "golden" in ok(result, None)


def test_images(picasso: str, world: World) -> None:
    out = ok(run(picasso, "ls", "proj1"), None)
    assert out.splitlines()[1].split("|")[1].strip() == "Image" and "golden" in out
    world.storage.create_snapshot("newimg", "s1")
    ok(run(picasso, "import", "proj1", "newimg", "--snap", "s1", "--protect"))
    assert world.storage.is_protected("newimg", "s1")
    fails(run(picasso, "import", "proj1", "newimg"), "already exists")
    fails(run(picasso, "import", "proj1", "missing"), "no image named missing")
    ok(run(picasso, "export", "proj1", "newimg", "outname"))
    assert world.storage.image_exists("outname")
    ok(run(picasso, "cp", "proj1", "newimg", "proj1", "copy1"))
    fails(run(picasso, "cp", "proj1", "newimg", "proj2"), "administrator")
    ok(run(picasso, "mv", "proj1", "copy1", "proj2", user="admin"))
    assert "copy1" in ok(run(picasso, "ls", "proj2"), None)
    ok(run(picasso, "rm", "proj1", "newimg"))
    fails(run(picasso, "rm", "proj1", "newimg"), "newimg")
    fails(run(picasso, "rm", "proj1", ".."), "invalid name")
    fails(run(picasso, "ls", "proj1", user="bob"), "no access to project proj1")  # HIL's 401
    fails(run(picasso, "ls", "proj1", env={"HIL_PASSWORD": "wrong"}), "authentication failed")


def test_nodes_and_snapshots(picasso: str, world: World) -> None:
    ok(run(picasso, "pro", "proj1", "node1", "golden", "prov-net", "eno1"))
    fails(run(picasso, "pro", "proj1", "node1", "golden", "prov-net", "eno1"), "already provisioned")
    fails(run(picasso, "pro", "proj1", "node3", "golden", "prov-net", "eno1"), "does not belong to project proj1")
    world.storage.broken = True
    fails(run(picasso, "pro", "proj1", "node2", "golden", "prov-net", "eno1"), "storage is down")
    world.storage.broken = False
    out = ok(run(picasso, "showpro", "proj1"), None)
    assert "Provisioned Image" in out and "node1" in out and "node2" not in out
    ok(run(picasso, "snap", "create", "proj1", "node1", "snap1"))
    out = ok(run(picasso, "snap", "ls", "proj1"), None)
    header = [c.strip() for c in out.splitlines()[1].split("|")[1:-1]]
    assert header == ["Snapshot", "Parent"]
    assert any(line.split("|")[1].strip() == "snap1" and line.split("|")[2].strip() == "golden"
               for line in out.splitlines()[3:-1])
    ok(run(picasso, "snap", "rm", "proj1", "snap1"))
    assert ok(run(picasso, "node", "ip", "proj1", "node1"), "10.0.0.11")
    ok(run(picasso, "dpro", "proj1", "node1", "prov-net", "eno1"))
    assert world.iscsi.targets == {} and world.hil.nodes["node1"]["nics"]["eno1"]["networks"] == {}
    fails(run(picasso, "dpro", "proj1", "node1", "prov-net", "eno1"), "not provisioned")


def test_db_ls_table_and_json(picasso: str) -> None:
    out = ok(run(picasso, "db", "ls"), None)
    lines = out.splitlines()
    assert [c.strip() for c in lines[1].split("|")[1:-1]] == ["Id", "Name", "Project", "Ceph", "Public", "Snapshot",
                                                              "Parent"]
    first = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert first == ["1", "golden", "proj1", "fakeimg1", "False", "False", ""]
    out = ok(run(picasso, "db", "ls", "-s"), None)
    assert "golden-snap" in out and "fakeimg1 " not in out
    out = ok(run(picasso, "--json", "db", "ls", "--project", "proj1", "--name", "golden"), None)
    assert json.loads(out) == [{"id": 1, "name": "golden", "project": "proj1", "ceph": "fakeimg1", "public": False,
                                "snapshot": False, "parent": ""}]
    assert json.loads(ok(run(picasso, "--json", "ls", "proj1"), None)) == [{"image": "golden"}]
    assert json.loads(ok(run(picasso, "--json", "rm", "proj1", "golden-snap"), None)) == {"result": "Success"}
    # a tenant sees the rows of its own projects only
    assert [r["name"] for r in json.loads(ok(run(picasso, "--json", "db", "ls", user="bob"), None))] == ["other"]
    fails(run(picasso, "db", "ls", "--project", "proj1", user="bob"), "proj1")


def test_db_create_rm_admin(picasso: str) -> None:
    fails(run(picasso, "db", "create", "proj1", "rec"), "admin")
    ok(run(picasso, "db", "create", "proj1", "rec", "--id", "50", "--snap", "--parent", "golden", "--public",
           user="admin"))
    out = ok(run(picasso, "db", "ls", "--name", "rec", user="admin"), None)
    assert [c.strip() for c in out.splitlines()[3].split("|")[1:-1]] == \
        ["50", "rec", "proj1", "fakeimg50", "True", "True", "golden"]
    ok(run(picasso, "db", "rm", "proj1", "rec", user="admin"))
    fails(run(picasso, "db", "rm", "proj1", "rec", user="admin"), "rec")


@pytest.mark.parametrize("value", ["0", "-3", str(MAX_ID + 1), str(2**63), "abc"])
def test_ids_out_of_bounds_are_usage_errors(picasso: str, value: str) -> None:
    for args in (("project", "create", "p9", "--id", value), ("db", "create", "proj1", "rec", "--id", value)):
        result = run(picasso, *args, user="admin")
        assert result.exit_code == 2 and "--id" in result.stderr, result.output


def test_projects_are_for_administrators(picasso: str) -> None:
    fails(run(picasso, "project", "ls"), "needs a BMI administrator")
    out = ok(run(picasso, "project", "ls", user="admin"), None)
    assert [c.strip() for c in out.splitlines()[1].split("|")[1:-1]] == ["Id", "Name", "Provision Network"]
    assert "prov-net" in out
    fails(run(picasso, "project", "create", "p9", "net9"), "admin")
    ok(run(picasso, "project", "create", "p9", "net9", "--id", str(MAX_ID), user="admin"))
    assert str(MAX_ID) in ok(run(picasso, "project", "ls", user="admin"), None)
    fails(run(picasso, "project", "create", "p9", user="admin"), "already exists")
    ok(run(picasso, "project", "rm", "p9", user="admin"))
    fails(run(picasso, "project", "rm", "p9", user="admin"), "not registered")


def test_iscsi_create_and_rm_are_for_administrators(picasso: str, world: World) -> None:
    fails(run(picasso, "iscsi", "create", "proj1", "golden"), "admin")
    ok(run(picasso, "iscsi", "create", "proj1", "golden", user="admin"))
    assert "fakeimg1" in world.iscsi.targets
    out = ok(run(picasso, "iscsi", "ls", "proj1"), None)
    assert "Target" in out and "iqn.2017-10.org.moc.bmi:fakeimg1" in out
    fails(run(picasso, "iscsi", "rm", "proj1", "golden"), "admin")
    ok(run(picasso, "iscsi", "rm", "proj1", "golden", user="admin"))
    fails(run(picasso, "iscsi", "rm", "proj1", "golden", user="admin"), "not exported")


def test_disks(picasso: str, world: World) -> None:
    assert ok(run(picasso, "disk", "create", "proj1", "golden", "d1"), "fakeimg5")
    assert "fakeimg5" in world.iscsi.targets
    fails(run(picasso, "disk", "create", "proj1", "golden", "d1"), "already exists")
    out = ok(run(picasso, "showdisks", "proj1"), None)
    assert "Source Image" in out and "d1" in out
    ok(run(picasso, "disk", "delete", "proj1", "d1"))
    assert not world.storage.image_exists("fakeimg5")
    fails(run(picasso, "disk", "delete", "proj1", "d1"), "not found")


def test_reconcile(picasso: str, world: World) -> None:
    fails(run(picasso, "reconcile"), "admin")
    report = json.loads(ok(run(picasso, "reconcile", user="admin"), None))
    assert report["repaired"] is False and all(v == [] for k, v in report.items() if k != "repaired"), report
    world.storage.create_image("fakeimg77", 16)
    report = json.loads(ok(run(picasso, "reconcile", user="admin"), None))
    assert report["images_without_row"] == ["fakeimg77"] and report["repaired"] is False
    assert json.loads(ok(run(picasso, "reconcile", "--repair", user="admin"), None))["repaired"] is True


@pytest.mark.parametrize("user,password", [("alice", "пароль"), ("用户", "x"), ("alice", "a\tb")])
def test_credentials_of_any_encoding_are_a_clean_error(picasso: str, user: str, password: str) -> None:
    fails(run(picasso, "ls", "proj1", env={"HIL_USERNAME": user, "HIL_PASSWORD": password}), "authentication failed")


def test_credentials_that_are_not_utf8_are_a_clean_error(picasso: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "BMI_URL": picasso}
    environb = {k.encode(): v.encode() for k, v in env.items()}
    environb[b"HIL_USERNAME"] = b"alice"
    environb[b"HIL_PASSWORD"] = b"\xff\xfe-not-utf8"
    proc = subprocess.run([BMI, "ls", "proj1"], env=environb, capture_output=True, check=False, timeout=60)  # type: ignore[arg-type]
    assert proc.returncode == 1 and proc.stdout == b"", proc.stderr
    assert proc.stderr.startswith(b"Error: ") and b"Traceback" not in proc.stderr


def test_help_follows_the_service(picasso: str) -> None:
    text = " ".join(ok(CliRunner().invoke(cli, ["iscsi", "--help"]), None).split())
    assert "administrators only" in text
    text = " ".join(ok(CliRunner().invoke(cli, ["dpro", "--help"]), None).split())
    assert "must be the ones given to `bmi pro`" in text
    text = " ".join(ok(CliRunner().invoke(cli, ["project", "--help"]), None).split())
    assert "administrators only" in text


def test_console_script_end_to_end(picasso: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "BMI_URL": picasso, "HIL_USERNAME": "alice", "HIL_PASSWORD": "alice-pw"}
    proc = subprocess.run([BMI, "pro", "proj1", "node2", "golden", "prov-net", "eno1"], env=env, capture_output=True,
                          text=True, check=False, timeout=60)
    # (progress lines would go to stderr, only while an operation is still unfinished after a poll)
    assert (proc.returncode, proc.stdout) == (0, "Success\n") and "Error" not in proc.stderr
    proc = subprocess.run([BMI, "pro", "proj1", "node2", "golden", "prov-net", "eno1"], env=env, capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.startswith("Error: ")
    assert os.path.exists(BMI)


# --- asynchronous operations ---------------------------------------------------------------------
def test_no_wait_prints_the_id_and_op_show_follows_it(picasso: str, rpc: InProcessClient, world: World) -> None:
    standin = rpc.use_standin()  # the interface's stand-in, whose queue the test can hold
    standin.gate.clear()
    out = ok(run(picasso, "pro", "--no-wait", "proj1", "node2", "golden", "prov-net", "eno1"), None)
    op_id = int(out.strip())
    assert not world.iscsi.targets  # queued, not run
    shown = json.loads(ok(run(picasso, "op", "show", str(op_id), "--json"), None))
    assert shown["id"] == op_id and shown["state"] == "queued" and shown["queue_position"] == 1
    queued = json.loads(ok(run(picasso, "op", "ls", "--state", "queued", "--json"), None))
    assert [r["id"] for r in queued] == [op_id]
    table = ok(run(picasso, "op", "ls"), None)
    assert [c.strip() for c in table.splitlines()[1].split("|")[1:-1]] == \
        ["Id", "Verb", "Project", "State", "Queue", "Progress", "Step", "User", "Created", "Error"]
    assert f"| {op_id} " in table and "queued" in table
    assert json.loads(ok(run(picasso, "op", "ls", "--state", "done", "--json"), None)) == []
    standin.gate.set()
    table = ok(run(picasso, "op", "show", str(op_id), "--wait"), None)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[3:-1]}
    assert rows["state"] == "done" and rows["progress"] == "100%" and rows["verb"] == "provision"
    assert world.iscsi.targets
    # another tenant cannot see it; a bad id is a usage error
    fails(run(picasso, "op", "show", str(op_id), user="bob"), "not found")
    assert json.loads(ok(run(picasso, "op", "ls", "--json", user="bob"), None)) == []
    assert run(picasso, "op", "show", "x").exit_code == 2
    assert run(picasso, "op", "ls", "--state", "sleeping").exit_code == 2


def test_no_wait_json_prints_the_record(picasso: str) -> None:
    record = json.loads(ok(run(picasso, "--json", "snap", "rm", "--no-wait", "proj1", "golden-snap"), None))["result"]
    assert record["verb"] == "remove_image" and record["state"] in ("queued", "running", "done")
    final = json.loads(ok(run(picasso, "op", "show", "--wait", "--json", str(record["id"])), None))
    assert final["state"] == "done"
    assert "golden-snap" not in ok(run(picasso, "snap", "ls", "proj1"), None)


def test_waiting_mutation_reports_the_failed_operation(picasso: str, world: World) -> None:
    fails(run(picasso, "snap", "create", "proj1", "node1", "s9"), "not provisioned")
    failed = json.loads(ok(run(picasso, "op", "ls", "--state", "failed", "--json"), None))
    assert failed and failed[0]["verb"] == "create_snapshot" and failed[0]["error"]["status"] == 404 \
        or failed == []  # refused at submit time by Einstein: no operation at all


def test_pro_several_nodes_is_one_batch(picasso: str, rpc: InProcessClient, world: World) -> None:
    out = ok(run(picasso, "pro", "proj1", "node1,node2", "golden", "prov-net", "eno1"), None)
    assert out == "node1: Success\nnode2: Success\n"
    assert [c[0] for c in rpc.calls if c[0].startswith("submit")] == ["submit_batch"]
    showpro = ok(run(picasso, "showpro", "proj1"), None)
    assert "node1" in showpro and "node2" in showpro
    ok(run(picasso, "dpro", "proj1", "node2", "prov-net", "eno1"))
    # node1 is still provisioned: its operation fails, node2's succeeds; exit 1
    result = run(picasso, "pro", "proj1", "node2,node1", "golden", "prov-net", "eno1")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "node2: Success" and lines[1].startswith("node1: failed: ") and "already" in lines[1]
    assert "1 of 2 nodes failed: node1" in result.stderr
    # --no-wait: NODE ID per line
    ok(run(picasso, "dpro", "proj1", "node2", "prov-net", "eno1"))
    out = ok(run(picasso, "pro", "--no-wait", "proj1", "node2", "golden", "prov-net", "eno1"), None)
    assert out.strip().isdigit()
    ok(run(picasso, "op", "show", "--wait", out.strip()), None)
    ok(run(picasso, "dpro", "proj1", "node2", "prov-net", "eno1"))
    out = ok(run(picasso, "pro", "--no-wait", "proj1", "node1,node2", "golden", "prov-net", "eno1"), None)
    assert [line.split()[0] for line in out.splitlines()] == ["node1", "node2"]
    for line in out.splitlines():
        ok(run(picasso, "op", "show", "--wait", line.split()[1]), None)
    # a bad item refuses the whole batch, nothing queued
    fails(run(picasso, "pro", "proj1", "node2,a b", "golden", "prov-net", "eno1"), "nodes[1]")
    assert run(picasso, "pro", "proj1", "node2,", "golden", "prov-net", "eno1").exit_code == 2


def test_pro_help_documents_several_nodes() -> None:
    text = " ".join(ok(CliRunner().invoke(cli, ["pro", "--help"]), None).split())
    assert "comma-separated list" in text and "--no-wait" in text


class _Scripted:
    """Answers GET /operations/<id> from a script of records (the CLI's view of a running operation)."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        self.script = script
        self.asked: list[tuple[str, Any]] = []

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        self.asked.append((path, params))
        return self.script.pop(0)


def _rec(state: str, progress: int = 0, step: str | None = None, pos: int | None = None) -> dict[str, Any]:
    return {"id": 7, "verb": "create_snapshot", "project": "proj1", "args": {"node": "node1", "snap_name": "s"},
            "state": state, "progress": progress, "step": step, "queue_position": pos, "error": None}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal() -> None:
    from ims.cli import ops

    api = _Scripted([_rec("queued", pos=1), _rec("running", 10, "clone"), _rec("running", 60, "clone"),
                     _rec("running", 80, "target"), _rec("done", 100, "target")])
    stream = io.StringIO()
    final = ops.wait(api, [_rec("queued", pos=2)], stream)
    assert final[0]["state"] == "done"
    # one line per change of state or step (not per poll, nor per queue position or percent)
    assert stream.getvalue().splitlines() == [
        "operation 7 create_snapshot node1 s (proj1): running: clone (10%)",
        "operation 7 create_snapshot node1 s (proj1): running: target (80%)"]
    assert all(a == ("/operations/7", {"wait": str(ops.POLL_SECONDS)}) for a in api.asked)


def test_progress_is_a_bar_on_a_terminal() -> None:
    from ims.cli import ops

    api = _Scripted([_rec("running", 50, "clone"), _rec("done", 100)])
    stream = _Tty()
    ops.wait(api, [_rec("queued", pos=1)], stream)
    text = stream.getvalue()
    assert "operation 7 create_snapshot node1 s (proj1)" in text and "100%" in text and "50%" in text
    assert "running: clone" not in text  # no plain lines on a terminal


def test_nothing_printed_for_an_operation_done_at_once() -> None:
    from ims.cli import ops

    stream = io.StringIO()
    assert ops.wait(_Scripted([]), [_rec("done", 100)], stream)[0]["state"] == "done"
    assert stream.getvalue() == ""


def test_progress_bar_on_a_real_terminal(picasso: str, rpc: InProcessClient, world: World) -> None:
    """`bmi pro` with stderr on a pseudo-terminal: a progress bar there while the operation is queued,
    then exactly `Success` on stdout (a pipe)."""
    import pty
    import select
    import time

    standin = rpc.use_standin()
    standin.gate.clear()  # the operation stays queued until the bar has been seen
    master, slave = pty.openpty()
    env = {"PATH": "/usr/bin:/bin", "BMI_URL": picasso, "HIL_USERNAME": "alice", "HIL_PASSWORD": "alice-pw",
           "BMI_CONFIG": "/nonexistent", "TERM": "xterm"}
    proc = subprocess.Popen([BMI, "pro", "proj1", "node2", "golden", "prov-net", "eno1"], env=env,
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120  # a bound on a hang, not a performance threshold
    try:
        while b"provision node2 golden (proj1)" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        assert not world.iscsi.targets  # still queued: the bar was drawn while waiting
        before = seen.decode(errors="replace")
        assert re.search(r"\[[^\]]*\]\s+0%", before) and "100%" not in before, before
        standin.gate.set()
        stdout, _ = proc.communicate(timeout=120)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and stdout == b"Success\n"
    text = seen.decode(errors="replace")
    assert re.search(r"\[#+\]\s+100%", text), text  # the full bar once done
    assert "queued" not in text
    assert world.iscsi.targets


def test_ctrl_c_stops_waiting_not_the_operation(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from ims.cli import ops

    class Interrupted:
        def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
            raise KeyboardInterrupt

    with pytest.raises(click.exceptions.Exit) as exc:
        ops.wait(Interrupted(), [_rec("queued", pos=1)], io.StringIO())
    assert exc.value.exit_code == 130
    assert "BMI carries on with operation(s) 7; follow with `bmi op show --wait ID`" in capsys.readouterr().err

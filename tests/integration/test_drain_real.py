"""Einstein and Picasso as REAL processes: a worker SIGKILLed mid-operation, SIGTERM drains, logs.

Einstein runs the test ops factory tests/support/journal_ops.py: the fake operations plus
calls that stay in flight until the test releases them, and a journaled ``provision`` on
a real SQLite journal (so recovery has real work to do).
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import Pyro4
import Pyro4.errors
import pytest
from sqlalchemy import select

from ims.common import config as bmi_config
from ims.common.errors import ServiceUnavailable
from ims.database import make_engine, make_session_factory
from ims.database.models import Operation
from ims.rpc.client import EinsteinClient
from ims.rpc.methods import NAME_PREFIX
from tests.support.multihost import wait_for
from tests.support.procs import alive as _alive
from tests.support.procs import children as _children
from tests.support.procs import free_port as _free_port
from tests.unit.test_rpc import ALICE, KEY

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "tests.support.journal_ops:build"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def wait_until(what: str, check: Any, timeout: float = 60.0, log: Any = None) -> Any:
    return wait_for(what, check, timeout, interval=0.1, log=log)


class Einstein:
    def __init__(self, tmp: Path, workers: int) -> None:
        self.dir = tmp
        self.ns_port = _free_port()
        self.rpc_port = _free_port(workers)
        self.rest_port = _free_port()
        self.cfg_path = tmp / "bmi.cfg"
        self.cfg_path.write_text(
            f"[bmi]\nuid = fake\n[db]\npath = {tmp}/bmi.db\n[net_isolator]\nurl = http://127.0.0.1:1\n"
            f"[iscsi]\nip = 127.0.0.1\n[logs]\npath = {tmp}/logs\n"
            f"[rpc]\nname_server_ip = 127.0.0.1\nname_server_port = {self.ns_port}\nrpc_server_ip = 127.0.0.1\n"
            f"rpc_server_port = {self.rpc_port}\nworkers = {workers}\nhmac_key = {KEY}\ntimeout = 120\n"
            f"drain_seconds = 60\n[journal]\nretry_seconds = 0\n"
            f"[rest_api]\nip = 127.0.0.1\nport = {self.rest_port}\nthreads = 4\ndrain_seconds = 60\n"
            f"[tests]\ndir = {tmp}\n")
        self.cfg = bmi_config.parse(str(self.cfg_path))
        self.out = open(tmp / "einstein.out", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "einstein_server"), "--config",
                                      str(self.cfg_path), "--ops-factory", FACTORY],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=ENV)
        self.wait_registered(workers)

    def registered(self) -> dict[str, str]:
        try:
            with Pyro4.naming.locateNS("127.0.0.1", self.ns_port, broadcast=False, hmac_key=KEY.encode()) as ns:
                return ns.list(prefix=NAME_PREFIX)
        except Pyro4.errors.PyroError:
            return {}

    def wait_registered(self, count: int) -> None:
        wait_until(f"{count} registered workers", lambda: len(self.registered()) >= count, log=self.logtext)

    def logtext(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def events(self) -> list[str]:
        return (self.dir / "events").read_text().splitlines()

    def stop(self) -> None:
        kids = _children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)


@pytest.fixture()
def einstein(tmp_path: Path):
    server = Einstein(tmp_path, workers=2)
    yield server
    for path in tmp_path.glob("started-*"):  # release anything still waiting
        (tmp_path / path.name.replace("started-", "release-")).write_text("")
    server.stop()


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_killed_worker_is_recovered_before_respawn_and_the_mutation_is_not_resent(einstein: Einstein) -> None:
    client = EinsteinClient(einstein.cfg)
    thread, out = in_thread(client.provision, ALICE, "proj1", "node1", "golden", "net", "nic")
    started = wait_until("the provision to start", lambda: (einstein.dir / "started-provision-node1").exists())
    assert started
    worker = int((einstein.dir / "started-provision-node1").read_text())
    assert (einstein.dir / "files" / "node1").exists()
    os.kill(worker, signal.SIGKILL)
    thread.join(60)
    error = out.get("error")
    assert isinstance(error, ServiceUnavailable), out
    assert "may or may not have completed" in error.message
    einstein.wait_registered(2)
    wait_until("the new worker to be built", lambda: sum(e.startswith("build ") for e in einstein.events()) >= 5,
               log=einstein.logtext)
    # The provision was sent once (never re-sent to the other worker)...
    assert [e for e in einstein.events() if e.startswith("provision ")] == [f"provision {worker} node1"]
    # ...and rolled back by a recovery run after the kill and BEFORE the replacement worker was built.
    engine = make_engine(f"sqlite:///{einstein.dir}/bmi.db")
    with make_session_factory(engine)() as s:
        op = s.scalars(select(Operation)).one()
        assert op.state == "rolled_back"
    events = einstein.events()
    recovered = [i for i, e in enumerate(events) if e.startswith("recover ") and e.split()[2:] == [str(op.id)]]
    assert len(recovered) == 1, events
    assert events[recovered[0] + 1].startswith("build "), events
    assert recovered[0] + 1 == len(events) - 1, events  # the replacement is the last one built
    assert not (einstein.dir / "files" / "node1").exists()
    assert (einstein.dir / "files" / "undo.log").read_text() == f"node1:pid{worker}\n"
    # The node is usable again at once.
    (einstein.dir / "release-provision-node1").write_text("")
    client2 = EinsteinClient(einstein.cfg)
    client2.provision(ALICE, "proj1", "node1", "golden", "net", "nic")
    assert (einstein.dir / "files" / "node1").read_text().startswith("pid")
    assert "exited with -9; restarting" in einstein.logtext()


def test_sigterm_drains_einstein_and_workers_log_through_the_supervisor(einstein: Einstein) -> None:
    client = EinsteinClient(einstein.cfg)
    thread, out = in_thread(client.import_image, ALICE, "proj1", "slow-a")
    wait_until("the slow call to start", lambda: (einstein.dir / "started-slow-a").exists())
    einstein.proc.send_signal(signal.SIGTERM)
    # Both workers leave the name server; the busy one keeps running its call.
    wait_until("the workers to unregister", lambda: not einstein.registered(), log=einstein.logtext)
    with pytest.raises(ServiceUnavailable):
        EinsteinClient(einstein.cfg).list_images(ALICE, "proj1")
    assert einstein.proc.poll() is None and thread.is_alive()
    (einstein.dir / "release-slow-a").write_text("")
    thread.join(60)
    assert out == {"result": None}
    assert einstein.proc.wait(90) == 0
    log = (einstein.dir / "logs" / "ims.log").read_text()
    # Worker records (through the supervisor, the one writer) and the per-call audit line.
    assert re.search(r" einstein\.\d INFO ims\.rpc\.dispatch: import_image by alice ok in \d+ ms", log), log
    assert re.search(r" einstein\.\d INFO ims\.rpc\.server: worker \d drained; stopping", log), log
    assert "einstein stopped" in log


@pytest.fixture
def einstein_one(tmp_path: Path):
    """One worker: the test ops factory gives each worker its own database, and an operation submitted
    to one worker must be found by the legacy API's wait on the same one."""
    server = Einstein(tmp_path, workers=1)
    yield server
    for path in tmp_path.glob("started-*"):
        (tmp_path / path.name.replace("started-", "release-")).write_text("")
    server.stop()


def test_sigterm_drains_picasso(einstein_one: Einstein) -> None:
    einstein = einstein_one
    out = open(einstein.dir / "picasso.out", "w+")  # noqa: SIM115 - closed below
    picasso = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "picasso_server"), "--config",
                                str(einstein.cfg_path)], stdout=out, stderr=subprocess.STDOUT, env=ENV)
    base = f"http://127.0.0.1:{einstein.rest_port}"
    auth = "Basic " + base64.b64encode(b"alice:alice-pw").decode()

    def request(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Authorization": auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def up() -> bool:
        try:
            return request("GET", "/v1/projects/proj1/images")[0] == 200
        except OSError:
            return False

    try:
        wait_until("picasso to listen", up, log=lambda: Path(out.name).read_text())
        # The legacy form API answers when the operation has finished: a request that stays in flight
        # for as long as the provision is held (JournalOps.provision waits for release-provision-<node>).
        form = urllib.parse.urlencode({"project": "proj1", "node": "node2", "img": "golden", "network": "net",
                                       "nic": "eno1"}).encode()

        def legacy_provision() -> tuple[int, bytes]:
            req = urllib.request.Request(base + "/provision/", data=form, method="PUT", headers={
                "Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()

        thread, result = in_thread(legacy_provision)
        wait_until("the slow request to start", lambda: (einstein.dir / "started-provision-node2").exists())
        picasso.send_signal(signal.SIGTERM)
        wait_until("picasso to stop listening", lambda: not up())  # new connections are refused
        assert picasso.poll() is None and thread.is_alive(), result
        (einstein.dir / "release-provision-node2").write_text("")
        thread.join(60)
        assert result.get("result", (None, None)) == (200, b"Success"), result
        assert picasso.wait(90) == 0
        log = (einstein.dir / "logs" / "picasso.log").read_text()
        assert "finishing requests in flight" in log and "Picasso stopped" in log
        assert (einstein.dir / "files" / "node2").exists()  # the provision's own effect
    finally:
        if picasso.poll() is None:
            picasso.kill()
            picasso.wait(10)
        out.close()

"""Einstein RPC: a REAL Pyro4 name server and worker processes (scripts/einstein_server) serving the fake ops."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import Pyro4
import Pyro4.errors
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.common import config as bmi_config
from ims.common.errors import (
    AuthenticationFailed,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    InvalidName,
    ServiceUnavailable,
)
from ims.rpc.client import EinsteinClient
from ims.rpc.methods import NAME_PREFIX
from tests.support.procs import alive as _alive
from tests.support.procs import children as _children
from tests.support.procs import free_port as _free_port

ALICE = {"username": "alice", "password": "alice-pw"}
KEY = "test-hmac-key-0123456789"


def _config_text(ns_port: int, rpc_port: int, workers: int, key: str = KEY, insecure: bool = False) -> str:
    return (f"[bmi]\nuid = fake\n[net_isolator]\nurl = http://127.0.0.1:1\n[iscsi]\nip = 127.0.0.1\n"
            f"[rpc]\nname_server_ip = 127.0.0.1\nname_server_port = {ns_port}\nrpc_server_ip = 127.0.0.1\n"
            f"rpc_server_port = {rpc_port}\nworkers = {workers}\nhmac_key = {key}\ninsecure = {insecure}\n"
            "timeout = 20\n")


class Einstein:
    def __init__(self, tmp: Path, workers: int = 2) -> None:
        self.ns_port = _free_port()
        self.rpc_port = _free_port(workers)
        self.workers = workers
        self.cfg_path = tmp / "bmi.cfg"
        self.cfg_path.write_text(_config_text(self.ns_port, self.rpc_port, workers))
        self.cfg = bmi_config.parse(str(self.cfg_path))
        self.log = open(tmp / "einstein.log", "w+")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "einstein_server"), "--config", str(self.cfg_path),
             "--ops-factory", "tests.support.fake_ops:build"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_registered(workers)

    def registered(self) -> dict[str, str]:
        with Pyro4.naming.locateNS("127.0.0.1", self.ns_port, broadcast=False, hmac_key=KEY.encode()) as ns:
            return ns.list(prefix=NAME_PREFIX)

    def wait_registered(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if len(self.registered()) >= count:
                    return
            except Pyro4.errors.PyroError:
                pass
            time.sleep(0.2)
        pytest.fail(f"einstein_server did not register {count} workers; log:\n{self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        kids = _children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = [k for k in kids if _alive(k)]
        for k in leftover:
            os.kill(k, signal.SIGKILL)
        assert not leftover, f"einstein left processes behind: {leftover}"


@pytest.fixture(scope="module")
def einstein(tmp_path_factory: pytest.TempPathFactory):
    server = Einstein(tmp_path_factory.mktemp("einstein"))
    yield server
    server.stop()


@pytest.fixture()
def client(einstein: Einstein):
    c = EinsteinClient(einstein.cfg)
    yield c
    c.close()


def test_call_works_and_is_spread_over_workers(einstein: Einstein, client: EinsteinClient) -> None:
    assert sorted(einstein.registered()) == [f"{NAME_PREFIX}0", f"{NAME_PREFIX}1"]
    assert "golden" in client.list_images(ALICE, "proj1")
    client.import_image(ALICE, "proj1", "rpc-img")
    # Each worker holds its own operations object, so an import lands on exactly one worker.
    seen = [("rpc-img" in client.list_images(ALICE, "proj1")) for _ in range(4)]
    assert seen.count(True) == 2 and seen.count(False) == 2
    assert client.call("is_admin", {"username": "admin", "password": "admin-pw"}) is True


def test_errors_come_back_as_bmi_error_subclasses(client: EinsteinClient) -> None:
    with pytest.raises(ImageNotFound) as info:
        client.remove_image(ALICE, "proj1", "no-such-image")
    assert info.value.status == 404 and "no-such-image" in info.value.message
    with pytest.raises(AuthenticationFailed) as info2:
        client.list_images({"username": "alice", "password": "wrong"}, "proj1")
    assert info2.value.status == 401
    with pytest.raises(InvalidName):
        client.list_images(ALICE, "../etc")
    for _ in range(2):  # both workers have the seeded image
        with pytest.raises(ImageExists) as info3:
            client.import_image(ALICE, "proj1", "golden")
        assert info3.value.status == 409


def test_method_outside_allow_list_is_refused(einstein: Einstein) -> None:
    uri = einstein.registered()[f"{NAME_PREFIX}0"]
    with Pyro4.Proxy(uri) as proxy:
        proxy._pyroHmacKey = KEY.encode()
        for name in ("close", "recover", "_member", "__init__", "_ops", "nope"):
            reply = proxy.call(name, [], {})
            assert reply == {"ok": False, "error": {"status": 400, "type": "InvalidInput",
                                                    "message": "unknown operation"}}
        with pytest.raises(AttributeError):
            proxy._pyroBind()
            proxy.recover()  # not exposed: Pyro refuses even the attribute
    with pytest.raises(InvalidInput):
        EinsteinClient(einstein.cfg).call("recover")


def test_call_without_hmac_key_is_refused(einstein: Einstein) -> None:
    uri = einstein.registered()[f"{NAME_PREFIX}0"]
    with Pyro4.Proxy(uri) as proxy, pytest.raises(Pyro4.errors.PyroError):
        proxy.call("list_images", [ALICE, "proj1"], {})
    with Pyro4.Proxy(uri) as proxy:
        proxy._pyroHmacKey = b"the-wrong-key"
        with pytest.raises(Pyro4.errors.PyroError):
            proxy.call("list_images", [ALICE, "proj1"], {})
    with pytest.raises(Pyro4.errors.PyroError):  # the name server wants the key too
        Pyro4.naming.locateNS("127.0.0.1", einstein.ns_port, broadcast=False).list()


def test_worker_restart_is_survived_by_the_client(einstein: Einstein, client: EinsteinClient) -> None:
    for _ in range(2):  # open a connection to both workers
        client.list_images(ALICE, "proj1")
    victims = _children(einstein.proc.pid)
    assert len(victims) >= 2, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [p for p in _children(einstein.proc.pid) if p not in victims and _alive(p)]
        if len(fresh) >= 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("workers were not restarted:\n" + einstein.logtext())
    deadline = time.monotonic() + 30
    while True:  # the restarted workers need a moment to bind and register
        try:
            for _ in range(4):
                assert "golden" in client.list_images(ALICE, "proj1")
            break
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert "restarting" in einstein.logtext()


def test_unreachable_einstein_is_service_unavailable(tmp_path: Path) -> None:
    cfg = bmi_config.parse(str(tmp_path / "x.cfg"), text=_config_text(_free_port(), _free_port(), 1))
    with pytest.raises(ServiceUnavailable) as info:
        EinsteinClient(cfg).list_images(ALICE, "proj1")
    assert info.value.status == 503


def test_refuses_to_start_without_hmac_key(tmp_path: Path) -> None:
    cfg_path = tmp_path / "nokey.cfg"
    cfg_path.write_text(_config_text(_free_port(), _free_port(), 1, key=""))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "einstein_server"), "--config", str(cfg_path),
                           "--ops-factory", "tests.support.fake_ops:build"], check=False, capture_output=True,
                          text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1
    assert "hmac_key" in proc.stderr


def test_read_only_methods_are_served_methods() -> None:
    from ims.rpc.methods import ALLOWED_METHODS, READ_ONLY_METHODS

    assert READ_ONLY_METHODS <= ALLOWED_METHODS
    assert not READ_ONLY_METHODS & {"provision", "deprovision", "import_image", "remove_image", "reconcile"}

"""The REAL ``ims.einstein.operations.Operations`` over the in-memory drivers of tests/support/fakes.py,
seeded with a small world, for the REST, CLI and RPC unit tests.

There is no twin of the operations to drift from the service: only storage, tgt and HIL are
fakes (FakeStorage, FakeIscsi, FakeHIL), the database is a temporary SQLite file and the boot
files go to a temporary directory.

Seeded HIL users (username/password):

* ``alice``/``alice-pw``: member of ``proj1`` and ``proj2``
* ``bob``/``bob-pw``: member of ``proj2``
* ``admin``/``admin-pw``: HIL administrator and in ``[bmi] admin_users``

BMI projects ``proj1`` (id 1, provisioning network ``prov-net``) and ``proj2`` (id 2, ``prov-net2``).
HIL nodes ``node1``, ``node2`` (proj1) and ``node3`` (proj2), each with NIC ``eno1``; DHCP leases for
node1..3 (10.0.0.11-13).  Images: ``golden`` (id 1, proj1), ``other`` (id 2, proj2) and the snapshot
``golden-snap`` of ``golden`` (id 4; id 3 was node1's clone, made and removed to take the snapshot).
The storage pool also holds importable images: ``rpc-img``, ``newimg``, ``new``, ``src1``..``src3``.

``client(world)`` gives an object with EinsteinClient's call shape (``client.<method>(*args)``) whose
calls go through Einstein's RPC endpoint and the errors' wire round-trip, as over Pyro4.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import weakref
from functools import partial
from pathlib import Path
from typing import Any

from ims.common import config as bmi_config
from ims.common.errors import BMIError, from_wire
from ims.einstein.boot import BootFiles
from ims.einstein.operations import Operations
from ims.rpc.dispatch import EinsteinEndpoint
from ims.rpc.methods import ALLOWED_METHODS
from tests.support.fakes import FakeHIL, FakeIscsi, FakeStorage

USERS = {"alice": ("alice-pw", ["proj1", "proj2"], False), "bob": ("bob-pw", ["proj2"], False),
         "admin": ("admin-pw", [], True)}
ALICE = {"username": "alice", "password": "alice-pw"}
BOB = {"username": "bob", "password": "bob-pw"}
ADMIN = {"username": "admin", "password": "admin-pw"}
NODES = {"node1": ("proj1", "52:54:00:00:00:01", "10.0.0.11"), "node2": ("proj1", "52:54:00:00:00:02", "10.0.0.12"),
         "node3": ("proj2", "52:54:00:00:00:03", "10.0.0.13")}
SOURCES = ("golden", "other", "rpc-img", "newimg", "new", "src1", "src2", "src3")


class World:
    """The seeded fakes and the real Operations over them."""

    def __init__(self, uid: str = "fake", auth_cache_seconds: float = 0.0, directory: str | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="bmi-fake-ops-"))
        self.tftp = self.dir / "tftp"
        (self.tftp / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
        leases = self.dir / "leases"
        leases.write_text("".join(f"1700000000 {mac} {ip} {n} *\n" for n, (_, mac, ip) in NODES.items()))
        self.cfg = bmi_config.parse("fake-ops.cfg", text=(
            f"[bmi]\nuid = {uid}\nadmin_users = admin\n[db]\npath = {self.dir}/bmi.db\n"
            f"[iscsi]\nip = 127.0.0.1\n[net_isolator]\nurl = http://127.0.0.1:1\n"
            f"auth_cache_seconds = {auth_cache_seconds}\n"
            f"[tftp]\npxelinux_path = {self.tftp}/pxelinux.cfg\nipxe_path = {self.tftp}\nleases_file = {leases}\n"))
        self.storage = FakeStorage()
        self.iscsi = FakeIscsi()
        self.hil = FakeHIL()
        for name, (password, projects, admin) in USERS.items():
            self.hil.add_user(name, password, projects, admin=admin)
        for node, (project, mac, _) in NODES.items():
            self.hil.add_node(node, project, {"eno1": mac})
        for i, name in enumerate(SOURCES):
            self.storage.create_image(name, 4096)
            self.storage.write(name, 0, f"{name}-bytes-{i}".encode())
        boot = BootFiles(self.cfg.tftp.pxelinux_path, self.cfg.tftp.ipxe_path, "127.0.0.1")
        self.ops = Operations(self.cfg, self.storage, self.iscsi, boot, self.hil.client)
        weakref.finalize(self.ops, shutil.rmtree, str(self.dir), True)
        self._seed()

    def _seed(self) -> None:
        ops = self.ops
        ops.create_project(ADMIN, "proj1", "prov-net")
        ops.create_project(ADMIN, "proj2", "prov-net2")
        ops.import_image(ALICE, "proj1", "golden")
        ops.import_image(BOB, "proj2", "other")
        ops.provision(ALICE, "proj1", "node1", "golden", "prov-net", "eno1")
        ops.create_snapshot(ALICE, "proj1", "node1", "golden-snap")
        ops.deprovision(ALICE, "proj1", "node1", "prov-net", "eno1")

    def ceph(self, image_id: int) -> str:
        return self.ops.ceph_name(image_id)

    def close(self) -> None:
        self.ops.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class InProcessClient:
    """EinsteinClient's call shape over an in-process Operations.

    Each call goes through ``EinsteinEndpoint.call`` (the allow-list, the arity check, errors turned
    into plain data) and arguments and replies through JSON, then the reply is unpacked as
    EinsteinClient does: the result, or ``from_wire(error)`` raised.  ``calls`` records
    ``(method, args-without-auth)``.
    """

    def __init__(self, ops: Any) -> None:
        self._endpoint = EinsteinEndpoint(ops)
        self._lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        wire_args, wire_kwargs = json.loads(json.dumps([list(args), kwargs]))
        with self._lock:
            self.calls.append((method, tuple(wire_args[1:])))
        reply = json.loads(json.dumps(self._endpoint.call(method, wire_args, wire_kwargs)))
        if not isinstance(reply, dict):
            raise BMIError("malformed reply from the BMI back-end")
        if reply.get("ok"):
            return reply.get("result")
        raise from_wire(reply.get("error") or {})

    def __getattr__(self, name: str) -> Any:
        if name in ALLOWED_METHODS:
            return partial(self.call, name)
        raise AttributeError(name)


def client(world: World) -> InProcessClient:
    return InProcessClient(world.ops)


def build(cfg: Any) -> Operations:
    """Factory for ``einstein_server --ops-factory tests.support.fake_ops:build``: a fresh seeded world
    per process (each Einstein worker has its own), the real Operations over the fakes.  Its files go
    beside the config file (a test's tmp dir), so a worker killed before it cleans up leaves nothing else."""
    parent = Path(cfg.path).parent
    directory = tempfile.mkdtemp(prefix="fake-ops-", dir=parent) if parent.is_dir() else None
    return World(uid=cfg.bmi.uid, auth_cache_seconds=cfg.net_isolator.auth_cache_seconds, directory=directory).ops

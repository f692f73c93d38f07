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

import collections
import inspect
import json
import shutil
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from ims.common import config as bmi_config
from ims.common import errors as bmi_errors
from ims.common.errors import BMIError, InvalidInput, NotFound, from_wire
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

    def __init__(self, uid: str = "fake", auth_cache_seconds: float = 0.0, directory: str | None = None,
                 db_url: str | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="bmi-fake-ops-"))
        self.tftp = self.dir / "tftp"
        (self.tftp / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
        leases = self.dir / "leases"
        leases.write_text("".join(f"1700000000 {mac} {ip} {n} *\n" for n, (_, mac, ip) in NODES.items()))
        self.cfg = bmi_config.parse("fake-ops.cfg", text=(
            f"[bmi]\nuid = {uid}\nadmin_users = admin\n[db]\npath = {self.dir}/bmi.db\nurl = {db_url or ''}\n"
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
        self._ops = ops
        self.standin: AsyncStandIn | None = None
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

    def use_standin(self) -> AsyncStandIn:
        """Serve the asynchronous verbs from AsyncStandIn (whose queue a test can hold) from now on."""
        if self.standin is None:
            self.standin = AsyncStandIn(self._ops)
        return self.standin

    def __getattr__(self, name: str) -> Any:
        if name in ASYNC_VERBS and (self.standin is not None or name not in ALLOWED_METHODS):
            # the stand-in: asked for, or Operations does not have the asynchronous verbs (yet)
            self.use_standin()
            return partial(self._standin_call, name)
        if name in ALLOWED_METHODS:
            return partial(self.call, name)
        raise AttributeError(name)

    def _standin_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        assert self.standin is not None
        wire_args, wire_kwargs = json.loads(json.dumps([list(args), kwargs]))
        with self._lock:
            self.calls.append((method, tuple(wire_args[1:])))
        func = getattr(self.standin, method)
        try:  # the endpoint's arity check (ims/rpc/dispatch.py): a wrong call is refused unstarted
            inspect.signature(func).bind(*wire_args, **wire_kwargs)
        except TypeError:
            raise InvalidInput(f"wrong arguments for {method}") from None
        try:
            result = func(*wire_args, **wire_kwargs)
        except BMIError as exc:
            raise from_wire(json.loads(json.dumps(exc.to_dict()))) from None
        return json.loads(json.dumps(result))


ASYNC_VERBS = frozenset({"submit", "submit_batch", "operation_show", "operation_list", "operation_wait"})
_OperationNotFound: type[BMIError] = getattr(bmi_errors, "OperationNotFound", None) or type(
    "OperationNotFound", (NotFound,), {})


def _now() -> str:
    return datetime.now(UTC).isoformat()


class AsyncStandIn:
    """The five asynchronous RPC verbs of docs/api.md over an Operations that does not have them yet:
    submit checks the caller's access to the project at once and queues; one worker thread runs the
    queue in order.  ``gate`` (set by default) lets a test hold the queue to see "queued" records."""

    def __init__(self, ops: Any) -> None:
        self.ops = ops
        self.gate = threading.Event()
        self.gate.set()
        self._cond = threading.Condition()
        self._records: dict[int, dict[str, Any]] = {}
        self._auth: dict[int, dict[str, str]] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._next = 1
        threading.Thread(target=self._worker, daemon=True).start()

    def _check(self, auth: dict[str, str], verb: str, kwargs: dict[str, Any]) -> str:
        if verb not in ("provision", "deprovision", "create_snapshot", "remove_image", "import_image", "copy_image",
                        "move_image", "export_image", "create_disk", "delete_disk", "provision_disk",
                        "deprovision_disk", "iscsi_create", "iscsi_remove"):
            raise InvalidInput(f"{verb!r} cannot be submitted")
        project = kwargs.get("project") or kwargs.get("src_project")
        self.ops.check_auth(auth, project)
        return str(project)

    def _new(self, auth: dict[str, str], verb: str, kwargs: dict[str, Any], project: str) -> dict[str, Any]:
        record = {"id": self._next, "verb": verb, "project": project, "args": dict(kwargs),
                  "user": auth["username"], "state": "queued", "queue_position": None, "progress": 0,
                  "steps_done": 0, "step": None, "result": None, "error": None, "created_at": _now(),
                  "started_at": None, "finished_at": None}
        self._records[self._next] = record
        self._auth[self._next] = auth
        self._queue.append(self._next)
        self._next += 1
        return record

    def _view(self, op_id: int) -> dict[str, Any]:
        record = dict(self._records[op_id])
        if record["state"] == "queued":
            record["queue_position"] = list(self._queue).index(op_id) + 1
        return record

    def submit(self, auth: dict[str, str], verb: str, kwargs: dict[str, Any],
               wait: float | None = None) -> dict[str, Any]:
        project = self._check(auth, verb, kwargs)
        with self._cond:
            op_id = self._new(auth, verb, kwargs, project)["id"]
            self._cond.notify_all()
            if wait is not None:  # as Einstein: answer once it has finished, or after ``wait`` seconds
                self._cond.wait_for(lambda: self._records[op_id]["state"] in ("done", "failed"),
                                    min(float(wait), 30.0))
            return self._view(op_id)

    def submit_batch(self, auth: dict[str, str], verb: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        projects = []
        for i, kwargs in enumerate(items):
            try:
                projects.append(self._check(auth, verb, kwargs))
            except InvalidInput as exc:
                raise InvalidInput(f"item {i}: {exc.message}") from None
        with self._cond:
            ids = [self._new(auth, verb, kwargs, p)["id"] for kwargs, p in zip(items, projects, strict=True)]
            self._cond.notify_all()
            return [self._view(i) for i in ids]

    def _visible(self, auth: dict[str, str], record: dict[str, Any]) -> bool:
        if self.ops.is_admin(auth):
            return True
        try:
            self.ops.check_auth(auth, record["project"])
        except BMIError:
            return False
        return True

    def operation_show(self, auth: dict[str, str], op_id: int) -> dict[str, Any]:
        with self._cond:
            record = self._records.get(op_id)
        if record is None or not self._visible(auth, record):
            raise _OperationNotFound(f"operation {op_id} not found")
        with self._cond:
            return self._view(op_id)

    def operation_list(self, auth: dict[str, str], state: str | None = None,
                       project: str | None = None) -> list[dict[str, Any]]:
        if state not in (None, "queued", "running", "done", "failed"):
            raise InvalidInput(f"unknown state {state!r}")
        with self._cond:
            ids = sorted(self._records, reverse=True)
        out = []
        for op_id in ids:
            record = self._records[op_id]
            if (state is None or record["state"] == state) and (project is None or record["project"] == project) \
                    and self._visible(auth, record):
                with self._cond:
                    out.append(self._view(op_id))
        return out[:200]

    def operation_wait(self, auth: dict[str, str], op_id: int, timeout: float = 20.0) -> dict[str, Any]:
        self.operation_show(auth, op_id)
        deadline = time.monotonic() + min(float(timeout), 30.0)
        with self._cond:
            while self._records[op_id]["state"] not in ("done", "failed") and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            return self._view(op_id)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
            self.gate.wait()
            with self._cond:
                op_id = self._queue.popleft()
                record = self._records[op_id]
                record.update(state="running", started_at=_now(), step="run")
                self._cond.notify_all()
            try:
                result = getattr(self.ops, record["verb"])(self._auth[op_id], **record["args"])
                update: dict[str, Any] = {"state": "done", "result": result, "progress": 100}
            except BMIError as exc:
                update = {"state": "failed", "error": exc.to_dict()}
            except Exception as exc:  # noqa: BLE001 - the record says what went wrong
                update = {"state": "failed", "error": {"status": 500, "type": "InternalError", "message": str(exc)}}
            with self._cond:
                record.update(update, steps_done=1, finished_at=_now())
                self._cond.notify_all()


def client(world: World) -> InProcessClient:
    return InProcessClient(world.ops)


def build(cfg: Any) -> Operations:
    """Factory for ``einstein_server --ops-factory tests.support.fake_ops:build``: a fresh seeded world
    per process (each Einstein worker has its own), the real Operations over the fakes.  Its files go
    beside the config file (a test's tmp dir), so a worker killed before it cleans up leaves nothing else."""
    parent = Path(cfg.path).parent
    directory = tempfile.mkdtemp(prefix="fake-ops-", dir=parent) if parent.is_dir() else None
    return World(uid=cfg.bmi.uid, auth_cache_seconds=cfg.net_isolator.auth_cache_seconds, directory=directory).ops

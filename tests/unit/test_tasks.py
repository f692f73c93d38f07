"""Asynchronous operations (ims/einstein/tasks.py) over the REAL Operations and the fake drivers:
submit -> record -> done, failures, tenant isolation, the scheduler's bounds and fairness, batches,
crash recovery and drain."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ims.common.errors import AuthenticationFailed, InvalidInput, InvalidName, OperationNotFound  # noqa: E402
from ims.database.models import Operation, Task  # noqa: E402
from ims.einstein.tasks import NOT_STARTED, fair_order  # noqa: E402
from ims.rpc.dispatch import EinsteinEndpoint  # noqa: E402
from tests.support.fake_ops import ADMIN, ALICE, BOB, World, client  # noqa: E402

DEAD_OWNER = "host-that-is-gone:999999:1"  # another host: see _dead() below


def provision(node: str, project: str = "proj1", img: str | None = None) -> dict[str, str]:
    img = img or ("golden" if project == "proj1" else "other")
    network = "prov-net" if project == "proj1" else "prov-net2"
    return {"project": project, "node": node, "img": img, "network": network, "nic": "eno1"}


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> Any:
    w = World(directory=str(tmp_path / "world"), db_url=db_url)
    for i in range(1, 9):
        w.hil.add_node(f"a{i}", "proj1", {"eno1": f"52:54:00:00:01:{i:02x}"})
        w.hil.add_node(f"b{i}", "proj2", {"eno1": f"52:54:00:00:02:{i:02x}"})
    yield w
    w.close()


def task_id_of_thread() -> int | None:
    name = threading.current_thread().name
    return int(name.split("-", 1)[1]) if name.startswith("task-") else None


def wait_all(world: World, records: list[dict[str, Any]], auth: dict[str, str] = ALICE) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        for _ in range(100):
            rec = world.ops.operation_wait(auth, rec["id"], 5)
            if rec["state"] in ("done", "failed"):
                break
        out.append(rec)
    return out


def count(world: World, **where: Any) -> int:
    with world.ops.journal.session() as s:
        query = select(func.count()).select_from(Task)
        for key, value in where.items():
            query = query.where(getattr(Task, key) == value)
        return int(s.scalar(query) or 0)


def test_submit_returns_a_record_and_runs_to_done(world: World) -> None:
    rpc = client(world)  # through Einstein's endpoint and JSON, as over Pyro4
    rec = rpc.submit(ALICE, "provision", provision("a1"))
    assert rec["verb"] == "provision" and rec["project"] == "proj1" and rec["user"] == "alice"
    assert rec["args"] == provision("a1") and "password" not in json.dumps(rec)
    assert rec["state"] in ("queued", "running") and rec["error"] is None
    done = wait_all(world, [rec])[0]
    assert done["state"] == "done", done
    # the last step recorded: the connect and the boot files are recorded first and overlap clone and target
    assert done["progress"] == 100 and done["steps_done"] >= 4 and done["step"] == "iscsi.add_target"
    assert done["started_at"] and done["finished_at"] and done["queue_position"] is None
    assert ["a1", "golden"] in world.ops.list_provisioned(ALICE, "proj1")
    with world.ops.journal.session() as s:
        stored = s.scalars(select(Task)).one()
        assert "alice-pw" not in (stored.args + stored.journal_ops + (stored.result or ""))
        ops = json.loads(stored.journal_ops)
        assert ops and s.get(Operation, ops[0]).kind == "provision"


def test_result_of_a_verb_is_kept(world: World) -> None:
    rec = world.ops.submit(ALICE, "create_disk", {"project": "proj1", "disk": "d1", "img": "golden"})
    done = wait_all(world, [rec])[0]
    assert done["state"] == "done" and isinstance(done["result"], str) and done["result"]


def test_failure_is_an_error_dict(world: World) -> None:
    rec = world.ops.submit(ALICE, "provision", provision("a1", img="no-such-image"))
    done = wait_all(world, [rec])[0]
    assert done["state"] == "failed" and done["result"] is None
    assert done["error"]["status"] == 404 and done["error"]["type"] == "ImageNotFound"
    assert "no-such-image" in done["error"]["message"]
    assert world.ops.list_provisioned(ALICE, "proj1") == []


def test_submit_time_errors_raise_and_queue_nothing(world: World) -> None:
    with pytest.raises(InvalidName):
        world.ops.submit(ALICE, "provision", provision("../etc"))
    with pytest.raises(InvalidInput):
        world.ops.submit(ALICE, "reconcile", {})
    with pytest.raises(InvalidInput):
        world.ops.submit(ALICE, "provision", {"project": "proj1", "node": "a1"})
    with pytest.raises(AuthenticationFailed):  # bob may not use proj1: HIL says 401, as the verb would
        world.ops.submit(BOB, "provision", provision("a1"))
    with pytest.raises(AuthenticationFailed):
        world.ops.submit({"username": "alice", "password": "wrong"}, "provision", provision("a1"))
    assert count(world) == 0


def test_tenant_isolation(world: World) -> None:
    rec = wait_all(world, [world.ops.submit(ALICE, "provision", provision("a1"))])[0]
    with pytest.raises(OperationNotFound) as exc:
        world.ops.operation_show(BOB, rec["id"])
    assert exc.value.status == 404
    with pytest.raises(OperationNotFound):
        world.ops.operation_show(BOB, rec["id"] + 1000)  # missing and hidden look alike
    with pytest.raises(OperationNotFound):
        world.ops.operation_wait(BOB, rec["id"], 1)
    with pytest.raises(AuthenticationFailed):
        world.ops.operation_show({"username": "bob", "password": "nope"}, rec["id"])
    assert world.ops.operation_list(BOB) == []
    assert [r["id"] for r in world.ops.operation_list(ALICE)] == [rec["id"]]
    assert world.ops.operation_show(ADMIN, rec["id"])["state"] == "done"
    bobs = wait_all(world, [world.ops.submit(BOB, "provision", provision("b1", "proj2"))], BOB)[0]
    assert [r["id"] for r in world.ops.operation_list(BOB)] == [bobs["id"]]
    assert [r["id"] for r in world.ops.operation_list(ALICE)] == [bobs["id"], rec["id"]]  # alice is in proj2 too
    assert [r["id"] for r in world.ops.operation_list(ALICE, state="done", project="proj1")] == [rec["id"]]
    assert world.ops.operation_list(ALICE, state="running") == []
    with pytest.raises(InvalidInput):
        world.ops.operation_list(ALICE, state="bogus")


class Gate:
    """Holds every task at its first journal step until released; records the order tasks start."""

    def __init__(self, world: World) -> None:
        self.open = threading.Event()
        self.arrived = threading.Event()
        self.order: list[int] = []
        self._lock = threading.Lock()
        world.ops.journal.fault_hook = self.hook

    def hook(self, name: str, phase: str) -> None:
        task = task_id_of_thread()
        if task is None or name != "db.insert_clone" or phase != "before":
            return
        with self._lock:
            self.order.append(task)
        self.arrived.set()
        assert self.open.wait(30), "the test never released the gate"


def test_fair_across_projects_under_a_bound_of_one(world: World) -> None:
    world.cfg.scheduler.values["max_per_gateway"] = 1
    gate = Gate(world)
    first = world.ops.submit(ALICE, "provision", provision("a1"))
    assert gate.arrived.wait(10)
    alices = world.ops.submit_batch(ALICE, "provision", [provision("a2"), provision("a3")])
    bobs = world.ops.submit_batch(BOB, "provision", [provision(f"b{i}", "proj2") for i in (1, 2, 3)])
    assert world.ops.operation_show(ALICE, first["id"])["state"] == "running"
    queued = {r["id"]: r["queue_position"] for r in world.ops.operation_list(ADMIN, state="queued")}
    a2, a3 = (r["id"] for r in alices)
    b1, b2, b3 = (r["id"] for r in bobs)
    assert queued == {b1: 1, a2: 2, b2: 3, a3: 4, b3: 5}
    assert count(world, state="running") == 1
    gate.open.set()
    done = wait_all(world, [first, *alices, *bobs], ADMIN)
    assert [r["state"] for r in done] == ["done"] * 6, done
    assert gate.order == [first["id"], b1, a2, b2, a3, b3]


def test_no_admission_pass_while_own_tasks_fill_the_bound(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """While this worker's own running tasks fill the bound, the scheduler waits for one of them to
    end instead of polling the database; when one ends, the next starts (no lost wake-up)."""
    world.cfg.scheduler.values["max_per_gateway"] = 1
    gate = Gate(world)
    tasks = world.ops._tasks
    passes: list[int] = []
    claim = tasks._claim
    monkeypatch.setattr(tasks, "_claim", lambda: passes.append(1) or claim())
    recs = world.ops.submit_batch(ALICE, "provision", [provision(f"a{i}") for i in (1, 2, 3)])
    assert gate.arrived.wait(10)
    before = len(passes)
    time.sleep(0.5)  # not a threshold: the old scheduler made a pass every 50 ms meanwhile
    assert len(passes) == before, "admission passes ran while the bound was full of this worker's tasks"
    assert count(world, state="running") == 1 and count(world, state="queued") == 2
    gate.open.set()
    done = wait_all(world, recs)
    assert [r["state"] for r in done] == ["done"] * 3, done
    assert gate.order == [r["id"] for r in recs]


def test_bound_and_turns_are_global_across_workers(world: World) -> None:
    """Two workers (two Operations on one database, the second with another owner): the bound counts
    both, and a worker leaves the slot to another worker's task that ranks ahead of its own."""
    from ims.einstein.boot import BootFiles
    from ims.einstein.operations import Operations

    world.cfg.scheduler.values["max_per_gateway"] = 1
    boot = BootFiles(world.cfg.tftp.pxelinux_path, world.cfg.tftp.ipxe_path, "127.0.0.1")
    other = Operations(world.cfg, world.storage, world.iscsi, boot, world.hil.client)
    other._tasks.owner = "another-host:4242:1"  # alive by definition (another host's process)
    try:
        gate = Gate(world)
        other.journal.fault_hook = gate.hook
        a1 = world.ops.submit(ALICE, "provision", provision("a1"))
        assert gate.arrived.wait(10)
        a2 = world.ops.submit(ALICE, "provision", provision("a2"))
        b1 = other.submit(BOB, "provision", provision("b1", "proj2"))
        assert b1["state"] == "queued" and b1["queue_position"] == 1
        assert world.ops.operation_show(ALICE, a2["id"])["queue_position"] == 2
        gate.open.set()
        done = wait_all(world, [a1, a2, b1], ADMIN)  # waits on the other worker's task poll the table
        assert [r["state"] for r in done] == ["done"] * 3, done
        assert gate.order == [a1["id"], b1["id"], a2["id"]]
    finally:
        other.close()


def test_admission_bound_is_respected(world: World) -> None:
    world.cfg.scheduler.values["max_per_gateway"] = 2
    barrier = threading.Barrier(2, timeout=20)  # two tasks must really run side by side
    seen: list[int] = []

    def hook(name: str, phase: str) -> None:
        if task_id_of_thread() is None or name != "db.insert_clone" or phase != "before":
            return
        seen.append(count(world, state="running"))
        barrier.wait()

    world.ops.journal.fault_hook = hook
    recs = world.ops.submit_batch(ALICE, "provision", [provision(f"a{i}") for i in range(1, 7)])
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    done = wait_all(world, recs)
    assert [r["state"] for r in done] == ["done"] * 6, done
    assert len(seen) == 6 and max(seen) == 2
    # a task that uses no gateway is bounded by the cluster only
    world.cfg.scheduler.values["max_per_cluster"] = 1
    world.ops.journal.fault_hook = None
    snap = world.ops.submit(ALICE, "create_snapshot", {"project": "proj1", "node": "a1", "snap_name": "s1"})
    assert wait_all(world, [snap])[0]["state"] == "done"


def test_batch_validation_is_all_or_nothing(world: World) -> None:
    with pytest.raises(InvalidName) as exc:
        world.ops.submit_batch(ALICE, "provision", [provision("a1"), provision("bad/name"), provision("a3")])
    assert "item 1" in str(exc.value) and exc.value.status == 400
    with pytest.raises(AuthenticationFailed) as exc2:  # bob's item 1 names proj1: 401, naming the item
        world.ops.submit_batch(BOB, "provision", [provision("b1", "proj2"), provision("a1")])
    assert "item 1" in str(exc2.value)
    with pytest.raises(InvalidInput, match="twice"):
        world.ops.submit_batch(ALICE, "provision", [provision("a1"), provision("a1")])
    with pytest.raises(InvalidInput, match="at most"):
        world.ops.submit_batch(ALICE, "provision", [provision("a1")] * 201)
    with pytest.raises(InvalidInput):
        world.ops.submit_batch(ALICE, "provision", [])
    assert count(world) == 0


def _dead_rows(world: World) -> tuple[int, int, int, int]:
    """Rows as a worker that died would leave them: a queued task, running tasks (journal row rolled
    back / finished / none).  The owner names another host's process: owner_alive() judges those
    alive, so the test marks it dead explicitly below."""
    with world.ops.journal.session() as s:
        running_op = Operation(kind="provision", args=json.dumps({"_locks": []}), steps="[]", owner=DEAD_OWNER,
                               state="running")
        done_op = Operation(kind="provision", args="{}", steps="[]", owner=DEAD_OWNER, state="done")
        s.add_all([running_op, done_op])
        s.flush()
        common = {"verb": "provision", "project": "proj1", "user": "alice", "args": "{}", "owner": DEAD_OWNER,
                  "cluster": "x"}
        queued = Task(state="queued", **common)
        rolled = Task(state="running", journal_ops=json.dumps([running_op.id]), **common)
        finished = Task(state="running", journal_ops=json.dumps([done_op.id]), **common)
        nothing = Task(state="running", **common)
        s.add_all([queued, rolled, finished, nothing])
        s.flush()
        return queued.id, rolled.id, finished.id, nothing.id


def test_recovery_settles_a_dead_workers_tasks(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import ims.einstein.journal as journal
    import ims.einstein.tasks as tasks

    def alive(owner: str) -> bool:
        return owner != DEAD_OWNER

    monkeypatch.setattr(journal, "owner_alive", alive)
    monkeypatch.setattr(tasks, "owner_alive", alive)
    queued, rolled, finished, nothing = _dead_rows(world)
    live = world.ops.submit(ALICE, "provision", provision("a1"))  # this (live) worker's task is left alone
    summary = world.ops.recover()
    assert summary["tasks"]["not_started"] == [queued]
    show = {i: world.ops.operation_show(ADMIN, i) for i in (queued, rolled, finished, nothing)}
    assert show[queued]["state"] == "failed" and show[queued]["error"]["message"] == NOT_STARTED
    assert show[queued]["error"]["status"] == 503
    assert show[rolled]["state"] == "failed" and "rolled back" in show[rolled]["error"]["message"]
    assert show[finished]["state"] == "done"
    assert show[nothing]["state"] == "failed" and "nothing was done" in show[nothing]["error"]["message"]
    assert wait_all(world, [live])[0]["state"] == "done"


def test_queued_tasks_never_wait_on_a_dead_worker(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import ims.einstein.tasks as tasks

    monkeypatch.setattr(tasks, "owner_alive", lambda owner: owner != DEAD_OWNER)
    world.cfg.scheduler.values["max_per_gateway"] = 1
    _dead_rows(world)  # the dead worker's running/queued rows hold no slot and no turn
    rec = world.ops.submit(ALICE, "provision", provision("a1"))
    assert wait_all(world, [rec])[0]["state"] == "done"


def test_drain_fails_unstarted_tasks(world: World) -> None:
    world.cfg.scheduler.values["max_per_gateway"] = 1
    gate = Gate(world)
    first = world.ops.submit(ALICE, "provision", provision("a1"))
    assert gate.arrived.wait(10)
    later = world.ops.submit_batch(ALICE, "provision", [provision("a2"), provision("a3")])
    assert world.ops.drain_tasks(0) is False  # one still running
    for rec in later:
        shown = world.ops.operation_show(ALICE, rec["id"])
        assert shown["state"] == "failed" and shown["error"]["message"] == NOT_STARTED
    gate.open.set()
    assert wait_all(world, [first])[0]["state"] == "done"
    assert world.ops.drain_tasks(5) is True
    assert sorted(p[0] for p in world.ops.list_provisioned(ALICE, "proj1")) == ["a1"]


def test_sigterm_drain_of_the_endpoint_covers_tasks(world: World) -> None:
    world.cfg.scheduler.values["max_per_gateway"] = 1
    endpoint = EinsteinEndpoint(world.ops)
    gate = Gate(world)
    reply = endpoint.call("submit_batch", [ALICE, "provision", [provision("a1"), provision("a2")]], {})
    assert reply["ok"], reply
    first, second = reply["result"]
    assert gate.arrived.wait(10)
    endpoint.start_draining()
    refused = endpoint.call("submit", [ALICE, "provision", provision("a3")], {})
    assert not refused["ok"] and refused["not_started"] and refused["error"]["status"] == 503
    assert endpoint.wait_idle(0) is False  # a1 still runs; a2 never started: failed, nothing done
    assert world.ops.operation_show(ALICE, second["id"])["error"]["message"] == NOT_STARTED
    gate.open.set()
    assert endpoint.wait_idle(10) is True
    assert world.ops.operation_show(ALICE, first["id"])["state"] == "done"
    assert [p[0] for p in world.ops.list_provisioned(ALICE, "proj1")] == ["a1"]
    assert count(world, state="queued") == 0 and count(world, state="running") == 0


def test_wait_is_capped_below_the_rpc_timeout(world: World) -> None:
    world.cfg.rpc.values["timeout"] = 0.2
    world.cfg.scheduler.values["max_per_gateway"] = 1
    gate = Gate(world)
    rec = world.ops.submit(ALICE, "provision", provision("a1"))
    assert gate.arrived.wait(10)
    assert world.ops.operation_wait(ALICE, rec["id"], 1000)["state"] == "running"  # returned after <= 0.1 s
    gate.open.set()
    assert wait_all(world, [rec])[0]["state"] == "done"


def test_submit_with_wait_answers_when_done_or_after_the_wait(world: World) -> None:
    rpc = client(world)
    done = rpc.submit(ALICE, "provision", provision("a1"), wait=10)
    assert done["state"] == "done" and done["progress"] == 100 and done["finished_at"]
    failed = rpc.submit(ALICE, "provision", provision("a2", img="no-such-image"), wait=10)
    assert failed["state"] == "failed" and failed["error"]["type"] == "ImageNotFound"
    gate = Gate(world)
    held = rpc.submit(ALICE, "provision", provision("a3"), wait=0.2)  # the wait ends first: as it is then
    assert held["state"] == "running"
    gate.open.set()
    assert wait_all(world, [held])[0]["state"] == "done"
    with pytest.raises(InvalidInput):
        rpc.submit(ALICE, "provision", provision("a4"), wait="soon")
    assert count(world) == 3


def test_fair_order() -> None:
    from datetime import UTC, datetime

    assert fair_order([(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b")], {}) == [1, 4, 2, 5, 3]
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    assert fair_order([(2, "a"), (3, "a"), (4, "b")], {"a": early}) == [4, 2, 3]  # b never served
    assert fair_order([(2, "a"), (3, "a"), (4, "b")], {"a": late, "b": early}) == [4, 2, 3]
    assert fair_order([(2, "a"), (3, "a"), (4, "b")], {"a": early, "b": late}) == [2, 4, 3]
    assert fair_order([], {"a": early}) == []


def test_scheduler_config_keys() -> None:
    from ims.common import config
    from ims.common.errors import ConfigError

    base = "[bmi]\nuid = 5\n[iscsi]\nip = 10.0.0.1\n[net_isolator]\nurl = http://127.0.0.1:7000\n"
    cfg = config.parse("x.cfg", base)
    assert cfg.scheduler.max_per_gateway == 8 and cfg.scheduler.max_per_cluster == 16
    assert config.parse("x.cfg", base + "[scheduler]\nmax_per_gateway = 2\n").scheduler.max_per_gateway == 2
    with pytest.raises(ConfigError, match=r"\[scheduler\] max_per_cluster"):
        config.parse("x.cfg", base + "[scheduler]\nmax_per_cluster = 0\n")

"""What an operation reads from the database does not grow with the history kept.

The journal keeps finished operations and tasks for 30 days (thousands of rows, ~1 KiB each), and
every image and node stays a row.  (tests/unit/test_migrate.py checks that the migrations make
the models' indexes.)  A statement the guide's workflow, an asynchronous operation or
recovery runs that has to read a whole one of those tables costs tens of ms at production sizes,
mostly while holding SQLite's write lock (every transaction is ``BEGIN IMMEDIATE``), so it slows
every other operation too.  Here every statement they run on a real SQLite file (schema made by the
migrations, as Einstein makes it) is asked for its query plan: none may scan a table that grows.
"""
from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from ims.database import make_engine
from ims.database.models import Task
from ims.database.plain import Plain
from ims.einstein.task_records import TaskRecords
from tests.unit.test_operations import ADMIN, UID, USER, Env

# Tables that grow with use (history kept for days, one row per image or node).
GROWING = ("operation", "task", "image", "provision")


def _statements(env: Env) -> list[str]:
    """Every statement SQLite ran on the engine's connections, with its values (SQLite's own trace: it
    sees SQLAlchemy's statements and the journal's plain SQL, ims/database/plain.py, alike)."""
    engine = env.ops.engine
    seen: list[str] = []
    tracing = [True]

    def record(statement: str) -> None:
        if tracing[0]:
            seen.append(" ".join(statement.split()))

    @event.listens_for(engine, "checkout")
    def trace(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_trace_callback(record)

    ops = env.ops
    ops.import_image(USER, "bmi_infra", "bmi-test-image")
    ops.provision(USER, "bmi_infra", "bmi_node", "bmi-test-image", "bmi_network", "bmi_port")
    ops.create_snapshot(USER, "bmi_infra", "bmi_node", "snap1")
    ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
    task = ops.submit(USER, "provision", {"project": "bmi_infra", "node": "node2", "img": "snap1",
                                          "network": "bmi_network", "nic": "bmi_port"})
    assert ops.operation_wait(USER, task["id"], 20.0)["state"] == "done"
    done = ops.submit_batch(USER, "deprovision", [{"project": "bmi_infra", "node": "node2",
                                                   "network": "bmi_network", "nic": "bmi_port"}])
    assert ops.operation_wait(USER, done[0]["id"], 20.0)["state"] == "done"
    ops.remove_image(USER, "bmi_infra", "snap1")
    ops.recover(ADMIN)
    event.remove(engine, "checkout", trace)
    tracing[0] = False
    return sorted(set(seen))


def test_no_statement_of_an_operation_scans_a_table_that_grows(tmp_path: Any) -> None:
    env = Env(tmp_path)
    try:
        statements = _statements(env)
        engine = env.ops.engine
        scans = []
        with engine.connect() as conn:
            for sql in statements:
                if sql.split()[0] not in ("SELECT", "UPDATE", "DELETE"):
                    continue
                plan = " | ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all())
                if any(re.search(rf"\bSCAN {table}\b", plan) for table in GROWING):
                    scans.append(f"{sql}\n    -> {plan}")
        assert len(statements) > 30  # the workflow ran its statements through this engine
        assert any(sql.startswith("UPDATE operation SET steps = ") for sql in statements)  # plain SQL too
        assert scans == [], "statements that read a whole growing table:\n" + "\n".join(scans)
    finally:
        env.ops.close()



class _VmSteps:
    """Counts SQLite virtual-machine instructions (in hundreds) run on ``engine``'s connections: the
    work a statement does, the same on every run and machine (no timing)."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        self.engine = engine
        event.listen(engine, "checkout", self._install)

    def _tick(self) -> int:
        self.count += 1
        return 0  # 0: go on

    def _install(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_progress_handler(self._tick, 100)

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._install)


def _workflow(env: Env, node: str) -> None:
    ops = env.ops
    ops.provision(USER, "bmi_infra", node, "bmi-test-image", "bmi_network", "bmi_port")
    ops.deprovision(USER, "bmi_infra", node, "bmi_network", "bmi_port")
    for verb, args in (("provision", {"img": "bmi-test-image"}), ("deprovision", {})):
        task = ops.submit(USER, verb, {"project": "bmi_infra", "node": node, "network": "bmi_network",
                                       "nic": "bmi_port", **args})
        assert ops.operation_wait(USER, task["id"], 20.0)["state"] == "done"
    ops.recover()  # what worker 0 runs every [journal] retry_seconds: reaps, forgets rows past 30 days


def _add_history(env: Env, rows: int) -> None:
    """``rows`` finished journal rows and tasks, as weeks of use leave them (steps ~1 KiB each)."""
    steps = json.dumps([{"name": f"step{i}", "params": {"image": UID + "img1", "node": "n" * 40}}
                        for i in range(10)])
    engine = env.ops.engine
    now = datetime.now(UTC).replace(tzinfo=None)  # within the 30 days kept
    stamps = [(now - timedelta(days=1 + i % 28, seconds=i)).isoformat(sep=" ") for i in range(rows)]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO operation (kind, args, steps, state, committed, owner, started_at, updated_at) "
            "VALUES (?, ?, ?, 'done', 1, 'old:1:1', ?, ?)",
            [("provision", '{"_locks": ["node:x"]}', steps, t, t) for t in stamps])
        conn.exec_driver_sql(
            "INSERT INTO task (verb, project, user, args, state, owner, cluster, journal_ops, created_at, started_at, "
            "finished_at) VALUES ('provision', 'bmi_infra', 'haas', '{}', 'done', 'old:1:1', 'fake:x', '[]', ?, ?, ?)",
            [(t, t, t) for t in stamps])


def test_the_work_of_an_operation_does_not_grow_with_the_history_kept(tmp_path: Any) -> None:
    env = Env(tmp_path)
    try:
        env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
        engine = env.ops.engine
        _workflow(env, "bmi_node")  # warm: first-use statements out of the way
        steps = _VmSteps(engine)
        _workflow(env, "bmi_node")
        fresh = steps.count
        _add_history(env, 20_000)
        steps.count = 0
        _workflow(env, "bmi_node")
        aged = steps.count
        steps.close()
        assert fresh > 0
        # The same statements on 20,000 more finished rows: allowed, 20,000 more instructions in all (one
        # per row kept); a statement that reads every row kept runs tens per row (a run before the
        # indexes: ~4,000 hundreds more; with them, equal within background noise of ~10 hundreds).
        assert aged < fresh + 200, f"{fresh}00 SQLite instructions on a new database, {aged}00 with history"
    finally:
        env.ops.close()


def test_the_fair_order_reads_each_projects_latest_start(db_url: str) -> None:
    """The scheduler's one-max-per-project read, on SQLite and PostgreSQL: the latest start of each
    project asked about, none for a project never started, and only those asked about."""
    engine = make_engine(db_url)
    try:
        when = [datetime(2026, 11, d, 10, tzinfo=UTC) for d in (1, 2, 3, 4)]
        with sessionmaker(bind=engine).begin() as session:
            for project, started in (("a", when[0]), ("a", when[2]), ("b", when[1]), ("c", when[3]),
                                     ("b", None)):
                session.add(Task(verb="provision", project=project, user="u", args="{}", owner="o:1:1",
                                 cluster="x", state="done" if started else "queued", started_at=started))
        with Plain(engine).transaction() as tx:
            last = TaskRecords._last_started(tx, [(1, "a"), (2, "b"), (3, "new")])
            one = TaskRecords._last_started(tx, [(1, "b")])
        assert {p: v.replace(tzinfo=v.tzinfo or UTC) for p, v in last.items()} == {"a": when[2], "b": when[1]}
        assert list(one) == ["b"]
    finally:
        engine.dispose()

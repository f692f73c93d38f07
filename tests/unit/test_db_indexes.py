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

import re
from typing import Any

from sqlalchemy import event

from tests.unit.test_operations import ADMIN, USER, Env

# Tables that grow with use (history kept for days, one row per image or node).
GROWING = ("operation", "task", "image", "provision")


def _statements(env: Env) -> list[str]:
    engine = env.ops.journal._sessions.kw["bind"]
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

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
    event.remove(engine, "before_cursor_execute", record)
    return sorted(set(seen))


def test_no_statement_of_an_operation_scans_a_table_that_grows(tmp_path: Any) -> None:
    env = Env(tmp_path)
    try:
        statements = _statements(env)
        engine = env.ops.journal._sessions.kw["bind"]
        scans = []
        with engine.connect() as conn:
            for sql in statements:
                if sql.split()[0] not in ("SELECT", "UPDATE", "DELETE"):
                    continue
                params = [None] * sql.count("?")
                plan = " | ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}",
                                                                              tuple(params)).all())
                if any(re.search(rf"\bSCAN {table}\b", plan) for table in GROWING):
                    scans.append(f"{sql}\n    -> {plan}")
        assert len(statements) > 30  # the workflow ran its statements through this engine
        assert scans == [], "statements that read a whole growing table:\n" + "\n".join(scans)
    finally:
        env.ops.close()


"""Several PROCESSES on one database (SQLite file and PostgreSQL): the journal's locks exclude each
other, a dead owner's work is finished exactly once, and task admission keeps its global bound.

SQLite serialises every transaction (BEGIN IMMEDIATE); PostgreSQL runs them side by side (READ
COMMITTED), where the lock rows' primary key, the conditional take-over UPDATE and the
advisory locks of ``ims.database.exclusive`` must do that work instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from ims.database.models import Lock, Task
from tests.support.journal_ops import make_journal
from tests.unit.test_journal import kill_mid_provision

ROOT = Path(__file__).resolve().parents[2]
PROCS = 4

CONTENDER = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from ims.common.errors import NodeBusy
from tests.support.journal_ops import make_journal
url, files, rounds = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
journal = make_journal(url, files)
journal.recovery_wait_seconds = 0.5
while not (files / "go").exists():
    time.sleep(0.01)
won = busy = overlaps = 0
for _ in range(rounds):
    try:
        with journal.lock(["node:shared"], "provision"):
            try:  # nobody else may be inside now
                fd = os.open(files / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                overlaps += 1
            counter = files / "counter"  # read-modify-write: loses updates unless the lock excludes
            value = int(counter.read_text()) if counter.exists() else 0
            time.sleep(0.003)
            counter.write_text(str(value + 1))
            (files / "inside").unlink(missing_ok=True)
        won += 1
    except NodeBusy:
        busy += 1
    time.sleep(0.001)
print(json.dumps({"won": won, "busy": busy, "overlaps": overlaps}))
"""


def _run_all(script: str, *args: str) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ROOT), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCS)]
    return procs  # type: ignore[return-value]


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, stderr[-3000:]
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:  # a failed one must not leave the others behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_several_processes_contending_for_one_lock(tmp_path: Path, db_url: str) -> None:
    files = tmp_path / "files"
    files.mkdir()
    journal = make_journal(db_url, files)  # creates the schema before the racers start
    rounds = 25
    procs = _run_all(CONTENDER, db_url, str(files), str(rounds))
    time.sleep(1.0)  # let every process import and connect, then start them together
    (files / "go").write_text("")
    results = _results(procs)
    won = sum(r["won"] for r in results)
    assert sum(r["overlaps"] for r in results) == 0, results
    assert won >= 1 and won + sum(r["busy"] for r in results) == PROCS * rounds, results
    assert int((files / "counter").read_text()) == won  # no lost update: the holders never overlapped
    with journal.session() as s:
        assert s.scalars(select(Lock)).all() == []


TAKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from ims.common.errors import NodeBusy
from tests.support.journal_ops import make_journal, journaled_provision
url, files = sys.argv[2], Path(sys.argv[3])
journal = make_journal(url, files)
while not (files / "go").exists():
    time.sleep(0.005)
try:
    journaled_provision(journal, files, "node1", f"new{__import__('os').getpid()}")
    print('{"won": 1}')
except NodeBusy:
    print('{"won": 0}')
"""


def test_several_processes_meet_a_dead_owner_it_is_rolled_back_once(tmp_path: Path, db_url: str) -> None:
    files = tmp_path / "files"
    files.mkdir()
    journal = make_journal(db_url, files)
    kill_mid_provision(db_url, files)
    procs = _run_all(TAKER, db_url, str(files))
    time.sleep(1.0)
    (files / "go").write_text("")
    results = _results(procs)
    assert sum(r["won"] for r in results) >= 1, results
    assert (files / "undo.log").read_text() == "node1:old\n"  # the dead provision undone exactly once
    assert (files / "node1").read_text().startswith("new")
    with journal.session() as s:
        assert s.scalars(select(Lock)).all() == []


ADMITTER = """
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from sqlalchemy import func, select
from ims.common import config
from ims.database.models import Task
from ims.einstein.tasks import Tasks
from tests.support.journal_ops import make_journal
url, files, count = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
cfg = config.parse("t.cfg", f"[bmi]\\nuid = t\\n[db]\\nurl = {url}\\n[iscsi]\\nip = 127.0.0.1\\n"
                   "[net_isolator]\\nurl = http://127.0.0.1:1\\n"
                   "[fs]\\ndriver = file\\npath = /nonexistent\\n[scheduler]\\nmax_per_gateway = 1\\n")
journal = make_journal(url, files)
tasks = Tasks(None, SimpleNamespace(cfg=cfg, session=journal.session, journal=journal))
with journal.session() as s:
    rows = [Task(verb="provision", project=f"p{os.getpid()}", user="u", args="{}", state="queued",
                 owner=tasks.owner, gateway=tasks.gateway, cluster=tasks.cluster) for _ in range(count)]
    s.add_all(rows)
    s.flush()
    ids = [r.id for r in rows]
tasks._pending.update({i: ("provision", {}, {}) for i in ids})
while not (files / "go").exists():
    time.sleep(0.005)
most = 0
while tasks._pending:
    claimed = tasks._claim()
    if not claimed and url.startswith("sqlite"):
        # SQLite serialises every transaction (BEGIN IMMEDIATE): a busy loop there only slows the
        # test down.  On PostgreSQL the claimers must really overlap: no pause.
        time.sleep(0.02)
    for task_id, *_ in claimed:
        with journal.session() as s:  # how many run on the gateway right now, this one included
            most = max(most, s.scalar(select(func.count()).select_from(Task).where(Task.state == "running")))
        time.sleep(0.005)
        tasks._finish(task_id, None, None)
        tasks._running.discard(task_id)
print(json.dumps({"most": most}))
"""


def test_task_admission_bound_holds_across_processes(tmp_path: Path, db_url: str) -> None:
    """Four workers claim tasks for one gateway bounded to ONE running task: never two at once."""
    files = tmp_path / "files"
    files.mkdir()
    journal = make_journal(db_url, files)
    per_process = 10
    procs = _run_all(ADMITTER, db_url, str(files), str(per_process))
    time.sleep(1.0)
    (files / "go").write_text("")
    results = _results(procs)
    assert [r["most"] for r in results] == [1] * PROCS, results
    with journal.session() as s:
        done = s.scalar(select(func.count()).select_from(Task).where(Task.state == "done"))
    assert done == PROCS * per_process
    assert os.path.exists(files)

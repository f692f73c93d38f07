"""Schema migrations (ims/database/migrate.py) on real SQLite files and real PostgreSQL databases.

* a new database gets exactly the models' schema (alembic's own comparison finds no difference);
* several processes upgrading one new database at once: one applies, the others find it done;
* a database an earlier BMI made with ``create_all`` is adopted (stamped), its rows kept;
* an ORIGINAL BMI database (its ``project`` and ``image`` tables exactly as the original's
  SQLAlchemy made them, recreated here with raw SQL) is converted in place: its rows list,
  provision and snapshot through BMI's own code, and rows the original's tools insert later
  (no ``kind``) are valid golden images.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

import ims.einstein.flatten  # noqa: F401 - registers flatten_job on the models' metadata
from ims.common import config
from ims.database import make_engine, migrate
from ims.database.migrations import schema_0001
from ims.database.models import Base, Image
from ims.einstein.boot import BootFiles
from ims.einstein.operations import Operations
from tests.support.fakes import FakeHIL, FakeIscsi, FakeStorage

UID = "112233445566778899"
USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
MAC = "52:54:00:aa:bb:01"
ROOT = Path(__file__).resolve().parents[2]


def schema_diff(url: str) -> list:
    engine = make_engine(url, ensure_schema=False)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = make_engine(url, ensure_schema=False)
    try:
        with engine.connect() as conn:
            return migrate.current(conn)
    finally:
        engine.dispose()


def test_a_new_database_gets_the_models_schema(db_url: str) -> None:
    make_engine(db_url).dispose()
    assert revision(db_url) == migrate.head()
    assert schema_diff(db_url) == []
    migrate.upgrade(db_url)  # again: nothing to do
    assert revision(db_url) == migrate.head()


UPGRADER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from ims.database import migrate
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
migrate.upgrade(sys.argv[2])
"""


def test_several_processes_upgrading_at_once(db_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", UPGRADER, str(ROOT), db_url, str(go)], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    time.sleep(0.5)
    go.write_text("")
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert revision(db_url) == migrate.head()
    assert schema_diff(db_url) == []


def test_a_database_made_by_create_all_is_adopted(db_url: str) -> None:
    """What an earlier BMI left: the baseline's tables from create_all, without the newest column."""
    engine = make_engine(db_url, ensure_schema=False)
    schema_0001.metadata().create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE provision DROP COLUMN connected"))
        conn.execute(text("INSERT INTO project (name, provision_network) VALUES ('bmi_infra', 'net')"))
        conn.execute(text("INSERT INTO image (name, is_public, is_snapshot, project_id, kind) "
                          "VALUES ('img', false, false, 1, 'golden')"))
    engine.dispose()
    assert revision(db_url) is None
    migrate.upgrade(db_url)
    assert revision(db_url) == migrate.head()
    assert schema_diff(db_url) == []
    engine = make_engine(db_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT name, kind FROM image")).all() == [("img", "golden")]
        # the server default: an INSERT that names no kind makes a golden image
        conn.execute(text("INSERT INTO image (name, is_public, is_snapshot, project_id) VALUES ('x', false, false, 1)"))
        assert conn.execute(text("SELECT kind FROM image WHERE name = 'x'")).scalar() == "golden"
    engine.dispose()


# The original BMI's tables, as its SQLAlchemy models made them on SQLite (v0.6: with
# project.provision_network; its last version dropped that column).
ORIGINAL_V06 = """
CREATE TABLE project (
    id INTEGER NOT NULL, name VARCHAR NOT NULL, provision_network VARCHAR NOT NULL,
    PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE image (
    id INTEGER NOT NULL, name VARCHAR NOT NULL, is_public BOOLEAN NOT NULL, is_snapshot BOOLEAN NOT NULL,
    project_id INTEGER NOT NULL, parent_id INTEGER,
    PRIMARY KEY (id),
    CONSTRAINT _project_id_image_name_unique_constraint UNIQUE (project_id, name),
    CHECK (is_public IN (0, 1)), CHECK (is_snapshot IN (0, 1)),
    FOREIGN KEY(project_id) REFERENCES project (id), FOREIGN KEY(parent_id) REFERENCES image (id));
"""
ORIGINAL_HEAD = ORIGINAL_V06.replace(", provision_network VARCHAR NOT NULL", "")


def make_original(path: Path, schema: str) -> None:
    v06 = "provision_network" in schema
    with sqlite3.connect(path) as db:
        db.executescript(schema)
        db.execute("INSERT INTO project VALUES (1, 'bmi_infra'" + (", 'provision')" if v06 else ")"))
        db.execute("INSERT INTO project VALUES (2, 'other'" + (", 'net2')" if v06 else ")"))
        rows = [(1, "bmi-test-image", 0, 0, 1, None),   # golden (imported)
                (3, "bmi_node", 0, 0, 1, 1),           # the clone a node boots (v0.6) / a disk (last version)
                (4, "snap1", 0, 1, 1, 1),              # a snapshot of bmi_node
                (5, "shared", 1, 0, 2, None),          # a public golden image of another project
                (9, "hole-before-me", 0, 0, 1, None)]  # ids 2, 6-8 were deleted
        db.executemany("INSERT INTO image VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.close()


def ops_on(tmp_path: Path, storage: FakeStorage) -> Operations:
    tftp = tmp_path / "tftp"
    (tftp / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    cfg = config.parse("test.cfg", f"""
[bmi]
uid = {UID}
admin_users = haasadmin
[db]
path = {tmp_path}/bmi.db
[iscsi]
ip = 10.77.0.1
[net_isolator]
url = http://127.0.0.1:1
auth_cache_seconds = 0
[tftp]
pxelinux_path = {tftp}/pxelinux.cfg
ipxe_path = {tftp}
leases_file = {tmp_path}/leases
""")
    hil = FakeHIL()
    hil.add_user("haas", "secret", ["bmi_infra"])
    hil.add_user("haasadmin", "admin1234", [], admin=True)
    hil.add_node("node2", "bmi_infra", {"eno1": MAC})
    boot = BootFiles(cfg.tftp.pxelinux_path, cfg.tftp.ipxe_path, "10.77.0.1")
    return Operations(cfg, storage, FakeIscsi(), boot, hil.client)


def original_storage(snap: str = "snapshot") -> FakeStorage:
    """What the original left in Ceph for those rows: flattened goldens/snapshots with a protected snap."""
    storage = FakeStorage()
    for image_id in (1, 4, 5, 9):
        name = f"{UID}img{image_id}"
        storage.create_image(name, 4096)
        storage.write(name, 0, f"bytes-of-{image_id}".encode())
        storage.create_snapshot(name, snap)
        storage.protect_snapshot(name, snap)
    storage.clone(f"{UID}img1", snap, f"{UID}img3")
    return storage


@pytest.mark.parametrize("schema", [ORIGINAL_V06, ORIGINAL_HEAD], ids=["v0.6", "last"])
def test_an_original_bmi_database_is_adopted(tmp_path: Path, schema: str) -> None:
    db = tmp_path / "bmi.db"
    make_original(db, schema)
    url = f"sqlite:///{db}"
    migrate.upgrade(url)
    assert revision(url) == migrate.head()
    assert schema_diff(url) == []
    ops = ops_on(tmp_path, original_storage())
    try:
        # every row kept, with its id (Ceph names are <uid>img<id>) and a kind that follows from it
        with ops.journal.session() as s:
            rows = [(r.id, r.name, r.kind, r.parent_id) for r in s.scalars(select(Image).order_by(Image.id))]
        assert rows == [(1, "bmi-test-image", "golden", None), (3, "bmi_node", "disk", 1),
                        (4, "snap1", "snapshot", 1), (5, "shared", "golden", None),
                        (9, "hole-before-me", "golden", None)]
        assert ops.list_images(USER, "bmi_infra") == ["bmi-test-image", "hole-before-me"]
        assert [s[0] for s in ops.list_snapshots(USER, "bmi_infra")] == ["snap1"]
        assert [r[:4] for r in ops.db_list(USER, project="bmi_infra")] == [
            [1, "bmi-test-image", "bmi_infra", f"{UID}img1"], [3, "bmi_node", "bmi_infra", f"{UID}img3"],
            [4, "snap1", "bmi_infra", f"{UID}img4"], [9, "hole-before-me", "bmi_infra", f"{UID}img9"]]
        # provisioning from the adopted golden image and from the adopted snapshot works
        ops.provision(USER, "bmi_infra", "node2", "snap1", "bmi_network", "eno1")
        node_row = ops.db_list(USER, name="node2")[0]
        assert node_row[0] == 10  # a new id: never one the original handed out (9 was its highest)
        assert ops.storage.parent_info(node_row[3]) == (f"{UID}img4", "snapshot")
        ops.deprovision(USER, "bmi_infra", "node2", "bmi_network", "eno1")
        # the adopted clone is a disk of the split API: it can be deleted
        ops.delete_disk(USER, "bmi_infra", "bmi_node")
        assert [r[1] for r in ops.db_list(USER, project="bmi_infra")] == ["bmi-test-image", "snap1",
                                                                          "hole-before-me"]
    finally:
        ops.close()
    # the original's own tools insert rows without a kind: still valid golden images
    with sqlite3.connect(db) as raw:
        raw.execute("INSERT INTO image (name, is_public, is_snapshot, project_id) VALUES ('from-old-tool', 0, 0, 1)")
    raw.close()
    ops = ops_on(tmp_path, original_storage())
    try:
        assert "from-old-tool" in ops.list_images(USER, "bmi_infra")
    finally:
        ops.close()
    # foreign keys hold after the conversion
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        ddl = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'image'").fetchone()[0]
    raw.close()
    assert "AUTOINCREMENT" in ddl and "ON DELETE SET NULL" in ddl and "DEFAULT 'golden'" in ddl


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bmi.db"
    make_engine(url).dispose()
    with sqlite3.connect(tmp_path / "bmi.db") as raw:
        raw.execute("UPDATE alembic_version SET version_num = '9999'")
    raw.close()
    with pytest.raises(Exception, match="revision 9999, which this BMI does not know"):
        make_engine(url)
    assert inspect(make_engine(url, ensure_schema=False)).has_table("image")


def test_einstein_supervisor_upgrades_before_its_recovery_and_workers(tmp_path: Path, monkeypatch) -> None:
    """Einstein's start: the schema is at head before the first operations object exists."""
    from ims.rpc import server

    url = f"sqlite:///{tmp_path}/bmi.db"
    cfg = config.parse("t.cfg", f"[bmi]\nuid = t\n[db]\nurl = {url}\n[net_isolator]\nurl = http://127.0.0.1:1\n"
                                "[iscsi]\nip = 127.0.0.1\n[rpc]\nhmac_key = k\n")
    seen: list[str | None] = []

    class Ops:  # stands in for the real Operations (which would need Ceph): records what it found
        def __init__(self, _cfg: object) -> None:
            seen.append(revision(url))

        def recover(self) -> dict:
            return {}

        def close(self) -> None:
            pass

    monkeypatch.setattr(server, "load_factory", lambda _spec: Ops)
    server.Supervisor(cfg).recover()
    assert seen == [migrate.head()]

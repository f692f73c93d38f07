"""Pytest fixtures for a real throwaway PostgreSQL cluster and the database backend of a test.

``pg_cluster`` (session) runs ``scripts/pg-dev start`` in a private temp dir, the first time a
test needs it, and stops exactly that cluster at session end.  If it cannot start, the test
FAILS with the script's output; it is never skipped.

``db_url`` is parametrized by backend: ``sqlite`` (a file in the test's tmp_path) and
``postgresql`` (a fresh database in the session's cluster, dropped afterwards), so the test
ids carry ``[sqlite]`` / ``[postgresql]``.  ``BMI_TEST_DB_BACKENDS=sqlite`` (a comma list)
narrows that for a quick local run; ``make test`` runs both.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_DEV = str(REPO / "scripts" / "pg-dev")
BACKENDS = [b.strip() for b in os.environ.get("BMI_TEST_DB_BACKENDS", "sqlite,postgresql").split(",") if b.strip()]
_names = itertools.count(1)


@dataclass
class PgCluster:
    dir: str
    port: int

    def url(self, database: str = "bmi") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self) -> str:
        """A new empty database; returns its name (letters, digits, _ only)."""
        name = f"bmi_t{os.getpid()}_{next(_names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    run_dir = tempfile.mkdtemp(prefix="bmi-pg-")
    proc = subprocess.run([PG_DEV, "start", run_dir], capture_output=True, text=True, timeout=180, check=False)
    if proc.returncode != 0:
        subprocess.run([PG_DEV, "stop", run_dir, "--purge"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        pytest.fail(f"scripts/pg-dev could not start PostgreSQL:\n{proc.stdout}\n{proc.stderr}")
    port = int(Path(run_dir, "port").read_text())
    try:
        yield PgCluster(run_dir, port)
    finally:
        stop = subprocess.run([PG_DEV, "stop", run_dir, "--purge"], capture_output=True, text=True, timeout=120,
                              check=False)
        if stop.returncode != 0:
            print(f"pg-dev stop failed: {stop.stderr}")


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def backend_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The URL of a new empty database of ``backend`` for this test (dropped when the test ends).

    For fixtures that combine the backend with their own parameters (``db_url`` is the plain case)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/bmi.db"
    if backend != "postgresql":
        raise ValueError(f"unknown database backend {backend!r}")
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database()
    request.addfinalizer(lambda: cluster.drop_database(name))
    return cluster.url(name)


@pytest.fixture()
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of an empty database of this test's backend (its schema comes from make_engine)."""
    return backend_url(request, db_backend, tmp_path)


def db_config(url: str) -> str:
    """The ``[db]`` section of a BMI config file for ``url``."""
    return f"[db]\nurl = {url}\n"

"""scripts/pg-dev: a throwaway PostgreSQL that answers on 127.0.0.1 only and is stopped exactly
(stopping one cluster leaves another, started the same way, running)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest

from tests.support.pg import PG_DEV


def pg_dev(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PG_DEV, *args], capture_output=True, text=True, timeout=180, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"pg-dev {' '.join(args)} failed: {proc.stderr}")
    return proc


def postmaster(run_dir: str) -> int:
    return int(Path(run_dir, "data", "postmaster.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for PID 1 to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def answers(port: int) -> bool:
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="bmi", connect_timeout=5)
    except psycopg2.OperationalError:
        return False
    with conn, conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
    conn.close()
    return True


def test_two_clusters_each_stopped_exactly() -> None:
    a, b = tempfile.mkdtemp(prefix="bmi-pg-a-"), tempfile.mkdtemp(prefix="bmi-pg-b-")
    try:
        url_a = pg_dev("start", a).stdout.strip()
        url_b = pg_dev("start", b).stdout.strip()
        assert url_b != url_a
        port_a, port_b = int(Path(a, "port").read_text()), int(Path(b, "port").read_text())
        assert port_a != port_b
        assert url_a == f"postgresql+psycopg2://postgres@127.0.0.1:{port_a}/bmi"
        assert pg_dev("url", a).stdout.strip() == url_a
        assert answers(port_a) and answers(port_b)
        pid_a, pid_b = postmaster(a), postmaster(b)
        assert pg_dev("status", a, check=False).returncode == 0

        pg_dev("stop", a)
        assert not alive(pid_a)
        assert pg_dev("status", a, check=False).returncode != 0
        assert not answers(port_a)
        assert answers(port_b) and alive(pid_b)  # the other cluster is untouched
        pg_dev("stop", a)  # twice: nothing to do

        # a restart keeps the data
        pg_dev("start", a)
        assert answers(int(Path(a, "port").read_text()))
        pg_dev("stop", a, "--purge")
        assert not os.path.exists(a)
    finally:
        pg_dev("stop", a, "--purge", check=False)
        pg_dev("stop", b, "--purge", check=False)
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


def test_a_directory_name_that_would_reach_the_config_is_refused() -> None:
    proc = pg_dev("start", "/tmp/bad dir'x", check=False)
    assert proc.returncode != 0 and "DIR may hold only" in proc.stderr
    assert not os.path.exists("/tmp/bad dir'x")

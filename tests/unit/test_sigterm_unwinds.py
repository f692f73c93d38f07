"""tests.support.procs.sigterm_unwinds: a benchmark stopped by SIGTERM still runs its teardown."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A stand-in for a benchmark: "starts" something, then waits; its finally is the teardown.
CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[3] == "unwinds":
    from tests.support.procs import sigterm_unwinds
    sigterm_unwinds()
try:
    open(sys.argv[2] + ".started", "w").close()
    time.sleep(60)
finally:
    open(sys.argv[2] + ".torn-down", "w").close()
"""


def _run_and_terminate(tmp_path: Path, mode: str) -> tuple[int, Path]:
    mark = tmp_path / mode
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(mark), mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not Path(f"{mark}.started").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=30)
    return rc, Path(f"{mark}.torn-down")


def test_sigterm_runs_the_finally_blocks(tmp_path: Path) -> None:
    rc, torn_down = _run_and_terminate(tmp_path, "unwinds")
    assert torn_down.exists(), "the teardown did not run on SIGTERM"
    assert rc != 0  # still ends as interrupted, not as a success


def test_without_it_sigterm_skips_them(tmp_path: Path) -> None:
    """Why the benchmarks call it: Python's default SIGTERM ends the process on the spot."""
    rc, torn_down = _run_and_terminate(tmp_path, "default")
    assert rc == -signal.SIGTERM
    assert not torn_down.exists()

"""Start the HIL simulator as a real subprocess for tests.

``start_hil_simulator(inventory, tmp_dir)`` runs ``scripts/hil-simulator`` on a free
port (``--port 0`` + ``--port-file``, so there is no pick-then-bind race), waits until
it answers HTTP, and returns a handle with ``.url`` and ``.stop()``.

The session fixture ``hil_sim`` serves config/hil-inventory.example.json. Use it with
``from tests.support.hil import hil_sim  # noqa: F401`` or ``pytest_plugins``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "hil-simulator"
EXAMPLE_INVENTORY = REPO / "config" / "hil-inventory.example.json"

# Credentials of config/hil-inventory.example.json.
ADMIN = ("haasadmin", "admin1234")
MEMBER = ("haas", "secret")
TENANT2 = ("tenant2", "secret2")


class HILSimulatorError(RuntimeError):
    pass


class HILSimulator:
    """A running simulator process. ``url`` is the base without ``/v0``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, inventory: dict[str, Any]) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.inventory = inventory

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop exactly the process we started (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def start_hil_simulator(inventory: dict[str, Any], tmp_dir: str | os.PathLike[str], action_delay: float = 0.2,
                        startup_timeout: float = 20.0) -> HILSimulator:
    """Run the simulator with ``inventory`` on a free 127.0.0.1 port; HILSimulatorError if it cannot start."""
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    inv_path = tmp / "hil-inventory.json"
    inv_path.write_text(json.dumps(inventory))
    port_file = tmp / "hil-simulator.port"
    port_file.unlink(missing_ok=True)
    log_path = tmp / "hil-simulator.log"
    argv = [sys.executable, str(SCRIPT), "--inventory", str(inv_path), "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--action-delay", str(action_delay)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(REPO))
    deadline = time.monotonic() + startup_timeout
    port = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HILSimulatorError(f"HIL simulator exited with {proc.returncode} at start-up:\n"
                                    f"{log_path.read_text(errors='replace')[-3000:]}")
        if not port and port_file.exists():
            port = int(port_file.read_text().strip() or 0)
        if port:
            try:
                # Any HTTP answer (401 included) means the server is serving.
                requests.get(f"http://127.0.0.1:{port}/v0/active_extensions", timeout=1.0)
                return HILSimulator(proc, port, log_path, inventory)
            except requests.RequestException:
                pass
        time.sleep(0.05)
    handle = HILSimulator(proc, port, log_path, inventory)
    handle.stop()
    raise HILSimulatorError(f"HIL simulator did not answer within {startup_timeout:g} s:\n{handle.log_tail()}")


def example_inventory() -> dict[str, Any]:
    return json.loads(EXAMPLE_INVENTORY.read_text())


@pytest.fixture(scope="session")
def hil_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HILSimulator]:
    """A HIL simulator serving config/hil-inventory.example.json for the whole session."""
    try:
        sim = start_hil_simulator(example_inventory(), tmp_path_factory.mktemp("hilsim"))
    except HILSimulatorError as exc:
        pytest.fail(f"cannot start the HIL simulator: {exc}", pytrace=False)
    try:
        yield sim
    finally:
        sim.stop()

"""Small helpers the tests that start real daemons share: free local ports, a process's children, and
SIGTERM handled like Ctrl-C (for the benchmarks that start stacks)."""
from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any


def free_port(consecutive: int = 1) -> int:
    """The first of ``consecutive`` free TCP ports on 127.0.0.1 (Einstein's workers take one each)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + consecutive >= 65535:
            continue
        ok = True
        for port in range(base, base + consecutive):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port range")


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def load_script(filename: str, as_name: str) -> Any:
    """Import ``scripts/<filename>`` (not a package module) under the name ``as_name``, afresh."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(as_name, Path(__file__).resolve().parents[2] / "scripts" / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_unwinds() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does.

    Python's default SIGTERM ends the process without running ``finally`` blocks. A benchmark
    stopped by ``timeout`` or a cancelled CI job would then leave Ceph, tgtd, Einstein or VMs running
    (and their ports and namespaces taken). With this, its teardown runs.
    """
    signal.signal(signal.SIGTERM, _interrupt)

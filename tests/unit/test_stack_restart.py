"""`bmi-stack restart SERVICE`'s names (scripts/stack_restart.py): which daemon of which host each one
means, and that a service or host the stack does not have is refused before anything is touched."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import load_script

ROOT = Path(__file__).resolve().parents[2]
NET2 = {"hosts": {"host1": {}, "host2": {}}}


def _restart() -> Any:
    return load_script("stack_restart.py", "stack_restart_under_test")


@pytest.mark.parametrize(("service", "net", "want"), [
    ("einstein", None, ("einstein", "host1")),
    ("einstein-host1", None, ("einstein", "host1")),
    ("einstein", NET2, ("einstein", "host1")),
    ("einstein-host2", NET2, ("einstein", "host2")),
    ("tgtd", NET2, ("tgtd", "host1")),
    ("tgtd-host2", NET2, ("tgtd", "host2")),
    ("picasso", NET2, ("picasso", "host1")),
    ("hil-simulator", None, ("hil-simulator", "host1")),
])
def test_service_names(service: str, net: dict | None, want: tuple[str, str]) -> None:
    assert _restart().parse(service, net) == want


@pytest.mark.parametrize(("service", "net", "says"), [
    ("einstein-host3", NET2, "no host3"),
    ("einstein-host2", None, "no host2"),
    ("tgtd-host0", NET2, "unknown service"),
    ("tgtd-host02", NET2, "unknown service"),
    ("picasso-host2", NET2, "once per stack"),
    ("ceph", NET2, "unknown service"),
    ("einstein;rm", NET2, "unknown service"),
])
def test_unknown_services_are_refused(service: str, net: dict | None, says: str) -> None:
    module = _restart()
    with pytest.raises(module.UnknownService, match=says):
        module.parse(service, net)


def test_cli_says_there_is_no_stack_and_makes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "bmi-stack"), "restart", "tgtd-host2", "--dir", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "no stack in" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []

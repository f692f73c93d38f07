"""The real `bmi`, `rbd` and `tgtadm` commands, run with argument lists (never a shell)."""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

COMMAND_TIMEOUT = 600.0  # a provision may be slow on a real deployment; never hang forever


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        # The command line is safe to show: passwords travel in the environment, never on argv.
        return f"`{' '.join(self.argv)}` exited {self.rc}\n--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT) -> Result:
    """Run argv with os.environ (+ env overrides); never raises on a non-zero exit."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise AssertionError(f"{argv[0]} is not installed or not on PATH: {exc}") from None
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def expand(value: str) -> str:
    """A table cell like `$BMI_PROJECT`: substitute from the environment; an unset variable is a test error."""
    try:
        return Template(value).substitute(os.environ)
    except KeyError as exc:
        raise AssertionError(f"{value!r} needs {exc.args[0]} but the deployment config does not set it") from None


def expanded_rows(table: Any) -> list[dict[str, str]]:
    return [{h: expand(row[h]) for h in table.headings} for row in table]


# --- the deployment's BMI config -------------------------------------------------------------------------------
def bmi_config() -> configparser.ConfigParser:
    path = os.environ.get("BMI_CONFIG")
    if not path or not Path(path).is_file():
        raise AssertionError(f"BMI_CONFIG ({path!r}) is not a readable file: set it in the deployment config")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    return parser


def rbd_pool() -> str:
    return os.environ.get("RBD_POOL") or bmi_config().get("fs", "pool", fallback="rbd").strip() or "rbd"


def tgt_control_port() -> str | None:
    port = os.environ.get("TGT_CONTROL_PORT") or bmi_config().get("iscsi", "control_port", fallback="").strip()
    return port or None


def log_files() -> list[Path]:
    """BMI's own log (Einstein's), not the HIL simulator's: BMI_LOG_FILE, else [logs] path/{einstein,ims}.log."""
    if os.environ.get("BMI_LOG_FILE"):
        return [Path(os.environ["BMI_LOG_FILE"])]
    logs = Path(bmi_config().get("logs", "path", fallback="/var/log/bmi").strip())
    return [p for p in (logs / "einstein.log", logs / "ims.log") if p.is_file()]


def log_line_count() -> int:
    files = log_files()
    if not files:
        raise AssertionError("no BMI log file found (set BMI_LOG_FILE or [logs] path in BMI_CONFIG)")
    return sum(len(p.read_bytes().splitlines()) for p in files)


# --- bmi ---------------------------------------------------------------------------------------------------------
def bmi(*args: str, env: dict[str, str] | None = None) -> Result:
    return run(["bmi", *args], env)


def bmi_success(*args: str) -> Result:
    """A mutation: must exit 0 and print exactly `Success` (the guide's contract)."""
    result = bmi(*args)
    assert result.rc == 0 and result.stdout.strip() == "Success", f"expected exactly 'Success':\n{result.describe()}"
    return result


def db_rows() -> list[dict[str, Any]]:
    """`bmi --json db ls` with every kind of record (images, snapshots and clones)."""
    result = bmi("--json", "db", "ls")
    assert result.rc == 0, result.describe()
    rows = json.loads(result.stdout)
    assert isinstance(rows, list), f"`bmi --json db ls` did not print a list: {result.stdout!r}"
    return rows


def db_row(name: str, project: str) -> dict[str, Any] | None:
    matches = [r for r in db_rows() if r.get("name") == name and r.get("project") == project]
    assert len(matches) <= 1, f"several db records named {name} in {project}: {matches}"
    return matches[0] if matches else None


def db_table_ceph(name: str, project: str) -> str | None:
    """The Ceph column of NAME's row in the plain `bmi db ls` table (the guide's `bmi db ls | grep NAME` col 4)."""
    result = bmi("db", "ls")
    assert result.rc == 0, result.describe()
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("|")]
    assert lines, f"`bmi db ls` printed no table:\n{result.stdout}"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Id", "Name", "Project", "Ceph", "Public", "Snapshot", "Parent"], f"db ls columns: {header}"
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1] == name and cells[2] == project:
            return cells[3]
    return None


# --- rbd ---------------------------------------------------------------------------------------------------------
def rbd(*args: str) -> Result:
    return run(["rbd", "--pool", rbd_pool(), *args])


def rbd_ls() -> list[str]:
    result = rbd("ls")
    assert result.rc == 0, result.describe()
    return result.stdout.split()


def rbd_snapshots(image: str) -> list[str]:
    result = rbd("snap", "ls", "--format", "json", image)
    assert result.rc == 0, result.describe()
    return [s["name"] for s in json.loads(result.stdout or "[]")]


# --- tgt ---------------------------------------------------------------------------------------------------------
_TARGET = re.compile(r"^Target \d+: (\S+)")
_BACKING = re.compile(r"^\s*Backing store path: (\S+)")


def tgt_targets() -> dict[str, list[str]]:
    """{target iqn: [backing store paths]} from `tgtadm [-C port] --lld iscsi --op show --mode target`."""
    port = tgt_control_port()
    argv = ["tgtadm", *(["-C", port] if port else []), "--lld", "iscsi", "--op", "show", "--mode", "target"]
    result = run(argv)
    assert result.rc == 0, result.describe()
    targets: dict[str, list[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        if m := _TARGET.match(line):
            current = m.group(1)
            targets[current] = []
        elif (m := _BACKING.match(line)) and current is not None:
            targets[current].append(m.group(1))
    return targets


def targets_backed_by(ceph_name: str) -> list[str]:
    wanted = f"{rbd_pool()}/{ceph_name}"
    return [iqn for iqn, paths in tgt_targets().items() if wanted in paths]

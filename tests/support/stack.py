"""Drive a real stack started by scripts/bmi-stack (for tests that use BMI as a tenant would).

``running_stack(boot=False)`` is a context manager: it brings a stack up in a private
directory, yields a :class:`Stack`, and always brings it down, failing if any of its
processes survived.  With ``boot=True`` the stack lives in its boot network's namespace
and so do the clients the handle runs (``bmi``, ``rbd``, HIL calls).
"""
from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BMI = str(REPO / ".venv" / "bin" / "bmi")
STACK = str(REPO / "scripts" / "bmi-stack")


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export K=V`` lines of the stack's env file, on top of this process's environment."""
    env = dict(os.environ)
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


class Stack:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = read_env_file(directory / "env")
        self.url = self.env["BMI_URL"]
        netns = self.env.get("BMI_NETNS")
        self.nsx = ["ip", "netns", "exec", netns] if netns else []
        self.mode = "tftp"  # boot path of a --boot stack: "tftp" or "http"

    def bmi(self, *args: str, user: tuple[str, str] | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if user:
            env["HIL_USERNAME"], env["HIL_PASSWORD"] = user
        proc = subprocess.run([*self.nsx, BMI, *args], capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"bmi {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def rbd(self, *args: str) -> str:
        return subprocess.run([*self.nsx, "rbd", *args], capture_output=True, text=True, env=self.env, check=True,
                              timeout=300).stdout

    def hil_post(self, path: str, body: dict) -> int:
        """POST to HIL with the tenant's credentials (from the stack's namespace); returns the status code."""
        code = ("import sys, requests\n"
                "r = requests.post(sys.argv[1], data=sys.argv[2], auth=(sys.argv[3], sys.argv[4]), timeout=60)\n"
                "print(r.status_code)\n")
        out = subprocess.run([*self.nsx, sys.executable, "-c", code, self.env["HIL_ENDPOINT"] + path,
                              json.dumps(body), self.env["HIL_USERNAME"], self.env["HIL_PASSWORD"]],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return int(out.strip())

    def restart(self, service: str) -> None:
        """``scripts/bmi-stack restart SERVICE`` (einstein, picasso, hil-simulator): back once it answers."""
        proc = subprocess.run([STACK, "restart", service, "--dir", str(self.dir)], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"bmi-stack restart {service} failed: {proc.stderr[-3000:]}")

    def tgtadm(self, *args: str) -> str:
        """Run tgtadm against the stack's real tgtd."""
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(self.env["BMI_CONFIG"])
        return subprocess.run(["tgtadm", "-C", cfg.get("iscsi", "control_port"), "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=True).stdout

    def targets(self) -> list[str]:
        """Targets as the stack's real tgtd reports them."""
        return re.findall(r"^Target \d+: (\S+)$", self.tgtadm("--op", "show", "--mode", "target"), re.MULTILINE)

    def tid_of(self, name_suffix: str) -> str:
        """The tid of the live target whose IQN ends with ``name_suffix``."""
        out = self.tgtadm("--op", "show", "--mode", "target")
        return next(m.group(1) for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.MULTILINE)
                    if m.group(2).endswith(name_suffix))


@contextlib.contextmanager
def running_stack(boot: bool = False, http_boot: bool = False, workers: int = 2,
                  nodes: int = 0, hosts: int = 1) -> Iterator[Stack]:
    """``nodes``: at least that many HIL nodes in bmi_infra (extra ones are node-01, ...)."""
    directory = Path(tempfile.mkdtemp(prefix="bmi-boot-stack-" if boot else "bmi-stack-test-"))
    argv = [STACK, "up", "--dir", str(directory), "--workers", str(workers), "--nodes", str(nodes)] + \
        (["--boot"] if boot else []) + (["--http-boot"] if http_boot else []) + \
        (["--hosts", str(hosts)] if hosts > 1 else [])
    up = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    try:
        if up.returncode != 0:
            pytest.fail(f"scripts/bmi-stack up failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
        yield Stack(directory)
    finally:
        subprocess.run([STACK, "down", "--dir", str(directory)], capture_output=True, timeout=300, check=False)
        left = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True,
                              check=False).stdout
        assert left.strip() == "", f"processes of the stack survived `down`: {left}"

"""The guide's acceptance tests (acceptance-tests/bmi-uat.py) against a real throwaway stack (scripts/bmi-stack)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "bmi-stack"
UAT = REPO / "acceptance-tests" / "bmi-uat.py"
PY = REPO / ".venv" / "bin" / "python"


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _stack_pids(stack_dir: Path) -> dict[int, str]:
    """Every pid file the stack wrote (its own, Ceph's, tgtd's) -> the process's start time, to spot pid reuse."""
    pids: dict[int, str] = {}
    for pid_file in stack_dir.rglob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            pids[pid] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _survivors(pids: dict[int, str]) -> list[int]:
    alive = []
    for pid, started in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and fields[19] == started:
            alive.append(pid)
    return alive


def _uat(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run([str(PY), str(UAT), *args], env, timeout=900)


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_acceptance_tests_pass_against_the_local_stack() -> None:
    # A short path under /tmp: Ceph's unix sockets live inside the stack dir (108-byte limit).
    stack_dir = Path(tempfile.mkdtemp(prefix="uat-"))
    results = Path(tempfile.mkdtemp(prefix="uat-results-"))
    env = dict(os.environ, BMI_STACK_DIR=str(stack_dir), BMI_UAT_RESULTS_DIR=str(results))
    pids: dict[int, str] = {}
    try:
        up = _run([str(STACK), "up", "--dir", str(stack_dir)], env, timeout=300)
        pids = _stack_pids(stack_dir)
        assert up.returncode == 0, f"bmi-stack up failed:\n{up.stdout}\n{up.stderr}"
        assert (stack_dir / "env").is_file(), "bmi-stack up wrote no env file"

        full = _uat(["--run", "local-stack"], env)
        out = full.stdout + full.stderr
        assert full.returncode == 0, out
        assert "3 features passed, 0 failed, 0 skipped" in full.stdout, out
        assert "scenarios passed, 0 failed, 0 skipped" in full.stdout, out
        assert ", 0 failed, 0 skipped, 0 undefined" in full.stdout, out
        assert "Completion of Acceptance Tests!" in full.stdout, out
        assert "=== BMI passed the acceptance criteria! ===" in full.stdout, out

        randomized = _uat(["--run", "local-stack", "--randomize", "2"], env)
        out = randomized.stdout + randomized.stderr
        assert randomized.returncode == 0, out
        assert randomized.stdout.count("1 scenario passed, 0 failed, 0 skipped") == 2, out
        assert randomized.stdout.count("12 steps passed, 0 failed, 0 skipped, 0 undefined") == 2, out
        assert "=== BMI passed the acceptance criteria! ===" in randomized.stdout, out

        runs = sorted(p.name for p in results.iterdir())
        assert len(runs) == 3 and all(r.endswith("-local-stack-PASS") for r in runs), runs
        assert all(any((results / r / "junit").glob("TESTS-*.xml")) for r in runs), runs

        check = _uat(["check"], env)
        assert check.returncode == 0 and check.stdout.strip() == "All tests passed!", check.stdout + check.stderr
    finally:
        pids.update(_stack_pids(stack_dir))
        down = _run([str(STACK), "down", "--dir", str(stack_dir)], env, timeout=300)
        shutil.rmtree(results, ignore_errors=True)
        shutil.rmtree(stack_dir, ignore_errors=True)
        shutil.rmtree(stack_dir.parent / (stack_dir.name + ".last-logs"), ignore_errors=True)
    assert down.returncode == 0, f"bmi-stack down failed:\n{down.stdout}\n{down.stderr}"
    assert pids, "found no pid files in the stack dir"
    survivors = _survivors(pids)
    assert not survivors, f"processes of the stack survived `bmi-stack down`: {survivors}"


def test_config_files_are_parsed_without_a_shell(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(REPO / "acceptance-tests"))
    from uatlib.envfile import EnvFileError, load_config

    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "env").write_text("export BMI_CONFIG=/s/bmi.cfg\nexport HIL_USERNAME=haas\nexport PATH=/venv/bin:$PATH\n")
    config = tmp_path / "config"
    config.write_text("# a comment\nexport BMI_STACK_ENV=auto\nexport HIL_USERNAME=other\n"
                      "export LITERAL='$HOME x'\nexport QUOTED=\"${BMI_CONFIG}.bak\"\nexport UNSET=$NOPE\n")
    env = load_config(config, REPO, {"PATH": "/usr/bin", "BMI_STACK_DIR": str(stack)})
    assert env["BMI_CONFIG"] == "/s/bmi.cfg"
    assert env["PATH"] == "/venv/bin:/usr/bin"
    assert env["HIL_USERNAME"] == "other"  # a later line overrides the stack's env
    assert env["LITERAL"] == "$HOME x"
    assert env["QUOTED"] == "/s/bmi.cfg.bak"
    assert env["UNSET"] == ""

    config.write_text("export BMI_STACK_ENV=auto\n")
    with pytest.raises(EnvFileError, match="is the stack up"):
        load_config(config, REPO, {"BMI_STACK_DIR": str(tmp_path / "missing")})
    config.write_text("rm -rf /\n")
    with pytest.raises(EnvFileError, match="config:1"):
        load_config(config, REPO, {})

#!/usr/bin/env python3
"""BMI user acceptance tests (the user's guide, appendix A).

    ./bmi-uat.py ls                          list the deployments in config/tests-uat/
    ./bmi-uat.py --run NAME                  run every feature against deployment NAME
    ./bmi-uat.py --run NAME --randomize N    run the end-to-end scenario N times with randomized names
    ./bmi-uat.py check                       did every recorded run pass?
    ./bmi-uat.py clean                       remove the recorded results

Results go to acceptance-tests/test-results/<timestamp>-<NAME>-PASS|FAIL/ (BMI_UAT_RESULTS_DIR overrides):
junit XML in junit/, behave's plain output in behave-output.txt, a rollback.log if a scenario had to be undone.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from uatlib.envfile import EnvFileError, load_config

CONFIGS = REPO / "config" / "tests-uat"
FEATURES = HERE / "features"
END_TO_END = FEATURES / "end-to-end-acceptance-test.feature"
_SUMMARY = re.compile(r"^\d+ (features?|scenarios?|steps?) passed, |^Took ")


def results_dir() -> Path:
    return Path(os.environ.get("BMI_UAT_RESULTS_DIR") or HERE / "test-results")


def behave_argv() -> list[str]:
    # The repo's venv has behave; a bare `python3` may not.
    venv = REPO / ".venv" / "bin" / "python"
    return [str(venv) if venv.exists() else sys.executable, "-m", "behave"]


def configurations() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "config").is_file()) if CONFIGS.is_dir() else []


def cmd_ls() -> int:
    print("The available configurations are:")
    print()
    for name in configurations():
        print(name)
    return 0


def new_run_dir(name: str) -> Path:
    base = results_dir()
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (f"{stamp}-{name}-RUNNING" if n == 0 else f"{stamp}.{n}-{name}-RUNNING")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError("cannot create a results directory")


def run_behave(name: str, env: dict[str, str], paths: list[Path], label: str) -> tuple[bool, list[str]]:
    """One behave run into its own results dir; returns (passed, summary lines)."""
    run_dir = new_run_dir(name)
    env = dict(env, UAT_RUN_DIR=str(run_dir))
    argv = [*behave_argv(), "--format", "plain", "--junit", "--junit-directory", str(run_dir / "junit"),
            "--no-color", *map(str, paths)]
    print(f"--- {label}: behave {' '.join(p.name for p in paths)} (results: {run_dir.parent})", flush=True)
    with open(run_dir / "behave-output.txt", "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(HERE))
        assert proc.stdout is not None
        summary = []
        for line in proc.stdout:
            out.write(line)
            if _SUMMARY.match(line):
                summary.append(line.rstrip("\n"))
            else:
                print(line, end="", flush=True)
        rc = proc.wait()
    passed = rc == 0 and bool(summary)
    final = run_dir.with_name(run_dir.name.replace("-RUNNING", "-PASS" if passed else "-FAIL"))
    run_dir.rename(final)
    return passed, summary


def cmd_run(name: str, randomize: int | None) -> int:
    config = CONFIGS / name / "config"
    if not config.is_file():
        print(f"No configuration named {name!r}; see `{Path(sys.argv[0]).name} ls`.", file=sys.stderr)
        return 2
    try:
        env = load_config(config, REPO)
    except (EnvFileError, OSError) as exc:
        print(f"Cannot load {config}: {exc}", file=sys.stderr)
        return 2
    print(f"Running the acceptance tests of {name} ({env.get('BMI_RELEASE_NAME', 'unnamed release')})", flush=True)
    started = time.monotonic()
    outcomes: list[tuple[bool, list[str]]] = []
    if randomize is None:
        outcomes.append(run_behave(name, env, [FEATURES], "all features"))
    else:
        for i in range(1, randomize + 1):
            # Fresh names each time, so one run's leftovers cannot make the next pass or fail.
            suffix = secrets.token_hex(3)
            run_env = dict(env, BMI_IMAGE_NAME=f"{env['BMI_IMAGE_NAME']}-{suffix}",
                           BMI_SNAPSHOT_NAME=f"{env['BMI_SNAPSHOT_NAME']}-{suffix}")
            outcomes.append(run_behave(name, run_env, [END_TO_END], f"randomized run {i}/{randomize} "
                                       f"(image {run_env['BMI_IMAGE_NAME']})"))
    print()
    for _, summary in outcomes:
        for line in summary:
            print(line)
    if not any(summary for _, summary in outcomes):
        print("behave printed no summary (did it start? see behave-output.txt)")
    print(f"Took {time.monotonic() - started:.1f}s in total")
    print()
    print("-----")
    print("Completion of Acceptance Tests!")
    print("-----")
    print()
    if all(ok for ok, _ in outcomes):
        print("=== BMI passed the acceptance criteria! ===")
        return 0
    print("=== BMI FAILED the acceptance criteria! See the -FAIL directories in "
          f"{results_dir()} ===")
    return 1


def cmd_check() -> int:
    base = results_dir()
    runs = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    failed = [r for r in runs if r.endswith(("-FAIL", "-RUNNING"))]
    if not runs:
        print("No test results found; run the tests first.")
        return 1
    if failed:
        for r in failed:
            print(f"FAILED: {r}")
        print("Some tests failed, please fix accordingly!")
        return 1
    print("All tests passed!")
    return 0


def cmd_clean() -> int:
    shutil.rmtree(results_dir(), ignore_errors=True)
    print(f"Removed {results_dir()}")
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["ls", "check", "clean"])
    parser.add_argument("--run", metavar="NAME", help="the configuration (config/tests-uat/NAME/config) to test")
    parser.add_argument("--randomize", metavar="N", type=positive,
                        help="run the end-to-end scenario N times with randomized image/snapshot names")
    args = parser.parse_args()
    if args.command and args.run:
        parser.error("give either a command or --run, not both")
    if args.randomize is not None and not args.run:
        parser.error("--randomize needs --run NAME")
    if args.run:
        return cmd_run(args.run, args.randomize)
    if args.command == "ls":
        return cmd_ls()
    if args.command == "check":
        return cmd_check()
    if args.command == "clean":
        return cmd_clean()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

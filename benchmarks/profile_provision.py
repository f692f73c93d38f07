#!/usr/bin/env python3
"""Where a provision's time goes: py-spy on the Einstein workers while /v1 provisions and
deprovisions run one at a time (the method behind docs/performance.md's "what was cut").

    .venv/bin/python benchmarks/profile_provision.py [RUNS]

Brings up the same throwaway stack as `make bench` (HIL simulator with no action delay), records
``py-spy record --idle --format raw`` of every Einstein process for RUNS provision/deprovision
pairs and prints the top frames by time (own and cumulative).  PROFILE_KEEP=1 leaves the stack
up; PROFILE_DIR (default <repo>/run/profile) is the stack's directory.

PROFILE_BATCH=N profiles one batch of N nodes (POST /v1/provisions, as `make bench` does) instead:
on-CPU samples only (no --idle) of every thread, to see what the Einstein worker running the batch
spends its CPU on (the batch is bound by that one process's CPU on a small machine).
py-spy counts a thread blocked in some calls (a socket read, a lock) as active; PROFILE_GIL=1
keeps only samples of threads holding the GIL, i.e. the Python CPU itself.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402

from tests.support.procs import sigterm_unwinds  # noqa: E402


def einstein_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"{REPO}/scripts/einstein_server"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", type=int, default=30, help="provision/deprovision pairs (default 30)")
    runs = parser.parse_args().runs
    sigterm_unwinds()  # a SIGTERM still brings the stack down
    d = Path(os.environ.get("PROFILE_DIR", str(REPO / "run" / "profile")))
    env = bench.start_stack(d, 1)
    try:
        user = bench.Rest(env["BMI_URL"], bench.TENANT)
        node, nic = bench.nodes_of(d)[0]
        ops = bench.Operations.from_config(bench.config.parse(env["BMI_CONFIG"],
                                                              Path(env["BMI_CONFIG"]).read_text()))
        ops.storage.create_image("prof-golden", 1 << 30)
        ops.close()
        user.do("POST", f"/projects/{bench.PROJECT}/images", {"name": "prof-golden"})
        time.sleep(3)  # its background flatten
        prov = {"image": "prof-golden", "network": bench.NETWORK, "nic": nic}
        dep = {"network": bench.NETWORK, "nic": nic}
        for _ in range(3):  # warm up
            user.do("POST", f"/projects/{bench.PROJECT}/nodes/{node}/provision", prov)
            user.do("POST", f"/projects/{bench.PROJECT}/nodes/{node}/deprovision", dep)
        batch = int(os.environ.get("PROFILE_BATCH", "0"))
        idle = [] if batch else ["--idle"]
        if os.environ.get("PROFILE_GIL") == "1":
            idle = ["--gil"]  # only samples of threads holding the GIL: the Python CPU itself
        spy = [str(REPO / ".venv/bin/py-spy"), "record", *idle, "--subprocesses", "--format", "raw", "-r", "200"]
        procs = [subprocess.Popen([*spy, "-p", str(pid), "-o", str(d / f"spy-{pid}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in einstein_pids()]
        time.sleep(1)
        tp, td = [], []
        if batch:
            items = [{"node": n, "image": "prof-golden", "network": bench.NETWORK, "nic": c}
                     for n, c in bench.nodes_of(d)[:batch]]
            t0 = time.perf_counter()
            recs = user.submit("POST", "/provisions", {"project": bench.PROJECT, "nodes": items})
            for r in recs:
                user.wait_op(int(r["id"]))
            tp.append(time.perf_counter() - t0)
            runs = 0
        for _ in range(runs):
            tp.append(bench.timed(lambda: user.do("POST", f"/projects/{bench.PROJECT}/nodes/{node}/provision",
                                                  prov)))
            td.append(bench.timed(lambda: user.do("POST", f"/projects/{bench.PROJECT}/nodes/{node}/deprovision",
                                                  dep)))
        for p in procs:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        if batch:
            print(f"batch of {batch}: {tp[0]:.2f} s")
        else:
            print(f"provision p50 {bench.statistics.median(tp) * 1000:.0f} ms, "
                  f"deprovision p50 {bench.statistics.median(td) * 1000:.0f} ms")
        report(sorted(d.glob("spy-*.txt")), "" if batch else "Tasks._run (")
    finally:
        if os.environ.get("PROFILE_KEEP") != "1":
            bench.bmi_stack.down(d)
    return 0


def report(files: list[Path], root: str) -> None:
    """Top frames under ``root`` (default: ``Tasks._run``, the operation threads; "" = every
    thread): own and cumulative samples."""
    own: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for f in files:
        for line in f.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if root not in stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if root:
                frames = frames[next(i for i, f in enumerate(frames) if f.startswith(root)):]
            total += n
            if frames:
                own[frames[-1]] += n
            for fr in set(frames):
                cum[fr] += n
    print(f"samples{' under ' + root if root else ''}: {total}")
    print("-- cumulative --")
    for fr, n in cum.most_common(45):
        print(f"{n * 100 / max(total, 1):5.1f}%  {fr}")
    print("-- own --")
    for fr, n in own.most_common(20):
        print(f"{n * 100 / max(total, 1):5.1f}%  {fr}")


if __name__ == "__main__":
    sys.exit(main())

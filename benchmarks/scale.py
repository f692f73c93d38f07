#!/usr/bin/env python3
"""Several hosts under load: provision N nodes over H hosts, optionally SIGKILLing one host mid-run.

Starts a throwaway Ceph cluster, the HIL simulator with N nodes and H BMI hosts on this machine
(tests/support/multihost.py: each host an Einstein supervisor with its own tgtd on 127.0.0.<i>,
one shared SQLite database), imports a golden image, then submits the N provisions through host
1's RPC name server (as Picasso does) in batches of ``--batch`` asynchronous operations and waits
for them.  With ``--kill-host`` the LAST host's Einstein and tgtd are SIGKILLed once half the
batches are submitted.

A provision whose operation failed with 409/503 (the host died under it, a node busy while its
dead owner's work is finished, a gateway not yet taken over) is submitted again: such retried
calls are counted apart (``retried``); ``errors`` counts calls that failed for good (any other
error, or a node still not provisioned after ``--retry-seconds``).  At the end:

  provisioned  nodes with a provision record
  lost         provisioned nodes whose target is not live on ANY running gateway
  takeover_s   from the kill to every node of the killed host exported by a survivor (0 without kill)

Per-host counts are printed, then as the LAST line exactly:
  scale: hosts H nodes N provisioned P errors E lost L takeover_s T

With ``--netns`` the hosts are ``scripts/bmi-stack up --hosts H`` instead: each host in its own
network namespace with its own address (Einstein and tgtd there), PostgreSQL as the database, the
stack's heartbeat settings (1 s, dead after 6 s); the run itself executes inside the stack's shared
namespace (benchmarks/stack_cluster.py) and the stack is brought down at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlalchemy import select  # noqa: E402

from ims.common.errors import BMIError  # noqa: E402
from ims.database import make_engine, make_session_factory  # noqa: E402
from ims.database.models import Host, Provision  # noqa: E402
from tests.support.ceph import purge_images, start_cluster, stop_cluster  # noqa: E402
from tests.support.hil import start_hil_simulator  # noqa: E402
from tests.support.multihost import NET, NIC, PROJECT, UID, Cluster, inventory  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_STACK = "BMI_SCALE_STACK_DIR"  # set when this process runs inside a --netns stack's namespace

USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
GOLDEN = "scale-golden"
RETRYABLE = (409, 503)


class Run:
    def __init__(self, cluster: Any, nodes: list[str], retry_seconds: float) -> None:
        self.c = cluster
        self.nodes = nodes
        self.retry_seconds = retry_seconds
        self.uid = getattr(cluster, "uid", UID)
        db_url = getattr(cluster, "db_url", None) or f"sqlite:///{cluster.db_path}"
        self.sessions = make_session_factory(make_engine(db_url))
        self.retried = 0
        self.errors: dict[str, str] = {}

    def provisioned(self) -> dict[str, tuple[str | None, int]]:
        with self.sessions() as s:
            return {p.node: (p.gateway, p.image_id) for p in s.scalars(select(Provision))}

    def submit(self, batch: list[str]) -> list[tuple[str, int | None]]:
        """Submit one batch; nodes whose submit itself failed come back with id None."""
        items = [{"project": PROJECT, "node": n, "img": GOLDEN, "network": NET, "nic": NIC} for n in batch]
        try:
            records = self.c.client(0).submit_batch(USER, "provision", items)
            return [(n, r["id"]) for n, r in zip(batch, records, strict=True)]
        except BMIError as exc:
            if exc.status not in RETRYABLE:
                for n in batch:
                    self.errors[n] = f"submit: {exc}"
            self.retried += 1
            return [(n, None) for n in batch]

    def wait(self, op_id: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_seconds
        while time.monotonic() < deadline:
            try:
                record = self.c.client(0).operation_wait(USER, op_id, 20.0)
            except BMIError as exc:
                if exc.status not in RETRYABLE:
                    raise
                time.sleep(0.5)
                continue
            if record["state"] in ("done", "failed"):
                return record
        return {"state": "failed", "error": {"type": "Timeout", "message": f"operation {op_id} never ended"}}

    def settle(self, submitted: list[tuple[str, int | None]]) -> list[str]:
        """Wait for a batch's operations; the nodes to try again."""
        again = []
        for node, op_id in submitted:
            if node in self.errors:
                continue
            if op_id is None:
                again.append(node)
                continue
            record = self.wait(op_id)
            if record["state"] == "done":
                continue
            error = record.get("error") or {}
            if error.get("status") in RETRYABLE:
                self.retried += 1
                again.append(node)
            elif error.get("type") == "NodeAlreadyProvisioned":
                continue  # an earlier attempt made it
            else:
                self.errors[node] = f"{error.get('type')}: {error.get('message')}"
        return again

    def retry_until_done(self, nodes: list[str], batch: int) -> None:
        deadline = time.monotonic() + self.retry_seconds
        while nodes and time.monotonic() < deadline:
            have = self.provisioned()
            nodes = [n for n in nodes if n not in have and n not in self.errors]
            if not nodes:
                return
            time.sleep(1.0)
            left = []
            for i in range(0, len(nodes), batch):
                left += self.settle(self.submit(nodes[i:i + batch]))
            nodes = left
        for node in nodes:
            if node not in self.provisioned():
                self.errors.setdefault(node, "still not provisioned after the retries")


def watch_takeover(run: Run, victim: str, killed_at: float, out: dict[str, float]) -> None:
    """takeover_s: until the victim is taken over and none of its nodes is left unexported."""
    while time.monotonic() - killed_at < 600:
        with run.sessions() as s:
            host = s.get(Host, victim)
            left = s.scalars(select(Provision.node).where(Provision.gateway == victim)).all()
        if host is not None and host.state == "dead" and not left and not missing_targets(run):
            out["takeover_s"] = time.monotonic() - killed_at
            return
        time.sleep(0.2)


def live_iqns(run: Run) -> dict[str, set[str]]:
    return {h.name: set(run.c.live_iqns(h.index)) for h in run.c.hosts}


def missing_targets(run: Run) -> list[str]:
    """Provisioned nodes whose target is live on no gateway."""
    live = set().union(*live_iqns(run).values())
    return sorted(node for node, (_g, image_id) in run.provisioned().items()
                  if f"iqn.2017-10.org.moc.bmi:{run.uid}img{image_id}" not in live)


def measure(args: argparse.Namespace, cluster: Any, nodes: list[str]) -> int:
    """Provision ``nodes`` in batches (killing the last host mid-run with --kill-host); print the counts."""
    result: dict[str, float] = {}
    run = Run(cluster, nodes, args.retry_seconds)
    started = time.monotonic()
    batches = [nodes[i:i + args.batch] for i in range(0, len(nodes), args.batch)]
    again: list[str] = []
    pending: list[list[tuple[str, int | None]]] = []
    victim = cluster.hosts[-1]
    watcher = None
    for index, batch in enumerate(batches):
        pending.append(run.submit(batch))
        if args.kill_host and index == len(batches) // 2:
            before = {}
            for _node, (gateway, _i) in run.provisioned().items():
                before[gateway] = before.get(gateway, 0) + 1
            print(f"killing {victim.name} (Einstein and tgtd); gateways so far: {before}", flush=True)
            killed_at = time.monotonic()
            cluster.kill(victim.index)
            watcher = threading.Thread(target=watch_takeover, args=(run, victim.name, killed_at, result))
            watcher.start()
        if len(pending) >= 2:  # keep two batches in flight
            again += run.settle(pending.pop(0))
    for submitted in pending:
        again += run.settle(submitted)
    run.retry_until_done(again, args.batch)
    if watcher is not None:
        watcher.join()
    elapsed = time.monotonic() - started
    final = run.provisioned()
    per_host: dict[str, int] = {}
    for gateway, _i in final.values():
        per_host[str(gateway)] = per_host.get(str(gateway), 0) + 1
    lost = missing_targets(run)
    for host in cluster.hosts:
        state = "killed" if args.kill_host and host is victim else "up"
        print(f"host {host.name} ({state}): {per_host.get(host.name, 0)} node(s) exported, "
              f"{len(cluster.live_iqns(host.index))} live target(s)")
    print(f"elapsed {elapsed:.1f} s; retried calls {run.retried}; failed for good {len(run.errors)}")
    for node, why in sorted(run.errors.items())[:10]:
        print(f"  error {node}: {why}")
    for node in lost[:10]:
        print(f"  lost {node}")
    print(f"scale: hosts {args.hosts} nodes {args.nodes} provisioned {len(final)} errors {len(run.errors)} "
          f"lost {len(lost)} takeover_s {result.get('takeover_s', 0.0):.1f}", flush=True)
    return 0 if len(final) == args.nodes and not run.errors and not lost else 1


def run_netns_stack(args: argparse.Namespace) -> int:
    """Bring up `bmi-stack --hosts H`, run this script again inside its shared namespace, bring it down."""
    base = Path(tempfile.mkdtemp(prefix="bmi-scale-netns-"))
    stack = str(REPO / "scripts" / "bmi-stack")
    up = subprocess.run([stack, "up", "--dir", str(base), "--hosts", str(args.hosts), "--workers",
                         str(args.workers), "--nodes", str(args.nodes + 3)],  # + bmi_node, cisco-01, cisco-02
                        stdout=subprocess.DEVNULL, check=False)
    try:
        if up.returncode != 0:
            print(f"bmi-stack up failed (logs: {base}.last-logs)", file=sys.stderr)
            return 1
        netns = next(line.split("=", 1)[1] for line in (base / "env").read_text().splitlines()
                     if line.startswith("export BMI_NETNS="))
        inner = subprocess.run(["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__),
                                *sys.argv[1:]], env=dict(os.environ, **{IN_STACK: str(base)}), check=False)
        return inner.returncode
    finally:
        subprocess.run([stack, "down", "--dir", str(base)], stdout=subprocess.DEVNULL, check=False)


def run_in_stack(args: argparse.Namespace, d: Path) -> int:
    from stack_cluster import StackCluster  # benchmarks/, this script's directory

    cluster = StackCluster(d)
    env = dict(os.environ, CEPH_CONF=str(d / "ceph" / "ceph.conf"))
    subprocess.run(["rbd", "create", "--size", "64", GOLDEN], env=env, check=True)
    try:
        cluster.client(0).import_image(USER, PROJECT, GOLDEN)
        return measure(args, cluster, [f"node-{i:02d}" for i in range(1, args.nodes + 1)])
    finally:
        cluster.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--kill-host", action="store_true")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="Einstein workers per host")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--dead-after", type=float, default=6.0)
    parser.add_argument("--retry-seconds", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--netns", action="store_true",
                        help="hosts in network namespaces with PostgreSQL: scripts/bmi-stack up --hosts H")
    args = parser.parse_args()
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still runs the teardown
    if args.hosts < 1 or args.nodes < 1 or (args.kill_host and args.hosts < 2):
        parser.error("--hosts >= 1 (>= 2 with --kill-host) and --nodes >= 1")
    if args.netns and args.hosts < 2:
        parser.error("--netns needs --hosts >= 2")
    if os.environ.get(IN_STACK):
        return run_in_stack(args, Path(os.environ[IN_STACK]))
    if args.netns:
        return run_netns_stack(args)
    base = Path(tempfile.mkdtemp(prefix="bmi-scale-"))
    nodes = [f"node{i:04d}" for i in range(args.nodes)]
    ceph = start_cluster(str(base))
    hil = start_hil_simulator(inventory(nodes), base / "hil", action_delay=0.0)
    cluster = Cluster(base, args.hosts, ceph, hil.url, workers=args.workers, heartbeat=args.heartbeat,
                      dead_after=args.dead_after, service_user=("haasadmin", "admin1234"))
    storage = ceph.storage()
    try:
        storage.create_image(GOLDEN, 64 << 20)
        storage.write(GOLDEN, 0, b"scale" * 1000 + b"\0" * (4096 * 2 - 5000))
        cluster.start_all()
        cluster.client(0).create_project(ADMIN, PROJECT, NET)
        cluster.client(0).import_image(USER, PROJECT, GOLDEN)
        return measure(args, cluster, nodes)
    finally:
        cluster.stop_all()
        hil.stop()
        try:
            purge_images(storage, UID + "img")
        except BMIError:
            pass  # a killed tgtd's watch lingers; the cluster goes away below anyway
        storage.close()
        stop_cluster(ceph)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

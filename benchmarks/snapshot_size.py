#!/usr/bin/env python3
"""Snapshot and import time against the data written: BMI's background flatten vs a synchronous one.

Starts a throwaway bluestore Ceph cluster, a private tgtd and the HIL simulator (no action
delay). For each size N in --written-gib:

  snap create   a node provisioned from a small golden image, with N GiB written into its clone:
                ``Operations.create_snapshot`` as BMI does it now (a clone; a worker thread
                flattens it in the background) and with the copy flattened inside the operation
                (``[bmi] flatten_sync_max_bytes`` set above the image size: the old behaviour)
  import        a source image with N GiB written: ``Operations.import_image``, both ways

Each sample's image is removed before the next one (a pending flatten is cancelled).  Prints
the p50 of each; no thresholds.  The cluster's bluestore file is 10 GiB (scripts/ceph-dev), so
keep N at 3 or below.  Usage: benchmarks/snapshot_size.py [--written-gib 1 3] [--runs 5] [--sync-runs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ims.common import config  # noqa: E402
from ims.einstein import flatten  # noqa: E402
from ims.einstein.operations import Operations  # noqa: E402
from tests.support.ceph import start_cluster, stop_cluster  # noqa: E402
from tests.support.hil import example_inventory, start_hil_simulator  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402
from tests.support.tgt import start_tgtd, stop_tgtd  # noqa: E402

USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}
GiB = 1 << 30
CHUNK = 64 << 20


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fill(st, image: str, size: int) -> None:
    chunk = os.urandom(8 << 20) * (CHUNK // (8 << 20))
    for off in range(0, size, CHUNK):
        st.write(image, off, chunk[:min(CHUNK, size - off)])


def config_text(base: str, cluster, tgtd, hil, extra: str = "") -> str:
    return f"""
[bmi]
uid = 77
admin_users = haasadmin
{extra}
[db]
path = {base}/bmi.db
[fs]
pool = {cluster.pool}
conf_file = {cluster.conf}
keyring = {cluster.keyring}
[iscsi]
ip = {tgtd.portal_ip}
port = {tgtd.portal_port}
conf_dir = {tgtd.new_conf_dir()}
control_port = {tgtd.control_port}
[net_isolator]
url = {hil.url}
[tftp]
pxelinux_path = {base}/tftp/pxelinux.cfg
ipxe_path = {base}/tftp
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--written-gib", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--runs", type=int, default=5, help="samples of BMI's (background) path")
    parser.add_argument("--sync-runs", type=int, default=3, help="samples of the synchronous flatten")
    args = parser.parse_args()
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still runs the teardown
    base = tempfile.mkdtemp(prefix="bmi-bench-snap-")
    with mock.patch.dict(os.environ, {"CEPH_OBJECTSTORE": "bluestore"}):
        cluster = start_cluster(base)
    tgtd = start_tgtd(os.path.join(base, "tgtd"))
    hil = start_hil_simulator(example_inventory(), os.path.join(base, "hil"), action_delay=0.0)
    stop = threading.Event()
    rows: list[tuple[float, str, str, float, int]] = []
    try:
        os.makedirs(f"{base}/tftp/pxelinux.cfg")
        ops = Operations.from_config(config.parse("bench", config_text(base, cluster, tgtd, hil)))
        # Same database and cluster, like a second worker, but copies are flattened inside the operation.
        sync = Operations.from_config(config.parse("bench-sync", config_text(
            base, cluster, tgtd, hil, "flatten_sync_max_bytes = 1e18")))
        flatten.start(ops.core, stop)  # what every Einstein worker runs
        st = ops.storage
        ops.create_project(ADMIN, "bmi_infra")
        n = 0
        for gib in args.written_gib:
            size = int(gib * GiB)
            st.create_image("tiny", size)  # sparse: imported (and flattened) at once
            ops.import_image(USER, "bmi_infra", "tiny")
            ops.provision(USER, "bmi_infra", "bmi_node", "tiny", "bmi_network", "bmi_port")
            fill(st, node_image(ops), size)
            for label, which, runs in (("BMI (background flatten)", ops, args.runs),
                                       ("synchronous flatten", sync, args.sync_runs)):
                samples = []
                for _ in range(runs):
                    n += 1
                    samples.append(timed(lambda w=which, k=n: w.create_snapshot(USER, "bmi_infra", "bmi_node",
                                                                                f"s{k}")))
                    ops.remove_image(USER, "bmi_infra", f"s{n}")
                rows.append((gib, "snap create", label, p50_ms(samples), runs))
            ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
            ops.remove_image(USER, "bmi_infra", "tiny")
            st.remove_image("tiny")

            st.create_image("source", size)
            fill(st, "source", size)
            for label, which, runs in (("BMI (background flatten)", ops, args.runs),
                                       ("synchronous flatten", sync, args.sync_runs)):
                samples = []
                for _ in range(runs):
                    samples.append(timed(lambda w=which: w.import_image(USER, "bmi_infra", "source")))
                    ops.remove_image(USER, "bmi_infra", "source")
                rows.append((gib, "import", label, p50_ms(samples), runs))
            st.remove_image("source")

        print("snapshot / import time vs data written (bluestore Ceph, private tgtd, HIL simulator, "
              "no action delay)")
        print(f"{'written':>8}  {'operation':<12}{'path':<26}{'p50 ms':>10}{'runs':>6}")
        for gib, op, label, ms, runs in rows:
            print(f"{gib:>6.1f}Gi  {op:<12}{label:<26}{ms:>10.1f}{runs:>6}")
        stop.set()
        sync.close()
        ops.close()
    finally:
        stop.set()
        hil.stop()
        stop_tgtd(tgtd)
        stop_cluster(cluster)
    return 0


def node_image(ops: Operations) -> str:
    from sqlalchemy import select

    from ims.database.models import Image

    with ops.journal.session() as s:
        row = s.scalars(select(Image).where(Image.name == "bmi_node")).one()
        return ops.ceph_name(row.id)


if __name__ == "__main__":
    sys.exit(main())

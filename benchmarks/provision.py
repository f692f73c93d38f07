#!/usr/bin/env python3
"""How much does BMI add on top of the storage and target operations it must do?

Starts a throwaway Ceph cluster, a private tgtd and the HIL simulator, then measures
(median of N runs, printed; no thresholds):

  floor      raw librbd clone of a protected snapshot + tgtadm target add (+ remove both)
  provision  Operations.provision: journal, locks, DB rows, clone, target, boot files, HIL attach
  deprovision, snapshot (clone + flatten + snapshot + protect), copy (the import workflow on a BMI image)

and prints each as a ratio against the floor.  Usage: benchmarks/provision.py [--runs N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ims.common import config  # noqa: E402
from ims.einstein.operations import Operations  # noqa: E402
from tests.support.ceph import start_cluster, stop_cluster  # noqa: E402
from tests.support.hil import example_inventory, start_hil_simulator  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402
from tests.support.tgt import start_tgtd, stop_tgtd  # noqa: E402

USER = {"username": "haas", "password": "secret"}
ADMIN = {"username": "haasadmin", "password": "admin1234"}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=1024, help="golden image size (sparse)")
    args = parser.parse_args()
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still runs the teardown
    base = tempfile.mkdtemp(prefix="bmi-bench-")
    cluster = start_cluster(base)
    tgtd = start_tgtd(os.path.join(base, "tgtd"))
    hil = start_hil_simulator(example_inventory(), os.path.join(base, "hil"), action_delay=0.0)
    try:
        os.makedirs(f"{base}/tftp/pxelinux.cfg")
        cfg = config.parse("bench", f"""
[bmi]
uid = 77
admin_users = haasadmin
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
""")
        ops = Operations.from_config(cfg)
        st, tgt = ops.storage, ops.iscsi
        ops.create_project(ADMIN, "bmi_infra")
        st.create_image("golden", args.size_mib << 20)
        st.write("golden", 0, os.urandom(8 << 20))
        ops.import_image(USER, "bmi_infra", "golden")
        golden_copy = ops.ceph_name(1)

        floor, prov, deprov, snap = [], [], [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            st.clone(golden_copy, "snapshot", f"raw{i}")
            tgt.add_target(f"raw{i}", st.backing(f"raw{i}"), initiator_names=["iqn.2017-10.org.bench:n"])
            floor.append(time.perf_counter() - t0)
            tgt.remove_target(f"raw{i}")
            st.remove_image(f"raw{i}")

            t0 = time.perf_counter()
            ops.provision(USER, "bmi_infra", "bmi_node", "golden", "bmi_network", "bmi_port")
            prov.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ops.create_snapshot(USER, "bmi_infra", "bmi_node", f"snap{i}")
            snap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ops.deprovision(USER, "bmi_infra", "bmi_node", "bmi_network", "bmi_port")
            deprov.append(time.perf_counter() - t0)
            ops.remove_image(USER, "bmi_infra", f"snap{i}")

        imports = []
        for i in range(max(3, args.runs // 3)):
            t0 = time.perf_counter()
            ops.copy_image(USER, "bmi_infra", "golden", "bmi_infra", f"copy{i}")
            imports.append(time.perf_counter() - t0)
            ops.remove_image(USER, "bmi_infra", f"copy{i}")

        f = median_ms(floor)
        print(f"BMI provisioning overhead, {args.runs} runs, {args.size_mib} MiB sparse golden image "
              f"(memstore Ceph, private tgtd, HIL simulator without action delay)")
        print(f"{'operation':<28}{'median ms':>12}{'x floor':>10}")
        print(f"{'floor: rbd clone + target':<28}{f:>12.1f}{1.0:>10.2f}")
        for label, samples in (("provision", prov), ("deprovision", deprov), ("snapshot (clone+flatten)", snap),
                               ("copy (clone+flatten+snap)", imports)):
            m = median_ms(samples)
            print(f"{label:<28}{m:>12.1f}{m / f:>10.2f}")
        ops.remove_image(USER, "bmi_infra", "golden")
        st.remove_image("golden")
        ops.close()
    finally:
        hil.stop()
        stop_tgtd(tgtd)
        stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())

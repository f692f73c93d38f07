#!/usr/bin/env python3
"""What happens when two tgt gateways export ONE RBD image?  (evidence for docs/deployment.md "Multipath")

Starts a throwaway Ceph cluster (scripts/ceph-dev) and two private tgtd daemons (scripts/tgtd-dev,
"gateway A" and "gateway B", each its own control port and portal), clones an image the way BMI
does, exports the SAME clone through both gateways with tgt's rbd backing store (Debian tgt-rbd,
``bstype rbd``, exactly the LUN settings BMI uses: write cache off), and drives both through
libiscsi as two initiators would.  It prints one ``finding:`` line per question:

  watchers     ``rbd status``: does each gateway keep the image open (a watcher each)?
  locks        ``rbd lock ls`` with and without the exclusive-lock feature: does tgt take the lock,
               and does it move ("ping-pong") when writes alternate between the gateways?
  coherence    write through A, read through B (after B read the same blocks first): fresh or stale?
               With the librbd cache as Ceph's default (``writearound``) and as ``writeback``.
  concurrent   both gateways write (disjoint blocks) at once: is every acknowledged write in the image?
  crash        SIGKILL gateway A right after acknowledged writes: are they in Ceph (read with librbd)?
  remove       can the image be removed while the other gateway still exports it?
  late-write   A hangs with a write in flight, the node writes through B, A wakes: with and without fencing
  failover     how long multipath.fail_over (fence A's client, export on B) takes per node

No thresholds: it reports what it saw.  Usage: benchmarks/multipath_probe.py [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ims.common.errors import BMIError, CommandFailed  # noqa: E402
from ims.common.process import execute  # noqa: E402
from ims.einstein import multipath  # noqa: E402
from ims.einstein.iscsi.tgt import TgtTarget  # noqa: E402
from ims.einstein.storage.base import Backing  # noqa: E402
from tests.support.ceph import CephCluster, start_cluster, stop_cluster  # noqa: E402
from tests.support.iscsi_rw import _Session, parse_address  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402
from tests.support.tgt import TgtdInstance, start_tgtd, stop_tgtd  # noqa: E402

MiB = 1024 * 1024
BLOCK = 512
PREFIX = "iqn.2026-01.org.bmi.probe:"
INIT_A = "iqn.2026-01.org.bmi.probe:initiator-a"
INIT_B = "iqn.2026-01.org.bmi.probe:initiator-b"
FEATURES_PLAIN = "layering"                    # what scripts/ceph-dev and BMI's clones use
FEATURES_LOCK = "layering,exclusive-lock"      # what `rbd create` uses by default elsewhere
# The SCSI caching mode page with WCE set (ims.einstein.iscsi.tgt.WRITE_CACHE_OFF with 0x10 -> 0x14).
WRITE_CACHE_ON = "mode_page=8:0:18:0x14:0:0xff:0xff:0:0:0xff:0xff:0xff:0xff:0x80:0x14:0:0:0:0:0:0"


def finding(name: str, text: str) -> None:
    print(f"finding: {name}: {text}", flush=True)


def pattern(tag: str, nblocks: int = 8) -> bytes:
    """``nblocks`` blocks that say who wrote them and when (never all zero)."""
    line = f"{tag} {time.monotonic_ns()} ".encode()
    return (line * (nblocks * BLOCK // len(line) + 1))[: nblocks * BLOCK]


class Gateway:
    """One tgtd exporting images through BMI's own tgt driver (write cache off, like a provision)."""

    def __init__(self, name: str, instance: TgtdInstance, cluster: CephCluster, conf: str) -> None:
        self.name, self.instance, self.cluster, self.conf = name, instance, cluster, conf
        self.driver = TgtTarget(instance.conf_dir, control_port=instance.control_port, iqn_prefix=PREFIX)

    def export(self, image: str) -> str:
        backing = Backing("rbd", f"{self.cluster.pool}/{image}", f"conf={self.conf};id={self.cluster.client_id}")
        self.driver.add_target(image, backing, ["ALL"])
        return self.instance.url(self.driver.iqn(image))

    def unexport(self, image: str) -> None:
        self.driver.remove_target(image)

    def session(self, image: str, initiator: str) -> _Session:
        return _Session(parse_address(self.instance.url(self.driver.iqn(image))), initiator)


def rbd_json(cluster: CephCluster, *args: str) -> object:
    return json.loads(cluster.rbd(*args, "--format", "json") or "null")


def watchers(cluster: CephCluster, image: str) -> list[str]:
    status = rbd_json(cluster, "status", f"{cluster.pool}/{image}")
    return [w["address"] for w in status.get("watchers", [])] if isinstance(status, dict) else []


def lockers(cluster: CephCluster, image: str) -> list[str]:
    locks = rbd_json(cluster, "lock", "ls", f"{cluster.pool}/{image}")
    if isinstance(locks, dict):  # older rbd: {lock id: {...}}
        return sorted(v.get("locker", "?") for v in locks.values())
    return sorted(entry.get("locker", "?") for entry in locks or [])


def make_clone(cluster: CephCluster, name: str, features: str, size_mib: int = 64) -> str:
    """golden image + protected snapshot + clone, as BMI provisions (features as given)."""
    golden, clone = f"{name}-golden", f"{name}-clone"
    spec = f"{cluster.pool}/{golden}"
    cluster.rbd("create", "--size", f"{size_mib}M", "--image-feature", features, spec)
    storage = cluster.storage()
    storage.write(golden, 0, pattern("golden", 64))
    cluster.rbd("snap", "create", f"{spec}@snap")
    cluster.rbd("snap", "protect", f"{spec}@snap")
    cluster.rbd("clone", "--image-feature", features, f"{spec}@snap", f"{cluster.pool}/{clone}")
    return clone


def client_of(address_list_before: list[str], address_list_after: list[str]) -> str:
    new = sorted(set(address_list_after) - set(address_list_before))
    return new[0] if new else "?"


# --- the probes -------------------------------------------------------------------------------
def probe_watchers_and_locks(cluster: CephCluster, a: Gateway, b: Gateway, features: str, rounds: int) -> None:
    clone = make_clone(cluster, f"lk-{features.replace(',', '-')}", features)
    tag = "exclusive-lock" if "exclusive-lock" in features else "layering only"
    a.export(clone)
    w_a = watchers(cluster, clone)
    b.export(clone)
    w_ab = watchers(cluster, clone)
    addr_b = client_of(w_a, w_ab)
    finding("watchers", f"[{tag}] after export on A: {len(w_a)} watcher(s); after export on B too: "
            f"{len(w_ab)} watcher(s) -> each tgtd keeps its own librbd handle open (rbd status)")
    sa, sb = a.session(clone, INIT_A), b.session(clone, INIT_B)
    try:
        finding("locks", f"[{tag}] exported on both, no I/O yet: lockers {lockers(cluster, clone) or 'none'}")
        owners: list[str] = []
        times = {"A": 0.0, "B": 0.0, "alternating": 0.0}
        for i in range(rounds):  # same gateway only: the baseline
            t0 = time.monotonic()
            sa.write(16 + i % 8 * 8, pattern(f"A{i}"), BLOCK)
            times["A"] += time.monotonic() - t0
        owner_after_a = lockers(cluster, clone)
        for i in range(rounds):  # alternate A, B, A, B on the same blocks
            gw, s = ("A", sa) if i % 2 == 0 else ("B", sb)
            t0 = time.monotonic()
            s.write(16, pattern(f"{gw}{i}"), BLOCK)
            times["alternating"] += time.monotonic() - t0
            owners.append(",".join(lockers(cluster, clone)) or "none")
        moves = sum(1 for x, y in zip(owners, owners[1:], strict=False) if x != y)
        finding("locks", f"[{tag}] after {rounds} writes via A: lockers {owner_after_a or 'none'}; "
                f"{rounds} alternating A/B writes: lock owner changed {moves} times "
                f"(distinct owners seen: {len(set(owners))})")
        finding("locks", f"[{tag}] mean write latency: A only {times['A'] / rounds * 1000:.1f} ms, "
                f"alternating A/B {times['alternating'] / rounds * 1000:.1f} ms")
        last = pattern("final")
        sb.write(16, last, BLOCK)
        direct = cluster.storage().read(clone, 16 * BLOCK, len(last))
        finding("locks", f"[{tag}] last write (via B) is what Ceph holds: {direct == last}; B's client {addr_b}")
    finally:
        sa.close()
        sb.close()
        a.unexport(clone)
        b.unexport(clone)


def probe_coherence(cluster: CephCluster, a: Gateway, b: Gateway, features: str, policy: str) -> bool:
    """B reads blocks, A overwrites them, B reads again: returns True if B saw A's write."""
    clone = make_clone(cluster, f"co-{policy.split()[0]}-{features.replace(',', '-')}", features)
    a.export(clone)
    b.export(clone)
    sa, sb = a.session(clone, INIT_A), b.session(clone, INIT_B)
    try:
        lba = 64
        before = sb.read(lba, 8, BLOCK)            # B's cache (if any) now holds these blocks
        before_again = sb.read(lba, 8, BLOCK)
        new = pattern("written-through-A")
        sa.write(lba, new, BLOCK)
        direct = cluster.storage().read(clone, lba * BLOCK, len(new))
        seen_by_b = sb.read(lba, 8, BLOCK)
        fresh = seen_by_b == new
        seen = "the NEW data" if fresh else "STALE data" if seen_by_b == before else "other data"
        finding("coherence", f"[{policy} cache, {features}] write via A is in Ceph at once: {direct == new}; "
                f"B's read after it returns {seen}"
                f" (B read the blocks twice before: same both times {before == before_again})")
        return fresh
    finally:
        sa.close()
        sb.close()
        a.unexport(clone)
        b.unexport(clone)


def probe_concurrent(cluster: CephCluster, a: Gateway, b: Gateway, features: str, writes: int) -> None:
    clone = make_clone(cluster, f"cc-{features.replace(',', '-')}", features)
    a.export(clone)
    b.export(clone)
    acked: dict[int, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def writer(gw: Gateway, tag: str, first_lba: int) -> None:
        s = gw.session(clone, INIT_A if tag == "A" else INIT_B)
        try:
            for i in range(writes):
                lba = first_lba + 2 * 8 * i      # A and B interleave 8-block extents, never overlap
                data = pattern(f"{tag}{i}")
                s.write(lba, data, BLOCK)
                with lock:
                    acked[lba] = data
        except Exception as exc:  # reported, not raised: the probe prints what happened
            errors.append(f"{tag}: {exc}")
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(a, "A", 1024)),
               threading.Thread(target=writer, args=(b, "B", 1024 + 8))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    a.unexport(clone)
    b.unexport(clone)
    storage = cluster.storage()
    lost = [lba for lba, data in acked.items() if storage.read(clone, lba * BLOCK, len(data)) != data]
    finding("concurrent", f"[{features}] {len(acked)} acknowledged 4 KiB writes from both gateways at once "
            f"({elapsed * 1000:.0f} ms): {len(lost)} missing or wrong in Ceph; errors: {errors or 'none'}")


def write_no_fua(s: _Session, lba: int, data: bytes) -> None:
    """WRITE16 without FUA, as an OS initiator writes (tests.support.iscsi_rw sets FUA on every write)."""
    task = s.lib.iscsi_write16_sync(s.ctx, s.addr.lun, lba, data, len(data), BLOCK, 0, 0, 0, 0, 0)
    s._check(task, "WRITE16")


def probe_crash(cluster: CephCluster, gw: Gateway, policy: str, writes: int, write_cache: bool = False) -> None:
    """Acknowledged writes through ``gw``, then SIGKILL its tgtd: what does Ceph hold?

    ``write_cache=True`` is the control experiment: the LUN's caching mode page with WCE set (tgt's
    default; BMI clears it), so tgt acknowledges writes without ``rbd_flush``."""
    clone = make_clone(cluster, f"cr-{policy}-{'wce' if write_cache else 'nowce'}", FEATURES_PLAIN)
    gw.export(clone)
    if write_cache:
        live = gw.driver.live_target(clone)
        assert live is not None
        execute("tgtadm", "-C", str(gw.instance.control_port), "--lld", "iscsi", "--op", "update",
                "--mode", "logicalunit", "--tid", str(live.tid), "--lun", "1", "--params",
                WRITE_CACHE_ON, timeout=30)
    s = gw.session(clone, INIT_A)
    acked = {}
    for i in range(writes):
        data = pattern(f"crash{i}")
        write_no_fua(s, 2048 + 8 * i, data)
        acked[2048 + 8 * i] = data
    os.kill(gw.instance.pid, signal.SIGKILL)  # no logout, no close: librbd gets no chance to flush
    while gw.instance.alive():
        time.sleep(0.05)
    storage = cluster.storage()
    lost = sum(1 for lba, data in acked.items() if storage.read(clone, lba * BLOCK, len(data)) != data)
    why = ("the LUN's write cache ON (tgt's default): tgt skips rbd_flush" if write_cache else
           "the LUN's write cache OFF, as BMI sets it: tgt calls rbd_flush after each write")
    finding("crash", f"[{policy} cache, {why}] {writes} acknowledged writes (no FUA) via {gw.name}, "
            f"then SIGKILL of its tgtd: {lost} of them missing in Ceph")
    s.lib.iscsi_destroy_context(s.ctx)  # the session's peer is gone: no logout


def probe_remove(cluster: CephCluster, a: Gateway, b: Gateway) -> None:
    clone = make_clone(cluster, "rm", FEATURES_PLAIN)
    a.export(clone)
    b.export(clone)
    a.unexport(clone)
    try:
        cluster.rbd("rm", f"{cluster.pool}/{clone}", timeout=60)
        outcome = "removed (!)"
    except CommandFailed as exc:
        outcome = f"refused ({exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else exc})"
    finding("remove", f"image unexported on A but still exported on B: `rbd rm` {outcome} -> every gateway "
            "exporting an image must drop it before deprovision can delete the clone")
    b.unexport(clone)


def probe_late_write(cluster: CephCluster, a: Gateway, b: Gateway, fence: bool) -> None:
    """Gateway A hangs (SIGSTOP) holding a write; the node goes on through B; then A wakes up.

    Without fencing, A's old write lands after B's newer one.  With ``ceph osd blocklist`` of A's
    librados client (what a take-over can do before making B live), A's late write fails instead.
    """
    clone = make_clone(cluster, f"lw-{'fenced' if fence else 'open'}", FEATURES_PLAIN)
    before = watchers(cluster, clone)
    a.export(clone)
    addr_a = client_of(before, watchers(cluster, clone))
    b.export(clone)
    lba, old, new = 4096, pattern("late-write-from-A"), pattern("newer-write-via-B")
    sa = a.session(clone, INIT_A)
    result: list[str] = []

    def write_a() -> None:
        try:
            sa.write(lba, old, BLOCK)
            result.append("acknowledged")
        except Exception as exc:  # reported below
            result.append(f"failed: {str(exc)[:80]}")

    os.kill(a.instance.pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=write_a)
        thread.start()
        time.sleep(0.5)                      # the write now sits in stopped A's socket
        sb = b.session(clone, INIT_B)
        sb.write(lba, new, BLOCK)
        sb.close()
        if fence:
            execute("ceph", "osd", "blocklist", "add", addr_a, timeout=60, env=cluster.env)
    finally:
        os.kill(a.instance.pid, signal.SIGCONT)  # never leave a stopped tgtd behind (stop would hang)
    thread.join(60)
    final = cluster.storage().read(clone, lba * BLOCK, len(new))
    holds = ("B's NEWER data" if final == new else
             "A's OLDER data (the newer write is lost)" if final == old else "other data")
    finding("late-write", f"[{'A blocklisted before it wakes' if fence else 'no fencing'}] A's delayed write "
            f"{result[0] if result else 'still pending'}; Ceph holds {holds}")
    try:
        sa.close()
    except Exception:  # a fenced gateway may drop the session
        pass
    if fence:
        execute("ceph", "osd", "blocklist", "rm", addr_a, timeout=60, env=cluster.env)
    for gw in (a, b):
        try:
            gw.unexport(clone)
        except BMIError as exc:
            finding("late-write", f"unexport on {gw.name} failed: {exc}")


def probe_failover_time(cluster: CephCluster, a: Gateway, b: Gateway, runs: int) -> None:
    """How long BMI's take-over step for one node takes: multipath.fail_over (fence A's client, export on B)."""
    samples = []
    for i in range(runs):
        clone = make_clone(cluster, f"fo{i}", FEATURES_PLAIN)
        a.export(clone)
        t0 = time.monotonic()
        fenced = multipath.fail_over(cluster.storage(), clone, b.driver, clone, ["ALL"])
        samples.append(time.monotonic() - t0)
        assert len(fenced) == 1, fenced
        a.unexport(clone)
        b.unexport(clone)
    samples.sort()
    finding("failover", f"multipath.fail_over (fence + export on B), {runs} nodes one by one: median "
            f"{samples[len(samples) // 2] * 1000:.0f} ms, max {samples[-1] * 1000:.0f} ms")


def writeback_conf(cluster: CephCluster, directory: str) -> str:
    path = os.path.join(directory, "ceph-writeback.conf")
    text = open(cluster.conf, encoding="utf-8").read()
    text += ("\n[client.admin]\nrbd cache = true\nrbd cache policy = writeback\n"
             "rbd cache writethrough until flush = false\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="writes per lock/latency probe")
    args = parser.parse_args()
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still runs the teardown
    base = tempfile.mkdtemp(prefix="bmi-mpath-probe-")
    cluster = start_cluster(base)
    started: list[TgtdInstance] = []
    try:
        ta = start_tgtd(os.path.join(base, "gw-a"))
        started.append(ta)
        tb = start_tgtd(os.path.join(base, "gw-b"))
        started.append(tb)
        wb = writeback_conf(cluster, base)
        print(f"probe: Ceph {cluster.conf}; gateway A {ta.portal} (pid {ta.pid}); gateway B {tb.portal} "
              f"(pid {tb.pid})", flush=True)
        a, b = Gateway("A", ta, cluster, cluster.conf), Gateway("B", tb, cluster, cluster.conf)
        probe_watchers_and_locks(cluster, a, b, FEATURES_PLAIN, args.rounds)
        probe_watchers_and_locks(cluster, a, b, FEATURES_LOCK, args.rounds)
        stale = []
        for features in (FEATURES_PLAIN, FEATURES_LOCK):
            if not probe_coherence(cluster, a, b, features, "default (writearound)"):
                stale.append(f"default/{features}")
            a_wb, b_wb = Gateway("A", ta, cluster, wb), Gateway("B", tb, cluster, wb)
            if not probe_coherence(cluster, a_wb, b_wb, features, "writeback"):
                stale.append(f"writeback/{features}")
        probe_concurrent(cluster, a, b, FEATURES_PLAIN, args.rounds * 2)
        probe_concurrent(cluster, a, b, FEATURES_LOCK, args.rounds * 2)
        probe_remove(cluster, a, b)
        probe_late_write(cluster, a, b, fence=False)
        probe_late_write(cluster, a, b, fence=True)
        probe_failover_time(cluster, a, b, 5)
        probe_crash(cluster, Gateway("B", tb, cluster, wb), "writeback", args.rounds, write_cache=True)
        probe_crash(cluster, Gateway("A", ta, cluster, wb), "writeback", args.rounds)
        finding("summary", f"stale reads through the second gateway in: {', '.join(stale) or 'none'}")
    except BMIError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for instance in started:
            try:
                stop_tgtd(instance)  # also cleans up after the crash probe's SIGKILL
            except RuntimeError as exc:
                print(f"probe: {exc}", file=sys.stderr)
        stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`make bench`: BMI through its REST API against the bare work on the same Ceph, in one run.

Brings up a throwaway stack (scripts/bmi-stack up --nodes 100, bluestore Ceph, HIL simulator
with no action delay), then measures and prints a table (operation, p50, p95, x floor):

  floor provision     bare librbd clone of the golden snapshot + the tgtadm calls that make the same
                      target (new target, LUN, write cache off + block size, bind address, bind initiator
                      name; with [iscsi] chap, the default, its CHAP account made and bound, as BMI's
                      target has) + two boot files written
  floor deprovision   tgtadm delete (by the tid it made; and the CHAP account) + librbd remove + the two
                      boot files removed
  floor ... (tgtd socket)  the same floors with each tgtadm request written to tgtd's control socket, as
                      BMI sends them ([iscsi] control = socket): the floor without a process per call
  provision /v1       POST .../provision (202) -> operation done: what a user waits for
  deprovision /v1     likewise
  provision legacy    PUT /provision/ (synchronous ``Success``); DELETE /deprovision/ likewise
  snapshot at N GiB   POST .../snapshots -> done, node with N GiB written (BMI: clone, flattened later);
                      and the same copy flattened synchronously (the old behaviour) for comparison
  import at N GiB     POST .../images of an rbd image with N GiB written -> done
  batch of 100        POST /v1/provisions {project, nodes} with 100 nodes -> all done (x floor = / 100 floor p50)
  50 concurrent       50 legacy PUT /provision/ at once: all must answer Success
  ..., 60,000 kept    provision/deprovision /v1 again once the database holds 60,000 finished
                      operations and tasks (a month of a busy rack): the same floor, the same ratio

and writes docs/performance.md with the table and two PNG plots (latency vs concurrency; snapshot
time vs written GiB, BMI vs synchronous flatten).  No thresholds: numbers, not a test.

Environment: BENCH_RUNS (default 20), BENCH_WRITTEN_GIB (default "1 20": ~60 GiB written in all; a size
whose data cannot fit on the disk is lowered to the largest that fits, and the table says so),
BENCH_STACK_DIR (default <repo>/run/bench), BENCH_KEEP=1 leaves the stack up, BENCH_PARTS (default
"rest conc batch snap history"; docs/performance.md is only written when all run; e.g. BENCH_PARTS="rest batch"
for the provision/deprovision rows and the batch alone, ~3 min), BENCH_SCHEDULER (e.g.
"max_per_gateway=16 max_per_cluster=32": [scheduler] bounds other than the defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import rbd
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bmi_stack  # noqa: E402
from bench_report import report  # noqa: E402

from ims.common import config  # noqa: E402
from ims.common.process import execute  # noqa: E402
from ims.einstein.iscsi.tgt import WRITE_CACHE_OFF  # noqa: E402
from ims.einstein.iscsi.tgt_conf import LUN_LBPPBE, NO_ADDRESS  # noqa: E402
from ims.einstein.iscsi.tgt_ipc import TgtIpc  # noqa: E402
from ims.einstein.operations import Operations  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402

GiB = 1 << 30
CHUNK = 64 << 20
PROJECT = "bmi_infra"
NETWORK = "bmi_network"
TENANT = ("haas", "secret")
ADMIN = ("haasadmin", "admin1234")
CONCURRENCY = (1, 5, 10, 25, 50)
# Idle before each measured single operation (rest and history rows): see settled().
GAP_S = float(os.environ.get("BENCH_GAP_S", "0.2"))


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Rest:
    """One keep-alive HTTP session, like a script or the CLI would use."""

    def __init__(self, url: str, auth: tuple[str, str]) -> None:
        self.url = url
        self.s = requests.Session()
        self.s.auth = auth

    def wait_op(self, op_id: int) -> dict[str, Any]:
        while True:
            r = self.s.get(f"{self.url}/v1/operations/{op_id}", params={"wait": 30}, timeout=60)
            r.raise_for_status()
            rec = r.json()["result"]
            if rec["state"] == "done":
                return rec
            if rec["state"] == "failed":
                raise RuntimeError(f"operation {op_id} failed: {rec.get('error')}")

    def submit(self, method: str, path: str, body: dict[str, Any], prefer_wait: float | None = None) -> Any:
        headers = {"Prefer": f"wait={prefer_wait:g}"} if prefer_wait is not None else None
        r = self.s.request(method, f"{self.url}/v1{path}", json=body, timeout=60, headers=headers)
        if r.status_code != 202:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()["result"]

    def do(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Submit and wait, as the CLI does: the time a user waits for a /v1 mutation (the POST asks
        to be answered once the operation has finished, for at most 1 s: ``Prefer: wait=1``)."""
        rec = self.submit(method, path, body, prefer_wait=1)
        if rec["state"] == "done":
            return dict(rec)
        return self.wait_op(int(rec["id"]))

    def legacy(self, method: str, path: str, form: dict[str, str]) -> None:
        r = self.s.request(method, f"{self.url}{path}", data=form, timeout=600)
        if r.status_code != 200 or r.text != "Success":
            raise RuntimeError(f"legacy {method} {path}: {r.status_code} {r.text[:300]}")


def settled(fn: Callable[[], object]) -> float:
    """:func:`timed`, after ``BENCH_GAP_S`` (0.2 s) of idle: one at a time, each measured operation (the
    floor's and BMI's alike) starts on a stack that has finished the work of the one before, e.g. the
    OSD deleting the objects of the image the previous deprovision removed."""
    time.sleep(GAP_S)
    return timed(fn)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fill(st: Any, image: str, size: int) -> None:
    chunk = os.urandom(8 << 20) * (CHUNK // (8 << 20))
    for off in range(0, size, CHUNK):
        st.write(image, off, chunk[:min(CHUNK, size - off)])


def start_stack(d: Path, max_gib: float) -> dict[str, str]:
    # The HIL simulator with no action delay: what is measured is BMI, not a simulated switch.
    orig = bmi_stack.service_argv

    def argv(name: str, dd: Path, cfg: Path | None = None, **kwargs: Any) -> list[str]:
        out = orig(name, dd, cfg=cfg, **kwargs)  # hil_port, hil_ip, ...
        return [*out, "--action-delay", "0"] if name == "hil-simulator" else out

    bmi_stack.service_argv = argv
    # BENCH_SCHEDULER="max_per_gateway=16 max_per_cluster=32": other [scheduler] bounds, to tune them.
    sched = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_SCHEDULER", "").split())
    if sched:
        orig_write = bmi_stack.write_config

        def write_config(*args: Any, **kwargs: Any) -> Path:
            path = orig_write(*args, **kwargs)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n[scheduler]\n" + "".join(f"{k} = {v}\n" for k, v in sched.items()))
            return path

        bmi_stack.write_config = write_config
    os.environ["CEPH_OBJECTSTORE"] = "bluestore"
    # Room for the node's written data, the source image and their copies (sparse file).
    # (scripts/ceph-dev CEPH_BLUESTORE_GIB sizes it; the file only takes the space written to it)
    os.environ.setdefault("CEPH_BLUESTORE_GIB", str(max(10, int(max_gib * 3) + 10)))
    bmi_stack.down(d)
    bmi_stack.up(d, False, workers=2, nodes=100)
    return bmi_stack.read_env(d / "env")


def stack_cpu(d: Path, tgt_port: int) -> dict[str, float]:
    """CPU seconds so far of the stack's processes by kind (Einstein's include its tgtadm children)."""
    hz = os.sysconf("SC_CLK_TCK")
    procs: dict[str, tuple[str, list[str]]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                procs[pid] = (cmd, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())
            except OSError:
                continue
    ours = {p for p, (cmd, _) in procs.items() if str(d) in cmd or f"-C {tgt_port} " in cmd}
    ours |= {p for p, (_, st) in procs.items() if st[1] in ours}  # Einstein's worker processes
    out: dict[str, float] = {}
    for pid in ours:
        cmd, st = procs[pid]
        kind = next((k for k, m in (("Picasso", "picasso"), ("HIL simulator", "hil-simulator"),
                                    ("HIL simulator", "hilsim"), ("ceph-osd", "ceph-osd"),
                                    ("ceph-mon", "ceph-mon"), ("tgtd", "tgtd ")) if m in cmd), "Einstein")
        mine = (int(st[11]) + int(st[12])) / hz
        children = (int(st[13]) + int(st[14])) / hz
        out[kind] = out.get(kind, 0.0) + mine + (children if kind == "Einstein" else 0.0)
    return out


def nodes_of(d: Path) -> list[tuple[str, str]]:
    inv = json.loads((d / "hil-inventory.json").read_text())
    return [(n["name"], n["nics"][0]["label"]) for n in inv["nodes"] if n["project"] == PROJECT]


ALL_PARTS = ("rest", "conc", "batch", "snap", "history")


def fitting_sizes(sizes: list[float], d: Path) -> tuple[list[float], str]:
    """``sizes`` with any that cannot fit on the disk lowered to the largest that fits (and why).

    At size G the run holds at most ~2 G written at once (the node's data and the synchronous
    flatten's copy, or the import source and its background copy) in bluestore's sparse file,
    which never shrinks: room for 2 G + 8 GiB is asked for.
    """
    d.mkdir(parents=True, exist_ok=True)
    free_gib = shutil.disk_usage(d).free / GiB
    fit = max(1.0, (free_gib - 8) / 2)
    out, note = [], ""
    for g in sizes:
        if g > fit:
            note = (f"{g:g} GiB written did not fit on this disk ({free_gib:.0f} GiB free): measured at "
                    f"{int(fit):d} GiB instead, the largest that fits.")
            g = float(int(fit))
        out.append(g)
    return sorted(set(out)), note


def main() -> int:
    # No options: the environment variables above. --help prints this module's text.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sigterm_unwinds()  # a SIGTERM (timeout, a cancelled job) still brings the stack down
    runs = int(os.environ.get("BENCH_RUNS", "20"))
    parts = tuple(os.environ.get("BENCH_PARTS", " ".join(ALL_PARTS)).split())
    d = Path(os.environ.get("BENCH_STACK_DIR", str(REPO / "run" / "bench")))
    sizes, size_note = fitting_sizes([float(x) for x in os.environ.get("BENCH_WRITTEN_GIB", "1 20").split()], d)
    if size_note:
        log(size_note)
    t_start = time.monotonic()
    env = start_stack(d, max(sizes) if "snap" in parts else 1)
    try:
        results = measure(d, env, runs, sizes, parts)
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            bmi_stack.down(d)
    results["wall_s"] = time.monotonic() - t_start
    results["size_note"] = size_note
    report(results, write_docs=set(ALL_PARTS) <= set(parts))
    return 0


def measure(d: Path, env: dict[str, str], runs: int, sizes: list[float], parts: tuple[str, ...]) -> dict[str, Any]:
    cfg_path = env["BMI_CONFIG"]
    cfg = config.parse(cfg_path, Path(cfg_path).read_text())
    ops = Operations.from_config(cfg)  # the same Ceph, tgtd and tftp root, for the floor and for data
    st = ops.storage
    url = env["BMI_URL"]
    user = Rest(url, TENANT)
    nodes = nodes_of(d)
    node, nic = nodes[0]
    rows: dict[str, list[float]] = {}
    res: dict[str, Any] = {"rows": rows, "runs": runs}

    log("golden image: 1 GiB sparse with 8 MiB written, imported")
    st.create_image("bench-golden", GiB)
    st.write("bench-golden", 0, os.urandom(8 << 20))
    user.do("POST", f"/projects/{PROJECT}/images", {"name": "bench-golden"})
    golden_ceph = ceph_of(ops, "bench-golden")
    snap = cfg.bmi.snapshot
    deadline = time.monotonic() + 120
    # its background flatten takes its snapshot, then protects it (a format-1 clone needs that: the
    # floor's first clone failed with EINVAL once, between the two)
    while snap not in st.list_snapshots(golden_ceph) or not st.is_protected(golden_ceph, snap):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{golden_ceph}@{snap} did not appear protected (background flatten)")
        time.sleep(0.2)
    tftp = Path(cfg.tftp.pxelinux_path)

    log(f"floor and REST provision/deprovision, {runs} runs each, interleaved")
    for k in ("floor provision", "floor deprovision", "floor provision (tgtd socket)",
              "floor deprovision (tgtd socket)", "provision /v1", "deprovision /v1", "provision legacy",
              "deprovision legacy"):
        rows[k] = []
    iqn_init = "iqn.2017-10.org.bench:n"
    ioctx = st._ioctx()  # the floor: bare librbd and tgtadm calls, no checks

    ipc = TgtIpc(int(cfg.iscsi.control_port))

    def tgtadm_cli(*args: str) -> None:
        execute("tgtadm", "-C", str(cfg.iscsi.control_port), "--lld", "iscsi", *args, timeout=30)

    def tgtadm_socket(*args: str) -> None:  # the same requests, written to tgtd's socket as BMI does
        ipc.run("--lld", "iscsi", *args)
    for i in range((runs if "rest" in parts else 0) * 2):
        raw = f"bench-raw{i}"
        tid = str(900000 + i)  # far above BMI's tid counter
        via_socket = i % 2 == 1  # the floor with the tgtadm binary (the floor), then through the socket
        tgtadm = tgtadm_socket if via_socket else tgtadm_cli

        def floor_up(raw: str = raw, tid: str = tid, tgtadm: Callable[..., None] = tgtadm) -> None:
            rbd.RBD().clone(ioctx, golden_ceph, snap, ioctx, raw, features=1)
            tgtadm("--op", "new", "--mode", "target", "--tid", tid, "-T", f"iqn.2017-10.org.bench:{raw}")
            b = st.backing(raw)
            tgtadm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "--bstype", b.bstype,
                   "--backing-store", b.path, "--bsopts", b.bsopts)
            tgtadm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "--params",
                   f"{WRITE_CACHE_OFF},lbppbe={LUN_LBPPBE}")
            tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-I", NO_ADDRESS)
            tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-Q", iqn_init)
            if cfg.iscsi.chap:  # BMI's target has its own CHAP account: the same target has it too
                tgtadm("--op", "new", "--mode", "account", "--user", raw, "--password", "BenchFloorSecret0")
                tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", raw)
            (tftp / f"{raw}.pxe").write_text("boot file\n")
            (tftp.parent / f"{raw}.ipxe").write_text("#!ipxe\n")

        def floor_down(raw: str = raw, tid: str = tid, tgtadm: Callable[..., None] = tgtadm) -> None:
            tgtadm("--op", "delete", "--mode", "target", "--tid", tid, "--force")
            if cfg.iscsi.chap:
                tgtadm("--op", "delete", "--mode", "account", "--user", raw)
            rbd.RBD().remove(ioctx, raw)
            (tftp / f"{raw}.pxe").unlink()
            (tftp.parent / f"{raw}.ipxe").unlink()

        suffix = " (tgtd socket)" if via_socket else ""
        rows["floor provision" + suffix].append(settled(floor_up))
        rows["floor deprovision" + suffix].append(settled(floor_down))
        if via_socket:
            continue
        prov = {"image": "bench-golden", "network": NETWORK, "nic": nic}
        rows["provision /v1"].append(settled(lambda b=prov: user.do(
            "POST", f"/projects/{PROJECT}/nodes/{node}/provision", b)))
        rows["deprovision /v1"].append(settled(lambda: user.do(
            "POST", f"/projects/{PROJECT}/nodes/{node}/deprovision", {"network": NETWORK, "nic": nic})))
        form = {"project": PROJECT, "node": node, "img": "bench-golden", "network": NETWORK, "nic": nic}
        rows["provision legacy"].append(settled(lambda f=form: user.legacy("PUT", "/provision/", f)))
        dform = {"project": PROJECT, "node": node, "network": NETWORK, "nic": nic}
        rows["deprovision legacy"].append(settled(lambda f=dform: user.legacy("DELETE", "/deprovision/", f)))

    if "history" in parts:
        # Right after the plain rows, in the same conditions (before the batch's and the snapshots' load on
        # Ceph); it leaves HISTORY_ROWS finished operations and tasks in the database for the parts after it.
        log(f"provision/deprovision /v1 with {HISTORY_ROWS:,} finished operations and tasks kept")
        add_history(cfg.db.path, HISTORY_ROWS)
        kept = f"{HISTORY_ROWS:,} operations kept"
        rows[f"provision /v1, {kept}"], rows[f"deprovision /v1, {kept}"] = [], []
        for _ in range(runs):
            rows[f"provision /v1, {kept}"].append(settled(lambda: user.do(
                "POST", f"/projects/{PROJECT}/nodes/{node}/provision",
                {"image": "bench-golden", "network": NETWORK, "nic": nic})))
            rows[f"deprovision /v1, {kept}"].append(settled(lambda: user.do(
                "POST", f"/projects/{PROJECT}/nodes/{node}/deprovision", {"network": NETWORK, "nic": nic})))

    if "conc" in parts:
        log("legacy provisions at concurrency " + ", ".join(map(str, CONCURRENCY)))
        conc: dict[int, list[float]] = {}
        conc_wall: dict[int, float] = {}
        for c in CONCURRENCY:
            conc[c], conc_wall[c] = concurrent_legacy(url, nodes[:c])  # raises unless all answer Success
        rows["50 concurrent legacy (each)"] = conc[50]
        rows["50 concurrent legacy (wall, all Success)"] = [conc_wall[50]]
        res["conc"] = conc
        res["conc_wall"] = conc_wall

    if "batch" in parts:
        log("batch of 100 nodes: POST /v1/provisions")
        batch = [{"node": n, "image": "bench-golden", "network": NETWORK, "nic": c} for n, c in nodes[:100]]
        cpu0 = stack_cpu(d.resolve(), int(cfg.iscsi.control_port))
        t0 = time.perf_counter()
        recs = user.submit("POST", "/provisions", {"project": PROJECT, "nodes": batch})
        states = [user.wait_op(int(r["id"]))["state"] for r in recs]  # raises on a failed one
        res["batch_s"] = time.perf_counter() - t0
        cpu1 = stack_cpu(d.resolve(), int(cfg.iscsi.control_port))
        res["batch_cpu"] = {k: (v - cpu0.get(k, 0.0)) / len(batch) for k, v in cpu1.items()}
        res["batch_n"] = len(batch)
        log("batch CPU per provision: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in
                                                    sorted(res["batch_cpu"].items(), key=lambda kv: -kv[1])))
        res["batch_done"] = states.count("done")
        rows["batch of 100 (whole batch)"] = [res["batch_s"]]
        with ThreadPoolExecutor(8) as pool:  # clean up in parallel (not measured)
            list(pool.map(lambda nc: Rest(url, TENANT).do(
                "POST", f"/projects/{PROJECT}/nodes/{nc[0]}/deprovision", {"network": NETWORK, "nic": nc[1]}),
                nodes[:100]))

    res["snap"] = {}
    snap_runs = max(3, runs // 4)
    for gib in sizes if "snap" in parts else []:
        size = int(gib * GiB)
        log(f"snapshot and import with {gib:g} GiB written")
        name = f"bench-small{gib:g}".replace(".", "_")
        st.create_image(name, size)
        user.do("POST", f"/projects/{PROJECT}/images", {"name": name})
        user.do("POST", f"/projects/{PROJECT}/nodes/{node}/provision", {"image": name, "network": NETWORK,
                                                                         "nic": nic})
        node_img = ceph_of(ops, node)
        fill(st, node_img, size)
        samples = []
        for k in range(snap_runs):
            sname = f"bsnap{int(gib)}x{k}"
            samples.append(timed(lambda s=sname: user.do("POST", f"/projects/{PROJECT}/nodes/{node}/snapshots",
                                                         {"name": s})))
            user.do("DELETE", f"/projects/{PROJECT}/snapshots/{sname}", {})
        rows[f"snapshot, {gib:g} GiB written"] = samples
        # The old behaviour on the same data: snapshot the node's clone, clone it, flatten before answering.
        st.create_snapshot(node_img, "bench-sync")
        st.protect_snapshot(node_img, "bench-sync")
        sync = timed(lambda im=node_img: (st.clone(im, "bench-sync", "bench-syncflat"), st.flatten("bench-syncflat")))
        st.remove_image("bench-syncflat")
        st.unprotect_snapshot(node_img, "bench-sync")
        st.remove_snapshot(node_img, "bench-sync")
        rows[f"sync flatten, {gib:g} GiB (old way)"] = [sync]
        user.do("POST", f"/projects/{PROJECT}/nodes/{node}/deprovision", {"network": NETWORK, "nic": nic})
        user.do("DELETE", f"/projects/{PROJECT}/images/{name}", {})
        st.remove_image(name)

        src = f"bench-src{gib:g}".replace(".", "_")
        st.create_image(src, size)
        fill(st, src, size)
        samples = []
        for _ in range(max(2, snap_runs // 2)):
            samples.append(timed(lambda s=src: user.do("POST", f"/projects/{PROJECT}/images", {"name": s})))
            user.do("DELETE", f"/projects/{PROJECT}/images/{src}", {})
        rows[f"import, {gib:g} GiB written"] = samples
        st.remove_image(src)
        res["snap"][gib] = (statistics.median(rows[f"snapshot, {gib:g} GiB written"]), sync)
    user.do("DELETE", f"/projects/{PROJECT}/images/bench-golden", {})
    ops.close()
    return res


# A month of a busy rack: ~2,000 operations a day kept for [journal]'s 30 days.
HISTORY_ROWS = 60_000


def add_history(db_path: str, count: int) -> None:
    """``count`` finished journal rows (steps ~1 KiB, as a provision's) and tasks, as weeks of use
    leave them, written straight into the stack's SQLite database."""
    import sqlite3

    steps = json.dumps([{"name": f"step{i}", "params": {"image": "x" * 26, "node": "n" * 40}} for i in range(10)])
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC).replace(tzinfo=None)  # within the 30 days kept: recovery does not prune them
    stamps = [(now - timedelta(days=1 + i % 28, seconds=i)).isoformat(sep=" ") for i in range(count)]
    with sqlite3.connect(db_path, timeout=60) as conn:
        conn.executemany(
            "INSERT INTO operation (kind, args, steps, state, committed, owner, started_at, updated_at) "
            "VALUES ('provision', '{\"_locks\": [\"node:old\"]}', ?, 'done', 1, 'old:1:1', ?, ?)",
            [(steps, t, t) for t in stamps])
        conn.executemany(
            "INSERT INTO task (verb, project, user, args, state, owner, cluster, journal_ops, created_at, "
            "started_at, finished_at) VALUES ('provision', ?, 'old', '{}', 'done', 'old:1:1', 'old', '[]', ?, ?, ?)",
            [(PROJECT, t, t, t) for t in stamps])
    # Rows a deployment gathered over weeks went through the WAL a little at a time; these ~130 MB
    # arrive in one commit: copy them into the database file now, or the first commits measured
    # after would pay for this bulk insert's checkpoint.
    with sqlite3.connect(db_path, timeout=60) as conn:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError("could not checkpoint the database after adding the history rows")


def ceph_of(ops: Operations, name: str) -> str:
    from sqlalchemy import select

    from ims.database.models import Image

    with ops.journal.session() as s:
        row = s.scalars(select(Image).where(Image.name == name)).one()
        return ops.ceph_name(row.id)


def concurrent_legacy(url: str, nodes: list[tuple[str, str]]) -> tuple[list[float], float]:
    """Provision ``nodes`` at once through the legacy API (each must answer Success), then deprovision."""
    barrier = threading.Barrier(len(nodes))
    lat: list[float] = []
    lock = threading.Lock()

    def one(nc: tuple[str, str]) -> None:
        rest = Rest(url, TENANT)
        form = {"project": PROJECT, "node": nc[0], "img": "bench-golden", "network": NETWORK, "nic": nc[1]}
        barrier.wait()
        t = timed(lambda: rest.legacy("PUT", "/provision/", form))
        with lock:
            lat.append(t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(one, nodes))  # re-raises the first failure
    wall = time.perf_counter() - t0
    with ThreadPoolExecutor(min(8, len(nodes))) as pool:
        list(pool.map(lambda nc: Rest(url, TENANT).legacy(
            "DELETE", "/deprovision/", {"project": PROJECT, "node": nc[0], "network": NETWORK, "nic": nc[1]}),
            nodes))
    return lat, wall


if __name__ == "__main__":
    sys.exit(main())

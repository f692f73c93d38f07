#!/usr/bin/env python3
"""Chaos run: random tenant calls through both REST APIs while daemons die, then a full state check.

    benchmarks/chaos.py --minutes M --seed S [--clients 4] [--nodes 8] [--workers 2]

One real stack (scripts/bmi-stack up: Ceph, tgtd, HIL simulator, Einstein, Picasso) with
``--nodes`` HIL nodes in project bmi_infra.  ``--clients`` threads call pro / dpro / snap create /
snap rm / rm / cp at random through the legacy form API and /v1 (only 127.0.0.1), and after each
provision write a per-node marker into sector 0 of the node's clone through libiscsi, logged in
as the node's own initiator.  A fault thread injects, at seeded random moments:

  worker_kill        SIGKILL of one Einstein worker (the supervisor restarts it)
  einstein_kill_all  SIGKILL of Einstein's whole process group, then `bmi-stack restart einstein`
  picasso_restart    `bmi-stack restart picasso`
  tgtd_restart       tgtd restarted the way Debian's tgt.service does (see restart_tgtd_debian)
  hil_pause          the HIL simulator stopped (SIGSTOP) for a few seconds, then SIGCONT
  osd_pause          the Ceph OSD stopped (SIGSTOP) for a few seconds, then SIGCONT

Then it settles (resumes/restarts whatever is down, waits for running operations) and checks:
 (a) every provisioned node has exactly one live target, backed by its own clone, that only its
     initiator may use, and the marker written after provisioning reads back;
 (b) no clone, target, tgt conf file, boot file, DB row or HIL attachment without its owner, nor an
     owner without them; no unfinished operation;
 (c) `reconcile` (as admin, without repair) reports nothing;
 (d) every call ended whole: the final state of each node and image name, and the state each answer
     shows its call found (an ok pro found the node not provisioned, a 404 dpro found it so, ...), is the
     effect of a call that may have acted last by then: one that succeeded, or whose outcome is unknown
     (no answer, or 503 ServiceUnavailable: Picasso lost the back-end), or that answered "committed".
     A call that answered any other error must have left no effect, not even for a while.

The last line is exactly ``chaos: ops N ok N failed N faults N violations N``; before it, the
faults by kind and one line per violation.  Exit status 0 only with violations 0 and faults > 0.
The stack is always brought down (its logs are kept in <stack dir>.last-logs).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from ims.common import config as bmi_config  # noqa: E402
from ims.common.errors import CommandFailed  # noqa: E402
from ims.common.process import execute  # noqa: E402
from ims.einstein.journal import owner_alive
from tests.support import iscsi_rw  # noqa: E402
from tests.support.procs import sigterm_unwinds  # noqa: E402

STACK = REPO / "scripts" / "bmi-stack"
TGTD_DEV = REPO / "scripts" / "tgtd-dev"
TGTD_SOCKDIR = Path("/var/run/tgtd")

PROJECT = "bmi_infra"
NETWORK = "bmi_network"
TENANT = ("haas", "secret")
ADMIN = ("haasadmin", "admin1234")
GOLDEN = "chaos-golden"  # the storage image imported (same name in BMI)
SNAPS = [f"chaos-snap-{i}" for i in range(4)]
COPIES = [f"chaos-copy-{i}" for i in range(4)]
FAULT_KINDS = ("worker_kill", "einstein_kill_all", "picasso_restart", "tgtd_restart", "hil_pause", "osd_pause")
VERBS = ("pro", "dpro", "snap", "snaprm", "cp", "rm")
VERB_WEIGHTS = (30, 25, 12, 10, 12, 11)

# Error answers that say the call found the state it asks for already there, or never started.
NO_EFFECT_ERRORS = {"NodeNotProvisioned", "ImageNotFound", "SnapshotNotFound", "NodeAlreadyProvisioned",
                    "ImageExists", "SnapshotExists", "NodeBusy"}

HTTP_TIMEOUT = 120.0       # one REST call; a paused OSD or HIL only delays
MARKER_TIMEOUT = 60.0      # retrying a marker write while faults come and go
FAULT_GAP = (3.0, 12.0)    # seconds between faults
PAUSE_SECONDS = (2.0, 5.0)  # SIGSTOP duration
SETTLE_TIMEOUT = 120.0
RECOVERY_GRACE = 20.0      # for operations of dead processes to be recovered after the run


def log(msg: str) -> None:
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out += [int(c) for c in text.split()]
    except OSError:
        pass
    return out


def spawn_detached(argv: list[str], log_path: Path) -> int:
    """Start ``argv`` in its own session, re-parented away from us (no zombie to reap); returns its pid."""
    code = ("import subprocess, sys\n"
            "log = open(sys.argv[1], 'ab')\n"
            "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,"
            " start_new_session=True)\n"
            "print(p.pid)\n")
    out, _ = execute(sys.executable, "-c", code, str(log_path), *argv, timeout=30)
    return int(out.strip())


def read_kv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def port_open(hostport: str, timeout: float = 1.0) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def restart_tgtd_debian(tgt_dir: Path, conf_dir: str) -> str:
    """Restart the stack's tgtd as Debian's tgt.service does; the targets come back from conf files.

    Stop (ExecStop): system offline, ``tgt-admin --offline ALL``, ``tgt-admin --update ALL -c /dev/null -f``,
    ``tgtadm --op delete --mode system``.  Start (ExecStart/ExecStartPost): ``tgtd -f`` on the same control
    port and portal, then ``tgt-admin -e -c DIR/targets.conf`` where targets.conf is Debian's
    ``include CONF_DIR/*.conf``: tgt-admin numbers the targets again, in glob order.
    Uses ``scripts/tgtd-dev debian-restart DIR CONF_DIR`` when that sub-command exists.
    """
    if "debian-restart" in TGTD_DEV.read_text():
        execute(str(TGTD_DEV), "debian-restart", str(tgt_dir), conf_dir, timeout=180)
        return "tgtd-dev debian-restart"
    env = read_kv(tgt_dir / "env")
    cport, portal, netns = env["TGT_CONTROL_PORT"], env["TGT_PORTAL"], env.get("TGT_NETNS", "")
    pid = read_pid(tgt_dir / "tgtd.pid")

    def ours(p: int | None) -> bool:
        return p is not None and pid_alive(p) and f"-C {cport} " in cmdline(p) + " "

    def tgt(*argv: str) -> None:
        execute(*argv, timeout=120, check_exit_code=range(256))

    if ours(pid):
        tgt("tgtadm", "-C", cport, "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline")
        tgt("tgt-admin", "-C", cport, "--offline", "ALL")
        tgt("tgt-admin", "-C", cport, "--update", "ALL", "-c", "/dev/null", "-f")
        tgt("tgtadm", "-C", cport, "--op", "delete", "--mode", "system")
        deadline = time.monotonic() + 15
        while ours(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if ours(pid):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            while ours(pid):
                time.sleep(0.1)
    for name in (f"socket.{cport}", f"socket.{cport}.lock"):
        (TGTD_SOCKDIR / name).unlink(missing_ok=True)
    conf = tgt_dir / "targets.conf"
    conf.write_text(f"# Debian's /etc/tgt/targets.conf\ninclude {conf_dir}/*.conf\n")
    argv = ["tgtd", "-f", "-C", cport, "--iscsi", f"portal={portal}"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    new_pid = spawn_detached(argv, tgt_dir / "tgtd.log")
    (tgt_dir / "tgtd.pid").write_text(str(new_pid))
    deadline = time.monotonic() + 30
    while True:
        try:
            execute("tgtadm", "-C", cport, "--op", "show", "--mode", "target", timeout=10)
            if netns or port_open(portal):
                break
        except CommandFailed:
            pass
        if time.monotonic() > deadline or not pid_alive(new_pid):
            raise RuntimeError(f"tgtd did not come back on control port {cport}")
        time.sleep(0.1)
    tgt("tgtadm", "-C", cport, "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline")
    tgt("tgt-admin", "-C", cport, "-e", "-c", str(conf))
    tgt("tgtadm", "-C", cport, "--op", "update", "--mode", "sys", "--name", "State", "-v", "ready")
    return "chaos.restart_tgtd_debian"


# --- live tgt state ------------------------------------------------------------------------------
@dataclass
class LiveTarget:
    tid: int
    iqn: str
    state: str
    luns: dict[int, str]  # lun -> backing store path
    acl: list[str]


def parse_targets(text: str) -> list[LiveTarget]:
    """``tgtadm --op show --mode target`` as a list of targets."""
    out = []
    for block in re.split(r"^(?=Target \d+: )", text, flags=re.M):
        head = re.match(r"Target (\d+): (\S+)", block)
        if not head:
            continue
        state = re.search(r"^\s+State: (\S+)", block, re.M)
        luns: dict[int, str] = {}
        for lun in re.finditer(r"^\s+LUN: (\d+)\n(.*?)(?=^\s+LUN: |^\s+Account information:|\Z)", block,
                               re.M | re.S):
            path = re.search(r"Backing store path: (\S+)", lun.group(2))
            luns[int(lun.group(1))] = path.group(1) if path else ""
        acl_match = re.search(r"^\s+ACL information:\n(.*)", block, re.M | re.S)
        acl = [a.strip() for a in acl_match.group(1).splitlines() if a.strip()] if acl_match else []
        out.append(LiveTarget(int(head.group(1)), head.group(2), state.group(1) if state else "?", luns, acl))
    return out


# --- calls -----------------------------------------------------------------------------------------
@dataclass
class Call:
    seq: int
    client: int
    verb: str
    api: str
    args: dict[str, str]
    start: float
    end: float = 0.0
    status: int | None = None
    outcome: str = ""  # ok | failed | uncertain | committed
    detail: str = ""
    error_type: str = ""

    @property
    def key(self) -> str:
        if self.verb in ("pro", "dpro"):
            return f"node:{self.args['node']}"
        return f"image:{self.args['target']}"

    @property
    def effect(self) -> tuple[str, ...]:
        return {"pro": ("provisioned", self.args.get("image", "")), "dpro": ("not provisioned",),
                "snap": ("exists",), "cp": ("exists",), "snaprm": ("absent",), "rm": ("absent",)}[self.verb]

    def describe(self, t0: float) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        answer = f"{self.status}" if self.status is not None else "no answer"
        return (f"#{self.seq} {self.verb} {args} via {self.api} at +{self.start - t0:.1f}s..+{self.end - t0:.1f}s "
                f"answered {answer} {self.detail}".rstrip())


@dataclass
class Result:
    ops: int = 0
    ok: int = 0
    failed: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    @property
    def summary(self) -> str:
        return (f"chaos: ops {self.ops} ok {self.ok} failed {self.failed} faults {self.fault_count} "
                f"violations {len(self.violations)}")


class Chaos:
    def __init__(self, stack_dir: Path, seed: int, clients: int, minutes: float) -> None:
        self.dir = stack_dir
        self.seed = seed
        self.clients = clients
        self.minutes = minutes
        self.env = dict(os.environ)
        self.env.update({k: v.replace("$PATH", os.environ.get("PATH", "")) for k, v in
                         read_kv(stack_dir / "env").items()})
        self.cfg = bmi_config.load(path=self.env["BMI_CONFIG"])
        self.url = self.env["BMI_URL"]
        self.hil_url = self.env["HIL_ENDPOINT"]
        inventory = json.loads((stack_dir / "hil-inventory.json").read_text())
        self.nodes = {n["name"]: (n["nics"][0]["label"], n["nics"][0]["macaddr"].lower())
                      for n in inventory["nodes"] if n["project"] == PROJECT}
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.seq = 0
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.max_ops = int(200 * max(1.0, minutes) * clients)
        self.markers: dict[str, tuple[str, bytes]] = {}       # clone -> (node, sector 0)
        self.claimed: set[str] = set()
        self.marker_failures: dict[str, tuple[str, str]] = {}  # clone -> (node, last error)
        self.faults: list[tuple[str, float, str]] = []
        self.fault_errors: list[str] = []
        self.paused: set[int] = set()

    # --- HTTP ---------------------------------------------------------------------------------
    def http(self, method: str, path: str, user: tuple[str, str] = TENANT, form: dict[str, str] | None = None,
             body: dict[str, Any] | None = None, timeout: float = HTTP_TIMEOUT) -> tuple[int | None, Any, str]:
        """One request on a fresh connection; returns (status or None, parsed body, transport error)."""
        try:
            resp = requests.request(method, self.url + path, auth=user, data=form, json=body,
                                    timeout=(5.0, timeout), headers={"Connection": "close"})
        except requests.exceptions.ConnectTimeout:
            return None, None, "refused"
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            if "NewConnectionError" in text or "Connection refused" in text:
                return None, None, "refused"  # never sent: the server was not listening
            return None, None, f"no answer ({type(exc).__name__})"
        except requests.exceptions.Timeout:
            return None, None, "no answer (timeout)"
        error_type = resp.headers.get("X-BMI-Error-Type")
        if resp.status_code >= 400 and error_type and resp.headers.get("Content-Type", "").startswith("text/plain"):
            # the legacy form API answers errors as the original BMI did: the message in plain text
            # (the type in a header); read as the same error the JSON API gives
            return resp.status_code, {"error": {"type": error_type, "message": resp.text.strip(),
                                                "status": resp.status_code}}, ""
        try:
            data: Any = resp.json()
        except ValueError:
            data = resp.text
        return resp.status_code, data, ""

    def follow(self, data: Any, deadline_s: float = HTTP_TIMEOUT) -> tuple[int | None, Any, str]:
        """A 202's operation followed to its end, answered as the synchronous call would have been:
        (200, record) when done, (the error's status, {"error": ...}) when failed.  Picasso or Einstein
        restarts while following are waited out; an operation still unfinished at the deadline is unknown."""
        record = data.get("result") if isinstance(data, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("id"), int):
            return 202, data, ""
        deadline = time.monotonic() + deadline_s
        while record.get("state") not in ("done", "failed"):
            if time.monotonic() > deadline:
                return None, None, "no answer (operation still running)"
            status, got, _err = self.http("GET", f"/v1/operations/{record['id']}?wait=20", timeout=60)
            if status == 200 and isinstance(got, dict) and isinstance(got.get("result"), dict):
                record = got["result"]
            elif status is not None and status != 503:
                return status, got, ""
            else:
                time.sleep(1.0)  # Picasso or Einstein restarting: the operation's record survives
        if record["state"] == "done":
            return 200, {"result": record}, ""
        error = record.get("error") or {}
        return int(error.get("status", 500)), {"error": error}, ""

    def admin_get(self, path: str) -> Any:
        status, data, err = self.http("GET", path, user=ADMIN, timeout=60)
        if status != 200:
            raise RuntimeError(f"GET {path} as admin: {status or err} {data}")
        return data["result"]

    # --- one tenant call ------------------------------------------------------------------------
    def request_for(self, verb: str, api: str, a: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
        """(method, path, {"form": ...} or {"body": ...}) of a verb through one API."""
        p = PROJECT
        if api == "legacy":
            form = {"project": p}
            if verb == "pro":
                return "PUT", "/provision/", {"form": dict(form, node=a["node"], img=a["image"], network=NETWORK,
                                                           nic=a["nic"])}
            if verb == "dpro":
                return "DELETE", "/deprovision/", {"form": dict(form, node=a["node"], network=NETWORK,
                                                                nic=a["nic"])}
            if verb == "snap":
                return "PUT", "/create_snapshot/", {"form": dict(form, node=a["node"], snap_name=a["target"])}
            if verb in ("snaprm", "rm"):
                return "DELETE", "/remove_image/", {"form": dict(form, img=a["target"])}
            raise ValueError(verb)
        base = f"/v1/projects/{p}"
        if verb == "pro":
            return "POST", f"{base}/nodes/{a['node']}/provision", {"body": {"image": a["image"], "network": NETWORK,
                                                                           "nic": a["nic"]}}
        if verb == "dpro":
            return "POST", f"{base}/nodes/{a['node']}/deprovision", {"body": {"network": NETWORK, "nic": a["nic"]}}
        if verb == "snap":
            return "POST", f"{base}/nodes/{a['node']}/snapshots", {"body": {"name": a["target"]}}
        if verb == "snaprm":
            return "DELETE", f"{base}/snapshots/{a['target']}", {}
        if verb == "rm":
            return "DELETE", f"{base}/images/{a['target']}", {}
        if verb == "cp":
            return "POST", f"{base}/images/{a['source']}/copy", {"body": {"dest_project": p,
                                                                         "dest_name": a["target"]}}
        raise ValueError(verb)

    def call(self, client: int, verb: str, api: str, args: dict[str, str]) -> Call:
        with self.lock:
            self.seq += 1
            call = Call(self.seq, client, verb, api, args, time.monotonic())
        method, path, kw = self.request_for(verb, api, args)
        status, data, err = self.http(method, path, form=kw.get("form"), body=kw.get("body"))
        if status == 202:
            status, data, err = self.follow(data)
        call.end = time.monotonic()
        call.status = status
        if status is None:
            call.outcome = "failed" if err == "refused" else "uncertain"
            call.detail = err
        elif 200 <= status < 300:
            call.outcome = "ok"
        else:
            error = data.get("error") if isinstance(data, dict) else None
            if not isinstance(error, dict):
                call.outcome, call.detail = "uncertain", f"not a BMI answer: {str(data)[:120]!r}"
            else:
                message = str(error.get("message", ""))
                call.error_type = str(error.get("type", ""))
                if "committed" in message.lower():
                    # the rule: past the commit point the answer says the operation will complete
                    call.outcome = "committed"
                elif call.error_type == "ServiceUnavailable":
                    # Picasso lost the back-end (unreachable, timed out, connection lost mid-call): the call may
                    # have run, and recovery may roll it back or forward; either whole outcome is right
                    call.outcome = "uncertain"
                else:
                    call.outcome = "failed"
                call.detail = f"{call.error_type}: {message[:160]}"
        with self.lock:
            self.calls.append(call)
        return call

    # --- markers ------------------------------------------------------------------------------------
    def portal(self) -> str:
        return f"{self.cfg.iscsi.ip}:{self.cfg.iscsi.port}"

    def iqn(self, clone: str) -> str:
        return self.cfg.iscsi.iqn_prefix + clone

    def initiator(self, node: str) -> str:
        return self.cfg.iscsi.initiator_iqn_prefix + node

    def chap(self, clone: str) -> tuple[str, str] | None:
        """The target's CHAP account as its node's iPXE script has it (from the 0600 conf file)."""
        try:
            return iscsi_rw.conf_chap(os.path.join(self.cfg.iscsi.conf_dir, clone + ".conf"))
        except OSError:
            return None

    def clone_of(self, node: str) -> tuple[bool, str | None]:
        """(answered, Ceph name of the node's clone or None) as the tenant sees it in `db ls`."""
        status, data, _ = self.http("GET", f"/v1/db/images?project={PROJECT}&name={node}", timeout=30)
        if status != 200:
            return False, None
        rows = data["result"]
        return True, (rows[0][3] if rows else None)

    def write_marker(self, node: str, seq: int) -> None:
        """Write ``CHAOS <node> <seq>`` into sector 0 of the node's current clone (once per clone)."""
        deadline = time.monotonic() + MARKER_TIMEOUT
        clone: str | None = None
        last = "the node's clone could not be looked up"
        while time.monotonic() < deadline and not self.stop.is_set():
            answered, found = self.clone_of(node)
            if answered and found is None:
                return  # deprovisioned meanwhile (or the provision did not happen)
            if answered and found is not None:
                if clone != found:
                    with self.lock:
                        if found in self.claimed:
                            return
                        self.claimed.add(found)
                    clone = found
                data = f"CHAOS {node} {seq}".encode().ljust(iscsi_rw.BLOCK_SIZE, b"\0")
                try:
                    iscsi_rw.write_lun(self.portal(), self.iqn(clone), self.cfg.iscsi.lun, 0, data,
                                       initiator=self.initiator(node), chap=self.chap(clone))
                    with self.lock:
                        self.markers[clone] = (node, data)
                    return
                except iscsi_rw.IscsiIOError as exc:
                    last = str(exc)
            time.sleep(1.0)
        if clone is not None:
            with self.lock:
                self.marker_failures[clone] = (node, last)

    # --- clients -----------------------------------------------------------------------------------
    def client_loop(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        names = sorted(self.nodes)
        while time.monotonic() < deadline and not self.stop.is_set():
            with self.lock:
                if self.seq >= self.max_ops:
                    return
            verb = rng.choices(VERBS, VERB_WEIGHTS)[0]
            api = "v1" if verb == "cp" else rng.choice(("legacy", "v1"))
            node = rng.choice(names)
            args: dict[str, str]
            if verb == "pro":
                image = GOLDEN if rng.random() < 0.6 else rng.choice(SNAPS + COPIES)
                args = {"node": node, "image": image, "nic": self.nodes[node][0]}
            elif verb == "dpro":
                args = {"node": node, "nic": self.nodes[node][0]}
            elif verb == "snap":
                args = {"node": node, "target": rng.choice(SNAPS)}
            elif verb == "snaprm":
                args = {"target": rng.choice(SNAPS)}
            elif verb == "cp":
                args = {"source": GOLDEN if rng.random() < 0.5 else rng.choice(SNAPS), "target": rng.choice(COPIES)}
            else:
                args = {"target": rng.choice(COPIES)}
            call = self.call(index, verb, api, args)
            if verb == "pro" and call.outcome in ("ok", "uncertain", "committed"):
                self.write_marker(node, call.seq)
            time.sleep(rng.uniform(0.05, 0.4 if call.outcome == "ok" else 1.0))

    # --- faults ------------------------------------------------------------------------------------
    def einstein_pid(self) -> int | None:
        pid = read_pid(self.dir / "pids" / "einstein.pid")
        return pid if pid is not None and pid_alive(pid) and self.env["BMI_CONFIG"] in cmdline(pid) else None

    def worker_pids(self) -> list[int]:
        sup = self.einstein_pid()
        if sup is None:
            return []
        return sorted(c for c in children(sup) if pid_alive(c) and "spawn_main" in cmdline(c))

    def stack_cmd(self, *args: str, timeout: float = 180) -> None:
        execute(str(STACK), *args, "--dir", str(self.dir), timeout=timeout)

    def pause(self, pid: int | None, what: str, seconds: float) -> str:
        if pid is None or not pid_alive(pid):
            raise RuntimeError(f"{what} is not running")
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)
        try:
            self.stop.wait(seconds)  # an early stop only shortens the pause
        finally:
            os.kill(pid, signal.SIGCONT)
            self.paused.discard(pid)
        return f"{what} pid {pid} stopped {seconds:.1f}s"

    def inject(self, kind: str, rng: random.Random) -> str:
        if kind == "worker_kill":
            workers = self.worker_pids()
            if not workers:
                raise RuntimeError("no Einstein worker to kill")
            victim = rng.choice(workers)
            os.kill(victim, signal.SIGKILL)
            return f"worker pid {victim}"
        if kind == "einstein_kill_all":
            sup = self.einstein_pid()
            if sup is None:
                raise RuntimeError("Einstein is not running")
            if os.getpgid(sup) != sup:
                raise RuntimeError(f"Einstein pid {sup} does not lead its process group")
            os.killpg(sup, signal.SIGKILL)
            down_for = rng.uniform(0.5, 2.0)
            time.sleep(down_for)
            self.stack_cmd("restart", "einstein")
            return f"group {sup} killed, restarted after {down_for:.1f}s"
        if kind == "picasso_restart":
            self.stack_cmd("restart", "picasso")
            return "restarted"
        if kind == "tgtd_restart":
            return restart_tgtd_debian(self.dir / "tgt", self.cfg.iscsi.conf_dir)
        if kind == "hil_pause":
            pid = read_pid(self.dir / "pids" / "hil-simulator.pid")
            return self.pause(pid, "HIL simulator", rng.uniform(*PAUSE_SECONDS))
        if kind == "osd_pause":
            pid = read_pid(self.dir / "ceph" / "pids" / "osd.0.pid")
            if pid is not None and "ceph-osd" not in cmdline(pid):
                raise RuntimeError(f"pid {pid} is not our ceph-osd")
            return self.pause(pid, "ceph-osd", rng.uniform(*PAUSE_SECONDS))
        raise ValueError(kind)

    def fault_loop(self, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + 999)
        order: list[str] = []
        while not self.stop.is_set():
            if self.stop.wait(rng.uniform(*FAULT_GAP)) or time.monotonic() > deadline - 3:
                return
            if not order:  # every kind once per round, in a seeded order
                order = list(FAULT_KINDS)
                rng.shuffle(order)
            kind = order.pop()
            at = time.monotonic() - self.t0
            try:
                detail = self.inject(kind, rng)
                with self.lock:
                    self.faults.append((kind, at, detail))
                log(f"fault +{at:.1f}s {kind}: {detail}")
            except Exception as exc:  # noqa: BLE001 - reported as a violation: the stack did not recover
                with self.lock:
                    self.faults.append((kind, at, f"FAILED: {exc}"))
                    self.fault_errors.append(f"{kind} at +{at:.1f}s: {str(exc)[-600:]}")
                log(f"fault +{at:.1f}s {kind} failed: {exc}")

    # --- run -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        execute("rbd", "create", GOLDEN, "--size", "8", "--image-format", "2", env=self.env, timeout=120)
        status, data, err = self.http("POST", f"/v1/projects/{PROJECT}/images", body={"name": GOLDEN})
        if status == 202:
            status, data, err = self.follow(data)
        if status not in (200, 201):
            raise RuntimeError(f"import of {GOLDEN} failed: {status or err} {data}")

    def run_load(self) -> None:
        deadline = time.monotonic() + self.minutes * 60
        threads = [threading.Thread(target=self.client_loop, args=(i, deadline), name=f"client-{i}", daemon=True)
                   for i in range(self.clients)]
        faults = threading.Thread(target=self.fault_loop, args=(deadline,), name="faults", daemon=True)
        for t in [*threads, faults]:
            t.start()
        try:
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline + HTTP_TIMEOUT + \
                    MARKER_TIMEOUT + 60:
                time.sleep(0.5)
        finally:
            self.stop.set()
            faults.join(timeout=240)
            for t in threads:
                t.join(timeout=HTTP_TIMEOUT + MARKER_TIMEOUT + 30)
        stuck = [t.name for t in [*threads, faults] if t.is_alive()]
        if stuck:
            self.fault_errors.append(f"threads still running after the run: {', '.join(stuck)}")

    def resume_all(self) -> None:
        for pid in list(self.paused):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.paused.discard(pid)

    def settle(self) -> list[str]:
        """Bring every daemon back, wait until Einstein answers and no live operation runs; returns problems."""
        problems = []
        self.resume_all()
        tgt_pid = read_pid(self.dir / "tgt" / "tgtd.pid")
        if tgt_pid is None or not pid_alive(tgt_pid):
            problems.append("tgtd was down after the run; restarting it")
            try:
                restart_tgtd_debian(self.dir / "tgt", self.cfg.iscsi.conf_dir)
            except (CommandFailed, RuntimeError, OSError) as exc:
                problems.append(f"tgtd could not be restarted: {str(exc)[-400:]}")
        for service in ("hil-simulator", "picasso", "einstein"):
            pid = read_pid(self.dir / "pids" / f"{service}.pid")
            if pid is None or not pid_alive(pid):
                problems.append(f"{service} was down after the run; restarting it")
                try:
                    self.stack_cmd("restart", service)
                except CommandFailed as exc:
                    problems.append(f"{service} could not be restarted: {str(exc)[-400:]}")
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            status, _, _ = self.http("GET", "/v1/projects", user=ADMIN, timeout=30)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("BMI does not answer after the run")
            time.sleep(0.5)
        # Running operations of live processes finish; those of dead ones, and failed ones, get RECOVERY_GRACE
        # to be recovered (by the supervisor, the journal, or the next caller under the lock) before they count.
        grace = time.monotonic() + RECOVERY_GRACE
        while time.monotonic() < deadline:
            with self.db() as db:
                pending = list(db.execute("SELECT owner, state FROM operation WHERE state IN ('running', 'failed')"))
            if not pending or (time.monotonic() > grace and
                               not any(state == "running" and owner_alive(o) for o, state in pending)):
                break
            time.sleep(0.5)
        # Then the background: accepted operations still queued or running, and flatten jobs (a copy is
        # whole only once its flatten has finished and its own snapshot is taken).
        while time.monotonic() < deadline:
            with self.db() as db:
                busy = db.execute("SELECT (SELECT count(*) FROM task WHERE state IN ('queued', 'running')) + "
                                  "(SELECT count(*) FROM flatten_job)").fetchone()[0]
            if not busy:
                break
            time.sleep(0.5)
        else:
            problems.append("background work (operations or flatten jobs) still running after the settle time")
        return problems

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """BMI's SQLite database, read-only."""
        conn = sqlite3.connect(f"file:{self.cfg.db.path}?mode=ro", uri=True, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def rbd_ls_long(self, pool: str) -> str:
        """``rbd ls -l`` as JSON; it fails when an image goes away while it is listed (something still
        removing), so it is tried again a few times."""
        for attempt in range(10):
            try:
                out, _ = execute("rbd", "-p", pool, "ls", "-l", "--format", "json", env=self.env, timeout=120)
                return out
            except CommandFailed:
                if attempt == 9:
                    raise
                time.sleep(2.0)
        raise AssertionError("unreachable")

    # --- checks --------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        v: list[str] = []
        uid = self.cfg.bmi.uid
        prefix = f"{uid}img"
        pool = self.cfg.fs.pool
        with self.db() as db:
            rows = {r[0]: {"id": r[0], "name": r[1], "project": r[2], "kind": r[3], "parent": r[4] or ""}
                    for r in db.execute("SELECT i.id, i.name, p.name, i.kind, par.name FROM image i "
                                        "JOIN project p ON p.id = i.project_id "
                                        "LEFT JOIN image par ON par.id = i.parent_id")}
            provs = {r[0]: {"node": r[0], "image_id": r[1], "nic": r[2], "mac": r[3].lower(), "network": r[4]}
                     for r in db.execute("SELECT node, image_id, nic, mac, network FROM provision")}
            unfinished = list(db.execute("SELECT id, kind, state, owner, error FROM operation "
                                         "WHERE state IN ('running', 'failed')"))
        ceph = {f"{prefix}{i}": r for i, r in rows.items()}
        clones = {c: r for c, r in ceph.items() if r["kind"] in ("node", "disk")}

        # DB rows as the admin sees them through the API (bmi db ls)
        api_rows = {r[3]: r for r in self.admin_get("/v1/db/images")}
        if set(api_rows) != set(ceph):
            v.append(f"(b) db-ls-differs: `db ls` shows {sorted(set(api_rows) ^ set(ceph))} unlike the database")

        # storage
        out = self.rbd_ls_long(pool)
        rbd_images: set[str] = set()
        snaps: dict[str, dict[str, bool]] = collections.defaultdict(dict)
        for entry in json.loads(out or "[]"):
            if "snapshot" in entry:
                snaps[entry["image"]][entry["snapshot"]] = str(entry.get("protected", "")).lower() == "true"
            else:
                rbd_images.add(entry["image"])
        ours = {i for i in rbd_images if i.startswith(prefix) and i[len(prefix):].isdigit()}
        for image in sorted(ours - set(ceph)):
            v.append(f"(b) clone-without-row: storage image {image} has no DB row")
        for name in sorted(set(ceph) - ours):
            r = ceph[name]
            v.append(f"(b) row-without-clone: {r['kind']} row {r['name']} ({name}) has no storage image")
        snap_name = self.cfg.bmi.snapshot
        for name, r in sorted(ceph.items()):
            if name not in ours:
                continue
            if r["kind"] in ("golden", "snapshot") and not snaps[name].get(snap_name):
                v.append(f"(b) image-without-snapshot: {r['kind']} {r['name']} ({name}) lacks its protected "
                         f"@{snap_name} (half-made)")
            if r["kind"] in ("node", "disk") and snap_name in snaps[name]:
                v.append(f"(b) leftover-snapshot: {r['kind']} clone {r['name']} ({name}) still has @{snap_name}")

        # DB rows vs provisions
        by_image = {p["image_id"]: p for p in provs.values()}
        for name, r in sorted(clones.items()):
            if r["kind"] == "node" and r["id"] not in by_image:
                v.append(f"(b) clone-row-without-provision: node clone row {r['name']} ({name}) has no provision")
            if r["kind"] == "disk":
                v.append(f"(b) unexpected-disk: disk row {r['name']} (the chaos run makes none)")
        for node, p in sorted(provs.items()):
            r = rows.get(p["image_id"])
            if r is None or r["kind"] != "node" or r["name"] != node:
                v.append(f"(b) provision-without-clone-row: node {node} provisioned with image id {p['image_id']} "
                         f"({r['kind'] + ' ' + r['name'] if r else 'no row'})")

        # live targets and conf files
        out, _ = execute("tgtadm", "-C", str(self.cfg.iscsi.control_port), "--lld", "iscsi", "--op", "show",
                         "--mode", "target", timeout=60)
        targets = parse_targets(out)
        # CHAP accounts (one per target, named after its clone) must go with their targets
        out, _ = execute("tgtadm", "-C", str(self.cfg.iscsi.control_port), "--lld", "iscsi", "--op", "show",
                         "--mode", "account", timeout=60)
        for account in sorted(a.strip() for a in out.splitlines()[1:] if a.strip()):
            if account.startswith(prefix) and account not in clones:
                v.append(f"(b) account-without-owner: tgt CHAP account {account} belongs to no provisioned clone")
        iprefix = self.cfg.iscsi.iqn_prefix
        for t in targets:
            name = t.iqn[len(iprefix):] if t.iqn.startswith(iprefix) else None
            if name is None or name not in clones:
                v.append(f"(b) target-without-owner: live target {t.iqn} (tid {t.tid}, backing "
                         f"{t.luns.get(self.cfg.iscsi.lun, '-')}) belongs to no provisioned clone")
            backing = t.luns.get(self.cfg.iscsi.lun, "")
            if backing.startswith(f"{pool}/") and backing != f"{pool}/{name}":
                v.append(f"(b) target-exposes-other-clone: live target {t.iqn} (tid {t.tid}) is backed by {backing}")
        conf_dir = Path(self.cfg.iscsi.conf_dir)
        confs = {p.name[:-len(".conf")]: p.read_text() for p in conf_dir.glob("*.conf")}
        for name, text in sorted(confs.items()):
            m = re.search(r"^<target (\S+)>", text, re.M)
            if name not in clones:
                v.append(f"(b) conf-without-owner: tgt conf file {name}.conf belongs to no provisioned clone")
            elif not m or m.group(1) != self.iqn(name):
                v.append(f"(b) conf-wrong-target: tgt conf file {name}.conf names {m.group(1) if m else 'nothing'}")
            if f"backing-store {pool}/{name}\n" not in text:
                v.append(f"(b) conf-wrong-backing: tgt conf file {name}.conf does not back onto {pool}/{name}")
        for name, r in sorted(clones.items()):
            if name not in confs:
                v.append(f"(b) owner-without-conf: clone of {r['name']} ({name}) has no tgt conf file")

        # boot files
        tftp = self.cfg.tftp
        by_mac = {p["mac"]: p for p in provs.values()}
        if tftp.boot_mode == "tftp":
            for path in sorted(Path(tftp.ipxe_path).glob("*.ipxe")):
                node = path.name[:-len(".ipxe")]
                p = provs.get(node)
                if p is None:
                    v.append(f"(b) boot-file-without-owner: {path.name} for a node that is not provisioned")
                elif not re.search(rf":{re.escape(self.iqn(prefix + str(p['image_id'])))}(\s|$)", path.read_text(),
                                   re.M):
                    v.append(f"(b) boot-file-stale: {path.name} does not boot {node}'s clone "
                             f"{prefix}{p['image_id']}")
            for path in sorted(Path(tftp.pxelinux_path).glob("01-*")):
                mac = path.name[3:].replace("-", ":").lower()
                p = by_mac.get(mac)
                if p is None:
                    v.append(f"(b) boot-file-without-owner: pxelinux.cfg/{path.name} for a MAC no node is "
                             "provisioned with")
                elif f"{p['node']}.ipxe" not in path.read_text():
                    v.append(f"(b) boot-file-stale: pxelinux.cfg/{path.name} does not chain {p['node']}.ipxe")
            for node, p in sorted(provs.items()):
                missing = [f for f in (Path(tftp.ipxe_path) / f"{node}.ipxe",
                                       Path(tftp.pxelinux_path) / ("01-" + p["mac"].replace(":", "-")))
                           if not f.is_file()]
                if missing:
                    v.append(f"(b) owner-without-boot-files: provisioned node {node} lacks "
                             f"{', '.join(f.name for f in missing)}")

        # HIL attachments
        for node in sorted(self.nodes):
            resp = requests.get(f"{self.hil_url}/v0/node/{node}", auth=ADMIN, timeout=30)
            resp.raise_for_status()
            attached = {(nic["label"], net) for nic in resp.json()["nics"] for net in nic.get("networks", {}).values()}
            p = provs.get(node)
            want = {(p["nic"], p["network"])} if p is not None and p["network"] else set()
            for nic, net in sorted(attached - want):
                v.append(f"(b) hil-attachment-without-owner: {node}/{nic} is on {net} but "
                         f"{'not provisioned' if p is None else 'provisioned with ' + str(p['nic'])}")
            for nic, net in sorted(want - attached):
                v.append(f"(b) owner-without-hil-attachment: provisioned node {node} has {nic} not on {net}")

        # operations the journal never finished
        for op_id, kind, state, owner, error in unfinished:
            alive = "live" if owner_alive(owner) else "dead"
            v.append(f"(b) unfinished-operation: #{op_id} {kind} is {state} (owner {alive}) {(error or '')[:160]}")

        # (a) each provisioned node: one live target on its own clone, its initiator only, marker back
        for node, p in sorted(provs.items()):
            clone = f"{prefix}{p['image_id']}"
            iqn = self.iqn(clone)
            live = [t for t in targets if t.iqn == iqn]
            if len(live) != 1:
                v.append(f"(a) live-targets: provisioned node {node} has {len(live)} live targets for {clone}")
                continue
            t = live[0]
            backing = t.luns.get(self.cfg.iscsi.lun, "")
            if backing != f"{pool}/{clone}":
                v.append(f"(a) wrong-backing: {node}'s target (tid {t.tid}) is backed by {backing or 'nothing'}")
                continue
            if "ALL" in t.acl or self.initiator(node) not in t.acl:
                v.append(f"(a) acl: {node}'s target (tid {t.tid}) ACL is {t.acl}")
            if t.state != "ready":
                v.append(f"(a) target-state: {node}'s target (tid {t.tid}) is {t.state}")
            try:
                sector = iscsi_rw.read_lun(self.portal(), iqn, self.cfg.iscsi.lun, 0, 1,
                                           initiator=self.initiator(node), chap=self.chap(clone))
            except iscsi_rw.IscsiIOError as exc:
                v.append(f"(a) unreadable: {node}'s target does not read as the node: {exc}")
                continue
            if self.chap(clone) is not None:
                try:   # a target with no account bound lets anyone in: the secret must be needed
                    iscsi_rw.read_lun(self.portal(), iqn, self.cfg.iscsi.lun, 0, 1, initiator=self.initiator(node))
                    v.append(f"(a) chap: {node}'s target (tid {t.tid}) lets its node in without the CHAP secret")
                except iscsi_rw.IscsiIOError:
                    pass
            if clone in self.markers:
                want_node, data = self.markers[clone]
                if sector != data:
                    v.append(f"(a) marker: {node}'s clone {clone} sector 0 is {sector.rstrip(bytes(1))[:40]!r}, "
                             f"not {data.rstrip(bytes(1))!r}")
            elif clone in self.marker_failures:
                v.append(f"(a) marker-not-written: after {node}'s provision the marker could not be written to "
                         f"{clone}: {self.marker_failures[clone][1][:200]}")
            else:
                log(f"note: {node} is provisioned ({clone}) but no client saw that provision succeed")

        # (c) `bmi reconcile` (no --repair) as the admin: it prints the drift report as JSON
        env = dict(self.env, HIL_USERNAME=ADMIN[0], HIL_PASSWORD=ADMIN[1])
        try:
            out, _ = execute(str(REPO / ".venv" / "bin" / "bmi"), "reconcile", env=env, timeout=180)
            report = json.loads(out)
            report = report.get("result", report) if isinstance(report, dict) else report
            for key, value in sorted(report.items()):
                if isinstance(value, (list, dict)) and value:
                    v.append(f"(c) reconcile-{key}: {json.dumps(value)[:300]}")
        except (CommandFailed, ValueError, AttributeError) as exc:
            v.append(f"(c) reconcile-failed: {str(exc)[:300]}")

        # (d) every call ended whole
        final: dict[str, tuple[str, ...]] = {}
        for node in self.nodes:
            p = provs.get(node)
            r = rows.get(p["image_id"]) if p else None
            final[f"node:{node}"] = ("provisioned", r["parent"] if r else "?") if p else ("not provisioned",)
        names_now = {r["name"] for r in rows.values() if r["project"] == PROJECT}
        for name in SNAPS + COPIES:
            final[f"image:{name}"] = ("exists",) if name in names_now else ("absent",)
        if GOLDEN not in names_now:
            v.append(f"(d) golden-lost: image {GOLDEN} is gone (no call removes it)")
        v += self.check_calls(final)
        return v

    def check_calls(self, final: dict[str, tuple[str, ...]]) -> list[str]:
        """(d) Per node / image name: the final state, and the state every answer shows a call found
        (an ok pro found the node not provisioned, a 404 dpro found it so, ...), must each be the effect of
        a call that may have taken effect last by then: one that succeeded, or whose answer never came."""
        out: list[str] = []
        blamed: set[int] = set()
        unexplained: collections.Counter[tuple[str, str]] = collections.Counter()
        by_key: dict[str, list[Call]] = collections.defaultdict(list)
        for c in self.calls:
            by_key[c.key].append(c)
        for key in sorted(set(final) | set(by_key)):
            calls = by_key.get(key, [])
            what = key.replace(":", " ", 1)
            initial = ("not provisioned",) if key.startswith("node:") else ("absent",)
            checks: list[tuple[Call | None, tuple[str, ...]]] = []
            if key in final:
                checks.append((None, final[key]))
            for c in calls:
                seen = observed_state(c)
                if seen is not None:
                    checks.append((c, seen))
            for c, state in checks:
                # the window: effects that may have landed before c ran (the end of the run for the final state)
                before_end = c.end if c else float("inf")
                after_start = c.start if c else float("inf")
                done = [e for e in calls if e.outcome == "ok" and e is not c and e.end < after_start]

                def standing(d: Call, c: Call | None = c, done: list[Call] = done, before_end: float = before_end
                             ) -> bool:  # d may have been the last to act on the key (an ok call after it decides)
                    return d is not c and d.start < before_end and not any(e.start > d.end for e in done)

                def same(effect: tuple[str, ...], c: Call | None = c, state: tuple[str, ...] = state) -> bool:
                    return effect == state if c is None else effect[0] == state[0]

                effects = [d.effect for d in calls if d.outcome in ("ok", "uncertain", "committed") and standing(d)]
                if not done:
                    effects.append(initial)
                if any(same(e) for e in effects):
                    continue
                culprits = [d for d in calls if d.outcome == "failed" and d.error_type not in NO_EFFECT_ERRORS
                            and same(d.effect) and standing(d)]
                seen = f"ended {' from '.join(state)}" if c is None else \
                    f"was {state[0]} when {c.describe(self.t0)}"
                if culprits:
                    if culprits[-1].seq not in blamed:
                        blamed.add(culprits[-1].seq)
                        out.append(f"(d) failed-call-took-effect: {what} {seen}; yet "
                                   f"{culprits[-1].describe(self.t0)}")
                elif c is None:
                    last = [d for d in calls if d.outcome == "ok" and standing(d)][-1:]
                    why = f"; last call that counts: {last[0].describe(self.t0)}" if last else ""
                    out.append(f"(d) unexplained-state: {what} {seen}, which no call explains{why}")
                else:
                    unexplained[(key, state[0])] += 1
                    if unexplained[(key, state[0])] == 1:  # the first such call; the count follows
                        hint = " (its own request, sent twice?)" if c.effect[0] == state[0] else ""
                        out.append(f"(d) unexplained-observation: {what} {seen}, which no earlier call "
                                   f"explains{hint}")
        for (key, state_name), n in sorted(unexplained.items()):
            if n > 1:
                out.append(f"(d) unexplained-observation: {key.replace(':', ' ', 1)} was {state_name} when {n - 1} "
                           "more calls ran, which no earlier call explains")
        return out

    def dump(self, path: Path) -> None:
        """Every call and fault as JSON lines (kept with the stack's logs) for a post-mortem."""
        with path.open("w") as fh:
            for c in self.calls:
                fh.write(json.dumps({"seq": c.seq, "client": c.client, "verb": c.verb, "api": c.api, "args": c.args,
                                     "start": round(c.start - self.t0, 3), "end": round(c.end - self.t0, 3),
                                     "status": c.status, "outcome": c.outcome, "detail": c.detail}) + "\n")
            for kind, at, detail in self.faults:
                fh.write(json.dumps({"fault": kind, "at": round(at, 3), "detail": detail}) + "\n")


def observed_state(c: Call) -> tuple[str, ...] | None:
    """The state of the call's node / image name that its answer shows it found, if any."""
    if c.outcome == "ok":
        return {"pro": ("not provisioned",), "dpro": ("provisioned",), "snap": ("absent",), "cp": ("absent",),
                "rm": ("exists",), "snaprm": ("exists",)}[c.verb]
    if c.outcome != "failed":
        return None
    # only errors of the checks before anything changes, about this call's own node / image name
    return {("pro", "NodeAlreadyProvisioned"): ("provisioned",), ("dpro", "NodeNotProvisioned"): ("not provisioned",),
            ("snap", "ImageExists"): ("exists",), ("cp", "ImageExists"): ("exists",),
            ("rm", "ImageNotFound"): ("absent",), ("snaprm", "ImageNotFound"): ("absent",)}.get((c.verb, c.error_type))


def violation_kind(text: str) -> str:
    """``(b) clone-without-row: ...`` -> ``(b)clone-without-row``."""
    match = re.match(r"(\(\w+\)) ([\w-]+)", text)
    return match.group(1) + match.group(2) if match else "other"


def stack_up(directory: Path, nodes: int, workers: int) -> None:
    proc = subprocess.run([str(STACK), "up", "--dir", str(directory), "--nodes", str(nodes), "--workers",
                           str(workers)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/bmi-stack up failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")


def stack_down(directory: Path) -> None:
    proc = subprocess.run([str(STACK), "down", "--dir", str(directory)], capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0:
        log(f"bmi-stack down failed: {proc.stderr[-2000:]}")


def run(minutes: float, seed: int, clients: int = 4, nodes: int = 8, workers: int = 2,
        emit: Callable[[str], None] = print) -> Result:
    """The whole chaos run on a fresh stack (always brought down); ``emit`` gets the report lines."""
    if clients < 4 or nodes < 8 or workers < 2:
        raise ValueError("a chaos run needs >= 4 clients, >= 8 nodes and >= 2 Einstein workers")
    directory = Path(tempfile.mkdtemp(prefix="bmi-chaos-"))
    result = Result()
    chaos: Chaos | None = None
    log(f"seed {seed}, {minutes} min, {clients} clients, {nodes} nodes, {workers} workers; stack in {directory}")
    violations: list[str] = []
    try:
        stack_up(directory, nodes, workers)
        chaos = Chaos(directory, seed, clients, minutes)
        chaos.setup()
        chaos.t0 = time.monotonic()
        chaos.run_load()
        log(f"load done after {time.monotonic() - chaos.t0:.0f}s ({len(chaos.calls)} calls); settling")
        violations += [f"(infra) fault-not-recovered: {e}" for e in chaos.fault_errors]
        violations += [f"(infra) settle: {p}" for p in chaos.settle()]
        violations += chaos.check()
    except Exception as exc:  # noqa: BLE001 - the run still ends with its summary line
        violations.append(f"(infra) aborted: {type(exc).__name__}: {str(exc)[-1500:]}")
    finally:
        if chaos is not None:
            chaos.resume_all()
            try:
                chaos.dump(directory / "logs" / "chaos-calls.jsonl")
            except OSError as exc:
                log(f"could not write the call log: {exc}")
        stack_down(directory)
        log(f"stack down; logs and chaos-calls.jsonl in {directory}.last-logs")
    result.violations = list(dict.fromkeys(violations))
    calls = chaos.calls if chaos is not None else []
    result.ops = len(calls)
    result.ok = sum(1 for c in calls if c.outcome == "ok")
    result.failed = result.ops - result.ok
    faults = chaos.faults if chaos is not None else []
    result.faults = dict(collections.Counter(k for k, _, d in faults if not d.startswith("FAILED")))
    by_verb = collections.Counter((c.verb, c.outcome) for c in calls)
    lines = [f"chaos: seed {seed} minutes {minutes} clients {clients} nodes {nodes} workers {workers}",
             "chaos: calls " + " ".join(f"{verb}:{outcome}={n}" for (verb, outcome), n in sorted(by_verb.items())),
             "chaos: faults by kind " + " ".join(f"{k}={result.faults.get(k, 0)}" for k in FAULT_KINDS)]
    kinds = collections.Counter(violation_kind(x) for x in result.violations)
    if kinds:
        lines.append("chaos: violations by kind " + " ".join(f"{k}={n}" for k, n in sorted(kinds.items())))
    lines += [f"chaos: violation {x}" for x in result.violations]
    lines.append(result.summary)
    result.lines = lines
    for line in lines:
        emit(line)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="how long the clients and faults run")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sigterm_unwinds()  # so the stack is still brought down
    result = run(args.minutes, args.seed, args.clients, args.nodes, args.workers,
                 emit=lambda line: print(line, flush=True))
    return 0 if not result.violations and result.fault_count > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

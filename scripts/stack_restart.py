"""`bmi-stack restart SERVICE`: stop one of the stack's daemons and start it again as `up` did.

SERVICE is one of

    picasso, hil-simulator
    einstein, einstein-hostK      host K's Einstein (``einstein`` = ``einstein-host1``), in host K's
                                  namespace with host K's config; back once its name server lists all
                                  its workers and its ``host`` row shows a (re)start after this
                                  restart began and a heartbeat after that start
    tgtd, tgtd-hostK              host K's tgtd, restarted as Debian's tgt.service does
                                  (``scripts/tgtd-dev debian-restart``: same control port, portal
                                  and namespace; the targets come back from BMI's conf files; a tgtd
                                  that died is started the same way); back once every target that
                                  has a conf file in the host's ``[iscsi] conf_dir`` is live again

A restarted Einstein must register again within ``[host] dead_after_seconds`` of its last heartbeat
(6 s in the stack), or another host takes its nodes over (safe, but not a plain restart): the
restart says so on stderr if that happened.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any


class UnknownService(ValueError):
    """A SERVICE argument naming no service of this stack (nothing was touched)."""


SERVICE_RE = re.compile(r"(picasso|hil-simulator|einstein|tgtd)(?:-host([1-9][0-9]?))?")

# Runs in the host's namespace with the host's own config: it sees what the host's Einstein sees
# (its name server on the host's address, the shared database).
_PROBE = r"""
import json, sys
from datetime import UTC, datetime
sys.path.insert(0, sys.argv[1])
import Pyro4.errors, Pyro4.naming
from sqlalchemy import create_engine, text
from ims.common import config
from ims.einstein.hosts import local_name
from ims.rpc.methods import NAME_PREFIX
from ims.rpc.server import configure_pyro

cfg = config.load(path=sys.argv[2])
configure_pyro()
out = {"expected": cfg.rpc.workers, "workers": 0, "host": None, "name": local_name(cfg)}
try:
    key = cfg.rpc.hmac_key.encode("utf-8") if cfg.rpc.hmac_key else None
    with Pyro4.naming.locateNS(cfg.rpc.name_server_ip, cfg.rpc.name_server_port, broadcast=False,
                               hmac_key=key) as ns:
        out["workers"] = len(ns.list(prefix=NAME_PREFIX))
except (Pyro4.errors.NamingError, Pyro4.errors.CommunicationError) as exc:
    out["error"] = str(exc)
engine = create_engine(cfg.db_url)
try:
    with engine.connect() as conn:
        row = conn.execute(text("select epoch, state, started_at, heartbeat_at, taken_over_at from host "
                                "where name = :n"), {"n": out["name"]}).first()
except Exception as exc:  # noqa: BLE001 - no host table yet: the caller waits
    row, out["db_error"] = None, str(exc)
finally:
    engine.dispose()

def ts(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()

if row is not None:
    out["host"] = {"epoch": row[0], "state": row[1], "started_at": ts(row[2]), "heartbeat_at": ts(row[3]),
                   "taken_over_at": ts(row[4])}
print(json.dumps(out))
"""

_WARM = r"""
import os, runpy, sys, time
sys.path.insert(0, sys.argv[1])
import ims.database.migrate, ims.einstein.operations, ims.rpc.server  # noqa: F401 - the slow part, done early
old = int(sys.argv[2])

def running(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

while running(old):  # its ports and its host row are the old process's until it exits
    time.sleep(0.02)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parse(service: str, net: dict | None) -> tuple[str, str]:
    """``(kind, host)`` for a SERVICE argument, e.g. ``("einstein", "host2")``; UnknownService if unknown."""
    m = SERVICE_RE.fullmatch(service)
    if not m:
        raise UnknownService(f"unknown service {service!r}: use einstein, einstein-hostK, tgtd, tgtd-hostK, "
                             "picasso or hil-simulator")
    kind, k = m.group(1), m.group(2)
    if k and kind in ("picasso", "hil-simulator"):
        raise UnknownService(f"{kind} runs once per stack, not per host: restart {kind}")
    host = f"host{k or 1}"
    hosts = sorted((net or {}).get("hosts", {"host1": {}}), key=lambda h: int(h[4:]))
    if host not in hosts:
        raise UnknownService(f"{service}: the stack has no {host} (its hosts: {', '.join(hosts)})")
    return kind, host


def pid_file(d: Path, host: str) -> Path:
    return d / "pids" / ("einstein.pid" if host == "host1" else f"einstein-{host}.pid")


def config_of(d: Path, host: str) -> Path:
    return d / ("bmiconfig.cfg" if host == "host1" else f"bmiconfig-{host}.cfg")


def tgt_dir(d: Path, host: str) -> Path:
    return d / ("tgt" if host == "host1" else f"tgt-{host}")


def probe(stack: Any, d: Path, host: str, netns: str | None) -> dict[str, Any]:
    argv = [stack.PY, "-c", _PROBE, str(stack.REPO), str(config_of(d, host))]
    argv = ["ip", "netns", "exec", netns, *argv] if netns else stack.nsx(argv)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    try:
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    return {"probe_error": (proc.stderr.strip() or proc.stdout.strip())[-500:]}


def wait_workers(stack: Any, d: Path, host: str, netns: str | None, timeout: float = 120.0) -> None:
    """Until ``host``'s name server lists every worker its config asks for.  `up` returns only then:
    Picasso answers as soon as ONE worker serves, and callers counting the workers (the chaos run's
    worker kills, its tests) must find them all."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = probe(stack, d, host, netns)
        if seen.get("workers", 0) >= seen.get("expected", 1):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{host}'s Einstein did not register all its workers within {timeout:.0f} s ({seen})")


def restart_einstein(stack: Any, d: Path, host: str, net: dict | None, env: dict[str, str]) -> None:
    netns = net["hosts"][host]["netns"] if net else None
    cfg = config_of(d, host)
    name = pid_file(d, host).stem
    began = time.time()
    argv = stack.service_argv("einstein", d, cfg=cfg)
    old = d / "pids" / f"{name}.old.pid"  # `down` stops every pids/*.pid: a failed restart leaks nothing
    if stack.alive(pid_file(d, host)) and argv[:2] == [stack.PY, str(stack.SCRIPTS / "einstein_server")]:
        # Warm start: the new interpreter loads BMI first and starts serving the moment the old process is
        # gone, so the host misses as few heartbeats as possible (over dead_after_seconds = taken over).
        pid_file(d, host).rename(old)
        argv = [stack.PY, "-c", _WARM, str(stack.REPO), old.read_text().strip(), *argv[1:]]
        stack.spawn(name, argv, d, dict(env, BMI_CONFIG=str(cfg)), netns=netns)
        stack.stop_pid(old)
    else:
        stack.stop_pid(pid_file(d, host))
        stack.spawn(name, argv, d, dict(env, BMI_CONFIG=str(cfg)), netns=netns)
    deadline = time.monotonic() + 120
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not stack.alive(pid_file(d, host)):
            break
        seen = probe(stack, d, host, netns)
        row = seen.get("host")
        # Every worker in the name server, and the host agent heart-beating after this (re)start.
        if seen.get("workers", 0) >= seen.get("expected", 1) and row and row["state"] == "up" and \
                row["started_at"] >= began and row["heartbeat_at"] > row["started_at"]:
            if row["taken_over_at"] and row["taken_over_at"] >= began:
                stack.log(f"WARNING: {host} was taken over by another host during the restart (it was gone "
                          "longer than [host] dead_after_seconds): its nodes now live elsewhere")
            return
        time.sleep(0.3)
    tail = (d / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{name} did not come back ({seen}):\n{tail}")


def wanted_targets(conf_dir: Path) -> set[str]:
    """The targets BMI keeps for this host: one conf file ``<clone>.conf`` each."""
    return {p.name[:-len(".conf")] for p in conf_dir.glob("*.conf") if not p.name.startswith(".")}


def live_targets(control_port: str) -> set[str] | None:
    proc = subprocess.run(["tgtadm", "-C", control_port, "--lld", "iscsi", "--op", "show", "--mode", "target"],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return None
    return {iqn.rpartition(":")[2] for iqn in re.findall(r"^Target \d+: (\S+)$", proc.stdout, re.M)}


def tgtd_running(tdir: Path, control_port: str) -> bool:
    """Is DIR/tgtd.pid a live tgtd on ``control_port`` (not a reused pid)?"""
    try:
        pid = int((tdir / "tgtd.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return comm == "tgtd" and b"-C" in argv and argv[argv.index(b"-C") + 1:][:1] == [control_port.encode()]


def start_stopped_tgtd(stack: Any, tdir: Path, conf_dir: Path) -> None:
    """The start half of Debian's tgt.service for a tgtd that died: the same control port, portal and
    namespace (DIR/env), then the targets from the conf files (scripts/tgtd-dev debian-restart's
    ExecStart and ExecStartPost)."""
    env = stack.read_env(tdir / "env")
    port, portal, netns = env["TGT_CONTROL_PORT"], env["TGT_PORTAL"], env.get("TGT_NETNS") or None
    for stale in (f"/var/run/tgtd/socket.{port}", f"/var/run/tgtd/socket.{port}.lock"):  # the dead one's
        Path(stale).unlink(missing_ok=True)
    argv = ["tgtd", "-f", "-C", port, "--iscsi", f"portal={portal}"]
    with open(tdir / "tgtd.log", "ab") as logf:  # `ip netns exec` execs: the pid is tgtd's own
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv] if netns else argv, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    (tdir / "tgtd.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    while live_targets(port) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (tdir / "tgtd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"tgtd did not start on control port {port}, portal {portal}:\n{tail}")
        time.sleep(0.1)
    (tdir / "targets.conf").write_text(f"# written by scripts/bmi-stack restart\ninclude {conf_dir}/*.conf\n")
    sysmode = ["tgtadm", "-C", port, "--op", "update", "--mode", "sys", "--name", "State", "-v"]
    for argv in ([*sysmode, "offline"], ["tgt-admin", "-C", port, "-e", "-c", str(tdir / "targets.conf")],
                 [*sysmode, "ready"]):
        # A conf file whose clone went away meanwhile fails tgt-admin for that target only (as in
        # tgtd-dev debian-restart): the caller's wait for the live targets decides.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            stack.log(f"{' '.join(argv[:4])}: {done.stderr.strip()[-500:]}")


def restart_tgtd(stack: Any, d: Path, host: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config_of(d, host))
    conf_dir = Path(parser.get("iscsi", "conf_dir"))
    tdir = tgt_dir(d, host)
    port = stack.read_env(tdir / "env")["TGT_CONTROL_PORT"]
    if tgtd_running(tdir, port):
        # tgtd-dev enters the daemon's namespace itself (TGT_NETNS in DIR/env); tgtadm needs none (unix socket).
        proc = subprocess.run([str(stack.SCRIPTS / "tgtd-dev"), "debian-restart", str(tdir), str(conf_dir)],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tgtd of {host} did not restart:\n{proc.stdout}\n{proc.stderr}")
    else:
        stack.log(f"tgtd of {host} is not running: starting it on its control port and portal")
        start_stopped_tgtd(stack, tdir, conf_dir)
    deadline = time.monotonic() + 120
    missing: set[str] = set()
    while time.monotonic() < deadline:
        live = live_targets(port)
        # re-read the conf dir each round: BMI may (de)provision meanwhile
        missing = wanted_targets(conf_dir) - live if live is not None else {"(tgtd not answering)"}
        if not missing:
            return
        time.sleep(0.5)
    raise RuntimeError(f"tgtd of {host} restarted but these targets are not live: {sorted(missing)}")


def restart(stack: Any, d: Path, service: str) -> None:
    """Stop ``service`` if it runs, start it again as `up` did (same config, same ports), wait until it answers."""
    if not (d / "env").exists() or not (d / "state").exists():
        raise RuntimeError(f"no stack in {d}: run `scripts/bmi-stack up` first")
    state = json.loads((d / "state").read_text())
    net = state.get("net")
    kind, host = parse(service, net)
    env_file = stack.read_env(d / "env")
    cfg = Path(env_file["BMI_CONFIG"])
    env = dict(os.environ, BMI_CONFIG=str(cfg), CEPH_CONF=env_file["CEPH_CONF"])
    if kind == "tgtd":
        restart_tgtd(stack, d, host)
    elif kind == "einstein":
        restart_einstein(stack, d, host, net, env)
        if host == "host1":  # Picasso's name server: a call through Picasso goes through too
            stack.wait_ready(dict(env, BMI_URL=env_file["BMI_URL"], HIL_USERNAME=stack.ADMIN[0],
                                  HIL_PASSWORD=stack.ADMIN[1]))
    elif kind == "hil-simulator":
        stack.stop_pid(d / "pids" / f"{kind}.pid")
        hil_ip = str(state.get("hil_ip") or "127.0.0.1")
        stack.spawn(kind, stack.service_argv(kind, d, hil_port=int(state["hil_port"]), hil_ip=hil_ip), d)
        stack.wait_http(f"http://{hil_ip}:{state['hil_port']}/v0/nodes/free", 30, kind, d)
    else:
        stack.stop_pid(d / "pids" / f"{kind}.pid")
        stack.spawn(kind, stack.service_argv(kind, d, cfg=cfg), d, env)
        stack.wait_http(env_file["BMI_URL"] + "/v1/openapi.json", 60, kind, d)
    stack.log(f"{service} restarted")

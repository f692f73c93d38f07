"""bmi-stack: a throwaway single-machine BMI ecosystem (the guide's section 2.2, done right).

    scripts/bmi-stack up [--boot] [--dir DIR]   start Ceph, tgtd, the HIL simulator, Einstein, Picasso
        [--workers N]                           Einstein worker processes (default 2)
        [--nodes N]                             at least N HIL nodes in project bmi_infra (adds node-01, ...)
        [--hosts N]                             N BMI hosts (docs/deployment.md), each in its own network
                                                namespace bmi-<id>-hostK with its own address on one bridge,
                                                its Einstein and its tgtd; Ceph, PostgreSQL, the HIL simulator
                                                and Picasso (which talks to host1) on the bridge's .1 address
                                                in the shared namespace (scripts/stack_hosts.py)
    scripts/bmi-stack status [--dir DIR]        show what runs
    scripts/bmi-stack down [--dir DIR]          stop exactly what `up` started
    scripts/bmi-stack env [--dir DIR]           print the path of the env file to `source`
    scripts/bmi-stack restart SERVICE [--dir DIR]
                                                stop (if running) and start again one of picasso, hil-simulator,
                                                einstein-hostK (K = 1..N; einstein = einstein-host1) or
                                                tgtd-hostK (tgtd = tgtd-host1; as Debian's tgt.service restarts:
                                                scripts/tgtd-dev debian-restart), with the same config, ports
                                                and namespace; returns once it answers (scripts/stack_restart.py;
                                                the HIL simulator's state is in memory: it restarts from the
                                                inventory)

With --boot the stack also creates a private boot network (a network namespace with a
bridge, dnsmasq for DHCP+TFTP) with tgtd's portal on that bridge, and nodes backed by
qemu VMs, so that a HIL power cycle really network-boots a node from its clone.

Everything lives in DIR (default: <repo>/run/stack): pid files, logs, the BMI config
(DIR/bmiconfig.cfg), the env file (DIR/env), the tftp root and the database.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:  # stack_hosts.py, also when this file is loaded by path (tests/unit)
    sys.path.insert(0, str(SCRIPTS))
import stack_hosts  # noqa: E402
import stack_restart  # noqa: E402
from stack_config import ADMIN, UID, free_port, inventory, read_env, read_env_ini, write_config  # noqa: E402,F401

TENANT = ("haas", "secret")


# In --boot mode the whole stack lives inside the boot network's namespace: tgtd there must reach
# Ceph on the namespace's loopback, and nothing of the stack binds an address outside it.
NETNS: str | None = None


def stack() -> SimpleNamespace:
    """This module's functions, for stack_hosts to call back (run, spawn, service_argv, ...); read at
    call time, so a caller that replaced one (benchmarks/bench.py: service_argv) is honoured."""
    return SimpleNamespace(**globals())


def nsx(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *argv] if NETNS else list(argv)


def log(msg: str) -> None:
    print(f"bmi-stack: {msg}", file=sys.stderr, flush=True)


def alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError):
        return False


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(nsx(list(argv)), capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def spawn(name: str, argv: list[str], d: Path, env: dict[str, str] | None = None, netns: str | None = None) -> int:
    """Start a service (in ``netns`` if given, else in the stack's namespace if it has one)."""
    logf = open(d / "logs" / f"{name}.log", "ab")
    argv = ["ip", "netns", "exec", netns, *argv] if netns else nsx(argv)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=str(REPO))
    (d / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


PROBE = ("import sys, urllib.error, urllib.request\n"
         "try:\n    urllib.request.urlopen(sys.argv[1], timeout=2)\n"
         "except urllib.error.HTTPError:\n    pass\n")


def answers(url: str) -> bool:
    """True once something answers HTTP at ``url`` (inside the stack's namespace if it has one)."""
    if NETNS:
        return subprocess.run(nsx([PY, "-c", PROBE, url]), capture_output=True).returncode == 0
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def wait_http(url: str, timeout: float, name: str, d: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(url):
            return
        if not alive(d / "pids" / f"{name}.pid"):
            break
        time.sleep(0.2)
    tail = (d / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{name} did not come up at {url}:\n{tail}")


def up(d: Path, boot_net: bool, http_boot: bool = False, workers: int = 2, nodes: int = 0,
       uefi_nodes: frozenset[str] = frozenset(), hosts: int = 1) -> None:
    if (d / "env").exists() and all(alive(p) for p in (d / "pids").glob("*.pid")) and \
            list((d / "pids").glob("*.pid")):
        log(f"already up (source {d / 'env'}); run `scripts/bmi-stack down` first to start afresh")
        return
    if (d / "pids").exists():
        log("a previous stack left pieces behind; stopping them first")
        down(d)
    for sub in ("pids", "logs", "consoles", "vms"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {"boot": boot_net, "http_boot": http_boot, "netns": None}

    def save() -> None:
        (d / "state").write_text(json.dumps(state))

    save()
    http_boot_port = free_port() if http_boot else None
    global NETNS
    try:
        t0 = time.monotonic()
        boot = None
        net = None
        if boot_net:
            log("starting the boot network (netns, bridge, dnsmasq)")
            bootnet_env = dict(os.environ)
            if http_boot_port:
                bootnet_env["BOOTNET_HTTP_BOOT_PORT"] = str(http_boot_port)
            run(str(SCRIPTS / "bootnet"), "up", str(d / "bootnet"), env=bootnet_env)
            boot = read_env(d / "bootnet" / "env")
            NETNS = boot["BOOTNET_NETNS"]
            state["netns"] = NETNS
        if hosts > 1:
            net = stack_hosts.plan(d, hosts, boot)
            state["net"] = net
            NETNS = state["netns"] = net["shared_ns"]
            log(f"making {hosts} host namespaces on {net['bridge']} in {net['shared_ns']} ({net['subnet']})")
            stack_hosts.make(net, save)
            save()
        log("starting a throwaway Ceph cluster")
        ceph_env = dict(os.environ, CEPH_BIND_IP=net["shared_ip"]) if net else None
        ceph_conf = run(str(SCRIPTS / "ceph-dev"), "start", str(d / "ceph"), env=ceph_env).strip().splitlines()[-1]
        db_url = None
        if net:
            log("starting PostgreSQL")
            db_url = stack_hosts.start_database(stack(), d, net)
        log("starting tgtd")
        if net:
            tgt = stack_hosts.start_tgtd(stack(), d, net, "host1")
        else:
            tgt_env = dict(os.environ)
            portal_ip = "127.0.0.1"
            if boot:
                tgt_env["TGT_NETNS"] = boot["BOOTNET_NETNS"]
                portal_ip = boot["BOOTNET_IP"]
            run(str(SCRIPTS / "tgtd-dev"), "start", str(d / "tgt"), portal_ip, env=tgt_env)
            tgt = read_env(d / "tgt" / "env")
        log("starting the HIL simulator")
        inv_path = d / "hil-inventory.json"
        inv_path.write_text(json.dumps(inventory(boot, d, nodes, uefi_nodes), indent=1))
        hil_port = free_port()
        hil_ip = net["shared_ip"] if net else "127.0.0.1"
        state.update(hil_port=hil_port, hil_ip=hil_ip)
        save()
        spawn("hil-simulator", service_argv("hil-simulator", d, hil_port=hil_port, hil_ip=hil_ip), d)
        hil_url = f"http://{hil_ip}:{hil_port}"
        wait_http(hil_url + "/v0/nodes/free", 30, "hil-simulator", d)
        cfg = write_config(d, ceph_conf, tgt, hil_url, boot, http_boot_port, workers, net, db_url)
        if hosts > 1:  # several hosts (docs/deployment.md): this first one is host1
            with open(cfg, "a", encoding="utf-8") as fh:
                fh.write("\n[host]\nname = host1\nheartbeat_seconds = 1.0\ndead_after_seconds = 6.0\n")
        env = dict(os.environ, BMI_CONFIG=str(cfg), CEPH_CONF=ceph_conf)
        log("starting Einstein and Picasso")
        spawn("einstein", service_argv("einstein", d, cfg=cfg), d, env,
              netns=net["hosts"]["host1"]["netns"] if net else None)
        if net:
            stack_hosts.start_extra_hosts(stack(), d, cfg, net, env)
        spawn("picasso", service_argv("picasso", d, cfg=cfg), d, env)
        rest = read_env_ini(cfg)
        url = f"http://{net['shared_ip'] if net else '127.0.0.1'}:{rest}"
        wait_http(url + "/v1/openapi.json", 60, "picasso", d)
        env_lines = [
            f"export BMI_CONFIG={cfg}", f"export CEPH_CONF={ceph_conf}", f"export BMI_URL={url}",
            f"export HIL_USERNAME={TENANT[0]}", f"export HIL_PASSWORD={TENANT[1]}",
            f"export HIL_ENDPOINT={hil_url}", f"export BMI_STACK_DIR={d}",
            f"export PATH={REPO / '.venv' / 'bin'}:$PATH",
        ]
        if boot:
            env_lines += [f"export {k}={v}" for k, v in boot.items()]
        if net:
            env_lines += [f"export BMI_HOSTS={hosts}", f"export BMI_DB_URL={db_url}",
                          f"export BMI_PG_SOCKET_DIR={d / 'pg' / 'run'}",
                          f"export BMI_SHARED_IP={net['shared_ip']}", f"export BMI_SUBNET={net['subnet']}"]
            for name, host in net["hosts"].items():
                key = name.upper()
                env_lines += [f"export BMI_{key}_NETNS={host['netns']}", f"export BMI_{key}_IP={host['ip']}"]
        if NETNS:
            env_lines += [f"export BMI_NETNS={NETNS}",
                          "# The stack lives in the boot network's namespace: run its clients there." if boot else
                          "# The stack's shared services live in a private network namespace: run its clients there.",
                          f'bmi() {{ ip netns exec {NETNS} {REPO / ".venv" / "bin" / "bmi"} "$@"; }}',
                          f'rbd() {{ ip netns exec {NETNS} rbd "$@"; }}',
                          hil_helper(NETNS)]
        (d / "env").write_text("\n".join(env_lines) + "\n")
        # The admin registers the guide's project in BMI (the original did this with sqlite3 by hand).
        admin_env = dict(env, BMI_URL=url, HIL_USERNAME=ADMIN[0], HIL_PASSWORD=ADMIN[1])
        wait_ready(admin_env)
        run(str(REPO / ".venv" / "bin" / "bmi"), "project", "create", "bmi_infra", "bmi_network", env=admin_env)
        run(str(REPO / ".venv" / "bin" / "bmi"), "project", "create", "other_project", env=admin_env)
        for name, host in (net["hosts"].items() if net else [("host1", {})]):
            stack_restart.wait_workers(stack(), d, name, host.get("netns"))
        log(f"up in {time.monotonic() - t0:.1f}s; now: source {d / 'env'}")
    except BaseException:
        log("start-up failed; stopping what was started")
        down(d)
        raise


def hil_helper(netns: str | None) -> str:
    """The env file's ``hil`` shell function: curl to HIL as the user of the env file.

    ``-L`` follows redirects: real HIL answers power actions with a 307 to obmd, which curl re-sends
    with the same method and body.  curl sends ``-u`` credentials on only to the same host and port
    (no ``--location-trusted``), so the HIL password never reaches obmd (its URL carries a token).
    """
    prefix = f"ip netns exec {netns} " if netns else ""
    return (f'hil() {{ {prefix}curl -s -L --max-redirs 5 -H "Content-Type: application/json" '
            '-u "$HIL_USERNAME:$HIL_PASSWORD" "$@"; }')


def service_argv(name: str, d: Path, cfg: Path | None = None, hil_port: int | None = None,
                 hil_ip: str = "127.0.0.1") -> list[str]:
    """How `up` (and `restart`) start each of the stack's Python services."""
    if name == "hil-simulator":
        return [PY, str(SCRIPTS / "hil-simulator"), "--inventory", str(d / "hil-inventory.json"),
                "--port", str(hil_port)] + (["--host", hil_ip] if hil_ip != "127.0.0.1" else [])
    script = {"einstein": "einstein_server", "picasso": "picasso_server"}[name]
    return [PY, str(SCRIPTS / script), "--config", str(cfg)]


def restart(d: Path, service: str) -> None:
    """`restart SERVICE` (scripts/stack_restart.py), in the stack's namespace if it has one."""
    if not (d / "state").exists():
        raise RuntimeError(f"no stack in {d}: run `scripts/bmi-stack up` first")
    global NETNS
    NETNS = json.loads((d / "state").read_text()).get("netns")
    stack_restart.restart(stack(), d, service)


def wait_ready(env: dict[str, str]) -> None:
    """Einstein's workers register a moment after Picasso answers: wait until a call goes through."""
    deadline = time.monotonic() + 60
    while True:
        proc = subprocess.run(nsx([str(REPO / ".venv" / "bin" / "bmi"), "project", "ls"]), capture_output=True,
                              text=True, env=env)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"BMI did not become ready: {proc.stderr}")
        time.sleep(0.3)


def stop_pid(pid_file: Path, timeout: float = 20) -> None:
    if not alive(pid_file):
        pid_file.unlink(missing_ok=True)
        return
    pid = int(pid_file.read_text())
    # As systemd's KillMode=mixed (deploy/systemd): SIGTERM to the main process only, which drains its
    # own workers; a SIGTERM to the whole group would also kill the commands (tgtadm, rbd) that the
    # operations being drained are running.  The group gets SIGKILL only if it outlives the timeout.
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while alive(pid_file) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Whatever of the group is still there now (the main process if it did not stop, or children it
    # left, e.g. the HIL simulator's VMs) gets SIGTERM, then SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    pid_file.unlink(missing_ok=True)


def down(d: Path) -> None:
    if not d.exists():
        log("nothing to stop")
        return
    try:
        net = json.loads((d / "state").read_text()).get("net")
    except (OSError, ValueError):
        net = None
    for name in ("picasso", "einstein", "hil-simulator"):
        stop_pid(d / "pids" / f"{name}.pid")
    for leftover in sorted((d / "pids").glob("einstein-host*.pid")) if (d / "pids").exists() else []:
        stop_pid(leftover)
    for tgt_dir in [d / "tgt", *sorted(d.glob("tgt-host*"))]:
        if tgt_dir.exists():
            subprocess.run([str(SCRIPTS / "tgtd-dev"), "stop", str(tgt_dir)], check=False)
    if (d / "pg").exists():
        subprocess.run([str(SCRIPTS / "pg-dev"), "stop", str(d / "pg"), "--purge"], check=False)
    if (d / "ceph").exists():
        subprocess.run([str(SCRIPTS / "ceph-dev"), "stop", str(d / "ceph"), "--purge"], check=False)
    for leftover in (d / "pids").glob("*.pid") if (d / "pids").exists() else []:
        stop_pid(leftover)
    if net:  # the hosts' veths go before the bridge's namespace (the boot network's, or ours)
        stack_hosts.remove_hosts(net, log)
    if (d / "bootnet").exists():
        subprocess.run([str(SCRIPTS / "bootnet"), "down", str(d / "bootnet")], check=False)
    if net:
        stack_hosts.remove_shared(net, log)
    keep = d.parent / (d.name + ".last-logs")
    shutil.rmtree(keep, ignore_errors=True)
    if (d / "logs").exists():
        shutil.copytree(d / "logs", keep, dirs_exist_ok=True)
    shutil.rmtree(d, ignore_errors=True)
    log(f"down (logs kept in {keep})")


def status(d: Path) -> int:
    if not (d / "pids").exists():
        print("stack: down")
        return 3
    ok = True
    for pid_file in sorted((d / "pids").glob("*.pid")):
        state = "running" if alive(pid_file) else "DEAD"
        ok &= state == "running"
        print(f"{pid_file.stem:15s} {state} (pid {pid_file.read_text().strip()})")
    extra = [(f"tgtd-{p.name[4:]}", p.name) for p in sorted(d.glob("tgt-host*"))]
    for name, sub in (("ceph", "ceph/pids"), ("tgtd", "tgt"), *extra):
        for pid_file in sorted((d / sub).glob("*.pid")):
            state = "running" if alive(pid_file) else "DEAD"
            ok &= state == "running"
            print(f"{name + ':' + pid_file.stem:15s} {state}")
    try:
        net = json.loads((d / "state").read_text()).get("net")
    except (OSError, ValueError):
        net = None
    ok &= stack_hosts.status(stack(), d, net)
    if (d / "env").exists():
        print(f"env: source {d / 'env'}")
    print(f"logs: {d / 'logs'}" + (f"; node consoles: {d / 'consoles'}" if (d / "consoles").exists() else ""))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="bmi-stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "env", "restart"])
    parser.add_argument("service", nargs="?", help="for restart: einstein[-hostK], tgtd[-hostK], picasso or "
                        "hil-simulator")
    parser.add_argument("--dir", default=os.environ.get("BMI_STACK_DIR", str(REPO / "run" / "stack")))
    parser.add_argument("--boot", action="store_true", help="also start the boot network and qemu-backed nodes")
    parser.add_argument("--http-boot", action="store_true",
                        help="with --boot: nodes chain to BMI's HTTP boot endpoint; no per-node TFTP files")
    parser.add_argument("--workers", type=int, default=2, help="Einstein worker processes (default 2)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="at least this many HIL nodes in project bmi_infra (extra ones are node-01, ...)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="BMI hosts, each with its own Einstein and tgtd (default 1; docs/deployment.md)")
    parser.add_argument("--uefi", default="", metavar="NODES",
                        help="with --boot: these nodes (comma list, or 'all') boot with UEFI firmware (OVMF)")
    args = parser.parse_args()
    uefi = frozenset({"*"} if args.uefi == "all" else {n for n in args.uefi.split(",") if n})
    d = Path(args.dir).resolve()
    if (args.service is None) == (args.command == "restart"):
        parser.error("restart needs a SERVICE (einstein[-hostK], tgtd[-hostK], picasso, hil-simulator); "
                     "other commands take none")
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    if args.command == "restart":
        try:
            restart(d, args.service)
        except stack_restart.UnknownService as exc:  # an unknown service or host: nothing was touched
            parser.error(str(exc))
        except RuntimeError as exc:  # no stack, or the service did not come back (its log's tail is in exc)
            log(f"restart {args.service} failed: {exc}")
            return 1
        return 0
    if args.command == "up":
        if not 1 <= args.hosts <= 50:
            parser.error("--hosts must be 1-50")
        up(d, args.boot or args.http_boot, args.http_boot, args.workers, args.nodes, uefi, args.hosts)
        print(d / "env")
        return 0
    if args.command == "down":
        down(d)
        return 0
    if args.command == "env":
        print(d / "env")
        return 0 if (d / "env").exists() else 3
    return status(d)


if __name__ == "__main__":
    sys.exit(main())

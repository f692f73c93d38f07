"""BMI installed as a service: scripts/install-service into a throwaway root (never this machine's /),
`systemd-analyze verify` of the installed units, and the units' own ExecStartPre/ExecStart lines run
with the installed example config (its site values pointed at a real stack: Ceph, tgtd, the HIL
simulator) — then the user's workflow through that Picasso, bmi-manage, and a clean SIGTERM stop."""
from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.stack import REPO, Stack, running_stack

INSTALL = str(REPO / "scripts" / "install-service")
UNITS = ("bmi-einstein.service", "bmi-picasso.service")
ADMIN = ("haasadmin", "admin1234")
TENANT = ("haas", "secret")
UID = "998877"  # not the stack's own uid: this BMI's images and targets are told apart from the stack's
# The PATH systemd gives services: nothing of the checkout or its .venv.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="bmi-install-root-"))
    proc = subprocess.run([INSTALL, "--root", str(directory)], capture_output=True, text=True, timeout=900,
                          check=False)
    try:
        assert proc.returncode == 0, f"install-service failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def unit(root: Path, name: str) -> dict[str, list[str]]:
    """The [Service] lines of an installed unit: key -> values in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = None
    for line in (root / "etc" / "systemd" / "system" / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def in_root(root: Path, argv: list[str]) -> list[str]:
    """A unit's command line with its absolute paths (the venv, the config) taken inside ``root``."""
    return [str(root) + a if a.startswith("/") and (root / a.lstrip("/")).exists() else a for a in argv]


def test_installed_tree(root: Path) -> None:
    config = root / "etc" / "bmi" / "bmiconfig.cfg"
    assert config.stat().st_mode & 0o777 == 0o640  # it holds the HMAC key
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    assert len(parser.get("rpc", "hmac_key")) == 64 and "CHANGE-ME" not in parser.get("rpc", "hmac_key")
    for tool in ("bmi", "bmi-einstein", "bmi-picasso", "bmi-manage"):
        assert os.access(root / "opt" / "bmi" / "venv" / "bin" / tool, os.X_OK), tool
    site = next((root / "opt" / "bmi" / "venv" / "lib").glob("python3*/site-packages"))
    assert (site / "ims" / "templates" / "ipxe.temp").exists()
    assert not (site / "hilsim").exists() and not (site / "ims" / "hilsim").exists() and not (site / "tests").exists()
    # not editable: the installed copy runs, not this checkout
    out = subprocess.run([str(root / "opt/bmi/venv/bin/python"), "-c", "import ims, rados, rbd; print(ims.__file__)"],
                         capture_output=True, text=True, check=True, cwd="/", timeout=60).stdout
    assert out.startswith(str(site))
    # a second run upgrades in place and keeps the operator's config
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    again = subprocess.run([INSTALL, "--root", str(root)], capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert config.read_text().endswith("# edited by the operator\n")


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "root"
    target.mkdir()
    proc = subprocess.run([INSTALL, "--dry-run", "--root", str(target)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert list(target.iterdir()) == []
    plan = proc.stdout
    for step in ("-m venv", "pip install", "bmiconfig.cfg (mode 640)", "bmi-einstein.service", "bmi-picasso.service",
                 "mkdir -p -m 2770", "skip systemctl"):
        assert step in plan, step
    assert all(line.startswith(("would: ", "install-service: ")) for line in plan.splitlines()), plan


def test_units_pass_systemd_analyze_verify(root: Path, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: run scripts/install-deps (Debian's systemd)"
    # verify --root needs the host's own units (targets the services are ordered after) in that root
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", dirs_exist_ok=True,
                    symlinks=True)
    paths = [f"/etc/systemd/system/{u}" for u in UNITS]
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *paths], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr
    for name in UNITS:  # the sandbox is real: systemd's own exposure rating stays "OK" (below 4 of 10)
        sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--threshold=40",
                              f"/etc/systemd/system/{name}"], capture_output=True, text=True, timeout=120,
                             check=False)
        assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr
    # the check is not blind: a misspelt key is reported
    broken = root / "etc" / "systemd" / "system" / "bmi-broken.service"
    good = (root / "etc/systemd/system/bmi-picasso.service").read_text()
    broken.write_text(good.replace("ProtectHome", "ProtectHom"))
    try:
        proc = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/bmi-broken.service"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert "Unknown key" in proc.stderr
    finally:
        broken.unlink()
    picasso, einstein = unit(root, "bmi-picasso.service"), unit(root, "bmi-einstein.service")
    assert picasso["User"] == ["bmi"] and picasso["CapabilityBoundingSet"] == [""]
    assert einstein["User"] == ["root"] and "-/run/tgtd" in " ".join(einstein["ReadWritePaths"])
    assert picasso["Restart"] == einstein["Restart"] == ["on-failure"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_config(root: Path, stack: Stack) -> Path:
    """The installed example config with its site-specific values pointed at the stack, paths in ``root``."""
    theirs = configparser.ConfigParser(interpolation=None)
    theirs.read(stack.env["BMI_CONFIG"])
    path = root / "etc" / "bmi" / "bmiconfig.cfg"
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(path)
    values = {
        ("bmi", "uid"): UID, ("bmi", "admin_users"): ADMIN[0],
        ("db", "path"): f"{root}/var/lib/bmi/bmi.db",
        ("fs", "conf_file"): theirs.get("fs", "conf_file"), ("fs", "keyring"): theirs.get("fs", "keyring"),
        ("iscsi", "ip"): theirs.get("iscsi", "ip"), ("iscsi", "port"): theirs.get("iscsi", "port"),
        ("iscsi", "control_port"): theirs.get("iscsi", "control_port"),
        ("iscsi", "conf_dir"): f"{root}/etc/tgt/conf.d",
        ("net_isolator", "url"): theirs.get("net_isolator", "url"),
        ("net_isolator", "service_username"): ADMIN[0], ("net_isolator", "service_password"): ADMIN[1],
        ("rpc", "name_server_port"): str(_free_port()), ("rpc", "rpc_server_port"): str(_free_port()),
        ("tftp", "pxelinux_path"): f"{root}/var/lib/tftpboot/pxelinux.cfg",
        ("tftp", "ipxe_path"): f"{root}/var/lib/tftpboot", ("tftp", "leases_file"): f"{root}/dnsmasq.leases",
        ("rest_api", "port"): str(_free_port()), ("logs", "path"): f"{root}/var/log/bmi",
    }
    for (section, key), value in values.items():
        cfg.set(section, key, value)
    with path.open("w") as fh:
        cfg.write(fh)
    return path


def _wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the service exited with {proc.returncode}"
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer in {seconds} s")


def test_unit_command_lines_serve_a_real_stack(root: Path) -> None:
    with running_stack() as stack:
        cfg_path = _site_config(root, stack)
        cfg = configparser.ConfigParser(interpolation=None)
        cfg.read(cfg_path)
        einstein, picasso = unit(root, "bmi-einstein.service"), unit(root, "bmi-picasso.service")
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
        for assignment in einstein["Environment"]:
            key, _, value = assignment.partition("=")
            env[key] = in_root(root, [value])[0]
        assert env["BMI_CONFIG"] == str(cfg_path)
        manage = [str(root / "opt/bmi/venv/bin/bmi-manage"), "--config", str(cfg_path)]
        procs: list[subprocess.Popen[bytes]] = []
        logs = root / "var" / "log" / "bmi"
        try:
            for pre in einstein["ExecStartPre"]:  # bmi-manage db upgrade
                subprocess.run(in_root(root, pre.split()), env=env, check=True, timeout=120)
            with sqlite3.connect(root / "var/lib/bmi/bmi.db") as db:
                tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
            assert {"project", "image"} <= tables, tables
            for service in (einstein, picasso):
                argv = in_root(root, service["ExecStart"][0].split())
                procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              cwd="/"))
            url = f"http://127.0.0.1:{cfg.get('rest_api', 'port')}"
            _wait_http(url + "/v1/openapi.json", procs[1])
            bmi_env = dict(stack.env, BMI_URL=url, HIL_USERNAME=ADMIN[0], HIL_PASSWORD=ADMIN[1])
            bmi = str(root / "opt/bmi/venv/bin/bmi")

            def run(*args: str, user: tuple[str, str] = TENANT) -> str:
                e = dict(bmi_env, HIL_USERNAME=user[0], HIL_PASSWORD=user[1])
                p = subprocess.run([bmi, *args], env=e, capture_output=True, text=True, timeout=300, check=False)
                assert p.returncode == 0, f"bmi {' '.join(args)}: {p.stderr}"
                return p.stdout

            deadline = time.monotonic() + 90  # the workers register with the name server after Picasso answers
            while requests.get(f"{url}/v1/projects", auth=ADMIN, timeout=30).status_code == 503:
                assert time.monotonic() < deadline and procs[0].poll() is None, "Einstein did not become ready"
                time.sleep(0.3)
            run("project", "create", "bmi_infra", "bmi_network", user=ADMIN)
            stack.rbd("create", "svc-img", "--size", "1", "--image-format", "2")
            assert run("import", "bmi_infra", "svc-img") == "Success\n"
            assert "svc-img" in run("ls", "bmi_infra")
            assert run("pro", "bmi_infra", "bmi_node", "svc-img", "bmi_network", "bmi_port") == "Success\n"
            assert any(f"{UID}img" in t for t in stack.targets())  # this Einstein drove the stack's tgtd
            assert (root / "var/lib/tftpboot/bmi_node.ipxe").exists()
            # the legacy API of the installed service answers errors in plain text
            again = requests.put(f"{url}/provision/", auth=TENANT, timeout=300, data={
                "project": "bmi_infra", "node": "bmi_node", "img": "svc-img", "network": "bmi_network",
                "nic": "bmi_port"})
            assert again.status_code == 409 and again.headers["Content-Type"].startswith("text/plain")
            assert "already provisioned" in again.text
            assert run("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port") == "Success\n"
            assert run("rm", "bmi_infra", "svc-img") == "Success\n"
            assert not any(f"{UID}img" in t for t in stack.targets())

            # bmi-manage on the running service: reconcile finds nothing to repair; recover refuses
            admin_env = dict(env, HIL_USERNAME=ADMIN[0], HIL_PASSWORD=ADMIN[1])
            rec = subprocess.run([*manage, "reconcile"], env=admin_env, capture_output=True, text=True,
                                 timeout=300, check=False)
            assert rec.returncode == 0, rec.stderr
            report = json.loads(rec.stdout)
            assert report["repaired"] is False
            assert all(report[k] == [] for k in ("images_without_row", "rows_without_image", "targets_without_row",
                                                 "missing_targets", "missing_boot_files", "unfinished_operations"))
            refused = subprocess.run([*manage, "recover"], env=env, capture_output=True, text=True, timeout=120,
                                     check=False)
            assert refused.returncode == 1 and "Einstein is running" in refused.stderr

            # stop as systemd does (KillMode=mixed: SIGTERM to the main process): both drain and exit 0
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(150) == 0
            assert "Picasso stopped" in (logs / "picasso.log").read_text()
            assert "einstein stopped" in (logs / "ims.log").read_text()
            done = subprocess.run([*manage, "recover"], env=env, capture_output=True, text=True, timeout=300,
                                  check=False)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["restored_targets"] == 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            subprocess.run([*stack.nsx, "rbd", "rm", "svc-img"], env=stack.env, capture_output=True, check=False,
                           timeout=120)

"""bmi-stack's files: the HIL inventory, host1's BMI config, and reading env/config files back."""
from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UID = "112233445566778899"
ADMIN = ("haasadmin", "admin1234")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inventory(boot: dict[str, str] | None, d: Path, nodes: int = 0, uefi_nodes: frozenset[str] = frozenset()) -> dict:
    """The guide's HIL objects (project bmi_infra, node bmi_node/bmi_port, network bmi_network) and a few more.

    With ``nodes`` > 0, project bmi_infra gets extra nodes ``node-01``, ... (one NIC ``eth0`` each) until it
    has at least that many (for load and chaos runs).  With a boot network, nodes named in
    ``uefi_nodes`` (or all, for ``{"*"}``) run OVMF instead of SeaBIOS.
    """
    inv = json.loads((REPO / "config" / "hil-inventory.example.json").read_text())
    have = sum(1 for n in inv["nodes"] if n["project"] == "bmi_infra")
    for i in range(1, max(0, nodes - have) + 1):
        inv["nodes"].append({"name": f"node-{i:02d}", "project": "bmi_infra",
                             "nics": [{"label": "eth0", "macaddr": f"52:54:00:00:10:{i:02x}"}]})
    if boot:
        for node in (n for n in inv["nodes"] if n["project"] == "bmi_infra"):
            node["vm"] = {"netns": boot["BOOTNET_NETNS"], "bridge": boot["BOOTNET_BRIDGE"],
                          "console_log": str(d / "consoles" / f"{node['name']}.log"),
                          "workdir": str(d / "vms" / node["name"])}
            if uefi_nodes:  # else the simulator's BMI_VM_FIRMWARE (default SeaBIOS) decides
                node["vm"]["firmware"] = "uefi" if "*" in uefi_nodes or node["name"] in uefi_nodes else "bios"
    return inv


def write_config(d: Path, ceph_conf: str, tgt: dict[str, str], hil_url: str, boot: dict[str, str] | None,
                 http_boot_port: int | None = None, workers: int = 2, net: dict | None = None,
                 db_url: str | None = None) -> Path:
    """host1's config (the only one without --hosts).  With ``net`` (--hosts N): Picasso's REST API on
    the shared bridge address, the RPC name server on host1's address, the database at ``db_url``."""
    rest_ip = net["shared_ip"] if net else "127.0.0.1"
    rpc_ip = net["hosts"]["host1"]["ip"] if net else "127.0.0.1"
    db_line = f"url = {db_url}" if db_url else f"path = {d}/bmi.db"
    portal_ip, _, portal_port = tgt["TGT_PORTAL"].rpartition(":")
    tftp = Path(boot["BOOTNET_TFTP_ROOT"]) if boot else d / "tftp"
    (tftp / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    ns_port, rpc_port, rest_port = free_port(), free_port(), free_port()
    leases = boot["BOOTNET_LEASES"] if boot else str(d / "dnsmasq.leases")
    cfg = f"""# Written by scripts/bmi-stack for a throwaway stack; see docs/configuration.md
[bmi]
uid = {UID}
snapshot = snapshot
admin_users = {ADMIN[0]}

[db]
{db_line}

[fs]
driver = ceph
pool = rbd
id = admin
conf_file = {ceph_conf}
keyring = {Path(ceph_conf).parent / 'keyring'}

[iscsi]
ip = {portal_ip}
port = {portal_port}
conf_dir = {d}/tgt-conf.d
control_port = {tgt['TGT_CONTROL_PORT']}

[net_isolator]
url = {hil_url}
# HIL account journal recovery uses to undo a dead worker's network changes
service_username = {ADMIN[0]}
service_password = {ADMIN[1]}

[rpc]
name_server_ip = {rpc_ip}
name_server_port = {ns_port}
rpc_server_ip = {rpc_ip}
rpc_server_port = {rpc_port}
workers = {workers}
hmac_key = {secrets.token_hex(32)}

[tftp]
boot_mode = {"http" if http_boot_port else "tftp"}
pxelinux_path = {tftp}/pxelinux.cfg
ipxe_path = {tftp}
leases_file = {leases}

[boot_http]
ip = {boot["BOOTNET_IP"] if http_boot_port and boot else ""}
port = {http_boot_port or 8080}

[rest_api]
ip = {rest_ip}
port = {rest_port}

[logs]
path = {d}/logs
debug = false
"""
    (d / "tgt-conf.d").mkdir(exist_ok=True)
    path = d / "bmiconfig.cfg"
    path.write_text(cfg)
    path.chmod(0o600)  # holds the RPC key
    return path


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):]
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v.strip().strip('"').strip("'")
    return out


def read_env_ini(cfg: Path) -> str:
    import configparser

    p = configparser.ConfigParser(interpolation=None)
    p.read(cfg)
    return p.get("rest_api", "port")

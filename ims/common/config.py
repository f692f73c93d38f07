"""BMI configuration: INI file as the original (``BMI_CONFIG`` or /etc/bmi/bmiconfig.cfg).

Sections ``[bmi] [db] [fs] [iscsi] [net_isolator] [rpc] [tftp] [rest_api] [logs]``.
Every key has a default except the site-specific ones (``[bmi] uid``,
``[net_isolator] url``, ``[iscsi] ip``).  Path keys do not need a trailing ``/``.
A missing or invalid value raises :class:`ConfigError` naming file, section and key.
"""
from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from typing import Any

from ims.common.errors import ConfigError

DEFAULT_LOCATION = "/etc/bmi/bmiconfig.cfg"
ENV_VAR = "BMI_CONFIG"

_REQUIRED = object()

# section -> key -> (type, default).  type is one of str, int, float, bool, "list", "path".
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "bmi": {
        "uid": (str, _REQUIRED),
        "snapshot": (str, "snapshot"),
        "service": (bool, False),
        "admin_users": ("list", []),
        # Regex (full match) of storage names tenants may import; empty = any name outside
        # BMI's own namespace (<uid>img...), which is always refused.
        "import_pattern": (str, ""),
        # Background flatten (ims/einstein/flatten.py): copies deeper than this many clone links, or
        # of at most this many bytes, are flattened inside the operation; job queue poll interval.
        "max_clone_depth": (int, 6),
        "flatten_sync_max_bytes": (int, 64 << 20),
        "flatten_poll_seconds": (float, 1.0),
    },
    "db": {
        # ``url`` wins; ``path`` is the original's key (an SQLite file).
        "url": (str, ""),
        "path": ("path", "/var/lib/bmi/bmi.db"),
        "busy_timeout_ms": (int, 30000),
    },
    "fs": {
        "driver": (str, "ceph"),
        "id": (str, "admin"),
        "pool": (str, "rbd"),
        "conf_file": ("path", "/etc/ceph/ceph.conf"),
        "keyring": ("path", ""),
        "path": ("path", "/var/lib/bmi/images"),  # file driver
    },
    "iscsi": {
        "driver": (str, "tgt"),
        "ip": (str, _REQUIRED),
        "port": (int, 3260),
        "lun": (int, 1),
        "iqn_prefix": (str, "iqn.2017-10.org.moc.bmi:"),
        "initiator_iqn_prefix": (str, "iqn.2017-10.org.moc.bmi.node:"),
        # "node": bind each target to its node's own initiator name (set in the node's
        # iPXE script); "ALL": any initiator; else a comma list of addresses/CIDRs.
        "initiator_address": (str, "node"),
        # CHAP: each node's target gets a random secret (tgt incominguser) that only the node's
        # boot script carries; a login without it is refused.  Applies to targets made while on.
        "chap": (bool, True),
        # Several hosts: the node's iPXE script names its gateway AND the host a take-over would
        # move it to (sanboot URI1 URI2).  Off by default: docs/deployment.md "Open problem".
        "multipath_boot": (bool, False),
        "conf_dir": ("path", "/etc/tgt/conf.d"),
        "control_port": (int, 0),
        "tgtadm": (str, "tgtadm"),
        "control": (str, "socket"),
        "timeout": (float, 30.0),
    },
    "net_isolator": {
        "driver": (str, "hil"),
        "url": (str, _REQUIRED),
        "timeout": (float, 10.0),
        "action_timeout": (float, 60.0),
        "channel": (str, "vlan/native"),
        "auth_cache_seconds": (float, 30.0),
        # HIL account journal recovery uses to undo/finish network changes of a dead worker's
        # operations (never logged); empty = recovery leaves such changes as notes.
        "service_username": (str, ""),
        "service_password": (str, ""),
    },
    "rpc": {
        "name_server_ip": (str, "127.0.0.1"),
        "name_server_port": (int, 10000),
        "rpc_server_ip": (str, "127.0.0.1"),
        "rpc_server_port": (int, 10001),
        "workers": (int, 2),
        "hmac_key": (str, ""),
        "insecure": (bool, False),
        "timeout": (float, 600.0),
        "drain_seconds": (float, 60.0),
    },
    "tftp": {
        "pxelinux_path": ("path", "/var/lib/tftpboot/pxelinux.cfg"),
        "ipxe_path": ("path", "/var/lib/tftpboot"),
        "boot_interface": (str, "net0"),
        # "tftp": per-node PXELINUX + iPXE files; "http": no per-node files, nodes chain to
        # [boot_http] (a static boot.ipxe does `chain http://IP:PORT/boot/${mac}`).
        "boot_mode": (str, "tftp"),
        # PXELINUX menu wait in tenths of a second before it boots the image; 0 = none.
        "pxelinux_timeout": (int, 0),
        "leases_file": ("path", "/var/lib/misc/dnsmasq.leases"),
    },
    "boot_http": {
        # Where Picasso serves node iPXE scripts (GET /boot/<mac>), on the provisioning network;
        # empty = not served.  Only /boot/ is served there: the tenant API stays on [rest_api].
        "ip": (str, ""),
        "port": (int, 8080),
    },
    "rest_api": {
        "ip": (str, "127.0.0.1"),
        "port": (int, 9000),
        "threads": (int, 8),
        "drain_seconds": (float, 60.0),
        # Largest request body Picasso reads (both APIs): larger ones get a 413 before any parsing.
        "max_body_bytes": (int, 1048576),
        # HTTPS: both set = Picasso serves TLS (cheroot) with this PEM certificate chain and key.
        "certfile": ("path", ""),
        "keyfile": ("path", ""),
        # GET /metrics: none (anyone who reaches [rest_api]) or admin (HTTP Basic, a BMI administrator).
        "metrics_auth": (str, "none"),
    },
    "logs": {
        "path": ("path", "/var/log/bmi"),
        "debug": (bool, False),
        "verbose": (bool, False),
        "max_bytes": (int, 10_000_000),
        "backup_count": (int, 10),
        # text: one human-readable line per record; json: one JSON object per line.
        "format": (str, "text"),
    },
    "journal": {
        "retry_seconds": (float, 30.0),
    },
    "host": {
        # Several hosts (ims/einstein/hosts.py, docs/deployment.md): this Einstein host's name in the
        # database (empty = the machine's hostname), how often it heart-beats, and after how long
        # without a heartbeat another host takes its nodes over.
        "name": (str, ""),
        "heartbeat_seconds": (float, 2.0),
        "dead_after_seconds": (float, 10.0),
    },
    "scheduler": {
        # Asynchronous operations running at once, across all workers, per iSCSI gateway
        # ([iscsi] ip:port) and per storage cluster ([fs]); the rest wait, fairly across projects.
        "max_per_gateway": (int, 8),
        "max_per_cluster": (int, 16),
    },
}


@dataclass
class Section:
    name: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(f"no option {key!r} in section [{self.__dict__['name']}]") from None


class BMIConfig:
    """Parsed configuration; ``cfg.iscsi.ip`` style access."""

    def __init__(self, path: str, sections: dict[str, Section]) -> None:
        self.path = path
        self._sections = sections

    def __getattr__(self, name: str) -> Section:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(f"no section [{name}]") from None

    def section(self, name: str) -> Section:
        return self._sections[name]

    @property
    def db_url(self) -> str:
        return self.db.url or f"sqlite:///{self.db.path}"


def _convert(path: str, section: str, key: str, kind: Any, raw: str) -> Any:
    raw = raw.strip()
    try:
        if kind is bool:
            low = raw.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind == "list":
            return [item.strip() for item in raw.split(",") if item.strip()]
        if kind == "path":
            return raw.rstrip("/") if raw not in ("", "/") else raw
        return raw
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid value {raw!r} for [{section}] {key}: {exc}") from None


def parse(path: str, text: str | None = None) -> BMIConfig:
    """Parse a config file (or ``text``) into a :class:`BMIConfig`."""
    parser = configparser.ConfigParser(interpolation=None)
    if text is None:
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except FileNotFoundError:
            raise ConfigError(f"cannot load config file {path}: file not found "
                              f"(set {ENV_VAR} or create {DEFAULT_LOCATION})") from None
        except OSError as exc:
            raise ConfigError(f"cannot load config file {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    else:
        try:
            parser.read_string(text)
        except configparser.Error as exc:
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    sections: dict[str, Section] = {}
    for sec_name, keys in SCHEMA.items():
        values: dict[str, Any] = {}
        for key, (kind, default) in keys.items():
            if parser.has_option(sec_name, key):
                values[key] = _convert(path, sec_name, key, kind, parser.get(sec_name, key))
            elif default is _REQUIRED:
                raise ConfigError(f"{path}: missing required option '{key}' in section [{sec_name}]")
            else:
                values[key] = default
        sections[sec_name] = Section(sec_name, values)
    # Unknown sections (e.g. [tests]) are kept as plain strings.
    for sec_name in parser.sections():
        if sec_name not in SCHEMA:
            sections[sec_name] = Section(sec_name, dict(parser.items(sec_name)))
        else:
            for key, value in parser.items(sec_name):
                sections[sec_name].values.setdefault(key, value)
    cfg = BMIConfig(path, sections)
    _validate(cfg)
    return cfg


def _validate(cfg: BMIConfig) -> None:
    from ims.common.names import NAME_RE

    if not NAME_RE.fullmatch(cfg.bmi.uid) or "img" in cfg.bmi.uid:
        raise ConfigError(f"{cfg.path}: invalid value {cfg.bmi.uid!r} for [bmi] uid: "
                          "use letters and digits only, without the word 'img'")
    if not NAME_RE.fullmatch(cfg.bmi.snapshot):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.bmi.snapshot!r} for [bmi] snapshot")
    if cfg.fs.driver not in ("ceph", "file"):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.fs.driver!r} for [fs] driver: use ceph or file")
    if cfg.iscsi.control not in ("socket", "tgtadm"):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.iscsi.control!r} for [iscsi] control: use socket or tgtadm")
    if cfg.iscsi.driver not in ("tgt",):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.iscsi.driver!r} for [iscsi] driver: use tgt")
    if cfg.net_isolator.driver not in ("hil",):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.net_isolator.driver!r} for [net_isolator] driver")
    if not 0 < cfg.iscsi.lun < 256:
        raise ConfigError(f"{cfg.path}: invalid value {cfg.iscsi.lun} for [iscsi] lun: use 1-255 "
                          "(LUN 0 is tgt's controller)")
    if cfg.tftp.boot_mode not in ("tftp", "http"):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.tftp.boot_mode!r} for [tftp] boot_mode: use tftp or http")
    if not 0 <= cfg.tftp.pxelinux_timeout <= 36000:
        raise ConfigError(f"{cfg.path}: invalid value {cfg.tftp.pxelinux_timeout} for [tftp] pxelinux_timeout: "
                          "use 0-36000 (tenths of a second)")
    if cfg.tftp.boot_mode == "http" and not cfg.boot_http.ip:
        raise ConfigError(f"{cfg.path}: [tftp] boot_mode = http needs [boot_http] ip")
    if cfg.bmi.import_pattern:
        import re

        try:
            re.compile(cfg.bmi.import_pattern)
        except re.error as exc:
            raise ConfigError(f"{cfg.path}: invalid value for [bmi] import_pattern: {exc}") from None
    if bool(cfg.net_isolator.service_username) != bool(cfg.net_isolator.service_password):
        raise ConfigError(f"{cfg.path}: [net_isolator] service_username and service_password go together")
    for key in ("max_per_gateway", "max_per_cluster"):
        if cfg.scheduler.values[key] < 1:
            raise ConfigError(f"{cfg.path}: invalid value {cfg.scheduler.values[key]} for [scheduler] {key}: "
                              "use 1 or more")
    if cfg.logs.format not in ("text", "json"):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.logs.format!r} for [logs] format: use text or json")
    if cfg.rest_api.metrics_auth not in ("none", "admin"):
        raise ConfigError(f"{cfg.path}: invalid value {cfg.rest_api.metrics_auth!r} for [rest_api] metrics_auth: "
                          "use none or admin")
    if bool(cfg.rest_api.certfile) != bool(cfg.rest_api.keyfile):
        raise ConfigError(f"{cfg.path}: [rest_api] certfile and keyfile go together")
    if cfg.rpc.workers < 1:
        raise ConfigError(f"{cfg.path}: invalid value {cfg.rpc.workers} for [rpc] workers")


def config_path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_LOCATION


_CACHED: BMIConfig | None = None


def load(force: bool = False, path: str | None = None) -> BMIConfig:
    """Load (once per process) the config from ``path``, ``$BMI_CONFIG`` or the default."""
    global _CACHED
    if _CACHED is None or force or path is not None:
        _CACHED = parse(path or config_path())
    return _CACHED

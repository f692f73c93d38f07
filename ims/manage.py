"""``bmi-manage``: the administrator's tool on a BMI host (console script; deploy/systemd runs ``db upgrade``).

    bmi-manage [--config PATH] db upgrade           create or upgrade the database schema
    bmi-manage [--config PATH] recover              finish or roll back what a crash left half-done
                                                    (Einstein must be stopped: it recovers on its own)
    bmi-manage [--config PATH] reconcile [--repair] compare database, storage, targets, boot files, HIL

It works on the host's config, database, Ceph and tgtd directly (no Picasso): it is for the operator
of the host (root), not for tenants.  ``reconcile`` acts as a BMI admin: HIL_USERNAME/HIL_PASSWORD
(HAAS_* accepted), else ``[net_isolator] service_username``/``service_password``, who must be in
``[bmi] admin_users``.  Results are printed as JSON; errors go to stderr with exit code 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import BMIError

LOG = logging.getLogger("ims.manage")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmi-manage", description="Administer BMI on this host.")
    parser.add_argument("--config", help="config file (default: $BMI_CONFIG or /etc/bmi/bmiconfig.cfg)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    db = sub.add_parser("db", help="the database").add_subparsers(dest="db_command", required=True,
                                                                    metavar="DB_COMMAND")
    db.add_parser("upgrade", help="create or upgrade the database schema (idempotent)")
    sub.add_parser("recover", help="finish or roll back the operations a crash left (Einstein stopped)")
    reconcile = sub.add_parser("reconcile", help="report drift between database, storage, targets, boot files")
    reconcile.add_argument("--repair", action="store_true", help="also repair what can be repaired")
    return parser


def _einstein_running(cfg: bmi_config.BMIConfig) -> bool:
    """Whether something answers on Einstein's name server port (so Einstein runs on this host)."""
    try:
        with socket.create_connection((cfg.rpc.name_server_ip, cfg.rpc.name_server_port), timeout=2):
            return True
    except OSError:
        return False


def _operations(cfg: bmi_config.BMIConfig) -> Any:
    from ims.rpc.methods import DEFAULT_OPS_FACTORY
    from ims.rpc.server import load_factory

    return load_factory(DEFAULT_OPS_FACTORY)(cfg)


def _admin_auth(cfg: bmi_config.BMIConfig) -> dict[str, str]:
    user = os.environ.get("HIL_USERNAME") or os.environ.get("HAAS_USERNAME")
    password = os.environ.get("HIL_PASSWORD") or os.environ.get("HAAS_PASSWORD")
    if not user:
        user = cfg.net_isolator.service_username
        password = cfg.net_isolator.service_password
    if not user:
        raise BMIError("reconcile needs a BMI admin: set HIL_USERNAME and HIL_PASSWORD, or [net_isolator] "
                       "service_username/service_password (a user in [bmi] admin_users)", status=400)
    return {"username": user, "password": password or ""}


def db_upgrade(cfg: bmi_config.BMIConfig) -> dict[str, Any]:
    from ims.database.migrate import upgrade

    upgrade(cfg.db_url)
    return {"database": "upgraded"}


def recover(cfg: bmi_config.BMIConfig) -> dict[str, Any]:
    """What Einstein does at start-up, once: re-create targets tgtd lost, then recover the journal.
    Refused while Einstein runs: re-creating targets must not race its workers (and it recovers itself)."""
    if _einstein_running(cfg):
        raise BMIError(f"Einstein is running (its name server answers on {cfg.rpc.name_server_ip}:"
                       f"{cfg.rpc.name_server_port}); it recovers on its own at start-up and every [journal] "
                       "retry_seconds.  Stop it first (systemctl stop bmi-einstein) to recover by hand.", status=409)
    ops = _operations(cfg)
    try:
        restored = ops.iscsi.restore()
        report = ops.recover()
    finally:
        ops.close()
    return {"restored_targets": restored, **report}


def reconcile(cfg: bmi_config.BMIConfig, repair: bool) -> dict[str, Any]:
    auth = _admin_auth(cfg)
    ops = _operations(cfg)
    try:
        return ops.reconcile(auth, repair=repair)
    finally:
        ops.close()


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    bmi_log.setup(None, "manage", file_name=None)
    try:
        cfg = bmi_config.load(path=opts.config)
        bmi_log.setup(cfg, "manage", file_name=None)  # stderr only: ims.log is Einstein's
        if opts.command == "db":
            result = db_upgrade(cfg)
        elif opts.command == "recover":
            result = recover(cfg)
        else:
            result = reconcile(cfg, opts.repair)
    except BMIError as exc:
        print(f"bmi-manage: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

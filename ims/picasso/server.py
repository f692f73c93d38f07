"""Serve Picasso with waitress on ``[rest_api] ip:port`` (never Flask's development server)."""
from __future__ import annotations

import argparse
import logging
import threading

import waitress

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import ConfigError
from ims.picasso.app import create_app
from ims.picasso.boot import create_boot_app
from ims.rpc.client import EinsteinClient

LOG = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="picasso_server", description="Run the BMI REST API (Picasso).")
    parser.add_argument("--config", help="config file (default: $BMI_CONFIG or /etc/bmi/bmiconfig.cfg)")
    opts = parser.parse_args(argv)
    bmi_log.setup(None, "picasso")
    try:
        cfg = bmi_config.load(path=opts.config)
        bmi_log.setup(cfg, "picasso")
    except ConfigError as exc:
        LOG.error("%s", exc)
        return 1
    app = create_app(cfg)
    if cfg.boot_http.ip:
        # Node boot scripts on the provisioning network, in their own server: the tenant API
        # is never exposed there.
        boot_server = waitress.create_server(create_boot_app(EinsteinClient(cfg)), map={}, host=cfg.boot_http.ip,
                                             port=cfg.boot_http.port, threads=2, ident="bmi-boot")
        threading.Thread(target=boot_server.run, name="boot-http", daemon=True).start()
        LOG.info("serving node boot scripts on http://%s:%d/boot/<mac>", cfg.boot_http.ip, cfg.boot_http.port)
    LOG.info("Picasso listening on http://%s:%d/", cfg.rest_api.ip, cfg.rest_api.port)
    waitress.serve(app, host=cfg.rest_api.ip, port=cfg.rest_api.port, threads=cfg.rest_api.threads,
                   ident="bmi-picasso")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

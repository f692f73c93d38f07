"""Serve Picasso on ``[rest_api] ip:port`` (never Flask's development server): waitress for
plain HTTP; cheroot for HTTPS when ``[rest_api] certfile``/``keyfile`` are set (ims/picasso/https.py).

SIGTERM/SIGINT drain: the listening socket is closed at once (new connections are
refused), requests in flight run to the end and their answers are sent, for up to
``[rest_api] drain_seconds``; then the process exits.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

import waitress

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import ConfigError
from ims.common.transfer import max_upload_bytes
from ims.picasso import https
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
        bmi_log.setup(cfg, "picasso", file_name=bmi_log.PICASSO_LOG)
    except ConfigError as exc:
        LOG.error("%s", exc)
        return 1
    app = create_app(cfg)
    if cfg.boot_http.ip:
        # Node boot scripts on the provisioning network, in their own server: the tenant API
        # is never exposed there.
        boot_server = waitress.create_server(create_boot_app(EinsteinClient(cfg)), map={}, host=cfg.boot_http.ip,
                                             port=cfg.boot_http.port, threads=2, ident="bmi-boot",
                                             max_request_body_size=_BOOT_MAX_BODY)
        threading.Thread(target=boot_server.run, name="boot-http", daemon=True).start()
        LOG.info("serving node boot scripts on http://%s:%d/boot/<mac>", cfg.boot_http.ip, cfg.boot_http.port)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    if cfg.rest_api.certfile:
        try:
            tls_server = https.create_server(app, cfg)
        except ConfigError as exc:
            LOG.error("%s", exc)
            return 1
        try:
            https.serve_until(tls_server, stopping, cfg.rest_api.drain_seconds)
        except OSError as exc:  # e.g. the address is in use (before anything was served)
            LOG.error("cannot listen on https://%s:%d/: %s", cfg.rest_api.ip, cfg.rest_api.port, exc)
            return 1
        return 0
    LOG.info("Picasso listening on http://%s:%d/", cfg.rest_api.ip, cfg.rest_api.port)
    server = waitress.create_server(app, host=cfg.rest_api.ip, port=cfg.rest_api.port,
                                    threads=cfg.rest_api.threads, ident="bmi-picasso",
                                    # waitress buffers a body before the app sees it: refuse a huge one there
                                    # already, a little above the app's own limit (which answers a JSON 413).
                                    max_request_body_size=max(cfg.rest_api.max_body_bytes,
                                                              max_upload_bytes(cfg)) + 65536)
    serve_until(server, stopping, cfg.rest_api.drain_seconds)
    return 0


_BOOT_MAX_BODY = 4096  # nodes only GET their script


def _busy(server: Any) -> bool:
    """A request is being handled or its answer is still being sent."""
    if server.task_dispatcher.active_count or server.task_dispatcher.queue:
        return True
    return any(ch.requests or ch.total_outbufs_len for ch in list(server.active_channels.values()))


def serve_until(server: Any, stopping: threading.Event, drain_seconds: float) -> None:
    """Run waitress's loop until ``stopping`` is set, then drain (see the module doc)."""
    loop, timeout = server.asyncore.loop, 0.5
    while not stopping.is_set():
        loop(timeout=timeout, map=server._map, count=1)
    LOG.info("Picasso stopping: no new connections; finishing requests in flight (up to %.0f s)", drain_seconds)
    server.accepting = False
    server.del_channel()
    server.socket.close()
    deadline = time.monotonic() + drain_seconds
    while _busy(server) and time.monotonic() < deadline:
        loop(timeout=0.1, map=server._map, count=1)
    if _busy(server):
        LOG.error("requests still running after %.0f s ([rest_api] drain_seconds); stopping anyway", drain_seconds)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
    LOG.info("Picasso stopped")


if __name__ == "__main__":
    raise SystemExit(main())

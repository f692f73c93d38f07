"""The HTTP boot path: ``GET /boot/<mac>`` answers a provisioned node's iPXE script.

Served on the provisioning network ([boot_http] ip:port), apart from the tenant API:
nodes cannot authenticate, and this endpoint reveals only what a per-node TFTP file
would.  A static ``boot.ipxe`` (``chain http://IP:PORT/boot/${mac}``) replaces every
per-node TFTP file.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response

from ims.common.errors import BMIError

LOG = logging.getLogger(__name__)


def _ipxe_error(message: str, status: int) -> Response:
    # An iPXE script that says why, then gives up so the firmware tries its next boot device.
    safe = "".join(c for c in message if c.isalnum() or c in " .,:_-/@")[:200]
    return Response(f"#!ipxe\necho BMI: {safe}\nexit 1\n", status=status, mimetype="text/plain")


def create_boot_app(client: Any) -> Flask:
    app = Flask("bmi-boot")

    @app.get("/boot/<mac>")
    def boot(mac: str) -> Response:
        try:
            script = client.boot_script(mac)
        except BMIError as exc:
            LOG.info("boot script for %s: %s", mac[:32], exc)
            return _ipxe_error(str(exc), exc.status)
        return Response(script, mimetype="text/plain")

    @app.errorhandler(404)
    @app.errorhandler(405)
    def not_here(exc: Any) -> Response:
        return _ipxe_error("only GET /boot/<mac> is served here", getattr(exc, "code", 404))

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        LOG.exception("boot endpoint failed")
        return _ipxe_error("internal error", 500)

    return app

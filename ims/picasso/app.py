"""Picasso application factory."""
from __future__ import annotations

from typing import Any

from flask import Flask

from ims.picasso import errors, legacy, v1
from ims.picasso.auth import AuthCache


def create_app(cfg: Any, client: Any = None) -> Flask:
    """Build Picasso.  ``client`` is an EinsteinClient (default: built from ``cfg``) or a test double."""
    if client is None:
        from ims.rpc.client import EinsteinClient

        client = EinsteinClient(cfg)
    app = Flask("ims.picasso")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["bmi"] = {"client": client, "auth_cache": AuthCache(cfg.net_isolator.auth_cache_seconds)}
    app.register_blueprint(legacy.bp)
    app.register_blueprint(v1.bp)
    errors.register(app)
    return app

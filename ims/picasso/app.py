"""Picasso application factory."""
from __future__ import annotations

from typing import Any

from flask import Flask, Response, request

from ims.picasso import errors, legacy, metrics, transfer, v1
from ims.picasso.auth import AuthCache
from ims.picasso.ui import bp as ui_bp


def create_app(cfg: Any, client: Any = None) -> Flask:
    """Build Picasso.  ``client`` is an EinsteinClient (default: built from ``cfg``) or a test double."""
    status_client = client
    if client is None:
        from ims.picasso.directory import DirectoryClient

        client = DirectoryClient(cfg)  # several hosts: falls back to another live host (docs/deployment.md)
        status_client = metrics.status_client(cfg)
    app = Flask("ims.picasso")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    limit = int(cfg.rest_api.max_body_bytes)
    # Werkzeug silently cuts a body without Content-Length (chunked) at MAX_CONTENT_LENGTH; one byte
    # more than the limit lets refuse_large_bodies tell "at most the limit" from "larger".
    app.config["MAX_CONTENT_LENGTH"] = limit + 1
    # No automatic OPTIONS answers: every method a route does not list is a 405 (as the OpenAPI says).
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["bmi"] = {"client": client, "auth_cache": AuthCache(cfg.net_isolator.auth_cache_seconds)}
    metrics.init_app(app, cfg, status_client)  # first hook: counts and times even refused requests

    @app.before_request
    def refuse_large_bodies() -> Response | None:
        # Before any route, credentials check or parsing: an oversized body is never read.
        if request.endpoint in transfer.OWN_LIMIT:  # uploads: [rest_api] max_upload_bytes (ims/picasso/transfer.py)
            return None
        if request.content_length is None:
            # chunked: read (at most limit + 1 bytes) now; the body is cached for the route
            too_large = len(request.get_data(cache=True)) > limit
        else:
            too_large = request.content_length > limit
        if too_large:
            return errors.error_response(413, "PayloadTooLarge",
                                         f"the request body is larger than {limit} bytes ([rest_api] max_body_bytes)")
        return None

    app.register_blueprint(legacy.bp)
    app.register_blueprint(v1.bp)
    app.register_blueprint(ui_bp)  # the web console, /ui/
    transfer.init(app, cfg)
    errors.register(app)
    return app

"""HTTPS for Picasso: cheroot (a production, threaded WSGI server with TLS) when
``[rest_api] certfile`` and ``keyfile`` are set.  waitress, which serves plain HTTP, has no TLS.

The same behaviour as the plain-HTTP server: ``[rest_api] threads`` worker threads; a body
above ``max_body_bytes`` gets the app's JSON 413 (the server itself refuses a huge one a little
above, before buffering it); SIGTERM drains: the listening socket closes at once, requests in
flight finish and are answered, for up to ``drain_seconds``.  Python's ``ssl`` defaults apply
(TLS 1.2 or newer, its default ciphers).  A plain-HTTP request on the TLS port gets a 400.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from ims.common.errors import ConfigError
from ims.common.transfer import max_upload_bytes

LOG = logging.getLogger(__name__)

SLACK_BYTES = 65536  # the server's own body limit above the app's, so the app answers (JSON) first


def create_server(app: Any, cfg: Any) -> wsgi.Server:
    """A cheroot server for ``app`` on ``[rest_api] ip:port`` with TLS (not started).

    :raises ConfigError: the certificate or key cannot be loaded (the message says which file and why).
    """
    rest = cfg.rest_api
    for key in ("certfile", "keyfile"):
        path = rest.values[key]
        if not os.path.isfile(path):
            raise ConfigError(f"[rest_api] {key} {path}: file not found")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"[rest_api] {key} {path}: permission denied")
    try:
        adapter = BuiltinSSLAdapter(rest.certfile, rest.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[rest_api] certfile {rest.certfile} / keyfile {rest.keyfile}: cannot load the "
                          f"certificate and key: {exc}") from None
    server = wsgi.Server((rest.ip, rest.port), app, numthreads=rest.threads, server_name="bmi-picasso",
                         shutdown_timeout=rest.drain_seconds)
    server.ssl_adapter = adapter
    server.error_log = _error_log  # cheroot writes to stderr: into BMI's log (text or JSON) instead
    # uploads (PUT .../content) have their own, larger limit; the app checks both and answers a JSON 413
    server.max_request_body_size = max(rest.max_body_bytes, max_upload_bytes(cfg)) + SLACK_BYTES
    return server


def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
    # e.g. "peer dropped the TLS connection suddenly, during handshake" (a client that does not
    # trust the certificate) or a plain-HTTP request on the TLS port
    LOG.log(level if isinstance(level, int) else logging.INFO, "https: %s", msg, exc_info=traceback)


def serve_until(server: wsgi.Server, stopping: threading.Event, drain_seconds: float) -> None:
    """Serve until ``stopping`` is set, then drain (see the module doc)."""
    server.prepare()  # binds now: an address in use fails here, in the caller's thread
    LOG.info("Picasso listening on https://%s:%d/", *server.bind_addr[:2])
    loop = threading.Thread(target=server.serve, name="https", daemon=True)
    loop.start()
    while not stopping.wait(0.5):
        if not loop.is_alive():
            LOG.error("the HTTPS server stopped unexpectedly")
            break
    LOG.info("Picasso stopping: no new connections; finishing requests in flight (up to %.0f s)", drain_seconds)
    # stop(): closes the listening socket and idle connections, then waits up to shutdown_timeout
    # (= drain_seconds) for the worker threads to finish the requests they hold.
    server.stop()
    loop.join(5)
    LOG.info("Picasso stopped")

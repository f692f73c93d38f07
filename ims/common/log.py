"""Logging set-up for BMI's servers: ``<[logs] path>/ims.log`` (rotating) plus stderr.

``[logs] debug`` turns on DEBUG; ``[logs] verbose`` keeps DEBUG records on stderr too
(otherwise stderr gets INFO and above).  Records never carry credentials: operations
log user names and BMI names only.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Any

FORMAT = "%(asctime)s {component} %(levelname)s %(name)s: %(message)s"


def setup(cfg: Any | None, component: str) -> None:
    """Configure the root logger for ``component`` (einstein, einstein.N, picasso)."""
    fmt = logging.Formatter(FORMAT.format(component=component))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    debug = bool(cfg and cfg.logs.debug)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.DEBUG if cfg and cfg.logs.verbose else logging.INFO)
    root.addHandler(console)
    if cfg is not None:
        try:
            os.makedirs(cfg.logs.path, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(os.path.join(cfg.logs.path, "ims.log"),
                                                           maxBytes=10_000_000, backupCount=10)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot write logs to %s: %s", cfg.logs.path, exc.strerror)
        else:
            handler.setFormatter(fmt)
            root.addHandler(handler)
    # Third-party chatter stays at WARNING even in debug mode.
    for noisy in ("Pyro4", "Pyro4.core", "urllib3", "waitress"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Command line of the HIL simulator: ``python -m hilsim`` / ``scripts/hil-simulator``.

Serves :func:`hilsim.app.create_app` with Werkzeug's threaded WSGI server on
127.0.0.1 (real HIL is single-threaded; threads only make tests faster). SIGTERM and
SIGINT stop it cleanly: pending action timers are cancelled and every VM is stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType

from werkzeug.serving import make_server

from hilsim.app import Simulator, create_app
from hilsim.inventory import InventoryError

LOG = logging.getLogger("hilsim")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hil-simulator", description="A HIL v0 REST API simulator for BMI tests.")
    p.add_argument("--inventory", required=True, help="JSON inventory file (users, projects, networks, nodes)")
    p.add_argument("--port", type=int, default=7000, help="TCP port; 0 picks a free one (see --port-file)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--action-delay", type=float, default=0.2,
                   help="seconds before a networking action is applied (default 0.2)")
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument("--pid-file", help="write this process id to this file")
    return p


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        with open(args.inventory, encoding="utf-8") as fh:
            inventory = json.load(fh)
        app = create_app(inventory, action_delay=args.action_delay)
    except (OSError, ValueError, ImportError, InventoryError) as exc:
        print(f"hil-simulator: cannot load inventory {args.inventory}: {exc}", file=sys.stderr)
        return 2
    sim: Simulator = app.extensions["hilsim"]
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as exc:
        sim.close()
        print(f"hil-simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.pid_file:
        _write(args.pid_file, str(os.getpid()))
    if args.port_file:
        _write(args.port_file, str(port))
    LOG.info("HIL simulator listening on http://%s:%d/v0", args.host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sim.close()
        LOG.info("HIL simulator stopped")
    return 0


def _write(path: str, text: str) -> None:
    # Write then rename, so a reader never sees a half-written file.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)

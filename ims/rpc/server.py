"""Einstein: a Pyro4 name server plus N worker processes, each serving one operations object.

The parent process runs the name server (in a thread) and supervises the workers:
a worker that dies is restarted; SIGTERM/SIGINT stops the workers and the name server.
Workers are started with the ``spawn`` method so each builds its own operations object
(and so its own Ceph connection: librados does not survive ``fork``), and they exit on
their own if the parent disappears.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro4
import Pyro4.naming

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import ConfigError
from ims.rpc.dispatch import EinsteinEndpoint
from ims.rpc.methods import DEFAULT_OPS_FACTORY, NAME_PREFIX

LOG = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PARENT_POLL_SECONDS = 1.0
_RESTART_BACKOFF_SECONDS = 1.0


def configure_pyro() -> None:
    """Process-wide Pyro4 settings: a data-only serializer, no pickle."""
    Pyro4.config.SERIALIZER = "serpent"
    Pyro4.config.SERIALIZERS_ACCEPTED = {"serpent", "json"}
    Pyro4.config.SOCK_REUSE = True


def hmac_key(cfg: bmi_config.BMIConfig) -> bytes | None:
    """The HMAC key, or None when ``[rpc] insecure = true``; ConfigError if neither is set."""
    key = cfg.rpc.hmac_key
    if key:
        return key.encode("utf-8")
    if cfg.rpc.insecure:
        LOG.warning("!!! [rpc] insecure = true: Einstein accepts RPC calls WITHOUT an HMAC key; "
                    "anyone who can reach its ports can run every operation !!!")
        return None
    raise ConfigError(f"{cfg.path}: [rpc] hmac_key is not set; set it (a long random string shared with "
                      "Picasso) or, for a throwaway lab only, set [rpc] insecure = true")


def load_factory(spec: str) -> Callable[[Any], Any]:
    """Resolve ``"package.module:Class.method"`` to a callable taking the config."""
    module_name, _, attr_path = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel sends SIGTERM when the parent exits.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # belt and braces: prctl fires on parent *thread* exit only.
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(_PARENT_POLL_SECONDS)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(config_path: str, index: int, factory_spec: str, parent_pid: int) -> None:
    """Entry point of worker ``index``: serve ``bmi.einstein.<index>`` until told to stop."""
    _die_with_parent(parent_pid)
    configure_pyro()
    cfg = bmi_config.load(path=config_path)
    bmi_log.setup(cfg, f"einstein.{index}")
    key = hmac_key(cfg)
    ops = load_factory(factory_spec)(cfg)
    daemon = Pyro4.Daemon(host=cfg.rpc.rpc_server_ip, port=cfg.rpc.rpc_server_port + index)
    if key:
        daemon._pyroHmacKey = key
    signal.signal(signal.SIGTERM, lambda *_: daemon.shutdown())
    uri = daemon.register(EinsteinEndpoint(ops), objectId=f"{NAME_PREFIX}{index}")
    with Pyro4.naming.locateNS(cfg.rpc.name_server_ip, cfg.rpc.name_server_port, broadcast=False,
                               hmac_key=key) as ns:
        ns.register(f"{NAME_PREFIX}{index}", uri, safe=False)
    LOG.info("worker %d serving at %s", index, uri)
    try:
        daemon.requestLoop()
    finally:
        daemon.close()
        close = getattr(ops, "close", None)
        if close:
            close()


class Supervisor:
    """Runs the name server and keeps ``workers`` worker processes alive."""

    def __init__(self, cfg: bmi_config.BMIConfig, factory_spec: str = DEFAULT_OPS_FACTORY) -> None:
        self.cfg = cfg
        self.factory_spec = factory_spec
        self.key = hmac_key(cfg)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, Any] = {}
        self._stop = threading.Event()
        self._ns_daemon: Any = None

    def recover(self) -> dict[str, Any]:
        """Finish or roll back what a crash left half-done, once, before serving."""
        ops = load_factory(self.factory_spec)(self.cfg)
        try:
            report = ops.recover()
        finally:
            ops.close()
        LOG.info("recovery: %s", report)
        return report

    def start_name_server(self) -> None:
        rpc = self.cfg.rpc
        _uri, self._ns_daemon, _bc = Pyro4.naming.startNS(host=rpc.name_server_ip, port=rpc.name_server_port,
                                                           enableBroadcast=False, hmac=self.key)
        threading.Thread(target=self._ns_daemon.requestLoop, name="pyro-ns", daemon=True).start()
        LOG.info("name server on %s:%d", rpc.name_server_ip, rpc.name_server_port)

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(target=worker_main, name=f"einstein-{index}",
                                 args=(self.cfg.path, index, self.factory_spec, os.getpid()))
        proc.start()
        self._workers[index] = proc
        LOG.info("started worker %d (pid %d)", index, proc.pid)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start_name_server()
        try:
            for index in range(self.cfg.rpc.workers):
                self._spawn(index)
            while not self._stop.wait(0.2):
                for index, proc in list(self._workers.items()):
                    if not proc.is_alive():
                        LOG.error("worker %d (pid %s) exited with %s; restarting", index, proc.pid,
                                  proc.exitcode)
                        time.sleep(_RESTART_BACKOFF_SECONDS if proc.exitcode not in (0, -signal.SIGKILL) else 0)
                        self._spawn(index)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for proc in self._workers.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._workers.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self._ns_daemon is not None:
            self._ns_daemon.shutdown()
            self._ns_daemon = None
        LOG.info("einstein stopped")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="einstein_server", description="Run the BMI Einstein RPC workers.")
    parser.add_argument("--config", help="config file (default: $BMI_CONFIG or /etc/bmi/bmiconfig.cfg)")
    # For tests and labs: which callable builds the operations object from the config.
    parser.add_argument("--ops-factory", default=DEFAULT_OPS_FACTORY, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    bmi_log.setup(None, "einstein")
    configure_pyro()
    try:
        cfg = bmi_config.load(path=opts.config)
        bmi_log.setup(cfg, "einstein")
        supervisor = Supervisor(cfg, opts.ops_factory)
        supervisor.recover()
    except ConfigError as exc:
        LOG.error("%s", exc)
        return 1
    supervisor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

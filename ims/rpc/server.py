"""Einstein: a Pyro4 name server plus N worker processes, each serving one operations object.

The parent process runs the name server (in a thread), writes the one log file, and
supervises the workers: a worker that dies is restarted once a recovery process has
finished what it left behind; SIGTERM/SIGINT drains the workers, then stops.
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
import Pyro4.errors
import Pyro4.naming

from ims.common import config as bmi_config
from ims.common import log as bmi_log
from ims.common.errors import ConfigError
from ims.einstein import takeover
from ims.rpc.dispatch import EinsteinEndpoint
from ims.rpc.methods import DEFAULT_OPS_FACTORY, NAME_PREFIX

LOG = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PARENT_POLL_SECONDS = 1.0
_RESTART_BACKOFF_SECONDS = 1.0
# A recovery process that takes longer than this is abandoned (the worker restarts anyway).
_RECOVERY_MAX_SECONDS = 120.0
# Extra time, past [rpc] drain_seconds, for a drained worker to close down.
_DRAIN_GRACE_SECONDS = 10.0


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


def _recover_loop(ops: Any, every: float, stop: threading.Event) -> None:
    """Complete committed-but-unfinished (``failed``) operations and dead owners' ones, periodically."""
    while not stop.wait(every):
        try:
            summary = ops.recover()
        except Exception:  # noqa: BLE001 - keep retrying; the next round may succeed
            LOG.exception("periodic journal recovery failed")
            continue
        done = {k: len(v) for k, v in summary.items() if k in ("rolled_back", "rolled_forward", "failed") and v}
        if done:
            LOG.info("periodic journal recovery: %s", done)


def worker_main(config_path: str, index: int, factory_spec: str, parent_pid: int,
                log_address: str | None = None) -> None:
    """Entry point of worker ``index``: serve ``bmi.einstein.<index>`` until told to stop.

    SIGTERM drains: the worker leaves the name server, refuses new calls (503, not
    started, so clients use another worker), waits for running calls up to
    ``[rpc] drain_seconds``, then exits.  Worker 0 also retries unfinished journal
    operations every ``[journal] retry_seconds``.
    """
    _die_with_parent(parent_pid)
    configure_pyro()
    cfg = bmi_config.load(path=config_path)
    bmi_log.setup(cfg, f"einstein.{index}", forward_to=log_address)
    key = hmac_key(cfg)
    ops = load_factory(factory_spec)(cfg)
    daemon = Pyro4.Daemon(host=cfg.rpc.rpc_server_ip, port=cfg.rpc.rpc_server_port + index)
    if key:
        daemon._pyroHmacKey = key
    endpoint = EinsteinEndpoint(ops)
    name = f"{NAME_PREFIX}{index}"
    stop = threading.Event()

    def drain() -> None:
        endpoint.start_draining()
        try:
            with Pyro4.naming.locateNS(cfg.rpc.name_server_ip, cfg.rpc.name_server_port, broadcast=False,
                                       hmac_key=key) as ns:
                ns.remove(name)
        except Pyro4.errors.PyroError as exc:
            LOG.warning("worker %d could not leave the name server: %s", index, exc)
        if endpoint.wait_idle(cfg.rpc.drain_seconds):
            LOG.info("worker %d drained; stopping", index)
        else:
            LOG.error("worker %d: calls still running after %.0f s ([rpc] drain_seconds); stopping anyway",
                      index, cfg.rpc.drain_seconds)
        daemon.shutdown()

    def on_term(*_: Any) -> None:
        if not stop.is_set():
            stop.set()
            threading.Thread(target=drain, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    uri = daemon.register(endpoint, objectId=name)
    with Pyro4.naming.locateNS(cfg.rpc.name_server_ip, cfg.rpc.name_server_port, broadcast=False,
                               hmac_key=key) as ns:
        ns.register(name, uri, safe=False)
    LOG.info("worker %d serving at %s", index, uri)
    if index == 0 and hasattr(ops, "recover") and cfg.journal.retry_seconds > 0:
        threading.Thread(target=_recover_loop, args=(ops, cfg.journal.retry_seconds, stop), name="journal-retry",
                         daemon=True).start()
    if hasattr(ops, "core"):  # every worker flattens new images in the background (issue 8)
        from ims.einstein import flatten
        flatten.start(ops.core, stop)
    try:
        daemon.requestLoop()
    finally:
        stop.set()
        daemon.close()
        close = getattr(ops, "close", None)
        if close:
            close()


def recover_main(config_path: str, factory_spec: str, log_address: str | None = None) -> None:
    """Entry point of a short recovery process: finish what a dead worker left, then exit."""
    configure_pyro()
    cfg = bmi_config.load(path=config_path)
    bmi_log.setup(cfg, "einstein.recovery", forward_to=log_address)
    ops = load_factory(factory_spec)(cfg)
    try:
        report = ops.recover()
    finally:
        close = getattr(ops, "close", None)
        if close:
            close()
    LOG.info("recovery after a worker died: %s", report)


class Supervisor:
    """Runs the name server and keeps ``workers`` worker processes alive.

    A worker that dies is not respawned at once: a short recovery process first finishes
    (rolls back, or forward) the operations it left behind, under their locks.
    """

    def __init__(self, cfg: bmi_config.BMIConfig, factory_spec: str = DEFAULT_OPS_FACTORY) -> None:
        self.cfg = cfg
        self.factory_spec = factory_spec
        self.key = hmac_key(cfg)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, Any] = {}
        self._recovering: dict[int, Any] = {}
        self._stop = threading.Event()
        self._ns_daemon: Any = None
        self.log_receiver: bmi_log.LogReceiver | None = None

    def start_logging(self) -> None:
        """Be the one writer of ims.log: workers send their records here."""
        handler = bmi_log.setup(self.cfg, "einstein")
        if handler is not None:
            self.log_receiver = bmi_log.LogReceiver(handler).start()

    @property
    def _log_address(self) -> str | None:
        return self.log_receiver.address if self.log_receiver else None

    def recover(self) -> dict[str, Any]:
        """Finish or roll back what a crash left half-done, once, before serving."""
        if self.factory_spec == DEFAULT_OPS_FACTORY:  # the real database: its schema first, before any worker
            from ims.database import migrate
            migrate.upgrade(self.cfg.db_url)
        ops = load_factory(self.factory_spec)(self.cfg)
        try:
            # tgtd may have been restarted (and its targets renumbered, or lost) while Einstein was
            # down: re-read every target's tid by IQN and re-create missing ones before anything
            # acts on a target.  Only here, before any worker runs: no operation can race it.
            takeover.prepare(ops)  # several hosts: join, and drop targets another host took over
            iscsi = getattr(ops, "iscsi", None)
            if iscsi is not None:
                restored = iscsi.restore()
                if restored:
                    LOG.warning("re-created %d iSCSI target(s) missing from the target daemon", restored)
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
                                 args=(self.cfg.path, index, self.factory_spec, os.getpid(), self._log_address))
        proc.start()
        self._workers[index] = proc
        LOG.info("started worker %d (pid %d)", index, proc.pid)

    def _start_recovery(self, index: int) -> None:
        proc = self._ctx.Process(target=recover_main, name=f"einstein-recovery-{index}",
                                 args=(self.cfg.path, self.factory_spec, self._log_address))
        proc.start()
        self._recovering[index] = (proc, time.monotonic())
        LOG.info("recovering the operations of worker %d before restarting it (pid %d)", index, proc.pid)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def _tick(self) -> None:
        for index, proc in list(self._workers.items()):
            if index in self._recovering or proc.is_alive():
                continue
            LOG.error("worker %d (pid %s) exited with %s; restarting", index, proc.pid, proc.exitcode)
            time.sleep(_RESTART_BACKOFF_SECONDS if proc.exitcode not in (0, -signal.SIGKILL) else 0)
            self._start_recovery(index)
        for index, (rproc, started) in list(self._recovering.items()):
            if rproc.is_alive() and time.monotonic() - started < _RECOVERY_MAX_SECONDS:
                continue
            if rproc.is_alive():  # a hung recovery must not keep the worker down: locks recover on use too
                LOG.error("recovery for worker %d still running after %.0f s; restarting the worker anyway",
                          index, _RECOVERY_MAX_SECONDS)
                rproc.kill()
            rproc.join(5)
            if rproc.exitcode != 0:
                LOG.error("recovery for worker %d ended with %s", index, rproc.exitcode)
            del self._recovering[index]
            self._spawn(index)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start_name_server()
        takeover.start_agent(self.cfg, load_factory(self.factory_spec), self._stop)  # heartbeat, take-over
        try:
            for index in range(self.cfg.rpc.workers):
                self._spawn(index)
            while not self._stop.wait(0.2):
                self._tick()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Drain: each worker stops taking calls and finishes running ones (``[rpc] drain_seconds``)."""
        LOG.info("stopping: draining the workers (up to %.0f s)", self.cfg.rpc.drain_seconds)
        for rproc, _started in self._recovering.values():
            rproc.join(_RECOVERY_MAX_SECONDS)
            if rproc.is_alive():
                rproc.kill()
        for proc in self._workers.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + self.cfg.rpc.drain_seconds + _DRAIN_GRACE_SECONDS
        for proc in self._workers.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                LOG.error("worker pid %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        if self._ns_daemon is not None:
            self._ns_daemon.shutdown()
            self._ns_daemon = None
        LOG.info("einstein stopped")
        if self.log_receiver is not None:
            self.log_receiver.stop()
            self.log_receiver = None


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
        supervisor = Supervisor(cfg, opts.ops_factory)
        supervisor.start_logging()
        supervisor.recover()
    except ConfigError as exc:
        LOG.error("%s", exc)
        return 1
    supervisor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one object Einstein exposes over Pyro4: ``call(method, args, kwargs) -> dict``."""
from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any

import Pyro4

from ims.common.errors import BMIError, InvalidInput, ServiceUnavailable, to_wire
from ims.einstein import routing
from ims.rpc.methods import ALLOWED_METHODS

LOG = logging.getLogger(__name__)


def _unknown() -> dict[str, Any]:
    return {"ok": False, "error": InvalidInput("unknown operation").to_dict()}


@Pyro4.expose
class EinsteinEndpoint:
    """Wraps an operations object; errors come back as plain data, never a traceback.

    While draining (SIGTERM) new calls are refused with a 503 marked ``not_started`` (the
    client may send them to another worker), and :meth:`wait_idle` waits for running ones.
    """

    def __init__(self, ops: Any) -> None:
        self._ops = ops
        self._idle = threading.Condition()
        self._running = 0
        self._draining = False

    def start_draining(self) -> None:
        with self._idle:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running (True) or ``timeout`` seconds passed (False).

        Then, within the same ``timeout``, this worker's asynchronous operations: queued and
        running ones may finish; those that never started are marked failed (nothing was done).
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            idle = self._idle.wait_for(lambda: self._running == 0, timeout)
        drain = getattr(self._ops, "drain_tasks", None)
        if drain is not None:
            idle = drain(max(0.0, deadline - time.monotonic())) and idle
        return idle

    def call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        with self._idle:
            if self._draining:
                error = ServiceUnavailable("this BMI back-end worker is shutting down; try again")
                return {"ok": False, "error": error.to_dict(), "not_started": True}
            self._running += 1
        try:
            return self._call(method, args, kwargs)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def _call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(method, str) or method not in ALLOWED_METHODS:
            LOG.warning("refused RPC call to unknown operation %.64r", method)
            return _unknown()
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            return {"ok": False, "error": InvalidInput("malformed call").to_dict()}
        func = routing.resolve(self._ops, method)  # several hosts: a node's call runs on its gateway host
        try:
            # Check the arity before calling so a TypeError raised inside an operation is
            # not mistaken for a bad call (and vice versa).
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as exc:
            LOG.info("%s called with wrong arguments: %s", method, exc)
            return {"ok": False, "error": InvalidInput(f"wrong arguments for {method}").to_dict()}
        user = _user_of(args, kwargs)
        started = time.monotonic()
        try:
            result = func(*args, **kwargs)
        except BMIError as exc:
            # Expected failures: log one line (no traceback, no arguments: they hold credentials).
            LOG.info("%s by %s failed in %.0f ms: %s (%s): %s", method, user, _ms(started), type(exc).__name__,
                     exc.status, exc)
            return {"ok": False, "error": to_wire(exc)}
        except Exception as exc:
            LOG.exception("%s by %s crashed", method, user)
            return {"ok": False, "error": to_wire(exc)}
        LOG.info("%s by %s ok in %.0f ms", method, user, _ms(started))
        return {"ok": True, "result": result}


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _user_of(args: Any, kwargs: dict[str, Any]) -> str:
    """The caller's user name (never the password) for the audit line."""
    auth = args[0] if args else kwargs.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("username"), str):
        return auth["username"][:64]
    return "-"

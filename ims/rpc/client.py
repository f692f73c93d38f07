"""Client side of Einstein: round-robin over the workers registered in the name server."""
from __future__ import annotations

import itertools
import logging
import select
import threading
from collections import OrderedDict
from functools import partial
from typing import Any

import Pyro4
import Pyro4.errors
import Pyro4.naming

from ims.common.errors import BMIError, ServiceUnavailable, from_wire
from ims.rpc.methods import ALLOWED_METHODS, NAME_PREFIX, READ_ONLY_METHODS

LOG = logging.getLogger(__name__)

_UNREACHABLE = "the BMI back-end (Einstein) cannot be reached; try again later"

# Calls about one operation go to the worker that accepted it: that worker runs it and wakes its
# waiters the moment it ends, where another worker polls the database (up to every 0.1 s).
_SUBMITS = frozenset({"submit", "submit_batch"})
_ABOUT_ONE = frozenset({"operation_wait", "operation_show"})
_AFFINITY_MAX = 4096


class EinsteinClient:
    """Thread-safe RPC client.  ``client.provision(auth, ...)`` calls that operation on a worker.

    Each thread keeps its own proxies (a Pyro4 proxy serialises calls) and calls are spread
    round-robin.  A call is moved to another worker only when it surely did not start
    there (see :meth:`call`).  Operation errors are re-raised as BMIError subclasses.
    """

    def __init__(self, cfg: Any) -> None:
        from ims.rpc.server import configure_pyro

        configure_pyro()
        rpc = cfg.rpc
        self._ns_host = rpc.name_server_ip
        self._ns_port = rpc.name_server_port
        self._key = rpc.hmac_key.encode("utf-8") if rpc.hmac_key else None
        self._timeout = rpc.timeout
        self._local = threading.local()
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._uris: list[str] = []
        self._owner_of: OrderedDict[int, str] = OrderedDict()  # operation id -> worker uri that accepted it

    # --- discovery --------------------------------------------------------------------
    def _refresh(self) -> list[str]:
        try:
            with Pyro4.naming.locateNS(self._ns_host, self._ns_port, broadcast=False, hmac_key=self._key) as ns:
                found = ns.list(prefix=NAME_PREFIX)
        except (Pyro4.errors.NamingError, Pyro4.errors.CommunicationError) as exc:
            LOG.error("cannot reach the Einstein name server at %s:%s: %s", self._ns_host, self._ns_port, exc)
            raise ServiceUnavailable(_UNREACHABLE) from None
        uris = [str(found[name]) for name in sorted(found)]
        if not uris:
            raise ServiceUnavailable("no Einstein worker is registered; try again later")
        with self._lock:
            self._uris = uris
        return uris

    def _next_uri(self) -> str:
        with self._lock:
            uris = self._uris
        if not uris:
            uris = self._refresh()
        return uris[next(self._counter) % len(uris)]

    def _proxy(self, uri: str) -> Any:
        proxies: dict[str, Any] = self._local.__dict__.setdefault("proxies", {})
        proxy = proxies.get(uri)
        if proxy is None:
            proxy = Pyro4.Proxy(uri)
            if self._key:
                proxy._pyroHmacKey = self._key
            proxy._pyroTimeout = self._timeout
            proxies[uri] = proxy
        return proxy

    def _drop(self, uri: str) -> None:
        proxy = self._local.__dict__.get("proxies", {}).pop(uri, None)
        if proxy is not None:
            proxy._pyroRelease()

    def _affine_uri(self, method: str, args: tuple[Any, ...]) -> str | None:
        if method not in _ABOUT_ONE or len(args) < 2 or not isinstance(args[1], int):
            return None
        with self._lock:
            uri = self._owner_of.get(args[1])
            return uri if uri in self._uris else None

    def _remember(self, uri: str, result: Any) -> None:
        records = result if isinstance(result, list) else [result]
        with self._lock:
            for record in records:
                if isinstance(record, dict) and isinstance(record.get("id"), int):
                    self._owner_of[record["id"]] = uri
            while len(self._owner_of) > _AFFINITY_MAX:
                self._owner_of.popitem(last=False)

    # --- calls ------------------------------------------------------------------------
    def _connected(self, uri: str) -> Any | None:
        """A proxy connected to ``uri`` (connecting now if needed), or None if the worker cannot be reached."""
        proxy = self._proxy(uri)
        conn = getattr(proxy, "_pyroConnection", None)
        if conn is not None and _peer_closed(conn):
            self._drop(uri)  # the worker went away since our last call: nothing was sent on this one
            proxy = self._proxy(uri)
        try:
            proxy._pyroBind()
        except Pyro4.errors.CommunicationError as exc:
            LOG.warning("cannot connect to %s (%s)", uri, exc)
            self._drop(uri)
            return None
        return proxy

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on a worker; returns its result or raises the BMIError it raised.

        A worker that cannot be connected to, or that refuses the call unstarted (it is
        draining), is skipped for another one.  Once the request may have reached a worker,
        only a read-only method is sent again; a mutation answers ServiceUnavailable saying
        it may or may not have completed (it is never run twice).
        """
        attempts = 0
        resent = False
        while True:
            attempts += 1
            if attempts > 1:
                self._refresh()
            uri = (self._affine_uri(method, args) if attempts == 1 else None) or self._next_uri()
            proxy = self._connected(uri)
            if proxy is None:
                if attempts >= max(2, len(self._uris) + 1):
                    raise ServiceUnavailable(_UNREACHABLE)
                continue
            try:
                reply = proxy.call(method, list(args), kwargs)
            except Pyro4.errors.TimeoutError:
                self._drop(uri)
                raise ServiceUnavailable(f"{method} timed out waiting for the BMI back-end; it may or may not "
                                         "have completed") from None
            except Pyro4.errors.CommunicationError as exc:  # includes ConnectionClosedError
                self._drop(uri)
                if method in READ_ONLY_METHODS and not resent:
                    LOG.warning("RPC %s to %s failed (%s); sending it once more", method, uri, exc)
                    resent = True
                    continue
                LOG.error("RPC %s to %s broke after it was sent: %s", method, uri, exc)
                raise ServiceUnavailable(f"the BMI back-end stopped while running {method}; it may or may not "
                                         "have completed: check before trying again") from None
            if not isinstance(reply, dict):
                raise BMIError("malformed reply from the BMI back-end")
            if reply.get("ok"):
                result = reply.get("result")
                if method in _SUBMITS:
                    self._remember(uri, result)
                return result
            if reply.get("not_started") and attempts <= len(self._uris) + 1:
                continue  # that worker is shutting down and did not start it: try another
            raise from_wire(reply.get("error") or {})

    def __getattr__(self, name: str) -> Any:
        if name in ALLOWED_METHODS:
            return partial(self.call, name)
        raise AttributeError(name)

    def close(self) -> None:
        for uri in list(self._local.__dict__.get("proxies", {})):
            self._drop(uri)


def _peer_closed(conn: Any) -> bool:
    """True if the worker closed (or reset) this idle connection: it is readable before we asked anything."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return True
    try:
        readable, _w, _x = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)

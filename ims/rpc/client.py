"""Client side of Einstein: round-robin over the workers registered in the name server."""
from __future__ import annotations

import itertools
import logging
import threading
from functools import partial
from typing import Any

import Pyro4
import Pyro4.errors
import Pyro4.naming

from ims.common.errors import BMIError, ServiceUnavailable, from_wire
from ims.rpc.methods import ALLOWED_METHODS, NAME_PREFIX

LOG = logging.getLogger(__name__)

_UNREACHABLE = "the BMI back-end (Einstein) cannot be reached; try again later"


class EinsteinClient:
    """Thread-safe RPC client.  ``client.provision(auth, ...)`` calls that operation on a worker.

    Each thread keeps its own proxies (a Pyro4 proxy serialises calls), calls are spread
    round-robin, and a call that hits a dead connection (worker restarted) is retried
    once on a fresh proxy.  Operation errors are re-raised as BMIError subclasses.
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

    # --- calls ------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on a worker; returns its result or raises the BMIError it raised."""
        uri = self._next_uri()
        try:
            reply = self._proxy(uri).call(method, list(args), kwargs)
        except Pyro4.errors.CommunicationError as exc:  # includes ConnectionClosed and TimeoutError
            if isinstance(exc, Pyro4.errors.TimeoutError):
                self._drop(uri)
                raise ServiceUnavailable(f"{method} timed out waiting for the BMI back-end") from None
            LOG.warning("RPC to %s failed (%s); reconnecting once", uri, exc)
            self._drop(uri)
            try:
                uri = self._refresh()[next(self._counter) % len(self._uris)]
                reply = self._proxy(uri).call(method, list(args), kwargs)
            except Pyro4.errors.CommunicationError as exc2:
                self._drop(uri)
                LOG.error("RPC to %s failed again: %s", uri, exc2)
                raise ServiceUnavailable(_UNREACHABLE) from None
        if not isinstance(reply, dict):
            raise BMIError("malformed reply from the BMI back-end")
        if reply.get("ok"):
            return reply.get("result")
        raise from_wire(reply.get("error") or {})

    def __getattr__(self, name: str) -> Any:
        if name in ALLOWED_METHODS:
            return partial(self.call, name)
        raise AttributeError(name)

    def close(self) -> None:
        for uri in list(self._local.__dict__.get("proxies", {})):
            self._drop(uri)

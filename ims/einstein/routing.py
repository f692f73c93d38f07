"""Several hosts: a call about a node's target runs on that node's gateway host.

A host can only drive its OWN tgtd (tgtadm talks over a local unix socket), so Picasso may send
any call to any live host and the Einstein worker that receives a call which touches a node's
target forwards it to the right host:

* ``provision`` (and ``submit``/``submit_batch`` of it): the host the hash ring over the live
  hosts picks for the node (hosts.py); that host makes the target and records itself as the
  provision's gateway;
* ``deprovision`` (same): the gateway the provision recorded;
* ``boot_script``: the recorded gateway (the script names that gateway's portal).

Everything else (images, snapshots, listings) touches only Ceph and the database: it runs
where it arrives.  The forwarded call is ``routed_call`` on the other host's workers (found
through its Pyro name server, whose address the ``host`` table holds): it runs there as is and
is never forwarded again, so two hosts with momentarily different views cannot bounce a call.
A gateway that is down (not yet taken over) answers 503: try again once it has been taken over.
"""
from __future__ import annotations

import functools
import logging
import threading
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from ims.common.errors import BMIError, InvalidInput, ServiceUnavailable
from ims.database.models import Provision

LOG = logging.getLogger(__name__)

ROUTED = frozenset({"provision", "deprovision", "submit", "submit_batch", "boot_script"})
NODE_VERBS = frozenset({"provision", "deprovision"})


class Router:
    def __init__(self, ops: Any) -> None:
        self.ops = ops
        self.hosts = ops.hosts
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    # --- where ---------------------------------------------------------------------
    def host_for(self, verb: str, kwargs: dict[str, Any]) -> str | None:
        """The host that must run ``verb`` on ``kwargs``'s node; None = here."""
        node = kwargs.get("node")
        if verb not in NODE_VERBS or not isinstance(node, str) or not self.hosts.multi():
            return None
        if verb == "provision":
            # Always the ring: a node still recorded (provisioned: 409, or a deprovision the journal
            # is finishing) is answered by the ring's host as well as by any other.
            host = self.hosts.gateway_for(node)
            return None if host in (None, self.hosts.name) else host
        with self.ops.core.session() as session:
            recorded = session.scalar(select(Provision.gateway).where(Provision.node == node))
        return self._usable(recorded) if recorded is not None else None

    def _usable(self, host: str) -> str | None:
        if host == self.hosts.name:
            return None
        info = self.hosts.rows().get(host)
        if info is None:
            return None  # a row stamped by an unregistered (single) host: act here
        if not self.hosts.is_live(info):
            raise ServiceUnavailable(f"the gateway host {host} of this node is down; its nodes are being taken "
                                     "over by another host: try again in a few seconds")
        return host

    # --- calls ---------------------------------------------------------------------
    def resolve(self, method: str) -> Any:
        local = getattr(self.ops, method)
        if method not in ROUTED:
            return local

        @functools.wraps(local)
        def routed(*args: Any, **kwargs: Any) -> Any:
            return self._route(method, local, args, kwargs)

        return routed

    def _route(self, method: str, local: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "boot_script":
            return self._boot_script(local, args, kwargs)
        if method in NODE_VERBS:
            bound = _bind(local, args, kwargs)
            host = self.host_for(method, bound)
            return local(*args, **kwargs) if host is None else self.forward(host, method, args, kwargs)
        bound = _bind(local, args, kwargs)
        verb = bound.get("verb")
        if method == "submit":
            item = bound.get("kwargs")
            host = self.host_for(verb, item) if isinstance(item, dict) else None
            return local(*args, **kwargs) if host is None else self.forward(host, method, args, kwargs)
        return self._batch(local, bound)

    def _boot_script(self, local: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.hosts.multi():
            return local(*args, **kwargs)
        mac = _bind(local, args, kwargs).get("mac")
        with self.ops.core.session() as session:
            gateway = session.scalar(select(Provision.gateway).where(Provision.mac == str(mac).lower()))
        host = self._usable(gateway) if gateway else None
        return local(*args, **kwargs) if host is None else self.forward(host, "boot_script", args, kwargs)

    def _batch(self, local: Any, bound: dict[str, Any]) -> Any:
        auth, verb, items = bound.get("auth"), bound.get("verb"), bound.get("items")
        if not isinstance(items, list) or not items or not self.hosts.multi():
            return local(auth, verb, items)
        groups: dict[str | None, list[int]] = {}
        for index, item in enumerate(items):
            host = self.host_for(verb, item) if isinstance(item, dict) else None
            groups.setdefault(host, []).append(index)
        if len(groups) == 1:
            host = next(iter(groups))
            return local(auth, verb, items) if host is None else self.forward(host, "submit_batch",
                                                                                (auth, verb, items), {})
        # One sub-batch per host; the records come back in the caller's order.
        records: list[Any] = [None] * len(items)
        accepted: list[int] = []
        for host, indexes in groups.items():
            part = [items[i] for i in indexes]
            try:
                got = local(auth, verb, part) if host is None else self.forward(host, "submit_batch",
                                                                                (auth, verb, part), {})
            except BMIError as exc:
                if accepted:
                    exc.message = (f"{exc.message} (items {', '.join(map(str, sorted(accepted)))} of this batch "
                                   "were accepted on other hosts: check their operations before retrying)")
                    exc.args = (exc.message,)
                raise
            for i, record in zip(indexes, got, strict=True):
                records[i] = record
            accepted.extend(indexes)
        return records

    def forward(self, host: str, method: str, args: Any, kwargs: dict[str, Any]) -> Any:
        info = self.hosts.rows().get(host)
        if info is None:
            raise ServiceUnavailable(f"host {host} is not registered; try again")
        LOG.debug("%s for host %s forwarded to its name server %s", method, host, info.rpc)
        return self._client(host, info.rpc).call("routed_call", method, list(args), dict(kwargs))

    def _client(self, host: str, rpc: str) -> Any:
        from ims.rpc.client import EinsteinClient

        with self._lock:
            client = self._clients.get((host, rpc))
            if client is None:
                ip, _, port = rpc.rpartition(":")
                own = self.ops.cfg.rpc
                view = SimpleNamespace(rpc=SimpleNamespace(name_server_ip=ip, name_server_port=int(port),
                                                           hmac_key=own.hmac_key, timeout=own.timeout))
                client = self._clients[(host, rpc)] = EinsteinClient(view)
            return client

    def run_here(self, method: str, args: Any, kwargs: Any) -> Any:
        """``routed_call``: another host sent this call here; run it, never forward it again."""
        if method not in ROUTED or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidInput("this call cannot be routed")
        func = getattr(self.ops, method)
        try:
            _bind(func, tuple(args), kwargs)
        except TypeError as exc:
            raise InvalidInput(f"wrong arguments for {method}: {exc}") from None
        return func(*args, **kwargs)


def _bind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    import inspect

    return dict(inspect.signature(func).bind(*args, **kwargs).arguments)


def resolve(ops: Any, method: str) -> Any:
    """What the RPC endpoint calls for ``method``: routed when ``ops`` has a router (several hosts)."""
    router = getattr(ops, "router", None)
    if router is None or getattr(router, "ops", None) is not ops:  # e.g. a wrapper that delegates to Operations
        return getattr(ops, method)
    return router.resolve(method)

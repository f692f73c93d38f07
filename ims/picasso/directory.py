"""Several hosts: Picasso reaches any live host, with the database as the directory.

Picasso talks to the Einstein name server of ``[rpc] name_server_ip:port`` (its own host's).  When
that one cannot be reached (its host died), :class:`DirectoryClient` reads the ``host`` table
(ims/einstein/hosts.py: each live host's name server address, fresh heartbeats only) and moves to
another live host's name server; every host forwards node calls to the node's gateway host
(ims/einstein/routing.py), so any live host serves every call.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from ims.common.errors import ServiceUnavailable
from ims.rpc.client import EinsteinClient

LOG = logging.getLogger(__name__)


class DirectoryClient(EinsteinClient):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._cfg = cfg
        self._hosts: Any = None
        self._dir_lock = threading.Lock()

    def _live_name_servers(self) -> list[tuple[str, int]]:
        with self._dir_lock:
            if self._hosts is None:
                from ims.database import make_engine, make_session_factory
                from ims.einstein.hosts import Hosts

                engine = make_engine(self._cfg.db_url, self._cfg.db.busy_timeout_ms)
                self._hosts = Hosts(self._cfg, make_session_factory(engine), engine)
            hosts = self._hosts
        rows = hosts.rows(fresh=True)
        found = []
        for name in hosts.live(fresh=False):
            ip, _, port = rows[name].rpc.rpartition(":")
            found.append((ip, int(port)))
        return found

    def _refresh(self) -> list[str]:
        try:
            return super()._refresh()
        except ServiceUnavailable:
            current = (self._ns_host, self._ns_port)
            try:
                candidates = [a for a in self._live_name_servers() if a != current]
            except Exception as exc:  # noqa: BLE001 - no directory: the original error stands
                LOG.warning("the host directory (database) cannot be read: %s", exc)
                raise ServiceUnavailable("the BMI back-end (Einstein) cannot be reached; try again later") from None
            for ip, port in candidates:
                self._ns_host, self._ns_port = ip, port
                try:
                    uris = super()._refresh()
                except ServiceUnavailable:
                    continue
                LOG.warning("Einstein name server %s:%s unreachable: now using live host %s:%s",
                            current[0], current[1], ip, port)
                return uris
            self._ns_host, self._ns_port = current
            raise

"""Several hosts: the host registry (heartbeats in the database) and the consistent hash ring.

Every Einstein supervisor is a *host* (``[host] name``): it registers a ``host`` row (its tgt
portal ``[iscsi] ip:port``, its Pyro name server ``[rpc] name_server_ip:port``) and heart-beats
every ``[host] heartbeat_seconds``.  A host is *live* while its row is ``up`` and its heartbeat
is younger than ``[host] dead_after_seconds``.

Placement: a node's target goes to the gateway the consistent hash ring over the live hosts
picks for the node's name, and the provision row records it (``provision.gateway``, stamped on
insert by the host that makes the target: the call was routed there, see routing.py).  A
consistent ring moves only about 1/N of the nodes when a host joins or leaves, and every host
computes the same ring from the same rows, with no coordinator.

Liveness of lock and journal owners (``host:pid:start``): an owner on another host is alive
while that host is live (journal.HOST["alive"]); on this host, /proc says (as before).

Clocks: heartbeats are compared with this host's clock (UTC); hosts must keep their clocks in
step (NTP), well within ``dead_after_seconds``.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ims.common.errors import ConfigError
from ims.database.models import Host, Provision
from ims.einstein import journal

LOG = logging.getLogger(__name__)

# Host names end up in owner strings ``host:pid:start`` and in file names: no ':' nor '/'.
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Points per host on the ring: enough for an even spread over a handful of hosts.
RING_REPLICAS = 64
# Reads of the host table are reused this long (owner checks happen on every contended lock).
CACHE_SECONDS = 0.5


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value  # SQLite: naive UTC


def local_name(cfg: Any) -> str:
    name = str(cfg.section("host").values.get("name") or "") or socket.gethostname().split(".")[0]
    if not HOST_NAME_RE.fullmatch(name):
        raise ConfigError(f"{cfg.path}: invalid [host] name {name!r}: use letters, digits, '.', '_', '-'")
    return name


class HashRing:
    """A consistent hash ring over host names (md5 points; the same on every host)."""

    def __init__(self, hosts: list[str], replicas: int = RING_REPLICAS) -> None:
        self.hosts = sorted(set(hosts))
        points = sorted((self._hash(f"{host}#{i}"), host) for host in self.hosts for i in range(replicas))
        self._keys = [p for p, _h in points]
        self._owners = [h for _p, h in points]

    @staticmethod
    def _hash(value: str) -> int:
        return int.from_bytes(hashlib.md5(value.encode("utf-8"), usedforsecurity=False).digest()[:8], "big")

    def get(self, key: str) -> str | None:
        """The host that owns ``key``; None on an empty ring."""
        if not self._keys:
            return None
        index = bisect.bisect(self._keys, self._hash(key)) % len(self._keys)
        return self._owners[index]


@dataclass(frozen=True)
class HostInfo:
    name: str
    portal: str
    rpc: str
    epoch: int
    state: str
    heartbeat_at: datetime


class Hosts:
    """This process's view of the host registry (one per Operations instance)."""

    def __init__(self, cfg: Any, sessions: sessionmaker[Session], engine: Any = None) -> None:
        section = cfg.section("host").values
        self.name = local_name(cfg)
        self.portal = f"{cfg.iscsi.ip}:{cfg.iscsi.port}"
        self.rpc = f"{cfg.rpc.name_server_ip}:{cfg.rpc.name_server_port}"
        self.heartbeat_seconds = float(section.get("heartbeat_seconds", 2.0))
        self.dead_after = float(section.get("dead_after_seconds", 10.0))
        if self.heartbeat_seconds <= 0 or self.dead_after <= self.heartbeat_seconds:
            raise ConfigError(f"{cfg.path}: [host] dead_after_seconds must exceed heartbeat_seconds (> 0)")
        self._sessions = sessions
        # Reads of the host table happen inside callers' transactions (owner liveness while a task
        # list is read): on their own autocommit connection, never waiting for a write lock that
        # the caller itself holds (SQLite WAL readers do not block; PostgreSQL reads never do).
        self._reader = _reader_engine(engine) if engine is not None else None
        self.epoch: int | None = None
        self._cache: tuple[float, dict[str, HostInfo]] = (0.0, {})
        self._lock = threading.Lock()

    # --- registry ------------------------------------------------------------------
    def session(self) -> Any:
        session = self._sessions()
        return _Tx(session)

    def register(self) -> int:
        """(Re)join: a new epoch, state up, a fresh heartbeat.  Returns the epoch."""
        now = datetime.now(UTC)
        for _ in range(3):
            try:
                with self.session() as session:
                    row = session.get(Host, self.name)
                    if row is None:
                        row = Host(name=self.name, portal=self.portal, rpc=self.rpc, epoch=1, state="up",
                                   heartbeat_at=now, started_at=now)
                        session.add(row)
                    else:
                        session.execute(update(Host).where(Host.name == self.name).values(
                            portal=self.portal, rpc=self.rpc, epoch=Host.epoch + 1, state="up", heartbeat_at=now,
                            started_at=now))
                    session.flush()
                    epoch = session.scalar(select(Host.epoch).where(Host.name == self.name))
            except IntegrityError:
                continue  # another process of this host inserted it first: update instead
            self.epoch = int(epoch or 1)
            self._cache = (0.0, {})
            LOG.info("host %s registered (portal %s, name server %s, epoch %d)", self.name, self.portal, self.rpc,
                     self.epoch)
            return self.epoch
        raise RuntimeError(f"host {self.name} could not register")

    def heartbeat(self) -> bool:
        """Refresh this host's heartbeat; False if it was fenced (its epoch moved on)."""
        with self.session() as session:
            done = session.execute(update(Host).where(Host.name == self.name, Host.epoch == self.epoch,
                                                      Host.state == "up")
                                   .values(heartbeat_at=datetime.now(UTC)))
        return bool(done.rowcount)

    def rows(self, fresh: bool = False) -> dict[str, HostInfo]:
        with self._lock:
            at, cached = self._cache
            if not fresh and time.monotonic() - at < CACHE_SECONDS:
                return cached
        query = select(Host.name, Host.portal, Host.rpc, Host.epoch, Host.state, Host.heartbeat_at)
        if self._reader is not None:
            with self._reader.connect() as conn:
                result = conn.execute(query).all()
        else:
            with self.session() as session:
                result = session.execute(query).all()
        found = {r.name: HostInfo(r.name, r.portal, r.rpc, r.epoch, r.state, _aware(r.heartbeat_at))
                 for r in result}
        with self._lock:
            self._cache = (time.monotonic(), found)
        return found

    def is_live(self, info: HostInfo, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return info.state == "up" and info.heartbeat_at >= now - timedelta(seconds=self.dead_after)

    def live(self, fresh: bool = False) -> list[str]:
        now = datetime.now(UTC)
        return sorted(name for name, info in self.rows(fresh).items() if self.is_live(info, now))

    def alive(self, host: str) -> bool:
        """Owner liveness for ``journal.owner_alive``: an unregistered host is not ours to judge."""
        info = self.rows().get(host)
        return True if info is None else self.is_live(info)

    def ring(self, fresh: bool = False) -> HashRing:
        return HashRing(self.live(fresh))

    def gateway_for(self, key: str) -> str | None:
        """The live host whose gateway should export ``key``'s target; None when no host is registered."""
        return self.ring().get(key)

    def secondary_for(self, key: str, primary: str | None = None, fresh: bool = False) -> str | None:
        """The host a take-over would move ``key``'s target to if ``primary`` (default: this host) died.

        That is the ring over the live hosts minus ``primary`` (what :meth:`HostAgent.elect` builds:
        the live hosts but the dead one); on a consistent ring it is the next host after the primary
        on ``key``'s walk, so every other node keeps its owner.  None when no other host is live.
        """
        primary = primary or self.name
        now = datetime.now(UTC)
        others = [name for name, info in self.rows(fresh).items() if name != primary and self.is_live(info, now)]
        return HashRing(others).get(key)

    def multi(self) -> bool:
        """True when another host than this one is registered (routing matters)."""
        return any(name != self.name for name in self.rows())


class _Tx:
    """``with`` a session in one transaction (commit on success)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __enter__(self) -> Session:
        self._ctx = self._session.begin()
        self._ctx.__enter__()
        return self._session

    def __exit__(self, *exc: Any) -> None:
        try:
            self._ctx.__exit__(*exc)
        finally:
            self._session.close()


_CURRENT: dict[str, Hosts] = {}


def _reader_engine(engine: Any) -> Any:
    reader = create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_pre_ping=engine.dialect.name != "sqlite")
    if reader.dialect.name == "sqlite":
        @event.listens_for(reader, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 30000")
            cur.close()
    return reader


def _stamp_gateway(_mapper: Any, _conn: Any, target: Provision) -> None:
    hosts = _CURRENT.get("hosts")
    if target.gateway is None and hosts is not None:
        target.gateway = hosts.name  # the target is made here: routing sent the call to this host


def secondary_portal(cfg: Any, key: str) -> str | None:
    """``[iscsi] multipath_boot``: the portal (``ip:port``) the node's iPXE script names second, or None.

    None (today's single-URI script) when the option is off, in a process without a host registry,
    or with no other live host.  The boot files are written by the node's gateway host (provision
    and boot_script are routed there, a take-over adopts here), so the primary is this host.
    """
    if not getattr(cfg.iscsi, "multipath_boot", False):
        return None
    hosts = _CURRENT.get("hosts")
    if hosts is None:
        return None
    secondary = hosts.secondary_for(key, fresh=True)
    info = hosts.rows().get(secondary) if secondary is not None else None
    if info is None or info.portal == hosts.portal:
        return None  # hosts sharing one portal: a second URI would be the same path
    return info.portal


def install(cfg: Any, sessions: sessionmaker[Session], engine: Any) -> Hosts:
    """This process is host ``[host] name``: owner strings, owner liveness and gateway stamping."""
    hosts = Hosts(cfg, sessions, engine)
    first = "hosts" not in _CURRENT
    _CURRENT["hosts"] = hosts
    journal.HOST["name"] = hosts.name
    journal.HOST["alive"] = lambda host: _CURRENT["hosts"].alive(host)
    if first:
        event.listen(Provision, "before_insert", _stamp_gateway)
    return hosts

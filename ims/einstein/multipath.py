"""Multipath boot, ACTIVE/PASSIVE: a node's disk is exported by ONE gateway at a time.

Why not active/active (two tgtd exporting the same RBD clone at once) -- measured with
``benchmarks/multipath_probe.py`` on real tgtd + tgt-rbd + Ceph 16, see docs/deployment.md "Multipath":

* tgt's rbd backing store keeps its own librbd handle (and cache) per gateway.  With the librbd
  cache in ``writeback`` mode (a plain ``ceph.conf`` setting on the gateway host) gateway B serves
  STALE blocks after a write through A, with or without the exclusive-lock feature.
* A gateway that hangs (not dies) with a write in flight delivers that old write after the node
  moved on to the other gateway: the newer data is overwritten.  Only fencing the old gateway's
  librados client (``ceph osd blocklist``) stops it, and only active/passive has a moment to fence
  (the take-over, before the target goes live on the new gateway).
* exclusive-lock would make the lock ping-pong on every alternating write; deprovision cannot
  delete a clone while any gateway still has it open.
* iPXE's multipath (``sanboot URI1 URI2``) uses ONE path at a time and the booted OS's iBFT names
  that one path, so a second live path buys no bandwidth, only a faster switch.

So the node's iPXE script names the target on its primary gateway AND on its secondary (the
gateway the take-over will move it to: on BMI's consistent hash ring, the next live host after
the primary).  While the primary serves, the secondary has no such target and iPXE's login there
fails at once; when the primary dies, the take-over first fences the primary's librbd clients of
that image (:func:`fence_image_clients`) and then creates the same IQN on the secondary, and
iPXE's retry (it re-opens every URI when the SAN target fails) attaches there.

:func:`sanboot_line` renders that line; :func:`san_uri` one RFC 4173 URI.  Caveat (docs/deployment.md,
"Open problem"): on the boot bed a node's initramfs re-login from the iBFT (``iscsistart -b``) did not
finish with a two-URI script, so an OS that does that should get ``sanboot_line(primary, None, ...)``.
That is why the product renders two URIs only with ``[iscsi] multipath_boot = true`` (default off):
``ims.einstein.hosts.secondary_portal`` picks the secondary, ``BootFiles.render_ipxe(secondary=)``
writes it.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import rados
import rbd

from ims.common.errors import ImageNotFound, InvalidInput, StorageError, TargetExists
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.storage import ceph as ceph_storage
from ims.einstein.storage.ceph import CephStorage

LOG = logging.getLogger(__name__)

# The same rules ims.einstein.boot applies: a newline or space would inject iPXE commands.
_IQN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,222}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}$")
# How long a fenced gateway's client stays blocklisted: far longer than a take-over, and a
# restarted tgtd gets new librados instances (new nonces), so it is not locked out by this.
DEFAULT_FENCE_SECONDS = 3600


@dataclass(frozen=True)
class Portal:
    """One gateway's iSCSI portal, as nodes reach it."""

    ip: str
    port: int = 3260

    def __post_init__(self) -> None:
        if not isinstance(self.ip, str) or not _HOST_RE.fullmatch(self.ip):
            raise InvalidInput(f"invalid iSCSI portal address {self.ip!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidInput(f"invalid iSCSI port {self.port!r}")

    @classmethod
    def parse(cls, value: Portal | str) -> Portal:
        """A :class:`Portal`, ``"ip"`` or ``"ip:port"`` (IPv4 or a host name)."""
        if isinstance(value, Portal):
            return value
        if not isinstance(value, str):
            raise InvalidInput(f"invalid iSCSI portal {value!r}")
        host, sep, port = value.rpartition(":")
        if not sep:
            return cls(value)
        if not port.isdigit():
            raise InvalidInput(f"invalid iSCSI portal {value!r}")
        return cls(host, int(port))


def _check_iqn(iqn: object) -> str:
    if not isinstance(iqn, str) or not _IQN_RE.fullmatch(iqn):
        raise InvalidInput(f"invalid target IQN {iqn!r}")
    return iqn


def _check_lun(lun: object) -> int:
    if isinstance(lun, bool) or not isinstance(lun, int) or not 1 <= lun <= 0x3FFF:
        # LUN 0 is tgt's controller: a node would sanboot nothing.
        raise InvalidInput(f"invalid LUN {lun!r}: must be 1-16383")
    return lun


def san_uri(portal: Portal | str, iqn: str, lun: int = 1) -> str:
    """``iscsi:<ip>:tcp:<port>:<lun>:<iqn>`` (RFC 4173 as iPXE reads it: the LUN in hexadecimal)."""
    p = Portal.parse(portal)
    return f"iscsi:{p.ip}:tcp:{p.port}:{_check_lun(lun):x}:{_check_iqn(iqn)}"


def sanboot_uris(primary: Portal | str, secondary: Portal | str | None, iqn: str, lun: int = 1) -> list[str]:
    """The node's SAN URIs, primary first; one URI when there is no secondary gateway (one host)."""
    first = Portal.parse(primary)
    uris = [san_uri(first, iqn, lun)]
    if secondary is not None:
        second = Portal.parse(secondary)
        if second == first:
            raise InvalidInput(f"the secondary gateway {second.ip}:{second.port} is the primary")
        uris.append(san_uri(second, iqn, lun))
    return uris


def sanboot_line(primary: Portal | str, secondary: Portal | str | None, iqn: str, lun: int = 1,
                 keep: bool = True) -> str:
    """The iPXE command booting the node's target through its primary or its secondary gateway.

    ``sanboot --keep URI_primary URI_secondary``: iPXE opens every URI, keeps the first one that
    logs in (only the gateway that exports the target does, see the module docstring) and, when
    that SAN target fails, re-opens them all.  ``--keep`` leaves the drive attached (iBFT) if the
    boot returns, like BMI's single-path line.  No newline.
    """
    return " ".join(["sanboot", *(["--keep"] if keep else []), *sanboot_uris(primary, secondary, iqn, lun)])


# --- fencing (the take-over's first step) ---------------------------------------------------
def image_clients(storage: CephStorage, image: str) -> list[dict[str, object]]:
    """The librados clients that have ``image`` open (its header watchers): ``[{addr, id, cookie}]``.

    Every tgtd LUN with an rbd backing store is one librados client of its own (tgt's bs_rbd
    connects per LUN), so on a gateway that exports the image, the image's watcher IS that
    gateway's LUN.  Our own connection's watches are left out.
    """
    ioctx = storage._ioctx()  # the shared per-process connection (storage/ceph.py)
    own_id = _cluster_of(storage).get_instance_id()
    try:
        with rbd.Image(ioctx, image, read_only=True) as img:
            watchers = [dict(w) for w in img.watchers_list()]
    except rbd.ImageNotFound as exc:
        raise ImageNotFound(f"image {image} not found") from exc
    except (rbd.Error, rados.Error) as exc:
        raise StorageError(f"cannot list the clients of image {image}: {exc}") from exc
    return [w for w in watchers if w.get("id") != own_id]


def fence_image_clients(storage: CephStorage, image: str, keep: Iterable[str] = (),
                        hosts: Iterable[str] | None = None,
                        expire_seconds: int = DEFAULT_FENCE_SECONDS) -> list[str]:
    """Blocklist the clients that have ``image`` open; returns their addresses.

    ``hosts``: fence only clients whose address is one of these IPs -- in a multi-host deployment
    the take-over passes the dead host's address(es) as Ceph sees them, so an Einstein worker of a
    LIVE host that happens to have the image open (a snapshot, a flatten) is never fenced: a
    blocklist covers its whole librados connection, which BMI shares per process.  ``None`` fences
    every client but our own: what BMI's take-over (``HostAgent.fence``) passes, under the node's
    locks (no BMI operation has the clone open then), because hosts may share an IP (one machine,
    a NAT) and an IP filter cannot tell their clients apart.  Each client is blocklisted by its
    exact address ``ip:port/nonce``, never by IP.  ``keep``: client addresses never fenced.

    Run by the take-over BEFORE the target goes live on the new gateway: a dead gateway's watch
    lingers ~30 s (and blocks ``rbd rm``), and a hung one would deliver its in-flight writes after
    the node moved on (measured: the newer data is lost).  Once blocklisted, that client's OSD
    requests fail and its watches go.  Safe to run again (blocklisting is idempotent).
    :raises StorageError: Ceph refused or is unreachable (nothing is made live then).
    """
    if isinstance(expire_seconds, bool) or not isinstance(expire_seconds, int) or expire_seconds < 1:
        raise InvalidInput(f"invalid fence expiry {expire_seconds!r}")
    kept = set(keep)
    only = None if hosts is None else {_ip_of(h) for h in hosts}
    fenced = []
    clients = image_clients(storage, image)  # connects first, so the connection below exists
    cluster = _cluster_of(storage)
    for watcher in clients:
        addr = str(watcher.get("addr", ""))
        if not addr or addr in kept:
            continue
        ip = _check_client_addr(addr)
        if only is not None and ip not in only:
            continue
        try:
            cluster.blocklist_add(addr, expire_seconds)
        except rados.Error as exc:
            raise StorageError(f"cannot blocklist client {addr} of image {image}: {exc}") from exc
        LOG.warning("fenced client %s of image %s (blocklisted for %d s)", addr, image, expire_seconds)
        fenced.append(addr)
    return fenced


def _cluster_of(storage: CephStorage) -> rados.Rados:
    # The per-process connection CephStorage opened (storage/ceph.py keeps one per identity).
    conn = ceph_storage._CONNECTIONS.get(storage._key)
    if conn is None:
        raise StorageError("no Ceph connection")
    return conn.cluster


def _ip_of(host: str) -> str:
    try:
        return str(ipaddress.ip_address(str(host).strip("[]")))
    except ValueError:
        raise InvalidInput(f"invalid host address {host!r}") from None


def _check_client_addr(addr: str) -> str:
    """The IP of a client address such as ``127.0.0.1:0/2975375630`` or ``v1:10.0.0.5:0/123``."""
    host, _, rest = addr.removeprefix("v1:").removeprefix("any:").rpartition(":")
    port, _, nonce = rest.partition("/")
    try:
        ip = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise StorageError(f"unexpected client address {addr!r}") from None
    if not port.isdigit() or not nonce.isdigit():
        raise StorageError(f"unexpected client address {addr!r}")
    return ip


def primary_and_secondary(ring_order: Sequence[Portal | str]) -> tuple[Portal, Portal | None]:
    """The first two distinct portals of a node's preference list (e.g. the hash ring's walk from the
    node's key over live hosts): where its target lives, and where a take-over would move it."""
    portals: list[Portal] = []
    for item in ring_order:
        p = Portal.parse(item)
        if p not in portals:
            portals.append(p)
        if len(portals) == 2:
            break
    if not portals:
        raise InvalidInput("no gateway for the node")
    return portals[0], portals[1] if len(portals) > 1 else None


def fail_over(storage: CephStorage, image: str, iscsi: IscsiTarget, target: str,
              initiators: list[str] | None = None, initiator_names: list[str] | None = None,
              dead_hosts: Iterable[str] | None = None) -> list[str]:
    """Move a node's target to the gateway ``iscsi`` drives, in the only safe order; returns the fenced clients.

    1. fence the old gateway's clients of ``image`` (:func:`fence_image_clients`, ``dead_hosts``);
    2. export ``image`` under ``target`` on the new gateway (the same IQN the node's script names).

    Re-runnable after a crash at any point: if the target is already live here on this image, the
    fence came first (this order), so nothing is fenced again -- a second fence could hit the new
    gateway's own LUN when both gateways share an address (one machine); fencing is idempotent.
    :raises StorageError: fencing failed -- nothing was made live (a live target without the fence
        could take the late writes of a hung old gateway).
    :raises IscsiError: the new gateway failed (the fence stands; run again).
    """
    backing = storage.backing(image)
    if _live_on(iscsi, target, backing.path):
        LOG.info("target %s already live on the new gateway (backing %s)", target, backing.path)
        return []
    fenced = fence_image_clients(storage, image, hosts=dead_hosts)
    try:
        iscsi.add_target(target, backing, initiators, initiator_names)
    except TargetExists:
        if not _live_on(iscsi, target, backing.path):
            raise
    return fenced


def _live_on(iscsi: IscsiTarget, target: str, path: str) -> bool:
    live_target = getattr(iscsi, "live_target", None)  # TgtTarget's one-show view of tgtd
    live = live_target(target) if live_target is not None else None
    return live is not None and path in live.backing_stores.values()

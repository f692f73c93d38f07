"""Several hosts: heartbeat, take-over of a dead host's nodes, and fencing (docs/deployment.md).

Each Einstein supervisor runs one :class:`HostAgent` thread.  Every ``[host] heartbeat_seconds``:

1. **Heartbeat**: ``UPDATE host SET heartbeat_at = now WHERE name = me AND epoch = my epoch AND
   state = 'up'``.  No row updated means another host took this one over (it bumped the epoch):
   this host is *fenced*: it removes its local targets that now belong to other gateways and
   joins again under a new epoch (new nodes may be placed on it again).
2. **Election**: a host whose heartbeat is older than ``[host] dead_after_seconds`` is taken over
   by exactly one live host: the conditional ``UPDATE host SET state = 'dead', epoch = epoch + 1
   WHERE name = X AND epoch = E AND state = 'up' AND heartbeat_at < cutoff`` succeeds for one
   racer only (SQLite serializes writers; PostgreSQL re-checks the WHERE on the locked row).  In
   the same transaction the winner moves every provision of X to the gateway the ring over the
   live hosts picks (``provision.gateway``): the database alone says where each node's target
   lives from now on.  Then it finishes X's unfinished operations under their locks (the
   journal's recovery: X's owners count as dead once X is stale or dead).
3. **Adoption**: every host makes the targets recorded on it that its tgtd lacks: under the
   node's locks (which first finishes whatever the dead host left half-done on that node, e.g.
   rolls back its half-made provision, so the row may vanish), it fences the clone's other Ceph
   clients (the old gateway's LUN: a hung tgtd must never deliver a late write; :meth:`HostAgent.fence`),
   adds the target for the clone (the clone lives in Ceph: the disk survives) and rewrites the
   node's boot files, which now name this host's portal (and, with ``[iscsi] multipath_boot``, the
   next host on the ring second: where a further take-over would go).
4. **Fence sweep**: a local target whose provision is recorded on ANOTHER gateway is removed
   (with its conf file, so a tgtd restart does not bring it back): a host that comes back after
   being taken over never exports a node twice, and never fights for it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from ims.common.errors import BMIError, NodeBusy
from ims.database.models import Host, Image, Lock, Operation, Project, Provision
from ims.einstein import journal
from ims.einstein.hosts import HashRing
from ims.einstein.ops.provisioning import boot_params

LOG = logging.getLogger(__name__)


class HostAgent:
    """``ops`` (an Operations) is needed only to act on targets: with ``factory`` it is built the first
    time another host is registered, so a single host heart-beats without a second Ceph connection."""

    def __init__(self, ops: Any = None, hosts: Any = None, factory: Callable[[], Any] | None = None) -> None:
        self._ops = ops
        self._factory = factory
        self.hosts = hosts if hosts is not None else ops.hosts

    @property
    def ops(self) -> Any:
        if self._ops is None:
            assert self._factory is not None
            self._ops = self._factory()
            self._ops.hosts.epoch = self.hosts.epoch
            self.hosts = self._ops.hosts  # one registry view from here on
        return self._ops

    @property
    def core(self) -> Any:
        return self.ops.core

    @property
    def steps(self) -> Any:
        return self.ops._provisioning.steps

    @property
    def _clone_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.core.uid)}img(\d+)$")

    # --- the loop --------------------------------------------------------------------
    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._loop, args=(stop,), name="host-agent", daemon=True)
        thread.start()
        return thread

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.hosts.heartbeat_seconds):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - e.g. the database briefly unreachable: next round
                LOG.exception("host agent round failed")

    def tick(self) -> None:
        if not self.hosts.heartbeat():
            LOG.error("host %s was taken over by another host (epoch %s is stale; it was stalled or cut off): "
                      "stopping its workers, removing its targets that now live elsewhere, then joining again",
                      self.hosts.name, self.hosts.epoch)
            stop_workers()
            self.sweep()
            self.hosts.register()
        if self._ops is None and not self.hosts.multi():
            return  # a single host: nothing to take over, nobody to fence
        self.elect()
        self.sweep()
        self.adopt_all()

    # --- election --------------------------------------------------------------------
    def elect(self) -> list[str]:
        now = datetime.now(UTC)
        cutoff = now - timedelta(seconds=self.hosts.dead_after)
        rows = self.hosts.rows(fresh=True)
        taken = []
        for info in rows.values():
            if info.name == self.hosts.name or info.state != "up" or info.heartbeat_at >= cutoff:
                continue
            live = [n for n, i in rows.items() if n != info.name and self.hosts.is_live(i, now)]
            if self.hosts.name not in live:
                live.append(self.hosts.name)
            moved = self.take_over(info.name, info.epoch, cutoff, HashRing(live))
            if moved is not None:
                taken.append(info.name)
        return taken

    def take_over(self, dead: str, epoch: int, cutoff: datetime, ring: HashRing) -> int | None:
        """Fence ``dead`` and move its provisions to ``ring``'s gateways, if this host wins; else None."""
        started = time.monotonic()
        with self.hosts.session() as session:
            won = session.execute(update(Host).where(Host.name == dead, Host.epoch == epoch, Host.state == "up",
                                                     Host.heartbeat_at < cutoff)
                                  .values(state="dead", epoch=Host.epoch + 1, taken_over_at=datetime.now(UTC),
                                          taken_over_by=self.hosts.name))
            if not won.rowcount:
                return None
            nodes = list(session.scalars(select(Provision.node).where(Provision.gateway == dead)))
            for node in nodes:
                session.execute(update(Provision).where(Provision.node == node, Provision.gateway == dead)
                                .values(gateway=ring.get(node)))
        LOG.warning("host %s missed its heartbeats for %.0f s: taken over by %s; its %d node(s) move to %s",
                    dead, self.hosts.dead_after, self.hosts.name, len(nodes), ", ".join(ring.hosts))
        try:
            # Its owners are dead now: finish its operations under their locks.  A clone its tgtd had
            # exported for a half-made provision is fenced before it is removed (RecoveryContext.fence).
            summary = self.ops.recover(fence=lambda clone: self.fence(clone, "removing it"))
            LOG.info("operations of host %s finished: %s", dead,
                     {k: len(v) for k, v in summary.items() if isinstance(v, list) and v})
        except Exception:  # noqa: BLE001 - every host's periodic recovery retries it
            LOG.exception("finishing the operations of host %s failed; they are retried", dead)
        LOG.info("take-over of host %s: %.2f s", dead, time.monotonic() - started)
        return len(nodes)

    # --- adoption --------------------------------------------------------------------
    def _local_conf(self, clone: str) -> bool:
        conf_path = getattr(self.core.iscsi, "conf_path", None)
        if conf_path is not None:
            return os.path.exists(conf_path(clone))
        return bool(self.core.iscsi.target_exists(clone))

    def adopt_all(self) -> list[str]:
        with self.core.session() as session:
            rows = session.execute(select(Provision.node, Provision.image_id, Image.kind)
                                   .join(Image, Image.id == Provision.image_id)
                                   .where(Provision.gateway == self.hosts.name)).all()
        adopted = []
        busy: set[str] | None = None
        for node, image_id, kind in rows:
            if kind != "node" or self._local_conf(self.core.ceph_name(image_id)):
                continue
            busy = self._busy_nodes() if busy is None else busy
            if node in busy:
                continue  # being provisioned or deprovisioned (or left for the journal's retries)
            try:
                if self.adopt(node):
                    adopted.append(node)
            except NodeBusy:
                continue  # being provisioned here right now, or a recovery runs: next round
            except BMIError as exc:
                LOG.warning("could not take over node %s yet: %s", node, exc)
        return adopted

    def _busy_nodes(self) -> set[str]:
        """Nodes a live process works on, or with an operation the journal's retries must finish
        first (e.g. a committed deprovision whose clone Ceph still holds): never adopted meanwhile.
        A dead owner's running operation does not count: adopting the node finishes it first."""
        busy: set[str] = set()
        with self.core.session() as session:
            locks = session.execute(select(Lock.name, Lock.owner)).all()
            ops = session.execute(select(Operation.args, Operation.state, Operation.owner)
                                  .where(Operation.state.in_(("running", "failed")))).all()
        for name, owner in locks:
            if name.startswith("node:") and journal.owner_alive(owner):
                busy.add(name[len("node:"):])
        for args, state, owner in ops:
            if state == "failed" or journal.owner_alive(owner):
                try:
                    node = json.loads(args).get("node")
                except (ValueError, AttributeError):
                    continue
                if isinstance(node, str):
                    busy.add(node)
        return busy

    def adopt(self, node: str) -> bool:
        """Export ``node``'s clone from this host's gateway and point its boot files here."""
        core, steps = self.core, self.steps
        with core.session() as session:
            row = session.execute(select(Project.name).join(Provision, Provision.project_id == Project.id)
                                  .where(Provision.node == node)).first()
        if row is None:
            return False
        project = row[0]
        with core.journal.lock([f"node:{node}", f"image:{project}/{node}"], "takeover"):
            with core.session() as session:  # again, under the locks: the dead host's work is finished now
                prov = session.get(Provision, node)
                if prov is None or prov.gateway != self.hosts.name:
                    return False
                image = session.get(Image, prov.image_id)
                if image is None or image.kind != "node":
                    return False
                mac, clone = prov.mac, core.ceph_name(image.id)
                label = image.parent.name if image.parent is not None else node
            if self._local_conf(clone) and core.iscsi.target_exists(clone):
                return False
            args = {"node": node, "project": project, "image": clone, "gateway": self.hosts.name}
            with core.journal.operation("takeover", args) as tx:
                if not core.iscsi.target_exists(clone):
                    try:
                        core.iscsi.remove_target(clone)  # a conf file without its live target
                    except BMIError:
                        pass
                    self.fence(clone)  # the old gateway's client first: a hung one must not write after us
                    steps.add_target.run(tx, **core.target_params(clone, node))
                if core.cfg.tftp.boot_mode != "http":
                    steps.write_boot.run(tx, **boot_params(core, node, mac, label, clone, node))
        LOG.warning("node %s taken over: target %s now on gateway %s (%s)", node, clone, self.hosts.name,
                    self.hosts.portal)
        return True

    # --- fencing ---------------------------------------------------------------------
    def fence(self, clone: str, doing: str = "exporting it here") -> list[str]:
        """Blocklist every other Ceph client that has ``clone`` open, before it goes live here.

        Run under the node's locks, so no BMI operation of any host has the clone open: its only
        other clients are gateways' LUNs -- the dead (or stalled) host's tgtd, which must never
        deliver a late write over what the node writes through this gateway.  Clients are fenced
        by their exact address (``ip:port/nonce``), never by IP: several hosts may share an IP
        (one machine, or a NAT), and a blocklist by IP would cut off live gateways too.  Our own
        connection is left out.  A storage without Ceph clients (test doubles) has nothing to fence.
        :raises StorageError: Ceph refused the blocklist or is unreachable: the target is NOT made
            live (the journal rolls the take-over back) and the next round tries again.
        """
        from ims.einstein import multipath
        from ims.einstein.storage.ceph import CephStorage

        storage = self.core.storage
        if not isinstance(storage, CephStorage):
            return []
        try:
            fenced = multipath.fence_image_clients(storage, clone)
        except BMIError as exc:
            LOG.error("not %s yet: fencing the old gateway's Ceph client of %s failed (%s); retried next round",
                      doing, clone, exc)
            raise
        if fenced:
            LOG.warning("fenced %d old client(s) of %s before %s: %s", len(fenced), clone, doing, ", ".join(fenced))
        return fenced

    def _local_clone_targets(self) -> dict[int, str]:
        """This gateway's targets of BMI images (its conf files, or live targets): image id -> name."""
        list_targets = getattr(self.core.iscsi, "list_targets", None)
        if list_targets is None:
            return {}
        ids = {}
        for name in list_targets():
            match = self._clone_re.fullmatch(name)
            if match:
                ids[int(match.group(1))] = name
        return ids

    def drop_orphans(self) -> list[str]:
        """At start-up, before tgtd's restore and before any worker runs: remove local targets (and
        conf files) whose BMI image no longer exists.  Conf dirs are host-local, so when another host
        rolled back this host's half-made provision (or deprovisioned a node) while this host was
        down, the conf file stayed here; the clone is gone, so restoring it can only fail.  An image's
        Ceph name carries its row's id, which exists before any target is made for it: no row means
        the image was removed (or its creating transaction never committed)."""
        ids = self._local_clone_targets()
        if not ids:
            return []
        with self.core.session() as session:
            known = set(session.scalars(select(Image.id).where(Image.id.in_(sorted(ids)))))
        removed = []
        for image_id, target in sorted(ids.items()):
            if image_id in known:
                continue
            try:
                self.core.iscsi.remove_target(target)
            except BMIError as exc:
                LOG.warning("could not remove orphaned local target %s: %s", target, exc)
                continue
            LOG.warning("removed local target %s: its image is gone (rolled back or deprovisioned by another "
                        "host while this one was down)", target)
            removed.append(target)
        return removed

    def sweep(self) -> list[str]:
        """Remove local targets of nodes recorded on another gateway (this host lost them)."""
        ids = self._local_clone_targets()
        if not ids:
            return []
        with self.core.session() as session:
            rows = session.execute(select(Provision.image_id, Provision.gateway, Image.kind)
                                   .join(Image, Image.id == Provision.image_id)
                                   .where(Provision.image_id.in_(sorted(ids)))).all()
        removed = []
        live = set(self.hosts.live(fresh=True))
        for image_id, gateway, kind in rows:
            # Only a LIVE other gateway's node: one recorded on a dead (or renamed) host is first moved
            # by a take-over, possibly to this very host, which then keeps its target.
            if kind != "node" or gateway in (None, self.hosts.name) or gateway not in live:
                continue
            target = ids[image_id]
            try:
                self.core.iscsi.remove_target(target)
            except BMIError as exc:
                LOG.warning("could not remove stale target %s (node now on %s): %s", target, gateway, exc)
                continue
            LOG.warning("removed local target %s: its node is now exported by gateway %s", target, gateway)
            removed.append(target)
        return removed


def stop_workers() -> list[int]:
    """SIGKILL this supervisor's worker processes: what they were doing was taken over elsewhere, and
    they must not go on acting on it.  The supervisor restarts them after a recovery process (as for
    any worker that died); only children of this process are touched."""
    import multiprocessing

    killed = []
    for child in multiprocessing.active_children():
        if child.pid is not None:
            child.kill()
            killed.append(child.pid)
    if killed:
        LOG.warning("killed fenced worker process(es) %s; they are restarted after recovery", killed)
    return killed


# --- Supervisor hooks (ims/rpc/server.py) ---------------------------------------------------
_PREPARED: dict[str, Any] = {}


def prepare(ops: Any) -> None:
    """Before the start-up restore: join the registry, drop targets other gateways took over and
    targets whose image another host removed meanwhile."""
    hosts = getattr(ops, "hosts", None)
    if hosts is None:
        return
    hosts.register()
    _PREPARED["hosts"] = hosts  # the agent heart-beats with it (its engine outlives ops.close())
    if hosts.multi():
        agent = HostAgent(ops)
        agent.sweep()
        agent.drop_orphans()


def start_agent(cfg: Any, factory: Any, stop: threading.Event) -> threading.Thread | None:
    """The supervisor's host agent, on its own operations object (one more Ceph connection)."""
    try:
        hosts = _PREPARED.get("hosts")
        if hosts is None:  # an ops factory without a host registry (test doubles): nothing to do
            return None
        return HostAgent(hosts=hosts, factory=lambda: factory(cfg)).start(stop)
    except Exception:  # noqa: BLE001 - serve anyway; a single host needs no agent
        LOG.exception("the host agent (heartbeat, take-over) could not start")
        return None

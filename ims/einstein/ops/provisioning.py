"""The guide's provision / deprovision, node IP and the HTTP boot script.

Deprovision acts on what provision recorded (network, NIC, MAC, and whether provision itself
connected the NIC), never on what the caller retyped: a request naming another network or
NIC is refused (400, naming the recorded ones) before anything changes, and a NIC that was
already on the network before provision stays attached.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, NamedTuple

from sqlalchemy import select

from ims.common import names
from ims.common.errors import (
    AuthenticationFailed,
    Forbidden,
    ImageExists,
    LeaseNotFound,
    NicNotFound,
    NodeAlreadyProvisioned,
    NodeNotFound,
    NodeNotProvisioned,
    NotAsProvisioned,
    TargetNotFound,
    WrongKind,
)
from ims.database.models import Image, Provision
from ims.einstein import hosts
from ims.einstein.journal import RecoveryContext, Tx
from ims.einstein.ops.background import in_background, settled
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.hil_steps import settled_detach
from ims.einstein.ops.steps import Steps, chap_of


def node_mac(net: Any, project: str, node: str, nic: str) -> str:
    return node_nic(net, project, node, nic)[0]


def node_nic(net: Any, project: str, node: str, nic: str) -> tuple[str, list[str]]:
    """The NIC's MAC and the networks attached to it, from ONE read of the node record in HIL
    (403 unless ``project`` owns the node)."""
    info = net.show_node(node)
    if info.get("project") != project:
        raise Forbidden(f"node {node} does not belong to project {project}")
    for entry in info.get("nics", []):
        if entry.get("label") == nic:
            networks = entry.get("networks") or {}
            return names.normalize_mac(entry.get("macaddr", "")), [str(n) for n in networks.values()]
    raise NicNotFound(f"node {node} has no NIC named {nic}")


@contextlib.contextmanager
def hil_first(reading: Future[Any]) -> Iterator[Future[Any]]:
    """Run the block while ``reading`` (a HIL read in the background) proceeds.  If the block fails,
    the read's own error (403 not ours, 404, 401, HIL unavailable) is raised instead when it has one:
    the caller gets the answer it would have got had the read come first.  The read has always
    ended when this returns."""
    try:
        yield reading
    except Exception:
        try:
            reading.result()
        except Exception as hil_error:  # noqa: BLE001 - re-raised as is
            raise hil_error from None
        raise
    except BaseException:  # e.g. an injected crash: it stays what it is, once the read has ended
        wait_futures([reading])
        raise
    reading.result()


def still_attached(net: Any, node: str, nic: str, network: str) -> bool:
    """Is ``network`` still on the NIC (one HIL read)?  A node HIL took back has nothing to detach:
    BMI's side is cleaned up anyway."""
    try:
        return network in net.nic_networks(node, nic).values()
    except (NodeNotFound, NicNotFound, AuthenticationFailed, Forbidden):
        return False


def recovery_ctx(core: Core, net: Any) -> RecoveryContext:
    """What finishes a dead worker's operation found under the node's locks: the service account's
    HIL client if one is configured, else the caller's, so a connect the dead worker sent while it
    made the clone is undone even without a service account (a caller whose credentials cannot
    reach the node leaves a note instead: ims/einstein/ops/hil_steps.py)."""
    ctx = core.journal.context_factory()
    return ctx if ctx.net is not None else RecoveryContext(net=net)


def boot_params(core: Core, node: str, mac: str, label: str, clone: str, owner: str) -> dict[str, Any]:
    """The parameters of a write/remove-boot-files step."""
    _, _, initiator = core.initiators(owner)
    # "target": the clone, whose row holds the CHAP secret the script gets (never a parameter itself);
    # "secondary": [iscsi] multipath_boot's second portal (the take-over host), None = one URI
    return {"node": node, "mac": mac, "label": label, "iqn": core.iscsi.iqn(clone), "initiator": initiator,
            "target": clone, "secondary": hosts.secondary_portal(core.cfg, node)}


def export_and_boot(core: Core, steps: Steps, tx: Tx, node: str, mac: str, label: str, clone: str, owner: str,
                    add_target: bool = True, boot_files: bool = True) -> None:
    if add_target:
        steps.add_target.run(tx, **core.target_params(clone, owner))
    if core.cfg.tftp.boot_mode == "http" or not boot_files:
        return  # nodes fetch their script from GET /boot/<mac> (boot_script): no per-node files
    steps.write_boot.run(tx, **boot_params(core, node, mac, label, clone, owner))


class Provisioned(NamedTuple):
    """What a deprovision reads of a node's provision record."""

    node: str
    project_id: int
    image_id: int
    nic: str
    mac: str
    network: str | None
    connected: bool | None


class ProvisionedImage(NamedTuple):
    """...and of the image it boots (``parent``: its parent's name, if it has one)."""

    id: int
    name: str
    kind: str
    parent: str | None


def provisioned(core: Core, project: str, node: str, kind: str) -> tuple[Provisioned, ProvisionedImage]:
    # perf: one plain-SQL transaction (ims/database/plain.py): every deprovision reads these
    with core.journal.connection() as tx:
        project_id = core.project_id(tx, project)
        rows = tx.rows("SELECT node, project_id, image_id, nic, mac, network, connected FROM provision "
                       "WHERE node = ?", (node,))
        if not rows or rows[0][1] != project_id:
            raise NodeNotProvisioned(f"node {node} is not provisioned in project {project}")
        connected = rows[0][6]
        prov = Provisioned(*rows[0][:6], None if connected is None else bool(connected))
        images = tx.rows("SELECT i.id, i.name, i.kind, p.name FROM image i LEFT JOIN image p ON p.id = i.parent_id "
                         "WHERE i.id = ?", (prov.image_id,))
        if not images or images[0][2] != kind:
            other = "bmi dpro" if kind == "disk" else "the split API (deprovision by disk)"
            raise WrongKind(f"node {node} was provisioned another way; use {other}")
        return prov, ProvisionedImage(*images[0])


def check_recorded(prov: Provisioned, node: str, nic: str, network: str | None) -> None:
    """409 unless the request names the network and NIC provision recorded (nothing has changed yet)."""
    if nic != prov.nic or (network is not None and prov.network is not None and network != prov.network):
        on = f"network {prov.network} and " if prov.network else ""
        raise NotAsProvisioned(f"node {node} was provisioned with {on}NIC {prov.nic}; deprovision names those "
                           f"(you gave {'network ' + network + ' and ' if network else ''}NIC {nic}); "
                           "nothing was changed")


class Provisioning:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps

    def provision(self, auth: Auth, project: str, node: str, img: str, network: str, nic: str) -> None:
        """Clone ``img`` for ``node``, export it over iSCSI, write its boot files, connect its NIC."""
        core, steps = self.core, self.steps
        names.validate_names(project=project, node=node, image=img, network=network, nic=nic)
        net = core.access(auth, project, registered=False)  # the checks below read the project's row
        with core.journal.lock([f"node:{node}", f"image:{project}/{node}"], "provision", recovery_ctx(core, net)), \
                hil_first(in_background(node_nic, net, project, node, nic)) as reading:
            # perf: ONE HIL read of the node (its owner: 403 unless ours; the NIC's MAC; whether the
            # network is already attached, then deprovision must leave it) runs while BMI makes the
            # clone of the project's OWN image, which nothing outside BMI sees.  Everything that
            # concerns the node (its provision record, target, boot files, NIC) comes after the read
            # says the node is ours; if it is not, the clone and its row are rolled back, and the
            # read's error is the answer, as if it had come first (hil_first).
            # perf: one plain-SQL transaction (ims/database/plain.py) for the checks every provision makes
            with core.journal.connection() as tx:
                project_id = core.project_id(tx, project)
                if tx.rows("SELECT node FROM provision WHERE node = ?", (node,)):
                    raise NodeAlreadyProvisioned(f"node {node} is already provisioned; deprovision it first")
                parent_id, kind = core.image_of(tx, project_id, project, img)
                if kind not in ("golden", "snapshot"):
                    raise WrongKind(f"{img} is a provisioned disk, not an image; snapshot it first")
                if core.image_row(tx, project_id, node) is not None:
                    raise ImageExists(f"project {project} already has an image named {node}; a node's clone is "
                                      "named after the node")
                parent_ceph = core.ceph_name(parent_id)
            args = {"project": project, "node": node, "image": img, "network": network, "nic": nic}
            with core.journal.operation("provision", args, RecoveryContext(net=net)) as tx:
                # perf: the image row's own transaction also records the clone step (Tx.ahead)
                image_id = steps.insert_image.run(
                    tx, "db.insert_clone", name=node, project_id=project_id, parent_id=parent_id, kind="node",
                    then=lambda row_id: steps.clone.ahead(tx, parent=parent_ceph, snap=core.snap,
                                                          image=core.ceph_name(row_id)))
                clone = core.ceph_name(image_id)
                with core.bmi_names({clone: node, parent_ceph: img}):
                    steps.clone.run(tx, parent=parent_ceph, snap=core.snap, image=clone)
                    mac, nic_networks = reading.result()
                    attached = network in nic_networks
                    boot = None if core.cfg.tftp.boot_mode == "http" else boot_params(core, node, mac, img, clone,
                                                                                     node)
                    target = core.target_params(clone, node)

                    def record_next(_node: str) -> None:
                        # perf: the provision record's transaction also records the steps that follow
                        # it (connect, boot files, target): one journal write instead of four
                        if not attached:
                            steps.connect.ahead(tx, node=node, nic=nic, network=network)
                        if boot is not None:
                            steps.write_boot.ahead(tx, **boot)
                        steps.add_target.ahead(tx, **target)

                    steps.insert_provision.run(tx, then=record_next, node=node, project_id=project_id,
                                               image_id=image_id, nic=nic, mac=mac, network=network,
                                               connected=not attached)
                    # perf: the HIL connect runs while the target and boot files are made; a failure of
                    # either side rolls back both, after the connect has ended.
                    connecting = None if attached else steps.connect.start(tx, net=net, node=node, nic=nic,
                                                                            network=network)
                    with settled(connecting):
                        # perf: the boot files are written and synced meanwhile too: they only name the
                        # target; a node that boots before it is live just fails to attach.
                        booting = None if boot is None else steps.write_boot.start(tx, **boot)
                        with settled(booting):
                            steps.add_target.run(tx, **target)

    def deprovision(self, auth: Auth, project: str, node: str, network: str, nic: str) -> None:
        """Undo a provision: detach the NIC (if provision attached it), remove boot files, target, clone, rows."""
        core, steps = self.core, self.steps
        names.validate_names(project=project, node=node, network=network, nic=nic)
        net = core.access(auth, project, registered=False)  # provisioned() reads the project's row
        with core.journal.lock([f"node:{node}", f"image:{project}/{node}"], "deprovision",
                               recovery_ctx(core, net)):
            prov, row = provisioned(core, project, node, kind="node")
            check_recorded(prov, node, nic, network)
            network = prov.network or network
            clone = core.ceph_name(row.id)
            parent_name = row.parent or node
            # perf: no HIL read first when provision connected the NIC: the detach is sent directly and
            # an answer "not attached" (someone detached it by hand; HIL took the node back) means
            # nothing to detach (hil_steps.Detach).  A row older than that record (connected None)
            # asks HIL whether the network is still on the NIC.
            detach = bool(prov.connected) or (prov.connected is None and still_attached(net, node, nic, network))
            args = {"project": project, "node": node, "mac": prov.mac, "image": clone, "image_id": row.id}
            with core.journal.operation("deprovision", args, RecoveryContext(net=net)) as tx:
                # perf: the clone's snapshots and parent, read while the boot files and target go, for
                # the removal after the commit point (we hold the image's lock: no snapshot can appear)
                tx.ctx.described[clone] = in_background(core.storage.describe, clone)
                # perf: the HIL detach (recorded first) runs while the boot files and the target go;
                # all of it ends before the commit point, after which the clone is removed for good.
                detaching = steps.detach.start(tx, net=net, node=node, nic=nic, network=network) if detach \
                    else None
                with settled_detach(tx, detaching):
                    steps.remove_boot.run(tx, **boot_params(core, node, prov.mac, parent_name, clone, node))
                    # perf: no target_exists show first: the remove does its own show (TargetNotFound:
                    # already gone, and the step is disarmed so a roll-back does not re-add it)
                    with contextlib.suppress(TargetNotFound):
                        steps.remove_target.run(tx, **core.target_params(clone, node))
                tx.commit_point()
                with core.bmi_names({clone: node}):
                    # the boot files and the target went in the steps above (a recovery's forward,
                    # "removal", does all)
                    steps.forward["storage_removal"](args, tx.ctx)

    def node_ip(self, auth: Auth, project: str, node: str) -> str:
        core = self.core
        names.validate_names(project=project, node=node)
        net = core.access(auth, project)
        with core.session() as session:
            prov = session.get(Provision, node)
            macs = [prov.mac] if prov is not None else []
        if not macs:
            info = net.show_node(node)
            if info.get("project") != project:
                raise Forbidden(f"node {node} does not belong to project {project}")
            macs = [names.normalize_mac(n["macaddr"]) for n in info.get("nics", []) if n.get("macaddr")]
        found: dict[str, str] = {}
        try:
            with open(core.cfg.tftp.leases_file, encoding="utf-8") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) >= 3:
                        found[parts[1].lower()] = parts[2]
        except FileNotFoundError:
            pass
        for mac in macs:
            if mac in found:
                return found[mac]
        raise LeaseNotFound(f"node {node} ({', '.join(macs) or 'no MAC'}) has not been given an IP address by "
                            "DHCP yet")

    def boot_script(self, mac: str) -> str:
        """The iPXE script of the node with NIC ``mac`` (HTTP boot path); NodeNotProvisioned if none.

        Unauthenticated by design, like TFTP: it is served on the provisioning network only and
        holds what the per-node TFTP file would (portal, target IQN, initiator name, CHAP secret).
        """
        core = self.core
        mac = names.normalize_mac(mac)
        with core.session() as session:
            prov = session.scalars(select(Provision).where(Provision.mac == mac)).first()
            if prov is None:
                raise NodeNotProvisioned(f"no node with MAC {mac} is provisioned")
            row = session.get(Image, prov.image_id)
            owner = prov.node if row is not None and row.kind == "node" else (row.name if row else prov.node)
            clone, node = core.ceph_name(prov.image_id), prov.node
        _, _, initiator = core.initiators(owner)
        # CHAP: the script carries the target's secret (never logged; /boot/ is on the provisioning network)
        return core.boot.render_ipxe(core.iscsi.iqn(clone), initiator, chap_of(core, clone),
                                     hosts.secondary_portal(core.cfg, node))

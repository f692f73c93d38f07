"""iSCSI exports of images (admin) and the split API's disks (create, provision by disk, delete).

Disk delete and provision-by-disk take the same lock (``image:<project>/<disk>``): a disk is
never deleted while a node is being pointed at it, so no boot file outlives its clone/target.
"""
from __future__ import annotations

from sqlalchemy import select

from ims.common import names
from ims.common.errors import (
    ImageBusy,
    ImageExists,
    NodeAlreadyProvisioned,
    TargetExists,
    TargetNotFound,
    WrongKind,
)
from ims.database.models import Image, Provision
from ims.einstein.journal import RecoveryContext
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.provisioning import boot_params, check_recorded, export_and_boot, node_mac, provisioned
from ims.einstein.ops.steps import Steps


def disk_lock(project: str, disk: str) -> str:
    return f"image:{project}/{disk}"


class Disks:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps

    # --- iSCSI exports of images ------------------------------------------------------
    def iscsi_create(self, auth: Auth, project: str, img: str) -> str:
        core = self.core
        names.validate_names(project=project, image=img)
        net = core.admin(auth)
        with core.journal.lock([f"image:{project}/{img}"], "iscsi"):
            with core.session() as session:
                row = core.image(session, core.project(session, project), img)
                ceph = core.ceph_name(row.id)
            core.require_storage(ceph, img)
            if core.iscsi.target_exists(ceph):
                raise TargetExists(f"image {img} is already exported over iSCSI as {core.iscsi.iqn(ceph)}")
            with core.journal.operation("iscsi_create", {"image": ceph}, RecoveryContext(net=net)) as tx, \
                    core.bmi_names({ceph: img}):
                self.steps.add_target.run(tx, **core.target_params(ceph, img))
            return core.iscsi.iqn(ceph)

    def iscsi_remove(self, auth: Auth, project: str, img: str) -> None:
        core = self.core
        names.validate_names(project=project, image=img)
        core.admin(auth)
        with core.journal.lock([f"image:{project}/{img}"], "iscsi"):
            with core.session() as session:
                row = core.image(session, core.project(session, project), img)
                ceph, kind = core.ceph_name(row.id), row.kind
            if kind in ("node", "disk"):
                raise ImageBusy(f"{img} is exported for a provisioned {kind}; deprovision instead")
            try:
                core.iscsi.remove_target(ceph)
            except TargetNotFound:
                raise TargetNotFound(f"image {img} is not exported over iSCSI") from None

    def iscsi_list(self, auth: Auth, project: str) -> list[list[str]]:
        core = self.core
        core.access(auth, project)
        exported = set(core.iscsi.list_targets())
        with core.session() as session:
            proj = core.project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id).order_by(Image.id)).all()
            return [[r.name, core.iscsi.iqn(core.ceph_name(r.id))] for r in rows
                    if core.ceph_name(r.id) in exported]

    # --- split API ---------------------------------------------------------------------
    def create_disk(self, auth: Auth, project: str, disk: str, img: str) -> str:
        """Clone ``img`` as disk ``disk`` and export it; returns the target name."""
        core, steps = self.core, self.steps
        names.validate_names(project=project, image=img)
        core.user_name(disk, "disk")
        net = core.access(auth, project)
        with core.journal.lock([disk_lock(project, disk)], "create_disk"):
            with core.session() as session:
                proj = core.project(session, project)
                parent = core.image(session, proj, img)
                if parent.kind not in ("golden", "snapshot"):
                    raise WrongKind(f"{img} is a provisioned disk, not an image")
                if core.find(session, proj, disk) is not None:
                    raise ImageExists(f"image or disk {disk} already exists in project {project}")
                project_id, parent_id, parent_ceph = proj.id, parent.id, core.ceph_name(parent.id)
            with core.journal.operation("create_disk", {"disk": disk}, RecoveryContext(net=net)) as tx:
                image_id = steps.insert_image.run(tx, "db.insert_clone", name=disk, project_id=project_id,
                                                  parent_id=parent_id, kind="disk")
                clone = core.ceph_name(image_id)
                with core.bmi_names({clone: disk, parent_ceph: img}):
                    steps.clone.run(tx, parent=parent_ceph, snap=core.snap, image=clone)
                    steps.add_target.run(tx, **core.target_params(clone, disk))
            return clone

    def delete_disk(self, auth: Auth, project: str, disk: str) -> None:
        core, steps = self.core, self.steps
        names.validate_names(project=project, disk=disk)
        net = core.access(auth, project)
        with core.journal.lock([disk_lock(project, disk)], "delete_disk"):
            with core.session() as session:
                row = core.image(session, core.project(session, project), disk, what="disk")
                if row.kind != "disk":
                    raise WrongKind(f"{disk} is not a disk")
                users = session.scalars(select(Provision).where(Provision.image_id == row.id)).all()
                if users:
                    raise ImageBusy(f"disk {disk} is provisioned to node {users[0].node}; deprovision it first")
                clone, image_id = core.ceph_name(row.id), row.id
            args = {"image": clone, "image_id": image_id}
            with core.journal.operation("delete_disk", args, RecoveryContext(net=net)) as tx, \
                    core.bmi_names({clone: disk}):
                if core.iscsi.target_exists(clone):
                    steps.remove_target.run(tx, **core.target_params(clone, disk))
                tx.commit_point()
                steps.forward["removal"](args, tx.ctx)

    def provision_disk(self, auth: Auth, project: str, node: str, disk: str, nic: str) -> None:
        """Point ``node``'s boot files at an existing disk (split API; no HIL network change)."""
        core, steps = self.core, self.steps
        names.validate_names(project=project, node=node, disk=disk, nic=nic)
        net = core.access(auth, project)
        mac = node_mac(net, project, node, nic)
        with core.journal.lock([f"node:{node}", disk_lock(project, disk)], "provision"):
            with core.session() as session:
                proj = core.project(session, project)
                row = core.image(session, proj, disk, what="disk")
                if row.kind != "disk":
                    raise WrongKind(f"{disk} is not a disk; create one with bmi disk create")
                if session.get(Provision, node) is not None:
                    raise NodeAlreadyProvisioned(f"node {node} is already provisioned; deprovision it first")
                clone, project_id, image_id = core.ceph_name(row.id), proj.id, row.id
            core.require_storage(clone, disk)
            with core.journal.operation("provision_disk", {"node": node}, RecoveryContext(net=net)) as tx:
                steps.insert_provision.run(tx, node=node, project_id=project_id, image_id=image_id, nic=nic,
                                           mac=mac, connected=False)
                export_and_boot(core, steps, tx, node, mac, disk, clone, disk, add_target=False)

    def deprovision_disk(self, auth: Auth, project: str, node: str, nic: str) -> None:
        core, steps = self.core, self.steps
        names.validate_names(project=project, node=node, nic=nic)
        net = core.access(auth, project)
        with core.journal.lock([f"node:{node}"], "deprovision"):
            prov, row = provisioned(core, project, node, kind="disk")
            check_recorded(prov, node, nic, None)
            with core.journal.lock([disk_lock(project, row.name)], "deprovision"):
                clone = core.ceph_name(row.id)
                args = {"node": node, "mac": prov.mac}
                with core.journal.operation("deprovision_disk", args, RecoveryContext(net=net)) as tx:
                    steps.remove_boot.run(tx, **boot_params(core, node, prov.mac, row.name, clone, row.name))
                    tx.commit_point()
                    steps.forward["unprovision"](args, tx.ctx)


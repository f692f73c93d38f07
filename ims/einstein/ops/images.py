"""Golden images: import, list, copy, move, export, remove.

Tenancy: a name a tenant gives for storage (the import source, the export name) or for a new
image is never in BMI's own namespace (``<uid>img...``): otherwise a tenant could import
another tenant's golden image or a node's live clone by its internal name, or squat the next
internal name.  ``[bmi] import_pattern`` narrows what may be imported at all.
"""
from __future__ import annotations

from sqlalchemy import select

from ims.common import names
from ims.common.errors import (
    ImageBusy,
    ImageExists,
    ImageNotFound,
    SnapshotExists,
    SnapshotNotFound,
    WrongKind,
)
from ims.database.models import Image
from ims.einstein import flatten
from ims.einstein.journal import RecoveryContext, Tx
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.steps import Steps


def make_golden_copy(core: Core, steps: Steps, tx: Tx, project_id: int, name: str, source: str, source_snap: str,
                     is_snapshot: bool, parent_id: int | None, kind: str = "golden",
                     background: bool = False) -> str:
    """Insert the row and clone ``source@source_snap``: a BMI image usable at once.

    ``background``: the copy stays a clone and a worker flattens it, then takes its snapshot
    (ims/einstein/flatten.py): O(1) whatever the data.  Otherwise flatten, snapshot and protect
    here (small images, the file driver, or a clone chain at ``[bmi] max_clone_depth``).
    """
    image_id = steps.insert_image.run(tx, name=name, project_id=project_id, parent_id=parent_id,
                                      is_snapshot=is_snapshot, kind=kind)
    copy = core.ceph_name(image_id)
    with core.bmi_names({copy: name}):
        steps.clone.run(tx, parent=source, snap=source_snap, image=copy)
        if background:
            # the source it was really cloned from (a pending source resolves further back)
            parent = core.storage.parent_info(copy) or (source, source_snap)
            steps.queue_flatten.run(tx, image=copy, source=parent[0], snap=parent[1])
            return copy
        steps.flatten.run(tx, image=copy)
        steps.snapshot.run(tx, "storage.snapshot_copy", image=copy, snap=core.snap)
        steps.protect.run(tx, "storage.protect_copy", image=copy, snap=core.snap)
    return copy


class Images:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps

    def import_image(self, auth: Auth, project: str, img: str, snap: str | None = None,
                     protect: bool = False) -> None:
        """Bring the storage image ``img`` under BMI as a golden image (the source is left untouched)."""
        core, st, steps = self.core, self.core.storage, self.steps
        names.validate_name(project, "project")
        core.user_name(img, "image")
        if snap is not None:
            names.validate_name(snap, "snapshot")
        net = core.access(auth, project)
        core.check_import_source(img)
        with core.journal.lock([f"image:{project}/{img}", f"source:{img}"], "import"):
            with core.session() as session:
                proj = core.project(session, project)
                if core.find(session, proj, img) is not None:
                    raise ImageExists(f"image {img} already exists in project {project}")
                project_id = proj.id
            if not st.image_exists(img):
                raise ImageNotFound(f"no image named {img} in the storage pool")
            src_snaps = st.list_snapshots(img)
            ctx = RecoveryContext(net=net)
            background = flatten.use_background(core, img)
            if snap is None and background:
                # The copy stays a clone of a transient snapshot until a worker has flattened it;
                # the worker (or the copy's removal) then removes that snapshot again.
                tmp = flatten.transient_snap(core)
                with core.journal.operation("import", {"source": img, "snap": tmp, "project": project},
                                            ctx) as tx:
                    steps.snapshot.run(tx, "storage.snapshot_source", image=img, snap=tmp)
                    steps.protect.run(tx, "storage.protect_source", image=img, snap=tmp)
                    make_golden_copy(core, steps, tx, project_id, img, img, tmp, is_snapshot=False,
                                     parent_id=None, background=True)
            elif snap is None:
                if core.snap in src_snaps:
                    raise SnapshotExists(f"image {img} already has a snapshot named {core.snap!r}; remove it, or "
                                         f"import that snapshot with --snap {core.snap}")
                with core.journal.operation("import", {"source": img, "snap": core.snap, "project": project},
                                            ctx) as tx:
                    steps.snapshot.run(tx, "storage.snapshot_source", image=img, snap=core.snap)
                    steps.protect.run(tx, "storage.protect_source", image=img, snap=core.snap)
                    make_golden_copy(core, steps, tx, project_id, img, img, core.snap, is_snapshot=False,
                                     parent_id=None)
                    tx.commit_point()
                    steps.forward["source_snapshot"](tx.args, ctx)
            else:
                if snap not in src_snaps:
                    raise SnapshotNotFound(f"image {img} has no snapshot named {snap}")
                with core.journal.operation("import_snapshot", {"source": img, "snap": snap}, ctx) as tx:
                    if not st.is_protected(img, snap):
                        if not protect:
                            raise WrongKind(f"snapshot {img}@{snap} is not protected; import it with --protect")
                        steps.protect.run(tx, "storage.protect_source", image=img, snap=snap)
                    make_golden_copy(core, steps, tx, project_id, img, img, snap, is_snapshot=False, parent_id=None,
                                     background=background)

    # --- lists ---------------------------------------------------------------------
    def list_images(self, auth: Auth, project: str) -> list[str]:
        core = self.core
        core.access(auth, project)
        with core.session() as session:
            proj = core.project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id, Image.kind == "golden")
                                   .order_by(Image.id)).all()
            return [r.name for r in rows]

    def pairs(self, project: str, kinds: tuple[str, ...]) -> list[list[str]]:
        """``[name, parent name]`` of the project's rows of ``kinds``."""
        core = self.core
        with core.session() as session:
            proj = core.project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id, Image.kind.in_(kinds))
                                   .order_by(Image.id)).all()
            return [[r.name, r.parent.name if r.parent else ""] for r in rows]

    # --- remove --------------------------------------------------------------------
    def remove_image(self, auth: Auth, project: str, img: str) -> None:
        """Remove an image or snapshot (``bmi rm`` / ``bmi snap rm``) from BMI and storage."""
        core, st, steps = self.core, self.core.storage, self.steps
        names.validate_names(project=project, image=img)
        net = core.access(auth, project)
        with core.journal.lock([f"image:{project}/{img}"], "remove"):
            with core.session() as session:
                row = core.image(session, core.project(session, project), img)
                if row.kind in ("node", "disk"):
                    verb = "bmi dpro" if row.kind == "node" else "bmi disk delete"
                    raise ImageBusy(f"{img} is a provisioned {row.kind}'s disk; use {verb}")
                users = [c.name for c in row.children if c.kind in ("node", "disk")]
                if users:
                    raise ImageBusy(f"image {img} is in use by {', '.join(sorted(users))}; deprovision first")
                ceph, image_id = core.ceph_name(row.id), row.id
            with core.bmi_names({ceph: img}):
                has_snap = st.image_exists(ceph) and core.snap in st.list_snapshots(ceph)
                children = st.list_children(ceph, core.snap) if has_snap else []
                foreign = [c for c in children if not c.startswith(f"{core.uid}img")]
                if foreign:
                    raise ImageBusy(f"image {img} still has {len(foreign)} clone(s) in storage that BMI does not "
                                    "manage")
                args = {"image": ceph, "image_id": image_id}
                with core.journal.operation("remove_image", args, RecoveryContext(net=net)) as tx:
                    # BMI copies still awaiting their flatten keep the storage alive (doomed, collected
                    # when the last one is independent); the row goes now.  The removal (purge, past
                    # the commit point) cancels this image's own flatten if one is pending.
                    if has_snap and not children:
                        steps.unprotect.run(tx, image=ceph, snap=core.snap)
                    tx.commit_point()
                    steps.forward["removal"](args, tx.ctx)

    # --- export / copy / move -------------------------------------------------------
    def export_image(self, auth: Auth, project: str, img: str, name: str) -> None:
        """Write a standalone (flattened) copy of ``img`` into the pool as ``name`` (no BMI row)."""
        core, st, steps = self.core, self.core.storage, self.steps
        names.validate_names(project=project, image=img)
        core.user_name(name, "export")
        net = core.access(auth, project)
        with core.journal.lock([f"image:{project}/{img}", f"source:{name}"], "export"):
            with core.session() as session:
                row = core.image(session, core.project(session, project), img)
                ceph = core.ceph_name(row.id)
            if st.image_exists(name):
                raise ImageExists(f"the storage pool already has an image named {name}")
            with core.journal.operation("export", {"image": name}, RecoveryContext(net=net)) as tx, \
                    core.bmi_names({ceph: img}):
                steps.clone.run(tx, parent=ceph, snap=core.snap, image=name)
                steps.flatten.run(tx, image=name)

    def copy_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        core = self.core
        names.validate_names(project=src_project, image=img1)
        names.validate_name(dest_project, "project")
        new_name = img2 if img2 is not None else img1
        core.user_name(new_name, "image")
        net = core.admin(auth) if src_project != dest_project else core.access(auth, src_project)
        with core.journal.lock([f"image:{src_project}/{img1}", f"image:{dest_project}/{new_name}"], "copy"):
            with core.session() as session:
                src = core.image(session, core.project(session, src_project), img1)
                dest = core.project(session, dest_project)
                if src.kind in ("node", "disk"):
                    raise WrongKind(f"{img1} is a provisioned disk; snapshot it first")
                if core.find(session, dest, new_name) is not None:
                    raise ImageExists(f"image {new_name} already exists in project {dest_project}")
                same = src_project == dest_project
                ceph = core.ceph_name(src.id)
                is_snap = src.is_snapshot if same else False
                parent_id = src.parent_id if same else None
                kind = src.kind if same else "golden"
                dest_id = dest.id
            background = flatten.use_background(core, ceph)
            with core.journal.operation("copy", {"image": img1}, RecoveryContext(net=net)) as tx, \
                    core.bmi_names({ceph: img1}):
                make_golden_copy(core, self.steps, tx, dest_id, new_name, ceph, core.snap, is_snapshot=is_snap,
                                 parent_id=parent_id, kind=kind, background=background)

    def move_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        """Move (and/or rename) an image row; its storage name depends only on its id, so storage is untouched."""
        core = self.core
        names.validate_names(project=src_project, image=img1)
        names.validate_name(dest_project, "project")
        new_name = img2 if img2 is not None else img1
        core.user_name(new_name, "image")
        if src_project != dest_project:
            core.admin(auth)
        else:
            core.access(auth, src_project)
        with core.journal.lock([f"image:{src_project}/{img1}", f"image:{dest_project}/{new_name}"], "move"):
            with core.session() as session:
                row = core.image(session, core.project(session, src_project), img1)
                dest = core.project(session, dest_project)
                if row.kind in ("node", "disk"):
                    raise WrongKind(f"{img1} is a provisioned disk and cannot be moved")
                if (src_project, img1) != (dest_project, new_name) and core.find(session, dest, new_name):
                    raise ImageExists(f"image {new_name} already exists in project {dest_project}")
                if src_project != dest_project:
                    row.parent_id = None
                    row.is_snapshot = False
                    row.kind = "golden"
                row.project_id = dest.id
                row.name = new_name

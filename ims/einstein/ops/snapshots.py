"""Snapshots of a node's (or disk's) clone: a new standalone image marked as a snapshot."""
from __future__ import annotations

from ims.common import names
from ims.common.errors import ImageExists, NodeNotProvisioned, SnapshotExists
from ims.einstein import flatten
from ims.einstein.journal import RecoveryContext
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.images import make_golden_copy
from ims.einstein.ops.steps import Steps


class Snapshots:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps

    def create_snapshot(self, auth: Auth, project: str, node: str, snap_name: str) -> None:
        """Capture a node's (or disk's) clone as a new standalone image marked as a snapshot."""
        core, steps = self.core, self.steps
        names.validate_names(project=project, node=node)
        core.user_name(snap_name, "snapshot")
        net = core.access(auth, project)
        with core.journal.lock([f"image:{project}/{node}", f"image:{project}/{snap_name}"], "snapshot"):
            with core.session() as session:
                proj = core.project(session, project)
                row = core.find(session, proj, node)
                if row is None or row.kind not in ("node", "disk"):
                    raise NodeNotProvisioned(f"node {node} is not provisioned in project {project}")
                if core.find(session, proj, snap_name) is not None:
                    raise ImageExists(f"image {snap_name} already exists in project {project}")
                src, project_id, parent_id = core.ceph_name(row.id), proj.id, row.parent_id
            core.require_storage(src, node)
            ctx = RecoveryContext(net=net)
            if flatten.use_background(core, src):
                # O(1): the new image is a clone of a transient snapshot of the node's clone, flattened
                # by a worker; a unique name, so the node can be snapshotted again meanwhile.
                tmp = flatten.transient_snap(core)
                with core.journal.operation("snapshot", {"source": src, "snap": tmp}, ctx) as tx, \
                        core.bmi_names({src: node}):
                    steps.snapshot.run(tx, "storage.snapshot_source", image=src, snap=tmp)
                    steps.protect.run(tx, "storage.protect_source", image=src, snap=tmp)
                    make_golden_copy(core, steps, tx, project_id, snap_name, src, tmp, is_snapshot=True,
                                     parent_id=parent_id, kind="snapshot", background=True)
                return
            if core.snap in core.storage.list_snapshots(src):
                raise SnapshotExists(f"{node} already has a snapshot in progress; try again later")
            with core.journal.operation("snapshot", {"source": src, "snap": core.snap}, ctx) as tx, \
                    core.bmi_names({src: node}):
                steps.snapshot.run(tx, "storage.snapshot_source", image=src, snap=core.snap)
                steps.protect.run(tx, "storage.protect_source", image=src, snap=core.snap)
                make_golden_copy(core, steps, tx, project_id, snap_name, src, core.snap, is_snapshot=True,
                                 parent_id=parent_id, kind="snapshot")
                tx.commit_point()
                steps.forward["source_snapshot"](tx.args, ctx)

"""BMI's operations: one method per verb of the guide (and of the split API).

Every method takes ``auth`` ({"username", "password"}: the tenant's HIL
credentials) first, validates every name before it goes anywhere, checks the
caller's access with HIL, takes the node/image locks it needs, and runs its
steps through the journal so that a failure (or a crash) leaves nothing behind.

Ceph names are ``<uid>img<id>``; users only ever see BMI names.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ims.common import names
from ims.common.config import BMIConfig
from ims.common.errors import (
    AuthenticationFailed,
    BMIError,
    Forbidden,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    LeaseNotFound,
    NicNotFound,
    NodeAlreadyProvisioned,
    NodeNotFound,
    NodeNotProvisioned,
    NotFound,
    ProjectExists,
    ProjectNotFound,
    SnapshotExists,
    SnapshotNotFound,
    TargetNotFound,
)
from ims.database import make_engine, make_session_factory
from ims.database.models import Image, Project, Provision
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.journal import Journal, RecoveryContext
from ims.einstein.storage.base import Storage

LOG = logging.getLogger(__name__)

Auth = dict[str, str]
NetFactory = Callable[[Auth], Any]


def _user(auth: Auth) -> tuple[str, str]:
    if not isinstance(auth, dict):
        raise AuthenticationFailed("no credentials given")
    user, password = auth.get("username"), auth.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise AuthenticationFailed("no credentials given: set HIL_USERNAME and HIL_PASSWORD")
    return user, password


class Operations:
    """The service core.  Einstein workers hold one instance each (one Ceph connection)."""

    def __init__(self, cfg: BMIConfig, storage: Storage, iscsi: IscsiTarget, boot: BootFiles,
                 net_factory: NetFactory, db_url: str | None = None) -> None:
        self.cfg = cfg
        self.storage = storage
        self.iscsi = iscsi
        self.boot = boot
        self.net_factory = net_factory
        self.uid = cfg.bmi.uid
        self.snap = cfg.bmi.snapshot
        self.engine = make_engine(db_url or cfg.db_url, cfg.db.busy_timeout_ms)
        self.sessions = make_session_factory(self.engine)
        self.journal = Journal(self.sessions)
        self._auth_cache: dict[tuple[str, str, str], float] = {}
        self._register_recovery()

    @classmethod
    def from_config(cls, cfg: BMIConfig) -> Operations:
        from ims.einstein import iscsi as iscsi_drivers
        from ims.einstein import storage as storage_drivers
        from ims.einstein.hil import HILClient

        net = cfg.net_isolator

        def net_factory(auth: Auth) -> HILClient:
            user, password = _user(auth)
            return HILClient(net.url, user, password, timeout=net.timeout, action_timeout=net.action_timeout,
                             channel=net.channel)

        boot = BootFiles(cfg.tftp.pxelinux_path, cfg.tftp.ipxe_path, cfg.iscsi.ip, iscsi_port=cfg.iscsi.port,
                         lun=cfg.iscsi.lun, interface=cfg.tftp.boot_interface)
        return cls(cfg, storage_drivers.from_config(cfg), iscsi_drivers.from_config(cfg), boot, net_factory)

    def close(self) -> None:
        self.storage.close()
        self.engine.dispose()

    # ------------------------------------------------------------------ helpers
    def ceph_name(self, image_id: int) -> str:
        return f"{self.uid}img{image_id}"

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self.journal.session() as session:
            yield session

    @staticmethod
    def _project(session: Session, name: str) -> Project:
        proj = session.scalars(select(Project).where(Project.name == name)).first()
        if proj is None:
            raise ProjectNotFound(f"project {name} is not registered in BMI (an admin can add it: "
                                  f"bmi project create {name})")
        return proj

    @staticmethod
    def _image(session: Session, proj: Project, name: str, what: str = "image") -> Image:
        img = session.scalars(select(Image).where(Image.project_id == proj.id, Image.name == name)).first()
        if img is None:
            raise ImageNotFound(f"{what} {name} not found in project {proj.name}")
        return img

    @staticmethod
    def _find(session: Session, proj: Project, name: str) -> Image | None:
        return session.scalars(select(Image).where(Image.project_id == proj.id, Image.name == name)).first()

    @contextlib.contextmanager
    def _bmi_names(self, mapping: dict[str, str]) -> Iterator[None]:
        """Rewrite driver errors so they name BMI images, never internal Ceph names."""
        try:
            yield
        except BMIError as exc:
            msg = exc.message
            for internal, public in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
                msg = msg.replace(internal, public)
            exc.message = msg
            exc.args = (msg,)
            raise

    def _initiators(self, owner: str) -> tuple[list[str] | None, list[str] | None, str | None]:
        """(initiator addresses, initiator names, iqn for the iPXE script) for a target owned by ``owner``."""
        policy = self.cfg.iscsi.initiator_address.strip()
        if policy.lower() == "node":
            iqn = f"{self.cfg.iscsi.initiator_iqn_prefix}{owner}"
            return None, [iqn], iqn
        if policy.upper() == "ALL":
            return ["ALL"], None, None
        return [a.strip() for a in policy.split(",") if a.strip()], None, None

    def _net(self, auth: Auth) -> Any:
        _user(auth)
        return self.net_factory(auth)

    def _access(self, auth: Auth, project: str) -> Any:
        """Check with HIL that the caller may use ``project``; returns the HIL client."""
        names.validate_name(project, "project")
        user, password = _user(auth)
        net = self._net(auth)
        key = (user, hashlib.sha256(password.encode()).hexdigest(), project)
        now = time.monotonic()
        if self._auth_cache.get(key, 0.0) < now:
            net.check_project_access(project)
            self._auth_cache[key] = now + float(self.cfg.net_isolator.auth_cache_seconds)
        with self._session() as session:
            self._project(session, project)
        return net

    def _admin(self, auth: Auth) -> Any:
        user, _ = _user(auth)
        net = self._net(auth)
        net.authenticate()
        if user not in self.cfg.bmi.admin_users:
            raise Forbidden(f"user {user} is not a BMI admin")
        return net

    # ---------------------------------------------------------------- recovery
    def _register_recovery(self) -> None:
        j = self.journal
        st = self.storage

        def ignore_missing(fn: Callable[[], None]) -> None:
            try:
                fn()
            except (NotFound, TargetNotFound):
                pass

        def purge(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            image = params["image"]
            if not st.image_exists(image):
                return
            with contextlib.suppress(TargetNotFound):
                if self.iscsi.target_exists(image):
                    self.iscsi.remove_target(image)
            for snap in st.list_snapshots(image):
                ignore_missing(lambda s=snap: st.unprotect_snapshot(image, s))
                ignore_missing(lambda s=snap: st.remove_snapshot(image, s))
            ignore_missing(lambda: st.remove_image(image))

        def remove_snapshot(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            image, snap = params["image"], params["snap"]
            if not st.image_exists(image) or snap not in st.list_snapshots(image):
                return
            ignore_missing(lambda: st.unprotect_snapshot(image, snap))
            ignore_missing(lambda: st.remove_snapshot(image, snap))

        def unprotect(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            ignore_missing(lambda: st.unprotect_snapshot(params["image"], params["snap"]))

        def protect(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            ignore_missing(lambda: st.protect_snapshot(params["image"], params["snap"]))

        def iscsi_remove(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            ignore_missing(lambda: self.iscsi.remove_target(params["target"]))

        def iscsi_add(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            if not self.iscsi.target_exists(params["target"]):
                # a conf file whose target is gone from the daemon would block the re-add
                with contextlib.suppress(TargetNotFound):
                    self.iscsi.remove_target(params["target"])
                self.iscsi.add_target(params["target"], st.backing(params["image"]), params.get("initiators"),
                                      params.get("initiator_names"))

        def boot_remove(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            self.boot.remove(params["node"], params["mac"])

        def boot_write(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            self.boot.write(params["node"], params["mac"], params["label"], params["iqn"], params.get("initiator"))

        def db_delete_image(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            with self._session() as session:
                for prov in session.scalars(select(Provision).where(Provision.image_id == params["id"])).all():
                    session.delete(prov)
                session.flush()
                img = session.get(Image, params["id"])
                if img is not None:
                    session.delete(img)

        def db_delete_provision(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            with self._session() as session:
                prov = session.get(Provision, params["node"])
                if prov is not None:
                    session.delete(prov)

        def db_restore_provision(params: dict[str, Any], _ctx: RecoveryContext) -> None:
            with self._session() as session:
                if session.get(Provision, params["node"]) is None:
                    session.add(Provision(node=params["node"], project_id=params["project_id"],
                                          image_id=params["image_id"], nic=params["nic"], mac=params["mac"],
                                          network=params.get("network")))

        def hil_detach(params: dict[str, Any], ctx: RecoveryContext) -> None:
            if ctx.net is None:
                ctx.notes.append(f"detach network {params['network']} from {params['node']}/{params['nic']} in HIL "
                                 "by hand (no HIL credentials during recovery)")
                return
            if params["network"] in ctx.net.nic_networks(params["node"], params["nic"]).values():
                ctx.net.detach_network(params["node"], params["nic"], params["network"])

        def hil_connect(params: dict[str, Any], ctx: RecoveryContext) -> None:
            if ctx.net is None:
                ctx.notes.append(f"connect network {params['network']} to {params['node']}/{params['nic']} in HIL "
                                 "by hand (no HIL credentials during recovery)")
                return
            if params["network"] not in ctx.net.nic_networks(params["node"], params["nic"]).values():
                ctx.net.connect_network(params["node"], params["nic"], params["network"])

        for name, fn in {"storage.purge": purge, "storage.remove_snapshot": remove_snapshot,
                         "storage.unprotect": unprotect, "storage.protect": protect,
                         "iscsi.remove": iscsi_remove, "iscsi.add": iscsi_add,
                         "boot.remove": boot_remove, "boot.write": boot_write,
                         "db.delete_image": db_delete_image, "db.delete_provision": db_delete_provision,
                         "db.restore_provision": db_restore_provision,
                         "hil.detach": hil_detach, "hil.connect": hil_connect}.items():
            j.register_undo(name, fn)

        def finish_source_snapshot(args: dict[str, Any], ctx: RecoveryContext) -> None:
            remove_snapshot({"image": args["source"], "snap": args["snap"]}, ctx)

        def finish_removal(args: dict[str, Any], ctx: RecoveryContext) -> None:
            if args.get("node"):
                boot_remove({"node": args["node"], "mac": args["mac"]}, ctx)
            iscsi_remove({"target": args["image"]}, ctx)
            purge({"image": args["image"]}, ctx)
            db_delete_image({"id": args["image_id"]}, ctx)

        def finish_unprovision(args: dict[str, Any], ctx: RecoveryContext) -> None:
            boot_remove({"node": args["node"], "mac": args["mac"]}, ctx)
            db_delete_provision({"node": args["node"]}, ctx)

        j.register_forward("import", finish_source_snapshot)
        j.register_forward("snapshot", finish_source_snapshot)
        j.register_forward("deprovision", finish_removal)
        j.register_forward("remove_image", finish_removal)
        j.register_forward("delete_disk", finish_removal)
        j.register_forward("deprovision_disk", finish_unprovision)
        self._finish_removal = finish_removal

    def recover(self, auth: Auth | None = None) -> dict[str, Any]:
        """Roll back (or forward) every operation a dead process left behind."""
        ctx = RecoveryContext(net=self._net(auth) if auth else None)
        summary = self.journal.recover(ctx)
        if any(summary[k] for k in ("rolled_back", "rolled_forward", "failed")):
            LOG.warning("journal recovery: %s", {k: len(summary[k]) for k in ("rolled_back", "rolled_forward",
                                                                              "failed")})
        return summary

    # ------------------------------------------------------------- auth probes
    def check_auth(self, auth: Auth, project: str) -> None:
        self._access(auth, project)

    def is_admin(self, auth: Auth) -> bool:
        try:
            self._admin(auth)
        except Forbidden:
            return False
        return True

    # ------------------------------------------------------------------ import
    def import_image(self, auth: Auth, project: str, img: str, snap: str | None = None,
                     protect: bool = False) -> None:
        """Bring the storage image ``img`` under BMI as a golden image (the source is left untouched)."""
        names.validate_names(project=project, image=img)
        if snap is not None:
            names.validate_name(snap, "snapshot")
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{img}", f"source:{img}"], "import"):
            with self._session() as session:
                proj = self._project(session, project)
                if self._find(session, proj, img) is not None:
                    raise ImageExists(f"image {img} already exists in project {project}")
                project_id = proj.id
            if not self.storage.image_exists(img):
                raise ImageNotFound(f"no image named {img} in the storage pool")
            src_snaps = self.storage.list_snapshots(img)
            ctx = RecoveryContext(net=net)
            if snap is None:
                if self.snap in src_snaps:
                    raise SnapshotExists(f"image {img} already has a snapshot named {self.snap!r}; remove it, or "
                                         f"import that snapshot with --snap {self.snap}")
                with self.journal.operation("import", {"source": img, "snap": self.snap, "project": project},
                                            ctx) as tx:
                    tx.step("storage.snapshot_source", lambda: self.storage.create_snapshot(img, self.snap),
                            undo=("storage.remove_snapshot", {"image": img, "snap": self.snap}))
                    tx.step("storage.protect_source", lambda: self.storage.protect_snapshot(img, self.snap),
                            undo=("storage.unprotect", {"image": img, "snap": self.snap}))
                    self._make_golden_copy(tx, project_id, img, img, self.snap, is_snapshot=False, parent_id=None)
                    tx.commit_point()
                    self.journal.forward_registry["import"](tx.args, ctx)
            else:
                if snap not in src_snaps:
                    raise SnapshotNotFound(f"image {img} has no snapshot named {snap}")
                with self.journal.operation("import_snapshot", {"source": img, "snap": snap}, ctx) as tx:
                    if not self.storage.is_protected(img, snap):
                        if not protect:
                            raise InvalidInput(f"snapshot {img}@{snap} is not protected; import it with --protect")
                        tx.step("storage.protect_source", lambda: self.storage.protect_snapshot(img, snap),
                                undo=("storage.unprotect", {"image": img, "snap": snap}))
                    self._make_golden_copy(tx, project_id, img, img, snap, is_snapshot=False, parent_id=None)

    def _make_golden_copy(self, tx: Any, project_id: int, name: str, source: str, source_snap: str,
                          is_snapshot: bool, parent_id: int | None, kind: str = "golden") -> str:
        """Insert the row, clone ``source@source_snap``, flatten, snapshot+protect: a standalone BMI image."""

        def insert(session: Session) -> int:
            row = Image(name=name, project_id=project_id, parent_id=parent_id, is_snapshot=is_snapshot,
                        kind=kind)
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                raise ImageExists(f"image {name} already exists") from None
            return row.id

        image_id = tx.db_step("db.insert_image", insert, lambda i: ("db.delete_image", {"id": i}))
        copy = self.ceph_name(image_id)
        with self._bmi_names({copy: name}):
            tx.step("storage.clone", lambda: self.storage.clone(source, source_snap, copy),
                    undo=("storage.purge", {"image": copy}))
            tx.step("storage.flatten", lambda: self.storage.flatten(copy))
            tx.step("storage.snapshot_copy", lambda: self.storage.create_snapshot(copy, self.snap))
            tx.step("storage.protect_copy", lambda: self.storage.protect_snapshot(copy, self.snap))
        return copy

    # ------------------------------------------------------------------- lists
    def list_images(self, auth: Auth, project: str) -> list[str]:
        self._access(auth, project)
        with self._session() as session:
            proj = self._project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id, Image.kind == "golden")
                                   .order_by(Image.id)).all()
            return [r.name for r in rows]

    def _pairs(self, project: str, kinds: tuple[str, ...]) -> list[list[str]]:
        with self._session() as session:
            proj = self._project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id, Image.kind.in_(kinds))
                                   .order_by(Image.id)).all()
            return [[r.name, r.parent.name if r.parent else ""] for r in rows]

    def list_snapshots(self, auth: Auth, project: str) -> list[list[str]]:
        self._access(auth, project)
        return self._pairs(project, ("snapshot",))

    def list_provisioned(self, auth: Auth, project: str) -> list[list[str]]:
        self._access(auth, project)
        return self._pairs(project, ("node",))

    def list_disks(self, auth: Auth, project: str) -> list[list[str]]:
        self._access(auth, project)
        return self._pairs(project, ("disk",))

    # --------------------------------------------------------------- provision
    def _node_mac(self, net: Any, project: str, node: str, nic: str) -> str:
        info = net.show_node(node)
        if info.get("project") != project:
            raise Forbidden(f"node {node} does not belong to project {project}")
        for entry in info.get("nics", []):
            if entry.get("label") == nic:
                return names.normalize_mac(entry.get("macaddr", ""))
        raise NicNotFound(f"node {node} has no NIC named {nic}")

    def _export_and_boot(self, tx: Any, node: str, mac: str, label: str, clone: str, owner: str,
                         add_target: bool = True) -> None:
        addrs, inames, initiator = self._initiators(owner)
        iqn = self.iscsi.iqn(clone)
        if add_target:
            tx.step("iscsi.add_target",
                    lambda: self.iscsi.add_target(clone, self.storage.backing(clone), addrs, inames),
                    undo=("iscsi.remove", {"target": clone}))
        if self.cfg.tftp.boot_mode == "http":
            return  # nodes fetch their script from GET /boot/<mac> (boot_script): no per-node files
        tx.step("boot.write", lambda: self.boot.write(node, mac, label, iqn, initiator),
                undo=("boot.remove", {"node": node, "mac": mac}))

    def provision(self, auth: Auth, project: str, node: str, img: str, network: str, nic: str) -> None:
        """Clone ``img`` for ``node``, export it over iSCSI, write its boot files, connect its NIC."""
        names.validate_names(project=project, node=node, image=img, network=network, nic=nic)
        net = self._access(auth, project)
        mac = self._node_mac(net, project, node, nic)
        with self.journal.lock([f"node:{node}", f"image:{project}/{node}"], "provision"):
            with self._session() as session:
                proj = self._project(session, project)
                prov = session.get(Provision, node)
                if prov is not None:
                    raise NodeAlreadyProvisioned(f"node {node} is already provisioned; deprovision it first")
                parent = self._image(session, proj, img)
                if parent.kind not in ("golden", "snapshot"):
                    raise InvalidInput(f"{img} is a provisioned disk, not an image; snapshot it first")
                if self._find(session, proj, node) is not None:
                    raise ImageExists(f"project {project} already has an image named {node}; a node's clone is "
                                      "named after the node")
                project_id, parent_id, parent_ceph = proj.id, parent.id, self.ceph_name(parent.id)
            attached = network in net.nic_networks(node, nic).values()
            args = {"project": project, "node": node, "image": img, "network": network, "nic": nic, "mac": mac}
            with self.journal.operation("provision", args, RecoveryContext(net=net)) as tx:
                def insert(session: Session) -> int:
                    row = Image(name=node, project_id=project_id, parent_id=parent_id, kind="node")
                    session.add(row)
                    session.flush()
                    session.add(Provision(node=node, project_id=project_id, image_id=row.id, nic=nic, mac=mac,
                                          network=network))
                    return row.id

                image_id = tx.db_step("db.insert_clone", insert, lambda i: ("db.delete_image", {"id": i}))
                clone = self.ceph_name(image_id)
                with self._bmi_names({clone: node, parent_ceph: img}):
                    tx.step("storage.clone", lambda: self.storage.clone(parent_ceph, self.snap, clone),
                            undo=("storage.purge", {"image": clone}))
                    self._export_and_boot(tx, node, mac, img, clone, node)
                if not attached:
                    tx.step("hil.connect", lambda: net.connect_network(node, nic, network),
                            undo=("hil.detach", {"node": node, "nic": nic, "network": network}))

    def deprovision(self, auth: Auth, project: str, node: str, network: str, nic: str) -> None:
        """Undo a provision: detach the NIC, remove boot files, target, clone and rows."""
        names.validate_names(project=project, node=node, network=network, nic=nic)
        net = self._access(auth, project)
        with self.journal.lock([f"node:{node}", f"image:{project}/{node}"], "deprovision"):
            prov, row = self._provisioned(project, node, kind="node")
            clone = self.ceph_name(row.id)
            parent_name = row.parent.name if row.parent else node
            try:
                attached = network in net.nic_networks(node, nic).values()
            except (NodeNotFound, NicNotFound, AuthenticationFailed, Forbidden):
                attached = False  # HIL took the node back: nothing to detach, clean up BMI's side anyway
            args = {"project": project, "node": node, "mac": prov.mac, "image": clone, "image_id": row.id}
            addrs, inames, initiator = self._initiators(node)
            with self.journal.operation("deprovision", args, RecoveryContext(net=net)) as tx:
                if attached:
                    tx.step("hil.detach", lambda: net.detach_network(node, nic, network),
                            undo=("hil.connect", {"node": node, "nic": nic, "network": network}))
                tx.step("boot.remove", lambda: self.boot.remove(node, prov.mac),
                        undo=("boot.write", {"node": node, "mac": prov.mac, "label": parent_name,
                                             "iqn": self.iscsi.iqn(clone), "initiator": initiator}))
                if self.iscsi.target_exists(clone):
                    tx.step("iscsi.remove_target", lambda: self.iscsi.remove_target(clone),
                            undo=("iscsi.add", {"target": clone, "image": clone, "initiators": addrs,
                                                "initiator_names": inames}))
                tx.commit_point()
                with self._bmi_names({clone: node}):
                    self._finish_removal(args, tx.ctx)

    def _provisioned(self, project: str, node: str, kind: str) -> tuple[Provision, Image]:
        with self._session() as session:
            proj = self._project(session, project)
            prov = session.get(Provision, node)
            if prov is None or prov.project_id != proj.id:
                raise NodeNotProvisioned(f"node {node} is not provisioned in project {project}")
            row = session.get(Image, prov.image_id)
            if row is None or row.kind != kind:
                other = "bmi dpro" if kind == "disk" else "the split API (deprovision by disk)"
                raise InvalidInput(f"node {node} was provisioned another way; use {other}")
            _ = row.parent  # load while the session is open
            return prov, row

    # ---------------------------------------------------------------- snapshot
    def create_snapshot(self, auth: Auth, project: str, node: str, snap_name: str) -> None:
        """Capture a node's (or disk's) clone as a new standalone image marked as a snapshot."""
        names.validate_names(project=project, node=node, snapshot=snap_name)
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{node}", f"image:{project}/{snap_name}"], "snapshot"):
            with self._session() as session:
                proj = self._project(session, project)
                row = self._find(session, proj, node)
                if row is None or row.kind not in ("node", "disk"):
                    raise NodeNotProvisioned(f"node {node} is not provisioned in project {project}")
                if self._find(session, proj, snap_name) is not None:
                    raise ImageExists(f"image {snap_name} already exists in project {project}")
                src, project_id, parent_id = self.ceph_name(row.id), proj.id, row.parent_id
            if self.snap in self.storage.list_snapshots(src):
                raise SnapshotExists(f"{node} already has a snapshot in progress; try again later")
            ctx = RecoveryContext(net=net)
            with self.journal.operation("snapshot", {"source": src, "snap": self.snap}, ctx) as tx, \
                    self._bmi_names({src: node}):
                tx.step("storage.snapshot_source", lambda: self.storage.create_snapshot(src, self.snap),
                        undo=("storage.remove_snapshot", {"image": src, "snap": self.snap}))
                tx.step("storage.protect_source", lambda: self.storage.protect_snapshot(src, self.snap),
                        undo=("storage.unprotect", {"image": src, "snap": self.snap}))
                self._make_golden_copy(tx, project_id, snap_name, src, self.snap, is_snapshot=True,
                                       parent_id=parent_id, kind="snapshot")
                tx.commit_point()
                self.journal.forward_registry["snapshot"](tx.args, ctx)

    # ------------------------------------------------------------------ remove
    def remove_image(self, auth: Auth, project: str, img: str) -> None:
        """Remove an image or snapshot (``bmi rm`` / ``bmi snap rm``) from BMI and storage."""
        names.validate_names(project=project, image=img)
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{img}"], "remove"):
            with self._session() as session:
                proj = self._project(session, project)
                row = self._image(session, proj, img)
                if row.kind in ("node", "disk"):
                    verb = "bmi dpro" if row.kind == "node" else "bmi disk delete"
                    raise ImageBusy(f"{img} is a provisioned {row.kind}'s disk; use {verb}")
                users = [c.name for c in row.children if c.kind in ("node", "disk")]
                if users:
                    raise ImageBusy(f"image {img} is in use by {', '.join(sorted(users))}; deprovision first")
                ceph, image_id = self.ceph_name(row.id), row.id
            with self._bmi_names({ceph: img}):
                if self.storage.image_exists(ceph) and self.snap in self.storage.list_snapshots(ceph):
                    children = self.storage.list_children(ceph, self.snap)
                    if children:
                        raise ImageBusy(f"image {img} still has {len(children)} clone(s) in storage")
                args = {"image": ceph, "image_id": image_id}
                with self.journal.operation("remove_image", args, RecoveryContext(net=net)) as tx:
                    if self.storage.image_exists(ceph) and self.snap in self.storage.list_snapshots(ceph):
                        tx.step("storage.unprotect", lambda: self.storage.unprotect_snapshot(ceph, self.snap),
                                undo=("storage.protect", {"image": ceph, "snap": self.snap}))
                    tx.commit_point()
                    self._finish_removal(args, tx.ctx)

    # ------------------------------------------------------------ export/copy
    def export_image(self, auth: Auth, project: str, img: str, name: str) -> None:
        """Write a standalone (flattened) copy of ``img`` into the pool as ``name`` (no BMI row)."""
        names.validate_names(project=project, image=img)
        names.validate_name(name, "export")
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{img}", f"source:{name}"], "export"):
            with self._session() as session:
                row = self._image(session, self._project(session, project), img)
                ceph = self.ceph_name(row.id)
            if self.storage.image_exists(name):
                raise ImageExists(f"the storage pool already has an image named {name}")
            with self.journal.operation("export", {"image": name}, RecoveryContext(net=net)) as tx, \
                    self._bmi_names({ceph: img}):
                tx.step("storage.clone", lambda: self.storage.clone(ceph, self.snap, name),
                        undo=("storage.purge", {"image": name}))
                tx.step("storage.flatten", lambda: self.storage.flatten(name))

    def copy_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        names.validate_names(project=src_project, image=img1)
        names.validate_name(dest_project, "project")
        new_name = img2 if img2 is not None else img1
        names.validate_name(new_name, "image")
        net = self._admin(auth) if src_project != dest_project else self._access(auth, src_project)
        with self.journal.lock([f"image:{src_project}/{img1}", f"image:{dest_project}/{new_name}"], "copy"):
            with self._session() as session:
                src = self._image(session, self._project(session, src_project), img1)
                dest = self._project(session, dest_project)
                if src.kind in ("node", "disk"):
                    raise InvalidInput(f"{img1} is a provisioned disk; snapshot it first")
                if self._find(session, dest, new_name) is not None:
                    raise ImageExists(f"image {new_name} already exists in project {dest_project}")
                same = src_project == dest_project
                ceph = self.ceph_name(src.id)
                is_snap = src.is_snapshot if same else False
                parent_id = src.parent_id if same else None
                kind = src.kind if same else "golden"
                dest_id = dest.id
            with self.journal.operation("copy", {"image": img1}, RecoveryContext(net=net)) as tx, \
                    self._bmi_names({ceph: img1}):
                self._make_golden_copy(tx, dest_id, new_name, ceph, self.snap, is_snapshot=is_snap,
                                       parent_id=parent_id, kind=kind)

    def move_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        """Move (and/or rename) an image row; its storage name depends only on its id, so storage is untouched."""
        names.validate_names(project=src_project, image=img1)
        names.validate_name(dest_project, "project")
        new_name = img2 if img2 is not None else img1
        names.validate_name(new_name, "image")
        if src_project != dest_project:
            self._admin(auth)
        else:
            self._access(auth, src_project)
        with self.journal.lock([f"image:{src_project}/{img1}", f"image:{dest_project}/{new_name}"], "move"):
            with self._session() as session:
                row = self._image(session, self._project(session, src_project), img1)
                dest = self._project(session, dest_project)
                if row.kind in ("node", "disk"):
                    raise InvalidInput(f"{img1} is a provisioned disk and cannot be moved")
                if (src_project, img1) != (dest_project, new_name) and self._find(session, dest, new_name):
                    raise ImageExists(f"image {new_name} already exists in project {dest_project}")
                if src_project != dest_project:
                    row.parent_id = None
                    row.is_snapshot = False
                    row.kind = "golden"
                row.project_id = dest.id
                row.name = new_name

    # ------------------------------------------------------------------ node ip
    def node_ip(self, auth: Auth, project: str, node: str) -> str:
        names.validate_names(project=project, node=node)
        net = self._access(auth, project)
        with self._session() as session:
            prov = session.get(Provision, node)
            macs = [prov.mac] if prov is not None else []
        if not macs:
            info = net.show_node(node)
            if info.get("project") != project:
                raise Forbidden(f"node {node} does not belong to project {project}")
            macs = [names.normalize_mac(n["macaddr"]) for n in info.get("nics", []) if n.get("macaddr")]
        leases = self.cfg.tftp.leases_file
        found: dict[str, str] = {}
        try:
            with open(leases, encoding="utf-8") as fh:
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

    # -------------------------------------------------------------------- iscsi
    def iscsi_create(self, auth: Auth, project: str, img: str) -> str:
        names.validate_names(project=project, image=img)
        net = self._admin(auth)
        with self.journal.lock([f"image:{project}/{img}"], "iscsi"):
            with self._session() as session:
                row = self._image(session, self._project(session, project), img)
                ceph = self.ceph_name(row.id)
            addrs, inames, _ = self._initiators(img)
            with self.journal.operation("iscsi_create", {"image": ceph}, RecoveryContext(net=net)) as tx, \
                    self._bmi_names({ceph: img}):
                tx.step("iscsi.add_target",
                        lambda: self.iscsi.add_target(ceph, self.storage.backing(ceph), addrs, inames),
                        undo=("iscsi.remove", {"target": ceph}))
            return self.iscsi.iqn(ceph)

    def iscsi_remove(self, auth: Auth, project: str, img: str) -> None:
        names.validate_names(project=project, image=img)
        self._admin(auth)
        with self.journal.lock([f"image:{project}/{img}"], "iscsi"):
            with self._session() as session:
                row = self._image(session, self._project(session, project), img)
                ceph, kind = self.ceph_name(row.id), row.kind
            if kind in ("node", "disk"):
                raise ImageBusy(f"{img} is exported for a provisioned {kind}; deprovision instead")
            try:
                self.iscsi.remove_target(ceph)
            except TargetNotFound:
                raise TargetNotFound(f"image {img} is not exported over iSCSI") from None

    def iscsi_list(self, auth: Auth, project: str) -> list[list[str]]:
        self._access(auth, project)
        exported = set(self.iscsi.list_targets())
        with self._session() as session:
            proj = self._project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id).order_by(Image.id)).all()
            return [[r.name, self.iscsi.iqn(self.ceph_name(r.id))] for r in rows
                    if self.ceph_name(r.id) in exported]

    # -------------------------------------------------------------- split API
    def create_disk(self, auth: Auth, project: str, disk: str, img: str) -> str:
        """Clone ``img`` as disk ``disk`` and export it; returns the target name."""
        names.validate_names(project=project, disk=disk, image=img)
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{disk}"], "create_disk"):
            with self._session() as session:
                proj = self._project(session, project)
                parent = self._image(session, proj, img)
                if parent.kind not in ("golden", "snapshot"):
                    raise InvalidInput(f"{img} is a provisioned disk, not an image")
                if self._find(session, proj, disk) is not None:
                    raise ImageExists(f"image or disk {disk} already exists in project {project}")
                project_id, parent_id, parent_ceph = proj.id, parent.id, self.ceph_name(parent.id)
            with self.journal.operation("create_disk", {"disk": disk}, RecoveryContext(net=net)) as tx:
                def insert(session: Session) -> int:
                    row = Image(name=disk, project_id=project_id, parent_id=parent_id, kind="disk")
                    session.add(row)
                    session.flush()
                    return row.id

                image_id = tx.db_step("db.insert_clone", insert, lambda i: ("db.delete_image", {"id": i}))
                clone = self.ceph_name(image_id)
                addrs, inames, _ = self._initiators(disk)
                with self._bmi_names({clone: disk, parent_ceph: img}):
                    tx.step("storage.clone", lambda: self.storage.clone(parent_ceph, self.snap, clone),
                            undo=("storage.purge", {"image": clone}))
                    tx.step("iscsi.add_target",
                            lambda: self.iscsi.add_target(clone, self.storage.backing(clone), addrs, inames),
                            undo=("iscsi.remove", {"target": clone}))
            return clone

    def delete_disk(self, auth: Auth, project: str, disk: str) -> None:
        names.validate_names(project=project, disk=disk)
        net = self._access(auth, project)
        with self.journal.lock([f"image:{project}/{disk}"], "delete_disk"):
            with self._session() as session:
                row = self._image(session, self._project(session, project), disk, what="disk")
                if row.kind != "disk":
                    raise InvalidInput(f"{disk} is not a disk")
                users = session.scalars(select(Provision).where(Provision.image_id == row.id)).all()
                if users:
                    raise ImageBusy(f"disk {disk} is provisioned to node {users[0].node}; deprovision it first")
                clone, image_id = self.ceph_name(row.id), row.id
            args = {"image": clone, "image_id": image_id}
            addrs, inames, _ = self._initiators(disk)
            with self.journal.operation("delete_disk", args, RecoveryContext(net=net)) as tx, \
                    self._bmi_names({clone: disk}):
                if self.iscsi.target_exists(clone):
                    tx.step("iscsi.remove_target", lambda: self.iscsi.remove_target(clone),
                            undo=("iscsi.add", {"target": clone, "image": clone, "initiators": addrs,
                                                "initiator_names": inames}))
                tx.commit_point()
                self._finish_removal(args, tx.ctx)

    def provision_disk(self, auth: Auth, project: str, node: str, disk: str, nic: str) -> None:
        """Point ``node``'s boot files at an existing disk (split API; no HIL network change)."""
        names.validate_names(project=project, node=node, disk=disk, nic=nic)
        net = self._access(auth, project)
        mac = self._node_mac(net, project, node, nic)
        with self.journal.lock([f"node:{node}"], "provision"):
            with self._session() as session:
                proj = self._project(session, project)
                row = self._image(session, proj, disk, what="disk")
                if row.kind != "disk":
                    raise InvalidInput(f"{disk} is not a disk; create one with bmi disk create")
                if session.get(Provision, node) is not None:
                    raise NodeAlreadyProvisioned(f"node {node} is already provisioned; deprovision it first")
                clone, project_id, image_id = self.ceph_name(row.id), proj.id, row.id
            with self.journal.operation("provision_disk", {"node": node}, RecoveryContext(net=net)) as tx:
                def insert(session: Session) -> str:
                    session.add(Provision(node=node, project_id=project_id, image_id=image_id, nic=nic, mac=mac))
                    return node

                tx.db_step("db.insert_provision", insert, lambda n: ("db.delete_provision", {"node": n}))
                self._export_and_boot(tx, node, mac, disk, clone, disk, add_target=False)

    def deprovision_disk(self, auth: Auth, project: str, node: str, nic: str) -> None:
        names.validate_names(project=project, node=node, nic=nic)
        net = self._access(auth, project)
        with self.journal.lock([f"node:{node}"], "deprovision"):
            prov, row = self._provisioned(project, node, kind="disk")
            clone = self.ceph_name(row.id)
            _, _, initiator = self._initiators(row.name)
            args = {"node": node, "mac": prov.mac}
            with self.journal.operation("deprovision_disk", args, RecoveryContext(net=net)) as tx:
                tx.step("boot.remove", lambda: self.boot.remove(node, prov.mac),
                        undo=("boot.write", {"node": node, "mac": prov.mac, "label": row.name,
                                             "iqn": self.iscsi.iqn(clone), "initiator": initiator}))
                tx.commit_point()
                self.journal.forward_registry["deprovision_disk"](args, tx.ctx)

    def boot_script(self, mac: str) -> str:
        """The iPXE script of the node with NIC ``mac`` (HTTP boot path); NodeNotProvisioned if none.

        Unauthenticated by design, like TFTP: it is served on the provisioning network only and
        holds what the per-node TFTP file would (portal, target IQN, initiator name).
        """
        mac = names.normalize_mac(mac)
        with self._session() as session:
            prov = session.scalars(select(Provision).where(Provision.mac == mac)).first()
            if prov is None:
                raise NodeNotProvisioned(f"no node with MAC {mac} is provisioned")
            row = session.get(Image, prov.image_id)
            owner = prov.node if row is not None and row.kind == "node" else (row.name if row else prov.node)
            clone = self.ceph_name(prov.image_id)
        _, _, initiator = self._initiators(owner)
        return self.boot.render_ipxe(self.iscsi.iqn(clone), initiator)

    # ----------------------------------------------------------------- admin
    def list_projects(self, auth: Auth) -> list[list[Any]]:
        self._admin(auth)
        with self._session() as session:
            return [[p.id, p.name, p.provision_network or ""]
                    for p in session.scalars(select(Project).order_by(Project.id)).all()]

    def create_project(self, auth: Auth, project: str, network: str | None = None, id: int | None = None) -> None:
        names.validate_name(project, "project")
        if network is not None:
            names.validate_name(network, "network")
        if id is not None and (not isinstance(id, int) or id < 1):
            raise InvalidInput("project id must be a positive integer")
        self._admin(auth)
        try:
            with self._session() as session:
                session.add(Project(id=id, name=project, provision_network=network))
        except IntegrityError:
            raise ProjectExists(f"project {project} (or id {id}) already exists") from None

    def remove_project(self, auth: Auth, project: str) -> None:
        names.validate_name(project, "project")
        self._admin(auth)
        with self._session() as session:
            proj = self._project(session, project)
            if proj.images:
                raise ImageBusy(f"project {project} still has {len(proj.images)} image(s); remove them first")
            session.delete(proj)

    def db_list(self, auth: Auth, snapshots: bool = False, clones: bool = False, public: bool = False,
                project: str | None = None, name: str | None = None, ceph: str | None = None) -> list[list[Any]]:
        """All image rows ``[id, name, project, ceph, public, snapshot, parent]`` the caller may see."""
        user, _ = _user(auth)
        net = self._net(auth)
        admin = user in self.cfg.bmi.admin_users
        net.authenticate()
        with self._session() as session:
            rows = session.scalars(select(Image).order_by(Image.id)).all()
            table = [[r.id, r.name, r.project.name, self.ceph_name(r.id), bool(r.is_public), bool(r.is_snapshot),
                      r.parent.name if r.parent else "", r.kind] for r in rows]
        allowed: dict[str, bool] = {}

        def visible(proj_name: str) -> bool:
            if admin:
                return True
            if proj_name not in allowed:
                try:
                    net.check_project_access(proj_name)
                    allowed[proj_name] = True
                except (AuthenticationFailed, Forbidden, NotFound):
                    allowed[proj_name] = False
            return allowed[proj_name]

        out = []
        for row in table:
            is_clone = row[7] in ("node", "disk")
            if snapshots or clones or public:
                if not ((snapshots and row[5]) or (clones and is_clone) or (public and row[4])):
                    continue
            if project is not None and row[2] != project:
                continue
            if name is not None and row[1] != name:
                continue
            if ceph is not None and row[3] != ceph:
                continue
            if not visible(row[2]):
                continue
            out.append(row[:7])
        return out

    def db_create(self, auth: Auth, project: str, img: str, id: int | None = None, snap: bool = False,
                  parent: str | None = None, public: bool = False) -> None:
        """Add an image row only (repair tool for admins)."""
        names.validate_names(project=project, image=img)
        if parent is not None:
            names.validate_name(parent, "image")
        if id is not None and (not isinstance(id, int) or id < 1):
            raise InvalidInput("image id must be a positive integer")
        self._admin(auth)
        try:
            with self._session() as session:
                proj = self._project(session, project)
                parent_id = self._image(session, proj, parent).id if parent else None
                if self._find(session, proj, img) is not None or (id is not None and session.get(Image, id)):
                    raise ImageExists(f"image {img} (or id {id}) already exists")
                session.add(Image(id=id, name=img, project_id=proj.id, parent_id=parent_id, is_snapshot=snap,
                                  is_public=public, kind="snapshot" if snap else "golden"))
        except IntegrityError:
            raise ImageExists(f"image {img} (or id {id}) already exists") from None

    def db_remove(self, auth: Auth, project: str, img: str) -> None:
        """Delete an image row only (repair tool for admins); storage is not touched."""
        names.validate_names(project=project, image=img)
        self._admin(auth)
        with self._session() as session:
            row = self._image(session, self._project(session, project), img)
            if session.scalars(select(Provision).where(Provision.image_id == row.id)).first() is not None:
                raise ImageBusy(f"{img} is provisioned to a node; deprovision it first")
            users = [c.name for c in row.children if c.kind in ("node", "disk")]
            if users:
                raise ImageBusy(f"image {img} is in use by {', '.join(sorted(users))}")
            session.delete(row)

    def reconcile(self, auth: Auth, repair: bool = False) -> dict[str, Any]:
        """Compare the database with storage, iSCSI targets and boot files; report (and optionally repair) drift."""
        self._admin(auth)
        prefix = f"{self.uid}img"
        with self._session() as session:
            rows = {self.ceph_name(r.id): r.kind for r in session.scalars(select(Image)).all()}
            provs = [(p.node, p.mac, self.ceph_name(p.image_id)) for p in session.scalars(select(Provision)).all()]
        in_storage = {n for n in self.storage.list_images() if n.startswith(prefix) and n[len(prefix):].isdigit()}
        # live in the daemon, not just recorded: a target can vanish (tgtd restarted without restore)
        targets = {t for t in self.iscsi.list_targets() if t.startswith(prefix) and self.iscsi.target_exists(t)}
        should_export = {c for c, kind in rows.items() if kind in ("node", "disk")}
        report: dict[str, Any] = {
            "images_without_row": sorted(in_storage - set(rows)),
            "rows_without_image": sorted(set(rows) - in_storage),
            "targets_without_row": sorted(targets - set(rows)),
            "missing_targets": sorted(should_export - targets - (set(rows) - in_storage)),
            "missing_boot_files": sorted(node for node, mac, _ in provs if self.cfg.tftp.boot_mode == "tftp"
                                         and not self.boot.exists(node, mac)),
            "leftover_snapshots": sorted(c for c, kind in rows.items()
                                         if kind in ("node", "disk") and c in in_storage
                                         and self.snap in self.storage.list_snapshots(c)),
            "unfinished_operations": self.journal_unfinished(),
        }
        if repair:
            ctx = RecoveryContext()
            for target in report["targets_without_row"]:
                self.journal.undo_registry["iscsi.remove"]({"target": target}, ctx)
            for clone in report["missing_targets"]:
                owner = next((n for n, _, c in provs if c == clone), clone)
                addrs, inames, _ = self._initiators(owner)
                self.journal.undo_registry["iscsi.add"]({"target": clone, "image": clone, "initiators": addrs,
                                                         "initiator_names": inames}, ctx)
            for clone in report["leftover_snapshots"]:
                self.journal.undo_registry["storage.remove_snapshot"]({"image": clone, "snap": self.snap}, ctx)
            report["repaired"] = True
        return report

    def journal_unfinished(self) -> list[dict[str, Any]]:
        from ims.database.models import Operation

        with self._session() as session:
            ops = session.scalars(select(Operation).where(Operation.state.in_(("running", "failed")))).all()
            return [{"id": o.id, "kind": o.kind, "state": o.state, "error": o.error or ""} for o in ops]

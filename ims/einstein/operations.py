"""BMI's operations: the thin facade Einstein serves, one method per verb of the guide and the split API.

Each verb validates its names, checks the caller with HIL, takes its locks and runs its steps
through the journal — in the module of its resource (``ims/einstein/ops/``: images,
provisioning, snapshots, projects, disks, reconcile); every journaled step is one object with
its do and its undo side by side (``ims/einstein/ops/steps.py``).  ``@rpc`` marks what Einstein
serves; ``ims/rpc/methods.py`` builds the allow-list from these marks.

Every verb takes ``auth`` ({"username", "password"}: the tenant's HIL credentials) first.
Storage names are ``<uid>img<id>``; users only ever see BMI names.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ims.common.config import BMIConfig
from ims.common.errors import Forbidden
from ims.einstein import hosts, routing
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.journal import RecoveryContext
from ims.einstein.ops.console import Console
from ims.einstein.ops.core import Auth, Core, NetFactory, user_of
from ims.einstein.ops.disks import Disks
from ims.einstein.ops.expose import rpc
from ims.einstein.ops.images import Images
from ims.einstein.ops.projects import Projects
from ims.einstein.ops.provisioning import Provisioning
from ims.einstein.ops.reconcile import Reconcile
from ims.einstein.ops.snapshots import Snapshots
from ims.einstein.ops.status import Status
from ims.einstein.ops.steps import Steps
from ims.einstein.ops.transfer import Transfer
from ims.einstein.storage.base import Storage
from ims.einstein.tasks import Tasks

LOG = logging.getLogger(__name__)


class Operations:
    """The service core.  Einstein workers hold one instance each (one Ceph connection)."""

    def __init__(self, cfg: BMIConfig, storage: Storage, iscsi: IscsiTarget, boot: BootFiles,
                 net_factory: NetFactory, db_url: str | None = None) -> None:
        self.core = core = Core(cfg, storage, iscsi, boot, net_factory, db_url)
        # Several hosts (ims/einstein/hosts.py): this host's name in every owner string from here on.
        self.hosts = hosts.install(cfg, core.sessions, core.engine)
        self.cfg, self.storage, self.iscsi, self.boot = cfg, storage, iscsi, boot
        self.net_factory, self.uid, self.snap = net_factory, core.uid, core.snap
        self.engine, self.sessions, self.journal = core.engine, core.sessions, core.journal
        steps = Steps(core)
        self._images = Images(core, steps)
        self._provisioning = Provisioning(core, steps)
        self._snapshots = Snapshots(core, steps)
        self._projects = Projects(core)
        self._disks = Disks(core, steps)
        self._reconcile = Reconcile(core, steps)
        self._console = Console(core)
        self._transfer = Transfer(core, steps)
        self._tasks = Tasks(self, core)
        self._status = Status(core)
        # Journal recovery of a dead worker's operations (run under its locks) builds its context
        # here: with [net_isolator] service_* it can undo HIL changes, else it leaves notes.
        setattr(self.journal, "context_factory", core.service_context)  # noqa: B010 - may predate the attribute
        self.router = routing.Router(self)  # several hosts: node calls run on the node's gateway host

    @classmethod
    def from_config(cls, cfg: BMIConfig) -> Operations:
        from ims.einstein import iscsi as iscsi_drivers
        from ims.einstein import storage as storage_drivers
        from ims.einstein.hil import HILClient

        net = cfg.net_isolator

        def net_factory(auth: Auth) -> HILClient:
            user, password = user_of(auth)
            return HILClient(net.url, user, password, timeout=net.timeout, action_timeout=net.action_timeout,
                             channel=net.channel)

        boot = BootFiles(cfg.tftp.pxelinux_path, cfg.tftp.ipxe_path, cfg.iscsi.ip, iscsi_port=cfg.iscsi.port,
                         lun=cfg.iscsi.lun, interface=cfg.tftp.boot_interface,
                         pxelinux_timeout=cfg.tftp.pxelinux_timeout)
        return cls(cfg, storage_drivers.from_config(cfg), iscsi_drivers.from_config(cfg), boot, net_factory)

    def close(self) -> None:
        self._tasks.close()
        self.storage.close()
        self.engine.dispose()

    def ceph_name(self, image_id: int) -> str:
        return self.core.ceph_name(image_id)

    def recover(self, auth: Auth | None = None, fence: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """Roll back (or forward) every operation a dead process left behind.

        HIL changes are undone with ``auth``'s client if given, else with the service account
        (``[net_isolator] service_username``), else they are left as notes.  ``fence``: a take-over's
        (RecoveryContext.fence).
        """
        ctx = RecoveryContext(net=self.core.net(auth)) if auth else self.core.service_context()
        ctx.fence = fence
        summary = self.journal.recover(ctx)
        # After the journal: a dead worker's running tasks take the outcome of their journal rows.
        summary["tasks"] = self._tasks.recover()
        # Uploads whose Picasso (or Einstein) went away without a word: idle too long.
        summary["uploads_reaped"] = self._transfer.reap()
        if any(summary[k] for k in ("rolled_back", "rolled_forward", "failed")):
            LOG.warning("journal recovery: %s", {k: len(summary[k]) for k in ("rolled_back", "rolled_forward",
                                                                              "failed")})
        return summary

    def drain_tasks(self, timeout: float) -> bool:
        """On SIGTERM: let this worker's asynchronous operations finish (True) or fail the unstarted ones."""
        return self._tasks.drain(timeout)

    @rpc()
    def routed_call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """A node's call another host forwarded here, its gateway host (ims/einstein/routing.py)."""
        return self.router.run_here(method, args, kwargs)

    # --- asynchronous operations (ims/einstein/tasks.py) -------------------------------
    @rpc()
    def submit(self, auth: Auth, verb: str, kwargs: dict[str, Any], wait: float | None = None) -> dict[str, Any]:
        return self._tasks.submit(auth, verb, kwargs, wait)

    @rpc()
    def submit_batch(self, auth: Auth, verb: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._tasks.submit_batch(auth, verb, items)

    @rpc(read_only=True)
    def operation_show(self, auth: Auth, op_id: int) -> dict[str, Any]:
        return self._tasks.show(auth, op_id)

    @rpc(read_only=True)
    def operation_list(self, auth: Auth, state: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
        return self._tasks.list(auth, state, project)

    @rpc(read_only=True)
    def operation_wait(self, auth: Auth, op_id: int, timeout: float = 20.0) -> dict[str, Any]:
        return self._tasks.wait(auth, op_id, timeout)

    @rpc(read_only=True)
    def service_status(self) -> dict[str, Any]:
        """Counts for Picasso's /metrics (no names, no credentials: no auth needed)."""
        return self._status.snapshot()

    # --- auth probes -----------------------------------------------------------------
    @rpc(read_only=True)
    def check_auth(self, auth: Auth, project: str) -> None:
        self.core.access(auth, project)

    @rpc(read_only=True)
    def is_admin(self, auth: Auth) -> bool:
        try:
            self.core.admin(auth)
        except Forbidden:
            return False
        return True

    # --- images ----------------------------------------------------------------------
    @rpc()
    def import_image(self, auth: Auth, project: str, img: str, snap: str | None = None,
                     protect: bool = False) -> None:
        self._images.import_image(auth, project, img, snap, protect)

    @rpc(read_only=True)
    def list_images(self, auth: Auth, project: str) -> list[str]:
        return self._images.list_images(auth, project)

    @rpc()
    def remove_image(self, auth: Auth, project: str, img: str) -> None:
        self._images.remove_image(auth, project, img)

    @rpc()
    def export_image(self, auth: Auth, project: str, img: str, name: str) -> None:
        self._images.export_image(auth, project, img, name)

    @rpc()
    def copy_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        self._images.copy_image(auth, src_project, img1, dest_project, img2)

    @rpc()
    def move_image(self, auth: Auth, src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        self._images.move_image(auth, src_project, img1, dest_project, img2)

    # --- provisioning ----------------------------------------------------------------
    @rpc()
    def provision(self, auth: Auth, project: str, node: str, img: str, network: str, nic: str) -> None:
        self._provisioning.provision(auth, project, node, img, network, nic)

    @rpc()
    def deprovision(self, auth: Auth, project: str, node: str, network: str, nic: str) -> None:
        self._provisioning.deprovision(auth, project, node, network, nic)

    @rpc(read_only=True)
    def list_provisioned(self, auth: Auth, project: str) -> list[list[str]]:
        self.core.access(auth, project)
        return self._images.pairs(project, ("node",))

    @rpc(read_only=True)
    def node_ip(self, auth: Auth, project: str, node: str) -> str:
        return self._provisioning.node_ip(auth, project, node)

    @rpc(read_only=True)
    def boot_script(self, mac: str) -> str:
        return self._provisioning.boot_script(mac)

    # --- snapshots -------------------------------------------------------------------
    @rpc()
    def create_snapshot(self, auth: Auth, project: str, node: str, snap_name: str) -> None:
        self._snapshots.create_snapshot(auth, project, node, snap_name)

    @rpc(read_only=True)
    def list_snapshots(self, auth: Auth, project: str) -> list[list[str]]:
        self.core.access(auth, project)
        return self._images.pairs(project, ("snapshot",))

    # --- iSCSI and disks -------------------------------------------------------------
    @rpc()
    def iscsi_create(self, auth: Auth, project: str, img: str) -> str:
        return self._disks.iscsi_create(auth, project, img)

    @rpc()
    def iscsi_remove(self, auth: Auth, project: str, img: str) -> None:
        self._disks.iscsi_remove(auth, project, img)

    @rpc(read_only=True)
    def iscsi_list(self, auth: Auth, project: str) -> list[list[str]]:
        return self._disks.iscsi_list(auth, project)

    @rpc()
    def create_disk(self, auth: Auth, project: str, disk: str, img: str) -> str:
        return self._disks.create_disk(auth, project, disk, img)

    @rpc()
    def delete_disk(self, auth: Auth, project: str, disk: str) -> None:
        self._disks.delete_disk(auth, project, disk)

    @rpc()
    def provision_disk(self, auth: Auth, project: str, node: str, disk: str, nic: str) -> None:
        self._disks.provision_disk(auth, project, node, disk, nic)

    @rpc()
    def deprovision_disk(self, auth: Auth, project: str, node: str, nic: str) -> None:
        self._disks.deprovision_disk(auth, project, node, nic)

    @rpc(read_only=True)
    def list_disks(self, auth: Auth, project: str) -> list[list[str]]:
        self.core.access(auth, project)
        return self._images.pairs(project, ("disk",))

    # --- projects and the database tools --------------------------------------------------
    @rpc(read_only=True)
    def list_projects(self, auth: Auth) -> list[list[Any]]:
        return self._projects.list_projects(auth)

    @rpc(admin=True)
    def create_project(self, auth: Auth, project: str, network: str | None = None, id: int | None = None) -> None:
        self._projects.create_project(auth, project, network, id)

    @rpc(admin=True)
    def remove_project(self, auth: Auth, project: str) -> None:
        self._projects.remove_project(auth, project)

    @rpc(read_only=True)
    def db_list(self, auth: Auth, snapshots: bool = False, clones: bool = False, public: bool = False,
                project: str | None = None, name: str | None = None, ceph: str | None = None) -> list[list[Any]]:
        return self._projects.db_list(auth, snapshots, clones, public, project, name, ceph)

    @rpc(admin=True)
    def db_create(self, auth: Auth, project: str, img: str, id: int | None = None, snap: bool = False,
                  parent: str | None = None, public: bool = False) -> None:
        self._projects.db_create(auth, project, img, id, snap, parent, public)

    @rpc(admin=True)
    def db_remove(self, auth: Auth, project: str, img: str) -> None:
        self._projects.db_remove(auth, project, img)

    # --- upload and download (ims/einstein/ops/transfer.py; Picasso streams the HTTP body) ---------
    @rpc()
    def upload_begin(self, auth: Auth, project: str, img: str, size: int, owner: str) -> dict[str, Any]:
        return self._transfer.begin(auth, project, img, size, owner)

    @rpc()
    def upload_write(self, auth: Auth, project: str, upload_id: int, extents: list[Any]) -> int:
        return self._transfer.write(auth, project, upload_id, extents)

    @rpc()
    def upload_commit(self, auth: Auth, project: str, upload_id: int, owner: str) -> dict[str, Any]:
        return self._transfer.commit(auth, project, upload_id, owner)

    @rpc()
    def upload_abort(self, auth: Auth, project: str, upload_id: int, owner: str) -> bool:
        return self._transfer.abort(auth, project, upload_id, owner)

    @rpc(read_only=True)
    def download_info(self, auth: Auth, project: str, img: str) -> dict[str, Any]:
        return self._transfer.download_info(auth, project, img)

    @rpc(read_only=True)
    def download_read(self, auth: Auth, project: str, img: str, offset: int, length: int) -> bytes | None:
        return self._transfer.download_read(auth, project, img, offset, length)

    # --- reconcile ---------------------------------------------------------------------
    @rpc(admin=True)
    def reconcile(self, auth: Auth, repair: bool = False) -> dict[str, Any]:
        return self._reconcile.reconcile(auth, repair)

    # --- the web console (Picasso's /ui/; ims/einstein/ops/console.py) -------------------
    @rpc(read_only=True)
    def console_projects(self, auth: Auth) -> dict[str, Any]:
        return self._console.projects(auth)

    @rpc(read_only=True)
    def console_project(self, auth: Auth, project: str) -> dict[str, Any]:
        return self._console.project(auth, project)

"""In-memory twin of ims.einstein.operations.Operations for REST, CLI and RPC unit tests.

Same method names, arguments, return shapes and error classes as the real class;
no Ceph, no tgt, no HIL.  Seeded users (username/password):

* ``alice``/``alice-pw``: member of ``proj1`` and ``proj2``
* ``bob``/``bob-pw``: member of ``proj2``
* ``admin``/``admin-pw``: administrator, member of every project
"""
from __future__ import annotations

import threading
from typing import Any

from ims.common.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    NodeAlreadyProvisioned,
    NodeNotFound,
    NodeNotProvisioned,
    ProjectExists,
    ProjectNotFound,
    StorageError,
    TargetExists,
    TargetNotFound,
)
from ims.common.names import validate_name

USERS = {"alice": ("alice-pw", False), "bob": ("bob-pw", False), "admin": ("admin-pw", True)}
MEMBERS = {"proj1": {"alice", "admin"}, "proj2": {"alice", "bob", "admin"}}
NODES = {"proj1": {"node1": "10.0.0.11", "node2": "10.0.0.12"}, "proj2": {"node3": "10.0.0.13"}}
# A node name whose storage is "down": any operation on it raises StorageError (503).
BROKEN_NODE = "broken"


class FakeOperations:
    """Thread-safe in-memory operations.  ``calls`` records (method, args) for assertions."""

    def __init__(self, uid: str = "fake") -> None:
        self.uid = uid
        self._lock = threading.RLock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.projects: dict[str, dict[str, Any]] = {"proj1": {"id": 1, "network": "prov-net"},
                                                    "proj2": {"id": 2, "network": "prov-net2"}}
        self.images: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.provisioned: dict[tuple[str, str], str] = {}   # (project, node) -> clone image name
        self.targets: dict[tuple[str, str], str] = {}       # (project, image) -> iqn
        self.disks: dict[tuple[str, str], str] = {}         # (project, disk) -> source image
        self.closed = False
        self._add("proj1", "golden", public=True)
        self._add("proj1", "golden-snap", snap=True, parent="golden")
        self._add("proj2", "other")

    @classmethod
    def from_config(cls, cfg: Any) -> FakeOperations:
        return cls(uid=cfg.bmi.uid)

    def close(self) -> None:
        self.closed = True

    def recover(self) -> dict[str, Any]:
        return {"rolled_back": [], "rolled_forward": []}

    # --- helpers --------------------------------------------------------------------
    def _add(self, project: str, name: str, id: int | None = None, snap: bool = False, parent: str = "",
             public: bool = False) -> None:
        if id is None:
            id = self.next_id
        if id in self.images:
            raise Conflict(f"image id {id} is already used")
        self.next_id = max(self.next_id, id + 1)
        self.images[id] = {"id": id, "name": name, "project": project, "ceph": f"{self.uid}img{id}",
                           "public": public, "snapshot": snap, "parent": parent}

    def _find(self, project: str, name: str) -> dict[str, Any] | None:
        for row in self.images.values():
            if row["project"] == project and row["name"] == name:
                return row
        return None

    def _get(self, project: str, name: str) -> dict[str, Any]:
        row = self._find(project, name)
        if row is None:
            raise ImageNotFound(f"image {name} not found in project {project}")
        return row

    def _user(self, auth: dict[str, str]) -> str:
        user = auth.get("username") if isinstance(auth, dict) else None
        entry = USERS.get(str(user))
        if entry is None or entry[0] != auth.get("password"):
            raise AuthenticationFailed("authentication failed")
        return str(user)

    def _member(self, auth: dict[str, str], project: str) -> None:
        user = self._user(auth)
        validate_name(project, "project")
        if project not in self.projects:
            raise ProjectNotFound(f"project {project} not found")
        if user not in MEMBERS.get(project, set()) and not USERS[user][1]:
            raise Forbidden(f"no access to project {project}")

    def _admin(self, auth: dict[str, str]) -> None:
        if not USERS[self._user(auth)][1]:
            raise Forbidden("this operation needs an administrator")

    def _node(self, project: str, node: str) -> None:
        validate_name(node, "node")
        if node == BROKEN_NODE:
            raise StorageError("the storage back-end cannot be reached")
        if node not in NODES.get(project, {}):
            raise NodeNotFound(f"node {node} not found in project {project}")

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    # --- auth -----------------------------------------------------------------------
    def check_auth(self, auth: dict[str, str], project: str) -> None:
        with self._lock:
            self._record("check_auth", project)
            self._member(auth, project)

    def is_admin(self, auth: dict[str, str]) -> bool:
        with self._lock:
            self._record("is_admin")
            return USERS[self._user(auth)][1]

    # --- images ---------------------------------------------------------------------
    def import_image(self, auth: dict[str, str], project: str, img: str, snap: str | None = None,
                     protect: bool = False) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(img, "image")
            if snap is not None:
                validate_name(snap, "snapshot")
            if img == "missing-in-ceph":
                raise ImageNotFound(f"image {img} not found in the storage pool")
            if self._find(project, img):
                raise ImageExists(f"image {img} already exists in project {project}")
            self._add(project, img)
            self._record("import_image", project, img, snap, protect)

    def list_images(self, auth: dict[str, str], project: str) -> list[str]:
        with self._lock:
            self._member(auth, project)
            return [r["name"] for r in self.images.values()
                    if r["project"] == project and not r["snapshot"] and not r["parent"]]

    def remove_image(self, auth: dict[str, str], project: str, img: str) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(img, "image")
            row = self._get(project, img)
            if any(r["parent"] == img and r["project"] == project for r in self.images.values()):
                raise ImageBusy(f"image {img} has clones or snapshots")
            del self.images[row["id"]]

    def export_image(self, auth: dict[str, str], project: str, img: str, name: str) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(name, "image")
            self._get(project, validate_name(img, "image"))
            self._record("export_image", project, img, name)

    def copy_image(self, auth: dict[str, str], src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        with self._lock:
            self._member(auth, src_project)
            self._member(auth, dest_project)
            row = self._get(src_project, validate_name(img1, "image"))
            new = validate_name(img2, "image") if img2 is not None else img1
            if self._find(dest_project, new):
                raise ImageExists(f"image {new} already exists in project {dest_project}")
            self._add(dest_project, new, public=row["public"])

    def move_image(self, auth: dict[str, str], src_project: str, img1: str, dest_project: str,
                   img2: str | None = None) -> None:
        with self._lock:
            self._member(auth, src_project)
            self._member(auth, dest_project)
            row = self._get(src_project, validate_name(img1, "image"))
            new = validate_name(img2, "image") if img2 is not None else img1
            if self._find(dest_project, new):
                raise ImageExists(f"image {new} already exists in project {dest_project}")
            row["project"], row["name"] = dest_project, new

    # --- nodes ----------------------------------------------------------------------
    def provision(self, auth: dict[str, str], project: str, node: str, img: str, network: str, nic: str) -> None:
        with self._lock:
            self._member(auth, project)
            self._node(project, node)
            validate_name(network, "network")
            validate_name(nic, "nic")
            self._get(project, validate_name(img, "image"))
            if (project, node) in self.provisioned:
                raise NodeAlreadyProvisioned(f"node {node} is already provisioned")
            if self._find(project, node):
                raise ImageExists(f"an image named {node} already exists in project {project}")
            self._add(project, node, parent=img)
            self.provisioned[(project, node)] = node
            self._record("provision", project, node, img, network, nic)

    def deprovision(self, auth: dict[str, str], project: str, node: str, network: str, nic: str) -> None:
        with self._lock:
            self._member(auth, project)
            self._node(project, node)
            validate_name(network, "network")
            validate_name(nic, "nic")
            clone = self.provisioned.pop((project, node), None)
            if clone is None:
                raise NodeNotProvisioned(f"node {node} is not provisioned")
            row = self._find(project, clone)
            if row:
                del self.images[row["id"]]
            self._record("deprovision", project, node, network, nic)

    def create_snapshot(self, auth: dict[str, str], project: str, node: str, snap_name: str) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(snap_name, "snapshot")
            validate_name(node, "node")
            if node == BROKEN_NODE:
                raise StorageError("the storage back-end cannot be reached")
            clone = self.provisioned.get((project, node)) or self.disks.get((project, node)) and node
            if not clone:
                raise NodeNotProvisioned(f"node {node} is not provisioned")
            if self._find(project, snap_name):
                raise ImageExists(f"image {snap_name} already exists in project {project}")
            parent_row = self._find(project, clone)
            parent = parent_row["parent"] if parent_row else ""
            self._add(project, snap_name, snap=True, parent=parent)

    def list_snapshots(self, auth: dict[str, str], project: str) -> list[list[str]]:
        with self._lock:
            self._member(auth, project)
            return [[r["name"], r["parent"]] for r in self.images.values()
                    if r["project"] == project and r["snapshot"]]

    def list_provisioned(self, auth: dict[str, str], project: str) -> list[list[str]]:
        with self._lock:
            self._member(auth, project)
            result = []
            for (proj, node), clone in sorted(self.provisioned.items()):
                row = self._find(proj, clone)
                if proj == project:
                    result.append([node, row["parent"] if row else ""])
            return result

    def node_ip(self, auth: dict[str, str], project: str, node: str) -> str:
        with self._lock:
            self._member(auth, project)
            self._node(project, node)
            return NODES[project][node]

    # --- iSCSI ----------------------------------------------------------------------
    def iscsi_create(self, auth: dict[str, str], project: str, img: str) -> str:
        with self._lock:
            self._member(auth, project)
            self._get(project, validate_name(img, "image"))
            if (project, img) in self.targets:
                raise TargetExists(f"image {img} is already exported")
            iqn = f"iqn.2017-10.org.moc.bmi:{self.uid}img{self._get(project, img)['id']}"
            self.targets[(project, img)] = iqn
            return iqn

    def iscsi_remove(self, auth: dict[str, str], project: str, img: str) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(img, "image")
            if self.targets.pop((project, img), None) is None:
                raise TargetNotFound(f"image {img} is not exported")

    def iscsi_list(self, auth: dict[str, str], project: str) -> list[list[str]]:
        with self._lock:
            self._member(auth, project)
            return [[img, iqn] for (proj, img), iqn in sorted(self.targets.items()) if proj == project]

    # --- split API (disks) ----------------------------------------------------------
    def create_disk(self, auth: dict[str, str], project: str, disk: str, img: str) -> str:
        with self._lock:
            self._member(auth, project)
            validate_name(disk, "disk")
            self._get(project, validate_name(img, "image"))
            if (project, disk) in self.disks or self._find(project, disk):
                raise ImageExists(f"disk {disk} already exists in project {project}")
            self._add(project, disk, parent=img)
            self.disks[(project, disk)] = img
            return f"{self.uid}img{self._get(project, disk)['id']}"

    def delete_disk(self, auth: dict[str, str], project: str, disk: str) -> None:
        with self._lock:
            self._member(auth, project)
            validate_name(disk, "disk")
            if self.disks.pop((project, disk), None) is None:
                raise ImageNotFound(f"disk {disk} not found in project {project}")
            del self.images[self._get(project, disk)["id"]]

    def provision_disk(self, auth: dict[str, str], project: str, node: str, disk: str, nic: str) -> None:
        with self._lock:
            self._member(auth, project)
            self._node(project, node)
            validate_name(nic, "nic")
            if (project, validate_name(disk, "disk")) not in self.disks:
                raise ImageNotFound(f"disk {disk} not found in project {project}")
            if (project, node) in self.provisioned:
                raise NodeAlreadyProvisioned(f"node {node} is already provisioned")
            self.provisioned[(project, node)] = disk

    def deprovision_disk(self, auth: dict[str, str], project: str, node: str, nic: str) -> None:
        with self._lock:
            self._member(auth, project)
            self._node(project, node)
            validate_name(nic, "nic")
            if self.provisioned.pop((project, node), None) is None:
                raise NodeNotProvisioned(f"node {node} is not provisioned")

    def list_disks(self, auth: dict[str, str], project: str) -> list[list[str]]:
        with self._lock:
            self._member(auth, project)
            return [[disk, img] for (proj, disk), img in sorted(self.disks.items()) if proj == project]

    # --- projects and the database (admin) --------------------------------------------
    def list_projects(self, auth: dict[str, str]) -> list[list[Any]]:
        with self._lock:
            user = self._user(auth)
            return [[p["id"], name, p["network"]] for name, p in sorted(self.projects.items())
                    if USERS[user][1] or user in MEMBERS.get(name, set())]

    def create_project(self, auth: dict[str, str], project: str, network: str | None = None,
                       id: int | None = None) -> None:
        with self._lock:
            self._admin(auth)
            validate_name(project, "project")
            if network is not None:
                validate_name(network, "network")
            if project in self.projects:
                raise ProjectExists(f"project {project} already exists")
            new_id = id if id is not None else max([p["id"] for p in self.projects.values()] + [0]) + 1
            self.projects[project] = {"id": new_id, "network": network or ""}

    def remove_project(self, auth: dict[str, str], project: str) -> None:
        with self._lock:
            self._admin(auth)
            validate_name(project, "project")
            if project not in self.projects:
                raise ProjectNotFound(f"project {project} not found")
            if any(r["project"] == project for r in self.images.values()):
                raise Conflict(f"project {project} still has images")
            del self.projects[project]

    def db_list(self, auth: dict[str, str], snapshots: bool = False, clones: bool = False, public: bool = False,
                project: str | None = None, name: str | None = None, ceph: str | None = None) -> list[list[Any]]:
        with self._lock:
            if project is not None:
                self._member(auth, project)
            else:
                self._user(auth)
            rows = []
            for r in sorted(self.images.values(), key=lambda r: r["id"]):
                if snapshots or clones or public:
                    keep = ((snapshots and r["snapshot"]) or (clones and r["parent"] and not r["snapshot"])
                            or (public and r["public"]))
                    if not keep:
                        continue
                if project is not None and r["project"] != project:
                    continue
                if name is not None and r["name"] != name:
                    continue
                if ceph is not None and r["ceph"] != ceph:
                    continue
                rows.append([r["id"], r["name"], r["project"], r["ceph"], r["public"], r["snapshot"], r["parent"]])
            return rows

    def db_create(self, auth: dict[str, str], project: str, img: str, id: int | None = None, snap: bool = False,
                  parent: str | None = None, public: bool = False) -> None:
        with self._lock:
            self._admin(auth)
            self._member(auth, project)
            validate_name(img, "image")
            if parent is not None:
                validate_name(parent, "image")
            if id is not None and not isinstance(id, int):
                raise InvalidInput("id must be an integer")
            if self._find(project, img):
                raise ImageExists(f"image {img} already exists in project {project}")
            self._add(project, img, id=id, snap=snap, parent=parent or "", public=public)

    def db_remove(self, auth: dict[str, str], project: str, img: str) -> None:
        with self._lock:
            self._admin(auth)
            self._member(auth, project)
            del self.images[self._get(project, validate_name(img, "image"))["id"]]

    def reconcile(self, auth: dict[str, str], repair: bool = False) -> dict[str, Any]:
        with self._lock:
            self._admin(auth)
            return {"checked": len(self.images), "drift": [], "repaired": repair}


def build(cfg: Any) -> FakeOperations:
    """Factory for ``einstein_server --ops-factory tests.support.fake_ops:build``."""
    return FakeOperations.from_config(cfg)

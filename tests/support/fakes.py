"""In-memory twins of the storage, iSCSI and HIL drivers, for fast unit tests of the operations.

They implement the same interfaces and the same error contracts as the real
drivers (the integration suite runs the same scenarios against the real ones).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ims.common.errors import (
    AuthenticationFailed,
    Conflict,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    IscsiError,
    NicNotFound,
    NodeNotFound,
    ProjectNotFound,
    SnapshotExists,
    SnapshotNotFound,
    StorageError,
    TargetExists,
    TargetNotFound,
)
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.storage.base import Backing, Storage


@dataclass
class _Img:
    data: bytearray
    snaps: dict[str, bytes] = field(default_factory=dict)
    protected: set[str] = field(default_factory=set)
    parent: tuple[str, str] | None = None


class FakeStorage(Storage):
    name = "fake"

    def __init__(self) -> None:
        self.images: dict[str, _Img] = {}
        self.broken = False
        self.calls: list[str] = []

    def _get(self, image: str) -> _Img:
        if self.broken:
            raise StorageError("storage is down")
        try:
            return self.images[image]
        except KeyError:
            raise ImageNotFound(f"{image} not found") from None

    def list_images(self) -> list[str]:
        return sorted(self.images)

    def image_exists(self, image: str) -> bool:
        return image in self.images

    def create_image(self, image: str, size: int) -> None:
        if image in self.images:
            raise ImageExists(f"{image} already exists")
        self.images[image] = _Img(bytearray(size))

    def remove_image(self, image: str) -> None:
        img = self._get(image)
        if img.snaps:
            raise ImageBusy(f"{image} has snapshots")
        del self.images[image]

    def image_size(self, image: str) -> int:
        return len(self._get(image).data)

    def read(self, image: str, offset: int, length: int) -> bytes:
        return bytes(self._get(image).data[offset:offset + length])

    def write(self, image: str, offset: int, data: bytes) -> None:
        self._get(image).data[offset:offset + len(data)] = data

    def list_snapshots(self, image: str) -> list[str]:
        return sorted(self._get(image).snaps)

    def create_snapshot(self, image: str, snap: str) -> None:
        img = self._get(image)
        if snap in img.snaps:
            raise SnapshotExists(f"{image}@{snap} already exists")
        self.calls.append(f"snap {image}@{snap}")
        img.snaps[snap] = bytes(img.data)

    def _snap(self, image: str, snap: str) -> _Img:
        img = self._get(image)
        if snap not in img.snaps:
            raise SnapshotNotFound(f"{image}@{snap} not found")
        return img

    def remove_snapshot(self, image: str, snap: str) -> None:
        img = self._snap(image, snap)
        if snap in img.protected:
            raise ImageBusy(f"{image}@{snap} is protected")
        del img.snaps[snap]

    def protect_snapshot(self, image: str, snap: str) -> None:
        self._snap(image, snap).protected.add(snap)

    def unprotect_snapshot(self, image: str, snap: str) -> None:
        img = self._snap(image, snap)
        if self.list_children(image, snap):
            raise ImageBusy(f"{image}@{snap} has clones")
        img.protected.discard(snap)

    def is_protected(self, image: str, snap: str) -> bool:
        return snap in self._snap(image, snap).protected

    def clone(self, parent: str, snap: str, child: str) -> None:
        img = self._snap(parent, snap)
        if snap not in img.protected:
            raise ImageBusy(f"{parent}@{snap} is not protected")
        if child in self.images:
            raise ImageExists(f"{child} already exists")
        self.images[child] = _Img(bytearray(img.snaps[snap]), parent=(parent, snap))

    def list_children(self, image: str, snap: str) -> list[str]:
        return sorted(n for n, i in self.images.items() if i.parent == (image, snap))

    def parent_info(self, image: str) -> tuple[str, str] | None:
        return self._get(image).parent

    def flatten(self, image: str) -> None:
        self._get(image).parent = None

    def backing(self, image: str) -> Backing:
        return Backing("rdwr", f"/fake/{image}")


class FakeIscsi(IscsiTarget):
    name = "fake"

    def __init__(self, prefix: str = "iqn.2017-10.org.moc.bmi:") -> None:
        self.prefix = prefix
        self.targets: dict[str, dict[str, Any]] = {}
        self.broken = False

    def iqn(self, target: str) -> str:
        return self.prefix + target

    def add_target(self, target: str, backing: Backing, initiators: list[str] | None = None,
                   initiator_names: list[str] | None = None, chap: tuple[str, str] | None = None) -> None:
        if self.broken:
            raise IscsiError("tgtd is down")
        if target in self.targets:
            raise TargetExists(f"target {target} already exists")
        if not initiators and not initiator_names:
            raise ValueError("an initiator restriction is required")
        self.targets[target] = {"backing": backing, "initiators": initiators, "names": initiator_names,
                                "chap": chap}

    def remove_target(self, target: str) -> None:
        if self.broken:
            raise IscsiError("tgtd is down")
        if target not in self.targets:
            raise TargetNotFound(f"target {target} not found")
        del self.targets[target]

    def target_exists(self, target: str) -> bool:
        return target in self.targets

    def list_targets(self) -> list[str]:
        return sorted(self.targets)


class FakeHIL:
    """A HIL with users, projects, nodes and networks; network changes apply at once."""

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, bool, set[str]]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.projects: set[str] = set()
        self.down = False
        self.calls: list[tuple[str, ...]] = []

    def add_user(self, name: str, password: str, projects: list[str], admin: bool = False) -> None:
        self.users[name] = (password, admin, set(projects))
        self.projects.update(projects)

    def add_node(self, name: str, project: str | None, nics: dict[str, str]) -> None:
        self.nodes[name] = {"project": project,
                            "nics": {label: {"macaddr": mac, "networks": {}} for label, mac in nics.items()}}

    def client(self, auth: dict[str, str]) -> FakeHILClient:
        return FakeHILClient(self, auth["username"], auth["password"])


class FakeHILClient:
    def __init__(self, hil: FakeHIL, user: str, password: str) -> None:
        self.hil, self.user, self.password = hil, user, password

    def _auth(self) -> tuple[bool, set[str]]:
        from ims.common.errors import HILUnavailable

        if self.hil.down:
            raise HILUnavailable("cannot reach HIL")
        entry = self.hil.users.get(self.user)
        if entry is None or entry[0] != self.password:
            raise AuthenticationFailed("authentication failed")
        return entry[1], entry[2]

    def authenticate(self) -> None:
        self._auth()

    def is_admin(self) -> bool:
        return self._auth()[0]

    def check_project_access(self, project: str) -> None:
        admin, projects = self._auth()
        if project not in self.hil.projects:
            raise ProjectNotFound(f"project {project} does not exist in HIL")
        if not admin and project not in projects:
            raise AuthenticationFailed(f"no access to project {project}")

    def list_project_nodes(self, project: str) -> list[str]:
        self.check_project_access(project)
        return sorted(n for n, d in self.hil.nodes.items() if d["project"] == project)

    def _node(self, node: str) -> dict[str, Any]:
        admin, projects = self._auth()
        if node not in self.hil.nodes:
            raise NodeNotFound(f"node {node} does not exist")
        data = self.hil.nodes[node]
        if not admin and data["project"] is not None and data["project"] not in projects:
            raise AuthenticationFailed("no access to the node's project")
        return data

    def show_node(self, node: str) -> dict[str, Any]:
        data = self._node(node)
        return {"name": node, "project": data["project"],
                "nics": [{"label": k, "macaddr": v["macaddr"], "networks": dict(v["networks"])}
                         for k, v in data["nics"].items()]}

    def _nic(self, node: str, nic: str) -> dict[str, Any]:
        data = self._node(node)
        if nic not in data["nics"]:
            raise NicNotFound(f"nic {nic} does not exist")
        return data["nics"][nic]

    def node_mac(self, node: str, nic: str) -> str:
        return self._nic(node, nic)["macaddr"].lower()

    def nic_networks(self, node: str, nic: str) -> dict[str, str]:
        return dict(self._nic(node, nic)["networks"])

    def connect_network(self, node: str, nic: str, network: str) -> None:
        self.hil.calls.append(("connect", node, nic, network))
        entry = self._nic(node, nic)
        if "vlan/native" in entry["networks"]:
            raise Conflict("The channel is already in use on the nic.")
        entry["networks"]["vlan/native"] = network

    def detach_network(self, node: str, nic: str, network: str) -> None:
        self.hil.calls.append(("detach", node, nic, network))
        entry = self._nic(node, nic)
        for ch, net in list(entry["networks"].items()):
            if net == network:
                del entry["networks"][ch]
                return
        from ims.common.errors import InvalidInput

        raise InvalidInput("The network is not attached to the nic.")

"""The simulator's in-memory HIL: users, projects, networks, nodes, nics, actions.

No Flask here: every public method takes the authenticated :class:`Caller`, checks
access the way HIL's database auth backend does, and raises
:mod:`hilsim.errors`. One lock guards the whole state; networking actions are
applied by timer threads after ``action_delay`` seconds, like HIL's
``serve-networks`` daemon.
"""
from __future__ import annotations

import threading
import uuid
from typing import Any, TypeVar

from hilsim.errors import (
    AUTH_REQUIRED,
    AuthorizationError,
    BadArgumentError,
    BlockedError,
    DuplicateError,
    NotFoundError,
    ProjectMismatchError,
)
from hilsim.records import NATIVE, VLAN_POOL, Action, Caller, Network, Nic, Node, User, hash_password

T = TypeVar("T")
__all__ = ["NATIVE", "VLAN_POOL", "Action", "Caller", "HILState", "Network", "Nic", "Node", "User", "hash_password"]


class HILState:
    """The whole simulated HIL. Thread-safe; ``close()`` cancels pending timers."""

    def __init__(self, action_delay: float = 0.2) -> None:
        self.action_delay = action_delay
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.projects: set[str] = set()
        self.networks: dict[str, Network] = {}
        self.nodes: dict[str, Node] = {}
        self.actions: dict[str, Action] = {}
        self._timers: set[threading.Timer] = set()
        self._ports = 0
        self._closed = False

    # --- authentication ----------------------------------------------------------------
    def authenticate(self, username: str | None, password: str | None) -> Caller:
        if username is None:
            raise AuthorizationError(AUTH_REQUIRED)
        # Hash outside the lock: it is the slow part of every request.
        with self.lock:
            user = self._user(username)
        if not user.verify(password or ""):
            raise AuthorizationError(AUTH_REQUIRED)
        with self.lock:
            return Caller(user.name, user.is_admin, frozenset(user.projects))

    # --- lookups (HIL's get_or_404) ----------------------------------------------------
    @staticmethod
    def _get(table: dict[str, T], key: str, what: str) -> T:
        found = table.get(key)
        if found is None:
            raise NotFoundError(f"{what} does not exist.")
        return found

    def _project(self, name: str) -> str:
        if name not in self.projects:
            raise NotFoundError(f"Project {name} does not exist.")
        return name

    def _node(self, name: str) -> Node:
        return self._get(self.nodes, name, f"Node {name}")

    def _nic(self, node: Node, label: str) -> Nic:
        return self._get(node.nics, label, f"Nic {label} on node {node.name}")

    def _network(self, name: str) -> Network:
        return self._get(self.networks, name, f"Network {name}")

    def _user(self, name: str) -> User:
        return self._get(self.users, name, f"User {name}")

    @staticmethod
    def _require_owner(caller: Caller, project: str | None) -> None:
        """What HIL asks of whoever acts on an owned thing: the owning project, or admin if none owns it."""
        if project is None:
            caller.require_admin()
        else:
            caller.require_project(project)

    # --- seeding and admin set-up --------------------------------------------------------
    def add_user(self, name: str, password: str, is_admin: bool = False) -> None:
        with self.lock:
            if name in self.users:
                raise DuplicateError(f"User {name} already exists.")
            salt, pw_hash = hash_password(password)
            self.users[name] = User(name, salt, pw_hash, is_admin)

    def add_project(self, name: str) -> None:
        with self.lock:
            if name in self.projects:
                raise DuplicateError(f"Project {name} already exists.")
            self.projects.add(name)

    def add_node(self, name: str, obm: dict[str, Any] | None = None, vm: dict[str, Any] | None = None) -> None:
        with self.lock:
            if name in self.nodes:
                raise DuplicateError(f"Node {name} already exists.")
            self.nodes[name] = Node(name, obm=dict(obm or {}), vm=vm)

    def add_nic(self, node: str, label: str, macaddr: str) -> None:
        with self.lock:
            n = self._node(node)
            if label in n.nics:
                raise DuplicateError(f"Nic {label} already exists on node {node}.")
            self._ports += 1
            n.nics[label] = Nic(label, macaddr, port=f"gi1/0/{self._ports}")

    def add_network(self, name: str, owner: str | None, access: list[str], net_id: str,
                    fail_actions: bool = False) -> None:
        with self.lock:
            if name in self.networks:
                raise DuplicateError(f"Network {name} already exists.")
            for proj in ([owner] if owner else []) + access:
                self._project(proj)
            allocated = net_id == ""
            if allocated:
                used = {n.net_id for n in self.networks.values()}
                free = [str(v) for v in VLAN_POOL if str(v) not in used]
                if not free:
                    raise BlockedError("No more networks available in the allocation pool.")
                net_id = free[0]
            self.networks[name] = Network(name, owner, list(access), net_id, allocated, fail_actions)

    # --- projects and users --------------------------------------------------------------
    def list_projects(self, caller: Caller) -> list[str]:
        caller.require_admin()
        with self.lock:
            return sorted(self.projects)

    def project_create(self, caller: Caller, project: str) -> None:
        caller.require_admin()
        self.add_project(project)

    def project_delete(self, caller: Caller, project: str) -> None:
        caller.require_admin()
        with self.lock:
            self._project(project)
            if any(n.project == project for n in self.nodes.values()):
                raise BlockedError("Project has nodes still")
            if any(n.owner == project for n in self.networks.values()):
                raise BlockedError("Project still has networks")
            if any(project in n.access for n in self.networks.values()):
                raise BlockedError("Project can still access networks")
            self.projects.discard(project)
            for user in self.users.values():
                user.projects.discard(project)

    def user_create(self, caller: Caller, user: str, password: str, is_admin: bool = False) -> None:
        caller.require_admin()
        self.add_user(user, password, is_admin)

    def user_delete(self, caller: Caller, user: str) -> None:
        caller.require_admin()
        with self.lock:
            self._user(user)
            del self.users[user]

    def user_add_project(self, caller: Caller, user: str, project: str) -> None:
        caller.require_admin()
        with self.lock:
            u = self._user(user)
            self._project(project)
            if project in u.projects:
                raise DuplicateError(f"User {user} is already in project {project}")
            u.projects.add(project)

    def user_remove_project(self, caller: Caller, user: str, project: str) -> None:
        caller.require_admin()
        with self.lock:
            u = self._user(user)
            self._project(project)
            if project not in u.projects:
                raise NotFoundError(f"User {user} is not in project {project}")
            u.projects.discard(project)

    # --- nodes -------------------------------------------------------------------------------
    def node_register(self, caller: Caller, node: str, obm: dict[str, Any]) -> None:
        caller.require_admin()
        self.add_node(node, obm)

    def nic_register(self, caller: Caller, node: str, nic: str, macaddr: str) -> None:
        caller.require_admin()
        self.add_nic(node, nic, macaddr)

    def list_nodes(self, caller: Caller, which: str) -> list[str]:
        if which not in ("free", "all"):
            raise BadArgumentError(f"{which!r} is not 'free' or 'all'.")
        with self.lock:
            return sorted(n.name for n in self.nodes.values() if which == "all" or n.project is None)

    def list_project_nodes(self, caller: Caller, project: str) -> list[str]:
        with self.lock:
            self._project(project)
            caller.require_project(project)
            return sorted(n.name for n in self.nodes.values() if n.project == project)

    def show_node(self, caller: Caller, node: str) -> dict[str, Any]:
        with self.lock:
            n = self._node(node)
            if n.project is not None:
                caller.require_project(n.project)
            nics = []
            for nic in n.nics.values():
                entry: dict[str, Any] = {"label": nic.label, "macaddr": nic.macaddr, "networks": dict(nic.networks)}
                if caller.is_admin:
                    entry.update(port=nic.port, switch="sim-switch")
                nics.append(entry)
            return {"metadata": {}, "name": n.name, "nics": nics, "project": n.project}

    def project_connect_node(self, caller: Caller, project: str, node: str) -> None:
        with self.lock:
            self._project(project)
            caller.require_project(project)
            n = self._node(node)
            if n.project is not None:
                raise BlockedError("Node is already owned by a project.")
            n.project = project

    def project_detach_node(self, caller: Caller, project: str, node: str) -> None:
        with self.lock:
            self._project(project)
            caller.require_project(project)
            n = self._node(node)
            if n.project != project:
                raise NotFoundError("Node not in project")
            if any(nic.networks for nic in n.nics.values()):
                raise BlockedError("Node attached to a network")
            if any(nic.current_action for nic in n.nics.values()):
                raise BlockedError("Node has pending network actions")
            n.project = None

    def node_for_power(self, caller: Caller, node: str) -> Node:
        """The node, if ``caller`` may drive its power (HIL: free nodes are admin-only)."""
        with self.lock:
            n = self._node(node)
            self._require_owner(caller, n.project)
            return n

    # --- networks ------------------------------------------------------------------------------
    def network_create(self, caller: Caller, network: str, owner: str, access: str, net_id: str) -> None:
        with self.lock:
            if network in self.networks:
                raise DuplicateError(f"Network {network} already exists.")
            if owner == "admin":
                caller.require_admin()
                owner_project = None
            else:
                self._project(owner)
                caller.require_project(owner)
                owner_project = owner
            if access and access != owner:
                caller.require_admin()
            if net_id != "":
                # Choosing a VLAN by hand is an administrator's job in HIL.
                caller.require_admin()
            self.add_network(network, owner_project, [access] if access else [], net_id)

    def network_delete(self, caller: Caller, network: str) -> None:
        with self.lock:
            net = self._network(network)
            self._require_owner(caller, net.owner)
            if self._attachments(network):
                raise BlockedError("Network still connected to nodes.")
            if any(a.status == "PENDING" and a.new_network == network for a in self.actions.values()):
                raise BlockedError("There are pending actions on this network.")
            del self.networks[network]

    def _attachments(self, network: str) -> list[tuple[Node, Nic, str]]:
        return [(n, nic, ch) for n in self.nodes.values() for nic in n.nics.values()
                for ch, net in nic.networks.items() if net == network]

    def show_network(self, caller: Caller, network: str) -> dict[str, Any]:
        with self.lock:
            net = self._network(network)
            if net.access and not any(caller.has_project(p) for p in net.access):
                raise AuthorizationError("You do not have access to this network.")
            connected: dict[str, list[str]] = {}
            for n, nic, _ch in self._attachments(network):
                connected.setdefault(n.name, []).append(nic.label)
            return {"access": list(net.access), "channels": net.channels(), "connected-nodes": connected,
                    "name": net.name, "owner": net.owner or "admin"}

    def network_attachments(self, caller: Caller, network: str, project: str | None) -> dict[str, Any]:
        with self.lock:
            net = self._network(network)
            self._require_owner(caller, net.owner)
            return {n.name: {"channel": ch, "nic": nic.label, "project": n.project}
                    for n, nic, ch in self._attachments(network) if project is None or n.project == project}

    def list_project_networks(self, caller: Caller, project: str) -> list[str]:
        with self.lock:
            self._project(project)
            caller.require_project(project)
            return sorted(n.name for n in self.networks.values() if project in n.access)

    # --- networking actions ----------------------------------------------------------------
    def connect_network(self, caller: Caller, node: str, nic: str, network: str, channel: str | None) -> str:
        with self.lock:
            n = self._node(node)
            port = self._nic(n, nic)
            net = self._network(network)
            caller.require_project(n.project)
            if n.project is None:
                raise ProjectMismatchError("Node not in project")
            if port.current_action:
                raise BlockedError("A networking operation is already active on the nic.")
            if net.access and n.project not in net.access:
                raise ProjectMismatchError("Project does not have access to given network.")
            if network in port.networks.values():
                raise BlockedError("The network is already attached to the nic.")
            channel = NATIVE if channel is None else channel
            if channel in port.networks:
                raise BlockedError("The channel is already in use on the nic.")
            if channel not in net.channels():
                raise BadArgumentError(f"Channel {channel!r}, is not legal for this network.")
            return self._enqueue(n, port, "modify_port", network, channel)

    def detach_network(self, caller: Caller, node: str, nic: str, network: str) -> str:
        with self.lock:
            n = self._node(node)
            port = self._nic(n, nic)
            self._network(network)
            caller.require_project(n.project)
            if port.current_action:
                raise BlockedError("A networking operation is already active on the nic.")
            channel = next((ch for ch, net in port.networks.items() if net == network), None)
            if channel is None:
                # Real HIL answers 400 here although its docs say 409 (hil-api.md §2).
                raise BadArgumentError("The network is not attached to the nic.")
            return self._enqueue(n, port, "modify_port", None, channel)

    def _enqueue(self, node: Node, nic: Nic, kind: str, new_network: str | None, channel: str) -> str:
        # A new action replaces the nic's old records, so old status ids answer 404.
        for old in [a.uuid for a in self.actions.values() if a.node == node.name and a.nic == nic.label]:
            del self.actions[old]
        action = Action(str(uuid.uuid4()), node.name, nic.label, kind, new_network, channel)
        self.actions[action.uuid] = action
        nic.current_action = action.uuid
        if not self._closed:
            timer = threading.Timer(self.action_delay, self._apply, args=(action.uuid,))
            timer.daemon = True
            self._timers.add(timer)
            timer.start()
        return action.uuid

    def _apply(self, action_id: str) -> None:
        with self.lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            action = self.actions.get(action_id)
            if action is None or action.status != "PENDING":
                return
            node = self.nodes[action.node]
            nic = node.nics[action.nic]
            nic.current_action = None
            if action.new_network is not None:
                net = self.networks.get(action.new_network)
                if net is None or net.fail_actions:
                    action.status = "ERROR"
                    return
                nic.networks[action.channel] = action.new_network
            else:
                net = self.networks.get(nic.networks.get(action.channel, ""))
                if net is not None and net.fail_actions:
                    action.status = "ERROR"
                    return
                nic.networks.pop(action.channel, None)
            action.status = "DONE"

    def show_action(self, caller: Caller, status_id: str) -> dict[str, Any]:
        with self.lock:
            action = self.actions.get(status_id)
            if action is None:
                raise NotFoundError("status_id not found")
            caller.require_project(self.nodes[action.node].project)
            return action.to_json()

    # --- simulator extension ---------------------------------------------------------------
    def dump(self, caller: Caller) -> dict[str, Any]:
        """Everything except password hashes (GET /v0/_sim/state, admin only)."""
        caller.require_admin()
        with self.lock:
            return {
                "users": [{"name": u.name, "is_admin": u.is_admin, "projects": sorted(u.projects)}
                          for u in self.users.values()],
                "projects": sorted(self.projects),
                "networks": [{"name": n.name, "owner": n.owner or "admin", "access": list(n.access),
                              "net_id": n.net_id, "allocated": n.allocated, "fail_actions": n.fail_actions}
                             for n in self.networks.values()],
                "nodes": [{"name": n.name, "project": n.project, "power": n.power, "bootdev": n.bootdev,
                           "vm": n.vm is not None,
                           "nics": [{"label": c.label, "macaddr": c.macaddr, "port": c.port,
                                     "networks": dict(c.networks), "current_action": c.current_action}
                                    for c in n.nics.values()]}
                          for n in self.nodes.values()],
                "actions": [{"status_id": a.uuid, **a.to_json()} for a in self.actions.values()],
            }

    def close(self) -> None:
        with self.lock:
            self._closed = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()

"""Seed a :class:`HILState` from an inventory dict (the JSON file the simulator reads).

Shape (see config/hil-inventory.example.json)::

    {"projects": ["bmi_infra"],
     "users": [{"name", "password", "is_admin", "projects": [...]}],
     "networks": [{"name", "owner" ("admin" or a project), "access": [...], "net_id",
                   "fail_actions" (simulator extension, optional)}],
     "nodes": [{"name", "project" or null, "nics": [{"label", "macaddr"}], "vm": {...} (optional)}]}
"""
from __future__ import annotations

from typing import Any

from hilsim.errors import SimError
from hilsim.model import HILState


class InventoryError(ValueError):
    pass


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InventoryError(f"inventory: {key!r} must be a list")
    return value


def _str(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise InventoryError(f"inventory: {where} needs a non-empty string {key!r}")
    return value


def load_inventory(state: HILState, inventory: dict[str, Any]) -> None:
    """Add everything in ``inventory`` to ``state``; InventoryError names the bad entry."""
    if not isinstance(inventory, dict):
        raise InventoryError("inventory must be a JSON object")
    try:
        for project in _list(inventory, "projects"):
            state.add_project(str(project))
        for user in _list(inventory, "users"):
            name = _str(user, "name", "a user")
            state.add_user(name, _str(user, "password", f"user {name}"), bool(user.get("is_admin", False)))
            for project in user.get("projects") or []:
                if project not in state.projects:
                    raise InventoryError(f"inventory: user {name} is in unknown project {project!r}")
                state.users[name].projects.add(project)
        for net in _list(inventory, "networks"):
            name = _str(net, "name", "a network")
            owner = net.get("owner") or "admin"
            access = net.get("access") or []
            if isinstance(access, str):
                access = [access]
            state.add_network(name, None if owner == "admin" else str(owner), [str(a) for a in access],
                              str(net.get("net_id") or ""), bool(net.get("fail_actions", False)))
        for node in _list(inventory, "nodes"):
            name = _str(node, "name", "a node")
            vm = node.get("vm")
            if vm is not None and not isinstance(vm, dict):
                raise InventoryError(f"inventory: node {name}: 'vm' must be an object")
            state.add_node(name, node.get("obm") or {}, vm)
            for nic in node.get("nics") or []:
                state.add_nic(name, _str(nic, "label", f"a nic of node {name}"),
                              _str(nic, "macaddr", f"nic {nic.get('label')} of node {name}"))
            project = node.get("project")
            if project is not None:
                if project not in state.projects:
                    raise InventoryError(f"inventory: node {name} is in unknown project {project!r}")
                state.nodes[name].project = project
    except SimError as exc:
        raise InventoryError(f"inventory: {exc.msg}") from None

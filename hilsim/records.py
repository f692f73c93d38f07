"""The simulator's records: users, callers, nics, nodes, networks and networking actions.

Plain dataclasses with no locking; :class:`hilsim.model.HILState` owns them under its lock.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from hilsim.errors import ADMIN_ONLY, NO_PROJECT_ACCESS, AuthorizationError

PBKDF2_ROUNDS = 20_000
VLAN_POOL = range(1000, 2000)
NATIVE = "vlan/native"


def hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt if salt is not None else os.urandom(16)
    return salt, hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PBKDF2_ROUNDS)


@dataclass
class User:
    name: str
    salt: bytes
    pw_hash: bytes
    is_admin: bool = False
    projects: set[str] = field(default_factory=set)

    def verify(self, password: str) -> bool:
        return hmac.compare_digest(hash_password(password, self.salt)[1], self.pw_hash)


@dataclass
class Caller:
    """The authenticated user of one request."""

    name: str
    is_admin: bool
    projects: frozenset[str]

    def has_project(self, project: str | None) -> bool:
        return self.is_admin or (project is not None and project in self.projects)

    def require_admin(self) -> None:
        if not self.is_admin:
            raise AuthorizationError(ADMIN_ONLY)

    def require_project(self, project: str | None) -> None:
        if not self.has_project(project):
            raise AuthorizationError(NO_PROJECT_ACCESS)


@dataclass
class Nic:
    label: str
    macaddr: str
    port: str
    networks: dict[str, str] = field(default_factory=dict)  # channel -> network
    current_action: str | None = None


@dataclass
class Node:
    name: str
    project: str | None = None
    nics: dict[str, Nic] = field(default_factory=dict)
    obm: dict[str, Any] = field(default_factory=dict)
    power: str = "off"
    bootdev: str | None = None
    vm: dict[str, Any] | None = None


@dataclass
class Network:
    name: str
    owner: str | None  # None = created by an admin
    access: list[str]  # [] = public
    net_id: str
    allocated: bool
    fail_actions: bool = False  # simulator extension: actions on it end in ERROR

    def channels(self) -> list[str]:
        return [NATIVE, f"vlan/{self.net_id}"]


@dataclass
class Action:
    uuid: str
    node: str
    nic: str
    type: str
    new_network: str | None
    channel: str
    status: str = "PENDING"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "node": self.node, "nic": self.nic, "new_network": self.new_network,
                "type": self.type, "channel": self.channel}

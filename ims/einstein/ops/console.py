"""What the web console (Picasso's /ui/) shows: read-only views of projects, images and nodes.

Tenancy is the API's: a project is shown to a user HIL lets into it, and to BMI's
administrators (``[bmi] admin_users``).  Nothing here changes anything.

Whether a provisioned node's initiator is logged in comes from tgtd itself: the ``I_T nexus
information`` of ``tgtadm --op show --mode target`` lists each target's sessions (initiator
name and address).  Any failure to read it shows as "unknown", never as an error page: the
console must stay usable while tgtd is down (that is when an operator looks at it).
"""
from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import select

from ims.common import names
from ims.common.errors import AuthenticationFailed, BMIError, CommandFailed, Forbidden, NotFound
from ims.common.process import execute
from ims.database.models import Image, Project, Provision
from ims.einstein.ops.core import Auth, Core, user_of

LOG = logging.getLogger(__name__)

_TARGET_RE = re.compile(r"^Target (\d+): (\S+)\s*$")
_INITIATOR_RE = re.compile(r"^Initiator: (\S+)(?: alias: (\S*))?")
_ADDRESS_RE = re.compile(r"^IP Address: (\S+)")


def parse_sessions(text: str) -> dict[str, list[dict[str, str]]]:
    """``{target iqn: [{"initiator", "address"}, ...]}`` from a full ``tgtadm --op show --mode target``.

    Every target is a key (an empty list: live, nobody logged in).  Only the lines under a
    target's ``I_T nexus information:`` are read: ``Initiator: <name> alias: <alias>`` opens a
    session, the ``IP Address:`` lines below it (one per connection) give its address.
    """
    out: dict[str, list[dict[str, str]]] = {}
    sessions: list[dict[str, str]] | None = None
    in_nexus = False
    for line in text.splitlines():
        match = _TARGET_RE.match(line)
        if match:
            sessions = out.setdefault(match.group(2), [])
            in_nexus = False
            continue
        if sessions is None or not line.strip():
            continue
        stripped = line.strip()
        if len(line) - len(line.lstrip(" ")) <= 4:  # a section header of the target
            in_nexus = stripped == "I_T nexus information:"
            continue
        if not in_nexus:
            continue
        initiator = _INITIATOR_RE.match(stripped)
        if initiator:
            sessions.append({"initiator": initiator.group(1), "address": ""})
            continue
        address = _ADDRESS_RE.match(stripped)
        if address and sessions and not sessions[-1]["address"]:
            sessions[-1]["address"] = address.group(1)
    return out


class Console:
    def __init__(self, core: Core) -> None:
        self.core = core

    # --- who sees what ------------------------------------------------------------
    def _is_admin(self, auth: Auth) -> bool:
        user, _ = user_of(auth)
        return user in self.core.cfg.bmi.admin_users

    def _open_project(self, auth: Auth, project: str) -> bool:
        """Check the caller may see ``project`` (HIL, or an admin); returns whether the caller is an admin.

        401 for bad credentials only; 403 for a project HIL does not let a tenant into (HIL
        itself answers 401 there, but to a browser a 401 means "ask for the password again");
        404 for a project BMI (or, for a tenant, HIL) does not have.  An administrator sees every
        project BMI has, even one HIL does not know.
        """
        names.validate_name(project, "project")
        try:
            self.core.access(auth, project)
        except (AuthenticationFailed, Forbidden, NotFound) as exc:
            self.core.net(auth).authenticate()  # wrong credentials: 401
            if not self._is_admin(auth):
                if isinstance(exc, NotFound):
                    raise
                raise Forbidden(f"you may not use project {project}") from None
            self.core.admin(auth)
            with self.core.session() as session:
                self.core.project(session, project)
            return True
        return self._is_admin(auth)

    def _sessions(self) -> dict[str, list[dict[str, str]]] | None:
        """Live targets and their sessions, or None when tgtd cannot be asked (or the driver is not tgt)."""
        from ims.einstein.iscsi.tgt import TgtTarget

        driver = self.core.iscsi
        if not isinstance(driver, TgtTarget):
            return None
        argv = [driver.tgtadm]
        if driver.control_port:
            argv += ["-C", str(driver.control_port)]
        argv += ["--lld", "iscsi", "--op", "show", "--mode", "target"]
        try:
            out, _ = execute(*argv, timeout=driver.timeout)
        except CommandFailed as exc:
            LOG.warning("console: cannot read tgtd's sessions: %s", exc)
            return None
        return parse_sessions(out)

    def _size(self, ceph: str) -> int | None:
        try:
            return int(self.core.storage.image_size(ceph))
        except BMIError:
            return None  # its storage is gone (drift: reconcile reports it)

    def _still_a_clone(self, ceph: str) -> bool:
        """Whether a golden image or snapshot is still a clone in storage (its background flatten is pending)."""
        try:
            return self.core.storage.parent_info(ceph) is not None
        except BMIError:
            return False

    # --- views ------------------------------------------------------------------------
    def projects(self, auth: Auth) -> dict[str, Any]:
        """``{"user", "admin", "projects": [{"name", "network", "images", "nodes"}]}``: the caller's projects."""
        core = self.core
        user, _ = user_of(auth)
        net = core.net(auth)
        net.authenticate()  # bad credentials: 401 even when BMI has no project at all
        admin = self._is_admin(auth)
        with core.session() as session:
            rows = [(p.id, p.name, p.provision_network or "")
                    for p in session.scalars(select(Project).order_by(Project.name)).all()]
            counts: dict[int, list[int]] = {}
            for image in session.scalars(select(Image)).all():
                counts.setdefault(image.project_id, [0, 0])[0] += 1
            for prov in session.scalars(select(Provision)).all():
                counts.setdefault(prov.project_id, [0, 0])[1] += 1
        out = []
        for pid, name, network in rows:
            if not admin:
                try:  # HIL's answer, cached as for every verb ([net_isolator] auth_cache_seconds)
                    core.access(auth, name)
                except (AuthenticationFailed, Forbidden, NotFound):
                    continue
            images, nodes = counts.get(pid, [0, 0])
            out.append({"name": name, "network": network, "images": images, "nodes": nodes})
        return {"user": user, "admin": admin, "projects": out}

    def project(self, auth: Auth, project: str) -> dict[str, Any]:
        """One project: its image rows (each with its parent, size and live target) and provisioned nodes.

        ``images``: ``[{"name", "kind", "parent", "size", "public", "snapshot", "flattening", "iqn", "sessions"}]``
        in id order; ``parent`` is the name of a parent row in the same project, else "" (a copy's
        source in another project is not named: it may be another tenant's); ``flattening``: a golden
        image or snapshot that is still a clone in storage (its background flatten has not ended).  ``nodes``:
        ``[{"node", "image", "source", "nic", "mac", "network", "iqn", "initiator", "target_live",
        "logged_in", "sessions", "since"}]``; ``target_live``/``logged_in`` are None when tgtd
        could not be asked (``sessions_known`` False).
        """
        core = self.core
        admin = self._open_project(auth, project)
        live = self._sessions()
        with core.session() as session:
            proj = core.project(session, project)
            rows = session.scalars(select(Image).where(Image.project_id == proj.id).order_by(Image.id)).all()
            by_id = {r.id: r for r in rows}
            images = [{"name": r.name, "kind": r.kind, "ceph": core.ceph_name(r.id),
                       "parent": by_id[r.parent_id].name if r.parent_id in by_id else "",
                       "public": bool(r.is_public), "snapshot": bool(r.is_snapshot)} for r in rows]
            provs = session.scalars(select(Provision).where(Provision.project_id == proj.id)
                                    .order_by(Provision.node)).all()
            nodes = []
            for p in provs:
                image = by_id.get(p.image_id)
                nodes.append({"node": p.node, "image": image.name if image else "",
                              "source": by_id[image.parent_id].name if image and image.parent_id in by_id else "",
                              "ceph": core.ceph_name(p.image_id), "nic": p.nic, "mac": p.mac,
                              "network": p.network or "",
                              "since": p.created_at.isoformat(timespec="seconds") if p.created_at else ""})
            network = proj.provision_network or ""
        for image in images:
            ceph = image.pop("ceph")
            image["size"] = self._size(ceph)
            image["flattening"] = image["kind"] in ("golden", "snapshot") and image["size"] is not None \
                and self._still_a_clone(ceph)
            iqn = core.iscsi.iqn(ceph)
            exported = live is not None and iqn in live
            image["iqn"] = iqn if exported else ""
            image["sessions"] = len(live[iqn]) if exported and live is not None else 0
        for node in nodes:
            ceph = node.pop("ceph")
            iqn = core.iscsi.iqn(ceph)
            _, _, initiator = core.initiators(node["node"])
            node["iqn"], node["initiator"] = iqn, initiator or ""
            sessions = None if live is None else live.get(iqn)
            node["target_live"] = None if live is None else iqn in live
            node["sessions"] = sessions or []
            if live is None:
                node["logged_in"] = None
            elif initiator:  # targets bound to the node's initiator name: that name logged in
                node["logged_in"] = any(s["initiator"] == initiator for s in node["sessions"])
            else:
                node["logged_in"] = bool(node["sessions"])
        return {"project": project, "network": network, "admin": admin, "sessions_known": live is not None,
                "images": images, "nodes": nodes}

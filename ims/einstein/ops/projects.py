"""Projects (admin) and the database repair tools (``bmi db ls/create/rm``).

``db_list`` shows a row (with its internal storage name) only to an admin or to a user HIL
lets into the row's project: internal names of other tenants' images are never shown.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ims.common import names
from ims.common.errors import (
    AuthenticationFailed,
    Forbidden,
    ImageBusy,
    ImageExists,
    NotFound,
    ProjectExists,
)
from ims.database.models import Image, Project, Provision
from ims.einstein.ops.core import Auth, Core, user_of


class Projects:
    def __init__(self, core: Core) -> None:
        self.core = core

    def list_projects(self, auth: Auth) -> list[list[Any]]:
        core = self.core
        core.admin(auth)
        with core.session() as session:
            return [[p.id, p.name, p.provision_network or ""]
                    for p in session.scalars(select(Project).order_by(Project.id)).all()]

    def create_project(self, auth: Auth, project: str, network: str | None = None, id: int | None = None) -> None:
        names.validate_name(project, "project")
        if network is not None:
            names.validate_name(network, "network")
        if id is not None:
            names.validate_id(id, "project id")
        self.core.admin(auth)
        try:
            with self.core.session() as session:
                session.add(Project(id=id, name=project, provision_network=network))
        except IntegrityError:
            raise ProjectExists(f"project {project} (or id {id}) already exists") from None

    def remove_project(self, auth: Auth, project: str) -> None:
        core = self.core
        names.validate_name(project, "project")
        core.admin(auth)
        with core.session() as session:
            proj = core.project(session, project)
            if proj.images:
                raise ImageBusy(f"project {project} still has {len(proj.images)} image(s); remove them first")
            session.delete(proj)

    def db_list(self, auth: Auth, snapshots: bool = False, clones: bool = False, public: bool = False,
                project: str | None = None, name: str | None = None, ceph: str | None = None) -> list[list[Any]]:
        """All image rows ``[id, name, project, ceph, public, snapshot, parent]`` the caller may see."""
        core = self.core
        user, _ = user_of(auth)
        net = core.net(auth)
        admin = user in core.cfg.bmi.admin_users
        net.authenticate()
        with core.session() as session:
            rows = session.scalars(select(Image).order_by(Image.id)).all()
            table = [[r.id, r.name, r.project.name, core.ceph_name(r.id), bool(r.is_public), bool(r.is_snapshot),
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
        core = self.core
        names.validate_names(project=project, image=img)
        if parent is not None:
            names.validate_name(parent, "image")
        if id is not None:
            names.validate_id(id, "image id")
        core.admin(auth)
        try:
            with core.session() as session:
                proj = core.project(session, project)
                parent_id = core.image(session, proj, parent).id if parent else None
                if core.find(session, proj, img) is not None or (id is not None and session.get(Image, id)):
                    raise ImageExists(f"image {img} (or id {id}) already exists")
                session.add(Image(id=id, name=img, project_id=proj.id, parent_id=parent_id, is_snapshot=snap,
                                  is_public=public, kind="snapshot" if snap else "golden"))
        except IntegrityError:
            raise ImageExists(f"image {img} (or id {id}) already exists") from None

    def db_remove(self, auth: Auth, project: str, img: str) -> None:
        """Delete an image row only (repair tool for admins); storage is not touched."""
        core = self.core
        names.validate_names(project=project, image=img)
        core.admin(auth)
        with core.session() as session:
            row = core.image(session, core.project(session, project), img)
            if session.scalars(select(Provision).where(Provision.image_id == row.id)).first() is not None:
                raise ImageBusy(f"{img} is provisioned to a node; deprovision it first")
            users = [c.name for c in row.children if c.kind in ("node", "disk")]
            if users:
                raise ImageBusy(f"image {img} is in use by {', '.join(sorted(users))}")
            session.delete(row)

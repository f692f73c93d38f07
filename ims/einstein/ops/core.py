"""What every verb module shares: drivers, the database, the journal, and the caller checks.

One :class:`Core` per Operations instance (one per Einstein worker: one Ceph connection).
The verb modules (images, provisioning, snapshots, projects, disks, reconcile) hold a
reference to it and never to each other.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from ims.common import names
from ims.common.config import BMIConfig
from ims.common.errors import AuthenticationFailed, BMIError, Forbidden, ImageNotFound, InvalidInput, ProjectNotFound
from ims.database import make_engine, make_session_factory
from ims.database.models import Image, Project
from ims.database.plain import PlainTx
from ims.einstein.boot import BootFiles
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.journal import Journal, RecoveryContext
from ims.einstein.storage.base import Storage

LOG = logging.getLogger(__name__)

Auth = dict[str, str]
NetFactory = Callable[[Auth], Any]


def user_of(auth: Auth) -> tuple[str, str]:
    if not isinstance(auth, dict):
        raise AuthenticationFailed("no credentials given")
    user, password = auth.get("username"), auth.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise AuthenticationFailed("no credentials given: set HIL_USERNAME and HIL_PASSWORD")
    return user, password


def _add_missing_columns(engine: Any) -> None:
    """``create_all`` makes new tables only: add this release's new nullable columns to old ones."""
    for table, column, sqltype in (("provision", "connected", "BOOLEAN"), ("image", "chap_secret", "VARCHAR(64)")):
        if column not in {c["name"] for c in inspect(engine).get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sqltype}"))


def _no_project(name: str) -> ProjectNotFound:
    return ProjectNotFound(f"project {name} is not registered in BMI (an admin can add it: bmi project create {name})")


class Core:
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
        _add_missing_columns(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.journal = Journal(self.sessions)
        self._auth_cache: dict[tuple[str, str, str], float] = {}
        pattern = cfg.section("bmi").values.get("import_pattern", "")
        self.import_re = re.compile(pattern) if pattern else None

    # --- names -----------------------------------------------------------------
    def ceph_name(self, image_id: int) -> str:
        return f"{self.uid}img{image_id}"

    def user_name(self, value: object, kind: str) -> str:
        """A name the caller chooses for something BMI creates or reads: never in BMI's namespace."""
        return names.validate_user_name(value, kind, self.uid)

    @contextlib.contextmanager
    def bmi_names(self, mapping: dict[str, str]) -> Iterator[None]:
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

    def initiators(self, owner: str) -> tuple[list[str] | None, list[str] | None, str | None]:
        """(initiator addresses, initiator names, iqn for the iPXE script) for a target owned by ``owner``."""
        policy = self.cfg.iscsi.initiator_address.strip()
        if policy.lower() == "node":
            iqn = f"{self.cfg.iscsi.initiator_iqn_prefix}{owner}"
            return None, [iqn], iqn
        if policy.upper() == "ALL":
            return ["ALL"], None, None
        return [a.strip() for a in policy.split(",") if a.strip()], None, None

    def target_params(self, target: str, owner: str) -> dict[str, Any]:
        """The parameters of an add/remove-target step for BMI image ``target`` owned by ``owner``."""
        addrs, inames, _ = self.initiators(owner)
        return {"target": target, "image": target, "initiators": addrs, "initiator_names": inames}

    def require_storage(self, ceph: str, public: str) -> None:
        """ImageNotFound (404) naming the BMI image when its storage is gone (drift), before any step."""
        if not self.storage.image_exists(ceph):
            raise ImageNotFound(f"image {public} has no storage behind it (run bmi reconcile)")

    # --- database --------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self.journal.session() as session:
            yield session

    @staticmethod
    def project(session: Session, name: str) -> Project:
        proj = session.scalars(select(Project).where(Project.name == name)).first()
        if proj is None:
            raise _no_project(name)
        return proj

    def require_project(self, name: str) -> None:
        """ProjectNotFound unless ``name`` is registered (one plain-SQL read: every submit asks)."""
        with self.journal.connection() as tx:
            self.project_id(tx, name)

    # The same reads as project() and image() in a plain-SQL transaction (ims/database/plain.py), for
    # the checks every provision makes: the same errors.
    @staticmethod
    def project_id(tx: PlainTx, name: str) -> int:
        rows = tx.rows("SELECT id FROM project WHERE name = ?", (name,))
        if not rows:
            raise _no_project(name)
        return int(rows[0][0])

    @staticmethod
    def image_row(tx: PlainTx, project_id: int, name: str) -> tuple[int, str] | None:
        """``(id, kind)`` of image ``name`` of the project, None if it has none (as :meth:`find`)."""
        rows = tx.rows("SELECT id, kind FROM image WHERE project_id = ? AND name = ?", (project_id, name))
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    @classmethod
    def image_of(cls, tx: PlainTx, project_id: int, project: str, name: str) -> tuple[int, str]:
        """``(id, kind)`` of image ``name`` of the project; ImageNotFound as :meth:`image` says it."""
        row = cls.image_row(tx, project_id, name)
        if row is None:
            raise ImageNotFound(f"image {name} not found in project {project}")
        return row

    @staticmethod
    def find(session: Session, proj: Project, name: str) -> Image | None:
        return session.scalars(select(Image).where(Image.project_id == proj.id, Image.name == name)).first()

    @classmethod
    def image(cls, session: Session, proj: Project, name: str, what: str = "image") -> Image:
        img = cls.find(session, proj, name)
        if img is None:
            raise ImageNotFound(f"{what} {name} not found in project {proj.name}")
        return img

    # --- callers ---------------------------------------------------------------
    def net(self, auth: Auth) -> Any:
        user_of(auth)
        return self.net_factory(auth)

    def access(self, auth: Auth, project: str, registered: bool = True) -> Any:
        """Check with HIL that the caller may use ``project``; returns the HIL client.

        ``registered=False``: the caller reads the project's row itself, first thing under its locks
        (ProjectNotFound from there): no transaction here for it."""
        names.validate_name(project, "project")
        user, password = user_of(auth)
        net = self.net(auth)
        key = (user, hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest(), project)
        now = time.monotonic()
        if self._auth_cache.get(key, 0.0) < now:
            net.check_project_access(project)
            self._auth_cache[key] = now + float(self.cfg.net_isolator.auth_cache_seconds)
        if registered:
            self.require_project(project)
        return net

    def admin(self, auth: Auth) -> Any:
        user, _ = user_of(auth)
        net = self.net(auth)
        net.authenticate()
        if user not in self.cfg.bmi.admin_users:
            raise Forbidden(f"user {user} is not a BMI admin")
        return net

    def service_context(self) -> RecoveryContext:
        """The context journal recovery runs in: a HIL client from ``[net_isolator] service_*`` if set."""
        section = self.cfg.net_isolator.values
        user, password = section.get("service_username", ""), section.get("service_password", "")
        if not user:
            return RecoveryContext()
        try:
            return RecoveryContext(net=self.net_factory({"username": user, "password": password}))
        except BMIError as exc:  # never the password: only the error's message
            LOG.warning("recovery without HIL: the service account could not be used: %s", exc.message)
            return RecoveryContext()

    def check_import_source(self, source: str) -> None:
        """Refuse sources an operator did not open to tenants (``[bmi] import_pattern``)."""
        if self.import_re is not None and not self.import_re.fullmatch(source):
            raise InvalidInput(f"image {source} may not be imported: the operator allows only names matching "
                               f"{self.import_re.pattern!r}")

"""BMI's tables.

``project`` and ``image`` are the original's (Id, Name, Project, Public, Snapshot,
Parent; unique (project, name)); ids are AUTOINCREMENT so a deleted id is never
handed out again and Ceph names ``<uid>img<id>`` never collide.  ``provision``
records which node boots which clone (MAC, NIC, network) so deprovision and
reconcile never depend on HIL still knowing the node.  ``operation`` is the
journal and ``lock`` holds per-node / per-image locks across processes.

The schema is made by migrations (ims/database/migrations/versions), never by ``create_all``:
a change here needs a new revision there; tests/unit/test_migrate.py fails while the two differ.
"""
from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "project"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    provision_network: Mapped[str | None] = mapped_column(String(64), nullable=True)

    images: Mapped[list[Image]] = relationship(back_populates="project")


class Image(Base):
    __tablename__ = "image"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="_project_id_image_name_unique_constraint"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    is_public: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    is_snapshot: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id"), nullable=False)
    # indexed: removing an image, a deprovision and a snapshot ask for its children
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"), nullable=True,
                                                  index=True)
    # "golden" (import/copy), "node" (guide's provision clone), "disk" (split API clone), "snapshot"
    # The server default keeps rows valid that the original BMI's own tools insert (they know no kind).
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="golden", server_default="golden")
    # The CHAP secret of the iSCSI target a node boots this clone from ("node"/"disk" rows made
    # while [iscsi] chap is on; NULL = no CHAP).  Never logged, journaled or returned by the API
    # (only a node's boot script carries it): see ims/einstein/iscsi/chap.py.
    chap_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)

    project: Mapped[Project] = relationship(back_populates="images")
    parent: Mapped[Image | None] = relationship(remote_side="Image.id", back_populates="children")
    children: Mapped[list[Image]] = relationship(back_populates="parent")


class Provision(Base):
    """A node that boots from a clone (a 'node' row in the guide's mode, a 'disk' in the split API)."""

    __tablename__ = "provision"

    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id"), nullable=False)
    # indexed: removing or snapshotting an image asks which node boots from it
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id"), nullable=False, index=True)
    nic: Mapped[str] = mapped_column(String(64), nullable=False)
    mac: Mapped[str] = mapped_column(String(17), nullable=False)
    network: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # True if provision connected the NIC to ``network`` (deprovision detaches only then);
    # None for rows older than this column (deprovision then detaches if attached, as before).
    connected: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Several hosts (ims/einstein/hosts.py): the host whose tgt gateway exports this node's target;
    # None for rows older than the column (the one host of a single-host deployment).
    gateway: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Operation(Base):
    """Journal of a multi-step operation: its completed steps and how to undo them."""

    __tablename__ = "operation"
    # (state, updated_at): every lock taken looks for the unfinished rows under it (state running or
    # failed), recovery reaps idle uploads and forgets old rows by (state, updated_at); without it
    # each of those reads every row kept (30 days of operations, ~1 KiB each) while it holds the
    # database's write lock.
    __table_args__ = (Index("ix_operation_state_updated_at", "state", "updated_at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    args: Mapped[str] = mapped_column(Text, nullable=False, default="{}")       # JSON
    steps: Mapped[str] = mapped_column(Text, nullable=False, default="[]")      # JSON list
    # running -> done | rolled_back | rolled_forward | failed
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="running")
    committed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Lock(Base):
    __tablename__ = "lock"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    purpose: Mapped[str] = mapped_column(String(64), nullable=False)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Task(Base):
    """An asynchronous operation (ims/einstein/tasks.py): one queued call of a mutating verb.

    ``args`` are the verb's arguments without credentials (the accepting worker keeps those
    in memory only); ``owner`` is that worker process (``host:pid:start``), which alone can
    run the task.  ``journal_ops`` lists the journal rows (``operation.id``) the call opened:
    its steps and outcome come from there.
    """

    __tablename__ = "task"
    # (project, started_at): the scheduler's fair order reads each queued project's latest start on
    # every pass; without it that is a scan of every task kept (30 days of them).  (state,
    # finished_at): admission reads the queued and running ones, recovery forgets old finished ones.
    __table_args__ = (Index("ix_task_project_started_at", "project", "started_at"),
                      Index("ix_task_state_finished_at", "state", "finished_at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    verb: Mapped[str] = mapped_column(String(32), nullable=False)
    project: Mapped[str] = mapped_column(String(64), nullable=False)
    user: Mapped[str] = mapped_column(String(64), nullable=False)
    args: Mapped[str] = mapped_column(Text, nullable=False, default="{}")          # JSON, never a secret
    # queued -> running -> done | failed
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    gateway: Mapped[str | None] = mapped_column(String(160), nullable=True)       # iSCSI gateway it uses
    cluster: Mapped[str] = mapped_column(String(160), nullable=False)             # storage cluster it uses
    journal_ops: Mapped[str] = mapped_column(Text, nullable=False, default="[]")  # JSON list of operation.id
    result: Mapped[str | None] = mapped_column(Text, nullable=True)               # JSON
    error: Mapped[str | None] = mapped_column(Text, nullable=True)                # JSON {status, type, message}
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Host(Base):
    """An Einstein host (ims/einstein/hosts.py): its tgt portal, its RPC name server, its heartbeat.

    ``epoch`` grows at every (re)start of the host and when another host takes it over
    (``state`` ``dead``): a host whose heartbeat no longer matches its epoch has been fenced.
    """

    __tablename__ = "host"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    portal: Mapped[str] = mapped_column(String(128), nullable=False)     # tgt portal ip:port
    rpc: Mapped[str] = mapped_column(String(128), nullable=False)        # Pyro name server ip:port
    epoch: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="up")  # up | dead
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    taken_over_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    taken_over_by: Mapped[str | None] = mapped_column(String(64), nullable=True)

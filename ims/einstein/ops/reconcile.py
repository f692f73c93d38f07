"""``bmi reconcile``: compare the database with storage, tgt, boot files and HIL; report and repair drift.

Repairs run one resource at a time under that resource's locks (``node:<node>``,
``image:<project>/<name>``), and re-check the drift under the lock: a resource that is locked,
or named by a running (or unrecovered) operation, is left alone and listed in ``skipped`` —
reconcile never races a provision, a snapshot or a recovery.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from ims.common import names
from ims.common.errors import BMIError, NodeBusy
from ims.database.models import Image, Operation, Project, Provision
from ims.einstein.boot import MAC_SCRIPT_DIR
from ims.einstein.journal import RecoveryContext
from ims.einstein.ops.core import Auth, Core
from ims.einstein.ops.provisioning import boot_params
from ims.einstein.ops.steps import Steps, chap_of, ensure_target, remove_snapshot, write_boot

LOG = logging.getLogger(__name__)

_PXE_FILE_RE = re.compile(r"^01-([0-9a-f]{2}(?:-[0-9a-f]{2}){5})$")
_MAC_IPXE_RE = re.compile(r"^([0-9a-f]{2}(?:-[0-9a-f]{2}){5})\.ipxe$")
_INITRD_RE = re.compile(r"^\s*INITRD\s+(\S+)\.ipxe\s*$", re.M)


@dataclass(frozen=True)
class Row:
    project: str
    name: str
    kind: str


@dataclass(frozen=True)
class Prov:
    node: str
    mac: str
    nic: str
    network: str | None
    clone: str
    project: str
    disk: str          # the image row's name (the node for a guide provision, the disk for the split API)
    label: str         # PXELINUX label: the parent image (guide) or the disk (split API)
    kind: str


class Reconcile:
    def __init__(self, core: Core, steps: Steps) -> None:
        self.core = core
        self.steps = steps

    # --- reading ---------------------------------------------------------------------
    def _db(self) -> tuple[dict[str, Row], list[Prov], set[str]]:
        core = self.core
        with core.session() as session:
            rows = {core.ceph_name(r.id): Row(r.project.name, r.name, r.kind)
                    for r in session.scalars(select(Image)).all()}
            provs = []
            for p in session.scalars(select(Provision)).all():
                img = session.get(Image, p.image_id)
                disk = img.name if img is not None else p.node
                kind = img.kind if img is not None else "node"
                label = (img.parent.name if img is not None and img.parent else p.node) if kind == "node" else disk
                proj = session.get(Project, p.project_id)
                provs.append(Prov(p.node, p.mac, p.nic, p.network, core.ceph_name(p.image_id),
                                  proj.name if proj else "", disk, label, kind))
            networks = {p.provision_network for p in session.scalars(select(Project)).all() if p.provision_network}
        networks |= {p.network for p in provs if p.network}
        return rows, provs, networks

    def _boot_files(self) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, str]]]:
        """BMI-made boot files on disk: ``{node: ipxe text}``, ``{mac: node the PXELINUX file loads}`` and
        ``{mac: (path, text)}`` of the per-MAC iPXE copies UEFI nodes chain to."""
        core = self.core
        marker = core.iscsi.iqn(names.internal_prefix(core.uid))
        ipxe: dict[str, str] = {}
        pxe: dict[str, str] = {}
        by_mac_files: dict[str, tuple[str, str]] = {}
        with _scandir(os.path.join(core.boot.ipxe_path, MAC_SCRIPT_DIR)) as entries:
            for entry in entries:
                m = _MAC_IPXE_RE.fullmatch(entry.name)
                if m and entry.is_file():
                    text = _read(entry.path)
                    if marker in text:
                        by_mac_files[m.group(1).replace("-", ":")] = (entry.path, text)
        with _scandir(core.boot.ipxe_path) as entries:
            for entry in entries:
                node = entry.name[:-len(".ipxe")]
                if entry.name.endswith(".ipxe") and entry.is_file() and names.NAME_RE.fullmatch(node):
                    text = _read(entry.path)
                    if marker in text:  # a script BMI wrote for one of its targets (not boot.ipxe & co)
                        ipxe[node] = text
        with _scandir(core.boot.pxelinux_path) as entries:
            for entry in entries:
                m = _PXE_FILE_RE.fullmatch(entry.name)
                node = _pxe_node(entry.path) if m and entry.is_file() else None
                if m and node:
                    pxe[m.group(1).replace("-", ":")] = node
        return ipxe, pxe, by_mac_files

    def _lacks_chap(self, p: Prov, ipxe: dict[str, str], mac_ipxe: dict[str, tuple[str, str]]) -> bool:
        """A node's script (or per-MAC copy) without its target's current CHAP lines: it would not log in."""
        account = chap_of(self.core, p.clone)
        if account is None:
            return False
        lines = f"set username {account[0]}\n      set password {account[1]}\n"
        return (p.node in ipxe and lines not in ipxe[p.node]) or (p.mac in mac_ipxe and lines not in mac_ipxe[p.mac][1])

    def _chap_drift(self, clones: set[str], notes: list[str]) -> list[str]:
        """Live node/disk targets whose CHAP account differs from their row's (why goes to ``notes``)."""
        out = []
        for clone in sorted(clones):
            why = self.core.iscsi.chap_drift(clone, chap_of(self.core, clone))
            if why is not None:
                out.append(clone)
                notes.append(f"target {clone}: {why}")
        return out

    def _hil_orphans(self, net: Any, provs: list[Prov], networks: set[str], notes: list[str]) -> list[str]:
        """``node/nic/network`` attachments to a provisioning network that no provision made."""
        core = self.core
        recorded = {(p.node, p.nic, p.network) for p in provs}
        out: set[str] = set()
        with core.session() as session:
            projects = [p.name for p in session.scalars(select(Project)).all()]
        for project in projects:
            try:
                nodes = net.list_project_nodes(project)
            except BMIError as exc:
                notes.append(f"HIL: cannot list the nodes of project {project}: {exc.message}")
                continue
            for node in nodes:
                try:
                    info = net.show_node(node)
                except BMIError as exc:
                    notes.append(f"HIL: cannot show node {node}: {exc.message}")
                    continue
                for nic in info.get("nics", []):
                    for network in (nic.get("networks") or {}).values():
                        if network in networks and (node, nic.get("label"), network) not in recorded:
                            out.add(f"{node}/{nic.get('label')}/{network}")
        return sorted(out)

    def _running(self) -> list[str]:
        """Journal text (args + steps) of every operation not finished yet (running, or failed to recover)."""
        with self.core.session() as session:
            ops = session.scalars(select(Operation).where(Operation.state.in_(("running", "failed")))).all()
            return [o.args + o.steps for o in ops]

    # --- the verb ----------------------------------------------------------------------
    def reconcile(self, auth: Auth, repair: bool = False) -> dict[str, Any]:
        """Compare the database with storage, iSCSI targets, boot files and HIL; report (and optionally repair)."""
        core = self.core
        net = core.admin(auth)
        prefix = names.internal_prefix(core.uid)
        rows, provs, networks = self._db()
        in_storage = {n for n in core.storage.list_images() if n.startswith(prefix) and n[len(prefix):].isdigit()}
        # live in the daemon, not just recorded: a target can vanish (tgtd restarted without restore)
        targets = {t for t in core.iscsi.list_targets() if t.startswith(prefix) and core.iscsi.target_exists(t)}
        should_export = {c for c, row in rows.items() if row.kind in ("node", "disk")}
        tftp = core.cfg.tftp.boot_mode == "tftp"
        ipxe, pxe, mac_ipxe = self._boot_files()
        by_node = {p.node: p for p in provs}
        by_mac = {p.mac: p for p in provs}
        # files of a provision that point at a clone that does not exist, at another target, or
        # (PXELINUX) at another node's script
        stale = sorted({p.node for p in provs if tftp and (
            (p.node in ipxe and (p.clone not in in_storage or core.iscsi.iqn(p.clone) not in ipxe[p.node]))
            or (p.mac in pxe and pxe[p.mac] != p.node)
            or (p.mac in mac_ipxe and core.iscsi.iqn(p.clone) not in mac_ipxe[p.mac][1])
            or self._lacks_chap(p, ipxe, mac_ipxe))})
        # (path, node or None for a per-MAC iPXE copy, mac or None for a node's script)
        orphans: list[tuple[str, str | None, str | None]] = (
            [(core.boot.ipxe_file(n), n, None) for n in ipxe if not tftp or n not in by_node]
            + [(core.boot.pxelinux_file(m), n, m) for m, n in pxe.items() if not tftp or m not in by_mac]
            + [(path, None, m) for m, (path, _) in mac_ipxe.items() if not tftp or m not in by_mac])
        notes: list[str] = []
        report: dict[str, Any] = {
            "images_without_row": sorted(in_storage - set(rows)),
            "rows_without_image": sorted(set(rows) - in_storage),
            "targets_without_row": sorted(targets - set(rows)),
            "missing_targets": sorted(should_export - targets - (set(rows) - in_storage)),
            # live targets whose CHAP account is missing or not the row's (names only, never a secret)
            "targets_without_chap": self._chap_drift(targets & should_export, notes),
            "missing_boot_files": sorted(p.node for p in provs if tftp and not core.boot.exists(p.node, p.mac)),
            # boot files no provision owns (or, in http mode, any per-node file BMI wrote)
            "orphan_boot_files": sorted(path for path, _, _ in orphans),
            # a provision's boot files that point at a clone or target that does not exist
            "stale_boot_files": stale,
            "leftover_snapshots": sorted(c for c, row in rows.items()
                                         if row.kind in ("node", "disk") and c in in_storage
                                         and core.snap in core.storage.list_snapshots(c)),
            "hil_attachments_without_provision": self._hil_orphans(net, provs, networks, notes),
            "unfinished_operations": self.journal_unfinished(),
            "notes": notes,
            "repaired": bool(repair),
            "actions": [],
            "skipped": [],
        }
        if repair:
            self._repair(report, rows, by_node, orphans)
        return report

    # --- repairs -----------------------------------------------------------------------
    def _guarded(self, report: dict[str, Any], what: str, locks: list[str], tokens: list[str],
                 fix: Callable[[], bool]) -> None:
        """Run ``fix`` under ``locks`` unless the resource is locked or a running operation names it."""
        try:
            with self.core.journal.lock(locks, "reconcile"):
                quoted = [json.dumps(t) for t in tokens]
                if any(q in text for text in self._running() for q in quoted):
                    report["skipped"].append(f"{what}: an unfinished operation uses it")
                    return
                if fix():
                    report["actions"].append(what)
        except NodeBusy as exc:
            report["skipped"].append(f"{what}: {exc.message}")

    def _locks_of(self, clone: str, rows: dict[str, Row], by_node: dict[str, Prov]) -> tuple[list[str], list[str]]:
        row = rows.get(clone)
        locks = [f"storage:{clone}"]
        tokens = [clone]
        if row is not None:
            locks.append(f"image:{row.project}/{row.name}")
            tokens.append(row.name)
            if row.kind == "node":
                locks.append(f"node:{row.name}")
        for p in by_node.values():
            if p.clone == clone:
                locks.append(f"node:{p.node}")
                tokens.append(p.node)
        return locks, tokens

    def _repair(self, report: dict[str, Any], rows: dict[str, Row], by_node: dict[str, Prov],
                orphans: list[tuple[str, str | None, str | None]]) -> None:
        core, ctx = self.core, RecoveryContext()

        def fresh_prov(node: str) -> Prov | None:
            return {p.node: p for p in self._db()[1]}.get(node)

        for target in report["targets_without_row"]:
            locks, tokens = self._locks_of(target, rows, by_node)

            def drop(t: str = target) -> bool:
                if t in self._db()[0] or not core.iscsi.target_exists(t):
                    return False
                core.journal.undo_registry["iscsi.remove"]({"target": t}, ctx)
                return True

            self._guarded(report, f"remove stray target {target}", locks, tokens, drop)

        for clone in report["missing_targets"]:
            locks, tokens = self._locks_of(clone, rows, by_node)
            owner = next((p.node for p in by_node.values() if p.clone == clone and p.kind == "node"),
                         rows[clone].name)

            def re_add(c: str = clone, o: str = owner) -> bool:
                if c not in self._db()[0] or core.iscsi.target_exists(c) or not core.storage.image_exists(c):
                    return False
                ensure_target(core, core.target_params(c, o))
                return True

            self._guarded(report, f"re-add target {clone}", locks, tokens, re_add)

        for clone in report["targets_without_chap"]:
            locks, tokens = self._locks_of(clone, rows, by_node)

            def rebind(c: str = clone) -> bool:
                account = chap_of(core, c)
                if account is None or not core.iscsi.target_exists(c) or core.iscsi.chap_drift(c, account) is None:
                    return False
                core.iscsi.repair_chap(c, account)
                return True

            self._guarded(report, f"re-bind the CHAP account of target {clone}", locks, tokens, rebind)

        for clone in report["leftover_snapshots"]:
            locks, tokens = self._locks_of(clone, rows, by_node)

            def drop_snap(c: str = clone) -> bool:
                if core.snap not in core.storage.list_snapshots(c):
                    return False
                remove_snapshot(core, c, core.snap)
                return True

            self._guarded(report, f"remove leftover snapshot {clone}@{core.snap}", locks, tokens, drop_snap)

        for node in sorted(set(report["missing_boot_files"]) | set(report["stale_boot_files"])):
            prov = by_node[node]
            locks, tokens = self._locks_of(prov.clone, rows, by_node)

            def rewrite(n: str = node) -> bool:
                p = fresh_prov(n)
                if p is None:
                    return False
                if not core.storage.image_exists(p.clone):
                    # nothing to boot: a file pointing at a missing clone only misleads the node
                    return bool(core.boot.remove(p.node, p.mac))
                owner = p.node if p.kind == "node" else p.disk
                write_boot(core, boot_params(core, p.node, p.mac, p.label, p.clone, owner))
                return True

            self._guarded(report, f"rewrite boot files of {node}", [f"node:{node}", *locks], [node, *tokens],
                          rewrite)

        for path, node, mac in orphans:
            def unlink(p: str = path, n: str | None = node, m: str | None = mac) -> bool:
                fresh = self._db()[1]
                owned = any(q.node == n for q in fresh) if m is None else any(q.mac == m for q in fresh)
                if owned and core.cfg.tftp.boot_mode == "tftp":
                    return False  # provisioned meanwhile (a provision records its row before its files)
                if n is not None and m is not None and _pxe_node(p) != n:
                    return False  # rewritten meanwhile for another node (whose lock we do not hold)
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    return False
                return True

            # a per-MAC copy names no node: nobody else takes its mac: lock, the re-check above decides
            lock = f"node:{node}" if node is not None else f"mac:{mac}"
            self._guarded(report, f"remove orphan boot file {path}", [lock],
                          [t for t in (node, mac) if t], unlink)

    def journal_unfinished(self) -> list[dict[str, Any]]:
        with self.core.session() as session:
            ops = session.scalars(select(Operation).where(Operation.state.in_(("running", "failed")))).all()
            return [{"id": o.id, "kind": o.kind, "state": o.state, "error": o.error or ""} for o in ops]


class _scandir:
    """``os.scandir`` that yields nothing for a directory that does not exist (yet)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._it: Any = None

    def __enter__(self) -> Any:
        try:
            self._it = os.scandir(self.path)
        except FileNotFoundError:
            return iter(())
        return self._it

    def __exit__(self, *exc: object) -> None:
        if self._it is not None:
            self._it.close()


def _pxe_node(path: str) -> str | None:
    """The node whose iPXE script a BMI PXELINUX file loads (None if it is not one of BMI's)."""
    text = _read(path)
    found = _INITRD_RE.search(text)
    return found.group(1) if found and "ipxe.lkrn" in text else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(65536)
    except OSError:
        return ""

"""The tgt (Linux SCSI target framework) iSCSI driver.

Every call touches one target through ``tgtadm``; nothing parses the whole
``--op show`` output on the hot path, so the cost of add/remove does not grow
with the number of targets.  Each target also gets one tgt-admin style conf file,
``<conf_dir>/<name>.conf``, which records its tid (so removal is O(1)) and lets
:meth:`TgtTarget.restore` re-create every target after tgtd restarts.

How tgtadm 1.0.85 reports things (checked by hand, the code relies on it):
  * a duplicate tid *and* a duplicate target name both exit 22 with
    "this target already exists"; ``--op show --mode target --tid N`` (exit 0 or 22)
    tells the two apart;
  * an unknown tid exits 22 with "can't find the target";
  * tgtd down / socket missing exits 107, "failed to send request hdr to tgt daemon".

Invariant: targets on this tgtd are created by TgtTarget instances that share
``conf_dir``, so the tid recorded in a conf file names that file's target.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from ims.common.errors import CommandFailed, InvalidInput, IscsiError, TargetExists, TargetNotFound
from ims.common.fileutil import atomic_write, unlink_quietly
from ims.common.names import IQN_PREFIX_RE, validate_name
from ims.common.process import execute
from ims.einstein.boot import DEFAULT_TEMPLATES_DIR
from ims.einstein.iscsi.base import IscsiTarget
from ims.einstein.storage.base import Backing

LOG = logging.getLogger(__name__)

MAX_TID = 2**31 - 1
TID_ATTEMPTS = 64
# The SCSI caching mode page with WCE cleared: what tgt-admin sends for "write-cache off".
WRITE_CACHE_OFF = "mode_page=8:0:18:0x10:0:0xff:0xff:0:0:0xff:0xff:0xff:0xff:0x80:0x14:0:0:0:0:0:0"

_BSTYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_BACKING_PATH_RE = re.compile(r"^[A-Za-z0-9._/@:+-]{1,1024}$")
_BSOPTS_RE = re.compile(r"^[A-Za-z0-9._/=;:,@+-]{1,1024}$")
_INITIATOR_NAME_RE = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(:[A-Za-z0-9._:-]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_TID_LINE_RE = re.compile(r"^# bmi: tid=(\d+) lun=(\d+)\s*$", re.M)
_SHOW_TARGET_RE = re.compile(r"^Target (\d+): (\S+)\s*$", re.M)

# Written to conf files of names-only targets so tgt-admin does not bind ALL (see render_conf).
NO_ADDRESS = "0.0.0.0/32"

_EXISTS = "already exists"
_NO_TARGET = "can't find the target"


@dataclass
class TargetSpec:
    """Everything needed to (re-)create one target; what a conf file holds."""

    name: str
    iqn: str
    backing: Backing
    lun: int = 1
    initiators: list[str] = field(default_factory=list)
    initiator_names: list[str] = field(default_factory=list)
    tid: int | None = None


def check_backing(backing: Backing) -> Backing:
    """Allow-list a Backing: its fields go on tgtadm's argv and into a conf file."""
    if not _BSTYPE_RE.fullmatch(backing.bstype):
        raise InvalidInput(f"invalid backing store type {backing.bstype!r}")
    if not _BACKING_PATH_RE.fullmatch(backing.path) or ".." in backing.path.split("/"):
        raise InvalidInput(f"invalid backing store {backing.path!r}")
    if backing.bsopts is not None and not _BSOPTS_RE.fullmatch(backing.bsopts):
        raise InvalidInput("invalid backing store options")
    return backing


def check_initiators(initiators: list[str] | None, initiator_names: list[str] | None) -> tuple[list[str], list[str]]:
    """Validate ACL entries; returns ``(addresses, names)``.

    Debian's tgtd (1.0.85) keeps addresses and names in ONE access list: a login is let in
    when its address or its initiator name matches any entry.  So ``ALL`` admits everyone
    whatever names are bound, and a names-only list admits exactly those names (checked
    with libiscsi in tests/integration/test_tgt.py).  Never add ``ALL`` implicitly.
    """
    addresses = list(initiators or [])
    names = list(initiator_names or [])
    if not addresses and not names:
        raise InvalidInput("a target needs initiator addresses or initiator names (or ['ALL'])")
    for addr in addresses:
        if addr == "ALL":
            continue
        try:
            ipaddress.ip_network(addr, strict=False)
        except ValueError:
            raise InvalidInput(f"invalid initiator address {addr!r}") from None
    for name in names:
        if not isinstance(name, str) or not _INITIATOR_NAME_RE.fullmatch(name) or len(name) > 223:
            raise InvalidInput(f"invalid initiator name {name!r}")
    return addresses, names


def render_conf(spec: TargetSpec, template: str | None = None) -> str:
    """The tgt-admin conf text for one target (the original template plus the §6 fixes).

    ``bs-type``/``bsopts``/``backing-store`` sit at target level (tgt-admin ignores
    ``bs-type`` inside ``<backing-store>``), and bsopts is quoted ``"'...'"`` because
    tgt-admin passes it through a shell, which would otherwise cut it at ``;``.
    """
    if template is None:
        template = Path(DEFAULT_TEMPLATES_DIR, "tgt_target.temp").read_text(encoding="utf-8")
    bsopts_line = f"    bsopts \"'{spec.backing.bsopts}'\"\n" if spec.backing.bsopts else ""
    lines = [f"    initiator-address {a}\n" for a in spec.initiators]
    if not spec.initiators:
        # tgt-admin binds ALL to a target with no initiator-address line, and ALL would
        # admit every initiator whatever names are bound (one OR-ed access list).
        lines.append(f"    # {NO_ADDRESS} matches no initiator: only the names below may log in\n")
        lines.append(f"    initiator-address {NO_ADDRESS}\n")
    lines += [f"    initiator-name {n}\n" for n in spec.initiator_names]
    return string.Template(template).substitute(
        tid=spec.tid if spec.tid is not None else 0, lun=spec.lun, target_iqn=spec.iqn,
        bstype=spec.backing.bstype, backing_store=spec.backing.path, bsopts_line=bsopts_line,
        initiator_lines="".join(lines))


def parse_conf(text: str, name: str) -> TargetSpec:
    """Read back a conf file written by :func:`render_conf`. :raises InvalidInput: if malformed."""
    values: dict[str, list[str]] = {}
    iqn = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("<target ") and line.endswith(">"):
            iqn = line[len("<target "):-1].strip()
            continue
        if line == "</target>":
            continue
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value.strip())
    if not iqn or "bs-type" not in values or "backing-store" not in values:
        raise InvalidInput(f"malformed tgt conf file for target {name}")
    bsopts = values.get("bsopts", [None])[0]
    if bsopts is not None:
        bsopts = bsopts.strip("\"'")
    tid_match = _TID_LINE_RE.search(text)
    spec = TargetSpec(
        name=name, iqn=iqn,
        backing=Backing(bstype=values["bs-type"][0], path=values["backing-store"][0], bsopts=bsopts),
        lun=int(tid_match.group(2)) if tid_match else 1,
        initiators=[a for a in values.get("initiator-address", []) if a != NO_ADDRESS],
        initiator_names=values.get("initiator-name", []),
        tid=int(tid_match.group(1)) if tid_match and int(tid_match.group(1)) > 0 else None)
    check_backing(spec.backing)
    check_initiators(spec.initiators, spec.initiator_names)
    return spec


class TgtTarget(IscsiTarget):
    """tgt driver: one target per image, exported as LUN ``lun``.

    :param conf_dir: where the per-target conf files (and the tid counter) live.
    :param control_port: tgtd's ``-C`` port; 0 means tgtd's default socket.
    :param iqn_prefix: prepended to target names (``""`` keeps the original's bare names).
    """

    name = "tgt"

    def __init__(self, conf_dir: str, control_port: int = 0, iqn_prefix: str = "", lun: int = 1,
                 tgtadm: str = "tgtadm", timeout: float = 30.0) -> None:
        if not IQN_PREFIX_RE.fullmatch(iqn_prefix):
            raise InvalidInput(f"invalid iSCSI IQN prefix {iqn_prefix!r}")
        if int(lun) < 1:
            raise InvalidInput("the LUN must be 1 or more (LUN 0 is tgt's controller)")
        self.conf_dir = conf_dir
        self.control_port = int(control_port)
        self.iqn_prefix = iqn_prefix
        self.lun = int(lun)
        self.tgtadm = tgtadm
        self.timeout = timeout
        self._template = Path(DEFAULT_TEMPLATES_DIR, "tgt_target.temp").read_text(encoding="utf-8")
        os.makedirs(conf_dir, exist_ok=True)

    # --- public API ------------------------------------------------------------
    def iqn(self, target: str) -> str:
        return self.iqn_prefix + validate_name(target, "target")

    def conf_path(self, target: str) -> str:
        return os.path.join(self.conf_dir, validate_name(target, "target") + ".conf")

    def add_target(self, target: str, backing: Backing, initiators: list[str] | None = None,
                   initiator_names: list[str] | None = None) -> None:
        """Export ``backing`` as ``iqn(target)``; touches only this target.

        :raises TargetExists: the name has a conf file or a live tgt target.
        :raises IscsiError: tgtd failed or is down (a half-made target is deleted first).
        :raises InvalidInput: bad name, backing or ACL entry.
        """
        addresses, names = check_initiators(initiators, initiator_names)
        spec = TargetSpec(name=target, iqn=self.iqn(target), backing=check_backing(backing), lun=self.lun,
                          initiators=addresses, initiator_names=names)
        path = self.conf_path(target)
        if os.path.exists(path):
            raise TargetExists(f"iSCSI target {target} already exists")
        spec.tid = self._new_target(spec.iqn, target)
        try:
            self._configure(spec)
            atomic_write(path, render_conf(spec, self._template), 0o600)
        except BaseException:
            self._delete_quietly(spec.tid)
            raise
        LOG.info("iSCSI target %s added (tid %s, %s %s)", spec.iqn, spec.tid, backing.bstype, backing.path)

    def remove_target(self, target: str) -> None:
        """Delete the target (even with live sessions) and its conf file.

        :raises TargetNotFound: neither a conf file nor a live target exists.
        :raises IscsiError:
        """
        path = self.conf_path(target)
        spec = self._read_spec(target)
        tid = spec.tid if spec is not None else None
        if tid is None:
            tid = self._lookup_tid(self.iqn(target))  # rare: a target without its conf file/tid line
        if tid is None and spec is None:
            raise TargetNotFound(f"iSCSI target {target} does not exist")
        if tid is not None:
            out = self._run("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", ok_missing=True)
            if out is None and spec is None:
                raise TargetNotFound(f"iSCSI target {target} does not exist")
        unlink_quietly(path)
        LOG.info("iSCSI target %s removed (tid %s)", self.iqn(target), tid)

    def target_exists(self, target: str) -> bool:
        """Conf file present and its tid live in tgtd (one cheap tgtadm call)."""
        spec = self._read_spec(target)
        if spec is None or spec.tid is None:
            return False
        return self._tid_exists(spec.tid)

    def list_targets(self) -> list[str]:
        try:
            entries = os.listdir(self.conf_dir)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.endswith(".conf") and not entry.startswith("."):
                names.append(entry[:-len(".conf")])
        return sorted(names)

    def restore(self) -> int:
        """Re-create, from the conf files, every target tgtd does not have; returns how many.

        Runs one full ``--op show`` (not a hot path) so it is idempotent: targets that
        are already live are left alone.  A target whose old tid is taken gets a new tid
        and its conf file is rewritten.
        """
        live = self._show_all()
        restored = 0
        for name in self.list_targets():
            spec = self._read_spec(name)
            if spec is None:
                continue
            if spec.iqn in live:
                if live[spec.iqn] != spec.tid:
                    spec.tid = live[spec.iqn]
                    atomic_write(self.conf_path(name), render_conf(spec, self._template), 0o600)
                continue
            wanted = spec.tid if spec.tid is not None and spec.tid not in live.values() else None
            spec.tid = self._new_target(spec.iqn, name, first=wanted)
            try:
                self._configure(spec)
                atomic_write(self.conf_path(name), render_conf(spec, self._template), 0o600)
            except BaseException:
                self._delete_quietly(spec.tid)
                raise
            live[spec.iqn] = spec.tid
            restored += 1
            LOG.info("iSCSI target %s restored (tid %s)", spec.iqn, spec.tid)
        return restored

    # --- tgtadm ---------------------------------------------------------------------
    def _run(self, *args: str, ok_missing: bool = False, ok_exists: bool = False) -> str | None:
        """Run tgtadm; returns stdout, or None when an allowed "missing"/"exists" error happened."""
        argv = [self.tgtadm]
        if self.control_port:
            argv += ["-C", str(self.control_port)]
        argv += ["--lld", "iscsi", *args]
        try:
            out, _ = execute(*argv, timeout=self.timeout)
            return out
        except CommandFailed as exc:
            err = (exc.stderr or exc.stdout or str(exc)).strip()
            if exc.exit_code is None:
                raise IscsiError(f"cannot run tgtadm: {exc}") from exc
            if exc.exit_code == 107 or "tgt daemon" in err:
                raise IscsiError(
                    f"tgtd is not running or not reachable (control port {self.control_port}): start tgtd "
                    f"(e.g. 'systemctl start tgt' or scripts/tgtd-dev) and retry") from exc
            if ok_missing and _NO_TARGET in err:
                return None
            if ok_exists and _EXISTS in err:
                return None
            raise IscsiError(f"tgtadm {' '.join(args[:4])} failed: {err}") from exc

    def _tid_exists(self, tid: int) -> bool:
        return self._run("--op", "show", "--mode", "target", "--tid", str(tid), ok_missing=True) is not None

    def _new_target(self, iqn: str, name: str, first: int | None = None) -> int:
        """Create an empty target under a free tid; returns the tid.

        Candidates come from a counter file, so the usual case is one tgtadm call.
        """
        candidate = first
        for _ in range(TID_ATTEMPTS):
            if candidate is None:
                candidate = self._next_tid()
            if self._run("--op", "new", "--mode", "target", "--tid", str(candidate), "-T", iqn,
                         ok_exists=True) is not None:
                return candidate
            if not self._tid_exists(candidate):
                # The tid is free, so it is the name that tgtd already has.
                raise TargetExists(f"iSCSI target {name} already exists")
            candidate = None
        raise IscsiError(f"could not find a free tgt tid for {name} after {TID_ATTEMPTS} attempts")

    def _configure(self, spec: TargetSpec) -> None:
        """LUN, write cache off, ACLs for a target that exists but is empty."""
        assert spec.tid is not None
        tid = str(spec.tid)
        lun_args = ["--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(spec.lun),
                    "--bstype", spec.backing.bstype, "--backing-store", spec.backing.path]
        if spec.backing.bsopts:
            lun_args += ["--bsopts", spec.backing.bsopts]
        self._run(*lun_args)
        self._run("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", str(spec.lun),
                  "--params", WRITE_CACHE_OFF)
        for address in spec.initiators:
            self._run("--op", "bind", "--mode", "target", "--tid", tid, "-I", address)
        for name in spec.initiator_names:
            self._run("--op", "bind", "--mode", "target", "--tid", tid, "-Q", name)

    def _delete_quietly(self, tid: int | None) -> None:
        if tid is None:
            return
        try:
            self._run("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", ok_missing=True)
        except IscsiError as exc:
            LOG.warning("could not delete half-made tgt target tid %s: %s", tid, exc)

    def _show_all(self) -> dict[str, int]:
        out = self._run("--op", "show", "--mode", "target") or ""
        return {m.group(2): int(m.group(1)) for m in _SHOW_TARGET_RE.finditer(out)}

    def _lookup_tid(self, iqn: str) -> int | None:
        return self._show_all().get(iqn)

    # --- conf dir ----------------------------------------------------------------------
    def _read_spec(self, target: str) -> TargetSpec | None:
        try:
            text = Path(self.conf_path(target)).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return parse_conf(text, target)

    def _next_tid(self) -> int:
        """Bump the counter in ``<conf_dir>/.tid`` under an fcntl lock (shared by all workers)."""
        fd = os.open(os.path.join(self.conf_dir, ".tid"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.read(fd, 32).strip()
            last = int(raw) if raw.isdigit() else 0
            tid = last + 1 if last < MAX_TID else 1
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(tid).encode())
            return tid
        finally:
            os.close(fd)  # closing drops the lock

"""tgt's text formats, as BMI reads and writes them: the per-target conf file (tgt-admin's
format, loadable by Debian's tgt.service) and the output of ``tgtadm --op show --mode target``.

Pure functions, no daemon: validation of everything that goes on tgtadm's argv or into a
conf file, rendering and parsing of conf files, parsing of a full show.
"""
from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ims.common.errors import InvalidInput
from ims.einstein.boot import DEFAULT_TEMPLATES_DIR
from ims.einstein.iscsi.chap import check_chap
from ims.einstein.storage.base import Backing

_BSTYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_BACKING_PATH_RE = re.compile(r"^[A-Za-z0-9._/@:+-]{1,1024}$")
_BSOPTS_RE = re.compile(r"^[A-Za-z0-9._/=;:,@+-]{1,1024}$")
_INITIATOR_NAME_RE = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[A-Za-z0-9.-]+(:[A-Za-z0-9._:-]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_TID_LINE_RE = re.compile(r"^# bmi: tid=(\d+) lun=(\d+)\s*$", re.M)
_SHOW_TARGET_LINE_RE = re.compile(r"Target (\d+): (\S+)[ \t]*$", re.M)  # matched at a line start
_SHOW_LUN_RE = re.compile(r"^LUN: (\d+)$")

# Logical blocks per physical block, as a power of two (SCSI READ CAPACITY(16) LBPPBE): 3 = 4 KiB
# physical blocks of 512-byte sectors, what a 512e disk reports.  tgt's rbd backing would derive it
# from the Ceph object size (4 MiB, exponent 13), and guests then align and size their I/O to 4 MiB.
# In the conf file too ("lbppbe" at target level), so tgt-admin and Debian's tgt.service keep it.
LUN_LBPPBE = 3

# Written to conf files of names-only targets so tgt-admin does not bind ALL (see render_conf).
NO_ADDRESS = "0.0.0.0/32"


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
    # CHAP (``incominguser``): the account only this target's initiator logs in with; None = no CHAP.
    chap: tuple[str, str] | None = field(default=None, repr=False)


@dataclass
class LiveTarget:
    """One target as tgtd reports it in a full ``--op show --mode target``."""

    tid: int
    iqn: str
    backing_stores: dict[int, str] = field(default_factory=dict)   # LUN -> backing store path (LUN 0 left out)
    acl: list[str] = field(default_factory=list)                   # addresses and initiator names, in order
    accounts: list[str] = field(default_factory=list)              # incoming CHAP users bound (names only)


class LiveTargets(Mapping[str, LiveTarget]):
    """A parsed full show, ``{iqn: LiveTarget}``, parsed lazily: one regular-expression scan finds
    every ``Target N: <iqn>`` line (column 0); a target's own lines are read the first time it is
    looked up.  Most callers want ONE target of a show that lists every target on the gateway (a
    few ms of Python per show at a hundred targets, for each add and remove of a batch)."""

    def __init__(self, text: str) -> None:
        self._text = text
        # perf: str.find for the line starts (C speed), the expression only where one begins
        starts = [0] if text.startswith("Target ") else []
        at = text.find("\nTarget ")
        while at != -1:
            starts.append(at + 1)
            at = text.find("\nTarget ", at + 1)
        heads = [(m.start(), m.end(), int(m.group(1)), m.group(2))
                 for m in (_SHOW_TARGET_LINE_RE.match(text, start) for start in starts) if m]
        self._spans: dict[str, tuple[int, int, int]] = {}
        for i, (_start, end, tid, iqn) in enumerate(heads):
            self._spans[iqn] = (tid, end, heads[i + 1][0] if i + 1 < len(heads) else len(text))
        self._parsed: dict[str, LiveTarget] = {}

    def __getitem__(self, iqn: str) -> LiveTarget:
        target = self._parsed.get(iqn)
        if target is None:
            tid, start, end = self._spans[iqn]
            target = self._parsed[iqn] = _parse_target(LiveTarget(tid=tid, iqn=iqn), self._text[start:end])
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


def parse_show(text: str) -> LiveTargets:
    """Parse a full ``tgtadm --op show --mode target``: ``{iqn: LiveTarget}`` (a read-only mapping).

    Only the lines BMI relies on are read: ``Target N: <iqn>`` (column 0), ``LUN: k`` and
    ``Backing store path: p`` inside it, and the entries under ``ACL information:`` and
    ``Account information:`` (tgt shows user names only, never a secret; outgoing users end
    in `` (outgoing)`` and are left out).
    """
    return LiveTargets(text)


def _parse_target(current: LiveTarget, block: str) -> LiveTarget:
    """Fill ``current`` from the lines of its block (the lines after its ``Target N:`` line)."""
    section = ""
    lun: int | None = None
    for line in block.splitlines():
        if not line.strip():
            continue
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if indent <= 4:
            section = stripped            # "LUN information:", "ACL information:", ...
            continue
        if section == "ACL information:":
            current.acl.append(stripped)
        elif section == "Account information:":
            if not stripped.endswith("(outgoing)"):
                current.accounts.append(stripped)
        elif section == "LUN information:":
            lun_match = _SHOW_LUN_RE.match(stripped)
            if lun_match:
                lun = int(lun_match.group(1))
            elif stripped.startswith("Backing store path:") and lun:
                current.backing_stores[lun] = stripped.split(":", 1)[1].strip()
    return current


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
    chap = check_chap(spec.chap)
    if chap is not None:
        # tgt-admin creates the account (unless it exists) and binds it, like TgtTarget does.
        lines.append(f"    incominguser {chap[0]} {chap[1]}\n")
    return string.Template(template).substitute(
        tid=spec.tid if spec.tid is not None else 0, lun=spec.lun, target_iqn=spec.iqn,
        bstype=spec.backing.bstype, backing_store=spec.backing.path, bsopts_line=bsopts_line,
        initiator_lines="".join(lines), lbppbe=LUN_LBPPBE)


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
    chap: tuple[str, str] | None = None
    users = values.get("incominguser", [])
    if users:
        user, _, secret = users[0].partition(" ")
        chap = (user, secret.strip())
    if len(users) > 1:
        raise InvalidInput(f"malformed tgt conf file for target {name}: more than one incominguser")
    spec = TargetSpec(
        name=name, iqn=iqn,
        backing=Backing(bstype=values["bs-type"][0], path=values["backing-store"][0], bsopts=bsopts),
        lun=int(tid_match.group(2)) if tid_match else 1,
        initiators=[a for a in values.get("initiator-address", []) if a != NO_ADDRESS],
        initiator_names=values.get("initiator-name", []),
        tid=int(tid_match.group(1)) if tid_match and int(tid_match.group(1)) > 0 else None, chap=chap)
    check_backing(spec.backing)
    check_chap(spec.chap)
    check_initiators(spec.initiators, spec.initiator_names)
    return spec

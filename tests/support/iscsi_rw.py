"""Read and write LUN blocks through libiscsi (ctypes on libiscsi.so.7), plus libiscsi-bin CLI helpers.

Debian's libiscsi-bin has no ``iscsi-dd``, so reads and writes go through the C
library directly.  Only the first field of ``struct scsi_task`` (``int status``) is
read, and data goes through caller-owned buffers (``struct scsi_iovec``), so nothing
depends on libiscsi's struct layouts.

    data = read_lun("iscsi://127.0.0.1:3262/iqn.x:node1/1", None, None, 0, 256)
    write_lun("127.0.0.1:3262", "iqn.x:node1", 1, 2048, data, initiator="iqn.y:me")
    read_lun(portal, iqn, 1, 0, 8, initiator=..., chap=("4242img7", "s3cr3t..."))   # CHAP login

``chap`` is the target's incoming ``(user, secret)``; :func:`conf_chap` reads it from a BMI
tgt conf file (what a node gets in its iPXE script).
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from ims.common.process import execute

DEFAULT_INITIATOR = "iqn.2026-01.org.bmi.test:initiator"
BLOCK_SIZE = 512
SESSION_NORMAL = 2
SCSI_STATUS_GOOD = 0

_URL_RE = re.compile(r"^iscsi://(?P<portal>[^/]+)/(?P<iqn>[^/]+)/(?P<lun>\d+)$")


class IscsiIOError(RuntimeError):
    """A libiscsi call failed (login refused, SCSI error, ...)."""


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_lib: ctypes.CDLL | None = None


def _libiscsi() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libiscsi.so.7")
        except OSError as exc:
            raise IscsiIOError("libiscsi.so.7 not found: install the Debian package libiscsi7") from exc
        vp, cp, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
        lib.iscsi_create_context.argtypes, lib.iscsi_create_context.restype = [cp], vp
        lib.iscsi_set_targetname.argtypes, lib.iscsi_set_targetname.restype = [vp, cp], i
        lib.iscsi_set_initiator_username_pwd.argtypes = [vp, cp, cp]
        lib.iscsi_set_initiator_username_pwd.restype = i
        lib.iscsi_set_session_type.argtypes, lib.iscsi_set_session_type.restype = [vp, i], i
        lib.iscsi_full_connect_sync.argtypes, lib.iscsi_full_connect_sync.restype = [vp, cp, i], i
        lib.iscsi_set_timeout.argtypes, lib.iscsi_set_timeout.restype = [vp, i], i
        lib.iscsi_set_noautoreconnect.argtypes, lib.iscsi_set_noautoreconnect.restype = [vp, i], None
        lib.iscsi_get_error.argtypes, lib.iscsi_get_error.restype = [vp], cp
        lib.iscsi_logout_sync.argtypes, lib.iscsi_logout_sync.restype = [vp], i
        lib.iscsi_destroy_context.argtypes, lib.iscsi_destroy_context.restype = [vp], i
        lib.iscsi_read16_iov_sync.argtypes = [vp, i, u64, u32, i, i, i, i, i, i, ctypes.POINTER(_IoVec), i]
        lib.iscsi_read16_iov_sync.restype = vp
        lib.iscsi_write16_sync.argtypes = [vp, i, u64, ctypes.c_char_p, u32, i, i, i, i, i, i]
        lib.iscsi_write16_sync.restype = vp
        lib.scsi_free_scsi_task.argtypes, lib.scsi_free_scsi_task.restype = [vp], None
        _lib = lib
    return _lib


@dataclass
class LunAddress:
    portal: str
    iqn: str
    lun: int

    @property
    def url(self) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"


def parse_address(url_or_portal: str, iqn: str | None = None, lun: int | None = None) -> LunAddress:
    """Accept ``iscsi://portal/iqn/lun`` or a bare ``ip:port`` with ``iqn`` and ``lun``."""
    match = _URL_RE.match(url_or_portal)
    if match:
        return LunAddress(match["portal"], match["iqn"], int(match["lun"]))
    if iqn is None or lun is None:
        raise ValueError("give an iscsi:// URL, or a portal with iqn and lun")
    return LunAddress(url_or_portal, iqn, int(lun))


class _Session:
    """One logged-in normal session to one LUN; always logs out and frees the context."""

    def __init__(self, addr: LunAddress, initiator: str, timeout: float = 20.0,
                 chap: tuple[str, str] | None = None) -> None:
        self.lib = _libiscsi()
        self.addr = addr
        self.ctx = self.lib.iscsi_create_context(initiator.encode())
        if not self.ctx:
            raise IscsiIOError("iscsi_create_context failed")
        try:
            # Fail instead of hanging: by default libiscsi reconnects forever when the
            # target goes away (e.g. removed under an open session).
            self.lib.iscsi_set_noautoreconnect(self.ctx, 1)
            self.lib.iscsi_set_timeout(self.ctx, int(timeout))
            self.lib.iscsi_set_targetname(self.ctx, addr.iqn.encode())
            self.lib.iscsi_set_session_type(self.ctx, SESSION_NORMAL)
            if chap is not None and self.lib.iscsi_set_initiator_username_pwd(
                    self.ctx, chap[0].encode(), chap[1].encode()) != 0:
                raise IscsiIOError(f"cannot set the CHAP account: {self.error()}")
            if self.lib.iscsi_full_connect_sync(self.ctx, addr.portal.encode(), addr.lun) != 0:
                who = f"{initiator} (CHAP user {chap[0]})" if chap else initiator  # never the secret
                raise IscsiIOError(f"login to {addr.url} as {who} failed: {self.error()}")
        except BaseException:
            self.lib.iscsi_destroy_context(self.ctx)
            raise

    def error(self) -> str:
        msg = self.lib.iscsi_get_error(self.ctx)
        return msg.decode(errors="replace") if msg else "unknown error"

    def _check(self, task: int | None, what: str) -> None:
        if not task:
            raise IscsiIOError(f"{what} on {self.addr.url} failed: {self.error()}")
        try:
            status = ctypes.cast(task, ctypes.POINTER(ctypes.c_int))[0]  # scsi_task.status is the first field
            if status != SCSI_STATUS_GOOD:
                raise IscsiIOError(f"{what} on {self.addr.url}: SCSI status {status}: {self.error()}")
        finally:
            self.lib.scsi_free_scsi_task(task)

    def read(self, lba: int, nblocks: int, block_size: int) -> bytes:
        length = nblocks * block_size
        buf = ctypes.create_string_buffer(length)
        iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
        task = self.lib.iscsi_read16_iov_sync(self.ctx, self.addr.lun, lba, length, block_size,
                                              0, 0, 0, 0, 0, ctypes.byref(iov), 1)
        self._check(task, "READ16")
        return buf.raw

    def write(self, lba: int, data: bytes, block_size: int) -> None:
        task = self.lib.iscsi_write16_sync(self.ctx, self.addr.lun, lba, data, len(data), block_size,
                                           0, 0, 1, 0, 0)  # FUA: the write is on the backing store on return
        self._check(task, "WRITE16")

    def close(self) -> None:
        self.lib.iscsi_logout_sync(self.ctx)
        self.lib.iscsi_destroy_context(self.ctx)


def read_lun(url_or_portal: str, iqn: str | None, lun: int | None, offset_blocks: int, nblocks: int,
             initiator: str = DEFAULT_INITIATOR, block_size: int = BLOCK_SIZE,
             chap: tuple[str, str] | None = None) -> bytes:
    """Read ``nblocks`` blocks starting at block ``offset_blocks``. :raises IscsiIOError:"""
    session = _Session(parse_address(url_or_portal, iqn, lun), initiator, chap=chap)
    try:
        return session.read(offset_blocks, nblocks, block_size)
    finally:
        session.close()


def write_lun(url_or_portal: str, iqn: str | None, lun: int | None, offset_blocks: int, data: bytes,
              initiator: str = DEFAULT_INITIATOR, block_size: int = BLOCK_SIZE,
              chap: tuple[str, str] | None = None) -> None:
    """Write ``data`` (a whole number of blocks) at block ``offset_blocks``. :raises IscsiIOError:"""
    if not data or len(data) % block_size:
        raise ValueError(f"data must be a non-empty multiple of {block_size} bytes")
    session = _Session(parse_address(url_or_portal, iqn, lun), initiator, chap=chap)
    try:
        session.write(offset_blocks, data, block_size)
    finally:
        session.close()


def conf_chap(conf_path: str | Path) -> tuple[str, str] | None:
    """The ``incominguser`` ``(user, secret)`` of a BMI tgt conf file (None: the target has no CHAP)."""
    match = re.search(r"^\s*incominguser\s+(\S+)\s+(\S+)\s*$", Path(conf_path).read_text(), re.M)
    return (match.group(1), match.group(2)) if match else None


def chap_url(url: str, chap: tuple[str, str] | None) -> str:
    """``iscsi://user%secret@portal/...``: libiscsi's CLI tools take CHAP in the URL."""
    if chap is None:
        return url
    return url.replace("iscsi://", f"iscsi://{chap[0]}%{chap[1]}@", 1)


# --- the real CLI tools (libiscsi-bin) -------------------------------------------------
def _initiator_args(initiator: str | None) -> list[str]:
    return ["-i", initiator] if initiator else []


def _run_ls(args: list[str], timeout: float) -> str:
    out, err = execute("iscsi-ls", *args, timeout=timeout, check_exit_code=range(256))
    if "Target:" not in out and "Can not reconnect" in err:
        # libiscsi 1.19 quirk: a portal with zero targets closes the discovery session
        # and iscsi-ls exits 10 with this message; it means "no targets".
        return ""
    if err.strip() and "Target:" not in out:
        raise IscsiIOError(f"iscsi-ls {' '.join(args)} failed: {err.strip()}")
    return out


def iscsi_ls(portal: str, initiator: str | None = None, timeout: float = 30.0) -> dict[str, list[str]]:
    """``iscsi-ls -s iscsi://portal/``: ``{target iqn: [LUN lines]}`` (discovery + a login per target)."""
    out = _run_ls([*_initiator_args(initiator), "-s", f"iscsi://{portal}/"], timeout)
    targets: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        match = re.match(r"^Target:(\S+) Portal:", line.strip())
        if match:
            current = match.group(1)
            targets[current] = []
        elif current and line.strip().startswith("Lun:"):
            targets[current].append(line.strip())
    return targets


def iscsi_ls_names(portal: str, initiator: str | None = None, timeout: float = 30.0) -> list[str]:
    """Target names from a discovery session only (``iscsi-ls`` without ``-s``)."""
    out = _run_ls([*_initiator_args(initiator), f"iscsi://{portal}/"], timeout)
    return [m.group(1) for m in re.finditer(r"^Target:(\S+) Portal:", out, re.M)]


def readcapacity16(url: str, initiator: str | None = None, timeout: float = 30.0,
                   chap: tuple[str, str] | None = None) -> int:
    """Total size in bytes from ``iscsi-readcapacity16``."""
    out, _ = execute("iscsi-readcapacity16", *_initiator_args(initiator), chap_url(url, chap), timeout=timeout)
    match = re.search(r"Total size:\s*(\d+)", out)
    if not match:
        raise IscsiIOError(f"unexpected iscsi-readcapacity16 output: {out!r}")
    return int(match.group(1))


def inquiry(url: str, initiator: str | None = None, timeout: float = 30.0) -> str:
    """Raw ``iscsi-inq`` output (standard INQUIRY)."""
    out, _ = execute("iscsi-inq", *_initiator_args(initiator), url, timeout=timeout)
    return out

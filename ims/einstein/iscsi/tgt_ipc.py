"""tgtd's management protocol, spoken directly: what ``tgtadm`` sends, without a fork+exec per call.

``tgtadm`` is a thin client: it turns its options into one request (a fixed header, ``struct
tgtadm_req`` of tgt's usr/tgtadm.h, then a ``key=value,...`` text), writes it to tgtd's control
socket ``/var/run/tgtd/socket.<control port>`` (or ``$TGT_IPC_SOCKET.<port>``) and prints the
answer (``struct tgtadm_rsp``: an error number and a length, then text).  That layout has not
changed since tgt 1.0.24 (2012) and is the same in Debian 12's 1.0.85 and upstream's 1.0.97.

An Einstein worker makes ten tgtadm calls per provision; each fork+exec of the CLI costs a few ms of
wall time and of the worker's CPU (Python's subprocess machinery), more than tgtd's own work for
the call.  :class:`TgtIpc` builds byte-for-byte the request tgtadm builds for the options BMI uses
and reports results exactly as the CLI would (stdout text; errors as :class:`CommandFailed` with
tgtadm's exit status and message), so the driver's error handling is the same on both paths.
Anything it does not know (an option BMI does not use) raises :class:`Unsupported` and the driver
runs the real tgtadm for that call.  The CHAP password travels in the request over the root-only
socket instead of on a command line that every local user can read in /proc.
"""
from __future__ import annotations

import os
import socket
import struct

from ims.common.errors import CommandFailed

# struct tgtadm_req { enum mode; enum op; char lld[64]; uint32 len; int32 tid; uint64 sid;
#                     uint64 lun; uint32 cid, host_no, device_type, ac_dir, pack, force; }
_REQ = struct.Struct("@ii64sIiQQIIIIII")
_RSP = struct.Struct("@II")            # struct tgtadm_rsp { uint32 err; uint32 len; }
_OPS = {"new": 0, "delete": 1, "show": 2, "bind": 3, "unbind": 4, "update": 5, "stat": 6, "start": 7, "stop": 8}
_MODES = {"system": 0, "sys": 0, "target": 1, "tgt": 1, "logicalunit": 2, "lu": 2, "portal": 3, "pt": 3,
          "lld": 4, "session": 5, "sess": 5, "connection": 6, "conn": 6, "account": 7}
_MODE_PORTAL = 3
_NO_LUN = 2**64 - 1                    # tgtadm's "no --lun given"
_TYPE_DISK = 0
# tgtadm's tgtadm_strerror(), by enum tgtadm_errno (usr/tgtadm_error.h)
_ERRORS = ("success", "unknown error", "out of memory", "can't find the driver", "can't find the target",
           "can't find the logical unit", "can't find the session", "can't find the connection",
           "can't find the binding", "this target already exists", "this logical unit number already exists",
           "this binding already exists", "this access control rule already exists",
           "this access control rule does not exist", "this account already exists", "can't find the account",
           "too many accounts", "invalid request", "this target already has an outgoing account",
           "this target is still active", "this logical unit is still active", "this driver is busy",
           "this operation isn't supported", "unknown parameter", "this device has Prevent Removal set")
# option -> (field, takes a value); the order of _PARAMS is the order tgtadm writes them in.
_OPTIONS = {
    "--op": ("op", True), "-o": ("op", True), "--mode": ("mode", True), "-m": ("mode", True),
    "--lld": ("lld", True), "-L": ("lld", True), "--tid": ("tid", True), "-t": ("tid", True),
    "--lun": ("lun", True), "-l": ("lun", True), "--name": ("name", True), "-n": ("name", True),
    "--value": ("value", True), "-v": ("value", True), "--backing-store": ("path", True), "-b": ("path", True),
    "--bstype": ("bstype", True), "-E": ("bstype", True), "--bsopts": ("bsopts", True), "-S": ("bsopts", True),
    "--targetname": ("targetname", True), "-T": ("targetname", True),
    "--initiator-address": ("initiator-address", True), "-I": ("initiator-address", True),
    "--initiator-name": ("initiator-name", True), "-Q": ("initiator-name", True),
    "--user": ("user", True), "-u": ("user", True), "--password": ("password", True), "-p": ("password", True),
    "--params": ("params", True), "-P": ("params", True), "--force": ("force", False), "-F": ("force", False),
    "--outgoing": ("outgoing", False), "-O": ("outgoing", False),
}
_PARAMS = ("path", "bstype", "bsopts", "targetname", "initiator-address", "initiator-name", "user", "password")
_UNREACHABLE = 107                     # tgtadm's exit status when it cannot talk to tgtd


class Unsupported(Exception):
    """An option this client does not build requests for: run the tgtadm binary instead."""


def socket_path(control_port: int) -> str:
    """The control socket tgtadm -C ``control_port`` talks to."""
    return f"{os.environ.get('TGT_IPC_SOCKET') or '/var/run/tgtd/socket'}.{int(control_port)}"


def build(args: tuple[str, ...]) -> bytes:
    """The request tgtadm sends for ``args`` (its command line without ``-C``)."""
    values: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        spec = _OPTIONS.get(args[i])
        if spec is None:
            raise Unsupported(args[i])
        field, has_value = spec
        if has_value:
            if i + 1 >= len(args):
                raise Unsupported(f"{args[i]} without a value")
            values[field] = args[i + 1]
            i += 2
        else:
            values[field] = True
            i += 1
    try:
        op, mode = _OPS[str(values["op"])], _MODES[str(values["mode"])]
        tid = int(values.get("tid", -1))
        lun = int(values["lun"]) if "lun" in values else _NO_LUN
    except (KeyError, ValueError) as exc:
        raise Unsupported(f"options {args!r}") from exc
    lld = str(values.get("lld", "")).encode("ascii")
    if len(lld) >= 64:
        raise Unsupported("--lld too long")
    parts = []
    if "name" in values or "value" in values:
        if "name" not in values or "value" not in values:
            raise Unsupported("--name without --value")
        parts.append(f"{values['name']}={values['value']}")
    parts += [f"{key}={values[key]}" for key in _PARAMS if key in values]
    if "params" in values:
        parts.append(("portalOps " if mode == _MODE_PORTAL else "targetOps ") + f"{values['params']},")
    text = ",".join(parts).encode("utf-8")
    body = text + b"\0" if text else b""
    header = _REQ.pack(mode, op, lld, _REQ.size + len(body), tid, 0, lun, 0, 0, _TYPE_DISK,
                       1 if values.get("outgoing") else 0, 0, 1 if values.get("force") else 0)
    return header + body


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("tgtd closed the socket")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class TgtIpc:
    """One request per connection, as tgtadm does; thread-safe (no shared socket)."""

    def __init__(self, control_port: int, timeout: float = 30.0) -> None:
        self.control_port = int(control_port)
        self.timeout = timeout

    def run(self, *args: str) -> str:
        """What ``tgtadm -C <port> ARGS`` prints on stdout.

        :raises Unsupported: an option this client does not know (nothing was sent).
        :raises CommandFailed: as the CLI would fail: exit 22 with tgtd's error, 107 if tgtd cannot be reached.
        """
        request = build(args)
        argv = ("tgtadm", "-C", str(self.control_port), *args)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(socket_path(self.control_port))
                sock.sendall(request)
                err, length = _RSP.unpack(_recv_exactly(sock, _RSP.size))
                text = _recv_exactly(sock, length - _RSP.size) if length > _RSP.size else b""
        except (OSError, ConnectionError) as exc:
            message = "tgtadm: failed to send request hdr to tgt daemon, " + (exc.strerror or str(exc))
            raise CommandFailed(f"tgtadm failed (exit {_UNREACHABLE}): {message}", cmd=argv[:5],
                                exit_code=_UNREACHABLE, stderr=message) from exc
        if err:
            message = "tgtadm: " + (_ERRORS[err] if err < len(_ERRORS) else "(unknown tgtadm_errno)")
            raise CommandFailed(f"tgtadm failed (exit 22): {message}", cmd=argv[:5], exit_code=22, stderr=message)
        return text.split(b"\0", 1)[0].decode("utf-8", "replace")

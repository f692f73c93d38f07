"""ims.einstein.iscsi.tgt_ipc speaks tgtadm's protocol to tgtd's control socket.  Checked against the
REAL tgtadm binary (every request BMI makes, captured byte for byte on a socket of ours that tgtadm
is pointed at with TGT_IPC_SOCKET) and against a REAL tgtd (same answers, same errors as the CLI)."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from ims.common.errors import CommandFailed, IscsiError
from ims.einstein.iscsi import tgt_ipc
from ims.einstein.iscsi.tgt import WRITE_CACHE_OFF, TgtTarget
from ims.einstein.storage.base import Backing
from tests.support.tgt import start_tgtd, stop_tgtd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PREFIX = "iqn.2026-01.org.bmi.test:"
# Every shape of call ims/einstein/iscsi makes (tgt.py, tgt_chap.py, tgt_sync.py).
CALLS = [
    ("--op", "show", "--mode", "sys"),
    ("--op", "show", "--mode", "target"),
    ("--op", "update", "--mode", "sys", "--name", "State", "-v", "offline"),
    ("--op", "new", "--mode", "target", "--tid", "7", "-T", PREFIX + "x"),
    ("--op", "new", "--mode", "logicalunit", "--tid", "7", "--lun", "1", "--bstype", "rbd", "--backing-store",
     "rbd/img12", "--bsopts", "conf=/etc/ceph/ceph.conf;id=admin"),
    ("--op", "update", "--mode", "logicalunit", "--tid", "7", "--lun", "1", "--params",
     f"{WRITE_CACHE_OFF},lbppbe=3"),
    ("--op", "bind", "--mode", "target", "--tid", "7", "-I", "0.0.0.0/32"),
    ("--op", "bind", "--mode", "target", "--tid", "7", "-Q", "iqn.2026-01.org.bmi.node:n1"),
    ("--op", "unbind", "--mode", "target", "--tid", "7", "-I", "10.0.0.5"),
    ("--op", "unbind", "--mode", "target", "--tid", "7", "-Q", "iqn.2026-01.org.bmi.node:n1"),
    ("--op", "new", "--mode", "account", "--user", "img12", "--password", "s3cret-Pass"),
    ("--op", "bind", "--mode", "account", "--tid", "7", "--user", "img12"),
    ("--op", "bind", "--mode", "account", "--tid", "7", "--user", "img12", "--outgoing"),
    ("--op", "unbind", "--mode", "account", "--tid", "7", "--user", "img12"),
    ("--op", "delete", "--mode", "account", "--user", "img12"),
    ("--op", "delete", "--mode", "logicalunit", "--tid", "7", "--lun", "1"),
    ("--op", "delete", "--mode", "target", "--tid", "7", "--force"),
    ("--op", "delete", "--mode", "target", "--tid", "7"),
]


def captured_request(tmp_path: Path, args: tuple[str, ...]) -> bytes:
    """The bytes the real tgtadm sends for ``args`` (to a socket of ours that answers "success")."""
    base = str(tmp_path / "ipc")
    path = f"{base}.5"
    Path(path).unlink(missing_ok=True)
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        server.settimeout(30)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                head = conn.recv(tgt_ipc._REQ.size, socket.MSG_WAITALL)
                length = tgt_ipc._REQ.unpack(head)[3]
                body = conn.recv(length - len(head), socket.MSG_WAITALL) if length > len(head) else b""
                got.append(head + body)
                conn.sendall(tgt_ipc._RSP.pack(0, tgt_ipc._RSP.size))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        proc = subprocess.run(["tgtadm", "-C", "5", "--lld", "iscsi", *args], capture_output=True, text=True,
                              timeout=30, env=dict(os.environ, TGT_IPC_SOCKET=base))
        thread.join(30)
    assert proc.returncode == 0 and got, (args, proc.stderr)
    return got[0]


@pytest.mark.parametrize("args", CALLS, ids=lambda a: "-".join(a[1:4:2]) + f"-{len(a)}")
def test_requests_are_byte_for_byte_what_tgtadm_sends(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert tgt_ipc.build(("--lld", "iscsi", *args)) == captured_request(tmp_path, args)


def test_unknown_options_are_left_to_the_binary() -> None:
    for args in (("--op", "show", "--mode", "target", "--bsoflags", "sync"), ("--op", "show"),
                 ("--op", "frob", "--mode", "target"), ("--op", "show", "--mode", "target", "--tid")):
        with pytest.raises(tgt_ipc.Unsupported):
            tgt_ipc.build(args)


def test_same_answers_and_errors_as_the_cli_on_a_real_tgtd(tmp_path: Path) -> None:
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    try:
        port = instance.control_port
        ipc = tgt_ipc.TgtIpc(port)

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["tgtadm", "-C", str(port), "--lld", "iscsi", *args], capture_output=True,
                                  text=True, timeout=30)

        lun = tmp_path / "l.img"
        lun.write_bytes(b"\0" * (1 << 20))
        assert ipc.run("--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "3", "-T", PREFIX + "a") == ""
        ipc.run("--lld", "iscsi", "--op", "new", "--mode", "logicalunit", "--tid", "3", "--lun", "1",
                "--bstype", "rdwr", "--backing-store", str(lun))
        ipc.run("--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "3", "-Q", "iqn.2026-01.x:n")
        for show in (("--op", "show", "--mode", "target"), ("--op", "show", "--mode", "sys")):
            assert ipc.run("--lld", "iscsi", *show) == cli(*show).stdout
        assert "Backing store path: " + str(lun) in ipc.run("--lld", "iscsi", "--op", "show", "--mode", "target")
        for bad in (("--op", "new", "--mode", "target", "--tid", "3", "-T", PREFIX + "b"),    # tid taken
                    ("--op", "delete", "--mode", "target", "--tid", "99"),                    # no such target
                    ("--op", "delete", "--mode", "account", "--user", "nobody")):             # no such account
            proc = cli(*bad)
            with pytest.raises(CommandFailed) as err:
                ipc.run("--lld", "iscsi", *bad)
            assert (err.value.exit_code, err.value.stderr.strip()) == (proc.returncode, proc.stderr.strip()), bad
    finally:
        stop_tgtd(instance)
    with pytest.raises(CommandFailed) as err:  # tgtd gone: the CLI's "cannot reach" status
        tgt_ipc.TgtIpc(port).run("--lld", "iscsi", "--op", "show", "--mode", "sys")
    assert err.value.exit_code == 107 and "tgt daemon" in err.value.stderr
    with pytest.raises(IscsiError, match="tgtd is not running"):
        TgtTarget(str(tmp_path / "conf.d"), control_port=port).live_target("a")


def test_the_driver_sends_no_tgtadm_process_by_default(tmp_path: Path, monkeypatch) -> None:
    """A whole add and remove through the socket: not one tgtadm process (execute is never called)."""
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    try:
        from ims.einstein.iscsi import tgt_control

        def no_fork(*argv: str, **_kw: object) -> None:
            raise AssertionError(f"ran {argv[:6]}")

        monkeypatch.setattr(tgt_control, "execute", no_fork)
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        lun = tmp_path / "x.img"
        lun.write_bytes(b"\0" * (1 << 20))
        drv.add_target("x", Backing("rdwr", str(lun)), ["ALL"], ["iqn.2026-01.x:n"], chap=("x", "Secret1234abcd"))
        live = drv.live_target("x")
        assert live is not None and live.backing_stores == {1: str(lun)} and live.accounts == ["x"]
        drv.remove_target("x")
        assert drv.live_target("x") is None
    finally:
        stop_tgtd(instance)


def test_a_tgtd_that_answers_otherwise_turns_the_socket_off(tmp_path: Path, monkeypatch, caplog) -> None:
    """A tgt whose protocol differs (here: a socket that answers "success" with other text) is not
    trusted: the driver checks once and runs the real tgtadm from then on, against the real tgtd."""
    instance = start_tgtd(tempfile.mkdtemp(prefix="tgtd-", dir=tmp_path))
    odd = str(tmp_path / "odd.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(odd)
    server.listen(4)

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(tgt_ipc._REQ.size, socket.MSG_WAITALL)
                length = tgt_ipc._REQ.unpack(head)[3]
                if length > len(head):
                    conn.recv(length - len(head), socket.MSG_WAITALL)
                text = b"something else\0"
                conn.sendall(tgt_ipc._RSP.pack(0, tgt_ipc._RSP.size + len(text)) + text)

    threading.Thread(target=answer, daemon=True).start()
    try:
        monkeypatch.setattr(tgt_ipc, "socket_path", lambda port: odd)
        drv = TgtTarget(str(tmp_path / "conf.d"), control_port=instance.control_port, iqn_prefix=PREFIX)
        lun = tmp_path / "x.img"
        lun.write_bytes(b"\0" * (1 << 20))
        with caplog.at_level("WARNING"):
            drv.add_target("x", Backing("rdwr", str(lun)), ["ALL"])
        assert drv._ipc is None and "using the tgtadm binary instead" in caplog.text
        live = drv.live_target("x")  # made by the binary on the real tgtd
        assert live is not None and live.backing_stores == {1: str(lun)}
        drv.remove_target("x")
    finally:
        server.close()
        stop_tgtd(instance)

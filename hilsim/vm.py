"""qemu-backed nodes for the HIL simulator and the network-boot tests.

A :class:`QemuNode` is a diskless VM whose only NIC (e1000, fixed MAC) sits on a tap inside a
private network namespace, bridged to the boot network that ``scripts/bootnet`` creates. Powering
it on makes it PXE-boot (SeaBIOS -> iPXE ROM -> PXELINUX -> ipxe.lkrn -> iSCSI sanboot).

Why these choices:

* TCG only: this machine's KVM is PVM, which breaks on real-mode BIOS code.
* ``-boot order=n,strict=on,reboot-timeout=1000 -no-reboot``: a failed chain makes qemu *exit*
  instead of hanging, so a broken boot shows up quickly.
* qemu is started through :func:`ims.common.process.execute` with ``-daemonize -pidfile``: execute()
  returns once qemu has initialised (startup errors come back as CommandFailed), and we know its
  exact pid. Every live node is also stopped at interpreter exit (atexit), so tests and the
  simulator never leave a VM behind; :meth:`QemuNode.stop` is idempotent.
* The serial console goes to a file (a new one per power cycle, the previous kept as ``.1``);
  SeaBIOS/iPXE/PXELINUX only draw on VGA, hence :meth:`QemuNode.screendump`.
* ``firmware="uefi"`` runs OVMF (Debian's ``ovmf``) instead of SeaBIOS: the code from
  :data:`OVMF_CODE` read-only, a private copy of :data:`OVMF_VARS` per VM (fresh at every power-on,
  so no boot entry survives a cycle, like a node whose NVRAM BMI does not manage). By default a
  UEFI node's NIC is a virtio-net without option ROM (:data:`UEFI_NIC_MODEL`), so the firmware's
  own PXE client asks for a loader (DHCP option 93 = 7). OVMF ignores ``-boot order``: the NIC
  gets ``bootindex`` instead. It needs more RAM than SeaBIOS (GRUB's EFI loader runs out of
  memory at 256 MiB), hence :data:`UEFI_MIN_MEMORY_MB`.
  Without ``firmware`` in the options, ``BMI_VM_FIRMWARE`` in the environment picks it, so a
  whole boot bed (the HIL simulator's VMs) can be switched without a new inventory format.
* Guest RAM: ``memory_mb`` (the simulator's ``"vm"`` option), else ``BMI_VM_MEMORY`` (MiB) from the
  environment, else :data:`DEFAULT_MEMORY_MB`: 1 GiB, enough for a distribution's initramfs and
  systemd (Debian 12's unpacks to well over 256 MiB with its modules). UEFI keeps at least
  :data:`UEFI_MIN_MEMORY_MB`.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import weakref
from typing import Any

from ims.common.errors import CommandFailed, InvalidInput
from ims.common.names import normalize_mac, validate_name
from ims.common.process import execute

LOG = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[QemuNode] = weakref.WeakSet()
FIRMWARES = ("bios", "uefi")
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd"
UEFI_MIN_MEMORY_MB = 512
# Default guest RAM (MiB): a stock distribution's initramfs + systemd boots in it; 256 did not.
DEFAULT_MEMORY_MB = 1024
MIN_MEMORY_MB = 64
MAX_MEMORY_MB = 65536
# OVMF drives virtio-net itself (VirtioNetDxe); without an option ROM the firmware's own PXE client
# does the first DHCP (option 93 = 7, no iPXE user class) and loads the iPXE EFI binary BMI's boot
# network hands out, as on a real UEFI server. (An e1000 would bring qemu's iPXE ROM instead.)
UEFI_NIC_MODEL = "virtio-net-pci"
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")


def _memory_mb(value: int | str | None) -> int:
    """Guest RAM: the option, else ``$BMI_VM_MEMORY``, else :data:`DEFAULT_MEMORY_MB`; validated."""
    source = "memory_mb"
    if value is None or value == "":
        value, source = os.environ.get("BMI_VM_MEMORY") or DEFAULT_MEMORY_MB, "BMI_VM_MEMORY"
    try:
        mb = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid {source} {value!r}: MiB as an integer") from None
    if not MIN_MEMORY_MB <= mb <= MAX_MEMORY_MB:
        raise InvalidInput(f"invalid {source} {mb}: use {MIN_MEMORY_MB}-{MAX_MEMORY_MB} MiB")
    return mb


def _stop_all() -> None:
    for node in list(_LIVE):
        try:
            node.stop()
        except Exception:  # best effort at interpreter exit
            LOG.exception("could not stop VM %s", node.name)


atexit.register(_stop_all)


def _qemu_path(path: str) -> str:
    """Escape a path for a qemu option value (',' is the separator, ',,' a literal comma)."""
    return path.replace(",", ",,")


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    # Field 3 (after the parenthesised command name) is the state.
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class QemuNode:
    """One diskless qemu VM attached to a boot network.

    :param name: node name (validated as a BMI name).
    :param mac: the NIC's MAC address.
    :param netns: the network namespace holding the boot bridge.
    :param bridge: the bridge inside ``netns`` the VM's tap joins.
    :param console_log: file receiving the serial console (ttyS0).
    :param memory_mb: guest RAM in MiB (default ``$BMI_VM_MEMORY``, else :data:`DEFAULT_MEMORY_MB`).
    :param boot_timeout: default timeout for :meth:`wait_for_console` and :meth:`wait_exit`.
    :param workdir: directory for the pid file and monitor socket (default: a new temp dir).
    :param extra: optional ``qemu_args`` (list of extra qemu arguments), ``nic_model``
        (default ``e1000``), ``boot_order`` (default ``n``: network only; the benchmark uses ``c``
        with a ``-drive`` in ``qemu_args``) and ``firmware`` (``bios``, SeaBIOS, the default, or
        ``uefi``, OVMF; default from ``$BMI_VM_FIRMWARE``); other keys are kept in :attr:`extra`
        and ignored.
    """

    def __init__(self, name: str, mac: str, netns: str, bridge: str, console_log: str,
                 memory_mb: int | None = None, boot_timeout: float = 300, workdir: str | None = None,
                 **extra: Any) -> None:
        self.name = validate_name(name, "node")
        self.mac = normalize_mac(mac)
        if not _NETNS_RE.match(netns or ""):
            raise InvalidInput(f"invalid network namespace name {netns!r}")
        if not _IFNAME_RE.match(bridge or ""):
            raise InvalidInput(f"invalid bridge name {bridge!r}")
        self.netns = netns
        self.bridge = bridge
        self.console_log = os.path.abspath(console_log)
        self.memory_mb = _memory_mb(memory_mb)
        self.boot_timeout = float(boot_timeout)
        self.extra = dict(extra)
        self.firmware = str(self.extra.get("firmware") or os.environ.get("BMI_VM_FIRMWARE") or "bios")
        if self.firmware not in FIRMWARES:
            raise InvalidInput(f"invalid firmware {self.firmware!r}: one of {', '.join(FIRMWARES)}")
        self.nic_model = str(self.extra.get("nic_model", "e1000" if self.firmware == "bios" else UEFI_NIC_MODEL))
        if not re.match(r"^[a-z0-9-]+$", self.nic_model):
            raise InvalidInput(f"invalid nic_model {self.nic_model!r}")
        self.qemu_args = [str(a) for a in self.extra.get("qemu_args", [])]
        self.boot_order = str(self.extra.get("boot_order", "n"))
        if not re.match(r"^[a-p]{1,4}$", self.boot_order):
            raise InvalidInput(f"invalid boot_order {self.boot_order!r}")
        if self.firmware == "uefi":
            self.memory_mb = max(self.memory_mb, UEFI_MIN_MEMORY_MB)
        self.workdir = os.path.abspath(workdir) if workdir else tempfile.mkdtemp(prefix=f"bmi-vm-{self.name}-")
        os.makedirs(self.workdir, exist_ok=True)
        # Interface names are at most 15 characters: "tap" + the 12 hex digits of the MAC.
        self.tap = "tap" + self.mac.replace(":", "")
        tag = hashlib.sha1(self.name.encode()).hexdigest()[:8]
        self.monitor_path = os.path.join(self.workdir, f"mon-{tag}.sock")
        self.pidfile = os.path.join(self.workdir, f"qemu-{tag}.pid")
        self.vars_path = os.path.join(self.workdir, f"ovmf-vars-{tag}.fd")
        self.pid: int | None = None
        self.started_at: float | None = None
        self._lock = threading.RLock()
        _LIVE.add(self)

    # --- power ------------------------------------------------------------------------------
    def power_cycle(self) -> None:
        """Stop the VM if it runs, then start it (it PXE-boots)."""
        with self._lock:
            self.power_off()
            self._rotate_console()
            self._ensure_tap()
            self._start_qemu()

    def power_off(self) -> None:
        """Hard power-off (kills qemu). No-op if the VM is off."""
        with self._lock:
            pid = self._our_pid()
            if pid is not None:
                LOG.info("powering off VM %s (pid %d)", self.name, pid)
                self._kill(pid)
            self.pid = None
            for path in (self.pidfile, self.monitor_path, self.vars_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def stop(self) -> None:
        """Power off and delete the tap. Idempotent."""
        with self._lock:
            self.power_off()
            self._delete_tap()

    def is_running(self) -> bool:
        return self._our_pid() is not None

    def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait for qemu to exit by itself (the guest powered off). True if it did."""
        deadline = time.monotonic() + (self.boot_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if not self.is_running():
                return True
            time.sleep(0.2)
        return not self.is_running()

    # --- observation ------------------------------------------------------------------------
    def wait_for_console(self, pattern: str, timeout: float | None = None) -> str:
        """Wait until a console line matches the regex ``pattern``; return that line.

        :raises TimeoutError: on timeout, or when the VM exited without printing it
            (the message ends with the console's tail).
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + (self.boot_timeout if timeout is None else timeout)
        while True:
            exited = not self.is_running()
            text = self.console_text()
            for line in text.splitlines():
                if regex.search(line):
                    return line.strip("\r")
            if exited:
                raise TimeoutError(f"VM {self.name} is not running and its console never matched "
                                   f"{pattern!r}; console tail:\n{self.console_tail(text)}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"VM {self.name}: no console line matched {pattern!r} within "
                                   f"{timeout if timeout is not None else self.boot_timeout:.0f}s; "
                                   f"console tail:\n{self.console_tail(text)}")
            time.sleep(0.25)

    def console_text(self) -> str:
        try:
            with open(self.console_log, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, text: str | None = None, lines: int = 30) -> str:
        text = self.console_text() if text is None else text
        return "\n".join(text.splitlines()[-lines:])

    def screendump(self, path: str) -> str:
        """Write the VGA screen to ``path`` (PNG) through the HMP monitor; return the path."""
        path = os.path.abspath(path)
        if any(c in path for c in "\n\r\"") or " " in path:
            raise InvalidInput("screendump path must not contain spaces, quotes or newlines")
        if not self.is_running():
            raise CommandFailed(f"VM {self.name} is not running")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.monitor_command(f"screendump {path} -f png")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(path) and os.path.getsize(path) > 0:
                return path
            time.sleep(0.1)
        raise CommandFailed(f"VM {self.name}: screendump produced no file")

    def monitor_command(self, command: str, timeout: float = 10.0) -> str:
        """Send one HMP command and return its output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.monitor_path)
            self._read_until_prompt(sock)  # banner
            sock.sendall(command.encode() + b"\n")
            return self._read_until_prompt(sock)

    # --- internals ----------------------------------------------------------------------------
    @staticmethod
    def _read_until_prompt(sock: socket.socket) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")

    def _rotate_console(self) -> None:
        os.makedirs(os.path.dirname(self.console_log), exist_ok=True)
        if os.path.exists(self.console_log):
            os.replace(self.console_log, self.console_log + ".1")

    def _netns_cmd(self, *argv: str, **kwargs: Any) -> tuple[str, str]:
        return execute("ip", "netns", "exec", self.netns, *argv, **kwargs)

    def _tap_exists(self) -> bool:
        out, _ = self._netns_cmd("ip", "-o", "link", "show", "dev", self.tap, check_exit_code=(0, 1, 255))
        return bool(out.strip())

    def _ensure_tap(self) -> None:
        if not self._tap_exists():
            self._netns_cmd("ip", "tuntap", "add", "dev", self.tap, "mode", "tap")
        self._netns_cmd("ip", "link", "set", self.tap, "master", self.bridge)
        self._netns_cmd("ip", "link", "set", self.tap, "up")

    def _delete_tap(self) -> None:
        try:
            if self._tap_exists():
                self._netns_cmd("ip", "link", "del", self.tap)
        except CommandFailed as exc:
            # The netns may already be gone (bootnet down): then so is the tap.
            LOG.debug("deleting tap %s: %s", self.tap, exc)

    def _firmware_argv(self) -> tuple[list[str], str]:
        """(firmware arguments, extra ``-device`` NIC properties) for :attr:`firmware`."""
        if self.firmware == "bios":
            return ["-boot", f"order={self.boot_order},strict=on,reboot-timeout=1000"], ""
        argv = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_path(OVMF_CODE)}",
                "-drive", f"if=pflash,format=raw,unit=1,file={_qemu_path(self.vars_path)}"]
        props = ",romfile=" if self.nic_model == UEFI_NIC_MODEL else ""
        # Network first unless the caller boots a disk (boot_order "c", with a -drive in qemu_args).
        return argv, props + (",bootindex=1" if self.boot_order.startswith("n") else "")

    def _qemu_argv(self) -> list[str]:
        fw_argv, nic_props = self._firmware_argv()
        return ["qemu-system-x86_64", "-name", f"bmi-{self.name}",
                "-accel", "tcg", "-machine", "pc", "-m", str(self.memory_mb),
                "-display", "none", "-vga", "std", "-no-reboot", *fw_argv,
                "-serial", f"file:{_qemu_path(self.console_log)}",
                "-monitor", f"unix:{_qemu_path(self.monitor_path)},server,nowait",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", f"{self.nic_model},netdev=n0,mac={self.mac}{nic_props}",
                "-pidfile", self.pidfile, "-daemonize", *self.qemu_args]

    def _start_qemu(self) -> None:
        for path in (self.pidfile, self.monitor_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.firmware == "uefi":
            for path in (OVMF_CODE, OVMF_VARS):
                if not os.path.isfile(path):
                    raise CommandFailed(f"VM {self.name}: missing {path} (install Debian's ovmf)")
            # A fresh variable store per power-on: OVMF rebuilds its boot options from bootindex.
            # A failed chain leaves OVMF in its boot manager (it does not exit like SeaBIOS with
            # reboot-timeout): callers' console timeouts catch that.
            with open(OVMF_VARS, "rb") as src, open(self.vars_path, "wb") as dst:
                dst.write(src.read())
        LOG.info("powering on VM %s (mac %s, netns %s, %s)", self.name, self.mac, self.netns, self.firmware)
        self.started_at = time.monotonic()
        self._netns_cmd(*self._qemu_argv(), timeout=60)
        try:
            with open(self.pidfile, encoding="ascii") as f:
                self.pid = int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise CommandFailed(f"VM {self.name}: qemu wrote no pid file") from exc

    def _our_pid(self) -> int | None:
        """Our qemu's pid if it is alive (checked against its command line), else None."""
        pid = self.pid
        if pid is None:
            return None
        if _pid_alive(pid) and self.monitor_path in _cmdline(pid):
            return pid
        return None

    def _kill(self, pid: int) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.05)
        raise CommandFailed(f"VM {self.name}: qemu pid {pid} did not die")

    def __repr__(self) -> str:
        return f"QemuNode({self.name!r}, mac={self.mac!r}, netns={self.netns!r}, running={self.is_running()})"

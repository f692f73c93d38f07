"""Boot files for a provisioned node: its PXELINUX per-MAC file and its iPXE script.

The BIOS chain is PXE ROM -> pxelinux.0 -> ``pxelinux.cfg/01-<mac>`` -> ``ipxe.lkrn`` with
``<node>.ipxe`` as its initrd -> ``sanboot iscsi:<ip>:tcp:<port>:<lun>:<target>``.
UEFI nodes cannot run PXELINUX/ipxe.lkrn: the boot network's DHCP server picks the loader by
client architecture (option 93: an iPXE EFI binary), and that iPXE fetches a static script which
chains to ``by-mac/<mac with dashes>.ipxe`` (``chain by-mac/${mac:hexhyp}.ipxe``), a copy of
``<node>.ipxe`` written here.  So BMI records no boot mode per node: the request says it, and
the one script serves both, because iPXE's ``sanboot`` boots the SAN disk the platform's way
(INT 13h + MBR under BIOS, a block device + ``EFI/BOOT/BOOTX64.EFI`` under UEFI) and leaves an
iBFT either way.  The copy lives in a subdirectory, so no node name (no ``/`` allowed) can
collide with it.
The files are rendered from ``ims/templates/{mac,ipxe}.temp`` (the original BMI
templates with interface, port and LUN made configurable) and replaced atomically,
so a node that PXE-boots while BMI rewrites its files sees either the old or the new
file, never half of one.  Every value that reaches a file is allow-listed first: a
newline in a name would inject PXELINUX or iPXE commands.

Per-boot cost: the PXELINUX file boots the image at once unless ``pxelinux_timeout`` (tenths of a
second, ``[tftp] pxelinux_timeout``) asks for the original menu wait, and the iPXE script runs DHCP
only when the interface has no address yet (``isset ${net0/ip}``): ipxe.lkrn loaded by PXELINUX
starts unconfigured, but the ROM's or the UEFI loader's iPXE, which fetched the script over HTTP,
configured it already, and a second ``ifconf`` costs seconds (ProxyDHCP and IPv6 waits).

CHAP: a target made with a secret (``[iscsi] chap``) gets ``set username`` / ``set password``
lines before ``sanboot``, iPXE's settings for the iSCSI login (one-way CHAP).  So the script
carries a secret: it is served only on the provisioning network (TFTP root, GET /boot/<mac>),
and its text is never logged.
"""
from __future__ import annotations

import logging
import os
import re
import string
from pathlib import Path

from ims.common.errors import InvalidInput
from ims.common.fileutil import atomic_write, remove_temp_leftovers, unlink_quietly
from ims.common.names import normalize_mac, pxe_mac_filename, validate_name
from ims.einstein.iscsi.chap import check_chap

LOG = logging.getLogger(__name__)

DEFAULT_TEMPLATES_DIR = str(Path(__file__).resolve().parent.parent / "templates")
# Under the iPXE directory (the TFTP root): the per-MAC copies of node scripts for UEFI iPXE.
MAC_SCRIPT_DIR = "by-mac"
# PXELINUX counts its TIMEOUT in tenths of a second; an hour is more than any operator wants.
MAX_PXELINUX_TIMEOUT = 36000

# Target IQNs and plain target names (what tgt accepts and iPXE's iscsi: URI can carry).
_IQN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,222}$")
_INTERFACE_RE = re.compile(r"^[a-z]+[0-9]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


class BootFiles:
    """Writes, reads and removes a node's PXELINUX and iPXE files.

    :param pxelinux_path: the ``pxelinux.cfg`` directory.
    :param ipxe_path: the directory holding ``<node>.ipxe`` (the TFTP root, next to ipxe.lkrn).
    :param iscsi_ip: the portal address nodes connect to.
    """

    def __init__(self, pxelinux_path: str, ipxe_path: str, iscsi_ip: str, iscsi_port: int = 3260,
                 lun: int = 1, interface: str = "net0", templates_dir: str | None = None,
                 pxelinux_timeout: int = 0) -> None:
        if not _HOST_RE.fullmatch(str(iscsi_ip)):
            raise InvalidInput(f"invalid iSCSI portal address {iscsi_ip!r}")
        if not 0 < int(iscsi_port) < 65536:
            raise InvalidInput(f"invalid iSCSI port {iscsi_port!r}")
        if int(lun) < 1:
            # LUN 0 is tgt's controller: a node would sanboot nothing.
            raise InvalidInput(f"invalid LUN {lun!r}: must be 1 or more")
        if not _INTERFACE_RE.fullmatch(interface):
            raise InvalidInput(f"invalid iPXE interface {interface!r}")
        if not 0 <= int(pxelinux_timeout) <= MAX_PXELINUX_TIMEOUT:
            raise InvalidInput(f"invalid PXELINUX timeout {pxelinux_timeout!r}: use 0-{MAX_PXELINUX_TIMEOUT} "
                               "(tenths of a second)")
        self.pxelinux_path = pxelinux_path
        self.ipxe_path = ipxe_path
        self.iscsi_ip = iscsi_ip
        self.iscsi_port = int(iscsi_port)
        self.lun = int(lun)
        self.interface = interface
        self.pxelinux_timeout = int(pxelinux_timeout)
        tdir = templates_dir or DEFAULT_TEMPLATES_DIR
        self._ipxe_template = string.Template(Path(tdir, "ipxe.temp").read_text(encoding="utf-8"))
        self._mac_template = string.Template(Path(tdir, "mac.temp").read_text(encoding="utf-8"))

    # --- paths ----------------------------------------------------------------
    def ipxe_file(self, node: str) -> str:
        return os.path.join(self.ipxe_path, validate_name(node, "node") + ".ipxe")

    def pxelinux_file(self, mac: str) -> str:
        return os.path.join(self.pxelinux_path, pxe_mac_filename(mac))

    def mac_ipxe_file(self, mac: str) -> str:
        """``<ipxe_path>/by-mac/aa-bb-cc-dd-ee-ff.ipxe``: what iPXE's ``${mac:hexhyp}`` expands to."""
        return os.path.join(self.ipxe_path, MAC_SCRIPT_DIR, normalize_mac(mac).replace(":", "-") + ".ipxe")

    def paths(self, node: str, mac: str) -> list[str]:
        """``[ipxe file, per-MAC ipxe file, pxelinux file]`` for the node."""
        return [self.ipxe_file(node), self.mac_ipxe_file(mac), self.pxelinux_file(mac)]

    # --- rendering --------------------------------------------------------------
    def render_ipxe(self, target_iqn: str, initiator_iqn: str | None = None,
                    chap: tuple[str, str] | None = None, secondary: str | None = None) -> str:
        """The node's iPXE script; ``chap`` ``(user, secret)`` makes it log in with CHAP.

        ``secondary`` (``"ip:port"``, ``[iscsi] multipath_boot``): a second portal for the same
        target, named after this gateway's (``sanboot --keep URI_here URI_secondary``, see
        ims/einstein/multipath.py); None renders the single-URI line.
        """
        _check_iqn(target_iqn, "target")
        secondary_uri = ""
        if secondary is not None:
            from ims.einstein.multipath import Portal, sanboot_uris  # (imports rados: only when asked)

            # Validated there (allow-list; not this gateway's own portal): a newline would inject commands.
            uris = sanboot_uris(Portal(self.iscsi_ip, self.iscsi_port), secondary, target_iqn, self.lun)
            secondary_uri = " " + uris[1]
        account = check_chap(chap)  # allow-listed: a newline or "$" would inject iPXE commands
        chap_lines = ""
        if account is not None:
            chap_lines = f"      set username {account[0]}\n      set password {account[1]}\n"
        initiator_line = ""
        if initiator_iqn is not None:
            _check_iqn(initiator_iqn, "initiator")
            # Logged in under this name, the node can be the only initiator tgt lets in.
            initiator_line = f"      set initiator-iqn {initiator_iqn}\n"
        return self._ipxe_template.substitute(
            interface=self.interface, initiator_line=initiator_line, chap_lines=chap_lines, iscsi_ip=self.iscsi_ip,
            iscsi_port=self.iscsi_port, lun=f"{self.lun:x}", target_name=target_iqn,
            secondary_uri=secondary_uri)

    def render_pxelinux(self, node: str, label: str) -> str:
        validate_name(node, "node")
        validate_name(label, "image")
        if self.pxelinux_timeout:
            # The original behaviour: an (invisible) menu that boots the image when the wait ends.
            default_label = "menu"
            timeout_lines = f"  TIMEOUT {self.pxelinux_timeout}\n  ONTIMEOUT {label}\n"
        else:
            # No wait: PROMPT 0 with the image as DEFAULT boots it at once.
            default_label, timeout_lines = label, ""
        return self._mac_template.substitute(img_name=label, ipxe_file=f"{node}.ipxe",
                                             default_label=default_label, timeout_lines=timeout_lines)

    # --- files ------------------------------------------------------------------
    def write(self, node: str, mac: str, label: str, target_iqn: str, initiator_iqn: str | None = None,
              chap: tuple[str, str] | None = None, secondary: str | None = None) -> list[str]:
        """Write (or replace) the boot files; returns their paths (see :meth:`paths`).

        Everything is validated and rendered before the first file is touched, so bad
        input writes nothing.  The node's iPXE script is written first: the per-MAC files
        (PXELINUX for BIOS nodes, the per-MAC iPXE copy for UEFI nodes) are what make a
        node use it.
        :raises InvalidInput: bad node, label, MAC or IQN.
        """
        normalize_mac(mac)
        ipxe_file, mac_ipxe_file, pxe_file = self.paths(node, mac)
        ipxe_text = self.render_ipxe(target_iqn, initiator_iqn, chap, secondary)
        pxe_text = self.render_pxelinux(node, label)
        atomic_write(ipxe_file, ipxe_text, 0o644)
        os.makedirs(os.path.dirname(mac_ipxe_file), mode=0o755, exist_ok=True)
        atomic_write(mac_ipxe_file, ipxe_text, 0o644)
        atomic_write(pxe_file, pxe_text, 0o644)
        LOG.info("wrote boot files for node %s: %s, %s, %s", node, ipxe_file, mac_ipxe_file, pxe_file)
        return [ipxe_file, mac_ipxe_file, pxe_file]

    def remove(self, node: str, mac: str) -> list[str]:
        """Remove the files (per-MAC ones first, so a booting node falls back cleanly); returns the removed ones."""
        ipxe_file, mac_ipxe_file, pxe_file = self.paths(node, mac)
        removed = [p for p in (pxe_file, mac_ipxe_file, ipxe_file) if unlink_quietly(p)]
        for path in (pxe_file, mac_ipxe_file, ipxe_file):  # a write killed mid-way (the node's lock is held)
            removed += remove_temp_leftovers(path)
        if removed:
            LOG.info("removed boot files for node %s: %s", node, ", ".join(removed))
        return removed

    def exists(self, node: str, mac: str) -> bool:
        """True only if all the files exist."""
        return all(os.path.isfile(p) for p in self.paths(node, mac))

    def read_ipxe(self, node: str) -> str:
        """The node's iPXE script. :raises FileNotFoundError: if absent."""
        return Path(self.ipxe_file(node)).read_text(encoding="utf-8")


def _check_iqn(value: object, kind: str) -> str:
    if not isinstance(value, str) or not _IQN_RE.fullmatch(value):
        raise InvalidInput(f"invalid {kind} IQN {value!r}")
    return value

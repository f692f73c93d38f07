"""QemuNode against a real qemu on the real boot network (no full boot: a few seconds)."""
from __future__ import annotations

import os

import pytest

from hilsim.vm import OVMF_CODE, OVMF_VARS, QemuNode
from ims.common.errors import InvalidInput
from ims.common.process import execute
from tests.support.bootnet import BootNet


def _tap_present(net: BootNet, tap: str) -> bool:
    out, _ = execute("ip", "netns", "exec", net.netns, "ip", "-o", "link", "show", "dev", tap,
                     check_exit_code=(0, 1, 255))
    return bool(out.strip())


def _qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return state not in ("Z", "X") and b"qemu" in f.read()
    except OSError:
        return False


def test_power_cycle_screendump_power_off_stop(bootnet: BootNet, tmp_path) -> None:
    log = str(tmp_path / "console.log")
    vm = QemuNode("vmcheck", "52:54:00:c0:ff:01", netns=bootnet.netns, bridge=bootnet.bridge,
                  console_log=log, workdir=str(tmp_path / "vm"), boot_timeout=30)
    try:
        vm.power_cycle()
        assert vm.is_running()
        pid = vm.pid
        assert pid is not None and os.path.exists(f"/proc/{pid}")
        assert _tap_present(bootnet, vm.tap)
        # The tap is a port of the boot bridge.
        out, _ = execute("ip", "netns", "exec", bootnet.netns, "ip", "-o", "link", "show", "dev", vm.tap)
        assert f"master {bootnet.bridge}" in out

        shot = vm.screendump(str(tmp_path / "screen.png"))
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

        # Nothing on ttyS0 before an image's syslinux runs: a short wait must time out, with a message.
        with pytest.raises(TimeoutError, match="no console line matched"):
            vm.wait_for_console(r"NEVER-PRINTED", timeout=1)

        with open(log, "a", encoding="ascii") as f:
            f.write("first-cycle-marker\n")
        vm.power_cycle()  # stops the old qemu, keeps its console as .1
        assert vm.is_running() and vm.pid != pid
        assert not _qemu_alive(pid), "the first qemu survived the power cycle"
        with open(log + ".1", encoding="ascii", errors="replace") as f:
            assert "first-cycle-marker" in f.read()

        vm.power_off()
        assert not vm.is_running()
        assert vm.wait_exit(1)
        with pytest.raises(TimeoutError, match="not running"):
            vm.wait_for_console(r"NEVER-PRINTED", timeout=5)
    finally:
        vm.stop()
        vm.stop()  # idempotent
    assert not vm.is_running()
    assert not _tap_present(bootnet, vm.tap)


@pytest.mark.parametrize("kwargs", [
    {"name": "../x"}, {"mac": "not-a-mac"}, {"netns": "ns;rm"}, {"bridge": "a-very-long-bridge-name"},
    {"boot_order": "n,menu=on"}, {"nic_model": "e1000,bus=x"}, {"firmware": "coreboot"},
])
def test_rejects_bad_arguments(kwargs: dict[str, str], tmp_path) -> None:
    args = {"name": "n1", "mac": "52:54:00:00:00:01", "netns": "bmi-x", "bridge": "br-bmi"}
    extra = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(InvalidInput):
        QemuNode(args.pop("name"), args.pop("mac"), console_log=str(tmp_path / "c.log"),
                 workdir=str(tmp_path / "w"), **args, **extra)


def test_uefi_node_runs_ovmf_with_its_own_vars_and_a_romless_virtio_nic(bootnet: BootNet, tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """firmware=uefi (here from BMI_VM_FIRMWARE, as the HIL simulator of a UEFI stack gets it)."""
    monkeypatch.setenv("BMI_VM_FIRMWARE", "uefi")
    vm = QemuNode("uefi-check", "52:54:00:c0:ff:02", netns=bootnet.netns, bridge=bootnet.bridge,
                  console_log=str(tmp_path / "console.log"), workdir=str(tmp_path / "vm"), boot_timeout=30)
    assert vm.firmware == "uefi" and vm.memory_mb >= 512
    try:
        vm.power_cycle()
        assert vm.is_running()
        with open(f"/proc/{vm.pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in argv
        assert f"if=pflash,format=raw,unit=1,file={vm.vars_path}" in argv
        assert "virtio-net-pci,netdev=n0,mac=52:54:00:c0:ff:02,romfile=,bootindex=1" in argv
        assert "-boot" not in argv  # OVMF ignores -boot order; bootindex decides
        # the VM writes its own copy of the variable store, never the package's
        with open(OVMF_VARS, "rb") as a, open(vm.vars_path, "rb") as b:
            assert len(a.read()) == len(b.read())
        # OVMF draws its boot screen on ttyS0 too (unlike SeaBIOS): the firmware really runs
        vm.wait_for_console(r"BdsDxe|UEFI|PXE", timeout=25)
    finally:
        vm.stop()
    assert not vm.is_running()


def test_bios_stays_the_default(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BMI_VM_FIRMWARE", raising=False)
    vm = QemuNode("n1", "52:54:00:00:00:01", netns="bmi-x", bridge="br-bmi", console_log=str(tmp_path / "c.log"),
                  workdir=str(tmp_path / "w"))
    argv = vm._qemu_argv()
    assert vm.firmware == "bios" and "pflash" not in " ".join(argv)
    assert "order=n,strict=on,reboot-timeout=1000" in argv and "e1000,netdev=n0,mac=52:54:00:00:00:01" in argv


def test_memory_from_option_env_or_default(bootnet: BootNet, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest RAM: memory_mb, else BMI_VM_MEMORY, else 1 GiB (256 MiB was too little for Debian's initramfs);
    the running qemu gets it (-m), and bad values are refused before anything starts."""
    def node(**kw):
        return QemuNode("mem-check", "52:54:00:c0:ff:03", netns=bootnet.netns, bridge=bootnet.bridge,
                        console_log=str(tmp_path / "console.log"), workdir=str(tmp_path / "vm"), boot_timeout=30, **kw)

    monkeypatch.delenv("BMI_VM_MEMORY", raising=False)
    assert node().memory_mb == 1024
    monkeypatch.setenv("BMI_VM_MEMORY", "768")
    vm = node()
    assert vm.memory_mb == 768
    assert node(memory_mb=300).memory_mb == 300
    assert node(memory_mb=300, firmware="uefi").memory_mb == 512
    for bad in ("lots", "0", "999999"):
        monkeypatch.setenv("BMI_VM_MEMORY", bad)
        with pytest.raises(InvalidInput):
            node()
    try:
        vm.power_cycle()
        with open(f"/proc/{vm.pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert argv[argv.index("-m") + 1] == "768"
    finally:
        vm.stop()

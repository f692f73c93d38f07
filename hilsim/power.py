"""Power control behind the simulator's OBM calls.

A node with a ``"vm"`` entry in the inventory is a qemu VM (``hilsim.vm.QemuNode``,
imported only when such a node exists, so the simulator runs without qemu otherwise).
Other nodes just record their power state, like HIL's mock OBM.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from hilsim.errors import BadArgumentError, OBMError
from hilsim.model import HILState, Node
from ims.common.errors import BMIError

LOG = logging.getLogger(__name__)

BOOT_DEVICES = ("pxe", "disk", "none")  # what HIL's IPMI driver accepts


class VMNode(Protocol):
    def power_cycle(self) -> None: ...
    def power_off(self) -> None: ...
    def is_running(self) -> bool: ...
    def stop(self) -> None: ...


class PowerController:
    def __init__(self, state: HILState) -> None:
        self.state = state
        self.vms: dict[str, VMNode] = {}
        # VM start/stop can take seconds: serialise per node, never under the state lock.
        self._locks: dict[str, threading.Lock] = {}
        vm_nodes = [n for n in state.nodes.values() if n.vm is not None]
        if vm_nodes:
            from hilsim.vm import QemuNode  # lazy: only simulators with VMs need qemu

            for node in vm_nodes:
                options: dict[str, Any] = dict(node.vm or {})
                mac = options.pop("mac", None) or next(iter(node.nics.values())).macaddr
                try:
                    self.vms[node.name] = QemuNode(node.name, mac, **options)
                except (TypeError, ValueError, BMIError) as exc:
                    raise ValueError(f"inventory: node {node.name}: bad 'vm' options: {exc}") from None
        for node in state.nodes.values():
            self._locks[node.name] = threading.Lock()

    def _lock(self, node: Node) -> threading.Lock:
        with self.state.lock:
            return self._locks.setdefault(node.name, threading.Lock())

    def _run(self, node: Node, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # any VM failure is an OBM failure to the client
            LOG.exception("power %s of VM %s failed", what, node.name)
            raise OBMError(f"Could not {what} node {node.name}: {type(exc).__name__}: {exc}") from None

    def _switch(self, node: Node, what: str, vm_method: str, power: str) -> None:
        """Drive the node's VM (if it has one) with ``vm_method``, then record ``power``."""
        with self._lock(node):
            vm = self.vms.get(node.name)
            if vm is not None:
                self._run(node, what, getattr(vm, vm_method))
            with self.state.lock:
                node.power = power

    def power_cycle(self, node: Node, force: bool) -> None:
        self._switch(node, "power cycle", "power_cycle", "on")

    def power_off(self, node: Node) -> None:
        self._switch(node, "power off", "power_off", "off")

    def power_status(self, node: Node) -> str:
        vm = self.vms.get(node.name)
        if vm is not None:
            return "on" if vm.is_running() else "off"
        with self.state.lock:
            return node.power

    def set_bootdev(self, node: Node, bootdev: str) -> None:
        if bootdev not in BOOT_DEVICES:
            raise BadArgumentError(f"Invalid boot device {bootdev!r}; use one of {', '.join(BOOT_DEVICES)}.")
        with self.state.lock:
            node.bootdev = bootdev

    def stop_all(self) -> None:
        for name, vm in self.vms.items():
            try:
                vm.stop()
            except Exception:  # keep stopping the others
                LOG.exception("stopping VM %s failed", name)

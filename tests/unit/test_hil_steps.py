"""The overlapped HIL steps: settled() joins the background call, settle_nic() waits out a pending action."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ims.common.errors import Conflict, InvalidInput, StorageError
from ims.einstein.ops import hil_steps
from ims.einstein.ops.hil_steps import settle_nic, settled


def test_settled_waits_for_the_call_before_the_blocks_error_propagates() -> None:
    ended = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        ended.set()

    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(slow)
        with pytest.raises(StorageError), settled(call):
            raise StorageError("clone failed")
        assert ended.is_set()  # a roll-back starting now sees what the call did


def test_settled_raises_the_calls_error_after_a_clean_block() -> None:
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(lambda: (_ for _ in ()).throw(Conflict("HIL: The channel is already in use on the nic.")))
        ran = []
        with pytest.raises(Conflict, match="channel"), settled(call):
            ran.append(True)
        assert ran == [True]
    with settled(None):
        pass


class PendingNet:
    """A NIC with a connect still pending in HIL for ``busy`` more tries, then attached."""

    def __init__(self, busy: int, attached_after: bool) -> None:
        self.busy = busy
        self.attached = False
        self.attached_after = attached_after
        self.calls: list[str] = []

    def _pending(self) -> None:
        if self.busy:
            self.busy -= 1
            raise Conflict("HIL: A networking operation is already active on the nic.")
        self.attached = self.attached or self.attached_after

    def detach_network(self, node: str, nic: str, network: str) -> None:
        self.calls.append("detach")
        self._pending()
        if not self.attached:
            raise InvalidInput("HIL rejected POST: The network is not attached to the nic.")
        self.attached = False

    def connect_network(self, node: str, nic: str, network: str) -> None:
        self.calls.append("connect")
        self._pending()
        if self.attached:
            raise Conflict("HIL: The network is already attached to the nic.")
        self.attached = True

    def nic_networks(self, node: str, nic: str) -> dict[str, Any]:
        return {"vlan/native": "net"} if self.attached else {}


def test_settle_nic_detaches_a_connect_that_lands_after_the_worker_died(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hil_steps.time, "sleep", lambda s: None)
    net = PendingNet(busy=2, attached_after=True)  # the dead worker's connect: pending, then done
    settle_nic(net, "n", "eno1", "net", attached=False)
    assert not net.attached and net.calls == ["detach", "detach", "detach"]


def test_settle_nic_ends_on_already_so() -> None:
    net = PendingNet(busy=0, attached_after=False)
    settle_nic(net, "n", "eno1", "net", attached=False)  # 400 not attached: nothing to undo
    assert net.calls == ["detach"] and not net.attached
    settle_nic(net, "n", "eno1", "net", attached=True)
    settle_nic(net, "n", "eno1", "net", attached=True)  # 409 already attached: done
    assert net.attached and net.calls == ["detach", "connect", "connect"]


def test_settle_nic_gives_up_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hil_steps, "PENDING_ACTION_WAIT", 0.0)
    net = PendingNet(busy=10**6, attached_after=True)
    with pytest.raises(Conflict, match="already active"):
        settle_nic(net, "n", "eno1", "net", attached=False)

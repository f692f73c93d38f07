"""The journaled HIL steps (connect / detach a NIC's network) and how they overlap other steps.

Split from ims/einstein/ops/steps.py (same Step contract: ``run(tx, **params)`` records, then
runs; the revert is idempotent).  :meth:`_HilStep.start` runs the HIL call in a background
thread once its record is written; :func:`settled` joins it before the operation ends or rolls
back; :func:`settle_nic` undoes it even when a dead worker left the action pending in HIL.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from ims.common.errors import AuthenticationFailed, Conflict, Forbidden, InvalidInput, NotFound
from ims.einstein.journal import RecoveryContext, Tx
from ims.einstein.ops.background import settled, start_step
from ims.einstein.ops.steps import Step

__all__ = ["settled", "settled_detach"]  # re-exported: the HIL steps' callers join them with it


# --- HIL -------------------------------------------------------------------------
class _HilStep(Step):
    """HIL changes need the caller's client (``net``), which is not a journal parameter."""

    def run(self, tx: Tx, name: str | None = None, /, **params: Any) -> Any:
        net = params.pop("net")
        undo = (self.undo_name, params) if self.undo_name else None
        return tx.step(name or self.name, lambda: self.execute(net, **params), undo=undo)

    def execute(self, net: Any, **params: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError

    def ahead(self, tx: Tx, /, **params: Any) -> None:
        params.pop("net", None)  # as run() and start(): the client is never a journal parameter
        super().ahead(tx, **params)

    def start(self, tx: Tx, /, **params: Any) -> Future[Any]:
        """:meth:`Step.start` for a HIL call (HIL round trips are independent of the storage,
        iSCSI and boot-file work they overlap)."""
        net = params.pop("net")
        undo = (self.undo_name, params) if self.undo_name else None
        return start_step(tx, self.name, undo, lambda: self.execute(net, **params))


class Connect(_HilStep):
    name, undo_name = "hil.connect", "hil.detach"

    def execute(self, net: Any, node: str, nic: str, network: str) -> None:  # type: ignore[override]
        net.connect_network(node, nic, network)

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        if ctx.net is None:
            ctx.notes.append(f"detach network {params['network']} from {params['node']}/{params['nic']} in HIL "
                             "by hand (no HIL credentials during recovery)")
            return
        try:
            settle_nic(ctx.net, params["node"], params["nic"], params["network"], attached=False)
        except (AuthenticationFailed, Forbidden, NotFound) as exc:  # these credentials cannot (node moved on)
            ctx.notes.append(f"detach network {params['network']} from "
                             f"{params['node']}/{params['nic']} in HIL by hand ({exc.message})")


class Detach(_HilStep):
    """Detach the network, sent directly (no read of the NIC first: one HIL round trip less on a
    deprovision's critical path).  Returns False when there was nothing to detach: HIL says the
    network is not on the NIC (someone detached it by hand), or HIL took the node back (401/403/404
    for these credentials).  The caller then disarms the step (:func:`settled_detach`) so a roll-back
    does not connect what was not connected."""

    name, undo_name = "hil.detach", "hil.connect"

    def execute(self, net: Any, node: str, nic: str, network: str) -> bool:  # type: ignore[override]
        try:
            net.detach_network(node, nic, network)
            return True
        except (AuthenticationFailed, Forbidden, NotFound):
            return False  # HIL took the node back: nothing to detach, BMI's side is cleaned up anyway
        except (Conflict, InvalidInput) as exc:
            if "already active" in exc.message.lower():
                raise  # an action is pending on the NIC: what it leaves is unknown yet
            if already_so(net, exc, node, nic, network, attached=False):
                return False
            raise

    def revert(self, params: dict[str, Any], ctx: RecoveryContext) -> None:
        if ctx.net is None:
            ctx.notes.append(f"connect network {params['network']} to {params['node']}/{params['nic']} in HIL "
                             "by hand (no HIL credentials during recovery)")
            return
        try:
            settle_nic(ctx.net, params["node"], params["nic"], params["network"], attached=True)
        except (AuthenticationFailed, Forbidden, NotFound) as exc:  # these credentials cannot (node moved on)
            ctx.notes.append(f"connect network {params['network']} to "
                             f"{params['node']}/{params['nic']} in HIL by hand ({exc.message})")


@contextlib.contextmanager
def settled_detach(tx: Tx, call: Future[Any] | None) -> Iterator[None]:
    """:func:`settled` for a :class:`Detach` started with :meth:`_HilStep.start`: when it found nothing
    to detach, its journal record loses its undo before the operation ends or rolls back."""
    try:
        with settled(call):
            yield
    finally:
        if call is not None and call.done() and call.exception() is None and call.result() is False:
            tx.disarm(Detach.name, "done: nothing was attached")


# How long an undo waits for a networking action another (dead) process left pending on the NIC.
PENDING_ACTION_WAIT = 120.0


def settle_nic(net: Any, node: str, nic: str, network: str, attached: bool) -> None:
    """Leave ``network`` attached to the NIC (``attached``) or not, whatever HIL is still doing.

    The action is sent directly, not after a look at the NIC: a worker killed just after sending
    its own connect/detach (the call overlaps the operation's other steps) leaves that action
    pending in HIL, and the NIC's networks do not show it yet.  HIL refuses an action on a NIC
    with a pending one (409 "...already active on the nic."): wait and try again.  The answers
    that mean "already so" end it: 409 "The network is already attached to the nic." for a
    connect, 400 "The network is not attached to the nic." for a detach (reference/hil-api.md).
    """
    deadline = time.monotonic() + PENDING_ACTION_WAIT
    while True:
        try:
            if attached:
                net.connect_network(node, nic, network)
            else:
                net.detach_network(node, nic, network)
            return
        except (Conflict, InvalidInput) as exc:
            text = exc.message.lower()
            if "already active" in text:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise  # still pending: the undo fails and is retried by a later recovery
            if already_so(net, exc, node, nic, network, attached):
                return
            raise


def already_so(net: Any, exc: Conflict | InvalidInput, node: str, nic: str, network: str, attached: bool) -> bool:
    """Does HIL's refusal ``exc`` of a connect (``attached``) or detach mean the NIC is already so?
    409 "The network is already attached to the nic." for a connect, 400 "The network is not
    attached to the nic." for a detach (reference/hil-api.md); another wording (an older HIL's) is
    decided from what the NIC shows."""
    text = exc.message.lower()
    if attached and isinstance(exc, Conflict) and "already attached" in text:
        return True
    if not attached and isinstance(exc, InvalidInput) and "not attached" in text:
        return True
    return (network in net.nic_networks(node, nic).values()) == attached



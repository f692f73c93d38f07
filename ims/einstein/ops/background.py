"""Steps that run while their operation goes on with its next ones (``Step.start``): a HIL call, the
boot files, a read the operation needs later.  Recorded in the journal first; :func:`settled` joins
one before its operation ends or rolls back."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ims.einstein.journal import Tx

# Steps running while their operation goes on with its next ones (Step.start); one or two per operation.
_BACKGROUND = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bg-step")


def in_background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` in the step pool: a read an operation needs later (see RecoveryContext.described)."""
    return _BACKGROUND.submit(fn, *args)


def start_step(tx: Tx, name: str, undo: tuple[str, dict[str, Any]] | None, fn: Callable[[], Any]) -> Future[Any]:
    """Record step ``name`` (with ``undo``), then run ``fn`` in the background; see :meth:`Step.start`."""
    started: list[Future[Any]] = []

    def work() -> Any:
        result = fn()
        tx.journal.fault(name, "after")  # the step's "after" point: its work is done
        return result

    def submit() -> Future[Any]:
        started.append(_BACKGROUND.submit(work))
        return started[0]

    try:
        return tx.step(name, submit, undo=undo, background=True)
    except BaseException:  # e.g. an injected fault after the submit: let the call end first
        wait_futures(started)
        raise


@contextlib.contextmanager
def settled(call: Future[Any] | None) -> Iterator[None]:
    """Run the block while ``call`` (from :meth:`Step.start`; None = none) proceeds; then wait for it.

    The block's error wins (after the call has ended); otherwise the call's error is raised.
    Either way the journal rolls back every recorded step, the call's included.  Start the next
    background step INSIDE this block: its own start can fail, and this call must end first.
    """
    if call is None:
        yield
        return
    try:
        yield
    except BaseException:
        wait_futures([call])
        raise
    call.result()

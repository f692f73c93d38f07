"""Removing an image for good, with its target and snapshots (the undo of a clone, the end of a
deprovision or an image removal); what a snapshot still has clones of is left to flatten.collect."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ims.common.errors import NotFound, TargetNotFound
from ims.einstein import flatten
from ims.einstein.ops.core import Core

LOG = logging.getLogger(__name__)


def quietly(fn: Callable[[], Any]) -> None:
    """Run ``fn``; an object that is already gone is what an undo wants."""
    with contextlib.suppress(NotFound, TargetNotFound):
        fn()


def purge(core: Core, image: str, described: Future[Any] | None = None) -> bool:
    """Remove ``image`` with its target and snapshots (idempotent); True once it is gone.

    Its pending flatten is cancelled first.  A snapshot something is still cloned from (a copy
    awaiting its flatten, a node provisioned from it) is left, and so is the image (False): once
    its row is gone it is *doomed* and :func:`flatten.collect` removes it when its last clone leaves.
    """
    st = core.storage
    flatten.cancel(core, image)
    try:
        return _purge_storage(core, image, described)
    except NotFound as exc:
        # A removal cut short (a SIGKILLed worker) can leave an image that still opens but whose
        # snapshots, children or parent link no longer read back; `rbd remove` finishes such a
        # removal.  Only if the image is then really gone is the purge done.
        LOG.warning("purge of %s met %s; finishing its removal", image, exc)
        quietly(lambda: st.remove_image(image))
        if st.image_exists(image):
            raise
        return True


def _purge_storage(core: Core, image: str, described: Future[Any] | None = None) -> bool:
    st = core.storage
    # perf: existence, snapshots and parent from one image open, maybe started earlier by the
    # operation (``described``: read while it held the image's lock, so nothing could add a snapshot
    # since; one removed meanwhile by a flatten's collect is NotFound below, handled like any)
    info = described.result() if described is not None else st.describe(image)
    if info is None:
        st.finish_removal(image)  # a removal cut short may leave it listed though it no longer opens
        return True
    snaps, parent = info
    with contextlib.suppress(TargetNotFound):
        if core.iscsi.target_exists(image):
            core.iscsi.remove_target(image)
    kept = []
    for snap in snaps:
        if st.list_children(image, snap):
            kept.append(snap)
            continue
        quietly(lambda s=snap: st.unprotect_snapshot(image, s))
        quietly(lambda s=snap: st.remove_snapshot(image, s))
    if kept:
        LOG.info("%s still has clones of %s: removed once they are gone", image, ", ".join(kept))
        return False
    quietly(lambda: st.remove_image(image))  # raises unless it is gone (NotFound: gone already)
    if parent is not None:
        flatten.collect(core, parent[0], parent[1])
    return True

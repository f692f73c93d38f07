"""The storage driver interface.

Image and snapshot names given to a driver have already been validated by
``ims.common.names`` (the operations layer does that); drivers may still assert.

Error contract (every driver):
  * ImageNotFound / SnapshotNotFound (404) - the image or snapshot does not exist
  * ImageExists / SnapshotExists (409)     - the name is taken
  * ImageBusy (409)                        - has snapshots, clones, watchers, or snapshot protected
  * StorageError (503)                     - the back-end failed or cannot be reached
Messages name the driver-level image; the operations layer rewrites them into
BMI names before they reach a user.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass


class FlattenCancelled(Exception):
    """A flatten stopped because its progress callback asked it to (the clone keeps its parent)."""


@dataclass(frozen=True)
class Backing:
    """How an iSCSI target reaches an image: tgt ``bs-type``, ``backing-store`` and ``bsopts``."""

    bstype: str            # "rbd" or "rdwr"
    path: str              # "pool/image" or an absolute file path
    bsopts: str | None = None  # e.g. "conf=/etc/ceph/ceph.conf;id=admin"


class Storage(abc.ABC):
    """A pool of block images with snapshots, protection, copy-on-write clones and flatten."""

    name: str = "base"
    # True when flatten copies data (Ceph): copies are then flattened in the background.  False
    # when clone already copied everything (file driver): flatten only cuts a link.
    background_flatten: bool = False

    # --- images ---------------------------------------------------------------
    @abc.abstractmethod
    def list_images(self) -> list[str]:
        """Names of all images in the pool."""

    @abc.abstractmethod
    def image_exists(self, image: str) -> bool: ...

    @abc.abstractmethod
    def create_image(self, image: str, size: int) -> None:
        """Create an empty (sparse) image of ``size`` bytes. :raises ImageExists:"""

    @abc.abstractmethod
    def remove_image(self, image: str) -> None:
        """Delete an image. :raises ImageNotFound: :raises ImageBusy: if it has snapshots or watchers."""

    @abc.abstractmethod
    def image_size(self, image: str) -> int: ...

    @abc.abstractmethod
    def read(self, image: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, image: str, offset: int, data: bytes) -> None: ...

    def write_extents(self, image: str, extents: list[tuple[int, bytes]]) -> None:
        """Write each ``(offset, data)``; drivers may open the image once for all of them (uploads)."""
        for offset, data in extents:
            self.write(image, offset, data)

    def rename_image(self, image: str, new_name: str) -> None:
        """Rename an image that has no snapshots (an upload's staging image becomes a BMI image).

        :raises ImageNotFound: :raises ImageExists: if ``new_name`` is taken.
        """
        raise NotImplementedError(f"the {self.name} storage driver cannot rename images")

    # --- snapshots ------------------------------------------------------------
    @abc.abstractmethod
    def list_snapshots(self, image: str) -> list[str]: ...

    @abc.abstractmethod
    def create_snapshot(self, image: str, snap: str) -> None:
        """:raises SnapshotExists: :raises ImageNotFound:"""

    @abc.abstractmethod
    def remove_snapshot(self, image: str, snap: str) -> None:
        """:raises SnapshotNotFound: :raises ImageBusy: if protected."""

    @abc.abstractmethod
    def protect_snapshot(self, image: str, snap: str) -> None:
        """Idempotent. :raises SnapshotNotFound:"""

    @abc.abstractmethod
    def unprotect_snapshot(self, image: str, snap: str) -> None:
        """Idempotent. :raises SnapshotNotFound: :raises ImageBusy: if it has clones."""

    @abc.abstractmethod
    def is_protected(self, image: str, snap: str) -> bool: ...

    # --- clones ---------------------------------------------------------------
    @abc.abstractmethod
    def clone(self, parent: str, snap: str, child: str) -> None:
        """Copy-on-write clone of ``parent@snap`` (must be protected) as ``child``.

        :raises ImageNotFound: :raises SnapshotNotFound: :raises ImageExists:
        :raises ImageBusy: if the snapshot is not protected.
        """

    @abc.abstractmethod
    def list_children(self, image: str, snap: str) -> list[str]: ...

    @abc.abstractmethod
    def parent_info(self, image: str) -> tuple[str, str] | None:
        """``(parent_image, parent_snap)`` for a clone that is not flattened, else None."""

    def describe(self, image: str) -> tuple[list[str], tuple[str, str] | None] | None:
        """``(snapshots, parent_info)`` of ``image``, or None if it does not exist.

        What a removal reads first; a driver may read both at once (Ceph: one image open, not three).
        """
        if not self.image_exists(image):
            return None
        return self.list_snapshots(image), self.parent_info(image)

    def finish_removal(self, image: str) -> bool:
        """Finish a removal cut short after the image stopped opening (Ceph: a SIGKILL between the
        header's removal and the directory entry's); True if a leftover was removed.  Default: none."""
        return False

    @abc.abstractmethod
    def flatten(self, image: str) -> None:
        """Make a clone independent of its parent (no-op for a non-clone)."""

    def flatten_with_progress(self, image: str, progress: Callable[[int, int], bool]) -> None:
        """:meth:`flatten`, calling ``progress(done, total)`` as it goes; a True answer stops it.

        :raises FlattenCancelled: when stopped (the image is still a clone; running it again resumes).
        """
        if self.parent_info(image) is None:
            return
        if progress(0, 1):
            raise FlattenCancelled(image)
        self.flatten(image)
        progress(1, 1)

    # --- export ---------------------------------------------------------------
    @abc.abstractmethod
    def backing(self, image: str) -> Backing:
        """How tgt should export ``image``."""

    def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing
        """Release connections (called at process exit)."""

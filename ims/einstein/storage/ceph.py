"""The Ceph RBD storage driver (librbd through Ceph's python bindings).

One rados connection per process and cluster identity, opened on first use and
reused by every CephStorage on that identity: connecting costs tens of ms and a
mon session, an RBD clone costs about as much, so a connection per call would
double provisioning time.  librados is not fork-safe, so a connection remembers
the pid that opened it and a forked child opens its own.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import rados
import rbd

from ims.common.errors import (
    BMIError,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    SnapshotExists,
    SnapshotNotFound,
    StorageError,
)
from ims.einstein.storage.base import Backing, FlattenCancelled, Storage

LOG = logging.getLogger(__name__)

# Layering is all BMI needs; exclusive-lock (which object-map requires) would make
# tgtd and BMI bounce the lock on every write to an exported image.
FEATURES = rbd.RBD_FEATURE_LAYERING

_ConnKey = tuple[str, str, str]


class _Connection:
    """A connected rados.Rados plus the pid that opened it."""

    def __init__(self, cluster: rados.Rados) -> None:
        self.cluster = cluster
        self.pid = os.getpid()
        self.ioctxs: dict[str, rados.Ioctx] = {}


_CONNECTIONS: dict[_ConnKey, _Connection] = {}
_LOCK = threading.Lock()


def _connect(conf_file: str, client_id: str, keyring: str | None, timeout: float) -> rados.Rados:
    seconds = str(max(1, int(timeout)))
    # Without these a dead cluster blocks forever instead of raising StorageError.
    conf = {
        "client_mount_timeout": seconds,
        "rados_mon_op_timeout": seconds,
        "rados_osd_op_timeout": seconds,
        # Clone v1: a clone needs a protected snapshot and snapshots with clones cannot be
        # removed, the contract both drivers keep (v2 would allow it when min compat >= mimic).
        "rbd_default_clone_format": "1",
        "log_to_stderr": "false",
    }
    if keyring:
        conf["keyring"] = keyring
    try:
        cluster = rados.Rados(conffile=conf_file, rados_id=client_id, conf=conf)
        cluster.connect(timeout=int(seconds))
    except (rados.Error, OSError) as exc:
        raise StorageError(f"cannot connect to Ceph ({conf_file}, client.{client_id}): {exc}") from exc
    return cluster


def _translate(exc: Exception, what: str) -> BMIError:
    """Map a librbd/librados error about ``what`` onto the storage error contract."""
    if isinstance(exc, rbd.ImageNotFound):
        return ImageNotFound(f"image {what} not found")
    if isinstance(exc, rbd.ImageExists):
        return ImageExists(f"image {what} already exists")
    if isinstance(exc, rbd.ImageHasSnapshots):
        return ImageBusy(f"image {what} has snapshots")
    if isinstance(exc, rbd.ImageBusy):
        return ImageBusy(f"image {what} is busy (snapshots, clones or watchers)")
    if isinstance(exc, (rbd.Timeout, rados.TimedOut)):
        return StorageError(f"Ceph timed out on image {what}")
    return StorageError(f"Ceph error on image {what}: {type(exc).__name__}: {exc}")


def _check_range(image: str, size: int, offset: int, length: int) -> None:
    # librbd would answer EINVAL (a 503 StorageError); a bad range is the caller's mistake.
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidInput(f"range {offset}+{length} is outside image {image} ({size} bytes)")


class CephStorage(Storage):
    """Images are RBD images (format 2, layering) in one pool."""

    name = "ceph"
    background_flatten = True

    def __init__(self, pool: str, conf_file: str, client_id: str = "admin", keyring: str | None = None,
                 timeout: float = 30.0) -> None:
        self.pool = pool
        self.conf_file = conf_file
        self.client_id = client_id
        self.keyring = keyring or None
        self.timeout = timeout
        self._key: _ConnKey = (conf_file, client_id, self.keyring or "")

    # --- connection -------------------------------------------------------------
    def _ioctx(self) -> rados.Ioctx:
        with _LOCK:
            conn = _CONNECTIONS.get(self._key)
            if conn is not None and conn.pid != os.getpid():
                # Inherited across fork: unusable here, and shutting it down could hang.
                conn = None
            if conn is None:
                conn = _Connection(_connect(self.conf_file, self.client_id, self.keyring, self.timeout))
                _CONNECTIONS[self._key] = conn
            ioctx = conn.ioctxs.get(self.pool)
            if ioctx is None:
                try:
                    ioctx = conn.cluster.open_ioctx(self.pool)
                except rados.ObjectNotFound as exc:
                    raise StorageError(f"Ceph pool {self.pool} does not exist") from exc
                except rados.Error as exc:
                    raise StorageError(f"cannot open Ceph pool {self.pool}: {exc}") from exc
                conn.ioctxs[self.pool] = ioctx
            return ioctx

    def close(self) -> None:
        with _LOCK:
            conn = _CONNECTIONS.pop(self._key, None)
        if conn is None or conn.pid != os.getpid():
            return
        for ioctx in conn.ioctxs.values():
            with contextlib.suppress(rados.Error):
                ioctx.close()
        with contextlib.suppress(rados.Error):
            conn.cluster.shutdown()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except BMIError:
            raise
        except (rbd.Error, rados.Error) as exc:
            if isinstance(exc, (rbd.ConnectionShutdown, rados.ConnectionShutdown)):
                self.close()
            raise _translate(exc, what) from exc

    @contextlib.contextmanager
    def _image(self, image: str, snapshot: str | None = None, read_only: bool = False) -> Iterator[Any]:
        ioctx = self._ioctx()
        with self._errors(image):
            img = rbd.Image(ioctx, image, snapshot=snapshot, read_only=read_only)
            try:
                yield img
            finally:
                img.close()

    def _require_snapshot(self, img: Any, image: str, snap: str) -> None:
        if snap not in self._snap_names(img):
            raise SnapshotNotFound(f"snapshot {image}@{snap} not found")

    @staticmethod
    def _snap_names(img: Any) -> list[str]:
        return [s["name"] for s in img.list_snaps()]

    # --- images -----------------------------------------------------------------
    def list_images(self) -> list[str]:
        ioctx = self._ioctx()
        with self._errors(f"list of pool {self.pool}"):
            return sorted(rbd.RBD().list(ioctx))

    def image_exists(self, image: str) -> bool:
        try:
            with self._image(image, read_only=True):
                return True
        except ImageNotFound:
            return False

    def create_image(self, image: str, size: int) -> None:
        ioctx = self._ioctx()
        with self._errors(image):
            rbd.RBD().create(ioctx, image, size, old_format=False, features=FEATURES)

    def remove_image(self, image: str) -> None:
        ioctx = self._ioctx()
        with self._errors(image):
            rbd.RBD().remove(ioctx, image)

    def finish_removal(self, image: str) -> bool:
        # `rbd ls` reads the pool's directory; an image whose header went with a SIGKILLed removal is
        # still listed there (and `rbd ls -l` fails on it) though it no longer opens: removing it again
        # clears the entry.  Only called when the image does not open, so the listing is rare.
        ioctx = self._ioctx()
        with self._errors(image):
            if image not in rbd.RBD().list(ioctx):
                return False
            try:
                rbd.RBD().remove(ioctx, image)
            except rbd.ImageNotFound:
                pass
        LOG.warning("finished the removal of image %s (listed in the pool but it no longer opened)", image)
        return True

    def image_size(self, image: str) -> int:
        with self._image(image, read_only=True) as img:
            return int(img.size())

    def read(self, image: str, offset: int, length: int) -> bytes:
        with self._image(image, read_only=True) as img:
            _check_range(image, int(img.size()), offset, length)
            return bytes(img.read(offset, length))

    def write(self, image: str, offset: int, data: bytes) -> None:
        with self._image(image) as img:
            _check_range(image, int(img.size()), offset, len(data))
            written = img.write(data, offset)
            if written != len(data):
                raise StorageError(f"short write to image {image}: {written} of {len(data)} bytes")

    def write_extents(self, image: str, extents: list[tuple[int, bytes]]) -> None:
        # one open (a header read and a watch) for all of an upload chunk's extents
        with self._image(image) as img:
            size = int(img.size())
            for offset, data in extents:
                _check_range(image, size, offset, len(data))
                written = img.write(data, offset)
                if written != len(data):
                    raise StorageError(f"short write to image {image}: {written} of {len(data)} bytes")

    def rename_image(self, image: str, new_name: str) -> None:
        ioctx = self._ioctx()
        with self._errors(image):
            try:
                rbd.RBD().rename(ioctx, image, new_name)
            except rbd.ImageExists:
                raise ImageExists(f"image {new_name} already exists") from None

    # --- snapshots --------------------------------------------------------------
    def list_snapshots(self, image: str) -> list[str]:
        with self._image(image, read_only=True) as img:
            return self._snap_names(img)

    def create_snapshot(self, image: str, snap: str) -> None:
        with self._image(image) as img:
            if snap in self._snap_names(img):
                raise SnapshotExists(f"snapshot {image}@{snap} already exists")
            try:
                img.create_snap(snap)
            except rbd.ImageExists as exc:  # lost a race with another creator
                raise SnapshotExists(f"snapshot {image}@{snap} already exists") from exc

    def remove_snapshot(self, image: str, snap: str) -> None:
        with self._image(image) as img:
            self._require_snapshot(img, image, snap)
            if img.is_protected_snap(snap):
                raise ImageBusy(f"snapshot {image}@{snap} is protected")
            try:
                img.remove_snap(snap)
            except rbd.ImageNotFound as exc:
                raise SnapshotNotFound(f"snapshot {image}@{snap} not found") from exc
            except rbd.ImageBusy as exc:
                raise ImageBusy(f"snapshot {image}@{snap} is protected or in use") from exc

    def protect_snapshot(self, image: str, snap: str) -> None:
        with self._image(image) as img:
            self._require_snapshot(img, image, snap)
            if img.is_protected_snap(snap):
                return
            try:
                img.protect_snap(snap)
            except rbd.ImageBusy:  # protected meanwhile by someone else: that is what we wanted
                if not img.is_protected_snap(snap):
                    raise

    def unprotect_snapshot(self, image: str, snap: str) -> None:
        with self._image(image) as img:
            self._require_snapshot(img, image, snap)
            if not img.is_protected_snap(snap):
                return
            try:
                img.unprotect_snap(snap)
            except rbd.ImageBusy as exc:
                raise ImageBusy(f"snapshot {image}@{snap} has clones") from exc
            except rbd.InvalidArgument:  # unprotected meanwhile
                if img.is_protected_snap(snap):
                    raise

    def is_protected(self, image: str, snap: str) -> bool:
        with self._image(image, read_only=True) as img:
            self._require_snapshot(img, image, snap)
            return bool(img.is_protected_snap(snap))

    # --- clones -----------------------------------------------------------------
    def clone(self, parent: str, snap: str, child: str) -> None:
        # perf: clone first; the checks below (an image open: several OSD round trips) only run to
        # say why a clone failed: parent or snapshot missing, or the snapshot not protected.
        ioctx = self._ioctx()
        with self._errors(child):
            try:
                rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=FEATURES)
                return
            except (rbd.ImageNotFound, rbd.InvalidArgument):
                pass
        with self._image(parent, read_only=True) as img:
            self._require_snapshot(img, parent, snap)
            if not img.is_protected_snap(snap):
                raise ImageBusy(f"snapshot {parent}@{snap} is not protected; protect it before cloning")
        ioctx = self._ioctx()
        with self._errors(child):
            try:
                rbd.RBD().clone(ioctx, parent, snap, ioctx, child, features=FEATURES)
            except rbd.InvalidArgument as exc:  # unprotected between our check and the clone
                raise ImageBusy(f"snapshot {parent}@{snap} is not protected") from exc

    def list_children(self, image: str, snap: str) -> list[str]:
        with self._image(image, read_only=True) as img:
            self._require_snapshot(img, image, snap)
        with self._image(image, snapshot=snap, read_only=True) as snap_img:
            children = snap_img.list_children()
        return sorted(name if pool == self.pool else f"{pool}/{name}" for pool, name in children)

    def parent_info(self, image: str) -> tuple[str, str] | None:
        with self._image(image, read_only=True) as img:
            try:
                _pool, parent, snap = img.parent_info()
            except rbd.ImageNotFound:  # librbd's way of saying "no parent"
                return None
            return parent, snap

    def describe(self, image: str) -> tuple[list[str], tuple[str, str] | None] | None:
        # One read-only open (each open is several OSD round trips).  An image that opens but whose
        # snapshots or parent do not read back (a removal cut short) raises, as list_snapshots does.
        ioctx = self._ioctx()
        with self._errors(image):
            try:
                img = rbd.Image(ioctx, image, read_only=True)
            except rbd.ImageNotFound:
                return None
            try:
                snaps = self._snap_names(img)
                try:
                    _pool, parent, snap = img.parent_info()
                except rbd.ImageNotFound:  # librbd's way of saying "no parent"
                    return snaps, None
                return snaps, (parent, snap)
            finally:
                img.close()

    def flatten(self, image: str) -> None:
        with self._image(image) as img:
            try:
                img.parent_info()
            except rbd.ImageNotFound:
                return
            img.flatten()

    def flatten_with_progress(self, image: str, progress: Callable[[int, int], bool]) -> None:
        seen = [0]

        def on_progress(done: int, total: int) -> int:
            seen[0] = int(total)
            try:
                stop = progress(int(done), int(total))
            except Exception:  # noqa: BLE001 - never let a callback error escape into librbd
                LOG.exception("flatten progress callback failed")
                return 0
            return -errno.ECANCELED if stop else 0  # librbd aborts on a negative answer

        with self._image(image) as img:
            try:
                img.parent_info()
            except rbd.ImageNotFound:
                return
            try:
                img.flatten(on_progress=on_progress)
            except rbd.OperationCanceled as exc:
                raise FlattenCancelled(image) from exc
        progress(seen[0] or 1, seen[0] or 1)  # librbd's last report is one object short of the total

    # --- export -----------------------------------------------------------------
    def backing(self, image: str) -> Backing:
        return Backing("rbd", f"{self.pool}/{image}", f"conf={self.conf_file};id={self.client_id}")

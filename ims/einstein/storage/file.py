"""The file storage driver: raw sparse image files in a directory (labs without Ceph).

It keeps the Ceph driver's semantics, so the operations layer cannot tell them apart:
snapshots are read-only point-in-time copies, a clone needs a protected snapshot,
protected snapshots and snapshots with clones cannot go away, and flatten cuts the
parent link.  Copies are reflinks where the filesystem can (O(1), shared blocks) and
sparse copies elsewhere (holes stay holes; zeros are never written).

Layout under ROOT::

    images/<image>.img          the image, a plain file tgt serves with bs-type rdwr
    snaps/<image>@<snap>.img    a snapshot (mode 0444)
    meta/<image>.json           {"parent": [image, snap] | null, "snapshots": [{"name", "protected"}]}
    .lock                       fcntl lock: exclusive for changes, shared for reads and data I/O

Metadata files are replaced atomically (temp file + rename) under the exclusive lock,
so several processes can share one store.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from ims.common.errors import (
    ImageBusy,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    SnapshotExists,
    SnapshotNotFound,
    StorageError,
)
from ims.common.names import validate_name
from ims.einstein.storage.base import Backing, Storage

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
_REFLINK_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF}
_CHUNK = 4 << 20


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, n, pos)
            done = os.pwrite(dst, data, pos)
        if done <= 0:
            raise OSError(errno.EIO, f"short copy at offset {pos}")
        pos += done


def sparse_copy(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` to a new ``dst_path``: reflink if possible, else copy only the data extents."""
    src = os.open(src_path, os.O_RDONLY)
    try:
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                return
            except OSError as exc:
                if exc.errno not in _REFLINK_UNSUPPORTED:
                    raise
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)  # the holes come for free
            pos = 0
            while pos < size:
                try:
                    data_start = os.lseek(src, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                data_end = os.lseek(src, data_start, os.SEEK_HOLE)
                _copy_range(src, dst, data_start, data_end)
                pos = data_end
        finally:
            os.close(dst)
    finally:
        os.close(src)


class FileStorage(Storage):
    """Images are raw sparse files under ``root``."""

    name = "file"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._images = os.path.join(self.root, "images")
        self._snaps = os.path.join(self.root, "snaps")
        self._meta = os.path.join(self.root, "meta")
        try:
            for path in (self._images, self._snaps, self._meta):
                os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create image store {self.root}: {exc.strerror}") from exc
        self._lock_path = os.path.join(self.root, ".lock")

    # --- paths, lock, metadata ---------------------------------------------------
    def _image_path(self, image: str) -> str:
        return os.path.join(self._images, validate_name(image, "image") + ".img")

    def _snap_path(self, image: str, snap: str) -> str:
        return os.path.join(self._snaps, f"{validate_name(image, 'image')}@{validate_name(snap, 'snapshot')}.img")

    def _meta_path(self, image: str) -> str:
        return os.path.join(self._meta, validate_name(image, "image") + ".json")

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        # A fresh open file description per call, so threads of one process exclude each other too.
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open lock of image store {self.root}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            except OSError as exc:
                raise StorageError(f"image store {self.root}: {exc}") from exc
        finally:
            os.close(fd)  # also releases the lock

    def _load(self, image: str) -> dict[str, Any]:
        try:
            with open(self._meta_path(image), encoding="utf-8") as f:
                meta: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            meta = {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read metadata of image {image}: {exc}") from exc
        meta.setdefault("parent", None)
        meta.setdefault("snapshots", [])
        return meta

    def _save(self, image: str, meta: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._meta, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(meta, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._meta_path(image))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _require_image(self, image: str) -> None:
        if not os.path.isfile(self._image_path(image)):
            raise ImageNotFound(f"image {image} not found")

    @staticmethod
    def _find_snap(meta: dict[str, Any], image: str, snap: str) -> dict[str, Any]:
        for entry in meta["snapshots"]:
            if entry["name"] == snap:
                return entry  # type: ignore[no-any-return]
        raise SnapshotNotFound(f"snapshot {image}@{snap} not found")

    def _children(self, image: str, snap: str) -> list[str]:
        children = []
        for entry in os.listdir(self._meta):
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            child = entry[:-len(".json")]
            if self._load(child)["parent"] == [image, snap] and os.path.isfile(self._image_path(child)):
                children.append(child)
        return sorted(children)

    def _check_range(self, image: str, offset: int, length: int) -> None:
        size = os.path.getsize(self._image_path(image))
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidInput(f"range {offset}+{length} is outside image {image} ({size} bytes)")

    # --- images -----------------------------------------------------------------
    def list_images(self) -> list[str]:
        with self._locked(exclusive=False):
            return sorted(e[:-len(".img")] for e in os.listdir(self._images)
                          if e.endswith(".img") and not e.startswith("."))

    def image_exists(self, image: str) -> bool:
        return os.path.isfile(self._image_path(image))

    def create_image(self, image: str, size: int) -> None:
        if size < 0:
            raise InvalidInput(f"negative size for image {image}")
        path = self._image_path(image)
        with self._locked():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as exc:
                raise ImageExists(f"image {image} already exists") from exc
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self._save(image, {"parent": None, "snapshots": []})

    def remove_image(self, image: str) -> None:
        with self._locked():
            self._require_image(image)
            if self._load(image)["snapshots"]:
                raise ImageBusy(f"image {image} has snapshots")
            os.unlink(self._image_path(image))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._meta_path(image))

    def image_size(self, image: str) -> int:
        try:
            return os.path.getsize(self._image_path(image))
        except FileNotFoundError as exc:
            raise ImageNotFound(f"image {image} not found") from exc

    def read(self, image: str, offset: int, length: int) -> bytes:
        with self._locked(exclusive=False):
            self._require_image(image)
            self._check_range(image, offset, length)
            with open(self._image_path(image), "rb") as f:
                return os.pread(f.fileno(), length, offset)

    def write(self, image: str, offset: int, data: bytes) -> None:
        with self._locked(exclusive=False):
            self._require_image(image)
            self._check_range(image, offset, len(data))
            with open(self._image_path(image), "r+b") as f:
                view = memoryview(data)
                while view:
                    done = os.pwrite(f.fileno(), view, offset)
                    view, offset = view[done:], offset + done

    def rename_image(self, image: str, new_name: str) -> None:
        with self._locked():
            self._require_image(image)
            if os.path.exists(self._image_path(new_name)):
                raise ImageExists(f"image {new_name} already exists")
            meta = self._load(image)
            if meta["snapshots"]:
                raise ImageBusy(f"image {image} has snapshots")
            self._save(new_name, meta)
            os.rename(self._image_path(image), self._image_path(new_name))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._meta_path(image))

    # --- snapshots --------------------------------------------------------------
    def list_snapshots(self, image: str) -> list[str]:
        with self._locked(exclusive=False):
            self._require_image(image)
            return [s["name"] for s in self._load(image)["snapshots"]]

    def create_snapshot(self, image: str, snap: str) -> None:
        target = self._snap_path(image, snap)
        with self._locked():
            self._require_image(image)
            meta = self._load(image)
            if any(s["name"] == snap for s in meta["snapshots"]):
                raise SnapshotExists(f"snapshot {image}@{snap} already exists")
            tmp = os.path.join(self._snaps, f".tmp-{os.getpid()}-{os.path.basename(target)}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            try:
                sparse_copy(self._image_path(image), tmp)
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            meta["snapshots"].append({"name": snap, "protected": False})
            self._save(image, meta)

    def remove_snapshot(self, image: str, snap: str) -> None:
        with self._locked():
            self._require_image(image)
            meta = self._load(image)
            entry = self._find_snap(meta, image, snap)
            if entry["protected"]:
                raise ImageBusy(f"snapshot {image}@{snap} is protected")
            if self._children(image, snap):
                raise ImageBusy(f"snapshot {image}@{snap} has clones")
            meta["snapshots"].remove(entry)
            self._save(image, meta)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._snap_path(image, snap))

    def _set_protected(self, image: str, snap: str, protected: bool) -> None:
        with self._locked():
            self._require_image(image)
            meta = self._load(image)
            entry = self._find_snap(meta, image, snap)
            if entry["protected"] == protected:
                return
            if not protected and self._children(image, snap):
                raise ImageBusy(f"snapshot {image}@{snap} has clones")
            entry["protected"] = protected
            self._save(image, meta)

    def protect_snapshot(self, image: str, snap: str) -> None:
        self._set_protected(image, snap, True)

    def unprotect_snapshot(self, image: str, snap: str) -> None:
        self._set_protected(image, snap, False)

    def is_protected(self, image: str, snap: str) -> bool:
        with self._locked(exclusive=False):
            self._require_image(image)
            return bool(self._find_snap(self._load(image), image, snap)["protected"])

    # --- clones -----------------------------------------------------------------
    def clone(self, parent: str, snap: str, child: str) -> None:
        target = self._image_path(child)
        with self._locked():
            self._require_image(parent)
            entry = self._find_snap(self._load(parent), parent, snap)
            if not entry["protected"]:
                raise ImageBusy(f"snapshot {parent}@{snap} is not protected; protect it before cloning")
            if os.path.exists(target):
                raise ImageExists(f"image {child} already exists")
            tmp = os.path.join(self._images, f".tmp-{os.getpid()}-{child}.img")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            try:
                sparse_copy(self._snap_path(parent, snap), tmp)
                os.chmod(tmp, 0o644)
                # Metadata first: a crash then leaves a harmless orphan meta file, never an
                # image that has forgotten its parent.
                self._save(child, {"parent": [parent, snap], "snapshots": []})
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def list_children(self, image: str, snap: str) -> list[str]:
        with self._locked(exclusive=False):
            self._require_image(image)
            self._find_snap(self._load(image), image, snap)
            return self._children(image, snap)

    def parent_info(self, image: str) -> tuple[str, str] | None:
        with self._locked(exclusive=False):
            self._require_image(image)
            parent = self._load(image)["parent"]
            return (parent[0], parent[1]) if parent else None

    def flatten(self, image: str) -> None:
        # The data is already a full copy; flattening only cuts the link.
        with self._locked():
            self._require_image(image)
            meta = self._load(image)
            if meta["parent"] is not None:
                meta["parent"] = None
                self._save(image, meta)

    # --- export -----------------------------------------------------------------
    def backing(self, image: str) -> Backing:
        return Backing("rdwr", self._image_path(image))

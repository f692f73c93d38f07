"""One behaviour suite for every storage driver: ceph on a real throwaway cluster, file on tmp."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import rados
import rbd

from ims.common.errors import (
    CommandFailed,
    ImageBusy,
    ImageExists,
    ImageNotFound,
    InvalidInput,
    SnapshotExists,
    SnapshotNotFound,
    StorageError,
)
from ims.common.process import execute
from ims.einstein.storage.base import FlattenCancelled, Storage
from ims.einstein.storage.ceph import CephStorage
from tests.support.ceph import CephCluster, ceph_cluster, ceph_storage, file_storage, purge_images

FIXTURES = (ceph_cluster, ceph_storage, file_storage)  # imported for pytest to find them

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 8 * MiB


class Names:
    """Image names unique to one test, so a failed test leaves nothing the next one trips on."""

    def __init__(self) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:8]}-"

    def __call__(self, name: str) -> str:
        return self.prefix + name


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture(params=["ceph", "file"])
def storage(request: pytest.FixtureRequest, names: Names) -> Iterator[Storage]:
    drv: Storage = request.getfixturevalue(f"{request.param}_storage")
    yield drv
    purge_images(drv, names.prefix)


def golden(storage: Storage, name: str, size: int = SIZE) -> bytes:
    """An image with a recognisable pattern at the start, a block in the middle and at the end."""
    storage.create_image(name, size)
    head = os.urandom(64 * 1024)
    storage.write(name, 0, head)
    storage.write(name, size // 2, b"middle" * 100)
    storage.write(name, size - 4096, b"\xee" * 4096)
    return head


def protected_snapshot(storage: Storage, image: str, snap: str = "snap") -> None:
    storage.create_snapshot(image, snap)
    storage.protect_snapshot(image, snap)


# --- images --------------------------------------------------------------------------
def test_create_list_exists_size(storage: Storage, names: Names) -> None:
    a, b = names("a"), names("b")
    assert not storage.image_exists(a)
    storage.create_image(a, SIZE)
    storage.create_image(b, 4 * MiB)
    assert storage.image_exists(a)
    assert {a, b} <= set(storage.list_images())
    assert storage.image_size(a) == SIZE
    assert storage.image_size(b) == 4 * MiB
    storage.remove_image(b)
    assert not storage.image_exists(b)
    assert b not in storage.list_images()
    assert a in storage.list_images()


def test_new_image_reads_zeros_and_write_reads_back(storage: Storage, names: Names) -> None:
    img = names("rw")
    storage.create_image(img, SIZE)
    assert storage.read(img, 0, 4096) == b"\0" * 4096
    data = os.urandom(10000)
    storage.write(img, 12345, data)
    assert storage.read(img, 12345, len(data)) == data
    assert storage.read(img, 12345 - 5, 5) == b"\0" * 5  # neighbours untouched
    storage.write(img, SIZE - 3, b"end")
    assert storage.read(img, SIZE - 3, 3) == b"end"


# --- snapshots -----------------------------------------------------------------------
def test_snapshot_create_list_remove(storage: Storage, names: Names) -> None:
    img = names("s")
    storage.create_image(img, SIZE)
    assert storage.list_snapshots(img) == []
    storage.create_snapshot(img, "one")
    storage.create_snapshot(img, "two")
    assert sorted(storage.list_snapshots(img)) == ["one", "two"]
    storage.remove_snapshot(img, "one")
    assert storage.list_snapshots(img) == ["two"]
    storage.remove_snapshot(img, "two")
    assert storage.list_snapshots(img) == []
    storage.remove_image(img)
    assert not storage.image_exists(img)


def test_protect_unprotect_idempotent(storage: Storage, names: Names) -> None:
    img = names("p")
    storage.create_image(img, SIZE)
    storage.create_snapshot(img, "snap")
    assert storage.is_protected(img, "snap") is False
    storage.protect_snapshot(img, "snap")
    storage.protect_snapshot(img, "snap")
    assert storage.is_protected(img, "snap") is True
    storage.unprotect_snapshot(img, "snap")
    storage.unprotect_snapshot(img, "snap")
    assert storage.is_protected(img, "snap") is False
    storage.remove_snapshot(img, "snap")


# --- clones --------------------------------------------------------------------------
def test_clone_reads_parent_bytes(storage: Storage, names: Names) -> None:
    parent, child = names("golden"), names("node1")
    head = golden(storage, parent)
    protected_snapshot(storage, parent)
    storage.clone(parent, "snap", child)
    assert storage.image_size(child) == SIZE
    assert storage.read(child, 0, len(head)) == head
    assert storage.read(child, SIZE // 2, 600) == b"middle" * 100
    assert storage.read(child, SIZE - 4096, 4096) == b"\xee" * 4096
    assert storage.parent_info(child) == (parent, "snap")
    assert storage.parent_info(parent) is None


def test_clone_writes_do_not_touch_parent_or_snapshot(storage: Storage, names: Names) -> None:
    parent, child, witness = names("golden"), names("node1"), names("witness")
    head = golden(storage, parent)
    protected_snapshot(storage, parent)
    storage.clone(parent, "snap", child)
    storage.write(child, 0, b"X" * 8192)
    storage.write(child, SIZE - 10, b"Y" * 10)
    assert storage.read(child, 0, 8192) == b"X" * 8192
    assert storage.read(parent, 0, len(head)) == head
    assert storage.read(parent, SIZE - 10, 10) == b"\xee" * 10
    # A fresh clone shows what the snapshot holds.
    storage.clone(parent, "snap", witness)
    assert storage.read(witness, 0, len(head)) == head
    assert storage.read(witness, SIZE - 10, 10) == b"\xee" * 10


def test_snapshot_is_point_in_time(storage: Storage, names: Names) -> None:
    parent, witness = names("golden"), names("witness")
    head = golden(storage, parent)
    protected_snapshot(storage, parent)
    storage.write(parent, 0, b"after" * 1000)  # after the snapshot
    assert storage.read(parent, 0, 5) == b"after"
    storage.clone(parent, "snap", witness)
    assert storage.read(witness, 0, len(head)) == head


def test_list_children(storage: Storage, names: Names) -> None:
    parent = names("golden")
    golden(storage, parent)
    protected_snapshot(storage, parent, "s1")
    protected_snapshot(storage, parent, "s2")
    assert storage.list_children(parent, "s1") == []
    storage.clone(parent, "s1", names("c1"))
    storage.clone(parent, "s1", names("c2"))
    storage.clone(parent, "s2", names("c3"))
    assert storage.list_children(parent, "s1") == sorted([names("c1"), names("c2")])
    assert storage.list_children(parent, "s2") == [names("c3")]
    storage.remove_image(names("c2"))
    assert storage.list_children(parent, "s1") == [names("c1")]


def test_flatten_cuts_parent_and_keeps_data(storage: Storage, names: Names) -> None:
    parent, child = names("golden"), names("node1")
    head = golden(storage, parent)
    protected_snapshot(storage, parent)
    storage.clone(parent, "snap", child)
    storage.write(child, 4096, b"mine" * 1024)
    storage.flatten(child)
    assert storage.parent_info(child) is None
    assert storage.list_children(parent, "snap") == []
    # The parent can now go away completely; the child keeps every byte.
    storage.unprotect_snapshot(parent, "snap")
    storage.remove_snapshot(parent, "snap")
    storage.remove_image(parent)
    assert storage.read(child, 0, 4096) == head[:4096]
    assert storage.read(child, 4096, 4096) == b"mine" * 1024
    assert storage.read(child, 8192, len(head) - 8192) == head[8192:]
    assert storage.read(child, SIZE // 2, 600) == b"middle" * 100
    assert storage.read(child, SIZE - 4096, 4096) == b"\xee" * 4096
    storage.flatten(child)  # no-op on a non-clone
    assert storage.parent_info(child) is None


def test_flatten_with_progress_reports_stops_and_resumes(storage: Storage, names: Names) -> None:
    parent, child = names("golden"), names("node1")
    head = golden(storage, parent)
    protected_snapshot(storage, parent)
    storage.clone(parent, "snap", child)
    calls: list[tuple[int, int]] = []

    def stop_at_once(done: int, total: int) -> bool:
        calls.append((done, total))
        return True

    with pytest.raises(FlattenCancelled):
        storage.flatten_with_progress(child, stop_at_once)
    assert calls and storage.parent_info(child) == (parent, "snap")  # stopped: still a clone
    assert storage.read(child, 0, len(head)) == head
    seen: list[tuple[int, int]] = []
    storage.flatten_with_progress(child, lambda d, t: bool(seen.append((d, t))))  # runs again: resumes
    assert storage.parent_info(child) is None and storage.list_children(parent, "snap") == []
    assert seen and seen[-1][0] == seen[-1][1] and storage.read(child, 0, len(head)) == head
    storage.flatten_with_progress(child, lambda d, t: True)  # a non-clone: nothing to do, not even to stop
    assert storage.background_flatten is isinstance(storage, CephStorage)


# --- the error contract -----------------------------------------------------------------
def test_errors_missing_image(storage: Storage, names: Names) -> None:
    ghost = names("ghost")
    calls = [
        lambda: storage.remove_image(ghost),
        lambda: storage.image_size(ghost),
        lambda: storage.read(ghost, 0, 1),
        lambda: storage.write(ghost, 0, b"x"),
        lambda: storage.list_snapshots(ghost),
        lambda: storage.create_snapshot(ghost, "s"),
        lambda: storage.parent_info(ghost),
        lambda: storage.flatten(ghost),
        lambda: storage.clone(ghost, "s", names("child")),
    ]
    for call in calls:
        with pytest.raises(ImageNotFound) as info:
            call()
        assert ghost in str(info.value)
    assert not storage.image_exists(names("child"))


def test_errors_missing_snapshot(storage: Storage, names: Names) -> None:
    img = names("img")
    storage.create_image(img, SIZE)
    calls = [
        lambda: storage.remove_snapshot(img, "nope"),
        lambda: storage.protect_snapshot(img, "nope"),
        lambda: storage.unprotect_snapshot(img, "nope"),
        lambda: storage.is_protected(img, "nope"),
        lambda: storage.list_children(img, "nope"),
        lambda: storage.clone(img, "nope", names("child")),
    ]
    for call in calls:
        with pytest.raises(SnapshotNotFound) as info:
            call()
        assert img in str(info.value)
    assert not storage.image_exists(names("child"))


def test_errors_exists(storage: Storage, names: Names) -> None:
    img, other = names("img"), names("other")
    storage.create_image(img, SIZE)
    storage.create_image(other, SIZE)
    with pytest.raises(ImageExists, match=img):
        storage.create_image(img, SIZE)
    storage.create_snapshot(img, "snap")
    with pytest.raises(SnapshotExists, match=img):
        storage.create_snapshot(img, "snap")
    storage.protect_snapshot(img, "snap")
    with pytest.raises(ImageExists, match=other):
        storage.clone(img, "snap", other)
    assert storage.parent_info(other) is None


def test_errors_busy(storage: Storage, names: Names) -> None:
    img, child = names("img"), names("child")
    storage.create_image(img, SIZE)
    storage.create_snapshot(img, "snap")
    with pytest.raises(ImageBusy, match=img):
        storage.remove_image(img)  # has a snapshot
    with pytest.raises(ImageBusy, match=img):
        storage.clone(img, "snap", child)  # snapshot not protected
    assert not storage.image_exists(child)
    storage.protect_snapshot(img, "snap")
    with pytest.raises(ImageBusy, match=img):
        storage.remove_snapshot(img, "snap")  # protected
    storage.clone(img, "snap", child)
    with pytest.raises(ImageBusy, match=img):
        storage.unprotect_snapshot(img, "snap")  # has a clone
    assert storage.is_protected(img, "snap")
    assert storage.image_exists(img) and storage.list_snapshots(img) == ["snap"]


def test_errors_range(storage: Storage, names: Names) -> None:
    img = names("img")
    storage.create_image(img, 4 * MiB)
    with pytest.raises(InvalidInput):
        storage.read(img, 4 * MiB - 1, 2)
    with pytest.raises(InvalidInput):
        storage.write(img, 4 * MiB, b"x")
    assert storage.read(img, 4 * MiB - 1, 1) == b"\0"


def test_remove_64mib_image(storage: Storage, names: Names) -> None:
    img = names("big")
    storage.create_image(img, 64 * MiB)
    storage.write(img, 0, b"a" * MiB)
    storage.write(img, 63 * MiB, b"z" * MiB)
    assert storage.read(img, 64 * MiB - 1, 1) == b"z"
    storage.remove_image(img)
    assert not storage.image_exists(img)
    with pytest.raises(ImageNotFound):
        storage.image_size(img)


# --- driver specifics -------------------------------------------------------------------
def test_backing_ceph(ceph_storage: CephStorage, ceph_cluster: CephCluster) -> None:
    b = ceph_storage.backing("img1")
    assert (b.bstype, b.path) == ("rbd", f"{ceph_cluster.pool}/img1")
    assert b.bsopts == f"conf={ceph_cluster.conf};id=admin"


def test_ceph_images_are_format2_layering_clones(ceph_storage: CephStorage, ceph_cluster: CephCluster,
                                                 names: Names) -> None:
    parent, child = names("golden"), names("node1")
    try:
        golden(ceph_storage, parent)
        protected_snapshot(ceph_storage, parent)
        ceph_storage.clone(parent, "snap", child)
        info = ceph_cluster.rbd("info", f"{ceph_cluster.pool}/{child}")
        assert "format: 2" in info
        assert "features: layering\n" in info
        assert f"parent: {ceph_cluster.pool}/{parent}@snap" in info
        assert ceph_cluster.rbd("children", f"{ceph_cluster.pool}/{parent}@snap").split() == [
            f"{ceph_cluster.pool}/{child}"]
    finally:
        purge_images(ceph_storage, names.prefix)


def test_ceph_watched_image_is_busy(ceph_storage: CephStorage, ceph_cluster: CephCluster, names: Names) -> None:
    img = names("watched")
    ceph_storage.create_image(img, SIZE)
    # Another client holding the image open (as tgtd does while exporting it) is a watcher.
    other = rados.Rados(conffile=ceph_cluster.conf, rados_id="admin")
    other.connect(timeout=30)
    try:
        ioctx = other.open_ioctx(ceph_cluster.pool)
        opened = rbd.Image(ioctx, img)
        try:
            with pytest.raises(ImageBusy, match=img):
                ceph_storage.remove_image(img)
        finally:
            opened.close()
            ioctx.close()
    finally:
        other.shutdown()
    ceph_storage.remove_image(img)
    assert not ceph_storage.image_exists(img)


def test_ceph_unreachable_cluster_is_storage_error(tmp_path: os.PathLike[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(str(tmp_path), "dead.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(f"[global]\nmon host = 127.0.0.1:{port}\nauth client required = none\n")
    dead = CephStorage("rbd", conf, timeout=2)
    with pytest.raises(StorageError, match="cannot connect"):
        dead.list_images()
    dead.close()


def _child_list(storage: CephStorage, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        queue.put(storage.list_images())
    except Exception as exc:  # noqa: BLE001  (report, do not hang the parent)
        queue.put(repr(exc))


def test_ceph_connection_shared_and_renewed_after_fork(ceph_cluster: CephCluster, names: Names) -> None:
    from ims.einstein.storage import ceph as ceph_mod

    first, second = ceph_cluster.storage(), ceph_cluster.storage()
    img = names("shared")
    first.create_image(img, 4 * MiB)
    try:
        assert img in second.list_images()
        assert len([k for k in ceph_mod._CONNECTIONS if k[0] == ceph_cluster.conf]) == 1
        conn = ceph_mod._CONNECTIONS[(ceph_cluster.conf, "admin", ceph_cluster.keyring)]
        assert conn.pid == os.getpid()
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_list, args=(first, queue))
        proc.start()
        result = queue.get(timeout=60)
        proc.join(timeout=30)
        assert proc.exitcode == 0
        assert isinstance(result, list) and img in result, result
        assert img in first.list_images()  # the parent's connection still works
    finally:
        first.remove_image(img)


def test_describe_reads_snapshots_and_parent_at_once(storage: Storage, names: Names) -> None:
    """What a removal reads first (ims/einstein/ops/purge.py): None for a missing image."""
    assert storage.describe(names("ghost")) is None
    golden(storage, names("g"))
    assert storage.describe(names("g")) == ([], None)
    storage.create_snapshot(names("g"), "s")
    storage.protect_snapshot(names("g"), "s")
    storage.clone(names("g"), "s", names("c"))
    storage.create_snapshot(names("c"), "k")
    assert storage.describe(names("g")) == (["s"], None)
    assert storage.describe(names("c")) == (["k"], (names("g"), "s"))
    storage.flatten(names("c"))
    assert storage.describe(names("c")) == (["k"], None)


def test_a_removal_cut_after_the_header_is_finished(ceph_storage: CephStorage, ceph_cluster: CephCluster) -> None:
    """A SIGKILL inside librbd's remove, after the header object went but before the pool directory's
    entry did, leaves a name `rbd ls` lists but nothing opens (`rbd ls -l` then fails on it; found by the
    chaos run).  describe() says "gone"; finish_removal() clears the entry, once."""
    name = f"halfgone-{uuid.uuid4().hex[:8]}"
    ceph_storage.create_image(name, 8 << 20)
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"{ceph_cluster.pool}/{name}"))
    execute("rados", "-p", ceph_cluster.pool, "rm", f"rbd_header.{info['id']}", env=ceph_cluster.env, timeout=60)
    assert name in ceph_cluster.rbd("ls", ceph_cluster.pool).split()
    assert ceph_storage.describe(name) is None and not ceph_storage.image_exists(name)
    with pytest.raises(CommandFailed):  # what the chaos checker met
        ceph_cluster.rbd("ls", "-l", ceph_cluster.pool)
    assert ceph_storage.finish_removal(name) is True
    assert name not in ceph_cluster.rbd("ls", ceph_cluster.pool).split()
    ceph_cluster.rbd("ls", "-l", ceph_cluster.pool)  # lists again
    assert ceph_storage.finish_removal(name) is False

"""FileStorage specifics: on-disk layout, sparseness, read-only snapshots, metadata, locking, names."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from ims.common.errors import ImageBusy, InvalidName, SnapshotExists, StorageError
from ims.einstein.storage.file import FileStorage, sparse_copy

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> FileStorage:
    return FileStorage(str(tmp_path / "store"))


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_layout_and_backing_is_a_plain_file(store: FileStorage) -> None:
    store.create_image("golden", 16 * MiB)
    backing = store.backing("golden")
    assert backing.bstype == "rdwr"
    assert os.path.isabs(backing.path)
    assert backing.path == os.path.join(store.root, "images", "golden.img")
    assert stat.S_ISREG(os.stat(backing.path).st_mode)
    assert os.path.getsize(backing.path) == 16 * MiB
    assert backing.bsopts is None
    # What tgtd writes to the file is what the driver reads.
    with open(backing.path, "r+b") as f:
        f.seek(MiB)
        f.write(b"from-tgtd")
    assert store.read("golden", MiB, 9) == b"from-tgtd"


def test_new_image_is_sparse(store: FileStorage) -> None:
    store.create_image("big", 256 * MiB)
    assert allocated(store.backing("big").path) < MiB


def test_snapshot_and_clone_stay_sparse(store: FileStorage) -> None:
    store.create_image("g", 256 * MiB)
    store.write("g", 0, b"a" * 65536)
    store.write("g", 200 * MiB, b"b" * 65536)
    store.create_snapshot("g", "s")
    store.protect_snapshot("g", "s")
    store.clone("g", "s", "c")
    snap_file = os.path.join(store.root, "snaps", "g@s.img")
    for path in (snap_file, store.backing("c").path):
        assert os.path.getsize(path) == 256 * MiB
        assert allocated(path) < 4 * MiB, path
    assert store.read("c", 200 * MiB, 65536) == b"b" * 65536
    assert store.read("c", 100 * MiB, 4096) == b"\0" * 4096


def test_sparse_copy_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"x" * 5000)
        f.seek(64 * MiB - 3)
        f.write(b"end")
    dst = tmp_path / "dst"
    sparse_copy(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert allocated(str(dst)) < 2 * MiB
    with pytest.raises(FileExistsError):
        sparse_copy(str(src), str(dst))  # never overwrites


def test_snapshot_file_is_read_only(store: FileStorage) -> None:
    store.create_image("g", 4 * MiB)
    store.create_snapshot("g", "s")
    mode = os.stat(os.path.join(store.root, "snaps", "g@s.img")).st_mode
    assert mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0
    store.remove_snapshot("g", "s")
    assert not os.path.exists(os.path.join(store.root, "snaps", "g@s.img"))


def test_metadata_is_json_and_shared_between_instances(store: FileStorage) -> None:
    store.create_image("g", 4 * MiB)
    store.create_snapshot("g", "s")
    store.protect_snapshot("g", "s")
    store.clone("g", "s", "c")
    with open(os.path.join(store.root, "meta", "c.json"), encoding="utf-8") as f:
        assert json.load(f)["parent"] == ["g", "s"]
    other = FileStorage(store.root)
    assert other.parent_info("c") == ("g", "s")
    assert other.is_protected("g", "s")
    assert other.list_children("g", "s") == ["c"]
    with pytest.raises(ImageBusy):
        other.unprotect_snapshot("g", "s")
    # No temp files left behind by the atomic updates.
    leftovers = [n for d in ("images", "snaps", "meta") for n in os.listdir(os.path.join(store.root, d))
                 if n.startswith(".")]
    assert leftovers == []


def test_removing_a_clone_frees_the_snapshot(store: FileStorage) -> None:
    store.create_image("g", 4 * MiB)
    store.create_snapshot("g", "s")
    store.protect_snapshot("g", "s")
    store.clone("g", "s", "c")
    store.remove_image("c")
    assert store.list_children("g", "s") == []
    assert not os.path.exists(os.path.join(store.root, "meta", "c.json"))
    store.unprotect_snapshot("g", "s")
    store.remove_snapshot("g", "s")
    store.remove_image("g")
    assert store.list_images() == []


def test_orphan_metadata_is_not_an_image_or_child(store: FileStorage) -> None:
    # A crash between the clone's metadata and its rename leaves only a meta file.
    store.create_image("g", 4 * MiB)
    store.create_snapshot("g", "s")
    store.protect_snapshot("g", "s")
    with open(os.path.join(store.root, "meta", "ghost.json"), "w", encoding="utf-8") as f:
        json.dump({"parent": ["g", "s"], "snapshots": []}, f)
    assert store.list_images() == ["g"]
    assert store.list_children("g", "s") == []
    store.unprotect_snapshot("g", "s")
    store.create_image("ghost", MiB)  # the name is usable, with fresh metadata
    assert store.parent_info("ghost") is None


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x@y", "a\nb", "-rf"])
def test_names_are_validated_before_paths(store: FileStorage, bad: str) -> None:
    with pytest.raises(InvalidName):
        store.create_image(bad, MiB)
    with pytest.raises(InvalidName):
        store.image_exists(bad)
    store.create_image("ok", MiB)
    with pytest.raises(InvalidName):
        store.create_snapshot("ok", bad)
    assert os.listdir(os.path.join(store.root, "snaps")) == []


def test_unusable_root_is_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        FileStorage(str(blocker / "store"))


def _snapshot_worker(root: str, snap: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        FileStorage(root).create_snapshot("g", snap)
        queue.put("ok")
    except SnapshotExists:
        queue.put("exists")
    except Exception as exc:  # noqa: BLE001  (report anything else to the test)
        queue.put(repr(exc))


def test_processes_share_one_store_safely(store: FileStorage) -> None:
    store.create_image("g", 8 * MiB)
    store.write("g", 0, b"data")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # Eight processes: four distinct snapshot names, each raced by two creators.
    procs = [ctx.Process(target=_snapshot_worker, args=(store.root, f"s{i % 4}", queue)) for i in range(8)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == ["exists"] * 4 + ["ok"] * 4
    assert sorted(store.list_snapshots("g")) == ["s0", "s1", "s2", "s3"]

"""What uploads need from every storage driver (ceph on a real throwaway cluster, file on tmp):
renaming an image and writing several extents in one call."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ims.common.errors import ImageExists, ImageNotFound, InvalidInput
from ims.einstein.storage.base import Storage
from tests.support.ceph import ceph_cluster, ceph_storage, file_storage, purge_images

FIXTURES = (ceph_cluster, ceph_storage, file_storage)  # imported for pytest to find them

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(params=["ceph", "file"])
def storage(request: pytest.FixtureRequest) -> Iterator[tuple[Storage, str]]:
    drv: Storage = request.getfixturevalue(f"{request.param}_storage")
    prefix = f"x{uuid.uuid4().hex[:8]}-"
    yield drv, prefix
    purge_images(drv, prefix)


def test_write_extents_then_rename_keeps_the_data(storage: tuple[Storage, str]) -> None:
    st, p = storage
    a, b = p + "staging", p + "final"
    st.create_image(a, 8 * MiB)
    one, two = os.urandom(70_000), os.urandom(5000)
    st.write_extents(a, [(0, one), (6 * MiB + 17, two)])
    st.rename_image(a, b)
    assert not st.image_exists(a) and st.image_exists(b) and st.image_size(b) == 8 * MiB
    assert st.read(b, 0, len(one)) == one and st.read(b, 6 * MiB + 17, len(two)) == two
    assert st.read(b, 4 * MiB, 4096) == bytes(4096)
    # a snapshot and a clone work on the renamed image (what commit does next)
    st.create_snapshot(b, "snap")
    st.protect_snapshot(b, "snap")
    st.clone(b, "snap", p + "clone")
    assert st.read(p + "clone", 0, len(one)) == one


def test_rename_and_write_extents_refuse_what_they_must(storage: tuple[Storage, str]) -> None:
    st, p = storage
    st.create_image(p + "a", MiB)
    st.create_image(p + "b", MiB)
    with pytest.raises(ImageExists):
        st.rename_image(p + "a", p + "b")
    with pytest.raises(ImageNotFound):
        st.rename_image(p + "missing", p + "c")
    with pytest.raises(InvalidInput):
        st.write_extents(p + "a", [(0, b"x"), (MiB - 1, b"yy")])
    assert st.image_exists(p + "a") and st.image_exists(p + "b") and not st.image_exists(p + "c")

"""Uploads at the operations layer against REAL parts (a throwaway Ceph cluster or the file driver, a
private tgtd, the HIL simulator, SQLite on disk): a commit cut at any step leaves nothing, an abandoned
upload is rolled back (its owner dead, or idle), and the name is locked while an upload runs."""
from __future__ import annotations

import os
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from ims.common.errors import BMIError, ImageExists, InvalidName, NodeBusy
from ims.database.models import Lock, Operation
from ims.einstein.journal import current_owner
from ims.einstein.ops.transfer import UploadGone
from tests.integration.test_operations_real import UID, USER, RealEnv

pytestmark = pytest.mark.integration

MiB = 1 << 20
DATA = os.urandom(100_000)


@pytest.fixture(params=["ceph", "file"])
def env(request: pytest.FixtureRequest, tmp_path: Any, ceph_cluster: Any, tgtd: Any, hil_sim: Any) -> Any:
    e = RealEnv(tmp_path, request.param, ceph_cluster, tgtd, hil_sim)
    yield e
    e.close()


def staging(env: Any) -> list[str]:
    return [n for n in env.ops.storage.list_images() if n.startswith(f"{UID}img-up-")]


def unfinished(env: Any) -> list[tuple[int, str, str]]:
    with env.ops.journal.session() as s:
        return [(o.id, o.kind, o.state) for o in s.scalars(select(Operation).where(
            Operation.kind.like("upload%"), Operation.state.in_(("running", "failed")))).all()]


def locks(env: Any) -> list[str]:
    with env.ops.journal.session() as s:
        return list(s.scalars(select(Lock.name)).all())


def begin(env: Any, name: str, owner: str | None = None, size: int = 8 * MiB) -> int:
    up = env.ops.upload_begin(USER, "bmi_infra", name, size, owner or current_owner())
    env.ops.upload_write(USER, "bmi_infra", up["id"], [[0, DATA], [5 * MiB, DATA]])
    return int(up["id"])


def dead_owner() -> str:
    """The owner string of a process that has exited (like a killed Picasso)."""
    proc = subprocess.Popen(["sleep", "60"])
    with open(f"/proc/{proc.pid}/stat", encoding="ascii") as fh:
        start = fh.read().rsplit(")", 1)[1].split()[19]
    proc.kill()
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{start}"


def assert_clean(env: Any, before: dict) -> None:
    assert env.state() == before and staging(env) == [] and unfinished(env) == [] and locks(env) == []


@pytest.mark.parametrize("step,phase", [("db.insert_image", "after"), ("storage.rename", "before"),
                                        ("storage.rename", "after"), ("storage.snapshot_copy", "after"),
                                        ("storage.protect_copy", "after"), ("upload.done", "before")])
def test_a_commit_cut_at_any_step_leaves_nothing(env: Any, step: str, phase: str) -> None:
    before = env.state()
    up = begin(env, "up-img")
    assert len(staging(env)) == 1 and "image:bmi_infra/up-img" in locks(env)

    def hook(name: str, when: str) -> None:
        if (name, when) == (step, phase):
            raise RuntimeError("injected")

    env.ops.journal.fault_hook = hook
    try:
        with pytest.raises(RuntimeError):
            env.ops.upload_commit(USER, "bmi_infra", up, current_owner())
    finally:
        env.ops.journal.fault_hook = None
    assert_clean(env, before)
    # and the name is free again
    ok = begin(env, "up-img")
    assert env.ops.upload_commit(USER, "bmi_infra", ok, current_owner()) == {"name": "up-img", "size": 8 * MiB}
    assert env.ops.list_images(USER, "bmi_infra").count("up-img") == 1
    assert staging(env) == [] and locks(env) == []
    ceph = next(n for n in env.ops.storage.list_images() if n.startswith(f"{UID}img") and n[len(UID) + 3:].isdigit())
    assert env.ops.storage.read(ceph, 5 * MiB, len(DATA)) == DATA and env.ops.storage.is_protected(ceph, "snapshot")


def test_an_upload_whose_owner_died_is_rolled_back_by_recovery_and_by_the_next_user(env: Any) -> None:
    before = env.state()
    begin(env, "up-a", owner=dead_owner())
    begin(env, "up-b", owner=dead_owner())
    assert len(staging(env)) == 2
    # the next user of the name takes the dead owner's lock over and rolls its upload back first
    fresh = begin(env, "up-a")
    assert len(staging(env)) == 2  # up-b's and the fresh one (up-a's first one is gone)
    env.ops.upload_abort(USER, "bmi_infra", fresh, current_owner())
    # journal recovery (Einstein's start, every [journal] retry_seconds) rolls back the other
    summary = env.ops.recover()
    assert [e["kind"] for e in summary["rolled_back"]] == ["upload"]
    assert_clean(env, before)


def test_an_idle_upload_is_reaped_and_its_chunks_then_refused(env: Any) -> None:
    before = env.state()
    up = begin(env, "up-idle")  # its owner (this process) is alive: only idleness can end it
    assert env.ops.recover()["uploads_reaped"] == []
    with env.ops.journal.session() as s:
        s.execute(update(Operation).where(Operation.id == up).values(
            updated_at=datetime.now(UTC) - timedelta(seconds=601)))  # [rest_api] upload_idle_seconds = 600
    assert env.ops.recover()["uploads_reaped"] == [up]
    assert_clean(env, before)
    with pytest.raises(UploadGone):
        env.ops.upload_write(USER, "bmi_infra", up, [[0, DATA]])
    with pytest.raises(UploadGone):
        env.ops.upload_commit(USER, "bmi_infra", up, current_owner())
    assert env.ops.upload_abort(USER, "bmi_infra", up, current_owner()) is False


def test_names_sizes_and_the_lock_are_checked(env: Any) -> None:
    before = env.state()
    with pytest.raises(InvalidName):
        env.ops.upload_begin(USER, "bmi_infra", f"{UID}img-up-x", MiB, current_owner())
    with pytest.raises(BMIError) as too_big:
        env.ops.upload_begin(USER, "bmi_infra", "big", 64 * 1024 ** 3 + 1, current_owner())
    assert too_big.value.status == 413
    with pytest.raises(BMIError) as empty:
        env.ops.upload_begin(USER, "bmi_infra", "empty", 0, current_owner())
    assert empty.value.status == 400
    up = begin(env, "up-x")
    with pytest.raises(NodeBusy) as busy:  # a second upload (or an import) of the name while one runs
        env.ops.upload_begin(USER, "bmi_infra", "up-x", MiB, current_owner())
    assert "upload in progress" in busy.value.message
    with pytest.raises(BMIError) as outside:  # a write past the image's end
        env.ops.upload_write(USER, "bmi_infra", up, [[8 * MiB - 10, DATA]])
    assert outside.value.status == 400
    with pytest.raises(UploadGone):  # another owner cannot commit it
        env.ops.upload_commit(USER, "bmi_infra", up, dead_owner())
    assert env.ops.upload_abort(USER, "bmi_infra", up, current_owner()) is True
    assert_clean(env, before)
    # an existing image name
    env.ops.import_image(USER, "bmi_infra", "bmi-test-image")
    with pytest.raises(ImageExists):
        env.ops.upload_begin(USER, "bmi_infra", "bmi-test-image", MiB, current_owner())
    assert staging(env) == [] and unfinished(env) == [] and locks(env) == []

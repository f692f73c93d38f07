"""``bmi upload`` / ``bmi download`` against a real stack (Ceph, Einstein's Pyro4 workers, Picasso under
waitress, the HIL simulator), started by scripts/bmi-stack: round trips, sparseness, qcow2, the checks
every endpoint makes, a bounded memory, and interrupted uploads (client, Picasso or Einstein killed)
leaving nothing behind.  The tests run in file order: the last ones change the stack's config."""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.stack import BMI, Stack, running_stack

UID = "112233445566778899"
STAGING = f"{UID}img-up-"
ADMIN = ("haasadmin", "admin1234")
TENANT2 = ("tenant2", "secret2")
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as handle:
        yield handle


# --- helpers ---------------------------------------------------------------------------------------
def make_image(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> str:
    """A sparse file of ``size`` bytes with pseudo-random data at each ``(offset, length)``; its SHA-256."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i, (offset, length) in enumerate(extents):
            block = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (length // 32 + 1)
            fh.seek(offset)
            fh.write(block[:length])
    return sha256(path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(4 * MiB):
            digest.update(data)
    return digest.hexdigest()


def config(stack: Stack) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(stack.env["BMI_CONFIG"])
    return cfg


def set_config(stack: Stack, section: str, key: str, value: str) -> None:
    cfg = config(stack)
    if not cfg.has_section(section):
        cfg.add_section(section)
    cfg.set(section, key, value)
    with open(stack.env["BMI_CONFIG"], "w") as fh:
        cfg.write(fh)


def query(stack: Stack, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(config(stack).get("db", "path"), timeout=30) as conn:
        return conn.execute(sql, params).fetchall()


def staging_images(stack: Stack) -> list[str]:
    return [n for n in stack.rbd("ls").split() if n.startswith(STAGING)]


def upload_rows(stack: Stack, state: str = "running") -> list[tuple]:
    return query(stack, "SELECT id, owner FROM operation WHERE kind LIKE 'upload%' AND state = ?", state)


def assert_nothing_left(stack: Stack, name: str) -> None:
    assert query(stack, "SELECT id FROM image WHERE name = ?", name) == []
    assert staging_images(stack) == []
    assert upload_rows(stack) == [] and upload_rows(stack, "failed") == []
    assert query(stack, "SELECT name FROM lock WHERE name LIKE 'image:%'") == []
    assert [name] not in [r.split("|")[1:2] for r in stack.bmi("ls", "bmi_infra").stdout.split("\n")]


def url(stack: Stack, img: str, project: str = "bmi_infra") -> str:
    return f"{stack.url}/v1/projects/{project}/images/{img}/content"


def tenant(stack: Stack) -> tuple[str, str]:
    return stack.env["HIL_USERNAME"], stack.env["HIL_PASSWORD"]


def pid_of(stack: Stack, service: str) -> int:
    return int((stack.dir / "pids" / f"{service}.pid").read_text())


def workers(stack: Stack) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid_of(stack, "einstein")), "-f", "spawn_main"], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def start_upload(stack: Stack, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([BMI, "upload", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=stack.env)


def wait_for(what: str, check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def big_image(tmp_path: Path, size: int, per_chunk: int) -> tuple[Path, str]:
    """``size`` bytes where every 4 MiB chunk starts with ``per_chunk`` bytes of data (nothing is skipped)."""
    path = tmp_path / "big.raw"
    return path, make_image(path, size, [(off, per_chunk) for off in range(0, size, 4 * MiB)])


# --- round trips --------------------------------------------------------------------------------------
def test_raw_upload_with_holes_is_sparse_provisionable_and_downloads_equal(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    digest = make_image(src, 48 * MiB, [(0, 300_000), (5 * MiB + 4096, 70_000), (40 * MiB, 1 * MiB)])
    done = stack.bmi("upload", "bmi_infra", "up-raw", str(src))
    assert done.stdout == "Success\n" and f"sha256 {digest}" in done.stderr
    assert "upload up-raw: 100%" in done.stderr  # plain progress lines (stderr is not a terminal)
    assert "up-raw" in stack.bmi("ls", "bmi_infra").stdout
    ceph = query(stack, "SELECT id FROM image WHERE name = 'up-raw' AND kind = 'golden'")
    assert len(ceph) == 1
    ceph_name = f"{UID}img{ceph[0][0]}"
    # sparse: only the objects holding data are stored
    usage = {(e["name"], e.get("snapshot")): e for e in json.loads(stack.rbd("du", "--format", "json"))["images"]}
    snap = usage[(ceph_name, "snapshot")]
    assert snap["provisioned_size"] == 48 * MiB and 0 < snap["used_size"] <= 12 * MiB
    assert staging_images(stack) == [] and upload_rows(stack) == []
    assert query(stack, "SELECT kind, state FROM operation WHERE kind LIKE 'upload%'")[-1] == ("upload-commit", "done")

    # usable like an imported image: a node boots a clone of it
    assert stack.bmi("pro", "bmi_infra", "bmi_node", "up-raw", "bmi_network", "bmi_port").stdout == "Success\n"
    (clone,), = query(stack, "SELECT id FROM image WHERE name = 'bmi_node' AND kind = 'node'")
    assert any(t.endswith(f"{UID}img{clone}") for t in stack.targets())
    live = requests.get(url(stack, "bmi_node"), auth=tenant(stack), timeout=60)  # a node's live disk
    assert live.status_code == 409 and live.json()["error"]["type"] == "WrongKind"
    assert stack.bmi("dpro", "bmi_infra", "bmi_node", "bmi_network", "bmi_port").stdout == "Success\n"

    out = tmp_path / "back.raw"
    got = stack.bmi("download", "bmi_infra", "up-raw", str(out))
    assert got.stdout == "Success\n" and f"sha256 {digest}" in got.stderr
    assert sha256(out) == digest and out.stat().st_size == 48 * MiB
    assert out.stat().st_blocks * 512 < 4 * MiB  # the holes stay holes
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_qcow2_upload_stores_the_raw_content(stack: Stack, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    digest = make_image(raw, 24 * MiB, [(MiB, 2 * MiB), (20 * MiB + 512, 4096)], seed=2)
    qcow2 = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    assert qcow2.read_bytes()[:4] == b"QFI\xfb" and sha256(qcow2) != digest
    done = stack.bmi("--json", "upload", "bmi_infra", "up-qcow2", str(qcow2))
    result = json.loads(done.stdout)["result"]
    assert result["sha256"] == digest and result["size"] == 24 * MiB and result["name"] == "up-qcow2"
    assert result["written"] == 2 * MiB + 64 * 1024  # only the blocks with data were sent on
    out = tmp_path / "back.raw"
    got = json.loads(stack.bmi("--json", "download", "bmi_infra", "up-qcow2", str(out)).stdout)["result"]
    assert got["sha256"] == digest == sha256(out)


# --- the checks every endpoint makes -----------------------------------------------------------------------
def test_bad_names_other_tenants_and_bad_requests_are_json_errors_and_change_nothing(stack: Stack,
                                                                                      tmp_path: Path) -> None:
    src = tmp_path / "small.raw"
    digest = make_image(src, MiB, [(0, 1000)], seed=3)
    before = (stack.rbd("ls"), query(stack, "SELECT id, name, project_id, kind FROM image ORDER BY id"))
    body = src.read_bytes()
    octet = {"Content-Type": "application/octet-stream"}

    def put(img: str, auth: tuple[str, str] | None = tenant(stack), headers: dict[str, str] = octet,
            data: object = body, project: str = "bmi_infra", status: int = 400, kind: str | None = None) -> None:
        resp = requests.put(url(stack, img, project), data=data, auth=auth, headers=headers, timeout=120)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["status"] == status and error["message"]
        if kind:
            assert error["type"] == kind

    put(f"{UID}img7", kind="InvalidName")                       # BMI's own namespace
    put(f"{UID}img-up-0123456789abcdef", kind="InvalidName")    # ... including its staging images
    put("-bad", kind="InvalidName")
    put("ok", project="bad project", kind="InvalidName")
    put("ok", auth=None, status=401)
    put("ok", auth=("haas", "wrong"), status=401)
    put("ok", auth=TENANT2, status=401, kind="AuthenticationFailed")  # not a member of bmi_infra (as HIL says)
    put("ok", headers={"Content-Type": "application/json"}, status=415)
    put("ok", headers={**octet, "X-BMI-SHA256": "0" * 64}, status=409, kind="ChecksumMismatch")
    put("ok", headers={**octet, "X-BMI-SHA256": "xyz"}, kind="InvalidInput")
    put("ok", data=b"", kind="InvalidInput")
    resp = requests.put(url(stack, "ok") + "?x=1", data=body, auth=tenant(stack), headers=octet, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "InvalidInput"
    cli = stack.bmi("upload", "bmi_infra", f"{UID}img7", str(src), check=False)
    assert cli.returncode == 1 and "reserved" in cli.stderr and cli.stdout == ""
    assert (stack.rbd("ls"), query(stack, "SELECT id, name, project_id, kind FROM image ORDER BY id")) == before
    assert_nothing_left(stack, "ok")

    # a chunked body works too (waitress has the whole body, so its size, before Picasso reads it);
    # a name that exists: 409, the image untouched
    good = requests.put(url(stack, "small"), data=iter([body[:1000], body[1000:]]), auth=tenant(stack),
                        headers={**octet, "X-BMI-SHA256": digest}, timeout=60)
    assert good.status_code == 201 and good.json()["result"]["sha256"] == digest
    put("small", data=bytes(MiB), status=409, kind="ImageExists")
    assert requests.get(url(stack, "small"), auth=tenant(stack), timeout=60).content == body
    # other tenants cannot read it; a name that does not exist is a 404
    other = requests.get(url(stack, "small"), auth=TENANT2, timeout=60)
    assert other.status_code == 401 and "no access to project bmi_infra" in other.json()["error"]["message"]
    missing = requests.get(url(stack, "nothing-here"), auth=tenant(stack), timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "ImageNotFound"
    assert staging_images(stack) == [] and upload_rows(stack) == []


# --- bounded memory ----------------------------------------------------------------------------------------
def test_a_large_upload_and_download_do_not_grow_picasso_or_einstein_with_the_file(stack: Stack,
                                                                                    tmp_path: Path) -> None:
    size = 2 * 1024 * MiB
    src, digest = big_image(tmp_path, size, 256 * 1024)  # 512 chunks with data: each one crosses the RPC
    pids = {"picasso": pid_of(stack, "picasso"), **{f"einstein-worker-{p}": p for p in workers(stack)}}
    assert len(pids) == 3
    before = {name: memory_kib(pid) for name, pid in pids.items()}
    done = stack.bmi("--json", "upload", "bmi_infra", "up-big", str(src), timeout=1200)
    assert json.loads(done.stdout)["result"]["sha256"] == digest
    out = tmp_path / "big.back"
    stack.bmi("download", "bmi_infra", "up-big", str(out), timeout=1200)
    assert sha256(out) == digest
    after = {name: memory_kib(pid) for name, pid in pids.items()}
    for name in pids:
        # the peak resident size during the upload and the download, against the resident size before them
        growth = (after[name]["VmHWM"] - before[name]["VmRSS"]) * 1024
        assert growth < size // 16, f"{name} grew by {growth} bytes for a {size}-byte upload and download"
    out.unlink()
    stack.bmi("rm", "bmi_infra", "up-big")


# --- interrupted uploads ---------------------------------------------------------------------------------
def test_killing_the_client_mid_upload_leaves_nothing(stack: Stack, tmp_path: Path) -> None:
    src, _digest = big_image(tmp_path, 1024 * MiB, 64 * 1024)
    proc = start_upload(stack, "bmi_infra", "up-cut", str(src))
    assert proc.stderr is not None
    for line in proc.stderr:
        if "upload up-cut: 30%" in line:
            break
    proc.kill()
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert_nothing_left(stack, "up-cut")
    # the name is free: an upload under it works
    small = tmp_path / "small.raw"
    make_image(small, MiB, [(0, 10)])
    assert stack.bmi("upload", "bmi_infra", "up-cut", str(small)).stdout == "Success\n"
    stack.bmi("rm", "bmi_infra", "up-cut")


def _kill_while_storing(stack: Stack, tmp_path: Path, name: str, victim: str) -> subprocess.Popen[str]:
    """Start an upload and SIGKILL ``victim`` (a stack service) while Einstein writes the staging image."""
    src, _ = big_image(tmp_path, 1024 * MiB, 1 * MiB)
    proc = start_upload(stack, "bmi_infra", name, str(src))
    wait_for("the upload to reach Einstein", lambda: upload_rows(stack) and staging_images(stack), timeout=600)
    os.killpg(pid_of(stack, victim), signal.SIGKILL)
    proc.wait(300)
    assert proc.returncode == 1 if victim == "einstein" else proc.returncode != 0
    return proc


def test_killing_picasso_mid_upload_is_rolled_back(stack: Stack, tmp_path: Path) -> None:
    # Einstein's periodic recovery ([journal] retry_seconds) would roll the dead Picasso's upload back at
    # some moment of its own; off here, so this test sees the next user of the name do it (and the test
    # after this one the periodic recovery).
    set_config(stack, "journal", "retry_seconds", "0")
    stack.restart("einstein")
    _kill_while_storing(stack, tmp_path, "up-picasso", "picasso")
    stack.restart("picasso")
    (op_id, _owner), = upload_rows(stack)  # still there: its owner (the old Picasso) is dead
    assert len(staging_images(stack)) == 1
    # The next user of the name takes over the dead owner's lock and rolls its upload back first.
    small = tmp_path / "small.raw"
    digest = make_image(small, 2 * MiB, [(MiB, 5000)], seed=9)
    assert stack.bmi("upload", "bmi_infra", "up-picasso", str(small)).stdout == "Success\n"
    assert query(stack, "SELECT state FROM operation WHERE id = ?", op_id) == [("rolled_back",)]
    assert staging_images(stack) == [] and upload_rows(stack) == []
    out = tmp_path / "back.raw"
    stack.bmi("download", "bmi_infra", "up-picasso", str(out))
    assert sha256(out) == digest
    stack.bmi("rm", "bmi_infra", "up-picasso")
    assert_nothing_left(stack, "up-picasso")


def test_periodic_recovery_rolls_back_the_upload_of_a_dead_picasso(stack: Stack, tmp_path: Path) -> None:
    set_config(stack, "journal", "retry_seconds", "1")
    stack.restart("einstein")
    _kill_while_storing(stack, tmp_path, "up-picasso2", "picasso")
    (op_id,), = query(stack, "SELECT id FROM operation WHERE kind LIKE 'upload%' AND args LIKE '%up-picasso2%'")
    # no one uses the name, and Picasso stays down: Einstein's own round finds the owner dead
    wait_for("the dead Picasso's upload to be rolled back",
             lambda: query(stack, "SELECT state FROM operation WHERE id = ?", op_id) == [("rolled_back",)],
             timeout=120)
    stack.restart("picasso")
    assert_nothing_left(stack, "up-picasso2")


def test_killing_einstein_mid_upload_is_rolled_back_once_idle(stack: Stack, tmp_path: Path) -> None:
    set_config(stack, "rest_api", "upload_idle_seconds", "2")
    set_config(stack, "journal", "retry_seconds", "2")
    stack.restart("einstein")
    proc = _kill_while_storing(stack, tmp_path, "up-einstein", "einstein")
    assert proc.stderr is not None and "back-end" in proc.stderr.read()
    assert len(upload_rows(stack)) == 1  # Picasso could not abort it: Einstein was gone
    stack.restart("einstein")
    # idle for [rest_api] upload_idle_seconds: journal recovery rolls it back (a staging image the killed
    # worker still watched is removed once Ceph lets its watch expire)
    wait_for("the idle upload to be rolled back",
             lambda: not upload_rows(stack) and not upload_rows(stack, "failed") and not staging_images(stack),
             timeout=180)
    assert_nothing_left(stack, "up-einstein")


# --- size limit (changes the stack's config: last) -----------------------------------------------------------
def test_uploads_larger_than_max_upload_bytes_are_refused(stack: Stack, tmp_path: Path) -> None:
    set_config(stack, "rest_api", "max_upload_bytes", str(MiB))
    stack.restart("picasso")
    src = tmp_path / "over.raw"
    make_image(src, MiB + 1, [(0, 100)])
    resp = requests.put(url(stack, "too-big"), data=src.read_bytes(), auth=tenant(stack),
                        headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "PayloadTooLarge" and "max_upload_bytes" in resp.json()["error"]["message"]
    cli = stack.bmi("upload", "bmi_infra", "too-big", str(src), check=False)
    assert cli.returncode == 1 and "max_upload_bytes" in cli.stderr
    # far larger: waitress refuses it from its Content-Length, before reading the body (413, plain text)
    huge = tmp_path / "huge.raw"
    make_image(huge, 50 * MiB, [(0, 100)])
    cli = stack.bmi("upload", "bmi_infra", "too-big", str(huge), check=False)
    assert cli.returncode == 1 and "max_upload_bytes" in cli.stderr
    exact = tmp_path / "exact.raw"
    make_image(exact, MiB, [(0, 100)])
    assert stack.bmi("upload", "bmi_infra", "fits", str(exact)).stdout == "Success\n"
    assert_nothing_left(stack, "too-big")

"""Picasso through Flask's test client, backed by the REAL Operations over the fake drivers
(tests/support/fake_ops.py): the fixtures and helpers tests/unit/test_rest.py and test_ui.py share.

Use the fixtures by importing them (``from tests.support.web import rpc, world  # noqa: F401``)."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ims.common import config as bmi_config
from ims.picasso.app import create_app
from tests.support.fake_ops import InProcessClient, World


def cfg_text(auth_cache_seconds: int) -> str:
    """A Picasso config for the fake world (bodies up to 4096 bytes)."""
    return ("[bmi]\nuid = fake\n[net_isolator]\nurl = http://127.0.0.1:1\n"
            f"auth_cache_seconds = {auth_cache_seconds}\n[iscsi]\nip = 127.0.0.1\n[rest_api]\nmax_body_bytes = 4096\n")


def basic(user: str, password: str, encoding: str = "utf-8") -> dict[str, str]:
    """An HTTP Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode(encoding)).decode()}


# The fake world's users (tests/support/fake_ops.py): alice (proj1, proj2), bob (proj2), admin.
ALICE = basic("alice", "alice-pw")
BOB = basic("bob", "bob-pw")
ADMIN = basic("admin", "admin-pw")


def picasso_client(cfg: str, rpc: Any) -> Any:
    """Picasso's Flask test client with config text ``cfg``, calling Einstein through ``rpc``."""
    return create_app(bmi_config.parse("test.cfg", text=cfg), client=rpc).test_client()


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    w = World(directory=str(tmp_path / "world"))
    yield w
    w.close()


@pytest.fixture()
def rpc(world: World) -> InProcessClient:
    return InProcessClient(world.ops)

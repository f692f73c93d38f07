"""What Picasso and Einstein share about uploads and downloads: sizes, settings, zero detection.

Image data crosses the RPC in chunks of :data:`CHUNK` bytes (the RBD object size), so neither
process ever holds more than a few chunks of an image however large it is.  Within a chunk,
blocks of :data:`BLOCK` bytes that are all zeros are not sent and not written: the RBD image
stays sparse (``rbd du`` counts only what holds data).
"""
from __future__ import annotations

import base64
from typing import Any

from ims.common.errors import ConfigError, InvalidInput

CHUNK = 4 * 1024 * 1024
BLOCK = 64 * 1024
# One upload_write call carries at most this much data (Picasso sends one chunk per call).
MAX_WRITE = 4 * CHUNK

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 ** 3
DEFAULT_UPLOAD_IDLE_SECONDS = 600.0

_ZEROS = bytes(CHUNK)


def _setting(cfg: Any, key: str, kind: type, default: Any, minimum: float) -> Any:
    # Read from the section's raw values: these keys are documented in docs/configuration.md
    # ("Upload and download") and parsed here, where they are used.
    raw = cfg.section("rest_api").values.get(key, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{cfg.path}: invalid value {raw!r} for [rest_api] {key}") from None
    if value < minimum:
        raise ConfigError(f"{cfg.path}: invalid value {raw!r} for [rest_api] {key}: use {minimum} or more")
    return value


def max_upload_bytes(cfg: Any) -> int:
    """``[rest_api] max_upload_bytes``: the largest image ``bmi upload`` accepts (its raw size)."""
    return int(_setting(cfg, "max_upload_bytes", int, DEFAULT_MAX_UPLOAD_BYTES, 1))


def upload_idle_seconds(cfg: Any) -> float:
    """``[rest_api] upload_idle_seconds``: an upload that wrote nothing for this long is rolled back."""
    return float(_setting(cfg, "upload_idle_seconds", float, DEFAULT_UPLOAD_IDLE_SECONDS, 1.0))


def is_zero(data: bytes | memoryview) -> bool:
    view = memoryview(data)
    while len(view) > CHUNK:
        if view[:CHUNK] != _ZEROS:
            return False
        view = view[CHUNK:]
    return view == _ZEROS[:len(view)]


def nonzero_extents(data: bytes, offset: int, block: int = BLOCK) -> list[tuple[int, bytes]]:
    """``(offset, bytes)`` runs of ``data`` (which starts at ``offset``) made of blocks that are not all
    zeros; adjacent data blocks are merged into one run."""
    view = memoryview(data)
    runs: list[tuple[int, bytes]] = []
    start: int | None = None
    for pos in range(0, len(view), block):
        zero = is_zero(view[pos:pos + block])
        if not zero and start is None:
            start = pos
        elif zero and start is not None:
            runs.append((offset + start, bytes(view[start:pos])))
            start = None
    if start is not None:
        runs.append((offset + start, bytes(view[start:])))
    return runs


def as_bytes(value: Any) -> bytes:
    """Bytes sent over the RPC: Pyro4's serpent serializer delivers them as ``{"data": base64, "encoding":
    "base64"}``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("encoding") == "base64" and isinstance(value.get("data"), str):
        return base64.b64decode(value["data"])
    raise InvalidInput("image data must be bytes")

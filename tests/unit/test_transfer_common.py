"""ims.common.transfer: zero detection, the extents an upload sends, the RPC's bytes, the settings."""
from __future__ import annotations

import base64

import pytest

from ims.common import config as bmi_config
from ims.common import transfer as xfer
from ims.common.errors import ConfigError, InvalidInput

B = xfer.BLOCK


def test_nonzero_extents_skip_zero_blocks_and_merge_neighbours() -> None:
    data = bytearray(8 * B)
    data[5] = 1                  # block 0
    data[B + 7] = 2              # block 1 (merged with 0)
    data[4 * B + B - 1] = 3      # block 4 (alone)
    data[7 * B] = 4              # block 7 (the last)
    runs = xfer.nonzero_extents(bytes(data), 1000)
    assert [(o, len(d)) for o, d in runs] == [(1000, 2 * B), (1000 + 4 * B, B), (1000 + 7 * B, B)]
    assert b"".join(d for _, d in runs) == bytes(data[:2 * B]) + bytes(data[4 * B:5 * B]) + bytes(data[7 * B:])
    assert xfer.nonzero_extents(bytes(3 * B), 0) == []
    tail = bytes(B) + b"\x00" * 10 + b"x"  # a short last block
    assert xfer.nonzero_extents(tail, 0) == [(B, b"\x00" * 10 + b"x")]


def test_is_zero_on_any_length() -> None:
    assert xfer.is_zero(b"") and xfer.is_zero(bytes(xfer.CHUNK * 2 + 3))
    big = bytearray(xfer.CHUNK * 2 + 3)
    big[-1] = 1
    assert not xfer.is_zero(bytes(big))


def test_as_bytes_takes_raw_bytes_and_serpents_base64_form() -> None:
    assert xfer.as_bytes(b"abc") == b"abc"
    assert xfer.as_bytes({"data": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"}) == b"\x00\xff"
    with pytest.raises(InvalidInput):
        xfer.as_bytes("text")


def _cfg(rest_api: dict[str, str]) -> bmi_config.BMIConfig:
    return bmi_config.BMIConfig("t.cfg", {"rest_api": bmi_config.Section("rest_api", dict(rest_api))})


def test_settings_defaults_and_bad_values() -> None:
    cfg = _cfg({})
    assert xfer.max_upload_bytes(cfg) == 64 * 1024 ** 3 and xfer.upload_idle_seconds(cfg) == 600.0
    cfg = _cfg({"max_upload_bytes": "1048576", "upload_idle_seconds": "2.5"})
    assert xfer.max_upload_bytes(cfg) == 1048576 and xfer.upload_idle_seconds(cfg) == 2.5
    for value in ("lots", "0"):
        with pytest.raises(ConfigError):
            xfer.max_upload_bytes(_cfg({"max_upload_bytes": value}))

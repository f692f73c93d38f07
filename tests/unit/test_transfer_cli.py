"""The upload/download CLI's pieces that need no server: progress display, format detection, sparse writes."""
from __future__ import annotations

import io
from pathlib import Path

from ims.cli import transfer
from ims.common.transfer import BLOCK


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_tenths_otherwise() -> None:
    tty = Terminal()
    bar = transfer.Progress("upload img", 1000, tty)
    for _ in range(10):
        bar.add(100)
    bar.close()
    assert "upload img" in tty.getvalue() and "100%" in tty.getvalue()

    plain = io.StringIO()
    lines = transfer.Progress("download img", 1000, plain)
    for _ in range(40):
        lines.add(25)
    lines.close()
    shown = plain.getvalue().splitlines()
    assert len(shown) == 10 and shown[0].startswith("download img: 10% ") and shown[-1].startswith(
        "download img: 100% ")


def test_format_detection(tmp_path: Path) -> None:
    (tmp_path / "a.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    (tmp_path / "b.raw").write_bytes(b"\xebc\x90" + bytes(100))
    assert transfer.image_format(str(tmp_path / "a.qcow2")) == "qcow2"
    assert transfer.image_format(str(tmp_path / "b.raw")) == "raw"


def test_sparse_write_leaves_holes_and_keeps_the_size(tmp_path: Path) -> None:
    chunks = [bytes(4 * BLOCK), b"x" * 10 + bytes(BLOCK), bytes(8 * BLOCK)]
    path = tmp_path / "out"
    seen: list[int] = []
    with open(path, "wb") as fh:
        total = transfer._write_sparse(fh, iter(chunks), lambda d: seen.append(len(d)))
    assert total == sum(map(len, chunks)) == path.stat().st_size and seen == [len(c) for c in chunks]
    assert path.read_bytes() == b"".join(chunks)
    assert path.stat().st_blocks * 512 <= 2 * BLOCK  # only the block with data is allocated

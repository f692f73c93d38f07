"""``bmi upload PROJECT IMG FILE`` and ``bmi download PROJECT IMG FILE``: image data to and from BMI.

Both stream: memory stays at a chunk whatever the image size.  ``upload`` sends a raw image as it is
and converts a qcow2 image to raw first (``qemu-img convert`` into a sparse temporary file, on this
machine: ``--tmpdir``); BMI stores only the blocks that are not zeros.  ``download`` writes the raw
image (blocks of zeros as holes) to a temporary file next to FILE and renames it to FILE only once
every byte has arrived, so an interrupted download never leaves a partial FILE.

Progress goes to stderr (stdout keeps the guide's ``Success``): a bar when stderr is a terminal,
otherwise a line at every tenth of the image.  Both compare SHA-256 digests end to end: Picasso
answers an upload with the digest of what it received, which must equal the digest of what was sent.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import click
import requests

from ims.cli import output
from ims.cli.api import failure
from ims.cli.common import Ctx, command, q
from ims.common.errors import CommandFailed
from ims.common.process import execute
from ims.common.transfer import CHUNK, nonzero_extents

QCOW2_MAGIC = b"QFI\xfb"
CONVERT_TIMEOUT_SECONDS = 24 * 3600.0
# Connect quickly; then allow for Picasso storing a large image after its body has arrived.
TIMEOUTS = (30.0, 3600.0)


def register(cli: click.Group) -> None:
    """Add the commands to the ``bmi`` group (the one line ims/cli/main.py needs)."""
    cli.add_command(upload)
    cli.add_command(download)


def _url(api: Any, project: str, img: str) -> str:
    return f"{api.url}/v1{_path(project, img)}/content"


def _path(project: str, img: str) -> str:
    return f"/projects/{q(project)}/images/{q(img)}"


# Refused by the web server itself, before Picasso saw the body.
TOO_LARGE = {413: "BMI refused the image: it is larger than the server accepts ([rest_api] max_upload_bytes)"}


def _fail(resp: requests.Response, url: str) -> click.ClickException:
    try:
        data = resp.json()
    except ValueError:
        data = None
    return failure(resp, url, data, TOO_LARGE)


def _done(c: Ctx, sha256: str, result: dict[str, Any]) -> None:
    """``Success`` (the digest on stderr), or the result with --json."""
    if not c.as_json:
        click.echo(f"sha256 {sha256}", err=True)
    output.success(c.as_json, result)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Bytes moved: a bar on a terminal, else one line at every 10% (on stderr)."""

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label, self.total, self.done, self._tenth = label, total, 0, 0
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            self._bar = click.progressbar(length=max(total, 1), label=label, file=self.stream, show_percent=True,
                                          show_eta=True)
            self._bar.__enter__()

    def add(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        tenth = self.done * 10 // max(self.total, 1)
        if tenth > self._tenth:
            self._tenth = tenth
            click.echo(f"{self.label}: {tenth * 10}% ({_human(self.done)} of {_human(self.total)})", file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


class _Body:
    """The request body: the file in chunks, hashed and counted as requests sends it.  ``__len__`` makes
    requests send a Content-Length (the image size) instead of a chunked body."""

    def __init__(self, path: str, size: int, progress: Progress) -> None:
        self.path, self.size, self.progress = path, size, progress
        self.sha256 = hashlib.sha256()

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        left = self.size
        with open(self.path, "rb") as fh:
            while left > 0:
                data = fh.read(min(CHUNK, left))
                if not data:
                    raise click.ClickException(f"{self.path} shrank while it was being sent")
                left -= len(data)
                self.sha256.update(data)
                self.progress.add(len(data))
                yield data


def image_format(path: str) -> str:
    """``qcow2`` or ``raw`` (anything without the qcow2 magic is sent as it is)."""
    with open(path, "rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


@contextlib.contextmanager
def raw_image(path: str, fmt: str, tmpdir: str | None) -> Iterator[str]:
    """``path`` itself for a raw image; a qcow2 image converted to a sparse raw temporary file."""
    if fmt == "raw":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bmi-upload-", dir=tmpdir) as work:
        out = os.path.join(work, "image.raw")
        click.echo(f"converting {path} from {fmt} to raw (in {work})", err=True)
        try:
            execute("qemu-img", "convert", "-f", fmt, "-O", "raw", "--", path, out, timeout=CONVERT_TIMEOUT_SECONDS)
        except CommandFailed as exc:
            raise click.ClickException(f"cannot convert {path}: {exc.message}") from None
        yield out


@click.command("upload")
@command("project", "img")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--format", "fmt", type=click.Choice(["auto", "raw", "qcow2"]), default="auto", show_default=True,
              help="The file's format (auto: qcow2 if it starts with the qcow2 magic, else raw).")
@click.option("--tmpdir", type=click.Path(file_okay=False, exists=True, writable=True),
              help="Where a qcow2 image is converted to raw (default: $TMPDIR or /tmp); needs room for its data.")
def upload(c: Ctx, project: str, img: str, file: str, fmt: str, tmpdir: str | None) -> None:
    """Upload FILE (raw or qcow2) as image IMG of PROJECT.

    The image appears only once all of it is stored (an interrupted upload leaves nothing); blocks of
    zeros are not stored.  Prints Success (with --json: name, size, sha256 and the bytes stored)."""
    fmt = image_format(file) if fmt == "auto" else fmt
    with raw_image(file, fmt, tmpdir) as path:
        size = os.path.getsize(path)
        if size == 0:
            raise click.ClickException(f"{file} is empty")
        api = c.api
        url = _url(api, project, img)
        progress = Progress(f"upload {img}", size)
        body = _Body(path, size, progress)
        try:
            resp = api.session.put(url, data=body, auth=api.auth, timeout=TIMEOUTS,
                                   headers={"Content-Type": "application/octet-stream"})
        except requests.ConnectionError:
            raise click.ClickException(f"cannot reach BMI at {api.url}, or it closed the connection; nothing "
                                       "was stored unless `bmi ls` shows the image") from None
        except requests.Timeout:
            raise click.ClickException(f"BMI at {api.url} did not answer in time") from None
        finally:
            progress.close()
    if resp.status_code != 201:
        raise _fail(resp, url)
    result = resp.json().get("result") or {}
    sent = body.sha256.hexdigest()
    if result.get("sha256") != sent:
        # Cannot happen short of a broken proxy or disk; the image is not what FILE holds: remove it.
        api.delete(_path(project, img))
        raise click.ClickException(f"BMI received data with SHA-256 {result.get('sha256')}, not {sent}; "
                                   f"the image {img} is being removed")
    _done(c, sent, result)


def _write_sparse(fh: Any, chunks: Iterator[bytes], on_chunk: Callable[[bytes], None]) -> int:
    """Write ``chunks`` to ``fh``, leaving holes where blocks are zeros; the bytes received."""
    total = 0
    for data in chunks:
        on_chunk(data)
        for offset, extent in nonzero_extents(data, total):
            fh.seek(offset)
            fh.write(extent)
        total += len(data)
    fh.truncate(total)  # the holes up to the end (a file of zeros stays all hole)
    return total


@click.command("download")
@command("project", "img")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
def download(c: Ctx, project: str, img: str, file: str) -> None:
    """Download image (or snapshot) IMG of PROJECT into FILE as a raw image (holes for zeros).

    FILE is replaced only once the whole image has arrived.  Prints Success (with --json: name, size and
    sha256)."""
    api = c.api
    url = _url(api, project, img)
    try:
        resp = api.session.get(url, auth=api.auth, timeout=TIMEOUTS, stream=True)
    except requests.ConnectionError:
        raise click.ClickException(f"cannot reach BMI at {api.url}") from None
    except requests.Timeout:
        raise click.ClickException(f"BMI at {api.url} did not answer in time") from None
    with resp:
        if resp.status_code != 200:
            raise _fail(resp, url)
        size = int(resp.headers.get("Content-Length", "-1"))
        if size < 0:
            raise click.ClickException(f"BMI at {api.url} did not say how large the image is")
        target = os.path.abspath(file)
        fd, part = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".part",
                                    dir=os.path.dirname(target))
        digest = hashlib.sha256()
        progress = Progress(f"download {img}", size)

        def seen(data: bytes) -> None:
            digest.update(data)
            progress.add(len(data))

        try:
            with os.fdopen(fd, "wb") as fh:
                try:
                    total = _write_sparse(fh, resp.iter_content(CHUNK), seen)
                except (requests.RequestException, OSError) as exc:
                    raise click.ClickException(f"the download of {img} broke off: {exc}") from None
            if total != size:
                raise click.ClickException(f"the download of {img} broke off after {total} of {size} bytes")
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
        finally:
            progress.close()
    sha256 = digest.hexdigest()
    _done(c, sha256, {"name": img, "size": size, "sha256": sha256})

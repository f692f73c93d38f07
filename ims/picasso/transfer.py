"""Upload and download of image data: ``PUT`` / ``GET /v1/projects/<project>/images/<img>/content``.

The body is raw image bytes (``application/octet-stream``).  Picasso never holds more than one chunk
(ims.common.transfer.CHUNK) of it: it reads the body chunk by chunk, skips blocks of zeros (the image
stays sparse) and hands the rest to Einstein, which writes a staging image that becomes a golden image
of the project only when the whole body has arrived (ims/einstein/ops/transfer.py: all or nothing).
Waitress, Picasso's server, receives a request body completely before the application sees it and keeps
any body above 512 KiB in a temporary file, not in memory: a client that goes away mid-body therefore
never reaches Einstein at all.  Uploads have their own size limit, ``[rest_api] max_upload_bytes``,
instead of ``max_body_bytes``.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from ims.common import transfer as xfer
from ims.common.errors import BMIError, Conflict, InvalidInput
from ims.common.names import validate_name
from ims.einstein.journal import current_owner
from ims.picasso.auth import client, project_access
from ims.picasso.errors import error_response

LOG = logging.getLogger(__name__)

bp = Blueprint("transfer", __name__, url_prefix="/v1")

# Endpoints whose body is limited by [rest_api] max_upload_bytes, not max_body_bytes (app.py skips them).
OWN_LIMIT = frozenset({"transfer.upload"})
SHA256_HEADER = "X-BMI-SHA256"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# With nothing but zeros to send, still tell Einstein this often that the upload is alive.
_KEEPALIVE_SECONDS = 10.0


class ChecksumMismatch(Conflict):
    """The body is not what the client's X-BMI-SHA256 says (409: the request is well-formed)."""


def init(app: Flask, cfg: Any) -> None:
    """Register the routes (the one line app.py needs)."""
    app.extensions["bmi_transfer"] = {"max_upload_bytes": xfer.max_upload_bytes(cfg), "owner": current_owner()}
    app.register_blueprint(bp)


@bp.before_request
def refuse_query_parameters() -> None:
    if request.args:
        raise InvalidInput(f"unknown query parameter(s) {', '.join(repr(k[:64]) for k in list(request.args)[:5])}")


def _settings() -> dict[str, Any]:
    settings: dict[str, Any] = current_app.extensions["bmi_transfer"]
    return settings


def _read(stream: Any, size: int) -> bytes:
    """Exactly ``size`` bytes of the body, or fewer if it ends first."""
    parts, left = [], size
    while left > 0:
        data = stream.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


@bp.put("/projects/<project>/images/<img>/content")
def upload(project: str, img: str) -> Any:
    auth = project_access(project)
    validate_name(img, "image")
    size = request.content_length
    if size is None:
        return error_response(411, "LengthRequired", "send the image with a Content-Length header (its size)")
    if request.mimetype != "application/octet-stream":
        return error_response(415, "InvalidInput", "send the image as Content-Type: application/octet-stream")
    limit = _settings()["max_upload_bytes"]
    if size > limit:
        return error_response(413, "PayloadTooLarge",
                              f"the image ({size} bytes) is larger than {limit} bytes ([rest_api] max_upload_bytes)")
    if size == 0:
        raise InvalidInput("the image is empty")
    expected = request.headers.get(SHA256_HEADER)
    if expected is not None and not _SHA256_RE.fullmatch(expected.lower()):
        raise InvalidInput(f"{SHA256_HEADER} must be 64 hexadecimal digits")
    rpc, owner = client(), _settings()["owner"]
    upload_id = rpc.upload_begin(auth, project, img, size, owner)["id"]
    stream = request.environ["wsgi.input"]
    digest = hashlib.sha256()
    received = written = 0
    last_call = time.monotonic()
    try:
        while received < size:
            data = _read(stream, min(xfer.CHUNK, size - received))
            if not data:
                raise InvalidInput(f"the request body ended after {received} of {size} bytes")
            digest.update(data)
            extents = xfer.nonzero_extents(data, received)
            received += len(data)
            if extents or time.monotonic() - last_call > _KEEPALIVE_SECONDS:
                written += rpc.upload_write(auth, project, upload_id, [[o, d] for o, d in extents])
                last_call = time.monotonic()
        sha256 = digest.hexdigest()
        if expected is not None and expected.lower() != sha256:
            raise ChecksumMismatch(f"the image's SHA-256 is {sha256}, not the {expected.lower()} given in "
                                   f"{SHA256_HEADER}; nothing was stored")
        result = rpc.upload_commit(auth, project, upload_id, owner)
    except BaseException:
        try:
            rpc.upload_abort(auth, project, upload_id, owner)
        except BMIError as exc:  # recovery rolls it back later (dead owner or idle upload)
            LOG.warning("upload #%s could not be aborted now (%s); it is rolled back later", upload_id, exc)
        raise
    LOG.info("upload of %s/%s: %d bytes, %d written (the rest zeros)", project, img, size, written)
    resp = jsonify({"result": {**result, "sha256": sha256, "written": written}})
    resp.status_code = 201
    return resp


@bp.get("/projects/<project>/images/<img>/content")
def download(project: str, img: str) -> Any:
    auth = project_access(project)
    validate_name(img, "image")
    rpc = client()
    size = int(rpc.download_info(auth, project, img)["size"])

    def chunks() -> Iterator[bytes]:
        offset = 0
        try:
            while offset < size:
                length = min(xfer.CHUNK, size - offset)
                data = rpc.download_read(auth, project, img, offset, length)
                yield bytes(length) if data is None else xfer.as_bytes(data)
                offset += length
        except BMIError as exc:
            # The status line is sent: the client sees a body shorter than Content-Length.
            LOG.error("download of %s/%s stopped at byte %d: %s", project, img, offset, exc)

    resp = Response(chunks(), mimetype="application/octet-stream")
    resp.headers["Content-Length"] = str(size)
    resp.headers["Content-Disposition"] = f'attachment; filename="{img}.raw"'
    return resp

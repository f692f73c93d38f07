"""The OpenAPI description of the upload and download routes (ims/picasso/transfer.py).  No Flask here."""
from __future__ import annotations

from typing import Any

from ims.picasso.openapi import _ERR, _ERRORS, _param, name

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}}
_UPLOADED = {"type": "object", "required": ["name", "size", "sha256", "written"], "properties": {
    "name": name("image"), "size": {"type": "integer"}, "sha256": {"type": "string"},
    "written": {"type": "integer"}}}


def paths() -> dict[str, dict[str, Any]]:
    params = [_param("project"), _param("img")]
    return {"/v1/projects/{project}/images/{img}/content": {
        "put": {"operationId": "uploadImage",
                "summary": "Upload a raw image as a new golden image of the project (the body is the image; "
                           "Content-Length is its size, at most [rest_api] max_upload_bytes).  Blocks of zeros are "
                           "not stored.  All or nothing: the image exists only once the whole body has been "
                           "stored.  Optional header X-BMI-SHA256: the body's SHA-256 (409 ChecksumMismatch and "
                           "nothing stored when it differs)",
                "parameters": params + [{"name": "X-BMI-SHA256", "in": "header", "required": False,
                                         "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}],
                "requestBody": {"required": True, "content": _BINARY},
                "responses": {"201": {"description": "Created", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["result"], "properties": {"result": _UPLOADED},
                    "additionalProperties": False}}}},
                    **_ERRORS, "411": _ERR, "413": _ERR, "415": _ERR}},
        "get": {"operationId": "downloadImage",
                "summary": "Download an image or snapshot as raw bytes (Content-Length is its size; a body cut short "
                           "means the download failed).  409 for a provisioned node's or disk's live clone",
                "parameters": params,
                "responses": {"200": {"description": "The image's raw bytes", "content": _BINARY}, **_ERRORS}},
    }}

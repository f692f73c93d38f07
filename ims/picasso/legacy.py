"""The v0.6 / split-API form endpoints, kept for old scripts (form-encoded, ``Success`` bodies).

Errors here answer as the original did: the message as a plain-text body (ims/picasso/errors.py
decides by :func:`is_legacy_path`), with our corrected status codes; ``X-BMI-Error-Type`` names the
error class for scripts that want it.

They keep their synchronous contract: each mutation is submitted as an operation and waited on
(ims/picasso/operations.py ``run``) in calls that each return within seconds, so however long the
work takes the answer is ``Success`` (or the verb's error with its status), never an RPC timeout.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from ims.common.errors import InvalidInput
from ims.common.names import validate_name
from ims.picasso.auth import client, credentials, project_access
from ims.picasso.operations import run

bp = Blueprint("legacy", __name__)

# Every path of this API (filled by _route), to answer its errors in plain text even when no route
# matched (a wrong method is a 405 before any view runs).
PATHS: set[str] = set()


def _route(path: str, method: str) -> Any:
    PATHS.add(path.rstrip("/"))
    return bp.route(path, methods=[method])


def is_legacy_path(path: str) -> bool:
    """Whether ``path`` is one of the form API's (with or without its trailing slash)."""
    return path.rstrip("/") in PATHS

# form key -> the kind validate_name reports in its message
_KINDS = {"project": "project", "node": "node", "img": "image", "network": "network", "nic": "nic",
          "snap_name": "snapshot", "disk_name": "disk"}


def _form(key: str) -> str:
    value = request.form.get(key)
    if value is None:
        raise InvalidInput(f"missing form key '{key}'")
    return validate_name(value, _KINDS.get(key, key))


def _project() -> tuple[dict[str, str], str]:
    # Credentials first (401), then the project key (400), then access (403/404).
    credentials()
    project = _form("project")
    return project_access(project), project


def success() -> Response:
    return Response("Success", status=200, mimetype="text/plain")


def json_body(value: object) -> Response:
    return Response(json.dumps(value), status=200, mimetype="application/json")


@_route("/provision/", "PUT")
def provision() -> Response:
    auth, project = _project()
    if "disk_name" in request.form:  # split API: project, node, disk_name, nic
        run(auth, "provision_disk", project=project, node=_form("node"), disk=_form("disk_name"), nic=_form("nic"))
    else:
        run(auth, "provision", project=project, node=_form("node"), img=_form("img"), network=_form("network"),
            nic=_form("nic"))
    return success()


@_route("/deprovision/", "DELETE")
def deprovision() -> Response:
    auth, project = _project()
    if "network" in request.form:
        run(auth, "deprovision", project=project, node=_form("node"), network=_form("network"), nic=_form("nic"))
    else:  # split API: project, node, nic
        run(auth, "deprovision_disk", project=project, node=_form("node"), nic=_form("nic"))
    return success()


@_route("/create_snapshot/", "PUT")
def create_snapshot() -> Response:
    auth, project = _project()
    node = _form("disk_name") if "disk_name" in request.form and "node" not in request.form else _form("node")
    run(auth, "create_snapshot", project=project, node=node, snap_name=_form("snap_name"))
    return success()


@_route("/list_snapshots/", "POST")
def list_snapshots() -> Response:
    auth, project = _project()
    return json_body(client().list_snapshots(auth, project))


@_route("/list_images/", "POST")
def list_images() -> Response:
    auth, project = _project()
    return json_body(client().list_images(auth, project))


@_route("/remove_image/", "DELETE")
def remove_image() -> Response:
    auth, project = _project()
    run(auth, "remove_image", project=project, img=_form("img"))
    return success()


@_route("/create_disk", "PUT")
def create_disk() -> Response:
    auth, project = _project()
    return json_body(run(auth, "create_disk", project=project, disk=_form("disk_name"), img=_form("img")))


@_route("/delete_disk", "DELETE")
def delete_disk() -> Response:
    auth, project = _project()
    run(auth, "delete_disk", project=project, disk=_form("disk_name"))
    return success()

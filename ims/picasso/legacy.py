"""The v0.6 / split-API form endpoints, kept for old scripts (form-encoded, ``Success`` bodies)."""
from __future__ import annotations

import json

from flask import Blueprint, Response, request

from ims.common.errors import InvalidInput
from ims.common.names import validate_name
from ims.picasso.auth import client, credentials, project_access

bp = Blueprint("legacy", __name__)

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


@bp.route("/provision/", methods=["PUT"])
def provision() -> Response:
    auth, project = _project()
    if "disk_name" in request.form:  # split API: project, node, disk_name, nic
        client().provision_disk(auth, project, _form("node"), _form("disk_name"), _form("nic"))
    else:
        client().provision(auth, project, _form("node"), _form("img"), _form("network"), _form("nic"))
    return success()


@bp.route("/deprovision/", methods=["DELETE"])
def deprovision() -> Response:
    auth, project = _project()
    if "network" in request.form:
        client().deprovision(auth, project, _form("node"), _form("network"), _form("nic"))
    else:  # split API: project, node, nic
        client().deprovision_disk(auth, project, _form("node"), _form("nic"))
    return success()


@bp.route("/create_snapshot/", methods=["PUT"])
def create_snapshot() -> Response:
    auth, project = _project()
    node = _form("disk_name") if "disk_name" in request.form and "node" not in request.form else _form("node")
    client().create_snapshot(auth, project, node, _form("snap_name"))
    return success()


@bp.route("/list_snapshots/", methods=["POST"])
def list_snapshots() -> Response:
    auth, project = _project()
    return json_body(client().list_snapshots(auth, project))


@bp.route("/list_images/", methods=["POST"])
def list_images() -> Response:
    auth, project = _project()
    return json_body(client().list_images(auth, project))


@bp.route("/remove_image/", methods=["DELETE"])
def remove_image() -> Response:
    auth, project = _project()
    client().remove_image(auth, project, _form("img"))
    return success()


@bp.route("/create_disk", methods=["PUT"])
def create_disk() -> Response:
    auth, project = _project()
    return json_body(client().create_disk(auth, project, _form("disk_name"), _form("img")))


@bp.route("/delete_disk", methods=["DELETE"])
def delete_disk() -> Response:
    auth, project = _project()
    client().delete_disk(auth, project, _form("disk_name"))
    return success()

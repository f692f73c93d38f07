"""The v0.6 / split-API form endpoints, kept for old scripts (form-encoded, ``Success`` bodies).

They keep their synchronous contract: each mutation is submitted as an operation and waited on
(ims/picasso/operations.py ``wait``) in calls that each return within seconds, so however long the
work takes the answer is ``Success`` (or the verb's error with its status), never an RPC timeout.
"""
from __future__ import annotations

import json

from flask import Blueprint, Response, request

from ims.common.errors import InvalidInput
from ims.common.names import validate_name
from ims.picasso.auth import client, credentials, project_access
from ims.picasso.operations import submit, wait

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
        record = submit(auth, "provision_disk", project=project, node=_form("node"), disk=_form("disk_name"),
                        nic=_form("nic"))
    else:
        record = submit(auth, "provision", project=project, node=_form("node"), img=_form("img"),
                        network=_form("network"), nic=_form("nic"))
    wait(auth, record)
    return success()


@bp.route("/deprovision/", methods=["DELETE"])
def deprovision() -> Response:
    auth, project = _project()
    if "network" in request.form:
        record = submit(auth, "deprovision", project=project, node=_form("node"), network=_form("network"),
                        nic=_form("nic"))
    else:  # split API: project, node, nic
        record = submit(auth, "deprovision_disk", project=project, node=_form("node"), nic=_form("nic"))
    wait(auth, record)
    return success()


@bp.route("/create_snapshot/", methods=["PUT"])
def create_snapshot() -> Response:
    auth, project = _project()
    node = _form("disk_name") if "disk_name" in request.form and "node" not in request.form else _form("node")
    wait(auth, submit(auth, "create_snapshot", project=project, node=node, snap_name=_form("snap_name")))
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
    wait(auth, submit(auth, "remove_image", project=project, img=_form("img")))
    return success()


@bp.route("/create_disk", methods=["PUT"])
def create_disk() -> Response:
    auth, project = _project()
    return json_body(wait(auth, submit(auth, "create_disk", project=project, disk=_form("disk_name"),
                                       img=_form("img"))))


@bp.route("/delete_disk", methods=["DELETE"])
def delete_disk() -> Response:
    auth, project = _project()
    wait(auth, submit(auth, "delete_disk", project=project, disk=_form("disk_name")))
    return success()

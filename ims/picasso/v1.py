"""The JSON API under /v1: resources and verbs.  Bodies are JSON; answers ``{"result": ...}`` or 204."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from ims.common.errors import Forbidden, InvalidInput
from ims.common.names import validate_name
from ims.picasso.auth import admin_access, client, credentials, project_access

bp = Blueprint("v1", __name__, url_prefix="/v1")

_MISSING = object()


def _body() -> dict[str, Any]:
    if not request.content_length and not request.data:
        return {}
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


def _name(body: dict[str, Any], key: str, kind: str, default: Any = _MISSING) -> Any:
    if key not in body or body[key] is None:
        if default is _MISSING:
            raise InvalidInput(f"missing JSON key '{key}'")
        return default
    return validate_name(body[key], kind)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"'{key}' must be true or false")
    return value


def _int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"'{key}' must be a non-negative integer")
    return value


def _query_flag(key: str) -> bool:
    value = request.args.get(key, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidInput(f"query parameter '{key}' must be true or false")
    return value in ("true", "1", "yes")


def ok(result: Any = None, status: int = 200) -> tuple[Response, int]:
    return jsonify({"result": result}), status


def created(result: Any = None) -> tuple[Response, int]:
    return ok(result, 201)


def no_content() -> Response:
    return Response(status=204)


# --- projects ----------------------------------------------------------------------------
@bp.get("/projects")
def list_projects() -> Any:
    return ok(client().list_projects(credentials()))


@bp.post("/projects")
def create_project() -> Any:
    auth = admin_access()
    body = _body()
    client().create_project(auth, _name(body, "name", "project"), _name(body, "network", "network", None),
                            _int(body, "id"))
    return created()


@bp.delete("/projects/<project>")
def remove_project(project: str) -> Any:
    auth = admin_access()
    client().remove_project(auth, validate_name(project, "project"))
    return no_content()


# --- images --------------------------------------------------------------------------------
@bp.get("/projects/<project>/images")
def list_images(project: str) -> Any:
    return ok(client().list_images(project_access(project), project))


@bp.post("/projects/<project>/images")
def import_image(project: str) -> Any:
    auth = project_access(project)
    body = _body()
    client().import_image(auth, project, _name(body, "name", "image"), _name(body, "snapshot", "snapshot", None),
                          _flag(body, "protect"))
    return created()


@bp.delete("/projects/<project>/images/<img>")
def remove_image(project: str, img: str) -> Any:
    auth = project_access(project)
    client().remove_image(auth, project, validate_name(img, "image"))
    return no_content()


@bp.post("/projects/<project>/images/<img>/export")
def export_image(project: str, img: str) -> Any:
    auth = project_access(project)
    body = _body()
    client().export_image(auth, project, validate_name(img, "image"), _name(body, "name", "image"))
    return ok()


def _transfer(project: str, img: str, method: str) -> Any:
    auth = project_access(project)
    body = _body()
    dest = _name(body, "dest_project", "project")
    new_name = _name(body, "dest_name", "image", None)
    validate_name(img, "image")
    if dest != project and not client().is_admin(auth):
        raise Forbidden("copying or moving an image to another project needs a BMI administrator")
    project_access(dest)
    getattr(client(), method)(auth, project, img, dest, new_name)
    return created()


@bp.post("/projects/<project>/images/<img>/copy")
def copy_image(project: str, img: str) -> Any:
    return _transfer(project, img, "copy_image")


@bp.post("/projects/<project>/images/<img>/move")
def move_image(project: str, img: str) -> Any:
    return _transfer(project, img, "move_image")


# --- snapshots -------------------------------------------------------------------------------
@bp.get("/projects/<project>/snapshots")
def list_snapshots(project: str) -> Any:
    return ok(client().list_snapshots(project_access(project), project))


@bp.post("/projects/<project>/nodes/<node>/snapshots")
def create_snapshot(project: str, node: str) -> Any:
    auth = project_access(project)
    body = _body()
    client().create_snapshot(auth, project, validate_name(node, "node"), _name(body, "name", "snapshot"))
    return created()


@bp.delete("/projects/<project>/snapshots/<snap>")
def remove_snapshot(project: str, snap: str) -> Any:
    auth = project_access(project)
    client().remove_image(auth, project, validate_name(snap, "snapshot"))
    return no_content()


# --- nodes -------------------------------------------------------------------------------------
@bp.get("/projects/<project>/nodes")
def list_provisioned(project: str) -> Any:
    return ok(client().list_provisioned(project_access(project), project))


@bp.post("/projects/<project>/nodes/<node>/provision")
def provision(project: str, node: str) -> Any:
    """Body ``{"image", "network", "nic"}``, or ``{"disk", "nic"}`` for a disk made by POST .../disks."""
    auth = project_access(project)
    body = _body()
    validate_name(node, "node")
    if "disk" in body:
        client().provision_disk(auth, project, node, _name(body, "disk", "disk"), _name(body, "nic", "nic"))
    else:
        client().provision(auth, project, node, _name(body, "image", "image"), _name(body, "network", "network"),
                           _name(body, "nic", "nic"))
    return ok()


@bp.post("/projects/<project>/nodes/<node>/deprovision")
def deprovision(project: str, node: str) -> Any:
    """Body ``{"network", "nic"}``, or ``{"nic"}`` alone for a node provisioned from a disk."""
    auth = project_access(project)
    body = _body()
    validate_name(node, "node")
    if "network" in body:
        client().deprovision(auth, project, node, _name(body, "network", "network"), _name(body, "nic", "nic"))
    else:
        client().deprovision_disk(auth, project, node, _name(body, "nic", "nic"))
    return ok()


@bp.get("/projects/<project>/nodes/<node>/ip")
def node_ip(project: str, node: str) -> Any:
    auth = project_access(project)
    return ok(client().node_ip(auth, project, validate_name(node, "node")))


# --- iSCSI targets -------------------------------------------------------------------------------
@bp.get("/projects/<project>/iscsi")
def iscsi_list(project: str) -> Any:
    return ok(client().iscsi_list(project_access(project), project))


@bp.post("/projects/<project>/iscsi")
def iscsi_create(project: str) -> Any:
    auth = project_access(project)
    return created(client().iscsi_create(auth, project, _name(_body(), "image", "image")))


@bp.delete("/projects/<project>/iscsi/<img>")
def iscsi_remove(project: str, img: str) -> Any:
    auth = project_access(project)
    client().iscsi_remove(auth, project, validate_name(img, "image"))
    return no_content()


# --- disks (split API) -------------------------------------------------------------------------
@bp.get("/projects/<project>/disks")
def list_disks(project: str) -> Any:
    return ok(client().list_disks(project_access(project), project))


@bp.post("/projects/<project>/disks")
def create_disk(project: str) -> Any:
    auth = project_access(project)
    body = _body()
    return created(client().create_disk(auth, project, _name(body, "name", "disk"), _name(body, "image", "image")))


@bp.delete("/projects/<project>/disks/<disk>")
def delete_disk(project: str, disk: str) -> Any:
    auth = project_access(project)
    client().delete_disk(auth, project, validate_name(disk, "disk"))
    return no_content()


# --- the image database (bmi db ...) -------------------------------------------------------------
@bp.get("/db/images")
def db_list() -> Any:
    auth = credentials()
    project = request.args.get("project")
    if project is not None:
        project_access(project)
    name = request.args.get("name")
    ceph = request.args.get("ceph")
    rows = client().db_list(auth, snapshots=_query_flag("snapshots"), clones=_query_flag("clones"),
                            public=_query_flag("public"), project=project,
                            name=validate_name(name, "image") if name is not None else None,
                            ceph=validate_name(ceph, "image") if ceph is not None else None)
    return ok(rows)


@bp.post("/db/images")
def db_create() -> Any:
    auth = admin_access()
    body = _body()
    client().db_create(auth, _name(body, "project", "project"), _name(body, "name", "image"), _int(body, "id"),
                       _flag(body, "snapshot"), _name(body, "parent", "image", None), _flag(body, "public"))
    return created()


@bp.delete("/db/images/<project>/<img>")
def db_remove(project: str, img: str) -> Any:
    auth = admin_access()
    client().db_remove(auth, validate_name(project, "project"), validate_name(img, "image"))
    return no_content()


# --- administration ----------------------------------------------------------------------------------
@bp.post("/admin/reconcile")
def reconcile() -> Any:
    return ok(client().reconcile(admin_access(), repair=_flag(_body(), "repair")))


@bp.get("/openapi.json")
def openapi() -> Any:
    from ims.picasso.openapi import document

    return jsonify(document())

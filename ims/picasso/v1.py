"""The JSON API under /v1: resources and verbs.  Bodies are JSON; answers ``{"result": ...}`` or 204.

Request bodies are checked against the same specs the OpenAPI document is built from
(ims/picasso/openapi.py): unknown keys, wrong types, nulls where none is allowed and ids out of
bounds are a 400 that names the key, before anything reaches Einstein.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from ims.common.errors import Conflict, Forbidden, InvalidInput, NotFound
from ims.common.names import validate_name
from ims.picasso import openapi as spec
from ims.picasso.auth import admin_access, client, credentials, project_access
from ims.picasso.operations import MAX_BATCH, MAX_POLL_SECONDS, STATES, accepted, submit

bp = Blueprint("v1", __name__, url_prefix="/v1")

# the query parameters each route takes (the OpenAPI document lists them; any other is a 400)
_QUERY = {"v1.db_list": frozenset(spec.DB_LIST_FLAGS) | frozenset(spec.DB_LIST_NAMES),
          "v1.operation_show": frozenset({"wait"}), "v1.operation_list": frozenset({"state", "project"})}


@bp.before_request
def refuse_unknown_query_parameters() -> None:
    unknown = sorted(set(request.args) - _QUERY.get(request.endpoint or "", frozenset()))
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise InvalidInput(f"unknown query parameter(s) {shown}")


def _json() -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}``."""
    if not request.get_data(cache=True):
        return {}
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


def _check(body: spec.Body, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked against ``body``; absent optional keys come back as None (booleans: False)."""
    unknown = sorted(set(data) - set(body.props))
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise InvalidInput(f"unknown JSON key(s) {shown}; expected: {', '.join(body.props)}")
    out: dict[str, Any] = {}
    for key, (schema, kind) in body.props.items():
        value = data.get(key)
        if value is None:
            if key in body.required:
                raise InvalidInput(f"missing JSON key '{key}'")
            if key in data and not schema.get("nullable"):
                raise InvalidInput(f"'{key}' must not be null")
            out[key] = False if schema["type"] == "boolean" else None
        elif schema["type"] == "string":
            out[key] = validate_name(value, kind)
        elif schema["type"] == "boolean":
            if not isinstance(value, bool):
                raise InvalidInput(f"'{key}' must be true or false")
            out[key] = value
        else:  # integer
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not schema["minimum"] <= value <= schema["maximum"]:
                raise InvalidInput(f"'{key}' must be an integer from {schema['minimum']} to {schema['maximum']}")
            out[key] = value
    return out


def _body(body: spec.Body) -> dict[str, Any]:
    return _check(body, _json())


def _query_flag(key: str) -> bool:
    value = request.args.get(key, "false")
    if value not in ("true", "false"):
        raise InvalidInput(f"query parameter '{key}' must be true or false")
    return value == "true"


def ok(result: Any = None, status: int = 200) -> tuple[Response, int]:
    return jsonify({"result": result}), status


def created(result: Any = None) -> tuple[Response, int]:
    return ok(result, 201)


def no_content() -> Response:
    return Response(status=204)


# --- projects ----------------------------------------------------------------------------
@bp.get("/projects")
def list_projects() -> Any:
    return ok(client().list_projects(admin_access()))


@bp.post("/projects")
def create_project() -> Any:
    auth = admin_access()
    b = _body(spec.PROJECT_CREATE)
    client().create_project(auth, b["name"], b["network"], b["id"])
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
    b = _body(spec.IMPORT)
    return accepted(submit(auth, "import_image", project=project, img=b["name"], snap=b["snapshot"],
                           protect=b["protect"]))


@bp.delete("/projects/<project>/images/<img>")
def remove_image(project: str, img: str) -> Any:
    auth = project_access(project)
    return accepted(submit(auth, "remove_image", project=project, img=validate_name(img, "image")))


@bp.post("/projects/<project>/images/<img>/export")
def export_image(project: str, img: str) -> Any:
    auth = project_access(project)
    validate_name(img, "image")
    return accepted(submit(auth, "export_image", project=project, img=img, name=_body(spec.EXPORT)["name"]))


def _transfer(project: str, img: str, verb: str) -> Any:
    auth = project_access(project)
    validate_name(img, "image")
    b = _body(spec.TRANSFER)
    dest = b["dest_project"]
    if dest != project and not client().is_admin(auth):
        raise Forbidden("copying or moving an image to another project needs a BMI administrator")
    project_access(dest)
    return accepted(submit(auth, verb, src_project=project, img1=img, dest_project=dest, img2=b["dest_name"]))


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
    validate_name(node, "node")
    return accepted(submit(auth, "create_snapshot", project=project, node=node,
                           snap_name=_body(spec.SNAPSHOT)["name"]))


@bp.delete("/projects/<project>/snapshots/<snap>")
def remove_snapshot(project: str, snap: str) -> Any:
    auth = project_access(project)
    return accepted(submit(auth, "remove_image", project=project, img=validate_name(snap, "snapshot")))


# --- nodes -------------------------------------------------------------------------------------
@bp.get("/projects/<project>/nodes")
def list_provisioned(project: str) -> Any:
    return ok(client().list_provisioned(project_access(project), project))


@bp.post("/projects/<project>/nodes/<node>/provision")
def provision(project: str, node: str) -> Any:
    """Body ``{"image", "network", "nic"}``, or ``{"disk", "nic"}`` for a disk made by POST .../disks."""
    auth = project_access(project)
    validate_name(node, "node")
    data = _json()
    if "disk" in data:
        b = _check(spec.PROVISION_DISK, data)
        return accepted(submit(auth, "provision_disk", project=project, node=node, disk=b["disk"], nic=b["nic"]))
    b = _check(spec.PROVISION_IMAGE, data)
    return accepted(submit(auth, "provision", project=project, node=node, img=b["image"], network=b["network"],
                           nic=b["nic"]))


@bp.post("/projects/<project>/nodes/<node>/deprovision")
def deprovision(project: str, node: str) -> Any:
    """Body ``{"network", "nic"}``, or ``{"nic"}`` alone for a node provisioned from a disk."""
    auth = project_access(project)
    validate_name(node, "node")
    data = _json()
    if "network" in data:
        b = _check(spec.DEPROVISION_NETWORK, data)
        return accepted(submit(auth, "deprovision", project=project, node=node, network=b["network"],
                               nic=b["nic"]))
    b = _check(spec.DEPROVISION_DISK, data)
    return accepted(submit(auth, "deprovision_disk", project=project, node=node, nic=b["nic"]))


@bp.post("/projects/<project>/provisions")
def provision_batch(project: str) -> Any:
    """Body ``{"nodes": [{"node", "image", "network", "nic"}, ...]}`` (1 to MAX_BATCH nodes, each once):
    one operation per node, all queued or none (an invalid item is a 400 naming its index)."""
    return _provision_batch(project, _json(), ("nodes",))


@bp.post("/provisions")
def provisions() -> Any:
    """The same batch with the project in the body: ``{"project", "nodes": [...]}`` (issue 8's form)."""
    data = _json()
    project = data.get("project")
    if not isinstance(project, str):
        raise InvalidInput("'project' (the project the nodes are provisioned in) is required")
    return _provision_batch(project, data, ("nodes", "project"))


def _provision_batch(project: str, data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    auth = project_access(project)
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise InvalidInput(f"unknown JSON key(s) {', '.join(repr(k[:64]) for k in unknown[:5])}; expected: "
                           f"{', '.join(keys)}")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_BATCH:
        raise InvalidInput(f"'nodes' must be a list of 1 to {MAX_BATCH} objects {{node, image, network, nic}}")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(nodes):
        if not isinstance(item, dict):
            raise InvalidInput(f"nodes[{i}] must be a JSON object {{node, image, network, nic}}")
        try:
            b = _check(spec.BATCH_NODE, item)
        except InvalidInput as exc:
            raise InvalidInput(f"nodes[{i}]: {exc.message}") from None
        if b["node"] in seen:  # the document cannot say "unique by node": a conflict within the batch
            raise Conflict(f"nodes[{i}]: node {b['node']!r} appears more than once in the batch")
        seen.add(b["node"])
        items.append({"project": project, "node": b["node"], "img": b["image"], "network": b["network"],
                      "nic": b["nic"]})
    return accepted(client().submit_batch(auth, "provision", items))


@bp.get("/projects/<project>/nodes/<node>/ip")
def node_ip(project: str, node: str) -> Any:
    auth = project_access(project)
    return ok(client().node_ip(auth, project, validate_name(node, "node")))


# --- iSCSI targets (create and remove: administrators) -----------------------------------------------
@bp.get("/projects/<project>/iscsi")
def iscsi_list(project: str) -> Any:
    return ok(client().iscsi_list(project_access(project), project))


@bp.post("/projects/<project>/iscsi")
def iscsi_create(project: str) -> Any:
    auth = admin_access()
    validate_name(project, "project")
    return accepted(submit(auth, "iscsi_create", project=project, img=_body(spec.ISCSI_CREATE)["image"]))


@bp.delete("/projects/<project>/iscsi/<img>")
def iscsi_remove(project: str, img: str) -> Any:
    auth = admin_access()
    validate_name(project, "project")
    return accepted(submit(auth, "iscsi_remove", project=project, img=validate_name(img, "image")))


# --- disks (split API) -------------------------------------------------------------------------
@bp.get("/projects/<project>/disks")
def list_disks(project: str) -> Any:
    return ok(client().list_disks(project_access(project), project))


@bp.post("/projects/<project>/disks")
def create_disk(project: str) -> Any:
    auth = project_access(project)
    b = _body(spec.DISK_CREATE)
    return accepted(submit(auth, "create_disk", project=project, disk=b["name"], img=b["image"]))


@bp.delete("/projects/<project>/disks/<disk>")
def delete_disk(project: str, disk: str) -> Any:
    auth = project_access(project)
    return accepted(submit(auth, "delete_disk", project=project, disk=validate_name(disk, "disk")))


# --- asynchronous operations ------------------------------------------------------------------------
def _op_id(op_id: str) -> int:
    if not op_id.isdigit() or not 1 <= int(op_id) <= spec.MAX_ID:
        raise InvalidInput(f"operation id must be an integer from 1 to {spec.MAX_ID}")
    return int(op_id)


@bp.get("/operations/<op_id>")
def operation_show(op_id: str) -> Any:
    """One operation (404 when it does not exist or belongs to a project the caller may not use).
    ``?wait=N`` (0..MAX_POLL_SECONDS) waits up to N seconds for it to finish first (a long poll)."""
    auth = credentials()
    ident = _op_id(op_id)
    wait = request.args.get("wait", "0")
    if not wait.isdigit() or not 0 <= int(wait) <= MAX_POLL_SECONDS:
        raise InvalidInput(f"query parameter 'wait' must be an integer from 0 to {MAX_POLL_SECONDS}")
    if int(wait) > 0:
        return ok(client().operation_wait(auth, ident, float(wait)))
    return ok(client().operation_show(auth, ident))


@bp.get("/operations")
def operation_list() -> Any:
    """The newest operations the caller may see; ``?state=`` one of queued|running|done|failed, ``?project=``."""
    auth = credentials()
    state = request.args.get("state")
    if state is not None and state not in STATES:
        raise InvalidInput(f"query parameter 'state' must be one of {', '.join(STATES)}")
    project = request.args.get("project")
    if project is not None:
        project_access(project)
    return ok(client().operation_list(auth, state, project))


# --- the image database (bmi db ...) -------------------------------------------------------------
@bp.get("/db/images")
def db_list() -> Any:
    auth = credentials()
    flags = {f: _query_flag(f) for f in spec.DB_LIST_FLAGS}
    filters: dict[str, str | None] = {}
    for key, kind in spec.DB_LIST_NAMES.items():
        value = request.args.get(key)
        filters[key] = validate_name(value, kind) if value is not None else None
    if filters["project"] is not None:
        try:
            project_access(filters["project"])
        except NotFound:
            pass  # a BMI project HIL does not know (any more) stays listable: Einstein shows its rows to admins
    return ok(client().db_list(auth, **flags, **filters))


@bp.post("/db/images")
def db_create() -> Any:
    auth = admin_access()
    b = _body(spec.DB_CREATE)
    client().db_create(auth, b["project"], b["name"], b["id"], b["snapshot"], b["parent"], b["public"])
    return created()


@bp.delete("/db/images/<project>/<img>")
def db_remove(project: str, img: str) -> Any:
    auth = admin_access()
    client().db_remove(auth, validate_name(project, "project"), validate_name(img, "image"))
    return no_content()


# --- administration ----------------------------------------------------------------------------------
@bp.post("/admin/reconcile")
def reconcile() -> Any:
    auth = admin_access()
    return ok(client().reconcile(auth, repair=_body(spec.RECONCILE)["repair"]))


@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(spec.document())

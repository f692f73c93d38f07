"""The OpenAPI 3 description of the /v1 JSON API (served at GET /v1/openapi.json) and the request-body
specs that both the document and the service's own validation (ims/picasso/v1.py) are built from, so that
what the document allows and what the service accepts cannot drift apart.

No Flask import here: the CLI takes ``MAX_ID`` from this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ims.common.names import NAME_RE

# Ids a caller may choose (projects, image records).  SQLite's rowids end at 2^63-1 and an id near the
# top exhausts the counter for every later insert, so a reserve is kept: 1..2^62-1.
MAX_ID = 2**62 - 1



def name(kind: str) -> dict[str, Any]:
    """A BMI name.  The format ``bmi-<kind>`` is informative (the pattern is the rule); the fuzzer
    (benchmarks/fuzz.py) registers a strategy per kind that mixes the names a test stack knows with
    random ones."""
    return {"type": "string", "format": f"bmi-{kind}", "pattern": NAME_RE.pattern}


NAME_KINDS = ("project", "node", "image", "snapshot", "network", "nic", "disk", "export")
ID: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
BOOL: dict[str, Any] = {"type": "boolean"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


@dataclass(frozen=True)
class Body:
    """A JSON request body: key -> (schema, the kind named in error messages); ``required`` keys."""

    props: dict[str, tuple[dict[str, Any], str]]
    required: tuple[str, ...] = ()

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "properties": {k: s for k, (s, _) in self.props.items()},
                               "additionalProperties": False}
        if self.required:  # OpenAPI 3.0 forbids an empty "required" list
            out["required"] = list(self.required)
        return out


def _n(kind: str, null: bool = False) -> tuple[dict[str, Any], str]:
    """A body key holding a name of ``kind`` (``null``: may be null, as the CLI sends absent options)."""
    return (nullable(name(kind)) if null else name(kind)), kind


PROJECT_CREATE = Body({"name": _n("project"), "network": _n("network", True), "id": (nullable(ID), "project id")},
                      ("name",))
IMPORT = Body({"name": _n("image"), "snapshot": _n("snapshot", True), "protect": (BOOL, "")}, ("name",))
EXPORT = Body({"name": _n("export")}, ("name",))
TRANSFER = Body({"dest_project": _n("project"), "dest_name": _n("image", True)}, ("dest_project",))
SNAPSHOT = Body({"name": _n("snapshot")}, ("name",))
PROVISION_IMAGE = Body({"image": _n("image"), "network": _n("network"), "nic": _n("nic")}, ("image", "network", "nic"))
PROVISION_DISK = Body({"disk": _n("disk"), "nic": _n("nic")}, ("disk", "nic"))
DEPROVISION_NETWORK = Body({"network": _n("network"), "nic": _n("nic")}, ("network", "nic"))
DEPROVISION_DISK = Body({"nic": _n("nic")}, ("nic",))
ISCSI_CREATE = Body({"image": _n("image")}, ("image",))
DISK_CREATE = Body({"name": _n("disk"), "image": _n("image")}, ("name", "image"))
DB_CREATE = Body({"project": _n("project"), "name": _n("image"), "id": (nullable(ID), "image id"),
                  "snapshot": (BOOL, ""), "parent": _n("image", True), "public": (BOOL, "")}, ("project", "name"))
RECONCILE = Body({"repair": (BOOL, "")})
# One node of POST /v1/projects/{project}/provisions
BATCH_NODE = Body({"node": _n("node"), "image": _n("image"), "network": _n("network"), "nic": _n("nic")},
                  ("node", "image", "network", "nic"))
MAX_BATCH = 200  # nodes per batch (ims/picasso/operations.py uses the same bound)
OPERATION_STATES = ("queued", "running", "done", "failed")
MAX_POLL_SECONDS = 30

# Query parameters of GET /v1/db/images: booleans are exactly "true" or "false".
DB_LIST_FLAGS = ("snapshots", "clones", "public")
DB_LIST_NAMES = {"project": "project", "name": "image", "ceph": "image"}

_ERR = {"$ref": "#/components/responses/Error"}
# Every operation may answer these (403: an admin-only operation, or HIL refusing the node/project).
_ERRORS = {"400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR, "503": _ERR}
_TOO_LARGE = {"413": _ERR}


# path and query parameter -> the kind of name it holds
_PARAM_KINDS = {"project": "project", "img": "image", "snap": "snapshot", "node": "node", "disk": "disk",
                "name": "image", "ceph": "image"}


def _param(param: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": param, "in": where, "required": where == "path",
            "schema": schema or name(_PARAM_KINDS[param])}


def _result(schema: dict[str, Any], code: str = "200", text: str = "OK") -> dict[str, Any]:
    return {code: {"description": text, "content": {"application/json": {"schema": {
        "type": "object", "required": ["result"], "properties": {"result": schema},
        "additionalProperties": False}}}}}


def _op(op_id: str, summary: str, params: list[str], responses: dict[str, Any],
        body: Body | list[Body] | None = None, admin: bool = False,
        query: list[dict[str, Any]] | None = None, body_required: bool = True,
        links: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    if links:  # how to address what this operation created (used by the stateful fuzzer)
        code = next(iter(responses))
        # links describe what the operation will create once it is done
        responses = {**responses, code: {**responses[code], "links": links}}
    op: dict[str, Any] = {"operationId": op_id,
                          "summary": summary + (" (administrators only: 403 for others)" if admin else ""),
                          "responses": {**responses, **_ERRORS}}
    parameters = [_param(p) for p in params] + (query or [])
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        schema = body.schema() if isinstance(body, Body) else {"oneOf": [b.schema() for b in body]}
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": schema}}}
        op["responses"].update(_TOO_LARGE)
    return op


_ROWS = {"type": "array", "items": {"type": "array", "items": {}}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_NULL = {"type": "object", "nullable": True, "maxProperties": 0}  # always null
_NO_CONTENT = {"204": {"description": "Done (no body)"}}
_CREATED_NULL = _result(_NULL, "201", "Created")
_P = ["project"]
_RECONCILE_RESULT = {"type": "object", "properties": {
    "images_without_row": _STRINGS, "rows_without_image": _STRINGS, "targets_without_row": _STRINGS,
    "missing_targets": _STRINGS, "missing_boot_files": _STRINGS, "leftover_snapshots": _STRINGS,
    "unfinished_operations": {"type": "array", "items": {"type": "object"}},
    "repaired": BOOL}}


_PROJ = "$request.path.project"

# The record of an asynchronous operation (docs/api.md "Asynchronous operations").
_STR_OR_NULL = {"type": "string", "nullable": True}
OPERATION = {"type": "object", "required": ["id", "verb", "project", "state", "progress"], "properties": {
    "id": ID, "verb": {"type": "string"}, "project": {"type": "string"},
    "args": {"type": "object"}, "user": {"type": "string"},
    "state": {"type": "string", "enum": list(OPERATION_STATES)},
    "queue_position": {"type": "integer", "minimum": 1, "nullable": True},
    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
    "steps_done": {"type": "integer", "minimum": 0}, "step": _STR_OR_NULL,
    "result": {"nullable": True},
    "error": {"type": "object", "nullable": True, "required": ["status", "type", "message"], "properties": {
        "status": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}}},
    "created_at": {"type": "string"}, "started_at": _STR_OR_NULL, "finished_at": _STR_OR_NULL}}


def _accepted(what: str, result: dict[str, Any] = OPERATION, location: bool = True) -> dict[str, Any]:
    """202: the operation is queued; follow it at the Location (GET /v1/operations/{id})."""
    out = _result(result, "202", f"Accepted: {what} is queued as an operation; follow it at the Location "
                                 "(GET /v1/operations/{id}) until its state is done or failed")
    if location:
        out["202"]["headers"] = {"Location": {"description": "/v1/operations/{id} of the queued operation",
                                              "schema": {"type": "string"}}}
    return out


def _links(**targets: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {op_id: {"operationId": op_id, "parameters": params} for op_id, params in targets.items()}


def _paths() -> dict[str, dict[str, Any]]:
    return {
        "/v1/projects": {
            "get": _op("listProjects", "List the projects registered in BMI: rows [id, name, provision_network]",
                       [], _result(_ROWS), admin=True),
            "post": _op("createProject", "Register a HIL project in BMI", [], _CREATED_NULL, PROJECT_CREATE,
                        admin=True, links=_links(removeProject={"project": "$request.body#/name"})),
        },
        "/v1/projects/{project}": {
            "delete": _op("removeProject", "Remove a project (it must have no images)", _P, _NO_CONTENT,
                          admin=True),
        },
        "/v1/projects/{project}/images": {
            "get": _op("listImages", "List the project's golden images", _P, _result(_STRINGS)),
            "post": _op("importImage", "Import a storage image (optionally one of its snapshots) into the project",
                        _P, _accepted("the import"), IMPORT, links=_links(
                            removeImage={"project": _PROJ, "img": "$request.body#/name"},
                            exportImage={"project": _PROJ, "img": "$request.body#/name"},
                            copyImage={"project": _PROJ, "img": "$request.body#/name"})),
        },
        "/v1/projects/{project}/images/{img}": {
            "delete": _op("removeImage", "Remove an image (or snapshot)", _P + ["img"], _accepted("the removal")),
        },
        "/v1/projects/{project}/images/{img}/export": {
            "post": _op("exportImage", "Export an image to a new storage image outside BMI", _P + ["img"],
                        _accepted("the export"), EXPORT),
        },
        "/v1/projects/{project}/images/{img}/copy": {
            "post": _op("copyImage", "Copy an image (to another project: administrators only)", _P + ["img"],
                        _accepted("the copy"), TRANSFER),
        },
        "/v1/projects/{project}/images/{img}/move": {
            "post": _op("moveImage", "Move/rename an image (to another project: administrators only)",
                        _P + ["img"], _accepted("the move"), TRANSFER),
        },
        "/v1/projects/{project}/snapshots": {
            "get": _op("listSnapshots", "List snapshots: rows [snapshot, parent]", _P, _result(_ROWS)),
        },
        "/v1/projects/{project}/snapshots/{snap}": {
            "delete": _op("removeSnapshot", "Remove a snapshot", _P + ["snap"], _accepted("the removal")),
        },
        "/v1/projects/{project}/nodes": {
            "get": _op("listProvisioned", "List provisioned nodes: rows [node, image]", _P, _result(_ROWS)),
        },
        "/v1/projects/{project}/nodes/{node}/provision": {
            "post": _op("provision", "Provision a node from an image ({image, network, nic}) or a disk "
                        "({disk, nic})", _P + ["node"], _accepted("the provision"), [PROVISION_IMAGE, PROVISION_DISK]),
        },
        "/v1/projects/{project}/nodes/{node}/deprovision": {
            "post": _op("deprovision", "Deprovision a node ({network, nic}; {nic} alone for a disk-provisioned "
                        "node).  400 when the network or NIC is not the one recorded at provision time",
                        _P + ["node"], _accepted("the deprovision"), [DEPROVISION_NETWORK, DEPROVISION_DISK]),
        },
        "/v1/projects/{project}/nodes/{node}/snapshots": {
            "post": _op("createSnapshot", "Snapshot a node's disk as a new image (power the node off first)",
                        _P + ["node"], _accepted("the snapshot"), SNAPSHOT,
                        links=_links(removeSnapshot={"project": _PROJ, "snap": "$request.body#/name"})),
        },
        "/v1/projects/{project}/provisions": {
            "post": _op("provisionBatch", f"Provision several nodes ({{nodes: [{{node, image, network, nic}}]}}, 1 to "
                        f"{MAX_BATCH}, each node once: 409 otherwise): one operation per node, all queued or none "
                        "(400 naming the first invalid item)", _P,
                        _accepted("each node", {"type": "array", "items": OPERATION}, location=False),
                        Body({"nodes": ({"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                         "items": BATCH_NODE.schema()}, "")}, ("nodes",))),
        },
        "/v1/provisions": {
            "post": _op("provisions", f"Provision several nodes of one project ({{project, nodes: [{{node, image, "
                        f"network, nic}}]}}, 1 to {MAX_BATCH} nodes, each once): the same batch as "
                        "POST /v1/projects/{project}/provisions", [],
                        _accepted("each node", {"type": "array", "items": OPERATION}, location=False),
                        Body({"project": _n("project"),
                              "nodes": ({"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                         "items": BATCH_NODE.schema()}, "")}, ("project", "nodes"))),
        },
        "/v1/projects/{project}/nodes/{node}/ip": {
            "get": _op("nodeIp", "The node's IP address (from the DHCP leases)", _P + ["node"],
                       _result({"type": "string"})),
        },
        "/v1/projects/{project}/iscsi": {
            "get": _op("listTargets", "List exported images: rows [image, iqn]", _P, _result(_ROWS)),
            "post": _op("createTarget", "Export an image as an iSCSI target; the done operation's result is the "
                        "IQN", _P, _accepted("the target"), ISCSI_CREATE, admin=True,
                        links=_links(removeTarget={"project": _PROJ, "img": "$request.body#/image"})),
        },
        "/v1/projects/{project}/iscsi/{img}": {
            "delete": _op("removeTarget", "Remove an image's iSCSI target", _P + ["img"], _accepted("the removal"),
                          admin=True),
        },
        "/v1/projects/{project}/disks": {
            "get": _op("listDisks", "List disks: rows [disk, source image]", _P, _result(_ROWS)),
            "post": _op("createDisk", "Create a disk (clone + target) from an image; the done operation's result "
                        "is the target name", _P, _accepted("the disk"), DISK_CREATE,
                        links=_links(deleteDisk={"project": _PROJ, "disk": "$request.body#/name"})),
        },
        "/v1/projects/{project}/disks/{disk}": {
            "delete": _op("deleteDisk", "Delete a disk", _P + ["disk"], _accepted("the deletion")),
        },
        "/v1/operations": {
            "get": _op("listOperations", "The newest operations (at most 200) of the projects the caller may "
                       "use (administrators: all), newest first", [], _result({"type": "array", "items": OPERATION}),
                       query=[_param("state", "query", {"type": "string", "enum": list(OPERATION_STATES)}),
                              _param("project", "query")]),
        },
        "/v1/operations/{op_id}": {
            "get": _op("showOperation", "One operation: state, queue position, progress, steps done, result or "
                       "error.  ?wait=N waits up to N seconds for it to finish first.  404 when it does not exist "
                       "or belongs to a project the caller may not use", [], _result(OPERATION),
                       query=[{"name": "op_id", "in": "path", "required": True, "schema": ID},
                              _param("wait", "query", {"type": "integer", "minimum": 0,
                                                       "maximum": MAX_POLL_SECONDS})]),
        },
        "/v1/db/images": {
            "get": _op("listImageRecords", "List the image records the caller may see: rows [id, name, project, "
                       "ceph, public, snapshot, parent]", [], _result(_ROWS),
                       query=[_param(f, "query", BOOL) for f in DB_LIST_FLAGS]
                       + [_param(n, "query") for n in DB_LIST_NAMES]),
            "post": _op("createImageRecord", "Add an image record (database only)", [], _CREATED_NULL, DB_CREATE,
                        admin=True, links=_links(removeImageRecord={"project": "$request.body#/project",
                                                                    "img": "$request.body#/name"})),
        },
        "/v1/db/images/{project}/{img}": {
            "delete": _op("removeImageRecord", "Remove an image record (database only)", _P + ["img"],
                          _NO_CONTENT, admin=True),
        },
        "/v1/admin/reconcile": {
            "post": _op("reconcile", "Compare database, storage, targets and boot files; report drift, and repair "
                        "it with {\"repair\": true}", [], _result(_RECONCILE_RESULT), RECONCILE, admin=True,
                        body_required=False),
        },
        "/v1/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document", "security": [],
                    "responses": {"200": {"description": "OpenAPI 3 document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}}},
        },
    }


def _transfer_paths() -> dict[str, dict[str, Any]]:
    from ims.picasso.transfer_doc import paths  # imports this module: load it only once this one is loaded

    return paths()


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "BMI (Bare Metal Imaging) API", "version": "1",
                 "description": "Authenticate with HTTP Basic using your HIL username and password "
                                "(UTF-8; characters outside Latin-1 and control characters are refused "
                                "with 401).  Request bodies are limited to [rest_api] max_body_bytes (413)."},
        "security": [{"basic": []}],
        "paths": {**_paths(), **_transfer_paths()},
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {"schema": {
                "type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["status", "type", "message"], "properties": {
                        "status": {"type": "integer"}, "type": {"type": "string"},
                        "message": {"type": "string"}}}}}}}}},
        },
    }

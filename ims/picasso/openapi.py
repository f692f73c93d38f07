"""Hand-written OpenAPI 3 description of the /v1 JSON API (served at GET /v1/openapi.json)."""
from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
_ERR = {"$ref": "#/components/responses/Error"}
_ERRORS = {"400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR, "503": _ERR}


def _param(name: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or _NAME}


def _result(schema: dict[str, Any], code: str = "200", text: str = "OK") -> dict[str, Any]:
    return {code: {"description": text, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"result": schema}}}}}}


def _op(summary: str, params: list[str], responses: dict[str, Any], body: dict[str, Any] | None = None,
        required: list[str] | None = None, admin: bool = False, query: list[dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary + (" (administrators only)" if admin else ""),
                          "parameters": [_param(p) for p in params] + (query or []),
                          "responses": {**responses, **_ERRORS}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": body, "required": required or []}}}}
    return op


_ROWS = {"type": "array", "items": {"type": "array"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_NULL = {"nullable": True}
_NO_CONTENT = {"204": {"description": "Done"}}
_CREATED_NULL = _result(_NULL, "201", "Created")
_OK_NULL = _result(_NULL)
_BOOL = {"type": "boolean"}
_P = ["project"]


def _paths() -> dict[str, dict[str, Any]]:
    return {
        "/v1/projects": {
            "get": _op("List the projects the caller can see: rows [id, name, provision_network]", [],
                       _result(_ROWS)),
            "post": _op("Create a project", [], _CREATED_NULL, {"name": _NAME, "network": _NAME,
                                                                "id": {"type": "integer"}}, ["name"], admin=True),
        },
        "/v1/projects/{project}": {
            "delete": _op("Remove a project", _P, _NO_CONTENT, admin=True),
        },
        "/v1/projects/{project}/images": {
            "get": _op("List the project's images", _P, _result(_STRINGS)),
            "post": _op("Import a Ceph image (optionally one of its snapshots) into the project", _P, _CREATED_NULL,
                        {"name": _NAME, "snapshot": _NAME, "protect": _BOOL}, ["name"]),
        },
        "/v1/projects/{project}/images/{img}": {
            "delete": _op("Remove an image (or snapshot)", _P + ["img"], _NO_CONTENT),
        },
        "/v1/projects/{project}/images/{img}/export": {
            "post": _op("Export an image to a new Ceph image outside BMI", _P + ["img"], _OK_NULL,
                        {"name": _NAME}, ["name"]),
        },
        "/v1/projects/{project}/images/{img}/copy": {
            "post": _op("Copy an image (to another project: administrators only)", _P + ["img"], _CREATED_NULL,
                        {"dest_project": _NAME, "dest_name": _NAME}, ["dest_project"]),
        },
        "/v1/projects/{project}/images/{img}/move": {
            "post": _op("Move/rename an image (to another project: administrators only)", _P + ["img"],
                        _CREATED_NULL, {"dest_project": _NAME, "dest_name": _NAME}, ["dest_project"]),
        },
        "/v1/projects/{project}/snapshots": {
            "get": _op("List snapshots: rows [snapshot, parent]", _P, _result(_ROWS)),
        },
        "/v1/projects/{project}/snapshots/{snap}": {
            "delete": _op("Remove a snapshot", _P + ["snap"], _NO_CONTENT),
        },
        "/v1/projects/{project}/nodes": {
            "get": _op("List provisioned nodes: rows [node, image]", _P, _result(_ROWS)),
        },
        "/v1/projects/{project}/nodes/{node}/provision": {
            "post": _op("Provision a node from an image ({image, network, nic}) or a disk ({disk, nic})",
                        _P + ["node"], _OK_NULL, {"image": _NAME, "network": _NAME, "nic": _NAME, "disk": _NAME},
                        ["nic"]),
        },
        "/v1/projects/{project}/nodes/{node}/deprovision": {
            "post": _op("Deprovision a node ({network, nic}; {nic} alone for a disk-provisioned node)",
                        _P + ["node"], _OK_NULL, {"network": _NAME, "nic": _NAME}, ["nic"]),
        },
        "/v1/projects/{project}/nodes/{node}/snapshots": {
            "post": _op("Snapshot a node's disk as a new image (power the node off first)", _P + ["node"],
                        _CREATED_NULL, {"name": _NAME}, ["name"]),
        },
        "/v1/projects/{project}/nodes/{node}/ip": {
            "get": _op("The node's IP address", _P + ["node"], _result({"type": "string"})),
        },
        "/v1/projects/{project}/iscsi": {
            "get": _op("List exported images: rows [image, iqn]", _P, _result(_ROWS)),
            "post": _op("Export an image as an iSCSI target; returns the IQN", _P, _result(
                {"type": "string"}, "201", "Created"), {"image": _NAME}, ["image"]),
        },
        "/v1/projects/{project}/iscsi/{img}": {
            "delete": _op("Remove an image's iSCSI target", _P + ["img"], _NO_CONTENT),
        },
        "/v1/projects/{project}/disks": {
            "get": _op("List disks: rows [disk, source image]", _P, _result(_ROWS)),
            "post": _op("Create a disk (clone + target) from an image; returns the target name", _P, _result(
                {"type": "string"}, "201", "Created"), {"name": _NAME, "image": _NAME}, ["name", "image"]),
        },
        "/v1/projects/{project}/disks/{disk}": {
            "delete": _op("Delete a disk", _P + ["disk"], _NO_CONTENT),
        },
        "/v1/db/images": {
            "get": _op("List image records: rows [id, name, project, ceph, public, snapshot, parent]", [],
                       _result(_ROWS), query=[_param("snapshots", "query", _BOOL), _param("clones", "query", _BOOL),
                                              _param("public", "query", _BOOL), _param("project", "query"),
                                              _param("name", "query"), _param("ceph", "query")]),
            "post": _op("Add an image record (database only)", [], _CREATED_NULL,
                        {"project": _NAME, "name": _NAME, "id": {"type": "integer"}, "snapshot": _BOOL,
                         "parent": _NAME, "public": _BOOL}, ["project", "name"], admin=True),
        },
        "/v1/db/images/{project}/{img}": {
            "delete": _op("Remove an image record (database only)", _P + ["img"], _NO_CONTENT, admin=True),
        },
        "/v1/admin/reconcile": {
            "post": _op("Compare database, storage, targets and boot files; report drift, and repair it with "
                        "{\"repair\": true}", [], _result({"type": "object"}), {"repair": _BOOL}, admin=True),
        },
        "/v1/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}},
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "BMI (Bare Metal Imaging) API", "version": "1",
                 "description": "Authenticate with HTTP Basic using your HIL username and password."},
        "security": [{"basic": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"error": {"type": "object", "properties": {
                    "status": {"type": "integer"}, "type": {"type": "string"},
                    "message": {"type": "string"}}}}}}}}},
        },
    }

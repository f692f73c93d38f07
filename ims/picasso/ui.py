"""The web console under /ui/: server-rendered pages (Flask/Jinja, no JavaScript at all).

Same authentication as the API: HTTP Basic with the user's HIL credentials, checked with HIL
for every project shown (Einstein's ``console_projects`` / ``console_project``); BMI's
administrators see every project.  A tenant asking for another tenant's project gets HIL's
403 (or 404), as from the API.

Every name on these pages comes from users, so templates are autoescaped (``.html``), and
the answers carry a Content-Security-Policy that allows no script at all: even a name that got
through unescaped could not run anything.  Errors are HTML pages with the API's status codes;
a 401 carries ``WWW-Authenticate: Basic`` so a browser asks for the credentials.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, make_response, render_template, request

from ims.common.errors import BMIError, InvalidInput
from ims.common.names import validate_name
from ims.picasso.auth import client, credentials

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates")

# Finished operations shown under the running and queued ones.
RECENT = 15
# Seconds between reloads of a page while operations are queued or running (a meta refresh).
REFRESH_SECONDS = 5
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def human_size(value: int | None) -> str:
    """Bytes as a short binary-prefixed size; "missing" when the storage is gone."""
    if value is None:
        return "missing"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"  # not reached


def image_tree(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's image rows as a forest: roots (rows without a parent here), children below."""
    by_name = {img["name"]: {**img, "children": []} for img in images}
    roots: list[dict[str, Any]] = []
    for img in images:
        node = by_name[img["name"]]
        parent = by_name.get(img["parent"]) if img["parent"] else None
        (parent["children"] if parent is not None else roots).append(node)
    return roots


def split_operations(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(running then queued in queue order, the newest finished ones)."""
    running = [r for r in records if r["state"] == "running"]
    queued = sorted((r for r in records if r["state"] == "queued"),
                    key=lambda r: (r.get("queue_position") or 1 << 30, r["id"]))
    finished = [r for r in records if r["state"] in ("done", "failed")][:RECENT]
    return running + queued, finished


def when(value: Any) -> str:
    """An ISO timestamp from Einstein as ``YYYY-MM-DD HH:MM:SS`` (UTC), "" for none."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return value
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def describe_args(args: Any) -> str:
    if not isinstance(args, dict):
        return ""
    return ", ".join(f"{k}={v}" for k, v in args.items() if k != "project" and v not in (None, False, ""))


def _page(template: str, code: int = 200, **context: Any) -> Response:
    return make_response(render_template(template, human_size=human_size, describe_args=describe_args, when=when,
                                         refresh=REFRESH_SECONDS, **context), code)


@bp.after_request
def security_headers(resp: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        resp.headers[key] = value
    return resp


@bp.errorhandler(BMIError)
def error_page(exc: BMIError) -> Response:
    status = exc.status if 400 <= exc.status <= 599 else 500
    resp = _page("ui/error.html", status, status=status, kind=type(exc).__name__, message=exc.message,
                 user=None)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="BMI", charset="UTF-8"'
    return resp


@bp.before_request
def no_query() -> None:
    # The pages take no parameters: anything else is a mistake worth saying so.
    if request.args:
        raise InvalidInput("the console's pages take no query parameters")


@bp.get("/")
def index() -> Response:
    auth = credentials()
    overview = client().console_projects(auth)
    active, finished = split_operations(client().operation_list(auth, None, None))
    return _page("ui/index.html", user=overview["user"], admin=overview["admin"], projects=overview["projects"],
                 active=active, finished=finished)


@bp.get("/projects/<project>")
def project(project: str) -> Response:
    auth = credentials()
    validate_name(project, "project")
    view = client().console_project(auth, project)
    active, finished = split_operations(client().operation_list(auth, None, project))
    return _page("ui/project.html", user=auth["username"], admin=view["admin"], view=view,
                 tree=image_tree(view["images"]), active=active, finished=finished)

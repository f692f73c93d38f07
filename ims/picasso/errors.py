"""Every error Picasso answers is JSON ``{"error": {"status", "type", "message"}}`` — never HTML —
except on the legacy form API (ims/picasso/legacy.py), which answers as the original BMI did: the
message alone as a plain-text body.  The status codes are ours on both (docs/api.md lists how they
differ from the original's); ``X-BMI-Error-Type`` carries the type for the plain-text answers."""
from __future__ import annotations

import logging

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from ims.common.errors import BMIError

LOG = logging.getLogger(__name__)

_HTTP_TYPES = {400: "InvalidInput", 401: "AuthenticationFailed", 403: "Forbidden", 404: "NotFound",
               405: "MethodNotAllowed", 409: "Conflict", 413: "PayloadTooLarge", 415: "InvalidInput",
               503: "ServiceUnavailable"}


def legacy_request() -> bool:
    """Whether the request being answered is one of the legacy form API's (matched or not)."""
    from ims.picasso.legacy import is_legacy_path  # legacy imports the request helpers: import late

    return has_request_context() and (request.blueprint == "legacy" or is_legacy_path(request.path))


def error_response(status: int, type_: str, message: str) -> Response:
    if legacy_request():
        resp = Response(message, status=status, mimetype="text/plain")
        resp.headers["X-BMI-Error-Type"] = type_
    else:
        resp = jsonify({"error": {"status": status, "type": type_, "message": message}})
        resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="BMI"'
    return resp


def _bmi_error(exc: BMIError) -> Response:
    status = exc.status if 400 <= exc.status <= 599 else 500
    if status >= 500 and status != 503:
        LOG.error("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(status, type(exc).__name__, exc.message)


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    resp = error_response(code, _HTTP_TYPES.get(code, "InternalError" if code >= 500 else "InvalidInput"),
                          exc.description or exc.name)
    valid = getattr(exc, "valid_methods", None)
    if code == 405 and valid:
        resp.headers["Allow"] = ", ".join(valid)
    return resp


def _unexpected(exc: Exception) -> Response:
    LOG.exception("unhandled error in Picasso")
    return error_response(500, "InternalError", "internal error; see the BMI server log")


def register(app: Flask) -> None:
    app.register_error_handler(BMIError, _bmi_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)

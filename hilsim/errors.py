"""HIL's API errors, with the statuses real HIL sends (reference/hil-api.md §2).

The simulator raises these; the Flask layer turns them into HIL's error body
``{"type": "<class name>", "msg": "<text>"}``.
"""
from __future__ import annotations


class SimError(Exception):
    status = 400

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg

    @property
    def type(self) -> str:
        return type(self).__name__


class ValidationError(SimError):
    status = 400


class BadArgumentError(SimError):
    status = 400


class AuthorizationError(SimError):
    """HIL's one 401: bad credentials and missing project access alike."""

    status = 401


class NotFoundError(SimError):
    status = 404


class DuplicateError(SimError):
    status = 409


class BlockedError(SimError):
    status = 409


class ProjectMismatchError(SimError):
    status = 409


class OBMError(SimError):
    status = 500


AUTH_REQUIRED = "Authentication failed. Authentication is required to use this service."
NO_PROJECT_ACCESS = "You do not have access to the required project."
ADMIN_ONLY = "This operation is administrator-only."

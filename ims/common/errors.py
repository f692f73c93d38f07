"""One exception tree for all of BMI.

Every error carries the HTTP status it maps to, so Einstein, Picasso and the CLI
never need a translation table.  Messages use BMI names (never internal Ceph
names) and say what the user can do about it.

Errors cross the Pyro4 wire as ``{"status": int, "type": str, "message": str}``
(see :func:`to_wire` / :func:`from_wire`); only classes defined here are rebuilt
on the other side, anything else becomes a plain :class:`BMIError`.
"""
from __future__ import annotations

from typing import Any


class BMIError(Exception):
    """Base of every BMI error.  ``status`` is the HTTP status code."""

    status: int = 500

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "type": type(self).__name__, "message": self.message}


# --- families, one per HTTP status -------------------------------------------------
class InvalidInput(BMIError):
    status = 400


class AuthenticationFailed(BMIError):
    status = 401


class Forbidden(BMIError):
    status = 403


class NotFound(BMIError):
    status = 404


class Conflict(BMIError):
    status = 409


class ServiceUnavailable(BMIError):
    status = 503


class InternalError(BMIError):
    status = 500


# --- concrete errors ---------------------------------------------------------------
class InvalidName(InvalidInput):
    pass


class ConfigError(BMIError):
    """The configuration file is missing or wrong (raised at start-up)."""

    status = 500


class ProjectNotFound(NotFound):
    pass


class ImageNotFound(NotFound):
    pass


class SnapshotNotFound(NotFound):
    pass


class NodeNotFound(NotFound):
    pass


class NicNotFound(NotFound):
    pass


class TargetNotFound(NotFound):
    pass


class LeaseNotFound(NotFound):
    pass


class ProjectExists(Conflict):
    pass


class ImageExists(Conflict):
    pass


class SnapshotExists(Conflict):
    pass


class TargetExists(Conflict):
    pass


class ImageBusy(Conflict):
    """The image has clones, snapshots, watchers or provisioned nodes."""


class NodeBusy(Conflict):
    """Another operation holds the node (or image) lock."""


class NodeAlreadyProvisioned(Conflict):
    pass


class WrongKind(Conflict):
    """The named object exists but is of another kind, or in a state the verb cannot act on
    (a node's disk where an image is needed, an unprotected snapshot): 409, not a malformed request."""


class NotAsProvisioned(Conflict):
    """A deprovision names another network or NIC than its provision recorded: the request is
    well-formed but conflicts with the node's state (409), and nothing is changed."""


class NodeNotProvisioned(NotFound):
    pass


class OperationNotFound(NotFound):
    """No asynchronous operation with that id, or none the caller may see."""


class StorageError(ServiceUnavailable):
    """The storage back-end failed or cannot be reached."""


class IscsiError(ServiceUnavailable):
    """tgtd failed or cannot be reached."""


class TgtdRestarted(IscsiError):
    """tgtd was replaced (restarted) while a target was being made: nothing more went to that tid."""


class HILUnavailable(ServiceUnavailable):
    pass


class HILError(BMIError):
    """HIL answered with an unexpected error (status kept from HIL where sane)."""


class CommandFailed(BMIError):
    """An external command exited non-zero (raised by ims.common.process)."""

    status = 500

    def __init__(self, message: str, cmd: tuple[str, ...] = (), exit_code: int | None = None,
                 stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.cmd = cmd
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


_WIRE_CLASSES: dict[str, type[BMIError]] = {}


def _register(cls: type[BMIError]) -> None:
    _WIRE_CLASSES[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(BMIError)


def to_wire(exc: BaseException) -> dict[str, Any]:
    """Plain-data form of an error, safe to send over RPC (no traceback)."""
    if isinstance(exc, BMIError):
        return exc.to_dict()
    return {"status": 500, "type": "InternalError", "message": f"internal error: {type(exc).__name__}"}


def from_wire(data: dict[str, Any]) -> BMIError:
    """Rebuild an error sent by :func:`to_wire`; unknown types become BMIError."""
    cls = _WIRE_CLASSES.get(str(data.get("type")), BMIError)
    status = int(data.get("status", 500))
    message = str(data.get("message", ""))
    if cls is CommandFailed:
        return BMIError(message, status=status)
    err = cls(message)
    err.status = status
    return err

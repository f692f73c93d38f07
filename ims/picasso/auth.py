"""HTTP Basic authentication with HIL credentials, project checks and the admin role.

A successful ``check_auth(auth, project)`` is cached for ``[net_isolator] auth_cache_seconds``
so a burst of requests does not hit HIL each time.  The cache key holds the username,
the SHA-256 of the password and the project — never the password itself.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from flask import current_app, request

from ims.common.errors import AuthenticationFailed, Forbidden
from ims.common.names import validate_name


class AuthCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._until: dict[tuple[str, str, str], float] = {}

    @staticmethod
    def key(auth: dict[str, str], scope: str) -> tuple[str, str, str]:
        digest = hashlib.sha256(auth["password"].encode("utf-8")).hexdigest()
        return (auth["username"], digest, scope)

    def valid(self, auth: dict[str, str], scope: str) -> bool:
        if self.ttl <= 0:
            return False
        with self._lock:
            until = self._until.get(self.key(auth, scope))
            return until is not None and until > time.monotonic()

    def remember(self, auth: dict[str, str], scope: str) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            now = time.monotonic()
            if len(self._until) > 10000:  # bound memory: drop expired entries
                self._until = {k: v for k, v in self._until.items() if v > now}
            self._until[self.key(auth, scope)] = now + self.ttl


def client() -> Any:
    return current_app.extensions["bmi"]["client"]


def credentials() -> dict[str, str]:
    """The request's Basic credentials as the auth dict every operation takes (401 if absent)."""
    basic = request.authorization
    if basic is None or basic.type != "basic" or not basic.username:
        raise AuthenticationFailed("authentication required: send your HIL username and password "
                                   "with HTTP Basic authentication")
    return {"username": basic.username, "password": basic.password or ""}


def project_access(project: str) -> dict[str, str]:
    """Credentials allowed to use ``project`` (400 bad name, 401, 403/404 from HIL)."""
    auth = credentials()
    validate_name(project, "project")
    cache: AuthCache = current_app.extensions["bmi"]["auth_cache"]
    if not cache.valid(auth, project):
        client().check_auth(auth, project)
        cache.remember(auth, project)
    return auth


def admin_access() -> dict[str, str]:
    """Credentials of an administrator (401 bad credentials, 403 not an admin)."""
    auth = credentials()
    if not client().is_admin(auth):
        raise Forbidden("this operation needs a BMI administrator")
    return auth

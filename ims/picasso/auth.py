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
    """The Einstein client.  Its errors carry their own status: a request that does not fit the
    OpenAPI document is a 400 here, a state conflict from Einstein a 409 (WrongKind and the other
    Conflict classes), and a request that names something other than what BMI recorded a 400."""
    return current_app.extensions["bmi"]["client"]


# Longest username or password accepted (HIL's own limits are far below).
MAX_CREDENTIAL_CHARS = 1024


def usable_credential(value: str) -> bool:
    """Whether ``value`` can be sent on to HIL unchanged.

    Picasso decodes Basic credentials as UTF-8 (RFC 7617); bytes that are not UTF-8 never get
    here.  Einstein's HIL client sends them on with HTTP Basic, whose portable character set is
    Latin-1, so anything outside it (and any control character) is refused here with a 401,
    never passed on to fail later as a 500.
    """
    if len(value) > MAX_CREDENTIAL_CHARS:
        return False
    return all(32 <= ord(c) <= 255 and not 127 <= ord(c) < 160 for c in value)


def credentials() -> dict[str, str]:
    """The request's Basic credentials as the auth dict every operation takes (401 if absent or unusable)."""
    header = request.headers.get("Authorization")
    basic = request.authorization
    if basic is None or basic.type != "basic" or not basic.username:
        if header:
            raise AuthenticationFailed("malformed Authorization header: send your HIL username and password "
                                       "with HTTP Basic authentication (UTF-8)")
        raise AuthenticationFailed("authentication required: send your HIL username and password "
                                   "with HTTP Basic authentication")
    password = basic.password or ""
    if not usable_credential(basic.username) or not usable_credential(password):
        raise AuthenticationFailed("authentication failed: usernames and passwords may only hold printable "
                                   "Latin-1 characters (at most 1024)")
    return {"username": basic.username, "password": password}


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

"""``@rpc``: the one decorator that puts a facade method on Einstein's RPC allow-list.

``ims/rpc/methods.py`` builds ALLOWED_METHODS / ADMIN_METHODS from the marks, so a verb is
served exactly when the facade says so, and an admin-only verb is declared where it is written.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ATTR = "__bmi_rpc__"


def rpc(admin: bool = False, read_only: bool = False) -> Callable[[F], F]:
    """Serve the method over RPC. ``admin``: only administrators may call it (Picasso refuses others
    before the call); ``read_only``: it changes nothing (safe to re-send after a lost connection)."""

    def mark(fn: F) -> F:
        setattr(fn, ATTR, {"admin": admin, "read_only": read_only})
        return fn

    return mark


def exposed(cls: type, **want: bool) -> frozenset[str]:
    """Names of ``cls``'s @rpc methods whose marks match ``want`` (e.g. ``admin=True``)."""
    out = set()
    for name in dir(cls):
        marks = getattr(getattr(cls, name, None), ATTR, None)
        if marks is not None and all(marks[k] == v for k, v in want.items()):
            out.add(name)
    return frozenset(out)

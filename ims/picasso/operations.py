"""Asynchronous operations as Picasso uses them: submit a mutation to Einstein, answer 202 with where to
follow it (/v1), or wait for it without ever holding one RPC call longer than ``operation_wait``'s
bound (the legacy form API's synchronous ``Success`` contract).

The RPC verbs (``submit``, ``submit_batch``, ``operation_show``, ``operation_list``,
``operation_wait``) and the record's shape are fixed in the interface shared with Einstein; see
docs/api.md "Asynchronous operations".
"""
from __future__ import annotations

from typing import Any

from flask import Response, g, jsonify, request

from ims.common.errors import BMIError, InvalidInput, from_wire
from ims.picasso.auth import client, credentials
from ims.picasso.openapi import MAX_BATCH, MAX_POLL_SECONDS
from ims.picasso.openapi import OPERATION_STATES as STATES

__all__ = ["MAX_BATCH", "MAX_POLL_SECONDS", "STATES", "accepted", "failure", "run", "submit", "wait"]

FINISHED = frozenset({"done", "failed"})
# One operation_wait call waits at most this long (Einstein caps it at 30 s, far under the RPC timeout).
WAIT_SECONDS = 20.0


def submit(auth: dict[str, str], verb: str, waiting: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """Queue one call of ``verb``; errors found at submit time (400/401/403/404/409) raise here.

    ``waiting`` (seconds; default: the request's ``Prefer: wait=N``, else none) lets Einstein answer
    this same call once the operation has finished, or after that long with the record as it is then:
    a client that waits anyway saves the ``operation_wait`` call (an RPC round trip, and a read of the
    task while the operation runs) that would follow."""
    if waiting is None:
        waiting = preferred_wait()
    if waiting is None:
        return client().submit(auth, verb, kwargs)
    try:
        record = client().submit(auth, verb, kwargs, wait=waiting)
    except InvalidInput as exc:
        if exc.message != "wrong arguments for submit":
            raise
        # An Einstein from before ``wait`` (a rolling upgrade) refused the call unstarted, having
        # checked its arity first: submit without it; accepted()/wait() then wait as they did.
        return client().submit(auth, verb, kwargs)
    g.bmi_waited = True
    return record


def location(record: dict[str, Any]) -> str:
    return f"/v1/operations/{int(record['id'])}"


def preferred_wait() -> float | None:
    """The seconds of an RFC 7240 ``Prefer: wait=N`` request header (None: not asked)."""
    for header in request.headers.getlist("Prefer"):
        for pref in header.split(","):
            name, _, value = pref.split(";")[0].strip().partition("=")
            if name.strip().lower() == "wait":
                try:
                    return max(0.0, min(float(value.strip().strip('"')), WAIT_SECONDS))
                except ValueError:
                    return None  # an unusable preference is ignored (RFC 7240 section 2)
    return None


def accepted(record: dict[str, Any] | list[dict[str, Any]]) -> tuple[Response, int]:
    """202 with the record(s); one operation also gets ``Location: /v1/operations/<id>``.

    ``Prefer: wait=N`` (RFC 7240; N capped at ``WAIT_SECONDS``): the answer for ONE operation comes
    when it has finished, or after N seconds, with its record as it is then (still 202: the
    operation's own outcome is in the record) and ``Preference-Applied: wait=N``.  A client that
    waits anyway saves the request that would follow it."""
    seconds = preferred_wait()
    applied = None
    if seconds is not None and isinstance(record, dict):
        if record.get("state") not in FINISHED and not g.get("bmi_waited"):
            record = client().operation_wait(credentials(), int(record["id"]), seconds)
        applied = f"wait={seconds:g}"
    resp = jsonify({"result": record})
    if isinstance(record, dict):
        resp.headers["Location"] = location(record)
    if applied:
        resp.headers["Preference-Applied"] = applied
    resp.headers.add("Vary", "Prefer")
    return resp, 202


def wait(auth: dict[str, str], record: dict[str, Any]) -> Any:
    """Wait for the operation until it is done (its result) or failed (its error, raised with its status).

    Loops on ``operation_wait``: each call returns within ``WAIT_SECONDS`` however long the
    operation takes, so no RPC call ever times out while Einstein works.
    """
    while record.get("state") not in FINISHED:
        record = client().operation_wait(auth, int(record["id"]), WAIT_SECONDS)
    if record["state"] == "failed":
        raise failure(record)
    return record.get("result")


def run(auth: dict[str, str], verb: str, **kwargs: Any) -> Any:
    """Submit ``verb`` and wait for it (the legacy form API): its result, or its error raised."""
    return wait(auth, submit(auth, verb, waiting=WAIT_SECONDS, **kwargs))


def failure(record: dict[str, Any]) -> BMIError:
    """The error of a failed operation, as the verb itself would have raised it."""
    error = record.get("error")
    if not isinstance(error, dict):
        return BMIError(f"operation {record.get('id')} failed")
    return from_wire(error)

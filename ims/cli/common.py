"""What every ``bmi`` command module shares: the context (the Picasso client), option helpers, waiting."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import click

from ims.cli import ops, output
from ims.cli.api import Api, credentials, server_url
from ims.picasso.openapi import MAX_ID

ID = click.IntRange(1, MAX_ID)
F = TypeVar("F", bound=Callable[..., Any])
NO_WAIT_HELP = ("Do not wait: print the operation's id (its record with --json) and exit; "
                "follow it with `bmi op show ID`.")


class Ctx:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._api: Api | None = None

    @property
    def api(self) -> Api:
        # Built on first use so `--help` and usage errors never need credentials.
        if self._api is None:
            self._api = Api(server_url(), credentials())
        return self._api


pass_ctx = click.make_pass_decorator(Ctx)


def command(*arguments: str, wait: bool = False) -> Callable[[F], F]:
    """What every command's decorators repeat: its positional ``arguments`` (``name`` or
    ``name:METAVAR``; a trailing ``?`` makes it optional) first, then the options written below this
    decorator, then ``--no-wait`` when the command queues an operation (``wait``); the function gets
    the :class:`Ctx` first.  Same parameters in the same order (so the same ``--help`` and usage
    errors) as writing the click decorators out."""
    def decorate(f: F) -> F:
        wrapped: Any = pass_ctx(f)
        params: list[click.Parameter] = wrapped.__dict__.setdefault("__click_params__", [])
        if wait:  # click reverses this list: the first entry is the last parameter
            params.insert(0, click.Option(["--no-wait"], is_flag=True, help=NO_WAIT_HELP))
        for spec in reversed(arguments):
            name, _, metavar = spec.rstrip("?").partition(":")
            params.append(click.Argument([name], metavar=metavar or None, required=not spec.endswith("?")))
        return wrapped  # type: ignore[no-any-return]
    return decorate


def call(c: Ctx, method: str, path: str, data: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> Any:
    """One request to Picasso (an error answer is a ClickException: the message, exit 1); ``data`` is the
    query of a GET, the JSON body of a POST (a DELETE has none); ``headers`` go with a POST or DELETE."""
    if method == "GET":
        return c.api.get(path, data)
    return c.api.post(path, data, headers) if method == "POST" else c.api.delete(path, headers)


def table(c: Ctx, columns: list[str], path: str, params: dict[str, Any] | None = None) -> None:
    """A listing: GET ``path`` and print its rows under ``columns`` (a JSON list with --json)."""
    output.rows(columns, call(c, "GET", path, params), c.as_json)


def change(c: Ctx, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """A change Picasso makes at once (no operation): call, then print ``Success``."""
    call(c, method, path, body)
    output.success(c.as_json)


def queue(c: Ctx, method: str, path: str, body: dict[str, Any] | None, no_wait_: bool,
          show_result: bool = False) -> None:
    """A change Picasso queues as an operation: call, then :func:`finish` it (wait, print, exit status).

    Unless ``--no-wait``, the call asks Picasso to answer once the operation has finished, for at most
    ``ops.POLL_SECONDS`` (RFC 7240 ``Prefer: wait``): a quick operation then needs no second request,
    and a longer one is followed with its progress shown as before."""
    prefer = None if no_wait_ else {"Prefer": f"wait={ops.POLL_SECONDS}"}
    finish(c, call(c, method, path, body, prefer), no_wait_, show_result)


def finish(c: Ctx, record: dict[str, Any], no_wait_: bool, show_result: bool = False) -> None:
    """Wait for the operation a mutation queued (progress on stderr), then print ``Success`` (or, with
    ``show_result``, the operation's result); a failed operation is an error (exit 1)."""
    if no_wait_:
        output.operation_id(record, c.as_json)
        return
    final = ops.wait(c.api, [record])[0]
    if final["state"] == "failed":
        raise click.ClickException(ops.error_message(final))
    if show_result:
        output.value(final.get("result"), c.as_json)
    else:
        output.success(c.as_json, final.get("result"))


def q(name: str) -> str:
    """One URL path segment.  The server validates names; this only keeps a name from changing the route
    ('/' is quoted, and '.'/'..' would be collapsed by URL normalisation into another resource)."""
    if name in ("", ".", ".."):
        raise click.ClickException(f"invalid name {name!r}")
    return quote(name, safe="")

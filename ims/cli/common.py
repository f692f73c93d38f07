"""What every ``bmi`` command module shares: the context (the Picasso client), option helpers, waiting."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from ims.cli import ops, output
from ims.cli.api import Api, credentials, server_url
from ims.picasso.openapi import MAX_ID

ID = click.IntRange(1, MAX_ID)


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


def no_wait(f: Any) -> Any:
    """The option every mutation has: queue the operation and print its id instead of waiting."""
    return click.option("--no-wait", is_flag=True,
                        help="Do not wait: print the operation's id (its record with --json) and exit; "
                             "follow it with `bmi op show ID`.")(f)


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
